//! Both engines on every fixture: each agrees with the PyTorch reference saved beside the model
//! and with the other engine.

mod common;

use fastcache::engine::{self, Engine, EngineKind, Options, TensorMap, read_npz};

/// Max |difference| allowed between an engine and PyTorch's float32 output, and between the two
/// engines. The fixtures' export script checks ONNX Runtime against PyTorch to the same bound.
const TOLERANCE: f64 = 1e-4;

fn inputs_and_reference(model: &std::path::Path) -> (TensorMap, fastcache::engine::Tensor) {
    let mut npz = read_npz(&model.with_extension("npz")).unwrap();
    let reference = npz
        .remove("output")
        .expect("the .npz has an 'output' array");
    (npz, reference)
}

fn output_of(engine: &mut dyn Engine, inputs: &TensorMap) -> fastcache::engine::Tensor {
    let name = engine.spec().outputs[0].name.clone();
    let mut outputs = engine.run(inputs).unwrap();
    outputs.remove(&name).unwrap()
}

#[test]
fn both_engines_match_the_reference_on_every_fixture() {
    common::require_ort();
    let mut report = Vec::new();
    for model in common::fixtures_with_reference() {
        let (inputs, reference) = inputs_and_reference(&model);
        let mut results = Vec::new();
        for kind in [EngineKind::Tract, EngineKind::Ort] {
            let mut engine = engine::open(kind, &model, &Options::default())
                .unwrap_or_else(|e| panic!("{kind:?} cannot load {}: {e:#}", model.display()));
            let output = output_of(engine.as_mut(), &inputs);
            let diff = output.max_abs_diff(&reference).unwrap_or_else(|| {
                panic!(
                    "{kind:?} on {}: output {} but reference {}",
                    model.display(),
                    output.describe(),
                    reference.describe()
                )
            });
            report.push(format!(
                "{} {kind:?} vs reference: {diff:.2e}",
                common::name_of(&model)
            ));
            assert!(
                diff <= TOLERANCE,
                "{kind:?} on {}: max |diff| to the reference {diff:e} > {TOLERANCE:e}",
                model.display()
            );
            results.push(output);
        }
        let between = results[0].max_abs_diff(&results[1]).unwrap();
        report.push(format!(
            "{} tract vs ort: {between:.2e}",
            common::name_of(&model)
        ));
        assert!(
            between <= TOLERANCE,
            "{}: engines differ by {between:e}",
            model.display()
        );
    }
    eprintln!("{}", report.join("\n"));
}

/// Exporters sometimes name one dim differently in `value_info` than on the inputs (`s47` for
/// `batch`); tract cannot unify the two, so the engine plans without `value_info`.
#[test]
fn tract_runs_a_model_whose_value_info_names_the_batch_differently() {
    use fastcache_passes::ir::{Dim, Model, ValueInfo};
    let source = common::fixture("dit_dynamo.onnx");
    let mut model = Model::load(&source).unwrap();
    let renamed: Vec<ValueInfo> = model
        .graph
        .value_info
        .iter()
        .map(|v| match (v.elem_type(), v.dims()) {
            (Some(elem), Some(dims)) => ValueInfo::tensor(
                &v.name,
                elem,
                dims.into_iter()
                    .map(|d| match d {
                        Dim::Named(n) if n == "batch" => Dim::Named("s47".into()),
                        other => other,
                    })
                    .collect(),
            ),
            _ => v.clone(),
        })
        .collect();
    model.graph.value_info = renamed;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("renamed.onnx");
    model
        .save(&path, &fastcache_passes::onnx::Storage::Inline)
        .unwrap();
    let mut engine = fastcache::engine::tract::TractEngine::load(&path).unwrap();
    let (inputs, reference) = inputs_and_reference(&source);
    let output = output_of(&mut engine, &inputs);
    assert!(output.max_abs_diff(&reference).unwrap() <= TOLERANCE);
    assert_eq!(
        engine.plan().as_deref(),
        Some("input shapes pinned, value_info ignored")
    );
}
