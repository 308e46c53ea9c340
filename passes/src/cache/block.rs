//! The transformer-level cache (design/method.md §1): each chosen block's work runs inside the
//! else-branch of an `If`; the then-branch stands in for it with the cached residual plus a fitted
//! linear correction. The decision is a χ² test of the block input's change since the block was
//! last really computed, in fp32, against that block's calibrated change scale.
//!
//! Per block l, with H = the block input and R_in, R_out the input and output when it last ran:
//!
//! ```text
//! ss   = Σ (H − R_in)²                      rr = Σ R_in²           n = number of elements
//! skip = ss ≤ κ_l · rr · q(n)   and   step ≥ warmup   and   skips < max_skips
//! q(n) = (1 − a + z·√a)³,  a = 2/(9n)        (Wilson–Hilferty: χ²_{n,1−α} / n)
//! then: H + (R_out − R_in) [+ (H − R_in)·W_l + b_l]      (or H + R̂(s), [`Approximation::Forecast`])
//! else: the block itself
//! ```
//!
//! κ_l · rr / n is the block's change scale σ²_l expressed relative to the reference's mean square,
//! which keeps the test meaningful as activations grow and shrink over a sampling run. State
//! (R_in, R_out, the consecutive-skip count, the step counter) crosses steps as graph input/output
//! pairs described by the `fastcache` metadata contract; all-zero state is the first step.

use serde_json::json;

use super::{
    BlockSpan, SKIPPED_OUTPUT, STEP_INPUT, add_skipped_output, add_step_counter, ensure_opset,
    insert_if, pair, state_dtype_name, stream_dtype,
};
use crate::builder::{Builder, from_f32, tensor, to_f32};
use crate::contract::{CONTRACT_VERSION, Contract, METADATA_KEY};
use crate::error::{Error, Result};
use crate::ir::{AttrValue, Dim, Graph, Model, ValueInfo};
use crate::onnx::tensor_proto::DataType;

/// A fitted linear correction for one block: (H − R_in)·W + b, W of shape [D, D].
#[derive(Clone, Debug, PartialEq)]
pub struct Correction {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// What the approximation of a skipped block is.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approximation {
    /// H + (R_out − R_in) + (H − R_in)·W + b (W, b zero when uncalibrated: pure residual reuse).
    Residual,
    /// The paper's pure map H·W + b (needs a calibration).
    Map,
    /// H + R̂(s): the block's residual R = H_out − H_in forecast along time from its last
    /// `order + 1` computed steps a > p > q (design/method.md §1), by Newton's extrapolation with
    /// each term past the first damped by d:
    ///
    /// ```text
    /// R̂(s) = R(a) + d·(s − a)·[a, p] + d²·(s − a)·(s − p)·[a, p, q]      (order 2; order 1 stops at [a, p])
    /// ```
    ///
    /// [·] the divided differences of R over the steps. Blocks skip at different steps, so each
    /// keeps the steps of its own snapshots. d = 1 is the Lagrange extrapolation, d = 0 reuse.
    Forecast { order: usize, damping: f32 },
}

