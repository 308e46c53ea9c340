//! DiT structure discovery on the real exports (both PyTorch exporters), on copies of them with
//! every name and metadata entry removed, on graphs that are not DiTs, and on a synthetic
//! DiT-XL/2-sized graph whose cost is known in closed form.

mod common;

use std::collections::HashMap;
use std::path::Path;

use fastcache_passes::analysis::synthetic::SyntheticDit;
use fastcache_passes::analysis::{
    BlockKind, ConditionKind, DitStack, Shapes, Structure, StructureError, SublayerKind, discover,
    report,
};
use fastcache_passes::ir::{Dim, Graph, Model, Node, ValueInfo};
use fastcache_passes::onnx::load_model;
use fastcache_passes::onnx::tensor_proto::DataType;

const SINGLE_STREAM: [&str; 5] = [
    "dit_ts.onnx",
    "dit_dynamo.onnx",
    "dit_ts_external.onnx",
    "pixart_ts.onnx",
    "pixart_dynamo.onnx",
];

fn load(name: &str) -> Model {
    Model::load(&common::fixture(name)).unwrap()
}

fn stack(model: &Model) -> DitStack {
    match discover(model) {
        Ok(Structure::SingleStream(s)) => s,
        other => panic!("expected a single-stream DiT, got {other:?}"),
    }
}

fn rendered(model: &Model) -> String {
    report::render_text(&report::summarize(&discover(model)), true)
}

/// A copy of a fixture with node names, doc strings and all metadata (model and node) removed;
/// with `rename`, every value (inputs, outputs and initializers included) also gets an opaque
/// name `v0, v1, ...`. Returns the copy and the old → new name map (identity without `rename`).
fn strip(path: &Path, rename: bool) -> (Model, HashMap<String, String>) {
    let loaded = load_model(path).unwrap();
    let mut proto = loaded.proto;
    proto.metadata_props.clear();
    proto.doc_string = None;
    let graph = proto.graph.as_mut().unwrap();
    let mut map: HashMap<String, String> = HashMap::new();
    let mut names: Vec<String> = Vec::new();
    names.extend(graph.input.iter().map(|v| v.name().to_string()));
    names.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    for node in &graph.node {
        assert!(
            node.attribute
                .iter()
                .all(|a| a.g.is_none() && a.graphs.is_empty()),
            "fixture has subgraphs; strip() only renames the main graph"
        );
        names.extend(node.input.iter().cloned());
        names.extend(node.output.iter().cloned());
    }
    names.extend(graph.output.iter().map(|v| v.name().to_string()));
    for name in names {
        if name.is_empty() || map.contains_key(&name) {
            continue;
        }
        let new = if rename {
            format!("v{}", map.len())
        } else {
            name.clone()
        };
        map.insert(name, new);
    }
    let rn = |s: &mut String| {
        if !s.is_empty() {
            *s = map[s.as_str()].clone();
        }
    };
    for v in graph
        .input
        .iter_mut()
        .chain(&mut graph.output)
        .chain(&mut graph.value_info)
    {
        if let Some(name) = v.name.as_mut()
            && let Some(new) = map.get(name.as_str())
        {
            *name = new.clone();
        }
        v.doc_string = None;
        v.metadata_props.clear();
    }
    graph
        .value_info
        .retain(|v| map.values().any(|n| Some(n) == v.name.as_ref()));
    for t in &mut graph.initializer {
        if let Some(name) = t.name.as_mut() {
            rn(name);
        }
    }
    for node in &mut graph.node {
        node.name = None;
        node.doc_string = None;
        node.metadata_props.clear();
        node.input.iter_mut().for_each(rn);
        node.output.iter_mut().for_each(rn);
    }
    graph.doc_string = None;
    graph.metadata_props.clear();
    let model = Model::from_proto(proto, loaded.external).unwrap();
    for (_, node) in model.graph.nodes() {
        assert!(node.name.is_empty() && node.metadata.is_empty());
    }
    assert!(model.metadata.is_empty());
    (model, map)
}

