//! Devices by name: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
//!
//! The library takes a [`Device`] everywhere; the CPU runs flowmap's fused kernels (candle custom ops with
//! a `cpu_fwd`), every other device candle's own ops. CUDA needs a build with `--features cuda` (and a
//! CUDA toolkit), Metal one with candle's `metal` feature.

use candle_core::Device;

use crate::{Error, Result};

/// The device named by `spec`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n = n
                .parse::<usize>()
                .map_err(|_| Error::arg(format!("device '{spec}': '{n}' is not a device number")))?;
            (k, n)
        }
        None => (spec, 0),
    };
    let built = match kind {
        "cpu" if ordinal == 0 => return Ok(Device::Cpu),
        "cpu" => return Err(Error::arg(format!("device '{spec}': the CPU takes no number"))),
        "cuda" => Device::new_cuda(ordinal),
        "metal" => Device::new_metal(ordinal),
        _ => {
            return Err(Error::arg(format!(
                "unknown device '{spec}' (expected cpu, cuda, cuda:N, metal or metal:N)"
            )))
        }
    };
    built.map_err(|e| {
        let first = e.to_string();
        let first = first.lines().next().unwrap_or("");
        let hint = if kind == "cuda" && !cfg!(feature = "cuda") {
            " (this build has no CUDA support: build with `cargo build --release --features cuda`)"
        } else {
            ""
        };
        Error::arg(format!("device '{spec}' is not available: {first}{hint}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_names_say_why() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        for (spec, needle) in [
            ("gpu", "unknown device 'gpu'"),
            ("cuda:x", "'x' is not a device number"),
            ("cpu:1", "takes no number"),
        ] {
            let e = parse_device(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
