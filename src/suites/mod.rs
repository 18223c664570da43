//! The GPU check matrices as library code: case lists, input draws and runners that compare every
//! output and gradient with the f64 reference under the ops.md limits.
//!
//! Two callers share them, so they cannot drift apart:
//! - the cargo test suites (`tests/cuda_linear.rs`, `tests/cuda_attention.rs`, `tests/cuda_optim.rs`
//!   on a GPU; their `*_emulated.rs` twins on the host emulation of the CUDA kernels), which assert
//!   that every run passes;
//! - `linattn validate --device cuda --full`, which prints one table row per run. It is how the
//!   GPU machine checks the kernels, since cargo test binaries are not carried there
//!   (`scripts/gpu-bundle.sh`, `scripts/gpu-run.sh`).
//!
//! Nothing here panics on a failed comparison or a kernel error: every runner returns its checks,
//! or a [`Failure`] that says what went wrong.

pub mod linear;

#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod optim;

use std::fmt;

/// Why a suite run failed: a comparison past its limit, an unexpected state, or a library error.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        Failure(e.to_string())
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(s)
    }
}

#[cfg(feature = "cuda")]
impl From<cudarc::driver::DriverError> for Failure {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Failure(format!("CUDA driver: {e}"))
    }
}

/// The result of a suite function.
pub type Outcome<T> = std::result::Result<T, Failure>;

/// Fails the enclosing suite function with a formatted message unless `cond` holds.
#[cfg_attr(not(feature = "cuda"), allow(unused_macros))]
macro_rules! ensure {
    // `match` rather than `if !cond`: conditions are often float comparisons, where a negated
    // comparison reads wrong for NaN (a NaN error must fail the check, and it does here).
    ($cond:expr, $($fmt:tt)+) => {
        match $cond {
            true => {}
            false => return Err($crate::suites::Failure(format!($($fmt)+))),
        }
    };
    ($cond:expr) => {
        match $cond {
            true => {}
            false => {
                return Err($crate::suites::Failure(format!(
                    "check failed: {}",
                    stringify!($cond)
                )))
            }
        }
    };
}

/// Fails the enclosing suite function unless the two values are equal, showing both.
#[cfg_attr(not(feature = "cuda"), allow(unused_macros))]
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(,)?) => {
        ensure_eq!($left, $right, "{}", "")
    };
    ($left:expr, $right:expr, $($fmt:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err($crate::suites::Failure(format!(
                "{} != {}: {:?} vs {:?} {}",
                stringify!($left),
                stringify!($right),
                left,
                right,
                format!($($fmt)+)
            )));
        }
    }};
}

#[allow(unused_imports)]
pub(crate) use {ensure, ensure_eq};

/// One compared tensor of a run.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: &'static str,
    /// Relative RMS error against the reference.
    pub rel: f64,
    pub max_abs: f64,
    pub threshold: f64,
    pub pass: bool,
    /// What else the check found (empty rows, disagreeing -inf rows).
    pub note: String,
}

impl Check {
    /// A check that failed without a number (a missing output, mismatched lengths).
    pub fn failed(name: &'static str, note: impl Into<String>) -> Check {
        Check {
            name,
            rel: f64::NAN,
            max_abs: f64::NAN,
            threshold: 0.0,
            pass: false,
            note: note.into(),
        }
    }
}

/// Compares `got` with the reference `want` under the ops.md rule: pass when the largest absolute
/// error is at most 1e-6 or the relative RMS error at most `threshold`; NaN never passes; a length
/// mismatch is a failed check, not a panic.
pub fn compare(name: &'static str, got: &[f64], want: &[f64], threshold: f64) -> Check {
    if got.len() != want.len() {
        return Check::failed(
            name,
            format!("{} values, the reference has {}", got.len(), want.len()),
        );
    }
    let max_abs = crate::reference::max_abs_diff(got, want);
    let rel = crate::reference::rel_rms(got, want);
    Check {
        name,
        rel,
        max_abs,
        threshold,
        pass: !max_abs.is_nan() && (max_abs <= 1e-6 || rel <= threshold),
        note: String::new(),
    }
}

/// [`compare`] of two tensors (any dtype, read as f64).
pub fn compare_tensors(
    name: &'static str,
    got: &crate::Tensor,
    want: &crate::Tensor,
    threshold: f64,
) -> Check {
    compare(name, &got.to_f64_vec(), &want.to_f64_vec(), threshold)
}

/// `name=err` for every check, failures marked.
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

/// One run of a suite, as the test suites print it and `validate` tabulates it.
#[derive(Clone, Debug)]
pub struct Run {
    /// The group of cases (e.g. `engine`, `attention-radial`, `optim`).
    pub suite: &'static str,
    /// The case, its dtype and form.
    pub label: String,
    pub outcome: Outcome<Vec<Check>>,
    pub seconds: f64,
}

