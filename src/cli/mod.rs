//! The `linattn` command line: `validate` (the equivalence matrix) and `run OP` (safetensors in,
//! safetensors out). It lives in the library so that tests can drive it in-process.

pub mod bench;
pub mod io;
pub mod run;
pub mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "linattn",
    version,
    about = "GPU kernels for linear attention and decayed recurrences, checked against an f64 CPU reference"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Every op x form x backend against the f64 reference: one table row each; exits non-zero on
    /// any failure.
    Validate(validate::ValidateArgs),
    /// Runs one op on tensors from a safetensors file and writes the results to another.
    Run {
        #[command(subcommand)]
        op: run::RunOp,
    },
    /// Times the CUDA chunkwise engine on flash-linear-attention's benchmark shapes (JSON output
    /// for benches/peers.py, which adds flash-linear-attention and FlashAttention).
    Bench(bench::BenchArgs),
}

/// Entry point of the binary: parses the arguments, runs, and turns any error into one line on
/// stderr and a non-zero exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> crate::Result<ExitCode> {
    match cli.command {
        Command::Validate(args) => validate::execute(&args),
        Command::Run { op } => run::execute(op).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::execute(&args).map(|()| ExitCode::SUCCESS),
    }
}
