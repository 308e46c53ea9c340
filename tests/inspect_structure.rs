//! The structure section of `fastcache inspect`: the block table for DiTs, the dual-stream notice
//! for MMDiT, one line of reasons for graphs that are not DiTs (which inspect must not fail on).

use std::path::PathBuf;
use std::process::Command;

fn inspect(fixture: &str, json: bool) -> String {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_fastcache"));
    command
        .arg("inspect")
        .arg(repo.join("models/fixtures").join(fixture));
    if json {
        command.arg("--json");
    }
    let output = command.output().expect("run fastcache");
    assert!(
        output.status.success(),
        "inspect {fixture} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn dit_and_pixart_show_their_blocks() {
    for (fixture, condition, sublayers) in [
        ("dit_ts.onnx", "class_labels (class labels)", 2),
        ("dit_dynamo.onnx", "class_labels (class labels)", 2),
        ("pixart_ts.onnx", "encoder_hidden_states (text)", 3),
        ("pixart_dynamo.onnx", "encoder_hidden_states (text)", 3),
    ] {
        let text = inspect(fixture, false);
        assert!(
            text.contains(&format!(
                "structure   single-stream DiT: 3 blocks of {sublayers} sub-layers"
            )),
            "{fixture}:\n{text}"
        );
        assert!(
            text.contains("latent hidden_states, timestep timestep"),
            "{fixture}"
        );
        assert!(
            text.contains(&format!("condition {condition}")),
            "{fixture}"
        );
        assert!(text.contains("tokens N = 16, hidden D = 16"), "{fixture}");
        for header in ["block", "nodes", "params", "FLOPs", "side inputs"] {
            assert!(text.contains(header), "{fixture}: no '{header}'");
        }

        let json: serde_json::Value = serde_json::from_str(&inspect(fixture, true)).unwrap();
        let s = &json["structure"];
        assert_eq!(s["kind"], "single-stream", "{fixture}");
        assert_eq!(s["supported"], true);
        assert_eq!(
            (s["tokens"].as_i64(), s["hidden"].as_i64()),
            (Some(16), Some(16))
        );
        assert_eq!(s["inputs"]["latent"], "hidden_states");
        assert_eq!(s["inputs"]["timestep"], "timestep");
        let blocks = s["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 3);
        for b in blocks {
            assert!(b["flops"].as_u64().unwrap() > 0 && b["parameters"].as_u64().unwrap() > 0);
            assert!(!b["side_inputs"].as_array().unwrap().is_empty());
        }
    }
}

#[test]
fn sd3_is_shown_as_a_joint_stack_of_double_blocks() {
    for fixture in ["sd3_ts.onnx", "sd3_dynamo.onnx"] {
        let text = inspect(fixture, false);
        assert!(
            text.contains("structure   MMDiT: 3 double blocks; text stream from"),
            "{text}"
        );
        assert!(
            text.contains("block 2 writes no text (context_pre_only)"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&inspect(fixture, true)).unwrap();
        assert_eq!(json["structure"]["kind"], "joint");
        assert_eq!(json["structure"]["supported"], true);
        assert_eq!(json["structure"]["joint"]["double_blocks"], 3);
        assert_eq!(json["structure"]["joint"]["text_tokens"], 6);
        let blocks = json["structure"]["blocks"].as_array().unwrap();
        assert!(blocks[1]["text_output"].is_string());
        assert!(blocks[2]["text_output"].is_null());
    }
}

#[test]
fn graphs_that_are_not_dits_get_one_line_of_reasons() {
    for fixture in [
        "negative/mlp.onnx",
        "negative/cnn.onnx",
        "negative/transformer_no_residual.onnx",
    ] {
        let text = inspect(fixture, false);
        // The general report is still there.
        assert!(text.contains("operators (count)"), "{fixture}");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("structure"))
            .collect();
        assert_eq!(lines.len(), 1, "{fixture}:\n{text}");
        assert!(
            lines[0].starts_with("structure   none: no DiT block stack found: looked for"),
            "{}",
            lines[0]
        );
        assert!(!text.contains("block  label"), "{fixture}");
        let json: serde_json::Value = serde_json::from_str(&inspect(fixture, true)).unwrap();
        assert_eq!(json["structure"]["kind"], "none");
        assert!(
            json["structure"]["reason"]
                .as_str()
                .unwrap()
                .contains("looked for residual connections")
        );
    }
}