/// The original's structure, translated through `map`, must equal the stripped copy's: same
/// boundaries, same node sets, same side inputs, parameters, FLOPs and input roles.
fn assert_same_structure(
    original: &DitStack,
    stripped: &DitStack,
    map: &HashMap<String, String>,
    what: &str,
) {
    let m = |s: &String| {
        map.get(s)
            .cloned()
            .unwrap_or_else(|| panic!("{what}: '{s}' not in map"))
    };
    assert_eq!(
        m(&original.stack_input),
        stripped.stack_input,
        "{what}: stack input"
    );
    assert_eq!(
        m(&original.stack_output),
        stripped.stack_output,
        "{what}: stack output"
    );
    assert_eq!(
        (original.tokens, original.hidden),
        (stripped.tokens, stripped.hidden),
        "{what}"
    );
    assert_eq!(original.batch, stripped.batch, "{what}: batch");
    assert_eq!(
        original.blocks.len(),
        stripped.blocks.len(),
        "{what}: block count"
    );
    assert_eq!(
        original.sublayers_per_block, stripped.sublayers_per_block,
        "{what}"
    );
    for (a, b) in original.blocks.iter().zip(&stripped.blocks) {
        let block = format!("{what}, block {}", a.index);
        assert_eq!(
            (m(&a.input), m(&a.output)),
            (b.input.clone(), b.output.clone()),
            "{block}: boundaries"
        );
        assert_eq!(a.nodes, b.nodes, "{block}: node set");
        assert_eq!(a.core_nodes, b.core_nodes, "{block}: core nodes");
        assert_eq!(a.parameter_count, b.parameter_count, "{block}: parameters");
        assert_eq!(a.flops, b.flops, "{block}: FLOPs");
        let side: Vec<_> = a
            .side_inputs
            .iter()
            .map(|s| (m(&s.name), s.kind, s.source))
            .collect();
        let side_b: Vec<_> = b
            .side_inputs
            .iter()
            .map(|s| (s.name.clone(), s.kind, s.source))
            .collect();
        assert_eq!(side, side_b, "{block}: side inputs");
        for (x, y) in a.sublayers.iter().zip(&b.sublayers) {
            assert_eq!(
                (m(&x.input), m(&x.output), x.kind),
                (y.input.clone(), y.output.clone(), y.kind),
                "{block}"
            );
        }
        assert!(b.label.is_none(), "{block}: a label without names");
    }
    for (a, b) in [
        (&original.embed, &stripped.embed),
        (&original.final_layer, &stripped.final_layer),
        (&original.shared, &stripped.shared),
    ] {
        assert_eq!(a.nodes, b.nodes, "{what}: region");
    }
    let roles = &original.inputs;
    assert_eq!(m(&roles.latent), stripped.inputs.latent, "{what}: latent");
    assert_eq!(
        roles.timestep.as_ref().map(m),
        stripped.inputs.timestep,
        "{what}: timestep"
    );
    let conditions: Vec<_> = roles
        .conditions
        .iter()
        .map(|c| (m(&c.input), c.kind))
        .collect();
    let conditions_b: Vec<_> = stripped
        .inputs
        .conditions
        .iter()
        .map(|c| (c.input.clone(), c.kind))
        .collect();
    assert_eq!(conditions, conditions_b, "{what}: conditions");
    assert_eq!(stripped.names_agree, None, "{what}");
}

#[test]
fn structure_of_every_single_stream_fixture() {
    for name in SINGLE_STREAM {
        let model = load(name);
        let text = rendered(&model);
        insta::assert_snapshot!(
            format!("structure_{}", name.trim_end_matches(".onnx")),
            text
        );
    }
}

#[test]
fn stripped_copies_give_the_same_blocks() {
    for name in SINGLE_STREAM {
        let original = stack(&load(name));
        assert_eq!(
            original.names_agree,
            Some(true),
            "{name}: names should label the blocks"
        );
        for rename in [false, true] {
            let (model, map) = strip(&common::fixture(name), rename);
            let stripped = stack(&model);
            assert_same_structure(
                &original,
                &stripped,
                &map,
                &format!("{name} (rename {rename})"),
            );
            if rename {
                insta::assert_snapshot!(
                    format!("structure_{}_stripped", name.trim_end_matches(".onnx")),
                    rendered(&model)
                );
            }
        }
    }
}

