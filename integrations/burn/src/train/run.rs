//! One training run, as `linattn-burn train` drives it: model, task, optimizer and schedule from
//! a [`RunConfig`], a progress bar, `metrics.csv`, a PNG of the curves, and checkpoints that a
//! later run resumes from bit for bit.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use linattn::linear::Form;
use linattn::optim::{OptimizerConfig, Schedule};
use linattn::{Error, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint;
use super::models::{GlaLm, LionEncoder, ModelConfig};
use super::step::{StepReport, TrainStep, masked_cross_entropy};
use super::tasks::{Batch, Task};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum ModelKind {
    Gla,
    Lion,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum TaskKind {
    Mqar,
    Sort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum OptimizerKind {
    Adamw,
    Lion,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum ScheduleKind {
    Constant,
    Cosine,
    Linear,
    Wsd,
    InverseSqrt,
    Rex,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum FormKind {
    Chunkwise,
    Recurrent,
    Parallel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum DeviceKind {
    Wgpu,
    Ndarray,
}

/// Everything a run is made of (saved in every checkpoint, so `--resume` needs nothing else).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct RunConfig {
    /// The model: a causal GLA language model or a bidirectional LION-S encoder.
    #[arg(long, value_enum, default_value = "gla")]
    pub model: ModelKind,
    /// The task: MQAR (causal) or sorting (bidirectional).
    #[arg(long, value_enum, default_value = "mqar")]
    pub task: TaskKind,
    /// Vocabulary size (keys use its lower half, values its upper half in MQAR).
    #[arg(long, default_value_t = 32)]
    pub vocab: usize,
    /// MQAR: key-value pairs per sequence.
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// MQAR: queries per sequence.
    #[arg(long, default_value_t = 4)]
    pub queries: usize,
    /// Sort: sequence length.
    #[arg(long, default_value_t = 24)]
    pub sort_len: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    #[arg(long, default_value_t = 2)]
    pub heads: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: ScheduleKind,
    /// Warmup steps of the schedule.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value = "chunkwise")]
    pub form: FormKind,
    /// Chunk size of the chunkwise form.
    #[arg(long, default_value_t = 16)]
    pub chunk: usize,
    #[arg(long, value_enum, default_value = "wgpu")]
    pub device: DeviceKind,
    /// Seeds the weights and every batch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
}

impl RunConfig {
    pub fn task(&self) -> Task {
        match self.task {
            TaskKind::Mqar => Task::Mqar {
                pairs: self.pairs,
                queries: self.queries,
            },
            TaskKind::Sort => Task::Sort {
                seq_len: self.sort_len,
            },
        }
    }

    pub fn form(&self) -> Form {
        match self.form {
            FormKind::Chunkwise => Form::Chunkwise { chunk: self.chunk },
            FormKind::Recurrent => Form::Recurrent,
            FormKind::Parallel => Form::Parallel,
        }
    }

    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            vocab: self.vocab,
            width: self.width,
            layers: self.layers,
            heads: self.heads,
            classes: self.vocab,
        }
    }

    pub fn optimizer_config(&self) -> OptimizerConfig {
        let mut c = match self.optimizer {
            OptimizerKind::Adamw => OptimizerConfig::adamw(self.lr),
            OptimizerKind::Lion => OptimizerConfig::lion(self.lr),
        };
        c.weight_decay = self.weight_decay;
        c.max_grad_norm = (self.max_grad_norm > 0.0).then_some(self.max_grad_norm);
        c
    }

    /// The schedule over `--steps` (WSD decays over the last fifth, 1 - sqrt shape).
    pub fn schedule(&self) -> Result<Schedule> {
        let (w, t) = (self.warmup, self.steps);
        Ok(match self.schedule {
            ScheduleKind::Constant => Schedule::Constant { warmup: w },
            ScheduleKind::Cosine => Schedule::cosine(w, t),
            ScheduleKind::Linear => Schedule::Linear {
                warmup: w,
                total: t,
            },
            ScheduleKind::Wsd => {
                Schedule::wsd(w, t / 5, t, 0.0, linattn::optim::Shape::OneMinusSqrt)
                    .map_err(Error::InvalidArgument)?
            }
            ScheduleKind::InverseSqrt => Schedule::InverseSqrt {
                warmup: w,
                timescale: None,
            },
            ScheduleKind::Rex => Schedule::Rex {
                warmup: w,
                total: t,
            },
        })
    }

    pub fn device(&self) -> Result<Device> {
        match self.device {
            DeviceKind::Wgpu => {
                // A clear error instead of burn's panic when there is no adapter.
                linattn::cube::CubeContext::shared()?;
                Ok(Device::wgpu(Default::default()))
            }
            #[allow(deprecated)]
            DeviceKind::Ndarray => Ok(Device::ndarray()),
        }
    }

    /// Checks the sizes against each other before anything is built.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.width == 0 || self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return bad(format!(
                "--width {} must be a positive multiple of --heads {}",
                self.width, self.heads
            ));
        }
        if self.layers == 0 || self.batch == 0 || self.steps == 0 {
            return bad("--layers, --batch and --steps must be >= 1".into());
        }
        if self.chunk == 0 {
            return bad("--chunk must be >= 1".into());
        }
        if self.checkpoint_every == 0 {
            return bad("--checkpoint-every must be >= 1".into());
        }
        if self.vocab < self.task().min_vocab() {
            return bad(format!(
                "--vocab {} is too small for the task (needs {})",
                self.vocab,
                self.task().min_vocab()
            ));
        }
        if let TaskKind::Mqar = self.task
            && (self.pairs == 0 || self.queries == 0)
        {
            return bad("MQAR needs --pairs and --queries >= 1".into());
        }
        if self.task == TaskKind::Sort && self.sort_len == 0 {
            return bad("--sort-len must be >= 1".into());
        }
        match (self.model, self.task) {
            (ModelKind::Gla, TaskKind::Sort) => bad(
                "the causal GLA model cannot sort (every output depends on every input): use --model lion"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

/// The models a run trains.
pub trait TrainModel: Module + Sized {
    fn build(config: &ModelConfig, seed: u64, device: &Device) -> Self;
    fn logits(&self, tokens: Tensor<2, Int>, form: Form) -> Tensor<3>;
}

impl TrainModel for GlaLm {
    fn build(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        GlaLm::new(config, seed, device)
    }
    fn logits(&self, tokens: Tensor<2, Int>, form: Form) -> Tensor<3> {
        self.forward(tokens, form)
    }
}

impl TrainModel for LionEncoder {
    fn build(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        LionEncoder::new(config, seed, device)
    }
    fn logits(&self, tokens: Tensor<2, Int>, form: Form) -> Tensor<3> {
        self.forward(tokens, form)
    }
}

/// The tokens of a batch on a device.
pub fn tokens_of(batch: &Batch, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(batch.tokens.clone(), [batch.batch, batch.seq_len]),
        device,
    )
}

/// One row of `metrics.csv`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub step: usize,
    pub report: StepReport,
    pub tokens_per_s: f64,
}

const CSV_HEADER: &str = "step,loss,accuracy,lr,grad_norm,skipped,tokens_per_s";

impl Row {
    fn csv(&self) -> String {
        let r = &self.report;
        // Loss, accuracy, lr and norm with every digit (`{:e}` round-trips), for the
        // resume-equals-uninterrupted comparison; throughput is a measurement.
        format!(
            "{},{:e},{:e},{:e},{:e},{},{:.1}",
            self.step,
            r.loss,
            r.accuracy.unwrap_or(f64::NAN),
            r.lr,
            r.grad_norm,
            u8::from(r.skipped),
            self.tokens_per_s
        )
    }
}

/// The summary of a run.
#[derive(Clone, Debug)]
pub struct Summary {
    pub rows: Vec<Row>,
    /// Steps done in total (with the resumed ones).
    pub steps: usize,
    /// Set when the run stopped early (Ctrl-C).
    pub interrupted: bool,
    pub out: PathBuf,
}

impl Summary {
    /// Mean over the last `n` rows of this process (loss, accuracy).
    pub fn tail_means(&self, n: usize) -> (f64, f64) {
        let tail = &self.rows[self.rows.len().saturating_sub(n)..];
        let k = tail.len().max(1) as f64;
        (
            tail.iter().map(|r| r.report.loss).sum::<f64>() / k,
            tail.iter()
                .map(|r| r.report.accuracy.unwrap_or(0.0))
                .sum::<f64>()
                / k,
        )
    }
}

pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// How a run is driven besides its configuration.
#[derive(Clone, Copy, Debug)]
pub struct Control<'a> {
    /// Continue from the checkpoint in the run's folder.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Set (by a Ctrl-C handler) to stop before the next step.
    pub stop: &'a AtomicBool,
    /// Stop before this step (as an interruption would; for tests).
    pub stop_at: Option<usize>,
}

