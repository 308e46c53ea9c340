//! A host split (`fastcache rewrite --split DIR`) on ONNX Runtime with its values on the
//! session's device.
//!
//! The first call of a run binds every segment's outputs to device memory that ONNX Runtime
//! allocates, and learns from it the type and shape of every value. From the second call on, the
//! run has fixed buffers: one per value a segment makes, one per model input, and two sets of state
//! (call k reads set k mod 2 and writes the other), each segment bound to them once per parity
//! (two `IoBinding`s). A call then copies the sampler's inputs into their buffers, runs the
//! segments, and copies the model's results out: nothing else moves between host and device but
//! one bool per `If` whose decision the manifest does not know. A branch decided by FastCache's
//! calibrated schedule is taken from the manifest by counting calls, with no read at all.
//!
//! Fixed addresses are what a CUDA graph needs: with `Options::cuda_graphs` each segment's
//! session is opened with the CUDA provider's `enable_cuda_graph` where ONNX Runtime accepts it
//! (it refuses a graph with nodes on the CPU), and each parity's binding runs as a graph of its
//! own (`gpu_graph_id` 0 and 1; the first call, whose buffers are not fixed, runs with −1, no
//! capture). On the CPU provider "device" memory is host memory and the same code runs, so CI
//! exercises every path but the capture itself.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use ort::memory::{Allocator, MemoryInfo};
use ort::session::{IoBinding, NoSelectedOutputs, RunOptions, Session};
use ort::value::DynTensor;

use super::{
    OpenedSession, Provider, device_allocator, dtype_of, element_type, on_host, open_session,
    ort_error, sentence, to_ort,
};
use crate::engine::split::{Decision, load_parts, read_manifest};
use crate::engine::{
    DType, Engine, EngineInfo, ModelSpec, Options, StateSlot, Tensor, TensorMap, Transfer,
    check_state_output, validate_slots,
};

/// One straight-line model of the split.
struct Segment {
    session: Session,
    inputs: Vec<String>,
    outputs: Vec<String>,
    file: PathBuf,
    /// Whether its session captures CUDA graphs.
    graphs: bool,
    /// The binding of a run's first call, rebound at every such call.
    first: IoBinding,
    /// The fixed bindings of the rest of the run, by parity, once the buffers exist.
    fixed: Option<[IoBinding; 2]>,
    /// `gpu_graph_id` −1 (the first call), 0 and 1 (the parities).
    options: [RunOptions<NoSelectedOutputs>; 3],
}

type Part = crate::engine::split::Part<Box<Segment>>;

/// The buffers of a run after its first call.
struct Buffers {
    /// The model inputs' shapes they were made for.
    input_shapes: Vec<(String, Vec<usize>)>,
    inputs: Vec<(String, DynTensor)>,
    /// Every value a segment makes but the state outputs.
    values: Vec<(String, DynTensor)>,
    /// `state[p]`: what the calls of parity p read; they write `state[1 - p]`.
    state: [Vec<DynTensor>; 2],
    /// The parity of the next call.
    parity: usize,
}

pub struct OrtSplitEngine {
    spec: ModelSpec,
    parts: Vec<Part>,
    provider: Provider,
    threads: usize,
    version: String,
    device: MemoryInfo<'static>,
    host: MemoryInfo<'static>,
    allocator: Allocator,
    /// The state pairs (input, output).
    slots: Vec<(String, String)>,
    /// The state the next call reads while the run has no fixed buffers (the initial values at
    /// its first call), on the device.
    state: Vec<DynTensor>,
    buffers: Option<Buffers>,
    /// Calls since the state was bound: the step counter, which schedule decisions follow.
    calls: usize,
    transfer: Option<Transfer>,
    dir: PathBuf,
}

/// `RunOptions` with the given `gpu_graph_id` where graphs are captured.
fn run_options(graphs: bool, id: i32) -> anyhow::Result<RunOptions<NoSelectedOutputs>> {
    let mut options = RunOptions::new().map_err(ort_error)?;
    if graphs {
        options
            .set("gpu_graph_id", id.to_string())
            .map_err(ort_error)?;
    }
    Ok(options)
}

