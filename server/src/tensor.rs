//! Tensor datatypes and the byte layout shared by every protocol and backend.

use bytes::Bytes;
use std::fmt;

/// KServe v2 tensor datatypes. The discriminant order is irrelevant; use the
/// conversion helpers for the wire names and Triton's config enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    /// Variable-length byte strings, serialized as a 4-byte little-endian
    /// length followed by the bytes, element after element (Triton's layout).
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// Parses a KServe v2 datatype name such as `FP32`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Size of one element in bytes; `None` for variable-length BYTES.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// Triton's `inference.DataType` enum value (model_config.proto).
    pub fn triton_enum(self) -> i32 {
        match self {
            DataType::Bool => 1,
            DataType::Uint8 => 2,
            DataType::Uint16 => 3,
            DataType::Uint32 => 4,
            DataType::Uint64 => 5,
            DataType::Int8 => 6,
            DataType::Int16 => 7,
            DataType::Int32 => 8,
            DataType::Int64 => 9,
            DataType::Fp16 => 10,
            DataType::Fp32 => 11,
            DataType::Fp64 => 12,
            DataType::Bytes => 13,
            DataType::Bf16 => 14,
        }
    }

    /// Triton's config name, e.g. `TYPE_FP32` (`TYPE_STRING` for BYTES).
    pub fn triton_config_name(self) -> String {
        match self {
            DataType::Bytes => "TYPE_STRING".to_string(),
            d => format!("TYPE_{}", d.as_str()),
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named tensor whose elements are held as raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Bytes,
}

/// Number of elements a shape holds, or `None` if a dim is negative or the
/// product overflows.
pub fn element_count(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).ok()?;
        acc.checked_mul(d)
    })
}

/// Counts the elements of a serialized BYTES tensor, checking that every
/// length prefix stays inside the buffer.
pub fn count_bytes_elements(data: &[u8]) -> Option<usize> {
    let mut offset = 0usize;
    let mut count = 0usize;
    while offset < data.len() {
        let header = data.get(offset..offset + 4)?;
        let len = u32::from_le_bytes(header.try_into().ok()?) as usize;
        offset = offset.checked_add(4)?.checked_add(len)?;
        if offset > data.len() {
            return None;
        }
        count += 1;
    }
    Some(count)
}

/// Splits a serialized BYTES tensor into its elements.
pub fn split_bytes_elements(data: &Bytes) -> Option<Vec<Bytes>> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    while offset < data.len() {
        let header = data.get(offset..offset + 4)?;
        let len = u32::from_le_bytes(header.try_into().ok()?) as usize;
        let start = offset + 4;
        let end = start.checked_add(len)?;
        if end > data.len() {
            return None;
        }
        out.push(data.slice(start..end));
        offset = end;
    }
    Some(out)
}

/// Serializes elements into Triton's BYTES layout.
pub fn join_bytes_elements<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// One element of `dt` holding `v` (cast as `as` casts), little-endian;
/// `None` for BYTES.
pub fn scalar_bytes(dt: DataType, v: f64) -> Option<Vec<u8>> {
    Some(match dt {
        DataType::Bool => vec![(v != 0.0) as u8],
        DataType::Uint8 => vec![v as u8],
        DataType::Int8 => vec![v as i8 as u8],
        DataType::Uint16 => (v as u16).to_le_bytes().to_vec(),
        DataType::Int16 => (v as i16).to_le_bytes().to_vec(),
        DataType::Uint32 => (v as u32).to_le_bytes().to_vec(),
        DataType::Int32 => (v as i32).to_le_bytes().to_vec(),
        DataType::Uint64 => (v as u64).to_le_bytes().to_vec(),
        DataType::Int64 => (v as i64).to_le_bytes().to_vec(),
        DataType::Fp16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
        DataType::Bf16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
        DataType::Fp32 => (v as f32).to_le_bytes().to_vec(),
        DataType::Fp64 => v.to_le_bytes().to_vec(),
        DataType::Bytes => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
        assert_eq!(DataType::Bytes.triton_config_name(), "TYPE_STRING");
        assert_eq!(DataType::Fp32.triton_config_name(), "TYPE_FP32");
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[2, -1]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }

    #[test]
    fn bytes_layout_round_trips_and_rejects_truncation() {
        let joined = join_bytes_elements([b"ab".as_slice(), b"".as_slice(), b"xyz".as_slice()]);
        assert_eq!(count_bytes_elements(&joined), Some(3));
        let parts = split_bytes_elements(&Bytes::from(joined.clone())).unwrap();
        assert_eq!(
            parts,
            vec![
                Bytes::from_static(b"ab"),
                Bytes::new(),
                Bytes::from_static(b"xyz")
            ]
        );
        assert_eq!(count_bytes_elements(&joined[..joined.len() - 1]), None);
        assert_eq!(count_bytes_elements(&[1, 0]), None);
    }
}
