//! Radial attention masks (Li et al.): the paper rule (Eq. 4 plus the frame-0 sink) and the rule the
//! released code runs for `wan` and `hunyuan`.
//!
//! Token layout (both rules): `frames * tokens_per_frame` video tokens, frame-major (token
//! `i * s + k` is token `k` of frame `i`, `s = tokens_per_frame`), followed by `text_tokens` text
//! tokens. Text tokens are dense: every text query sees every key and every query sees every text key.
//! The block mask is on the grid `ceil(n / block) x ceil(n / block)` with `n` the total token count
//! (the last block possibly partial), square blocks of `block_size`.
//!
//! # Paper rule ([`RadialModel::Paper`])
//! ops.md section 3 / Eq. 4 of the paper: for query frame `i`, key frame `j`, `d = |i - j|`,
//! `r = floor(log2(max(d, 1)))`, token `k` of frame `i` may see token `l` of frame `j` iff
//! `2^r <= s and |k - l| + 1 <= s / 2^r`, or `d mod ceil(2^r / s) == 0 and k == l`, or `j == 0`
//! (the attention sink: every query sees all of frame 0). [`paper_token_allowed`] is this predicate.
//! A block is allowed iff **any** token pair in it is allowed (the block mask never drops a token
//! pair the rule allows; it may add some). `decay_factor` is not used by this rule.
//!
//! # Released-code rule ([`RadialModel::Wan`], [`RadialModel::Hunyuan`])
//! Matched against `radial_attn/attn_mask.py` of the public repository `mit-han-lab/radial-attention`
//! (latest commit of the stored history, `72788d4`, "minor: unified arg name"), functions
//! `get_window_width`, `get_diagonal_split_mask`, `shrinkMaskStrict`, `gen_log_mask_shrinked` and
//! `MaskMap.queryLogMask` (which the models call through `RadialAttention` in
//! `radial_attn/models/{wan,hunyuan}/attention.py`, with `block_size=128`, `model_type="wan"` or
//! `"hunyuan"`, the query holding the video tokens, followed by the text tokens for hunyuan).
//! Reimplemented here, not translated line by line; what the code does:
//!
//! 1. Per frame pair `(i, j)`, `d = |i - j|`, an `s x s` token mask `local`:
//!    - `wan` and `j == 0`: all ones (attention sink; no split rule). `hunyuan` has no sink (an
//!      older version of the file gave the sink to every model; the stored latest restricts it to
//!      `wan`).
//!    - otherwise `|col - row| <= w && split`, with the window `w` of `get_window_width`:
//!      `s` for `d <= 1` (both models; ops.md: "d <= 1 full"); else
//!      `dl = 2^bitlen(s) / 2^bitlen(d) * decay_factor` (f64) and `w = dl if dl >= block_size else
//!      block_size`; and `split` of `get_diagonal_split_mask`, all-or-nothing per frame pair with a
//!      hard-coded 128 (not the block size): with `e = 2^bitlen(s) / 2^bitlen(d)`, kept iff
//!      `e >= 128` or `d % int(128 / e) == 0`. Note `d == 1` is dropped whenever `s < 128`, and
//!      for `s < 128` every `d >= 1` is dropped (only the sink and the diagonal frames survive).
//!    - The comparison `|col - row| <= w` with a float `w` runs in torch's default dtype f32 (an
//!      int64 tensor against a Python float): replicated as `(x as f32) <= (w as f32)`.
//! 2. `local` is placed in a zero matrix at offset `(i*s mod B, j*s mod B)` (`B` = block size) of
//!    size `(offset + C*B)` per axis, `C = ceil(s / B)`, and shrunk by `shrinkMaskStrict`: it keeps
//!    only the first `C*B` rows *and* columns (the block count comes from the rows: a frame that
//!    straddles `C + 1` blocks loses its tokens in the last one for this pair), then per `B x B` block,
//!    per column, the density `count / B` (rows outside the frame count as zeros); the block is kept
//!    iff `(#columns with density > 1/3) / (#columns with density > 0 + 1e-9) > 0.6`. The torch
//!    code compares in f32; the exact integer forms used here (`3 * count > B`,
//!    `5 * high > 3 * nonzero`) give the same answers (a tie cannot round across the f32 thresholds
//!    for `B < 2^20`). `block_mask[0:0] = True` and `block_mask[-1:-1] = True` are empty slices:
//!    no effect.
//! 3. The `C x C` result is OR-ed into the final `[NB, NB]` mask, `NB = floor(n / B)` (`n` = video +
//!    text tokens, the query length), at block `(floor(i*s / B), floor(j*s / B))`. If that window
//!    runs past `NB`, torch's truncated slice has a different shape and the released code raises:
//!    [`radial_mask`] then returns `Err` (configurations with `s` a multiple of the block size, as in
//!    the released scripts, never do). Exception, replicated: with `C == 1` a window starting at
//!    or past `NB` is an empty slice, which broadcasts against the `1 x 1` result: no error, the
//!    pair is dropped.
//! 4. Rows and columns from the video/text border block `floor(frames*s / B)` on are all ones
//!    (`final_log_mask[video_text_border:] = True`, same for columns), which is also what
//!    `MaskMap.queryLogMask` returns outside its `[:block_bound, :block_bound]` copy.
//!
//! Ambiguities and how they are resolved here:
//! - The released code works on `floor(n / B)` blocks. When `n` is not a multiple of `B`, the mask
//!   returned here has one more (partial) block row and column, made dense like every block from the
//!   border on (the released attention call sends the text part to dense kernels).
//! - `RadialAttention` gives FlashInfer only the `[:floor(frames*s/B)]` square; the video tail of a
//!   partial border block is then up to FlashInfer. Here the border block is dense (step 4).
//! - `text_tokens` is honoured for both models (the mask code does not look at the model type for
//!   text; the released `wan` model itself passes no text through this path).

