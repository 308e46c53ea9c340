//! Calibration (design/method.md §1): run the original model over seeded sampling runs with every
//! block boundary exposed, then per block fit the linear correction of a skip in closed form and
//! choose the change scale κ that keeps a skip's error within the target.
//!
//! A skip at step t against the reference step s (the last step the block ran) approximates
//!   H_l(t) ≈ H_{l-1}(t) + (H_l(s) − H_{l-1}(s)) + Δ·W + b,   Δ = H_{l-1}(t) − H_{l-1}(s).
//! The fit regresses what residual reuse misses on Δ, over every pair (s, t) with
//! 1 ≤ t − s ≤ max_gap, token by token (rows are tokens, columns the hidden size).

pub mod fit;
pub mod probe;
pub mod schedule;

use std::path::Path;

use anyhow::{Context, bail};
use fastcache_passes::analysis::{DitStack, discover};
use fastcache_passes::cache::{Correction, chi2_quantile_ratio};
use fastcache_passes::calibration::{
    BlockCalibration, CALIBRATION_VERSION, Calibration, StaticTokensCalibration, fingerprint,
};
use fastcache_passes::contract::{CONTRACT_VERSION, Contract, METADATA_KEY};
use fastcache_passes::expose::Expose;
use fastcache_passes::ir::Model;
use fastcache_passes::pass::run_pass;
use ndarray::{Array2, ArrayView2};
use serde_json::json;

use crate::engine::{self, EngineKind, Options};
use crate::sampler::{self, SamplerSetup, Settings};
use fit::{RidgeAccumulator, SkipSample, kappa_for_error, kappa_for_rate};

/// What κ is chosen for.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The largest κ whose allowed skips all stay within this relative output error.
    Error(f64),
    /// The κ that lets this share of steps skip.
    SkipRate(f64),
}

/// How the calibration runs are recorded: what every calibration (per-block fits, schedules,
/// probe tests) needs.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub settings: Settings,
    pub runs: usize,
    pub seed: u64,
    pub batch: usize,
    pub classes: Vec<i64>,
    pub engine: EngineKind,
    pub engine_options: Options,
}

/// The per-block calibration's options: the recording and what it fits.
#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    pub record: RecordOptions,
    pub target: Target,
    /// Ridge penalty, relative to the features' mean variance.
    pub lambda: f64,
    /// Largest distance between a step and its reference that the fit sees (the rewrite's
    /// --max-skips).
    pub max_gap: usize,
    /// Significance level the rewrite will use (κ absorbs the test's χ² factor).
    pub alpha: f64,
    /// Steps the rewrite always computes; they do not count towards the expected skip rate.
    pub warmup: usize,
}

/// One block's row of the report.
#[derive(Clone, Debug)]
pub struct BlockReport {
    pub index: usize,
    pub kappa: f32,
    pub error_residual: f64,
    pub error_corrected: f64,
    pub fit_rms_without: f64,
    pub fit_rms_with: f64,
    pub expected_skip_rate: f64,
    pub flops_share: f64,
}

/// The static-token correction's row of the report.
#[derive(Clone, Debug)]
pub struct StaticTokensReport {
    pub error_reuse: f64,
    pub error_corrected: f64,
    pub fit_rms_without: f64,
    pub fit_rms_with: f64,
}

#[derive(Clone, Debug)]
pub struct CalibrateReport {
    pub blocks: Vec<BlockReport>,
    /// Token selection's static-token correction.
    pub static_tokens: StaticTokensReport,
    /// The FLOP speedup the bench would count for the skips the test makes on the recorded runs
    /// (see [`simulate_test`]).
    pub expected_speedup: f64,
    pub steps: usize,
    pub pairs_per_block: usize,
}

/// The DiT stack of the (original) model at `model_path`.
fn stack_of(model_path: &Path) -> anyhow::Result<DitStack> {
    let model = Model::load(model_path).context("cannot read the model")?;
    Ok(discover(&model)?.stack().clone())
}

/// Records every block boundary at every step of `options.runs` sampling runs.
/// Returns, per run, per step, the boundary tensors [X, H_0, ..., H_{L-1}] as [rows, D].
fn record(
    model_path: &Path,
    stack: &DitStack,
    options: &RecordOptions,
) -> anyhow::Result<Vec<Vec<Vec<Array2<f32>>>>> {
    let mut runs = Vec::with_capacity(options.runs);
    record_each(model_path, &stack.boundaries(), options, &mut |run| {
        runs.push(run)
    })?;
    Ok(runs)
}

