//! MMDiT (SD3, Flux in both diffusers layouts) as users drive it: `inspect` shows both streams,
//! the step-level policies rewrite it, a rewrite that never skips reproduces the original
//! sampling run on ONNX Runtime and tract, one that skips does, and the passes that do not
//! handle two streams refuse them by name.

mod common;

use common::{fails, fastcache, ok, read_npy, relative_diff, s};

/// Every MMDiT fixture: SD3 (the last block writes no text), SD3.5 (an image-only attention in
/// block 0), Flux ≥ 0.35 (text and image joined
/// in every single block) and Flux ≤ 0.34 (joined once), through both exporters.
const MMDIT_FIXTURES: [&str; 8] = [
    "sd3_ts",
    "sd3_dynamo",
    "sd35_ts",
    "sd35_dynamo",
    "flux_ts",
    "flux_dynamo",
    "flux034_ts",
    "flux034_dynamo",
];

#[test]
fn inspect_shows_both_streams_of_every_mmdit_fixture() {
    for name in MMDIT_FIXTURES {
        let text = ok(fastcache(&[
            "inspect",
            s(&common::fixture(&format!("{name}.onnx"))),
        ]));
        let flux = name.starts_with("flux");
        let expected = if flux {
            "structure   MMDiT: 2 double blocks, 2 single blocks on the text + image tokens"
        } else {
            "structure   MMDiT: 3 double blocks"
        };
        assert!(text.contains(expected), "{name}:\n{text}");
        assert!(text.contains("T = 6"), "{name}");
        if flux {
            let layout = if name.starts_with("flux034") {
                "(joined once)"
            } else {
                "(joined in every block)"
            };
            assert!(text.contains(layout), "{name}:\n{text}");
            assert!(
                text.contains("img_ids (position ids)") && text.contains("guidance (guidance)")
            );
        }
        let json: serde_json::Value = serde_json::from_str(&ok(fastcache(&[
            "inspect",
            "--json",
            s(&common::fixture(&format!("{name}.onnx"))),
        ])))
        .unwrap();
        assert_eq!(json["structure"]["kind"], "joint", "{name}");
        let kinds: Vec<&str> = json["structure"]["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["kind"].as_str().unwrap())
            .collect();
        let expected: &[&str] = if flux {
            &["double", "double", "single", "single"]
        } else {
            &["double", "double", "double"]
        };
        assert_eq!(kinds, expected, "{name}");
    }
}

/// Threshold 0 and interval 1 never skip: the whole run must equal the original's, to rounding
/// (1e-6 of the largest value on ONNX Runtime, 1e-5 on tract, as for the single-stream DiTs).
#[test]
fn never_skipping_policies_reproduce_every_mmdit_fixture_on_both_engines() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for name in MMDIT_FIXTURES {
        let original = common::fixture(&format!("{name}.onnx"));
        for (engine, tolerance) in [("ort", 1e-6f32), ("tract", 1e-5)] {
            let run_args = [
                "--steps", "6", "--seed", "4", "--batch", "2", "--cfg", "3", "--engine", engine,
            ];
            let reference = dir.path().join(format!("{name}_{engine}.npy"));
            ok(fastcache(
                &[&["run", s(&original), "-o", s(&reference)][..], &run_args].concat(),
            ));
            let reference = read_npy(&reference);
            // tract plans each rewrite anew (slowly, in debug builds): one policy there.
            let policies: &[&[&str]] = match engine {
                "ort" => &[
                    &["--policy", "fbcache", "--threshold", "0"],
                    &["--policy", "teacache", "--threshold", "0"],
                    &["--policy", "interval", "--interval", "1"],
                    &["--policy", "fastcache-per-block", "--max-skips", "0"],
                ],
                _ => &[
                    &["--policy", "fbcache", "--threshold", "0"],
                    &["--policy", "fastcache-per-block", "--max-skips", "0"],
                ],
            };
            for (i, policy) in policies.iter().enumerate() {
                let model = dir.path().join(format!("{name}_{engine}_{i}.onnx"));
                ok(fastcache(
                    &[&["rewrite", s(&original), "-o", s(&model)][..], policy].concat(),
                ));
                let out = dir.path().join(format!("{name}_{engine}_{i}.npy"));
                let report = ok(fastcache(
                    &[&["run", s(&model), "-o", s(&out)][..], &run_args].concat(),
                ));
                assert!(!report.contains("fastcache.skipped=[1"), "{report}");
                let diff = relative_diff(&read_npy(&out), &reference);
                assert!(
                    diff <= tolerance,
                    "{name} {policy:?} on {engine}: differs by {diff} (relative)"
                );
            }
        }
        // One that skips does, and says so.
        let model = dir.path().join(format!("{name}_interval.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&model),
            "--policy",
            "interval",
            "--interval",
            "2",
        ]));
        let report = ok(fastcache(&[
            "run",
            s(&model),
            "--steps",
            "4",
            "--engine",
            "ort",
            "-o",
            s(&dir.path().join("skipping.npy")),
        ]));
        let blocks = if name.starts_with("flux") {
            "[1,1,1,1]"
        } else {
            "[1,1,1]"
        };
        assert!(
            report.contains(&format!("fastcache.skipped={blocks}")),
            "{name}:\n{report}"
        );
    }
}

