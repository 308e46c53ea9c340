//! What the fuzz targets (`fuzz/`, cargo-fuzz) run on arbitrary bytes, kept here so that the
//! corpus replay test in CI runs exactly the same code. Every function must return, whatever the
//! bytes: an error is a fine answer, a panic, hang or abort is a bug.
//!
//! The bytes are said to come from a file in a folder that does not exist, so no input can make
//! the loader read real files as external data.

use std::path::Path;

use crate::analysis::report::summarize;
use crate::analysis::{Shapes, discover};
use crate::cache::step::{PeerOptions, PeerPolicy, rewrite_with_peer};
use crate::ir::{Model, text, verify_model};
use crate::merge::MergeConfig;
use crate::rewrite::{CacheOptions, TokenOptions, rewrite, rewrite_with_cache};

const WHERE: &str = "/nonexistent-fuzz-folder/input.onnx";

/// The loader: protobuf decoding, tensor validation, conversion to the IR.
pub fn load(bytes: &[u8]) -> Option<Model> {
    Model::from_bytes(bytes::Bytes::copy_from_slice(bytes), Path::new(WHERE)).ok()
}

/// IR conversion and the verifier: a loaded model is verified and converted back to protobuf.
pub fn ir(bytes: &[u8]) {
    if let Some(model) = load(bytes) {
        let _ = verify_model(&model);
        let _ = model.to_proto();
    }
}

/// The text printer, on whatever loads.
pub fn printer(bytes: &[u8]) {
    if let Some(model) = load(bytes) {
        let _ = text::print_model(&model);
    }
}

/// Shape inference and discovery, with the summary `inspect` prints, on every verified model.
pub fn discovery(bytes: &[u8]) {
    let Some(model) = verified(bytes) else {
        return;
    };
    let _ = Shapes::infer(&model);
    let _ = summarize(&discover(&model));
}

/// One of the passes, chosen by the input's last byte (so that one execution costs one rewrite),
/// on whatever discovery accepts; a rewrite that succeeds must verify and convert back to
/// protobuf.
pub fn rewrites(bytes: &[u8]) {
    let Some(model) = verified(bytes) else {
        return;
    };
    if discover(&model).is_err() {
        return;
    }
    let passes: [&dyn Fn(&mut Model) -> crate::Result<()>; 4] = [
        &|m| rewrite_with_cache(m, &CacheOptions::default()).map(drop),
        &|m| {
            rewrite_with_peer(m, &PeerOptions::new(PeerPolicy::Interval { interval: 2 })).map(drop)
        },
        &|m| {
            let tokens = TokenOptions {
                motion_ratio: 0.5,
                calibration: None,
            };
            rewrite(m, None, Some(&tokens), None).map(drop)
        },
        &|m| rewrite(m, None, None, Some(&MergeConfig::new(0.5))).map(drop),
    ];
    let pass = passes[usize::from(*bytes.last().unwrap_or(&0)) % passes.len()];
    let mut model = model;
    if pass(&mut model).is_ok() {
        assert!(
            verify_model(&model).is_ok(),
            "a rewrite left an invalid graph"
        );
        assert!(model.to_proto().is_ok(), "a rewrite cannot be written");
    }
}

fn verified(bytes: &[u8]) -> Option<Model> {
    load(bytes).filter(|model| verify_model(model).is_ok())
}
