//! The host side of the `fastcache` contract (design/method.md §4, types in
//! `fastcache_passes::contract`): every state input starts as zeros of its stated shape, every
//! state output is fed back as that input on the next step (by the engine, see
//! [`crate::engine::Engine::bind_state`]), and the `stats` outputs are collected per step.
//! A model without the metadata entry runs plainly.

use anyhow::{Context, bail};
use fastcache_passes::contract::{Contract, METADATA_KEY, ShapeDim};
use fastcache_passes::ir::Dim;

use crate::engine::{DType, Engine, ModelSpec, StateSlot, Tensor, TensorMap};

#[derive(Clone, Debug, Default)]
pub struct StateLoop {
    contract: Option<Contract>,
}

impl StateLoop {
    /// Reads the model's contract, if it has one, and checks that it names real inputs and
    /// outputs.
    pub fn from_spec(spec: &ModelSpec) -> anyhow::Result<StateLoop> {
        let Some(json) = spec.metadata.get(METADATA_KEY) else {
            return Ok(StateLoop::default());
        };
        let contract = Contract::parse(json)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("cannot read the model's host contract")?;
        for pair in &contract.state {
            if spec.input(&pair.input).is_none() {
                bail!(
                    "the '{METADATA_KEY}' contract names state input '{}', which the model does not have",
                    pair.input
                );
            }
            if spec.output(&pair.output).is_none() {
                bail!(
                    "the '{METADATA_KEY}' contract names state output '{}', which the model does not have",
                    pair.output
                );
            }
            if DType::from_name(&pair.dtype).is_none() {
                bail!(
                    "state '{}' has dtype '{}', which fastcache cannot create (float32, int64, int32, bool)",
                    pair.input,
                    pair.dtype
                );
            }
            if pair.init != "zeros" {
                bail!(
                    "state '{}' asks for init '{}'; contract version 1 only has \"zeros\"",
                    pair.input,
                    pair.init
                );
            }
        }
        for name in &contract.stats {
            if spec.output(name).is_none() {
                bail!(
                    "the '{METADATA_KEY}' contract names stats output '{name}', which the model does not have"
                );
            }
        }
        Ok(StateLoop {
            contract: Some(contract),
        })
    }

    pub fn contract(&self) -> Option<&Contract> {
        self.contract.as_ref()
    }

    pub fn state_inputs(&self) -> Vec<String> {
        self.contract
            .iter()
            .flat_map(|c| c.state.iter().map(|p| p.input.clone()))
            .collect()
    }

    /// Outputs that are not predictions: state outputs and stats.
    pub fn reserved_outputs(&self) -> Vec<String> {
        self.contract
            .iter()
            .flat_map(|c| {
                c.state
                    .iter()
                    .map(|p| p.output.clone())
                    .chain(c.stats.iter().cloned())
            })
            .collect()
    }

    /// Resolves every state shape from the first step's inputs and hands zeros to the engine.
    /// A named dim is the size of the dim of that name on the model's original inputs, as
    /// actually fed (so "batch" includes the CFG doubling).
    pub fn start(&self, engine: &mut dyn Engine, first_inputs: &TensorMap) -> anyhow::Result<()> {
        let Some(contract) = &self.contract else {
            return engine.bind_state(Vec::new());
        };
        let spec = engine.spec().clone();
        let mut slots = Vec::with_capacity(contract.state.len());
        for pair in &contract.state {
            let mut shape = Vec::with_capacity(pair.shape.len());
            for dim in &pair.shape {
                shape.push(match dim {
                    ShapeDim::Fixed(n) if *n >= 0 => *n as usize,
                    ShapeDim::Fixed(n) => {
                        bail!("state '{}' has a negative dim {n}", pair.input)
                    }
                    ShapeDim::Named(name) => {
                        named_dim(&spec, first_inputs, name).with_context(|| {
                            format!("cannot resolve the shape of state '{}'", pair.input)
                        })?
                    }
                });
            }
            let dtype = DType::from_name(&pair.dtype).expect("checked in from_spec");
            slots.push(StateSlot {
                input: pair.input.clone(),
                output: pair.output.clone(),
                initial: Tensor::zeros(dtype, &shape),
            });
        }
        engine.bind_state(slots)
    }

    /// Takes the stats outputs out of a step's outputs.
    pub fn take_stats(&self, outputs: &mut TensorMap) -> TensorMap {
        let mut stats = TensorMap::new();
        if let Some(contract) = &self.contract {
            for name in &contract.stats {
                if let Some(t) = outputs.remove(name) {
                    stats.insert(name.clone(), t);
                }
            }
        }
        stats
    }
}

/// The actual size of the dim named `name` on the model's (non-state) inputs.
fn named_dim(spec: &ModelSpec, inputs: &TensorMap, name: &str) -> anyhow::Result<usize> {
    for input in &spec.inputs {
        let (Some(dims), Some(tensor)) = (&input.dims, inputs.get(&input.name)) else {
            continue;
        };
        if let Some(axis) = dims.iter().position(|d| *d == Dim::Named(name.to_string())) {
            return tensor.shape().get(axis).copied().with_context(|| {
                format!(
                    "input '{}' has rank {}, but declares dim '{name}' at axis {axis}",
                    input.name,
                    tensor.shape().len()
                )
            });
        }
    }
    bail!("no input of the model has a dim named '{name}'")
}
