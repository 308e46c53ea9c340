//! Shape propagation over the main graph: element type and symbolic dims of every value, plus the
//! contents of small integer tensors, so that the shape arithmetic exporters emit
//! (`Shape → Gather → Unsqueeze → Concat → Reshape`) resolves to real dims.
//!
//! It covers the operators transformer exports use; anything else falls back to the file's own
//! `value_info`, or stays unknown. Unknown is an honest answer: callers (the cost model, `expose`)
//! report what they could not size instead of guessing.

use std::collections::HashMap;

use crate::ir::{AttrValue, Dim, Model, Node, ValueInfo};
use crate::onnx::tensor_proto::DataType;
use crate::onnx::{ExternalStore, TensorProto, element_count};

/// Integer tensors with at most this many elements have their contents tracked.
const MAX_CONTENT: u64 = 64;

/// What is known about one value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ValueShape {
    /// ONNX element type code.
    pub elem: Option<i32>,
    /// The dims, when the rank is known (each dim may still be unknown).
    pub dims: Option<Vec<Dim>>,
    /// The elements of a small integer tensor (row-major), each a number, a symbol or unknown.
    pub content: Option<Vec<Dim>>,
}

/// Shapes of the main graph's values, by name.
#[derive(Clone, Debug, Default)]
pub struct Shapes {
    values: HashMap<String, ValueShape>,
}

impl Shapes {
    /// Propagates shapes through the main graph in topological order.
    pub fn infer(model: &Model) -> Shapes {
        let graph = &model.graph;
        let mut shapes = Shapes::default();
        for tensor in &graph.initializers {
            shapes.values.insert(
                tensor.name().to_string(),
                tensor_shape(tensor, &model.external),
            );
        }
        for input in &graph.inputs {
            if !shapes.values.contains_key(&input.name) {
                shapes.values.insert(input.name.clone(), declared(input));
            }
        }
        let declared_types: HashMap<&str, &ValueInfo> = graph
            .value_info
            .iter()
            .chain(&graph.outputs)
            .map(|v| (v.name.as_str(), v))
            .collect();
        let order = graph
            .topo_order()
            .unwrap_or_else(|_| graph.nodes().map(|(id, _)| id).collect());
        for id in order {
            let node = graph.node(id);
            let inputs: Vec<Option<&ValueShape>> = node
                .inputs
                .iter()
                .map(|name| {
                    if name.is_empty() {
                        None
                    } else {
                        shapes.values.get(name)
                    }
                })
                .collect();
            let mut outputs = infer_node(node, &inputs, model);
            outputs.resize(node.outputs.len(), ValueShape::default());
            for (name, mut shape) in node.outputs.iter().zip(outputs) {
                if name.is_empty() {
                    continue;
                }
                if let Some(info) = declared_types.get(name.as_str()) {
                    shape = merge(shape, declared(info));
                }
                shapes.values.insert(name.clone(), shape);
            }
        }
        shapes
    }

    pub fn get(&self, name: &str) -> Option<&ValueShape> {
        self.values.get(name)
    }

    pub fn dims(&self, name: &str) -> Option<&[Dim]> {
        self.values.get(name)?.dims.as_deref()
    }

    pub fn elem(&self, name: &str) -> Option<i32> {
        self.values.get(name)?.elem
    }

    /// A `ValueInfo` for the value: its element type and, when the rank is known, its dims
    /// (unknown dims left unset). `None` when not even the element type is known.
    pub fn value_info(&self, name: &str) -> Option<ValueInfo> {
        let shape = self.values.get(name)?;
        let elem = shape.elem?;
        match &shape.dims {
            Some(dims) => Some(ValueInfo::tensor(name, elem, dims.clone())),
            None => {
                let mut info = ValueInfo::tensor(name, elem, Vec::new());
                if let Some(crate::onnx::type_proto::Value::TensorType(t)) =
                    info.ty.as_mut().and_then(|t| t.value.as_mut())
                {
                    t.shape = None;
                }
                Some(info)
            }
        }
    }
}

/// A graph's declared type as a `ValueShape`. Empty dim names count as unknown.
fn declared(info: &ValueInfo) -> ValueShape {
    ValueShape {
        elem: info.elem_type(),
        dims: info.dims().map(|dims| {
            dims.into_iter()
                .map(|d| match d {
                    Dim::Named(s) if s.is_empty() => Dim::Unknown,
                    other => other,
                })
                .collect()
        }),
        content: None,
    }
}

/// Combines what propagation found with what the file declares: a number beats a symbol beats
/// unknown, dim by dim; a declared rank wins when the two disagree (the exporter saw the real run).
fn merge(inferred: ValueShape, declared: ValueShape) -> ValueShape {
    let dims = match (inferred.dims, declared.dims) {
        (Some(a), Some(b)) if a.len() == b.len() => Some(
            a.into_iter()
                .zip(b)
                .map(|(x, y)| match (&x, &y) {
                    (Dim::Fixed(_), _) => x,
                    (_, Dim::Fixed(_)) => y,
                    (Dim::Named(_), _) => x,
                    _ => y,
                })
                .collect(),
        ),
        (_, Some(b)) => Some(b),
        (a, None) => a,
    };
    ValueShape {
        elem: declared.elem.or(inferred.elem),
        dims,
        content: inferred.content,
    }
}

fn is_int_type(code: i32) -> bool {
    matches!(
        DataType::try_from(code),
        Ok(DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 | DataType::Uint8)
    )
}

