//! Reads input data from a NumPy `.npy` file (float32 or float64, C order):
//! its first dimension indexes data points, the rest is one point's shape.

use bytes::Bytes;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a usable .npy file: {reason}")]
    Format { path: String, reason: String },
}

/// Parses a `.npy` file's bytes into its shape and f32 values.
pub fn parse(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated header")?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))?;
        let rest = header[i + key.len() + 2..]
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or("no descr")?;
    let size = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(format!(
            "dtype {} is not little-endian float32 or float64",
            descr.split(',').next().unwrap_or("")
        ));
    };
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("Fortran order is not supported".into());
    }
    let shape_text = field("shape").ok_or("no shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("malformed shape")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension {s:?}"))
        })
        .collect::<Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    if data.len() != count * size {
        return Err(format!(
            "{} data bytes for shape {shape:?} of {size}-byte floats",
            data.len()
        ));
    }
    let values = if size == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    Ok((shape, values))
}

/// Event payloads of `rows` data points each, taken from the file in order
/// (wrapping around at its end) until every point was used once.
pub fn payloads(path: &Path, point_shape: &[i64], rows: u32) -> Result<Vec<Bytes>, NpyError> {
    let fmt = |reason: String| NpyError::Format {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let (shape, values) = parse(&bytes).map_err(fmt)?;
    let want: Vec<usize> = point_shape.iter().map(|&d| d as usize).collect();
    if shape.len() < 2 || shape[1..] != want[..] || shape[0] == 0 {
        return Err(fmt(format!(
            "shape {shape:?} is not [N, {want:?}] with N >= 1"
        )));
    }
    let point: usize = want.iter().product();
    let n = shape[0];
    let rows = rows.max(1) as usize;
    let events = n.div_ceil(rows);
    Ok((0..events)
        .map(|e| {
            let mut v = Vec::with_capacity(rows * point);
            for r in 0..rows {
                let p = (e * rows + r) % n;
                v.extend_from_slice(&values[p * point..(p + 1) * point]);
            }
            Bytes::copy_from_slice(bytemuck::cast_slice(&v))
        })
        .collect())
}

/// Writes a float32 `.npy` file (for tests and examples).
pub fn write_f32(path: &Path, shape: &[usize], values: &[f32]) -> std::io::Result<()> {
    let dims = shape.iter().map(|d| format!("{d},")).collect::<String>();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // Pad so the data starts at a multiple of 64 bytes, ending in '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(bytemuck::cast_slice(values));
    std::fs::write(path, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_builds_events_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let values: Vec<f32> = (0..3 * 4).map(|i| i as f32).collect();
        write_f32(&path, &[3, 2, 2], &values).unwrap();
        let (shape, v) = parse(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((shape, v), (vec![3, 2, 2], values.clone()));
        // Two points per event: [p0 p1], [p2 p0].
        let events = payloads(&path, &[2, 2], 2).unwrap();
        assert_eq!(events.len(), 2);
        let e1: Vec<f32> = bytemuck::pod_collect_to_vec(&events[1]);
        assert_eq!(e1, vec![8.0, 9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0]);
        // A point shape that does not match is refused clearly.
        let e = payloads(&path, &[4], 1).unwrap_err().to_string();
        assert!(e.contains("is not [N, [4]]"), "{e}");
        assert!(parse(b"not an npy").is_err());
    }
}
