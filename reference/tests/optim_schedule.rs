//! Schedules at their boundary steps (0, W-1, W, T-1 and past the end), with the expected values
//! worked out by hand from the closed forms, plus monotonicity where the shape implies it.

use linattn_reference::optim::schedule::{Anneal, RefineFor, Schedule, Shape};
use std::f64::consts::PI;

fn close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-14 * expected.abs().max(1.0),
        "got {actual:.17}, expected {expected:.17}"
    );
}

fn check(schedule: &Schedule, points: &[(usize, f64)]) {
    for &(k, expected) in points {
        let f = schedule.multiplier(k);
        assert!(
            (f - expected).abs() <= 1e-14 * expected.abs().max(1.0),
            "{schedule:?} at k = {k}: got {f:.17}, expected {expected:.17}"
        );
    }
}

fn assert_non_increasing(schedule: &Schedule, from: usize, to: usize) {
    for k in from..to {
        let (a, b) = (schedule.multiplier(k), schedule.multiplier(k + 1));
        assert!(b <= a, "{schedule:?}: f({}) = {b} > f({k}) = {a}", k + 1);
    }
}

fn assert_increasing(schedule: &Schedule, from: usize, to: usize) {
    for k in from..to {
        let (a, b) = (schedule.multiplier(k), schedule.multiplier(k + 1));
        assert!(b > a, "{schedule:?}: f({}) = {b} <= f({k}) = {a}", k + 1);
    }
}

// W = 10, T = 100 throughout unless stated.

#[test]
fn constant_with_and_without_warmup() {
    check(
        &Schedule::Constant { warmup: 10 },
        &[
            (0, 0.0),
            (1, 0.1),
            (9, 0.9),
            (10, 1.0),
            (99, 1.0),
            (10_000, 1.0),
        ],
    );
    check(&Schedule::Constant { warmup: 0 }, &[(0, 1.0), (99, 1.0)]);
    assert_increasing(&Schedule::Constant { warmup: 10 }, 0, 10);
}

#[test]
fn linear_matches_transformers_lambda() {
    let s = Schedule::Linear {
        warmup: 10,
        total: 100,
    };
    // warmup k / 10; then (100 - k) / 90.
    check(
        &s,
        &[
            (0, 0.0),
            (9, 0.9),
            (10, 1.0),
            (55, 0.5),
            (99, 1.0 / 90.0),
            (100, 0.0),
            (150, 0.0),
        ],
    );
    assert_increasing(&s, 0, 10);
    assert_non_increasing(&s, 10, 120);
    // No warmup: k = 0 already runs at the full rate.
    check(
        &Schedule::Linear {
            warmup: 0,
            total: 4,
        },
        &[(0, 1.0), (1, 0.75), (3, 0.25), (4, 0.0)],
    );
}

#[test]
fn cosine_matches_transformers_lambda() {
    let s = Schedule::cosine(10, 100);
    // p = (k - 10) / 90; f = 0.5 (1 + cos(pi p)). At k = 99, p = 89/90 and
    // f = 0.5 (1 - cos(pi / 90)) = 0.5 (1 - 0.99939082701909573) = 3.0458649045213...e-4.
    check(
        &s,
        &[
            (0, 0.0),
            (9, 0.9),
            (10, 1.0),
            (55, 0.5),
            (99, 0.5 * (1.0 - (PI / 90.0).cos())),
        ],
    );
    close(s.multiplier(99), 3.045_864_904_521_352e-4);
    // Past T the unclamped cosine turns back up, as in transformers: p = 1 at k = 100 gives 0,
    // k = 190 gives p = 2 and f = 1.
    close(s.multiplier(100), 0.0);
    close(s.multiplier(190), 1.0);
    assert_increasing(&s, 0, 10);
    assert_non_increasing(&s, 10, 100);
}

#[test]
fn cosine_with_min_ratio() {
    let s = Schedule::Cosine {
        warmup: 10,
        total: 100,
        min_ratio: 0.1,
        num_cycles: 0.5,
    };
    // f = 0.1 + 0.9 * c with c the plain cosine factor; warmup is not floored (as the source).
    check(
        &s,
        &[
            (0, 0.0),
            (9, 0.9),
            (10, 1.0),
            (55, 0.55),
            (99, 0.1 + 0.9 * 0.5 * (1.0 - (PI / 90.0).cos())),
            (100, 0.1),
        ],
    );
    assert_non_increasing(&s, 10, 100);
    assert!((10..=100).all(|k| s.multiplier(k) >= 0.1 - 1e-15));
}

