//! LightNet's additive recurrence (ops.md section 2) as a gate transform onto the engine, its
//! non-causal form, and MD-LRPE.
//!
//! Causal LightNet, per sequence, head and key channel `c` (`k` = key logits):
//! ```text
//! z_t      = log(exp(z0) + sum_{s<=t} exp(k_s))        (the exp(z0) term only with an initial z)
//! S_t[c,:] = sum_{s<=t} exp(k_sc - z_tc) v_s + exp(z0_c - z_tc) S0[c,:]
//! o_t      = scale * sum_c q_tc S_t[c,:]
//! ```
//! `S_t[c,:]` is a prefix-softmax-weighted mean of the values (and of the carried state), so it
//! stays bounded. The same function as the engine's causal GLA on `khat = exp(k - z)` with the
//! vector gate `g_t = z_{t-1} - z_t` ([`additive_gate`]), since `exp(g_t) S_{t-1} + khat_t v_t`
//! rescales the previous weights from `exp(-z_{t-1})` to `exp(-z_t)`.
//!
//! Non-causal: `o_t = scale * sum_c q_tc sum_s softmax_s(k_{.c})_s v_s`, the softmax over the whole
//! sequence per key channel (`S_T` of the causal form, used by every token).
//!
//! The forms are computed here independently of the engine in [`crate::linear`]: [`Form::Parallel`]
//! sums the definition above directly (`O(T^2)`), [`Form::Recurrent`] scans the additive gate,
//! [`Form::Chunkwise`] carries `(S, z)` between chunks and sums the definition inside each chunk.

use crate::linear::{Dims, Form};

/// Recurrent state of causal LightNet: the engine state and the running log-normaliser.
#[derive(Clone, Debug, PartialEq)]
pub struct LightNetState {
    /// `[N, H, K, V]`.
    pub s: Vec<f64>,
    /// `z = logcumsumexp(k)` at the last token, `[N, H, K]`.
    pub z: Vec<f64>,
}

/// The additive transform of the key logits: `khat = exp(k - z)`, `g_t = z_{t-1} - z_t`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdditiveGate {
    /// `[B, T, H, K]`.
    pub khat: Vec<f64>,
    /// `[B, T, H, K]`, all `<= 0`. At the first token of a sequence without an initial `z`, 0.
    pub g: Vec<f64>,
    /// `z` at the last token of each sequence, `[N, H, K]` (`-inf` for an empty sequence without `z0`).
    pub z_final: Vec<f64>,
}

/// One LightNet problem. `k` holds the key logits (also the decay logits).
#[derive(Clone, Copy, Debug)]
pub struct LightNetProblem<'a> {
    pub dims: Dims,
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub scale: f64,
    /// `false`: causal (additive recurrence); `true`: the non-causal form (softmax over the whole sequence).
    pub bidirectional: bool,
    /// Initial state (causal only).
    pub initial_state: Option<&'a LightNetState>,
    pub cu_seqlens: Option<&'a [usize]>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LightNetOutput {
    pub o: Vec<f64>,
    /// Final `(S, z)` (causal only).
    pub state: Option<LightNetState>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LightNetGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// `log(exp(a) + exp(b))` for `a` finite or `-inf` and `b` finite, without overflow.
fn logaddexp(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    let m = a.max(b);
    m + (-(a - b).abs()).exp().ln_1p()
}

/// `log(1 + exp(x))` without overflow.
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `log sum exp` of `xs` (`-inf` entries allowed; `-inf` for an empty or all `-inf` input).
fn logsumexp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// `(first token, end token)` of each independent sequence and the batch row it lives in.
fn sequences(dims: &Dims, cu_seqlens: Option<&[usize]>) -> Vec<(usize, usize, usize)> {
    match cu_seqlens {
        Some(cu) => {
            assert_eq!(dims.b, 1, "cu_seqlens requires b == 1");
            assert!(!cu.is_empty() && cu[0] == 0, "cu_seqlens must start at 0");
            assert!(
                cu.windows(2).all(|w| w[0] <= w[1]),
                "cu_seqlens must be non-decreasing"
            );
            assert_eq!(*cu.last().unwrap(), dims.t, "cu_seqlens must end at t");
            cu.windows(2).map(|w| (0, w[0], w[1])).collect()
        }
        None => (0..dims.b).map(|b| (b, 0, dims.t)).collect(),
    }
}

