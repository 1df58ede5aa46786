//! The `[pipeline]` table: device, kernels and seed, defaults filled in.

use super::source::{wrong_type, Entries, Source};
use super::PIPELINE_KEYS;
use crate::error::{suggestion, PipeError};

/// The `[pipeline]` table's values, defaults filled in.
pub(super) struct PipelineSettings {
    pub(super) device: String,
    pub(super) kernels: fmnist_stages::ops::Kernels,
    pub(super) seed: u64,
    pub(super) executor: super::Executor,
}

pub(super) fn pipeline_settings(
    src: &Source,
    entries: &Entries,
) -> Result<PipelineSettings, PipeError> {
    use fmnist_stages::ops::{kernels_from_env, Kernels, KERNELS_ENV};
    let mut device = "auto".to_string();
    let mut kernels = Kernels::Fast;
    let mut seed = 42u64;
    let mut executor = super::Executor::Local;
    for (key, entry) in entries {
        let at = entry.value_span.as_ref();
        match key.as_str() {
            "device" => {
                device = entry
                    .value
                    .as_str()
                    .ok_or_else(|| {
                        wrong_type(
                            src,
                            entry,
                            "pipeline",
                            key,
                            "a string (auto | cpu | cuda | cuda:N | metal)",
                        )
                    })?
                    .to_string();
                // One parser for device names: the one that later selects the device.
                if let Err(e) = device.parse::<fmnist_stages::device::DeviceRequest>() {
                    return Err(src.error(at, format!("[pipeline] {e}")));
                }
            }
            "kernels" => {
                kernels = entry
                    .value
                    .as_str()
                    .ok_or_else(|| {
                        wrong_type(src, entry, "pipeline", key, "a string (fast | portable)")
                    })?
                    .parse()
                    .map_err(|e| src.error(at, format!("[pipeline] {e}")))?;
            }
            "executor" => {
                executor = entry
                    .value
                    .as_str()
                    .ok_or_else(|| {
                        wrong_type(src, entry, "pipeline", key, "a string (local | slurm)")
                    })?
                    .parse()
                    .map_err(|e| src.error(at, format!("[pipeline] {e}")))?;
            }
            "seed" => {
                seed = entry
                    .value
                    .as_integer()
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or_else(|| {
                        wrong_type(src, entry, "pipeline", key, "a non-negative integer")
                    })?;
            }
            other => {
                return Err(src.error(
                    entry.key_span.as_ref(),
                    format!(
                        "unknown key `{other}` in [pipeline]{}",
                        suggestion(other, PIPELINE_KEYS.iter().copied())
                    ),
                ))
            }
        }
    }
    if let Some(from_env) =
        kernels_from_env().map_err(|e| PipeError::Config(format!("{KERNELS_ENV}: {e}")))?
    {
        kernels = from_env;
    }
    Ok(PipelineSettings {
        device,
        kernels,
        seed,
        executor,
    })
}
