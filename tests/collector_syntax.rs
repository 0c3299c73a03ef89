//! A collector config written for the otel-collector runs unchanged: `${VAR}` and `${file:...}`
//! references, the `otlp_http` name, metric readers and resource, memory_limiter percentages
//! anywhere in the list, health_check's path and its draining answer, CORS for browsers; what
//! the relay does not do is said by `check` and at start, not silently ignored.
mod support;

use std::time::Duration;

use support::otlp::{Relay, Sink, one_span_request};
use support::{Proc, free_port, http_exchange, restartable_port, wait_for, write_file};

const T: Duration = Duration::from_secs(30);

fn collector_config(metrics_port: u16, token: &std::path::Path) -> String {
    format!(
        r#"
receivers:
  otlp:
    protocols:
      http:
        endpoint: "127.0.0.1:0"
        include_metadata: ${{INCLUDE_METADATA}}
        cors:
          allowed_origins: ["https://*.example.com"]
          allowed_headers: ["X-MLflow-Experiment-Id"]
          max_age: 7200
processors:
  batch: {{timeout: 20ms}}
  memory_limiter: {{check_interval: 1s, limit_percentage: 75, spike_limit_percentage: 15}}
exporters:
  otlp_http/mlflow:
    endpoint: ${{SINK_URL}}
    headers: {{x-mlflow-experiment-id: "${{file:{token}}}"}}
extensions:
  health_check: {{endpoint: "127.0.0.1:0", path: /health/status}}
service:
  extensions: [health_check]
  telemetry:
    resource: {{service.name: my-relay}}
    metrics:
      level: detailed
      readers:
        - pull: {{exporter: {{prometheus: {{host: 127.0.0.1, port: {metrics_port}}}}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [batch, memory_limiter], exporters: [otlp_http/mlflow]}}
"#,
        token = token.display(),
    )
}

#[test]
fn a_collector_config_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let token = write_file(dir.path(), "experiment", "7\n");
    let metrics_port = free_port();
    let config = collector_config(metrics_port, &token);
    let relay = Relay::start_with_env(
        dir.path(),
        &config,
        "otlp",
        &[("INCLUDE_METADATA", "true"), ("SINK_URL", &sink.url())],
    );
    // The pull reader's port, not the default 8888.
    assert_eq!(relay.metrics.port(), metrics_port);
    let log = relay.proc.output_text();
    assert!(
        log.contains("service.pipelines.traces.processors[1]") && log.contains("memory_limiter is not the first"),
        "{log}"
    );

    let http = relay.http.unwrap();
    // Preflight from an allowed origin, asking for the experiment header.
    let (status, h, _) = http_exchange(
        "OPTIONS",
        http,
        "/v1/traces",
        &[
            ("origin", "https://ui.example.com"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type,x-mlflow-experiment-id"),
        ],
        b"",
    );
    assert_eq!(status, 204);
    assert_eq!(h["access-control-allow-origin"], "https://ui.example.com");
    assert_eq!(h["access-control-max-age"], "7200");
    assert!(
        h["access-control-allow-headers"].contains("x-mlflow-experiment-id"),
        "{h:?}"
    );
    // Another origin, or a header not allowed: no allow headers, the browser refuses.
    for (origin, headers) in [
        ("https://example.com.evil.net", "content-type"),
        ("https://ui.example.com", "content-type,x-secret"),
    ] {
        let (status, h, _) = http_exchange(
            "OPTIONS",
            http,
            "/v1/traces",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", headers),
            ],
            b"",
        );
        assert_eq!(status, 204);
        assert!(
            !h.contains_key("access-control-allow-origin"),
            "{origin} {headers}: {h:?}"
        );
    }
    // The request itself: the browser may read the answer.
    let (status, h, _) = http_exchange(
        "POST",
        http,
        "/v1/traces",
        &[
            ("origin", "https://ui.example.com"),
            ("content-type", "application/x-protobuf"),
        ],
        &one_span_request("from-a-browser"),
    );
    assert_eq!(status, 200);
    assert_eq!(h["access-control-allow-origin"], "https://ui.example.com");
    sink.wait_unique(1, T);

    // Resource attributes are labels on every metric, with the collector's defaults.
    let (_, text) = support::get_text(relay.metrics, "/metrics");
    let accepted = text
        .lines()
        .find(|l| l.starts_with("otelcol_receiver_accepted_spans_total{"))
        .unwrap_or_else(|| panic!("{text}"));
    for label in [
        "service_name=\"my-relay\"",
        "service_instance_id=\"",
        "service_version=\"",
    ] {
        assert!(accepted.contains(label), "{label} in {accepted}");
    }
    // What a collector dashboard's variables and alerts need: process metrics, and refusal
    // series present at zero before the first refusal.
    for prefix in [
        "otelcol_process_uptime{",
        "otelcol_process_memory_rss{",
        "otelcol_process_cpu_seconds{",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} in {text}"));
        assert!(line.contains("service_instance_id=\""), "{line}");
    }
    let refused_at_zero = text
        .lines()
        .find(|l| l.starts_with("otelcol_receiver_refused_spans_total{") && l.contains("reason=\"memory_limit\""))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(refused_at_zero.ends_with(" 0"), "{refused_at_zero}");

    // The collector's health status on the configured path; ours besides.
    let health = relay.health.unwrap();
    let (status, body) = support::get_text(health, "/health/status");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "Server available");
    assert_eq!(support::get_text(health, "/healthz").0, 200);
    assert_eq!(support::get_text(health, "/nope").0, 404);
}

