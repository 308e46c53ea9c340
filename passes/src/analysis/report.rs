//! A stable, serialisable summary of a discovered structure (the `structure` key of
//! `fastcache inspect --json`) and its text rendering (inspect's table, the snapshot tests).

use std::fmt::Write;

use serde::Serialize;

use super::flow::ValueKind;
use super::structure::{
    ConditionKind, DitStack, InputRoles, Joint, Region, Structure, StructureError,
};
use crate::ir::Dim;

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StructureSummary {
    SingleStream(StackSummary),
    /// MMDiT: image and text streams through double (and single) blocks.
    Joint(StackSummary),
    /// No DiT structure; `reason` says what was looked for.
    None {
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct InputsSummary {
    pub latent: String,
    pub timestep: Option<String>,
    pub conditions: Vec<ConditionSummary>,
    pub other: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConditionSummary {
    pub input: String,
    pub kind: ConditionKind,
}

#[derive(Clone, Debug, Serialize)]
pub struct StackSummary {
    pub supported: bool,
    pub inputs: InputsSummary,
    /// The batch dim: its symbol, or a number.
    pub batch: serde_json::Value,
    pub tokens: Option<i64>,
    pub hidden: Option<i64>,
    pub stack_input: String,
    pub stack_output: String,
    pub sublayers_per_block: usize,
    pub blocks: Vec<BlockSummary>,
    pub embed: RegionSummary,
    pub final_layer: RegionSummary,
    pub shared: RegionSummary,
    pub flops: FlopsSummary,
    pub names_agree: Option<bool>,
    pub notes: Vec<String>,
    pub joint: Option<JointSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JointSummary {
    pub text_input: String,
    pub text_tokens: Option<i64>,
    pub double_blocks: usize,
    pub single_blocks: usize,
    pub image_first: Option<bool>,
    pub joined_once: bool,
    pub summary: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BlockSummary {
    pub index: usize,
    pub label: Option<String>,
    pub kind: &'static str,
    pub input: String,
    pub output: String,
    pub text_input: Option<String>,
    pub text_output: Option<String>,
    pub sublayers: Vec<SublayerSummary>,
    pub nodes: usize,
    pub core_nodes: usize,
    pub parameters: u64,
    pub flops: u64,
    pub flops_unknown_nodes: usize,
    pub side_inputs: Vec<SideInputSummary>,
    pub escaping: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SublayerSummary {
    pub kind: &'static str,
    pub input: String,
    pub output: String,
    pub core_nodes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct SideInputSummary {
    pub name: String,
    /// "data" or "shape".
    pub kind: &'static str,
    pub from: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RegionSummary {
    pub nodes: usize,
    pub parameters: u64,
    pub flops: u64,
    pub flops_unknown_nodes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlopsSummary {
    /// The batch size the counts are for.
    pub batch: u64,
    pub blocks: u64,
    pub total: u64,
    /// Heavy operators whose shapes stayed unknown (not counted).
    pub unknown_nodes: usize,
}

fn dim_json(d: &Dim) -> serde_json::Value {
    match d {
        Dim::Fixed(n) => serde_json::json!(n),
        Dim::Named(s) => serde_json::json!(s),
        Dim::Unknown => serde_json::Value::Null,
    }
}

fn inputs(roles: &InputRoles) -> InputsSummary {
    InputsSummary {
        latent: roles.latent.clone(),
        timestep: roles.timestep.clone(),
        conditions: roles
            .conditions
            .iter()
            .map(|c| ConditionSummary {
                input: c.input.clone(),
                kind: c.kind,
            })
            .collect(),
        other: roles.other.clone(),
    }
}

fn region(r: &Region) -> RegionSummary {
    RegionSummary {
        nodes: r.nodes.len(),
        parameters: r.parameter_count,
        flops: r.flops.counted,
        flops_unknown_nodes: r.flops.unknown_nodes,
    }
}

/// Summarises a discovery result (found or refused).
pub fn summarize(result: &Result<Structure, StructureError>) -> StructureSummary {
    match result {
        Ok(Structure::SingleStream(stack)) => StructureSummary::SingleStream(stack_summary(stack)),
        Ok(Structure::Joint(stack)) => StructureSummary::Joint(stack_summary(stack)),
        Err(e) => StructureSummary::None {
            reason: e.to_string(),
        },
    }
}

fn stack_summary(s: &DitStack) -> StackSummary {
    let total = s.total_flops();
    StackSummary {
        supported: true,
        inputs: inputs(&s.inputs),
        batch: dim_json(&s.batch),
        tokens: s.tokens,
        hidden: s.hidden,
        stack_input: s.stack_input.clone(),
        stack_output: s.stack_output.clone(),
        sublayers_per_block: s.sublayers_per_block,
        blocks: s
            .blocks
            .iter()
            .map(|b| BlockSummary {
                index: b.index,
                label: b.label.clone(),
                kind: b.kind.as_str(),
                input: b.input.clone(),
                output: b.output.clone(),
                text_input: b.text_input.clone(),
                text_output: b.text_output.clone(),
                sublayers: b
                    .sublayers
                    .iter()
                    .map(|l| SublayerSummary {
                        kind: l.kind.as_str(),
                        input: l.input.clone(),
                        output: l.output.clone(),
                        core_nodes: l.core_nodes,
                    })
                    .collect(),
                nodes: b.nodes.len(),
                core_nodes: b.core_nodes,
                parameters: b.parameter_count,
                flops: b.flops.counted,
                flops_unknown_nodes: b.flops.unknown_nodes,
                side_inputs: b
                    .side_inputs
                    .iter()
                    .map(|i| SideInputSummary {
                        name: i.name.clone(),
                        kind: if i.kind == ValueKind::Shape {
                            "shape"
                        } else {
                            "data"
                        },
                        from: i.source.to_string(),
                    })
                    .collect(),
                escaping: b.escaping.clone(),
            })
            .collect(),
        embed: region(&s.embed),
        final_layer: region(&s.final_layer),
        shared: region(&s.shared),
        flops: FlopsSummary {
            batch: 1,
            blocks: s
                .blocks
                .iter()
                .map(|b| b.flops.counted)
                .fold(0, u64::saturating_add),
            total: total.counted,
            unknown_nodes: total.unknown_nodes,
        },
        names_agree: s.names_agree,
        notes: s.notes.clone(),
        joint: s.joint.as_ref().map(joint_summary),
    }
}

fn joint_summary(j: &Joint) -> JointSummary {
    JointSummary {
        text_input: j.text_input.clone(),
        text_tokens: j.text_tokens,
        double_blocks: j.double_blocks,
        single_blocks: j.single_blocks,
        image_first: j.image_first,
        joined_once: j.joined_once,
        summary: j.summary(),
    }
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "?".into(),
        other => other.to_string(),
    }
}

fn opt(v: Option<i64>) -> String {
    v.map_or("?".into(), |n| n.to_string())
}

fn inputs_line(i: &InputsSummary) -> String {
    let mut parts = vec![format!("latent {}", i.latent)];
    parts.push(format!("timestep {}", i.timestep.as_deref().unwrap_or("-")));
    if i.conditions.is_empty() {
        parts.push("condition -".into());
    }
    for c in &i.conditions {
        parts.push(format!("condition {} ({})", c.input, kind_text(c.kind)));
    }
    if !i.other.is_empty() {
        parts.push(format!("not read by the stack: {}", i.other.join(", ")));
    }
    parts.join(", ")
}

fn kind_text(k: ConditionKind) -> &'static str {
    k.as_str()
}

fn flops_text(counted: u64, unknown: usize) -> String {
    if unknown == 0 {
        thousands(counted)
    } else {
        format!("{}+{unknown}?", thousands(counted))
    }
}

/// The structure as text. `detailed` adds every block's boundaries, sub-layers and side inputs
/// with their sources (the snapshot form); without it, one table row per block (inspect).
pub fn render_text(summary: &StructureSummary, detailed: bool) -> String {
    let mut out = String::new();
    match summary {
        StructureSummary::None { reason } => {
            let _ = writeln!(out, "structure   none: {reason}");
        }
        StructureSummary::SingleStream(s) | StructureSummary::Joint(s) => {
            match &s.joint {
                None => {
                    let kinds: Vec<&str> = s.blocks[0].sublayers.iter().map(|l| l.kind).collect();
                    let _ = writeln!(
                        out,
                        "structure   single-stream DiT: {} blocks of {} sub-layers ({})",
                        s.blocks.len(),
                        s.sublayers_per_block,
                        kinds.join(", ")
                    );
                }
                Some(j) => {
                    let _ = writeln!(out, "structure   MMDiT: {}", j.summary);
                    let _ = writeln!(
                        out,
                        "  text      {} -> blocks, T = {}",
                        j.text_input,
                        opt(j.text_tokens)
                    );
                }
            }
            let _ = writeln!(out, "  inputs    {}", inputs_line(&s.inputs));
            let _ = writeln!(
                out,
                "  sizes     batch {}, tokens N = {}, hidden D = {}",
                json_text(&s.batch),
                opt(s.tokens),
                opt(s.hidden)
            );
            let _ = writeln!(out, "  stack     {} -> {}", s.stack_input, s.stack_output);
            let rows: Vec<[String; 7]> = s
                .blocks
                .iter()
                .map(|b| {
                    let data: Vec<&str> = b
                        .side_inputs
                        .iter()
                        .filter(|i| i.kind == "data")
                        .map(|i| i.name.as_str())
                        .collect();
                    let shape = b.side_inputs.len() - data.len();
                    let mut side = data.join(", ");
                    if shape > 0 {
                        let _ = write!(
                            side,
                            "{}+{shape} shape",
                            if side.is_empty() { "" } else { " " }
                        );
                    }
                    if side.is_empty() {
                        side = "-".into();
                    }
                    [
                        b.index.to_string(),
                        b.kind.to_string(),
                        b.label.clone().unwrap_or_else(|| "-".into()),
                        b.nodes.to_string(),
                        thousands(b.parameters),
                        flops_text(b.flops, b.flops_unknown_nodes),
                        side,
                    ]
                })
                .collect();
            let header = [
                "block",
                "kind",
                "label",
                "nodes",
                "params",
                "FLOPs",
                "side inputs",
            ];
            let mut widths = header.map(str::len);
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            // Block kinds only tell something where there are two streams.
            let show_kind = s.joint.is_some();
            let line = |cells: &[String]| -> String {
                let mut text = String::from("  ");
                for (i, cell) in cells.iter().enumerate() {
                    if i == 1 && !show_kind {
                        continue;
                    }
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    if i == cells.len() - 1 {
                        text.push_str(cell);
                    } else if (3..=5).contains(&i) {
                        let _ = write!(text, "{}{cell}  ", " ".repeat(pad));
                    } else {
                        let _ = write!(text, "{cell}{}  ", " ".repeat(pad));
                    }
                }
                text.trim_end().to_string()
            };
            let _ = writeln!(out, "{}", line(&header.map(String::from)));
            for row in &rows {
                let _ = writeln!(out, "{}", line(row));
            }
            for (name, r) in [
                ("embed", &s.embed),
                ("final layer", &s.final_layer),
                ("shared", &s.shared),
            ] {
                let _ = writeln!(
                    out,
                    "  {name:<12}{} nodes, {} params, {} FLOPs",
                    r.nodes,
                    thousands(r.parameters),
                    flops_text(r.flops, r.flops_unknown_nodes)
                );
            }
            let share = if s.flops.total > 0 {
                100.0 * s.flops.blocks as f64 / s.flops.total as f64
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "  FLOPs     {} per sample, {share:.1}% in the blocks{}",
                thousands(s.flops.total),
                if s.flops.unknown_nodes > 0 {
                    format!(
                        " ({} heavy nodes of unknown shape not counted)",
                        s.flops.unknown_nodes
                    )
                } else {
                    String::new()
                }
            );
            if detailed {
                for b in &s.blocks {
                    let _ = writeln!(out, "  block {}: {} -> {}", b.index, b.input, b.output);
                    if b.text_input.is_some() || b.text_output.is_some() {
                        let _ = writeln!(
                            out,
                            "    text: {} -> {}",
                            b.text_input.as_deref().unwrap_or("-"),
                            b.text_output.as_deref().unwrap_or("-")
                        );
                    }
                    for l in &b.sublayers {
                        let _ = writeln!(
                            out,
                            "    {} ({} core nodes): {} -> {}",
                            l.kind, l.core_nodes, l.input, l.output
                        );
                    }
                    for i in &b.side_inputs {
                        let _ = writeln!(
                            out,
                            "    side input {} ({}, from {})",
                            i.name, i.kind, i.from
                        );
                    }
                    for e in &b.escaping {
                        let _ = writeln!(out, "    escaping {e}");
                    }
                }
            }
            for note in &s.notes {
                let _ = writeln!(out, "  note      {note}");
            }
        }
    }
    out
}
