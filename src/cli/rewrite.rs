//! `fastcache rewrite MODEL -o OUT [options]`: insert the block cache into an exported DiT, or
//! (`--policy`) one of the peer policies it is measured against. `--motion-ratio ρ` adds token
//! selection, `--merge-ratio r` token merging (either or both alone with `--no-cache`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fastcache_passes::cache::Approximation;
use fastcache_passes::cache::step::{Indicator, PeerOptions, PeerPolicy, rewrite_with_peer};
use fastcache_passes::calibration::Calibration;
use fastcache_passes::ir::{Model, verify_model};
use fastcache_passes::merge::{MergeConfig, Unmerge};
use fastcache_passes::onnx::Storage;
use fastcache_passes::rewrite::{CacheOptions, TokenOptions, rewrite};

use super::output::{say, say_warning};

#[derive(clap::Args)]
pub struct Args {
    /// The exported model (.onnx).
    pub model: PathBuf,
    /// Where to write the rewritten model.
    #[arg(short, long)]
    pub output: PathBuf,
    /// A calibration file from `fastcache calibrate` (fitted corrections and change scales).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Significance level of the skip test.
    #[arg(long, default_value_t = CacheOptions::default().alpha)]
    pub alpha: f64,
    /// Most consecutive steps a block may be skipped; 0 reproduces the original model exactly.
    #[arg(long, default_value_t = CacheOptions::default().max_skips)]
    pub max_skips: i64,
    /// Steps computed in full before any skip (the first step always is). Default: 2 for
    /// fastcache, 1 for the peer policies (their published rules compute only the first step).
    #[arg(long)]
    pub warmup: Option<i64>,
    /// Blocks to cache, e.g. `1,2,5-9` (all when omitted); for fbcache, teacache and interval one
    /// run of consecutive blocks, their region (on an MMDiT, e.g. the double blocks only)
    #[arg(long)]
    pub blocks: Option<String>,
    /// Testing aid: skip every cached block at every step after warm-up, whatever the test says.
    #[arg(long, hide = true)]
    pub force_skip: bool,
    /// The per-block cache: forecast a skipped block's residual along time through its last
    /// ORDER + 1 computed steps (1: a line, 2: a parabola) instead of reusing the last one.
    #[arg(long, value_name = "ORDER")]
    pub forecast: Option<usize>,
    /// With --forecast: d in [0, 1], the factor on each term past the first (1: Lagrange's
    /// extrapolation, 0: reuse).
    #[arg(long, value_name = "D")]
    pub damping: Option<f32>,
    /// The caching policy: fastcache (the block cache above), or a peer it is measured against.
    #[arg(long, value_enum, default_value_t = Policy::Fastcache)]
    pub policy: Policy,
    /// fbcache, teacache: the relative L1 change (Σ|x − ref| / Σ|ref|) below which the cache is
    /// used; 0 never skips.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// interval: compute the whole stack every N-th step, reuse its residual in between; 1 never
    /// skips.
    #[arg(long)]
    pub interval: Option<i64>,
    /// teacache: what to watch: block 0's timestep-modulated input (default) or the stack input.
    #[arg(long, value_enum)]
    pub indicator: Option<IndicatorArg>,
    /// Token selection: at every step after the first, only the ⌈ρ·N⌉ tokens whose stack input
    /// moved most since they last ran go through the blocks; the others keep their last output
    /// (plus the calibrated correction, with --calibration). ρ in (0, 1]; 1 runs every token.
    /// Combined with the block cache unless --no-cache.
    #[arg(long, value_name = "RHO")]
    pub motion_ratio: Option<f64>,
    /// Token merging: a span of blocks runs on ⌈r·T⌉ tokens, each the importance-weighted mean of
    /// a cluster of similar tokens (k-NN density); afterwards every token gets its cluster's
    /// result. r in (0, 1]; 1 keeps every token. Combined with the block cache unless --no-cache.
    #[arg(long, value_name = "R")]
    pub merge_ratio: Option<f64>,
    /// Token merging: the blocks of the merged span, consecutive: `7-20`, or `3` for one block
    /// (default: the middle half of the stack).
    #[arg(long, value_name = "FIRST-LAST")]
    pub merge_blocks: Option<String>,
    /// Token merging: how many nearest neighbours a token's density is averaged over.
    #[arg(long, value_name = "K", default_value_t = MergeConfig::new(1.0).neighbours)]
    pub merge_neighbours: i64,
    /// Token merging with token selection: how much a token's saliency (its motion since it last
    /// ran) raises its importance, λ in importance = density · (1 + λ · saliency / max).
    #[arg(long, value_name = "LAMBDA")]
    pub merge_lambda: Option<f64>,
    /// Token merging: what each token gets back after the span: its own input plus its cluster's
    /// update (`residual`), or its cluster centre's output (`copy`).
    #[arg(long, value_enum, default_value_t = UnmergeArg::Residual)]
    pub unmerge: UnmergeArg,
    /// Token merging: leave attention as it is instead of weighing each merged key by its
    /// cluster's size (log(size) added to its attention logits).
    #[arg(long)]
    pub no_proportional_attention: bool,
    /// Leave the block cache out: token selection and/or merging alone (needs --motion-ratio or
    /// --merge-ratio).
    #[arg(long)]
    pub no_cache: bool,
    /// Where the weights go: `inline` (one file; impossible above 2 GiB), `external` (OUT.data
    /// beside OUT), or `auto`: external when the input had external data or the weights pass
    /// 1 GiB, else inline.
    #[arg(long, value_enum, default_value_t = Weights::Auto)]
    pub weights: Weights,
    /// Also write the rewritten model cut at its `If`s into DIR: straight-line segments, each
    /// `If`'s two branches as models of their own, and manifest.json, for hosts that decide on
    /// the host (`run --split DIR`); OUT stays the single-graph model.
    #[arg(long, value_name = "DIR")]
    pub split: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Weights {
    Auto,
    Inline,
    External,
}

/// Writes the rewritten model to OUT and, with `--split DIR`, its host-split segments.
fn write_model(args: &Args, model: &Model) -> anyhow::Result<()> {
    let segments = match &args.split {
        Some(dir) => Some((
            dir,
            fastcache_passes::split::split_at_ifs(model)
                .with_context(|| format!("cannot split {}", args.model.display()))?,
        )),
        None => None,
    };
    let storage = storage(args.weights, model, &args.output);
    model
        .save(&args.output, &storage)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    if let Some((dir, segments)) = segments {
        write_split(dir, model, &segments)?;
    }
    Ok(())
}

/// Writes the split (see [`fastcache_passes::split::write_split`]) and says what it wrote.
fn write_split(
    dir: &Path,
    model: &Model,
    segments: &[fastcache_passes::split::Segment],
) -> anyhow::Result<()> {
    fastcache_passes::split::write_split(dir, model, segments)?;
    let branches = segments
        .iter()
        .filter(|s| matches!(s, fastcache_passes::split::Segment::Branch { .. }))
        .count();
    say!(
        "host split: {} segments ({branches} of them an If's two branches) and manifest.json in {}",
        segments.len(),
        dir.display()
    );
    Ok(())
}

fn storage(weights: Weights, model: &Model, output: &Path) -> Storage {
    match weights {
        Weights::Auto => model.default_storage(output),
        Weights::Inline => Storage::Inline,
        Weights::External => Storage::external_beside(output),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// FastCache: with a calibration made by `calibrate --target-speedup`, its per-step policy
    /// (the calibrated steps run the stack, the others forecast its residual); otherwise the
    /// per-block cache below.
    Fastcache,
    /// The paper's per-block FastCache: a χ² test per block, cached residual plus fitted
    /// correction.
    FastcachePerBlock,
    /// First-Block-Cache: block 0's residual change decides whether blocks 1..L−1 run.
    Fbcache,
    /// TeaCache: accumulated change of block 0's modulated input decides whether the stack runs.
    Teacache,
    /// FORA-style static interval: the stack runs every N steps.
    Interval,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnmergeArg {
    Residual,
    Copy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IndicatorArg {
    ModulatedInput,
    StackInput,
}

/// The peer policy the arguments ask for; `None` for fastcache. Options that belong to another
/// policy are refused rather than ignored.
fn peer_options(args: &Args) -> anyhow::Result<Option<PeerOptions>> {
    let threshold = || {
        args.threshold.with_context(|| {
            format!(
                "--policy {} needs --threshold (the relative L1 change below which it skips)",
                policy_name(args.policy)
            )
        })
    };
    if args.policy != Policy::Teacache && args.indicator.is_some() {
        bail!("--indicator is an option of --policy teacache");
    }
    if args.policy != Policy::Interval && args.interval.is_some() {
        bail!("--interval is an option of --policy interval");
    }
    if matches!(
        args.policy,
        Policy::Fastcache | Policy::FastcachePerBlock | Policy::Interval
    ) && args.threshold.is_some()
    {
        bail!("--threshold is an option of --policy fbcache and teacache");
    }
    if !matches!(args.policy, Policy::Fastcache | Policy::FastcachePerBlock) {
        for (given, flag) in [
            (args.calibration.is_some(), "--calibration"),
            (args.force_skip, "--force-skip"),
            (args.motion_ratio.is_some(), "--motion-ratio"),
            (args.merge_ratio.is_some(), "--merge-ratio"),
            (args.no_cache, "--no-cache"),
            (args.forecast.is_some(), "--forecast"),
            (args.damping.is_some(), "--damping"),
        ] {
            if given {
                bail!("{flag} is an option of --policy fastcache and fastcache-per-block");
            }
        }
    }
    let policy = match args.policy {
        Policy::Fastcache | Policy::FastcachePerBlock => return Ok(None),
        Policy::Fbcache => PeerPolicy::FirstBlock {
            threshold: threshold()?,
        },
        Policy::Teacache => PeerPolicy::TeaCache {
            threshold: threshold()?,
            indicator: match args.indicator {
                Some(IndicatorArg::StackInput) => Indicator::StackInput,
                _ => Indicator::ModulatedInput,
            },
        },
        Policy::Interval => PeerPolicy::Interval {
            interval: args
                .interval
                .context("--policy interval needs --interval N (compute every N-th step)")?,
        },
    };
    let mut options = PeerOptions::new(policy);
    if let Some(warmup) = args.warmup {
        options.warmup = warmup;
    }
    if let Some(text) = &args.blocks {
        // A peer skips one region together: a run of consecutive blocks.
        let mut blocks = parse_blocks(text, "--blocks")?;
        blocks.sort_unstable();
        blocks.dedup();
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else {
            bail!("--blocks names no block");
        };
        if blocks.len() != last - first + 1 {
            bail!(
                "--blocks {text}: --policy {} skips one region of consecutive blocks, e.g. 0-18",
                policy_name(args.policy)
            );
        }
        options.blocks = Some((first, last));
    }
    Ok(Some(options))
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Fastcache => "fastcache",
        Policy::FastcachePerBlock => "fastcache-per-block",
        Policy::Fbcache => "fbcache",
        Policy::Teacache => "teacache",
        Policy::Interval => "interval",
    }
}

/// FastCache's per-step policy from a calibrated schedule. The per-block options have no meaning
/// there and are refused.
fn rewrite_scheduled(
    args: &Args,
    model: &mut Model,
    calibration: &Calibration,
) -> anyhow::Result<()> {
    let merge = merge_config(args)?;
    for (given, flag) in [
        (args.blocks.is_some(), "--blocks"),
        (args.force_skip, "--force-skip"),
        (args.no_cache, "--no-cache"),
        (args.warmup.is_some(), "--warmup"),
        (
            args.max_skips != CacheOptions::default().max_skips,
            "--max-skips",
        ),
        (args.forecast.is_some(), "--forecast"),
        (args.damping.is_some(), "--damping"),
    ] {
        if given {
            bail!(
                "{flag} is an option of the per-block cache; this calibration holds FastCache's per-step policy (calibrate --target-speedup), which decides per step itself; use --policy fastcache-per-block with a per-block calibration"
            );
        }
    }
    let summary = fastcache_passes::rewrite::rewrite_with_schedule(
        model,
        calibration,
        args.motion_ratio,
        merge.as_ref(),
    )
    .with_context(|| format!("cannot rewrite {}", args.model.display()))?;
    write_model(args, model)?;
    match (&calibration.schedule, &calibration.probe) {
        (Some(schedule), _) => {
            say!(
                "fastcache: the stack ({} blocks) runs at {} of {} steps, {} forecast the others (calibrated for {}, expected {:.2}x FLOP speedup); wrote {}",
                summary.step.total_blocks,
                schedule.compute.iter().filter(|&&c| c).count(),
                schedule.compute.len(),
                schedule.forecaster,
                match schedule.validation_psnr {
                    Some(psnr) => format!("{psnr:.2} dB PSNR on validation runs"),
                    None => format!("{}x", schedule.target_speedup),
                },
                schedule.predicted_speedup,
                args.output.display()
            );
            say!(
                "the schedule is for {}-step runs; a run with more steps computes every step past it",
                schedule.compute.len()
            );
        }
        (None, Some(probe)) => {
            say!(
                "fastcache: block 0 runs every step and tests its own forecast; blocks 1..{} are forecast where it passes (alpha {}, tolerance {:.4}, calibrated for {}x, expected {:.2}x FLOP speedup); wrote {}",
                summary.step.total_blocks - 1,
                probe.alpha,
                probe.tolerance,
                probe.target_speedup,
                probe.predicted_speedup,
                args.output.display()
            );
            say!(
                "the test is for {}-step runs; a run with more steps computes every step past it",
                probe.forced.len()
            );
        }
        (None, None) => bail!("the calibration holds no per-step policy"),
    }
    if let Some(tokens) = summary.tokens.as_ref().filter(|t| t.inserted) {
        say!(
            "token selection ({} of {} tokens after the first step) runs inside the computed steps; a skipped step skips it too and keeps its references",
            tokens.capacity,
            tokens.tokens
        );
    }
    if let Some(merge) = &merge {
        say!(
            "token merging (keep ratio {}) runs inside the computed steps; a skipped step skips it too",
            merge.keep_ratio
        );
    }
    for warning in &summary.step.warnings {
        say_warning!("{warning}");
    }
    Ok(())
}

/// The token merging the arguments ask for, if any; merging options without `--merge-ratio`
/// are refused rather than ignored.
fn merge_config(args: &Args) -> anyhow::Result<Option<MergeConfig>> {
    let Some(ratio) = args.merge_ratio else {
        for (given, flag) in [
            (args.merge_blocks.is_some(), "--merge-blocks"),
            (args.merge_lambda.is_some(), "--merge-lambda"),
            (
                args.merge_neighbours != MergeConfig::new(1.0).neighbours,
                "--merge-neighbours",
            ),
            (args.unmerge != UnmergeArg::Residual, "--unmerge"),
            (
                args.no_proportional_attention,
                "--no-proportional-attention",
            ),
        ] {
            if given {
                bail!("{flag} is an option of token merging, which needs --merge-ratio");
            }
        }
        return Ok(None);
    };
    if args.merge_lambda.is_some() && args.motion_ratio.is_none() {
        bail!(
            "--merge-lambda weighs token selection's saliency into merging; it needs --motion-ratio"
        );
    }
    let mut config = MergeConfig::new(ratio);
    config.neighbours = args.merge_neighbours;
    if let Some(lambda) = args.merge_lambda {
        config.lambda = lambda;
    }
    config.proportional_attention = !args.no_proportional_attention;
    config.unmerge = match args.unmerge {
        UnmergeArg::Residual => Unmerge::Residual,
        UnmergeArg::Copy => Unmerge::Copy,
    };
    if let Some(text) = &args.merge_blocks {
        let blocks = parse_blocks(text, "--merge-blocks")?;
        match (blocks.first(), blocks.last()) {
            (Some(&first), Some(&last)) if blocks.len() == last - first + 1 => {
                config.span = Some((first, last))
            }
            _ => bail!(
                "--merge-blocks takes one span of consecutive blocks, FIRST-LAST; got '{text}'"
            ),
        }
    }
    Ok(Some(config))
}

/// What a skipped block returns in the per-block cache: the forecast `--forecast` asks for, or
/// the cached residual.
fn block_approximation(args: &Args) -> anyhow::Result<Approximation> {
    match (args.forecast, args.damping) {
        (Some(order), damping) => Ok(Approximation::Forecast {
            order,
            damping: damping.unwrap_or(1.0),
        }),
        (None, Some(_)) => bail!("--damping is an option of --forecast"),
        (None, None) => Ok(Approximation::Residual),
    }
}

/// Parses `1,2,5-9` into block indices; `flag` names the option in messages.
pub fn parse_blocks(text: &str, flag: &str) -> anyhow::Result<Vec<usize>> {
    let mut blocks = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("{flag}: '{part}' is not a block number or range"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    bail!("{flag}: range '{part}' runs backwards");
                }
                blocks.extend(a..=b);
            }
            None => blocks.push(number(part)?),
        }
    }
    Ok(blocks)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let peer = peer_options(&args)?;
    let mut model = Model::load(&args.model).context("cannot read the model")?;
    verify_model(&model)
        .with_context(|| format!("{} is not a valid graph", args.model.display()))?;
    if let Some(options) = peer {
        let summary = rewrite_with_peer(&mut model, &options)
            .with_context(|| format!("cannot rewrite {}", args.model.display()))?;
        write_model(&args, &model)?;
        let skippable: Vec<String> = summary.skippable.iter().map(|b| b.to_string()).collect();
        say!(
            "{}: blocks [{}] of {} skipped together{}; wrote {}",
            options.policy.name(),
            skippable.join(", "),
            summary.total_blocks,
            summary
                .indicator
                .as_ref()
                .map(|v| format!(", indicator '{v}'"))
                .unwrap_or_default(),
            args.output.display()
        );
        for warning in &summary.warnings {
            say_warning!("{warning}");
        }
        return Ok(());
    }
    let calibration = args
        .calibration
        .as_ref()
        .map(|p| {
            Calibration::load(p)
                .with_context(|| format!("cannot read the calibration {}", p.display()))
        })
        .transpose()?;
    if args.policy == Policy::Fastcache
        && let Some(calibration) = calibration
            .as_ref()
            .filter(|c| c.schedule.is_some() || c.probe.is_some())
    {
        return rewrite_scheduled(&args, &mut model, calibration);
    }
    let merge = merge_config(&args)?;
    if args.no_cache {
        if args.motion_ratio.is_none() && merge.is_none() {
            bail!(
                "--no-cache leaves nothing to do without --motion-ratio (token selection) or --merge-ratio (token merging)"
            );
        }
        for (given, flag) in [
            (args.blocks.is_some(), "--blocks"),
            (args.force_skip, "--force-skip"),
            (args.warmup.is_some(), "--warmup"),
            (args.forecast.is_some(), "--forecast"),
            (args.damping.is_some(), "--damping"),
        ] {
            if given {
                bail!("{flag} is an option of the block cache, which --no-cache leaves out");
            }
        }
    }
    let approximation = block_approximation(&args)?;
    let cache = (!args.no_cache)
        .then(|| -> anyhow::Result<CacheOptions> {
            Ok(CacheOptions {
                alpha: args.alpha,
                max_skips: args.max_skips,
                // A forecast through K + 1 steps needs them computed before its first skip.
                warmup: args.warmup.unwrap_or(
                    CacheOptions::default()
                        .warmup
                        .max(args.forecast.unwrap_or(0) as i64 + 1),
                ),
                blocks: args
                    .blocks
                    .as_deref()
                    .map(|text| parse_blocks(text, "--blocks"))
                    .transpose()?,
                calibration: calibration.clone(),
                force_skip: args.force_skip,
                approximation,
            })
        })
        .transpose()?;
    let tokens = args.motion_ratio.map(|motion_ratio| TokenOptions {
        motion_ratio,
        calibration: calibration.clone(),
    });
    let summary = rewrite(&mut model, cache.as_ref(), tokens.as_ref(), merge.as_ref())
        .with_context(|| format!("cannot rewrite {}", args.model.display()))?;
    write_model(&args, &model)?;
    let calibrated = match (summary.calibrated, approximation) {
        (true, Approximation::Forecast { order, damping }) => {
            format!("calibrated change scales; order-{order} forecast, damping {damping}")
        }
        (true, _) => "calibrated".to_string(),
        (false, Approximation::Forecast { order, damping }) => {
            format!("uncalibrated: order-{order} forecast, damping {damping}, default change scale")
        }
        (false, _) => "uncalibrated: residual reuse, default change scale".to_string(),
    };
    if cache.is_some() {
        let cached: Vec<String> = summary.cache.blocks.iter().map(|b| b.to_string()).collect();
        say!(
            "cached {} of {} blocks [{}] ({calibrated})",
            summary.cache.blocks.len(),
            summary.total_blocks,
            cached.join(", "),
        );
    }
    if let Some(t) = &summary.tokens {
        let mut notes = Vec::new();
        if !t.per_token_inputs.is_empty() {
            let names: Vec<&str> = t.per_token_inputs.iter().map(|p| p.name.as_str()).collect();
            notes.push(format!(
                "per-token inputs gathered too: {}",
                names.join(", ")
            ));
        }
        if !t.fixed_nodes.is_empty() {
            notes.push(format!(
                "{} nodes whose constants named N (reshape targets, slice bounds) now follow the token count",
                t.fixed_nodes.len()
            ));
        }
        say!(
            "token selection: {} of {} tokens per step after the first (motion ratio {}){}{}",
            t.capacity,
            t.tokens,
            args.motion_ratio.unwrap_or(1.0),
            if cache.is_some() {
                "; the cache runs on the selected tokens"
            } else {
                ""
            },
            if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            }
        );
    }
    if let Some(m) = &summary.merge {
        say!(
            "token merging: blocks {}-{} run on {} of {} tokens (keep ratio {}, {} neighbours, unmerge {}){}{}{}",
            m.span.0,
            m.span.1,
            m.merged,
            m.tokens,
            args.merge_ratio.unwrap_or(1.0),
            m.neighbours,
            match args.unmerge {
                UnmergeArg::Residual => "residual",
                UnmergeArg::Copy => "copy",
            },
            if cache.is_some() {
                "; the cache runs on the merged tokens there"
            } else {
                ""
            },
            if m.proportional_softmaxes.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} attention softmaxes weigh merged keys by cluster size",
                    m.proportional_softmaxes.len()
                )
            },
            if m.fixed_nodes.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} nodes whose constants named the token count (reshape targets, slice bounds) now follow it",
                    m.fixed_nodes.len()
                )
            }
        );
    }
    say!("wrote {}", args.output.display());
    for warning in &summary.warnings {
        say_warning!("{warning}");
    }
    Ok(())
}
