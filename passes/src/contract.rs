//! The host contract (design/method.md §4): what a rewritten model says about itself in its
//! `fastcache` metadata entry, so that any ONNX Runtime host can run it by feeding every state
//! output back as the matching input on the next sampling step.

use serde::{Deserialize, Serialize};

/// The metadata key under which the contract is stored.
pub const METADATA_KEY: &str = "fastcache";
pub const CONTRACT_VERSION: u32 = 1;

/// Refuses a model that already carries a rewrite: every pass rewrites the original.
pub(crate) fn refuse_rewritten(model: &crate::ir::Model) -> crate::error::Result<()> {
    if model.metadata_value(METADATA_KEY).is_some() {
        return Err(crate::error::Error::Invalid(
            "this model already carries a fastcache rewrite (metadata entry 'fastcache'); rewrite the original model instead".into(),
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contract {
    pub version: u32,
    /// Cross-step state: initialise every input with zeros, feed the output back next step.
    pub state: Vec<StatePair>,
    /// Extra outputs a host may read or ignore (which blocks were skipped, how many tokens ran).
    pub stats: Vec<String>,
    /// The policy and every parameter it used.
    pub policy: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatePair {
    pub input: String,
    pub output: String,
    /// "float32", "int64", "bool", ...
    pub dtype: String,
    /// A name is the dim of that name on the model's original inputs (e.g. "batch"); a number is fixed.
    pub shape: Vec<ShapeDim>,
    /// Always "zeros" in version 1: all-zero state means "first step, take the full path".
    pub init: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ShapeDim {
    Fixed(i64),
    Named(String),
}

impl Contract {
    /// Reads the contract of a model, if it has one.
    pub fn from_model(model: &crate::ir::Model) -> crate::Result<Option<Contract>> {
        model
            .metadata_value(METADATA_KEY)
            .map(Contract::parse)
            .transpose()
    }

    pub fn parse(json: &str) -> crate::Result<Contract> {
        let contract: Contract = serde_json::from_str(json).map_err(|e| {
            crate::Error::Invalid(format!(
                "metadata entry '{METADATA_KEY}' is not a valid contract: {e}"
            ))
        })?;
        if contract.version != CONTRACT_VERSION {
            return Err(crate::Error::Unsupported(format!(
                "metadata entry '{METADATA_KEY}' has contract version {}; this fastcache reads version {CONTRACT_VERSION}",
                contract.version
            )));
        }
        Ok(contract)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a contract always serialises")
    }
}

/// Adds a pass's state pairs, stats and policy (under `policy[key]`) to the model's contract,
/// creating the contract when no earlier pass did (its policy then says the block cache is off).
pub fn extend_contract(
    model: &mut crate::ir::Model,
    state: &[StatePair],
    stats: &[String],
    key: &str,
    policy: serde_json::Value,
) -> crate::Result<()> {
    let mut contract = match Contract::from_model(model)? {
        Some(contract) => contract,
        None => Contract {
            version: CONTRACT_VERSION,
            state: Vec::new(),
            stats: Vec::new(),
            policy: serde_json::json!({"name": "fastcache", "cache": false}),
        },
    };
    contract.state.extend(state.iter().cloned());
    contract.stats.extend(stats.iter().cloned());
    match contract.policy.as_object_mut() {
        Some(object) => {
            object.insert(key.into(), policy);
        }
        None => {
            return Err(crate::Error::Invalid(format!(
                "the model's {METADATA_KEY} policy is not a JSON object"
            )));
        }
    }
    model.set_metadata(METADATA_KEY, contract.to_json());
    Ok(())
}
