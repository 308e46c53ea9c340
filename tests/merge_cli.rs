//! Token merging as users drive it: `fastcache rewrite --merge-ratio` (alone with `--no-cache`,
//! with the block cache, with token selection), `run` on ONNX Runtime and tract, refused
//! requests, and the Python example host.

mod common;

use common::{DIT_FIXTURES, fails, fastcache, ok, read_npy, relative_diff, s};

use std::path::Path;

/// `fastcache rewrite ORIGINAL -o MODEL FLAGS...` that must succeed: (stdout, stderr).
fn rewrite(original: &Path, model: &Path, flags: &[&str]) -> (String, String) {
    let output = fastcache(&[&["rewrite", s(original), "-o", s(model)][..], flags].concat());
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (ok(output), stderr)
}

/// `--merge-ratio 1` makes every token its own centre: alone (both unmerge rules) and with the
/// block cache (`--max-skips 0`) a whole sampling run is the original's on both engines, within
/// the rounding bounds of tests/tokens_cli.rs. Two tests (DiT, PixArt) so that the tract runs
/// share the cores.
fn merge_ratio_one_reproduces_the_original_run(names: &[&str]) {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for &name in names {
        let original = common::fixture(&format!("{name}.onnx"));
        let mut models = Vec::new();
        for (label, flags) in [
            ("copy", &["--no-cache", "--unmerge", "copy"][..]),
            ("residual", &["--no-cache"][..]),
            ("cached", &["--max-skips", "0"][..]),
        ] {
            let model = dir.path().join(format!("{name}_{label}.onnx"));
            let (said, warned) = rewrite(
                &original,
                &model,
                &[&["--merge-ratio", "1"][..], flags].concat(),
            );
            // The fixtures have three blocks; the default span is the middle half, here all of
            // them.
            assert!(
                said.contains("token merging: blocks 0-2 run on 16 of 16 tokens"),
                "{name} {label}: {said}"
            );
            assert!(
                warned.contains("--merge-ratio 1") && warned.contains("only costs time"),
                "{name} {label}: {warned}"
            );
            models.push((label, model));
        }
        for (engine, tolerance) in [("ort", 1e-6), ("tract", 1e-5)] {
            let reference = dir.path().join(format!("{name}_{engine}_original.npy"));
            let report = common::run_8_steps(&original, engine, &reference);
            assert!(!report.contains("fastcache.merge"), "{report}");
            let reference = read_npy(&reference);
            for (label, model) in &models {
                let out = dir.path().join(format!("{name}_{engine}_{label}.npy"));
                let report = common::run_8_steps(model, engine, &out);
                assert_eq!(
                    report.matches("fastcache.merge.tokens=[16]").count(),
                    8,
                    "{report}"
                );
                if *label == "cached" {
                    assert_eq!(
                        report.matches("fastcache.skipped=[0,0,0]").count(),
                        8,
                        "{report}"
                    );
                }
                let diff = relative_diff(&read_npy(&out), &reference);
                eprintln!("ratio 1, {name} {label} on {engine}: {diff:e}");
                assert!(
                    diff <= tolerance,
                    "{name} ({label}) on {engine}: differs from the original by {diff} (relative)"
                );
            }
        }
    }
}

#[test]
fn merge_ratio_one_reproduces_the_original_dit_run_on_both_engines() {
    let names: Vec<&str> = DIT_FIXTURES
        .into_iter()
        .filter(|n| n.starts_with("dit_"))
        .collect();
    assert!(!names.is_empty());
    merge_ratio_one_reproduces_the_original_run(&names);
}

#[test]
fn merge_ratio_one_reproduces_the_original_pixart_run_on_both_engines() {
    let names: Vec<&str> = DIT_FIXTURES
        .into_iter()
        .filter(|n| !n.starts_with("dit_"))
        .collect();
    assert!(!names.is_empty());
    merge_ratio_one_reproduces_the_original_run(&names);
}

