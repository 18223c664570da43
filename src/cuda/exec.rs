//! Executors: what the engines (sequences of kernel launches over device addresses) run on.
//!
//! [`Executor`] is the small interface every engine is written against: allocate, copy, zero,
//! launch a kernel of a compiled [`Variant`] with one by-value parameter struct. [`CudaExec`]
//! implements it on a CUDA stream through cudarc; `emu::EmuExec` implements it with the host
//! emulation of kernels/emu (no GPU), which is how the kernels' indexing is checked in CI.
//!
//! Layering of the CUDA path: cudarc's raw driver calls (`cudarc::driver::result`) for the launch
//! with a by-value struct, its checked wrappers for modules and functions, and its safe
//! `CudaSlice` for memory.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};

use super::CudaContext;
use super::compile::{Variant, compile};
use crate::error::{Error, Result};

/// One kernel of a compiled variant.
#[derive(Clone, Copy, Debug)]
pub struct KernelRef<'a> {
    pub variant: &'a Variant,
    /// The `extern "C"` name.
    pub name: &'static str,
    /// Index of this kernel's dynamic shared-memory size in the module's `la_smem_table`, for
    /// kernels that carve dynamic shared memory.
    pub smem_slot: Option<usize>,
}

/// A device (real or emulated) that runs kernels on flat memory.
pub trait Executor {
    type Buffer;

    /// A zero-filled buffer of at least `bytes` bytes, 16-byte aligned.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buffer>;
    /// A buffer of at least `bytes` bytes, 16-byte aligned, with unspecified contents (scratch
    /// that kernels overwrite; the emulation fills it with NaN bytes so stray reads show up).
    fn alloc(&self, bytes: usize) -> Result<Self::Buffer>;
    /// A buffer holding a copy of `bytes`.
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buffer>;
    /// Copies the first `out.len()` bytes of `buf` to the host (waits for pending work).
    fn download(&self, buf: &Self::Buffer, out: &mut [u8]) -> Result<()>;
    /// Sets every byte of `buf` to 0.
    fn zero(&self, buf: &mut Self::Buffer) -> Result<()>;
    /// The device address of `buf`, as the kernels see it.
    fn address(&self, buf: &Self::Buffer) -> u64;
    /// Launches `kernel` on `grid` blocks of `block` threads with one by-value parameter whose
    /// bytes are `params` (a `#[repr(C)]` struct mirrored in the kernel source).
    fn launch(&self, kernel: KernelRef, grid: [u32; 3], block: u32, params: &[u8]) -> Result<()>;
    /// Waits until all launched work is done.
    fn synchronize(&self) -> Result<()>;
}

fn runtime(message: impl std::fmt::Display) -> Error {
    Error::Runtime {
        backend: "cuda".into(),
        message: message.to_string(),
    }
}

/// A loaded module of one variant on one context.
pub(crate) struct LoadedModule {
    module: Arc<CudaModule>,
    /// `la_smem_table` of the module (empty when it has none).
    smem_table: Vec<u32>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

/// Per-context cache of loaded modules, keyed by variant (the arch is the context's).
#[derive(Default)]
pub(crate) struct ModuleCache {
    modules: Mutex<HashMap<Variant, Arc<LoadedModule>>>,
}

/// [`Executor`] on a CUDA stream.
#[derive(Clone)]
pub struct CudaExec {
    ctx: CudaContext,
    stream: Arc<CudaStream>,
}

impl CudaExec {
    /// Runs on the context's default stream.
    pub fn new(ctx: &CudaContext) -> Self {
        CudaExec {
            ctx: ctx.clone(),
            stream: ctx.stream().clone(),
        }
    }

    /// Runs on a caller-given stream of the same device.
    pub fn on_stream(ctx: &CudaContext, stream: Arc<CudaStream>) -> Self {
        CudaExec {
            ctx: ctx.clone(),
            stream,
        }
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &CudaContext {
        &self.ctx
    }

    /// Compiles (once per process), loads (once per context) and returns the module of `variant`.
    pub(crate) fn module(&self, variant: &Variant) -> Result<Arc<LoadedModule>> {
        let cache = self.ctx.module_cache();
        if let Some(m) = cache.modules.lock().expect("module cache").get(variant) {
            return Ok(m.clone());
        }
        let compiled = compile(&self.ctx.arch(), variant)?;
        // The CUBIN when NVRTC produced one (no driver JIT), else the PTX.
        let image = match &compiled.cubin {
            Some(cubin) => cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()),
            None => cudarc::nvrtc::Ptx::from_src(compiled.ptx.to_string()),
        };
        let module = self
            .ctx
            .driver_context()
            .load_module(image)
            .map_err(|e| runtime(format!("loading {}: {e:?}", variant.label())))?;
        // Modules that carve dynamic shared memory report their table through `la_smem_query`.
        let smem_table = if compiled.ptx.contains(".entry la_smem_query(") {
            let f = module
                .load_function("la_smem_query")
                .map_err(|e| runtime(format!("la_smem_query of {}: {e:?}", variant.label())))?;
            let out = self.alloc_zeroed(SMEM_TABLE_MAX * 4)?;
            let params = self.address(&out).to_le_bytes();
            self.raw_launch(&f, [1, 1, 1], 32, 0, &params, "la_smem_query", variant)?;
            let mut bytes = vec![0u8; SMEM_TABLE_MAX * 4];
            self.download(&out, &mut bytes)?;
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            Vec::new()
        };
        let loaded = Arc::new(LoadedModule {
            module,
            smem_table,
            functions: Mutex::new(HashMap::new()),
        });
        cache
            .modules
            .lock()
            .expect("module cache")
            .insert(variant.clone(), loaded.clone());
        Ok(loaded)
    }

