//! The block cache as users drive it: `fastcache rewrite`, `calibrate` and `run`, on ONNX
//! Runtime and tract, and the Python example host.

mod common;

use common::{DIT_FIXTURES, fails, fastcache, ok, read_npy, relative_diff, s};

/// `--max-skips 0` must leave a whole sampling run unchanged, on both engines. Unoptimised ONNX
/// Runtime would be bit-identical (passes/tests/cache.rs checks that); here the engines run as
/// users run them, so the bound is rounding: 1e-6 of the largest value for ONNX Runtime, 1e-5
/// for tract, which plans a rewritten model differently (see src/engine/tract.rs).
#[test]
fn max_skips_zero_reproduces_the_original_run_on_both_engines() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for name in DIT_FIXTURES {
        let original = common::fixture(&format!("{name}.onnx"));
        let rewritten = dir.path().join(format!("{name}_exact.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&rewritten),
            "--max-skips",
            "0",
        ]));
        for (engine, tolerance) in [("ort", 1e-6), ("tract", 1e-5)] {
            let a = dir.path().join(format!("{name}_{engine}_original.npy"));
            let b = dir.path().join(format!("{name}_{engine}_rewritten.npy"));
            let common_args = [
                "--steps", "8", "--seed", "5", "--batch", "2", "--cfg", "3", "--engine", engine,
            ];
            ok(fastcache(
                &[&["run", s(&original), "-o", s(&a)][..], &common_args].concat(),
            ));
            let report = ok(fastcache(
                &[&["run", s(&rewritten), "-o", s(&b)][..], &common_args].concat(),
            ));
            assert!(report.contains("fastcache.skipped=[0,0,0]"), "{report}");
            assert!(
                !report.contains("fastcache.skipped=[1"),
                "{name} skipped with --max-skips 0:\n{report}"
            );
            let diff = relative_diff(&read_npy(&b), &read_npy(&a));
            assert!(
                diff <= tolerance,
                "{name} on {engine}: rewritten run differs by {diff} (relative)"
            );
        }
    }
}

/// The example host (Python, onnxruntime only, reading the metadata contract) and
/// `fastcache run` agree step for step from the same initial noise, skips included.
#[test]
fn the_python_example_host_matches_fastcache_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("forced.onnx");
    // Forced skips make every step after warm-up take the cached path, so the state loop of
    // both hosts is exercised on every call.
    let original = common::fixture("dit_ts.onnx");
    ok(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&model),
        "--force-skip",
    ]));
    let run = common::run_with_python_host(&model, dir.path());
    assert!(
        run.report.contains("fastcache.skipped=[1,1,1]"),
        "{}",
        run.report
    );
    assert_eq!(
        run.host_skipped,
        3.0 * 8.0,
        "forced skips from step 2 of 10 in 3 blocks"
    );
    assert!(
        run.diff < 1e-5,
        "python host and fastcache run differ by {} (relative)",
        run.diff
    );
}

/// float16 exports as users drive them: `run` samples them on ONNX Runtime (the sampler in
/// float32, the engine converting at the model's boundary); a never-skipping rewrite matches the
/// original run to float16 rounding (ONNX Runtime's CPU provider computes chains of float16 ops
/// in float32 and rounds where they end, and each block's `If` is one more end: 4.3e-4 and
/// 4.9e-4 of the largest value measured over these 8 steps, against 4 float16 ulps allowed);
/// forced skips skip; the Python example host matches `fastcache run` with float16 state.
#[test]
fn float16_models_run_and_a_never_skipping_rewrite_matches_the_original() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit_ts_f16", "dit_dynamo_f16"] {
        let original = common::fixture(&format!("{name}.onnx"));
        let never = dir.path().join(format!("{name}_never.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&never),
            "--max-skips",
            "0",
        ]));
        let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
        common::run_8_steps(&original, "ort", &a);
        let report = common::run_8_steps(&never, "ort", &b);
        assert!(report.contains("fastcache.skipped=[0,0,0]"), "{report}");
        let diff = relative_diff(&read_npy(&b), &read_npy(&a));
        assert!(
            diff <= 4.0 * f32::powi(2.0, -11),
            "{name}: differs by {diff}"
        );

        let forced = dir.path().join(format!("{name}_forced.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&forced),
            "--force-skip",
        ]));
        let run = common::run_with_python_host(&forced, dir.path());
        assert_eq!(run.host_skipped, 3.0 * 8.0, "{name}: {}", run.report);
        assert!(run.diff < 1e-6, "{name}: hosts differ by {}", run.diff);
    }
}

