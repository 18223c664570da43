//! LightNet and the decoding step through burn, against linattn's f64 reference: forward, the
//! final state, and the gradients of `q`, `k` (the logits) and `v` under burn's autodiff, on
//! wgpu (fusion on) and NdArray.

mod common;

use burn::tensor::{Device, Tensor};
use common::*;
use linattn::lightnet::{self, LightNet as HostLightNet};
use linattn_burn::{Form, Gate, LightNet, LinearAttention, decode_step};
use rand::SeedableRng;
use rand::rngs::StdRng;

struct LightCase {
    name: &'static str,
    b: usize,
    t: usize,
    non_causal: bool,
    state: bool,
    cu: Option<Vec<i64>>,
    form: Form,
}

const H: usize = 2;
const K: usize = 12;
const V: usize = 10;

fn cases() -> Vec<LightCase> {
    let c = |name, b, t, non_causal, state, cu, form| LightCase {
        name,
        b,
        t,
        non_causal,
        state,
        cu,
        form,
    };
    vec![
        c(
            "causal chunkwise",
            2,
            29,
            false,
            false,
            None,
            Form::Chunkwise { chunk: 8 },
        ),
        c(
            "causal recurrent",
            2,
            29,
            false,
            false,
            None,
            Form::Recurrent,
        ),
        c("causal parallel", 2, 29, false, false, None, Form::Parallel),
        c(
            "causal with state",
            2,
            29,
            false,
            true,
            None,
            Form::Chunkwise { chunk: 8 },
        ),
        c(
            "non-causal chunkwise",
            2,
            29,
            true,
            false,
            None,
            Form::Chunkwise { chunk: 8 },
        ),
        c(
            "non-causal parallel",
            2,
            29,
            true,
            false,
            None,
            Form::Parallel,
        ),
        c(
            "varlen with state",
            1,
            31,
            false,
            true,
            Some(vec![0, 9, 9, 31]),
            Form::Chunkwise { chunk: 8 },
        ),
    ]
}

fn run(device: &Device, what: &str) {
    let mut worst: f64 = 0.0;
    for (i, case) in cases().iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(40 + i as u64);
        let (b, t) = (case.b, case.t);
        let n = case.cu.as_ref().map_or(b, |c| c.len() - 1);
        let q = rounded(&values(&mut rng, b * t * H * K, -1.0, 1.0));
        let k = rounded(&values(&mut rng, b * t * H * K, -2.0, 2.0));
        let v = rounded(&values(&mut rng, b * t * H * V, -1.0, 1.0));
        let s0 = rounded(&values(&mut rng, n * H * K * V, -1.0, 1.0));
        let z0 = rounded(&values(&mut rng, n * H * K, -1.0, 1.0));
        let d_o = rounded(&values(&mut rng, b * t * H * V, -1.0, 1.0));

        // The reference.
        let host = |d: &[f64], s: Vec<usize>| linattn::Tensor::from_f64(s, d.to_vec()).unwrap();
        let (hq, hk, hv) = (
            host(&q, vec![b, t, H, K]),
            host(&k, vec![b, t, H, K]),
            host(&v, vec![b, t, H, V]),
        );
        let (hs, hz) = (host(&s0, vec![n, H, K, V]), host(&z0, vec![n, H, K]));
        let mut p = if case.non_causal {
            HostLightNet::non_causal(&hq, &hk, &hv)
        } else {
            HostLightNet::causal(&hq, &hk, &hv)
        };
        if case.state {
            p = p.with_initial_state(&hs, &hz);
        }
        if let Some(cu) = case.cu.as_deref() {
            p = p.with_cu_seqlens(cu);
        }
        let cpu = linattn::Backend::Cpu;
        let out = lightnet::forward(&cpu, &p, case.form).unwrap();
        let grads = lightnet::backward(&cpu, &p, case.form, &host(&d_o, vec![b, t, H, V])).unwrap();
        let mut want: Results = vec![("o", out.o.to_f64_vec())];
        if !case.non_causal {
            let st = out.state.unwrap();
            want.push(("s", st.s.to_f64_vec()));
            want.push(("z", st.z.to_f64_vec()));
        }
        want.push(("dq", grads.dq.to_f64_vec()));
        want.push(("dk", grads.dk.to_f64_vec()));
        want.push(("dv", grads.dv.to_f64_vec()));

        // Through burn.
        let dev = device.clone().autodiff();
        let bq = tensor(&q, [b, t, H, K], &dev).require_grad();
        let bk = tensor(&k, [b, t, H, K], &dev).require_grad();
        let bv = tensor(&v, [b, t, H, V], &dev).require_grad();
        let mut l = if case.non_causal {
            LightNet::non_causal(bq.clone(), bk.clone(), bv.clone())
        } else {
            LightNet::causal(bq.clone(), bk.clone(), bv.clone()).with_final_state()
        }
        .with_form(case.form);
        if case.state {
            l = l.with_initial_state(
                tensor(&s0, [n, H, K, V], &dev),
                tensor(&z0, [n, H, K], &dev),
            );
        }
        if let Some(cu) = &case.cu {
            l = l.with_cu_seqlens(cu.clone());
        }
        let out = l.forward().unwrap();
        let loss = (out.o.clone() * tensor(&d_o, [b, t, H, V], &dev)).sum();
        let g = loss.backward();
        let mut got: Results = vec![("o", to_vec(&out.o))];
        if let Some((s, z)) = &out.state {
            got.push(("s", to_vec(s)));
            got.push(("z", to_vec(z)));
        }
        got.push(("dq", to_vec(&bq.grad(&g).unwrap())));
        got.push(("dk", to_vec(&bk.grad(&g).unwrap())));
        got.push(("dv", to_vec(&bv.grad(&g).unwrap())));
        let as_case = Case::causal(case.name, GateCase::None, case.form);
        worst = worst.max(compare(&as_case, &got, &want, F32_LIMIT));
    }
    println!(
        "{what}: {} LightNet cases, worst relative RMS error {worst:.2e}",
        cases().len()
    );
}

