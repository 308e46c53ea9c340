//! Token selection (design/method.md §2): the rewrite's text form; that the checker and ONNX
//! Runtime accept it on every DiT fixture and its first step equals the original; that ρ = 1
//! changes nothing; that the selection, the static tokens and the motion tokens are what the
//! method defines, step after step, against an independent numpy computation and the original
//! blocks run on the gathered tokens alone (tests/data/tokens_check.py); that it composes with
//! the block cache; that per-token side inputs are gathered; and that blocks which hard-code the
//! token count are fixed (the dynamo exports' attention reshapes) or refused.

mod common;

use common::save_inline;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use fastcache_passes::analysis::{DitStack, discover};
use fastcache_passes::cache::Correction;
use fastcache_passes::contract::Contract;
use fastcache_passes::expose::Expose;
use fastcache_passes::ir::{Dim, Model, Node, NodeId, ValueInfo, text};
use fastcache_passes::onnx::tensor_proto::DataType;
use fastcache_passes::pass::run_pass;
use fastcache_passes::rewrite::{CacheOptions, TokenOptions, rewrite};
use fastcache_passes::tokens::{
    GATHERED, SELECTED, STACK_OUTPUT, TOKENS_RUN_OUTPUT, TokenConfig, apply_token_selection,
    merge_contract,
};

use common::DIT_FIXTURES;

fn tokens(motion_ratio: f64) -> TokenOptions {
    TokenOptions {
        motion_ratio,
        calibration: None,
    }
}

fn load(name: &str) -> Model {
    Model::load(&common::fixture(&format!("{name}.onnx"))).unwrap()
}

fn stack_of(model: &Model) -> DitStack {
    discover(model).unwrap().stack().clone()
}

fn rewritten(model: &Model, cache: Option<&CacheOptions>, motion_ratio: f64) -> Model {
    let mut model = model.clone();
    rewrite(&mut model, cache, Some(&tokens(motion_ratio)), None).unwrap();
    model
}

/// The TorchScript export with the same weights as a fixture (the dynamo exports hard-code the
/// token count, so the original blocks on K tokens are taken from their TorchScript twin).
fn twin(name: &str) -> &str {
    match name {
        "dit_dynamo" | "dit_ts_external" | "dit_ts_b2" | "dit_dynamo_b2" => "dit_ts",
        "pixart_dynamo" | "pixart_ts_b2" | "pixart_dynamo_b2" => "pixart_ts",
        "sd3_dynamo" => "sd3_ts",
        "sd35_dynamo" => "sd35_ts",
        "flux_dynamo" => "flux_ts",
        "flux034_dynamo" => "flux034_ts",
        other => other,
    }
}

/// The original's blocks alone on K tokens: input `ref.x` [batch, K, D] instead of the stack
/// input, output the stack output, per-token inputs declared with an open token axis. This is
/// the reference for the motion tokens, built without anything of the rewrite.
fn reference_stack(original: &Model, k: i64, per_token: &[(&str, usize)]) -> (Model, String) {
    let mut model = original.clone();
    let stack = stack_of(&model);
    let d = stack.hidden.unwrap();
    let graph = &mut model.graph;
    let blocks: HashSet<NodeId> = stack
        .blocks
        .iter()
        .flat_map(|b| b.nodes.iter().copied())
        .collect();
    graph.inputs.push(ValueInfo::tensor(
        "ref.x",
        DataType::Float as i32,
        vec![stack.batch.clone(), Dim::Fixed(k), Dim::Fixed(d)],
    ));
    for &id in &blocks {
        if graph.node(id).inputs.contains(&stack.stack_input) {
            graph.update_node(id, |node| {
                for input in &mut node.inputs {
                    if *input == stack.stack_input {
                        *input = "ref.x".into();
                    }
                }
            });
        }
    }
    for (name, axis) in per_token {
        let input = graph.inputs.iter_mut().find(|i| i.name == *name).unwrap();
        let mut dims = input.dims().unwrap();
        dims[*axis] = Dim::Unknown;
        *input = ValueInfo::tensor(name, input.elem_type().unwrap(), dims);
    }
    graph.value_info.clear();
    graph.outputs = vec![ValueInfo::tensor(
        &stack.stack_output,
        DataType::Float as i32,
        vec![stack.batch.clone(), Dim::Fixed(k), Dim::Fixed(d)],
    )];
    // Only what the stack output needs (the final layer cannot take K tokens).
    common::prune_to(graph, &stack.stack_output);
    (model, stack.stack_output)
}

