//! The shape/mask matrix of the CUDA attention kernels: inputs drawn in f64 and rounded to the
//! input dtype, the f64 reference computed from the rounded values, results compared under the
//! ops.md thresholds (o <= 4e-3, lse / dq / dk / dv <= 5e-3 relative RMS; rows without an allowed
//! key must give exactly o = 0, lse = -inf and zero dq). Generic over the executor.
//!
//! Callers: `tests/cuda_attention_emulated.rs` (the host emulation), `tests/cuda_attention.rs` and
//! `linattn validate --device cuda --full` (on a GPU, through [`gpu`]).

use crate::attention::cuda::{
    DeviceAttentionPlan, backward_on, backward_with_plan_on, forward_on, forward_with_plan_on,
};
use crate::attention::plan::AttentionPlan;
use crate::attention::{Attention, BlockMask, RadialConfig, RadialModel, radial_mask};
use crate::cuda::exec::Executor;
use crate::reference::attention::{self as reference, AttnDims, AttnProblem};
use crate::reference::testing::Rng;
use crate::{DType, Result, Tensor};

use super::{Check, Outcome, Run, compare, ensure};
/// Which blocks a case allows.
#[derive(Clone, Debug)]
pub enum MaskKind {
    /// No mask through the host API (`forward_on`: the dense mode with its default blocks).
    HostDense,
    /// No mask: the kernels' computed dense lists with the case's block sizes.
    Dense,
    /// Every block, through an uploaded plan (must agree with `Dense`).
    FullPlan,
    /// Each block allowed with probability `density`; `diagonal`: blocks on the token diagonal
    /// forced on (true) or off (false); `empty_row`: one query block row cleared.
    Random {
        density: f64,
        diagonal: bool,
        empty_row: bool,
    },
    /// A Radial mask (its block size is the case's block size; T = S = its token count).
    Radial(RadialConfig),
}

#[derive(Clone, Debug)]
pub struct AttnCase {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub h: usize,
    pub d: usize,
    pub block_q: usize,
    pub block_k: usize,
    pub causal: bool,
    pub mask: MaskKind,
    /// Multiplies q (sharper softmax for > 1).
    pub q_gain: f64,
}

impl AttnCase {
    pub fn new(
        t: usize,
        s: usize,
        d: usize,
        block: (usize, usize),
        causal: bool,
        mask: MaskKind,
    ) -> Self {
        AttnCase {
            b: 1,
            t,
            s,
            h: 1,
            d,
            block_q: block.0,
            block_k: block.1,
            causal,
            mask,
            q_gain: 1.0,
        }
    }

    pub fn radial(cfg: RadialConfig, d: usize, causal: bool) -> Self {
        let n = cfg.total_tokens();
        AttnCase::new(
            n,
            n,
            d,
            (cfg.block_size, cfg.block_size),
            causal,
            MaskKind::Radial(cfg),
        )
    }

    pub fn with_batch_heads(mut self, b: usize, h: usize) -> Self {
        self.b = b;
        self.h = h;
        self
    }

    pub fn with_q_gain(mut self, gain: f64) -> Self {
        self.q_gain = gain;
        self
    }

    pub fn label(&self, dtype: DType) -> String {
        let mask = match &self.mask {
            MaskKind::HostDense => "host-dense".to_string(),
            MaskKind::Dense => "dense".to_string(),
            MaskKind::FullPlan => "full-plan".to_string(),
            MaskKind::Random {
                density,
                diagonal,
                empty_row,
            } => format!(
                "random(p={density}{}{})",
                if *diagonal { ",diag" } else { ",no-diag" },
                if *empty_row { ",empty-row" } else { "" }
            ),
            MaskKind::Radial(c) => format!(
                "radial({:?},{}x{},decay={})",
                c.model, c.frames, c.tokens_per_frame, c.decay_factor
            ),
        };
        format!(
            "{dtype} B{} T{} S{} H{} D{} blk{}x{} {}{} {mask}{}",
            self.b,
            self.t,
            self.s,
            self.h,
            self.d,
            self.block_q,
            self.block_k,
            if self.causal { "causal" } else { "full" },
            if self.q_gain != 1.0 {
                format!(" qx{}", self.q_gain)
            } else {
                String::new()
            },
            "",
        )
    }

