//! The relay's own telemetry: Prometheus metrics with the collector's names, health and
//! readiness, and the small plain-HTTP admin servers that expose them.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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
pub struct ReceiverLabels {
    pub receiver: String,
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub receiver: String,
    pub transport: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExporterLabels {
    pub exporter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExporterReasonLabels {
    pub exporter: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessorLabels {
    pub processor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub extension: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenResultLabels {
    pub extension: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabels {
    pub component: String,
}

type CounterFamily<L> = Family<L, Counter>;

/// Every metric the relay exports. Counters get Prometheus' `_total` suffix, as the collector's do.
pub struct Metrics {
    registry: Registry,
    pub receiver_accepted_spans: CounterFamily<ReceiverLabels>,
    pub receiver_refused_spans: CounterFamily<RefusedLabels>,
    pub exporter_sent_spans: CounterFamily<ExporterLabels>,
    pub exporter_send_failed_spans: CounterFamily<ExporterLabels>,
    pub exporter_dropped_spans: CounterFamily<ExporterReasonLabels>,
    pub exporter_retries: CounterFamily<ExporterReasonLabels>,
    pub exporter_queue_size: Family<ExporterLabels, Gauge>,
    pub exporter_queue_capacity: Family<ExporterLabels, Gauge>,
    pub batch_send_size: Family<ProcessorLabels, Histogram>,
    pub export_duration: Family<ExporterLabels, Histogram>,
    pub spool_bytes: Family<ExporterLabels, Gauge>,
    pub spool_records: Family<ExporterLabels, Gauge>,
    pub spool_corrupt_records: CounterFamily<ExporterLabels>,
    pub dead_letter_spans: CounterFamily<ExporterLabels>,
    pub exporter_unauthorized: CounterFamily<ExporterLabels>,
    pub token_requests: CounterFamily<TokenResultLabels>,
    pub token_expiry: Family<TokenLabels, Gauge>,
    pub component_restarts: CounterFamily<ComponentLabels>,
    /// Every dropped span per exporter, whatever the reason: the shutdown accounting reads it, so
    /// a new drop reason cannot unbalance it. Not exported (the labelled family above is).
    exporter_dropped_total: CounterFamily<ExporterLabels>,
    pub batch_unsplittable: CounterFamily<ExporterLabels>,
    pub receiver_open_connections: Family<ReceiverLabels, Gauge>,
    pub receiver_connections_refused: CounterFamily<RefusedLabels>,
    pub receiver_connections_closed: CounterFamily<RefusedLabels>,
    pub processor_dropped_spans: CounterFamily<ProcessorLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let receiver_accepted_spans = CounterFamily::<ReceiverLabels>::default();
        registry.register(
            "otelcol_receiver_accepted_spans",
            "Spans successfully pushed into the pipeline",
            receiver_accepted_spans.clone(),
        );
        let receiver_refused_spans = CounterFamily::<RefusedLabels>::default();
        registry.register(
            "otelcol_receiver_refused_spans",
            "Spans that could not be pushed into the pipeline, by reason",
            receiver_refused_spans.clone(),
        );
        let exporter_sent_spans = CounterFamily::<ExporterLabels>::default();
        registry.register(
            "otelcol_exporter_sent_spans",
            "Spans delivered to the destination",
            exporter_sent_spans.clone(),
        );
        let exporter_send_failed_spans = CounterFamily::<ExporterLabels>::default();
        registry.register(
            "otelcol_exporter_send_failed_spans",
            "Spans the destination refused permanently or that ran out of retries",
            exporter_send_failed_spans.clone(),
        );
        let exporter_dropped_spans = CounterFamily::<ExporterReasonLabels>::default();
        registry.register(
            "otlp_relay_exporter_dropped_spans",
            "Accepted spans given up without a verdict from the destination (e.g. the shutdown deadline)",
            exporter_dropped_spans.clone(),
        );
        let batch_unsplittable = CounterFamily::<ExporterLabels>::default();
        registry.register(
            "otlp_relay_batch_unsplittable_items",
            "Items the batcher could not split and sent whole, above send_batch_max_size",
            batch_unsplittable.clone(),
        );
        let exporter_retries = CounterFamily::<ExporterReasonLabels>::default();
        registry.register(
            "otlp_relay_exporter_retries",
            "Export attempts that will be retried",
            exporter_retries.clone(),
        );
        let exporter_queue_size = Family::<ExporterLabels, Gauge>::default();
        registry.register(
            "otelcol_exporter_queue_size",
            "Batches in the sending queue",
            exporter_queue_size.clone(),
        );
        let exporter_queue_capacity = Family::<ExporterLabels, Gauge>::default();
        registry.register(
            "otelcol_exporter_queue_capacity",
            "Capacity of the sending queue, in batches",
            exporter_queue_capacity.clone(),
        );
        let batch_send_size = Family::<ProcessorLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(10.0, 2.0, 14))
        });
        registry.register(
            "otelcol_processor_batch_batch_send_size",
            "Spans per batch sent by the batch processor",
            batch_send_size.clone(),
        );
        let export_duration = Family::<ExporterLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "otlp_relay_export_duration_seconds",
            "Time of one export request, from send to response",
            export_duration.clone(),
        );
        let spool_bytes = Family::<ExporterLabels, Gauge>::default();
        registry.register(
            "otlp_relay_spool_bytes",
            "Bytes of segment files in the exporter's spool",
            spool_bytes.clone(),
        );
        let spool_records = Family::<ExporterLabels, Gauge>::default();
        registry.register(
            "otlp_relay_spool_records",
            "Records in the exporter's spool segments not yet deleted",
            spool_records.clone(),
        );
        let spool_corrupt_records = CounterFamily::<ExporterLabels>::default();
        registry.register(
            "otlp_relay_spool_corrupt_records",
            "Damaged spool records found: torn tails truncated, damaged records skipped (their spans count as dropped, reason corrupt)",
            spool_corrupt_records.clone(),
        );
        let dead_letter_spans = CounterFamily::<ExporterLabels>::default();
        registry.register(
            "otlp_relay_dead_letter_spans",
            "Spans refused for good by the destination and kept in the dead-letter directory",
            dead_letter_spans.clone(),
        );
        let exporter_unauthorized = CounterFamily::<ExporterLabels>::default();
        registry.register(
            "otlp_relay_exporter_unauthorized",
            "Export requests the destination answered 401 (the token is refreshed and the batch retried)",
            exporter_unauthorized.clone(),
        );
        let token_requests = CounterFamily::<TokenResultLabels>::default();
        registry.register(
            "otlp_relay_token_requests",
            "Token requests by oauth2client extension and result (success, rejected, error)",
            token_requests.clone(),
        );
        let token_expiry = Family::<TokenLabels, Gauge>::default();
        registry.register(
            "otlp_relay_token_expiry_seconds",
            "Unix time at which the extension's current token expires",
            token_expiry.clone(),
        );
        let component_restarts = CounterFamily::<ComponentLabels>::default();
        registry.register(
            "otlp_relay_component_restarts",
            "Restarts of a supervised task after a panic, by component",
            component_restarts.clone(),
        );
        let receiver_open_connections = Family::<ReceiverLabels, Gauge>::default();
        registry.register(
            "otlp_relay_receiver_open_connections",
            "Connections open on the receiver's listener",
            receiver_open_connections.clone(),
        );
        let receiver_connections_refused = CounterFamily::<RefusedLabels>::default();
        registry.register(
            "otlp_relay_receiver_connections_refused",
            "Connections closed at once on accept, by reason (max_connections)",
            receiver_connections_refused.clone(),
        );
        let receiver_connections_closed = CounterFamily::<RefusedLabels>::default();
        registry.register(
            "otlp_relay_receiver_connections_closed",
            "Connections the receiver closed on a client, by reason (idle_timeout, header_timeout, handshake_timeout, body_timeout)",
            receiver_connections_closed.clone(),
        );
        let processor_dropped_spans = CounterFamily::<ProcessorLabels>::default();
        registry.register(
            "otelcol_processor_dropped_spans",
            "Spans a processor removed on purpose (filter conditions), by processor",
            processor_dropped_spans.clone(),
        );
        Metrics {
            processor_dropped_spans,
            registry,
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
            export_duration,
            exporter_unauthorized,
            token_requests,
            token_expiry,
        }
    }

