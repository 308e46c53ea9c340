//! Peer caching policies as graph rewrites, so that FastCache can be measured against them on
//! equal terms: the same host contract (`fastcache` metadata, state input/output pairs, all-zero
//! state = first step), the same `fastcache.skipped` stats output, the same engines.
//!
//! Each policy keeps its published decision rule; only the mechanics (an `If` whose then-branch
//! reuses a cached residual) are shared with the block cache of [`crate::cache`]:
//!
//! - **First-Block-Cache** (FBCache): block 0 always runs. Its residual r₀ = H₁ − H₀ is compared
//!   with r₀ at the last fully computed step, `Σ|r₀ − r₀ref| / Σ|r₀ref| < threshold` → blocks
//!   1..L−1 are skipped together and H_L ≈ H₁ + (H_L − H₁)ref, the residual of blocks 1..L−1 at
//!   that step. One `If` around blocks 1..L−1.
//! - **TeaCache**: a cheap indicator computed before the stack's heavy work is compared with its
//!   value at the previous step (every step, computed or not); the relative L1 changes accumulate,
//!   and while the sum stays below the threshold the whole stack is skipped, H_L ≈ H₀ + (H_L − H₀)ref.
//!   When it reaches the threshold the stack runs and the sum restarts at 0. The published method
//!   rescales the change by a polynomial fitted per model; none is fitted here (identity), so the
//!   threshold is in units of raw relative L1 change. The indicator is block 0's timestep-
//!   modulated input by default (see [`Indicator`] for the measurement behind the choice). One
//!   `If` around the whole stack. The published method also computes the last step in full; a
//!   rewritten model is not told how many steps a run has, so here the last step follows the rule
//!   like any other.
//! - **Static interval** (FORA-style): the stack runs at every N-th step and is skipped in
//!   between, H_L ≈ H₀ + (H_L − H₀)ref. One `If` around the whole stack, driven by a counter of
//!   steps since the last full one.
//!
//! All three compute the first `warmup` steps (at least the first) in full, so zero state never
//! reads an empty cache. With threshold 0 (or interval 1) nothing is ever skipped and the model
//! computes exactly what the original does.

use std::collections::HashSet;

use serde_json::json;

use super::{
    BlockSpan, Carried, SKIPPED_OUTPUT, STEP_INPUT, add_skipped_output, add_step_counter,
    ensure_opset, insert_if, pair, region_nodes, state_dtype_name, stream_dtype,
};
use crate::analysis::{DitStack, Shapes, discover};
use crate::builder::{Builder, f32_as, from_f32, to_f32};
use crate::contract::{CONTRACT_VERSION, Contract, METADATA_KEY, StatePair};
use crate::error::{Error, Result};
use crate::ir::{AttrValue, Dim, Graph, Model, ValueInfo};
use crate::onnx::tensor_proto::DataType;
use crate::rewrite::stream_dims;

/// The stats output with the change statistic a decision was made on (FBCache: the relative L1
/// change of block 0's residual; TeaCache: the accumulated relative change), shape `[1]`, float32.
pub const CHANGE_OUTPUT: &str = "fastcache.change";

/// The skip decision of FastCache's schedule, a function of the step alone; its name is fixed so
/// that a host split can say which `If` it decides and what it decides at every step
/// ([`schedule_by_step`]), letting a host skip reading it.
pub const SCHEDULE_SKIP: &str = "fastcache.schedule_skip";

/// What TeaCache watches.
///
/// Measured on the trained MNIST DiT (50 Euler steps, CFG 3, 20 samples;
/// `scripts/indicator_study.py`): per step, the relative L1 change of each candidate against the
/// change of the stack's residual H_L − X, which is what a skip gets wrong.
///
/// | candidate | Pearson | Spearman | change per step (median, range) |
/// |---|---|---|---|
/// | stack input X | 0.17 | −0.20 | 0.9% (0.8–1.2%) |
/// | block 0's modulated input | 0.97 | 0.90 | 2.2% (1.6–17%) |
/// | block 0's residual (FBCache's) | 0.99 | 0.92 | 3.4% (1.8–23%) |
///
/// X moves by a near-constant 0.9% per step whatever the stack does, so it cannot tell quiet
/// steps from busy ones. The modulated input carries the timestep's scale and shift, tracks the
/// residual's change almost as well as block 0's own residual, and costs only a LayerNorm and
/// the adaLN projection of the conditioning, where the residual costs a whole block per step.
/// Hence [`Indicator::ModulatedInput`] by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    /// The input of block 0's first weighted projection: for adaLN DiTs the timestep-modulated
    /// normalised input LN(X)·(1 + scale) + shift, as TeaCache uses.
    ModulatedInput,
    /// The stack input X itself (block 0's input).
    StackInput,
}

