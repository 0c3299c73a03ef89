//! The relay's own telemetry: Prometheus metrics with the collector's names (`handles`: each
//! component's, registered once; `process`: the collector's process metrics) and health and
//! readiness (`health`). `crate::admin` serves them.
mod handles;
mod health;
mod process;
#[cfg(test)]
mod tests;

pub(crate) use handles::{BatchHandles, ExporterHandles, ProcessorHandles, ReasonCounters, ReceiverHandles};
pub(crate) use health::{Health, health_response, text_response};
use process::ProcessGauges;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::lock::LockUnpoisoned;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

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

/// The collector's series of what flows through the components besides accepted and sent:
/// receiver failures, enqueue failures, processor items and the batch processor's triggers.
struct FlowCounters {
    /// Spans the receiver itself could not take (invalid spans), as against refusals from
    /// downstream (memory, queues, spool): the collector's split of the two.
    receiver_failed_spans: CounterFamily<ReceiverLabels>,
    exporter_enqueue_failed_spans: CounterFamily<ExporterLabels>,
    processor_incoming_items: CounterFamily<ProcessorSignalLabels>,
    processor_outgoing_items: CounterFamily<ProcessorSignalLabels>,
    batch_size_trigger_send: CounterFamily<ProcessorLabels>,
    batch_timeout_trigger_send: CounterFamily<ProcessorLabels>,
}