    /// Counts accepted spans an exporter gave up without a verdict from the destination.
    pub fn count_dropped(&self, exporter: &str, reason: &str, spans: usize) {
        if spans == 0 {
            return;
        }
        self.exporter_dropped_spans
            .get_or_create(&ExporterReasonLabels {
                exporter: exporter.to_string(),
                reason: reason.to_string(),
            })
            .inc_by(spans as u64);
        self.exporter_dropped_total
            .get_or_create(&exporter_labels(exporter))
            .inc_by(spans as u64);
    }

    /// Spans dropped by an exporter so far, over every reason.
    pub fn dropped_spans(&self, exporter: &str) -> u64 {
        self.exporter_dropped_total
            .get_or_create(&exporter_labels(exporter))
            .get()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would leave a partial page, which
        // Prometheus reports as a scrape error.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

pub fn exporter_labels(exporter: &str) -> ExporterLabels {
    ExporterLabels {
        exporter: exporter.to_string(),
    }
}

/// Liveness and readiness. Not ready until receivers are bound, while draining, and while any
/// component reports a reason (e.g. the token endpoint refusing our credentials).
#[derive(Default)]
pub struct Health {
    started: AtomicBool,
    draining: AtomicBool,
    reasons: Mutex<BTreeMap<String, String>>,
}

impl Health {
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Sets (Some) or clears (None) a component's reason for not being ready.
    pub fn set_unready(&self, component: &str, reason: Option<String>) {
        let mut reasons = self.reasons.lock_unpoisoned();
        match reason {
            Some(r) => reasons.insert(component.to_string(), r),
            None => reasons.remove(component),
        };
    }

    /// None when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
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

pub fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The health_check extension's routes.
pub fn health_response(health: &Health, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/" | "/healthz" | "/livez" => text_response(StatusCode::OK, "ok\n"),
        "/readyz" => match health.not_ready() {
            None => text_response(StatusCode::OK, "ready\n"),
            Some(reason) => text_response(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

pub fn metrics_response(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
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
pub type AdminHandler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

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
pub fn error_chain(e: &dyn std::error::Error) -> String {
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
pub async fn bind(component: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
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
        assert_eq!(health_response(&h, "/healthz").status(), StatusCode::OK);
        assert_eq!(health_response(&h, "/readyz").status(), StatusCode::SERVICE_UNAVAILABLE);
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
            .get_or_create(&exporter_labels("otlphttp"))
            .set(10);
        let text = m.encode();
        assert!(
            text.contains("otelcol_receiver_accepted_spans_total{receiver=\"otlp\",transport=\"grpc\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("otelcol_exporter_queue_capacity{exporter=\"otlphttp\"} 10"),
            "{text}"
        );
    }
}
