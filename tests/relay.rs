//! The relay end to end with real processes on loopback: OTLP/gRPC and OTLP/HTTP over mTLS into
//! the counting sink, client certificate checks, the OTLP status rules, retries, permanent
//! failures, experiment routing, fan-out and the SIGTERM drain.
mod support;

use std::time::Duration;

use serde_json::json;
use support::config::RelayConfig;
use support::otlp::{Relay, Sink, loadgen, one_span_request};
use support::pki::Ca;
use support::{http, wait_for};

const T: Duration = Duration::from_secs(30);

/// A relay with plaintext receivers, a batch processor and one otlphttp exporter to `sink`.
fn plain_config(sink: &Sink) -> RelayConfig {
    RelayConfig::new()
        .batch(json!({"send_batch_size": 200, "timeout": "50ms"}))
        .exporter(
            "otlphttp/mlflow",
            json!({
                "endpoint": sink.url(),
                "headers": {"x-mlflow-experiment-id": "0"},
                "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "60s"},
            }),
        )
        .service(json!({"shutdown_timeout": "10s"}))
}

/// Loadgen over plaintext OTLP/gRPC (or OTLP/HTTP with `http`) to `relay`: `traces` traces of
/// `child_spans` + 1 spans in requests of `batch_size` spans; its exit code and report.
fn load(relay: &Relay, http: bool, traces: u32, child_spans: u32, batch_size: u32) -> (i32, serde_json::Value) {
    let endpoint = if http { relay.http } else { relay.grpc }.unwrap().to_string();
    let (traces, child_spans, batch_size) = (traces.to_string(), child_spans.to_string(), batch_size.to_string());
    let mut args = vec![
        "--otlp-insecure",
        "--otlp-endpoint",
        &endpoint,
        "--traces",
        &traces,
        "--child-spans",
        &child_spans,
        "--batch-size",
        &batch_size,
    ];
    if http {
        args.push("--otlp-http");
    }
    loadgen(&args)
}

/// Receiver settings for mTLS that admit the agents namespace's SPIFFE ids only.
fn mtls_receiver(server: &support::pki::LeafFiles, ca: &std::path::Path) -> serde_json::Value {
    json!({"tls": {
        "cert_file": server.cert,
        "key_file": server.key,
        "client_ca_file": ca,
        "allowed_clients": ["spiffe://cluster.local/ns/agents/sa/*"],
    }})
}

#[test]
fn grpc_and_http_over_mtls_reach_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("agents-ca");
    let ca_path = ca.write(dir.path(), "ca");
    let server = ca.server().write(dir.path(), "server");
    let client = ca
        .client("spiffe://cluster.local/ns/agents/sa/weather")
        .write(dir.path(), "client");
    let sink = Sink::start(&[]);
    let tls = mtls_receiver(&server, &ca_path);
    let relay = Relay::start(dir.path(), &plain_config(&sink).receivers(tls).yaml(), "otlp");
    let grpc = format!("https://{}", relay.grpc.unwrap());
    let http_ep = format!("https://{}", relay.http.unwrap());
    let (ca_s, cert_s, key_s) = (
        ca_path.to_str().unwrap(),
        client.cert.to_str().unwrap(),
        client.key.to_str().unwrap(),
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["--otlp-endpoint", &grpc, "--compression", "gzip"],
        vec!["--otlp-endpoint", &http_ep, "--otlp-http"],
        vec![
            "--otlp-endpoint",
            &http_ep,
            "--otlp-http",
            "--encoding",
            "json",
            "--compression",
            "gzip",
        ],
    ];
    let mut total = 0;
    for (i, case) in cases.iter().enumerate() {
        let seed = (i + 1).to_string();
        let mut args = vec![
            "--traces",
            "50",
            "--child-spans",
            "3",
            "--batch-size",
            "20",
            "--seed",
            &seed,
            "--ca-cert",
            ca_s,
            "--mtls",
            "--client-cert",
            cert_s,
            "--client-key",
            key_s,
        ];
        args.extend(case.iter().copied());
        let (code, report) = loadgen(&args);
        assert_eq!(code, 0, "{case:?}: {report}");
        assert_eq!(report["spans_accepted"], 200, "{case:?}: {report}");
        total += 200;
        sink.wait_unique(total, T);
    }
    let stats = sink.stats();
    assert_eq!(stats["experiments"]["0"], total, "{stats}");
    assert_eq!(stats["last"]["content_encoding"], "gzip", "{stats}");
    assert_eq!(
        relay.metric("otelcol_receiver_accepted_spans_total", &[("transport", "grpc")]),
        200.0
    );
    assert_eq!(
        relay.metric("otelcol_receiver_accepted_spans_total", &[("transport", "http")]),
        400.0
    );
    wait_for("sent spans metric", T, || {
        (relay.metric("otelcol_exporter_sent_spans_total", &[("exporter", "otlphttp/mlflow")]) == total as f64)
            .then_some(())
    });
}