/// What is not built for two streams is refused by name, and no output written: token merging
/// (the layout and what does work), the per-block forecast of the text stream, and per-block
/// caching of the blocks that join or slice the streams.
#[test]
fn passes_that_need_one_stream_refuse_mmdit_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("flux_ts.onnx");
    let out = dir.path().join("never.onnx");
    let per_block_forecast: &[&str] = &[
        "--policy",
        "fastcache-per-block",
        "--forecast",
        "1",
        "--warmup",
        "2",
    ];
    for (args, what) in [
        (
            per_block_forecast,
            "the per-block forecast of a second stream is not built",
        ),
        (&["--merge-ratio", "0.5", "--no-cache"], "token merging"),
    ] {
        let error = fails(fastcache(
            &[&["rewrite", s(&original), "-o", s(&out)][..], args].concat(),
        ));
        assert!(error.contains(what), "{args:?}: {error}");
        if what == "token merging" {
            assert!(
                error.contains("dual-stream (MMDiT) transformer: 2 double blocks, 2 single blocks"),
                "{error}"
            );
        }
        assert!(!out.exists());
    }
    // Where the layout joins the streams once, the blocks that join and slice them are left
    // out of the per-block cache, and naming one is refused.
    let old = common::fixture("flux034_ts.onnx");
    let output = fastcache(&[
        "rewrite",
        s(&old),
        "-o",
        s(&out),
        "--policy",
        "fastcache-per-block",
    ]);
    assert!(output.status.success());
    let warned = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        warned.contains("not cached: block 2 (single)")
            && warned.contains("not cached: block 3 (single)"),
        "{warned}"
    );
    std::fs::remove_file(&out).unwrap();
    let error = fails(fastcache(&[
        "rewrite",
        s(&old),
        "-o",
        s(&out),
        "--policy",
        "fastcache-per-block",
        "--blocks",
        "1-2",
    ]));
    assert!(error.contains("block 2 (single) writes"), "{error}");
    assert!(!out.exists());
}

