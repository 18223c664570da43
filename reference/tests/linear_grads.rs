//! Every analytic gradient of every form agrees with central finite differences of
//! `loss = sum(o * d_o) + sum(ht * d_ht)`: q, k, v, the gate of each kind, gate_bwd, h0, with and
//! without normalisation, causal and bidirectional, fixed length and varlen.

mod linear_common;

use linattn_reference::linear::{Dims, Direction, Form, Grads};
use linattn_reference::testing::GATE_STRENGTHS;
use linattn_reference::{max_abs_diff, rel_rms};
use linear_common::{ALL_KINDS, Case, Spec};

/// Central-difference step. Truncation error ~ h^2 |f'''| ~ 1e-12; rounding error
/// ~ 1e-16 |loss| / h ~ 1e-9 for these O(10) losses.
const H: f64 = 1e-6;
/// Relative RMS tolerance against the finite differences.
const TOL: f64 = 1e-6;
/// A gradient this small in absolute terms is at the finite differences' rounding floor
/// (1e-16 |loss| / h); below it only the absolute error is meaningful.
const FD_ABS_FLOOR: f64 = 1e-8;

#[derive(Clone, Copy, Debug)]
enum Input {
    Q,
    K,
    V,
    Gate,
    GateBwd,
    H0,
}

fn input_mut(case: &mut Case, input: Input) -> Option<&mut Vec<f64>> {
    match input {
        Input::Q => Some(&mut case.q),
        Input::K => Some(&mut case.k),
        Input::V => Some(&mut case.v),
        Input::Gate => Some(&mut case.g),
        Input::GateBwd => case.gb.as_mut(),
        Input::H0 => case.h0.as_mut(),
    }
}

fn analytic(grads: &Grads, input: Input) -> Option<&Vec<f64>> {
    match input {
        Input::Q => Some(&grads.dq),
        Input::K => Some(&grads.dk),
        Input::V => Some(&grads.dv),
        Input::Gate => grads.dg.as_ref(),
        Input::GateBwd => grads.dg_bwd.as_ref(),
        Input::H0 => grads.dh0.as_ref(),
    }
}

/// Central differences of the loss w.r.t. every element of `input`.
fn finite_differences(case: &Case, input: Input) -> Option<Vec<f64>> {
    let n = input_mut(&mut case.clone(), input)?.len();
    let mut fd = Vec::with_capacity(n);
    for i in 0..n {
        let mut plus = case.clone();
        input_mut(&mut plus, input).unwrap()[i] += H;
        let mut minus = case.clone();
        input_mut(&mut minus, input).unwrap()[i] -= H;
        fd.push((plus.loss(Form::Recurrent) - minus.loss(Form::Recurrent)) / (2.0 * H));
    }
    Some(fd)
}

/// Checks the gradients of every form against finite differences. Returns how many gradient
/// arrays were checked.
#[track_caller]
fn check(what: &str, case: &Case) -> usize {
    let forms = [
        Form::Recurrent,
        Form::Parallel,
        Form::Chunkwise { chunk: 3 },
        Form::Chunkwise { chunk: 64 },
    ];
    let grads: Vec<Grads> = forms.iter().map(|&f| case.backward(f)).collect();
    let mut checked = 0;
    for input in [
        Input::Q,
        Input::K,
        Input::V,
        Input::Gate,
        Input::GateBwd,
        Input::H0,
    ] {
        let fd = finite_differences(case, input);
        for (form, g) in forms.iter().zip(&grads) {
            let an = analytic(g, input);
            // A gradient exists exactly when the input does (no dg for Gate::None).
            match (&fd, an) {
                (Some(fd), Some(an)) if !fd.is_empty() => {
                    let e = rel_rms(an, fd);
                    let abs = max_abs_diff(an, fd);
                    assert!(
                        e <= TOL || abs <= FD_ABS_FLOOR,
                        "{what} {form:?} d{input:?}: rel_rms {e:e}, max abs {abs:e}\n\
                         analytic {an:?}\nfd {fd:?}"
                    );
                    checked += 1;
                }
                (Some(fd), None) => assert!(fd.is_empty(), "{what} {form:?}: d{input:?} missing"),
                (None, Some(_)) => panic!("{what} {form:?}: d{input:?} without the input"),
                _ => {}
            }
        }
    }
    checked
}

fn variants(direction: Direction) -> Vec<(bool, bool, bool)> {
    // (normalize, h0, separate gate_bwd)
    match direction {
        Direction::Causal => vec![
            (false, false, false),
            (false, true, false),
            (true, false, false),
        ],
        Direction::Bidirectional => vec![
            (false, false, false),
            (false, false, true),
            (true, false, false),
            (true, false, true),
        ],
    }
}

#[test]
fn gradients_match_finite_differences() {
    let dims = Dims {
        b: 2,
        t: 7,
        h: 2,
        k: 3,
        v: 2,
    };
    let mut seed = 3000;
    let mut checked = 0;
    for kind in ALL_KINDS {
        for direction in [Direction::Causal, Direction::Bidirectional] {
            for (normalize, h0, separate_gb) in variants(direction) {
                seed += 1;
                let spec = Spec {
                    strength: GATE_STRENGTHS[seed as usize % 3],
                    normalize,
                    h0,
                    separate_gb,
                    ..Spec::new(dims, kind, direction)
                };
                checked += check(&format!("{spec:?}"), &Case::random(seed, &spec));
            }
        }
    }
    // 4 kinds x 7 variants x 4 forms x (q, k, v) at least, plus gates and h0.
    assert!(
        checked > 4 * 7 * 4 * 3,
        "only {checked} gradient arrays checked"
    );
}

/// Varlen (with an empty segment, h0 per segment) and one strong-gate case.
#[test]
fn gradients_match_finite_differences_varlen_and_strong_gates() {
    let cu = vec![0usize, 0, 3, 8];
    let dims = Dims {
        b: 1,
        t: 8,
        h: 2,
        k: 3,
        v: 2,
    };
    let mut seed = 4000;
    for kind in ALL_KINDS {
        for direction in [Direction::Causal, Direction::Bidirectional] {
            for (normalize, h0, separate_gb) in variants(direction) {
                seed += 1;
                let spec = Spec {
                    normalize,
                    h0,
                    separate_gb,
                    cu_seqlens: Some(cu.clone()),
                    ..Spec::new(dims, kind, direction)
                };
                check(&format!("{spec:?}"), &Case::random(seed, &spec));
                let strong = Spec {
                    strength: 0.1,
                    cu_seqlens: None,
                    ..spec.clone()
                };
                check(&format!("{strong:?}"), &Case::random(seed + 100, &strong));
            }
        }
    }
}