use crate::block_mask::BlockMask;

/// Which rule builds the mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RadialModel {
    /// Eq. 4 of the paper plus the frame-0 sink, block allowed iff any token pair is allowed.
    Paper,
    /// The released code with `model_type="wan"` (attention sink on frame 0, full window at `d <= 1`).
    Wan,
    /// The released code with `model_type="hunyuan"` (no sink, full window at `d <= 1`).
    Hunyuan,
}

/// One radial mask configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RadialConfig {
    /// Number of (latent) frames `f`.
    pub frames: usize,
    /// Tokens per frame `s`.
    pub tokens_per_frame: usize,
    /// Square block size (the released code uses 128).
    pub block_size: usize,
    /// Window scale of the released rule (`decay_factor`; the released scripts default to 1).
    /// Ignored by [`RadialModel::Paper`].
    pub decay_factor: f64,
    pub model: RadialModel,
    /// Dense text tokens after the video tokens.
    pub text_tokens: usize,
}

impl RadialConfig {
    /// `frames * tokens_per_frame`.
    pub fn video_tokens(&self) -> usize {
        // Saturating: a product past usize is refused by the size check before any use.
        self.frames.saturating_mul(self.tokens_per_frame)
    }

    /// Video plus text tokens: the `T = S` of the attention this mask is for.
    pub fn total_tokens(&self) -> usize {
        self.video_tokens().saturating_add(self.text_tokens)
    }

    fn validate(&self) -> Result<(), String> {
        if self.frames == 0 {
            return Err("radial mask: frames must be >= 1".into());
        }
        if self.tokens_per_frame == 0 {
            return Err("radial mask: tokens_per_frame must be >= 1".into());
        }
        if self.block_size == 0 {
            return Err("radial mask: block_size must be >= 1".into());
        }
        self.check_size()?;
        if self.model != RadialModel::Paper {
            if !self.decay_factor.is_finite() || self.decay_factor < 0.0 {
                return Err(format!(
                    "radial mask: decay_factor must be finite and >= 0, got {}",
                    self.decay_factor
                ));
            }
            // The released window compare runs in f32: token distances must be exact there.
            if self.tokens_per_frame >= 1 << 24 {
                return Err("radial mask: tokens_per_frame must be < 2^24".into());
            }
            if self.block_size >= 1 << 20 {
                return Err("radial mask: block_size must be < 2^20".into());
            }
        }
        Ok(())
    }
}

/// The largest mask [`radial_mask`] builds: `NB x NB` blocks (256 MiB as a dense u8 matrix).
pub const RADIAL_MAX_MASK_BLOCKS: u128 = 1 << 28;