    fn function(
        &self,
        module: &LoadedModule,
        kernel: &KernelRef,
        smem: u32,
    ) -> Result<CudaFunction> {
        let mut functions = module.functions.lock().expect("function cache");
        if let Some(f) = functions.get(kernel.name) {
            return Ok(f.clone());
        }
        let f = module.module.load_function(kernel.name).map_err(|e| {
            runtime(format!(
                "kernel {} of {}: {e:?}",
                kernel.name,
                kernel.variant.label()
            ))
        })?;
        // Above 48 KiB, dynamic shared memory must be opted into per function.
        if smem > 48 * 1024 {
            let limit = self
                .ctx
                .driver_context()
                .attribute(
                    CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                )
                .map_err(|e| runtime(format!("{e:?}")))?;
            if smem as i64 > limit as i64 {
                return Err(Error::Unsupported(format!(
                    "kernel {} needs {smem} bytes of shared memory; this device allows {limit}",
                    kernel.name
                )));
            }
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| runtime(format!("{e:?}")))?;
        }
        functions.insert(kernel.name, f.clone());
        Ok(f)
    }
}

impl Executor for CudaExec {
    type Buffer = CudaSlice<u8>;

    fn alloc_zeroed(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // cuMemAlloc rejects 0 bytes; allocations are 256-byte aligned.
        self.stream
            .alloc_zeros::<u8>(bytes.max(16))
            .map_err(|e| runtime(format!("allocating {bytes} bytes: {e:?}")))
    }

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: u8 has no invalid bit patterns; the engines only read what kernels wrote.
        unsafe { self.stream.alloc::<u8>(bytes.max(16)) }
            .map_err(|e| runtime(format!("allocating {bytes} bytes: {e:?}")))
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        let mut buf = self.alloc(bytes.len())?;
        super::count_host_transfer(bytes.len());
        if !bytes.is_empty() {
            let mut view = buf.slice_mut(0..bytes.len());
            self.stream
                .memcpy_htod(bytes, &mut view)
                .map_err(|e| runtime(format!("{e:?}")))?;
        }
        Ok(buf)
    }

    fn download(&self, buf: &CudaSlice<u8>, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        super::count_host_transfer(out.len());
        let view = buf.slice(0..out.len());
        self.stream
            .memcpy_dtoh(&view, out)
            .map_err(|e| runtime(format!("{e:?}")))?;
        self.synchronize()
    }

    fn zero(&self, buf: &mut CudaSlice<u8>) -> Result<()> {
        self.stream
            .memset_zeros(buf)
            .map_err(|e| runtime(format!("{e:?}")))
    }

    fn address(&self, buf: &CudaSlice<u8>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }

    fn launch(&self, kernel: KernelRef, grid: [u32; 3], block: u32, params: &[u8]) -> Result<()> {
        if grid.contains(&0) {
            return Ok(());
        }
        let module = self.module(kernel.variant)?;
        let smem = match kernel.smem_slot {
            Some(slot) => *module.smem_table.get(slot).ok_or_else(|| {
                runtime(format!(
                    "{} has no shared-memory entry {slot}",
                    kernel.variant.label()
                ))
            })?,
            None => 0,
        };
        let f = self.function(&module, &kernel, smem)?;
        self.raw_launch(&f, grid, block, smem, params, kernel.name, kernel.variant)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| runtime(format!("{e:?}")))
    }
}

/// Entries read from a module's `la_smem_table` (at least its length).
const SMEM_TABLE_MAX: usize = 32;

impl CudaExec {
    /// cuLaunchKernel of `f` with one by-value parameter whose bytes are `params`.
    #[allow(clippy::too_many_arguments)]
    fn raw_launch(
        &self,
        f: &CudaFunction,
        grid: [u32; 3],
        block: u32,
        smem: u32,
        params: &[u8],
        name: &str,
        variant: &Variant,
    ) -> Result<()> {
        // cuLaunchKernel copies the parameter's bytes; the kernel declares one struct parameter of
        // exactly `params.len()` bytes.
        let mut args = [params.as_ptr() as *mut c_void];
        self.ctx
            .driver_context()
            .bind_to_thread()
            .map_err(|e| runtime(format!("{e:?}")))?;
        // SAFETY: the function's single parameter is a struct of `params.len()` bytes (LaParams is
        // checked against the kernel-side static_assert, LaSmemQuery is one u64); every address in
        // it points to live allocations of this context for the duration of the launch (the
        // engines keep them).
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                (grid[0], grid[1], grid[2]),
                (block, 1, 1),
                smem,
                self.stream.cu_stream(),
                &mut args,
            )
        }
        .map_err(|e| runtime(format!("launching {name} ({}): {e:?}", variant.label())))
    }
}
