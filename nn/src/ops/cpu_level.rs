//! Which x86 vector level the fast CPU kernels run at: the best the CPU has (AVX-512 where
//! present, else AVX2), or a lower one forced with `FMNIST_CPU=avx2` (or [`set_cpu_level`])
//! so that the AVX2 path can be run, measured and tested on an AVX-512 machine. Results are
//! deterministic for a given level on a given machine; the two levels may round differently.

use std::sync::atomic::{AtomicU8, Ordering};

/// The environment variable that caps the level: `avx2`, `avx512` or `auto` (the default).
pub const CPU_LEVEL_ENV: &str = "FMNIST_CPU";

/// A vector level, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuLevel {
    /// Neither of the others (or not x86): the kernels' portable loops.
    Generic,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512F: 16 f32 lanes.
    Avx512,
}

impl CpuLevel {
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Generic => "generic",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512 => "avx512",
        }
    }

    fn from_u8(v: u8) -> Option<CpuLevel> {
        [CpuLevel::Generic, CpuLevel::Avx2, CpuLevel::Avx512]
            .into_iter()
            .find(|l| *l as u8 == v)
    }
}

impl std::fmt::Display for CpuLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `FMNIST_CPU` value that is not a level.
#[derive(Debug, thiserror::Error)]
#[error("unknown CPU level `{0}`: expected auto, avx2 or avx512")]
pub struct UnknownCpuLevel(pub String);

/// The best level this CPU has.
pub fn detected() -> CpuLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        // The AVX-512 kernels are compiled with FMA (and may use AVX2's instructions) too.
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            return CpuLevel::Avx512;
        }
        if avx2 {
            return CpuLevel::Avx2;
        }
    }
    CpuLevel::Generic
}

/// No cap set yet: read `FMNIST_CPU` on first use.
const UNSET: u8 = u8::MAX;
/// No cap: the detected level.
const AUTO: u8 = u8::MAX - 1;
static CAP: AtomicU8 = AtomicU8::new(UNSET);

/// `FMNIST_CPU`, parsed: None for unset, empty or `auto`.
pub fn cpu_level_from_env() -> Result<Option<CpuLevel>, UnknownCpuLevel> {
    let Ok(value) = std::env::var(CPU_LEVEL_ENV) else {
        return Ok(None);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "avx2" => Ok(Some(CpuLevel::Avx2)),
        "avx512" | "avx-512" => Ok(Some(CpuLevel::Avx512)),
        _ => Err(UnknownCpuLevel(value)),
    }
}

/// Caps the level process-wide (None: the detected level). A cap above what the CPU has
/// changes nothing.
pub fn set_cpu_level(cap: Option<CpuLevel>) {
    CAP.store(cap.map_or(AUTO, |l| l as u8), Ordering::Relaxed);
}

/// The level the kernels run at now: the detected one, capped by [`set_cpu_level`] or else
/// by `FMNIST_CPU` (an unknown value there counts as no cap; the command line rejects it
/// before anything runs).
pub fn cpu_level() -> CpuLevel {
    let mut cap = CAP.load(Ordering::Relaxed);
    if cap == UNSET {
        set_cpu_level(cpu_level_from_env().ok().flatten());
        cap = CAP.load(Ordering::Relaxed);
    }
    let best = detected();
    match CpuLevel::from_u8(cap) {
        Some(level) => level.min(best),
        None => best,
    }
}

/// The levels kernels ran at since the last [`take_levels_run`], one bit each: how a test sees
/// that a cap reached the kernels (on some CPUs the two levels round alike, so the results
/// cannot show it).
static RAN: AtomicU8 = AtomicU8::new(0);

/// Records that a kernel ran at `level`. A load first: once the bit is set the cache line
/// stays shared between the threads instead of bouncing on every call.
pub(crate) fn note_level_run(level: CpuLevel) {
    let bit = 1 << level as u8;
    if RAN.load(Ordering::Relaxed) & bit == 0 {
        RAN.fetch_or(bit, Ordering::Relaxed);
    }
}

/// The levels kernels ran at since the last call, lowest first, and starts over.
pub fn take_levels_run() -> Vec<CpuLevel> {
    let bits = RAN.swap(0, Ordering::Relaxed);
    [CpuLevel::Generic, CpuLevel::Avx2, CpuLevel::Avx512]
        .into_iter()
        .filter(|l| bits & (1 << *l as u8) != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_order_and_parse() {
        assert!(CpuLevel::Generic < CpuLevel::Avx2 && CpuLevel::Avx2 < CpuLevel::Avx512);
        assert!(CpuLevel::from_u8(AUTO).is_none());
        assert_eq!(
            CpuLevel::from_u8(CpuLevel::Avx2 as u8),
            Some(CpuLevel::Avx2)
        );
    }
}
