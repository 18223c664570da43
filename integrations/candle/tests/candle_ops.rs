//! LightNet, block-sparse attention and the decoding step through linattn-candle, forward and
//! every gradient through `Tensor::backward`, against linattn's f64 reference (LightNet in
//! another form than the one run: parallel against chunkwise / recurrent), and the typed errors
//! of bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use linattn::linear::Form;
use linattn_candle::{
    BlockMask, BlockSparseAttention, Error, Gate, LightNet, LinearAttention, RadialConfig,
    RadialModel, decode_step,
};

/// `sum(o * do)`'s gradients of `q, k, v` and `o` itself.
fn grads_of(o: &Tensor, d_o: &Tensor, leaves: &[&candle_core::Var]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let loss = (o.to_dtype(DType::F32).unwrap() * d_o)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = leaves
        .iter()
        .map(|v| to_vec(grads.get(v.as_tensor()).expect("a gradient")))
        .collect();
    (to_vec(o), g)
}

#[test]
fn lightnet_matches_the_reference() {
    let (b, t, h, k, v) = (2, 37, 2, 24, 20);
    for device in devices() {
        for (name, non_causal, form, state, cu) in [
            (
                "causal chunkwise",
                false,
                Form::Chunkwise { chunk: 16 },
                false,
                None,
            ),
            (
                "causal recurrent, state",
                false,
                Form::Recurrent,
                true,
                None,
            ),
            (
                "non-causal",
                true,
                Form::Chunkwise { chunk: 16 },
                false,
                None,
            ),
            (
                "causal varlen with an empty segment, state",
                false,
                Form::Chunkwise { chunk: 16 },
                true,
                Some(vec![0i64, 0, 30, 74]),
            ),
        ] {
            let (b, t) = if cu.is_some() { (1, 74) } else { (b, t) };
            let n = cu.as_ref().map_or(b, |c: &Vec<i64>| c.len() - 1);
            let mut rng = rng(5);
            let mut draw = |n: usize, lo, hi| rounded(&values(&mut rng, n, lo, hi), DType::F32);
            let (qd, kd, vd, dod) = (
                draw(b * t * h * k, -1.0, 1.0),
                draw(b * t * h * k, -2.0, 2.0),
                draw(b * t * h * v, -1.0, 1.0),
                draw(b * t * h * v, -1.0, 1.0),
            );
            let (sd, zd) = (draw(n * h * k * v, -0.5, 0.5), draw(n * h * k, 0.0, 1.0));
            // The reference, in the parallel form.
            let (q0, k0, v0) = (
                host(&qd, vec![b, t, h, k]),
                host(&kd, vec![b, t, h, k]),
                host(&vd, vec![b, t, h, v]),
            );
            let (s0, z0) = (host(&sd, vec![n, h, k, v]), host(&zd, vec![n, h, k]));
            let mut p = if non_causal {
                linattn::lightnet::LightNet::non_causal(&q0, &k0, &v0)
            } else {
                linattn::lightnet::LightNet::causal(&q0, &k0, &v0)
            };
            if state {
                p = p.with_initial_state(&s0, &z0);
            }
            if let Some(cu) = &cu {
                p = p.with_cu_seqlens(cu);
            }
            let cpu = linattn::Backend::Cpu;
            let want = linattn::lightnet::forward(&cpu, &p, Form::Parallel).unwrap();
            let want_g = linattn::lightnet::backward(
                &cpu,
                &p,
                Form::Parallel,
                &host(&dod, vec![b, t, h, v]),
            )
            .unwrap();
            // Through candle.
            let q = var(&qd, &[b, t, h, k], DType::F32, &device);
            let kk = var(&kd, &[b, t, h, k], DType::F32, &device);
            let vv = var(&vd, &[b, t, h, v], DType::F32, &device);
            let mut c = if non_causal {
                LightNet::non_causal(q.as_tensor(), kk.as_tensor(), vv.as_tensor())
            } else {
                LightNet::causal(q.as_tensor(), kk.as_tensor(), vv.as_tensor())
            }
            .with_form(form);
            let (s0c, z0c) = (
                tensor(&sd, &[n, h, k, v], DType::F32, &device),
                tensor(&zd, &[n, h, k], DType::F32, &device),
            );
            if state {
                c = c.with_initial_state(&s0c, &z0c);
            }
            if let Some(cu) = &cu {
                c = c.with_cu_seqlens(cu);
            }
            let out = c.forward().unwrap();
            let d_o = tensor(&dod, &[b, t, h, v], DType::F32, &device);
            let (o, g) = grads_of(&out.o, &d_o, &[&q, &kk, &vv]);
            let mut got: Results = vec![("o", o)];
            let mut exp: Results = vec![("o", want.o.to_f64_vec())];
            if let (Some((s, z)), Some(ws)) = (&out.state, &want.state) {
                got.push(("s", to_vec(s)));
                got.push(("z", to_vec(z)));
                exp.push(("s", ws.s.to_f64_vec()));
                exp.push(("z", ws.z.to_f64_vec()));
            }
            for (name, g, w) in [
                ("dq", &g[0], &want_g.dq),
                ("dk", &g[1], &want_g.dk),
                ("dv", &g[2], &want_g.dv),
            ] {
                got.push((name, g.clone()));
                exp.push((name, w.to_f64_vec()));
            }
            let e = compare(
                &format!("lightnet {name} on {device:?}"),
                &got,
                &exp,
                F32_LIMIT,
            );
            println!("lightnet {name} on {device:?}: worst {e:.2e}");
        }
    }
}

