//! The whole rewrite as users ask for it: find the DiT, then insert the block cache (and, as
//! they land, token selection and merging) with the given options, and check the result.

use crate::analysis::{DitStack, discover};
use crate::cache::{BlockSpan, CacheConfig, CacheSummary, apply_block_cache};
use crate::calibration::{Calibration, fingerprint};
use crate::error::{Error, Result};
use crate::ir::{Dim, Model};

#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub alpha: f64,
    pub max_skips: i64,
    pub warmup: i64,
    /// Which blocks get a cache (all when None).
    pub blocks: Option<Vec<usize>>,
    pub calibration: Option<Calibration>,
    /// Test only: skip every block at every step after warm-up.
    pub force_skip: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        let defaults = CacheConfig::uncalibrated(0);
        CacheOptions {
            alpha: defaults.alpha,
            max_skips: defaults.max_skips,
            warmup: defaults.warmup,
            blocks: None,
            calibration: None,
            force_skip: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RewriteSummary {
    pub total_blocks: usize,
    pub cache: CacheSummary,
    /// Things the user must know: a configuration that never skips, or always does.
    pub warnings: Vec<String>,
    pub calibrated: bool,
}

/// The residual stream's shape [batch, N, D], which every cache state tensor shares.
pub fn stream_dims(stack: &DitStack) -> Result<Vec<Dim>> {
    match (stack.tokens, stack.hidden) {
        (Some(n), Some(d)) => Ok(vec![stack.batch.clone(), Dim::Fixed(n), Dim::Fixed(d)]),
        _ => Err(Error::Unsupported(format!(
            "the stack input '{}' has no fixed token count and hidden size; export the model with fixed image size",
            stack.stack_input
        ))),
    }
}

pub fn rewrite_with_cache(model: &mut Model, options: &CacheOptions) -> Result<RewriteSummary> {
    if model
        .metadata_value(crate::contract::METADATA_KEY)
        .is_some()
    {
        return Err(Error::Invalid(
            "this model already carries a fastcache rewrite (metadata entry 'fastcache'); rewrite the original model instead".into(),
        ));
    }
    let structure = discover(model)?;
    let stack = structure.single_stream()?.clone();
    let total = stack.blocks.len();
    let blocks: Vec<usize> = match &options.blocks {
        Some(list) => {
            let mut list = list.clone();
            list.sort_unstable();
            list.dedup();
            if let Some(bad) = list.iter().find(|&&b| b >= total) {
                return Err(Error::Invalid(format!(
                    "--blocks names block {bad}, but the model has {total} blocks (0..{})",
                    total - 1
                )));
            }
            list
        }
        None => (0..total).collect(),
    };
    if blocks.is_empty() {
        return Err(Error::Invalid("--blocks names no block".into()));
    }
    let spans: Vec<BlockSpan> = stack
        .blocks
        .iter()
        .map(|b| BlockSpan {
            input: b.input.clone(),
            output: b.output.clone(),
            nodes: b.nodes.clone(),
        })
        .collect();
    let mut config = CacheConfig::uncalibrated(blocks.len());
    config.alpha = options.alpha;
    config.max_skips = options.max_skips;
    config.warmup = options.warmup;
    config.force_skip = options.force_skip;
    if let Some(calibration) = &options.calibration {
        let expected = fingerprint(&stack);
        if calibration.fingerprint != expected {
            return Err(Error::Invalid(format!(
                "the calibration was made for another model (its structure is '{}', this model's is '{expected}')",
                calibration.fingerprint
            )));
        }
        let by_index = |b: usize| calibration.blocks.iter().find(|c| c.index == b);
        config.kappa = blocks
            .iter()
            .map(|&b| {
                by_index(b).map(|c| c.kappa).ok_or_else(|| {
                    Error::Invalid(format!("the calibration has no entry for block {b}"))
                })
            })
            .collect::<Result<_>>()?;
        let corrections: Option<Vec<_>> = blocks
            .iter()
            .map(|&b| by_index(b).and_then(|c| c.correction.clone()))
            .collect();
        config.corrections = corrections;
        config.source = "calibrated".into();
    }

    let mut warnings = Vec::new();
    if config.force_skip {
        warnings.push(format!("forced skips: every cached block is skipped at every step after step {}; for tests only", config.warmup.max(1)));
    } else if config.max_skips == 0 {
        warnings.push("--max-skips 0: no block is ever skipped; the model computes exactly what the original does".into());
    } else if config.kappa.iter().all(|&k| k == 0.0) {
        warnings.push("every cached block has change scale 0: the test can never pass, so nothing will be skipped".into());
    }
    let cache = apply_block_cache(model, &spans, &blocks, &stream_dims(&stack)?, &config)?;
    Ok(RewriteSummary {
        total_blocks: total,
        cache,
        warnings,
        calibrated: options.calibration.is_some(),
    })
}
