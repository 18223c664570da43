//! The CUDA kernels on a GPU against the f64 reference: the whole shape x gate x direction matrix
//! (tests/common/cuda_cases.rs) in bf16, f16 and f32, chunk sizes 64 and 16 and the recurrent
//! form, forward and every gradient; the device-slice API with NaN-poisoned outputs (every element
//! must be written); the decoding step chained over a sequence. Prints `skipped: no CUDA device`
//! without a usable GPU (driver, libnvrtc, compute capability >= 8.0).
#![cfg(feature = "cuda")]

#[path = "common/cuda_cases.rs"]
mod cuda_cases;

use cuda_cases::{
    BwdFn, Case, FORMS, FwdFn, Inputs, full_matrix, ops, run_case, summary, varlen_cases,
};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use linattn::cuda::CudaContext;
use linattn::linear::cuda::device::{
    DeviceBackward, DeviceForward, DeviceGate, DeviceProblem, DeviceTensor,
};
use linattn::linear::{
    self, Direction, Form, Gate, GateKind, Grads, LinearAttention, Output, Spec,
};
use linattn::reference::testing::{Rng, logsigmoid_gates};
use linattn::{Backend, DType, Result, Tensor, TensorData};

fn context() -> Option<CudaContext> {
    match CudaContext::shared() {
        Ok(c) => {
            println!("device: {} ({})", c.device_name(), c.arch());
            Some(c)
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Runs `runs` through `fwd`/`bwd`, prints one line per run, fails with the list of failures.
fn run_all(runs: &[(Case, DType, Form)], fwd: &FwdFn, bwd: &BwdFn) {
    let mut failed = Vec::new();
    for (i, (case, dtype, form)) in runs.iter().enumerate() {
        let inputs = Inputs::draw(case, *dtype, 7000 + i as u64);
        let label = case.label(*dtype, *form);
        match run_case(&inputs, *dtype, *form, fwd, bwd) {
            Ok(checks) => {
                let pass = checks.iter().all(|c| c.pass);
                println!(
                    "{} {label}: {}",
                    if pass { "ok  " } else { "FAIL" },
                    summary(&checks)
                );
                if !pass {
                    failed.push(label);
                }
            }
            Err(e) => {
                println!("FAIL {label}: error {e}");
                failed.push(label);
            }
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

/// Every case of the matrix, every form, every input dtype, through `linear::forward/backward`.
#[test]
fn matrix_host_api() {
    let Some(ctx) = context() else { return };
    let backend = Backend::Cuda(ctx);
    let mut runs = Vec::new();
    for case in full_matrix() {
        for form in FORMS {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                runs.push((case.clone(), dtype, form));
            }
        }
    }
    run_all(
        &runs,
        &|_, p, f| linear::forward(&backend, p, f),
        &|_, p, f, d, dh| linear::backward(&backend, p, f, d, dh),
    );
}

// ------------------------------------------------------------------------------------------------
// Device-slice API with poisoned outputs.
// ------------------------------------------------------------------------------------------------

/// Device copies of a host problem's tensors (inputs in their dtype, gates/h0 as f32).
struct DeviceInputs {
    q: Typed,
    k: Typed,
    v: Typed,
    g: Option<CudaSlice<f32>>,
    g_bwd: Option<CudaSlice<f32>>,
    h0: Option<CudaSlice<f32>>,
}

enum Typed {
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
    F32(CudaSlice<f32>),
}

impl Typed {
    fn upload(ctx: &CudaContext, t: &Tensor) -> Typed {
        let s = ctx.stream();
        match t.data() {
            TensorData::BF16(d) => Typed::BF16(s.clone_htod(d).unwrap()),
            TensorData::F16(d) => Typed::F16(s.clone_htod(d).unwrap()),
            TensorData::F32(d) => Typed::F32(s.clone_htod(d).unwrap()),
            TensorData::F64(_) => panic!("f64 is not a device input type"),
        }
    }

    fn view(&self) -> DeviceTensor<'_> {
        match self {
            Typed::BF16(s) => DeviceTensor::BF16(s),
            Typed::F16(s) => DeviceTensor::F16(s),
            Typed::F32(s) => DeviceTensor::F32(s),
        }
    }
}

fn f32_slice(ctx: &CudaContext, t: &Tensor) -> CudaSlice<f32> {
    ctx.stream().clone_htod(&t.to_f32_vec()).unwrap()
}

/// An output buffer filled with NaN, so that any element a kernel fails to write shows up.
fn poisoned(ctx: &CudaContext, n: usize) -> CudaSlice<f32> {
    ctx.stream().clone_htod(&vec![f32::NAN; n]).unwrap()
}

fn download(ctx: &CudaContext, s: &CudaSlice<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), ctx.stream().clone_dtoh(s).unwrap()).unwrap()
}

impl DeviceInputs {
    fn new(ctx: &CudaContext, p: &LinearAttention) -> DeviceInputs {
        DeviceInputs {
            q: Typed::upload(ctx, p.q),
            k: Typed::upload(ctx, p.k),
            v: Typed::upload(ctx, p.v),
            g: p.gate.tensor().map(|t| f32_slice(ctx, t)),
            g_bwd: p
                .gate_bwd
                .as_ref()
                .and_then(Gate::tensor)
                .map(|t| f32_slice(ctx, t)),
            h0: p.h0.map(|t| f32_slice(ctx, t)),
        }
    }

    fn problem<'a>(&'a self, spec: &Spec, p: &'a LinearAttention) -> DeviceProblem<'a> {
        let gate = |s: Option<&'a CudaSlice<f32>>| match (spec.gate_kind, s) {
            (GateKind::PerHead, Some(s)) => DeviceGate::PerHead(s),
            (GateKind::Scalar, Some(s)) => DeviceGate::Scalar(s),
            (GateKind::Vector, Some(s)) => DeviceGate::Vector(s),
            _ => DeviceGate::None,
        };
        DeviceProblem {
            dims: spec.dims,
            q: self.q.view(),
            k: self.k.view(),
            v: self.v.view(),
            gate: gate(self.g.as_ref()),
            gate_bwd: self.g_bwd.as_ref().map(|s| gate(Some(s))),
            direction: spec.direction,
            scale: Some(spec.scale),
            normalize: spec.normalize,
            h0: self.h0.as_ref(),
            cu_seqlens: p.cu_seqlens,
            value_check: linattn::ValueCheck::On,
        }
    }
}

fn device_forward(
    ctx: &CudaContext,
    spec: &Spec,
    p: &LinearAttention,
    form: Form,
) -> Result<Output> {
    let inputs = DeviceInputs::new(ctx, p);
    let problem = inputs.problem(spec, p);
    let mut o = poisoned(ctx, spec.dims.v_len());
    let state_len: usize = spec.state_shape().iter().product();
    let mut ht = spec.has_final_state().then(|| poisoned(ctx, state_len));
    linattn::linear::cuda::device::forward(
        ctx,
        ctx.stream(),
        &problem,
        form,
        DeviceForward {
            o: &mut o,
            ht: ht.as_mut(),
        },
    )?;
    Ok(Output {
        o: download(ctx, &o, &spec.o_shape()),
        ht: ht.map(|s| download(ctx, &s, &spec.state_shape())),
    })
}

fn device_backward(
    ctx: &CudaContext,
    spec: &Spec,
    p: &LinearAttention,
    form: Form,
    d_o: &Tensor,
    d_ht: Option<&Tensor>,
) -> Result<Grads> {
    let inputs = DeviceInputs::new(ctx, p);
    let problem = inputs.problem(spec, p);
    let d_o_dev = Typed::upload(ctx, d_o);
    let d_ht_dev = d_ht.map(|t| f32_slice(ctx, t));
    let mut dq = poisoned(ctx, spec.dims.qk_len());
    let mut dk = poisoned(ctx, spec.dims.qk_len());
    let mut dv = poisoned(ctx, spec.dims.v_len());
    let mut dg = p.gate.tensor().map(|t| poisoned(ctx, t.numel()));
    let mut dg_bwd = p
        .gate_bwd
        .as_ref()
        .and_then(Gate::tensor)
        .map(|t| poisoned(ctx, t.numel()));
    let mut dh0 = p.h0.map(|t| poisoned(ctx, t.numel()));
    linattn::linear::cuda::device::backward(
        ctx,
        ctx.stream(),
        &problem,
        form,
        d_o_dev.view(),
        d_ht_dev.as_ref(),
        DeviceBackward {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dg: dg.as_mut(),
            dg_bwd: dg_bwd.as_mut(),
            dh0: dh0.as_mut(),
        },
    )?;
    let shape = |t: &Tensor| t.shape().to_vec();
    Ok(Grads {
        dq: download(ctx, &dq, &shape(p.q)),
        dk: download(ctx, &dk, &shape(p.k)),
        dv: download(ctx, &dv, &shape(p.v)),
        dg: dg
            .zip(p.gate.tensor())
            .map(|(s, t)| download(ctx, &s, &shape(t))),
        dg_bwd: dg_bwd
            .zip(p.gate_bwd.as_ref().and_then(Gate::tensor))
            .map(|(s, t)| download(ctx, &s, &shape(t))),
        dh0: dh0.zip(p.h0).map(|(s, t)| download(ctx, &s, &shape(t))),
    })
}

/// Every op, padded head dims and variable length through the device-slice API, outputs poisoned
/// with NaN before every launch.
#[test]
fn device_api_poisoned_outputs() {
    let Some(ctx) = context() else { return };
    let mut runs = Vec::new();
    for shape in [cuda_cases::SHAPES[1], cuda_cases::SHAPES[3]] {
        for case in ops(shape, 1.0) {
            for form in FORMS {
                runs.push((case.clone(), DType::BF16, form));
            }
        }
    }
    for case in varlen_cases() {
        for form in FORMS {
            runs.push((case.clone(), DType::F16, form));
        }
    }
    run_all(
        &runs,
        &|s, p, f| device_forward(&ctx, s, p, f),
        &|s, p, f, d, dh| device_backward(&ctx, s, p, f, d, dh),
    );
}

/// The decoding step, chained over a sequence, against the reference's decode step, and its final
/// state against the forward pass's `ht`.
#[test]
fn decode_step_chain() {
    let Some(ctx) = context() else { return };
    let (b, h, k, v, steps) = (2, 3, 64, 48, 20);
    let dims = linattn::reference::linear::Dims { b, t: 1, h, k, v };
    for (kind, dtype) in [
        (GateKind::Vector, DType::BF16),
        (GateKind::Scalar, DType::F32),
        (GateKind::PerHead, DType::F16),
    ] {
        let mut rng = Rng::new(99);
        let mut state = Tensor::from_f64(vec![b, h, k, v], rng.randn(b * h * k * v))
            .unwrap()
            .to_dtype(DType::F32);
        let mut ref_state = state.to_f64_vec();
        let mut worst: f64 = 0.0;
        for _ in 0..steps {
            let q = Tensor::from_f64(vec![b, 1, h, k], rng.randn(b * h * k))
                .unwrap()
                .to_dtype(dtype);
            let kk = Tensor::from_f64(vec![b, 1, h, k], rng.randn(b * h * k))
                .unwrap()
                .to_dtype(dtype);
            let vv = Tensor::from_f64(vec![b, 1, h, v], rng.randn(b * h * v))
                .unwrap()
                .to_dtype(dtype);
            let gshape = match kind {
                GateKind::PerHead => vec![h],
                GateKind::Scalar => vec![b, 1, h],
                _ => vec![b, 1, h, k],
            };
            let n: usize = gshape.iter().product();
            let g = Tensor::from_f64(gshape, logsigmoid_gates(&mut rng, n, 1.0))
                .unwrap()
                .to_dtype(DType::F32);
            let gate = match kind {
                GateKind::PerHead => Gate::PerHead(&g),
                GateKind::Scalar => Gate::Scalar(&g),
                _ => Gate::Vector(&g),
            };
            let o = linattn::linear::cuda::decode_step(&ctx, &mut state, &q, &kk, &vv, gate, None)
                .unwrap();
            let g64 = g.to_f64_vec();
            let ref_gate = linattn::reference::linear::Gate::from_kind(kind, &g64);
            let o_ref = linattn::reference::linear::decode_step(
                &dims,
                &mut ref_state,
                &q.to_f64_vec(),
                &kk.to_f64_vec(),
                &vv.to_f64_vec(),
                ref_gate,
                (k as f64).powf(-0.5),
            );
            worst = worst.max(linattn::reference::rel_rms(&o.to_f64_vec(), &o_ref));
            worst = worst.max(linattn::reference::rel_rms(&state.to_f64_vec(), &ref_state));
        }
        println!("decode {kind:?} {dtype}: worst rel err over {steps} steps {worst:.2e}");
        assert!(worst <= 1e-5, "{kind:?} {dtype}: {worst:e}");
    }
}

/// Bidirectional problems keep no state: asking the device API for one is an error, not a
/// silently unwritten buffer.
#[test]
fn device_api_rejects_a_final_state_request_without_one() {
    let Some(ctx) = context() else { return };
    let case = Case::bidirectional("lion", (1, 20, 1, 16, 16), GateKind::Scalar);
    let inputs = Inputs::draw(&case, DType::BF16, 1);
    let p = inputs.problem();
    let spec = p.validate().unwrap();
    assert_eq!(spec.direction, Direction::Bidirectional);
    let dev = DeviceInputs::new(&ctx, &p);
    let problem = dev.problem(&spec, &p);
    let mut o = poisoned(&ctx, spec.dims.v_len());
    let mut ht = poisoned(&ctx, spec.dims.state_len());
    let r = linattn::linear::cuda::device::forward(
        &ctx,
        ctx.stream(),
        &problem,
        Form::Chunkwise { chunk: 64 },
        DeviceForward {
            o: &mut o,
            ht: Some(&mut ht),
        },
    );
    assert!(
        matches!(r, Err(linattn::Error::InvalidArgument(_))),
        "{:?}",
        r.err()
    );
}

/// LightNet on the cuda backend (the gate transform on the host, the engine on the GPU) against
/// the f64 reference: causal with an initial state and varlen, and the non-causal form; f32
/// inputs, so the tolerance is the f32 one (1e-5 relative RMS) on `o` and every gradient.
#[test]
fn lightnet_on_the_cuda_engine() {
    use linattn::lightnet::{self, LightNet};
    let Some(ctx) = context() else { return };
    let backend = Backend::Cuda(ctx);
    let (t, h, k, v) = (200, 2, 64, 64);
    let mut rng = Rng::new(17);
    let mut tensor = |shape: Vec<usize>, scale: f64| {
        let n = shape.iter().product();
        let data = rng.randn(n).into_iter().map(|x| x * scale).collect();
        Tensor::from_f64(shape, data).unwrap().to_dtype(DType::F32)
    };
    let q = tensor(vec![1, t, h, k], 1.0);
    let kl = tensor(vec![1, t, h, k], 2.0);
    let vv = tensor(vec![1, t, h, v], 1.0);
    let d_o = tensor(vec![1, t, h, v], 1.0);
    let cu: Vec<i64> = vec![0, 1, 100, 200];
    let s0 = tensor(vec![3, h, k, v], 1.0);
    let z0 = tensor(vec![3, h, k], 1.0);
    let cases = [
        ("causal", LightNet::causal(&q, &kl, &vv)),
        (
            "causal varlen h0",
            LightNet::causal(&q, &kl, &vv)
                .with_cu_seqlens(&cu)
                .with_initial_state(&s0, &z0),
        ),
        ("non-causal", LightNet::non_causal(&q, &kl, &vv)),
    ];
    let mut failed = Vec::new();
    for (name, args) in &cases {
        for form in [Form::Chunkwise { chunk: 64 }, Form::Recurrent] {
            let got = lightnet::forward(&backend, args, form).unwrap();
            let want = lightnet::forward(&Backend::Cpu, args, form).unwrap();
            let gg = lightnet::backward(&backend, args, form, &d_o).unwrap();
            let gw = lightnet::backward(&Backend::Cpu, args, form, &d_o).unwrap();
            let errs = [
                ("o", &got.o, &want.o),
                ("dq", &gg.dq, &gw.dq),
                ("dk", &gg.dk, &gw.dk),
                ("dv", &gg.dv, &gw.dv),
            ]
            .map(|(n, a, b)| {
                (
                    n,
                    linattn::reference::rel_rms(&a.to_f64_vec(), &b.to_f64_vec()),
                )
            });
            println!("lightnet {name} {form:?}: {errs:?}");
            if errs.iter().any(|(_, e)| e.is_nan() || *e > 1e-5) {
                failed.push(format!("{name} {form:?}"));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
}

/// The public `linear::decode_step` on the cuda backend equals the CPU one over a chain of steps.
#[test]
fn public_decode_step_matches_the_cpu() {
    let Some(ctx) = context() else { return };
    let backend = Backend::Cuda(ctx);
    let (b, h, k, v) = (2, 3, 64, 32);
    let mut rng = Rng::new(23);
    let mut state_gpu = Tensor::from_f64(vec![b, h, k, v], rng.randn(b * h * k * v)).unwrap();
    let mut state_cpu = state_gpu.clone();
    let mut worst: f64 = 0.0;
    for _ in 0..8 {
        let mut draw = |shape: Vec<usize>| {
            let n = shape.iter().product();
            Tensor::from_f64(shape, rng.randn(n))
                .unwrap()
                .to_dtype(DType::F32)
        };
        let (q, kk, vv) = (
            draw(vec![b, 1, h, k]),
            draw(vec![b, 1, h, k]),
            draw(vec![b, 1, h, v]),
        );
        let g = Tensor::from_f64(vec![b, 1, h, k], logsigmoid_gates(&mut rng, b * h * k, 1.0))
            .unwrap()
            .to_dtype(DType::F32);
        let gpu = linear::decode_step(&backend, &state_gpu, &q, &kk, &vv, Gate::Vector(&g), None)
            .unwrap();
        let cpu = linear::decode_step(
            &Backend::Cpu,
            &state_cpu,
            &q,
            &kk,
            &vv,
            Gate::Vector(&g),
            None,
        )
        .unwrap();
        worst = worst.max(linattn::reference::rel_rms(
            &gpu.o.to_f64_vec(),
            &cpu.o.to_f64_vec(),
        ));
        state_gpu = gpu.state;
        state_cpu = cpu.state;
    }
    println!("public decode step, 8 steps: worst rel err {worst:.2e}");
    assert!(worst <= 1e-5, "{worst:e}");
}

/// The device-resident API checks values on the device by default: a positive gate (30.0) is
/// `InvalidGate` naming the element, not an `Ok` full of NaN; with the check off the kernels run.
#[test]
fn device_api_checks_values_by_default() {
    let Some(ctx) = context() else { return };
    let case = Case::causal("gla", (1, 40, 2, 16, 16), GateKind::Scalar);
    let inputs = Inputs::draw(&case, DType::F32, 3);
    let p = inputs.problem();
    let spec = p.validate().unwrap();
    let dev = DeviceInputs::new(&ctx, &p);
    let mut gates = p.gate.tensor().unwrap().to_f64_vec();
    for g in &mut gates[33..] {
        *g = 30.0;
    }
    let g32: Vec<f32> = gates.iter().map(|&x| x as f32).collect();
    let bad_gate = ctx.stream().clone_htod(&g32).unwrap();
    let mut problem = dev.problem(&spec, &p);
    problem.gate = linattn::linear::cuda::device::DeviceGate::Scalar(&bad_gate);
    let mut o = poisoned(&ctx, spec.dims.v_len());
    let mut ht = poisoned(&ctx, spec.dims.state_len());
    fn run<'a>(
        ctx: &'a CudaContext,
        problem: &linattn::linear::cuda::device::DeviceProblem<'a>,
        o: &'a mut CudaSlice<f32>,
        ht: &'a mut CudaSlice<f32>,
    ) -> Result<()> {
        linattn::linear::cuda::device::forward(
            ctx,
            ctx.stream(),
            problem,
            Form::Chunkwise { chunk: 64 },
            DeviceForward { o, ht: Some(ht) },
        )
    }
    match run(&ctx, &problem, &mut o, &mut ht) {
        Err(linattn::Error::InvalidGate {
            tensor,
            index,
            value,
        }) => {
            assert_eq!((tensor.as_str(), index, value), ("g", 33, 30.0));
        }
        other => panic!("expected InvalidGate, got {:?}", other.err()),
    }
    problem.value_check = linattn::ValueCheck::Off;
    run(&ctx, &problem, &mut o, &mut ht).expect("no check: the kernels run");
}

/// The device-resident decoding step: the state stays on the GPU across a chain of tokens and
/// the outputs and final state match the CPU's host decoding step.
#[test]
fn device_decode_step_keeps_the_state_on_the_gpu() {
    use linattn::linear::cuda::device::{DeviceGate, DeviceProblem, decode_step};
    let Some(ctx) = context() else { return };
    let (b, h, k, v) = (2, 3, 64, 32);
    let mut rng = Rng::new(29);
    let s = ctx.stream();
    let mut state_cpu = Tensor::from_f64(vec![b, h, k, v], rng.randn(b * h * k * v))
        .unwrap()
        .to_dtype(DType::F32);
    let mut state = s.clone_htod(&state_cpu.to_f32_vec()).unwrap();
    let mut worst: f64 = 0.0;
    for _ in 0..8 {
        let mut draw = |n: usize| -> Vec<f32> { rng.randn(n).iter().map(|&x| x as f32).collect() };
        let (q, kk, vv) = (draw(b * h * k), draw(b * h * k), draw(b * h * v));
        let g: Vec<f32> = logsigmoid_gates(&mut rng, b * h, 1.0)
            .iter()
            .map(|&x| x as f32)
            .collect();
        let t = |shape: Vec<usize>, d: &[f32]| Tensor::from_f32(shape, d.to_vec()).unwrap();
        let cpu = linear::decode_step(
            &Backend::Cpu,
            &state_cpu,
            &t(vec![b, 1, h, k], &q),
            &t(vec![b, 1, h, k], &kk),
            &t(vec![b, 1, h, v], &vv),
            Gate::Scalar(&t(vec![b, 1, h], &g)),
            None,
        )
        .unwrap();
        let (qd, kd, vdv, gd) = (
            s.clone_htod(&q).unwrap(),
            s.clone_htod(&kk).unwrap(),
            s.clone_htod(&vv).unwrap(),
            s.clone_htod(&g).unwrap(),
        );
        let token = DeviceProblem {
            dims: linattn::linear::Dims { b, t: 1, h, k, v },
            q: DeviceTensor::F32(&qd),
            k: DeviceTensor::F32(&kd),
            v: DeviceTensor::F32(&vdv),
            gate: DeviceGate::Scalar(&gd),
            gate_bwd: None,
            direction: Direction::Causal,
            scale: None,
            normalize: None,
            h0: None,
            cu_seqlens: None,
            value_check: linattn::ValueCheck::On,
        };
        let mut o = s.alloc_zeros::<f32>(b * h * v).unwrap();
        decode_step(&ctx, s, &token, &mut state, &mut o).unwrap();
        let o_host: Vec<f64> = s
            .clone_dtoh(&o)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        worst = worst.max(linattn::reference::rel_rms(&o_host, &cpu.o.to_f64_vec()));
        state_cpu = cpu.state;
    }
    let state_host: Vec<f64> = s
        .clone_dtoh(&state)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    worst = worst.max(linattn::reference::rel_rms(
        &state_host,
        &state_cpu.to_f64_vec(),
    ));
    println!("device decode step, 8 steps: worst rel err {worst:.2e}");
    assert!(worst <= 1e-5, "{worst:e}");
}