#[test]
fn dit_blocks_are_adaln_attention_and_mlp() {
    for name in ["dit_ts.onnx", "dit_dynamo.onnx"] {
        let s = stack(&load(name));
        assert_eq!(s.blocks.len(), 3, "{name}");
        assert_eq!(
            (s.tokens, s.hidden, s.batch.clone()),
            (Some(16), Some(16), Dim::Named("batch".into()))
        );
        for b in &s.blocks {
            let kinds: Vec<_> = b.sublayers.iter().map(|l| l.kind).collect();
            assert_eq!(
                kinds,
                [SublayerKind::SelfAttention, SublayerKind::FeedForward],
                "{name}"
            );
            assert!(b.escaping.is_empty(), "{name}: {:?}", b.escaping);
            // adaLN conditioning reaches every block from outside it.
            assert!(
                !b.side_inputs.is_empty(),
                "{name}: block {} has no side inputs",
                b.index
            );
        }
        assert_eq!(s.inputs.latent, "hidden_states");
        assert_eq!(s.inputs.timestep.as_deref(), Some("timestep"));
        assert_eq!(s.inputs.conditions.len(), 1);
        assert_eq!(s.inputs.conditions[0].input, "class_labels");
        assert_eq!(s.inputs.conditions[0].kind, ConditionKind::ClassLabels);
        // 29,584 parameters in all (models/README.md); every float weight is counted once
        // across the regions, plus the LayerNorm constants the exporters materialise.
        let total: u64 = s.blocks.iter().map(|b| b.parameter_count).sum::<u64>()
            + s.embed.parameter_count
            + s.final_layer.parameter_count
            + s.shared.parameter_count;
        assert!(total >= 29_584, "{name}: {total}");
    }
}

#[test]
fn pixart_blocks_have_cross_attention_to_the_text() {
    for name in ["pixart_ts.onnx", "pixart_dynamo.onnx"] {
        let s = stack(&load(name));
        assert_eq!(s.blocks.len(), 3, "{name}");
        for b in &s.blocks {
            let kinds: Vec<_> = b.sublayers.iter().map(|l| l.kind).collect();
            assert_eq!(
                kinds,
                [
                    SublayerKind::SelfAttention,
                    SublayerKind::CrossAttention,
                    SublayerKind::FeedForward
                ],
                "{name}"
            );
        }
        assert_eq!(s.inputs.timestep.as_deref(), Some("timestep"));
        assert_eq!(s.inputs.conditions[0].input, "encoder_hidden_states");
        assert_eq!(s.inputs.conditions[0].kind, ConditionKind::Text);
    }
}

#[test]
fn every_node_is_in_exactly_one_region() {
    for name in SINGLE_STREAM {
        let model = load(name);
        let s = stack(&model);
        let mut seen = HashMap::new();
        let regions = s
            .blocks
            .iter()
            .map(|b| (format!("block {}", b.index), &b.nodes))
            .chain([
                ("embed".to_string(), &s.embed.nodes),
                ("final".to_string(), &s.final_layer.nodes),
                ("shared".to_string(), &s.shared.nodes),
            ]);
        for (region, nodes) in regions {
            for id in nodes {
                if let Some(other) = seen.insert(*id, region.clone()) {
                    panic!("{name}: node in {other} and {region}");
                }
            }
        }
        assert_eq!(seen.len(), model.graph.node_count(), "{name}");
    }
}

/// What discovery must find in each MMDiT fixture: double and single blocks, whether the last
/// double block writes no text (SD3's context_pre_only), and the single blocks' layout.
struct JointExpected {
    name: &'static str,
    double: usize,
    single: usize,
    pre_only_last: bool,
    /// Image sub-layers per double block, block 0 first (SD3.5 adds an image self-attention).
    image_sublayers: &'static [usize],
    conditions: &'static [ConditionKind],
}

const SD3_CONDITIONS: &[ConditionKind] = &[ConditionKind::Text, ConditionKind::Pooled];
const FLUX_CONDITIONS: &[ConditionKind] = &[
    ConditionKind::Text,
    ConditionKind::Pooled,
    ConditionKind::Positions,
    ConditionKind::Positions,
    ConditionKind::Guidance,
];

