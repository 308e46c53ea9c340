//! Host split: a rewritten model cut into graphs without control flow, for hosts where every
//! `If` costs (design/gpu.md: under ONNX Runtime's CUDA provider each `If` copies its condition to
//! the host and waits; a graph with an `If` cannot be captured as a CUDA graph; TensorRT builds an
//! `If` only when both branches are fully supported).
//!
//! The main graph is cut at every top-level `If`: each node goes into the earliest straight-line
//! segment after every `If` it depends on (see `pieces`), and each `If` becomes a branch
//! segment, its two bodies each a model of their own whose inputs are the values the body reads
//! from outside and whose outputs are the `If`'s. A host runs the segments in order, keeping every value by
//! name; at a branch it reads the condition (one small host read per `If`, or none where it
//! knows the decision, e.g. from a calibrated schedule) and runs one body. Nothing is
//! recomputed and no op changes, so the segments compute what the single graph computes.
//!
//! Each segment carries the initializers it reads, and a copy of each `Constant` node it reads
//! (so that no constant crosses a boundary as a runtime value). Values a segment needs from earlier ones (or
//! from the model's inputs) are its inputs; values later segments or the model's outputs read are
//! its outputs, typed from the model's declarations or shape inference.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::analysis::Shapes;
use crate::error::{Error, Result};
use crate::ir::{AttrValue, Graph, Model, Node, NodeId, ValueInfo};

/// One piece of a split model.
#[derive(Clone, Debug)]
pub enum Segment {
    /// Straight-line nodes.
    Graph(Model),
    /// A top-level `If`: the host reads `cond` and runs `then` or `otherwise`; both produce the
    /// `If`'s outputs under the same names.
    Branch {
        name: String,
        cond: String,
        then: Model,
        otherwise: Model,
    },
}

/// What a host needs besides the segment files: their order and the branch conditions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The model's own inputs and outputs: the host feeds and reads these by name.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub segments: Vec<ManifestSegment>,
    /// The model's metadata entries (its `fastcache` host contract, its `fastcache.sampler`
    /// settings), for hosts that have only the split.
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ManifestSegment {
    Graph {
        file: String,
    },
    Branch {
        name: String,
        cond: String,
        then: String,
        #[serde(rename = "else")]
        otherwise: String,
        /// Where the condition is a function of the step alone (FastCache's calibrated
        /// schedule): its value at call k of a run is entry k, and the last entry is every later
        /// call's. A host that counts its calls may take the decision from here and not read the
        /// condition at all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by_step: Option<Vec<bool>>,
    },
}

pub const MANIFEST_VERSION: u32 = 1;

/// Cuts `model` at its top-level `If`s. A model without one is a single graph segment.
pub fn split_at_ifs(model: &Model) -> Result<Vec<Segment>> {
    let graph = &model.graph;
    let order = graph.topo_order()?;
    let shapes = Shapes::infer(model);
    let constants = free_constants(graph);
    let pieces = pieces(graph, &order, &constants);
    // What each piece reads from outside itself and produces.
    let reads: Vec<BTreeSet<String>> = pieces.iter().map(|p| p.reads(graph)).collect();
    let produced: Vec<BTreeSet<String>> = pieces.iter().map(|p| p.produces(graph)).collect();
    let model_outputs: HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
    let typer = Typer {
        model,
        shapes: &shapes,
    };

    let mut segments = Vec::with_capacity(pieces.len());
    for (k, piece) in pieces.iter().enumerate() {
        let needed_later = |value: &String| {
            model_outputs.contains(value.as_str())
                || reads[k + 1..].iter().any(|r| r.contains(value))
        };
        let outputs: Vec<String> = produced[k]
            .iter()
            .filter(|v| needed_later(v))
            .cloned()
            .collect();
        match piece {
            Piece::Nodes(ids) => {
                let nodes: Vec<Node> = constants_read(&reads[k], &constants, graph)
                    .chain(ids.iter().map(|&id| graph.node(id).clone()))
                    .collect();
                let inputs = outside_inputs(&without(&reads[k], &constants), graph);
                let outputs = outputs
                    .iter()
                    .map(|o| typer.value_type(o))
                    .collect::<Result<Vec<_>>>()?;
                segments.push(Segment::Graph(typer.model(
                    &format!("segment_{k}"),
                    nodes,
                    Vec::new(),
                    &inputs,
                    outputs,
                )?));
            }
            Piece::Branch(id) => {
                let node = graph.node(*id);
                let cond = node.inputs.first().cloned().unwrap_or_default();
                let body = |attr: &str| -> Result<Model> {
                    let Some(AttrValue::Graph(body)) = node.attr(attr) else {
                        return Err(Error::Invalid(format!("{} has no {attr}", node.label())));
                    };
                    typer.body(
                        &format!("segment_{k}_{attr}"),
                        body,
                        &node.outputs,
                        graph,
                        &constants,
                    )
                };
                segments.push(Segment::Branch {
                    name: node.name.clone(),
                    cond,
                    then: body("then_branch")?,
                    otherwise: body("else_branch")?,
                });
            }
        }
    }
    Ok(segments)
}

