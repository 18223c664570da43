//! `run attention` (block-sparse or dense softmax attention) and `run radial-mask`.

use clap::Args;

use super::{CommonArgs, RunResult};
use crate::attention::{self, Attention, RadialConfig, RadialModel};
use crate::cli::io::Outputs;
use crate::error::{Error, Result};

#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Token block size of `block_mask` (queries and keys).
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Key j allowed for query i only if j <= i (top-left aligned, as torch SDPA is_causal).
    #[arg(long)]
    pub causal: bool,
    /// Score scale (default D^-0.5).
    #[arg(long)]
    pub scale: Option<f64>,
}

#[derive(Args, Debug)]
pub struct RadialMaskArgs {
    /// --output gets one u8 tensor `block_mask`; --input is ignored (the mask reads no tensors).
    #[command(flatten)]
    pub common: CommonArgs,
    /// Number of (latent) frames.
    #[arg(long)]
    pub frames: usize,
    /// Tokens per frame.
    #[arg(long)]
    pub tokens_per_frame: usize,
    /// Square block size.
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Window scale of the released rule (ignored by the paper rule).
    #[arg(long, default_value_t = 1.0)]
    pub decay_factor: f64,
    /// wan, hunyuan (the released code's rule) or paper (Eq. 4 plus the frame-0 sink).
    #[arg(long, default_value = "wan")]
    pub model: String,
    /// Dense text tokens after the video tokens.
    #[arg(long, default_value_t = 0)]
    pub text_tokens: usize,
}

pub fn attention(args: &AttentionArgs) -> RunResult {
    let inputs = args
        .common
        .read_inputs("attention", &["q", "k", "v", "block_mask", "do"])?;
    let backend = args.common.backend()?;
    let mask = match inputs.opt_int("block_mask")? {
        None => None,
        Some(m) => Some(attention::block_mask_from_dense(
            &m.shape,
            &m.data,
            args.block_size,
            args.block_size,
        )?),
    };
    let mut problem = Attention::dense(inputs.float("q")?, inputs.float("k")?, inputs.float("v")?)
        .with_causal(args.causal);
    if let Some(mask) = &mask {
        problem = problem.with_mask(mask);
    }
    if let Some(scale) = args.scale {
        problem = problem.with_scale(scale);
    }
    let out = attention::forward(&backend, &problem)?;
    let mut outputs = Outputs::default();
    outputs.float("o", out.o);
    // -inf is the lse of a query row with no allowed key.
    outputs.log_float("lse", out.lse);
    if let Some(d_o) = inputs.opt_float("do")? {
        let grads = attention::backward(&backend, &problem, d_o)?;
        outputs.float("dq", grads.dq);
        outputs.float("dk", grads.dk);
        outputs.float("dv", grads.dv);
    }
    Ok(outputs)
}

fn parse_model(name: &str) -> Result<RadialModel> {
    match name {
        "wan" => Ok(RadialModel::Wan),
        "hunyuan" => Ok(RadialModel::Hunyuan),
        "paper" => Ok(RadialModel::Paper),
        other => Err(Error::InvalidArgument(format!(
            "unknown radial model `{other}` (expected wan, hunyuan or paper)"
        ))),
    }
}

pub fn radial_mask(args: &RadialMaskArgs) -> RunResult {
    let cfg = RadialConfig {
        frames: args.frames,
        tokens_per_frame: args.tokens_per_frame,
        block_size: args.block_size,
        decay_factor: args.decay_factor,
        model: parse_model(&args.model)?,
        text_tokens: args.text_tokens,
    };
    let mask = attention::radial_mask(&cfg)?;
    let mut outputs = Outputs::default();
    outputs.u8("block_mask", vec![mask.nq(), mask.nk()], mask.to_dense());
    Ok(outputs)
}
