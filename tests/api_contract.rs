//! The public API's contract on the CPU backend: typed errors that name the tensor that is wrong,
//! constructors that return `Result` instead of asserting.

use linattn::attention::{BlockLists, BlockMask};
use linattn::linear::{self, Gate};
use linattn::{Backend, DType, Error, Tensor};

/// A state of the wrong shape is reported as the state's error (K and V come from the token).
#[test]
fn decode_step_names_the_state_when_the_state_is_wrong() {
    let q = Tensor::zeros(vec![1, 1, 2, 4], DType::F32);
    let v = Tensor::zeros(vec![1, 1, 2, 5], DType::F32);
    for bad_state in [
        vec![1, 2, 3, 5],
        vec![1, 2, 4, 6],
        vec![2, 2, 4, 5],
        vec![1, 2, 4],
    ] {
        let state = Tensor::zeros(bad_state.clone(), DType::F32);
        let err =
            linear::decode_step(&Backend::Cpu, &state, &q, &q, &v, Gate::None, None).unwrap_err();
        match &err {
            Error::ShapeMismatch { tensor, .. } => {
                assert_eq!(tensor, "state", "{bad_state:?}: {err}")
            }
            other => panic!("{bad_state:?}: {other}"),
        }
    }
    // a two-token query is q's error
    let state = Tensor::zeros(vec![1, 2, 4, 5], DType::F32);
    let q2 = Tensor::zeros(vec![1, 2, 2, 4], DType::F32);
    let err =
        linear::decode_step(&Backend::Cpu, &state, &q2, &q2, &v, Gate::None, None).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { tensor, .. } if tensor == "q"),
        "{err}"
    );
    // and the right shapes run
    assert!(linear::decode_step(&Backend::Cpu, &state, &q, &q, &v, Gate::None, None).is_ok());
}

/// The re-exported block-mask type: a dense matrix of the wrong length is an error, not a panic.
#[test]
fn block_mask_constructors_return_errors() {
    let err = BlockMask::from_dense(2, 2, 8, 8, &[1, 1, 1]).unwrap_err();
    assert!(err.contains("needs 4 entries, got 3"), "{err}");
    assert!(BlockMask::full(2, 2, 0, 8).is_err());
    let lists = BlockLists {
        rows: 1,
        width: 2,
        counts: vec![3],
        indices: vec![0, 1],
    };
    assert!(lists.row(0).is_empty());
    assert!(BlockMask::from_row_lists(2, 8, 8, &lists).is_err());
}

/// `probe` says, for every backend kind, whether it runs here and if not why; `Auto` takes the
/// first that runs and reports what it passed over.
#[test]
fn probe_explains_every_backend() {
    use linattn::{BackendKind, DeviceRequest};
    let probes = Backend::probe();
    let kinds: Vec<BackendKind> = probes.iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        [BackendKind::Cuda, BackendKind::Cube, BackendKind::Cpu]
    );
    for p in &probes {
        match &p.status {
            Ok(description) => assert!(description.starts_with(p.kind.name()), "{p}"),
            Err(reason) => {
                assert!(!reason.is_empty(), "{p}");
                assert!(p.to_string().contains("skipped: "), "{p}");
            }
        }
        println!("{p}");
    }
    assert!(probes[2].status.is_ok(), "the cpu backend always runs");
    let (auto, skipped) = Backend::auto_with_report();
    let first = probes.iter().find(|p| p.status.is_ok()).unwrap();
    assert_eq!(auto.kind(), first.kind);
    assert_eq!(
        skipped.iter().map(|p| p.kind).collect::<Vec<_>>(),
        probes
            .iter()
            .take_while(|p| p.status.is_err())
            .map(|p| p.kind)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        Backend::new(DeviceRequest::Auto).unwrap().kind(),
        auto.kind()
    );
}
