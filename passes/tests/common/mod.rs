//! Shared helpers for the compiler's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every committed model: the PyTorch exports in models/fixtures and the hand-made ones here.
pub fn fixture_models() -> Vec<PathBuf> {
    let mut models = Vec::new();
    for dir in [
        repo_root().join("models/fixtures"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            models.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "onnx")),
            );
        }
    }
    models.sort();
    assert!(!models.is_empty(), "no fixture models found");
    models
}

pub fn fixture(name: &str) -> PathBuf {
    let path = repo_root().join("models/fixtures").join(name);
    assert!(path.exists(), "missing fixture {}", path.display());
    path
}

pub fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}
