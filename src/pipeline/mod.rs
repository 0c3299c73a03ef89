//! The pipeline between receivers and exporters: admission (memory budget, bounded queues,
//! fan-out to every exporter at once or not at all) and the items that flow through it.
mod walk;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::batch::{BatchItem, Unsplit};
use crate::spool::Spool;
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
    /// The spool segment this item was read from, released once it is delivered.
    pub origin: Option<u64>,
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
    reservations: Vec<Reservation>,
    bytes: usize,
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
    #[error("the spool is full (max_size_mib); retry later")]
    SpoolFull,
    #[error("the spool cannot write to disk; retry later")]
    DiskFull,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MemoryLimit => "memory_limit",
            Refusal::QueueFull => "queue_full",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::SpoolFull => "spool_full",
            Refusal::DiskFull => "disk_full",
        }
    }

    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::MemoryLimit | Refusal::QueueFull => Duration::from_secs(1),
            Refusal::SpoolFull => Duration::from_secs(2),
            Refusal::ShuttingDown | Refusal::DiskFull => Duration::from_secs(5),
        }
    }
}

/// Where an exporter takes its input: its in-memory intake, or its spool on disk.
#[derive(Clone)]
pub enum Target {
    Memory(mpsc::Sender<Arc<Vec<Routed>>>),
    Spool(Arc<Spool>),
}

impl From<mpsc::Sender<Arc<Vec<Routed>>>> for Target {
    fn from(tx: mpsc::Sender<Arc<Vec<Routed>>>) -> Target {
        Target::Memory(tx)
    }
}

/// An accepted request's acknowledgement: ready at once without a spool, else once every spool
/// it went to has it on disk.
#[derive(Debug, Default)]
pub struct Ack(Vec<oneshot::Receiver<Result<(), Refusal>>>);

impl Ack {
    pub async fn durable(self) -> Result<(), Refusal> {
        for rx in self.0 {
            // A writer gone before answering means the relay is stopping.
            rx.await.unwrap_or(Err(Refusal::ShuttingDown))?;
        }
        Ok(())
    }
}

/// A receiver's way into its pipelines: every exporter input it feeds and every memory budget
/// on the way. A request is accepted by all of them or refused by all.
pub struct Intake {
    targets: Vec<Target>,
    budgets: Vec<Arc<MemoryBudget>>,
}

impl Intake {
    pub fn new(targets: Vec<Target>, budgets: Vec<Arc<MemoryBudget>>) -> Intake {
        Intake { targets, budgets }
    }

    /// Holds `bytes` of every memory budget for a request body about to be read, or refuses
    /// (`MemoryLimit`) when a budget has no room for it.
    pub(crate) fn hold(&self, bytes: usize) -> Result<BodyHold, Refusal> {
        let mut reservations = Vec::with_capacity(self.budgets.len());
        for budget in &self.budgets {
            reservations.push(budget.try_reserve(bytes).ok_or(Refusal::MemoryLimit)?);
        }
        Ok(BodyHold { reservations, bytes })
    }

    /// Submits a request and waits until it may be acknowledged to the client (the ack contract:
    /// in every bounded in-memory queue, and durable in every spool).
    pub async fn accept(&self, parsed: ParsedRequest, request_experiment: Option<&str>) -> Result<(), Refusal> {
        self.submit(parsed, request_experiment)?.durable().await
    }

