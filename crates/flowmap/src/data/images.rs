//! Image sets from files: `.npy` arrays (`N × H × W` or `N × C × H × W`, uint8 or float, labels from a
//! second `.npy` of `N` integers) and image folders (`DIR/CLASS/*.png|jpg`, the ImageFolder convention,
//! decoded by the `image` crate). Values are mapped to `[−1, 1]` from the data's own range ([`Scale`]).

use std::path::{Path, PathBuf};

use super::npy::{read_npy_nd, NpyType};
use super::Scale;
use crate::{Error, Result};

/// Images `N × C × H × W` scaled to `[−1, 1]`, with their labels and the scale that was applied.
pub struct ImageSet {
    pub count: usize,
    pub shape: [usize; 3],
    pub values: Vec<f64>,
    pub labels: Option<Vec<u32>>,
    pub scale: Scale,
}

/// An `.npy` image array, and its labels from `labels` when given.
pub fn read_npy_images(path: &Path, labels: Option<&Path>) -> Result<ImageSet> {
    let a = read_npy_nd(path)?;
    let name = path.display().to_string();
    let count = a.shape.first().copied().unwrap_or(0);
    let labels = labels.map(|l| read_labels(l, count)).transpose()?;
    image_set(&name, &a.shape, &a.data, a.dtype == NpyType::U8, labels)
}

/// Images of array shape `N × H × W` or `N × C × H × W` with values `data` (uint8 pixels `0..=255`, or
/// floats in their own range, mapped to `[−1, 1]`) and `N` labels when given; `name` names them in errors.
pub fn image_set(name: &str, shape: &[usize], data: &[f64], uint8: bool, labels: Option<Vec<u32>>) -> Result<ImageSet> {
    let (count, shape) = match shape[..] {
        [n, h, w] => (n, [1, h, w]),
        [n, c, h, w] => (n, [c, h, w]),
        ref other => {
            return Err(Error::data(format!(
                "{name}: images must be N × H × W or N × C × H × W, found shape {other:?}"
            )))
        }
    };
    let scale = if uint8 { Scale::U8 } else { Scale::of(data, name)? };
    if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
        return Err(Error::data(format!("{name}: contains a non-finite value ({bad})")));
    }
    if let Some(l) = &labels {
        if l.len() != count {
            return Err(Error::data(format!("{name}: {} labels for {count} images", l.len())));
        }
    }
    let values = data.iter().map(|&v| scale.to_model(v)).collect();
    Ok(ImageSet {
        count,
        shape,
        values,
        labels,
        scale,
    })
}

/// `N` non-negative integer labels from a 1-D `.npy` file.
pub fn read_labels(path: &Path, count: usize) -> Result<Vec<u32>> {
    let a = read_npy_nd(path)?;
    let name = path.display();
    if a.shape.len() != 1 {
        return Err(Error::data(format!(
            "{name}: labels must be a 1-D array, found shape {:?}",
            a.shape
        )));
    }
    if a.shape[0] != count {
        return Err(Error::data(format!("{name}: {} labels for {count} images", a.shape[0])));
    }
    a.data
        .iter()
        .map(|&v| {
            if v >= 0.0 && v.fract() == 0.0 && v < u32::MAX as f64 {
                Ok(v as u32)
            } else {
                Err(Error::data(format!("{name}: label {v} is not a non-negative integer")))
            }
        })
        .collect()
}

/// Whether a file name is an image the folder reader takes.
fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// The most pixels a compressed image file may decode to, per byte of the file: above deflate's and
/// JPEG's best ratios, so only a header that lies about the size is refused.
const MAX_PIXELS_PER_BYTE: u64 = 2048;

/// Decodes one image, refusing before any pixel buffer is allocated one whose header claims more pixels
/// than its file's size could hold.
fn decode(file: &Path) -> Result<image::DynamicImage> {
    let bad = |e: &dyn std::fmt::Display| Error::data(format!("{}: unreadable image ({e})", file.display()));
    let len = std::fs::metadata(file).map_err(|e| Error::io(file, e))?.len();
    let reader = || -> Result<image::io::Reader<std::io::BufReader<std::fs::File>>> {
        image::io::Reader::open(file)
            .map_err(|e| Error::io(file, e))?
            .with_guessed_format()
            .map_err(|e| Error::io(file, e))
    };
    let (w, h) = reader()?.into_dimensions().map_err(|e| bad(&e))?;
    let budget = len.saturating_mul(MAX_PIXELS_PER_BYTE).saturating_add(1 << 16);
    if (w as u64) * (h as u64) > budget {
        return Err(Error::data(format!(
            "{}: the header claims {w} × {h} pixels, more than its {len} bytes can hold",
            file.display()
        )));
    }
    let mut r = reader()?;
    let mut limits = image::io::Limits::default();
    limits.max_alloc = Some(budget.saturating_mul(4));
    r.limits(limits);
    r.decode().map_err(|e| bad(&e))
}

/// An image folder `DIR/CLASS/*.png|jpg`: classes are the sub-folders in name order (label `i` is the
/// `i`-th), every image must have the same size; grey-scale when every image is, RGB otherwise; uint8
/// values mapped by [`Scale::U8`].
pub fn read_folder(dir: &Path) -> Result<(ImageSet, Vec<String>)> {
    let name = dir.display();
    let classes: Vec<PathBuf> = sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    if classes.is_empty() {
        return Err(Error::data(format!(
            "{name}: no class folders (expected DIR/CLASS/*.png)"
        )));
    }
    let mut decoded = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        for file in sorted_entries(class)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
        {
            let img = decode(&file)?;
            decoded.push((label as u32, file, img));
        }
    }
    if decoded.is_empty() {
        return Err(Error::data(format!(
            "{name}: no .png or .jpg images in its class folders"
        )));
    }
    let (w, h) = (decoded[0].2.width(), decoded[0].2.height());
    if let Some((_, f, img)) = decoded.iter().find(|(_, _, i)| (i.width(), i.height()) != (w, h)) {
        return Err(Error::data(format!(
            "{}: image is {} × {}, but {} is {w} × {h}: every image of a set must have the same size",
            f.display(),
            img.width(),
            img.height(),
            decoded[0].1.display()
        )));
    }
    let grey = decoded.iter().all(|(_, _, i)| !i.color().has_color());
    let c = if grey { 1 } else { 3 };
    let (h, w) = (h as usize, w as usize);
    let mut values = Vec::with_capacity(decoded.len() * c * h * w);
    let mut labels = Vec::with_capacity(decoded.len());
    for (label, _, img) in &decoded {
        labels.push(*label);
        if grey {
            values.extend(img.to_luma8().as_raw().iter().map(|&v| Scale::U8.to_model(v as f64)));
        } else {
            let rgb = img.to_rgb8();
            let raw = rgb.as_raw();
            // Interleaved H × W × 3 to planar 3 × H × W.
            for ch in 0..3 {
                values.extend((0..h * w).map(|i| Scale::U8.to_model(raw[i * 3 + ch] as f64)));
            }
        }
    }
    let names = classes
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    Ok((
        ImageSet {
            count: decoded.len(),
            shape: [c, h, w],
            values,
            labels: Some(labels),
            scale: Scale::U8,
        },
        names,
    ))
}
