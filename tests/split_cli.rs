//! The host split as users drive it: `rewrite --split DIR` cuts the rewritten model at its
//! `If`s, and `run --split DIR` runs it segment by segment with each decision read on the host.

mod common;

use common::{fails, fastcache, ok, read_npy, relative_diff, s};

/// Every fixture (DiT, PixArt, fixed batch, float16, SD3, SD3.5, Flux, both exporters) under a
/// policy that never skips and under two that skip: the split run on ONNX Runtime equals the
/// single graph's to 1e-6 relative (the segments are the graph's own nodes, cut at its `If`s;
/// float16 models to float16 rounding), and the skips happen.
#[test]
fn the_host_split_computes_what_the_single_graph_computes_on_every_fixture() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    // Every fixture file with its inputs beside it, so that a new export is covered too.
    let fixtures: Vec<String> = common::fixtures_with_reference()
        .iter()
        .filter(|p| p.parent() == Some(common::fixture("").as_path()))
        .map(|p| common::name_of(p))
        .collect();
    assert!(fixtures.len() >= 19, "{fixtures:?}");
    let policies: [(&str, &[&str], bool); 3] = [
        ("never", &["--max-skips", "0"], false),
        ("per_block", &["--force-skip"], true),
        (
            "interval",
            &["--policy", "interval", "--interval", "2"],
            true,
        ),
    ];
    for name in &fixtures {
        let original = common::fixture(&format!("{name}.onnx"));
        for (policy, flags, skips) in policies {
            let model = dir.path().join(format!("{name}_{policy}.onnx"));
            let split = dir.path().join(format!("{name}_{policy}_split"));
            let mut args = vec![
                "rewrite",
                s(&original),
                "-o",
                s(&model),
                "--split",
                s(&split),
            ];
            args.extend_from_slice(flags);
            let report = ok(fastcache(&args));
            assert!(report.contains("host split:"), "{report}");
            let batch = if name.ends_with("_b2") { "1" } else { "2" };
            let run_args = [
                "--steps", "6", "--seed", "3", "--batch", batch, "--cfg", "3", "--engine", "ort",
            ];
            let (single, cut) = (dir.path().join("single.npy"), dir.path().join("cut.npy"));
            let a = ok(fastcache(
                &[&["run", s(&model), "-o", s(&single)][..], &run_args].concat(),
            ));
            let b = ok(fastcache(
                &[
                    &["run", s(&model), "--split", s(&split), "-o", s(&cut)][..],
                    &run_args,
                ]
                .concat(),
            ));
            assert!(b.contains("host split into"), "{b}");
            if policy == "interval" {
                // The one read of the interval's condition is all the split adds.
                let back = |report: &str| -> u64 {
                    let line = report.lines().find(|l| l.starts_with("transfer ")).unwrap();
                    line.split(" and ")
                        .nth(1)
                        .unwrap()
                        .split(' ')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                assert_eq!(back(&b), back(&a) + 1, "{name}:\n{a}\n{b}");
            }
            assert_eq!(
                a.contains("skipped=[1"),
                skips,
                "{name} {policy}: skips as expected in\n{a}"
            );
            // float16 on ONNX Runtime's CPU provider: its float32 fallbacks round where a chain
            // of them ends, and a segment boundary ends one (tests/cache_cli.rs says more).
            // ONNX Runtime optimises an `If` body, which reads its weights from the enclosing
            // graph, not quite as it optimises the same nodes as a model of their own (measured
            // with the constants copied into their segments: 0 at never-skip and with forced
            // skips on all 17 float32 fixtures, at most 1.2e-7 with interval 2; float16 at
            // never-skip 4.8e-4 and 7.0e-4).
            let bound = if name.ends_with("_f16") {
                4.0 * f32::powi(2.0, -11)
            } else {
                1e-6
            };
            let diff = relative_diff(&read_npy(&cut), &read_npy(&single));
            assert!(
                diff <= bound,
                "{name} {policy}: the split differs by {diff}"
            );
        }
    }
}

/// tract runs the same segments; its plans differ from one graph to another, so the bound is
/// its rounding (as for the rewrite itself, tests/cache_cli.rs).
#[test]
fn the_host_split_runs_on_tract_too() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let model = dir.path().join("fc.onnx");
    let split = dir.path().join("fc_split");
    ok(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&model),
        "--policy",
        "interval",
        "--interval",
        "2",
        "--split",
        s(&split),
    ]));
    let run_args = ["--steps", "8", "--seed", "5", "--batch", "2", "--cfg", "3"];
    let (single, cut) = (dir.path().join("single.npy"), dir.path().join("cut.npy"));
    let a = ok(fastcache(
        &[&["run", s(&model), "-o", s(&single)][..], &run_args].concat(),
    ));
    assert!(a.contains("skipped=[1,1,1]"), "{a}");
    ok(fastcache(
        &[
            &["run", s(&model), "--split", s(&split), "-o", s(&cut)][..],
            &run_args,
        ]
        .concat(),
    ));
    let diff = relative_diff(&read_npy(&cut), &read_npy(&single));
    assert!(diff <= 1e-5, "tract: the split differs by {diff}");
}