impl OrtSplitEngine {
    pub fn open(dir: &Path, spec: ModelSpec, options: &Options) -> anyhow::Result<OrtSplitEngine> {
        if options.cuda_graphs && options.provider == Provider::Cpu {
            bail!("CUDA graphs need the CUDA or TensorRT provider (--ep cuda or --ep tensorrt)");
        }
        if let Some(t) = spec.first_of_type(DType::BF16) {
            bail!(
                "'{}' is bfloat16: this runner copies the sampler's inputs into fixed buffers with ort's tensor copy, which goes through an Identity model that has no bfloat16 (ort 2.0.0-rc.15); run the single-graph model",
                t.name
            );
        }
        let manifest = read_manifest(dir, &spec)?;
        let mut opened: Option<(usize, String, MemoryInfo<'static>, MemoryInfo<'static>)> = None;
        let mut allocator = None;
        let mut segment = |file: &str| -> anyhow::Result<Segment> {
            let path = dir.join(file);
            let load = |options: &Options| {
                open_session(&path, options)
                    .with_context(|| format!("cannot load segment {}", path.display()))
            };
            // ONNX Runtime refuses to capture a graph with nodes on the CPU (shape arithmetic,
            // the step counter): such a segment runs without.
            let (session, graphs) = match options.cuda_graphs {
                true => match load(options) {
                    Ok(s) => (s, true),
                    Err(_) => (
                        load(&Options {
                            cuda_graphs: false,
                            ..options.clone()
                        })?,
                        false,
                    ),
                },
                false => (load(options)?, false),
            };
            let OpenedSession {
                session,
                threads,
                version,
                device,
                host,
            } = session;
            if allocator.is_none() {
                allocator = Some(device_allocator(&session, options.provider, &device)?);
            }
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
            let first = session.create_binding().map_err(ort_error)?;
            Ok(Segment {
                session,
                inputs,
                outputs,
                file: path,
                graphs,
                first,
                fixed: None,
                options: [
                    run_options(graphs, -1)?,
                    run_options(graphs, 0)?,
                    run_options(graphs, 1)?,
                ],
            })
        };
        let parts = load_parts(manifest, |file| Ok(Box::new(segment(file)?)))?;
        let (threads, version, device, host) = opened.expect("a manifest has a segment");
        Ok(OrtSplitEngine {
            spec,
            parts,
            provider: options.provider,
            threads,
            version,
            device,
            host,
            allocator: allocator.expect("a manifest has a segment"),
            slots: Vec::new(),
            state: Vec::new(),
            buffers: None,
            calls: 0,
            transfer: None,
            dir: dir.to_path_buf(),
        })
    }

    fn segments(&self) -> impl Iterator<Item = &Segment> {
        self.parts.iter().flat_map(|p| match p {
            Part::Graph(s) => vec![s.as_ref()],
            Part::Branch {
                then, otherwise, ..
            } => vec![then.as_ref(), otherwise.as_ref()],
        })
    }

    /// Branches whose condition is read from the device at every call, and those the
    /// calibrated schedule decides with no read.
    fn decisions(&self) -> (usize, usize) {
        let mut counts = (0, 0);
        for part in &self.parts {
            if let Part::Branch { decision, .. } = part {
                match decision.by_step {
                    Some(_) => counts.1 += 1,
                    None => counts.0 += 1,
                }
            }
        }
        counts
    }

    /// The model's results: its outputs but the state outputs.
    fn results(&self) -> Vec<String> {
        self.spec
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .filter(|name| !self.slots.iter().any(|(_, output)| output == name))
            .collect()
    }

