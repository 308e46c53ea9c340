//! Synthetic DiT graphs of any size, built without PyTorch, for tests and timing: the original
//! DiT architecture (Peebles & Xie; adaLN-Zero blocks conditioned on timestep + class, one shared
//! conditioning vector, per-block modulation), exported the way the TorchScript exporter would
//! (opset 17, static shapes except a symbolic `batch`).
//!
//! With `weights: false` the float initializers declare their shapes but hold no data: enough for
//! analysis (which reads weight shapes, never weight values) at DiT-XL/2 size without writing
//! gigabytes. Such a model cannot be run. With `weights: true` they hold small deterministic
//! values and the model runs.

use bytes::Bytes;

use crate::ir::{Dim, Model, ValueInfo};
use crate::onnx::tensor_proto::DataType;
use crate::onnx::{
    AttributeProto, ExternalStore, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, ValueInfoProto, attribute_proto::AttributeType,
};

/// The size of a synthetic DiT.
#[derive(Clone, Debug)]
pub struct SyntheticDit {
    pub layers: usize,
    pub hidden: i64,
    pub heads: i64,
    /// Latent channels and side (the latent is [batch, channels, side, side]).
    pub channels: i64,
    pub side: i64,
    pub patch: i64,
    pub mlp_ratio: i64,
    pub classes: i64,
    /// Fill float weights with data (runnable) or only declare their shapes (analysis only).
    pub weights: bool,
}

impl SyntheticDit {
    /// DiT-XL/2 at 256×256 pixels: 28 blocks, hidden 1152, 16 heads, 32×32×4 latent, patch 2
    /// (256 tokens), 1000 classes.
    pub fn xl_2() -> SyntheticDit {
        SyntheticDit {
            layers: 28,
            hidden: 1152,
            heads: 16,
            channels: 4,
            side: 32,
            patch: 2,
            mlp_ratio: 4,
            classes: 1000,
            weights: false,
        }
    }

    /// A tiny runnable one.
    pub fn tiny(layers: usize) -> SyntheticDit {
        SyntheticDit {
            layers,
            hidden: 16,
            heads: 2,
            channels: 4,
            side: 8,
            patch: 2,
            mlp_ratio: 4,
            classes: 10,
            weights: true,
        }
    }

    pub fn tokens(&self) -> i64 {
        (self.side / self.patch) * (self.side / self.patch)
    }

    /// FLOPs of one block per sample by the usual closed form, for checking the cost model:
    /// qkv and output projections 4·N·D², MLP 2·r·N·D², attention products 2·N²·D, the adaLN
    /// modulation D·6D; two FLOPs per multiply-accumulate.
    pub fn block_flops(&self) -> u64 {
        let (n, d, r) = (
            self.tokens() as u64,
            self.hidden as u64,
            self.mlp_ratio as u64,
        );
        2 * (4 * n * d * d + 2 * r * n * d * d + 2 * n * n * d + 6 * d * d)
    }

