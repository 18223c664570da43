//! The CubeCL engine kernels against the f64 reference, forward and every gradient.
//!
//! Runs on whatever wgpu adapter is present (llvmpipe in CI); prints `skipped: no wgpu adapter`
//! and passes when there is none (fails instead when `LINATTN_REQUIRE_WGPU` is set, as in CI).
//! Output poisoning is on: every output and scratch buffer is filled with NaN before the kernels
//! that must write it, so an unwritten element fails.
//!
//! Matrix (ops.md / issue 3): shapes (B,T,H,K,V) (1,63,1,64,64), (2,200,2,60,100), (1,130,2,32,48)
//! in the full product gate kind x strength x direction x chunk 16/64; (2,256,4,128,128) in a
//! subset (every gate kind and direction at chunk 64, the extreme strengths at chunk 16); the
//! recurrent and parallel forms on the small shapes in full and the medium one per gate kind;
//! varlen `[0,15]`, `[0,0,16]`, `[0,1,100,300]` in every form. Causal cases carry `h0` and `dht`;
//! bidirectional ones alternate row-sum normalisation and a separate backward gate.

use linattn::cube::CubeContext;
use linattn::linear::{self, Direction, Form, Gate, GateKind, LinearAttention};
use linattn::reference::testing::{GATE_STRENGTHS, Rng, logsigmoid_gates};
use linattn::reference::{max_abs_diff, rel_rms, within_tolerance};
use linattn::{Backend, Tensor};
use std::collections::BTreeMap;

/// ops.md: f32 paths against the f64 reference.
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
    gate: GateKind,
    strength: f64,
    direction: Direction,
    separate_gate_bwd: bool,
    normalize: bool,
    h0: bool,
    cu_seqlens: Option<Vec<i64>>,
}

impl Case {
    fn new(
        shape: (usize, usize, usize, usize, usize),
        gate: GateKind,
        direction: Direction,
    ) -> Case {
        Case {
            shape,
            gate,
            strength: 1.0,
            direction,
            separate_gate_bwd: false,
            normalize: false,
            h0: direction == Direction::Causal,
            cu_seqlens: None,
        }
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Option<Tensor>,
    g_bwd: Option<Tensor>,
    h0: Option<Tensor>,
    d_o: Tensor,
    d_ht: Option<Tensor>,
}

impl Inputs {
    fn draw(case: &Case, seed: u64) -> Inputs {
        let mut rng = Rng::new(seed);
        let (b, t, h, k, v) = case.shape;
        let n_seq = case.cu_seqlens.as_ref().map_or(b, |cu| cu.len() - 1);
        let f32t = |shape: Vec<usize>, data: Vec<f64>| {
            Tensor::from_f64(shape, data)
                .unwrap()
                .to_dtype(linattn::DType::F32)
        };
        let gate = |rng: &mut Rng| {
            let shape = match case.gate {
                GateKind::None => return None,
                GateKind::PerHead => vec![h],
                GateKind::Scalar => vec![b, t, h],
                GateKind::Vector => vec![b, t, h, k],
            };
            let n = shape.iter().product();
            Some(f32t(shape, logsigmoid_gates(rng, n, case.strength)))
        };
        let q = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
        let kk = f32t(vec![b, t, h, k], rng.randn(b * t * h * k));
        // Positive features keep a normalised denominator away from zero (LION's feature maps do
        // the same); otherwise plain normal draws.
        let (q, kk) = if case.normalize {
            let pos = |t: Tensor| {
                let d: Vec<f64> = t.to_f64_vec().iter().map(|x| x.abs() + 0.1).collect();
                f32t(t.shape().to_vec(), d)
            };
            (pos(q), pos(kk))
        } else {
            (q, kk)
        };
        let vv = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
        let g = gate(&mut rng);
        let g_bwd = if case.separate_gate_bwd {
            gate(&mut rng)
        } else {
            None
        };
        let state = vec![n_seq, h, k, v];
        let h0 = case
            .h0
            .then(|| f32t(state.clone(), rng.randn(n_seq * h * k * v)));
        let d_o = f32t(vec![b, t, h, v], rng.randn(b * t * h * v));
        let has_ht = case.direction == Direction::Causal && !case.normalize;
        let d_ht = has_ht.then(|| f32t(state, rng.randn(n_seq * h * k * v)));
        Inputs {
            q,
            k: kk,
            v: vv,
            g,
            g_bwd,
            h0,
            d_o,
            d_ht,
        }
    }