    /// The block mask of the case (None for the dense modes).
    pub fn block_mask(&self, rng: &mut Rng) -> Outcome<Option<BlockMask>> {
        let (nq, nk) = BlockMask::grid(self.t, self.s, self.block_q, self.block_k)?;
        Ok(match &self.mask {
            MaskKind::HostDense | MaskKind::Dense | MaskKind::FullPlan => None,
            MaskKind::Random {
                density,
                diagonal,
                empty_row,
            } => {
                let mut dense: Vec<u8> = (0..nq * nk)
                    .map(|_| u8::from(rng.uniform() < *density))
                    .collect();
                for qb in 0..nq {
                    for kb in 0..nk {
                        // Blocks holding a token pair with i == j.
                        let (q_lo, q_hi) =
                            (qb * self.block_q, ((qb + 1) * self.block_q).min(self.t));
                        let (k_lo, k_hi) =
                            (kb * self.block_k, ((kb + 1) * self.block_k).min(self.s));
                        if q_lo < k_hi && k_lo < q_hi {
                            dense[qb * nk + kb] = u8::from(*diagonal);
                        }
                    }
                }
                if !*diagonal {
                    // Keep rows testable: a row left without blocks gets one random block lying
                    // entirely before its first query (so the causal rule keeps it); the first
                    // query blocks have none and stay empty (rows without any allowed key).
                    for qb in 0..nq {
                        let row = &mut dense[qb * nk..(qb + 1) * nk];
                        if row.iter().any(|&x| x != 0) {
                            continue;
                        }
                        let before: Vec<usize> = (0..nk)
                            .filter(|&kb| {
                                ((kb + 1) * self.block_k).min(self.s) <= qb * self.block_q
                            })
                            .collect();
                        if !before.is_empty() {
                            row[before[rng.range(0, before.len() - 1)]] = 1;
                        }
                    }
                }
                if *empty_row {
                    let qb = nq / 2;
                    dense[qb * nk..(qb + 1) * nk].fill(0);
                }
                Some(BlockMask::from_dense(
                    nq,
                    nk,
                    self.block_q,
                    self.block_k,
                    &dense,
                )?)
            }
            MaskKind::Radial(cfg) => Some(radial_mask(cfg)?),
        })
    }
}

/// A small paper/released Radial configuration.
pub fn radial_config(
    model: RadialModel,
    frames: usize,
    tokens_per_frame: usize,
    block: usize,
    decay: f64,
) -> RadialConfig {
    RadialConfig {
        frames,
        tokens_per_frame,
        block_size: block,
        decay_factor: decay,
        model,
        text_tokens: 0,
    }
}

/// lse: the -inf rows must coincide; the finite ones are compared like any output.
fn compare_lse(got: &[f64], want: &[f64]) -> Check {
    let mismatched = got
        .iter()
        .zip(want)
        .filter(|(g, w)| (**g == f64::NEG_INFINITY) != (**w == f64::NEG_INFINITY))
        .count();
    let empty = want.iter().filter(|w| **w == f64::NEG_INFINITY).count();
    let (g, w): (Vec<f64>, Vec<f64>) = got
        .iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(g, w)| (*g, *w))
        .unzip();
    let mut c = compare("lse", &g, &w, 5e-3);
    if g.iter().any(|x| !x.is_finite()) {
        c.pass = false;
    }
    if mismatched > 0 {
        c.pass = false;
        c.note = format!("{mismatched} rows disagree on -inf");
    } else if empty > 0 {
        c.note = format!("{empty} empty rows");
    }
    c
}

