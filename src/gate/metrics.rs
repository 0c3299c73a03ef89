//! The gate's Prometheus metrics: requests by status, auth failures by reason, upstream latency.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct GateMetrics {
    registry: Registry,
    pub requests: Family<StatusLabel, Counter>,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub upstream_seconds: Histogram,
}

impl GateMetrics {
    pub fn new() -> GateMetrics {
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
        GateMetrics {
            registry,
            requests,
            auth_failures,
            upstream_seconds,
        }
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason: reason.into() })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Default for GateMetrics {
    fn default() -> Self {
        Self::new()
    }
}
