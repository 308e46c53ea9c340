//! DiT structure discovery: where the block stack starts and ends, each block's region and side
//! inputs, the final layer, the roles of the model inputs.
//!
//! Structure decides, names only label. The steps:
//!
//! 1. *Residual adds.* An `Add` of two activations `s` and `b` where `b` is computed from `s`
//!    through at least one operator with weights (MatMul/Gemm/Conv with a constant operand): the
//!    `x + f(x)` of every pre-norm transformer sub-layer. (`x + 0.044715·x³` inside a tanh GELU
//!    has no weighted operator, a bias add has a constant operand; neither counts.)
//! 2. *Residual streams.* Residual adds chain when one's skip operand is the previous one's output.
//!    The longest stream that reaches the graph output is the main one. If another stream of
//!    two or more adds and the main one each feed the other's branches, the model is dual-stream
//!    (MMDiT: image and text updated together) and is reported as such.
//! 3. *Cuts.* The stack input X is the first add's skip operand. On the subgraph of data paths
//!    from X to the output, every residual-stream tensor must be a cut: every path passes through
//!    it (checked in one pass over a topological order: a node is a cut iff no edge jumps over
//!    its position). A stream that is bypassed (long skips, a second stream) is refused.
//! 4. *Sub-layers and blocks.* Between consecutive stream tensors lies one sub-layer. Blocks of
//!    one model are alike, so sub-layers group into blocks by the shortest period of their
//!    signatures (op types and weight shapes); e.g. DiT's (attention, feed-forward) repeats with
//!    period 2, PixArt's (self-attention, cross-attention, feed-forward) with period 3.
//! 5. *Regions.* Nodes off the X→output paths (the block's adaLN modulation, its own timestep
//!    embedding, shape arithmetic, constants) belong to a block when every reader of their
//!    results is in that block; what several regions read stays shared (the conditioning).
//!    A block's side inputs are the activations it reads from outside; constants are parameters.
//!
//! Refusals say what was looked for and what was found instead; nothing is guessed.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::cost::{Flops, flops_of};
use super::flow::{Flow, ValueKind, is_heavy};
use super::shapes::Shapes;
use crate::ir::{Dim, Model, NodeId};
use crate::onnx::element_count;
use crate::onnx::tensor_proto::DataType;

mod joint;

/// Why a model has no usable DiT structure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StructureError {
    /// Not a diffusion transformer: the message says what was looked for and not found.
    #[error("no DiT block stack found: {0}")]
    NotADit(String),
    /// A dual-stream (MMDiT) model given to a pass that does not handle it.
    #[error("dual-stream (MMDiT) transformer: {0}")]
    DualStreamUnsupported(String),
}

impl From<StructureError> for crate::Error {
    fn from(e: StructureError) -> crate::Error {
        crate::Error::Unsupported(e.to_string())
    }
}

/// What discovery found.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // made once per model; boxing would only add noise
pub enum Structure {
    SingleStream(DitStack),
    /// MMDiT (SD3, Flux): image and text streams updated together by joint blocks, seen along
    /// the image stream; [`DitStack::joint`] says how the streams run.
    Joint(DitStack),
}

impl Structure {
    /// The stack, single-stream or joint, for the passes that handle both.
    pub fn stack(&self) -> &DitStack {
        match self {
            Structure::SingleStream(stack) | Structure::Joint(stack) => stack,
        }
    }

    /// The single-stream stack, for the passes that handle only that; MMDiT models are refused
    /// with [`StructureError::DualStreamUnsupported`], naming `what` cannot run on them.
    pub fn single_stream(&self, what: &str) -> Result<&DitStack, StructureError> {
        match self {
            Structure::SingleStream(stack) => Ok(stack),
            Structure::Joint(stack) => Err(StructureError::DualStreamUnsupported(format!(
                "{}; {what} does not handle dual-stream blocks yet (the cache policies do: FastCache's schedule, its probe test and per-block cache, fbcache, teacache, interval)",
                stack.joint.as_ref().map_or(String::new(), |j| j.summary())
            ))),
        }
    }

    pub fn inputs(&self) -> &InputRoles {
        &self.stack().inputs
    }
}

/// A single-stream DiT: X → block 0 → … → block L−1 → final layer.
#[derive(Clone, Debug)]
pub struct DitStack {
    /// X, the hidden states after patch embedding, [batch, tokens, hidden].
    pub stack_input: String,
    /// The last block's output, the final layer's input.
    pub stack_output: String,
    /// The batch dim of the latent input (usually the symbol `batch`).
    pub batch: Dim,
    /// N, the token count, and D, the hidden size, from X's shape when known.
    pub tokens: Option<i64>,
    pub hidden: Option<i64>,
    /// The stream's element type (ONNX `TensorProto.DataType`): float32, or float16/bfloat16 in
    /// the exports GPU deployments use; float32 where shape inference cannot tell.
    pub elem: i32,
    pub inputs: InputRoles,
    pub blocks: Vec<Block>,
    pub sublayers_per_block: usize,
    /// Patch embedding (everything only the stack input depends on).
    pub embed: Region,
    /// Norm, projection and unpatchify after the last block.
    pub final_layer: Region,
    /// Nodes read by more than one region (conditioning embeddings, shared constants) or by none.
    pub shared: Region,
    /// `Some(true)` when node names or exporter metadata label every block distinctly, in
    /// agreement with the structure; `Some(false)` when names exist but disagree; `None` when the
    /// model carries no usable names.
    pub names_agree: Option<bool>,
    /// How the conclusion was reached, and anything a user should know.
    pub notes: Vec<String>,
    /// For MMDiT: the text stream and how the two streams run through the blocks.
    pub joint: Option<Joint>,
}

/// What a block is, by the streams it reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockKind {
    /// A single-stream DiT block (DiT, PixArt).
    Stream,
    /// An MMDiT double-stream block: image and text each with their own weights and residual
    /// adds, one joint attention over both (SD3's joint block, Flux's double block). The last
    /// SD3 block writes no text (`context_pre_only`): its `text_output` is `None`.
    Double,
    /// An MMDiT single-stream block on text and image tokens together (Flux): attention and MLP
    /// in parallel, one residual add.
    Single,
}