/// Records `boundaries` at every step of `options.runs` sampling runs and hands each run, per
/// step, the tensors as [rows, D], to `on_run` as soon as it is done.
fn record_each(
    model_path: &Path,
    boundaries: &[String],
    options: &RecordOptions,
    on_run: &mut dyn FnMut(Vec<Vec<Array2<f32>>>),
) -> anyhow::Result<()> {
    let boundaries = boundaries.to_vec();
    let mut model = Model::load(model_path)?;
    run_pass(&mut model, &Expose::new(boundaries.clone()))
        .context("cannot expose the block boundaries")?;
    // Declaring the boundaries as contract stats makes the sampler hand them over every step.
    let contract = Contract {
        version: CONTRACT_VERSION,
        state: Vec::new(),
        stats: boundaries.clone(),
        policy: json!({"name": "calibration-recording"}),
    };
    model.set_metadata(METADATA_KEY, contract.to_json());
    let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
    let exposed = dir.path().join("exposed.onnx");
    model.save(&exposed, &model.default_storage(&exposed))?;
    let (_, spec) = engine::ModelSpec::load(&exposed)?;
    let setup = SamplerSetup::new(&spec, Some(&model), &options.settings)?;
    drop(model);
    let mut engine = engine::open(options.engine, &exposed, &options.engine_options)?;

    for run in 0..options.runs {
        let mut steps: Vec<Vec<Array2<f32>>> = Vec::new();
        let mut failure = None;
        let seed = options.seed + run as u64;
        sampler::sample_seeded(engine.as_mut(), &setup, options.batch, &options.classes, seed, &mut |step| {
            let mut tensors = Vec::with_capacity(boundaries.len());
            for name in &boundaries {
                // Widened from float16 where the model computes in it: calibration fits in float32.
                match step.stats.get(name).and_then(|t| t.clone().into_f32()) {
                    Some(a) if a.ndim() == 3 => {
                        let d = a.shape()[2];
                        let rows = a.len() / d;
                        tensors.push(a.as_standard_layout().into_owned().into_shape_with_order((rows, d)).expect("contiguous"));
                    }
                    _ => failure = Some(format!("boundary '{name}' did not come back as a [batch, tokens, hidden] float tensor")),
                }
            }
            steps.push(tensors);
        })
        .with_context(|| format!("calibration run {run} failed"))?;
        if let Some(message) = failure {
            bail!(message);
        }
        on_run(steps);
    }
    Ok(())
}

/// How the calibration data was recorded, for the file's record, with the settings of what was
/// fitted from it.
fn recording(
    model_path: &Path,
    options: &RecordOptions,
    fitted: serde_json::Value,
) -> serde_json::Value {
    let mut record = json!({
        "model": model_path.display().to_string(),
        "sampler": options.settings.kind.map(|k| k.name()),
        "steps": options.settings.steps,
        "runs": options.runs,
        "seed": options.seed,
        "batch": options.batch,
        "guidance": options.settings.guidance,
    });
    if let (Some(record), serde_json::Value::Object(fitted)) = (record.as_object_mut(), fitted) {
        record.extend(fitted);
    }
    record
}

fn frobenius_sq(a: ArrayView2<f32>) -> f64 {
    a.iter().map(|&v| f64::from(v).powi(2)).sum()
}

/// The (s, t) pairs a skip can meet: t − s from 1 to `max_gap`.
fn pairs(steps: usize, max_gap: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..steps).flat_map(move |s| (s + 1..steps.min(s + max_gap + 1)).map(move |t| (s, t)))
}

/// Features Δ and targets (what residual reuse misses) of block `l` for one pair.
fn pair_data(run: &[Vec<Array2<f32>>], l: usize, s: usize, t: usize) -> (Array2<f32>, Array2<f32>) {
    let (input_s, output_s) = (&run[s][l], &run[s][l + 1]);
    let (input_t, output_t) = (&run[t][l], &run[t][l + 1]);
    let delta = input_t - input_s;
    let missed = (output_t - input_t) - (output_s - input_s);
    (delta, missed)
}

