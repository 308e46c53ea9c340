//! The blocks' token axis, followed symbolically: what token selection (which runs the blocks on
//! K of N tokens) and token merging (which runs a span of them on M merged tokens) need to know
//! before they change how many tokens the blocks see.
//!
//! The blocks are analysed with their input's token dim replaced by a symbol: a `Reshape` whose
//! constant target names the token count at the token axis is fixed (that entry becomes 0, "copy
//! the input dim"); so is a `Slice` or `Split` of the token axis at constant bounds (an MMDiT's
//! joint axis split where the export hard-coded the text and image counts), whose bounds are
//! counted from whichever end does not move; a side input that meets the token axis is per
//! token (token selection gathers it); anything else that loses the token axis or combines it
//! with a constant token-sized axis is refused with the node named.

use std::collections::{HashMap, HashSet};

use crate::analysis::{Block, Shapes, Source, ValueKind};
use crate::builder::Builder;
use crate::error::{Error, Result};
use crate::ir::{Dim, Graph, Model, Node, NodeId, ValueInfo};
use crate::onnx::tensor_proto::DataType;

/// The symbol that stands for the token count while the blocks are analysed.
const TOKEN_SYMBOL: &str = "fastcache.tokens";

/// How a node whose constants named the token count is changed to follow any token count.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum TokenFix {
    /// A Reshape's new constant target (0 = copy the input dim, −1 = what is left).
    Reshape(Vec<i64>),
    /// A Slice of the token axis: the same rows, with bounds that hold for any token count.
    Slice { start: i64, end: i64 },
    /// A Split of the token axis at constant sizes: one Slice per output, with such bounds.
    Split { axis: i64, bounds: Vec<(i64, i64)> },
}

/// A node to fix, and how.
pub(crate) type Fix = (NodeId, TokenFix);

/// Consecutive blocks whose token count a pass changes, as the analysis needs them.
pub(crate) struct TokenRegion<'a> {
    /// The pass, for messages: "token selection", "token merging".
    pub pass: &'a str,
    /// The stream value the first block reads, [batch, T, D].
    pub input: &'a str,
    /// The stream value the last block writes.
    pub output: &'a str,
    /// Each block's index in the stack and its output value.
    pub blocks: Vec<(usize, &'a str)>,
    pub batch: Dim,
    /// On an MMDiT's joint axis: where the other stream's rows are.
    pub joint: Option<JointRows>,
}

/// The given block nodes in topological order; refuses a node with a subgraph, which neither
/// token pass rewrites inside.
pub(crate) fn block_nodes_in_order(
    model: &Model,
    nodes: &HashSet<NodeId>,
    pass: &str,
) -> Result<Vec<NodeId>> {
    let order: Vec<NodeId> = model
        .graph
        .topo_order()?
        .into_iter()
        .filter(|id| nodes.contains(id))
        .collect();
    if let Some(&id) = order
        .iter()
        .find(|&&id| !model.graph.node(id).subgraphs().is_empty())
    {
        return Err(Error::Unsupported(format!(
            "block node {} has a subgraph; {pass} does not rewrite inside subgraphs",
            model.graph.node(id).label()
        )));
    }
    Ok(order)
}

/// The element type of a stream value: inferred, else declared, else float32.
pub(crate) fn stream_elem(model: &Model, shapes: &Shapes, value: &str) -> i32 {
    shapes
        .elem(value)
        .or_else(|| model.graph.value_type(value).and_then(|v| v.elem_type()))
        .unwrap_or(DataType::Float as i32)
}

/// A side input of the blocks that has the token axis, gathered with the selected indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerTokenInput {
    pub name: String,
    pub axis: usize,
    /// On an MMDiT: the axis holds the text tokens too (a rotary table over text + image), so
    /// the gather keeps every text row.
    pub joint: Option<JointRows>,
}

/// Where an MMDiT per-token input's T text rows are: before the image rows (Flux) or after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JointRows {
    pub text_tokens: i64,
    pub text_first: bool,
}