struct Check<'a> {
    name: &'a str,
    original: Model,
    rewritten: Model,
    capacity: i64,
    steps: usize,
    reference: bool,
    extra: Vec<(&'a str, usize)>,
    correction: Option<&'a Correction>,
    npz: PathBuf,
}

impl Check<'_> {
    /// Runs tests/data/tokens_check.py on the pair and returns its JSON report.
    fn run(self, dir: &Path) -> serde_json::Value {
        let stack = stack_of(&self.original);
        let mut original = self.original.clone();
        run_pass(
            &mut original,
            &Expose::new([stack.stack_input.clone(), stack.stack_output.clone()]),
        )
        .unwrap();
        let mut rewritten = self.rewritten;
        run_pass(
            &mut rewritten,
            &Expose::new([
                stack.stack_input.clone(),
                SELECTED.to_string(),
                STACK_OUTPUT.to_string(),
            ]),
        )
        .unwrap();
        let a = save_inline(&original, dir, &format!("{}_original.onnx", self.name));
        let b = save_inline(&rewritten, dir, &format!("{}_tokens.onnx", self.name));
        let mut command = std::process::Command::new(common::python());
        command
            .arg(common::test_data("tokens_check.py"))
            .args([&a, &b, &self.npz])
            .args(["--x", &stack.stack_input, "--y", &stack.stack_output])
            .args(["--capacity", &self.capacity.to_string()])
            .args(["--steps", &self.steps.to_string()]);
        if self.reference {
            let twin_model = if twin(self.name) != self.name {
                load(twin(self.name))
            } else {
                self.original.clone()
            };
            let (reference, y) = reference_stack(&twin_model, self.capacity, &self.extra);
            let path = save_inline(&reference, dir, &format!("{}_reference.onnx", self.name));
            command
                .arg("--reference")
                .arg(&path)
                .args(["--ref-x", "ref.x", "--ref-y", &y]);
        }
        for (name, axis) in &self.extra {
            command.args(["--extra", &format!("{name}={axis}")]);
        }
        if let Some(c) = self.correction {
            let path = dir.join(format!("{}_correction.npz", self.name));
            write_correction(&path, c);
            command.arg("--correction").arg(&path);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "tokens_check.py failed on {}:\n{}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        eprintln!("{}: {report}", self.name);
        report
    }
}

/// A correction as an .npz of `w` [D, D] and `b` [D] (uncompressed, written by hand: a zip of
/// two .npy files).
fn write_correction(path: &Path, c: &Correction) {
    let d = c.bias.len();
    let npy = |shape: &str, values: &[f32]| {
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        let mut header = header.into_bytes();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        bytes
    };
    let files = [
        ("w.npy", npy(&format!("({d}, {d})"), &c.weight)),
        ("b.npy", npy(&format!("({d},)"), &c.bias)),
    ];
    std::fs::write(path, stored_zip(&files)).unwrap();
}

