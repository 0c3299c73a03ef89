//! The gate's Prometheus metrics: requests by status, auth failures by reason, upstream latency,
//! connections (open, refused at the cap, closed by a timeout, accept errors), session checks.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabel {
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: String,
}

/// Which listener (`public`, `admin`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerLabel {
    pub(crate) listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

pub(crate) struct GateMetrics {
    registry: Registry,
    pub(crate) requests: Family<StatusLabel, Counter>,
    pub(crate) auth_failures: Family<ReasonLabel, Counter>,
    pub(crate) upstream_seconds: Histogram,
    pub(crate) connections_open: Family<ListenerLabel, Gauge>,
    /// Accepted then closed at once: GATE_MAX_CONNECTIONS reached.
    pub(crate) connections_refused: Family<ListenerLabel, Counter>,
    /// Closed by the header-read or idle timeout.
    pub(crate) connections_timed_out: Family<ListenerLabel, Counter>,
    pub(crate) accept_errors: Family<ListenerLabel, Counter>,
    /// Answered 503 at once: as many requests in flight as GATE_MAX_CONNECTIONS.
    pub(crate) requests_refused: Family<ListenerLabel, Counter>,
    /// Browser sessions checked with the provider: active, ended, error.
    pub(crate) session_checks: Family<ResultLabel, Counter>,
}

impl GateMetrics {
    pub(crate) fn new() -> GateMetrics {
        let mut registry = Registry::default();
        let requests = Family::<StatusLabel, Counter>::default();
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        let upstream_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("gate_requests", "Requests answered, by HTTP status", requests.clone());
        registry.register(
            "gate_auth_failures",
            "Requests refused by authentication or authorization, by reason",
            auth_failures.clone(),
        );
        registry.register(
            "gate_upstream_duration_seconds",
            "Time from sending a request to MLflow to its response head",
            upstream_seconds.clone(),
        );
        let connections_open = Family::<ListenerLabel, Gauge>::default();
        let connections_refused = Family::<ListenerLabel, Counter>::default();
        let connections_timed_out = Family::<ListenerLabel, Counter>::default();
        let accept_errors = Family::<ListenerLabel, Counter>::default();
        let requests_refused = Family::<ListenerLabel, Counter>::default();
        let session_checks = Family::<ResultLabel, Counter>::default();
        registry.register(
            "gate_connections_open",
            "Client connections open",
            connections_open.clone(),
        );
        registry.register(
            "gate_connections_refused",
            "Connections closed at once because GATE_MAX_CONNECTIONS were open",
            connections_refused.clone(),
        );
        registry.register(
            "gate_connections_timed_out",
            "Connections closed by the header-read or idle timeout",
            connections_timed_out.clone(),
        );
        registry.register("gate_accept_errors", "Failed accept() calls", accept_errors.clone());
        registry.register(
            "gate_requests_refused",
            "Requests answered 503 because GATE_MAX_CONNECTIONS requests were in flight",
            requests_refused.clone(),
        );
        registry.register(
            "gate_session_checks",
            "Browser sessions re-checked with the identity provider, by result",
            session_checks.clone(),
        );
        GateMetrics {
            registry,
            requests,
            auth_failures,
            upstream_seconds,
            connections_open,
            connections_refused,
            connections_timed_out,
            accept_errors,
            requests_refused,
            session_checks,
        }
    }

    pub(crate) fn auth_failure(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason: reason.into() })
            .inc();
    }

    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; should the encoder, Prometheus reports a scrape error.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode gate metrics");
        }
        out
    }
}

impl Default for GateMetrics {
    fn default() -> Self {
        Self::new()
    }
}