    /// A run's first call, through bindings to memory ONNX Runtime allocates; then the fixed
    /// buffers and bindings for the rest of the run, made from what it made.
    fn first_call(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let mut values: Vec<(String, DynTensor)> = Vec::new();
        for (name, tensor) in inputs.iter() {
            values.push((name.to_string(), downcast(to_ort(tensor)?)?));
        }
        let results = self.results();
        let (device, host) = (self.device.clone(), self.host.clone());
        let memory = move |name: &str| {
            if results.iter().any(|r| r == name) {
                host.clone()
            } else {
                device.clone()
            }
        };
        let (slots, state, calls) = (&self.slots, &self.state, self.calls);
        for part in &mut self.parts {
            // This call's values, then the state it reads (bound in place, never copied).
            let value = |name: &str| {
                find(&values, name).or_else(|| {
                    let k = slots.iter().position(|(input, _)| input == name)?;
                    state.get(k)
                })
            };
            let segment = choose(part, calls, &value)?;
            let made = segment.run_first(&value, &memory)?;
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
        for name in self.results() {
            let value = take(&mut values, &name)?;
            result.insert(name.clone(), on_host(&name, &value)?);
        }
        self.make_buffers(inputs, &values, &result, next_state)?;
        Ok(result)
    }

    /// Allocates the run's fixed buffers in the shapes and types of the first call's values and
    /// binds every segment to them, once per parity. `made` holds the values that stayed on the
    /// device, `results` those the host read; `next_state` becomes what the second call reads.
    fn make_buffers(
        &mut self,
        inputs: &TensorMap,
        made: &[(String, DynTensor)],
        results: &TensorMap,
        next_state: Vec<DynTensor>,
    ) -> anyhow::Result<()> {
        let buffer = |name: &str, dtype: DType, shape: &[usize]| -> anyhow::Result<DynTensor> {
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            DynTensor::new(&self.allocator, element_type(dtype), shape).map_err(|e| {
                anyhow!(
                    "cannot allocate a buffer for '{name}': {}",
                    sentence(&e.to_string())
                )
            })
        };
        let mut input_buffers = Vec::new();
        let mut input_shapes = Vec::new();
        for (name, tensor) in inputs.iter() {
            input_buffers.push((
                name.to_string(),
                buffer(name, tensor.dtype(), tensor.shape())?,
            ));
            input_shapes.push((name.to_string(), tensor.shape().to_vec()));
        }
        let mut values = Vec::new();
        for (name, value) in made.iter().filter(|(name, _)| !inputs.contains(name)) {
            let (dtype, shape) = kind(name, value)?;
            values.push((name.clone(), buffer(name, dtype, &shape)?));
        }
        for (name, tensor) in results.iter() {
            values.push((
                name.to_string(),
                buffer(name, tensor.dtype(), tensor.shape())?,
            ));
        }
        let mut state: [Vec<DynTensor>; 2] = [Vec::new(), Vec::new()];
        for (set, parity) in state.iter_mut().zip(0..) {
            for ((input, _), value) in self.slots.iter().zip(&next_state) {
                let (dtype, shape) = kind(input, value)?;
                let mut fresh = buffer(input, dtype, &shape)?;
                if parity == 0 {
                    value.copy_into(&mut fresh).map_err(ort_error)?;
                }
                set.push(fresh);
            }
        }
        let mut buffers = Buffers {
            input_shapes,
            inputs: input_buffers,
            values,
            state,
            parity: 0,
        };
        let slots = self.slots.clone();
        for part in &mut self.parts {
            let segments: Vec<&mut Segment> = match part {
                Part::Graph(s) => vec![s.as_mut()],
                Part::Branch {
                    then, otherwise, ..
                } => vec![then.as_mut(), otherwise.as_mut()],
            };
            for segment in segments {
                segment.bind_fixed(&slots, &mut buffers)?;
            }
        }
        self.buffers = Some(buffers);
        Ok(())
    }

    /// A call of a run that has its fixed buffers.
    fn fixed_call(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let buffers = self.buffers.as_mut().expect("called with buffers");
        for (name, tensor) in inputs.iter() {
            let (_, target) = buffers
                .inputs
                .iter_mut()
                .find(|(n, _)| n == name)
                .expect("the shapes were checked");
            downcast(to_ort(tensor)?)?
                .copy_into(target)
                .map_err(ort_error)?;
        }
        let parity = buffers.parity;
        let calls = self.calls;
        for part in &mut self.parts {
            let buffers = self.buffers.as_ref().expect("called with buffers");
            let value = |name: &str| find(&buffers.values, name);
            let segment = choose(part, calls, &value)?;
            segment.run_fixed(parity)?;
        }
        let buffers = self.buffers.as_mut().expect("called with buffers");
        buffers.parity = 1 - parity;
        let mut result = TensorMap::new();
        for name in self.results() {
            let buffers = self.buffers.as_ref().expect("called with buffers");
            let value = find(&buffers.values, &name).expect("every result has a buffer");
            result.insert(name.clone(), on_host(&name, value)?);
        }
        Ok(result)
    }
}

impl Segment {
    /// Binds the segment's inputs (found by `value`) and its outputs to their memory, runs it,
    /// and gives back its outputs.
    fn run_first<'v>(
        &mut self,
        value: &dyn Fn(&str) -> Option<&'v DynTensor>,
        memory: &dyn Fn(&str) -> MemoryInfo<'static>,
    ) -> anyhow::Result<Vec<(String, DynTensor)>> {
        self.first.clear();
        for input in &self.inputs {
            let value =
                value(input).with_context(|| format!("no earlier segment made '{input}'"))?;
            self.first
                .bind_input(input.as_str(), value)
                .map_err(ort_error)?;
        }
        for output in &self.outputs {
            self.first
                .bind_output_to_device(output.as_str(), &memory(output))
                .map_err(ort_error)?;
        }
        let mut outputs = self
            .session
            .run_binding_with_options(&self.first, &self.options[0])
            .map_err(|e| failed(&self.file, &e.to_string()))?;
        let mut made = Vec::with_capacity(self.outputs.len());
        for output in &self.outputs {
            let value = outputs
                .remove(output.as_str())
                .with_context(|| format!("{} gave no '{output}'", self.file.display()))?;
            made.push((output.clone(), downcast(value)?));
        }
        Ok(made)
    }