#[test]
fn calibrate_then_rewrite_then_run() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let calibration = dir.path().join("dit.json");
    let original = common::fixture("dit_ts.onnx");
    let report = common::calibrate_dit_ts(&calibration);
    assert!(report.contains("expected FLOP speedup"), "{report}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&calibration).unwrap()).unwrap();
    let blocks = json["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 3);
    for block in blocks {
        let (reuse, fitted) = (
            block["relative_error_residual"].as_f64().unwrap(),
            block["relative_error_corrected"].as_f64().unwrap(),
        );
        // The fit minimises the squared error on the same pairs, so it never does worse.
        assert!(fitted <= reuse * (1.0 + 1e-6), "{block}");
        assert_eq!(block["weight"]["shape"], serde_json::json!([16, 16]));
    }
    assert!(calibration.with_extension("bin").is_file());

    let rewritten = dir.path().join("dit_cal.onnx");
    let said = ok(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&rewritten),
        "--calibration",
        s(&calibration),
    ]));
    assert!(said.contains("(calibrated)"), "{said}");
    let out = dir.path().join("out.npy");
    ok(fastcache(&[
        "run",
        s(&rewritten),
        "--engine",
        "ort",
        "--steps",
        "10",
        "--cfg",
        "3",
        "-o",
        s(&out),
    ]));

    // A calibration of another model is refused.
    let pixart = common::fixture("pixart_ts.onnx");
    let error = fails(fastcache(&[
        "rewrite",
        s(&pixart),
        "-o",
        s(&dir.path().join("p.onnx")),
        "--calibration",
        s(&calibration),
    ]));
    assert!(
        error.contains("calibration was made for another model"),
        "{error}"
    );
    assert!(!dir.path().join("p.onnx").exists());
}