#[test]
fn client_certificates_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("agents-ca");
    let other_ca = Ca::new("other-ca");
    let ca_path = ca.write(dir.path(), "ca");
    let server = ca.server().write(dir.path(), "server");
    let good = ca
        .client("spiffe://cluster.local/ns/agents/sa/a")
        .write(dir.path(), "good");
    let outsider = ca
        .client("spiffe://cluster.local/ns/other/sa/b")
        .write(dir.path(), "outsider");
    let foreign = other_ca
        .client("spiffe://cluster.local/ns/agents/sa/a")
        .write(dir.path(), "foreign");
    let expired = ca
        .expired_client("spiffe://cluster.local/ns/agents/sa/a")
        .write(dir.path(), "expired");
    let sink = Sink::start(&[]);
    let tls = mtls_receiver(&server, &ca_path);
    let relay = Relay::start(dir.path(), &plain_config(&sink).receivers(tls).yaml(), "otlp");
    let grpc = format!("https://{}", relay.grpc.unwrap());
    let http_ep = format!("https://{}", relay.http.unwrap());
    let ca_s = ca_path.to_str().unwrap();
    let run = |endpoint: &str, http_mode: bool, cert: Option<&support::pki::LeafFiles>| {
        let mut args = vec![
            "--traces",
            "2",
            "--max-retries",
            "0",
            "--timeout",
            "5s",
            "--otlp-endpoint",
            endpoint,
            "--ca-cert",
            ca_s,
        ];
        if http_mode {
            args.push("--otlp-http");
        }
        if let Some(c) = cert {
            args.extend([
                "--mtls",
                "--client-cert",
                c.cert.to_str().unwrap(),
                "--client-key",
                c.key.to_str().unwrap(),
            ]);
        }
        loadgen(&args)
    };
    for (endpoint, http_mode) in [(&grpc, false), (&http_ep, true)] {
        let (code, r) = run(endpoint, http_mode, Some(&good));
        assert_eq!(
            (code, &r["spans_accepted"]),
            (0, &serde_json::json!(4)),
            "good client: {r}"
        );
        for (name, cert) in [
            ("no certificate", None),
            ("another CA", Some(&foreign)),
            ("expired", Some(&expired)),
        ] {
            let (_, r) = run(endpoint, http_mode, cert);
            assert_eq!(r["spans_accepted"], 0, "{name} over {endpoint}: {r}");
            // The connection itself failed: no HTTP status ever came back.
            let refused = r["refused_by"].as_object().unwrap();
            assert!(
                !refused.keys().any(|k| k.starts_with("http_")),
                "{name} over {endpoint}: {r}"
            );
        }
        let (_, r) = run(endpoint, http_mode, Some(&outsider));
        assert_eq!(r["spans_accepted"], 0, "{r}");
        let key = if http_mode {
            "http_403"
        } else {
            "grpc_PERMISSION_DENIED"
        };
        assert_eq!(r["refused_by"][key], 4, "outsider: {r}");
    }
    sink.wait_unique(8, T);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_rules_follow_otlp() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let relay = Relay::start(
        dir.path(),
        &plain_config(&sink)
            .receivers(json!({"max_recv_msg_size_mib": 1}))
            .yaml(),
        "otlp",
    );
    let addr = relay.http.unwrap();
    let proto = [("content-type", "application/x-protobuf")];
    let post = |headers: &[(&str, &str)], body: &[u8]| http("POST", addr, "/v1/traces", headers, body);

    assert_eq!(post(&proto, &one_span_request("x")).0, 200);
    assert_eq!(post(&proto, b"").0, 200, "empty request is a success");
    assert_eq!(post(&[("content-type", "application/json")], b"").0, 200);
    let (s, body) = post(&proto, b"\x0a\x05\x01");
    assert_eq!(s, 400);
    let status = tonic_types::Status::decode(body.as_slice()).expect("google.rpc.Status body");
    assert_eq!(status.code, tonic::Code::InvalidArgument as i32);
    let (s, body) = post(&[("content-type", "application/json; charset=utf-8")], b"{nope");
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&body).contains("\"code\":3"));
    // A client that sent neither protobuf nor JSON (curl, a browser) reads why in plain text.
    let (s, body) = post(&[("content-type", "text/plain")], b"x");
    assert_eq!(s, 415);
    let text = String::from_utf8(body).expect("a readable body");
    assert!(
        text.contains("use application/x-protobuf or application/json"),
        "{text}"
    );
    assert_eq!(
        post(
            &[("content-type", "application/x-protobuf"), ("content-encoding", "br")],
            b"x"
        )
        .0,
        415
    );
    assert_eq!(http("GET", addr, "/v1/traces", &[], b"").0, 405);
    assert_eq!(http("POST", addr, "/v1/metrics", &proto, b"").0, 404);
    // Oversize on the wire, and a gzip bomb: 1 KiB compressed, 8 MiB inflated.
    assert_eq!(post(&proto, &vec![0u8; 1024 * 1024 + 1]).0, 413);
    // A client still sending an oversized body reads the 413, not a connection reset (which OTLP
    // exporters would retry): 16 MiB cannot all wait in socket buffers, so the relay must read it.
    assert_eq!(post(&proto, &vec![0u8; 16 * 1024 * 1024]).0, 413);
    assert_eq!(
        post(&[("content-type", "text/plain")], &vec![0u8; 16 * 1024 * 1024]).0,
        415
    );
    let bomb = support::gzip(&vec![0u8; 8 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    assert_eq!(
        post(
            &[("content-type", "application/x-protobuf"), ("content-encoding", "gzip")],
            &bomb
        )
        .0,
        413
    );
    // gzip body, valid: accepted.
    let zipped = support::gzip(&one_span_request("x"));
    assert_eq!(
        post(
            &[("content-type", "application/x-protobuf"), ("content-encoding", "gzip")],
            &zipped
        )
        .0,
        200
    );

    // gRPC: oversize → RESOURCE_EXHAUSTED.
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    let mut client = TraceServiceClient::connect(format!("http://{}", relay.grpc.unwrap()))
        .await
        .unwrap();
    let big = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![1; 16],
                    span_id: vec![2; 8],
                    name: "x".repeat(2 * 1024 * 1024),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let err = client.export(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let ok = client
        .export(ExportTraceServiceRequest::decode(one_span_request("x").as_slice()).unwrap())
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let err = client.export(ExportTraceServiceRequest::default()).await;
    assert!(err.is_ok(), "empty gRPC request is a success: {err:?}");
    // The three accepted copies of the same span arrive (counted once as unique).
    wait_for("3 spans at the sink", T, || {
        (sink.stats()["spans"].as_u64() == Some(3)).then_some(())
    });
}

#[test]
fn retryable_answers_are_retried_and_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--fail-first", "3", "--status", "503", "--retry-after", "0"]);
    let relay = Relay::start(dir.path(), &plain_config(&sink).yaml(), "otlp");
    let (code, r) = load(&relay, false, 25, 3, 100);
    assert_eq!(code, 0, "{r}");
    let stats = sink.wait_unique(100, T);
    assert_eq!(stats["spans"], 100, "delivered once, not duplicated: {stats}");
    assert_eq!(stats["failures"]["503"], 3, "{stats}");
    wait_for("sent metric", T, || {
        (relay.metric("otelcol_exporter_sent_spans_total", &[]) == 100.0).then_some(())
    });
    assert!(relay.metric("otlp_relay_exporter_retries_total", &[("reason", "server_busy")]) >= 3.0);
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 0.0);
}

