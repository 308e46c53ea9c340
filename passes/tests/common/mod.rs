//! Shared helpers for the compiler's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The DiT and PixArt fixtures, both exporters (and the external-data copy), with a dynamic
/// batch and with a fixed batch of 2 (`_b2`: the exporters fold batch × heads into constants).
pub const DIT_FIXTURES: [&str; 9] = [
    "dit_ts",
    "dit_dynamo",
    "dit_ts_external",
    "pixart_ts",
    "pixart_dynamo",
    "dit_ts_b2",
    "dit_dynamo_b2",
    "pixart_ts_b2",
    "pixart_dynamo_b2",
];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every committed model: the PyTorch exports in models/fixtures and the hand-made ones here.
/// The float16 exports of the DiT fixture (both exporters).
pub const FLOAT16_FIXTURES: [&str; 2] = ["dit_ts_f16", "dit_dynamo_f16"];

/// A cache_check.py error in float16 ulps of its scale (the largest value it was measured on):
/// `error_key` over 2^-10 · `scale_key` of the report.
pub fn float16_ulps(report: &serde_json::Value, error_key: &str, scale_key: &str) -> f64 {
    let value = |key: &str| report[key].as_f64().unwrap();
    value(error_key) / (value(scale_key) * f64::powi(2.0, -10))
}

pub fn fixture_models() -> Vec<PathBuf> {
    let mut models = Vec::new();
    for dir in [
        repo_root().join("models/fixtures"),
        repo_root().join("models/fixtures/negative"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            models.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "onnx")),
            );
        }
    }
    models.sort();
    assert!(!models.is_empty(), "no fixture models found");
    models
}

pub fn fixture(name: &str) -> PathBuf {
    let path = repo_root().join("models/fixtures").join(name);
    assert!(path.exists(), "missing fixture {}", path.display());
    path
}

pub fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The Python with onnx and onnxruntime that scripts/test.sh prepares. Tests that need it fail
/// (never skip) when it is missing, so a green run always means the check ran.
pub fn python() -> PathBuf {
    let python = std::env::var_os("FASTCACHE_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!("FASTCACHE_TEST_PYTHON is not set: run the tests with scripts/test.sh, which prepares it")
    });
    assert!(
        python.exists(),
        "FASTCACHE_TEST_PYTHON={} does not exist",
        python.display()
    );
    python
}

/// The ONNX checker (full check) and ONNX Runtime accept `model`, without running it.
pub fn ort_loads(model: &Path) {
    let script = "import sys, onnx, onnxruntime as ort\n\
        onnx.checker.check_model(sys.argv[1], full_check=True)\n\
        ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])";
    let output = std::process::Command::new(python())
        .args(["-c", script])
        .arg(model)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "the checker or ONNX Runtime refused {}:\n{}",
        model.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs scripts/ort_check.py: ONNX Runtime on `npz`'s inputs, optionally the ONNX checker.
/// Returns the parsed JSON report.
pub fn ort_check(model: &Path, npz: &Path, checker: bool) -> serde_json::Value {
    let mut command = std::process::Command::new(python());
    command
        .arg(repo_root().join("scripts/ort_check.py"))
        .arg(model)
        .arg(npz);
    if checker {
        command.arg("--checker");
    }
    let output = command.output().expect("run python");
    assert!(
        output.status.success(),
        "ONNX Runtime / checker failed on {}:\n{}",
        model.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("ort_check.py prints JSON")
}

/// The .npz of inputs and reference output that sits beside a fixture, if any.
pub fn reference_npz(model: &Path) -> Option<PathBuf> {
    let npz = model.with_extension("npz");
    npz.exists().then_some(npz)
}

/// How far ONNX Runtime may be from PyTorch's output saved beside a fixture: float16 fixtures
/// (`*_f16`) ran in float16 in both, which round differently along the way (the tolerance
/// models/export_fixtures.py checks them at).
pub fn pytorch_tolerance(model: &Path) -> f64 {
    let stem = model.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if stem.ends_with("_f16") { 2e-2 } else { 1e-4 }
}

/// Saves a model as one file in `dir` and returns its path.
pub fn save_inline(model: &fastcache_passes::ir::Model, dir: &Path, file: &str) -> PathBuf {
    let path = dir.join(file);
    model
        .save(&path, &fastcache_passes::onnx::Storage::Inline)
        .unwrap();
    path
}

/// Runs one of the Python checkers in tests/data and returns the JSON it prints.
pub fn python_json(script: &str, args: &[&Path], extra: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(python())
        .arg(test_data(script))
        .args(args)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Removes every node that `output` does not need.
pub fn prune_to(graph: &mut fastcache_passes::ir::Graph, output: &str) {
    use fastcache_passes::ir::NodeId;
    use std::collections::HashSet;
    let mut needed: HashSet<NodeId> = HashSet::new();
    let mut todo = vec![output.to_string()];
    while let Some(value) = todo.pop() {
        if let Some(p) = graph.producer(&value)
            && needed.insert(p)
        {
            todo.extend(graph.node(p).all_reads());
        }
    }
    let unneeded: Vec<NodeId> = graph
        .nodes()
        .map(|(id, _)| id)
        .filter(|id| !needed.contains(id))
        .collect();
    for id in unneeded {
        graph.remove_node(id);
    }
}

/// Steps `original` and `rewritten` side by side in unoptimised ONNX Runtime
/// (data/cache_check.py) and asserts they agree bit for bit: unoptimised, both run the same
/// kernels in the same order. Returns the checker's report.
pub fn assert_bit_identical_run(
    original: &Path,
    rewritten: &Path,
    npz: &Path,
    steps: usize,
    what: &str,
) -> serde_json::Value {
    let report = python_json(
        "cache_check.py",
        &[original, rewritten, npz],
        &["--steps", &steps.to_string(), "--no-optimizations"],
    );
    assert_eq!(
        report["max_abs_diff"].as_f64().unwrap(),
        0.0,
        "{what}: {report}"
    );
    report
}