/// FastCache's per-step policy as users drive it: `calibrate --target-speedup` chooses the
/// schedule, `rewrite --calibration` builds it with no other flag, `run` samples it on both
/// engines; a schedule that computes every step reproduces the original; per-block options are
/// refused with it.
#[test]
fn calibrate_a_schedule_then_rewrite_then_run() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let calibrate = |target: &str, file: &str| {
        let path = dir.path().join(file);
        let report = common::calibrate_dit_ts_with(&path, &["--target-speedup", target]);
        (path, report)
    };
    let (schedule, report) = calibrate("2", "schedule.json");
    for line in ["<- chosen", "computed steps: 0 1 ", "expected FLOP speedup"] {
        assert!(report.contains(line), "no '{line}' in\n{report}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&schedule).unwrap()).unwrap();
    let compute = json["schedule"]["compute"].as_array().unwrap();
    assert_eq!(compute.len(), 10);
    let computed = compute.iter().filter(|c| c.as_bool().unwrap()).count();
    assert!((3..=5).contains(&computed), "{json}");
    assert!(json["schedule"]["predicted_speedup"].as_f64().unwrap() >= 2.0);
    assert_eq!(json["blocks"], serde_json::json!([]));

    let rewritten = dir.path().join("scheduled.onnx");
    let said = ok(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&rewritten),
        "--calibration",
        s(&schedule),
    ]));
    assert!(
        said.contains(&format!("runs at {computed} of 10 steps")),
        "{said}"
    );
    for engine in ["ort", "tract"] {
        let out = dir.path().join(format!("{engine}.npy"));
        let report = common::run_steps(&rewritten, engine, 10, &out);
        assert!(
            report.contains("fastcache.skipped=[1,1,1]"),
            "{engine}: {report}"
        );
    }
    // A run of another length is told that the schedule does not fit it.
    let output = fastcache(&[
        "run",
        s(&rewritten),
        "--steps",
        "8",
        "-o",
        s(&dir.path().join("short.npy")),
    ]);
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("calibrated for 10 model calls and this run makes 8"),
        "{output:?}"
    );

    // Target 1: every step computes, and the run is the original's.
    let (exact, _) = calibrate("1", "exact.json");
    let exact_model = dir.path().join("exact.onnx");
    let output = fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&exact_model),
        "--calibration",
        s(&exact),
    ]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("computes every step"),
        "{output:?}"
    );
    for (engine, tolerance) in [("ort", 1e-6), ("tract", 1e-5)] {
        let run = |model: &std::path::Path, name: &str| {
            let out = dir.path().join(format!("{engine}-{name}.npy"));
            common::run_steps(model, engine, 10, &out);
            read_npy(&out)
        };
        let diff = relative_diff(&run(&exact_model, "exact"), &run(&original, "original"));
        assert!(diff <= tolerance, "{engine}: differs by {diff}");
    }

    // Per-block options have no meaning with a schedule; a schedule-only calibration cannot
    // build the per-block cache.
    let refused = dir.path().join("refused.onnx");
    let error = fails(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&refused),
        "--calibration",
        s(&schedule),
        "--blocks",
        "1",
    ]));
    assert!(
        error.contains("--blocks is an option of the per-block cache"),
        "{error}"
    );
    let error = fails(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&refused),
        "--calibration",
        s(&schedule),
        "--policy",
        "fastcache-per-block",
    ]));
    assert!(error.contains("holds a schedule only"), "{error}");
    assert!(!refused.exists());
    // A speedup the protected steps cannot reach is refused by name.
    let error = fails(fastcache(&[
        "calibrate",
        s(&original),
        "--steps",
        "10",
        "--runs",
        "2",
        "--target-speedup",
        "9",
        "-o",
        s(&dir.path().join("far.json")),
    ]));
    assert!(error.contains("9x FLOP speedup is out of reach"), "{error}");
}

/// FastCache's probe test as users drive it: `calibrate --decision probe` states α and the
/// false-skip rate it measured on held-out runs, `rewrite --calibration` builds it, and the
/// rewritten model skips on both engines.
#[test]
fn calibrate_a_probe_test_then_rewrite_then_run() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let calibration = dir.path().join("probe.json");
    let report = common::calibrate_dit_ts_with(
        &calibration,
        &[
            "--target-speedup",
            "1.5",
            "--decision",
            "probe",
            "--alpha",
            "0.2",
        ],
    );
    for line in [
        "with the probe test at alpha 0.2",
        "measured false-skip rate on held-out runs",
        "held out (halves)",
    ] {
        assert!(report.contains(line), "no '{line}' in\n{report}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&calibration).unwrap()).unwrap();
    let probe = &json["probe"];
    assert_eq!(probe["alpha"], 0.2);
    assert_eq!(probe["thresholds"].as_array().unwrap().len(), 10);
    assert!(
        probe["predicted_speedup"].as_f64().unwrap() >= 1.5,
        "{json}"
    );
    assert!(probe["held_out_bad_cases"].as_u64().is_some(), "{json}");

    let rewritten = dir.path().join("probed.onnx");
    let said = ok(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&rewritten),
        "--calibration",
        s(&calibration),
    ]));
    assert!(said.contains("block 0 runs every step"), "{said}");
    let mut skips = Vec::new();
    for engine in ["ort", "tract"] {
        let out = dir.path().join(format!("{engine}.npy"));
        let report = common::run_steps(&rewritten, engine, 10, &out);
        skips.push(report.matches("fastcache.skipped=[0,1,1]").count());
        assert!(skips[skips.len() - 1] > 0, "{engine}: {report}");
    }
    assert_eq!(skips[0], skips[1], "both engines make the same decisions");
    let error = fails(fastcache(&[
        "calibrate",
        s(&original),
        "--decision",
        "probe",
        "-o",
        s(&dir.path().join("no.json")),
    ]));
    assert!(
        error.contains("--decision probe needs --target-speedup"),
        "{error}"
    );
}