    /// Binds the segment to the run's buffers, one binding per parity: parity p reads state set
    /// p and writes set 1 − p.
    fn bind_fixed(
        &mut self,
        slots: &[(String, String)],
        buffers: &mut Buffers,
    ) -> anyhow::Result<()> {
        let mut bindings = [
            self.session.create_binding().map_err(ort_error)?,
            self.session.create_binding().map_err(ort_error)?,
        ];
        for (p, binding) in bindings.iter_mut().enumerate() {
            for input in &self.inputs {
                let value = if let Some(k) = slots.iter().position(|(i, _)| i == input) {
                    &buffers.state[p][k]
                } else if let Some(k) = slots.iter().position(|(_, o)| o == input) {
                    &buffers.state[1 - p][k]
                } else {
                    find(&buffers.inputs, input)
                        .or_else(|| find(&buffers.values, input))
                        .with_context(|| format!("no buffer for '{input}'"))?
                };
                binding
                    .bind_input(input.as_str(), value)
                    .map_err(ort_error)?;
            }
            for output in &self.outputs {
                let target = if let Some(k) = slots.iter().position(|(_, o)| o == output) {
                    &mut buffers.state[1 - p][k]
                } else {
                    buffers
                        .values
                        .iter_mut()
                        .find(|(n, _)| n == output)
                        .map(|(_, v)| v)
                        .with_context(|| format!("no buffer for '{output}'"))?
                };
                binding
                    .bind_output(output.as_str(), target)
                    .map_err(ort_error)?;
            }
        }
        self.fixed = Some(bindings);
        Ok(())
    }

    fn run_fixed(&mut self, parity: usize) -> anyhow::Result<()> {
        let binding = &self.fixed.as_ref().expect("bound to the buffers")[parity];
        self.session
            .run_binding_with_options(binding, &self.options[1 + parity])
            .map_err(|e| failed(&self.file, &e.to_string()))?;
        Ok(())
    }
}

