//! `fastcache inspect` as a user runs it: on every fixture, as text and JSON, and on broken files,
//! where it must name the problem and exit non-zero.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fastcache_passes::ir::{AttrValue, Model};
use fastcache_passes::onnx::Storage;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fastcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fastcache"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run fastcache")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs inspect on a broken file and returns its error message, checking it failed cleanly.
fn inspect_error(path: &Path) -> String {
    let output = fastcache(&["inspect", path.to_str().unwrap()]);
    let message = stderr(&output);
    assert!(
        !output.status.success(),
        "inspect accepted {}",
        path.display()
    );
    assert!(!message.contains("panicked"), "inspect panicked: {message}");
    assert!(
        message.starts_with("error: "),
        "unexpected output: {message}"
    );
    message
}

fn fixtures() -> Vec<PathBuf> {
    let mut all = Vec::new();
    for dir in ["models/fixtures", "models/fixtures/negative"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "onnx") {
                all.push(Path::new(dir).join(entry.file_name()));
            }
        }
    }
    all.sort();
    all
}

#[test]
fn inspect_works_on_every_fixture() {
    for fixture in fixtures() {
        let path = fixture.to_str().unwrap();
        let output = fastcache(&["inspect", path]);
        assert!(output.status.success(), "{path}: {}", stderr(&output));
        let text = String::from_utf8(output.stdout).unwrap();
        for section in [
            "inputs",
            "outputs",
            "opsets",
            "parameters",
            "operators",
            "external data",
        ] {
            assert!(text.contains(section), "{path}: no '{section}' in\n{text}");
        }
        let output = fastcache(&["inspect", path, "--json"]);
        assert!(output.status.success());
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(json["nodes"].as_u64().unwrap() > 0);
        assert!(!json["inputs"].as_array().unwrap().is_empty());
    }
}

#[test]
fn inspect_reports_external_data() {
    let output = fastcache(&["inspect", "models/fixtures/dit_ts_external.onnx", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json["external_data"][0]["location"],
        "dit_ts_external.onnx.data"
    );
    assert_eq!(json["external_data"][0]["bytes"], 118336);
}

#[test]
fn inspect_json_of_the_smallest_dit() {
    let output = fastcache(&["inspect", "models/fixtures/dit_ts.onnx", "--json"]);
    assert!(output.status.success());
    insta::assert_snapshot!(String::from_utf8(output.stdout).unwrap());
}

#[test]
fn truncated_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(repo().join("models/fixtures/dit_ts.onnx")).unwrap();
    let path = dir.path().join("truncated.onnx");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let message = inspect_error(&path);
    assert!(
        message.contains("truncated.onnx") && message.contains("not a valid ONNX model"),
        "{message}"
    );
}

#[test]
fn a_file_that_is_not_onnx_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.onnx");
    std::fs::write(&path, "these are not the weights you are looking for\n").unwrap();
    let message = inspect_error(&path);
    assert!(
        message.contains("notes.onnx") && message.contains("not"),
        "{message}"
    );
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, "").unwrap();
    assert!(inspect_error(&empty).contains("empty"));
    assert!(inspect_error(&dir.path().join("missing.onnx")).contains("missing.onnx"));
}

#[test]
fn missing_or_short_external_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("dit_ts_external.onnx");
    std::fs::copy(repo().join("models/fixtures/dit_ts_external.onnx"), &model).unwrap();
    let message = inspect_error(&model);
    assert!(
        message.contains("dit_ts_external.onnx.data") && message.contains("tensor"),
        "{message}"
    );

    let data = std::fs::read(repo().join("models/fixtures/dit_ts_external.onnx.data")).unwrap();
    std::fs::write(
        dir.path().join("dit_ts_external.onnx.data"),
        &data[..data.len() - 100],
    )
    .unwrap();
    let message = inspect_error(&model);
    assert!(message.contains("has only"), "{message}");
}

/// Loads a fixture, breaks it with `edit`, and saves the broken copy.
fn broken_copy(dir: &Path, edit: impl FnOnce(&mut Model)) -> PathBuf {
    let mut model = Model::load(&repo().join("models/fixtures/dit_ts.onnx")).unwrap();
    edit(&mut model);
    let path = dir.join("broken.onnx");
    model.save(&path, &Storage::Inline).unwrap();
    path
}

#[test]
fn a_value_used_but_never_defined_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = broken_copy(dir.path(), |model| {
        let (id, _) = model
            .graph
            .nodes()
            .find(|(_, n)| n.op_type == "MatMul")
            .unwrap();
        model
            .graph
            .update_node(id, |node| node.inputs[0] = "ghost".into());
    });
    let message = inspect_error(&path);
    assert!(
        message.contains("reads 'ghost', which nothing defines"),
        "{message}"
    );
    assert!(message.contains("MatMul"), "{message}");
}

#[test]
fn an_unknown_attribute_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = broken_copy(dir.path(), |model| {
        let (id, _) = model
            .graph
            .nodes()
            .find(|(_, n)| n.op_type == "Softmax")
            .unwrap();
        model
            .graph
            .update_node(id, |node| node.attributes[0].value = AttrValue::Int(1));
    });
    // Patch the attribute's type code in the encoded bytes: the IR cannot express an unknown type.
    let mut proto = fastcache_passes::onnx::load_model(&path).unwrap().proto;
    let node = proto
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.op_type() == "Softmax")
        .unwrap();
    node.attribute[0].r#type = Some(99);
    let name = node.name().to_string();
    std::fs::write(&path, prost::Message::encode_to_vec(&proto)).unwrap();
    let message = inspect_error(&path);
    assert!(
        message.contains("unknown attribute type 99") && message.contains(&name),
        "{message}"
    );
}
