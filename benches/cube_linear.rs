//! Chunkwise vs recurrent vs parallel forms of the CubeCL engine over the sequence length, on
//! whatever wgpu adapter is present (llvmpipe on a CPU). Causal GLA (vector gates), forward and
//! forward + backward, through the device-resident API (inputs uploaded once; each iteration
//! runs the launches and waits for them). Results: `benches/RESULTS.md`.
//!
//! `cargo bench --bench cube_linear` (prints `skipped: no wgpu adapter` without one).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use linattn::cube::{CubeContext, DeviceTensor};
use linattn::linear::Form;
use linattn::linear::cube::{DeviceGate, DeviceLinearAttention, backward_device, forward_device};
use linattn::reference::testing::{Rng, logsigmoid_gates};
use linattn::{DType, Tensor};

/// Batch, heads, key and value head dims of every point.
const B: usize = 1;
const H: usize = 2;
const K: usize = 64;
const V: usize = 64;

fn forms() -> [(&'static str, Form); 4] {
    [
        ("chunkwise64", Form::Chunkwise { chunk: 64 }),
        ("chunkwise16", Form::Chunkwise { chunk: 16 }),
        ("recurrent", Form::Recurrent),
        ("parallel", Form::Parallel),
    ]
}

/// The quadratic form's forward + backward at T = 4096 takes minutes per iteration on llvmpipe;
/// its forward alone shows the T^2 growth.
fn skip_forward_backward(form: Form, t: usize) -> bool {
    form == Form::Parallel && t > 1024
}

/// Device tensors of one sequence length.
struct Point {
    t: usize,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    g: DeviceTensor,
    d_o: DeviceTensor,
}

impl Point {
    fn new(ctx: &CubeContext, t: usize) -> Point {
        let mut rng = Rng::new(t as u64);
        let tensor = |shape: Vec<usize>, data: Vec<f64>| {
            let host = Tensor::from_f64(shape, data).unwrap().to_dtype(DType::F32);
            ctx.upload("x", &host).unwrap()
        };
        let q = tensor(vec![B, t, H, K], rng.randn(B * t * H * K));
        let k = tensor(vec![B, t, H, K], rng.randn(B * t * H * K));
        let v = tensor(vec![B, t, H, V], rng.randn(B * t * H * V));
        let gates = logsigmoid_gates(&mut rng, B * t * H * K, 1.0);
        let g = tensor(vec![B, t, H, K], gates);
        let d_o = tensor(vec![B, t, H, V], rng.randn(B * t * H * V));
        Point { t, q, k, v, g, d_o }
    }

    fn problem(&self) -> DeviceLinearAttention<'_> {
        DeviceLinearAttention::causal(&self.q, &self.k, &self.v)
            .with_gate(DeviceGate::Vector(&self.g))
    }
}

fn bench(c: &mut Criterion) {
    let ctx = match CubeContext::shared() {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("skipped: no wgpu adapter ({e})");
            return;
        }
    };
    // Timing, not testing: no NaN fills.
    ctx.set_poison_outputs(false);
    println!("adapter: {}", ctx.adapter_name());
    let points: Vec<Point> = [256, 1024, 4096]
        .into_iter()
        .map(|t| Point::new(&ctx, t))
        .collect();

    let mut group = c.benchmark_group(format!("cube_linear_forward B{B} H{H} K{K} V{V}"));
    for point in &points {
        let problem = point.problem();
        for (name, form) in forms() {
            group.bench_with_input(BenchmarkId::new(name, point.t), &point.t, |bench, _| {
                bench.iter(|| forward_device(&ctx, &problem, form).unwrap())
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group(format!("cube_linear_forward_backward B{B} H{H} K{K} V{V}"));
    for point in &points {
        let problem = point.problem();
        for (name, form) in forms() {
            if skip_forward_backward(form, point.t) {
                continue;
            }
            group.bench_with_input(BenchmarkId::new(name, point.t), &point.t, |bench, _| {
                bench.iter(|| {
                    forward_device(&ctx, &problem, form).unwrap();
                    backward_device(&ctx, &problem, form, &point.d_o, None).unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Every point costs from milliseconds (chunkwise, T = 256) to seconds (parallel, T = 4096)
    // on llvmpipe: ten samples each.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
