//! The ONNX Runtime engine, through `ort` with the library loaded at run time.
//!
//! The library is looked up in this order (see [`find_library`]):
//! 1. the environment variable `ORT_DYLIB_PATH`;
//! 2. `.ort/libonnxruntime.so` in the current directory or any ancestor (what `scripts/setup.sh`
//!    fills from the PyPI wheel);
//! 3. `.ort/libonnxruntime.so` beside the executable or in any directory above it (so
//!    `target/debug/fastcache` finds the project's copy from anywhere).
//!
//! `ort` loads one library per process; whichever is found first is used for every session.
//!
//! Execution providers are registered with `error_on_failure`, so a provider that cannot start
//! (library missing, no device) is an error rather than a silent fall back to the CPU. Nodes a
//! registered provider does not support still run on ONNX Runtime's CPU provider, as usual.
//!
//! Sessions run with intra-op spinning off: between sampling steps the host does work of its own,
//! and spinning threads would compete with it for the cores.
//!
//! Cross-step state stays with ONNX Runtime between calls, in two sets of buffers allocated once
//! per sampling run on the session's device (CUDA memory with the CUDA and TensorRT providers,
//! host memory on the CPU, through the same code): call k reads set k mod 2 and writes the other,
//! each direction bound once to its own `IoBinding` (ping-pong). A step neither allocates nor
//! copies state; only the first call of a run reads the initial values from the host.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use ort::ep;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, TensorElementType, ValueType};

pub mod split;

use super::{
    DType, Engine, EngineInfo, ModelSpec, Options, StateSlot, Tensor, TensorMap, Transfer,
    check_state_output, validate_slots,
};

/// The oldest ONNX Runtime this build of `ort` accepts (it is built against API version 31).
pub const MIN_VERSION: &str = "1.31";

/// An ONNX Runtime execution provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    #[default]
    Cpu,
    Cuda,
    #[value(name = "tensorrt")]
    TensorRt,
}

impl Provider {
    /// The command-line spelling.
    pub fn flag(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }

    /// ONNX Runtime's name of the provider.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::TensorRt => "TensorrtExecutionProvider",
        }
    }
}

fn library_file_name() -> String {
    format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// Where the ONNX Runtime library is, and how it was found.
#[derive(Clone, Debug)]
pub struct LibraryLocation {
    pub path: PathBuf,
    pub found_by: &'static str,
}

/// Finds the ONNX Runtime library (see the module documentation for the order).
pub fn find_library() -> anyhow::Result<LibraryLocation> {
    if let Some(value) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if !path.is_file() {
            bail!(
                "ORT_DYLIB_PATH is {}, which is not a file; point it to {} (ONNX Runtime >= {MIN_VERSION}) or unset it and run scripts/setup.sh",
                path.display(),
                library_file_name()
            );
        }
        let path = std::path::absolute(&path).unwrap_or(path);
        return Ok(LibraryLocation {
            path,
            found_by: "ORT_DYLIB_PATH",
        });
    }
    let relative = Path::new(".ort").join(library_file_name());
    let mut searched = Vec::new();
    let mut starts: Vec<(PathBuf, &'static str)> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push((cwd, "the current directory or above"));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        starts.push((dir, "beside or above the executable"));
    }
    for (start, found_by) in starts {
        for dir in start.ancestors() {
            let candidate = dir.join(&relative);
            if candidate.is_file() {
                return Ok(LibraryLocation {
                    path: candidate,
                    found_by,
                });
            }
        }
        let place = format!("{}/{}", start.display(), relative.display());
        if !searched.contains(&place) {
            searched.push(place);
        }
    }
    bail!(
        "ONNX Runtime library not found: run scripts/setup.sh (it puts {} in .ort/), or set ORT_DYLIB_PATH to an ONNX Runtime >= {MIN_VERSION} library (searched {} and every directory above them)",
        library_file_name(),
        searched.join(" and ")
    )
}

/// The process-wide ONNX Runtime: `ort` allows one library and one environment per process.
struct Runtime {
    env: ort::environment::Environment,
    library: LibraryLocation,
    version: String,
}

static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

