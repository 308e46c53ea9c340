//! Samplers: DDIM (η = 0), ancestral DDPM and DPM-Solver++(2M) for ε-prediction models; Euler,
//! Heun and a two-step Adams–Bashforth for rectified-flow models; classifier-free guidance; the
//! cross-step state loop of the host contract.
//!
//! How a model is to be sampled comes from the model: its inputs (by name, rank and dtype, see
//! [`roles`]) and its optional `fastcache.sampler` metadata entry (schema in [`meta`]), each field
//! of which the command line can override. [`SamplerSetup::new`] resolves all of it once;
//! [`sample`] then runs the steps on any [`Engine`].
//!
//! ε-prediction (DiT, PixArt): DiT's linear β schedule by default (1000 training steps, β from
//! 1e-4 to 0.02), "trailing" timesteps (the first step at t = 999). With learned sigma the output
//! has 2·C channels: the first C are ε, the rest the variance interpolation v. DDIM ignores v;
//! DDPM uses it (the learned variance, as DiT samples) and falls back to the fixed small posterior
//! variance for models without it. The run report says which.
//!
//! Rectified flow (SD3, Flux): σ from 1 to 0 in equal steps (optionally shifted), velocity
//! v = noise − data, x ← x + (σ_next − σ)·v (Euler). Heun corrects each step with the velocity at
//! its end (two model calls a step, the last one at σ = 0); Adams–Bashforth extrapolates the
//! velocity from this step's and the previous step's (one call a step, Euler first).
//! DPM-Solver++(2M) does the same with the data prediction x₀ on the β schedule's log-SNR; its
//! first step and its step to the clean sample are first order (DDIM's).
//!
//! The state loop and the run's records are per model call, not per step: a cached model sees
//! every call, Heun's correctors included.
//!
//! Classifier-free guidance runs the conditional and the unconditional half in one call: the
//! batch is [cond samples…, uncond samples…], the unconditional half with the null class id or
//! zeros for text conditions; prediction = uncond + g·(cond − uncond) on the ε / v channels (the
//! variance channels come from the conditional half). `guidance = Some(1.0)` still runs the
//! doubled batch, which makes it a check of the batching; `None` runs no guidance.
//!
//! Noise is reproducible: one `rand::rngs::StdRng` (rand 0.9, ChaCha12) seeded with
//! `seed_from_u64(seed)` draws f32 values from `rand_distr::StandardNormal`, in this order: the
//! initial latents [B, C, H, W] in row-major order; then each condition input that was not given
//! (role order, [B, …] row-major); then, for DDPM, the noise of every step but the last. The same
//! seed, batch and model give the same samples on every engine.

pub mod meta;
pub mod roles;
pub mod schedule;
pub mod state;

use std::time::Instant;

use anyhow::{Context, bail};
use fastcache_passes::ir::Model;
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::engine::{DType, Engine, ModelSpec, Tensor, TensorMap};
pub use meta::{Objective, SamplerMeta};
use roles::{PositionInput, Roles};
use schedule::{BetaSchedule, DdpmVariance};
use state::StateLoop;

/// The update rule.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Deterministic DDIM (η = 0), ε-prediction models.
    Ddim,
    /// Ancestral DDPM, ε-prediction models.
    Ddpm,
    /// DPM-Solver++(2M), second-order multistep, ε-prediction models (one call a step).
    #[value(name = "dpmpp2m")]
    #[serde(rename = "dpmpp2m")]
    DpmPp2m,
    /// Euler on the flow ODE, rectified-flow models.
    Euler,
    /// Heun on the flow ODE (two calls a step), rectified-flow models.
    Heun,
    /// Two-step Adams–Bashforth on the velocity (one call a step), rectified-flow models.
    Ab2,
}

impl SamplerKind {
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::DpmPp2m => "dpmpp2m",
            SamplerKind::Euler => "euler",
            SamplerKind::Heun => "heun",
            SamplerKind::Ab2 => "ab2",
        }
    }

    /// The objective the rule integrates.
    pub fn objective(self) -> Objective {
        match self {
            SamplerKind::Ddim | SamplerKind::Ddpm | SamplerKind::DpmPp2m => Objective::Epsilon,
            SamplerKind::Euler | SamplerKind::Heun | SamplerKind::Ab2 => Objective::RectifiedFlow,
        }
    }

    /// Model calls per sampling step.
    pub fn calls_per_step(self) -> usize {
        match self {
            SamplerKind::Heun => 2,
            _ => 1,
        }
    }
}

