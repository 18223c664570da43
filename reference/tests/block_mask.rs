//! Block masks: hand-checked conversions, CSR validation, and round trips dense <-> CSR <-> lists.

use linattn_reference::block_mask::{BlockLists, BlockMask};
use proptest::prelude::*;

/// 3 x 4 blocks with an empty middle row:
/// ```text
/// 1 0 1 1
/// 0 0 0 0
/// 0 1 0 1
/// ```
fn sample() -> BlockMask {
    BlockMask::from_dense(3, 4, 16, 8, &[1, 0, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1]).unwrap()
}

#[test]
fn accessors_and_hand_checked_conversions() {
    let m = sample();
    assert_eq!((m.nq(), m.nk(), m.block_q(), m.block_k()), (3, 4, 16, 8));
    assert_eq!(m.nnz(), 5);
    assert!((m.density() - 5.0 / 12.0).abs() < 1e-15);
    assert!(m.allowed(0, 0) && !m.allowed(0, 1) && m.allowed(2, 3) && !m.allowed(1, 2));
    // token (17, 9) is in block (1, 1): not allowed; token (15, 23) in block (0, 2): allowed
    assert!(!m.allows_tokens(17, 9));
    assert!(m.allows_tokens(15, 23));

    let (indptr, indices) = m.to_csr();
    assert_eq!(indptr, vec![0, 3, 3, 5]);
    assert_eq!(indices, vec![0, 2, 3, 1, 3]);

    let rows = m.row_lists();
    assert_eq!(rows.rows, 3);
    assert_eq!(rows.width, 4);
    assert_eq!(rows.counts, vec![3, 0, 2]);
    // allowed blocks first, then the others, both ascending (FlexAttention's stable argsort)
    assert_eq!(rows.indices, vec![0, 2, 3, 1, 0, 1, 2, 3, 1, 3, 0, 2]);
    assert_eq!(rows.row(0), &[0, 2, 3]);
    assert_eq!(rows.row(1), &[] as &[u32]);
    assert_eq!(rows.row(2), &[1, 3]);
    assert_eq!(rows.nnz(), 5);

    let cols = m.col_lists();
    assert_eq!((cols.rows, cols.width), (4, 3));
    assert_eq!(cols.counts, vec![1, 1, 1, 2]);
    assert_eq!(cols.row(0), &[0]);
    assert_eq!(cols.row(1), &[2]);
    assert_eq!(cols.row(2), &[0]);
    assert_eq!(cols.row(3), &[0, 2]);
    assert_eq!(cols.indices, vec![0, 1, 2, 2, 0, 1, 0, 1, 2, 0, 2, 1]);

    let t = m.transpose();
    assert_eq!((t.nq(), t.nk(), t.block_q(), t.block_k()), (4, 3, 8, 16));
    assert_eq!(t.to_dense(), vec![1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 1]);
}

#[test]
fn dense_nonzero_means_allowed() {
    let m = BlockMask::from_dense(1, 3, 1, 1, &[0, 7, 255]).unwrap();
    assert_eq!(m.to_dense(), vec![0, 1, 1]);
}

#[test]
fn full_empty_and_token_grid() {
    assert_eq!(BlockMask::grid(10, 7, 4, 3).unwrap(), (3, 3));
    assert_eq!(BlockMask::grid(8, 9, 4, 3).unwrap(), (2, 3));
    assert_eq!(BlockMask::grid(0, 1, 4, 3).unwrap(), (0, 1));
    let f = BlockMask::full_for_tokens(10, 7, 4, 3).unwrap();
    assert_eq!((f.nq(), f.nk(), f.nnz()), (3, 3, 9));
    assert!(f.covers(10, 7) && f.covers(9, 9) && !f.covers(13, 7) && !f.covers(10, 6));
    assert_eq!(f.density(), 1.0);
    let e = BlockMask::empty(2, 5, 2, 2).unwrap();
    assert_eq!((e.nnz(), e.density()), (0, 0.0));
    assert_eq!(e.to_csr(), (vec![0, 0, 0], vec![]));
    assert_eq!(BlockMask::full(0, 0, 1, 1).unwrap().density(), 0.0);
    let g = BlockMask::from_fn_for_tokens(9, 9, 3, 3, |a, b| a >= b).unwrap();
    assert_eq!(g.to_dense(), vec![1, 0, 0, 1, 1, 0, 1, 1, 1]);
}

#[test]
fn csr_validation_rejects_malformed_input() {
    let ok = BlockMask::from_csr(4, 16, 8, &[0, 3, 3, 5], &[0, 2, 3, 1, 3]).unwrap();
    assert_eq!(ok, sample());
    // an empty grid is fine
    assert_eq!(BlockMask::from_csr(4, 1, 1, &[0], &[]).unwrap().nq(), 0);

    let cases: [(&[u32], &[u32], &str); 9] = [
        (&[], &[], "indptr must have"),
        (&[1, 1], &[0], "indptr[0] must be 0"),
        (&[0, 2, 1, 3], &[0, 1, 2], "non-decreasing"),
        (&[0, 2], &[0, 1, 2], "must equal indices.len()"),
        (&[0, 3], &[0, 1], "must equal indices.len()"),
        (&[0, 2], &[0, 4], "out of range"),
        (&[0, 2], &[2, 1], "strictly ascending"),
        (&[0, 2], &[1, 1], "strictly ascending"),
        (&[0, 1, 3], &[3, 2, 2], "strictly ascending"),
    ];
    for (indptr, indices, msg) in cases {
        let err = BlockMask::from_csr(4, 1, 1, indptr, indices).unwrap_err();
        assert!(
            err.contains(msg),
            "{indptr:?} {indices:?}: got {err:?}, wanted {msg:?}"
        );
    }
    assert!(BlockMask::from_csr(4, 0, 1, &[0], &[]).is_err());
}

