//! The launch sequences of the engine over device addresses, generic over the [`Executor`].
//!
//! One *pass* is the causal engine over the logical positions of every sequence: forward
//! (`reverse = false`) with the forward gate, or over the flipped sequences (`reverse = true`) with
//! the shifted backward gate and the diagonal left out (`strict`) — the flip identity of
//! kernels.md, which makes the bidirectional problem two causal passes whose outputs add up.
//! Row-sum normalisation runs the passes on `[v, 1]` and divides afterwards.
//!
//! Chunkwise pass: la_cumsum -> la_states -> la_intra_A -> la_fwd_o, and for the backward
//! additionally la_dstates -> la_bwd_dv -> la_bwd_dA -> la_bwd_dqk_intra -> la_bwd_dqkg ->
//! la_gate_grad(_head). Recurrent pass: la_rec_fwd, or la_rec_bwd -> la_rec_dg -> la_gate_grad.

use linattn_reference::linear::{Dims, Direction, Form, GateKind};

use super::kernels::{chunk_kernel, chunk_variant, plain_kernel, recurrent_variant, util_variant};
use super::params::{LaParams, gate_kind};
use crate::cuda::compile::Variant;
use crate::cuda::exec::{Executor, KernelRef};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// What the engine computes, with every size known on the host.
#[derive(Clone, Debug)]
pub(crate) struct EngineConfig {
    pub dims: Dims,
    /// Element type of q, k, v (and of do unless it is given as f32).
    pub dtype: DType,
    pub gate_kind: GateKind,
    pub has_gate_bwd: bool,
    pub direction: Direction,
    pub scale: f64,
    pub normalize: Option<f64>,
    /// `Recurrent` or `Chunkwise` with a compiled chunk size.
    pub form: Form,
    /// Sequence starts `[N + 1]` in packed tokens (`b * T` for equal-length batches).
    pub seq_starts: Vec<i64>,
}

/// Device addresses of the inputs (0 = absent). Gates and h0 are f32.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Inputs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub g: u64,
    pub g_bwd: u64,
    pub h0: u64,
}

/// Device addresses of the forward results (f32; 0 = not wanted).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ForwardTargets {
    pub o: u64,
    pub ht: u64,
}

/// Cotangents: `do` (element type of the inputs, or f32) and `dht` (f32).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cotangents {
    pub d_o: u64,
    pub do_f32: bool,
    pub dht: u64,
}

/// Device addresses of the gradients (f32; 0 = not wanted, except dq, dk, dv).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BackwardTargets {
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub dg: u64,
    pub dg_bwd: u64,
    pub dh0: u64,
}

/// One causal pass.
#[derive(Clone, Copy, Debug)]
struct Pass {
    reverse: bool,
    gate: u64,
    h0: u64,
    ht: u64,
    dht: u64,
    dh0: u64,
    /// Outputs `+=` (second pass of a bidirectional problem).
    accumulate: bool,
    /// Where this pass's gate gradient goes, and whether it adds to what is there.
    gate_target: u64,
    gate_accumulate: bool,
}

struct Engine<'e, E: Executor> {
    exec: &'e E,
    cfg: &'e EngineConfig,
    /// Every buffer the engine allocated; alive until the engine is dropped (after the launches
    /// were issued on the executor's stream, whose ordering covers the frees).
    keep: Vec<E::Buffer>,
    base: LaParams,
    chunk: Option<Variant>,
    recurrent: Variant,
    util: Variant,
    num_sequences: usize,
    tokens: usize,
    max_len: usize,
    num_chunks: usize,
    num_states: usize,
}

fn too_large(what: &str) -> Error {
    Error::Unsupported(format!(
        "{what} exceeds the 32-bit index range of the cuda kernels"
    ))
}

fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| too_large(what))
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| too_large(what))
}