impl BlockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::Stream => "stream",
            BlockKind::Double => "double",
            BlockKind::Single => "single",
        }
    }
}

/// How an MMDiT's streams run (see `Block::text_input`, `Block::text_output` for each block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joint {
    /// The text stream's first tensor (the text embedding the first block reads), E₀.
    pub text_input: String,
    pub double_blocks: usize,
    pub single_blocks: usize,
    /// Single blocks: whether the token-axis concat puts the image tokens first (SD3-like) or
    /// the text tokens (Flux). `None` without single blocks.
    pub image_first: Option<bool>,
    /// Single blocks: the streams are concatenated once before the first single block and the
    /// image tokens sliced out once after the last (diffusers ≤ 0.34), rather than in every
    /// single block (≥ 0.35).
    pub joined_once: bool,
    /// T, the text token count, when the text stream's shape fixes it.
    pub text_tokens: Option<i64>,
}

impl Joint {
    pub fn summary(&self) -> String {
        let mut s = format!("{} double blocks", self.double_blocks);
        if self.single_blocks > 0 {
            s += &format!(
                ", {} single blocks on the {} tokens {}",
                self.single_blocks,
                if self.image_first == Some(true) {
                    "image + text"
                } else {
                    "text + image"
                },
                if self.joined_once {
                    "(joined once)"
                } else {
                    "(joined in every block)"
                }
            );
        }
        s + &format!("; text stream from '{}'", self.text_input)
    }
}

/// One block: the nodes between two residual-stream tensors, plus what only it reads.
#[derive(Clone, Debug)]
pub struct Block {
    pub index: usize,
    /// The residual-stream tensor the block reads (X for block 0).
    pub input: String,
    /// The residual-stream tensor it produces (the next block's input).
    pub output: String,
    pub kind: BlockKind,
    /// MMDiT: the text-stream tensor the block reads, where the text stream is separate there
    /// (double blocks; Flux single blocks that join the streams themselves).
    pub text_input: Option<String>,
    /// MMDiT: the text-stream tensor it writes that a later block reads; `None` where the text
    /// ends (SD3's last block, the last single block) or rides in the joint stream.
    pub text_output: Option<String>,
    pub sublayers: Vec<Sublayer>,
    /// Every node of the block, in topological order: the sub-layers' own nodes and the nodes
    /// only they read (modulation, per-block embeddings, shape arithmetic, constants).
    pub nodes: Vec<NodeId>,
    /// How many of those are on data paths from X to the output.
    pub core_nodes: usize,
    /// Activations defined outside the block and read inside it (not the block input).
    pub side_inputs: Vec<SideInput>,
    /// Constant tensors the block reads (initializers and `Constant` node outputs), by name.
    pub parameters: Vec<String>,
    /// Elements of the floating-point ones: the block's weights.
    pub parameter_count: u64,
    pub flops: Flops,
    /// Values defined inside the block and read outside it, other than `output` (empty for a
    /// well-formed block; a rewrite that skips the block must still provide them).
    pub escaping: Vec<String>,
    /// The module name the block's nodes carry (`transformer_blocks.3`), if any.
    pub label: Option<String>,
}

/// One residual sub-layer: `output = input + f(input, side inputs)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sublayer {
    pub input: String,
    pub output: String,
    pub kind: SublayerKind,
    pub core_nodes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SublayerKind {
    /// Attention among the stream's own tokens (both matmul operands come from the stream).
    SelfAttention,
    /// Attention from the stream to other tokens (keys/values from a side input).
    CrossAttention,
    /// MMDiT's joint attention: the image and text tokens' queries, keys and values concatenated.
    JointAttention,
    /// No token mixing: the MLP.
    FeedForward,
}

impl SublayerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SublayerKind::SelfAttention => "self-attention",
            SublayerKind::CrossAttention => "cross-attention",
            SublayerKind::JointAttention => "joint-attention",
            SublayerKind::FeedForward => "feed-forward",
        }
    }
}

/// An activation a block reads from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SideInput {
    pub name: String,
    /// `Data` for activations (timestep embedding, text states); `Shape` for values that carry
    /// only sizes.
    pub kind: ValueKind,
    pub source: Source,
}

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    ModelInput,
    Embed,
    Block(usize),
    FinalLayer,
    Shared,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::ModelInput => write!(f, "model input"),
            Source::Embed => write!(f, "embed"),
            Source::Block(i) => write!(f, "block {i}"),
            Source::FinalLayer => write!(f, "final layer"),
            Source::Shared => write!(f, "shared"),
        }
    }
}

/// A set of nodes outside the blocks.
#[derive(Clone, Debug, Default)]
pub struct Region {
    pub nodes: Vec<NodeId>,
    pub parameter_count: u64,
    pub flops: Flops,
}

/// What each model input is for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputRoles {
    /// The noisy latent the stack input is computed from.
    pub latent: String,
    /// The diffusion timestep (found by the sinusoidal embedding it feeds).
    pub timestep: Option<String>,
    pub conditions: Vec<Condition>,
    /// Inputs the stack does not read.
    pub other: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub input: String,
    pub kind: ConditionKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConditionKind {
    /// Integer labels looked up in an embedding table.
    ClassLabels,
    /// A sequence of embeddings [batch, tokens, channels], e.g. a text encoder's output.
    Text,
    /// One vector per sample [batch, channels], e.g. a pooled text embedding.
    Pooled,
    /// Per-token position ids of a rotary embedding [tokens, axes], no batch axis (Flux's
    /// `img_ids`, `txt_ids`).
    Positions,
    /// A second sinusoidally embedded scalar per sample beside the timestep: a
    /// guidance-distilled model's guidance (Flux-dev).
    Guidance,
    Other,
}

impl ConditionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionKind::ClassLabels => "class labels",
            ConditionKind::Text => "text",
            ConditionKind::Pooled => "pooled embedding",
            ConditionKind::Positions => "position ids",
            ConditionKind::Guidance => "guidance",
            ConditionKind::Other => "other",
        }
    }
}

