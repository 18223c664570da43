//! The portable tier: CubeCL kernels written once, generic over the runtime. The library starts the
//! wgpu runtime (Vulkan / Metal / DX12, or Mesa's llvmpipe on a CPU); the same kernels launch on any
//! `cubecl::client::Client`, so a caller holding a CUDA or HIP client can use them too.
//!
//! Besides the context this module holds what every op's kernels share: device tensors and the
//! transfers to and from host [`Tensor`]s ([`DeviceTensor`]), launch geometry ([`launch`]) and
//! small utility kernels (fill, dtype casts, column copies; [`kernels`]).

pub mod buffer;
pub mod kernels;
pub mod launch;
pub mod values;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use cubecl::client::Client;
use cubecl::features::TypeUsage;
use cubecl::prelude::CubeElement;

pub use buffer::DeviceTensor;
pub use values::ValueCheck;

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// A started CubeCL runtime: the client to launch on and what the adapter can do.
#[derive(Clone)]
pub struct CubeContext {
    inner: Arc<CubeInner>,
}

struct CubeInner {
    client: Client,
    adapter_name: String,
    /// Fill every output and scratch buffer with NaN before the kernels that must write it run, so
    /// an element a kernel forgets to write reads back as NaN and fails every comparison.
    poison: AtomicBool,
}

impl CubeContext {
    /// The process-wide wgpu context, started on first use. Fails (without panicking) when no
    /// adapter is present.
    pub fn shared() -> Result<CubeContext> {
        static CONTEXT: OnceLock<std::result::Result<CubeContext, String>> = OnceLock::new();
        CONTEXT
            .get_or_init(Self::start_wgpu)
            .clone()
            .map_err(|reason| Error::DeviceUnavailable {
                backend: "cube".into(),
                reason,
            })
    }

    /// Wraps a client the caller already holds (any CubeCL runtime).
    pub fn from_client(client: Client, adapter_name: impl Into<String>) -> CubeContext {
        CubeContext {
            inner: Arc::new(CubeInner {
                client,
                adapter_name: adapter_name.into(),
                poison: AtomicBool::new(cfg!(debug_assertions)),
            }),
        }
    }