/// The most work [`radial_mask`] does, in block-column visits (a few seconds on one core). The
/// planners loop over frame pairs, so their work is not the mask's size: with
/// `C = ceil(s / block)` blocks per frame, the released rule visits `f^2 C^2 block` columns and the
/// paper rule `f^2 s (1 + C)` blocks. Both are at most `block` visits per mask block once
/// `s >= block`; with few tokens per frame the frame count dominates.
pub const RADIAL_MAX_WORK: u128 = 1 << 31;

impl RadialConfig {
    /// Refuses, before allocating, a configuration whose mask or planning work exceeds
    /// [`RADIAL_MAX_MASK_BLOCKS`] / [`RADIAL_MAX_WORK`], stating the size and the limit (all
    /// arithmetic in u128: no flag product can overflow).
    fn check_size(&self) -> Result<(), String> {
        let (f, s, bs) = (
            self.frames as u128,
            self.tokens_per_frame as u128,
            self.block_size as u128,
        );
        // Every factor is below 2^64, so f * s fits; the squares saturate past u128 (far above
        // either limit).
        let n = (f * s).saturating_add(self.text_tokens as u128);
        let nb = n.div_ceil(bs);
        let blocks = nb.saturating_mul(nb);
        if blocks > RADIAL_MAX_MASK_BLOCKS {
            return Err(format!(
                "radial mask: {} frames x {} tokens per frame + {} text tokens = {n} tokens give a \
                 {nb} x {nb} block mask at block size {} ({blocks} blocks); the limit is {} \
                 blocks (2^28)",
                self.frames,
                self.tokens_per_frame,
                self.text_tokens,
                self.block_size,
                RADIAL_MAX_MASK_BLOCKS
            ));
        }
        let c = s.div_ceil(bs);
        let pairs = f.saturating_mul(f);
        let work = match self.model {
            RadialModel::Paper => pairs.saturating_mul(s).saturating_mul(1 + c),
            RadialModel::Wan | RadialModel::Hunyuan => {
                pairs.saturating_mul(c * c).saturating_mul(bs)
            }
        }
        .saturating_add(blocks);
        if work > RADIAL_MAX_WORK {
            return Err(format!(
                "radial mask: {} frames x {} tokens per frame at block size {} need about {work} \
                 block visits to plan ({pairs} frame pairs); the limit is {} (2^31)",
                self.frames, self.tokens_per_frame, self.block_size, RADIAL_MAX_WORK
            ));
        }
        Ok(())
    }
}

/// Python's `int.bit_length()`: 0 for 0, else `floor(log2(x)) + 1`.
fn bit_length(x: usize) -> u32 {
    usize::BITS - x.leading_zeros()
}

/// The paper predicate (Eq. 4 plus the frame-0 sink), literally: query token `q`, key token `k`
/// (global indices over `cfg.total_tokens()`); text tokens are dense.
pub fn paper_token_allowed(cfg: &RadialConfig, q: usize, k: usize) -> bool {
    let s = cfg.tokens_per_frame;
    let n_video = cfg.video_tokens();
    if q >= n_video || k >= n_video {
        return true;
    }
    let (i, kk) = (q / s, q % s);
    let (j, ll) = (k / s, k % s);
    if j == 0 {
        return true; // attention sink
    }
    let d = i.abs_diff(j);
    let r = bit_length(d.max(1)) - 1; // floor(log2(max(d, 1)))
    let two_r = 1u128 << r;
    let s128 = s as u128;
    // |k - l| + 1 <= s / 2^r  <=>  (|k - l| + 1) * 2^r <= s  (exact, no division)
    let band = two_r <= s128 && (kk.abs_diff(ll) as u128 + 1) * two_r <= s128;
    let diag = (d as u128).is_multiple_of(two_r.div_ceil(s128)) && kk == ll;
    band || diag
}

/// What the paper rule allows between two whole frames: `None` (nothing), `Some(w)` (the band
/// `|k - l| <= w`, `w = s - 1` being the full frame pair; `w = 0` the diagonal only).
pub fn paper_frame_band(s: usize, i: usize, j: usize) -> Option<usize> {
    if j == 0 {
        return Some(s - 1);
    }
    let d = i.abs_diff(j);
    let r = bit_length(d.max(1)) - 1;
    let two_r = 1u128 << r;
    let s128 = s as u128;
    if two_r <= s128 {
        // |k - l| + 1 <= floor(s / 2^r)  (|k - l| is an integer), floor(s / 2^r) >= 1
        Some((s128 / two_r) as usize - 1)
    } else if (d as u128).is_multiple_of(two_r.div_ceil(s128)) {
        Some(0)
    } else {
        None
    }
}

