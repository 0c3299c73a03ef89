//! The `otlp` (`otlp_grpc`) exporter against real gRPC servers on 127.0.0.1: the sink (counting
//! every span by id, playing failures, serving TLS and mTLS) and, where the test must see the
//! metadata or answer partial success, a tonic TraceService served here. Spans go in over the
//! relay's OTLP/HTTP receiver.
mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::{Value, json};
use support::config::{RelayConfig, merge};
use support::otlp::{Relay, Sink, spans_request, stats};
use support::pki::Ca;
use support::{Proc, http, restartable_port, wait_for, write_file};

const T: Duration = Duration::from_secs(30);

fn post(relay: &Relay, body: &[u8]) {
    let (status, answer) = http(
        "POST",
        relay.http.expect("an http receiver"),
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        body,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

/// The relay's HTTP receiver, a quick batch processor, and no exporter yet.
fn relay_config() -> RelayConfig {
    RelayConfig::new()
        .without_transport("grpc")
        .batch(json!({"send_batch_size": 100, "timeout": "20ms"}))
}

/// An `otlp` exporter to `addr` in plaintext with quick retries, `extra` merged in.
fn grpc_exporter(addr: SocketAddr, extra: Value) -> Value {
    let mut e = json!({
        "endpoint": addr.to_string(),
        "tls": {"insecure": true},
        "retry_on_failure": {"initial_interval": "20ms", "max_interval": "300ms"},
    });
    merge(&mut e, extra);
    e
}

fn sent(relay: &Relay, exporter: &str) -> f64 {
    relay.metric("otelcol_exporter_sent_spans_total", &[("exporter", exporter)])
}

fn failed(relay: &Relay, exporter: &str) -> f64 {
    relay.metric("otelcol_exporter_send_failed_spans_total", &[("exporter", exporter)])
}

fn retries(relay: &Relay, exporter: &str) -> f64 {
    relay.metric("otlp_relay_exporter_retries_total", &[("exporter", exporter)])
}

/// Fan-out, the point of the exporter: one pipeline to MLflow over OTLP/HTTP (experiment header)
/// and to three gRPC stores, one per compression. Every store counts every span by id.
#[test]
fn fans_out_to_otlphttp_and_grpc_with_each_compression() {
    let dir = tempfile::tempdir().unwrap();
    let mlflow = Sink::start(&[]);
    let stores: Vec<(String, &str, Sink)> = [("otlp_grpc/gzip", "gzip"), ("otlp/zstd", "zstd"), ("otlp/none", "none")]
        .into_iter()
        .map(|(id, c)| (id.to_string(), c, Sink::start(&[])))
        .collect();
    let mut config = relay_config().mlflow_exporter(&mlflow.url(), json!({}));
    for (id, compression, sink) in &stores {
        let extra = match *compression {
            // gzip is the default: written nowhere.
            "gzip" => json!({}),
            c => json!({"compression": c}),
        };
        config = config.exporter(id, grpc_exporter(sink.grpc, extra));
    }
    let relay = Relay::start(dir.path(), &config.yaml(), "otlp");
    for tag in 1..=3u8 {
        post(&relay, &spans_request(tag, 50));
    }
    let stats = mlflow.wait_unique(150, T);
    assert_eq!(stats["experiments"]["0"], 150, "{stats}");
    for (id, compression, sink) in &stores {
        let s = sink.wait_unique(150, T);
        assert_eq!(s["last"]["transport"], "grpc", "{id}: {s}");
        let encoding = s["last"]["content_encoding"].as_str();
        match *compression {
            "none" => assert!(encoding.is_none() || encoding == Some("identity"), "{id}: {s}"),
            c => assert_eq!(encoding, Some(c), "{id}: {s}"),
        }
        // Not sent to MLflow's experiment: nothing MLflow-shaped rides on the gRPC calls.
        assert_eq!(s["last"]["experiment_id"], Value::Null, "{id}: {s}");
        wait_for(&format!("{id} counted sent"), T, || {
            (sent(&relay, id) == 150.0).then_some(())
        });
    }
}

/// One call as the scripted server saw it.
#[derive(Debug, Clone)]
struct Seen {
    metadata: Vec<(String, String)>,
    spans: usize,
}

#[derive(Default)]
struct Script {
    /// The partial success of each call in turn: this many spans rejected (then plain OK).
    rejections: Mutex<VecDeque<i64>>,
    seen: Mutex<Vec<Seen>>,
}

/// The service tonic serves: the shared script.
struct Scripted(Arc<Script>);

#[tonic::async_trait]
impl TraceService for Scripted {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let metadata = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        let spans = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.seen.lock().unwrap().push(Seen { metadata, spans });
        let partial_success = self
            .0
            .rejections
            .lock()
            .unwrap()
            .pop_front()
            .map(|n| ExportTracePartialSuccess {
                rejected_spans: n,
                error_message: "spans too old".into(),
            });
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success }))
    }
}

