//! Spatial-aware token selection (design/method.md §2): around the block stack, run only the
//! K = ⌈ρ·N⌉ tokens whose input moved most, and give the others their last computed output.
//!
//! ```text
//! x32     = Cast(X, f32)                                   X: stack input [B, N, D]
//! S       = Σ_{batch, hidden} (x32 − R_x)²                 [N], one selection for the batch
//! sel     = sort_ascending(TopK(S, K).indices)             [K], token order kept
//! G       = Gather(X, sel, axis 1)                         [B, K, D]; per-token side inputs too
//! Y       = blocks(G)                                      [B, K, D] (block cache here, if any)
//! primed: H_L = Scatter(R_out + (x32 − R_x)·W_s + b_s, sel, Y)        (W_s, b_s 0 by default)
//!         R_x ← Scatter(R_x, sel, G),  R_out ← Scatter(R_out, sel, Y)
//! first:  H_L = blocks(X) (a copy of the original blocks, all N tokens); R_x ← x32, R_out ← H_L
//! ```
//!
//! R_x and R_out hold, per token, the stack input and output at the step that token was last
//! computed. Saliency is measured against R_x rather than against the previous step's X: a token
//! that drifts a little every step then accumulates its drift until it is selected, instead of
//! staying static forever while its error grows unseen (the same rule as the block cache's test,
//! which compares with the last computed reference, never with an approximation). Static tokens
//! likewise start from their last computed output, so the fitted correction is applied once to
//! the whole input change since then rather than integrated step after step.
//!
//! The first step (all-zero state, `primed` = 0) must equal the original model, and with a fixed
//! capacity K the gathered stream cannot hold all N tokens. An `If` on `primed` therefore chooses
//! between the scatter (then-branch) and a copy of the original blocks over all N tokens
//! (else-branch; it reads the main graph's weights, so no weight is duplicated). The K-token
//! pass also runs on the first step; its result is discarded there, but it gives the block cache
//! (which works on the gathered stream, state [B, K, D]) references that are real points of the
//! K-token stack.
//!
//! Blocks must not hard-code N. Before anything is changed, the blocks are analysed with the
//! stack input's token dim replaced by a symbol: a `Reshape` whose constant target names N at the
//! token axis is fixed (that entry becomes 0, "copy the input dim"); anything else that loses the
//! token axis or combines it with a constant N-sized axis is refused with the node named.

use std::collections::HashSet;

use serde_json::json;

use crate::analysis::{DitStack, Shapes};
use crate::builder::{Builder, from_f32, to_f32, top_k};
use crate::cache::{BlockSpan, Correction, block_spans, ensure_opset, pair};
use crate::contract::{StatePair, extend_contract};
use crate::error::{Error, Result};
use crate::ir::{AttrValue, Dim, Graph, Model, Node, NodeId, ValueInfo};
use crate::onnx::tensor_proto::DataType;
pub use crate::token_axis::PerTokenInput;
use crate::token_axis::{
    TokenRegion, analyse_blocks, apply_fix, block_nodes_in_order, insert_after, rename_reads,
    stream_elem, token_axis_candidates,
};

/// State: each token's stack input when it was last computed, [batch, N, D] float32.
pub const REF_X: &str = "fastcache.tokens.ref_x";
/// State: each token's stack output when it was last computed, [batch, N, D] float32.
pub const REF_OUT: &str = "fastcache.tokens.ref_out";
/// State: 0 before the first step, 1 after, [1] int64.
pub const PRIMED: &str = "fastcache.tokens.primed";
/// Stats: how many tokens' outputs were computed this step (N on the first step, K after), [1]
/// int64.
pub const TOKENS_RUN_OUTPUT: &str = "fastcache.tokens_run";
/// The selected token indices, ascending, [K] int64 (an internal value; tests expose it).
pub const SELECTED: &str = "fastcache.tokens.selected";
/// The saliency of every token, [N] float32 (internal).
pub const SALIENCY: &str = "fastcache.tokens.saliency";
/// The gathered stream the blocks run on, [batch, K, D] (internal).
pub const GATHERED: &str = "fastcache.tokens.stream";
/// The stack output in token order, [batch, N, D], which the final layer reads (internal).
pub const STACK_OUTPUT: &str = "fastcache.tokens.stack_output";

