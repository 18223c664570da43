//! The decayed linear attention engine (ops.md section 1), in f64, in three forms each for the causal
//! and the bidirectional (LION) direction, with analytic gradients.
//!
//! Every gate kind is first expanded to a per-token, per-key-channel log decay `[B, T, H, K]`
//! ([`Gate::expand`]); every form then works on that one representation, and gate gradients are
//! computed for the expanded gate and summed back to the gate's own shape ([`GateKind::reduce_grad`]).
//! This keeps one obviously-correct code path for all four gate kinds.

/// Problem sizes. With variable length (`cu_seqlens`), `b == 1` and `t` is the packed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub k: usize,
    pub v: usize,
}

impl Dims {
    pub fn qk_len(&self) -> usize {
        self.b * self.t * self.h * self.k
    }
    pub fn v_len(&self) -> usize {
        self.b * self.t * self.h * self.v
    }
    /// Elements of one state `[H, K, V]`.
    pub fn state_len(&self) -> usize {
        self.h * self.k * self.v
    }
}

/// The four gate kinds of ops.md section 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateKind {
    /// No decay (plain linear attention, LION-LIT).
    None,
    /// One log decay per head, `[H]` (RetNet, LION-D).
    PerHead,
    /// One log decay per token and head, `[B, T, H]` (Mamba-2, LION-S).
    Scalar,
    /// One log decay per token, head and key channel, `[B, T, H, K]` (GLA, LightNet).
    Vector,
}

/// A gate: natural-log decays, all `<= 0`.
#[derive(Clone, Copy, Debug)]
pub enum Gate<'a> {
    None,
    PerHead(&'a [f64]),
    Scalar(&'a [f64]),
    Vector(&'a [f64]),
}

impl<'a> Gate<'a> {
    pub fn kind(&self) -> GateKind {
        match self {
            Gate::None => GateKind::None,
            Gate::PerHead(_) => GateKind::PerHead,
            Gate::Scalar(_) => GateKind::Scalar,
            Gate::Vector(_) => GateKind::Vector,
        }
    }

    /// The raw values (`None` for [`Gate::None`]).
    pub fn data(&self) -> Option<&'a [f64]> {
        match *self {
            Gate::None => None,
            Gate::PerHead(d) | Gate::Scalar(d) | Gate::Vector(d) => Some(d),
        }
    }

    /// Builds a gate of `kind` over `data` (ignored for [`GateKind::None`]).
    pub fn from_kind(kind: GateKind, data: &'a [f64]) -> Self {
        match kind {
            GateKind::None => Gate::None,
            GateKind::PerHead => Gate::PerHead(data),
            GateKind::Scalar => Gate::Scalar(data),
            GateKind::Vector => Gate::Vector(data),
        }
    }

    /// The per-token, per-key-channel log decay `[B, T, H, K]` this gate stands for.
    pub fn expand(&self, dims: &Dims) -> Vec<f64> {
        let Dims { b, t, h, k, .. } = *dims;
        let mut out = vec![0.0; b * t * h * k];
        for bt in 0..b * t {
            for hh in 0..h {
                for kk in 0..k {
                    let idx = (bt * h + hh) * k + kk;
                    out[idx] = match *self {
                        Gate::None => 0.0,
                        Gate::PerHead(g) => g[hh],
                        Gate::Scalar(g) => g[bt * h + hh],
                        Gate::Vector(g) => g[idx],
                    };
                }
            }
        }
        out
    }
}

impl GateKind {
    /// Number of elements of a gate of this kind.
    pub fn len(&self, dims: &Dims) -> usize {
        match self {
            GateKind::None => 0,
            GateKind::PerHead => dims.h,
            GateKind::Scalar => dims.b * dims.t * dims.h,
            GateKind::Vector => dims.qk_len(),
        }
    }

    /// Sums a gradient w.r.t. the expanded gate `[B, T, H, K]` back to this kind's shape (the adjoint
    /// of [`Gate::expand`]). `None` for [`GateKind::None`].
    pub fn reduce_grad(&self, dims: &Dims, d_expanded: &[f64]) -> Option<Vec<f64>> {
        let Dims { b, t, h, k, .. } = *dims;
        assert_eq!(d_expanded.len(), b * t * h * k);
        let mut out = vec![0.0; self.len(dims)];
        match self {
            GateKind::None => return None,
            GateKind::Vector => out.copy_from_slice(d_expanded),
            GateKind::Scalar => {
                for (i, chunk) in d_expanded.chunks(k).enumerate() {
                    out[i] = chunk.iter().sum();
                }
            }
            GateKind::PerHead => {
                for (i, chunk) in d_expanded.chunks(k).enumerate() {
                    out[i % h] += chunk.iter().sum::<f64>();
                }
            }
        }
        Some(out)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `o_i` sees `j <= i` (GLA convention).
    Causal,
    /// `o_i` sees every `j` (LION, symmetric mask; forward gate below, backward gate above the diagonal).
    Bidirectional,
}

/// How the function is computed. All forms compute the same function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// The scan(s): O(T K V).
    Recurrent,
    /// The explicit T x T masked matrix: O(T^2 K).
    Parallel,
    /// Chunk states between chunks, a C x C masked block inside. Any `chunk >= 1`, also one that
    /// does not divide T. Bidirectional chunkwise is linear in T.
    Chunkwise { chunk: usize },
}

/// One engine problem. Invariants (asserted): `q, k` have `dims.qk_len()` elements, `v`
/// `dims.v_len()`; the gate has `gate.kind().len(dims)`; `gate_bwd` only with
/// [`Direction::Bidirectional`] and of the same kind as `gate`; `h0` only for
/// [`Direction::Causal`], without `normalize`, with `N * H * K * V` elements (`N = B`, or the number
/// of segments with `cu_seqlens`); `cu_seqlens` only with `b == 1`, starting at 0, non-decreasing,
/// ending at `t` (empty segments allowed).
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a> {
    pub dims: Dims,
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    /// Forward gate (below the diagonal in the bidirectional case).
    pub gate: Gate<'a>,
    /// Backward-direction gate (above the diagonal). `None`: the forward gate is used for both.
    pub gate_bwd: Option<Gate<'a>>,
    pub direction: Direction,
    pub scale: f64,
    /// Row-sum normalisation `o_i = sum_j A_ij v_j / (sum_j A_ij + eps)`, with this `eps`.
    pub normalize: Option<f64>,
    /// Initial state `[N, H, K, V]` (causal only).
    pub h0: Option<&'a [f64]>,
    /// Packed variable-length segments `[N + 1]` (requires `dims.b == 1`).
    pub cu_seqlens: Option<&'a [usize]>,
}

impl Problem<'_> {
    /// Number of independent sequences `N`: `B`, or the number of segments.
    pub fn num_sequences(&self) -> usize {
        match self.cu_seqlens {
            Some(cu) => cu.len() - 1,
            None => self.dims.b,
        }
    }

    /// `(batch index, first token, end token)` of every independent sequence, in order.
    pub fn sequences(&self) -> Vec<(usize, usize, usize)> {
        match self.cu_seqlens {
            Some(cu) => cu.windows(2).map(|w| (0, w[0], w[1])).collect(),
            None => (0..self.dims.b).map(|b| (b, 0, self.dims.t)).collect(),
        }
    }

    /// Whether the final state `ht` is part of the output: causal without normalisation.
    pub fn has_final_state(&self) -> bool {
        self.direction == Direction::Causal && self.normalize.is_none()
    }
}

