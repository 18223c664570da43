//! Hand-written CUDA kernels of the engine (to be written: issue 5).

use super::{Form, Grads, LinearAttention, Output, Spec};
use crate::cuda::CudaContext;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub(super) fn forward(
    _ctx: &CudaContext,
    _spec: &Spec,
    _args: &LinearAttention,
    _form: Form,
) -> Result<Output> {
    Err(Error::Unsupported(
        "linear attention on the cuda backend is not implemented yet".into(),
    ))
}

pub(super) fn backward(
    _ctx: &CudaContext,
    _spec: &Spec,
    _args: &LinearAttention,
    _form: Form,
    _d_o: &Tensor,
    _d_ht: Option<&Tensor>,
) -> Result<Grads> {
    Err(Error::Unsupported(
        "linear attention on the cuda backend is not implemented yet".into(),
    ))
}
