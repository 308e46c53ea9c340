//! Replays the committed fuzz corpus (fuzz/corpus/TARGET.tar.zst, made by scripts/fuzz.sh), the
//! seeds and the regressions through the very functions the fuzz targets call: none may panic.
//! An ordinary test, so CI keeps every input the fuzzer once found interesting.

use std::io::Read;
use std::path::{Path, PathBuf};

use fastcache_passes::fuzzing;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("load", |bytes| drop(fuzzing::load(bytes))),
    ("ir", fuzzing::ir),
    ("printer", fuzzing::printer),
    ("discovery", fuzzing::discovery),
    ("rewrites", fuzzing::rewrites),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file());
    files.sort();
    files
}

/// Every file of a target's compressed corpus (a zstd-compressed tar of `TARGET/…`).
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let path = root().join(format!("fuzz/corpus/{target}.tar.zst"));
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fuzz.sh", path.display()));
    let tar = ruzstd::decoding::StreamingDecoder::new(file).unwrap();
    let mut archive = tar::Archive::new(tar);
    let mut inputs = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            inputs.push(bytes);
        }
    }
    inputs
}

#[test]
fn the_fuzz_corpus_seeds_and_regressions_replay_without_a_panic() {
    // Seeds and inputs that once crashed a target go through every target.
    let mut everywhere: Vec<Vec<u8>> = Vec::new();
    for dir in ["fuzz/seeds", "fuzz/regressions"] {
        for path in files(&root().join(dir)) {
            everywhere.push(std::fs::read(path).unwrap());
        }
    }
    assert!(!everywhere.is_empty(), "fuzz/seeds is empty");
    for (target, run) in TARGETS {
        let inputs = corpus(target);
        assert!(!inputs.is_empty(), "the {target} corpus is empty");
        for (i, bytes) in inputs.iter().chain(&everywhere).enumerate() {
            let outcome = std::panic::catch_unwind(|| run(bytes));
            assert!(outcome.is_ok(), "{target} panicked on input {i}");
        }
        eprintln!(
            "{target}: replayed {} inputs",
            inputs.len() + everywhere.len()
        );
    }
}
