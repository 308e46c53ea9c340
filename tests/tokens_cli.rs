//! Token selection as users drive it: `fastcache rewrite --motion-ratio` (alone with
//! `--no-cache`, or with the block cache), `calibrate` and `run`, on ONNX Runtime and tract, and
//! the Python example host.

mod common;

use common::{DIT_FIXTURES, fails, fastcache, ok, read_npy, relative_diff, s};

/// `--motion-ratio 1` (with `--max-skips 0` when combined with the cache) leaves a whole
/// sampling run unchanged on both engines; the bounds are those of the cache's own test
/// (tests/cache_cli.rs): rounding only.
#[test]
fn motion_ratio_one_reproduces_the_original_run_on_both_engines() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for name in DIT_FIXTURES {
        let original = common::fixture(&format!("{name}.onnx"));
        let alone = dir.path().join(format!("{name}_alone.onnx"));
        let said = ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&alone),
            "--motion-ratio",
            "1",
            "--no-cache",
        ]));
        assert!(said.contains("16 of 16 tokens"), "{said}");
        let cached = dir.path().join(format!("{name}_cached.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&cached),
            "--motion-ratio",
            "1",
            "--max-skips",
            "0",
        ]));
        for (engine, tolerance) in [("ort", 1e-6), ("tract", 1e-5)] {
            let reference = dir.path().join(format!("{name}_{engine}_original.npy"));
            common::run_8_steps(&original, engine, &reference);
            for model in [&alone, &cached] {
                let out = dir.path().join(format!("{name}_{engine}_rewritten.npy"));
                let report = common::run_8_steps(model, engine, &out);
                assert!(report.contains("fastcache.tokens_run=[16]"), "{report}");
                assert!(!report.contains("fastcache.tokens_run=[8]"), "{report}");
                let diff = relative_diff(&read_npy(&out), &read_npy(&reference));
                assert!(
                    diff <= tolerance,
                    "{name} ({}) on {engine}: differs by {diff} (relative)",
                    model.display()
                );
            }
        }
    }
}

/// Token-selected models, with and without the cache (several `If` nodes: tract's
/// inference-level plan), run on tract and give what ONNX Runtime gives; K tokens run after the
/// first step.
#[test]
fn token_selected_models_run_on_both_engines_alike() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit_dynamo", "pixart_ts"] {
        let original = common::fixture(&format!("{name}.onnx"));
        for cache in [false, true] {
            let model = dir.path().join(format!("{name}_{cache}.onnx"));
            let mut args = vec![
                "rewrite",
                s(&original),
                "-o",
                s(&model),
                "--motion-ratio",
                "0.5",
            ];
            if !cache {
                args.push("--no-cache");
            }
            let said = ok(fastcache(&args));
            assert!(said.contains("8 of 16 tokens"), "{said}");
            let mut outputs = Vec::new();
            for engine in ["ort", "tract"] {
                let out = dir.path().join(format!("{name}_{cache}_{engine}.npy"));
                let report = common::run_8_steps(&model, engine, &out);
                assert_eq!(report.matches("fastcache.tokens_run=[16]").count(), 1);
                assert_eq!(report.matches("fastcache.tokens_run=[8]").count(), 7);
                if cache {
                    assert!(report.contains("fastcache.skipped=[0,0,0]"), "{report}");
                }
                outputs.push(read_npy(&out));
            }
            let diff = relative_diff(&outputs[1], &outputs[0]);
            assert!(
                diff < 1e-5,
                "{name} (cache {cache}): tract and ONNX Runtime differ by {diff}"
            );
        }
    }
}

/// The example host (Python, onnxruntime only, reading the metadata contract) runs a model with
/// token selection and the cache (forced skips: every state path taken) like `fastcache run`.
#[test]
fn the_python_example_host_runs_token_selection() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tokens.onnx");
    ok(fastcache(&[
        "rewrite",
        s(&common::fixture("dit_ts.onnx")),
        "-o",
        s(&model),
        "--motion-ratio",
        "0.25",
        "--force-skip",
    ]));
    let run = common::run_with_python_host(&model, dir.path());
    assert!(
        run.report.contains("fastcache.tokens_run=[4]"),
        "{}",
        run.report
    );
    assert!(
        run.report.contains("fastcache.skipped=[1,1,1]"),
        "{}",
        run.report
    );
    assert!(
        run.diff < 1e-5,
        "python host and fastcache run differ by {} (relative)",
        run.diff
    );
}

#[test]
fn calibrate_fits_the_static_tokens_and_rewrite_uses_it() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let calibration = dir.path().join("dit.json");
    let original = common::fixture("dit_ts.onnx");
    let report = common::calibrate_dit_ts(&calibration);
    assert!(report.contains("static tokens"), "{report}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&calibration).unwrap()).unwrap();
    let tokens = &json["static_tokens"];
    assert_eq!(tokens["weight"]["shape"], serde_json::json!([16, 16]));
    let (reuse, fitted) = (
        tokens["relative_error_reuse"].as_f64().unwrap(),
        tokens["relative_error_corrected"].as_f64().unwrap(),
    );
    assert!(fitted <= reuse * (1.0 + 1e-6), "{tokens}");

    for extra in [&["--no-cache"][..], &[][..]] {
        let rewritten = dir.path().join("dit_tokens.onnx");
        let said = ok(fastcache(
            &[
                &[
                    "rewrite",
                    s(&original),
                    "-o",
                    s(&rewritten),
                    "--motion-ratio",
                    "0.5",
                    "--calibration",
                    s(&calibration),
                ][..],
                extra,
            ]
            .concat(),
        ));
        assert!(said.contains("8 of 16 tokens"), "{said}");
        let model = fastcache_passes::ir::Model::load(&rewritten).unwrap();
        let contract = fastcache_passes::contract::Contract::from_model(&model)
            .unwrap()
            .unwrap();
        assert_eq!(contract.policy["tokens"]["calibration"], "calibrated");
        let out = dir.path().join("out.npy");
        let report = common::run_8_steps(&rewritten, "ort", &out);
        assert!(report.contains("fastcache.tokens_run=[8]"), "{report}");
        assert!(read_npy(&out).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn rewrite_refuses_bad_token_requests_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let out = dir.path().join("out.onnx");
    for (flags, expected) in [
        (
            &["--motion-ratio", "0"][..],
            "--motion-ratio must lie in (0, 1]",
        ),
        (
            &["--motion-ratio", "1.5"][..],
            "--motion-ratio must lie in (0, 1]",
        ),
        (&["--no-cache"][..], "--no-cache leaves nothing to do"),
        (
            &["--no-cache", "--motion-ratio", "0.5", "--blocks", "1"][..],
            "--blocks is an option of the block cache",
        ),
        (
            &[
                "--policy",
                "fbcache",
                "--threshold",
                "0.1",
                "--motion-ratio",
                "0.5",
            ][..],
            "--motion-ratio is an option of --policy fastcache",
        ),
    ] {
        let error = fails(fastcache(
            &[&["rewrite", s(&original), "-o", s(&out)][..], flags].concat(),
        ));
        assert!(error.contains(expected), "{flags:?}: {error}");
        assert!(!out.exists(), "a refused rewrite left an output");
    }
    // A ratio that rounds up to every token says so.
    let output = fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&out),
        "--motion-ratio",
        "0.99",
        "--no-cache",
    ]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("every token runs"));
}