/// What the user asks for.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// `None`: DDIM for ε-prediction, Euler for rectified flow.
    pub kind: Option<SamplerKind>,
    pub steps: usize,
    /// Classifier-free guidance scale; `None` for no guidance.
    pub guidance: Option<f32>,
    /// Command-line values of the `fastcache.sampler` fields; they win over the model's entry.
    pub overrides: SamplerMeta,
}

/// The points of the trajectory.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Descending training timesteps of a β schedule.
    Discrete {
        betas: BetaSchedule,
        timesteps: Vec<usize>,
    },
    /// σ from 1 down to 0, one more than the steps.
    Flow { sigmas: Vec<f64> },
}

/// Everything resolved about how to sample one model.
#[derive(Clone, Debug)]
pub struct SamplerSetup {
    pub roles: Roles,
    pub objective: Objective,
    pub kind: SamplerKind,
    /// `None` until the first output shows it (output channels = 2·C means learned sigma).
    pub learned_sigma: Option<bool>,
    pub timestep_scale: f64,
    /// The null class id and where it came from.
    pub null_class: Option<(i64, String)>,
    pub guidance: Option<f32>,
    /// What a guidance-distilled model's guidance input gets, when it has one.
    pub embedded_guidance: Option<f64>,
    pub schedule: Schedule,
    pub state: StateLoop,
    /// How each choice was made, for the report.
    pub notes: Vec<String>,
}

impl SamplerSetup {
    /// Resolves roles, objective, schedule and null class for a model. `model` (the IR) is used
    /// only to guess the null class when neither the metadata nor the command line gives it.
    pub fn new(
        spec: &ModelSpec,
        model: Option<&Model>,
        settings: &Settings,
    ) -> anyhow::Result<SamplerSetup> {
        let meta =
            SamplerMeta::from_metadata(&spec.metadata)?.overridden_by(settings.overrides.clone());
        let state = StateLoop::from_spec(spec)?;
        let roles = roles::detect_roles(
            spec,
            &meta,
            &state.state_inputs(),
            &state.reserved_outputs(),
        )?;
        let mut notes = Vec::new();

        let objective = match meta.objective {
            Some(o) => {
                notes.push(format!("objective {} (given)", o.name()));
                o
            }
            None if roles.timestep_dtype.is_float() => {
                notes.push(format!(
                    "objective rectified_flow (guessed from the float timestep input '{}')",
                    roles.timestep
                ));
                Objective::RectifiedFlow
            }
            None => {
                notes.push(format!(
                    "objective epsilon (guessed from the integer timestep input '{}')",
                    roles.timestep
                ));
                Objective::Epsilon
            }
        };
        let kind = match (settings.kind, objective) {
            (None, Objective::Epsilon) => SamplerKind::Ddim,
            (None, Objective::RectifiedFlow) => SamplerKind::Euler,
            (Some(k), o) if k.objective() == o => k,
            (Some(k), o) => bail!(
                "sampler {} does not fit a model with objective {} (ddim, ddpm and dpmpp2m are for epsilon, euler, heun and ab2 for rectified_flow; override the objective with --objective)",
                k.name(),
                o.name()
            ),
        };
        let learned_sigma = match (meta.learned_sigma, objective) {
            (Some(true), Objective::RectifiedFlow) => {
                bail!("learned sigma is only meaningful for epsilon models")
            }
            (given, Objective::Epsilon) => given,
            (_, Objective::RectifiedFlow) => Some(false),
        };
        let timestep_scale = match (meta.timestep_scale, objective) {
            (Some(scale), _) => scale,
            (None, Objective::Epsilon) => 1.0,
            (None, Objective::RectifiedFlow) => {
                if model.is_some_and(|m| scales_timestep_itself(m, &roles.timestep)) {
                    notes.push(format!(
                        "timestep scale 1: the model multiplies '{}' by 1000 itself (diffusers' Flux)",
                        roles.timestep
                    ));
                    1.0
                } else {
                    1000.0
                }
            }
        };
        if !(timestep_scale.is_finite() && timestep_scale > 0.0) {
            bail!("timestep_scale must be a positive number, got {timestep_scale}");
        }
        let schedule = match objective {
            Objective::Epsilon => {
                let betas = BetaSchedule::linear(
                    meta.num_train_timesteps.unwrap_or(1000),
                    meta.beta_start.unwrap_or(1e-4),
                    meta.beta_end.unwrap_or(0.02),
                )?;
                let timesteps = betas.timesteps(settings.steps)?;
                Schedule::Discrete { betas, timesteps }
            }
            Objective::RectifiedFlow => Schedule::Flow {
                sigmas: schedule::flow_sigmas(settings.steps, meta.flow_shift.unwrap_or(1.0))?,
            },
        };
        let null_class = match (&roles.class_label, meta.null_class) {
            (None, _) => None,
            (Some(_), Some(n)) => Some((n, "given".to_string())),
            (Some(input), None) => model.and_then(|m| roles::guess_null_class(m, input)),
        };
        if let Some(g) = settings.guidance {
            if !g.is_finite() {
                bail!("the guidance scale must be a finite number, got {g}");
            }
            if roles.class_label.is_some() && null_class.is_none() {
                bail!(
                    "classifier-free guidance needs the null class id, which this model does not state: pass --null-class, or add \"null_class\" to the '{}' metadata entry",
                    meta::METADATA_KEY
                );
            }
            if roles.class_label.is_none() && roles.conditions.is_empty() {
                bail!(
                    "classifier-free guidance needs a condition, but this model takes neither a class label nor a text condition"
                );
            }
        }
        for p in &roles.positions {
            notes.push(format!(
                "position ids '{}' {:?}: {}",
                p.name,
                p.shape,
                if p.image {
                    "the image tokens' (row and column of a square grid) unless given"
                } else {
                    "the text tokens' (zeros) unless given"
                }
            ));
        }
        let embedded_guidance = roles.guidance_input.as_ref().map(|name| {
            let value = meta.embedded_guidance.unwrap_or(3.5);
            notes.push(format!(
                "guidance input '{name}' = {value}{}",
                if meta.embedded_guidance.is_some() {
                    ""
                } else {
                    " (default; --embedded-guidance)"
                }
            ));
            value
        });
        Ok(SamplerSetup {
            embedded_guidance,
            roles,
            objective,
            kind,
            learned_sigma,
            timestep_scale,
            null_class,
            guidance: settings.guidance,
            schedule,
            state,
            notes,
        })
    }

