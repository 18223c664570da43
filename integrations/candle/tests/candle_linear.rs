//! The engine through linattn-candle, forward and every gradient through `Tensor::backward`,
//! against linattn's f64 reference in the recurrent form (a different computation from the
//! chunkwise and parallel forms the cases run in) on the ops.md shape matrix: odd T (37),
//! non-power-of-two head dims (K = 24, V = 20), strong and weak gates, every gate kind in both
//! directions, h0 and ht, LION with a separate backward gate, varlen with an empty segment, and
//! 16-bit inputs. Loss: `sum(o * do) + sum(ht * dht)`.

mod common;

use candle_core::{DType, Device};
use common::*;
use linattn::linear::{self as engine, Direction, Form};
use linattn_candle::{Gate, LinearAttention};

#[derive(Clone, Copy, Debug, PartialEq)]
enum GateCase {
    None,
    PerHead,
    Scalar,
    Vector,
}

#[derive(Clone, Debug)]
struct Case {
    name: String,
    b: usize,
    t: usize,
    h: usize,
    k: usize,
    v: usize,
    gate: GateCase,
    gate_range: (f64, f64),
    direction: Direction,
    gate_bwd: bool,
    normalize: Option<f64>,
    h0: bool,
    cu_seqlens: Option<Vec<i64>>,
    form: Form,
    dtype: DType,
}

impl Case {
    fn causal(name: &str, gate: GateCase, form: Form) -> Case {
        Case {
            name: name.into(),
            b: 2,
            t: 37,
            h: 2,
            k: 24,
            v: 20,
            gate,
            gate_range: (-1.5, -0.05),
            direction: Direction::Causal,
            gate_bwd: false,
            normalize: None,
            h0: true,
            cu_seqlens: None,
            form,
            dtype: DType::F32,
        }
    }

    fn lion(name: &str, gate: GateCase, gate_bwd: bool, form: Form) -> Case {
        Case {
            direction: Direction::Bidirectional,
            normalize: Some(1e-6),
            gate_bwd,
            h0: false,
            ..Case::causal(name, gate, form)
        }
    }

    fn n(&self) -> usize {
        self.cu_seqlens.as_ref().map_or(self.b, |c| c.len() - 1)
    }

    fn final_state(&self) -> bool {
        self.direction == Direction::Causal && self.normalize.is_none()
    }

    fn gate_shape(&self) -> Vec<usize> {
        match self.gate {
            GateCase::None => vec![0],
            GateCase::PerHead => vec![self.h],
            GateCase::Scalar => vec![self.b, self.t, self.h],
            GateCase::Vector => vec![self.b, self.t, self.h, self.k],
        }
    }
}

struct Data {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Vec<f64>,
    g_bwd: Vec<f64>,
    h0: Vec<f64>,
    d_o: Vec<f64>,
    d_ht: Vec<f64>,
}

impl Data {
    fn new(case: &Case, seed: u64) -> Data {
        let mut rng = rng(seed);
        let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
        let gn: usize = case.gate_shape().iter().product();
        let gn = if case.gate == GateCase::None { 0 } else { gn };
        let n = case.n();
        let (lo, hi) = case.gate_range;
        // LION's features are positive (elu + 1): the normaliser stays away from 0.
        let (flo, fhi) = if case.normalize.is_some() {
            (0.1, 1.0)
        } else {
            (-1.0, 1.0)
        };
        let input = |rng: &mut _, n, lo, hi| rounded(&values(rng, n, lo, hi), case.dtype);
        Data {
            q: input(&mut rng, b * t * h * k, flo, fhi),
            k: input(&mut rng, b * t * h * k, flo, fhi),
            v: input(&mut rng, b * t * h * v, -1.0, 1.0),
            g: rounded(&values(&mut rng, gn, lo, hi), DType::F32),
            g_bwd: rounded(&values(&mut rng, gn, lo, hi), DType::F32),
            h0: rounded(&values(&mut rng, n * h * k * v, -1.0, 1.0), DType::F32),
            d_o: rounded(&values(&mut rng, b * t * h * v, -1.0, 1.0), case.dtype),
            d_ht: rounded(&values(&mut rng, n * h * k * v, -1.0, 1.0), DType::F32),
        }
    }
}

