//! The peer policies (First-Block-Cache, TeaCache, static interval): with threshold 0 or interval
//! 1 they compute exactly what the original does, step after step, in ONNX Runtime; their skip
//! decisions, change statistics and skipped outputs match an independent numpy computation of
//! the published rules (tests/data/peers_check.py); their contract is complete; bad requests
//! are refused.

mod common;

use common::{python_json, save_inline};

use fastcache_passes::analysis::discover;
use fastcache_passes::analysis::synthetic::SyntheticDit;
use fastcache_passes::cache::step::{
    Indicator, PeerOptions, PeerPolicy, ProbeGate, Schedule, modulated_input, rewrite_with_peer,
};
use fastcache_passes::contract::Contract;
use fastcache_passes::expose::Expose;
use fastcache_passes::ir::Model;
use fastcache_passes::ir::text;
use fastcache_passes::pass::run_pass;

use common::DIT_FIXTURES;

/// A schedule of `steps` steps computing those `every`-th from step 0 (and the last), the others
/// forecast by the line through the last two computed residuals (reuse before there are two);
/// `every` 1 computes every step.
fn schedule(steps: usize, every: usize) -> Schedule {
    let compute: Vec<bool> = (0..steps)
        .map(|s| s % every == 0 || s + 1 == steps)
        .collect();
    let mut computed = Vec::new();
    let weights = (0..steps)
        .map(|s| {
            let row = match computed[..] {
                [.., p, a] if !compute[s] => {
                    let h = (s - a) as f32 / (a - p) as f32;
                    vec![1.0 + h, -h]
                }
                [_] if !compute[s] => vec![1.0, 0.0],
                _ => vec![0.0, 0.0],
            };
            if compute[s] {
                computed.push(s);
            }
            row
        })
        .collect();
    Schedule { compute, weights }
}

/// A probe gate of `steps` steps: the first two and the last forced, one threshold throughout,
/// γ = 0.8, at most `max_run` skips in a row.
fn probe(steps: usize, threshold: f32, max_run: i64) -> ProbeGate {
    ProbeGate {
        forced: (0..steps).map(|s| s < 2 || s + 1 == steps).collect(),
        thresholds: vec![threshold; steps],
        gamma: vec![0.8; steps],
        max_run,
    }
}

fn policies(threshold: f64, interval: i64) -> [PeerPolicy; 6] {
    [
        PeerPolicy::FirstBlock { threshold },
        PeerPolicy::TeaCache {
            threshold,
            indicator: Indicator::ModulatedInput,
        },
        PeerPolicy::TeaCache {
            threshold,
            indicator: Indicator::StackInput,
        },
        PeerPolicy::Interval { interval },
        PeerPolicy::Schedule(schedule(12, interval as usize)),
        // Never skips with max_run 0 (interval 1), skips while allowed otherwise.
        PeerPolicy::Probe(probe(
            12,
            if threshold == 0.0 { 0.0 } else { f32::MAX },
            interval - 1,
        )),
    ]
}

fn rewritten(name: &str, options: &PeerOptions) -> Model {
    let mut model = Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap();
    rewrite_with_peer(&mut model, options).unwrap_or_else(|e| panic!("{name}: {e}"));
    model
}

#[test]
fn zero_threshold_and_interval_one_reproduce_the_original_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    for name in DIT_FIXTURES {
        let original = common::fixture(&format!("{name}.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        for (i, policy) in policies(0.0, 1).into_iter().enumerate() {
            let path = save_inline(
                &rewritten(name, &PeerOptions::new(policy.clone())),
                dir.path(),
                &format!("{name}_{i}.onnx"),
            );
            let report = common::assert_bit_identical_run(
                &original,
                &path,
                &npz,
                8,
                &format!("{name} {policy:?}"),
            );
            assert_eq!(report["skipped_total"].as_f64().unwrap(), 0.0, "{name}");
        }
    }
}