fn draw(rng: &mut Rng, shape: &[usize], gain: f64, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = rng.randn(n).into_iter().map(|x| x * gain).collect();
    Ok(Tensor::from_f64(shape.to_vec(), data)?.to_dtype(dtype))
}

/// A case's inputs (rounded to the input dtype), its mask and the f64 reference's outputs and
/// gradients computed from the rounded values.
pub struct Prepared {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    d_o: Tensor,
    mask: Option<BlockMask>,
    want: reference::AttnOutput,
    want_grads: reference::AttnGrads,
}

impl Prepared {
    /// Draws the mask and inputs of `case` from `seed` in `dtype` and runs the reference.
    pub fn new(case: &AttnCase, dtype: DType, seed: u64) -> Outcome<Prepared> {
        let mut rng = Rng::new(seed);
        let mask = case.block_mask(&mut rng)?;
        let q = draw(
            &mut rng,
            &[case.b, case.t, case.h, case.d],
            case.q_gain,
            dtype,
        )?;
        let k = draw(&mut rng, &[case.b, case.s, case.h, case.d], 1.0, dtype)?;
        let v = draw(&mut rng, &[case.b, case.s, case.h, case.d], 1.0, dtype)?;
        let d_o = draw(&mut rng, &[case.b, case.t, case.h, case.d], 1.0, dtype)?;
        let (qr, kr, vr, dor) = (
            q.to_f64_vec(),
            k.to_f64_vec(),
            v.to_f64_vec(),
            d_o.to_f64_vec(),
        );
        let problem = AttnProblem {
            dims: AttnDims {
                b: case.b,
                t: case.t,
                s: case.s,
                h: case.h,
                d: case.d,
            },
            q: &qr,
            k: &kr,
            v: &vr,
            scale: (case.d as f64).powf(-0.5),
            causal: case.causal,
            mask: mask.as_ref(),
        };
        let want = reference::forward(&problem);
        let want_grads = reference::backward(&problem, &dor);
        Ok(Prepared {
            q,
            k,
            v,
            d_o,
            mask,
            want,
            want_grads,
        })
    }
}

/// Runs forward and backward of `case` on `exec` and compares with the prepared reference.
pub fn check<E: Executor>(exec: &E, case: &AttnCase, prepared: &Prepared) -> Outcome<Vec<Check>> {
    let Prepared {
        q,
        k,
        v,
        d_o,
        mask,
        want,
        want_grads,
    } = prepared;
    let args = Attention {
        q,
        k,
        v,
        scale: None,
        causal: case.causal,
        mask: mask.as_ref(),
        value_check: crate::ValueCheck::On,
    };
    let spec = args.validate()?;
    ensure!(
        spec.scale == (case.d as f64).powf(-0.5),
        "the default scale is {}, the reference used D^-0.5",
        spec.scale
    );
    let (out, grads) = match case.mask {
        MaskKind::FullPlan | MaskKind::Dense => {
            let plan = if matches!(case.mask, MaskKind::Dense) {
                DeviceAttentionPlan::dense(case.t, case.s, case.block_q, case.block_k, case.causal)?
            } else {
                let plan = AttentionPlan::new(
                    None,
                    case.t,
                    case.s,
                    case.block_q,
                    case.block_k,
                    case.causal,
                )?;
                DeviceAttentionPlan::upload(exec, &plan)?
            };
            (
                forward_with_plan_on(exec, &spec, &args, &plan)?,
                backward_with_plan_on(exec, &spec, &args, d_o, &plan)?,
            )
        }
        _ => (
            forward_on(exec, &spec, &args)?,
            backward_on(exec, &spec, &args, d_o)?,
        ),
    };

    let o = out.o.to_f64_vec();
    let lse = out.lse.to_f64_vec();
    let mut checks = vec![
        compare("o", &o, &want.o, 4e-3),
        compare_lse(&lse, &want.lse),
    ];
    checks.push(compare("dq", &grads.dq.to_f64_vec(), &want_grads.dq, 5e-3));
    checks.push(compare("dk", &grads.dk.to_f64_vec(), &want_grads.dk, 5e-3));
    checks.push(compare("dv", &grads.dv.to_f64_vec(), &want_grads.dv, 5e-3));

    // Rows without any allowed key: exactly o = 0 and dq = 0 (no NaN, no leftovers).
    let (t, h, d) = (case.t, case.h, case.d);
    let dq = grads.dq.to_f64_vec();
    if o.len() != want.o.len() || dq.len() != want.o.len() || want.lse.len() != case.b * h * t {
        checks.push(Check::failed("empty-rows", "outputs of the wrong length"));
        return Ok(checks);
    }
    let mut bad_empty = 0;
    for bb in 0..case.b {
        for hh in 0..h {
            for i in 0..t {
                if want.lse[(bb * h + hh) * t + i] == f64::NEG_INFINITY {
                    let at = ((bb * t + i) * h + hh) * d;
                    if o[at..at + d]
                        .iter()
                        .chain(&dq[at..at + d])
                        .any(|&x| x != 0.0)
                    {
                        bad_empty += 1;
                    }
                }
            }
        }
    }
    if bad_empty > 0 {
        checks.push(Check {
            name: "empty-rows",
            rel: bad_empty as f64,
            max_abs: f64::NAN,
            threshold: 0.0,
            pass: false,
            note: format!("{bad_empty} empty rows with nonzero o or dq"),
        });
    }
    Ok(checks)
}

