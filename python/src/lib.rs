//! `fastcache._native`: the `fastcache` command line for Python, the same code as the binary's.
//! The package around it (python/fastcache) turns keyword arguments into command lines and the
//! captured report into dicts; this module only runs command lines.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use pyo3::prelude::*;

/// Runs the command line `argv` (the program name first) as the `fastcache` binary does, printing
/// what it prints, and returns its exit status. The interpreter lock is released meanwhile.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    py.detach(|| fastcache::cli::main_from(argv))
}

/// Runs the command line `argv` with its report captured. Returns (error, stdout, warnings):
/// error is None on success, else the text the binary prints after `error: `.
#[pyfunction]
fn run(py: Python<'_>, argv: Vec<OsString>) -> (Option<String>, String, Vec<String>) {
    let (result, captured) =
        py.detach(|| fastcache::cli::output::capture(|| fastcache::cli::run_from(argv)));
    (
        result.err().map(|error| format!("{error:#}")),
        captured.stdout,
        captured.warnings,
    )
}

/// The metadata entries of an ONNX model (key to value). Returns (error, entries): error is None
/// when the model loads, else why it does not.
#[pyfunction]
fn metadata(py: Python<'_>, path: PathBuf) -> (Option<String>, BTreeMap<String, String>) {
    py.detach(|| match fastcache_passes::ir::Model::load(&path) {
        Ok(model) => (None, model.metadata_map()),
        Err(error) => (
            Some(format!("{:#}", anyhow::Error::from(error))),
            BTreeMap::new(),
        ),
    })
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(main, module)?)?;
    module.add_function(wrap_pyfunction!(run, module)?)?;
    module.add_function(wrap_pyfunction!(metadata, module)?)?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