/// The shape of a tensor constant, with its contents when it is a small integer tensor.
fn tensor_shape(tensor: &TensorProto, store: &ExternalStore) -> ValueShape {
    let elem = tensor.data_type.unwrap_or(0);
    ValueShape {
        elem: Some(elem),
        dims: Some(tensor.dims.iter().map(|&d| Dim::Fixed(d)).collect()),
        content: int_content(tensor, store).map(|v| v.into_iter().map(Dim::Fixed).collect()),
    }
}

/// The elements of a small int64/int32 tensor.
fn int_content(tensor: &TensorProto, store: &ExternalStore) -> Option<Vec<i64>> {
    if element_count(&tensor.dims) > MAX_CONTENT {
        return None;
    }
    int_values(tensor, store)
}

/// The elements of an int64/int32 tensor, whatever its size.
pub fn int_values(tensor: &TensorProto, store: &ExternalStore) -> Option<Vec<i64>> {
    let elem = tensor.data_type.unwrap_or(0);
    let count = element_count(&tensor.dims);
    if !is_int_type(elem) {
        return None;
    }
    let values: Vec<i64> = match store.raw_bytes(tensor).ok().flatten() {
        Some(raw) => match DataType::try_from(elem).ok()? {
            DataType::Int64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DataType::Int32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            _ => return None,
        },
        None => match DataType::try_from(elem).ok()? {
            DataType::Int64 => tensor.int64_data.clone(),
            DataType::Int32 => tensor.int32_data.iter().map(|&v| v as i64).collect(),
            _ => return None,
        },
    };
    (values.len() as u64 == count).then_some(values)
}

fn fixed(d: &Dim) -> Option<i64> {
    match d {
        Dim::Fixed(n) => Some(*n),
        _ => None,
    }
}

/// A dim as a symbolic product: a number times named factors. `None` if unknown.
fn factor(dims: &[Dim]) -> Option<(i64, Vec<String>)> {
    let mut number = 1i64;
    let mut names = Vec::new();
    for d in dims {
        match d {
            Dim::Fixed(n) => number = number.checked_mul(*n)?,
            Dim::Named(s) => names.push(s.clone()),
            Dim::Unknown => return None,
        }
    }
    names.sort();
    Some((number, names))
}

/// `total / known` for Reshape's -1: exact when the symbols cancel.
fn divide_dims(total: &[Dim], known: &[Dim]) -> Dim {
    let (Some((tn, mut tnames)), Some((kn, knames))) = (factor(total), factor(known)) else {
        return Dim::Unknown;
    };
    for name in knames {
        match tnames.iter().position(|n| *n == name) {
            Some(i) => {
                tnames.remove(i);
            }
            None => return Dim::Unknown,
        }
    }
    if kn == 0 || tn % kn != 0 {
        return Dim::Unknown;
    }
    let q = tn / kn;
    match (q, tnames.len()) {
        (q, 0) => Dim::Fixed(q),
        (1, 1) => Dim::Named(tnames.pop().unwrap()),
        _ => Dim::Unknown,
    }
}

/// Numpy broadcasting of two dims.
fn broadcast_dim(a: &Dim, b: &Dim) -> Dim {
    match (a, b) {
        _ if a == b => a.clone(),
        (Dim::Fixed(1), _) => b.clone(),
        (_, Dim::Fixed(1)) => a.clone(),
        (Dim::Fixed(_), _) => a.clone(),
        (_, Dim::Fixed(_)) => b.clone(),
        _ => Dim::Unknown,
    }
}

fn broadcast(shapes: &[&[Dim]]) -> Vec<Dim> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    (0..rank)
        .map(|i| {
            let mut out = Dim::Fixed(1);
            for s in shapes {
                if i + s.len() >= rank {
                    out = broadcast_dim(&out, &s[i + s.len() - rank]);
                }
            }
            out
        })
        .collect()
}