    fn problem<'a>(&'a self, case: &'a Case) -> LinearAttention<'a> {
        let wrap = |t: &'a Tensor| match case.gate {
            GateKind::None => Gate::None,
            GateKind::PerHead => Gate::PerHead(t),
            GateKind::Scalar => Gate::Scalar(t),
            GateKind::Vector => Gate::Vector(t),
        };
        let mut p = match case.direction {
            Direction::Causal => LinearAttention::causal(&self.q, &self.k, &self.v),
            Direction::Bidirectional => LinearAttention::bidirectional(&self.q, &self.k, &self.v),
        };
        if let Some(g) = &self.g {
            p = p.with_gate(wrap(g));
        }
        if let Some(gb) = &self.g_bwd {
            p = p.with_gate_bwd(wrap(gb));
        }
        if case.normalize {
            p = p.with_normalize(1e-6);
        }
        if let Some(h0) = &self.h0 {
            p = p.with_h0(h0);
        }
        if let Some(cu) = &case.cu_seqlens {
            p = p.with_cu_seqlens(cu);
        }
        p
    }
}

/// Worst relative RMS error per (form, tensor) over a test, printed at its end.
#[derive(Default)]
struct Report {
    worst: BTreeMap<String, (f64, String)>,
    failures: Vec<String>,
    cases: usize,
}

impl Report {
    fn compare(&mut self, label: &str, form: Form, name: &str, got: &Tensor, want: &Tensor) {
        let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
        let rel = rel_rms(&a, &b);
        if std::env::var("LINATTN_TEST_VERBOSE").is_ok() {
            println!("{label}: {name} {rel:.2e}");
        }
        let key = format!("{} {name}", form_name(form));
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
            println!("  {key:<18} {rel:.2e}  ({label})");
        }
        assert!(self.failures.is_empty(), "{}", self.failures.join("\n"));
    }
}

fn form_name(form: Form) -> String {
    match form {
        Form::Recurrent => "recurrent".into(),
        Form::Parallel => "parallel".into(),
        Form::Chunkwise { chunk } => format!("chunkwise({chunk})"),
    }
}

fn short_label(case: &Case, form: Form) -> String {
    let (b, t, h, k, v) = case.shape;
    format!(
        "B{b} T{t} H{h} K{k} V{v} {:?} n{} {:?}{}{}{}{} {}",
        case.gate,
        case.strength,
        case.direction,
        if case.normalize { " norm" } else { "" },
        if case.separate_gate_bwd { " g_bwd" } else { "" },
        if case.h0 { " h0" } else { "" },
        case.cu_seqlens
            .as_ref()
            .map(|cu| format!(" cu{cu:?}"))
            .unwrap_or_default(),
        form_name(form)
    )
}

/// Forward and backward of `case` on the cube backend in `form` against the reference.
fn check(report: &mut Report, cube: &Backend, case: &Case, form: Form, seed: u64) {
    let inputs = Inputs::draw(case, seed);
    let problem = inputs.problem(case);
    let label = short_label(case, form);
    // The reference's recurrent form: the cheapest, and its forms agree to 1e-10.
    let reference_form = Form::Recurrent;
    report.cases += 1;
    let got = linear::forward(cube, &problem, form).unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = linear::forward(&Backend::Cpu, &problem, reference_form).unwrap();
    report.compare(&label, form, "o", &got.o, &want.o);
    assert_eq!(got.ht.is_some(), want.ht.is_some(), "{label}: ht presence");
    if let (Some(a), Some(b)) = (&got.ht, &want.ht) {
        report.compare(&label, form, "ht", a, b);
    }
    let got = linear::backward(cube, &problem, form, &inputs.d_o, inputs.d_ht.as_ref())
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = linear::backward(
        &Backend::Cpu,
        &problem,
        reference_form,
        &inputs.d_o,
        inputs.d_ht.as_ref(),
    )
    .unwrap();
    report.compare(&label, form, "dq", &got.dq, &want.dq);
    report.compare(&label, form, "dk", &got.dk, &want.dk);
    report.compare(&label, form, "dv", &got.dv, &want.dv);
    for (name, a, b) in [
        ("dg", &got.dg, &want.dg),
        ("dg_bwd", &got.dg_bwd, &want.dg_bwd),
        ("dh0", &got.dh0, &want.dh0),
    ] {
        assert_eq!(a.is_some(), b.is_some(), "{label}: {name} presence");
        if let (Some(a), Some(b)) = (a, b) {
            report.compare(&label, form, name, a, b);
        }
    }
}

