//! The cube backend's API beyond the engine matrix: the decoding step, the device-resident API,
//! half-precision inputs where the runtime has them (and a clear error where it does not), and
//! the typed errors for what the kernels do not take.
//!
//! Prints `skipped: no wgpu adapter` and passes when there is none (fails instead when
//! `LINATTN_REQUIRE_WGPU` is set, as in CI).

use linattn::cube::{CubeContext, DeviceTensor};
use linattn::linear::cube::{DeviceGate, DeviceLinearAttention, backward_device, forward_device};
use linattn::linear::{self, Form, Gate, LinearAttention};
use linattn::reference::testing::{Rng, logsigmoid_gates};
use linattn::reference::{max_abs_diff, rel_rms, within_tolerance};
use linattn::{Backend, DType, Error, Tensor};

fn cube() -> Option<(Backend, CubeContext)> {
    match CubeContext::shared() {
        Ok(ctx) => {
            ctx.set_poison_outputs(true);
            Some((Backend::Cube(ctx.clone()), ctx))
        }
        Err(e) => {
            // CI (.ci/run) sets LINATTN_REQUIRE_WGPU: there a missing adapter is a failure.
            assert!(
                std::env::var_os("LINATTN_REQUIRE_WGPU").is_none(),
                "LINATTN_REQUIRE_WGPU is set but there is no wgpu adapter: {e}"
            );
            println!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

fn f32t(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
    Tensor::from_f64(shape, data).unwrap().to_dtype(DType::F32)
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, threshold: f64) {
    let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
    assert!(
        within_tolerance(&a, &b, threshold),
        "{name}: rel rms {:.3e}, max abs {:.3e} (threshold {threshold:e})",
        rel_rms(&a, &b),
        max_abs_diff(&a, &b)
    );
}

/// Decoding steps on the cube backend against the reference's `decode_step`, chained over a
/// sequence, for every gate kind; the last state also equals the recurrent form's `ht`.
#[test]
fn decode_steps_match_reference_and_scan() {
    let Some((cube, _)) = cube() else { return };
    let (b, t, h, k, v) = (2, 9, 3, 16, 24);
    let mut rng = Rng::new(11);
    let q = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
    let kk = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
    let vv = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
    let h0 = f32t(vec![b, h, k, v], rng.randn(b * h * k * v));
    let per_head = f32t(vec![h], logsigmoid_gates(&mut rng, h, 1.0));
    let scalar = f32t(vec![b, t, h], logsigmoid_gates(&mut rng, b * t * h, 1.0));
    let vector = f32t(
        vec![b, t, h, k],
        logsigmoid_gates(&mut rng, b * t * h * k, 1.0),
    );
    // Token `s` of a `[B, T, H, D]` tensor as `[B, 1, H, D]`.
    let token = |x: &Tensor, s: usize| {
        let shape = x.shape();
        let (bb, tt, row) = (shape[0], shape[1], shape[2..].iter().product::<usize>());
        let data = x.to_f32_vec();
        let picked: Vec<f32> = (0..bb)
            .flat_map(|bi| data[(bi * tt + s) * row..(bi * tt + s + 1) * row].to_vec())
            .collect();
        let mut out_shape = shape.to_vec();
        out_shape[1] = 1;
        Tensor::from_f32(out_shape, picked).unwrap()
    };
    for kind in 0..4 {
        let mut state_cube = h0.clone();
        let mut state_cpu = h0.clone();
        for s in 0..t {
            let (qs, ks, vs) = (token(&q, s), token(&kk, s), token(&vv, s));
            let gate_token = match kind {
                2 => Some(token(&scalar.clone().reshape(vec![b, t, h, 1]).unwrap(), s)),
                3 => Some(token(&vector, s)),
                _ => None,
            };
            let gate_token = gate_token.map(|g| {
                if kind == 2 {
                    g.reshape(vec![b, 1, h]).unwrap()
                } else {
                    g
                }
            });
            let gate = match kind {
                0 => Gate::None,
                1 => Gate::PerHead(&per_head),
                2 => Gate::Scalar(gate_token.as_ref().unwrap()),
                _ => Gate::Vector(gate_token.as_ref().unwrap()),
            };
            let got = linear::decode_step(&cube, &state_cube, &qs, &ks, &vs, gate, None).unwrap();
            let want =
                linear::decode_step(&Backend::Cpu, &state_cpu, &qs, &ks, &vs, gate, None).unwrap();
            assert_eq!(got.o.shape(), &[b, 1, h, v]);
            assert_close(&format!("kind {kind} step {s} o"), &got.o, &want.o, 1e-5);
            assert_close(
                &format!("kind {kind} step {s} state"),
                &got.state,
                &want.state,
                1e-5,
            );
            state_cube = got.state;
            state_cpu = want.state.to_dtype(DType::F32);
        }
        let gate = match kind {
            0 => Gate::None,
            1 => Gate::PerHead(&per_head),
            2 => Gate::Scalar(&scalar),
            _ => Gate::Vector(&vector),
        };
        let scan = linear::forward(
            &Backend::Cpu,
            &LinearAttention::causal(&q, &kk, &vv)
                .with_gate(gate)
                .with_h0(&h0),
            Form::Recurrent,
        )
        .unwrap();
        assert_close(
            &format!("kind {kind} final state"),
            &state_cube,
            &scan.ht.unwrap(),
            1e-5,
        );
    }
}

/// Decoding validates its shapes: a two-token query is refused with a typed error.
#[test]
fn decode_step_rejects_bad_shapes() {
    let Some((cube, _)) = cube() else { return };
    let state = Tensor::zeros(vec![1, 2, 4, 5], DType::F32);
    let q = Tensor::zeros(vec![1, 2, 2, 4], DType::F32);
    let v = Tensor::zeros(vec![1, 1, 2, 5], DType::F32);
    let err = linear::decode_step(&cube, &state, &q, &q, &v, Gate::None, None).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
}

/// The device-resident API gives what the host path gives, without leaving the device between
/// forward and backward.
#[test]
fn device_resident_api_matches_host_path() {
    let Some((cube, ctx)) = cube() else { return };
    let (b, t, h, k, v) = (1, 40, 2, 16, 8);
    let mut rng = Rng::new(5);
    let q = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
    let kk = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
    let vv = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
    let g = f32t(vec![b, t, h], logsigmoid_gates(&mut rng, b * t * h, 1.0));
    let d_o = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
    let form = Form::Chunkwise { chunk: 16 };
    let host = LinearAttention::bidirectional(&q, &kk, &vv).with_gate(Gate::Scalar(&g));
    let host_out = linear::forward(&cube, &host, form).unwrap();
    let host_grads = linear::backward(&cube, &host, form, &d_o, None).unwrap();

    let up = |name: &str, x: &Tensor| ctx.upload(name, x).unwrap();
    let (dq, dk, dv, dg, ddo) = (
        up("q", &q),
        up("k", &kk),
        up("v", &vv),
        up("g", &g),
        up("do", &d_o),
    );
    let device =
        DeviceLinearAttention::bidirectional(&dq, &dk, &dv).with_gate(DeviceGate::Scalar(&dg));
    let out = forward_device(&ctx, &device, form).unwrap();
    let grads = backward_device(&ctx, &device, form, &ddo, None).unwrap();
    assert_eq!(out.o.shape(), &[b, t, h, v]);
    assert_eq!(ctx.download(&out.o).unwrap(), host_out.o);
    assert_eq!(ctx.download(&grads.dq).unwrap(), host_grads.dq);
    assert_eq!(
        ctx.download(&grads.dg.unwrap()).unwrap(),
        host_grads.dg.unwrap()
    );

    // A buffer far too small for its claimed shape is refused (sizes are checked in bytes, and
    // runtimes round allocations up).
    let small = ctx
        .upload("x", &Tensor::zeros(vec![4], DType::F32))
        .unwrap();
    let err =
        DeviceTensor::from_handle(small.into_handle(), vec![1 << 20], DType::F32).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// f16 inputs (where the runtime stores and converts f16; llvmpipe does) are widened on the device
/// and meet ops.md's half-precision thresholds; bf16 where the runtime has no bf16 (llvmpipe)
/// and f64 (never: the kernels compute in f32) are refused with `UnsupportedDtype`.
#[test]
fn half_precision_inputs_or_clear_errors() {
    let Some((cube, ctx)) = cube() else { return };
    let (b, t, h, k, v) = (1, 70, 2, 32, 32);
    let mut rng = Rng::new(9);
    let q64 = Tensor::from_f64(vec![b, t, h, k], rng.randn(b * t * h * k)).unwrap();
    let k64 = Tensor::from_f64(vec![b, t, h, k], rng.randn(b * t * h * k)).unwrap();
    let v64 = Tensor::from_f64(vec![b, t, h, v], rng.randn(b * t * h * v)).unwrap();
    let g = f32t(
        vec![b, t, h, k],
        logsigmoid_gates(&mut rng, b * t * h * k, 1.0),
    );
    let d_o = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
    for dtype in [DType::F16, DType::BF16] {
        let (q, kk, vv) = (
            q64.to_dtype(dtype),
            k64.to_dtype(dtype),
            v64.to_dtype(dtype),
        );
        let problem = LinearAttention::causal(&q, &kk, &vv).with_gate(Gate::Vector(&g));
        let form = Form::Chunkwise { chunk: 64 };
        if !ctx.supports_dtype(dtype) {
            let err = linear::forward(&cube, &problem, form).unwrap_err();
            assert!(
                matches!(err, Error::UnsupportedDtype { dtype: d, .. } if d == dtype),
                "{err}"
            );
            println!("{dtype}: refused on {} ({err})", ctx.adapter_name());
            continue;
        }
        // The reference sees the same rounded inputs, so this measures the kernels alone.
        let got = linear::forward(&cube, &problem, form).unwrap();
        let want = linear::forward(&Backend::Cpu, &problem, Form::Recurrent).unwrap();
        assert_close(&format!("{dtype} o"), &got.o, &want.o, 4e-3);
        let got = linear::backward(&cube, &problem, form, &d_o, None).unwrap();
        let want = linear::backward(&Backend::Cpu, &problem, Form::Recurrent, &d_o, None).unwrap();
        assert_close(&format!("{dtype} dq"), &got.dq, &want.dq, 5e-3);
        assert_close(&format!("{dtype} dk"), &got.dk, &want.dk, 5e-3);
        assert_close(&format!("{dtype} dv"), &got.dv, &want.dv, 5e-3);
        assert_close(
            &format!("{dtype} dg"),
            got.dg.as_ref().unwrap(),
            want.dg.as_ref().unwrap(),
            5e-3,
        );
        println!("{dtype}: ok on {}", ctx.adapter_name());
    }
    // f64 inputs run too: the host API narrows them to f32 on the host (documented), so the
    // result is exactly that of the f32 copies.
    let problem = LinearAttention::causal(&q64, &k64, &v64);
    let got = linear::forward(&cube, &problem, Form::Recurrent).unwrap();
    let (q32, k32, v32) = (
        q64.to_dtype(DType::F32),
        k64.to_dtype(DType::F32),
        v64.to_dtype(DType::F32),
    );
    let want = linear::forward(
        &cube,
        &LinearAttention::causal(&q32, &k32, &v32),
        Form::Recurrent,
    )
    .unwrap();
    assert_eq!(got.o.to_f64_vec(), want.o.to_f64_vec());
}

/// What the kernels do not take is refused with a typed error, not computed wrongly: chunks
/// above 64, head dims above 512, and on llvmpipe sequences beyond its loop limit.
#[test]
fn unsupported_configurations_are_refused() {
    let Some((cube, ctx)) = cube() else { return };
    let x = Tensor::zeros(vec![1, 8, 1, 4], DType::F32);
    let problem = LinearAttention::causal(&x, &x, &x);
    let err = linear::forward(&cube, &problem, Form::Chunkwise { chunk: 65 }).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let wide = Tensor::zeros(vec![1, 2, 1, 513], DType::F32);
    let v = Tensor::zeros(vec![1, 2, 1, 4], DType::F32);
    let problem = LinearAttention::causal(&wide, &wide, &v);
    let err = linear::forward(&cube, &problem, Form::Recurrent).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedHeadDim { dim: 513, .. }),
        "{err}"
    );
    if ctx.is_llvmpipe() {
        let t = linattn::cube::LLVMPIPE_MAX_SEQUENCE + 1;
        let long = Tensor::zeros(vec![1, t, 1, 1], DType::F32);
        let problem = LinearAttention::causal(&long, &long, &long);
        let err = linear::forward(&cube, &problem, Form::Chunkwise { chunk: 64 }).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
    }
}

/// The device-resident API checks values on the device by default: a positive gate (30.0) or a
/// NaN input is the host API's typed error, naming the tensor and the first bad element, not an
/// `Ok` full of NaN; with the check off the caller gets what the kernels compute.
#[test]
fn device_resident_api_checks_values_by_default() {
    use linattn::cube::ValueCheck;
    let Some((_, ctx)) = cube() else { return };
    let (b, t, h, k, v) = (1, 300, 2, 8, 4);
    let mut rng = Rng::new(31);
    let up = |name: &str, shape: Vec<usize>, data: Vec<f64>| {
        ctx.upload(name, &f32t(shape, data)).unwrap()
    };
    let q = up("q", vec![b, t, h, k], rng.randn(b * t * h * k));
    let kk = up("k", vec![b, t, h, k], rng.randn(b * t * h * k));
    let vv = up("v", vec![b, t, h, v], rng.randn(b * t * h * v));
    let mut gates = logsigmoid_gates(&mut rng, b * t * h, 1.0);
    let good_g = up("g", vec![b, t, h], gates.clone());
    for x in &mut gates[417..] {
        *x = 30.0; // growth, not decay, from token 417 / 2 on
    }
    let bad_g = up("g", vec![b, t, h], gates);
    let form = Form::Chunkwise { chunk: 16 };

    let good = DeviceLinearAttention::causal(&q, &kk, &vv).with_gate(DeviceGate::Scalar(&good_g));
    assert!(forward_device(&ctx, &good, form).is_ok());
    let bad = DeviceLinearAttention::causal(&q, &kk, &vv).with_gate(DeviceGate::Scalar(&bad_g));
    match forward_device(&ctx, &bad, form) {
        Err(Error::InvalidGate {
            tensor,
            index,
            value,
        }) => {
            assert_eq!((tensor.as_str(), index, value), ("g", 417, 30.0));
        }
        other => panic!("expected InvalidGate, got {other:?}"),
    }
    let unchecked = bad.with_value_check(ValueCheck::Off);
    let out = forward_device(&ctx, &unchecked, form).expect("no check: the kernels run");
    let o = ctx.download(&out.o).unwrap().to_f64_vec();
    assert!(o.iter().any(|x| !x.is_finite()), "a gate of 30 overflows");

    let mut values = rng.randn(b * t * h * k);
    values[5] = f64::NAN;
    let nan_q = up("q", vec![b, t, h, k], values);
    let p = DeviceLinearAttention::causal(&nan_q, &kk, &vv).with_gate(DeviceGate::Scalar(&good_g));
    assert!(
        matches!(forward_device(&ctx, &p, form), Err(Error::NonFinite { ref tensor, index: 5, .. }) if tensor == "q")
    );
    // the backward pass checks its cotangent too
    let mut d = rng.randn(b * t * h * v);
    d[2] = f64::INFINITY;
    let d_o = up("do", vec![b, t, h, v], d);
    assert!(
        matches!(backward_device(&ctx, &good, form, &d_o, None), Err(Error::NonFinite { ref tensor, index: 2, .. }) if tensor == "do")
    );
}

/// The device-resident decoding step: the state stays on the device across a chain of tokens
/// and the outputs and final state match the CPU's host decoding step.
#[test]
fn device_decode_step_keeps_the_state_on_the_device() {
    use linattn::linear::cube::decode_step_device;
    let Some((_, ctx)) = cube() else { return };
    let (b, h, k, v) = (2, 2, 8, 4);
    let mut rng = Rng::new(41);
    let mut state_cpu = f32t(vec![b, h, k, v], rng.randn(b * h * k * v));
    let mut state_dev = ctx.upload("state", &state_cpu).unwrap();
    for step in 0..10 {
        let q = f32t(vec![b, 1, h, k], rng.randn(b * h * k));
        let kk = f32t(vec![b, 1, h, k], rng.randn(b * h * k));
        let vv = f32t(vec![b, 1, h, v], rng.randn(b * h * v));
        let g = f32t(vec![b, 1, h], logsigmoid_gates(&mut rng, b * h, 1.0));
        let want = linear::decode_step(
            &Backend::Cpu,
            &state_cpu,
            &q,
            &kk,
            &vv,
            Gate::Scalar(&g),
            None,
        )
        .unwrap();
        let up = |name: &str, t: &Tensor| ctx.upload(name, t).unwrap();
        let (qd, kd, vd, gd) = (up("q", &q), up("k", &kk), up("v", &vv), up("g", &g));
        let token = LinearAttention::causal(&qd, &kd, &vd).with_gate(Gate::Scalar(&gd));
        let o = decode_step_device(&ctx, &token, &mut state_dev).unwrap();
        assert_eq!(o.shape(), &[b, 1, h, v]);
        assert_close(
            &format!("o step {step}"),
            &ctx.download(&o).unwrap(),
            &want.o,
            1e-5,
        );
        state_cpu = want.state;
    }
    assert_close(
        "state",
        &ctx.download(&state_dev).unwrap(),
        &state_cpu,
        1e-5,
    );
    // a state of the wrong shape is the state's error
    let mut wrong = ctx
        .upload(
            "state",
            &f32t(vec![b, h, k, v + 1], vec![0.0; b * h * k * (v + 1)]),
        )
        .unwrap();
    let t = |n: usize, shape: Vec<usize>| ctx.upload("x", &f32t(shape, vec![0.1; n])).unwrap();
    let (q, kk, vv) = (
        t(b * h * k, vec![b, 1, h, k]),
        t(b * h * k, vec![b, 1, h, k]),
        t(b * h * v, vec![b, 1, h, v]),
    );
    let token = LinearAttention::causal(&q, &kk, &vv);
    let err = decode_step_device(&ctx, &token, &mut wrong).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { tensor, .. } if tensor == "state"),
        "{err}"
    );
    // A token with its own h0 (the state is passed apart) is refused.
    let err =
        decode_step_device(&ctx, &token.with_h0(&state_dev), &mut state_dev.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("h0")),
        "{err}"
    );
}

