//! OTLP test parts: the counting sink, the load generator and the relay as real processes.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::Proc;

pub struct Sink {
    pub proc: Proc,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Where /stats is read: the plain --stats-listen port when the sink serves TLS.
    pub stats_addr: SocketAddr,
}

impl Sink {
    /// A sink serving TLS with `server`'s certificate, requiring client certificates issued by
    /// `client_ca`; its /stats on a plain port.
    pub fn start_mtls(server: &super::pki::LeafFiles, client_ca: &Path) -> Sink {
        Sink::start(&[
            "--tls-cert",
            server.cert.to_str().unwrap(),
            "--tls-key",
            server.key.to_str().unwrap(),
            "--tls-client-ca",
            client_ca.to_str().unwrap(),
            "--stats-listen",
            "127.0.0.1:0",
        ])
    }

    pub fn start(extra: &[&str]) -> Sink {
        let mut args = vec!["sink", "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut proc = Proc::relay("sink", &args);
        let http = proc.wait_listen("sink-http", super::STARTUP);
        let grpc = proc.wait_listen("sink-grpc", super::STARTUP);
        let stats_addr = if extra.contains(&"--stats-listen") {
            proc.wait_listen("sink-stats", super::STARTUP)
        } else {
            http
        };
        Sink {
            proc,
            http,
            grpc,
            stats_addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn stats(&self) -> serde_json::Value {
        stats(self.stats_addr)
    }

    /// Waits until the sink has seen `n` unique spans.
    pub fn wait_unique(&self, n: u64, timeout: Duration) -> serde_json::Value {
        super::wait_for(&format!("{n} unique spans at the sink"), timeout, || {
            let s = self.stats();
            (s["unique_spans"].as_u64() == Some(n)).then_some(s)
        })
    }
}

pub fn stats(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = super::get_text(addr, "/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs loadgen with `--json` and returns (exit code, report).
pub fn loadgen(args: &[&str]) -> (i32, serde_json::Value) {
    let (code, report, _) = loadgen_with_output(args);
    (code, report)
}

/// Like `loadgen`, also returning everything it printed (stderr holds its diagnoses).
pub fn loadgen_with_output(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["loadgen", "--json"];
    all.extend_from_slice(args);
    let mut p = Proc::relay("loadgen", &all);
    let code = p.wait_exit(Duration::from_secs(120)).expect("exit code");
    // The reader threads may still be catching up with the process's last lines.
    let line = super::wait_for("loadgen's JSON report", Duration::from_secs(10), || {
        p.output().into_iter().find(|l| l.starts_with('{'))
    });
    (code, serde_json::from_str(&line).unwrap(), p.output_text())
}

/// Sends one trace (two spans) over OTLP/HTTPS to `endpoint`, trusting only the CA in `ca`, without
/// retries: the spans accepted (0 when the handshake fails, e.g. the server's certificate is from
/// another CA).
pub fn spans_accepted_over_https(endpoint: &str, ca: &Path) -> u64 {
    let (_, r) = loadgen(&[
        "--otlp-http",
        "--otlp-endpoint",
        endpoint,
        "--ca-cert",
        ca.to_str().unwrap(),
        "--traces",
        "1",
        "--max-retries",
        "0",
    ]);
    r["spans_accepted"].as_u64().unwrap()
}

/// A running relay and the addresses it bound (configs use port 0 everywhere).
pub struct Relay {
    pub proc: Proc,
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub health: Option<SocketAddr>,
}

impl Relay {
    /// Writes `config` to `dir/config.yaml` and runs the relay on it. `receiver` is the
    /// receiver id whose listeners to report (e.g. `otlp`).
    pub fn start(dir: &Path, config: &str, receiver: &str) -> Relay {
        Relay::start_with_env(dir, config, receiver, &[])
    }

    /// Like `start`, with extra environment variables for the relay process.
    pub fn start_with_env(dir: &Path, config: &str, receiver: &str, env: &[(&str, &str)]) -> Relay {
        let path = super::write_file(dir, "config.yaml", config);
        let mut cmd = std::process::Command::new(super::bin());
        cmd.args(["run", "--config", path.to_str().unwrap()])
            .env("NO_COLOR", "1")
            .envs(env.iter().copied());
        let mut proc = Proc::spawn("relay", cmd);
        // Every listener is bound and logged before this line.
        proc.wait_line("relay started", super::STARTUP);
        let bound = |component: &str| -> Option<SocketAddr> {
            let needle = format!("component={component} ");
            let line = proc.output().into_iter().find(|l| l.contains(&needle))?;
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))?
                .parse()
                .ok()
        };
        let grpc = bound(&format!("{receiver}-grpc"));
        let http = bound(&format!("{receiver}-http"));
        let health = bound("health");
        let metrics = bound("metrics").expect("metrics listener");
        Relay {
            proc,
            grpc,
            http,
            metrics,
            health,
        }
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::metric(self.metrics, name, labels)
    }
}

/// An OTLP/protobuf export request holding one span named `name` (fixed trace and span ids).
pub fn one_span_request(name: &str) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![7; 16],
                    span_id: vec![9; 8],
                    name: name.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// `n` spans with ids unique to `tag`, as one OTLP/HTTP protobuf request.
pub fn spans_request(tag: u8, n: usize) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    let spans = (0..n)
        .map(|i| Span {
            trace_id: vec![tag; 16],
            span_id: (i as u64 + 1).to_be_bytes().to_vec(),
            name: format!("op-{i}"),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// A request of `spans` in one ResourceSpans (with an empty resource) and one ScopeSpans.
pub fn one_resource(
    spans: Vec<opentelemetry_proto::tonic::trace::v1::Span>,
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}