const JOINT: &[JointExpected] = &[
    JointExpected {
        name: "sd3_ts.onnx",
        double: 3,
        single: 0,
        pre_only_last: true,
        image_sublayers: &[2, 2, 2],
        conditions: SD3_CONDITIONS,
    },
    JointExpected {
        name: "sd3_dynamo.onnx",
        double: 3,
        single: 0,
        pre_only_last: true,
        image_sublayers: &[2, 2, 2],
        conditions: SD3_CONDITIONS,
    },
    JointExpected {
        name: "sd35_ts.onnx",
        double: 3,
        single: 0,
        pre_only_last: true,
        image_sublayers: &[3, 2, 2],
        conditions: SD3_CONDITIONS,
    },
    JointExpected {
        name: "sd35_dynamo.onnx",
        double: 3,
        single: 0,
        pre_only_last: true,
        image_sublayers: &[3, 2, 2],
        conditions: SD3_CONDITIONS,
    },
    JointExpected {
        name: "flux_ts.onnx",
        double: 2,
        single: 2,
        pre_only_last: false,
        image_sublayers: &[2, 2, 1, 1],
        conditions: FLUX_CONDITIONS,
    },
    JointExpected {
        name: "flux_dynamo.onnx",
        double: 2,
        single: 2,
        pre_only_last: false,
        image_sublayers: &[2, 2, 1, 1],
        conditions: FLUX_CONDITIONS,
    },
    JointExpected {
        name: "flux034_ts.onnx",
        double: 2,
        single: 2,
        pre_only_last: false,
        image_sublayers: &[2, 2, 1, 1],
        conditions: FLUX_CONDITIONS,
    },
    JointExpected {
        name: "flux034_dynamo.onnx",
        double: 2,
        single: 2,
        pre_only_last: false,
        image_sublayers: &[2, 2, 1, 1],
        conditions: FLUX_CONDITIONS,
    },
];

#[test]
fn mmdit_blocks_are_found_by_structure_on_both_streams() {
    for expected in JOINT {
        let name = expected.name;
        for stripped in [false, true] {
            let model = if stripped {
                strip(&common::fixture(name), true).0
            } else {
                load(name)
            };
            let structure = discover(&model).unwrap();
            let Structure::Joint(stack) = &structure else {
                panic!("{name}: not recognised as MMDiT: {structure:?}");
            };
            let joint = stack.joint.as_ref().unwrap();
            assert_eq!(
                (joint.double_blocks, joint.single_blocks),
                (expected.double, expected.single),
                "{name}"
            );
            assert_eq!(stack.blocks.len(), expected.double + expected.single);
            assert_eq!((stack.tokens, stack.hidden), (Some(16), Some(16)), "{name}");
            assert_eq!(joint.text_tokens, Some(6), "{name}");
            for (b, block) in stack.blocks.iter().enumerate() {
                let kind = if b < expected.double {
                    BlockKind::Double
                } else {
                    BlockKind::Single
                };
                assert_eq!(block.kind, kind, "{name} block {b}");
                if b > 0 {
                    assert_eq!(block.input, stack.blocks[b - 1].output, "{name} block {b}");
                    if block.kind == BlockKind::Double {
                        assert_eq!(block.text_input, stack.blocks[b - 1].text_output);
                    }
                }
                assert!(
                    block.escaping.is_empty(),
                    "{name} block {b}: {:?}",
                    block.escaping
                );
                assert!(block.flops.counted > 0 && block.flops.unknown_nodes == 0);
            }
            for (block, &count) in stack.blocks.iter().zip(expected.image_sublayers) {
                assert_eq!(block.sublayers.len(), count, "{name} block {}", block.index);
                let first = if block.kind == BlockKind::Double {
                    SublayerKind::JointAttention
                } else {
                    SublayerKind::SelfAttention
                };
                assert_eq!(
                    block.sublayers[0].kind, first,
                    "{name} block {}",
                    block.index
                );
            }
            let last_double = &stack.blocks[expected.double - 1];
            assert_eq!(
                last_double.text_output.is_none(),
                expected.pre_only_last || expected.single == 0,
                "{name}"
            );
            assert_eq!(stack.stack_input, stack.blocks[0].input);
            assert_eq!(stack.stack_output, stack.blocks.last().unwrap().output);
            assert!(stack.inputs.timestep.is_some());
            let kinds: Vec<_> = stack.inputs.conditions.iter().map(|c| c.kind).collect();
            assert_eq!(kinds, expected.conditions, "{name}");
            // The passes that do not handle two streams say so.
            let error = structure.single_stream("token selection").unwrap_err();
            assert!(matches!(error, StructureError::DualStreamUnsupported(_)));
            let message = error.to_string();
            assert!(
                message.contains("dual-stream") && message.contains("token selection"),
                "{message}"
            );
        }
        let text = rendered(&load(name));
        insta::assert_snapshot!(
            format!("structure_{}", name.trim_end_matches(".onnx")),
            text
        );
    }
}

