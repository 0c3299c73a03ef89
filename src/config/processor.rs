//! Processor configs (`batch`, `memory_limiter`) and their checks.
use serde::{Deserialize, Serialize};

use super::Processor;
use super::duration::GoDuration;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct BatchConfig {
    pub(crate) send_batch_size: usize,
    /// 0 means no upper bound.
    pub(crate) send_batch_max_size: usize,
    pub(crate) timeout: GoDuration,
    /// Accepted for collector compatibility; batches are always partitioned by destination.
    pub(crate) metadata_keys: Vec<String>,
    pub(crate) metadata_cardinality_limit: Option<u32>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            send_batch_size: 8192,
            send_batch_max_size: 0,
            timeout: GoDuration::millis(200),
            metadata_keys: Vec::new(),
            metadata_cardinality_limit: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MemoryLimiterConfig {
    pub(crate) check_interval: GoDuration,
    pub(crate) limit_mib: u64,
    pub(crate) spike_limit_mib: u64,
    /// Of the cgroup's memory limit, else of total memory; limit_mib wins when both are set.
    pub(crate) limit_percentage: u64,
    pub(crate) spike_limit_percentage: u64,
}

/// groupbytrace: holds spans by trace id and lets a trace go as one unit (see
/// `processor::groupbytrace`). The collector's keys, plus ours from `release_on_root` on.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct GroupByTraceConfig {
    /// A trace leaves this long after its last span arrived.
    pub(crate) wait_duration: GoDuration,
    /// At most this many traces held; the oldest leaves (whole, never dropped) past it.
    pub(crate) num_traces: usize,
    /// Accepted for collector compatibility: one task per exporter does the work.
    pub(crate) num_workers: Option<u32>,
    pub(crate) release_on_root: bool,
    /// How long after its root a trace still waits for stragglers.
    pub(crate) root_grace: GoDuration,
    /// No trace is held longer than this in all.
    pub(crate) max_hold: GoDuration,
}

impl Default for GroupByTraceConfig {
    fn default() -> Self {
        GroupByTraceConfig {
            wait_duration: GoDuration::secs(1),
            num_traces: 1_000_000,
            num_workers: None,
            release_on_root: true,
            root_grace: GoDuration::millis(100),
            max_hold: GoDuration::secs(60),
        }
    }
}

/// Checks processor `id`; problems go to `err` with their YAML path.
pub(super) fn validate(id: &str, p: &Processor, err: &mut dyn FnMut(String, String)) {
    let path = format!("processors.{id}");
    match p {
        Processor::Batch(b) => {
            if b.send_batch_size == 0 {
                err(format!("{path}.send_batch_size"), "must be at least 1".into());
            }
            if b.send_batch_max_size != 0 && b.send_batch_max_size < b.send_batch_size {
                err(
                    format!("{path}.send_batch_max_size"),
                    format!(
                        "must be 0 (no limit) or at least send_batch_size ({})",
                        b.send_batch_size
                    ),
                );
            }
        }
        Processor::MemoryLimiter(m) => validate_memory_limiter(&path, m, err),
        Processor::GroupByTrace(g) => {
            for (key, d) in [("wait_duration", g.wait_duration), ("max_hold", g.max_hold)] {
                if d.is_zero() {
                    err(format!("{path}.{key}"), "must be above 0".into());
                }
            }
            if g.max_hold < g.wait_duration {
                err(format!("{path}.max_hold"), "must be at least wait_duration".into());
            }
            if g.num_traces == 0 {
                err(format!("{path}.num_traces"), "must be at least 1".into());
            }
        }
        Processor::Registered(r) => r.config.validate(&path, err),
    }
}

impl MemoryLimiterConfig {
    /// (limit, spike limit) in MiB: limit_mib when set, else the percentages of the memory
    /// available to the process (cgroup limit, else total), as the collector.
    pub(crate) fn effective_mib(&self) -> (u64, u64) {
        if self.limit_mib != 0 {
            return (self.limit_mib, self.spike_limit_mib);
        }
        let total_mib = super::memory::available_bytes().unwrap_or(0) >> 20;
        (
            total_mib * self.limit_percentage / 100,
            total_mib * self.spike_limit_percentage / 100,
        )
    }
}

fn validate_memory_limiter(path: &str, m: &MemoryLimiterConfig, err: &mut dyn FnMut(String, String)) {
    if m.limit_mib == 0 && m.limit_percentage == 0 {
        err(
            format!("{path}.limit_mib"),
            "set limit_mib (MiB of span data held in the relay) or limit_percentage".into(),
        );
    }
    for (key, pct) in [
        ("limit_percentage", m.limit_percentage),
        ("spike_limit_percentage", m.spike_limit_percentage),
    ] {
        if pct > 100 {
            err(format!("{path}.{key}"), "must be between 0 and 100".into());
        }
    }
    if m.limit_mib == 0 && m.limit_percentage != 0 {
        if m.spike_limit_percentage >= m.limit_percentage {
            err(
                format!("{path}.spike_limit_percentage"),
                "must be below limit_percentage".into(),
            );
        }
        if super::memory::available_bytes().is_none() {
            err(
                format!("{path}.limit_percentage"),
                "cannot read this machine's memory (cgroup or /proc/meminfo): set limit_mib".into(),
            );
        }
    }
    if m.spike_limit_mib >= m.limit_mib && m.limit_mib != 0 {
        err(format!("{path}.spike_limit_mib"), "must be below limit_mib".into());
    }
}