/// FastCache's schedule with token selection and token merging: they run inside the computed
/// steps, the schedule fires exactly as often as without them, and a schedule that computes
/// every step gives what they give alone. The probe test, which reads block 0 on every token,
/// refuses token selection.
#[test]
fn a_schedule_composes_with_token_selection_and_merging() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let rewrite = |calibration: Option<&std::path::Path>, extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let mut args = vec!["rewrite", s(&original), "-o", s(&out)];
        if let Some(c) = calibration {
            args.extend(["--calibration", s(c)]);
        }
        args.extend(extra);
        (out.clone(), ok(fastcache(&args)))
    };
    let flags = |report: &str| -> Vec<String> {
        report
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("fastcache.skipped="))
            })
            .map(str::to_string)
            .collect()
    };
    let run = |model: &std::path::Path, engine: &str, name: &str| {
        let out = dir.path().join(format!("{engine}-{name}.npy"));
        let report = common::run_steps(model, engine, 10, &out);
        (report, read_npy(&out))
    };
    let schedule = dir.path().join("schedule.json");
    common::calibrate_dit_ts_with(&schedule, &["--target-speedup", "2"]);
    let exact = dir.path().join("exact.json");
    common::calibrate_dit_ts_with(&exact, &["--target-speedup", "1"]);
    let (alone, _) = rewrite(Some(&schedule), &[], "alone.onnx");
    for (tag, passes, stat) in [
        (
            "merge",
            &["--merge-ratio", "0.5"][..],
            "fastcache.merge.tokens",
        ),
        (
            "tokens",
            &["--motion-ratio", "0.5"][..],
            "fastcache.tokens_run",
        ),
        (
            "both",
            &["--motion-ratio", "0.5", "--merge-ratio", "0.5"][..],
            "fastcache.merge.tokens",
        ),
    ] {
        let (composed, said) = rewrite(Some(&schedule), passes, &format!("{tag}.onnx"));
        assert!(said.contains("runs inside the computed steps"), "{said}");
        for engine in ["ort", "tract"] {
            let (a, _) = run(&alone, engine, "alone");
            let (c, _) = run(&composed, engine, tag);
            assert_eq!(
                flags(&a),
                flags(&c),
                "{tag} {engine}: the schedule fires as it does alone"
            );
            assert!(c.contains(stat), "{tag}: {c}");
            if tag == "tokens" {
                // A skipped step runs no token; a computed one after the first runs K.
                assert!(
                    c.contains("fastcache.skipped=[1,1,1]  fastcache.tokens_run=[0]"),
                    "{c}"
                );
            }
        }
        // Computing every step, the schedule leaves the token passes' result as it is.
        let (exact_composed, _) = rewrite(Some(&exact), passes, &format!("exact-{tag}.onnx"));
        let mut alone_passes = passes.to_vec();
        alone_passes.push("--no-cache");
        let (passes_only, _) = rewrite(None, &alone_passes, &format!("only-{tag}.onnx"));
        let (_, a) = run(&exact_composed, "ort", &format!("exact-{tag}"));
        let (_, b) = run(&passes_only, "ort", &format!("only-{tag}"));
        let diff = relative_diff(&a, &b);
        assert!(diff <= 1e-6, "{tag}: differs by {diff}");
    }
    let probe = dir.path().join("probe.json");
    common::calibrate_dit_ts_with(
        &probe,
        &[
            "--target-speedup",
            "1.3",
            "--decision",
            "probe",
            "--alpha",
            "0.2",
        ],
    );
    let error = fails(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&dir.path().join("refused.onnx")),
        "--calibration",
        s(&probe),
        "--motion-ratio",
        "0.5",
    ]));
    assert!(
        error.contains("the probe test reads block 0's output on every token"),
        "{error}"
    );
}