pub fn calibrate(
    model_path: &Path,
    options: &CalibrateOptions,
) -> anyhow::Result<(Calibration, CalibrateReport)> {
    if options.record.runs == 0 || options.record.settings.steps < 2 {
        bail!("calibration needs at least one run of at least two steps");
    }
    if options.max_gap == 0 {
        bail!("--max-skips must be at least 1 to calibrate skips");
    }
    let stack = stack_of(model_path)?;
    let runs = record(model_path, &stack, &options.record)?;
    let steps = runs[0].len();
    let hidden = runs[0][0][0].ncols();
    let elements = (runs[0][0][0].len()) as f64;
    let q = chi2_quantile_ratio(elements, options.alpha);
    let total_flops = stack.total_flops().counted.max(1) as f64;

    let mut blocks = Vec::new();
    let mut reports = Vec::new();
    // Per run, per step, per block: whether the rewritten model's test would skip.
    let mut skip_patterns: Vec<Vec<Vec<bool>>> = vec![vec![Vec::new(); steps]; runs.len()];
    for (l, block) in stack.blocks.iter().enumerate() {
        let mut acc = RidgeAccumulator::new(hidden, hidden);
        for run in &runs {
            for (s, t) in pairs(steps, options.max_gap) {
                let (delta, missed) = pair_data(run, l, s, t);
                acc.add(delta.view(), missed.view());
            }
        }
        let fit = acc.solve(options.lambda).map_err(anyhow::Error::msg)?;
        let mut samples = Vec::new();
        let (mut err_res, mut err_cor, mut count) = (0.0, 0.0, 0usize);
        for run in &runs {
            for (s, t) in pairs(steps, options.max_gap) {
                let (delta, missed) = pair_data(run, l, s, t);
                let output_norm = frobenius_sq(run[t][l + 1].view()).max(f64::MIN_POSITIVE);
                let corrected =
                    &missed - &(delta.dot(&fit.weight) + &ndarray::ArrayView1::from(&fit.bias));
                let residual_error = (frobenius_sq(missed.view()) / output_norm).sqrt();
                let corrected_error = (frobenius_sq(corrected.view()) / output_norm).sqrt();
                let change = frobenius_sq(delta.view())
                    / frobenius_sq(run[s][l].view()).max(f64::MIN_POSITIVE);
                samples.push(SkipSample {
                    relative_change_sq: change,
                    relative_error: corrected_error,
                });
                err_res += residual_error;
                err_cor += corrected_error;
                count += 1;
            }
        }
        // The graph skips when change ≤ κ·q, so κ is the chosen change bound over q.
        let bound = match options.target {
            Target::Error(e) => kappa_for_error(&samples, e),
            Target::SkipRate(r) => kappa_for_rate(&samples, r),
        };
        let kappa = (bound / q) as f32;
        let skips: Vec<Vec<bool>> = runs
            .iter()
            .map(|run| simulate_test(run, l, bound, options))
            .collect();
        let rate =
            skips.iter().flatten().filter(|&&s| s).count() as f64 / (runs.len() * steps) as f64;
        for (run, pattern) in skip_patterns.iter_mut().zip(skips) {
            for (row, skipped) in run.iter_mut().zip(pattern) {
                row.push(skipped);
            }
        }
        let correction = Correction {
            weight: fit.weight.iter().copied().collect(),
            bias: fit.bias.clone(),
        };
        blocks.push(BlockCalibration {
            index: l,
            kappa,
            relative_error_residual: err_res / count as f64,
            relative_error_corrected: err_cor / count as f64,
            expected_skip_rate: rate,
            weight: None,
            bias: None,
            correction: Some(correction),
        });
        reports.push(BlockReport {
            index: l,
            kappa,
            error_residual: err_res / count as f64,
            error_corrected: err_cor / count as f64,
            fit_rms_without: fit.rms_without,
            fit_rms_with: fit.rms_with,
            expected_skip_rate: rate,
            flops_share: block.flops.counted as f64 / total_flops,
        });
    }
    let (static_tokens, static_report) = fit_static_tokens(&runs, stack.blocks.len(), options)?;
    // The bench's FLOP speedup: steps × a whole call's FLOPs over the mean FLOPs a run computes.
    let computed: Vec<f64> = skip_patterns
        .iter()
        .map(|run| steps as f64 * total_flops / stack.expected_speedup_of_run(run))
        .collect();
    let expected_speedup =
        steps as f64 * total_flops / (computed.iter().sum::<f64>() / computed.len() as f64);
    let report = CalibrateReport {
        expected_speedup,
        steps,
        pairs_per_block: runs.len() * pairs(steps, options.max_gap).count(),
        blocks: reports,
        static_tokens: static_report,
    };
    let calibration = Calibration {
        version: CALIBRATION_VERSION,
        fingerprint: fingerprint(&stack),
        recording: recording(
            model_path,
            &options.record,
            json!({
                "max_gap": options.max_gap,
                "lambda": options.lambda,
                "alpha": options.alpha,
            }),
        ),
        target: match options.target {
            Target::Error(e) => json!({"error": e}),
            Target::SkipRate(r) => json!({"skip_rate": r}),
        },
        blocks,
        static_tokens: Some(static_tokens),
        schedule: None,
        probe: None,
    };
    Ok((calibration, report))
}

/// The skips block `l`'s test would make over one recorded run, as the rewritten graph decides
/// (passes/src/cache.rs): the reference is the input of the last step the block computed, a step
/// skips when its input's relative squared change from that reference is within `bound` (κ·q),
/// never in the first max(warmup, 1) steps, and never more than max_skips times in a row. The
/// inputs are the uncached model's, so a skip upstream does not perturb them here.
fn simulate_test(
    run: &[Vec<Array2<f32>>],
    l: usize,
    bound: f64,
    options: &CalibrateOptions,
) -> Vec<bool> {
    let mut reference = 0;
    let mut in_a_row = 0;
    (0..run.len())
        .map(|t| {
            let skip = t >= options.warmup.max(1) && in_a_row < options.max_gap && {
                let delta = &run[t][l] - &run[reference][l];
                let change = frobenius_sq(delta.view())
                    / frobenius_sq(run[reference][l].view()).max(f64::MIN_POSITIVE);
                change <= bound
            };
            if skip {
                in_a_row += 1;
            } else {
                reference = t;
                in_a_row = 0;
            }
            skip
        })
        .collect()
}

