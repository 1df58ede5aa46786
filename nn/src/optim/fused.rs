//! The fused CPU path shared by the optimizers: one in-place, multithreaded pass over a
//! parameter, its gradient and its state buffers, instead of a dozen allocating tensor ops.
//! Used only when every tensor is a contiguous f32 CPU tensor with its own storage and the
//! fast kernels are chosen; otherwise the optimizers run their tensor-op code (the portable
//! path: GPUs, other dtypes, `kernels = "portable"`).

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Elements per parallel work item: large enough to amortize scheduling, and fixed so the
/// split does not depend on the thread count (the math is elementwise anyway).
const CHUNK: usize = 1 << 16;

#[cfg(test)]
thread_local! {
    static FUSED_UPDATES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many parameter updates took the fused path on this thread (so a comparison of the two
/// paths can check that it really compared them).
#[cfg(test)]
pub(crate) fn fused_updates() -> usize {
    FUSED_UPDATES.with(|n| n.get())
}

/// The portable path (`kernels = "portable"`) runs the optimizers' tensor ops, as a GPU does.
fn portable_forced() -> bool {
    crate::ops::kernels() == crate::ops::Kernels::Portable
}

/// Updates `param` and two state buffers shaped like it, element by element:
/// `update(grad, param, first, second)`. `Ok(false)` when the fused path does not apply.
pub(super) fn update_with_two_states(
    param: &Tensor,
    grad: &Tensor,
    [first, second]: [&Tensor; 2],
    update: impl Fn(f32, &mut f32, &mut f32, &mut f32) + Sync,
) -> Result<bool> {
    step_in_place(param, grad, &[first, second], |grad, slots| {
        let [param, first, second] = slots else {
            return;
        };
        // Zipped iterators (no bounds checks) let the compiler vectorize the loop.
        let states = first.iter_mut().zip(second.iter_mut());
        for ((p, (a, b)), g) in param.iter_mut().zip(states).zip(grad) {
            update(*g, p, a, b);
        }
    })
}

/// As `update_with_two_states`, with one state buffer: `update(grad, param, state)`.
pub(super) fn update_with_one_state(
    param: &Tensor,
    grad: &Tensor,
    state: &Tensor,
    update: impl Fn(f32, &mut f32, &mut f32) + Sync,
) -> Result<bool> {
    step_in_place(param, grad, &[state], |grad, slots| {
        if let [param, state] = slots {
            for ((p, s), g) in param.iter_mut().zip(state.iter_mut()).zip(grad) {
                update(*g, p, s);
            }
        }
    })
}

/// As `update_with_two_states`, without state: `update(grad, param)`.
pub(super) fn update_stateless(
    param: &Tensor,
    grad: &Tensor,
    update: impl Fn(f32, &mut f32) + Sync,
) -> Result<bool> {
    step_in_place(param, grad, &[], |grad, slots| {
        if let [param] = slots {
            param.iter_mut().zip(grad).for_each(|(p, g)| update(*g, p));
        }
    })
}

/// Applies `kernel` in place, chunk by chunk in parallel, to `param` and `states` (all shaped
/// like `param`) reading `grad`. The kernel gets the gradient chunk and the matching chunks of
/// `[param, states...]` in that order. Returns `Ok(false)`, touching nothing, when the fused
/// path does not apply to these tensors, so the caller runs its tensor-op code instead.
fn step_in_place(
    param: &Tensor,
    grad: &Tensor,
    states: &[&Tensor],
    kernel: impl Fn(&[f32], &mut [&mut [f32]]) + Sync,
) -> Result<bool> {
    if portable_forced() {
        return Ok(false);
    }
    let mut written = Vec::with_capacity(1 + states.len());
    written.push(param);
    written.extend_from_slice(states);
    let Some(grad_base) = own_f32_base(grad, param)? else {
        return Ok(false);
    };
    let mut bases = Vec::with_capacity(written.len());
    for t in &written {
        match own_f32_base(t, param)? {
            Some(base) if base != grad_base && !bases.contains(&base) => bases.push(base),
            // Shared storage would alias the mutable views (and deadlock on its lock).
            _ => return Ok(false),
        }
    }
    with_mut_slices(&written, |slots| {
        let (grad_storage, grad_layout) = grad.storage_and_layout();
        let grad = match &*grad_storage {
            Storage::Cpu(cpu) => contiguous_f32(cpu, grad_layout)?,
            _ => candle_core::bail!("fused optimizer step needs a CPU gradient"),
        };
        let mut work: Vec<Vec<&mut [f32]>> = Vec::new();
        for slot in slots.iter_mut() {
            for (c, chunk) in slot.chunks_mut(CHUNK).enumerate() {
                if c == work.len() {
                    work.push(Vec::with_capacity(1 + states.len()));
                }
                work[c].push(chunk);
            }
        }
        if let [only] = work.as_mut_slice() {
            with_wide_vectors(|| kernel(grad, only));
        } else {
            work.into_par_iter()
                .zip(grad.par_chunks(CHUNK))
                .for_each(|(mut parts, g)| with_wide_vectors(|| kernel(g, &mut parts)));
        }
        Ok(())
    })?;
    crate::ops::note_fast_dispatch();
    #[cfg(test)]
    FUSED_UPDATES.with(|n| n.set(n.get() + 1));
    Ok(true)
}

/// Runs `f` compiled for AVX2 where the CPU has it: the optimizer loops are bound by their
/// square roots and divisions, which then work on 8 lanes instead of 4. Results are the same
/// either way (IEEE arithmetic per lane, and Rust never contracts a multiply-add into an FMA).
#[inline(always)]
fn with_wide_vectors(f: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx,avx2")]
        fn avx2(f: impl FnOnce()) {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU was just checked to support the features `avx2` is built with.
            unsafe { avx2(f) };
            return;
        }
    }
    f()
}

/// The address of the buffer behind `t` when it is a non-empty contiguous f32 CPU tensor shaped
/// like `like` (two tensors share storage exactly when these addresses are equal).
fn own_f32_base(t: &Tensor, like: &Tensor) -> Result<Option<usize>> {
    if !t.device().is_cpu()
        || t.dtype() != DType::F32
        || t.dims() != like.dims()
        || t.elem_count() == 0
        || !t.is_contiguous()
    {
        return Ok(None);
    }
    let (storage, _) = t.storage_and_layout();
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => Some(data.as_ptr() as usize),
        _ => None,
    })
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused optimizer step needs contiguous tensors"),
    }
}

