//! Samplers against an independent Python DDIM (tests/data/ddim_reference.py), classifier-free
//! guidance, the host-contract state loop, and the errors a user can run into.

mod common;

use std::path::Path;

use fastcache::engine::{self, Engine, EngineKind, Options, Tensor, TensorMap, read_npz};
use fastcache::sampler::{
    self, Conditioning, SampleOptions, SamplerKind, SamplerMeta, SamplerSetup, Settings, Trajectory,
};
use fastcache_passes::contract::{CONTRACT_VERSION, Contract, METADATA_KEY, ShapeDim, StatePair};
use fastcache_passes::ir::{AttrValue, Dim, Model, Node, ValueInfo};
use fastcache_passes::onnx::Storage;
use ndarray::{ArrayD, Axis};

/// Trajectories are compared relative to their scale: the fixtures have random weights, so their
/// DDIM latents grow to a few hundred, where f32 itself only resolves about 3e-5. Per-call
/// differences between ONNX Runtime in Rust, in Python and tract are below 2e-6 (tests/engines.rs).
const TRAJECTORY_TOLERANCE: f64 = 1e-5;

fn relative_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(1.0f64, |m, &v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

fn open(kind: EngineKind, model: &Path) -> Box<dyn Engine> {
    if kind == EngineKind::Ort {
        common::require_ort();
    }
    engine::open(kind, model, &Options::default())
        .unwrap_or_else(|e| panic!("{kind:?} cannot load {}: {e:#}", model.display()))
}

fn setup_for(engine: &dyn Engine, model: &Path, settings: &Settings) -> SamplerSetup {
    let ir = Model::load(model).unwrap();
    SamplerSetup::new(engine.spec(), Some(&ir), settings).unwrap()
}

fn run(
    engine: &mut dyn Engine,
    setup: &SamplerSetup,
    x: ArrayD<f32>,
    conditioning: &Conditioning,
    seed: u64,
) -> Trajectory {
    let mut rng = sampler::rng(seed);
    sampler::sample(
        engine,
        setup,
        x,
        conditioning,
        &mut rng,
        &SampleOptions {
            record_history: true,
        },
        &mut |_| {},
    )
    .unwrap()
}

struct Reference {
    x_t: ArrayD<f32>,
    labels: Vec<i64>,
    null_class: i64,
    cfg: f32,
    plain: ArrayD<f32>,
    guided: ArrayD<f32>,
}

fn reference() -> Reference {
    let mut npz = read_npz(&common::root().join("tests/data/ddim_reference.npz")).unwrap();
    let mut f32_of = |name: &str| npz.remove(name).unwrap().into_f32().unwrap();
    let x_t = f32_of("x_t");
    let plain = f32_of("plain_history");
    let guided = f32_of("cfg_history");
    let cfg = f32_of("cfg_scale").into_iter().next().unwrap();
    let Some(Tensor::I64(labels)) = npz.remove("class_labels") else {
        panic!("class_labels is int64")
    };
    let Some(Tensor::I64(null)) = npz.remove("null_class") else {
        panic!("null_class is int64")
    };
    Reference {
        x_t,
        labels: labels.into_iter().collect(),
        null_class: null.into_iter().next().unwrap(),
        cfg,
        plain,
        guided,
    }
}

fn ddim_against_python(kind: EngineKind) {
    let model = common::fixture("dit_ts.onnx");
    let r = reference();
    let mut engine = open(kind, &model);
    for (guidance, expected) in [(None, &r.plain), (Some(r.cfg), &r.guided)] {
        let settings = Settings {
            kind: Some(SamplerKind::Ddim),
            steps: 10,
            guidance,
            overrides: SamplerMeta {
                null_class: Some(r.null_class),
                ..Default::default()
            },
        };
        let setup = setup_for(engine.as_ref(), &model, &settings);
        let conditioning = Conditioning {
            class_labels: Some(r.labels.clone()),
            conditions: TensorMap::new(),
            ..Default::default()
        };
        let trajectory = run(engine.as_mut(), &setup, r.x_t.clone(), &conditioning, 0);
        assert_eq!(trajectory.steps.len(), 10);
        let timesteps: Vec<f64> = trajectory.steps.iter().map(|s| s.timestep).collect();
        assert_eq!(
            timesteps,
            [999., 899., 799., 699., 599., 499., 399., 299., 199., 99.]
        );
        for (k, x) in trajectory.history.iter().enumerate() {
            let diff = relative_diff(x, &expected.index_axis(Axis(0), k).to_owned());
            assert!(
                diff <= TRAJECTORY_TOLERANCE,
                "{kind:?}, guidance {guidance:?}: step {} differs from Python by {diff:e} (relative)",
                k + 1
            );
        }
        let last = expected.index_axis(Axis(0), 9).to_owned();
        eprintln!(
            "{kind:?} guidance {guidance:?}: final relative diff {:e}",
            relative_diff(&trajectory.latents, &last)
        );
    }
}

#[test]
fn ddim_matches_the_python_reference_with_onnx_runtime() {
    ddim_against_python(EngineKind::Ort);
}

#[test]
fn ddim_matches_the_python_reference_with_tract() {
    ddim_against_python(EngineKind::Tract);
}

/// Runs one of the independent Python references (`script --output FILE.npz`) with the project's
/// Python and reads what it wrote.
fn python_reference(script: &str, dir: &Path) -> TensorMap {
    let python = common::python();
    let output = dir.join("reference.npz");
    let status = std::process::Command::new(&python)
        .arg(common::root().join(script))
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&python).display()));
    assert!(status.success(), "{script} failed");
    read_npz(&output).unwrap()
}

