//! Scratch buffers kept per thread from one call to the next. A training step runs the same
//! kernels on the same shapes every batch; fresh buffers were zeroed (and their pages faulted
//! in) each time, often on the calling thread alone while the others waited. A buffer taken
//! here comes back to its thread's pool when dropped, keeping its size, so the next call's
//! [`Scratch::sized`] costs nothing.

use std::cell::RefCell;

/// Buffers kept per thread; beyond that, dropped ones are freed.
const KEPT: usize = 8;
/// Buffers larger than this (in elements, 64 MiB) are freed when dropped, not kept: the pool
/// hands any buffer to any taker, so each kept one can grow to the largest use on its thread.
const KEPT_UP_TO: usize = 16 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from this thread's pool, back to the pool of whichever thread drops it.
pub struct Scratch(Vec<f32>);

impl Scratch {
    pub fn take() -> Self {
        Self(POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default())
    }

    /// Its first `n` elements, grown with zeros if shorter (never shrunk). Old contents stay:
    /// every caller overwrites what it reads.
    pub fn sized(&mut self, n: usize) -> &mut [f32] {
        if self.0.len() < n {
            // Exact: a doubled capacity would be kept, unused, for as long as the thread lives.
            self.0.reserve_exact(n - self.0.len());
            self.0.resize(n, 0.0);
        }
        &mut self.0[..n]
    }

    /// The whole buffer, as far as [`Scratch::sized`] last grew it.
    pub fn all(&self) -> &[f32] {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        if (1..=KEPT_UP_TO).contains(&buffer.capacity()) {
            // try_with: a thread being torn down has no pool left; the buffer is then freed.
            let _ = POOL.try_with(|p| {
                let mut pool = p.borrow_mut();
                if pool.len() < KEPT {
                    pool.push(buffer);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer dropped comes back, with its size, to the next taker on the thread.
    #[test]
    fn buffers_come_back_with_their_size() {
        let mut a = Scratch::take();
        a.sized(1000)[999] = 7.0;
        let ptr = a.all().as_ptr();
        drop(a);
        let mut b = Scratch::take();
        assert_eq!(b.all().as_ptr(), ptr);
        assert_eq!(b.sized(10).len(), 10);
        assert_eq!(b.all().len(), 1000, "never shrunk");
    }
}
