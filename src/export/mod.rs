//! Exporters and their stage: per exporter a batcher, a bounded sending queue and
//! `num_consumers` senders that retry by the OTLP rules, so one slow destination stalls only
//! its own queue. Every accepted span ends as sent, failed or dropped, and is counted.
pub(crate) mod auth;
pub(crate) mod build;
pub(crate) mod debug;
mod deliver;
pub(crate) mod experiments;
pub(crate) mod isolate;
pub(crate) mod oauth;
pub(crate) mod otlp_grpc;
pub(crate) mod otlphttp;
mod queue;
pub(crate) mod retry;
pub(crate) mod route;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, BatchSettings, Batcher};
use crate::pipeline::{Destination, Item, Routed};
use crate::processor::grouping::Grouper;
use crate::spool::Spool;
use crate::spool::deadletter::DeadLetter;
use crate::supervise::LockUnpoisoned;
use crate::supervise::{Supervisor, fault_point};
use crate::telemetry::{BatchHandles, Metrics, drop_reason, exporter_labels, queue_labels};
use retry::RetryPolicy;

pub type OutBatch = Batch<Destination, Item>;

impl OutBatch {
    /// The batch as one ExportTraceServiceRequest encoding.
    pub fn payload(&self) -> Bytes {
        if let [only] = self.items.as_slice() {
            return only.chunk.bytes.clone();
        }
        let mut buf = BytesMut::with_capacity(self.items.iter().map(|i| i.chunk.bytes.len()).sum());
        for item in &self.items {
            buf.extend_from_slice(&item.chunk.bytes);
        }
        buf.freeze()
    }

    /// The items at `indices` (in that order), as a batch of the same key.
    pub(crate) fn subset(&self, indices: &[usize]) -> OutBatch {
        if indices.len() == self.items.len() {
            return self.clone();
        }
        let items: Vec<Item> = indices.iter().filter_map(|&i| self.items.get(i).cloned()).collect();
        OutBatch {
            key: self.key.clone(),
            spans: items.iter().map(|i| i.chunk.spans).sum(),
            items,
        }
    }
}

