//! Token merging (design/method.md §3): the merge and unmerge subgraph against an independent
//! numpy computation of the method's definitions (tests/data/merge_check.py), on random inputs
//! and on inputs made of known clusters; the pass on every DiT fixture (the merge recomputed from
//! the exposed span input, the unmerge from the exposed span output, the span against the
//! original blocks run on the merged tokens alone; also after token selection, whose saliency
//! raises importance); that the checker and ONNX Runtime accept it alone, with the block cache
//! and with token selection too, and what its contract then says; its text form; and the
//! requests it refuses.

mod common;

use common::{python_json, save_inline};

use std::collections::HashSet;
use std::path::Path;

use fastcache_passes::analysis::synthetic::SyntheticDit;
use fastcache_passes::analysis::{DitStack, Shapes, discover};
use fastcache_passes::builder::Builder;
use fastcache_passes::contract::{Contract, ShapeDim};
use fastcache_passes::expose::Expose;
use fastcache_passes::ir::{Dim, Graph, Model, NodeId, ValueInfo, text, verify_model};
use fastcache_passes::merge::{
    ASSIGNMENT, CENTRES, DENSITY, IMPORTANCE, MERGED, MERGED_TOKENS_OUTPUT, MergeConfig, UNMERGED,
    Unmerge, default_span, insert_merge, insert_unmerge,
};
use fastcache_passes::onnx::tensor_proto::DataType;
use fastcache_passes::pass::run_pass;
use fastcache_passes::rewrite::{CacheOptions, TokenOptions, rewrite};
use fastcache_passes::tokens::SELECTED;

use common::DIT_FIXTURES;

const FLOAT: i32 = DataType::Float as i32;
/// The hidden size of the hand-built merge models.
const D: i64 = 16;

fn load(name: &str) -> Model {
    Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap()
}

fn stack_of(model: &Model) -> DitStack {
    discover(model)
        .unwrap()
        .single_stream("the test")
        .unwrap()
        .clone()
}

fn mode(unmerge: Unmerge) -> &'static str {
    match unmerge {
        Unmerge::Copy => "copy",
        Unmerge::Residual => "residual",
    }
}

/// The stand-in span: `output = Tanh(input) · 1.5 + 0.25`, elementwise, so [B, M, D] stays
/// [B, M, D] (merge_check.py computes the same).
fn stand_in_span(graph: &mut Graph, input: &str, output: &str) {
    let mut b = Builder::new(graph, format!("{output}."));
    let tanh = b.op("Tanh", &[input], vec![]);
    let scale = b.init_f32("scale", &[], &[1.5]);
    let scaled = b.op("Mul", &[&tanh, &scale], vec![]);
    let shift = b.init_f32("shift", &[], &[0.25]);
    b.op_into("Add", &[&scaled, &shift], vec![], output);
}

/// A merge model made of the pass's subgraph alone.
#[derive(Clone, Copy)]
struct Subgraph {
    t: i64,
    m: i64,
    k: i64,
    lambda: f64,
    saliency: bool,
    unmerge: Unmerge,
    /// Also outputs `direct`, the stand-in span on `h` itself (for M = T).
    direct: bool,
}

impl Subgraph {
    fn new(t: i64, m: i64, unmerge: Unmerge) -> Subgraph {
        Subgraph {
            t,
            m,
            k: 5,
            lambda: 0.0,
            saliency: false,
            unmerge,
            direct: false,
        }
    }

