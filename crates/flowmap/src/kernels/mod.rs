//! The CPU fast path: fused f32 kernels behind the same layer and optimiser API.
//!
//! candle's CPU backend runs every elementwise op as its own single-threaded pass into a fresh buffer, its
//! SiLU backward as eight such passes, and its `AdamW` as a dozen tensor ops per parameter. On the CPU, in
//! f32, flowmap runs instead:
//!
//! - [`dense`]: `act(x·Wᵀ + b)` as one graph node. The GEMM writes `x·Wᵀ`; one parallel pass adds the bias
//!   and applies the activation, keeping the pre-activation for the backward pass, which computes
//!   `dz = g ⊙ act'(z)` and `db = Σ_rows dz` in one pass, then `dx = dz·W` and `dW = dzᵀ·x` by GEMM;
//! - [`mlp`]: a whole MLP as one graph node when training, each block of rows going through every layer,
//!   forward then backward, on one core (hidden gradients never become candle tensors), and under
//!   [`no_grad`] the same blocks without a node or kept activations;
//! - [`conv2d`]: a stride-1 "same" convolution as one node. A 3×3 kernel on an AVX-512 CPU reads the image
//!   in place, register block by register block, forward and for both gradients (`direct`); otherwise
//!   im2col and a GEMM per image forward, and backward one im2col of the output gradient feeds both the
//!   input's and the weight's GEMM. The two routes give the same bits;
//! - [`group_norm`]: GroupNorm, its affine map, the U-Net's per-sample scale-shift and SiLU as one node
//!   with its backward, and [`group_norm_jvp`], the same with its tangent in one pass;
//! - [`norm_conv2d`]: that GroupNorm and the convolution after it as one node that recomputes the
//!   normalised activation in its backward pass instead of keeping it, and [`res_block`], the U-Net's
//!   whole residual block (two of those and the skip) as one node;
//! - [`upsample2`] and [`pool2`]: nearest-neighbour 2× upsampling and 2 × 2 mean pooling, each the other's
//!   backward, one pass each;
//! - [`AdamW`](crate::optim::AdamW) and the weight EMA as one in-place pass per parameter
//!   ([`crate::optim`]);
//! - parallel regions on the fast path's own workers (the `pool` module), which spin between the regions of a
//!   training step instead of falling asleep after each;
//! - kernel temporaries (im2col matrices, normalised activations) from per-thread scratch memory (the
//!   `scratch` module) instead of a zeroed allocation per call; and a batch of one image, which is one
//!   block of the pool, splits its larger convolutions into bands of pixels and its GroupNorms by groups
//!   across the cores (sampling latency), a split fixed by size so the bits do not depend on the thread
//!   count.
//!
//! GEMMs go through the `gemm` crate with its AVX-512 or AVX2 kernels, whichever the CPU has (the same crate
//! candle's CPU matmul uses); the direct convolution sums in the same order and the same depth chunks.
//! A forward pass that runs as several blocks of rows transposes each weight once and lets every block's
//! product read `Wᵀ` directly, instead of each product repacking `W` (the batch-256 profile spent 17% of
//! an EMD step packing weights).
//! Elementwise kernels are compiled for AVX-512 and AVX2 and picked at run time, with a polynomial `exp`
//! (Cephes' `expf`, ≤ 2 ulp) that vectorises.
//!
//! Anything else — a CUDA device, f64 tensors, or the fast path switched off with [`set_enabled`] — takes
//! candle's own ops, unchanged. Tests check that the two paths agree to f32 rounding, in values and in
//! gradients.

mod bf16;
mod conv;
mod dense;
mod direct;
mod embed;
mod geometry;
mod mlp;
mod norm;
mod norm_conv;
mod pool;
mod res_block;
mod resample;
mod scratch;
mod simd;
#[cfg(test)]
mod testing;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::Result;

