//! Learning-rate schedules as pure functions of the 0-based step.
//!
//! Step-index convention (torch `LambdaLR`, which every HuggingFace schedule is built on): the
//! scheduler is created with `last_epoch = -1` and immediately steps to `0`, so the first optimizer
//! step runs with `lr * f(0)`, and after `scheduler.step()` has been called `k` times the next
//! optimizer step runs with `lr * f(k)`. Every [`Schedule::multiplier`] here takes that `k`.
//!
//! Each variant names the function it mirrors; the formulas are written out on the variant, with
//! `W` warmup steps, `T` total steps and `r` the minimum ratio. Integer arithmetic happens before
//! the conversion to f64, as in the Python sources (`float(current_step) / float(max(1, W))`).
//! Beyond the end of a finite schedule each variant does what its source does (documented per
//! variant); the device tables only ever read `k < T`.

use std::f64::consts::PI;

/// Shape of a warmup or decay segment on progress `p` in `[0, 1]` (transformers `get_wsd_schedule`
/// `warmup_type` / `decay_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// decay `1 - p`; warmup `p`.
    Linear,
    /// decay `0.5 (1 + cos(pi p))`; warmup `0.5 (1 - cos(pi p))` (num_cycles 0.5).
    Cosine,
    /// decay `1 - sqrt(p)`; warmup `1 - sqrt(1 - p)`.
    OneMinusSqrt,
}

impl Shape {
    /// The decay shape: 1 at `p = 0`, 0 at `p = 1`. The cosine form keeps transformers'
    /// `cos(pi * num_cycles * 2.0 * p)` with `num_cycles = 0.5` (which is `cos(pi p)` exactly: the
    /// products by 0.5 and 2.0 are exact).
    pub fn decay(&self, p: f64) -> f64 {
        match self {
            Shape::Linear => 1.0 - p,
            Shape::Cosine => 0.5 * (1.0 + (PI * 0.5 * 2.0 * p).cos()),
            Shape::OneMinusSqrt => 1.0 - p.sqrt(),
        }
    }

    /// The warmup shape: 0 at `p = 0`, 1 at `p = 1`.
    pub fn warmup(&self, p: f64) -> f64 {
        match self {
            Shape::Linear => p,
            Shape::Cosine => 0.5 * (1.0 - (PI * p).cos()),
            Shape::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Shape::Linear => "linear",
            Shape::Cosine => "cosine",
            Shape::OneMinusSqrt => "1-sqrt",
        }
    }
}

/// Annealing of a 1cycle phase (torch `OneCycleLR.anneal_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anneal {
    /// `end + (start - end) / 2 * (cos(pi pct) + 1)`.
    Cos,
    /// `(end - start) * pct + start`.
    Linear,
}

/// What the gradient norms fed to [`Schedule::refined`] come from (Defazio et al., arXiv
/// 2310.07831).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefineFor {
    /// SGD: l2 norms, weights `w = G^-2`.
    Sgd,
    /// Adam-style optimizers: l1 norms, weights `w = G^-1`.
    Adam,
}