impl Indicator {
    pub fn name(self) -> &'static str {
        match self {
            Indicator::ModulatedInput => "modulated_input",
            Indicator::StackInput => "stack_input",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum PeerPolicy {
    /// Skip blocks 1..L−1 while block 0's residual changes by less than `threshold` (relative L1)
    /// since the last full step.
    FirstBlock { threshold: f64 },
    /// Skip the stack while the accumulated relative L1 change of the indicator stays below
    /// `threshold`.
    TeaCache {
        threshold: f64,
        indicator: Indicator,
    },
    /// Run the stack every `interval` steps, reuse its residual in between.
    Interval { interval: i64 },
    /// FastCache's per-step policy: run the stack at the steps a calibrated schedule marks, and
    /// forecast its residual at the others from the last computed ones.
    Schedule(Schedule),
    /// FastCache's per-step policy with its statistical test: block 0 (the probe) runs every
    /// step, and the rest of the stack is forecast when the probe's own forecast was good enough.
    Probe(ProbeGate),
}

/// FastCache's hypothesis test, made meaningful (design/method.md §1): block 0 runs at every
/// step; its residual r = h₀ − X is forecast from the last two computed steps a > p by the same
/// linear extrapolation as the rest of the stack,
///
/// ```text
/// r̂ = r(a) + c·(r(a) − r(p)),   c = γ(s)·(s − a)/(a − p)
/// ε = ‖r − r̂‖² / ‖r‖²           (fp32, over the whole batch)
/// skip blocks 1..L−1 iff  not forced(s)  and  run < max_run  and  ε ≤ threshold(s)
/// then H_L = h₀ + R'(a) + c·(R'(a) − R'(p)),   R' = H_L − h₀
/// ```
///
/// Calibration sets threshold(s) = τ·σ(s), σ(s) the probe error's typical size at step s and τ
/// the α-quantile of ε/σ over the steps whose stack forecast was worse than the tolerance: α is
/// then the share of such bad steps the test lets through (its false-skip rate), which
/// calibration measures on held-out runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeGate {
    /// Per step: always compute (the protected first and last steps). Steps past the end
    /// compute too.
    pub forced: Vec<bool>,
    /// Per step: the largest probe error ε at which the step may skip.
    pub thresholds: Vec<f32>,
    /// Per step: the fitted step γ of the extrapolation (1 = the straight line).
    pub gamma: Vec<f32>,
    /// Most consecutive skipped steps.
    pub max_run: i64,
}

impl ProbeGate {
    pub fn check(&self) -> Result<()> {
        let steps = self.forced.len();
        if steps == 0 || self.thresholds.len() != steps || self.gamma.len() != steps {
            return Err(Error::Request(format!(
                "a probe gate needs one forced flag, threshold and γ per step; got {steps}, {} and {}",
                self.thresholds.len(),
                self.gamma.len()
            )));
        }
        if self.forced.len() < 2 || !self.forced[0] || !self.forced[1] {
            return Err(Error::Request(
                "a probe gate computes its first two steps (the forecast needs two snapshots)"
                    .into(),
            ));
        }
        if let Some(step) = (0..steps).find(|&s| {
            self.thresholds[s].is_nan() || self.thresholds[s] < 0.0 || !self.gamma[s].is_finite()
        }) {
            return Err(Error::Request(format!(
                "probe gate step {step}: threshold {} and γ {} must be a non-negative threshold and a finite γ",
                self.thresholds[step], self.gamma[step]
            )));
        }
        if self.max_run < 0 {
            return Err(Error::Request(format!(
                "a probe gate's max_run must be 0 or more, got {}",
                self.max_run
            )));
        }
        Ok(())
    }
}

/// A static compute schedule with a linear forecast of the skipped steps (design/method.md §1):
/// at a skipped step s the stack's residual is R̂(s) = Σ_k w_k(s)·R(τ_k), τ_1 > τ_2 > … the last
/// computed steps, most recent first. Reuse is the forecast with one snapshot and weight 1; a
/// Lagrange extrapolation in the step index, or weights fitted by least squares in calibration
/// (FastCache's learnable linear approximation, applied along time), take two or three.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Per step: run the stack. Steps past the end always run (a longer run than calibrated
    /// computes in full rather than read a forecast nobody checked).
    pub compute: Vec<bool>,
    /// Per step, the weights of the snapshots, most recent first; every row has the same length
    /// K (the number of snapshots kept). Rows of computed steps are not read.
    pub weights: Vec<Vec<f32>>,
}

impl Schedule {
    /// Snapshots kept.
    pub fn order(&self) -> usize {
        self.weights.first().map_or(1, Vec::len)
    }

    /// Steps skipped.
    pub fn skipped(&self) -> usize {
        self.compute.iter().filter(|&&c| !c).count()
    }

    /// The schedule's inconsistencies, named by step: a skip before any computed step, a weight
    /// on a snapshot that does not exist yet, rows of unequal length.
    pub fn check(&self) -> Result<()> {
        let k = self.order();
        if self.compute.is_empty() || self.weights.len() != self.compute.len() {
            return Err(Error::Request(format!(
                "a schedule needs one weight row per step; got {} steps and {} rows",
                self.compute.len(),
                self.weights.len()
            )));
        }
        if k == 0 || k > 3 {
            return Err(Error::Request(format!(
                "a schedule forecasts from 1 to 3 snapshots, got {k}"
            )));
        }
        let mut computed = 0;
        for (step, (&compute, row)) in self.compute.iter().zip(&self.weights).enumerate() {
            if row.len() != k || row.iter().any(|w| !w.is_finite()) {
                return Err(Error::Request(format!(
                    "schedule step {step}: expected {k} finite weights, got {row:?}"
                )));
            }
            if compute {
                computed += 1;
                continue;
            }
            if computed == 0 {
                return Err(Error::Request(format!(
                    "schedule step {step} is skipped before any step was computed"
                )));
            }
            if row.iter().skip(computed).any(|&w| w != 0.0) {
                return Err(Error::Request(format!(
                    "schedule step {step} weighs {k} snapshots but only {computed} exist by then: {row:?}"
                )));
            }
        }
        Ok(())
    }
}