impl Approximation {
    /// Computed steps a skip needs behind it: the forecast's snapshots.
    fn snapshots(self) -> usize {
        match self {
            Approximation::Forecast { order, .. } => order + 1,
            _ => 1,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Significance level of the χ² test.
    pub alpha: f64,
    /// A block is never skipped more than this many steps in a row; 0 turns skipping off.
    pub max_skips: i64,
    /// The first `warmup` steps compute every block (at least the first step always does).
    pub warmup: i64,
    /// Per block: relative change scale κ_l (σ²_l = κ_l · mean(R_in²)). One entry per block.
    pub kappa: Vec<f32>,
    pub approximation: Approximation,
    /// Per block, if calibrated.
    pub corrections: Option<Vec<Correction>>,
    /// Test only: skip whenever allowed by warm-up, ignoring the statistic and the skip cap.
    pub force_skip: bool,
    /// Where the parameters came from, recorded in the metadata ("default" or a calibration file).
    pub source: String,
}

/// The relative change below which an uncalibrated block is skipped: 4% RMS change of its input
/// since it last ran. Blocks of trained DiTs move 2–3% per step mid-trajectory and 15–35% at the
/// start and end (design/quality.md), so this skips the quiet middle and computes the ends.
pub const DEFAULT_RELATIVE_CHANGE: f32 = 0.04;

impl CacheConfig {
    pub fn uncalibrated(blocks: usize) -> CacheConfig {
        CacheConfig {
            alpha: 0.05,
            max_skips: 4,
            warmup: 2,
            kappa: vec![DEFAULT_RELATIVE_CHANGE * DEFAULT_RELATIVE_CHANGE; blocks],
            approximation: Approximation::Residual,
            corrections: None,
            force_skip: false,
            source: "default".into(),
        }
    }

    fn check(&self, blocks: usize, hidden: i64) -> Result<()> {
        let bad = |m: String| Err(Error::Request(m));
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return bad(format!(
                "--alpha must lie strictly between 0 and 1, got {}",
                self.alpha
            ));
        }
        if self.max_skips < 0 {
            return bad(format!(
                "--max-skips must be 0 or more, got {}",
                self.max_skips
            ));
        }
        if self.warmup < 0 {
            return bad(format!("--warmup must be 0 or more, got {}", self.warmup));
        }
        if self.kappa.len() != blocks || self.kappa.iter().any(|k| !(k.is_finite() && *k >= 0.0)) {
            return bad(format!(
                "need {blocks} finite, non-negative change scales, got {:?}",
                self.kappa
            ));
        }
        if let Some(corrections) = &self.corrections {
            let d = hidden as usize;
            if corrections.len() != blocks
                || corrections
                    .iter()
                    .any(|c| c.weight.len() != d * d || c.bias.len() != d)
            {
                return bad(format!(
                    "corrections must be {blocks} blocks of a {d}×{d} weight and {d} biases"
                ));
            }
        } else if self.approximation == Approximation::Map {
            return bad("the pure linear map approximation needs a calibration".into());
        }
        if let Approximation::Forecast { order, damping } = self.approximation {
            if !(1..=2).contains(&order) {
                return bad(format!("--forecast takes order 1 or 2, got {order}"));
            }
            if !(0.0..=1.0).contains(&damping) {
                return bad(format!("--damping must lie in [0, 1], got {damping}"));
            }
            if self.corrections.is_some() {
                return bad(
                    "a fitted correction belongs to residual reuse, not to the forecast".into(),
                );
            }
            if self.warmup.max(1) < order as i64 + 1 {
                return bad(format!(
                    "--forecast {order} extrapolates through {} computed steps; it needs --warmup {} or more, got {}",
                    order + 1,
                    order + 1,
                    self.warmup
                ));
            }
        }
        Ok(())
    }
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The χ² quantile divided by n, by Wilson–Hilferty; what the graph computes for a given n.
pub fn chi2_quantile_ratio(n: f64, alpha: f64) -> f64 {
    let a = 2.0 / (9.0 * n);
    let z = normal_quantile(1.0 - alpha);
    (1.0 - a + z * a.sqrt()).powi(3)
}

/// Names of the state and stats the rewrite adds (also what the contract lists).
fn state_name(block: usize, what: &str) -> String {
    format!("fastcache.b{block}.{what}")
}

/// What the rewrite did, for the user and the tests.
#[derive(Clone, Debug)]
pub struct CacheSummary {
    pub blocks: Vec<usize>,
    /// Nodes per block that stayed outside the `If` because values they make are read after
    /// the block (e.g. DiT's final layer reuses block 0's conditioning embedding).
    pub kept_outside: Vec<usize>,
}

/// Rewrites `blocks` (indices into `spans`) of `model`. Each block's state has its span's stream
/// shape, [batch, tokens, D], with the batch dim named as on the model's inputs.
pub fn apply_block_cache(
    model: &mut Model,
    spans: &[BlockSpan],
    blocks: &[usize],
    config: &CacheConfig,
) -> Result<CacheSummary> {
    crate::contract::refuse_rewritten(model)?;
    for &b in blocks {
        if b >= spans.len() {
            return Err(Error::Invalid(format!(
                "block {b} does not exist: the model has {} blocks (0 to {})",
                spans.len(),
                spans.len().saturating_sub(1)
            )));
        }
    }
    let mut hidden = None;
    for &b in blocks {
        let dims = &spans[b].dims;
        match dims.last() {
            Some(Dim::Fixed(d)) if dims.len() == 3 && hidden.is_none_or(|h| h == *d) => {
                hidden = Some(*d)
            }
            _ => {
                return Err(Error::Unsupported(format!(
                    "the residual stream must be [batch, tokens, hidden] with one fixed hidden size, got {dims:?} at block {b}"
                )));
            }
        }
    }
    let hidden = hidden.unwrap_or(0);
    config.check(blocks.len(), hidden)?;
    let mut state = Vec::new();
    let mut skipped_flags = Vec::new();
    let mut kept_outside = Vec::new();
    let graph = &mut model.graph;

    state.push(add_step_counter(graph));
    let step_dims = vec![Dim::Fixed(1)];

    let z = normal_quantile(1.0 - config.alpha) as f32;
    for (position, &block) in blocks.iter().enumerate() {
        let span = &spans[block];
        let state_dims = &span.dims;
        // The state in the stream's own type; the test and the approximation in float32.
        let elem = stream_dtype(span.elem);
        let ref_in = state_name(block, "ref_in");
        let ref_out = state_name(block, "ref_out");
        let skips = state_name(block, "skips");
        let history = History::new(block, config.approximation.snapshots());
        let mut block_state = vec![
            (ref_in.clone(), elem, state_dims.to_vec()),
            (ref_out.clone(), elem, state_dims.to_vec()),
            (skips.clone(), DataType::Int64, step_dims.clone()),
        ];
        block_state.extend(history.state(elem, state_dims, &step_dims));
        if !span.companions.is_empty() && !history.steps.is_empty() {
            return Err(Error::Unsupported(format!(
                "block {block} also writes a second stream (MMDiT's text), and the per-block forecast of a second stream is not built; use residual reuse (no --forecast)"
            )));
        }
        let companion_refs: Vec<(String, String)> = (0..span.companions.len())
            .map(|k| {
                let stream = companion_name(k);
                (
                    state_name(block, &format!("{stream}.ref_in")),
                    state_name(block, &format!("{stream}.ref_out")),
                )
            })
            .collect();
        for ((ref_in, ref_out), c) in companion_refs.iter().zip(&span.companions) {
            block_state.push((ref_in.clone(), stream_dtype(c.elem), c.dims.clone()));
            block_state.push((ref_out.clone(), stream_dtype(c.elem), c.dims.clone()));
        }
        for (name, dtype, dims) in &block_state {
            graph
                .inputs
                .push(ValueInfo::tensor(name, *dtype as i32, dims.clone()));
        }

        let prefix = format!("fastcache.b{block}.");
        let mut b = Builder::new(graph, prefix.clone());
        let h = span.input.as_str();
        // The statistic, in fp32 whatever the model computes in.
        let h32 = b.op(
            "Cast",
            &[h],
            vec![("to", AttrValue::Int(DataType::Float as i64))],
        );
        let ref_in32 = to_f32(&mut b, &ref_in, span.elem);
        let diff = b.op("Sub", &[&h32, &ref_in32], vec![]);
        let sq = b.op("Mul", &[&diff, &diff], vec![]);
        let ss = b.op("ReduceSum", &[&sq], vec![("keepdims", AttrValue::Int(0))]);
        let ref_sq = b.op("Mul", &[&ref_in32, &ref_in32], vec![]);
        let rr = b.op(
            "ReduceSum",
            &[&ref_sq],
            vec![("keepdims", AttrValue::Int(0))],
        );
        let size = b.op("Size", &[&h32], vec![]);
        let n = b.op(
            "Cast",
            &[&size],
            vec![("to", AttrValue::Int(DataType::Float as i64))],
        );
        let two_ninths = b.init_f32("two_ninths", &[], &[2.0 / 9.0]);
        let a = b.op("Div", &[&two_ninths, &n], vec![]);
        let sqrt_a = b.op("Sqrt", &[&a], vec![]);
        let z_c = b.init_f32("z", &[], &[z]);
        let z_sqrt_a = b.op("Mul", &[&z_c, &sqrt_a], vec![]);
        let one_f = b.init_f32("one", &[], &[1.0]);
        let base = b.op("Sub", &[&one_f, &a], vec![]);
        let base = b.op("Add", &[&base, &z_sqrt_a], vec![]);
        let base_sq = b.op("Mul", &[&base, &base], vec![]);
        let q = b.op("Mul", &[&base_sq, &base], vec![]);
        let kappa = b.init_f32("kappa", &[], &[config.kappa[position]]);
        let scale = b.op("Mul", &[&kappa, &rr], vec![]);
        let threshold = b.op("Mul", &[&scale, &q], vec![]);
        let quiet = b.op("LessOrEqual", &[&ss, &threshold], vec![]);
        let warm = b.init_i64("warmup", &[1], &[config.warmup.max(1)]);
        let warmed = b.op("GreaterOrEqual", &[STEP_INPUT, &warm], vec![]);
        let cap = b.init_i64("max_skips", &[1], &[config.max_skips]);
        let under_cap = b.op("Less", &[&skips, &cap], vec![]);
        let cond = if config.force_skip {
            b.op("Identity", &[&warmed], vec![])
        } else {
            let allowed = b.op("And", &[&warmed, &under_cap], vec![]);
            b.op("And", &[&allowed, &quiet], vec![])
        };

        // Both branches produce the block output under a fresh name; the If writes the original
        // name, so everything after the block reads it unchanged.
        let block_type = ValueInfo::tensor(&span.output, span.elem, state_dims.to_vec());
        let mut approx_body = approximation_body(
            block,
            h,
            &ref_in,
            &ref_out,
            &diff,
            &history,
            &block_type,
            config,
            position,
            hidden,
        )?;
        companions_reused(&mut approx_body, block, span, &companion_refs);
        let kept = insert_if(
            graph,
            span,
            &cond,
            approx_body,
            &format!("b{block}"),
            &format!("block {block}"),
            &block_type,
            &[],
        )?;
        kept_outside.push(kept);
        let mut b = Builder::new(graph, prefix);

        // State updates: keep the references while skipping, take the new ones when computed.
        let ref_in_next = state_name(block, "ref_in.next");
        let ref_out_next = state_name(block, "ref_out.next");
        let skips_next = state_name(block, "skips.next");
        let h_state = if elem == DataType::Float {
            h32
        } else {
            h.to_string()
        };
        b.op_into("Where", &[&cond, &ref_in, &h_state], vec![], &ref_in_next);
        let y_state = b.op(
            "Cast",
            &[&span.output],
            vec![("to", AttrValue::Int(elem as i64))],
        );
        b.op_into("Where", &[&cond, &ref_out, &y_state], vec![], &ref_out_next);
        history.shift(&mut b, &cond, &ref_in, &ref_out);
        for ((c_ref_in, c_ref_out), c) in companion_refs.iter().zip(&span.companions) {
            let to_state = || vec![("to", AttrValue::Int(c.elem as i64))];
            let c_in32 = b.op("Cast", &[&c.input], to_state());
            let c_out32 = b.op("Cast", &[&c.output], to_state());
            b.op_into(
                "Where",
                &[&cond, c_ref_in, &c_in32],
                vec![],
                &format!("{c_ref_in}.next"),
            );
            b.op_into(
                "Where",
                &[&cond, c_ref_out, &c_out32],
                vec![],
                &format!("{c_ref_out}.next"),
            );
        }
        let one = b.init_i64("one_i", &[1], &[1]);
        let zero = b.init_i64("zero_i", &[1], &[0]);
        let skips_plus = b.op("Add", &[&skips, &one], vec![]);
        b.op_into("Where", &[&cond, &skips_plus, &zero], vec![], &skips_next);
        let flag = b.op(
            "Cast",
            &[&cond],
            vec![("to", AttrValue::Int(DataType::Float as i64))],
        );
        skipped_flags.push(flag);

        for (input, dtype, dims) in &block_state {
            let output = format!("{input}.next");
            graph
                .outputs
                .push(ValueInfo::tensor(&output, *dtype as i32, dims.clone()));
            state.push(pair(input, &output, state_dtype_name(*dtype), dims));
        }
    }

    add_skipped_output(graph, &skipped_flags);

    let contract = Contract {
        version: CONTRACT_VERSION,
        state,
        stats: vec![SKIPPED_OUTPUT.into()],
        policy: json!({
            "name": "fastcache",
            "blocks": blocks,
            "alpha": config.alpha,
            "max_skips": config.max_skips,
            "warmup": config.warmup.max(1),
            "kappa": config.kappa,
            "approximation": config.approximation,
            "corrected": config.corrections.is_some(),
            "force_skip": config.force_skip,
            "calibration": config.source,
        }),
    };
    model.set_metadata(METADATA_KEY, contract.to_json());
    ensure_opset(model, 17)?;
    crate::ir::verify_model(model)?;
    Ok(CacheSummary {
        blocks: blocks.to_vec(),
        kept_outside,
    })
}

/// A block's forecast history beyond its newest residual (which is ref_out − ref_in): the
/// residuals of its older computed steps and the steps of all its snapshots, newest first. Empty
/// for the approximations that need one snapshot.
struct History {
    /// R(p), R(q): the residuals at the second and third newest computed step.
    older: Vec<String>,
    /// a, p, q: the steps of the newest, second and third newest snapshot.
    steps: Vec<String>,
}

impl History {
    fn new(block: usize, snapshots: usize) -> History {
        if snapshots < 2 {
            return History {
                older: Vec::new(),
                steps: Vec::new(),
            };
        }
        History {
            older: (2..=snapshots)
                .map(|k| state_name(block, &format!("residual_{k}")))
                .collect(),
            steps: (1..=snapshots)
                .map(|k| state_name(block, &format!("snapshot_step_{k}")))
                .collect(),
        }
    }

    fn state(
        &self,
        elem: DataType,
        dims: &[Dim],
        step_dims: &[Dim],
    ) -> Vec<(String, DataType, Vec<Dim>)> {
        let residuals = self
            .older
            .iter()
            .map(|name| (name.clone(), elem, dims.to_vec()));
        let steps = self
            .steps
            .iter()
            .map(|name| (name.clone(), DataType::Int64, step_dims.to_vec()));
        residuals.chain(steps).collect()
    }

    /// A computed step shifts every snapshot back by one (the newest residual, ref_out − ref_in,
    /// becomes the second), a skipped step keeps them: snapshots are always computed values.
    fn shift(&self, b: &mut Builder, cond: &str, ref_in: &str, ref_out: &str) {
        if self.steps.is_empty() {
            return;
        }
        let newest = b.op("Sub", &[ref_out, ref_in], vec![]);
        let newer = std::iter::once(newest.as_str()).chain(self.older.iter().map(String::as_str));
        for (snapshot, newer) in self.older.iter().zip(newer) {
            b.op_into(
                "Where",
                &[cond, snapshot, newer],
                vec![],
                &format!("{snapshot}.next"),
            );
        }
        let newer = std::iter::once(STEP_INPUT).chain(self.steps.iter().map(String::as_str));
        for (step, newer) in self.steps.iter().zip(newer) {
            b.op_into(
                "Where",
                &[cond, step, newer],
                vec![],
                &format!("{step}.next"),
            );
        }
    }

    /// R̂(s) of [`Approximation::Forecast`] as weights on the snapshots: with c = d·(s − a)/(a − p)
    /// and e = d²·(s − a)(s − p)/(a − q),
    /// w_a = 1 + c + e/(a − p), w_p = −c − e·(1/(a − p) + 1/(p − q)), w_q = e/(p − q).
    /// Built inside the then-branch, so computed steps do not pay for it.
    fn forecast(&self, b: &mut Builder, newest: &str, damping: f32, elem: i32) -> String {
        let float = |b: &mut Builder, x: &str| {
            b.op(
                "Cast",
                &[x],
                vec![("to", AttrValue::Int(DataType::Float as i64))],
            )
        };
        let s = float(b, STEP_INPUT);
        let t: Vec<String> = self.steps.iter().map(|step| float(b, step)).collect();
        let one = b.init_f32("one", &[1], &[1.0]);
        let d = b.init_f32("damping", &[1], &[damping]);
        // Gaps of at least one step: warm-up guarantees distinct snapshot steps at any skip.
        let gap = |b: &mut Builder, newer: &str, older: &str| {
            let gap = b.op("Sub", &[newer, older], vec![]);
            b.op("Max", &[&gap, &one], vec![])
        };
        let ahead_a = b.op("Sub", &[&s, &t[0]], vec![]);
        let gap_ap = gap(b, &t[0], &t[1]);
        let c = b.op("Div", &[&ahead_a, &gap_ap], vec![]);
        let c = b.op("Mul", &[&d, &c], vec![]);
        let mut w_a = b.op("Add", &[&one, &c], vec![]);
        let mut w_p = b.op("Neg", &[&c], vec![]);
        let mut terms = vec![];
        if let (Some(q), Some(r_q)) = (t.get(2), self.older.get(1)) {
            let ahead_p = b.op("Sub", &[&s, &t[1]], vec![]);
            let gap_aq = gap(b, &t[0], q);
            let gap_pq = gap(b, &t[1], q);
            let e = b.op("Mul", &[&ahead_a, &ahead_p], vec![]);
            let e = b.op("Div", &[&e, &gap_aq], vec![]);
            let dd = b.op("Mul", &[&d, &d], vec![]);
            let e = b.op("Mul", &[&dd, &e], vec![]);
            let e_ap = b.op("Div", &[&e, &gap_ap], vec![]);
            let e_pq = b.op("Div", &[&e, &gap_pq], vec![]);
            w_a = b.op("Add", &[&w_a, &e_ap], vec![]);
            let both = b.op("Add", &[&e_ap, &e_pq], vec![]);
            w_p = b.op("Sub", &[&w_p, &both], vec![]);
            let r_q = to_f32(b, r_q, elem);
            terms.push(b.op("Mul", &[&e_pq, &r_q], vec![]));
        }
        let mut sum = b.op("Mul", &[&w_a, newest], vec![]);
        let r_p = to_f32(b, &self.older[0], elem);
        terms.push(b.op("Mul", &[&w_p, &r_p], vec![]));
        for term in terms {
            sum = b.op("Add", &[&sum, &term], vec![]);
        }
        sum
    }
}

/// The then-branch: what a skipped block returns.
#[allow(clippy::too_many_arguments)]
fn approximation_body(
    block: usize,
    h: &str,
    ref_in: &str,
    ref_out: &str,
    diff: &str,
    history: &History,
    block_type: &ValueInfo,
    config: &CacheConfig,
    position: usize,
    hidden: i64,
) -> Result<Graph> {
    let mut body = Graph::new(format!("fastcache_b{block}_skip"));
    let out = format!("fastcache.b{block}.skip.out");
    let correction = config.corrections.as_ref().map(|c| &c[position]);
    {
        let mut b = Builder::new(&mut body, format!("fastcache.b{block}.skip."));
        let h32 = b.op(
            "Cast",
            &[h],
            vec![("to", AttrValue::Int(DataType::Float as i64))],
        );
        let elem = block_type.elem_type().unwrap_or(DataType::Float as i32);
        let (ref_in, ref_out) = (to_f32(&mut b, ref_in, elem), to_f32(&mut b, ref_out, elem));
        let (ref_in, ref_out) = (ref_in.as_str(), ref_out.as_str());
        let estimate = match (config.approximation, correction) {
            (Approximation::Forecast { damping, .. }, _) => {
                let newest = b.op("Sub", &[ref_out, ref_in], vec![]);
                let residual = history.forecast(&mut b, &newest, damping, elem);
                b.op("Add", &[&h32, &residual], vec![])
            }
            (Approximation::Map, Some(c)) => {
                let w = push_tensor(&mut b, "w", &[hidden, hidden], &c.weight);
                let bias = push_tensor(&mut b, "b", &[hidden], &c.bias);
                let mapped = b.op("MatMul", &[&h32, &w], vec![]);
                b.op("Add", &[&mapped, &bias], vec![])
            }
            (_, correction) => {
                let residual = b.op("Sub", &[ref_out, ref_in], vec![]);
                let reused = b.op("Add", &[&h32, &residual], vec![]);
                match correction {
                    Some(c) => {
                        let w = push_tensor(&mut b, "w", &[hidden, hidden], &c.weight);
                        let bias = push_tensor(&mut b, "b", &[hidden], &c.bias);
                        let moved = b.op("MatMul", &[diff, &w], vec![]);
                        let moved = b.op("Add", &[&moved, &bias], vec![]);
                        b.op("Add", &[&reused, &moved], vec![])
                    }
                    None => reused,
                }
            }
        };
        from_f32(&mut b, &estimate, elem, &out);
    }
    let mut output = block_type.clone();
    output.name = out;
    body.outputs.push(output);
    Ok(body)
}

/// The name of a span's k-th companion stream in state names: MMDiT's text stream first.
fn companion_name(k: usize) -> String {
    match k {
        0 => "text".into(),
        k => format!("stream_{}", k + 1),
    }
}

/// A skipped block's companion streams (MMDiT's text): each its input plus its residual at the
/// block's last computed step, E + (E_out − E_in)ref, added to the then-branch's outputs in the
/// order of the span's companions.
fn companions_reused(body: &mut Graph, block: usize, span: &BlockSpan, refs: &[(String, String)]) {
    for (k, ((ref_in, ref_out), c)) in refs.iter().zip(&span.companions).enumerate() {
        let out = format!("fastcache.b{block}.skip.{}", companion_name(k));
        {
            let mut b = Builder::new(
                body,
                format!("fastcache.b{block}.skip.{}.", companion_name(k)),
            );
            let e32 = b.op(
                "Cast",
                &[&c.input],
                vec![("to", AttrValue::Int(DataType::Float as i64))],
            );
            let (ref_in, ref_out) = (
                to_f32(&mut b, ref_in, c.elem),
                to_f32(&mut b, ref_out, c.elem),
            );
            let residual = b.op("Sub", &[&ref_out, &ref_in], vec![]);
            let reused = b.op("Add", &[&e32, &residual], vec![]);
            from_f32(&mut b, &reused, c.elem, &out);
        }
        body.outputs
            .push(ValueInfo::tensor(&out, c.elem, c.dims.clone()));
    }
}

/// Large constants of a branch live in the branch body as initializers.
fn push_tensor(b: &mut Builder, hint: &str, dims: &[i64], values: &[f32]) -> String {
    let name = b.name(hint);
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    b.graph
        .initializers
        .push(tensor(&name, dims, DataType::Float, bytes));
    name
}
