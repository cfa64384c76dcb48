//! Where training runs: `--device cpu | wgpu[:cpu|:N|:integrated[:N]] | cuda[:N]`.
//!
//! Burn 0.22 picks the backend at run time through [`Device`], so model code
//! names no backend. The GPU backends load their drivers at run time, and
//! Burn panics (on a background thread, as an opaque `RecvError`) when a
//! driver or adapter is missing. [`DeviceSpec::device`] checks first and
//! answers with a [`DeviceError`] that names what is missing, so `--device
//! cuda` on a machine without one fails cleanly with a non-zero exit.

use std::fmt;
use std::str::FromStr;

use burn::prelude::Device;

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not a device name.
    #[error(
        "unknown device '{0}' (expected cpu, wgpu, wgpu:cpu, wgpu:N, wgpu:integrated[:N], cuda or cuda:N)"
    )]
    Unknown(String),
    /// The backend is not compiled into this build.
    #[error("device '{device}' is not available: this build has no {backend} backend; {remedy}")]
    NotBuilt {
        /// The device asked for.
        device: DeviceSpec,
        /// The missing backend.
        backend: &'static str,
        /// How to get a build with it.
        remedy: &'static str,
    },
    /// The backend is built, but the machine's driver cannot be loaded.
    #[error("device '{device}' is not available: no {driver} driver on this machine ({detail})")]
    NoDriver {
        /// The device asked for.
        device: DeviceSpec,
        /// The driver looked for.
        driver: &'static str,
        /// What loading it said.
        detail: String,
    },
    /// The driver is there, but not the device asked for.
    #[error("device '{device}' is not available: {detail}")]
    NoSuchDevice {
        /// The device asked for.
        device: DeviceSpec,
        /// What the driver or adapter selection said.
        detail: String,
    },
}

/// Which wgpu adapter to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgpuAdapter {
    /// wgpu's choice: a high-power GPU first (`CUBECL_WGPU_DEFAULT_DEVICE`
    /// overrides it).
    Default,
    /// A CPU adapter, such as Mesa's lavapipe: the GPU code path without a GPU.
    Cpu,
    /// The N-th discrete GPU.
    Discrete(usize),
    /// The N-th integrated GPU.
    Integrated(usize),
}

