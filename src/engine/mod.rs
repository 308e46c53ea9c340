//! Execution engines: one [`Engine`] trait, two implementations.
//!
//! - [`onnxruntime::OrtEngine`]: ONNX Runtime, loaded at run time from a shared library (CPU, CUDA and
//!   TensorRT execution providers).
//! - [`tract::TractEngine`]: tract, pure Rust, nothing to install; CPU only.
//!
//! Tensors cross the trait as owned [`Tensor`]s (an enum over the element types diffusion models
//! use), so samplers do not care which engine runs. What a model takes and gives ([`ModelSpec`])
//! is read from the ONNX file by the compiler's IR, so both engines describe a model identically
//! and both check inputs the same way before running.
//!
//! Cross-step state (the host contract, design/method.md §4) is an engine capability rather than a
//! sampler loop: after [`Engine::bind_state`], the engine feeds each state output back as the
//! matching input itself, so an engine with device memory can keep state there between calls.

pub mod onnxruntime;
pub mod split;
pub mod tract;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use fastcache_passes::ir::{Dim, Model};
use fastcache_passes::onnx::elem_type_name;
use ndarray::{ArrayD, IxDyn};

/// Element types the engines exchange with the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// float16, as GPU deployments export models: the host exchanges float32 with the engine,
    /// which converts at the model's boundary (exactly, both ways, for values the model made).
    F16,
    /// bfloat16, the other GPU float type: exchanged like float16 (float32 with the host,
    /// converted at the model's boundary).
    BF16,
    I64,
    I32,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }

    /// From an ONNX `TensorProto.DataType` code; `None` for types no engine here exchanges.
    pub fn from_onnx(code: i32) -> Option<DType> {
        match code {
            1 => Some(DType::F32),
            10 => Some(DType::F16),
            16 => Some(DType::BF16),
            7 => Some(DType::I64),
            6 => Some(DType::I32),
            9 => Some(DType::Bool),
            _ => None,
        }
    }

    /// From the names the host contract uses ("float32", "int64", ...); the short names of
    /// `inspect` ("f32", "i64") are accepted too.
    pub fn from_name(name: &str) -> Option<DType> {
        match name {
            "float32" | "float" | "f32" => Some(DType::F32),
            "float16" | "half" | "f16" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "int64" | "i64" => Some(DType::I64),
            "int32" | "i32" => Some(DType::I32),
            "bool" => Some(DType::Bool),
            _ => None,
        }
    }

    /// The contract's name: "float32", "float16", "bfloat16", "int64", "int32", "bool".
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::Bool => "bool",
        }
    }

    pub fn is_integer(self) -> bool {
        matches!(self, DType::I64 | DType::I32)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An owned tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F16(ArrayD<half::f16>),
    BF16(ArrayD<half::bf16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    Bool(ArrayD<bool>),
}

impl Tensor {
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let shape = IxDyn(shape);
        match dtype {
            DType::F32 => Tensor::F32(ArrayD::zeros(shape)),
            DType::F16 => Tensor::F16(ArrayD::from_elem(shape, half::f16::ZERO)),
            DType::BF16 => Tensor::BF16(ArrayD::from_elem(shape, half::bf16::ZERO)),
            DType::I64 => Tensor::I64(ArrayD::zeros(shape)),
            DType::I32 => Tensor::I32(ArrayD::zeros(shape)),
            DType::Bool => Tensor::Bool(ArrayD::from_elem(shape, false)),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F16(_) => DType::F16,
            Tensor::BF16(_) => DType::BF16,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::F16(a) => a.shape(),
            Tensor::BF16(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
            Tensor::I32(a) => a.shape(),
            Tensor::Bool(a) => a.shape(),
        }
    }

    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// The values as float32: a float16 or bfloat16 tensor is widened (exactly).
    pub fn into_f32(self) -> Option<ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            Tensor::F16(a) => Some(a.mapv(half::f16::to_f32)),
            Tensor::BF16(a) => Some(a.mapv(half::bf16::to_f32)),
            _ => None,
        }
    }

    /// This float tensor in float type `dtype` (narrowing rounds to nearest); `None`
    /// for an integer or bool tensor or a target that is not a float type.
    pub fn to_float(&self, dtype: DType) -> Option<Tensor> {
        let wide = match self {
            Tensor::F32(a) => std::borrow::Cow::Borrowed(a),
            Tensor::F16(a) => std::borrow::Cow::Owned(a.mapv(half::f16::to_f32)),
            Tensor::BF16(a) => std::borrow::Cow::Owned(a.mapv(half::bf16::to_f32)),
            _ => return None,
        };
        match dtype {
            DType::F32 => Some(Tensor::F32(wide.into_owned())),
            DType::F16 => Some(Tensor::F16(wide.mapv(half::f16::from_f32))),
            DType::BF16 => Some(Tensor::BF16(wide.mapv(half::bf16::from_f32))),
            _ => None,
        }
    }

    /// The values as f64, in row-major order (for comparisons and reports).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Tensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::F16(a) => a.iter().map(|&v| v.to_f64()).collect(),
            Tensor::BF16(a) => a.iter().map(|&v| v.to_f64()).collect(),
            Tensor::I64(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::I32(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::Bool(a) => a.iter().map(|&v| v as u8 as f64).collect(),
        }
    }

    /// Largest absolute elementwise difference; `None` when dtypes or shapes differ.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f64> {
        if self.dtype() != other.dtype() || self.shape() != other.shape() {
            return None;
        }
        let a = self.to_f64_vec();
        let b = other.to_f64_vec();
        Some(
            a.iter()
                .zip(&b)
                .map(|(x, y)| {
                    if x.is_nan() || y.is_nan() {
                        f64::INFINITY
                    } else {
                        (x - y).abs()
                    }
                })
                .fold(0.0, f64::max),
        )
    }

    /// `float32 [2, 4, 8, 8]`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {:?}", self.dtype(), self.shape())
    }

    /// The bytes of its elements.
    pub fn byte_len(&self) -> u64 {
        self.shape().iter().product::<usize>() as u64 * self.dtype().size()
    }
}