    fn start_wgpu() -> std::result::Result<CubeContext, String> {
        use cubecl::wgpu::{AutoGraphicsApi, RuntimeOptions, WgpuDevice, try_init_setup};
        // wgpu and its drivers are foreign code: a panic inside them must not cross our API.
        let started = std::panic::catch_unwind(|| {
            let device = WgpuDevice::default();
            let setup = try_init_setup::<AutoGraphicsApi>(&device, RuntimeOptions::default())
                .map_err(|e| format!("no wgpu adapter: {e}"))?;
            let info = setup.adapter.get_info();
            let name = format!("wgpu {:?}: {}", info.backend, info.name);
            let client = cubecl::Device::Wgpu(device).client();
            Ok::<_, String>(CubeContext::from_client(client, name))
        });
        match started {
            Ok(result) => result,
            Err(panic) => Err(format!(
                "no wgpu adapter: wgpu panicked while starting ({})",
                panic_message(&panic)
            )),
        }
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn adapter_name(&self) -> &str {
        &self.inner.adapter_name
    }

    /// Whether output and scratch buffers are filled with NaN before the kernels that write them
    /// (on by default in debug builds; tests turn it on explicitly).
    pub fn poison_outputs(&self) -> bool {
        self.inner.poison.load(Ordering::Relaxed)
    }

    /// Turns output poisoning on or off for every user of this context (it is shared).
    pub fn set_poison_outputs(&self, poison: bool) {
        self.inner.poison.store(poison, Ordering::Relaxed);
    }

    /// Whether the kernels can read inputs of `dtype` on this runtime. f32 always; f16 and bf16
    /// when the runtime can store them in buffers and convert them to f32 (queried from the
    /// runtime's features: llvmpipe has f16 but no bf16); f64 never on the device (the kernels
    /// compute in f32). The host API (`linear::forward`, `attention::forward`, ...) narrows f64
    /// inputs to f32 on the host before they get here; the device-resident API takes what the
    /// device holds.
    pub fn supports_dtype(&self, dtype: DType) -> bool {
        let usable = |uses: cubecl::ir::EnumSet<TypeUsage>| {
            uses.contains(TypeUsage::Buffer) && uses.contains(TypeUsage::Conversion)
        };
        match dtype {
            DType::F32 => true,
            DType::F16 => usable(<half::f16 as cubecl::prelude::Scalar>::supported_uses(
                self.client(),
            )),
            DType::BF16 => usable(<half::bf16 as cubecl::prelude::Scalar>::supported_uses(
                self.client(),
            )),
            DType::F64 => false,
        }
    }

    /// The dtypes [`supports_dtype`](Self::supports_dtype) accepts, in words (for error messages).
    pub fn supported_dtypes(&self) -> String {
        [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .filter(|d| self.supports_dtype(*d))
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Returns [`Error::UnsupportedDtype`] unless `dtype` is usable for input `tensor`.
    pub fn check_dtype(&self, tensor: &str, dtype: DType) -> Result<()> {
        if self.supports_dtype(dtype) {
            return Ok(());
        }
        Err(Error::UnsupportedDtype {
            tensor: tensor.to_string(),
            dtype,
            backend: format!("cube ({})", self.adapter_name()),
            supported: self.supported_dtypes(),
        })
    }

    /// Whether the adapter is Mesa's software rasteriser (llvmpipe / lavapipe).
    pub fn is_llvmpipe(&self) -> bool {
        self.adapter_name().to_lowercase().contains("llvmpipe")
    }

    /// Loop iterations one kernel invocation may spend, summed over every loop it runs.
    ///
    /// Mesa's llvmpipe (gallivm) gives each shader invocation a single loop limiter, initialised
    /// to `LP_MAX_TGSI_LOOP_ITERATIONS = 65535` and decremented at the end of every iteration of
    /// *any* loop; when it reaches zero every loop exits, silently, and the invocation finishes
    /// with whatever it had written (we measured it: see `tests/cube_linear.rs`,
    /// `llvmpipe_loop_budget`). Every kernel here therefore bounds its per-invocation work by this
    /// budget, half the limit for margin, and long scans are split into several launches that
    /// carry their state through device memory. The same split runs on every runtime, so the
    /// code path CI tests on llvmpipe is the one a GPU runs.
    pub fn loop_budget(&self) -> usize {
        LOOP_BUDGET
    }

    /// Largest shared memory per cube, in bytes.
    pub fn max_shared_memory(&self) -> usize {
        self.client().properties().hardware.max_shared_memory_size
    }

    /// Largest number of units (threads) per cube.
    pub fn max_units_per_cube(&self) -> u32 {
        self.client().properties().hardware.max_units_per_cube
    }

    /// Copies a host tensor to the device, keeping its dtype (checked with
    /// [`check_dtype`](Self::check_dtype)).
    pub fn upload(&self, name: &str, tensor: &Tensor) -> Result<DeviceTensor> {
        buffer::upload(self, name, tensor)
    }

    /// Copies a device tensor back to the host.
    pub fn download(&self, tensor: &DeviceTensor) -> Result<Tensor> {
        buffer::download(self, tensor)
    }
}

/// Bytes this crate's cube tier copied between host and device, both directions, since the
/// process started: every upload and every read-back (results, value-check flags, index tables)
/// goes through two helpers of this module, which count it. Device-resident callers (the
/// framework adapters) assert that this stays unchanged across a forward and backward pass.
pub fn host_transfer_bytes() -> u64 {
    HOST_TRANSFER_BYTES.load(Ordering::Relaxed)
}

static HOST_TRANSFER_BYTES: AtomicU64 = AtomicU64::new(0);

/// A new device buffer holding `bytes` (a host-to-device copy, counted).
pub(crate) fn upload_bytes(client: &Client, bytes: &[u8]) -> cubecl::server::Handle {
    HOST_TRANSFER_BYTES.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    client.create_from_slice(bytes)
}

/// Counts a host-to-device write of `bytes` made without [`upload_bytes`] (an in-place write).
pub(crate) fn count_upload(bytes: usize) {
    HOST_TRANSFER_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// A device buffer read back to the host (waits for every launch that writes it; counted).
pub(crate) fn read_bytes(
    client: &Client,
    handle: cubecl::server::Handle,
) -> std::result::Result<cubecl::bytes::Bytes, cubecl::server::ServerError> {
    let bytes = client.read_one(handle)?;
    HOST_TRANSFER_BYTES.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    Ok(bytes)
}

/// See [`CubeContext::loop_budget`].
pub const LOOP_BUDGET: usize = 32_768;

/// Longest sequence the single-loop scans (gate-gradient scan, LightNet's `logcumsumexp`) take on
/// llvmpipe: they spend two or three loop iterations per token of one sequence in one invocation.
pub const LLVMPIPE_MAX_SEQUENCE: usize = 16_384;

/// Maps a runtime failure (a launch that did not run, a device fault) to [`Error::Runtime`].
pub(crate) fn runtime_error(err: impl std::fmt::Display) -> Error {
    Error::Runtime {
        backend: "cube".into(),
        message: err.to_string(),
    }
}

/// Reads a buffer of `T` back (waits for every launch that writes it).
pub(crate) fn read_vec<T: CubeElement>(
    ctx: &CubeContext,
    handle: &cubecl::server::Handle,
) -> Result<Vec<T>> {
    let bytes = crate::cube::read_bytes(ctx.client(), handle.clone()).map_err(runtime_error)?;
    Ok(T::from_bytes(&bytes).to_vec())
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
