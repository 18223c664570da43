//! The engine through burn: forward and every gradient under burn's autodiff equal linattn's
//! f64 reference, on wgpu (fusion on, llvmpipe in CI) and on NdArray, over the shape matrix
//! (odd T, non-power-of-two head dims, strong and weak gates, varlen with an empty segment).

mod common;

use common::*;
use linattn_burn::{Direction, Form};

fn matrix() -> Vec<Case> {
    let mut cases = Vec::new();
    let forms = [
        Form::Chunkwise { chunk: 16 },
        Form::Recurrent,
        Form::Parallel,
    ];
    for gate in [
        GateCase::None,
        GateCase::PerHead,
        GateCase::Scalar,
        GateCase::Vector,
    ] {
        for form in forms {
            cases.push(Case::causal(
                &format!("causal {gate:?} {form:?}"),
                gate,
                form,
            ));
        }
    }
    let chunk = Form::Chunkwise { chunk: 16 };
    let mut strong = Case::causal("strong vector gate", GateCase::Vector, chunk);
    strong.gate_range = (-6.0, -2.0);
    cases.push(strong);
    let mut weak = Case::causal("weak scalar gate", GateCase::Scalar, chunk);
    weak.gate_range = (-0.01, -0.0001);
    cases.push(weak);
    let mut state = Case::causal("h0 and ht", GateCase::Vector, chunk);
    state.h0 = true;
    state.final_state = true;
    cases.push(state);
    let mut varlen = Case::causal("varlen with an empty segment", GateCase::Scalar, chunk);
    varlen.b = 1;
    varlen.cu_seqlens = Some(vec![0, 10, 10, 37]);
    varlen.h0 = true;
    varlen.final_state = true;
    cases.push(varlen);
    let mut varlen_rec = Case::causal("varlen recurrent", GateCase::Vector, Form::Recurrent);
    varlen_rec.b = 1;
    varlen_rec.cu_seqlens = Some(vec![0, 0, 21, 37]);
    cases.push(varlen_rec);
    for (gate, gate_bwd, normalize) in [
        (GateCase::Scalar, true, None),
        (GateCase::Vector, false, None),
        (GateCase::Scalar, false, Some(1e-6)),
        (GateCase::None, false, Some(1e-6)),
    ] {
        for form in [chunk, Form::Parallel] {
            let mut c = Case::causal(
                &format!("LION {gate:?} g_bwd={gate_bwd} normalize={normalize:?} {form:?}"),
                gate,
                form,
            );
            c.direction = Direction::Bidirectional;
            c.gate_bwd = gate_bwd;
            c.normalize = normalize;
            if normalize.is_some() {
                // Row-sum normalisation divides by sums of positive feature products.
                c.gate_range = (-0.5, -0.05);
            }
            cases.push(c);
        }
    }
    cases
}

/// Normalised cases need positive keys and queries (a feature map's output), as in ops.md.
fn data_for(case: &Case, seed: u64) -> Data {
    let mut data = Data::new(case, seed);
    if case.normalize.is_some() {
        for x in data.q.iter_mut().chain(data.k.iter_mut()) {
            *x = (x.abs() + 0.05) as f32 as f64;
        }
    }
    data
}

fn run_matrix(device: &burn::tensor::Device, what: &str) {
    let mut worst: f64 = 0.0;
    for (i, case) in matrix().iter().enumerate() {
        let data = data_for(case, 7 + i as u64);
        let want = reference(case, &data);
        let got = through_burn(case, &data, device);
        worst = worst.max(compare(case, &got, &want, F32_LIMIT));
    }
    println!(
        "{what}: {} cases, worst relative RMS error {worst:.2e}",
        matrix().len()
    );
}

#[test]
fn engine_matrix_on_wgpu_with_fusion() {
    let Some(device) = wgpu() else { return };
    run_matrix(&device, "wgpu");
}

#[test]
fn engine_matrix_on_ndarray() {
    run_matrix(&ndarray(), "ndarray");
}