/// A TraceService on 127.0.0.1:0 (h2c), on its own runtime, answering as its script says.
struct ScriptedServer {
    addr: SocketAddr,
    script: Arc<Script>,
    _rt: tokio::runtime::Runtime,
}

impl ScriptedServer {
    fn start(rejections: Vec<i64>) -> ScriptedServer {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let script = Arc::new(Script {
            rejections: Mutex::new(rejections.into()),
            ..Default::default()
        });
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(Scripted(script.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Zstd);
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(service.clone());
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .http2_only()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ScriptedServer { addr, script, _rt: rt }
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.seen.lock().unwrap().clone()
    }

    fn spans(&self) -> usize {
        self.seen().iter().map(|s| s.spans).sum()
    }
}

/// Configured headers arrive as metadata, with the token slot (authorization) among them, and
/// the deadline as grpc-timeout. A partial success is counted: the rejected spans failed, the
/// rest sent, nothing retried, and it is logged once.
#[test]
fn headers_arrive_and_partial_success_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = ScriptedServer::start(vec![7]);
    let id = "otlp_grpc/store";
    let exporter = grpc_exporter(
        server.addr,
        json!({"headers": {"X-Scope-OrgID": "tenant-a", "api_key": "k-123"}, "timeout": "3s"}),
    );
    let relay = Relay::start(dir.path(), &relay_config().exporter(id, exporter).yaml(), "otlp");
    post(&relay, &spans_request(1, 40));
    wait_for("40 spans at the server", T, || (server.spans() == 40).then_some(()));
    let seen = server.seen();
    let md = &seen[0].metadata;
    let value = |k: &str| md.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(value("x-scope-orgid"), Some("tenant-a"), "{md:?}");
    assert_eq!(value("api_key"), Some("k-123"), "{md:?}");
    assert!(value("user-agent").is_some_and(|u| u.contains("otlp-relay/")), "{md:?}");
    assert_eq!(value("grpc-encoding"), Some("gzip"), "{md:?}");
    // 3 s as the grpc-timeout header spells it (some unit, at most 3 s).
    assert!(value("grpc-timeout").is_some(), "{md:?}");
    wait_for("the partial success counted", T, || {
        (sent(&relay, id) == 33.0 && failed(&relay, id) == 7.0).then_some(())
    });
    assert_eq!(retries(&relay, id), 0.0);
    let line = relay.proc.clone_wait_line("partial success", T);
    assert!(line.contains("rejected=7") && line.contains("spans too old"), "{line}");
    // A second request is a plain success (the script ran out): counted sent in full.
    post(&relay, &spans_request(2, 10));
    wait_for("the second request sent", T, || {
        (sent(&relay, id) == 43.0).then_some(())
    });
    assert_eq!(failed(&relay, id), 7.0);
}

/// UNAVAILABLE with a RetryInfo of 1 s, then success: retried after the delay the server asked
/// for (not the 20 ms backoff), and nothing is lost.
#[test]
fn unavailable_is_retried_after_the_retry_info_delay() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--fail-first", "1", "--status", "503", "--retry-after", "1"]);
    let id = "otlp/store";
    let relay = Relay::start(
        dir.path(),
        &relay_config()
            .exporter(
                id,
                grpc_exporter(sink.grpc, json!({"retry_on_failure": {"max_interval": "5s"}})),
            )
            .yaml(),
        "otlp",
    );
    post(&relay, &spans_request(1, 50));
    let stats = sink.wait_unique(50, T);
    assert_eq!(stats["failed_requests"], 1, "{stats}");
    let line = relay.proc.clone_wait_line("will retry", T);
    assert!(line.contains("gRPC UNAVAILABLE"), "{line}");
    assert!(line.contains("retry_in=1s"), "RetryInfo honoured: {line}");
    wait_for("counted sent", T, || (sent(&relay, id) == 50.0).then_some(()));
    assert_eq!(failed(&relay, id), 0.0);
    assert_eq!(retries(&relay, id), 1.0);
}