    /// h [batch, T, D] (and saliency [T]) → merge → stand-in span → unmerge → `out`, with every
    /// value of the merge an output.
    fn model(&self) -> Model {
        let (t, m) = (self.t, self.m);
        // A model with the synthetic DiT's header (ir_version 8, opset 17) and a graph of our own.
        let mut model = SyntheticDit::tiny(1).build();
        let mut graph = Graph::new("merge");
        let batch = Dim::Named("batch".into());
        let stream = |tokens: i64| vec![batch.clone(), Dim::Fixed(tokens), Dim::Fixed(D)];
        graph.inputs.push(ValueInfo::tensor("h", FLOAT, stream(t)));
        if self.saliency {
            graph
                .inputs
                .push(ValueInfo::tensor("saliency", FLOAT, vec![Dim::Fixed(t)]));
        }
        let values = insert_merge(
            &mut graph,
            "h",
            FLOAT,
            (t, m, self.k),
            self.lambda,
            self.saliency.then_some("saliency"),
        );
        stand_in_span(&mut graph, MERGED, "span_out");
        insert_unmerge(&mut graph, "span_out", &values, FLOAT, self.unmerge, "out");
        if self.direct {
            stand_in_span(&mut graph, "h", "direct");
        }
        let int64 = DataType::Int64 as i32;
        let per_token = vec![batch.clone(), Dim::Fixed(t)];
        graph.outputs = vec![
            ValueInfo::tensor(DENSITY, FLOAT, per_token.clone()),
            ValueInfo::tensor(IMPORTANCE, FLOAT, per_token.clone()),
            ValueInfo::tensor(CENTRES, int64, vec![batch.clone(), Dim::Fixed(m)]),
            ValueInfo::tensor(ASSIGNMENT, int64, per_token),
            ValueInfo::tensor(MERGED, FLOAT, stream(m)),
            ValueInfo::tensor("span_out", FLOAT, stream(m)),
            ValueInfo::tensor("out", FLOAT, stream(t)),
        ];
        if self.direct {
            graph
                .outputs
                .push(ValueInfo::tensor("direct", FLOAT, stream(t)));
        }
        model.graph = graph;
        verify_model(&model).unwrap();
        model
    }

    /// Saves the model and runs merge_check.py on it (3 samples made from `seed`).
    fn check(&self, dir: &Path, seed: u64, clusters: usize) -> serde_json::Value {
        let file = format!("merge_{}_{}_{seed}_{clusters}.onnx", self.t, self.m);
        let path = save_inline(&self.model(), dir, &file);
        let (m, k, lambda, seed, clusters) = (
            self.m.to_string(),
            self.k.to_string(),
            self.lambda.to_string(),
            seed.to_string(),
            clusters.to_string(),
        );
        let report = python_json(
            "merge_check.py",
            &[Path::new("subgraph"), &path],
            &[
                "--m",
                &m,
                "--k",
                &k,
                "--unmerge",
                mode(self.unmerge),
                "--lambda",
                &lambda,
                "--seed",
                &seed,
                "--clusters",
                &clusters,
            ],
        );
        eprintln!(
            "T={} M={} {} saliency={} seed={seed} clusters={clusters}: {report}",
            self.t,
            self.m,
            mode(self.unmerge),
            self.saliency
        );
        report
    }
}

fn f(report: &serde_json::Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key}: {report}"))
}

/// What holds on any input: every exposed value is numpy's to float32 accuracy, no centre or
/// assignment differs beyond a near-tie, centres ascend and keep their own cluster, no cluster
/// is empty. Returns the near-ties.
fn assert_matches_numpy(report: &serde_json::Value) -> f64 {
    for key in [
        "density_max_abs_diff",
        "importance_max_abs_diff",
        "merged_max_abs_diff",
    ] {
        assert!(f(report, key) < 1e-5, "{key}: {report}");
    }
    // The stand-in span of the hand-built models (fixtures: checked against a reference).
    if !report["span_max_abs_diff"].is_null() {
        assert!(f(report, "span_max_abs_diff") < 1e-5, "{report}");
    }
    // The output is up to a few units large (residual: h + update).
    assert!(
        f(report, "out_max_abs_diff") < 1e-5 * f(report, "out_scale").max(1.0),
        "{report}"
    );
    for key in [
        "centre_mismatches",
        "assignment_mismatches",
        "centres_not_ascending",
        "centre_not_own_cluster",
        "empty_clusters",
    ] {
        assert_eq!(f(report, key), 0.0, "{key}: {report}");
    }
    f(report, "centre_near_ties") + f(report, "assignment_near_ties")
}

/// Standard normal tokens: 3 seeds × both unmerge modes × with and without saliency, for two
/// sizes, against numpy.
#[test]
fn merge_and_unmerge_match_numpy_on_random_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut near_ties = 0.0;
    let mut runs = 0;
    for seed in 1..=3u64 {
        for unmerge in [Unmerge::Copy, Unmerge::Residual] {
            for saliency in [false, true] {
                let (t, m) = if seed % 2 == 1 { (24, 12) } else { (48, 16) };
                let case = Subgraph {
                    saliency,
                    lambda: if saliency {
                        1.0 + seed as f64 / 2.0
                    } else {
                        0.0
                    },
                    ..Subgraph::new(t, m, unmerge)
                };
                let report = case.check(dir.path(), seed, 0);
                assert_eq!(f(&report, "samples"), 3.0, "{report}");
                near_ties += assert_matches_numpy(&report);
                assert_eq!(
                    (report["tokens"].as_i64(), report["merged"].as_i64()),
                    (Some(t), Some(m))
                );
                assert_eq!(report["assignment_is_identity"], false, "{report}");
                runs += 1;
            }
        }
    }
    // 12 runs of 3 samples: float rounding may decide a ranking now and then, not often.
    assert!(near_ties <= 2.0, "{near_ties} near-ties in {runs} runs");
}

