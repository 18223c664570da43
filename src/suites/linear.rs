//! The engine matrix of the CUDA tests: shapes x gate kinds x directions x gate strengths, the
//! variable-length cases, and the runner that compares forward and every gradient with the f64
//! reference (recurrent form) under the ops.md thresholds. Inputs are drawn in f64 and rounded to
//! the input dtype, so the reference sees exactly the values the kernels see.
//!
//! Callers: `tests/cuda_emulated.rs` (the host emulation of the kernels), `tests/cuda_linear.rs`
//! and `linattn validate --device cuda --full` (on a GPU, through [`gpu`]).

use crate::linear::{self, Direction, Form, Gate, GateKind, Grads, LinearAttention, Output, Spec};
use crate::reference::testing::{Rng, logsigmoid_gates};
use crate::{Backend, DType, Result, Tensor};

use super::{Check, Outcome, Run, compare_tensors};

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
    pub fn draw(case: &Case, dtype: DType, seed: u64) -> Result<Inputs> {
        let mut rng = Rng::new(seed);
        let (b, t, h, k, v) = case.shape;
        let n_seq = case.cu_seqlens.as_ref().map_or(b, |cu| cu.len() - 1);
        let tensor = |shape: Vec<usize>, data: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_f64(shape, data)?.to_dtype(dtype))
        };
        let f32_tensor = |shape: Vec<usize>, data: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_f64(shape, data)?.to_dtype(DType::F32))
        };
        let gate = |rng: &mut Rng| -> Result<Option<Tensor>> {
            let shape = match case.gate {
                GateKind::None => return Ok(None),
                GateKind::PerHead => vec![h],
                GateKind::Scalar => vec![b, t, h],
                GateKind::Vector => vec![b, t, h, k],
            };
            let n = shape.iter().product();
            f32_tensor(shape, logsigmoid_gates(rng, n, case.strength)).map(Some)
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
        let q = tensor(vec![b, t, h, k], features(rng.randn(b * t * h * k)))?;
        let kk = tensor(vec![b, t, h, k], features(rng.randn(b * t * h * k)))?;
        let vv = tensor(vec![b, t, h, v], rng.randn(b * t * h * v))?;
        let g = gate(&mut rng)?;
        let g_bwd = if case.separate_gate_bwd {
            gate(&mut rng)?
        } else {
            None
        };
        let state = vec![n_seq, h, k, v];
        let h0 = if case.h0 {
            Some(f32_tensor(state.clone(), rng.randn(n_seq * h * k * v))?)
        } else {
            None
        };
        let d_o = tensor(vec![b, t, h, v], rng.randn(b * t * h * v))?;
        let has_ht = case.direction == Direction::Causal && !case.normalize;
        let d_ht = if has_ht && case.dht {
            Some(f32_tensor(state, rng.randn(n_seq * h * k * v))?)
        } else {
            None
        };
        Ok(Inputs {
            q,
            k: kk,
            v: vv,
            g,
            g_bwd,
            h0,
            d_o,
            d_ht,
            case: case.clone(),
        })
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

fn check_opt(
    out: &mut Vec<Check>,
    name: &'static str,
    got: Option<&Tensor>,
    want: Option<&Tensor>,
    thr: f64,
) {
    match (got, want) {
        (Some(g), Some(w)) => out.push(compare_tensors(name, g, w, thr)),
        (None, None) => {}
        (Some(_), None) => out.push(Check::failed(name, "returned, but the reference has none")),
        (None, Some(_)) => out.push(Check::failed(name, "missing")),
    }
}

/// A forward implementation under test.
pub type FwdFn<'a> = dyn Fn(&Spec, &LinearAttention, Form) -> Result<Output> + 'a;
/// A backward implementation under test.
pub type BwdFn<'a> =
    dyn Fn(&Spec, &LinearAttention, Form, &Tensor, Option<&Tensor>) -> Result<Grads> + 'a;

/// A case's inputs with the f64 reference's outputs and gradients (recurrent form).
pub struct Prepared {
    pub inputs: Inputs,
    pub want: Output,
    pub want_grads: Grads,
}

impl Prepared {
    /// Draws the inputs of `case` from `seed` in `dtype` and runs the reference on them.
    pub fn new(case: &Case, dtype: DType, seed: u64) -> Outcome<Prepared> {
        let inputs = Inputs::draw(case, dtype, seed)?;
        let problem = inputs.problem();
        let want = linear::forward(&Backend::Cpu, &problem, Form::Recurrent)?;
        let want_grads = linear::backward(
            &Backend::Cpu,
            &problem,
            Form::Recurrent,
            &inputs.d_o,
            inputs.d_ht.as_ref(),
        )?;
        Ok(Prepared {
            inputs,
            want,
            want_grads,
        })
    }
}

/// Runs forward and backward through `fwd` / `bwd` in `form` and compares every output and
/// gradient with the prepared reference under the thresholds of `dtype`.
pub fn check(
    prepared: &Prepared,
    dtype: DType,
    form: Form,
    fwd: &FwdFn,
    bwd: &BwdFn,
) -> Outcome<Vec<Check>> {
    let (inputs, want, want_g) = (&prepared.inputs, &prepared.want, &prepared.want_grads);
    let problem = inputs.problem();
    let spec = problem.validate()?;
    let (thr_o, thr) = thresholds(dtype);
    let got = fwd(&spec, &problem, form)?;
    let mut checks = vec![compare_tensors("o", &got.o, &want.o, thr_o)];
    check_opt(&mut checks, "ht", got.ht.as_ref(), want.ht.as_ref(), thr);
    let got = bwd(&spec, &problem, form, &inputs.d_o, inputs.d_ht.as_ref())?;
    checks.push(compare_tensors("dq", &got.dq, &want_g.dq, thr));
    checks.push(compare_tensors("dk", &got.dk, &want_g.dk, thr));
    checks.push(compare_tensors("dv", &got.dv, &want_g.dv, thr));
    check_opt(&mut checks, "dg", got.dg.as_ref(), want_g.dg.as_ref(), thr);
    check_opt(
        &mut checks,
        "dg_bwd",
        got.dg_bwd.as_ref(),
        want_g.dg_bwd.as_ref(),
        thr,
    );
    check_opt(
        &mut checks,
        "dh0",
        got.dh0.as_ref(),
        want_g.dh0.as_ref(),
        thr,
    );
    Ok(checks)
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
        let t = cu.last().map_or(0, |&t| t as usize);
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
        for (si, strength) in crate::reference::testing::GATE_STRENGTHS
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

/// Runs every `(case, dtype, form)` through `fwd` / `bwd` with inputs drawn from seed
/// `seed_base + index`, one [`Run`] each (printed as it ends with `print`); the references are
/// prepared ahead on worker threads.
pub fn run_cases(
    suite: &'static str,
    runs: &[(Case, DType, Form)],
    seed_base: u64,
    print: bool,
    fwd: &FwdFn,
    bwd: &BwdFn,
) -> Vec<Run> {
    super::run_pipelined(
        suite,
        runs,
        print,
        |(case, dtype, form)| case.label(*dtype, *form),
        |i, (case, dtype, _)| Prepared::new(case, *dtype, seed_base + i as u64),
        |(_, dtype, form), prepared| check(&prepared, *dtype, *form, fwd, bwd),
    )
}

/// The GPU groups of the engine suite (`tests/cuda_linear.rs` asserts each one; `linattn validate
/// --device cuda --full` tabulates them all).
#[cfg(feature = "cuda")]
pub mod gpu {
    use cudarc::driver::CudaSlice;
    use half::{bf16, f16};

    use super::{BwdFn, Case, FORMS, FwdFn, Inputs, full_matrix, ops, run_cases, varlen_cases};
    use crate::cuda::CudaContext;
    use crate::linear::Spec;
    use crate::linear::cuda::device::{
        self as dev, CudaLinearAttention, CudaTensor, DeviceBackward, DeviceForward, TypedSlice,
    };
    use crate::linear::{self, Direction, Form, Gate, GateKind, Grads, LinearAttention, Output};
    use crate::reference::testing::{Rng, logsigmoid_gates};
    use crate::reference::{self as reference, rel_rms};
    use crate::suites::{Failure, Run, ensure, ensure_eq};
    use crate::{Backend, DType, Error, Result, Tensor, TensorData, ValueCheck};

    const SUITE: &str = "engine";

    /// Every case of the matrix, every form, every input dtype, through `linear::forward` /
    /// `linear::backward` on `Backend::Cuda`.
    pub fn host_api_matrix(ctx: &CudaContext, print: bool) -> Vec<Run> {
        let backend = Backend::Cuda(ctx.clone());
        let mut runs = Vec::new();
        for case in full_matrix() {
            for form in FORMS {
                for dtype in [DType::BF16, DType::F16, DType::F32] {
                    runs.push((case.clone(), dtype, form));
                }
            }
        }
        run_cases(
            "engine-host-api",
            &runs,
            7000,
            print,
            &|_, p, f| linear::forward(&backend, p, f),
            &|_, p, f, d, dh| linear::backward(&backend, p, f, d, dh),
        )
    }

    /// Every op, padded head dims and variable length through the device-slice API, outputs
    /// poisoned with NaN before every launch (every element must be written).
    pub fn device_api_poisoned_outputs(ctx: &CudaContext, print: bool) -> Vec<Run> {
        let mut runs = Vec::new();
        for shape in [super::SHAPES[1], super::SHAPES[3]] {
            for case in ops(shape, 1.0) {
                for form in FORMS {
                    runs.push((case.clone(), DType::BF16, form));
                }
            }
        }
        for case in varlen_cases() {
            for form in FORMS {
                runs.push((case.clone(), DType::F16, form));
            }
        }
        let fwd: &FwdFn = &|s, p, f| device_forward(ctx, s, p, f);
        let bwd: &BwdFn = &|s, p, f, d, dh| device_backward(ctx, s, p, f, d, dh);
        run_cases("engine-device-api", &runs, 7000, print, fwd, bwd)
    }

    /// Every GPU group of the engine suite, in order.
    pub fn all(ctx: &CudaContext, print: bool) -> Vec<Run> {
        let mut runs = host_api_matrix(ctx, print);
        runs.extend(device_api_poisoned_outputs(ctx, print));
        let singles = [
            decode_step_chain(ctx),
            rejects_a_final_state_request_without_one(ctx),
            public_decode_step_matches_the_cpu(ctx),
            device_api_checks_values_by_default(ctx),
            device_decode_step_keeps_the_state_on_the_gpu(ctx),
        ];
        for run in singles.into_iter().chain(lightnet_on_the_cuda_engine(ctx)) {
            if print {
                println!("{}", run.line());
            }
            runs.push(run);
        }
        runs
    }

    // --------------------------------------------------------------------------------------------
    // The device-slice API with poisoned outputs.
    // --------------------------------------------------------------------------------------------

    /// Device copies of a host problem's tensors (inputs in their dtype, gates / h0 as f32).
    pub struct DeviceInputs {
        q: Typed,
        k: Typed,
        v: Typed,
        g: Option<CudaSlice<f32>>,
        g_bwd: Option<CudaSlice<f32>>,
        h0: Option<CudaSlice<f32>>,
    }

    enum Typed {
        BF16(CudaSlice<bf16>),
        F16(CudaSlice<f16>),
        F32(CudaSlice<f32>),
    }

    fn runtime(e: cudarc::driver::DriverError) -> Error {
        Error::Runtime {
            backend: "cuda".into(),
            message: e.to_string(),
        }
    }

    impl Typed {
        fn upload(ctx: &CudaContext, t: &Tensor) -> Result<Typed> {
            let s = ctx.stream();
            Ok(match t.data() {
                TensorData::BF16(d) => Typed::BF16(s.clone_htod(d).map_err(runtime)?),
                TensorData::F16(d) => Typed::F16(s.clone_htod(d).map_err(runtime)?),
                TensorData::F32(d) => Typed::F32(s.clone_htod(d).map_err(runtime)?),
                TensorData::F64(d) => {
                    let narrowed: Vec<f32> = d.iter().map(|&x| x as f32).collect();
                    Typed::F32(s.clone_htod(&narrowed).map_err(runtime)?)
                }
            })
        }

        fn view(&self) -> TypedSlice<'_> {
            match self {
                Typed::BF16(s) => TypedSlice::from(s),
                Typed::F16(s) => TypedSlice::from(s),
                Typed::F32(s) => TypedSlice::from(s),
            }
        }

        fn tensor(&self, shape: &[usize]) -> Result<CudaTensor<'_>> {
            CudaTensor::new(self.view(), shape.to_vec())
        }
    }

    fn f32_slice(ctx: &CudaContext, t: &Tensor) -> Result<CudaSlice<f32>> {
        ctx.stream().clone_htod(&t.to_f32_vec()).map_err(runtime)
    }

    /// An output buffer filled with NaN, so that any element a kernel fails to write shows up.
    fn poisoned(ctx: &CudaContext, n: usize) -> Result<CudaSlice<f32>> {
        ctx.stream().clone_htod(&vec![f32::NAN; n]).map_err(runtime)
    }

    fn download(ctx: &CudaContext, s: &CudaSlice<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_f32(shape.to_vec(), ctx.stream().clone_dtoh(s).map_err(runtime)?)
    }

    impl DeviceInputs {
        pub fn new(ctx: &CudaContext, p: &LinearAttention) -> Result<DeviceInputs> {
            let opt = |t: Option<&Tensor>| t.map(|t| f32_slice(ctx, t)).transpose();
            Ok(DeviceInputs {
                q: Typed::upload(ctx, p.q)?,
                k: Typed::upload(ctx, p.k)?,
                v: Typed::upload(ctx, p.v)?,
                g: opt(p.gate.tensor())?,
                g_bwd: opt(p.gate_bwd.as_ref().and_then(Gate::tensor))?,
                h0: opt(p.h0)?,
            })
        }

        /// The uploaded inputs as CUDA tensors in the host problem's shapes.
        pub fn views<'a>(&'a self, p: &LinearAttention) -> Result<DeviceViews<'a>> {
            let f32_tensor = |s: &'a Option<CudaSlice<f32>>, t: Option<&Tensor>| {
                s.as_ref()
                    .zip(t)
                    .map(|(s, t)| CudaTensor::new(s, t.shape().to_vec()))
                    .transpose()
            };
            Ok(DeviceViews {
                q: self.q.tensor(p.q.shape())?,
                k: self.k.tensor(p.k.shape())?,
                v: self.v.tensor(p.v.shape())?,
                g: f32_tensor(&self.g, p.gate.tensor())?,
                g_bwd: f32_tensor(&self.g_bwd, p.gate_bwd.as_ref().and_then(Gate::tensor))?,
                h0: f32_tensor(&self.h0, p.h0)?,
            })
        }
    }

    /// A host problem's inputs on the device, as [`CudaTensor`]s.
    pub struct DeviceViews<'a> {
        q: CudaTensor<'a>,
        k: CudaTensor<'a>,
        v: CudaTensor<'a>,
        g: Option<CudaTensor<'a>>,
        g_bwd: Option<CudaTensor<'a>>,
        h0: Option<CudaTensor<'a>>,
    }

    impl<'a> DeviceViews<'a> {
        /// The host problem `p` over these device tensors: the same builder, the same options.
        pub fn problem<'b>(&'b self, p: &'b LinearAttention) -> CudaLinearAttention<'b, 'a> {
            let gate = |g: &Gate, t: Option<&'b CudaTensor<'a>>| match (g, t) {
                (Gate::PerHead(_), Some(t)) => Gate::PerHead(t),
                (Gate::Scalar(_), Some(t)) => Gate::Scalar(t),
                (Gate::Vector(_), Some(t)) => Gate::Vector(t),
                _ => Gate::None,
            };
            LinearAttention {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                gate: gate(&p.gate, self.g.as_ref()),
                gate_bwd: p.gate_bwd.map(|gb| gate(&gb, self.g_bwd.as_ref())),
                direction: p.direction,
                scale: p.scale,
                normalize: p.normalize,
                h0: self.h0.as_ref(),
                cu_seqlens: p.cu_seqlens,
                value_check: ValueCheck::On,
            }
        }
    }

    fn device_forward(
        ctx: &CudaContext,
        spec: &Spec,
        p: &LinearAttention,
        form: Form,
    ) -> Result<Output> {
        let inputs = DeviceInputs::new(ctx, p)?;
        let views = inputs.views(p)?;
        let problem = views.problem(p);
        let mut o = poisoned(ctx, spec.dims.v_len())?;
        let state_len: usize = spec.state_shape().iter().product();
        let mut ht = if spec.has_final_state() {
            Some(poisoned(ctx, state_len)?)
        } else {
            None
        };
        dev::forward(
            ctx,
            ctx.stream(),
            &problem,
            form,
            DeviceForward {
                o: o.as_view_mut(),
                ht: ht.as_mut().map(|s| s.as_view_mut()),
            },
        )?;
        Ok(Output {
            o: download(ctx, &o, &spec.o_shape())?,
            ht: ht
                .map(|s| download(ctx, &s, &spec.state_shape()))
                .transpose()?,
        })
    }

    fn device_backward(
        ctx: &CudaContext,
        spec: &Spec,
        p: &LinearAttention,
        form: Form,
        d_o: &Tensor,
        d_ht: Option<&Tensor>,
    ) -> Result<Grads> {
        let inputs = DeviceInputs::new(ctx, p)?;
        let views = inputs.views(p)?;
        let problem = views.problem(p);
        let d_o_dev = Typed::upload(ctx, d_o)?;
        let d_o_view = d_o_dev.tensor(d_o.shape())?;
        let d_ht_dev = d_ht.map(|t| f32_slice(ctx, t)).transpose()?;
        let d_ht_view = d_ht_dev
            .as_ref()
            .zip(d_ht)
            .map(|(s, t)| CudaTensor::new(s, t.shape().to_vec()))
            .transpose()?;
        let like = |t: Option<&Tensor>| t.map(|t| poisoned(ctx, t.numel())).transpose();
        let mut dq = poisoned(ctx, spec.dims.qk_len())?;
        let mut dk = poisoned(ctx, spec.dims.qk_len())?;
        let mut dv = poisoned(ctx, spec.dims.v_len())?;
        let gate_bwd = p.gate_bwd.as_ref().and_then(Gate::tensor);
        let mut dg = like(p.gate.tensor())?;
        let mut dg_bwd = like(gate_bwd)?;
        let mut dh0 = like(p.h0)?;
        dev::backward(
            ctx,
            ctx.stream(),
            &problem,
            form,
            &d_o_view,
            d_ht_view.as_ref(),
            DeviceBackward {
                dq: dq.as_view_mut(),
                dk: dk.as_view_mut(),
                dv: dv.as_view_mut(),
                dg: dg.as_mut().map(|s| s.as_view_mut()),
                dg_bwd: dg_bwd.as_mut().map(|s| s.as_view_mut()),
                dh0: dh0.as_mut().map(|s| s.as_view_mut()),
            },
        )?;
        let back = |s: Option<CudaSlice<f32>>, t: Option<&Tensor>| -> Result<Option<Tensor>> {
            s.zip(t)
                .map(|(s, t)| download(ctx, &s, t.shape()))
                .transpose()
        };
        Ok(Grads {
            dq: download(ctx, &dq, p.q.shape())?,
            dk: download(ctx, &dk, p.k.shape())?,
            dv: download(ctx, &dv, p.v.shape())?,
            dg: back(dg, p.gate.tensor())?,
            dg_bwd: back(dg_bwd, gate_bwd)?,
            dh0: back(dh0, p.h0)?,
        })
    }

    // --------------------------------------------------------------------------------------------
    // Decoding, LightNet on the engine, value checks, typed errors.
    // --------------------------------------------------------------------------------------------

    fn f64_tensor(shape: Vec<usize>, data: Vec<f64>, dtype: DType) -> Result<Tensor> {
        Ok(Tensor::from_f64(shape, data)?.to_dtype(dtype))
    }

    /// The decoding step (`linear::cuda::decode_step`), chained over 20 tokens, against the
    /// reference's decode step: outputs and state, one run per gate kind and input dtype.
    pub fn decode_step_chain(ctx: &CudaContext) -> Run {
        Run::scalar(SUITE, "decode step chain, 20 tokens", 1e-5, || {
            let (b, h, k, v, steps) = (2, 3, 64, 48, 20);
            let dims = reference::linear::Dims { b, t: 1, h, k, v };
            let mut worst: f64 = 0.0;
            for (kind, dtype) in [
                (GateKind::Vector, DType::BF16),
                (GateKind::Scalar, DType::F32),
                (GateKind::PerHead, DType::F16),
            ] {
                let mut rng = Rng::new(99);
                let mut state = f64_tensor(vec![b, h, k, v], rng.randn(b * h * k * v), DType::F32)?;
                let mut ref_state = state.to_f64_vec();
                for _ in 0..steps {
                    let q = f64_tensor(vec![b, 1, h, k], rng.randn(b * h * k), dtype)?;
                    let kk = f64_tensor(vec![b, 1, h, k], rng.randn(b * h * k), dtype)?;
                    let vv = f64_tensor(vec![b, 1, h, v], rng.randn(b * h * v), dtype)?;
                    let gshape = match kind {
                        GateKind::PerHead => vec![h],
                        GateKind::Scalar => vec![b, 1, h],
                        _ => vec![b, 1, h, k],
                    };
                    let n: usize = gshape.iter().product();
                    let g = f64_tensor(gshape, logsigmoid_gates(&mut rng, n, 1.0), DType::F32)?;
                    let gate = match kind {
                        GateKind::PerHead => Gate::PerHead(&g),
                        GateKind::Scalar => Gate::Scalar(&g),
                        _ => Gate::Vector(&g),
                    };
                    let o = crate::linear::cuda::decode_step(
                        ctx, &mut state, &q, &kk, &vv, gate, None,
                    )?;
                    let g64 = g.to_f64_vec();
                    let ref_gate = reference::linear::Gate::from_kind(kind, &g64);
                    let o_ref = reference::linear::decode_step(
                        &dims,
                        &mut ref_state,
                        &q.to_f64_vec(),
                        &kk.to_f64_vec(),
                        &vv.to_f64_vec(),
                        ref_gate,
                        (k as f64).powf(-0.5),
                    );
                    worst = worst.max(rel_rms(&o.to_f64_vec(), &o_ref));
                    worst = worst.max(rel_rms(&state.to_f64_vec(), &ref_state));
                }
            }
            Ok(worst)
        })
    }

    /// Bidirectional problems keep no state: asking the device API for one is an error, not a
    /// silently unwritten buffer.
    pub fn rejects_a_final_state_request_without_one(ctx: &CudaContext) -> Run {
        Run::exact(SUITE, "device API: no final state without one", || {
            let case = Case::bidirectional("lion", (1, 20, 1, 16, 16), GateKind::Scalar);
            let inputs = Inputs::draw(&case, DType::BF16, 1)?;
            let p = inputs.problem();
            let spec = p.validate()?;
            ensure_eq!(spec.direction, Direction::Bidirectional);
            let dev_inputs = DeviceInputs::new(ctx, &p)?;
            let views = dev_inputs.views(&p)?;
            let problem = views.problem(&p);
            let mut o = poisoned(ctx, spec.dims.v_len())?;
            let mut ht = poisoned(ctx, spec.dims.state_len())?;
            let r = dev::forward(
                ctx,
                ctx.stream(),
                &problem,
                Form::Chunkwise { chunk: 64 },
                DeviceForward {
                    o: o.as_view_mut(),
                    ht: Some(ht.as_view_mut()),
                },
            );
            ensure!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "expected InvalidArgument, got {:?}",
                r.err()
            );
            Ok(())
        })
    }

    /// LightNet on the cuda backend (the gate transform on the host, the engine on the GPU)
    /// against the CPU backend: causal, causal with varlen and an initial state, non-causal; f32
    /// inputs, so the f32 limit (1e-5) on `o` and every gradient.
    pub fn lightnet_on_the_cuda_engine(ctx: &CudaContext) -> Vec<Run> {
        use crate::lightnet::{self, LightNet};
        let backend = Backend::Cuda(ctx.clone());
        let (t, h, k, v) = (200, 2, 64, 64);
        let mut rng = Rng::new(17);
        let mut tensor = |shape: Vec<usize>, scale: f64| -> Result<Tensor> {
            let n = shape.iter().product();
            let data = rng.randn(n).into_iter().map(|x| x * scale).collect();
            f64_tensor(shape, data, DType::F32)
        };
        let drawn = (|| -> Result<_> {
            Ok((
                tensor(vec![1, t, h, k], 1.0)?,
                tensor(vec![1, t, h, k], 2.0)?,
                tensor(vec![1, t, h, v], 1.0)?,
                tensor(vec![1, t, h, v], 1.0)?,
                tensor(vec![3, h, k, v], 1.0)?,
                tensor(vec![3, h, k], 1.0)?,
            ))
        })();
        let (q, kl, vv, d_o, s0, z0) = match drawn {
            Ok(x) => x,
            Err(e) => return vec![Run::time(SUITE, "lightnet inputs".into(), || Err(e.into()))],
        };
        let cu: Vec<i64> = vec![0, 1, 100, 200];
        let cases = [
            ("causal", LightNet::causal(&q, &kl, &vv)),
            (
                "causal varlen h0",
                LightNet::causal(&q, &kl, &vv)
                    .with_cu_seqlens(&cu)
                    .with_initial_state(&s0, &z0),
            ),
            ("non-causal", LightNet::non_causal(&q, &kl, &vv)),
        ];
        let mut runs = Vec::new();
        for (name, args) in &cases {
            for form in [Form::Chunkwise { chunk: 64 }, Form::Recurrent] {
                runs.push(Run::time(
                    "lightnet",
                    format!("lightnet {name} {form:?} f32"),
                    || {
                        let got = lightnet::forward(&backend, args, form)?;
                        let want = lightnet::forward(&Backend::Cpu, args, form)?;
                        let gg = lightnet::backward(&backend, args, form, &d_o)?;
                        let gw = lightnet::backward(&Backend::Cpu, args, form, &d_o)?;
                        Ok(vec![
                            super::compare_tensors("o", &got.o, &want.o, 1e-5),
                            super::compare_tensors("dq", &gg.dq, &gw.dq, 1e-5),
                            super::compare_tensors("dk", &gg.dk, &gw.dk, 1e-5),
                            super::compare_tensors("dv", &gg.dv, &gw.dv, 1e-5),
                        ])
                    },
                ));
            }
        }
        runs
    }

    /// The public `linear::decode_step` on the cuda backend equals the CPU one over 8 steps.
    pub fn public_decode_step_matches_the_cpu(ctx: &CudaContext) -> Run {
        Run::scalar(SUITE, "public decode step vs cpu, 8 tokens", 1e-5, || {
            let backend = Backend::Cuda(ctx.clone());
            let (b, h, k, v) = (2, 3, 64, 32);
            let mut rng = Rng::new(23);
            let mut state_gpu = Tensor::from_f64(vec![b, h, k, v], rng.randn(b * h * k * v))?;
            let mut state_cpu = state_gpu.clone();
            let mut worst: f64 = 0.0;
            for _ in 0..8 {
                let mut draw = |shape: Vec<usize>| {
                    let n = shape.iter().product();
                    f64_tensor(shape, rng.randn(n), DType::F32)
                };
                let (q, kk, vv) = (
                    draw(vec![b, 1, h, k])?,
                    draw(vec![b, 1, h, k])?,
                    draw(vec![b, 1, h, v])?,
                );
                let g = f64_tensor(
                    vec![b, 1, h, k],
                    logsigmoid_gates(&mut rng, b * h * k, 1.0),
                    DType::F32,
                )?;
                let gate = Gate::Vector(&g);
                let gpu = linear::decode_step(&backend, &state_gpu, &q, &kk, &vv, gate, None)?;
                let cpu = linear::decode_step(&Backend::Cpu, &state_cpu, &q, &kk, &vv, gate, None)?;
                worst = worst.max(rel_rms(&gpu.o.to_f64_vec(), &cpu.o.to_f64_vec()));
                state_gpu = gpu.state;
                state_cpu = cpu.state;
            }
            Ok(worst)
        })
    }

    /// The device-resident API checks values on the device by default: a positive gate (30.0)
    /// is `InvalidGate` naming the element, not an `Ok` full of NaN; with the check off the
    /// kernels run.
    pub fn device_api_checks_values_by_default(ctx: &CudaContext) -> Run {
        Run::exact(SUITE, "device API: value check on by default", || {
            let case = Case::causal("gla", (1, 40, 2, 16, 16), GateKind::Scalar);
            let inputs = Inputs::draw(&case, DType::F32, 3)?;
            let p = inputs.problem();
            let spec = p.validate()?;
            let dev_inputs = DeviceInputs::new(ctx, &p)?;
            let gate = p.gate.tensor().ok_or_else(|| Failure("no gate".into()))?;
            let mut gates = gate.to_f32_vec();
            for g in &mut gates[33..] {
                *g = 30.0;
            }
            let bad_gate = ctx.stream().clone_htod(&gates)?;
            let bad_gate = CudaTensor::new(&bad_gate, gate.shape().to_vec())?;
            let views = dev_inputs.views(&p)?;
            let mut problem = views.problem(&p);
            problem.gate = Gate::Scalar(&bad_gate);
            let mut o = poisoned(ctx, spec.dims.v_len())?;
            let mut ht = poisoned(ctx, spec.dims.state_len())?;
            let mut run = |problem: &CudaLinearAttention| {
                dev::forward(
                    ctx,
                    ctx.stream(),
                    problem,
                    Form::Chunkwise { chunk: 64 },
                    DeviceForward {
                        o: o.as_view_mut(),
                        ht: Some(ht.as_view_mut()),
                    },
                )
            };
            match run(&problem) {
                Err(Error::InvalidGate {
                    tensor,
                    index,
                    value,
                }) => ensure_eq!((tensor.as_str(), index, value), ("g", 33, 30.0)),
                other => {
                    return Err(Failure(format!(
                        "expected InvalidGate, got {:?}",
                        other.err()
                    )));
                }
            }
            problem.value_check = ValueCheck::Off;
            run(&problem)?;
            Ok(())
        })
    }

    /// The device-resident decoding step: the state stays on the GPU across 8 tokens and the
    /// outputs and final state match the CPU's host decoding step.
    pub fn device_decode_step_keeps_the_state_on_the_gpu(ctx: &CudaContext) -> Run {
        Run::scalar(SUITE, "device decode step, state on the GPU", 1e-5, || {
            let (b, h, k, v) = (2, 3, 64, 32);
            let mut rng = Rng::new(29);
            let s = ctx.stream();
            let mut state_cpu = f64_tensor(vec![b, h, k, v], rng.randn(b * h * k * v), DType::F32)?;
            let mut state = s.clone_htod(&state_cpu.to_f32_vec())?;
            let mut worst: f64 = 0.0;
            let to64 = |x: Vec<f32>| -> Vec<f64> { x.into_iter().map(f64::from).collect() };
            for _ in 0..8 {
                let mut draw =
                    |n: usize| -> Vec<f32> { rng.randn(n).iter().map(|&x| x as f32).collect() };
                let (q, kk, vv) = (draw(b * h * k), draw(b * h * k), draw(b * h * v));
                let g: Vec<f32> = logsigmoid_gates(&mut rng, b * h, 1.0)
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                let t = |shape: Vec<usize>, d: &[f32]| Tensor::from_f32(shape, d.to_vec());
                let cpu = linear::decode_step(
                    &Backend::Cpu,
                    &state_cpu,
                    &t(vec![b, 1, h, k], &q)?,
                    &t(vec![b, 1, h, k], &kk)?,
                    &t(vec![b, 1, h, v], &vv)?,
                    Gate::Scalar(&t(vec![b, 1, h], &g)?),
                    None,
                )?;
                let (qd, kd, vd, gd) = (
                    s.clone_htod(&q)?,
                    s.clone_htod(&kk)?,
                    s.clone_htod(&vv)?,
                    s.clone_htod(&g)?,
                );
                let (qt, kt, vt, gt) = (
                    CudaTensor::new(&qd, vec![b, 1, h, k])?,
                    CudaTensor::new(&kd, vec![b, 1, h, k])?,
                    CudaTensor::new(&vd, vec![b, 1, h, v])?,
                    CudaTensor::new(&gd, vec![b, 1, h])?,
                );
                let token = LinearAttention::causal(&qt, &kt, &vt).with_gate(Gate::Scalar(&gt));
                let mut o = s.alloc_zeros::<f32>(b * h * v)?;
                dev::decode_step(ctx, s, &token, &mut state, o.as_view_mut())?;
                worst = worst.max(rel_rms(&to64(s.clone_dtoh(&o)?), &cpu.o.to_f64_vec()));
                state_cpu = cpu.state;
            }
            let state_host = to64(s.clone_dtoh(&state)?);
            Ok(worst.max(rel_rms(&state_host, &state_cpu.to_f64_vec())))
        })
    }
}