    pub fn build(&self) -> Model {
        let mut b = ProtoBuilder {
            graph: GraphProto::default(),
            weights: self.weights,
            seed: 1,
        };
        let (d, heads, p, c) = (self.hidden, self.heads, self.patch, self.channels);
        let n = self.tokens();
        let grid = self.side / p;
        let dh = d / heads;
        let mlp = d * self.mlp_ratio;
        let out_c = 2 * c; // learned sigma, as DiT
        let batch = || Dim::Named("batch".into());
        b.input(
            "hidden_states",
            DataType::Float,
            vec![
                batch(),
                Dim::Fixed(c),
                Dim::Fixed(self.side),
                Dim::Fixed(self.side),
            ],
        );
        b.input("timestep", DataType::Int64, vec![batch()]);
        b.input("class_labels", DataType::Int64, vec![batch()]);

        // Patch embedding.
        let w = b.weight("x_embedder.proj.weight", &[d, c, p, p]);
        let bias = b.weight("x_embedder.proj.bias", &[d]);
        let conv = b.node(
            "Conv",
            &["hidden_states", &w, &bias],
            vec![ints("kernel_shape", &[p, p]), ints("strides", &[p, p])],
        );
        let shape = b.ints_const("patch_shape", &[0, d, -1]);
        let flat = b.node("Reshape", &[&conv, &shape], vec![]);
        let tokens = b.node("Transpose", &[&flat], vec![ints("perm", &[0, 2, 1])]);
        let pos = b.weight("pos_embed", &[1, n, d]);
        let x = b.node("Add", &[&tokens, &pos], vec![]);

        // Conditioning: sinusoidal timestep embedding + MLP, plus the class embedding.
        let axes1 = b.ints_const("axes_1", &[1]);
        let t = b.node("Unsqueeze", &["timestep", &axes1], vec![]);
        let t = b.node("Cast", &[&t], vec![int("to", DataType::Float as i64)]);
        let freqs = b.weight("t_embedder.freqs", &[1, 128]);
        let args = b.node("Mul", &[&t, &freqs], vec![]);
        let sin = b.node("Sin", &[&args], vec![]);
        let cos = b.node("Cos", &[&args], vec![]);
        let t_freq = b.node("Concat", &[&cos, &sin], vec![int("axis", 1)]);
        let t_emb = b.linear("t_embedder.mlp.0", &t_freq, 256, d);
        let t_emb = b.silu(&t_emb);
        let t_emb = b.linear("t_embedder.mlp.2", &t_emb, d, d);
        let table = b.weight("y_embedder.embedding_table.weight", &[self.classes + 1, d]);
        let y_emb = b.node("Gather", &[&table, "class_labels"], vec![]);
        let cond = b.node("Add", &[&t_emb, &y_emb], vec![]);
        let cond = b.silu(&cond);

        let ones = b.const_f32("ln_scale", &[d], 1.0);
        let zeros = b.const_f32("ln_bias", &[d], 0.0);
        let one = b.const_f32("one", &[], 1.0);
        let half = b.const_f32("half", &[], 0.5);
        let sqrt2 = b.const_f32("sqrt2", &[], std::f32::consts::SQRT_2);
        let scale = b.const_f32("attn_scale", &[], 1.0 / (dh as f32).sqrt());
        let split6 = b.ints_const("split6", &[d; 6]);
        let split3 = b.ints_const("split3", &[1, 1, 1]);
        let axes0 = b.ints_const("axes_0", &[0]);
        let qkv_shape = b.ints_const("qkv_shape", &[0, n, 3, heads, dh]);
        let merge_shape = b.ints_const("merge_shape", &[0, n, d]);
        let layer_norm = |b: &mut ProtoBuilder, x: &str| {
            b.node(
                "LayerNormalization",
                &[x, &ones, &zeros],
                vec![int("axis", -1), float("epsilon", 1e-6)],
            )
        };
        let modulate = |b: &mut ProtoBuilder, x: &str, shift: &str, scale: &str| {
            let s = b.node("Add", &[scale, &one], vec![]);
            let y = b.node("Mul", &[x, &s], vec![]);
            b.node("Add", &[&y, shift], vec![])
        };

        let mut x = x;
        for l in 0..self.layers {
            let name = |s: &str| format!("blocks.{l}.{s}");
            let m = b.linear(&name("adaLN_modulation.1"), &cond, d, 6 * d);
            let parts = b.node_n("Split", &[&m, &split6], 6, vec![int("axis", 1)]);
            let parts: Vec<String> = parts
                .iter()
                .map(|v| b.node("Unsqueeze", &[v, &axes1], vec![]))
                .collect();
            let (shift_msa, scale_msa, gate_msa) = (&parts[0], &parts[1], &parts[2]);
            let (shift_mlp, scale_mlp, gate_mlp) = (&parts[3], &parts[4], &parts[5]);

            // Attention sub-layer.
            let h = layer_norm(&mut b, &x);
            let h = modulate(&mut b, &h, shift_msa, scale_msa);
            let qkv = b.matmul_bias(&name("attn.qkv"), &h, d, 3 * d);
            let qkv = b.node("Reshape", &[&qkv, &qkv_shape], vec![]);
            let qkv = b.node("Transpose", &[&qkv], vec![ints("perm", &[2, 0, 3, 1, 4])]);
            let qkv = b.node_n("Split", &[&qkv, &split3], 3, vec![int("axis", 0)]);
            let q = b.node("Squeeze", &[&qkv[0], &axes0], vec![]);
            let k = b.node("Squeeze", &[&qkv[1], &axes0], vec![]);
            let v = b.node("Squeeze", &[&qkv[2], &axes0], vec![]);
            let kt = b.node("Transpose", &[&k], vec![ints("perm", &[0, 1, 3, 2])]);
            let scores = b.node("MatMul", &[&q, &kt], vec![]);
            let scores = b.node("Mul", &[&scores, &scale], vec![]);
            let probs = b.node("Softmax", &[&scores], vec![int("axis", -1)]);
            let o = b.node("MatMul", &[&probs, &v], vec![]);
            let o = b.node("Transpose", &[&o], vec![ints("perm", &[0, 2, 1, 3])]);
            let o = b.node("Reshape", &[&o, &merge_shape], vec![]);
            let o = b.matmul_bias(&name("attn.proj"), &o, d, d);
            let o = b.node("Mul", &[gate_msa, &o], vec![]);
            let x1 = b.node("Add", &[&x, &o], vec![]);

            // MLP sub-layer (GELU, exact form).
            let h = layer_norm(&mut b, &x1);
            let h = modulate(&mut b, &h, shift_mlp, scale_mlp);
            let h = b.matmul_bias(&name("mlp.fc1"), &h, d, mlp);
            let e = b.node("Div", &[&h, &sqrt2], vec![]);
            let e = b.node("Erf", &[&e], vec![]);
            let e = b.node("Add", &[&e, &one], vec![]);
            let g = b.node("Mul", &[&h, &e], vec![]);
            let g = b.node("Mul", &[&g, &half], vec![]);
            let h = b.matmul_bias(&name("mlp.fc2"), &g, mlp, d);
            let h = b.node("Mul", &[gate_mlp, &h], vec![]);
            x = b.node("Add", &[&x1, &h], vec![]);
        }

        // Final layer: adaLN, linear, unpatchify.
        let m = b.linear("final_layer.adaLN_modulation.1", &cond, d, 2 * d);
        let split2 = b.ints_const("split2", &[d, d]);
        let parts = b.node_n("Split", &[&m, &split2], 2, vec![int("axis", 1)]);
        let shift = b.node("Unsqueeze", &[&parts[0], &axes1], vec![]);
        let scale_f = b.node("Unsqueeze", &[&parts[1], &axes1], vec![]);
        let h = layer_norm(&mut b, &x);
        let h = modulate(&mut b, &h, &shift, &scale_f);
        let h = b.matmul_bias("final_layer.linear", &h, d, p * p * out_c);
        let patches = b.ints_const("patches_shape", &[0, grid, grid, p, p, out_c]);
        let h = b.node("Reshape", &[&h, &patches], vec![]);
        let h = b.node("Einsum", &[&h], vec![string("equation", "nhwpqc->nchpwq")]);
        let image = b.ints_const("image_shape", &[0, out_c, self.side, self.side]);
        b.graph.node.push(NodeProto {
            input: vec![h, image],
            output: vec!["sample".into()],
            op_type: Some("Reshape".into()),
            ..NodeProto::default()
        });
        b.output(
            "sample",
            DataType::Float,
            vec![
                batch(),
                Dim::Fixed(out_c),
                Dim::Fixed(self.side),
                Dim::Fixed(self.side),
            ],
        );

        let mut graph = b.graph;
        graph.name = Some("synthetic_dit".into());
        let proto = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            producer_name: Some("fastcache synthetic DiT".into()),
            graph: Some(graph),
            ..ModelProto::default()
        };
        Model::from_proto(proto, ExternalStore::default()).expect("a synthetic DiT is well-formed")
    }
}

