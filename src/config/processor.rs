//! Processor configs (`batch`, `memory_limiter`) and their checks.
use serde::{Deserialize, Serialize};

use super::Processor;
use super::duration::GoDuration;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub send_batch_size: usize,
    /// 0 means no upper bound.
    pub send_batch_max_size: usize,
    pub timeout: GoDuration,
    /// Accepted for collector compatibility; batches are always partitioned by destination.
    pub metadata_keys: Vec<String>,
    pub metadata_cardinality_limit: Option<u32>,
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
pub struct MemoryLimiterConfig {
    pub check_interval: GoDuration,
    pub limit_mib: u64,
    pub spike_limit_mib: u64,
    pub limit_percentage: u64,
    pub spike_limit_percentage: u64,
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
        Processor::MemoryLimiter(m) => {
            if m.limit_percentage != 0 || m.spike_limit_percentage != 0 {
                err(
                    format!("{path}.limit_percentage"),
                    "percentages of total memory are not supported; set limit_mib".into(),
                );
            } else if m.limit_mib == 0 {
                err(
                    format!("{path}.limit_mib"),
                    "must be set (MiB of span data held in the relay)".into(),
                );
            }
            if m.spike_limit_mib >= m.limit_mib && m.limit_mib != 0 {
                err(format!("{path}.spike_limit_mib"), "must be below limit_mib".into());
            }
        }
        Processor::Registered(r) => r.config.validate(&path, err),
    }
}
