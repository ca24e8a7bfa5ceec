//! What the heartbeat reports about the worker's memory.

use lorafleet_common::protocol::Resources;
use std::sync::{Arc, Mutex};

/// Device-memory figures written by the compute thread (the only one bound to the device)
/// and read by the heartbeat.
#[derive(Clone, Default)]
pub(crate) struct Shared(Arc<Mutex<Resources>>);

impl Shared {
    /// Records device memory in use and the device's size; keeps the peak.
    pub(crate) fn set_device(&self, used: u64, total: u64) {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        r.device_used_bytes = used;
        r.device_peak_bytes = r.device_peak_bytes.max(used);
        r.device_total_bytes = total;
    }

    /// The figures now, with a fresh resident set size.
    pub(crate) fn snapshot(&self) -> Resources {
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        r.rss_bytes = resident_bytes();
        r
    }
}

/// Resident set size of this process (0 where /proc is not there).
pub(crate) fn resident_bytes() -> u64 {
    process_status_bytes("VmRSS").unwrap_or(0)
}

/// A memory figure of this process from Linux's /proc/self/status (`VmRSS`, `VmHWM`, ...).
pub fn process_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Device memory (used, total) of the current CUDA context, when there is one.
#[cfg(feature = "cuda")]
pub(crate) fn device_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    if !device.is_cuda() {
        return None;
    }
    let (free, total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
    Some(((total - free) as u64, total as u64))
}

/// Device memory (used, total): none without CUDA.
#[cfg(not(feature = "cuda"))]
pub(crate) fn device_memory(_device: &candle_core::Device) -> Option<(u64, u64)> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn memory_figures_come_from_proc() {
        let rss = super::process_status_bytes("VmRSS").unwrap();
        let peak = super::process_status_bytes("VmHWM").unwrap();
        assert!(rss > 0 && peak >= rss, "rss {rss}, peak {peak}");
        // A prefix of another field's name is not that field.
        assert_eq!(super::process_status_bytes("VmR"), None);
    }
}
