//! The pass manager and the `expose` pass: block boundaries made graph outputs, checked by an
//! independent host (the ONNX checker and ONNX Runtime, through scripts/ort_check.py).

mod common;

use fastcache_passes::analysis::synthetic::SyntheticDit;
use fastcache_passes::analysis::{DitStack, discover};
use fastcache_passes::expose::Expose;
use fastcache_passes::ir::{Model, Node, text};
use fastcache_passes::onnx::Storage;
use fastcache_passes::pass::{Pass, PassManager, PassReport, run_pass};
use fastcache_passes::{Error, Result};

const SINGLE_STREAM: [&str; 5] = [
    "dit_ts.onnx",
    "dit_dynamo.onnx",
    "dit_ts_external.onnx",
    "pixart_ts.onnx",
    "pixart_dynamo.onnx",
];

fn stack_of(model: &Model) -> DitStack {
    discover(model)
        .unwrap()
        .single_stream("the test")
        .unwrap()
        .clone()
}

#[test]
fn exposed_block_boundaries_run_in_onnx_runtime_and_keep_the_outputs() {
    for name in SINGLE_STREAM {
        let path = common::fixture(name);
        let mut model = Model::load(&path).unwrap();
        let original_outputs: Vec<String> =
            model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        let stack = stack_of(&model);
        let boundaries = stack.boundaries();
        assert_eq!(boundaries.len(), stack.blocks.len() + 1);

        let report = run_pass(&mut model, &Expose::block_boundaries(&stack)).unwrap();
        assert_eq!(report.outputs_added, boundaries, "{name}");
        assert_eq!(
            (
                report.nodes_added,
                report.nodes_removed,
                report.nodes_changed
            ),
            (0, 0, 0)
        );
        assert!(report.inputs_added.is_empty() && report.outputs_removed.is_empty());
        let outputs: Vec<String> = model.graph.outputs.iter().map(|o| o.name.clone()).collect();
        assert_eq!(
            outputs[..original_outputs.len()],
            original_outputs[..],
            "{name}: original outputs first"
        );
        // Every exposed output is typed [batch, N, D].
        for b in &boundaries {
            let info = model.graph.outputs.iter().find(|o| o.name == *b).unwrap();
            let dims: Vec<String> = info.dims().unwrap().iter().map(|d| d.to_string()).collect();
            assert_eq!(dims, ["batch", "16", "16"], "{name}: type of {b}");
        }

        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join(name);
        model.save(&saved, &Storage::Inline).unwrap();
        let npz = common::reference_npz(&path).unwrap();
        let result = common::ort_check(&saved, &npz, true);
        let diff = result["max_abs_diff"].as_f64().unwrap();
        assert!(diff < 1e-4, "{name}: the original output changed by {diff}");
        let shapes = result["outputs"].as_object().unwrap();
        assert_eq!(
            shapes.len(),
            original_outputs.len() + boundaries.len(),
            "{name}"
        );
        for b in &boundaries {
            assert_eq!(
                shapes[b],
                serde_json::json!([2, 16, 16]),
                "{name}: shape of exposed {b}"
            );
        }
    }
}

#[test]
fn expose_on_a_synthetic_dit() {
    let mut model = SyntheticDit::tiny(2).build();
    let stack = stack_of(&model);
    let report = run_pass(&mut model, &Expose::block_boundaries(&stack)).unwrap();
    let header = text::print_graph(&model.graph)
        .lines()
        .next()
        .unwrap()
        .to_string();
    insta::assert_snapshot!(format!("{report}\n{header}"));
}