/// Saliency changes the centres: the same tokens with and without it (λ = 4) pick different
/// centres in at least one sample, and with it numpy still agrees.
#[test]
fn saliency_changes_the_centres() {
    let dir = tempfile::tempdir().unwrap();
    let plain = Subgraph::new(24, 8, Unmerge::Residual).check(dir.path(), 11, 0);
    let raised = Subgraph {
        saliency: true,
        lambda: 4.0,
        ..Subgraph::new(24, 8, Unmerge::Residual)
    }
    .check(dir.path(), 11, 0);
    assert_eq!(assert_matches_numpy(&plain), 0.0, "{plain}");
    assert_eq!(assert_matches_numpy(&raised), 0.0, "{raised}");
    assert_ne!(plain["centres"], raised["centres"], "{plain}\n{raised}");
}

/// C clusters of known membership (directions with |cos| < 0.5, sizes 2 to 12, noise 0.02 to
/// 0.1, random per-token scale, shuffled): with M = C the assignment is the generating partition
/// and each merged token the importance-weighted mean of its cluster; with M > C every cluster
/// still has a centre and no merged cluster mixes two generating ones.
#[test]
fn clustered_tokens_merge_into_their_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let mut near_ties = 0.0;
    for seed in 1..=4u64 {
        for (t, clusters) in [(24i64, 4usize), (48, 6), (40, 8)] {
            let c = clusters as i64;
            let unmerge = if seed % 2 == 0 {
                Unmerge::Copy
            } else {
                Unmerge::Residual
            };
            let exact = Subgraph::new(t, c, unmerge).check(dir.path(), seed, clusters);
            near_ties += assert_matches_numpy(&exact);
            assert_eq!(exact["partition_equal"], true, "{exact}");
            assert_eq!(f(&exact, "clusters_mixing_labels"), 0.0, "{exact}");
            assert_eq!(f(&exact, "labels_without_centre"), 0.0, "{exact}");
            assert!(f(&exact, "cluster_mean_max_abs_diff") < 1e-5, "{exact}");

            let more = Subgraph::new(t, c + 3, unmerge).check(dir.path(), seed, clusters);
            near_ties += assert_matches_numpy(&more);
            assert_eq!(f(&more, "labels_without_centre"), 0.0, "{more}");
            assert_eq!(f(&more, "clusters_mixing_labels"), 0.0, "{more}");
        }
    }
    assert!(near_ties <= 1.0, "{near_ties} near-ties");
}

/// r = 1 (M = T): every token is its own centre, the assignment is the identity, and with
/// `copy` the output is the span of h bit for bit (with `residual`, h + (Y − h), to rounding).
#[test]
fn keep_ratio_one_is_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, unmerge) in [(5, Unmerge::Copy), (6, Unmerge::Residual)] {
        let case = Subgraph {
            direct: true,
            ..Subgraph::new(24, 24, unmerge)
        };
        let report = case.check(dir.path(), seed, 0);
        assert_eq!(assert_matches_numpy(&report), 0.0, "{report}");
        assert_eq!(report["assignment_is_identity"], true, "{report}");
        match unmerge {
            Unmerge::Copy => {
                assert_eq!(report["direct_bitwise"], true, "{report}");
                assert_eq!(f(&report, "direct_max_abs_diff"), 0.0, "{report}");
            }
            Unmerge::Residual => assert!(f(&report, "direct_max_abs_diff") < 1e-5, "{report}"),
        }
    }
    // The same with saliency: importance changes, the centres cannot.
    let case = Subgraph {
        direct: true,
        saliency: true,
        lambda: 2.0,
        ..Subgraph::new(24, 24, Unmerge::Copy)
    };
    let report = case.check(dir.path(), 7, 0);
    assert_matches_numpy(&report);
    assert_eq!(report["direct_bitwise"], true, "{report}");
}