#[test]
fn row_lists_validation() {
    let m = sample();
    let mut l = m.row_lists();
    assert_eq!(BlockMask::from_row_lists(4, 16, 8, &l).unwrap(), m);
    l.counts[0] = 5;
    assert!(BlockMask::from_row_lists(4, 16, 8, &l).is_err());
    let bad = BlockLists {
        rows: 1,
        width: 2,
        counts: vec![2],
        indices: vec![1, 0],
    };
    assert!(BlockMask::from_row_lists(2, 1, 1, &bad).is_err());
    let short = BlockLists {
        rows: 2,
        width: 2,
        counts: vec![0],
        indices: vec![0, 1, 0, 1],
    };
    assert!(BlockMask::from_row_lists(2, 1, 1, &short).is_err());
}

fn arb_mask() -> impl Strategy<Value = BlockMask> {
    (0usize..7, 0usize..7, 1usize..5, 1usize..5).prop_flat_map(|(nq, nk, bq, bk)| {
        // bias towards empty rows: each entry allowed with probability ~1/3
        proptest::collection::vec(0u8..3, nq * nk).prop_map(move |v| {
            let d: Vec<u8> = v.iter().map(|&x| u8::from(x == 0)).collect();
            BlockMask::from_dense(nq, nk, bq, bk, &d).unwrap()
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed), ..ProptestConfig::default() })]

    #[test]
    fn round_trips(m in arb_mask()) {
        let (indptr, indices) = m.to_csr();
        prop_assert_eq!(indptr.len(), m.nq() + 1);
        prop_assert_eq!(indices.len(), m.nnz());
        let back = BlockMask::from_csr(m.nk(), m.block_q(), m.block_k(), &indptr, &indices).unwrap();
        prop_assert_eq!(&back, &m);
        let rows = m.row_lists();
        prop_assert_eq!(rows.nnz(), m.nnz());
        prop_assert_eq!(&BlockMask::from_row_lists(m.nk(), m.block_q(), m.block_k(), &rows).unwrap(), &m);
        // every padded row is a permutation of 0..width, valid part ascending and allowed
        for r in 0..rows.rows {
            let mut all: Vec<u32> = rows.indices[r * rows.width..(r + 1) * rows.width].to_vec();
            let valid = rows.row(r);
            prop_assert!(valid.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(valid.iter().all(|&kb| m.allowed(r, kb as usize)));
            prop_assert_eq!(valid.len(), (0..m.nk()).filter(|&kb| m.allowed(r, kb)).count());
            all.sort_unstable();
            prop_assert_eq!(all, (0..rows.width as u32).collect::<Vec<_>>());
        }
        // the transposed lists are the rows of the transpose, and list exactly the query blocks
        let cols = m.col_lists();
        prop_assert_eq!(&cols, &m.transpose().row_lists());
        for kb in 0..m.nk() {
            let expect: Vec<u32> = (0..m.nq()).filter(|&qb| m.allowed(qb, kb)).map(|x| x as u32).collect();
            prop_assert_eq!(cols.row(kb), expect.as_slice());
        }
        prop_assert_eq!(&m.transpose().transpose(), &m);
        prop_assert_eq!(&BlockMask::from_dense(m.nq(), m.nk(), m.block_q(), m.block_k(), &m.to_dense()).unwrap(), &m);
    }
}

/// Constructors return errors for what a user can get wrong, and accessors do not panic outside
/// the grid (the type is re-exported as `linattn::attention::BlockMask`).
#[test]
fn constructors_refuse_bad_input_without_panicking() {
    let e = BlockMask::from_dense(2, 2, 8, 8, &[1, 1, 1]).unwrap_err();
    assert!(e.contains("needs 4 entries, got 3"), "{e}");
    assert!(BlockMask::from_dense(1, 1, 0, 8, &[1]).is_err());
    assert!(BlockMask::grid(10, 10, 0, 4).is_err());
    assert!(BlockMask::full(usize::MAX, 2, 4, 4).is_err());
    assert!(BlockMask::empty(3, 3, 4, 0).is_err());
    assert!(BlockMask::full_for_tokens(10, 10, 4, 0).is_err());
    assert!(BlockMask::from_fn_for_tokens(10, 10, 0, 4, |_, _| true).is_err());
    assert!(BlockMask::from_csr(usize::MAX, 4, 4, &[0, 0, 0], &[]).is_err());
    let bad_lists = BlockLists {
        rows: usize::MAX,
        width: 2,
        counts: vec![],
        indices: vec![],
    };
    assert!(BlockMask::from_row_lists(2, 4, 4, &bad_lists).is_err());
    let m = BlockMask::full(2, 3, 4, 4).unwrap();
    assert!(m.allowed(1, 2));
    assert!(!m.allowed(2, 0) && !m.allowed(0, 3) && !m.allows_tokens(100, 0));
    let lists = m.row_lists();
    assert_eq!(lists.row(1), &[0, 1, 2]);
    assert!(lists.row(2).is_empty());
}
