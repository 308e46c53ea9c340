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
    // The float16 fixtures are checked against PyTorch in passes/tests/roundtrip.rs (their .npz
    // holds float16 arrays, which the host's .npz reader does not take) and run by
    // tests/cache_cli.rs on ONNX Runtime; tract 0.23.9 does not run their float16 Gemm.
    let float32 = common::fixtures_with_reference()
        .into_iter()
        .filter(|m| !common::name_of(m).ends_with("_f16"));
    for model in float32 {
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

/// The ONNX Runtime engine keeps cross-step state in two sets of buffers allocated once per
/// run and alternates between them (ping-pong); tract keeps it on the host. On a rewrite whose
/// state outputs are computed from other state inputs (the per-block forecast shifts each
/// snapshot into the next, and from step 3 every block is forced to skip), both give the same
/// outputs and the same state after every call, and starting again starts afresh. The model's
/// host split on ONNX Runtime (fixed buffers for every segment value from a run's second call,
/// state ping-pong between them) gives the single graph's outputs and state at every call.
#[test]
fn ort_state_ping_pong_matches_the_host_state_of_tract_and_the_split_matches_both() {
    use fastcache::sampler::state::StateLoop;
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let model = dir.path().join("forecast.onnx");
    let split = dir.path().join("forecast_split");
    common::ok(common::fastcache(&[
        "rewrite",
        common::s(&original),
        "-o",
        common::s(&model),
        "--force-skip",
        "--forecast",
        "2",
        "--warmup",
        "3",
        "--split",
        common::s(&split),
    ]));
    let (mut inputs, _) = inputs_and_reference(&original);
    let mut engines: Vec<Box<dyn Engine>> = [EngineKind::Tract, EngineKind::Ort]
        .into_iter()
        .map(|kind| engine::open(kind, &model, &Options::default()).unwrap())
        .collect();
    // The host split on ONNX Runtime: its fixed buffers and their two bindings from the second
    // call of each run on.
    let spec = engines[1].spec().clone();
    engines.push(engine::split::open(EngineKind::Ort, &split, spec, &Options::default()).unwrap());
    let state = StateLoop::from_spec(engines[0].spec()).unwrap();
    for run in 0..2 {
        for engine in engines.iter_mut() {
            state.start(engine.as_mut(), &inputs).unwrap();
        }
        for step in 0..6 {
            let mut outputs = Vec::new();
            for engine in engines.iter_mut() {
                let mut out = engine.run(&inputs).unwrap();
                let stats = state.take_stats(&mut out);
                outputs.push((out, stats, engine.state().unwrap()));
            }
            // The split computes what the single graph computes, call after call.
            let ((b, stats_b, state_b), (c, stats_c, state_c)) = (&outputs[1], &outputs[2]);
            assert_eq!(stats_b, stats_c, "run {run} step {step}");
            for (mine, theirs, what) in [(b, c, "output"), (state_b, state_c, "state")] {
                assert_eq!(mine.len(), theirs.len(), "{what}");
                for (name, value) in mine.iter() {
                    let diff = value.max_abs_diff(theirs.get(name).unwrap()).unwrap();
                    assert!(
                        diff <= 1e-6,
                        "run {run} step {step}: split {what} '{name}' differs by {diff}"
                    );
                }
            }
            let ((a, stats_a, state_a), (b, stats_b, state_b)) = (&outputs[0], &outputs[1]);
            let skipped = stats_b.get("fastcache.skipped").unwrap().to_f64_vec();
            assert_eq!(
                skipped,
                vec![if step >= 3 { 1.0 } else { 0.0 }; 3],
                "run {run} step {step}"
            );
            assert_eq!(stats_a, stats_b, "run {run} step {step}");
            for (name, value) in a.iter() {
                let diff = value.max_abs_diff(b.get(name).unwrap()).unwrap();
                assert!(
                    diff < 1e-4,
                    "run {run} step {step}: '{name}' differs by {diff}"
                );
            }
            assert_eq!(state_a.len(), state_b.len());
            for (name, value) in state_a.iter() {
                let diff = value.max_abs_diff(state_b.get(name).unwrap()).unwrap();
                assert!(
                    diff < 1e-4,
                    "run {run} step {step}: state '{name}' differs by {diff}"
                );
            }
            // The next step's latent moves as a sampler's would.
            let prediction = a.get("sample").unwrap().clone().into_f32().unwrap();
            let latent = inputs
                .get("hidden_states")
                .unwrap()
                .clone()
                .into_f32()
                .unwrap();
            let channels = latent.shape()[1];
            let moved = &latent
                - &(prediction
                    .slice(ndarray::s![.., ..channels, .., ..])
                    .to_owned()
                    * 0.1);
            inputs.insert("hidden_states", engine::Tensor::F32(moved));
        }
    }
}

/// bfloat16 through ONNX Runtime's engine: the host's float32 inputs are rounded to the model's
/// bfloat16 at its boundary, bfloat16 outputs come back as such and widen exactly, and bfloat16
/// state rides the IoBinding ping-pong. (The model keeps to the ops ONNX Runtime's CPU provider
/// runs in bfloat16, Cast; a bfloat16 DiT needs a GPU provider, having no CPU kernels for MatMul,
/// Add or Mul.) tract, which has no bfloat16, refuses the model by name.
#[test]
fn bfloat16_inputs_outputs_and_state_cross_the_onnx_runtime_boundary() {
    use fastcache::engine::{DType, StateSlot, Tensor};
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("bf16_accumulate.onnx");
    // y = s' = bf16(f32(x) + f32(s)): each call adds x to the state.
    let script = r#"
import sys, onnx
from onnx import helper, TensorProto as T
nodes = [
    helper.make_node("Cast", ["x"], ["xf"], to=T.FLOAT),
    helper.make_node("Cast", ["s"], ["sf"], to=T.FLOAT),
    helper.make_node("Add", ["xf", "sf"], ["sum"]),
    helper.make_node("Cast", ["sum"], ["y"], to=T.BFLOAT16),
    helper.make_node("Cast", ["sum"], ["s_next"], to=T.BFLOAT16),
]
value = lambda name: helper.make_tensor_value_info(name, T.BFLOAT16, ["batch", 3])
graph = helper.make_graph(nodes, "accumulate", [value("x"), value("s")], [value("y"), value("s_next")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
"#;
    let made = std::process::Command::new(common::python())
        .args(["-c", script])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let mut ort = engine::open(EngineKind::Ort, &model, &Options::default()).unwrap();
    assert_eq!(ort.spec().inputs[0].dtype, Some(DType::BF16));
    ort.bind_state(vec![StateSlot {
        input: "s".into(),
        output: "s_next".into(),
        initial: Tensor::zeros(DType::BF16, &[2, 3]),
    }])
    .unwrap();
    // 1.00390625 is not a bfloat16 (8 bits of mantissa): the boundary rounds it to 1.0.
    let x = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 3]), 1.00390625f32);
    let mut inputs = TensorMap::new();
    inputs.insert("x", Tensor::F32(x));
    for call in 1..=3 {
        let mut out = ort.run(&inputs).unwrap();
        let y = out.remove("y").unwrap();
        assert_eq!(y.dtype(), DType::BF16, "call {call}");
        let widened = y.into_f32().unwrap();
        assert!(
            widened.iter().all(|&v| v == call as f32),
            "call {call}: {widened:?}"
        );
        let state = ort.state().unwrap();
        assert_eq!(state.get("s").unwrap().dtype(), DType::BF16);
        assert_eq!(state.get("s").unwrap().to_f64_vec(), vec![call as f64; 6]);
    }

    // The host split's runner copies inputs with ort's tensor copy, which has no bfloat16: it
    // refuses rather than fail at the second call. (A split of this one-segment model.)
    let split = dir.path().join("split");
    std::fs::create_dir(&split).unwrap();
    std::fs::copy(&model, split.join("segment_0.onnx")).unwrap();
    let manifest = serde_json::json!({
        "version": fastcache_passes::split::MANIFEST_VERSION,
        "inputs": ["x", "s"],
        "outputs": ["y", "s_next"],
        "segments": [{"kind": "graph", "file": "segment_0.onnx"}],
        "metadata": {},
    });
    std::fs::write(split.join("manifest.json"), manifest.to_string()).unwrap();
    let spec = ort.spec().clone();
    let error = match engine::split::open(EngineKind::Ort, &split, spec, &Options::default()) {
        Ok(_) => panic!("the split runner took a bfloat16 model"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("'x' is bfloat16"), "{error}");

    let error = match engine::open(EngineKind::Tract, &model, &Options::default()) {
        Ok(_) => panic!("tract loaded a bfloat16 model"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("'x' is bfloat16"), "{error}");
    assert!(error.contains("--engine ort"), "{error}");
}
