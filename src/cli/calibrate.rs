//! `fastcache calibrate MODEL --steps N --runs R -o FILE`: record block inputs and outputs over
//! seeded sampling runs, fit each block's linear correction, choose each block's change scale,
//! and write the calibration that `fastcache rewrite --calibration FILE` bakes in.

use std::path::PathBuf;

use anyhow::{Context, bail};
use fastcache_passes::rewrite::CacheOptions;

use super::output::say;
use super::sampler_args::SamplerArgs;
use crate::calibrate::{
    CalibrateOptions, ProbeReport, RecordOptions, ScheduleReport, ScheduleTargets, Target,
    calibrate, calibrate_for_psnr, calibrate_probes, calibrate_schedules,
};
use crate::engine::{EngineKind, Options, onnxruntime::Provider};
use crate::sampler::Settings;

#[derive(clap::Args)]
pub struct Args {
    /// The original (not rewritten) model.
    pub model: PathBuf,
    /// Sampling steps per run (calibrate with the step count you will sample with).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Seeded sampling runs to record.
    #[arg(long, default_value_t = 4)]
    pub runs: usize,
    /// Seed of the first run; run r uses seed + r.
    #[arg(long, default_value_t = 1000)]
    pub seed: u64,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Classifier-free guidance scale used while recording.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Class labels (default: drawn from the seed).
    #[arg(long = "class", value_delimiter = ',')]
    pub classes: Vec<i64>,
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, value_enum, default_value_t = EngineKind::Tract)]
    pub engine: EngineKind,
    #[arg(long, value_enum, default_value_t = Provider::Cpu)]
    pub ep: Provider,
    /// Choose each block's change scale so that every skip the test allows stays within this
    /// relative error of the block's output.
    #[arg(long, conflicts_with = "target_skip_rate")]
    pub target_error: Option<f64>,
    /// Instead: choose each block's change scale so this share of steps would skip.
    #[arg(long, conflicts_with = "target_speedup")]
    pub target_skip_rate: Option<f64>,
    /// FastCache's per-step policy (what `rewrite --calibration` then builds): choose the steps
    /// that compute the stack for this FLOP speedup, the forecast of the others, and write no
    /// per-block fits.
    #[arg(long, conflicts_with = "target_error")]
    pub target_speedup: Option<f64>,
    /// With --target-speedup: how the per-step policy decides. `schedule`: a fixed set of steps
    /// computes. `probe`: block 0 runs every step and tests its own forecast, a step skipping
    /// when that test passes at --alpha (FastCache's statistical test; --alpha is then the
    /// share of bad steps it lets through, measured on held-out runs).
    #[arg(long, value_enum, default_value_t = Decision::Schedule)]
    pub decision: Decision,
    /// FastCache's per-step policy for a quality target instead: the fastest schedule whose mean
    /// PSNR against the uncached model reaches this many dB on validation runs (seeds after the
    /// recorded ones), found by sampling the candidates.
    #[arg(long, conflicts_with_all = ["target_error", "target_skip_rate", "target_speedup"])]
    pub target_psnr: Option<f64>,
    /// Per-block cache: the --max-skips you will rewrite with, the farthest reference a fit sees.
    /// Per-step schedule: the most consecutive skipped steps (default: one more than the target
    /// needs).
    #[arg(long)]
    pub max_skips: Option<i64>,
    #[arg(long, default_value_t = CacheOptions::default().alpha)]
    pub alpha: f64,
    /// Steps computed first, before any skip.
    #[arg(long, default_value_t = CacheOptions::default().warmup)]
    pub warmup: i64,
    /// Per-step schedule: the last steps always computed.
    #[arg(long, default_value_t = ScheduleTargets::default().cooldown)]
    pub cooldown: usize,
    /// Ridge penalty, relative to the mean feature variance.
    #[arg(long, default_value_t = 1e-3)]
    pub lambda: f64,
    /// Where to write the calibration (JSON; the weights go to a .bin beside it).
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Decision {
    Schedule,
    Probe,
}

