//! Validation rows of block-sparse / dense softmax attention and the Radial masks.
//!
//! GPU backends are compared with the f64 reference. The CPU backend *is* the reference, so its rows
//! check it against independent computations instead: the forward against the fully materialised
//! masked score matrix, the gradients against central finite differences at sampled coordinates.

use linattn_reference::testing::Rng;

use super::linear::{dtypes, threshold};
use super::{Comparison, Row};
use crate::attention::{self, Attention, BlockMask, RadialConfig, RadialModel};
use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

enum MaskKind {
    Dense,
    /// Random blocks with the given keep probability; query block 1 is left empty.
    Random(f64),
    Radial(RadialModel, usize, usize),
}

struct Case {
    op: &'static str,
    /// (B, T, S, H, D)
    shape: (usize, usize, usize, usize, usize),
    block: usize,
    causal: bool,
    mask: MaskKind,
}

fn cases(quick: bool) -> Vec<Case> {
    let mut cases = vec![
        Case {
            op: "attention-dense",
            shape: (1, 200, 200, 2, 64),
            block: 64,
            causal: false,
            mask: MaskKind::Dense,
        },
        Case {
            op: "attention-causal",
            shape: (1, 200, 200, 2, 64),
            block: 64,
            causal: true,
            mask: MaskKind::Dense,
        },
        Case {
            op: "attention-sparse",
            shape: (1, 200, 256, 2, 64),
            block: 64,
            causal: false,
            mask: MaskKind::Random(0.5),
        },
        Case {
            op: "attention-radial-wan",
            shape: (1, 512, 512, 1, 64),
            block: 64,
            causal: false,
            mask: MaskKind::Radial(RadialModel::Wan, 8, 64),
        },
    ];
    if !quick {
        cases.extend([
            Case {
                op: "attention-sparse",
                shape: (2, 1000, 1000, 2, 128),
                block: 128,
                causal: true,
                mask: MaskKind::Random(0.4),
            },
            Case {
                op: "attention-radial-hunyuan",
                shape: (1, 2048, 2048, 1, 128),
                block: 128,
                causal: false,
                mask: MaskKind::Radial(RadialModel::Hunyuan, 8, 256),
            },
            Case {
                op: "attention-radial-paper",
                shape: (1, 2048, 2048, 1, 64),
                block: 64,
                causal: false,
                mask: MaskKind::Radial(RadialModel::Paper, 8, 256),
            },
        ]);
    }
    cases
}

fn build_mask(case: &Case, rng: &mut Rng) -> Result<Option<BlockMask>> {
    let (_, t, s, _, _) = case.shape;
    Ok(match case.mask {
        MaskKind::Dense => None,
        MaskKind::Random(keep) => {
            let (nq, nk) =
                BlockMask::grid(t, s, case.block, case.block).map_err(Error::InvalidArgument)?;
            let dense: Vec<u8> = (0..nq * nk)
                .map(|i| u8::from(i / nk != 1 && rng.uniform() < keep))
                .collect();
            Some(
                BlockMask::from_dense(nq, nk, case.block, case.block, &dense)
                    .map_err(Error::InvalidArgument)?,
            )
        }
        MaskKind::Radial(model, frames, tokens_per_frame) => {
            Some(attention::radial_mask(&RadialConfig {
                frames,
                tokens_per_frame,
                block_size: case.block,
                decay_factor: 1.0,
                model,
                text_tokens: 0,
            })?)
        }
    })
}

