//! No host round trip on the device path: linattn's counter of host<->device bytes
//! ([`linattn_burn::host_transfer_bytes`]) does not move across a forward and backward pass on
//! burn's wgpu device. Alone in its test binary, so no other test's transfers are counted.

mod common;

use burn::tensor::Tensor;
use common::*;
use linattn_burn::{Form, Gate, LinearAttention};

#[test]
fn forward_and_backward_on_wgpu_copy_nothing_to_the_host() {
    let Some(device) = wgpu() else { return };
    let device = device.autodiff();
    let (b, t, h, k, v) = (2, 45, 2, 32, 16);
    let data = |seed: u64, shape: [usize; 4], lo: f64, hi: f64| {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let n = shape.iter().product();
        tensor(&values(&mut rng, n, lo, hi), shape, &device).require_grad()
    };
    let q = data(1, [b, t, h, k], -1.0, 1.0);
    let kk = data(2, [b, t, h, k], -1.0, 1.0);
    let vv = data(3, [b, t, h, v], -1.0, 1.0);
    let g = data(4, [b, t, h, k], -1.0, -0.01);
    let h0 = data(5, [b, h, k, v], -1.0, 1.0);
    for (form, check) in [
        (Form::Chunkwise { chunk: 16 }, false),
        (Form::Recurrent, false),
        (Form::Parallel, false),
        // The value check reads one boolean per input back through burn's own ops; linattn
        // itself still moves nothing.
        (Form::Chunkwise { chunk: 16 }, true),
    ] {
        // Finish every pending upload of the inputs before counting.
        let _ = q.clone().sum().into_scalar::<f32>();
        let before = linattn_burn::host_transfer_bytes();
        let mut p = LinearAttention::causal(q.clone(), kk.clone(), vv.clone())
            .with_gate(Gate::Vector(g.clone()))
            .with_h0(h0.clone())
            .with_final_state()
            .with_form(form);
        if !check {
            p = p.without_value_check();
        }
        let out = p.forward().unwrap();
        let loss = out.o.clone().powf_scalar(2.0).sum() + out.ht.unwrap().sum();
        let grads = loss.backward();
        let grad_sum: Tensor<1> = q.grad(&grads).unwrap().sum()
            + g.grad(&grads).unwrap().sum()
            + h0.grad(&grads).unwrap().sum();
        // Waits for the fusion stream, so every kernel of the pass has run.
        let value = grad_sum.into_scalar::<f32>();
        assert!(value.is_finite());
        let moved = linattn_burn::host_transfer_bytes() - before;
        assert_eq!(
            moved, 0,
            "{form:?} (value check {check}): linattn moved {moved} bytes"
        );
        println!("{form:?}, value check {check}: 0 bytes through linattn");
    }

    // The counter is live: a packed variable-length problem uploads its host `cu_seqlens`
    // offsets (tables of a few integers per sequence), and that is counted.
    let before = linattn_burn::host_transfer_bytes();
    let q1 = q.clone().slice(0..1);
    let k1 = kk.clone().slice(0..1);
    let v1 = vv.clone().slice(0..1);
    let out = LinearAttention::causal(q1, k1, v1)
        .with_cu_seqlens(vec![0, 20, t as i64])
        .without_value_check()
        .forward()
        .unwrap();
    let _ = out.o.sum().into_scalar::<f32>();
    let moved = linattn_burn::host_transfer_bytes() - before;
    assert!(moved > 0, "the varlen offsets upload is not counted");
    println!("varlen: {moved} bytes of offsets tables");

    // LightNet and the decoding step move nothing either.
    let before = linattn_burn::host_transfer_bytes();
    let out = linattn_burn::LightNet::causal(q.clone(), kk.clone(), vv.clone())
        .with_final_state()
        .without_value_check()
        .forward()
        .unwrap();
    let grads = out.o.powf_scalar(2.0).sum().backward();
    let (s, _z) = out.state.unwrap();
    let one = |x: &Tensor<4>| x.clone().slice([0..b, 0..1]).detach();
    let (o1, _) =
        linattn_burn::decode_step(s.detach(), one(&q), one(&kk), one(&vv), Gate::None, None)
            .unwrap();
    let value = q.grad(&grads).unwrap().sum().into_scalar::<f32>() + o1.sum().into_scalar::<f32>();
    assert!(value.is_finite());
    let moved = linattn_burn::host_transfer_bytes() - before;
    assert_eq!(moved, 0, "LightNet + decode: linattn moved {moved} bytes");
    println!("LightNet forward + backward, decode step: 0 bytes through linattn");

    // Attention: the first call with a mask uploads its plan (the mask's block lists, host
    // data); later calls reuse it from the per-device cache and move nothing.
    let qa = data(8, [b, 48, h, 16], -1.0, 1.0);
    for call in 0..2 {
        let before = linattn_burn::host_transfer_bytes();
        let out = linattn_burn::BlockSparseAttention::dense(qa.clone(), qa.clone(), qa.clone())
            .with_causal(true)
            .without_value_check()
            .forward()
            .unwrap();
        let grads = out.o.powf_scalar(2.0).sum().backward();
        let _ = qa.grad(&grads).unwrap().sum().into_scalar::<f32>();
        let moved = linattn_burn::host_transfer_bytes() - before;
        if call == 0 {
            println!("attention call 0 (uploads the plan): {moved} bytes");
        } else {
            assert_eq!(
                moved, 0,
                "attention call {call}: linattn moved {moved} bytes"
            );
            println!("attention call {call}: 0 bytes through linattn");
        }
    }

    // The fused optimizer: its state is created at the first step (one upload of the starting
    // weights); every later step moves nothing.
    let w = data(6, [1, 1, 32, 16], -0.2, 0.2);
    let model = Wrapper {
        w: burn::module::Param::from_tensor(w.flatten(0, 2).detach()),
    };
    let config = linattn::optim::OptimizerConfig::adamw(1e-2);
    let schedule = linattn::optim::Schedule::cosine(2, 10);
    let mut opt = linattn_burn::FusedOptimizer::new(&model, &config, &schedule, 10).unwrap();
    let mut model = model;
    let x: Tensor<2> = data(7, [1, 1, 8, 32], -1.0, 1.0).flatten(0, 2).detach();
    for step in 0..3 {
        let before = linattn_burn::host_transfer_bytes();
        let grads = x
            .clone()
            .matmul(model.w.val())
            .powf_scalar(2.0)
            .mean()
            .backward();
        model = opt.step(model, &grads).unwrap();
        let _ = model.w.val().sum().into_scalar::<f32>();
        let moved = linattn_burn::host_transfer_bytes() - before;
        if step == 0 {
            println!("optimizer step 0 (creates the state): {moved} bytes");
        } else {
            assert_eq!(
                moved, 0,
                "optimizer step {step}: linattn moved {moved} bytes"
            );
            println!("optimizer step {step}: 0 bytes through linattn");
        }
    }
}

#[derive(burn::module::Module, Debug)]
struct Wrapper {
    w: burn::module::Param<Tensor<2>>,
}
