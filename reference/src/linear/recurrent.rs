//! Recurrent form: the scans of ops.md section 1, O(L K W) per head, and back-propagation through
//! time for the gradients.
//!
//! Causal: `S_t = diag(exp g_t) S_{t-1} + k_t^T v_t` (`S_{-1} = h0` or 0), `o_t = scale q_t S_t`,
//! `ht = S_{L-1}`. The decay of step `t` is applied before `k_t^T v_t` is added, also at `t = 0`
//! (where it decays `h0`).
//!
//! Bidirectional (LION Theorem 3.1): forward scan `S^F` as above without `h0`, backward scan
//! `S^B_t = diag(exp gb_{t+1}) S^B_{t+1} + k_t^T v_t` (`S^B_{L-1} = k_{L-1}^T v_{L-1}`), and
//! `o_t = scale q_t (S^F_t + S^B_t - k_t^T v_t)`: both scans contain token `t` itself, so its
//! diagonal term is subtracted once. `gb_0` is never read.
//!
//! Normalisation goes through [`super::normalized_forward`]: the scans run on `[v | 1]`, whose last
//! column is the `z` (key-sum) scan of LION.

use super::{
    Direction, HeadGrads, HeadOutput, HeadProblem, add_outer, dot, mat_times_col,
    normalized_backward, normalized_forward, row, row_mut, row_times_mat,
};

/// Forward pass of the recurrent form on one (sequence, head).
pub fn forward(hp: &HeadProblem) -> HeadOutput {
    match hp.normalize {
        Some(eps) => normalized_forward(hp, eps, forward_unnormalized),
        None => forward_unnormalized(hp),
    }
}

/// Backward pass (BPTT) of the recurrent form on one (sequence, head).
pub fn backward(hp: &HeadProblem, d_o: &[f64], d_ht: Option<&[f64]>) -> HeadGrads {
    match hp.normalize {
        Some(eps) => {
            assert!(d_ht.is_none(), "normalised problems have no final state");
            normalized_backward(hp, eps, d_o, forward_unnormalized, |aug, du| {
                backward_unnormalized(aug, du, None)
            })
        }
        None => backward_unnormalized(hp, d_o, d_ht),
    }
}

/// Every state of the causal scan: element `t + 1` is `S_t` (`[K, W]`), element 0 is `S_{-1}`
/// (`h0` or zero). Stored so that BPTT can read `S_{t-1}` without inverting a decay.
pub fn causal_scan_states(hp: &HeadProblem) -> Vec<Vec<f64>> {
    let (kd, w) = (hp.key_dim, hp.value_dim);
    let mut s = hp.h0.clone().unwrap_or_else(|| vec![0.0; kd * w]);
    let mut states = Vec::with_capacity(hp.len + 1);
    states.push(s.clone());
    for t in 0..hp.len {
        let g = row(&hp.g, t, kd);
        for c in 0..kd {
            let decay = g[c].exp();
            for x in row_mut(&mut s, c, w) {
                *x *= decay;
            }
        }
        add_outer(&mut s, 1.0, row(&hp.k, t, kd), row(&hp.v, t, w));
        states.push(s.clone());
    }
    states
}

/// Every state of the backward (anti-causal) scan: element `t` is `S^B_t` (`[K, W]`).
pub fn anticausal_scan_states(hp: &HeadProblem) -> Vec<Vec<f64>> {
    let (kd, w) = (hp.key_dim, hp.value_dim);
    let mut states = vec![Vec::new(); hp.len];
    let mut s = vec![0.0; kd * w];
    for t in (0..hp.len).rev() {
        // S^B_t = diag(exp gb_{t+1}) S^B_{t+1} + k_t^T v_t; nothing to decay at t = L - 1.
        if t + 1 < hp.len {
            let gb = row(&hp.gb, t + 1, kd);
            for c in 0..kd {
                let decay = gb[c].exp();
                for x in row_mut(&mut s, c, w) {
                    *x *= decay;
                }
            }
        }
        add_outer(&mut s, 1.0, row(&hp.k, t, kd), row(&hp.v, t, w));
        states[t] = s.clone();
    }
    states
}

fn forward_unnormalized(hp: &HeadProblem) -> HeadOutput {
    let (kd, w, scale) = (hp.key_dim, hp.value_dim, hp.scale);
    let mut o = vec![0.0; hp.len * w];
    let forward_states = causal_scan_states(hp);
    for t in 0..hp.len {
        row_times_mat(
            row_mut(&mut o, t, w),
            scale,
            row(&hp.q, t, kd),
            &forward_states[t + 1],
        );
    }
    match hp.direction {
        Direction::Causal => HeadOutput {
            o,
            ht: hp.has_final_state().then(|| forward_states[hp.len].clone()),
        },
        Direction::Bidirectional => {
            let backward_states = anticausal_scan_states(hp);
            for t in 0..hp.len {
                let (q, k, v) = (row(&hp.q, t, kd), row(&hp.k, t, kd), row(&hp.v, t, w));
                let o_row = row_mut(&mut o, t, w);
                row_times_mat(o_row, scale, q, &backward_states[t]);
                // The diagonal is in both scans; count it once.
                let qk = scale * dot(q, k);
                for (ov, vv) in o_row.iter_mut().zip(v) {
                    *ov -= qk * vv;
                }
            }
            HeadOutput { o, ht: None }
        }
    }
}