    pub fn steps(&self) -> usize {
        match &self.schedule {
            Schedule::Discrete { timesteps, .. } => timesteps.len(),
            Schedule::Flow { sigmas } => sigmas.len() - 1,
        }
    }

    /// Model calls of a whole run (Heun makes two a step).
    pub fn calls(&self) -> usize {
        self.steps() * self.kind.calls_per_step()
    }

    /// The shape of the initial latents for `batch` samples.
    pub fn latent_shape(&self, batch: usize) -> Vec<usize> {
        std::iter::once(batch)
            .chain(self.roles.latent_shape.iter().copied())
            .collect()
    }

    /// C, H, W of an image latent [batch, C, H, W]; `None` for a latent packed into tokens.
    pub fn image_shape(&self) -> Option<[usize; 3]> {
        match self.roles.latent_shape.as_slice() {
            &[c, h, w] => Some([c, h, w]),
            _ => None,
        }
    }

    /// The value the model's timestep input gets at step `k` (at σ_k for flow models; `k` may
    /// be the step count there, σ = 0, where Heun's last corrector looks), before rounding for
    /// integer inputs.
    pub fn model_timestep(&self, k: usize) -> f64 {
        match &self.schedule {
            Schedule::Discrete { timesteps, .. } => timesteps[k] as f64 * self.timestep_scale,
            Schedule::Flow { sigmas } => sigmas[k] * self.timestep_scale,
        }
    }

    /// One line: "ddim (η = 0), epsilon, 10 steps, CFG 4 (null class 10, guessed: ...)".
    pub fn describe(&self) -> String {
        let kind = match (self.kind, self.learned_sigma) {
            (SamplerKind::Ddim, _) => "ddim (eta 0)".to_string(),
            (SamplerKind::Ddpm, Some(true)) => "ddpm (learned variance)".into(),
            (SamplerKind::Ddpm, Some(false)) => "ddpm (fixed small variance)".into(),
            (SamplerKind::Ddpm, None) => "ddpm".into(),
            (SamplerKind::DpmPp2m, _) => "dpm-solver++(2m)".into(),
            (SamplerKind::Euler, _) => "euler (flow matching)".into(),
            (SamplerKind::Heun, _) => "heun (flow matching, 2 calls a step)".into(),
            (SamplerKind::Ab2, _) => "adams-bashforth 2 (flow matching)".into(),
        };
        let schedule = match &self.schedule {
            Schedule::Discrete { betas, .. } => {
                format!(
                    "linear beta schedule over {} steps, trailing timesteps",
                    betas.train_steps()
                )
            }
            Schedule::Flow { sigmas } => {
                let shifted = sigmas.len() > 2 && {
                    let plain = 1.0 - 1.0 / (sigmas.len() - 1) as f64;
                    (sigmas[1] - plain).abs() > 1e-12
                };
                if shifted {
                    "sigma 1 to 0, shifted".to_string()
                } else {
                    "sigma 1 to 0".to_string()
                }
            }
        };
        let guidance = match (self.guidance, &self.null_class) {
            (None, _) => "no CFG".to_string(),
            (Some(g), Some((n, how))) => format!("CFG {g} (null class {n}, {how})"),
            (Some(g), None) => format!("CFG {g} (null condition: zeros)"),
        };
        format!(
            "{kind}, {}{}, {} steps, {schedule}, timestep scale {}, {guidance}",
            self.objective.name(),
            match self.learned_sigma {
                Some(true) => ", learned sigma",
                _ => "",
            },
            self.steps(),
            self.timestep_scale
        )
    }
}