/// While draining (a destination that is down holds the shutdown for its deadline) the
/// configured health path answers 503, so a load balancer stops sending.
#[test]
fn the_health_path_answers_503_while_draining() {
    let dir = tempfile::tempdir().unwrap();
    let down = restartable_port();
    let config = format!(
        r#"
receivers: {{otlp: {{protocols: {{http: {{endpoint: "127.0.0.1:0"}}}}}}}}
exporters:
  otlp_http: {{endpoint: "http://127.0.0.1:{down}", retry_on_failure: {{initial_interval: 50ms}}}}
extensions:
  health_check: {{endpoint: "127.0.0.1:0", path: /status, response_body: {{healthy: up, unhealthy: down}}}}
service:
  extensions: [health_check]
  shutdown_timeout: 20s
  telemetry: {{metrics: {{address: "127.0.0.1:0"}}}}
  pipelines: {{traces: {{receivers: [otlp], exporters: [otlp_http]}}}}
"#
    );
    let mut relay = Relay::start(dir.path(), &config, "otlp");
    let health = relay.health.unwrap();
    assert_eq!(support::get_text(health, "/status"), (200, "up".to_string()));
    let (status, _) = support::http(
        "POST",
        relay.http.unwrap(),
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &one_span_request("held"),
    );
    assert_eq!(status, 200);
    relay.proc.wait_line("export failed; will retry", T);
    relay.proc.signal("TERM");
    wait_for("503 on the health path while draining", T, || {
        (support::get_text(health, "/status") == (503, "down".to_string())).then_some(())
    });
}

#[test]
fn metrics_level_none_binds_no_metrics_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "config.yaml",
        r#"
receivers: {otlp: {protocols: {http: {endpoint: "127.0.0.1:0"}}}}
exporters: {debug: {}}
service:
  telemetry: {metrics: {level: none}}
  pipelines: {traces: {receivers: [otlp], exporters: [debug]}}
"#,
    );
    let mut relay = Proc::relay("relay", &["run", "--config", path.to_str().unwrap()]);
    relay.wait_line("relay started", T);
    let log = relay.output_text();
    assert!(log.contains("component=otlp-http"), "{log}");
    assert!(!log.contains("component=metrics"), "{log}");
    relay.signal("TERM");
    assert_eq!(relay.wait_exit(T), Some(0));
}

#[test]
fn check_names_unsupported_components_and_prints_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let warned = write_file(
        dir.path(),
        "warned.yaml",
        r#"
receivers: {otlp: {protocols: {http: {}}}}
processors: {batch: {metadata_keys: [tenant]}, memory_limiter: {limit_mib: 100}}
exporters: {otlp_http: {endpoint: "http://127.0.0.1:5000"}}
service:
  telemetry: {logs: {encoding: json}}
  pipelines: {traces: {receivers: [otlp], processors: [batch, memory_limiter], exporters: [otlp_http]}}
"#,
    );
    let mut check = Proc::relay("check", &["check", "--config", warned.to_str().unwrap()]);
    assert_eq!(check.wait_exit(T), Some(0), "{}", check.output_text());
    let out = check.output_text();
    for expected in [
        "3 warning(s):",
        "  warning: processors.batch.metadata_keys: accepted for collector compatibility but not acted on",
        "  warning: service.telemetry.logs.encoding: accepted",
        "  warning: service.pipelines.traces.processors[1]: memory_limiter is not the first processor",
    ] {
        assert!(out.contains(expected), "{expected:?} in {out}");
    }

    let fanout = write_file(
        dir.path(),
        "fanout.yaml",
        r#"
receivers: {otlp: {protocols: {http: {}}}}
exporters:
  otlp_http/mlflow: {endpoint: "http://127.0.0.1:5000"}
  zipkin/legacy: {endpoint: "http://zipkin:9411/api/v2/spans"}
extensions: {zpages: {}}
service:
  extensions: [zpages]
  pipelines: {traces: {receivers: [otlp], exporters: [otlp_http/mlflow, zipkin/legacy]}}
"#,
    );
    let mut check = Proc::relay("check", &["check", "--config", fanout.to_str().unwrap()]);
    assert_eq!(check.wait_exit(T), Some(1));
    let out = check.output_text();
    assert!(
        out.contains("exporters.zipkin/legacy: the \"zipkin\" exporter is not supported by this relay")
            && out.contains("otlp (OTLP/gRPC)"),
        "{out}"
    );
    assert!(
        out.contains("extensions.zpages: the \"zpages\" extension is not supported"),
        "{out}"
    );
    assert!(!out.contains("not defined"), "{out}");
    assert!(
        out.contains(
            "service.pipelines.traces.exporters[1]: \"zipkin/legacy\" is defined under exporters but cannot be used"
        ),
        "{out}"
    );
}