/// The per-frame-pair token rule of the released code, before shrinking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleasedLocal {
    /// The whole `s x s` frame pair (the `wan` attention sink).
    Full,
    /// Nothing (dropped by `get_diagonal_split_mask`).
    Empty,
    /// `|col - row| <= w` (as integers; `w >= s - 1` is the whole frame pair).
    Band(usize),
}

/// `get_window_width` of the released code, as the largest integer distance it allows.
fn released_window(cfg: &RadialConfig, d: usize) -> usize {
    let s = cfg.tokens_per_frame;
    match cfg.model {
        // Both models: the whole frame pair at d <= 1. Revisions of the released code up to
        // a5c638b gave `wan` `s // 2` at d == 1; the latest one (and ops.md) give `s`.
        RadialModel::Wan | RadialModel::Hunyuan if d <= 1 => return s,
        RadialModel::Paper => unreachable!("paper rule has no released window"),
        _ => {}
    }
    // decay_length = 2 ** bitlen(s) / 2 ** bitlen(d) * decay_factor: both powers and their quotient
    // are exact in f64, the product rounds once, as in Python.
    let decay_length =
        2f64.powi(bit_length(s) as i32) / 2f64.powi(bit_length(d) as i32) * cfg.decay_factor;
    if decay_length >= cfg.block_size as f64 {
        // A Python float compared against an int64 tensor: both sides go to f32. Distances are
        // < 2^24, exact in f32, so x <= w32 <=> x <= floor(w32).
        let w32 = decay_length as f32;
        if w32 as f64 >= s as f64 {
            s
        } else {
            (w32 as f64).floor() as usize
        }
    } else {
        cfg.block_size // the int threshold: an exact int64 compare
    }
}

/// `get_diagonal_split_mask` of the released code: whether frame distance `d` survives.
fn released_split_keeps(s: usize, d: usize) -> bool {
    // decay_length = 2^bitlen(s) / 2^bitlen(d) = 2^e; kept if >= 128 (hard-coded), else if
    // d % int(128 / 2^e) == 0, where 128 / 2^e = 2^(7 - e) exactly (e <= 6 here).
    let e = bit_length(s) as i64 - bit_length(d) as i64;
    if e >= 7 {
        return true;
    }
    let factor_log2 = 7 - e; // >= 1
    if factor_log2 >= 64 {
        return d == 0; // the factor exceeds any usize d
    }
    (d as u64).is_multiple_of(1u64 << factor_log2)
}

/// The released code's token rule for query frame `i` and key frame `j` (step 1 of the module doc).
pub fn released_local(cfg: &RadialConfig, i: usize, j: usize) -> ReleasedLocal {
    assert!(
        cfg.model != RadialModel::Paper,
        "released_local: not a released model"
    );
    if j == 0 && cfg.model == RadialModel::Wan {
        return ReleasedLocal::Full;
    }
    let d = i.abs_diff(j);
    if !released_split_keeps(cfg.tokens_per_frame, d) {
        return ReleasedLocal::Empty;
    }
    ReleasedLocal::Band(released_window(cfg, d))
}

/// The released code's token-level mask before shrinking (global token indices; text dense).
pub fn released_token_allowed(cfg: &RadialConfig, q: usize, k: usize) -> bool {
    let s = cfg.tokens_per_frame;
    let n_video = cfg.video_tokens();
    if q >= n_video || k >= n_video {
        return true;
    }
    match released_local(cfg, q / s, k / s) {
        ReleasedLocal::Full => true,
        ReleasedLocal::Empty => false,
        ReleasedLocal::Band(w) => (q % s).abs_diff(k % s) <= w,
    }
}

/// The block mask of `cfg` (see the module doc for both rules).
pub fn radial_mask(cfg: &RadialConfig) -> Result<BlockMask, String> {
    cfg.validate()?;
    match cfg.model {
        RadialModel::Paper => paper_block_mask(cfg),
        RadialModel::Wan | RadialModel::Hunyuan => released_block_mask(cfg, false),
    }
}