/// Forward result.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// `[B, T, H, V]`.
    pub o: Vec<f64>,
    /// Final state `[N, H, K, V]` when [`Problem::has_final_state`].
    pub ht: Option<Vec<f64>>,
}

/// Gradients of `loss = sum(o * d_o) + sum(ht * d_ht)` w.r.t. every differentiable input.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    /// Same shape as the forward gate; `None` for [`Gate::None`]. When `gate_bwd` is `None` in a
    /// bidirectional problem, this holds the contributions of both directions.
    pub dg: Option<Vec<f64>>,
    /// Same shape as `gate_bwd`, when one was given.
    pub dg_bwd: Option<Vec<f64>>,
    /// Same shape as `h0`, when one was given.
    pub dh0: Option<Vec<f64>>,
}

/// Forward pass in the given form.
pub fn forward(p: &Problem, form: Form) -> Output {
    let _ = (p, form);
    todo!("reference engine forward")
}

/// Analytic backward pass in the given form (all forms give the same gradients).
/// `d_ht` (`[N, H, K, V]`) only when [`Problem::has_final_state`].
pub fn backward(p: &Problem, form: Form, d_o: &[f64], d_ht: Option<&[f64]>) -> Grads {
    let _ = (p, form, d_o, d_ht);
    todo!("reference engine backward")
}

/// One causal decoding step: `S <- diag(exp g) S + k^T v`, `o = scale q S`.
///
/// `dims.t` must be 1: `q, k` are `[B, 1, H, K]`, `v` `[B, 1, H, V]`, the gate is for that one token
/// (`[H]`, `[B, 1, H]` or `[B, 1, H, K]`), `state` is `[B, H, K, V]` and is updated in place.
/// Returns `o` `[B, 1, H, V]`.
pub fn decode_step(
    dims: &Dims,
    state: &mut [f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    gate: Gate,
    scale: f64,
) -> Vec<f64> {
    let _ = (dims, state, q, k, v, gate, scale);
    todo!("reference decode step")
}
