//! Block-sparse FlashAttention-2 on the CubeCL backend against the f64 reference: forward (`o`,
//! `lse`) and gradients (`dq`, `dk`, `dv`), relative RMS <= 1e-5 (ops.md f32 rule: pass outright
//! if the max abs error is <= 1e-6; NaN fails). Every output buffer is poisoned with NaN before the
//! kernels run, so an element a kernel leaves unwritten fails the comparison.
//!
//! The cases are a representative set, not the cartesian product (llvmpipe runs the kernels on the
//! CPU): every T and S in {64, 200, 256, 1000}, D in {64, 128} (plus 32 for the generic head dim),
//! blocks 64 and 128 (and a 128 x 64 mixed grid), random masks with and without the diagonal, empty
//! rows (whole query blocks without a key, and rows emptied by the causal rule inside a visited
//! block), causal and not, T != S both ways, the three Radial rules on 8 frames x 256 tokens, f16
//! inputs, and one device plan shared by two problems.
//!
//! Without a wgpu adapter the tests print `skipped: no wgpu adapter` and pass, unless
//! `LINATTN_REQUIRE_WGPU=1`.

use std::time::Instant;

use linattn::attention::cube::{AttnKernel, CubeAttentionPlan};
use linattn::attention::{self, Attention, BlockMask, RadialConfig, RadialModel};
use linattn::cube::CubeContext;
use linattn::{Backend, DType, Error, Tensor};
use linattn_reference::testing::Rng;
use linattn_reference::{max_abs_diff, rel_rms, within_tolerance};

/// ops.md: f32 paths against the f64 reference.
const F32_THRESHOLD: f64 = 1e-5;

fn context() -> Option<CubeContext> {
    match CubeContext::shared() {
        Ok(ctx) => {
            attention::cube::set_poison_outputs(true);
            Some(ctx)
        }
        Err(e) => {
            if std::env::var("LINATTN_REQUIRE_WGPU").as_deref() == Ok("1") {
                panic!("LINATTN_REQUIRE_WGPU=1 but no wgpu adapter: {e}");
            }
            println!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

/// Asserts the ops.md rule and returns the relative RMS error.
fn expect_close(case: &str, name: &str, got: &[f64], want: &[f64], threshold: f64) -> f64 {
    let err = rel_rms(got, want);
    let abs = max_abs_diff(got, want);
    println!("  {case} {name}: rel_rms {err:.2e}, max_abs {abs:.2e}");
    assert!(
        within_tolerance(got, want, threshold),
        "{case}: {name} rel_rms {err:e} (max abs {abs:e}) above {threshold:e}"
    );
    err
}

/// `lse` compared on its finite entries, and `-inf` exactly where the reference has it.
fn expect_lse(case: &str, got: &[f64], want: &[f64]) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g == f64::NEG_INFINITY,
            w == f64::NEG_INFINITY,
            "{case}: lse[{i}] = {g}, reference {w}"
        );
    }
    let finite = |x: &[f64]| -> Vec<f64> {
        x.iter()
            .map(|&v| if v == f64::NEG_INFINITY { 0.0 } else { v })
            .collect()
    };
    expect_close(case, "lse", &finite(got), &finite(want), F32_THRESHOLD);
}

#[derive(Clone, Copy, Debug)]
enum MaskKind {
    Dense,
    /// Each block kept with probability `keep`; `diagonal` also keeps every block that holds a
    /// token pair `(i, i)`; `empty_block` clears one query block row entirely.
    Random {
        keep: f64,
        diagonal: bool,
        empty_block: Option<usize>,
    },
    Radial(RadialModel, f64),
}

#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    b: usize,
    t: usize,
    s: usize,
    h: usize,
    d: usize,
    block_q: usize,
    block_k: usize,
    causal: bool,
    mask: MaskKind,
    dtype: DType,
    /// Standard deviation of q (sharper softmax rows when large).
    q_std: f64,
    seed: u64,
}

