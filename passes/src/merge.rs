//! Token merging by k-NN density (design/method.md §3): a span of blocks runs on M = ⌈r·T⌉
//! merged tokens instead of T, and every token gets its cluster's result back afterwards.
//!
//! ```text
//! H      = the span input, [B, T, D] (float32 below)
//! U      = H / ‖H‖                                    unit rows; cosine similarity is scale-free
//! S      = U·Uᵀ                                       [B, T, T], within each sample only
//! ρ_i    = mean of the K largest S_ij, j ≠ i          density
//! w_i    = max((1 + ρ_i)/2 · (1 + λ·s_i/max s), 1e-6) importance (s: token selection's saliency)
//! δ_i    = 1 − max S_ij over j ranked above i         separation (j ranked above: denser, or as
//!                                                      dense and earlier); 2 for the top token
//! C      = the M largest w_i·δ_i, ascending           centres, [B, M]
//! a_i    = argmax_m (S_{i,C_m}, +3 where i = C_m)     cluster of each token (a centre keeps its own)
//! A      = one-hot(a)                                 [B, T, M]
//! merged = (A⊙w / Σ_i A⊙w)ᵀ · H                       importance-weighted mean per cluster, [B, M, D]
//! Y      = the span on `merged`                       [B, M, D]; its self-attention logits get
//!                                                      + log(cluster size) on each merged key
//! copy:     out = A · Y                               each token gets its centre's result
//! residual: out = H + A · (Y − merged)                each token keeps its own input and gets its
//!                                                      cluster's update
//! ```
//!
//! Everything is MatMul against the one-hot assignment, TopK, ArgMax and elementwise ops: no
//! scatter with a reduction (ONNX has no scatter-mean; TensorRT no scatter reduction), no loop,
//! static shapes for a fixed keep ratio. The merge keeps no state: it runs at every step (with
//! token selection, at every step after the first, which runs the original blocks on all tokens).
//!
//! Centres are the tokens of highest density *times separation*, not of density alone (the
//! paper's rule): the densest tokens of an image are usually the members of one large flat
//! region, so density alone spends every centre there and merges the distinct tokens (edges,
//! objects) into it. Separation (as in density-peak clustering) keeps one centre per dense
//! region. With r = 1 every token is its own centre, A is the identity, and the span computes
//! exactly what it did (bit for bit with `copy`).

use std::collections::{HashMap, HashSet};

use serde_json::json;

use crate::analysis::cost::flops_of;
use crate::analysis::{DitStack, Shapes};
use crate::builder::{Builder, f32_as, from_f32, to_f32, top_k};
use crate::cache::{BlockSpan, ensure_opset};
use crate::contract::extend_contract;
use crate::error::{Error, Result};
use crate::ir::{AttrValue, Dim, Graph, Model, NodeId, ValueInfo};
use crate::onnx::tensor_proto::DataType;
use crate::token_axis::{
    TokenRegion, analyse_blocks, apply_fix, block_nodes_in_order, stream_elem,
};

/// Stats: how many tokens the merged span ran on this step, [1] int64: M (with token selection,
/// N on the first step, which runs the original blocks).
pub const MERGED_TOKENS_OUTPUT: &str = "fastcache.merge.tokens";
/// The merged stream the span runs on, [batch, M, D] (internal; tests expose it).
pub const MERGED: &str = "fastcache.merge.stream";
/// The centres' token indices, ascending, [batch, M] int64 (internal).
pub const CENTRES: &str = "fastcache.merge.centres";
/// Each token's cluster (an index into the centres), [batch, T] int64 (internal).
pub const ASSIGNMENT: &str = "fastcache.merge.assignment";
/// Each token's density ρ, [batch, T] float32 (internal).
pub const DENSITY: &str = "fastcache.merge.density";
/// Each token's importance w, [batch, T] float32 (internal).
pub const IMPORTANCE: &str = "fastcache.merge.importance";
/// The span's output back in token order, [batch, T, D] (internal).
pub const UNMERGED: &str = "fastcache.merge.unmerged";

const PREFIX: &str = "fastcache.merge.";