#[test]
fn attention_matches_the_reference() {
    let (b, h) = (2, 2);
    let radial = RadialConfig {
        frames: 4,
        tokens_per_frame: 64,
        block_size: 64,
        decay_factor: 1.0,
        model: RadialModel::Wan,
        text_tokens: 0,
    };
    let mut empty_row = [1u8; 4 * 3];
    empty_row[4..8].fill(0); // query block 1 sees no key: o = 0, lse = -inf
    let row_mask = BlockMask::from_dense(3, 4, 64, 64, &empty_row).unwrap();
    /// (name, T, S, D, causal, mask)
    type AttnCase = (&'static str, usize, usize, usize, bool, Option<BlockMask>);
    let cases: Vec<AttnCase> = vec![
        ("dense", 130, 130, 64, false, None),
        ("causal", 130, 130, 64, true, None),
        ("cross, S != T", 150, 200, 64, false, None),
        (
            "block mask with an empty row",
            150,
            200,
            64,
            false,
            Some(row_mask),
        ),
        (
            "radial wan",
            256,
            256,
            64,
            false,
            Some(linattn::attention::radial_mask(&radial).unwrap()),
        ),
    ];
    for device in devices() {
        // The CUDA kernels take bf16 / f16; the CPU path any float dtype.
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let limit = if device.is_cuda() {
            HALF_LIMIT
        } else {
            F32_LIMIT
        };
        for (name, t, s, d, causal, mask) in &cases {
            let mut rng = rng(9);
            let mut draw = |n: usize| rounded(&values(&mut rng, n, -1.0, 1.0), dtype);
            let (qd, kd, vd, dod) = (
                draw(b * t * h * d),
                draw(b * s * h * d),
                draw(b * s * h * d),
                draw(b * t * h * d),
            );
            let (q0, k0, v0) = (
                host(&qd, vec![b, *t, h, *d]),
                host(&kd, vec![b, *s, h, *d]),
                host(&vd, vec![b, *s, h, *d]),
            );
            let mut p = linattn::attention::Attention::dense(&q0, &k0, &v0).with_causal(*causal);
            if let Some(m) = mask {
                p = p.with_mask(m);
            }
            let cpu = linattn::Backend::Cpu;
            let want = linattn::attention::forward(&cpu, &p).unwrap();
            let want_g =
                linattn::attention::backward(&cpu, &p, &host(&dod, vec![b, *t, h, *d])).unwrap();

            let q = var(&qd, &[b, *t, h, *d], dtype, &device);
            let kk = var(&kd, &[b, *s, h, *d], dtype, &device);
            let vv = var(&vd, &[b, *s, h, *d], dtype, &device);
            let mut c = BlockSparseAttention::dense(q.as_tensor(), kk.as_tensor(), vv.as_tensor())
                .with_causal(*causal);
            if let Some(m) = mask {
                c = c.with_mask(m.clone());
            }
            let out = c.forward().unwrap();
            assert_eq!(out.o.dtype(), dtype);
            // -inf rows of lse must agree exactly; the finite ones are compared.
            let (lse, want_lse) = (to_vec(&out.lse), want.lse.to_f64_vec());
            let inf_rows = |v: &[f64]| v.iter().filter(|x| x.is_infinite()).count();
            assert_eq!(inf_rows(&lse), inf_rows(&want_lse), "{name}: -inf rows");
            let finite = |v: &[f64]| {
                v.iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .collect::<Vec<_>>()
            };
            let d_o = tensor(&dod, &[b, *t, h, *d], DType::F32, &device);
            let (o, g) = grads_of(&out.o, &d_o, &[&q, &kk, &vv]);
            let got: Results = vec![
                ("o", o),
                ("lse", finite(&lse)),
                ("dq", g[0].clone()),
                ("dk", g[1].clone()),
                ("dv", g[2].clone()),
            ];
            let exp: Results = vec![
                ("o", want.o.to_f64_vec()),
                ("lse", finite(&want_lse)),
                ("dq", want_g.dq.to_f64_vec()),
                ("dk", want_g.dk.to_f64_vec()),
                ("dv", want_g.dv.to_f64_vec()),
            ];
            let e = compare(
                &format!("attention {name} on {device:?}"),
                &got,
                &exp,
                limit,
            );
            println!("attention {name} on {device:?}: worst {e:.2e}");
        }
    }
}

/// The decoding step chained over tokens equals the chunkwise forward's outputs and final state.
#[test]
fn decoding_equals_the_forward_pass() {
    let (b, t, h, k, v) = (2, 9, 2, 24, 20);
    for device in devices() {
        let mut rng = rng(11);
        let mut draw = |n: usize, lo, hi| rounded(&values(&mut rng, n, lo, hi), DType::F32);
        let (qd, kd, vd) = (
            draw(b * t * h * k, -1.0, 1.0),
            draw(b * t * h * k, -1.0, 1.0),
            draw(b * t * h * v, -1.0, 1.0),
        );
        let gd = draw(b * t * h, -1.0, -0.05);
        let q = tensor(&qd, &[b, t, h, k], DType::F32, &device);
        let kk = tensor(&kd, &[b, t, h, k], DType::F32, &device);
        let vv = tensor(&vd, &[b, t, h, v], DType::F32, &device);
        let g = tensor(&gd, &[b, t, h], DType::F32, &device);
        let full = LinearAttention::causal(&q, &kk, &vv)
            .with_gate(Gate::Scalar(g.clone()))
            .forward()
            .unwrap();
        let mut state = Tensor::zeros((b, h, k, v), DType::F32, &device).unwrap();
        let mut outs = Vec::new();
        for i in 0..t {
            let at = |x: &Tensor| x.narrow(1, i, 1).unwrap().contiguous().unwrap();
            let (o, next) = decode_step(
                &state,
                &at(&q),
                &at(&kk),
                &at(&vv),
                Gate::Scalar(at(&g)),
                None,
            )
            .unwrap();
            outs.push(o);
            state = next;
        }
        let stepped = Tensor::cat(&outs, 1).unwrap();
        let e_o = rel_rms(&to_vec(&stepped), &to_vec(&full.o));
        let e_s = rel_rms(&to_vec(&state), &to_vec(full.ht.as_ref().unwrap()));
        println!("decode vs forward on {device:?}: o {e_o:.2e}, state {e_s:.2e}");
        assert!(e_o <= F32_LIMIT && e_s <= F32_LIMIT, "{e_o:e} {e_s:e}");
    }
}

/// Bad input is linattn's typed error, before anything runs.
#[test]
fn bad_input_is_a_typed_error() {
    let dev = Device::Cpu;
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    let (q, k, v) = (z(&[1, 8, 2, 4]), z(&[1, 8, 2, 4]), z(&[1, 8, 2, 4]));
    // A shape mismatch names the tensor.
    let e = LinearAttention::causal(&q, &z(&[1, 7, 2, 4]), &v)
        .forward()
        .unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { tensor, .. } if tensor == "k"),
        "{e}"
    );
    // A positive gate names the element.
    let mut gv = vec![-0.5f32; 16];
    gv[11] = 0.25;
    let g = Tensor::from_vec(gv, (1, 8, 2), &dev).unwrap();
    let e = LinearAttention::causal(&q, &k, &v)
        .with_gate(Gate::Scalar(g))
        .forward()
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidGate { index: 11, .. }), "{e}");
    // NaN in v.
    let mut vv = vec![0f32; 64];
    vv[3] = f32::NAN;
    let v_nan = Tensor::from_vec(vv, (1, 8, 2, 4), &dev).unwrap();
    let e = LinearAttention::causal(&q, &k, &v_nan)
        .forward()
        .unwrap_err();
    assert!(
        matches!(&e, Error::NonFinite { tensor, index: 3, .. } if tensor == "v"),
        "{e}"
    );
    // Inconsistent cu_seqlens.
    let e = LinearAttention::causal(&q, &k, &v)
        .with_cu_seqlens(&[0, 5, 3, 8])
        .forward()
        .unwrap_err();
    assert!(matches!(e, Error::BadCuSeqlens(_)), "{e}");
    // An unsupported dtype.
    let q64 = q.to_dtype(DType::F64).unwrap();
    let e = LinearAttention::causal(&q64, &k, &v).forward().unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnsupportedDtype { .. } | Error::InvalidArgument(_)
        ),
        "{e}"
    );
    // A zero chunk size.
    let e = LinearAttention::causal(&q, &k, &v)
        .with_form(Form::Chunkwise { chunk: 0 })
        .forward()
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    // Attention: key and value of different lengths.
    let e = BlockSparseAttention::dense(&q, &k, &z(&[1, 9, 2, 4]))
        .forward()
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    // A decode step with two tokens.
    let e = decode_step(&z(&[1, 2, 4, 4]), &q, &k, &v, Gate::None, None).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}
