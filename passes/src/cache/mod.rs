//! The cache engine (design/method.md §1): every cache policy is a **region** (what a skip
//! replaces), a **decision** (when to skip) and an **approximation** (what a skip returns),
//! built by the pieces here into one `If` per region whose then-branch approximates and whose
//! else-branch runs the region; cross-step state is graph input/output pairs described by the
//! `fastcache` metadata contract, all-zero state meaning the first step.
//!
//! | policy | region | decision | approximation |
//! |---|---|---|---|
//! | FastCache (default, [`step::PeerPolicy::Schedule`]) | the stack | a calibrated step mask | forecast of the stack residual from K snapshots |
//! | FastCache's probe test ([`step::PeerPolicy::Probe`]) | blocks 1..L−1 | block 0's forecast error against a calibrated per-step threshold | forecast from 2 snapshots |
//! | FastCache per block (the paper's, [`block`]) | each block | χ² test of the block input's change | cached residual + fitted linear correction, or a forecast of the block's residual from its own last 2–3 computed steps |
//! | First-Block-Cache | blocks 1..L−1 | block 0's residual change | cached residual |
//! | TeaCache | the stack | accumulated change of the modulated input | cached residual |
//! | static interval | the stack | a step counter | cached residual |
//!
//! [`step`] builds the policies that decide once per step (one `If`), [`block`] the per-block
//! one (one `If` per block); both take their regions, state pairs, step counter, stats output
//! and `If`s from this module.

pub mod block;
pub mod step;

pub use block::*;

use std::collections::HashSet;

use crate::builder::Builder;
use crate::contract::{ShapeDim, StatePair};
use crate::error::{Error, Result};
use crate::ir::{AttrValue, Dim, Graph, Model, Node, NodeId, ValueInfo};
use crate::onnx::tensor_proto::DataType;

/// One block of the stack, as the rewrite needs it.
#[derive(Clone, Debug)]
pub struct BlockSpan {
    /// The residual-stream value the block reads (H_{l-1}).
    pub input: String,
    /// The residual-stream value it produces (H_l).
    pub output: String,
    /// The nodes between the two.
    pub nodes: Vec<NodeId>,
    /// The shape of the stream it reads and writes, [batch, tokens, D] (fewer tokens than the
    /// model's where token selection or merging runs it on a subset).
    pub dims: Vec<Dim>,
    /// The stream's element type: the cache keeps its state in it and computes in float32.
    pub elem: i32,
    /// The other residual streams it reads and writes, which later blocks still read (MMDiT's
    /// text stream): the span's `If` outputs them too, and a skip approximates each the way it
    /// approximates the main one, from each one's own state.
    pub companions: Vec<Companion>,
}

/// A second residual stream through a span.
#[derive(Clone, Debug)]
pub struct Companion {
    pub input: String,
    pub output: String,
    pub dims: Vec<Dim>,
    pub elem: i32,
}

/// Every block of `stack` as a span, all running on a stream of shape `dims` (single-stream
/// stacks: companions are MMDiT's, see [`joint_block_spans`]).
pub(crate) fn block_spans(stack: &crate::analysis::DitStack, dims: &[Dim]) -> Vec<BlockSpan> {
    stack
        .blocks
        .iter()
        .map(|b| BlockSpan {
            input: b.input.clone(),
            output: b.output.clone(),
            nodes: b.nodes.clone(),
            dims: dims.to_vec(),
            elem: stack.elem,
            companions: Vec::new(),
        })
        .collect()
}

