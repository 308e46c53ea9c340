//! The data-flow view of the main graph that structure discovery reasons on.
//!
//! Every value is one of three kinds:
//! - *constant*: depends on no graph input (initializers, `Constant` nodes, arithmetic on them);
//!   weights and hyper-parameters, never side inputs;
//! - *shape*: depends on graph inputs only through `Shape`/`Size` (shape arithmetic, masks built
//!   from sizes); it carries no activation data, so a path through it does not count as a data
//!   path — otherwise a `Shape(hidden_states)` reused by every block would bypass every block
//!   boundary;
//! - *data*: everything else, the activations.
//!
//! Nodes are numbered by their position in one topological order; edges and sets below use those
//! positions, which keeps the algorithms plain vectors and makes "before/after" a comparison.

use std::collections::{HashMap, HashSet};

use crate::ir::{Graph, Node, NodeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ValueKind {
    Constant,
    Shape,
    Data,
}

pub struct Flow<'g> {
    pub graph: &'g Graph,
    /// Topological order; a node's position is its index here.
    pub order: Vec<NodeId>,
    pub pos: HashMap<NodeId, usize>,
    /// Values each node reads (inputs and values captured by its subgraphs), without repeats.
    pub reads: Vec<Vec<String>>,
    pub kind: HashMap<String, ValueKind>,
    /// Position of the node producing each value.
    pub producer: HashMap<String, usize>,
    /// Positions of the nodes reading each value (any kind).
    pub readers: HashMap<String, Vec<usize>>,
    /// Data-edge predecessors and successors by position.
    pub data_pred: Vec<Vec<usize>>,
    pub data_succ: Vec<Vec<usize>>,
}