/// The TorchScript export with the same weights as a fixture (the dynamo exports hard-code the
/// token count, so the original span on M tokens is taken from their TorchScript twin).
fn twin(name: &str) -> &str {
    match name {
        "dit_dynamo" | "dit_ts_external" | "dit_ts_b2" | "dit_dynamo_b2" => "dit_ts",
        "pixart_dynamo" | "pixart_ts_b2" | "pixart_dynamo_b2" => "pixart_ts",
        other => other,
    }
}

/// The original's blocks `first..=last` alone on M tokens: input `ref.x` [batch, M, D] instead of
/// block `first`'s input, output block `last`'s output. Built without anything of the rewrite.
/// With `proportional`, input `ref.log_sizes` [batch, 1, 1, M] is added to the logits of every
/// softmax over [batch, heads, M, M] (self-attention on the merged tokens).
fn reference_span(
    original: &Model,
    (first, last): (usize, usize),
    m: i64,
    proportional: bool,
) -> (Model, String) {
    let mut model = original.clone();
    let stack = stack_of(&model);
    let d = stack.hidden.unwrap();
    let input = stack.blocks[first].input.clone();
    let output = stack.blocks[last].output.clone();
    let graph = &mut model.graph;
    let span: HashSet<NodeId> = stack.blocks[first..=last]
        .iter()
        .flat_map(|b| b.nodes.iter().copied())
        .collect();
    let dims = vec![stack.batch.clone(), Dim::Fixed(m), Dim::Fixed(d)];
    graph
        .inputs
        .push(ValueInfo::tensor("ref.x", FLOAT, dims.clone()));
    for &id in &span {
        if graph.node(id).inputs.contains(&input) {
            graph.update_node(id, |node| {
                for i in &mut node.inputs {
                    if *i == input {
                        *i = "ref.x".into();
                    }
                }
            });
        }
    }
    graph.value_info.clear();
    graph.outputs = vec![ValueInfo::tensor(&output, FLOAT, dims)];
    common::prune_to(graph, &output);
    // Inputs the span does not read (the latent, when the span starts after the embedding).
    let reads: HashSet<String> = graph.nodes().flat_map(|(_, n)| n.all_reads()).collect();
    graph.inputs.retain(|i| reads.contains(&i.name));
    if proportional {
        let shapes = Shapes::infer(&model);
        let softmaxes: Vec<(NodeId, String)> = model
            .graph
            .nodes()
            .filter(|(_, n)| n.op_type == "Softmax")
            .filter(|(_, n)| {
                shapes
                    .dims(&n.inputs[0])
                    .is_some_and(|d| d.len() == 4 && d[2] == Dim::Fixed(m) && d[3] == Dim::Fixed(m))
            })
            .map(|(id, n)| (id, n.inputs[0].clone()))
            .collect();
        assert!(
            !softmaxes.is_empty(),
            "no self-attention softmax in the span"
        );
        let graph = &mut model.graph;
        graph.inputs.push(ValueInfo::tensor(
            "ref.log_sizes",
            FLOAT,
            vec![
                stack.batch.clone(),
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(m),
            ],
        ));
        for (i, (id, scores)) in softmaxes.into_iter().enumerate() {
            let biased = format!("ref.biased_scores_{i}");
            graph.add_node(fastcache_passes::ir::Node::new(
                "Add",
                &[&scores, "ref.log_sizes"],
                &[&biased],
            ));
            graph.update_node(id, |node| node.inputs[0] = biased.clone());
        }
    }
    (model, output)
}