/// Prefix of the first-step copy of the blocks' values and nodes.
const FIRST_STEP_PREFIX: &str = "fastcache.tokens.first";

#[derive(Clone, Debug)]
pub struct TokenConfig {
    /// ρ in (0, 1]: the share of tokens that run at every step after the first.
    pub motion_ratio: f64,
    /// The static tokens' correction (X − R_x)·W_s + b_s, W_s [D, D]; none is pure reuse.
    pub correction: Option<Correction>,
    /// Where the correction came from, for the metadata ("default" or "calibrated").
    pub source: String,
}

impl TokenConfig {
    pub fn new(motion_ratio: f64) -> TokenConfig {
        TokenConfig {
            motion_ratio,
            correction: None,
            source: "default".into(),
        }
    }
}

/// What the rewrite did.
#[derive(Clone, Debug)]
pub struct TokenSummary {
    /// N.
    pub tokens: i64,
    /// K = ⌈ρ·N⌉.
    pub capacity: i64,
    /// False when K = N: every token runs, nothing was inserted but the stats output.
    pub inserted: bool,
    pub per_token_inputs: Vec<PerTokenInput>,
    /// Nodes whose constants named N at the token axis (Reshape targets, Slice and Split
    /// bounds), now made to follow the token count.
    pub fixed_nodes: Vec<String>,
    /// The blocks as they now are: block 0 reads the gathered stream; all run on [batch, K, D].
    pub spans: Vec<BlockSpan>,
    pub state: Vec<StatePair>,
    pub stats: Vec<String>,
    pub policy: serde_json::Value,
}

/// K = ⌈ρ·N⌉ (at least 1), after checking ρ.
pub fn capacity(motion_ratio: f64, tokens: i64) -> Result<i64> {
    if !(motion_ratio > 0.0 && motion_ratio <= 1.0) {
        return Err(Error::Request(format!(
            "--motion-ratio must lie in (0, 1], got {motion_ratio}"
        )));
    }
    // The small slack keeps ratios like 0.3 × 10 = 3.0000000000000004 at 3.
    let k = (motion_ratio * tokens as f64 - 1e-9).ceil().max(1.0) as i64;
    Ok(k.min(tokens))
}

