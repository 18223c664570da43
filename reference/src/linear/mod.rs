//! The decayed linear attention engine (ops.md section 1), in f64, in three forms each for the causal
//! and the bidirectional (LION) direction, with analytic gradients.
//!
//! Every gate kind is first expanded to a per-token, per-key-channel log decay `[B, T, H, K]`
//! ([`Gate::expand`]); every form then works on that one representation, and gate gradients are
//! computed for the expanded gate and summed back to the gate's own shape ([`GateKind::reduce_grad`]).
//! This keeps one obviously-correct code path for all four gate kinds.
//!
//! [`forward`] and [`backward`] split a [`Problem`] into independent (sequence, head) slices
//! ([`HeadProblem`]: contiguous `[L, K]` / `[L, V]` rows of one head of one sequence, so variable
//! length needs no special case and gates cannot leak across segments), run one form on each, and
//! scatter the results back. The forms live in their own modules and are derived independently:
//!
//! - [`recurrent`]: the scans of ops.md and back-propagation through them (stored per-step states).
//! - [`parallel`]: the explicit masked matrix, the mask built from direct sums of the gates, and its
//!   derivative (gate gradients by accumulating every mask entry's derivative over its gate interval).
//! - [`chunkwise`]: the kernel algorithm (chunk-local cumulative gates, chunk states, intra-chunk
//!   blocks, reverse pass for the state gradients, closed-form gate gradients), linear in `T` for
//!   both directions.
//!
//! Normalisation: the parallel form differentiates `o_i = sum_j A_ij v_j / (sum_j A_ij + eps)`
//! directly; the recurrent and chunkwise forms run the unnormalised engine on `[v | 1]` (the ones
//! column carries the normaliser, kernels.md) and divide ([`normalized_forward`],
//! [`normalized_backward`]).

// Index loops (`for c in 0..kd`) mirror the subscripts of the formulas in the doc comments, and
// usually index several arrays at once; iterator chains would hide the math.
#![allow(clippy::needless_range_loop)]

pub mod chunkwise;
pub mod parallel;
pub mod recurrent;

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
    validate(p, form);
    let split = Split::new(p);
    let Dims { h, k, v, .. } = p.dims;
    let mut o = vec![0.0; p.dims.v_len()];
    let mut ht = p
        .has_final_state()
        .then(|| vec![0.0; p.num_sequences() * p.dims.state_len()]);
    for (n, &(b, t0, t1)) in split.sequences.iter().enumerate() {
        for head in 0..h {
            let hp = split.gather(p, n, b, t0, t1, head);
            let out = match form {
                Form::Recurrent => recurrent::forward(&hp),
                Form::Parallel => parallel::forward(&hp),
                Form::Chunkwise { chunk } => chunkwise::forward(&hp, chunk),
            };
            split.scatter_rows(&mut o, &out.o, b, t0, t1, head, v);
            if let (Some(ht), Some(head_ht)) = (ht.as_mut(), out.ht.as_ref()) {
                let at = (n * h + head) * k * v;
                ht[at..at + k * v].copy_from_slice(head_ht);
            }
        }
    }
    Output { o, ht }
}