/// Makes the given nodes read `to` wherever they read `from`.
pub(crate) fn rename_reads(graph: &mut Graph, ids: &[NodeId], renames: &[(String, String)]) {
    let lookup: HashMap<&str, &str> = renames
        .iter()
        .map(|(f, t)| (f.as_str(), t.as_str()))
        .collect();
    for &id in ids {
        if graph
            .node(id)
            .inputs
            .iter()
            .any(|i| lookup.contains_key(i.as_str()))
        {
            graph.update_node(id, |node| {
                for input in &mut node.inputs {
                    if let Some(to) = lookup.get(input.as_str()) {
                        *input = to.to_string();
                    }
                }
            });
        }
    }
}

/// Side inputs of the blocks that may carry the token axis (rotary tables, token masks): those
/// with exactly one axis of size N. When N equals the hidden size D, a last axis of that size is
/// taken for the feature axis (a timestep embedding [batch, D] is per sample). Whether a candidate
/// really is per token is decided by the analysis: it is gathered when it meets the token axis.
pub(crate) fn token_axis_candidates(
    blocks: &[Block],
    shapes: &Shapes,
    n: i64,
    d: i64,
    joint: Option<JointRows>,
) -> Vec<PerTokenInput> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for block in blocks {
        for side in &block.side_inputs {
            if side.kind != ValueKind::Data
                || matches!(side.source, Source::Block(_))
                || !seen.insert(side.name.clone())
            {
                continue;
            }
            let Some(dims) = shapes.dims(&side.name) else {
                continue;
            };
            let axes: Vec<usize> = dims
                .iter()
                .enumerate()
                .filter(|(i, dim)| **dim == Dim::Fixed(n) && !(n == d && i + 1 == dims.len()))
                .map(|(i, _)| i)
                .collect();
            if let [axis] = axes[..] {
                found.push(PerTokenInput {
                    name: side.name.clone(),
                    axis,
                    joint: None,
                });
                continue;
            }
            // An axis of N + T on an MMDiT: per joint token (Flux's rotary table).
            if let Some(rows) = joint {
                let joint_axes: Vec<usize> = dims
                    .iter()
                    .enumerate()
                    .filter(|(_, dim)| **dim == Dim::Fixed(n + rows.text_tokens))
                    .map(|(i, _)| i)
                    .collect();
                if let [axis] = joint_axes[..] {
                    found.push(PerTokenInput {
                        name: side.name.clone(),
                        axis,
                        joint: Some(rows),
                    });
                }
            }
        }
    }
    found
}

/// The values outside the blocks that `value` is computed from within the blocks.
fn block_sources(graph: &Graph, in_blocks: &HashSet<NodeId>, value: &str) -> HashSet<String> {
    let mut todo = vec![value.to_string()];
    let mut seen: HashSet<String> = todo.iter().cloned().collect();
    let mut sources = HashSet::new();
    while let Some(v) = todo.pop() {
        match graph.producer(&v).filter(|p| in_blocks.contains(p)) {
            Some(p) => {
                for input in &graph.node(p).inputs {
                    if !input.is_empty() && seen.insert(input.clone()) {
                        todo.push(input.clone());
                    }
                }
            }
            None => {
                sources.insert(v);
            }
        }
    }
    sources
}

/// The token count, or (MMDiT's joint attention) the token count plus a fixed number of other
/// tokens: both carry the tokens a pass selects.
fn is_token(dim: &Dim) -> bool {
    token_offset(dim).is_some()
}

/// c where `dim` is the token symbol plus c (0 for the token symbol itself).
fn token_offset(dim: &Dim) -> Option<i64> {
    let Dim::Named(s) = dim else { return None };
    match s.strip_prefix(TOKEN_SYMBOL)? {
        "" => Some(0),
        rest => rest.strip_prefix('+')?.parse().ok(),
    }
}

/// Ops whose inputs broadcast against each other, numpy style.
const BROADCASTING: [&str; 18] = [
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Mod",
    "Sum",
    "Mean",
    "Where",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
];

/// What the analysis says about one block node.
enum Finding {
    Fine,
    /// A node whose constants name N at the token axis, and how it is fixed.
    Fix(TokenFix),
    Refuse(String),
    /// The token axis meets an axis of N from this input of the node.
    Conflict(String, String),
}