/// One builder for host and device tensors: the same generic function builds a GLA problem over
/// host `Tensor`s and over cube `DeviceTensor`s (`LinearAttention<'_, T>` for any `Shaped` T),
/// both validate to the same spec, and the host API and the device API compute the same
/// outputs; attention likewise (`Attention<'_, T>`, the device call planning its mask itself).
#[test]
fn one_builder_over_host_and_device_tensors() {
    use linattn::Shaped;
    use linattn::attention::{self, Attention, BlockMask};
    let Some((cube, ctx)) = cube() else { return };

    fn gla<'a, T: Shaped>(q: &'a T, k: &'a T, v: &'a T, g: &'a T) -> LinearAttention<'a, T> {
        LinearAttention::causal(q, k, v)
            .with_gate(Gate::Scalar(g))
            .with_scale(0.3)
    }
    fn masked<'a, T: Shaped>(q: &'a T, kv: &'a T, mask: &'a BlockMask) -> Attention<'a, T> {
        Attention::dense(q, kv, kv)
            .with_mask(mask)
            .with_causal(true)
    }

    let (b, t, h, k, v) = (1, 40, 2, 16, 8);
    let mut rng = Rng::new(31);
    let q = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
    let kk = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
    let vv = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
    let g = f32t(vec![b, t, h], logsigmoid_gates(&mut rng, b * t * h, 1.0));
    let up = |name: &str, x: &Tensor| ctx.upload(name, x).unwrap();
    let (qd, kd, vd, gd) = (up("q", &q), up("k", &kk), up("v", &vv), up("g", &g));

    let host = gla(&q, &kk, &vv, &g);
    let device: DeviceLinearAttention = gla(&qd, &kd, &vd, &gd);
    assert_eq!(
        host.validate_layout().unwrap(),
        device.validate_layout().unwrap()
    );
    let form = Form::Chunkwise { chunk: 16 };
    let want = linear::forward(&cube, &host, form).unwrap();
    let got = forward_device(&ctx, &device, form).unwrap();
    assert_close("o", &ctx.download(&got.o).unwrap(), &want.o, 1e-6);

    // Attention: T = S = 128 in blocks of 64, the lower-left block and the diagonal.
    let (t, d) = (128, 64);
    let mask = BlockMask::from_dense(2, 2, 64, 64, &[1, 0, 1, 1]).unwrap();
    let aq = f32t(vec![1, t, 1, d], rng.randn(t * d));
    let akv = f32t(vec![1, t, 1, d], rng.randn(t * d));
    let (aqd, akvd) = (up("q", &aq), up("kv", &akv));
    let host = masked(&aq, &akv, &mask);
    let device = masked(&aqd, &akvd, &mask);
    assert_eq!(
        host.validate_layout().unwrap(),
        device.validate_layout().unwrap()
    );
    let want = attention::forward(&cube, &host).unwrap();
    let got = attention::cube::forward_device(&ctx, &device).unwrap();
    assert_close("attention o", &ctx.download(&got.o).unwrap(), &want.o, 1e-6);
    assert_close(
        "attention lse",
        &ctx.download(&got.lse).unwrap(),
        &want.lse,
        1e-6,
    );
    // Its backward through the same builder, against the host API's.
    let d_o = f32t(vec![1, t, 1, d], rng.randn(t * d));
    let grads =
        attention::cube::backward_device(&ctx, &device, &got.o, &got.lse, &up("do", &d_o)).unwrap();
    let want = attention::backward(&cube, &host, &d_o).unwrap();
    assert_close(
        "attention dq",
        &ctx.download(&grads.dq).unwrap(),
        &want.dq,
        1e-6,
    );
    assert_close(
        "attention dk",
        &ctx.download(&grads.dk).unwrap(),
        &want.dk,
        1e-6,
    );
    // A device problem whose mask does not fit its plan's blocks is refused, not misread.
    let dense_128 = attention::AttentionPlan::new(None, t, t, 128, 128, true).unwrap();
    let plan = attention::cube::CubeAttentionPlan::new(&ctx, &dense_128).unwrap();
    let err = plan.forward(&device).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("blocks")),
        "{err}"
    );
}
