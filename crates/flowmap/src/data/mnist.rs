//! MNIST in the IDX format (`*-idx3-ubyte` images, `*-idx1-ubyte` labels), gzip-compressed or not.
//!
//! The repository embeds a 10,000-digit subset (see `crates/flowmap/assets/mnist/README.md`), so `mnist` works on a fresh clone.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

#[cfg(feature = "mnist-assets")]
static EMBEDDED_IMAGES: &[u8] = include_bytes!("../../assets/mnist/mnist10k-images-idx3-ubyte.gz");
#[cfg(feature = "mnist-assets")]
static EMBEDDED_LABELS: &[u8] = include_bytes!("../../assets/mnist/mnist10k-labels-idx1-ubyte.gz");

/// Images as bytes, `count × rows × cols`, with their labels when known.
#[derive(Clone, Debug)]
pub struct Mnist {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
    pub labels: Option<Vec<u8>>,
}

impl Mnist {
    /// The embedded 10,000-digit subset (the `mnist-assets` feature, on by default).
    #[cfg(feature = "mnist-assets")]
    pub fn embedded() -> Result<Self> {
        let mut m = parse_images(&gunzip_if_needed(EMBEDDED_IMAGES, "embedded images")?)?;
        m.labels = Some(parse_labels(&gunzip_if_needed(EMBEDDED_LABELS, "embedded labels")?)?);
        Ok(m)
    }

    /// Without the `mnist-assets` feature there are no embedded digits: an error that says so.
    #[cfg(not(feature = "mnist-assets"))]
    pub fn embedded() -> Result<Self> {
        Err(Error::data(
            "the embedded MNIST digits are in flowmap's `mnist-assets` feature, which this build leaves out; read an IDX file with `mnist:FILE`",
        ))
    }

    /// Images from an IDX file (e.g. `train-images-idx3-ubyte[.gz]`), with the labels of the matching
    /// `…labels-idx1-ubyte[.gz]` beside it when that file exists.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bytes = gunzip_if_needed(&raw, &path.display().to_string())?;
        let mut m = parse_images(&bytes).map_err(|e| Error::data(format!("{}: {e}", path.display())))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.contains("images-idx3-ubyte") {
            let labels = path.with_file_name(name.replace("images-idx3-ubyte", "labels-idx1-ubyte"));
            if labels.exists() {
                let raw = std::fs::read(&labels).map_err(|e| Error::io(&labels, e))?;
                let bytes = gunzip_if_needed(&raw, &labels.display().to_string())?;
                let l = parse_labels(&bytes).map_err(|e| Error::data(format!("{}: {e}", labels.display())))?;
                if l.len() != m.count {
                    return Err(Error::data(format!(
                        "{}: {} labels for the {} images of {}",
                        labels.display(),
                        l.len(),
                        m.count,
                        path.display()
                    )));
                }
                m.labels = Some(l);
            }
        }
        Ok(m)
    }

    pub fn dim(&self) -> usize {
        self.rows * self.cols
    }

    /// Pixels scaled to [−1, 1], row-major `count × (rows·cols)`.
    pub fn to_signed_unit(&self) -> Vec<f64> {
        self.pixels.iter().map(|&p| p as f64 / 127.5 - 1.0).collect()
    }
}

fn gunzip_if_needed(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| Error::data(format!("{what}: bad gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

fn be_u32(b: &[u8], at: usize) -> Result<usize> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .ok_or_else(|| Error::data("truncated IDX header"))
}

/// Parses an IDX3 image file (magic 2051).
pub fn parse_images(b: &[u8]) -> Result<Mnist> {
    let magic = be_u32(b, 0)?;
    if magic != 2051 {
        return Err(Error::data(format!(
            "not an IDX image file (magic {magic}, expected 2051)"
        )));
    }
    let (count, rows, cols) = (be_u32(b, 4)?, be_u32(b, 8)?, be_u32(b, 12)?);
    let need = count
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| Error::data("IDX shape overflows"))?;
    if b.len() != 16 + need {
        return Err(Error::data(format!(
            "IDX image file holds {} pixel bytes, header says {count}×{rows}×{cols} = {need}",
            b.len().saturating_sub(16)
        )));
    }
    Ok(Mnist {
        count,
        rows,
        cols,
        pixels: b[16..].to_vec(),
        labels: None,
    })
}

/// Parses an IDX1 label file (magic 2049).
pub fn parse_labels(b: &[u8]) -> Result<Vec<u8>> {
    let magic = be_u32(b, 0)?;
    if magic != 2049 {
        return Err(Error::data(format!(
            "not an IDX label file (magic {magic}, expected 2049)"
        )));
    }
    let count = be_u32(b, 4)?;
    if b.len() != 8 + count {
        return Err(Error::data(format!(
            "IDX label file holds {} labels, header says {count}",
            b.len() - 8
        )));
    }
    Ok(b[8..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "mnist-assets")]
    fn embedded_subset_matches_its_readme() {
        let m = Mnist::embedded().unwrap();
        assert_eq!((m.count, m.rows, m.cols), (10_000, 28, 28));
        let labels = m.labels.as_ref().unwrap();
        let mut counts = [0usize; 10];
        for &l in labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]);
        // Digits are mostly background: the mean pixel of MNIST is about 0.13 of full scale.
        let mean = m.pixels.iter().map(|&p| p as f64).sum::<f64>() / m.pixels.len() as f64 / 255.0;
        assert!((0.10..0.16).contains(&mean), "mean intensity {mean}");
    }

    #[test]
    fn rejects_truncated_and_wrong_magic() {
        let mut b = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        b.extend([0u8; 7]);
        assert!(parse_images(&b).unwrap_err().to_string().contains("header says 2×2×2"));
        b[3] = 1;
        assert!(parse_images(&b).unwrap_err().to_string().contains("magic"));
    }
}
