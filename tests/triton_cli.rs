//! `fastcache triton MODEL -o REPO`: the model repositories it writes (exact configs of both
//! backends on fixtures), what it refuses and that it leaves no half-written repository.
//! python/tests/test_triton.py parses the onnxruntime config against Triton's
//! model_config.proto and serves the Python-backend repository on a real tritonserver.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, fastcache, fixture, ok, s};

/// `rewrite --policy interval --interval 2` of a fixture into `dir`.
fn rewritten(dir: &Path, fixture_name: &str) -> PathBuf {
    let out = dir.join(format!("{fixture_name}_fc.onnx"));
    ok(fastcache(&[
        "rewrite",
        s(&fixture(&format!("{fixture_name}.onnx"))),
        "-o",
        s(&out),
        "--policy",
        "interval",
        "--interval",
        "2",
    ]));
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn the_onnxruntime_backend_gets_implicit_state_with_the_bound_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = rewritten(dir.path(), "dit_ts");
    let before = std::fs::read(&model).unwrap();
    let repo = dir.path().join("repo");
    let printed = ok(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--batch",
        "2",
        "--kind",
        "gpu",
        "--instances",
        "2",
        "--max-sequence-idle-microseconds",
        "5000000",
    ]));
    assert!(printed.contains("3 state pair(s)"), "{printed}");
    assert_eq!(listing(&repo), ["dit_ts_fc"]);
    assert_eq!(listing(&repo.join("dit_ts_fc")), ["1", "config.pbtxt"]);
    assert_eq!(listing(&repo.join("dit_ts_fc/1")), ["model.onnx"]);
    // The model is served as it is; the input is untouched.
    assert_eq!(
        std::fs::read(repo.join("dit_ts_fc/1/model.onnx")).unwrap(),
        before
    );
    assert_eq!(std::fs::read(&model).unwrap(), before);
    insta::assert_snapshot!(
        "onnxruntime_config_dit_ts_batch_2",
        read(&repo.join("dit_ts_fc/config.pbtxt"))
    );
    // No staging folder is left beside the repository.
    assert_eq!(listing(dir.path()), ["dit_ts_fc.onnx", "repo"]);
}

#[test]
fn a_fixed_batch_export_needs_no_batch_flag_and_stats_can_be_served() {
    let dir = tempfile::tempdir().unwrap();
    let model = rewritten(dir.path(), "dit_ts_b2");
    let repo = dir.path().join("repo");
    ok(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--name",
        "dit",
        "--stats",
    ]));
    let config = read(&repo.join("dit/config.pbtxt"));
    assert!(config.contains("name: \"dit\""), "{config}");
    assert!(config.contains("name: \"fastcache.skipped\""), "{config}");
    assert!(config.contains("dims: [ 2, 16, 16 ]"), "{config}");
    assert!(config.contains("kind: KIND_CPU"), "{config}");
    // State never appears as an ordinary input or output.
    let io = &config[..config.find("sequence_batching").unwrap()];
    assert!(!io.contains("fastcache.step"), "{config}");
    assert!(!io.contains("fastcache.cached_residual"), "{config}");
    assert!(!io.contains("fastcache.since_full"), "{config}");
}

#[test]
fn the_python_backend_ships_model_py_and_the_host_loop() {
    let dir = tempfile::tempdir().unwrap();
    let model = rewritten(dir.path(), "dit_ts");
    let repo = dir.path().join("repo");
    ok(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--backend",
        "python",
        "--max-sequence-idle-microseconds",
        "3000000",
    ]));
    let version = repo.join("dit_ts_fc/1");
    assert_eq!(
        listing(&version),
        ["fastcache_host.py", "model.onnx", "model.py"]
    );
    assert_eq!(
        read(&version.join("fastcache_host.py")),
        read(&common::root().join("python/fastcache/host.py"))
    );
    assert!(read(&version.join("model.py")).contains("from fastcache_host import Host"));
    insta::assert_snapshot!(
        "python_config_dit_ts",
        read(&repo.join("dit_ts_fc/config.pbtxt"))
    );
}

