//! `.npy` arrays in and out (NumPy format versions 1–3): `N × D` float matrices of points, and arrays of
//! any rank (images `N × H × W` or `N × C × H × W`, integer labels).
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

/// An array of any rank read from a `.npy` file, its values widened to f64.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
    /// The element type as stored.
    pub dtype: NpyType,
}

/// The element types flowmap reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyType {
    F32,
    F64,
    U8,
    /// A signed or unsigned integer wider than a byte.
    Int,
}

/// Reads an array of any rank (floats, uint8 or integers; either byte order; C or Fortran order).
pub fn read_npy_nd(path: &Path) -> Result<NdArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_nd(&bytes).map_err(|msg| bad(path, msg))
}

fn parse_npy(bytes: &[u8]) -> std::result::Result<Matrix, String> {
    let a = parse_nd(bytes)?;
    if !matches!(a.dtype, NpyType::F32 | NpyType::F64) {
        return Err(format!(
            "dtype {:?} is not supported for points (expected float32 or float64)",
            a.dtype
        ));
    }
    let (rows, cols) = match a.shape.as_slice() {
        [n] => (*n, 1),
        [n, d] => (*n, *d),
        other => return Err(format!("expected a 2-D array N×D, found shape {other:?}")),
    };
    Ok(Matrix::new(rows, cols, a.data))
}

fn parse_nd(bytes: &[u8]) -> std::result::Result<NdArray, String> {
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
    // The byte-order mark is one ASCII character; anything else (a multi-byte character included) is not one.
    let (order, kind) = match descr.chars().next() {
        Some(c @ ('<' | '=' | '|' | '>')) => descr.split_at(c.len_utf8()),
        _ => ("", descr),
    };
    let (little, kind) = match order {
        "<" | "=" | "|" => (true, kind),
        ">" => (false, kind),
        _ => (true, descr),
    };
    let (dtype, width, signed) = match kind {
        "f4" => (NpyType::F32, 4, true),
        "f8" => (NpyType::F64, 8, true),
        "u1" => (NpyType::U8, 1, false),
        "i1" => (NpyType::Int, 1, true),
        "i2" => (NpyType::Int, 2, true),
        "u2" => (NpyType::Int, 2, false),
        "i4" => (NpyType::Int, 4, true),
        "u4" => (NpyType::Int, 4, false),
        "i8" => (NpyType::Int, 8, true),
        "u8" => (NpyType::Int, 8, false),
        _ => {
            return Err(format!(
                "dtype '{descr}' is not supported (expected float32, float64, uint8 or an integer type)"
            ))
        }
    };
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    let need = count.checked_mul(width).ok_or("shape overflows")?;
    let body = &bytes[end..];
    let dims = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×");
    if body.len() < need {
        return Err(format!(
            "truncated data: shape {dims} needs {need} bytes, file has {}",
            body.len()
        ));
    }
    if body.len() > need {
        return Err(format!("{} trailing bytes after the data", body.len() - need));
    }
    let word = |c: &[u8]| -> [u8; 8] {
        let mut w = [0u8; 8];
        if little {
            w[..c.len()].copy_from_slice(c);
        } else {
            for (i, b) in c.iter().rev().enumerate() {
                w[i] = *b;
            }
        }
        w
    };
    let mut flat: Vec<f64> = body
        .chunks_exact(width)
        .map(|c| {
            let w = word(c);
            match (dtype, width) {
                (NpyType::F32, _) => f32::from_le_bytes(w[..4].try_into().unwrap()) as f64,
                (NpyType::F64, _) => f64::from_le_bytes(w),
                _ if signed => {
                    let shift = 64 - 8 * width as u32;
                    ((i64::from_le_bytes(w) << shift) >> shift) as f64
                }
                _ => u64::from_le_bytes(w) as f64,
            }
        })
        .collect();
    if fortran && shape.len() > 1 {
        // Column-major to row-major: the first axis varies fastest in the file.
        let mut c_order = vec![0.0; count];
        let mut idx = vec![0usize; shape.len()];
        for v in flat.iter() {
            let mut at = 0;
            for (k, &i) in idx.iter().enumerate() {
                at = at * shape[k] + i;
            }
            c_order[at] = *v;
            for k in 0..shape.len() {
                idx[k] += 1;
                if idx[k] < shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        flat = c_order;
    }
    Ok(NdArray {
        shape,
        data: flat,
        dtype,
    })
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
    let mut out = npy_f32_header(shape);
    out.reserve(4 * data.len());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The header of a little-endian f32 `.npy` array of `shape`: the file is this followed by the values in
/// row-major order (so a writer can stream them).
pub fn npy_f32_header(shape: &[usize]) -> Vec<u8> {
    npy_header("<f4", shape)
}

/// The `.npy` header of a C-order array of numpy type `descr` (`<f4`, `|u1`, `<i8`, …) and `shape`.
pub fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    // A one-element tuple is written `(n,)`, as numpy does.
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
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
        // A header that claims 10¹² elements is an error before anything is allocated.
        let mut claims = header("<f4", "(1000000, 1000000)", "False");
        claims.extend_from_slice(&[0u8; 32]);
        assert!(parse_nd(&claims).unwrap_err().contains("truncated data"));
    }

    /// Found by `flowmap bench fuzz`: a dtype that starts with a multi-byte character panicked on a slice
    /// inside it.
    #[test]
    fn a_dtype_starting_with_a_multibyte_character_is_an_error() {
        for descr in ["ξ", "ٖu|u1", "ӱ '<i8"] {
            let mut f = header(descr, "(2,)", "False");
            f.extend_from_slice(&[0u8; 16]);
            let e = parse_nd(&f).unwrap_err();
            assert!(e.contains("is not supported"), "{e}");
        }
    }

    fn header(descr: &str, shape: &str, fortran: &str) -> Vec<u8> {
        let dict = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}\n");
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        out.extend_from_slice(dict.as_bytes());
        out
    }

    /// uint8 and integer arrays of any rank, in both orders.
    #[test]
    fn reads_integer_arrays_of_any_rank() {
        let mut b = header("|u1", "(2, 2, 3)", "False");
        b.extend(0u8..12);
        let a = parse_nd(&b).unwrap();
        assert_eq!((a.shape.clone(), a.dtype), (vec![2, 2, 3], NpyType::U8));
        assert_eq!(a.data, (0..12).map(|v| v as f64).collect::<Vec<_>>());
        let mut f = header("|u1", "(2, 3)", "True");
        f.extend(0u8..6);
        assert_eq!(parse_nd(&f).unwrap().data, vec![0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
        let mut i = header("<i8", "(3,)", "False");
        for v in [-1i64, 7, 2] {
            i.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(parse_nd(&i).unwrap().data, vec![-1.0, 7.0, 2.0]);
        let mut be = header(">i4", "(2,)", "False");
        for v in [-3i32, 5] {
            be.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(parse_nd(&be).unwrap().data, vec![-3.0, 5.0]);
        assert!(parse_npy(&b).unwrap_err().contains("not supported for points"));
    }
}
