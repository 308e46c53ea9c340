//! The whole rewrite as users ask for it: find the DiT, then insert token selection, token
//! merging and/or the block cache with the given options, and check the result.

use crate::analysis::{DitStack, discover};
use crate::cache::{Approximation, CacheConfig, CacheSummary, apply_block_cache, block_spans};
use crate::calibration::{Calibration, fingerprint};
use crate::error::{Error, Result};
use crate::ir::{Dim, Model};
use crate::merge::{MergeConfig, MergeSummary, apply_token_merging};
use crate::tokens::{TokenConfig, TokenSummary, apply_token_selection};

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
    /// What a skipped block returns: its cached residual (plus the calibration's correction),
    /// or a forecast of it from its last computed steps.
    pub approximation: Approximation,
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
            approximation: defaults.approximation,
        }
    }
}

/// Token selection (design/method.md §2, [`crate::tokens`]).
#[derive(Clone, Debug)]
pub struct TokenOptions {
    /// ρ in (0, 1]: the share of tokens that run at every step after the first.
    pub motion_ratio: f64,
    /// Supplies the static-token correction, when it has one; must match the model.
    pub calibration: Option<Calibration>,
}

#[derive(Clone, Debug)]
pub struct RewriteSummary {
    pub total_blocks: usize,
    /// Empty when the block cache was not asked for.
    pub cache: CacheSummary,
    /// When token selection was asked for.
    pub tokens: Option<TokenSummary>,
    /// When token merging was asked for.
    pub merge: Option<MergeSummary>,
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
    rewrite(model, Some(options), None, None)
}

/// The block cache, token selection and token merging, any of them, in one rewrite. Token
/// selection goes in first (the blocks then run on the K selected tokens), merging next (its span
/// runs on M merged tokens, ranked with selection's saliency), the cache last, on the blocks as
/// they then are: each block's cache state has the shape of the stream that block runs on.
pub fn rewrite(
    model: &mut Model,
    cache: Option<&CacheOptions>,
    tokens: Option<&TokenOptions>,
    merge: Option<&MergeConfig>,
) -> Result<RewriteSummary> {
    if cache.is_none() && tokens.is_none() && merge.is_none() {
        return Err(Error::Request(
            "nothing to rewrite: neither the block cache, token selection nor token merging was asked for".into(),
        ));
    }
    crate::contract::refuse_rewritten(model)?;
    let structure = discover(model)?;
    let asked: Vec<&str> = [
        cache.map(|_| "the per-block cache"),
        tokens.map(|_| "token selection"),
        merge.map(|_| "token merging"),
    ]
    .into_iter()
    .flatten()
    .collect();
    // On MMDiT the per-block cache and token selection each handle the two streams (selection
    // follows the image tokens into the joint attention); merging does not, nor does the
    // per-block cache on selected tokens (its spans would lose the text stream).
    let stack = if merge.is_none() && !(cache.is_some() && tokens.is_some()) {
        structure.stack()
    } else {
        structure.single_stream(&asked.join(" with "))?
    }
    .clone();
    let total = stack.blocks.len();
    let mut warnings = Vec::new();
    let joint_spans = stack
        .joint
        .is_some()
        .then(|| crate::cache::joint_block_spans(model, &stack));
    // Everything is checked before the model changes.
    let cache_plan = cache
        .map(|options| {
            let uncacheable: Vec<usize> = joint_spans
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, span)| span.is_none())
                .map(|(b, _)| b)
                .collect();
            cache_config(&stack, options, &uncacheable, &mut warnings)
        })
        .transpose()?;
    let token_config = tokens
        .map(|options| token_config(&stack, options, &mut warnings))
        .transpose()?;
    if let Some(config) = merge {
        config.check(total)?;
    }

    let token_summary = match &token_config {
        Some(config) => Some(apply_token_selection(model, &stack, config)?),
        None => None,
    };
    let mut spans = match (&token_summary, joint_spans) {
        (Some(t), _) => t.spans.clone(),
        (None, Some(joint)) => {
            // Blocks without a span of their own are never cached (cache_config refused them).
            let fallback = block_spans(&stack, &stream_dims(&stack)?);
            joint
                .into_iter()
                .zip(fallback)
                .map(|(span, fallback)| span.unwrap_or(fallback))
                .collect()
        }
        (None, None) => block_spans(&stack, &stream_dims(&stack)?),
    };
    let merge_summary = match merge {
        Some(config) => {
            let selection = token_summary
                .as_ref()
                .filter(|t| t.inserted)
                .map(|t| t.tokens);
            let summary = apply_token_merging(model, &stack, &spans, config, selection)?;
            if summary.merged == summary.tokens {
                warnings.push(format!(
                    "--merge-ratio {}: M = ⌈r·T⌉ = {} = T, every token is its own centre, so the merged span computes what it did; the merge only costs time",
                    config.keep_ratio, summary.merged
                ));
            }
            spans = summary.spans.clone();
            Some(summary)
        }
        None => None,
    };
    let cache_summary = match &cache_plan {
        Some((blocks, config)) => apply_block_cache(model, &spans, blocks, config)?,
        None => CacheSummary {
            blocks: Vec::new(),
            kept_outside: Vec::new(),
        },
    };
    if let Some(summary) = &token_summary {
        crate::tokens::merge_contract(model, summary)?;
    }
    if let Some(summary) = &merge_summary {
        crate::merge::merge_contract(model, summary)?;
    }
    crate::ir::verify_model(model)?;
    Ok(RewriteSummary {
        total_blocks: total,
        cache: cache_summary,
        tokens: token_summary,
        merge: merge_summary,
        warnings,
        calibrated: cache.is_some_and(|o| o.calibration.is_some())
            || token_config.is_some_and(|c| c.source == "calibrated"),
    })
}