/// Merged models (half the tokens) run on tract as on ONNX Runtime: alone with either unmerge
/// rule, with the block cache (forced skips, so the cached residuals of the merged span are
/// reused), and with token selection and the cache. Merging changes the result, and keeps it
/// finite. The engines agree to rounding (measured: below 5e-7); the centres and assignments
/// come from TopK and ArgMax, so a near-tie resolved differently would show as a far larger
/// difference than this bound.
#[test]
fn merged_models_run_on_both_engines_alike() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit_dynamo", "pixart_ts"] {
        let original = common::fixture(&format!("{name}.onnx"));
        let reference = dir.path().join(format!("{name}_original.npy"));
        common::run_8_steps(&original, "ort", &reference);
        let reference = read_npy(&reference);
        for (label, flags, said_expected, merged_stat) in [
            (
                "alone",
                &["--no-cache"][..],
                "blocks 0-2 run on 8 of 16 tokens",
                "fastcache.merge.tokens=[8]",
            ),
            (
                "copy",
                &["--no-cache", "--unmerge", "copy"][..],
                "blocks 0-2 run on 8 of 16 tokens",
                "fastcache.merge.tokens=[8]",
            ),
            (
                "cached",
                &["--force-skip"][..],
                "blocks 0-2 run on 8 of 16 tokens",
                "fastcache.merge.tokens=[8]",
            ),
            // With token selection the span reads the 8 selected tokens and merges them into 4.
            (
                "selected",
                &["--motion-ratio", "0.5"][..],
                "blocks 0-2 run on 4 of 8 tokens",
                "fastcache.merge.tokens=[4]",
            ),
        ] {
            let model = dir.path().join(format!("{name}_{label}.onnx"));
            let (said, _) = rewrite(
                &original,
                &model,
                &[&["--merge-ratio", "0.5"][..], flags].concat(),
            );
            assert!(said.contains(said_expected), "{name} {label}: {said}");
            let mut outputs = Vec::new();
            for engine in ["ort", "tract"] {
                let out = dir.path().join(format!("{name}_{label}_{engine}.npy"));
                let report = common::run_8_steps(&model, engine, &out);
                let merging_steps = if label == "selected" { 7 } else { 8 };
                assert_eq!(
                    report.matches(merged_stat).count(),
                    merging_steps,
                    "{report}"
                );
                match label {
                    // Step 1 and the warm-up step compute; every later step skips every block.
                    "cached" => {
                        assert_eq!(report.matches("fastcache.skipped=[0,0,0]").count(), 2);
                        assert_eq!(report.matches("fastcache.skipped=[1,1,1]").count(), 6);
                    }
                    // The first step runs the original blocks on all 16 tokens, unmerged.
                    "selected" => {
                        assert_eq!(report.matches("fastcache.tokens_run=[16]").count(), 1);
                        assert_eq!(report.matches("fastcache.tokens_run=[8]").count(), 7);
                        assert_eq!(report.matches("fastcache.merge.tokens=[16]").count(), 1);
                    }
                    _ => {}
                }
                let output = read_npy(&out);
                assert!(
                    output.iter().all(|v| v.is_finite()),
                    "{name} {label} {engine}"
                );
                outputs.push(output);
            }
            let engines = relative_diff(&outputs[1], &outputs[0]);
            let merging = relative_diff(&outputs[0], &reference);
            eprintln!(
                "ratio 0.5, {name} {label}: tract vs ort {engines:e}, merged vs original {merging:e}"
            );
            assert!(
                engines <= 1e-5,
                "{name} ({label}): tract and ONNX Runtime differ by {engines} (relative)"
            );
            assert!(
                merging > 1e-3,
                "{name} ({label}): merging half the tokens left the result unchanged ({merging})"
            );
        }
    }
}

/// `--merge-blocks 1-1` merges around block 1 only: the rewrite and the metadata say so, and the
/// result is neither the original's nor that of merging the whole default span.
#[test]
fn merge_blocks_chooses_the_span() {
    common::require_ort();
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let mut outputs = Vec::new();
    for (label, flags, expected) in [
        ("original", None, ""),
        (
            "one",
            Some(&["--merge-blocks", "1-1"][..]),
            "token merging: blocks 1-1 run on 8 of 16 tokens",
        ),
        (
            "default",
            Some(&[][..]),
            "token merging: blocks 0-2 run on 8 of 16 tokens",
        ),
    ] {
        let model = match flags {
            None => original.clone(),
            Some(flags) => {
                let model = dir.path().join(format!("{label}.onnx"));
                let (said, _) = rewrite(
                    &original,
                    &model,
                    &[&["--merge-ratio", "0.5", "--no-cache"][..], flags].concat(),
                );
                assert!(said.contains(expected), "{said}");
                let loaded = fastcache_passes::ir::Model::load(&model).unwrap();
                let contract = fastcache_passes::contract::Contract::from_model(&loaded)
                    .unwrap()
                    .unwrap();
                let merge = &contract.policy["merge"];
                let span = if label == "one" { [1, 1] } else { [0, 2] };
                assert_eq!(merge["blocks"], serde_json::json!(span), "{merge}");
                assert_eq!(merge["merged"], 8, "{merge}");
                model
            }
        };
        let out = dir.path().join(format!("{label}.npy"));
        let report = common::run_8_steps(&model, "ort", &out);
        if flags.is_some() {
            assert_eq!(report.matches("fastcache.merge.tokens=[8]").count(), 8);
        }
        let output = read_npy(&out);
        assert!(output.iter().all(|v| v.is_finite()), "{label}");
        outputs.push(output);
    }
    for (a, b) in [(1, 0), (1, 2)] {
        let diff = relative_diff(&outputs[a], &outputs[b]);
        eprintln!("merge-blocks: output {a} vs {b}: {diff:e}");
        assert!(diff > 1e-3, "outputs {a} and {b} differ by only {diff}");
    }
}