#[test]
fn permanent_failures_are_counted_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--status", "400"]);
    // Without poison-trace isolation, which resends a refused request's traces in halves.
    let config =
        plain_config(&sink).exporter_settings("otlphttp/mlflow", json!({"mlflow": {"isolate_poison_traces": false}}));
    let relay = Relay::start(dir.path(), &config.yaml(), "otlp");
    let (code, r) = load(&relay, true, 10, 1, 20);
    assert_eq!(code, 0, "the relay accepted the spans: {r}");
    wait_for("failed metric", T, || {
        (relay.metric("otelcol_exporter_send_failed_spans_total", &[]) == 20.0).then_some(())
    });
    let stats = sink.stats();
    assert_eq!(stats["requests"], 1, "a 400 is not retried: {stats}");
    assert_eq!(relay.metric("otelcol_exporter_sent_spans_total", &[]), 0.0);
    assert!(
        relay.proc.output_text().contains("export failed permanently"),
        "logged with the body"
    );
}

#[test]
fn experiments_route_by_resource_attribute_and_request_header() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let relay = Relay::start(
        dir.path(),
        &plain_config(&sink).receivers(json!({"include_metadata": true})).yaml(),
        "otlp",
    );
    let grpc = relay.grpc.unwrap().to_string();
    let http_ep = relay.http.unwrap().to_string();
    let base = ["--otlp-insecure", "--traces", "10", "--child-spans", "1"];
    let runs: Vec<Vec<&str>> = vec![
        vec!["--otlp-endpoint", &grpc, "--seed", "1"],
        vec![
            "--otlp-endpoint",
            &grpc,
            "--seed",
            "2",
            "--otlp-attributes",
            "mlflow.experiment_id=\"7\"",
        ],
        vec![
            "--otlp-endpoint",
            &http_ep,
            "--otlp-http",
            "--seed",
            "3",
            "--otlp-header",
            "x-mlflow-experiment-id=\"9\"",
        ],
    ];
    for extra in runs {
        let args: Vec<&str> = base.iter().copied().chain(extra).collect();
        let (code, r) = loadgen(&args);
        assert_eq!(code, 0, "{r}");
    }
    let stats = sink.wait_unique(60, T);
    assert_eq!(stats["experiments"]["0"], 20, "{stats}");
    assert_eq!(stats["experiments"]["7"], 20, "{stats}");
    assert_eq!(stats["experiments"]["9"], 20, "{stats}");
}