fn runtime() -> anyhow::Result<Arc<Runtime>> {
    let mut guard = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(runtime) = guard.as_ref() {
        return Ok(Arc::clone(runtime));
    }
    let library = find_library()?;
    let builder = ort::init_from(&library.path).map_err(|e| {
        let reason = match &e {
            // libloading keeps dlerror()'s text (e.g. "invalid ELF header") as the source.
            ort::LoadDynamicError::Dlopen { error, .. } => match std::error::Error::source(error) {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            },
            other => other.to_string(),
        };
        anyhow!(
            "cannot load ONNX Runtime from {} (found by {}): {}. fastcache needs ONNX Runtime >= {MIN_VERSION}: run scripts/setup.sh or set ORT_DYLIB_PATH",
            library.path.display(),
            library.found_by,
            sentence(&reason)
        )
    })?;
    let env = builder
        .with_name("fastcache")
        .with_telemetry(false)
        .build()
        .context("cannot create the ONNX Runtime environment")?;
    let version = library_version(&library.path).unwrap_or_else(|| "(version unknown)".into());
    let runtime = Arc::new(Runtime {
        env,
        library,
        version,
    });
    *guard = Some(Arc::clone(&runtime));
    Ok(runtime)
}

/// Asks the library for its version, as `ort` does when it loads it (the same library is already
/// loaded, so this only takes another reference to it).
fn library_version(path: &Path) -> Option<String> {
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: `ort::init_from` loaded this file and checked it exports `OrtGetApiBase` with this
    // signature; the version string is static in the library, which stays loaded (ort holds it).
    unsafe {
        let library = libloading::Library::new(path).ok()?;
        let get_base: libloading::Symbol<GetApiBase> = library.get(b"OrtGetApiBase").ok()?;
        let base = get_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).GetVersionString)();
        if version.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(version)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// The path and version of the ONNX Runtime library this process uses, loading it if needed.
pub fn library_info() -> anyhow::Result<(PathBuf, String)> {
    let runtime = runtime()?;
    Ok((runtime.library.path.clone(), runtime.version.clone()))
}

/// A model in an ONNX Runtime session.
pub struct OrtEngine {
    session: Session,
    spec: ModelSpec,
    provider: Provider,
    threads: usize,
    version: String,
    /// Where outputs that stay with ONNX Runtime (state) live between calls.
    state_memory: MemoryInfo<'static>,
    host_memory: MemoryInfo<'static>,
    state: Option<BoundState>,
    transfer: Option<Transfer>,
}

/// The state buffers of a sampling run and the two bindings between them.
struct BoundState {
    /// `bindings[p]` reads `buffers[p]` and writes `buffers[1 - p]`.
    bindings: [IoBinding; 2],
    buffers: [Vec<DynTensor>; 2],
    slots: Vec<OrtSlot>,
    /// The binding the next call runs.
    next: usize,
    /// The initial values, which `bindings[0]` reads until the first call has run.
    initial: Option<Vec<DynTensor>>,
}

struct OrtSlot {
    input: String,
    output: String,
}

fn ort_error<R>(error: ort::Error<R>) -> anyhow::Error {
    anyhow!("{}", sentence(&error.to_string()))
}

/// ONNX Runtime ends its messages with a period; ours go on after them.
fn sentence(message: &str) -> &str {
    message.trim_end().trim_end_matches('.')
}

/// A session of one model file, with where its device and host memory are.
pub(crate) struct OpenedSession {
    pub session: Session,
    pub threads: usize,
    pub version: String,
    /// The provider's memory (CUDA memory with the CUDA and TensorRT providers, else the host's).
    pub device: MemoryInfo<'static>,
    pub host: MemoryInfo<'static>,
}

