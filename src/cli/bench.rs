//! `fastcache bench MODEL -o DIR`: the uncached model, fewer steps, FastCache (the block cache,
//! token merging alone and with it) and its peers at a few settings each, on the same seeds, interleaved; speed, the cost model's FLOP ratio, skip
//! rate, memory, PSNR/SSIM against the uncached twin, and (with a classifier) Fréchet distance
//! and class accuracy. Writes report.json, report.md and PNG figures into DIR and prints the
//! table. See `crate::bench` for how it measures.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::sampler_args::SamplerArgs;
use crate::bench::{BenchOptions, ClassifierFiles, Family, Progress, run_bench};
use crate::engine::EngineKind;
use fastcache_passes::cache::step::Indicator;

#[derive(clap::Args)]
pub struct Args {
    /// The original (not rewritten) model.
    pub model: PathBuf,
    /// Where report.json, report.md and the figures go (created if needed).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Policy families besides the uncached reference (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "steps,solvers,fastcache,fastcache-probe,fastcache-per-block,merge,fbcache,teacache,interval"
    )]
    pub policies: Vec<Family>,
    /// Sampling steps of the reference and of every caching policy.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// How to sample the model (the reference's sampler and the metadata fields); what a model
    /// without a `fastcache.sampler` entry needs.
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Samples per variant (the README's numbers use at least 1,000 for the Fréchet distance).
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Samples per sampling run.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Batch j starts from seed + j.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Classifier-free guidance scale (none by default).
    #[arg(long)]
    pub cfg: Option<f32>,
    #[arg(long, value_enum, default_value_t = EngineKind::Ort)]
    pub engine: EngineKind,
    /// Intra-op threads of ONNX Runtime (default: the available cores); stated in the report.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Time every run this many times (metrics use the first).
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Fewer-steps baselines (default: 2/3, 1/2, 1/3 and 1/5 of --steps, so that the family
    /// spans 2x to 4x for the Pareto summary); the solvers family runs at the same numbers of
    /// model calls.
    #[arg(long, value_delimiter = ',')]
    pub fewer_steps: Option<Vec<usize>>,
    /// First-Block-Cache thresholds (relative L1 change of block 0's residual).
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.2,0.3")]
    pub fbcache_thresholds: Vec<f64>,
    /// TeaCache thresholds (accumulated relative L1 change of the indicator).
    #[arg(long, value_delimiter = ',', default_value = "0.02,0.05,0.1,0.2")]
    pub teacache_thresholds: Vec<f64>,
    /// TeaCache's indicator: block 0's timestep-modulated input, or the stack input.
    #[arg(long, value_enum, default_value_t = IndicatorArg::ModulatedInput)]
    pub teacache_indicator: IndicatorArg,
    /// Static intervals: compute every N-th step.
    #[arg(long, value_delimiter = ',', default_value = "2,3,5")]
    pub intervals: Vec<i64>,
    /// FastCache: one calibrated schedule per target FLOP speedup (chosen so that the measured
    /// speedups span 2x to 4x for the Pareto summary).
    #[arg(long, value_delimiter = ',', default_value = "1.8,2.5,3.5,5")]
    pub fastcache_speedups: Vec<f64>,
    /// FastCache's probe test (the fastcache-probe family): the false-skip rate it is
    /// calibrated for.
    #[arg(long, default_value_t = 0.1)]
    pub probe_alpha: f64,
    /// The per-block forecast (the fastcache-per-block-forecast family): the damping d of its
    /// extrapolation (1: the straight line through the last two computed steps).
    #[arg(long, default_value_t = 1.0)]
    pub per_block_damping: f32,
    /// The paper's per-block FastCache: one calibration per target error (relative output error
    /// of a skip).
    #[arg(long, value_delimiter = ',', default_value = "0.02,0.05,0.1,0.2")]
    pub fastcache_errors: Vec<f64>,
    /// FastCache: use this calibration instead of calibrating (one setting).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// FastCache: recorded runs per calibration (seeds from 1,000,000, never evaluated).
    #[arg(long, default_value_t = 4)]
    pub calibration_runs: usize,
    /// Token merging: keep ratios, each alone and with the block cache of the first FastCache
    /// setting (the middle half of the stack merged, default options of `rewrite --merge-ratio`).
    #[arg(long, value_delimiter = ',', default_value = "0.75,0.5")]
    pub merge_ratios: Vec<f64>,
    /// A classifier (.onnx: input image [B, C, H, W] in [-1, 1]; outputs logits [B, classes]
    /// and features [B, F]) for the Fréchet distance and class accuracy. Default for the trained
    /// models in models/trained/: the classifier beside each.
    #[arg(long, requires = "reference")]
    pub classifier: Option<PathBuf>,
    /// The classifier's logits output (default: `logits`, or told from the number of classes).
    #[arg(long, requires = "classifier")]
    pub classifier_logits: Option<String>,
    /// The classifier's features output (default: `features`, or the output that is not the
    /// logits).
    #[arg(long, requires = "classifier")]
    pub classifier_features: Option<String>,
    /// The real-data feature statistics (.npz with float64 `mu`, `sigma`).
    #[arg(long, requires = "classifier")]
    pub reference: Option<PathBuf>,
    /// Do not use a classifier even where one is found beside the model.
    #[arg(long, conflicts_with_all = ["classifier", "reference"])]
    pub no_classifier: bool,
    /// Run every rewritten variant through its host split (`rewrite --split`): segments
    /// without control flow, each decision read on the host once per call or, for FastCache's
    /// schedule, taken from the manifest with no read. The uncached and fewer-steps variants
    /// run as they are.
    #[arg(long)]
    pub split: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IndicatorArg {
    ModulatedInput,
    StackInput,
}

/// The classifier beside a trained model of models/trained/ (`NAME_dit.onnx` beside
/// `NAME_classifier.onnx` and `NAME_reference.npz`), when benchmarking that model.
fn default_classifier(model: &Path) -> Option<ClassifierFiles> {
    let name = model.file_name()?.to_str()?.strip_suffix("_dit.onnx")?;
    let dir = model.parent()?;
    let files = ClassifierFiles {
        model: dir.join(format!("{name}_classifier.onnx")),
        reference: dir.join(format!("{name}_reference.npz")),
        logits: None,
        features: None,
    };
    (files.model.is_file() && files.reference.is_file()).then_some(files)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.output.is_file() {
        bail!("{}: the output must be a directory", args.output.display());
    }
    let fewer_steps = args.fewer_steps.clone().unwrap_or_else(|| {
        let mut steps: Vec<usize> = [1.5, 2.0, 3.0, 5.0]
            .iter()
            .map(|d| (args.steps as f64 / d) as usize)
            .filter(|&n| n >= 1 && n < args.steps)
            .collect();
        steps.dedup();
        steps
    });
    let classifier = match (&args.classifier, &args.reference, args.no_classifier) {
        (_, _, true) => None,
        (Some(model), Some(reference), _) => Some(ClassifierFiles {
            model: model.clone(),
            reference: reference.clone(),
            logits: args.classifier_logits.clone(),
            features: args.classifier_features.clone(),
        }),
        _ => default_classifier(&args.model),
    };
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let work = tempfile::tempdir().context("cannot create a temporary folder")?;
    let options = BenchOptions {
        model: args.model.clone(),
        families: args.policies.clone(),
        steps: args.steps,
        sampler: args.sampler.sampler,
        overrides: args.sampler.overrides(),
        samples: args.samples,
        batch: args.batch,
        seed: args.seed,
        guidance: args.cfg,
        engine: args.engine,
        threads: args.threads,
        repeats: args.repeats,
        fewer_steps,
        fbcache_thresholds: args.fbcache_thresholds.clone(),
        teacache_thresholds: args.teacache_thresholds.clone(),
        teacache_indicator: match args.teacache_indicator {
            IndicatorArg::ModulatedInput => Indicator::ModulatedInput,
            IndicatorArg::StackInput => Indicator::StackInput,
        },
        intervals: args.intervals.clone(),
        fastcache_speedups: args.fastcache_speedups.clone(),
        probe_alpha: args.probe_alpha,
        per_block_damping: args.per_block_damping,
        fastcache_errors: args.fastcache_errors.clone(),
        calibration: args.calibration.clone(),
        calibration_runs: args.calibration_runs,
        merge_ratios: args.merge_ratios.clone(),
        classifier,
        split: args.split,
        work_dir: work.path().to_path_buf(),
        memory_probe: crate::bench::memory::ProbeCommand::this_process(),
    };

    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} runs {elapsed} (eta {eta}) {msg}")
                .expect("a valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let report = run_bench(&options, &mut |p: Progress| {
        if p.total > 0 {
            bar.set_length(p.total);
            bar.set_position(p.done);
        }
        bar.set_message(p.message.to_string());
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("cannot bench {}", args.model.display()))?;
    for line in &report.left_out {
        eprintln!("warning: left out {line}");
    }
    let written = report.write(&args.output)?;
    println!("{}", report.markdown());
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("wrote {}", names.join(", "));
    Ok(())
}