#[test]
fn fan_out_isolates_a_failing_exporter() {
    let dir = tempfile::tempdir().unwrap();
    let healthy = Sink::start(&[]);
    let broken = Sink::start(&["--status", "503"]);
    // One sender for the broken exporter, retrying without end: it holds one batch and the
    // rest wait in its queue.
    let config = plain_config(&healthy)
        .exporter(
            "otlphttp/broken",
            json!({
                "endpoint": broken.url(),
                "retry_on_failure": {"initial_interval": "1s", "max_elapsed_time": "0s"},
                "sending_queue": {"queue_size": 100, "num_consumers": 1},
            }),
        )
        .yaml();
    let relay = Relay::start(dir.path(), &config, "otlp");
    let (code, r) = load(&relay, false, 100, 4, 50);
    assert_eq!(code, 0, "{r}");
    healthy.wait_unique(500, T);
    assert!(broken.stats()["requests"].as_u64().unwrap() >= 1);
    assert_eq!(
        relay.metric("otelcol_exporter_sent_spans_total", &[("exporter", "otlphttp/broken")]),
        0.0
    );
    // The broken exporter's backlog waits in its own queue (nothing given up, nothing lost), and
    // the healthy one's queue is empty.
    let broken_queue = ("exporter", "otlphttp/broken");
    let queued = wait_for("the broken exporter's queue to hold its backlog", T, || {
        let q = relay.metric("otelcol_exporter_queue_size", &[broken_queue]);
        (q >= 1.0).then_some(q)
    });
    assert!(queued <= 100.0, "{queued} batches queued, capacity 100");
    assert_eq!(
        relay.metric("otelcol_exporter_send_failed_spans_total", &[broken_queue]),
        0.0
    );
    assert_eq!(
        relay.metric("otelcol_exporter_queue_size", &[("exporter", "otlphttp/mlflow")]),
        0.0
    );
}

