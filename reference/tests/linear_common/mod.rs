//! Shared helpers of the `linear_*` test suites: owned random problems, the loss of the gradient
//! convention, and comparisons.
#![allow(dead_code)]

use linattn_reference::linear::{
    self, Dims, Direction, Form, Gate, GateKind, Grads, Output, Problem,
};
use linattn_reference::testing::{Rng, logsigmoid_gates};
use linattn_reference::{max_abs_diff, rel_rms};

pub const ALL_KINDS: [GateKind; 4] = [
    GateKind::None,
    GateKind::PerHead,
    GateKind::Scalar,
    GateKind::Vector,
];

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    pub dims: Dims,
    pub kind: GateKind,
    /// Gates are `logsigmoid(u) / strength`.
    pub strength: f64,
    pub direction: Direction,
    /// A separate `gate_bwd` (bidirectional only).
    pub separate_gb: bool,
    pub normalize: bool,
    pub h0: bool,
    pub cu_seqlens: Option<Vec<usize>>,
}

impl Spec {
    pub fn new(dims: Dims, kind: GateKind, direction: Direction) -> Self {
        Spec {
            dims,
            kind,
            strength: 1.0,
            direction,
            separate_gb: false,
            normalize: false,
            h0: false,
            cu_seqlens: None,
        }
    }
}

/// Owned inputs of a [`Problem`] plus the upstream gradients of the loss.
#[derive(Clone, Debug)]
pub struct Case {
    pub dims: Dims,
    pub kind: GateKind,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub g: Vec<f64>,
    pub gb: Option<Vec<f64>>,
    pub direction: Direction,
    pub scale: f64,
    pub normalize: Option<f64>,
    pub h0: Option<Vec<f64>>,
    pub cu_seqlens: Option<Vec<usize>>,
    pub d_o: Vec<f64>,
    pub d_ht: Option<Vec<f64>>,
}

impl Case {
    pub fn random(seed: u64, spec: &Spec) -> Case {
        let mut rng = Rng::new(seed);
        let d = spec.dims;
        let n_seq = spec.cu_seqlens.as_ref().map_or(d.b, |cu| cu.len() - 1);
        // Normalisation divides by sum_j A_ij: use positive features (as LION does) so the
        // denominator stays away from zero and the problem is well conditioned.
        let mut features = |n: usize| {
            if spec.normalize {
                rng.uniform_vec(n, 0.2, 1.0)
            } else {
                rng.randn(n)
            }
        };
        let q = features(d.qk_len());
        let k = features(d.qk_len());
        let v = rng.randn(d.v_len());
        let g = logsigmoid_gates(&mut rng, spec.kind.len(&d), spec.strength);
        let gb = (spec.separate_gb && spec.direction == Direction::Bidirectional)
            .then(|| logsigmoid_gates(&mut rng, spec.kind.len(&d), spec.strength));
        let has_state = spec.direction == Direction::Causal && !spec.normalize;
        let h0 = (spec.h0 && has_state).then(|| rng.randn(n_seq * d.state_len()));
        let d_o = rng.randn(d.v_len());
        let d_ht = has_state.then(|| rng.randn(n_seq * d.state_len()));
        Case {
            dims: d,
            kind: spec.kind,
            q,
            k,
            v,
            g,
            gb,
            direction: spec.direction,
            scale: (d.k as f64).powf(-0.5),
            normalize: spec.normalize.then_some(1e-6),
            h0,
            cu_seqlens: spec.cu_seqlens.clone(),
            d_o,
            d_ht,
        }
    }

