//! The pipeline between receivers and exporters: admission (memory budget, bounded queues,
//! fan-out to every exporter at once or not at all) and the items that flow through it.
pub(crate) mod by_trace;
pub(crate) mod decode;
pub(crate) mod item;
mod process;
#[cfg(test)]
pub(crate) mod testdata;
mod walk;
pub mod wire;

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::spool::Spool;
pub(crate) use item::BodyHold;
pub use item::{Charge, Destination, Item, MemoryBudget, Refusal, RequestRouting, Routed};
pub(crate) use process::Admitted;
pub(crate) use process::ProcessedRoute;
use wire::ResourceChunk;

/// Where an exporter takes its input: its in-memory intake, or its spool on disk; each with the
/// exporter's `otelcol_exporter_enqueue_failed_spans` counter, counted when it has no room.
#[derive(Clone)]
pub enum Target {
    Memory(mpsc::Sender<Arc<Vec<Routed>>>, Counter),
    Spool(Arc<Spool>, Counter),
}

impl From<mpsc::Sender<Arc<Vec<Routed>>>> for Target {
    /// A target whose enqueue failures are counted nowhere (tests).
    fn from(tx: mpsc::Sender<Arc<Vec<Routed>>>) -> Target {
        Target::Memory(tx, Counter::default())
    }
}

/// An accepted request's acknowledgement: ready at once without a spool, else once every spool
/// it went to has it on disk.
#[derive(Debug, Default)]
pub struct Ack(Vec<oneshot::Receiver<Result<(), Refusal>>>);