/// A normalised axis for a tensor of rank `rank`.
fn axis(a: i64, rank: usize) -> Option<usize> {
    let a = if a < 0 { a + rank as i64 } else { a };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Integer values of a small tensor input, all known.
fn ints(shape: Option<&ValueShape>) -> Option<Vec<i64>> {
    shape?.content.as_ref()?.iter().map(fixed).collect()
}

/// An int list given either as input `index` (newer opsets) or as attribute `name` (older ones).
fn ints_input_or_attr(
    node: &Node,
    inputs: &[Option<&ValueShape>],
    index: usize,
    name: &str,
) -> Option<Option<Vec<i64>>> {
    if let Some(shape) = inputs.get(index).copied().flatten() {
        return ints(Some(shape)).map(Some);
    }
    if node.inputs.get(index).is_some_and(|s| !s.is_empty()) {
        return None; // given as an input whose value is unknown
    }
    Some(node.attr_ints(name).map(|v| v.to_vec()))
}

fn same(elem: Option<i32>, dims: Option<Vec<Dim>>) -> ValueShape {
    ValueShape {
        elem,
        dims,
        content: None,
    }
}

/// A dim as a symbol plus a constant: `n+c` (MMDiT's joint axis), `n`, or a number.
fn sum_parts(dim: &Dim) -> Option<(Option<&str>, i64)> {
    match dim {
        Dim::Fixed(c) => Some((None, *c)),
        Dim::Named(s) => match s.split_once('+') {
            Some((name, c)) => Some((Some(name), c.parse().ok()?)),
            None => Some((Some(s.as_str()), 0)),
        },
        Dim::Unknown => None,
    }
}

/// `x ± y` where at most one of them is symbolic, or both the same symbol (which a difference
/// cancels): how exports compute where MMDiT's joint axis splits, e.g. T + (S − T).
fn symbolic_arith(op: &str, x: &Dim, y: &Dim) -> Dim {
    let (Some((a, c)), Some((b, d))) = (sum_parts(x), sum_parts(y)) else {
        return Dim::Unknown;
    };
    let (name, constant) = match (op, a, b) {
        ("Add", a, None) => (a, c.checked_add(d)),
        ("Add", None, b) => (b, c.checked_add(d)),
        ("Sub", a, None) => (a, c.checked_sub(d)),
        ("Sub", Some(a), Some(b)) if a == b => (None, c.checked_sub(d)),
        _ => return Dim::Unknown,
    };
    match (name, constant) {
        (None, Some(c)) => Dim::Fixed(c),
        (Some(n), Some(0)) => Dim::Named(n.to_string()),
        (Some(n), Some(c)) if c > 0 => Dim::Named(format!("{n}+{c}")),
        _ => Dim::Unknown,
    }
}

/// Elementwise integer arithmetic on known contents (the shape arithmetic of exports).
fn arith(op: &str, a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let len = a.len().max(b.len());
    if !(a.len() == len || a.len() == 1) || !(b.len() == len || b.len() == 1) {
        return None;
    }
    let pick = |v: &[Dim], i: usize| v[if v.len() == 1 { 0 } else { i }].clone();
    Some(
        (0..len)
            .map(|i| {
                let (x, y) = (pick(a, i), pick(b, i));
                match (&x, &y, op) {
                    // Checked: a constant in the file may be anything; overflow is "unknown".
                    (Dim::Fixed(x), Dim::Fixed(y), _) => match op {
                        "Add" => x.checked_add(*y),
                        "Sub" => x.checked_sub(*y),
                        "Mul" => x.checked_mul(*y),
                        "Div" => x.checked_div_euclid(*y),
                        _ => None,
                    }
                    .map_or(Dim::Unknown, Dim::Fixed),
                    (_, Dim::Fixed(1), "Mul" | "Div") => x,
                    (Dim::Fixed(1), _, "Mul") => y,
                    (_, Dim::Fixed(0), "Add" | "Sub") => x,
                    (_, _, "Add" | "Sub") => symbolic_arith(op, &x, &y),
                    _ => Dim::Unknown,
                }
            })
            .collect(),
    )
}

/// The output shapes of one node, from its input shapes. Missing entries are unknown.
fn infer_node(node: &Node, inputs: &[Option<&ValueShape>], model: &Model) -> Vec<ValueShape> {
    let input = |i: usize| inputs.get(i).copied().flatten();
    let dims = |i: usize| input(i).and_then(|s| s.dims.clone());
    let elem = |i: usize| input(i).and_then(|s| s.elem);
    let content = |i: usize| input(i).and_then(|s| s.content.clone());
    if !node.domain.is_empty() && node.domain != "ai.onnx" {
        return Vec::new();
    }
    let one = |shape: ValueShape| vec![shape];
    match node.op_type.as_str() {
        "Identity" => one(input(0).cloned().unwrap_or_default()),
        "Cast" => one(ValueShape {
            elem: node.attr_int("to").map(|t| t as i32),
            dims: dims(0),
            content: content(0),
        }),
        "CastLike" => one(ValueShape {
            elem: elem(1),
            dims: dims(0),
            content: content(0),
        }),
        "Relu"
        | "Sigmoid"
        | "Tanh"
        | "Sin"
        | "Cos"
        | "Sqrt"
        | "Erf"
        | "Exp"
        | "Log"
        | "Neg"
        | "Abs"
        | "Reciprocal"
        | "Softplus"
        | "Gelu"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sign"
        | "HardSigmoid"
        | "HardSwish"
        | "LeakyRelu"
        | "Elu"
        | "Selu"
        | "Mish"
        | "Softmax"
        | "LogSoftmax"
        | "Clip"
        | "Dropout"
        | "LayerNormalization"
        | "RMSNormalization"
        | "GroupNormalization"
        | "InstanceNormalization"
        | "BatchNormalization"
        | "Trilu"
        | "CumSum" => one(same(elem(0), dims(0))),
        "Not" | "IsNaN" | "IsInf" => one(same(Some(DataType::Bool as i32), dims(0))),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Mod" | "Sum" | "Mean" => {
            let all: Option<Vec<Vec<Dim>>> = (0..node.inputs.len()).map(dims).collect();
            let out_dims =
                all.map(|all| broadcast(&all.iter().map(|d| d.as_slice()).collect::<Vec<_>>()));
            let out_content = match (content(0), content(1)) {
                (Some(a), Some(b)) if node.inputs.len() == 2 => arith(&node.op_type, &a, &b),
                _ => None,
            };
            one(ValueShape {
                elem: elem(0),
                dims: out_dims,
                content: out_content,
            })
        }
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => {
            let out = match (dims(0), dims(1)) {
                (Some(a), Some(b)) => Some(broadcast(&[&a, &b])),
                _ => None,
            };
            one(same(Some(DataType::Bool as i32), out))
        }
        "Where" => {
            let out = match (dims(0), dims(1), dims(2)) {
                (Some(a), Some(b), Some(c)) => Some(broadcast(&[&a, &b, &c])),
                _ => None,
            };
            one(same(elem(1), out))
        }
        "MatMul" => one(same(
            elem(0),
            match (dims(0), dims(1)) {
                (Some(a), Some(b)) => matmul_dims(&a, &b),
                _ => None,
            },
        )),
        "Gemm" => {
            let out = match (dims(0), dims(1)) {
                (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => {
                    let m = if node.attr_int("transA") == Some(1) {
                        &a[1]
                    } else {
                        &a[0]
                    };
                    let n = if node.attr_int("transB") == Some(1) {
                        &b[0]
                    } else {
                        &b[1]
                    };
                    Some(vec![m.clone(), n.clone()])
                }
                _ => None,
            };
            one(same(elem(0), out))
        }
        "Conv" => one(same(elem(0), conv_dims(node, dims(0), dims(1)))),
        "Einsum" => one(same(elem(0), einsum_dims(node, inputs))),
        "Transpose" => {
            let out = dims(0).map(|d| {
                let perm: Vec<i64> = node
                    .attr_ints("perm")
                    .map(|p| p.to_vec())
                    .unwrap_or_else(|| (0..d.len() as i64).rev().collect());
                perm.iter()
                    .map(|&p| d.get(p as usize).cloned().unwrap_or(Dim::Unknown))
                    .collect()
            });
            one(same(elem(0), out))
        }
        "Reshape" => one(ValueShape {
            elem: elem(0),
            dims: reshape_dims(node, dims(0), content(1)),
            content: content(0),
        }),
        "Flatten" => {
            let out = dims(0).map(|d| {
                let a = axis(node.attr_int("axis").unwrap_or(1), d.len() + 1).unwrap_or(1);
                let prod = |s: &[Dim]| match factor(s) {
                    Some((n, names)) if names.is_empty() => Dim::Fixed(n),
                    Some((1, names)) if names.len() == 1 => Dim::Named(names[0].clone()),
                    _ => Dim::Unknown,
                };
                vec![prod(&d[..a]), prod(&d[a..])]
            });
            one(same(elem(0), out))
        }
        "Shape" => {
            let Some(d) = dims(0) else {
                return one(same(Some(DataType::Int64 as i32), None));
            };
            let rank = d.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
            let start = clamp(node.attr_int("start").unwrap_or(0));
            let end = clamp(node.attr_int("end").unwrap_or(rank));
            let part: Vec<Dim> = if start < end {
                d[start..end].to_vec()
            } else {
                Vec::new()
            };
            one(ValueShape {
                elem: Some(DataType::Int64 as i32),
                dims: Some(vec![Dim::Fixed(part.len() as i64)]),
                content: Some(part),
            })
        }
        "Size" => one(ValueShape {
            elem: Some(DataType::Int64 as i32),
            dims: Some(Vec::new()),
            content: dims(0).and_then(|d| match factor(&d) {
                Some((n, names)) if names.is_empty() => Some(vec![Dim::Fixed(n)]),
                _ => None,
            }),
        }),
        "Constant" => one(constant_shape(node, &model.external)),
        "ConstantOfShape" => {
            let elem = match node.attr("value") {
                Some(AttrValue::Tensor(t)) => t.data_type,
                _ => Some(DataType::Float as i32),
            };
            one(same(elem, content(0)))
        }
        "Expand" => {
            let out = match (dims(0), content(1)) {
                (Some(a), Some(b)) => Some(broadcast(&[&a, &b])),
                _ => None,
            };
            one(same(elem(0), out))
        }
        "Tile" => {
            let out = match (dims(0), ints(input(1))) {
                (Some(d), Some(repeats)) if repeats.len() == d.len() => Some(
                    d.iter()
                        .zip(&repeats)
                        .map(|(dim, &r)| match (dim, r) {
                            (_, 1) => dim.clone(),
                            (Dim::Fixed(n), r) if r >= 0 => Dim::Fixed(n.saturating_mul(r)),
                            _ => Dim::Unknown,
                        })
                        .collect(),
                ),
                _ => None,
            };
            one(same(elem(0), out))
        }
        "Gather" => one(gather_shape(node, input(0), input(1))),
        "Slice" => one(slice_shape(node, inputs)),
        "Concat" => one(concat_shape(node, inputs)),
        "Unsqueeze" => {
            let axes = ints_input_or_attr(node, inputs, 1, "axes").flatten();
            let out = match (dims(0), axes) {
                (Some(d), Some(axes)) => {
                    let rank = d.len() + axes.len();
                    let mut axes: Vec<usize> = axes.iter().filter_map(|&a| axis(a, rank)).collect();
                    axes.sort();
                    let mut rest = d.into_iter();
                    Some(
                        (0..rank)
                            .map(|i| {
                                if axes.contains(&i) {
                                    Dim::Fixed(1)
                                } else {
                                    rest.next().unwrap_or(Dim::Unknown)
                                }
                            })
                            .collect(),
                    )
                }
                _ => None,
            };
            one(ValueShape {
                elem: elem(0),
                dims: out,
                content: content(0),
            })
        }
        "Squeeze" => {
            let axes = ints_input_or_attr(node, inputs, 1, "axes");
            let out = match (dims(0), axes) {
                (Some(d), Some(Some(axes))) => {
                    let axes: Vec<usize> = axes.iter().filter_map(|&a| axis(a, d.len())).collect();
                    Some(
                        d.into_iter()
                            .enumerate()
                            .filter(|(i, _)| !axes.contains(i))
                            .map(|(_, x)| x)
                            .collect(),
                    )
                }
                (Some(d), Some(None)) if d.iter().all(|x| matches!(x, Dim::Fixed(_))) => {
                    Some(d.into_iter().filter(|x| *x != Dim::Fixed(1)).collect())
                }
                _ => None,
            };
            one(ValueShape {
                elem: elem(0),
                dims: out,
                content: content(0),
            })
        }
        "Split" => split_shapes(node, inputs),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL2"
        | "ReduceSumSquare" => {
            let axes = ints_input_or_attr(node, inputs, 1, "axes");
            let keep = node.attr_int("keepdims").unwrap_or(1) == 1;
            let out = match (dims(0), axes) {
                (Some(d), Some(axes)) => {
                    let axes: Vec<usize> = match axes {
                        Some(a) if !a.is_empty() => {
                            a.iter().filter_map(|&x| axis(x, d.len())).collect()
                        }
                        _ if node.attr_int("noop_with_empty_axes") == Some(1) => Vec::new(),
                        _ => (0..d.len()).collect(),
                    };
                    Some(
                        d.into_iter()
                            .enumerate()
                            .filter_map(|(i, x)| match (axes.contains(&i), keep) {
                                (false, _) => Some(x),
                                (true, true) => Some(Dim::Fixed(1)),
                                (true, false) => None,
                            })
                            .collect(),
                    )
                }
                _ => None,
            };
            one(same(elem(0), out))
        }
        "TopK" => {
            let out = match (dims(0), content(1).as_deref()) {
                (Some(mut d), Some([k])) => {
                    let rank = d.len();
                    axis(node.attr_int("axis").unwrap_or(-1), rank).map(|a| {
                        d[a] = k.clone();
                        d
                    })
                }
                _ => None,
            };
            vec![
                same(elem(0), out.clone()),
                same(Some(DataType::Int64 as i32), out),
            ]
        }
        "ArgMax" | "ArgMin" => {
            let keep = node.attr_int("keepdims").unwrap_or(1) == 1;
            let out = dims(0).and_then(|d| {
                let a = axis(node.attr_int("axis").unwrap_or(0), d.len())?;
                Some(
                    d.into_iter()
                        .enumerate()
                        .filter_map(|(i, x)| match (i == a, keep) {
                            (false, _) => Some(x),
                            (true, true) => Some(Dim::Fixed(1)),
                            (true, false) => None,
                        })
                        .collect(),
                )
            });
            one(same(Some(DataType::Int64 as i32), out))
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let out = dims(0).map(|d| {
                d.iter()
                    .enumerate()
                    .map(|(i, x)| if i < 2 { x.clone() } else { Dim::Fixed(1) })
                    .collect()
            });
            one(same(elem(0), out))
        }
        _ => Vec::new(),
    }
}

fn matmul_dims(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    match (a.len(), b.len()) {
        (0, _) | (_, 0) => None,
        (1, 1) => Some(Vec::new()),
        (1, rb) => {
            let mut out = b[..rb - 2].to_vec();
            out.push(b[rb - 1].clone());
            Some(out)
        }
        (ra, 1) => Some(a[..ra - 1].to_vec()),
        (ra, rb) => {
            let mut out = broadcast(&[&a[..ra - 2], &b[..rb - 2]]);
            out.push(a[ra - 2].clone());
            out.push(b[rb - 1].clone());
            Some(out)
        }
    }
}

fn conv_dims(node: &Node, x: Option<Vec<Dim>>, w: Option<Vec<Dim>>) -> Option<Vec<Dim>> {
    let (x, w) = (x?, w?);
    if x.len() < 3 || w.len() != x.len() {
        return None;
    }
    let spatial = x.len() - 2;
    let strides = node
        .attr_ints("strides")
        .map(|s| s.to_vec())
        .unwrap_or(vec![1; spatial]);
    let dilations = node
        .attr_ints("dilations")
        .map(|s| s.to_vec())
        .unwrap_or(vec![1; spatial]);
    let pads = node
        .attr_ints("pads")
        .map(|s| s.to_vec())
        .unwrap_or(vec![0; 2 * spatial]);
    let auto_pad = match node.attr("auto_pad") {
        Some(AttrValue::String(s)) => String::from_utf8_lossy(s).into_owned(),
        _ => "NOTSET".into(),
    };
    let mut out = vec![x[0].clone(), w[0].clone()];
    for i in 0..spatial {
        let (Some(size), Some(kernel)) = (fixed(&x[2 + i]), fixed(&w[2 + i])) else {
            out.push(Dim::Unknown);
            continue;
        };
        // In i128, and only for strides and dilations ONNX allows: attributes are the file's
        // word, and a zero stride or a huge pad must not divide by zero or overflow here.
        let stride = i128::from(*strides.get(i)?);
        let dilation = i128::from(*dilations.get(i)?);
        let (size, kernel) = (i128::from(size), i128::from(kernel));
        if stride <= 0 || dilation <= 0 {
            out.push(Dim::Unknown);
            continue;
        }
        let d = match auto_pad.as_str() {
            "SAME_UPPER" | "SAME_LOWER" => (size + stride - 1) / stride,
            "VALID" => (size - dilation * (kernel - 1) - 1) / stride + 1,
            _ => {
                let pad = i128::from(*pads.get(i)?) + i128::from(*pads.get(i + spatial)?);
                (size + pad - dilation * (kernel - 1) - 1) / stride + 1
            }
        };
        out.push(
            i64::try_from(d)
                .ok()
                .filter(|d| *d >= 0)
                .map_or(Dim::Unknown, Dim::Fixed),
        );
    }
    Some(out)
}

fn einsum_dims(node: &Node, inputs: &[Option<&ValueShape>]) -> Option<Vec<Dim>> {
    let AttrValue::String(equation) = node.attr("equation")? else {
        return None;
    };
    let equation: String = String::from_utf8_lossy(equation)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let (lhs, rhs) = equation.split_once("->")?;
    if equation.contains("...") {
        return None;
    }
    let mut letters: HashMap<char, Dim> = HashMap::new();
    for (term, shape) in lhs.split(',').zip(inputs) {
        let dims = shape.and_then(|s| s.dims.as_ref())?;
        if dims.len() != term.chars().count() {
            return None;
        }
        for (c, d) in term.chars().zip(dims) {
            let entry = letters.entry(c).or_insert_with(|| d.clone());
            *entry = broadcast_dim(entry, d);
        }
    }
    rhs.chars().map(|c| letters.get(&c).cloned()).collect()
}

fn reshape_dims(
    node: &Node,
    input: Option<Vec<Dim>>,
    target: Option<Vec<Dim>>,
) -> Option<Vec<Dim>> {
    let target = target?;
    let allow_zero = node.attr_int("allowzero") == Some(1);
    let mut out: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, t)| match t {
            Dim::Fixed(0) if !allow_zero => input
                .as_ref()
                .and_then(|d| d.get(i).cloned())
                .unwrap_or(Dim::Unknown),
            other => other.clone(),
        })
        .collect();
    if let Some(hole) = out.iter().position(|d| *d == Dim::Fixed(-1)) {
        let known: Vec<Dim> = out
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != hole)
            .map(|(_, d)| d.clone())
            .collect();
        out[hole] = match &input {
            Some(input) => divide_dims(input, &known),
            None => Dim::Unknown,
        };
    }
    Some(out)
}

