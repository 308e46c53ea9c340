//! Discovery at DiT-XL/2 scale (28 blocks). Two graphs:
//! - the synthetic DiT-XL/2 (hidden 1152, 256 tokens, 16 heads; weights declared, not stored);
//! - the TorchScript export of the tiny DiT with its middle block replicated to 28 blocks: the
//!   exporter's real node pattern (about 3× the nodes per block of the synthetic one, mostly
//!   shape arithmetic), which is what discovery's cost grows with.
//!
//! Timing is printed, never asserted:
//! `cargo test --release -p fastcache-passes --test analysis_timing -- --ignored --nocapture`

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use fastcache_passes::analysis::synthetic::SyntheticDit;
use fastcache_passes::analysis::{DitStack, Shapes, discover};
use fastcache_passes::ir::Model;
use fastcache_passes::onnx::load_model;

fn stack(model: &Model) -> DitStack {
    discover(model)
        .unwrap()
        .single_stream("the test")
        .unwrap()
        .clone()
}

/// dit_ts.onnx with block 1 copied `blocks - 2` times in place of blocks 1 and 2 (weights shared
/// between the copies: analysis never reads weight values).
fn replicated_ts_dit(blocks: usize) -> Model {
    let path = common::fixture("dit_ts.onnx");
    let original = Model::load(&path).unwrap();
    let s = stack(&original);
    assert_eq!(s.blocks.len(), 3);
    // Node ids are positions in the file (the IR adds nodes in file order).
    let ids =
        |b: usize| -> HashSet<usize> { s.blocks[b].nodes.iter().map(|id| id.index()).collect() };
    let (middle, last) = (ids(1), ids(2));
    let loaded = load_model(&path).unwrap();
    let mut proto = loaded.proto;
    let graph = proto.graph.as_mut().unwrap();
    let template: Vec<_> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| middle.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    let defined: HashSet<String> = template.iter().flat_map(|n| n.output.clone()).collect();
    let mut nodes: Vec<_> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| !middle.contains(i) && !last.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    let mut input = s.blocks[1].input.clone();
    for copy in 0..blocks - 1 {
        let rename: HashMap<&str, String> = defined
            .iter()
            .map(|v| (v.as_str(), format!("{v}#{copy}")))
            .collect();
        for node in &template {
            let mut node = node.clone();
            for i in node.input.iter_mut() {
                if *i == s.blocks[1].input {
                    *i = input.clone();
                } else if let Some(new) = rename.get(i.as_str()) {
                    *i = new.clone();
                }
            }
            for o in node.output.iter_mut() {
                *o = rename[o.as_str()].clone();
            }
            node.name = node.name.map(|n| {
                n.replace(
                    "transformer_blocks.1",
                    &format!("transformer_blocks.{}", copy + 1),
                )
            });
            nodes.push(node);
        }
        input = rename[s.blocks[1].output.as_str()].clone();
    }
    // The final layer now reads the last copy's output.
    for node in nodes.iter_mut() {
        for i in node.input.iter_mut() {
            if *i == s.blocks[2].output {
                *i = input.clone();
            }
        }
    }
    graph.node = nodes;
    Model::from_proto(proto, loaded.external).unwrap()
}

#[test]
fn a_28_block_torchscript_dit_has_28_blocks() {
    let model = replicated_ts_dit(28);
    let s = stack(&model);
    assert_eq!(s.blocks.len(), 28);
    assert_eq!(s.names_agree, Some(true));
    let middle = &s.blocks[5];
    assert!(
        s.blocks[1..]
            .iter()
            .all(|b| b.nodes.len() == middle.nodes.len() && b.flops == middle.flops)
    );
}

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap()
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn discovery_time_at_dit_xl_2_size() {
    let synthetic = SyntheticDit::xl_2().build();
    let replicated = replicated_ts_dit(28);
    for (name, model) in [
        ("synthetic DiT-XL/2", &synthetic),
        ("TorchScript DiT, 28 blocks", &replicated),
    ] {
        let s = stack(model);
        assert_eq!(s.blocks.len(), 28);
        let shapes = best_of(10, || {
            std::hint::black_box(Shapes::infer(model));
        });
        let total = best_of(10, || {
            std::hint::black_box(discover(model).unwrap());
        });
        // For comparison: the verifier every pass runs afterwards.
        let verify = best_of(1, || {
            fastcache_passes::ir::verify_model(model).unwrap();
        });
        println!(
            "{name}: {} nodes, 28 blocks found; shape propagation {:.1} ms, whole discovery {:.1} ms \
             (best of 10); verify_model {:.1} ms",
            model.graph.node_count(),
            shapes.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            verify.as_secs_f64() * 1e3
        );
    }
}

/// The whole cache rewrite (discovery, 28 Ifs, verification) at DiT-XL/2 size. Printed, not
/// asserted: `cargo test --release -p fastcache-passes --test analysis_timing -- --ignored --nocapture`
#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn cache_rewrite_time_at_dit_xl_2_size() {
    use fastcache_passes::rewrite::{CacheOptions, rewrite_with_cache};
    for (name, model) in [
        ("synthetic DiT-XL/2", SyntheticDit::xl_2().build()),
        ("28-block TorchScript-pattern DiT", replicated_ts_dit(28)),
    ] {
        let nodes = model.graph.node_count();
        let time = best_of(3, || {
            let mut copy = model.clone();
            rewrite_with_cache(&mut copy, &CacheOptions::default()).unwrap();
        });
        println!(
            "{name}: {nodes} nodes, cache rewrite of 28 blocks in {:.1} ms",
            time.as_secs_f64() * 1e3
        );
    }
}
