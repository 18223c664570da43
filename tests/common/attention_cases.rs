//! The shape/mask matrix of the CUDA attention tests, shared by the GPU suite
//! (tests/cuda_attention.rs) and the host-emulation suite (tests/cuda_attention_emulated.rs):
//! inputs drawn in f64 and rounded to the input dtype, the f64 reference computed from the rounded
//! values, results compared under the ops.md thresholds (o <= 4e-3, lse / dq / dk / dv <= 5e-3
//! relative RMS; rows without an allowed key must give exactly o = 0, lse = -inf and zero dq).
#![allow(dead_code)]

use linattn::attention::cuda::{
    DeviceAttentionPlan, backward_on, backward_with_plan_on, forward_on, forward_with_plan_on,
};
use linattn::attention::plan::AttentionPlan;
use linattn::attention::{Attention, BlockMask, RadialConfig, RadialModel, radial_mask};
use linattn::cuda::exec::Executor;
use linattn::reference::attention::{self as reference, AttnDims, AttnProblem};
use linattn::reference::testing::Rng;
use linattn::reference::{max_abs_diff, rel_rms};
use linattn::{DType, Result, Tensor};

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
    pub fn block_mask(&self, rng: &mut Rng) -> Option<BlockMask> {
        let (nq, nk) = BlockMask::grid(self.t, self.s, self.block_q, self.block_k).unwrap();
        match &self.mask {
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
                Some(BlockMask::from_dense(nq, nk, self.block_q, self.block_k, &dense).unwrap())
            }
            MaskKind::Radial(cfg) => Some(radial_mask(cfg).expect("radial mask")),
        }
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

/// One compared tensor.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    pub rel: f64,
    pub max_abs: f64,
    pub threshold: f64,
    pub pass: bool,
    pub note: String,
}

pub fn summary(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "{}={:.2e}{}{}",
                c.name,
                c.rel,
                if c.pass { "" } else { "(FAIL)" },
                if c.note.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", c.note)
                }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn compare(name: &'static str, got: &[f64], want: &[f64], threshold: f64) -> Check {
    let max_abs = max_abs_diff(got, want);
    let rel = rel_rms(got, want);
    let pass = !max_abs.is_nan() && (max_abs <= 1e-6 || rel <= threshold);
    Check {
        name,
        rel,
        max_abs,
        threshold,
        pass,
        note: String::new(),
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

fn draw(rng: &mut Rng, shape: &[usize], gain: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = rng.randn(n).into_iter().map(|x| x * gain).collect();
    Tensor::from_f64(shape.to_vec(), data)
        .expect("shape")
        .to_dtype(dtype)
}

/// Runs forward and backward of `case` on `exec` and compares with the f64 reference.
pub fn run_case<E: Executor>(
    exec: &E,
    case: &AttnCase,
    dtype: DType,
    seed: u64,
) -> Result<Vec<Check>> {
    let mut rng = Rng::new(seed);
    let mask = case.block_mask(&mut rng);
    let q = draw(
        &mut rng,
        &[case.b, case.t, case.h, case.d],
        case.q_gain,
        dtype,
    );
    let k = draw(&mut rng, &[case.b, case.s, case.h, case.d], 1.0, dtype);
    let v = draw(&mut rng, &[case.b, case.s, case.h, case.d], 1.0, dtype);
    let d_o = draw(&mut rng, &[case.b, case.t, case.h, case.d], 1.0, dtype);
    let args = Attention {
        q: &q,
        k: &k,
        v: &v,
        scale: None,
        causal: case.causal,
        mask: mask.as_ref(),
    };
    let spec = args.validate()?;
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
                backward_with_plan_on(exec, &spec, &args, &d_o, &plan)?,
            )
        }
        _ => (
            forward_on(exec, &spec, &args)?,
            backward_on(exec, &spec, &args, &d_o)?,
        ),
    };

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
        scale: spec.scale,
        causal: case.causal,
        mask: mask.as_ref(),
    };
    let want = reference::forward(&problem);
    let want_grads = reference::backward(&problem, &dor);

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

/// Runs one case and prints a line; returns whether it passed.
pub fn run_and_report<E: Executor>(exec: &E, case: &AttnCase, dtype: DType, seed: u64) -> bool {
    let started = std::time::Instant::now();
    match run_case(exec, case, dtype, seed) {
        Ok(c) => {
            let pass = c.iter().all(|c| c.pass);
            println!(
                "{} {} ({:.1} s): {}",
                if pass { "ok  " } else { "FAIL" },
                case.label(dtype),
                started.elapsed().as_secs_f64(),
                summary(&c)
            );
            pass
        }
        Err(e) => {
            println!("FAIL {}: error {e}", case.label(dtype));
            false
        }
    }
}

/// Runs cases and reports every failure at the end.
pub fn run_all<E: Executor>(exec: &E, runs: &[(AttnCase, DType)]) {
    let mut failed = Vec::new();
    for (i, (case, dtype)) in runs.iter().enumerate() {
        if !run_and_report(exec, case, *dtype, 7000 + i as u64) {
            failed.push(case.label(*dtype));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed:\n{}",
        failed.len(),
        runs.len(),
        failed.join("\n")
    );
}
