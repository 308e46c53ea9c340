//! Helpers shared by the engine, sampler and `run` tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("models/fixtures").join(name)
}

/// Every fixture model with a reference `.npz` beside it, negatives included.
pub fn fixtures_with_reference() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in [fixture(""), fixture("negative")] {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .filter(|p| p.with_extension("npz").is_file())
            .collect();
        entries.sort();
        found.extend(entries);
    }
    assert!(!found.is_empty(), "no fixtures found under models/fixtures");
    found
}

/// Tests that need ONNX Runtime fail loudly without it rather than pass without running:
/// scripts/test.sh sets ORT_DYLIB_PATH to .ort/libonnxruntime.so.
pub fn require_ort() -> PathBuf {
    let path = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).unwrap_or_else(|| {
        panic!(
            "ORT_DYLIB_PATH is not set: this test needs ONNX Runtime. Run the tests with scripts/test.sh \
             (it runs scripts/setup.sh and sets ORT_DYLIB_PATH=.ort/libonnxruntime.so)"
        )
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "ORT_DYLIB_PATH={} is not a file: run scripts/setup.sh",
        path.display()
    );
    path
}

pub fn name_of(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Runs the `fastcache` binary from the repository root.
pub fn fastcache(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fastcache"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run fastcache")
}

/// The stdout of a command that must succeed.
pub fn ok(output: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "fastcache failed:\n{stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The stderr of a command that must fail cleanly (non-zero exit, no panic).
pub fn fails(output: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "fastcache should have failed");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// A path as a command-line argument.
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn read_npy(path: &Path) -> ndarray::ArrayD<f32> {
    fastcache::engine::read_npy_f32(path).unwrap()
}

/// Largest difference, relative to the largest value (random-weight DiTs' latents grow large).
pub fn relative_diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The single-stream fixtures every rewrite must handle.
pub const DIT_FIXTURES: [&str; 5] = [
    "dit_ts",
    "dit_dynamo",
    "dit_ts_external",
    "pixart_ts",
    "pixart_dynamo",
];

/// What `fastcache run` (ONNX Runtime) and examples/python_host.py gave for one rewritten
/// fixture of dit_ts's shape, from the same noise.
pub struct HostRun {
    /// `fastcache run`'s printed report.
    pub report: String,
    /// How many blocks the Python host saw skipped, over all steps.
    pub host_skipped: f64,
    /// The two outputs' relative difference.
    pub diff: f32,
}

/// Samples `model` 10 steps (classes 3 and 7, CFG 4, noise from seed 11) with `fastcache run`
/// on ONNX Runtime and with the Python example host, which knows only the metadata contract.
pub fn run_with_python_host(model: &Path, dir: &Path) -> HostRun {
    run_with_python_host_on(model, None, dir)
}

/// The same, both hosts running the model's host split in `split` (`rewrite --split`).
pub fn run_with_python_host_on(model: &Path, split: Option<&Path>, dir: &Path) -> HostRun {
    require_ort();
    let noise = dir.join("noise.npy");
    let x = fastcache::sampler::standard_normal(&mut fastcache::sampler::rng(11), &[2, 4, 8, 8]);
    ndarray_npy::write_npy(&noise, &x).unwrap();
    let rust = dir.join("rust.npy");
    let split_args = match split {
        Some(folder) => vec!["--split", s(folder)],
        None => Vec::new(),
    };
    let mut args = vec![
        "run",
        s(model),
        "--engine",
        "ort",
        "--noise",
        s(&noise),
        "-o",
        s(&rust),
        "--steps",
        "10",
        "--batch",
        "2",
        "--class",
        "3,7",
        "--cfg",
        "4",
    ];
    args.extend(split_args);
    let report = ok(fastcache(&args));
    let py = dir.join("py.npy");
    let printed = python_json(
        std::process::Command::new(python())
            .arg(root().join("examples/python_host.py"))
            .args([
                s(split.unwrap_or(model)),
                "--noise",
                s(&noise),
                "--class",
                "3,7",
                "--cfg",
                "4",
                "--steps",
                "10",
                "-o",
                s(&py),
            ]),
    );
    let host_skipped = printed["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s.as_array().unwrap())
        .map(|v| v.as_f64().unwrap())
        .sum();
    HostRun {
        report,
        host_skipped,
        diff: relative_diff(&read_npy(&py), &read_npy(&rust)),
    }
}

/// `fastcache run MODEL -o OUT --engine ENGINE` over the runs the CLI tests compare: 8 steps,
/// seed 5, batch 2, CFG 3. Returns the printed report.
pub fn run_8_steps(model: &Path, engine: &str, out: &Path) -> String {
    run_steps(model, engine, 8, out)
}

/// The same runs with another number of steps (a scheduled model fits the step count it was
/// calibrated for).
pub fn run_steps(model: &Path, engine: &str, steps: usize, out: &Path) -> String {
    let steps = steps.to_string();
    ok(fastcache(&[
        "run",
        s(model),
        "-o",
        s(out),
        "--engine",
        engine,
        "--steps",
        &steps,
        "--seed",
        "5",
        "--batch",
        "2",
        "--cfg",
        "3",
    ]))
}

/// `fastcache calibrate` of the smallest DiT fixture (10 steps, 2 runs, CFG 3) into
/// `calibration`; returns the printed report.
pub fn calibrate_dit_ts(calibration: &Path) -> String {
    calibrate_dit_ts_with(calibration, &[])
}

/// The same with more options (`--target-speedup S` for a schedule).
pub fn calibrate_dit_ts_with(calibration: &Path, extra: &[&str]) -> String {
    let model = fixture("dit_ts.onnx");
    let base = [
        "calibrate",
        s(&model),
        "--steps",
        "10",
        "--runs",
        "2",
        "--cfg",
        "3",
        "-o",
        s(calibration),
    ];
    ok(fastcache(&[&base[..], extra].concat()))
}

/// The test tools' Python (scripts/test.sh sets FASTCACHE_TEST_PYTHON to .venv/bin/python).
pub fn python() -> PathBuf {
    let python = std::env::var_os("FASTCACHE_TEST_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "FASTCACHE_TEST_PYTHON is not set: run the tests with scripts/test.sh (it sets it to .venv/bin/python)"
            )
        });
    assert!(
        python.exists(),
        "FASTCACHE_TEST_PYTHON={} does not exist",
        python.display()
    );
    python
}

/// Runs a Python command, asserts it succeeded, and returns the JSON it printed.
pub fn python_json(command: &mut std::process::Command) -> serde_json::Value {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}
