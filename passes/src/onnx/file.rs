//! Reading and writing `.onnx` files, including weights kept in external data files.
//!
//! Files are memory-mapped and decoded with `bytes::Bytes` payloads, so a tensor's bytes stay
//! slices of the mapping (inline or external) until they are written out once.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use super::tensor_proto::DataLocation;
use super::validate;
use super::{GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto};
use crate::error::{Error, Result};

/// Protobuf cannot encode a message of 2 GiB or more; bigger models must use external data.
const PROTOBUF_LIMIT: usize = (1 << 31) - 1;
/// Offsets of tensors in a data file we write are multiples of this (keeps f32/f64 aligned when mapped).
const EXTERNAL_ALIGNMENT: u64 = 64;

/// The external data files a model refers to, memory-mapped once each.
#[derive(Clone, Debug, Default)]
pub struct ExternalStore {
    model_path: PathBuf,
    /// location as written in the model → the whole file's bytes.
    files: HashMap<String, Bytes>,
    /// Canonical paths of the model file and every data file: outputs must never replace them.
    sources: Vec<PathBuf>,
}

/// A decoded model file and the external data it refers to.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub proto: ModelProto,
    pub external: ExternalStore,
}

/// Where tensor bytes go when a model is saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Every tensor keeps its place: inline tensors stay inline, external ones keep their location,
    /// offset and length (the data file is rewritten beside the output). Reproduces the input bytes.
    Preserve,
    /// One self-contained file (refused above protobuf's 2 GiB limit).
    Inline,
    /// Tensors of at least `threshold` bytes go to `file_name` beside the model file.
    External { file_name: String, threshold: usize },
}

impl Storage {
    /// Weights of 1 KiB and more in `<output file name>.data` beside the model file.
    pub fn external_beside(output: &Path) -> Storage {
        let name = output.file_name().map(|n| n.to_string_lossy().into_owned());
        Storage::External {
            file_name: format!("{}.data", name.unwrap_or_else(|| "model.onnx".into())),
            threshold: 1024,
        }
    }
}

/// Above this many bytes of weights a model is saved with external data unless told otherwise:
/// protobuf refuses 2 GiB, and the graph itself needs room too.
pub const INLINE_WEIGHT_LIMIT: u64 = 1 << 30;

fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only; like every tool that maps model files, we assume nobody
    // truncates the file while we hold it.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Bytes::from_owner(map))
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Loads a model file and maps every external data file it refers to, checking each reference
/// (location inside the model's folder, offset and length inside the file).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    decode_model(map_file(path)?, path)
}

/// [`load_model`] on bytes already in memory; `path` is where they came from (named in errors,
/// and the folder external data is looked for in).
pub fn decode_model(bytes: Bytes, path: &Path) -> Result<LoadedModel> {
    if bytes.is_empty() {
        return Err(Error::Decode {
            path: path.into(),
            message: "the file is empty".into(),
        });
    }
    let mut proto = ModelProto::decode(bytes).map_err(|e| Error::Decode {
        path: path.into(),
        message: short_decode_error(&e.to_string()),
    })?;
    if proto.graph.is_none() || proto.ir_version.is_none() {
        return Err(Error::Decode {
            path: path.into(),
            message: "no graph or no ir_version: this protobuf is not an ONNX model".into(),
        });
    }
    let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut store = ExternalStore {
        model_path: path.to_path_buf(),
        files: HashMap::new(),
        sources: vec![canonical(path)],
    };
    let invalid = |what: String, message: String| Error::Tensor {
        path: path.into(),
        what,
        message,
    };
    for_each_tensor_mut(&mut proto, &mut |tensor| {
        if !tensor.is_external() {
            return match validate::tensor_problem(tensor, None) {
                Some(problem) => Err(invalid(format!("tensor '{}'", tensor.name()), problem)),
                None => Ok(()),
            };
        }
        let fail = |message: String| Error::ExternalData {
            path: path.into(),
            tensor: tensor.name().to_string(),
            message,
        };
        let location = tensor
            .external_entry("location")
            .ok_or_else(|| fail("no 'location' entry".into()))?
            .to_string();
        let relative = Path::new(&location);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
        {
            return Err(fail(format!(
                "location '{location}' must be a path inside the model's folder"
            )));
        }
        if !store.files.contains_key(&location) {
            let data_path = base_dir.join(relative);
            let data = map_file(&data_path).map_err(|e| fail(format!("cannot read: {e}")))?;
            store.sources.push(canonical(&data_path));
            store.files.insert(location.clone(), data);
        }
        let (offset, length) = external_range(tensor).map_err(fail)?;
        let file_len = store.files[&location].len() as u64;
        let length = length.unwrap_or(file_len.saturating_sub(offset));
        let end = offset.checked_add(length);
        match end {
            Some(end) if end <= file_len && offset <= file_len => {}
            _ => {
                return Err(fail(format!(
                    "needs bytes {offset}..{} of '{location}', which has only {file_len}",
                    end.map_or("overflow".to_string(), |e| e.to_string())
                )));
            }
        }
        match validate::tensor_problem(tensor, Some(length)) {
            Some(problem) => Err(fail(problem)),
            None => Ok(()),
        }
    })?;
    if let Some((what, problem)) = proto.graph.as_ref().and_then(validate::shape_problem) {
        return Err(invalid(what, problem));
    }
    Ok(LoadedModel {
        proto,
        external: store,
    })
}

