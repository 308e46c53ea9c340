//! Which model input is the latent, the timestep, the class label, a text condition; which output
//! is the prediction.
//!
//! [`detect_roles`] is the one place that decides this, so that structure analysis can replace it
//! later. It goes by, in order: the names given in the `fastcache.sampler` entry or on the command
//! line; the names diffusers exports use (`hidden_states`, `timestep`, `class_labels`,
//! `encoder_hidden_states`, ...); then rank and dtype (the one float rank-4 input is the latent,
//! ...). Every input must get a role; one that does not is an error naming it, because feeding it
//! something made up would give silently wrong samples.

use anyhow::{Context, bail};
use fastcache_passes::ir::{Dim, Model};

use super::meta::SamplerMeta;
use crate::engine::{DType, ModelSpec, TensorSpec};

const LATENT_NAMES: &[&str] = &["hidden_states", "sample", "latent", "latents", "x", "x_t"];
const TIMESTEP_NAMES: &[&str] = &["timestep", "timesteps", "t", "time", "sigma"];
const CLASS_NAMES: &[&str] = &["class_labels", "class_label", "labels", "label", "y"];
/// A guidance-distilled model's guidance input (Flux-dev): a float per sample, found by name
/// only, since nothing in its shape tells it from a timestep.
const GUIDANCE_NAMES: &[&str] = &["guidance", "guidance_scale"];

/// Position ids of the rotary embedding (Flux's `img_ids`, `txt_ids`): [tokens, axes], no batch
/// axis, the same for every sample.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionInput {
    pub name: String,
    pub dtype: DType,
    /// Tokens × axes.
    pub shape: [usize; 2],
    /// The image tokens' ids (their count is the latent's), else the text tokens'.
    pub image: bool,
}

