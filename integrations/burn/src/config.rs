//! What an op needs besides its tensors: the validated problem and the form, carried through
//! burn's dispatch and fusion streams as an ordinary (cloned) argument.

use burn::backend::fusion::custom::TensorSpec;
use burn::tensor::{DType, Shape};
use linattn::linear::{Form, Spec};

/// One engine call: the problem [`linattn::linear::LinearAttention::validate_layout`] accepted,
/// the form to compute it in, and whether the output packs the final state.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearConfig {
    pub spec: Spec,
    pub form: Form,
    /// The output is `o` and `ht` flattened one after the other (`[B*T*H*V + N*H*K*V]`) instead
    /// of `o` alone (`[B, T, H, V]`).
    pub final_state: bool,
}

impl LinearConfig {
    /// `cu_seqlens` as the device API takes them.
    pub fn cu_seqlens(&self) -> Option<Vec<i64>> {
        self.spec
            .cu_seqlens
            .as_ref()
            .map(|cu| cu.iter().map(|&x| x as i64).collect())
    }

    /// Elements of `o`.
    pub fn o_len(&self) -> usize {
        self.spec.o_shape().iter().product()
    }

    /// Elements of `ht`.
    pub fn state_len(&self) -> usize {
        self.spec.state_shape().iter().product()
    }

    /// Shape of the forward op's output.
    pub fn output_shape(&self) -> Vec<usize> {
        if self.final_state {
            vec![self.o_len() + self.state_len()]
        } else {
            self.spec.o_shape()
        }
    }
}

pub(crate) fn linear_forward_spec(dtype: DType, config: &LinearConfig) -> TensorSpec {
    TensorSpec::new(Shape::from(config.output_shape()), dtype)
}

/// Each gradient has its input's shape and dtype (placeholders included).
pub(crate) fn linear_backward_specs(inputs: [&TensorSpec; 6]) -> [TensorSpec; 6] {
    inputs.map(|s| TensorSpec::new(s.shape.clone(), s.dtype))
}

/// One LightNet call: the validated problem, the engine's form, and whether the final state
/// `(S, z)` is returned (packed flat, `[N*H*K*V + N*H*K]`, as the op's second output).
#[derive(Clone, Debug, PartialEq)]
pub struct LightNetConfig {
    pub spec: linattn::lightnet::LightNetSpec,
    pub form: Form,
    pub final_state: bool,
}

impl LightNetConfig {
    pub fn cu_seqlens(&self) -> Option<Vec<i64>> {
        self.spec
            .cu_seqlens
            .as_ref()
            .map(|cu| cu.iter().map(|&x| x as i64).collect())
    }

    pub fn s_len(&self) -> usize {
        self.spec.s_shape().iter().product()
    }

    pub fn z_len(&self) -> usize {
        self.spec.z_shape().iter().product()
    }

    /// Shape of the op's second output: the packed state, or a one-element placeholder.
    pub fn state_output_shape(&self) -> Vec<usize> {
        if self.final_state {
            vec![self.s_len() + self.z_len()]
        } else {
            vec![1]
        }
    }
}

/// One decoding step: the token's sizes, the gate kind and the scale.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeConfig {
    /// `[B, 1, H, V]`.
    pub o_shape: Vec<usize>,
    pub gate: linattn::linear::GateKind,
    pub scale: f64,
}

/// One block-sparse attention call: the validated problem and its block mask (`None`: dense).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    pub spec: linattn::attention::AttnSpec,
    pub mask: Option<std::sync::Arc<linattn::attention::BlockMask>>,
}