/// Analyses the blocks with the stack input's token dim (and gathered inputs' token axes) a
/// symbol: fixes the nodes that can be fixed, decides which candidates are per token (those that
/// meet the token axis), refuses the rest. Returns the per-token inputs and the fixes.
pub(crate) fn analyse_blocks(
    model: &Model,
    region: &TokenRegion,
    block_order: &[NodeId],
    candidates: &[PerTokenInput],
    shapes: &Shapes,
    n: i64,
    d: i64,
) -> Result<(Vec<PerTokenInput>, Vec<Fix>)> {
    let in_blocks: HashSet<NodeId> = block_order.iter().copied().collect();
    let mut gathered: Vec<PerTokenInput> = Vec::new();
    let mut fixes: Vec<Fix> = Vec::new();
    let refuse = |message: String| {
        Err(Error::Unsupported(format!(
            "{} cannot run these blocks on fewer tokens: {message}",
            region.pass
        )))
    };
    'probe: loop {
        let (mut probe, mut order) =
            probe_model(model, region, block_order, &gathered, &fixes, shapes, d);
        loop {
            let probe_shapes = Shapes::infer(&probe);
            let mut found = Vec::new();
            let mut problem = None;
            for &id in &order {
                match examine(probe.graph.node(id), &probe_shapes, n, region.joint) {
                    Finding::Fine => {}
                    Finding::Fix(target) => found.push((id, target)),
                    other => {
                        problem = Some(other);
                        break;
                    }
                }
            }
            // A problem after a fixable node may only be the lost token axis showing
            // downstream: fix first, then look again.
            if !found.is_empty() {
                for (id, fix) in found {
                    if fixes.iter().any(|(fixed, _)| *fixed == id) {
                        return Err(Error::Invalid(format!(
                            "{}: fixing {} did not restore the token axis",
                            region.pass,
                            probe.graph.node(id).label()
                        )));
                    }
                    let added = apply_fix(&mut probe.graph, id, &fix, "fastcache.probe.");
                    insert_after(&mut order, id, &added);
                    fixes.push((id, fix));
                }
                continue;
            }
            match problem {
                None => {
                    check_boundaries(&probe, region, &order, &probe_shapes)?;
                    return Ok((gathered, fixes));
                }
                Some(Finding::Conflict(message, operand)) => {
                    // An input that meets the token axis is per token: gather it and look again.
                    let sources = block_sources(&probe.graph, &in_blocks, &operand);
                    let new: Vec<PerTokenInput> = candidates
                        .iter()
                        .filter(|c| sources.contains(&c.name) && !gathered.contains(c))
                        .cloned()
                        .collect();
                    if new.is_empty() {
                        return refuse(message);
                    }
                    gathered.extend(new);
                    continue 'probe;
                }
                Some(Finding::Refuse(message)) => return refuse(message),
                Some(Finding::Fine | Finding::Fix(_)) => unreachable!(),
            }
        }
    }
}

/// A copy of the model whose blocks read a stack input [batch, T, D] with T a symbol (and the
/// gathered inputs with T at their token axis), with the fixes so far applied; and its block
/// nodes in order, those the fixes added included.
fn probe_model(
    model: &Model,
    region: &TokenRegion,
    block_order: &[NodeId],
    gathered: &[PerTokenInput],
    fixes: &[Fix],
    shapes: &Shapes,
    d: i64,
) -> (Model, Vec<NodeId>) {
    let token = Dim::Named(TOKEN_SYMBOL.into());
    let mut probe = model.clone();
    probe.graph.value_info.clear(); // declared types name N, which would override the symbol
    let elem = |name: &str| shapes.elem(name).unwrap_or(DataType::Float as i32);
    let probe_x = "fastcache.probe.x";
    probe.graph.inputs.push(ValueInfo::tensor(
        probe_x,
        elem(region.input),
        vec![region.batch.clone(), token.clone(), Dim::Fixed(d)],
    ));
    let mut renames = vec![(region.input.to_string(), probe_x.to_string())];
    for (i, p) in gathered.iter().enumerate() {
        let mut dims = shapes.dims(&p.name).unwrap_or_default().to_vec();
        dims[p.axis] = match p.joint {
            None => token.clone(),
            Some(rows) => Dim::Named(format!("{TOKEN_SYMBOL}+{}", rows.text_tokens)),
        };
        let name = format!("fastcache.probe.side{i}");
        probe
            .graph
            .inputs
            .push(ValueInfo::tensor(&name, elem(&p.name), dims));
        renames.push((p.name.clone(), name));
    }
    rename_reads(&mut probe.graph, block_order, &renames);
    let mut order = block_order.to_vec();
    for (id, fix) in fixes {
        let added = apply_fix(&mut probe.graph, *id, fix, "fastcache.probe.");
        insert_after(&mut order, *id, &added);
    }
    (probe, order)
}

