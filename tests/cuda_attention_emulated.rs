//! The CUDA attention kernels on the host emulation (kernels/emu, no GPU): indexing, masking and
//! numerics of forward and backward against the f64 reference on small shapes (T, S in {64, 200,
//! 256} and 1000, D in {64, 128}, every compiled block shape, bf16 and f16, dense / full plan /
//! random block masks with and without the diagonal and with an empty row / Radial masks, causal
//! or not). Needs x86-64 and a C++20 compiler (g++); prints `skipped: ...` without them.
//!
//! The emulation runs one launch at a time per process; the matrix is split into several tests so
//! that a failure names its group.

#![cfg(feature = "cuda")]

use linattn::DType;
use linattn::attention::RadialModel;
use linattn::cuda::emu::EmuExec;
use linattn::suites::attention::{AttnCase, MaskKind, radial_config, run_cases};
use linattn::suites::verdict;

fn exec() -> Option<EmuExec> {
    match EmuExec::new() {
        Ok(e) => Some(e),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

/// Runs every case (inputs from seed 7000 + index), printing a line each; fails with the list of
/// failures.
fn run_all(exec: &EmuExec, runs: &[(AttnCase, DType)]) {
    if let Err(e) = verdict(&run_cases(exec, "attention-emulated", runs, 7000, true)) {
        panic!("{e}");
    }
}

const BLOCKS: [(usize, usize); 4] = [(64, 64), (64, 128), (128, 64), (128, 128)];
const DTYPES: [DType; 2] = [DType::BF16, DType::F16];

/// Every block shape, head dim and causal flag on T x S in {64 x 64, 200 x 256, 256 x 200,
/// 256 x 256}, through the computed dense lists and through an uploaded all-blocks plan
/// (alternating), dtypes alternating.
fn dense_matrix(d: usize) -> Vec<(AttnCase, DType)> {
    let mut runs = Vec::new();
    let mut i = 0;
    for (t, s) in [(64, 64), (200, 256), (256, 200), (256, 256)] {
        for block in BLOCKS {
            for causal in [false, true] {
                let mask = if i % 2 == 0 {
                    MaskKind::Dense
                } else {
                    MaskKind::FullPlan
                };
                runs.push((
                    AttnCase::new(t, s, d, block, causal, mask),
                    DTYPES[(i / 2) % 2],
                ));
                i += 1;
            }
        }
    }
    runs
}

#[test]
fn dense_and_full_plan_d64() {
    let Some(exec) = exec() else { return };
    run_all(&exec, &dense_matrix(64));
}

#[test]
fn dense_and_full_plan_d128() {
    let Some(exec) = exec() else { return };
    run_all(&exec, &dense_matrix(128));
}

/// Random block masks (density 0.5): with the diagonal blocks forced on, forced off (under the
/// causal rule this empties many rows) and with a whole query block row cleared; every block
/// shape, both head dims, causal or not, T x S in {200 x 256, 256 x 200}.
fn random_matrix(d: usize) -> Vec<(AttnCase, DType)> {
    let mut runs = Vec::new();
    let mut i = 0;
    for block in BLOCKS {
        for causal in [false, true] {
            for (diagonal, empty_row) in [(true, false), (false, false), (true, true)] {
                let (t, s) = if i % 2 == 0 { (200, 256) } else { (256, 200) };
                let mask = MaskKind::Random {
                    density: 0.5,
                    diagonal,
                    empty_row,
                };
                runs.push((AttnCase::new(t, s, d, block, causal, mask), DTYPES[i % 2]));
                i += 1;
            }
        }
    }
    runs
}

#[test]
fn random_masks_d64() {
    let Some(exec) = exec() else { return };
    run_all(&exec, &random_matrix(64));
}

#[test]
fn random_masks_d128() {
    let Some(exec) = exec() else { return };
    run_all(&exec, &random_matrix(128));
}

/// Small Radial masks: the paper rule (5 frames x 48 tokens, blocks of 64: frames straddle
/// blocks and T = 240 leaves a partial last block), the released `wan` rule (4 x 64, blocks of 64)
/// and the released `hunyuan` rule at decay 0.95 (4 x 128, blocks of 128).
#[test]
fn radial_masks() {
    let Some(exec) = exec() else { return };
    let configs = [
        radial_config(RadialModel::Paper, 5, 48, 64, 1.0),
        radial_config(RadialModel::Wan, 4, 64, 64, 1.0),
        radial_config(RadialModel::Hunyuan, 4, 128, 128, 0.95),
    ];
    let mut runs = Vec::new();
    let mut i = 0;
    for cfg in configs {
        for d in [64, 128] {
            for causal in [false, true] {
                runs.push((AttnCase::radial(cfg, d, causal), DTYPES[i % 2]));
                i += 1;
            }
        }
    }
    run_all(&exec, &runs);
}

/// Batch and head strides, sharp softmax (q x 4), the host API's default dense mode, and T = S =
/// 1000 (several key blocks per row, partial last blocks of 1000 mod 64 = 40 and 1000 mod 128 =
/// 104 tokens).
#[test]
fn strides_sharp_softmax_and_long_rows() {
    let Some(exec) = exec() else { return };
    let random = MaskKind::Random {
        density: 0.4,
        diagonal: true,
        empty_row: true,
    };
    let runs = vec![
        (
            AttnCase::new(200, 136, 64, (64, 128), false, random.clone()).with_batch_heads(2, 3),
            DType::BF16,
        ),
        (
            AttnCase::new(130, 200, 128, (128, 64), true, MaskKind::Dense).with_batch_heads(2, 2),
            DType::F16,
        ),
        (
            AttnCase::new(256, 256, 64, (64, 64), true, MaskKind::HostDense).with_q_gain(4.0),
            DType::BF16,
        ),
        (
            AttnCase::new(200, 200, 128, (128, 128), false, random.clone()).with_q_gain(4.0),
            DType::F16,
        ),
        (
            AttnCase::new(1000, 1000, 128, (128, 64), true, MaskKind::Dense),
            DType::BF16,
        ),
        (
            AttnCase::new(1000, 1000, 64, (64, 128), false, random),
            DType::F16,
        ),
        (
            AttnCase::new(1000, 1000, 128, (128, 128), false, MaskKind::HostDense),
            DType::F16,
        ),
    ];
    run_all(&exec, &runs);
}