/// Every block of an MMDiT stack as a span with its own stream shapes (they differ: Flux's
/// single blocks run on text + image tokens where its layout joins the streams once) and the
/// text stream as a companion where a later block reads it. `None` dims for a block whose
/// shapes are not all known or whose output is not shaped like its input (it turns one stream
/// into another and cannot reuse a residual).
pub(crate) fn joint_block_spans(
    model: &Model,
    stack: &crate::analysis::DitStack,
) -> Vec<Option<BlockSpan>> {
    let shapes = crate::analysis::Shapes::infer(model);
    let dims = |value: &str| state_dims(&shapes, value, &stack.batch).filter(|d| d.len() == 3);
    stack
        .blocks
        .iter()
        .map(|b| {
            let main = dims(&b.input).filter(|d| dims(&b.output).as_ref() == Some(d))?;
            let companions = match (&b.text_input, &b.text_output) {
                (Some(input), Some(output)) => {
                    let text = dims(input).filter(|d| dims(output).as_ref() == Some(d))?;
                    vec![Companion {
                        input: input.clone(),
                        output: output.clone(),
                        dims: text,
                        elem: shapes.elem(input).unwrap_or(stack.elem),
                    }]
                }
                _ => Vec::new(),
            };
            Some(BlockSpan {
                input: b.input.clone(),
                output: b.output.clone(),
                nodes: b.nodes.clone(),
                dims: main,
                elem: stack.elem,
                companions,
            })
        })
        .collect()
}

/// The shape a state tensor copied from `value` has: its inferred dims when they are [batch,
/// fixed, …] with the batch dim named as the model's; `None` otherwise, since the contract must
/// state every state shape.
pub(crate) fn state_dims(
    shapes: &crate::analysis::Shapes,
    value: &str,
    batch: &Dim,
) -> Option<Vec<Dim>> {
    let dims = shapes.dims(value)?;
    let (first, rest) = dims.split_first()?;
    let fixed_rest = rest.iter().all(|d| matches!(d, Dim::Fixed(n) if *n > 0));
    (first == batch && fixed_rest).then(|| dims.to_vec())
}

pub const STEP_INPUT: &str = "fastcache.step";
pub const SKIPPED_OUTPUT: &str = "fastcache.skipped";

/// Adds the stats output `fastcache.skipped`: one float per block, 1.0 where the block was
/// skipped this step, in block order (`flags` are those per-block values).
pub(crate) fn add_skipped_output<S: AsRef<str>>(graph: &mut Graph, flags: &[S]) {
    let flags: Vec<&str> = flags.iter().map(AsRef::as_ref).collect();
    let mut b = Builder::new(graph, "fastcache.");
    b.op_into(
        "Concat",
        &flags,
        vec![("axis", AttrValue::Int(0))],
        SKIPPED_OUTPUT,
    );
    graph.outputs.push(ValueInfo::tensor(
        SKIPPED_OUTPUT,
        DataType::Float as i32,
        vec![Dim::Fixed(flags.len() as i64)],
    ));
}

/// Adds the step counter, the only global state: `fastcache.step` [1] int64, zero on the first
/// call (so "all zeros" means "nothing cached yet"), fed back incremented. Returns its pair.
pub(crate) fn add_step_counter(graph: &mut Graph) -> StatePair {
    let step_dims = vec![Dim::Fixed(1)];
    graph.inputs.push(ValueInfo::tensor(
        STEP_INPUT,
        DataType::Int64 as i32,
        step_dims.clone(),
    ));
    let step_next = format!("{STEP_INPUT}.next");
    {
        let mut b = Builder::new(graph, "fastcache.");
        let one = b.init_i64("one", &[1], &[1]);
        b.op_into("Add", &[STEP_INPUT, &one], vec![], &step_next);
    }
    graph.outputs.push(ValueInfo::tensor(
        &step_next,
        DataType::Int64 as i32,
        step_dims.clone(),
    ));
    pair(STEP_INPUT, &step_next, "int64", &step_dims)
}

/// The host contract's name of a state's element type ("float32", "float16", "int64", ...).
pub(crate) fn state_dtype_name(dtype: DataType) -> &'static str {
    match dtype {
        DataType::Float16 => "float16",
        DataType::Bfloat16 => "bfloat16",
        DataType::Int64 => "int64",
        DataType::Bool => "bool",
        _ => "float32",
    }
}

/// A stream's element type as a `DataType` (float32 for a code that is none).
pub(crate) fn stream_dtype(elem: i32) -> DataType {
    DataType::try_from(elem).unwrap_or(DataType::Float)
}

