//! The CPU backend: the f64 reference of `linattn-reference`, behind the validated API.

use half::{bf16, f16};
use linattn_reference::optim::rounding;
use linattn_reference::optim::step::{TensorState, fused_step};
use linattn_reference::optim::wsm;

use super::{
    ArenaLayout, CopyFormat, OptimizeOutput, OptimizerConfig, Params, Rounding, Schedule,
    StepRecord,
};
use crate::tensor::{DType, Tensor, TensorData};

pub(super) fn optimize(
    config: &OptimizerConfig,
    schedule: &Schedule,
    params: &Params,
    grads: &[Vec<&Tensor>],
) -> OptimizeOutput {
    let step_config = config.step_config();
    let mut states: Vec<TensorState> = params
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            TensorState::new(
                t.to_f64_vec(),
                &config.method,
                config.ema_beta.is_some(),
                params.decays(i),
            )
        })
        .collect();
    let initial: Vec<Vec<f32>> = params.tensors.iter().map(|t| t.to_f32_vec()).collect();
    let mut t = 0u64;
    let mut history = Vec::with_capacity(grads.len());
    let mut last_applied = None;
    for (call, step) in grads.iter().enumerate() {
        let lr = config.lr * schedule.multiplier(call);
        let owned: Vec<Vec<f64>> = step.iter().map(|g| g.to_f64_vec()).collect();
        let borrowed: Vec<&[f64]> = owned.iter().map(Vec::as_slice).collect();
        let outcome = fused_step(&step_config, lr, config.lr, &mut t, &mut states, &borrowed);
        if !outcome.skipped {
            last_applied = Some(call);
        }
        history.push(StepRecord {
            lr,
            grad_norm: Some(outcome.grad_norm),
            skipped: outcome.skipped,
        });
    }
    let shaped =
        |i: usize, data: Vec<f64>| Tensor::f64_unchecked(params.tensors[i].shape().to_vec(), data);
    let model_copy = config.model_copy.map(|(format, rounding)| {
        let layout =
            ArenaLayout::new(&params.tensors.iter().map(|t| t.numel()).collect::<Vec<_>>());
        states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // Before any applied step the copy is the round-to-nearest image of the initial
                // weights; afterwards the image of the last applied step's weights.
                let (values, key) = match (last_applied, rounding) {
                    (None, _) => (initial[i].clone(), None),
                    (Some(_), Rounding::Nearest) => {
                        (s.param.iter().map(|&x| x as f32).collect(), None)
                    }
                    (Some(call), Rounding::Stochastic { seed }) => (
                        s.param.iter().map(|&x| x as f32).collect(),
                        Some(rounding::call_key(seed, call as u32)),
                    ),
                };
                copy_tensor(
                    params.tensors[i].shape().to_vec(),
                    &values,
                    format,
                    key,
                    layout.offsets[i],
                )
            })
            .collect()
    });
    OptimizeOutput {
        exp_avg: states
            .iter()
            .enumerate()
            .map(|(i, s)| shaped(i, s.exp_avg.clone()))
            .collect(),
        exp_avg_sq: config.method.has_second_moment().then(|| {
            states
                .iter()
                .enumerate()
                .map(|(i, s)| shaped(i, s.exp_avg_sq.clone()))
                .collect()
        }),
        ema: config.ema_beta.map(|_| {
            states
                .iter()
                .enumerate()
                .map(|(i, s)| shaped(i, s.ema.clone().expect("EMA enabled")))
                .collect()
        }),
        params: states
            .into_iter()
            .enumerate()
            .map(|(i, s)| shaped(i, s.param))
            .collect(),
        model_copy,
        history,
        steps: t,
    }
}

/// The 16-bit image of `values` (element `j` at arena position `offset + j`, which feeds the
/// stochastic-rounding hash under `key`).
pub(crate) fn copy_tensor(
    shape: Vec<usize>,
    values: &[f32],
    format: CopyFormat,
    key: Option<u32>,
    offset: u64,
) -> Tensor {
    let bits = |j: usize, x: f32| -> u16 {
        let random = key.map(|k| rounding::element_bits(k, (offset + j as u64) as u32));
        match (format, random) {
            (CopyFormat::Bf16, None) => rounding::bf16_nearest(x),
            (CopyFormat::Bf16, Some(r)) => rounding::bf16_stochastic(x, r),
            (CopyFormat::F16, None) => rounding::f16_nearest(x),
            (CopyFormat::F16, Some(r)) => rounding::f16_stochastic(x, r),
        }
    };
    let data = match format {
        CopyFormat::Bf16 => TensorData::BF16(
            values
                .iter()
                .enumerate()
                .map(|(j, &x)| bf16::from_bits(bits(j, x)))
                .collect(),
        ),
        CopyFormat::F16 => TensorData::F16(
            values
                .iter()
                .enumerate()
                .map(|(j, &x)| f16::from_bits(bits(j, x)))
                .collect(),
        ),
    };
    Tensor::new(shape, data).expect("shape matches the values")
}

pub(super) fn merge(
    checkpoints: &[Vec<&Tensor>],
    coefficients: &[f64],
    dtype: DType,
) -> Vec<Tensor> {
    (0..checkpoints[0].len())
        .map(|i| {
            let values: Vec<Vec<f64>> = checkpoints.iter().map(|c| c[i].to_f64_vec()).collect();
            let slices: Vec<&[f64]> = values.iter().map(Vec::as_slice).collect();
            Tensor::f64_unchecked(
                checkpoints[0][i].shape().to_vec(),
                wsm::merge(&slices, coefficients),
            )
            .to_dtype(dtype)
        })
        .collect()
}
