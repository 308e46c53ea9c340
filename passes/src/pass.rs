//! The `Pass` trait and a small pass manager: run a pass on a model, verify the graph after it,
//! report what changed. A pass that fails, or leaves a graph the verifier rejects, leaves the
//! model as it was (the manager works on a copy; tensors are shared `Bytes`, so copies are cheap).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::error::{Error, Result};
use crate::ir::{Model, Node, verify_model};

/// One transformation of a model.
pub trait Pass {
    /// A short name for reports and errors (`expose`, `block-cache`).
    fn name(&self) -> &str;
    /// Transforms the model in place. May leave it half-changed on error: the manager restores it.
    fn run(&self, model: &mut Model) -> Result<()>;
}

/// What one pass changed, found by comparing the graph before and after.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub pass: String,
    pub nodes_added: usize,
    pub nodes_removed: usize,
    /// Nodes that define the same values as before but differ otherwise (inputs, attributes...).
    pub nodes_changed: usize,
    pub inputs_added: Vec<String>,
    pub inputs_removed: Vec<String>,
    pub outputs_added: Vec<String>,
    pub outputs_removed: Vec<String>,
    pub initializers_added: usize,
    pub initializers_removed: usize,
}

impl PassReport {
    pub fn is_empty(&self) -> bool {
        *self
            == PassReport {
                pass: self.pass.clone(),
                ..PassReport::default()
            }
    }
}

impl fmt::Display for PassReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.pass)?;
        if self.is_empty() {
            return write!(f, " no change");
        }
        let mut parts = Vec::new();
        for (count, what) in [
            (self.nodes_added, "nodes added"),
            (self.nodes_removed, "nodes removed"),
            (self.nodes_changed, "nodes changed"),
            (self.initializers_added, "initializers added"),
            (self.initializers_removed, "initializers removed"),
        ] {
            if count > 0 {
                parts.push(format!("{count} {what}"));
            }
        }
        for (names, what) in [
            (&self.inputs_added, "inputs added"),
            (&self.inputs_removed, "inputs removed"),
            (&self.outputs_added, "outputs added"),
            (&self.outputs_removed, "outputs removed"),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        }
        write!(f, " {}", parts.join("; "))
    }
}

/// A node as compared across a pass: keyed by the values it defines (unique in a valid graph),
/// described by everything that makes it compute what it computes.
fn node_key(node: &Node) -> String {
    node.outputs.join("\u{1f}")
}

fn node_text(node: &Node) -> String {
    format!(
        "{}.{}({}) {:?}",
        node.domain,
        node.op_type,
        node.inputs.join(","),
        node.attributes
            .iter()
            .map(|a| (&a.name, format!("{:?}", a.value)))
            .collect::<Vec<_>>()
    )
}

struct Snapshot {
    nodes: BTreeMap<String, String>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    initializers: BTreeSet<String>,
}

fn snapshot(model: &Model) -> Snapshot {
    let graph = &model.graph;
    Snapshot {
        nodes: graph
            .nodes()
            .map(|(_, n)| (node_key(n), node_text(n)))
            .collect(),
        inputs: graph.inputs.iter().map(|v| v.name.clone()).collect(),
        outputs: graph.outputs.iter().map(|v| v.name.clone()).collect(),
        initializers: graph
            .initializers
            .iter()
            .map(|t| t.name().to_string())
            .collect(),
    }
}

fn compare(pass: &str, before: &Snapshot, after: &Snapshot) -> PassReport {
    let missing = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|x| !b.contains(x)).cloned().collect()
    };
    PassReport {
        pass: pass.to_string(),
        nodes_added: after
            .nodes
            .keys()
            .filter(|k| !before.nodes.contains_key(*k))
            .count(),
        nodes_removed: before
            .nodes
            .keys()
            .filter(|k| !after.nodes.contains_key(*k))
            .count(),
        nodes_changed: after
            .nodes
            .iter()
            .filter(|(k, v)| before.nodes.get(*k).is_some_and(|old| old != *v))
            .count(),
        inputs_added: missing(&after.inputs, &before.inputs),
        inputs_removed: missing(&before.inputs, &after.inputs),
        outputs_added: missing(&after.outputs, &before.outputs),
        outputs_removed: missing(&before.outputs, &after.outputs),
        initializers_added: after.initializers.difference(&before.initializers).count(),
        initializers_removed: before.initializers.difference(&after.initializers).count(),
    }
}

/// Runs one pass, verifies the result and reports the change. On any error the model is
/// unchanged and the error names the pass.
pub fn run_pass(model: &mut Model, pass: &dyn Pass) -> Result<PassReport> {
    let before = snapshot(model);
    let mut work = model.clone();
    let name = pass.name().to_string();
    pass.run(&mut work).map_err(|e| match e {
        Error::Verify(problems) => Error::Verify(
            problems
                .into_iter()
                .map(|p| format!("pass '{name}': {p}"))
                .collect(),
        ),
        Error::Invalid(message) => Error::Invalid(format!("pass '{name}': {message}")),
        Error::Unsupported(message) => Error::Unsupported(format!("pass '{name}': {message}")),
        other => other,
    })?;
    verify_model(&work).map_err(|e| match e {
        Error::Verify(problems) => Error::Verify(
            problems
                .into_iter()
                .map(|p| format!("after pass '{name}': {p}"))
                .collect(),
        ),
        other => other,
    })?;
    let report = compare(&name, &before, &snapshot(&work));
    *model = work;
    Ok(report)
}

/// Passes run in order, each verified.
#[derive(Default)]
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

impl PassManager {
    pub fn new() -> PassManager {
        PassManager::default()
    }

    pub fn with(mut self, pass: impl Pass + 'static) -> PassManager {
        self.passes.push(Box::new(pass));
        self
    }

    /// Runs every pass; stops at the first failure, leaving the model as the last successful
    /// pass left it.
    pub fn run(&self, model: &mut Model) -> Result<Vec<PassReport>> {
        self.passes
            .iter()
            .map(|pass| run_pass(model, pass.as_ref()))
            .collect()
    }
}
