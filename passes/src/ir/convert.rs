//! ModelProto ⇄ IR. Fields the IR does not model are carried in each object's `info` proto, and
//! optional fields keep their presence, so an unchanged model converts back to the same bytes.

use super::*;
use crate::onnx::attribute_proto::AttributeType;

/// Keeps "absent" and "present but empty" apart: an empty string stays absent if it was absent.
fn keep_presence(original: &Option<String>, value: &str) -> Option<String> {
    if value.is_empty() && original.is_none() {
        None
    } else {
        Some(value.to_string())
    }
}

impl Model {
    pub fn from_proto(mut proto: ModelProto, external: ExternalStore) -> Result<Model> {
        let graph_proto = proto
            .graph
            .take()
            .ok_or_else(|| Error::Invalid("the model has no graph".into()))?;
        let graph = Graph::from_proto(graph_proto)?;
        Ok(Model {
            graph,
            opsets: std::mem::take(&mut proto.opset_import),
            metadata: std::mem::take(&mut proto.metadata_props),
            functions: std::mem::take(&mut proto.functions),
            external,
            info: proto,
        })
    }

    pub fn to_proto(&self) -> Result<ModelProto> {
        let mut proto = self.info.clone();
        proto.graph = Some(self.graph.to_proto()?);
        proto.opset_import = self.opsets.clone();
        proto.metadata_props = self.metadata.clone();
        proto.functions = self.functions.clone();
        Ok(proto)
    }
}

impl Graph {
    pub fn from_proto(mut proto: GraphProto) -> Result<Graph> {
        let mut graph = Graph {
            name: proto.name.clone().unwrap_or_default(),
            inputs: std::mem::take(&mut proto.input)
                .into_iter()
                .map(ValueInfo::from_proto)
                .collect(),
            outputs: std::mem::take(&mut proto.output)
                .into_iter()
                .map(ValueInfo::from_proto)
                .collect(),
            initializers: std::mem::take(&mut proto.initializer),
            value_info: std::mem::take(&mut proto.value_info)
                .into_iter()
                .map(ValueInfo::from_proto)
                .collect(),
            ..Graph::default()
        };
        for (index, node) in std::mem::take(&mut proto.node).into_iter().enumerate() {
            let node = Node::from_proto(node).map_err(|e| match e {
                Error::Invalid(message) => {
                    Error::Invalid(format!("graph '{}', node #{index}: {message}", graph.name))
                }
                other => other,
            })?;
            graph.dag.add_node(node);
        }
        graph.info = proto;
        graph.relink_all();
        Ok(graph)
    }

    pub fn to_proto(&self) -> Result<GraphProto> {
        let mut proto = self.info.clone();
        proto.name = keep_presence(&self.info.name, &self.name);
        proto.node = self
            .topo_order()?
            .into_iter()
            .map(|id| self.dag[id].to_proto())
            .collect::<Result<_>>()?;
        proto.initializer = self.initializers.clone();
        proto.input = self.inputs.iter().map(ValueInfo::to_proto).collect();
        proto.output = self.outputs.iter().map(ValueInfo::to_proto).collect();
        proto.value_info = self.value_info.iter().map(ValueInfo::to_proto).collect();
        Ok(proto)
    }
}

