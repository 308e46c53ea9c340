//! A host split (`fastcache rewrite --split DIR`) on ONNX Runtime with its values on the
//! session's device: every segment's outputs are bound to device memory and handed to the next
//! segment as they are, and the state outputs of a call become the next call's state inputs
//! without a copy. What crosses between host and device in a call is the sampler's inputs, the
//! model's outputs, and one bool per `If` whose decision the manifest does not know; a branch
//! decided by FastCache's calibrated schedule is taken from the manifest by counting calls, with
//! no read at all. On the CPU provider "device" memory is host memory and the same code runs, so
//! CI exercises this path.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fastcache_passes::split::ManifestSegment;
use ort::memory::{AllocationDevice, MemoryInfo};
use ort::session::{IoBinding, Session};
use ort::value::DynTensor;

use super::{
    OpenedSession, Provider, dtype_of, from_ort, open_session, ort_error, sentence, to_ort,
};
use crate::engine::split::{Decision, read_manifest};
use crate::engine::{
    Engine, EngineInfo, ModelSpec, Options, StateSlot, Tensor, TensorMap, check_state_output,
    validate_slots,
};

/// One straight-line model of the split, with the binding it runs through.
struct Segment {
    session: Session,
    binding: IoBinding,
    inputs: Vec<String>,
    outputs: Vec<String>,
    file: PathBuf,
}

enum Part {
    Graph(Box<Segment>),
    Branch {
        decision: Decision,
        then: Box<Segment>,
        otherwise: Box<Segment>,
    },
}

pub struct OrtSplitEngine {
    spec: ModelSpec,
    parts: Vec<Part>,
    provider: Provider,
    threads: usize,
    version: String,
    device: MemoryInfo<'static>,
    host: MemoryInfo<'static>,
    /// The state pairs (input, output) and the values the next call reads, on the device.
    slots: Vec<(String, String)>,
    state: Vec<DynTensor>,
    /// Calls since the state was bound: the step counter, which schedule decisions follow.
    calls: usize,
    dir: PathBuf,
}

impl OrtSplitEngine {
    pub fn open(dir: &Path, spec: ModelSpec, options: &Options) -> anyhow::Result<OrtSplitEngine> {
        let manifest = read_manifest(dir, &spec)?;
        let mut opened: Option<(usize, String, MemoryInfo<'static>, MemoryInfo<'static>)> = None;
        let mut segment = |file: &str| -> anyhow::Result<Segment> {
            let path = dir.join(file);
            let OpenedSession {
                session,
                threads,
                version,
                device,
                host,
            } = open_session(&path, options)
                .with_context(|| format!("cannot load segment {}", path.display()))?;
            opened.get_or_insert((threads, version, device, host));
            let inputs = session
                .inputs()
                .iter()
                .map(|i| i.name().to_string())
                .collect();
            let outputs = session
                .outputs()
                .iter()
                .map(|o| o.name().to_string())
                .collect();
            let binding = session.create_binding().map_err(ort_error)?;
            Ok(Segment {
                session,
                binding,
                inputs,
                outputs,
                file: path,
            })
        };
        let mut parts = Vec::with_capacity(manifest.segments.len());
        for entry in manifest.segments {
            parts.push(match entry {
                ManifestSegment::Graph { file } => Part::Graph(Box::new(segment(&file)?)),
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
                    then: Box::new(segment(&then)?),
                    otherwise: Box::new(segment(&otherwise)?),
                },
            });
        }
        let (threads, version, device, host) = opened.expect("a manifest has a segment");
        Ok(OrtSplitEngine {
            spec,
            parts,
            provider: options.provider,
            threads,
            version,
            device,
            host,
            slots: Vec::new(),
            state: Vec::new(),
            calls: 0,
            dir: dir.to_path_buf(),
        })
    }

    /// Branches whose condition is read from the device at every call, and those the
    /// calibrated schedule decides with no read.
    fn decisions(&self) -> (usize, usize) {
        let known =
            |p: &&Part| matches!(p, Part::Branch { decision, .. } if decision.by_step.is_some());
        let branches = self
            .parts
            .iter()
            .filter(|p| matches!(p, Part::Branch { .. }));
        let scheduled = branches.clone().filter(known).count();
        (branches.count() - scheduled, scheduled)
    }
}

