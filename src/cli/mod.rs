//! The `linattn` command line: `validate` (the equivalence matrix), `run OP` (safetensors in,
//! safetensors out), `bench` and `devices`. It lives in the library so that tests can drive it in-process.

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
    /// Times the engine, attention or the fused optimizer on device-resident inputs (cuda, or cube
    /// on a wgpu adapter); JSON for the peer scripts in benches/ (flash-linear-attention,
    /// FlashAttention-2, torch's fused AdamW).
    Bench(bench::BenchArgs),
    /// Which backends can run here (cuda, cube, cpu) and, for each that cannot, why.
    Devices,
}

/// Mesa's Vulkan device-select layer (an implicit layer of `mesa-vulkan-drivers`) connects to
/// Wayland each time devices are listed, to put the session's display GPU first; without a session
/// (`XDG_RUNTIME_DIR` unset, as on a headless server or in CI) libwayland prints
/// "XDG_RUNTIME_DIR is invalid or not set in the environment" on stderr each time, four times per
/// cube start. With no session there is no display GPU to prefer, so the layer is switched off
/// (`NODEVICE_SELECT=1`, Mesa's own switch) unless the caller set that variable. Library users on
/// a headless machine can set it themselves.
fn quiet_headless_vulkan() {
    let session =
        std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
    if !session && std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: called first in `main`, before this process starts any thread, so nothing can
        // read the environment concurrently.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

/// Entry point of the binary: parses the arguments, runs, and turns any error into one line on
/// stderr and a non-zero exit status.
pub fn main() -> ExitCode {
    quiet_headless_vulkan();
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
        Command::Devices => {
            for probe in crate::Backend::probe() {
                println!("{probe}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
