//! The CUDA path makes no host copy: linattn's transfer counter
//! ([`linattn_candle::host_transfer_bytes`]) stays put across forward and backward of the engine
//! (every gate kind, h0 / ht) and of dense attention, and across fused optimizer steps after the
//! first (which uploads the starting weights). Needs the `cuda` feature and a GPU; prints
//! `skipped: ...` otherwise.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use linattn::optim::{OptimizerConfig, Schedule};
use linattn_candle::{BlockSparseAttention, FusedOptimizer, Gate, LinearAttention};

fn cuda() -> Option<Device> {
    let device = common::devices().into_iter().find(Device::is_cuda);
    if device.is_none() {
        println!("skipped: no CUDA device");
    }
    device
}

#[test]
fn the_cuda_path_moves_nothing_through_the_host() {
    let Some(dev) = cuda() else { return };
    let (b, t, h, k, v) = (2, 100, 2, 64, 64);
    let r = |shape: &[usize], dtype| {
        Var::from_tensor(
            &Tensor::randn(0f32, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap()
    };
    let (q, kk, vv) = (
        r(&[b, t, h, k], DType::BF16),
        r(&[b, t, h, k], DType::BF16),
        r(&[b, t, h, v], DType::BF16),
    );
    let g = Var::from_tensor(
        &(Tensor::rand(0.5f32, 0.99, (b, t, h, k), &dev)
            .unwrap()
            .log()
            .unwrap()),
    )
    .unwrap();
    let h0 = r(&[b, h, k, v], DType::F32);
    // Warm up (kernels compiled and loaded), then count.
    let run = || {
        let out = LinearAttention::causal(q.as_tensor(), kk.as_tensor(), vv.as_tensor())
            .with_gate(Gate::Vector(g.as_tensor().clone()))
            .with_h0(h0.as_tensor())
            .forward()
            .unwrap();
        let loss = (out.o.to_dtype(DType::F32).unwrap().sum_all().unwrap()
            + out.ht.unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let a = BlockSparseAttention::dense(q.as_tensor(), kk.as_tensor(), vv.as_tensor())
            .with_causal(true)
            .forward()
            .unwrap();
        let ga =
            a.o.to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        (grads, ga)
    };
    run();
    let before = linattn_candle::host_transfer_bytes();
    let (grads, _) = run();
    assert_eq!(
        linattn_candle::host_transfer_bytes(),
        before,
        "engine and attention"
    );
    let vars = vec![h0.clone(), g.clone()];
    let mut opt = FusedOptimizer::new(
        vars,
        &OptimizerConfig::adamw(1e-3),
        &Schedule::Constant { warmup: 0 },
        4,
    )
    .unwrap();
    opt.step(&grads).unwrap();
    let before = linattn_candle::host_transfer_bytes();
    opt.step(&grads).unwrap();
    opt.step(&grads).unwrap();
    assert_eq!(
        linattn_candle::host_transfer_bytes(),
        before,
        "optimizer steps"
    );
}