/// Inserts token selection around the stack of `model` (whose structure is `stack`). Leaves the
/// metadata contract alone: the caller adds the block cache, if any, on `summary.spans`, then
/// calls [`merge_contract`].
pub fn apply_token_selection(
    model: &mut Model,
    stack: &DitStack,
    config: &TokenConfig,
) -> Result<TokenSummary> {
    let (n, d) = match (stack.tokens, stack.hidden) {
        (Some(n), Some(d)) => (n, d),
        _ => {
            return Err(Error::Unsupported(format!(
                "token selection needs a fixed token count and hidden size; the stack input '{}' has neither (export the model with a fixed image size)",
                stack.stack_input
            )));
        }
    };
    let k = capacity(config.motion_ratio, n)?;
    if let Some(c) = &config.correction
        && (c.weight.len() != (d * d) as usize || c.bias.len() != d as usize)
    {
        return Err(Error::Invalid(format!(
            "the static-token correction must be a {d}×{d} weight and {d} biases"
        )));
    }
    let stream_dims = vec![stack.batch.clone(), Dim::Fixed(k), Dim::Fixed(d)];
    let spans = block_spans(stack, &stream_dims);
    let full_dims = vec![stack.batch.clone(), Dim::Fixed(n), Dim::Fixed(d)];
    let mut summary = TokenSummary {
        tokens: n,
        capacity: k,
        inserted: k < n,
        per_token_inputs: Vec::new(),
        fixed_nodes: Vec::new(),
        spans,
        state: Vec::new(),
        stats: vec![TOKENS_RUN_OUTPUT.into()],
        policy: json!({}),
    };
    if k == n {
        // Every token runs: the model stays as it is, with the stats output hosts may expect.
        let mut b = Builder::new(&mut model.graph, "fastcache.tokens.");
        let all = b.init_i64("all", &[1], &[n]);
        b.op_into("Identity", &[&all], vec![], TOKENS_RUN_OUTPUT);
        model.graph.outputs.push(ValueInfo::tensor(
            TOKENS_RUN_OUTPUT,
            DataType::Int64 as i32,
            vec![Dim::Fixed(1)],
        ));
        summary.policy = policy(config, n, k, &summary);
        return Ok(summary);
    }

    let x = stack.stack_input.clone();
    let y = stack.stack_output.clone();
    if model
        .graph
        .outputs
        .iter()
        .any(|o| o.name == y || o.name == x)
    {
        return Err(Error::Unsupported(format!(
            "the stack input '{x}' or output '{y}' is itself a model output; token selection cannot replace it"
        )));
    }
    let in_blocks: HashSet<NodeId> = stack
        .blocks
        .iter()
        .flat_map(|b| b.nodes.iter().copied())
        .collect();
    let block_order = block_nodes_in_order(model, &in_blocks, "token selection")?;
    let shapes = Shapes::infer(model);
    let elem = stream_elem(model, &shapes, &x);
    let joint_layout = stack.joint.as_ref().and_then(|j| {
        Some(crate::token_axis::JointRows {
            text_tokens: j.text_tokens?,
            text_first: j.image_first == Some(false),
        })
    });
    let candidates = token_axis_candidates(&stack.blocks, &shapes, n, d, joint_layout);
    let region = TokenRegion {
        pass: "token selection",
        input: &x,
        output: &y,
        blocks: stack
            .blocks
            .iter()
            .map(|b| (b.index, b.output.as_str()))
            .collect(),
        batch: stack.batch.clone(),
        joint: joint_layout,
    };
    let (per_token, fixes) =
        analyse_blocks(model, &region, &block_order, &candidates, &shapes, n, d)?;
    summary.per_token_inputs = per_token.clone();

    // The first-step copy is taken before anything in the blocks changes.
    let produced: HashSet<String> = block_order
        .iter()
        .flat_map(|&id| model.graph.node(id).outputs.clone())
        .filter(|o| !o.is_empty())
        .collect();
    let first_body = first_step_body(model, &in_blocks, &produced, &y, &x, elem, &full_dims)?;

    let graph = &mut model.graph;
    // The file's types of block values name N; inside the blocks the stream now has K tokens.
    graph.value_info.retain(|v| !produced.contains(&v.name));
    for (name, dtype, dims) in [
        (REF_X, DataType::Float, full_dims.clone()),
        (REF_OUT, DataType::Float, full_dims.clone()),
        (PRIMED, DataType::Int64, vec![Dim::Fixed(1)]),
    ] {
        graph
            .inputs
            .push(ValueInfo::tensor(name, dtype as i32, dims));
    }

    // Selection.
    let mut b = Builder::new(graph, "fastcache.tokens.");
    let x32 = to_f32(&mut b, &x, elem);
    let zero = b.init_i64("zero", &[1], &[0]);
    let primed = b.name("is_primed");
    b.op_into("Greater", &[PRIMED, &zero], vec![], &primed);
    let moved = b.op("Sub", &[&x32, REF_X], vec![]);
    let squared = b.op("Mul", &[&moved, &moved], vec![]);
    let axes = b.init_i64("saliency_axes", &[2], &[0, 2]);
    b.op_into(
        "ReduceSum",
        &[&squared, &axes],
        vec![("keepdims", AttrValue::Int(0))],
        SALIENCY,
    );
    let k_tensor = b.init_i64("capacity", &[1], &[k]);
    let (_, top) = top_k(&mut b, SALIENCY, &k_tensor, 0, true);
    // TopK orders by saliency; sorting the indices keeps the tokens in their original order
    // (exact in float32 below 2^24 tokens).
    let top_f = b.op(
        "Cast",
        &[&top],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );
    let (sorted_f, _) = top_k(&mut b, &top_f, &k_tensor, 0, false);
    b.op_into(
        "Cast",
        &[&sorted_f],
        vec![("to", AttrValue::Int(DataType::Int64 as i64))],
        SELECTED,
    );
    let axis_1 = vec![("axis", AttrValue::Int(1))];
    b.op_into("Gather", &[&x, SELECTED], axis_1.clone(), GATHERED);
    let mut renames = vec![(x.clone(), GATHERED.to_string())];
    for p in &per_token {
        let rows = match p.joint {
            None => SELECTED.to_string(),
            Some(joint) => joint_rows(&mut b, joint, n),
        };
        let gathered = b.op(
            "Gather",
            &[&p.name, &rows],
            vec![("axis", AttrValue::Int(p.axis as i64))],
        );
        renames.push((p.name.clone(), gathered));
    }
    let all = b.init_i64("all", &[1], &[n]);
    b.op_into(
        "Where",
        &[&primed, &k_tensor, &all],
        vec![],
        TOKENS_RUN_OUTPUT,
    );
    let one = b.init_i64("one", &[1], &[1]);
    let primed_next = format!("{PRIMED}.next");
    b.op_into("Identity", &[&one], vec![], &primed_next);
    let correction = config.correction.as_ref().map(|c| {
        (
            b.init_f32("static_w", &[d, d], &c.weight),
            b.init_f32("static_b", &[d], &c.bias),
        )
    });

    for value in [
        ValueInfo::tensor(SALIENCY, DataType::Float as i32, vec![Dim::Fixed(n)]),
        ValueInfo::tensor(SELECTED, DataType::Int64 as i32, vec![Dim::Fixed(k)]),
        ValueInfo::tensor(GATHERED, elem, stream_dims.clone()),
    ] {
        graph.set_value_type(value);
    }

    // The blocks follow any token count, then read the gathered stream and per-token inputs.
    let mut block_order = block_order;
    for (id, fix) in &fixes {
        summary.fixed_nodes.push(graph.node(*id).label());
        let added = apply_fix(graph, *id, fix, "fastcache.tokens.");
        insert_after(&mut block_order, *id, &added);
    }
    rename_reads(graph, &block_order, &renames);
    // The final layer reads the stack output in token order from the If below.
    graph.replace_uses(&y, STACK_OUTPUT);

    let then_body = scatter_body(
        &y,
        &moved,
        elem,
        k,
        &full_dims,
        correction.as_ref().map(|(w, b)| (w.as_str(), b.as_str())),
    );
    let ref_x_next = format!("{REF_X}.next");
    let ref_out_next = format!("{REF_OUT}.next");
    let if_node = Node::new(
        "If",
        &[&primed],
        &[STACK_OUTPUT, &ref_x_next, &ref_out_next],
    )
    .with_name("fastcache.tokens.if_primed")
    .with_attr("then_branch", AttrValue::Graph(Box::new(then_body)))
    .with_attr("else_branch", AttrValue::Graph(Box::new(first_body)));
    graph.add_node(if_node);
    graph.set_value_type(ValueInfo::tensor(STACK_OUTPUT, elem, full_dims.clone()));

    for (output, dtype, dims) in [
        (&ref_x_next, DataType::Float, full_dims.clone()),
        (&ref_out_next, DataType::Float, full_dims.clone()),
        (&primed_next, DataType::Int64, vec![Dim::Fixed(1)]),
        (
            &TOKENS_RUN_OUTPUT.to_string(),
            DataType::Int64,
            vec![Dim::Fixed(1)],
        ),
    ] {
        graph
            .outputs
            .push(ValueInfo::tensor(output, dtype as i32, dims));
    }
    summary.state = vec![
        pair(REF_X, &ref_x_next, "float32", &full_dims),
        pair(REF_OUT, &ref_out_next, "float32", &full_dims),
        pair(PRIMED, &primed_next, "int64", &[Dim::Fixed(1)]),
    ];
    if let Some(first) = summary.spans.first_mut() {
        first.input = GATHERED.to_string();
    }
    summary.policy = policy(config, n, k, &summary);
    ensure_opset(model, 13)?;
    crate::ir::verify_model(model)?;
    Ok(summary)
}

