//! `fastcache run MODEL --steps N --seed S -o OUT`: samples a diffusion model on an engine and
//! writes the result: a PNG grid for pixel-space models (1 or 3 channels), the latents as `.npy`
//! otherwise (a `.npy` is accepted for pixel-space models too). Prints which engine and provider
//! ran, the sampler as resolved, per-step and total times.
//!
//! The output appears only when the run succeeded: it is written to a temporary file beside the
//! target and renamed into place.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::ArrayD;

use fastcache_passes::cache::SKIPPED_OUTPUT;

use super::sampler_args::SamplerArgs;
use crate::engine::{self, EngineKind, Options, TensorMap, onnxruntime::Provider};
use crate::sampler::{self, Conditioning, SampleOptions, SamplerSetup, Settings};

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx model.
    pub model: PathBuf,
    /// Sampling steps (model calls).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Seed of the initial noise (and of DDPM's noise and of conditions not given).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Engine: tract needs nothing installed; ort needs ONNX Runtime (scripts/setup.sh or
    /// ORT_DYLIB_PATH).
    #[arg(long, value_enum, default_value_t = EngineKind::Tract)]
    pub engine: EngineKind,
    /// ONNX Runtime execution provider (--engine ort); one that cannot start is an error.
    #[arg(long, value_enum, default_value_t = Provider::Cpu)]
    pub ep: Provider,
    /// Intra-op threads (ONNX Runtime; default: the available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run MODEL through its host split in DIR (`rewrite --split DIR`): segment by segment, each
    /// `If`'s condition read on the host (or, for FastCache's schedule, taken from the manifest)
    /// and only the chosen branch run; on ONNX Runtime the values stay on the device.
    #[arg(long, value_name = "DIR")]
    pub split: Option<PathBuf>,
    /// With --split on ONNX Runtime's CUDA or TensorRT provider: capture each segment as a CUDA
    /// graph where ONNX Runtime allows it (its fixed buffers are bound once per parity; a segment
    /// with nodes on the CPU runs without). The run's engine line says how many were captured.
    #[arg(long, requires = "split")]
    pub cuda_graphs: bool,
    /// Class id(s): one for every sample, or one per sample (comma-separated). Default 0.
    #[arg(long = "class", value_delimiter = ',', allow_hyphen_values = true)]
    pub classes: Vec<i64>,
    /// Classifier-free guidance scale (runs the conditional and unconditional halves in one
    /// call; 1 still runs both). Without it, no guidance.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Samples per run.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Output file: .png (pixel-space models) or .npy.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Start from these latents (.npy, [batch, C, H, W]) instead of noise drawn from the seed,
    /// e.g. to compare with another host from the same start.
    #[arg(long, value_name = "FILE.npy")]
    pub noise: Option<PathBuf>,
    /// Values of a condition input, NAME=FILE.npy (float32, one sample's shape or [batch, ...]);
    /// conditions not given are drawn from the seeded noise.
    #[arg(long = "condition", value_name = "NAME=FILE")]
    pub conditions: Vec<String>,
    /// Values of several condition inputs (and position ids) from one .npz, by input name
    /// (a fixture's .npz works: its other inputs are left to the sampler); --condition entries
    /// take precedence.
    #[arg(long = "conditions", value_name = "FILE.npz")]
    pub conditions_npz: Option<PathBuf>,
    #[command(flatten)]
    pub sampler: SamplerArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    Npy,
    Png,
}

pub(super) fn output_format(path: &Path, channels: usize) -> anyhow::Result<Format> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("npy") => Ok(Format::Npy),
        Some("png") if channels == 1 || channels == 3 => Ok(Format::Png),
        Some("png") => bail!(
            "{}: this is a latent-space model ({channels} channels), its output is latents: write them to a .npy file",
            path.display()
        ),
        _ => bail!(
            "{}: the output must end in .npy{}",
            path.display(),
            if channels == 1 || channels == 3 {
                " or .png"
            } else {
                " (this model's output is latents)"
            }
        ),
    }
}

