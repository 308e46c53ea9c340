//! `fastcache demo`: the whole tool on a bundled model, on the embedded engine by default.
//! Finds the DiT, calibrates FastCache's per-step schedule, rewrites, then samples the original
//! and the rewritten model from the same seed and shows which steps ran, the time and how far the
//! results differ.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use fastcache_passes::analysis::{discover, report};
use fastcache_passes::ir::Model;
use fastcache_passes::rewrite::rewrite_with_schedule;

use super::run::{output_format, write_output};
use crate::calibrate::{RecordOptions, ScheduleTargets, calibrate_schedules};
use crate::engine::{self, EngineKind, Options, onnxruntime::Provider};
use crate::metrics::psnr;
use crate::sampler::{self, SamplerSetup, Settings, Trajectory};

/// The trained model when it is there, else the smallest DiT fixture.
const BUNDLED: [&str; 2] = [
    "models/trained/mnist_dit.onnx",
    "models/fixtures/dit_ts.onnx",
];

#[derive(clap::Args)]
pub struct Args {
    /// The model (default: the bundled trained MNIST DiT, or the tiny DiT fixture).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The engine (default: ONNX Runtime when its library is found, as after scripts/setup.sh,
    /// else the embedded tract).
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 3.0)]
    pub cfg: f32,
    /// The FLOP speedup the schedule is calibrated for.
    #[arg(long, default_value_t = 2.5)]
    pub target_speedup: f64,
    /// Where the calibration, the rewritten model and the samples go.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
}

fn bundled_model() -> anyhow::Result<PathBuf> {
    BUNDLED
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no bundled model found ({}); run from the repository root or pass --model",
                BUNDLED.join(", ")
            )
        })
}

struct Sampled {
    trajectory: Trajectory,
    seconds: f64,
    engine: String,
}

/// The engine asked for, else the fastest one found: tract plans the body of an `If` afresh, and
/// unoptimised, at every call that takes it (tract 0.23.9, `IfThenElse::eval`), so a step that
/// runs the stack costs more there than in the original; ONNX Runtime has no such cost.
fn choose_engine(asked: Option<EngineKind>) -> (EngineKind, &'static str) {
    match asked {
        Some(engine) => (engine, "as asked"),
        None if crate::engine::onnxruntime::find_library().is_ok() => (
            EngineKind::Ort,
            "the fastest found: ONNX Runtime's library is here",
        ),
        None => (
            EngineKind::Tract,
            "the embedded engine: no ONNX Runtime library found (scripts/setup.sh installs one); tract re-plans an If's body at every call that takes it, so a computed step costs more than in the original",
        ),
    }
}

