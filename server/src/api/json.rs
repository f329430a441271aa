//! JSON tensor data of the REST protocol: typed JSON values to raw bytes
//! and back. Nested (row-major) and flat arrays are both accepted.

use super::error::ApiError;
use crate::tensor::{join_bytes_elements, split_bytes_elements, DataType};
use bytes::Bytes;
use half::{bf16, f16};
use serde_json::Value;

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Converts the `data` of a JSON input to raw little-endian bytes.
pub fn to_bytes(name: &str, dt: DataType, data: &Value) -> Result<Bytes, ApiError> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let bad =
        |v: &Value| ApiError::invalid(format!("input {name:?}: {v} is not a valid {dt} value"));
    let int = |v: &Value, lo: i128, hi: i128| -> Result<i128, ApiError> {
        let x = v
            .as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
            .ok_or_else(|| bad(v))?;
        if x < lo || x > hi {
            return Err(ApiError::invalid(format!(
                "input {name:?}: {x} is out of range for {dt}"
            )));
        }
        Ok(x)
    };
    let float = |v: &Value| v.as_f64().ok_or_else(|| bad(v));
    let mut out: Vec<u8> = Vec::with_capacity(flat.len() * dt.size().unwrap_or(8));
    if dt == DataType::Bytes {
        let mut elems = Vec::with_capacity(flat.len());
        for v in &flat {
            elems.push(v.as_str().ok_or_else(|| bad(v))?.as_bytes());
        }
        return Ok(Bytes::from(join_bytes_elements(elems)));
    }
    for v in flat {
        match dt {
            DataType::Bool => out.push(v.as_bool().ok_or_else(|| bad(v))? as u8),
            DataType::Uint8 => out.push(int(v, 0, u8::MAX as i128)? as u8),
            DataType::Uint16 => out.extend((int(v, 0, u16::MAX as i128)? as u16).to_le_bytes()),
            DataType::Uint32 => out.extend((int(v, 0, u32::MAX as i128)? as u32).to_le_bytes()),
            DataType::Uint64 => out.extend((int(v, 0, u64::MAX as i128)? as u64).to_le_bytes()),
            DataType::Int8 => out.push(int(v, i8::MIN as i128, i8::MAX as i128)? as i8 as u8),
            DataType::Int16 => {
                out.extend((int(v, i16::MIN as i128, i16::MAX as i128)? as i16).to_le_bytes())
            }
            DataType::Int32 => {
                out.extend((int(v, i32::MIN as i128, i32::MAX as i128)? as i32).to_le_bytes())
            }
            DataType::Int64 => {
                out.extend((int(v, i64::MIN as i128, i64::MAX as i128)? as i64).to_le_bytes())
            }
            DataType::Fp16 => out.extend(f16::from_f64(float(v)?).to_le_bytes()),
            DataType::Bf16 => out.extend(bf16::from_f64(float(v)?).to_le_bytes()),
            DataType::Fp32 => out.extend((float(v)? as f32).to_le_bytes()),
            DataType::Fp64 => out.extend(float(v)?.to_le_bytes()),
            DataType::Bytes => unreachable!("handled above"),
        }
    }
    Ok(Bytes::from(out))
}

/// Renders raw output bytes as a flat JSON array.
pub fn from_bytes(dt: DataType, data: &Bytes) -> Value {
    fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> Value) -> Value {
        Value::Array(
            data.chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunk of N")))
                .collect(),
        )
    }
    let num = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match dt {
        DataType::Bool => Value::Array(data.iter().map(|&b| Value::Bool(b != 0)).collect()),
        DataType::Uint8 => Value::Array(data.iter().map(|&b| Value::from(b)).collect()),
        DataType::Int8 => Value::Array(data.iter().map(|&b| Value::from(b as i8)).collect()),
        DataType::Uint16 => each::<2>(data, |b| Value::from(u16::from_le_bytes(b))),
        DataType::Int16 => each::<2>(data, |b| Value::from(i16::from_le_bytes(b))),
        DataType::Uint32 => each::<4>(data, |b| Value::from(u32::from_le_bytes(b))),
        DataType::Int32 => each::<4>(data, |b| Value::from(i32::from_le_bytes(b))),
        DataType::Uint64 => each::<8>(data, |b| Value::from(u64::from_le_bytes(b))),
        DataType::Int64 => each::<8>(data, |b| Value::from(i64::from_le_bytes(b))),
        DataType::Fp16 => each::<2>(data, |b| num(f16::from_le_bytes(b).to_f64())),
        DataType::Bf16 => each::<2>(data, |b| num(bf16::from_le_bytes(b).to_f64())),
        DataType::Fp32 => each::<4>(data, |b| num(f32::from_le_bytes(b) as f64)),
        DataType::Fp64 => each::<8>(data, |b| num(f64::from_le_bytes(b))),
        DataType::Bytes => Value::Array(
            split_bytes_elements(data)
                .unwrap_or_default()
                .iter()
                .map(|e| Value::String(String::from_utf8_lossy(e).into_owned()))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_and_flat_agree() {
        let a = to_bytes("x", DataType::Fp32, &json!([[1.0, 2.0], [3.0, 4.5]])).unwrap();
        let b = to_bytes("x", DataType::Fp32, &json!([1, 2, 3, 4.5])).unwrap();
        assert_eq!(a, b);
        assert_eq!(from_bytes(DataType::Fp32, &a), json!([1.0, 2.0, 3.0, 4.5]));
    }

    #[test]
    fn every_type_round_trips() {
        let cases = [
            (DataType::Bool, json!([true, false])),
            (DataType::Uint8, json!([0, 255])),
            (DataType::Uint16, json!([0, 65535])),
            (DataType::Uint32, json!([0, 4294967295u64])),
            (DataType::Uint64, json!([0, u64::MAX])),
            (DataType::Int8, json!([-128, 127])),
            (DataType::Int16, json!([-32768, 32767])),
            (DataType::Int32, json!([i32::MIN, i32::MAX])),
            (DataType::Int64, json!([i64::MIN, i64::MAX])),
            (DataType::Fp16, json!([1.5, -2.0])),
            (DataType::Bf16, json!([1.5, -2.0])),
            (DataType::Fp64, json!([1.25, -1e300])),
            (DataType::Bytes, json!(["ab", "", "ü"])),
        ];
        for (dt, v) in cases {
            let b = to_bytes("x", dt, &v).unwrap();
            assert_eq!(from_bytes(dt, &b), v, "{dt}");
        }
    }

    #[test]
    fn rejects_wrong_types_and_ranges() {
        assert!(to_bytes("x", DataType::Int8, &json!([128])).is_err());
        assert!(to_bytes("x", DataType::Uint8, &json!([-1])).is_err());
        assert!(to_bytes("x", DataType::Int32, &json!([1.5])).is_err());
        assert!(to_bytes("x", DataType::Fp32, &json!(["a"])).is_err());
        assert!(to_bytes("x", DataType::Bool, &json!([1])).is_err());
        assert!(to_bytes("x", DataType::Bytes, &json!([1])).is_err());
    }
}
