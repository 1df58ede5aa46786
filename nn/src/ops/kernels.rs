//! Which implementation every op runs: this crate's fast CPU kernels, or the portable path made
//! only of candle tensor ops that have a backward on every backend (what CUDA and Metal run).
//!
//! The choice is process-wide (`[pipeline] kernels`, or `FMNIST_KERNELS`), with a per-thread
//! override for code that compares the two paths side by side ([`with_kernels`]). Ops decide
//! on the calling thread when they are built, so an override covers the forward pass, the
//! backward pass of the graph it built and the optimizer step.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable that overrides the pipeline's `kernels` setting.
pub const KERNELS_ENV: &str = "FMNIST_KERNELS";

/// An implementation of the ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// This crate's CPU kernels where they apply (f32 tensors on the CPU), the portable path
    /// elsewhere (GPUs, other dtypes).
    Fast,
    /// candle tensor ops only, on every device: on the CPU it runs the graph a GPU runs.
    Portable,
}

impl Kernels {
    /// What really runs when `self` is asked for on `device` with `dtype`: the fast kernels
    /// exist for f32 on the CPU only, everything else is portable.
    pub fn running_on(self, device: &candle_core::Device, dtype: candle_core::DType) -> Kernels {
        if device.is_cpu() && dtype == candle_core::DType::F32 {
            self
        } else {
            Kernels::Portable
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Fast => "fast",
            Kernels::Portable => "portable",
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `kernels` value that is neither "fast" nor "portable".
#[derive(Debug, thiserror::Error)]
#[error("unknown kernels `{0}`: expected fast or portable")]
pub struct UnknownKernels(pub String);

impl std::str::FromStr for Kernels {
    type Err = UnknownKernels;

    fn from_str(s: &str) -> Result<Self, UnknownKernels> {
        match s.trim() {
            "fast" => Ok(Kernels::Fast),
            "portable" => Ok(Kernels::Portable),
            other => Err(UnknownKernels(other.to_string())),
        }
    }
}

/// `FMNIST_KERNELS`, parsed: None when unset or empty.
pub fn kernels_from_env() -> Result<Option<Kernels>, UnknownKernels> {
    match std::env::var(KERNELS_ENV) {
        Ok(v) if !v.trim().is_empty() => v.parse().map(Some),
        _ => Ok(None),
    }
}

static PORTABLE_BY_DEFAULT: AtomicBool = AtomicBool::new(false);

thread_local! {
    static OVERRIDE: Cell<Option<Kernels>> = const { Cell::new(None) };
    static FAST_DISPATCHES: Cell<u64> = const { Cell::new(0) };
}

/// Sets the process-wide choice (threads without an override follow it).
pub fn set_kernels(kernels: Kernels) {
    PORTABLE_BY_DEFAULT.store(kernels == Kernels::Portable, Ordering::Relaxed);
}

/// The choice in force on this thread.
pub fn kernels() -> Kernels {
    OVERRIDE.with(Cell::get).unwrap_or_else(|| {
        if PORTABLE_BY_DEFAULT.load(Ordering::Relaxed) {
            Kernels::Portable
        } else {
            Kernels::Fast
        }
    })
}

/// Runs `f` with `kernels` in force on this thread (restored afterwards, even on panic).
pub fn with_kernels<R>(kernels: Kernels, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(kernels))));
    f()
}

/// Counts one use of a fast CPU kernel on this thread.
pub(crate) fn note_fast_dispatch() {
    FAST_DISPATCHES.with(|n| n.set(n.get() + 1));
}

/// How many times ops called on this thread took a fast CPU kernel instead of the portable
/// path: a check of the portable path can prove that none did.
pub fn fast_dispatches() -> u64 {
    FAST_DISPATCHES.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_scopes_portable_kernels() {
        assert_eq!("portable".parse::<Kernels>().ok(), Some(Kernels::Portable));
        assert_eq!(" fast ".parse::<Kernels>().ok(), Some(Kernels::Fast));
        let err = "gpu".parse::<Kernels>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("fast or portable")));
        let before = kernels();
        let inside = with_kernels(Kernels::Portable, || {
            with_kernels(Kernels::Fast, kernels);
            kernels()
        });
        assert_eq!(inside, Kernels::Portable);
        assert_eq!(kernels(), before);
    }
}
