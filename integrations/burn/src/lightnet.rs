//! LightNet's additive recurrence over burn tensors (ops.md section 2): causal, with its state
//! `(S, z)` in and out, and the non-causal form. The gate transform and the engine both run in
//! linattn's kernels (on the device for wgpu); gradients flow to `q`, `k` (the logits) and `v`.

use burn::backend::Dispatch;
use burn::tensor::Tensor;
use linattn::lightnet::LightNet as Problem;
use linattn::{Error, Result};

use crate::backend::LinattnBackend;
use crate::config::LightNetConfig;
use crate::linear::{DEFAULT_FORM, check_values, meta, same_device};
use linattn::linear::Form;

/// One LightNet problem over burn tensors; `k` holds the key logits.
#[derive(Clone, Debug)]
pub struct LightNet {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: Option<f64>,
    non_causal: bool,
    initial_state: Option<(Tensor<4>, Tensor<3>)>,
    cu_seqlens: Option<Vec<i64>>,
    form: Form,
    final_state: bool,
    check_values: bool,
}

/// What [`LightNet::forward`] returns.
#[derive(Clone, Debug)]
pub struct LightNetOutput {
    /// `[B, T, H, V]`, differentiable.
    pub o: Tensor<4>,
    /// Causal, when asked for: `(S [N, H, K, V], z [N, H, K])`, to continue from. Not
    /// differentiable (the kernels give no gradient of the state).
    pub state: Option<(Tensor<4>, Tensor<3>)>,
}

impl LightNet {
    /// The causal additive recurrence.
    pub fn causal(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Self {
        LightNet {
            q,
            k,
            v,
            scale: None,
            non_causal: false,
            initial_state: None,
            cu_seqlens: None,
            form: DEFAULT_FORM,
            final_state: false,
            check_values: true,
        }
    }

    /// The non-causal form (softmax of the key logits over the sequence).
    pub fn non_causal(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Self {
        LightNet {
            non_causal: true,
            ..Self::causal(q, k, v)
        }
    }

    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Causal only: continue from `(S [N, H, K, V], z [N, H, K])` (a previous call's state).
    pub fn with_initial_state(mut self, s: Tensor<4>, z: Tensor<3>) -> Self {
        self.initial_state = Some((s, z));
        self
    }

    pub fn with_cu_seqlens(mut self, cu_seqlens: Vec<i64>) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }

    /// The engine's form (default chunkwise, chunks of 64).
    pub fn with_form(mut self, form: Form) -> Self {
        self.form = form;
        self
    }

    /// Also return the final state (causal only).
    pub fn with_final_state(mut self) -> Self {
        self.final_state = true;
        self
    }

    /// See [`crate::LinearAttention::without_value_check`].
    pub fn without_value_check(mut self) -> Self {
        self.check_values = false;
        self
    }

    pub fn forward(self) -> Result<LightNetOutput> {
        same_device(&[
            ("q", Some(self.q.device())),
            ("k", Some(self.k.device())),
            ("v", Some(self.v.device())),
            ("s0", self.initial_state.as_ref().map(|s| s.0.device())),
            ("z0", self.initial_state.as_ref().map(|s| s.1.device())),
        ])?;
        let (q, k, v) = (
            meta("q", &self.q)?,
            meta("k", &self.k)?,
            meta("v", &self.v)?,
        );
        let state = match &self.initial_state {
            Some((s, z)) => Some((meta("s0", s)?, meta("z0", z)?)),
            None => None,
        };
        let mut p = if self.non_causal {
            Problem::non_causal(&q, &k, &v)
        } else {
            Problem::causal(&q, &k, &v)
        };
        p.scale = self.scale;
        if let Some((s, z)) = &state {
            p = p.with_initial_state(s, z);
        }
        p.cu_seqlens = self.cu_seqlens.as_deref();
        let spec = p.validate_layout()?;
        crate::linear::check_dtype_and_form(spec.dtype, self.form)?;
        crate::linear::check_device_dtype("q", &self.q)?;
        if self.final_state && self.non_causal {
            return Err(Error::InvalidArgument(
                "the non-causal form has no final state".into(),
            ));
        }
        if self.check_values {
            check_values("q", self.q.clone().flatten(0, 3), false)?;
            check_values("k", self.k.clone().flatten(0, 3), false)?;
            check_values("v", self.v.clone().flatten(0, 3), false)?;
            if let Some((s, z)) = &self.initial_state {
                check_values("s0", s.clone().flatten(0, 3), false)?;
                // `-inf` is the log-normaliser of an empty prefix; NaN and `+inf` are errors.
                let z: Tensor<1> = z.clone().flatten(0, 2);
                let bad = z
                    .clone()
                    .is_nan()
                    .bool_or(z.clone().equal_elem(f64::INFINITY));
                if bad.any().into_scalar::<bool>() {
                    return Err(Error::InvalidArgument(
                        "`z0` holds NaN or +inf (only -inf, an empty prefix, is allowed)".into(),
                    ));
                }
            }
        }
        let config = LightNetConfig {
            spec,
            form: self.form,
            final_state: self.final_state,
        };
        let device = self.q.device();
        let dtype = self.q.dtype();
        let placeholder = || Tensor::<1>::zeros([1], &device).cast(dtype).into_dispatch();
        let (s0, z0) = match &self.initial_state {
            Some((s, z)) => (s.clone().into_dispatch(), z.clone().into_dispatch()),
            None => (placeholder(), placeholder()),
        };
        let (o, state) = Dispatch::linattn_lightnet_forward(
            self.q.into_dispatch(),
            self.k.into_dispatch(),
            self.v.into_dispatch(),
            s0,
            z0,
            config.clone(),
        );
        let state = config.final_state.then(|| {
            let packed: Tensor<1> = Tensor::from_dispatch(state);
            let (n_s, n_z) = (config.s_len(), config.z_len());
            let s_shape: [usize; 4] = config.spec.s_shape().try_into().expect("rank 4");
            let z_shape: [usize; 3] = config.spec.z_shape().try_into().expect("rank 3");
            (
                packed.clone().slice(0..n_s).reshape(s_shape),
                packed.slice(n_s..n_s + n_z).reshape(z_shape),
            )
        });
        Ok(LightNetOutput {
            o: Tensor::from_dispatch(o),
            state,
        })
    }
}