/// FastCache's default on Flux: calibrate a schedule, rewrite with it, sample; the steps the
/// calibration marks run the stack, the others skip all four blocks.
#[test]
fn fastcache_schedule_calibrates_rewrites_and_runs_flux() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("flux_dynamo.onnx");
    let calibration = dir.path().join("flux.json");
    let printed = ok(fastcache(&[
        "calibrate",
        s(&original),
        "-o",
        s(&calibration),
        "--steps",
        "10",
        "--runs",
        "2",
        "--target-speedup",
        "2",
        "--engine",
        "ort",
    ]));
    let computed_line = printed
        .lines()
        .find(|l| l.starts_with("computed steps:"))
        .unwrap_or_else(|| panic!("{printed}"));
    let computed: Vec<usize> = computed_line
        .trim_start_matches("computed steps:")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let model = dir.path().join("flux_fc.onnx");
    ok(fastcache(&[
        "rewrite",
        s(&original),
        "--calibration",
        s(&calibration),
        "-o",
        s(&model),
    ]));
    let report = ok(fastcache(&[
        "run",
        s(&model),
        "--steps",
        "10",
        "--engine",
        "ort",
        "-o",
        s(&dir.path().join("out.npy")),
    ]));
    let skipped: Vec<bool> = report
        .lines()
        .filter_map(|l| l.split("fastcache.skipped=").nth(1))
        .map(|flags| flags.starts_with("[1,1,1,1]"))
        .collect();
    assert_eq!(skipped.len(), 10, "{report}");
    for (step, skip) in skipped.iter().enumerate() {
        assert_eq!(*skip, !computed.contains(&step), "step {step}:\n{report}");
    }
}

/// The example Python host (onnxruntime and numpy, reading only the metadata contract) samples
/// a rewritten Flux and SD3 by Euler steps as `fastcache run` does, skips included, from the
/// same noise and conditions.
#[test]
fn the_python_host_matches_fastcache_run_on_mmdit() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for (name, scale, noise_shape, text) in [
        ("flux_ts", "1", &[2usize, 16, 16][..], [6usize, 32]),
        ("sd3_dynamo", "1000", &[2, 4, 8, 8][..], [6, 32]),
    ] {
        let model = dir.path().join(format!("{name}_interval.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&common::fixture(&format!("{name}.onnx"))),
            "-o",
            s(&model),
            "--policy",
            "interval",
            "--interval",
            "2",
        ]));
        let mut rng = fastcache::sampler::rng(21);
        let write = |file: &str, array: &ndarray::ArrayD<f32>| {
            let path = dir.path().join(file);
            ndarray_npy::write_npy(&path, array).unwrap();
            path
        };
        let noise = write(
            "noise.npy",
            &fastcache::sampler::standard_normal(&mut rng, noise_shape),
        );
        let text = write(
            "text.npy",
            &fastcache::sampler::standard_normal(&mut rng, &[2, text[0], text[1]]),
        );
        let pooled = write(
            "pooled.npy",
            &fastcache::sampler::standard_normal(&mut rng, &[2, 32]),
        );
        let conditions = [
            format!("encoder_hidden_states={}", s(&text)),
            format!("pooled_projections={}", s(&pooled)),
        ];
        let rust = dir.path().join("rust.npy");
        let report = ok(fastcache(&[
            "run",
            s(&model),
            "--engine",
            "ort",
            "--noise",
            s(&noise),
            "--batch",
            "2",
            "--steps",
            "6",
            "--condition",
            &conditions[0],
            "--condition",
            &conditions[1],
            "-o",
            s(&rust),
        ]));
        let py = dir.path().join("py.npy");
        let printed = common::python_json(
            std::process::Command::new(common::python())
                .arg(common::root().join("examples/python_host.py"))
                .args([
                    s(&model),
                    "--flow",
                    "--timestep-scale",
                    scale,
                    "--noise",
                    s(&noise),
                    "--condition",
                    &conditions[0],
                    "--condition",
                    &conditions[1],
                    "--steps",
                    "6",
                    "-o",
                    s(&py),
                ]),
        );
        let host_skipped: f64 = printed["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s.as_array().unwrap())
            .map(|v| v.as_f64().unwrap())
            .sum();
        let blocks = if name.starts_with("flux") { 4.0 } else { 3.0 };
        // Interval 2 after the first step: steps 1, 3 and 5 skip every block.
        assert_eq!(host_skipped, 3.0 * blocks, "{name}: {printed}");
        let all_skipped = if blocks == 4.0 {
            "fastcache.skipped=[1,1,1,1]"
        } else {
            "fastcache.skipped=[1,1,1]"
        };
        assert_eq!(report.matches(all_skipped).count(), 3, "{report}");
        let diff = relative_diff(&read_npy(&py), &read_npy(&rust));
        assert!(
            diff <= 1e-5,
            "{name}: the Python host differs from fastcache run by {diff}"
        );
    }
}

