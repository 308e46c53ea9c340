//! `fastcache rewrite MODEL -o OUT [options]`: insert the block cache into an exported DiT.

use std::path::PathBuf;

use anyhow::{Context, bail};
use fastcache_passes::calibration::Calibration;
use fastcache_passes::ir::{Model, verify_model};
use fastcache_passes::rewrite::{CacheOptions, rewrite_with_cache};

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
    /// Steps computed in full before any skip (the first step always is).
    #[arg(long, default_value_t = CacheOptions::default().warmup)]
    pub warmup: i64,
    /// Blocks to cache, e.g. `1,2,5-9` (all when omitted).
    #[arg(long)]
    pub blocks: Option<String>,
    /// Testing aid: skip every cached block at every step after warm-up, whatever the test says.
    #[arg(long, hide = true)]
    pub force_skip: bool,
}

/// Parses `1,2,5-9` into block indices.
pub fn parse_blocks(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut blocks = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("--blocks: '{part}' is not a block number or range"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    bail!("--blocks: range '{part}' runs backwards");
                }
                blocks.extend(a..=b);
            }
            None => blocks.push(number(part)?),
        }
    }
    Ok(blocks)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut model = Model::load(&args.model).context("cannot read the model")?;
    verify_model(&model)
        .with_context(|| format!("{} is not a valid graph", args.model.display()))?;
    let calibration = args
        .calibration
        .as_ref()
        .map(|p| {
            Calibration::load(p)
                .with_context(|| format!("cannot read the calibration {}", p.display()))
        })
        .transpose()?;
    let options = CacheOptions {
        alpha: args.alpha,
        max_skips: args.max_skips,
        warmup: args.warmup,
        blocks: args.blocks.as_deref().map(parse_blocks).transpose()?,
        calibration,
        force_skip: args.force_skip,
    };
    let summary = rewrite_with_cache(&mut model, &options)
        .with_context(|| format!("cannot rewrite {}", args.model.display()))?;
    let storage = model.default_storage(&args.output);
    model
        .save(&args.output, &storage)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let cached: Vec<String> = summary.cache.blocks.iter().map(|b| b.to_string()).collect();
    println!(
        "cached {} of {} blocks [{}] ({}); wrote {}",
        summary.cache.blocks.len(),
        summary.total_blocks,
        cached.join(", "),
        if summary.calibrated {
            "calibrated"
        } else {
            "uncalibrated: residual reuse, default change scale"
        },
        args.output.display()
    );
    for warning in &summary.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(())
}
