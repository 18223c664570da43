//! One token of generation: the decoding step of the causal engine, `S <- diag(exp g) S + k^T v`,
//! `o = scale q S`, on the tensors' device (no graph recorded; the state stays where it is).

use candle_core::Tensor as CTensor;
use linattn::Result;
use linattn::linear::Form;

use crate::linear::{Gate, LinearAttention};

/// The decoding step: `state [B, H, K, V]`, `q, k [B, 1, H, K]`, `v [B, 1, H, V]`, the token's
/// gate (`[H]`, `[B, 1, H]` or `[B, 1, H, K]`); `scale` defaults to `K^-0.5`. Returns `o [B, 1,
/// H, V]` in the inputs' dtype and the new state (f32), both detached.
///
/// It is the engine's recurrent form on one token with the state as `h0` and the final state as
/// the new state: on CUDA the same kernels as [`linattn::linear::cuda::device::decode_step`].
pub fn decode_step(
    state: &CTensor,
    q: &CTensor,
    k: &CTensor,
    v: &CTensor,
    gate: Gate,
    scale: Option<f64>,
) -> Result<(CTensor, CTensor)> {
    let t = q.dims().get(1).copied();
    if t != Some(1) {
        return Err(linattn::Error::ShapeMismatch {
            tensor: "q".into(),
            expected: "[B, 1, H, K] (one token)".into(),
            actual: q.dims().to_vec(),
        });
    }
    let mut p = LinearAttention::causal(&q.detach(), &k.detach(), &v.detach())
        .with_gate(match gate {
            Gate::None => Gate::None,
            Gate::PerHead(g) => Gate::PerHead(g.detach()),
            Gate::Scalar(g) => Gate::Scalar(g.detach()),
            Gate::Vector(g) => Gate::Vector(g.detach()),
        })
        .with_h0(&state.detach())
        .with_form(Form::Recurrent);
    if let Some(s) = scale {
        p = p.with_scale(s);
    }
    let out = p.forward()?;
    let new_state = out.ht.ok_or_else(|| {
        linattn::Error::InvalidArgument("a causal step without normalisation has a state".into())
    })?;
    Ok((out.o, new_state))
}
