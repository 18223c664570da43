//! The shape/gate/direction matrix of the CUDA engine tests, shared by the GPU suite
//! (tests/cuda_linear.rs) and the host-emulation suite (tests/cuda_emulated.rs): inputs drawn like
//! `linattn validate`, results compared with the f64 reference under the ops.md thresholds.
#![allow(dead_code)]

use linattn::linear::{
    self, Direction, Form, Gate, GateKind, Grads, LinearAttention, Output, Spec,
};
use linattn::reference::testing::{Rng, logsigmoid_gates};
use linattn::{Backend, DType, Result, Tensor};

#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    /// (B, T, H, K, V)
    pub shape: (usize, usize, usize, usize, usize),
    pub direction: Direction,
    pub gate: GateKind,
    pub separate_gate_bwd: bool,
    pub normalize: bool,
    pub h0: bool,
    pub dht: bool,
    pub cu_seqlens: Option<Vec<i64>>,
    /// `n` of the `logsigmoid(u) / n` gates.
    pub strength: f64,
}

impl Case {
    pub fn causal(name: &str, shape: (usize, usize, usize, usize, usize), gate: GateKind) -> Case {
        Case {
            name: name.to_string(),
            shape,
            direction: Direction::Causal,
            gate,
            separate_gate_bwd: false,
            normalize: false,
            h0: true,
            dht: true,
            cu_seqlens: None,
            strength: 1.0,
        }
    }

    pub fn bidirectional(
        name: &str,
        shape: (usize, usize, usize, usize, usize),
        gate: GateKind,
    ) -> Case {
        Case {
            direction: Direction::Bidirectional,
            h0: false,
            dht: false,
            ..Case::causal(name, shape, gate)
        }
    }

    pub fn label(&self, dtype: DType, form: Form) -> String {
        format!(
            "{} {:?} {dtype} {form:?} n={}{}",
            self.name,
            self.shape,
            self.strength,
            self.cu_seqlens
                .as_ref()
                .map(|c| format!(" cu={c:?}"))
                .unwrap_or_default()
        )
    }
}

/// Inputs of one case, drawn in f64 and rounded to the input dtype (the reference sees the
/// rounded values); gates f32.
pub struct Inputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub g: Option<Tensor>,
    pub g_bwd: Option<Tensor>,
    pub h0: Option<Tensor>,
    pub d_o: Tensor,
    pub d_ht: Option<Tensor>,
    pub case: Case,
}

impl Inputs {
    pub fn draw(case: &Case, dtype: DType, seed: u64) -> Inputs {
        let mut rng = Rng::new(seed);
        let (b, t, h, k, v) = case.shape;
        let n_seq = case.cu_seqlens.as_ref().map_or(b, |cu| cu.len() - 1);
        let tensor = |shape: Vec<usize>, data: Vec<f64>| {
            Tensor::from_f64(shape, data).unwrap().to_dtype(dtype)
        };
        let gate = |rng: &mut Rng| -> Option<Tensor> {
            let shape = match case.gate {
                GateKind::None => return None,
                GateKind::PerHead => vec![h],
                GateKind::Scalar => vec![b, t, h],
                GateKind::Vector => vec![b, t, h, k],
            };
            let n = shape.iter().product();
            Some(
                Tensor::from_f64(shape, logsigmoid_gates(rng, n, case.strength))
                    .unwrap()
                    .to_dtype(DType::F32),
            )
        };
        // Normalised problems get LION's positive features (elu + 1): row sums of A are then
        // positive and the division well conditioned (with raw normal q, k some rows sum to about
        // zero and any rounding is amplified without bound).
        let features = |x: Vec<f64>| -> Vec<f64> {
            if case.normalize {
                x.into_iter()
                    .map(|x| if x > 0.0 { x + 1.0 } else { x.exp() })
                    .collect()
            } else {
                x
            }
        };
        let q = tensor(vec![b, t, h, k], features(rng.randn(b * t * h * k)));
        let kk = tensor(vec![b, t, h, k], features(rng.randn(b * t * h * k)));
        let vv = tensor(vec![b, t, h, v], rng.randn(b * t * h * v));
        let g = gate(&mut rng);
        let g_bwd = if case.separate_gate_bwd {
            gate(&mut rng)
        } else {
            None
        };
        let state = vec![n_seq, h, k, v];
        let h0 = case.h0.then(|| {
            Tensor::from_f64(state.clone(), rng.randn(n_seq * h * k * v))
                .unwrap()
                .to_dtype(DType::F32)
        });
        let d_o = tensor(vec![b, t, h, v], rng.randn(b * t * h * v));
        let has_ht = case.direction == Direction::Causal && !case.normalize;
        let d_ht = (has_ht && case.dht).then(|| {
            Tensor::from_f64(state, rng.randn(n_seq * h * k * v))
                .unwrap()
                .to_dtype(DType::F32)
        });
        Inputs {
            q,
            k: kk,
            v: vv,
            g,
            g_bwd,
            h0,
            d_o,
            d_ht,
            case: case.clone(),
        }
    }