/// `calibrate --target-psnr` samples its candidate schedules on validation runs and keeps the
/// fastest that reaches the target; the figure it states is the one it measured.
#[test]
fn calibrate_a_schedule_for_a_psnr_target() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let calibration = dir.path().join("psnr.json");
    let report = common::calibrate_dit_ts_with(&calibration, &["--target-psnr", "30"]);
    assert!(report.contains("validation PSNR dB"), "{report}");
    assert!(report.contains("<- chosen"), "{report}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&calibration).unwrap()).unwrap();
    let psnr = json["schedule"]["validation_psnr"].as_f64().unwrap();
    assert!(psnr >= 30.0, "{json}");
    assert_eq!(json["target"]["psnr"], 30.0);
    // The chosen schedule's row in the report carries the figure the file records.
    let chosen = report.lines().find(|l| l.ends_with("<- chosen")).unwrap();
    assert!(chosen.contains(&format!("{psnr:.2}")), "{chosen} vs {psnr}");
}

/// A state output made from another state input (the forecast's second snapshot is the first
/// one's last value) must read the value that came in, on every engine. ONNX Runtime writes a
/// call's outputs into the last call's buffers unless told otherwise, which once made the second
/// snapshot a copy of the first: the forecast then silently equalled reuse.
#[test]
fn both_engines_keep_a_state_made_from_another_state() {
    use fastcache_passes::cache::step::{PeerOptions, PeerPolicy, Schedule, rewrite_with_peer};
    use fastcache_passes::ir::Model;
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    // Every third step computes; the others extrapolate the last two computed residuals (three
    // times the slope Lagrange would take, so that the random fixture shows the difference), or
    // reuse the last one.
    let steps = 10;
    let compute: Vec<bool> = (0..steps).map(|s| s % 3 == 0).collect();
    let weights = |lagrange: bool| -> Vec<Vec<f32>> {
        (0..steps)
            .map(|s| match (compute[s], s / 3) {
                (false, k) if lagrange && k >= 1 => {
                    let h = (s % 3) as f32;
                    vec![1.0 + h, -h]
                }
                (false, _) => vec![1.0, 0.0],
                (true, _) => vec![0.0, 0.0],
            })
            .collect()
    };
    let mut outputs = Vec::new();
    for (name, lagrange) in [("reuse", false), ("lagrange", true)] {
        let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
        let schedule = Schedule {
            compute: compute.clone(),
            weights: weights(lagrange),
        };
        rewrite_with_peer(
            &mut model,
            &PeerOptions::new(PeerPolicy::Schedule(schedule)),
        )
        .unwrap();
        let path = dir.path().join(format!("{name}.onnx"));
        model.save(&path, &model.default_storage(&path)).unwrap();
        for engine in ["ort", "tract"] {
            let out = dir.path().join(format!("{name}-{engine}.npy"));
            common::run_steps(&path, engine, 10, &out);
            outputs.push(read_npy(&out));
        }
    }
    let [reuse_ort, reuse_tract, lagrange_ort, lagrange_tract] = &outputs[..] else {
        unreachable!()
    };
    let forecast_effect = relative_diff(lagrange_ort, reuse_ort);
    let engines = relative_diff(lagrange_ort, lagrange_tract);
    assert!(relative_diff(reuse_ort, reuse_tract) < 1e-5);
    assert!(
        forecast_effect > 1e-4 && engines < forecast_effect / 10.0,
        "the engines differ by {engines}, the forecast from reuse by {forecast_effect}"
    );
}