/// The synthetic DiT (the graph the 28-block timing uses, here with real weights) is valid ONNX
/// and runs, exposed boundaries included: the checker and ONNX Runtime on random inputs.
#[test]
fn the_synthetic_dit_passes_the_checker_and_runs() {
    let mut model = SyntheticDit::tiny(2).build();
    let stack = stack_of(&model);
    run_pass(&mut model, &Expose::block_boundaries(&stack)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.onnx");
    model.save(&path, &Storage::Inline).unwrap();
    let script = r#"
import json, sys
import numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(sys.argv[1], full_check=True)
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {"hidden_states": rng.standard_normal((3, 4, 8, 8), dtype=np.float32),
         "timestep": np.array([1, 500, 999], dtype=np.int64),
         "class_labels": np.array([0, 3, 10], dtype=np.int64)}
outs = s.run(None, feeds)
assert all(np.isfinite(o).all() for o in outs)
print(json.dumps({o.name: list(r.shape) for o, r in zip(s.get_outputs(), outs)}))
"#;
    let output = std::process::Command::new(common::python())
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shapes: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shapes["sample"], serde_json::json!([3, 8, 8, 8]));
    for b in stack.boundaries() {
        assert_eq!(shapes[&b], serde_json::json!([3, 16, 16]), "{b}");
    }
}

#[test]
fn exposing_twice_changes_nothing_the_second_time() {
    let mut model = Model::load(&common::fixture("dit_dynamo.onnx")).unwrap();
    let stack = stack_of(&model);
    let reports = PassManager::new()
        .with(Expose::block_boundaries(&stack))
        .with(Expose::block_boundaries(&stack))
        .run(&mut model)
        .unwrap();
    assert_eq!(reports[0].outputs_added.len(), 4);
    assert!(reports[1].is_empty(), "{}", reports[1]);
    assert_eq!(reports[1].to_string(), "expose: no change");
    // The exposed model is still the same DiT: discovery ignores outputs that are also read inside.
    let again = stack_of(&model);
    assert_eq!(again.boundaries(), stack.boundaries());
    assert_eq!(model.graph.outputs.len(), 5);
}

#[test]
fn exposing_an_unknown_value_fails_and_leaves_the_model_unchanged() {
    let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
    let before = text::print_model(&model);
    let error = run_pass(&mut model, &Expose::new(["no_such_value"])).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("pass 'expose'") && message.contains("'no_such_value'"),
        "{message}"
    );
    assert_eq!(text::print_model(&model), before);
}

/// A pass that breaks the graph: a node reading a value nothing defines.
struct Breaker;

impl Pass for Breaker {
    fn name(&self) -> &str {
        "breaker"
    }
    fn run(&self, model: &mut Model) -> Result<()> {
        model
            .graph
            .add_node(Node::new("Relu", &["ghost"], &["broken"]));
        Ok(())
    }
}

/// A pass that fails outright after changing the model.
struct Failing;

impl Pass for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    fn run(&self, model: &mut Model) -> Result<()> {
        model.graph.outputs.clear();
        Err(Error::Unsupported("not today".into()))
    }
}

#[test]
fn a_pass_that_breaks_the_graph_is_refused_and_undone() {
    let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
    let before = text::print_model(&model);
    let message = run_pass(&mut model, &Breaker).unwrap_err().to_string();
    assert!(
        message.contains("after pass 'breaker'") && message.contains("ghost"),
        "{message}"
    );
    assert_eq!(text::print_model(&model), before);

    let message = run_pass(&mut model, &Failing).unwrap_err().to_string();
    assert_eq!(message, "pass 'failing': not today");
    assert_eq!(text::print_model(&model), before);
}

#[test]
fn pass_reports_count_what_changed() {
    struct AddRelu;
    impl Pass for AddRelu {
        fn name(&self) -> &str {
            "add-relu"
        }
        fn run(&self, model: &mut Model) -> Result<()> {
            let x = model.graph.outputs[0].name.clone();
            model
                .graph
                .add_node(Node::new("Relu", &[&x], &["relu_out"]));
            let mut info = model.graph.outputs[0].clone();
            info.name = "relu_out".into();
            model.graph.outputs.push(info);
            Ok(())
        }
    }
    let mut model = SyntheticDit::tiny(1).build();
    let report = run_pass(&mut model, &AddRelu).unwrap();
    assert_eq!(
        report,
        PassReport {
            pass: "add-relu".into(),
            nodes_added: 1,
            outputs_added: vec!["relu_out".into()],
            ..PassReport::default()
        }
    );
    assert_eq!(
        report.to_string(),
        "add-relu: 1 nodes added; outputs added: relu_out"
    );
}