/// Rewrites fixture `name` with merging alone, exposes the span input and output and the merge's
/// values, and runs merge_check.py on it with the original span on the merged stream as the
/// reference. With `selection`, token selection (ρ = 0.5) goes first and gives the merge its
/// saliency (λ as configured). `expected` is (T, M, K).
fn check_fixture(
    name: &str,
    config: &MergeConfig,
    selection: bool,
    expected: (i64, i64, i64),
    dir: &Path,
) -> serde_json::Value {
    let original = load(name);
    let stack = stack_of(&original);
    let mut model = original.clone();
    let tokens = selection.then_some(TokenOptions {
        motion_ratio: 0.5,
        calibration: None,
    });
    let summary = rewrite(&mut model, None, tokens.as_ref(), Some(config)).unwrap();
    let merge = summary.merge.unwrap();
    let span = config
        .span
        .unwrap_or_else(|| default_span(stack.blocks.len()));
    assert_eq!(merge.span, span, "{name}");
    assert_eq!(
        (merge.tokens, merge.merged, merge.neighbours),
        expected,
        "{name}"
    );
    let (t, m, k) = expected;
    let (first, last) = span;
    // The span's input as the merge found it (with selection, block 0 reads the gathered
    // stream).
    let x = match &summary.tokens {
        Some(tokens) => tokens.spans[first].input.clone(),
        None => stack.blocks[first].input.clone(),
    };
    let y = stack.blocks[last].output.clone();
    let mut exposed = vec![
        x.clone(),
        y.clone(),
        MERGED.into(),
        CENTRES.into(),
        ASSIGNMENT.into(),
        UNMERGED.into(),
    ];
    if selection {
        exposed.extend([stack.stack_input.clone(), SELECTED.into()]);
    }
    run_pass(&mut model, &Expose::new(exposed)).unwrap();
    // Shape inference does not type density and importance (TopK's values): declared here.
    for value in [DENSITY, IMPORTANCE] {
        model.graph.outputs.push(ValueInfo::tensor(
            value,
            FLOAT,
            vec![stack.batch.clone(), Dim::Fixed(t)],
        ));
    }
    verify_model(&model).unwrap();
    let path = save_inline(&model, dir, &format!("{name}_merged.onnx"));
    let (reference, ref_y) =
        reference_span(&load(twin(name)), span, m, config.proportional_attention);
    let reference = save_inline(&reference, dir, &format!("{name}_reference.onnx"));
    let npz = common::fixture(&format!("{name}.npz"));
    let (m_arg, k_arg, lambda) = (m.to_string(), k.to_string(), config.lambda.to_string());
    let mut extra: Vec<&str> = vec![];
    if config.proportional_attention {
        extra.extend(["--ref-log-sizes", "ref.log_sizes"]);
    }
    if selection {
        extra.extend([
            "--stack-input",
            &stack.stack_input,
            "--selected",
            SELECTED,
            "--lambda",
            &lambda,
        ]);
    }
    let report = python_json(
        "merge_check.py",
        &[Path::new("fixture"), &path, &npz],
        &[
            "--x",
            &x,
            "--y",
            &y,
            "--m",
            &m_arg,
            "--k",
            &k_arg,
            "--unmerge",
            mode(config.unmerge),
            "--reference",
            reference.to_str().unwrap(),
            "--ref-x",
            "ref.x",
            "--ref-y",
            &ref_y,
        ]
        .into_iter()
        .chain(extra)
        .collect::<Vec<_>>(),
    );
    eprintln!(
        "{name} {span:?} selection={selection} M={m} K={k} {}: {report}",
        mode(config.unmerge)
    );
    assert_eq!(f(&report, "samples"), 2.0, "{name}: {report}");
    assert_eq!(report["x_shape"], serde_json::json!([2, t, 16]), "{name}");
    assert_eq!(
        report["merged_shape"],
        serde_json::json!([2, m, 16]),
        "{name}"
    );
    assert_eq!(report["y_shape"], serde_json::json!([2, m, 16]), "{name}");
    report
}

/// On every fixture, merging alone at r = 0.5 (the default span, K and unmerge): the merge
/// recomputed in numpy from the exposed span input, the unmerge from the exposed span output,
/// and the span's output against the original blocks run on the merged stream alone. Then, on
/// two fixtures, a later span, r = 0.3, `copy`, and K = 100 (used as T − 1 = 15).
#[test]
fn the_pass_on_every_fixture_computes_the_method() {
    let dir = tempfile::tempdir().unwrap();
    let mut near_ties = 0.0;
    for name in DIT_FIXTURES {
        let report = check_fixture(name, &MergeConfig::new(0.5), false, (16, 8, 5), dir.path());
        near_ties += assert_matches_numpy(&report);
        assert!(
            f(&report, "span_vs_reference_max_abs_diff") < 1e-4,
            "{name}: {report}"
        );
    }
    let other = MergeConfig {
        neighbours: 100,
        span: Some((1, 2)),
        unmerge: Unmerge::Copy,
        proportional_attention: false,
        ..MergeConfig::new(0.3)
    };
    for name in ["dit_ts", "pixart_dynamo"] {
        let report = check_fixture(name, &other, false, (16, 5, 15), dir.path());
        near_ties += assert_matches_numpy(&report);
        assert!(
            f(&report, "span_vs_reference_max_abs_diff") < 1e-4,
            "{name}: {report}"
        );
    }
    // After token selection (K = 8 of 16), with its saliency raising importance (λ = 1, and 3).
    for name in ["dit_ts", "pixart_dynamo"] {
        for lambda in [1.0, 3.0] {
            let config = MergeConfig {
                lambda,
                ..MergeConfig::new(0.5)
            };
            let report = check_fixture(name, &config, true, (8, 4, 5), dir.path());
            near_ties += assert_matches_numpy(&report);
            assert!(
                f(&report, "span_vs_reference_max_abs_diff") < 1e-4,
                "{name}: {report}"
            );
        }
    }
    assert!(near_ties <= 1.0, "{near_ties} near-ties");
}

