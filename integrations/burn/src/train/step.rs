//! The training step: forward (a burn module on linattn's ops), loss, backward, and linattn's
//! fused optimizer call (global-norm clipping, the non-finite skip, the scheduled learning rate
//! and weight decay) in one call, with EMA of the weights and WSM merging of kept checkpoints as
//! options of the same object.

use std::collections::VecDeque;

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use linattn::optim::{OptimizerConfig, Schedule, Shape};
use linattn::{Error, Result};

use super::tasks::{Batch, IGNORE};
use crate::optim::{FusedOptimizer, merge_checkpoints};

/// What one [`TrainStep::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The loss of this step's forward pass (before the update).
    pub loss: f64,
    /// Accuracy on the scored positions, when the loss function reports one.
    pub accuracy: Option<f64>,
    /// The learning rate the update used (scheduled).
    pub lr: f64,
    /// The global l2 norm of the raw gradients.
    pub grad_norm: f64,
    /// A gradient held NaN or an infinity: nothing was updated.
    pub skipped: bool,
}

/// The loss and (optionally) accuracy a model's forward pass gives on a batch.
pub struct LossOutput {
    /// A scalar `[1]`, differentiable.
    pub loss: Tensor<1>,
    /// A scalar `[1]`, not differentiated.
    pub accuracy: Option<Tensor<1>>,
}

/// Mean cross-entropy over the scored positions of `targets` (`IGNORE` elsewhere) and the
/// accuracy of the argmax there. `logits: [B, T, C]`.
pub fn masked_cross_entropy(logits: Tensor<3>, batch: &Batch, device: &Device) -> LossOutput {
    let [b, t, _] = logits.dims();
    let scored = batch.scored().max(1) as f64;
    let mask: Vec<f32> = batch
        .targets
        .iter()
        .map(|&x| if x == IGNORE { 0.0 } else { 1.0 })
        .collect();
    let target: Vec<i64> = batch.targets.iter().map(|&x| x.max(0)).collect();
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [b, t]), device);
    let target = Tensor::<2, Int>::from_data(TensorData::new(target, [b, t]), device);
    let logp = log_softmax(logits.clone(), 2);
    let picked: Tensor<2> = logp
        .gather(2, target.clone().reshape([b, t, 1]))
        .reshape([b, t]);
    let loss = (picked * mask.clone()).sum().neg() / scored;
    let predicted: Tensor<2, Int> = logits.detach().argmax(2).reshape([b, t]);
    let correct = predicted.equal(target).float() * mask;
    LossOutput {
        loss,
        accuracy: Some(correct.sum() / scored),
    }
}

/// One fused training step per call; see the module docs.
pub struct TrainStep<M: Module> {
    optimizer: FusedOptimizer,
    wsm: Option<Wsm<M>>,
    steps: usize,
}

struct Wsm<M> {
    every: usize,
    keep: usize,
    shape: Shape,
    kept: VecDeque<M>,
}

impl<M: Module> TrainStep<M> {
    /// A step over every float parameter of `model` with `config` (AdamW or Lion, weight decay
    /// mode, clipping `max_grad_norm`, non-finite skip, EMA `ema_beta`) and `schedule` over
    /// `total` calls.
    pub fn new(
        model: &M,
        config: &OptimizerConfig,
        schedule: &Schedule,
        total: usize,
    ) -> Result<Self> {
        Ok(TrainStep {
            optimizer: FusedOptimizer::new(model, config, schedule, total)?,
            wsm: None,
            steps: 0,
        })
    }

    /// Keeps a checkpoint every `every` steps, the last `keep` of them, for
    /// [`merged`](Self::merged) (WSM with the decay `shape`).
    pub fn with_wsm(mut self, every: usize, keep: usize, shape: Shape) -> Result<Self> {
        if every == 0 || keep == 0 {
            return Err(Error::InvalidArgument(
                "WSM needs a checkpoint interval and a count >= 1".into(),
            ));
        }
        self.wsm = Some(Wsm {
            every,
            keep,
            shape,
            kept: VecDeque::new(),
        });
        Ok(self)
    }

    /// Forward and loss (`loss_fn` on the model), backward, and the fused update. Returns the
    /// updated model and what the step did (reading the loss and the optimizer's record back:
    /// one synchronisation).
    pub fn step(
        &mut self,
        model: M,
        loss_fn: impl FnOnce(&M) -> LossOutput,
    ) -> Result<(M, StepReport)> {
        let out = loss_fn(&model);
        let grads = out.loss.backward();
        let model = self.optimizer.step(model, &grads)?;
        self.steps += 1;
        if let Some(w) = &mut self.wsm
            && self.steps.is_multiple_of(w.every)
        {
            w.kept.push_back(model.clone());
            if w.kept.len() > w.keep {
                w.kept.pop_front();
            }
        }
        let loss = out.loss.into_scalar::<f64>();
        let accuracy = out.accuracy.map(|a| a.into_scalar::<f64>());
        let record = self
            .optimizer
            .last_record()?
            .ok_or_else(|| Error::Runtime {
                backend: "burn".into(),
                message: "the optimizer recorded no call".into(),
            })?;
        Ok((
            model,
            StepReport {
                loss,
                accuracy,
                lr: record.lr,
                grad_norm: record.grad_norm.unwrap_or(f64::NAN),
                skipped: record.skipped,
            },
        ))
    }

    /// Calls so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The WSM merge of the kept checkpoints (`None` without [`with_wsm`](Self::with_wsm) or
    /// before the first kept one).
    pub fn merged(&self) -> Result<Option<M>> {
        match &self.wsm {
            Some(w) if !w.kept.is_empty() => {
                let kept: Vec<M> = w.kept.iter().cloned().collect();
                merge_checkpoints(&kept, w.shape).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// `model` with the EMA of its weights (`None` without `ema_beta` in the optimizer config).
    pub fn ema(&self, model: M) -> Result<Option<M>> {
        self.optimizer.ema_model(model)
    }

    /// The optimizer (its history, state, EMA).
    pub fn optimizer(&self) -> &FusedOptimizer {
        &self.optimizer
    }

    /// The optimizer, mutably (to restore its state).
    pub fn optimizer_mut(&mut self) -> &mut FusedOptimizer {
        &mut self.optimizer
    }

    /// Sets the number of calls so far (after restoring a checkpoint).
    pub fn set_steps(&mut self, steps: usize) {
        self.steps = steps;
    }
}