/// Index of `(b, t, h, 0)` in a `[B, T, H, width]` tensor.
fn at(dims: &Dims, b: usize, t: usize, h: usize, width: usize) -> usize {
    ((b * dims.t + t) * dims.h + h) * width
}

/// The additive transform of the key logits (ops.md section 2), per sequence, head and channel:
/// `z_t = logaddexp(z_{t-1}, k_t)` (starting from `z0` when given), `khat_t = exp(k_t - z_t)`,
/// `g_t = z_{t-1} - z_t`, computed as `-softplus(k_t - z_{t-1})` (never a difference of infinities).
/// At the first token of a sequence without `z0` (or with `z0 = -inf`, an empty prefix whose
/// state is zero) the previous state is empty, `z_0 = k_0`, `khat_0 = 1` and `g_0 = 0`.
/// `z0` is `[N, H, K]`.
pub fn additive_gate(
    dims: &Dims,
    k: &[f64],
    cu_seqlens: Option<&[usize]>,
    z0: Option<&[f64]>,
) -> AdditiveGate {
    assert_eq!(k.len(), dims.qk_len(), "k must be [B, T, H, K]");
    assert!(k.iter().all(|x| x.is_finite()), "key logits must be finite");
    let seqs = sequences(dims, cu_seqlens);
    let kd = dims.k;
    if let Some(z0) = z0 {
        assert_eq!(z0.len(), seqs.len() * dims.h * kd, "z0 must be [N, H, K]");
        assert!(
            z0.iter().all(|z| *z < f64::INFINITY && !z.is_nan()),
            "z0 must be < +inf"
        );
    }
    let mut khat = vec![0.0; k.len()];
    let mut g = vec![0.0; k.len()];
    let mut z_final = vec![f64::NEG_INFINITY; seqs.len() * dims.h * kd];
    for (n, &(b, start, end)) in seqs.iter().enumerate() {
        for h in 0..dims.h {
            for c in 0..kd {
                let zi = (n * dims.h + h) * kd + c;
                let mut z = z0.map_or(f64::NEG_INFINITY, |z0| z0[zi]);
                for t in start..end {
                    let idx = at(dims, b, t, h, kd) + c;
                    let kt = k[idx];
                    if z == f64::NEG_INFINITY {
                        z = kt;
                        g[idx] = 0.0;
                    } else {
                        let sp = softplus(kt - z); // z_t - z_{t-1} >= 0
                        g[idx] = -sp;
                        z += sp;
                    }
                    khat[idx] = (kt - z).exp();
                }
                z_final[zi] = z;
            }
        }
    }
    AdditiveGate { khat, g, z_final }
}

/// Adjoint of [`additive_gate`]: the gradient w.r.t. the key logits `k` given the gradients
/// `dkhat` and `dg` of its outputs (`z_final` is taken as not differentiated). A reverse scan per
/// sequence, head and channel of
/// ```text
/// dz_t = -khat_t dkhat_t - dg_t + dg_{t+1} + exp(g_{t+1}) dz_{t+1}
/// dk_t = khat_t (dkhat_t + dz_t)
/// ```
/// from `z_t = logaddexp(z_{t-1}, k_t)` (`dz_t/dk_t = khat_t`, `dz_{t+1}/dz_t = exp(g_{t+1}) <= 1`),
/// `khat_t = exp(k_t - z_t)` and `g_t = z_{t-1} - z_t`. At the first token of a sequence with an
/// empty prefix (no `z0`, or `z0 = -inf`) `z_0 = k_0` and `g_0 = 0` is a constant, so its `-dg_0`
/// term drops out.
pub fn additive_gate_backward(
    dims: &Dims,
    gate: &AdditiveGate,
    dkhat: &[f64],
    dg: &[f64],
    cu_seqlens: Option<&[usize]>,
    z0: Option<&[f64]>,
) -> Vec<f64> {
    let n = dims.qk_len();
    assert!(
        gate.khat.len() == n && gate.g.len() == n && dkhat.len() == n && dg.len() == n,
        "khat, g, dkhat and dg must be [B, T, H, K]"
    );
    let seqs = sequences(dims, cu_seqlens);
    let kd = dims.k;
    let mut dk = vec![0.0; n];
    for (s, &(b, start, end)) in seqs.iter().enumerate() {
        for h in 0..dims.h {
            for c in 0..kd {
                let empty_prefix =
                    z0.is_none_or(|z0| z0[(s * dims.h + h) * kd + c] == f64::NEG_INFINITY);
                let mut carry = 0.0; // dg_{t+1} + exp(g_{t+1}) dz_{t+1}
                for t in (start..end).rev() {
                    let i = at(dims, b, t, h, kd) + c;
                    let own_gate = if t == start && empty_prefix {
                        0.0
                    } else {
                        dg[i]
                    };
                    let dz = -gate.khat[i] * dkhat[i] - own_gate + carry;
                    dk[i] = gate.khat[i] * (dkhat[i] + dz);
                    carry = dg[i] + gate.g[i].exp() * dz;
                }
            }
        }
    }
    dk
}

