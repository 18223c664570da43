//! Hand-written CUDA block-sparse flash attention (to be written: issue 6).

use super::{Attention, AttnGrads, AttnOutput, AttnSpec};
use crate::cuda::CudaContext;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub(super) fn forward(
    _ctx: &CudaContext,
    _spec: &AttnSpec,
    _args: &Attention,
) -> Result<AttnOutput> {
    Err(Error::Unsupported(
        "attention on the cuda backend is not implemented yet".into(),
    ))
}

pub(super) fn backward(
    _ctx: &CudaContext,
    _spec: &AttnSpec,
    _args: &Attention,
    _d_o: &Tensor,
) -> Result<AttnGrads> {
    Err(Error::Unsupported(
        "attention on the cuda backend is not implemented yet".into(),
    ))
}