/// A float condition input (text embedding, pooled projection).
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionInput {
    pub name: String,
    /// The shape of one sample's condition (dims after the batch dim), when the model fixes it.
    pub per_sample: Option<Vec<usize>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Roles {
    pub latent: String,
    /// One sample's latent: C, H, W for an image latent [batch, C, H, W]; N, C for a latent
    /// packed into tokens [batch, N, C] (Flux).
    pub latent_shape: Vec<usize>,
    pub timestep: String,
    pub timestep_dtype: DType,
    /// A rank-0 timestep input takes one value for the whole batch.
    pub timestep_scalar: bool,
    pub class_label: Option<String>,
    pub class_dtype: DType,
    pub conditions: Vec<ConditionInput>,
    pub positions: Vec<PositionInput>,
    /// A guidance-distilled model's guidance input.
    pub guidance_input: Option<String>,
    pub output: String,
}

fn fixed(dims: &[Dim]) -> Option<Vec<usize>> {
    dims.iter()
        .map(|d| match d {
            Dim::Fixed(n) if *n >= 0 => Some(*n as usize),
            _ => None,
        })
        .collect()
}

fn by_name<'a>(
    candidates: &[&'a TensorSpec],
    given: Option<&str>,
    names: &[&str],
    what: &str,
) -> anyhow::Result<Option<&'a TensorSpec>> {
    if let Some(name) = given {
        return candidates
            .iter()
            .find(|t| t.name == name)
            .copied()
            .map(Some)
            .with_context(|| {
                format!(
                    "the {what} input is named '{name}', but the model has no such input (its inputs: {})",
                    candidates
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
    }
    for name in names {
        if let Some(t) = candidates.iter().find(|t| t.name == *name) {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// Assigns a role to every input of the model except the state inputs of its host contract, and
/// picks the prediction output among the outputs that are neither state nor stats.
pub fn detect_roles(
    spec: &ModelSpec,
    meta: &SamplerMeta,
    state_inputs: &[String],
    reserved_outputs: &[String],
) -> anyhow::Result<Roles> {
    let mut free: Vec<&TensorSpec> = spec
        .inputs
        .iter()
        .filter(|t| !state_inputs.contains(&t.name))
        .collect();
    let take = |free: &mut Vec<&TensorSpec>, name: &str| free.retain(|t| t.name != name);

    // Latent.
    let latent = match by_name(&free, meta.latent.as_deref(), LATENT_NAMES, "latent")? {
        Some(t) => t,
        None => {
            let rank4: Vec<&&TensorSpec> = free
                .iter()
                .filter(|t| is_float(t) && t.rank() == Some(4))
                .collect();
            match rank4.as_slice() {
                [one] => **one,
                [] => bail!(
                    "no input looks like the latent: expected a float32 input of rank 4 [batch, C, H, W], or one named {} (inputs: {})",
                    LATENT_NAMES.join("/"),
                    describe_all(&free)
                ),
                _ => bail!(
                    "several float32 rank-4 inputs could be the latent ({}); name it with --latent or the '{}' entry",
                    rank4
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    super::meta::METADATA_KEY
                ),
            }
        }
    };
    let latent_shape = match (&latent.dtype, &latent.dims) {
        (Some(d), Some(dims)) if d.is_float() && matches!(dims.len(), 3 | 4) => fixed(&dims[1..]),
        _ => None,
    };
    let Some(latent_shape) = latent_shape else {
        bail!(
            "latent input '{}': expected float32, float16 or bfloat16 [batch, C, H, W] with fixed C, H, W (or [batch, N, C] packed into tokens), found {}",
            latent.name,
            latent.describe()
        );
    };
    let latent_name = latent.name.clone();
    take(&mut free, &latent_name);

    // Timestep.
    let timestep = match by_name(&free, meta.timestep.as_deref(), TIMESTEP_NAMES, "timestep")? {
        Some(t) => t,
        None => {
            let scalars: Vec<&&TensorSpec> = free
                .iter()
                .filter(|t| is_float(t) && t.rank().is_some_and(|r| r <= 1))
                .collect();
            match scalars.as_slice() {
                [one] => **one,
                _ => bail!(
                    "no input looks like the timestep: expected one input named {} or a single float32 input of shape [batch] (inputs: {})",
                    TIMESTEP_NAMES.join("/"),
                    describe_all(&free)
                ),
            }
        }
    };
    let timestep_dtype = match timestep.dtype {
        Some(d @ (DType::F32 | DType::F16 | DType::BF16 | DType::I64 | DType::I32))
            if timestep.rank().is_some_and(|r| r <= 1) =>
        {
            d
        }
        _ => bail!(
            "timestep input '{}': expected float32, int64 or int32 of shape [batch] or a scalar, found {}",
            timestep.name,
            timestep.describe()
        ),
    };
    let timestep_scalar = timestep.rank() == Some(0);
    let timestep_name = timestep.name.clone();
    take(&mut free, &timestep_name);

    // Class label.
    let class = match by_name(
        &free,
        meta.class_label.as_deref(),
        CLASS_NAMES,
        "class label",
    )? {
        Some(t) => Some(t),
        None => {
            let ints: Vec<&&TensorSpec> = free
                .iter()
                .filter(|t| t.dtype.is_some_and(DType::is_integer) && t.rank() == Some(1))
                .collect();
            match ints.as_slice() {
                [one] => Some(**one),
                _ => None,
            }
        }
    };
    let (class_label, class_dtype) = match class {
        None => (None, DType::I64),
        Some(t) => match t.dtype {
            Some(d @ (DType::I64 | DType::I32)) if t.rank() == Some(1) => (Some(t.name.clone()), d),
            _ => bail!(
                "class label input '{}': expected int64 or int32 [batch], found {}",
                t.name,
                t.describe()
            ),
        },
    };
    if let Some(name) = &class_label {
        take(&mut free, name);
    }

    // Position ids: rank 2 without the batch axis.
    let batch_dim = latent.dims.as_ref().and_then(|d| d.first().cloned());
    let mut positions = Vec::new();
    for t in &free {
        let Some(dims) = t.dims.as_ref().filter(|d| d.len() == 2) else {
            continue;
        };
        let (Some(shape), Some(dtype)) = (fixed(dims), t.dtype) else {
            continue;
        };
        if batch_dim.as_ref() == Some(&dims[0]) || !(dtype.is_float() || dtype == DType::I64) {
            continue;
        }
        let image_tokens = (latent_shape.len() == 2).then(|| latent_shape[0]);
        positions.push(PositionInput {
            name: t.name.clone(),
            dtype,
            shape: [shape[0], shape[1]],
            image: image_tokens == Some(shape[0]),
        });
    }
    for p in &positions {
        take(&mut free, &p.name);
    }
    let guidance_input = free
        .iter()
        .find(|t| GUIDANCE_NAMES.contains(&t.name.as_str()))
        .map(|t| {
            if !is_float(t) || t.rank() != Some(1) {
                bail!(
                    "guidance input '{}': expected float32, float16 or bfloat16 [batch], found {}",
                    t.name,
                    t.describe()
                );
            }
            Ok(t.name.clone())
        })
        .transpose()?;
    if let Some(name) = &guidance_input {
        take(&mut free, name);
    }

    // Conditions: the float inputs left.
    let condition_specs: Vec<&TensorSpec> = match &meta.conditions {
        Some(names) => names
            .iter()
            .map(|name| {
                free.iter()
                    .find(|t| &t.name == name)
                    .copied()
                    .with_context(|| {
                        format!("condition input '{name}' is not a free input of the model")
                    })
            })
            .collect::<anyhow::Result<_>>()?,
        None => free.iter().filter(|t| is_float(t)).copied().collect(),
    };
    let mut conditions = Vec::new();
    for t in condition_specs {
        let Some(dims) = t.dims.as_ref().filter(|d| !d.is_empty()) else {
            bail!(
                "condition input '{}': expected float32 [batch, ...], found {}",
                t.name,
                t.describe()
            );
        };
        if !is_float(t) {
            bail!(
                "condition input '{}': expected float32, float16 or bfloat16 [batch, ...], found {}",
                t.name,
                t.describe()
            );
        }
        conditions.push(ConditionInput {
            name: t.name.clone(),
            per_sample: fixed(&dims[1..]),
        });
    }
    for c in &conditions {
        take(&mut free, &c.name);
    }
    if let Some(left) = free.first() {
        bail!(
            "model input '{}' ({}) has no role the sampler knows (latent '{}', timestep '{}'{}{}); name the roles in the '{}' metadata entry or on the command line",
            left.name,
            left.describe(),
            latent_name,
            timestep_name,
            class_label
                .as_ref()
                .map(|c| format!(", class label '{c}'"))
                .unwrap_or_default(),
            if conditions.is_empty() {
                String::new()
            } else {
                format!(
                    ", conditions {}",
                    conditions
                        .iter()
                        .map(|c| format!("'{}'", c.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            super::meta::METADATA_KEY
        );
    }

    // Output.
    let output = match &meta.output {
        Some(name) => spec
            .output(name)
            .with_context(|| format!("the model has no output '{name}'"))?,
        None => spec
            .outputs
            .iter()
            .find(|t| !reserved_outputs.contains(&t.name))
            .context("the model has no output besides its state and stats")?,
    };
    let rank = latent_shape.len() + 1;
    if !is_float(output) || output.rank().is_some_and(|r| r != rank) {
        bail!(
            "prediction output '{}': expected float32, float16 or bfloat16 of the latent's rank {rank}, found {}",
            output.name,
            output.describe()
        );
    }

    Ok(Roles {
        latent: latent_name,
        latent_shape,
        timestep: timestep_name,
        timestep_dtype,
        timestep_scalar,
        class_label,
        class_dtype,
        conditions,
        positions,
        guidance_input,
        output: output.name.clone(),
    })
}

fn describe_all(specs: &[&TensorSpec]) -> String {
    if specs.is_empty() {
        return "none left".into();
    }
    specs
        .iter()
        .map(|t| format!("'{}' {}", t.name, t.describe()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// DiT's convention: the class embedding table has one row per class plus one for the null class,
/// which is the last. Finds tables gathered by the class label input (directly or through casts
/// and reshapes) and returns their last row's index, with a note saying where it came from.
pub fn guess_null_class(model: &Model, class_input: &str) -> Option<(i64, String)> {
    let graph = &model.graph;
    let mut values = vec![class_input.to_string()];
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while let Some(value) = values.pop() {
        if !seen.insert(value.clone()) {
            continue;
        }
        for id in graph.consumers(&value) {
            let node = graph.node(id);
            match node.op_type.as_str() {
                "Cast" | "Identity" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten"
                    if node.inputs.first() == Some(&value) =>
                {
                    values.extend(node.outputs.iter().cloned());
                }
                "Gather" if node.inputs.get(1) == Some(&value) => {
                    let table = graph.initializer(&node.inputs[0])?;
                    if table.dims.len() != 2 {
                        return None;
                    }
                    rows.push(table.dims[0]);
                }
                _ => {}
            }
        }
    }
    let first = *rows.first()?;
    if first < 2 || rows.iter().any(|&r| r != first) {
        return None;
    }
    Some((
        first - 1,
        format!(
            "guessed: the last row of the {first}-row class embedding table (DiT's convention)"
        ),
    ))
}

/// A float32, float16 or bfloat16 tensor: the sampler computes in float32, and an engine
/// converts at a half-precision model's boundary.
fn is_float(t: &TensorSpec) -> bool {
    t.dtype.is_some_and(DType::is_float)
}
