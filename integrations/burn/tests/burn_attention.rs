//! Block-sparse attention through burn, against linattn's f64 reference: `o`, `lse` and the
//! gradients of `q, k, v` under burn's autodiff, dense / causal / a block mask / a Radial mask,
//! on wgpu (fusion on) and NdArray.

mod common;

use burn::tensor::Device;
use common::*;
use linattn::attention::{self, Attention};
use linattn_burn::{BlockMask, BlockSparseAttention, RadialConfig, RadialModel};
use rand::SeedableRng;
use rand::rngs::StdRng;

struct AttnCase {
    name: &'static str,
    t: usize,
    s: usize,
    causal: bool,
    mask: Option<BlockMask>,
}

const B: usize = 2;
const H: usize = 2;
const D: usize = 16;

fn cases() -> Vec<AttnCase> {
    // Every other block of an 3 x 3 grid of 16-token blocks, and the diagonal (a row with only
    // some blocks, and an empty row: its `o` is 0 and its `lse` -inf).
    let bits = [1u8, 0, 1, 0, 1, 0, 0, 0, 0];
    let mask = BlockMask::from_dense(3, 3, 16, 16, &bits).unwrap();
    let radial = linattn::attention::radial_mask(&RadialConfig {
        frames: 4,
        tokens_per_frame: 16,
        block_size: 16,
        decay_factor: 1.0,
        model: RadialModel::Wan,
        text_tokens: 0,
    })
    .unwrap();
    vec![
        AttnCase {
            name: "dense",
            t: 37,
            s: 37,
            causal: false,
            mask: None,
        },
        AttnCase {
            name: "causal",
            t: 37,
            s: 37,
            causal: true,
            mask: None,
        },
        AttnCase {
            name: "cross, S != T",
            t: 21,
            s: 45,
            causal: false,
            mask: None,
        },
        AttnCase {
            name: "block mask with an empty row",
            t: 40,
            s: 40,
            causal: false,
            mask: Some(mask),
        },
        AttnCase {
            name: "radial (wan)",
            t: 64,
            s: 64,
            causal: false,
            mask: Some(radial),
        },
    ]
}

fn run(device: &Device, what: &str) {
    let mut worst: f64 = 0.0;
    for (i, case) in cases().iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(70 + i as u64);
        let (t, s) = (case.t, case.s);
        let q = rounded(&values(&mut rng, B * t * H * D, -1.0, 1.0));
        let k = rounded(&values(&mut rng, B * s * H * D, -1.0, 1.0));
        let v = rounded(&values(&mut rng, B * s * H * D, -1.0, 1.0));
        let d_o = rounded(&values(&mut rng, B * t * H * D, -1.0, 1.0));
        let host = |d: &[f64], sh: Vec<usize>| linattn::Tensor::from_f64(sh, d.to_vec()).unwrap();
        let (hq, hk, hv) = (
            host(&q, vec![B, t, H, D]),
            host(&k, vec![B, s, H, D]),
            host(&v, vec![B, s, H, D]),
        );
        let mut p = Attention::dense(&hq, &hk, &hv).with_causal(case.causal);
        if let Some(m) = &case.mask {
            p = p.with_mask(m);
        }
        let cpu = linattn::Backend::Cpu;
        let out = attention::forward(&cpu, &p).unwrap();
        let g = attention::backward(&cpu, &p, &host(&d_o, vec![B, t, H, D])).unwrap();
        // `lse` is `-inf` on a row with no allowed key: those rows must match exactly, the
        // others are compared as numbers.
        let want_lse = out.lse.to_f64_vec();
        let empty: Vec<bool> = want_lse.iter().map(|&x| x == f64::NEG_INFINITY).collect();
        let finite = |x: Vec<f64>| -> Vec<f64> {
            assert_eq!(x.len(), empty.len());
            for (i, (&v, &e)) in x.iter().zip(&empty).enumerate() {
                assert_eq!(v == f64::NEG_INFINITY, e, "{}: lse[{i}] = {v}", case.name);
            }
            x.into_iter()
                .zip(&empty)
                .filter(|(_, e)| !**e)
                .map(|(v, _)| v)
                .collect()
        };
        let want: Results = vec![
            ("o", out.o.to_f64_vec()),
            ("lse", finite(want_lse.clone())),
            ("dq", g.dq.to_f64_vec()),
            ("dk", g.dk.to_f64_vec()),
            ("dv", g.dv.to_f64_vec()),
        ];
        let dev = device.clone().autodiff();
        let bq = tensor(&q, [B, t, H, D], &dev).require_grad();
        let bk = tensor(&k, [B, s, H, D], &dev).require_grad();
        let bv = tensor(&v, [B, s, H, D], &dev).require_grad();
        let mut a = BlockSparseAttention::dense(bq.clone(), bk.clone(), bv.clone())
            .with_causal(case.causal);
        if let Some(m) = &case.mask {
            a = a.with_mask(m.clone());
        }
        let out = a.forward().unwrap();
        let loss = (out.o.clone() * tensor(&d_o, [B, t, H, D], &dev)).sum();
        let grads = loss.backward();
        let got: Results = vec![
            ("o", to_vec(&out.o)),
            ("lse", finite(to_vec(&out.lse))),
            ("dq", to_vec(&bq.grad(&grads).unwrap())),
            ("dk", to_vec(&bk.grad(&grads).unwrap())),
            ("dv", to_vec(&bv.grad(&grads).unwrap())),
        ];
        let as_case = Case::causal(case.name, GateCase::None, linattn_burn::Form::Parallel);
        worst = worst.max(compare(&as_case, &got, &want, F32_LIMIT));
    }
    println!(
        "{what}: {} attention cases, worst relative RMS error {worst:.2e}",
        cases().len()
    );
}

#[test]
fn attention_on_wgpu_with_fusion() {
    let Some(device) = wgpu() else { return };
    run(&device, "wgpu");
}

#[test]
fn attention_on_ndarray() {
    run(&ndarray(), "ndarray");
}

#[test]
fn radial_masks_come_from_the_generator() {
    let Some(device) = wgpu() else { return };
    let cfg = RadialConfig {
        frames: 4,
        tokens_per_frame: 16,
        block_size: 16,
        decay_factor: 1.0,
        model: RadialModel::Hunyuan,
        text_tokens: 0,
    };
    let mut rng = StdRng::seed_from_u64(5);
    let x = |rng: &mut StdRng| tensor(&values(rng, 64 * H * D, -1.0, 1.0), [1, 64, H, D], &device);
    let (q, k, v) = (x(&mut rng), x(&mut rng), x(&mut rng));
    let with_cfg = BlockSparseAttention::dense(q.clone(), k.clone(), v.clone())
        .with_radial(&cfg)
        .unwrap()
        .forward()
        .unwrap();
    let mask = linattn::attention::radial_mask(&cfg).unwrap();
    let with_mask = BlockSparseAttention::dense(q, k, v)
        .with_mask(mask)
        .forward()
        .unwrap();
    assert_eq!(to_vec(&with_cfg.o), to_vec(&with_mask.o));
}