/// The arrays of `path` that the model takes as conditions or position ids. Arrays named like the
/// model's other inputs (latent, timestep, guidance, class labels) are left to the sampler and
/// said so; an array that names no input at all is an error.
fn conditions_from_npz(path: &Path, setup: &sampler::SamplerSetup) -> anyhow::Result<TensorMap> {
    let roles = &setup.roles;
    let wanted: Vec<&str> = roles
        .conditions
        .iter()
        .map(|c| c.name.as_str())
        .chain(roles.positions.iter().map(|p| p.name.as_str()))
        .collect();
    let others: Vec<&str> = [Some(roles.latent.as_str()), Some(roles.timestep.as_str())]
        .into_iter()
        .chain([
            roles.class_label.as_deref(),
            roles.guidance_input.as_deref(),
        ])
        .flatten()
        .collect();
    let mut given = TensorMap::new();
    for (name, tensor) in engine::read_npz(path)?.iter() {
        // A fixture's .npz also holds PyTorch's output, under `output`.
        if name == "output" {
            continue;
        }
        if wanted.contains(&name) {
            let array = tensor.clone().into_f32().with_context(|| {
                format!("--conditions {}: '{name}' must be float32", path.display())
            })?;
            given.insert(name, engine::Tensor::F32(array));
        } else if others.contains(&name) {
            eprintln!(
                "note: --conditions {}: '{name}' is not a condition; the sampler sets it",
                path.display()
            );
        } else {
            bail!(
                "--conditions {}: the model has no condition input '{name}' (its conditions: {})",
                path.display(),
                wanted.join(", ")
            );
        }
    }
    Ok(given)
}

