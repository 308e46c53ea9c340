//! `fastcache bench` as users drive it, on a few steps and samples: the report is complete (every
//! policy and setting present, every file written) and consistent (speedups positive and finite,
//! skip rates in [0, 1], the uncached run infinitely close to itself, the cost model's ratio what
//! the skip pattern implies, state only where there is a cache). Speed is never asserted.

mod common;

use common::{fastcache, ok, s};

use std::path::Path;

use serde_json::Value;

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Checks what holds for every bench report; returns the variants by id.
fn check_report(dir: &Path, steps: usize, blocks: usize) -> Vec<Value> {
    for file in [
        "report.json",
        "report.md",
        "speed_vs_fidelity.png",
        "skip_maps.png",
    ] {
        let path = dir.join(file);
        assert!(
            path.is_file() && std::fs::metadata(&path).unwrap().len() > 0,
            "{file} missing"
        );
    }
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["steps"], steps);
    assert_eq!(report["blocks"], blocks);
    let variants = report["variants"].as_array().unwrap().clone();
    let markdown = std::fs::read_to_string(dir.join("report.md")).unwrap();
    for v in &variants {
        let id = v["id"].as_str().unwrap();
        let what = format!("{id}: {v}");
        let speedup = num(&v["speedup"]);
        assert!(speedup.is_finite() && speedup > 0.0, "{what}");
        assert!(num(&v["seconds_per_image"]) > 0.0, "{what}");
        let flops = num(&v["speedup_flops"]);
        assert!(flops.is_finite() && flops >= 1.0 - 1e-12, "{what}");
        let skip = num(&v["skip_rate"]);
        assert!((0.0..=1.0).contains(&skip), "{what}");
        assert!(num(&v["ssim_mean"]) <= 1.0 + 1e-12, "{what}");
        assert!(v["runs"].as_u64().unwrap() >= 1, "{what}");
        let map = v["skip_map"].as_array().unwrap();
        assert_eq!(map.len(), v["calls"].as_u64().unwrap() as usize, "{what}");
        // Each variant's memory, measured on its own in a child process.
        let memory = &v["engine_memory"];
        assert!(
            memory["peak"].as_u64().unwrap() > memory["baseline"].as_u64().unwrap(),
            "{what}"
        );
        assert!(
            map.iter()
                .all(|row| row.as_array().unwrap().len() == blocks),
            "{what}"
        );
        // The skip rate is the skip map's mean.
        let cells: Vec<f64> = map
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(num))
            .collect();
        let mean = cells.iter().sum::<f64>() / cells.len() as f64;
        assert!((mean - skip).abs() < 1e-9, "{what}");
        // Rewrites with a cache carry state; the original and token merging alone none.
        let cached = !matches!(
            v["policy"].as_str().unwrap(),
            "uncached" | "steps" | "heun" | "ab2" | "dpmpp2m"
        ) && v["parameters"]["cache"] != false;
        assert_eq!(v["state_bytes"].as_u64().unwrap() > 0, cached, "{what}");
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0, "{what}");
        assert!(
            markdown.contains(&format!(
                "| {} | {} |",
                v["policy"].as_str().unwrap(),
                v["setting"].as_str().unwrap()
            )),
            "{what}"
        );
    }
    let uncached = &variants[0];
    assert_eq!(uncached["id"], "uncached");
    assert_eq!(uncached["psnr_mean"], "inf", "the reference against itself");
    assert_eq!(uncached["psnr_min"], "inf");
    assert!((num(&uncached["ssim_mean"]) - 1.0).abs() < 1e-12);
    assert_eq!(num(&uncached["speedup_flops"]), 1.0);
    assert_eq!(num(&uncached["skip_rate"]), 0.0);
    for v in &variants {
        if matches!(
            v["policy"].as_str().unwrap(),
            "steps" | "heun" | "ab2" | "dpmpp2m"
        ) {
            // Fewer steps and solvers save whole calls: the ratio is exactly the calls'.
            let expected = steps as f64 / v["calls"].as_u64().unwrap() as f64;
            assert!((num(&v["speedup_flops"]) - expected).abs() < 1e-12, "{v}");
            assert!(num(&v["psnr_mean"]).is_finite(), "{v}");
        }
    }
    // The Pareto summary reads every family at 2x, 3x and 4x.
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let speeds: Vec<f64> = report["pareto"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| num(&row["speedup"]))
        .collect();
    assert_eq!(speeds, [2.0, 3.0, 4.0]);
    assert!(markdown.contains("## Pareto summary"), "{markdown}");
    variants
}

