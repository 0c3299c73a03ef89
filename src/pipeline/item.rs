//! The items that flow through the pipeline and what they hold: a routed ResourceSpans chunk,
//! its destination, its share of the memory budget (Charge), and why a request may be refused.
//! Kept apart from admission (`Intake`) so the spool and the exporters can use them without
//! depending on the pipeline that feeds them.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::wire::{self, ResourceChunk};
use crate::batch::{BatchItem, Unsplit};

/// Where a batch goes beyond its exporter: the MLflow experiment (by id: the resource's
/// `mlflow.experiment_id` or the request's header; by name: the resource's
/// `mlflow.experiment_name`), the run and the workspace (the resource's `mlflow.run_id` and
/// `mlflow.workspace`, else the request's headers). Batches are kept apart by it; the exporter
/// decides the headers of each request from the records themselves (`export::route`), so a
/// record read back from the spool, which keeps only the ids, still goes where it should.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Destination {
    pub(crate) experiment: Option<Arc<str>>,
    pub(crate) experiment_name: Option<Arc<str>>,
    pub(crate) run: Option<Arc<str>>,
    pub(crate) workspace: Option<Arc<str>>,
}

/// What a request's headers say about its MLflow destination (honoured with include_metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestRouting {
    /// `x-mlflow-experiment-id`, a numeric id.
    pub(crate) experiment: Option<Arc<str>>,
    /// `x-mlflow-run-id`.
    pub(crate) run: Option<Arc<str>>,
    /// `x-mlflow-workspace`.
    pub(crate) workspace: Option<Arc<str>>,
}

impl RequestRouting {
    /// Only an experiment (or nothing), as tests and tools submit.
    pub(crate) fn experiment(experiment: Option<&str>) -> RequestRouting {
        RequestRouting {
            experiment: experiment.map(Arc::from),
            ..Default::default()
        }
    }
}

/// One ResourceSpans in flight, holding its share of the memory budget until delivered.
#[derive(Debug, Clone)]
pub struct Item {
    pub chunk: ResourceChunk,
    pub(crate) charge: Option<Arc<Charge>>,
    /// The spool segment this item was read from, released once it is delivered.
    pub(crate) origin: Option<u64>,
}

impl BatchItem for Item {
    fn spans(&self) -> usize {
        self.chunk.spans
    }
    fn split_pieces(self, first: usize, size: usize) -> Result<Vec<Self>, Unsplit<Self>> {
        match wire::split_chunk_pieces(&self.chunk, first, size) {
            Ok(pieces) => Ok(pieces
                .into_iter()
                .map(|chunk| Item {
                    chunk,
                    charge: self.charge.clone(),
                    origin: self.origin,
                })
                .collect()),
            Err(e) => Err(Unsplit {
                reason: e.to_string(),
                item: self,
            }),
        }
    }

    fn split_traces(self) -> Result<Vec<Self>, Self> {
        match super::by_trace::split_chunk(&self.chunk) {
            Ok(pieces) => Ok(pieces
                .into_iter()
                .map(|(_, chunk)| Item {
                    chunk,
                    charge: self.charge.clone(),
                    origin: self.origin,
                })
                .collect()),
            Err(_) => Err(self),
        }
    }

    fn split(self, first: usize) -> Result<(Self, Self), Unsplit<Self>> {
        let (a, b) = match wire::split_chunk(&self.chunk, first) {
            Ok(parts) => parts,
            Err(e) => {
                return Err(Unsplit {
                    reason: e.to_string(),
                    item: self,
                });
            }
        };
        Ok((
            Item {
                chunk: a,
                charge: self.charge.clone(),
                origin: self.origin,
            },
            Item {
                chunk: b,
                charge: self.charge,
                origin: self.origin,
            },
        ))
    }
}

#[derive(Debug, Clone)]
pub struct Routed {
    pub destination: Destination,
    pub item: Item,
}

/// The memory_limiter: bytes of span data held between receipt and delivery, across exporters.
/// Requests are refused once `limit_mib - spike_limit_mib` is in use.
#[derive(Debug)]
pub struct MemoryBudget {
    soft_limit: usize,
    used: AtomicUsize,
    /// The memory_limiter's processor item counters: spans offered to it and spans it let through.
    items: Option<Arc<crate::telemetry::ProcessorHandles>>,
}

impl MemoryBudget {
    /// A budget that counts nothing (tests; the relay's budgets are `counted`).
    #[cfg(test)]
    pub(crate) fn new(limit_mib: u64, spike_limit_mib: u64) -> Arc<MemoryBudget> {
        Self::build(limit_mib, spike_limit_mib, None)
    }

