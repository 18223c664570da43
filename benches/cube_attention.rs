//! Dense vs Radial block-sparse attention on the CubeCL backend (device-resident API, plans uploaded
//! once, inputs on the device; the time is kernel time up to a device sync).
//!
//! Sized by environment variables so that a GPU machine can run the shapes:
//! - `LINATTN_BENCH_FRAMES` (16) x `LINATTN_BENCH_TOKENS_PER_FRAME` (256) = T = S,
//! - `LINATTN_BENCH_B` (1), `LINATTN_BENCH_H` (1), `LINATTN_BENCH_D` (64),
//! - `LINATTN_BENCH_BLOCK` (128), `LINATTN_BENCH_MODEL` (`hunyuan`, or `wan` / `paper`),
//! - `LINATTN_BENCH_ITERS` (3), `LINATTN_BENCH_BACKWARD` (1; 0 skips the backward),
//! - `LINATTN_BENCH_DTYPE` (`f32`, or `f16`).
//!
//! Issue shapes: 16K = 64 x 256; 64K = 64 x 1024 (or 16 x 4096); HunyuanVideo 115,200 =
//! 30 x 3840 with `LINATTN_BENCH_H=24 LINATTN_BENCH_D=128`.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs once on 4 x 128 tokens, as a
//! smoke test of the same code.
//!
//! `cargo bench --bench cube_attention` prints, per pass, the dense time, the sparse time, the
//! mask density and `sparse / (dense x density)` (1.0 = time exactly proportional to the visited
//! blocks).

use std::time::Instant;

use linattn::attention::cube::{AttnKernel, CubeAttentionPlan};
use linattn::attention::{Attention, AttentionPlan, RadialConfig, RadialModel, radial_mask};
use linattn::cube::CubeContext;
use linattn::{DType, Result, Tensor, ValueCheck};
use linattn_reference::testing::Rng;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sync(ctx: &CubeContext) {
    cubecl::future::block_on(ctx.client().sync()).expect("device sync");
}

/// CPU seconds (user + system) this process has used so far, all threads (llvmpipe's workers
/// included); `None` off Linux. On a shared CPU machine this is the steadier measure of work.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Median wall time of `iters` runs of `f` (after one warm-up run that also compiles), and the
/// mean CPU time per run.
fn time(ctx: &CubeContext, iters: usize, mut f: impl FnMut() -> Result<()>) -> (f64, Option<f64>) {
    f().expect("warm-up run");
    sync(ctx);
    let cpu_start = process_cpu_seconds();
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f().expect("run");
            sync(ctx);
            start.elapsed().as_secs_f64()
        })
        .collect();
    let cpu = cpu_start
        .zip(process_cpu_seconds())
        .map(|(a, b)| (b - a) / iters as f64);
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], cpu)
}

fn fmt_time(label: &str, (wall, cpu): (f64, Option<f64>), flops: f64) -> String {
    format!(
        "{label} {:9.2} ms ({:6.2} GFLOP/s{})",
        wall * 1e3,
        flops / wall / 1e9,
        cpu.map_or(String::new(), |c| format!(", cpu {:8.2} ms", c * 1e3))
    )
}