/// The non-causal key weights: `khat = softmax_t(k)` over each sequence, per head and channel
/// (the maximum subtracted first, so every exponent is `<= 0`).
pub fn softmax_keys(dims: &Dims, k: &[f64], cu_seqlens: Option<&[usize]>) -> Vec<f64> {
    assert_eq!(k.len(), dims.qk_len(), "k must be [B, T, H, K]");
    let mut khat = vec![0.0; k.len()];
    for (b, start, end) in sequences(dims, cu_seqlens) {
        for h in 0..dims.h {
            for c in 0..dims.k {
                let idx = |t| at(dims, b, t, h, dims.k) + c;
                let m = (start..end)
                    .map(|t| k[idx(t)])
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = (start..end).map(|t| (k[idx(t)] - m).exp()).sum();
                for t in start..end {
                    khat[idx(t)] = (k[idx(t)] - m).exp() / sum;
                }
            }
        }
    }
    khat
}

/// Adjoint of [`softmax_keys`]: `dk_u = khat_u (dkhat_u - sum_t khat_t dkhat_t)` per sequence,
/// head and channel.
pub fn softmax_keys_backward(
    dims: &Dims,
    khat: &[f64],
    dkhat: &[f64],
    cu_seqlens: Option<&[usize]>,
) -> Vec<f64> {
    assert_eq!(khat.len(), dims.qk_len(), "khat must be [B, T, H, K]");
    assert_eq!(dkhat.len(), dims.qk_len(), "dkhat must be [B, T, H, K]");
    let mut dk = vec![0.0; khat.len()];
    for (b, start, end) in sequences(dims, cu_seqlens) {
        for h in 0..dims.h {
            for c in 0..dims.k {
                let idx = |t| at(dims, b, t, h, dims.k) + c;
                let mean: f64 = (start..end).map(|t| khat[idx(t)] * dkhat[idx(t)]).sum();
                for t in start..end {
                    dk[idx(t)] = khat[idx(t)] * (dkhat[idx(t)] - mean);
                }
            }
        }
    }
    dk
}

impl LightNetProblem<'_> {
    fn check(&self) -> Vec<(usize, usize, usize)> {
        let d = &self.dims;
        assert_eq!(self.q.len(), d.qk_len(), "q must be [B, T, H, K]");
        assert_eq!(self.k.len(), d.qk_len(), "k must be [B, T, H, K]");
        assert_eq!(self.v.len(), d.v_len(), "v must be [B, T, H, V]");
        assert!(
            self.k.iter().all(|x| x.is_finite()),
            "key logits must be finite"
        );
        let seqs = sequences(d, self.cu_seqlens);
        if let Some(st) = self.initial_state {
            assert!(
                !self.bidirectional,
                "an initial state needs the causal form"
            );
            assert_eq!(
                st.s.len(),
                seqs.len() * d.state_len(),
                "initial S must be [N, H, K, V]"
            );
            assert_eq!(
                st.z.len(),
                seqs.len() * d.h * d.k,
                "initial z must be [N, H, K]"
            );
            // z = -inf is an empty prefix: its S row must be 0 (the additive gate then uses g = 0
            // at the first token, which would otherwise keep a stray S0 that exp(z0 - z) kills).
            for (i, z) in st.z.iter().enumerate() {
                assert!(
                    !z.is_nan() && *z < f64::INFINITY,
                    "initial z must be < +inf"
                );
                if *z == f64::NEG_INFINITY {
                    assert!(
                        st.s[i * d.v..(i + 1) * d.v].iter().all(|&x| x == 0.0),
                        "initial z = -inf (empty prefix) needs a zero S row"
                    );
                }
            }
        }
        seqs
    }

    /// Initial `(S0[c, :], z0_c)` of sequence `n`, head `h`, channel `c` (zeros and `-inf` without
    /// an initial state).
    fn initial(&self, n: usize, h: usize, c: usize) -> (Vec<f64>, f64) {
        let d = &self.dims;
        match self.initial_state {
            Some(st) => {
                let off = ((n * d.h + h) * d.k + c) * d.v;
                (st.s[off..off + d.v].to_vec(), st.z[(n * d.h + h) * d.k + c])
            }
            None => (vec![0.0; d.v], f64::NEG_INFINITY),
        }
    }
}

