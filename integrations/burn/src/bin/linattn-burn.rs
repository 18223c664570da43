//! `linattn-burn train`: trains a GLA language model or a LION-S encoder on linattn's kernels
//! (see `linattn_burn::train`). `linattn-burn train --help` lists the flags.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use linattn_burn::train::run::{Control, RunConfig, run, saved_config};

#[derive(Parser)]
#[command(
    name = "linattn-burn",
    version,
    about = "Train models on linattn's kernels through burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on a synthetic task: metrics.csv, curves.png and a checkpoint in --out.
    Train {
        #[command(flatten)]
        config: RunConfig,
        /// The run's folder.
        #[arg(long, default_value = "runs/latest")]
        out: PathBuf,
        /// Continue the run in this folder from its last checkpoint (its saved flags are used;
        /// `--steps` may extend it).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Redraw a run's curves.png from its metrics.csv.
    Plot {
        /// The run's folder.
        dir: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let (config, out, resume, quiet) = match cli.command {
        Command::Train {
            config,
            out,
            resume,
            quiet,
        } => (config, out, resume, quiet),
        Command::Plot { dir } => {
            let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap_or_else(|e| {
                eprintln!("error: {}: {e}", dir.join("metrics.csv").display());
                std::process::exit(2);
            });
            if let Err(e) = linattn_burn::train::plot::curves(&csv, &dir.join("curves.png")) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
            return;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C finishes the current step and stops; the last checkpoint (written atomically)
        // stays intact, and `--resume` continues from it.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let (config, out, resuming) = match resume {
        Some(dir) => match saved_config(&dir) {
            Ok(mut saved) => {
                saved.steps = saved.steps.max(config.steps);
                (saved, dir, true)
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        },
        None => (config, out, false),
    };
    let control = Control {
        resume: resuming,
        progress: !quiet,
        stop: &stop,
        stop_at: None,
    };
    match run(&config, &out, control) {
        Ok(summary) => {
            let (loss, acc) = summary.tail_means(20);
            println!(
                "{} steps in {}: loss {loss:.4}, accuracy {acc:.3} (mean of the last 20 steps)",
                summary.steps,
                summary.out.display()
            );
            if summary.interrupted {
                println!(
                    "interrupted: resume with --resume {}",
                    summary.out.display()
                );
                std::process::exit(130);
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