/// float16 exports: every step policy keeps its cached residuals in float16 and, never
/// skipping, matches the original to float16 rounding (ONNX Runtime's CPU provider computes
/// chains of float16 ops in float32 and rounds where they end; see the block cache's test).
#[test]
fn step_policies_on_float16_models_keep_float16_snapshots_and_match_the_original() {
    let dir = tempfile::tempdir().unwrap();
    for name in common::FLOAT16_FIXTURES {
        let original = common::fixture(&format!("{name}.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        for (i, policy) in policies(0.0, 1).into_iter().enumerate() {
            let model = rewritten(name, &PeerOptions::new(policy.clone()));
            let contract = Contract::from_model(&model).unwrap().unwrap();
            let cached = contract
                .state
                .iter()
                .find(|p| p.input.ends_with("cached_residual"))
                .unwrap_or_else(|| panic!("{name} {policy:?}: {:?}", contract.state));
            assert_eq!(cached.dtype, "float16", "{name} {policy:?}");
            let path = save_inline(&model, dir.path(), &format!("{name}_{i}.onnx"));
            let report = python_json(
                "cache_check.py",
                &[&original, &path, &npz],
                &["--steps", "8", "--no-optimizations"],
            );
            let ulps = common::float16_ulps(&report, "max_abs_diff", "output_scale");
            assert!(ulps <= 2.0, "{name} {policy:?}: {report}");
            assert_eq!(
                report["skipped_total"].as_f64(),
                Some(0.0),
                "{name} {policy:?}"
            );
        }
    }
}

#[test]
fn every_rewritten_fixture_passes_the_checker_and_starts_like_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit_ts", "pixart_dynamo"] {
        for (i, policy) in policies(0.1, 3).into_iter().enumerate() {
            let path = save_inline(
                &rewritten(name, &PeerOptions::new(policy)),
                dir.path(),
                &format!("{name}_{i}.onnx"),
            );
            let npz = common::fixture(&format!("{name}.npz"));
            let report = common::ort_check(&path, &npz, true);
            let diff = report["max_abs_diff"].as_f64().unwrap();
            assert!(diff < 1e-4, "{name}: first step differs by {diff}");
            assert_eq!(
                report["outputs"]["fastcache.skipped"],
                serde_json::json!([3])
            );
        }
    }
}

#[test]
fn text_form_of_the_scheduled_smallest_dit() {
    let model = rewritten(
        "dit_ts",
        &PeerOptions::new(PeerPolicy::Schedule(schedule(6, 3))),
    );
    insta::assert_snapshot!(text::print_model(&model));
}

#[test]
fn text_form_of_the_probed_smallest_dit() {
    let model = rewritten(
        "dit_ts",
        &PeerOptions::new(PeerPolicy::Probe(probe(6, 0.1, 2))),
    );
    insta::assert_snapshot!(text::print_model(&model));
}

/// FastCache's schedule around token selection: one `If` per step whose else-branch holds the
/// selection (with its first-step `If`) and the blocks, and whose then-branch also passes the
/// token references on.
#[test]
fn text_form_of_the_scheduled_smallest_dit_with_token_selection() {
    use fastcache_passes::calibration::{
        CALIBRATION_VERSION, Calibration, ScheduleCalibration, fingerprint,
    };
    let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
    let stack = discover(&model)
        .unwrap()
        .single_stream("the test")
        .unwrap()
        .clone();
    let s = schedule(6, 3);
    let calibration = Calibration {
        version: CALIBRATION_VERSION,
        fingerprint: fingerprint(&stack),
        recording: serde_json::json!({}),
        target: serde_json::json!({}),
        blocks: Vec::new(),
        static_tokens: None,
        schedule: Some(ScheduleCalibration {
            compute: s.compute,
            weights: s.weights,
            forecaster: "lagrange".into(),
            target_speedup: 2.0,
            predicted_speedup: 2.0,
            relative_error: 0.0,
            candidates: serde_json::json!([]),
            validation_psnr: None,
        }),
        probe: None,
    };
    fastcache_passes::rewrite::rewrite_with_schedule(&mut model, &calibration, Some(0.5), None)
        .unwrap();
    let contract = Contract::from_model(&model).unwrap().unwrap();
    assert!(state_inputs(&contract).contains(&"fastcache.tokens.ref_x"));
    assert_eq!(
        if_count(&model),
        1,
        "one If at the top level; selection's own is inside"
    );
    insta::assert_snapshot!(text::print_model(&model));
}