impl Ack {
    pub(crate) async fn durable(self) -> Result<(), Refusal> {
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
    /// Exporters of pipelines without span-editing processors: they get the records as parsed.
    targets: Vec<Target>,
    /// Exporters of pipelines with such processors, grouped by their chain (`process`).
    processed: Vec<ProcessedRoute>,
    budgets: Vec<Arc<MemoryBudget>>,
}

/// What one record costs in memory beyond its bytes while it waits in queues and batches (the
/// item, its routing and its place in a batch): charged with the bytes, so a body of many tiny
/// records cannot hold many times what the budget counted.
const ITEM_OVERHEAD: usize = std::mem::size_of::<Routed>() + 64;

impl Intake {
    pub fn new(targets: Vec<Target>, budgets: Vec<Arc<MemoryBudget>>) -> Intake {
        Intake {
            targets,
            processed: Vec::new(),
            budgets,
        }
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
    pub(crate) async fn accept(&self, request: impl Into<Admitted>, routing: &RequestRouting) -> Result<(), Refusal> {
        self.submit_routed(request, routing)?.durable().await
    }

    /// Accepts a request into every exporter's intake, or refuses it whole: the parsed records
    /// to pipelines without span-editing processors, each processed copy to its pipelines.
    /// `request_experiment` is the request's `x-mlflow-experiment-id` (with include_metadata).
    pub fn submit(&self, request: impl Into<Admitted>, request_experiment: Option<&str>) -> Result<Ack, Refusal> {
        self.submit_routed(request, &RequestRouting::experiment(request_experiment))
    }

    /// `submit` with everything the request's headers said about its MLflow destination.
    pub(crate) fn submit_routed(&self, request: impl Into<Admitted>, routing: &RequestRouting) -> Result<Ack, Refusal> {
        let Admitted { parsed, processed } = request.into();
        if parsed.chunks.is_empty() {
            return Ok(Ack::default());
        }
        let offered = parsed.spans;
        let processed = match processed {
            Some(copies) => copies,
            None => self.process_late(&parsed.chunks),
        };
        let mut groups: Vec<(Vec<ResourceChunk>, &[Target])> = Vec::with_capacity(1 + processed.len());
        if !self.targets.is_empty() {
            groups.push((parsed.chunks, &self.targets));
        }
        for (route, chunks) in self.processed.iter().zip(processed) {
            groups.push((chunks, &route.targets));
        }
        groups.retain(|(chunks, _)| !chunks.is_empty());
        if groups.is_empty() {
            // Filtered out after the memory_limiter, as in the collector, where it comes first.
            self.count_limited(offered, true);
            return Ok(Ack::default());
        }
        let bytes: usize = groups
            .iter()
            .flat_map(|(chunks, _)| chunks)
            .map(|c| c.bytes.len() + ITEM_OVERHEAD)
            .sum();
        let mut reservations = Vec::with_capacity(self.budgets.len());
        for budget in &self.budgets {
            match budget.try_reserve(bytes) {
                Some(r) => reservations.push(r),
                None => {
                    self.count_limited(offered, false);
                    return Err(Refusal::MemoryLimit);
                }
            }
        }
        self.count_limited(offered, true);
        let charge = (!reservations.is_empty()).then(|| Arc::new(Charge(reservations)));
        // Every target's room is taken before anything is sent, so all get the request or none.
        let mut ready = Vec::with_capacity(groups.len());
        for (chunks, targets) in groups {
            ready.push(Self::reserve(chunks, targets, &charge, routing)?);
        }
        let mut acks = Vec::new();
        for group in ready {
            group.send(&charge, &mut acks);
        }
        Ok(Ack(acks))
    }

    /// Counts a request's spans in every memory_limiter on its way: offered, and let through
    /// when `passed` (the request is refused whole when any of them has no room).
    fn count_limited(&self, spans: usize, passed: bool) {
        for budget in &self.budgets {
            budget.count(spans, passed);
        }
    }

    /// Routes one copy of a request and takes room for it in each of `targets`.
    fn reserve<'t>(
        chunks: Vec<ResourceChunk>,
        targets: &'t [Target],
        charge: &Option<Arc<Charge>>,
        routing: &RequestRouting,
    ) -> Result<Reserved<'t>, Refusal> {
        let spans = chunks.iter().map(|c| c.spans).sum();
        let routed: Vec<Routed> = chunks
            .into_iter()
            .map(|chunk| {
                let experiment = chunk
                    .experiment
                    .as_deref()
                    .map(Arc::from)
                    .or_else(|| routing.experiment.clone());
                // The resource's other MLflow attributes (read by the receiver's walk): read again
                // by the exporter, here only so batches for different runs or experiments are
                // kept apart.
                let names = chunk.names.as_deref();
                let destination = Destination {
                    experiment,
                    experiment_name: names.and_then(|n| n.experiment_name.clone()),
                    run: names.and_then(|n| n.run.clone()).or_else(|| routing.run.clone()),
                    workspace: names
                        .and_then(|n| n.workspace.clone())
                        .or_else(|| routing.workspace.clone()),
                };
                Routed {
                    destination,
                    item: Item {
                        chunk,
                        charge: charge.clone(),
                        origin: None,
                    },
                }
            })
            .collect();
        // Framed once, shared by every spool the copy goes to.
        let frames = targets
            .iter()
            .any(|t| matches!(t, Target::Spool(..)))
            .then(|| crate::spool::encode_request(&routed));
        let mut permits = Vec::with_capacity(targets.len());
        let mut spool_permits = Vec::new();
        for target in targets {
            match target {
                Target::Memory(tx, failed) => match tx.try_reserve() {
                    Ok(p) => permits.push(p),
                    Err(TrySendError::Full(())) => {
                        failed.inc_by(spans as u64);
                        return Err(Refusal::QueueFull);
                    }
                    Err(TrySendError::Closed(())) => return Err(Refusal::ShuttingDown),
                },
                Target::Spool(spool, failed) => {
                    let framed = frames.as_ref().map_or(0, |(f, _)| f.len());
                    match spool.reserve(framed as u64) {
                        Ok(p) => spool_permits.push(p),
                        Err(refusal) => {
                            if refusal != Refusal::ShuttingDown {
                                failed.inc_by(spans as u64);
                            }
                            return Err(refusal);
                        }
                    }
                }
            }
        }
        Ok(Reserved {
            routed,
            spans,
            frames,
            permits,
            spool_permits,
        })
    }
}

/// One copy of a request with room taken in every target it goes to.
struct Reserved<'t> {
    routed: Vec<Routed>,
    spans: usize,
    frames: Option<(bytes::Bytes, usize)>,
    permits: Vec<mpsc::Permit<'t, Arc<Vec<Routed>>>>,
    spool_permits: Vec<crate::spool::SpoolPermit<'t>>,
}