/// Analytic backward pass in the given form (all forms give the same gradients).
/// `d_ht` (`[N, H, K, V]`) only when [`Problem::has_final_state`]; `None` there means zero.
pub fn backward(p: &Problem, form: Form, d_o: &[f64], d_ht: Option<&[f64]>) -> Grads {
    validate(p, form);
    let Dims { h, k, v, .. } = p.dims;
    let n_seq = p.num_sequences();
    assert_eq!(d_o.len(), p.dims.v_len(), "d_o must be [B, T, H, V]");
    if let Some(d_ht) = d_ht {
        assert!(
            p.has_final_state(),
            "d_ht given for a problem without a final state"
        );
        assert_eq!(
            d_ht.len(),
            n_seq * p.dims.state_len(),
            "d_ht must be [N, H, K, V]"
        );
    }
    let split = Split::new(p);
    let mut dq = vec![0.0; p.dims.qk_len()];
    let mut dk = vec![0.0; p.dims.qk_len()];
    let mut dv = vec![0.0; p.dims.v_len()];
    let mut dg_expanded = vec![0.0; p.dims.qk_len()];
    let mut dgb_expanded = vec![0.0; p.dims.qk_len()];
    let mut dh0 = p.h0.map(|h0| vec![0.0; h0.len()]);
    for (n, &(b, t0, t1)) in split.sequences.iter().enumerate() {
        for head in 0..h {
            let hp = split.gather(p, n, b, t0, t1, head);
            let head_do = split.gather_rows(d_o, b, t0, t1, head, v);
            let state_at = (n * h + head) * k * v;
            let head_dht = d_ht.map(|d| &d[state_at..state_at + k * v]);
            let grads = match form {
                Form::Recurrent => recurrent::backward(&hp, &head_do, head_dht),
                Form::Parallel => parallel::backward(&hp, &head_do, head_dht),
                Form::Chunkwise { chunk } => chunkwise::backward(&hp, chunk, &head_do, head_dht),
            };
            split.scatter_rows(&mut dq, &grads.dq, b, t0, t1, head, k);
            split.scatter_rows(&mut dk, &grads.dk, b, t0, t1, head, k);
            split.scatter_rows(&mut dv, &grads.dv, b, t0, t1, head, v);
            split.scatter_rows(&mut dg_expanded, &grads.dg, b, t0, t1, head, k);
            split.scatter_rows(&mut dgb_expanded, &grads.dgb, b, t0, t1, head, k);
            if let (Some(dh0), Some(head_dh0)) = (dh0.as_mut(), grads.dh0.as_ref()) {
                dh0[state_at..state_at + k * v].copy_from_slice(head_dh0);
            }
        }
    }
    let (dg, dg_bwd) = match (p.direction, p.gate_bwd) {
        (Direction::Causal, _) => (p.gate.kind().reduce_grad(&p.dims, &dg_expanded), None),
        // One gate drives both triangles: its gradient is the sum of both directions' parts.
        (Direction::Bidirectional, None) => {
            for (a, b) in dg_expanded.iter_mut().zip(&dgb_expanded) {
                *a += b;
            }
            (p.gate.kind().reduce_grad(&p.dims, &dg_expanded), None)
        }
        (Direction::Bidirectional, Some(gate_bwd)) => (
            p.gate.kind().reduce_grad(&p.dims, &dg_expanded),
            gate_bwd.kind().reduce_grad(&p.dims, &dgb_expanded),
        ),
    };
    Grads {
        dq,
        dk,
        dv,
        dg,
        dg_bwd,
        dh0,
    }
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
    assert_eq!(dims.t, 1, "decode_step takes exactly one token");
    assert_eq!(q.len(), dims.qk_len(), "q must be [B, 1, H, K]");
    assert_eq!(k.len(), dims.qk_len(), "k must be [B, 1, H, K]");
    assert_eq!(v.len(), dims.v_len(), "v must be [B, 1, H, V]");
    assert_eq!(
        state.len(),
        dims.b * dims.state_len(),
        "state must be [B, H, K, V]"
    );
    assert_eq!(
        gate.data().map_or(0, <[f64]>::len),
        gate.kind().len(dims),
        "gate length"
    );
    let g = gate.expand(dims);
    assert_gates_valid(&g);
    let (kd, vd) = (dims.k, dims.v);
    let mut o = vec![0.0; dims.v_len()];
    // With t == 1, row (b, h) of q/k/g is at (b*H + h)*K and of v/o at (b*H + h)*V, and state
    // (b, h) at (b*H + h)*K*V: one index `bh` serves all of them.
    for bh in 0..dims.b * dims.h {
        let s = &mut state[bh * kd * vd..(bh + 1) * kd * vd];
        let (qr, kr, gr) = (
            &q[bh * kd..(bh + 1) * kd],
            &k[bh * kd..(bh + 1) * kd],
            &g[bh * kd..(bh + 1) * kd],
        );
        let vr = &v[bh * vd..(bh + 1) * vd];
        for c in 0..kd {
            let decay = gr[c].exp();
            for w in 0..vd {
                s[c * vd + w] = decay * s[c * vd + w] + kr[c] * vr[w];
            }
        }
        row_times_mat(&mut o[bh * vd..(bh + 1) * vd], scale, qr, &*s);
    }
    o
}