/// The seeded random source of a run (see the module documentation for the order of draws).
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Standard normal f32 values of the given shape, row-major.
pub fn standard_normal(rng: &mut StdRng, shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || StandardNormal.sample(rng))
}

/// Whether the graph multiplies its timestep input by 1000 before anything else reads it (through
/// casts), as diffusers' Flux does: its input is then σ itself.
fn scales_timestep_itself(model: &Model, timestep: &str) -> bool {
    let graph = &model.graph;
    let mut value = timestep.to_string();
    loop {
        let readers = graph.consumers(&value);
        let [only] = readers.as_slice() else {
            return false;
        };
        let node = graph.node(*only);
        match node.op_type.as_str() {
            "Cast" | "Identity" => value = node.outputs[0].clone(),
            "Mul" => {
                return node
                    .inputs
                    .iter()
                    .filter(|i| **i != value)
                    .any(|i| constant_scalar(model, i) == Some(1000.0));
            }
            _ => return false,
        }
    }
}

/// The value of a one-element float constant (initializer or Constant node).
fn constant_scalar(model: &Model, name: &str) -> Option<f64> {
    let graph = &model.graph;
    let tensor = match graph.initializer(name) {
        Some(t) => t.clone(),
        None => {
            let node = graph.node(graph.producer(name)?);
            if node.op_type != "Constant" {
                return None;
            }
            match node.attr("value")? {
                fastcache_passes::ir::AttrValue::Tensor(t) => t.clone(),
                _ => return None,
            }
        }
    };
    let values = fastcache_passes::onnx::float_values(&tensor)?;
    (values.len() == 1).then(|| values[0])
}

/// What the conditional half of every call gets.
#[derive(Clone, Debug, Default)]
pub struct Conditioning {
    /// One class id per sample (when the model takes a class label).
    pub class_labels: Option<Vec<i64>>,
    /// Per condition input, [B, …].
    pub conditions: TensorMap,
    /// Per position-id input, [tokens, axes], the same for both halves of a CFG call.
    pub positions: TensorMap,
}

impl Conditioning {
    /// Class ids from `classes` (one for all samples or one per sample; 0 when empty), conditions
    /// from `given` (per-sample shape, broadcast, or [B, …]) or drawn from `rng`.
    pub fn build(
        setup: &SamplerSetup,
        batch: usize,
        classes: &[i64],
        mut given: TensorMap,
        rng: &mut StdRng,
    ) -> anyhow::Result<Conditioning> {
        let class_labels = match &setup.roles.class_label {
            None if !classes.is_empty() => {
                bail!("--class was given, but the model takes no class label")
            }
            None => None,
            Some(_) => {
                let labels = match classes.len() {
                    0 => vec![0; batch],
                    1 => vec![classes[0]; batch],
                    n if n == batch => classes.to_vec(),
                    n => bail!(
                        "{n} class ids given for a batch of {batch}: give one, or one per sample"
                    ),
                };
                if let Some(bad) = labels.iter().find(|&&c| c < 0) {
                    bail!("class id {bad} is negative");
                }
                if let Some((null, _)) = &setup.null_class
                    && let Some(bad) = labels.iter().find(|&&c| c > *null)
                {
                    bail!(
                        "class id {bad} is out of range: this model's class ids are 0..{}",
                        null - 1
                    );
                }
                Some(labels)
            }
        };
        let mut conditions = TensorMap::new();
        for input in &setup.roles.conditions {
            let array = match given.remove(&input.name) {
                Some(tensor) => {
                    let array = tensor
                        .into_f32()
                        .with_context(|| format!("condition '{}' must be float32", input.name))?;
                    broadcast_condition(&input.name, array, input.per_sample.as_deref(), batch)?
                }
                None => {
                    let Some(per_sample) = &input.per_sample else {
                        bail!(
                            "condition input '{}' has symbolic dims; give its values with --condition {}=FILE.npy",
                            input.name,
                            input.name
                        );
                    };
                    let mut shape = vec![batch];
                    shape.extend(per_sample);
                    standard_normal(rng, &shape)
                }
            };
            conditions.insert(input.name.clone(), Tensor::F32(array));
        }
        let mut positions = TensorMap::new();
        for input in &setup.roles.positions {
            let tensor = match given.remove(&input.name) {
                Some(tensor) => {
                    let array = tensor.into_f32().with_context(|| {
                        format!("position ids '{}' must be given as float32", input.name)
                    })?;
                    if array.shape() != input.shape {
                        bail!(
                            "--condition {}: shape {:?}, the model's position ids are {:?}",
                            input.name,
                            array.shape(),
                            input.shape
                        );
                    }
                    array
                }
                None => position_ids(input)?,
            };
            let tensor = match input.dtype {
                DType::I64 => Tensor::I64(tensor.mapv(|v| v.round() as i64)),
                _ => Tensor::F32(tensor),
            };
            positions.insert(input.name.clone(), tensor);
        }
        if let Some(name) = given.names().next() {
            bail!("--condition {name}: the model has no condition input of that name");
        }
        Ok(Conditioning {
            class_labels,
            conditions,
            positions,
        })
    }
}