/// Opens `path` in ONNX Runtime with the provider and threads of `options`.
pub(crate) fn open_session(path: &Path, options: &Options) -> anyhow::Result<OpenedSession> {
    let runtime = runtime()?;
    let threads = options
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let mut builder = Session::builder(&runtime.env)
        .map_err(ort_error)?
        .with_intra_op_spinning(false)
        .map_err(ort_error)?
        .with_inter_op_spinning(false)
        .map_err(ort_error)?
        .with_intra_threads(threads)
        .map_err(ort_error)?;
    let provider = options.provider;
    let eps = match provider {
        // ONNX Runtime always has its CPU provider; registering it explicitly would also
        // change its allocator settings.
        Provider::Cpu => vec![],
        Provider::Cuda => vec![
            ep::CUDA::default()
                .with_cuda_graph(options.cuda_graphs)
                .build()
                .error_on_failure(),
        ],
        // TensorRT takes the subgraphs it supports; CUDA takes the rest before the CPU does.
        Provider::TensorRt => vec![
            ep::TensorRT::default()
                .with_cuda_graph(options.cuda_graphs)
                .build()
                .error_on_failure(),
            ep::CUDA::default().build().error_on_failure(),
        ],
    };
    if !eps.is_empty() {
        builder = builder.with_execution_providers(eps).map_err(|e| {
            anyhow!(
                "execution provider {} cannot start: {}. It needs the GPU build of ONNX Runtime (onnxruntime-gpu: libonnxruntime_providers_{}.so beside {}) and a working driver; --ep cpu runs without",
                provider.ort_name(),
                sentence(&e.to_string()),
                if provider == Provider::Cuda { "cuda" } else { "tensorrt" },
                runtime.library.path.display()
            )
        })?;
    }
    let session = builder.commit_from_file(path).map_err(|e| {
        anyhow!(
            "ONNX Runtime cannot load {} with {}: {}",
            path.display(),
            provider.ort_name(),
            sentence(&e.to_string())
        )
    })?;
    let device = match provider {
        Provider::Cpu => AllocationDevice::CPU,
        Provider::Cuda | Provider::TensorRt => AllocationDevice::CUDA,
    };
    let memory = |device| {
        MemoryInfo::new(device, 0, AllocatorType::Device, MemoryType::Default).map_err(ort_error)
    };
    Ok(OpenedSession {
        session,
        threads,
        version: runtime.version.clone(),
        device: memory(device)?,
        host: memory(AllocationDevice::CPU)?,
    })
}

impl OrtEngine {
    pub fn load(path: &Path, options: &Options) -> anyhow::Result<OrtEngine> {
        if options.cuda_graphs {
            bail!(
                "CUDA graphs need the host split (--split DIR): ONNX Runtime cannot capture a graph with an If"
            );
        }
        let (_, spec) = ModelSpec::load(path)?;
        let opened = open_session(path, options)?;
        Ok(OrtEngine {
            session: opened.session,
            spec,
            provider: options.provider,
            threads: opened.threads,
            version: opened.version,
            state_memory: opened.device,
            host_memory: opened.host,
            state: None,
            transfer: None,
        })
    }

    fn run_plain(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let mut values: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs.iter() {
            values.push((name.to_string(), to_ort(tensor)?.into()));
        }
        let outputs = self.session.run(values).map_err(|e| {
            anyhow!(
                "ONNX Runtime failed to run the model: {}",
                sentence(&e.to_string())
            )
        })?;
        let mut result = TensorMap::new();
        for (name, value) in outputs.iter() {
            result.insert(name, from_ort(name, &value)?);
        }
        Ok(result)
    }

    /// After a bound call failed: whether a state output does not keep its state's type and
    /// shape (the preallocated buffers it is bound to cannot take it), found by one plain run on
    /// the same inputs and state, and said the way the host state says it.
    fn state_mismatch(&mut self, inputs: &TensorMap) -> Option<anyhow::Error> {
        let state = self.state().ok()?;
        let slots: Vec<(String, String)> = self
            .state
            .as_ref()?
            .slots
            .iter()
            .map(|s| (s.input.clone(), s.output.clone()))
            .collect();
        let mut all = inputs.clone();
        for (name, value) in state.iter() {
            all.insert(name, value.clone());
        }
        let outputs = self.run_plain(&all).ok()?;
        slots.iter().find_map(|(input, output)| {
            let (current, value) = (state.get(input)?, outputs.get(output)?);
            check_state_output(
                input,
                output,
                (current.dtype(), current.shape()),
                (value.dtype(), value.shape()),
            )
            .err()
        })
    }