/// INVALID_ARGUMENT is final: one attempt, the spans counted failed and kept in the
/// dead-letter directory of the spool, never retried.
#[test]
fn invalid_argument_is_dead_lettered_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--status", "400"]);
    let id = "otlp/store";
    let config = relay_config()
        .extension("file_storage/spool", json!({"directory": dir.path().join("spool")}))
        .exporter(
            id,
            grpc_exporter(sink.grpc, json!({"sending_queue": {"storage": "file_storage/spool"}})),
        );
    let relay = Relay::start(dir.path(), &config.yaml(), "otlp");
    post(&relay, &spans_request(1, 30));
    wait_for("counted failed", T, || (failed(&relay, id) == 30.0).then_some(()));
    wait_for("dead-lettered", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[("exporter", id)]) == 30.0).then_some(())
    });
    let line = relay.proc.clone_wait_line("export failed permanently", T);
    assert!(line.contains("gRPC INVALID_ARGUMENT"), "{line}");
    assert_eq!(retries(&relay, id), 0.0);
    assert_eq!(sent(&relay, id), 0.0);
    let s = sink.stats();
    assert_eq!(s["requests"], s["failed_requests"], "{s}");
    assert_eq!(s["unique_spans"], 0, "{s}");
}

/// mTLS against the sink (client certificates required), the server name checked, overridden
/// with server_name_override, and refused without a client certificate.
#[test]
fn mutual_tls_and_server_name_override() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let ca_file = ca.write(dir.path(), "ca");
    let server = ca.server().write(dir.path(), "server");
    let client = ca.client("spiffe://test/relay").write(dir.path(), "client");
    let sink = Sink::start_mtls(&server, &ca_file);
    let tls = |extra: Value| {
        let mut t = json!({
            "endpoint": sink.grpc.to_string(),
            "retry_on_failure": {"initial_interval": "20ms", "max_interval": "300ms"},
            "tls": {"ca_file": ca_file, "cert_file": client.cert, "key_file": client.key},
        });
        merge(&mut t, extra);
        t
    };
    let config = relay_config()
        .exporter("otlp/mtls", tls(json!({})))
        // The certificate names 127.0.0.1 and localhost: checked as localhost here.
        .exporter(
            "otlp/override",
            tls(json!({"tls": {"server_name_override": "localhost"}})),
        )
        .exporter(
            "otlp/wrong_name",
            tls(json!({"tls": {"server_name_override": "other.example"}})),
        )
        .exporter(
            "otlp/no_client_cert",
            tls(json!({"tls": {"cert_file": "", "key_file": ""}})),
        );
    let relay = Relay::start(dir.path(), &config.yaml(), "otlp");
    post(&relay, &spans_request(1, 20));
    sink.wait_unique(20, T);
    for id in ["otlp/mtls", "otlp/override"] {
        wait_for(&format!("{id} sent"), T, || (sent(&relay, id) == 20.0).then_some(()));
    }
    for id in ["otlp/wrong_name", "otlp/no_client_cert"] {
        wait_for(&format!("{id} retrying"), T, || {
            (retries(&relay, id) >= 2.0).then_some(())
        });
        assert_eq!(sent(&relay, id), 0.0, "{id}");
    }
    let s = stats(sink.stats_addr);
    assert_eq!(s["spans"], 40, "only the two good exporters got through: {s}");
}

