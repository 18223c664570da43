//! Validation rows of LightNet (causal with a carried state, and the non-causal form).

use linattn_reference::testing::Rng;

use super::linear::{dtypes, form_name, threshold};
use super::{Comparison, Row};
use crate::backend::{Backend, BackendKind};
use crate::error::Error;
use crate::lightnet::{self, LightNet};
use crate::linear::Form;
use crate::tensor::{DType, Tensor};

/// One LightNet configuration of the matrix.
struct Case {
    op: &'static str,
    bidirectional: bool,
    initial_state: bool,
    cu_seqlens: Option<Vec<i64>>,
    /// (B, T, H, K, V)
    shape: (usize, usize, usize, usize, usize),
}

fn cases(quick: bool) -> Vec<Case> {
    let base = |op, bidirectional, shape| Case {
        op,
        bidirectional,
        initial_state: !bidirectional,
        cu_seqlens: None,
        shape,
    };
    let mut cases = vec![
        base("lightnet", false, (1, 63, 2, 32, 48)),
        base("lightnet-noncausal", true, (1, 63, 2, 32, 48)),
    ];
    if !quick {
        for shape in [(1, 130, 2, 32, 48), (2, 200, 2, 60, 100)] {
            cases.push(base("lightnet", false, shape));
            cases.push(base("lightnet-noncausal", true, shape));
        }
        for bidirectional in [false, true] {
            cases.push(Case {
                cu_seqlens: Some(vec![0, 1, 100, 300]),
                initial_state: false,
                ..base(
                    if bidirectional {
                        "lightnet-noncausal-varlen"
                    } else {
                        "lightnet-varlen"
                    },
                    bidirectional,
                    (1, 300, 2, 32, 48),
                )
            });
        }
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

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s0: Option<Tensor>,
    z0: Option<Tensor>,
    d_o: Tensor,
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
        let q = tensor(vec![b, t, h, k], rng.randn(b * t * h * k));
        let kk = tensor(vec![b, t, h, k], rng.randn(b * t * h * k));
        let vv = tensor(vec![b, t, h, v], rng.randn(b * t * h * v));
        let (s0, z0) = if case.initial_state {
            let z: Vec<f64> = rng
                .randn(n_seq * h * k)
                .into_iter()
                .map(|x| 2.0 + 0.5 * x)
                .collect();
            (
                Some(tensor(vec![n_seq, h, k, v], rng.randn(n_seq * h * k * v))),
                Some(tensor(vec![n_seq, h, k], z)),
            )
        } else {
            (None, None)
        };
        let d_o = tensor(vec![b, t, h, v], rng.randn(b * t * h * v));
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

pub(super) fn rows(
    backend: &Backend,
    quick: bool,
    keep: &dyn Fn(&str) -> bool,
    rng: &mut Rng,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for case in cases(quick).into_iter().filter(|c| keep(c.op)) {
        for dtype in dtypes(backend) {
            let inputs = Inputs::draw(&case, dtype, rng);
            let problem = inputs.problem(&case);
            for form in forms(quick) {
                // Every row is checked against the reference's definition-based LightNet
                // (`S_t = sum_u exp(k_u - z_t) v_u`, one formula for every form); the CPU rows
                // run LightNet through the gate transform and the CPU engine in `form`.
                let reference_form = Form::Parallel;
                let (b, t, h, k, v) = case.shape;
                let mut row = Row {
                    op: case.op.to_string(),
                    form: form_name(form),
                    backend: backend.kind(),
                    dtype,
                    shape: format!(
                        "B{b} T{t} H{h} K{k} V{v}{}",
                        case.cu_seqlens
                            .as_ref()
                            .map(|cu| format!(" cu{cu:?}"))
                            .unwrap_or_default()
                    ),
                    max_rel_err: 0.0,
                    worst: String::new(),
                    threshold: threshold(dtype),
                    pass: false,
                    error: None,
                };
                match compare(backend, &problem, &inputs, form, reference_form, dtype) {
                    Ok(cmp) => {
                        row.pass = cmp.pass();
                        row.max_rel_err = cmp.max_rel_err;
                        row.worst = cmp.worst;
                    }
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
    problem: &LightNet,
    inputs: &Inputs,
    form: Form,
    reference_form: Form,
    dtype: DType,
) -> crate::Result<Comparison> {
    let thr = threshold(dtype);
    let thr_o = if matches!(dtype, DType::F16 | DType::BF16) {
        4e-3
    } else {
        thr
    };
    let reference = Backend::Cpu;
    let on_cpu = backend.kind() == BackendKind::Cpu;
    let got = if on_cpu {
        lightnet::forward_via_engine(backend, problem, form)?
    } else {
        lightnet::forward(backend, problem, form)?
    };
    let want = lightnet::forward(&reference, problem, reference_form)?;
    let mut cmp = Comparison::default();
    cmp.add("o", &got.o.to_f64_vec(), &want.o.to_f64_vec(), thr_o);
    match (&got.state, &want.state) {
        (Some(a), Some(b)) => {
            cmp.add("s", &a.s.to_f64_vec(), &b.s.to_f64_vec(), thr);
            cmp.add("z", &a.z.to_f64_vec(), &b.z.to_f64_vec(), thr);
        }
        (None, None) => {}
        _ => cmp.add("state", &[f64::NAN], &[0.0], thr),
    }
    let got = if on_cpu {
        lightnet::backward_via_engine(backend, problem, form, &inputs.d_o)?
    } else {
        lightnet::backward(backend, problem, form, &inputs.d_o)?
    };
    let want = lightnet::backward(&reference, problem, reference_form, &inputs.d_o)?;
    cmp.add("dq", &got.dq.to_f64_vec(), &want.dq.to_f64_vec(), thr);
    cmp.add("dk", &got.dk.to_f64_vec(), &want.dk.to_f64_vec(), thr);
    cmp.add("dv", &got.dv.to_f64_vec(), &want.dv.to_f64_vec(), thr);
    Ok(cmp)
}