/// Where a value lives: host memory for the model's results, the device for everything a later
/// segment or the next call reads.
fn placement<'m>(
    name: &str,
    results: &[String],
    device: &'m MemoryInfo<'static>,
    host: &'m MemoryInfo<'static>,
) -> &'m MemoryInfo<'static> {
    if results.iter().any(|r| r == name) {
        host
    } else {
        device
    }
}

impl Segment {
    /// Binds the segment's inputs (found by `value`) and its outputs to their memory, runs it,
    /// and gives back its outputs.
    fn run<'v>(
        &mut self,
        value: &dyn Fn(&str) -> Option<&'v DynTensor>,
        memory: &dyn Fn(&str) -> MemoryInfo<'static>,
    ) -> anyhow::Result<Vec<(String, DynTensor)>> {
        self.binding.clear();
        for input in &self.inputs {
            let value =
                value(input).with_context(|| format!("no earlier segment made '{input}'"))?;
            self.binding
                .bind_input(input.as_str(), value)
                .map_err(ort_error)?;
        }
        for output in &self.outputs {
            self.binding
                .bind_output_to_device(output.as_str(), &memory(output))
                .map_err(ort_error)?;
        }
        let mut outputs = self.session.run_binding(&self.binding).map_err(|e| {
            anyhow::anyhow!(
                "ONNX Runtime failed to run {}: {}",
                self.file.display(),
                sentence(&e.to_string())
            )
        })?;
        let mut made = Vec::with_capacity(self.outputs.len());
        for output in &self.outputs {
            let value = outputs
                .remove(output.as_str())
                .with_context(|| format!("{} gave no '{output}'", self.file.display()))?;
            made.push((output.clone(), value.downcast().map_err(ort_error)?));
        }
        Ok(made)
    }
}

/// A value on the host: itself where the host can read it, else a copy.
fn on_host(name: &str, value: &DynTensor) -> anyhow::Result<Tensor> {
    if value.memory_info().is_cpu_accessible() {
        return from_ort(name, &value.view().into_dyn());
    }
    let copy = value.to(AllocationDevice::CPU, 0).map_err(ort_error)?;
    from_ort(name, &copy.into_dyn())
}

/// A host value moved to the device's memory once (the initial state).
fn to_device(tensor: &Tensor, device: &MemoryInfo<'static>) -> anyhow::Result<DynTensor> {
    let value: DynTensor = to_ort(tensor)?.downcast().map_err(ort_error)?;
    if device.is_cpu_accessible() {
        return Ok(value);
    }
    value
        .to(device.allocation_device(), device.device_id())
        .map_err(ort_error)
}

impl Engine for OrtSplitEngine {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn info(&self) -> EngineInfo {
        let (read, scheduled) = self.decisions();
        EngineInfo {
            engine: format!(
                "onnxruntime {}, host split into {} segments ({}); conditions read per call: {read}, decided by the calibrated schedule: {scheduled}",
                self.version,
                self.parts.len(),
                self.dir.display()
            ),
            provider: self.provider.ort_name().to_string(),
            threads: format!("{} intra-op threads, spinning off", self.threads),
            state_memory: match self.provider {
                Provider::Cpu => {
                    "host (IoBinding, segment values and state kept in ONNX Runtime)".into()
                }
                _ => "device (IoBinding, segment values and state stay on the device)".into(),
            },
        }
    }

    fn bind_state(&mut self, slots: Vec<StateSlot>) -> anyhow::Result<()> {
        validate_slots(&self.spec, &slots)?;
        self.state = slots
            .iter()
            .map(|slot| to_device(&slot.initial, &self.device))
            .collect::<anyhow::Result<_>>()?;
        self.slots = slots.into_iter().map(|s| (s.input, s.output)).collect();
        self.calls = 0;
        Ok(())
    }

    fn state(&self) -> anyhow::Result<TensorMap> {
        let mut result = TensorMap::new();
        for ((input, _), value) in self.slots.iter().zip(&self.state) {
            result.insert(input.clone(), on_host(input, value)?);
        }
        Ok(result)
    }