/// Token selection's static-token correction (design/method.md §2): a token that did not run
/// since step s gets H_L(s) + (X(t) − X(s))·W_s + b_s at step t. The fit regresses the stack
/// output's change on the stack input's change, token by token, over the same (s, t) pairs as
/// the blocks (a token's gap since it last ran is, like a block's, bounded in practice by how
/// often it is selected; --max-skips stands for it).
fn fit_static_tokens(
    runs: &[Vec<Vec<Array2<f32>>>],
    blocks: usize,
    options: &CalibrateOptions,
) -> anyhow::Result<(StaticTokensCalibration, StaticTokensReport)> {
    let steps = runs[0].len();
    let hidden = runs[0][0][0].ncols();
    let data = |run: &[Vec<Array2<f32>>], s: usize, t: usize| {
        let delta = &run[t][0] - &run[s][0];
        let change = &run[t][blocks] - &run[s][blocks];
        (delta, change)
    };
    let mut acc = RidgeAccumulator::new(hidden, hidden);
    for run in runs {
        for (s, t) in pairs(steps, options.max_gap) {
            let (delta, change) = data(run, s, t);
            acc.add(delta.view(), change.view());
        }
    }
    let fit = acc.solve(options.lambda).map_err(anyhow::Error::msg)?;
    let (mut reuse, mut corrected, mut count) = (0.0, 0.0, 0usize);
    for run in runs {
        for (s, t) in pairs(steps, options.max_gap) {
            let (delta, change) = data(run, s, t);
            let norm = frobenius_sq(run[t][blocks].view()).max(f64::MIN_POSITIVE);
            let left = &change - &(delta.dot(&fit.weight) + &ndarray::ArrayView1::from(&fit.bias));
            reuse += (frobenius_sq(change.view()) / norm).sqrt();
            corrected += (frobenius_sq(left.view()) / norm).sqrt();
            count += 1;
        }
    }
    let (reuse, corrected) = (reuse / count as f64, corrected / count as f64);
    Ok((
        StaticTokensCalibration {
            relative_error_reuse: reuse,
            relative_error_corrected: corrected,
            weight: None,
            bias: None,
            correction: Some(Correction {
                weight: fit.weight.iter().copied().collect(),
                bias: fit.bias.clone(),
            }),
        },
        StaticTokensReport {
            error_reuse: reuse,
            error_corrected: corrected,
            fit_rms_without: fit.rms_without,
            fit_rms_with: fit.rms_with,
        },
    ))
}

/// What FastCache's per-step schedule is calibrated for, besides the recording in
/// [`RecordOptions`].
#[derive(Clone, Debug)]
pub struct ScheduleTargets {
    /// One schedule per target FLOP speedup, all from the same recorded runs.
    pub speedups: Vec<f64>,
    /// The first steps always computed (at least 2: the forecast needs two snapshots).
    pub warmup: usize,
    /// The last steps always computed (at least 1).
    pub cooldown: usize,
    /// Most consecutive skipped steps; `None`: one more than the shortest runs the budget allows.
    pub max_run: Option<usize>,
}

impl Default for ScheduleTargets {
    fn default() -> Self {
        ScheduleTargets {
            speedups: vec![2.0],
            warmup: 2,
            cooldown: 1,
            max_run: None,
        }
    }
}

/// The largest FLOP speedup a schedule of `steps` steps can reach on `stack`: computing only the
/// protected first and last steps.
pub fn reachable_speedup(stack: &DitStack, steps: usize, targets: &ScheduleTargets) -> f64 {
    let protected = (targets.warmup.max(2) + targets.cooldown.max(1)).min(steps);
    let blocks = stack.blocks.len();
    let pattern: Vec<Vec<bool>> = (0..steps).map(|s| vec![s >= protected; blocks]).collect();
    stack.expected_speedup_of_run(&pattern)
}

/// The largest FLOP speedup the probe test can reach in `steps` steps on `stack`: blocks
/// 1..L−1 skipped at every step but the protected first and last ones.
pub fn probe_reachable_speedup(stack: &DitStack, steps: usize, targets: &ScheduleTargets) -> f64 {
    let (warmup, cooldown) = (targets.warmup.max(2), targets.cooldown.max(1));
    let blocks = stack.blocks.len();
    let pattern: Vec<Vec<bool>> = (0..steps)
        .map(|s| {
            let open = s >= warmup && s + cooldown < steps;
            (0..blocks).map(|b| open && b > 0).collect()
        })
        .collect();
    stack.expected_speedup_of_run(&pattern)
}

