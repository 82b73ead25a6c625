//! The first layer's input `[x, sin ωt, cos ωt, (sin ωg, cos ωg)]` in one pass on the CPU.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::simd;
use crate::Result;

/// `[x, sin(ω t), cos(ω t)]`, or with `tg` holding two columns `(t, g)`,
/// `[x, sin(ω t), cos(ω t), sin(ω g), cos(ω g)]`, for `x`: `B × D` and frequencies `ω` (`K` of them).
///
/// On the CPU in f32 this is one pass with a vectorised sine and cosine; the caller uses candle's ops
/// elsewhere. Gradients reach `x` and `tg` (`d/dt sin ωt = ω cos ωt`, `d/dt cos ωt = −ω sin ωt`).
pub fn conditioning(x: &Tensor, tg: &Tensor, freqs: &[f32]) -> Result<Tensor> {
    let (x, tg) = (x.contiguous()?, tg.contiguous()?);
    let op = Conditioning { freqs: freqs.to_vec() };
    Ok(if super::grad_enabled() && (x.track_op() || tg.track_op()) {
        x.apply_op2(&tg, op)?
    } else {
        x.apply_op2_no_bwd(&tg, &op)?
    })
}

struct Conditioning {
    freqs: Vec<f32>,
}

impl CustomOp2 for Conditioning {
    fn name(&self) -> &'static str {
        "flowmap-conditioning"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_slice(s1, l1, "conditioning: x")?;
        let tg = super::cpu_slice(s2, l2, "conditioning: times")?;
        let (n, dim) = l1.shape().dims2()?;
        let (n2, cols) = l2.shape().dims2()?;
        if n != n2 {
            candle_core::bail!("conditioning: {n} states but {n2} times");
        }
        let k = self.freqs.len();
        let width = dim + 2 * k * cols;
        let mut out = vec![0.0f32; n * width];
        let rows = super::block_rows(n).max(1);
        let blocks: Vec<_> = out.chunks_mut(rows * width).enumerate().collect();
        super::map_blocks(blocks, |(i, block)| {
            let r0 = i * rows;
            for (j, row) in block.chunks_exact_mut(width).enumerate() {
                let r = r0 + j;
                row[..dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
                for c in 0..cols {
                    let base = dim + 2 * k * c;
                    let (sin, cos) = row[base..base + 2 * k].split_at_mut(k);
                    simd::sin_cos_scaled(tg[r * cols + c], &self.freqs, sin, cos);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, width))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        tg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dim = x.dim(1)?;
        let k = self.freqs.len();
        let dx = x.track_op().then(|| grad.narrow(1, 0, dim)).transpose()?;
        let dtg = if tg.track_op() {
            let freqs = Tensor::from_slice(&self.freqs, (1, k), tg.device())?;
            let mut cols = vec![];
            for c in 0..tg.dim(1)? {
                let arg = tg.narrow(1, c, 1)?.detach().broadcast_mul(&freqs)?;
                let base = dim + 2 * k * c;
                let (gs, gc) = (grad.narrow(1, base, k)?, grad.narrow(1, base + k, k)?);
                let slope_sin = arg.cos()?.broadcast_mul(&freqs)?;
                let slope_cos = arg.sin()?.broadcast_mul(&freqs)?.neg()?;
                cols.push(((gs * slope_sin)? + (gc * slope_cos)?)?.sum_keepdim(1)?);
            }
            Some(Tensor::cat(&cols, 1)?)
        } else {
            None
        };
        Ok((dx, dtg))
    }
}