/// The straight-line runs and the `If`s between them: S0, If 1, S1, …, If k, Sk (empty runs left
/// out). Each node goes into the earliest run after every `If` it depends on, so that what does
/// not depend on a decision stays together (ONNX Runtime fuses within a graph, and a cut through
/// a fusable pattern would change its rounding).
fn pieces(graph: &Graph, order: &[NodeId], constants: &HashMap<String, NodeId>) -> Vec<Piece> {
    let is_if = |id: NodeId| {
        let node = graph.node(id);
        node.op_type == "If" && node.domain.is_empty()
    };
    let ifs: Vec<NodeId> = order.iter().copied().filter(|&id| is_if(id)).collect();
    // The run a value is available from: 0 for inputs and initializers, j after the j-th If.
    let mut level: HashMap<String, usize> = HashMap::new();
    let mut runs: Vec<Vec<NodeId>> = vec![Vec::new(); ifs.len() + 1];
    for &id in order {
        let node = graph.node(id);
        if node.outputs.iter().any(|o| constants.contains_key(o)) {
            continue;
        }
        let after = node
            .all_reads()
            .iter()
            .filter_map(|v| level.get(v).copied())
            .max()
            .unwrap_or(0);
        let produced_at = match ifs.iter().position(|&i| i == id) {
            Some(j) => j + 1,
            None => {
                runs[after].push(id);
                after
            }
        };
        for output in node.outputs.iter().filter(|o| !o.is_empty()) {
            level.insert(output.clone(), produced_at);
        }
    }
    let mut pieces = Vec::new();
    for (j, run) in runs.into_iter().enumerate() {
        if j > 0 {
            pieces.push(Piece::Branch(ifs[j - 1]));
        }
        if !run.is_empty() {
            pieces.push(Piece::Nodes(run));
        }
    }
    pieces
}

enum Piece {
    Nodes(Vec<NodeId>),
    Branch(NodeId),
}

impl Piece {
    fn ids(&self) -> Vec<NodeId> {
        match self {
            Piece::Nodes(ids) => ids.clone(),
            Piece::Branch(id) => vec![*id],
        }
    }

    /// Values the piece's nodes (and bodies) read that the piece does not produce.
    fn reads(&self, graph: &Graph) -> BTreeSet<String> {
        let produced = self.produces(graph);
        self.ids()
            .iter()
            .flat_map(|&id| graph.node(id).all_reads())
            .filter(|v| !produced.contains(v))
            .collect()
    }

    fn produces(&self, graph: &Graph) -> BTreeSet<String> {
        self.ids()
            .iter()
            .flat_map(|&id| graph.node(id).outputs.clone())
            .filter(|o| !o.is_empty())
            .collect()
    }
}