#[test]
fn bench_on_the_smallest_dit_writes_a_complete_consistent_report() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let model = common::fixture("dit_ts.onnx");
    let printed = ok(fastcache(&[
        "bench",
        s(&model),
        "-o",
        s(&out),
        "--steps",
        "6",
        "--samples",
        "5",
        "--batch",
        "2",
        "--cfg",
        "3",
        "--fewer-steps",
        "3",
        "--fastcache-speedups",
        "1.5,9",
        "--fastcache-errors",
        "0.1",
        "--calibration-runs",
        "2",
        "--fbcache-thresholds",
        "0,0.2",
        "--teacache-thresholds",
        "0.2",
        "--intervals",
        "2,6",
        "--merge-ratios",
        "0.5",
    ]));
    assert!(printed.contains("| policy | setting |"), "{printed}");
    let variants = check_report(&out, 6, 3);
    // The probe test cannot reach 1.5x in 6 steps on 3 blocks: left out, and said so.
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        markdown.contains("- left out: fastcache-probe: none of --fastcache-speedups"),
        "{markdown}"
    );
    let ids: Vec<&str> = variants.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "uncached",
            "steps-3",
            "dpmpp2m-3",
            "fastcache-s1.5",
            "fastcache-per-block-e0.1",
            "merge-0.5",
            "merge+cache-0.5",
            "fbcache-0",
            "fbcache-0.2",
            "teacache-0.2",
            "interval-2",
            "interval-6"
        ]
    );
    let by_id = |id: &str| variants.iter().find(|v| v["id"] == id).unwrap();
    // Three batches (2 + 2 + 1 samples), each timed once.
    assert_eq!(by_id("uncached")["runs"], 3);
    assert_eq!(by_id("interval-2")["samples"], 5);
    // Threshold 0 never skips and computes exactly the reference.
    let never = by_id("fbcache-0");
    assert_eq!(num(&never["skip_rate"]), 0.0);
    assert_eq!(never["psnr_mean"], "inf");
    // Interval 2 over 6 steps computes steps 1, 3, 5 and skips the other three: every block
    // half the time, in alternating columns of the skip map.
    let every2 = by_id("interval-2");
    assert_eq!(num(&every2["skip_rate"]), 0.5);
    let map: Vec<f64> = every2["skip_map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| num(&row[0]))
        .collect();
    assert_eq!(map, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    // Interval 6 never reaches its next full step within 6 steps: 5 of 6 steps skipped.
    assert!((num(&by_id("interval-6")["skip_rate"]) - 5.0 / 6.0).abs() < 1e-12);
    // The cost model's ratio follows the skips: with all three blocks skipped at half the steps,
    // the saved share is half the blocks' share of the FLOPs.
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert!(
        report["classifier"].is_null(),
        "no classifier for a fixture"
    );
    assert!(num(&every2["speedup_flops"]) > 1.5 && num(&every2["speedup_flops"]) < 2.0);
    // Token merging alone skips nothing; its FLOP ratio is the whole call's over the call with
    // the span on merged tokens and the merge itself, as the rewrite recorded them.
    let merged = by_id("merge-0.5");
    assert_eq!(num(&merged["skip_rate"]), 0.0);
    let flops = &merged["parameters"]["merge"]["flops_per_sample"];
    let sum = |key: &str| flops[key].as_array().unwrap().iter().map(num).sum::<f64>();
    let total = num(&report["flops_per_sample_per_call"]);
    let call = total - sum("blocks_before") + sum("blocks_after") + num(&flops["overhead"]);
    assert!(call < total, "{flops}");
    assert!(
        (num(&merged["speedup_flops"]) - total / call).abs() < 1e-9,
        "{merged}"
    );
    assert!(
        num(&merged["psnr_mean"]).is_finite(),
        "merging changes the samples"
    );
    // With the cache as well, blocks are skipped and the ratio can only grow.
    let both = by_id("merge+cache-0.5");
    assert!(num(&both["speedup_flops"]) >= num(&merged["speedup_flops"]) - 1e-9);
    assert_eq!(both["parameters"]["merge"]["merged"], 8);
    // FastCache's calibrations were recorded on other seeds than the evaluation's, and their
    // predictions stand beside what the bench counted: the schedule's exactly (its steps are
    // fixed), the per-block test's as replayed on the calibration runs.
    for id in ["fastcache-s1.5", "fastcache-per-block-e0.1"] {
        let fast = by_id(id);
        assert_eq!(fast["parameters"]["calibration_seed"], 1_000_000);
        let predicted = num(&fast["predicted_speedup_flops"]);
        assert!(predicted.is_finite() && predicted >= 1.0, "{fast}");
    }
    let scheduled = by_id("fastcache-s1.5");
    assert!(
        (num(&scheduled["predicted_speedup_flops"]) - num(&scheduled["speedup_flops"])).abs()
            < 1e-9,
        "{scheduled}"
    );
    assert!(num(&scheduled["speedup_flops"]) >= 1.5);
    // The unreachable target is left out, and the report says so.
    assert!(
        scheduled["notes"]
            .to_string()
            .contains("targets [9.0] left out"),
        "{scheduled}"
    );
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        markdown.contains("## Calibration held to its word"),
        "{markdown}"
    );
    // The solver at 3 model calls is DPM-Solver++(2M) on this epsilon model.
    assert_eq!(by_id("dpmpp2m-3")["calls"], 3);
    assert_eq!(report["seeds"], serde_json::json!([0, 2]));
}