impl DitStack {
    /// FLOPs of one whole model call (per sample).
    pub fn total_flops(&self) -> Flops {
        self.blocks.iter().map(|b| b.flops).sum::<Flops>()
            + self.embed.flops
            + self.final_layer.flops
            + self.shared.flops
    }

    /// The expected speedup of a call that skips the given blocks (by index), by the cost model:
    /// total FLOPs over the FLOPs still computed. The cost of the skip test itself is ignored.
    pub fn expected_speedup(&self, skipped: &[usize]) -> f64 {
        let total = self.total_flops().counted as f64;
        let saved: u64 = self
            .blocks
            .iter()
            .filter(|b| skipped.contains(&b.index))
            .map(|b| b.flops.counted)
            .fold(0, u64::saturating_add);
        let left = total - saved as f64;
        if left <= 0.0 {
            f64::INFINITY
        } else {
            total / left
        }
    }

    /// The cost model's speedup over a whole run with this skip pattern (one row per step, one
    /// flag per block, true = skipped): total FLOPs of the uncached run over those computed.
    pub fn expected_speedup_of_run(&self, skipped: &[Vec<bool>]) -> f64 {
        let total = self.total_flops().counted as f64;
        let computed: f64 = skipped
            .iter()
            .map(|row| {
                let saved: u64 = self
                    .blocks
                    .iter()
                    .zip(row)
                    .filter(|(_, skip)| **skip)
                    .map(|(b, _)| b.flops.counted)
                    .fold(0, u64::saturating_add);
                total - saved as f64
            })
            .sum();
        if computed <= 0.0 {
            f64::INFINITY
        } else {
            total * skipped.len() as f64 / computed
        }
    }

    /// The residual-stream tensors in order: X, then each block's output.
    pub fn boundaries(&self) -> Vec<String> {
        let mut values = vec![self.stack_input.clone()];
        values.extend(self.blocks.iter().map(|b| b.output.clone()));
        values
    }
}

/// Finds the DiT structure of a model.
pub fn discover(model: &Model) -> Result<Structure, StructureError> {
    let flow = Flow::new(&model.graph)
        .map_err(|e| StructureError::NotADit(format!("the graph cannot be ordered: {e}")))?;
    let shapes = Shapes::infer(model);
    Discovery { flow, shapes }.run()
}

/// A residual add `out = skip + branch`, where `branch` is computed from `skip`.
#[derive(Clone, Debug)]
struct Residual {
    pos: usize,
    skip: String,
    out: String,
    /// Nodes on data paths from `skip` to the branch operand.
    branch: Vec<usize>,
}

/// A block as found, before its region is assigned: its stream tensors and its core (the
/// nodes on data paths between them), by position in the flow order.
struct BlockPlan {
    input: String,
    output: String,
    text_input: Option<String>,
    text_output: Option<String>,
    kind: BlockKind,
    sublayers: Vec<Sublayer>,
    core: Vec<usize>,
}

/// What [`Discovery::assemble`] turns into a [`DitStack`].
struct Assembly {
    /// The stream tensors the first block reads: X, then (MMDiT) E₀.
    entries: Vec<String>,
    stack_output: String,
    plans: Vec<BlockPlan>,
    final_core: Vec<usize>,
    latent: String,
    /// Graph inputs the text stream is computed from.
    text_inputs: Vec<String>,
    joint: Option<Joint>,
    notes: Vec<String>,
}

struct Discovery<'m> {
    flow: Flow<'m>,
    shapes: Shapes,
}

/// Region of each node during assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Embed,
    Block(usize),
    Final,
    Shared,
}

impl Place {
    fn source(self) -> Source {
        match self {
            Place::Embed => Source::Embed,
            Place::Block(i) => Source::Block(i),
            Place::Final => Source::FinalLayer,
            Place::Shared => Source::Shared,
        }
    }
}

impl<'m> Discovery<'m> {
    fn run(&self) -> Result<Structure, StructureError> {
        let flow = &self.flow;
        let adds = flow
            .order
            .iter()
            .filter(|&&id| matches!(flow.graph.node(id).op_type.as_str(), "Add" | "Sum"))
            .count();
        let residuals = self.find_residuals();
        if residuals.is_empty() {
            return Err(StructureError::NotADit(format!(
                "looked for residual connections (an Add of an activation x and a function of x \
                 computed through a weighted MatMul/Gemm/Conv, as in x + attention(norm(x))) and \
                 found none among the graph's {adds} Add nodes; a DiT's blocks are residual"
            )));
        }
        let chains = self.chains(&residuals);
        if let Some(joint) = self.joint_stack(&residuals, &chains)? {
            return Ok(Structure::Joint(joint));
        }
        let main = self.main_chain(&residuals, &chains).ok_or_else(|| {
            StructureError::NotADit(format!(
                "found {} residual adds, but no chain of them leads to the graph output",
                residuals.len()
            ))
        })?;
        self.single_stream(&residuals, &chains[main])
            .map(Structure::SingleStream)
    }

    /// Step 1: every residual add.
    fn find_residuals(&self) -> Vec<Residual> {
        let flow = &self.flow;
        let mut found = Vec::new();
        for p in 0..flow.len() {
            let node = flow.node(p);
            if !node.domain.is_empty() || !matches!(node.op_type.as_str(), "Add" | "Sum") {
                continue;
            }
            let mut operands: Vec<&String> = node
                .inputs
                .iter()
                .filter(|i| !i.is_empty() && flow.is_data(i))
                .collect();
            operands.dedup();
            if operands.len() != 2 {
                continue;
            }
            for (skip, branch) in [(operands[0], operands[1]), (operands[1], operands[0])] {
                let Some(branch_pos) = flow.producer(branch) else {
                    continue;
                };
                let skip_pos = flow.producer(skip).map_or(-1, |q| q as isize);
                if branch_pos as isize <= skip_pos {
                    continue;
                }
                // The branch is computed from the skip operand itself or, for a sub-layer that
                // reads the stream as it was before the previous one (SD3.5's second image
                // attention reads the block input's norm, as its first does), from the
                // previous residual add's skip operand.
                let previous = found.iter().rev().find(|r: &&Residual| r.out == *skip);
                let sources = std::iter::once(skip.clone()).chain(previous.map(|r| r.skip.clone()));
                let branch_region = sources
                    .map(|from| {
                        let from_pos = flow.producer(&from).map_or(-1, |q| q as isize);
                        self.between(&from, from_pos, branch_pos)
                    })
                    .find(|region| {
                        region.iter().any(|&q| {
                            let n = flow.node(q);
                            is_heavy(n)
                                && n.inputs.iter().any(|i| flow.kind(i) == ValueKind::Constant)
                        })
                    });
                if let Some(region) = branch_region {
                    found.push(Residual {
                        pos: p,
                        skip: skip.clone(),
                        out: node.outputs[0].clone(),
                        branch: region,
                    });
                    break;
                }
            }
        }
        found
    }