/// A zip archive with stored (uncompressed) entries: all numpy needs to read an .npz.
fn stored_zip(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in files {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let size = data.len() as u32;
        let mut local = Vec::new();
        local.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        local.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&size.to_le_bytes());
        local.extend_from_slice(&size.to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes());
        local.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&local);
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let start = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(files.len() as u16).to_le_bytes());
    out.extend_from_slice(&(files.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// Every check that holds whatever the model: the selection is numpy's, static rows are the
/// reference outputs exactly, the state is what numpy keeps, the first step is the original.
fn assert_method(name: &str, report: &serde_json::Value, n: i64, k: i64) {
    let f = |key: &str| {
        report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {report}"))
    };
    assert_eq!(f("selection_mismatches"), 0.0, "{name}: {report}");
    assert!(f("near_ties") <= 1.0, "{name}: {report}");
    assert!(f("first_step_max_abs_diff") < 1e-4, "{name}: {report}");
    assert_eq!(f("state_max_abs_diff"), 0.0, "{name}: {report}");
    let steps = report["steps"].as_u64().unwrap() as usize;
    let mut expected = vec![serde_json::json!(n)];
    expected.extend(std::iter::repeat_n(serde_json::json!(k), steps - 1));
    assert_eq!(report["tokens_run"], serde_json::json!(expected), "{name}");
}

#[test]
fn text_form_of_the_rewritten_smallest_dit() {
    let model = rewritten(&load("dit_ts"), None, 0.5);
    insta::assert_snapshot!(text::print_model(&model));
}

#[test]
fn every_rewritten_fixture_passes_the_checker_and_starts_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    for name in DIT_FIXTURES {
        for cache in [None, Some(CacheOptions::default())] {
            let model = rewritten(&load(name), cache.as_ref(), 0.5);
            let contract = Contract::from_model(&model).unwrap().unwrap();
            let inputs: Vec<&str> = contract.state.iter().map(|s| s.input.as_str()).collect();
            assert!(inputs.contains(&"fastcache.tokens.ref_x"), "{inputs:?}");
            assert!(contract.stats.iter().any(|s| s == TOKENS_RUN_OUTPUT));
            assert_eq!(contract.policy["tokens"]["capacity"], 8);
            let path = save_inline(&model, dir.path(), &format!("{name}.onnx"));
            let npz = common::fixture(&format!("{name}.npz"));
            let report = common::ort_check(&path, &npz, true);
            let diff = report["max_abs_diff"].as_f64().unwrap();
            assert!(
                diff < 1e-4,
                "{name}: first step differs from PyTorch by {diff}"
            );
            assert_eq!(report["outputs"][TOKENS_RUN_OUTPUT], serde_json::json!([1]));
            if cache.is_some() {
                // The cache works on the gathered stream: its state has K tokens.
                assert_eq!(
                    report["outputs"]["fastcache.b0.ref_in.next"],
                    serde_json::json!([2, 8, 16]),
                    "{name}"
                );
            }
        }
    }
}

/// The selection, static rows and state against numpy, and the motion rows against the
/// original blocks run on the gathered tokens alone, on every fixture, for two ratios. On SD3
/// (no rotary table; the joint attention splits where the image tokens end, read from the image
/// stream's shape) only image tokens are selected: the text stream runs whole through every
/// block, and the reference is the original blocks on the K image tokens with all the text. On
/// Flux (both diffusers layouts) the rotary table covers text + image tokens and is gathered at
/// its text rows and T + idx; the reference is the original model run on the K tokens with
/// `img_ids` (random) gathered by the same indices, which computes its rotary table from the ids
/// alone, independently of the rewrite's gather.
#[test]
fn selected_tokens_run_the_original_blocks_and_static_tokens_keep_their_output() {
    let dir = tempfile::tempdir().unwrap();
    let single_stream = DIT_FIXTURES.map(|name| (name, Vec::new()));
    let mmdit = [
        ("sd3_ts", Vec::new()),
        ("sd3_dynamo", Vec::new()),
        ("sd35_ts", Vec::new()),
        ("sd35_dynamo", Vec::new()),
        ("flux_ts", vec![("img_ids", 0)]),
        ("flux_dynamo", vec![("img_ids", 0)]),
        ("flux034_ts", vec![("img_ids", 0)]),
        ("flux034_dynamo", vec![("img_ids", 0)]),
    ];
    for (name, extra) in single_stream.into_iter().chain(mmdit) {
        for (ratio, k) in [(0.5, 8), (0.3, 5)] {
            let original = load(name);
            let report = Check {
                name,
                rewritten: rewritten(&original, None, ratio),
                original,
                capacity: k,
                steps: 8,
                reference: true,
                extra: extra.clone(),
                correction: None,
                npz: common::fixture(&format!("{name}.npz")),
            }
            .run(dir.path());
            assert_method(name, &report, 16, k);
            let f = |key: &str| report[key].as_f64().unwrap();
            assert_eq!(f("static_max_abs_diff"), 0.0, "{name}: {report}");
            assert!(f("motion_max_abs_diff") < 1e-4, "{name}: {report}");
            assert_eq!(f("motion_unchanged_rows"), 0.0, "{name}: {report}");
            // The selection follows the motion: it is not the same set at every step.
            let selected: HashSet<String> = report["selected"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.to_string())
                .collect();
            assert!(selected.len() > 1, "{name}: {report}");
        }
    }
}

/// ρ = 1 inserts nothing but the stats output: the model computes exactly what the original
/// does. (The CLI tests run whole sampling runs of it on both engines.)
#[test]
fn a_motion_ratio_of_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for name in DIT_FIXTURES {
        let original = load(name);
        let model = rewritten(&original, None, 1.0);
        assert_eq!(model.graph.node_count(), original.graph.node_count() + 1);
        let contract = Contract::from_model(&model).unwrap().unwrap();
        assert!(contract.state.is_empty(), "{name}");
        assert_eq!(contract.policy["tokens"]["capacity"], 16);
        let path = save_inline(&model, dir.path(), &format!("{name}.onnx"));
        let npz = common::fixture(&format!("{name}.npz"));
        let report = common::ort_check(&path, &npz, true);
        assert!(report["max_abs_diff"].as_f64().unwrap() < 1e-4, "{report}");
        // Composed with a cache that never skips, over several steps, bit for bit.
        let cache = CacheOptions {
            max_skips: 0,
            ..CacheOptions::default()
        };
        let both = rewritten(&original, Some(&cache), 1.0);
        let path = save_inline(&both, dir.path(), &format!("{name}_cached.onnx"));
        let original_path = common::fixture(&format!("{name}.onnx"));
        common::assert_bit_identical_run(&original_path, &path, &npz, 8, name);
    }
}