/// The `Constant` nodes (no inputs) that every segment reading them gets a copy of, by output:
/// a value that crossed a boundary would be an input there, unknown when the segment is
/// optimised (a Reshape's shape, say, on the GPU copied back to the host at every call). Not
/// those that are a model output or an `If`'s condition, which the host reads by name.
fn free_constants(graph: &Graph) -> HashMap<String, NodeId> {
    let conditions: HashSet<&str> = graph
        .nodes()
        .filter(|(_, n)| n.op_type == "If")
        .filter_map(|(_, n)| n.inputs.first().map(String::as_str))
        .collect();
    graph
        .nodes()
        .filter(|(_, n)| n.op_type == "Constant" && n.domain.is_empty() && n.inputs.is_empty())
        .filter_map(|(id, n)| match n.outputs.as_slice() {
            [output]
                if !graph.outputs.iter().any(|o| &o.name == output)
                    && !conditions.contains(output.as_str()) =>
            {
                Some((output.clone(), id))
            }
            _ => None,
        })
        .collect()
}

/// Copies of the constants among `reads`.
fn constants_read<'a>(
    reads: &'a BTreeSet<String>,
    constants: &'a HashMap<String, NodeId>,
    graph: &'a Graph,
) -> impl Iterator<Item = Node> + 'a {
    reads
        .iter()
        .filter_map(|v| constants.get(v))
        .map(|&id| graph.node(id).clone())
}

fn without(reads: &BTreeSet<String>, constants: &HashMap<String, NodeId>) -> BTreeSet<String> {
    reads
        .iter()
        .filter(|v| !constants.contains_key(*v))
        .cloned()
        .collect()
}

/// Of what a piece reads, the values that are not initializers: its inputs.
fn outside_inputs(reads: &BTreeSet<String>, graph: &Graph) -> Vec<String> {
    let initializers: HashSet<&str> = graph.initializers.iter().map(|t| t.name()).collect();
    reads
        .iter()
        .filter(|v| !initializers.contains(v.as_str()) || graph.is_input(v))
        .cloned()
        .collect()
}

/// Builds segment models with the original's opsets, functions and external data.
struct Typer<'a> {
    model: &'a Model,
    shapes: &'a Shapes,
}

impl Typer<'_> {
    /// The type of an outer value: as declared, else as inferred.
    fn value_type(&self, name: &str) -> Result<ValueInfo> {
        if let Some(declared) = self.model.graph.value_type(name) {
            return Ok(declared);
        }
        let shape = self.shapes.get(name);
        let elem = shape.and_then(|s| s.elem).ok_or_else(|| {
            Error::Unsupported(format!(
                "host split: the type of '{name}', which crosses a segment boundary, is unknown"
            ))
        })?;
        Ok(match shape.and_then(|s| s.dims.clone()) {
            Some(dims) => ValueInfo::tensor(name, elem, dims),
            None => ValueInfo::tensor_of_any_shape(name, elem),
        })
    }

    fn model(
        &self,
        name: &str,
        nodes: Vec<Node>,
        own_initializers: Vec<crate::onnx::TensorProto>,
        inputs: &[String],
        outputs: Vec<ValueInfo>,
    ) -> Result<Model> {
        let outer = &self.model.graph;
        let mut graph = Graph::new(name);
        let read: BTreeSet<String> = nodes.iter().flat_map(|n| n.all_reads()).collect();
        let mut names: HashSet<String> = HashSet::new();
        graph.initializers = own_initializers;
        names.extend(graph.initializers.iter().map(|t| t.name().to_string()));
        for tensor in &outer.initializers {
            if read.contains(tensor.name())
                && !names.contains(tensor.name())
                && !outer.is_input(tensor.name())
            {
                graph.initializers.push(tensor.clone());
            }
        }
        for input in inputs {
            graph.inputs.push(self.value_type(input)?);
        }
        for node in nodes {
            graph.add_node(node);
        }
        graph.outputs = outputs;
        let model = Model {
            graph,
            opsets: self.model.opsets.clone(),
            metadata: Vec::new(),
            functions: self.model.functions.clone(),
            external: self.model.external.clone(),
            info: self.model.info.clone(),
        };
        crate::ir::verify_model(&model).map_err(|e| {
            Error::Invalid(format!(
                "host split: segment '{name}' is not a valid graph: {e}"
            ))
        })?;
        Ok(model)
    }

    /// An `If` body as a model: inputs are what it reads from the enclosing graph, outputs the
    /// `If`'s output names (an Identity where the body names them otherwise).
    fn body(
        &self,
        name: &str,
        body: &Graph,
        if_outputs: &[String],
        outer: &Graph,
        constants: &HashMap<String, NodeId>,
    ) -> Result<Model> {
        let captured = body.captured_values();
        let inputs = outside_inputs(&without(&captured, constants), outer);
        let mut nodes: Vec<Node> = constants_read(&captured, constants, outer)
            .chain(body.nodes().map(|(_, n)| n.clone()))
            .collect();
        let renames: HashMap<&str, &str> = body
            .outputs
            .iter()
            .zip(if_outputs)
            .map(|(inner, outer)| (inner.name.as_str(), outer.as_str()))
            .collect();
        for (inner, outer_name) in &renames {
            if inner != outer_name {
                nodes.push(
                    Node::new("Identity", &[inner], &[outer_name])
                        .with_name(format!("{name}.{outer_name}")),
                );
            }
        }
        let outputs: Vec<ValueInfo> = body
            .outputs
            .iter()
            .zip(if_outputs)
            .filter(|(_, outer_name)| !outer_name.is_empty())
            .map(|(inner, outer_name)| {
                let mut typed = inner.clone();
                typed.name = outer_name.clone();
                typed
            })
            .collect();
        self.model(name, nodes, body.initializers.clone(), &inputs, outputs)
    }
}

