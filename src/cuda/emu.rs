//! Host emulation of the CUDA kernels, for checks without a GPU.
//!
//! The same kernel sources, with the hardware-primitive section of kernels/common.cuh swapped for
//! kernels/emu/primitives.h, are compiled by a C++ compiler (`g++`, or `$LINATTN_CXX`) into one
//! shared library per [`Variant`] together with kernels/emu/runtime.cpp, which runs a grid on one
//! OS thread: blocks in order, the threads of a block as cooperative fibers meeting at
//! `__syncthreads` and at every warp collective (shuffle, ldmatrix, mma.sync). Results are
//! deterministic; the tensor-core instructions are emulated lane by lane from their PTX ISA
//! fragment layouts, so indexing errors and the precision of the bf16/f16 paths show up exactly as
//! on a GPU (up to the order of f32 additions inside an mma). x86-64 only. Slow: meant for small
//! shapes.
//!
//! Libraries are cached on disk (`$LINATTN_EMU_DIR`, default `<temp>/linattn-emu`) by a hash of
//! their source, and in memory for the life of the process.

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use super::compile::Variant;
use super::exec::{Executor, KernelRef};
use crate::error::{Error, Result};

const SHIM_H: &str = include_str!("../../kernels/emu/shim.h");
const PRIMITIVES_H: &str = include_str!("../../kernels/emu/primitives.h");
const RUNTIME_CPP: &str = include_str!("../../kernels/emu/runtime.cpp");
const CXX_FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-march=native",
    "-fPIC",
    "-shared",
    "-Wno-unknown-pragmas",
    "-fno-strict-aliasing",
];

fn emu_error(message: impl std::fmt::Display) -> Error {
    Error::Runtime {
        backend: "cuda-emulation".into(),
        message: message.to_string(),
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::DeviceUnavailable {
        backend: "cuda-emulation".into(),
        reason: reason.into(),
    }
}

fn compiler() -> String {
    std::env::var("LINATTN_CXX").unwrap_or_else(|_| "g++".to_string())
}

/// FNV-1a, 64 bit: a stable content hash for the on-disk cache.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

type LaunchFn = unsafe extern "C" fn(
    kernel: *const c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    block: c_uint,
    smem: c_uint,
    params: *const c_void,
    err: *mut c_char,
    err_len: c_int,
) -> c_int;

struct EmuLib {
    lib: libloading::Library,
    launch: LaunchFn,
    /// The module's `la_smem_table` (read through `la_smem_query`), empty without one.
    smem_table: Vec<u32>,
}

fn libraries() -> &'static Mutex<HashMap<Variant, Arc<EmuLib>>> {
    static LIBS: OnceLock<Mutex<HashMap<Variant, Arc<EmuLib>>>> = OnceLock::new();
    LIBS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The emulation runtime keeps global state: one launch at a time per process.
fn launch_lock() -> &'static Mutex<()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(()))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("LINATTN_EMU_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("linattn-emu"))
}

/// Writes `text` to `path` unless it already holds it, through a temporary file and a rename, so
/// that a compiler another thread or process runs at the same time reads the old or the new
/// file, never a partial one.
fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{n}.tmp", std::process::id()));
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
    }
    Ok(())
}