/// A device to train and evaluate on.
///
/// ```
/// use fedveil_ml::device::{DeviceSpec, WgpuAdapter};
///
/// let spec: DeviceSpec = "wgpu:cpu".parse().unwrap();
/// assert_eq!(spec, DeviceSpec::Wgpu(WgpuAdapter::Cpu));
/// assert_eq!(spec.to_string(), "wgpu:cpu");
/// assert!("tpu".parse::<DeviceSpec>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// Burn's `flex` CPU backend, threaded with rayon.
    #[default]
    Cpu,
    /// Burn's wgpu backend: Vulkan, Metal or DX12, whichever the machine has
    /// (needs the `wgpu` cargo feature, on by default).
    Wgpu(WgpuAdapter),
    /// Burn's CUDA backend on GPU N (needs the `cuda` cargo feature).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceError::Unknown(s.to_owned());
        let index = |n: &str| n.parse::<usize>().map_err(|_| bad());
        let mut parts = s.split(':');
        let spec = match (parts.next(), parts.next(), parts.next()) {
            (Some("cpu"), None, None) => Self::Cpu,
            (Some("wgpu"), None, None) => Self::Wgpu(WgpuAdapter::Default),
            (Some("wgpu"), Some("cpu"), None) => Self::Wgpu(WgpuAdapter::Cpu),
            (Some("wgpu"), Some("integrated"), None) => Self::Wgpu(WgpuAdapter::Integrated(0)),
            (Some("wgpu"), Some("integrated"), Some(n)) => {
                Self::Wgpu(WgpuAdapter::Integrated(index(n)?))
            }
            (Some("wgpu"), Some(n), None) => Self::Wgpu(WgpuAdapter::Discrete(index(n)?)),
            (Some("cuda"), None, None) => Self::Cuda(0),
            (Some("cuda"), Some(n), None) => Self::Cuda(index(n)?),
            _ => return Err(bad()),
        };
        match parts.next() {
            None => Ok(spec),
            Some(_) => Err(bad()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu(WgpuAdapter::Default) => write!(f, "wgpu"),
            Self::Wgpu(WgpuAdapter::Cpu) => write!(f, "wgpu:cpu"),
            Self::Wgpu(WgpuAdapter::Discrete(n)) => write!(f, "wgpu:{n}"),
            Self::Wgpu(WgpuAdapter::Integrated(n)) => write!(f, "wgpu:integrated:{n}"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The Burn device, once its driver and adapter are known to be there.
    ///
    /// A GPU device is set up once per process and shared by every later
    /// call, so many simulated clients train on one runtime.
    pub fn device(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::flex()),
            Self::Wgpu(adapter) => wgpu::device(self, adapter),
            Self::Cuda(index) => cuda::device(self, index),
        }
    }

    /// Whether this device is the host CPU running Burn's own kernels, where
    /// concurrent trainings compete for the same cores.
    pub fn is_host(self) -> bool {
        matches!(self, Self::Cpu)
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use std::sync::{Mutex, PoisonError};

    use burn::prelude::Device;
    use burn::tensor::DeviceKind;

    use super::{DeviceError, DeviceSpec, WgpuAdapter};

    /// Adapters set up so far: a wgpu runtime can be initialised only once.
    static READY: Mutex<Vec<(WgpuAdapter, Device)>> = Mutex::new(Vec::new());

    pub(super) fn device(spec: DeviceSpec, adapter: WgpuAdapter) -> Result<Device, DeviceError> {
        let mut ready = READY.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, device)) = ready.iter().find(|(a, _)| *a == adapter) {
            return Ok(device.clone());
        }
        let kind = match adapter {
            WgpuAdapter::Default => DeviceKind::DefaultDevice,
            WgpuAdapter::Cpu => DeviceKind::Cpu,
            WgpuAdapter::Discrete(n) => DeviceKind::DiscreteGpu(n),
            WgpuAdapter::Integrated(n) => DeviceKind::IntegratedGpu(n),
        };
        let device = Device::wgpu_options()
            .device_kind(kind)
            .init()
            .map_err(|e| DeviceError::NoSuchDevice {
                device: spec,
                detail: format!(
                    "{e} (on a machine without a GPU, Mesa's lavapipe gives `wgpu:cpu`: \
                     Debian's mesa-vulkan-drivers)"
                ),
            })?;
        ready.push((adapter, device.clone()));
        Ok(device)
    }
}

#[cfg(not(feature = "wgpu"))]
mod wgpu {
    use burn::prelude::Device;

    use super::{DeviceError, DeviceSpec, WgpuAdapter};

