//! The calibration file: what `fastcache calibrate` measured and fitted, and what
//! `fastcache rewrite --calibration` bakes into a model. A JSON file people and scripts can read,
//! plus a binary file beside it (`<name>.bin`, little-endian f32) holding the correction weights;
//! the JSON gives each tensor's offset and shape, so `numpy.fromfile` reads them too.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::analysis::DitStack;
use crate::cache::Correction;
use crate::error::{Error, Result};
use crate::onnx::write_atomically;

pub const CALIBRATION_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Calibration {
    pub version: u32,
    /// The structure this was measured on; a model with another structure is refused.
    pub fingerprint: String,
    /// How the data was recorded (sampler, steps, runs, seeds), for the record.
    pub recording: serde_json::Value,
    /// What κ was chosen for: {"error": ε} or {"skip_rate": r}.
    pub target: serde_json::Value,
    pub blocks: Vec<BlockCalibration>,
    /// Token selection's static-token correction; absent in files written before token selection
    /// existed, which therefore still load (static tokens then reuse their last output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_tokens: Option<StaticTokensCalibration>,
    /// FastCache's per-step policy (`calibrate --target-speedup`): which steps compute and the
    /// forecast weights of the others. A calibration with a schedule and no blocks builds that
    /// policy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleCalibration>,
    /// FastCache's per-step policy with its probe test (`calibrate --target-speedup S --decision
    /// probe`). Like a schedule, it builds that policy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeCalibration>,
}

/// A calibrated probe test (see [`crate::cache::step::ProbeGate`]) and what calibration measured
/// about it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeCalibration {
    /// Per step: always compute.
    pub forced: Vec<bool>,
    /// Per step: skip while the probe's relative squared forecast error is at most this.
    pub thresholds: Vec<f32>,
    /// Per step: the fitted step along the extrapolated line.
    pub gamma: Vec<f32>,
    pub max_run: i64,
    /// The stated false-skip rate: the share of bad steps (stack forecast error above the
    /// tolerance) the test lets through.
    pub alpha: f64,
    /// The stack's relative forecast error above which a step is bad; searched for the target.
    pub tolerance: f64,
    pub target_speedup: f64,
    /// The mean FLOP speedup of the gate on the calibration runs, as `fastcache bench` counts it.
    pub predicted_speedup: f64,
    /// Measured with the gate fitted on one half of the runs and run on the other, both ways,
    /// over every (step, last computed steps) the gate can meet: the bad cases, how many pass
    /// the test, and their ratio, the false-skip rate α states (absent when there were none).
    pub held_out_bad_cases: usize,
    pub held_out_passed_bad_cases: usize,
    pub held_out_false_skip_rate: Option<f64>,
    /// The same in the runs as the gate makes them: bad steps met and skipped.
    pub held_out_bad_steps: usize,
    pub held_out_false_skips: usize,
    pub held_out_speedup: f64,
}

impl ProbeCalibration {
    pub fn policy(&self) -> crate::cache::step::ProbeGate {
        crate::cache::step::ProbeGate {
            forced: self.forced.clone(),
            thresholds: self.thresholds.clone(),
            gamma: self.gamma.clone(),
            max_run: self.max_run,
        }
    }
}

/// A calibrated compute schedule (see [`crate::cache::step::Schedule`]) and what calibration measured
/// about it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScheduleCalibration {
    /// Per step: the stack runs.
    pub compute: Vec<bool>,
    /// Per step, the forecast weights of the last computed residuals, most recent first.
    pub weights: Vec<Vec<f32>>,
    /// The forecaster that won on held-out runs: reuse, lagrange or least_squares.
    pub forecaster: String,
    pub target_speedup: f64,
    /// The FLOP speedup of this schedule as `fastcache bench` counts it.
    pub predicted_speedup: f64,
    /// Mean ‖R − R̂‖/‖R‖ over the skipped steps on the calibration runs.
    pub relative_error: f64,
    /// Every forecaster's held-out error, for the record.
    pub candidates: serde_json::Value,
    /// With a PSNR target (`calibrate --target-psnr`): the mean PSNR against the uncached model
    /// measured on validation runs the schedule was not fitted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_psnr: Option<f64>,
}

impl ScheduleCalibration {
    pub fn policy(&self) -> crate::cache::step::Schedule {
        crate::cache::step::Schedule {
            compute: self.compute.clone(),
            weights: self.weights.clone(),
        }
    }
}