/// The committed reference is what the script computes: rerun it with the project's Python.
#[test]
fn python_reference_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = python_reference("tests/data/ddim_reference.py", dir.path());
    let committed = read_npz(&common::root().join("tests/data/ddim_reference.npz")).unwrap();
    assert_eq!(
        fresh.names().collect::<Vec<_>>(),
        committed.names().collect::<Vec<_>>()
    );
    for (name, tensor) in committed.iter() {
        let diff = tensor.max_abs_diff(fresh.get(name).unwrap()).unwrap();
        assert!(
            diff <= 1e-6,
            "'{name}' differs from a fresh run by {diff:e}"
        );
    }
}

fn cfg_one_equals_no_cfg(kind: EngineKind, fixture: &str, classes: &[i64]) {
    let model = common::fixture(fixture);
    let mut engine = open(kind, &model);
    let mut results = Vec::new();
    for guidance in [None, Some(1.0)] {
        let settings = Settings {
            steps: 4,
            guidance,
            ..Default::default()
        };
        let setup = setup_for(engine.as_ref(), &model, &settings);
        let mut rng = sampler::rng(7);
        let x = sampler::standard_normal(&mut rng, &setup.latent_shape(2));
        let conditioning =
            Conditioning::build(&setup, 2, classes, TensorMap::new(), &mut rng).unwrap();
        results.push(run(engine.as_mut(), &setup, x, &conditioning, 7).latents);
    }
    let diff = relative_diff(&results[1], &results[0]);
    assert!(
        diff <= TRAJECTORY_TOLERANCE,
        "{kind:?} {fixture}: CFG 1 differs from no CFG by {diff:e}"
    );
}

#[test]
fn cfg_scale_one_equals_no_cfg_class_conditional() {
    cfg_one_equals_no_cfg(EngineKind::Ort, "dit_ts.onnx", &[1, 5]);
    cfg_one_equals_no_cfg(EngineKind::Tract, "dit_dynamo.onnx", &[1, 5]);
}

#[test]
fn cfg_scale_one_equals_no_cfg_text_conditional() {
    cfg_one_equals_no_cfg(EngineKind::Ort, "pixart_ts.onnx", &[]);
    cfg_one_equals_no_cfg(EngineKind::Tract, "pixart_dynamo.onnx", &[]);
}