    fn run_bound(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let state = self.state.as_mut().expect("called with state bound");
        let p = state.next;
        for (name, tensor) in inputs.iter() {
            state.bindings[p]
                .bind_input(name, &to_ort(tensor)?)
                .map_err(ort_error)?;
        }
        // The state outputs are written into buffers[1 - p], bound once: never the buffers
        // this call reads, so a state output computed from another state input (the second
        // forecast snapshot from the first) reads the value of the last call.
        let result = match self.session.run_binding(&state.bindings[p]) {
            Ok(mut outputs) => {
                for slot in &state.slots {
                    outputs.remove(slot.output.as_str());
                }
                let mut result = TensorMap::new();
                for (name, value) in outputs.iter() {
                    result.insert(name, from_ort(name, &value)?);
                }
                Ok(result)
            }
            Err(e) => Err(sentence(&e.to_string()).to_string()),
        };
        let result = match result {
            Ok(result) => result,
            Err(message) => {
                let error = anyhow!("ONNX Runtime failed to run the model: {message}");
                return Err(self.state_mismatch(inputs).unwrap_or(error));
            }
        };
        let state = self.state.as_mut().expect("called with state bound");
        if state.initial.take().is_some() {
            for (slot, buffer) in state.slots.iter().zip(&state.buffers[0]) {
                state.bindings[0]
                    .bind_input(slot.input.as_str(), buffer)
                    .map_err(ort_error)?;
            }
        }
        state.next = 1 - p;
        Ok(result)
    }
}

impl Engine for OrtEngine {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn info(&self) -> EngineInfo {
        EngineInfo {
            engine: format!("onnxruntime {}", self.version),
            provider: match self.provider {
                Provider::TensorRt => format!(
                    "{} (+ {} for nodes TensorRT does not take)",
                    Provider::TensorRt.ort_name(),
                    Provider::Cuda.ort_name()
                ),
                other => other.ort_name().to_string(),
            },
            threads: format!("{} intra-op threads, spinning off", self.threads),
            state_memory: match self.provider {
                Provider::Cpu => "host (IoBinding ping-pong)".into(),
                _ => "device (IoBinding ping-pong)".into(),
            },
        }
    }

    fn bind_state(&mut self, slots: Vec<StateSlot>) -> anyhow::Result<()> {
        validate_slots(&self.spec, &slots)?;
        self.state = None;
        if slots.is_empty() {
            return Ok(());
        }
        // Two buffers per state pair on the state device, in the shapes and types of the
        // initial values (the contract's, checked by `validate_slots`).
        let allocator = device_allocator(&self.session, self.provider, &self.state_memory)?;
        let mut buffers: [Vec<DynTensor>; 2] = [Vec::new(), Vec::new()];
        for set in &mut buffers {
            for slot in &slots {
                let shape: Vec<i64> = slot.initial.shape().iter().map(|&d| d as i64).collect();
                let buffer = DynTensor::new(&allocator, element_type(slot.initial.dtype()), shape)
                    .map_err(|e| {
                        anyhow!(
                            "cannot allocate state '{}' ({}): {}",
                            slot.input,
                            slot.initial.describe(),
                            sentence(&e.to_string())
                        )
                    })?;
                set.push(buffer);
            }
        }
        let initial: Vec<DynTensor> = slots
            .iter()
            .map(|slot| to_ort(&slot.initial)?.downcast().map_err(ort_error))
            .collect::<anyhow::Result<_>>()?;
        let state_outputs: Vec<&str> = slots.iter().map(|s| s.output.as_str()).collect();
        let mut bindings = [
            self.session.create_binding().map_err(ort_error)?,
            self.session.create_binding().map_err(ort_error)?,
        ];
        for (p, binding) in bindings.iter_mut().enumerate() {
            for output in &self.spec.outputs {
                if !state_outputs.contains(&output.name.as_str()) {
                    binding
                        .bind_output_to_device(output.name.as_str(), &self.host_memory)
                        .map_err(ort_error)?;
                }
            }
            let reads = if p == 0 { &initial } else { &buffers[1] };
            for (slot, value) in slots.iter().zip(reads) {
                binding
                    .bind_input(slot.input.as_str(), value)
                    .map_err(ort_error)?;
            }
            for (slot, buffer) in slots.iter().zip(&mut buffers[1 - p]) {
                binding
                    .bind_output(slot.output.as_str(), buffer)
                    .map_err(ort_error)?;
            }
        }
        self.state = Some(BoundState {
            bindings,
            buffers,
            slots: slots
                .into_iter()
                .map(|s| OrtSlot {
                    input: s.input,
                    output: s.output,
                })
                .collect(),
            next: 0,
            initial: Some(initial),
        });
        Ok(())
    }