    /// A budget that counts the spans offered to it and let through in memory_limiter `items`.
    pub(crate) fn counted(
        limit_mib: u64,
        spike_limit_mib: u64,
        items: Arc<crate::telemetry::ProcessorHandles>,
    ) -> Arc<MemoryBudget> {
        Self::build(limit_mib, spike_limit_mib, Some(items))
    }

    fn build(
        limit_mib: u64,
        spike_limit_mib: u64,
        items: Option<Arc<crate::telemetry::ProcessorHandles>>,
    ) -> Arc<MemoryBudget> {
        let soft = limit_mib.saturating_sub(spike_limit_mib).max(1) * 1024 * 1024;
        Arc::new(MemoryBudget {
            soft_limit: soft as usize,
            used: AtomicUsize::new(0),
            items,
        })
    }

    /// Counts `spans` offered to the memory_limiter and, when `passed`, let through.
    pub(super) fn count(&self, spans: usize, passed: bool) {
        if let Some(items) = &self.items {
            items.incoming.inc_by(spans as u64);
            if passed {
                items.outgoing.inc_by(spans as u64);
            }
        }
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The use above which requests are refused.
    pub(crate) fn soft_limit(&self) -> usize {
        self.soft_limit
    }

    pub(super) fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            // One request may always pass an empty budget, so a request bigger than the limit
            // is not refused forever.
            if current > 0 && current + bytes > self.soft_limit {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(current, current + bytes, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Reservation {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(now) => current = now,
            }
        }
    }
}

impl MemoryBudget {
    /// Grows a reservation of this budget by `extra` bytes, under the same rule as a new one,
    /// counting the reservation's own bytes as free: a lone request may always grow.
    fn try_grow(&self, reservation: &mut Reservation, extra: usize) -> bool {
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            let others = current.saturating_sub(reservation.bytes);
            if others > 0 && current + extra > self.soft_limit {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(current, current + extra, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    reservation.bytes += extra;
                    return true;
                }
                Err(now) => current = now,
            }
        }
    }
}

/// Memory held for a request body while it is read and decoded, before it is submitted: released
/// on drop (the submit then reserves what the accepted request keeps).
#[derive(Debug)]
pub(crate) struct BodyHold {
    pub(super) reservations: Vec<Reservation>,
    pub(super) bytes: usize,
}

impl BodyHold {
    /// The bytes held (in each budget).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The smallest soft limit among the budgets held, if any: what no single request may
    /// exceed for memory that grows many times its body (a decoded JSON request).
    pub(crate) fn limit(&self) -> Option<usize> {
        self.reservations.iter().map(|r| r.budget.soft_limit).min()
    }

    /// Holds `extra` more bytes in every budget, or refuses (holding what it held before).
    pub(crate) fn grow(&mut self, extra: usize) -> Result<(), Refusal> {
        for i in 0..self.reservations.len() {
            let budget = self.reservations[i].budget.clone();
            if !budget.try_grow(&mut self.reservations[i], extra) {
                for r in &mut self.reservations[..i] {
                    r.budget.used.fetch_sub(extra, Ordering::AcqRel);
                    r.bytes -= extra;
                }
                return Err(Refusal::MemoryLimit);
            }
        }
        self.bytes += extra;
        Ok(())
    }
}

#[derive(Debug)]
pub(super) struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A request's reservations, released when the last of its items is delivered or dropped.
#[derive(Debug)]
pub struct Charge(#[allow(dead_code)] pub(super) Vec<Reservation>);

/// Why a request was not accepted. Receivers map it to HTTP/gRPC in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("memory limit reached; retry later")]
    MemoryLimit,
    #[error("export queue is full; retry later")]
    QueueFull,
    #[error("relay is shutting down")]
    ShuttingDown,
    #[error("the spool is full (max_size_mib); retry later")]
    SpoolFull,
    #[error("the spool cannot write to disk; retry later")]
    DiskFull,
}

impl Refusal {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refusal::MemoryLimit => "memory_limit",
            Refusal::QueueFull => "queue_full",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::SpoolFull => "spool_full",
            Refusal::DiskFull => "disk_full",
        }
    }

    pub(crate) fn retry_after(&self) -> Duration {
        match self {
            Refusal::MemoryLimit | Refusal::QueueFull => Duration::from_secs(1),
            Refusal::SpoolFull => Duration::from_secs(2),
            Refusal::ShuttingDown | Refusal::DiskFull => Duration::from_secs(5),
        }
    }
}
