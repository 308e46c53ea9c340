//! Host-split runners: a model cut by `fastcache rewrite --split DIR` (see
//! [`fastcache_passes::split`]) run segment by segment. To the sampler a split is the
//! single-graph model: the same inputs, outputs and state contract.
//!
//! This file reads and checks the manifest for both runners ([`read_manifest`], [`load_parts`])
//! and holds [`SplitEngine`], which runs each segment as a model of its own in any engine and
//! keeps every value by name on the host, state included (as tract keeps it); at a branch it
//! reads the `If`'s condition and runs that body alone, and where the manifest knows the decision
//! (FastCache's schedule) it checks the two agree. ONNX Runtime runs splits with the values on
//! its device instead ([`OrtSplitEngine`]); [`open`] picks the runner for an engine kind.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fastcache_passes::split::{Manifest, ManifestSegment};

use super::onnxruntime::split::OrtSplitEngine;

use super::{
    Engine, EngineInfo, EngineKind, HostState, ModelSpec, Options, StateSlot, Tensor, TensorMap,
};

/// Opens the split in `dir` (cut from the model `spec` describes) on `kind`: on ONNX Runtime
/// with its values kept on the session's device ([`OrtSplitEngine`]), on tract segment by
/// segment with the values on the host ([`SplitEngine`]).
pub fn open(
    kind: EngineKind,
    dir: &Path,
    spec: ModelSpec,
    options: &Options,
) -> anyhow::Result<Box<dyn Engine>> {
    Ok(match kind {
        EngineKind::Ort => Box::new(OrtSplitEngine::open(dir, spec, options)?),
        EngineKind::Tract => Box::new(SplitEngine::open(kind, dir, spec, options)?),
    })
}

/// One entry of a split's manifest, loaded: a straight-line segment, or a branch's decision and
/// its two bodies.
pub(crate) enum Part<T> {
    Graph(T),
    Branch {
        decision: Decision,
        then: T,
        otherwise: T,
    },
}

/// The manifest's segments in order, each segment file loaded by `load`.
pub(crate) fn load_parts<T>(
    manifest: Manifest,
    mut load: impl FnMut(&str) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<Part<T>>> {
    let mut parts = Vec::with_capacity(manifest.segments.len());
    for segment in manifest.segments {
        parts.push(match segment {
            ManifestSegment::Graph { file } => Part::Graph(load(&file)?),
            ManifestSegment::Branch {
                name,
                cond,
                then,
                otherwise,
                by_step,
            } => Part::Branch {
                decision: Decision {
                    name,
                    cond,
                    by_step,
                },
                then: load(&then)?,
                otherwise: load(&otherwise)?,
            },
        });
    }
    Ok(parts)
}

pub struct SplitEngine {
    /// The single-graph model's spec, which the split must match.
    spec: ModelSpec,
    segments: Vec<Part<Box<dyn Engine>>>,
    state: HostState,
    /// Calls since the state was bound: the step counter's value, which schedule decisions
    /// are read from.
    calls: usize,
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
        let manifest = read_manifest(dir, &spec)?;
        let open = |file: &str| {
            let path = dir.join(file);
            super::open(kind, &path, options)
                .with_context(|| format!("cannot load segment {}", path.display()))
        };
        let segments = load_parts(manifest, open)?;
        let inner = match segments.first() {
            Some(Part::Graph(e)) => e.info(),
            Some(Part::Branch { then, .. }) => then.info(),
            None => bail!("{}: the split has no segment", dir.display()),
        };
        Ok(SplitEngine {
            spec,
            segments,
            state: HostState::default(),
            calls: 0,
            dir: dir.to_path_buf(),
            inner,
        })
    }
}

/// Reads and checks the manifest of the split in `dir`, cut from the model `spec` describes.
pub(crate) fn read_manifest(dir: &Path, spec: &ModelSpec) -> anyhow::Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (made by `rewrite --split`)", path.display()))?;
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
    if manifest.segments.is_empty() {
        bail!("{}: the split has no segment", path.display());
    }
    Ok(manifest)
}

/// A branch's condition: its name, and its value at each call where the manifest knows it.
pub(crate) struct Decision {
    pub name: String,
    pub cond: String,
    pub by_step: Option<Vec<bool>>,
}

impl Decision {
    /// The condition at call `call` of a run, where the schedule fixes it.
    pub fn by_step(&self, call: usize) -> Option<bool> {
        let table = self.by_step.as_ref()?;
        table.get(call.min(table.len().checked_sub(1)?)).copied()
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
        self.calls = 0;
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
                Part::Graph(engine) => run_segment(engine.as_mut(), &mut values)?,
                Part::Branch {
                    decision,
                    then,
                    otherwise,
                } => {
                    // The condition is on the host already, so a schedule's table is checked
                    // against it here rather than trusted: what a device host relies on.
                    let read = condition(&values, &decision.cond, &decision.name)?;
                    if let Some(known) = decision.by_step(self.calls)
                        && known != read
                    {
                        bail!(
                            "the split's schedule says '{}' is {known} at call {}, the model computed {read}",
                            decision.name,
                            self.calls
                        );
                    }
                    let chosen = if read { then } else { otherwise };
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
        self.calls += 1;
        Ok(result)
    }
}