/// The rule each policy publishes, recomputed in numpy from the original's own tensors, decides
/// exactly as the rewritten graph does; skipped steps return span input + cached residual.
#[test]
fn skip_decisions_match_an_independent_numpy_computation() {
    let dir = tempfile::tempdir().unwrap();
    // Thresholds that give both decisions on these random-weight fixtures (asserted below).
    let cases: [(&str, PeerPolicy, i64); 17] = [
        ("dit_ts", PeerPolicy::FirstBlock { threshold: 0.3 }, 1),
        (
            "dit_ts",
            PeerPolicy::TeaCache {
                threshold: 0.3,
                indicator: Indicator::ModulatedInput,
            },
            1,
        ),
        (
            "dit_ts",
            PeerPolicy::TeaCache {
                threshold: 0.3,
                indicator: Indicator::StackInput,
            },
            2,
        ),
        ("dit_ts", PeerPolicy::Interval { interval: 3 }, 2),
        (
            "pixart_dynamo",
            PeerPolicy::FirstBlock { threshold: 0.1 },
            2,
        ),
        (
            "pixart_dynamo",
            PeerPolicy::TeaCache {
                threshold: 0.3,
                indicator: Indicator::ModulatedInput,
            },
            1,
        ),
        ("pixart_dynamo", PeerPolicy::Interval { interval: 4 }, 1),
        ("dit_ts", PeerPolicy::Schedule(schedule(12, 3)), 1),
        ("pixart_dynamo", PeerPolicy::Schedule(schedule(12, 4)), 1),
        ("dit_ts", PeerPolicy::Probe(probe(12, 0.05, 2)), 1),
        ("pixart_dynamo", PeerPolicy::Probe(probe(12, 0.05, 3)), 1),
        // MMDiT: the region runs to the image output, so its state is the image stream's.
        ("sd3_ts", PeerPolicy::FirstBlock { threshold: 0.3 }, 1),
        ("flux_ts", PeerPolicy::Interval { interval: 3 }, 1),
        (
            "flux034_ts",
            PeerPolicy::TeaCache {
                threshold: 0.3,
                indicator: Indicator::ModulatedInput,
            },
            1,
        ),
        ("flux_dynamo", PeerPolicy::Schedule(schedule(12, 3)), 1),
        ("sd3_dynamo", PeerPolicy::Probe(probe(12, 0.2, 2)), 1),
        ("flux_dynamo", PeerPolicy::FirstBlock { threshold: 0.3 }, 1),
    ];
    for (i, (name, policy, warmup)) in cases.into_iter().enumerate() {
        let mut original = Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap();
        let structure = discover(&original).unwrap();
        let stack = structure.stack().clone();
        let x = stack.stack_input.clone();
        let h1 = stack.blocks[0].output.clone();
        let hl = stack.stack_output.clone();
        let indicator = match &policy {
            PeerPolicy::TeaCache {
                indicator: Indicator::ModulatedInput,
                ..
            } => modulated_input(&original.graph, &stack).unwrap(),
            _ => x.clone(),
        };
        let options = PeerOptions {
            warmup,
            ..PeerOptions::new(policy.clone())
        };
        let mut model = rewritten(name, &options);
        run_pass(
            &mut original,
            &Expose::new([x.clone(), h1.clone(), hl.clone(), indicator.clone()]),
        )
        .unwrap();
        run_pass(&mut model, &Expose::new([hl.clone()])).unwrap();
        let a = save_inline(&original, dir.path(), &format!("{i}_original.onnx"));
        let b = save_inline(&model, dir.path(), &format!("{i}_rewritten.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        let (kind, threshold, interval) = match &policy {
            PeerPolicy::FirstBlock { threshold } => ("fbcache", *threshold, 1),
            PeerPolicy::TeaCache { threshold, .. } => ("teacache", *threshold, 1),
            PeerPolicy::Interval { interval } => ("interval", 0.0, *interval),
            PeerPolicy::Schedule(_) => ("schedule", 0.0, 1),
            PeerPolicy::Probe(_) => ("probe", 0.0, 1),
        };
        let schedule_json = match &policy {
            PeerPolicy::Schedule(s) => {
                serde_json::json!({"compute": s.compute, "weights": s.weights}).to_string()
            }
            _ => "null".to_string(),
        };
        let probe_json = match &policy {
            PeerPolicy::Probe(g) => serde_json::json!({
                "forced": g.forced,
                "thresholds": g.thresholds,
                "gamma": g.gamma,
                "max_run": g.max_run,
            })
            .to_string(),
            _ => "null".to_string(),
        };
        let report = python_json(
            "peers_check.py",
            &[&a, &b, &npz],
            &[
                "--policy",
                kind,
                "--x",
                &x,
                "--h1",
                &h1,
                "--hl",
                &hl,
                "--indicator",
                &indicator,
                "--threshold",
                &threshold.to_string(),
                "--interval",
                &interval.to_string(),
                "--warmup",
                &warmup.to_string(),
                "--schedule",
                &schedule_json,
                "--probe",
                &probe_json,
                "--steps",
                "12",
            ],
        );
        let what = format!("{name} {policy:?} warmup {warmup}: {report}");
        assert_eq!(report["expected"], report["actual"], "{what}");
        let expected: Vec<bool> = report["expected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        assert!(
            expected.iter().skip(warmup as usize).any(|&s| s)
                && expected.iter().skip(warmup as usize).any(|&s| !s),
            "the case should both skip and compute after warm-up: {what}"
        );
        assert!(
            expected.iter().take(warmup.max(1) as usize).all(|&s| !s),
            "{what}"
        );
        assert!(
            report["change_max_relative_error"].as_f64().unwrap() < 1e-4,
            "{what}"
        );
        assert!(
            report["stack_output_max_relative_error"].as_f64().unwrap() < 1e-5,
            "{what}"
        );
        // No decision came close enough to its threshold for rounding to flip it.
        if let Some(margin) = report["threshold_margin"].as_f64() {
            assert!(margin > 1e-3, "{what}");
        }
    }
}

fn state_inputs(contract: &Contract) -> Vec<&str> {
    contract.state.iter().map(|s| s.input.as_str()).collect()
}

fn if_count(model: &Model) -> usize {
    model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "If")
        .count()
}