fn run(test: &str, cube: &Backend, cases: &[(Case, Form)]) {
    let started = std::time::Instant::now();
    let mut report = Report::default();
    for (i, (case, form)) in cases.iter().enumerate() {
        check(&mut report, cube, case, *form, 1000 + i as u64);
    }
    report.finish(test, started);
}

const SMALL: (usize, usize, usize, usize, usize) = (1, 63, 1, 64, 64);
const MEDIUM: (usize, usize, usize, usize, usize) = (2, 200, 2, 60, 100);
const LARGE: (usize, usize, usize, usize, usize) = (2, 256, 4, 128, 128);
const ODD: (usize, usize, usize, usize, usize) = (1, 130, 2, 32, 48);

/// Every gate configuration of the matrix: no gate, and each gated kind at each strength.
fn gate_configs() -> Vec<(GateKind, f64)> {
    let mut configs = vec![(GateKind::None, 1.0)];
    for kind in [GateKind::PerHead, GateKind::Scalar, GateKind::Vector] {
        for n in GATE_STRENGTHS {
            configs.push((kind, n));
        }
    }
    configs
}

/// The case of the matrix for one shape, gate and direction. Causal cases carry `h0` and `dht`.
/// Bidirectional cases are normalised for the LION-LIT/LION-D gates (none, per head) and at
/// strength 1, and use a separate backward gate for scalar/vector gates at the other strengths, so
/// the matrix covers both options with and without each other.
fn matrix_case(
    shape: (usize, usize, usize, usize, usize),
    gate: GateKind,
    strength: f64,
    direction: Direction,
) -> Case {
    let mut case = Case::new(shape, gate, direction);
    case.strength = strength;
    if direction == Direction::Bidirectional {
        case.normalize = matches!(gate, GateKind::None | GateKind::PerHead) || strength == 1.0;
        case.separate_gate_bwd =
            matches!(gate, GateKind::Scalar | GateKind::Vector) && strength != 1.0;
    }
    case
}

const DIRECTIONS: [Direction; 2] = [Direction::Causal, Direction::Bidirectional];
const CHUNKS: [Form; 2] = [Form::Chunkwise { chunk: 16 }, Form::Chunkwise { chunk: 64 }];

/// Full product (gate kind x strength x direction x chunk 16/64) on the three smaller shapes.
#[test]
fn chunkwise_matrix() {
    let Some(cube) = cube() else { return };
    let mut cases = Vec::new();
    for shape in [SMALL, MEDIUM, ODD] {
        for (gate, n) in gate_configs() {
            for direction in DIRECTIONS {
                for form in CHUNKS {
                    cases.push((matrix_case(shape, gate, n, direction), form));
                }
            }
        }
    }
    run("chunkwise_matrix", &cube, &cases);
}

/// (2, 256, 4, 128, 128): every gate kind in both directions at chunk 64 and strength 1, and the
/// vector gate at the extreme strengths with chunk 16 (the full product would take minutes on
/// llvmpipe; these cover every kernel path at this size).
#[test]
fn chunkwise_large_shape() {
    let Some(cube) = cube() else { return };
    let mut cases = Vec::new();
    for gate in [
        GateKind::None,
        GateKind::PerHead,
        GateKind::Scalar,
        GateKind::Vector,
    ] {
        for direction in DIRECTIONS {
            cases.push((
                matrix_case(LARGE, gate, 1.0, direction),
                Form::Chunkwise { chunk: 64 },
            ));
        }
    }
    cases.push((
        matrix_case(LARGE, GateKind::Vector, 0.1, Direction::Causal),
        Form::Chunkwise { chunk: 16 },
    ));
    cases.push((
        matrix_case(LARGE, GateKind::Vector, 10.0, Direction::Bidirectional),
        Form::Chunkwise { chunk: 16 },
    ));
    run("chunkwise_large_shape", &cube, &cases);
}