/// prost names every message on the way to a decoding error; in a deeply nested file that path
/// runs to thousands of characters, so only its two ends are kept.
fn short_decode_error(message: &str) -> String {
    let parts: Vec<&str> = message.split(": ").collect();
    if parts.len() <= 6 {
        return message.to_string();
    }
    let (head, tail) = (&parts[..3], &parts[parts.len() - 2..]);
    format!("{}: …: {}", head.join(": "), tail.join(": "))
}

/// Offset (default 0) and length (None = to the end of the file) of an external tensor.
fn external_range(tensor: &TensorProto) -> std::result::Result<(u64, Option<u64>), String> {
    let number = |key: &str| -> std::result::Result<Option<u64>, String> {
        tensor
            .external_entry(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("'{key}' is '{v}', not a byte count"))
            })
            .transpose()
    };
    Ok((number("offset")?.unwrap_or(0), number("length")?))
}

impl ExternalStore {
    pub fn model_path(&self) -> &Path {
        &self.model_path
    }

    /// Data files as (location, size in bytes), sorted by location.
    pub fn files(&self) -> Vec<(String, u64)> {
        let mut files: Vec<_> = self
            .files
            .iter()
            .map(|(name, data)| (name.clone(), data.len() as u64))
            .collect();
        files.sort();
        files
    }

    /// The raw little-endian bytes of a tensor, wherever they live; `None` for tensors stored in
    /// the typed repeated fields (`float_data`, ...).
    pub fn raw_bytes(&self, tensor: &TensorProto) -> Result<Option<Bytes>> {
        if !tensor.is_external() {
            return Ok(tensor.raw_data.clone());
        }
        let fail = |message: String| Error::ExternalData {
            path: self.model_path.clone(),
            tensor: tensor.name().to_string(),
            message,
        };
        let location = tensor
            .external_entry("location")
            .ok_or_else(|| fail("no 'location' entry".into()))?;
        let file = self
            .files
            .get(location)
            .ok_or_else(|| fail(format!("data file '{location}' was not loaded")))?;
        let (offset, length) = external_range(tensor).map_err(fail)?;
        let start = offset as usize;
        let end = length.map_or(file.len(), |l| start + l as usize);
        if end > file.len() || start > end {
            return Err(fail(format!(
                "range {start}..{end} is outside '{location}'"
            )));
        }
        Ok(Some(file.slice(start..end)))
    }
}

/// Visits every tensor a model holds: initializers and tensor attributes, in the main graph,
/// every nested graph, functions and training graphs.
pub fn for_each_tensor_mut(
    model: &mut ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    fn graph(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
        for t in &mut g.initializer {
            f(t)?;
        }
        for s in &mut g.sparse_initializer {
            for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
                f(t)?;
            }
        }
        nodes(&mut g.node, f)
    }
    fn nodes(
        ns: &mut [NodeProto],
        f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
    ) -> Result<()> {
        for node in ns {
            for attr in &mut node.attribute {
                for t in attr.t.iter_mut().chain(attr.tensors.iter_mut()) {
                    f(t)?;
                }
                for g in attr.g.iter_mut().chain(attr.graphs.iter_mut()) {
                    graph(g, f)?;
                }
            }
        }
        Ok(())
    }
    if let Some(g) = &mut model.graph {
        graph(g, f)?;
    }
    for function in &mut model.functions {
        nodes(&mut function.node, f)?;
    }
    for info in &mut model.training_info {
        for g in info
            .initialization
            .iter_mut()
            .chain(info.algorithm.iter_mut())
        {
            graph(g, f)?;
        }
    }
    Ok(())
}

/// A data file being assembled: (offset, bytes) pieces, written at their offsets.
#[derive(Default)]
struct DataFile {
    pieces: Vec<(u64, Bytes)>,
    len: u64,
}

