//! One-token decoding for generation over burn tensors: the state stays on the tensors' device
//! from token to token. No autograd (the outputs are constants).

use burn::backend::Dispatch;
use burn::tensor::Tensor;
use linattn::linear::GateKind;
use linattn::{Error, Result, TensorMeta};

use crate::backend::LinattnBackend;
use crate::config::DecodeConfig;
use crate::linear::{Gate, meta, same_device};

/// `state <- diag(exp g) state + k^T v`, `o = scale q state`, for one token: `state:
/// [B, H, K, V]`, `q, k: [B, 1, H, K]`, `v: [B, 1, H, V]`, the gate for that token (`[H]`,
/// `[B, 1, H]` or `[B, 1, H, K]`, or none), `scale` `K^-0.5` by default. Returns
/// `(o [B, 1, H, V], new state)`, the state in its input's dtype.
pub fn decode_step(
    state: Tensor<4>,
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    gate: Gate,
    scale: Option<f64>,
) -> Result<(Tensor<4>, Tensor<4>)> {
    same_device(&[
        ("state", Some(state.device())),
        ("q", Some(q.device())),
        ("k", Some(k.device())),
        ("v", Some(v.device())),
        ("g", gate.device()),
    ])?;
    let (qm, km, vm) = (meta("q", &q)?, meta("k", &k)?, meta("v", &v)?);
    let sm = meta("state", &state)?;
    let qs = qm.shape.clone();
    if qs.len() != 4 || qs[1] != 1 {
        return Err(Error::shape("q", "[B, 1, H, K] (one token)", &qs));
    }
    let (b, h, kd) = (qs[0], qs[2], qs[3]);
    let vd = vm.shape.last().copied().unwrap_or(0);
    let expect = |name: &str, m: &TensorMeta, want: &[usize]| {
        if m.shape != want {
            return Err(Error::shape(name, format!("{want:?}"), &m.shape));
        }
        Ok(())
    };
    expect("k", &km, &[b, 1, h, kd])?;
    expect("v", &vm, &[b, 1, h, vd])?;
    expect("state", &sm, &[b, h, kd, vd])?;
    if let Some(g) = gate.meta()? {
        let want: Vec<usize> = match gate.kind() {
            GateKind::PerHead => vec![h],
            GateKind::Scalar => vec![b, 1, h],
            _ => vec![b, 1, h, kd],
        };
        expect("g", &g, &want)?;
    }
    crate::linear::check_dtype_and_form(qm.dtype, linattn::linear::Form::Recurrent)?;
    crate::linear::check_device_dtype("q", &q)?;
    crate::linear::check_device_dtype("state", &state)?;
    let scale = scale.unwrap_or((kd as f64).powf(-0.5));
    if !scale.is_finite() || scale == 0.0 {
        return Err(Error::InvalidArgument(format!(
            "scale must be finite and nonzero, got {scale}"
        )));
    }
    let config = DecodeConfig {
        o_shape: vec![b, 1, h, vd],
        gate: gate.kind(),
        scale,
    };
    let device = q.device();
    let g = gate.input().unwrap_or_else(|| {
        Tensor::<1>::zeros([1], &device)
            .cast(q.dtype())
            .into_dispatch()
    });
    let (o, state) = Dispatch::linattn_decode_step(
        state.into_dispatch(),
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        g,
        config,
    );
    Ok((Tensor::from_dispatch(o), Tensor::from_dispatch(state)))
}
