//! Process memory as Linux reports it in /proc/self/status: the resident set (VmRSS) and its
//! high-water mark (VmHWM). Writing "5" to /proc/self/clear_refs resets the high-water mark to the
//! current resident set, which turns VmHWM into "the peak during this run" rather than "the peak
//! since the process started". Where the reset is refused (older kernels, restricted /proc) the
//! high-water mark is the process-lifetime peak, and the report says so.

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
