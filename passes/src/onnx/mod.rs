//! ONNX protobuf types, generated at build time from the vendored `proto/onnx.proto` (the file the
//! PyPI `onnx` package ships), and reading and writing model files with external data.

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
pub use generated::*;

mod file;
pub mod validate;
pub(crate) use file::write_atomically;
pub use file::{
    ExternalStore, INLINE_WEIGHT_LIMIT, LoadedModel, Storage, decode_model, for_each_tensor_mut,
    load_model, save_model,
};

use tensor_proto::DataType;

/// The short lower-case name used in the text form and in `inspect` (`f32`, `i64`, ...).
pub fn elem_type_name(code: i32) -> String {
    match DataType::try_from(code) {
        Ok(DataType::Float) => "f32".into(),
        Ok(DataType::Double) => "f64".into(),
        Ok(DataType::Float16) => "f16".into(),
        Ok(DataType::Bfloat16) => "bf16".into(),
        Ok(DataType::Int8) => "i8".into(),
        Ok(DataType::Int16) => "i16".into(),
        Ok(DataType::Int32) => "i32".into(),
        Ok(DataType::Int64) => "i64".into(),
        Ok(DataType::Uint8) => "u8".into(),
        Ok(DataType::Uint16) => "u16".into(),
        Ok(DataType::Uint32) => "u32".into(),
        Ok(DataType::Uint64) => "u64".into(),
        Ok(DataType::Bool) => "bool".into(),
        Ok(DataType::String) => "string".into(),
        Ok(other) => other.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("dtype{code}"),
    }
}

/// Parses a name printed by [`elem_type_name`] back to the ONNX code.
pub fn elem_type_from_name(name: &str) -> Option<i32> {
    let code = match name {
        "f32" => DataType::Float,
        "f64" => DataType::Double,
        "f16" => DataType::Float16,
        "bf16" => DataType::Bfloat16,
        "i8" => DataType::Int8,
        "i16" => DataType::Int16,
        "i32" => DataType::Int32,
        "i64" => DataType::Int64,
        "u8" => DataType::Uint8,
        "u16" => DataType::Uint16,
        "u32" => DataType::Uint32,
        "u64" => DataType::Uint64,
        "bool" => DataType::Bool,
        "string" => DataType::String,
        other => {
            if let Some(code) = other.strip_prefix("dtype") {
                return code.parse().ok();
            }
            DataType::from_str_name(&other.to_ascii_uppercase())?
        }
    };
    Some(code as i32)
}

/// Bytes per element for fixed-size types; `None` for strings and sub-byte types.
pub fn elem_size(code: i32) -> Option<usize> {
    Some(match DataType::try_from(code).ok()? {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Double | DataType::Int64 | DataType::Uint64 | DataType::Complex64 => 8,
        DataType::Complex128 => 16,
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 2,
        DataType::Int8
        | DataType::Uint8
        | DataType::Bool
        | DataType::Float8e4m3fn
        | DataType::Float8e4m3fnuz
        | DataType::Float8e5m2
        | DataType::Float8e5m2fnuz
        | DataType::Float8e8m0 => 1,
        _ => return None,
    })
}

/// Number of elements of a tensor with these dims (an empty list is a scalar: one element).
pub fn element_count(dims: &[i64]) -> u64 {
    dims.iter()
        .fold(1u64, |count, &d| count.saturating_mul(d.max(0) as u64))
}

impl TensorProto {
    pub fn is_external(&self) -> bool {
        self.data_location == Some(tensor_proto::DataLocation::External as i32)
    }

    /// The `key` entry of `external_data` (location, offset, length, checksum).
    pub fn external_entry(&self, key: &str) -> Option<&str> {
        self.external_data
            .iter()
            .find(|e| e.key.as_deref() == Some(key))
            .and_then(|e| e.value.as_deref())
    }
}

impl StringStringEntryProto {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value.into()),
        }
    }
}

/// The values of an inline float or double tensor (raw or typed storage), as f64; `None` for
/// other element types and external data.
pub fn float_values(tensor: &TensorProto) -> Option<Vec<f64>> {
    let raw = tensor.raw_data.as_deref();
    match (DataType::try_from(tensor.data_type?).ok()?, raw) {
        (DataType::Float, Some(raw)) => Some(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
        ),
        (DataType::Float, None) => Some(tensor.float_data.iter().map(|&v| v as f64).collect()),
        (DataType::Double, Some(raw)) => Some(
            raw.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        (DataType::Double, None) => Some(tensor.double_data.clone()),
        _ => None,
    }
}