fn attr(name: &str, kind: AttributeType) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(kind as i32),
        ..AttributeProto::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        i: Some(v),
        ..attr(name, AttributeType::Int)
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        f: Some(v),
        ..attr(name, AttributeType::Float)
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        ints: v.to_vec(),
        ..attr(name, AttributeType::Ints)
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        s: Some(Bytes::from(v.to_string())),
        ..attr(name, AttributeType::String)
    }
}

struct ProtoBuilder {
    graph: GraphProto,
    weights: bool,
    seed: u64,
}

impl ProtoBuilder {
    fn value_info(name: &str, elem: DataType, dims: Vec<Dim>) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: ValueInfo::tensor(name, elem as i32, dims).ty,
            ..ValueInfoProto::default()
        }
    }

    fn input(&mut self, name: &str, elem: DataType, dims: Vec<Dim>) {
        self.graph.input.push(Self::value_info(name, elem, dims));
    }

    fn output(&mut self, name: &str, elem: DataType, dims: Vec<Dim>) {
        self.graph.output.push(Self::value_info(name, elem, dims));
    }

    /// Adds a node with one output, named after its position; returns the output.
    fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        self.node_n(op, inputs, 1, attributes).remove(0)
    }

    fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: usize,
        attributes: Vec<AttributeProto>,
    ) -> Vec<String> {
        let index = self.graph.node.len();
        let outputs: Vec<String> = (0..outputs).map(|i| format!("t{index}_{i}")).collect();
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            op_type: Some(op.into()),
            attribute: attributes,
            ..NodeProto::default()
        });
        outputs
    }

    /// A float weight: small deterministic values, or only its declared shape.
    fn weight(&mut self, name: &str, dims: &[i64]) -> String {
        let count: i64 = dims.iter().product();
        let raw = if self.weights {
            let mut bytes = Vec::with_capacity(count as usize * 4);
            for _ in 0..count {
                // A fixed linear congruential sequence in [-0.05, 0.05).
                self.seed = self
                    .seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((self.seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            Some(Bytes::from(bytes))
        } else {
            None
        };
        self.graph.initializer.push(TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Float as i32),
            raw_data: raw,
            ..TensorProto::default()
        });
        name.to_string()
    }

    fn const_f32(&mut self, name: &str, dims: &[i64], value: f32) -> String {
        let count: i64 = dims.iter().product();
        let bytes: Vec<u8> = (0..count).flat_map(|_| value.to_le_bytes()).collect();
        self.graph.initializer.push(TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(Bytes::from(bytes)),
            ..TensorProto::default()
        });
        name.to_string()
    }

    fn ints_const(&mut self, name: &str, values: &[i64]) -> String {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph.initializer.push(TensorProto {
            name: Some(name.into()),
            dims: vec![values.len() as i64],
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(Bytes::from(bytes)),
            ..TensorProto::default()
        });
        name.to_string()
    }

    /// `Gemm(x, Wᵀ) + b` on [batch, in] (PyTorch's Linear as TorchScript exports it).
    fn linear(&mut self, name: &str, x: &str, inputs: i64, outputs: i64) -> String {
        let w = self.weight(&format!("{name}.weight"), &[outputs, inputs]);
        let b = self.weight(&format!("{name}.bias"), &[outputs]);
        self.node("Gemm", &[x, &w, &b], vec![int("transB", 1)])
    }

    /// `MatMul(x, W) + b` on [batch, tokens, in].
    fn matmul_bias(&mut self, name: &str, x: &str, inputs: i64, outputs: i64) -> String {
        let w = self.weight(&format!("{name}.weight"), &[inputs, outputs]);
        let b = self.weight(&format!("{name}.bias"), &[outputs]);
        let y = self.node("MatMul", &[x, &w], vec![]);
        self.node("Add", &[&y, &b], vec![])
    }

    fn silu(&mut self, x: &str) -> String {
        let s = self.node("Sigmoid", &[x], vec![]);
        self.node("Mul", &[x, &s], vec![])
    }
}