/// linattn's f64 reference, recurrent form.
fn reference(case: &Case, data: &Data) -> Results {
    let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
    let n = case.n();
    let q = host(&data.q, vec![b, t, h, k]);
    let kk = host(&data.k, vec![b, t, h, k]);
    let vv = host(&data.v, vec![b, t, h, v]);
    let g = host(&data.g, case.gate_shape());
    let g_bwd = host(&data.g_bwd, case.gate_shape());
    let h0 = host(&data.h0, vec![n, h, k, v]);
    let gate = |t| match case.gate {
        GateCase::None => engine::Gate::None,
        GateCase::PerHead => engine::Gate::PerHead(t),
        GateCase::Scalar => engine::Gate::Scalar(t),
        GateCase::Vector => engine::Gate::Vector(t),
    };
    let mut p = match case.direction {
        Direction::Causal => engine::LinearAttention::causal(&q, &kk, &vv),
        Direction::Bidirectional => engine::LinearAttention::bidirectional(&q, &kk, &vv),
    }
    .with_gate(gate(&g));
    if case.gate_bwd {
        p = p.with_gate_bwd(gate(&g_bwd));
    }
    if let Some(eps) = case.normalize {
        p = p.with_normalize(eps);
    }
    if case.h0 {
        p = p.with_h0(&h0);
    }
    if let Some(cu) = case.cu_seqlens.as_deref() {
        p = p.with_cu_seqlens(cu);
    }
    let cpu = linattn::Backend::Cpu;
    let out = engine::forward(&cpu, &p, Form::Recurrent).unwrap();
    let d_o = host(&data.d_o, vec![b, t, h, v]);
    let d_ht = host(&data.d_ht, vec![n, h, k, v]);
    let g = engine::backward(
        &cpu,
        &p,
        Form::Recurrent,
        &d_o,
        case.final_state().then_some(&d_ht),
    )
    .unwrap();
    let mut r: Results = vec![("o", out.o.to_f64_vec())];
    if let Some(ht) = out.ht {
        r.push(("ht", ht.to_f64_vec()));
    }
    r.push(("dq", g.dq.to_f64_vec()));
    r.push(("dk", g.dk.to_f64_vec()));
    r.push(("dv", g.dv.to_f64_vec()));
    if let Some(dg) = g.dg {
        r.push(("dg", dg.to_f64_vec()));
    }
    if let Some(dg) = g.dg_bwd {
        r.push(("dg_bwd", dg.to_f64_vec()));
    }
    if let Some(dh0) = g.dh0 {
        r.push(("dh0", dh0.to_f64_vec()));
    }
    r
}