    /// Nodes on data paths from value `from` (produced at `from_pos`) to the node at `to`,
    /// `to` included; empty when there is no such path.
    fn between(&self, from: &str, from_pos: isize, to: usize) -> Vec<usize> {
        let flow = &self.flow;
        let mut back = HashSet::new();
        let mut stack = vec![to];
        while let Some(q) = stack.pop() {
            if q as isize > from_pos && back.insert(q) {
                stack.extend(flow.data_pred[q].iter().copied());
            }
        }
        let mut region = HashSet::new();
        let mut stack: Vec<usize> = flow
            .data_readers(from)
            .into_iter()
            .filter(|q| back.contains(q))
            .collect();
        while let Some(q) = stack.pop() {
            if region.insert(q) {
                stack.extend(
                    flow.data_succ[q]
                        .iter()
                        .filter(|s| back.contains(s))
                        .copied(),
                );
            }
        }
        let mut region: Vec<usize> = region.into_iter().collect();
        region.sort();
        region
    }

    /// Step 2: chains of residual adds, each a list of indices into `residuals`, in order.
    fn chains(&self, residuals: &[Residual]) -> Vec<Vec<usize>> {
        let flow = &self.flow;
        let by_output: HashMap<&str, usize> = residuals
            .iter()
            .enumerate()
            .map(|(i, r)| (r.out.as_str(), i))
            .collect();
        // The previous add of each: its skip operand is that add's output, directly or through a
        // Cast/Identity (exports sometimes cast the stream between blocks).
        let previous: Vec<Option<usize>> = residuals
            .iter()
            .map(|r| {
                if let Some(&i) = by_output.get(r.skip.as_str()) {
                    return Some(i);
                }
                let p = flow.producer(&r.skip)?;
                let node = flow.node(p);
                if matches!(node.op_type.as_str(), "Cast" | "Identity") {
                    by_output.get(node.inputs.first()?.as_str()).copied()
                } else {
                    None
                }
            })
            .collect();
        let mut next: Vec<Vec<usize>> = vec![Vec::new(); residuals.len()];
        for (i, p) in previous.iter().enumerate() {
            if let Some(p) = p {
                next[*p].push(i);
            }
        }
        let mut chains = Vec::new();
        for (start, before) in previous.iter().enumerate() {
            // A chain starts where the stream starts or forks.
            let starts = match *before {
                None => true,
                Some(p) => next[p].len() != 1,
            };
            if !starts {
                continue;
            }
            let mut chain = vec![start];
            let mut at = start;
            while next[at].len() == 1 {
                at = next[at][0];
                chain.push(at);
            }
            chains.push(chain);
        }
        chains
    }

    /// The longest chain that reaches an output; among equals, the one whose last add comes
    /// later. Longest, because a model may wrap the stack in one more residual (e.g.
    /// `latent + f(latent)` at the very end), which must not be taken for the stack.
    fn main_chain(&self, residuals: &[Residual], chains: &[Vec<usize>]) -> Option<usize> {
        let reaches = self.reaching_output();
        chains
            .iter()
            .enumerate()
            .filter_map(|(c, chain)| {
                chain
                    .iter()
                    .map(|&r| residuals[r].pos)
                    .filter(|&p| reaches[p])
                    .max()
                    .map(|p| ((chain.len(), p), c))
            })
            .max()
            .map(|(_, c)| c)
    }

    /// How many residual adds of chain `into` have a branch that reads, from outside the branch
    /// itself, data computed from the stream of chain `from` (as a joint attention reads the
    /// other stream's keys and values). Reads through the add's own skip operand do not count:
    /// everything after the first joint block descends from both streams.
    fn feeds(&self, residuals: &[Residual], from: &[usize], into: &[usize]) -> usize {
        let start = residuals[from[0]].skip.as_str();
        let downstream = self.flow.data_descendants(&[start]);
        into.iter()
            .filter(|&&r| self.reads_stream(&residuals[r], start, &downstream))
            .count()
    }

    /// The nodes with a data path to a result output.
    fn reaching_output(&self) -> Vec<bool> {
        let flow = &self.flow;
        let sinks: Vec<usize> = flow
            .result_outputs()
            .iter()
            .filter_map(|o| flow.producer(o))
            .collect();
        flow.data_ancestors(&sinks)
    }

    fn producer_list(&self, value: &str) -> Vec<usize> {
        self.flow.producer(value).into_iter().collect()
    }

    /// Among the graph inputs X is computed from, the latent: the one of highest rank.
    fn pick_latent(&self, candidates: &[String]) -> String {
        candidates
            .iter()
            .max_by_key(|name| {
                (
                    self.shapes.dims(name).map_or(0, |d| d.len()),
                    std::cmp::Reverse(candidates.iter().position(|c| c == *name)),
                )
            })
            .cloned()
            .unwrap_or_default()
    }

    fn stream_dims(&self, stream_input: &str, latent: &str) -> (Dim, Option<i64>, Option<i64>) {
        let batch = self
            .shapes
            .dims(latent)
            .and_then(|d| d.first().cloned())
            .unwrap_or(Dim::Unknown);
        let fixed = |d: Option<&Dim>| match d {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        };
        let dims = self.shapes.dims(stream_input);
        let tokens = dims.and_then(|d| fixed(d.get(1)));
        let hidden = dims.and_then(|d| fixed(d.get(2)));
        (batch, tokens, hidden)
    }

