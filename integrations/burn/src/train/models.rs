//! The models of the training step, laid out as flash-linear-attention's (`fla.models.gla`,
//! so the shapes and names are familiar): a causal GLA language model and a bidirectional
//! LION-S encoder, each `N` blocks of RMSNorm -> attention -> RMSNorm -> SwiGLU MLP.
//!
//! Weights are drawn on the host from a seed (`initializer_range` 0.02 as in fla's configs), so
//! a model is the same on every device and in every form: the basis of the "forms are the same
//! function in training" and resume checks.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::{log_sigmoid, silu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use linattn::linear::Form;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::linear::{Gate, LinearAttention, Lion};

/// Sizes of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    pub vocab: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Output classes of the LION encoder's token head (the vocabulary for the GLA model).
    pub classes: usize,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    /// fla's SwiGLU width: `hidden_ratio = 4`, two thirds of it, rounded up to a multiple of 16.
    pub fn mlp_width(&self) -> usize {
        (self.width * 4 * 2 / 3).div_ceil(16) * 16
    }
}

/// Low rank of the GLA gate projection (fla's `gate_low_rank_dim`, 16).
pub const GATE_RANK: usize = 16;
/// fla's `gate_logit_normalizer`: the gate is `logsigmoid(x W) / 16`.
pub const GATE_NORMALIZER: f64 = 16.0;

/// Seeded host initialisation of every weight.
pub(crate) struct Init {
    rng: StdRng,
    device: Device,
}

impl Init {
    pub(crate) fn new(seed: u64, device: &Device) -> Init {
        Init {
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    fn normal<const D: usize>(&mut self, shape: [usize; D], std: f64) -> Param<Tensor<D>> {
        let dist = Normal::new(0.0, std).expect("std > 0");
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| dist.sample(&mut self.rng) as f32).collect();
        Param::from_tensor(Tensor::from_data(
            TensorData::new(data, shape),
            &self.device,
        ))
    }

    fn uniform<const D: usize>(&mut self, shape: [usize; D], bound: f64) -> Param<Tensor<D>> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-bound..bound) as f32)
            .collect();
        Param::from_tensor(Tensor::from_data(
            TensorData::new(data, shape),
            &self.device,
        ))
    }

    fn linear(&mut self, d_in: usize, d_out: usize, bias: bool) -> Linear {
        let mut l: Linear = LinearConfig::new(d_in, d_out)
            .with_bias(bias)
            .init(&self.device);
        l.weight = self.normal([d_in, d_out], 0.02);
        l.bias = bias.then(|| self.uniform([d_out], 1e-3));
        l
    }

    fn norm(&self, width: usize) -> RmsNorm {
        RmsNormConfig::new(width)
            .with_epsilon(1e-6)
            .init(&self.device)
    }

    fn embedding(&mut self, vocab: usize, width: usize) -> Embedding {
        let mut e: Embedding = EmbeddingConfig::new(vocab, width).init(&self.device);
        e.weight = self.normal([vocab, width], 0.02);
        e
    }
}

