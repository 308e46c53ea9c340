//! `fastcache rewrite --policy fbcache|teacache|interval` as users drive it: a policy that can
//! never skip reproduces the original sampling run on ONNX Runtime, one that can skips and says so
//! in its stats, and options that belong to another policy are refused.

mod common;

use common::{fastcache, ok, s};

#[test]
fn never_skipping_peers_reproduce_the_original_run_on_onnx_runtime() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let run_args = [
        "--steps", "8", "--seed", "3", "--batch", "2", "--cfg", "2", "--engine", "ort",
    ];
    let reference = dir.path().join("original.npy");
    ok(fastcache(
        &[&["run", s(&original), "-o", s(&reference)][..], &run_args].concat(),
    ));
    let reference = fastcache::engine::read_npy_f32(&reference).unwrap();
    for (i, policy) in [
        &["--policy", "fbcache", "--threshold", "0"][..],
        &["--policy", "teacache", "--threshold", "0"],
        &["--policy", "interval", "--interval", "1"],
    ]
    .into_iter()
    .enumerate()
    {
        let model = dir.path().join(format!("p{i}.onnx"));
        let output = fastcache(&[&["rewrite", s(&original), "-o", s(&model)][..], policy].concat());
        assert!(output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("nothing is ever skipped"),
            "{policy:?}"
        );
        let out = dir.path().join(format!("p{i}.npy"));
        let report = ok(fastcache(
            &[&["run", s(&model), "-o", s(&out)][..], &run_args].concat(),
        ));
        assert!(!report.contains("fastcache.skipped=[1"), "{report}");
        let got = fastcache::engine::read_npy_f32(&out).unwrap();
        let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        // Optimised ONNX Runtime fuses differently inside an If: rounding only.
        assert!(diff <= 1e-6, "{policy:?}: differs by {diff} (relative)");
    }
    // And one that can skip does, on the embedded engine too.
    let model = dir.path().join("interval.onnx");
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
        "-o",
        s(&dir.path().join("i.npy")),
    ]));
    assert!(report.contains("fastcache.skipped=[1,1,1]"), "{report}");
}

#[test]
fn options_of_another_policy_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let out = dir.path().join("out.onnx");
    for (flags, expected) in [
        (&["--policy", "fbcache"][..], "needs --threshold"),
        (&["--policy", "interval"], "needs --interval"),
        (
            &[
                "--policy",
                "interval",
                "--interval",
                "2",
                "--threshold",
                "0.1",
            ],
            "--threshold is an option of",
        ),
        (&["--threshold", "0.1"], "--threshold is an option of"),
        (
            &["--policy", "fbcache", "--threshold", "0.1", "--blocks", "1"],
            "block 1 decides for the rest of the region, which must hold another block",
        ),
        (
            &["--policy", "interval", "--interval", "2", "--blocks", "0,2"],
            "one region of consecutive blocks",
        ),
        (
            &["--policy", "interval", "--interval", "2", "--blocks", "1-5"],
            "among the model's 3 (0 to 2)",
        ),
        (
            &[
                "--policy",
                "fbcache",
                "--threshold",
                "0.1",
                "--indicator",
                "stack-input",
            ],
            "--indicator is an option of --policy teacache",
        ),
        (
            &["--policy", "interval", "--interval", "0"],
            "--interval must be at least 1",
        ),
    ] {
        let output = fastcache(&[&["rewrite", s(&original), "-o", s(&out)][..], flags].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} should fail");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists());
    }
}