    fn state(&self) -> anyhow::Result<TensorMap> {
        let mut result = TensorMap::new();
        if let Some(state) = &self.state {
            // What the next call reads: the initial values, or the buffers the last call wrote.
            let current = state.initial.as_ref().unwrap_or(&state.buffers[state.next]);
            for (slot, value) in state.slots.iter().zip(current) {
                result.insert(slot.input.clone(), on_host(&slot.input, value)?);
            }
        }
        Ok(result)
    }

    fn run(&mut self, inputs: &TensorMap) -> anyhow::Result<TensorMap> {
        let bound: Vec<String> = self
            .state
            .as_ref()
            .map(|s| s.slots.iter().map(|slot| slot.input.clone()).collect())
            .unwrap_or_default();
        let bound: Vec<&str> = bound.iter().map(String::as_str).collect();
        self.spec.check_inputs(inputs, &bound)?;
        let inputs = self.spec.to_model_types(inputs);
        let result = if self.state.is_some() {
            self.run_bound(&inputs)?
        } else {
            self.run_plain(&inputs)?
        };
        self.transfer = Some(Transfer::of(&inputs, &result));
        Ok(result)
    }

    fn last_transfer(&self) -> Option<Transfer> {
        self.transfer
    }
}

/// An allocator of `session`'s device memory (the host's own on the CPU provider).
fn device_allocator(
    session: &Session,
    provider: Provider,
    device: &MemoryInfo<'static>,
) -> anyhow::Result<Allocator> {
    Ok(match provider {
        Provider::Cpu => Allocator::default(),
        _ => Allocator::new(session, device.clone()).map_err(ort_error)?,
    })
}

/// A tensor's values on the host: read in place where the host can (no copy: `DynTensor`'s
/// `clone` copies through a model ONNX Runtime types without bfloat16), else copied from the
/// device.
fn on_host(name: &str, value: &DynTensor) -> anyhow::Result<Tensor> {
    if value.memory_info().is_cpu_accessible() {
        return from_ort(name, &value.view().into_dyn());
    }
    let copy = value.to(AllocationDevice::CPU, 0).map_err(|e| {
        anyhow!(
            "cannot copy '{name}' from the device: {}",
            sentence(&e.to_string())
        )
    })?;
    from_ort(name, &copy.into_dyn())
}

fn to_ort(tensor: &Tensor) -> anyhow::Result<DynValue> {
    let value = match tensor {
        Tensor::F32(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
        Tensor::F16(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
        Tensor::BF16(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
        Tensor::I64(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
        Tensor::I32(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
        Tensor::Bool(a) => ort::value::Tensor::from_array(a.clone()).map(|t| t.into_dyn()),
    };
    value.map_err(ort_error)
}

fn element_type(dtype: DType) -> TensorElementType {
    match dtype {
        DType::F32 => TensorElementType::Float32,
        DType::F16 => TensorElementType::Float16,
        DType::BF16 => TensorElementType::Bfloat16,
        DType::I64 => TensorElementType::Int64,
        DType::I32 => TensorElementType::Int32,
        DType::Bool => TensorElementType::Bool,
    }
}

fn dtype_of(name: &str, ty: &TensorElementType) -> anyhow::Result<DType> {
    Ok(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Bfloat16 => DType::BF16,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Bool => DType::Bool,
        other => bail!("output '{name}' has element type {other:?}, which fastcache does not read"),
    })
}

fn from_ort(name: &str, value: &DynValue) -> anyhow::Result<Tensor> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => ty,
        other => bail!("output '{name}' is not a tensor but {other:?}"),
    };
    let read = |e| anyhow!("cannot read output '{name}': {e}");
    Ok(match dtype_of(name, ty)? {
        DType::F32 => Tensor::F32(value.try_extract_array::<f32>().map_err(read)?.to_owned()),
        DType::F16 => Tensor::F16(
            value
                .try_extract_array::<half::f16>()
                .map_err(read)?
                .to_owned(),
        ),
        DType::BF16 => Tensor::BF16(
            value
                .try_extract_array::<half::bf16>()
                .map_err(read)?
                .to_owned(),
        ),
        DType::I64 => Tensor::I64(value.try_extract_array::<i64>().map_err(read)?.to_owned()),
        DType::I32 => Tensor::I32(value.try_extract_array::<i32>().map_err(read)?.to_owned()),
        DType::Bool => Tensor::Bool(value.try_extract_array::<bool>().map_err(read)?.to_owned()),
    })
}
