//! What the loader checks of every tensor and every declared shape before anything reads them:
//! dims non-negative, element counts that fit in 64 bits, and a payload (inline raw bytes, a
//! typed repeated field, or an external range) of exactly the size the dims and element type
//! say. ONNX Runtime refuses such files at session creation; the loader refuses them first, by
//! name, so that no pass ever reads past a payload or multiplies dims into an overflow.

use super::tensor_proto::DataType;
use super::{GraphProto, TensorProto, ValueInfoProto, elem_size, type_proto};

/// The element count of `dims`, or why there is none.
pub fn checked_element_count(dims: &[i64]) -> Result<u64, String> {
    let mut count: u64 = 1;
    for (axis, &d) in dims.iter().enumerate() {
        if d < 0 {
            return Err(format!("dim {d} at axis {axis} is negative"));
        }
        count = count
            .checked_mul(d as u64)
            .ok_or_else(|| format!("dims {dims:?} hold more than 2^64 elements"))?;
    }
    Ok(count)
}

/// Why the payload of `tensor` does not fit its dims and element type, if it does not.
/// `external_len` is the byte length of its external range, for external tensors.
pub fn tensor_problem(tensor: &TensorProto, external_len: Option<u64>) -> Option<String> {
    let count = match checked_element_count(&tensor.dims) {
        Ok(count) => count,
        Err(problem) => return Some(problem),
    };
    let code = tensor.data_type.unwrap_or(0);
    let Ok(dtype) = DataType::try_from(code) else {
        return Some(format!("element type {code} is not an ONNX type"));
    };
    if dtype == DataType::Undefined {
        return Some("it has no element type".into());
    }
    if tensor.segment.is_some() {
        return Some("segmented tensors are not supported".into());
    }
    let lengths = [
        ("float_data", tensor.float_data.len()),
        ("int32_data", tensor.int32_data.len()),
        ("string_data", tensor.string_data.len()),
        ("int64_data", tensor.int64_data.len()),
        ("double_data", tensor.double_data.len()),
        ("uint64_data", tensor.uint64_data.len()),
    ];
    let typed = lengths.map(|(field, len)| (field, len, typed_len(dtype, field, count)));
    let raw = tensor.raw_data.as_ref().map(|r| r.len() as u64);
    let stored: Vec<(&str, u64)> = typed
        .iter()
        .filter(|(_, len, _)| *len > 0)
        .map(|(field, len, _)| (*field, *len as u64))
        .chain(raw.filter(|&len| len > 0).map(|len| ("raw_data", len)))
        .chain(external_len.map(|len| ("external data", len)))
        .collect();
    let type_name = dtype.as_str_name();
    match stored.as_slice() {
        [] if count == 0 => None,
        [] => Some(format!(
            "{type_name} {:?}: no data for its {count} elements",
            tensor.dims
        )),
        [(field, len)] => {
            let expected = match *field {
                "raw_data" | "external data" => match raw_len(dtype, count) {
                    Some(bytes) => bytes,
                    None => return Some(format!("{type_name} cannot be stored as raw bytes")),
                },
                _ => typed
                    .iter()
                    .find(|(name, _, _)| name == field)
                    .map_or(0, |(_, _, expected)| *expected),
            };
            (*len != expected).then(|| {
                if expected == 0 {
                    format!("{type_name} values cannot be stored in {field}")
                } else {
                    format!(
                        "{type_name} {:?} needs {expected} {} in {field}, it holds {len}",
                        tensor.dims,
                        if field.ends_with("data")
                            && *field != "raw_data"
                            && *field != "external data"
                        {
                            "values"
                        } else {
                            "bytes"
                        }
                    )
                }
            })
        }
        many => Some(format!(
            "its data is stored twice ({})",
            many.iter()
                .map(|(field, _)| *field)
                .collect::<Vec<_>>()
                .join(" and ")
        )),
    }
}

/// Bytes of `count` elements of `dtype` as raw data (4-bit types pack two to a byte).
fn raw_len(dtype: DataType, count: u64) -> Option<u64> {
    match dtype {
        DataType::Int4 | DataType::Uint4 | DataType::Float4e2m1 => Some(count.div_ceil(2)),
        _ => count.checked_mul(elem_size(dtype as i32)? as u64),
    }
}

/// How many values of the typed field `field` hold `count` elements of `dtype` (ONNX's
/// TensorProto comments); 0 where the type does not go in that field.
fn typed_len(dtype: DataType, field: &str, count: u64) -> u64 {
    use DataType::*;
    let packed = count.div_ceil(2);
    let twice = count.saturating_mul(2);
    match (field, dtype) {
        ("float_data", Float) => count,
        ("float_data", Complex64) => twice,
        ("int32_data", Int4 | Uint4 | Float4e2m1) => packed,
        (
            "int32_data",
            Int32 | Int16 | Int8 | Uint16 | Uint8 | Bool | Float16 | Bfloat16 | Float8e4m3fn
            | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz | Float8e8m0,
        ) => count,
        ("string_data", String) => count,
        ("int64_data", Int64) => count,
        ("double_data", Double) => count,
        ("double_data", Complex128) => twice,
        ("uint64_data", Uint32 | Uint64) => count,
        _ => 0,
    }
}

/// The first declared value (graph input, output or value_info, in `graph` and its bodies) with
/// a negative dim: its name and the problem.
pub fn shape_problem(graph: &GraphProto) -> Option<(String, String)> {
    let declared = graph
        .input
        .iter()
        .map(|v| ("graph input", v))
        .chain(graph.output.iter().map(|v| ("graph output", v)))
        .chain(graph.value_info.iter().map(|v| ("value", v)));
    for (what, value) in declared {
        if let Some(problem) = negative_dim(value) {
            return Some((format!("{what} '{}'", value.name()), problem));
        }
    }
    graph
        .node
        .iter()
        .flat_map(|node| &node.attribute)
        .flat_map(|attr| attr.g.iter().chain(&attr.graphs))
        .find_map(shape_problem)
}

fn negative_dim(value: &ValueInfoProto) -> Option<String> {
    let Some(type_proto::Value::TensorType(tensor)) = value.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = &tensor.shape.as_ref()?.dim;
    dims.iter()
        .enumerate()
        .find_map(|(axis, dim)| match dim.value {
            Some(super::tensor_shape_proto::dimension::Value::DimValue(d)) if d < 0 => {
                Some(format!("dim {d} at axis {axis} is negative"))
            }
            _ => None,
        })
}
