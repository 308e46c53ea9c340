//! `fastcache triton MODEL -o REPO`: a Triton Inference Server model repository for a rewritten
//! model, made from its `fastcache` metadata entry (the host contract).
//!
//! `--backend onnxruntime` hands the cross-step state to Triton: every state pair becomes one
//! implicit state of the sequence batcher (zero initial state, so the first call of a sequence is
//! a first step), and the state inputs and outputs are left out of the config's `input` and
//! `output`, as Triton's implicit state wants. Triton needs the initial state's dims as numbers,
//! so every named dim of a state shape must be bound (`--batch N`, `--dim NAME=N`).
//! `--backend python` keeps the state in the model: `model.py` runs the contract's loop
//! (`fastcache.Host`, shipped beside it as `fastcache_host.py`) with one state per correlation id,
//! told of sequence starts, ends and ids by the sequence batcher's control inputs.
//!
//! With `max_batch_size: 0` the direct strategy gives every model instance one sequence slot:
//! `--instances N` sequences run at once, further ones wait in Triton's backlog.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fastcache_passes::contract::{Contract, METADATA_KEY, ShapeDim};
use fastcache_passes::ir::{Dim, Model, ValueInfo};
use fastcache_passes::onnx::tensor_proto::DataType;

use super::output::say;

/// The Python host loop, shipped beside model.py so that the loop stays in one place.
const HOST_PY: &str = include_str!("../../python/fastcache/host.py");
/// The Python-backend model that drives it.
const MODEL_PY: &str = include_str!("triton_model.py");
/// The first line of every config this command writes: how it recognises its own models.
const MARKER: &str = "# Written by `fastcache triton`";
/// The sequence batcher's control inputs of the Python backend.
const CONTROLS: [&str; 3] = ["START", "END", "CORRID"];

#[derive(clap::Args)]
pub struct Args {
    /// A model rewritten by `fastcache rewrite` (.onnx).
    pub model: PathBuf,
    /// The model repository to write into (created if absent; other models in it are kept).
    #[arg(short, long, value_name = "REPO")]
    pub output: PathBuf,
    /// Which Triton backend serves it.
    #[arg(long, value_enum, default_value_t = Backend::Onnxruntime)]
    pub backend: Backend,
    /// The model's name in the repository (default: the file name without `.onnx`).
    #[arg(long)]
    pub name: Option<String>,
    /// Binds every named dim that is the first axis of a model input (the batch, CFG doubling
    /// included) to N: needed for the onnxruntime backend's zero initial state when the state's
    /// shape has one; Triton then refuses requests of another batch.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub batch: Option<i64>,
    /// Binds a named dim of the model's inputs to N (repeatable), e.g. `--dim batch=2`.
    #[arg(long = "dim", value_name = "NAME=N")]
    pub dims: Vec<String>,
    /// Where the instances run.
    #[arg(long, value_enum, default_value_t = Kind::Cpu)]
    pub kind: Kind,
    /// Model instances; each holds one sequence at a time (`max_batch_size: 0`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub instances: u32,
    /// How long a sequence may be idle before Triton ends it and drops its state.
    #[arg(long, default_value_t = 60_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sequence_idle_microseconds: u64,
    /// Also serve the contract's stats outputs (e.g. `fastcache.skipped`).
    #[arg(long)]
    pub stats: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Triton's ONNX Runtime backend; the state is Triton's implicit state.
    Onnxruntime,
    /// Triton's Python backend running model.py with onnxruntime; the state stays in model.py.
    Python,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Cpu,
    Gpu,
}

/// What [`config`] needs besides the model.
#[derive(Clone, Debug)]
pub struct Options {
    /// The model's name in the repository.
    pub name: String,
    /// The model file's name, for the config's header comment.
    pub source: String,
    pub backend: Backend,
    /// `--batch`: binds the named first-axis dims of the inputs.
    pub batch: Option<i64>,
    /// `--dim NAME=N`.
    pub dims: BTreeMap<String, i64>,
    pub kind: Kind,
    pub instances: u32,
    pub max_sequence_idle_microseconds: u64,
    pub stats: bool,
}