/// Makes `fastcache.tokens_run` 0 at the steps where `skipped` (a bool [1]) says a per-step
/// policy skipped the stack, selection and all.
pub fn skipped_steps_run_no_tokens(model: &mut Model, skipped: &str) -> Result<()> {
    let graph = &mut model.graph;
    let producer = graph
        .producer(TOKENS_RUN_OUTPUT)
        .ok_or_else(|| Error::Invalid(format!("no node makes '{TOKENS_RUN_OUTPUT}'")))?;
    let selected = format!("{TOKENS_RUN_OUTPUT}.selection");
    graph.update_node(producer, |node| {
        for output in &mut node.outputs {
            if output == TOKENS_RUN_OUTPUT {
                *output = selected.clone();
            }
        }
        if node.name == TOKENS_RUN_OUTPUT {
            node.name = selected.clone();
        }
    });
    let mut b = Builder::new(graph, "fastcache.tokens.");
    let none = b.init_i64("none_run", &[1], &[0]);
    b.op_into(
        "Where",
        &[skipped, &none, &selected],
        vec![],
        TOKENS_RUN_OUTPUT,
    );
    Ok(())
}

/// Adds the token selection's state, stats and policy to the model's `fastcache` contract,
/// creating the contract when the block cache did not.
pub fn merge_contract(model: &mut Model, summary: &TokenSummary) -> Result<()> {
    extend_contract(
        model,
        &summary.state,
        &summary.stats,
        "tokens",
        summary.policy.clone(),
    )
}

