//! The CUDA kernels on the host emulation (kernels/emu, no GPU): indexing and numerics of every
//! kernel against the f64 reference on small shapes. Needs x86-64 and a C++20 compiler (g++);
//! prints `skipped: ...` without them.

#[path = "common/cuda_cases.rs"]
mod cuda_cases;

use cuda_cases::{Case, FORMS, Inputs, SHAPES, full_matrix, ops, run_case, summary, varlen_cases};
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

/// Runs cases and reports every failure at the end (so one run shows the whole picture).
fn run_all(exec: &EmuExec, runs: &[(Case, DType, Form)]) {
    let mut failed = Vec::new();
    for (i, (case, dtype, form)) in runs.iter().enumerate() {
        if !run(exec, case, *dtype, *form, 1000 + i as u64) {
            failed.push(case.label(*dtype, *form));
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

const CHUNK64: Form = Form::Chunkwise { chunk: 64 };
const CHUNK16: Form = Form::Chunkwise { chunk: 16 };

/// Every op (gate kind x direction x normalisation) on the small shape, bf16 and f32, chunk 64.
#[test]
fn every_op_chunk64() {
    let Some(exec) = exec() else { return };
    let mut runs = Vec::new();
    for dtype in [DType::BF16, DType::F32] {
        for case in ops(SHAPES[0], 1.0) {
            runs.push((case, dtype, CHUNK64));
        }
    }
    run_all(&exec, &runs);
}

/// Every op with chunk 16 on the K = 32, V = 48 shape (padding, several 16-row chunks).
#[test]
fn every_op_chunk16_padded() {
    let Some(exec) = exec() else { return };
    let runs: Vec<_> = ops(SHAPES[3], 1.0)
        .into_iter()
        .map(|c| (c, DType::F32, CHUNK16))
        .collect();
    run_all(&exec, &runs);
}

/// The recurrent form and the decode path's kernel, every op.
#[test]
fn every_op_recurrent() {
    let Some(exec) = exec() else { return };
    let mut runs = Vec::new();
    for dtype in [DType::BF16, DType::F32] {
        for case in ops(SHAPES[0], 1.0) {
            runs.push((case, dtype, Form::Recurrent));
        }
    }
    run_all(&exec, &runs);
}

/// Strong and weak gates (n = 0.1, 10) where the exponents matter.
#[test]
fn gate_strengths() {
    let Some(exec) = exec() else { return };
    let mut runs = Vec::new();
    for strength in [0.1, 10.0] {
        for case in ops(SHAPES[0], strength) {
            if matches!(
                case.name.as_str(),
                "gla" | "mamba2" | "lion-s" | "bidir-vector"
            ) {
                runs.push((case.clone(), DType::BF16, CHUNK64));
                runs.push((case, DType::F32, CHUNK16));
            }
        }
    }
    run_all(&exec, &runs);
}

/// Packed variable-length sequences, including empty and one-token segments.
#[test]
fn variable_length() {
    let Some(exec) = exec() else { return };
    let mut runs = Vec::new();
    for case in varlen_cases() {
        for form in FORMS {
            runs.push((case.clone(), DType::BF16, form));
        }
    }
    run_all(&exec, &runs);
}

/// K = 60, V = 100 (zero padding inside the 64-channel tiles, two value tiles), f16 and bf16.
#[test]
fn padded_head_dims() {
    let Some(exec) = exec() else { return };
    let mut runs = Vec::new();
    for case in ops(SHAPES[1], 1.0) {
        if matches!(case.name.as_str(), "gla" | "lion-s") {
            runs.push((case.clone(), DType::BF16, CHUNK64));
            runs.push((case, DType::F16, CHUNK64));
        }
    }
    run_all(&exec, &runs);
}

/// Head dims 128 and 256, several key/value tiles.
#[test]
fn large_head_dims() {
    let Some(exec) = exec() else { return };
    let runs = vec![
        (
            Case::causal("gla", (1, 70, 1, 256, 192), GateKind::Vector),
            DType::BF16,
            CHUNK64,
        ),
        (
            Case::causal("mamba2", (1, 70, 1, 128, 256), GateKind::Scalar),
            DType::BF16,
            CHUNK64,
        ),
        (
            Case::causal("gla", (1, 40, 1, 256, 256), GateKind::Vector),
            DType::F32,
            Form::Recurrent,
        ),
    ];
    run_all(&exec, &runs);
}

/// The complete GPU matrix on the emulation: hours on 2 cores, so only with LINATTN_EMU_FULL=1.
#[test]
fn full_matrix_on_request() {
    if std::env::var_os("LINATTN_EMU_FULL").is_none() {
        println!("skipped: set LINATTN_EMU_FULL=1 to run the whole matrix on the emulation");
        return;
    }
    let Some(exec) = exec() else { return };
    let mut runs = Vec::new();
    for case in full_matrix() {
        for form in FORMS {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                runs.push((case.clone(), dtype, form));
            }
        }
    }
    run_all(&exec, &runs);
}