/// A learning-rate multiplier schedule.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// transformers `get_constant_schedule_with_warmup` (`W = 0`: `get_constant_schedule`):
    /// `f = k / max(1, W)` for `k < W`, else 1.
    Constant { warmup: usize },
    /// transformers `get_linear_schedule_with_warmup`: warmup `k / max(1, W)`, then
    /// `f = max(0, (T - k) / max(1, T - W))` (0 from `k = T` on).
    Linear { warmup: usize, total: usize },
    /// transformers `get_cosine_with_min_lr_schedule_with_warmup` with `min_lr_rate = r`
    /// (`r = 0` is `get_cosine_schedule_with_warmup`): warmup `k / max(1, W)`, then
    /// `p = (k - W) / max(1, T - W)`, `c = 0.5 (1 + cos(pi * num_cycles * 2 p))`,
    /// `f = max(0, c (1 - r) + r)`. Like the source, `p` is not clamped: past `T` the cosine turns
    /// back up.
    Cosine {
        warmup: usize,
        total: usize,
        min_ratio: f64,
        num_cycles: f64,
    },
    /// transformers `get_inverse_sqrt_schedule`: warmup `k / max(1, W)`, then
    /// `f = 1 / sqrt((k + tau - W) / tau)` with `tau = timescale`, default `W` (or 10 000 when
    /// `W = 0`, as the source).
    InverseSqrt {
        warmup: usize,
        timescale: Option<usize>,
    },
    /// transformers `get_wsd_schedule` (num_cycles 0.5): for `k < W`,
    /// `f = max(0, warmup_shape(k / max(1, W)) (1 - r) + r)`; for `k < W + S`, 1; for
    /// `k < W + S + D`, `p = (k - W - S) / max(1, D)`, `f = max(0, decay_shape(p) (1 - r) + r)`;
    /// afterwards `r`. Note the warmup also starts at `r`, as in the source.
    Wsd {
        warmup: usize,
        stable: usize,
        decay: usize,
        min_ratio: f64,
        warmup_shape: Shape,
        decay_shape: Shape,
    },
    /// REX (Chen, Wolfe, Kyrillidis, "REX: Revisiting Budgeted Training with an Improved
    /// Schedule", arXiv 2107.04197): warmup `k / max(1, W)`, then `z = (k - W) / max(1, T - W)`,
    /// `f = (1 - z) / (1 - z / 2)` (with `W = 0`: `z = k / T`, the paper's form); 0 from `z >= 1`.
    Rex { warmup: usize, total: usize },
    /// torch `OneCycleLR` (two phases, `three_phase = False`) as a multiplier of `max_lr`: phase 1
    /// from `1 / div_factor` to 1 over steps `0 ..= e1` with `e1 = pct_start * T - 1`, phase 2
    /// from 1 to `1 / (div_factor * final_div_factor)` over `e1 ..= T - 1`; in each phase
    /// `pct = (k - start) / (end - start)` and the `anneal` curve. Past `T - 1` the last phase
    /// extrapolates (torch raises there).
    OneCycle {
        total: usize,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
        anneal: Anneal,
    },
    /// The refined schedule of Defazio et al. (arXiv 2310.07831), built by [`Schedule::refined`]:
    /// one multiplier per step of the previous run, 0 past its end.
    Refined { multipliers: Vec<f64> },
    /// A schedule restarted at `offset` (re-warming for continual pre-training):
    /// `f(k) = inner(k)` for `k < offset`, `inner(k - offset)` from `offset` on.
    Rewarm { inner: Box<Schedule>, offset: usize },
    /// Phases run one after the other: phase `i` covers `steps_i` steps and sees its local step
    /// `k - start_i`; the last phase continues past its length (torch `SequentialLR` milestones).
    Sequential { phases: Vec<(Schedule, usize)> },
}

/// transformers' linear warmup `float(k) / float(max(1, W))`.
fn linear_warmup(k: usize, warmup: usize) -> f64 {
    k as f64 / warmup.max(1) as f64
}

