//! Block-sparse / dense FlashAttention-2 of linattn on a CUDA GPU: forward and backward, bf16,
//! B = 1, H = 24, D = 128, sequence lengths 16K, 64K and 115,200 (HunyuanVideo: 30 frames x 3,840
//! tokens). Dense: the kernels' computed lists (the library's FlashAttention baseline) with query
//! blocks of 128 and of 64. Sparse: the released-code Radial mask (`hunyuan`, decay 0.95, blocks
//! of 128; 16K and 64K use 4 and 16 frames of 4,096 tokens), planned and uploaded once.
//! CUDA events around every iteration after a warm-up; medians. Writes JSON (the schema of
//! benches/peers_attention.py, which times FlashAttention-2 on the same shapes and prints the
//! side-by-side table).
//!
//!     cargo bench --bench cuda_attention -- [--json PATH] [--iters N] [--warmup N] [--seqs 16384,65536,115200]
//!
//! Without a GPU it prints `skipped: no CUDA device` and writes nothing.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use linattn::attention::cuda::device::{
    self, DeviceAttention, DeviceForwardState, DeviceGrads, DeviceTensor, DeviceTensorMut,
};
use linattn::attention::cuda::{CudaAttentionPlan, DeviceAttentionPlan};
use linattn::attention::plan::AttentionPlan;
use linattn::attention::{AttnDims, RadialConfig, RadialModel, radial_mask};
use linattn::cuda::CudaContext;

const HEADS: usize = 24;
const HEAD_DIM: usize = 128;

struct Args {
    json: String,
    iters: usize,
    warmup: usize,
    seqs: Vec<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        json: "benches/attention_linattn.json".into(),
        iters: 10,
        warmup: 3,
        seqs: vec![16_384, 65_536, 115_200],
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = it.next().expect("--json PATH"),
            "--iters" => args.iters = it.next().and_then(|x| x.parse().ok()).expect("--iters N"),
            "--warmup" => args.warmup = it.next().and_then(|x| x.parse().ok()).expect("--warmup N"),
            "--seqs" => {
                args.seqs = it
                    .next()
                    .expect("--seqs a,b,c")
                    .split(',')
                    .map(|x| x.trim().parse().expect("sequence length"))
                    .collect()
            }
            // cargo bench passes --bench; other harness flags are ignored.
            _ => {}
        }
    }
    args
}

/// The Radial configuration of a sequence length: HunyuanVideo's 30 x 3,840 at 115,200, else
/// frames of 4,096 tokens.
fn radial_for(seq: usize) -> RadialConfig {
    let (frames, tokens) = if seq == 115_200 {
        (30, 3_840)
    } else {
        assert!(
            seq.is_multiple_of(4096),
            "sequence length {seq}: use 115200 or a multiple of 4096"
        );
        (seq / 4096, 4096)
    };
    RadialConfig {
        frames,
        tokens_per_frame: tokens,
        block_size: 128,
        decay_factor: 0.95,
        model: RadialModel::Hunyuan,
        text_tokens: 0,
    }
}

/// Deterministic N(0, 1)-ish bf16 values (sum of uniforms; the kernels' speed does not depend on
/// the distribution, only finite values matter).
fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            bf16::from_f32((acc - 2.0) * 1.732)
        })
        .collect()
}

struct Buffers {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    d_o: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    dq: CudaSlice<bf16>,
    dk: CudaSlice<bf16>,
    dv: CudaSlice<bf16>,
}

/// Median and minimum of `iters` timed runs of `f` after `warmup` untimed ones (ms, CUDA events).
fn time_ms(
    ctx: &CudaContext,
    stream: &Arc<CudaStream>,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(),
) -> (f64, f64) {
    for _ in 0..warmup {
        f();
    }
    stream.synchronize().expect("sync");
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = ctx.driver_context().new_event(flags).expect("event");
        let end = ctx.driver_context().new_event(flags).expect("event");
        start.record(stream).expect("record");
        f();
        end.record(stream).expect("record");
        times.push(start.elapsed_ms(&end).expect("elapsed") as f64);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[times.len() / 2], times[0])
}

