//! AdamW, Lion, the decay modes, clipping, the non-finite skip and EMA against values worked out
//! by hand from optim.md's formulas.

use linattn_reference::optim::step::{
    DecayMode, Method, StepConfig, TensorState, adamw_update, bias_corrections, clip_coefficient,
    decay_factor, fused_step, lion_update,
};

fn close(actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= 1e-15 * expected.abs().max(1.0),
        "got {actual:.17}, expected {expected:.17}"
    );
}

#[test]
fn bias_corrections_from_integer_steps() {
    let (c1, c2) = bias_corrections(0.9, 0.999, 1);
    close(c1, 0.1);
    close(c2, 0.001);
    let (c1, c2) = bias_corrections(0.9, 0.999, 2);
    close(c1, 0.19);
    close(c2, 0.001_999);
    // Far past 2^24 the integer step still counts exactly: 0.999^(2^25) underflows to 0.
    let (_, c2) = bias_corrections(0.9, 0.999, 1 << 25);
    assert_eq!(c2, 1.0);
}

#[test]
fn adamw_first_two_steps_by_hand() {
    // theta = 1, lr 0.1, wd 0.01, betas (0.9, 0.999), eps 1e-8.
    let mut p = [1.0];
    let mut m = [0.0];
    let mut v = [0.0];
    let hyper = (0.9, 0.999, 1e-8);
    // Step 1, g = 0.5: m = 0.05, v = 0.00025, m_hat = 0.5, sqrt(v_hat) = 0.5,
    // theta = 1 * (1 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8).
    adamw_update(
        &mut p,
        &[0.5],
        &mut m,
        &mut v,
        1,
        0.1,
        0.1 * 0.01,
        hyper,
        false,
    );
    close(m[0], 0.05);
    close(v[0], 0.000_25);
    close(p[0], 0.999 - 0.05 / 0.500_000_01);
    close(p[0], 0.899_000_002);
    // Step 2, g = -0.25: m = 0.9 * 0.05 + 0.1 * -0.25 = 0.02,
    // v = 0.999 * 0.00025 + 0.001 * 0.0625 = 0.00031225, bc1 = 0.19, bc2 = 0.001999,
    // theta = theta_1 * 0.999 - (0.1 / 0.19) * 0.02 / (sqrt(0.00031225) / sqrt(0.001999) + 1e-8).
    let theta1 = p[0];
    adamw_update(
        &mut p,
        &[-0.25],
        &mut m,
        &mut v,
        2,
        0.1,
        0.1 * 0.01,
        hyper,
        false,
    );
    close(m[0], 0.02);
    close(v[0], 0.000_312_25);
    let denom = 0.000_312_25f64.sqrt() / 0.001_999f64.sqrt() + 1e-8;
    close(p[0], theta1 * 0.999 - (0.1 / 0.19) * 0.02 / denom);
    // sqrt(0.00031225 / 0.001999) = 0.39522..., so the step is about 0.02663.
    assert!((p[0] - (0.898_101 - 0.026_633)).abs() < 1e-5, "{}", p[0]);
}

#[test]
fn adamw_cautious_decay_masks_disagreeing_signs() {
    // theta = -1 with g = 0.5 (update direction +): decay would pull theta toward 0, i.e. along
    // +; u * theta < 0 so CWD skips the decay.
    let hyper = (0.9, 0.999, 0.0);
    let run = |cautious| {
        let (mut p, mut m, mut v) = ([-1.0, 1.0], [0.0; 2], [0.0; 2]);
        adamw_update(
            &mut p,
            &[0.5, 0.5],
            &mut m,
            &mut v,
            1,
            0.1,
            0.5,
            hyper,
            cautious,
        );
        p
    };
    let plain = run(false);
    let cautious = run(true);
    // First step: the update is lr * sign(g) = 0.1 exactly (eps = 0).
    close(plain[0], -0.5 - 0.1); // theta (1 - 0.5) - 0.1
    close(cautious[0], -1.0 - 0.1);
    close(plain[1], 0.5 - 0.1);
    close(cautious[1], 0.5 - 0.1);
}

