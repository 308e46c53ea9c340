//! `fastcache bench`: the uncached model, the plain baseline of fewer sampling steps, FastCache
//! (the block cache; token merging alone and with the cache) and its peers (First-Block-Cache,
//! TeaCache, static interval), each at a few settings, sampled from the same seeds and measured
//! for speed and fidelity.
//!
//! How it measures, and why:
//! - *Same seeds.* Batch j of every variant starts from the noise (and class labels) of seed
//!   `seed + j`, so each accelerated sample has an uncached twin to be compared with (PSNR, SSIM)
//!   and so that timing differences are not differences in work.
//! - *Interleaved.* For each batch, every variant runs once before the next batch starts, in an
//!   order rotated from batch to batch, so slow phases of a shared machine fall on all variants
//!   alike rather than on whichever ran during them. Speedup is the median over batches of the
//!   paired ratio t(uncached, batch j) / t(variant, batch j); time per image the median over
//!   batches of t / batch. Each time is the wall time of a whole sampling run (every model call,
//!   the sampler's updates and the state hand-over) in this process, after every model was
//!   loaded and warmed up by one untimed run.
//! - *The cost model.* Next to the measured speedup stands the FLOP ratio the cost model
//!   ([`fastcache_passes::analysis::DitStack`]) predicts for the skip pattern that actually
//!   happened: per call, the FLOPs of the whole model minus those of the blocks the call's
//!   `fastcache.skipped` stats say it skipped; fewer steps save whole calls; token merging's
//!   blocks cost what the cost model counts on the merged tokens, plus the merge itself (the
//!   counts the rewrite records in its policy). The gap between the two is the overhead the FLOP
//!   count does not see (the decision, state copies, small ops).
//! - *Memory.* The state a rewritten model carries (bytes, from its contract at this batch), and
//!   each variant's memory measured on its own: a child process (`fastcache memory-probe`,
//!   [`memory`]) opens only that variant's engine and runs one sampling run at the bench's batch;
//!   its resident-set peak minus its resident set before the engine was opened is what the
//!   engine allocates for that model (weights, session, arena, state). The bench process's own
//!   peak, every loaded model included, stays in the JSON for comparison.
//! - *Fewer steps, done well.* Besides Euler with fewer steps, the solvers family runs the
//!   uncached model with a second-order solver (Heun, Adams–Bashforth 2; DPM-Solver++(2M) for ε
//!   models) at the same numbers of model calls: what a user who finds 50 steps too slow tries
//!   first. Its speedup is still measured against the reference's run.
//! - *The Pareto summary.* At 2×, 3× and 4× measured speedup, each family's PSNR and Fréchet
//!   distance interpolated linearly along its own points, where they span that speed.
//! - *Distribution quality.* With a classifier and reference statistics (the trained MNIST
//!   model's, by default), the Fréchet distance between Gaussian fits of the classifier's
//!   features of each variant's samples and of real images, and the classifier's accuracy on the
//!   class each sample was asked for.
//! - *FastCache's calibration* is recorded on seeds that the evaluation never uses, and its
//!   predicted FLOP speedup stands in the report beside the one the bench counted.

pub mod memory;
pub mod plot;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use fastcache_passes::analysis::{Structure, discover};
use fastcache_passes::cache::Approximation;
use fastcache_passes::cache::step::{Indicator, PeerOptions, PeerPolicy, rewrite_with_peer};
use fastcache_passes::calibration::Calibration;
use fastcache_passes::contract::{Contract, ShapeDim};
use fastcache_passes::ir::Model;
use fastcache_passes::merge::{MergeConfig, MergeFlops};
use fastcache_passes::rewrite::{CacheOptions, rewrite, rewrite_with_schedule};
use ndarray::{ArrayD, IxDyn};
use serde_json::json;

use crate::calibrate::{
    CalibrateOptions, RecordOptions, ScheduleReport, ScheduleTargets, Target, calibrate,
    calibrate_probes, calibrate_schedules, probe_reachable_speedup, reachable_speedup,
};
use crate::engine::{self, DType, Engine, EngineKind, Options, Tensor, TensorMap};
use crate::metrics::{Gaussian, Space, accuracy, fidelity, frechet_distance};
use crate::sampler::{self, Objective, SamplerKind, SamplerMeta, SamplerSetup, Settings};
pub use report::{Report, VariantReport};

/// Seeds of FastCache's calibration runs start here; evaluation seeds are `seed + batch index`,
/// and the bench refuses an evaluation range that would reach this.
pub const CALIBRATION_SEED: u64 = 1_000_000;

/// The policy families a bench can include, in the order reports list them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Family {
    /// The uncached model with fewer sampling steps.
    Steps,
    /// The uncached model with a second-order solver at the fewer-steps baselines' model-call
    /// counts: Heun and Adams–Bashforth 2 for rectified flow, DPM-Solver++(2M) for ε models.
    Solvers,
    /// FastCache's per-step policy, calibrated at target speedups: the calibrated steps run the
    /// stack, the others forecast its residual.
    Fastcache,
    /// FastCache's per-step policy with its probe test (block 0 runs every step and tests its own
    /// forecast), calibrated at the same target speedups.
    FastcacheProbe,
    /// The paper's per-block FastCache, calibrated at target errors.
    FastcachePerBlock,
    /// The same per-block decisions, with each skipped block's residual forecast along time
    /// (order 1, through its last two computed steps) instead of reused: what the forecast buys
    /// where decisions stay per block.
    FastcachePerBlockForecast,
    /// FastCache's token merging, alone and inside the computed steps of FastCache's first
    /// schedule (the first of --fastcache-speedups).
    Merge,
    /// First-Block-Cache.
    Fbcache,
    /// TeaCache.
    Teacache,
    /// Static interval (FORA-style).
    Interval,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Steps => "steps",
            Family::Solvers => "solvers",
            Family::Fastcache => "fastcache",
            Family::FastcacheProbe => "fastcache-probe",
            Family::FastcachePerBlock => "fastcache-per-block",
            Family::FastcachePerBlockForecast => "fastcache-per-block-forecast",
            Family::Merge => "merge",
            Family::Fbcache => "fbcache",
            Family::Teacache => "teacache",
            Family::Interval => "interval",
        }
    }
}