fn json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn main() {
    let args = parse_args();
    let ctx = match CudaContext::shared() {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let stream = ctx.stream().clone();
    println!(
        "linattn block-sparse FlashAttention-2 on {} ({}), bf16, B=1 H={HEADS} D={HEAD_DIM}",
        ctx.device_name(),
        ctx.arch()
    );
    let mut rows: Vec<String> = Vec::new();
    for &seq in &args.seqs {
        let dims = AttnDims {
            b: 1,
            t: seq,
            s: seq,
            h: HEADS,
            d: HEAD_DIM,
        };
        let n = dims.q_len();
        let upload = |seed| stream.clone_htod(&random_bf16(n, seed)).expect("upload");
        let mut buf = Buffers {
            q: upload(1),
            k: upload(2),
            v: upload(3),
            d_o: upload(4),
            o: stream.alloc_zeros(n).expect("alloc"),
            lse: stream.alloc_zeros(dims.lse_len()).expect("alloc"),
            dq: stream.alloc_zeros(n).expect("alloc"),
            dk: stream.alloc_zeros(n).expect("alloc"),
            dv: stream.alloc_zeros(n).expect("alloc"),
        };

        let cfg = radial_for(seq);
        let planned = Instant::now();
        let mask = radial_mask(&cfg).expect("radial mask");
        let host_plan = AttentionPlan::new(Some(&mask), seq, seq, 128, 128, false).expect("plan");
        let plan_ms = planned.elapsed().as_secs_f64() * 1e3;
        let sparse = device::upload_plan(&ctx, &stream, &host_plan).expect("upload plan");
        let mut plans: Vec<(&str, CudaAttentionPlan)> = Vec::new();
        for bq in [128, 64] {
            plans.push((
                "dense",
                DeviceAttentionPlan::dense(seq, seq, bq, 128, false).expect("dense plan"),
            ));
        }
        plans.push(("sparse", sparse));

        for (mode, plan) in &plans {
            let g = *plan.geometry();
            let density = g.density();
            // FLOPs of the visited blocks (4 B H D per token pair forward; 2.5x backward).
            let fwd_flops = 4.0 * HEADS as f64 * HEAD_DIM as f64 * (seq as f64).powi(2) * density;
            let (fwd_med, fwd_min) = time_ms(&ctx, &stream, args.warmup, args.iters, || {
                let problem = DeviceAttention {
                    dims,
                    q: DeviceTensor::BF16(&buf.q),
                    k: DeviceTensor::BF16(&buf.k),
                    v: DeviceTensor::BF16(&buf.v),
                    scale: None,
                    causal: false,
                    value_check: linattn::ValueCheck::Off,
                };
                device::forward(
                    &ctx,
                    &stream,
                    plan,
                    &problem,
                    DeviceTensorMut::BF16(&mut buf.o),
                    &mut buf.lse,
                )
                .expect("forward");
            });
            let (bwd_med, bwd_min) = time_ms(&ctx, &stream, args.warmup, args.iters, || {
                let problem = DeviceAttention {
                    dims,
                    q: DeviceTensor::BF16(&buf.q),
                    k: DeviceTensor::BF16(&buf.k),
                    v: DeviceTensor::BF16(&buf.v),
                    scale: None,
                    causal: false,
                    value_check: linattn::ValueCheck::Off,
                };
                device::backward(
                    &ctx,
                    &stream,
                    plan,
                    &problem,
                    DeviceForwardState {
                        o: DeviceTensor::BF16(&buf.o),
                        lse: &buf.lse,
                        d_o: DeviceTensor::BF16(&buf.d_o),
                    },
                    DeviceGrads {
                        dq: DeviceTensorMut::BF16(&mut buf.dq),
                        dk: DeviceTensorMut::BF16(&mut buf.dk),
                        dv: DeviceTensorMut::BF16(&mut buf.dv),
                    },
                )
                .expect("backward");
            });
            // Sanity: every lse finite (no row of these masks is empty).
            let lse = stream.clone_dtoh(&buf.lse).expect("download");
            let bad = lse.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 {
                println!("WARNING: {bad} non-finite lse values ({mode}, T={seq})");
            }
            for (pass, med, min, flops) in [
                ("fwd", fwd_med, fwd_min, fwd_flops),
                ("bwd", bwd_med, bwd_min, 2.5 * fwd_flops),
            ] {
                let tflops = flops / (med * 1e-3) / 1e12;
                println!(
                    "T={seq:>6} {mode:<6} blocks {}x{} density {density:.3} {pass}: median {med:9.3} ms (min {min:9.3}) {tflops:7.1} TFLOP/s",
                    g.block_q, g.block_k
                );
                rows.push(format!(
                    "{{\"impl\": \"linattn\", \"mode\": \"{mode}\", \"pass\": \"{pass}\", \"seq\": {seq}, \"batch\": 1, \"heads\": {HEADS}, \"head_dim\": {HEAD_DIM}, \"dtype\": \"bf16\", \"causal\": false, \"block_q\": {}, \"block_k\": {}, \"density\": {density:.6}, \"ms\": {med:.4}, \"ms_min\": {min:.4}, \"tflops\": {tflops:.2}, \"iters\": {}, \"plan_ms\": {:.1}}}",
                    g.block_q,
                    g.block_k,
                    args.iters,
                    if *mode == "sparse" { plan_ms } else { 0.0 }
                ));
            }
        }
    }
    let json = format!(
        "{{\n  \"tool\": \"linattn\",\n  \"device\": \"{}\",\n  \"arch\": \"{}\",\n  \"results\": [\n    {}\n  ]\n}}\n",
        json_escape(ctx.device_name()),
        ctx.arch(),
        rows.join(",\n    ")
    );
    if let Some(dir) = std::path::Path::new(&args.json).parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&args.json, json).expect("write json");
    println!("wrote {}", args.json);
}