fn refusal(name: &str) -> String {
    let model = load(&format!("negative/{name}"));
    match discover(&model) {
        Err(e @ StructureError::NotADit(_)) => e.to_string(),
        other => panic!("{name} was not refused: {other:?}"),
    }
}

#[test]
fn an_mlp_is_refused() {
    let message = refusal("mlp.onnx");
    assert!(
        message.contains("looked for residual connections"),
        "{message}"
    );
    assert!(
        message.contains("found none among the graph's 0 Add nodes"),
        "{message}"
    );
}

#[test]
fn a_cnn_is_refused() {
    let message = refusal("cnn.onnx");
    assert!(
        message.contains("looked for residual connections") && message.contains("found none"),
        "{message}"
    );
}

#[test]
fn a_transformer_without_residual_connections_is_refused() {
    let message = refusal("transformer_no_residual.onnx");
    assert!(
        message.contains("looked for residual connections"),
        "{message}"
    );
    assert!(
        message.contains("found none among the graph's 15 Add nodes"),
        "{message}"
    );
}

/// A tiny hand-built graph: input x: f32[batch, 8, 4]; `layers` gives each residual layer.
fn residual_graph(build: impl FnOnce(&mut Graph)) -> Model {
    let mut model = SyntheticDit::tiny(1).build();
    let mut graph = Graph::new("g");
    let batch = Dim::Named("batch".into());
    graph.inputs.push(ValueInfo::tensor(
        "x",
        DataType::Float as i32,
        vec![batch.clone(), Dim::Fixed(8), Dim::Fixed(4)],
    ));
    for w in ["w1", "w2", "w3"] {
        graph
            .initializers
            .push(fastcache_passes::onnx::TensorProto {
                name: Some(w.into()),
                dims: vec![4, 4],
                data_type: Some(DataType::Float as i32),
                raw_data: Some(vec![0u8; 64].into()),
                ..Default::default()
            });
    }
    build(&mut graph);
    graph.outputs.push(ValueInfo::tensor(
        "y",
        DataType::Float as i32,
        vec![batch, Dim::Fixed(8), Dim::Fixed(4)],
    ));
    model.graph = graph;
    fastcache_passes::ir::verify_model(&model).unwrap();
    model
}

#[test]
fn a_residual_stack_without_attention_is_refused() {
    // y = h + h·W2 with h = x + x·W1: residual, but nothing mixes tokens.
    let model = residual_graph(|g| {
        g.add_node(Node::new("MatMul", &["x", "w1"], &["a"]));
        g.add_node(Node::new("Add", &["x", "a"], &["h"]));
        g.add_node(Node::new("MatMul", &["h", "w2"], &["b"]));
        g.add_node(Node::new("Add", &["h", "b"], &["y"]));
    });
    let Err(StructureError::NotADit(message)) = discover(&model) else {
        panic!("accepted a stack without attention");
    };
    assert!(message.contains("no attention"), "{message}");
}

#[test]
fn a_bypassed_residual_stream_is_refused() {
    // A long skip from x to the output jumps over both stream tensors (as in U-ViT).
    let model = residual_graph(|g| {
        g.add_node(Node::new("MatMul", &["x", "w1"], &["a"]));
        g.add_node(Node::new("Add", &["x", "a"], &["h"]));
        g.add_node(Node::new("MatMul", &["h", "w2"], &["b"]));
        g.add_node(Node::new("Add", &["h", "b"], &["h2"]));
        g.add_node(Node::new("MatMul", &["x", "w3"], &["skip"]));
        g.add_node(Node::new("Mul", &["h2", "skip"], &["y"]));
    });
    let Err(StructureError::NotADit(message)) = discover(&model) else {
        panic!("accepted a bypassed stream");
    };
    assert!(message.contains("bypassed"), "{message}");
}