fn sample(
    path: &Path,
    args: &Args,
    engine: EngineKind,
    classes: &[i64],
) -> anyhow::Result<Sampled> {
    let (model, spec) = engine::ModelSpec::load(path)?;
    let settings = Settings {
        steps: args.steps,
        guidance: Some(args.cfg),
        ..Settings::default()
    };
    let setup = SamplerSetup::new(&spec, Some(&model), &settings)?;
    drop(model);
    let options = Options {
        provider: Provider::Cpu,
        threads: None,
        cuda_graphs: false,
    };
    let mut engine = engine::open(engine, path, &options)?;
    let info = engine.info();
    let started = Instant::now();
    let trajectory = sampler::sample_seeded(
        engine.as_mut(),
        &setup,
        classes.len(),
        classes,
        args.seed,
        &mut |_| {},
    )?;
    Ok(Sampled {
        trajectory,
        seconds: started.elapsed().as_secs_f64(),
        engine: format!("{} ({}, {})", info.engine, info.provider, info.threads),
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => bundled_model()?,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let (engine_kind, why) = choose_engine(args.engine);

    println!("== 1. the model: {}", model_path.display());
    let model = Model::load(&model_path).context("cannot read the model")?;
    let structure = discover(&model);
    print!(
        "{}",
        report::render_text(&report::summarize(&structure), false)
    );
    let stack = structure?.single_stream("the demo")?.clone();
    // Class-conditional models sample one image per class, 0..9 (the null class is the last id).
    let classes: Vec<i64> = if stack.inputs.conditions.is_empty() {
        vec![0; 4]
    } else {
        (0..10).collect()
    };

    let runs = 4;
    println!(
        "\n== 2. calibrate: {runs} seeded runs of {} steps, a schedule for {}x fewer FLOPs",
        args.steps, args.target_speedup
    );
    let calibration_path = args.out.join("calibration.json");
    let options = RecordOptions {
        settings: Settings {
            steps: args.steps,
            guidance: Some(args.cfg),
            ..Settings::default()
        },
        runs,
        seed: 1000,
        batch: 2,
        classes: Vec::new(),
        engine: engine_kind,
        engine_options: Options {
            provider: Provider::Cpu,
            threads: None,
            cuda_graphs: false,
        },
    };
    let targets = ScheduleTargets {
        speedups: vec![args.target_speedup],
        ..ScheduleTargets::default()
    };
    let (calibration, report) = calibrate_schedules(&model_path, &options, &targets)?.remove(0);
    calibration.save(&calibration_path)?;
    for c in &report.choice.candidates {
        println!(
            "  forecast by {:<13}: held-out error {:.4}{}",
            c.forecaster.name(),
            c.held_out_relative_error,
            if c.forecaster == report.choice.forecaster {
                "  <- chosen"
            } else {
                ""
            }
        );
    }
    let computed: Vec<String> = report.computed.iter().map(|s| s.to_string()).collect();
    println!(
        "  the stack runs at steps {} ({} of {}); expected {:.2}x fewer FLOPs",
        computed.join(" "),
        report.computed.len(),
        report.steps,
        report.predicted_speedup
    );

    println!("\n== 3. rewrite");
    let mut rewritten = model;
    let summary = rewrite_with_schedule(&mut rewritten, &calibration, None, None)?.step;
    let fast_path = args.out.join("model.fastcache.onnx");
    rewritten.save(&fast_path, &rewritten.default_storage(&fast_path))?;
    println!(
        "  one If around the {} blocks, taken at the skipped steps; wrote {}",
        summary.total_blocks,
        fast_path.display()
    );

    println!(
        "\n== 4. sample both from seed {} ({} steps, CFG {})",
        args.seed, args.steps, args.cfg
    );
    let original = sample(&model_path, &args, engine_kind, &classes)?;
    let fast = sample(&fast_path, &args, engine_kind, &classes)?;
    println!("  engine {} ({why})", original.engine);
    let skipped: Vec<Vec<bool>> = fast
        .trajectory
        .steps
        .iter()
        .map(|s| {
            s.stats
                .get("fastcache.skipped")
                .map(|t| t.to_f64_vec().iter().map(|&v| v > 0.5).collect())
                .unwrap_or_default()
        })
        .collect();
    let steps_map: String = skipped
        .iter()
        .map(|row| if row.iter().any(|&s| s) { '.' } else { '#' })
        .collect();
    println!("  steps (# the stack ran, . forecast): {steps_map}");
    let total: usize = skipped.iter().map(Vec::len).sum();
    let count = skipped.iter().flatten().filter(|&&s| s).count();
    let rate = if total == 0 {
        0.0
    } else {
        count as f64 / total as f64
    };
    let expected = stack.expected_speedup_of_run(&skipped);
    let (a, b) = (&original.trajectory.latents, &fast.trajectory.latents);
    let relative = (a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .max(f64::MIN_POSITIVE))
    .sqrt();
    println!(
        "  skipped {count} of {total} block calls ({:.0}%); by the cost model that is {expected:.2}x fewer FLOPs",
        100.0 * rate
    );
    println!(
        "  time: original {:.2} s, rewritten {:.2} s: {:.2}x faster",
        original.seconds,
        fast.seconds,
        original.seconds / fast.seconds.max(1e-9),
    );
    // Pixels in [-1, 1] as the samples are written, so a data range of 2.
    let clamp = |v: &f32| v.clamp(-1.0, 1.0);
    let (pa, pb): (Vec<f32>, Vec<f32>) =
        (a.iter().map(clamp).collect(), b.iter().map(clamp).collect());
    println!(
        "  result: PSNR {:.1} dB against the original (pixels clamped to [-1, 1]), relative L2 difference {relative:.4}",
        psnr(&pa, &pb, 2.0)
    );

    let [_, channels, _, _] = <[usize; 4]>::try_from(a.shape())
        .map_err(|_| anyhow::anyhow!("unexpected output shape {:?}", a.shape()))?;
    let extension = if channels == 1 || channels == 3 {
        "png"
    } else {
        "npy"
    };
    for (name, latents) in [("original", a), ("fastcache", b)] {
        let path = args.out.join(format!("{name}.{extension}"));
        let format = output_format(&path, channels)?;
        println!("  wrote {}", write_output(&path, format, latents)?);
    }
    if count == 0 {
        eprintln!(
            "warning: nothing was skipped: the schedule computes every step; try a larger --target-speedup"
        );
    }
    Ok(())
}