fn parse_conditions(specs: &[String]) -> anyhow::Result<TensorMap> {
    let mut map = TensorMap::new();
    for spec in specs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--condition {spec}: expected NAME=FILE.npy"))?;
        let array =
            engine::read_npy_f32(Path::new(file)).with_context(|| format!("--condition {name}"))?;
        map.insert(name, engine::Tensor::F32(array));
    }
    Ok(map)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let wall = Instant::now();
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        bail!(
            "{}: the directory {} does not exist",
            args.output.display(),
            parent.display()
        );
    }
    let (model, spec) = engine::ModelSpec::load(&args.model)?;
    let settings = Settings {
        kind: args.sampler.sampler,
        steps: args.steps,
        guidance: args.cfg,
        overrides: args.sampler.overrides(),
    };
    let setup = SamplerSetup::new(&spec, Some(&model), &settings)
        .with_context(|| format!("cannot sample {}", args.model.display()))?;
    if let Some(warning) = schedule_warning(&model, setup.calls()) {
        eprintln!("warning: {warning}");
    }
    drop(model);
    // A latent packed into tokens (Flux) is no image: .npy only.
    let channels = setup.image_shape().map_or(0, |[c, _, _]| c);
    let format = output_format(&args.output, channels)?;
    let mut given = match &args.conditions_npz {
        Some(path) => conditions_from_npz(path, &setup)?,
        None => TensorMap::new(),
    };
    for (name, tensor) in parse_conditions(&args.conditions)?.iter() {
        given.insert(name, tensor.clone());
    }
    let drawn: Vec<String> = setup
        .roles
        .conditions
        .iter()
        .filter(|c| !given.contains(&c.name))
        .map(|c| c.name.clone())
        .collect();

    let loading = Instant::now();
    let options = Options {
        provider: args.ep,
        threads: args.threads,
        cuda_graphs: args.cuda_graphs,
    };
    let mut engine: Box<dyn engine::Engine> = match &args.split {
        Some(dir) => engine::split::open(args.engine, dir, spec.clone(), &options)?,
        None => engine::open(args.engine, &args.model, &options)?,
    };
    let load_seconds = loading.elapsed().as_secs_f64();
    let info = engine.info();

    let mut rng = sampler::rng(args.seed);
    let x = match &args.noise {
        Some(path) => {
            let x = engine::read_npy_f32(path)
                .with_context(|| format!("--noise {}", path.display()))?;
            let expected = setup.latent_shape(args.batch);
            if x.shape() != expected {
                bail!(
                    "--noise {}: shape {:?}, but --batch {} needs latents {:?}",
                    path.display(),
                    x.shape(),
                    args.batch,
                    expected
                );
            }
            x
        }
        None => sampler::standard_normal(&mut rng, &setup.latent_shape(args.batch)),
    };
    let conditioning = Conditioning::build(&setup, args.batch, &args.classes, given, &mut rng)?;

    let progress = if std::io::stderr().is_terminal() {
        let bar =
            ProgressBar::with_draw_target(Some(setup.calls() as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} model calls {elapsed} (eta {eta})")
                .expect("a valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let trajectory = sampler::sample(
        engine.as_mut(),
        &setup,
        x,
        &conditioning,
        &mut rng,
        &SampleOptions::default(),
        &mut |_| progress.inc(1),
    )
    .with_context(|| {
        format!(
            "sampling {} failed with {}",
            args.model.display(),
            info.engine
        )
    });
    progress.finish_and_clear();
    let trajectory = trajectory?;

    let written = write_output(&args.output, format, &trajectory.latents)?;

    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(out, "model     {}", args.model.display());
    let _ = writeln!(out, "engine    {}", info.engine);
    let _ = writeln!(out, "provider  {}", info.provider);
    let _ = writeln!(out, "threads   {}", info.threads);
    let _ = writeln!(
        out,
        "sampler   {}",
        setup_line(&setup, trajectory.learned_sigma)
    );
    for note in &setup.notes {
        let _ = writeln!(out, "          {note}");
    }
    for name in &drawn {
        let _ = writeln!(
            out,
            "          condition '{name}' drawn from the seeded noise (no text encoder here; --condition {name}=FILE.npy gives it)"
        );
    }
    let _ = writeln!(
        out,
        "batch     {}{}, seed {}",
        args.batch,
        if setup.guidance.is_some() {
            format!(" ({} per call with CFG)", 2 * args.batch)
        } else {
            String::new()
        },
        args.seed
    );
    match setup.state.contract() {
        None => {
            let _ = writeln!(out, "state     none (no fastcache contract in the model)");
        }
        Some(contract) => {
            let _ = writeln!(
                out,
                "state     {} pair(s) kept in {}, {} stats output(s)",
                contract.state.len(),
                info.state_memory,
                contract.stats.len()
            );
        }
    }
    let _ = writeln!(out, "\nstep  timestep      ms");
    for step in &trajectory.steps {
        let _ = write!(
            out,
            "{:>4}  {:>8}  {:>6.2}",
            step.index + 1,
            format_timestep(step.timestep),
            step.seconds * 1e3
        );
        for (name, tensor) in step.stats.iter() {
            let values = tensor.to_f64_vec();
            if values.len() <= 16 {
                let shown: Vec<String> = values.iter().map(|v| format!("{v}")).collect();
                let _ = write!(out, "  {name}=[{}]", shown.join(","));
            } else if values.iter().all(|&v| v == 0.0 || v == 1.0) {
                // Flags of a deep model (one per block): how many are set.
                let set = values.iter().filter(|&&v| v == 1.0).count();
                let _ = write!(out, "  {name}={set}/{} set", values.len());
            } else {
                let _ = write!(out, "  {name}={}", tensor.describe());
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "          (step 1 includes the engine's first-call setup{})",
        if args.engine == EngineKind::Tract {
            ": tract plans the model for the input shapes"
        } else {
            ""
        }
    );
    if let Some(plan) = engine.plan() {
        let _ = writeln!(out, "plan      {plan}");
    }
    let model_seconds: f64 = trajectory.steps.iter().map(|s| s.seconds).sum();
    let _ = writeln!(
        out,
        "\ntotal     {:.1} ms in {} model calls ({:.2} ms per step); load {:.1} ms; wall {:.1} ms",
        model_seconds * 1e3,
        trajectory.steps.len(),
        model_seconds * 1e3 / trajectory.steps.len().max(1) as f64,
        load_seconds * 1e3,
        wall.elapsed().as_secs_f64() * 1e3
    );
    if let Some(t) = engine.last_transfer() {
        let _ = writeln!(
            out,
            "transfer  {} bytes to the engine and {} back in the last call (inputs, results and conditions read; state stays with the engine)",
            t.to_engine, t.from_engine
        );
    }
    let _ = writeln!(out, "output    {written}");
    print!("{out}");
    if let Some(warning) = skip_warning(&trajectory) {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// A calibrated schedule fits the run length it was made for: with fewer model calls its steps
/// land at the wrong times; with more, the steps past it all compute.
fn schedule_warning(model: &fastcache_passes::ir::Model, calls: usize) -> Option<String> {
    let contract = fastcache_passes::contract::Contract::from_model(model).ok()??;
    if contract.policy.get("decision")?.as_str()? != "schedule" {
        return None;
    }
    let steps = contract.policy.get("steps")?.as_u64()? as usize;
    (steps != calls).then(|| {
        format!(
            "this model's schedule was calibrated for {steps} model calls and this run makes {calls}: {}; calibrate again for this step count",
            if calls < steps {
                "its steps land at the wrong times"
            } else {
                "every call past the schedule computes in full"
            }
        )
    })
}

/// A cache that never fired, or one that skipped everything it could, is worth saying out loud:
/// both usually mean the thresholds do not fit the model.
fn skip_warning(trajectory: &sampler::Trajectory) -> Option<String> {
    let rows: Vec<Vec<f64>> = trajectory
        .steps
        .iter()
        .filter_map(|s| s.stats.get(SKIPPED_OUTPUT).map(|t| t.to_f64_vec()))
        .collect();
    if rows.is_empty() {
        return None;
    }
    let skipped: f64 = rows.iter().flatten().sum();
    let after_first = rows.iter().skip(1).flatten().count() as f64;
    if skipped == 0.0 {
        Some(format!(
            "the cache never fired: no block was skipped in {} steps (recalibrate, or raise the change scale)",
            rows.len()
        ))
    } else if skipped >= after_first {
        Some("every block was skipped at every step after the first: the output is mostly reused work".into())
    } else {
        None
    }
}

fn setup_line(setup: &SamplerSetup, learned_sigma: bool) -> String {
    let mut resolved = setup.clone();
    resolved.learned_sigma = Some(learned_sigma);
    resolved.describe()
}

fn format_timestep(t: f64) -> String {
    if t.fract() == 0.0 {
        format!("{t:.0}")
    } else {
        format!("{t:.3}")
    }
}

/// Writes through a temporary file in the target's directory, renamed into place at the end.
pub(super) fn write_output(
    path: &Path,
    format: Format,
    latents: &ArrayD<f32>,
) -> anyhow::Result<String> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".fastcache-run-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let description = {
        let mut writer = std::io::BufWriter::new(tmp.as_file_mut());
        let description = match format {
            Format::Npy => {
                use ndarray_npy::WriteNpyExt;
                latents
                    .write_npy(&mut writer)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                format!("{} (float32 {:?})", path.display(), latents.shape())
            }
            Format::Png => {
                let (width, height) = write_png_grid(&mut writer, latents)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                format!(
                    "{} ({} image(s) in a {width}x{height} grid)",
                    path.display(),
                    latents.shape()[0]
                )
            }
        };
        writer
            .flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        description
    };
    tmp.persist(path)
        .with_context(|| format!("cannot move the result to {}", path.display()))?;
    Ok(description)
}

/// Images [B, C, H, W] with values in [−1, 1] as one PNG, ⌈√B⌉ images per row.
fn write_png_grid(writer: impl Write, images: &ArrayD<f32>) -> anyhow::Result<(u32, u32)> {
    let &[batch, channels, height, width] = images.shape() else {
        bail!("expected images [B, C, H, W], got {:?}", images.shape());
    };
    let columns = (batch as f64).sqrt().ceil() as usize;
    let rows = batch.div_ceil(columns);
    let (grid_w, grid_h) = (columns * width, rows * height);
    let mut pixels = vec![0u8; grid_w * grid_h * channels];
    for b in 0..batch {
        let (row, col) = (b / columns, b % columns);
        for y in 0..height {
            for x in 0..width {
                for c in 0..channels {
                    let v = images[[b, c, y, x]];
                    let byte = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                    let (gy, gx) = (row * height + y, col * width + x);
                    pixels[(gy * grid_w + gx) * channels + c] = byte;
                }
            }
        }
    }
    let mut encoder = png::Encoder::new(writer, grid_w as u32, grid_h as u32);
    encoder.set_color(if channels == 1 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgb
    });
    encoder.set_depth(png::BitDepth::Eight);
    let mut png = encoder.write_header()?;
    png.write_image_data(&pixels)?;
    png.finish()?;
    Ok((grid_w as u32, grid_h as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_format_follows_extension_and_channels() {
        assert_eq!(output_format(Path::new("a.npy"), 4).unwrap(), Format::Npy);
        assert_eq!(output_format(Path::new("a.PNG"), 3).unwrap(), Format::Png);
        assert_eq!(output_format(Path::new("a.npy"), 1).unwrap(), Format::Npy);
        let error = output_format(Path::new("a.png"), 4)
            .unwrap_err()
            .to_string();
        assert!(error.contains("latent-space model (4 channels)"), "{error}");
        assert!(output_format(Path::new("a.jpg"), 3).is_err());
    }

    #[test]
    fn png_grid_places_images_row_by_row() {
        let mut images = ArrayD::<f32>::zeros(ndarray::IxDyn(&[3, 1, 2, 2]));
        images.fill(-1.0);
        images[[2, 0, 1, 1]] = 1.0;
        let mut bytes = Vec::new();
        let (w, h) = write_png_grid(&mut bytes, &images).unwrap();
        assert_eq!((w, h), (4, 4));
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        // Image 2 is the first of the second row: its pixel (1, 1) is at (3, 1) of the grid.
        assert_eq!(buf[3 * 4 + 1], 255);
        assert_eq!(buf.iter().filter(|&&v| v == 255).count(), 1);
    }
}
