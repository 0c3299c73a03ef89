//! The pipeline between receivers and exporters: admission (memory budget, bounded queues,
//! fan-out to every exporter at once or not at all) and the items that flow through it.
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::batch::BatchItem;
use wire::{ParsedRequest, ResourceChunk};

/// Where a batch goes beyond its exporter: the MLflow experiment, when it differs from the
/// exporter's configured header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Destination {
    pub experiment: Option<Arc<str>>,
}

/// One ResourceSpans in flight, holding its share of the memory budget until delivered.
#[derive(Debug, Clone)]
pub struct Item {
    pub chunk: ResourceChunk,
    pub charge: Option<Arc<Charge>>,
}

impl BatchItem for Item {
    fn spans(&self) -> usize {
        self.chunk.spans
    }
    fn split(self, first: usize) -> (Self, Self) {
        let (a, b) = wire::split_chunk(&self.chunk, first);
        (
            Item {
                chunk: a,
                charge: self.charge.clone(),
            },
            Item {
                chunk: b,
                charge: self.charge,
            },
        )
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
    pub name: String,
    soft_limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(name: &str, limit_mib: u64, spike_limit_mib: u64) -> Arc<MemoryBudget> {
        let soft = limit_mib.saturating_sub(spike_limit_mib).max(1) * 1024 * 1024;
        Arc::new(MemoryBudget {
            name: name.to_string(),
            soft_limit: soft as usize,
            used: AtomicUsize::new(0),
        })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
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

#[derive(Debug)]
struct Reservation {
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
pub struct Charge(#[allow(dead_code)] Vec<Reservation>);

/// Why a request was not accepted. Receivers map it to HTTP/gRPC in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("memory limit reached; retry later")]
    MemoryLimit,
    #[error("export queue is full; retry later")]
    QueueFull,
    #[error("relay is shutting down")]
    ShuttingDown,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MemoryLimit => "memory_limit",
            Refusal::QueueFull => "queue_full",
            Refusal::ShuttingDown => "shutting_down",
        }
    }

    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::MemoryLimit | Refusal::QueueFull => Duration::from_secs(1),
            Refusal::ShuttingDown => Duration::from_secs(5),
        }
    }
}

/// A receiver's way into its pipelines: every exporter input it feeds and every memory budget
/// on the way. A request is accepted by all of them or refused by all.
pub struct Intake {
    targets: Vec<mpsc::Sender<Arc<Vec<Routed>>>>,
    budgets: Vec<Arc<MemoryBudget>>,
}

impl Intake {
    pub fn new(targets: Vec<mpsc::Sender<Arc<Vec<Routed>>>>, budgets: Vec<Arc<MemoryBudget>>) -> Intake {
        Intake { targets, budgets }
    }

    /// Accepts a parsed request into every exporter's intake, or refuses it whole.
    /// `request_experiment` is the request's `x-mlflow-experiment-id` (with include_metadata).
    pub fn submit(&self, parsed: ParsedRequest, request_experiment: Option<&str>) -> Result<(), Refusal> {
        if parsed.chunks.is_empty() {
            return Ok(());
        }
        let bytes: usize = parsed.chunks.iter().map(|c| c.bytes.len()).sum();
        let mut reservations = Vec::with_capacity(self.budgets.len());
        for budget in &self.budgets {
            reservations.push(budget.try_reserve(bytes).ok_or(Refusal::MemoryLimit)?);
        }
        let mut permits = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            match target.try_reserve() {
                Ok(p) => permits.push(p),
                Err(TrySendError::Full(())) => return Err(Refusal::QueueFull),
                Err(TrySendError::Closed(())) => return Err(Refusal::ShuttingDown),
            }
        }
        let charge = (!reservations.is_empty()).then(|| Arc::new(Charge(reservations)));
        let request_experiment: Option<Arc<str>> = request_experiment.map(Arc::from);
        let routed: Vec<Routed> = parsed
            .chunks
            .into_iter()
            .map(|chunk| {
                let experiment = chunk
                    .experiment
                    .as_deref()
                    .map(Arc::from)
                    .or_else(|| request_experiment.clone());
                Routed {
                    destination: Destination { experiment },
                    item: Item {
                        chunk,
                        charge: charge.clone(),
                    },
                }
            })
            .collect();
        let routed = Arc::new(routed);
        for permit in permits {
            permit.send(routed.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn parsed(spans: usize, bytes: usize, experiment: Option<&str>) -> ParsedRequest {
        ParsedRequest {
            chunks: vec![ResourceChunk {
                bytes: Bytes::from(vec![0u8; bytes]),
                spans,
                experiment: experiment.map(Into::into),
            }],
            spans,
            ..Default::default()
        }
    }

    #[test]
    fn fans_out_to_every_exporter_or_none() {
        let (a_tx, mut a_rx) = mpsc::channel(1);
        let (b_tx, mut b_rx) = mpsc::channel(2);
        let intake = Intake::new(vec![a_tx, b_tx], vec![]);
        intake.submit(parsed(3, 10, None), None).unwrap();
        // a is full now: the next request must not reach b either.
        assert_eq!(intake.submit(parsed(1, 10, None), None), Err(Refusal::QueueFull));
        assert_eq!(a_rx.try_recv().unwrap()[0].item.chunk.spans, 3);
        assert_eq!(b_rx.try_recv().unwrap()[0].item.chunk.spans, 3);
        assert!(b_rx.try_recv().is_err());
        a_rx.close();
        assert_eq!(intake.submit(parsed(1, 10, None), None), Err(Refusal::ShuttingDown));
    }

    #[test]
    fn memory_budget_refuses_and_releases() {
        let budget = MemoryBudget::new("memory_limiter", 2, 1);
        let (tx, mut rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx], vec![budget.clone()]);
        intake.submit(parsed(1, 700 * 1024, None), None).unwrap();
        assert_eq!(
            intake.submit(parsed(1, 700 * 1024, None), None),
            Err(Refusal::MemoryLimit)
        );
        assert_eq!(budget.used(), 700 * 1024);
        drop(rx.try_recv().unwrap());
        assert_eq!(budget.used(), 0);
        // An oversized request still passes an empty budget.
        intake.submit(parsed(1, 3 * 1024 * 1024, None), None).unwrap();
    }

    #[test]
    fn experiment_precedence() {
        let (tx, mut rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx], vec![]);
        intake.submit(parsed(1, 1, Some("7")), Some("3")).unwrap();
        intake.submit(parsed(1, 1, None), Some("3")).unwrap();
        intake.submit(parsed(1, 1, None), None).unwrap();
        let got: Vec<Option<String>> = (0..3)
            .map(|_| {
                rx.try_recv().unwrap()[0]
                    .destination
                    .experiment
                    .as_deref()
                    .map(String::from)
            })
            .collect();
        assert_eq!(got, vec![Some("7".into()), Some("3".into()), None]);
    }
}
