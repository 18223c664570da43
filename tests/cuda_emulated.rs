//! The CUDA kernels on the host emulation (kernels/emu, no GPU): indexing and numerics of every
//! kernel against the f64 reference on small shapes. Needs x86-64 and a C++20 compiler (g++);
//! prints `skipped: ...` without them.
#![cfg(feature = "cuda")]

use linattn::DType;
use linattn::cuda::emu::EmuExec;
use linattn::linear::cuda::{backward_on, forward_on};
use linattn::linear::{Form, GateKind};
use linattn::suites::linear::{
    Case, FORMS, Inputs, SHAPES, full_matrix, ops, run_cases, varlen_cases,
};
use linattn::suites::{Run, verdict};

fn exec() -> Option<EmuExec> {
    match EmuExec::new() {
        Ok(e) => Some(e),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

/// Runs `runs` on the emulation (inputs from seed `seed_base + index`), printing a line each.
fn run_on(exec: &EmuExec, runs: &[(Case, DType, Form)], seed_base: u64) -> Vec<Run> {
    run_cases(
        "engine-emulated",
        runs,
        seed_base,
        true,
        &|s, p, f| forward_on(exec, s, p, f),
        &|s, p, f, d, dh| backward_on(exec, s, p, f, d, dh),
    )
}

fn run(exec: &EmuExec, case: &Case, dtype: DType, form: Form, seed: u64) -> bool {
    verdict(&run_on(exec, &[(case.clone(), dtype, form)], seed)).is_ok()
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
    if let Err(e) = verdict(&run_on(exec, runs, 1000)) {
        panic!("{e}");
    }
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

/// The largest shape of the matrix (B 2, T 256, H 4, K = V = 128: four chunks per sequence, two
/// key and value tiles), causal GLA and LION-S in bf16.
#[test]
fn largest_matrix_shape() {
    let Some(exec) = exec() else { return };
    let runs: Vec<_> = ops(SHAPES[2], 1.0)
        .into_iter()
        .filter(|c| matches!(c.name.as_str(), "gla" | "lion-s"))
        .map(|c| (c, DType::BF16, CHUNK64))
        .collect();
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

/// The decoding step (the recurrent kernel on one token per sequence), chained, against the
/// reference's decode step.
#[test]
fn decode_step_chain() {
    use linattn::linear::Gate;
    use linattn::reference::testing::{Rng, logsigmoid_gates};
    use linattn::{Tensor, reference};
    let Some(exec) = exec() else { return };
    let (b, h, k, v) = (2, 2, 32, 40);
    let dims = reference::linear::Dims { b, t: 1, h, k, v };
    for (kind, dtype) in [
        (GateKind::Vector, DType::BF16),
        (GateKind::Scalar, DType::F32),
        (GateKind::PerHead, DType::F16),
    ] {
        let mut rng = Rng::new(5);
        let mut state = Tensor::from_f64(vec![b, h, k, v], rng.randn(b * h * k * v))
            .unwrap()
            .to_dtype(DType::F32);
        let mut ref_state = state.to_f64_vec();
        let mut worst: f64 = 0.0;
        for _ in 0..6 {
            let tensor = |rng: &mut Rng, shape: Vec<usize>| {
                let n = shape.iter().product();
                Tensor::from_f64(shape, rng.randn(n))
                    .unwrap()
                    .to_dtype(dtype)
            };
            let q = tensor(&mut rng, vec![b, 1, h, k]);
            let kk = tensor(&mut rng, vec![b, 1, h, k]);
            let vv = tensor(&mut rng, vec![b, 1, h, v]);
            let gshape = match kind {
                GateKind::PerHead => vec![h],
                GateKind::Scalar => vec![b, 1, h],
                _ => vec![b, 1, h, k],
            };
            let n = gshape.iter().product();
            let g = Tensor::from_f64(gshape, logsigmoid_gates(&mut rng, n, 1.0))
                .unwrap()
                .to_dtype(DType::F32);
            let gate = match kind {
                GateKind::PerHead => Gate::PerHead(&g),
                GateKind::Scalar => Gate::Scalar(&g),
                _ => Gate::Vector(&g),
            };
            let o =
                linattn::linear::cuda::decode_step_on(&exec, &mut state, &q, &kk, &vv, gate, None)
                    .unwrap();
            let g64 = g.to_f64_vec();
            let o_ref = reference::linear::decode_step(
                &dims,
                &mut ref_state,
                &q.to_f64_vec(),
                &kk.to_f64_vec(),
                &vv.to_f64_vec(),
                reference::linear::Gate::from_kind(kind, &g64),
                (k as f64).powf(-0.5),
            );
            worst = worst.max(reference::rel_rms(&o.to_f64_vec(), &o_ref));
            worst = worst.max(reference::rel_rms(&state.to_f64_vec(), &ref_state));
        }
        println!("decode {kind:?} {dtype}: worst rel err {worst:.2e}");
        assert!(worst <= 1e-5, "{kind:?} {dtype}: {worst:e}");
    }
}

/// What the kernels do not take is refused with typed errors before anything is launched.
#[test]
fn unsupported_inputs_are_typed_errors() {
    use linattn::{Error, Tensor};
    let Some(exec) = exec() else { return };
    let run = |case: &Case, dtype: DType, form: Form| {
        let inputs = Inputs::draw(case, dtype, 3).unwrap();
        let p = inputs.problem();
        let spec = p.validate().unwrap();
        forward_on(&exec, &spec, &p, form).map(|_| ())
    };
    let small = Case::causal("gla", (1, 8, 1, 16, 16), GateKind::Vector);
    assert!(matches!(
        run(&small, DType::F64, CHUNK64),
        Err(Error::UnsupportedDtype { .. })
    ));
    let wide_k = Case::causal("gla", (1, 8, 1, 300, 16), GateKind::Vector);
    assert!(matches!(
        run(&wide_k, DType::F32, CHUNK64),
        Err(Error::UnsupportedHeadDim { dim: 300, .. })
    ));
    let wide_v = Case::causal("gla", (1, 8, 1, 16, 600), GateKind::Vector);
    assert!(matches!(
        run(&wide_v, DType::F32, CHUNK64),
        Err(Error::UnsupportedHeadDim { dim: 600, .. })
    ));
    assert!(matches!(
        run(&small, DType::F32, Form::Chunkwise { chunk: 7 }),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        run(&small, DType::F32, Form::Parallel),
        Err(Error::Unsupported(_))
    ));
    // A one-token decode step with a two-token q is a shape error, not a launch.
    let q = Tensor::zeros(vec![1, 2, 1, 4], DType::F32);
    let mut state = Tensor::zeros(vec![1, 1, 4, 4], DType::F32);
    let v = Tensor::zeros(vec![1, 2, 1, 4], DType::F32);
    assert!(matches!(
        linattn::linear::cuda::decode_step_on(
            &exec,
            &mut state,
            &q,
            &q,
            &v,
            linattn::linear::Gate::None,
            None
        ),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// The device-side value check kernel (`la_value_flags`) on the emulation: NaN and infinities
/// flagged in f32, bf16 and f16 buffers, positive values flagged in gates only, `-0.0` and 0 not,
/// across several grid-stride blocks.
#[test]
fn value_flags_kernel() {
    use half::{bf16, f16};
    use linattn::cuda::exec::Executor;
    use linattn::linear::cuda::values::{CheckedBuffer, NON_FINITE, POSITIVE, value_flags_on};
    let Some(exec) = exec() else { return };
    let n = 5000; // three blocks of the grid-stride pass (2048 elements per block at least)
    let base: Vec<f64> = (0..n).map(|i| -((i % 13) as f64) * 0.25).collect(); // <= 0, finite
    let encode = |dtype: DType, values: &[f64]| -> Vec<u8> {
        match dtype {
            DType::F32 => values
                .iter()
                .flat_map(|&x| (x as f32).to_le_bytes())
                .collect(),
            DType::BF16 => values
                .iter()
                .flat_map(|&x| bf16::from_f64(x).to_le_bytes())
                .collect(),
            DType::F16 => values
                .iter()
                .flat_map(|&x| f16::from_f64(x).to_le_bytes())
                .collect(),
            DType::F64 => unreachable!(),
        }
    };
    let with = |at: usize, x: f64| {
        let mut v = base.clone();
        v[at] = x;
        v
    };
    let cases: Vec<(Vec<f64>, bool, u32)> = vec![
        (base.clone(), false, 0),
        (base.clone(), true, 0),
        (with(4999, -0.0), true, 0),
        (with(0, f64::NAN), false, NON_FINITE),
        (with(2100, f64::INFINITY), false, NON_FINITE),
        (with(4095, f64::NEG_INFINITY), true, NON_FINITE),
        (with(3000, 0.5), false, 0),
        (with(3000, 0.5), true, POSITIVE),
        (with(17, f64::INFINITY), true, NON_FINITE | POSITIVE),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let bufs: Vec<_> = cases
            .iter()
            .map(|(v, _, _)| exec.upload(&encode(dtype, v)).unwrap())
            .collect();
        let checked: Vec<CheckedBuffer> = cases
            .iter()
            .zip(&bufs)
            .map(|((_, gate, _), b)| CheckedBuffer {
                name: "x",
                address: exec.address(b),
                len: n,
                dtype,
                gate: *gate,
            })
            .collect();
        let flags = value_flags_on(&exec, &checked).unwrap();
        let want: Vec<u32> = cases.iter().map(|c| c.2).collect();
        assert_eq!(flags, want, "{dtype}");
    }
}