    /// Steps 3–5 for a single-stream model.
    fn single_stream(
        &self,
        residuals: &[Residual],
        chain: &[usize],
    ) -> Result<DitStack, StructureError> {
        let flow = &self.flow;
        let n = flow.len();
        let mut notes = Vec::new();
        // The stream tensors: X, then the input of every later sub-layer, then the last output.
        let mut stream: Vec<String> = chain.iter().map(|&r| residuals[r].skip.clone()).collect();
        stream.push(residuals[*chain.last().unwrap()].out.clone());
        let x = stream[0].clone();

        if let Some(dims) = self.shapes.dims(&x) {
            if dims.len() != 3 {
                let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
                return Err(StructureError::NotADit(format!(
                    "found a residual stack of {} sub-layers, but its stream '{x}' has shape [{}]; \
                     a DiT's hidden states are [batch, tokens, hidden]",
                    chain.len(),
                    shape.join(", ")
                )));
            }
        } else {
            notes.push(format!("the shape of the stack input '{x}' is unknown"));
        }

        // Step 3: the X → output subgraph and its cuts.
        let from_x = flow.data_descendants(&[&x]);
        let to_out = self.reaching_output();
        let core: Vec<bool> = (0..n).map(|p| from_x[p] && to_out[p]).collect();
        let cut_values = self.cut_values(&x, &core);
        for value in &stream[1..] {
            if !cut_values.contains(value) {
                return Err(StructureError::NotADit(format!(
                    "found a chain of {} residual adds from '{x}', but the residual stream at \
                     '{value}' is bypassed by another data path to the output (a long skip \
                     connection or a second stream), so it does not separate the blocks",
                    chain.len()
                )));
            }
        }

        // Step 4: sub-layers, in stream order.
        let bounds: Vec<isize> = stream
            .iter()
            .map(|v| flow.producer(v).map_or(-1, |p| p as isize))
            .collect();
        let sublayer_of = |p: usize| -> Option<usize> {
            // Sub-layer k holds the core nodes in (bounds[k], bounds[k+1]].
            let p = p as isize;
            (0..bounds.len() - 1).find(|&k| bounds[k] < p && p <= bounds[k + 1])
        };
        let k_count = stream.len() - 1;
        let mut sub_core: Vec<Vec<usize>> = vec![Vec::new(); k_count];
        let mut final_core = Vec::new();
        for p in (0..n).filter(|&p| core[p]) {
            match sublayer_of(p) {
                Some(k) => sub_core[k].push(p),
                None if p as isize > *bounds.last().unwrap() => final_core.push(p),
                None => {}
            }
        }
        let kinds: Vec<SublayerKind> = sub_core
            .iter()
            .map(|c| self.sublayer_kind(c, &core))
            .collect();
        let signatures: Vec<String> = sub_core.iter().map(|c| self.signature(c)).collect();
        let period = (1..=k_count)
            .find(|&p| {
                k_count.is_multiple_of(p)
                    && (0..k_count).all(|i| signatures[i] == signatures[i % p])
            })
            .unwrap_or(k_count);
        let groups: Vec<Vec<usize>> = if period < k_count || k_count == 1 {
            notes.push(format!(
                "{k_count} residual sub-layers repeat with period {period}: {} alike blocks",
                k_count / period
            ));
            (0..k_count / period)
                .map(|b| (b * period..(b + 1) * period).collect())
                .collect()
        } else {
            let starts: Vec<usize> = (0..k_count)
                .filter(|&k| kinds[k] == SublayerKind::SelfAttention)
                .collect();
            if starts.first() == Some(&0) && starts.len() >= 2 {
                notes.push(format!(
                    "the {k_count} residual sub-layers do not repeat exactly; blocks start at each \
                     self-attention sub-layer"
                ));
                starts
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| (s..starts.get(i + 1).copied().unwrap_or(k_count)).collect())
                    .collect()
            } else {
                notes.push(format!(
                    "the {k_count} residual sub-layers do not repeat; the stack is taken as one block"
                ));
                vec![(0..k_count).collect()]
            }
        };
        let attention_blocks = groups
            .iter()
            .filter(|g| g.iter().any(|&k| kinds[k] != SublayerKind::FeedForward))
            .count();
        if attention_blocks < groups.len() {
            return Err(StructureError::NotADit(format!(
                "found a residual stack of {k_count} sub-layers from '{x}', but {} of its {} \
                 blocks have no attention (a MatMul of two activations followed by Softmax); a \
                 residual stack without attention is not a transformer",
                groups.len() - attention_blocks,
                groups.len()
            )));
        }

