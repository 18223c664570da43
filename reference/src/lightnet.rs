//! LightNet's additive recurrence (ops.md section 2) as a gate transform onto the engine, its
//! non-causal form, and MD-LRPE.

use crate::linear::{Dims, Form};

/// Recurrent state of causal LightNet: the engine state and the running log-normaliser.
#[derive(Clone, Debug, PartialEq)]
pub struct LightNetState {
    /// `[N, H, K, V]`.
    pub s: Vec<f64>,
    /// `z = logcumsumexp(k)` at the last token, `[N, H, K]`.
    pub z: Vec<f64>,
}

/// The additive transform of the key logits: `khat = exp(k - z)`, `g_t = z_{t-1} - z_t`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdditiveGate {
    /// `[B, T, H, K]`.
    pub khat: Vec<f64>,
    /// `[B, T, H, K]`, all `<= 0`. At the first token of a sequence without an initial `z`, 0.
    pub g: Vec<f64>,
    /// `z` at the last token of each sequence, `[N, H, K]` (`-inf` for an empty sequence without `z0`).
    pub z_final: Vec<f64>,
}

/// One LightNet problem. `k` holds the key logits (also the decay logits).
#[derive(Clone, Copy, Debug)]
pub struct LightNetProblem<'a> {
    pub dims: Dims,
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub scale: f64,
    /// `false`: causal (additive recurrence); `true`: the non-causal form (softmax over the whole sequence).
    pub bidirectional: bool,
    /// Initial state (causal only).
    pub initial_state: Option<&'a LightNetState>,
    pub cu_seqlens: Option<&'a [usize]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LightNetOutput {
    pub o: Vec<f64>,
    /// Final `(S, z)` (causal only).
    pub state: Option<LightNetState>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LightNetGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

pub fn additive_gate(
    dims: &Dims,
    k: &[f64],
    cu_seqlens: Option<&[usize]>,
    z0: Option<&[f64]>,
) -> AdditiveGate {
    let _ = (dims, k, cu_seqlens, z0);
    todo!("lightnet additive gate")
}

pub fn forward(p: &LightNetProblem, form: Form) -> LightNetOutput {
    let _ = (p, form);
    todo!("lightnet forward")
}

pub fn backward(p: &LightNetProblem, form: Form, d_o: &[f64]) -> LightNetGrads {
    let _ = (p, form, d_o);
    todo!("lightnet backward")
}