/// FastCache's per-step policy from a calibration: its schedule (the stack runs at the steps it
/// marks and its residual is forecast at the others), or its probe test. Token selection
/// (`motion_ratio`) and token merging (`merge`) go in first, as in [`rewrite`], and run inside the
/// computed steps: a skipped step forecasts every token's residual and skips them too, and
/// token selection's references pass through it unchanged (they are always computed values).
/// Returns what the step policy did, and the token passes' summaries.
pub fn rewrite_with_schedule(
    model: &mut Model,
    calibration: &Calibration,
    motion_ratio: Option<f64>,
    merge: Option<&MergeConfig>,
) -> Result<ScheduleSummary> {
    use crate::cache::step::{PeerOptions, PeerPolicy};
    let policy = match (&calibration.schedule, &calibration.probe) {
        (Some(schedule), _) => PeerPolicy::Schedule(schedule.policy()),
        (None, Some(probe)) => PeerPolicy::Probe(probe.policy()),
        (None, None) => return Err(Error::Request(
            "the calibration has no schedule; make one with `fastcache calibrate --target-speedup S`".into(),
        )),
    };
    crate::contract::refuse_rewritten(model)?;
    let structure = discover(model)?;
    let stack = match merge {
        None => structure.stack(),
        Some(_) => structure.single_stream("token merging")?,
    }
    .clone();
    check_fingerprint(&stack, calibration)?;
    let probed = matches!(policy, PeerPolicy::Probe(_));
    if probed && motion_ratio.is_some() {
        return Err(Error::Request(
            "the probe test reads block 0's output on every token, and token selection runs the blocks on the selected tokens only; use a schedule (calibrate --target-speedup without --decision probe) with --motion-ratio".into(),
        ));
    }
    let mut warnings = Vec::new();
    let token_config = motion_ratio
        .map(|motion_ratio| {
            let options = TokenOptions {
                motion_ratio,
                calibration: None,
            };
            token_config(&stack, &options, &mut warnings)
        })
        .transpose()?;
    let merge_span = merge
        .map(|config| config.check(stack.blocks.len()))
        .transpose()?;
    if probed && merge_span.is_some_and(|(first, _)| first == 0) {
        return Err(Error::Request(
            "the probe test reads block 0's output on every token, so token merging must start after block 0 (--merge-blocks 1-…)".into(),
        ));
    }

    // The stack as the policy's region sees it once the token passes are in: it ends where the
    // rest of the model reads the stack's output from (token selection's scatter, or the
    // unmerged stream where merging ends the stack), and token selection's references leave it.
    let mut region = stack.clone();
    let last = stack.blocks.len() - 1;
    let mut carried = Vec::new();
    let tokens = match &token_config {
        Some(config) => Some(apply_token_selection(model, &stack, config)?),
        None => None,
    };
    let selected = tokens.as_ref().filter(|t| t.inserted);
    let spans = match selected {
        Some(t) => t.spans.clone(),
        None => block_spans(&stack, &stream_dims(&stack)?),
    };
    let merged = match (merge, merge_span) {
        (Some(config), Some((_, merge_last))) => {
            let summary =
                apply_token_merging(model, &stack, &spans, config, selected.map(|t| t.tokens))?;
            if merge_last == last {
                region.blocks[last].output = crate::merge::UNMERGED.to_string();
            }
            Some(summary)
        }
        _ => None,
    };
    if selected.is_some() {
        region.blocks[last].output = crate::tokens::STACK_OUTPUT.to_string();
        for reference in [crate::tokens::REF_X, crate::tokens::REF_OUT] {
            carried.push(crate::cache::Carried {
                value: format!("{reference}.next"),
                on_skip: reference.to_string(),
            });
        }
    }
    let mut step = crate::cache::step::apply_peer_carrying(
        model,
        &region,
        &PeerOptions::new(policy),
        &carried,
    )?;
    if let Some(t) = &tokens {
        if t.inserted {
            crate::tokens::skipped_steps_run_no_tokens(model, &step.decision)?;
        }
        crate::tokens::merge_contract(model, t)?;
    }
    if let Some(merged) = &merged {
        crate::merge::merge_contract(model, merged)?;
    }
    crate::ir::verify_model(model)?;
    step.warnings.extend(warnings);
    Ok(ScheduleSummary {
        step,
        tokens,
        merge: merged,
    })
}