/// The target error used when neither target is given.
pub const DEFAULT_TARGET_ERROR: f64 = 0.05;

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.output.extension().is_none_or(|e| e != "json") {
        bail!(
            "{}: the calibration is written as JSON; name it *.json",
            args.output.display()
        );
    }
    for (name, value) in [
        ("--target-error", args.target_error),
        ("--target-skip-rate", args.target_skip_rate),
    ] {
        if let Some(v) = value
            && !(v > 0.0 && v <= 1.0)
        {
            bail!("{name} must lie in (0, 1], got {v}");
        }
    }
    let max_skips = args.max_skips.unwrap_or(CacheOptions::default().max_skips);
    if max_skips < 1 || args.warmup < 0 {
        bail!("--max-skips must be at least 1 and --warmup 0 or more");
    }
    let target = match (args.target_error, args.target_skip_rate) {
        (_, Some(rate)) => Target::SkipRate(rate),
        (Some(error), None) => Target::Error(error),
        (None, None) => Target::Error(DEFAULT_TARGET_ERROR),
    };
    let record = RecordOptions {
        settings: Settings {
            kind: args.sampler.sampler,
            steps: args.steps,
            guidance: args.cfg,
            overrides: args.sampler.overrides(),
        },
        runs: args.runs,
        seed: args.seed,
        batch: args.batch,
        classes: args.classes.clone(),
        engine: args.engine,
        engine_options: Options {
            provider: args.ep,
            threads: None,
            cuda_graphs: false,
        },
    };
    if args.decision == Decision::Probe && args.target_speedup.is_none() {
        bail!("--decision probe needs --target-speedup S");
    }
    let targets = |speedups: Vec<f64>| ScheduleTargets {
        speedups,
        warmup: args.warmup as usize,
        cooldown: args.cooldown,
        max_run: args.max_skips.map(|m| m as usize),
    };
    let context = || format!("cannot calibrate {}", args.model.display());
    if let Some(psnr) = args.target_psnr {
        if args.decision == Decision::Probe {
            bail!(
                "--target-psnr calibrates a schedule; the probe test is calibrated for --target-speedup"
            );
        }
        let (calibration, report) =
            calibrate_for_psnr(&args.model, &record, &targets(Vec::new()), psnr)
                .with_context(context)?;
        print_schedule(&report, args.runs);
        write(&calibration, &args.output)?;
        return Ok(());
    }
    if let Some(speedup) = args.target_speedup {
        let targets = targets(vec![speedup]);
        if args.decision == Decision::Probe {
            let (calibration, report) =
                calibrate_probes(&args.model, &record, &targets, args.alpha)
                    .with_context(context)?
                    .remove(0);
            print_probe(&report);
            write(&calibration, &args.output)?;
        } else {
            let (calibration, report) = calibrate_schedules(&args.model, &record, &targets)
                .with_context(context)?
                .remove(0);
            print_schedule(&report, args.runs);
            write(&calibration, &args.output)?;
        }
        return Ok(());
    }
    let options = CalibrateOptions {
        record,
        target,
        lambda: args.lambda,
        max_gap: max_skips as usize,
        alpha: args.alpha,
        warmup: args.warmup as usize,
    };
    let (calibration, report) = calibrate(&args.model, &options)
        .with_context(|| format!("cannot calibrate {}", args.model.display()))?;
    calibration
        .save(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;

    say!(
        "recorded {} runs x {} steps; {} (step, reference) pairs per block; target {}",
        args.runs,
        report.steps,
        report.pairs_per_block,
        match target {
            Target::Error(e) => format!("error {e}"),
            Target::SkipRate(r) => format!("skip rate {r}"),
        }
    );
    say!();
    say!(
        "block  FLOPs  kappa       skip error: reuse  fitted   fit RMS: before  after     expected skip rate"
    );
    for b in &report.blocks {
        say!(
            "{:>5}  {:>4.0}%  {:<10.3e}              {:>6.4}  {:>6.4}            {:<8.3e} {:<8.3e}  {:>5.1}%",
            b.index,
            100.0 * b.flops_share,
            b.kappa,
            b.error_residual,
            b.error_corrected,
            b.fit_rms_without,
            b.fit_rms_with,
            100.0 * b.expected_skip_rate
        );
    }
    let t = &report.static_tokens;
    say!(
        "static tokens (token selection, --motion-ratio): output error of reuse {:.4}, fitted {:.4}; fit RMS {:.3e} -> {:.3e}",
        t.error_reuse,
        t.error_corrected,
        t.fit_rms_without,
        t.fit_rms_with
    );
    say!();
    say!(
        "expected FLOP speedup: {:.2}x (the cost model, as `fastcache bench` counts it, over the skips the rewritten model's test would make on the recorded runs: references chained, the skip cap and warm-up applied; the recorded inputs are the uncached model's)",
        report.expected_speedup
    );
    say!(
        "wrote {} (+ {})",
        args.output.display(),
        args.output.with_extension("bin").display()
    );
    Ok(())
}

