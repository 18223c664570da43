//! Validation rows of the decayed linear attention engine and its front-ends.

use linattn_reference::testing::{Rng, logsigmoid_gates};

use super::{Comparison, Row};
use crate::backend::{Backend, BackendKind};
use crate::error::Error;
use crate::linear::{self, Direction, Form, Gate, GateKind, LinearAttention};
use crate::tensor::{DType, Tensor};

/// One engine configuration of the matrix.
struct Case {
    op: &'static str,
    direction: Direction,
    gate: GateKind,
    separate_gate_bwd: bool,
    normalize: bool,
    h0: bool,
    cu_seqlens: Option<Vec<i64>>,
    /// (B, T, H, K, V)
    shape: (usize, usize, usize, usize, usize),
    /// `n` of the `logsigmoid(u) / n` gates.
    strength: f64,
}

fn cases(quick: bool) -> Vec<Case> {
    let base = |op, direction, gate, normalize, h0| Case {
        op,
        direction,
        gate,
        separate_gate_bwd: false,
        normalize,
        h0,
        cu_seqlens: None,
        shape: (1, 63, 2, 32, 48),
        strength: 1.0,
    };
    use Direction::{Bidirectional, Causal};
    use GateKind::{PerHead, Scalar, Vector};
    let mut cases = vec![
        base("gla", Causal, Vector, false, true),
        base("retnet", Causal, PerHead, false, true),
        base("mamba2", Causal, Scalar, false, true),
        base("linear", Causal, GateKind::None, false, false),
        Case {
            cu_seqlens: Some(vec![0, 15, 15, 63]),
            ..base("gla-varlen", Causal, Vector, false, true)
        },
        base("lion-lit", Bidirectional, GateKind::None, true, false),
        base("lion-d", Bidirectional, PerHead, true, false),
        Case {
            separate_gate_bwd: true,
            ..base("lion-s", Bidirectional, Scalar, true, false)
        },
    ];
    if !quick {
        let mut more = Vec::new();
        for strength in linattn_reference::testing::GATE_STRENGTHS {
            for shape in [
                (1, 63, 1, 64, 64),
                (2, 200, 2, 60, 100),
                (1, 130, 2, 32, 48),
            ] {
                more.push(Case {
                    shape,
                    strength,
                    ..base("gla", Causal, Vector, false, true)
                });
                more.push(Case {
                    shape,
                    strength,
                    separate_gate_bwd: true,
                    ..base("lion-s", Bidirectional, Scalar, true, false)
                });
            }
        }
        more.push(Case {
            cu_seqlens: Some(vec![0, 1, 100, 300]),
            shape: (1, 300, 2, 32, 48),
            ..base("gla-varlen", Causal, Vector, false, true)
        });
        more.push(Case {
            cu_seqlens: Some(vec![0, 0, 16]),
            shape: (1, 16, 2, 32, 48),
            ..base("gla-varlen", Causal, Vector, false, true)
        });
        cases.extend(more);
    }
    cases
}

fn forms(quick: bool) -> Vec<Form> {
    let mut forms = vec![
        Form::Recurrent,
        Form::Parallel,
        Form::Chunkwise { chunk: 16 },
    ];
    if !quick {
        forms.push(Form::Chunkwise { chunk: 64 });
    }
    forms
}

pub(super) fn form_name(form: Form) -> String {
    match form {
        Form::Recurrent => "recurrent".into(),
        Form::Parallel => "parallel".into(),
        Form::Chunkwise { chunk } => format!("chunkwise({chunk})"),
    }
}

/// The dtypes each backend is validated in.
pub(super) fn dtypes(backend: &Backend) -> Vec<DType> {
    match backend.kind() {
        BackendKind::Cpu => vec![DType::F64],
        BackendKind::Cube => vec![DType::F32],
        BackendKind::Cuda => vec![DType::BF16, DType::F32],
    }
}

/// ops.md thresholds; the CPU backend is held to the f64 agreement of the reference forms.
pub(super) fn threshold(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        DType::F16 | DType::BF16 => 5e-3,
    }
}