fn backward_unnormalized(hp: &HeadProblem, d_o: &[f64], d_ht: Option<&[f64]>) -> HeadGrads {
    let (kd, w, scale) = (hp.key_dim, hp.value_dim, hp.scale);
    let mut grads = hp.zero_grads();
    let forward_states = causal_scan_states(hp);

    // Reverse sweep through the causal scan. `ds` is dL/dS_t once token t's output has been
    // added; before that it is the gradient arriving from S_{t+1} (or from ht at t = L - 1).
    let mut ds = match d_ht {
        Some(d) if hp.has_final_state() => d.to_vec(),
        Some(_) => panic!("d_ht given for a problem without a final state"),
        None => vec![0.0; kd * w],
    };
    for t in (0..hp.len).rev() {
        let (q, k, v, g) = (
            row(&hp.q, t, kd),
            row(&hp.k, t, kd),
            row(&hp.v, t, w),
            row(&hp.g, t, kd),
        );
        let d_o_t = row(d_o, t, w);
        add_outer(&mut ds, scale, q, d_o_t);
        // o_t = scale q_t S_t
        mat_times_col(
            row_mut(&mut grads.dq, t, kd),
            scale,
            &forward_states[t + 1],
            d_o_t,
        );
        // S_t = diag(a_t) S_{t-1} + k_t^T v_t, a_t = exp(g_t)
        mat_times_col(row_mut(&mut grads.dk, t, kd), 1.0, &ds, v);
        row_times_mat(row_mut(&mut grads.dv, t, w), 1.0, k, &ds);
        let prev = &forward_states[t];
        let dg = row_mut(&mut grads.dg, t, kd);
        for c in 0..kd {
            let decay = g[c].exp();
            // dL/dg_tc = sum_w dS_t[c,w] * a_tc * S_{t-1}[c,w]
            dg[c] = decay * dot(row(&ds, c, w), row(prev, c, w));
            for x in row_mut(&mut ds, c, w) {
                *x *= decay;
            }
        }
    }
    // ds is now dL/dS_{-1}.
    if let Some(dh0) = grads.dh0.as_mut() {
        dh0.copy_from_slice(&ds);
    }

    if hp.direction == Direction::Bidirectional {
        let backward_states = anticausal_scan_states(hp);
        // The subtracted diagonal term -scale (q_t . k_t) v_t.
        for t in 0..hp.len {
            let (q, k, v) = (row(&hp.q, t, kd), row(&hp.k, t, kd), row(&hp.v, t, w));
            let d_o_t = row(d_o, t, w);
            let do_v = dot(d_o_t, v);
            let qk = dot(q, k);
            for c in 0..kd {
                grads.dq[t * kd + c] -= scale * do_v * k[c];
                grads.dk[t * kd + c] -= scale * do_v * q[c];
            }
            for (dv, d) in row_mut(&mut grads.dv, t, w).iter_mut().zip(d_o_t) {
                *dv -= scale * qk * d;
            }
        }
        // Sweep through the backward scan in its reverse order, i.e. forward in t. `ds` is
        // dL/dS^B_t; S^B_t feeds S^B_{t-1} through diag(exp gb_t).
        let mut ds = vec![0.0; kd * w];
        for t in 0..hp.len {
            if t > 0 {
                // ds holds dL/dS^B_{t-1}; S^B_{t-1} = diag(exp gb_t) S^B_t + k_{t-1}^T v_{t-1}.
                let gb = row(&hp.gb, t, kd);
                let dgb = row_mut(&mut grads.dgb, t, kd);
                for c in 0..kd {
                    let decay = gb[c].exp();
                    dgb[c] = decay * dot(row(&ds, c, w), row(&backward_states[t], c, w));
                    for x in row_mut(&mut ds, c, w) {
                        *x *= decay;
                    }
                }
            }
            let (q, k, v) = (row(&hp.q, t, kd), row(&hp.k, t, kd), row(&hp.v, t, w));
            let d_o_t = row(d_o, t, w);
            add_outer(&mut ds, scale, q, d_o_t);
            mat_times_col(
                row_mut(&mut grads.dq, t, kd),
                scale,
                &backward_states[t],
                d_o_t,
            );
            mat_times_col(row_mut(&mut grads.dk, t, kd), 1.0, &ds, v);
            row_times_mat(row_mut(&mut grads.dv, t, w), 1.0, k, &ds);
        }
    }
    grads
}