/// Writes `model` to `path` with its tensors stored as `storage` says. Everything is written to
/// temporary files in the output folder first and renamed into place at the end, so a failure
/// leaves no partial output; the input model and its data files are never opened for writing.
pub fn save_model(
    mut model: ModelProto,
    store: &ExternalStore,
    path: &Path,
    storage: &Storage,
) -> Result<()> {
    let out_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut data_files: BTreeMap<String, DataFile> = BTreeMap::new();
    for_each_tensor_mut(&mut model, &mut |tensor| {
        match storage {
            Storage::Preserve => {
                if tensor.is_external() {
                    let bytes = store.raw_bytes(tensor)?.unwrap_or_default();
                    let (offset, _) = external_range(tensor).map_err(Error::Invalid)?;
                    let location = tensor.external_entry("location").unwrap_or("").to_string();
                    let file = data_files.entry(location).or_default();
                    file.len = file.len.max(offset + bytes.len() as u64);
                    file.pieces.push((offset, bytes));
                }
            }
            Storage::Inline => {
                if tensor.is_external() {
                    tensor.raw_data = Some(store.raw_bytes(tensor)?.unwrap_or_default());
                    tensor.external_data.clear();
                    tensor.data_location = None;
                }
            }
            Storage::External {
                file_name,
                threshold,
            } => {
                let Some(bytes) = store.raw_bytes(tensor)? else {
                    return Ok(());
                };
                if bytes.len() < *threshold {
                    if tensor.is_external() {
                        tensor.raw_data = Some(bytes);
                        tensor.external_data.clear();
                        tensor.data_location = None;
                    }
                    return Ok(());
                }
                let file = data_files.entry(file_name.clone()).or_default();
                let offset = file.len.div_ceil(EXTERNAL_ALIGNMENT) * EXTERNAL_ALIGNMENT;
                let length = bytes.len() as u64;
                file.len = offset + length;
                file.pieces.push((offset, bytes));
                tensor.raw_data = None;
                tensor.data_location = Some(DataLocation::External as i32);
                tensor.external_data = vec![
                    StringStringEntryProto::new("location", file_name.clone()),
                    StringStringEntryProto::new("offset", offset.to_string()),
                    StringStringEntryProto::new("length", length.to_string()),
                ];
            }
        }
        Ok(())
    })?;

    let encoded_len = model.encoded_len();
    if encoded_len > PROTOBUF_LIMIT {
        return Err(Error::Unsupported(format!(
            "{}: the model would be {encoded_len} bytes, over protobuf's 2 GiB limit: save its \
             weights in an external data file",
            path.display()
        )));
    }

    // Refuse to replace any file the input came from, before anything is written.
    let targets: Vec<PathBuf> = std::iter::once(path.to_path_buf())
        .chain(data_files.keys().map(|loc| out_dir.join(loc)))
        .collect();
    for target in &targets {
        if store.sources.contains(&canonical(target)) {
            return Err(Error::Invalid(format!(
                "{}: saving there would overwrite a file the input model is read from; choose \
                 another output path",
                target.display()
            )));
        }
    }

    let temp = |dir: &Path| tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e));
    let mut pending = Vec::new();
    for (location, data) in &mut data_files {
        let target = out_dir.join(location);
        let dir = target.parent().unwrap_or(&out_dir).to_path_buf();
        let mut file = temp(&dir)?;
        data.pieces.sort_by_key(|(offset, _)| *offset);
        let io = |e| Error::io(&target, e);
        let mut writer = std::io::BufWriter::new(file.as_file_mut());
        let mut position = 0u64;
        for (offset, bytes) in &data.pieces {
            if *offset != position {
                writer.seek(SeekFrom::Start(*offset)).map_err(io)?;
            }
            writer.write_all(bytes).map_err(io)?;
            position = offset + bytes.len() as u64;
        }
        writer.flush().map_err(io)?;
        drop(writer);
        file.as_file().set_len(data.len).map_err(io)?;
        pending.push((file, target));
    }
    let mut file = temp(&out_dir)?;
    let mut buffer = Vec::with_capacity(encoded_len);
    model
        .encode(&mut buffer)
        .map_err(|e| Error::Invalid(format!("encoding {}: {e}", path.display())))?;
    file.write_all(&buffer).map_err(|e| Error::io(path, e))?;
    pending.push((file, path.to_path_buf()));
    for (file, target) in pending {
        persist(file, &target)?;
    }
    Ok(())
}

/// Renames a finished temporary file into place as an ordinary file (temporary files are 0600).
pub(crate) fn persist(file: tempfile::NamedTempFile, target: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(target, e))?;
    }
    file.persist(target)
        .map_err(|e| Error::io(target, e.error))?;
    Ok(())
}

/// Writes a whole file through a temporary file in the same folder, so no reader ever sees half.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::io(&dir, e))?;
    file.write_all(bytes).map_err(|e| Error::io(path, e))?;
    persist(file, path)
}
