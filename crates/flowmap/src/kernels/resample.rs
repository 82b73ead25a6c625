//! Nearest-neighbour 2× upsampling and 2 × 2 mean pooling of `B × C × H × W` images, each as one graph node
//! on the CPU. Composed from candle ops, upsampling is a broadcast to `B × C × H × 2 × W × 2` and a strided
//! copy forward and a reduction over the two broadcast axes backward, and pooling a single-threaded loop
//! each way; here each direction is one pass per block of channel planes, on the kernel threads. Each op's
//! backward is the other one, scaled: the gradient of upsampling sums each 2 × 2 block, that of pooling
//! spreads a quarter of each entry over its block.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{applies, cpu_slice, map_blocks};
use crate::Result;

/// Channel planes per parallel block.
const PLANES_PER_BLOCK: usize = 16;

/// `y[b, c, 2i + a, 2j + e] = x[b, c, i, j]` for `a, e ∈ {0, 1}`. Gradients flow to `x`. The fast node runs
/// on f32 CPU tensors; elsewhere it is [`plain_upsample2`], which it matches exactly.
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    if applies(x.device(), x.dtype()) && x.rank() == 4 {
        return apply(x, Resample::Up);
    }
    plain_upsample2(x)
}

/// `y[b, c, i, j] = ¼ Σ_{a, e ∈ {0, 1}} x[b, c, 2i + a, 2j + e]` for even `H` and `W`. Gradients flow to
/// `x`. The fast node runs on f32 CPU tensors; elsewhere, and for odd sizes, it is candle's `avg_pool2d`,
/// which it matches to f32 rounding.
pub fn pool2(x: &Tensor) -> Result<Tensor> {
    if applies(x.device(), x.dtype()) && x.rank() == 4 && x.dim(2)? % 2 == 0 && x.dim(3)? % 2 == 0 {
        return apply(x, Resample::Down);
    }
    Ok(x.avg_pool2d(2)?)
}

/// The reference upsampling: a broadcast over two new axes and a reshape (its backward sums them).
pub fn plain_upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

fn apply(x: &Tensor, op: Resample) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(if super::grad_enabled() && x.track_op() {
        x.apply_op1(op)?
    } else {
        x.apply_op1_no_bwd(&op)?
    })
}

#[derive(Clone, Copy)]
enum Resample {
    Up,
    Down,
}

/// `dst` (`2h × 2w` planes) from `src` (`h × w` planes): each entry times `scale` over its 2 × 2 block.
fn spread(src: &[f32], dst: &mut [MaybeUninit<f32>], w: usize, scale: f32) {
    for (line, out) in src.chunks_exact(w).zip(dst.chunks_exact_mut(4 * w)) {
        let (top, bottom) = out.split_at_mut(2 * w);
        for (pair, &v) in top.chunks_exact_mut(2).zip(line) {
            pair.fill(MaybeUninit::new(v * scale));
        }
        bottom.copy_from_slice(top);
    }
}

/// `dst[i, j] = scale · Σ_{a, e} src[2i + a, 2j + e]` (`src`: `2h × 2w` planes, `dst`: `h × w`; `w` is the
/// output's width).
fn gather(src: &[f32], dst: &mut [MaybeUninit<f32>], w: usize, scale: f32) {
    for (out, lines) in dst.chunks_exact_mut(w).zip(src.chunks_exact(4 * w)) {
        let (top, bottom) = lines.split_at(2 * w);
        for ((o, t), b) in out.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
            o.write(((t[0] + t[1]) + (b[0] + b[1])) * scale);
        }
    }
}