#[test]
fn lion_by_hand() {
    // theta = [1, -1], m = 0, g = 0.5, lr 0.1, decay factor lr * wd = 0.01.
    let run = |cautious| {
        let mut p = [1.0, -1.0];
        let mut m = [0.0, 0.0];
        lion_update(
            &mut p,
            &[0.5, 0.5],
            &mut m,
            0.1,
            0.01,
            (0.9, 0.99),
            cautious,
        );
        (p, m)
    };
    let (p, m) = run(false);
    // c = 0.05 > 0: theta = theta * 0.99 - 0.1; m = 0.01 * 0.5.
    close(p[0], 0.89);
    close(p[1], -1.09);
    close(m[0], 0.005);
    let (p, _) = run(true);
    close(p[0], 0.89);
    close(p[1], -1.1);
    // sign(0) = 0: a zero gradient with zero momentum leaves theta to the decay alone.
    let mut p = [2.0];
    lion_update(&mut p, &[0.0], &mut [0.0], 0.1, 0.01, (0.9, 0.99), false);
    close(p[0], 1.98);
}

#[test]
fn decay_modes() {
    close(decay_factor(DecayMode::Decoupled, 0.01, 0.1, 0.1), 0.001);
    close(
        decay_factor(DecayMode::FullyDecoupled, 0.01, 0.1, 0.1),
        0.01,
    );
}

fn two_tensors(method: &Method, ema: bool) -> Vec<TensorState> {
    vec![
        TensorState::new(vec![1.0, -2.0, 0.5], method, ema, true),
        TensorState::new(vec![], method, ema, true),
        TensorState::new(vec![3.0], method, ema, false),
    ]
}

#[test]
fn fused_step_skips_everything_on_a_non_finite_gradient() {
    let config = StepConfig {
        weight_decay: 0.1,
        ..StepConfig::new(Method::adamw())
    };
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut states = two_tensors(&config.method, true);
        let before = states.clone();
        let mut t = 7;
        let outcome = fused_step(
            &config,
            0.1,
            0.1,
            &mut t,
            &mut states,
            &[&[0.1, 0.2, 0.3], &[], &[bad]],
        );
        assert!(outcome.skipped);
        assert_eq!(t, 7);
        assert_eq!(states, before);
    }
}

#[test]
fn fused_step_clips_by_the_global_norm() {
    // g = [3, 0, 0] and [4]: norm 5, max 1 -> coef 1 / (5 + 1e-6).
    let config = StepConfig {
        max_grad_norm: Some(1.0),
        ..StepConfig::new(Method::Lion {
            beta1: 0.0,
            beta2: 0.5,
        })
    };
    let mut states = two_tensors(&config.method, false);
    let mut t = 0;
    let outcome = fused_step(
        &config,
        0.1,
        0.1,
        &mut t,
        &mut states,
        &[&[3.0, 0.0, 0.0], &[], &[4.0]],
    );
    assert!(!outcome.skipped);
    assert_eq!(t, 1);
    close(outcome.grad_norm, 5.0);
    close(outcome.clip_coef, 1.0 / (5.0 + 1e-6));
    close(clip_coefficient(0.5, 1.0), 1.0);
    // Lion momentum m = 0.5 * coef * g.
    close(states[0].exp_avg[0], 0.5 * 3.0 / (5.0 + 1e-6));
    close(states[2].exp_avg[0], 0.5 * 4.0 / (5.0 + 1e-6));
    // beta1 = 0: c = coef g, theta -= lr sign(g).
    close(states[0].param[0], 0.9);
    close(states[0].param[1], -2.0);
}

#[test]
fn fused_step_decays_only_flagged_tensors_and_tracks_ema() {
    let config = StepConfig {
        weight_decay: 0.5,
        ema_beta: Some(0.75),
        ..StepConfig::new(Method::Lion {
            beta1: 0.9,
            beta2: 0.99,
        })
    };
    let mut states = two_tensors(&config.method, true);
    let mut t = 0;
    fused_step(
        &config,
        0.1,
        0.1,
        &mut t,
        &mut states,
        &[&[1.0, 1.0, 0.0], &[], &[1.0]],
    );
    // Decayed tensor: theta * (1 - 0.05) - 0.1 sign(g).
    close(states[0].param[0], 0.95 - 0.1);
    close(states[0].param[1], -1.9 - 0.1);
    close(states[0].param[2], 0.475);
    // Undecayed tensor: 3 - 0.1.
    close(states[2].param[0], 2.9);
    // EMA from the initial weights: e + 0.25 (theta - e).
    let ema = states[2].ema.as_ref().unwrap();
    close(ema[0], 3.0 + 0.25 * (2.9 - 3.0));
}