/// How the span's result goes back to the tokens of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmerge {
    /// Every member gets its centre's output.
    Copy,
    /// Every member keeps its own input and gets its cluster's update (output − merged input).
    Residual,
}

#[derive(Clone, Debug)]
pub struct MergeConfig {
    /// r in (0, 1]: the share of tokens kept as centres.
    pub keep_ratio: f64,
    /// K: the neighbours a token's density is measured over.
    pub neighbours: i64,
    /// The first and last block of the merged span; the middle of the stack when None.
    pub span: Option<(usize, usize)>,
    /// λ: how much token selection's saliency raises a token's importance (only with selection).
    pub lambda: f64,
    pub unmerge: Unmerge,
    /// Add log(cluster size) to the attention logits of every merged key, so that softmax weighs
    /// a merged token as the tokens it stands for.
    pub proportional_attention: bool,
}

impl MergeConfig {
    pub fn new(keep_ratio: f64) -> MergeConfig {
        MergeConfig {
            keep_ratio,
            neighbours: 5,
            span: None,
            lambda: 1.0,
            unmerge: Unmerge::Residual,
            proportional_attention: true,
        }
    }

    /// The span for a stack of `blocks`, after checking every option: before any pass changes
    /// the model, so that a refused merge leaves it as it was.
    pub fn check(&self, blocks: usize) -> Result<(usize, usize)> {
        merged_count(self.keep_ratio, 1)?;
        if self.neighbours < 1 {
            return Err(Error::Request(format!(
                "--merge-neighbours must be 1 or more, got {}",
                self.neighbours
            )));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::Request(format!(
                "--merge-lambda must be a finite number of 0 or more, got {}",
                self.lambda
            )));
        }
        let (first, last) = self.span.unwrap_or_else(|| default_span(blocks));
        if first > last || last >= blocks {
            return Err(Error::Request(format!(
                "--merge-blocks {first}-{last} is not a span of this model's blocks (0 to {})",
                blocks.saturating_sub(1)
            )));
        }
        Ok((first, last))
    }
}

/// The default span: the middle half of the stack (blocks ⌊L/4⌋ to L − 1 − ⌊L/4⌋), where
/// the tokens of a DiT are most alike; the first and last blocks, which read and write the
/// image's detail, keep every token.
pub fn default_span(blocks: usize) -> (usize, usize) {
    let quarter = blocks / 4;
    (quarter, blocks.saturating_sub(1 + quarter))
}

/// M = ⌈r·T⌉ (at least 1), after checking r.
pub fn merged_count(keep_ratio: f64, tokens: i64) -> Result<i64> {
    if !(keep_ratio > 0.0 && keep_ratio <= 1.0) {
        return Err(Error::Request(format!(
            "--merge-ratio must lie in (0, 1], got {keep_ratio}"
        )));
    }
    // The slack keeps ratios like 0.3 × 10 = 3.0000000000000004 at 3.
    let m = (keep_ratio * tokens as f64 - 1e-9).ceil().max(1.0) as i64;
    Ok(m.min(tokens))
}

/// What the rewrite did.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    /// T: the tokens the span's input has.
    pub tokens: i64,
    /// M: the tokens the span runs on.
    pub merged: i64,
    /// The K actually used: at most T − 1.
    pub neighbours: i64,
    /// First and last block of the span.
    pub span: (usize, usize),
    /// Nodes whose constants named T at the token axis (Reshape targets, Slice and Split
    /// bounds), now made to follow the token count.
    pub fixed_nodes: Vec<String>,
    /// The span's self-attention softmaxes that weigh merged keys by their cluster's size.
    pub proportional_softmaxes: Vec<String>,
    /// The blocks as they now are: the span's blocks run on [batch, M, D].
    pub spans: Vec<BlockSpan>,
    pub flops: MergeFlops,
    pub stats: Vec<String>,
    pub policy: serde_json::Value,
}

/// The cost model's FLOPs per sample and call (see `analysis::cost`), for the bench's FLOP
/// speedup: the span's blocks before and after merging, and what the merge and unmerge add.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MergeFlops {
    pub blocks_before: Vec<u64>,
    pub blocks_after: Vec<u64>,
    pub overhead: u64,
}