/// Puts `added` right after `id` in `order` (a fix's new nodes run where the node it split did).
pub(crate) fn insert_after(order: &mut Vec<NodeId>, id: NodeId, added: &[NodeId]) {
    let at = order
        .iter()
        .position(|&o| o == id)
        .map_or(order.len(), |i| i + 1);
    order.splice(at..at, added.iter().copied());
}

/// After the analysis: every block output keeps the token axis at 1, and nothing the blocks
/// compute from the tokens is read after the stack (it would have K tokens there, not N).
fn check_boundaries(
    probe: &Model,
    region: &TokenRegion,
    block_order: &[NodeId],
    shapes: &Shapes,
) -> Result<()> {
    for &(index, output) in &region.blocks {
        let dims = shapes.dims(output).unwrap_or_default();
        if dims.len() != 3 || !is_token(&dims[1]) {
            return Err(Error::Unsupported(format!(
                "{} cannot follow the token axis to block {index}'s output '{output}' (found {dims:?})",
                region.pass
            )));
        }
    }
    let in_blocks: HashSet<NodeId> = block_order.iter().copied().collect();
    let outputs: HashSet<&str> = probe
        .graph
        .outputs
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    for &id in block_order {
        for value in &probe.graph.node(id).outputs {
            if value.is_empty() || value == region.output {
                continue;
            }
            let outside = outputs.contains(value.as_str())
                || probe
                    .graph
                    .consumers(value)
                    .iter()
                    .any(|c| !in_blocks.contains(c));
            let per_token = shapes
                .get(value)
                .is_some_and(|s| s.dims.iter().chain(&s.content).flatten().any(is_token));
            if outside && per_token {
                return Err(Error::Unsupported(format!(
                    "'{value}' is computed in the blocks from the tokens and read after them; with {} it would hold fewer tokens",
                    region.pass
                )));
            }
        }
    }
    Ok(())
}

