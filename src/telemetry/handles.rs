//! Per-component metric handles: each series created once when its component starts, so hot
//! paths count without building label strings.
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The counters of one labelled family for one component, by reason: each created once, so the
/// hot path finds its counter by comparing a `&str`, without building label strings.
pub(crate) struct ReasonCounters {
    make: Box<dyn Fn(&str) -> Counter + Send + Sync>,
    by_reason: std::sync::RwLock<Vec<(String, Counter)>>,
}

impl ReasonCounters {
    pub(super) fn new(make: Box<dyn Fn(&str) -> Counter + Send + Sync>, known: &[&str]) -> ReasonCounters {
        let by_reason = known.iter().map(|r| (r.to_string(), make(r))).collect();
        ReasonCounters {
            make,
            by_reason: std::sync::RwLock::new(by_reason),
        }
    }

    pub(crate) fn inc_by(&self, reason: &str, n: u64) {
        let found = {
            let known = self.by_reason.read().unwrap_or_else(|e| e.into_inner());
            known.iter().find(|(r, _)| r == reason).map(|(_, c)| c.inc_by(n))
        };
        if found.is_none() {
            let counter = (self.make)(reason);
            counter.inc_by(n);
            let mut known = self.by_reason.write().unwrap_or_else(|e| e.into_inner());
            if !known.iter().any(|(r, _)| r == reason) {
                known.push((reason.to_string(), counter));
            }
        }
    }

    pub(crate) fn get(&self, reason: &str) -> u64 {
        let known = self.by_reason.read().unwrap_or_else(|e| e.into_inner());
        known.iter().find(|(r, _)| r == reason).map_or(0, |(_, c)| c.get())
    }
}

/// One receiver listener's metrics, registered once when it starts.
pub(crate) struct ReceiverHandles {
    pub(crate) receiver: String,
    pub(crate) transport: &'static str,
    pub(crate) accepted: Counter,
    pub(crate) refused: ReasonCounters,
    pub(crate) failed: Counter,
    /// Connections closed at accept, by reason.
    pub(crate) connections_refused: ReasonCounters,
    /// Connections the receiver closed on its client, by reason.
    pub(crate) connections_closed: ReasonCounters,
}

/// One exporter's metrics, registered once; the shutdown accounting reads these.
pub(crate) struct ExporterHandles {
    /// Spans refused because this exporter's queue or spool had no room.
    pub(crate) enqueue_failed: Counter,
    pub(crate) dead_letter: Counter,
    pub(crate) sent: Counter,
    pub(crate) send_failed: Counter,
    /// Every dropped span whatever the reason: a new reason cannot unbalance the accounting.
    pub(crate) dropped_total: Counter,
    pub(crate) dropped: ReasonCounters,
    /// Export attempts that will be retried, by reason.
    pub(crate) retries: ReasonCounters,
    pub(crate) unauthorized: Counter,
    pub(crate) export_duration: Histogram,
    pub(crate) poison_traces: Counter,
    pub(crate) isolation_requests: Counter,
    pub(crate) experiment_lookups: ReasonCounters,
}

/// One processor's item counters (the collector's processorhelper series), registered once.
#[derive(Debug)]
pub(crate) struct ProcessorHandles {
    pub(crate) incoming: Counter,
    pub(crate) outgoing: Counter,
    pub(crate) dropped: Counter,
}

/// A batch processor's series, looked up once per exporter stage that runs it.
pub(crate) struct BatchHandles {
    pub(crate) items: std::sync::Arc<ProcessorHandles>,
    pub(crate) size_trigger: Counter,
    pub(crate) timeout_trigger: Counter,
    pub(crate) send_size: Histogram,
}