/// With the block cache: when it never skips, everything token selection promises still holds
/// (the cache runs on the gathered stream); when it skips every block, the selection and the
/// static tokens still do, and the blocks really were skipped.
#[test]
fn token_selection_composes_with_the_block_cache() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit_ts", "pixart_dynamo"] {
        let never = CacheOptions {
            max_skips: 0,
            ..CacheOptions::default()
        };
        let original = load(name);
        let report = Check {
            name,
            rewritten: rewritten(&original, Some(&never), 0.5),
            original: original.clone(),
            capacity: 8,
            steps: 6,
            reference: true,
            extra: Vec::new(),
            correction: None,
            npz: common::fixture(&format!("{name}.npz")),
        }
        .run(dir.path());
        assert_method(name, &report, 16, 8);
        assert_eq!(report["static_max_abs_diff"].as_f64().unwrap(), 0.0);
        assert!(
            report["motion_max_abs_diff"].as_f64().unwrap() < 1e-4,
            "{report}"
        );

        let forced = CacheOptions {
            force_skip: true,
            ..CacheOptions::default()
        };
        let report = Check {
            name,
            rewritten: rewritten(&original, Some(&forced), 0.5),
            original,
            capacity: 8,
            steps: 6,
            reference: true,
            extra: Vec::new(),
            correction: None,
            npz: common::fixture(&format!("{name}.npz")),
        }
        .run(dir.path());
        assert_method(name, &report, 16, 8);
        assert_eq!(report["static_max_abs_diff"].as_f64().unwrap(), 0.0);
        // Skipped blocks approximate: the motion rows are no longer the blocks' exact output.
        assert!(
            report["motion_max_abs_diff"].as_f64().unwrap() > 1e-4,
            "{report}"
        );
    }
}

/// A fitted correction is added to the static tokens: R_out + (X − R_x)·W_s + b_s.
#[test]
fn static_tokens_get_the_fitted_correction() {
    let dir = tempfile::tempdir().unwrap();
    let d = 16;
    let correction = Correction {
        weight: (0..d * d)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.01)
            .collect(),
        bias: (0..d).map(|i| (i as f32 - 7.5) * 0.02).collect(),
    };
    for name in ["dit_ts", "pixart_dynamo"] {
        let original = load(name);
        let mut model = original.clone();
        let stack = stack_of(&model);
        let config = TokenConfig {
            motion_ratio: 0.5,
            correction: Some(correction.clone()),
            source: "test".into(),
        };
        let summary = apply_token_selection(&mut model, &stack, &config).unwrap();
        merge_contract(&mut model, &summary).unwrap();
        let report = Check {
            name,
            original,
            rewritten: model,
            capacity: 8,
            steps: 6,
            reference: true,
            extra: Vec::new(),
            correction: Some(&correction),
            npz: common::fixture(&format!("{name}.npz")),
        }
        .run(dir.path());
        assert_method(name, &report, 16, 8);
        let static_diff = report["static_max_abs_diff"].as_f64().unwrap();
        assert!(static_diff < 1e-4, "{name}: {report}");
        assert!(
            report["motion_max_abs_diff"].as_f64().unwrap() < 1e-4,
            "{report}"
        );
    }
}