/// `--blocks A-B` gives a peer policy its region: on Flux the double blocks alone skip together
/// (carrying the text stream to the single blocks), never skipping still reproduces the original,
/// and a region that would end where the streams are joined is refused.
#[test]
fn a_peer_region_over_the_double_blocks() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("flux_ts.onnx");
    let reference = dir.path().join("reference.npy");
    let run_args = ["--steps", "5", "--engine", "ort", "--batch", "2"];
    ok(fastcache(
        &[&["run", s(&original), "-o", s(&reference)][..], &run_args].concat(),
    ));
    for (interval, expected) in [
        ("1", "fastcache.skipped=[0,0,0,0]"),
        ("2", "fastcache.skipped=[1,1,0,0]"),
    ] {
        let model = dir.path().join(format!("double_{interval}.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&model),
            "--policy",
            "interval",
            "--interval",
            interval,
            "--blocks",
            "0-1",
        ]));
        let out = dir.path().join(format!("double_{interval}.npy"));
        let report = ok(fastcache(
            &[&["run", s(&model), "-o", s(&out)][..], &run_args].concat(),
        ));
        assert!(report.contains(expected), "{report}");
        if interval == "1" {
            let diff = relative_diff(&read_npy(&out), &read_npy(&reference));
            assert!(diff <= 1e-6, "never-skipping region differs by {diff}");
        }
    }
    let out = dir.path().join("never.onnx");
    let error = fails(fastcache(&[
        "rewrite",
        s(&common::fixture("flux034_ts.onnx")),
        "-o",
        s(&out),
        "--policy",
        "interval",
        "--interval",
        "2",
        "--blocks",
        "1-2",
    ]));
    assert!(error.contains("in another shape than it reads"), "{error}");
    let error = fails(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&out),
        "--policy",
        "interval",
        "--interval",
        "2",
        "--blocks",
        "0,2",
    ]));
    assert!(
        error.contains("one region of consecutive blocks"),
        "{error}"
    );
    assert!(!out.exists());
}

/// `bench` on SD3 (image latents) and Flux (latents packed into tokens, measured on their token
/// grid): FastCache's schedule and the peers are measured beside the uncached model; the families
/// not built for two streams are left out, and the report says why.
#[test]
fn bench_measures_sd3_and_flux_and_says_what_it_left_out() {
    common::require_ort();
    for name in ["sd3_ts", "flux_ts"] {
        bench_measures_mmdit(name);
    }
}