/// Flux's position ids as its pipelines make them: zeros for the text tokens; for the image
/// tokens, of a square grid, the row in the second-to-last axis and the column in the last.
fn position_ids(input: &PositionInput) -> anyhow::Result<ArrayD<f32>> {
    let [tokens, axes] = input.shape;
    let mut ids = ArrayD::<f32>::zeros(IxDyn(&[tokens, axes]));
    if !input.image {
        return Ok(ids);
    }
    let side = (tokens as f64).sqrt().round() as usize;
    if side * side != tokens || axes < 2 {
        bail!(
            "position ids '{}' [{tokens}, {axes}]: the image grid is not square, so its rows and columns cannot be told; give them with --condition {}=FILE.npy",
            input.name,
            input.name
        );
    }
    for k in 0..tokens {
        ids[[k, axes - 2]] = (k / side) as f32;
        ids[[k, axes - 1]] = (k % side) as f32;
    }
    Ok(ids)
}

fn broadcast_condition(
    name: &str,
    array: ArrayD<f32>,
    per_sample: Option<&[usize]>,
    batch: usize,
) -> anyhow::Result<ArrayD<f32>> {
    if let Some(per_sample) = per_sample {
        if array.shape() == per_sample {
            let views = vec![array.view(); batch];
            let stacked =
                ndarray::stack(Axis(0), &views.iter().map(|v| v.view()).collect::<Vec<_>>())?;
            return Ok(stacked);
        }
        let mut full = vec![batch];
        full.extend(per_sample);
        if array.shape() != full.as_slice() {
            bail!(
                "condition '{name}' has shape {:?}; expected {per_sample:?} (one for all samples) or {full:?}",
                array.shape()
            );
        }
    } else if array.shape().first() != Some(&batch) {
        bail!(
            "condition '{name}' has shape {:?}; its first dim must be the batch, {batch}",
            array.shape()
        );
    }
    Ok(array)
}

/// One model call of a sampling run.
#[derive(Clone, Debug)]
pub struct Step {
    /// 0-based index of the call (Heun makes two a step).
    pub index: usize,
    /// The value the model's timestep input got.
    pub timestep: f64,
    /// Wall time of the model call.
    pub seconds: f64,
    /// The contract's stats outputs of this call.
    pub stats: TensorMap,
}

