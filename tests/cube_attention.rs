//! Block-sparse FlashAttention-2 on the CubeCL backend against the f64 reference.

use linattn::attention::{self, Attention, BlockMask};
use linattn::cube::CubeContext;
use linattn::{Backend, Tensor};
use linattn_reference::testing::Rng;
use linattn_reference::{max_abs_diff, rel_rms};

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

fn report(name: &str, got: &[f64], want: &[f64]) -> f64 {
    let err = rel_rms(got, want);
    println!("  {name}: rel_rms {err:.3e} max_abs {:.3e}", max_abs_diff(got, want));
    err
}

#[test]
fn probe() {
    let Some(ctx) = context() else { return };
    let hw = &ctx.client().properties().hardware;
    println!("{} shared {} units {}", ctx.adapter_name(), hw.max_shared_memory_size, hw.max_units_per_cube);
    let mut rng = Rng::new(1);
    let (b, t, s, h, d) = (1, 64, 64, 1, 64);
    let q = Tensor::from_f64(vec![b, t, h, d], rng.randn(b * t * h * d)).unwrap().to_dtype(linattn::DType::F32);
    let k = Tensor::from_f64(vec![b, s, h, d], rng.randn(b * s * h * d)).unwrap().to_dtype(linattn::DType::F32);
    let v = Tensor::from_f64(vec![b, s, h, d], rng.randn(b * s * h * d)).unwrap().to_dtype(linattn::DType::F32);
    let d_o = Tensor::from_f64(vec![b, t, h, d], rng.randn(b * t * h * d)).unwrap().to_dtype(linattn::DType::F32);
    let mask: Option<BlockMask> = None;
    let mut p = Attention::dense(&q, &k, &v);
    if let Some(m) = &mask { p = p.with_mask(m); }
    let be = Backend::Cube(ctx.clone());
    let t0 = std::time::Instant::now();
    let got = attention::forward(&be, &p).unwrap();
    println!("fwd {:?}", t0.elapsed());
    let want = attention::forward(&Backend::Cpu, &p).unwrap();
    report("o", &got.o.to_f64_vec(), &want.o.to_f64_vec());
    report("lse", &got.lse.to_f64_vec(), &want.lse.to_f64_vec());
    let t0 = std::time::Instant::now();
    let g = attention::backward(&be, &p, &d_o).unwrap();
    println!("bwd {:?}", t0.elapsed());
    let w = attention::backward(&Backend::Cpu, &p, &d_o).unwrap();
    report("dq", &g.dq.to_f64_vec(), &w.dq.to_f64_vec());
    report("dk", &g.dk.to_f64_vec(), &w.dk.to_f64_vec());
    report("dv", &g.dv.to_f64_vec(), &w.dv.to_f64_vec());
}