fn policy(config: &TokenConfig, n: i64, k: i64, summary: &TokenSummary) -> serde_json::Value {
    json!({
        "motion_ratio": config.motion_ratio,
        "tokens": n,
        "capacity": k,
        "selection": "top-k of sum over batch and hidden of (X - ref_x)^2, ref_x = each token's X when it last ran; indices ascending",
        "static": if config.correction.is_some() { "ref_out + (X - ref_x) W_s + b_s" } else { "ref_out (reuse)" },
        "first_step": "all tokens (the original blocks)",
        "calibration": config.source,
        "per_token_inputs": summary.per_token_inputs.iter().map(|p| json!({"name": p.name, "axis": p.axis})).collect::<Vec<_>>(),
    })
}

/// The then-branch (every step after the first): static tokens from the reference output (plus
/// the correction), the K computed ones scattered over them; the references updated where
/// tokens ran.
fn scatter_body(
    y: &str,
    moved: &str,
    elem: i32,
    k: i64,
    full_dims: &[Dim],
    correction: Option<(&str, &str)>,
) -> Graph {
    let mut body = Graph::new("fastcache_tokens_scatter");
    let h = "fastcache.tokens.then.stack_output";
    let ref_x = "fastcache.tokens.then.ref_x";
    let ref_out = "fastcache.tokens.then.ref_out";
    {
        let mut b = Builder::new(&mut body, "fastcache.tokens.then.");
        let y32 = to_f32(&mut b, y, elem);
        let shape = b.init_i64("index_shape", &[3], &[1, k, 1]);
        let index = b.op("Reshape", &[SELECTED, &shape], vec![]);
        let stream_shape = b.op("Shape", &[y], vec![]);
        let index = b.op("Expand", &[&index, &stream_shape], vec![]);
        let axis_1 = || vec![("axis", AttrValue::Int(1))];
        let computed = b.op("ScatterElements", &[REF_OUT, &index, &y32], axis_1());
        match correction {
            Some((w, bias)) => {
                let change = b.op("MatMul", &[moved, w], vec![]);
                let change = b.op("Add", &[&change, bias], vec![]);
                let base = b.op("Add", &[REF_OUT, &change], vec![]);
                let out = b.op("ScatterElements", &[&base, &index, &y32], axis_1());
                from_f32(&mut b, &out, elem, h);
            }
            None => from_f32(&mut b, &computed, elem, h),
        }
        b.op_into("Identity", &[&computed], vec![], ref_out);
        // The selected tokens' X, as gathered for the blocks.
        let x_run = to_f32(&mut b, GATHERED, elem);
        b.op_into("ScatterElements", &[REF_X, &index, &x_run], axis_1(), ref_x);
    }
    body.outputs = vec![
        ValueInfo::tensor(h, elem, full_dims.to_vec()),
        ValueInfo::tensor(ref_x, DataType::Float as i32, full_dims.to_vec()),
        ValueInfo::tensor(ref_out, DataType::Float as i32, full_dims.to_vec()),
    ];
    body
}

