//! Run-time choice of vector extension for the hand-written lane-wise kernels (the Winograd
//! transforms): one macro that compiles a function for AVX-512 and for AVX2 and calls the
//! version the CPU level allows (`FMNIST_CPU`, see `cpu_level`).

/// Defines `$name`, which runs `$generic` (an `#[inline(always)]` function of the same
/// parameters) compiled for AVX-512 or AVX2, whichever the CPU level allows, else as built.
/// The kernels are lane-wise IEEE additions and multiplies, never contracted into FMAs, and
/// explicit `mul_add`s (one rounding at every level: an FMA instruction here, the C library's
/// `fmaf`, much slower, at the generic level on x86-64), so every level gives the same bits.
/// A named `#[target_feature]` function, not a closure handed to one: closures with real work
/// in them stayed out of line, without the extension.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident => $generic:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::ops::{cpu_level, CpuLevel};
                use $crate::ops::cpu_level as levels;
                #[target_feature(enable = "avx512f,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    $generic($($arg),*)
                }
                let level = cpu_level();
                levels::note_level_run(level);
                match level {
                    // SAFETY: the CPU has the extension (cpu_level never exceeds detection).
                    CpuLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    CpuLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    CpuLevel::Generic => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            $crate::ops::cpu_level::note_level_run($crate::ops::CpuLevel::Generic);
            $generic($($arg),*)
        }
    };
}

pub(super) use dispatch;