/// Inputs of one case, drawn in f64 and rounded to `dtype` (the reference sees the rounded values).
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
    fn draw(case: &Case, dtype: DType, rng: &mut Rng) -> Inputs {
        let (b, t, h, k, v) = case.shape;
        let n_seq = case.cu_seqlens.as_ref().map_or(b, |cu| cu.len() - 1);
        let tensor = |shape: Vec<usize>, data: Vec<f64>| {
            Tensor::from_f64(shape, data)
                .expect("sizes match")
                .to_dtype(dtype)
        };
        let gate = |rng: &mut Rng| -> Option<Tensor> {
            let shape = match case.gate {
                GateKind::None => return None,
                GateKind::PerHead => vec![h],
                GateKind::Scalar => vec![b, t, h],
                GateKind::Vector => vec![b, t, h, k],
            };
            let n = shape.iter().product();
            // Gates stay f32 whatever the input dtype (cumulative gates are always f32).
            Some(
                Tensor::from_f64(shape, logsigmoid_gates(rng, n, case.strength))
                    .expect("sizes match")
                    .to_dtype(if dtype == DType::F64 {
                        DType::F64
                    } else {
                        DType::F32
                    }),
            )
        };
        // Row-sum normalisation divides by `sum_j A_ij`: LION applies a positive feature map
        // (elu + 1 for LIT) so that it stays positive. Raw normal draws let it cross zero, where
        // the problem is ill-conditioned and no f32 path can meet 1e-5.
        let features = |x: Vec<f64>| -> Vec<f64> {
            if case.normalize {
                x.into_iter()
                    .map(|v| if v > 0.0 { v + 1.0 } else { v.exp() })
                    .collect()
            } else {
                x
            }
        };
        let q = tensor(vec![b, t, h, k], features(rng.randn(b * t * h * k)));
        let kk = tensor(vec![b, t, h, k], features(rng.randn(b * t * h * k)));
        let vv = tensor(vec![b, t, h, v], rng.randn(b * t * h * v));
        let g = gate(rng);
        let g_bwd = if case.separate_gate_bwd {
            gate(rng)
        } else {
            None
        };
        let state = vec![n_seq, h, k, v];
        let h0 = case
            .h0
            .then(|| tensor(state.clone(), rng.randn(n_seq * h * k * v)));
        let d_o = tensor(vec![b, t, h, v], rng.randn(b * t * h * v));
        let has_ht = case.direction == Direction::Causal && !case.normalize;
        let d_ht = has_ht.then(|| tensor(state, rng.randn(n_seq * h * k * v)));
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

pub(super) fn rows(
    backend: &Backend,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
    rng: &mut Rng,
) -> Vec<Row> {
    let reference_backend = Backend::Cpu;
    let mut rows = Vec::new();
    for case in cases(quick).into_iter().filter(|c| keep(c.op)) {
        for dtype in dtypes(backend) {
            let inputs = Inputs::draw(&case, dtype, rng);
            let problem = inputs.problem(&case);
            for form in forms(quick) {
                // The CPU backend in the parallel form *is* the reference: check it against the
                // recurrent form instead, so that every row compares two different computations.
                let reference_form = if backend.kind() == BackendKind::Cpu && form == Form::Parallel
                {
                    Form::Recurrent
                } else {
                    Form::Parallel
                };
                let (b, t, h, k, v) = case.shape;
                let mut row = Row {
                    op: case.op.to_string(),
                    form: form_name(form),
                    backend: backend.kind(),
                    dtype,
                    shape: format!(
                        "B{b} T{t} H{h} K{k} V{v}{}{}",
                        case.cu_seqlens
                            .as_ref()
                            .map(|cu| format!(" cu{cu:?}"))
                            .unwrap_or_default(),
                        if quick {
                            String::new()
                        } else {
                            format!(" n{}", case.strength)
                        }
                    ),
                    max_rel_err: 0.0,
                    worst: String::new(),
                    threshold: threshold(dtype),
                    pass: false,
                    error: None,
                };
                match compare(
                    backend,
                    &reference_backend,
                    &problem,
                    &inputs,
                    form,
                    reference_form,
                    dtype,
                ) {
                    Ok(cmp) => cmp.fill(&mut row),
                    Err(Error::Unsupported(why)) => {
                        row.pass = true;
                        row.error = Some(format!("n/a ({why})"));
                    }
                    Err(e) => row.error = Some(e.to_string()),
                }
                rows.push(row);
            }
        }
    }
    rows
}

fn compare(
    backend: &Backend,
    reference_backend: &Backend,
    problem: &LinearAttention,
    inputs: &Inputs,
    form: Form,
    reference_form: Form,
    dtype: DType,
) -> crate::Result<Comparison> {
    let thr = threshold(dtype);
    // ops.md: with f16/bf16 inputs the output is held to 4e-3, gradients to 5e-3.
    let thr_o = if matches!(dtype, DType::F16 | DType::BF16) {
        4e-3
    } else {
        thr
    };
    let got = linear::forward(backend, problem, form)?;
    let want = linear::forward(reference_backend, problem, reference_form)?;
    let mut cmp = Comparison::default();
    cmp.add("o", &got.o.to_f64_vec(), &want.o.to_f64_vec(), thr_o);
    if let (Some(a), Some(b)) = (&got.ht, &want.ht) {
        cmp.add("ht", &a.to_f64_vec(), &b.to_f64_vec(), thr);
    }
    let d_ht = inputs.d_ht.as_ref();
    let got = linear::backward(backend, problem, form, &inputs.d_o, d_ht)?;
    let want = linear::backward(
        reference_backend,
        problem,
        reference_form,
        &inputs.d_o,
        d_ht,
    )?;
    let pairs = [
        ("dq", Some(&got.dq), Some(&want.dq)),
        ("dk", Some(&got.dk), Some(&want.dk)),
        ("dv", Some(&got.dv), Some(&want.dv)),
        ("dg", got.dg.as_ref(), want.dg.as_ref()),
        ("dg_bwd", got.dg_bwd.as_ref(), want.dg_bwd.as_ref()),
        ("dh0", got.dh0.as_ref(), want.dh0.as_ref()),
    ];
    for (name, a, b) in pairs {
        match (a, b) {
            (Some(a), Some(b)) => cmp.add(name, &a.to_f64_vec(), &b.to_f64_vec(), thr),
            (None, None) => {}
            _ => cmp.add(name, &[f64::NAN], &[0.0], thr),
        }
    }
    Ok(cmp)
}
