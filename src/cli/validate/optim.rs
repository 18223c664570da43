//! Validation rows of the fused optimizer step.
//!
//! GPU backends run `S` fused steps and are compared with the f64 reference run from the same
//! inputs. The CPU backend is the reference, so its rows check it against a literal transcription
//! of optim.md's formulas (torch AdamW, Lion, cosine warmup schedule) written here, step by step.

use linattn_reference::testing::Rng;

use super::{Comparison, Row};
use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::optim::{self, DecayMode, Method, OptimizerConfig, Params, Schedule};
use crate::tensor::{DType, Tensor};

struct Case {
    op: &'static str,
    method: Method,
    cautious: bool,
    /// Tensor sizes (odd ones, and an empty tensor).
    sizes: Vec<usize>,
    steps: usize,
}

fn cases(quick: bool) -> Vec<Case> {
    let sizes = if quick {
        vec![1, 7, 0, 333, 4099]
    } else {
        vec![1, 7, 0, 333, 4099, 65_537, 1000, 12_345]
    };
    let steps = if quick { 20 } else { 100 };
    vec![
        Case {
            op: "adamw",
            method: Method::adamw(),
            cautious: false,
            sizes: sizes.clone(),
            steps,
        },
        Case {
            op: "adamw-cautious",
            method: Method::adamw(),
            cautious: true,
            sizes: sizes.clone(),
            steps,
        },
        Case {
            op: "lion",
            method: Method::lion(),
            cautious: false,
            sizes,
            steps,
        },
    ]
}

/// Warmup over 5 steps, cosine to 0 over `steps`.
fn schedule(steps: usize) -> Schedule {
    Schedule::cosine(5, steps)
}