/// The batch dim (2 in the fixed-batch fixtures) and the token and hidden dims of a contract's
/// state shape.
fn stream_shape(name: &str, tokens: i64) -> Vec<ShapeDim> {
    vec![
        if name.ends_with("_b2") {
            ShapeDim::Fixed(2)
        } else {
            ShapeDim::Named("batch".into())
        },
        ShapeDim::Fixed(tokens),
        ShapeDim::Fixed(16),
    ]
}

/// Rewrites a fixture with merging and, optionally, the block cache and token selection; checks
/// the contract: stats include the merge's token count, the policy says M, and every cached
/// block's state has the token count of the stream that block runs on (`tokens_of(block)`).
/// Saves it, runs ONNX Runtime and the checker on it and returns ort_check.py's report.
fn composed(
    name: &str,
    cache: bool,
    selection: bool,
    merge: &MergeConfig,
    tokens_of: impl Fn(usize) -> i64,
    dir: &Path,
) -> serde_json::Value {
    let mut model = load(name);
    let selection = selection.then_some(TokenOptions {
        motion_ratio: 0.5,
        calibration: None,
    });
    let summary = rewrite(
        &mut model,
        cache.then(CacheOptions::default).as_ref(),
        selection.as_ref(),
        Some(merge),
    )
    .unwrap();
    let merged = summary.merge.unwrap().merged;
    let contract = Contract::from_model(&model).unwrap().unwrap();
    assert!(
        contract.stats.iter().any(|s| s == MERGED_TOKENS_OUTPUT),
        "{name}: {:?}",
        contract.stats
    );
    assert_eq!(contract.policy["merge"]["merged"], merged, "{name}");
    let state = |input: &str| contract.state.iter().find(|p| p.input == input);
    for block in 0..3 {
        for kind in ["ref_in", "ref_out"] {
            let input = format!("fastcache.b{block}.{kind}");
            match (cache, state(&input)) {
                (true, Some(pair)) => {
                    assert_eq!(
                        pair.shape,
                        stream_shape(name, tokens_of(block)),
                        "{name}: {input}"
                    );
                    assert_eq!(pair.output, format!("{input}.next"));
                }
                (false, None) => {}
                (_, got) => panic!("{name}: {input}: {got:?}"),
            }
        }
    }
    if selection.is_some() {
        let ref_x = state("fastcache.tokens.ref_x").unwrap();
        assert_eq!(ref_x.shape, stream_shape(name, 16), "{name}");
    } else if !cache {
        assert!(contract.state.is_empty(), "{name}: {:?}", contract.state);
    }
    let file = format!("{name}_{cache}_{}.onnx", selection.is_some());
    let path = save_inline(&model, dir, &file);
    let report = common::ort_check(&path, &common::fixture(&format!("{name}.npz")), true);
    assert_eq!(
        report["outputs"][MERGED_TOKENS_OUTPUT],
        serde_json::json!([1]),
        "{name}"
    );
    if cache {
        for block in 0..3 {
            assert_eq!(
                report["outputs"][format!("fastcache.b{block}.ref_in.next")],
                serde_json::json!([2, tokens_of(block), 16]),
                "{name}: block {block}"
            );
        }
    }
    eprintln!(
        "{name} cache={cache} selection={} span={:?}: {report}",
        selection.is_some(),
        merge.span
    );
    report
}