/// Runs `f` with mutable views of all `tensors` at once, holding each one's storage lock
/// meanwhile. The tensors must not share storage (the second lock would never be granted).
fn with_mut_slices(
    tensors: &[&Tensor],
    f: impl FnOnce(&mut [&mut [f32]]) -> Result<()>,
) -> Result<()> {
    fn nest(
        rest: &[&Tensor],
        held: Vec<&mut [f32]>,
        f: impl FnOnce(&mut [&mut [f32]]) -> Result<()>,
    ) -> Result<()> {
        match rest.split_first() {
            None => {
                let mut held = held;
                f(&mut held)
            }
            Some((first, rest)) => with_mut_f32(first, move |slice| {
                let mut held: Vec<&mut [f32]> = held;
                held.push(slice);
                nest(rest, held, f)
            }),
        }
    }
    nest(tensors, Vec::new(), f)
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor, mutably: candle hands out its
/// storage mutably only to in-place custom ops, so `f` travels inside one.
fn with_mut_f32(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    let op = MutF32 {
        body: RefCell::new(Some(f)),
    };
    t.inplace_op1(&op)?;
    if op.body.borrow().is_some() {
        candle_core::bail!("fused optimizer step: the tensor is not on the CPU");
    }
    Ok(())
}

struct MutF32<F> {
    body: RefCell<Option<F>>,
}

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for MutF32<F> {
    fn name(&self) -> &'static str {
        "fused-optimizer-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused optimizer step needs f32 tensors");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused optimizer step needs contiguous tensors");
        };
        let body = self
            .body
            .borrow_mut()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("fused optimizer step ran twice".into()))?;
        body(&mut data[start..end])
    }
}

/// A state buffer the fused path may update in place: a contiguous copy with its own storage
/// (a restored checkpoint tensor may be a view, or shared with the caller's map).
pub(super) fn owned_copy(t: Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        t.copy()
    } else {
        t.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn add_grad_kernel(grad: &[f32], slots: &mut [&mut [f32]]) {
        for slot in slots.iter_mut() {
            for (x, g) in slot.iter_mut().zip(grad) {
                *x += g;
            }
        }
    }

    #[test]
    fn updates_every_chunk_in_place() -> Result<()> {
        let n = 2 * CHUNK + 5;
        let param = Tensor::zeros(n, DType::F32, &Device::Cpu)?;
        let state = Tensor::ones(n, DType::F32, &Device::Cpu)?;
        let grad = Tensor::arange(0f32, n as f32, &Device::Cpu)?;
        assert!(step_in_place(&param, &grad, &[&state], add_grad_kernel)?);
        let (p, s) = (param.to_vec1::<f32>()?, state.to_vec1::<f32>()?);
        assert_eq!(
            (p[0], p[CHUNK], p[n - 1]),
            (0.0, CHUNK as f32, (n - 1) as f32)
        );
        assert_eq!(s[n - 1], n as f32);
        Ok(())
    }

    #[test]
    fn declines_shared_storage_views_and_other_dtypes() -> Result<()> {
        let param = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let grad = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
        let alias = param.clone();
        assert!(!step_in_place(&param, &grad, &[&alias], add_grad_kernel)?);
        assert!(!step_in_place(&param, &param, &[], add_grad_kernel)?);
        let transposed = Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?.t()?;
        assert!(!step_in_place(
            &param,
            &grad,
            &[&transposed],
            add_grad_kernel
        )?);
        let wide = Tensor::zeros((2, 3), DType::F64, &Device::Cpu)?;
        assert!(!step_in_place(&wide, &grad, &[], add_grad_kernel)?);
        // Nothing was touched.
        assert_eq!(param.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