impl MergeFlops {
    /// Reads them back from a rewritten model's policy (`policy.merge.flops_per_sample`).
    pub fn from_policy(policy: &serde_json::Value) -> Option<MergeFlops> {
        serde_json::from_value(policy.get("merge")?.get("flops_per_sample")?.clone()).ok()
    }
}

/// FLOPs per sample of each group of nodes, with the batch symbol at 1.
fn flops_per_sample(model: &Model, batch: &Dim, groups: &[Vec<NodeId>]) -> Vec<u64> {
    let shapes = Shapes::infer(model);
    let mut bindings = HashMap::new();
    if let Dim::Named(name) = batch {
        bindings.insert(name.clone(), 1);
    }
    groups
        .iter()
        .map(|nodes| {
            flops_of(
                nodes.iter().map(|&id| model.graph.node(id)),
                &shapes,
                &bindings,
            )
            .counted
        })
        .collect()
}

/// The values of an inserted merge that the unmerge needs.
pub struct MergeValues {
    /// The span input in float32, [B, T, D].
    pub input32: String,
    /// The merged stream in float32, [B, M, D].
    pub merged32: String,
    /// The one-hot assignment, [B, T, M] float32.
    pub assignment: String,
}

/// Inserts the merge of `input` ([batch, T, D], element type `elem`) into M tokens, written to
/// [`MERGED`]. `saliency` is a [T] float32 value that raises importance by λ (token selection's,
/// in the order of the input's tokens).
pub fn insert_merge(
    graph: &mut Graph,
    input: &str,
    elem: i32,
    (t, m, neighbours): (i64, i64, i64),
    lambda: f64,
    saliency: Option<&str>,
) -> MergeValues {
    let mut b = Builder::new(graph, PREFIX);
    let h32 = to_f32(&mut b, input, elem);
    let axis_1 = b.init_i64("axis_1", &[1], &[1]);
    let axis_2 = b.init_i64("axis_2", &[1], &[2]);
    let keep = || vec![("keepdims", AttrValue::Int(1))];
    let drop = || vec![("keepdims", AttrValue::Int(0))];
    let float = |v: f32, b: &mut Builder, hint: &str| b.init_f32(hint, &[], &[v]);

    // Cosine similarity within each sample.
    let squares = b.op("Mul", &[&h32, &h32], vec![]);
    let sum_squares = b.op("ReduceSum", &[&squares, &axis_2], keep());
    let tiny = float(1e-12, &mut b, "tiny");
    let sum_squares = b.op("Max", &[&sum_squares, &tiny], vec![]);
    let norm = b.op("Sqrt", &[&sum_squares], vec![]);
    let unit = b.op("Div", &[&h32, &norm], vec![]);
    let unit_t = b.op(
        "Transpose",
        &[&unit],
        vec![("perm", AttrValue::Ints(vec![0, 2, 1]))],
    );
    let similarity = b.op("MatMul", &[&unit, &unit_t], vec![]);

    // Density: the mean similarity to the K nearest other tokens.
    let positions: Vec<i64> = (0..t).collect();
    let columns = b.init_i64("positions", &[t], &positions);
    let rows = b.init_i64("positions_column", &[t, 1], &positions);
    let itself = b.op("Equal", &[&rows, &columns], vec![]);
    let below_any = float(-2.0, &mut b, "below_any_cosine");
    let others = b.op("Where", &[&itself, &below_any, &similarity], vec![]);
    let k = b.init_i64("neighbours", &[1], &[neighbours]);
    let (nearest, _) = top_k(&mut b, &others, &k, 2, true);
    let nearest_sum = b.op("ReduceSum", &[&nearest, &axis_2], drop());
    let k_f = float(neighbours as f32, &mut b, "neighbours_f");
    b.op_into("Div", &[&nearest_sum, &k_f], vec![], DENSITY);

    // Importance: density mapped to [0, 1], raised by the normalised saliency.
    let one = float(1.0, &mut b, "one");
    let half = float(0.5, &mut b, "half");
    let shifted = b.op("Add", &[DENSITY, &one], vec![]);
    let mut importance = b.op("Mul", &[&shifted, &half], vec![]);
    if let Some(saliency) = saliency {
        let one_i = b.init_i64("one_i", &[1], &[1]);
        let (largest, _) = top_k(&mut b, saliency, &one_i, 0, true);
        let largest = b.op("Max", &[&largest, &tiny], vec![]);
        let normalised = b.op("Div", &[saliency, &largest], vec![]);
        let lambda = float(lambda as f32, &mut b, "lambda");
        let raised = b.op("Mul", &[&normalised, &lambda], vec![]);
        let factor = b.op("Add", &[&raised, &one], vec![]);
        importance = b.op("Mul", &[&importance, &factor], vec![]);
    }
    // A centre's weight must stay positive: its cluster's weights are divided by their sum.
    let floor = float(1e-6, &mut b, "weight_floor");
    b.op_into("Max", &[&importance, &floor], vec![], IMPORTANCE);

    // Separation: how far a token is from every token ranked above it.
    let density_rows = b.op("Unsqueeze", &[DENSITY, &axis_2], vec![]); // [B, T, 1]: token i
    let density_columns = b.op("Unsqueeze", &[DENSITY, &axis_1], vec![]); // [B, 1, T]: token j
    let denser = b.op("Greater", &[&density_columns, &density_rows], vec![]);
    let as_dense = b.op("Equal", &[&density_columns, &density_rows], vec![]);
    let earlier = b.op("Less", &[&columns, &rows], vec![]);
    let tie_won = b.op("And", &[&as_dense, &earlier], vec![]);
    let ranked_above = b.op("Or", &[&denser, &tie_won], vec![]);
    let minus_one = float(-1.0, &mut b, "minus_one");
    let above = b.op("Where", &[&ranked_above, &similarity, &minus_one], vec![]);
    let one_i = b.init_i64("one_k", &[1], &[1]);
    let (closest_above, _) = top_k(&mut b, &above, &one_i, 2, true);
    let closest_above = b.op("Squeeze", &[&closest_above, &axis_2], vec![]);
    let separation = b.op("Sub", &[&one, &closest_above], vec![]);
    let score = b.op("Mul", &[IMPORTANCE, &separation], vec![]);

    // Centres: the M best scores, in token order (indices are exact in float32 below 2^24).
    let m_tensor = b.init_i64("merged_count", &[1], &[m]);
    let (_, best) = top_k(&mut b, &score, &m_tensor, 1, true);
    let to_float = vec![("to", AttrValue::Int(DataType::Float as i64))];
    let best_f = b.op("Cast", &[&best], to_float.clone());
    let (ascending, _) = top_k(&mut b, &best_f, &m_tensor, 1, false);
    b.op_into(
        "Cast",
        &[&ascending],
        vec![("to", AttrValue::Int(DataType::Int64 as i64))],
        CENTRES,
    );

    // Assignment: each token to its most similar centre; a centre always to itself.
    let centre_row = b.op("Unsqueeze", &[CENTRES, &axis_1], vec![]); // [B, 1, M]
    let is_centre = b.op("Equal", &[&rows, &centre_row], vec![]); // [B, T, M]
    let is_centre_f = b.op("Cast", &[&is_centre], to_float.clone());
    let to_centres = b.op("MatMul", &[&similarity, &is_centre_f], vec![]); // exact: one-hot
    let own = float(3.0, &mut b, "own_centre");
    let preference = b.op("Where", &[&is_centre, &own, &to_centres], vec![]);
    b.op_into(
        "ArgMax",
        &[&preference],
        vec![("axis", AttrValue::Int(2)), ("keepdims", AttrValue::Int(0))],
        ASSIGNMENT,
    );
    let clusters: Vec<i64> = (0..m).collect();
    let clusters = b.init_i64("clusters", &[m], &clusters);
    let assigned = b.op("Unsqueeze", &[ASSIGNMENT, &axis_2], vec![]); // [B, T, 1]
    let member = b.op("Equal", &[&assigned, &clusters], vec![]); // [B, T, M]
    let assignment = b.op("Cast", &[&member], to_float);

    // Merge: the importance-weighted mean of each cluster.
    let weights = b.op("Unsqueeze", &[IMPORTANCE, &axis_2], vec![]);
    let weighted = b.op("Mul", &[&assignment, &weights], vec![]);
    let totals = b.op("ReduceSum", &[&weighted, &axis_1], keep());
    let shares = b.op("Div", &[&weighted, &totals], vec![]);
    let shares_t = b.op(
        "Transpose",
        &[&shares],
        vec![("perm", AttrValue::Ints(vec![0, 2, 1]))],
    );
    let merged32 = b.op("MatMul", &[&shares_t, &h32], vec![]);
    from_f32(&mut b, &merged32, elem, MERGED);
    MergeValues {
        input32: h32,
        merged32,
        assignment,
    }
}