fn constant_shape(node: &Node, store: &ExternalStore) -> ValueShape {
    let int64 = Some(DataType::Int64 as i32);
    let float = Some(DataType::Float as i32);
    match node.attributes.first().map(|a| &a.value) {
        Some(AttrValue::Tensor(t)) => tensor_shape(t, store),
        Some(AttrValue::Int(v)) => ValueShape {
            elem: int64,
            dims: Some(Vec::new()),
            content: Some(vec![Dim::Fixed(*v)]),
        },
        Some(AttrValue::Ints(v)) => ValueShape {
            elem: int64,
            dims: Some(vec![Dim::Fixed(v.len() as i64)]),
            content: Some(v.iter().map(|&x| Dim::Fixed(x)).collect()),
        },
        Some(AttrValue::Float(_)) => same(float, Some(Vec::new())),
        Some(AttrValue::Floats(v)) => same(float, Some(vec![Dim::Fixed(v.len() as i64)])),
        _ => ValueShape::default(),
    }
}

fn gather_shape(
    node: &Node,
    data: Option<&ValueShape>,
    indices: Option<&ValueShape>,
) -> ValueShape {
    let (Some(data), Some(indices)) = (data, indices) else {
        return ValueShape::default();
    };
    let elem = data.elem;
    let (Some(d), Some(i)) = (&data.dims, &indices.dims) else {
        return same(elem, None);
    };
    let Some(a) = axis(node.attr_int("axis").unwrap_or(0), d.len()) else {
        return same(elem, None);
    };
    let mut dims = d[..a].to_vec();
    dims.extend(i.iter().cloned());
    dims.extend(d[a + 1..].iter().cloned());
    // Picking entries of a shape vector: the usual `Shape → Gather` of exports.
    let content = match (&data.content, ints(Some(indices))) {
        (Some(values), Some(picks)) if d.len() == 1 => picks
            .iter()
            .map(|&p| {
                let p = if p < 0 { p + values.len() as i64 } else { p };
                values.get(p as usize).cloned()
            })
            .collect(),
        _ => None,
    };
    ValueShape {
        elem,
        dims: Some(dims),
        content,
    }
}

