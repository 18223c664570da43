//! The portable tier: CubeCL kernels written once, generic over the runtime. The library starts the
//! wgpu runtime (Vulkan / Metal / DX12, or Mesa's llvmpipe on a CPU); the same kernels launch on any
//! `cubecl::client::Client`, so a caller holding a CUDA or HIP client can use them too.

use std::sync::{Arc, OnceLock};

use cubecl::client::Client;

use crate::error::{Error, Result};

/// A started CubeCL runtime: the client to launch on and what the adapter can do.
#[derive(Clone)]
pub struct CubeContext {
    inner: Arc<CubeInner>,
}

struct CubeInner {
    client: Client,
    adapter_name: String,
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
