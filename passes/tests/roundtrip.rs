//! File → IR → file must reproduce every fixture byte for byte (external data files included).

mod common;

use fastcache_passes::ir::{Model, text, verify_model};
use fastcache_passes::onnx::Storage;
use prost::Message;

#[test]
fn every_fixture_round_trips_byte_for_byte() {
    for path in common::fixture_models() {
        let model = Model::load(&path).unwrap_or_else(|e| panic!("{e}"));
        verify_model(&model).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(path.file_name().unwrap());
        model.save(&out, &Storage::Preserve).unwrap();
        assert!(
            std::fs::read(&path).unwrap() == std::fs::read(&out).unwrap(),
            "{} changed in the round trip",
            path.display()
        );
        for (location, _) in model.external.files() {
            let original = path.parent().unwrap().join(&location);
            assert!(
                std::fs::read(original).unwrap()
                    == std::fs::read(dir.path().join(&location)).unwrap(),
                "external data '{location}' of {} changed",
                path.display()
            );
        }
    }
}

#[test]
fn inline_and_external_storage_keep_the_tensors() {
    for path in common::fixture_models() {
        let model = Model::load(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let inline = dir.path().join("inline.onnx");
        model.save(&inline, &Storage::Inline).unwrap();
        let external = dir.path().join("external.onnx");
        let storage = Storage::External {
            file_name: "external.onnx.data".into(),
            threshold: 16,
        };
        model.save(&external, &storage).unwrap();
        let a = Model::load(&inline).unwrap();
        let b = Model::load(&external).unwrap();
        assert!(a.external.files().is_empty());
        let original = model.to_proto().unwrap();
        for other in [&a, &b] {
            for (t0, t1) in original
                .graph
                .as_ref()
                .unwrap()
                .initializer
                .iter()
                .zip(&other.to_proto().unwrap().graph.unwrap().initializer)
            {
                assert_eq!(t0.name(), t1.name());
                assert_eq!(
                    model.external.raw_bytes(t0).unwrap(),
                    other.external.raw_bytes(t1).unwrap(),
                    "{}: tensor {} differs",
                    path.display(),
                    t0.name()
                );
            }
        }
        // Everything but tensor storage is unchanged: the inline copy of an inline model is
        // byte-identical.
        if model.external.files().is_empty() {
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(&inline).unwrap()
            );
        }
        assert!(original.encoded_len() > 0);
    }
}

#[test]
fn text_form_of_the_synthetic_model() {
    let model = Model::load(&common::test_data("synthetic.onnx")).unwrap();
    insta::assert_snapshot!(text::print_model(&model));
}

#[test]
fn round_tripped_models_run_in_onnx_runtime_like_the_originals() {
    for path in common::fixture_models() {
        let Some(npz) = common::reference_npz(&path) else {
            continue;
        };
        let model = Model::load(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Re-layout the weights too: inline for all, and external for each, so both writers are
        // checked by an independent reader.
        let inline = dir.path().join("inline.onnx");
        model.save(&inline, &Storage::Inline).unwrap();
        let external = dir.path().join("external.onnx");
        let storage = Storage::External {
            file_name: "weights.bin".into(),
            threshold: 64,
        };
        model.save(&external, &storage).unwrap();
        for saved in [&inline, &external] {
            let report = common::ort_check(saved, &npz, true);
            let diff = report["max_abs_diff"].as_f64().unwrap();
            assert!(
                diff < common::pytorch_tolerance(&path),
                "{} ({}) differs from PyTorch by {diff}",
                path.display(),
                saved.display()
            );
        }
    }
}

#[test]
fn text_form_of_the_smallest_dit_fixture() {
    let model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
    insta::assert_snapshot!(text::print_model(&model));
}
