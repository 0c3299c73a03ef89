//! groupbytrace's thin shell in an exporter's stage, between its intake (or spool reader) and
//! its batcher: cuts each record by trace id, holds the pieces in the pure core
//! ([`super::groupbytrace`]) and hands every released trace to the batcher as one group.
//!
//! It sits after the spool: a spooled record is released on disk only once delivered, so a
//! trace held here is still on disk and a SIGKILL loses nothing; the next start reads it again.
//! Without a spool, held pieces keep their memory charge, so they count in the memory_limiter's
//! budget; when that budget runs high the oldest traces leave as they are.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::groupbytrace::{HoldRules, PieceInfo, ReleaseReason, Released, TraceGroups};
use crate::batch::{Batch, Batcher};
use crate::pipeline::by_trace;
use crate::pipeline::{Destination, Item, MemoryBudget, Routed};
use crate::telemetry::{ExporterLabels, ExporterReasonLabels, Metrics, ProcessorHandles};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

type Piece = (Destination, Item);
type Out = Vec<Batch<Destination, Item>>;

/// Bytes a held piece costs beyond its record (the item, its index entries): counted against
/// the byte cap, so many tiny traces cannot hold many times the cap in bookkeeping.
const PIECE_OVERHEAD: usize = 256;

/// Records of more spans than this pass on ungrouped: a bulk import, not an agent's export (SDKs
/// send at most 512 spans a request by default), and cutting it into one piece per trace would
/// take memory in proportion to its traces.
const MAX_GROUPED_SPANS: usize = 8192;

/// A record groupbytrace cannot cut by trace is passed on whole: logged at most this often.
const UNCUT_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub(crate) struct GroupSettings {
    pub(crate) processor: String,
    pub(crate) rules: HoldRules,
    /// The pipeline's memory budgets, each with the use above which the oldest traces leave.
    pub(crate) budgets: Vec<(Arc<MemoryBudget>, usize)>,
}

pub(crate) struct Grouper {
    settings: GroupSettings,
    groups: TraceGroups<Piece>,
    exporter: String,
    /// Released traces by reason, in the order of `ReleaseReason::ALL`: registered once, every
    /// series present at zero from the start.
    released: [Counter; 5],
    /// Spans and traces held now: registered once, set after every change.
    held_spans: Gauge,
    held_traces: Gauge,
    /// The collector's processor item series: spans into the hold and out of it.
    items: Arc<ProcessorHandles>,
    uncut_logged: Option<Instant>,
}

impl Grouper {
    pub(crate) fn new(settings: GroupSettings, exporter: &str, metrics: Arc<Metrics>) -> Grouper {
        let labels = ExporterLabels {
            exporter: exporter.to_string(),
        };
        Grouper {
            held_spans: metrics.groupbytrace_held_spans.get_or_create(&labels).clone(),
            held_traces: metrics.groupbytrace_held_traces.get_or_create(&labels).clone(),
            items: metrics.processor(&settings.processor),
            groups: TraceGroups::new(settings.rules.clone()),
            settings,
            exporter: exporter.to_string(),
            released: ReleaseReason::ALL.map(|reason| {
                metrics
                    .groupbytrace_released_traces
                    .get_or_create(&ExporterReasonLabels {
                        exporter: exporter.to_string(),
                        reason: reason.label().to_string(),
                    })
                    .clone()
            }),
            uncut_logged: None,
        }
    }

    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.groups.next_due()
    }

    /// Holds a record's traces; returns the batches that what had to leave completed.
    pub(crate) fn take_in(&mut self, routed: &Routed, batcher: &mut Batcher<Destination, Item>, now: Instant) -> Out {
        let mut out = Vec::new();
        let item = &routed.item;
        self.items.incoming.inc_by(item.chunk.spans as u64);
        let cut = if item.chunk.spans > MAX_GROUPED_SPANS {
            Err(crate::pipeline::wire::DecodeError::Split(
                "a bulk record (over 8192 spans)",
            ))
        } else {
            by_trace::split_chunk(&item.chunk)
        };
        match cut {
            Ok(pieces) => {
                for (record, chunk) in pieces {
                    let info = PieceInfo {
                        spans: chunk.spans,
                        bytes: chunk.bytes.len() + PIECE_OVERHEAD,
                        has_root: record.has_root,
                    };
                    let piece = Item {
                        chunk,
                        charge: item.charge.clone(),
                        origin: item.origin,
                    };
                    let released = self
                        .groups
                        .add(record.trace_id, (routed.destination.clone(), piece), info, now);
                    self.feed(released, batcher, now, &mut out);
                }
            }
            Err(e) => {
                if self
                    .uncut_logged
                    .is_none_or(|t| now.saturating_duration_since(t) >= UNCUT_LOG_INTERVAL)
                {
                    self.uncut_logged = Some(now);
                    tracing::warn!(processor = %self.settings.processor, exporter = %self.exporter, spans = item.chunk.spans, error = %e, "cannot cut a record by trace; passing it on ungrouped");
                }
                self.items.outgoing.inc_by(item.chunk.spans as u64);
                out.extend(batcher.add(routed.destination.clone(), item.clone(), now));
            }
        }
        self.relieve(batcher, now, &mut out);
        self.show_held();
        out
    }

    /// Traces due at `now`.
    pub(crate) fn due(&mut self, batcher: &mut Batcher<Destination, Item>, now: Instant) -> Out {
        let mut out = Vec::new();
        let released = self.groups.due(now);
        self.feed(released, batcher, now, &mut out);
        self.show_held();
        out
    }

    /// Everything held, for shutdown.
    pub(crate) fn drain(&mut self, batcher: &mut Batcher<Destination, Item>, now: Instant) -> Out {
        let mut out = Vec::new();
        let released = self.groups.drain();
        self.feed(released, batcher, now, &mut out);
        self.show_held();
        out
    }

    fn show_held(&self) {
        self.held_spans
            .set(i64::try_from(self.groups.held_spans()).unwrap_or(i64::MAX));
        self.held_traces
            .set(i64::try_from(self.groups.held_traces()).unwrap_or(i64::MAX));
    }

    /// While a memory budget is above its mark, the oldest traces leave, as many bytes as the
    /// excess: they count until delivered, so releasing them is what frees the budget.
    fn relieve(&mut self, batcher: &mut Batcher<Destination, Item>, now: Instant, out: &mut Out) {
        let excess = self
            .settings
            .budgets
            .iter()
            .map(|(budget, mark)| budget.used().saturating_sub(*mark))
            .max()
            .unwrap_or(0);
        let mut freed = 0;
        while freed < excess {
            let Some(released) = self.groups.evict_oldest() else {
                break;
            };
            freed += released.bytes;
            self.feed(vec![released], batcher, now, out);
        }
    }

    /// Each released trace goes to the batcher as one group per destination.
    fn feed(
        &mut self,
        released: Vec<Released<Piece>>,
        batcher: &mut Batcher<Destination, Item>,
        now: Instant,
        out: &mut Out,
    ) {
        for trace in released {
            self.count(trace.reason);
            self.items.outgoing.inc_by(trace.spans as u64);
            let mut by_destination: Vec<(Destination, Vec<Item>)> = Vec::new();
            for (destination, item) in trace.pieces {
                match by_destination.iter_mut().find(|(d, _)| *d == destination) {
                    Some((_, items)) => items.push(item),
                    None => by_destination.push((destination, vec![item])),
                }
            }
            for (destination, items) in by_destination {
                out.extend(batcher.add_group(destination, items, now));
            }
        }
    }

    fn count(&self, reason: ReleaseReason) {
        let at = ReleaseReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.released[at].inc();
    }
}