    pub(super) fn device(spec: DeviceSpec, _: WgpuAdapter) -> Result<Device, DeviceError> {
        Err(DeviceError::NotBuilt {
            device: spec,
            backend: "wgpu",
            remedy: "rebuild with the `wgpu` feature (on by default)",
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use burn::prelude::Device;

    use super::{DeviceError, DeviceSpec};

    /// Where the CUDA driver API lives; cudarc loads the same library.
    const DRIVER_LIBRARIES: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };

    /// `CUresult` of `cuInit` on a machine whose driver sees no GPU.
    const CUDA_ERROR_NO_DEVICE: i32 = 100;

    /// What the driver said once: the GPU count, or why there is none.
    #[derive(Debug, Clone)]
    enum Probe {
        Gpus(usize),
        NoDriver(String),
        Failed(String),
    }

    pub(super) fn device(spec: DeviceSpec, index: usize) -> Result<Device, DeviceError> {
        static PROBE: OnceLock<Probe> = OnceLock::new();
        match PROBE.get_or_init(probe) {
            Probe::Gpus(count) if index < *count => Ok(Device::cuda(index)),
            Probe::Gpus(count) => Err(DeviceError::NoSuchDevice {
                device: spec,
                detail: format!("the CUDA driver sees {count} GPU(s), numbered from 0"),
            }),
            Probe::NoDriver(detail) => Err(DeviceError::NoDriver {
                device: spec,
                driver: "CUDA",
                detail: detail.clone(),
            }),
            Probe::Failed(detail) => Err(DeviceError::NoSuchDevice {
                device: spec,
                detail: detail.clone(),
            }),
        }
    }

    /// Loads the driver library and counts GPUs with two driver calls, the
    /// ones Burn's runtime would make first, without starting that runtime.
    fn probe() -> Probe {
        type CuInit = unsafe extern "C" fn(flags: u32) -> i32;
        type CuDeviceGetCount = unsafe extern "C" fn(count: *mut i32) -> i32;
        let mut failures = Vec::new();
        let library = DRIVER_LIBRARIES.iter().find_map(|name| {
            // SAFETY: loading the vendor's driver library runs only its own
            // initialisers, as cudarc's loading of it would.
            unsafe { libloading::Library::new(name) }
                .map_err(|e| failures.push(e.to_string()))
                .ok()
        });
        let Some(library) = library else {
            return Probe::NoDriver(failures.join("; "));
        };
        // The driver stays loaded for cudarc, which loads the same library:
        // unloading it after cuInit would pull it from under the runtime.
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        // SAFETY: the symbols have the C signatures of the CUDA driver API
        // (cuda.h), and the count pointer is valid for the call.
        unsafe {
            let (init, count) = match (
                library.get::<CuInit>(b"cuInit\0"),
                library.get::<CuDeviceGetCount>(b"cuDeviceGetCount\0"),
            ) {
                (Ok(init), Ok(count)) => (init, count),
                (Err(e), _) | (_, Err(e)) => return Probe::NoDriver(e.to_string()),
            };
            match init(0) {
                0 => {}
                CUDA_ERROR_NO_DEVICE => return Probe::Gpus(0),
                code => return Probe::Failed(format!("cuInit failed with CUresult {code}")),
            }
            let mut gpus = 0i32;
            match count(&mut gpus) {
                0 => Probe::Gpus(usize::try_from(gpus).unwrap_or(0)),
                code => Probe::Failed(format!("cuDeviceGetCount failed with CUresult {code}")),
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use burn::prelude::Device;

    use super::{DeviceError, DeviceSpec};

    pub(super) fn device(spec: DeviceSpec, _: usize) -> Result<Device, DeviceError> {
        Err(DeviceError::NotBuilt {
            device: spec,
            backend: "CUDA",
            remedy: "rebuild with the `cuda` feature after `scripts/setup-cuda.sh` \
                     (see the README's GPU section)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("wgpu", DeviceSpec::Wgpu(WgpuAdapter::Default)),
            ("wgpu:cpu", DeviceSpec::Wgpu(WgpuAdapter::Cpu)),
            ("wgpu:1", DeviceSpec::Wgpu(WgpuAdapter::Discrete(1))),
            (
                "wgpu:integrated:2",
                DeviceSpec::Wgpu(WgpuAdapter::Integrated(2)),
            ),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec, "{text}");
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(
            "wgpu:integrated".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Wgpu(WgpuAdapter::Integrated(0))
        );
        for bad in [
            "", "gpu", "cuda:x", "cuda:1:2", "cpu:0", "wgpu:", "wgpu:gpu", "wgpu:1:2", "wgpu:-1",
        ] {
            assert_eq!(
                bad.parse::<DeviceSpec>(),
                Err(DeviceError::Unknown(bad.into())),
                "{bad}"
            );
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = DeviceSpec::Cuda(0).device().unwrap_err();
        assert!(matches!(err, DeviceError::NotBuilt { .. }), "{err}");
        assert!(err.to_string().contains("setup-cuda.sh"), "{err}");
    }

    /// On a machine without libcuda (CI), `--device cuda` is an error, not a
    /// panic; where the driver exists, an index past its GPUs is one.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_driver_or_gpu_is_an_error() {
        match DeviceSpec::Cuda(0).device() {
            Err(DeviceError::NoDriver { .. } | DeviceError::NoSuchDevice { .. }) => {}
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => {
                let err = DeviceSpec::Cuda(4096).device().unwrap_err();
                assert!(matches!(err, DeviceError::NoSuchDevice { .. }), "{err}");
            }
        }
    }
}