pub use conv::{conv2d, plain as conv2d_plain};
pub use dense::{dense, dense_jvp, plain as dense_plain, Activation};
pub use embed::conditioning;
pub use mlp::{mlp, Layer};
pub use norm::{group_norm, group_norm_jvp, plain as group_norm_plain, plain_jvp as group_norm_plain_jvp};
pub use norm_conv::{norm_conv2d, plain as norm_conv2d_plain};
pub use res_block::{plain as res_block_plain, res_block, res_block_jvp, ResBlockParams};
pub use resample::{plain_upsample2 as upsample2_plain, pool2, upsample2};
pub(crate) use simd::AdamScalars;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches the CPU fast path on (the default) or off (every op then runs as plain candle ops).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether the fast path is switched on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Whether tensors of this device and dtype take the fast path.
pub(crate) fn applies(device: &Device, dtype: DType) -> bool {
    enabled() && device.is_cpu() && dtype == DType::F32
}

/// The precision of the fast path's matrix products (the GEMMs of dense layers, MLPs and convolutions).
///
/// `Bf16` is mixed precision: the operands of each product are rounded to bf16 and the products summed in
/// f32 ([`bf16`]'s kernels, on a CPU with AVX-512 BF16), while everything else (weights and their
/// optimiser, the EMA, norms, activations, the time embedding, losses, tangents outside the products)
/// stays f32. On a CPU without the instructions, and off the fast path, `Bf16` computes in f32
/// ([`Precision::effective`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// What this CPU computes when asked for `self`: `Bf16` only where the bf16 kernels run.
    pub fn effective(self) -> Precision {
        match self {
            Precision::Bf16 if bf16::available() => Precision::Bf16,
            _ => Precision::F32,
        }
    }

    /// One line on what `self` runs as on `device`: candle's bf16 ops off the CPU, bf16-rounded operands
    /// on the CPU with the fast path off, else [`Precision::describe`].
    pub fn describe_on(self, device: &Device) -> String {
        match self {
            Precision::Bf16 if !device.is_cpu() => {
                "bf16 matrix products and convolutions (candle's bf16 ops on this device)".to_string()
            }
            Precision::Bf16 if !enabled() => {
                "bf16 operands, f32 sums (candle's f32 ops on bf16-rounded operands: the fast path is off)".to_string()
            }
            _ => self.describe(),
        }
    }

    /// One line on what `self` runs as on the CPU here: the kernel, or the f32 fallback and why.
    pub fn describe(self) -> String {
        match (self, self.effective()) {
            (Precision::F32, _) => "f32".to_string(),
            (_, Precision::Bf16) => "bf16 matrix products with f32 sums (AVX-512 BF16 vdpbf16ps kernels)".to_string(),
            (_, Precision::F32) => {
                "bf16 asked for, but this CPU has no AVX-512 BF16: the products run in f32".to_string()
            }
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(crate::Error::arg(format!(
                "unknown precision '{s}' (expected f32 or bf16)"
            ))),
        }
    }
}

/// Runs `f` with the matrix products in `precision` on this thread: the fast path's (and its workers'
/// while they run its blocks), and off it, candle's own products and convolutions on any device
/// ([`plain_matmul`], [`plain_conv2d`]).
pub fn with_precision<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    let _scope = PrecisionScope::enter(precision);
    f()
}

/// The matrix products in a precision on this thread until the scope is dropped, which restores the
/// precision before it ([`with_precision`] for a whole function body).
#[must_use = "the precision holds only while the scope lives"]
pub struct PrecisionScope {
    before: Precision,
    asked: Precision,
}

impl PrecisionScope {
    pub fn enter(precision: Precision) -> PrecisionScope {
        PrecisionScope {
            before: PRECISION.with(|c| c.replace(precision.effective())),
            asked: ASKED.with(|c| c.replace(precision)),
        }
    }
}

impl Drop for PrecisionScope {
    fn drop(&mut self) {
        PRECISION.with(|c| c.set(self.before));
        ASKED.with(|c| c.set(self.asked));
    }
}

/// The precision of this thread's products ([`with_precision`]): what runs, after the CPU's fallback.
pub fn precision() -> Precision {
    PRECISION.with(|c| c.get())
}

/// Whether candle's own ops run a product of `t` in bf16: bf16 was asked for ([`with_precision`]), `t` is
/// f32, and it is off the fast path (another device, or the fast path switched off).
pub(crate) fn plain_bf16(t: &Tensor) -> bool {
    ASKED.with(|c| c.get()) == Precision::Bf16 && t.dtype() == DType::F32 && !(enabled() && t.device().is_cpu())
}