/// fla's `GatedMLP` with SwiGLU: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl GatedMlp {
    fn new(init: &mut Init, width: usize, hidden: usize) -> Self {
        GatedMlp {
            gate_proj: init.linear(width, hidden, false),
            up_proj: init.linear(width, hidden, false),
            down_proj: init.linear(hidden, width, false),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

/// fla's `GatedLinearAttention` layer: `q, k, v` projections, the low-rank gate
/// `gk = logsigmoid(x W_0 W_1) / 16` (a vector gate per key channel), linattn's causal engine,
/// then the output gate `RMSNorm(o) * swish(g_proj(x))` per head and `o_proj`.
#[derive(Module, Debug)]
pub struct GlaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub gk_proj_0: Linear,
    pub gk_proj_1: Linear,
    pub g_proj: Linear,
    pub g_norm: RmsNorm,
    pub o_proj: Linear,
    #[module(skip)]
    pub heads: usize,
}

impl GlaAttention {
    fn new(init: &mut Init, width: usize, heads: usize) -> Self {
        GlaAttention {
            q_proj: init.linear(width, width, false),
            k_proj: init.linear(width, width, false),
            v_proj: init.linear(width, width, false),
            gk_proj_0: init.linear(width, GATE_RANK, false),
            gk_proj_1: init.linear(GATE_RANK, width, true),
            g_proj: init.linear(width, width, false),
            g_norm: init.norm(width / heads),
            o_proj: init.linear(width, width, false),
            heads,
        }
    }

    fn split(&self, y: Tensor<3>) -> Tensor<4> {
        let [b, t, w] = y.dims();
        y.reshape([b, t, self.heads, w / self.heads])
    }

    /// The gate, queries, keys and values of `x` (for the decoding path too).
    fn qkvg(&self, x: &Tensor<3>) -> [Tensor<4>; 4] {
        let q = self.split(self.q_proj.forward(x.clone()));
        let k = self.split(self.k_proj.forward(x.clone()));
        let v = self.split(self.v_proj.forward(x.clone()));
        let gk = log_sigmoid(self.gk_proj_1.forward(self.gk_proj_0.forward(x.clone())))
            / GATE_NORMALIZER;
        [q, k, v, self.split(gk)]
    }

    fn output(&self, x: &Tensor<3>, o: Tensor<4>) -> Tensor<3> {
        let [b, t, h, d] = o.dims();
        let o = self.g_norm.forward(o).reshape([b, t, h * d]);
        self.o_proj
            .forward(o * silu(self.g_proj.forward(x.clone())))
    }

    pub fn forward(&self, x: Tensor<3>, form: Form) -> Tensor<3> {
        let [q, k, v, gk] = self.qkvg(&x);
        let o = LinearAttention::causal(q, k, v)
            .with_gate(Gate::Vector(gk))
            .with_form(form)
            .without_value_check()
            .forward()
            .unwrap_or_else(|e| panic!("linattn: {e}"))
            .o;
        self.output(&x, o)
    }

    /// The chunkwise forward that also returns the final state (for generation).
    pub fn prefill(&self, x: Tensor<3>, form: Form) -> (Tensor<3>, Tensor<4>) {
        let [q, k, v, gk] = self.qkvg(&x);
        let out = LinearAttention::causal(q, k, v)
            .with_gate(Gate::Vector(gk))
            .with_form(form)
            .with_final_state()
            .without_value_check()
            .forward()
            .unwrap_or_else(|e| panic!("linattn: {e}"));
        (self.output(&x, out.o), out.ht.expect("a final state"))
    }

    /// One token with linattn's decoding step: `x: [B, 1, width]`, the state `[B, H, K, V]`.
    pub fn decode(&self, x: Tensor<3>, state: Tensor<4>) -> (Tensor<3>, Tensor<4>) {
        let [q, k, v, gk] = self.qkvg(&x);
        let (o, state) = crate::decode::decode_step(state, q, k, v, Gate::Vector(gk), None)
            .unwrap_or_else(|e| panic!("linattn: {e}"));
        (self.output(&x, o), state)
    }
}

/// The LION-S attention of the encoder: `q, k` through LION's shifted-normalised SiLU feature
/// map, a selective decay per token and head `logsigmoid(x W_a)` (`[B, T, H]`), linattn's
/// bidirectional engine with row-sum normalisation, then `o_proj`.
#[derive(Module, Debug)]
pub struct LionAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub a_proj: Linear,
    pub o_proj: Linear,
    #[module(skip)]
    pub heads: usize,
}

impl LionAttention {
    fn new(init: &mut Init, width: usize, heads: usize) -> Self {
        LionAttention {
            q_proj: init.linear(width, width, false),
            k_proj: init.linear(width, width, false),
            v_proj: init.linear(width, width, false),
            a_proj: init.linear(width, heads, true),
            o_proj: init.linear(width, width, false),
            heads,
        }
    }

    /// LION's feature map: `silu(x) + 0.5`, normalised to unit sum over the head dim (positive,
    /// so the normaliser stays positive).
    fn feature(x: Tensor<4>) -> Tensor<4> {
        let y = silu(x) + 0.5;
        let s = y.clone().sum_dim(3);
        y / s
    }

    pub fn forward(&self, x: Tensor<3>, form: Form) -> Tensor<3> {
        let [b, t, w] = x.dims();
        let split = |y: Tensor<3>| y.reshape([b, t, self.heads, w / self.heads]);
        let q = Self::feature(split(self.q_proj.forward(x.clone())));
        let k = Self::feature(split(self.k_proj.forward(x.clone())));
        let v = split(self.v_proj.forward(x.clone()));
        let a = log_sigmoid(self.a_proj.forward(x));
        let o = Lion::S { g: a, g_bwd: None }
            .problem(q, k, v)
            .with_form(form)
            .without_value_check()
            .forward()
            .unwrap_or_else(|e| panic!("linattn: {e}"))
            .o;
        self.o_proj.forward(o.reshape([b, t, w]))
    }
}