impl Run {
    /// Times `f` and records its result.
    pub fn time(
        suite: &'static str,
        label: String,
        f: impl FnOnce() -> Outcome<Vec<Check>>,
    ) -> Run {
        let started = std::time::Instant::now();
        let outcome = f();
        Run {
            suite,
            label,
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// A run with one scalar result (the worst relative error of a trajectory), already checked
    /// against `threshold` by the suite function.
    pub fn scalar(
        suite: &'static str,
        label: impl Into<String>,
        threshold: f64,
        f: impl FnOnce() -> Outcome<f64>,
    ) -> Run {
        Run::time(suite, label.into(), || {
            let rel = f()?;
            Ok(vec![Check {
                name: "worst",
                rel,
                max_abs: f64::NAN,
                threshold,
                pass: rel <= threshold,
                note: String::new(),
            }])
        })
    }

    /// A run that checks exact properties (bitwise states, skip counters) and has no error number.
    pub fn exact(
        suite: &'static str,
        label: impl Into<String>,
        f: impl FnOnce() -> Outcome<()>,
    ) -> Run {
        Run::time(suite, label.into(), || {
            f()?;
            Ok(vec![Check {
                name: "exact",
                rel: 0.0,
                max_abs: 0.0,
                threshold: 0.0,
                pass: true,
                note: String::new(),
            }])
        })
    }

    pub fn pass(&self) -> bool {
        matches!(&self.outcome, Ok(checks) if !checks.is_empty() && checks.iter().all(|c| c.pass))
    }

    /// The line the test suites print.
    pub fn line(&self) -> String {
        match &self.outcome {
            Ok(checks) => format!(
                "{} {} ({:.1} s): {}",
                if self.pass() { "ok  " } else { "FAIL" },
                self.label,
                self.seconds,
                summary(checks)
            ),
            Err(e) => format!("FAIL {}: {e}", self.label),
        }
    }
}

/// `Ok` when every run passed, else the list of failures: the test suites' verdict
/// (`verdict(&runs).unwrap()`).
pub fn verdict(runs: &[Run]) -> Outcome<()> {
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.pass())
        .map(|r| r.label.as_str())
        .collect();
    if failed.is_empty() && !runs.is_empty() {
        Ok(())
    } else {
        Err(Failure(format!(
            "{} of {} failed:\n{}",
            failed.len(),
            runs.len(),
            failed.join("\n")
        )))
    }
}

/// The optimizer configurations the framework adapters' tests step through against the reference
/// (one list for linattn-burn's and linattn-candle's): AdamW (lr 3e-2) and Lion (lr 3e-3) with
/// weight decay 0.1 in each decay mode (decoupled, fully decoupled, cautious), and AdamW with
/// global-norm clipping (0.05) and an EMA (0.9). The label names the decay mode.
pub fn adapter_optimizer_configs() -> Vec<(&'static str, crate::optim::OptimizerConfig)> {
    use crate::optim::{DecayMode, OptimizerConfig};
    let mut out = Vec::new();
    for (name, mode, cautious) in [
        ("decoupled", DecayMode::Decoupled, false),
        ("fully decoupled", DecayMode::FullyDecoupled, false),
        ("cautious", DecayMode::Decoupled, true),
    ] {
        for base in [OptimizerConfig::adamw(3e-2), OptimizerConfig::lion(3e-3)] {
            out.push((
                name,
                OptimizerConfig {
                    weight_decay: 0.1,
                    decay_mode: mode,
                    cautious,
                    ..base
                },
            ));
        }
    }
    out.push((
        "clip + ema",
        OptimizerConfig {
            max_grad_norm: Some(0.05),
            ema_beta: Some(0.9),
            ..OptimizerConfig::adamw(3e-2)
        },
    ));
    out
}

/// Every GPU suite (engine, attention, optimizer) on `ctx`: what `linattn validate --device cuda
/// --full` adds to the matrix, and what the `tests/cuda_*.rs` suites assert group by group.
#[cfg(feature = "cuda")]
pub fn gpu_all(ctx: &crate::cuda::CudaContext, print: bool) -> Vec<Run> {
    let mut runs = linear::gpu::all(ctx, print);
    runs.extend(attention::gpu::all(ctx, print));
    runs.extend(optim::gpu::all(ctx, print));
    runs
}

/// Runs `cases` in order, with the host-side preparation of each (input draws and the f64
/// reference, the costly part) computed ahead on worker threads, and `check` (the kernels under
/// test and the comparison) on the calling thread, one case at a time. With `print`, each run's
/// line as it ends. A panic while preparing becomes that run's failure.
///
/// On the GPU machine the reference dominates a suite's time (an f64 attention backward at T =
/// 2048 takes seconds on one core); its 16 cores prepare the cases while the device checks them.
pub fn run_pipelined<C: Sync, P: Send>(
    suite: &'static str,
    cases: &[C],
    print: bool,
    label: impl Fn(&C) -> String,
    prepare: impl Fn(usize, &C) -> Outcome<P> + Sync,
    mut check: impl FnMut(&C, P) -> Outcome<Vec<Check>>,
) -> Vec<Run> {
    use std::collections::BTreeMap;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .clamp(1, 16)
        .min(cases.len().max(1));
    let next = AtomicUsize::new(0);
    let (tx, rx) = mpsc::sync_channel::<(usize, Outcome<P>, f64)>(2 * workers);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, prepare) = (&next, &prepare);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    let started = Instant::now();
                    let prepared = catch_unwind(AssertUnwindSafe(|| prepare(i, case)))
                        .unwrap_or_else(|panic| {
                            let why = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            Err(Failure(format!("preparing the case panicked: {why}")))
                        });
                    if tx
                        .send((i, prepared, started.elapsed().as_secs_f64()))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut ready: BTreeMap<usize, (Outcome<P>, f64)> = BTreeMap::new();
        let mut runs = Vec::with_capacity(cases.len());
        for (i, case) in cases.iter().enumerate() {
            let (prepared, prep_seconds) = loop {
                if let Some(x) = ready.remove(&i) {
                    break x;
                }
                match rx.recv() {
                    Ok((j, p, s)) => {
                        ready.insert(j, (p, s));
                    }
                    Err(_) => break (Err(Failure("no worker prepared this case".into())), 0.0),
                }
            };
            let mut run = Run::time(suite, label(case), || check(case, prepared?));
            run.seconds += prep_seconds;
            if print {
                println!("{}", run.line());
            }
            runs.push(run);
        }
        runs
    })
}
