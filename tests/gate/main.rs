//! The auth front end (`otlp-relay gate`) against a real OpenID provider (npm oidc-provider, Keycloak
//! shaped), a real `mlflow server`, the real MLflow Python client and headless Debian chromium.
//! One provider and one MLflow serve every test of this file (they are slow to start; a OnceLock);
//! gates are cheap, so each test starts the gate configuration it needs. A test that stops or
//! re-keys a provider starts its own.
#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;
use support::gate::{Gate, start as gate};
use support::mlflow::Mlflow;
use support::oidc::{self, OidcOptions, OidcProvider, basic_auth, jwt_parts};
use support::{Proc, wait_for};

mod access;
mod clients;
mod connections;
mod operation;

/// A raw HTTP/1.1 exchange returning status, lower-cased response headers and body.
fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, HashMap<String, String>, String) {
    let (status, hs, body) = support::http_exchange(method, addr, path, headers, body);
    (status, hs, String::from_utf8_lossy(&body).to_string())
}

/// POSTs an OTLP/protobuf body to the gate's /v1/traces for `experiment`, with an
/// Authorization header when given: (status, body).
fn post_traces(addr: SocketAddr, experiment: &str, authorization: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut headers = vec![
        ("content-type", "application/x-protobuf"),
        ("x-mlflow-experiment-id", experiment),
    ];
    headers.extend(authorization.map(|a| ("authorization", a)));
    let (s, _, b) = request("POST", addr, "/v1/traces", &headers, body);
    (s, b)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Sum of a gate metric's series whose labels contain `label` (e.g. `reason="issuer"`).
fn gate_metric(addr: SocketAddr, name: &str, label: &str) -> f64 {
    let (_, _, text) = request("GET", addr, "/gate/metrics", &[], b"");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One OTLP protobuf export request with a single span named `name`.
fn otlp_request(name: &str) -> (Vec<u8>, String) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    let trace_id: [u8; 16] = rand::random();
    let span_id: [u8; 8] = rand::random();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("gate-test".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: trace_id.to_vec(),
                    span_id: span_id.to_vec(),
                    name: name.into(),
                    kind: 1,
                    start_time_unix_nano: now - 1_000_000,
                    end_time_unix_nano: now,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    (req.encode_to_vec(), const_hex::encode(trace_id))
}

/// True when MLflow holds a trace whose id mentions `trace_hex`.
fn mlflow_has_trace(m: &Mlflow, experiment: &str, trace_hex: &str) -> bool {
    m.search_traces(experiment)
        .iter()
        .any(|t| t.to_string().contains(trace_hex))
}

/// Header lines (lower-cased name, value) of one request.
type Headers = Vec<(String, String)>;

/// A plain upstream that records the headers of every request and answers 200.
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Headers>>>,
}

fn echo_server() -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut len = 0usize;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                    if k == "content-length" {
                        len = v.parse().unwrap();
                    }
                    headers.push((k, v));
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            s2.lock().unwrap().push(headers);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    Echo { addr, seen }
}

struct World {
    provider: OidcProvider,
    mlflow: Mlflow,
    experiment: String,
    perms: tempfile::TempDir,
    /// The main gate's permissions file (written once: tests run in parallel).
    perms_file: String,
}

/// The provider and MLflow every test shares, started by the first test that needs them.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        // Both slow starts overlap: the provider (node) in this thread, MLflow (~20 s) in another.
        let mlflow = std::thread::spawn(Mlflow::start);
        let provider = OidcProvider::start(OidcOptions {
            auto_login: false, // the browser test fills in the provider's form
            ..Default::default()
        });
        let mlflow = mlflow.join().unwrap();
        eprintln!("mlflow healthy after {:?}", mlflow.startup);
        // Statics are never dropped: end both processes when this test process is gone.
        support::reap_with_us(&format!("-{}", mlflow.pid()));
        support::reap_with_us(&provider.pid().expect("provider running").to_string());
        let experiment = mlflow.create_experiment("gate-e2e");
        let perms = tempfile::tempdir().unwrap();
        let perms_file = support::write_file(
            perms.path(),
            "permissions.yaml",
            "groups:\n  mlflow-readers:\n    \"*\": READ\n",
        )
        .display()
        .to_string();
        World {
            provider,
            mlflow,
            experiment,
            perms,
            perms_file,
        }
    })
}

impl World {
    /// The gate most tests use: readers (READ everywhere) allowed besides mlflow.
    fn main_gate(&self) -> Gate {
        let perms = &self.perms_file;
        gate(
            &self.provider,
            &self.mlflow.url(),
            &[
                ("OIDC_GROUP_NAME", "mlflow,mlflow-readers"),
                ("GATE_PERMISSIONS_FILE", perms),
            ],
        )
    }
}
