//! `fastcache inspect MODEL [--json]`: what a model takes and gives, its opsets, operators,
//! parameters and external data, and its DiT structure (blocks, their side inputs and FLOPs, the
//! roles of the inputs), as aligned text for people or stable JSON for scripts. A model that is
//! not a DiT still gets the general report, plus the reason no DiT structure was found.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use fastcache_passes::analysis::{discover, report::StructureSummary, report::summarize};
use fastcache_passes::ir::{Dim, Graph, Model, ValueInfo, verify_model};
use fastcache_passes::onnx::{elem_size, elem_type_name, element_count};
use serde::Serialize;

use super::output::{say, say_raw};

#[derive(clap::Args)]
pub struct Args {
    /// The .onnx file.
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
pub struct Report {
    pub file: String,
    pub ir_version: i64,
    pub producer: String,
    pub opsets: BTreeMap<String, i64>,
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
    pub nodes: usize,
    pub op_types: BTreeMap<String, usize>,
    pub parameters: u64,
    pub parameter_bytes: u64,
    pub initializers: usize,
    pub external_data: Vec<ExternalFile>,
    pub metadata: BTreeMap<String, String>,
    /// The DiT structure, or why none was found.
    pub structure: StructureSummary,
}

#[derive(Serialize)]
pub struct Tensor {
    pub name: String,
    pub dtype: String,
    /// Numbers are fixed dims, strings named (symbolic) ones, null unknown.
    pub shape: Option<Vec<serde_json::Value>>,
}

#[derive(Serialize)]
pub struct ExternalFile {
    pub location: String,
    pub bytes: u64,
}

fn tensor(value: &ValueInfo) -> Tensor {
    Tensor {
        name: value.name.clone(),
        dtype: value.elem_type().map_or("?".into(), elem_type_name),
        shape: value.dims().map(|dims| {
            dims.into_iter()
                .map(|d| match d {
                    Dim::Fixed(n) => serde_json::json!(n),
                    Dim::Named(s) => serde_json::json!(s),
                    Dim::Unknown => serde_json::Value::Null,
                })
                .collect()
        }),
    }
}

/// Counts operators of a graph and of every nested body.
fn count_ops(graph: &Graph, counts: &mut BTreeMap<String, usize>) -> usize {
    let mut nodes = 0;
    for (_, node) in graph.nodes() {
        nodes += 1;
        let op = if node.domain.is_empty() || node.domain == "ai.onnx" {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        *counts.entry(op).or_default() += 1;
        for body in node.subgraphs() {
            nodes += count_ops(body, counts);
        }
    }
    nodes
}

pub fn report(model: &Model, file: &str) -> Report {
    let graph = &model.graph;
    let mut op_types = BTreeMap::new();
    let nodes = count_ops(graph, &mut op_types);
    let (mut parameters, mut parameter_bytes) = (0u64, 0u64);
    for t in &graph.initializers {
        let count = element_count(&t.dims);
        parameters += count;
        parameter_bytes += count * elem_size(t.data_type.unwrap_or(0)).unwrap_or(0) as u64;
    }
    // Initializers that are also graph inputs are overridable defaults, not inputs a user feeds.
    let inputs = graph
        .inputs
        .iter()
        .filter(|v| graph.initializer(&v.name).is_none())
        .map(tensor)
        .collect();
    Report {
        file: file.to_string(),
        ir_version: model.info.ir_version.unwrap_or(0),
        producer: format!(
            "{} {}",
            model.info.producer_name.as_deref().unwrap_or(""),
            model.info.producer_version.as_deref().unwrap_or("")
        )
        .trim()
        .to_string(),
        opsets: model
            .opsets
            .iter()
            .map(|o| {
                let domain = o.domain.as_deref().unwrap_or("");
                let domain = if domain.is_empty() { "ai.onnx" } else { domain };
                (domain.to_string(), o.version.unwrap_or(0))
            })
            .collect(),
        inputs,
        outputs: graph.outputs.iter().map(tensor).collect(),
        nodes,
        op_types,
        parameters,
        parameter_bytes,
        initializers: graph.initializers.len(),
        external_data: model
            .external
            .files()
            .into_iter()
            .map(|(location, bytes)| ExternalFile { location, bytes })
            .collect(),
        metadata: model.metadata_map(),
        structure: summarize(&discover(model)),
    }
}

fn shape_text(t: &Tensor) -> String {
    match &t.shape {
        None => "[*]".into(),
        Some(dims) => {
            let dims: Vec<String> = dims
                .iter()
                .map(|d| match d {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "?".into(),
                    other => other.to_string(),
                })
                .collect();
            format!("[{}]", dims.join(", "))
        }
    }
}

/// Human-readable bytes: 1.5 MiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "model       {}", r.file);
    let _ = writeln!(
        out,
        "producer    {}",
        if r.producer.is_empty() {
            "-"
        } else {
            &r.producer
        }
    );
    let opsets: Vec<String> = r.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
    let _ = writeln!(out, "ir version  {}", r.ir_version);
    let _ = writeln!(out, "opsets      {}", opsets.join(", "));
    let _ = writeln!(
        out,
        "parameters  {} in {} initializers ({})",
        r.parameters,
        r.initializers,
        human_bytes(r.parameter_bytes)
    );
    let _ = writeln!(out, "nodes       {}", r.nodes);
    for (title, list) in [("inputs", &r.inputs), ("outputs", &r.outputs)] {
        let _ = writeln!(out, "\n{title}");
        let width = list.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in list.iter() {
            let _ = writeln!(out, "  {:width$}  {:<5} {}", t.name, t.dtype, shape_text(t));
        }
    }
    let _ = writeln!(out, "\nexternal data");
    if r.external_data.is_empty() {
        let _ = writeln!(out, "  none (weights are inside the model file)");
    }
    for f in &r.external_data {
        let _ = writeln!(out, "  {}  {}", f.location, human_bytes(f.bytes));
    }
    if !r.metadata.is_empty() {
        let _ = writeln!(out, "\nmetadata");
        for (k, v) in &r.metadata {
            let shown: String = v.chars().take(100).collect();
            let more = if v.chars().count() > 100 { " ..." } else { "" };
            let _ = writeln!(out, "  {k} = {shown}{more}");
        }
    }
    let _ = writeln!(out, "\noperators (count)");
    let mut ops: Vec<(&String, &usize)> = r.op_types.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let width = ops.iter().map(|(op, _)| op.len()).max().unwrap_or(0);
    for (op, count) in ops {
        let _ = writeln!(out, "  {op:width$}  {count:>5}");
    }
    let _ = writeln!(out);
    out.push_str(&fastcache_passes::analysis::report::render_text(
        &r.structure,
        false,
    ));
    out
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = Model::load(&args.model).context("cannot inspect the model")?;
    verify_model(&model)
        .with_context(|| format!("{} is not a valid graph", args.model.display()))?;
    let report = report(&model, &args.model.display().to_string());
    if args.json {
        say!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        say_raw!("{}", render_text(&report));
    }
    Ok(())
}