#[test]
fn inverse_sqrt_matches_transformers_lambda() {
    // timescale defaults to W = 10: f = 1 / sqrt((k + 10 - 10) / 10) = sqrt(10 / k).
    let s = Schedule::InverseSqrt {
        warmup: 10,
        timescale: None,
    };
    check(
        &s,
        &[
            (0, 0.0),
            (9, 0.9),
            (10, 1.0),
            (40, 0.5),
            (99, (10.0f64 / 99.0).sqrt()),
        ],
    );
    close(s.multiplier(99), 0.317_820_863_081_864_1);
    assert_non_increasing(&s, 10, 1000);
    // W = 0: timescale 10 000 (the source's fallback), f(k) = 1 / sqrt((k + 10000) / 10000).
    let s = Schedule::InverseSqrt {
        warmup: 0,
        timescale: None,
    };
    check(&s, &[(0, 1.0), (30_000, 0.5)]);
    // An explicit timescale tau = 5 with W = 10: f = 1 / sqrt((k - 5) / 5).
    let s = Schedule::InverseSqrt {
        warmup: 10,
        timescale: Some(5),
    };
    check(&s, &[(10, 1.0), (25, 0.5)]);
}

#[test]
fn wsd_matches_transformers_lambda() {
    // W = 10, D = 20, T = 100 -> stable 70; r = 0.1. Warmup is scaled into [r, 1] as in the source.
    let linear = Schedule::wsd(10, 20, 100, 0.1, Shape::Linear).unwrap();
    check(
        &linear,
        &[
            (0, 0.1),
            (9, 0.1 + 0.9 * 0.9),
            (10, 1.0),
            (79, 1.0),
            (80, 1.0),
            (90, 0.55),
            (99, 0.1 + 0.9 * 0.05),
            (100, 0.1),
            (500, 0.1),
        ],
    );
    let cosine = Schedule::wsd(10, 20, 100, 0.1, Shape::Cosine).unwrap();
    // k = 99: p = 0.95, 0.5 (1 + cos(0.95 pi)) = 0.5 (1 - cos(0.05 pi)) = 0.0061558297024311...
    check(
        &cosine,
        &[
            (0, 0.1),
            (10, 1.0),
            (80, 1.0),
            (90, 0.55),
            (99, 0.1 + 0.9 * 0.5 * (1.0 - (0.05 * PI).cos())),
            (100, 0.1),
        ],
    );
    close(cosine.multiplier(99), 0.105_540_246_732_188);
    let sqrt = Schedule::wsd(10, 20, 100, 0.1, Shape::OneMinusSqrt).unwrap();
    // k = 90: 1 - sqrt(0.5); k = 99: 1 - sqrt(0.95).
    check(
        &sqrt,
        &[
            (80, 1.0),
            (90, 0.1 + 0.9 * (1.0 - 0.5f64.sqrt())),
            (99, 0.1 + 0.9 * (1.0 - 0.95f64.sqrt())),
            (100, 0.1),
        ],
    );
    close(sqrt.multiplier(99), 0.122_788_508_967_193);
    for s in [&linear, &cosine, &sqrt] {
        assert_increasing(s, 0, 10);
        assert_non_increasing(s, 10, 120);
    }
    // r = 0 reaches 0 only after the decay: the last decay step is still positive.
    let zero = Schedule::wsd(0, 4, 4, 0.0, Shape::Linear).unwrap();
    check(&zero, &[(0, 1.0), (1, 0.75), (3, 0.25), (4, 0.0)]);
}

#[test]
fn wsd_warmup_shapes() {
    // warmup shapes of get_wsd_schedule at p = 0.5 (k = 5 of W = 10), r = 0.
    let s = |shape| Schedule::Wsd {
        warmup: 10,
        stable: 10,
        decay: 10,
        min_ratio: 0.0,
        warmup_shape: shape,
        decay_shape: Shape::Linear,
    };
    check(&s(Shape::Linear), &[(0, 0.0), (5, 0.5)]);
    check(&s(Shape::Cosine), &[(0, 0.0), (5, 0.5)]);
    check(
        &s(Shape::OneMinusSqrt),
        &[(0, 0.0), (5, 1.0 - 0.5f64.sqrt())],
    );
}

#[test]
fn rex_matches_the_paper() {
    // f = (1 - z) / (1 - z / 2), z = k / T.
    let s = Schedule::Rex {
        warmup: 0,
        total: 100,
    };
    check(
        &s,
        &[
            (0, 1.0),
            (50, 2.0 / 3.0),
            (99, 0.01 / 0.505),
            (100, 0.0),
            (300, 0.0),
        ],
    );
    close(s.multiplier(99), 0.019_801_980_198_019_8);
    assert_non_increasing(&s, 0, 150);
    // With warmup, z runs over the T - W steps after it.
    let s = Schedule::Rex {
        warmup: 10,
        total: 110,
    };
    check(&s, &[(0, 0.0), (9, 0.9), (10, 1.0), (60, 2.0 / 3.0)]);
}