/// One independent (sequence, head) slice of a [`Problem`]: `L` tokens of one head, gathered into
/// contiguous row-major matrices. Every form is written for this; [`forward`] and [`backward`]
/// gather, run the form, and scatter. Token 0 here is the sequence's (segment's) first token.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadProblem {
    /// Number of tokens `L` (0 for an empty segment).
    pub len: usize,
    /// Key width `K`.
    pub key_dim: usize,
    /// Value width `W` (`V`, or `V + 1` for the ones-column trick).
    pub value_dim: usize,
    /// `[L, K]`.
    pub q: Vec<f64>,
    /// `[L, K]`.
    pub k: Vec<f64>,
    /// `[L, W]`.
    pub v: Vec<f64>,
    /// Expanded forward gate `[L, K]` (below the diagonal; the causal gate).
    pub g: Vec<f64>,
    /// Expanded backward-direction gate `[L, K]` (above the diagonal); only read when
    /// bidirectional. Equal to `g` when the problem has no separate `gate_bwd`.
    pub gb: Vec<f64>,
    pub direction: Direction,
    pub scale: f64,
    /// `Some(eps)`: `o_i = sum_j A_ij v_j / (sum_j A_ij + eps)`.
    pub normalize: Option<f64>,
    /// Initial state `[K, W]` (causal, unnormalised only).
    pub h0: Option<Vec<f64>>,
}

/// Result of one form on a [`HeadProblem`].
#[derive(Clone, Debug, PartialEq)]
pub struct HeadOutput {
    /// `[L, W]`.
    pub o: Vec<f64>,
    /// `[K, W]`, when [`HeadProblem::has_final_state`].
    pub ht: Option<Vec<f64>>,
}

/// Gradients of one form on a [`HeadProblem`], w.r.t. the expanded gates.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadGrads {
    /// `[L, K]`.
    pub dq: Vec<f64>,
    /// `[L, K]`.
    pub dk: Vec<f64>,
    /// `[L, W]`.
    pub dv: Vec<f64>,
    /// `[L, K]`, gradient w.r.t. `g`.
    pub dg: Vec<f64>,
    /// `[L, K]`, gradient w.r.t. `gb` (zero for causal problems).
    pub dgb: Vec<f64>,
    /// `[K, W]`, when `h0` was given.
    pub dh0: Option<Vec<f64>>,
}

impl HeadProblem {
    /// Whether the final state is an output: causal without normalisation.
    pub fn has_final_state(&self) -> bool {
        self.direction == Direction::Causal && self.normalize.is_none()
    }

    /// The unnormalised problem on `[v | 1]` (`W + 1` columns). Its output's last column is the
    /// row sum `sum_j A_ij` (the normaliser), the other columns `sum_j A_ij v_j`.
    pub fn with_ones_column(&self) -> HeadProblem {
        assert!(self.h0.is_none(), "normalisation has no initial state");
        let w = self.value_dim;
        let mut v = Vec::with_capacity(self.len * (w + 1));
        for i in 0..self.len {
            v.extend_from_slice(row(&self.v, i, w));
            v.push(1.0);
        }
        HeadProblem {
            value_dim: w + 1,
            v,
            normalize: None,
            ..self.clone()
        }
    }

    pub(crate) fn zero_grads(&self) -> HeadGrads {
        let (l, kd, w) = (self.len, self.key_dim, self.value_dim);
        HeadGrads {
            dq: vec![0.0; l * kd],
            dk: vec![0.0; l * kd],
            dv: vec![0.0; l * w],
            dg: vec![0.0; l * kd],
            dgb: vec![0.0; l * kd],
            dh0: self.h0.as_ref().map(|h0| vec![0.0; h0.len()]),
        }
    }
}

/// Normalised forward through an unnormalised engine `unnormalized` (a form's forward for
/// problems without `normalize`): run it on `[v | 1]`, then `o = num / (den + eps)`.
pub fn normalized_forward(
    hp: &HeadProblem,
    eps: f64,
    unnormalized: impl Fn(&HeadProblem) -> HeadOutput,
) -> HeadOutput {
    let w = hp.value_dim;
    let u = unnormalized(&hp.with_ones_column()).o;
    let mut o = vec![0.0; hp.len * w];
    for i in 0..hp.len {
        let u_row = row(&u, i, w + 1);
        let den = u_row[w] + eps;
        for (ov, uv) in row_mut(&mut o, i, w).iter_mut().zip(&u_row[..w]) {
            *ov = uv / den;
        }
    }
    HeadOutput { o, ht: None }
}