/// One direction over whole images: `up` spreads `x` (`… × h × w`) to `… × 2h × 2w`, otherwise gathers
/// `x` (`… × 2h × 2w`) to `… × h × w`; `(h, w)` is the smaller plane's size.
fn run(x: &[f32], h: usize, w: usize, up: bool, scale: f32) -> Vec<f32> {
    let small = h * w;
    let n = if up { 4 * x.len() } else { x.len() / 4 };
    let mut y: Vec<f32> = Vec::with_capacity(n);
    if small > 0 {
        let (src_plane, dst_plane) = if up { (small, 4 * small) } else { (4 * small, small) };
        let blocks: Vec<_> = y.spare_capacity_mut()[..n]
            .chunks_mut(PLANES_PER_BLOCK * dst_plane)
            .zip(x.chunks(PLANES_PER_BLOCK * src_plane))
            .collect();
        map_blocks(blocks, |(dst, src)| {
            if up {
                spread(src, dst, w, scale)
            } else {
                gather(src, dst, w, scale)
            }
        });
    }
    // SAFETY: the blocks cover all `n` elements (none when a plane is empty), and `spread` and `gather`
    // write every one of their block's.
    debug_assert!(small > 0 || n == 0);
    unsafe { y.set_len(n) };
    y
}

impl CustomOp1 for Resample {
    fn name(&self) -> &'static str {
        match self {
            Resample::Up => "flowmap-upsample2",
            Resample::Down => "flowmap-pool2",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = cpu_slice(s, l, "x")?;
        let (y, shape) = match self {
            Resample::Up => (run(x, h, w, true, 1.0), (b, c, 2 * h, 2 * w)),
            Resample::Down => (run(x, h / 2, w / 2, false, 0.25), (b, c, h / 2, w / 2)),
        };
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (b, c, h, w) = x.dims4()?;
        let Some(gr) = super::read(&grad) else {
            // Not on the CPU in f32: candle's ops.
            return Ok(Some(match self {
                Resample::Up => (grad.avg_pool2d(2)? * 4.0)?,
                Resample::Down => (grad.upsample_nearest2d(h, w)? * 0.25)?,
            }));
        };
        let dx = match self {
            Resample::Up => run(gr.slice(), h, w, false, 1.0),
            Resample::Down => run(gr.slice(), h / 2, w / 2, true, 0.25),
        };
        Ok(Some(Tensor::from_vec(dx, (b, c, h, w), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{check_against_plain, flat, rand, same_on_1_and_4_threads};
    use candle_core::Var;

    /// Values exactly, and the gradient, against the broadcast composition, at square and non-square
    /// sizes and channel counts on either side of a block.
    #[test]
    fn upsampling_matches_the_broadcast_in_values_and_gradients() {
        for (b, c, h, w) in [(2, 3, 4, 5), (1, 17, 7, 7), (3, 40, 1, 2)] {
            let x = Var::from_tensor(&rand(&[b, c, h, w], 1)).unwrap();
            let fast = upsample2(&x).unwrap();
            let slow = plain_upsample2(&x).unwrap();
            assert_eq!(flat(&fast), flat(&slow), "{b} {c} {h} {w}");
            check_against_plain(
                &fast,
                &slow,
                &[("x", &x)],
                &rand(&[b, c, 2 * h, 2 * w], 2),
                1e-6,
                "upsample",
            );
        }
    }

    /// Values and the gradient against candle's `avg_pool2d`, and odd sizes falling back to it.
    #[test]
    fn pooling_matches_candle_in_values_and_gradients() {
        for (b, c, h, w) in [(2, 3, 4, 6), (1, 17, 14, 14), (3, 40, 2, 2)] {
            let x = Var::from_tensor(&rand(&[b, c, h, w], 3)).unwrap();
            let fast = pool2(&x).unwrap();
            let slow = x.avg_pool2d(2).unwrap();
            check_against_plain(
                &fast,
                &slow,
                &[("x", &x)],
                &rand(&[b, c, h / 2, w / 2], 4),
                1e-6,
                "pool",
            );
        }
        let odd = rand(&[1, 2, 5, 4], 5);
        assert_eq!(flat(&pool2(&odd).unwrap()), flat(&odd.avg_pool2d(2).unwrap()));
    }

    #[test]
    fn bit_identical_across_thread_counts() {
        let x = Var::from_tensor(&rand(&[5, 9, 6, 6], 3)).unwrap();
        same_on_1_and_4_threads(|| {
            let y = pool2(&upsample2(&x).unwrap()).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(g.get(&x).unwrap()))
        });
    }
}