/// dit_ts with a per-token model input read inside every block: `token_gate` [batch, 16, 1]
/// scales each block's input before its first norm.
fn with_token_gate() -> Model {
    let mut model = load("dit_ts");
    let stack = stack_of(&model);
    let graph = &mut model.graph;
    graph.inputs.push(ValueInfo::tensor(
        "token_gate",
        DataType::Float as i32,
        vec![Dim::Named("batch".into()), Dim::Fixed(16), Dim::Fixed(1)],
    ));
    for block in &stack.blocks {
        let norm = block
            .nodes
            .iter()
            .copied()
            .find(|&id| {
                let node = graph.node(id);
                node.op_type == "LayerNormalization" && node.inputs[0] == block.input
            })
            .expect("a norm reads the block input");
        let gated = format!("gated_{}", block.index);
        graph.add_node(
            Node::new("Mul", &[&block.input, "token_gate"], &[&gated])
                .with_name(format!("gate_{}", block.index)),
        );
        graph.update_node(norm, |node| node.inputs[0] = gated.clone());
    }
    model
}

#[test]
fn per_token_side_inputs_are_gathered_with_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let original = with_token_gate();
    // Through a file, as users have it.
    let path = save_inline(&original, dir.path(), "gated.onnx");
    let original = Model::load(&path).unwrap();
    let mut model = original.clone();
    let summary = rewrite(&mut model, None, Some(&tokens(0.5)), None).unwrap();
    let per_token = &summary.tokens.as_ref().unwrap().per_token_inputs;
    assert_eq!(per_token.len(), 1, "{per_token:?}");
    assert_eq!(
        (per_token[0].name.as_str(), per_token[0].axis),
        ("token_gate", 1)
    );
    let report = Check {
        name: "gated",
        original,
        rewritten: model,
        capacity: 8,
        steps: 6,
        reference: true,
        extra: vec![("token_gate", 1)],
        correction: None,
        npz: common::fixture("dit_ts.npz"),
    }
    .run(dir.path());
    assert_method("gated", &report, 16, 8);
    assert_eq!(report["static_max_abs_diff"].as_f64().unwrap(), 0.0);
    assert!(
        report["motion_max_abs_diff"].as_f64().unwrap() < 1e-4,
        "{report}"
    );
}

/// The dynamo exports' attention reshapes name N = 16 in constants; the rewrite makes them
/// copy the token dim instead (and the motion-token check above runs them on K tokens).
#[test]
fn hard_coded_token_counts_in_reshapes_are_fixed() {
    for name in ["dit_dynamo", "pixart_dynamo"] {
        let mut model = load(name);
        let summary = rewrite(&mut model, None, Some(&tokens(0.5)), None).unwrap();
        let fixed = &summary.tokens.unwrap().fixed_nodes;
        // Per attention: q, k, v to heads and back (PixArt's cross-attention: q and back).
        let expected = if name == "dit_dynamo" {
            3 * 4
        } else {
            3 * (4 + 2)
        };
        assert_eq!(fixed.len(), expected, "{name}: {fixed:?}");
    }
    let mut model = load("dit_ts");
    let summary = rewrite(&mut model, None, Some(&tokens(0.5)), None).unwrap();
    assert!(summary.tokens.unwrap().fixed_nodes.is_empty());
}

/// dit_ts with `make` inserted before block 1's first norm: it gets the block input and returns
/// what the norm reads instead.
fn with_inserted(make: impl FnOnce(&mut fastcache_passes::ir::Graph, &str) -> String) -> Model {
    let mut model = load("dit_ts");
    let stack = stack_of(&model);
    let block = &stack.blocks[1];
    let graph = &mut model.graph;
    let norm = block
        .nodes
        .iter()
        .copied()
        .find(|&id| graph.node(id).op_type == "LayerNormalization")
        .unwrap();
    let fed = make(graph, &block.input);
    graph.update_node(norm, |node| node.inputs[0] = fed);
    model
}

