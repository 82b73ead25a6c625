//! The shape of one convolution: channels in and out, the image's height and width, the kernel's size.
//! Shared by the im2col route ([`super::conv`]) and the direct 3×3 kernels ([`super::direct`]).

use candle_core::Layout;

#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
}

impl Geometry {
    pub(super) fn of(x: &Layout, w: &Layout) -> candle_core::Result<(usize, Geometry)> {
        let (b, c_in, h, wd) = x.shape().dims4()?;
        let (c_out, c_in2, k, _) = w.shape().dims4()?;
        if c_in != c_in2 {
            candle_core::bail!("conv2d: input has {c_in} channels, the kernel expects {c_in2}");
        }
        Ok((
            b,
            Geometry {
                c_in,
                c_out,
                h,
                w: wd,
                k,
            },
        ))
    }
    pub fn hw(&self) -> usize {
        self.h * self.w
    }
    /// Rows of the im2col matrix, `I·k²`.
    pub fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }
    /// Rows of the output gradient's im2col matrix, `O·k²`.
    pub(super) fn g_rows(&self) -> usize {
        self.c_out * self.k * self.k
    }
}
