//! Shared helpers of the burn tests: seeded inputs, the f64 reference through linattn's CPU
//! backend, burn-vs-reference comparison, and the devices (wgpu with fusion, NdArray).

#![allow(dead_code)]

use burn::tensor::{Device, Tensor, TensorData};
use linattn::linear::{self, Form, LinearAttention as HostProblem};
use linattn_burn::{Direction, Gate, LinearAttention};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The f32 limit of the issue: relative RMS error of every output and gradient.
pub const F32_LIMIT: f64 = 1e-5;

/// burn's wgpu device (fusion on, as users get it), when an adapter is present.
pub fn wgpu() -> Option<Device> {
    match linattn::cube::CubeContext::shared() {
        Ok(_) => Some(Device::wgpu(Default::default())),
        Err(e) => {
            // CI (.ci/run) sets LINATTN_REQUIRE_WGPU: there a missing adapter is a failure.
            assert!(
                std::env::var_os("LINATTN_REQUIRE_WGPU").is_none(),
                "LINATTN_REQUIRE_WGPU is set but there is no wgpu adapter: {e}"
            );
            println!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

#[allow(deprecated)]
pub fn ndarray() -> Device {
    Device::ndarray()
}

pub fn values(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Relative RMS error of `got` against `want`.
pub fn rel_rms(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

pub fn to_vec<const D: usize>(t: &Tensor<D>) -> Vec<f64> {
    t.clone().into_data().iter::<f64>().collect()
}

pub fn tensor<const D: usize>(data: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    let f32s: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(f32s, shape), device)
}

/// f32-rounded values as f64 (what the burn side actually holds).
pub fn rounded(data: &[f64]) -> Vec<f64> {
    data.iter().map(|&x| x as f32 as f64).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GateCase {
    None,
    PerHead,
    Scalar,
    Vector,
}

/// One engine case of the shape matrix.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub k: usize,
    pub v: usize,
    pub gate: GateCase,
    /// Range of the log decays.
    pub gate_range: (f64, f64),
    pub direction: Direction,
    pub gate_bwd: bool,
    pub normalize: Option<f64>,
    pub h0: bool,
    pub final_state: bool,
    pub cu_seqlens: Option<Vec<i64>>,
    pub form: Form,
}

impl Case {
    pub fn causal(name: &str, gate: GateCase, form: Form) -> Case {
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
            h0: false,
            final_state: false,
            cu_seqlens: None,
            form,
        }
    }

    pub fn num_sequences(&self) -> usize {
        self.cu_seqlens.as_ref().map_or(self.b, |c| c.len() - 1)
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

/// Inputs and cotangents of a case, as f64 (already rounded to f32).
pub struct Data {
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub g: Vec<f64>,
    pub g_bwd: Vec<f64>,
    pub h0: Vec<f64>,
    pub d_o: Vec<f64>,
    pub d_ht: Vec<f64>,
}

impl Data {
    pub fn new(case: &Case, seed: u64) -> Data {
        let mut rng = StdRng::seed_from_u64(seed);
        let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
        let gn: usize = case.gate_shape().iter().product();
        let gn = if case.gate == GateCase::None { 0 } else { gn };
        let n = case.num_sequences();
        let (lo, hi) = case.gate_range;
        Data {
            q: rounded(&values(&mut rng, b * t * h * k, -1.0, 1.0)),
            k: rounded(&values(&mut rng, b * t * h * k, -1.0, 1.0)),
            v: rounded(&values(&mut rng, b * t * h * v, -1.0, 1.0)),
            g: rounded(&values(&mut rng, gn, lo, hi)),
            g_bwd: rounded(&values(&mut rng, gn, lo, hi)),
            h0: rounded(&values(&mut rng, n * h * k * v, -1.0, 1.0)),
            d_o: rounded(&values(&mut rng, b * t * h * v, -1.0, 1.0)),
            d_ht: rounded(&values(&mut rng, n * h * k * v, -1.0, 1.0)),
        }
    }
}

/// Outputs and gradients as f64 vectors, by name.
pub type Results = Vec<(&'static str, Vec<f64>)>;

/// The f64 reference (linattn's CPU backend) of a case.
pub fn reference(case: &Case, data: &Data) -> Results {
    let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
    let host = |d: &[f64], s: Vec<usize>| linattn::Tensor::from_f64(s, d.to_vec()).unwrap();
    let q = host(&data.q, vec![b, t, h, k]);
    let kk = host(&data.k, vec![b, t, h, k]);
    let vv = host(&data.v, vec![b, t, h, v]);
    let g = host(&data.g, case.gate_shape());
    let g_bwd = host(&data.g_bwd, case.gate_shape());
    let n = case.num_sequences();
    let h0 = host(&data.h0, vec![n, h, k, v]);
    fn as_gate(kind: GateCase, t: &linattn::Tensor) -> linear::Gate<'_> {
        match kind {
            GateCase::None => linear::Gate::None,
            GateCase::PerHead => linear::Gate::PerHead(t),
            GateCase::Scalar => linear::Gate::Scalar(t),
            GateCase::Vector => linear::Gate::Vector(t),
        }
    }
    let gate = |t| as_gate(case.gate, t);
    let mut p = match case.direction {
        Direction::Causal => HostProblem::causal(&q, &kk, &vv),
        Direction::Bidirectional => HostProblem::bidirectional(&q, &kk, &vv),
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
    let out = linear::forward(&cpu, &p, case.form).unwrap();
    let d_o = host(&data.d_o, vec![b, t, h, v]);
    let d_ht = host(&data.d_ht, vec![n, h, k, v]);
    let grads =
        linear::backward(&cpu, &p, case.form, &d_o, case.final_state.then_some(&d_ht)).unwrap();
    let mut r: Results = vec![("o", out.o.to_f64_vec())];
    if case.final_state {
        r.push(("ht", out.ht.unwrap().to_f64_vec()));
    }
    r.push(("dq", grads.dq.to_f64_vec()));
    r.push(("dk", grads.dk.to_f64_vec()));
    r.push(("dv", grads.dv.to_f64_vec()));
    if let Some(dg) = grads.dg {
        r.push(("dg", dg.to_f64_vec()));
    }
    if let Some(dg) = grads.dg_bwd {
        r.push(("dg_bwd", dg.to_f64_vec()));
    }
    if let Some(dh0) = grads.dh0 {
        r.push(("dh0", dh0.to_f64_vec()));
    }
    r
}

/// The same case through linattn-burn on `device` (made autodiff here), with burn's autodiff
/// of `loss = sum(o * do) + sum(ht * dht)`.
pub fn through_burn(case: &Case, data: &Data, device: &Device) -> Results {
    let device = device.clone().autodiff();
    let (b, t, h, k, v) = (case.b, case.t, case.h, case.k, case.v);
    let n = case.num_sequences();
    let q = tensor(&data.q, [b, t, h, k], &device).require_grad();
    let kk = tensor(&data.k, [b, t, h, k], &device).require_grad();
    let vv = tensor(&data.v, [b, t, h, v], &device).require_grad();
    let make_gate = |d: &[f64]| -> Gate {
        match case.gate {
            GateCase::None => Gate::None,
            GateCase::PerHead => Gate::PerHead(tensor(d, [h], &device).require_grad()),
            GateCase::Scalar => Gate::Scalar(tensor(d, [b, t, h], &device).require_grad()),
            GateCase::Vector => Gate::Vector(tensor(d, [b, t, h, k], &device).require_grad()),
        }
    };
    // Gradients are read from the leaf tensors; keep handles to them.
    let gate = make_gate(&data.g);
    let gate_bwd = make_gate(&data.g_bwd);
    let g_leaf = leaf_of(&gate);
    let gb_leaf = leaf_of(&gate_bwd);
    let h0 = tensor(&data.h0, [n, h, k, v], &device).require_grad();
    let mut p = match case.direction {
        Direction::Causal => LinearAttention::causal(q.clone(), kk.clone(), vv.clone()),
        Direction::Bidirectional => {
            LinearAttention::bidirectional(q.clone(), kk.clone(), vv.clone())
        }
    }
    .with_gate(gate)
    .with_form(case.form);
    if case.gate_bwd {
        p = p.with_gate_bwd(gate_bwd);
    }
    if let Some(eps) = case.normalize {
        p = p.with_normalize(eps);
    }
    if case.h0 {
        p = p.with_h0(h0.clone());
    }
    if let Some(cu) = &case.cu_seqlens {
        p = p.with_cu_seqlens(cu.clone());
    }
    if case.final_state {
        p = p.with_final_state();
    }
    let out = p.forward().expect("a valid case");
    let d_o = tensor(&data.d_o, [b, t, h, v], &device);
    let mut loss = (out.o.clone() * d_o).sum();
    if let Some(ht) = &out.ht {
        let d_ht = tensor(&data.d_ht, [n, h, k, v], &device);
        loss = loss + (ht.clone() * d_ht).sum();
    }
    let grads = loss.backward();
    let mut r: Results = vec![("o", to_vec(&out.o))];
    if let Some(ht) = &out.ht {
        r.push(("ht", to_vec(ht)));
    }
    r.push(("dq", to_vec(&q.grad(&grads).expect("dq"))));
    r.push(("dk", to_vec(&kk.grad(&grads).expect("dk"))));
    r.push(("dv", to_vec(&vv.grad(&grads).expect("dv"))));
    if let Some(g) = g_leaf {
        r.push(("dg", g.grad(&grads).expect("dg")));
    }
    if case.gate_bwd
        && let Some(g) = gb_leaf
    {
        r.push(("dg_bwd", g.grad(&grads).expect("dg_bwd")));
    }
    if case.h0 {
        r.push(("dh0", to_vec(&h0.grad(&grads).expect("dh0"))));
    }
    r
}

/// A gate's leaf tensor, with a way to read its gradient as a flat vector.
pub enum Leaf {
    R1(Tensor<1>),
    R3(Tensor<3>),
    R4(Tensor<4>),
}

impl Leaf {
    pub fn grad(&self, grads: &burn::tensor::Gradients) -> Option<Vec<f64>> {
        match self {
            Leaf::R1(t) => t.grad(grads).map(|g| to_vec(&g)),
            Leaf::R3(t) => t.grad(grads).map(|g| to_vec(&g)),
            Leaf::R4(t) => t.grad(grads).map(|g| to_vec(&g)),
        }
    }
}

fn leaf_of(gate: &Gate) -> Option<Leaf> {
    match gate {
        Gate::None => None,
        Gate::PerHead(t) => Some(Leaf::R1(t.clone())),
        Gate::Scalar(t) => Some(Leaf::R3(t.clone())),
        Gate::Vector(t) => Some(Leaf::R4(t.clone())),
    }
}

/// Compares every output and gradient; returns the worst error, panics above `limit`.
pub fn compare(case: &Case, got: &Results, want: &Results, limit: f64) -> f64 {
    let names = |r: &Results| r.iter().map(|(n, _)| *n).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{}: outputs differ", case.name);
    let mut worst: f64 = 0.0;
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let e = rel_rms(g, w);
        assert!(
            e <= limit,
            "{}: `{name}` relative RMS error {e:.3e} > {limit:.0e}",
            case.name
        );
        worst = worst.max(e);
    }
    worst
}

/// Every float parameter of `module` (or, with `grads`, its gradient) as a host vector, in
/// visit order.
pub fn param_values<M: burn::module::Module>(
    module: &M,
    grads: Option<&burn::tensor::Gradients>,
) -> Vec<Vec<f64>> {
    struct Read<'a> {
        grads: Option<&'a burn::tensor::Gradients>,
        out: Vec<Vec<f64>>,
    }
    impl burn::module::ModuleVisitor for Read<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let t = param.val();
            let t = match self.grads {
                Some(g) => t.grad(g).expect("every parameter has a gradient"),
                None => t,
            };
            self.out.push(to_vec(&t));
        }
    }
    let mut r = Read {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut r);
    r.out
}
