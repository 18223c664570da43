//! CubeCL block-sparse flash attention (to be written: issue 6).

use super::{Attention, AttnGrads, AttnOutput, AttnSpec};
use crate::cube::CubeContext;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub(super) fn forward(
    _ctx: &CubeContext,
    _spec: &AttnSpec,
    _args: &Attention,
) -> Result<AttnOutput> {
    Err(Error::Unsupported(
        "attention on the cube backend is not implemented yet".into(),
    ))
}

pub(super) fn backward(
    _ctx: &CubeContext,
    _spec: &AttnSpec,
    _args: &Attention,
    _d_o: &Tensor,
) -> Result<AttnGrads> {
    Err(Error::Unsupported(
        "attention on the cube backend is not implemented yet".into(),
    ))
}