/// optim.md's cosine-with-warmup multiplier, written out.
fn cosine_multiplier(k: usize, warmup: usize, total: usize) -> f64 {
    if k < warmup {
        return k as f64 / warmup.max(1) as f64;
    }
    let p = (k - warmup) as f64 / (total - warmup).max(1) as f64;
    (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
}

pub(super) fn rows(
    backend: &Backend,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
    rng: &mut Rng,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for case in cases(quick).into_iter().filter(|c| keep(c.op)) {
        let dtype = if backend.kind() == BackendKind::Cpu {
            DType::F64
        } else {
            DType::F32
        };
        let total: usize = case.sizes.iter().sum();
        let mut row = Row {
            op: case.op.to_string(),
            form: "fused-step".into(),
            backend: backend.kind(),
            dtype,
            shape: format!(
                "{} tensors, {total} params, {} steps",
                case.sizes.len(),
                case.steps
            ),
            max_rel_err: 0.0,
            worst: String::new(),
            threshold: 0.0,
            pass: false,
            error: None,
        };
        match run_case(backend, &case, rng) {
            Ok(cmp) => cmp.fill(&mut row),
            Err(Error::Unsupported(why)) => {
                row.pass = true;
                row.error = Some(format!("n/a ({why})"));
            }
            Err(e) => row.error = Some(e.to_string()),
        }
        rows.push(row);
    }
    rows
}

fn run_case(backend: &Backend, case: &Case, rng: &mut Rng) -> Result<Comparison> {
    let to_f32 = backend.kind() != BackendKind::Cpu;
    let tensor = |data: Vec<f64>| {
        let t = Tensor::from_f64(vec![data.len()], data).expect("1-d");
        if to_f32 { t.to_dtype(DType::F32) } else { t }
    };
    let params: Vec<Tensor> = case.sizes.iter().map(|&n| tensor(rng.randn(n))).collect();
    let grads: Vec<Vec<Tensor>> = (0..case.steps)
        .map(|_| {
            case.sizes
                .iter()
                .map(|&n| tensor(rng.randn(n).iter().map(|g| 0.1 * g).collect()))
                .collect()
        })
        .collect();
    let mut config = match case.method {
        Method::AdamW { .. } => OptimizerConfig::adamw(1e-2),
        Method::Lion { .. } => OptimizerConfig::lion(1e-3),
    };
    config.weight_decay = 0.1;
    config.decay_mode = DecayMode::Decoupled;
    config.cautious = case.cautious;
    let param_refs: Vec<&Tensor> = params.iter().collect();
    let grad_refs: Vec<Vec<&Tensor>> = grads.iter().map(|g| g.iter().collect()).collect();
    let schedule = schedule(case.steps);
    let got = optim::optimize(
        backend,
        &config,
        &schedule,
        &Params::new(&param_refs),
        &grad_refs,
    )?;
    let (want_param, want_m, want_v) = if backend.kind() == BackendKind::Cpu {
        literal(case, &config, &params, &grads)
    } else {
        let want = optim::optimize(
            &Backend::Cpu,
            &config,
            &schedule,
            &Params::new(&param_refs),
            &grad_refs,
        )?;
        let flat = |ts: &[Tensor]| ts.iter().flat_map(|t| t.to_f64_vec()).collect::<Vec<_>>();
        (
            flat(&want.params),
            flat(&want.exp_avg),
            want.exp_avg_sq.as_deref().map(flat),
        )
    };
    let threshold = if backend.kind() == BackendKind::Cpu {
        1e-12
    } else {
        1e-5
    };
    let flat = |ts: &[Tensor]| ts.iter().flat_map(|t| t.to_f64_vec()).collect::<Vec<_>>();
    let mut cmp = Comparison::default();
    cmp.add("param", &flat(&got.params), &want_param, threshold);
    cmp.add("exp_avg", &flat(&got.exp_avg), &want_m, threshold);
    if let (Some(got_v), Some(want_v)) = (got.exp_avg_sq.as_deref(), want_v) {
        cmp.add("exp_avg_sq", &flat(got_v), &want_v, threshold);
    }
    Ok(cmp)
}

/// The optimizer run written as literally as optim.md states it.
fn literal(
    case: &Case,
    config: &OptimizerConfig,
    params: &[Tensor],
    grads: &[Vec<Tensor>],
) -> (Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
    let mut theta: Vec<f64> = params.iter().flat_map(|t| t.to_f64_vec()).collect();
    let mut m = vec![0.0; theta.len()];
    let mut v = vec![0.0; theta.len()];
    let lambda = config.weight_decay;
    for (k, step_grads) in grads.iter().enumerate() {
        let t = (k + 1) as i32;
        let eta = config.lr * cosine_multiplier(k, 5, case.steps);
        let g: Vec<f64> = step_grads.iter().flat_map(|t| t.to_f64_vec()).collect();
        for i in 0..theta.len() {
            match config.method {
                Method::AdamW { beta1, beta2, eps } => {
                    m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
                    v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
                    let denom = v[i].sqrt() / (1.0 - beta2.powi(t)).sqrt() + eps;
                    // u: the update direction before decay, so that theta moves by -eta * u.
                    let u = m[i] / (1.0 - beta1.powi(t)) / denom;
                    // Cautious decay: only where u and the pre-decay theta agree in sign.
                    let decays = !case.cautious || u * theta[i] >= 0.0;
                    if decays {
                        theta[i] *= 1.0 - eta * lambda;
                    }
                    theta[i] -= eta * u;
                }
                Method::Lion { beta1, beta2 } => {
                    let c = beta1 * m[i] + (1.0 - beta1) * g[i];
                    let u = if c > 0.0 {
                        1.0
                    } else if c < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    let decays = !case.cautious || u * theta[i] >= 0.0;
                    let decay = if decays { lambda * theta[i] } else { 0.0 };
                    theta[i] -= eta * (u + decay);
                    m[i] = beta2 * m[i] + (1.0 - beta2) * g[i];
                }
            }
        }
    }
    let second = matches!(config.method, Method::AdamW { .. }).then_some(v);
    (theta, m, second)
}