/// What [`rewrite_with_schedule`] did.
#[derive(Clone, Debug)]
pub struct ScheduleSummary {
    pub step: crate::cache::step::PeerSummary,
    pub tokens: Option<TokenSummary>,
    pub merge: Option<MergeSummary>,
}

fn check_fingerprint(stack: &DitStack, calibration: &Calibration) -> Result<()> {
    let expected = fingerprint(stack);
    if calibration.fingerprint != expected {
        return Err(Error::Request(format!(
            "the calibration was made for another model (its structure is '{}', this model's is '{expected}')",
            calibration.fingerprint
        )));
    }
    Ok(())
}

fn token_config(
    stack: &DitStack,
    options: &TokenOptions,
    warnings: &mut Vec<String>,
) -> Result<TokenConfig> {
    let mut config = TokenConfig::new(options.motion_ratio);
    let tokens = stack.tokens.unwrap_or(0);
    let k = crate::tokens::capacity(options.motion_ratio, tokens.max(1))?;
    if let Some(calibration) = &options.calibration {
        check_fingerprint(stack, calibration)?;
        match calibration
            .static_tokens
            .as_ref()
            .and_then(|t| t.correction.clone())
        {
            Some(correction) => {
                config.correction = Some(correction);
                config.source = "calibrated".into();
            }
            None => warnings.push(
                "the calibration has no static-token correction (made before token selection existed?): static tokens reuse their last output".into(),
            ),
        }
    }
    if k == tokens {
        warnings.push(format!(
            "--motion-ratio {}: K = ⌈ρ·N⌉ = {k} = N, every token runs at every step; no selection inserted",
            options.motion_ratio
        ));
    }
    Ok(config)
}