/// Every fixture, merged at r = 0.5 over the default span (all 3 blocks) and over block 1 alone:
/// alone, with the block cache, and with token selection (ρ = 0.5) and the cache; the ONNX
/// checker and ONNX Runtime accept each, and each contract is what the streams are: the cache's
/// state has M tokens inside the merged span, T outside (T = 16, or K = 8 with selection, whose
/// merge then makes M = 4). The first step of merge + cache computes every block, so it is as far
/// from PyTorch's output as merge alone; with selection it is PyTorch's.
#[test]
fn merging_composes_with_the_cache_and_token_selection_on_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let whole = MergeConfig::new(0.5);
    let middle = MergeConfig {
        span: Some((1, 1)),
        ..MergeConfig::new(0.5)
    };
    for name in DIT_FIXTURES {
        for (merge, inside) in [(&whole, 0..=2), (&middle, 1..=1)] {
            let tokens = |t: i64, m: i64| {
                let inside = inside.clone();
                move |block: usize| if inside.contains(&block) { m } else { t }
            };
            let alone = composed(name, false, false, merge, tokens(16, 8), dir.path());
            let diff = f(&alone, "max_abs_diff");
            // Merging approximates: the output moves, but stays a sample of the same scale.
            assert!(diff > 1e-6 && diff < 10.0, "{name}: {alone}");
            let cached = composed(name, true, false, merge, tokens(16, 8), dir.path());
            assert!(
                (f(&cached, "max_abs_diff") - diff).abs() < 1e-5,
                "{name}: {cached}"
            );
            let selected = composed(name, true, true, merge, tokens(8, 4), dir.path());
            // With token selection the first step's output comes from its copy of the original
            // blocks over all tokens (the merged K-token pass runs, but only primes the state).
            assert!(f(&selected, "max_abs_diff") < 1e-4, "{name}: {selected}");
            assert_eq!(
                selected["outputs"]["fastcache.tokens_run"],
                serde_json::json!([1])
            );
        }
    }
}

#[test]
fn text_form_of_the_merged_smallest_dit() {
    let mut model = load("dit_ts");
    rewrite(&mut model, None, None, Some(&MergeConfig::new(0.5))).unwrap();
    insta::assert_snapshot!(text::print_model(&model));
}

/// Bad requests are refused before anything changes, with the option and the value named.
#[test]
fn bad_merge_requests_are_refused() {
    let base = MergeConfig::new(0.5);
    let cases = [
        (
            MergeConfig::new(0.0),
            "--merge-ratio must lie in (0, 1], got 0",
        ),
        (
            MergeConfig::new(1.5),
            "--merge-ratio must lie in (0, 1], got 1.5",
        ),
        (
            MergeConfig::new(-0.5),
            "--merge-ratio must lie in (0, 1], got -0.5",
        ),
        (
            MergeConfig::new(f64::NAN),
            "--merge-ratio must lie in (0, 1], got NaN",
        ),
        (
            MergeConfig {
                span: Some((2, 9)),
                ..base.clone()
            },
            "--merge-blocks 2-9 is not a span of this model's blocks (0 to 2)",
        ),
        (
            MergeConfig {
                span: Some((2, 1)),
                ..base.clone()
            },
            "--merge-blocks 2-1 is not a span of this model's blocks (0 to 2)",
        ),
        (
            MergeConfig {
                neighbours: 0,
                ..base.clone()
            },
            "--merge-neighbours must be 1 or more, got 0",
        ),
        (
            MergeConfig {
                lambda: -0.5,
                ..base.clone()
            },
            "--merge-lambda must be a finite number of 0 or more, got -0.5",
        ),
        (
            MergeConfig {
                lambda: f64::INFINITY,
                ..base.clone()
            },
            "--merge-lambda must be a finite number of 0 or more, got inf",
        ),
    ];
    let original = load("dit_ts");
    let before = text::print_model(&original);
    let selection = TokenOptions {
        motion_ratio: 0.5,
        calibration: None,
    };
    // Alone, with the cache, and with token selection: refused with the same message before any
    // pass changes the model.
    let combinations = [
        (None, None),
        (Some(CacheOptions::default()), None),
        (None, Some(selection)),
    ];
    for (config, expected) in &cases {
        for (cache, tokens) in &combinations {
            let mut model = original.clone();
            let error = rewrite(&mut model, cache.as_ref(), tokens.as_ref(), Some(config))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{error}");
            assert_eq!(
                text::print_model(&model),
                before,
                "a refused rewrite changed the model ({expected}, cache {}, selection {})",
                cache.is_some(),
                tokens.is_some()
            );
        }
    }
    // K larger than T − 1 is no error: it is used as T − 1.
    let mut model = original.clone();
    let wide = MergeConfig {
        neighbours: 1000,
        ..base
    };
    let summary = rewrite(&mut model, None, None, Some(&wide)).unwrap();
    assert_eq!(summary.merge.unwrap().neighbours, 15);
}