/// The recurrent and parallel forms: full product on the two small shapes, and every gate kind
/// in both directions on the medium one.
#[test]
fn recurrent_and_parallel_matrix() {
    let Some(cube) = cube() else { return };
    let mut cases = Vec::new();
    for form in [Form::Recurrent, Form::Parallel] {
        for shape in [SMALL, ODD] {
            for (gate, n) in gate_configs() {
                for direction in DIRECTIONS {
                    cases.push((matrix_case(shape, gate, n, direction), form));
                }
            }
        }
        for gate in [
            GateKind::None,
            GateKind::PerHead,
            GateKind::Scalar,
            GateKind::Vector,
        ] {
            for direction in DIRECTIONS {
                cases.push((matrix_case(MEDIUM, gate, 1.0, direction), form));
            }
        }
    }
    run("recurrent_and_parallel_matrix", &cube, &cases);
}

/// Packed variable-length sequences (with empty and one-token segments): every gate kind and
/// strength, both directions, every form.
#[test]
fn varlen_matrix() {
    let Some(cube) = cube() else { return };
    let mut cases = Vec::new();
    for cu in [vec![0i64, 15], vec![0, 0, 16], vec![0, 1, 100, 300]] {
        let t = *cu.last().unwrap() as usize;
        for (gate, n) in gate_configs() {
            for direction in DIRECTIONS {
                let mut case = matrix_case((1, t, 2, 32, 48), gate, n, direction);
                case.cu_seqlens = Some(cu.clone());
                for form in [
                    Form::Chunkwise { chunk: 16 },
                    Form::Chunkwise { chunk: 64 },
                    Form::Recurrent,
                    Form::Parallel,
                ] {
                    cases.push((case.clone(), form));
                }
            }
        }
    }
    run("varlen_matrix", &cube, &cases);
}

/// Head dims of 256 and 512 (no split path is needed: no kernel holds a whole head in shared
/// memory or registers).
#[test]
fn wide_heads() {
    let Some(cube) = cube() else { return };
    let mut cases = Vec::new();
    for shape in [
        (1, 40, 1, 256, 256),
        (1, 24, 1, 256, 512),
        (1, 24, 1, 512, 512),
    ] {
        for direction in DIRECTIONS {
            cases.push((
                matrix_case(shape, GateKind::Vector, 1.0, direction),
                Form::Chunkwise { chunk: 16 },
            ));
        }
    }
    run("wide_heads", &cube, &cases);
}

mod probe {
    use cubecl::prelude::*;

    #[cube(launch_unchecked)]
    pub fn count_iterations(out: &mut [u32], outer: u32, inner: u32) {
        let mut count = 0u32;
        for _ in 0..outer {
            for _ in 0..inner {
                count += 1;
            }
        }
        out[0] = count;
    }
}

/// Documents the llvmpipe limit every kernel is sized for: a shader invocation gets 65535 loop
/// iterations in total, over all its loops (gallivm's loop limiter), after which every loop exits
/// silently. On other adapters the count comes back complete.
#[test]
fn llvmpipe_loop_budget() {
    use cubecl::prelude::*;
    use probe::count_iterations;

    let Some(Backend::Cube(ctx)) = cube() else {
        return;
    };
    let client = ctx.client();
    let out = client.create_from_slice(u32::as_bytes(&[0]));
    // 400 x 400 = 160000 inner iterations (+ 400 outer).
    unsafe {
        count_iterations::launch_unchecked(
            client,
            CubeCount::new_single(),
            CubeDim::new_1d(1),
            BufferArg::from_raw_parts(out.clone(), 1),
            400u32,
            400u32,
        )
    };
    let counted = u32::from_bytes(&client.read_one(out).unwrap())[0];
    println!(
        "{}: counted {counted} of 160000 iterations",
        ctx.adapter_name()
    );
    if ctx.is_llvmpipe() {
        assert!(
            counted < 160_000,
            "llvmpipe ran every iteration: the limit has gone"
        );
        assert!(
            counted as usize > linattn::cube::LOOP_BUDGET,
            "the limit is below our budget"
        );
    } else {
        assert_eq!(counted, 160_000);
    }
}