/// The released rule computed by materialising every padded `local` token mask and shrinking it
/// exactly as `shrinkMaskStrict` does: slow (`O(frames^2 s^2)`), kept as the literal cross-check of
/// the interval arithmetic that [`radial_mask`] uses.
pub fn radial_mask_released_literal(cfg: &RadialConfig) -> Result<BlockMask, String> {
    cfg.validate()?;
    if cfg.model == RadialModel::Paper {
        return Err("radial_mask_released_literal: not a released model".into());
    }
    released_block_mask(cfg, true)
}

/// Paper rule: block `(qb, kb)` allowed iff some token pair in it is allowed. Per query token and
/// key frame the allowed keys form one interval (a band row), so the blocks it touches are marked
/// directly; text rows and columns are dense.
fn paper_block_mask(cfg: &RadialConfig) -> Result<BlockMask, String> {
    let s = cfg.tokens_per_frame;
    let bs = cfg.block_size;
    let n = cfg.total_tokens();
    let n_video = cfg.video_tokens();
    let (nb, _) = BlockMask::grid(n, n, bs, bs)?;
    let mut dense = vec![0u8; nb * nb];
    let mut mark = |q: usize, lo: usize, hi: usize| {
        // keys lo..=hi allowed for query q
        let qb = q / bs;
        for kb in lo / bs..=hi / bs {
            dense[qb * nb + kb] = 1;
        }
    };
    for q in 0..n {
        if q >= n_video {
            mark(q, 0, n - 1);
            continue;
        }
        if n > n_video {
            mark(q, n_video, n - 1);
        }
        let (i, k) = (q / s, q % s);
        for j in 0..cfg.frames {
            if let Some(w) = paper_frame_band(s, i, j) {
                let lo = k.saturating_sub(w);
                let hi = (k + w).min(s - 1);
                mark(q, j * s + lo, j * s + hi);
            }
        }
    }
    BlockMask::from_dense(nb, nb, bs, bs, &dense)
}

/// Released rule, steps 1-4 of the module doc. `literal`: materialise and shrink the padded token
/// masks; otherwise count each column's allowed rows per block by interval arithmetic.
fn released_block_mask(cfg: &RadialConfig, literal: bool) -> Result<BlockMask, String> {
    let s = cfg.tokens_per_frame;
    let bs = cfg.block_size;
    let f = cfg.frames;
    let n = cfg.total_tokens();
    let n_video = cfg.video_tokens();
    let nb_released = n / bs; // floor: the released mask's size
    let border = n_video / bs; // video_text_border
    let c_blocks = s.div_ceil(bs); // C = (s - 1) // B + 1
    // Step 3's shape check; the largest window start is that of the last frame.
    // With C == 1 an out-of-range start gives a 0-length slice that broadcasts against the 1x1
    // shrunk mask, so torch silently drops that pair instead of raising (the dropped blocks lie
    // past the border, dense anyway); with C > 1 any truncation raises.
    let last_start = ((f - 1) * s) / bs;
    if c_blocks > 1 && last_start + c_blocks > nb_released {
        return Err(format!(
            "radial mask: the released code raises for this configuration (frame pair window \
             [{last_start}, {}) of blocks runs past floor(n / block) = {nb_released}; torch's \
             truncated slice does not match the {c_blocks}x{c_blocks} shrunk mask)",
            last_start + c_blocks
        ));
    }
    let mut released = vec![0u8; nb_released * nb_released];
    for a in 0..nb_released {
        for b in 0..nb_released {
            if a >= border || b >= border {
                released[a * nb_released + b] = 1; // step 4
            }
        }
    }
    for i in 0..f {
        for j in 0..f {
            let local = released_local(cfg, i, j);
            let rem_row = (i * s) % bs;
            let rem_col = (j * s) % bs;
            let shrunk = if literal {
                shrink_literal(s, bs, c_blocks, rem_row, rem_col, local)
            } else {
                shrink_intervals(s, bs, c_blocks, rem_row, rem_col, local)
            };
            let row0 = (i * s) / bs;
            let col0 = (j * s) / bs;
            for a in 0..c_blocks {
                for b in 0..c_blocks {
                    let inside = row0 + a < nb_released && col0 + b < nb_released;
                    if inside && shrunk[a * c_blocks + b] {
                        released[(row0 + a) * nb_released + col0 + b] = 1;
                    }
                }
            }
        }
    }
    // Extend to the ceil grid: a partial last block lies past the border, so it is dense.
    let (nb, _) = BlockMask::grid(n, n, bs, bs)?;
    let mut dense = vec![1u8; nb * nb];
    for a in 0..nb_released {
        for b in 0..nb_released {
            dense[a * nb + b] = released[a * nb_released + b];
        }
    }
    BlockMask::from_dense(nb, nb, bs, bs, &dense)
}