/// What calibration says about one schedule.
#[derive(Clone, Debug)]
pub struct ScheduleReport {
    pub target_speedup: f64,
    pub steps: usize,
    pub computed: Vec<usize>,
    pub max_run: usize,
    pub predicted_speedup: f64,
    pub choice: schedule::Choice,
    /// With a PSNR target: what the search measured.
    pub validation: Option<Validation>,
}

/// The stack's residual R = H_L − X recorded over the calibration runs, even and odd runs kept
/// apart for the held-out comparison of the forecasters.
struct ScheduleRecording {
    stack: DitStack,
    halves: Vec<schedule::Grams>,
    steps: usize,
}

impl ScheduleRecording {
    fn record(model_path: &Path, options: &RecordOptions) -> anyhow::Result<ScheduleRecording> {
        if options.runs < 2 || options.settings.steps < 3 {
            bail!(
                "a schedule needs at least 2 calibration runs (one to fit, one to check) of at least 3 steps"
            );
        }
        let stack = stack_of(model_path)?;
        let last = stack.blocks.last().context("the stack has no blocks")?;
        let boundaries = vec![stack.stack_input.clone(), last.output.clone()];
        let mut halves: Vec<schedule::Grams> = Vec::new();
        let mut run_index = 0;
        record_each(model_path, &boundaries, options, &mut |run| {
            let residuals: Vec<Array2<f32>> = run.iter().map(|step| &step[1] - &step[0]).collect();
            if halves.is_empty() {
                halves = vec![schedule::Grams::new(residuals.len()); 2];
            }
            halves[run_index % 2].add_run(&residuals);
            run_index += 1;
        })?;
        let steps = halves[0].gram.nrows();
        Ok(ScheduleRecording {
            stack,
            halves,
            steps,
        })
    }

    /// The FLOP speedup of a compute mask, as the bench counts it.
    fn speedup_of(&self, compute: &[bool]) -> f64 {
        let blocks = self.stack.blocks.len();
        let pattern: Vec<Vec<bool>> = compute.iter().map(|&c| vec![!c; blocks]).collect();
        self.stack.expected_speedup_of_run(&pattern)
    }

    /// Every step costs the same when computed, so a schedule's speedup depends on its count of
    /// computed steps alone.
    fn speedup_with_budget(&self, budget: usize) -> f64 {
        let mut compute = vec![false; self.steps];
        compute[..budget.min(self.steps)].fill(true);
        self.speedup_of(&compute)
    }

    fn protected(&self, targets: &ScheduleTargets) -> usize {
        (targets.warmup.max(2) + targets.cooldown.max(1)).min(self.steps)
    }

    /// The cheapest schedule computing `budget` steps, as a calibration file and its report.
    fn schedule(
        &self,
        model_path: &Path,
        options: &RecordOptions,
        targets: &ScheduleTargets,
        budget: usize,
        target: serde_json::Value,
    ) -> anyhow::Result<(Calibration, ScheduleReport)> {
        let steps = self.steps;
        let protected = self.protected(targets);
        let skipped = steps - budget;
        let gaps = (budget + 1).saturating_sub(protected).max(1);
        let max_run = targets.max_run.unwrap_or(skipped.div_ceil(gaps) + 1);
        let constraints = schedule::Constraints {
            budget,
            warmup: targets.warmup,
            cooldown: targets.cooldown,
            max_run,
        };
        let choice = schedule::choose([&self.halves[0], &self.halves[1]], constraints)
            .map_err(anyhow::Error::msg)?;
        let predicted_speedup = self.speedup_of(&choice.compute);
        let target_speedup = target["speedup"].as_f64().unwrap_or(predicted_speedup);
        let computed: Vec<usize> = (0..steps).filter(|&s| choice.compute[s]).collect();
        let calibration = Calibration {
            version: CALIBRATION_VERSION,
            fingerprint: fingerprint(&self.stack),
            recording: recording(
                model_path,
                options,
                json!({
                    "warmup": targets.warmup.max(2),
                    "cooldown": targets.cooldown.max(1),
                    "max_run": max_run,
                }),
            ),
            target,
            blocks: Vec::new(),
            static_tokens: None,
            schedule: Some(fastcache_passes::calibration::ScheduleCalibration {
                compute: choice.compute.clone(),
                weights: choice.weights.clone(),
                forecaster: choice.forecaster.name().into(),
                target_speedup,
                predicted_speedup,
                relative_error: choice.relative_error,
                candidates: serde_json::to_value(&choice.candidates)?,
                validation_psnr: None,
            }),
            probe: None,
        };
        let report = ScheduleReport {
            target_speedup,
            steps,
            computed,
            max_run,
            predicted_speedup,
            choice,
            validation: None,
        };
        Ok((calibration, report))
    }
}