/// Spooled: the destination is down, the relay restarts meanwhile, and once the destination
/// is up every span arrives.
#[test]
fn spooled_spans_survive_a_restart_and_arrive_once_the_destination_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = restartable_port();
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let id = "otlp_grpc/store";
    let config = relay_config()
        .extension("file_storage/spool", json!({"directory": dir.path().join("spool")}))
        .exporter(
            id,
            grpc_exporter(target, json!({"sending_queue": {"storage": "file_storage/spool"}})),
        )
        .service(json!({"shutdown_timeout": "1s"}))
        .yaml();
    let mut relay = Relay::start(dir.path(), &config, "otlp");
    post(&relay, &spans_request(1, 60));
    post(&relay, &spans_request(2, 40));
    wait_for("retries while down", T, || (retries(&relay, id) >= 2.0).then_some(()));
    let line = relay.proc.clone_wait_line("will retry", T);
    assert!(line.contains("connection failed"), "{line}");
    relay.proc.signal("TERM");
    relay.proc.wait_exit(T);
    drop(relay);

    let relay = Relay::start(dir.path(), &config, "otlp");
    let listen = format!("127.0.0.1:{port}");
    let mut sink = Proc::relay("sink", &["sink", "--listen", "127.0.0.1:0", "--grpc-listen", &listen]);
    let stats_addr = sink.wait_listen("sink-http", T);
    wait_for("100 unique spans at the sink", Duration::from_secs(60), || {
        (stats(stats_addr)["unique_spans"] == 100).then_some(())
    });
    wait_for("counted sent", T, || (sent(&relay, id) == 100.0).then_some(()));
    assert_eq!(failed(&relay, id), 0.0);
}

/// `check` passes a collector config fanning out to MLflow and to gRPC stores.
#[test]
fn check_passes_a_collector_fanout_config() {
    let fixture = support::repo_root().join("tests/fixtures/collector-otlp-grpc-fanout.yaml");
    let mut cmd = std::process::Command::new(support::bin());
    cmd.args(["check", "--config", fixture.to_str().unwrap()])
        .env("PHOENIX_API_KEY", "secret-key");
    let mut check = Proc::spawn("check", cmd);
    let code = check.wait_exit(T);
    let out = check.output_text();
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("not supported"), "{out}");
    assert!(!out.contains("secret-key"), "no secret in the output: {out}");

    // The MLflow advice only where a gRPC exporter carries MLflow's header.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&fixture)
        .unwrap()
        .replace("x-scope-orgid: tenant-a", "x-mlflow-experiment-id: \"1\"");
    let path = write_file(dir.path(), "mlflow-over-grpc.yaml", &text);
    let mut cmd = std::process::Command::new(support::bin());
    cmd.args(["check", "--config", path.to_str().unwrap()])
        .env("PHOENIX_API_KEY", "secret-key");
    let mut check = Proc::spawn("check", cmd);
    assert_eq!(check.wait_exit(T), Some(0));
    let out = check.output_text();
    assert!(
        out.contains("exporters.otlp_grpc/tempo.headers.x-mlflow-experiment-id: MLflow accepts only OTLP/HTTP"),
        "{out}"
    );
}

/// A destination that is down: the retry warning of a gRPC exporter, and of an otlphttp one
/// whose config names nothing of MLflow's, hints at the endpoint without naming MLflow (their
/// targets are Tempo, Phoenix, a collector); the MLflow hint is the MLflow exporter's alone
/// (tests/first_run.rs).
#[test]
fn a_refused_connection_hints_without_naming_mlflow_for_other_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let down = |scheme: &str| format!("{scheme}127.0.0.1:{}", support::free_port());
    let config = relay_config()
        .exporter("otlp_grpc/tempo", grpc_exporter(down("").parse().unwrap(), json!({})))
        .exporter(
            "otlphttp/phoenix",
            json!({
                "endpoint": down("http://"),
                "retry_on_failure": {"initial_interval": "20ms", "max_interval": "300ms"},
            }),
        )
        .yaml();
    let relay = Relay::start(dir.path(), &config, "otlp");
    post(&relay, &spans_request(1, 3));
    for exporter in ["otlp_grpc/tempo", "otlphttp/phoenix"] {
        let line = wait_for(&format!("{exporter}: a retry warning"), T, || {
            relay
                .proc
                .output()
                .into_iter()
                .find(|l| l.contains(&format!("exporter={exporter} ")) && l.contains("will retry"))
        });
        assert!(line.contains("nothing listens at this endpoint"), "{line}");
        assert!(!line.to_lowercase().contains("mlflow"), "{line}");
    }
}