fn failed(file: &Path, message: &str) -> anyhow::Error {
    anyhow!(
        "ONNX Runtime failed to run {}: {}",
        file.display(),
        sentence(message)
    )
}

/// The segment of `part` this call runs: a branch's by the schedule where the manifest knows
/// the decision, else by its condition read from the device.
fn choose<'p, 'v>(
    part: &'p mut Part,
    call: usize,
    value: &dyn Fn(&str) -> Option<&'v DynTensor>,
) -> anyhow::Result<&'p mut Segment> {
    Ok(match part {
        Part::Graph(segment) => segment,
        Part::Branch {
            decision,
            then,
            otherwise,
        } => {
            let take_then = match decision.by_step(call) {
                Some(known) => known,
                None => read_condition(value, decision)?,
            };
            if take_then { then } else { otherwise }
        }
    })
}

fn downcast(value: ort::value::DynValue) -> anyhow::Result<DynTensor> {
    value.downcast().map_err(ort_error)
}

/// A host value moved to the device's memory once (the initial state).
fn to_device(tensor: &Tensor, device: &MemoryInfo<'static>) -> anyhow::Result<DynTensor> {
    let value = downcast(to_ort(tensor)?)?;
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
        let graphs = match self.segments().filter(|s| s.graphs).count() {
            0 => String::new(),
            n => format!(
                "; CUDA graphs in {n} of {} segment models",
                self.segments().count()
            ),
        };
        EngineInfo {
            engine: format!(
                "onnxruntime {}, host split into {} segments ({}); conditions read per call: {read}, decided by the calibrated schedule: {scheduled}{graphs}",
                self.version,
                self.parts.len(),
                self.dir.display()
            ),
            provider: self.provider.ort_name().to_string(),
            threads: format!("{} intra-op threads, spinning off", self.threads),
            state_memory: match self.provider {
                Provider::Cpu => {
                    "host (fixed IoBinding buffers for every segment value, state ping-pong)".into()
                }
                _ => "device (fixed IoBinding buffers for every segment value, state ping-pong)"
                    .into(),
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
        self.buffers = None;
        self.calls = 0;
        Ok(())
    }

    fn state(&self) -> anyhow::Result<TensorMap> {
        let current = match &self.buffers {
            Some(b) => &b.state[b.parity],
            None => &self.state,
        };
        let mut result = TensorMap::new();
        for ((input, _), value) in self.slots.iter().zip(current) {
            result.insert(input.clone(), on_host(input, value)?);
        }
        Ok(result)
    }

    fn run(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let bound: Vec<&str> = self.slots.iter().map(|(i, _)| i.as_str()).collect();
        self.spec.check_inputs(inputs, &bound)?;
        let inputs = self.spec.to_model_types(inputs);
        let same_shapes = self.buffers.as_ref().is_some_and(|b| {
            b.input_shapes.len() == inputs.len()
                && b.input_shapes
                    .iter()
                    .all(|(name, shape)| inputs.get(name).is_some_and(|t| t.shape() == shape))
        });
        let result = if same_shapes {
            self.fixed_call(&inputs)?
        } else {
            // Other input shapes than the buffers': start again from the state as it is.
            if let Some(mut buffers) = self.buffers.take() {
                self.state = std::mem::take(&mut buffers.state[buffers.parity]);
            }
            self.first_call(&inputs)?
        };
        self.calls += 1;
        // Every branch the schedule does not decide reads its condition once a call.
        let mut transfer = Transfer::of(&inputs, &result);
        transfer.from_engine += self.decisions().0 as u64 * DType::Bool.size();
        self.transfer = Some(transfer);
        Ok(result)
    }

    fn last_transfer(&self) -> Option<Transfer> {
        self.transfer
    }
}

/// A tensor value's element type and shape, as the engine's state checks say them.
fn kind(name: &str, value: &DynTensor) -> anyhow::Result<(DType, Vec<usize>)> {
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