/// Start, end (exclusive) and step of a slice of a dim of length `len`, clamped as ONNX does.
fn slice_range(start: i64, end: i64, step: i64, len: i64) -> (i64, i64) {
    let norm = |v: i64| if v < 0 { v + len } else { v };
    if step > 0 {
        (norm(start).clamp(0, len), norm(end).clamp(0, len))
    } else {
        (norm(start).clamp(-1, len - 1), norm(end).clamp(-1, len - 1))
    }
}

fn slice_count(start: i64, end: i64, step: i64) -> i64 {
    // In i128: a step of i64::MIN or MAX must not overflow; ONNX forbids step 0 (no elements).
    let (start, end, step) = (i128::from(start), i128::from(end), i128::from(step));
    let count = match step {
        0 => 0,
        step if step > 0 => (end - start + step - 1) / step,
        step => (start - end - step - 1) / -step,
    };
    count.clamp(0, i128::from(i64::MAX)) as i64
}

fn slice_shape(node: &Node, inputs: &[Option<&ValueShape>]) -> ValueShape {
    let Some(data) = inputs.first().copied().flatten() else {
        return ValueShape::default();
    };
    let elem = data.elem;
    let Some(d) = data.dims.clone() else {
        return same(elem, None);
    };
    // Opset 10+: starts, ends, axes, steps are inputs; before, attributes.
    let get = |index: usize, name: &str| ints_input_or_attr(node, inputs, index, name);
    let (Some(Some(starts)), Some(Some(ends))) = (get(1, "starts"), get(2, "ends")) else {
        let dims = symbolic_slice(inputs, &d).unwrap_or_else(|| vec![Dim::Unknown; d.len()]);
        return same(elem, Some(dims));
    };
    let axes = match get(3, "axes") {
        Some(Some(a)) => a,
        Some(None) => (0..starts.len() as i64).collect(),
        None => return same(elem, Some(vec![Dim::Unknown; d.len()])),
    };
    let steps = match get(4, "steps") {
        Some(Some(s)) => s,
        Some(None) => vec![1; starts.len()],
        None => return same(elem, Some(vec![Dim::Unknown; d.len()])),
    };
    let mut dims = d.clone();
    let mut content = data.content.clone().filter(|_| d.len() == 1);
    for (k, &a) in axes.iter().enumerate() {
        let Some(a) = axis(a, d.len()) else {
            return same(elem, None);
        };
        let (start, end, step) = (starts[k], ends[k], steps.get(k).copied().unwrap_or(1));
        match &d[a] {
            Dim::Fixed(len) => {
                let (s, e) = slice_range(start, end, step, *len);
                dims[a] = Dim::Fixed(slice_count(s, e, step));
                if let Some(values) = content.as_mut() {
                    let mut picked = Vec::new();
                    let mut i = s;
                    while (step > 0 && i < e) || (step < 0 && i > e) {
                        picked.push(values[i as usize].clone());
                        i += step;
                    }
                    *values = picked;
                }
            }
            other => {
                dims[a] = match step {
                    1 => symbolic_part(other, &Dim::Fixed(start), &Dim::Fixed(end)),
                    _ => None,
                }
                .unwrap_or(Dim::Unknown);
                content = None;
            }
        }
    }
    ValueShape {
        elem,
        dims: Some(dims),
        content,
    }
}