/// Inserts the unmerge of the span's output `span_output` ([batch, M, D]) back to T tokens,
/// written to `output`.
pub fn insert_unmerge(
    graph: &mut Graph,
    span_output: &str,
    merge: &MergeValues,
    elem: i32,
    unmerge: Unmerge,
    output: &str,
) {
    let mut b = Builder::new(graph, PREFIX);
    let y32 = to_f32(&mut b, span_output, elem);
    let out32 = match unmerge {
        Unmerge::Copy => b.op("MatMul", &[&merge.assignment, &y32], vec![]),
        Unmerge::Residual => {
            let update = b.op("Sub", &[&y32, &merge.merged32], vec![]);
            let spread = b.op("MatMul", &[&merge.assignment, &update], vec![]);
            b.op("Add", &[&merge.input32, &spread], vec![])
        }
    };
    from_f32(&mut b, &out32, elem, output);
}

/// Inserts token merging over a span of `spans` (the blocks as earlier rewrites left them).
/// With token selection, `selection` is the model's token count N: the blocks run on the K
/// gathered tokens, except on the first step, when a copy of the original blocks runs on all N.
/// Leaves the metadata contract to the caller ([`merge_contract`]).
pub fn apply_token_merging(
    model: &mut Model,
    stack: &DitStack,
    spans: &[BlockSpan],
    config: &MergeConfig,
    selection: Option<i64>,
) -> Result<MergeSummary> {
    let (first, last) = config.check(spans.len())?;
    let dims = spans[first].dims.clone();
    let (t, d) = match dims[..] {
        [_, Dim::Fixed(t), Dim::Fixed(d)] => (t, d),
        _ => {
            return Err(Error::Unsupported(format!(
                "token merging needs a fixed token count and hidden size; block {first}'s input '{}' is {dims:?} (export the model with a fixed image size)",
                spans[first].input
            )));
        }
    };
    let m = merged_count(config.keep_ratio, t)?;
    if t < 2 {
        return Err(Error::Unsupported(format!(
            "token merging needs at least 2 tokens; block {first} reads {t}"
        )));
    }
    let neighbours = config.neighbours.min(t - 1);
    let input = spans[first].input.clone();
    let output = spans[last].output.clone();
    if model
        .graph
        .outputs
        .iter()
        .any(|o| o.name == input || o.name == output)
    {
        return Err(Error::Unsupported(format!(
            "the merged span's input '{input}' or output '{output}' is itself a model output; token merging cannot replace it"
        )));
    }
    let span_nodes: HashSet<NodeId> = spans[first..=last]
        .iter()
        .flat_map(|s| s.nodes.iter().copied())
        .collect();
    let order = block_nodes_in_order(model, &span_nodes, "token merging")?;
    let shapes = Shapes::infer(model);
    let elem = stream_elem(model, &shapes, &input);
    let region = TokenRegion {
        pass: "token merging",
        input: &input,
        output: &output,
        blocks: (first..=last)
            .map(|i| (stack.blocks[i].index, spans[i].output.as_str()))
            .collect(),
        batch: dims[0].clone(),
        joint: None,
    };
    // Per-token side inputs (rotary tables, masks) have no meaning for a merged token: none is
    // offered, so a span that reads one is refused with the node named.
    let (_, fixes) = analyse_blocks(model, &region, &order, &[], &shapes, t, d)?;
    let block_nodes: Vec<Vec<NodeId>> = spans[first..=last]
        .iter()
        .map(|s| s.nodes.clone())
        .collect();
    let blocks_before = flops_per_sample(model, &dims[0], &block_nodes);
    let existing: HashSet<NodeId> = model.graph.nodes().map(|(id, _)| id).collect();

    let graph = &mut model.graph;
    // The file's types of the span's values name T; the span now runs on M.
    let produced: HashSet<String> = order
        .iter()
        .flat_map(|&id| graph.node(id).outputs.clone())
        .filter(|o| !o.is_empty())
        .collect();
    graph.value_info.retain(|v| !produced.contains(&v.name));
    let mut fixed_nodes = Vec::new();
    for (id, fix) in &fixes {
        fixed_nodes.push(graph.node(*id).label());
        apply_fix(graph, *id, fix, PREFIX);
    }
    // Everything after the span reads the unmerged output; then the span's first block reads the
    // merged stream.
    graph.replace_uses(&output, UNMERGED);
    let saliency = selection.map(|_| {
        let mut b = Builder::new(graph, PREFIX);
        b.op(
            "Gather",
            &[crate::tokens::SALIENCY, crate::tokens::SELECTED],
            vec![("axis", AttrValue::Int(0))],
        )
    });
    let values = insert_merge(
        graph,
        &input,
        elem,
        (t, m, neighbours),
        config.lambda,
        saliency.as_deref(),
    );
    for id in order.iter().copied() {
        if graph.node(id).inputs.contains(&input) {
            graph.update_node(id, |node| {
                for i in &mut node.inputs {
                    if *i == input {
                        *i = MERGED.to_string();
                    }
                }
            });
        }
    }
    insert_unmerge(graph, &output, &values, elem, config.unmerge, UNMERGED);
    let merged_dims = vec![dims[0].clone(), Dim::Fixed(m), Dim::Fixed(d)];
    for value in [
        ValueInfo::tensor(MERGED, elem, merged_dims.clone()),
        ValueInfo::tensor(UNMERGED, elem, dims.clone()),
        ValueInfo::tensor(
            CENTRES,
            DataType::Int64 as i32,
            vec![dims[0].clone(), Dim::Fixed(m)],
        ),
        ValueInfo::tensor(
            ASSIGNMENT,
            DataType::Int64 as i32,
            vec![dims[0].clone(), Dim::Fixed(t)],
        ),
    ] {
        graph.set_value_type(value);
    }
    let mut b = Builder::new(graph, PREFIX);
    let count = b.init_i64("count", &[1], &[m]);
    match selection {
        // Token selection's first step runs the original blocks on every token, unmerged.
        Some(n) => {
            let all = b.init_i64("all", &[1], &[n]);
            let zero = b.init_i64("zero", &[1], &[0]);
            let primed = b.op("Greater", &[crate::tokens::PRIMED, &zero], vec![]);
            b.op_into(
                "Where",
                &[&primed, &count, &all],
                vec![],
                MERGED_TOKENS_OUTPUT,
            );
        }
        None => b.op_into("Identity", &[&count], vec![], MERGED_TOKENS_OUTPUT),
    }
    graph.outputs.push(ValueInfo::tensor(
        MERGED_TOKENS_OUTPUT,
        DataType::Int64 as i32,
        vec![Dim::Fixed(1)],
    ));

    let mut new_spans = spans.to_vec();
    let proportional_softmaxes = if config.proportional_attention {
        add_proportional_attention(model, &mut new_spans[first..=last], &values.assignment, m)
    } else {
        Vec::new()
    };
    new_spans[first].input = MERGED.to_string();
    for span in &mut new_spans[first..=last] {
        span.dims = merged_dims.clone();
    }
    if let Some(next) = new_spans.get_mut(last + 1) {
        next.input = UNMERGED.to_string();
    }
    ensure_opset(model, 13)?;
    crate::ir::verify_model(model)?;
    let added: Vec<NodeId> = model
        .graph
        .nodes()
        .map(|(id, _)| id)
        .filter(|id| !existing.contains(id))
        .collect();
    let mut after = flops_per_sample(model, &dims[0], &[block_nodes, vec![added]].concat());
    let overhead = after.pop().unwrap_or(0);
    let flops = MergeFlops {
        blocks_before,
        blocks_after: after,
        overhead,
    };
    let policy = json!({
        "keep_ratio": config.keep_ratio,
        "tokens": t,
        "merged": m,
        "neighbours": neighbours,
        "blocks": [first, last],
        "lambda": if selection.is_some() { json!(config.lambda) } else { json!(null) },
        "unmerge": config.unmerge,
        "proportional_attention": proportional_softmaxes,
        "centres": "top M of importance x separation (1 - cosine to the nearest token of higher density)",
        "density": "mean cosine similarity to the K nearest tokens of the same sample",
        "flops_per_sample": flops,
    });
    Ok(MergeSummary {
        tokens: t,
        merged: m,
        neighbours,
        span: (first, last),
        fixed_nodes,
        proportional_softmaxes,
        spans: new_spans,
        flops,
        stats: vec![MERGED_TOKENS_OUTPUT.into()],
        policy,
    })
}