#[test]
fn lightnet_on_wgpu_with_fusion() {
    let Some(device) = wgpu() else { return };
    run(&device, "wgpu");
}

#[test]
fn lightnet_on_ndarray() {
    run(&ndarray(), "ndarray");
}

/// Prefill with the chunkwise form, then token by token with `decode_step`: the outputs equal
/// one chunkwise forward over the whole sequence, and the state equals its final state.
fn decoding_equals_prefill(device: &Device) {
    let (b, t, extra, h, k, v) = (2, 19, 6, 2, 16, 8);
    let total = t + extra;
    let mut rng = StdRng::seed_from_u64(99);
    let q = rounded(&values(&mut rng, b * total * h * k, -1.0, 1.0));
    let kk = rounded(&values(&mut rng, b * total * h * k, -1.0, 1.0));
    let vv = rounded(&values(&mut rng, b * total * h * v, -1.0, 1.0));
    let g = rounded(&values(&mut rng, b * total * h * k, -1.0, -0.01));
    let full = |d: &[f64], w: usize| tensor(d, [b, total, h, w], device);
    let (q, kk, vv, g) = (full(&q, k), full(&kk, k), full(&vv, v), full(&g, k));
    let whole = LinearAttention::causal(q.clone(), kk.clone(), vv.clone())
        .with_gate(Gate::Vector(g.clone()))
        .with_final_state()
        .forward()
        .unwrap();
    let part = |x: &Tensor<4>, r: std::ops::Range<usize>| x.clone().slice([0..b, r]);
    let prefill = LinearAttention::causal(part(&q, 0..t), part(&kk, 0..t), part(&vv, 0..t))
        .with_gate(Gate::Vector(part(&g, 0..t)))
        .with_final_state()
        .forward()
        .unwrap();
    let mut state = prefill.ht.unwrap();
    let mut outs = vec![prefill.o];
    for i in t..total {
        let (o, next) = decode_step(
            state,
            part(&q, i..i + 1),
            part(&kk, i..i + 1),
            part(&vv, i..i + 1),
            Gate::Vector(part(&g, i..i + 1)),
            None,
        )
        .unwrap();
        outs.push(o);
        state = next;
    }
    let decoded = Tensor::cat(outs, 1);
    let e = rel_rms(&to_vec(&decoded), &to_vec(&whole.o));
    let es = rel_rms(&to_vec(&state), &to_vec(&whole.ht.unwrap()));
    assert!(
        e <= F32_LIMIT && es <= F32_LIMIT,
        "decode vs prefill: o {e:.2e}, state {es:.2e}"
    );
    println!("decode vs prefill: o {e:.2e}, state {es:.2e}");
}

#[test]
fn decoding_equals_prefill_on_wgpu() {
    let Some(device) = wgpu() else { return };
    decoding_equals_prefill(&device);
}

#[test]
fn decoding_equals_prefill_on_ndarray() {
    decoding_equals_prefill(&ndarray());
}
