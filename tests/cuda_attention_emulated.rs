//! The CUDA attention kernels on the host emulation (kernels/emu, no GPU): indexing, masking and
//! numerics of forward and backward against the f64 reference on small shapes. Needs x86-64 and
//! a C++20 compiler (g++); prints `skipped: ...` without them.

#[path = "common/attention_cases.rs"]
mod attention_cases;

use attention_cases::{AttnCase, MaskKind, run_all};
use linattn::DType;
use linattn::cuda::emu::EmuExec;

fn exec() -> Option<EmuExec> {
    match EmuExec::new() {
        Ok(e) => Some(e),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

#[test]
fn smoke_dense() {
    let Some(exec) = exec() else { return };
    run_all(
        &exec,
        &[(
            AttnCase::new(64, 64, 64, (64, 64), false, MaskKind::FullPlan),
            DType::BF16,
        )],
    );
}