/// Normalised backward through an unnormalised engine (its forward and backward). With
/// `u = [num | den]` the engine's output on `[v | 1]` and `o = num / (den + eps)`:
/// `d num = do / (den + eps)`, `d den = -(do . o) / (den + eps)`; the engine's backward turns
/// `du` into gradients, and the ones column's `dv` is dropped (it is a constant).
pub fn normalized_backward(
    hp: &HeadProblem,
    eps: f64,
    d_o: &[f64],
    unnormalized: impl Fn(&HeadProblem) -> HeadOutput,
    unnormalized_backward: impl Fn(&HeadProblem, &[f64]) -> HeadGrads,
) -> HeadGrads {
    let w = hp.value_dim;
    let aug = hp.with_ones_column();
    let u = unnormalized(&aug).o;
    let mut du = vec![0.0; hp.len * (w + 1)];
    for i in 0..hp.len {
        let u_row = &u[i * (w + 1)..(i + 1) * (w + 1)];
        let do_row = &d_o[i * w..(i + 1) * w];
        let den = u_row[w] + eps;
        let mut do_dot_o = 0.0;
        for c in 0..w {
            du[i * (w + 1) + c] = do_row[c] / den;
            do_dot_o += do_row[c] * u_row[c] / den;
        }
        du[i * (w + 1) + w] = -do_dot_o / den;
    }
    let mut grads = unnormalized_backward(&aug, &du);
    grads.dv = (0..hp.len)
        .flat_map(|i| row(&grads.dv, i, w + 1)[..w].to_vec())
        .collect();
    grads
}

/// Asserts the preconditions of [`Problem`] (the reference is an oracle: misuse panics).
fn validate(p: &Problem, form: Form) {
    let d = &p.dims;
    assert_eq!(p.q.len(), d.qk_len(), "q must be [B, T, H, K]");
    assert_eq!(p.k.len(), d.qk_len(), "k must be [B, T, H, K]");
    assert_eq!(p.v.len(), d.v_len(), "v must be [B, T, H, V]");
    let gate_len = |g: &Gate| g.data().map_or(0, <[f64]>::len);
    assert_eq!(gate_len(&p.gate), p.gate.kind().len(d), "gate length");
    if let Some(gb) = &p.gate_bwd {
        assert_eq!(
            p.direction,
            Direction::Bidirectional,
            "gate_bwd needs bidirectional"
        );
        assert_eq!(
            gb.kind(),
            p.gate.kind(),
            "gate_bwd must have the gate's kind"
        );
        assert_eq!(gate_len(gb), gb.kind().len(d), "gate_bwd length");
    }
    for g in [Some(&p.gate), p.gate_bwd.as_ref()].into_iter().flatten() {
        assert_gates_valid(g.data().unwrap_or(&[]));
    }
    if let Some(cu) = p.cu_seqlens {
        assert_eq!(d.b, 1, "cu_seqlens needs b == 1");
        assert!(cu.len() >= 2, "cu_seqlens needs at least one segment");
        assert_eq!(cu[0], 0, "cu_seqlens must start at 0");
        assert_eq!(*cu.last().unwrap(), d.t, "cu_seqlens must end at T");
        assert!(
            cu.windows(2).all(|w| w[0] <= w[1]),
            "cu_seqlens must not decrease"
        );
    }
    if let Some(h0) = p.h0 {
        assert_eq!(
            p.direction,
            Direction::Causal,
            "h0 only for causal problems"
        );
        assert!(p.normalize.is_none(), "h0 not with normalize");
        assert_eq!(
            h0.len(),
            p.num_sequences() * d.state_len(),
            "h0 must be [N, H, K, V]"
        );
    }
    if let Some(eps) = p.normalize {
        assert!(eps.is_finite() && eps >= 0.0, "eps must be finite and >= 0");
    }
    assert!(p.scale.is_finite(), "scale must be finite");
    if let Form::Chunkwise { chunk } = form {
        assert!(chunk >= 1, "chunk must be >= 1");
    }
}

fn assert_gates_valid(g: &[f64]) {
    assert!(
        g.iter().all(|&x| x <= 0.0 && x.is_finite()),
        "gates must be finite natural-log decays <= 0"
    );
}

/// Gathering/scattering between the packed `[B, T, H, D]` tensors and per-head slices.
struct Split {
    sequences: Vec<(usize, usize, usize)>,
    dims: Dims,
    g: Vec<f64>,
    gb: Option<Vec<f64>>,
}