#[test]
fn writing_again_replaces_our_model_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let model = rewritten(dir.path(), "dit_ts_b2");
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("other/1")).unwrap();
    std::fs::write(repo.join("other/config.pbtxt"), "name: \"other\"\n").unwrap();
    ok(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--name",
        "m",
    ]));
    ok(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--name",
        "m",
        "--backend",
        "python",
    ]));
    assert_eq!(listing(&repo), ["m", "other"]);
    assert!(read(&repo.join("m/config.pbtxt")).contains("backend: \"python\""));
    assert_eq!(read(&repo.join("other/config.pbtxt")), "name: \"other\"\n");
    assert_eq!(listing(dir.path()), ["dit_ts_b2_fc.onnx", "repo"]);
}

#[test]
fn an_original_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let error = fails(fastcache(&[
        "triton",
        s(&fixture("dit_ts.onnx")),
        "-o",
        s(&repo),
        "--batch",
        "1",
    ]));
    assert!(
        error.contains("no 'fastcache' metadata entry")
            && error.contains("not a model rewritten by `fastcache rewrite`"),
        "{error}"
    );
    assert!(!repo.exists());
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn a_state_dim_that_cannot_be_known_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = rewritten(dir.path(), "dit_ts");
    let repo = dir.path().join("repo");
    let error = fails(fastcache(&["triton", s(&model), "-o", s(&repo)]));
    assert!(
        error.contains("state 'fastcache.cached_residual' has shape [batch, 16, 16]")
            && error.contains("'batch' is not bound")
            && error.contains("--batch N"),
        "{error}"
    );
    let error = fails(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--dim",
        "tokens=4",
    ]));
    assert!(
        error.contains("--dim tokens=4: no input of the model has a dim named 'tokens'")
            && error.contains("batch"),
        "{error}"
    );
    let error = fails(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--dim",
        "batch",
    ]));
    assert!(error.contains("expected NAME=N"), "{error}");
    // A fixed-batch export has no batch to bind.
    let b2 = rewritten(dir.path(), "dit_ts_b2");
    let error = fails(fastcache(&[
        "triton",
        s(&b2),
        "-o",
        s(&repo),
        "--batch",
        "1",
    ]));
    assert!(
        error.contains("no input of the model has a named first dim"),
        "{error}"
    );
    // --dim binds it as --batch does.
    ok(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--dim",
        "batch=1",
    ]));
    assert!(read(&repo.join("dit_ts_fc/config.pbtxt")).contains("dims: [ 1, 4, 8, 8 ]"));
}

#[test]
fn a_repository_that_is_not_ours_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = rewritten(dir.path(), "dit_ts");
    // A folder holding a file is not a model repository.
    let notes = dir.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "keep me").unwrap();
    let error = fails(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&notes),
        "--batch",
        "1",
    ]));
    assert!(
        error.contains("is not a Triton model repository") && error.contains("todo.txt"),
        "{error}"
    );
    assert_eq!(listing(&notes), ["todo.txt"]);
    // A model folder of that name that this command did not write.
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("dit_ts_fc/1")).unwrap();
    std::fs::write(repo.join("dit_ts_fc/config.pbtxt"), "name: \"dit_ts_fc\"\n").unwrap();
    let error = fails(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&repo),
        "--batch",
        "1",
    ]));
    assert!(
        error.contains("was not written by `fastcache triton`"),
        "{error}"
    );
    assert_eq!(
        read(&repo.join("dit_ts_fc/config.pbtxt")),
        "name: \"dit_ts_fc\"\n"
    );
    // A file where the repository should be.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let error = fails(fastcache(&[
        "triton",
        s(&model),
        "-o",
        s(&file),
        "--batch",
        "1",
    ]));
    assert!(error.contains("is not a folder"), "{error}");
    // Nothing staged is left behind.
    assert_eq!(
        listing(dir.path()),
        ["dit_ts_fc.onnx", "file", "notes", "repo"]
    );
}
