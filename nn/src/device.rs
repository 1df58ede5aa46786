//! Turns the pipeline's device request ("auto" | "cpu" | "cuda" | "cuda:N" | "metal") into a
//! candle `Device`, saying which cargo feature to build with when the build lacks a backend.

use candle_core::Device;

/// The device request could not be satisfied.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected one of auto, cpu, cuda, cuda:N, metal")]
    Unknown(String),
    #[error(
        "device `{request}` needs a build with {backend} support: \
         `cargo build --release --features {feature}`"
    )]
    NotBuilt {
        request: String,
        backend: &'static str,
        feature: &'static str,
    },
    #[error("device `{request}` is not usable: {reason}")]
    Unavailable { request: String, reason: String },
}

/// What the user asked for, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let s = s.trim();
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            "metal" => Ok(DeviceRequest::Metal),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

/// The device for a request: "auto" takes a GPU when this build has one and it is present,
/// else the CPU.
pub fn select(request: &str) -> Result<Device, DeviceError> {
    match request.parse::<DeviceRequest>()? {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(auto()),
        DeviceRequest::Cuda(ordinal) => cuda(request, ordinal),
        DeviceRequest::Metal => metal(request),
    }
}

/// A short name of a device for reports: "cpu", "cuda:0", "metal:0".
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn auto() -> Device {
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    if candle_core::utils::metal_is_available() {
        if let Ok(d) = Device::new_metal(0) {
            return d;
        }
    }
    Device::Cpu
}

fn cuda(request: &str, ordinal: usize) -> Result<Device, DeviceError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NotBuilt {
            request: request.to_string(),
            backend: "CUDA",
            feature: "cuda",
        });
    }
    Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable {
        request: request.to_string(),
        reason: without_backtrace(&e),
    })
}

fn metal(request: &str) -> Result<Device, DeviceError> {
    if !candle_core::utils::metal_is_available() {
        return Err(DeviceError::NotBuilt {
            request: request.to_string(),
            backend: "Metal",
            feature: "metal",
        });
    }
    Device::new_metal(0).map_err(|e| DeviceError::Unavailable {
        request: request.to_string(),
        reason: without_backtrace(&e),
    })
}

/// The first line of a candle error: its message, without the backtrace candle appends.
fn without_backtrace(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(
            "auto".parse::<DeviceRequest>().ok(),
            Some(DeviceRequest::Auto)
        );
        assert_eq!(
            "cuda".parse::<DeviceRequest>().ok(),
            Some(DeviceRequest::Cuda(0))
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().ok(),
            Some(DeviceRequest::Cuda(3))
        );
        let err = "tpu".parse::<DeviceRequest>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("auto, cpu, cuda, cuda:N, metal")));
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }

    #[test]
    fn cpu_and_auto_work_everywhere() -> Result<(), DeviceError> {
        assert_eq!(describe(&select("cpu")?), "cpu");
        select("auto")?;
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_build_flag() {
        let msg = select("cuda:0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("--features cuda"), "{msg}");
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_names_the_build_flag() {
        let msg = select("metal")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("--features metal"), "{msg}");
    }
}