/// A one-axis, unit-step Slice of a symbolic dim `n+c` (or `n`) at bounds read from shapes
/// (MMDiT splitting its joint axis where the image tokens end): each bound is a constant within
/// the c rows from the front (`0..=c`) or the back (`-c..0`), `n` itself, or the end, so that
/// `[0, n)` and `[0, -c)` keep `n`, `[n, end)` and `[-c, end)` leave `c`, `[c, end)` keeps `n`;
/// every other axis is kept. `None` for anything else.
fn symbolic_slice(inputs: &[Option<&ValueShape>], d: &[Dim]) -> Option<Vec<Dim>> {
    let bound = |i: usize| -> Option<Dim> {
        match inputs.get(i).copied().flatten()?.content.as_deref()? {
            [one] => Some(one.clone()),
            _ => None,
        }
    };
    let (start, end) = (bound(1)?, bound(2)?);
    let a = match inputs.get(3).copied().flatten() {
        Some(axes) => match ints(Some(axes))?.as_slice() {
            [a] => axis(*a, d.len())?,
            _ => return None,
        },
        None => 0,
    };
    if let Some(steps) = inputs.get(4).copied().flatten()
        && ints(Some(steps))? != [1]
    {
        return None;
    }
    let mut dims = d.to_vec();
    dims[a] = symbolic_part(&d[a], &start, &end)?;
    Some(dims)
}

