//! The host-split runner: a model cut by `fastcache rewrite --split DIR` (see
//! [`fastcache_passes::split`]) run segment by segment on one engine kind. Each segment is a
//! model of its own in that engine; the runner keeps every value by name, and at a branch reads
//! the `If`'s condition on the host (one boolean per `If` a call) and runs that body alone. To
//! the sampler it is the single-graph model: the same inputs, outputs and state contract.
//!
//! State is kept on the host between calls, as tract keeps it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fastcache_passes::split::{Manifest, ManifestSegment};

use super::{
    Engine, EngineInfo, EngineKind, HostState, ModelSpec, Options, StateSlot, Tensor, TensorMap,
};

enum Loaded {
    Graph(Box<dyn Engine>),
    Branch {
        name: String,
        cond: String,
        then: Box<dyn Engine>,
        otherwise: Box<dyn Engine>,
    },
}

pub struct SplitEngine {
    /// The single-graph model's spec, which the split must match.
    spec: ModelSpec,
    segments: Vec<Loaded>,
    state: HostState,
    dir: PathBuf,
    inner: EngineInfo,
}

impl SplitEngine {
    /// Opens the split in `dir` for the model described by `spec` (the single graph it was cut
    /// from), each segment in an engine of `kind`.
    pub fn open(
        kind: EngineKind,
        dir: &Path,
        spec: ModelSpec,
        options: &Options,
    ) -> anyhow::Result<SplitEngine> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read {} (made by `rewrite --split`)", path.display())
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a host-split manifest", path.display()))?;
        if manifest.version != fastcache_passes::split::MANIFEST_VERSION {
            bail!(
                "{}: manifest version {}, this build reads version {}",
                path.display(),
                manifest.version,
                fastcache_passes::split::MANIFEST_VERSION
            );
        }
        let names = |specs: &[super::TensorSpec]| -> Vec<String> {
            specs.iter().map(|t| t.name.clone()).collect()
        };
        if manifest.inputs != names(&spec.inputs) || manifest.outputs != names(&spec.outputs) {
            bail!(
                "the split in {} was cut from another model: it takes [{}] and gives [{}], the model takes [{}] and gives [{}]",
                dir.display(),
                manifest.inputs.join(", "),
                manifest.outputs.join(", "),
                names(&spec.inputs).join(", "),
                names(&spec.outputs).join(", ")
            );
        }
        let open = |file: &str| {
            let path = dir.join(file);
            super::open(kind, &path, options)
                .with_context(|| format!("cannot load segment {}", path.display()))
        };
        let mut segments = Vec::with_capacity(manifest.segments.len());
        for segment in manifest.segments {
            segments.push(match segment {
                ManifestSegment::Graph { file } => Loaded::Graph(open(&file)?),
                ManifestSegment::Branch {
                    name,
                    cond,
                    then,
                    otherwise,
                } => Loaded::Branch {
                    name,
                    cond,
                    then: open(&then)?,
                    otherwise: open(&otherwise)?,
                },
            });
        }
        let inner = match segments.first() {
            Some(Loaded::Graph(e)) => e.info(),
            Some(Loaded::Branch { then, .. }) => then.info(),
            None => bail!("{}: the split has no segment", path.display()),
        };
        Ok(SplitEngine {
            spec,
            segments,
            state: HostState::default(),
            dir: dir.to_path_buf(),
            inner,
        })
    }
}

/// Runs `engine` on its inputs taken from `values` and adds its outputs there.
fn run_segment(engine: &mut dyn Engine, values: &mut TensorMap) -> anyhow::Result<()> {
    let mut feeds = TensorMap::new();
    for input in &engine.spec().inputs {
        let value = values
            .get(&input.name)
            .with_context(|| format!("no earlier segment made '{}'", input.name))?;
        feeds.insert(input.name.clone(), value.clone());
    }
    for (name, value) in engine.run(&feeds)?.into_iter() {
        values.insert(name, value);
    }
    Ok(())
}

/// An `If` condition as the host reads it: a one-element bool tensor.
fn condition(values: &TensorMap, cond: &str, name: &str) -> anyhow::Result<bool> {
    match values.get(cond) {
        Some(Tensor::Bool(a)) if a.len() == 1 => Ok(*a.iter().next().expect("one element")),
        Some(other) => bail!(
            "the condition '{cond}' of '{name}' is {}, not one bool",
            other.describe()
        ),
        None => bail!("no segment made the condition '{cond}' of '{name}'"),
    }
}

impl Engine for SplitEngine {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn info(&self) -> EngineInfo {
        EngineInfo {
            engine: format!(
                "{}, host split into {} segments ({})",
                self.inner.engine,
                self.segments.len(),
                self.dir.display()
            ),
            state_memory: "host".into(),
            ..self.inner.clone()
        }
    }

    fn bind_state(&mut self, slots: Vec<StateSlot>) -> anyhow::Result<()> {
        self.state.bind(&self.spec, slots)
    }

    fn state(&self) -> anyhow::Result<TensorMap> {
        Ok(self.state.values().clone())
    }

    fn run(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let bound = self.state.bound_inputs();
        self.spec.check_inputs(inputs, &bound)?;
        let mut values = inputs.clone();
        for (name, value) in self.state.values().iter() {
            values.insert(name, value.clone());
        }
        for segment in &mut self.segments {
            match segment {
                Loaded::Graph(engine) => run_segment(engine.as_mut(), &mut values)?,
                Loaded::Branch {
                    name,
                    cond,
                    then,
                    otherwise,
                } => {
                    let chosen = if condition(&values, cond, name)? {
                        then
                    } else {
                        otherwise
                    };
                    run_segment(chosen.as_mut(), &mut values)?;
                }
            }
        }
        let mut result = TensorMap::new();
        for output in &self.spec.outputs {
            let value = values
                .remove(&output.name)
                .with_context(|| format!("no segment made the output '{}'", output.name))?;
            result.insert(output.name.clone(), value);
        }
        self.state.absorb(&mut result)?;
        Ok(result)
    }
}