/// The block cache's configuration for the blocks the options name.
/// `uncacheable`: blocks whose output is not shaped like their input (an MMDiT block that
/// joins or slices the streams), which a residual cannot stand in for.
fn cache_config(
    stack: &DitStack,
    options: &CacheOptions,
    uncacheable: &[usize],
    warnings: &mut Vec<String>,
) -> Result<(Vec<usize>, CacheConfig)> {
    let total = stack.blocks.len();
    let why = |b: usize| {
        format!(
            "block {b} ({}) writes '{}' in another shape than it reads '{}' (it joins or slices the streams), so a residual cannot stand in for it",
            stack.blocks[b].kind.as_str(),
            stack.blocks[b].output,
            stack.blocks[b].input
        )
    };
    let blocks: Vec<usize> = match &options.blocks {
        Some(list) => {
            let mut list = list.clone();
            list.sort_unstable();
            list.dedup();
            if let Some(bad) = list.iter().find(|&&b| b >= total) {
                return Err(Error::Request(format!(
                    "--blocks names block {bad}, but the model has {total} blocks (0 to {})",
                    total - 1
                )));
            }
            if let Some(&bad) = list.iter().find(|b| uncacheable.contains(b)) {
                return Err(Error::Unsupported(why(bad)));
            }
            list
        }
        None => {
            for &b in uncacheable {
                warnings.push(format!("not cached: {}", why(b)));
            }
            (0..total).filter(|b| !uncacheable.contains(b)).collect()
        }
    };
    if stack.joint.is_some() && options.calibration.is_some() {
        return Err(Error::Unsupported(
            "per-block calibration of an MMDiT is not built; use the uncalibrated per-block cache, or FastCache's schedule (calibrate --target-speedup)".into(),
        ));
    }
    if blocks.is_empty() {
        return Err(Error::Request("--blocks names no block".into()));
    }
    let mut config = CacheConfig::uncalibrated(blocks.len());
    config.alpha = options.alpha;
    config.max_skips = options.max_skips;
    config.warmup = options.warmup;
    config.force_skip = options.force_skip;
    config.approximation = options.approximation;
    if let Some(calibration) = &options.calibration {
        check_fingerprint(stack, calibration)?;
        if calibration.blocks.is_empty() {
            return Err(Error::Request(
                "the calibration holds a schedule only (calibrate --target-speedup), no per-block fits; it builds FastCache's per-step policy, not the per-block cache or its combinations with token selection and merging".into(),
            ));
        }
        let by_index = |b: usize| calibration.blocks.iter().find(|c| c.index == b);
        config.kappa = blocks
            .iter()
            .map(|&b| {
                by_index(b).map(|c| c.kappa).ok_or_else(|| {
                    Error::Request(format!("the calibration has no entry for block {b}"))
                })
            })
            .collect::<Result<_>>()?;
        let corrections: Option<Vec<_>> = blocks
            .iter()
            .map(|&b| by_index(b).and_then(|c| c.correction.clone()))
            .collect();
        config.source = "calibrated".into();
        if matches!(config.approximation, Approximation::Forecast { .. }) {
            if corrections.is_some() {
                warnings.push("the calibration's corrections are fitted to residual reuse; the forecast does not use them (its change scales still set the test)".into());
            }
        } else {
            config.corrections = corrections;
        }
    }

    if config.force_skip {
        warnings.push(format!("forced skips: every cached block is skipped at every step after step {}; for tests only", config.warmup.max(1)));
    } else if config.max_skips == 0 {
        warnings.push("--max-skips 0: no block is ever skipped; the model computes exactly what the original does".into());
    } else if config.kappa.iter().all(|&k| k == 0.0) {
        warnings.push("every cached block has change scale 0: the test can never pass, so nothing will be skipped".into());
    }
    Ok((blocks, config))
}