/// Calibrates FastCache's per-step policy at each target speedup: records the stack's residual
/// over the runs, then searches each schedule (see [`schedule`]).
pub fn calibrate_schedules(
    model_path: &Path,
    options: &RecordOptions,
    targets: &ScheduleTargets,
) -> anyhow::Result<Vec<(Calibration, ScheduleReport)>> {
    let recording = ScheduleRecording::record(model_path, options)?;
    let steps = recording.steps;
    let protected = recording.protected(targets);
    let reachable = reachable_speedup(&recording.stack, steps, targets);
    let mut out = Vec::new();
    for &target in &targets.speedups {
        if !(target.is_finite() && target >= 1.0) {
            bail!("--target-speedup must be 1 or more, got {target}");
        }
        // The most computed steps that still reach the target.
        let budget = (protected..=steps)
            .rev()
            .find(|&b| recording.speedup_with_budget(b) >= target)
            .with_context(|| {
                format!(
                    "a {target}x FLOP speedup is out of reach: computing only the {protected} protected steps of {steps} gives {reachable:.2}x"
                )
            })?;
        out.push(
            recording
                .schedule(
                    model_path,
                    options,
                    targets,
                    budget,
                    json!({"speedup": target}),
                )
                .with_context(|| format!("cannot calibrate a schedule for {target}x"))?,
        );
    }
    Ok(out)
}

/// Samples `seeds` (one batch each) through the model at `path`; the final latents of each.
fn sample_runs(
    path: &Path,
    options: &RecordOptions,
    seeds: &[u64],
) -> anyhow::Result<Vec<ndarray::ArrayD<f32>>> {
    let model = Model::load(path)?;
    let (_, spec) = engine::ModelSpec::load(path)?;
    let setup = SamplerSetup::new(&spec, Some(&model), &options.settings)?;
    drop(model);
    let mut engine = engine::open(options.engine, path, &options.engine_options)?;
    seeds
        .iter()
        .map(|&seed| {
            sampler::sample_seeded(
                engine.as_mut(),
                &setup,
                options.batch,
                &options.classes,
                seed,
                &mut |_| {},
            )
            .map(|t| t.latents)
        })
        .collect()
}

/// Mean per-sample PSNR of `samples` against `references` (as the bench measures it).
fn mean_psnr(
    references: &[ndarray::ArrayD<f32>],
    samples: &[ndarray::ArrayD<f32>],
) -> anyhow::Result<f64> {
    let mut values = Vec::new();
    for (r, s) in references.iter().zip(samples) {
        let r4 = r.view().into_dimensionality::<ndarray::Ix4>()?;
        let s4 = s.view().into_dimensionality::<ndarray::Ix4>()?;
        let space = crate::metrics::image::Space::for_channels(r4.shape()[1]);
        values.extend(
            crate::metrics::image::fidelity(r4, s4, space)
                .iter()
                .map(|f| f.psnr),
        );
    }
    Ok(values.iter().sum::<f64>() / values.len().max(1) as f64)
}

/// What the PSNR search measured on its validation runs.
#[derive(Clone, Debug)]
pub struct Validation {
    pub target_psnr: f64,
    pub seeds: Vec<u64>,
    /// (computed steps, FLOP speedup, mean PSNR) of every schedule tried, in the order tried.
    pub tried: Vec<(usize, f64, f64)>,
}

