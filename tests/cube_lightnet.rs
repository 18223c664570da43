//! The CubeCL LightNet kernels (additive gate + engine, and the non-causal softmax form) against
//! the f64 reference, forward (`o`, final `S` and `z`) and every gradient (`dq`, `dk`, `dv`).
//!
//! Prints `skipped: no wgpu adapter` and passes when there is none (fails instead when
//! `LINATTN_REQUIRE_WGPU` is set, as in CI). Output poisoning is on.

use linattn::cube::CubeContext;
use linattn::lightnet::{self, LightNet};
use linattn::linear::Form;
use linattn::reference::testing::Rng;
use linattn::reference::{max_abs_diff, rel_rms, within_tolerance};
use linattn::{Backend, DType, Tensor};

const F32_TOLERANCE: f64 = 1e-5;

fn cube() -> Option<Backend> {
    match CubeContext::shared() {
        Ok(ctx) => {
            ctx.set_poison_outputs(true);
            Some(Backend::Cube(ctx))
        }
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

#[derive(Clone, Debug)]
struct Case {
    /// (B, T, H, K, V)
    shape: (usize, usize, usize, usize, usize),
    bidirectional: bool,
    /// Standard deviation of the key logits.
    logit_scale: f64,
    initial_state: bool,
    cu_seqlens: Option<Vec<i64>>,
}

fn case(shape: (usize, usize, usize, usize, usize), bidirectional: bool) -> Case {
    Case {
        shape,
        bidirectional,
        logit_scale: 1.0,
        initial_state: !bidirectional,
        cu_seqlens: None,
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s0: Option<Tensor>,
    z0: Option<Tensor>,
    d_o: Tensor,
}

impl Inputs {
    fn draw(case: &Case, seed: u64) -> Inputs {
        let mut rng = Rng::new(seed);
        let (b, t, h, k, v) = case.shape;
        let n_seq = case.cu_seqlens.as_ref().map_or(b, |cu| cu.len() - 1);
        let f32t = |shape: Vec<usize>, data: Vec<f64>| {
            Tensor::from_f64(shape, data).unwrap().to_dtype(DType::F32)
        };
        let q = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
        let logits: Vec<f64> = rng
            .randn(b * t * h * k)
            .into_iter()
            .map(|x| x * case.logit_scale)
            .collect();
        let kk = f32t(vec![b, t, h, k], logits);
        let vv = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
        // A carried state as a previous call leaves it: z = logsumexp of some earlier logits
        // (here around 2), S a prefix-softmax-weighted mean of values (bounded). Every third
        // channel of the first sequence is an empty prefix: z = -inf with S = 0.
        let (s0, z0) = if case.initial_state {
            let mut s = rng.randn(n_seq * h * k * v);
            let mut z: Vec<f64> = rng
                .randn(n_seq * h * k)
                .into_iter()
                .map(|x| 2.0 + 0.5 * x)
                .collect();
            for c in (0..h * k).step_by(3) {
                z[c] = f64::NEG_INFINITY;
                s[c * v..(c + 1) * v].iter_mut().for_each(|x| *x = 0.0);
            }
            (
                Some(f32t(vec![n_seq, h, k, v], s)),
                Some(f32t(vec![n_seq, h, k], z)),
            )
        } else {
            (None, None)
        };
        let d_o = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
        Inputs {
            q,
            k: kk,
            v: vv,
            s0,
            z0,
            d_o,
        }
    }

    fn problem<'a>(&'a self, case: &'a Case) -> LightNet<'a> {
        let mut p = if case.bidirectional {
            LightNet::non_causal(&self.q, &self.k, &self.v)
        } else {
            LightNet::causal(&self.q, &self.k, &self.v)
        };
        if let (Some(s0), Some(z0)) = (&self.s0, &self.z0) {
            p = p.with_initial_state(s0, z0);
        }
        if let Some(cu) = &case.cu_seqlens {
            p = p.with_cu_seqlens(cu);
        }
        p
    }
}

#[derive(Default)]
struct Report {
    worst: std::collections::BTreeMap<String, (f64, String)>,
    failures: Vec<String>,
    cases: usize,
}

impl Report {
    fn compare(&mut self, label: &str, form: Form, name: &str, got: &Tensor, want: &Tensor) {
        let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
        // `z` of an empty prefix is -inf on both sides; compare the finite entries.
        let (a, b): (Vec<f64>, Vec<f64>) = a
            .into_iter()
            .zip(b)
            .filter(|(x, y)| !(*x == f64::NEG_INFINITY && *y == f64::NEG_INFINITY))
            .unzip();
        let rel = rel_rms(&a, &b);
        let key = format!("{form:?} {name}");
        let entry = self.worst.entry(key).or_insert((0.0, String::new()));
        if rel.is_nan() || rel > entry.0 {
            *entry = (rel, label.to_string());
        }
        if !within_tolerance(&a, &b, F32_TOLERANCE) {
            self.failures.push(format!(
                "{label}: {name} rel rms {rel:.3e}, max abs {:.3e}",
                max_abs_diff(&a, &b)
            ));
        }
    }

    fn finish(self, test: &str, started: std::time::Instant) {
        println!(
            "{test}: {} cases in {:.1} s; worst relative RMS per form and tensor:",
            self.cases,
            started.elapsed().as_secs_f64()
        );
        for (key, (rel, label)) in &self.worst {
            println!("  {key:<34} {rel:.2e}  ({label})");
        }
        assert!(self.failures.is_empty(), "{}", self.failures.join("\n"));
    }
}

fn check(report: &mut Report, cube: &Backend, case: &Case, form: Form, seed: u64) {
    let inputs = Inputs::draw(case, seed);
    let problem = inputs.problem(case);
    let label = format!("{case:?} {form:?}");
    report.cases += 1;
    let got = lightnet::forward(cube, &problem, form).unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = lightnet::forward(&Backend::Cpu, &problem, Form::Recurrent).unwrap();
    report.compare(&label, form, "o", &got.o, &want.o);
    assert_eq!(got.state.is_some(), want.state.is_some(), "{label}: state");
    if let (Some(a), Some(b)) = (&got.state, &want.state) {
        report.compare(&label, form, "s", &a.s, &b.s);
        report.compare(&label, form, "z", &a.z, &b.z);
    }
    let got = lightnet::backward(cube, &problem, form, &inputs.d_o)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = lightnet::backward(&Backend::Cpu, &problem, Form::Recurrent, &inputs.d_o).unwrap();
    report.compare(&label, form, "dq", &got.dq, &want.dq);
    report.compare(&label, form, "dk", &got.dk, &want.dk);
    report.compare(&label, form, "dv", &got.dv, &want.dv);
}

fn run(test: &str, cube: &Backend, cases: &[(Case, Form)]) {
    let started = std::time::Instant::now();
    let mut report = Report::default();
    for (i, (case, form)) in cases.iter().enumerate() {
        check(&mut report, cube, case, *form, 2000 + i as u64);
    }
    report.finish(test, started);
}

const FORMS: [Form; 4] = [
    Form::Chunkwise { chunk: 16 },
    Form::Chunkwise { chunk: 64 },
    Form::Recurrent,
    Form::Parallel,
];

/// Causal (with a carried `(S, z)`, including empty-prefix channels) and non-causal, every form,
/// on the shapes of the engine matrix, with unit and wide (sd 4) key logits. The largest engine
/// shape is left out: the reference backward is the O(T^2) definition.
#[test]
fn lightnet_matrix() {
    let Some(cube) = cube() else { return };
    let mut cases = Vec::new();
    for shape in [
        (1, 63, 1, 64, 64),
        (1, 130, 2, 32, 48),
        (2, 200, 2, 60, 100),
    ] {
        for bidirectional in [false, true] {
            for form in FORMS {
                cases.push((case(shape, bidirectional), form));
            }
        }
    }
    for bidirectional in [false, true] {
        let mut wide = case((1, 130, 2, 32, 48), bidirectional);
        wide.logit_scale = 4.0;
        cases.push((wide.clone(), Form::Chunkwise { chunk: 64 }));
        cases.push((wide, Form::Recurrent));
    }
    run("lightnet_matrix", &cube, &cases);
}

/// Packed sequences (empty and one-token segments included): `z` restarts at every sequence.
#[test]
fn lightnet_varlen() {
    let Some(cube) = cube() else { return };
    let mut cases = Vec::new();
    for cu in [vec![0i64, 15], vec![0, 0, 16], vec![0, 1, 100, 300]] {
        let t = *cu.last().unwrap() as usize;
        for bidirectional in [false, true] {
            let mut c = case((1, t, 2, 32, 48), bidirectional);
            c.cu_seqlens = Some(cu.clone());
            for form in FORMS {
                cases.push((c.clone(), form));
            }
        }
    }
    run("lightnet_varlen", &cube, &cases);
}

/// Carrying `(S, z)` across calls: two halves with the state handed over give the result of the
/// whole sequence, on the cube backend itself.
#[test]
fn lightnet_state_carries_across_calls() {
    let Some(cube) = cube() else { return };
    let c = Case {
        initial_state: false,
        ..case((1, 96, 2, 16, 24), false)
    };
    let inputs = Inputs::draw(&c, 7);
    let whole =
        lightnet::forward(&cube, &inputs.problem(&c), Form::Chunkwise { chunk: 16 }).unwrap();
    let split = |t: &Tensor, lo: usize, hi: usize| {
        let s = t.shape();
        let row = s[2] * s[3];
        let data = t.to_f32_vec()[lo * row..hi * row].to_vec();
        Tensor::from_f32(vec![1, hi - lo, s[2], s[3]], data).unwrap()
    };
    let (q1, k1, v1) = (
        split(&inputs.q, 0, 40),
        split(&inputs.k, 0, 40),
        split(&inputs.v, 0, 40),
    );
    let (q2, k2, v2) = (
        split(&inputs.q, 40, 96),
        split(&inputs.k, 40, 96),
        split(&inputs.v, 40, 96),
    );
    let first =
        lightnet::forward(&cube, &LightNet::causal(&q1, &k1, &v1), Form::Recurrent).unwrap();
    let state = first.state.unwrap();
    let second = lightnet::forward(
        &cube,
        &LightNet::causal(&q2, &k2, &v2).with_initial_state(&state.s, &state.z),
        Form::Chunkwise { chunk: 64 },
    )
    .unwrap();
    let mut joined = first.o.to_f64_vec();
    joined.extend(second.o.to_f64_vec());
    let rel = rel_rms(&joined, &whole.o.to_f64_vec());
    assert!(rel < 1e-5, "carried-state output differs: {rel:.3e}");
    let whole_state = whole.state.unwrap();
    let rel_s = rel_rms(
        &second.state.as_ref().unwrap().s.to_f64_vec(),
        &whole_state.s.to_f64_vec(),
    );
    let rel_z = rel_rms(
        &second.state.unwrap().z.to_f64_vec(),
        &whole_state.z.to_f64_vec(),
    );
    assert!(
        rel_s < 1e-5 && rel_z < 1e-6,
        "state: {rel_s:.3e} {rel_z:.3e}"
    );
}

/// Validation: an empty-prefix channel (`z0 = -inf`) with a nonzero `S` row is refused on every
/// backend before any launch.
#[test]
fn lightnet_rejects_state_of_empty_prefix() {
    let Some(cube) = cube() else { return };
    let x = Tensor::zeros(vec![1, 4, 1, 2], DType::F32);
    let s0 = Tensor::from_f32(vec![1, 1, 2, 2], vec![0.0, 0.0, 1.0, 0.0]).unwrap();
    let z0 = Tensor::from_f32(vec![1, 1, 2], vec![f32::NEG_INFINITY, f32::NEG_INFINITY]).unwrap();
    let problem = LightNet::causal(&x, &x, &x).with_initial_state(&s0, &z0);
    for backend in [&cube, &Backend::Cpu] {
        let err = lightnet::forward(backend, &problem, Form::Recurrent).unwrap_err();
        assert!(matches!(err, linattn::Error::InvalidArgument(_)), "{err}");
    }
}

/// The device API checks LightNet's inputs on the device by default (the builder's value check):
/// a NaN in `v` is `NonFinite` naming `v` and the element, an infinity in `do` in the backward
/// pass names `do`; with the check off the kernels run.
#[test]
fn device_api_checks_values_by_default() {
    use linattn::lightnet::cube::{backward_device, forward_device};
    use linattn::{Error, ValueCheck};
    let Some(Backend::Cube(ctx)) = cube() else {
        return;
    };
    let (b, t, h, k, v) = (1, 24, 2, 8, 8);
    let mut rng = Rng::new(51);
    let mut tensor = |n: usize, shape: Vec<usize>| {
        let data: Vec<f32> = rng.randn(n).iter().map(|&x| x as f32).collect();
        Tensor::from_f32(shape, data).unwrap()
    };
    let q = tensor(b * t * h * k, vec![b, t, h, k]);
    let kk = tensor(b * t * h * k, vec![b, t, h, k]);
    let vv = tensor(b * t * h * v, vec![b, t, h, v]);
    let mut bad = vv.to_f32_vec();
    bad[13] = f32::NAN;
    let bad = Tensor::from_f32(vec![b, t, h, v], bad).unwrap();
    let up = |name: &str, x: &Tensor| ctx.upload(name, x).unwrap();
    let (qd, kd, vd, bad_d) = (up("q", &q), up("k", &kk), up("v", &vv), up("v", &bad));
    let form = Form::Chunkwise { chunk: 8 };
    let err = forward_device(&ctx, &LightNet::causal(&qd, &kd, &bad_d), form).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { tensor, index: 13, .. } if tensor == "v"),
        "{err}"
    );
    let unchecked = LightNet::causal(&qd, &kd, &bad_d).with_value_check(ValueCheck::Off);
    assert!(forward_device(&ctx, &unchecked, form).is_ok());
    let mut d_o = vec![0.5f32; b * t * h * v];
    d_o[5] = f32::INFINITY;
    let d_o = up("do", &Tensor::from_f32(vec![b, t, h, v], d_o).unwrap());
    let good = LightNet::causal(&qd, &kd, &vd);
    let err = backward_device(&ctx, &good, form, &d_o).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { tensor, index: 5, .. } if tensor == "do"),
        "{err}"
    );
}