#[derive(Clone, Debug)]
pub struct Trajectory {
    /// The final latents (or pixels) [B, C, H, W].
    pub latents: ArrayD<f32>,
    /// Every model call.
    pub steps: Vec<Step>,
    /// x after every step, when asked for.
    pub history: Vec<ArrayD<f32>>,
    /// Whether the model turned out to have learned sigma.
    pub learned_sigma: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SampleOptions {
    /// Keep x after every step in [`Trajectory::history`].
    pub record_history: bool,
}

/// Runs the sampler from the initial latents `x` ([B, C, H, W]).
pub fn sample(
    engine: &mut dyn Engine,
    setup: &SamplerSetup,
    x: ArrayD<f32>,
    conditioning: &Conditioning,
    rng: &mut StdRng,
    options: &SampleOptions,
    on_step: &mut dyn FnMut(&Step),
) -> anyhow::Result<Trajectory> {
    let roles = &setup.roles;
    let batch = x.shape().first().copied().unwrap_or(0);
    if batch == 0 {
        bail!("the batch must hold at least one sample");
    }
    let latent_shape = setup.latent_shape(batch);
    if x.shape() != latent_shape {
        bail!(
            "initial latents have shape {:?}; the model's latent '{}' needs {:?}",
            x.shape(),
            roles.latent,
            latent_shape
        );
    }
    let mut x = x.as_standard_layout().into_owned();
    let cfg = setup.guidance;
    let call_batch = if cfg.is_some() { 2 * batch } else { batch };

    // Inputs that stay the same at every step.
    let mut fixed_inputs = TensorMap::new();
    if let Some(name) = &roles.class_label {
        let mut labels = conditioning
            .class_labels
            .clone()
            .context("the model takes a class label, but none was given")?;
        if labels.len() != batch {
            bail!("{} class labels for a batch of {batch}", labels.len());
        }
        if cfg.is_some() {
            let (null, _) = setup
                .null_class
                .as_ref()
                .context("CFG needs the null class")?;
            labels.extend(std::iter::repeat_n(*null, batch));
        }
        let tensor = match roles.class_dtype {
            DType::I32 => Tensor::I32(ArrayD::from_shape_vec(
                IxDyn(&[call_batch]),
                labels.iter().map(|&l| l as i32).collect(),
            )?),
            _ => Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[call_batch]), labels)?),
        };
        fixed_inputs.insert(name.clone(), tensor);
    }
    for (name, tensor) in conditioning.positions.iter() {
        fixed_inputs.insert(name.to_string(), tensor.clone());
    }
    if let (Some(name), Some(value)) = (&roles.guidance_input, setup.embedded_guidance) {
        fixed_inputs.insert(
            name.clone(),
            Tensor::F32(ArrayD::from_elem(IxDyn(&[call_batch]), value as f32)),
        );
    }
    for input in &roles.conditions {
        let array = conditioning
            .conditions
            .get(&input.name)
            .and_then(Tensor::as_f32)
            .with_context(|| format!("no values for condition input '{}'", input.name))?;
        if array.shape().first() != Some(&batch) {
            bail!(
                "condition '{}' has shape {:?}, but the batch is {batch}",
                input.name,
                array.shape()
            );
        }
        let array = if cfg.is_some() {
            let zeros = ArrayD::<f32>::zeros(array.raw_dim());
            ndarray::concatenate(Axis(0), &[array.view(), zeros.view()])?
        } else {
            array.clone()
        };
        fixed_inputs.insert(input.name.clone(), Tensor::F32(array));
    }

    let mut caller = Caller {
        engine,
        setup,
        fixed_inputs,
        batch,
        call_batch,
        learned_sigma: setup.learned_sigma,
        records: Vec::with_capacity(setup.calls()),
        on_step,
    };
    let steps = setup.steps();
    let mut history = Vec::new();
    // What the multistep rules keep of the previous step: its prediction and step size.
    let mut previous_velocity: Option<(Vec<f32>, f64)> = None;
    let mut previous_x0: Option<(Vec<f64>, f64)> = None;
    for k in 0..steps {
        let last = k + 1 == steps;
        match (&setup.schedule, setup.kind) {
            (Schedule::Discrete { betas, timesteps }, kind) => {
                let (eps, variance) = caller.predict(&x, k)?;
                let ab = betas.alpha_bar(Some(timesteps[k]));
                let ab_prev = betas.alpha_bar(timesteps.get(k + 1).copied());
                let xs = x.as_slice_mut().expect("x is in standard layout");
                match kind {
                    SamplerKind::Ddim => schedule::ddim_step(xs, &eps, ab, ab_prev),
                    SamplerKind::Ddpm => {
                        let noise = (!last).then(|| standard_normal(rng, &latent_shape));
                        let variance = match &variance {
                            Some(v) => DdpmVariance::Learned(v),
                            None => DdpmVariance::FixedSmall,
                        };
                        schedule::ddpm_step(
                            xs,
                            &eps,
                            variance,
                            noise
                                .as_ref()
                                .map(|n| n.as_slice().expect("standard layout")),
                            ab,
                            ab_prev,
                        );
                    }
                    SamplerKind::DpmPp2m => {
                        let x0 = schedule::data_prediction(xs, &eps, ab);
                        let before = previous_x0.as_ref().map(|(p, a)| (p.as_slice(), *a));
                        schedule::dpm_solver_2m_step(xs, &x0, before, ab, ab_prev);
                        previous_x0 = Some((x0, ab));
                    }
                    _ => unreachable!("{} was checked against the objective", kind.name()),
                }
            }
            (Schedule::Flow { sigmas }, kind) => {
                let (sigma, sigma_next) = (sigmas[k], sigmas[k + 1]);
                let (v, _) = caller.predict(&x, k)?;
                match kind {
                    SamplerKind::Euler => {
                        let xs = x.as_slice_mut().expect("x is in standard layout");
                        schedule::euler_step(xs, &v, sigma, sigma_next);
                    }
                    SamplerKind::Heun => {
                        let mut end = x.clone();
                        let ends = end.as_slice_mut().expect("x is in standard layout");
                        schedule::euler_step(ends, &v, sigma, sigma_next);
                        let (v_end, _) = caller.predict(&end, k + 1)?;
                        let xs = x.as_slice_mut().expect("x is in standard layout");
                        schedule::heun_correct(xs, &v, &v_end, sigma, sigma_next);
                    }
                    SamplerKind::Ab2 => {
                        let xs = x.as_slice_mut().expect("x is in standard layout");
                        let before = previous_velocity.as_ref().map(|(p, h)| (p.as_slice(), *h));
                        schedule::ab2_step(xs, &v, before, sigma, sigma_next);
                        previous_velocity = Some((v, sigma_next - sigma));
                    }
                    _ => unreachable!("{} was checked against the objective", kind.name()),
                }
            }
        }
        if x.iter().any(|v| !v.is_finite()) {
            bail!(
                "the latents are no longer finite after step {} of {steps}",
                k + 1
            );
        }
        if options.record_history {
            history.push(x.clone());
        }
    }
    let learned_sigma = caller.learned_sigma.unwrap_or(false);
    Ok(Trajectory {
        latents: x,
        steps: caller.records,
        history,
        learned_sigma,
    })
}