/// A classifier and the real-data statistics of its features.
#[derive(Clone, Debug)]
pub struct ClassifierFiles {
    pub model: PathBuf,
    /// `.npz` with `mu` [F] and `sigma` [F, F] (float64), optionally `count`, `fd_real_floor`,
    /// `val_accuracy`.
    pub reference: PathBuf,
    /// The outputs holding the logits [B, classes] and the features [B, F]; `None`: detected
    /// (outputs named `logits` and `features`, else told apart by their width).
    pub logits: Option<String>,
    pub features: Option<String>,
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: PathBuf,
    pub families: Vec<Family>,
    /// Steps of the uncached reference and of every caching policy.
    pub steps: usize,
    /// The reference's (and every policy's) sampler; `None`: the model's default.
    pub sampler: Option<SamplerKind>,
    /// The `fastcache.sampler` fields given on the command line.
    pub overrides: SamplerMeta,
    /// Samples per variant.
    pub samples: usize,
    /// Samples per sampling run (per model call, doubled with CFG).
    pub batch: usize,
    /// Batch j uses seed `seed + j`.
    pub seed: u64,
    pub guidance: Option<f32>,
    pub engine: EngineKind,
    pub threads: Option<usize>,
    /// Every (batch, variant) run is timed this many times; metrics use the first.
    pub repeats: usize,
    pub fewer_steps: Vec<usize>,
    pub fbcache_thresholds: Vec<f64>,
    pub teacache_thresholds: Vec<f64>,
    pub teacache_indicator: Indicator,
    pub intervals: Vec<i64>,
    /// FastCache's per-step policy: one schedule per target FLOP speedup (one recording).
    pub fastcache_speedups: Vec<f64>,
    /// The probe test's α (the fastcache-probe family).
    pub probe_alpha: f64,
    /// The per-block forecast's damping d (the fastcache-per-block-forecast family).
    pub per_block_damping: f32,
    /// Per-block FastCache settings: one calibration per target error...
    pub fastcache_errors: Vec<f64>,
    /// ...or a given calibration file (then `fastcache_errors` is ignored).
    pub calibration: Option<PathBuf>,
    pub calibration_runs: usize,
    /// Token merging's keep ratios; each runs alone and with the block cache of the first
    /// FastCache setting.
    pub merge_ratios: Vec<f64>,
    pub classifier: Option<ClassifierFiles>,
    /// Every rewritten variant runs through its host split (`rewrite --split`), written beside
    /// its model as `<model>.split/`, instead of the single graph.
    pub split: bool,
    /// Where rewritten models and calibrations are written.
    pub work_dir: PathBuf,
    /// The `fastcache` executable, to measure each variant's memory in a child process of its
    /// own (`fastcache memory-probe`); `None` leaves the engine-memory column out.
    pub memory_probe: Option<memory::ProbeCommand>,
}

impl BenchOptions {
    /// The sampler settings of a variant: `steps` steps with `kind` (or the bench's sampler).
    fn settings(&self, steps: usize, kind: Option<SamplerKind>) -> Settings {
        Settings {
            kind: kind.or(self.sampler),
            steps,
            guidance: self.guidance,
            overrides: self.overrides.clone(),
        }
    }
}

/// What the progress display needs.
pub struct Progress<'a> {
    pub done: u64,
    pub total: u64,
    pub message: &'a str,
}

/// A variant before its engine is opened: what runs, from which file, how many steps.
struct VariantSpec {
    id: String,
    policy: &'static str,
    setting: String,
    parameters: serde_json::Value,
    steps: usize,
    /// `None`: the bench's sampler.
    sampler: Option<SamplerKind>,
    path: PathBuf,
    notes: Vec<String>,
}

/// Everything prepared about one variant.
struct Variant {
    id: String,
    policy: &'static str,
    setting: String,
    parameters: serde_json::Value,
    steps: usize,
    path: PathBuf,
    engine: Box<dyn Engine>,
    setup: SamplerSetup,
    /// Per position in `fastcache.skipped`, the block index it reports on.
    skip_blocks: Vec<usize>,
    /// The cost model's FLOPs per sample of each block when computed, and of a whole call that
    /// skips nothing (the original's, unless token merging changed them).
    block_flops: Vec<f64>,
    call_flops: f64,
    state_bytes: u64,
    notes: Vec<String>,
    /// The host split this variant runs through (`--split`).
    split: Option<PathBuf>,
    /// The first batch of samples, for the samples figure.
    first_batch: Option<ArrayD<f32>>,
}

/// Per-variant accumulators over the runs.
#[derive(Default)]
struct Tally {
    seconds: Vec<f64>,
    per_image: Vec<f64>,
    ratios: Vec<f64>,
    computed_flops: Vec<f64>,
    skipped_slots: f64,
    slots: f64,
    skip_sum: Vec<Vec<f64>>,
    skip_runs: usize,
    peak: u64,
    rss_before: u64,
    psnr: Vec<f64>,
    ssim: Vec<f64>,
    features: Vec<f32>,
    logits: Vec<f32>,
    labels: Vec<i64>,
}

struct Classifier {
    engine: Box<dyn Engine>,
    input: String,
    logits: String,
    features: String,
    reference: Gaussian,
    info: serde_json::Value,
    classes: usize,
}

/// Bytes of the state a model carries, from its contract, at a call batch.
fn state_bytes(contract: Option<&Contract>, call_batch: usize) -> u64 {
    let Some(contract) = contract else {
        return 0;
    };
    contract
        .state
        .iter()
        .map(|pair| {
            let elements: u64 = pair
                .shape
                .iter()
                .map(|d| match d {
                    ShapeDim::Fixed(n) => (*n).max(0) as u64,
                    ShapeDim::Named(_) => call_batch as u64,
                })
                .product();
            elements * DType::from_name(&pair.dtype).map_or(1, DType::size)
        })
        .sum()
}

/// Reads a float64 array from an `.npz`.
fn npz_f64(path: &Path, name: &str) -> anyhow::Result<ArrayD<f64>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut npz = ndarray_npy::NpzReader::new(file)
        .with_context(|| format!("{} is not a .npz file", path.display()))?;
    npz.by_name::<ndarray::OwnedRepr<f64>, IxDyn>(name)
        .or_else(|_| npz.by_name::<ndarray::OwnedRepr<f64>, IxDyn>(&format!("{name}.npy")))
        .with_context(|| format!("{}: no float64 array '{name}'", path.display()))
}

/// Which of the classifier's outputs are the logits and which the features: the names given,
/// else outputs named `logits` and `features`; of two outputs, one named gives the other; two
/// unnamed [B, n] outputs are told apart by which is as wide as the model has classes.
fn classifier_outputs(
    spec: &engine::ModelSpec,
    files: &ClassifierFiles,
    classes: Option<i64>,
) -> anyhow::Result<(String, String)> {
    let model = files.model.display();
    let names: Vec<&str> = spec.outputs.iter().map(|o| o.name.as_str()).collect();
    let pick =
        |given: &Option<String>, default: &str, option: &str| -> anyhow::Result<Option<String>> {
            match given {
                Some(name) if spec.output(name).is_none() => bail!(
                    "the classifier {model} has no output '{name}' ({option}); its outputs are {}",
                    names.join(", ")
                ),
                Some(name) => Ok(Some(name.clone())),
                None => Ok(names.contains(&default).then(|| default.to_string())),
            }
        };
    let logits = pick(&files.logits, "logits", "--classifier-logits")?;
    let features = pick(&files.features, "features", "--classifier-features")?;
    let other = |name: &str| names.iter().find(|n| **n != name).map(|n| n.to_string());
    let width = |name: &str| match spec.output(name)?.dims.as_deref()? {
        [_, fastcache_passes::ir::Dim::Fixed(n)] => Some(*n),
        _ => None,
    };
    let found = match (logits, features, names.as_slice()) {
        (Some(l), Some(f), _) => Some((l, f)),
        (Some(l), None, [_, _]) => other(&l).map(|f| (l, f)),
        (None, Some(f), [_, _]) => other(&f).map(|l| (l, f)),
        (None, None, [a, b]) => match (width(a) == classes, width(b) == classes) {
            (true, false) if classes.is_some() => Some((a.to_string(), b.to_string())),
            (false, true) if classes.is_some() => Some((b.to_string(), a.to_string())),
            _ => None,
        },
        _ => None,
    };
    found.with_context(|| {
        format!(
            "cannot tell the classifier {model}'s logits [B, classes] from its features [B, F] among its outputs {}: name them with --classifier-logits and --classifier-features",
            names.join(", ")
        )
    })
}

