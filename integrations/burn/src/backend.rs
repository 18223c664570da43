//! The backend extension: linattn's ops as burn backend operations.
//!
//! [`LinattnBackend`] is a burn backend extension (`#[backend_extension]`), so burn's runtime
//! dispatch routes each call to the backend the tensors live on:
//!
//! - `CubeBackend` (wgpu, and CubeCL's CUDA runtime): linattn's CubeCL kernels on the tensors'
//!   own client and buffers ([`cube`](self) impl below). Nothing is copied to the host.
//! - `Fusion<CubeBackend>` (burn's default `Wgpu` device): the macro registers the op in the
//!   fusion stream with its output shapes (the `meta` functions), and runs the `CubeBackend`
//!   implementation when the stream executes.
//! - NdArray (CPU): the trait's default bodies, which read the tensors, run linattn's f64 CPU
//!   reference and write the results back.
//! - `Autodiff<B>`: records the forward op with a backward step that calls the backend's
//!   backward op (linattn's analytic backward kernels), never burn's autodiff of a
//!   re-implementation.
//!
//! Every op has a single tensor output or a tuple of them and fixed tensor inputs: an absent
//! optional input (no gate, no `h0`) is a one-element placeholder the op config marks absent.
//! Outputs that burn code needs separately (`o` and `ht`) are returned packed in one flat
//! tensor and sliced apart by the public functions, so autodiff sees one node.

// burn 0.22 deprecates NdArray in favour of Flex; the CPU path is NdArray's (both run the same
// default host bodies), and the macro's generated routing names the type.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, backend_extension};
use burn::tensor::{Shape, Slice};

use crate::config::{
    AttentionConfig, DecodeConfig, LightNetConfig, LinearConfig, linear_backward_specs,
    linear_forward_spec,
};
use crate::host;
use crate::optim::OptimHandle;

/// linattn's ops on a burn backend. Users call the functions of [`crate::linear`] (and the other
/// op modules), not these.
#[backend_extension(Cube, NdArray, Autodiff, Fusion)]
pub trait LinattnBackend: Backend {
    /// The engine's forward pass: `o` (`[B, T, H, V]`), or `o` and `ht` packed flat when
    /// [`LinearConfig::final_state`] asks for the final state.
    #[fusion(meta = linear_forward_meta)]
    fn linattn_linear_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        g_bwd: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        config: LinearConfig,
    ) -> FloatTensor<Self> {
        host::linear_forward::<Self>(q, k, v, g, g_bwd, h0, &config)
    }

    /// The engine's backward pass for the cotangents of `o` and (with
    /// [`LinearConfig::final_state`]; otherwise any tensor, unread) of `ht`:
    /// `(dq, dk, dv, dg, dg_bwd, dh0)`, placeholders for the absent inputs.
    #[allow(clippy::type_complexity)]
    #[fusion(meta = linear_backward_meta)]
    fn linattn_linear_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        g_bwd: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        d_ht: FloatTensor<Self>,
        config: LinearConfig,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        host::linear_backward::<Self>(q, k, v, g, g_bwd, h0, d_o, d_ht, &config)
    }

    /// LightNet's forward pass: `(o, state)`, `state` the packed final `(S, z)` with
    /// [`LightNetConfig::final_state`] (a one-element placeholder otherwise). Only `o` is
    /// differentiable: the backward kernels give `dq, dk, dv`, not the gradient of the state.
    #[fusion(meta = lightnet_forward_meta)]
    fn linattn_lightnet_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        config: LightNetConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        host::lightnet_forward::<Self>(q, k, v, s0, z0, &config)
    }

    /// LightNet's backward pass for the cotangent of `o`: `(dq, dk, dv)` (`dk` of the logits).
    #[fusion(meta = lightnet_backward_meta)]
    fn linattn_lightnet_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        config: LightNetConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        host::lightnet_backward::<Self>(q, k, v, s0, z0, d_o, &config)
    }

    /// One causal decoding step: `(o [B, 1, H, V], new state [B, H, K, V])`. Not differentiable
    /// (generation). `g` is a placeholder without a gate.
    #[fusion(meta = decode_meta)]
    fn linattn_decode_step(
        state: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        config: DecodeConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        host::decode_step::<Self>(state, q, k, v, g, &config)
    }

    /// Block-sparse softmax attention (dense without a mask): `(o [B, T, H, D] in the inputs'
    /// dtype, lse [B, H, T] f32)`. Only `o` is differentiable.
    #[fusion(meta = attention_forward_meta)]
    fn linattn_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: AttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        host::attention_forward::<Self>(q, k, v, &config)
    }

    /// Attention's backward pass from the forward outputs `o`, `lse` and the cotangent of `o`.
    #[fusion(meta = attention_backward_meta)]
    fn linattn_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        config: AttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        host::attention_backward::<Self>(q, k, v, o, lse, d_o, &config)
    }

    /// One fused optimizer call (see [`crate::optim`]): `grads` in the optimizer's arena layout
    /// (f32), the new master weights out in the same layout (f32). Not differentiable.
    #[fusion(meta = fused_step_meta)]
    fn linattn_fused_step(grads: FloatTensor<Self>, state: OptimHandle) -> FloatTensor<Self> {
        host::fused_step::<Self>(grads, &state)
    }
}

