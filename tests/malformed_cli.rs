//! A corpus of malformed model files, each made from a fixture by one defect, as a user might
//! meet them: `inspect` and `rewrite` must exit non-zero with one line of error that names the
//! file and the tensor or node at fault, leave no output, and leave the input as it was.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, fastcache, s};
use fastcache_passes::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, tensor_shape_proto,
    type_proto,
};
use prost::Message;

fn fixture_proto(name: &str) -> ModelProto {
    let bytes = std::fs::read(common::fixture(name)).unwrap();
    ModelProto::decode(bytes.as_slice()).unwrap()
}

fn graph(model: &mut ModelProto) -> &mut GraphProto {
    model.graph.as_mut().unwrap()
}

/// The name of the first initializer with at least two dims, and the model.
fn with_weight(
    edit: impl FnOnce(&mut fastcache_passes::onnx::TensorProto),
) -> (ModelProto, String) {
    let mut model = fixture_proto("dit_ts.onnx");
    let tensor = graph(&mut model)
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() >= 2)
        .unwrap();
    let name = tensor.name().to_string();
    edit(tensor);
    (model, name)
}

/// A node (by index) that reads the first output of an earlier node, and that earlier node.
fn producer_and_consumer(model: &ModelProto) -> (usize, usize) {
    let nodes = &model.graph.as_ref().unwrap().node;
    for (j, consumer) in nodes.iter().enumerate() {
        for (i, producer) in nodes[..j].iter().enumerate() {
            if producer
                .output
                .first()
                .is_some_and(|o| consumer.input.contains(o))
            {
                return (i, j);
            }
        }
    }
    unreachable!("a DiT has chains of nodes")
}

fn node_name(model: &ModelProto, index: usize) -> String {
    model.graph.as_ref().unwrap().node[index].name().to_string()
}

/// An `If` nested `depth` deep, each branch holding the next.
fn nested_if(depth: usize) -> NodeProto {
    let mut node = NodeProto {
        op_type: Some("Identity".into()),
        input: vec!["hidden_states".into()],
        output: vec!["deep".into()],
        ..NodeProto::default()
    };
    for _ in 0..depth {
        let body = GraphProto {
            name: Some("body".into()),
            node: vec![node],
            ..GraphProto::default()
        };
        node = NodeProto {
            op_type: Some("If".into()),
            input: vec!["hidden_states".into()],
            output: vec!["deep".into()],
            attribute: vec![AttributeProto {
                name: Some("then_branch".into()),
                r#type: Some(5),
                g: Some(body),
                ..AttributeProto::default()
            }],
            ..NodeProto::default()
        };
    }
    node
}

/// Each case: a file name, its bytes (and an extra file beside it), and what the error must name.
fn corpus(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut cases: Vec<(&str, Vec<u8>, String)> = Vec::new();
    let original = std::fs::read(common::fixture("dit_ts.onnx")).unwrap();
    cases.push((
        "truncated.onnx",
        original[..original.len() / 2].to_vec(),
        String::new(),
    ));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    cases.push(("random.onnx", random, String::new()));

    let (model, name) = with_weight(|t| t.dims[0] += 1);
    cases.push((
        "wrong_dims.onnx",
        model.encode_to_vec(),
        format!("tensor '{name}'"),
    ));
    let (model, name) = with_weight(|t| t.dims = vec![1 << 40, 1 << 40, 1 << 40]);
    cases.push((
        "huge_dims.onnx",
        model.encode_to_vec(),
        format!("tensor '{name}'"),
    ));
    let (model, name) = with_weight(|t| t.dims[0] = -t.dims[0]);
    cases.push((
        "negative_dims.onnx",
        model.encode_to_vec(),
        format!("tensor '{name}'"),
    ));

    let mut model = fixture_proto("dit_ts.onnx");
    let input = &mut graph(&mut model).input[0];
    let name = input.name().to_string();
    let Some(type_proto::Value::TensorType(tensor)) =
        input.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        unreachable!()
    };
    tensor.shape.as_mut().unwrap().dim[1].value =
        Some(tensor_shape_proto::dimension::Value::DimValue(-4));
    cases.push((
        "negative_input_dim.onnx",
        model.encode_to_vec(),
        format!("graph input '{name}'"),
    ));

    // External data: missing, and pointing outside the model's folder.
    let external = fixture_proto("dit_ts_external.onnx");
    let first_external = external
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.is_external())
        .unwrap()
        .name()
        .to_string();
    cases.push((
        "missing_data.onnx",
        external.encode_to_vec(),
        format!("tensor '{first_external}'"),
    ));
    let mut model = external.clone();
    for tensor in &mut graph(&mut model).initializer {
        for entry in &mut tensor.external_data {
            if entry.key.as_deref() == Some("location") {
                *entry = StringStringEntryProto::new("location", "../outside.data");
            }
        }
    }
    cases.push((
        "escaping_data.onnx",
        model.encode_to_vec(),
        format!("tensor '{first_external}'"),
    ));

    // Graph structure: a read of nothing, a cycle, two producers of one value, deep nesting.
    let mut model = fixture_proto("dit_ts.onnx");
    let (i, j) = producer_and_consumer(&model);
    let consumer = node_name(&model, j);
    graph(&mut model).node[j].input[0] = "nothing_makes_this".into();
    cases.push((
        "dangling.onnx",
        model.encode_to_vec(),
        format!("{consumer}"),
    ));
    let mut model = fixture_proto("dit_ts.onnx");
    let cyclic = node_name(&model, i);
    let looped = graph(&mut model).node[j].output[0].clone();
    graph(&mut model).node[i].input[0] = looped;
    cases.push(("cycle.onnx", model.encode_to_vec(), format!("{cyclic}")));
    let mut model = fixture_proto("dit_ts.onnx");
    let twice = graph(&mut model).node[i].output[0].clone();
    graph(&mut model).node[j].output[0] = twice.clone();
    cases.push((
        "duplicate_producer.onnx",
        model.encode_to_vec(),
        format!("'{twice}'"),
    ));
    let mut model = fixture_proto("dit_ts.onnx");
    graph(&mut model).node.push(nested_if(200));
    cases.push(("deep.onnx", model.encode_to_vec(), String::new()));

    cases
        .into_iter()
        .map(|(file, bytes, named)| {
            let path = dir.join(file);
            std::fs::write(&path, bytes).unwrap();
            (path, named)
        })
        .collect()
}

#[test]
fn malformed_files_get_one_line_naming_the_file_and_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    for (path, named) in corpus(dir.path()) {
        let before = std::fs::read(&path).unwrap();
        let out = dir.path().join("out.onnx");
        for command in [
            vec!["inspect", s(&path)],
            vec!["rewrite", s(&path), "-o", s(&out)],
        ] {
            let stderr = fails(fastcache(&command));
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let case = format!("{} {}", command[0], path.display());
            assert_eq!(lines.len(), 1, "{case}: one line expected:\n{stderr}");
            assert!(lines[0].starts_with("error: "), "{case}: {stderr}");
            assert!(
                lines[0].contains(s(&path)),
                "{case}: the file is not named: {stderr}"
            );
            assert!(
                lines[0].contains(&named),
                "{case}: '{named}' is not named: {stderr}"
            );
            assert!(!out.exists(), "{case}: an output was left");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                before,
                "{case}: the input changed"
            );
        }
    }
}
