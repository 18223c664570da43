//! `linattn validate`: the equivalence matrix. For every op x form x available backend it draws
//! random inputs from a fixed (printed) seed, compares outputs and gradients with the f64 reference,
//! and prints one row each. Exits non-zero on any failure.

mod attention;
mod lightnet;
mod linear;
mod optim;

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use linattn_reference::testing::Rng;

use crate::backend::{Backend, BackendKind, DeviceRequest};
use crate::error::Result;
use crate::tensor::DType;

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// auto (every backend available here), cpu, cube or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A small matrix that finishes in under a minute on 2 CPU cores.
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// The full matrix and, on the cuda backend, every GPU test suite (`tests/cuda_*.rs`: the engine
    /// in every gate kind, direction, dtype and form, varlen, h0/ht, the decode step, the
    /// device-slice APIs; attention with dense, causal, random and Radial masks, D 64/128, blocks
    /// 64/128; the optimizer in every mode), with the tests' case lists and limits.
    #[arg(long)]
    pub full: bool,
    /// Only the ops whose name starts with one of these (comma separated, e.g. `gla,attention`);
    /// the GPU suites are kept when their group name matches too (`engine`, `attention`, `optim`,
    /// `lightnet`).
    #[arg(long, value_delimiter = ',')]
    pub ops: Vec<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 20_261_127)]
    pub seed: u64,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub op: String,
    pub form: String,
    pub backend: BackendKind,
    pub dtype: DType,
    pub shape: String,
    /// Largest relative RMS error over every output and gradient.
    pub max_rel_err: f64,
    /// Name of the tensor with the largest error.
    pub worst: String,
    pub threshold: f64,
    pub pass: bool,
    /// Set when the case could not run (e.g. a form the backend does not offer): the reason.
    pub error: Option<String>,
}

/// Compares named results against the reference with the project's pass rule (ops.md) and folds
/// them into one row's error and verdict. The row reports the tensor closest to (or furthest past)
/// its threshold, with that threshold.
#[derive(Default)]
pub(crate) struct Comparison {
    max_rel_err: f64,
    worst: String,
    worst_threshold: f64,
    /// `error / threshold` of the worst tensor (NaN sticks: it is the worst possible result).
    worst_ratio: f64,
    failed: bool,
    count: usize,
}

impl Comparison {
    pub(crate) fn add(&mut self, name: &str, got: &[f64], reference: &[f64], threshold: f64) {
        let rel = linattn_reference::rel_rms(got, reference);
        self.failed |= !linattn_reference::within_tolerance(got, reference, threshold);
        self.count += 1;
        let ratio = rel / threshold;
        let worse = ratio.is_nan() || (!self.worst_ratio.is_nan() && ratio > self.worst_ratio);
        if self.worst.is_empty() || worse {
            self.max_rel_err = rel;
            self.worst = name.to_string();
            self.worst_threshold = threshold;
            self.worst_ratio = ratio;
        }
    }

    /// Passes when at least one tensor was compared and none failed.
    pub(crate) fn pass(&self) -> bool {
        self.count > 0 && !self.failed
    }

    /// Fills the result fields of `row`.
    pub(crate) fn fill(&self, row: &mut Row) {
        row.pass = self.pass();
        row.max_rel_err = self.max_rel_err;
        row.worst = self.worst.clone();
        row.threshold = self.worst_threshold;
    }
}

/// Backends the run covers.
fn backends(request: &str) -> Result<Vec<std::result::Result<Backend, (BackendKind, String)>>> {
    let request: DeviceRequest = request.parse()?;
    Ok(match request {
        DeviceRequest::Auto => [BackendKind::Cpu, BackendKind::Cube, BackendKind::Cuda]
            .into_iter()
            .map(|kind| Backend::of_kind(kind).map_err(|e| (kind, e.to_string())))
            .collect(),
        explicit => vec![Ok(Backend::new(explicit)?)],
    })
}

