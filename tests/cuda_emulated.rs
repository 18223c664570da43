//! The CUDA kernels on the host emulation (kernels/emu, no GPU): indexing and numerics of every
//! kernel against the f64 reference on small shapes. Needs x86-64 and a C++20 compiler (g++);
//! prints `skipped: ...` without them.

#[path = "common/cuda_cases.rs"]
mod cuda_cases;

use cuda_cases::{Case, Inputs, run_case, summary};
use linattn::DType;
use linattn::cuda::emu::EmuExec;
use linattn::linear::cuda::{backward_on, forward_on};
use linattn::linear::{Form, GateKind};

fn exec() -> Option<EmuExec> {
    match EmuExec::new() {
        Ok(e) => Some(e),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

fn run(exec: &EmuExec, case: &Case, dtype: DType, form: Form, seed: u64) -> bool {
    let inputs = Inputs::draw(case, dtype, seed);
    let checks = run_case(
        &inputs,
        dtype,
        form,
        &|s, p, f| forward_on(exec, s, p, f),
        &|s, p, f, d, dh| backward_on(exec, s, p, f, d, dh),
    );
    match checks {
        Ok(c) => {
            let pass = c.iter().all(|c| c.pass);
            println!(
                "{} {}: {}",
                if pass { "ok  " } else { "FAIL" },
                case.label(dtype, form),
                summary(&c)
            );
            pass
        }
        Err(e) => {
            println!("FAIL {}: error {e}", case.label(dtype, form));
            false
        }
    }
}

#[test]
fn smoke_recurrent_f32() {
    let Some(exec) = exec() else { return };
    let case = Case::causal("gla", (1, 20, 1, 16, 24), GateKind::Vector);
    assert!(run(&exec, &case, DType::F32, Form::Recurrent, 1));
}

#[test]
fn smoke_chunk_f32() {
    let Some(exec) = exec() else { return };
    let case = Case::causal("gla", (1, 40, 1, 16, 24), GateKind::Vector);
    assert!(run(
        &exec,
        &case,
        DType::F32,
        Form::Chunkwise { chunk: 16 },
        1
    ));
}
