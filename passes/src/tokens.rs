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

use std::collections::{HashMap, HashSet};

use serde_json::json;

use crate::analysis::{DitStack, Shapes, Source, ValueKind};
use crate::builder::Builder;
use crate::cache::{BlockSpan, Correction, pair};
use crate::contract::{CONTRACT_VERSION, Contract, METADATA_KEY, StatePair};
use crate::error::{Error, Result};
use crate::ir::{AttrValue, Dim, Graph, Model, Node, NodeId, ValueInfo};
use crate::onnx::tensor_proto::DataType;

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

/// The symbol that stands for the token count while the blocks are analysed.
const TOKEN_SYMBOL: &str = "fastcache.tokens";
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

/// A side input of the blocks that has the token axis, gathered with the selected indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerTokenInput {
    pub name: String,
    pub axis: usize,
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
    /// `Reshape` nodes whose constant target named N at the token axis, now made relative.
    pub reshapes_fixed: Vec<String>,
    /// The blocks as they now are: block 0 reads the gathered stream.
    pub spans: Vec<BlockSpan>,
    /// The shape of the stream the blocks run on: [batch, K, D].
    pub stream_dims: Vec<Dim>,
    pub state: Vec<StatePair>,
    pub stats: Vec<String>,
    pub policy: serde_json::Value,
}