impl<'e, E: Executor> Engine<'e, E> {
    fn new(exec: &'e E, cfg: &'e EngineConfig) -> Result<Self> {
        let Dims { b, t, h, k, v } = cfg.dims;
        let tokens = b * t;
        let num_sequences = cfg.seq_starts.len() - 1;
        let lens: Vec<usize> = cfg
            .seq_starts
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect();
        let max_len = lens.iter().copied().max().unwrap_or(0);

        let mut base = LaParams {
            total_tokens: tokens as i64,
            n: i32_of(num_sequences, "number of sequences")?,
            h: i32_of(h, "H")?,
            k_dim: i32_of(k, "K")?,
            v_dim: i32_of(v, "V")?,
            gate_kind: match cfg.gate_kind {
                GateKind::None => gate_kind::NONE,
                GateKind::PerHead => gate_kind::PER_HEAD,
                GateKind::Scalar => gate_kind::SCALAR,
                GateKind::Vector => gate_kind::VECTOR,
            },
            scale: cfg.scale as f32,
            ..LaParams::default()
        };

        let mut engine = Engine {
            exec,
            cfg,
            keep: Vec::new(),
            base,
            chunk: None,
            recurrent: recurrent_variant(cfg.dtype),
            util: util_variant(cfg.dtype),
            num_sequences,
            tokens,
            max_len,
            num_chunks: 0,
            num_states: 0,
        };

        let starts: Vec<u8> = cfg
            .seq_starts
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        base.cu_seqlens = engine.upload(&starts)?;

        if let Form::Chunkwise { chunk } = cfg.form {
            engine.chunk = Some(chunk_variant(
                cfg.dtype,
                cfg.gate_kind == GateKind::Vector,
                chunk,
            ));
            // Chunk table (sequence, chunk, state index, 0) and each sequence's first state.
            let mut table: Vec<i32> = Vec::new();
            let mut seq_state: Vec<i32> = Vec::with_capacity(num_sequences);
            let mut state = 0usize;
            for (n, &len) in lens.iter().enumerate() {
                seq_state.push(i32_of(state, "number of chunk states")?);
                let chunks = len.div_ceil(chunk);
                for c in 0..chunks {
                    table.extend_from_slice(&[n as i32, c as i32, i32_of(state + c, "states")?, 0]);
                }
                state += chunks + 1;
            }
            engine.num_chunks = table.len() / 4;
            engine.num_states = state;
            i32_of(engine.num_chunks, "number of chunks")?;
            let table_bytes: Vec<u8> = table.iter().flat_map(|x| x.to_le_bytes()).collect();
            let state_bytes: Vec<u8> = seq_state.iter().flat_map(|x| x.to_le_bytes()).collect();
            base.chunks = engine.upload(&table_bytes)?;
            base.seq_state = engine.upload(&state_bytes)?;
            base.num_chunks = engine.num_chunks as i32;
        }
        engine.base = base;
        Ok(engine)
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64> {
        let buf = self.exec.upload(bytes)?;
        let addr = self.exec.address(&buf);
        self.keep.push(buf);
        Ok(addr)
    }

    /// A zeroed f32 buffer of `n` elements.
    fn scratch(&mut self, n: usize) -> Result<u64> {
        let buf = self.exec.alloc_zeroed(n * 4)?;
        let addr = self.exec.address(&buf);
        self.keep.push(buf);
        Ok(addr)
    }

    fn launch(&self, kernel: KernelRef, grid: [usize; 3], block: u32, p: &LaParams) -> Result<()> {
        let grid = [
            u32_of(grid[0], "grid")?,
            u32_of(grid[1], "grid")?,
            u32_of(grid[2], "grid")?,
        ];
        if grid[1] > 65535 || grid[2] > 65535 {
            return Err(too_large("grid y/z (65535)"));
        }
        self.exec.launch(kernel, grid, block, p.as_bytes())
    }

    fn chunk_size(&self) -> usize {
        match self.cfg.form {
            Form::Chunkwise { chunk } => chunk,
            _ => unreachable!("chunk form"),
        }
    }

    /// Channels per token of the cumulative gate and of the chunk kernels' gate gradient.
    fn gate_width(&self) -> usize {
        if self.cfg.gate_kind == GateKind::Vector {
            self.cfg.dims.k
        } else {
            1
        }
    }

    fn pass_params(&self, pass: &Pass, v: u64, vd: usize) -> LaParams {
        LaParams {
            v,
            v_dim: vd as i32,
            g: pass.gate,
            reverse: pass.reverse as i32,
            strict: pass.reverse as i32,
            accumulate: pass.accumulate as i32,
            ..self.base
        }
    }

    // ---------------------------------------------------------------- chunkwise

    /// la_cumsum, la_states (hs, and ht when asked), la_intra_A into the scratch of `p`.
    fn chunk_prologue(&self, p: &LaParams) -> Result<()> {
        let variant = self.chunk.as_ref().expect("chunk variant");
        let h = self.cfg.dims.h;
        let nc32 = (self.chunk_size() / 16 * 32) as u32;
        let k_tiles = self.cfg.dims.k.div_ceil(64);
        let v_tiles = (p.v_dim as usize).div_ceil(64);
        self.launch(
            chunk_kernel(variant, "la_cumsum"),
            [self.num_chunks, h, 1],
            64,
            p,
        )?;
        self.launch(
            chunk_kernel(variant, "la_states"),
            [self.num_sequences * h, k_tiles, v_tiles],
            128,
            p,
        )?;
        self.launch(
            chunk_kernel(variant, "la_intra_A"),
            [self.num_chunks, h, 1],
            nc32,
            p,
        )
    }

    fn chunk_scratch(&mut self, vd: usize, backward: bool, p: &mut LaParams) -> Result<()> {
        let Dims { h, k, .. } = self.cfg.dims;
        let bt = self.chunk_size();
        let state_elems = self.num_states * h * k * vd;
        p.gcum = self.scratch(self.tokens * h * self.gate_width())?;
        p.hs = self.scratch(state_elems)?;
        p.a = self.scratch(self.tokens * h * bt)?;
        if backward {
            p.dhs = self.scratch(state_elems)?;
            p.d_a = self.scratch(self.tokens * h * bt)?;
            p.dq_intra = self.scratch(self.tokens * h * k)?;
            p.dk_intra = self.scratch(self.tokens * h * k)?;
            p.dgl = self.scratch(self.tokens * h * self.gate_width())?;
            p.dgl_width = self.gate_width() as i32;
        }
        Ok(())
    }

    fn chunk_forward(&mut self, pass: &Pass, v: u64, vd: usize, o: u64) -> Result<()> {
        let mut p = self.pass_params(pass, v, vd);
        p.h0 = pass.h0;
        p.ht = pass.ht;
        p.o = o;
        self.chunk_scratch(vd, false, &mut p)?;
        self.chunk_prologue(&p)?;
        let variant = self.chunk.as_ref().expect("chunk variant");
        let nc32 = (self.chunk_size() / 16 * 32) as u32;
        self.launch(
            chunk_kernel(variant, "la_fwd_o"),
            [self.num_chunks, vd.div_ceil(64), self.cfg.dims.h],
            nc32,
            &p,
        )
    }

    fn chunk_backward(
        &mut self,
        pass: &Pass,
        v: u64,
        vd: usize,
        cot: &Cotangents,
        out: &BackwardTargets,
        dv: u64,
    ) -> Result<()> {
        let mut p = self.pass_params(pass, v, vd);
        p.h0 = pass.h0;
        p.dht = pass.dht;
        p.dh0 = pass.dh0;
        p.d_o = cot.d_o;
        p.do_f32 = cot.do_f32 as i32;
        p.dq = out.dq;
        p.dk = out.dk;
        p.dv = dv;
        self.chunk_scratch(vd, true, &mut p)?;
        self.chunk_prologue(&p)?;
        let variant = self.chunk.as_ref().expect("chunk variant");
        let Dims { h, k, .. } = self.cfg.dims;
        let nc32 = (self.chunk_size() / 16 * 32) as u32;
        self.launch(
            chunk_kernel(variant, "la_dstates"),
            [self.num_sequences * h, k.div_ceil(64), vd.div_ceil(64)],
            128,
            &p,
        )?;
        self.launch(
            chunk_kernel(variant, "la_bwd_dv"),
            [self.num_chunks, vd.div_ceil(64), h],
            nc32,
            &p,
        )?;
        self.launch(
            chunk_kernel(variant, "la_bwd_dA"),
            [self.num_chunks, h, 1],
            nc32,
            &p,
        )?;
        self.launch(
            chunk_kernel(variant, "la_bwd_dqk_intra"),
            [self.num_chunks, k.div_ceil(64), h],
            nc32,
            &p,
        )?;
        self.launch(
            chunk_kernel(variant, "la_bwd_dqkg"),
            [self.num_chunks, h, 1],
            nc32,
            &p,
        )?;
        self.gate_grad(pass, &p)
    }

    // ---------------------------------------------------------------- recurrent

    fn recurrent_forward(&mut self, pass: &Pass, v: u64, vd: usize, o: u64) -> Result<()> {
        let mut p = self.pass_params(pass, v, vd);
        p.h0 = pass.h0;
        p.ht = pass.ht;
        p.o = o;
        let kernel = plain_kernel(&self.recurrent, "la_rec_fwd");
        self.launch(
            kernel,
            [self.num_sequences * self.cfg.dims.h, vd.div_ceil(32), 1],
            256,
            &p,
        )
    }

    fn recurrent_backward(
        &mut self,
        pass: &Pass,
        v: u64,
        vd: usize,
        cot: &Cotangents,
        out: &BackwardTargets,
        dv: u64,
    ) -> Result<()> {
        let Dims { h, k, .. } = self.cfg.dims;
        let mut p = self.pass_params(pass, v, vd);
        p.h0 = pass.h0;
        p.dht = pass.dht;
        p.dh0 = pass.dh0;
        p.d_o = cot.d_o;
        p.do_f32 = cot.do_f32 as i32;
        p.dq = out.dq;
        p.dk = out.dk;
        p.dv = dv;
        // Zeroed scratch for the atomics of la_rec_bwd (fresh per pass).
        p.dq_intra = self.scratch(self.tokens * h * k)?;
        p.dk_intra = self.scratch(self.tokens * h * k)?;
        p.a = self.scratch(self.tokens * h * k)?;
        p.d_a = self.scratch(self.tokens * h)?;
        p.aux = self.scratch(self.num_sequences * h * k)?;
        p.dgl = if pass.gate_target != 0 {
            self.scratch(self.tokens * h * k)?
        } else {
            0
        };
        p.dgl_width = k as i32;
        let nh = self.num_sequences * h;
        self.launch(
            plain_kernel(&self.recurrent, "la_rec_bwd"),
            [nh, vd.div_ceil(32), 1],
            256,
            &p,
        )?;
        self.launch(
            plain_kernel(&self.recurrent, "la_rec_dg"),
            [nh, 1, 1],
            256,
            &p,
        )?;
        self.gate_grad(pass, &p)
    }

    // ---------------------------------------------------------------- shared pieces

    /// Scatters the pass's gate gradient (`p.dgl`, `p.dgl_width` channels per token) to the
    /// gate's own layout.
    fn gate_grad(&self, pass: &Pass, p: &LaParams) -> Result<()> {
        if pass.gate_target == 0 || self.cfg.gate_kind == GateKind::None {
            return Ok(());
        }
        let q = LaParams {
            aux: pass.gate_target,
            accumulate: pass.gate_accumulate as i32,
            ..*p
        };
        let h = self.cfg.dims.h;
        if self.cfg.gate_kind == GateKind::PerHead {
            self.launch(
                plain_kernel(&self.util, "la_gate_grad_head"),
                [h, 1, 1],
                256,
                &q,
            )
        } else {
            self.launch(
                plain_kernel(&self.util, "la_gate_grad"),
                [self.num_sequences, self.max_len.div_ceil(128), h],
                128,
                &q,
            )
        }
    }

    fn rows_grid(&self) -> [usize; 3] {
        [(self.tokens * self.cfg.dims.h).div_ceil(256), 1, 1]
    }

    /// `[v, 1]` of width V + 1 in the input dtype.
    fn pack_ones(&mut self, v: u64) -> Result<u64> {
        let Dims { h, v: vd, .. } = self.cfg.dims;
        let bytes = self.tokens * h * (vd + 1) * self.cfg.dtype.size_in_bytes();
        let buf = self.exec.alloc_zeroed(bytes)?;
        let out = self.exec.address(&buf);
        self.keep.push(buf);
        let p = LaParams {
            v,
            aux: out,
            ..self.base
        };
        self.launch(
            plain_kernel(&self.util, "la_pack_ones"),
            self.rows_grid(),
            256,
            &p,
        )?;
        Ok(out)
    }

    fn forward_pass(&mut self, pass: &Pass, v: u64, vd: usize, o: u64) -> Result<()> {
        match self.cfg.form {
            Form::Chunkwise { .. } => self.chunk_forward(pass, v, vd, o),
            _ => self.recurrent_forward(pass, v, vd, o),
        }
    }

    fn backward_pass(
        &mut self,
        pass: &Pass,
        v: u64,
        vd: usize,
        cot: &Cotangents,
        out: &BackwardTargets,
        dv: u64,
    ) -> Result<()> {
        match self.cfg.form {
            Form::Chunkwise { .. } => self.chunk_backward(pass, v, vd, cot, out, dv),
            _ => self.recurrent_backward(pass, v, vd, cot, out, dv),
        }
    }

    /// The two passes of a bidirectional problem into `o` (width `vd`).
    fn bidirectional_forward(&mut self, inp: &Inputs, v: u64, vd: usize, o: u64) -> Result<()> {
        let fwd = Pass {
            reverse: false,
            gate: inp.g,
            h0: 0,
            ht: 0,
            dht: 0,
            dh0: 0,
            accumulate: false,
            gate_target: 0,
            gate_accumulate: false,
        };
        self.forward_pass(&fwd, v, vd, o)?;
        let bwd = Pass {
            reverse: true,
            gate: if inp.g_bwd != 0 { inp.g_bwd } else { inp.g },
            accumulate: true,
            ..fwd
        };
        self.forward_pass(&bwd, v, vd, o)
    }
}

/// Forward pass of a validated problem.
pub(crate) fn forward<E: Executor>(
    exec: &E,
    cfg: &EngineConfig,
    inp: &Inputs,
    out: &ForwardTargets,
) -> Result<()> {
    let mut e = Engine::new(exec, cfg)?;
    e.base.q = inp.q;
    e.base.k = inp.k;
    let Dims { h, v: vd, .. } = cfg.dims;
    match cfg.direction {
        Direction::Causal => {
            let pass = Pass {
                reverse: false,
                gate: inp.g,
                h0: inp.h0,
                ht: out.ht,
                dht: 0,
                dh0: 0,
                accumulate: false,
                gate_target: 0,
                gate_accumulate: false,
            };
            e.forward_pass(&pass, inp.v, vd, out.o)
        }
        Direction::Bidirectional => match cfg.normalize {
            None => e.bidirectional_forward(inp, inp.v, vd, out.o),
            Some(eps) => {
                let vp = e.pack_ones(inp.v)?;
                let unnormalized = e.scratch(e.tokens * h * (vd + 1))?;
                e.bidirectional_forward(inp, vp, vd + 1, unnormalized)?;
                let p = LaParams {
                    aux: unnormalized,
                    o: out.o,
                    eps: eps as f32,
                    ..e.base
                };
                e.launch(
                    plain_kernel(&e.util, "la_normalize"),
                    e.rows_grid(),
                    256,
                    &p,
                )
            }
        },
    }
}

/// Backward pass of a validated problem (recomputes what it needs from the inputs).
pub(crate) fn backward<E: Executor>(
    exec: &E,
    cfg: &EngineConfig,
    inp: &Inputs,
    cot: &Cotangents,
    out: &BackwardTargets,
) -> Result<()> {
    let mut e = Engine::new(exec, cfg)?;
    e.base.q = inp.q;
    e.base.k = inp.k;
    let Dims { h, v: vd, .. } = cfg.dims;
    match cfg.direction {
        Direction::Causal => {
            let pass = Pass {
                reverse: false,
                gate: inp.g,
                h0: inp.h0,
                ht: 0,
                dht: cot.dht,
                dh0: out.dh0,
                accumulate: false,
                gate_target: out.dg,
                gate_accumulate: false,
            };
            e.backward_pass(&pass, inp.v, vd, cot, out, out.dv)
        }
        Direction::Bidirectional => {
            // With normalisation: the cotangent of the width-(V+1) unnormalised result.
            let (v, width, cot_used, dv) = match cfg.normalize {
                None => (inp.v, vd, *cot, out.dv),
                Some(eps) => {
                    let vp = e.pack_ones(inp.v)?;
                    let unnormalized = e.scratch(e.tokens * h * (vd + 1))?;
                    e.bidirectional_forward(inp, vp, vd + 1, unnormalized)?;
                    let d_unnormalized = e.scratch(e.tokens * h * (vd + 1))?;
                    let p = LaParams {
                        o: unnormalized,
                        d_o: cot.d_o,
                        do_f32: cot.do_f32 as i32,
                        aux: d_unnormalized,
                        eps: eps as f32,
                        ..e.base
                    };
                    e.launch(
                        plain_kernel(&e.util, "la_norm_grad"),
                        e.rows_grid(),
                        256,
                        &p,
                    )?;
                    let dv_wide = e.scratch(e.tokens * h * (vd + 1))?;
                    let cot_wide = Cotangents {
                        d_o: d_unnormalized,
                        do_f32: true,
                        dht: 0,
                    };
                    (vp, vd + 1, cot_wide, dv_wide)
                }
            };
            let fwd = Pass {
                reverse: false,
                gate: inp.g,
                h0: 0,
                ht: 0,
                dht: 0,
                dh0: 0,
                accumulate: false,
                gate_target: out.dg,
                gate_accumulate: false,
            };
            e.backward_pass(&fwd, v, width, &cot_used, out, dv)?;
            let (gate_target, gate_accumulate) = if cfg.has_gate_bwd {
                (out.dg_bwd, false)
            } else {
                (out.dg, true)
            };
            let bwd = Pass {
                reverse: true,
                gate: if inp.g_bwd != 0 { inp.g_bwd } else { inp.g },
                accumulate: true,
                gate_target,
                gate_accumulate,
                ..fwd
            };
            e.backward_pass(&bwd, v, width, &cot_used, out, dv)?;
            if cfg.normalize.is_some() {
                let p = LaParams {
                    aux: dv,
                    dv: out.dv,
                    ..e.base
                };
                e.launch(
                    plain_kernel(&e.util, "la_drop_ones"),
                    e.rows_grid(),
                    256,
                    &p,
                )?;
            }
            Ok(())
        }
    }
}