impl Node {
    fn from_proto(mut proto: NodeProto) -> Result<Node> {
        let label = proto
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| proto.op_type.clone().unwrap_or_default());
        let attributes = std::mem::take(&mut proto.attribute)
            .into_iter()
            .map(|a| {
                Attribute::from_proto(a).map_err(|e| match e {
                    Error::Invalid(m) => Error::Invalid(format!("node '{label}': {m}")),
                    other => other,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Node {
            name: proto.name.clone().unwrap_or_default(),
            op_type: proto.op_type.clone().unwrap_or_default(),
            domain: proto.domain.clone().unwrap_or_default(),
            inputs: std::mem::take(&mut proto.input),
            outputs: std::mem::take(&mut proto.output),
            attributes,
            metadata: std::mem::take(&mut proto.metadata_props),
            info: proto,
        })
    }

    fn to_proto(&self) -> Result<NodeProto> {
        let mut proto = self.info.clone();
        proto.name = keep_presence(&self.info.name, &self.name);
        proto.op_type = Some(self.op_type.clone());
        proto.domain = keep_presence(&self.info.domain, &self.domain);
        proto.input = self.inputs.clone();
        proto.output = self.outputs.clone();
        proto.attribute = self
            .attributes
            .iter()
            .map(Attribute::to_proto)
            .collect::<Result<_>>()?;
        proto.metadata_props = self.metadata.clone();
        Ok(proto)
    }
}

impl Attribute {
    fn from_proto(mut proto: AttributeProto) -> Result<Attribute> {
        let name = proto.name.clone().unwrap_or_default();
        if proto.ref_attr_name.is_some() {
            return Err(Error::Invalid(format!(
                "attribute '{name}' refers to a function attribute outside a function"
            )));
        }
        let kind = match proto.r#type {
            Some(code) => AttributeType::try_from(code).map_err(|_| {
                Error::Invalid(format!(
                    "attribute '{name}' has unknown attribute type {code}"
                ))
            })?,
            None => infer_attribute_type(&proto).ok_or_else(|| {
                Error::Invalid(format!("attribute '{name}' has no type and no value"))
            })?,
        };
        let missing = || {
            Error::Invalid(format!(
                "attribute '{name}' of type {} has no value",
                kind.as_str_name()
            ))
        };
        let value = match kind {
            AttributeType::Float => AttrValue::Float(proto.f.take().ok_or_else(missing)?),
            AttributeType::Int => AttrValue::Int(proto.i.take().ok_or_else(missing)?),
            AttributeType::String => AttrValue::String(proto.s.take().ok_or_else(missing)?),
            AttributeType::Tensor => AttrValue::Tensor(proto.t.take().ok_or_else(missing)?),
            AttributeType::Graph => AttrValue::Graph(Box::new(Graph::from_proto(
                proto.g.take().ok_or_else(missing)?,
            )?)),
            AttributeType::SparseTensor => {
                AttrValue::SparseTensor(proto.sparse_tensor.take().ok_or_else(missing)?)
            }
            AttributeType::TypeProto => AttrValue::Type(proto.tp.take().ok_or_else(missing)?),
            AttributeType::Floats => AttrValue::Floats(std::mem::take(&mut proto.floats)),
            AttributeType::Ints => AttrValue::Ints(std::mem::take(&mut proto.ints)),
            AttributeType::Strings => AttrValue::Strings(std::mem::take(&mut proto.strings)),
            AttributeType::Tensors => AttrValue::Tensors(std::mem::take(&mut proto.tensors)),
            AttributeType::Graphs => AttrValue::Graphs(
                std::mem::take(&mut proto.graphs)
                    .into_iter()
                    .map(Graph::from_proto)
                    .collect::<Result<_>>()?,
            ),
            AttributeType::SparseTensors => {
                AttrValue::SparseTensors(std::mem::take(&mut proto.sparse_tensors))
            }
            AttributeType::TypeProtos => AttrValue::Types(std::mem::take(&mut proto.type_protos)),
            AttributeType::Undefined => {
                return Err(Error::Invalid(format!(
                    "attribute '{name}' has type UNDEFINED"
                )));
            }
        };
        Ok(Attribute {
            name,
            value,
            info: proto,
        })
    }

    fn to_proto(&self) -> Result<AttributeProto> {
        let mut proto = self.info.clone();
        proto.name = Some(self.name.clone());
        if proto.r#type.is_some() {
            proto.r#type = Some(self.value.type_code() as i32);
        }
        match &self.value {
            AttrValue::Float(v) => proto.f = Some(*v),
            AttrValue::Int(v) => proto.i = Some(*v),
            AttrValue::String(v) => proto.s = Some(v.clone()),
            AttrValue::Tensor(v) => proto.t = Some(v.clone()),
            AttrValue::Graph(g) => proto.g = Some(g.to_proto()?),
            AttrValue::SparseTensor(v) => proto.sparse_tensor = Some(v.clone()),
            AttrValue::Type(v) => proto.tp = Some(v.clone()),
            AttrValue::Floats(v) => proto.floats = v.clone(),
            AttrValue::Ints(v) => proto.ints = v.clone(),
            AttrValue::Strings(v) => proto.strings = v.clone(),
            AttrValue::Tensors(v) => proto.tensors = v.clone(),
            AttrValue::Graphs(gs) => {
                proto.graphs = gs.iter().map(Graph::to_proto).collect::<Result<_>>()?
            }
            AttrValue::SparseTensors(v) => proto.sparse_tensors = v.clone(),
            AttrValue::Types(v) => proto.type_protos = v.clone(),
        }
        Ok(proto)
    }
}

/// Very old exporters left `type` unset; the field that holds a value says what it is.
fn infer_attribute_type(proto: &AttributeProto) -> Option<AttributeType> {
    Some(if proto.f.is_some() {
        AttributeType::Float
    } else if proto.i.is_some() {
        AttributeType::Int
    } else if proto.s.is_some() {
        AttributeType::String
    } else if proto.t.is_some() {
        AttributeType::Tensor
    } else if proto.g.is_some() {
        AttributeType::Graph
    } else if !proto.floats.is_empty() {
        AttributeType::Floats
    } else if !proto.ints.is_empty() {
        AttributeType::Ints
    } else if !proto.strings.is_empty() {
        AttributeType::Strings
    } else if !proto.tensors.is_empty() {
        AttributeType::Tensors
    } else if !proto.graphs.is_empty() {
        AttributeType::Graphs
    } else {
        return None;
    })
}

impl ValueInfo {
    fn from_proto(mut proto: ValueInfoProto) -> ValueInfo {
        ValueInfo {
            name: proto.name.clone().unwrap_or_default(),
            ty: proto.r#type.take(),
            info: proto,
        }
    }

    fn to_proto(&self) -> ValueInfoProto {
        let mut proto = self.info.clone();
        proto.name = keep_presence(&self.info.name, &self.name);
        proto.r#type = self.ty.clone();
        proto
    }
}