/// Causal quantities of one sequence, head and channel from the definition: `z_t` (direct
/// log-sum-exp over `z0` and `k_0..k_t`) and `S_t[c, :]` for every token, `t` relative to the
/// sequence start.
struct ChannelDefinition {
    z: Vec<f64>,
    s: Vec<Vec<f64>>,
}

fn channel_definition(
    p: &LightNetProblem,
    n: usize,
    b: usize,
    start: usize,
    end: usize,
    h: usize,
    c: usize,
) -> ChannelDefinition {
    let d = &p.dims;
    let (s0, z0) = p.initial(n, h, c);
    let kc = |t: usize| p.k[at(d, b, t, h, d.k) + c];
    let mut z = Vec::with_capacity(end - start);
    let mut s = Vec::with_capacity(end - start);
    for t in start..end {
        let zt = logsumexp(std::iter::once(z0).chain((start..=t).map(kc)));
        let mut st = vec![0.0; d.v];
        // exp(z0 - z_t) = 0 when z0 = -inf (z_t is finite: it includes k_start)
        let w0 = (z0 - zt).exp();
        for (x, s0x) in st.iter_mut().zip(&s0) {
            *x = w0 * s0x;
        }
        for u in start..=t {
            let w = (kc(u) - zt).exp();
            let vo = at(d, b, u, h, d.v);
            for (x, vx) in st.iter_mut().zip(&p.v[vo..vo + d.v]) {
                *x += w * vx;
            }
        }
        z.push(zt);
        s.push(st);
    }
    ChannelDefinition { z, s }
}

/// Per sequence, head and channel: the softmax weights of the whole sequence and `S[c, :]`.
fn bidirectional_channel(
    p: &LightNetProblem,
    b: usize,
    start: usize,
    end: usize,
    h: usize,
    c: usize,
) -> (Vec<f64>, Vec<f64>) {
    let d = &p.dims;
    let kc = |t: usize| p.k[at(d, b, t, h, d.k) + c];
    let zz = logsumexp((start..end).map(kc));
    let w: Vec<f64> = (start..end).map(|t| (kc(t) - zz).exp()).collect();
    let mut s = vec![0.0; d.v];
    for (u, wu) in (start..end).zip(&w) {
        let vo = at(d, b, u, h, d.v);
        for (x, vx) in s.iter_mut().zip(&p.v[vo..vo + d.v]) {
            *x += wu * vx;
        }
    }
    (w, s)
}