/// What the host handed to an engine and read back from it in one call, in bytes: the inputs
/// and results the sampler exchanges and any condition a host split reads; state that stays
/// with the engine is not counted. With a GPU provider this is what crosses to and from the
/// device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer {
    pub to_engine: u64,
    pub from_engine: u64,
}

impl Transfer {
    /// The bytes of `inputs` handed over and of `results` read back.
    pub fn of(inputs: &TensorMap, results: &TensorMap) -> Transfer {
        let bytes = |m: &TensorMap| m.iter().map(|(_, t)| t.byte_len()).sum();
        Transfer {
            to_engine: bytes(inputs),
            from_engine: bytes(results),
        }
    }
}

/// Named tensors in a stable order (the order they were inserted).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorMap(Vec<(String, Tensor)>);

impl TensorMap {
    pub fn new() -> TensorMap {
        TensorMap(Vec::new())
    }

    /// Adds or replaces.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = tensor,
            None => self.0.push((name, tensor)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let index = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(index).1)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.0.iter().map(|(n, t)| (n.as_str(), t))
    }
}

impl IntoIterator for TensorMap {
    type Item = (String, Tensor);
    type IntoIter = std::vec::IntoIter<(String, Tensor)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<S: Into<String>> FromIterator<(S, Tensor)> for TensorMap {
    fn from_iter<I: IntoIterator<Item = (S, Tensor)>>(iter: I) -> TensorMap {
        let mut map = TensorMap::new();
        for (name, tensor) in iter {
            map.insert(name, tensor);
        }
        map
    }
}

/// One input or output of a model as the file declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// `None` when the element type is one no engine here exchanges (its name is in `type_name`).
    pub dtype: Option<DType>,
    /// The ONNX element type's short name (`f32`, `f16`, ...), also for unsupported types.
    pub type_name: String,
    /// `None` when the rank is unknown.
    pub dims: Option<Vec<Dim>>,
}

impl TensorSpec {
    pub fn rank(&self) -> Option<usize> {
        self.dims.as_ref().map(Vec::len)
    }