fn examine(node: &Node, shapes: &Shapes, n: i64, joint: Option<JointRows>) -> Finding {
    let dims_of = |i: usize| {
        node.inputs
            .get(i)
            .filter(|v| !v.is_empty())
            .and_then(|v| shapes.dims(v))
    };
    let inputs: Vec<Option<&[Dim]>> = (0..node.inputs.len()).map(dims_of).collect();
    if !inputs.iter().flatten().any(|d| d.iter().any(is_token)) {
        return Finding::Fine;
    }
    let fixed_n = Dim::Fixed(n);
    let conflict = |other: usize, size: i64| {
        let joint = if size > n {
            format!(
                " (the image tokens with {} text tokens, as in an MMDiT's rotary table, which this pass does not gather)",
                size - n
            )
        } else {
            String::new()
        };
        Finding::Conflict(
            format!(
                "{} combines the token axis with an axis of {size} from '{}': a hard-coded token count, or a per-token tensor the rewrite did not recognise{joint}",
                node.label(),
                node.inputs[other]
            ),
            node.inputs[other].clone(),
        )
    };
    if BROADCASTING.contains(&node.op_type.as_str()) {
        let rank = inputs.iter().flatten().map(|d| d.len()).max().unwrap_or(0);
        for position in 0..rank {
            let aligned: Vec<(usize, &Dim)> = inputs
                .iter()
                .enumerate()
                .filter_map(|(i, d)| {
                    let d = (*d)?;
                    (position + d.len() >= rank).then(|| (i, &d[position + d.len() - rank]))
                })
                .collect();
            // The token count the axis had before the pass, N (+ the other stream's tokens on
            // a joint axis).
            let before = aligned
                .iter()
                .find_map(|(_, d)| token_offset(d))
                .map(|offset| n + offset);
            if let Some(size) = before
                && let Some((other, _)) = aligned
                    .iter()
                    .find(|(_, d)| **d == Dim::Fixed(size) && size != 1)
            {
                return conflict(*other, size);
            }
        }
    }
    if node.op_type == "MatMul"
        && let (Some(Some(a)), Some(Some(b))) = (inputs.first(), inputs.get(1))
        && a.len() >= 2
        && b.len() >= 2
    {
        let (ka, kb) = (&a[a.len() - 1], &b[b.len() - 2]);
        if is_token(ka) && *kb == fixed_n {
            return conflict(1, n);
        }
        if is_token(kb) && *ka == fixed_n {
            return conflict(0, n);
        }
    }
    for output in node.outputs.iter().filter(|o| !o.is_empty()) {
        let Some(shape) = shapes.get(output) else {
            return Finding::Refuse(format!(
                "cannot follow the token axis through {}",
                node.label()
            ));
        };
        let float = matches!(shape.elem, Some(1 | 10 | 11 | 16));
        if !float {
            continue;
        }
        match &shape.dims {
            None => {
                return Finding::Refuse(format!(
                    "cannot follow the token axis through {} (op {}): its output shape is unknown",
                    node.label(),
                    node.op_type
                ));
            }
            Some(dims) if other_stream_part(node, &inputs, dims) => {}
            Some(dims) if !dims.iter().any(is_token) => {
                if node.op_type == "Reshape"
                    && let Some(target) = reshape_fix(node, shapes, n)
                {
                    return Finding::Fix(TokenFix::Reshape(target));
                }
                if let Some(fix) = slice_fix(node, shapes, n, joint) {
                    return Finding::Fix(fix);
                }
                let from: Vec<String> = inputs
                    .iter()
                    .map(|d| d.map_or("?".into(), |d| format!("{d:?}")))
                    .collect();
                return Finding::Refuse(format!(
                    "{} (op {}) turns inputs {} into {dims:?}, losing the token axis{}",
                    node.label(),
                    node.op_type,
                    from.join(", "),
                    if node.op_type == "Reshape" {
                        "; its target shape is not a constant naming N at the token axis, which is all that can be fixed"
                    } else {
                        ""
                    }
                ));
            }
            Some(_) => {}
        }
    }
    Finding::Fine
}

/// A Slice or Split of MMDiT's joint axis (the tokens plus c tokens of the other stream) that
/// takes exactly those c tokens: the other stream's part, which has no selected tokens.
fn other_stream_part(node: &Node, inputs: &[Option<&[Dim]>], output: &[Dim]) -> bool {
    let Some(Some(input)) = inputs.first() else {
        return false;
    };
    if !matches!(node.op_type.as_str(), "Slice" | "Split") || input.len() != output.len() {
        return false;
    }
    input
        .iter()
        .zip(output)
        .any(|(i, o)| matches!(token_offset(i), Some(c) if c > 0 && *o == Dim::Fixed(c)))
        && input.iter().zip(output).all(|(i, o)| i == o || is_token(i))
}