    pub fn problem(&self) -> Problem<'_> {
        Problem {
            dims: self.dims,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            gate: Gate::from_kind(self.kind, &self.g),
            gate_bwd: self.gb.as_deref().map(|gb| Gate::from_kind(self.kind, gb)),
            direction: self.direction,
            scale: self.scale,
            normalize: self.normalize,
            h0: self.h0.as_deref(),
            cu_seqlens: self.cu_seqlens.as_deref(),
        }
    }

    pub fn forward(&self, form: Form) -> Output {
        linear::forward(&self.problem(), form)
    }

    pub fn backward(&self, form: Form) -> Grads {
        linear::backward(&self.problem(), form, &self.d_o, self.d_ht.as_deref())
    }

    /// `sum(o * d_o) + sum(ht * d_ht)`, the loss whose gradient `backward` returns.
    pub fn loss(&self, form: Form) -> f64 {
        let out = self.forward(form);
        let mut loss: f64 = out.o.iter().zip(&self.d_o).map(|(a, b)| a * b).sum();
        if let (Some(ht), Some(d_ht)) = (&out.ht, &self.d_ht) {
            loss += ht.iter().zip(d_ht).map(|(a, b)| a * b).sum::<f64>();
        }
        loss
    }
}

/// Absolute agreement that passes regardless of the relative error. The inputs are O(1), so the
/// terms inside every result are O(1) and f64 rounding leaves absolute errors near 1e-16..1e-15
/// per term. Some results are far smaller than their terms, because the function itself is
/// ill-conditioned there (e.g. `dq` of a normalised row dominated by one token is proportional to
/// `eps`); there the relative error is meaningless, as the project's pass rule (ops.md: pass
/// outright if max abs err <= 1e-6 in f32) also recognises. 1e-13 is that rule scaled to f64.
pub const ABS_FLOOR: f64 = 1e-13;

/// Asserts `rel_rms(got, want) <= tol`, or `max |got - want| <= ABS_FLOOR` (NaN always fails).
#[track_caller]
pub fn assert_rel(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_rms(got, want);
    let abs = max_abs_diff(got, want);
    assert!(
        e <= tol || abs <= ABS_FLOOR,
        "{what}: rel_rms {e:e} > {tol:e} and max abs diff {abs:e} > {ABS_FLOOR:e}"
    );
}

/// Asserts every output agrees.
#[track_caller]
pub fn assert_outputs(what: &str, got: &Output, want: &Output, tol: f64) {
    assert_rel(&format!("{what}: o"), &got.o, &want.o, tol);
    assert_eq!(got.ht.is_some(), want.ht.is_some(), "{what}: ht presence");
    if let (Some(a), Some(b)) = (&got.ht, &want.ht) {
        assert_rel(&format!("{what}: ht"), a, b, tol);
    }
}

#[track_caller]
pub fn assert_opt(what: &str, got: &Option<Vec<f64>>, want: &Option<Vec<f64>>, tol: f64) {
    assert_eq!(got.is_some(), want.is_some(), "{what}: presence");
    if let (Some(a), Some(b)) = (got, want) {
        assert_rel(what, a, b, tol);
    }
}

/// Asserts every gradient agrees.
#[track_caller]
pub fn assert_grads(what: &str, got: &Grads, want: &Grads, tol: f64) {
    assert_rel(&format!("{what}: dq"), &got.dq, &want.dq, tol);
    assert_rel(&format!("{what}: dk"), &got.dk, &want.dk, tol);
    assert_rel(&format!("{what}: dv"), &got.dv, &want.dv, tol);
    assert_opt(&format!("{what}: dg"), &got.dg, &want.dg, tol);
    assert_opt(&format!("{what}: dg_bwd"), &got.dg_bwd, &want.dg_bwd, tol);
    assert_opt(&format!("{what}: dh0"), &got.dh0, &want.dh0, tol);
}

/// Runs every form (recurrent, parallel, and chunkwise with each of `chunks`) forward and
/// backward and asserts that they agree with the parallel form to `tol`. Returns the parallel
/// form's output.
#[track_caller]
pub fn assert_forms_agree(what: &str, case: &Case, chunks: &[usize], tol: f64) -> Output {
    let want = case.forward(Form::Parallel);
    let want_grads = case.backward(Form::Parallel);
    assert!(
        want.o.iter().all(|x| x.is_finite()),
        "{what}: parallel o not finite"
    );
    let mut forms = vec![Form::Recurrent];
    forms.extend(chunks.iter().map(|&chunk| Form::Chunkwise { chunk }));
    for form in forms {
        let label = format!("{what} {form:?} vs Parallel");
        assert_outputs(&label, &case.forward(form), &want, tol);
        assert_grads(&label, &case.backward(form), &want_grads, tol);
    }
    want
}