/// Every sampler on every family, on both engines, from the same seed: same results.
#[test]
fn engines_agree_on_every_sampler() {
    let cases: [(&str, SamplerKind, Option<f32>, &[i64]); 7] = [
        ("dit_ts.onnx", SamplerKind::Ddpm, Some(3.0), &[2]),
        ("pixart_dynamo.onnx", SamplerKind::Ddim, Some(2.0), &[]),
        ("dit_dynamo.onnx", SamplerKind::DpmPp2m, Some(2.0), &[1]),
        ("sd3_ts.onnx", SamplerKind::Euler, Some(2.0), &[]),
        ("sd3_dynamo.onnx", SamplerKind::Euler, None, &[]),
        ("sd3_ts.onnx", SamplerKind::Heun, Some(2.0), &[]),
        ("sd3_dynamo.onnx", SamplerKind::Ab2, None, &[]),
    ];
    for (fixture, kind, guidance, classes) in cases {
        let model = common::fixture(fixture);
        let mut results = Vec::new();
        for engine_kind in [EngineKind::Tract, EngineKind::Ort] {
            let mut engine = open(engine_kind, &model);
            let settings = Settings {
                kind: Some(kind),
                steps: 3,
                guidance,
                ..Default::default()
            };
            let setup = setup_for(engine.as_ref(), &model, &settings);
            let mut rng = sampler::rng(11);
            let x = sampler::standard_normal(&mut rng, &setup.latent_shape(2));
            let conditioning =
                Conditioning::build(&setup, 2, classes, TensorMap::new(), &mut rng).unwrap();
            let trajectory = sampler::sample(
                engine.as_mut(),
                &setup,
                x,
                &conditioning,
                &mut rng,
                &SampleOptions::default(),
                &mut |_| {},
            )
            .unwrap();
            results.push(trajectory.latents);
        }
        let diff = relative_diff(&results[0], &results[1]);
        assert!(
            diff <= TRAJECTORY_TOLERANCE,
            "{fixture} {kind:?}: tract and ONNX Runtime differ by {diff:e}"
        );
    }
}

#[test]
fn ddpm_noise_follows_the_seed() {
    let model = common::fixture("dit_ts.onnx");
    let mut engine = open(EngineKind::Tract, &model);
    let settings = Settings {
        kind: Some(SamplerKind::Ddpm),
        steps: 3,
        ..Default::default()
    };
    let setup = setup_for(engine.as_ref(), &model, &settings);
    let x = sampler::standard_normal(&mut sampler::rng(1), &setup.latent_shape(1));
    let conditioning = Conditioning {
        class_labels: Some(vec![4]),
        conditions: TensorMap::new(),
        ..Default::default()
    };
    let a = run(engine.as_mut(), &setup, x.clone(), &conditioning, 5).latents;
    let b = run(engine.as_mut(), &setup, x.clone(), &conditioning, 5).latents;
    let c = run(engine.as_mut(), &setup, x, &conditioning, 6).latents;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// dit_ts with a tiny host contract added: state `fc_prev_t` [batch] holds the previous step's
/// timestep (as float), and a stats output shows it.
fn model_with_contract(
    dir: &Path,
    state_shape: Vec<ShapeDim>,
    declared: Vec<Dim>,
) -> std::path::PathBuf {
    let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
    let graph = &mut model.graph;
    graph
        .inputs
        .push(ValueInfo::tensor("fc_prev_t", 1, declared.clone()));
    graph.add_node(
        Node::new("Cast", &["timestep"], &["fc_prev_t_out"])
            .with_name("fc_cast")
            .with_attr("to", AttrValue::Int(1)),
    );
    graph.add_node(Node::new("Identity", &["fc_prev_t"], &["fc_stats_prev_t"]).with_name("fc_id"));
    graph.outputs.push(ValueInfo::tensor(
        "fc_prev_t_out",
        1,
        vec![Dim::Named("batch".into())],
    ));
    graph
        .outputs
        .push(ValueInfo::tensor("fc_stats_prev_t", 1, declared));
    let contract = Contract {
        version: CONTRACT_VERSION,
        state: vec![StatePair {
            input: "fc_prev_t".into(),
            output: "fc_prev_t_out".into(),
            dtype: "float32".into(),
            shape: state_shape,
            init: "zeros".into(),
        }],
        stats: vec!["fc_stats_prev_t".into()],
        policy: serde_json::json!({"name": "test"}),
    };
    model.set_metadata(METADATA_KEY, contract.to_json());
    let path = dir.join("dit_state.onnx");
    model.save(&path, &Storage::Inline).unwrap();
    path
}

#[test]
fn state_is_fed_back_and_stats_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_contract(
        dir.path(),
        vec![ShapeDim::Named("batch".into())],
        vec![Dim::Named("batch".into())],
    );
    let plain_model = common::fixture("dit_ts.onnx");
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let mut engine = open(kind, &model);
        let settings = Settings {
            steps: 4,
            guidance: Some(2.0),
            ..Default::default()
        };
        let setup = setup_for(engine.as_ref(), &model, &settings);
        let x = sampler::standard_normal(&mut sampler::rng(3), &setup.latent_shape(2));
        let conditioning = Conditioning {
            class_labels: Some(vec![1, 2]),
            conditions: TensorMap::new(),
            ..Default::default()
        };
        let trajectory = run(engine.as_mut(), &setup, x.clone(), &conditioning, 3);
        // Step k's stats show the state fed in: zeros first, then the previous step's timestep,
        // over the batch doubled by CFG.
        let seen: Vec<Vec<f64>> = trajectory
            .steps
            .iter()
            .map(|s| s.stats.get("fc_stats_prev_t").unwrap().to_f64_vec())
            .collect();
        assert_eq!(
            seen,
            vec![vec![0.0; 4], vec![999.0; 4], vec![749.0; 4], vec![499.0; 4]],
            "{kind:?}"
        );
        let state = engine.state().unwrap();
        assert_eq!(state.get("fc_prev_t").unwrap().to_f64_vec(), vec![249.0; 4]);
        // The contract's extra input and outputs leave the samples alone.
        let mut plain = open(kind, &plain_model);
        let plain_setup = setup_for(plain.as_ref(), &plain_model, &settings);
        let expected = run(plain.as_mut(), &plain_setup, x, &conditioning, 3);
        assert_eq!(trajectory.latents, expected.latents, "{kind:?}");
    }
}