/// Applies a fix to the node; returns the nodes it added (a Split becomes one Slice per output:
/// the node itself makes the first, new nodes the others).
pub(crate) fn apply_fix(
    graph: &mut Graph,
    id: NodeId,
    fix: &TokenFix,
    prefix: &str,
) -> Vec<NodeId> {
    match fix {
        TokenFix::Reshape(target) => {
            set_reshape_target(graph, id, target, prefix);
            Vec::new()
        }
        TokenFix::Slice { start, end } => {
            let mut b = Builder::new(graph, prefix);
            let (start, end) = (
                b.init_i64("slice_start", &[1], &[*start]),
                b.init_i64("slice_end", &[1], &[*end]),
            );
            graph.update_node(id, |node| {
                node.inputs[1] = start;
                node.inputs[2] = end;
            });
            Vec::new()
        }
        TokenFix::Split { axis, bounds } => {
            let split = graph.node(id).clone();
            let mut b = Builder::new(graph, prefix);
            let axes = b.init_i64("split_axis", &[1], &[*axis]);
            let parts: Vec<(String, String, String)> = split
                .outputs
                .iter()
                .zip(bounds)
                .filter(|(output, _)| !output.is_empty())
                .map(|(output, (start, end))| {
                    (
                        output.clone(),
                        b.init_i64("slice_start", &[1], &[*start]),
                        b.init_i64("slice_end", &[1], &[*end]),
                    )
                })
                .collect();
            let data = split.inputs[0].clone();
            let slice = |(output, start, end): &(String, String, String)| {
                Node::new("Slice", &[&data, start, end, &axes], &[output])
            };
            let Some((first, rest)) = parts.split_first() else {
                return Vec::new();
            };
            let in_place = slice(first);
            graph.update_node(id, |node| {
                node.op_type = in_place.op_type.clone();
                node.inputs = in_place.inputs.clone();
                node.outputs = in_place.outputs.clone();
                node.attributes.clear();
            });
            rest.iter()
                .map(|part| {
                    graph.add_node(slice(part).with_name(format!("{}.{}", split.name, part.0)))
                })
                .collect()
        }
    }
}

/// For a Slice or Split that loses the token axis: bounds for the same rows that hold for any
/// token count, when its constant bounds allow them (see [`portable_bound`]).
fn slice_fix(node: &Node, shapes: &Shapes, n: i64, joint: Option<JointRows>) -> Option<TokenFix> {
    let input = shapes.dims(node.inputs.first()?)?;
    let constant = |i: usize| -> Option<Vec<i64>> {
        let value = node.inputs.get(i).filter(|v| !v.is_empty())?;
        shapes
            .get(value)?
            .content
            .as_ref()?
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => Some(*v),
                _ => None,
            })
            .collect()
    };
    let token_axis = |axis: i64| -> Option<(usize, i64)> {
        let a = usize::try_from(if axis < 0 {
            axis + input.len() as i64
        } else {
            axis
        })
        .ok()?;
        Some((a, token_offset(input.get(a)?)?))
    };
    match node.op_type.as_str() {
        "Slice" => {
            let [start] = constant(1)?[..] else {
                return None;
            };
            let [end] = constant(2)?[..] else { return None };
            let axis = match node.inputs.get(3).filter(|v| !v.is_empty()) {
                Some(_) => match constant(3)?[..] {
                    [a] => a,
                    _ => return None,
                },
                None => 0,
            };
            if node.inputs.get(4).is_some_and(|v| !v.is_empty()) && constant(4)? != [1] {
                return None;
            }
            let (_, offset) = token_axis(axis)?;
            let length = n + offset;
            let clamp = |b: i64| {
                if b < 0 {
                    (b + length).max(0)
                } else {
                    b.min(length)
                }
            };
            Some(TokenFix::Slice {
                start: portable_bound(clamp(start), n, offset, joint)?,
                end: portable_bound(clamp(end), n, offset, joint)?,
            })
        }
        "Split" => {
            let axis = node.attr_int("axis").unwrap_or(0);
            let sizes = match node.inputs.get(1).filter(|v| !v.is_empty()) {
                Some(_) => constant(1)?,
                None => node.attr_ints("split")?.to_vec(),
            };
            let (a, offset) = token_axis(axis)?;
            if sizes.len() != node.outputs.len() || sizes.iter().sum::<i64>() != n + offset {
                return None;
            }
            let mut bounds = Vec::with_capacity(sizes.len());
            let mut at = 0;
            for size in sizes {
                bounds.push((
                    portable_bound(at, n, offset, joint)?,
                    portable_bound(at + size, n, offset, joint)?,
                ));
                at += size;
            }
            Some(TokenFix::Split {
                axis: a as i64,
                bounds,
            })
        }
        _ => None,
    }
}