pub(super) fn rows(
    backend: &Backend,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
    rng: &mut Rng,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for case in cases(quick).into_iter().filter(|c| keep(c.op)) {
        for dtype in dtypes(backend) {
            let (b, t, s, h, d) = case.shape;
            let mut row = Row {
                op: case.op.to_string(),
                form: if matches!(case.mask, MaskKind::Dense) {
                    "dense".into()
                } else {
                    "block-sparse".into()
                },
                backend: backend.kind(),
                dtype,
                shape: format!(
                    "B{b} T{t} S{s} H{h} D{d} blk{}{}",
                    case.block,
                    if case.causal { " causal" } else { "" }
                ),
                max_rel_err: 0.0,
                worst: String::new(),
                threshold: threshold(dtype),
                pass: false,
                error: None,
            };
            match run_case(backend, &case, dtype, rng) {
                Ok(cmp) => cmp.fill(&mut row),
                Err(Error::Unsupported(why)) => {
                    row.pass = true;
                    row.error = Some(format!("n/a ({why})"));
                }
                Err(e) => row.error = Some(e.to_string()),
            }
            rows.push(row);
        }
    }
    rows
}

fn run_case(backend: &Backend, case: &Case, dtype: DType, rng: &mut Rng) -> Result<Comparison> {
    let (b, t, s, h, d) = case.shape;
    let mask = build_mask(case, rng)?;
    let tensor = |shape: Vec<usize>, data: Vec<f64>| {
        Tensor::from_f64(shape, data)
            .expect("sizes match")
            .to_dtype(dtype)
    };
    let q = tensor(vec![b, t, h, d], rng.randn(b * t * h * d));
    let k = tensor(vec![b, s, h, d], rng.randn(b * s * h * d));
    let v = tensor(vec![b, s, h, d], rng.randn(b * s * h * d));
    let d_o = tensor(vec![b, t, h, d], rng.randn(b * t * h * d));
    let mut problem = Attention::dense(&q, &k, &v).with_causal(case.causal);
    if let Some(m) = &mask {
        problem = problem.with_mask(m);
    }
    let thr = threshold(dtype);
    let thr_o = if matches!(dtype, DType::F16 | DType::BF16) {
        4e-3
    } else {
        thr
    };
    let got = attention::forward(backend, &problem)?;
    let grads = attention::backward(backend, &problem, &d_o)?;
    let mut cmp = Comparison::default();
    if backend.kind() == BackendKind::Cpu {
        let (o, lse) = materialised_forward(&problem)?;
        cmp.add("o", &got.o.to_f64_vec(), &o, thr_o);
        cmp.add(
            "lse",
            &finite_or_zero(&got.lse.to_f64_vec()),
            &finite_or_zero(&lse),
            thr,
        );
        let fd = finite_difference_samples(&problem, &d_o, &grads, rng)?;
        for (name, got, want) in fd {
            cmp.add(name, &got, &want, 1e-6);
        }
    } else {
        let want = attention::forward(&Backend::Cpu, &problem)?;
        let want_grads = attention::backward(&Backend::Cpu, &problem, &d_o)?;
        cmp.add("o", &got.o.to_f64_vec(), &want.o.to_f64_vec(), thr_o);
        cmp.add(
            "lse",
            &finite_or_zero(&got.lse.to_f64_vec()),
            &finite_or_zero(&want.lse.to_f64_vec()),
            thr,
        );
        cmp.add(
            "dq",
            &grads.dq.to_f64_vec(),
            &want_grads.dq.to_f64_vec(),
            thr,
        );
        cmp.add(
            "dk",
            &grads.dk.to_f64_vec(),
            &want_grads.dk.to_f64_vec(),
            thr,
        );
        cmp.add(
            "dv",
            &grads.dv.to_f64_vec(),
            &want_grads.dv.to_f64_vec(),
            thr,
        );
        // An empty row must give exactly -inf on every backend.
        let inf_got = got
            .lse
            .to_f64_vec()
            .iter()
            .filter(|x| **x == f64::NEG_INFINITY)
            .count();
        let inf_want = want
            .lse
            .to_f64_vec()
            .iter()
            .filter(|x| **x == f64::NEG_INFINITY)
            .count();
        if inf_got != inf_want {
            cmp.add("lse=-inf rows", &[inf_got as f64], &[inf_want as f64], 0.0);
        }
    }
    Ok(cmp)
}

/// `-inf` (empty rows) compared as 0 on both sides; the count of such rows is checked separately.
fn finite_or_zero(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&v| if v.is_finite() { v } else { 0.0 })
        .collect()
}