fn bench_measures_mmdit(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    ok(fastcache(&[
        "bench",
        s(&common::fixture(&format!("{name}.onnx"))),
        "-o",
        s(dir.path()),
        "--steps",
        "6",
        "--samples",
        "2",
        "--fastcache-speedups",
        "1.8",
    ]));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    let ids: Vec<&str> = report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    for id in [
        "uncached",
        "fastcache-s1.8",
        "fbcache-0.1",
        "teacache-0.1",
        "interval-2",
    ] {
        assert!(ids.contains(&id), "{name}: {id} missing from {ids:?}");
    }
    // Fidelity was measured, not left blank: the uncached variant is its own reference.
    let psnr = |id: &str| {
        report["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == id)
            .map(|v| v["psnr_mean"].clone())
    };
    assert!(psnr("interval-2").unwrap().is_number(), "{name}: {report}");
    let left_out: Vec<&str> = report["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for family in ["fastcache-per-block:", "merge:"] {
        assert!(
            left_out
                .iter()
                .any(|l| l.starts_with(family) && l.contains("not built for dual-stream")),
            "{left_out:?}"
        );
    }
}

/// `--conditions FILE.npz` takes every condition (and position ids) from one file, as a
/// fixture's .npz holds them: the run equals one given each condition by `--condition`, and an
/// array that names no input is refused by name.
#[test]
fn conditions_come_from_one_npz() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("flux_ts.onnx");
    let npz = common::fixture("flux_ts.npz");
    let arrays = fastcache::engine::read_npz(&npz).unwrap();
    let mut single = Vec::new();
    for name in [
        "encoder_hidden_states",
        "pooled_projections",
        "img_ids",
        "txt_ids",
    ] {
        let path = dir.path().join(format!("{name}.npy"));
        ndarray_npy::write_npy(&path, arrays.get(name).unwrap().as_f32().unwrap()).unwrap();
        single.push(format!("{name}={}", s(&path)));
    }
    let run_args = ["--steps", "3", "--batch", "2", "--engine", "ort"];
    let from_npz = dir.path().join("npz.npy");
    let printed = fastcache(
        &[
            &[
                "run",
                s(&model),
                "--conditions",
                s(&npz),
                "-o",
                s(&from_npz),
            ][..],
            &run_args,
        ]
        .concat(),
    );
    assert!(printed.status.success());
    let notes = String::from_utf8_lossy(&printed.stderr);
    assert!(
        notes.contains("'hidden_states' is not a condition; the sampler sets it"),
        "{notes}"
    );
    let from_files = dir.path().join("files.npy");
    let mut args = vec!["run", s(&model), "-o", s(&from_files)];
    for spec in &single {
        args.extend(["--condition", spec.as_str()]);
    }
    args.extend(run_args);
    ok(fastcache(&args));
    assert_eq!(read_npy(&from_npz), read_npy(&from_files));
    let error = fails(fastcache(&[
        "run",
        s(&model),
        "--conditions",
        s(&common::fixture("dit_ts.npz")),
        "-o",
        s(&dir.path().join("never.npy")),
        "--steps",
        "2",
    ]));
    assert!(
        error.contains("the model has no condition input 'class_labels'"),
        "{error}"
    );
}

/// Token selection on SD3 and Flux as users drive it, from both exporters (the dynamo exports
/// hard-code where the joint attention splits; those bounds are rewritten to follow the token
/// count): ρ = 1 reproduces the original run, ρ = 0.5 runs 8 of the 16 image tokens after the
/// first step (all 6 text tokens always run).
#[test]
fn token_selection_runs_on_mmdit_image_tokens() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "sd3_ts",
        "sd3_dynamo",
        "flux_ts",
        "flux_dynamo",
        "flux034_ts",
    ] {
        token_selection_runs_on(name, dir.path());
    }
}

fn token_selection_runs_on(name: &str, dir: &std::path::Path) {
    let original = common::fixture(&format!("{name}.onnx"));
    let run_args = [
        "--steps", "5", "--engine", "ort", "--batch", "2", "--cfg", "3",
    ];
    let reference = dir.join(format!("{name}_reference.npy"));
    ok(fastcache(
        &[&["run", s(&original), "-o", s(&reference)][..], &run_args].concat(),
    ));
    for (ratio, tokens) in [("1", "16"), ("0.5", "8")] {
        let model = dir.join(format!("{name}_tokens_{ratio}.onnx"));
        ok(fastcache(&[
            "rewrite",
            s(&original),
            "-o",
            s(&model),
            "--motion-ratio",
            ratio,
            "--no-cache",
        ]));
        let out = dir.join(format!("{name}_tokens_{ratio}.npy"));
        let report = ok(fastcache(
            &[&["run", s(&model), "-o", s(&out)][..], &run_args].concat(),
        ));
        assert!(
            report.contains(&format!("fastcache.tokens_run=[{tokens}]")),
            "{name}: {report}"
        );
        if ratio == "1" {
            let diff = relative_diff(&read_npy(&out), &read_npy(&reference));
            assert!(diff <= 1e-6, "{name}: ρ = 1 differs by {diff}");
        }
    }
}