/// The fit of a static token's stack output change on its input change since it last ran:
/// H_L(t) − H_L(s) ≈ (X(t) − X(s))·W_s + b_s, token by token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StaticTokensCalibration {
    /// RMS error of a static token's output, relative to the stack output's RMS, with pure reuse
    /// and with the fitted correction, over the calibration pairs.
    pub relative_error_reuse: f64,
    pub relative_error_corrected: f64,
    pub weight: Option<TensorRef>,
    pub bias: Option<TensorRef>,
    #[serde(skip)]
    pub correction: Option<Correction>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockCalibration {
    pub index: usize,
    /// Relative change scale for the χ² test (σ²_l = κ_l · mean(R_in²)).
    pub kappa: f32,
    /// RMS error of a skip's output, relative to the block output's RMS, with pure residual reuse
    /// and with the fitted correction, over the calibration pairs.
    pub relative_error_residual: f64,
    pub relative_error_corrected: f64,
    /// The share of steps the test would skip on the calibration runs (before the skip cap).
    pub expected_skip_rate: f64,
    pub weight: Option<TensorRef>,
    pub bias: Option<TensorRef>,
    #[serde(skip)]
    pub correction: Option<Correction>,
}

/// Where a tensor sits in the binary file: element offset (f32 elements) and shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorRef {
    pub offset: usize,
    pub shape: Vec<usize>,
}

/// A structure's identity for calibration purposes: block count, token count, hidden size and
/// each block's parameter count. Names are left out so a renamed export still matches.
pub fn fingerprint(stack: &DitStack) -> String {
    let params: Vec<String> = stack
        .blocks
        .iter()
        .map(|b| b.parameter_count.to_string())
        .collect();
    format!(
        "blocks={};tokens={};hidden={};block_parameters=[{}]",
        stack.blocks.len(),
        stack.tokens.map_or("?".into(), |n| n.to_string()),
        stack.hidden.map_or("?".into(), |d| d.to_string()),
        params.join(",")
    )
}

fn binary_path(json: &Path) -> PathBuf {
    json.with_extension("bin")
}

impl Calibration {
    /// Writes `path` (JSON) and, when there are tensors, the binary file beside it, each through a
    /// temporary file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut record = self.clone();
        let mut data: Vec<f32> = Vec::new();
        for block in &mut record.blocks {
            if let Some(c) = &block.correction {
                let d = c.bias.len();
                block.weight = Some(TensorRef {
                    offset: data.len(),
                    shape: vec![d, d],
                });
                data.extend_from_slice(&c.weight);
                block.bias = Some(TensorRef {
                    offset: data.len(),
                    shape: vec![d],
                });
                data.extend_from_slice(&c.bias);
            }
        }
        if let Some(tokens) = &mut record.static_tokens
            && let Some(c) = &tokens.correction
        {
            let d = c.bias.len();
            tokens.weight = Some(TensorRef {
                offset: data.len(),
                shape: vec![d, d],
            });
            data.extend_from_slice(&c.weight);
            tokens.bias = Some(TensorRef {
                offset: data.len(),
                shape: vec![d],
            });
            data.extend_from_slice(&c.bias);
        }
        let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Invalid(e.to_string()))?;
        // A schedule-only calibration has no tensors, and so no binary file.
        if !data.is_empty() {
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            write_atomically(&binary_path(path), &bytes)?;
        }
        write_atomically(path, &json)
    }

    pub fn load(path: &Path) -> Result<Calibration> {
        let json = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut calibration: Calibration =
            serde_json::from_slice(&json).map_err(|e| Error::Decode {
                path: path.into(),
                message: format!("not a fastcache calibration file: {e}"),
            })?;
        if calibration.version != CALIBRATION_VERSION {
            return Err(Error::Unsupported(format!(
                "{}: calibration version {}; this fastcache reads version {CALIBRATION_VERSION}",
                path.display(),
                calibration.version
            )));
        }
        let bin = binary_path(path);
        let needs_data = calibration.blocks.iter().any(|b| b.weight.is_some())
            || calibration
                .static_tokens
                .as_ref()
                .is_some_and(|t| t.weight.is_some());
        let data: Vec<f32> = if needs_data {
            let bytes = std::fs::read(&bin).map_err(|e| Error::io(&bin, e))?;
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            Vec::new()
        };
        let slice = |t: &TensorRef| -> Result<Vec<f32>> {
            let len: usize = t.shape.iter().product();
            data.get(t.offset..t.offset + len)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| Error::Decode {
                    path: bin.clone(),
                    message: format!(
                        "tensor at {} of shape {:?} is outside the file",
                        t.offset, t.shape
                    ),
                })
        };
        for block in &mut calibration.blocks {
            if let (Some(w), Some(b)) = (&block.weight, &block.bias) {
                block.correction = Some(Correction {
                    weight: slice(w)?,
                    bias: slice(b)?,
                });
            }
        }
        if let Some(tokens) = &mut calibration.static_tokens
            && let (Some(w), Some(b)) = (&tokens.weight, &tokens.bias)
        {
            tokens.correction = Some(Correction {
                weight: slice(w)?,
                bias: slice(b)?,
            });
        }
        Ok(calibration)
    }
}
