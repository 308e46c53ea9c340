//! The graph IR: an ONNX graph as a petgraph DAG of operator nodes, connected by the values they
//! exchange, with everything else of the file (types, initializers, metadata, opsets, functions)
//! kept so that converting back reproduces the original model.
//!
//! Values are identified by name, as in ONNX. Edges (producer → consumer) are derived from names
//! and kept current by the mutation methods of [`Graph`]; a node whose subgraphs read a value of
//! the enclosing graph has an edge from that value's producer too.

mod convert;
pub mod text;
mod verify;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};

use crate::error::{Error, Result};
use crate::onnx::{
    AttributeProto, ExternalStore, FunctionProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, SparseTensorProto, StringStringEntryProto, TensorProto, TypeProto,
    ValueInfoProto, type_proto,
};

pub use verify::verify_model;

pub type NodeId = NodeIndex;

/// A whole model: the main graph plus the model-level fields.
#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Graph,
    pub opsets: Vec<OperatorSetIdProto>,
    pub metadata: Vec<StringStringEntryProto>,
    /// Model-local functions are kept as they are in the file; no pass rewrites inside them.
    pub functions: Vec<FunctionProto>,
    /// The external data files the model's tensors may point into.
    pub external: ExternalStore,
    /// The model's remaining fields (ir_version, producer, doc string, training info, ...), with
    /// the fields above cleared.
    pub info: ModelProto,
}

/// One graph: the main graph, or the body of an `If`, `Loop` or `Scan`.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    dag: StableDiGraph<Node, String>,
    producers: HashMap<String, NodeId>,
    /// Readers of values no node of this graph produces (graph inputs, initializers, values of
    /// an enclosing graph): kept so that adding a producer, or asking for readers, needs no scan.
    unresolved: HashMap<String, BTreeSet<NodeId>>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub initializers: Vec<TensorProto>,
    pub value_info: Vec<ValueInfo>,
    /// The graph's remaining fields (doc string, sparse initializers, annotations, metadata).
    info: GraphProto,
}

/// An operator node.
#[derive(Clone, Debug, Default)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// "" is the default ONNX domain.
    pub domain: String,
    /// Value names; "" marks an omitted optional input or output.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
    /// Exporter metadata, e.g. the dynamo exporter's `pkg.torch.onnx.name_scopes`.
    pub metadata: Vec<StringStringEntryProto>,
    info: NodeProto,
}

#[derive(Clone, Debug)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
    info: AttributeProto,
}

#[derive(Clone, Debug)]
pub enum AttrValue {
    Float(f32),
    Int(i64),
    String(Bytes),
    Tensor(TensorProto),
    Graph(Box<Graph>),
    SparseTensor(SparseTensorProto),
    Type(TypeProto),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<Bytes>),
    Tensors(Vec<TensorProto>),
    Graphs(Vec<Graph>),
    SparseTensors(Vec<SparseTensorProto>),
    Types(Vec<TypeProto>),
}

/// A typed value (graph input, output or intermediate with known type).
#[derive(Clone, Debug, Default)]
pub struct ValueInfo {
    pub name: String,
    pub ty: Option<TypeProto>,
    info: ValueInfoProto,
}

