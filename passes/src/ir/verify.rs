//! The verifier every pass runs after every change: single definitions, every use defined (in
//! scope for subgraphs), acyclic, graph outputs produced, an opset for every domain used.

use super::*;

/// Checks a model; the error lists every problem found, each naming its graph and node or value.
pub fn verify_model(model: &Model) -> Result<()> {
    let mut problems = Vec::new();
    let imported: HashSet<&str> = model
        .opsets
        .iter()
        .map(|o| normalize_domain(o.domain.as_deref().unwrap_or("")))
        .collect();
    verify_graph(
        &model.graph,
        &HashSet::new(),
        &imported,
        "graph",
        &mut problems,
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Verify(problems))
    }
}

fn verify_graph(
    graph: &Graph,
    outer: &HashSet<String>,
    imported: &HashSet<&str>,
    path: &str,
    problems: &mut Vec<String>,
) {
    let path = format!("{path} '{}'", graph.name);
    // Single definition: inputs, initializers and node outputs. An initializer may share its name
    // with a graph input (it is then the input's default), so those two count as one definition.
    let mut defined: HashMap<String, String> = HashMap::new();
    let mut define = |name: &str, by: String, problems: &mut Vec<String>| {
        if name.is_empty() {
            return;
        }
        if let Some(previous) = defined.get(name) {
            problems.push(format!(
                "{path}: value '{name}' is defined twice ({previous} and {by})"
            ));
        } else {
            defined.insert(name.to_string(), by);
        }
    };
    for input in &graph.inputs {
        define(&input.name, "a graph input".into(), problems);
    }
    for tensor in &graph.initializers {
        if !graph.is_input(tensor.name()) {
            define(tensor.name(), "an initializer".into(), problems);
        }
    }
    for (_, node) in graph.nodes() {
        for output in &node.outputs {
            define(output, format!("node {}", node.label()), problems);
        }
    }

    let in_scope = |name: &str| defined.contains_key(name) || outer.contains(name);
    for (_, node) in graph.nodes() {
        for input in &node.inputs {
            if !input.is_empty() && !in_scope(input) {
                problems.push(format!(
                    "{path}: node {} reads '{input}', which nothing defines",
                    node.label()
                ));
            }
        }
        let domain = normalize_domain(&node.domain);
        // Calls of model-local functions need their domain imported too, so one check covers both.
        if !imported.contains(domain) {
            problems.push(format!(
                "{path}: node {} uses domain '{}', for which the model imports no opset",
                node.label(),
                node.domain
            ));
        }
        let subgraphs = node.subgraphs();
        if subgraphs.is_empty() {
            continue;
        }
        // Bodies see every value of the enclosing scopes (built only for nodes that have one:
        // cloning the scope per node made verification quadratic on large graphs).
        let mut scope: HashSet<String> = outer.clone();
        scope.extend(defined.keys().cloned());
        for sub in subgraphs {
            verify_graph(
                sub,
                &scope,
                imported,
                &format!("{path}, node {}, body", node.label()),
                problems,
            );
        }
    }
    for output in &graph.outputs {
        if !in_scope(&output.name) {
            problems.push(format!("{path}: output '{}' is not produced", output.name));
        }
    }
    if let Err(Error::Verify(cycle)) = graph.topo_order() {
        problems.extend(cycle);
    }
}