pub fn execute(args: &ValidateArgs) -> Result<ExitCode> {
    let started = Instant::now();
    println!(
        "linattn validate: seed {} ({}), device {}",
        args.seed,
        if args.quick {
            "quick"
        } else if args.full {
            "full, with the GPU test suites"
        } else {
            "full matrix"
        },
        args.device
    );
    let keep =
        |op: &str| args.ops.is_empty() || args.ops.iter().any(|p| op.starts_with(p.as_str()));
    let mut rows = Vec::new();
    let mut suite_runs = Vec::new();
    for backend in backends(&args.device)? {
        let backend = match backend {
            Ok(b) => b,
            Err((kind, why)) => {
                println!("skipped: {kind}: {why}");
                continue;
            }
        };
        println!("backend: {}", backend.description());
        #[cfg(feature = "cuda")]
        if let (true, Backend::Cuda(ctx)) = (args.full, &backend) {
            // The full run launches nearly every variant: compile them on all cores first.
            let t0 = Instant::now();
            let (n, threads) = crate::cuda::warm_up_kernels(ctx)?;
            println!(
                "compiled {n} kernel variants for {} in {:.1} s on {threads} threads",
                ctx.arch(),
                t0.elapsed().as_secs_f64()
            );
        }
        let mut rng = Rng::new(args.seed);
        rows.extend(linear::rows(&backend, args.quick, &keep, &mut rng));
        rows.extend(attention::rows(&backend, args.quick, &keep, &mut rng));
        rows.extend(optim::rows(&backend, args.quick, &keep, &mut rng));
        rows.extend(lightnet::rows(&backend, args.quick, &keep, &mut rng));
        if args.full {
            suite_runs.extend(gpu_suites(&backend, &keep));
        }
    }
    print_table(&rows);
    if !suite_runs.is_empty() {
        println!();
        print_suite_table(&suite_runs);
    }
    let failed =
        rows.iter().filter(|r| !r.pass).count() + suite_runs.iter().filter(|r| !r.pass()).count();
    let total = rows.len() + suite_runs.len();
    println!(
        "{total} rows, {} passed, {failed} failed, {:.1} s",
        total - failed,
        started.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 && total > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The GPU test suites of `backend` (only cuda has them), printing each run as it ends so that a
/// long run shows its progress; the groups whose name `keep` accepts.
fn gpu_suites(backend: &Backend, keep: &dyn Fn(&str) -> bool) -> Vec<crate::suites::Run> {
    match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => {
            use crate::suites;
            println!("GPU test suites on {}:", ctx.device_name());
            let mut runs = Vec::new();
            if keep("engine") || keep("lightnet") {
                runs.extend(suites::linear::gpu::all(ctx, true));
            }
            if keep("attention") {
                runs.extend(suites::attention::gpu::all(ctx, true));
            }
            if keep("optim") {
                runs.extend(suites::optim::gpu::all(ctx, true));
            }
            runs
        }
        other => {
            let _ = keep;
            println!(
                "suites: the GPU test suites run on the cuda backend only, not on {}",
                other.kind()
            );
            Vec::new()
        }
    }
}

/// The suite runs as a table: one row per run, its worst tensor (by error over limit).
fn print_suite_table(runs: &[crate::suites::Run]) {
    println!("| suite | case | worst (tensor) | threshold | seconds | result |");
    println!("|---|---|---|---|---:|---|");
    for run in runs {
        let (worst, threshold, result) = match &run.outcome {
            Ok(checks) => {
                let worst = checks.iter().max_by(|a, b| {
                    let ratio = |c: &crate::suites::Check| {
                        if c.rel.is_nan() {
                            f64::INFINITY
                        } else {
                            c.rel / c.threshold.max(f64::MIN_POSITIVE)
                        }
                    };
                    ratio(a).total_cmp(&ratio(b))
                });
                match worst {
                    Some(c) => (
                        format!("{:.2e} ({})", c.rel, c.name),
                        format!("{:.0e}", c.threshold),
                        if run.pass() {
                            "pass".to_string()
                        } else {
                            format!("FAIL: {}", crate::suites::summary(checks))
                        },
                    ),
                    None => ("-".into(), "-".into(), "FAIL: no checks".into()),
                }
            }
            Err(e) => ("-".into(), "-".into(), format!("FAIL: {e}")),
        };
        println!(
            "| {} | {} | {worst} | {threshold} | {:.1} | {result} |",
            run.suite, run.label, run.seconds
        );
    }
}

fn print_table(rows: &[Row]) {
    let header = [
        "op",
        "form",
        "backend",
        "dtype",
        "shape",
        "max rel err",
        "threshold",
        "result",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.op.clone(),
                r.form.clone(),
                r.backend.to_string(),
                r.dtype.to_string(),
                r.shape.clone(),
                match &r.error {
                    Some(_) => "-".to_string(),
                    None => format!("{:.2e} ({})", r.max_rel_err, r.worst),
                },
                format!("{:.0e}", r.threshold),
                match (&r.error, r.pass) {
                    (Some(e), true) => e.clone(),
                    (Some(e), false) => format!("FAIL: {e}"),
                    (None, true) => "pass".to_string(),
                    (None, false) => "FAIL".to_string(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: &[String]| {
        let padded: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(&header.map(String::from));
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in &cells {
        line(row);
    }
}
