//! The host split of a rewritten model: its segments in text form, and that each is a model the
//! ONNX checker and ONNX Runtime accept (tests/split_cli.rs runs them against the single graph).

mod common;

use common::save_inline;
use fastcache_passes::cache::step::{PeerOptions, PeerPolicy, rewrite_with_peer};
use fastcache_passes::ir::{Model, text};
use fastcache_passes::split::{Segment, manifest, split_at_ifs};

fn interval_dit() -> Model {
    let mut model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
    rewrite_with_peer(
        &mut model,
        &PeerOptions::new(PeerPolicy::Interval { interval: 2 }),
    )
    .unwrap();
    model
}

/// The segments' interfaces and the skip branch in full: what is decided before the `If`, what
/// the two branches read, and what runs after.
#[test]
fn text_form_of_the_split_smallest_dit() {
    let model = interval_dit();
    let segments = split_at_ifs(&model).unwrap();
    let mut out = serde_json::to_string_pretty(&manifest(&model, &segments)).unwrap();
    for (k, segment) in segments.iter().enumerate() {
        let models: Vec<(&str, &Model)> = match segment {
            Segment::Graph(m) => vec![("graph", m)],
            Segment::Branch {
                then, otherwise, ..
            } => vec![("then", then), ("else", otherwise)],
        };
        for (part, m) in models {
            let names = |v: &[fastcache_passes::ir::ValueInfo]| {
                v.iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push_str(&format!(
                "\n\nsegment {k} {part}: {} nodes, {} initializers\n  in:  {}\n  out: {}",
                m.graph.node_count(),
                m.graph.initializers.len(),
                names(&m.graph.inputs),
                names(&m.graph.outputs)
            ));
            if part == "then" {
                out.push_str("\n");
                out.push_str(&text::print_model(m));
            }
        }
    }
    insta::assert_snapshot!(out);
}

#[test]
fn every_segment_passes_the_checker_and_loads_in_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let model = interval_dit();
    for (k, segment) in split_at_ifs(&model).unwrap().iter().enumerate() {
        let models: Vec<&Model> = match segment {
            Segment::Graph(m) => vec![m],
            Segment::Branch {
                then, otherwise, ..
            } => vec![then, otherwise],
        };
        for (i, m) in models.into_iter().enumerate() {
            let path = save_inline(m, dir.path(), &format!("segment_{k}_{i}.onnx"));
            common::ort_loads(&path);
        }
    }
}

/// A model without `If` is one segment, the whole graph.
#[test]
fn a_model_without_an_if_is_one_segment() {
    let model = Model::load(&common::fixture("dit_ts.onnx")).unwrap();
    let segments = split_at_ifs(&model).unwrap();
    let [Segment::Graph(only)] = segments.as_slice() else {
        panic!("{} segments", segments.len());
    };
    assert_eq!(only.graph.node_count(), model.graph.node_count());
}