#[test]
fn sigterm_drains_everything_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // A slow destination: batches are still queued when SIGTERM arrives.
    let sink = Sink::start(&["--delay-ms", "300"]);
    let relay_cfg = plain_config(&sink)
        .exporter_settings("otlphttp/mlflow", json!({"sending_queue": {"num_consumers": 1}}))
        .batch(json!({"send_batch_size": 50}))
        .yaml();
    let mut relay = Relay::start(dir.path(), &relay_cfg, "otlp");
    let (code, r) = load(&relay, false, 100, 4, 50);
    assert_eq!(code, 0, "{r}");
    assert!(
        sink.stats()["unique_spans"].as_u64().unwrap() < 500,
        "the drain must have work left to do"
    );
    let health = relay.health.unwrap();
    relay.proc.signal("TERM");
    // Not ready while draining (the health endpoint stays up until the drain is done).
    let saw_draining = wait_for("readiness to drop", T, || {
        let out = std::net::TcpStream::connect(health)
            .ok()
            .map(|_| support::get_text(health, "/readyz"));
        match out {
            Some((503, _)) => Some(true),
            None => Some(false),
            _ => None,
        }
    });
    assert!(saw_draining || sink.stats()["unique_spans"] == 500);
    assert_eq!(relay.proc.wait_exit(T), Some(0));
    assert_eq!(sink.stats()["unique_spans"], 500);
    let log = relay.proc.output_text();
    assert!(
        log.contains("accepted=500 sent=500 failed=0 dropped=0 balanced=true"),
        "{log}"
    );
}

#[test]
fn drain_deadline_counts_the_rest_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--status", "503"]);
    let relay_cfg = plain_config(&sink).service(json!({"shutdown_timeout": "1s"})).yaml();
    let mut relay = Relay::start(dir.path(), &relay_cfg, "otlp");
    // loadgen's default batch size.
    let (code, _) = load(&relay, false, 10, 1, 100);
    assert_eq!(code, 0);
    wait_for("a first attempt", T, || {
        (sink.stats()["requests"].as_u64() >= Some(1)).then_some(())
    });
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(T), Some(0));
    let log = relay.proc.output_text();
    assert!(
        log.contains("accepted=20 sent=0 failed=0 dropped=20 balanced=true"),
        "{log}"
    );
}

#[test]
fn bad_config_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    // The port is taken by us: a relay that bound before validating would fail differently.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "receivers: {{otlp: {{protocols: {{grpc: {{endpoint: '{}', bogus: 1}}}}}}}}\nexporters: {{debug: {{}}}}\nservice: {{pipelines: {{traces: {{receivers: [otlp], exporters: [debug, nope]}}}}}}\n",
        taken.local_addr().unwrap()
    );
    let path = support::write_file(dir.path(), "bad.yaml", &config);
    let mut run = support::Proc::relay("relay", &["run", "--config", path.to_str().unwrap()]);
    assert_eq!(run.wait_exit(T), Some(64));
    let out = run.output_text();
    assert!(
        out.contains("receivers.otlp.protocols.grpc.bogus: unknown field"),
        "{out}"
    );
    assert!(
        out.contains("service.pipelines.traces.exporters[1]: \"nope\" is not defined"),
        "{out}"
    );
    assert!(!out.contains("cannot listen"), "{out}");
    let mut check = support::Proc::relay("check", &["check", "--config", path.to_str().unwrap()]);
    assert_eq!(check.wait_exit(T), Some(1));
    assert_eq!(check.output_text().lines().filter(|l| l.starts_with("  ")).count(), 2);
    let good = support::write_file(
        dir.path(),
        "good.yaml",
        &std::fs::read_to_string(support::repo_root().join("config.yaml")).unwrap(),
    );
    let mut check = support::Proc::relay("check", &["check", "--config", good.to_str().unwrap()]);
    assert_eq!(check.wait_exit(T), Some(0), "{}", check.output_text());
}