/// One tensor of the config: its name, Triton type and dims (-1: variable).
struct Tensor {
    name: String,
    data_type: &'static str,
    dims: Vec<i64>,
}

/// The text of `config.pbtxt` for `model` (a rewritten model) served as `options` say.
pub fn config(model: &Model, options: &Options) -> anyhow::Result<String> {
    let contract = contract(model)?;
    let graph = &model.graph;
    let state_inputs: BTreeSet<&str> = contract.state.iter().map(|p| p.input.as_str()).collect();
    let state_outputs: BTreeSet<&str> = contract.state.iter().map(|p| p.output.as_str()).collect();
    let stats: BTreeSet<&str> = contract.stats.iter().map(String::as_str).collect();
    // Initializers that are also graph inputs are overridable defaults, not inputs a host feeds.
    let inputs: Vec<&ValueInfo> = graph
        .inputs
        .iter()
        .filter(|v| graph.initializer(&v.name).is_none() && !state_inputs.contains(v.name.as_str()))
        .collect();
    let outputs: Vec<&ValueInfo> = graph
        .outputs
        .iter()
        .filter(|v| !state_outputs.contains(v.name.as_str()))
        .filter(|v| options.stats || !stats.contains(v.name.as_str()))
        .collect();
    for pair in &contract.state {
        if !graph.inputs.iter().any(|v| v.name == pair.input) {
            bail!(
                "the {METADATA_KEY} metadata names state input '{}', which the graph does not have",
                pair.input
            );
        }
        if !graph.outputs.iter().any(|v| v.name == pair.output) {
            bail!(
                "the {METADATA_KEY} metadata names state output '{}', which the graph does not have",
                pair.output
            );
        }
    }
    let bound = bind_dims(&inputs, options)?;
    if options.backend == Backend::Python {
        for control in CONTROLS {
            if inputs.iter().any(|v| v.name == control) {
                bail!(
                    "the model has an input named '{control}', the name of a sequence control input of the Python backend's config"
                );
            }
        }
    }
    let io = |values: &[&ValueInfo]| -> anyhow::Result<Vec<Tensor>> {
        values.iter().map(|v| tensor(v, &bound)).collect()
    };
    let (inputs, outputs) = (io(&inputs)?, io(&outputs)?);

    let mut text = String::new();
    let w = &mut text;
    writeln!(
        w,
        "{MARKER} from {} ({} backend); edit freely, but `fastcache triton` rewrites it.",
        options.source,
        match options.backend {
            Backend::Onnxruntime => "onnxruntime",
            Backend::Python => "python",
        }
    )?;
    writeln!(w, "name: {}", quote(&options.name))?;
    match options.backend {
        Backend::Onnxruntime => {
            writeln!(w, "backend: \"onnxruntime\"")?;
            writeln!(w, "default_model_filename: \"model.onnx\"")?;
        }
        Backend::Python => writeln!(w, "backend: \"python\"")?,
    }
    writeln!(w, "max_batch_size: 0")?;
    write_tensors(w, "input", &inputs)?;
    write_tensors(w, "output", &outputs)?;
    writeln!(w, "sequence_batching {{")?;
    writeln!(
        w,
        "  max_sequence_idle_microseconds: {}",
        options.max_sequence_idle_microseconds
    )?;
    writeln!(w, "  direct {{ }}")?;
    match options.backend {
        Backend::Onnxruntime => {
            let states = contract
                .state
                .iter()
                .map(|pair| state(model, pair, &bound))
                .collect::<anyhow::Result<Vec<_>>>()?;
            writeln!(w, "  state [")?;
            for (k, (pair, data_type, dims)) in states.iter().enumerate() {
                let dims = dims_text(dims);
                writeln!(w, "    {{")?;
                writeln!(w, "      input_name: {}", quote(&pair.input))?;
                writeln!(w, "      output_name: {}", quote(&pair.output))?;
                writeln!(w, "      data_type: {data_type}")?;
                writeln!(w, "      dims: {dims}")?;
                writeln!(w, "      initial_state {{")?;
                writeln!(w, "        data_type: {data_type}")?;
                writeln!(w, "        dims: {dims}")?;
                writeln!(w, "        zero_data: true")?;
                writeln!(
                    w,
                    "        name: {}",
                    quote(&format!("{} zeros", pair.input))
                )?;
                writeln!(w, "      }}")?;
                writeln!(w, "    }}{}", if k + 1 < states.len() { "," } else { "" })?;
            }
            writeln!(w, "  ]")?;
        }
        Backend::Python => {
            writeln!(w, "  control_input [")?;
            let controls = [
                (
                    "START",
                    "kind: CONTROL_SEQUENCE_START\n          int32_false_true: [ 0, 1 ]",
                ),
                (
                    "END",
                    "kind: CONTROL_SEQUENCE_END\n          int32_false_true: [ 0, 1 ]",
                ),
                (
                    "CORRID",
                    "kind: CONTROL_SEQUENCE_CORRID\n          data_type: TYPE_UINT64",
                ),
            ];
            for (k, (name, control)) in controls.iter().enumerate() {
                writeln!(w, "    {{")?;
                writeln!(w, "      name: \"{name}\"")?;
                writeln!(w, "      control [")?;
                writeln!(w, "        {{")?;
                writeln!(w, "          {control}")?;
                writeln!(w, "        }}")?;
                writeln!(w, "      ]")?;
                writeln!(w, "    }}{}", if k + 1 < controls.len() { "," } else { "" })?;
            }
            writeln!(w, "  ]")?;
        }
    }
    writeln!(w, "}}")?;
    writeln!(w, "instance_group [")?;
    writeln!(w, "  {{")?;
    writeln!(
        w,
        "    kind: {}",
        match options.kind {
            Kind::Cpu => "KIND_CPU",
            Kind::Gpu => "KIND_GPU",
        }
    )?;
    writeln!(w, "    count: {}", options.instances)?;
    writeln!(w, "  }}")?;
    writeln!(w, "]")?;
    Ok(text)
}