/// `t` in bf16 for a product: on a GPU the bf16 tensor itself (its products take bf16 operands and sum in
/// f32: cuBLAS's and candle's kernels do, as PyTorch's autocast); on the CPU, whose candle ops lack some
/// bf16 products, `t` rounded to bf16 and kept in f32, so that the f32 product of rounded operands computes
/// the same thing.
fn bf16_operand(t: &Tensor) -> Result<Tensor> {
    let h = t.to_dtype(DType::BF16)?;
    Ok(if t.device().is_cpu() {
        h.to_dtype(DType::F32)?
    } else {
        h
    })
}

/// `a · b` off the fast path, in the precision asked for ([`plain_bf16`]).
pub(crate) fn plain_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if plain_bf16(a) {
        return Ok(bf16_operand(a)?.matmul(&bf16_operand(b)?)?.to_dtype(DType::F32)?);
    }
    Ok(a.matmul(b)?)
}

/// A stride-1 convolution of `x` by `w` with `padding`, off the fast path, in the precision asked for.
pub(crate) fn plain_conv2d(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    if plain_bf16(x) {
        let y = bf16_operand(x)?.conv2d(&bf16_operand(w)?, padding, 1, 1, 1)?;
        return Ok(y.to_dtype(DType::F32)?);
    }
    Ok(x.conv2d(w, padding, 1, 1, 1)?)
}

thread_local! {
    static PRECISION: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::F32) };
    static ASKED: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::F32) };
    static THREADS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Evaluates `f` without recording a backward pass and detaches its result: the stop-gradient `sg(·)` of
/// the objectives, and inference (PyTorch's `torch.no_grad()`).
///
/// candle counts every variable as tracked, so a frozen teacher or a stop-gradient target would otherwise
/// run as training graph nodes that keep every layer's activations for a backward pass that never comes.
/// Inside `f`, the fast path's layers keep nothing and the whole MLP runs block by block through
/// per-block scratch buffers. The numbers are the same either way (tested).
pub fn no_grad(f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
    let before = NO_GRAD.with(|c| c.replace(true));
    let out = f();
    NO_GRAD.with(|c| c.set(before));
    Ok(out?.detach())
}

/// Whether the ops on this thread record their backward pass (false inside [`no_grad`]).
pub(crate) fn grad_enabled() -> bool {
    !NO_GRAD.with(|c| c.get())
}

/// Runs `f` with the fast path's kernels limited to `n` threads on this thread (for jobs that run side by
/// side, each on its own core).
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    let before = THREADS.with(|c| c.replace(Some(n.max(1))));
    let out = f();
    THREADS.with(|c| c.set(before));
    out
}

/// The number of threads the fast path splits work across: this thread's [`with_threads`] limit, else
/// `RAYON_NUM_THREADS` (set by [`crate::set_compute_threads`]), else every core.
pub fn threads() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(n) = THREADS.with(|c| c.get()) {
        return n;
    }
    match std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        Some(n) if n > 0 => n,
        _ => *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// The smallest batch split across threads: below it, handing blocks to other threads costs more than it
/// saves (measured on 2 cores: batch 256 trains faster on one thread at widths 256 and 512).
pub(crate) const PARALLEL_ROWS: usize = 512;

/// Rows per block of a `b`-row batch. Blocks depend on the batch alone, never on the thread count, so a
/// run gives the same numbers on any number of threads: batches below [`PARALLEL_ROWS`] are one block,
/// larger ones blocks of 256 rows (small enough that a block's activations stay in a core's L2 cache while
/// its product, bias and activation run).
pub(crate) fn block_rows(b: usize) -> usize {
    if b < PARALLEL_ROWS {
        b.max(1)
    } else {
        256
    }
}

/// Runs `f` on every block, across threads when there are several blocks and threads, and returns the
/// results in block order: on the fast path's own workers ([`pool`]) when it has them for this thread
/// count, else on rayon's.
pub(crate) fn map_blocks<T: Send, R: Send>(blocks: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
    on_pool(blocks, false, f)
}

