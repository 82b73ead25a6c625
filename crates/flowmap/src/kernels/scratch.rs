//! Per-thread scratch memory for the kernels' temporary buffers (im2col matrices, normalised
//! activations, concatenated inputs).
//!
//! A fresh `vec![0.0; n]` per call costs a `malloc`, often fresh pages from the kernel (a 32-channel
//! im2col matrix of a 28 × 28 image is 900 KB, above glibc's mmap threshold), and a `memset` of the whole
//! buffer, all before the kernel reads a byte, for buffers that im2col was about to overwrite. A
//! [`Scratch`] instead takes a buffer from its thread's free list and gives it back when dropped, so after
//! the first call a kernel's temporaries cost neither: a 32-channel U-Net's single-image latency went 1.68
//! → 1.59 ms (`flowmap bench speed --rows unet-latency-1nfe`, six alternating pairs of the binaries, best of each run).
//!
//! The contract: a scratch buffer holds whatever its last user left there (initialised `f32`s, never
//! uninitialised memory), so a kernel writes every element before it reads it, as im2col, the norms and
//! the bias fills do.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps at most; more are freed. A residual block's backward pass holds twelve at once.
const KEEP: usize = 16;

/// The largest buffer a thread keeps (4 MB): every temporary of a 28 × 28 U-Net up to 32 channels fits,
/// and a thread holds at most 64 MB between calls. Larger buffers are allocated per call, as before, where
/// their zeroing is a smaller share of the work.
const KEEP_FLOATS: usize = 1 << 20;

thread_local! {
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `len` floats of scratch memory, returned to the thread's free list when dropped. Its contents are
/// unspecified (but initialised): write before reading.
pub(crate) struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    pub fn new(len: usize) -> Scratch {
        if len == 0 || len > KEEP_FLOATS {
            // Too large to keep: its own allocation, leaving the thread's kept buffers alone.
            return Scratch {
                buf: vec![0.0; len],
                len,
            };
        }
        let mut buf = FREE
            .try_with(|f| {
                let mut f = f.borrow_mut();
                // The smallest kept buffer that fits, else the largest (grown below).
                let fit = (0..f.len())
                    .filter(|&i| f[i].len() >= len)
                    .min_by_key(|&i| f[i].len())
                    .or_else(|| (0..f.len()).max_by_key(|&i| f[i].len()));
                fit.map(|i| f.swap_remove(i))
            })
            .ok()
            .flatten()
            .unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Scratch { buf, len }
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.is_empty() || buf.len() > KEEP_FLOATS {
            return;
        }
        // A thread being torn down has no list left: the buffer is simply freed.
        let _ = FREE.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(buf);
            } else if let Some(small) = f.iter_mut().min_by_key(|b| b.len()) {
                // Keep the larger of the two.
                if small.len() < buf.len() {
                    *small = buf;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Scratch;

    #[test]
    fn buffers_come_back_to_their_thread_and_fit_any_length() {
        let p = {
            let mut a = Scratch::new(1000);
            a.fill(1.0);
            a.as_ptr()
        };
        // The same allocation serves a smaller request next, with its old contents.
        let b = Scratch::new(10);
        assert_eq!(b.as_ptr(), p);
        assert_eq!(b.len(), 10);
        assert!(b.iter().all(|&v| v == 1.0));
        // A larger request grows a kept buffer (the list is left empty) instead of allocating beside it.
        let kept = || super::FREE.with(|f| f.borrow().iter().map(Vec::len).max());
        drop(b);
        let mut c = Scratch::new(5000);
        assert_eq!(kept(), None);
        c.fill(2.0);
        assert_eq!(c.len(), 5000);
        drop(c);
        assert_eq!(kept(), Some(5000));
        assert!(Scratch::new(0).is_empty());
        // A buffer above the cap is freed, not kept.
        let before = kept();
        drop(Scratch::new(super::KEEP_FLOATS + 1));
        assert_eq!(kept(), before);
    }
}