#[test]
fn one_cycle_matches_torch() {
    // T = 100, pct_start 0.3 -> phase 1 ends at step 0.3 * 100 - 1 = 29; start 1/25 = 0.04,
    // min 0.04 / 1e4 = 4e-6.
    let s = Schedule::one_cycle(100);
    check(
        &s,
        &[
            (0, 0.04),
            (29, 1.0),
            (64, 4e-6 + (1.0 - 4e-6) / 2.0),
            (99, 4e-6),
        ],
    );
    assert_increasing(&s, 0, 29);
    assert_non_increasing(&s, 29, 99);
    // Linear annealing: halfway up at k = 14.5 is between steps; k = 29 peaks, k = 64 is
    // halfway down.
    let s = Schedule::OneCycle {
        total: 100,
        pct_start: 0.3,
        div_factor: 25.0,
        final_div_factor: 1e4,
        anneal: Anneal::Linear,
    };
    check(
        &s,
        &[(0, 0.04), (29, 1.0), (64, 0.5 * (1.0 + 4e-6)), (99, 4e-6)],
    );
}

#[test]
fn refined_from_constant_norms_is_linear_decay() {
    // Equal norms: w_k = const, f_k proportional to the number of later steps, (n - 1 - k).
    let s = Schedule::refined(&[2.0; 11], 1, RefineFor::Sgd).unwrap();
    check(&s, &[(0, 1.0), (5, 0.5), (9, 0.1), (10, 0.0), (11, 0.0)]);
    assert_non_increasing(&s, 0, 12);
    // A single outlier is removed by a median filter of width 3.
    let mut spiky = vec![2.0; 11];
    spiky[4] = 100.0;
    let smoothed = Schedule::refined(&spiky, 3, RefineFor::Adam).unwrap();
    check(&smoothed, &[(0, 1.0), (4, 0.6), (5, 0.5), (10, 0.0)]);
}

#[test]
fn refined_weights_for_sgd_and_adam() {
    // G = [1, 1, 2, 2], no smoothing.
    // SGD: w = [1, 1, 1/4, 1/4]; f = [1 * 1.5, 1 * 0.5, 1/4 * 1/4, 0] / 1.5 = [1, 1/3, 1/24, 0].
    let g = [1.0, 1.0, 2.0, 2.0];
    check(
        &Schedule::refined(&g, 1, RefineFor::Sgd).unwrap(),
        &[(0, 1.0), (1, 1.0 / 3.0), (2, 1.0 / 24.0), (3, 0.0)],
    );
    // Adam: w = [1, 1, 1/2, 1/2]; f = [2, 1, 1/4, 0] / 2.
    check(
        &Schedule::refined(&g, 1, RefineFor::Adam).unwrap(),
        &[(0, 1.0), (1, 0.5), (2, 0.125), (3, 0.0)],
    );
}

#[test]
fn rewarm_restarts_at_the_offset() {
    // inner: warmup 2, linear to 0 at 10; restarted at 10.
    let s = Schedule::Rewarm {
        inner: Box::new(Schedule::Linear {
            warmup: 2,
            total: 10,
        }),
        offset: 10,
    };
    check(
        &s,
        &[
            (0, 0.0),
            (2, 1.0),
            (6, 0.5),
            (9, 0.125),
            (10, 0.0),
            (11, 0.5),
            (12, 1.0),
            (16, 0.5),
            (20, 0.0),
        ],
    );
    assert_eq!(s.total_steps(), Some(20));
}

#[test]
fn sequential_phases_see_local_steps() {
    let s = Schedule::Sequential {
        phases: vec![
            (Schedule::Constant { warmup: 5 }, 5),
            (
                Schedule::Linear {
                    warmup: 0,
                    total: 10,
                },
                10,
            ),
        ],
    };
    // Phase 1: k / 5; phase 2 at local step k - 5: (10 - (k - 5)) / 10, continuing past its end.
    check(
        &s,
        &[
            (0, 0.0),
            (4, 0.8),
            (5, 1.0),
            (10, 0.5),
            (14, 0.1),
            (15, 0.0),
            (30, 0.0),
        ],
    );
    assert_eq!(s.total_steps(), Some(15));
}

#[test]
fn lr_table_is_lr_times_multiplier() {
    let s = Schedule::Linear {
        warmup: 2,
        total: 4,
    };
    assert_eq!(s.lr_table(0.5, 5), vec![0.0, 0.25, 0.5, 0.25, 0.0]);
}

/// The public schedule constructors return errors instead of asserting, and a schedule built by
/// hand without phases does not panic.
#[test]
fn schedule_constructors_refuse_bad_input_without_panicking() {
    let e = Schedule::wsd(60, 50, 100, 0.0, Shape::Linear).unwrap_err();
    assert!(e.contains("exceed the total 100"), "{e}");
    assert!(Schedule::wsd(usize::MAX, 1, 100, 0.0, Shape::Linear).is_err());
    assert!(Schedule::refined(&[1.0], 1, RefineFor::Sgd).is_err());
    assert!(Schedule::refined(&[1.0, 2.0], 0, RefineFor::Sgd).is_err());
    let e = Schedule::refined(&[1.0, f64::NAN], 1, RefineFor::Adam).unwrap_err();
    assert!(e.contains("gradient norm 1 is NaN"), "{e}");
    let empty = Schedule::Sequential { phases: vec![] };
    assert_eq!(empty.multiplier(3), 1.0);
    assert_eq!(empty.total_steps(), None);
}
