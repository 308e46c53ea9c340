//! Process memory as Linux reports it in /proc/self/status: the resident set (VmRSS) and its
//! high-water mark (VmHWM). Writing "5" to /proc/self/clear_refs resets the high-water mark to the
//! current resident set, which turns VmHWM into "the peak during this run" rather than "the peak
//! since the process started". Where the reset is refused (older kernels, restricted /proc) the
//! high-water mark is the process-lifetime peak, and the report says so.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::engine::{self, EngineKind, ModelSpec, Options};
use crate::sampler::{self, SamplerSetup, Settings};

/// Resident set size and its high-water mark, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
}

/// Reads VmRSS and VmHWM; `None` where /proc is not there (not Linux).
pub fn read() -> Option<Memory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// Resets the high-water mark to the current resident set; false where the kernel refused.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One sampling run to measure in a process of its own, so that nothing else the bench holds
/// (other variants' sessions, its buffers) is counted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeRequest {
    pub model: PathBuf,
    /// The model's host split, run instead of the single graph (`bench --split`).
    #[serde(default)]
    pub split: Option<PathBuf>,
    pub engine: EngineKind,
    pub threads: Option<usize>,
    pub settings: Settings,
    pub batch: usize,
    pub labels: Vec<i64>,
    pub seed: u64,
}

/// What one engine costs for one model: the process's resident set before the engine was
/// opened, after it loaded the model, and its peak during one sampling run, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineMemory {
    pub baseline: u64,
    pub loaded: u64,
    pub peak: u64,
}

impl EngineMemory {
    /// Bytes the engine added for this model at its peak: weights, session, arena, state.
    pub fn engine_bytes(&self) -> u64 {
        self.peak.saturating_sub(self.baseline)
    }
}

/// Measures `request` in this process (what the child of [`probe_in_child`] runs).
pub fn probe(request: &ProbeRequest) -> anyhow::Result<EngineMemory> {
    let (model, spec): (_, ModelSpec) = ModelSpec::load(&request.model)?;
    let setup = SamplerSetup::new(&spec, Some(&model), &request.settings)?;
    drop(model);
    reset_peak();
    let baseline = read().context("this system does not report memory (/proc/self/status)")?;
    let options = Options {
        threads: request.threads,
        ..Options::default()
    };
    let mut engine = match &request.split {
        Some(dir) => engine::split::open(request.engine, dir, spec.clone(), &options)?,
        None => engine::open(request.engine, &request.model, &options)?,
    };
    let loaded = read().unwrap_or_default();
    sampler::sample_seeded(
        engine.as_mut(),
        &setup,
        request.batch,
        &request.labels,
        request.seed,
        &mut |_| {},
    )?;
    let after = read().unwrap_or_default();
    Ok(EngineMemory {
        baseline: baseline.rss,
        loaded: loaded.rss,
        peak: after.peak.max(loaded.rss),
    })
}

/// Runs [`probe`] in a child process: `executable memory-probe`, the request as JSON on its
/// standard input, the result as JSON on its standard output.
/// How to start this program again in a child process, for [`probe_in_child`].
#[derive(Clone, Debug)]
pub struct ProbeCommand {
    pub program: PathBuf,
    /// Arguments before `memory-probe`.
    pub leading: Vec<String>,
}

impl ProbeCommand {
    /// This process's own command: the `fastcache` executable, or, where the command runs
    /// inside Python (the wheel's `fastcache` script sets `FASTCACHE_PROBE_PYTHON` to its
    /// interpreter), that interpreter with `-m fastcache`.
    pub fn this_process() -> Option<ProbeCommand> {
        if let Some(python) = std::env::var_os("FASTCACHE_PROBE_PYTHON").filter(|p| !p.is_empty()) {
            return Some(ProbeCommand {
                program: python.into(),
                leading: vec!["-m".into(), "fastcache".into()],
            });
        }
        Some(ProbeCommand {
            program: std::env::current_exe().ok()?,
            leading: Vec::new(),
        })
    }
}

pub fn probe_in_child(
    command: &ProbeCommand,
    request: &ProbeRequest,
) -> anyhow::Result<EngineMemory> {
    let executable = &command.program;
    let mut child = Command::new(executable)
        .args(&command.leading)
        .arg("memory-probe")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", executable.display()))?;
    let json = serde_json::to_vec(request)?;
    child
        .stdin
        .take()
        .context("the memory probe has no standard input")?
        .write_all(&json)?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "the memory probe of {} failed: {}",
            request.model.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "the memory probe of {} answered {:?}",
            request.model.display(),
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_forgets_a_peak_that_has_passed() {
        let Some(before) = read() else {
            return; // not Linux: nothing to measure
        };
        assert!(before.peak >= before.rss);
        let size = 64 << 20;
        {
            let mut block = vec![0u8; size];
            // Touch every page so it becomes resident; freeing a block this large unmaps it.
            for i in (0..size).step_by(4096) {
                block[i] = 1;
            }
            std::hint::black_box(&block);
        }
        let passed = read().unwrap();
        assert!(passed.peak >= before.rss + (size as u64) / 2, "{passed:?}");
        if reset_peak() {
            let after = read().unwrap();
            assert!(
                after.peak + (size as u64) / 2 <= passed.peak,
                "{after:?} {passed:?}"
            );
        }
    }
}