#[test]
fn rewrite_refuses_bad_requests_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let before = std::fs::read(&original).unwrap();
    // Writing over the input.
    let error = fails(fastcache(&["rewrite", s(&original), "-o", s(&original)]));
    assert!(error.contains("overwrite"), "{error}");
    assert_eq!(
        std::fs::read(&original).unwrap(),
        before,
        "the input changed"
    );
    // Not a DiT.
    let out = dir.path().join("mlp.onnx");
    let mlp = common::fixture("negative/mlp.onnx");
    let error = fails(fastcache(&["rewrite", s(&mlp), "-o", s(&out)]));
    assert!(error.contains("no DiT block stack found"), "{error}");
    assert!(!out.exists(), "a refused rewrite left an output");
    // Parameters out of range, and block lists that make no sense.
    for (flag, expected) in [
        ("--alpha=0", "--alpha"),
        ("--max-skips=-2", "--max-skips"),
        ("--blocks=5", "has 3 blocks"),
        ("--blocks=2-1", "backwards"),
        ("--blocks=x", "not a block number"),
        ("--forecast=3", "order 1 or 2"),
        ("--damping=0.5", "--damping is an option of --forecast"),
    ] {
        let error = fails(fastcache(&["rewrite", s(&original), "-o", s(&out), flag]));
        assert!(error.contains(expected), "{flag}: {error}");
        assert!(!out.exists());
    }
    // Rewriting a rewritten model.
    let once = dir.path().join("once.onnx");
    ok(fastcache(&["rewrite", s(&original), "-o", s(&once)]));
    let error = fails(fastcache(&[
        "rewrite",
        s(&once),
        "-o",
        s(&dir.path().join("twice.onnx")),
    ]));
    assert!(
        error.contains("already carries a fastcache rewrite"),
        "{error}"
    );
    // A configuration that can never skip says so.
    let output = fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&dir.path().join("never.onnx")),
        "--max-skips",
        "0",
    ]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no block is ever skipped"));
}

/// The per-block cache with a forecast, as a user asks for it: the rewrite says what it built,
/// takes the warm-up the forecast needs, and both engines sample it alike.
#[test]
fn the_per_block_forecast_runs_on_both_engines() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_dynamo.onnx");
    let rewritten = dir.path().join("forecast.onnx");
    let said = ok(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&rewritten),
        "--policy",
        "fastcache-per-block",
        "--forecast",
        "2",
        "--damping",
        "0.5",
        "--force-skip",
    ]));
    assert!(said.contains("order-2 forecast, damping 0.5"), "{said}");
    let mut outputs = Vec::new();
    for engine in ["ort", "tract"] {
        let out = dir.path().join(format!("{engine}.npy"));
        let report = ok(fastcache(&[
            "run",
            s(&rewritten),
            "-o",
            s(&out),
            "--steps",
            "6",
            "--batch",
            "2",
            "--engine",
            engine,
        ]));
        // Steps 0..2 compute (warm-up 3 for three snapshots), steps 3..5 skip every block.
        assert!(report.contains("fastcache.skipped=[1,1,1]"), "{report}");
        outputs.push(read_npy(&out));
    }
    let diff = relative_diff(&outputs[0], &outputs[1]);
    assert!(diff <= 1e-5, "ORT and tract differ by {diff} (relative)");
}

/// The README's demo, on the tiny fixture so it stays quick: every stage runs and writes its files.
#[test]
fn the_demo_runs_end_to_end_on_the_embedded_engine() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("dit_ts.onnx");
    let out = dir.path().join("demo");
    let report = ok(fastcache(&[
        "demo",
        "--model",
        s(&model),
        "--steps",
        "8",
        "--target-speedup",
        "2",
        "--out",
        s(&out),
    ]));
    for stage in [
        "== 1.",
        "== 2. calibrate",
        "== 3. rewrite",
        "== 4. sample",
        "steps (# the stack ran, . forecast)",
        "PSNR",
    ] {
        assert!(report.contains(stage), "no '{stage}' in\n{report}");
    }
    for file in [
        "calibration.json",
        "model.fastcache.onnx",
        "original.npy",
        "fastcache.npy",
    ] {
        assert!(out.join(file).is_file(), "the demo did not write {file}");
    }
}

