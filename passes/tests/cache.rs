//! The block-cache rewrite: its text form, that ONNX Runtime and the ONNX checker accept it on
//! every fixture, that forced skips compute exactly the approximation the method defines, that
//! `max_skips = 0` reproduces the original step after step, and that bad requests are refused.

mod common;

use common::{python_json, save_inline};

use fastcache_passes::analysis::discover;
use fastcache_passes::cache::Approximation;
use fastcache_passes::expose::Expose;
use fastcache_passes::ir::{Model, text};
use fastcache_passes::pass::run_pass;
use fastcache_passes::rewrite::{CacheOptions, rewrite_with_cache};

use common::DIT_FIXTURES;

fn rewritten(name: &str, options: &CacheOptions) -> Model {
    let mut model = Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap();
    rewrite_with_cache(&mut model, options).unwrap_or_else(|e| panic!("{name}: {e}"));
    model
}

#[test]
fn text_form_of_the_rewritten_smallest_dit() {
    let model = rewritten("dit_ts", &CacheOptions::default());
    insta::assert_snapshot!(text::print_model(&model));
}

#[test]
fn every_rewritten_fixture_passes_the_checker_and_starts_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    for name in DIT_FIXTURES {
        let path = save_inline(
            &rewritten(name, &CacheOptions::default()),
            dir.path(),
            &format!("{name}.onnx"),
        );
        let npz = common::fixture(&format!("{name}.npz"));
        let report = common::ort_check(&path, &npz, true);
        let diff = report["max_abs_diff"].as_f64().unwrap();
        assert!(
            diff < 1e-4,
            "{name}: first step differs from PyTorch by {diff}"
        );
        assert_eq!(
            report["outputs"]["fastcache.skipped"],
            serde_json::json!([3])
        );
    }
}

/// With either approximation (the forecast keeps more state and builds its weights in the
/// then-branch), a cache that never skips computes exactly what the original does.
#[test]
fn max_skips_zero_reproduces_the_original_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let forecast = CacheOptions {
        max_skips: 0,
        warmup: 3,
        approximation: Approximation::Forecast {
            order: 2,
            damping: 0.5,
        },
        ..CacheOptions::default()
    };
    let path = save_inline(
        &rewritten("pixart_dynamo", &forecast),
        dir.path(),
        "forecast.onnx",
    );
    let original = common::fixture("pixart_dynamo.onnx");
    let npz = common::fixture("pixart_dynamo.npz");
    let report = common::assert_bit_identical_run(&original, &path, &npz, 8, "forecast");
    assert_eq!(report["skipped_total"].as_f64().unwrap(), 0.0, "forecast");
    for name in DIT_FIXTURES {
        let options = CacheOptions {
            max_skips: 0,
            ..CacheOptions::default()
        };
        let path = save_inline(
            &rewritten(name, &options),
            dir.path(),
            &format!("{name}.onnx"),
        );
        let original = common::fixture(&format!("{name}.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        let report = common::assert_bit_identical_run(&original, &path, &npz, 12, name);
        assert_eq!(report["skipped_total"].as_f64().unwrap(), 0.0, "{name}");
        // Optimised, ONNX Runtime fuses differently inside and outside an If: rounding only.
        let report = python_json(
            "cache_check.py",
            &[&original, &path, &npz],
            &["--steps", "12"],
        );
        assert!(
            report["max_abs_diff"].as_f64().unwrap() < 1e-5,
            "{name}: {report}"
        );
    }
}

/// Rewrites `name` with `options` (forced skips), exposes the block boundaries of it and of the
/// original, and runs cache_check.py's independent computation of the skipped steps over
/// `steps` steps with `extra` arguments; returns its report.
fn forced_run(
    name: &str,
    options: &CacheOptions,
    steps: usize,
    extra: &[&str],
    dir: &std::path::Path,
) -> serde_json::Value {
    let mut original = Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap();
    let structure = discover(&original).unwrap();
    let expose = Expose::block_boundaries(structure.single_stream("the test").unwrap());
    let boundaries = expose.values.join(",");
    let mut forced = rewritten(name, options);
    run_pass(&mut original, &expose).unwrap();
    run_pass(&mut forced, &expose).unwrap();
    let a = save_inline(&original, dir, &format!("{name}_exposed.onnx"));
    let b = save_inline(&forced, dir, &format!("{name}_forced.onnx"));
    let npz = common::fixture(&format!("{name}.npz"));
    let warmup = options.warmup.to_string();
    let steps = steps.to_string();
    let mut args = vec![
        "--steps",
        &steps,
        "--forced",
        &boundaries,
        "--warmup",
        &warmup,
    ];
    args.extend_from_slice(extra);
    python_json("cache_check.py", &[&a, &b, &npz], &args)
}

/// With every block skipped after warm-up, block l's output must be the stack input plus the
/// cached residuals of blocks 0..=l: H_l(t) = X(t) + H_l(r) − X(r), r the last computed step.
/// The test recomputes that from the original model's recorded block tensors.
#[test]
fn forced_skips_compute_the_cached_residual_approximation() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit_ts", "pixart_dynamo"] {
        let options = CacheOptions {
            force_skip: true,
            warmup: 2,
            ..CacheOptions::default()
        };
        let report = forced_run(name, &options, 6, &[], dir.path());
        let error = report["forced_max_abs_error"].as_f64().unwrap();
        assert!(
            error < 1e-5,
            "{name}: forced skips differ from the independent computation by {error}"
        );
        assert_eq!(
            report["skipped_total"].as_f64().unwrap(),
            3.0 * 4.0,
            "{name}: {report}"
        );
    }
}