fn linear_forward_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _g: &TensorSpec,
    _g_bwd: &TensorSpec,
    _h0: &TensorSpec,
    config: &LinearConfig,
) -> TensorSpec {
    linear_forward_spec(q.dtype, config)
}

#[allow(clippy::type_complexity)]
fn linear_backward_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    g: &TensorSpec,
    g_bwd: &TensorSpec,
    h0: &TensorSpec,
    _d_o: &TensorSpec,
    _d_ht: &TensorSpec,
    _config: &LinearConfig,
) -> (
    TensorSpec,
    TensorSpec,
    TensorSpec,
    TensorSpec,
    TensorSpec,
    TensorSpec,
) {
    let [a, b, c, d, e, f] = linear_backward_specs([q, k, v, g, g_bwd, h0]);
    (a, b, c, d, e, f)
}

fn lightnet_forward_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _s0: &TensorSpec,
    _z0: &TensorSpec,
    config: &LightNetConfig,
) -> (TensorSpec, TensorSpec) {
    (
        TensorSpec::new(Shape::from(config.spec.o_shape()), q.dtype),
        TensorSpec::new(Shape::from(config.state_output_shape()), q.dtype),
    )
}

fn lightnet_backward_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _s0: &TensorSpec,
    _z0: &TensorSpec,
    _d_o: &TensorSpec,
    _config: &LightNetConfig,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone())
}

fn decode_meta(
    state: &TensorSpec,
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    _g: &TensorSpec,
    config: &DecodeConfig,
) -> (TensorSpec, TensorSpec) {
    (
        TensorSpec::new(Shape::from(config.o_shape.clone()), q.dtype),
        TensorSpec::new(state.shape.clone(), state.dtype),
    )
}

fn attention_forward_meta(
    q: &TensorSpec,
    _k: &TensorSpec,
    _v: &TensorSpec,
    config: &AttentionConfig,
) -> (TensorSpec, TensorSpec) {
    (
        TensorSpec::new(Shape::from(config.spec.o_shape()), q.dtype),
        TensorSpec::new(
            Shape::from(config.spec.lse_shape()),
            burn::tensor::DType::F32,
        ),
    )
}

fn attention_backward_meta(
    q: &TensorSpec,
    k: &TensorSpec,
    v: &TensorSpec,
    _o: &TensorSpec,
    _lse: &TensorSpec,
    _d_o: &TensorSpec,
    _config: &AttentionConfig,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (q.clone(), k.clone(), v.clone())
}

fn fused_step_meta(grads: &TensorSpec, _state: &OptimHandle) -> TensorSpec {
    TensorSpec::new(grads.shape.clone(), burn::tensor::DType::F32)
}

impl LinattnBackend for burn::backend::NdArray {}

/// The cotangent of the forward op's output as `(d_o, d_ht)`: slices of the packed cotangent
/// with the final state, else `d_o` itself and a stand-in for `d_ht` the backward op never reads.
fn split_packed<B: Backend>(
    d_out: FloatTensor<B>,
    config: &LinearConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    if !config.final_state {
        return (d_out.clone(), d_out);
    }
    let (n_o, n_s) = (config.o_len(), config.state_len());
    let d_o = B::float_slice(d_out.clone(), &[Slice::from(0..n_o)]);
    let d_ht = B::float_slice(d_out, &[Slice::from(n_o..n_o + n_s)]);
    (
        B::float_reshape(d_o, Shape::from(config.spec.o_shape())),
        B::float_reshape(d_ht, Shape::from(config.spec.state_shape())),
    )
}

