//! No input may panic the loader: random bytes and mutated fixtures (flipped, truncated, spliced,
//! inserted bytes) must each give either a model or an error. Seeded, so failures reproduce.

mod common;

use fastcache_passes::ir::{Model, text, verify_model};
use fastcache_passes::onnx::Storage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CASES_PER_FIXTURE: usize = 700;

fn mutate(original: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = original.to_vec();
    match rng.random_range(0..5) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
        }
        1 => bytes.truncate(rng.random_range(0..bytes.len())),
        2 => {
            let at = rng.random_range(0..bytes.len());
            let noise: Vec<u8> = (0..rng.random_range(1..32)).map(|_| rng.random()).collect();
            bytes.splice(at..at, noise);
        }
        3 => {
            // Copy a run of the file over another place: keeps protobuf-looking structure.
            let len = rng.random_range(1..64.min(bytes.len()));
            let from = rng.random_range(0..bytes.len() - len);
            let to = rng.random_range(0..bytes.len() - len);
            let run = bytes[from..from + len].to_vec();
            bytes[to..to + len].copy_from_slice(&run);
        }
        _ => {
            bytes = (0..rng.random_range(0..512))
                .map(|_| rng.random())
                .collect()
        }
    }
    bytes
}

/// Everything a command does with a loaded model must be panic-free too.
fn exercise(path: &std::path::Path, out_dir: &std::path::Path) {
    let Ok(model) = Model::load(path) else {
        return;
    };
    let _ = verify_model(&model);
    let _ = text::print_model(&model);
    let _ = model.save(&out_dir.join("out.onnx"), &Storage::Inline);
}

#[test]
fn mutated_and_random_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(2505_20353);
    let fixtures = [
        common::test_data("synthetic.onnx"),
        common::fixture("dit_ts.onnx"),
        common::fixture("dit_dynamo.onnx"),
        common::fixture("dit_ts_external.onnx"),
    ];
    let mut cases = 0;
    for fixture in &fixtures {
        let original = std::fs::read(fixture).unwrap();
        // The external-data fixture's data file sits beside the mutated copy, so broken offsets
        // and lengths are exercised too.
        let data = fixture.with_extension("onnx.data");
        if data.exists() {
            std::fs::copy(&data, dir.path().join(data.file_name().unwrap())).unwrap();
        }
        let target = dir.path().join(fixture.file_name().unwrap());
        for _ in 0..CASES_PER_FIXTURE {
            std::fs::write(&target, mutate(&original, &mut rng)).unwrap();
            exercise(&target, dir.path());
            cases += 1;
        }
    }
    assert_eq!(cases, CASES_PER_FIXTURE * fixtures.len());
}