/// Runs every `(case, dtype)` on `exec` with inputs drawn from seed `seed_base + index`, one
/// [`Run`] each (printed as it ends with `print`); the references are prepared ahead on worker
/// threads.
pub fn run_cases<E: Executor>(
    exec: &E,
    suite: &'static str,
    runs: &[(AttnCase, DType)],
    seed_base: u64,
    print: bool,
) -> Vec<Run> {
    super::run_pipelined(
        suite,
        runs,
        print,
        |(case, dtype)| case.label(*dtype),
        |i, (case, dtype)| Prepared::new(case, *dtype, seed_base + i as u64),
        |(case, _), prepared| check(exec, case, &prepared),
    )
}

/// The GPU groups of the attention suite (`tests/cuda_attention.rs` asserts each one; `linattn
/// validate --device cuda --full` tabulates them all): the emulated matrix plus T = S = 1000
/// everywhere and the Radial masks of 8 frames x 256 tokens, through the host path on a
/// `CudaExec` and the device-slice API.
pub mod gpu {
    use std::sync::Arc;

    use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
    use half::bf16;

    use super::{AttnCase, MaskKind, radial_config, run_cases};
    use crate::attention::cuda::device::{
        self, CudaTensor, DeviceForwardState, DeviceGrads, DeviceTensorMut,
    };
    use crate::attention::plan::AttentionPlan;
    use crate::attention::{self, Attention, AttnDims, RadialModel};
    use crate::cuda::CudaContext;
    use crate::cuda::exec::{CudaExec, Executor};
    use crate::reference::testing::Rng;
    use crate::suites::{Check, Failure, Outcome, Run, compare, compare_tensors, ensure};
    use crate::{Backend, DType, Error, Tensor, ValueCheck};

    const BLOCKS: [(usize, usize); 4] = [(64, 64), (64, 128), (128, 64), (128, 128)];
    const DTYPES: [DType; 2] = [DType::BF16, DType::F16];