    /// `float32 [batch, 4, 8, 8]`, for messages.
    pub fn describe(&self) -> String {
        let dtype = self
            .dtype
            .map_or_else(|| self.type_name.clone(), |d| d.name().to_string());
        match &self.dims {
            None => format!("{dtype} [unknown rank]"),
            Some(dims) => {
                let dims: Vec<String> = dims.iter().map(Dim::to_string).collect();
                format!("{dtype} [{}]", dims.join(", "))
            }
        }
    }

    /// Whether `tensor` can be fed to this input: same dtype, same rank, equal fixed dims.
    /// The error names the input and says what was expected and found.
    pub fn check(&self, tensor: &Tensor) -> anyhow::Result<()> {
        let mismatch = || {
            anyhow::anyhow!(
                "input '{}': expected {}, found {}",
                self.name,
                self.describe(),
                tensor.describe()
            )
        };
        match self.dtype {
            Some(dtype) if dtype == tensor.dtype() => {}
            // The host's float32 for a float16 or bfloat16 input: the engine converts it
            // (`to_model_types`).
            Some(DType::F16 | DType::BF16) if tensor.dtype() == DType::F32 => {}
            _ => return Err(mismatch()),
        }
        if let Some(dims) = &self.dims {
            if dims.len() != tensor.shape().len() {
                return Err(mismatch());
            }
            for (dim, &size) in dims.iter().zip(tensor.shape()) {
                if let Dim::Fixed(n) = dim
                    && *n >= 0
                    && *n as usize != size
                {
                    return Err(mismatch());
                }
            }
        }
        Ok(())
    }
}

/// What a model takes and gives, and its metadata entries.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub metadata: BTreeMap<String, String>,
}

impl ModelSpec {
    /// Describes a model loaded by the compiler's IR. Initializers that are also graph inputs are
    /// overridable defaults, not inputs a host feeds, so they are left out (as ONNX Runtime does).
    pub fn from_model(model: &Model) -> ModelSpec {
        let graph = &model.graph;
        let spec = |v: &fastcache_passes::ir::ValueInfo| {
            let code = v.elem_type().unwrap_or(0);
            TensorSpec {
                name: v.name.clone(),
                dtype: DType::from_onnx(code),
                type_name: if code == 0 {
                    "?".into()
                } else {
                    elem_type_name(code)
                },
                dims: v.dims(),
            }
        };
        ModelSpec {
            inputs: graph
                .inputs
                .iter()
                .filter(|v| graph.initializer(&v.name).is_none())
                .map(spec)
                .collect(),
            outputs: graph.outputs.iter().map(spec).collect(),
            metadata: model.metadata_map(),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<(Model, ModelSpec)> {
        let model =
            Model::load(path).with_context(|| format!("cannot load model {}", path.display()))?;
        let spec = ModelSpec::from_model(&model);
        Ok((model, spec))
    }

    /// The first input or output of element type `dtype`, if any (for engines that refuse a
    /// type).
    pub fn first_of_type(&self, dtype: DType) -> Option<&TensorSpec> {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .find(|t| t.dtype == Some(dtype))
    }

    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }

    /// Checks a full set of inputs for one call: every input present (except those in `bound`,
    /// which the engine supplies itself), no unknown names, dtypes, ranks and fixed dims right.
    /// The inputs in the model's own float types: float32 tensors for float16 inputs are
    /// converted, everything else is borrowed as it is.
    pub fn to_model_types<'a>(&self, inputs: &'a TensorMap) -> std::borrow::Cow<'a, TensorMap> {
        let converts = |name: &str, tensor: &Tensor| {
            self.input(name)
                .and_then(|spec| spec.dtype)
                .filter(|dtype| *dtype != tensor.dtype() && dtype.is_float())
        };
        if !inputs.iter().any(|(name, t)| converts(name, t).is_some()) {
            return std::borrow::Cow::Borrowed(inputs);
        }
        let mut converted = TensorMap::new();
        for (name, tensor) in inputs.iter() {
            let tensor = converts(name, tensor)
                .and_then(|dtype| tensor.to_float(dtype))
                .unwrap_or_else(|| tensor.clone());
            converted.insert(name, tensor);
        }
        std::borrow::Cow::Owned(converted)
    }

    pub fn check_inputs(&self, inputs: &TensorMap, bound: &[&str]) -> anyhow::Result<()> {
        for name in inputs.names() {
            if self.input(name).is_none() {
                let known: Vec<&str> = self.inputs.iter().map(|t| t.name.as_str()).collect();
                bail!(
                    "the model has no input '{name}' (its inputs: {})",
                    known.join(", ")
                );
            }
            if bound.contains(&name) {
                bail!("input '{name}' is cross-step state, fed by the engine; do not pass it");
            }
        }
        for spec in &self.inputs {
            if bound.contains(&spec.name.as_str()) {
                continue;
            }
            match inputs.get(&spec.name) {
                None => bail!(
                    "missing input '{}' (expected {})",
                    spec.name,
                    spec.describe()
                ),
                Some(tensor) => spec.check(tensor)?,
            }
        }
        Ok(())
    }
}