/// The else-branch (first step): the original blocks over all N tokens, their values and nodes
/// renamed so they cannot clash with the main graph's; they read the main graph's weights,
/// shared values and stack input from the enclosing scope.
fn first_step_body(
    model: &Model,
    in_blocks: &HashSet<NodeId>,
    produced: &HashSet<String>,
    y: &str,
    x: &str,
    elem: i32,
    full_dims: &[Dim],
) -> Result<Graph> {
    // Cut the blocks out of a copy and take them in topological order through the proto form,
    // which links the body in one pass.
    let mut blocks_only = model.graph.clone();
    let others: Vec<NodeId> = blocks_only
        .nodes()
        .map(|(id, _)| id)
        .filter(|id| !in_blocks.contains(id))
        .collect();
    for id in others {
        blocks_only.remove_node(id);
    }
    blocks_only.inputs.clear();
    blocks_only.outputs.clear();
    blocks_only.initializers.clear();
    blocks_only.value_info.clear();
    let proto = blocks_only.to_proto()?;
    let prefixed = |v: &str| {
        if v.starts_with('/') {
            format!("{FIRST_STEP_PREFIX}{v}")
        } else {
            format!("{FIRST_STEP_PREFIX}/{v}")
        }
    };
    let rename = |v: &String| {
        if produced.contains(v) {
            prefixed(v)
        } else {
            v.clone()
        }
    };
    let nodes = proto
        .node
        .into_iter()
        .map(|mut node| {
            node.input = node.input.iter().map(rename).collect();
            node.output = node.output.iter().map(rename).collect();
            if let Some(name) = node.name.as_mut().filter(|n| !n.is_empty()) {
                *name = prefixed(name);
            }
            node
        })
        .collect();
    let body_proto = crate::onnx::GraphProto {
        name: Some("fastcache_tokens_first_step".into()),
        node: nodes,
        ..Default::default()
    };
    let mut body = Graph::from_proto(body_proto)?;
    let full = prefixed(y);
    let h = "fastcache.tokens.first.stack_output";
    let ref_x = "fastcache.tokens.first.ref_x";
    let ref_out = "fastcache.tokens.first.ref_out";
    {
        let mut b = Builder::new(&mut body, "fastcache.tokens.first.");
        b.op_into("Identity", &[&full], vec![], h);
        if elem == DataType::Float as i32 {
            b.op_into("Identity", &[x], vec![], ref_x);
            b.op_into("Identity", &[&full], vec![], ref_out);
        } else {
            let cast = || vec![("to", AttrValue::Int(DataType::Float as i64))];
            b.op_into("Cast", &[x], cast(), ref_x);
            b.op_into("Cast", &[&full], cast(), ref_out);
        }
    }
    body.outputs = vec![
        ValueInfo::tensor(h, elem, full_dims.to_vec()),
        ValueInfo::tensor(ref_x, DataType::Float as i32, full_dims.to_vec()),
        ValueInfo::tensor(ref_out, DataType::Float as i32, full_dims.to_vec()),
    ];
    Ok(body)
}

/// The rows of an MMDiT per-token input (text + image tokens) that the selected image tokens and
/// all text tokens read: the text rows, then T + the selected indices (text first, as Flux), or
/// the selected indices, then N..N + T (image first).
fn joint_rows(b: &mut Builder, joint: crate::token_axis::JointRows, n: i64) -> String {
    let t = joint.text_tokens;
    let (text_start, image_start) = if joint.text_first { (0, t) } else { (n, 0) };
    let text: Vec<i64> = (text_start..text_start + t).collect();
    let text = b.init_i64("text_rows", &[t], &text);
    let offset = b.init_i64("image_row_offset", &[1], &[image_start]);
    let image = b.op("Add", &[SELECTED, &offset], vec![]);
    let parts: [&str; 2] = if joint.text_first {
        [&text, &image]
    } else {
        [&image, &text]
    };
    b.op("Concat", &parts, vec![("axis", AttrValue::Int(0))])
}