/// float16 exports, as GPU deployments make them: the cache keeps its state (each block's input
/// and output snapshots) in float16 and computes its test and approximation in float32. ONNX
/// Runtime's CPU provider runs many float16 ops in float32 and rounds where a chain of them
/// returns to float16; the `If` around each block is one more such point, so a cache that never
/// skips matches the original to float16 rounding (within two ulps of the output's largest
/// value), not bit for bit, and forced skips equal the independent computation to the same.
#[test]
fn float16_models_keep_float16_state_and_match_the_original() {
    let dir = tempfile::tempdir().unwrap();
    for name in common::FLOAT16_FIXTURES {
        let original = common::fixture(&format!("{name}.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        let never = CacheOptions {
            max_skips: 0,
            ..CacheOptions::default()
        };
        let model = rewritten(name, &never);
        let contract = fastcache_passes::contract::Contract::from_model(&model)
            .unwrap()
            .unwrap();
        let snapshots: Vec<_> = contract
            .state
            .iter()
            .filter(|p| p.input.ends_with("ref_in") || p.input.ends_with("ref_out"))
            .collect();
        assert_eq!(snapshots.len(), 6, "{name}: {:?}", contract.state);
        assert!(
            snapshots.iter().all(|p| p.dtype == "float16"),
            "{name}: {:?}",
            contract.state
        );
        let path = save_inline(&model, dir.path(), &format!("{name}_never.onnx"));
        common::ort_check(&path, &npz, true);
        let report = python_json(
            "cache_check.py",
            &[&original, &path, &npz],
            &["--steps", "8", "--no-optimizations"],
        );
        assert!(
            common::float16_ulps(&report, "max_abs_diff", "output_scale") <= 2.0,
            "{name}: {report}"
        );
        assert_eq!(
            report["skipped_total"].as_f64(),
            Some(0.0),
            "{name}: {report}"
        );

        let forced = CacheOptions {
            force_skip: true,
            warmup: 2,
            ..CacheOptions::default()
        };
        let report = forced_run(name, &forced, 6, &[], dir.path());
        assert!(
            common::float16_ulps(&report, "forced_max_abs_error", "forced_scale") <= 2.0,
            "{name}: forced skips differ from the independent computation: {report}"
        );
        assert_eq!(
            report["skipped_total"].as_f64(),
            Some(12.0),
            "{name}: {report}"
        );
    }
}

/// The same with each block's residual forecast along time: H_l(t) = X(t) + F(t), F Newton's
/// damped extrapolation through the last K + 1 computed steps, recomputed in numpy from divided
/// differences of the original's recorded tensors (the graph uses weights on the snapshots).
#[test]
fn forced_skips_compute_the_per_block_forecast() {
    let dir = tempfile::tempdir().unwrap();
    for (name, order, damping) in [("dit_ts", 1, 1.0), ("pixart_dynamo", 2, 0.6)] {
        let warmup = order as i64 + 1;
        let options = CacheOptions {
            force_skip: true,
            warmup,
            approximation: Approximation::Forecast { order, damping },
            ..CacheOptions::default()
        };
        let (order, damping) = (order.to_string(), damping.to_string());
        let extra = ["--forecast", &order, "--damping", &damping];
        let report = forced_run(name, &options, 7, &extra, dir.path());
        let error = report["forced_max_abs_error"].as_f64().unwrap();
        assert!(
            error < 1e-4,
            "{name}: forced forecasts differ from the independent computation by {error}: {report}"
        );
        assert_eq!(
            report["skipped_total"].as_f64().unwrap(),
            3.0 * (7 - warmup) as f64,
            "{name}: {report}"
        );
    }
}

#[test]
fn text_form_of_the_per_block_forecast() {
    let options = CacheOptions {
        warmup: 3,
        approximation: Approximation::Forecast {
            order: 2,
            damping: 0.5,
        },
        blocks: Some(vec![0]),
        ..CacheOptions::default()
    };
    let model = rewritten("dit_ts", &options);
    insta::assert_snapshot!(text::print_model(&model));
}

#[test]
fn a_rewritten_model_is_not_rewritten_again() {
    let mut model = rewritten("dit_ts", &CacheOptions::default());
    let error = rewrite_with_cache(&mut model, &CacheOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("already carries a fastcache rewrite"),
        "{error}"
    );
}

#[test]
fn non_dit_models_are_refused() {
    for name in ["mlp", "cnn", "transformer_no_residual"] {
        let path = common::repo_root().join(format!("models/fixtures/negative/{name}.onnx"));
        let mut model = Model::load(&path).unwrap();
        let error = rewrite_with_cache(&mut model, &CacheOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no DiT block stack found"),
            "{name}: {error}"
        );
    }
}

#[test]
fn parameters_out_of_range_are_refused() {
    let cases: [(CacheOptions, &str); 7] = [
        (
            CacheOptions {
                alpha: 1.5,
                ..CacheOptions::default()
            },
            "--alpha",
        ),
        (
            CacheOptions {
                max_skips: -1,
                ..CacheOptions::default()
            },
            "--max-skips",
        ),
        (
            CacheOptions {
                warmup: -3,
                ..CacheOptions::default()
            },
            "--warmup",
        ),
        (
            CacheOptions {
                blocks: Some(vec![7]),
                ..CacheOptions::default()
            },
            "has 3 blocks",
        ),
        (
            CacheOptions {
                warmup: 5,
                approximation: Approximation::Forecast {
                    order: 3,
                    damping: 1.0,
                },
                ..CacheOptions::default()
            },
            "order 1 or 2",
        ),
        (
            CacheOptions {
                approximation: Approximation::Forecast {
                    order: 1,
                    damping: 1.5,
                },
                ..CacheOptions::default()
            },
            "--damping",
        ),
        (
            CacheOptions {
                warmup: 2,
                approximation: Approximation::Forecast {
                    order: 2,
                    damping: 1.0,
                },
                ..CacheOptions::default()
            },
            "needs --warmup 3",
        ),
    ];
    for (options, expected) in cases {
        let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
        let error = rewrite_with_cache(&mut model, &options)
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn a_subset_of_blocks_can_be_cached() {
    let options = CacheOptions {
        blocks: Some(vec![1]),
        ..CacheOptions::default()
    };
    let model = rewritten("dit_dynamo", &options);
    let ifs = model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type == "If")
        .count();
    assert_eq!(ifs, 1);
    let contract = fastcache_passes::contract::Contract::from_model(&model)
        .unwrap()
        .unwrap();
    // The step counter, then R_in, R_out and the skip count of block 1.
    let inputs: Vec<&str> = contract.state.iter().map(|s| s.input.as_str()).collect();
    assert_eq!(
        inputs,
        [
            "fastcache.step",
            "fastcache.b1.ref_in",
            "fastcache.b1.ref_out",
            "fastcache.b1.skips"
        ]
    );
}

/// On MMDiT every block also carries the text stream where a later block reads it: with every
/// block skipped after warm-up, each stream's tensor after block l must be that stream's input
/// plus its own cached residuals, H_l(t) = X(t) + H_l(r) − X(r) and E_l(t) = E₀(t) + E_l(r) −
/// E₀(r), recomputed from the original's recorded tensors of both streams.
#[test]
fn forced_skips_on_mmdit_reuse_each_streams_residual() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["sd3_ts", "sd35_dynamo", "flux_ts", "flux_dynamo"] {
        let options = CacheOptions {
            force_skip: true,
            warmup: 2,
            ..CacheOptions::default()
        };
        let mut original = Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap();
        let stack = discover(&original).unwrap().stack().clone();
        let image = Expose::block_boundaries(&stack).values;
        let mut text = vec![stack.joint.as_ref().unwrap().text_input.clone()];
        text.extend(stack.blocks.iter().filter_map(|b| b.text_output.clone()));
        assert!(text.len() >= 3, "{name}: {text:?}");
        let expose = Expose::new(image.iter().chain(&text).cloned());
        let mut forced = rewritten(name, &options);
        let contract = fastcache_passes::contract::Contract::from_model(&forced)
            .unwrap()
            .unwrap();
        let text_state = contract
            .state
            .iter()
            .filter(|p| p.input.contains(".text.ref_"))
            .count();
        assert_eq!(
            text_state,
            2 * (text.len() - 1),
            "{name}: one pair per text residual"
        );
        run_pass(&mut original, &expose).unwrap();
        run_pass(&mut forced, &expose).unwrap();
        let a = save_inline(&original, dir.path(), &format!("{name}_exposed.onnx"));
        let b = save_inline(&forced, dir.path(), &format!("{name}_forced.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        let report = python_json(
            "cache_check.py",
            &[&a, &b, &npz],
            &[
                "--steps",
                "6",
                "--warmup",
                "2",
                "--forced",
                &image.join(","),
                "--forced-text",
                &text.join(","),
            ],
        );
        let error = report["forced_max_abs_error"].as_f64().unwrap();
        assert!(
            error < 1e-5,
            "{name}: forced skips differ from the independent computation by {error}"
        );
        assert_eq!(
            report["skipped_total"].as_f64().unwrap(),
            (stack.blocks.len() * 4) as f64,
            "{name}: {report}"
        );
    }
}

/// The per-block cache on the smallest Flux: each block's `If` also outputs the text stream
/// where a later block reads it, from its own cached text residual.
#[test]
fn text_form_of_the_per_block_cache_on_flux() {
    let model = rewritten("flux_ts", &CacheOptions::default());
    insta::assert_snapshot!(text::print_model(&model));
}