    fn run(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let bound: Vec<&str> = self.slots.iter().map(|(i, _)| i.as_str()).collect();
        self.spec.check_inputs(inputs, &bound)?;
        let inputs = self.spec.to_model_types(inputs);
        let mut values: Vec<(String, DynTensor)> = Vec::new();
        for (name, tensor) in inputs.iter() {
            values.push((
                name.to_string(),
                to_ort(tensor)?.downcast().map_err(ort_error)?,
            ));
        }
        // The model's results go to the host; a state output stays where it is.
        let results: Vec<String> = self
            .spec
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .filter(|name| !self.slots.iter().any(|(_, output)| output == name))
            .collect();
        let (device, host) = (self.device.clone(), self.host.clone());
        let memory = move |name: &str| placement(name, &results, &device, &host).clone();
        let (slots, state) = (&self.slots, &self.state);
        for part in &mut self.parts {
            // This call's values, then the state it reads (bound in place, never copied).
            let value = |name: &str| {
                find(&values, name).or_else(|| {
                    let k = slots.iter().position(|(input, _)| input == name)?;
                    state.get(k)
                })
            };
            let made = match part {
                Part::Graph(segment) => segment.run(&value, &memory)?,
                Part::Branch {
                    decision,
                    then,
                    otherwise,
                } => {
                    let take_then = match decision.by_step(self.calls) {
                        Some(known) => known,
                        None => read_condition(&value, decision)?,
                    };
                    let chosen = if take_then { then } else { otherwise };
                    chosen.run(&value, &memory)?
                }
            };
            for (name, tensor) in made {
                values.retain(|(n, _)| *n != name);
                values.push((name, tensor));
            }
        }
        let mut next_state = Vec::with_capacity(self.slots.len());
        for (k, (input, output)) in self.slots.iter().enumerate() {
            let value = take(&mut values, output)?;
            // A state output must keep its state's type and shape to be read back next call.
            let (was, now) = (kind(output, &self.state[k])?, kind(output, &value)?);
            check_state_output(input, output, (was.0, &was.1), (now.0, &now.1))?;
            next_state.push(value);
        }
        let mut result = TensorMap::new();
        for output in &self.spec.outputs {
            if self.slots.iter().any(|(_, o)| o == &output.name) {
                continue;
            }
            let value = take(&mut values, &output.name)?;
            result.insert(output.name.clone(), on_host(&output.name, &value)?);
        }
        self.state = next_state;
        self.calls += 1;
        Ok(result)
    }
}

/// A tensor value's element type and shape, as the engine's state checks say them.
fn kind(name: &str, value: &DynTensor) -> anyhow::Result<(crate::engine::DType, Vec<usize>)> {
    match value.dtype() {
        ort::value::ValueType::Tensor { ty, shape, .. } => Ok((
            dtype_of(name, ty)?,
            shape.iter().map(|&d| d.max(0) as usize).collect(),
        )),
        other => bail!("'{name}' is a {other}, not a tensor"),
    }
}

fn find<'v>(values: &'v [(String, DynTensor)], name: &str) -> Option<&'v DynTensor> {
    values.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

fn take(values: &mut Vec<(String, DynTensor)>, name: &str) -> anyhow::Result<DynTensor> {
    let k = values
        .iter()
        .position(|(n, _)| n == name)
        .with_context(|| format!("no segment made the output '{name}'"))?;
    Ok(values.swap_remove(k).1)
}

/// The one read a branch costs where the schedule does not decide it: its bool condition,
/// copied to the host.
fn read_condition<'v>(
    value: &dyn Fn(&str) -> Option<&'v DynTensor>,
    decision: &Decision,
) -> anyhow::Result<bool> {
    let (cond, name) = (&decision.cond, &decision.name);
    let value = value(cond)
        .with_context(|| format!("no segment made the condition '{cond}' of '{name}'"))?;
    match on_host(cond, value)? {
        Tensor::Bool(a) if a.len() == 1 => Ok(*a.iter().next().expect("one element")),
        other => bail!(
            "the condition '{cond}' of '{name}' is {}, not one bool",
            other.describe()
        ),
    }
}