pub(crate) fn pair(input: &str, output: &str, dtype: &str, dims: &[Dim]) -> StatePair {
    StatePair {
        input: input.into(),
        output: output.into(),
        dtype: dtype.into(),
        shape: dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => ShapeDim::Fixed(*n),
                Dim::Named(s) => ShapeDim::Named(s.clone()),
                Dim::Unknown => ShapeDim::Named("?".into()),
            })
            .collect(),
        init: "zeros".into(),
    }
}

/// The ops the rewrite adds need opset 16+ (LessOrEqual, GreaterOrEqual, ReduceSum with optional
/// axes input from 13); exports of opset 17 and 18 already satisfy it. Raising an older model's
/// opset re-reads every node it has under the newer definitions, so a node whose meaning or
/// signature changed on the way is refused by name rather than silently reinterpreted.
pub(crate) fn ensure_opset(model: &mut Model, minimum: i64) -> Result<()> {
    let Some(current) = model.opset_version("") else {
        return Ok(());
    };
    if current >= minimum {
        return Ok(());
    }
    if current < 7 {
        return Err(Error::Unsupported(format!(
            "the model is at opset {current}, and the rewrite needs opset {minimum}; before opset 7 elementwise ops broadcast by attribute, which later opsets read differently; re-export the model at opset {minimum} or later"
        )));
    }
    refuse_reinterpreted(&model.graph, current, minimum)?;
    for opset in &mut model.opsets {
        let domain = opset.domain.as_deref().unwrap_or("");
        if domain.is_empty() || domain == "ai.onnx" {
            opset.version = Some(minimum);
        }
    }
    Ok(())
}

/// The first node of `graph` (or of its subgraphs) that would mean something else, or be
/// invalid, once the opset goes from `from` to `to` (ONNX's operator changelog, for the ops an
/// export can hold; the rewrite's own nodes use the newer forms).
fn refuse_reinterpreted(graph: &Graph, from: i64, to: i64) -> Result<()> {
    for (_, node) in graph.nodes() {
        if node.domain.is_empty() || node.domain == "ai.onnx" {
            let changed_at = |version: i64| from < version && version <= to;
            let has = |attribute: &str| node.attr(attribute).is_some();
            let why = match node.op_type.as_str() {
                "Softmax" | "LogSoftmax" | "Hardmax"
                    if changed_at(13) && !softmax_on_last_axis(graph, node) =>
                {
                    Some(
                        "before opset 13 it normalises over all axes from `axis` on, from 13 over `axis` alone",
                    )
                }
                "ReduceSum" | "Squeeze" | "Unsqueeze" if changed_at(13) && has("axes") => {
                    Some("from opset 13 its axes are an input, not an attribute")
                }
                "Split" if changed_at(13) && has("split") => {
                    Some("from opset 13 its split sizes are an input, not an attribute")
                }
                "Pad" if changed_at(11) && has("pads") => {
                    Some("from opset 11 its pads are an input, not an attribute")
                }
                "Clip" if changed_at(11) && (has("min") || has("max")) => {
                    Some("from opset 11 its bounds are inputs, not attributes")
                }
                "Resize" if changed_at(11) => {
                    Some("opset 11 changed how it maps output to input coordinates")
                }
                "Slice" if changed_at(10) && has("starts") => {
                    Some("from opset 10 its starts, ends and axes are inputs")
                }
                "TopK" if changed_at(10) && has("k") => Some("from opset 10 its k is an input"),
                "Upsample" if changed_at(10) => Some("it is deprecated from opset 10"),
                _ => None,
            };
            if let Some(why) = why {
                return Err(Error::Unsupported(format!(
                    "node '{}' ({}) was written for opset {from}, and the rewrite needs opset {to}: {why}; re-export the model at opset {to} or later",
                    node.name, node.op_type
                )));
            }
        }
        for subgraph in node.subgraphs() {
            refuse_reinterpreted(subgraph, from, to)?;
        }
    }
    Ok(())
}