/// The trained MNIST DiT, when it has been trained into models/trained: the classifier beside it
/// is used by default, so the Fréchet distance and class accuracy are reported.
#[test]
fn bench_on_the_trained_model_reports_distribution_quality() {
    let model = common::root().join("models/trained/mnist_dit.onnx");
    if !model.is_file() {
        eprintln!("models/trained/mnist_dit.onnx is not there: nothing to bench");
        return;
    }
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    ok(fastcache(&[
        "bench",
        s(&model),
        "-o",
        s(&out),
        "--steps",
        "8",
        "--samples",
        "10",
        "--batch",
        "10",
        "--cfg",
        "3",
        "--policies",
        "steps,solvers,fastcache-probe,fbcache,teacache,interval",
        "--fastcache-speedups",
        "1.5",
        "--calibration-runs",
        "2",
        "--fewer-steps",
        "4",
        "--fbcache-thresholds",
        "0.1",
        "--teacache-thresholds",
        "0.1",
        "--intervals",
        "2",
    ]));
    let variants = check_report(&out, 8, 6);
    assert!(out.join("samples.png").is_file(), "pixel-space samples");
    // Heun (2 calls a step) and Adams–Bashforth at the fewer-steps baseline's 4 calls.
    let ids: Vec<&str> = variants.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"heun-2") && ids.contains(&"ab2-4"), "{ids:?}");
    // FastCache's probe test skips blocks 1..5 where its test passes, and states its α and
    // the false-skip rate measured on held-out calibration runs.
    let probe = variants
        .iter()
        .find(|v| v["id"] == "fastcache-p1.5")
        .unwrap();
    assert_eq!(probe["parameters"]["alpha"], 0.1);
    assert!(
        probe["parameters"]["held_out_bad_cases"].as_u64().is_some(),
        "{probe}"
    );
    assert!(num(&probe["skip_rate"]) > 0.0, "{probe}");
    assert!(num(&probe["predicted_speedup_flops"]) >= 1.5, "{probe}");
    for v in &variants {
        let fd = num(&v["fd"]);
        assert!(fd.is_finite() && fd >= 0.0, "{v}");
        let accuracy = num(&v["accuracy"]);
        assert!((0.0..=1.0).contains(&accuracy), "{v}");
    }
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["classifier"]["features"], 128);
}

#[test]
fn bench_refuses_bad_requests_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("dit_ts.onnx");
    let trained = common::root().join("models/trained");
    let mnist_classifier = s(&trained.join("mnist_classifier.onnx")).to_string();
    let mnist_reference = s(&trained.join("mnist_reference.npz")).to_string();
    let file = dir.path().join("a_file");
    std::fs::write(&file, b"x").unwrap();
    for (args, expected) in [
        (
            vec!["--steps", "4", "--fewer-steps", "4", "--policies", "steps"],
            "--fewer-steps 4",
        ),
        (vec!["--samples", "0"], "at least 1"),
        (vec!["--classifier", "x.onnx"], "--reference"),
        (vec!["--policies", "nonsense"], "invalid value"),
        (
            vec!["--policies", "merge", "--merge-ratios", "1.5"],
            "must lie in (0, 1]",
        ),
        (
            vec![
                "--policies",
                "steps",
                "--classifier",
                &mnist_classifier,
                "--reference",
                &mnist_reference,
            ],
            "but the model makes samples of [batch, 4, 8, 8]",
        ),
    ] {
        let out = dir.path().join("out");
        let output = fastcache(
            &[
                &["bench", s(&model), "-o", s(&out), "--engine", "tract"][..],
                &args,
            ]
            .concat(),
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} should fail");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let output = fastcache(&["bench", s(&model), "-o", s(&file)]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("must be a directory"));
}