/// As [`map_blocks`] for at most [`threads()`] blocks, with block `i` on the same thread at every call
/// (the caller runs block 0), so that what each block reads stays in its own core's cache between calls.
/// Without the fast path's workers, the blocks run one after another on the caller.
pub(crate) fn map_blocks_pinned<T: Send, R: Send>(blocks: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
    debug_assert!(blocks.len() <= threads().max(1));
    on_pool(blocks, true, f)
}

fn on_pool<T: Send, R: Send>(blocks: Vec<T>, pinned: bool, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
    use rayon::prelude::*;
    use std::sync::Mutex;
    let (n, threads) = (blocks.len(), threads());
    if n <= 1 || threads <= 1 {
        return blocks.into_iter().map(f).collect();
    }
    // The workers compute in the caller's precision.
    let p = precision();
    let f = move |b: T| with_precision(p, || f(b));
    let pool = pool::Pool::get(threads).filter(|_| !pinned || n <= threads);
    let Some(pool) = pool else {
        if pinned {
            return blocks.into_iter().map(f).collect();
        }
        return blocks.into_par_iter().map(f).collect();
    };
    let inputs: Vec<Mutex<Option<T>>> = blocks.into_iter().map(|b| Mutex::new(Some(b))).collect();
    let outputs: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let run = |i: usize| {
        let block = inputs[i].lock().expect("block").take().expect("each block runs once");
        let out = f(block);
        *outputs[i].lock().expect("block result") = Some(out);
    };
    let ran = if pinned {
        pool.run_pinned(n, &run)
    } else {
        pool.run(n, &run)
    };
    if ran {
        outputs
            .into_iter()
            .map(|o| o.into_inner().expect("block result").expect("every block ran"))
            .collect()
    } else {
        // The pool is running another job (a nested or concurrent call): run the blocks here.
        inputs
            .into_iter()
            .map(|b| f(b.into_inner().expect("block").expect("a block not yet run")))
            .collect()
    }
}

/// The posterior mean of the data points `x0` (`n × d`) given each row of `xt` (`b × d`) on the linear
/// path at its time `t` (`b`): `Σ_j w_j·x0_j` with `w_j = softmax_j(−‖x_t − (1 − t)·x0_j‖² / 2t²)`, one fused
/// pass per row, rows spread over the threads. `None` when a tensor is not contiguous f32 on the CPU (or the
/// fast path is off); the caller then takes candle's ops.
pub(crate) fn posterior_mean(xt: &Tensor, t: &Tensor, x0: &Tensor) -> Result<Option<Tensor>> {
    if !applies(xt.device(), xt.dtype()) || x0.dtype() != DType::F32 || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, d) = xt.dims2()?;
    let n = x0.dim(0)?;
    let x0t = x0.t()?.contiguous()?;
    let (xt, t) = (xt.contiguous()?, t.flatten_all()?.contiguous()?);
    let (Some(xr), Some(tr), Some(zr)) = (read(&xt), read(&t), read(&x0t)) else {
        return Ok(None);
    };
    let (xs, ts, zs) = (xr.slice(), tr.slice(), zr.slice());
    let mut out = vec![0.0f32; b * d];
    let rows = block_rows(b);
    let blocks: Vec<(usize, &mut [f32])> = out.chunks_mut((rows * d).max(1)).enumerate().collect();
    map_blocks(blocks, |(i, oc)| {
        let mut buf = vec![0.0f32; n];
        for (r, o) in oc.chunks_exact_mut(d).enumerate() {
            let row = i * rows + r;
            let tv = ts[row];
            let inv = 1.0 / (2.0 * tv * tv);
            simd::posterior_mean_row(&xs[row * d..(row + 1) * d], 1.0 - tv, inv, zs, &mut buf, o);
        }
    });
    Ok(Some(Tensor::from_vec(out, (b, d), xt.device())?))
}

