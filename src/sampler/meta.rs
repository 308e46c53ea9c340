//! The `fastcache.sampler` metadata entry: how to sample a model, said by the model itself.
//!
//! A model may carry a `metadata_props` entry with key `fastcache.sampler` whose value is a JSON
//! object. Every field is optional; what is absent is detected from the model's inputs (see
//! [`super::roles`]) or takes the default below. Unknown fields are an error, so that a typo does
//! not silently fall back to a default. Command-line options override the entry field by field.
//!
//! ```json
//! {"objective": "epsilon",          // or "rectified_flow"
//!  "learned_sigma": true,           // epsilon models: output has 2×C channels, ε first
//!  "timestep_scale": 1.0,           // see below
//!  "null_class": 10,                // class id of the unconditional half of CFG
//!  "latent": "hidden_states",       // input names, when they cannot be told from the model
//!  "timestep": "timestep",
//!  "class_label": "class_labels",
//!  "conditions": ["encoder_hidden_states"],
//!  "output": "sample",
//!  "num_train_timesteps": 1000,     // epsilon models: DiT's linear β schedule by default
//!  "beta_start": 0.0001,
//!  "beta_end": 0.02,
//!  "flow_shift": 1.0}               // rectified flow: σ' = shift·σ / (1 + (shift − 1)·σ)
//! ```
//!
//! What the model sees as its timestep input:
//! - epsilon: `t · timestep_scale`, where t is the training step index 0..num_train_timesteps−1
//!   (default scale 1: DiT and PixArt take integer steps 0..999);
//! - rectified flow: `σ · timestep_scale`, σ in [0, 1] (default scale 1000, as SD3 and Flux
//!   exports take σ·1000).
//!
//! Integer timestep inputs get the value rounded to the nearest integer.

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The metadata key of the entry.
pub const METADATA_KEY: &str = "fastcache.sampler";

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// ε-prediction on a discrete β schedule (DiT, PixArt).
    Epsilon,
    /// Velocity prediction for rectified flow, v = noise − data (SD3, Flux).
    RectifiedFlow,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Epsilon => "epsilon",
            Objective::RectifiedFlow => "rectified_flow",
        }
    }
}

/// The `fastcache.sampler` entry; also the set of command-line overrides.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerMeta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective: Option<Objective>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned_sigma: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub null_class: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_shift: Option<f64>,
    /// The value a guidance-distilled model's guidance input gets (Flux-dev's embedded
    /// guidance; default 3.5), not to be confused with classifier-free guidance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded_guidance: Option<f64>,
}

impl SamplerMeta {
    pub fn parse(json: &str) -> anyhow::Result<SamplerMeta> {
        serde_json::from_str(json)
            .with_context(|| format!("metadata entry '{METADATA_KEY}' is not valid: {json}"))
    }

    /// Reads the entry from a model's metadata; an absent entry is an empty one.
    pub fn from_metadata(
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<SamplerMeta> {
        metadata
            .get(METADATA_KEY)
            .map_or(Ok(SamplerMeta::default()), |json| SamplerMeta::parse(json))
    }

    /// Field by field: `over`'s value where it has one, else this one's.
    pub fn overridden_by(self, over: SamplerMeta) -> SamplerMeta {
        SamplerMeta {
            objective: over.objective.or(self.objective),
            learned_sigma: over.learned_sigma.or(self.learned_sigma),
            timestep_scale: over.timestep_scale.or(self.timestep_scale),
            null_class: over.null_class.or(self.null_class),
            latent: over.latent.or(self.latent),
            timestep: over.timestep.or(self.timestep),
            class_label: over.class_label.or(self.class_label),
            conditions: over.conditions.or(self.conditions),
            output: over.output.or(self.output),
            num_train_timesteps: over.num_train_timesteps.or(self.num_train_timesteps),
            beta_start: over.beta_start.or(self.beta_start),
            beta_end: over.beta_end.or(self.beta_end),
            flow_shift: over.flow_shift.or(self.flow_shift),
            embedded_guidance: over.embedded_guidance.or(self.embedded_guidance),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let meta = SamplerMeta::parse(
            r#"{"objective":"epsilon","learned_sigma":true,"timestep_scale":1.0,"null_class":10,"latent":"hidden_states"}"#,
        )
        .unwrap();
        assert_eq!(meta.objective, Some(Objective::Epsilon));
        assert_eq!(meta.null_class, Some(10));
        assert_eq!(meta.latent.as_deref(), Some("hidden_states"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = SamplerMeta::parse(r#"{"objectve":"epsilon"}"#).unwrap_err();
        assert!(format!("{error:#}").contains("unknown field `objectve`"));
    }

    #[test]
    fn overrides_win_field_by_field() {
        let meta = SamplerMeta {
            null_class: Some(10),
            timestep_scale: Some(1.0),
            ..Default::default()
        };
        let merged = meta.overridden_by(SamplerMeta {
            timestep_scale: Some(1000.0),
            ..Default::default()
        });
        assert_eq!(merged.null_class, Some(10));
        assert_eq!(merged.timestep_scale, Some(1000.0));
    }
}
