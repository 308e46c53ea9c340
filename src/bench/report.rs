//! The bench's results: a serialisable report (JSON), its Markdown table, and the figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use ndarray::ArrayD;
use serde::{Serialize, Serializer};

use super::memory::EngineMemory;
use super::plot;

/// A float that may be infinite (PSNR of identical samples) or undefined: JSON has no such
/// numbers, so they are written as the strings "inf", "-inf" and "nan".
fn number<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    if value.is_finite() {
        serializer.serialize_f64(*value)
    } else if value.is_nan() {
        serializer.serialize_str("nan")
    } else if *value > 0.0 {
        serializer.serialize_str("inf")
    } else {
        serializer.serialize_str("-inf")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VariantReport {
    /// `uncached`, `steps-25`, `fastcache-e0.05`, `fbcache-0.1`, ...
    pub id: String,
    /// `uncached`, `steps`, `fastcache`, `fbcache`, `teacache`, `interval`.
    pub policy: String,
    pub setting: String,
    pub steps: usize,
    /// Model calls of one sampling run (Heun makes two a step).
    pub calls: usize,
    pub parameters: serde_json::Value,
    /// Median over runs of the run's wall time over its samples.
    #[serde(serialize_with = "number")]
    pub seconds_per_image: f64,
    #[serde(serialize_with = "number")]
    pub seconds_per_run_mean: f64,
    /// Median over batches of t(uncached) / t(variant), same seeds.
    #[serde(serialize_with = "number")]
    pub speedup: f64,
    /// The cost model's FLOP ratio for the skip pattern that happened.
    #[serde(serialize_with = "number")]
    pub speedup_flops: f64,
    /// What calibration predicted the FLOP speedup would be (calibrated FastCache settings).
    pub predicted_speedup_flops: Option<f64>,
    /// Skipped (step, block) slots over all slots.
    pub skip_rate: f64,
    pub state_bytes: u64,
    /// The variant measured on its own in a child process: resident set before its engine was
    /// opened, after loading, and at the peak of one sampling run at the bench's batch.
    pub engine_memory: Option<EngineMemory>,
    /// The bench process's own resident-set peak during the variant's runs (every loaded model
    /// and the bench's buffers included).
    pub peak_rss_bytes: u64,
    pub rss_before_bytes: u64,
    #[serde(serialize_with = "number")]
    pub psnr_mean: f64,
    #[serde(serialize_with = "number")]
    pub psnr_min: f64,
    #[serde(serialize_with = "number")]
    pub ssim_mean: f64,
    #[serde(serialize_with = "number")]
    pub ssim_min: f64,
    /// Fréchet distance of the classifier's features against the real-data reference.
    pub fd: Option<f64>,
    /// Share of samples the classifier assigns the class they were asked for.
    pub accuracy: Option<f64>,
    /// Timed runs.
    pub runs: usize,
    /// Samples compared.
    pub samples: usize,
    /// [step][block]: share of runs that skipped the block at the step.
    pub skip_map: Vec<Vec<f64>>,
    pub notes: Vec<String>,
}

impl VariantReport {
    /// Whether the variant samples the original model (the reference, fewer steps, another
    /// solver) rather than a rewrite of it.
    pub fn is_original_model(&self) -> bool {
        is_original_policy(&self.policy)
    }
}

/// Whether a policy samples the original model: the reference, fewer steps, another solver.
pub fn is_original_policy(policy: &str) -> bool {
    use clap::ValueEnum;
    matches!(policy, "uncached" | "steps")
        || crate::sampler::SamplerKind::value_variants()
            .iter()
            .any(|k| k.name() == policy)
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub engine: String,
    pub provider: String,
    pub threads: String,
    pub sampler: String,
    pub steps: usize,
    pub samples: usize,
    pub batch: usize,
    pub guidance: Option<f32>,
    /// First and last evaluation seed.
    pub seeds: [u64; 2],
    pub repeats: usize,
    pub blocks: usize,
    pub flops_per_sample_per_call: u64,
    /// How PSNR and SSIM compare samples.
    pub fidelity: String,
    pub classifier: Option<serde_json::Value>,
    pub memory_note: String,
    pub timing_note: String,
    pub variants: Vec<VariantReport>,
    /// Families asked for that could not run here, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
    /// Each family's fidelity at a few measured speedups, interpolated along its points.
    pub pareto: Vec<ParetoRow>,
    /// The first batch of every variant, for the samples figure.
    #[serde(skip)]
    pub first_batches: BTreeMap<String, ArrayD<f32>>,
}

/// The measured speedups the Pareto summary reads every family at.
pub const PARETO_SPEEDUPS: [f64; 3] = [2.0, 3.0, 4.0];

/// One family's fidelity at one measured speedup.
#[derive(Clone, Debug, Serialize)]
pub struct ParetoPoint {
    pub policy: String,
    pub psnr: f64,
    pub fd: Option<f64>,
}

/// Every family whose points span one speedup, and the best of them.
#[derive(Clone, Debug, Serialize)]
pub struct ParetoRow {
    pub speedup: f64,
    pub families: Vec<ParetoPoint>,
    pub best_psnr: Option<String>,
    pub best_fd: Option<String>,
}

/// Linear interpolation of `value` at speedup `x` between the two neighbouring points of a
/// family, sorted by measured speedup; `None` where the points do not reach `x` on both sides
/// (or the value is missing at either neighbour).
fn interpolate(
    points: &[&VariantReport],
    x: f64,
    value: impl Fn(&VariantReport) -> Option<f64>,
) -> Option<f64> {
    let mut sorted: Vec<&VariantReport> = points
        .iter()
        .copied()
        .filter(|v| v.speedup.is_finite())
        .collect();
    sorted.sort_by(|a, b| a.speedup.total_cmp(&b.speedup));
    let pair = sorted
        .windows(2)
        .find(|w| w[0].speedup <= x && x <= w[1].speedup)?;
    let (a, b) = (pair[0], pair[1]);
    let (ya, yb) = (value(a)?, value(b)?);
    if !(ya.is_finite() && yb.is_finite()) {
        return None;
    }
    let span = b.speedup - a.speedup;
    Some(if span <= 0.0 {
        ya
    } else {
        ya + (yb - ya) * (x - a.speedup) / span
    })
}

/// The policy families of a report, in the order of its variants, the uncached reference left
/// out.
fn families(variants: &[VariantReport]) -> Vec<&str> {
    let mut policies: Vec<&str> = Vec::new();
    for v in variants {
        if v.policy != "uncached" && !policies.contains(&v.policy.as_str()) {
            policies.push(&v.policy);
        }
    }
    policies
}

/// The Pareto summary: at each of [`PARETO_SPEEDUPS`], each family's PSNR and Fréchet distance
/// interpolated along its own points (a family counts only where its points span that speed),
/// and the family that is best by each.
pub fn pareto(variants: &[VariantReport]) -> Vec<ParetoRow> {
    let policies = families(variants);
    PARETO_SPEEDUPS
        .iter()
        .map(|&x| {
            let families: Vec<ParetoPoint> = policies
                .iter()
                .filter_map(|p| {
                    let points: Vec<&VariantReport> =
                        variants.iter().filter(|v| v.policy == *p).collect();
                    let psnr = interpolate(&points, x, |v| Some(v.psnr_mean))?;
                    Some(ParetoPoint {
                        policy: p.to_string(),
                        psnr,
                        fd: interpolate(&points, x, |v| v.fd),
                    })
                })
                .collect();
            let best_psnr = families
                .iter()
                .max_by(|a, b| a.psnr.total_cmp(&b.psnr))
                .map(|f| f.policy.clone());
            let best_fd = families
                .iter()
                .filter_map(|f| Some((f, f.fd?)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(f, _)| f.policy.clone());
            ParetoRow {
                speedup: x,
                families,
                best_psnr,
                best_fd,
            }
        })
        .collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// Bytes in the unit that keeps small states readable.
fn size(bytes: u64) -> String {
    if bytes == 0 {
        "0".into()
    } else if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn db(value: f64) -> String {
    if value.is_infinite() && value > 0.0 {
        "∞".into()
    } else if value.is_nan() {
        "–".into()
    } else {
        format!("{value:.2}")
    }
}

impl Report {
    pub fn variant(&self, id: &str) -> Option<&VariantReport> {
        self.variants.iter().find(|v| v.id == id)
    }

    /// The results table, one row per variant.
    pub fn markdown_table(&self) -> String {
        let with_classifier = self.classifier.is_some();
        let mut out = String::new();
        let _ = write!(
            out,
            "| policy | setting | steps | ms / image | speedup | FLOP speedup | skip rate | PSNR dB (mean / min) | SSIM (mean / min) |"
        );
        if with_classifier {
            let _ = write!(out, " FD | accuracy |");
        }
        let _ = writeln!(out, " state | memory MiB |");
        let columns = 9 + if with_classifier { 2 } else { 0 } + 2;
        let _ = writeln!(out, "|{}", "---|".repeat(columns));
        for v in &self.variants {
            let _ = write!(
                out,
                "| {} | {} | {} | {:.2} | {:.2}x | {:.2}x | {:.1}% | {} / {} | {:.4} / {:.4} |",
                v.policy,
                v.setting,
                v.steps,
                v.seconds_per_image * 1e3,
                v.speedup,
                v.speedup_flops,
                100.0 * v.skip_rate,
                db(v.psnr_mean),
                db(v.psnr_min),
                v.ssim_mean,
                v.ssim_min
            );
            if with_classifier {
                let _ = write!(
                    out,
                    " {} | {} |",
                    v.fd.map_or("–".into(), |f| format!("{f:.2}")),
                    v.accuracy
                        .map_or("–".into(), |a| format!("{:.1}%", 100.0 * a))
                );
            }
            let _ = writeln!(
                out,
                " {} | {} |",
                size(v.state_bytes),
                v.engine_memory
                    .map_or("–".into(), |m| mib(m.engine_bytes()))
            );
        }
        out
    }

    /// The Pareto summary as a Markdown table: one row per speedup, PSNR / FD per family.
    pub fn pareto_markdown(&self) -> String {
        // Families in the table's order, those that count at some speed.
        let mut policies = families(&self.variants);
        policies.retain(|p| {
            self.pareto
                .iter()
                .any(|row| row.families.iter().any(|f| f.policy == *p))
        });
        let mut out = String::new();
        if policies.is_empty() {
            let _ = writeln!(
                out,
                "No family's points span 2x, 3x or 4x measured speedup."
            );
            return out;
        }
        let _ = write!(out, "| measured speedup |");
        for p in &policies {
            let _ = write!(out, " {p} |");
        }
        let _ = writeln!(out, " best by PSNR | best by FD |");
        let _ = writeln!(out, "|{}", "---|".repeat(policies.len() + 3));
        for row in &self.pareto {
            let _ = write!(out, "| {:.0}x |", row.speedup);
            for p in &policies {
                match row.families.iter().find(|f| f.policy == *p) {
                    Some(f) => {
                        let _ = write!(
                            out,
                            " {} dB / {} |",
                            db(f.psnr),
                            f.fd.map_or("–".into(), |fd| format!("{fd:.2}"))
                        );
                    }
                    None => out.push_str(" – |"),
                }
            }
            let _ = writeln!(
                out,
                " {} | {} |",
                row.best_psnr.as_deref().unwrap_or("–"),
                row.best_fd.as_deref().unwrap_or("–")
            );
        }
        out
    }

    /// Calibration held to its word: the FLOP speedup each calibrated setting predicted against
    /// the one the bench counted.
    pub fn calibration_markdown(&self) -> Option<String> {
        let rows: Vec<&VariantReport> = self
            .variants
            .iter()
            .filter(|v| v.predicted_speedup_flops.is_some())
            .collect();
        if rows.is_empty() {
            return None;
        }
        let mut out = String::from(
            "| setting | predicted FLOP speedup | measured FLOP speedup | measured / predicted | measured speedup |\n|---|---|---|---|---|\n",
        );
        for v in rows {
            let predicted = v.predicted_speedup_flops.unwrap_or(f64::NAN);
            let _ = writeln!(
                out,
                "| {} {} | {:.2}x | {:.2}x | {:.3} | {:.2}x |",
                v.policy,
                v.setting,
                predicted,
                v.speedup_flops,
                v.speedup_flops / predicted,
                v.speedup
            );
        }
        Some(out)
    }

    /// How the variant with the largest state differs in memory from the uncached model.
    fn memory_comparison(&self) -> Option<String> {
        let uncached = self.variant("uncached")?.engine_memory?;
        let largest = self
            .variants
            .iter()
            .filter(|v| v.engine_memory.is_some())
            .max_by_key(|v| v.state_bytes)
            .filter(|v| v.state_bytes > 0)?;
        let memory = largest.engine_memory?;
        Some(format!(
            "{} ({}) measures {} MiB against the uncached model's {} MiB: {:+.1} MiB, for a state of {} (the state is held as inputs and as outputs of every call, and the host keeps the last outputs)",
            largest.id,
            largest.setting,
            mib(memory.engine_bytes()),
            mib(uncached.engine_bytes()),
            (memory.engine_bytes() as f64 - uncached.engine_bytes() as f64) / (1u64 << 20) as f64,
            size(largest.state_bytes)
        ))
    }

    /// The whole Markdown report: set-up, table, notes.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# fastcache bench: {}\n", self.model);
        let _ = writeln!(
            out,
            "- engine: {}, provider {}, {}",
            self.engine, self.provider, self.threads
        );
        let _ = writeln!(out, "- sampler: {}", self.sampler);
        let _ = writeln!(
            out,
            "- {} samples per variant in batches of {} (seeds {}..={}), {} repeat(s); {} blocks, {} FLOPs per sample per call",
            self.samples,
            self.batch,
            self.seeds[0],
            self.seeds[1],
            self.repeats,
            self.blocks,
            self.flops_per_sample_per_call
        );
        let _ = writeln!(
            out,
            "- PSNR, SSIM: against the uncached sample from the same seed; {}",
            self.fidelity
        );
        if let Some(c) = &self.classifier {
            let _ = writeln!(
                out,
                "- FD: Fréchet distance of the classifier's {} features ({}) against the reference statistics ({}, {} real images; real-vs-real floor {}); accuracy: the classifier's argmax equals the class asked for",
                c["features"],
                c["model"].as_str().unwrap_or("?"),
                c["reference"].as_str().unwrap_or("?"),
                c["reference_count"],
                c["reference_fd_real_floor"]
                    .as_f64()
                    .map_or("unknown".into(), |f| format!("{f:.2}"))
            );
        }
        for line in &self.left_out {
            let _ = writeln!(out, "- left out: {line}");
        }
        let _ = writeln!(out, "- timing: {}", self.timing_note);
        let _ = writeln!(out, "- memory: {}", self.memory_note);
        if let Some(line) = self.memory_comparison() {
            let _ = writeln!(out, "- memory of the largest state: {line}");
        }
        let _ = writeln!(out);
        out.push_str(&self.markdown_table());
        let _ = writeln!(
            out,
            "\n## Pareto summary\n\nPSNR / FD of each family at a measured speedup, interpolated linearly between its two neighbouring points (a family counts only where its points span that speed).\n"
        );
        out.push_str(&self.pareto_markdown());
        if let Some(table) = self.calibration_markdown() {
            let _ = writeln!(
                out,
                "\n## Calibration held to its word\n\nThe FLOP speedup `calibrate` predicted for each setting (the rewritten model's test replayed on the calibration runs) against the one this bench counted.\n"
            );
            out.push_str(&table);
        }
        let notes: Vec<String> = self
            .variants
            .iter()
            .flat_map(|v| v.notes.iter().map(move |n| format!("- {}: {n}", v.id)))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
        }
        out
    }

    /// Writes report.json, report.md, speed_vs_fidelity.png, skip_maps.png and (for pixel-space
    /// models) samples.png into `dir`. Returns the files written.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut written = Vec::new();
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", json.display()))?;
        written.push(json);
        let md = dir.join("report.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("cannot write {}", md.display()))?;
        written.push(md);

        let rows: Vec<(String, ndarray::ArrayView4<f32>)> = self
            .variants
            .iter()
            .filter_map(|v| {
                let images = self.first_batches.get(&v.id)?;
                let view = images.view().into_dimensionality::<ndarray::Ix4>().ok()?;
                matches!(view.shape()[1], 1 | 3).then(|| (v.id.clone(), view))
            })
            .collect();
        let plotted: Vec<plot::Plotted> = self.variants.iter().map(plot::Plotted::from).collect();
        written.extend(plot::write_figures(
            dir,
            &plotted,
            self.classifier.is_some(),
            &rows,
        )?);
        Ok(written)
    }
}