impl<B: LinattnBackend, C: CheckpointStrategy> LinattnBackend for Autodiff<B, C> {
    fn linattn_linear_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        g_bwd: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        config: LinearConfig,
    ) -> FloatTensor<Self> {
        /// The inputs (backend primitives) and the config: the backward op recomputes what it
        /// needs from them, as linattn's backward kernels do.
        #[derive(Debug)]
        struct LinearBackward;

        impl<B: LinattnBackend> Backward<B, 6> for LinearBackward {
            type State = ([FloatTensor<B>; 6], LinearConfig);

            fn backward(
                self,
                ops: Ops<Self::State, 6>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let d_out = grads.consume::<B>(&ops.node);
                let ([q, k, v, g, g_bwd, h0], config) = ops.state;
                let (d_o, d_ht) = split_packed::<B>(d_out, &config);
                let (dq, dk, dv, dg, dg_bwd, dh0) =
                    B::linattn_linear_backward(q, k, v, g, g_bwd, h0, d_o, d_ht, config);
                for (parent, grad) in ops.parents.iter().zip([dq, dk, dv, dg, dg_bwd, dh0]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [
            q.node(),
            k.node(),
            v.node(),
            g.node(),
            g_bwd.node(),
            h0.node(),
        ];
        let inputs = [
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            g.into_primitive(),
            g_bwd.into_primitive(),
            h0.into_primitive(),
        ];
        match LinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [q, k, v, g, g_bwd, h0] = inputs.clone();
                let out = B::linattn_linear_forward(q, k, v, g, g_bwd, h0, config.clone());
                prep.finish((inputs, config), out)
            }
            OpsKind::UnTracked(prep) => {
                let [q, k, v, g, g_bwd, h0] = inputs;
                prep.finish(B::linattn_linear_forward(q, k, v, g, g_bwd, h0, config))
            }
        }
    }

    fn linattn_linear_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        g_bwd: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        d_ht: FloatTensor<Self>,
        config: LinearConfig,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        // The backward op itself is not differentiated again (no second-order gradients).
        let untracked = <Self as AutodiffBackend>::from_inner;
        let (dq, dk, dv, dg, dg_bwd, dh0) = B::linattn_linear_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            g.into_primitive(),
            g_bwd.into_primitive(),
            h0.into_primitive(),
            d_o.into_primitive(),
            d_ht.into_primitive(),
            config,
        );
        (
            untracked(dq),
            untracked(dk),
            untracked(dv),
            untracked(dg),
            untracked(dg_bwd),
            untracked(dh0),
        )
    }

    fn linattn_lightnet_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        config: LightNetConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        /// `q, k, v` are the differentiable parents; the initial state is an input only.
        #[derive(Debug)]
        struct LightNetBackward;

        impl<B: LinattnBackend> Backward<B, 3> for LightNetBackward {
            type State = ([FloatTensor<B>; 5], LightNetConfig);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let d_o = grads.consume::<B>(&ops.node);
                let ([q, k, v, s0, z0], config) = ops.state;
                let (dq, dk, dv) = B::linattn_lightnet_backward(q, k, v, s0, z0, d_o, config);
                for (parent, grad) in ops.parents.iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [q.node(), k.node(), v.node()];
        let inputs = [
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            s0.into_primitive(),
            z0.into_primitive(),
        ];
        let [q, k, v, s0, z0] = inputs.clone();
        let (o, state) = B::linattn_lightnet_forward(q, k, v, s0, z0, config.clone());
        let o = match LightNetBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((inputs, config), o),
            OpsKind::UnTracked(prep) => prep.finish(o),
        };
        (o, <Self as AutodiffBackend>::from_inner(state))
    }

    fn linattn_lightnet_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        config: LightNetConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let untracked = <Self as AutodiffBackend>::from_inner;
        let (dq, dk, dv) = B::linattn_lightnet_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            s0.into_primitive(),
            z0.into_primitive(),
            d_o.into_primitive(),
            config,
        );
        (untracked(dq), untracked(dk), untracked(dv))
    }

    fn linattn_decode_step(
        state: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        config: DecodeConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // Generation: no graph is recorded; the results are constants.
        let untracked = <Self as AutodiffBackend>::from_inner;
        let (o, state) = B::linattn_decode_step(
            state.into_primitive(),
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            g.into_primitive(),
            config,
        );
        (untracked(o), untracked(state))
    }

    fn linattn_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: AttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        /// The inputs, the forward outputs the backward kernels read (`o`, `lse`), the config.
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: LinattnBackend> Backward<B, 3> for AttentionBackward {
            type State = ([FloatTensor<B>; 5], AttentionConfig);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let d_o = grads.consume::<B>(&ops.node);
                let ([q, k, v, o, lse], config) = ops.state;
                let (dq, dk, dv) = B::linattn_attention_backward(q, k, v, o, lse, d_o, config);
                for (parent, grad) in ops.parents.iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let (o, lse) =
            B::linattn_attention_forward(q.clone(), k.clone(), v.clone(), config.clone());
        let o = match AttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = [q, k, v, o.clone(), lse.clone()];
                prep.finish((state, config), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(o),
        };
        (o, <Self as AutodiffBackend>::from_inner(lse))
    }

    fn linattn_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        config: AttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let untracked = <Self as AutodiffBackend>::from_inner;
        let (dq, dk, dv) = B::linattn_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            o.into_primitive(),
            lse.into_primitive(),
            d_o.into_primitive(),
            config,
        );
        (untracked(dq), untracked(dk), untracked(dv))
    }

    fn linattn_fused_step(grads: FloatTensor<Self>, state: OptimHandle) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::linattn_fused_step(grads.into_primitive(), state))
    }
}