/// Why an export attempt failed; `is_retryable` decides what happens to the batch.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    #[error("connection failed: {0}")]
    Transport(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP {status}: {body}")]
    Retryable {
        status: http::StatusCode,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("HTTP 401 Unauthorized: {body}")]
    Unauthorized { body: String, with_token: bool },
    #[error("HTTP {status}: {body}")]
    Permanent { status: http::StatusCode, body: String },
    #[error("no token: {0}")]
    Auth(auth::AuthError),
    /// A gRPC status from the destination, classified by the OTLP rules.
    #[error("gRPC {code}: {message}")]
    Grpc {
        code: &'static str,
        message: String,
        retryable: bool,
        retry_after: Option<Duration>,
    },
    /// An experiment named by spans that MLflow does not have (or will not say).
    #[error("MLflow experiment {name:?}: {detail}")]
    UnknownExperiment { name: String, detail: String },
    /// A run id or workspace from the spans that cannot be an HTTP header value.
    #[error("{header} {value:?} is not a valid header value")]
    BadRouting { header: &'static str, value: String },
    #[error("cannot encode the batch: {0}")]
    Encode(String),
    /// The sender panicked while holding the batch (a bug): it is not retried, so a batch that
    /// triggers it cannot take the stage down again and again.
    #[error("internal error while sending: {0}")]
    Internal(String),
}

impl ExportError {
    /// Retryable errors keep the batch; the rest fail it. A 401 with a token is retryable: the
    /// token is refreshed and data waits rather than vanishes.
    pub(crate) fn is_retryable(&self) -> bool {
        match self {
            ExportError::Transport(_)
            | ExportError::Timeout(_)
            | ExportError::Retryable { .. }
            | ExportError::Auth(_) => true,
            ExportError::Unauthorized { with_token, .. } => *with_token,
            ExportError::Grpc { retryable, .. } => *retryable,
            ExportError::Permanent { .. }
            | ExportError::UnknownExperiment { .. }
            | ExportError::BadRouting { .. }
            | ExportError::Encode(_)
            | ExportError::Internal(_) => false,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            ExportError::Retryable { retry_after, .. } => *retry_after,
            ExportError::Grpc { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// What to check, when the error says more than its text (first runs: MLflow not started).
    /// `mlflow`: the exporter's config says MLflow is there; otherwise MLflow goes unnamed (a
    /// gRPC exporter's Tempo or Phoenix is no MLflow).
    pub(crate) fn hint(&self, mlflow: bool) -> Option<&'static str> {
        match self {
            ExportError::Transport(text) if text.contains("Connection refused") => Some(if mlflow {
                "nothing listens at this URL: is MLflow (or the gate) running there?"
            } else {
                "nothing listens at this endpoint: is the destination running there, on this port?"
            }),
            ExportError::Transport(text) if text.contains("dns error") => {
                Some("the host name does not resolve: check the exporter's endpoint")
            }
            _ => None,
        }
    }

    /// A short label for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            ExportError::Transport(_) => "connection",
            ExportError::Timeout(_) => "timeout",
            ExportError::Retryable { .. } => "server_busy",
            ExportError::Unauthorized { .. } => "unauthorized",
            ExportError::Permanent { .. } => "rejected",
            ExportError::Auth(_) => "token",
            ExportError::Grpc { retryable: true, .. } => "server_busy",
            ExportError::Grpc { retryable: false, .. } => "rejected",
            ExportError::UnknownExperiment { .. } => "unknown_experiment",
            ExportError::BadRouting { .. } => "bad_routing",
            ExportError::Encode(_) => "encode",
            ExportError::Internal(_) => "internal",
        }
    }
}

pub(crate) enum Exporter {
    OtlpHttp(Box<otlphttp::OtlpHttpExporter>),
    OtlpGrpc(Box<otlp_grpc::OtlpGrpcExporter>),
    Debug(debug::DebugExporter),
}

impl Exporter {
    pub(crate) async fn export(&self, batch: &OutBatch) -> Result<(), ExportError> {
        match self {
            Exporter::OtlpHttp(e) => e.export(batch).await,
            Exporter::OtlpGrpc(e) => e.export(batch).await.map(|_| ()),
            Exporter::Debug(e) => e.export(batch),
        }
    }

    /// The batch's items by MLflow target (experiment, run, workspace), in order.
    pub(crate) fn targets(&self, batch: &OutBatch) -> Vec<(route::Target, Vec<usize>)> {
        match self {
            Exporter::OtlpHttp(e) => e.targets(batch),
            Exporter::OtlpGrpc(_) | Exporter::Debug(_) => {
                vec![(route::Target::default(), (0..batch.items.len()).collect())]
            }
        }
    }

    /// One attempt to send `batch` to `target`; Ok holds the spans the destination said it
    /// rejected while accepting the rest (OTLP partial success).
    pub(crate) async fn export_to(&self, batch: &OutBatch, target: &route::Target) -> Result<usize, ExportError> {
        match self {
            Exporter::OtlpHttp(e) => e.export_to(batch, target).await.map(|()| 0),
            Exporter::OtlpGrpc(e) => e.export(batch).await,
            Exporter::Debug(e) => e.export(batch).map(|()| 0),
        }
    }

    /// Whether the config says MLflow is the destination: only the otlphttp exporter's can.
    pub(crate) fn names_mlflow(&self) -> bool {
        matches!(self, Exporter::OtlpHttp(e) if e.mlflow)
    }

    /// Whether a refused request is bisected by trace.
    pub(crate) fn isolates_poison_traces(&self) -> bool {
        matches!(self, Exporter::OtlpHttp(e) if e.isolate)
    }
}

/// Stage settings from the exporter's and its pipeline's config.
pub(crate) struct StageSettings {
    pub(crate) name: String,
    pub(crate) batch: BatchSettings,
    /// The batch processor's id for its metric label ("" when the pipeline has none).
    pub(crate) batch_processor: String,
    pub(crate) queue_size: usize,
    pub(crate) num_consumers: usize,
    /// Whether a sender sends batches waiting for the same destination as one request
    /// (`sending_queue.merge_waiting_batches`, see queue.rs).
    pub(crate) merge_waiting: bool,
    pub(crate) retry: RetryPolicy,
    /// The exporter's spool: items come from it and are released to it once delivered; what is
    /// in memory at shutdown stays on disk for the next start instead of counting as dropped.
    pub(crate) spool: Option<Arc<Spool>>,
    /// Where batches refused for good are kept (with a spool).
    pub(crate) dead_letter: Option<Arc<DeadLetter>>,
    /// Where batches go (the URL), for log lines.
    pub(crate) destination: String,
    /// The pipeline's groupbytrace, between the intake and the batcher.
    pub(crate) group: Option<crate::processor::grouping::GroupSettings>,
    /// Retryable failures since the last delivery, over all senders: the first delivery after
    /// some says so, so an operator sees the outage end.
    pub(crate) failures_since_delivery: std::sync::atomic::AtomicU64,
    /// When poison-trace isolation last logged, and isolations since: one line per interval.
    pub(crate) isolation_log: std::sync::Mutex<(Option<Instant>, u64)>,
}

/// Stops a stage in order: `close` stops intake (buffered items still flow out); `abort` gives
/// up on what is still queued or retrying, counting it dropped.
#[derive(Clone, Default)]
pub(crate) struct StageControl {
    pub(crate) close: CancellationToken,
    pub(crate) abort: CancellationToken,
}

/// Least capacity of an exporter's intake, in accepted requests. The batcher drains it
/// continuously, but a burst of small requests can arrive faster than the one batcher task is
/// scheduled: the intake holds as many requests as the sending queue holds batches (at least
/// this many), so a burst is refused only when the configured queue is really full. Memory is
/// bounded by the memory_limiter, which charges every request until it is delivered.
pub(crate) const INTAKE_CAPACITY: usize = 64;

/// The intake's capacity for a sending queue of `queue_size` batches.
pub(crate) fn intake_capacity(queue_size: usize) -> usize {
    queue_size.max(INTAKE_CAPACITY)
}

/// Starts an exporter's batcher and senders, each supervised; returns the sender the pipeline
/// feeds. The channels outlive a panicked task, so its restart picks up where it stopped.
pub(crate) fn start_stage(
    settings: StageSettings,
    exporter: Arc<Exporter>,
    metrics: Arc<Metrics>,
    control: StageControl,
    supervisor: &Supervisor,
    tasks: &mut JoinSet<()>,
) -> mpsc::Sender<Arc<Vec<Routed>>> {
    let (intake_tx, intake_rx) = mpsc::channel(intake_capacity(settings.queue_size));
    let (queue_tx, queue_rx) = mpsc::channel::<OutBatch>(settings.queue_size);
    // Registered now rather than when the batcher task first runs: present at zero from start.
    drop(batch_handles(&settings, &metrics));
    metrics
        .exporter_queue_capacity
        .get_or_create(&queue_labels(&settings.name))
        .set(settings.queue_size as i64);
    let settings = Arc::new(settings);
    let intake_rx = Arc::new(Mutex::new(intake_rx));
    // Spans the batcher has taken in and not yet queued: what a panic in it costs.
    let held = Arc::new(AtomicUsize::new(0));
    {
        let (s, m, c, h) = (settings.clone(), metrics.clone(), control.clone(), held.clone());
        let salvage_settings = settings.clone();
        let salvage_metrics = metrics.clone();
        let salvage_held = held.clone();
        supervisor.spawn(
            tasks,
            "batcher",
            format!("exporter {} batcher", settings.name),
            move || {
                run_batcher(
                    s.clone(),
                    intake_rx.clone(),
                    queue_tx.clone(),
                    m.clone(),
                    c.clone(),
                    h.clone(),
                )
            },
            Box::new(move |_| {
                // With a spool these spans stay on disk unreleased and go out after a restart.
                let spans = salvage_held.swap(0, Ordering::AcqRel);
                if salvage_settings.spool.is_none() {
                    count_dropped(&salvage_metrics, &salvage_settings.name, drop_reason::PANIC, spans);
                }
                Box::pin(async {})
            }),
        );
    }
    let queue_rx = Arc::new(Mutex::new(queue::SendingQueue::new(
        queue_rx,
        queue::merge_limit(&settings.batch, settings.merge_waiting),
    )));
    for i in 0..settings.num_consumers {
        let in_hand: Arc<std::sync::Mutex<Option<OutBatch>>> = Arc::default();
        let (s, e, q, m, c, slot) = (
            settings.clone(),
            exporter.clone(),
            queue_rx.clone(),
            metrics.clone(),
            control.clone(),
            in_hand.clone(),
        );
        let (salvage_settings, salvage_metrics) = (settings.clone(), metrics.clone());
        supervisor.spawn(
            tasks,
            "sender",
            format!("exporter {} sender {i}", settings.name),
            move || run_sender(s.clone(), e.clone(), q.clone(), m.clone(), c.clone(), slot.clone()),
            Box::new(move |message| {
                let batch = in_hand.lock_unpoisoned().take();
                let (settings, metrics) = (salvage_settings.clone(), salvage_metrics.clone());
                Box::pin(async move {
                    if let Some(batch) = batch {
                        give_up_after_panic(&settings, &metrics, batch, message).await;
                    }
                })
            }),
        );
    }
    intake_tx
}

/// The batch a sender held when it panicked: kept in the dead-letter directory when there is
/// one (counted failed, as a refusal would be), else counted dropped.
async fn give_up_after_panic(settings: &StageSettings, metrics: &Metrics, batch: OutBatch, message: String) {
    if settings.dead_letter.is_some() {
        metrics
            .exporter_send_failed_spans
            .get_or_create(&exporter_labels(&settings.name))
            .inc_by(batch.spans as u64);
        dead_letter(settings, &batch, &ExportError::Internal(message), 1, metrics).await;
        release(settings, &batch);
    } else {
        count_dropped(metrics, &settings.name, drop_reason::PANIC, batch.spans);
    }
}

/// Spans abandoned at shutdown: dropped without a spool; with one they are still on disk.
fn shutdown_dropped(settings: &StageSettings, metrics: &Metrics, spans: usize) {
    if settings.spool.is_none() {
        count_dropped(metrics, &settings.name, drop_reason::SHUTDOWN, spans);
    }
}

fn count_dropped(metrics: &Metrics, exporter: &str, reason: &str, spans: usize) {
    metrics.count_dropped(exporter, reason, spans);
}

async fn run_batcher(
    settings: Arc<StageSettings>,
    intake: Arc<Mutex<mpsc::Receiver<Arc<Vec<Routed>>>>>,
    queue: mpsc::Sender<OutBatch>,
    metrics: Arc<Metrics>,
    control: StageControl,
    held: Arc<AtomicUsize>,
) {
    let mut intake = intake.lock().await;
    let intake = &mut *intake;
    let mut batcher: Batcher<Destination, Item> = Batcher::new(settings.batch);
    let mut grouper = (settings.group.clone()).map(|g| Grouper::new(g, &settings.name, metrics.clone()));
    let outlet = Outlet {
        queue: &queue,
        queue_size: metrics
            .exporter_queue_size
            .get_or_create(&queue_labels(&settings.name))
            .clone(),
        batch: batch_handles(&settings, &metrics),
        unsplittable: metrics
            .batch_unsplittable
            .get_or_create(&exporter_labels(&settings.name))
            .clone(),
        held: &held,
    };
    let mut closing = false;
    loop {
        let deadline = earliest(batcher.next_deadline(), grouper.as_ref().and_then(Grouper::next_due));
        // How many of the batches their timeout sent (the rest reached their size): the
        // collector counts size and timeout sends apart.
        let (ready, timed_out): (Vec<OutBatch>, usize) = tokio::select! {
            biased;
            _ = control.close.cancelled(), if !closing => {
                // Refuse new submissions; what is already buffered still arrives below.
                closing = true;
                intake.close();
                continue;
            }
            msg = intake.recv() => match msg {
                Some(routed) => {
                    let spans: usize = routed.iter().map(|r| r.item.chunk.spans).sum();
                    held.fetch_add(spans, Ordering::AcqRel);
                    if let Some(b) = &outlet.batch {
                        b.items.incoming.inc_by(spans as u64);
                    }
                    fault_point("batcher");
                    let now = Instant::now();
                    let mut out = Vec::new();
                    for r in routed.iter() {
                        match &mut grouper {
                            Some(g) => out.extend(g.take_in(r, &mut batcher, now)),
                            None => out.extend(batcher.add(r.destination.clone(), r.item.clone(), now)),
                        }
                    }
                    match batcher.take_unsplit() {
                        0 => {}
                        n => drop(outlet.unsplittable.inc_by(n)),
                    }
                    (out, 0)
                }
                None => break,
            },
            _ = sleep_until_opt(deadline) => {
                let now = Instant::now();
                // Traces groupbytrace releases now fill batches to their size like new input.
                let mut out = match &mut grouper {
                    Some(g) => g.due(&mut batcher, now),
                    None => Vec::new(),
                };
                let expired = batcher.expired(now);
                let timed_out = expired.len();
                out.extend(expired);
                (out, timed_out)
            }
        };
        if let Some(b) = &outlet.batch {
            b.timeout_trigger.inc_by(timed_out as u64);
            b.size_trigger.inc_by(ready.len().saturating_sub(timed_out) as u64);
        }
        for batch in ready {
            if !enqueue(&settings, &outlet, batch, &metrics, &control).await {
                abandon(&settings, &mut batcher, &mut grouper, intake, &metrics, &held).await;
                return;
            }
        }
    }
    // Held traces leave first, each whole, then whatever the batcher has.
    let mut last = match &mut grouper {
        Some(g) => g.drain(&mut batcher, Instant::now()),
        None => Vec::new(),
    };
    last.extend(batcher.flush());
    for batch in last {
        if !enqueue(&settings, &outlet, batch, &metrics, &control).await {
            abandon(&settings, &mut batcher, &mut grouper, intake, &metrics, &held).await;
            return;
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The drain deadline passed while the batcher still held data: count all of it dropped.
async fn abandon(
    settings: &StageSettings,
    batcher: &mut Batcher<Destination, Item>,
    grouper: &mut Option<Grouper>,
    intake: &mut mpsc::Receiver<Arc<Vec<Routed>>>,
    metrics: &Metrics,
    held: &AtomicUsize,
) {
    intake.close();
    let mut left = match grouper {
        Some(g) => g.drain(batcher, Instant::now()),
        None => Vec::new(),
    };
    left.extend(batcher.flush());
    let mut spans = left.iter().map(|b| b.spans).sum::<usize>();
    held.fetch_sub(spans, Ordering::AcqRel);
    while let Some(routed) = intake.recv().await {
        spans += routed.iter().map(|r| r.item.chunk.spans).sum::<usize>();
    }
    shutdown_dropped(settings, metrics, spans);
}

/// The series of the stage's batch processor, registered once (None without one).
fn batch_handles(settings: &StageSettings, metrics: &Metrics) -> Option<BatchHandles> {
    (!settings.batch_processor.is_empty()).then(|| metrics.batch(&settings.batch_processor))
}

/// Where the batcher's output goes, with its metric handles looked up once per run.
struct Outlet<'a> {
    queue: &'a mpsc::Sender<OutBatch>,
    queue_size: prometheus_client::metrics::gauge::Gauge,
    /// The batch processor's series; None in a pipeline without one.
    batch: Option<BatchHandles>,
    unsplittable: prometheus_client::metrics::counter::Counter,
    /// Spans taken in and not yet queued (what a panic would cost).
    held: &'a AtomicUsize,
}

async fn enqueue(
    settings: &StageSettings,
    outlet: &Outlet<'_>,
    batch: OutBatch,
    metrics: &Metrics,
    control: &StageControl,
) -> bool {
    let spans = batch.spans;
    // Queued or counted dropped below: either way no longer the batcher's to lose.
    outlet.held.fetch_sub(spans, Ordering::AcqRel);
    if let Some(b) = &outlet.batch {
        b.send_size.observe(spans as f64);
        b.items.outgoing.inc_by(spans as u64);
    }
    let queue = outlet.queue;
    tokio::select! {
        sent = queue.send(batch) => {
            if sent.is_err() {
                shutdown_dropped(settings, metrics, spans);
                return false;
            }
            outlet.queue_size.set((queue.max_capacity() - queue.capacity()) as i64);
            true
        }
        _ = control.abort.cancelled() => {
            shutdown_dropped(settings, metrics, spans);
            false
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

async fn run_sender(
    settings: Arc<StageSettings>,
    exporter: Arc<Exporter>,
    queue: Arc<Mutex<queue::SendingQueue>>,
    metrics: Arc<Metrics>,
    control: StageControl,
    in_hand: Arc<std::sync::Mutex<Option<OutBatch>>>,
) {
    let queue_size = metrics
        .exporter_queue_size
        .get_or_create(&queue_labels(&settings.name))
        .clone();
    let merged_batches = metrics
        .exporter_merged_batches
        .get_or_create(&exporter_labels(&settings.name))
        .clone();
    loop {
        let next = {
            let mut queue = queue.lock().await;
            let next = queue.next().await;
            queue_size.set(queue.len() as i64);
            next
        };
        let Some((batch, merged)) = next else { return };
        merged_batches.inc_by(merged as u64);
        if control.abort.is_cancelled() {
            shutdown_dropped(&settings, &metrics, batch.spans);
            continue;
        }
        *in_hand.lock_unpoisoned() = Some(batch.clone());
        fault_point("sender");
        deliver::deliver(&settings, &exporter, batch, &metrics, &control).await;
        in_hand.lock_unpoisoned().take();
    }
}

/// The batch is done with (delivered or dead-lettered): its spool records need not be kept.
fn release(settings: &StageSettings, batch: &OutBatch) {
    if let Some(spool) = &settings.spool {
        for item in &batch.items {
            if let Some(segment) = item.origin {
                spool.release(segment, item.chunk.spans);
            }
        }
    }
}

/// A batch refused for good: kept in the dead-letter directory when there is one.
async fn dead_letter(
    settings: &StageSettings,
    batch: &OutBatch,
    error: &ExportError,
    attempts: u32,
    metrics: &Metrics,
) {
    let Some(dl) = settings.dead_letter.clone() else {
        return;
    };
    let record = crate::spool::proto::Record {
        payload: batch.payload().to_vec(),
        spans: batch.spans as u32,
        experiment: batch.key.experiment.as_deref().unwrap_or("").to_string(),
        run: batch.key.run.as_deref().unwrap_or("").to_string(),
        workspace: batch.key.workspace.as_deref().unwrap_or("").to_string(),
        enqueue_time_unix_nano: crate::spool::now_unix_nanos(),
        attempts,
        exporter: settings.name.clone(),
        error: error.to_string(),
    };
    let written = tokio::task::spawn_blocking(move || dl.write(&record).map(|()| dl)).await;
    match written {
        Err(e) => {
            tracing::error!(exporter = %settings.name, spans = batch.spans, error = %e, "dead-letter write failed; spans dropped");
        }
        Ok(Ok(dl)) => {
            metrics.exporter(&settings.name).dead_letter.inc_by(batch.spans as u64);
            tracing::warn!(exporter = %settings.name, spans = batch.spans, dir = %dl.dir().display(), "batch kept in the dead-letter directory; `otlp-relay replay` sends it again");
        }
        Ok(Err(e)) => {
            tracing::error!(exporter = %settings.name, spans = batch.spans, error = %e, "cannot write the dead-letter directory; spans dropped");
        }
    }
}