fn load_classifier(
    files: &ClassifierFiles,
    options: &BenchOptions,
    latent: [usize; 3],
    classes: Option<i64>,
) -> anyhow::Result<Classifier> {
    let engine_options = Options {
        threads: options.threads,
        ..Options::default()
    };
    let engine = engine::open(options.engine, &files.model, &engine_options)
        .with_context(|| format!("cannot load the classifier {}", files.model.display()))?;
    let spec = engine.spec().clone();
    let [input] = spec.inputs.as_slice() else {
        bail!(
            "the classifier {} must take one input (an image batch), it takes {}",
            files.model.display(),
            spec.inputs.len()
        );
    };
    if let Some(dims) = &input.dims {
        let fixed: Vec<Option<i64>> = dims
            .iter()
            .map(|d| match d {
                fastcache_passes::ir::Dim::Fixed(n) => Some(*n),
                _ => None,
            })
            .collect();
        let want = [latent[0] as i64, latent[1] as i64, latent[2] as i64];
        if fixed.len() != 4
            || fixed[1..]
                .iter()
                .zip(want)
                .any(|(d, w)| d.is_some_and(|d| d != w))
        {
            bail!(
                "the classifier's input '{}' is {}, but the model makes samples of [batch, {}, {}, {}]",
                input.name,
                input.describe(),
                latent[0],
                latent[1],
                latent[2]
            );
        }
    }
    let (logits, features) = classifier_outputs(&spec, files, classes)?;
    let mu = npz_f64(&files.reference, "mu")?;
    let sigma = npz_f64(&files.reference, "sigma")?;
    let f = mu.len();
    if sigma.shape() != [f, f] {
        bail!(
            "{}: sigma is {:?}, expected [{f}, {f}] for mu of {f}",
            files.reference.display(),
            sigma.shape()
        );
    }
    let reference = Gaussian {
        mean: nalgebra::DVector::from_iterator(f, mu.iter().copied()),
        cov: nalgebra::DMatrix::from_row_iterator(f, f, sigma.iter().copied()),
        count: 0,
    };
    let scalar = |name: &str| {
        npz_f64(&files.reference, name)
            .ok()
            .and_then(|a| a.iter().next().copied())
    };
    let count = {
        let file = std::fs::File::open(&files.reference)?;
        let mut npz = ndarray_npy::NpzReader::new(file)?;
        npz.by_name::<ndarray::OwnedRepr<i64>, IxDyn>("count")
            .ok()
            .and_then(|a| a.iter().next().copied())
    };
    let info = json!({
        "model": files.model.display().to_string(),
        "reference": files.reference.display().to_string(),
        "features": f,
        "reference_count": count,
        "reference_fd_real_floor": scalar("fd_real_floor"),
        "reference_val_accuracy": scalar("val_accuracy"),
    });
    Ok(Classifier {
        engine,
        input: input.name.clone(),
        logits,
        features,
        reference,
        info,
        classes: 0,
    })
}

impl Classifier {
    /// Features and logits of images [B, C, H, W], clamped to [−1, 1] as they are shown.
    fn run(&mut self, images: &ArrayD<f32>) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let clamped = images.mapv(|v| v.clamp(-1.0, 1.0));
        let mut inputs = TensorMap::new();
        inputs.insert(self.input.clone(), Tensor::F32(clamped));
        let mut outputs = self.engine.run(&inputs)?;
        let take = |outputs: &mut TensorMap, name: &str| -> anyhow::Result<ArrayD<f32>> {
            outputs
                .remove(name)
                .and_then(Tensor::into_f32)
                .with_context(|| format!("the classifier gave no float32 '{name}'"))
        };
        let logits = take(&mut outputs, &self.logits)?;
        let features = take(&mut outputs, &self.features)?;
        self.classes = logits.shape().get(1).copied().unwrap_or(0);
        let width = features.len() / images.shape()[0].max(1);
        if width != self.reference.mean.len() {
            bail!(
                "the classifier's features '{}' have {width} values per image, but the reference statistics have {} (mu): they do not belong together",
                self.features,
                self.reference.mean.len()
            );
        }
        Ok((
            features.iter().copied().collect(),
            logits.iter().copied().collect(),
        ))
    }
}

/// Cuts `model`, the rewritten model saved at `path`, at its `If`s into `<path>.split/` (see
/// [`fastcache_passes::split`]).
fn write_host_split(model: &fastcache_passes::ir::Model, path: &Path) -> anyhow::Result<PathBuf> {
    let segments = fastcache_passes::split::split_at_ifs(model)
        .with_context(|| format!("cannot split {}", path.display()))?;
    let dir = path.with_extension("split");
    fastcache_passes::split::write_split(&dir, model, &segments)?;
    Ok(dir)
}