/// What a unit-step slice `[start, end)` leaves of a symbolic dim `n+c` (or `n`).
fn symbolic_part(dim: &Dim, start: &Dim, end: &Dim) -> Option<Dim> {
    let (Some(name), offset) = sum_parts(dim)? else {
        return None;
    };
    // Each bound as a position symbol·s + c on the axis of length symbol + offset: a constant
    // within the offset's rows from the front or from the back, the symbol itself, or the end.
    let position = |b: &Dim| -> Option<(i64, i64)> {
        match b {
            Dim::Fixed(v) if *v >= i32::MAX as i64 => Some((1, offset)),
            Dim::Fixed(v) if (0..=offset).contains(v) => Some((0, *v)),
            Dim::Fixed(v) if (-offset..0).contains(v) => Some((1, offset + v)),
            b if b == dim => Some((1, offset)),
            Dim::Named(s) if s == name => Some((1, 0)),
            _ => None,
        }
    };
    let ((s_symbol, s_constant), (e_symbol, e_constant)) = (position(start)?, position(end)?);
    match (e_symbol - s_symbol, e_constant - s_constant) {
        (0, c) if c >= 0 => Some(Dim::Fixed(c)),
        (1, 0) => Some(Dim::Named(name.to_string())),
        (1, c) if c > 0 => Some(Dim::Named(format!("{name}+{c}"))),
        _ => None,
    }
}

/// A symbolic dim plus fixed ones, `n+c` (MMDiT's joint axis: text tokens + image tokens);
/// unknown for anything else.
fn symbolic_sum<'d>(dims: impl Iterator<Item = &'d Dim>) -> Dim {
    let mut name = None;
    let mut constant = 0i64;
    for dim in dims {
        match dim {
            Dim::Fixed(n) => constant += n,
            Dim::Named(s) if name.is_none() => name = Some(s.clone()),
            _ => return Dim::Unknown,
        }
    }
    match name {
        Some(s) if constant == 0 => Dim::Named(s),
        Some(s) => Dim::Named(format!("{s}+{constant}")),
        None => Dim::Fixed(constant),
    }
}

fn concat_shape(node: &Node, inputs: &[Option<&ValueShape>]) -> ValueShape {
    let parts: Option<Vec<&ValueShape>> = inputs.iter().copied().collect();
    let Some(parts) = parts else {
        return ValueShape::default();
    };
    let elem = parts.iter().find_map(|p| p.elem);
    let all_dims: Option<Vec<&Vec<Dim>>> = parts.iter().map(|p| p.dims.as_ref()).collect();
    let Some(all_dims) = all_dims.filter(|d| !d.is_empty()) else {
        return same(elem, None);
    };
    let rank = all_dims[0].len();
    if all_dims.iter().any(|d| d.len() != rank) {
        return same(elem, None);
    }
    let Some(a) = axis(node.attr_int("axis").unwrap_or(0), rank) else {
        return same(elem, None);
    };
    let dims: Vec<Dim> = (0..rank)
        .map(|i| {
            if i == a {
                let sizes: Option<Vec<i64>> = all_dims.iter().map(|d| fixed(&d[i])).collect();
                match sizes {
                    Some(s) => s
                        .iter()
                        .try_fold(0i64, |total, d| total.checked_add(*d))
                        .map_or(Dim::Unknown, Dim::Fixed),
                    None => symbolic_sum(all_dims.iter().map(|d| &d[i])),
                }
            } else {
                all_dims
                    .iter()
                    .map(|d| d[i].clone())
                    .fold(Dim::Unknown, |acc, x| match (&acc, &x) {
                        (Dim::Unknown, _) => x,
                        (Dim::Named(_), Dim::Fixed(_)) => x,
                        _ => acc,
                    })
            }
        })
        .collect();
    let content = if rank == 1 {
        parts
            .iter()
            .map(|p| p.content.clone())
            .collect::<Option<Vec<_>>>()
            .map(|c| c.concat())
    } else {
        None
    };
    ValueShape {
        elem,
        dims: Some(dims),
        content,
    }
}