impl Schedule {
    /// `lr * multiplier(k)` is the learning rate of 0-based step `k`.
    pub fn multiplier(&self, k: usize) -> f64 {
        match self {
            Schedule::Constant { warmup } => {
                if k < *warmup {
                    linear_warmup(k, *warmup)
                } else {
                    1.0
                }
            }
            Schedule::Linear { warmup, total } => {
                if k < *warmup {
                    return linear_warmup(k, *warmup);
                }
                // (T - k) is a Python int and may be negative past the end.
                let num = *total as f64 - k as f64;
                let den = total.saturating_sub(*warmup).max(1) as f64;
                (num / den).max(0.0)
            }
            Schedule::Cosine {
                warmup,
                total,
                min_ratio,
                num_cycles,
            } => {
                if k < *warmup {
                    return linear_warmup(k, *warmup);
                }
                let progress = (k - warmup) as f64 / total.saturating_sub(*warmup).max(1) as f64;
                let factor = 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos());
                (factor * (1.0 - min_ratio) + min_ratio).max(0.0)
            }
            Schedule::InverseSqrt { warmup, timescale } => {
                if k < *warmup {
                    return linear_warmup(k, *warmup);
                }
                let tau = Self::inverse_sqrt_timescale(*warmup, *timescale);
                // shift = tau - W is a Python int (may be negative); k + shift >= tau > 0 here.
                let shifted = k as f64 + tau as f64 - *warmup as f64;
                1.0 / (shifted / tau as f64).sqrt()
            }
            Schedule::Wsd {
                warmup,
                stable,
                decay,
                min_ratio,
                warmup_shape,
                decay_shape,
            } => {
                let r = *min_ratio;
                if k < *warmup {
                    let p = linear_warmup(k, *warmup);
                    return (warmup_shape.warmup(p) * (1.0 - r) + r).max(0.0);
                }
                if k < warmup + stable {
                    return 1.0;
                }
                if k < warmup + stable + decay {
                    let p = (k - warmup - stable) as f64 / (*decay).max(1) as f64;
                    return (decay_shape.decay(p) * (1.0 - r) + r).max(0.0);
                }
                r
            }
            Schedule::Rex { warmup, total } => {
                if k < *warmup {
                    return linear_warmup(k, *warmup);
                }
                let z = (k - warmup) as f64 / total.saturating_sub(*warmup).max(1) as f64;
                if z >= 1.0 {
                    0.0
                } else {
                    (1.0 - z) / (1.0 - z / 2.0)
                }
            }
            Schedule::OneCycle {
                total,
                pct_start,
                div_factor,
                final_div_factor,
                anneal,
            } => {
                let initial = 1.0 / div_factor;
                let min = initial / final_div_factor;
                let phases = [
                    (pct_start * *total as f64 - 1.0, initial, 1.0),
                    (*total as f64 - 1.0, 1.0, min),
                ];
                let step = k as f64;
                let mut start_step = 0.0;
                for (i, &(end_step, start_lr, end_lr)) in phases.iter().enumerate() {
                    if step <= end_step || i == phases.len() - 1 {
                        let pct = (step - start_step) / (end_step - start_step);
                        return match anneal {
                            Anneal::Cos => {
                                end_lr + (start_lr - end_lr) / 2.0 * ((PI * pct).cos() + 1.0)
                            }
                            Anneal::Linear => (end_lr - start_lr) * pct + start_lr,
                        };
                    }
                    start_step = end_step;
                }
                unreachable!("the last phase always matches")
            }
            Schedule::Refined { multipliers } => multipliers.get(k).copied().unwrap_or(0.0),
            Schedule::Rewarm { inner, offset } => {
                if k < *offset {
                    inner.multiplier(k)
                } else {
                    inner.multiplier(k - offset)
                }
            }
            Schedule::Sequential { phases } => {
                if phases.is_empty() {
                    return 1.0; // no phase: nothing scales the lr
                }
                let mut start = 0;
                for (i, (schedule, steps)) in phases.iter().enumerate() {
                    if k < start + steps || i == phases.len() - 1 {
                        return schedule.multiplier(k - start);
                    }
                    start += steps;
                }
                unreachable!("the last phase always matches")
            }
        }
    }

    /// The inverse-sqrt timescale: the given one, else `W`, else 10 000 (transformers:
    /// `timescale = num_warmup_steps or 10_000`).
    pub fn inverse_sqrt_timescale(warmup: usize, timescale: Option<usize>) -> usize {
        timescale.unwrap_or(if warmup == 0 { 10_000 } else { warmup })
    }

    /// `get_cosine_schedule_with_warmup` (num_cycles 0.5, no floor).
    pub fn cosine(warmup: usize, total: usize) -> Schedule {
        Schedule::Cosine {
            warmup,
            total,
            min_ratio: 0.0,
            num_cycles: 0.5,
        }
    }

    /// `get_wsd_schedule(num_warmup_steps=W, num_decay_steps=D, num_training_steps=T)` with a
    /// linear warmup: the stable phase is `T - W - D` steps. Errors when `W + D > T`.
    pub fn wsd(
        warmup: usize,
        decay: usize,
        total: usize,
        min_ratio: f64,
        decay_shape: Shape,
    ) -> Result<Schedule, String> {
        if warmup.checked_add(decay).is_none_or(|wd| wd > total) {
            return Err(format!(
                "wsd: warmup {warmup} + decay {decay} exceed the total {total}"
            ));
        }
        Ok(Schedule::Wsd {
            warmup,
            stable: total - warmup - decay,
            decay,
            min_ratio,
            warmup_shape: Shape::Linear,
            decay_shape,
        })
    }

    /// torch `OneCycleLR` defaults: pct_start 0.3, div_factor 25, final_div_factor 1e4, cosine.
    pub fn one_cycle(total: usize) -> Schedule {
        Schedule::OneCycle {
            total,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            anneal: Anneal::Cos,
        }
    }

    /// The refined schedule of Defazio et al. (arXiv 2310.07831, Algorithms 1 and 2) from the
    /// gradient norms `G_0 .. G_{n-1}` of a previous run:
    /// 1. `G~ = median_filter(G, window)`: the median of the centred window
    ///    `[k - window/2, k + window/2]` clipped to the run (an even count takes the mean of the
    ///    two middle values);
    /// 2. `w_k = G~_k^-2` for SGD (l2 norms), `G~_k^-1` for Adam (l1 norms);
    /// 3. `f_k = w_k * sum_{p > k} w_p` (so the last step gets 0);
    /// 4. normalised to a maximum of 1.
    ///
    /// Errors for fewer than two norms, a zero window, or a norm that is not finite and > 0.
    pub fn refined(norms: &[f64], window: usize, kind: RefineFor) -> Result<Schedule, String> {
        if norms.len() < 2 {
            return Err("refined schedule: needs at least two gradient norms".into());
        }
        if window == 0 {
            return Err("refined schedule: window must be >= 1".into());
        }
        if let Some((index, value)) = norms
            .iter()
            .enumerate()
            .find(|(_, g)| !(g.is_finite() && **g > 0.0))
        {
            return Err(format!(
                "refined schedule: gradient norm {index} is {value}; norms must be finite and > 0"
            ));
        }
        let n = norms.len();
        let half = window / 2;
        let smoothed: Vec<f64> = (0..n)
            .map(|k| {
                let lo = k.saturating_sub(half);
                let hi = (k + half).min(n - 1);
                median(&norms[lo..=hi])
            })
            .collect();
        let weights: Vec<f64> = smoothed
            .iter()
            .map(|g| match kind {
                RefineFor::Sgd => 1.0 / (g * g),
                RefineFor::Adam => 1.0 / g,
            })
            .collect();
        let mut multipliers = vec![0.0; n];
        let mut suffix = 0.0;
        for k in (0..n).rev() {
            multipliers[k] = weights[k] * suffix;
            suffix += weights[k];
        }
        let max = multipliers.iter().cloned().fold(0.0, f64::max);
        for f in &mut multipliers {
            *f /= max;
        }
        Ok(Schedule::Refined { multipliers })
    }

    /// The total number of steps the schedule is written for, when it has one.
    pub fn total_steps(&self) -> Option<usize> {
        match self {
            Schedule::Constant { .. } | Schedule::InverseSqrt { .. } => None,
            Schedule::Linear { total, .. }
            | Schedule::Cosine { total, .. }
            | Schedule::Rex { total, .. }
            | Schedule::OneCycle { total, .. } => Some(*total),
            Schedule::Wsd {
                warmup,
                stable,
                decay,
                ..
            } => Some(warmup.saturating_add(*stable).saturating_add(*decay)),
            Schedule::Refined { multipliers } => Some(multipliers.len()),
            Schedule::Rewarm { inner, offset } => {
                inner.total_steps().map(|t| offset.saturating_add(t))
            }
            Schedule::Sequential { phases } => {
                let ((last, _), before) = phases.split_last()?;
                let before = before.iter().fold(0usize, |a, p| a.saturating_add(p.1));
                last.total_steps().map(|t| before.saturating_add(t))
            }
        }
    }

    /// `lr * f(k)` for `k = 0 .. n`.
    pub fn lr_table(&self, lr: f64, n: usize) -> Vec<f64> {
        (0..n).map(|k| lr * self.multiplier(k)).collect()
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}