/// Forward pass. Causal: `o` and the final `(S, z)` per sequence (the initial state, or zeros and
/// `-inf`, for an empty sequence). Non-causal: `o` only; `form` does not matter there (one formula).
pub fn forward(p: &LightNetProblem, form: Form) -> LightNetOutput {
    let seqs = p.check();
    let d = p.dims;
    let mut o = vec![0.0; d.v_len()];
    if p.bidirectional {
        for &(b, start, end) in &seqs {
            for h in 0..d.h {
                for c in 0..d.k {
                    let (_, s) = bidirectional_channel(p, b, start, end, h, c);
                    for t in start..end {
                        let qc = p.scale * p.q[at(&d, b, t, h, d.k) + c];
                        let oo = at(&d, b, t, h, d.v);
                        for (x, sx) in o[oo..oo + d.v].iter_mut().zip(&s) {
                            *x += qc * sx;
                        }
                    }
                }
            }
        }
        return LightNetOutput { o, state: None };
    }
    let mut state = LightNetState {
        s: vec![0.0; seqs.len() * d.state_len()],
        z: vec![f64::NEG_INFINITY; seqs.len() * d.h * d.k],
    };
    match form {
        Form::Parallel => causal_parallel(p, &seqs, &mut o, &mut state),
        Form::Recurrent => causal_recurrent(p, &seqs, &mut o, &mut state),
        Form::Chunkwise { chunk } => causal_chunkwise(p, &seqs, chunk, &mut o, &mut state),
    }
    LightNetOutput {
        o,
        state: Some(state),
    }
}

fn causal_parallel(
    p: &LightNetProblem,
    seqs: &[(usize, usize, usize)],
    o: &mut [f64],
    state: &mut LightNetState,
) {
    let d = p.dims;
    for (n, &(b, start, end)) in seqs.iter().enumerate() {
        for h in 0..d.h {
            for c in 0..d.k {
                let def = channel_definition(p, n, b, start, end, h, c);
                for t in start..end {
                    let qc = p.scale * p.q[at(&d, b, t, h, d.k) + c];
                    let oo = at(&d, b, t, h, d.v);
                    for (x, sx) in o[oo..oo + d.v].iter_mut().zip(&def.s[t - start]) {
                        *x += qc * sx;
                    }
                }
                let (s0, z0) = p.initial(n, h, c);
                let (s_last, z_last) = match def.z.last() {
                    Some(&z) => (def.s.last().unwrap().clone(), z),
                    None => (s0, z0),
                };
                let so = ((n * d.h + h) * d.k + c) * d.v;
                state.s[so..so + d.v].copy_from_slice(&s_last);
                state.z[(n * d.h + h) * d.k + c] = z_last;
            }
        }
    }
}

/// The scan `S_t = diag(exp g_t) S_{t-1} + khat_t^T v_t` on the additive gate.
fn causal_recurrent(
    p: &LightNetProblem,
    seqs: &[(usize, usize, usize)],
    o: &mut [f64],
    state: &mut LightNetState,
) {
    let d = p.dims;
    let gate = additive_gate(
        &d,
        p.k,
        p.cu_seqlens,
        p.initial_state.map(|st| st.z.as_slice()),
    );
    for (n, &(b, start, end)) in seqs.iter().enumerate() {
        for h in 0..d.h {
            let mut s = vec![0.0; d.k * d.v];
            if let Some(st) = p.initial_state {
                let off = (n * d.h + h) * d.k * d.v;
                s.copy_from_slice(&st.s[off..off + d.k * d.v]);
            }
            for t in start..end {
                let qk = at(&d, b, t, h, d.k);
                let vo = at(&d, b, t, h, d.v);
                for c in 0..d.k {
                    let decay = gate.g[qk + c].exp();
                    let kh = gate.khat[qk + c];
                    for x in 0..d.v {
                        s[c * d.v + x] = decay * s[c * d.v + x] + kh * p.v[vo + x];
                    }
                }
                for c in 0..d.k {
                    let qc = p.scale * p.q[qk + c];
                    for x in 0..d.v {
                        o[vo + x] += qc * s[c * d.v + x];
                    }
                }
            }
            let off = (n * d.h + h) * d.k * d.v;
            state.s[off..off + d.k * d.v].copy_from_slice(&s);
            let zo = (n * d.h + h) * d.k;
            state.z[zo..zo + d.k].copy_from_slice(&gate.z_final[zo..zo + d.k]);
        }
    }
}