/// One piece of cross-step state: `output` of one call is fed to `input` on the next; `initial`
/// is what `input` gets on the first call.
#[derive(Clone, Debug)]
pub struct StateSlot {
    pub input: String,
    pub output: String,
    pub initial: Tensor,
}

/// Which engine ran, on what, with how many threads: for run reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    /// "onnxruntime 1.32.0", "tract 0.23.9".
    pub engine: String,
    /// The execution provider registered (ONNX Runtime's name, e.g. "CUDAExecutionProvider"), or
    /// "cpu" for tract.
    pub provider: String,
    /// Intra-op threads, as configured.
    pub threads: String,
    /// Where the engine keeps cross-step state between calls ("host", "device (IoBinding)").
    pub state_memory: String,
}

impl fmt::Display for EngineInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, provider {}, {}",
            self.engine, self.provider, self.threads
        )
    }
}

/// A loaded model that can be called.
pub trait Engine {
    /// The model's inputs, outputs and metadata.
    fn spec(&self) -> &ModelSpec;

    fn info(&self) -> EngineInfo;

    /// Declares cross-step state. From then on, [`Engine::run`] takes every input except the
    /// state inputs, feeds each slot's input (its `initial` tensor on the first call, the previous
    /// call's output after that), and returns every output except the state outputs. A state
    /// output whose shape or dtype differs from its slot's is an error naming the tensor. Calling
    /// it again restarts the state from the new initial tensors.
    fn bind_state(&mut self, slots: Vec<StateSlot>) -> anyhow::Result<()>;

    /// The current value of every state input, copied to the host.
    fn state(&self) -> anyhow::Result<TensorMap>;

    /// One call of the model.
    fn run(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap>;

    /// How the engine planned the model for the last call's shapes, where it has more than one
    /// way (tract: a typed, optimised plan or its slower inference-level one).
    fn plan(&self) -> Option<String> {
        None
    }

    /// The last call's [`Transfer`], where the engine's memory is not the host's own (ONNX
    /// Runtime); `None` for engines that run on host tensors (tract).
    fn last_transfer(&self) -> Option<Transfer> {
        None
    }
}

/// Which engine to use.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// tract: pure Rust, nothing to install, CPU only.
    Tract,
    /// ONNX Runtime, loaded from ORT_DYLIB_PATH or .ort/libonnxruntime.so (scripts/setup.sh).
    Ort,
}

/// Options of [`open`]; tract ignores those that are ONNX Runtime's.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub provider: onnxruntime::Provider,
    /// Intra-op threads; `None` lets the engine decide (and the report says what it chose).
    pub threads: Option<usize>,
    /// Capture each segment of a host split as a CUDA graph where ONNX Runtime allows it (CUDA
    /// and TensorRT providers, host splits only: a graph with an `If` cannot be captured).
    pub cuda_graphs: bool,
}

/// Loads a model into the chosen engine.
pub fn open(kind: EngineKind, path: &Path, options: &Options) -> anyhow::Result<Box<dyn Engine>> {
    Ok(match kind {
        EngineKind::Tract => {
            if options.provider != onnxruntime::Provider::Cpu {
                bail!(
                    "the tract engine runs on the CPU only; --ep {} needs --engine ort",
                    options.provider.flag()
                );
            }
            Box::new(tract::TractEngine::load(path)?)
        }
        EngineKind::Ort => Box::new(onnxruntime::OrtEngine::load(path, options)?),
    })
}