fn split_shapes(node: &Node, inputs: &[Option<&ValueShape>]) -> Vec<ValueShape> {
    let Some(data) = inputs.first().copied().flatten() else {
        return Vec::new();
    };
    let elem = data.elem;
    let count = node.outputs.len();
    let unknown = vec![same(elem, None); count];
    let Some(d) = &data.dims else {
        return unknown;
    };
    let Some(a) = axis(node.attr_int("axis").unwrap_or(0), d.len()) else {
        return unknown;
    };
    let sizes: Vec<Dim> = match ints_input_or_attr(node, inputs, 1, "split") {
        Some(Some(sizes)) => sizes.into_iter().map(Dim::Fixed).collect(),
        Some(None) => match fixed(&d[a]) {
            Some(len) if count > 0 => {
                // Equal parts; with opset 18's num_outputs the last part may be smaller.
                let part = ((i128::from(len) + count as i128 - 1) / count as i128) as i64;
                (0..count as i64)
                    .map(|i| {
                        let rest = i
                            .checked_mul(part)
                            .map_or(0, |used| len.saturating_sub(used));
                        Dim::Fixed(part.min(rest).max(0))
                    })
                    .collect()
            }
            _ => vec![Dim::Unknown; count],
        },
        None => vec![Dim::Unknown; count],
    };
    sizes
        .into_iter()
        .map(|size| {
            let mut dims = d.clone();
            dims[a] = size;
            same(elem, Some(dims))
        })
        .collect()
}

/// The value a dim takes when symbols are bound: `batch` (or whatever the latent's batch dim is
/// called) to the given number; any other symbol is unknown.
pub fn eval_dim(d: &Dim, bindings: &HashMap<String, i64>) -> Option<i64> {
    match d {
        Dim::Fixed(n) => Some(*n),
        Dim::Named(s) => bindings.get(s).copied(),
        Dim::Unknown => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(s: &str) -> Dim {
        Dim::Named(s.into())
    }

    /// MMDiT's joint axis as exports compute it: S = n + T, T + (S − T), and where it splits.
    #[test]
    fn sums_of_one_symbol_and_constants() {
        let joint = symbolic_sum([named("n"), Dim::Fixed(6)].iter());
        assert_eq!(joint, named("n+6"));
        assert_eq!(symbolic_arith("Sub", &joint, &Dim::Fixed(6)), named("n"));
        assert_eq!(symbolic_arith("Add", &Dim::Fixed(6), &named("n")), joint);
        assert_eq!(symbolic_arith("Sub", &joint, &named("n")), Dim::Fixed(6));
        // Two symbols, or a negative remainder, are not representable: unknown.
        assert_eq!(
            symbolic_arith("Add", &named("n"), &named("m")),
            Dim::Unknown
        );
        assert_eq!(
            symbolic_arith("Sub", &named("n"), &Dim::Fixed(2)),
            Dim::Unknown
        );
        assert_eq!(symbolic_sum([named("n"), named("m")].iter()), Dim::Unknown);
    }

    #[test]
    fn the_joint_axis_splits_into_its_parts() {
        let bound = |d: Dim| ValueShape {
            elem: Some(DataType::Int64 as i32),
            dims: Some(vec![Dim::Fixed(1)]),
            content: Some(vec![d]),
        };
        let input = [Dim::Fixed(2), named("n+6"), Dim::Fixed(16)];
        let axes = bound(Dim::Fixed(1));
        let slice = |start: Dim, end: Dim| {
            let (s, e) = (bound(start), bound(end));
            symbolic_slice(&[None, Some(&s), Some(&e), Some(&axes)], &input)
                .map(|dims| dims[1].clone())
        };
        // Image first (SD3): [0, n) and [n, end).
        assert_eq!(slice(Dim::Fixed(0), named("n")), Some(named("n")));
        assert_eq!(slice(named("n"), Dim::Fixed(i64::MAX)), Some(Dim::Fixed(6)));
        // Text first (Flux): [6, n + 6) is the image.
        assert_eq!(slice(Dim::Fixed(6), named("n+6")), Some(named("n")));
        assert_eq!(slice(Dim::Fixed(3), named("n")), None);
        // Bounds counted from the back (how token selection rewrites an export's constant
        // split): [0, -6) is the image, [-6, end) the text, [-3, end) part of the text.
        assert_eq!(slice(Dim::Fixed(0), Dim::Fixed(-6)), Some(named("n")));
        assert_eq!(
            slice(Dim::Fixed(-6), Dim::Fixed(i64::MAX)),
            Some(Dim::Fixed(6))
        );
        assert_eq!(
            slice(Dim::Fixed(-3), Dim::Fixed(i64::MAX)),
            Some(Dim::Fixed(3))
        );
        assert_eq!(
            slice(Dim::Fixed(0), Dim::Fixed(i64::MAX)),
            Some(named("n+6"))
        );
        // A constant past the other stream's rows depends on n: unknown.
        assert_eq!(slice(Dim::Fixed(0), Dim::Fixed(16)), None);
        assert_eq!(slice(Dim::Fixed(-7), Dim::Fixed(i64::MAX)), None);
    }
}