fn contract(model: &Model) -> anyhow::Result<Contract> {
    match Contract::from_model(model)? {
        Some(contract) => Ok(contract),
        None => bail!(
            "the model has no '{METADATA_KEY}' metadata entry: it is not a model rewritten by `fastcache rewrite`; rewrite it first"
        ),
    }
}

/// The named dims `--batch` and `--dim` bind, each checked against the inputs' named dims.
fn bind_dims(inputs: &[&ValueInfo], options: &Options) -> anyhow::Result<BTreeMap<String, i64>> {
    let named: BTreeSet<String> = inputs
        .iter()
        .flat_map(|v| v.dims().unwrap_or_default())
        .filter_map(|d| match d {
            Dim::Named(name) => Some(name),
            _ => None,
        })
        .collect();
    let listed = || {
        if named.is_empty() {
            "it has none".to_string()
        } else {
            format!(
                "its named dims: {}",
                named.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        }
    };
    let mut bound = BTreeMap::new();
    if let Some(batch) = options.batch {
        let first: BTreeSet<String> = inputs
            .iter()
            .filter_map(|v| match v.dims()?.into_iter().next()? {
                Dim::Named(name) => Some(name),
                _ => None,
            })
            .collect();
        if first.is_empty() {
            bail!(
                "--batch {batch}: no input of the model has a named first dim to bind (the batch is fixed in the export, or named otherwise: {})",
                listed()
            );
        }
        for name in first {
            bound.insert(name, batch);
        }
    }
    for (name, size) in &options.dims {
        if !named.contains(name) {
            bail!(
                "--dim {name}={size}: no input of the model has a dim named '{name}' ({})",
                listed()
            );
        }
        if let Some(previous) = bound.insert(name.clone(), *size)
            && previous != *size
        {
            bail!("--dim {name}={size} contradicts --batch {previous}");
        }
    }
    Ok(bound)
}

fn tensor(value: &ValueInfo, bound: &BTreeMap<String, i64>) -> anyhow::Result<Tensor> {
    let code = value
        .elem_type()
        .with_context(|| format!("'{}' is not declared as a tensor", value.name))?;
    let dims = value
        .dims()
        .with_context(|| format!("'{}' has no declared shape (rank unknown)", value.name))?;
    Ok(Tensor {
        name: value.name.clone(),
        data_type: triton_type(code).with_context(|| {
            format!("'{}': Triton has no type for its element type", value.name)
        })?,
        dims: dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Named(name) => bound.get(name).copied().unwrap_or(-1),
                Dim::Unknown => -1,
            })
            .collect(),
    })
}