/// FastCache's per-step policy for a quality target: the fastest schedule whose mean PSNR
/// against the uncached model reaches `target_psnr` on validation runs. The schedules are the
/// speed-targeted ones (one per budget of computed steps); the validation runs use seeds after
/// the recorded ones, so the PSNR is measured on runs the schedule was not fitted on. A
/// bisection over the budget (PSNR falls as fewer steps compute).
pub fn calibrate_for_psnr(
    model_path: &Path,
    options: &RecordOptions,
    targets: &ScheduleTargets,
    target_psnr: f64,
) -> anyhow::Result<(Calibration, ScheduleReport)> {
    if !target_psnr.is_finite() || target_psnr <= 0.0 {
        bail!("--target-psnr must be a positive number of dB, got {target_psnr}");
    }
    let recording = ScheduleRecording::record(model_path, options)?;
    let validation_runs = options.runs.div_ceil(2).max(2);
    let seeds: Vec<u64> = (0..validation_runs)
        .map(|r| options.seed + (options.runs + r) as u64)
        .collect();
    let references = sample_runs(model_path, options, &seeds)
        .context("cannot sample the uncached validation runs")?;
    let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
    let mut tried = Vec::new();
    let mut measure = |budget: usize| -> anyhow::Result<(f64, Calibration, ScheduleReport)> {
        let (calibration, report) = recording.schedule(
            model_path,
            options,
            targets,
            budget,
            json!({"psnr": target_psnr}),
        )?;
        let mut model = Model::load(model_path)?;
        fastcache_passes::rewrite::rewrite_with_schedule(&mut model, &calibration, None, None)?;
        let path = dir.path().join(format!("schedule-{budget}.onnx"));
        model.save(&path, &model.default_storage(&path))?;
        let psnr = mean_psnr(&references, &sample_runs(&path, options, &seeds)?)?;
        tried.push((budget, report.predicted_speedup, psnr));
        Ok((psnr, calibration, report))
    };
    // The fewest computed steps a schedule can have under the skip cap (--max-skips).
    let mut least = recording.protected(targets);
    while least < recording.steps
        && recording
            .schedule(model_path, options, targets, least, json!({}))
            .is_err()
    {
        least += 1;
    }
    // Invariant: `high` (computing every step) meets the target; `low` does not, or is the least.
    let (mut low, mut high) = (least, recording.steps);
    let mut best = None;
    let (psnr, calibration, report) = measure(low)?;
    if psnr >= target_psnr {
        best = Some((calibration, report));
        high = low;
    }
    while high - low > 1 {
        let mid = (low + high) / 2;
        let (psnr, calibration, report) = measure(mid)?;
        if psnr >= target_psnr {
            high = mid;
            best = Some((calibration, report));
        } else {
            low = mid;
        }
    }
    let (mut calibration, mut report) = match best {
        Some(found) => found,
        // Only computing every step meets it: a schedule without skips.
        None => {
            let (_, calibration, report) = measure(recording.steps)?;
            (calibration, report)
        }
    };
    let psnr = tried
        .iter()
        .find(|t| t.0 == report.computed.len())
        .map(|t| t.2);
    if let Some(schedule) = calibration.schedule.as_mut() {
        schedule.validation_psnr = psnr;
    }
    report.validation = Some(Validation {
        target_psnr,
        seeds,
        tried,
    });
    Ok((calibration, report))
}

/// What calibration says about one probe test.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub target_speedup: f64,
    pub steps: usize,
    pub runs: usize,
    pub alpha: f64,
    pub max_run: usize,
    pub tolerance: f64,
    /// The gate fitted on all runs, run on them.
    pub in_sample: probe::Outcome,
    /// Each half's gate (tolerance searched on that half) run on the other half, counts pooled.
    pub held_out: probe::Outcome,
}