/// One dimension of a tensor shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Fixed(i64),
    Named(String),
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named(name) => write!(f, "{name}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

impl Model {
    /// Loads a model file (and its external data) into the IR.
    pub fn load(path: &Path) -> Result<Model> {
        Model::from_loaded(crate::onnx::load_model(path)?, path)
    }

    /// [`Model::load`] on bytes in memory, said to come from `path`.
    pub fn from_bytes(bytes: bytes::Bytes, path: &Path) -> Result<Model> {
        Model::from_loaded(crate::onnx::decode_model(bytes, path)?, path)
    }

    fn from_loaded(loaded: crate::onnx::LoadedModel, path: &Path) -> Result<Model> {
        Model::from_proto(loaded.proto, loaded.external).map_err(|e| match e {
            Error::Invalid(message) => Error::Decode {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    /// Saves the model; see [`crate::onnx::Storage`] for where tensor bytes go.
    pub fn save(&self, path: &Path, storage: &crate::onnx::Storage) -> Result<()> {
        crate::onnx::save_model(self.to_proto()?, &self.external, path, storage)
    }

    /// How to save this model unless told otherwise: weights stay external when they came from
    /// external data or are too large for one file; otherwise one self-contained file.
    pub fn default_storage(&self, output: &Path) -> crate::onnx::Storage {
        if !self.external.files().is_empty()
            || self.graph.weight_bytes() > crate::onnx::INLINE_WEIGHT_LIMIT
        {
            crate::onnx::Storage::external_beside(output)
        } else {
            crate::onnx::Storage::Inline
        }
    }

    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|e| e.key.as_deref() == Some(key))
            .and_then(|e| e.value.as_deref())
    }

    /// Every metadata entry, by key (a missing key or value reads as empty).
    pub fn metadata_map(&self) -> std::collections::BTreeMap<String, String> {
        self.metadata
            .iter()
            .map(|e| {
                (
                    e.key.clone().unwrap_or_default(),
                    e.value.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Sets (or adds) a model metadata entry.
    pub fn set_metadata(&mut self, key: &str, value: String) {
        match self
            .metadata
            .iter_mut()
            .find(|e| e.key.as_deref() == Some(key))
        {
            Some(entry) => entry.value = Some(value),
            None => self.metadata.push(StringStringEntryProto::new(key, value)),
        }
    }

    /// The opset version imported for a domain ("" and "ai.onnx" are the same domain).
    pub fn opset_version(&self, domain: &str) -> Option<i64> {
        let wanted = normalize_domain(domain);
        self.opsets
            .iter()
            .find(|o| normalize_domain(o.domain.as_deref().unwrap_or("")) == wanted)
            .and_then(|o| o.version)
    }
}

pub(crate) fn normalize_domain(domain: &str) -> &str {
    if domain == "ai.onnx" { "" } else { domain }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// The underlying petgraph DAG (edges point from producer to consumer; weight: value name).
    pub fn dag(&self) -> &StableDiGraph<Node, String> {
        &self.dag
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    pub fn node_count(&self) -> usize {
        self.dag.node_count()
    }

    /// Nodes in insertion order (for a loaded model: file order).
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.dag.node_indices().map(move |id| (id, &self.dag[id]))
    }

    /// The node that produces `value`, if a node of this graph does.
    pub fn producer(&self, value: &str) -> Option<NodeId> {
        self.producers.get(value).copied()
    }

    /// Nodes that read `value`, directly or from inside their subgraphs.
    pub fn consumers(&self, value: &str) -> Vec<NodeId> {
        if let Some(producer) = self.producer(value) {
            let mut ids: Vec<NodeId> = self
                .dag
                .edges_directed(producer, Direction::Outgoing)
                .filter(|e| e.weight() == value)
                .map(|e| e.target())
                .collect();
            ids.sort();
            ids.dedup();
            return ids;
        }
        self.unresolved
            .get(value)
            .map(|readers| readers.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Adds a node and connects it to the producers of its inputs and to existing readers of its
    /// outputs.
    pub fn add_node(&mut self, node: Node) -> NodeId {
        let id = self.dag.add_node(node);
        self.link(id);
        id
    }

    pub fn remove_node(&mut self, id: NodeId) -> Option<Node> {
        if !self.dag.contains_node(id) {
            return None;
        }
        self.unlink(id);
        self.dag.remove_node(id)
    }

    /// Changes a node in place and reconnects it.
    pub fn update_node<R>(&mut self, id: NodeId, f: impl FnOnce(&mut Node) -> R) -> R {
        self.unlink(id);
        let result = f(&mut self.dag[id]);
        self.link(id);
        result
    }

    /// Makes every reader of `from` (nodes and graph outputs) read `to` instead.
    pub fn replace_uses(&mut self, from: &str, to: &str) {
        for id in self.consumers(from) {
            self.update_node(id, |node| node.rename_reads(from, to));
        }
        for output in &mut self.outputs {
            if output.name == from {
                output.name = to.to_string();
            }
        }
    }

    /// Disconnects a node: its reads are forgotten, and readers of what it produced wait for
    /// another producer.
    fn unlink(&mut self, id: NodeId) {
        for value in self.dag[id].all_reads() {
            if let Some(readers) = self.unresolved.get_mut(&value) {
                readers.remove(&id);
                if readers.is_empty() {
                    self.unresolved.remove(&value);
                }
            }
        }
        let outgoing: Vec<(NodeId, String)> = self
            .dag
            .edges_directed(id, Direction::Outgoing)
            .map(|e| (e.target(), e.weight().clone()))
            .collect();
        let edges: Vec<_> = self
            .dag
            .edges_directed(id, Direction::Incoming)
            .chain(self.dag.edges_directed(id, Direction::Outgoing))
            .map(|e| e.id())
            .collect();
        for edge in edges {
            self.dag.remove_edge(edge);
        }
        for output in self.dag[id].outputs.clone() {
            if self.producers.get(&output) == Some(&id) {
                self.producers.remove(&output);
            }
        }
        for (reader, value) in outgoing {
            self.unresolved.entry(value).or_default().insert(reader);
        }
    }

    fn link(&mut self, id: NodeId) {
        let node = &self.dag[id];
        let outputs: Vec<String> = node
            .outputs
            .iter()
            .filter(|o| !o.is_empty())
            .cloned()
            .collect();
        let reads: Vec<String> = node.all_reads().into_iter().collect();
        for output in &outputs {
            if self.producers.contains_key(output) {
                continue;
            }
            self.producers.insert(output.clone(), id);
            if let Some(readers) = self.unresolved.remove(output) {
                for reader in readers {
                    if reader != id {
                        self.dag.add_edge(id, reader, output.clone());
                    }
                }
            }
        }
        for value in reads {
            match self.producers.get(&value) {
                Some(&producer) if producer != id => {
                    self.dag.add_edge(producer, id, value);
                }
                Some(_) => {}
                None => {
                    self.unresolved.entry(value).or_default().insert(id);
                }
            }
        }
    }

    /// Rebuilds all edges from value names (after bulk construction).
    fn relink_all(&mut self) {
        self.dag.clear_edges();
        self.producers.clear();
        self.unresolved.clear();
        let ids: Vec<NodeId> = self.dag.node_indices().collect();
        for &id in &ids {
            for output in &self.dag[id].outputs {
                if !output.is_empty() {
                    self.producers.entry(output.clone()).or_insert(id);
                }
            }
        }
        for &id in &ids {
            for value in self.dag[id].all_reads() {
                match self.producers.get(&value) {
                    Some(&producer) if producer != id => {
                        self.dag.add_edge(producer, id, value);
                    }
                    Some(_) => {}
                    None => {
                        self.unresolved.entry(value).or_default().insert(id);
                    }
                }
            }
        }
    }

    /// A topological order that keeps insertion order wherever dependencies allow, so a loaded,
    /// unchanged graph comes back in its file order. Fails on a cycle, naming nodes on it.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        let mut indegree: HashMap<NodeId, usize> =
            self.dag.node_indices().map(|id| (id, 0)).collect();
        for edge in self.dag.edge_references() {
            *indegree.get_mut(&edge.target()).unwrap() += 1;
        }
        let mut ready: BinaryHeap<Reverse<NodeId>> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(id, _)| Reverse(*id))
            .collect();
        let mut order = Vec::with_capacity(self.dag.node_count());
        while let Some(Reverse(id)) = ready.pop() {
            order.push(id);
            for edge in self.dag.edges_directed(id, Direction::Outgoing) {
                let d = indegree.get_mut(&edge.target()).unwrap();
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(edge.target()));
                }
            }
        }
        if order.len() != self.dag.node_count() {
            let cycle: Vec<String> = self
                .a_cycle(&indegree)
                .iter()
                .map(|id| self.dag[*id].label())
                .collect();
            return Err(Error::Verify(vec![format!(
                "graph '{}' has a cycle: {}",
                self.name,
                cycle.join(" reads ")
            )]));
        }
        Ok(order)
    }

    /// One cycle among the nodes a topological sort left (`indegree` > 0), each node followed by
    /// one it reads. Every such node reads another one, so walking backwards must repeat a node.
    fn a_cycle(&self, indegree: &HashMap<NodeId, usize>) -> Vec<NodeId> {
        let stuck = |id: &NodeId| indegree.get(id).is_some_and(|d| *d > 0);
        let Some(start) = self.dag.node_indices().find(stuck) else {
            return Vec::new();
        };
        let mut path = vec![start];
        loop {
            let last = *path.last().unwrap();
            let Some(previous) = self
                .dag
                .edges_directed(last, Direction::Incoming)
                .map(|edge| edge.source())
                .filter(stuck)
                .min()
            else {
                return path;
            };
            if let Some(at) = path.iter().position(|&id| id == previous) {
                return path.split_off(at);
            }
            path.push(previous);
        }
    }

    /// Bytes of the initializers of this graph and its bodies, wherever they are stored.
    pub fn weight_bytes(&self) -> u64 {
        let own: u64 = self
            .initializers
            .iter()
            .map(|t| {
                let stored = t.raw_data.as_ref().map_or(0, |b| b.len() as u64)
                    + 4 * (t.float_data.len() + t.int32_data.len()) as u64
                    + 8 * (t.int64_data.len() + t.double_data.len() + t.uint64_data.len()) as u64;
                let external = t
                    .external_entry("length")
                    .and_then(|l| l.parse::<u64>().ok());
                external.unwrap_or(stored)
            })
            .sum();
        own + self
            .nodes()
            .flat_map(|(_, n)| n.subgraphs())
            .map(Graph::weight_bytes)
            .sum::<u64>()
    }

    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        self.initializers.iter().find(|t| t.name() == name)
    }

    pub fn is_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|v| v.name == name)
    }

    /// The declared type of a value: graph input, output, value_info entry, or initializer.
    pub fn value_type(&self, name: &str) -> Option<ValueInfo> {
        self.inputs
            .iter()
            .chain(&self.value_info)
            .chain(&self.outputs)
            .find(|v| v.name == name && v.ty.is_some())
            .cloned()
            .or_else(|| {
                let t = self.initializer(name)?;
                let dims = t.dims.iter().map(|&d| Dim::Fixed(d)).collect();
                Some(ValueInfo::tensor(name, t.data_type.unwrap_or(0), dims))
            })
    }

    /// Records (or replaces) the type of an intermediate value.
    pub fn set_value_type(&mut self, value: ValueInfo) {
        match self.value_info.iter_mut().find(|v| v.name == value.name) {
            Some(existing) => *existing = value,
            None => self.value_info.push(value),
        }
    }

    /// Every value this graph defines: inputs, initializers, node outputs.
    pub fn defined_values(&self) -> HashSet<String> {
        let mut defined: HashSet<String> = self.inputs.iter().map(|v| v.name.clone()).collect();
        defined.extend(self.initializers.iter().map(|t| t.name().to_string()));
        for (_, node) in self.nodes() {
            defined.extend(node.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
        defined
    }

    /// Values read in this graph (or nested graphs) but defined outside it: what a subgraph
    /// captures from its enclosing scope.
    pub fn captured_values(&self) -> BTreeSet<String> {
        let defined = self.defined_values();
        let mut captured = BTreeSet::new();
        for (_, node) in self.nodes() {
            for value in node.all_reads() {
                if !defined.contains(&value) {
                    captured.insert(value);
                }
            }
        }
        for output in &self.outputs {
            if !defined.contains(&output.name) {
                captured.insert(output.name.clone());
            }
        }
        captured
    }

    /// A name not used by any value or node of this graph, built from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        let used = self.defined_values();
        if !used.contains(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|candidate| !used.contains(candidate))
            .unwrap()
    }
}

impl Node {
    pub fn new(op_type: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            op_type: op_type.to_string(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            ..Node::default()
        }
    }

    pub fn with_name(mut self, name: impl Into<String>) -> Node {
        self.name = name.into();
        self
    }

    pub fn with_attr(mut self, name: &str, value: AttrValue) -> Node {
        self.attributes.push(Attribute::new(name, value));
        self
    }

    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| &a.value)
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttrValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name)? {
            AttrValue::Ints(v) => Some(v),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attr(name)? {
            AttrValue::Float(v) => Some(*v),
            _ => None,
        }
    }

    /// The node's subgraphs (bodies of If, Loop, Scan), in attribute order.
    pub fn subgraphs(&self) -> Vec<&Graph> {
        let mut graphs = Vec::new();
        for attribute in &self.attributes {
            match &attribute.value {
                AttrValue::Graph(g) => graphs.push(g.as_ref()),
                AttrValue::Graphs(gs) => graphs.extend(gs.iter()),
                _ => {}
            }
        }
        graphs
    }

    /// Values this node reads: its inputs and whatever its subgraphs capture from outside.
    pub fn all_reads(&self) -> BTreeSet<String> {
        let mut reads: BTreeSet<String> = self
            .inputs
            .iter()
            .filter(|i| !i.is_empty())
            .cloned()
            .collect();
        for graph in self.subgraphs() {
            reads.extend(graph.captured_values());
        }
        reads
    }

    pub fn reads(&self, value: &str) -> bool {
        self.inputs.iter().any(|i| i == value)
            || self
                .subgraphs()
                .iter()
                .any(|g| g.captured_values().contains(value))
    }

    fn rename_reads(&mut self, from: &str, to: &str) {
        for input in &mut self.inputs {
            if input == from {
                *input = to.to_string();
            }
        }
        for attribute in &mut self.attributes {
            let graphs: Vec<&mut Graph> = match &mut attribute.value {
                AttrValue::Graph(g) => vec![g.as_mut()],
                AttrValue::Graphs(gs) => gs.iter_mut().collect(),
                _ => continue,
            };
            for graph in graphs {
                if graph.captured_values().contains(from) {
                    graph.replace_uses(from, to);
                }
            }
        }
    }

    /// A short description for messages: the name if it has one, else op type and first output.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!(
                "{} -> {}",
                self.op_type,
                self.outputs.first().map_or("", |s| s.as_str())
            )
        } else {
            format!("'{}' ({})", self.name, self.op_type)
        }
    }

    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|e| e.key.as_deref() == Some(key))
            .and_then(|e| e.value.as_deref())
    }
}