/// The model calls of one sampling run: builds each call's inputs, hands the state over, checks
/// and guides the prediction, and records the call.
struct Caller<'a, 'b> {
    engine: &'a mut dyn Engine,
    setup: &'a SamplerSetup,
    fixed_inputs: TensorMap,
    batch: usize,
    /// The samples of one call: twice `batch` with CFG.
    call_batch: usize,
    /// `None` until the first output shows it.
    learned_sigma: Option<bool>,
    records: Vec<Step>,
    on_step: &'b mut dyn FnMut(&Step),
}

impl Caller<'_, '_> {
    /// The guided ε or v of the samples `x` at the schedule's point `k`, and the conditional
    /// half's variance channels where the model has them.
    fn predict(
        &mut self,
        x: &ArrayD<f32>,
        k: usize,
    ) -> anyhow::Result<(Vec<f32>, Option<Vec<f32>>)> {
        let (setup, batch) = (self.setup, self.batch);
        let (cfg, call_batch) = (setup.guidance, self.call_batch);
        let index = self.records.len();
        let calls = setup.calls();
        let mut inputs = self.fixed_inputs.clone();
        let latent_in = if cfg.is_some() {
            ndarray::concatenate(Axis(0), &[x.view(), x.view()])?
        } else {
            x.clone()
        };
        inputs.insert(setup.roles.latent.clone(), Tensor::F32(latent_in));
        let t = setup.model_timestep(k);
        inputs.insert(
            setup.roles.timestep.clone(),
            timestep_tensor(setup, t, call_batch),
        );
        if index == 0 {
            setup.state.start(self.engine, &inputs)?;
        }

        let started = Instant::now();
        let mut outputs = self
            .engine
            .run(&inputs)
            .with_context(|| format!("model call {} of {calls}", index + 1))?;
        let seconds = started.elapsed().as_secs_f64();
        let stats = setup.state.take_stats(&mut outputs);
        let output = &setup.roles.output;
        let out = outputs
            .remove(output)
            .with_context(|| format!("the model gave no output '{output}'"))?
            .into_f32()
            .with_context(|| format!("prediction output '{output}' is not float32"))?;
        let channel_axis = channel_axis(&setup.roles.latent_shape);
        let channels = setup.roles.latent_shape[channel_axis - 1];
        let out_channels =
            check_output(output, out.shape(), call_batch, &setup.roles.latent_shape)?;
        let sigma = match self.learned_sigma {
            Some(true) if out_channels == 2 * channels => true,
            Some(false) if out_channels == channels => false,
            None if out_channels == 2 * channels => true,
            None if out_channels == channels => false,
            learned => bail!(
                "prediction output '{output}' has {out_channels} channels; expected {} for a latent of {channels} channels",
                match learned {
                    Some(true) => format!("{} (learned sigma)", 2 * channels),
                    Some(false) => channels.to_string(),
                    None => format!("{channels}, or {} with learned sigma", 2 * channels),
                },
            ),
        };
        self.learned_sigma = Some(sigma);
        let prediction = guided(&out, batch, channels, channel_axis, cfg);
        let variance: Option<Vec<f32>> = sigma.then(|| {
            out.slice_axis(Axis(0), Slice::from(0..batch))
                .slice_axis(Axis(channel_axis), Slice::from(channels..2 * channels))
                .iter()
                .copied()
                .collect()
        });
        let record = Step {
            index,
            timestep: rounded_if_integer(setup, t),
            seconds,
            stats,
        };
        (self.on_step)(&record);
        self.records.push(record);
        Ok((prediction, variance))
    }
}