/// Chunks of `chunk` tokens: the carried `(S, z)` enters token `t` of a chunk with weight
/// `exp(z_start - z_t)`, the chunk's own tokens `u <= t` with `exp(k_u - z_t)`, where
/// `z_t = logaddexp(z_start, logsumexp(k_{c0..=t}))`.
fn causal_chunkwise(
    p: &LightNetProblem,
    seqs: &[(usize, usize, usize)],
    chunk: usize,
    o: &mut [f64],
    state: &mut LightNetState,
) {
    assert!(chunk >= 1, "chunk must be >= 1");
    let d = p.dims;
    for (n, &(b, start, end)) in seqs.iter().enumerate() {
        for h in 0..d.h {
            for c in 0..d.k {
                let kc = |t: usize| p.k[at(&d, b, t, h, d.k) + c];
                let (mut s_carry, mut z_carry) = p.initial(n, h, c);
                let mut c0 = start;
                while c0 < end {
                    let c1 = (c0 + chunk).min(end);
                    let mut s_t = s_carry.clone();
                    let mut z_t = z_carry;
                    for t in c0..c1 {
                        let lse_chunk = logsumexp((c0..=t).map(kc));
                        z_t = logaddexp(z_carry, lse_chunk);
                        let w0 = (z_carry - z_t).exp();
                        s_t = s_carry.iter().map(|x| w0 * x).collect();
                        for u in c0..=t {
                            let w = (kc(u) - z_t).exp();
                            let vo = at(&d, b, u, h, d.v);
                            for (x, vx) in s_t.iter_mut().zip(&p.v[vo..vo + d.v]) {
                                *x += w * vx;
                            }
                        }
                        let qc = p.scale * p.q[at(&d, b, t, h, d.k) + c];
                        let oo = at(&d, b, t, h, d.v);
                        for (x, sx) in o[oo..oo + d.v].iter_mut().zip(&s_t) {
                            *x += qc * sx;
                        }
                    }
                    s_carry = s_t;
                    z_carry = z_t;
                    c0 = c1;
                }
                let so = ((n * d.h + h) * d.k + c) * d.v;
                state.s[so..so + d.v].copy_from_slice(&s_carry);
                state.z[(n * d.h + h) * d.k + c] = z_carry;
            }
        }
    }
}

/// Analytic gradients of `loss = sum(o * d_o)` w.r.t. `q`, `k`, `v` (the initial state, if any,
/// is a constant). Derived from the definition (module doc), per sequence, head and channel `c`,
/// with `w_tu = exp(k_uc - z_tc)` (`u <= t`) and `dz_tc / dk_uc = w_tu`, so
/// `dS_t[c,:] / dk_uc = w_tu (v_u - S_t[c,:])`:
/// ```text
/// dq_tc = scale * d_o_t . S_t[c,:]
/// dv_u  = sum_c sum_{t>=u} w_tu * scale * q_tc * d_o_t
/// dk_uc = sum_{t>=u} w_tu * scale * q_tc * (d_o_t . v_u - d_o_t . S_t[c,:])
/// ```
/// Non-causal: the same with `S = S_T` and `w_u = softmax_u(k_{.c})` for every `t`.
/// Every form computes the same function, so `form` does not change the result.
pub fn backward(p: &LightNetProblem, form: Form, d_o: &[f64]) -> LightNetGrads {
    let _ = form;
    let seqs = p.check();
    let d = p.dims;
    assert_eq!(d_o.len(), d.v_len(), "d_o must be [B, T, H, V]");
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut dq = vec![0.0; d.qk_len()];
    let mut dk = vec![0.0; d.qk_len()];
    let mut dv = vec![0.0; d.v_len()];
    for (n, &(b, start, end)) in seqs.iter().enumerate() {
        for h in 0..d.h {
            for c in 0..d.k {
                let kc = |t: usize| p.k[at(&d, b, t, h, d.k) + c];
                let do_at = |t: usize| {
                    let oo = at(&d, b, t, h, d.v);
                    &d_o[oo..oo + d.v]
                };
                let v_at = |t: usize| {
                    let vo = at(&d, b, t, h, d.v);
                    &p.v[vo..vo + d.v]
                };
                if p.bidirectional {
                    let (w, s) = bidirectional_channel(p, b, start, end, h, c);
                    // dS[c,:] = scale * sum_t q_tc d_o_t
                    let mut ds = vec![0.0; d.v];
                    for t in start..end {
                        let qc = p.scale * p.q[at(&d, b, t, h, d.k) + c];
                        dq[at(&d, b, t, h, d.k) + c] = p.scale * dot(do_at(t), &s);
                        for (x, dox) in ds.iter_mut().zip(do_at(t)) {
                            *x += qc * dox;
                        }
                    }
                    let ds_s = dot(&ds, &s);
                    for (u, wu) in (start..end).zip(&w) {
                        dk[at(&d, b, u, h, d.k) + c] = wu * (dot(&ds, v_at(u)) - ds_s);
                        let vo = at(&d, b, u, h, d.v);
                        for (x, dsx) in dv[vo..vo + d.v].iter_mut().zip(&ds) {
                            *x += wu * dsx;
                        }
                    }
                    continue;
                }
                let def = channel_definition(p, n, b, start, end, h, c);
                // d_o_t . S_t[c,:] for every t
                let do_s: Vec<f64> = (start..end)
                    .map(|t| dot(do_at(t), &def.s[t - start]))
                    .collect();
                for t in start..end {
                    dq[at(&d, b, t, h, d.k) + c] = p.scale * do_s[t - start];
                }
                for u in start..end {
                    let mut dk_u = 0.0;
                    let vo = at(&d, b, u, h, d.v);
                    for t in u..end {
                        let w = (kc(u) - def.z[t - start]).exp();
                        let qc = p.scale * p.q[at(&d, b, t, h, d.k) + c];
                        dk_u += w * qc * (dot(do_at(t), v_at(u)) - do_s[t - start]);
                        for (x, dox) in dv[vo..vo + d.v].iter_mut().zip(do_at(t)) {
                            *x += w * qc * dox;
                        }
                    }
                    dk[at(&d, b, u, h, d.k) + c] = dk_u;
                }
            }
        }
    }
    LightNetGrads { dq, dk, dv }
}