/// A Softmax over the last axis means the same before and after opset 13.
fn softmax_on_last_axis(graph: &Graph, node: &Node) -> bool {
    let axis = node.attr_int("axis").unwrap_or(1);
    if axis == -1 {
        return true;
    }
    let rank = node
        .inputs
        .first()
        .and_then(|input| graph.value_type(input))
        .and_then(|value| value.dims())
        .map(|dims| dims.len() as i64);
    rank == Some(axis + 1)
}

/// The nodes of a region from `input` to `output`: the blocks' own nodes (some, such as a
/// block's adaLN projection of the conditioning, do not depend on the stream) and every node on a
/// path from `input` to `output`, which takes in what other rewrites put between the blocks
/// (token merging's merge and unmerge).
pub(crate) fn region_nodes(
    graph: &Graph,
    input: &str,
    output: &str,
    block_nodes: impl IntoIterator<Item = NodeId>,
) -> Vec<NodeId> {
    let mut downstream: HashSet<NodeId> = HashSet::new();
    let mut frontier: Vec<String> = vec![input.to_string()];
    while let Some(value) = frontier.pop() {
        for id in graph.consumers(&value) {
            if downstream.insert(id) {
                frontier.extend(graph.node(id).outputs.iter().cloned());
            }
        }
    }
    let mut upstream: HashSet<NodeId> = HashSet::new();
    let mut frontier: Vec<String> = vec![output.to_string()];
    while let Some(value) = frontier.pop() {
        if let Some(id) = graph.producer(&value)
            && upstream.insert(id)
            && downstream.contains(&id)
        {
            frontier.extend(graph.node(id).all_reads());
        }
    }
    let mut nodes: Vec<NodeId> = block_nodes.into_iter().collect();
    let known: HashSet<NodeId> = nodes.iter().copied().collect();
    let mut between: Vec<NodeId> = upstream
        .into_iter()
        .filter(|id| downstream.contains(id) && !known.contains(id))
        .collect();
    between.sort();
    nodes.extend(between);
    nodes
}

/// A value made inside a region and read after it (a state output of a rewrite that went in
/// first, such as token selection's references), which the region's `If` therefore outputs:
/// computed on a computed step, `on_skip` on a skipped one.
#[derive(Clone, Debug)]
pub struct Carried {
    pub value: String,
    pub on_skip: String,
}

/// Puts `span` into the else-branch of an `If` on `cond` whose then-branch is `approximation`;
/// the `If` writes the span's output under its own name, so everything after the span reads it
/// unchanged, and likewise every `carried` value (the then-branch passes its `on_skip` on).
/// Returns how many of the span's nodes had to stay outside (see [`move_span_into_body`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_if(
    graph: &mut Graph,
    span: &BlockSpan,
    cond: &str,
    mut approximation: Graph,
    tag: &str,
    what: &str,
    block_type: &ValueInfo,
    carried: &[Carried],
) -> Result<usize> {
    let (compute, kept_outside) = move_span_into_body(graph, span, tag, what, block_type, carried)?;
    let mut outputs = vec![span.output.clone()];
    outputs.extend(span.companions.iter().map(|c| c.output.clone()));
    let before_carried = outputs.len();
    if approximation.outputs.len() != before_carried {
        return Err(Error::Invalid(format!(
            "{what}: the approximation makes {} outputs for {before_carried} streams",
            approximation.outputs.len()
        )));
    }
    for (i, c) in carried.iter().enumerate() {
        let mut output = compute.outputs[before_carried + i].clone();
        output.name = format!("fastcache.{tag}.skip.carried_{i}");
        approximation.add_node(Node::new("Identity", &[&c.on_skip], &[&output.name]));
        approximation.outputs.push(output);
        outputs.push(c.value.clone());
    }
    let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    graph.add_node(
        Node::new("If", &[cond], &outputs)
            .with_name(format!("fastcache.{tag}.if"))
            .with_attr("then_branch", AttrValue::Graph(Box::new(approximation)))
            .with_attr("else_branch", AttrValue::Graph(Box::new(compute))),
    );
    graph.set_value_type(block_type.clone());
    for c in &span.companions {
        graph.set_value_type(ValueInfo::tensor(&c.output, c.elem, c.dims.clone()));
    }
    Ok(kept_outside)
}