/// Writes a per-step calibration (it has no `.bin`) and says so.
fn write(
    calibration: &fastcache_passes::calibration::Calibration,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    calibration
        .save(output)
        .with_context(|| format!("cannot write {}", output.display()))?;
    say!("wrote {}", output.display());
    Ok(())
}

fn print_schedule(report: &ScheduleReport, runs: usize) {
    let choice = &report.choice;
    if let Some(v) = &report.validation {
        say!(
            "recorded {runs} runs x {} steps; target {} dB mean PSNR against the uncached model on {} validation runs (seeds {:?})",
            report.steps,
            v.target_psnr,
            v.seeds.len(),
            v.seeds
        );
        say!();
        say!("computed steps  FLOP speedup  validation PSNR dB");
        for (budget, speedup, psnr) in &v.tried {
            say!(
                "{budget:>14}  {speedup:>11.2}x  {psnr:>18.2}{}",
                if *budget == report.computed.len() {
                    "  <- chosen"
                } else {
                    ""
                }
            );
        }
        say!();
    }
    say!(
        "recorded {runs} runs x {} steps; {}: {} of {} steps compute, at most {} skipped in a row",
        report.steps,
        match report.validation {
            Some(_) => "the chosen schedule".to_string(),
            None => format!("target {}x FLOP speedup", report.target_speedup),
        },
        report.computed.len(),
        report.steps,
        report.max_run
    );
    say!();
    say!("forecaster      held-out relative error  held-out cost (sum of RMS errors)");
    for c in &choice.candidates {
        say!(
            "{:<14}  {:>23.4}  {:>10.4e}{}",
            c.forecaster.name(),
            c.held_out_relative_error,
            c.held_out_cost,
            if c.forecaster == choice.forecaster {
                "  <- chosen"
            } else {
                ""
            }
        );
    }
    say!();
    let computed: Vec<String> = report.computed.iter().map(|s| s.to_string()).collect();
    say!("computed steps: {}", computed.join(" "));
    say!(
        "relative forecast error over the skipped steps (all runs): {:.4}",
        choice.relative_error
    );
    say!(
        "expected FLOP speedup: {:.2}x (the cost model, as `fastcache bench` counts it: skipped steps run the embedding and the final layer only)",
        report.predicted_speedup
    );
}

fn print_probe(report: &ProbeReport) {
    say!(
        "recorded {} runs x {} steps; target {}x FLOP speedup with the probe test at alpha {}, at most {} skipped in a row",
        report.runs,
        report.steps,
        report.target_speedup,
        report.alpha,
        report.max_run
    );
    say!(
        "tolerance: a step is bad where the stack's relative forecast error exceeds {:.4} (searched for the target)",
        report.tolerance
    );
    let rate = |o: &crate::calibrate::probe::Outcome| {
        o.false_skip_rate()
            .map_or("none met".to_string(), |r| format!("{r:.3}"))
    };
    say!();
    say!(
        "                         FLOP speedup  skip rate  test: bad cases  passed  false-skip rate   run: bad steps met  skipped"
    );
    for (name, o) in [
        ("calibration runs", &report.in_sample),
        ("held out (halves)", &report.held_out),
    ] {
        say!(
            "{name:<24} {:>11.2}x  {:>8.1}%  {:>15}  {:>6}  {:>15}   {:>18}  {:>7}",
            o.speedup,
            100.0 * o.skip_rate,
            o.bad_cases,
            o.passed_bad_cases,
            rate(o),
            o.bad_steps,
            o.false_skips
        );
    }
    say!();
    say!(
        "stated alpha {}, measured false-skip rate on held-out runs {}: of the {} (step, last computed steps) cases the gate can meet whose stack forecast is bad, {} pass the test (each half's gate, its tolerance searched on that half, on the other half)",
        report.alpha,
        rate(&report.held_out),
        report.held_out.bad_cases,
        report.held_out.passed_bad_cases
    );
    say!(
        "relative forecast error over the skipped steps: {:.4} (calibration runs), {:.4} (held out)",
        report.in_sample.skipped_error,
        report.held_out.skipped_error
    );
}