/// The manifest of `segments` saved as `segment_{k}.onnx` (`segment_{k}_then.onnx`,
/// `segment_{k}_else.onnx` for branches), for a model with these inputs and outputs.
pub fn manifest(model: &Model, segments: &[Segment]) -> Manifest {
    let file = |k: usize, part: &str| format!("segment_{k}{part}.onnx");
    Manifest {
        version: MANIFEST_VERSION,
        inputs: model.graph.inputs.iter().map(|v| v.name.clone()).collect(),
        outputs: model.graph.outputs.iter().map(|v| v.name.clone()).collect(),
        metadata: model.metadata_map(),
        segments: segments
            .iter()
            .enumerate()
            .map(|(k, s)| match s {
                Segment::Graph(_) => ManifestSegment::Graph { file: file(k, "") },
                Segment::Branch { name, cond, .. } => ManifestSegment::Branch {
                    name: name.clone(),
                    cond: cond.clone(),
                    then: file(k, "_then"),
                    otherwise: file(k, "_else"),
                    by_step: (cond == crate::cache::step::SCHEDULE_SKIP)
                        .then(|| crate::cache::step::schedule_by_step(model))
                        .flatten(),
                },
            })
            .collect(),
    }
}

/// The segments and manifest.json, written into a fresh folder beside DIR that then replaces
/// it, so a failed write leaves no half a split behind; an existing DIR is replaced only if it
/// holds a split (its manifest.json) and nothing but segment files.
pub fn write_split(dir: &Path, model: &Model, segments: &[Segment]) -> anyhow::Result<()> {
    use anyhow::{Context, bail};
    if dir.exists() {
        let ours = dir.join("manifest.json").is_file()
            && std::fs::read_dir(dir)?.flatten().all(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name == "manifest.json" || name.starts_with("segment_")
            });
        if !ours {
            bail!(
                "{}: the folder exists and is not a host split fastcache wrote; choose another",
                dir.display()
            );
        }
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".fastcache-split-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a folder in {}", parent.display()))?;
    let manifest = manifest(model, segments);
    let save = |segment: &Model, file: &str| -> anyhow::Result<()> {
        let path = staging.path().join(file);
        segment
            .save(&path, &segment.default_storage(&path))
            .with_context(|| format!("cannot write {}", path.display()))
    };
    for (segment, entry) in segments.iter().zip(&manifest.segments) {
        match (segment, entry) {
            (Segment::Graph(m), ManifestSegment::Graph { file }) => save(m, file)?,
            (
                Segment::Branch {
                    then, otherwise, ..
                },
                ManifestSegment::Branch {
                    then: then_file,
                    otherwise: else_file,
                    ..
                },
            ) => {
                save(then, then_file)?;
                save(otherwise, else_file)?;
            }
            _ => unreachable!("the manifest lists the segments in order"),
        }
    }
    std::fs::write(
        staging.path().join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, dir)
        .with_context(|| format!("cannot move the split into {}", dir.display()))?;
    Ok(())
}
