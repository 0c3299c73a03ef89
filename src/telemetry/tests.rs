//! Unit tests of the relay's metrics and health.
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;

use super::health::{go_duration, rfc3339};
use super::process::cpu_ticks;
use super::*;
use crate::config::HealthCheckConfig;

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
        text.contains(
            "otelcol_exporter_queue_capacity{service_name=\"relay-a\",exporter=\"otlphttp\",data_type=\"traces\"} 10"
        ),
        "{text}"
    );
    let id = instance_id();
    assert_eq!((id.len(), id.as_bytes()[14]), (36, b'4'), "{id}");
    assert_ne!(id, instance_id());
}