#[test]
fn an_outer_residual_around_the_whole_model_is_not_taken_for_the_stack() {
    // y = latent + sample[:, :4]: a residual of one add around everything, ending nearest the
    // output. The stack is still the longest residual stream.
    let mut model = SyntheticDit::tiny(2).build();
    let expected = stack(&model);
    let graph = &mut model.graph;
    for (name, values) in [("starts", [0i64]), ("ends", [4]), ("axes", [1])] {
        graph
            .initializers
            .push(fastcache_passes::onnx::TensorProto {
                name: Some(name.into()),
                dims: vec![1],
                data_type: Some(DataType::Int64 as i32),
                raw_data: Some(values[0].to_le_bytes().to_vec().into()),
                ..Default::default()
            });
    }
    graph.add_node(Node::new(
        "Slice",
        &["sample", "starts", "ends", "axes"],
        &["eps"],
    ));
    graph.add_node(Node::new("Add", &["hidden_states", "eps"], &["y"]));
    let mut y = graph.outputs[0].clone();
    y.name = "y".into();
    graph.outputs = vec![y];
    fastcache_passes::ir::verify_model(&model).unwrap();
    let found = stack(&model);
    assert_eq!(found.boundaries(), expected.boundaries());
    assert_eq!(
        found.final_layer.nodes.len(),
        expected.final_layer.nodes.len() + 2
    );
}

/// The dynamo exporter writes value_info for most values; shape propagation without it must
/// find the same dims wherever the exporter knew them.
#[test]
fn shape_propagation_agrees_with_the_exporters_value_info() {
    for name in ["dit_dynamo.onnx", "pixart_dynamo.onnx", "sd3_dynamo.onnx"] {
        let original = load(name);
        let mut bare = original.clone();
        bare.graph.value_info.clear();
        let shapes = Shapes::infer(&bare);
        let mut compared = 0;
        for info in &original.graph.value_info {
            let Some(declared) = info.dims() else {
                continue;
            };
            let known = declared.iter().all(|d| match d {
                Dim::Fixed(_) => true,
                Dim::Named(s) => !s.is_empty(),
                Dim::Unknown => false,
            });
            if !known {
                continue;
            }
            assert_eq!(
                shapes.dims(&info.name),
                Some(declared.as_slice()),
                "{name}: {}",
                info.name
            );
            assert_eq!(
                shapes.elem(&info.name),
                info.elem_type(),
                "{name}: {}",
                info.name
            );
            compared += 1;
        }
        assert!(compared > 300, "{name}: only {compared} values compared");
    }
}

#[test]
fn synthetic_dit_xl_2_has_the_known_size_and_cost() {
    let config = SyntheticDit::xl_2();
    let model = config.build();
    let s = stack(&model);
    assert_eq!(s.blocks.len(), 28);
    assert_eq!((s.tokens, s.hidden), (Some(256), Some(1152)));
    for b in &s.blocks {
        assert_eq!(b.flops.unknown_nodes, 0);
        assert_eq!(b.flops.counted, config.block_flops(), "block {}", b.index);
        assert_eq!(b.sublayers.len(), 2);
    }
    // DiT-XL/2 is quoted at 118.6 GFLOPs counting multiply-accumulates; we count 2 per MAC.
    let total = s.total_flops();
    assert_eq!(total.unknown_nodes, 0);
    let gmacs = total.counted as f64 / 2e9;
    assert!((gmacs - 118.6).abs() < 0.5, "{gmacs} GMACs");
    // And 675 M parameters.
    let params: u64 = s.blocks.iter().map(|b| b.parameter_count).sum::<u64>()
        + s.embed.parameter_count
        + s.final_layer.parameter_count
        + s.shared.parameter_count;
    assert!((params as f64 / 1e6 - 675.0).abs() < 1.0, "{params}");
    // Skipping half the blocks: blocks are ~all the work, so close to 2×.
    let half: Vec<usize> = (0..28).step_by(2).collect();
    let speedup = s.expected_speedup(&half);
    assert!((1.95..2.0).contains(&speedup), "{speedup}");
    assert_eq!(s.expected_speedup(&[]), 1.0);
}

#[test]
fn a_tiny_synthetic_dit_is_found_without_any_names() {
    let model = SyntheticDit::tiny(2).build();
    let s = stack(&model);
    assert_eq!(s.blocks.len(), 2);
    assert_eq!(s.names_agree, None);
    assert_eq!(
        s.blocks[0].flops.counted,
        SyntheticDit::tiny(2).block_flops()
    );
}
