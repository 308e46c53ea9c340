//! The stable text form of the IR, for people and for snapshot tests: deterministic, one node per
//! line in topological order, values typed where their type is known, nested bodies indented.
//!
//! ```text
//! graph main (%x: f32[batch,4], %w: f32[4,4]) -> (%y: f32[batch,4]) {
//!   init %w: f32[4,4] <64 bytes>
//!   %y: f32[batch,4] = MatMul(%x, %w)  # /proj/MatMul
//! }
//! ```

use std::fmt::Write;

use super::*;
use crate::onnx::{elem_type_name, tensor_proto::DataType};

/// Prints a whole model: header, metadata, then the main graph.
pub fn print_model(model: &Model) -> String {
    let mut out = String::new();
    let opsets: Vec<String> = model
        .opsets
        .iter()
        .map(|o| {
            let domain = o.domain.as_deref().unwrap_or("");
            let domain = if domain.is_empty() { "ai.onnx" } else { domain };
            format!("{domain}:{}", o.version.unwrap_or(0))
        })
        .collect();
    let _ = writeln!(
        out,
        "model ir_version={} opsets=[{}]",
        model.info.ir_version.unwrap_or(0),
        opsets.join(", ")
    );
    for entry in &model.metadata {
        let _ = writeln!(
            out,
            "metadata {} = {:?}",
            entry.key.as_deref().unwrap_or(""),
            entry.value.as_deref().unwrap_or("")
        );
    }
    for function in &model.functions {
        let _ = writeln!(
            out,
            "function {}:{} ({} nodes, kept as in the file)",
            function.domain.as_deref().unwrap_or(""),
            function.name.as_deref().unwrap_or(""),
            function.node.len()
        );
    }
    print_graph_into(&model.graph, 0, &mut out);
    out
}

/// Prints one graph (and its nested bodies).
pub fn print_graph(graph: &Graph) -> String {
    let mut out = String::new();
    print_graph_into(graph, 0, &mut out);
    out
}

/// `%name`, quoted when the name has characters the form uses as separators.
pub fn value_ref(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-' | ':'));
    if plain {
        format!("%{name}")
    } else {
        format!("%{name:?}")
    }
}

fn type_text(value: &ValueInfo) -> Option<String> {
    let elem = elem_type_name(value.elem_type()?);
    Some(match value.dims() {
        Some(dims) => {
            let dims: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            format!("{elem}[{}]", dims.join(","))
        }
        None => format!("{elem}[*]"),
    })
}

fn typed(graph: &Graph, name: &str) -> String {
    if name.is_empty() {
        return "_".into();
    }
    match graph.value_type(name).as_ref().and_then(type_text) {
        Some(ty) => format!("{}: {ty}", value_ref(name)),
        None => value_ref(name),
    }
}

fn print_graph_into(graph: &Graph, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    let inputs: Vec<String> = graph.inputs.iter().map(|v| typed(graph, &v.name)).collect();
    let outputs: Vec<String> = graph
        .outputs
        .iter()
        .map(|v| typed(graph, &v.name))
        .collect();
    let _ = writeln!(
        out,
        "graph {} ({}) -> ({}) {{",
        if graph.name.is_empty() {
            "_"
        } else {
            &graph.name
        },
        inputs.join(", "),
        outputs.join(", ")
    );
    for tensor in &graph.initializers {
        let _ = writeln!(out, "{pad}  init {}", tensor_text(tensor));
    }
    let order = graph
        .topo_order()
        .unwrap_or_else(|_| graph.nodes().map(|(id, _)| id).collect());
    for id in order {
        let node = graph.node(id);
        let outputs: Vec<String> = node.outputs.iter().map(|o| typed(graph, o)).collect();
        let inputs: Vec<String> = node
            .inputs
            .iter()
            .map(|i| {
                if i.is_empty() {
                    "_".to_string()
                } else {
                    value_ref(i)
                }
            })
            .collect();
        let attributes: Vec<String> = node
            .attributes
            .iter()
            .filter(|a| !matches!(a.value, AttrValue::Graph(_) | AttrValue::Graphs(_)))
            .map(|a| format!("{}={}", a.name, attr_text(&a.value)))
            .collect();
        let op = if node.domain.is_empty() {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        let _ = write!(out, "{pad}  {} = {op}", outputs.join(", "));
        if !attributes.is_empty() {
            let _ = write!(out, "[{}]", attributes.join(", "));
        }
        let _ = write!(out, "({})", inputs.join(", "));
        if !node.name.is_empty() {
            let _ = write!(out, "  # {}", node.name);
        }
        out.push('\n');
        for attribute in &node.attributes {
            let bodies: Vec<&Graph> = match &attribute.value {
                AttrValue::Graph(g) => vec![g.as_ref()],
                AttrValue::Graphs(gs) => gs.iter().collect(),
                _ => continue,
            };
            for body in bodies {
                let _ = write!(out, "{pad}    {} = ", attribute.name);
                print_graph_into(body, depth + 2, out);
            }
        }
    }
    let _ = writeln!(out, "{pad}}}");
}

fn attr_text(value: &AttrValue) -> String {
    fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
        format!("[{}]", items.iter().map(f).collect::<Vec<_>>().join(","))
    }
    match value {
        AttrValue::Float(v) => format!("{v:?}"),
        AttrValue::Int(v) => v.to_string(),
        AttrValue::String(s) => format!("{:?}", String::from_utf8_lossy(s)),
        AttrValue::Tensor(t) => format!("tensor({})", tensor_text(t)),
        AttrValue::Floats(v) => list(v, |x| format!("{x:?}")),
        AttrValue::Ints(v) => list(v, |x| x.to_string()),
        AttrValue::Strings(v) => list(v, |s| format!("{:?}", String::from_utf8_lossy(s))),
        AttrValue::Tensors(v) => list(v, |t| format!("tensor({})", tensor_text(t))),
        AttrValue::SparseTensor(_) => "sparse_tensor".into(),
        AttrValue::SparseTensors(v) => format!("sparse_tensors[{}]", v.len()),
        AttrValue::Type(_) => "type".into(),
        AttrValue::Types(v) => format!("types[{}]", v.len()),
        AttrValue::Graph(_) | AttrValue::Graphs(_) => "graph".into(),
    }
}