/// The trained model benched with a classifier output that is not there, or with a reference
/// file that is not one (no `mu`): clear errors naming what is wrong.
#[test]
fn bench_refuses_a_classifier_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let trained = common::root().join("models/trained");
    let model = trained.join("mnist_dit.onnx");
    let out = dir.path().join("out");
    let classifier = trained.join("mnist_classifier.onnx");
    let statistics = trained.join("mnist_reference.npz");
    let not_statistics = common::root().join("tests/data/ddim_reference.npz");
    for (reference, extra, expected) in [
        (
            &statistics,
            &["--classifier-logits", "scores"][..],
            "has no output 'scores' (--classifier-logits); its outputs are logits, features",
        ),
        (
            &not_statistics,
            &[][..],
            "ddim_reference.npz: no float64 array 'mu'",
        ),
    ] {
        let args = [
            "bench",
            s(&model),
            "-o",
            s(&out),
            "--engine",
            "tract",
            "--policies",
            "steps",
            "--steps",
            "2",
            "--fewer-steps",
            "1",
            "--classifier",
            s(&classifier),
            "--reference",
            s(reference),
        ];
        let output = fastcache(&[&args[..], extra].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{expected}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A user's export without a `fastcache.sampler` entry, described by flags alone, is benched as
/// the model with the entry: the same figures (timing aside).
#[test]
fn bench_of_an_export_without_its_sampler_entry_driven_by_flags_gives_the_same_figures() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let trained = common::root().join("models/trained");
    let original = trained.join("mnist_dit.onnx");
    let mut model = fastcache_passes::ir::Model::load(&original).unwrap();
    model
        .metadata
        .retain(|e| e.key.as_deref() != Some("fastcache.sampler"));
    let bare = dir.path().join("user_export.onnx");
    model
        .save(&bare, &fastcache_passes::onnx::Storage::Inline)
        .unwrap();
    let classifier = trained.join("mnist_classifier.onnx");
    let statistics = trained.join("mnist_reference.npz");
    let bench = |model: &Path, out: &Path, flags: &[&str]| -> Vec<Value> {
        let common_args = [
            "bench",
            s(model),
            "-o",
            s(out),
            "--steps",
            "6",
            "--samples",
            "4",
            "--batch",
            "4",
            "--cfg",
            "1.5",
            "--policies",
            "steps,solvers,interval",
            "--fewer-steps",
            "3",
            "--intervals",
            "2",
            "--classifier",
            s(&classifier),
            "--reference",
            s(&statistics),
        ];
        ok(fastcache(&[&common_args[..], flags].concat()));
        check_report(out, 6, 6)
    };
    let with_entry = bench(&original, &dir.path().join("with"), &[]);
    let by_flags = bench(
        &bare,
        &dir.path().join("flags"),
        &[
            "--objective",
            "rectified-flow",
            "--timestep-scale",
            "999",
            "--null-class",
            "10",
        ],
    );
    assert_eq!(with_entry.len(), by_flags.len());
    for (a, b) in with_entry.iter().zip(&by_flags) {
        assert_eq!(a["id"], b["id"]);
        for key in [
            "psnr_mean",
            "ssim_mean",
            "fd",
            "accuracy",
            "speedup_flops",
            "skip_rate",
            "calls",
        ] {
            assert_eq!(a[key], b[key], "{}: {key}", a["id"]);
        }
    }
}

/// `bench --split` runs every rewritten variant through its host split: the same samples as the
/// single graphs (PSNR against the uncached run, skips), the split said in each variant's notes,
/// and FastCache's schedule decided from the manifest with no condition read.
#[test]
fn bench_through_the_host_split_samples_what_the_single_graphs_sample() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("dit_ts.onnx");
    let bench = |name: &str, extra: &[&str]| -> Vec<Value> {
        let out = dir.path().join(name);
        let args = [
            "bench",
            s(&model),
            "-o",
            s(&out),
            "--policies",
            "fastcache,fbcache,interval",
            "--steps",
            "6",
            "--samples",
            "4",
            "--batch",
            "2",
            "--cfg",
            "3",
            "--fastcache-speedups",
            "1.5",
            "--calibration-runs",
            "2",
            "--fbcache-thresholds",
            "0.2",
            "--intervals",
            "2",
        ];
        ok(fastcache(&[&args[..], extra].concat()));
        check_report(&out, 6, 3)
    };
    let single = bench("single", &[]);
    let split = bench("split", &["--split"]);
    let ids = |vs: &[Value]| -> Vec<String> {
        vs.iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&single), ids(&split));
    assert!(
        ids(&split).contains(&"fastcache-s1.5".to_string()),
        "{:?}",
        ids(&split)
    );
    for (a, b) in single.iter().zip(&split) {
        let id = a["id"].as_str().unwrap();
        assert_eq!(a["skip_map"], b["skip_map"], "{id}");
        if id != "uncached" {
            let (pa, pb) = (num(&a["psnr_mean"]), num(&b["psnr_mean"]));
            assert!(
                (pa - pb).abs() <= 1e-3 * pa.abs(),
                "{id}: {pa} against {pb}"
            );
        }
        let notes = b["notes"].to_string();
        assert_eq!(
            notes.contains("run through its host split"),
            id != "uncached",
            "{id}: {notes}"
        );
        if id == "fastcache-s1.5" {
            assert!(
                notes
                    .contains("conditions read per call: 0, decided by the calibrated schedule: 1"),
                "{notes}"
            );
        }
    }
}