/// The merge adds only operators that ONNX Runtime and TensorRT's ONNX parser both run, with
/// every shape static: no scatter (ONNX has no scatter-mean, TensorRT no scatter reduction), no
/// loop, no data-dependent shape; TopK's k and every axes input are initializers.
#[test]
fn the_merge_uses_only_operators_every_runtime_runs() {
    const ALLOWED: [&str; 24] = [
        "Add",
        "And",
        "ArgMax",
        "Cast",
        "Div",
        "Equal",
        "Gather",
        "Greater",
        "Identity",
        "Less",
        "Log",
        "MatMul",
        "Max",
        "Mul",
        "Or",
        "ReduceSum",
        "Reshape",
        "Sqrt",
        "Squeeze",
        "Sub",
        "TopK",
        "Transpose",
        "Unsqueeze",
        "Where",
    ];
    for selection in [false, true] {
        let original = load("pixart_dynamo");
        let mut model = original.clone();
        let tokens = selection.then_some(TokenOptions {
            motion_ratio: 0.5,
            calibration: None,
        });
        rewrite(
            &mut model,
            None,
            tokens.as_ref(),
            Some(&MergeConfig::new(0.5)),
        )
        .unwrap();
        let initializers: HashSet<&str> = model
            .graph
            .initializers
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        let mut merge_nodes = 0;
        for (_, node) in model.graph.nodes() {
            let added = node
                .outputs
                .iter()
                .any(|o| o.starts_with("fastcache.merge."));
            if !added {
                continue;
            }
            merge_nodes += 1;
            assert!(
                ALLOWED.contains(&node.op_type.as_str()),
                "the merge adds {} ({})",
                node.op_type,
                node.label()
            );
            let constant_inputs: &[usize] = match node.op_type.as_str() {
                "TopK" => &[1],
                "ReduceSum" | "Squeeze" | "Unsqueeze" => &[1],
                _ => &[],
            };
            for &i in constant_inputs {
                assert!(
                    initializers.contains(node.inputs[i].as_str()),
                    "{}: input {i} is not a constant",
                    node.label()
                );
            }
        }
        assert!(merge_nodes > 40, "{merge_nodes} merge nodes");
    }
}

/// Fixed-batch exports (batch × heads folded into constants by the exporters) take both token
/// passes, and at ratio 1 both reproduce the original over a run of steps.
#[test]
fn fixed_batch_exports_take_both_token_passes_and_ratio_one_reproduces_them() {
    let dir = tempfile::tempdir().unwrap();
    for name in DIT_FIXTURES.iter().filter(|n| n.ends_with("_b2")) {
        let original = common::fixture(&format!("{name}.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        let selection = |ratio| TokenOptions {
            motion_ratio: ratio,
            calibration: None,
        };
        for ratio in [0.5, 1.0] {
            let passes: [(&str, Option<TokenOptions>, Option<MergeConfig>); 2] = [
                ("selection", Some(selection(ratio)), None),
                ("merge", None, Some(MergeConfig::new(ratio))),
            ];
            for (pass, tokens, merge) in passes {
                let mut model = load(name);
                rewrite(&mut model, None, tokens.as_ref(), merge.as_ref())
                    .unwrap_or_else(|e| panic!("{name}: {pass} at {ratio}: {e}"));
                let path = save_inline(&model, dir.path(), &format!("{name}_{pass}_{ratio}.onnx"));
                let report = python_json(
                    "cache_check.py",
                    &[&original, &path, &npz],
                    &["--steps", "6"],
                );
                let diff = report["max_abs_diff"].as_f64().unwrap();
                if ratio == 1.0 {
                    assert!(diff < 1e-5, "{name}: {pass} at ratio 1 differs by {diff}");
                } else {
                    assert!(diff.is_finite(), "{name}: {pass} at {ratio}: {report}");
                }
            }
        }
    }
}