/// A cache that never fires is reported when the model runs, not left for the user to discover.
#[test]
fn run_reports_a_cache_that_never_fired() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("never.onnx");
    ok(fastcache(&[
        "rewrite",
        s(&common::fixture("dit_ts.onnx")),
        "-o",
        s(&model),
        "--max-skips",
        "0",
    ]));
    let output = fastcache(&[
        "run",
        s(&model),
        "--steps",
        "4",
        "-o",
        s(&dir.path().join("x.npy")),
    ]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the cache never fired"), "{stderr}");
}

/// The rewritten model's weights go where the user says: one file, or a data file beside it.
#[test]
fn rewrite_writes_weights_inline_or_external_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let external = dir.path().join("ext.onnx");
    ok(fastcache(&[
        "rewrite",
        s(&common::fixture("dit_ts.onnx")),
        "-o",
        s(&external),
        "--weights",
        "external",
    ]));
    assert!(dir.path().join("ext.onnx.data").is_file());
    let inline = dir.path().join("inline.onnx");
    // The external-data fixture comes back as one file when asked.
    ok(fastcache(&[
        "rewrite",
        s(&common::fixture("dit_ts_external.onnx")),
        "-o",
        s(&inline),
        "--weights",
        "inline",
    ]));
    assert!(!dir.path().join("inline.onnx.data").exists());
    for model in [&external, &inline] {
        let report = ok(fastcache(&["inspect", s(model), "--json"]));
        let json: serde_json::Value = serde_json::from_str(&report).unwrap();
        let files = json["external_data"].as_array().unwrap().len();
        assert_eq!(
            files,
            usize::from(model == &external),
            "{}",
            model.display()
        );
        ok(fastcache(&[
            "run",
            s(model),
            "--steps",
            "2",
            "-o",
            s(&dir.path().join("x.npy")),
        ]));
    }
}

/// The same rewrite, asked for twice (two processes, so two hash seeds), writes the same bytes:
/// every policy, token selection and merging, on a fixture of each exporter.
#[test]
fn the_same_rewrite_twice_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("schedule.json");
    common::calibrate_dit_ts_with(&schedule, &["--target-speedup", "1.5"]);
    let schedule = s(&schedule).to_string();
    let requests: [(&str, &[&str]); 8] = [
        ("dit_ts", &[]),
        ("dit_ts", &["--calibration", &schedule]),
        ("dit_dynamo", &["--forecast", "1"]),
        (
            "pixart_dynamo",
            &["--policy", "teacache", "--threshold", "0.1"],
        ),
        ("dit_dynamo", &["--policy", "fbcache", "--threshold", "0.1"]),
        ("pixart_ts", &["--policy", "interval", "--interval", "3"]),
        ("dit_ts", &["--motion-ratio", "0.5"]),
        ("dit_dynamo", &["--merge-ratio", "0.5", "--no-cache"]),
    ];
    for (i, (name, extra)) in requests.iter().enumerate() {
        let original = common::fixture(&format!("{name}.onnx"));
        let written: Vec<Vec<u8>> = (0..2)
            .map(|round| {
                let out = dir.path().join(format!("{i}_{round}.onnx"));
                ok(fastcache(
                    &[&["rewrite", s(&original), "-o", s(&out)][..], extra].concat(),
                ));
                std::fs::read(&out).unwrap()
            })
            .collect();
        assert!(
            written[0] == written[1],
            "{name} {extra:?}: two rewrites wrote different bytes"
        );
    }
}