impl FlowCounters {
    fn register(r: &mut Registry) -> FlowCounters {
        let receiver_failed_spans = counter(
            r,
            "otelcol_receiver_failed_spans",
            "Spans the receiver could not take itself (invalid trace or span ids), as against refusals from downstream",
        );
        let exporter_enqueue_failed_spans = counter(
            r,
            "otelcol_exporter_enqueue_failed_spans",
            "Spans refused because the exporter's sending queue or spool had no room",
        );
        let processor_incoming_items = counter(
            r,
            "otelcol_processor_incoming_items",
            "Items a processor took in (the batch processor: per exporter stage)",
        );
        let processor_outgoing_items = counter(
            r,
            "otelcol_processor_outgoing_items",
            "Items a processor passed on (the batch processor: per exporter stage)",
        );
        let batch_size_trigger_send = counter(
            r,
            "otelcol_processor_batch_batch_size_trigger_send",
            "Batches the batch processor sent because they reached send_batch_size",
        );
        let batch_timeout_trigger_send = counter(
            r,
            "otelcol_processor_batch_timeout_trigger_send",
            "Batches the batch processor sent because their timeout ran out",
        );
        FlowCounters {
            receiver_failed_spans,
            exporter_enqueue_failed_spans,
            processor_incoming_items,
            processor_outgoing_items,
            batch_size_trigger_send,
            batch_timeout_trigger_send,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProcessorLabels {
    pub(crate) processor: String,
}

/// The collector's processor item counters' labels: the processor and the signal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProcessorSignalLabels {
    pub(crate) processor: String,
    pub(crate) otel_signal: &'static str,
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

/// Why a receiver refused spans (`otlp_relay`'s Refusal reasons; invalid spans count in
/// `otelcol_receiver_failed_spans`): each series present at zero from start, so an alert on it
/// sees 0 rather than no data.
const RECEIVER_REFUSALS: [&str; 5] = ["memory_limit", "queue_full", "shutting_down", "spool_full", "disk_full"];

/// Why a receiver closed a connection (`otlp_relay_receiver_connections_closed`) or refused one
/// at accept (`otlp_relay_receiver_connections_refused`): each series present at zero from start.
const CONNECTIONS_CLOSED: [&str; 5] = [
    "idle_timeout",
    "header_timeout",
    "handshake_timeout",
    "handshake_failed",
    "body_timeout",
];
const CONNECTIONS_REFUSED: [&str; 1] = ["max_connections"];

/// The reasons of retried export attempts (`ExportError::reason` of the retryable errors):
/// each series present at zero from start.
const RETRY_REASONS: [&str; 5] = ["connection", "timeout", "server_busy", "unauthorized", "token"];

/// An oauth2client's token request results, each present at zero from start.
const TOKEN_RESULTS: [&str; 3] = ["success", "rejected", "error"];

/// The experiment lookup results of the MLflow exporter, each present at zero from start.
const LOOKUP_RESULTS: [&str; 2] = ["found", "created"];

/// Every metric the relay exports. Counters get Prometheus' `_total` suffix, as the collector's do.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) receiver_accepted_spans: CounterFamily<ReceiverLabels>,
    pub(crate) receiver_refused_spans: CounterFamily<RefusedLabels>,
    flow: FlowCounters,
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
    /// Queued batches a sender merged into the request before them (export/queue.rs).
    pub(crate) exporter_merged_batches: CounterFamily<ExporterLabels>,
    /// Traces groupbytrace let go, per exporter stage and reason (root, idle, ...).
    pub(crate) groupbytrace_released_traces: CounterFamily<ExporterReasonLabels>,
    /// Spans and traces groupbytrace holds now, per exporter stage.
    pub(crate) groupbytrace_held_spans: Family<ExporterLabels, Gauge>,
    pub(crate) groupbytrace_held_traces: Family<ExporterLabels, Gauge>,
    pub(crate) receiver_open_connections: Family<ReceiverLabels, Gauge>,
    pub(crate) receiver_connections_refused: CounterFamily<RefusedLabels>,
    pub(crate) receiver_connections_closed: CounterFamily<RefusedLabels>,
    pub(crate) processor_dropped_spans: CounterFamily<ProcessorLabels>,
    process: ProcessGauges,
    /// Handles of every receiver listener and exporter, registered once each.
    receivers: Mutex<Vec<Arc<ReceiverHandles>>>,
    exporters: Mutex<Vec<(String, Arc<ExporterHandles>)>>,
    processors: Mutex<Vec<(String, Arc<ProcessorHandles>)>>,
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
        let flow = FlowCounters::register(&mut r);
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
        let exporter_merged_batches = counter(
            &mut r,
            "otlp_relay_exporter_merged_batches",
            "Batches waiting in the sending queue that were sent in the request of the batch before them",
        );
        let groupbytrace_released_traces = counter(
            &mut r,
            "otlp_relay_groupbytrace_released_traces",
            "Traces groupbytrace released to the batcher, by reason (root, idle, max_hold, evicted, shutdown)",
        );
        let groupbytrace_held_spans = gauge(
            &mut r,
            "otlp_relay_groupbytrace_held_spans",
            "Spans groupbytrace holds, waiting for their traces to complete",
        );
        let groupbytrace_held_traces = gauge(
            &mut r,
            "otlp_relay_groupbytrace_held_traces",
            "Traces groupbytrace holds",
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
            "Token requests (oauth2client) and token file reads (bearertokenauth, basicauth) by extension and result (success, rejected, error)",
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
            flow,
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
            exporter_merged_batches,
            groupbytrace_released_traces,
            groupbytrace_held_spans,
            groupbytrace_held_traces,
            export_duration,
            exporter_unauthorized,
            mlflow,
            token_requests,
            token_expiry,
            receivers: Mutex::new(Vec::new()),
            exporters: Mutex::new(Vec::new()),
            processors: Mutex::new(Vec::new()),
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
        let by_reason = |family: &CounterFamily<RefusedLabels>, known: &[&str]| {
            let family = family.clone();
            let base = labels.clone();
            ReasonCounters::new(
                Box::new(move |reason| {
                    family
                        .get_or_create(&RefusedLabels {
                            receiver: base.receiver.clone(),
                            transport: base.transport.clone(),
                            reason: reason.to_string(),
                        })
                        .clone()
                }),
                known,
            )
        };
        drop(self.receiver_open_connections.get_or_create(&labels));
        let h = Arc::new(ReceiverHandles {
            receiver: id.to_string(),
            transport,
            accepted: self.receiver_accepted_spans.get_or_create(&labels).clone(),
            refused: by_reason(&self.receiver_refused_spans, &RECEIVER_REFUSALS),
            failed: self.flow.receiver_failed_spans.get_or_create(&labels).clone(),
            // Known reasons are registered here, so their series exist at zero from start.
            connections_refused: by_reason(&self.receiver_connections_refused, &CONNECTIONS_REFUSED),
            connections_closed: by_reason(&self.receiver_connections_closed, &CONNECTIONS_CLOSED),
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
        let by_reason = |family: &CounterFamily<ExporterReasonLabels>, known: &[&str]| {
            let family = family.clone();
            let exporter = id.to_string();
            ReasonCounters::new(
                Box::new(move |reason| {
                    family
                        .get_or_create(&ExporterReasonLabels {
                            exporter: exporter.clone(),
                            reason: reason.to_string(),
                        })
                        .clone()
                }),
                known,
            )
        };
        // Present at zero from start, though these are set or counted elsewhere.
        let queue = queue_labels(id);
        drop(self.exporter_queue_size.get_or_create(&queue));
        drop(self.exporter_queue_capacity.get_or_create(&queue));
        drop(self.spool_bytes.get_or_create(&labels));
        drop(self.spool_records.get_or_create(&labels));
        drop(self.spool_corrupt_records.get_or_create(&labels));
        drop(self.batch_unsplittable.get_or_create(&labels));
        drop(self.exporter_merged_batches.get_or_create(&labels));
        let h = Arc::new(ExporterHandles {
            enqueue_failed: self.flow.exporter_enqueue_failed_spans.get_or_create(&labels).clone(),
            dead_letter: self.dead_letter_spans.get_or_create(&labels).clone(),
            sent: self.exporter_sent_spans.get_or_create(&labels).clone(),
            send_failed: self.exporter_send_failed_spans.get_or_create(&labels).clone(),
            dropped_total: self.exporter_dropped_total.get_or_create(&labels).clone(),
            dropped: by_reason(&self.exporter_dropped_spans, &drop_reason::ALL),
            retries: by_reason(&self.exporter_retries, &RETRY_REASONS),
            unauthorized: self.exporter_unauthorized.get_or_create(&labels).clone(),
            export_duration: self.export_duration.get_or_create(&labels).clone(),
            poison_traces: self.mlflow.poison_traces.get_or_create(&labels).clone(),
            isolation_requests: self.mlflow.isolation_requests.get_or_create(&labels).clone(),
            experiment_lookups: by_reason(&self.mlflow.experiment_lookups, &LOOKUP_RESULTS),
        });
        exporters.push((id.to_string(), h.clone()));
        h
    }

    /// The handles of processor `id`, registered on first use: its items in and out and its
    /// dropped spans, each present at zero from then on.
    pub(crate) fn processor(&self, id: &str) -> Arc<ProcessorHandles> {
        let mut processors = self.processors.lock_unpoisoned();
        if let Some((_, h)) = processors.iter().find(|(p, _)| p == id) {
            return h.clone();
        }
        let items = ProcessorSignalLabels {
            processor: id.to_string(),
            otel_signal: "traces",
        };
        let labels = ProcessorLabels {
            processor: id.to_string(),
        };
        let h = Arc::new(ProcessorHandles {
            incoming: self.flow.processor_incoming_items.get_or_create(&items).clone(),
            outgoing: self.flow.processor_outgoing_items.get_or_create(&items).clone(),
            dropped: self.processor_dropped_spans.get_or_create(&labels).clone(),
        });
        processors.push((id.to_string(), h.clone()));
        h
    }

    /// The handles of batch processor `id` (one set per exporter stage that runs it).
    pub(crate) fn batch(&self, id: &str) -> BatchHandles {
        let labels = ProcessorLabels {
            processor: id.to_string(),
        };
        BatchHandles {
            items: self.processor(id),
            size_trigger: self.flow.batch_size_trigger_send.get_or_create(&labels).clone(),
            timeout_trigger: self.flow.batch_timeout_trigger_send.get_or_create(&labels).clone(),
            send_size: self.batch_send_size.get_or_create(&labels).clone(),
        }
    }

    /// Registers oauth2client `id`'s token request series at zero. The expiry gauge is left
    /// until a token is fetched: a zero there would read as a token expired in 1970.
    pub(crate) fn token_extension(&self, id: &str) {
        for result in TOKEN_RESULTS {
            drop(self.token_requests.get_or_create(&TokenResultLabels {
                extension: id.to_string(),
                result: result.to_string(),
            }));
        }
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
