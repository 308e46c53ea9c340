//! Small helpers for passes that add nodes: fresh, prefixed value names, initializers from Rust
//! values, one-line node construction. Works on any graph, the main one or a branch body.

use std::collections::HashSet;

use bytes::Bytes;

use crate::ir::{AttrValue, Graph, Node};
use crate::onnx::TensorProto;
use crate::onnx::tensor_proto::DataType;

pub struct Builder<'g> {
    pub graph: &'g mut Graph,
    /// Every value and node this builder makes is named `{prefix}{hint}`, kept unique in the graph.
    prefix: String,
    /// Names defined in the graph, gathered once: asking the graph for every new name would
    /// make building quadratic in the graph's size.
    used: HashSet<String>,
}

impl<'g> Builder<'g> {
    pub fn new(graph: &'g mut Graph, prefix: impl Into<String>) -> Builder<'g> {
        let used = graph.defined_values();
        Builder {
            graph,
            prefix: prefix.into(),
            used,
        }
    }

    pub fn name(&mut self, hint: &str) -> String {
        let base = format!("{}{hint}", self.prefix);
        let name = if self.used.contains(&base) {
            (1..)
                .map(|i| format!("{base}_{i}"))
                .find(|candidate| !self.used.contains(candidate))
                .expect("some suffix is free")
        } else {
            base
        };
        self.used.insert(name.clone());
        name
    }

    /// Adds `op_type(inputs)` with attributes; returns its (single) output's name.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<(&str, AttrValue)>,
    ) -> String {
        let output = self.name(&op_type.to_ascii_lowercase());
        self.op_into(op_type, inputs, attributes, &output);
        output
    }

    /// Adds `op_type(inputs)` writing to the given output name.
    pub fn op_into(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<(&str, AttrValue)>,
        output: &str,
    ) {
        self.used.insert(output.to_string());
        let mut node = Node::new(op_type, inputs, &[output]).with_name(output.to_string());
        for (name, value) in attributes {
            node = node.with_attr(name, value);
        }
        self.graph.add_node(node);
    }

    pub fn init_f32(&mut self, hint: &str, dims: &[i64], values: &[f32]) -> String {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(hint, dims, DataType::Float, bytes)
    }

    pub fn init_i64(&mut self, hint: &str, dims: &[i64], values: &[i64]) -> String {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init(hint, dims, DataType::Int64, bytes)
    }

    fn init(&mut self, hint: &str, dims: &[i64], dtype: DataType, bytes: Vec<u8>) -> String {
        let name = self.name(hint);
        self.graph
            .initializers
            .push(tensor(&name, dims, dtype, bytes));
        name
    }
}

/// A tensor with raw little-endian data.
pub fn tensor(name: &str, dims: &[i64], dtype: DataType, bytes: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(dtype as i32),
        raw_data: Some(Bytes::from(bytes)),
        ..TensorProto::default()
    }
}

/// `value` as float32: itself, or a Cast of it.
pub(crate) fn to_f32(b: &mut Builder, value: &str, elem: i32) -> String {
    if elem == DataType::Float as i32 {
        value.to_string()
    } else {
        b.op(
            "Cast",
            &[value],
            vec![("to", AttrValue::Int(DataType::Float as i64))],
        )
    }
}

/// Float32 `value` in element type `elem`: itself, or a Cast of it.
pub(crate) fn f32_as(b: &mut Builder, value: &str, elem: i32) -> String {
    if elem == DataType::Float as i32 {
        value.to_string()
    } else {
        b.op("Cast", &[value], vec![("to", AttrValue::Int(elem as i64))])
    }
}

/// Writes float32 `value` to `output` in element type `elem`.
pub(crate) fn from_f32(b: &mut Builder, value: &str, elem: i32, output: &str) {
    if elem == DataType::Float as i32 {
        b.op_into("Identity", &[value], vec![], output);
    } else {
        b.op_into(
            "Cast",
            &[value],
            vec![("to", AttrValue::Int(elem as i64))],
            output,
        );
    }
}

/// TopK along `axis`, sorted; returns (values, indices).
pub(crate) fn top_k(
    b: &mut Builder,
    input: &str,
    k: &str,
    axis: i64,
    largest: bool,
) -> (String, String) {
    let values = b.name("topk_values");
    let indices = b.name("topk_indices");
    let node = Node::new("TopK", &[input, k], &[&values, &indices])
        .with_name(b.name("topk"))
        .with_attr("axis", AttrValue::Int(axis))
        .with_attr("largest", AttrValue::Int(largest as i64))
        .with_attr("sorted", AttrValue::Int(1));
    b.graph.add_node(node);
    (values, indices)
}