impl<'g> Flow<'g> {
    pub fn new(graph: &'g Graph) -> crate::Result<Flow<'g>> {
        let order = graph.topo_order()?;
        let pos: HashMap<NodeId, usize> =
            order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let reads: Vec<Vec<String>> = order
            .iter()
            .map(|&id| graph.node(id).all_reads().into_iter().collect())
            .collect();
        let mut kind: HashMap<String, ValueKind> = HashMap::new();
        for tensor in &graph.initializers {
            kind.insert(tensor.name().to_string(), ValueKind::Constant);
        }
        for input in &graph.inputs {
            kind.entry(input.name.clone()).or_insert(ValueKind::Data);
        }
        let mut producer = HashMap::new();
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for (p, &id) in order.iter().enumerate() {
            let node = graph.node(id);
            for value in &reads[p] {
                readers.entry(value.clone()).or_default().push(p);
            }
            let input_kinds = reads[p]
                .iter()
                // A value nothing defines (only in a broken graph) is taken as data: the
                // conservative choice for "does a path exist".
                .map(|v| kind.get(v).copied().unwrap_or(ValueKind::Data));
            let out_kind = output_kind(node, input_kinds);
            for output in node.outputs.iter().filter(|o| !o.is_empty()) {
                producer.entry(output.clone()).or_insert(p);
                kind.insert(output.clone(), out_kind);
            }
        }
        let n = order.len();
        let mut data_pred = vec![Vec::new(); n];
        let mut data_succ = vec![Vec::new(); n];
        for p in 0..n {
            for value in &reads[p] {
                if kind.get(value) == Some(&ValueKind::Data)
                    && let Some(&q) = producer.get(value)
                    && !data_pred[p].contains(&q)
                {
                    data_pred[p].push(q);
                    data_succ[q].push(p);
                }
            }
        }
        Ok(Flow {
            graph,
            order,
            pos,
            reads,
            kind,
            producer,
            readers,
            data_pred,
            data_succ,
        })
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn node(&self, p: usize) -> &'g Node {
        self.graph.node(self.order[p])
    }

    pub fn kind(&self, value: &str) -> ValueKind {
        self.kind.get(value).copied().unwrap_or(ValueKind::Data)
    }

    pub fn is_data(&self, value: &str) -> bool {
        self.kind(value) == ValueKind::Data
    }

    pub fn producer(&self, value: &str) -> Option<usize> {
        self.producer.get(value).copied()
    }

    pub fn readers(&self, value: &str) -> &[usize] {
        self.readers.get(value).map_or(&[], |r| r.as_slice())
    }

    /// Nodes reading `value` as data.
    pub fn data_readers(&self, value: &str) -> Vec<usize> {
        if self.is_data(value) {
            self.readers(value).to_vec()
        } else {
            Vec::new()
        }
    }

    /// Every node downstream of `values` along data edges (the readers of the values included).
    pub fn data_descendants(&self, values: &[&str]) -> Vec<bool> {
        let mut seen = vec![false; self.len()];
        let mut stack: Vec<usize> = values.iter().flat_map(|v| self.data_readers(v)).collect();
        while let Some(p) = stack.pop() {
            if !seen[p] {
                seen[p] = true;
                stack.extend(self.data_succ[p].iter().copied());
            }
        }
        seen
    }

    /// Every node upstream of `starts` along data edges, the starts included.
    pub fn data_ancestors(&self, starts: &[usize]) -> Vec<bool> {
        let mut seen = vec![false; self.len()];
        let mut stack = starts.to_vec();
        while let Some(p) = stack.pop() {
            if !seen[p] {
                seen[p] = true;
                stack.extend(self.data_pred[p].iter().copied());
            }
        }
        seen
    }

    /// Graph inputs (not initializer defaults) that reach the nodes marked in `nodes` along data
    /// edges, or that those nodes read directly.
    pub fn data_inputs_of(&self, nodes: &[bool]) -> Vec<String> {
        let ancestors = self.data_ancestors(
            &nodes
                .iter()
                .enumerate()
                .filter(|(_, m)| **m)
                .map(|(p, _)| p)
                .collect::<Vec<_>>(),
        );
        let mut found = Vec::new();
        for input in &self.graph.inputs {
            if self.kind(&input.name) != ValueKind::Data {
                continue;
            }
            if self.readers(&input.name).iter().any(|&p| ancestors[p]) {
                found.push(input.name.clone());
            }
        }
        found
    }

    /// The graph outputs that are results, not intermediate values also read inside the graph
    /// (as `expose` adds): the sinks every data path is meant to end in.
    pub fn result_outputs(&self) -> Vec<String> {
        let outputs: Vec<String> = self.graph.outputs.iter().map(|o| o.name.clone()).collect();
        let results: Vec<String> = outputs
            .iter()
            .filter(|o| self.readers(o).is_empty())
            .cloned()
            .collect();
        if results.is_empty() { outputs } else { results }
    }

    /// All values produced by the marked nodes.
    pub fn outputs_of(&self, nodes: &[bool]) -> HashSet<String> {
        nodes
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .flat_map(|(p, _)| {
                self.node(p)
                    .outputs
                    .iter()
                    .filter(|o| !o.is_empty())
                    .cloned()
            })
            .collect()
    }
}

fn output_kind(node: &Node, inputs: impl Iterator<Item = ValueKind>) -> ValueKind {
    let kinds: Vec<ValueKind> = inputs.collect();
    let all_constant = kinds.iter().all(|k| *k == ValueKind::Constant);
    let is_shape_op = node.domain.is_empty() && matches!(node.op_type.as_str(), "Shape" | "Size");
    if all_constant {
        // Includes nodes without inputs (`Constant`). Random generators without inputs would be
        // data, but diffusion exports do not contain them.
        if node.op_type.starts_with("Random") {
            ValueKind::Data
        } else {
            ValueKind::Constant
        }
    } else if is_shape_op || !kinds.contains(&ValueKind::Data) {
        ValueKind::Shape
    } else {
        ValueKind::Data
    }
}

/// Operators whose cost grows with a weight matrix: the "real work" a residual branch must hold.
pub fn is_heavy(node: &Node) -> bool {
    node.domain.is_empty()
        && matches!(
            node.op_type.as_str(),
            "MatMul"
                | "Gemm"
                | "Conv"
                | "ConvTranspose"
                | "Einsum"
                | "MatMulInteger"
                | "QLinearMatMul"
        )
}