impl Attribute {
    pub fn new(name: &str, value: AttrValue) -> Attribute {
        let info = AttributeProto {
            r#type: Some(value.type_code() as i32),
            ..AttributeProto::default()
        };
        Attribute {
            name: name.to_string(),
            value,
            info,
        }
    }
}

impl AttrValue {
    pub fn type_code(&self) -> crate::onnx::attribute_proto::AttributeType {
        use crate::onnx::attribute_proto::AttributeType as T;
        match self {
            AttrValue::Float(_) => T::Float,
            AttrValue::Int(_) => T::Int,
            AttrValue::String(_) => T::String,
            AttrValue::Tensor(_) => T::Tensor,
            AttrValue::Graph(_) => T::Graph,
            AttrValue::SparseTensor(_) => T::SparseTensor,
            AttrValue::Type(_) => T::TypeProto,
            AttrValue::Floats(_) => T::Floats,
            AttrValue::Ints(_) => T::Ints,
            AttrValue::Strings(_) => T::Strings,
            AttrValue::Tensors(_) => T::Tensors,
            AttrValue::Graphs(_) => T::Graphs,
            AttrValue::SparseTensors(_) => T::SparseTensors,
            AttrValue::Types(_) => T::TypeProtos,
        }
    }
}

impl ValueInfo {
    /// A tensor value of element type `elem` (an ONNX `DataType` code) and shape `dims`.
    pub fn tensor(name: &str, elem: i32, dims: Vec<Dim>) -> ValueInfo {
        let shape = crate::onnx::TensorShapeProto {
            dim: dims
                .into_iter()
                .map(|d| crate::onnx::tensor_shape_proto::Dimension {
                    value: match d {
                        Dim::Fixed(n) => Some(
                            crate::onnx::tensor_shape_proto::dimension::Value::DimValue(n),
                        ),
                        Dim::Named(s) => Some(
                            crate::onnx::tensor_shape_proto::dimension::Value::DimParam(s),
                        ),
                        Dim::Unknown => None,
                    },
                    denotation: None,
                })
                .collect(),
        };
        ValueInfo {
            name: name.to_string(),
            ty: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(elem),
                    shape: Some(shape),
                })),
                denotation: None,
            }),
            info: ValueInfoProto::default(),
        }
    }

    /// A tensor value whose element type is known but whose shape is left open.
    pub fn tensor_of_any_shape(name: &str, elem: i32) -> ValueInfo {
        let mut value = ValueInfo::tensor(name, elem, Vec::new());
        if let Some(type_proto::Value::TensorType(t)) =
            value.ty.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = None;
        }
        value
    }

    fn tensor_type(&self) -> Option<&type_proto::Tensor> {
        match self.ty.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => Some(t),
            _ => None,
        }
    }

    /// The ONNX element type code, for tensor values.
    pub fn elem_type(&self) -> Option<i32> {
        self.tensor_type()?.elem_type
    }

    /// The shape, for tensor values whose rank is known.
    pub fn dims(&self) -> Option<Vec<Dim>> {
        use crate::onnx::tensor_shape_proto::dimension::Value;
        let shape = self.tensor_type()?.shape.as_ref()?;
        Some(
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(Value::DimValue(n)) => Dim::Fixed(*n),
                    Some(Value::DimParam(s)) => Dim::Named(s.clone()),
                    None => Dim::Unknown,
                })
                .collect(),
        )
    }
}
