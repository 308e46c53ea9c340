//! `fastcache run` as a user runs it: outputs, reports, and the errors of a wrong setup. Every
//! failure must exit non-zero with a message, never panic, and never leave an output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fastcache::engine::read_npy_f32;
use fastcache_passes::ir::{Dim, Model, Node, ValueInfo};
use fastcache_passes::onnx::Storage;

fn fastcache() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fastcache"));
    command.current_dir(common::root());
    command
}

fn run(args: &[&str], ort_library: Option<&Path>) -> Output {
    let mut command = fastcache();
    command.arg("run").args(args);
    match ort_library {
        Some(path) => command.env("ORT_DYLIB_PATH", path),
        None => command.env_remove("ORT_DYLIB_PATH"),
    };
    command.output().expect("the fastcache binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failed run: non-zero exit, one `error:` message containing `expected`, no panic, no output.
fn assert_fails(output: &Output, expected: &str, out_file: &Path) {
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "should fail; stdout:\n{}",
        text(&output.stdout)
    );
    assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(expected),
        "expected '{expected}' in:\n{stderr}"
    );
    assert!(
        !out_file.exists(),
        "{} was written by a failed run",
        out_file.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(out_file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".fastcache-run-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn dit() -> String {
    common::fixture("dit_ts.onnx").display().to_string()
}

#[test]
fn tract_and_onnx_runtime_write_the_same_latents() {
    let ort = common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for engine in ["tract", "ort"] {
        let out = dir.path().join(format!("{engine}.npy"));
        let output = run(
            &[
                &dit(),
                "--steps",
                "5",
                "--seed",
                "3",
                "--engine",
                engine,
                "--class",
                "4,9",
                "--batch",
                "2",
                "--cfg",
                "3",
                "-o",
                out.to_str().unwrap(),
            ],
            Some(&ort),
        );
        let stdout = text(&output.stdout);
        assert!(
            output.status.success(),
            "{engine}: {}",
            text(&output.stderr)
        );
        let engine_line = if engine == "tract" {
            "engine    tract 0.23.9"
        } else {
            "engine    onnxruntime 1."
        };
        assert!(stdout.contains(engine_line), "{stdout}");
        let provider = if engine == "tract" {
            "provider  cpu"
        } else {
            "provider  CPUExecutionProvider"
        };
        assert!(stdout.contains(provider), "{stdout}");
        assert!(stdout.contains("CFG 3 (null class 10, guessed"), "{stdout}");
        assert!(
            stdout.contains("batch     2 (4 per call with CFG), seed 3"),
            "{stdout}"
        );
        assert!(stdout.contains("total     "), "{stdout}");
        assert!(stdout.matches(" ms").count() >= 2, "{stdout}");
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.trim_start().starts_with(char::is_numeric))
                .count(),
            5,
            "one line per step: {stdout}"
        );
        let latents = read_npy_f32(&out).unwrap();
        assert_eq!(latents.shape(), &[2, 4, 8, 8]);
        results.push(latents);
    }
    let scale = results[1].iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = results[0]
        .iter()
        .zip(&results[1])
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff / scale <= 1e-5,
        "engines differ by {diff} (scale {scale})"
    );
}

