//! Bad input through the burn API is a typed error that names the problem, returned before
//! anything is queued: shape mismatches, positive gates, NaN, unsupported head dims and
//! dtypes, tensors on two devices, empty or inconsistent `cu_seqlens`.

mod common;

use burn::tensor::{DType, Device, Tensor};
use common::*;
use linattn_burn::{BlockSparseAttention, Error, Form, Gate, LightNet, LinearAttention};

fn x<const D: usize>(shape: [usize; D], value: f64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    tensor(&vec![value; n], shape, device)
}

fn message(r: linattn_burn::Result<impl std::fmt::Debug>) -> (Error, String) {
    let e = r.expect_err("bad input must be refused");
    let m = e.to_string();
    (e, m)
}

fn errors_on(device: &Device) {
    let (b, t, h, k, v) = (1, 8, 2, 4, 3);
    let q = || x([b, t, h, k], 0.1, device);
    let vv = || x([b, t, h, v], 0.1, device);

    // Shape mismatch: k with another head dim.
    let (e, m) =
        message(LinearAttention::causal(q(), x([b, t, h, 5], 0.1, device), vv()).forward());
    assert!(
        matches!(e, Error::ShapeMismatch { .. }) && m.contains("`k`"),
        "{m}"
    );

    // A positive gate names the tensor and the element.
    let mut g = vec![-0.5; b * t * h];
    g[5] = 0.25;
    let gate = Gate::Scalar(tensor(&g, [b, t, h], device));
    let (e, m) = message(
        LinearAttention::causal(q(), q(), vv())
            .with_gate(gate)
            .forward(),
    );
    assert!(matches!(e, Error::InvalidGate { index: 5, .. }), "{m}");

    // NaN in v.
    let mut vals = vec![0.1; b * t * h * v];
    vals[7] = f64::NAN;
    let bad_v = tensor(&vals, [b, t, h, v], device);
    let (e, m) = message(LinearAttention::causal(q(), q(), bad_v).forward());
    assert!(
        matches!(&e, Error::NonFinite { tensor, index: 7, .. } if tensor == "v"),
        "{m}"
    );

    // cu_seqlens: empty, inconsistent with T, and with B > 1.
    for cu in [vec![], vec![0, 3, 2, 8], vec![0, 3, 9]] {
        let (e, m) = message(
            LinearAttention::causal(q(), q(), vv())
                .with_cu_seqlens(cu.clone())
                .forward(),
        );
        assert!(matches!(e, Error::BadCuSeqlens(_)), "{cu:?}: {m}");
    }
    let (e, _) = message(
        LinearAttention::causal(
            x([2, t, h, k], 0.1, device),
            x([2, t, h, k], 0.1, device),
            x([2, t, h, v], 0.1, device),
        )
        .with_cu_seqlens(vec![0, 8])
        .forward(),
    );
    assert!(matches!(e, Error::BadCuSeqlens(_)));

    // A chunk size of 0, and ht where there is none.
    let (_, m) = message(
        LinearAttention::causal(q(), q(), vv())
            .with_form(Form::Chunkwise { chunk: 0 })
            .forward(),
    );
    assert!(m.contains("chunk size"), "{m}");
    let (_, m) = message(
        LinearAttention::bidirectional(q(), q(), vv())
            .with_final_state()
            .forward(),
    );
    assert!(m.contains("final state"), "{m}");

    // Attention: a head dim the kernels do not take.
    let a = x([1, 8, 2, 12], 0.1, device);
    let (e, m) = message(BlockSparseAttention::dense(a.clone(), a.clone(), a).forward());
    assert!(
        matches!(e, Error::UnsupportedHeadDim { dim: 12, .. }),
        "{m}"
    );

    // LightNet: a state of the wrong shape.
    let (e, m) = message(
        LightNet::causal(q(), q(), vv())
            .with_initial_state(x([b, h, k, 7], 0.0, device), x([b, h, k], 0.0, device))
            .forward(),
    );
    assert!(
        matches!(e, Error::ShapeMismatch { .. }) && m.contains("s0"),
        "{m}"
    );

    // f64 is the CPU reference's dtype, not the kernels'.
    if device.supports_dtype(DType::F64) {
        let q64 = q().cast(DType::F64);
        let (_, m) = message(LinearAttention::causal(q64.clone(), q64.clone(), q64).forward());
        assert!(m.contains("f64"), "{m}");
    }
}

#[test]
fn bad_input_is_a_typed_error_on_wgpu() {
    let Some(device) = wgpu() else { return };
    errors_on(&device);
}

#[test]
fn bad_input_is_a_typed_error_on_ndarray() {
    errors_on(&ndarray());
}

#[test]
fn tensors_on_two_devices_are_refused() {
    let Some(gpu) = wgpu() else { return };
    let cpu = ndarray();
    let q = x([1, 4, 1, 4], 0.1, &gpu);
    let k = x([1, 4, 1, 4], 0.1, &cpu);
    let (e, m) = message(LinearAttention::causal(q.clone(), k, q).forward());
    assert!(
        matches!(e, Error::InvalidArgument(_)) && m.contains("device"),
        "{m}"
    );
}

#[test]
fn unsupported_dtypes_are_refused_before_queueing() {
    let Some(gpu) = wgpu() else { return };
    // llvmpipe stores f16 but not bf16; on a GPU with bf16 the call runs instead.
    let q = x([1, 4, 1, 4], 0.1, &gpu).cast(DType::BF16);
    let r = LinearAttention::causal(q.clone(), q.clone(), q).forward();
    if gpu.supports_dtype(DType::BF16) {
        assert!(r.is_ok(), "{:?}", r.err());
    } else {
        let (e, m) = message(r);
        assert!(matches!(e, Error::UnsupportedDtype { .. }), "{m}");
    }
}

/// The README's "Use from burn" example is this crate's doctest, line for line.
#[test]
fn the_readme_example_is_the_doctest() {
    let top = include_str!("../../../README.md");
    let krate = include_str!("../README.md");
    let block = |s: &str, fence: &str| -> String {
        let start = s.find(fence).expect("a rust block") + fence.len();
        let end = start + s[start..].find("```\n").expect("a closing fence");
        s[start..end].to_string()
    };
    let section = &top[top.find("## Use from burn").expect("the README section")..];
    assert_eq!(
        block(section, "```rust,ignore\n"),
        block(krate, "```rust\n")
    );
}
