//! The relay's own telemetry: Prometheus metrics with the collector's names, health and
//! readiness, and the small plain-HTTP admin servers that expose them.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::HealthCheckConfig;
use crate::supervise::LockUnpoisoned;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReceiverLabels {
    pub(crate) receiver: String,
    pub(crate) transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusedLabels {
    pub(crate) receiver: String,
    pub(crate) transport: String,
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ExporterLabels {
    pub(crate) exporter: String,
}

/// The queue metrics' labels: the collector adds the signal (`data_type`) there.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct QueueLabels {
    pub(crate) exporter: String,
    pub(crate) data_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ExporterReasonLabels {
    pub(crate) exporter: String,
    pub(crate) reason: String,
}

/// The otlphttp exporter's MLflow-specific counters (experiment lookups, poison traces).
#[derive(Default)]
pub(crate) struct MlflowMetrics {
    pub(crate) poison_traces: CounterFamily<ExporterLabels>,
    pub(crate) isolation_requests: CounterFamily<ExporterLabels>,
    pub(crate) experiment_lookups: CounterFamily<ExporterReasonLabels>,
}

impl MlflowMetrics {
    fn register(r: &mut Registry) -> MlflowMetrics {
        MlflowMetrics {
            poison_traces: counter(
                r,
                "otlp_relay_mlflow_poison_traces",
                "Traces MLflow refused for good, isolated from the request they came in so the others were stored",
            ),
            isolation_requests: counter(
                r,
                "otlp_relay_mlflow_isolation_requests",
                "Requests sent to isolate refused traces (halves of refused requests)",
            ),
            experiment_lookups: counter(
                r,
                "otlp_relay_mlflow_experiment_lookups",
                "Experiment names looked up through MLflow's REST API, by result (found, created)",
            ),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProcessorLabels {
    pub(crate) processor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenLabels {
    pub(crate) extension: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenResultLabels {
    pub(crate) extension: String,
    pub(crate) result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ComponentLabels {
    pub(crate) component: String,
}

type CounterFamily<L> = Family<L, Counter>;

/// Why an exporter gave accepted spans up without a verdict from the destination: the label
/// values of `otlp_relay_exporter_dropped_spans`, each series present at zero from start.
pub(crate) mod drop_reason {
    pub(crate) const PANIC: &str = "panic";
    pub(crate) const SHUTDOWN: &str = "shutdown";
    pub(crate) const CORRUPT: &str = "corrupt";
    pub(crate) const SPOOL_FULL: &str = "spool_full";
    pub(crate) const ALL: [&str; 4] = [PANIC, SHUTDOWN, CORRUPT, SPOOL_FULL];
}

/// Why a receiver refused spans (`otlp_relay`'s Refusal reasons and invalid spans): each series
/// present at zero from start, so an alert on it sees 0 rather than no data.
const RECEIVER_REFUSALS: [&str; 6] = [
    "memory_limit",
    "queue_full",
    "shutting_down",
    "spool_full",
    "disk_full",
    "invalid_span",
];

/// The counters of one labelled family for one component, by reason: each created once, so the
/// hot path finds its counter by comparing a `&str`, without building label strings.
pub(crate) struct ReasonCounters {
    make: Box<dyn Fn(&str) -> Counter + Send + Sync>,
    by_reason: std::sync::RwLock<Vec<(String, Counter)>>,
}

impl ReasonCounters {
    fn new(make: Box<dyn Fn(&str) -> Counter + Send + Sync>, known: &[&str]) -> ReasonCounters {
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
}

/// One exporter's metrics, registered once; the shutdown accounting reads these.
pub(crate) struct ExporterHandles {
    pub(crate) sent: Counter,
    pub(crate) send_failed: Counter,
    /// Every dropped span whatever the reason: a new reason cannot unbalance the accounting.
    pub(crate) dropped_total: Counter,
    pub(crate) dropped: ReasonCounters,
}

/// Every metric the relay exports. Counters get Prometheus' `_total` suffix, as the collector's do.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) receiver_accepted_spans: CounterFamily<ReceiverLabels>,
    pub(crate) receiver_refused_spans: CounterFamily<RefusedLabels>,
    pub(crate) exporter_sent_spans: CounterFamily<ExporterLabels>,
    pub(crate) exporter_send_failed_spans: CounterFamily<ExporterLabels>,
    pub(crate) exporter_dropped_spans: CounterFamily<ExporterReasonLabels>,
    pub(crate) exporter_retries: CounterFamily<ExporterReasonLabels>,
    pub(crate) exporter_queue_size: Family<QueueLabels, Gauge>,
    pub(crate) exporter_queue_capacity: Family<QueueLabels, Gauge>,
    pub(crate) batch_send_size: Family<ProcessorLabels, Histogram>,
    pub(crate) export_duration: Family<ExporterLabels, Histogram>,
    pub(crate) spool_bytes: Family<ExporterLabels, Gauge>,
    pub(crate) spool_records: Family<ExporterLabels, Gauge>,
    pub(crate) spool_corrupt_records: CounterFamily<ExporterLabels>,
    pub(crate) dead_letter_spans: CounterFamily<ExporterLabels>,
    pub(crate) exporter_unauthorized: CounterFamily<ExporterLabels>,
    pub(crate) mlflow: MlflowMetrics,
    pub(crate) token_requests: CounterFamily<TokenResultLabels>,
    pub(crate) token_expiry: Family<TokenLabels, Gauge>,
    pub(crate) component_restarts: CounterFamily<ComponentLabels>,
    /// Every dropped span per exporter, whatever the reason: the shutdown accounting reads it, so
    /// a new drop reason cannot unbalance it. Not exported (the labelled family above is).
    exporter_dropped_total: CounterFamily<ExporterLabels>,
    pub(crate) batch_unsplittable: CounterFamily<ExporterLabels>,
    /// Traces groupbytrace let go, per exporter stage and reason (root, idle, ...).
    pub(crate) groupbytrace_released_traces: CounterFamily<ExporterReasonLabels>,
    pub(crate) receiver_open_connections: Family<ReceiverLabels, Gauge>,
    pub(crate) receiver_connections_refused: CounterFamily<RefusedLabels>,
    pub(crate) receiver_connections_closed: CounterFamily<RefusedLabels>,
    pub(crate) processor_dropped_spans: CounterFamily<ProcessorLabels>,
    process: ProcessGauges,
    /// Handles of every receiver listener and exporter, registered once each.
    receivers: Mutex<Vec<Arc<ReceiverHandles>>>,
    exporters: Mutex<Vec<(String, Arc<ExporterHandles>)>>,
}

/// The process metrics of the collector (its dashboards' variables come from uptime), read from
/// /proc when scraped.
struct ProcessGauges {
    started: std::time::Instant,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
    memory_rss: Gauge,
    cpu_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ProcessGauges {
    fn register(r: &mut Registry) -> ProcessGauges {
        let g = ProcessGauges {
            started: std::time::Instant::now(),
            uptime: Gauge::default(),
            memory_rss: Gauge::default(),
            cpu_seconds: Gauge::default(),
        };
        r.register(
            "otelcol_process_uptime",
            "Seconds since the process started",
            g.uptime.clone(),
        );
        r.register(
            "otelcol_process_memory_rss",
            "Resident memory of the process, in bytes",
            g.memory_rss.clone(),
        );
        r.register(
            "otelcol_process_cpu_seconds",
            "CPU time of the process (user and system), in seconds",
            g.cpu_seconds.clone(),
        );
        g
    }

    fn refresh(&self) {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<i64>().ok())
        {
            self.memory_rss.set(kb * 1024);
        }
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        if let Some(ticks) = cpu_ticks(&stat) {
            // USER_HZ is 100 on every Linux ABI the relay is built for.
            self.cpu_seconds.set(ticks as f64 / 100.0);
        }
    }
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the command name in field 2 may
/// hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> CounterFamily<L> {
    let family = CounterFamily::<L>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<L, Gauge> {
    let family = Family::<L, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn histogram<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    buckets: fn() -> Histogram,
) -> Family<L, Histogram> {
    let family = Family::<L, Histogram>::new_with_constructor(buckets);
    registry.register(name, help, family.clone());
    family
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        Self::with_labels(Vec::new())
    }

    /// Every metric carries `labels` (the relay's resource: service_name, service_instance_id,
    /// ..., from `service.telemetry.resource`), as the collector's own metrics do.
    pub(crate) fn with_labels(labels: Vec<(String, String)>) -> Metrics {
        let mut r = Registry::with_labels(labels.into_iter().map(|(k, v)| (Cow::Owned(k), Cow::Owned(v))));
        let receiver_accepted_spans = counter(
            &mut r,
            "otelcol_receiver_accepted_spans",
            "Spans successfully pushed into the pipeline",
        );
        let receiver_refused_spans = counter(
            &mut r,
            "otelcol_receiver_refused_spans",
            "Spans that could not be pushed into the pipeline, by reason",
        );
        let receiver_open_connections = gauge(
            &mut r,
            "otlp_relay_receiver_open_connections",
            "Connections open on the receiver's listener",
        );
        let receiver_connections_refused = counter(
            &mut r,
            "otlp_relay_receiver_connections_refused",
            "Connections closed at once on accept, by reason (max_connections)",
        );
        let receiver_connections_closed = counter(
            &mut r,
            "otlp_relay_receiver_connections_closed",
            "Connections the receiver closed on a client, by reason (idle_timeout, header_timeout, handshake_timeout, body_timeout)",
        );
        let exporter_sent_spans = counter(
            &mut r,
            "otelcol_exporter_sent_spans",
            "Spans delivered to the destination",
        );
        let exporter_send_failed_spans = counter(
            &mut r,
            "otelcol_exporter_send_failed_spans",
            "Spans the destination refused permanently or that ran out of retries",
        );
        let exporter_dropped_spans = counter(
            &mut r,
            "otlp_relay_exporter_dropped_spans",
            "Accepted spans given up without a verdict from the destination (e.g. the shutdown deadline)",
        );
        let batch_unsplittable = counter(
            &mut r,
            "otlp_relay_batch_unsplittable_items",
            "Items the batcher could not split and sent whole, above send_batch_max_size",
        );
        let groupbytrace_released_traces = counter(
            &mut r,
            "otlp_relay_groupbytrace_released_traces",
            "Traces groupbytrace released to the batcher, by reason (root, idle, max_hold, evicted, shutdown)",
        );
        let exporter_retries = counter(
            &mut r,
            "otlp_relay_exporter_retries",
            "Export attempts that will be retried",
        );
        let exporter_queue_size = gauge(&mut r, "otelcol_exporter_queue_size", "Batches in the sending queue");
        let exporter_queue_capacity = gauge(
            &mut r,
            "otelcol_exporter_queue_capacity",
            "Capacity of the sending queue, in batches",
        );
        let batch_send_size = histogram(
            &mut r,
            "otelcol_processor_batch_batch_send_size",
            "Spans per batch sent by the batch processor",
            || Histogram::new(exponential_buckets(10.0, 2.0, 14)),
        );
        let export_duration = histogram(
            &mut r,
            "otlp_relay_export_duration_seconds",
            "Time of one export request, from send to response",
            || Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        );
        let exporter_unauthorized = counter(
            &mut r,
            "otlp_relay_exporter_unauthorized",
            "Export requests the destination answered 401 (the token is refreshed and the batch retried)",
        );
        let mlflow = MlflowMetrics::register(&mut r);
        let spool_bytes = gauge(
            &mut r,
            "otlp_relay_spool_bytes",
            "Bytes of segment files in the exporter's spool",
        );
        let spool_records = gauge(
            &mut r,
            "otlp_relay_spool_records",
            "Records in the exporter's spool segments not yet deleted",
        );
        let spool_corrupt_records = counter(
            &mut r,
            "otlp_relay_spool_corrupt_records",
            "Damaged spool records found: torn tails truncated, damaged records skipped (their spans count as dropped, reason corrupt)",
        );
        let dead_letter_spans = counter(
            &mut r,
            "otlp_relay_dead_letter_spans",
            "Spans refused for good by the destination and kept in the dead-letter directory",
        );
        let token_requests = counter(
            &mut r,
            "otlp_relay_token_requests",
            "Token requests by oauth2client extension and result (success, rejected, error)",
        );
        let token_expiry = gauge(
            &mut r,
            "otlp_relay_token_expiry_seconds",
            "Unix time at which the extension's current token expires",
        );
        let component_restarts = counter(
            &mut r,
            "otlp_relay_component_restarts",
            "Restarts of a supervised task after a panic, by component",
        );
        let processor_dropped_spans = counter(
            &mut r,
            "otelcol_processor_dropped_spans",
            "Spans a processor removed on purpose (filter conditions), by processor",
        );
        let process = ProcessGauges::register(&mut r);
        Metrics {
            processor_dropped_spans,
            process,
            registry: r,
            component_restarts,
            exporter_dropped_total: CounterFamily::default(),
            receiver_open_connections,
            receiver_connections_refused,
            receiver_connections_closed,
            spool_bytes,
            spool_records,
            spool_corrupt_records,
            dead_letter_spans,
            receiver_accepted_spans,
            receiver_refused_spans,
            exporter_sent_spans,
            exporter_send_failed_spans,
            exporter_dropped_spans,
            exporter_retries,
            exporter_queue_size,
            exporter_queue_capacity,
            batch_send_size,
            batch_unsplittable,
            groupbytrace_released_traces,
            export_duration,
            exporter_unauthorized,
            mlflow,
            token_requests,
            token_expiry,
            receivers: Mutex::new(Vec::new()),
            exporters: Mutex::new(Vec::new()),
        }
    }

    /// The handles of receiver `id`'s `transport` listener, registered on first use; every
    /// refusal reason's series exists from then on, at zero.
    pub(crate) fn receiver(&self, id: &str, transport: &'static str) -> Arc<ReceiverHandles> {
        let mut receivers = self.receivers.lock_unpoisoned();
        if let Some(h) = receivers.iter().find(|h| h.receiver == id && h.transport == transport) {
            return h.clone();
        }
        let labels = ReceiverLabels {
            receiver: id.to_string(),
            transport: transport.to_string(),
        };
        let family = self.receiver_refused_spans.clone();
        let base = labels.clone();
        let refused = ReasonCounters::new(
            Box::new(move |reason| {
                family
                    .get_or_create(&RefusedLabels {
                        receiver: base.receiver.clone(),
                        transport: base.transport.clone(),
                        reason: reason.to_string(),
                    })
                    .clone()
            }),
            &RECEIVER_REFUSALS,
        );
        let h = Arc::new(ReceiverHandles {
            receiver: id.to_string(),
            transport,
            accepted: self.receiver_accepted_spans.get_or_create(&labels).clone(),
            refused,
        });
        receivers.push(h.clone());
        h
    }

    /// Spans accepted by receiver `id`, over all its listeners.
    pub(crate) fn accepted_spans(&self, id: &str) -> u64 {
        let receivers = self.receivers.lock_unpoisoned();
        receivers
            .iter()
            .filter(|h| h.receiver == id)
            .map(|h| h.accepted.get())
            .sum()
    }

    /// The handles of exporter `id`, registered on first use.
    pub(crate) fn exporter(&self, id: &str) -> Arc<ExporterHandles> {
        let mut exporters = self.exporters.lock_unpoisoned();
        if let Some((_, h)) = exporters.iter().find(|(e, _)| e == id) {
            return h.clone();
        }
        let labels = exporter_labels(id);
        let family = self.exporter_dropped_spans.clone();
        let exporter = id.to_string();
        let dropped = ReasonCounters::new(
            Box::new(move |reason| {
                family
                    .get_or_create(&ExporterReasonLabels {
                        exporter: exporter.clone(),
                        reason: reason.to_string(),
                    })
                    .clone()
            }),
            &drop_reason::ALL,
        );
        let h = Arc::new(ExporterHandles {
            sent: self.exporter_sent_spans.get_or_create(&labels).clone(),
            send_failed: self.exporter_send_failed_spans.get_or_create(&labels).clone(),
            dropped_total: self.exporter_dropped_total.get_or_create(&labels).clone(),
            dropped,
        });
        exporters.push((id.to_string(), h.clone()));
        h
    }

    /// Counts accepted spans an exporter gave up without a verdict from the destination.
    pub(crate) fn count_dropped(&self, exporter: &str, reason: &str, spans: usize) {
        if spans == 0 {
            return;
        }
        let h = self.exporter(exporter);
        h.dropped.inc_by(reason, spans as u64);
        h.dropped_total.inc_by(spans as u64);
    }

    pub(crate) fn encode(&self) -> String {
        self.process.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would leave a partial page, which
        // Prometheus reports as a scrape error.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// A random instance id (UUID v4 text), new each start, as the collector's service.instance.id.
pub(crate) fn instance_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = const_hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

pub(crate) fn queue_labels(exporter: &str) -> QueueLabels {
    QueueLabels {
        exporter: exporter.to_string(),
        data_type: "traces",
    }
}

pub(crate) fn exporter_labels(exporter: &str) -> ExporterLabels {
    ExporterLabels {
        exporter: exporter.to_string(),
    }
}

/// Liveness and readiness. Not ready until receivers are bound, while draining, and while any
/// component reports a reason (e.g. the token endpoint refusing our credentials).
#[derive(Default)]
pub(crate) struct Health {
    started: AtomicBool,
    /// When the relay became ready, for the collector's status body.
    up_since: Mutex<Option<std::time::SystemTime>>,
    draining: AtomicBool,
    reasons: Mutex<BTreeMap<String, String>>,
}

impl Health {
    pub(crate) fn set_started(&self) {
        *self.up_since.lock_unpoisoned() = Some(std::time::SystemTime::now());
        self.started.store(true, Ordering::SeqCst);
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Sets (Some) or clears (None) a component's reason for not being ready.
    pub(crate) fn set_unready(&self, component: &str, reason: Option<String>) {
        let mut reasons = self.reasons.lock_unpoisoned();
        match reason {
            Some(r) => reasons.insert(component.to_string(), r),
            None => reasons.remove(component),
        };
    }

    /// None when ready, else why not.
    pub(crate) fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::SeqCst) {
            return Some("draining".into());
        }
        if !self.started.load(Ordering::SeqCst) {
            return Some("starting".into());
        }
        let reasons = self.reasons.lock_unpoisoned();
        if reasons.is_empty() {
            None
        } else {
            Some(
                reasons
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
    }
}

pub(crate) fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The health_check extension's routes: the collector's status on its `path`, and ours.
pub(crate) fn health_response(health: &Health, settings: &HealthCheckConfig, path: &str) -> Response<Full<Bytes>> {
    if path == settings.path {
        return collector_status(health, settings);
    }
    match path {
        "/" | "/healthz" | "/livez" => text_response(StatusCode::OK, "ok\n"),
        "/readyz" => match health.not_ready() {
            None => text_response(StatusCode::OK, "ready\n"),
            Some(reason) => text_response(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The collector health_check's answer: available from start until draining. Readiness reasons
/// of components (a token endpoint refusing) do not count, as in the collector: probes on this
/// path are often liveness probes, and a restart would not fix those.
fn collector_status(health: &Health, settings: &HealthCheckConfig) -> Response<Full<Bytes>> {
    let since = (!health.draining.load(Ordering::SeqCst))
        .then(|| *health.up_since.lock_unpoisoned())
        .flatten();
    let (status, body) = match (since, &settings.response_body) {
        (Some(_), Some(b)) => (StatusCode::OK, b.healthy.clone()),
        (None, Some(b)) => (StatusCode::SERVICE_UNAVAILABLE, b.unhealthy.clone()),
        (Some(t), None) => (
            StatusCode::OK,
            serde_json::json!({
                "status": "Server available",
                "upSince": rfc3339(t),
                "uptime": go_duration(t.elapsed().unwrap_or_default()),
            })
            .to_string(),
        ),
        (None, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "Server not available", "upSince": "0001-01-01T00:00:00Z", "uptime": ""})
                .to_string(),
        ),
    };
    let mut response = text_response(status, body);
    if settings.response_body.is_none() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
    }
    response
}

/// UTC time as RFC 3339 with nanoseconds, as Go's time.Time marshals to JSON.
fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (days, secs) = ((d.as_secs() / 86_400) as i64, d.as_secs() % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        d.subsec_nanos()
    )
}

/// A duration as Go prints it (`1h2m3.5s`).
fn go_duration(d: std::time::Duration) -> String {
    let (h, m) = (d.as_secs() / 3600, d.as_secs() % 3600 / 60);
    let s = d.as_secs_f64() - (h * 3600 + m * 60) as f64;
    let s = format!("{s:.9}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string();
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

pub(crate) fn metrics_response(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response
        }
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Answers one admin request (health or metrics); cheap and synchronous.
pub(crate) type AdminHandler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves a small plain-HTTP admin endpoint (health, metrics) until `cancel` fires.
pub(crate) async fn serve_admin(
    mut listener: crate::supervise::ListenerLease,
    component: &'static str,
    handler: AdminHandler,
    cancel: CancellationToken,
) {
    let mut acceptor = crate::net::Acceptor::new(component);
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => {
                listener.finish();
                return;
            }
            accepted = acceptor.accept(&listener) => accepted,
        };
        let handler = handler.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = handler(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            // Probes and scrapes send their request at once: a connection that sends nothing
            // (or waits between scrapes) gives its descriptor back after ADMIN_HEADER_TIMEOUT.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

/// An error with its sources, each said once, for logs and error bodies (callers pass transport
/// and I/O errors: URLs, never request bodies or credentials).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

/// Binds a listen address and logs `listening component=.. addr=..` (tests and operators read
/// the bound port from it), or names the component in the error.
pub(crate) async fn bind(component: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{component}: cannot listen on {addr}: {e}")))?;
    tracing::info!(component = %component, addr = %listener.local_addr()?, "listening");
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_state_and_reasons() {
        let h = Health::default();
        assert_eq!(h.not_ready().as_deref(), Some("starting"));
        h.set_started();
        assert_eq!(h.not_ready(), None);
        h.set_unready("oauth2client/mlflow", Some("invalid_client: bad secret".into()));
        assert_eq!(
            h.not_ready().as_deref(),
            Some("oauth2client/mlflow: invalid_client: bad secret")
        );
        h.set_unready("oauth2client/mlflow", None);
        assert_eq!(h.not_ready(), None);
        h.set_draining();
        assert_eq!(h.not_ready().as_deref(), Some("draining"));
        let settings = HealthCheckConfig::default();
        assert_eq!(health_response(&h, &settings, "/healthz").status(), StatusCode::OK);
        assert_eq!(
            health_response(&h, &settings, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    fn body(r: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let bytes = futures_util::FutureExt::now_or_never(r.into_body().collect())
            .and_then(Result::ok)
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn the_collector_status_is_served_on_its_path() {
        let h = Health::default();
        let settings = HealthCheckConfig {
            path: "/health/status".into(),
            ..Default::default()
        };
        let r = health_response(&h, &settings, "/health/status");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "starting");
        assert!(body(r).contains("\"Server not available\""));
        h.set_started();
        // A component's reason does not make the collector's status fail.
        h.set_unready("oauth2client/x", Some("refused".into()));
        let r = health_response(&h, &settings, "/health/status");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body(r)).unwrap();
        assert_eq!(v["status"], "Server available");
        assert!(v["upSince"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v["uptime"].as_str().unwrap().ends_with('s'), "{v}");
        assert_eq!(health_response(&h, &settings, "/").status(), StatusCode::OK);
        h.set_draining();
        assert_eq!(
            health_response(&h, &settings, "/health/status").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let custom = HealthCheckConfig {
            response_body: Some(crate::config::HealthResponseBody {
                healthy: "I'm OK".into(),
                unhealthy: "I'm not well".into(),
            }),
            ..Default::default()
        };
        assert_eq!(body(health_response(&h, &custom, "/")), "I'm not well");
    }

    #[test]
    fn go_formats() {
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_709_210_096, 5);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.000000005Z");
        assert_eq!(go_duration(std::time::Duration::from_millis(49_013)), "49.013s");
        assert_eq!(go_duration(std::time::Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn metric_names_follow_the_collector() {
        let m = Metrics::new();
        m.receiver_accepted_spans
            .get_or_create(&ReceiverLabels {
                receiver: "otlp".into(),
                transport: "grpc".into(),
            })
            .inc_by(3);
        m.exporter_queue_capacity
            .get_or_create(&queue_labels("otlphttp"))
            .set(10);
        let text = m.encode();
        assert!(
            text.contains("otelcol_receiver_accepted_spans_total{receiver=\"otlp\",transport=\"grpc\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("otelcol_exporter_queue_capacity{exporter=\"otlphttp\",data_type=\"traces\"} 10"),
            "{text}"
        );
    }

    #[test]
    fn handles_are_registered_once_and_series_start_at_zero() {
        let m = Metrics::new();
        let h = m.receiver("otlp", "http");
        assert!(Arc::ptr_eq(&h, &m.receiver("otlp", "http")));
        h.accepted.inc_by(2);
        m.receiver("otlp", "grpc").accepted.inc_by(3);
        m.receiver("otlp/other", "grpc").accepted.inc_by(100);
        assert_eq!(m.accepted_spans("otlp"), 5);
        h.refused.inc_by("queue_full", 4);
        // A reason nobody listed still counts, and is found again.
        h.refused.inc_by("brand_new", 1);
        h.refused.inc_by("brand_new", 1);
        assert_eq!(h.refused.get("brand_new"), 2);
        let e = m.exporter("otlphttp");
        m.count_dropped("otlphttp", "a_new_reason", 7);
        m.count_dropped("otlphttp", drop_reason::CORRUPT, 1);
        assert_eq!(e.dropped_total.get(), 8, "a new reason counts in the total");
        assert_eq!(e.dropped.get(drop_reason::CORRUPT), 1);
        let text = m.encode();
        for series in [
            "otelcol_receiver_refused_spans_total{receiver=\"otlp\",transport=\"http\",reason=\"memory_limit\"} 0",
            "otelcol_receiver_refused_spans_total{receiver=\"otlp\",transport=\"http\",reason=\"queue_full\"} 4",
            "otlp_relay_exporter_dropped_spans_total{exporter=\"otlphttp\",reason=\"shutdown\"} 0",
            "otlp_relay_exporter_dropped_spans_total{exporter=\"otlphttp\",reason=\"a_new_reason\"} 7",
            "otelcol_exporter_sent_spans_total{exporter=\"otlphttp\"} 0",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }

    #[test]
    fn process_metrics_are_served() {
        let m = Metrics::new();
        let text = m.encode();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        assert!(value("otelcol_process_memory_rss") > 1e6);
        assert!(value("otelcol_process_uptime") >= 0.0);
        assert!(value("otelcol_process_cpu_seconds") >= 0.0);
        assert_eq!(cpu_ticks("1 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0"), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn resource_labels_are_on_every_metric() {
        let m = Metrics::with_labels(vec![("service_name".into(), "relay-a".into())]);
        m.exporter_queue_capacity
            .get_or_create(&queue_labels("otlphttp"))
            .set(10);
        let text = m.encode();
        assert!(
            text.contains("otelcol_exporter_queue_capacity{service_name=\"relay-a\",exporter=\"otlphttp\",data_type=\"traces\"} 10"),
            "{text}"
        );
        let id = instance_id();
        assert_eq!((id.len(), id.as_bytes()[14]), (36, b'4'), "{id}");
        assert_ne!(id, instance_id());
    }
}