/// What the memory figures mean, for the report.
fn memory_note(probed: bool, peak_resets: bool) -> String {
    let engine = if probed {
        "each variant measured on its own in a child process (`fastcache memory-probe`): its resident-set peak during one sampling run at this batch minus the resident set before its engine was opened, i.e. what the engine allocates for that model (weights, session, arena, state; ONNX Runtime's library too, alike for every variant)."
    } else {
        "not measured (no executable to run the child-process probe)."
    };
    let process = if peak_resets {
        "The bench process's own peak (VmHWM reset before each run; every loaded model included) is in report.json as peak_rss_bytes."
    } else {
        "The bench process's own peak (VmHWM since the process started: this kernel refused to reset it) is in report.json as peak_rss_bytes."
    };
    format!(
        "{engine} {process} state: the bytes of cross-step state the model carries at this batch (with CFG: twice the samples)."
    )
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Prepares every variant's model file: the original, or a rewrite of it.
fn prepare(
    options: &BenchOptions,
    objective: Objective,
    calibration_classes: &[i64],
    progress: &mut dyn FnMut(Progress),
    left_out: &mut Vec<String>,
) -> anyhow::Result<Vec<VariantSpec>> {
    let mut specs = vec![VariantSpec {
        id: "uncached".to_string(),
        policy: "uncached",
        setting: format!("{} steps", options.steps),
        parameters: json!({}),
        steps: options.steps,
        sampler: None,
        path: options.model.clone(),
        notes: Vec::new(),
    }];
    let save = |model: &Model, file: &str| -> anyhow::Result<PathBuf> {
        let path = options.work_dir.join(file);
        model
            .save(&path, &model.default_storage(&path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    };
    let original = || Model::load(&options.model).context("cannot read the model");
    let mut families = options.families.clone();
    families.sort();
    families.dedup();
    // On an MMDiT the per-block families need per-block calibrations and merging needs one
    // stream: neither is built for two streams, so they are left out and the report says so.
    let joint = matches!(discover(&original()?), Ok(Structure::Joint(_)));
    families.retain(|&family| {
        let unbuilt = joint
            && matches!(
                family,
                Family::FastcachePerBlock | Family::FastcachePerBlockForecast | Family::Merge
            );
        if unbuilt {
            left_out.push(format!(
                "{}: not built for dual-stream (MMDiT) models ({})",
                family.name(),
                if family == Family::Merge {
                    "token merging runs on one stream"
                } else {
                    "per-block calibration of two streams"
                }
            ));
        }
        !unbuilt
    });
    if families.contains(&Family::Merge) {
        for &ratio in &options.merge_ratios {
            fastcache_passes::merge::merged_count(ratio, 1)
                .with_context(|| format!("--merge-ratios {ratio}"))?;
        }
    }
    // The per-block variant's settings (calibrations).
    let settings: Vec<(String, Calibration, serde_json::Value)> = if !families.iter().any(|f| {
        matches!(
            f,
            Family::FastcachePerBlock | Family::FastcachePerBlockForecast
        )
    }) {
        Vec::new()
    } else {
        match &options.calibration {
            Some(path) => {
                let calibration = Calibration::load(path)
                    .with_context(|| format!("cannot read the calibration {}", path.display()))?;
                vec![(
                    "given".into(),
                    calibration,
                    json!({"calibration": path.display().to_string()}),
                )]
            }
            None => {
                let mut out = Vec::new();
                for &error in &options.fastcache_errors {
                    progress(Progress {
                        done: 0,
                        total: 0,
                        message: &format!("calibrating fastcache for error {error}"),
                    });
                    let (calibration, report) = calibrate(
                        &options.model,
                        &calibrate_options(options, calibration_classes, error),
                    )
                    .with_context(|| format!("cannot calibrate for error {error}"))?;
                    let path = options.work_dir.join(format!("calibration-e{error}.json"));
                    calibration.save(&path)?;
                    out.push((
                        format!("e{error}"),
                        calibration,
                        json!({
                            "target_error": error,
                            "calibration_runs": options.calibration_runs,
                            "calibration_seed": CALIBRATION_SEED,
                            "calibration_expected_speedup": report.expected_speedup,
                        }),
                    ));
                }
                out
            }
        }
    };
    // FastCache's schedules, which the merge family combines with too.
    let (schedules, schedules_note) = if families
        .iter()
        .any(|f| matches!(f, Family::Fastcache | Family::Merge))
    {
        fastcache_schedules(options, &original()?, calibration_classes, progress)?
    } else {
        (Vec::new(), None)
    };
    for family in families {
        match family {
            Family::Steps => {
                for &n in &options.fewer_steps {
                    if n == 0 || n >= options.steps {
                        bail!(
                            "--fewer-steps {n}: a fewer-steps baseline needs 1 to {} steps (the reference takes {})",
                            options.steps - 1,
                            options.steps
                        );
                    }
                    specs.push(VariantSpec {
                        id: format!("steps-{n}"),
                        policy: "steps",
                        setting: format!("{n} steps"),
                        parameters: json!({"steps": n}),
                        steps: n,
                        sampler: None,
                        path: options.model.clone(),
                        notes: vec![
                            "the uncached model with fewer sampling steps: it saves whole calls"
                                .into(),
                        ],
                    });
                }
            }
            Family::Solvers => {
                let solvers: &[SamplerKind] = match objective {
                    Objective::RectifiedFlow => &[SamplerKind::Heun, SamplerKind::Ab2],
                    Objective::Epsilon => &[SamplerKind::DpmPp2m],
                };
                for &kind in solvers {
                    // At the model-call counts of the fewer-steps baselines.
                    for &calls in &options.fewer_steps {
                        let steps = calls / kind.calls_per_step();
                        if steps < 2 || steps * kind.calls_per_step() >= options.steps {
                            continue;
                        }
                        let calls = steps * kind.calls_per_step();
                        specs.push(VariantSpec {
                            id: format!("{}-{steps}", kind.name()),
                            policy: kind.name(),
                            setting: format!("{steps} steps, {calls} calls"),
                            parameters: json!({"sampler": kind.name(), "steps": steps, "calls": calls}),
                            steps,
                            sampler: Some(kind),
                            path: options.model.clone(),
                            notes: Vec::new(),
                        });
                    }
                }
            }
            Family::Fastcache => {
                for (calibration, report) in &schedules {
                    let target = report.target_speedup;
                    let mut model = original()?;
                    rewrite_with_schedule(&mut model, calibration, None, None)
                        .context("cannot rewrite with fastcache's schedule")?;
                    let path = save(&model, &format!("fastcache-s{target}.onnx"))?;
                    specs.push(VariantSpec {
                        id: format!("fastcache-s{target}"),
                        policy: "fastcache",
                        setting: format!(
                            "target {target}x, {} of {} steps, {}",
                            report.computed.len(),
                            report.steps,
                            report.choice.forecaster.name()
                        ),
                        parameters: json!({
                            "target_speedup": target,
                            "computed_steps": report.computed,
                            "max_run": report.max_run,
                            "forecaster": report.choice.forecaster.name(),
                            "forecasters_held_out": report.choice.candidates,
                            "calibration_runs": options.calibration_runs,
                            "calibration_seed": CALIBRATION_SEED,
                            "calibration_expected_speedup": report.predicted_speedup,
                        }),
                        steps: options.steps,
                        sampler: None,
                        path,
                        notes: schedules_note.iter().cloned().collect(),
                    });
                }
            }
            Family::FastcacheProbe => {
                progress(Progress {
                    done: 0,
                    total: 0,
                    message: "calibrating fastcache's probe tests",
                });
                let mut targets = ScheduleTargets {
                    speedups: options.fastcache_speedups.clone(),
                    ..ScheduleTargets::default()
                };
                let stack = discover(&original()?)?.stack().clone();
                let limit = probe_reachable_speedup(&stack, options.steps, &targets);
                let why = "with block 0 run at every step";
                let (kept, dropped_note) =
                    reachable_targets(&targets.speedups, limit, options.steps, why);
                // The probe test is an extra family: where none of the targets is reachable,
                // it is left out (and the report says so) rather than failing the bench.
                if kept.is_empty() {
                    left_out.push(format!(
                        "fastcache-probe: none of --fastcache-speedups {:?} is reachable by the probe test in {} steps (at most {limit:.2}x FLOPs {why})",
                        targets.speedups,
                        options.steps
                    ));
                    continue;
                }
                targets.speedups = kept;
                let calibrations = calibrate_probes(
                    &options.model,
                    &record_options(options, calibration_classes),
                    &targets,
                    options.probe_alpha,
                )
                .context("cannot calibrate fastcache's probe tests")?;
                for (calibration, report) in calibrations {
                    let target = report.target_speedup;
                    calibration
                        .save(&options.work_dir.join(format!("calibration-p{target}.json")))?;
                    let mut model = original()?;
                    rewrite_with_schedule(&mut model, &calibration, None, None)
                        .context("cannot rewrite with fastcache's probe test")?;
                    let path = save(&model, &format!("fastcache-p{target}.onnx"))?;
                    specs.push(VariantSpec {
                        id: format!("fastcache-p{target}"),
                        policy: "fastcache-probe",
                        setting: format!("target {target}x, alpha {}", report.alpha),
                        parameters: json!({
                            "target_speedup": target,
                            "alpha": report.alpha,
                            "tolerance": report.tolerance,
                            "max_run": report.max_run,
                            "held_out_false_skip_rate": report.held_out.false_skip_rate(),
                            "held_out_bad_cases": report.held_out.bad_cases,
                            "calibration_runs": options.calibration_runs,
                            "calibration_seed": CALIBRATION_SEED,
                            "calibration_expected_speedup": report.in_sample.speedup,
                        }),
                        steps: options.steps,
                        sampler: None,
                        path,
                        notes: dropped_note.iter().cloned().collect(),
                    });
                }
            }
            Family::FastcachePerBlock | Family::FastcachePerBlockForecast => {
                let approximation = match family {
                    Family::FastcachePerBlock => Approximation::Residual,
                    _ => Approximation::Forecast {
                        order: 1,
                        damping: options.per_block_damping,
                    },
                };
                let name = family.name();
                for (tag, calibration, parameters) in &settings {
                    let mut parameters = parameters.clone();
                    let mut model = original()?;
                    let cache = CacheOptions {
                        calibration: Some(calibration.clone()),
                        approximation,
                        ..CacheOptions::default()
                    };
                    rewrite(&mut model, Some(&cache), None, None)
                        .context("cannot rewrite with the FastCache block cache")?;
                    parameters["alpha"] = json!(cache.alpha);
                    parameters["max_skips"] = json!(cache.max_skips);
                    parameters["warmup"] = json!(cache.warmup);
                    if approximation != Approximation::Residual {
                        parameters["approximation"] = json!(approximation);
                    }
                    let path = save(&model, &format!("{name}-{tag}.onnx"))?;
                    let setting = setting_of(&parameters);
                    specs.push(VariantSpec {
                        id: format!("{name}-{tag}"),
                        policy: name,
                        setting,
                        parameters,
                        steps: options.steps,
                        sampler: None,
                        path,
                        notes: Vec::new(),
                    });
                }
            }
            Family::Merge => {
                // With the cache: FastCache's default, the schedule of the first target speedup.
                let with_cache = schedules.first();
                // Merging alone at every ratio, then with the cache: one series each.
                let mut combined = Vec::new();
                for &ratio in &options.merge_ratios {
                    let merge = MergeConfig::new(ratio);
                    let mut model = original()?;
                    let summary = rewrite(&mut model, None, None, Some(&merge))
                        .with_context(|| format!("cannot rewrite with token merging at {ratio}"))?;
                    let contract =
                        Contract::from_model(&model)?.context("a rewrite has a contract")?;
                    let path = save(&model, &format!("merge-{ratio}.onnx"))?;
                    let span = summary.merge.as_ref().map(|m| m.span).unwrap_or_default();
                    specs.push(VariantSpec {
                        id: format!("merge-{ratio}"),
                        policy: "merge",
                        setting: format!("keep {ratio}, blocks {}-{}", span.0, span.1),
                        parameters: contract.policy.clone(),
                        steps: options.steps,
                        sampler: None,
                        path,
                        notes: summary.warnings,
                    });
                    let Some((calibration, report)) = with_cache else {
                        continue;
                    };
                    let mut model = original()?;
                    let summary =
                        rewrite_with_schedule(&mut model, calibration, None, Some(&merge))
                            .with_context(|| {
                                format!(
                                    "cannot rewrite with token merging at {ratio} and the cache"
                                )
                            })?;
                    let contract =
                        Contract::from_model(&model)?.context("a rewrite has a contract")?;
                    let mut parameters = contract.policy.clone();
                    parameters["cache_calibration"] = json!({
                        "target_speedup": report.target_speedup,
                        "computed_steps": report.computed,
                        "calibration_runs": options.calibration_runs,
                        "calibration_seed": CALIBRATION_SEED,
                    });
                    let path = save(&model, &format!("merge-cache-{ratio}.onnx"))?;
                    combined.push(VariantSpec {
                        id: format!("merge+cache-{ratio}"),
                        policy: "merge+cache",
                        setting: format!(
                            "keep {ratio}, blocks {}-{}, schedule {}x",
                            span.0, span.1, report.target_speedup
                        ),
                        parameters,
                        steps: options.steps,
                        sampler: None,
                        path,
                        notes: summary.step.warnings,
                    });
                }
                specs.extend(combined);
            }
            Family::Fbcache | Family::Teacache | Family::Interval => {
                let policies: Vec<(PeerPolicy, String, String)> = match family {
                    Family::Fbcache => options
                        .fbcache_thresholds
                        .iter()
                        .map(|&t| {
                            (
                                PeerPolicy::FirstBlock { threshold: t },
                                format!("{t}"),
                                format!("threshold {t}"),
                            )
                        })
                        .collect(),
                    Family::Teacache => options
                        .teacache_thresholds
                        .iter()
                        .map(|&t| {
                            (
                                PeerPolicy::TeaCache {
                                    threshold: t,
                                    indicator: options.teacache_indicator,
                                },
                                format!("{t}"),
                                format!("threshold {t}"),
                            )
                        })
                        .collect(),
                    _ => options
                        .intervals
                        .iter()
                        .map(|&n| {
                            (
                                PeerPolicy::Interval { interval: n },
                                format!("{n}"),
                                format!("every {n}"),
                            )
                        })
                        .collect(),
                };
                for (policy, tag, setting) in policies {
                    let mut model = original()?;
                    let peer = PeerOptions::new(policy);
                    let summary = rewrite_with_peer(&mut model, &peer)
                        .with_context(|| format!("cannot rewrite with {}", peer.policy.name()))?;
                    let contract =
                        Contract::from_model(&model)?.context("a rewrite has a contract")?;
                    let path = save(&model, &format!("{}-{tag}.onnx", family.name()))?;
                    specs.push(VariantSpec {
                        id: format!("{}-{tag}", family.name()),
                        policy: family.name(),
                        setting,
                        parameters: contract.policy.clone(),
                        steps: options.steps,
                        sampler: None,
                        path,
                        notes: summary.warnings,
                    });
                }
            }
        }
    }
    Ok(specs)
}

/// How a FastCache setting reads in the table.
fn setting_of(parameters: &serde_json::Value) -> String {
    match parameters.get("target_error") {
        Some(e) => format!("error {e}"),
        None => "given calibration".into(),
    }
}

/// Calibration classes: the first `min(classes, 10)` ids, one sample each, so that every class a
/// small model has is seen; models without class labels get none.
fn calibration_classes(setup: &SamplerSetup) -> Vec<i64> {
    match &setup.null_class {
        Some((n, _)) if setup.roles.class_label.is_some() && *n > 0 => (0..(*n).min(10)).collect(),
        _ => Vec::new(),
    }
}

/// How FastCache's calibrations record: on seeds from [`CALIBRATION_SEED`], never evaluated.
fn record_options(options: &BenchOptions, classes: &[i64]) -> RecordOptions {
    RecordOptions {
        settings: options.settings(options.steps, None),
        runs: options.calibration_runs,
        seed: CALIBRATION_SEED,
        batch: classes.len().max(2),
        classes: classes.to_vec(),
        engine: options.engine,
        engine_options: Options {
            threads: options.threads,
            ..Options::default()
        },
    }
}

/// FastCache's schedules at every reachable target speedup, from one recording, saved to the
/// work folder; and a note on the targets left out. No target reachable is an error.
fn fastcache_schedules(
    options: &BenchOptions,
    model: &Model,
    calibration_classes: &[i64],
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<(Vec<(Calibration, ScheduleReport)>, Option<String>)> {
    progress(Progress {
        done: 0,
        total: 0,
        message: "calibrating fastcache's schedules",
    });
    let mut targets = ScheduleTargets {
        speedups: options.fastcache_speedups.clone(),
        ..ScheduleTargets::default()
    };
    let stack = discover(model)?.stack().clone();
    let limit = reachable_speedup(&stack, options.steps, &targets);
    let why = "with the first 2 and the last step computed";
    let (kept, dropped_note) = reachable_targets(&targets.speedups, limit, options.steps, why);
    if kept.is_empty() {
        bail!(
            "--fastcache-speedups {:?}: none is reachable in {} steps (at most {limit:.2}x FLOPs {why})",
            targets.speedups,
            options.steps
        );
    }
    targets.speedups = kept;
    let schedules = calibrate_schedules(
        &options.model,
        &record_options(options, calibration_classes),
        &targets,
    )
    .context("cannot calibrate fastcache's schedules")?;
    for (calibration, report) in &schedules {
        let target = report.target_speedup;
        calibration.save(&options.work_dir.join(format!("calibration-s{target}.json")))?;
    }
    Ok((schedules, dropped_note))
}

/// The target speedups at most `limit`, and a note on those left out (`why` says what caps them).
fn reachable_targets(
    speedups: &[f64],
    limit: f64,
    steps: usize,
    why: &str,
) -> (Vec<f64>, Option<String>) {
    let (kept, dropped): (Vec<f64>, Vec<f64>) = speedups.iter().partition(|&&s| s <= limit);
    let note = (!dropped.is_empty()).then(|| {
        format!("targets {dropped:?} left out: at most {limit:.2}x FLOPs in {steps} steps {why}")
    });
    (kept, note)
}

/// The per-block calibration for a target error, with the rewrite's default settings.
fn calibrate_options(options: &BenchOptions, classes: &[i64], error: f64) -> CalibrateOptions {
    let defaults = CacheOptions::default();
    CalibrateOptions {
        record: record_options(options, classes),
        target: Target::Error(error),
        lambda: 1e-3,
        max_gap: defaults.max_skips as usize,
        alpha: defaults.alpha,
        warmup: defaults.warmup as usize,
    }
}

/// How the bench sees a sampler's final latents as images [batch, C, H, W].
///
/// Image latents already are. A latent packed into tokens [batch, N, C] (Flux) is seen as its
/// token grid: token k at row k / side, column k % side of a square grid, each packed channel a
/// channel, the layout the sampler's generated position ids give the tokens. PSNR and SSIM are
/// then those of the latent per channel over that grid; unpacking the patches inside a token
/// would need the pipeline's packing, which the model does not state.
#[derive(Clone, Copy, Debug)]
struct ImageView {
    image: [usize; 3],
    packed: bool,
}

impl ImageView {
    fn of(setup: &SamplerSetup) -> anyhow::Result<ImageView> {
        if let Some(image) = setup.image_shape() {
            return Ok(ImageView {
                image,
                packed: false,
            });
        }
        let &[tokens, channels] = setup.roles.latent_shape.as_slice() else {
            bail!(
                "the latent '{}' {:?} is neither [batch, C, H, W] nor tokens [batch, N, C]",
                setup.roles.latent,
                setup.latent_shape(1)
            );
        };
        let side = (tokens as f64).sqrt().round() as usize;
        if side * side != tokens {
            bail!(
                "the latent '{}' is packed into {tokens} tokens, not a square grid, so the bench cannot lay them out as an image",
                setup.roles.latent
            );
        }
        Ok(ImageView {
            image: [channels, side, side],
            packed: true,
        })
    }

    fn as_images(self, latents: ArrayD<f32>) -> anyhow::Result<ArrayD<f32>> {
        if !self.packed {
            return Ok(latents);
        }
        let [channels, height, width] = self.image;
        let batch = latents.shape()[0];
        let channels_first = latents.permuted_axes(vec![0, 2, 1]);
        Ok(channels_first
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(&[batch, channels, height, width]))?)
    }
}

/// Runs the bench; `progress` hears about every finished run.
pub fn run_bench(
    options: &BenchOptions,
    progress: &mut dyn FnMut(Progress),
) -> anyhow::Result<Report> {
    if options.samples == 0 || options.batch == 0 || options.repeats == 0 {
        bail!("--samples, --batch and --repeats must be at least 1");
    }
    if options.steps < 2 {
        bail!("--steps must be at least 2");
    }
    let batches = options.samples.div_ceil(options.batch);
    if options.seed + batches as u64 > CALIBRATION_SEED {
        bail!(
            "evaluation seeds {}..{} would reach the calibration seeds ({CALIBRATION_SEED}..); choose a smaller --seed",
            options.seed,
            options.seed + batches as u64
        );
    }
    let model = Model::load(&options.model).context("cannot read the model")?;
    let stack = discover(&model)?.stack().clone();
    let spec = engine::ModelSpec::from_model(&model);
    let reference_setup =
        SamplerSetup::new(&spec, Some(&model), &options.settings(options.steps, None))
            .with_context(|| format!("cannot sample {}", options.model.display()))?;
    drop(model);
    let view = ImageView::of(&reference_setup).with_context(|| {
        format!(
            "{}: the bench measures image quality on latents as images",
            options.model.display()
        )
    })?;
    let [channels, height, width] = view.image;
    if view.packed && options.classifier.is_some() {
        bail!(
            "{}: the latent '{}' is packed into tokens {:?}; a classifier takes images, and the bench does not unpack a model's patches: leave out --classifier",
            options.model.display(),
            reference_setup.roles.latent,
            reference_setup.latent_shape(1)
        );
    }
    let space = Space::for_channels(channels);
    let n_classes = match (
        &reference_setup.roles.class_label,
        &reference_setup.null_class,
    ) {
        (Some(_), Some((n, _))) if *n > 0 => Some(*n),
        (Some(_), None) => bail!(
            "the model takes class labels but does not say its null class (the number of classes): pass --null-class, or add \"null_class\" to its fastcache.sampler metadata"
        ),
        _ => None,
    };

    // Every variant's model, then its engine and sampler.
    let cal_classes = calibration_classes(&reference_setup);
    let mut left_out = Vec::new();
    let specs = prepare(
        options,
        reference_setup.objective,
        &cal_classes,
        progress,
        &mut left_out,
    )?;
    let call_batch = if options.guidance.is_some() { 2 } else { 1 } * options.batch;
    let engine_options = Options {
        threads: options.threads,
        ..Options::default()
    };
    let flops_total = stack.total_flops().counted as f64;
    let stack_block_flops: Vec<f64> = stack
        .blocks
        .iter()
        .map(|b| b.flops.counted as f64)
        .collect();
    let mut variants = Vec::with_capacity(specs.len());
    for VariantSpec {
        id,
        policy,
        setting,
        parameters,
        steps,
        sampler,
        path,
        notes,
    } in specs
    {
        let (model, spec) = engine::ModelSpec::load(&path)?;
        let setup = SamplerSetup::new(&spec, Some(&model), &options.settings(steps, sampler))
            .with_context(|| format!("cannot sample {id}"))?;
        let contract = setup.state.contract().cloned();
        let skip_blocks: Vec<usize> = match contract
            .as_ref()
            .and_then(|c| c.policy.get("blocks"))
            .and_then(|b| serde_json::from_value::<Vec<usize>>(b.clone()).ok())
        {
            Some(blocks) => blocks,
            None => (0..stack.blocks.len()).collect(),
        };
        let split = match (&contract, options.split) {
            (Some(_), true) => Some(write_host_split(&model, &path)?),
            _ => None,
        };
        drop(model);
        let mut block_flops = stack_block_flops.clone();
        let mut call_flops = flops_total;
        let merge_flops = contract
            .as_ref()
            .and_then(|c| MergeFlops::from_policy(&c.policy));
        let merge_span = contract
            .as_ref()
            .and_then(|c| c.policy.get("merge")?.get("blocks").cloned())
            .and_then(|b| serde_json::from_value::<[usize; 2]>(b).ok());
        if let (Some(flops), Some([first, _])) = (merge_flops, merge_span) {
            for (i, (before, after)) in flops
                .blocks_before
                .iter()
                .zip(&flops.blocks_after)
                .enumerate()
            {
                if let Some(b) = block_flops.get_mut(first + i) {
                    *b = *after as f64;
                    call_flops += *after as f64 - *before as f64;
                }
            }
            call_flops += flops.overhead as f64;
        }
        let engine = match &split {
            Some(dir) => engine::split::open(options.engine, dir, spec.clone(), &engine_options),
            None => engine::open(options.engine, &path, &engine_options),
        }
        .with_context(|| format!("cannot load {}", path.display()))?;
        let mut notes = notes;
        if split.is_some() {
            notes.push(format!(
                "run through its host split: {}",
                engine.info().engine
            ));
        }
        variants.push(Variant {
            id,
            policy,
            setting,
            parameters,
            steps,
            path,
            engine,
            setup,
            skip_blocks,
            block_flops,
            call_flops,
            state_bytes: state_bytes(contract.as_ref(), call_batch),
            notes,
            split,
            first_batch: None,
        });
    }
    let mut classifier = match &options.classifier {
        Some(files) => Some(load_classifier(
            files,
            options,
            [channels, height, width],
            n_classes,
        )?),
        None => None,
    };
    let info = variants[0].engine.info();

    let labels_of = |j: usize, size: usize| -> Vec<i64> {
        match n_classes {
            Some(n) => (0..size)
                .map(|i| ((j * options.batch + i) as i64) % n)
                .collect(),
            None => Vec::new(),
        }
    };
    // One untimed run of every variant: first-call setup (planning, allocation) is not timed.
    for variant in &mut variants {
        progress(Progress {
            done: 0,
            total: 0,
            message: &format!("warming up {}", variant.id),
        });
        sampler::sample_seeded(
            variant.engine.as_mut(),
            &variant.setup,
            options.batch.min(options.samples),
            &labels_of(0, options.batch.min(options.samples)),
            options.seed,
            &mut |_| {},
        )
        .with_context(|| format!("{} failed", variant.id))?;
    }

    let peak_resets = memory::reset_peak();
    let mut tallies: Vec<Tally> = variants.iter().map(|_| Tally::default()).collect();
    let total_runs = (batches * variants.len() * options.repeats) as u64;
    let mut done = 0u64;
    for repeat in 0..options.repeats {
        for j in 0..batches {
            let size = options.batch.min(options.samples - j * options.batch);
            let labels = labels_of(j, size);
            let seed = options.seed + j as u64;
            let mut seconds = vec![0.0; variants.len()];
            let mut outputs: Vec<Option<ArrayD<f32>>> = vec![None; variants.len()];
            let count = variants.len();
            for k in 0..count {
                let v = (k + j + repeat) % count;
                let variant = &mut variants[v];
                memory::reset_peak();
                let before = memory::read().unwrap_or_default();
                let mut flags: Vec<Vec<f64>> = Vec::with_capacity(variant.setup.calls());
                let started = Instant::now();
                let trajectory = sampler::sample_seeded(
                    variant.engine.as_mut(),
                    &variant.setup,
                    size,
                    &labels,
                    seed,
                    &mut |step| {
                        flags.push(
                            step.stats
                                .get(fastcache_passes::cache::SKIPPED_OUTPUT)
                                .map(Tensor::to_f64_vec)
                                .unwrap_or_default(),
                        )
                    },
                )
                .with_context(|| format!("{}: batch {j} failed", variant.id))?;
                let elapsed = started.elapsed().as_secs_f64();
                let after = memory::read().unwrap_or_default();
                seconds[v] = elapsed;
                let tally = &mut tallies[v];
                tally.seconds.push(elapsed);
                tally.per_image.push(elapsed / size as f64);
                tally.peak = tally.peak.max(after.peak);
                tally.rss_before = if tally.rss_before == 0 {
                    before.rss
                } else {
                    tally.rss_before.min(before.rss)
                };
                // The skip pattern, per block, and the FLOPs it left to compute.
                let blocks = variant.block_flops.len();
                if tally.skip_sum.is_empty() {
                    tally.skip_sum = vec![vec![0.0; blocks]; variant.setup.calls()];
                }
                let mut computed = 0.0;
                for (t, row) in flags.iter().enumerate() {
                    let mut saved = 0.0;
                    for (position, &flag) in row.iter().enumerate() {
                        let Some(&b) = variant.skip_blocks.get(position) else {
                            continue;
                        };
                        if b < blocks {
                            tally.skip_sum[t][b] += flag;
                            saved += flag * variant.block_flops[b];
                        }
                    }
                    computed += variant.call_flops - saved;
                    tally.skipped_slots += row.iter().sum::<f64>();
                }
                tally.slots += (variant.setup.calls() * blocks) as f64;
                tally.skip_runs += 1;
                tally.computed_flops.push(computed);
                if repeat == 0 {
                    outputs[v] = Some(view.as_images(trajectory.latents)?);
                }
                done += 1;
                progress(Progress {
                    done,
                    total: total_runs,
                    message: &variant.id,
                });
            }
            for v in 0..variants.len() {
                tallies[v].ratios.push(seconds[0] / seconds[v]);
            }
            if repeat > 0 {
                continue;
            }
            // Fidelity against the uncached twin, and the classifier's view.
            let reference = outputs[0].take().expect("the uncached variant ran");
            let reference4 = reference.view().into_dimensionality::<ndarray::Ix4>()?;
            for v in 0..variants.len() {
                let sample = if v == 0 {
                    reference.clone()
                } else {
                    outputs[v].take().expect("every variant ran")
                };
                let sample4 = sample.view().into_dimensionality::<ndarray::Ix4>()?;
                for f in fidelity(reference4, sample4, space) {
                    tallies[v].psnr.push(f.psnr);
                    tallies[v].ssim.push(f.ssim);
                }
                if let Some(classifier) = classifier.as_mut() {
                    let (features, logits) = classifier.run(&sample)?;
                    tallies[v].features.extend(features);
                    tallies[v].logits.extend(logits);
                    tallies[v].labels.extend(&labels);
                }
                if j == 0 {
                    variants[v].first_batch = Some(sample);
                }
            }
        }
    }

    // Each variant's memory on its own, in a child process: what its engine allocates for it.
    let mut memories = BTreeMap::new();
    if let Some(executable) = &options.memory_probe {
        let size = options.batch.min(options.samples);
        for variant in &variants {
            progress(Progress {
                done,
                total: total_runs,
                message: &format!("measuring the memory of {}", variant.id),
            });
            let request = memory::ProbeRequest {
                model: variant.path.clone(),
                split: variant.split.clone(),
                engine: options.engine,
                threads: options.threads,
                settings: options.settings(variant.steps, Some(variant.setup.kind)),
                batch: size,
                labels: labels_of(0, size),
                seed: options.seed,
            };
            let measured = memory::probe_in_child(executable, &request)
                .with_context(|| format!("cannot measure the memory of {}", variant.id))?;
            memories.insert(variant.id.clone(), measured);
        }
    }

    let mut reports = Vec::with_capacity(variants.len());
    for (variant, tally) in variants.iter().zip(&tallies) {
        let runs = tally.skip_runs.max(1) as f64;
        let skip_map: Vec<Vec<f64>> = tally
            .skip_sum
            .iter()
            .map(|row| row.iter().map(|s| s / runs).collect())
            .collect();
        let (fd, acc) = match classifier.as_ref() {
            Some(c) if !tally.labels.is_empty() => {
                let dim = tally.features.len() / tally.labels.len();
                let fd = (tally.labels.len() >= 2)
                    .then(|| frechet_distance(&Gaussian::fit(&tally.features, dim), &c.reference));
                let acc = (n_classes.is_some() && c.classes > 0)
                    .then(|| accuracy(&tally.logits, c.classes, &tally.labels));
                (fd, acc)
            }
            _ => (None, None),
        };
        let flops_mean = mean(&tally.computed_flops);
        reports.push(VariantReport {
            id: variant.id.clone(),
            policy: variant.policy.to_string(),
            setting: variant.setting.clone(),
            steps: variant.steps,
            parameters: variant.parameters.clone(),
            seconds_per_image: median(&tally.per_image),
            seconds_per_run_mean: mean(&tally.seconds),
            speedup: median(&tally.ratios),
            speedup_flops: reference_setup.calls() as f64 * flops_total / flops_mean,
            predicted_speedup_flops: variant
                .policy
                .starts_with("fastcache")
                .then(|| {
                    variant
                        .parameters
                        .get("calibration_expected_speedup")?
                        .as_f64()
                })
                .flatten(),
            calls: variant.setup.calls(),
            engine_memory: memories.get(&variant.id).copied(),
            skip_rate: if tally.slots > 0.0 {
                tally.skipped_slots / tally.slots
            } else {
                0.0
            },
            state_bytes: variant.state_bytes,
            peak_rss_bytes: tally.peak,
            rss_before_bytes: tally.rss_before,
            psnr_mean: mean(&tally.psnr),
            psnr_min: tally.psnr.iter().copied().fold(f64::INFINITY, f64::min),
            ssim_mean: mean(&tally.ssim),
            ssim_min: tally.ssim.iter().copied().fold(f64::INFINITY, f64::min),
            fd,
            accuracy: acc,
            runs: tally.seconds.len(),
            samples: tally.psnr.len(),
            skip_map,
            notes: variant.notes.clone(),
        });
    }
    let first_batches: BTreeMap<String, ArrayD<f32>> = variants
        .iter_mut()
        .filter_map(|v| v.first_batch.take().map(|b| (v.id.clone(), b)))
        .collect();
    Ok(Report {
        model: options.model.display().to_string(),
        engine: info.engine,
        provider: info.provider,
        threads: info.threads,
        sampler: reference_setup.describe(),
        steps: options.steps,
        samples: options.samples,
        batch: options.batch,
        guidance: options.guidance,
        seeds: [options.seed, options.seed + batches as u64 - 1],
        repeats: options.repeats,
        blocks: stack.blocks.len(),
        flops_per_sample_per_call: stack.total_flops().counted,
        fidelity: if view.packed {
            format!(
                "{}; the latent packed into tokens is laid out on its {height} x {width} token grid",
                space.describe()
            )
        } else {
            space.describe().into()
        },
        classifier: classifier.as_ref().map(|c| c.info.clone()),
        memory_note: memory_note(options.memory_probe.is_some(), peak_resets),
        timing_note: format!(
            "wall time of whole sampling runs in one process, variants interleaved batch by batch in rotating order, every model warmed up by one untimed run; speedup = median over batches of t(uncached)/t(variant) on the same seeds; {} repeat(s)",
            options.repeats
        ),
        pareto: report::pareto(&reports),
        variants: reports,
        left_out,
        first_batches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastcache_passes::ir::Dim;

    fn classifier_with(outputs: &[(&str, i64)]) -> engine::ModelSpec {
        let spec = |name: &str, width: i64| engine::TensorSpec {
            name: name.to_string(),
            dtype: Some(DType::F32),
            type_name: "f32".into(),
            dims: Some(vec![Dim::Named("batch".into()), Dim::Fixed(width)]),
        };
        engine::ModelSpec {
            inputs: vec![spec("image", 1)],
            outputs: outputs.iter().map(|(n, w)| spec(n, *w)).collect(),
            metadata: Default::default(),
        }
    }

    fn files(logits: Option<&str>, features: Option<&str>) -> ClassifierFiles {
        ClassifierFiles {
            model: "c.onnx".into(),
            reference: "r.npz".into(),
            logits: logits.map(String::from),
            features: features.map(String::from),
        }
    }

    #[test]
    fn classifier_outputs_are_named_or_told_apart_by_width() {
        let named = classifier_with(&[("features", 128), ("logits", 10)]);
        assert_eq!(
            classifier_outputs(&named, &files(None, None), Some(10)).unwrap(),
            ("logits".into(), "features".into())
        );
        let unnamed = classifier_with(&[("emb", 64), ("scores", 10)]);
        assert_eq!(
            classifier_outputs(&unnamed, &files(None, None), Some(10)).unwrap(),
            ("scores".into(), "emb".into())
        );
        assert_eq!(
            classifier_outputs(&unnamed, &files(None, Some("scores")), None).unwrap(),
            ("emb".into(), "scores".into())
        );
        // As wide as the classes both: only names can tell.
        let alike = classifier_with(&[("a", 10), ("b", 10)]);
        let error = classifier_outputs(&alike, &files(None, None), Some(10)).unwrap_err();
        assert!(error.to_string().contains("--classifier-logits"), "{error}");
        let error = classifier_outputs(&named, &files(Some("scores"), None), Some(10))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "no output 'scores' (--classifier-logits); its outputs are features, logits"
            ),
            "{error}"
        );
    }
}