#[test]
fn rewrite_refuses_bad_merge_requests_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::fixture("dit_ts.onnx");
    let out = dir.path().join("out.onnx");
    for (flags, expected) in [
        (
            &["--merge-ratio", "0"][..],
            &["--merge-ratio must lie in (0, 1], got 0"][..],
        ),
        (
            &["--merge-ratio", "1.5"][..],
            &["--merge-ratio must lie in (0, 1], got 1.5"][..],
        ),
        (
            &["--merge-ratio", "nan", "--no-cache"][..],
            &["--merge-ratio must lie in (0, 1], got NaN"][..],
        ),
        (
            &["--merge-ratio", "0.5", "--merge-blocks", "2-1"][..],
            &["--merge-blocks", "'2-1' runs backwards"][..],
        ),
        (
            &["--merge-ratio", "0.5", "--merge-blocks", "0-9"][..],
            &["--merge-blocks 0-9 is not a span of this model's blocks (0 to 2)"][..],
        ),
        (
            &["--merge-ratio", "0.5", "--merge-blocks", "1,3"][..],
            &["--merge-blocks takes one span of consecutive blocks, FIRST-LAST; got '1,3'"][..],
        ),
        (
            &["--merge-ratio", "0.5", "--merge-blocks", "abc"][..],
            &["--merge-blocks", "'abc' is not a block number or range"][..],
        ),
        (
            &["--merge-ratio", "0.5", "--merge-neighbours", "0"][..],
            &["--merge-neighbours must be 1 or more, got 0"][..],
        ),
        (
            &["--merge-ratio", "0.5", "--merge-lambda", "2"][..],
            &["--merge-lambda", "it needs --motion-ratio"][..],
        ),
        (
            &["--no-proportional-attention"][..],
            &[
                "--no-proportional-attention is an option of token merging, which needs --merge-ratio",
            ][..],
        ),
        (
            &["--unmerge", "copy"][..],
            &["--unmerge is an option of token merging, which needs --merge-ratio"][..],
        ),
        (
            &[
                "--merge-blocks",
                "1-1",
                "--no-cache",
                "--motion-ratio",
                "0.5",
            ][..],
            &["--merge-blocks is an option of token merging, which needs --merge-ratio"][..],
        ),
        (
            &[
                "--merge-ratio",
                "0.5",
                "--policy",
                "teacache",
                "--threshold",
                "0.1",
            ][..],
            &["--merge-ratio is an option of --policy fastcache"][..],
        ),
        (
            &["--no-cache"][..],
            &[
                "--no-cache leaves nothing to do without --motion-ratio",
                "--merge-ratio",
            ][..],
        ),
    ] {
        let error = fails(fastcache(
            &[&["rewrite", s(&original), "-o", s(&out)][..], flags].concat(),
        ));
        for expected in expected {
            assert!(error.contains(expected), "{flags:?}: {error}");
        }
        assert!(!out.exists(), "{flags:?}: a refused rewrite left an output");
    }
    // A ratio below 1 that still keeps every token (⌈0.99 · 16⌉ = 16) says so, like ratio 1;
    // errors are about the options, not the model.
    let (said, warned) = rewrite(&original, &out, &["--merge-ratio", "0.99", "--no-cache"]);
    assert!(said.contains("16 of 16 tokens"), "{said}");
    assert!(warned.contains("M = ⌈r·T⌉ = 16 = T"), "{warned}");
    let error = fails(fastcache(&[
        "rewrite",
        s(&original),
        "-o",
        s(&dir.path().join("x.onnx")),
        "--merge-ratio",
        "0",
    ]));
    assert!(!error.contains("invalid model"), "{error}");
}

/// The example host (Python, onnxruntime only, reading the metadata contract) runs a merged
/// model with the block cache (forced skips: its state, shaped for the merged tokens, is reused)
/// like `fastcache run`.
#[test]
fn the_python_example_host_runs_a_merged_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("merged.onnx");
    let (said, _) = rewrite(
        &common::fixture("dit_ts.onnx"),
        &model,
        &["--merge-ratio", "0.5", "--force-skip"],
    );
    assert!(said.contains("8 of 16 tokens"), "{said}");
    let run = common::run_with_python_host(&model, dir.path());
    assert_eq!(run.report.matches("fastcache.merge.tokens=[8]").count(), 10);
    assert_eq!(run.report.matches("fastcache.skipped=[1,1,1]").count(), 8);
    assert_eq!(run.host_skipped, 24.0, "the host saw {}", run.report);
    eprintln!("python host vs fastcache run: {:e}", run.diff);
    assert!(
        run.diff < 1e-5,
        "python host and fastcache run differ by {} (relative)",
        run.diff
    );
}