/// The Python example host runs a split folder as it runs a model (examples/python_host.py's
/// `SplitSession`) and matches `fastcache run --split`, forced skips included.
#[test]
fn the_python_host_runs_a_split_like_fastcache_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("forced.onnx");
    let split = dir.path().join("forced_split");
    ok(fastcache(&[
        "rewrite",
        s(&common::fixture("dit_ts.onnx")),
        "-o",
        s(&model),
        "--force-skip",
        "--split",
        s(&split),
    ]));
    let run = common::run_with_python_host_on(&model, Some(&split), dir.path());
    assert!(run.report.contains("host split into"), "{}", run.report);
    assert_eq!(run.host_skipped, 3.0 * 8.0, "{}", run.report);
    assert!(run.diff < 1e-6, "the hosts differ by {}", run.diff);
}

/// A split folder is written whole or not at all, is never written over a folder it did not
/// make, and is refused for a model it was not cut from.
#[test]
fn splits_refuse_what_is_not_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let model = dir.path().join("fc.onnx");
    let foreign = dir.path().join("mine");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    let error = fails(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&model),
        "--split",
        s(&foreign),
    ]));
    assert!(
        error.contains("is not a host split fastcache wrote"),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
        "keep me"
    );

    // Writing again over its own split replaces it.
    let split = dir.path().join("split");
    for _ in 0..2 {
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&model),
            "--split",
            s(&split),
        ]));
    }
    // The split of the per-block cache is not the split of the interval policy's model.
    let other = dir.path().join("other.onnx");
    ok(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&other),
        "--policy",
        "interval",
        "--interval",
        "2",
    ]));
    let error = fails(fastcache(&[
        "run",
        s(&other),
        "--split",
        s(&split),
        "-o",
        s(&dir.path().join("never.npy")),
        "--steps",
        "2",
    ]));
    assert!(error.contains("was cut from another model"), "{error}");
    assert!(!dir.path().join("never.npy").exists());

    // CUDA graphs need a GPU provider and the split: said before anything runs.
    let out = dir.path().join("graphs.npy");
    let base = [
        "run",
        s(&model),
        "-o",
        s(&out),
        "--steps",
        "2",
        "--engine",
        "ort",
    ];
    let error = fails(fastcache(
        &[&base[..], &["--split", s(&split), "--cuda-graphs"]].concat(),
    ));
    assert!(
        error.contains("CUDA graphs need the CUDA or TensorRT provider"),
        "{error}"
    );
    let error = fails(fastcache(&[&base[..], &["--cuda-graphs"]].concat()));
    assert!(error.contains("--split"), "{error}");
    assert!(!out.exists());
}

/// FastCache's calibrated schedule decides its `If` from the step alone: the manifest carries
/// the decision of every call, ONNX Runtime's split runner takes it from there with no read of
/// the condition, and the result is still the single graph's. tract's runner reads the
/// condition and checks the table against it at every call.
#[test]
fn a_scheduled_split_takes_its_decisions_from_the_manifest() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let calibration = dir.path().join("schedule.json");
    common::calibrate_dit_ts_with(&calibration, &["--target-speedup", "2"]);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&calibration).unwrap()).unwrap();
    let compute: Vec<bool> = json["schedule"]["compute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_bool().unwrap())
        .collect();
    assert!(compute.contains(&false), "{json}");

    let model = dir.path().join("scheduled.onnx");
    let split = dir.path().join("scheduled_split");
    ok(fastcache(&[
        "rewrite",
        s(&common::fixture("dit_ts.onnx")),
        "-o",
        s(&model),
        "--calibration",
        s(&calibration),
        "--split",
        s(&split),
    ]));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(split.join("manifest.json")).unwrap()).unwrap();
    let by_step: Vec<Vec<bool>> = manifest["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "branch")
        .filter_map(|s| serde_json::from_value(s["by_step"].clone()).ok())
        .collect();
    // Call k skips where the schedule does not compute; every call past it computes.
    let expected: Vec<bool> = compute.iter().map(|c| !c).chain([false]).collect();
    assert_eq!(by_step, [expected], "{manifest}");

    let run_args = ["--steps", "10", "--seed", "4", "--batch", "2", "--cfg", "3"];
    for (engine, bound, says) in [
        (
            "ort",
            1e-6,
            "conditions read per call: 0, decided by the calibrated schedule: 1",
        ),
        ("tract", 1e-5, "host split into"),
    ] {
        let (single, cut) = (
            dir.path().join(format!("{engine}_single.npy")),
            dir.path().join(format!("{engine}_cut.npy")),
        );
        let a = ok(fastcache(
            &[
                &["run", s(&model), "-o", s(&single), "--engine", engine][..],
                &run_args,
            ]
            .concat(),
        ));
        assert!(a.contains("fastcache.skipped=[1,1,1]"), "{engine}: {a}");
        let b = ok(fastcache(
            &[
                &["run", s(&model), "--split", s(&split), "-o", s(&cut)][..],
                &["--engine", engine],
                &run_args,
            ]
            .concat(),
        ));
        assert!(b.contains(says), "{engine}: {b}");
        assert!(b.contains("fastcache.skipped=[1,1,1]"), "{engine}: {b}");
        // The split hands over and reads back what the single graph does: no condition read.
        let transfer = |report: &str| {
            report
                .lines()
                .find(|l| l.starts_with("transfer "))
                .map(str::to_string)
        };
        if engine == "ort" {
            assert!(transfer(&b).is_some(), "{b}");
        }
        assert_eq!(transfer(&a), transfer(&b), "{engine}");
        let diff = relative_diff(&read_npy(&cut), &read_npy(&single));
        assert!(diff <= bound, "{engine}: the split differs by {diff}");
    }
}