fn rounded_if_integer(setup: &SamplerSetup, t: f64) -> f64 {
    if setup.roles.timestep_dtype.is_integer() {
        t.round()
    } else {
        t
    }
}

fn timestep_tensor(setup: &SamplerSetup, t: f64, call_batch: usize) -> Tensor {
    let shape: Vec<usize> = if setup.roles.timestep_scalar {
        vec![]
    } else {
        vec![call_batch]
    };
    let shape = IxDyn(&shape);
    match setup.roles.timestep_dtype {
        DType::I64 => Tensor::I64(ArrayD::from_elem(shape, t.round() as i64)),
        DType::I32 => Tensor::I32(ArrayD::from_elem(shape, t.round() as i32)),
        _ => Tensor::F32(ArrayD::from_elem(shape, t as f32)),
    }
}

/// The axis of a latent's channels: 1 in [batch, C, H, W], the last in [batch, N, C].
fn channel_axis(per_sample: &[usize]) -> usize {
    if per_sample.len() == 3 {
        1
    } else {
        per_sample.len()
    }
}

/// The prediction's channel count, when its shape is the latent's with C or 2·C channels.
fn check_output(
    name: &str,
    shape: &[usize],
    call_batch: usize,
    per_sample: &[usize],
) -> anyhow::Result<usize> {
    let axis = channel_axis(per_sample);
    let fits = shape.len() == per_sample.len() + 1
        && shape[0] == call_batch
        && (1..shape.len()).all(|a| a == axis || shape[a] == per_sample[a - 1]);
    if !fits {
        let mut expected: Vec<String> = std::iter::once(call_batch)
            .chain(per_sample.iter().copied())
            .map(|d| d.to_string())
            .collect();
        expected[axis] = "C".into();
        bail!(
            "prediction output '{name}' has shape {shape:?}; expected [{}]",
            expected.join(", ")
        );
    }
    Ok(shape[axis])
}

/// The ε or v of the conditional samples, guided: uncond + g·(cond − uncond), in f64.
fn guided(
    out: &ArrayD<f32>,
    batch: usize,
    channels: usize,
    channel_axis: usize,
    cfg: Option<f32>,
) -> Vec<f32> {
    let half = |from: usize| {
        out.slice_axis(Axis(0), Slice::from(from..from + batch))
            .slice_axis(Axis(channel_axis), Slice::from(0..channels))
            .to_owned()
    };
    let cond = half(0);
    match cfg {
        None => cond.iter().copied().collect(),
        Some(g) => {
            let g = g as f64;
            let uncond = half(batch);
            cond.iter()
                .zip(uncond.iter())
                .map(|(&c, &u)| (u as f64 + g * (c as f64 - u as f64)) as f32)
                .collect()
        }
    }
}

/// One seeded sampling run as `fastcache run` does it: the initial noise and any conditions the
/// caller did not give are drawn, in that order, from `seed`.
pub fn sample_seeded(
    engine: &mut dyn Engine,
    setup: &SamplerSetup,
    batch: usize,
    classes: &[i64],
    seed: u64,
    on_step: &mut dyn FnMut(&Step),
) -> anyhow::Result<Trajectory> {
    let mut rng = rng(seed);
    let x = standard_normal(&mut rng, &setup.latent_shape(batch));
    let conditioning = Conditioning::build(setup, batch, classes, TensorMap::new(), &mut rng)?;
    sample(
        engine,
        setup,
        x,
        &conditioning,
        &mut rng,
        &SampleOptions::default(),
        on_step,
    )
}
