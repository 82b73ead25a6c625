//! Nearest-neighbour 2× upsampling of `B × C × H × W` images as one graph node on the CPU. Composed from
//! candle ops it is a broadcast to `B × C × H × 2 × W × 2` and a strided copy forward, and a reduction over
//! the two broadcast axes backward, each a generic single-threaded strided loop; here each is one pass per
//! block of images, its gradient the sum over each 2 × 2 block.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{applies, cpu_slice, map_blocks};
use crate::Result;

/// Channel planes per parallel block.
const PLANES_PER_BLOCK: usize = 16;

/// `y[b, c, 2i + a, 2j + e] = x[b, c, i, j]` for `a, e ∈ {0, 1}`. Gradients flow to `x`. The fast node runs
/// on f32 CPU tensors; elsewhere it is [`plain`], which it matches exactly.
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    if applies(x.device(), x.dtype()) && x.rank() == 4 {
        let x = x.contiguous()?;
        let tracked = super::grad_enabled() && x.track_op();
        return Ok(if tracked {
            x.apply_op1(Upsample2)?
        } else {
            x.apply_op1_no_bwd(&Upsample2)?
        });
    }
    plain(x)
}

/// The reference: a broadcast over two new axes and a reshape (its backward sums them).
pub fn plain(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

struct Upsample2;

/// `dst` (`2h × 2w` planes) from `src` (`h × w` planes), plane by plane.
fn up(src: &[f32], dst: &mut [MaybeUninit<f32>], w: usize) {
    for (line, out) in src.chunks_exact(w).zip(dst.chunks_exact_mut(4 * w)) {
        let (top, bottom) = out.split_at_mut(2 * w);
        for (pair, &v) in top.chunks_exact_mut(2).zip(line) {
            pair.fill(MaybeUninit::new(v));
        }
        bottom.copy_from_slice(top);
    }
}

/// `dx[i, j] = Σ_{a, e} g[2i + a, 2j + e]`, plane by plane.
fn down(g: &[f32], dx: &mut [f32], w: usize) {
    for (out, lines) in dx.chunks_exact_mut(w).zip(g.chunks_exact(4 * w)) {
        let (top, bottom) = lines.split_at(2 * w);
        for ((o, t), b) in out.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
            *o = (t[0] + t[1]) + (b[0] + b[1]);
        }
    }
}

impl CustomOp1 for Upsample2 {
    fn name(&self) -> &'static str {
        "flowmap-upsample2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = cpu_slice(s, l, "x")?;
        let (plane, n) = (h * w, 4 * x.len());
        let mut y: Vec<f32> = Vec::with_capacity(n);
        if plane > 0 {
            let blocks: Vec<_> = y.spare_capacity_mut()[..n]
                .chunks_mut(PLANES_PER_BLOCK * 4 * plane)
                .zip(x.chunks(PLANES_PER_BLOCK * plane))
                .collect();
            map_blocks(blocks, |(dst, src)| up(src, dst, w));
        }
        // SAFETY: the blocks cover all `n` elements and `up` writes every one of its block's.
        unsafe { y.set_len(n) };
        Ok((CpuStorage::F32(y), Shape::from((b, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (b, c, h, w) = x.dims4()?;
        let Some(gr) = super::read(&grad) else {
            // Not on the CPU in f32: candle's 2 × 2 mean pool, times 4.
            return Ok(Some((grad.avg_pool2d(2)? * 4.0)?));
        };
        let plane = h * w;
        let mut dx = vec![0.0f32; b * c * plane];
        if plane > 0 {
            let blocks: Vec<_> = dx
                .chunks_mut(PLANES_PER_BLOCK * plane)
                .zip(gr.slice().chunks(PLANES_PER_BLOCK * 4 * plane))
                .collect();
            map_blocks(blocks, |(dst, g)| down(g, dst, w));
        }
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
    fn matches_the_broadcast_in_values_and_gradients() {
        for (b, c, h, w) in [(2, 3, 4, 5), (1, 17, 7, 7), (3, 40, 1, 2)] {
            let x = Var::from_tensor(&rand(&[b, c, h, w], 1)).unwrap();
            let fast = upsample2(&x).unwrap();
            let slow = plain(&x).unwrap();
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

    #[test]
    fn bit_identical_across_thread_counts() {
        let x = Var::from_tensor(&rand(&[5, 9, 6, 6], 3)).unwrap();
        same_on_1_and_4_threads(|| {
            let y = upsample2(&x).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (flat(&y), flat(g.get(&x).unwrap()))
        });
    }
}