    /// Every block shape, head dim and causal flag over six sequence-length pairs (up to T = S =
    /// 1000), through the computed dense lists and an uploaded all-blocks plan.
    pub fn dense_and_full_plan<E: Executor>(exec: &E, print: bool) -> Vec<Run> {
        let mut runs = Vec::new();
        for d in [64, 128] {
            for (t, s) in [
                (64, 64),
                (200, 256),
                (256, 200),
                (256, 256),
                (1000, 1000),
                (1000, 200),
            ] {
                for block in BLOCKS {
                    for causal in [false, true] {
                        for (i, mask) in [MaskKind::Dense, MaskKind::FullPlan]
                            .into_iter()
                            .enumerate()
                        {
                            let case = AttnCase::new(t, s, d, block, causal, mask);
                            runs.push((case, DTYPES[(i + runs.len()) % 2]));
                        }
                    }
                }
            }
        }
        run_cases(exec, "attention-dense", &runs, 7000, print)
    }

    /// Random block masks (density 0.5) with the diagonal forced on, off, and a cleared row.
    pub fn random_masks<E: Executor>(exec: &E, print: bool) -> Vec<Run> {
        let mut runs = Vec::new();
        for d in [64, 128] {
            for (t, s) in [(200, 256), (256, 200), (1000, 1000)] {
                for block in BLOCKS {
                    for causal in [false, true] {
                        for (diagonal, empty_row) in [(true, false), (false, false), (true, true)] {
                            let mask = MaskKind::Random {
                                density: 0.5,
                                diagonal,
                                empty_row,
                            };
                            let dtype = DTYPES[runs.len() % 2];
                            runs.push((AttnCase::new(t, s, d, block, causal, mask), dtype));
                        }
                    }
                }
            }
        }
        run_cases(exec, "attention-random", &runs, 7000, print)
    }

    /// The small Radial masks of the emulated suite and 8 frames x 256 tokens (T = 2048) under
    /// every rule, blocks of 64 and 128.
    pub fn radial_masks<E: Executor>(exec: &E, print: bool) -> Vec<Run> {
        let mut configs = vec![
            radial_config(RadialModel::Paper, 5, 48, 64, 1.0),
            radial_config(RadialModel::Wan, 4, 64, 64, 1.0),
            radial_config(RadialModel::Hunyuan, 4, 128, 128, 0.95),
        ];
        for block in [64, 128] {
            configs.push(radial_config(RadialModel::Paper, 8, 256, block, 1.0));
            configs.push(radial_config(RadialModel::Wan, 8, 256, block, 1.0));
            configs.push(radial_config(RadialModel::Hunyuan, 8, 256, block, 0.95));
        }
        let mut runs = Vec::new();
        for cfg in configs {
            for d in [64, 128] {
                for causal in [false, true] {
                    let dtype = DTYPES[runs.len() % 2];
                    runs.push((AttnCase::radial(cfg, d, causal), dtype));
                }
            }
        }
        run_cases(exec, "attention-radial", &runs, 7000, print)
    }

    /// Batch and head strides, a sharp softmax (q x 4) and the host API's default dense mode.
    pub fn strides_sharp_softmax_and_host_api<E: Executor>(exec: &E, print: bool) -> Vec<Run> {
        let random = MaskKind::Random {
            density: 0.4,
            diagonal: true,
            empty_row: true,
        };
        let runs = vec![
            (
                AttnCase::new(1000, 777, 64, (64, 128), false, random.clone())
                    .with_batch_heads(2, 3),
                DType::BF16,
            ),
            (
                AttnCase::new(513, 1000, 128, (128, 64), true, MaskKind::Dense)
                    .with_batch_heads(3, 2),
                DType::F16,
            ),
            (
                AttnCase::new(1000, 1000, 64, (64, 64), true, MaskKind::HostDense).with_q_gain(4.0),
                DType::BF16,
            ),
            (
                AttnCase::new(1000, 1000, 128, (128, 128), false, random).with_q_gain(4.0),
                DType::F16,
            ),
        ];
        run_cases(exec, "attention-strides", &runs, 7000, print)
    }

