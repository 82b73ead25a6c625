//! `.npy` arrays in and out (NumPy format versions 1–3), for `N × D` float matrices.
//!
//! candle ships an npy reader, but it allocates whatever a header claims before reading and has no
//! Fortran-order support, so a malformed file can abort the process. This reader checks the header against
//! the file's length before it allocates anything and gives a one-line error for every malformed file.

use std::path::Path;

use crate::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A row-major `rows × cols` matrix of f64 read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(rows * cols, data.len(), "matrix data length");
        Matrix { rows, cols, data }
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::data(format!("{}: malformed .npy file: {msg}", path.display()))
}

/// Reads a 2-D (or 1-D, read as one column) float array. Accepts `f4`/`f8`, either byte order, C or Fortran order.
pub fn read_npy(path: &Path) -> Result<Matrix> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(&bytes).map_err(|msg| bad(path, msg))
}

fn parse_npy(bytes: &[u8]) -> std::result::Result<Matrix, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported format version {v}")),
    };
    let end = start.checked_add(header_len).ok_or("header length overflows")?;
    if end > bytes.len() {
        return Err("truncated header".into());
    }
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let fortran = match dict_value(header, "fortran_order").as_deref() {
        Some("False") => false,
        Some("True") => true,
        _ => return Err("header has no valid 'fortran_order'".into()),
    };
    let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape entry '{s}'")))
        .collect::<std::result::Result<_, _>>()?;
    let descr = descr.trim_matches('\'').trim_matches('"');
    let (little, width) = match descr {
        "<f4" | "=f4" => (true, 4),
        ">f4" => (false, 4),
        "<f8" | "=f8" => (true, 8),
        ">f8" => (false, 8),
        other => {
            return Err(format!(
                "dtype '{other}' is not supported (expected float32 or float64)"
            ))
        }
    };
    let (rows, cols) = match shape.as_slice() {
        [n] => (*n, 1),
        [n, d] => (*n, *d),
        other => return Err(format!("expected a 2-D array N×D, found shape {other:?}")),
    };
    let count = rows.checked_mul(cols).ok_or("shape overflows")?;
    let need = count.checked_mul(width).ok_or("shape overflows")?;
    let body = &bytes[end..];
    if body.len() < need {
        return Err(format!(
            "truncated data: shape {rows}×{cols} needs {need} bytes, file has {}",
            body.len()
        ));
    }
    if body.len() > need {
        return Err(format!("{} trailing bytes after the data", body.len() - need));
    }
    let mut flat: Vec<f64> = body
        .chunks_exact(width)
        .map(|c| match (width, little) {
            (4, true) => f32::from_le_bytes(c.try_into().unwrap()) as f64,
            (4, false) => f32::from_be_bytes(c.try_into().unwrap()) as f64,
            (8, true) => f64::from_le_bytes(c.try_into().unwrap()),
            _ => f64::from_be_bytes(c.try_into().unwrap()),
        })
        .collect();
    if fortran && rows > 1 && cols > 1 {
        let mut c_order = vec![0.0; count];
        for j in 0..cols {
            for i in 0..rows {
                c_order[i * cols + j] = flat[j * rows + i];
            }
        }
        flat = c_order;
    }
    Ok(Matrix::new(rows, cols, flat))
}

/// The value of `key` in the header's Python dict literal.
fn dict_value(header: &str, key: &str) -> Option<String> {
    let pat_a = format!("'{key}'");
    let pat_b = format!("\"{key}\"");
    let at = header
        .find(&pat_a)
        .map(|i| i + pat_a.len())
        .or_else(|| header.find(&pat_b).map(|i| i + pat_b.len()))?;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    if rest.starts_with('(') {
        let close = rest.find(')')?;
        Some(rest[..=close].to_string())
    } else {
        let stop = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..stop].trim().to_string())
    }
}

/// Encodes a row-major f32 array of `shape` as `.npy` (version 1.0, little-endian, C order).
pub fn encode_npy_f32_shape(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(shape.iter().product::<usize>(), data.len(), "npy data length");
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    // A one-element tuple is written `(n,)`, as numpy does.
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Encodes a row-major `rows × cols` f32 matrix as `.npy`.
pub fn encode_npy_f32(rows: usize, cols: usize, data: &[f32]) -> Vec<u8> {
    encode_npy_f32_shape(&[rows, cols], data)
}

/// Writes `data` (row-major `rows × cols`) to `path` atomically.
pub fn write_npy_f32(path: &Path, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
    write_npy_f32_shape(path, &[rows, cols], data)
}

/// Writes `data` (a row-major array of `shape`, e.g. `N × C × H × W`) to `path` atomically.
pub fn write_npy_f32_shape(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let bytes = encode_npy_f32_shape(shape, data);
    crate::io::write_atomic(path, |w| w.write_all(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fortran_order() {
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let bytes = encode_npy_f32(2, 3, &data);
        assert_eq!(bytes.len() % 16, (4 * 6) % 16, "header padded to 64 bytes");
        let m = parse_npy(&bytes).unwrap();
        assert_eq!((m.rows, m.cols), (2, 3));
        assert_eq!(m.data, data.iter().map(|&v| v as f64).collect::<Vec<_>>());

        // The same bytes read in Fortran order are the column-major layout of the same matrix.
        let mut f = bytes.clone();
        let pos = f.windows(5).position(|w| w == b"False").unwrap();
        f.splice(pos..pos + 5, b"True ".iter().copied());
        let m = parse_npy(&f).unwrap();
        assert_eq!(m.data, vec![0.0, 1.0, 2.0, 0.5, 1.5, 2.5]);
    }

    #[test]
    fn rejects_bad_files() {
        let good = encode_npy_f32(4, 2, &[0.0; 8]);
        assert!(parse_npy(&good[..good.len() - 3])
            .unwrap_err()
            .contains("truncated data"));
        assert!(parse_npy(&good[..20]).unwrap_err().contains("truncated header"));
        assert!(parse_npy(b"hello world, not npy").unwrap_err().contains("magic"));
        let huge = String::from_utf8_lossy(&good).replace("(4, 2)", "(9999999999999, 9)");
        assert!(parse_npy(huge.as_bytes()).is_err());
    }
}