        let plans: Vec<BlockPlan> = groups
            .iter()
            .map(|group| BlockPlan {
                input: stream[group[0]].clone(),
                output: stream[group.last().unwrap() + 1].clone(),
                text_input: None,
                text_output: None,
                kind: BlockKind::Stream,
                sublayers: group
                    .iter()
                    .map(|&k| Sublayer {
                        input: stream[k].clone(),
                        output: stream[k + 1].clone(),
                        kind: kinds[k],
                        core_nodes: sub_core[k].len(),
                    })
                    .collect(),
                core: group.iter().flat_map(|&k| sub_core[k].clone()).collect(),
            })
            .collect();
        let latent_candidates = flow.data_inputs_of(&flow.data_ancestors(&self.producer_list(&x)));
        let latent = if latent_candidates.is_empty() && flow.graph.is_input(&x) {
            x.clone()
        } else {
            self.pick_latent(&latent_candidates)
        };
        let stack_output = stream.last().unwrap().clone();
        Ok(self.assemble(Assembly {
            entries: vec![x],
            stack_output,
            plans,
            final_core,
            latent,
            text_inputs: Vec::new(),
            joint: None,
            notes,
        }))
    }

    /// Step 5 (regions) and the stack, for single-stream and joint stacks alike: the blocks'
    /// core nodes are placed; nodes before the entries are the embedding; every other node goes
    /// to the one region that reads all it makes, or is shared.
    fn assemble(&self, a: Assembly) -> DitStack {
        let flow = &self.flow;
        let n = flow.len();
        let Assembly {
            entries,
            stack_output,
            plans,
            final_core,
            latent,
            text_inputs,
            joint,
            mut notes,
        } = a;
        let x = entries[0].clone();
        let mut place: Vec<Option<Place>> = vec![None; n];
        for (b, plan) in plans.iter().enumerate() {
            for &p in &plan.core {
                place[p] = Some(Place::Block(b));
            }
        }
        for &p in &final_core {
            place[p] = Some(Place::Final);
        }
        let entry_producers: Vec<usize> = entries.iter().filter_map(|e| flow.producer(e)).collect();
        if !entry_producers.is_empty() {
            let before = flow.data_ancestors(&entry_producers);
            for p in 0..n {
                if before[p] && place[p].is_none() {
                    place[p] = Some(Place::Embed);
                }
            }
        }
        let graph_outputs: HashSet<&str> =
            flow.graph.outputs.iter().map(|o| o.name.as_str()).collect();
        for p in (0..n).rev() {
            if place[p].is_some() {
                continue;
            }
            // Readers come later in the order, so they are placed already.
            let mut target: Option<Place> = None;
            let mut private = true;
            for output in flow.node(p).outputs.iter().filter(|o| !o.is_empty()) {
                if graph_outputs.contains(output.as_str()) {
                    private = false;
                }
                for &r in flow.readers(output) {
                    match (place[r], target) {
                        (Some(Place::Shared) | None, _) => private = false,
                        (Some(t), None) => target = Some(t),
                        (Some(t), Some(u)) if t != u => private = false,
                        _ => {}
                    }
                }
            }
            place[p] = Some(match target {
                Some(t) if private => t,
                _ => Place::Shared,
            });
        }
        let place: Vec<Place> = place
            .into_iter()
            .map(|p| p.unwrap_or(Place::Shared))
            .collect();

        let bindings = self.bindings();
        let (batch, tokens, hidden) = self.stream_dims(&x, &latent);

        let mut blocks = Vec::new();
        for (b, plan) in plans.into_iter().enumerate() {
            let members: Vec<usize> = (0..n).filter(|&p| place[p] == Place::Block(b)).collect();
            let streams_in: Vec<&str> = std::iter::once(plan.input.as_str())
                .chain(plan.text_input.as_deref())
                .collect();
            let (side_inputs, parameters) = self.reads_from_outside(&members, &place, &streams_in);
            let defined = flow.outputs_of(&mask(n, &members));
            let mut escaping: Vec<String> = defined
                .iter()
                .filter(|v| **v != plan.output && Some(*v) != plan.text_output.as_ref())
                .filter(|v| {
                    graph_outputs.contains(v.as_str())
                        || flow.readers(v).iter().any(|&r| place[r] != Place::Block(b))
                })
                .cloned()
                .collect();
            escaping.sort();
            blocks.push(Block {
                index: b,
                input: plan.input,
                output: plan.output,
                kind: plan.kind,
                text_input: plan.text_input,
                text_output: plan.text_output,
                sublayers: plan.sublayers,
                nodes: members.iter().map(|&p| flow.order[p]).collect(),
                core_nodes: plan.core.len(),
                side_inputs,
                parameter_count: self.parameter_count(&parameters),
                parameters,
                flops: flops_of(
                    members.iter().map(|&p| flow.node(p)),
                    &self.shapes,
                    &bindings,
                ),
                escaping,
                label: self.label(&plan.core),
            });
        }
        for block in &blocks {
            if !block.escaping.is_empty() {
                notes.push(format!(
                    "block {} has values read outside it: {}",
                    block.index,
                    block.escaping.join(", ")
                ));
            }
        }
        let region = |which: Place| -> Region {
            let members: Vec<usize> = (0..n).filter(|&p| place[p] == which).collect();
            let reads: Vec<String> = members
                .iter()
                .flat_map(|&p| flow.reads[p].iter().cloned())
                .filter(|v| flow.kind(v) == ValueKind::Constant)
                .collect();
            Region {
                nodes: members.iter().map(|&p| flow.order[p]).collect(),
                parameter_count: self.parameter_count(&self.constant_sources(&reads)),
                flops: flops_of(
                    members.iter().map(|&p| flow.node(p)),
                    &self.shapes,
                    &bindings,
                ),
            }
        };
        let labels: Vec<Option<String>> = blocks.iter().map(|b| b.label.clone()).collect();
        let any_names = flow
            .order
            .iter()
            .any(|&id| name_hint(flow.graph.node(id)).is_some());
        let names_agree = if !any_names {
            None
        } else {
            let distinct: HashSet<&Option<String>> = labels.iter().collect();
            Some(labels.iter().all(|l| l.is_some()) && distinct.len() == labels.len())
        };
        match names_agree {
            Some(true) => notes.push(format!(
                "node names agree: blocks are labelled {} … {}",
                labels[0].as_deref().unwrap_or(""),
                labels.last().unwrap().as_deref().unwrap_or("")
            )),
            Some(false) => notes.push(
                "node names do not label the blocks one to one; the structure decided".into(),
            ),
            None => notes.push("the model carries no node names; found by structure alone".into()),
        }

        let mut stack_nodes = vec![false; n];
        for p in (0..n).filter(|&p| matches!(place[p], Place::Block(_))) {
            stack_nodes[p] = true;
        }
        let inputs = self.input_roles(latent, &stack_nodes, &text_inputs);
        let elem = self.shapes.elem(&x).unwrap_or(DataType::Float as i32);
        DitStack {
            stack_input: x,
            stack_output,
            batch,
            tokens,
            hidden,
            elem,
            inputs,
            sublayers_per_block: blocks[0].sublayers.len(),
            embed: region(Place::Embed),
            final_layer: region(Place::Final),
            shared: region(Place::Shared),
            blocks,
            names_agree,
            notes,
            joint,
        }
    }

    /// Values that are cuts of the X → output subgraph `core`: every data path from X to the
    /// output passes through them. With the core nodes in topological order, a node is a cut iff
    /// no edge jumps over its position (a difference array counts the jumps); its value is a cut
    /// iff it is the only value the node passes on.
    fn cut_values(&self, x: &str, core: &[bool]) -> HashSet<String> {
        let flow = &self.flow;
        let members: Vec<usize> = (0..flow.len()).filter(|&p| core[p]).collect();
        let m = members.len();
        // Index 0 is X's source, 1..=m the members, m+1 the output sink.
        let index: HashMap<usize, usize> = members
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, i + 1))
            .collect();
        let mut diff = vec![0i64; m + 3];
        let mut jump = |from: usize, to: usize| {
            if to > from + 1 {
                diff[from + 1] += 1;
                diff[to] -= 1;
            }
        };
        for &p in &members {
            for s in &flow.data_succ[p] {
                if let Some(&t) = index.get(s) {
                    jump(index[&p], t);
                }
            }
        }
        for r in flow.data_readers(x) {
            if let Some(&t) = index.get(&r) {
                jump(0, t);
            }
        }
        let results: HashSet<String> = flow.result_outputs().into_iter().collect();
        for &p in &members {
            if flow.node(p).outputs.iter().any(|o| results.contains(o)) {
                jump(index[&p], m + 1);
            }
        }
        let mut cuts = HashSet::new();
        let mut covered = 0i64;
        for (i, &p) in members.iter().enumerate() {
            covered += diff[i + 1];
            if covered != 0 {
                continue;
            }
            let passed: Vec<&String> = flow
                .node(p)
                .outputs
                .iter()
                .filter(|o| results.contains(*o) || flow.data_readers(o).iter().any(|r| core[*r]))
                .collect();
            if passed.len() == 1 {
                cuts.insert(passed[0].clone());
            }
        }
        cuts
    }

    /// Self-attention when a MatMul multiplies two activations both computed inside the
    /// sub-layer; cross-attention when one comes from outside; else feed-forward. Attention also
    /// needs a Softmax.
    fn sublayer_kind(&self, nodes: &[usize], core: &[bool]) -> SublayerKind {
        let flow = &self.flow;
        let inside: HashSet<usize> = nodes.iter().copied().collect();
        let softmax = nodes.iter().any(|&p| flow.node(p).op_type == "Softmax");
        let mut kind = SublayerKind::FeedForward;
        if !softmax {
            return kind;
        }
        for &p in nodes {
            let node = flow.node(p);
            if !matches!(node.op_type.as_str(), "MatMul" | "Einsum") || node.inputs.len() != 2 {
                continue;
            }
            if !node.inputs.iter().all(|i| flow.is_data(i)) {
                continue;
            }
            let local = node
                .inputs
                .iter()
                .filter(|i| {
                    flow.producer(i)
                        .is_some_and(|q| inside.contains(&q) && core[q])
                })
                .count();
            match local {
                2 => return SublayerKind::SelfAttention,
                1 => kind = SublayerKind::CrossAttention,
                _ => {}
            }
        }
        kind
    }

    /// What makes sub-layers alike: their op types and the weight shapes of their heavy
    /// operators, as a multiset (independent of names and of the order exporters emit).
    fn signature(&self, nodes: &[usize]) -> String {
        let flow = &self.flow;
        let mut items: Vec<String> = nodes
            .iter()
            .map(|&p| {
                let node = flow.node(p);
                if is_heavy(node) {
                    let weights: Vec<String> = node
                        .inputs
                        .iter()
                        .filter(|i| flow.kind(i) == ValueKind::Constant)
                        .map(|i| match self.shapes.dims(i) {
                            Some(d) => d
                                .iter()
                                .map(|x| x.to_string())
                                .collect::<Vec<_>>()
                                .join("x"),
                            None => "?".into(),
                        })
                        .collect();
                    format!("{}[{}]", node.op_type, weights.join(","))
                } else {
                    node.op_type.clone()
                }
            })
            .collect();
        items.sort();
        items.join(" ")
    }

    /// The side inputs and the constants a set of nodes reads from outside itself.
    fn reads_from_outside(
        &self,
        members: &[usize],
        place: &[Place],
        stream_inputs: &[&str],
    ) -> (Vec<SideInput>, Vec<String>) {
        let flow = &self.flow;
        let inside: HashSet<usize> = members.iter().copied().collect();
        let mut side: Vec<SideInput> = Vec::new();
        let mut constants: Vec<String> = Vec::new();
        for &p in members {
            for value in &flow.reads[p] {
                let producer = flow.producer(value);
                if producer.is_some_and(|q| inside.contains(&q)) {
                    if flow.kind(value) == ValueKind::Constant
                        && flow.node(producer.unwrap()).op_type == "Constant"
                    {
                        constants.push(value.clone());
                    }
                    continue;
                }
                match flow.kind(value) {
                    ValueKind::Constant => constants.push(value.clone()),
                    _ if stream_inputs.contains(&value.as_str()) => {}
                    kind => {
                        if side.iter().any(|s| s.name == *value) {
                            continue;
                        }
                        side.push(SideInput {
                            name: value.clone(),
                            kind,
                            source: producer.map_or(Source::ModelInput, |q| place[q].source()),
                        });
                    }
                }
            }
        }
        (side, self.constant_sources(&constants))
    }

    /// The constant tensors (initializers, `Constant` outputs) behind some constant values,
    /// following constant arithmetic back to its sources. Sorted, without repeats.
    fn constant_sources(&self, values: &[String]) -> Vec<String> {
        let flow = &self.flow;
        let mut found: Vec<String> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut stack: Vec<String> = values.to_vec();
        while let Some(value) = stack.pop() {
            if !seen.insert(value.clone()) {
                continue;
            }
            match flow.producer(&value) {
                None => {
                    if flow.graph.initializer(&value).is_some() {
                        found.push(value);
                    }
                }
                Some(q) => {
                    let node = flow.node(q);
                    if node.op_type == "Constant" {
                        found.push(value);
                    } else {
                        stack.extend(
                            flow.reads[q]
                                .iter()
                                .filter(|v| flow.kind(v) == ValueKind::Constant)
                                .cloned(),
                        );
                    }
                }
            }
        }
        found.sort();
        found
    }

    /// Elements of the floating-point tensors among `names` (initializers or Constant outputs).
    fn parameter_count(&self, names: &[String]) -> u64 {
        let flow = &self.flow;
        let is_float = |code: i32| {
            matches!(
                DataType::try_from(code),
                Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double)
            )
        };
        names
            .iter()
            .map(|name| {
                if let Some(t) = flow.graph.initializer(name) {
                    return if is_float(t.data_type.unwrap_or(0)) {
                        element_count(&t.dims)
                    } else {
                        0
                    };
                }
                match self.shapes.get(name) {
                    Some(s) if s.elem.is_some_and(is_float) => s
                        .dims
                        .as_ref()
                        .and_then(|d| {
                            d.iter().try_fold(1u64, |count, x| match x {
                                Dim::Fixed(n) => Some(count.saturating_mul((*n).max(0) as u64)),
                                _ => None,
                            })
                        })
                        .unwrap_or(0),
                    _ => 0,
                }
            })
            .fold(0, u64::saturating_add)
    }

    /// Symbol bindings for the cost model: the latent's batch symbol at 1 (FLOPs per sample).
    fn bindings(&self) -> HashMap<String, i64> {
        let mut bindings = HashMap::new();
        for input in &self.flow.graph.inputs {
            if let Some(Dim::Named(name)) = self
                .shapes
                .dims(&input.name)
                .and_then(|d| d.first().cloned())
            {
                bindings.insert(name, 1);
            }
        }
        bindings
    }

    /// The module name most of these nodes carry, if a majority carries one.
    fn label(&self, nodes: &[usize]) -> Option<String> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for &p in nodes {
            if let Some(hint) = name_hint(self.flow.node(p)) {
                *counts.entry(hint).or_default() += 1;
            }
        }
        let (label, count) = counts
            .into_iter()
            .max_by_key(|(l, c)| (*c, std::cmp::Reverse(l.clone())))?;
        (2 * count > nodes.len()).then_some(label)
    }

    /// Roles of the model inputs, given the latent and the nodes that make up the stack.
    fn input_roles(&self, latent: String, stack: &[bool], text_streams: &[String]) -> InputRoles {
        let flow = &self.flow;
        let mut roles = InputRoles {
            latent: latent.clone(),
            ..InputRoles::default()
        };
        for input in &flow.graph.inputs {
            let name = &input.name;
            if *name == latent || flow.kind(name) != ValueKind::Data {
                continue;
            }
            let downstream = flow.data_descendants(&[name]);
            let reached: Vec<&crate::ir::Node> = (0..flow.len())
                .filter(|&p| downstream[p])
                .map(|p| flow.node(p))
                .collect();
            let dims = self.shapes.dims(name);
            let rank = dims.map(|d| d.len());
            let elem = self.shapes.elem(name).unwrap_or(0);
            let is_int = matches!(
                DataType::try_from(elem),
                Ok(DataType::Int64 | DataType::Int32)
            );
            let sinusoidal = reached
                .iter()
                .any(|n| matches!(n.op_type.as_str(), "Sin" | "Cos"));
            let per_sample =
                dims.and_then(|d| d.first()) == self.shapes.dims(&latent).and_then(|d| d.first());
            if sinusoidal && rank.is_none_or(|r| r <= 1) {
                // Both embedded sinusoidally: the timestep is the first, unless only its name
                // says it is the guidance (the one tie-break names make).
                let named_guidance = name.to_ascii_lowercase().contains("guidance");
                if roles.timestep.is_none() && !named_guidance {
                    roles.timestep = Some(name.clone());
                } else {
                    roles.conditions.push(Condition {
                        input: name.clone(),
                        kind: ConditionKind::Guidance,
                    });
                }
                continue;
            }
            if sinusoidal && rank == Some(2) && !per_sample {
                roles.conditions.push(Condition {
                    input: name.clone(),
                    kind: ConditionKind::Positions,
                });
                continue;
            }
            let feeds_stack = (0..flow.len()).any(|p| downstream[p] && stack[p]);
            if !feeds_stack && !text_streams.contains(name) {
                roles.other.push(name.clone());
                continue;
            }
            let lookup = reached.iter().any(|n| {
                n.op_type == "Gather"
                    && n.inputs
                        .first()
                        .is_some_and(|d| flow.kind(d) == ValueKind::Constant)
            });
            let kind = if is_int && lookup {
                ConditionKind::ClassLabels
            } else if rank == Some(3) || text_streams.contains(name) {
                ConditionKind::Text
            } else if rank == Some(2) {
                ConditionKind::Pooled
            } else {
                ConditionKind::Other
            };
            roles.conditions.push(Condition {
                input: name.clone(),
                kind,
            });
        }
        roles
    }
}

fn mask(n: usize, members: &[usize]) -> Vec<bool> {
    let mut m = vec![false; n];
    for &p in members {
        m[p] = true;
    }
    m
}

/// The module a node belongs to according to its exporter: the dynamo exporter's
/// `pkg.torch.onnx.name_scopes` metadata (`['', 'transformer_blocks.0', ...]`), or a TorchScript
/// node name (`/transformer_blocks.0/attn1/to_q/MatMul`). Only ever used as a label.
pub fn name_hint(node: &crate::ir::Node) -> Option<String> {
    if let Some(scopes) = node.metadata_value("pkg.torch.onnx.name_scopes") {
        // The last entry is the node's own name; a module scope precedes it.
        let scopes: Vec<&str> = scopes
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"'))
            .filter(|s| !s.is_empty())
            .collect();
        if scopes.len() >= 2 {
            return Some(scopes[0].to_string());
        }
    }
    let segments: Vec<&str> = node.name.split('/').filter(|s| !s.is_empty()).collect();
    if node.name.starts_with('/') && segments.len() >= 2 {
        return Some(segments[0].to_string());
    }
    None
}
