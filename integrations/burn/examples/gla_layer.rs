//! A GLA layer on linattn's kernels, trained for a few steps with linattn's fused optimizer:
//! token projections `q, k, v`, a low-rank log-sigmoid gate, linattn's `gla`, an output gate and
//! projection, on a toy regression target (the next token's embedding). Runs on a wgpu adapter
//! when there is one (llvmpipe counts), else on the CPU.
//!
//! `cargo run --release -p linattn-burn --example gla_layer`

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_sigmoid, silu};
use burn::tensor::{Device, Distribution, Tensor};
use linattn::optim::{OptimizerConfig, Schedule};
use linattn_burn::{FusedOptimizer, Gate, LinearAttention};

#[derive(Module, Debug)]
struct GlaLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    /// The gate's low-rank projection (width -> 16 -> width), as in flash-linear-attention.
    g_down: Linear,
    g_up: Linear,
    out_gate: Linear,
    out: Linear,
    #[module(skip)]
    heads: usize,
}

impl GlaLayer {
    fn new(width: usize, heads: usize, device: &Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        GlaLayer {
            q: lin(width, width),
            k: lin(width, width),
            v: lin(width, width),
            g_down: lin(width, 16),
            g_up: lin(16, width),
            out_gate: lin(width, width),
            out: lin(width, width),
            heads,
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, width] = x.dims();
        let heads = |y: Tensor<3>| y.reshape([b, t, self.heads, width / self.heads]);
        let q = heads(self.q.forward(x.clone()));
        let k = heads(self.k.forward(x.clone()));
        let v = heads(self.v.forward(x.clone()));
        // fla's GLA gate: logsigmoid(x W_down W_up) / 16, all <= 0.
        let g = heads(log_sigmoid(self.g_up.forward(self.g_down.forward(x.clone()))) / 16.0);
        let o = LinearAttention::causal(q, k, v)
            .with_gate(Gate::Vector(g))
            .without_value_check()
            .forward()
            .expect("valid shapes")
            .o
            .reshape([b, t, width]);
        self.out.forward(o * silu(self.out_gate.forward(x)))
    }
}

fn main() -> linattn_burn::Result<()> {
    let device = Device::default().autodiff();
    println!("device: {device:?}");
    let (b, t, width, heads, steps) = (4, 64, 64, 4, 30);
    let mut layer = GlaLayer::new(width, heads, &device);
    let schedule = Schedule::cosine(5, steps);
    let mut config = OptimizerConfig::adamw(3e-3);
    config.max_grad_norm = Some(1.0);
    let mut opt = FusedOptimizer::new(&layer, &config, &schedule, steps)?;
    let seq = Tensor::<3>::random([b, t + 1, width], Distribution::Normal(0.0, 1.0), &device);
    let (x, y) = (seq.clone().slice([0..b, 0..t]), seq.slice([0..b, 1..t + 1]));
    let (x, y) = (x.detach(), y.detach());
    for step in 0..steps {
        let loss = (layer.forward(x.clone()) - y.clone())
            .powf_scalar(2.0)
            .mean();
        let value = loss.clone().into_scalar::<f32>();
        let grads = loss.backward();
        layer = opt.step(layer, &grads)?;
        if step % 5 == 0 || step + 1 == steps {
            println!("step {step:>3}  loss {value:.5}");
        }
    }
    let lrs: Vec<f64> = opt.history()?.iter().map(|r| r.lr).collect();
    println!(
        "lr schedule used: first {:.2e}, peak {:.2e}, last {:.2e}",
        lrs[0],
        lrs.iter().cloned().fold(0.0, f64::max),
        lrs[steps - 1]
    );
    Ok(())
}