#[test]
fn the_contract_states_the_policy_state_and_stats() {
    let model = rewritten(
        "dit_ts",
        &PeerOptions::new(PeerPolicy::FirstBlock { threshold: 0.1 }),
    );
    let contract = Contract::from_model(&model).unwrap().unwrap();
    assert_eq!(
        state_inputs(&contract),
        [
            "fastcache.step",
            "fastcache.cached_residual",
            "fastcache.first_residual"
        ]
    );
    assert_eq!(contract.stats, ["fastcache.skipped", "fastcache.change"]);
    assert_eq!(contract.policy["name"], "fbcache");
    assert_eq!(
        contract.policy["skippable_blocks"],
        serde_json::json!([1, 2])
    );
    assert_eq!(contract.policy["warmup"], 1);
    let ifs = if_count(&model);
    assert_eq!(ifs, 1, "one If around blocks 1..L-1");

    let model = rewritten(
        "dit_ts",
        &PeerOptions::new(PeerPolicy::TeaCache {
            threshold: 0.1,
            indicator: Indicator::ModulatedInput,
        }),
    );
    let contract = Contract::from_model(&model).unwrap().unwrap();
    assert_eq!(contract.policy["indicator"], "modulated_input");
    let previous = contract
        .state
        .iter()
        .find(|s| s.input == "fastcache.previous_indicator")
        .unwrap();
    assert_eq!(
        serde_json::to_value(&previous.shape).unwrap(),
        serde_json::json!(["batch", 16, 16])
    );
    let model = rewritten(
        "pixart_ts",
        &PeerOptions::new(PeerPolicy::Interval { interval: 3 }),
    );
    let contract = Contract::from_model(&model).unwrap().unwrap();
    assert_eq!(
        state_inputs(&contract),
        [
            "fastcache.step",
            "fastcache.cached_residual",
            "fastcache.since_full"
        ]
    );
    assert_eq!(contract.stats, ["fastcache.skipped"]);

    let model = rewritten(
        "pixart_ts",
        &PeerOptions::new(PeerPolicy::Schedule(schedule(10, 3))),
    );
    let contract = Contract::from_model(&model).unwrap().unwrap();
    assert_eq!(
        state_inputs(&contract),
        [
            "fastcache.step",
            "fastcache.cached_residual",
            "fastcache.cached_residual_2"
        ]
    );
    assert_eq!(contract.policy["name"], "fastcache");
    assert_eq!(contract.policy["decision"], "schedule");
    assert_eq!(
        contract.policy["computed_steps"],
        serde_json::json!([0, 3, 6, 9])
    );
    let ifs = if_count(&model);
    assert_eq!(ifs, 1, "one decision per step");

    let model = rewritten(
        "pixart_ts",
        &PeerOptions::new(PeerPolicy::Probe(probe(10, 0.1, 3))),
    );
    let contract = Contract::from_model(&model).unwrap().unwrap();
    assert_eq!(
        state_inputs(&contract),
        [
            "fastcache.step",
            "fastcache.cached_residual",
            "fastcache.cached_residual_2",
            "fastcache.snapshot_step",
            "fastcache.snapshot_step_2",
            "fastcache.skip_run",
            "fastcache.probe_residual",
            "fastcache.probe_residual_2"
        ]
    );
    assert_eq!(contract.stats, ["fastcache.skipped", "fastcache.change"]);
    assert_eq!(contract.policy["decision"], "probe");
    assert_eq!(
        contract.policy["forced_steps"],
        serde_json::json!([0, 1, 9])
    );
    assert_eq!(if_count(&model), 1, "one decision per step");
}