/// The same case through linattn-candle on `device`, gradients by `Tensor::backward`.
fn through_candle(case: &Case, data: &Data, device: &Device) -> Results {
    let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
    let n = case.n();
    let q = var(&data.q, &[b, t, h, k], case.dtype, device);
    let kk = var(&data.k, &[b, t, h, k], case.dtype, device);
    let vv = var(&data.v, &[b, t, h, v], case.dtype, device);
    let g = var(&data.g, &case.gate_shape(), DType::F32, device);
    let g_bwd = var(&data.g_bwd, &case.gate_shape(), DType::F32, device);
    let h0 = var(&data.h0, &[n, h, k, v], DType::F32, device);
    let gate = |t: &candle_core::Tensor| match case.gate {
        GateCase::None => Gate::None,
        GateCase::PerHead => Gate::PerHead(t.clone()),
        GateCase::Scalar => Gate::Scalar(t.clone()),
        GateCase::Vector => Gate::Vector(t.clone()),
    };
    let mut p = match case.direction {
        Direction::Causal => LinearAttention::causal(q.as_tensor(), kk.as_tensor(), vv.as_tensor()),
        Direction::Bidirectional => {
            LinearAttention::bidirectional(q.as_tensor(), kk.as_tensor(), vv.as_tensor())
        }
    }
    .with_gate(gate(g.as_tensor()))
    .with_form(case.form);
    if case.gate_bwd {
        p = p.with_gate_bwd(gate(g_bwd.as_tensor()));
    }
    if let Some(eps) = case.normalize {
        p = p.with_normalize(eps);
    }
    if case.h0 {
        p = p.with_h0(h0.as_tensor());
    }
    if let Some(cu) = &case.cu_seqlens {
        p = p.with_cu_seqlens(cu);
    }
    let out = p.forward().expect("a valid case");
    assert_eq!(
        out.o.dtype(),
        case.dtype,
        "{}: o keeps the inputs' dtype",
        case.name
    );
    let d_o = tensor(&data.d_o, &[b, t, h, v], case.dtype, device);
    let mut loss = (&out.o * &d_o)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap();
    if let Some(ht) = &out.ht {
        let d_ht = tensor(&data.d_ht, &[n, h, k, v], DType::F32, device);
        loss = (loss + (ht * &d_ht).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    let grad = |v: &candle_core::Var, name| to_vec(grads.get(v.as_tensor()).expect(name));
    let mut r: Results = vec![("o", to_vec(&out.o))];
    if let Some(ht) = &out.ht {
        r.push(("ht", to_vec(ht)));
    }
    r.push(("dq", grad(&q, "dq")));
    r.push(("dk", grad(&kk, "dk")));
    r.push(("dv", grad(&vv, "dv")));
    if case.gate != GateCase::None {
        r.push(("dg", grad(&g, "dg")));
    }
    if case.gate_bwd {
        r.push(("dg_bwd", grad(&g_bwd, "dg_bwd")));
    }
    if case.h0 {
        r.push(("dh0", grad(&h0, "dh0")));
    }
    r
}

fn cases() -> Vec<Case> {
    let c16 = Form::Chunkwise { chunk: 16 };
    let c64 = Form::Chunkwise { chunk: 64 };
    let mut out = Vec::new();
    for form in [c16, c64, Form::Recurrent, Form::Parallel] {
        out.push(Case::causal("gla", GateCase::Vector, form));
    }
    out.push(Case::causal("retnet", GateCase::PerHead, c16));
    out.push(Case::causal("mamba2", GateCase::Scalar, c16));
    out.push(Case {
        h0: false,
        ..Case::causal("linear", GateCase::None, c16)
    });
    out.push(Case {
        gate_range: (-8.0, -2.0),
        ..Case::causal("gla strong gates", GateCase::Vector, c16)
    });
    out.push(Case {
        gate_range: (-0.01, -0.001),
        ..Case::causal("gla weak gates", GateCase::Vector, c16)
    });
    out.push(Case {
        b: 1,
        cu_seqlens: Some(vec![0, 0, 17, 37]),
        ..Case::causal("gla varlen with an empty segment", GateCase::Vector, c16)
    });
    out.push(Case::lion("lion-lit", GateCase::None, false, c16));
    out.push(Case::lion("lion-d", GateCase::PerHead, false, c16));
    out.push(Case::lion("lion-s with g_bwd", GateCase::Scalar, true, c16));
    out.push(Case::lion(
        "lion-s recurrent",
        GateCase::Scalar,
        true,
        Form::Recurrent,
    ));
    out.push(Case {
        normalize: None,
        ..Case::lion("bidirectional vector gates", GateCase::Vector, false, c64)
    });
    out.push(Case {
        b: 1,
        cu_seqlens: Some(vec![0, 5, 5, 37]),
        ..Case::lion("lion-s varlen", GateCase::Scalar, true, c16)
    });
    out
}

#[test]
fn every_case_matches_the_reference_on_every_device() {
    for device in devices() {
        let mut worst: f64 = 0.0;
        for (i, case) in cases().iter().enumerate() {
            let data = Data::new(case, 100 + i as u64);
            let want = reference(case, &data);
            let got = through_candle(case, &data, &device);
            let e = compare(
                &format!("{} on {device:?}", case.name),
                &got,
                &want,
                F32_LIMIT,
            );
            worst = worst.max(e);
        }
        println!(
            "{device:?}: {} cases, worst relative RMS error {worst:.2e} (limit {F32_LIMIT:.0e})",
            cases().len()
        );
    }
}

/// bf16 and f16 inputs keep their dtype in `o`; the errors are ops.md's 16-bit limits.
#[test]
fn half_inputs_keep_their_dtype() {
    for device in devices() {
        for dtype in [DType::BF16, DType::F16] {
            let case = Case {
                dtype,
                ..Case::causal(
                    "gla 16-bit",
                    GateCase::Vector,
                    Form::Chunkwise { chunk: 16 },
                )
            };
            let data = Data::new(&case, 7);
            let e = compare(
                &format!("{dtype:?} on {device:?}"),
                &through_candle(&case, &data, &device),
                &reference(&case, &data),
                HALF_LIMIT,
            );
            println!("{dtype:?} on {device:?}: worst {e:.2e}");
        }
    }
}

/// An input that does not require a gradient gets none, and the others are still right.
#[test]
fn constants_get_no_gradient() {
    let device = Device::Cpu;
    let case = Case::causal("gla", GateCase::Vector, Form::Chunkwise { chunk: 16 });
    let data = Data::new(&case, 3);
    let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
    let q = var(&data.q, &[b, t, h, k], DType::F32, &device);
    let kk = tensor(&data.k, &[b, t, h, k], DType::F32, &device);
    let vv = tensor(&data.v, &[b, t, h, v], DType::F32, &device);
    let g = tensor(&data.g, &[b, t, h, k], DType::F32, &device);
    let out = LinearAttention::causal(q.as_tensor(), &kk, &vv)
        .with_gate(Gate::Vector(g.clone()))
        .forward()
        .unwrap();
    let grads = out.o.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(q.as_tensor()).is_some());
    assert!(grads.get(&kk).is_none());
    assert!(grads.get(&g).is_none());
}