    pub fn problem(&self) -> LinearAttention<'_> {
        let case = &self.case;
        fn wrap(kind: GateKind, t: &Tensor) -> Gate<'_> {
            match kind {
                GateKind::None => Gate::None,
                GateKind::PerHead => Gate::PerHead(t),
                GateKind::Scalar => Gate::Scalar(t),
                GateKind::Vector => Gate::Vector(t),
            }
        }
        let mut p = match case.direction {
            Direction::Causal => LinearAttention::causal(&self.q, &self.k, &self.v),
            Direction::Bidirectional => LinearAttention::bidirectional(&self.q, &self.k, &self.v),
        };
        if let Some(g) = &self.g {
            p = p.with_gate(wrap(case.gate, g));
        }
        if let Some(gb) = &self.g_bwd {
            p = p.with_gate_bwd(wrap(case.gate, gb));
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

/// ops.md thresholds: (output o, everything else).
pub fn thresholds(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 | DType::F64 => (1e-5, 1e-5),
        DType::F16 | DType::BF16 => (4e-3, 5e-3),
    }
}

/// One compared tensor.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub rel: f64,
    pub max_abs: f64,
    pub pass: bool,
}

fn check(name: &'static str, got: &Tensor, want: &Tensor, thr: f64) -> Check {
    let (a, b) = (got.to_f64_vec(), want.to_f64_vec());
    assert_eq!(a.len(), b.len(), "{name}: length");
    Check {
        name,
        rel: linattn::reference::rel_rms(&a, &b),
        max_abs: linattn::reference::max_abs_diff(&a, &b),
        pass: linattn::reference::within_tolerance(&a, &b, thr),
    }
}

fn check_opt(
    out: &mut Vec<Check>,
    name: &'static str,
    got: Option<&Tensor>,
    want: Option<&Tensor>,
    thr: f64,
) {
    match (got, want) {
        (Some(g), Some(w)) => out.push(check(name, g, w, thr)),
        (None, None) => {}
        _ => out.push(Check {
            name,
            rel: f64::NAN,
            max_abs: f64::NAN,
            pass: false,
        }),
    }
}

/// Runs forward and backward through `fwd`/`bwd` and compares every output and gradient with the
/// f64 reference (recurrent form). Returns the checks.
pub fn run_case(
    inputs: &Inputs,
    dtype: DType,
    form: Form,
    fwd: &dyn Fn(&Spec, &LinearAttention, Form) -> Result<Output>,
    bwd: &dyn Fn(&Spec, &LinearAttention, Form, &Tensor, Option<&Tensor>) -> Result<Grads>,
) -> Result<Vec<Check>> {
    let problem = inputs.problem();
    let spec = problem.validate()?;
    let (thr_o, thr) = thresholds(dtype);
    let want = linear::forward(&Backend::Cpu, &problem, Form::Recurrent)?;
    let got = fwd(&spec, &problem, form)?;
    let mut checks = vec![check("o", &got.o, &want.o, thr_o)];
    check_opt(&mut checks, "ht", got.ht.as_ref(), want.ht.as_ref(), thr);
    let d_ht = inputs.d_ht.as_ref();
    let want = linear::backward(&Backend::Cpu, &problem, Form::Recurrent, &inputs.d_o, d_ht)?;
    let got = bwd(&spec, &problem, form, &inputs.d_o, d_ht)?;
    checks.push(check("dq", &got.dq, &want.dq, thr));
    checks.push(check("dk", &got.dk, &want.dk, thr));
    checks.push(check("dv", &got.dv, &want.dv, thr));
    check_opt(&mut checks, "dg", got.dg.as_ref(), want.dg.as_ref(), thr);
    check_opt(
        &mut checks,
        "dg_bwd",
        got.dg_bwd.as_ref(),
        want.dg_bwd.as_ref(),
        thr,
    );
    check_opt(&mut checks, "dh0", got.dh0.as_ref(), want.dh0.as_ref(), thr);
    Ok(checks)
}