#[test]
fn same_seed_same_output_other_seed_other_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (i, seed) in ["1", "1", "2"].iter().enumerate() {
        let out = dir.path().join(format!("{i}.npy"));
        let output = run(
            &[
                &common::fixture("pixart_ts.onnx").display().to_string(),
                "--steps",
                "2",
                "--seed",
                seed,
                "-o",
                out.to_str().unwrap(),
            ],
            None,
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_ne!(outputs[0], outputs[2]);
}

/// An engine's error reaches the user as one line naming the model and the node, whatever
/// `RUST_BACKTRACE` says: tract's own stack trace stays inside.
#[test]
fn engine_errors_print_their_chain_and_never_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::load(&common::fixture("negative/mlp.onnx")).unwrap();
    let mut graph = fastcache_passes::ir::Graph::new("unknown_op");
    let dims = || {
        vec![
            Dim::Named("batch".into()),
            Dim::Fixed(3),
            Dim::Fixed(4),
            Dim::Fixed(5),
        ]
    };
    graph
        .inputs
        .push(ValueInfo::tensor("hidden_states", 1, dims()));
    graph.inputs.push(ValueInfo::tensor(
        "timestep",
        7,
        vec![Dim::Named("batch".into())],
    ));
    graph.add_node(
        Node::new("NoSuchOp", &["hidden_states"], &["sample"]).with_name("the_unknown_node"),
    );
    graph.outputs.push(ValueInfo::tensor("sample", 1, dims()));
    model.graph = graph;
    let path = dir.path().join("unknown_op.onnx");
    model.save(&path, &Storage::Inline).unwrap();
    let out = dir.path().join("out.npy");
    let output = fastcache()
        .env("RUST_BACKTRACE", "1")
        .args([
            "run",
            common::s(&path),
            "--engine",
            "tract",
            "--steps",
            "2",
            "-o",
            common::s(&out),
        ])
        .output()
        .unwrap();
    let stderr = common::fails(output);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(errors.len(), 1, "one line of error expected:\n{stderr}");
    assert!(
        errors[0].starts_with("error: ") && errors[0].contains("the_unknown_node"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("backtrace") && !stderr.contains("rust_begin_unwind"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// A pixel-space stand-in (3 channels, ε = 0): enough to check the PNG grid.
fn pixel_model(dir: &Path) -> PathBuf {
    let mut model = Model::load(&common::fixture("negative/mlp.onnx")).unwrap();
    let mut graph = fastcache_passes::ir::Graph::new("pixels");
    let batch = || Dim::Named("batch".into());
    graph.inputs.push(ValueInfo::tensor(
        "hidden_states",
        1,
        vec![batch(), Dim::Fixed(3), Dim::Fixed(4), Dim::Fixed(5)],
    ));
    graph
        .inputs
        .push(ValueInfo::tensor("timestep", 7, vec![batch()]));
    graph.add_node(
        Node::new("Sub", &["hidden_states", "hidden_states"], &["sample"]).with_name("zero"),
    );
    graph.outputs.push(ValueInfo::tensor(
        "sample",
        1,
        vec![batch(), Dim::Fixed(3), Dim::Fixed(4), Dim::Fixed(5)],
    ));
    model.graph = graph;
    let path = dir.join("pixels.onnx");
    model.save(&path, &Storage::Inline).unwrap();
    path
}

#[test]
fn pixel_space_models_write_a_png_grid() {
    let dir = tempfile::tempdir().unwrap();
    let model = pixel_model(dir.path());
    let out = dir.path().join("grid.png");
    let output = run(
        &[
            model.to_str().unwrap(),
            "--steps",
            "2",
            "--batch",
            "3",
            "-o",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("3 image(s) in a 10x8 grid"),
        "{}",
        text(&output.stdout)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (10, 8));
    assert_eq!(info.color_type, png::ColorType::Rgb);
}

#[test]
fn a_latent_model_refuses_a_png_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let output = run(&[&dit(), "--steps", "2", "-o", out.to_str().unwrap()], None);
    assert_fails(&output, "latent-space model (4 channels)", &out);
}

#[test]
fn ort_dylib_path_to_a_non_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, "not a library").unwrap();
    let out = dir.path().join("x.npy");
    let output = run(
        &[
            &dit(),
            "--steps",
            "2",
            "--engine",
            "ort",
            "-o",
            out.to_str().unwrap(),
        ],
        Some(&fake),
    );
    assert_fails(
        &output,
        &format!("cannot load ONNX Runtime from {}", fake.display()),
        &out,
    );
    assert_fails(&output, "run scripts/setup.sh or set ORT_DYLIB_PATH", &out);

    let missing = dir.path().join("nothing-here.so");
    let output = run(
        &[
            &dit(),
            "--steps",
            "2",
            "--engine",
            "ort",
            "-o",
            out.to_str().unwrap(),
        ],
        Some(&missing),
    );
    assert_fails(&output, "which is not a file", &out);
}

/// An ONNX Runtime too old for ort: a stub library that reports version 1.20.0, built with the C
/// compiler Rust links with.
#[test]
fn an_old_onnx_runtime_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("old.c");
    std::fs::write(
        &source,
        r#"typedef struct { const void* (*GetApi)(unsigned); const char* (*GetVersionString)(void); } OrtApiBase;
static const void* get_api(unsigned v) { (void)v; return 0; }
static const char* version(void) { return "1.20.0"; }
static const OrtApiBase base = { get_api, version };
const OrtApiBase* OrtGetApiBase(void) { return &base; }
"#,
    )
    .unwrap();
    let library = dir.path().join("libonnxruntime.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("this test needs a C compiler ({cc}): {e}"));
    assert!(status.success(), "{cc} could not build the stub library");
    let out = dir.path().join("x.npy");
    let output = run(
        &[
            &dit(),
            "--steps",
            "2",
            "--engine",
            "ort",
            "-o",
            out.to_str().unwrap(),
        ],
        Some(&library),
    );
    assert_fails(
        &output,
        "expected version >= '1.31.x', but got '1.20.0'",
        &out,
    );
}

#[test]
fn no_onnx_runtime_anywhere_is_a_clear_error() {
    // A copy of the binary outside the project, run from outside it, with no ORT_DYLIB_PATH:
    // nothing to find.
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("fastcache");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_fastcache"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_fastcache"), &exe).unwrap();
    }
    let out = dir.path().join("x.npy");
    let output = Command::new(&exe)
        .current_dir(dir.path())
        .env_remove("ORT_DYLIB_PATH")
        .args([
            "run",
            &dit(),
            "--steps",
            "2",
            "--engine",
            "ort",
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_fails(
        &output,
        "ONNX Runtime library not found: run scripts/setup.sh",
        &out,
    );
}

#[test]
fn gpu_providers_that_cannot_start_are_errors_not_a_cpu_fallback() {
    let ort = common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.npy");
    for (ep, name) in [
        ("cuda", "CUDAExecutionProvider"),
        ("tensorrt", "TensorrtExecutionProvider"),
    ] {
        let output = run(
            &[
                &dit(),
                "--steps",
                "2",
                "--engine",
                "ort",
                "--ep",
                ep,
                "-o",
                out.to_str().unwrap(),
            ],
            Some(&ort),
        );
        assert_fails(
            &output,
            &format!("execution provider {name} cannot start"),
            &out,
        );
    }
    let output = run(
        &[
            &dit(),
            "--steps",
            "2",
            "--ep",
            "cuda",
            "-o",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_fails(&output, "the tract engine runs on the CPU only", &out);
}

#[test]
fn models_the_sampler_cannot_drive_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.npy");
    let mlp = common::fixture("negative/mlp.onnx").display().to_string();
    let sd3 = common::fixture("sd3_ts.onnx").display().to_string();
    let dit = dit();
    for (args, expected) in [
        (
            &[mlp.as_str()][..],
            "latent input 'x': expected float32, float16 or bfloat16 [batch, C, H, W]",
        ),
        (
            &[dit.as_str(), "--sampler", "euler"][..],
            "sampler euler does not fit a model with objective epsilon",
        ),
        (
            &[sd3.as_str(), "--class", "1"][..],
            "the model takes no class label",
        ),
        (
            &[dit.as_str(), "--class", "11"][..],
            "class id 11 is out of range",
        ),
        (&["does-not-exist.onnx"][..], "does-not-exist.onnx"),
    ] {
        let output = run(
            &[args, &["--steps", "2", "-o", out.to_str().unwrap()]].concat(),
            None,
        );
        assert_fails(&output, expected, &out);
    }
}

#[test]
fn rectified_flow_models_run_with_euler() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.npy");
    let sd3 = common::fixture("sd3_dynamo.onnx").display().to_string();
    let output = run(
        &[
            &sd3,
            "--steps",
            "3",
            "--cfg",
            "2",
            "-o",
            out.to_str().unwrap(),
        ],
        None,
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        stdout.contains("euler (flow matching), rectified_flow, 3 steps"),
        "{stdout}"
    );
    assert!(stdout.contains("timestep scale 1000"), "{stdout}");
    assert!(stdout.contains("CFG 2 (null condition: zeros)"), "{stdout}");
    // σ·1000 at σ = 1, 2/3, 1/3.
    assert!(
        stdout.contains("1000.000") || stdout.contains("  1000  "),
        "{stdout}"
    );
    assert_eq!(read_npy_f32(&out).unwrap().shape(), &[1, 4, 8, 8]);
}