fn main() {
    let ctx = match CubeContext::shared() {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("skipped: no wgpu adapter ({e})");
            return;
        }
    };
    linattn::attention::cube::set_poison_outputs(false);
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, as
    // a smoke test: then the default sizes are small (4 frames of 128 tokens) and one iteration.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let frames = env_usize("LINATTN_BENCH_FRAMES", if smoke { 4 } else { 16 });
    let tpf = env_usize(
        "LINATTN_BENCH_TOKENS_PER_FRAME",
        if smoke { 128 } else { 256 },
    );
    let b = env_usize("LINATTN_BENCH_B", 1);
    let h = env_usize("LINATTN_BENCH_H", 1);
    let d = env_usize("LINATTN_BENCH_D", 64);
    let block = env_usize("LINATTN_BENCH_BLOCK", 128);
    let iters = env_usize("LINATTN_BENCH_ITERS", if smoke { 1 } else { 3 }).max(1);
    let backward = env_usize("LINATTN_BENCH_BACKWARD", 1) != 0;
    let model = match std::env::var("LINATTN_BENCH_MODEL").as_deref() {
        Ok("wan") => RadialModel::Wan,
        Ok("paper") => RadialModel::Paper,
        _ => RadialModel::Hunyuan,
    };
    let dtype = match std::env::var("LINATTN_BENCH_DTYPE").as_deref() {
        Ok("f16") => DType::F16,
        _ => DType::F32,
    };
    let t = frames * tpf;
    println!(
        "cube attention bench on {}: B {b} T=S {t} ({frames} frames x {tpf}) H {h} D {d} block {block} {model:?} {dtype}",
        ctx.adapter_name()
    );

    let mask = radial_mask(&RadialConfig {
        frames,
        tokens_per_frame: tpf,
        block_size: block,
        decay_factor: 1.0,
        model,
        text_tokens: 0,
    })
    .expect("radial mask");
    let dense_plan = AttentionPlan::new(None, t, t, block, block, false).expect("dense plan");
    let sparse_plan =
        AttentionPlan::new(Some(&mask), t, t, block, block, false).expect("sparse plan");
    let density = sparse_plan.density();
    let dense = CubeAttentionPlan::new(&ctx, &dense_plan).expect("upload dense plan");
    let sparse = CubeAttentionPlan::new(&ctx, &sparse_plan).expect("upload sparse plan");

    let mut rng = Rng::new(7);
    let n = b * t * h * d;
    let draw = |rng: &mut Rng| -> Vec<f32> { rng.randn(n).into_iter().map(|x| x as f32).collect() };
    let upload = |name: &str, data: Vec<f32>, dtype: DType| {
        let host = Tensor::from_f32(vec![b, t, h, d], data)
            .expect("shape")
            .to_dtype(dtype);
        ctx.upload(name, &host).expect("upload")
    };
    let (q, k, v) = (
        upload("q", draw(&mut rng), dtype),
        upload("k", draw(&mut rng), dtype),
        upload("v", draw(&mut rng), dtype),
    );
    let d_o = upload("do", draw(&mut rng), DType::F32);
    // The kernels alone: no device-side value check in the timings.
    let args = Attention::dense(&q, &k, &v).with_value_check(ValueCheck::Off);

    for kernel in [
        AttnKernel::Forward,
        AttnKernel::BackwardDq,
        AttnKernel::BackwardDkDv,
    ] {
        println!(
            "  {kernel:?} tiles {:?}",
            dense.kernel_tiles(kernel, d).expect("tiles")
        );
    }
    // 4 T S D flops for the forward's two products, 10 T S D for the backward's five (incl. the
    // recomputed scores), both times the density.
    let flops = |dens: f64, per: f64| per * (b * h) as f64 * (t * t * d) as f64 * dens;
    let mut rows = Vec::new();
    for (name, plan, dens) in [("dense", &dense, 1.0), ("sparse", &sparse, density)] {
        let fwd = time(&ctx, iters, || plan.forward(&args).map(|_| ()));
        let out = plan.forward(&args).expect("forward");
        let bwd = backward.then(|| {
            time(&ctx, iters, || {
                plan.backward(&args, &out.o, &out.lse, &d_o).map(|_| ())
            })
        });
        println!(
            "  {name:6} density {dens:.4}  {}  {}",
            fmt_time("fwd", fwd, flops(dens, 4.0)),
            bwd.map_or("bwd -".to_string(), |x| fmt_time(
                "bwd",
                x,
                flops(dens, 10.0)
            ))
        );
        rows.push((fwd, bwd));
    }
    let ratio = |sparse: (f64, Option<f64>), dense: (f64, Option<f64>)| {
        let wall = sparse.0 / (dense.0 * density);
        let cpu = sparse.1.zip(dense.1).map(|(s, d)| s / (d * density));
        format!(
            "sparse / dense = {:.3}, density = {density:.3}, sparse / (dense x density) = {wall:.2} wall{}",
            sparse.0 / dense.0,
            cpu.map_or(String::new(), |c| format!(", {c:.2} cpu"))
        )
    };
    println!("  fwd: {}", ratio(rows[1].0, rows[0].0));
    if let (Some(db), Some(sb)) = (rows[0].1, rows[1].1) {
        println!("  bwd: {}", ratio(sb, db));
    }
}