fn build(variant: &Variant) -> Result<EmuLib> {
    let source = variant.emulation_source()?;
    let cxx = compiler();
    let hash = fnv1a(&[
        &source,
        SHIM_H,
        PRIMITIVES_H,
        RUNTIME_CPP,
        &cxx,
        &CXX_FLAGS.join(" "),
    ]);
    let dir = cache_dir();
    let include = dir.join(format!(
        "include-{:016x}",
        fnv1a(&[SHIM_H, PRIMITIVES_H, RUNTIME_CPP])
    ));
    let emu_dir = include.join("emu");
    std::fs::create_dir_all(&emu_dir).map_err(|source| Error::Io {
        path: emu_dir.display().to_string(),
        source,
    })?;
    write_if_changed(&emu_dir.join("shim.h"), SHIM_H)?;
    write_if_changed(&emu_dir.join("primitives.h"), PRIMITIVES_H)?;
    write_if_changed(&emu_dir.join("runtime.cpp"), RUNTIME_CPP)?;
    let stem: String = variant
        .label()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let lib_path = dir.join(format!("{stem}-{hash:016x}.so"));
    if !lib_path.exists() {
        // Every build writes its own source and library under a name unique to this process and
        // build, then renames the library into place (atomic on one file system): test processes
        // and threads that build the same variant at once never read each other's half-written
        // files, and the last rename wins with identical contents.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = format!(
            "{}-{}",
            std::process::id(),
            BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let cpp = dir.join(format!("{stem}-{hash:016x}.{unique}.cpp"));
        std::fs::write(&cpp, &source).map_err(|source| Error::Io {
            path: cpp.display().to_string(),
            source,
        })?;
        let tmp = dir.join(format!("{stem}-{hash:016x}.{unique}.tmp.so"));
        let output = Command::new(&cxx)
            .args(CXX_FLAGS)
            .arg("-include")
            .arg(emu_dir.join("shim.h"))
            .arg("-I")
            .arg(&include)
            .arg(&cpp)
            .arg(emu_dir.join("runtime.cpp"))
            .arg("-o")
            .arg(&tmp)
            .output()
            .map_err(|e| unavailable(format!("cannot run the C++ compiler `{cxx}`: {e}")))?;
        if !output.status.success() {
            return Err(Error::KernelCompile {
                kernel: variant.label(),
                arch: format!("host emulation ({cxx})"),
                log: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let _ = std::fs::remove_file(&cpp);
        std::fs::rename(&tmp, &lib_path).map_err(|source| Error::Io {
            path: lib_path.display().to_string(),
            source,
        })?;
    }
    // SAFETY: the library is our own build of the kernel sources and the emulation runtime; its
    // initialisers only set up globals.
    let lib = unsafe { libloading::Library::new(&lib_path) }
        .map_err(|e| emu_error(format!("loading {}: {e}", lib_path.display())))?;
    // SAFETY: la_emu_launch has exactly this signature in kernels/emu/runtime.cpp.
    let launch: LaunchFn = unsafe {
        *lib.get::<LaunchFn>(b"la_emu_launch\0")
            .map_err(|e| emu_error(format!("la_emu_launch: {e}")))?
    };
    let smem_table = query_smem_table(&lib, launch, variant)?;
    Ok(EmuLib {
        lib,
        launch,
        smem_table,
    })
}

/// Runs the library's `la_smem_query`, when it has one, and returns its table.
fn query_smem_table(
    lib: &libloading::Library,
    launch: LaunchFn,
    variant: &Variant,
) -> Result<Vec<u32>> {
    // SAFETY: `la_smem_query` (kernels/common.cuh) takes `const LaSmemQuery&` = one u64 address.
    let query: *const c_void = match unsafe { lib.get::<*const c_void>(b"la_smem_query\0") } {
        Ok(sym) => *sym,
        Err(_) => return Ok(Vec::new()),
    };
    let mut table = vec![0i32; 32];
    let params = (table.as_mut_ptr() as u64).to_le_bytes();
    let mut err = vec![0 as c_char; 256];
    let _guard = launch_lock().lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: `query` writes at most 32 ints to the address in `params`.
    let rc = unsafe {
        launch(
            query,
            1,
            1,
            1,
            32,
            0,
            params.as_ptr() as *const c_void,
            err.as_mut_ptr(),
            err.len() as c_int,
        )
    };
    if rc != 0 {
        return Err(emu_error(format!(
            "la_smem_query of {} failed",
            variant.label()
        )));
    }
    Ok(table.into_iter().map(|x| x as u32).collect())
}

fn library(variant: &Variant) -> Result<Arc<EmuLib>> {
    if let Some(l) = libraries().lock().expect("emu libraries").get(variant) {
        return Ok(l.clone());
    }
    let lib = Arc::new(build(variant)?);
    libraries()
        .lock()
        .expect("emu libraries")
        .insert(variant.clone(), lib.clone());
    Ok(lib)
}

/// Host memory standing in for device memory: 16-byte aligned, written by the kernels through
/// raw addresses (hence the cell).
pub struct EmuBuffer {
    data: UnsafeCell<Vec<u128>>,
}

/// [`Executor`] on the host emulation.
#[derive(Clone, Copy, Debug)]
pub struct EmuExec {
    _private: (),
}

impl EmuExec {
    /// Checks that this machine can build and run the emulation (x86-64 and a C++20 compiler).
    pub fn new() -> Result<EmuExec> {
        if !cfg!(target_arch = "x86_64") {
            return Err(unavailable(
                "the kernel emulation runtime supports x86-64 only",
            ));
        }
        let cxx = compiler();
        let ok = Command::new(&cxx)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(unavailable(format!(
                "no C++ compiler `{cxx}` (set LINATTN_CXX)"
            )));
        }
        Ok(EmuExec { _private: () })
    }

    /// Builds (or loads from the cache) the library of `variant`, e.g. to surface compile errors.
    pub fn prepare(&self, variant: &Variant) -> Result<()> {
        library(variant).map(|_| ())
    }
}

impl Executor for EmuExec {
    type Buffer = EmuBuffer;

    fn alloc_zeroed(&self, bytes: usize) -> Result<EmuBuffer> {
        Ok(EmuBuffer {
            data: UnsafeCell::new(vec![0u128; bytes.div_ceil(16).max(1)]),
        })
    }

    fn alloc(&self, bytes: usize) -> Result<EmuBuffer> {
        // 0xff bytes are NaN as f32: any read of scratch no kernel wrote poisons the results.
        Ok(EmuBuffer {
            data: UnsafeCell::new(vec![u128::MAX; bytes.div_ceil(16).max(1)]),
        })
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuffer> {
        let buf = self.alloc_zeroed(bytes.len())?;
        // SAFETY: fresh buffer of at least bytes.len() bytes, no other reference to it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (*buf.data.get()).as_mut_ptr() as *mut u8,
                bytes.len(),
            );
        }
        Ok(buf)
    }

    fn download(&self, buf: &EmuBuffer, out: &mut [u8]) -> Result<()> {
        // SAFETY: no launch is running (launches are synchronous); the buffer holds >= out.len()
        // bytes by the engines' construction, checked here.
        unsafe {
            let v = &*buf.data.get();
            if out.len() > v.len() * 16 {
                return Err(emu_error("download larger than the buffer"));
            }
            std::ptr::copy_nonoverlapping(v.as_ptr() as *const u8, out.as_mut_ptr(), out.len());
        }
        Ok(())
    }

    fn zero(&self, buf: &mut EmuBuffer) -> Result<()> {
        buf.data.get_mut().fill(0);
        Ok(())
    }

    fn address(&self, buf: &EmuBuffer) -> u64 {
        // SAFETY: only the address is taken; writes through it happen inside launches.
        unsafe { (*buf.data.get()).as_mut_ptr() as u64 }
    }

    fn launch(&self, kernel: KernelRef, grid: [u32; 3], block: u32, params: &[u8]) -> Result<()> {
        if grid.contains(&0) {
            return Ok(());
        }
        let lib = library(kernel.variant)?;
        let name = format!("{}\0", kernel.name);
        // SAFETY: every kernel of an emulation build is `extern "C" void f(const Params&)`.
        let f: *const c_void = unsafe {
            *lib.lib
                .get::<*const c_void>(name.as_bytes())
                .map_err(|e| emu_error(format!("{}: {e}", kernel.name)))?
        };
        let smem = match kernel.smem_slot {
            Some(slot) => *lib.smem_table.get(slot).ok_or_else(|| {
                emu_error(format!(
                    "{} has no shared-memory entry {slot}",
                    kernel.variant.label()
                ))
            })?,
            None => 0,
        };
        let mut err = vec![0 as c_char; 256];
        let _guard = launch_lock().lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `f` is a kernel of this library taking its parameter struct by reference;
        // `params` holds exactly that struct; every address in it points to live EmuBuffers.
        let rc = unsafe {
            (lib.launch)(
                f,
                grid[0],
                grid[1],
                grid[2],
                block,
                smem,
                params.as_ptr() as *const c_void,
                err.as_mut_ptr(),
                err.len() as c_int,
            )
        };
        if rc != 0 {
            // SAFETY: the runtime writes a NUL-terminated message into `err`.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            return Err(emu_error(format!(
                "{} ({}): {msg}",
                kernel.name,
                kernel.variant.label()
            )));
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