/// Moves the span's nodes (one block, or several consecutive blocks merged into one span) out of
/// `graph` into an else-branch body whose output is the span output. Nodes whose values are read
/// after the span stay outside (with everything in the span they depend on), since a branch's
/// values are invisible outside it. `tag` names the body and its output (`fastcache_{tag}_compute`,
/// `fastcache.{tag}.compute.out`); `what` names the span in errors ("block 3"). Returns the body
/// and how many nodes stayed outside.
pub(crate) fn move_span_into_body(
    graph: &mut Graph,
    span: &BlockSpan,
    tag: &str,
    what: &str,
    block_type: &ValueInfo,
    carried: &[Carried],
) -> Result<(Graph, usize)> {
    let in_block: HashSet<NodeId> = span.nodes.iter().copied().collect();
    let carried_values: HashSet<&str> = carried
        .iter()
        .map(|c| c.value.as_str())
        .chain(span.companions.iter().map(|c| c.output.as_str()))
        .collect();
    // Values made in the block and read by nodes outside it (or graph outputs).
    let graph_outputs: HashSet<&str> = graph.outputs.iter().map(|v| v.name.as_str()).collect();
    let mut stay: HashSet<NodeId> = HashSet::new();
    for &id in &span.nodes {
        let node = graph.node(id);
        let escapes = node.outputs.iter().any(|value| {
            value != &span.output
                && !carried_values.contains(value.as_str())
                && (graph_outputs.contains(value.as_str())
                    || graph.consumers(value).iter().any(|c| !in_block.contains(c)))
        });
        if escapes {
            stay.insert(id);
        }
    }
    // Whatever a staying node depends on inside the block stays too.
    let mut frontier: Vec<NodeId> = stay.iter().copied().collect();
    while let Some(id) = frontier.pop() {
        for value in graph.node(id).all_reads() {
            if let Some(p) = graph.producer(&value) {
                if in_block.contains(&p) && stay.insert(p) {
                    frontier.push(p);
                }
            }
        }
    }
    let producer = graph
        .producer(&span.output)
        .filter(|p| in_block.contains(p));
    let Some(producer) = producer else {
        return Err(Error::Invalid(format!(
            "{what}: its output '{}' is not made inside the block",
            span.output
        )));
    };
    if stay.contains(&producer) {
        return Err(Error::Unsupported(format!(
            "{what}: its output '{}' is needed outside the block before the block ends; this block cannot be cached",
            span.output
        )));
    }
    let order = graph.topo_order()?;
    let moved: Vec<NodeId> = order
        .into_iter()
        .filter(|id| in_block.contains(id) && !stay.contains(id))
        .collect();
    let moved_values: HashSet<String> = moved
        .iter()
        .flat_map(|&id| graph.node(id).outputs.clone())
        .collect();
    // Each companion stream and carried value must be made by a node that moves.
    for c in &span.companions {
        if !graph
            .producer(&c.output)
            .is_some_and(|p| moved.contains(&p))
        {
            return Err(Error::Unsupported(format!(
                "{what}: its second stream's output '{}' is needed outside it before it ends; it cannot be cached",
                c.output
            )));
        }
    }
    for c in carried {
        if !graph.producer(&c.value).is_some_and(|p| moved.contains(&p)) {
            return Err(Error::Invalid(format!(
                "{what}: the value '{}' to carry out of it is not made inside it",
                c.value
            )));
        }
    }
    let mut body = Graph::new(format!("fastcache_{tag}_compute"));
    let inner_output = format!("fastcache.{tag}.compute.out");
    let inner_carried = |i: usize| -> String { format!("fastcache.{tag}.compute.carried_{i}") };
    let inner_companion =
        |i: usize| -> String { format!("fastcache.{tag}.compute.stream_{}", i + 1) };
    let renamed: Vec<(String, String)> =
        std::iter::once((span.output.clone(), inner_output.clone()))
            .chain(
                span.companions
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.output.clone(), inner_companion(i))),
            )
            .chain(
                carried
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.value.clone(), inner_carried(i))),
            )
            .collect();
    for id in &moved {
        let mut node = graph.remove_node(*id).expect("block node exists");
        for value in node.outputs.iter_mut().chain(node.inputs.iter_mut()) {
            if let Some((_, inner)) = renamed.iter().find(|(outer, _)| outer == value) {
                *value = inner.clone();
            }
        }
        body.add_node(node);
    }
    // Types of values that moved go with them.
    let stream_outputs: HashSet<&str> = std::iter::once(span.output.as_str())
        .chain(span.companions.iter().map(|c| c.output.as_str()))
        .collect();
    let (inside, outside): (Vec<ValueInfo>, Vec<ValueInfo>) = std::mem::take(&mut graph.value_info)
        .into_iter()
        .partition(|v| moved_values.contains(&v.name) && !stream_outputs.contains(v.name.as_str()));
    graph.value_info = outside;
    body.value_info = inside;
    let mut output = block_type.clone();
    output.name = inner_output;
    body.outputs.push(output);
    for (i, c) in span.companions.iter().enumerate() {
        body.outputs.push(ValueInfo::tensor(
            &inner_companion(i),
            c.elem,
            c.dims.clone(),
        ));
    }
    for (i, c) in carried.iter().enumerate() {
        let mut output = graph
            .outputs
            .iter()
            .chain(&graph.value_info)
            .find(|v| v.name == c.value)
            .cloned()
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{what}: the carried value '{}' has no type",
                    c.value
                ))
            })?;
        output.name = inner_carried(i);
        body.outputs.push(output);
    }
    Ok((body, stay.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model at `opset` whose one node is `node`, reading a [2, 3, 4] input `x`.
    fn model_at(opset: i64, node: Node) -> Model {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/fixtures/negative/mlp.onnx"
        );
        let mut model = Model::load(std::path::Path::new(path)).unwrap();
        let mut graph = Graph::new("old");
        let dims = vec![Dim::Fixed(2), Dim::Fixed(3), Dim::Fixed(4)];
        graph
            .inputs
            .push(ValueInfo::tensor("x", DataType::Float as i32, dims.clone()));
        graph.add_node(node);
        graph
            .outputs
            .push(ValueInfo::tensor("y", DataType::Float as i32, dims));
        model.graph = graph;
        model
            .opsets
            .retain(|o| o.domain.as_deref().unwrap_or("").is_empty());
        model.opsets[0].version = Some(opset);
        model
    }

    #[test]
    fn raising_the_opset_refuses_nodes_it_would_reinterpret() {
        let softmax = |axis| {
            Node::new("Softmax", &["x"], &["y"])
                .with_name("attention_softmax")
                .with_attr("axis", AttrValue::Int(axis))
        };
        let unsqueeze = Node::new("Unsqueeze", &["x"], &["y"])
            .with_name("old_unsqueeze")
            .with_attr("axes", AttrValue::Ints(vec![0]));
        for (opset, node, named) in [
            (
                12,
                softmax(1),
                "node 'attention_softmax' (Softmax) was written for opset 12",
            ),
            (11, unsqueeze, "node 'old_unsqueeze' (Unsqueeze)"),
            (6, softmax(-1), "opset 6"),
        ] {
            let mut model = model_at(opset, node);
            let error = ensure_opset(&mut model, 13).unwrap_err().to_string();
            assert!(error.contains(named), "{error}");
            assert_eq!(model.opset_version(""), Some(opset), "the opset changed");
        }
        // Over the last axis (named as -1 or as rank − 1) Softmax means the same in both.
        for axis in [-1, 2] {
            let mut model = model_at(12, softmax(axis));
            ensure_opset(&mut model, 17).unwrap();
            assert_eq!(model.opset_version(""), Some(17));
        }
    }
}