/// K = ⌈ρ·N⌉ (at least 1), after checking ρ.
pub fn capacity(motion_ratio: f64, tokens: i64) -> Result<i64> {
    if !(motion_ratio > 0.0 && motion_ratio <= 1.0) {
        return Err(Error::Invalid(format!(
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
    let spans: Vec<BlockSpan> = stack
        .blocks
        .iter()
        .map(|b| BlockSpan {
            input: b.input.clone(),
            output: b.output.clone(),
            nodes: b.nodes.clone(),
        })
        .collect();
    let full_dims = vec![stack.batch.clone(), Dim::Fixed(n), Dim::Fixed(d)];
    let mut summary = TokenSummary {
        tokens: n,
        capacity: k,
        inserted: k < n,
        per_token_inputs: Vec::new(),
        reshapes_fixed: Vec::new(),
        spans,
        stream_dims: vec![stack.batch.clone(), Dim::Fixed(k), Dim::Fixed(d)],
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
    let order = model.graph.topo_order()?;
    let in_blocks: HashSet<NodeId> = stack
        .blocks
        .iter()
        .flat_map(|b| b.nodes.iter().copied())
        .collect();
    let block_order: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|id| in_blocks.contains(id))
        .collect();
    if let Some(&id) = block_order
        .iter()
        .find(|&&id| !model.graph.node(id).subgraphs().is_empty())
    {
        return Err(Error::Unsupported(format!(
            "block node {} has a subgraph; token selection does not rewrite inside subgraphs",
            model.graph.node(id).label()
        )));
    }
    let shapes = Shapes::infer(model);
    let elem = shapes
        .elem(&x)
        .or_else(|| model.graph.value_type(&x).and_then(|v| v.elem_type()))
        .unwrap_or(DataType::Float as i32);
    let candidates = token_axis_candidates(stack, &shapes, n, d);
    let (per_token, fixes) =
        analyse_blocks(model, stack, &block_order, &candidates, &shapes, n, d)?;
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
    let top = top_k(&mut b, SALIENCY, &k_tensor, true);
    // TopK orders by saliency; sorting the indices keeps the tokens in their original order
    // (exact in float32 below 2^24 tokens).
    let top_f = b.op(
        "Cast",
        &[&top],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );
    let sorted_f = top_k(&mut b, &top_f, &k_tensor, false);
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
        let gathered = b.op(
            "Gather",
            &[&p.name, SELECTED],
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

    let stream_dims = vec![stack.batch.clone(), Dim::Fixed(k), Dim::Fixed(d)];
    for value in [
        ValueInfo::tensor(SALIENCY, DataType::Float as i32, vec![Dim::Fixed(n)]),
        ValueInfo::tensor(SELECTED, DataType::Int64 as i32, vec![Dim::Fixed(k)]),
        ValueInfo::tensor(GATHERED, elem, stream_dims.clone()),
    ] {
        graph.set_value_type(value);
    }

    // The blocks now read the gathered stream and gathered per-token inputs.
    rename_reads(graph, &block_order, &renames);
    for (id, target) in &fixes {
        summary.reshapes_fixed.push(graph.node(*id).label());
        set_reshape_target(graph, *id, target, "fastcache.tokens.");
    }
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
    ensure_opset(model, 13);
    crate::ir::verify_model(model)?;
    Ok(summary)
}

/// Adds the token selection's state, stats and policy to the model's `fastcache` contract,
/// creating the contract when the block cache did not.
pub fn merge_contract(model: &mut Model, summary: &TokenSummary) -> Result<()> {
    let mut contract = match Contract::from_model(model)? {
        Some(contract) => contract,
        None => Contract {
            version: CONTRACT_VERSION,
            state: Vec::new(),
            stats: Vec::new(),
            policy: json!({"name": "fastcache", "cache": false}),
        },
    };
    contract.state.extend(summary.state.iter().cloned());
    contract.stats.extend(summary.stats.iter().cloned());
    match contract.policy.as_object_mut() {
        Some(policy) => {
            policy.insert("tokens".into(), summary.policy.clone());
        }
        None => {
            return Err(Error::Invalid(
                "the model's fastcache policy is not a JSON object".into(),
            ));
        }
    }
    model.set_metadata(METADATA_KEY, contract.to_json());
    Ok(())
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

/// ReduceSum with an axes input needs opset 13; the exports here are 17 and 18.
fn ensure_opset(model: &mut Model, minimum: i64) {
    for opset in &mut model.opsets {
        let domain = opset.domain.as_deref().unwrap_or("");
        if (domain.is_empty() || domain == "ai.onnx") && opset.version.unwrap_or(0) < minimum {
            opset.version = Some(minimum);
        }
    }
}

fn to_f32(b: &mut Builder, value: &str, elem: i32) -> String {
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

fn from_f32(b: &mut Builder, value: &str, elem: i32, output: &str) {
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

/// TopK along axis 0; returns the values (`largest` false, for sorting) or the indices.
fn top_k(b: &mut Builder, input: &str, k: &str, largest: bool) -> String {
    let values = b.name("topk_values");
    let indices = b.name("topk_indices");
    let node = Node::new("TopK", &[input, k], &[&values, &indices])
        .with_name(b.name("topk"))
        .with_attr("axis", AttrValue::Int(0))
        .with_attr("largest", AttrValue::Int(largest as i64))
        .with_attr("sorted", AttrValue::Int(1));
    b.graph.add_node(node);
    if largest { indices } else { values }
}

/// Makes the given nodes read `to` wherever they read `from`.
fn rename_reads(graph: &mut Graph, ids: &[NodeId], renames: &[(String, String)]) {
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

/// Side inputs of the blocks that may carry the token axis (rotary tables, token masks): those
/// with exactly one axis of size N. When N equals the hidden size D, a last axis of that size is
/// taken for the feature axis (a timestep embedding [batch, D] is per sample). Whether a candidate
/// really is per token is decided by the analysis: it is gathered when it meets the token axis.
fn token_axis_candidates(stack: &DitStack, shapes: &Shapes, n: i64, d: i64) -> Vec<PerTokenInput> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for block in &stack.blocks {
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
                });
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

fn is_token(dim: &Dim) -> bool {
    matches!(dim, Dim::Named(s) if s == TOKEN_SYMBOL)
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
    /// A Reshape whose constant target names N at the token axis: the new target.
    Fix(Vec<i64>),
    Refuse(String),
    /// The token axis meets an axis of N from this input of the node.
    Conflict(String, String),
}

/// Analyses the blocks with the stack input's token dim (and gathered inputs' token axes) a
/// symbol: fixes the Reshapes that can be fixed, decides which candidates are per token (those
/// that meet the token axis), refuses the rest. Returns the per-token inputs and the fixes.
fn analyse_blocks(
    model: &Model,
    stack: &DitStack,
    block_order: &[NodeId],
    candidates: &[PerTokenInput],
    shapes: &Shapes,
    n: i64,
    d: i64,
) -> Result<(Vec<PerTokenInput>, Vec<(NodeId, Vec<i64>)>)> {
    let in_blocks: HashSet<NodeId> = block_order.iter().copied().collect();
    let mut gathered: Vec<PerTokenInput> = Vec::new();
    let mut fixes: Vec<(NodeId, Vec<i64>)> = Vec::new();
    let refuse = |message: String| {
        Err(Error::Unsupported(format!(
            "token selection cannot run these blocks on a subset of the tokens: {message}"
        )))
    };
    'probe: loop {
        let probe = probe_model(model, stack, block_order, &gathered, &fixes, shapes, d);
        let mut probe = probe;
        loop {
            let probe_shapes = Shapes::infer(&probe);
            let mut found = Vec::new();
            let mut problem = None;
            for &id in block_order {
                match examine(probe.graph.node(id), &probe_shapes, n) {
                    Finding::Fine => {}
                    Finding::Fix(target) => found.push((id, target)),
                    other => {
                        problem = Some(other);
                        break;
                    }
                }
            }
            // A problem after a fixable Reshape may only be the lost token axis showing
            // downstream: fix first, then look again.
            if !found.is_empty() {
                for (id, target) in found {
                    if fixes.iter().any(|(fixed, _)| *fixed == id) {
                        return Err(Error::Invalid(format!(
                            "token selection: fixing {} did not restore the token axis",
                            probe.graph.node(id).label()
                        )));
                    }
                    set_reshape_target(&mut probe.graph, id, &target, "fastcache.probe.");
                    fixes.push((id, target));
                }
                continue;
            }
            match problem {
                None => {
                    check_boundaries(&probe, stack, block_order, &probe_shapes)?;
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
/// gathered inputs with T at their token axis), with the Reshape fixes so far applied.
fn probe_model(
    model: &Model,
    stack: &DitStack,
    block_order: &[NodeId],
    gathered: &[PerTokenInput],
    fixes: &[(NodeId, Vec<i64>)],
    shapes: &Shapes,
    d: i64,
) -> Model {
    let token = Dim::Named(TOKEN_SYMBOL.into());
    let mut probe = model.clone();
    probe.graph.value_info.clear(); // declared types name N, which would override the symbol
    let elem = |name: &str| shapes.elem(name).unwrap_or(DataType::Float as i32);
    let probe_x = "fastcache.probe.x";
    probe.graph.inputs.push(ValueInfo::tensor(
        probe_x,
        elem(&stack.stack_input),
        vec![stack.batch.clone(), token.clone(), Dim::Fixed(d)],
    ));
    let mut renames = vec![(stack.stack_input.clone(), probe_x.to_string())];
    for (i, p) in gathered.iter().enumerate() {
        let mut dims = shapes.dims(&p.name).unwrap_or_default().to_vec();
        dims[p.axis] = token.clone();
        let name = format!("fastcache.probe.side{i}");
        probe
            .graph
            .inputs
            .push(ValueInfo::tensor(&name, elem(&p.name), dims));
        renames.push((p.name.clone(), name));
    }
    rename_reads(&mut probe.graph, block_order, &renames);
    for (id, target) in fixes {
        set_reshape_target(&mut probe.graph, *id, target, "fastcache.probe.");
    }
    probe
}

/// After the analysis: every block output keeps the token axis at 1, and nothing the blocks
/// compute from the tokens is read after the stack (it would have K tokens there, not N).
fn check_boundaries(
    probe: &Model,
    stack: &DitStack,
    block_order: &[NodeId],
    shapes: &Shapes,
) -> Result<()> {
    for block in &stack.blocks {
        let dims = shapes.dims(&block.output).unwrap_or_default();
        if dims.len() != 3 || !is_token(&dims[1]) {
            return Err(Error::Unsupported(format!(
                "token selection cannot follow the token axis to block {}'s output '{}' (found {dims:?})",
                block.index, block.output
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
            if value.is_empty() || *value == stack.stack_output {
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
                    "'{value}' is computed in the blocks from the tokens and read after the stack; with token selection it would hold only the selected tokens"
                )));
            }
        }
    }
    Ok(())
}

fn examine(node: &Node, shapes: &Shapes, n: i64) -> Finding {
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
    let conflict = |other: usize| {
        Finding::Conflict(
            format!(
                "{} combines the token axis with an axis of {n} from '{}': a hard-coded token count, or a per-token tensor the rewrite did not recognise",
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
            if aligned.iter().any(|(_, d)| is_token(d))
                && let Some((other, _)) = aligned.iter().find(|(_, d)| **d == fixed_n && n != 1)
            {
                return conflict(*other);
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
            return conflict(1);
        }
        if is_token(kb) && *ka == fixed_n {
            return conflict(0);
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
            Some(dims) if !dims.iter().any(is_token) => {
                if node.op_type == "Reshape"
                    && let Some(target) = reshape_fix(node, shapes, n)
                {
                    return Finding::Fix(target);
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

/// Makes a Reshape read a new constant target, with 0 meaning "copy the input dim".
fn set_reshape_target(graph: &mut Graph, id: NodeId, target: &[i64], prefix: &str) {
    let mut b = Builder::new(graph, prefix);
    let shape = b.init_i64("reshape_shape", &[target.len() as i64], target);
    graph.update_node(id, |node| {
        node.inputs[1] = shape;
        node.attributes.retain(|a| a.name != "allowzero");
    });
}

/// For a Reshape that loses the token axis: if its target is known, names N exactly at the token
/// axis of its input, and keeps the axes before and after it, the same target with 0 ("copy the
/// input dim") there and at every leading axis that copies a symbolic input dim.
fn reshape_fix(node: &Node, shapes: &Shapes, n: i64) -> Option<Vec<i64>> {
    let input = shapes.dims(&node.inputs[0])?;
    let target = shapes.get(node.inputs.get(1)?)?.content.as_ref()?;
    // With allowzero = 1 a 0 is a literal zero-size dim; a target without zeros means the same
    // under allowzero = 0, which the fix sets (see `set_reshape_target`).
    if node.attr_int("allowzero") == Some(1) && target.contains(&Dim::Fixed(0)) {
        return None;
    }
    let a = input.iter().position(is_token)?;
    if target.get(a) != Some(&Dim::Fixed(n)) || input.iter().filter(|d| is_token(d)).count() != 1 {
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
