//! A GLA layer in candle on linattn's kernels, trained for a few steps with linattn's fused
//! optimizer: `x -> (q, k, v, gate) projections -> linattn gla -> output projection`, regressing a
//! fixed random target. Runs on the CPU (or on CUDA with `--features cuda` and a GPU).
//!
//!     cargo run --release -p linattn-candle --example gla_layer

use candle_core::{DType, Device, Tensor, Var};
use linattn::optim::{OptimizerConfig, Schedule};
use linattn_candle::{FusedOptimizer, Gate, LinearAttention};

/// `log(sigmoid(x))`, computed as `-softplus(-x)` (a gate <= 0).
fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.log()?.neg()
}

struct GlaLayer {
    w_q: Var,
    w_k: Var,
    w_v: Var,
    w_g: Var,
    w_o: Var,
    heads: usize,
}

impl GlaLayer {
    fn new(width: usize, heads: usize, device: &Device) -> candle_core::Result<GlaLayer> {
        let init = |i: usize, o: usize| {
            Var::from_tensor(&(Tensor::randn(0f32, 1.0, (i, o), device)? / (i as f64).sqrt())?)
        };
        Ok(GlaLayer {
            w_q: init(width, width)?,
            w_k: init(width, width)?,
            w_v: init(width, width)?,
            w_g: init(width, width)?,
            w_o: init(width, width)?,
            heads,
        })
    }

    fn vars(&self) -> Vec<Var> {
        [&self.w_q, &self.w_k, &self.w_v, &self.w_g, &self.w_o]
            .map(Clone::clone)
            .to_vec()
    }

    /// `x: [B, T, C]` to `[B, T, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, Box<dyn std::error::Error>> {
        let (b, t, c) = x.dims3()?;
        let d = c / self.heads;
        let project = |w: &Var| -> candle_core::Result<Tensor> {
            x.broadcast_matmul(w.as_tensor())?
                .reshape((b, t, self.heads, d))
        };
        let (q, k, v) = (
            project(&self.w_q)?,
            project(&self.w_k)?,
            project(&self.w_v)?,
        );
        // GLA's gate: a log-decay <= 0 per token, head and key channel, kept gentle (/16).
        let g = (log_sigmoid(&project(&self.w_g)?)? / 16.0)?;
        let o = LinearAttention::causal(&q, &k, &v)
            .with_gate(Gate::Vector(g))
            .forward()?
            .o;
        Ok(o.reshape((b, t, c))?
            .broadcast_matmul(self.w_o.as_tensor())?)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let (b, t, width, heads, steps) = (4, 64, 32, 2, 30);
    let layer = GlaLayer::new(width, heads, &device)?;
    let x = Tensor::randn(0f32, 1.0, (b, t, width), &device)?;
    let target = Tensor::randn(0f32, 1.0, (b, t, width), &device)?.to_dtype(DType::F32)?;
    let config = OptimizerConfig {
        weight_decay: 0.01,
        ..OptimizerConfig::adamw(1e-2)
    };
    let mut opt = FusedOptimizer::new(layer.vars(), &config, &Schedule::cosine(3, steps), steps)?;
    let mut first = None;
    let mut last = 0.0;
    for step in 0..steps {
        let loss = (layer.forward(&x)? - &target)?.sqr()?.mean_all()?;
        last = loss.to_scalar::<f32>()?;
        first.get_or_insert(last);
        opt.step(&loss.backward()?)?;
        if step % 10 == 0 {
            println!("step {step:3}: loss {last:.4}");
        }
    }
    println!(
        "GLA layer on {device:?}: loss {:.4} -> {last:.4} in {steps} steps",
        first.unwrap_or(last)
    );
    Ok(())
}
