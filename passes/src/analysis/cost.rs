//! The cost model: floating-point operations of the operators that dominate a transformer —
//! MatMul (projections and both attention products), Gemm, Conv, ConvTranspose, Einsum with two or
//! more operands — counted as 2·M·K·N per matrix product (one multiply and one add per
//! multiply-accumulate). Elementwise operators, normalisations and softmax are left out: they are a
//! few percent of a DiT's work and their cost is memory-bound, not FLOP-bound.
//!
//! Shapes come from [`super::shapes`]; a symbolic batch dim is evaluated at 1, so the counts are
//! per sample. A heavy node whose shape stays unknown is counted as unknown, never guessed.

use std::collections::HashMap;
use std::ops::{Add, AddAssign};

use serde::Serialize;

use super::shapes::{Shapes, eval_dim};
use crate::ir::{AttrValue, Node};

/// FLOPs of a set of nodes: the counted total and how many heavy nodes could not be sized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Flops {
    pub counted: u64,
    pub unknown_nodes: usize,
}

impl Add for Flops {
    type Output = Flops;
    fn add(self, other: Flops) -> Flops {
        Flops {
            counted: self.counted.saturating_add(other.counted),
            unknown_nodes: self.unknown_nodes + other.unknown_nodes,
        }
    }
}

impl AddAssign for Flops {
    fn add_assign(&mut self, other: Flops) {
        *self = *self + other;
    }
}

impl std::iter::Sum for Flops {
    fn sum<I: Iterator<Item = Flops>>(iter: I) -> Flops {
        iter.fold(Flops::default(), |a, b| a + b)
    }
}

/// The cost of one node: `Some(flops)` (0 for operators the model does not count), or `None`
/// for a heavy operator whose shapes are unknown.
pub fn node_flops(node: &Node, shapes: &Shapes, bindings: &HashMap<String, i64>) -> Option<u64> {
    if !node.domain.is_empty() && node.domain != "ai.onnx" {
        return Some(0);
    }
    let numbers = |name: &str| -> Option<Vec<u64>> {
        shapes
            .dims(name)?
            .iter()
            .map(|d| eval_dim(d, bindings).filter(|&n| n >= 0).map(|n| n as u64))
            .collect()
    };
    // Saturating: the dims are the file's word, and a count past u64 is "too many", not a panic.
    let product = |dims: &[u64]| saturating_product(dims.iter().copied());
    let input = |i: usize| node.inputs.get(i).map(String::as_str).unwrap_or("");
    let output = node.outputs.first().map(String::as_str).unwrap_or("");
    match node.op_type.as_str() {
        "MatMul" | "MatMulInteger" => {
            let a = numbers(input(0))?;
            let out = numbers(output)?;
            let k = *a.last()?;
            Some(saturating_product([2, product(&out), k]))
        }
        "Gemm" => {
            let a = numbers(input(0))?;
            let out = numbers(output)?;
            if a.len() != 2 {
                return None;
            }
            let k = if node.attr_int("transA") == Some(1) {
                a[0]
            } else {
                a[1]
            };
            Some(saturating_product([2, product(&out), k]))
        }
        "Conv" => {
            let w = numbers(input(1))?;
            let out = numbers(output)?;
            // Each output element: C_in/groups · kernel multiply-accumulates.
            Some(saturating_product([2, product(&out), product(w.get(1..)?)]))
        }
        "ConvTranspose" => {
            let x = numbers(input(0))?;
            let w = numbers(input(1))?;
            Some(saturating_product([2, product(&x), product(w.get(1..)?)]))
        }
        "Einsum" => {
            let operands = node.inputs.iter().filter(|i| !i.is_empty()).count();
            if operands < 2 {
                return Some(0); // a permutation or reduction of one tensor
            }
            let AttrValue::String(equation) = node.attr("equation")? else {
                return None;
            };
            let equation = String::from_utf8_lossy(equation).replace(' ', "");
            let (lhs, _) = equation.split_once("->")?;
            let mut letters: HashMap<char, u64> = HashMap::new();
            for (term, name) in lhs.split(',').zip(&node.inputs) {
                let dims = numbers(name)?;
                if term.contains('.') || dims.len() != term.chars().count() {
                    return None;
                }
                for (c, d) in term.chars().zip(dims) {
                    let entry = letters.entry(c).or_insert(1);
                    *entry = (*entry).max(d);
                }
            }
            Some(saturating_product(
                std::iter::once(2).chain(letters.values().copied()),
            ))
        }
        _ => Some(0),
    }
}

fn saturating_product(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(1, u64::saturating_mul)
}

/// Sums the cost of some nodes.
pub fn flops_of<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    shapes: &Shapes,
    bindings: &HashMap<String, i64>,
) -> Flops {
    nodes
        .into_iter()
        .map(|node| match node_flops(node, shapes, bindings) {
            Some(n) => Flops {
                counted: n,
                unknown_nodes: 0,
            },
            None => Flops {
                counted: 0,
                unknown_nodes: 1,
            },
        })
        .sum()
}