/// Runs (or, with [`Control::resume`], continues) a training run writing into `out`.
pub fn run(config: &RunConfig, out: &Path, control: Control) -> Result<Summary> {
    config.validate()?;
    match config.model {
        ModelKind::Gla => run_model::<GlaLm>(config, out, control),
        ModelKind::Lion => run_model::<LionEncoder>(config, out, control),
    }
}

/// The run configuration saved in a run folder's checkpoint (for `--resume DIR`).
pub fn saved_config(out: &Path) -> Result<RunConfig> {
    let path = out.join(CHECKPOINT);
    let bytes = std::fs::read(&path)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Safetensors(e.to_string()))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("config"))
        .ok_or_else(|| Error::InvalidArgument(format!("{}: no run config", path.display())))?;
    serde_json::from_str(json).map_err(|e| Error::InvalidArgument(format!("run config: {e}")))
}

fn run_model<M: TrainModel>(config: &RunConfig, out: &Path, control: Control) -> Result<Summary> {
    let Control {
        resume,
        progress,
        stop,
        stop_at,
    } = control;
    let io = |e: std::io::Error| Error::InvalidArgument(format!("{}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(io)?;
    let device = config.device()?.autodiff();
    let task = config.task();
    let form = config.form();
    let mut model = M::build(&config.model_config(), config.seed, &device);
    let mut trainer = TrainStep::new(
        &model,
        &config.optimizer_config(),
        &config.schedule()?,
        config.steps,
    )?;
    let mut done = 0usize;
    let mut rows_before: Vec<String> = Vec::new();
    if resume {
        let loaded = checkpoint::load(&out.join(CHECKPOINT), model)?;
        model = loaded.model;
        done = loaded
            .metadata
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::InvalidArgument("checkpoint without a step".into()))?;
        if let Some(state) = loaded.optimizer {
            trainer.optimizer_mut().import_state(state)?;
        }
        trainer.set_steps(done);
        // The metrics of the steps the checkpoint covers; later rows (past an interruption)
        // are dropped, so the file ends up as an uninterrupted run's.
        let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap_or_default();
        rows_before = csv
            .lines()
            .skip(1)
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|s| s < done)
            })
            .map(str::to_string)
            .collect();
    }
    let mut csv = std::fs::File::create(out.join("metrics.csv")).map_err(io)?;
    writeln!(csv, "{CSV_HEADER}").map_err(io)?;
    for line in &rows_before {
        writeln!(csv, "{line}").map_err(io)?;
    }
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(config.steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_position(done as u64);
        bar
    });
    let mut rows = Vec::new();
    let mut interrupted = false;
    let tokens_per_step = (config.batch * task.seq_len()) as f64;
    for step in done..config.steps {
        if stop.load(Ordering::SeqCst) || stop_at == Some(step) {
            interrupted = true;
            break;
        }
        let batch = task.batch(config.vocab, config.batch, config.seed, step as u64);
        let started = Instant::now();
        let (next, report) = trainer.step(model, |m| {
            let logits = m.logits(tokens_of(&batch, &device), form);
            masked_cross_entropy(logits, &batch, &device)
        })?;
        model = next;
        let row = Row {
            step,
            report,
            tokens_per_s: tokens_per_step / started.elapsed().as_secs_f64().max(1e-9),
        };
        writeln!(csv, "{}", row.csv()).map_err(io)?;
        rows.push(row);
        if let Some(bar) = &bar {
            bar.set_position(step as u64 + 1);
            bar.set_message(format!(
                "loss {:.4} acc {:.3} lr {:.2e} {:.0} tok/s",
                report.loss,
                report.accuracy.unwrap_or(f64::NAN),
                report.lr,
                row.tokens_per_s
            ));
        }
        let finished = step + 1;
        if finished % config.checkpoint_every == 0 || finished == config.steps {
            csv.flush().map_err(io)?;
            let mut meta = HashMap::new();
            meta.insert("step".to_string(), finished.to_string());
            meta.insert(
                "config".to_string(),
                serde_json::to_string(config).expect("serialisable"),
            );
            let state = trainer.optimizer().export_state()?;
            checkpoint::save(&out.join(CHECKPOINT), &model, state.as_ref(), &meta)?;
        }
    }
    if let Some(bar) = &bar {
        bar.finish();
    }
    csv.flush().map_err(io)?;
    drop(csv);
    let all = std::fs::read_to_string(out.join("metrics.csv")).map_err(io)?;
    super::plot::curves(&all, &out.join("curves.png"))?;
    Ok(Summary {
        steps: done + rows.len(),
        rows,
        interrupted,
        out: out.to_path_buf(),
    })
}