/// A row bound `b` on an axis of N tokens plus `offset` rows of the other stream, rewritten to
/// hold for any token count: 0 and the end stay the front and the end (i64::MAX); a bound inside
/// the other stream's rows is counted from the front when they come first (Flux's text) or from
/// the back when they come last (SD3's); a bound among the tokens has no such form.
fn portable_bound(b: i64, n: i64, offset: i64, joint: Option<JointRows>) -> Option<i64> {
    let length = n + offset;
    if b == 0 {
        return Some(0);
    }
    if b == length {
        return Some(i64::MAX);
    }
    let joint = joint.filter(|j| j.text_tokens == offset && offset > 0)?;
    if joint.text_first {
        (b <= offset).then_some(b)
    } else {
        (b >= n).then_some(b - length)
    }
}

/// Makes a Reshape read a new constant target, with 0 meaning "copy the input dim".
fn set_reshape_target(graph: &mut Graph, id: NodeId, target: &[i64], prefix: &str) {
    let mut b = Builder::new(graph, prefix);
    let shape = b.init_i64("reshape_shape", &[target.len() as i64], target);
    graph.update_node(id, |node| {
        node.inputs[1] = shape;
        node.attributes.retain(|a| a.name != "allowzero");
    });
}

/// For a Reshape that loses the token axis, a target that keeps it, if its constant target names
/// N once in a place that can only be the token axis: [`reshape_fix_in_place`] where N stays at
/// the token axis's index, else [`reshape_fix_moved`] where the reshape merges or splits the
/// axes around it (batch × heads folded into one, as fixed-batch exports do).
fn reshape_fix(node: &Node, shapes: &Shapes, n: i64) -> Option<Vec<i64>> {
    let input = shapes.dims(&node.inputs[0])?;
    let target = shapes.get(node.inputs.get(1)?)?.content.as_ref()?;
    // With allowzero = 1 a 0 is a literal zero-size dim; a target without zeros means the same
    // under allowzero = 0, which the fix sets (see `set_reshape_target`).
    if node.attr_int("allowzero") == Some(1) && target.contains(&Dim::Fixed(0)) {
        return None;
    }
    if input.iter().filter(|d| is_token(d)).count() != 1 {
        return None;
    }
    reshape_fix_in_place(input, target, n).or_else(|| reshape_fix_moved(input, target, n))
}

/// The target names N at the token axis of its input and keeps the axes before and after it: the
/// same target with 0 ("copy the input dim") there and at every leading axis that copies a
/// symbolic input dim.
fn reshape_fix_in_place(input: &[Dim], target: &[Dim], n: i64) -> Option<Vec<i64>> {
    let a = input.iter().position(is_token)?;
    let n = n + token_offset(&input[a])?;
    if target.get(a) != Some(&Dim::Fixed(n)) {
        return None;
    }
    let holes = target.iter().filter(|t| **t == Dim::Fixed(-1)).count();
    if holes > 1 {
        return None;
    }
    // The axes before the token axis stay as they are: each copies the input's dim (0), equals
    // it, or is the one hole (-1) that absorbs them.
    let mut fixed = Vec::with_capacity(target.len());
    for (i, t) in target[..a].iter().enumerate() {
        fixed.push(match t {
            Dim::Fixed(v) if *v == -1 || *v == 0 => *v,
            Dim::Fixed(v) if input.get(i) == Some(&Dim::Fixed(*v)) => *v,
            t if input.get(i) == Some(t) => 0,
            _ => return None,
        });
    }
    fixed.push(0);
    let hole_before = fixed.contains(&-1);
    let rest = &target[a + 1..];
    if rest.contains(&Dim::Fixed(-1)) {
        if hole_before {
            return None;
        }
    } else {
        // Without a hole after the token axis, the axes after it must hold exactly the input's.
        let product = |dims: &[Dim]| {
            dims.iter().try_fold(1i64, |p, d| match d {
                Dim::Fixed(v) if *v > 0 => Some(p * v),
                _ => None,
            })
        };
        if product(rest)? != product(&input[a + 1..])? {
            return None;
        }
    }
    for t in rest {
        match t {
            Dim::Fixed(v) if *v != 0 => fixed.push(*v),
            _ => return None,
        }
    }
    Some(fixed)
}