/// One state pair's Triton type and concrete dims.
fn state<'a>(
    model: &Model,
    pair: &'a fastcache_passes::contract::StatePair,
    bound: &BTreeMap<String, i64>,
) -> anyhow::Result<(
    &'a fastcache_passes::contract::StatePair,
    &'static str,
    Vec<i64>,
)> {
    let declared = model.graph.inputs.iter().find(|v| v.name == pair.input);
    let data_type = match declared.and_then(ValueInfo::elem_type) {
        Some(code) => triton_type(code),
        None => contract_type(&pair.dtype),
    }
    .with_context(|| {
        format!(
            "state '{}': Triton has no type for '{}'",
            pair.input, pair.dtype
        )
    })?;
    let shape = || {
        pair.shape
            .iter()
            .map(|d| match d {
                ShapeDim::Fixed(n) => n.to_string(),
                ShapeDim::Named(name) => name.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let dims = pair
        .shape
        .iter()
        .map(|d| match d {
            ShapeDim::Fixed(n) => Ok(*n),
            ShapeDim::Named(name) => bound.get(name).copied().with_context(|| {
                format!(
                    "state '{}' has shape [{}]: Triton's zero initial state needs every dim as a number, and '{name}' is not bound; give --batch N (if it is the batch) or --dim {name}=N, or use --backend python",
                    pair.input,
                    shape()
                )
            }),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((pair, data_type, dims))
}

fn triton_type(code: i32) -> Option<&'static str> {
    Some(match DataType::try_from(code).ok()? {
        DataType::Float => "TYPE_FP32",
        DataType::Float16 => "TYPE_FP16",
        DataType::Bfloat16 => "TYPE_BF16",
        DataType::Double => "TYPE_FP64",
        DataType::Int8 => "TYPE_INT8",
        DataType::Int16 => "TYPE_INT16",
        DataType::Int32 => "TYPE_INT32",
        DataType::Int64 => "TYPE_INT64",
        DataType::Uint8 => "TYPE_UINT8",
        DataType::Uint16 => "TYPE_UINT16",
        DataType::Uint32 => "TYPE_UINT32",
        DataType::Uint64 => "TYPE_UINT64",
        DataType::Bool => "TYPE_BOOL",
        DataType::String => "TYPE_STRING",
        _ => return None,
    })
}

/// The contract's dtype names ("float32", "int64", ...).
fn contract_type(dtype: &str) -> Option<&'static str> {
    Some(match dtype {
        "float32" | "float" => "TYPE_FP32",
        "float16" => "TYPE_FP16",
        "bfloat16" => "TYPE_BF16",
        "float64" | "double" => "TYPE_FP64",
        "int8" => "TYPE_INT8",
        "int16" => "TYPE_INT16",
        "int32" => "TYPE_INT32",
        "int64" => "TYPE_INT64",
        "uint8" => "TYPE_UINT8",
        "uint16" => "TYPE_UINT16",
        "uint32" => "TYPE_UINT32",
        "uint64" => "TYPE_UINT64",
        "bool" => "TYPE_BOOL",
        _ => return None,
    })
}

fn write_tensors(w: &mut String, field: &str, tensors: &[Tensor]) -> std::fmt::Result {
    writeln!(w, "{field} [")?;
    for (k, t) in tensors.iter().enumerate() {
        writeln!(w, "  {{")?;
        writeln!(w, "    name: {}", quote(&t.name))?;
        writeln!(w, "    data_type: {}", t.data_type)?;
        writeln!(w, "    dims: {}", dims_text(&t.dims))?;
        writeln!(w, "  }}{}", if k + 1 < tensors.len() { "," } else { "" })?;
    }
    writeln!(w, "]")
}

fn dims_text(dims: &[i64]) -> String {
    let listed: Vec<String> = dims.iter().map(i64::to_string).collect();
    format!("[ {} ]", listed.join(", "))
}

/// A protobuf text-format string literal.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = Model::load(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?;
    let source = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match &args.name {
        Some(name) => name.clone(),
        None => source.strip_suffix(".onnx").unwrap_or(&source).to_string(),
    };
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        bail!(
            "'{name}' cannot be a Triton model name (letters, digits, '_', '-', '.', not starting with '.'); give --name"
        );
    }
    let mut dims = BTreeMap::new();
    for spec in &args.dims {
        let parsed = spec
            .split_once('=')
            .and_then(|(n, v)| Some((n.trim().to_string(), v.trim().parse::<i64>().ok()?)))
            .filter(|(n, v)| !n.is_empty() && *v >= 1);
        let Some((dim, size)) = parsed else {
            bail!("--dim {spec}: expected NAME=N with N a positive integer");
        };
        dims.insert(dim, size);
    }
    let options = Options {
        name: name.clone(),
        source,
        backend: args.backend,
        batch: args.batch,
        dims,
        kind: args.kind,
        instances: args.instances,
        max_sequence_idle_microseconds: args.max_sequence_idle_microseconds,
        stats: args.stats,
    };
    let text = config(&model, &options)
        .with_context(|| format!("cannot serve {} with Triton", args.model.display()))?;
    let target = check_repository(&args.output, &name)?;

    // Everything goes into a fresh folder beside REPO, then is renamed into place.
    let parent = args
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".fastcache-triton-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a folder in {}", parent.display()))?;
    let staged = staging.path().join(&name);
    let version = staged.join("1");
    std::fs::create_dir_all(&version)?;
    std::fs::write(staged.join("config.pbtxt"), &text)?;
    let onnx = version.join("model.onnx");
    model
        .save(&onnx, &model.default_storage(&onnx))
        .with_context(|| format!("cannot write {}", onnx.display()))?;
    if args.backend == Backend::Python {
        std::fs::write(version.join("model.py"), MODEL_PY)?;
        std::fs::write(version.join("fastcache_host.py"), HOST_PY)?;
    }
    if !args.output.exists() {
        // A new repository: the whole folder moves in one rename.
        let repo = staging.path().join("repo");
        std::fs::create_dir(&repo)?;
        std::fs::rename(&staged, repo.join(&name))?;
        std::fs::rename(&repo, &args.output).with_context(|| {
            format!("cannot move the repository into {}", args.output.display())
        })?;
    } else {
        if target.exists() {
            std::fs::remove_dir_all(&target)
                .with_context(|| format!("cannot replace {}", target.display()))?;
        }
        std::fs::rename(&staged, &target)
            .with_context(|| format!("cannot move the model into {}", target.display()))?;
    }
    let backend = match args.backend {
        Backend::Onnxruntime => "onnxruntime",
        Backend::Python => "python",
    };
    say!(
        "wrote {} ({backend} backend, {} instance(s), {} state pair(s))",
        target.display(),
        args.instances,
        contract(&model)?.state.len()
    );
    Ok(())
}

/// Where the model goes in REPO; refuses a REPO that is not a model repository and a model folder
/// this command did not write.
fn check_repository(repo: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let target = repo.join(name);
    if !repo.exists() {
        return Ok(target);
    }
    if !repo.is_dir() {
        bail!(
            "{} exists and is not a folder; choose another REPO",
            repo.display()
        );
    }
    for entry in std::fs::read_dir(repo)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            bail!(
                "{} exists and is not a Triton model repository (it holds the file {}, and a repository holds only model folders); choose another REPO",
                repo.display(),
                entry.file_name().to_string_lossy()
            );
        }
    }
    if target.exists() {
        let ours = std::fs::read_to_string(target.join("config.pbtxt"))
            .map(|text| text.starts_with(MARKER))
            .unwrap_or(false);
        if !ours {
            bail!(
                "{} exists and was not written by `fastcache triton`; choose another --name or REPO",
                target.display()
            );
        }
    }
    Ok(target)
}