/// Proportional attention (as in ToMe): a merged key stands for its cluster's tokens, so its
/// attention logit gets + log(size) and softmax weighs it as that many copies. Without it, a
/// cluster of ten background tokens draws a tenth of the attention it drew before merging.
/// Applies to softmaxes of the span over [batch, heads, M, M] along the last axis (self-attention
/// on the merged tokens); each new node joins its block, which the block cache may move into a
/// branch. Returns the softmaxes changed. With M = T every size is 1 and the logits unchanged.
fn add_proportional_attention(
    model: &mut Model,
    spans: &mut [BlockSpan],
    assignment: &str,
    m: i64,
) -> Vec<String> {
    let shapes = Shapes::infer(model);
    let mut targets: Vec<(usize, NodeId, String, i32)> = Vec::new();
    for (s, span) in spans.iter().enumerate() {
        for &id in &span.nodes {
            let node = model.graph.node(id);
            if node.op_type != "Softmax" {
                continue;
            }
            let Some(dims) = shapes.dims(&node.inputs[0]) else {
                continue;
            };
            let last_axis = matches!(node.attr_int("axis"), None | Some(-1) | Some(3));
            if dims.len() == 4 && dims[2] == Dim::Fixed(m) && dims[3] == Dim::Fixed(m) && last_axis
            {
                let elem = shapes
                    .elem(&node.inputs[0])
                    .unwrap_or(DataType::Float as i32);
                targets.push((s, id, node.inputs[0].clone(), elem));
            }
        }
    }
    if targets.is_empty() {
        return Vec::new();
    }
    let mut b = Builder::new(&mut model.graph, PREFIX);
    let axis_1 = b.init_i64("size_axis", &[1], &[1]);
    let sizes = b.op(
        "ReduceSum",
        &[assignment, &axis_1],
        vec![("keepdims", AttrValue::Int(0))],
    );
    let log_sizes = b.op("Log", &[&sizes], vec![]);
    let key_axes = b.init_i64("key_axes", &[2], &[1, 2]);
    let bias = b.op("Unsqueeze", &[&log_sizes, &key_axes], vec![]); // [B, 1, 1, M]
    // One bias per element type the scores come in (one cast, not one per softmax).
    let mut biases: HashMap<i32, String> = HashMap::new();
    let mut changed = Vec::new();
    for (s, id, scores, elem) in targets {
        let bias = biases
            .entry(elem)
            .or_insert_with(|| f32_as(&mut b, &bias, elem))
            .clone();
        let biased = b.op("Add", &[&scores, &bias], vec![]);
        // The Add reads the block's scores: it belongs to the block (its cast, if any, does not).
        spans[s].nodes.extend(b.graph.producer(&biased));
        b.graph
            .update_node(id, |node| node.inputs[0] = biased.clone());
        changed.push(b.graph.node(id).label());
    }
    changed
}

/// Adds token merging's stats and policy to the model's `fastcache` contract.
pub fn merge_contract(model: &mut Model, summary: &MergeSummary) -> Result<()> {
    extend_contract(model, &[], &summary.stats, "merge", summary.policy.clone())
}