fn sample_error(model: &Path, kind: EngineKind) -> String {
    let mut engine = open(kind, model);
    let settings = Settings {
        steps: 2,
        ..Default::default()
    };
    let setup = match SamplerSetup::new(engine.spec(), None, &settings) {
        Ok(setup) => setup,
        Err(e) => return format!("{e:#}"),
    };
    let x = sampler::standard_normal(&mut sampler::rng(0), &setup.latent_shape(1));
    let conditioning = Conditioning {
        class_labels: Some(vec![0]),
        conditions: TensorMap::new(),
        ..Default::default()
    };
    let mut rng = sampler::rng(0);
    let result = sampler::sample(
        engine.as_mut(),
        &setup,
        x,
        &conditioning,
        &mut rng,
        &SampleOptions::default(),
        &mut |_| {},
    );
    format!("{:#}", result.expect_err("sampling should fail"))
}

#[test]
fn state_of_the_wrong_shape_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // The contract's shape does not fit the declared input.
    let model = model_with_contract(
        dir.path(),
        vec![ShapeDim::Named("batch".into()), ShapeDim::Fixed(3)],
        vec![Dim::Named("batch".into())],
    );
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let error = sample_error(&model, kind);
        assert!(
            error.contains("state input 'fc_prev_t'") && error.contains("expected float32 [batch]"),
            "{kind:?}: {error}"
        );
    }
    // The model's state output does not keep the state's shape.
    let model = model_with_contract(dir.path(), vec![ShapeDim::Fixed(5)], vec![Dim::Unknown]);
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let error = sample_error(&model, kind);
        assert!(
            error.contains("state output 'fc_prev_t_out' (fed back to input 'fc_prev_t') is float32 [1], but the state is float32 [5]"),
            "{kind:?}: {error}"
        );
    }
}

#[test]
fn models_that_are_not_diffusion_models_are_refused_clearly() {
    let error = sample_error(&common::fixture("negative/mlp.onnx"), EngineKind::Tract);
    assert_eq!(
        error,
        "latent input 'x': expected float32, float16 or bfloat16 [batch, C, H, W] with fixed C, H, W (or [batch, N, C] packed into tokens), found float32 [batch, 32]"
    );
    let error = sample_error(&common::fixture("negative/cnn.onnx"), EngineKind::Tract);
    assert!(
        error.contains("no input looks like the timestep"),
        "{error}"
    );
}

#[test]
fn null_class_is_guessed_from_the_class_embedding_table() {
    for fixture in ["dit_ts.onnx", "dit_dynamo.onnx", "dit_ts_external.onnx"] {
        let model = Model::load(&common::fixture(fixture)).unwrap();
        let (null, how) =
            fastcache::sampler::roles::guess_null_class(&model, "class_labels").unwrap();
        assert_eq!(null, 10, "{fixture}");
        assert!(how.contains("11-row"), "{how}");
    }
}