#[test]
fn bad_requests_are_refused() {
    let cases: [(PeerOptions, &str); 5] = [
        (
            PeerOptions::new(PeerPolicy::FirstBlock { threshold: -0.1 }),
            "--threshold",
        ),
        (
            PeerOptions::new(PeerPolicy::TeaCache {
                threshold: f64::NAN,
                indicator: Indicator::StackInput,
            }),
            "--threshold",
        ),
        (
            PeerOptions::new(PeerPolicy::Interval { interval: 0 }),
            "--interval",
        ),
        (
            PeerOptions {
                warmup: -1,
                ..PeerOptions::new(PeerPolicy::Interval { interval: 2 })
            },
            "--warmup",
        ),
        (
            PeerOptions::new(PeerPolicy::FirstBlock { threshold: 0.1 }),
            "already carries",
        ),
    ];
    for (i, (options, expected)) in cases.into_iter().enumerate() {
        let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
        if i == 4 {
            rewrite_with_peer(&mut model, &options).unwrap();
        }
        let error = rewrite_with_peer(&mut model, &options)
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
    // First-Block-Cache needs a block after block 0.
    let mut one_block = SyntheticDit::tiny(1).build();
    let error = rewrite_with_peer(
        &mut one_block,
        &PeerOptions::new(PeerPolicy::FirstBlock { threshold: 0.1 }),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("at least 2 blocks"), "{error}");
    // Schedules that would read a snapshot nobody computed, or rows that do not fit.
    let mut skips_first = schedule(6, 2);
    skips_first.compute[0] = false;
    let mut weighs_too_far = schedule(6, 2);
    weighs_too_far.weights[1] = vec![1.0, 0.5];
    weighs_too_far.compute[1] = false;
    let mut ragged = schedule(6, 2);
    ragged.weights[3] = vec![1.0];
    for (bad, expected) in [
        (
            skips_first,
            "step 0 is skipped before any step was computed",
        ),
        (weighs_too_far, "step 1 weighs 2 snapshots but only 1 exist"),
        (ragged, "schedule step 3: expected 2 finite weights"),
    ] {
        let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
        let error = rewrite_with_peer(&mut model, &PeerOptions::new(PeerPolicy::Schedule(bad)))
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
    // Probe gates that would forecast from one snapshot, or whose tables do not fit.
    let mut early = probe(6, 0.1, 2);
    early.forced[1] = false;
    let mut short = probe(6, 0.1, 2);
    short.gamma.pop();
    let mut nan = probe(6, 0.1, 2);
    nan.thresholds[3] = f32::NAN;
    for (bad, expected) in [
        (early, "computes its first two steps"),
        (short, "one forced flag, threshold and γ per step"),
        (nan, "probe gate step 3"),
    ] {
        let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
        let error = rewrite_with_peer(&mut model, &PeerOptions::new(PeerPolicy::Probe(bad)))
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
    let error = rewrite_with_peer(
        &mut SyntheticDit::tiny(1).build(),
        &PeerOptions::new(PeerPolicy::Probe(probe(6, 0.1, 2))),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("at least 2 blocks"), "{error}");
    // Not a DiT.
    let mut mlp =
        Model::load(&common::repo_root().join("models/fixtures/negative/mlp.onnx")).unwrap();
    let error = rewrite_with_peer(
        &mut mlp,
        &PeerOptions::new(PeerPolicy::Interval { interval: 2 }),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("no DiT block stack found"), "{error}");
}

/// FastCache's schedule on the smallest MMDiTs (SD3, whose last block writes no text; Flux, whose
/// single blocks join and split the streams): one `If` over the whole joint stack, its state the
/// image stream's residual.
#[test]
fn text_form_of_the_scheduled_smallest_mmdits() {
    for name in ["sd3_ts", "flux_ts"] {
        let model = rewritten(
            name,
            &PeerOptions::new(PeerPolicy::Schedule(schedule(6, 3))),
        );
        assert_eq!(if_count(&model), 1, "{name}");
        let contract = Contract::from_model(&model).unwrap().unwrap();
        assert_eq!(
            state_inputs(&contract),
            [
                "fastcache.step",
                "fastcache.cached_residual",
                "fastcache.cached_residual_2"
            ],
            "{name}"
        );
        insta::assert_snapshot!(format!("scheduled_{name}"), text::print_model(&model));
    }
}

/// Every MMDiT fixture, rewritten with each step policy, passes the ONNX checker, loads in ONNX
/// Runtime and computes PyTorch's output at its first step.
#[test]
fn every_rewritten_mmdit_passes_the_checker_and_starts_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let policies = [
        PeerPolicy::FirstBlock { threshold: 0.1 },
        PeerPolicy::TeaCache {
            threshold: 0.1,
            indicator: Indicator::ModulatedInput,
        },
        PeerPolicy::Interval { interval: 2 },
        PeerPolicy::Schedule(schedule(6, 2)),
        PeerPolicy::Probe(probe(6, 0.05, 2)),
    ];
    for name in [
        "sd3_ts",
        "sd3_dynamo",
        "sd35_ts",
        "sd35_dynamo",
        "flux_ts",
        "flux_dynamo",
        "flux034_ts",
        "flux034_dynamo",
    ] {
        for (i, policy) in policies.iter().enumerate() {
            let model = rewritten(name, &PeerOptions::new(policy.clone()));
            let path = save_inline(&model, dir.path(), &format!("{name}_{i}.onnx"));
            let report = common::ort_check(&path, &common::fixture(&format!("{name}.npz")), true);
            let diff = report["max_abs_diff"].as_f64().unwrap();
            assert!(
                diff < 1e-4,
                "{name} {policy:?}: first step differs from PyTorch by {diff}"
            );
        }
    }
}

/// A region that ends before the text stream does (an MMDiT's double blocks only, or its first
/// blocks) carries the text stream's residual too: at a skipped step both the region's image
/// output and its text output are their inputs plus their own cached residuals, recomputed in
/// numpy from the original's tensors; the blocks after the region run on both.
#[test]
fn a_region_over_the_double_blocks_carries_the_text_stream() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("flux_ts", PeerPolicy::Interval { interval: 2 }, (0, 1)),
        (
            "flux_dynamo",
            PeerPolicy::FirstBlock { threshold: 0.3 },
            (0, 1),
        ),
        ("sd3_ts", PeerPolicy::Interval { interval: 3 }, (0, 1)),
        ("flux_ts", PeerPolicy::Schedule(schedule(10, 3)), (1, 2)),
    ];
    for (i, (name, policy, (first, last))) in cases.into_iter().enumerate() {
        let mut original = Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap();
        let stack = discover(&original).unwrap().stack().clone();
        let decides = matches!(policy, PeerPolicy::FirstBlock { .. });
        let region_first = first + usize::from(decides);
        let x = stack.blocks[first].input.clone();
        let h1 = stack.blocks[first].output.clone();
        let hl = stack.blocks[last].output.clone();
        let e_in = stack.blocks[region_first].text_input.clone().unwrap();
        let e_out = stack.blocks[last].text_output.clone().unwrap();
        let options = PeerOptions {
            policy: policy.clone(),
            warmup: 1,
            blocks: Some((first, last)),
        };
        let mut model = rewritten(name, &options);
        let contract = Contract::from_model(&model).unwrap().unwrap();
        assert!(
            state_inputs(&contract).contains(&"fastcache.cached_text_residual"),
            "{name}: {:?}",
            state_inputs(&contract)
        );
        run_pass(
            &mut original,
            &Expose::new([
                x.clone(),
                h1.clone(),
                hl.clone(),
                e_in.clone(),
                e_out.clone(),
            ]),
        )
        .unwrap();
        run_pass(&mut model, &Expose::new([hl.clone(), e_out.clone()])).unwrap();
        let a = save_inline(&original, dir.path(), &format!("r{i}_original.onnx"));
        let b = save_inline(&model, dir.path(), &format!("r{i}_rewritten.onnx"));
        let (kind, threshold, interval, schedule_json) = match &policy {
            PeerPolicy::FirstBlock { threshold } => ("fbcache", *threshold, 1, "null".to_string()),
            PeerPolicy::Interval { interval } => ("interval", 0.0, *interval, "null".to_string()),
            PeerPolicy::Schedule(s) => (
                "schedule",
                0.0,
                1,
                serde_json::json!({"compute": s.compute, "weights": s.weights}).to_string(),
            ),
            _ => unreachable!(),
        };
        let report = python_json(
            "peers_check.py",
            &[&a, &b, &common::fixture(&format!("{name}.npz"))],
            &[
                "--policy",
                kind,
                "--x",
                &x,
                "--h1",
                &h1,
                "--hl",
                &hl,
                "--e-in",
                &e_in,
                "--e-out",
                &e_out,
                "--threshold",
                &threshold.to_string(),
                "--interval",
                &interval.to_string(),
                "--schedule",
                &schedule_json,
                "--warmup",
                "1",
                "--steps",
                "10",
            ],
        );
        let what = format!("{name} {policy:?} blocks {first}-{last}: {report}");
        assert_eq!(report["expected"], report["actual"], "{what}");
        let skips = report["expected"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v.as_bool().unwrap())
            .count();
        assert!(skips > 0 && skips < 9, "{what}");
        assert!(
            report["stack_output_max_relative_error"].as_f64().unwrap() < 1e-5,
            "{what}"
        );
        assert!(
            report["text_output_max_relative_error"].as_f64().unwrap() < 1e-5,
            "{what}"
        );
    }
}