/// Tensors with at most this many elements show their values.
const SHOWN_ELEMENTS: u64 = 8;

/// `%name: f32[2,3] = [..]` with values for small tensors, else the storage size.
pub fn tensor_text(tensor: &TensorProto) -> String {
    let code = tensor.data_type.unwrap_or(0);
    let dims: Vec<String> = tensor.dims.iter().map(|d| d.to_string()).collect();
    let ty = format!("{}[{}]", elem_type_name(code), dims.join(","));
    let mut text = if tensor.name().is_empty() {
        ty
    } else {
        format!("{}: {ty}", value_ref(tensor.name()))
    };
    if tensor.is_external() {
        let _ = write!(
            text,
            " <external '{}' offset {} length {}>",
            tensor.external_entry("location").unwrap_or("?"),
            tensor.external_entry("offset").unwrap_or("0"),
            tensor.external_entry("length").unwrap_or("?")
        );
        return text;
    }
    let count = crate::onnx::element_count(&tensor.dims);
    if count <= SHOWN_ELEMENTS {
        if let Some(values) = small_values(tensor, code) {
            let _ = write!(text, " = [{}]", values.join(", "));
            return text;
        }
    }
    let bytes = tensor.raw_data.as_ref().map_or(0, |b| b.len())
        + tensor.float_data.len() * 4
        + tensor.int32_data.len() * 4
        + tensor.int64_data.len() * 8
        + tensor.double_data.len() * 8
        + tensor.uint64_data.len() * 8;
    let _ = write!(text, " <{bytes} bytes>");
    text
}

fn small_values(tensor: &TensorProto, code: i32) -> Option<Vec<String>> {
    fn chunks<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        raw.chunks_exact(N)
            .map(|c| f(c.try_into().unwrap()))
            .collect()
    }
    let raw = tensor.raw_data.as_deref();
    let dtype = DataType::try_from(code).ok()?;
    Some(match (dtype, raw) {
        (DataType::Float, Some(raw)) => chunks(raw, f32::from_le_bytes)
            .iter()
            .map(|v| format!("{v:?}"))
            .collect(),
        (DataType::Float, None) => tensor.float_data.iter().map(|v| format!("{v:?}")).collect(),
        (DataType::Double, Some(raw)) => chunks(raw, f64::from_le_bytes)
            .iter()
            .map(|v| format!("{v:?}"))
            .collect(),
        (DataType::Double, None) => tensor
            .double_data
            .iter()
            .map(|v| format!("{v:?}"))
            .collect(),
        (DataType::Int64, Some(raw)) => chunks(raw, i64::from_le_bytes)
            .iter()
            .map(|v| v.to_string())
            .collect(),
        (DataType::Int64, None) => tensor.int64_data.iter().map(|v| v.to_string()).collect(),
        (DataType::Int32, Some(raw)) => chunks(raw, i32::from_le_bytes)
            .iter()
            .map(|v| v.to_string())
            .collect(),
        (DataType::Int32 | DataType::Bool | DataType::Uint8 | DataType::Int8, None) => {
            tensor.int32_data.iter().map(|v| v.to_string()).collect()
        }
        (DataType::Bool | DataType::Uint8, Some(raw)) => {
            raw.iter().map(|v| v.to_string()).collect()
        }
        (DataType::Int8, Some(raw)) => raw.iter().map(|v| (*v as i8).to_string()).collect(),
        _ => return None,
    })
}