impl Case {
    fn new(name: &'static str, (b, t, s, h, d): (usize, usize, usize, usize, usize)) -> Self {
        Case {
            name,
            b,
            t,
            s,
            h,
            d,
            block_q: 64,
            block_k: 64,
            causal: false,
            mask: MaskKind::Dense,
            dtype: DType::F32,
            q_std: 1.0,
            seed: 1,
        }
    }

    fn blocks(mut self, block_q: usize, block_k: usize) -> Self {
        self.block_q = block_q;
        self.block_k = block_k;
        self
    }

    fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    fn mask(mut self, mask: MaskKind) -> Self {
        self.mask = mask;
        self
    }

    fn build_mask(&self, rng: &mut Rng) -> Option<BlockMask> {
        let (t, s, bq, bk) = (self.t, self.s, self.block_q, self.block_k);
        match self.mask {
            MaskKind::Dense => None,
            MaskKind::Random {
                keep,
                diagonal,
                empty_block,
            } => Some(
                BlockMask::from_fn_for_tokens(t, s, bq, bk, |qb, kb| {
                    if empty_block == Some(qb) {
                        return false;
                    }
                    // Block (qb, kb) holds a diagonal pair iff the token ranges intersect below S.
                    let on_diagonal =
                        qb * bq < ((kb + 1) * bk).min(s) && kb * bk < ((qb + 1) * bq).min(t);
                    rng.uniform() < keep || (diagonal && on_diagonal)
                })
                .unwrap(),
            ),
            MaskKind::Radial(model, decay_factor) => {
                assert_eq!(t, s);
                assert_eq!(bq, bk);
                Some(
                    attention::radial_mask(&RadialConfig {
                        frames: 8,
                        tokens_per_frame: t / 8,
                        block_size: bq,
                        decay_factor,
                        model,
                        text_tokens: 0,
                    })
                    .expect("radial mask"),
                )
            }
        }
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    d_o: Tensor,
    mask: Option<BlockMask>,
}

fn inputs(case: &Case) -> Inputs {
    let mut rng = Rng::new(case.seed);
    let Case { b, t, s, h, d, .. } = *case;
    let tensor = |shape: Vec<usize>, data: Vec<f64>| {
        Tensor::from_f64(shape, data)
            .expect("sizes match")
            .to_dtype(case.dtype)
    };
    let q_data: Vec<f64> = rng
        .randn(b * t * h * d)
        .into_iter()
        .map(|x| x * case.q_std)
        .collect();
    let q = tensor(vec![b, t, h, d], q_data);
    let k = tensor(vec![b, s, h, d], rng.randn(b * s * h * d));
    let v = tensor(vec![b, s, h, d], rng.randn(b * s * h * d));
    // do stays f32 (the gradient the kernels take); the reference sees the same values.
    let d_o = Tensor::from_f64(vec![b, t, h, d], rng.randn(b * t * h * d))
        .unwrap()
        .to_dtype(DType::F32);
    let mask = case.build_mask(&mut rng);
    Inputs { q, k, v, d_o, mask }
}

/// Runs `case` on the cube backend and the f64 reference; returns the outputs for extra checks.
fn check(ctx: &CubeContext, case: &Case) -> (attention::AttnOutput, attention::AttnGrads) {
    let inp = inputs(case);
    let mut problem = Attention::dense(&inp.q, &inp.k, &inp.v).with_causal(case.causal);
    if let Some(m) = &inp.mask {
        problem = problem.with_mask(m);
    }
    let density = inp.mask.as_ref().map_or(1.0, |m| m.density());
    let cube = Backend::Cube(ctx.clone());
    let started = Instant::now();
    let got = attention::forward(&cube, &problem).expect("cube forward");
    let fwd_time = started.elapsed();
    let started = Instant::now();
    let grads = attention::backward(&cube, &problem, &inp.d_o).expect("cube backward");
    let bwd_time = started.elapsed();
    let started = Instant::now();
    let want = attention::forward(&Backend::Cpu, &problem).unwrap();
    let want_grads = attention::backward(&Backend::Cpu, &problem, &inp.d_o).unwrap();
    println!(
        "{}: B{} T{} S{} H{} D{} blocks {}x{} causal {} {:?} {} density {density:.3}: cube fwd {fwd_time:.2?} bwd {bwd_time:.2?}, reference {:.2?}",
        case.name,
        case.b,
        case.t,
        case.s,
        case.h,
        case.d,
        case.block_q,
        case.block_k,
        case.causal,
        case.mask,
        case.dtype,
        started.elapsed()
    );
    assert_eq!(got.o.shape(), want.o.shape());
    assert_eq!(got.lse.shape(), want.lse.shape());
    let n = case.name;
    expect_close(
        n,
        "o",
        &got.o.to_f64_vec(),
        &want.o.to_f64_vec(),
        F32_THRESHOLD,
    );
    expect_lse(n, &got.lse.to_f64_vec(), &want.lse.to_f64_vec());
    for (name, g, w) in [
        ("dq", &grads.dq, &want_grads.dq),
        ("dk", &grads.dk, &want_grads.dk),
        ("dv", &grads.dv, &want_grads.dv),
    ] {
        assert_eq!(g.shape(), w.shape());
        expect_close(n, name, &g.to_f64_vec(), &w.to_f64_vec(), F32_THRESHOLD);
    }
    (got, grads)
}

fn random(keep: f64, diagonal: bool) -> MaskKind {
    MaskKind::Random {
        keep,
        diagonal,
        empty_block: None,
    }
}

#[test]
fn dense_t64_d64_block64() {
    let Some(ctx) = context() else { return };
    check(&ctx, &Case::new("dense", (2, 64, 64, 2, 64)));
}

#[test]
fn dense_causal_t200_d128_block64() {
    let Some(ctx) = context() else { return };
    check(
        &ctx,
        &Case::new("dense-causal", (1, 200, 200, 2, 128)).causal(),
    );
}

#[test]
fn random_mask_with_diagonal_t256_s1000_d64_block128() {
    let Some(ctx) = context() else { return };
    let case = Case::new("random-diag", (1, 256, 1000, 2, 64))
        .blocks(128, 128)
        .mask(random(0.5, true));
    check(&ctx, &case);
}

#[test]
fn random_mask_without_diagonal_causal_t1000_s256_d128_block64() {
    let Some(ctx) = context() else { return };
    let case = Case::new("random-nodiag-causal", (1, 1000, 256, 1, 128))
        .causal()
        .mask(random(0.4, false));
    check(&ctx, &case);
}

#[test]
fn random_mask_causal_t1000_d64_block128_sharp_rows() {
    let Some(ctx) = context() else { return };
    let mut case = Case::new("random-diag-causal-sharp", (1, 1000, 1000, 1, 64))
        .blocks(128, 128)
        .causal()
        .mask(random(0.5, true));
    // Scores with standard deviation ~4: the online max moves a lot and exp underflows often.
    case.q_std = 4.0;
    case.seed = 3;
    check(&ctx, &case);
}

#[test]
fn random_mask_without_diagonal_t200_s64_d64() {
    let Some(ctx) = context() else { return };
    let case = Case::new("random-nodiag", (2, 200, 64, 1, 64)).mask(random(0.6, false));
    check(&ctx, &case);
}

/// A query block with no allowed key block: its rows give o = 0, lse = -inf and dq = 0 exactly.
#[test]
fn empty_query_block_gives_zero_output_and_minus_infinity() {
    let Some(ctx) = context() else { return };
    let case = Case::new("empty-block", (1, 256, 256, 2, 64)).mask(MaskKind::Random {
        keep: 0.7,
        diagonal: true,
        empty_block: Some(1),
    });
    let (out, grads) = check(&ctx, &case);
    let (t, h, d) = (case.t, case.h, case.d);
    let o = out.o.to_f64_vec();
    let lse = out.lse.to_f64_vec();
    let dq = grads.dq.to_f64_vec();
    for i in 64..128 {
        for hh in 0..h {
            assert_eq!(lse[hh * t + i], f64::NEG_INFINITY, "lse of empty row {i}");
            let row = (i * h + hh) * d;
            assert!(
                o[row..row + d].iter().all(|&x| x == 0.0),
                "o of empty row {i}"
            );
            assert!(
                dq[row..row + d].iter().all(|&x| x == 0.0),
                "dq of empty row {i}"
            );
        }
    }
}

/// Rows emptied by the causal rule inside a visited block: with 128-query x 64-key blocks and only
/// key block 1 allowed for query block 0, rows 0..63 see no key (all keys 64..127 come after them)
/// while rows 64..127 see some. The dK/dV pass visits this block and reads lse = -inf for the
/// empty rows.
#[test]
fn rows_emptied_by_causal_rule_inside_a_visited_block() {
    let Some(ctx) = context() else { return };
    let mut case = Case::new("causal-empty-rows", (1, 256, 256, 1, 64))
        .blocks(128, 64)
        .causal();
    case.mask = MaskKind::Dense;
    let inp = inputs(&case);
    // Query block 0: key block 1 only; query block 1: key blocks 1 and 3.
    let mask = BlockMask::from_dense(2, 4, 128, 64, &[0, 1, 0, 0, 0, 1, 0, 1]).unwrap();
    let problem = Attention::dense(&inp.q, &inp.k, &inp.v)
        .with_causal(true)
        .with_mask(&mask);
    let cube = Backend::Cube(ctx.clone());
    let got = attention::forward(&cube, &problem).unwrap();
    let grads = attention::backward(&cube, &problem, &inp.d_o).unwrap();
    let want = attention::forward(&Backend::Cpu, &problem).unwrap();
    let want_grads = attention::backward(&Backend::Cpu, &problem, &inp.d_o).unwrap();
    let n = case.name;
    expect_close(
        n,
        "o",
        &got.o.to_f64_vec(),
        &want.o.to_f64_vec(),
        F32_THRESHOLD,
    );
    expect_lse(n, &got.lse.to_f64_vec(), &want.lse.to_f64_vec());
    expect_close(
        n,
        "dq",
        &grads.dq.to_f64_vec(),
        &want_grads.dq.to_f64_vec(),
        F32_THRESHOLD,
    );
    expect_close(
        n,
        "dk",
        &grads.dk.to_f64_vec(),
        &want_grads.dk.to_f64_vec(),
        F32_THRESHOLD,
    );
    expect_close(
        n,
        "dv",
        &grads.dv.to_f64_vec(),
        &want_grads.dv.to_f64_vec(),
        F32_THRESHOLD,
    );
    let lse = got.lse.to_f64_vec();
    let o = got.o.to_f64_vec();
    assert!(lse[..64].iter().all(|&x| x == f64::NEG_INFINITY));
    assert!(lse[64..].iter().all(|x| x.is_finite()));
    assert!(o[..64 * 64].iter().all(|&x| x == 0.0));
    assert!(grads.dq.to_f64_vec()[..64 * 64].iter().all(|&x| x == 0.0));
}

fn radial_case(name: &'static str, model: RadialModel, d: usize, block: usize) -> Case {
    Case::new(name, (1, 2048, 2048, 1, d))
        .blocks(block, block)
        .mask(MaskKind::Radial(model, 1.0))
}

#[test]
fn radial_wan_8_frames_x_256_d64_block128() {
    let Some(ctx) = context() else { return };
    check(&ctx, &radial_case("radial-wan", RadialModel::Wan, 64, 128));
}

#[test]
fn radial_hunyuan_8_frames_x_256_d128_block128() {
    let Some(ctx) = context() else { return };
    let mut case = radial_case("radial-hunyuan", RadialModel::Hunyuan, 128, 128);
    case.mask = MaskKind::Radial(RadialModel::Hunyuan, 0.95);
    check(&ctx, &case);
}

#[test]
fn radial_paper_8_frames_x_256_d64_block64() {
    let Some(ctx) = context() else { return };
    check(
        &ctx,
        &radial_case("radial-paper", RadialModel::Paper, 64, 64),
    );
}

/// f16 inputs (where the runtime has them): the kernels widen to f32, so against the reference on
/// the same rounded values the f32 threshold still holds.
#[test]
fn f16_inputs() {
    let Some(ctx) = context() else { return };
    let mut case = Case::new("f16", (1, 200, 256, 2, 64)).mask(random(0.6, true));
    case.dtype = DType::F16;
    if !attention::cube::supports_dtype(&ctx, DType::F16) {
        let inp = inputs(&case);
        let err = attention::forward(
            &Backend::Cube(ctx.clone()),
            &Attention::dense(&inp.q, &inp.k, &inp.v),
        )
        .unwrap_err();
        assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
        println!("skipped: f16 not supported on {}", ctx.adapter_name());
        return;
    }
    check(&ctx, &case);
}

/// A head dim other than the 64 / 128 (the kernels are generic over multiples of 8).
#[test]
fn head_dim_32_causal() {
    let Some(ctx) = context() else { return };
    check(
        &ctx,
        &Case::new("d32-causal", (1, 200, 200, 3, 32))
            .causal()
            .mask(random(0.7, true)),
    );
}

#[test]
fn unsupported_inputs_are_refused_with_typed_errors() {
    let Some(ctx) = context() else { return };
    let cube = Backend::Cube(ctx.clone());
    let mut rng = Rng::new(9);
    let make = |d: usize, dtype: DType, rng: &mut Rng| {
        Tensor::from_f64(vec![1, 64, 1, d], rng.randn(64 * d))
            .unwrap()
            .to_dtype(dtype)
    };
    // f64 is narrowed to f32 on the host (documented): the result is that of the f32 copy.
    let x = make(64, DType::F64, &mut rng);
    let got = attention::forward(&cube, &Attention::dense(&x, &x, &x)).unwrap();
    let x32 = x.to_dtype(DType::F32);
    let want = attention::forward(&cube, &Attention::dense(&x32, &x32, &x32)).unwrap();
    assert_eq!(got.o.to_f64_vec(), want.o.to_f64_vec());
    // bf16 only where the runtime has it (llvmpipe has not).
    let x = make(64, DType::BF16, &mut rng);
    match attention::forward(&cube, &Attention::dense(&x, &x, &x)) {
        Err(Error::UnsupportedDtype { .. }) => {
            assert!(!attention::cube::supports_dtype(&ctx, DType::BF16))
        }
        Ok(_) => assert!(attention::cube::supports_dtype(&ctx, DType::BF16)),
        Err(e) => panic!("bf16: {e}"),
    }
    // Head dims that are not multiples of 8, or above 256.
    for d in [12, 264] {
        let x = make(d, DType::F32, &mut rng);
        let err = attention::forward(&cube, &Attention::dense(&x, &x, &x)).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedHeadDim { .. }),
            "D {d}: {err}"
        );
    }
    // Device API: tensors for other sequence lengths than the plan's, and a buffer too small
    // for the shape it is given.
    let plan = CubeAttentionPlan::from_mask(&ctx, None, 64, 64, false).unwrap();
    let short = ctx
        .upload(
            "q",
            &Tensor::from_f32(vec![1, 32, 1, 64], vec![0.0; 32 * 64]).unwrap(),
        )
        .unwrap();
    let err = plan
        .forward(&Attention::dense(&short, &short, &short))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("T = 32")),
        "{err}"
    );
    let err = linattn::cube::DeviceTensor::from_handle(
        short.handle().clone(),
        vec![1, 64, 1, 64],
        DType::F32,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// One uploaded plan serves problems with different batch, heads, head dim and scale (the plan
/// depends on the mask, T, S and the causal flag only); the device API matches the reference.
#[test]
fn device_plan_is_reused_across_problems() {
    let Some(ctx) = context() else { return };
    let (t, s) = (200, 256);
    let mut rng = Rng::new(11);
    let mask = BlockMask::from_fn_for_tokens(t, s, 64, 64, |_, _| rng.uniform() < 0.6).unwrap();
    let plan = CubeAttentionPlan::from_mask(&ctx, Some(&mask), t, s, true).unwrap();
    println!("{plan:?}");
    for kernel in [
        AttnKernel::Forward,
        AttnKernel::BackwardDq,
        AttnKernel::BackwardDkDv,
    ] {
        println!("  {kernel:?}: {:?}", plan.kernel_tiles(kernel, 64).unwrap());
    }
    for (b, h, d, scale) in [(1, 2, 64, None), (2, 1, 128, Some(0.3))] {
        let case = Case::new("plan-reuse", (b, t, s, h, d));
        let inp = inputs(&case);
        let mut problem = Attention::dense(&inp.q, &inp.k, &inp.v)
            .with_causal(true)
            .with_mask(&mask);
        if let Some(scale) = scale {
            problem = problem.with_scale(scale);
        }
        let up = |name: &str, x: &Tensor| ctx.upload(name, &x.to_dtype(DType::F32)).unwrap();
        let (q, k, v, d_o) = (
            up("q", &inp.q),
            up("k", &inp.k),
            up("v", &inp.v),
            up("do", &inp.d_o),
        );
        // The host API's builder over the device tensors.
        let mut args = Attention::dense(&q, &k, &v)
            .with_causal(true)
            .with_mask(&mask);
        if let Some(scale) = scale {
            args = args.with_scale(scale);
        }
        let out = plan.forward(&args).unwrap();
        let grads = plan.backward(&args, &out.o, &out.lse, &d_o).unwrap();
        assert_eq!(out.o.shape(), [b, t, h, d]);
        assert_eq!(grads.dk.shape(), [b, s, h, d]);
        let want = attention::forward(&Backend::Cpu, &problem).unwrap();
        let want_grads = attention::backward(&Backend::Cpu, &problem, &inp.d_o).unwrap();
        let read = |tensor: &linattn::cube::DeviceTensor, n: usize| -> Vec<f64> {
            let values = ctx.download(tensor).unwrap().to_f64_vec();
            assert_eq!(values.len(), n);
            values
        };
        let (q_len, kv_len) = (b * t * h * d, b * s * h * d);
        let name = if d == 64 {
            "plan-reuse-1"
        } else {
            "plan-reuse-2"
        };
        expect_close(
            name,
            "o",
            &read(&out.o, q_len),
            &want.o.to_f64_vec(),
            F32_THRESHOLD,
        );
        expect_lse(name, &read(&out.lse, b * h * t), &want.lse.to_f64_vec());
        expect_close(
            name,
            "dq",
            &read(&grads.dq, q_len),
            &want_grads.dq.to_f64_vec(),
            F32_THRESHOLD,
        );
        expect_close(
            name,
            "dk",
            &read(&grads.dk, kv_len),
            &want_grads.dk.to_f64_vec(),
            F32_THRESHOLD,
        );
        expect_close(
            name,
            "dv",
            &read(&grads.dv, kv_len),
            &want_grads.dv.to_f64_vec(),
            F32_THRESHOLD,
        );
    }
}

/// The device API checks q, k, v (and do) on the device by default: a NaN is the host API's
/// `NonFinite` error naming the tensor and element; with the check off the kernels run.
#[test]
fn device_api_checks_values_by_default() {
    use linattn::cube::ValueCheck;
    let Some(ctx) = context() else { return };
    let (t, d) = (96, 64);
    let mut rng = Rng::new(12);
    let good: Vec<f32> = rng.randn(t * d).iter().map(|&x| x as f32).collect();
    let mut bad = good.clone();
    bad[1000] = f32::NAN;
    let up = |x: Vec<f32>| {
        ctx.upload("x", &Tensor::from_f32(vec![1, t, 1, d], x).unwrap())
            .unwrap()
    };
    let (good, bad) = (up(good), up(bad));
    let args = |q, k, v| Attention::dense(q, k, v);
    let plan = CubeAttentionPlan::from_mask(&ctx, None, t, t, false).unwrap();
    let out = plan.forward(&args(&good, &good, &good)).unwrap();
    let err = plan.forward(&args(&good, &good, &bad)).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { tensor, index: 1000, .. } if tensor == "v"),
        "{err}"
    );
    let err = plan
        .backward(&args(&good, &good, &good), &out.o, &out.lse, &bad)
        .unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { tensor, index: 1000, .. } if tensor == "do"),
        "{err}"
    );
    assert!(
        plan.forward(&args(&bad, &good, &good).with_value_check(ValueCheck::Off))
            .is_ok()
    );
}