/// The target moves the token axis: every other input dim is a constant, and exactly one entry
/// j of the (resolved) target is N with the axes before it holding exactly the input's axes
/// before the token axis, and those after it the input's after. The fix writes the resolved
/// target with −1 at j, which then absorbs whatever token count the blocks run on.
fn reshape_fix_moved(input: &[Dim], target: &[Dim], n: i64) -> Option<Vec<i64>> {
    let a = input.iter().position(is_token)?;
    let n = n + token_offset(&input[a])?;
    let constant = |dims: &[Dim]| -> Option<Vec<i64>> {
        dims.iter()
            .map(|d| match d {
                Dim::Fixed(v) if *v > 0 => Some(*v),
                _ => None,
            })
            .collect()
    };
    let (before, after) = (constant(&input[..a])?, constant(&input[a + 1..])?);
    let product = |dims: &[i64]| dims.iter().try_fold(1i64, |p, d| p.checked_mul(*d));
    let elements = product(&before)?
        .checked_mul(n)?
        .checked_mul(product(&after)?)?;
    // 0 copies the input dim at the same index (allowzero = 0); −1 takes what is left.
    let mut resolved = Vec::with_capacity(target.len());
    for (i, t) in target.iter().enumerate() {
        resolved.push(match t {
            Dim::Fixed(0) => match input.get(i)? {
                Dim::Fixed(v) => *v,
                _ => return None,
            },
            Dim::Fixed(v) if *v > 0 || *v == -1 => *v,
            _ => return None,
        });
    }
    if let Some(hole) = resolved.iter().position(|&v| v == -1) {
        let known = resolved
            .iter()
            .filter(|&&v| v != -1)
            .try_fold(1i64, |p, d| p.checked_mul(*d))?;
        if known == 0 || elements % known != 0 || resolved.iter().filter(|&&v| v == -1).count() > 1
        {
            return None;
        }
        resolved[hole] = elements / known;
    }
    let places: Vec<usize> = (0..resolved.len())
        .filter(|&j| {
            resolved[j] == n
                && product(&resolved[..j]) == product(&before)
                && product(&resolved[j + 1..]) == product(&after)
        })
        .collect();
    let [j] = places.as_slice() else {
        return None;
    };
    resolved[*j] = -1;
    Some(resolved)
}

#[cfg(test)]
mod tests {
    use super::{JointRows, portable_bound};

    const TEXT_FIRST: Option<JointRows> = Some(JointRows {
        text_tokens: 6,
        text_first: true,
    });
    const IMAGE_FIRST: Option<JointRows> = Some(JointRows {
        text_tokens: 6,
        text_first: false,
    });

    /// 16 image tokens and 6 text tokens: the split point and the ends are rewritten to hold for
    /// any image token count; a bound among the image tokens is not.
    #[test]
    fn joint_axis_bounds_count_from_the_end_that_does_not_move() {
        // Flux: text rows [0, 6), image rows [6, 22).
        assert_eq!(portable_bound(0, 16, 6, TEXT_FIRST), Some(0));
        assert_eq!(portable_bound(6, 16, 6, TEXT_FIRST), Some(6));
        assert_eq!(portable_bound(22, 16, 6, TEXT_FIRST), Some(i64::MAX));
        assert_eq!(portable_bound(14, 16, 6, TEXT_FIRST), None);
        // SD3: image rows [0, 16), text rows [16, 22).
        assert_eq!(portable_bound(16, 16, 6, IMAGE_FIRST), Some(-6));
        assert_eq!(portable_bound(19, 16, 6, IMAGE_FIRST), Some(-3));
        assert_eq!(portable_bound(8, 16, 6, IMAGE_FIRST), None);
        // The layout told wrong or not at all: only the ends are portable.
        assert_eq!(portable_bound(6, 16, 6, IMAGE_FIRST), None);
        assert_eq!(portable_bound(16, 16, 6, None), None);
        assert_eq!(portable_bound(22, 16, 6, None), Some(i64::MAX));
        // A plain token axis: a slice that keeps every token, nothing else.
        assert_eq!(portable_bound(16, 16, 0, None), Some(i64::MAX));
        assert_eq!(portable_bound(4, 16, 0, TEXT_FIRST), None);
    }
}