/// One block: `x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`.
#[derive(Module, Debug)]
pub struct Block<A: Module> {
    pub attn_norm: RmsNorm,
    pub attn: A,
    pub mlp_norm: RmsNorm,
    pub mlp: GatedMlp,
}

/// The causal GLA language model: embeddings, blocks, final norm, tied head.
#[derive(Module, Debug)]
pub struct GlaLm {
    pub embeddings: Embedding,
    pub layers: Vec<Block<GlaAttention>>,
    pub norm: RmsNorm,
}

impl GlaLm {
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        let mut init = Init::new(seed, device);
        let embeddings = init.embedding(config.vocab, config.width);
        let layers = (0..config.layers)
            .map(|_| Block {
                attn_norm: init.norm(config.width),
                attn: GlaAttention::new(&mut init, config.width, config.heads),
                mlp_norm: init.norm(config.width),
                mlp: GatedMlp::new(&mut init, config.width, config.mlp_width()),
            })
            .collect();
        GlaLm {
            embeddings,
            layers,
            norm: init.norm(config.width),
        }
    }

    fn head(&self, h: Tensor<3>) -> Tensor<3> {
        // Tied: the logits are `h E^T`.
        let [b, t, w] = h.dims();
        let e = self.embeddings.weight.val();
        let vocab = e.dims()[0];
        self.norm
            .forward(h)
            .reshape([b * t, w])
            .matmul(e.transpose())
            .reshape([b, t, vocab])
    }

    /// Logits `[B, T, vocab]` of `tokens: [B, T]`.
    pub fn forward(&self, tokens: Tensor<2, Int>, form: Form) -> Tensor<3> {
        let mut h = self.embeddings.forward(tokens);
        for layer in &self.layers {
            h = h.clone() + layer.attn.forward(layer.attn_norm.forward(h), form);
            h = h.clone() + layer.mlp.forward(layer.mlp_norm.forward(h));
        }
        self.head(h)
    }

    /// The prompt's logits and every layer's final state (chunkwise), for generation.
    pub fn prefill(&self, tokens: Tensor<2, Int>, form: Form) -> (Tensor<3>, Vec<Tensor<4>>) {
        let mut h = self.embeddings.forward(tokens);
        let mut states = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (a, s) = layer.attn.prefill(layer.attn_norm.forward(h.clone()), form);
            states.push(s);
            h = h + a;
            h = h.clone() + layer.mlp.forward(layer.mlp_norm.forward(h));
        }
        (self.head(h), states)
    }

    /// The logits of one more token `[B, 1]`, updating every layer's state.
    pub fn decode(&self, token: Tensor<2, Int>, states: &mut [Tensor<4>]) -> Tensor<3> {
        let mut h = self.embeddings.forward(token);
        for (layer, state) in self.layers.iter().zip(states.iter_mut()) {
            let (a, s) = layer
                .attn
                .decode(layer.attn_norm.forward(h.clone()), state.clone());
            *state = s;
            h = h + a;
            h = h.clone() + layer.mlp.forward(layer.mlp_norm.forward(h));
        }
        self.head(h)
    }
}

/// The bidirectional LION-S encoder with a token classification head.
#[derive(Module, Debug)]
pub struct LionEncoder {
    pub embeddings: Embedding,
    pub layers: Vec<Block<LionAttention>>,
    pub norm: RmsNorm,
    pub classifier: Linear,
}

impl LionEncoder {
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        let mut init = Init::new(seed, device);
        let embeddings = init.embedding(config.vocab, config.width);
        let layers = (0..config.layers)
            .map(|_| Block {
                attn_norm: init.norm(config.width),
                attn: LionAttention::new(&mut init, config.width, config.heads),
                mlp_norm: init.norm(config.width),
                mlp: GatedMlp::new(&mut init, config.width, config.mlp_width()),
            })
            .collect();
        LionEncoder {
            embeddings,
            layers,
            norm: init.norm(config.width),
            classifier: init.linear(config.width, config.classes, true),
        }
    }

    /// Per-token class logits `[B, T, classes]`.
    pub fn forward(&self, tokens: Tensor<2, Int>, form: Form) -> Tensor<3> {
        let mut h = self.embeddings.forward(tokens);
        for layer in &self.layers {
            h = h.clone() + layer.attn.forward(layer.attn_norm.forward(h), form);
            h = h.clone() + layer.mlp.forward(layer.mlp_norm.forward(h));
        }
        self.classifier.forward(self.norm.forward(h))
    }
}