impl Split {
    fn new(p: &Problem) -> Self {
        Split {
            sequences: p.sequences(),
            dims: p.dims,
            g: p.gate.expand(&p.dims),
            gb: p.gate_bwd.map(|gb| gb.expand(&p.dims)),
        }
    }

    /// Rows `t0..t1` of head `head` in batch `b` of a `[B, T, H, width]` tensor, as `[L, width]`.
    fn gather_rows(
        &self,
        x: &[f64],
        b: usize,
        t0: usize,
        t1: usize,
        head: usize,
        width: usize,
    ) -> Vec<f64> {
        let Dims { t, h, .. } = self.dims;
        let mut out = Vec::with_capacity((t1 - t0) * width);
        for tt in t0..t1 {
            let at = ((b * t + tt) * h + head) * width;
            out.extend_from_slice(&x[at..at + width]);
        }
        out
    }

    /// Inverse of [`Split::gather_rows`] (the slices of different heads/sequences are disjoint).
    #[allow(clippy::too_many_arguments)]
    fn scatter_rows(
        &self,
        x: &mut [f64],
        rows: &[f64],
        b: usize,
        t0: usize,
        t1: usize,
        head: usize,
        width: usize,
    ) {
        let Dims { t, h, .. } = self.dims;
        for (i, tt) in (t0..t1).enumerate() {
            let at = ((b * t + tt) * h + head) * width;
            x[at..at + width].copy_from_slice(&rows[i * width..(i + 1) * width]);
        }
    }

    fn gather(
        &self,
        p: &Problem,
        n: usize,
        b: usize,
        t0: usize,
        t1: usize,
        head: usize,
    ) -> HeadProblem {
        let Dims { h, k, v, .. } = p.dims;
        let g = self.gather_rows(&self.g, b, t0, t1, head, k);
        let gb = match &self.gb {
            Some(gb) => self.gather_rows(gb, b, t0, t1, head, k),
            None => g.clone(),
        };
        let state_at = (n * h + head) * k * v;
        HeadProblem {
            len: t1 - t0,
            key_dim: k,
            value_dim: v,
            q: self.gather_rows(p.q, b, t0, t1, head, k),
            k: self.gather_rows(p.k, b, t0, t1, head, k),
            v: self.gather_rows(p.v, b, t0, t1, head, v),
            g,
            gb,
            direction: p.direction,
            scale: p.scale,
            normalize: p.normalize,
            h0: p.h0.map(|h0| h0[state_at..state_at + k * v].to_vec()),
        }
    }
}

// Small dense helpers on row-major matrices. `m` is `[C, W]` with `W = y.len()` or `out.len()`.

/// `out[w] += alpha * sum_c x[c] * m[c, w]` (row vector times matrix).
pub(crate) fn row_times_mat(out: &mut [f64], alpha: f64, x: &[f64], m: &[f64]) {
    let w = out.len();
    for (c, &xc) in x.iter().enumerate() {
        let a = alpha * xc;
        for (o, &mv) in out.iter_mut().zip(&m[c * w..(c + 1) * w]) {
            *o += a * mv;
        }
    }
}

/// `out[c] += alpha * sum_w m[c, w] * y[w]` (matrix times column vector).
pub(crate) fn mat_times_col(out: &mut [f64], alpha: f64, m: &[f64], y: &[f64]) {
    let w = y.len();
    for (c, o) in out.iter_mut().enumerate() {
        *o += alpha * dot(&m[c * w..(c + 1) * w], y);
    }
}

/// `m[c, w] += alpha * x[c] * y[w]` (rank-one update).
pub(crate) fn add_outer(m: &mut [f64], alpha: f64, x: &[f64], y: &[f64]) {
    let w = y.len();
    for (c, &xc) in x.iter().enumerate() {
        let a = alpha * xc;
        for (mv, &yv) in m[c * w..(c + 1) * w].iter_mut().zip(y) {
            *mv += a * yv;
        }
    }
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Row `i` of a row-major matrix of width `width`.
pub(crate) fn row(x: &[f64], i: usize, width: usize) -> &[f64] {
    &x[i * width..(i + 1) * width]
}

pub(crate) fn row_mut(x: &mut [f64], i: usize, width: usize) -> &mut [f64] {
    &mut x[i * width..(i + 1) * width]
}