/// The element-wise sum of per-block partial sums, added in block order (so the same bits on any thread
/// count), in parallel over ranges of elements. `None` when there are no parts.
pub(crate) fn sum_in_order(parts: Vec<Vec<f32>>) -> Option<Vec<f32>> {
    const CHUNK: usize = PARAM_CHUNK;
    let mut parts = parts.into_iter();
    let mut acc = parts.next()?;
    let rest: Vec<Vec<f32>> = parts.collect();
    if !rest.is_empty() {
        let chunks: Vec<(usize, &mut [f32])> = acc.chunks_mut(CHUNK).enumerate().collect();
        map_blocks(chunks, |(i, c)| {
            for p in &rest {
                simd::add_assign(c, &p[i * CHUNK..]);
            }
        });
    }
    Some(acc)
}

/// A block of a backward pass over images: its index and its images' input gradient, beside their
/// per-sample gradient (a scale-shift's).
pub(crate) type GradBlock<'a> = ((usize, &'a mut [f32]), &'a mut [f32]);

/// Elements per piece of a parallel elementwise pass over parameters.
const PARAM_CHUNK: usize = 1 << 14;

/// One AdamW step over a parameter in place, its moments `m`, `v` and gradient `g` alongside; large
/// parameters in pieces across the threads (elementwise, so the same bits on any thread count).
pub(crate) fn adamw_update(theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], a: AdamScalars) {
    let pieces: Vec<_> = theta
        .chunks_mut(PARAM_CHUNK)
        .zip(m.chunks_mut(PARAM_CHUNK))
        .zip(v.chunks_mut(PARAM_CHUNK))
        .zip(g.chunks(PARAM_CHUNK))
        .collect();
    map_blocks(pieces, |(((p, m), v), g)| simd::adamw_update(p, m, v, g, a));
}

/// `ema ← d·ema + (1 − d)·live` in place; large parameters in pieces across the threads.
pub(crate) fn ema_update(ema: &mut [f32], live: &[f32], d: f32) {
    let pieces: Vec<_> = ema.chunks_mut(PARAM_CHUNK).zip(live.chunks(PARAM_CHUNK)).collect();
    map_blocks(pieces, |(e, l)| simd::ema_update(e, l, d));
}

/// `dst += lhs·rhs` (`read_dst`) or `dst = lhs·rhs` on the calling thread, row-major `dst` (`m × n`, row
/// stride `n`); `lhs` is `m × k` and `rhs` `k × n`, each given by a pointer and its (row, column) strides.
/// Callers parallelise over blocks of rows themselves, so that each block's elementwise work runs right
/// after its product, on the same core, while the block is in cache.
///
/// # Safety
/// Each pointer must address a buffer that holds every element its strides reach.
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    read_dst: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    gemm_strided(m, n, k, (dst, n as isize, 1), read_dst, lhs, rhs)
}

/// [`gemm`] with `dst` given by its (row, column) strides too. A column-major `dst` (row stride 1) keeps
/// the product's orientation: the gemm crate packs `lhs` (`m × k`) unless its row stride is 1, so the
/// caller chooses which operand is packed.
///
/// # Safety
/// As for [`gemm`].
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    read_dst: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    if precision() == Precision::Bf16 {
        return bf16::gemm(m, n, k, dst, read_dst, lhs, rhs);
    }
    let par = gemm::Parallelism::None;
    gemm::gemm(
        m, n, k, dst.0, dst.2, dst.1, read_dst, lhs.0, lhs.2, lhs.1, rhs.0, rhs.2, rhs.1, 1.0, 1.0, false, false,
        false, par,
    );
}

/// The contiguous f32 data of a CPU storage under `layout`, or an error naming `what`.
pub(crate) fn cpu_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what} must be contiguous f32"),
    }
}

/// A read lock on a tensor's contiguous f32 CPU data; several can be held at once (one per operand).
pub(crate) struct CpuRead<'a> {
    guard: candle_core::StorageRef<'a>,
    range: std::ops::Range<usize>,
}

impl CpuRead<'_> {
    pub(crate) fn slice(&self) -> &[f32] {
        match &*self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => unreachable!("checked by `read`"),
        }
    }
}

/// Read access to the contiguous f32 data of a CPU tensor, or `None` (then the caller falls back to
/// candle's ops).
pub(crate) fn read(t: &Tensor) -> Option<CpuRead<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (a, b) = layout.contiguous_offsets()?;
    matches!(&*guard, candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)))
        .then_some(CpuRead { guard, range: a..b })
}