/// The forward pass written as literally as possible: the whole `T x S` score matrix with `-inf`
/// where a key is not allowed, a softmax per row, a matrix product.
fn materialised_forward(p: &Attention) -> Result<(Vec<f64>, Vec<f64>)> {
    let spec = p.validate()?;
    let dims = spec.dims;
    let (q, k, v) = (p.q.to_f64_vec(), p.k.to_f64_vec(), p.v.to_f64_vec());
    let mut o = vec![0.0; dims.b * dims.t * dims.h * dims.d];
    let mut lse = vec![0.0; dims.b * dims.h * dims.t];
    for b in 0..dims.b {
        for h in 0..dims.h {
            for i in 0..dims.t {
                let scores: Vec<f64> = (0..dims.s)
                    .map(|j| {
                        let blocked = p
                            .mask
                            .is_some_and(|m| !m.allowed(i / m.block_q(), j / m.block_k()));
                        if blocked || (spec.causal && j > i) {
                            f64::NEG_INFINITY
                        } else {
                            let qi = &q[((b * dims.t + i) * dims.h + h) * dims.d..][..dims.d];
                            let kj = &k[((b * dims.s + j) * dims.h + h) * dims.d..][..dims.d];
                            spec.scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                        }
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let out = &mut o[((b * dims.t + i) * dims.h + h) * dims.d..][..dims.d];
                if m == f64::NEG_INFINITY {
                    lse[(b * dims.h + h) * dims.t + i] = f64::NEG_INFINITY;
                    continue;
                }
                let sum: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                lse[(b * dims.h + h) * dims.t + i] = m + sum.ln();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / sum;
                    if p > 0.0 {
                        let vj = &v[((b * dims.s + j) * dims.h + h) * dims.d..][..dims.d];
                        for (x, y) in out.iter_mut().zip(vj) {
                            *x += p * y;
                        }
                    }
                }
            }
        }
    }
    Ok((o, lse))
}

type Samples = Vec<(&'static str, Vec<f64>, Vec<f64>)>;

/// Central differences of `loss = sum(o * do)` at 8 random coordinates of each input, against the
/// analytic gradients.
fn finite_difference_samples(
    p: &Attention,
    d_o: &Tensor,
    grads: &attention::AttnGrads,
    rng: &mut Rng,
) -> Result<Samples> {
    let step = 1e-5;
    let d_o = d_o.to_f64_vec();
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<f64> {
        let mut problem = Attention { q, k, v, ..*p };
        problem.mask = p.mask;
        let out = attention::forward(&Backend::Cpu, &problem)?;
        Ok(out
            .o
            .to_f64_vec()
            .iter()
            .zip(&d_o)
            .map(|(a, b)| a * b)
            .sum())
    };
    let (q, k, v) = (
        p.q.to_dtype(DType::F64),
        p.k.to_dtype(DType::F64),
        p.v.to_dtype(DType::F64),
    );
    let mut samples = Vec::new();
    for (name, which, grad) in [
        ("dq", 0, &grads.dq),
        ("dk", 1, &grads.dk),
        ("dv", 2, &grads.dv),
    ] {
        let grad = grad.to_f64_vec();
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            let idx = rng.range(0, grad.len() - 1);
            let bumped = |delta: f64| -> Result<f64> {
                let mut inputs = [q.to_f64_vec(), k.to_f64_vec(), v.to_f64_vec()];
                inputs[which][idx] += delta;
                let [qq, kk, vv] = inputs;
                loss(
                    &Tensor::from_f64(q.shape().to_vec(), qq)?,
                    &Tensor::from_f64(k.shape().to_vec(), kk)?,
                    &Tensor::from_f64(v.shape().to_vec(), vv)?,
                )
            };
            want.push((bumped(step)? - bumped(-step)?) / (2.0 * step));
            got.push(grad[idx]);
        }
        samples.push((name, got, want));
    }
    Ok(samples)
}