    /// Every GPU group of the attention suite, in order.
    pub fn all(ctx: &CudaContext, print: bool) -> Vec<Run> {
        let exec = CudaExec::new(ctx);
        let mut runs = dense_and_full_plan(&exec, print);
        runs.extend(random_masks(&exec, print));
        runs.extend(radial_masks(&exec, print));
        runs.extend(strides_sharp_softmax_and_host_api(&exec, print));
        for run in [backend_entry_points_and_errors(ctx), device_slice_api(ctx)] {
            if print {
                println!("{}", run.line());
            }
            runs.push(run);
        }
        runs
    }

    fn mk(rng: &mut Rng, shape: &[usize], dtype: DType) -> crate::Result<Tensor> {
        let n: usize = shape.iter().product();
        Ok(Tensor::from_f64(shape.to_vec(), rng.randn(n))?.to_dtype(dtype))
    }

    /// `attention::forward` / `backward` on `Backend::Cuda` agree with the CPU and reject
    /// unsupported dtypes and head dims with typed errors.
    pub fn backend_entry_points_and_errors(ctx: &CudaContext) -> Run {
        Run::time(
            "attention",
            "backend entry points and typed errors".into(),
            || {
                let backend = Backend::Cuda(ctx.clone());
                let mut rng = Rng::new(3);
                let shape = [1, 300, 2, 64];
                let (q, k, v) = (
                    mk(&mut rng, &shape, DType::BF16)?,
                    mk(&mut rng, &shape, DType::BF16)?,
                    mk(&mut rng, &shape, DType::BF16)?,
                );
                let args = Attention::dense(&q, &k, &v).with_causal(true);
                let gpu = attention::forward(&backend, &args)?;
                let cpu = attention::forward(&Backend::Cpu, &args)?;
                let d_o = mk(&mut rng, &shape, DType::BF16)?;
                let g = attention::backward(&backend, &args, &d_o)?;
                let c = attention::backward(&Backend::Cpu, &args, &d_o)?;

                let (q32, k32, v32) = (
                    q.to_dtype(DType::F32),
                    k.to_dtype(DType::F32),
                    v.to_dtype(DType::F32),
                );
                let f32_input = attention::forward(&backend, &Attention::dense(&q32, &k32, &v32));
                ensure!(
                    matches!(f32_input, Err(Error::UnsupportedDtype { .. })),
                    "f32 inputs: {:?}",
                    f32_input.err()
                );
                let q96 = mk(&mut rng, &[1, 10, 1, 96], DType::BF16)?;
                let d96 = attention::forward(&backend, &Attention::dense(&q96, &q96, &q96));
                ensure!(
                    matches!(d96, Err(Error::UnsupportedHeadDim { .. })),
                    "D = 96: {:?}",
                    d96.err()
                );
                Ok(vec![
                    compare_tensors("o", &gpu.o, &cpu.o, 4e-3),
                    compare_tensors("dq", &g.dq, &c.dq, 5e-3),
                    compare_tensors("dk", &g.dk, &c.dk, 5e-3),
                    compare_tensors("dv", &g.dv, &c.dv, 5e-3),
                ])
            },
        )
    }

    fn upload_bf16(stream: &Arc<CudaStream>, t: &Tensor) -> Outcome<CudaSlice<bf16>> {
        let data: Vec<bf16> = t.to_f64_vec().iter().map(|&x| bf16::from_f64(x)).collect();
        Ok(stream.clone_htod(&data)?)
    }

    fn download<T: DeviceRepr + Copy + Into<f64>>(
        stream: &Arc<CudaStream>,
        s: &CudaSlice<T>,
    ) -> Outcome<Vec<f64>> {
        Ok(stream.clone_dtoh(s)?.into_iter().map(Into::into).collect())
    }

    fn bf16_vec(stream: &Arc<CudaStream>, s: &CudaSlice<bf16>) -> Outcome<Vec<f64>> {
        Ok(stream
            .clone_dtoh(s)?
            .into_iter()
            .map(|x| x.to_f64())
            .collect())
    }

