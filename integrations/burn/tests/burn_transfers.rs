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
}
