//! Synthetic tasks generated from a seed (no downloads): each batch is a pure function of
//! `(seed, batch index)`, so a resumed run sees exactly the batches an uninterrupted one would.
//!
//! - **MQAR** (multi-query associative recall, as in the Zoology benchmark): `pairs` key-value
//!   pairs, then queries of keys seen before; the model must output the key's value at each
//!   query. Keys and values are drawn from disjoint halves of the vocabulary (token 0 pads), each
//!   key at most once per sequence. Scored on the queried values only.
//! - **Sort** (for the bidirectional encoder): a sequence of tokens; the target at position `i`
//!   is the `i`-th smallest token of the whole sequence. Every output depends on every input, so a
//!   causal model cannot solve it.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Positions without a target.
pub const IGNORE: i64 = -100;

/// One batch: `tokens [B, T]` and `targets [B, T]` (`IGNORE` where nothing is scored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    pub tokens: Vec<i64>,
    pub targets: Vec<i64>,
}

impl Batch {
    /// Scored positions.
    pub fn scored(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// `pairs` key-value pairs then `queries` queries; sequence length `2 * pairs + queries`.
    Mqar { pairs: usize, queries: usize },
    /// Sort `seq_len` tokens.
    Sort { seq_len: usize },
}

impl Task {
    pub fn seq_len(&self) -> usize {
        match *self {
            Task::Mqar { pairs, queries } => 2 * pairs + queries,
            Task::Sort { seq_len } => seq_len,
        }
    }

    /// The batch number `index` of a run seeded with `seed`.
    pub fn batch(&self, vocab: usize, batch: usize, seed: u64, index: u64) -> Batch {
        // One independent stream per batch: splitmix-style mixing of (seed, index).
        let mut rng = StdRng::seed_from_u64(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ index.wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
        );
        let t = self.seq_len();
        let mut tokens = Vec::with_capacity(batch * t);
        let mut targets = Vec::with_capacity(batch * t);
        for _ in 0..batch {
            match *self {
                Task::Mqar { pairs, queries } => {
                    let half = vocab / 2;
                    let mut keys: Vec<i64> = (1..half as i64).collect();
                    keys.shuffle(&mut rng);
                    keys.truncate(pairs);
                    let values: Vec<i64> = (0..pairs)
                        .map(|_| rng.random_range(half as i64..vocab as i64))
                        .collect();
                    for (k, v) in keys.iter().zip(&values) {
                        tokens.extend_from_slice(&[*k, *v]);
                        targets.extend_from_slice(&[IGNORE, IGNORE]);
                    }
                    for _ in 0..queries {
                        let i = rng.random_range(0..pairs);
                        tokens.push(keys[i]);
                        targets.push(values[i]);
                    }
                }
                Task::Sort { seq_len } => {
                    let seq: Vec<i64> = (0..seq_len)
                        .map(|_| rng.random_range(1..vocab as i64))
                        .collect();
                    let mut sorted = seq.clone();
                    sorted.sort_unstable();
                    tokens.extend_from_slice(&seq);
                    targets.extend_from_slice(&sorted);
                }
            }
        }
        Batch {
            batch,
            seq_len: t,
            tokens,
            targets,
        }
    }

    /// The vocabulary a task needs at least.
    pub fn min_vocab(&self) -> usize {
        match *self {
            Task::Mqar { pairs, .. } => 2 * (pairs + 1),
            Task::Sort { .. } => 2,
        }
    }
}