/// A spool that cannot be opened is a configuration problem like the others: exit 64 with the
/// YAML path, before any port is bound (the metrics port is taken by us: a relay that bound
/// first would fail with "cannot listen" and 1). Both ways a spool fails to open: a directory
/// that cannot be made (under a regular file, so root cannot make it either), and a directory
/// another relay holds.
#[test]
fn unusable_spool_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = |spool: &std::path::Path, metrics: &str| {
        format!(
            r#"
receivers: {{otlp: {{protocols: {{http: {{endpoint: "127.0.0.1:0"}}}}}}}}
exporters:
  otlphttp/mlflow:
    endpoint: http://127.0.0.1:9
    sending_queue: {{storage: file_storage/spool}}
extensions:
  file_storage/spool: {{directory: "{}"}}
service:
  extensions: [file_storage/spool]
  pipelines: {{traces: {{receivers: [otlp], exporters: [otlphttp/mlflow]}}}}
  telemetry: {{metrics: {{address: "{metrics}"}}}}
"#,
            spool.display()
        )
    };
    let refused = |name: &str, spool: &std::path::Path, why: &str| {
        let path = support::write_file(
            dir.path(),
            name,
            &config(spool, &taken.local_addr().unwrap().to_string()),
        );
        let mut run = support::Proc::relay("relay", &["run", "--config", path.to_str().unwrap()]);
        assert_eq!(run.wait_exit(T), Some(64), "{}", run.output_text());
        let out = run.output_text();
        assert!(out.contains("extensions.file_storage/spool: spool directory"), "{out}");
        assert!(out.contains(why), "{out}");
        assert!(!out.contains("listening") && !out.contains("cannot listen"), "{out}");
    };

    let file = support::write_file(dir.path(), "not-a-directory", "");
    refused("under-a-file.yaml", &file.join("spool"), "Not a directory");

    let shared = dir.path().join("shared");
    let first = support::write_file(dir.path(), "first.yaml", &config(&shared, "127.0.0.1:0"));
    let mut holder = support::Proc::relay("relay", &["run", "--config", first.to_str().unwrap()]);
    holder.wait_line("relay started", T);
    refused("second.yaml", &shared, "in use by another process");
    holder.signal("TERM");
    assert_eq!(holder.wait_exit(T), Some(0), "{}", holder.output_text());
}

#[test]
fn runtime_threads_follow_the_flag_and_refuse_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = "receivers: {otlp: {protocols: {http: {endpoint: '127.0.0.1:0'}}}}\nexporters: {debug: {}}\nservice: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}, telemetry: {metrics: {address: '127.0.0.1:0'}}}\n";
    let path = support::write_file(dir.path(), "config.yaml", config);
    let path = path.to_str().unwrap();
    let mut one = support::Proc::relay("relay", &["run", "--threads", "1", "--config", path]);
    let started = one.wait_line("relay started", T);
    assert!(started.contains("threads=1"), "{started}");
    let mut three = support::Proc::relay("relay", &["--threads", "3", "run", "--config", path]);
    let started = three.wait_line("relay started", T);
    assert!(started.contains("threads=3"), "{started}");
    let mut zero = support::Proc::relay("relay", &["run", "--threads", "0", "--config", path]);
    assert_eq!(zero.wait_exit(T), Some(2));
    assert!(zero.output_text().contains("--threads"), "{}", zero.output_text());
}