    /// Accepts a parsed request into every exporter's intake, or refuses it whole.
    /// `request_experiment` is the request's `x-mlflow-experiment-id` (with include_metadata).
    pub fn submit(&self, parsed: ParsedRequest, request_experiment: Option<&str>) -> Result<Ack, Refusal> {
        if parsed.chunks.is_empty() {
            return Ok(Ack::default());
        }
        let bytes: usize = parsed.chunks.iter().map(|c| c.bytes.len()).sum();
        let mut reservations = Vec::with_capacity(self.budgets.len());
        for budget in &self.budgets {
            reservations.push(budget.try_reserve(bytes).ok_or(Refusal::MemoryLimit)?);
        }
        let request_experiment: Option<Arc<str>> = request_experiment.map(Arc::from);
        let charge = (!reservations.is_empty()).then(|| Arc::new(Charge(reservations)));
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
                        origin: None,
                    },
                }
            })
            .collect();
        // Framed once, shared by every spool the request goes to.
        let frames = self
            .targets
            .iter()
            .any(|t| matches!(t, Target::Spool(_)))
            .then(|| crate::spool::encode_request(&routed));
        let mut permits = Vec::with_capacity(self.targets.len());
        let mut spool_permits = Vec::new();
        for target in &self.targets {
            match target {
                Target::Memory(tx) => match tx.try_reserve() {
                    Ok(p) => permits.push(p),
                    Err(TrySendError::Full(())) => return Err(Refusal::QueueFull),
                    Err(TrySendError::Closed(())) => return Err(Refusal::ShuttingDown),
                },
                Target::Spool(spool) => {
                    let framed = frames.as_ref().map_or(0, |(f, _)| f.len());
                    spool_permits.push(spool.reserve(framed as u64)?);
                }
            }
        }
        let mut acks = Vec::with_capacity(spool_permits.len());
        if let Some((f, records)) = frames {
            for permit in spool_permits {
                acks.push(permit.send(f.clone(), records, parsed.spans, charge.clone()));
            }
        }
        if !permits.is_empty() {
            let routed = Arc::new(routed);
            for permit in permits {
                permit.send(routed.clone());
            }
        }
        Ok(Ack(acks))
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
        let intake = Intake::new(vec![a_tx.into(), b_tx.into()], vec![]);
        intake.submit(parsed(3, 10, None), None).unwrap();
        // a is full now: the next request must not reach b either.
        assert_eq!(intake.submit(parsed(1, 10, None), None).err(), Some(Refusal::QueueFull));
        assert_eq!(a_rx.try_recv().unwrap()[0].item.chunk.spans, 3);
        assert_eq!(b_rx.try_recv().unwrap()[0].item.chunk.spans, 3);
        assert!(b_rx.try_recv().is_err());
        a_rx.close();
        assert_eq!(
            intake.submit(parsed(1, 10, None), None).err(),
            Some(Refusal::ShuttingDown)
        );
    }

    #[test]
    fn memory_budget_refuses_and_releases() {
        let budget = MemoryBudget::new("memory_limiter", 2, 1);
        let (tx, mut rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx.into()], vec![budget.clone()]);
        intake.submit(parsed(1, 700 * 1024, None), None).unwrap();
        assert_eq!(
            intake.submit(parsed(1, 700 * 1024, None), None).err(),
            Some(Refusal::MemoryLimit)
        );
        assert_eq!(budget.used(), 700 * 1024);
        drop(rx.try_recv().unwrap());
        assert_eq!(budget.used(), 0);
        // An oversized request still passes an empty budget.
        intake.submit(parsed(1, 3 * 1024 * 1024, None), None).unwrap();
    }

    #[test]
    fn body_holds_count_against_the_budget() {
        let budget = MemoryBudget::new("memory_limiter", 2, 1);
        let intake = Intake::new(vec![], vec![budget.clone()]);
        let mut a = intake.hold(600 * 1024).unwrap();
        assert_eq!(budget.used(), 600 * 1024);
        // A lone hold may grow past the limit; with another one in the budget it may not.
        let mut b = intake.hold(0).unwrap();
        a.grow(600 * 1024).unwrap();
        assert_eq!(b.grow(1), Err(Refusal::MemoryLimit));
        assert_eq!(intake.hold(1).err(), Some(Refusal::MemoryLimit));
        assert_eq!((a.bytes(), b.bytes(), budget.used()), (1200 * 1024, 0, 1200 * 1024));
        drop(a);
        b.grow(900 * 1024).unwrap();
        assert_eq!(budget.used(), 900 * 1024);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn experiment_precedence() {
        let (tx, mut rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx.into()], vec![]);
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