/// Calibrates FastCache's probe test (see [`probe`]) at each target speedup, at significance
/// `alpha`: records the probe's residual h₀ − X and the rest's H_L − h₀ per run, measures the
/// false-skip rate with the gate of one half of the runs on the other half (both ways), and fits
/// the gate that is kept on all runs.
pub fn calibrate_probes(
    model_path: &Path,
    options: &RecordOptions,
    targets: &ScheduleTargets,
    alpha: f64,
) -> anyhow::Result<Vec<(Calibration, ProbeReport)>> {
    if !(alpha > 0.0 && alpha < 1.0) {
        bail!("--alpha must lie strictly between 0 and 1, got {alpha}");
    }
    if options.runs < 2 || options.settings.steps < 4 {
        bail!(
            "a probe test needs at least 2 calibration runs (one to fit, one to check) of at least 4 steps"
        );
    }
    let stack = stack_of(model_path)?;
    if stack.blocks.len() < 2 {
        bail!(
            "FastCache's probe test needs at least 2 blocks (block 0 decides for the rest); this model has {}",
            stack.blocks.len()
        );
    }
    let last = stack.blocks.last().context("the stack has no blocks")?;
    let boundaries = vec![
        stack.stack_input.clone(),
        stack.blocks[1].input.clone(),
        last.output.clone(),
    ];
    let mut runs: Vec<probe::RunGrams> = Vec::new();
    record_each(model_path, &boundaries, options, &mut |run| {
        let steps = run.len();
        let mut grams = probe::RunGrams {
            probe: schedule::Grams::new(steps),
            rest: schedule::Grams::new(steps),
        };
        let probe: Vec<Array2<f32>> = run.iter().map(|step| &step[1] - &step[0]).collect();
        let rest: Vec<Array2<f32>> = run.iter().map(|step| &step[2] - &step[1]).collect();
        grams.probe.add_run(&probe);
        grams.rest.add_run(&rest);
        runs.push(grams);
    })?;
    let steps = runs[0].probe.gram.nrows();
    let blocks = stack.blocks.len();
    let pattern_of = |skipped: &[bool]| -> Vec<Vec<bool>> {
        skipped
            .iter()
            .map(|&skip| (0..blocks).map(|b| skip && b > 0).collect())
            .collect()
    };
    let speedup_of = |skipped: &[bool]| stack.expected_speedup_of_run(&pattern_of(skipped));
    let (warmup, cooldown) = (targets.warmup.max(2), targets.cooldown.max(1));
    let forced: Vec<bool> = (0..steps)
        .map(|s| s < warmup || s + cooldown >= steps)
        .collect();
    let halves: [Vec<probe::RunGrams>; 2] = [0, 1].map(|h| {
        runs.iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == h)
            .map(|(_, r)| r.clone())
            .collect()
    });
    let mut out = Vec::new();
    for &target in &targets.speedups {
        if !(target.is_finite() && target >= 1.0) {
            bail!("--target-speedup must be 1 or more, got {target}");
        }
        let max_run = targets
            .max_run
            .unwrap_or_else(|| probe_max_run(&forced, target, &speedup_of));
        let unreachable = || {
            let open: Vec<bool> = forced.iter().map(|&f| !f).collect();
            anyhow::anyhow!(
                "a {target}x FLOP speedup is out of reach for the probe test with at most {max_run} skipped steps in a row (skipping blocks 1..{} at every unprotected step gives {:.2}x); lower the target or raise --max-skips",
                blocks - 1,
                speedup_of(&open)
            )
        };
        // Held out: each half's gate on the other half.
        let mut held_out: Option<probe::Outcome> = None;
        for (fit, eval) in [(&halves[0], &halves[1]), (&halves[1], &halves[0])] {
            let (tolerance, gate) =
                probe::for_speedup(fit, &forced, max_run, alpha, target, &speedup_of)
                    .ok_or_else(unreachable)?;
            let seen = probe::outcome(eval, &gate, tolerance, &speedup_of);
            held_out = Some(match held_out {
                None => seen,
                Some(first) => probe::Outcome {
                    speedup: 0.5 * (first.speedup + seen.speedup),
                    bad_cases: first.bad_cases + seen.bad_cases,
                    passed_bad_cases: first.passed_bad_cases + seen.passed_bad_cases,
                    bad_steps: first.bad_steps + seen.bad_steps,
                    false_skips: first.false_skips + seen.false_skips,
                    skipped_error: 0.5 * (first.skipped_error + seen.skipped_error),
                    skip_rate: 0.5 * (first.skip_rate + seen.skip_rate),
                },
            });
        }
        let held_out = held_out.expect("two halves");
        let (tolerance, gate) =
            probe::for_speedup(&runs, &forced, max_run, alpha, target, &speedup_of)
                .ok_or_else(unreachable)?;
        let in_sample = probe::outcome(&runs, &gate, tolerance, &speedup_of);
        // JSON has no infinity: "no bad step seen" becomes the largest threshold.
        let finite = |v: &[f64]| -> Vec<f32> {
            v.iter()
                .map(|&x| if x.is_finite() { x as f32 } else { f32::MAX })
                .collect()
        };
        let calibration = Calibration {
            version: CALIBRATION_VERSION,
            fingerprint: fingerprint(&stack),
            recording: recording(
                model_path,
                options,
                json!({"warmup": warmup, "cooldown": cooldown, "max_run": max_run}),
            ),
            target: json!({"speedup": target, "alpha": alpha}),
            blocks: Vec::new(),
            static_tokens: None,
            schedule: None,
            probe: Some(fastcache_passes::calibration::ProbeCalibration {
                forced: forced.clone(),
                thresholds: finite(&gate.thresholds),
                gamma: finite(&gate.gamma),
                max_run: max_run as i64,
                alpha,
                tolerance: if tolerance.is_finite() {
                    tolerance
                } else {
                    f64::MAX
                },
                target_speedup: target,
                predicted_speedup: in_sample.speedup,
                held_out_bad_cases: held_out.bad_cases,
                held_out_passed_bad_cases: held_out.passed_bad_cases,
                held_out_false_skip_rate: held_out.false_skip_rate(),
                held_out_bad_steps: held_out.bad_steps,
                held_out_false_skips: held_out.false_skips,
                held_out_speedup: held_out.speedup,
            }),
        };
        out.push((
            calibration,
            ProbeReport {
                target_speedup: target,
                steps,
                runs: runs.len(),
                alpha,
                max_run,
                tolerance,
                in_sample,
                held_out,
            },
        ));
    }
    Ok(out)
}

/// The default cap on consecutive skips for a probe test: what an evenly spread set of skips
/// reaching `target` needs, plus two, so that the test has room to move skips where they are safe.
fn probe_max_run(forced: &[bool], target: f64, speedup_of: &dyn Fn(&[bool]) -> f64) -> usize {
    let free: Vec<usize> = (0..forced.len()).filter(|&s| !forced[s]).collect();
    let needed = (0..=free.len())
        .find(|&k| {
            let mut skipped = vec![false; forced.len()];
            for &s in &free[..k] {
                skipped[s] = true;
            }
            speedup_of(&skipped) >= target
        })
        .unwrap_or(free.len());
    let computed_free = free.len() - needed;
    needed.div_ceil(computed_free + 1) + 2
}