/// `shrinkMaskStrict`'s keep rule from a block's per-column counts of allowed rows (`bs` rows).
fn keep_block(col_counts: impl Iterator<Item = usize>, bs: usize) -> bool {
    let mut nonzero = 0usize;
    let mut high = 0usize;
    for count in col_counts {
        if count > 0 {
            nonzero += 1;
        }
        if 3 * count > bs {
            high += 1; // count / B > 1/3
        }
    }
    // high / (nonzero + 1e-9) > 0.6; with nonzero == 0, high == 0 and the ratio is 0.
    5 * high > 3 * nonzero
}

fn local_allows(local: ReleasedLocal, row: usize, col: usize) -> bool {
    match local {
        ReleasedLocal::Full => true,
        ReleasedLocal::Empty => false,
        ReleasedLocal::Band(w) => row.abs_diff(col) <= w,
    }
}

/// Literal step 2: the padded `(rem_row + C*B) x (rem_col + C*B)` matrix, truncated to `C*B`
/// square, shrunk per block. Returns `C x C` row-major.
fn shrink_literal(
    s: usize,
    bs: usize,
    c_blocks: usize,
    rem_row: usize,
    rem_col: usize,
    local: ReleasedLocal,
) -> Vec<bool> {
    let rows = rem_row + c_blocks * bs;
    let cols = rem_col + c_blocks * bs;
    let mut padded = vec![false; rows * cols];
    for r in 0..s {
        for c in 0..s {
            padded[(rem_row + r) * cols + rem_col + c] = local_allows(local, r, c);
        }
    }
    let block_num = rows / bs; // from the rows, used for both axes
    debug_assert_eq!(block_num, c_blocks);
    let mut out = vec![false; block_num * block_num];
    for a in 0..block_num {
        for b in 0..block_num {
            let counts = (0..bs).map(|cc| {
                let col = b * bs + cc;
                (0..bs)
                    .filter(|&rr| padded[(a * bs + rr) * cols + col])
                    .count()
            });
            out[a * block_num + b] = keep_block(counts, bs);
        }
    }
    out
}

/// Step 2 by interval arithmetic: block `a`'s rows of the padded matrix that hold frame rows are
/// `[max(a*B, rem_row), min((a+1)*B, rem_row + s))`; a column holding frame column `l` counts the
/// frame rows `r` of that range with `|r - l| <= w`.
fn shrink_intervals(
    s: usize,
    bs: usize,
    c_blocks: usize,
    rem_row: usize,
    rem_col: usize,
    local: ReleasedLocal,
) -> Vec<bool> {
    let mut out = vec![false; c_blocks * c_blocks];
    if local == ReleasedLocal::Empty {
        return out;
    }
    for a in 0..c_blocks {
        // frame rows in this block: [r0, r1)
        let r0 = (a * bs).max(rem_row) - rem_row;
        let r1 = ((a + 1) * bs).min(rem_row + s).saturating_sub(rem_row);
        if r0 >= r1 {
            continue; // no frame row: every column count is 0, not kept
        }
        for b in 0..c_blocks {
            let counts = (0..bs).map(|cc| {
                let col = b * bs + cc;
                if col < rem_col || col - rem_col >= s {
                    return 0;
                }
                let l = col - rem_col;
                match local {
                    ReleasedLocal::Full => r1 - r0,
                    ReleasedLocal::Empty => 0,
                    ReleasedLocal::Band(w) => {
                        let lo = r0.max(l.saturating_sub(w));
                        let hi = r1.min(l.saturating_add(w).saturating_add(1));
                        hi.saturating_sub(lo)
                    }
                }
            });
            out[a * c_blocks + b] = keep_block(counts, bs);
        }
    }
    out
}