    /// The device-slice API: an uploaded Radial plan reused across calls, bf16 outputs (o and the
    /// gradients) and the dense FlashAttention entry points, against the host path; a plan for
    /// other lengths and a NaN in `v` are typed errors.
    pub fn device_slice_api(ctx: &CudaContext) -> Run {
        Run::time(
            "attention",
            "device-slice API (bf16 outputs)".into(),
            || {
                let stream = ctx.stream().clone();
                let cfg = radial_config(RadialModel::Hunyuan, 8, 256, 128, 0.95);
                let mask = attention::radial_mask(&cfg)?;
                let (b, t, h, d) = (1, cfg.total_tokens(), 2, 128);
                let dims = AttnDims { b, t, s: t, h, d };
                let mut rng = Rng::new(11);
                let shape = [b, t, h, d];
                let (q, k, v, d_o) = (
                    mk(&mut rng, &shape, DType::BF16)?,
                    mk(&mut rng, &shape, DType::BF16)?,
                    mk(&mut rng, &shape, DType::BF16)?,
                    mk(&mut rng, &shape, DType::BF16)?,
                );
                let (q_dev, k_dev, v_dev) = (
                    upload_bf16(&stream, &q)?,
                    upload_bf16(&stream, &k)?,
                    upload_bf16(&stream, &v)?,
                );
                let do_dev = upload_bf16(&stream, &d_o)?;
                let (qt, kt, vt, do_t) = (
                    CudaTensor::new(&q_dev, shape.to_vec())?,
                    CudaTensor::new(&k_dev, shape.to_vec())?,
                    CudaTensor::new(&v_dev, shape.to_vec())?,
                    CudaTensor::new(&do_dev, shape.to_vec())?,
                );
                // The host API's builder over device tensors; the value check is on by default.
                let problem = Attention::dense(&qt, &kt, &vt);
                let lse_shape = vec![b, h, t];
                let mut checks: Vec<Check> = Vec::new();
                for masked in [true, false] {
                    let host_args = Attention {
                        q: &q,
                        k: &k,
                        v: &v,
                        scale: None,
                        causal: false,
                        mask: masked.then_some(&mask),
                        value_check: ValueCheck::On,
                    };
                    let cuda = Backend::Cuda(ctx.clone());
                    let want = attention::forward(&cuda, &host_args)?;
                    let want_g = attention::backward(&cuda, &host_args, &d_o)?;
                    let mut o = stream.alloc_zeros::<bf16>(dims.q_len())?;
                    let mut lse = stream.alloc_zeros::<f32>(dims.lse_len())?;
                    let mut gq = stream.alloc_zeros::<bf16>(dims.q_len())?;
                    let mut gk = stream.alloc_zeros::<bf16>(dims.kv_len())?;
                    let mut gv = stream.alloc_zeros::<bf16>(dims.kv_len())?;
                    if masked {
                        let plan = AttentionPlan::new(Some(&mask), t, t, 128, 128, false)?;
                        let plan = device::upload_plan(ctx, &stream, &plan)?;
                        let problem = problem.with_mask(&mask);
                        // The same plan serves repeated calls.
                        for _ in 0..2 {
                            device::forward(
                                ctx,
                                &stream,
                                &plan,
                                &problem,
                                DeviceTensorMut::BF16(o.as_view_mut()),
                                lse.as_view_mut(),
                            )?;
                        }
                        device::backward(
                            ctx,
                            &stream,
                            &plan,
                            &problem,
                            DeviceForwardState {
                                o: &CudaTensor::new(&o, shape.to_vec())?,
                                lse: &CudaTensor::new(&lse, lse_shape.clone())?,
                                d_o: &do_t,
                            },
                            DeviceGrads {
                                dq: DeviceTensorMut::BF16(gq.as_view_mut()),
                                dk: DeviceTensorMut::BF16(gk.as_view_mut()),
                                dv: DeviceTensorMut::BF16(gv.as_view_mut()),
                            },
                        )?;
                    } else {
                        device::flash_attention_dense_forward(
                            ctx,
                            &stream,
                            &problem,
                            DeviceTensorMut::BF16(o.as_view_mut()),
                            lse.as_view_mut(),
                        )?;
                        device::flash_attention_dense_backward(
                            ctx,
                            &stream,
                            &problem,
                            DeviceForwardState {
                                o: &CudaTensor::new(&o, shape.to_vec())?,
                                lse: &CudaTensor::new(&lse, lse_shape.clone())?,
                                d_o: &do_t,
                            },
                            DeviceGrads {
                                dq: DeviceTensorMut::BF16(gq.as_view_mut()),
                                dk: DeviceTensorMut::BF16(gk.as_view_mut()),
                                dv: DeviceTensorMut::BF16(gv.as_view_mut()),
                            },
                        )?;
                    }
                    // bf16 outputs: one more rounding than the f32 host path.
                    let names: [&'static str; 5] = if masked {
                        [
                            "o (plan)",
                            "lse (plan)",
                            "dq (plan)",
                            "dk (plan)",
                            "dv (plan)",
                        ]
                    } else {
                        [
                            "o (dense)",
                            "lse (dense)",
                            "dq (dense)",
                            "dk (dense)",
                            "dv (dense)",
                        ]
                    };
                    checks.push(compare(
                        names[0],
                        &bf16_vec(&stream, &o)?,
                        &want.o.to_f64_vec(),
                        4e-3,
                    ));
                    checks.push(compare(
                        names[1],
                        &download(&stream, &lse)?,
                        &want.lse.to_f64_vec(),
                        1e-6,
                    ));
                    for (name, got, w) in [
                        (names[2], &gq, &want_g.dq),
                        (names[3], &gk, &want_g.dk),
                        (names[4], &gv, &want_g.dv),
                    ] {
                        checks.push(compare(
                            name,
                            &bf16_vec(&stream, got)?,
                            &w.to_f64_vec(),
                            5e-3,
                        ));
                    }
                }

                // A plan for other sequence lengths is rejected.
                let other = AttentionPlan::new(None, 64, 64, 64, 64, false)?;
                let other = device::upload_plan(ctx, &stream, &other)?;
                let mut o = stream.alloc_zeros::<f32>(dims.q_len())?;
                let mut lse = stream.alloc_zeros::<f32>(dims.lse_len())?;
                let r = device::forward(
                    ctx,
                    &stream,
                    &other,
                    &problem,
                    DeviceTensorMut::F32(o.as_view_mut()),
                    lse.as_view_mut(),
                );
                ensure!(
                    matches!(r, Err(Error::InvalidArgument(_))),
                    "a plan for 64 x 64 tokens on T = {t}: {:?}",
                    r.err()
                );
                // A NaN in v is the host API's error (the value check is on by default).
                let mut v_bad: Vec<bf16> = stream.clone_dtoh(&v_dev)?;
                v_bad[7] = bf16::NAN;
                let v_bad = stream.clone_htod(&v_bad)?;
                let plan = device::upload_plan(
                    ctx,
                    &stream,
                    &AttentionPlan::new(None, dims.t, dims.s, 64, 64, false)?,
                )?;
                let v_bad = CudaTensor::new(&v_bad, shape.to_vec())?;
                let bad = Attention {
                    v: &v_bad,
                    ..problem
                };
                match device::forward(
                    ctx,
                    &stream,
                    &plan,
                    &bad,
                    DeviceTensorMut::F32(o.as_view_mut()),
                    lse.as_view_mut(),
                ) {
                    Err(Error::NonFinite {
                        tensor, index: 7, ..
                    }) if tensor == "v" => {}
                    other => {
                        return Err(Failure(format!(
                            "a NaN at v[7]: expected NonFinite, got {:?}",
                            other.err()
                        )));
                    }
                }
                Ok(checks)
            },
        )
    }
}