impl PeerPolicy {
    pub fn name(&self) -> &'static str {
        match self {
            PeerPolicy::FirstBlock { .. } => "fbcache",
            PeerPolicy::TeaCache { .. } => "teacache",
            PeerPolicy::Interval { .. } => "interval",
            PeerPolicy::Schedule(_) | PeerPolicy::Probe(_) => "fastcache",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PeerOptions {
    pub policy: PeerPolicy,
    /// The first `warmup` steps run in full (the first step always does). The published rules
    /// compute only the first step before caching, so the default is 1.
    pub warmup: i64,
    /// The blocks the policy covers, first and last (all when `None`): on an MMDiT, e.g. the
    /// double blocks only. Where block `first` decides (fbcache, the probe test) it runs every
    /// step and the region is the rest. A region that ends before the text stream does carries
    /// the text stream's residual too.
    pub blocks: Option<(usize, usize)>,
}

impl PeerOptions {
    pub fn new(policy: PeerPolicy) -> PeerOptions {
        PeerOptions {
            policy,
            warmup: 1,
            blocks: None,
        }
    }
}

/// What the rewrite did.
#[derive(Clone, Debug)]
pub struct PeerSummary {
    pub total_blocks: usize,
    /// Blocks inside the `If` (skipped together).
    pub skippable: Vec<usize>,
    /// Nodes of those blocks that stayed outside the `If` because values they make are read after
    /// it (conditioning embeddings the final layer reuses, TeaCache's indicator).
    pub kept_outside: usize,
    /// The value TeaCache watches, if any.
    pub indicator: Option<String>,
    /// The step's decision, a bool [1]: true where the region is skipped.
    pub decision: String,
    pub warnings: Vec<String>,
}

fn state_name(what: &str) -> String {
    format!("fastcache.{what}")
}

/// Rewrites `model` with a peer policy: finds the DiT, checks the options, inserts the policy.
pub fn rewrite_with_peer(model: &mut Model, options: &PeerOptions) -> Result<PeerSummary> {
    crate::contract::refuse_rewritten(model)?;
    let structure = discover(model)?;
    let stack = structure.stack().clone();
    apply_peer(model, &stack, options)
}

/// Inserts the policy into `model`, whose structure is `stack`: its region goes into one `If`
/// whose then-branch forecasts the region's residual from the snapshots, and its decision is
/// made once per step.
pub fn apply_peer(
    model: &mut Model,
    stack: &DitStack,
    options: &PeerOptions,
) -> Result<PeerSummary> {
    apply_peer_carrying(model, stack, options, &[])
}

/// [`apply_peer`] on a region that also makes `carried` values read after it (the state of a
/// rewrite that went in first): the region's `If` outputs them, passing each one's `on_skip`
/// on at a skipped step.
pub fn apply_peer_carrying(
    model: &mut Model,
    stack: &DitStack,
    options: &PeerOptions,
    carried: &[Carried],
) -> Result<PeerSummary> {
    let total = stack.blocks.len();
    let warnings = check(options, total)?;
    let (region_first, last) = options.blocks.unwrap_or((0, total - 1));
    let warmup = options.warmup.max(1);
    // The region: blocks first..=last, without the block that decides where one does.
    let first = region_first + usize::from(options.policy.probes_block_0());
    let probe_input = stack.blocks[region_first].input.clone();
    let (dims, companions) = region_streams(model, stack, first, last)?;
    // TeaCache's indicator, found (and its shape inferred) on the model as it is before any edit.
    let indicator = match &options.policy {
        PeerPolicy::TeaCache { indicator, .. } => Some(indicator_value(
            model,
            stack,
            region_first,
            *indicator,
            &dims,
        )?),
        _ => None,
    };
    let graph = &mut model.graph;
    let mut state = vec![add_step_counter(graph)];

    let (input, output) = (&stack.blocks[first].input, &stack.blocks[last].output);
    let span = BlockSpan {
        input: input.clone(),
        output: output.clone(),
        nodes: region_nodes(
            graph,
            input,
            output,
            stack.blocks[first..=last]
                .iter()
                .flat_map(|b| b.nodes.iter().copied()),
        ),
        dims: dims.clone(),
        elem: stack.elem,
        companions,
    };
    let skippable: Vec<usize> = (first..=last).collect();

    // The snapshots a skip is made from, most recent first: the region's residual at the last
    // computed steps (one for reuse).
    let order = options.policy.order();
    let snapshot_names = |stream: &str| -> Vec<String> {
        (1..=order)
            .map(|k| match k {
                1 => state_name(&format!("cached_{stream}residual")),
                k => state_name(&format!("cached_{stream}residual_{k}")),
            })
            .collect()
    };
    let snapshots = snapshot_names("");
    // The snapshots in the stream's own type; the decision and the forecast compute in float32.
    for snapshot in &snapshots {
        push_state(graph, &mut state, snapshot, stream_dtype(span.elem), &dims);
    }
    // The companion streams' snapshots (MMDiT's text: `cached_text_residual`).
    let companion_snapshots: Vec<Vec<String>> = (0..span.companions.len())
        .map(|k| match k {
            0 => snapshot_names("text_"),
            k => snapshot_names(&format!("stream_{}_", k + 1)),
        })
        .collect();
    for (names, c) in companion_snapshots.iter().zip(&span.companions) {
        for snapshot in names {
            push_state(graph, &mut state, snapshot, stream_dtype(c.elem), &c.dims);
        }
    }
    let mut b = Builder::new(graph, "fastcache.");
    let warm = b.init_i64("warmup", &[1], &[warmup]);
    let warmed = b.op("GreaterOrEqual", &[STEP_INPUT, &warm], vec![]);
    let span_in32 = b.op(
        "Cast",
        &[&span.input],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );

    let decision = match &options.policy {
        PeerPolicy::FirstBlock { threshold } => first_block_decision(
            &mut b,
            &mut state,
            &probe_input,
            &span_in32,
            *threshold,
            &warmed,
            &dims,
        ),
        PeerPolicy::TeaCache { threshold, .. } => {
            let (value, value_dims) = indicator.as_ref().expect("found above");
            teacache_decision(&mut b, &mut state, value, value_dims, *threshold, &warmed)
        }
        PeerPolicy::Interval { interval } => {
            interval_decision(&mut b, &mut state, *interval, &warmed)
        }
        PeerPolicy::Schedule(schedule) => schedule_decision(&mut b, schedule, &warmed),
        PeerPolicy::Probe(gate) => probe_decision(
            &mut b,
            &mut state,
            gate,
            &probe_input,
            &span_in32,
            &dims,
            &warmed,
        ),
    };

    let block_type = ValueInfo::tensor(&span.output, span.elem, dims.clone());
    let mut streams = vec![(span.input.clone(), snapshots.clone(), block_type.clone())];
    for (c, names) in span.companions.iter().zip(&companion_snapshots) {
        let output = ValueInfo::tensor(&c.output, c.elem, c.dims.clone());
        streams.push((c.input.clone(), names.clone(), output));
    }
    let approx = forecast_body(&streams, decision.weights.as_deref());
    let kept_outside = insert_if(
        graph,
        &span,
        &decision.cond,
        approx,
        "stack",
        &format!("blocks {first}..{last}"),
        &block_type,
        carried,
    )?;
    shift_snapshots(
        graph,
        &decision.cond,
        &span.input,
        &span.output,
        Some(&span_in32),
        &snapshots,
        span.elem,
    );
    for (c, names) in span.companions.iter().zip(&companion_snapshots) {
        shift_snapshots(
            graph,
            &decision.cond,
            &c.input,
            &c.output,
            None,
            names,
            c.elem,
        );
    }
    let stats = add_stats(graph, &decision, &skippable, total);
    // State outputs in the order of their pairs.
    for pair in &state[1..] {
        let (dtype, dims) = match pair.dtype.as_str() {
            "int64" => (DataType::Int64, vec![Dim::Fixed(1)]),
            "float16" => (DataType::Float16, contract_dims(pair)),
            "bfloat16" => (DataType::Bfloat16, contract_dims(pair)),
            _ => (DataType::Float, contract_dims(pair)),
        };
        graph
            .outputs
            .push(ValueInfo::tensor(&pair.output, dtype as i32, dims));
    }

    let indicator_name = indicator.map(|(value, _)| value);
    let contract = Contract {
        version: CONTRACT_VERSION,
        state,
        stats,
        policy: policy_record(&options.policy, warmup, &skippable, &indicator_name, order),
    };
    model.set_metadata(METADATA_KEY, contract.to_json());
    ensure_opset(model, 17)?;
    crate::ir::verify_model(model)?;
    Ok(PeerSummary {
        total_blocks: total,
        skippable,
        kept_outside,
        indicator: indicator_name,
        decision: decision.cond,
        warnings,
    })
}

impl PeerPolicy {
    /// Block 0 runs every step and decides for the rest.
    fn probes_block_0(&self) -> bool {
        matches!(self, PeerPolicy::FirstBlock { .. } | PeerPolicy::Probe(_))
    }

    /// Snapshots of the region's residual a skip is made from.
    fn order(&self) -> usize {
        match self {
            PeerPolicy::Schedule(schedule) => schedule.order(),
            PeerPolicy::Probe(_) => 2,
            _ => 1,
        }
    }
}

/// The options' errors, named by flag, and the warnings of settings that never skip.
fn check(options: &PeerOptions, total: usize) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    if options.warmup < 0 {
        return Err(Error::Request(format!(
            "--warmup must be 0 or more, got {}",
            options.warmup
        )));
    }
    match &options.policy {
        PeerPolicy::FirstBlock { threshold } | PeerPolicy::TeaCache { threshold, .. } => {
            if !(threshold.is_finite() && *threshold >= 0.0) {
                return Err(Error::Request(format!(
                    "--threshold must be a finite number, 0 or more, got {threshold}"
                )));
            }
            if *threshold == 0.0 {
                warnings.push("--threshold 0: the change is never below it, so nothing is ever skipped; the model computes exactly what the original does".into());
            }
        }
        PeerPolicy::Interval { interval } => {
            if *interval < 1 {
                return Err(Error::Request(format!(
                    "--interval must be at least 1, got {interval}"
                )));
            }
            if *interval == 1 {
                warnings.push("--interval 1: every step is computed, nothing is ever skipped; the model computes exactly what the original does".into());
            }
        }
        PeerPolicy::Schedule(schedule) => {
            schedule.check()?;
            if schedule.skipped() == 0 {
                warnings.push("the schedule computes every step, nothing is ever skipped; the model computes exactly what the original does".into());
            }
        }
        PeerPolicy::Probe(gate) => {
            gate.check()?;
            if gate.max_run == 0 || gate.forced.iter().all(|&f| f) {
                warnings.push("the probe gate forces every step or allows no skip, nothing is ever skipped; the model computes exactly what the original does".into());
            }
        }
    }
    if let Some((first, last)) = options.blocks {
        if first > last || last >= total {
            return Err(Error::Request(format!(
                "--blocks {first}-{last}: the region must run from a block to the same or a later one among the model's {total} (0 to {})",
                total.saturating_sub(1)
            )));
        }
        if options.policy.probes_block_0() && first == last {
            return Err(Error::Request(format!(
                "--blocks {first}-{last}: block {first} decides for the rest of the region, which must hold another block"
            )));
        }
    }
    if options.policy.probes_block_0() && total < 2 {
        return Err(Error::Unsupported(format!(
            "{} needs at least 2 blocks (block 0 decides for the rest); this model has {total}",
            match options.policy {
                PeerPolicy::Probe(_) => "FastCache's probe test",
                _ => "First-Block-Cache",
            }
        )));
    }
    Ok(warnings)
}

/// TeaCache's indicator and its dims.
fn indicator_value(
    model: &Model,
    stack: &DitStack,
    block: usize,
    indicator: Indicator,
    dims: &[Dim],
) -> Result<(String, Vec<Dim>)> {
    Ok(match indicator {
        Indicator::StackInput => (stack.blocks[block].input.clone(), dims.to_vec()),
        Indicator::ModulatedInput => {
            let value = modulated_input_of(&model.graph, &stack.blocks[block])?;
            let value_dims = resolved_dims(&Shapes::infer(model), &value, &stack.batch)?;
            (value, value_dims)
        }
    })
}

/// A policy's decision: skip this step (`cond`), the change statistic it reports, and the
/// forecast weights of the snapshots (`None`: reuse the newest).
struct Decision {
    cond: String,
    change: Option<String>,
    weights: Option<Vec<String>>,
}

/// First-Block-Cache: block 0 runs as before; its residual's relative L1 change since the last
/// computed step decides.
fn first_block_decision(
    b: &mut Builder,
    state: &mut Vec<StatePair>,
    h0: &str,
    h1_32: &str,
    threshold: f64,
    warmed: &str,
    dims: &[Dim],
) -> Decision {
    let h0 = b.op(
        "Cast",
        &[h0],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );
    let residual = b.op("Sub", &[h1_32, &h0], vec![]);
    let reference = state_name("first_residual");
    let rel = relative_l1(b, &residual, &reference);
    let thr = b.init_f32("threshold", &[], &[threshold as f32]);
    let quiet = b.op("Less", &[&rel, &thr], vec![]);
    let cond = b.op("And", &[warmed, &quiet], vec![]);
    let next = format!("{reference}.next");
    b.op_into("Where", &[&cond, &reference, &residual], vec![], &next);
    push_state(b.graph, state, &reference, DataType::Float, dims);
    Decision {
        cond,
        change: Some(rel),
        weights: None,
    }
}

/// TeaCache: the indicator's relative L1 change since the previous step (computed or not)
/// accumulates; the stack is skipped while the sum stays below the threshold.
fn teacache_decision(
    b: &mut Builder,
    state: &mut Vec<StatePair>,
    value: &str,
    value_dims: &[Dim],
    threshold: f64,
    warmed: &str,
) -> Decision {
    let current = b.op(
        "Cast",
        &[value],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );
    let previous = state_name("previous_indicator");
    let rel = relative_l1(b, &current, &previous);
    let accumulated = state_name("accumulated");
    let sum = b.op("Add", &[&accumulated, &rel], vec![]);
    let thr = b.init_f32("threshold", &[], &[threshold as f32]);
    let quiet = b.op("Less", &[&sum, &thr], vec![]);
    let cond = b.op("And", &[warmed, &quiet], vec![]);
    // The previous indicator is always the last step's, computed or skipped.
    b.op_into("Identity", &[&current], vec![], &format!("{previous}.next"));
    let zero = b.init_f32("zero", &[1], &[0.0]);
    b.op_into(
        "Where",
        &[&cond, &sum, &zero],
        vec![],
        &format!("{accumulated}.next"),
    );
    push_state(b.graph, state, &previous, DataType::Float, value_dims);
    push_state(
        b.graph,
        state,
        &accumulated,
        DataType::Float,
        &[Dim::Fixed(1)],
    );
    Decision {
        cond,
        change: Some(sum),
        weights: None,
    }
}

/// Static interval: a counter of steps since the last computed one.
fn interval_decision(
    b: &mut Builder,
    state: &mut Vec<StatePair>,
    interval: i64,
    warmed: &str,
) -> Decision {
    let since = state_name("since_full");
    let limit = b.init_i64("interval_minus_one", &[1], &[interval - 1]);
    let inside = b.op("Less", &[&since, &limit], vec![]);
    let cond = b.op("And", &[warmed, &inside], vec![]);
    let one = b.init_i64("one_i", &[1], &[1]);
    let zero = b.init_i64("zero_i", &[1], &[0]);
    let plus = b.op("Add", &[&since, &one], vec![]);
    b.op_into(
        "Where",
        &[&cond, &plus, &zero],
        vec![],
        &format!("{since}.next"),
    );
    push_state(b.graph, state, &since, DataType::Int64, &[Dim::Fixed(1)]);
    Decision {
        cond,
        change: None,
        weights: None,
    }
}

/// FastCache's schedule: the skip flag and the forecast weights are rows of tables indexed by
/// the step, with a last row (compute, no weights) that every later step reads.
fn schedule_decision(b: &mut Builder, schedule: &Schedule, warmed: &str) -> Decision {
    let steps = schedule.compute.len() as i64;
    let last = b.init_i64("last_row", &[1], &[steps]);
    let row = b.op("Min", &[STEP_INPUT, &last], vec![]);
    let skips: Vec<i64> = schedule
        .compute
        .iter()
        .map(|&compute| i64::from(!compute))
        .chain([0])
        .collect();
    let table = b.init_i64("skip_schedule", &[steps + 1], &skips);
    let skip = b.op("Gather", &[&table, &row], vec![("axis", AttrValue::Int(0))]);
    let skip = b.op(
        "Cast",
        &[&skip],
        vec![("to", AttrValue::Int(DataType::Bool as i64))],
    );
    b.op_into("And", &[warmed, &skip], vec![], SCHEDULE_SKIP);
    let cond = SCHEDULE_SKIP.to_string();
    let weights = (0..schedule.order())
        .map(|k| {
            let column: Vec<f32> = schedule
                .weights
                .iter()
                .map(|row| row[k])
                .chain([0.0])
                .collect();
            let table = b.init_f32(&format!("forecast_weight_{}", k + 1), &[steps + 1], &column);
            b.op("Gather", &[&table, &row], vec![("axis", AttrValue::Int(0))])
        })
        .collect();
    Decision {
        cond,
        change: None,
        weights: Some(weights),
    }
}

/// What [`SCHEDULE_SKIP`] is at every call of a run, read back from the tables
/// `schedule_decision` wrote: entry k is call k (the step counter's value), and the last entry
/// is every later call. `None` when `model` has no schedule.
pub fn schedule_by_step(model: &Model) -> Option<Vec<bool>> {
    let graph = &model.graph;
    // The inputs of the node making `value`; `schedule_decision` built the chain
    // And(GreaterOrEqual(step, warmup), Cast(Gather(table, Min(step, last)))).
    let inputs = |value: &str| Some(graph.node(graph.producer(value)?).inputs.clone());
    let [warmed, skip]: [String; 2] = inputs(SCHEDULE_SKIP)?.try_into().ok()?;
    let warmup_name = inputs(&warmed)?.get(1)?.clone();
    let gathered = inputs(&skip)?.first()?.clone();
    let table_name = inputs(&gathered)?.first()?.clone();
    let ints = |name: &str| crate::analysis::int_values(graph.initializer(name)?, &model.external);
    let skips = ints(&table_name)?;
    let warmup = *ints(&warmup_name)?.first()?;
    Some(
        skips
            .iter()
            .enumerate()
            .map(|(k, &skip)| k as i64 >= warmup && skip != 0)
            .collect(),
    )
}

/// A computed step shifts a stream's snapshots by one, its fresh residual first (never an
/// approximated value: the reference is always computed); a skipped step keeps them.
/// `input32`: the stream input already cast to fp32, where the caller has it.
fn shift_snapshots(
    graph: &mut Graph,
    cond: &str,
    input: &str,
    output: &str,
    input32: Option<&str>,
    snapshots: &[String],
    elem: i32,
) {
    let mut b = Builder::new(graph, "fastcache.");
    let to_float = || vec![("to", AttrValue::Int(DataType::Float as i64))];
    let out32 = b.op("Cast", &[output], to_float());
    let in32 = match input32 {
        Some(value) => value.to_string(),
        None => b.op("Cast", &[input], to_float()),
    };
    let fresh = b.op("Sub", &[&out32, &in32], vec![]);
    let fresh = f32_as(&mut b, &fresh, elem);
    for (k, snapshot) in snapshots.iter().enumerate() {
        let newer = if k == 0 { &fresh } else { &snapshots[k - 1] };
        b.op_into(
            "Where",
            &[cond, snapshot, newer],
            vec![],
            &format!("{snapshot}.next"),
        );
    }
}

/// The stats outputs: one flag per block (1.0 = skipped this step), as the block cache reports
/// them, and the change statistic where the decision has one. Returns their names.
fn add_stats(
    graph: &mut Graph,
    decision: &Decision,
    skippable: &[usize],
    total: usize,
) -> Vec<String> {
    let mut b = Builder::new(graph, "fastcache.");
    let flag = b.op(
        "Cast",
        &[&decision.cond],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );
    let never = (skippable.len() < total).then(|| b.init_f32("never_skipped", &[1], &[0.0]));
    let flags: Vec<&str> = (0..total)
        .map(|i| match &never {
            Some(never) if !skippable.contains(&i) => never.as_str(),
            _ => flag.as_str(),
        })
        .collect();
    add_skipped_output(graph, &flags);
    let mut stats = vec![SKIPPED_OUTPUT.to_string()];
    if let Some(change) = &decision.change {
        let mut b = Builder::new(graph, "fastcache.");
        let shape = b.init_i64("change_shape", &[1], &[1]);
        b.op_into("Reshape", &[change, &shape], vec![], CHANGE_OUTPUT);
        graph.outputs.push(ValueInfo::tensor(
            CHANGE_OUTPUT,
            DataType::Float as i32,
            vec![Dim::Fixed(1)],
        ));
        stats.push(CHANGE_OUTPUT.into());
    }
    stats
}

/// The contract's description of the policy: its parameters and its rule in words.
fn policy_record(
    policy: &PeerPolicy,
    warmup: i64,
    skippable: &[usize],
    indicator_name: &Option<String>,
    order: usize,
) -> serde_json::Value {
    let mut record = json!({
        "name": policy.name(),
        "warmup": warmup,
        "skippable_blocks": skippable,
    });
    match policy {
        PeerPolicy::FirstBlock { threshold } => {
            record["threshold"] = json!(threshold);
            record["rule"] = json!(
                "skip blocks 1..L-1 when sum|r0 - r0_ref| / sum|r0_ref| < threshold, r0 = block 0's residual, ref = last full step; then H_L = H_1 + (H_L - H_1)_ref"
            );
        }
        PeerPolicy::TeaCache {
            threshold,
            indicator,
        } => {
            record["threshold"] = json!(threshold);
            record["indicator"] = json!(indicator.name());
            record["indicator_value"] = json!(indicator_name);
            record["rescale"] = json!("identity");
            record["rule"] = json!(
                "acc += sum|I - I_prev| / sum|I_prev| every step; skip the stack while acc < threshold, else run it and set acc = 0; then H_L = H_0 + (H_L - H_0)_ref"
            );
        }
        PeerPolicy::Interval { interval } => {
            record["interval"] = json!(interval);
            record["rule"] = json!(
                "run the stack when the steps since the last full one reach interval - 1, else H_L = H_0 + (H_L - H_0)_ref"
            );
        }
        PeerPolicy::Probe(gate) => {
            let forced: Vec<usize> = (0..gate.forced.len()).filter(|&s| gate.forced[s]).collect();
            record["decision"] = json!("probe");
            record["steps"] = json!(gate.forced.len());
            record["forced_steps"] = json!(forced);
            record["max_run"] = json!(gate.max_run);
            record["thresholds"] = json!(gate.thresholds);
            record["gamma"] = json!(gate.gamma);
            record["order"] = json!(order);
            record["rule"] = json!(
                "block 0 runs every step; r = h0 - H_0, c = gamma(s) (s - a) / (a - p), a > p the last two computed steps; eps = |r - r(a) - c (r(a) - r(p))|^2 / |r|^2; skip blocks 1..L-1 iff not forced(s), run < max_run and eps <= threshold(s); then H_L = h0 + R(a) + c (R(a) - R(p)), R = H_L - h0"
            );
        }
        PeerPolicy::Schedule(schedule) => {
            let computed: Vec<usize> = (0..schedule.compute.len())
                .filter(|&s| schedule.compute[s])
                .collect();
            record["decision"] = json!("schedule");
            record["steps"] = json!(schedule.compute.len());
            record["computed_steps"] = json!(computed);
            record["order"] = json!(order);
            record["weights"] = json!(schedule.weights);
            record["rule"] = json!(
                "run the stack at the computed steps (and every step past the schedule's end); at step s otherwise H_L = H_0 + sum_k w_k(s) R_k, R_k = (H_L - H_0) at the k-th last computed step"
            );
        }
    }
    record
}

/// The probe test of [`ProbeGate`]: the skip condition, the probe error ε, and the forecast
/// weights [1 + c, −c] of the two snapshots. Adds the probe's own state (its residual at the last
/// two computed steps, those steps, the current skip run) and its updates.
fn probe_decision(
    b: &mut Builder,
    state: &mut Vec<StatePair>,
    gate: &ProbeGate,
    probe_input: &str,
    probe_out32: &str,
    dims: &[Dim],
    warmed: &str,
) -> Decision {
    let steps = gate.forced.len() as i64;
    let last = b.init_i64("last_row", &[1], &[steps]);
    let row = b.op("Min", &[STEP_INPUT, &last], vec![]);
    let gather = |b: &mut Builder, table: &str| {
        b.op("Gather", &[table, &row], vec![("axis", AttrValue::Int(0))])
    };
    // Per-step tables with one more row, read by every step past the end: forced, no skip.
    let allowed: Vec<i64> = gate
        .forced
        .iter()
        .map(|&f| i64::from(!f))
        .chain([0])
        .collect();
    let allowed = b.init_i64("skip_allowed", &[steps + 1], &allowed);
    let allowed = gather(b, &allowed);
    let allowed = b.op(
        "Cast",
        &[&allowed],
        vec![("to", AttrValue::Int(DataType::Bool as i64))],
    );
    let thresholds: Vec<f32> = gate.thresholds.iter().copied().chain([0.0]).collect();
    let thresholds = b.init_f32("probe_threshold", &[steps + 1], &thresholds);
    let threshold = gather(b, &thresholds);
    let gamma: Vec<f32> = gate.gamma.iter().copied().chain([1.0]).collect();
    let gamma = b.init_f32("forecast_gamma", &[steps + 1], &gamma);
    let gamma = gather(b, &gamma);

    // c = γ·(s − a)/(a − p) from the steps of the two snapshots.
    let one_dims = vec![Dim::Fixed(1)];
    let (newest, older) = (state_name("snapshot_step"), state_name("snapshot_step_2"));
    let run = state_name("skip_run");
    for name in [&newest, &older, &run] {
        push_state(b.graph, state, name, DataType::Int64, &one_dims);
    }
    let float = |b: &mut Builder, x: &str| {
        b.op(
            "Cast",
            &[x],
            vec![("to", AttrValue::Int(DataType::Float as i64))],
        )
    };
    let (s, a, p) = (float(b, STEP_INPUT), float(b, &newest), float(b, &older));
    let ahead = b.op("Sub", &[&s, &a], vec![]);
    let gap = b.op("Sub", &[&a, &p], vec![]);
    let one = b.init_f32("one_f", &[1], &[1.0]);
    let gap = b.op("Max", &[&gap, &one], vec![]);
    let ratio = b.op("Div", &[&ahead, &gap], vec![]);
    let c = b.op("Mul", &[&gamma, &ratio], vec![]);
    let w1 = b.op("Add", &[&one, &c], vec![]);
    let w2 = b.op("Neg", &[&c], vec![]);

    // ε: the probe residual against its forecast.
    let x32 = b.op(
        "Cast",
        &[probe_input],
        vec![("to", AttrValue::Int(DataType::Float as i64))],
    );
    let residual = b.op("Sub", &[probe_out32, &x32], vec![]);
    let snapshots = [state_name("probe_residual"), state_name("probe_residual_2")];
    for snapshot in &snapshots {
        push_state(b.graph, state, snapshot, DataType::Float, dims);
    }
    let step_back = b.op("Sub", &[&snapshots[0], &snapshots[1]], vec![]);
    let step_back = b.op("Mul", &[&c, &step_back], vec![]);
    let forecast = b.op("Add", &[&snapshots[0], &step_back], vec![]);
    let miss = b.op("Sub", &[&residual, &forecast], vec![]);
    let keep = vec![("keepdims", AttrValue::Int(0))];
    let num = b.op("ReduceSumSquare", &[&miss], keep.clone());
    let den = b.op("ReduceSumSquare", &[&residual], keep);
    let tiny = b.init_f32("tiny", &[], &[1e-30]);
    let den = b.op("Max", &[&den, &tiny], vec![]);
    let epsilon = b.op("Div", &[&num, &den], vec![]);

    let good = b.op("LessOrEqual", &[&epsilon, &threshold], vec![]);
    let cap = b.init_i64("max_run", &[1], &[gate.max_run]);
    let under_cap = b.op("Less", &[&run, &cap], vec![]);
    let cond = b.op("And", &[warmed, &allowed], vec![]);
    let cond = b.op("And", &[&cond, &under_cap], vec![]);
    let cond = b.op("And", &[&cond, &good], vec![]);

    // A computed step becomes the newest snapshot; a skipped one extends the run.
    let next = |name: &str| format!("{name}.next");
    b.op_into(
        "Where",
        &[&cond, &snapshots[0], &residual],
        vec![],
        &next(&snapshots[0]),
    );
    b.op_into(
        "Where",
        &[&cond, &snapshots[1], &snapshots[0]],
        vec![],
        &next(&snapshots[1]),
    );
    b.op_into(
        "Where",
        &[&cond, &newest, STEP_INPUT],
        vec![],
        &next(&newest),
    );
    b.op_into("Where", &[&cond, &older, &newest], vec![], &next(&older));
    let one_i = b.init_i64("one_i", &[1], &[1]);
    let zero_i = b.init_i64("zero_i", &[1], &[0]);
    let longer = b.op("Add", &[&run, &one_i], vec![]);
    b.op_into("Where", &[&cond, &longer, &zero_i], vec![], &next(&run));
    Decision {
        cond,
        change: Some(epsilon),
        weights: Some(vec![w1, w2]),
    }
}

/// Declares a state input and its contract pair (the output is declared at the end, in order).
fn push_state(
    graph: &mut Graph,
    state: &mut Vec<StatePair>,
    input: &str,
    dtype: DataType,
    dims: &[Dim],
) {
    graph
        .inputs
        .push(ValueInfo::tensor(input, dtype as i32, dims.to_vec()));
    state.push(pair(
        input,
        &format!("{input}.next"),
        state_dtype_name(dtype),
        dims,
    ));
}

fn contract_dims(pair: &StatePair) -> Vec<Dim> {
    use crate::contract::ShapeDim;
    pair.shape
        .iter()
        .map(|d| match d {
            ShapeDim::Fixed(n) => Dim::Fixed(*n),
            ShapeDim::Named(s) => Dim::Named(s.clone()),
        })
        .collect()
}

/// Σ|x − reference| / max(Σ|reference|, tiny), a scalar: the relative L1 change both FBCache and
/// TeaCache decide on (mean over mean, as published; the element counts cancel).
fn relative_l1(b: &mut Builder, x: &str, reference: &str) -> String {
    let diff = b.op("Sub", &[x, reference], vec![]);
    let abs = b.op("Abs", &[&diff], vec![]);
    let num = b.op("ReduceSum", &[&abs], vec![("keepdims", AttrValue::Int(0))]);
    let ref_abs = b.op("Abs", &[reference], vec![]);
    let den = b.op(
        "ReduceSum",
        &[&ref_abs],
        vec![("keepdims", AttrValue::Int(0))],
    );
    // An all-zero reference (the first step) gives a huge change, never a skip.
    let tiny = b.init_f32("tiny", &[], &[1e-30]);
    let den = b.op("Max", &[&den, &tiny], vec![]);
    b.op("Div", &[&num, &den], vec![])
}

/// The then-branch: for each stream (the region's, then its companions), its input + the
/// forecast Σ_k w_k·R_k of its residual from its own snapshots (reuse: R_1 alone), under the
/// output type given.
fn forecast_body(
    streams: &[(String, Vec<String>, ValueInfo)],
    weights: Option<&[String]>,
) -> Graph {
    let mut body = Graph::new("fastcache_stack_skip");
    for (k, (input, snapshots, output_type)) in streams.iter().enumerate() {
        let out = match k {
            0 => "fastcache.stack.skip.out".to_string(),
            k => format!("fastcache.stack.skip.stream_{}", k + 1),
        };
        {
            let mut b = Builder::new(&mut body, "fastcache.stack.skip.");
            let h32 = b.op(
                "Cast",
                &[input],
                vec![("to", AttrValue::Int(DataType::Float as i64))],
            );
            let elem = output_type.elem_type().unwrap_or(DataType::Float as i32);
            let snapshots: Vec<String> =
                snapshots.iter().map(|s| to_f32(&mut b, s, elem)).collect();
            let residual = match weights {
                None => snapshots[0].clone(),
                Some(weights) => {
                    let mut sum = b.op("Mul", &[&weights[0], &snapshots[0]], vec![]);
                    for (w, snapshot) in weights.iter().zip(&snapshots).skip(1) {
                        let term = b.op("Mul", &[w, snapshot], vec![]);
                        sum = b.op("Add", &[&sum, &term], vec![]);
                    }
                    sum
                }
            };
            let estimate = b.op("Add", &[&h32, &residual], vec![]);
            from_f32(&mut b, &estimate, elem, &out);
        }
        let mut output = output_type.clone();
        output.name = out;
        body.outputs.push(output);
    }
    body
}

/// The streams of a region from block `first` to block `last`: the main stream's shape, and
/// the text stream as a companion where the region ends before it does (an MMDiT region that
/// stops before later blocks read the text). Refused where the region's output is not shaped
/// like its input, or it writes a text stream it does not read.
fn region_streams(
    model: &Model,
    stack: &DitStack,
    first: usize,
    last: usize,
) -> Result<(Vec<Dim>, Vec<super::Companion>)> {
    let (from, to) = (&stack.blocks[first], &stack.blocks[last]);
    if stack.joint.is_none() {
        return Ok((stream_dims(stack)?, Vec::new()));
    }
    let shapes = Shapes::infer(model);
    let dims = |value: &str| {
        super::state_dims(&shapes, value, &stack.batch).ok_or_else(|| {
            Error::Unsupported(format!(
                "blocks {first}..{last}: the stream '{value}' has shape {:?}, not [batch, fixed…], so its state cannot be declared",
                shapes.dims(value)
            ))
        })
    };
    let main = dims(&from.input)?;
    if dims(&to.output)? != main {
        return Err(Error::Unsupported(format!(
            "blocks {first}..{last}: the region writes '{}' in another shape than it reads '{}' (it joins or slices the streams); end it before or after the blocks that do",
            to.output, from.input
        )));
    }
    let companions = match (&from.text_input, &to.text_output) {
        (_, None) => Vec::new(),
        (Some(input), Some(output)) => vec![super::Companion {
            input: input.clone(),
            output: output.clone(),
            dims: dims(input)?,
            elem: shapes.elem(input).unwrap_or(stack.elem),
        }],
        (None, Some(output)) => {
            return Err(Error::Unsupported(format!(
                "blocks {first}..{last}: the region writes the text stream '{output}' but reads none"
            )));
        }
    };
    Ok((main, companions))
}

/// The input of block 0's first weighted projection: the first MatMul/Gemm in block 0 with one
/// operand computed from the stack input and the other not (a weight). In adaLN DiTs that operand
/// is LN(X)·(1 + scale(t)) + shift(t), the timestep-modulated input TeaCache watches; attention's
/// own products (both operands from X) are passed over.
pub fn modulated_input(graph: &Graph, stack: &DitStack) -> Result<String> {
    modulated_input_of(graph, &stack.blocks[0])
}

/// [`modulated_input`] of any block.
fn modulated_input_of(graph: &Graph, block: &crate::analysis::Block) -> Result<String> {
    let mut from_x: HashSet<String> = HashSet::from([block.input.clone()]);
    for &id in &block.nodes {
        let node = graph.node(id);
        let data: Vec<&String> = node.inputs.iter().filter(|i| from_x.contains(*i)).collect();
        if data.is_empty() {
            continue;
        }
        if matches!(node.op_type.as_str(), "MatMul" | "Gemm") && node.domain.is_empty() {
            let operands: Vec<&String> = node.inputs.iter().take(2).collect();
            if operands.len() == 2 && data.len() == 1 && operands.contains(&data[0]) {
                return Ok(data[0].clone());
            }
        }
        from_x.extend(node.outputs.iter().cloned());
    }
    Err(Error::Unsupported(
        "block 0 has no weighted projection of its input (MatMul/Gemm with one operand from the stack input and one weight), so TeaCache's modulated-input indicator cannot be found; use the stack input as indicator".into(),
    ))
}

/// The indicator's dims with the batch dim named like the stream's; refused when unknown, since
/// the contract must state every state shape.
fn resolved_dims(shapes: &Shapes, value: &str, batch: &Dim) -> Result<Vec<Dim>> {
    let dims = shapes.dims(value).ok_or_else(|| {
        Error::Unsupported(format!(
            "the shape of the indicator '{value}' is unknown; use the stack input as indicator"
        ))
    })?;
    super::state_dims(shapes, value, batch).ok_or_else(|| {
        Error::Unsupported(format!(
            "the indicator '{value}' has shape {dims:?}; need [batch, fixed…]; use the stack input as indicator"
        ))
    })
}