impl Reserved<'_> {
    fn send(self, charge: &Option<Arc<Charge>>, acks: &mut Vec<oneshot::Receiver<Result<(), Refusal>>>) {
        if let Some((f, records)) = self.frames {
            for permit in self.spool_permits {
                acks.push(permit.send(f.clone(), records, self.spans, charge.clone()));
            }
        }
        if !self.permits.is_empty() {
            let routed = Arc::new(self.routed);
            for permit in self.permits {
                permit.send(routed.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wire::{ParsedRequest, ResourceChunk};
    use super::*;
    use bytes::Bytes;

    fn parsed(spans: usize, bytes: usize, experiment: Option<&str>) -> ParsedRequest {
        ParsedRequest {
            chunks: vec![ResourceChunk {
                bytes: Bytes::from(vec![0u8; bytes]),
                spans,
                experiment: experiment.map(Into::into),
                names: None,
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
    fn a_full_exporter_counts_its_enqueue_failure_alone() {
        let (a_tx, _a_rx) = mpsc::channel(1);
        let (b_tx, _b_rx) = mpsc::channel(4);
        let (a_failed, b_failed) = (Counter::default(), Counter::default());
        let intake = Intake::new(
            vec![
                Target::Memory(a_tx, a_failed.clone()),
                Target::Memory(b_tx, b_failed.clone()),
            ],
            vec![],
        );
        intake.submit(parsed(3, 10, None), None).unwrap();
        assert_eq!(intake.submit(parsed(5, 10, None), None).err(), Some(Refusal::QueueFull));
        // The spans count against the exporter whose queue had no room, not the other one.
        assert_eq!((a_failed.get(), b_failed.get()), (5, 0));
    }

    #[test]
    fn memory_budget_refuses_and_releases() {
        let budget = MemoryBudget::new(2, 1);
        let (tx, mut rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx.into()], vec![budget.clone()]);
        intake.submit(parsed(1, 700 * 1024, None), None).unwrap();
        assert_eq!(
            intake.submit(parsed(1, 700 * 1024, None), None).err(),
            Some(Refusal::MemoryLimit)
        );
        assert_eq!(budget.used(), 700 * 1024 + ITEM_OVERHEAD);
        drop(rx.try_recv().unwrap());
        assert_eq!(budget.used(), 0);
        // An oversized request still passes an empty budget.
        intake.submit(parsed(1, 3 * 1024 * 1024, None), None).unwrap();
    }

    #[test]
    fn the_memory_limiter_counts_spans_offered_and_let_through() {
        let items = Arc::new(crate::telemetry::ProcessorHandles {
            incoming: Counter::default(),
            outgoing: Counter::default(),
            dropped: Counter::default(),
        });
        let budget = MemoryBudget::counted(2, 1, items.clone());
        let (tx, _rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx.into()], vec![budget]);
        intake.submit(parsed(3, 700 * 1024, None), None).unwrap();
        assert_eq!(
            intake.submit(parsed(5, 700 * 1024, None), None).err(),
            Some(Refusal::MemoryLimit)
        );
        assert_eq!((items.incoming.get(), items.outgoing.get()), (8, 3));
    }

    #[test]
    fn tiny_records_are_charged_what_they_hold_in_memory() {
        let budget = MemoryBudget::new(64, 1);
        let (tx, mut rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx.into()], vec![budget.clone()]);
        let chunk = |_| ResourceChunk {
            bytes: Bytes::from_static(&[0u8; 4]),
            spans: 1,
            experiment: None,
            names: None,
        };
        let request = ParsedRequest {
            chunks: (0..10_000).map(chunk).collect(),
            spans: 10_000,
            ..Default::default()
        };
        intake.submit(request, None).unwrap();
        let items = rx.try_recv().unwrap();
        let held = items.len() * (std::mem::size_of::<Routed>() + 4);
        assert!(budget.used() >= held, "{} charged for {held} held", budget.used());
        drop(items);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn body_holds_count_against_the_budget() {
        let budget = MemoryBudget::new(2, 1);
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

    #[test]
    fn batches_are_kept_apart_by_run_workspace_and_experiment_name() {
        // Through the receiver's parse, which reads the resource's routing attributes.
        let chunk = |attrs: &[(&str, &str)]| {
            let mut rs = testdata::resource_spans("svc", 0, 1, 1);
            if let Some(resource) = rs.resource.as_mut() {
                resource.attributes = attrs.iter().map(|(k, v)| testdata::kv(k, v)).collect();
            }
            wire::parse_protobuf(wire::encode_record(&rs)).unwrap().chunks.remove(0)
        };
        let (tx, mut rx) = mpsc::channel(10);
        let intake = Intake::new(vec![tx.into()], vec![]);
        let request = RequestRouting {
            experiment: Some(Arc::from("3")),
            run: Some(Arc::from("header-run")),
            workspace: Some(Arc::from("header-ws")),
        };
        let parsed = ParsedRequest {
            chunks: vec![
                chunk(&[("mlflow.run_id", "r1"), ("mlflow.experiment_name", "agents")]),
                chunk(&[("mlflow.workspace", "w1")]),
            ],
            spans: 2,
            ..Default::default()
        };
        intake.submit_routed(parsed, &request).unwrap();
        let routed = rx.try_recv().unwrap();
        let d: Vec<_> = routed.iter().map(|r| r.destination.clone()).collect();
        let s = |v: &str| Some(Arc::<str>::from(v));
        assert_eq!(
            (d[0].experiment_name.clone(), d[0].run.clone(), d[0].workspace.clone()),
            (s("agents"), s("r1"), s("header-ws"))
        );
        assert_eq!(
            (d[1].experiment_name.clone(), d[1].run.clone(), d[1].workspace.clone()),
            (None, s("header-run"), s("w1"))
        );
        assert_eq!(d[1].experiment, s("3"));
    }
}
