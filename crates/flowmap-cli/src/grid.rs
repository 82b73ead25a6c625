//! Image grids: samples `N × C × H × W` in `[−1, 1]` tiled into one PNG, one row per class.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// Writes `x` (`N × C × H × W`, values in `[−1, 1]`, `C` = 1 or 3) as a grid of `rows` rows, image `i` in
/// row `i mod rows`, column `i / rows` (so that with labels `i mod C` each row is one class), with a
/// one-pixel gap. Written atomically: a failure leaves nothing behind.
pub fn write_grid(path: &Path, x: &Tensor, rows: usize) -> Result<()> {
    let (n, c, h, w) = x.dims4().context("an image grid needs N × C × H × W samples")?;
    if c != 1 && c != 3 {
        bail!("an image grid needs 1 or 3 channels, got {c}");
    }
    let rows = rows.clamp(1, n.max(1));
    let cols = n.div_ceil(rows);
    let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (gw, gh) = ((w + 1) * cols + 1, (h + 1) * rows + 1);
    let mut img = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    let px = |val: f32| ((val.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
    for i in 0..n {
        let (r, col) = (i % rows, i / rows);
        let (x0, y0) = (1 + col * (w + 1), 1 + r * (h + 1));
        for y in 0..h {
            for xx in 0..w {
                let at = |ch: usize| v[((i * c + ch) * h + y) * w + xx];
                let rgb = if c == 1 {
                    [px(at(0)); 3]
                } else {
                    [px(at(0)), px(at(1)), px(at(2))]
                };
                img.put_pixel((x0 + xx) as u32, (y0 + y) as u32, image::Rgb(rgb));
            }
        }
    }
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    flowmap::io::write_atomic(path, |w| w.write_all(&png))?;
    Ok(())
}
