//! CSV files of points: one point per row, comma-separated numbers, an optional header row.

use std::path::Path;

use super::npy::Matrix;
use crate::{Error, Result};

/// Reads a CSV file of numbers into a matrix. A first row that does not parse as numbers is taken as a header.
pub fn read_csv(path: &Path) -> Result<Matrix> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let mut data = Vec::new();
    let mut cols = None;
    let mut rows = 0;
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| Error::data(format!("{}: {e}", path.display())))?;
        let parsed: std::result::Result<Vec<f64>, _> = record.iter().map(str::parse::<f64>).collect();
        let values = match parsed {
            Ok(v) => v,
            Err(_) if i == 0 => continue, // header
            Err(_) => {
                return Err(Error::data(format!(
                    "{}: line {}: not a number in '{}'",
                    path.display(),
                    i + 1,
                    record.iter().collect::<Vec<_>>().join(",")
                )))
            }
        };
        match cols {
            None => cols = Some(values.len()),
            Some(c) if c != values.len() => {
                return Err(Error::data(format!(
                    "{}: line {} has {} columns, expected {c}",
                    path.display(),
                    i + 1,
                    values.len()
                )))
            }
            _ => {}
        }
        data.extend(values);
        rows += 1;
    }
    let cols = cols.ok_or_else(|| Error::data(format!("{}: no data rows", path.display())))?;
    Ok(Matrix::new(rows, cols, data))
}