/// MD-LRPE (ops.md section 2): `x` is `[rows, d]`, `positions` `[rows, n]` (the grid position
/// `(s_1..s_n)` of each row's token), `theta` `[m]` with `n * m >= d`. For row `r`,
/// `Theta = concat(s_1 theta, ..., s_n theta)[:d]` (entry `c` is `s_{c / m} * theta[c % m]`) and the
/// output row is `[x * cos Theta, x * sin Theta]`, `[rows, 2d]`.
pub fn md_lrpe(
    x: &[f64],
    rows: usize,
    d: usize,
    positions: &[f64],
    n: usize,
    theta: &[f64],
) -> Vec<f64> {
    let angles = md_lrpe_angles(rows, d, positions, n, theta);
    assert_eq!(x.len(), rows * d, "x must be [rows, d]");
    let mut out = vec![0.0; rows * 2 * d];
    for r in 0..rows {
        for c in 0..d {
            let a = angles[r * d + c];
            out[r * 2 * d + c] = x[r * d + c] * a.cos();
            out[r * 2 * d + d + c] = x[r * d + c] * a.sin();
        }
    }
    out
}

/// The adjoint of [`md_lrpe`] (it is linear in `x`): `dx = dy[:, :d] cos Theta + dy[:, d:] sin Theta`.
pub fn md_lrpe_backward(
    dy: &[f64],
    rows: usize,
    d: usize,
    positions: &[f64],
    n: usize,
    theta: &[f64],
) -> Vec<f64> {
    let angles = md_lrpe_angles(rows, d, positions, n, theta);
    assert_eq!(dy.len(), rows * 2 * d, "dy must be [rows, 2d]");
    let mut dx = vec![0.0; rows * d];
    for r in 0..rows {
        for c in 0..d {
            let a = angles[r * d + c];
            dx[r * d + c] = dy[r * 2 * d + c] * a.cos() + dy[r * 2 * d + d + c] * a.sin();
        }
    }
    dx
}

/// `Theta` per row, `[rows, d]`.
fn md_lrpe_angles(rows: usize, d: usize, positions: &[f64], n: usize, theta: &[f64]) -> Vec<f64> {
    let m = theta.len();
    assert_eq!(positions.len(), rows * n, "positions must be [rows, n]");
    assert!(
        n * m >= d,
        "concat(s_1 theta, ..., s_n theta) has n * len(theta) = {} < d = {d} entries",
        n * m
    );
    let mut angles = vec![0.0; rows * d];
    for r in 0..rows {
        for c in 0..d {
            angles[r * d + c] = positions[r * n + c / m] * theta[c % m];
        }
    }
    angles
}