/// Blocks that cannot run on K tokens are refused, naming the node, and the model is left
/// alone: one adds a constant [1, N, D] tensor (a positional bias hard-coding N), one flattens
/// tokens and hidden into one axis of N·D (a Reshape that cannot be made relative).
#[test]
fn blocks_that_hard_code_the_token_count_are_refused() {
    let biased = with_inserted(|graph, h| {
        let bias: Vec<u8> = (0..16 * 16)
            .flat_map(|i| (i as f32 * 1e-3).to_le_bytes())
            .collect();
        graph.initializers.push(fastcache_passes::builder::tensor(
            "positional_bias",
            &[1, 16, 16],
            DataType::Float,
            bias,
        ));
        graph
            .add_node(Node::new("Add", &[h, "positional_bias"], &["biased"]).with_name("add_bias"));
        "biased".into()
    });
    let flattened = with_inserted(|graph, h| {
        let shape = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (name, value) in [("flat", vec![-1i64, 256]), ("unflat", vec![-1i64, 16, 16])] {
            graph.initializers.push(fastcache_passes::builder::tensor(
                name,
                &[value.len() as i64],
                DataType::Int64,
                shape(&value),
            ));
        }
        graph.add_node(Node::new("Reshape", &[h, "flat"], &["flat_h"]).with_name("flatten"));
        graph.add_node(
            Node::new("Reshape", &["flat_h", "unflat"], &["unflat_h"]).with_name("unflatten"),
        );
        "unflat_h".into()
    });
    let dir = tempfile::tempdir().unwrap();
    for (model, expected) in [
        (biased, ["'add_bias' (Add)", "hard-coded token count"]),
        (flattened, ["'flatten' (Reshape)", "losing the token axis"]),
    ] {
        let path = save_inline(&model, dir.path(), "modified.onnx");
        let mut model = Model::load(&path).unwrap();
        // The modification keeps the model a DiT the cache can rewrite.
        rewrite(
            &mut model.clone(),
            Some(&CacheOptions::default()),
            None,
            None,
        )
        .unwrap();
        let before = text::print_model(&model);
        let error = rewrite(&mut model, None, Some(&tokens(0.5)), None)
            .unwrap_err()
            .to_string();
        assert!(expected.iter().all(|e| error.contains(e)), "{error}");
        assert_eq!(
            text::print_model(&model),
            before,
            "a refused rewrite changed the model"
        );
    }
}

#[test]
fn bad_ratios_and_empty_requests_are_refused() {
    for ratio in [0.0, -0.5, 1.5, f64::NAN] {
        let mut model = load("dit_ts");
        let error = rewrite(&mut model, None, Some(&tokens(ratio)), None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--motion-ratio must lie in (0, 1]"),
            "{error}"
        );
    }
    let mut model = load("dit_ts");
    let error = rewrite(&mut model, None, None, None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("nothing to rewrite"), "{error}");
    // K = ⌈ρ·N⌉: 0.99 of 16 tokens is all of them; 0.01 is one.
    assert_eq!(fastcache_passes::tokens::capacity(0.99, 16).unwrap(), 16);
    assert_eq!(fastcache_passes::tokens::capacity(0.01, 16).unwrap(), 1);
    assert_eq!(fastcache_passes::tokens::capacity(0.3, 10).unwrap(), 3);
    // The gathered stream is what the blocks read.
    let model = rewritten(&load("dit_ts"), None, 0.25);
    let stack_input = stack_of(&load("dit_ts")).stack_input;
    let readers: Vec<&str> = model
        .graph
        .nodes()
        .filter(|(_, n)| n.inputs.contains(&GATHERED.to_string()))
        .map(|(_, n)| n.op_type.as_str())
        .collect();
    assert!(readers.contains(&"LayerNormalization"), "{readers:?}");
    assert!(
        model
            .graph
            .nodes()
            .all(|(_, n)| n.op_type != "LayerNormalization" || !n.inputs.contains(&stack_input))
    );
}