/// Checks a state output against its slot before it is fed back.
pub(crate) fn check_state_output(
    slot_input: &str,
    slot_output: &str,
    expected: (DType, &[usize]),
    found: (DType, &[usize]),
) -> anyhow::Result<()> {
    if expected != found {
        bail!(
            "state output '{slot_output}' (fed back to input '{slot_input}') is {} {:?}, but the state is {} {:?}",
            found.0,
            found.1,
            expected.0,
            expected.1
        );
    }
    Ok(())
}

/// Host-side state: used by engines without device memory.
#[derive(Default)]
pub(crate) struct HostState {
    slots: Vec<(String, String)>,
    values: TensorMap,
}

impl HostState {
    pub(crate) fn bind(&mut self, spec: &ModelSpec, slots: Vec<StateSlot>) -> anyhow::Result<()> {
        validate_slots(spec, &slots)?;
        self.slots = slots
            .iter()
            .map(|s| (s.input.clone(), s.output.clone()))
            .collect();
        self.values = slots.into_iter().map(|s| (s.input, s.initial)).collect();
        Ok(())
    }

    pub(crate) fn bound_inputs(&self) -> Vec<&str> {
        self.slots.iter().map(|(i, _)| i.as_str()).collect()
    }

    pub(crate) fn values(&self) -> &TensorMap {
        &self.values
    }

    /// Moves the state outputs out of `outputs` into the state, checking their shapes.
    pub(crate) fn absorb(&mut self, outputs: &mut TensorMap) -> anyhow::Result<()> {
        for (input, output) in &self.slots {
            let value = outputs
                .remove(output)
                .with_context(|| format!("the model gave no state output '{output}'"))?;
            let current = self.values.get(input).expect("every slot has a value");
            check_state_output(
                input,
                output,
                (current.dtype(), current.shape()),
                (value.dtype(), value.shape()),
            )?;
            self.values.insert(input.clone(), value);
        }
        Ok(())
    }
}

/// Checks slots against the model: both names exist, dtypes agree with the declared ones, and the
/// initial tensor fits the state input's declared shape.
pub(crate) fn validate_slots(spec: &ModelSpec, slots: &[StateSlot]) -> anyhow::Result<()> {
    for slot in slots {
        let input = spec.input(&slot.input).with_context(|| {
            format!("state input '{}' is not an input of the model", slot.input)
        })?;
        let output = spec.output(&slot.output).with_context(|| {
            format!(
                "state output '{}' is not an output of the model",
                slot.output
            )
        })?;
        input.check(&slot.initial).with_context(|| {
            format!(
                "state input '{}' does not fit its declared type",
                slot.input
            )
        })?;
        if output.dtype.is_some() && output.dtype != input.dtype {
            bail!(
                "state output '{}' is {} but state input '{}' is {}",
                slot.output,
                output.describe(),
                slot.input,
                input.describe()
            );
        }
    }
    Ok(())
}

/// Reads every array of a `.npz` file (float32, int64, int32 or bool), by name, in file order.
pub fn read_npz(path: &Path) -> anyhow::Result<TensorMap> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut npz = ndarray_npy::NpzReader::new(file)
        .with_context(|| format!("{} is not a .npz file", path.display()))?;
    let names = npz
        .names()
        .with_context(|| format!("cannot list {}", path.display()))?;
    let mut result = TensorMap::new();
    for name in names {
        let tensor = if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f32>, IxDyn>(&name) {
            Tensor::F32(a)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<i64>, IxDyn>(&name) {
            Tensor::I64(a)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<i32>, IxDyn>(&name) {
            Tensor::I32(a)
        } else if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<bool>, IxDyn>(&name) {
            Tensor::Bool(a)
        } else {
            bail!(
                "{}: array '{name}' is not float32, int64, int32 or bool (float16 arrays: save them as float32; a float16 model's inputs are converted)",
                path.display()
            );
        };
        result.insert(name, tensor);
    }
    Ok(result)
}

/// Reads a float32 `.npy` file.
pub fn read_npy_f32(path: &Path) -> anyhow::Result<ArrayD<f32>> {
    ndarray_npy::read_npy(path)
        .with_context(|| format!("cannot read {} as a float32 .npy array", path.display()))
}
