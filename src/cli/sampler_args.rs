//! The sampler options `run`, `bench` and `calibrate` share: the update rule and every field of
//! the model's `fastcache.sampler` metadata entry, so that a model without the entry can be
//! described on the command line alone.

use crate::sampler::{Objective, SamplerKind, SamplerMeta};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplerArgs {
    /// Sampler (default: ddim for epsilon models, euler for rectified flow).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerKind>,
    /// Override the model's objective.
    #[arg(long, value_enum)]
    pub objective: Option<Objective>,
    /// Override whether the output carries learned variance channels after ε.
    #[arg(long)]
    pub learned_sigma: Option<bool>,
    /// Override the timestep scale (epsilon: t·scale; rectified flow: σ·scale).
    #[arg(long)]
    pub timestep_scale: Option<f64>,
    /// Override the null class id of classifier-free guidance.
    #[arg(long)]
    pub null_class: Option<i64>,
    /// Rectified flow: shift of the σ schedule (1 = none).
    #[arg(long)]
    pub flow_shift: Option<f64>,
    /// Name of the latent input, when it cannot be told from the model.
    #[arg(long)]
    pub latent: Option<String>,
    /// The value of a guidance-distilled model's guidance input (Flux-dev's; default 3.5). Not
    /// classifier-free guidance, which is --cfg.
    #[arg(long)]
    pub embedded_guidance: Option<f64>,
}

impl SamplerArgs {
    /// The metadata fields given on the command line.
    pub fn overrides(&self) -> SamplerMeta {
        SamplerMeta {
            objective: self.objective,
            learned_sigma: self.learned_sigma,
            timestep_scale: self.timestep_scale,
            null_class: self.null_class,
            flow_shift: self.flow_shift,
            latent: self.latent.clone(),
            embedded_guidance: self.embedded_guidance,
            ..SamplerMeta::default()
        }
    }
}