#[test]
fn tract_replans_when_the_batch_changes() {
    let model = common::fixture("dit_ts.onnx");
    let mut tract = open(EngineKind::Tract, &model);
    let mut ort = open(EngineKind::Ort, &model);
    let inputs = read_npz(&model.with_extension("npz")).unwrap();
    for batch in [2usize, 1, 3, 2] {
        let mut feed = TensorMap::new();
        for name in ["hidden_states", "timestep", "class_labels"] {
            let t = inputs.get(name).unwrap();
            let resized = match t {
                Tensor::F32(a) => Tensor::F32(repeat_batch(a, batch)),
                Tensor::I64(a) => Tensor::I64(repeat_batch(a, batch)),
                _ => unreachable!(),
            };
            feed.insert(name, resized);
        }
        let a = tract.run(&feed).unwrap().remove("sample").unwrap();
        let b = ort.run(&feed).unwrap().remove("sample").unwrap();
        assert_eq!(a.shape()[0], batch);
        assert!(a.max_abs_diff(&b).unwrap() <= 1e-4, "batch {batch}");
    }
}

fn repeat_batch<T: Clone>(a: &ArrayD<T>, batch: usize) -> ArrayD<T> {
    let n = a.shape()[0];
    let views: Vec<_> = (0..batch).map(|i| a.index_axis(Axis(0), i % n)).collect();
    ndarray::stack(Axis(0), &views).unwrap()
}

#[test]
fn inputs_of_the_wrong_type_are_refused_before_running() {
    let model = common::fixture("dit_ts.onnx");
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let mut engine = open(kind, &model);
        let mut inputs = read_npz(&model.with_extension("npz")).unwrap();
        inputs.remove("output");
        inputs.insert("timestep", Tensor::F32(ArrayD::zeros(ndarray::IxDyn(&[2]))));
        let error = format!("{:#}", engine.run(&inputs).unwrap_err());
        assert_eq!(
            error, "input 'timestep': expected int64 [batch], found float32 [2]",
            "{kind:?}"
        );
        inputs.remove("timestep");
        let error = format!("{:#}", engine.run(&inputs).unwrap_err());
        assert!(
            error.contains("missing input 'timestep'"),
            "{kind:?}: {error}"
        );
    }
}

/// Heun and Adams–Bashforth (on the trained MNIST DiT) and DPM-Solver++(2M) (on the DiT fixture)
/// against an independent Python implementation (tests/data/solvers_reference.py), step by step.
#[test]
fn second_order_solvers_match_the_python_reference() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let mut npz = python_reference("tests/data/solvers_reference.py", dir.path());
    let mut f32_of = |name: &str| npz.remove(name).unwrap().into_f32().unwrap();
    let flow_noise = f32_of("flow_noise");
    let mnist = "models/trained/mnist_dit.onnx";
    let cases = [
        (
            mnist,
            SamplerKind::Heun,
            6,
            1.5,
            flow_noise.clone(),
            f32_of("heun"),
        ),
        (mnist, SamplerKind::Ab2, 6, 1.5, flow_noise, f32_of("ab2")),
        (
            "models/fixtures/dit_ts.onnx",
            SamplerKind::DpmPp2m,
            10,
            4.0,
            f32_of("dpm_noise"),
            f32_of("dpmpp2m"),
        ),
    ];
    for (model, kind, steps, cfg, noise, expected) in cases {
        let model = common::root().join(model);
        let mut engine = open(EngineKind::Ort, &model);
        let settings = Settings {
            kind: Some(kind),
            steps,
            guidance: Some(cfg),
            overrides: SamplerMeta {
                null_class: Some(10),
                ..Default::default()
            },
        };
        let setup = setup_for(engine.as_ref(), &model, &settings);
        let conditioning = Conditioning {
            class_labels: Some(vec![3, 7]),
            conditions: TensorMap::new(),
            ..Default::default()
        };
        let trajectory = run(engine.as_mut(), &setup, noise, &conditioning, 0);
        assert_eq!(
            trajectory.steps.len(),
            steps * kind.calls_per_step(),
            "{kind:?}: model calls"
        );
        assert_eq!(trajectory.history.len(), steps);
        for (k, x) in trajectory.history.iter().enumerate() {
            let diff = relative_diff(x, &expected.index_axis(Axis(0), k).to_owned());
            assert!(
                diff <= TRAJECTORY_TOLERANCE,
                "{kind:?}: step {} differs from Python by {diff:e} (relative)",
                k + 1
            );
        }
    }
}