pub fn summary(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "{}={:.2e}{}",
                c.name,
                c.rel,
                if c.pass { "" } else { "(FAIL)" }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The shapes of the engine test matrix (B, T, H, K, V); K = 60, V = 100 and K = 32, V = 48 run
/// through the zero padding of the 64-channel tiles.
pub const SHAPES: [(usize, usize, usize, usize, usize); 4] = [
    (1, 63, 1, 64, 64),
    (2, 200, 2, 60, 100),
    (2, 256, 4, 128, 128),
    (1, 130, 2, 32, 48),
];

/// Packed-sequence offsets of the variable-length cases (B = 1, T = last entry).
pub const VARLEN: [&[i64]; 3] = [&[0, 15], &[0, 0, 16], &[0, 1, 100, 300]];

/// The engine configurations (ops) of the matrix on one shape and gate strength.
pub fn ops(shape: (usize, usize, usize, usize, usize), strength: f64) -> Vec<Case> {
    let with = |c: Case| Case { strength, ..c };
    vec![
        with(Case::causal("gla", shape, GateKind::Vector)),
        with(Case::causal("retnet", shape, GateKind::PerHead)),
        with(Case::causal("mamba2", shape, GateKind::Scalar)),
        Case {
            h0: false,
            ..Case::causal("linear", shape, GateKind::None)
        },
        Case {
            normalize: true,
            ..Case::bidirectional("lion-lit", shape, GateKind::None)
        },
        with(Case {
            normalize: true,
            ..Case::bidirectional("lion-d", shape, GateKind::PerHead)
        }),
        with(Case {
            normalize: true,
            separate_gate_bwd: true,
            ..Case::bidirectional("lion-s", shape, GateKind::Scalar)
        }),
        with(Case::bidirectional("bidir-vector", shape, GateKind::Vector)),
    ]
}

/// Variable-length cases: causal GLA (with h0 per segment) and LION-S.
pub fn varlen_cases() -> Vec<Case> {
    let mut out = Vec::new();
    for cu in VARLEN {
        let t = *cu.last().unwrap() as usize;
        let shape = (1, t, 2, 32, 48);
        out.push(Case {
            cu_seqlens: Some(cu.to_vec()),
            ..Case::causal("gla-varlen", shape, GateKind::Vector)
        });
        out.push(Case {
            cu_seqlens: Some(cu.to_vec()),
            normalize: true,
            separate_gate_bwd: true,
            ..Case::bidirectional("lion-s-varlen", shape, GateKind::Scalar)
        });
    }
    out
}

/// The whole matrix: every shape x gate strength x op (ungated ops once per shape), plus the
/// variable-length cases.
pub fn full_matrix() -> Vec<Case> {
    let mut out = Vec::new();
    for shape in SHAPES {
        for (si, strength) in linattn::reference::testing::GATE_STRENGTHS
            .into_iter()
            .enumerate()
        {
            for case in ops(shape, strength) {
                if case.gate == GateKind::None && si > 0 {
                    continue;
                }
                out.push(case);
            }
        }
    }
    out.extend(varlen_cases());
    out
}

/// The forms every case runs in.
pub const FORMS: [Form; 3] = [
    Form::Chunkwise { chunk: 64 },
    Form::Chunkwise { chunk: 16 },
    Form::Recurrent,
];
