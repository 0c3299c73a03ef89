//! Hostile requests against the relay as a real process on the repo's own config.yaml
//! (groupbytrace, then send_batch_max_size 2048): deep nesting and overflowing varints in requests big enough to
//! be split are refused with 400 and the pipeline goes on delivering; a gRPC unary call with two
//! messages is INVALID_ARGUMENT.
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, KeyValueList, any_value::Value};
use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span, span};
use prost::Message;
use support::otlp::Sink;
use support::{Proc, http};

const T: Duration = Duration::from_secs(60);

/// The relay on the repository's config.yaml, its endpoints set through the variables it reads.
struct RepoRelay {
    proc: Proc,
    http: SocketAddr,
    grpc: SocketAddr,
}

impl RepoRelay {
    fn start(sink: &Sink) -> RepoRelay {
        let config = support::repo_root().join("config.yaml");
        let mut cmd = std::process::Command::new(support::bin());
        cmd.args(["run", "--config", config.to_str().unwrap()])
            .env("NO_COLOR", "1")
            .env("OTLP_RELAY_GRPC_ENDPOINT", "127.0.0.1:0")
            .env("OTLP_RELAY_HTTP_ENDPOINT", "127.0.0.1:0")
            .env("OTLP_RELAY_HEALTH_ENDPOINT", "127.0.0.1:0")
            .env("OTLP_RELAY_METRICS_ADDRESS", "127.0.0.1:0")
            .env("MLFLOW_ENDPOINT", sink.url());
        let mut proc = Proc::spawn("relay", cmd);
        proc.wait_line("relay started", T);
        let bound = |component: &str| -> SocketAddr {
            let needle = format!("component={component} ");
            let line = proc.output().into_iter().find(|l| l.contains(&needle)).unwrap();
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .unwrap()
                .parse()
                .unwrap()
        };
        let (http, grpc) = (bound("otlp-http"), bound("otlp-grpc"));
        RepoRelay { proc, http, grpc }
    }

    fn post(&self, body: &[u8], content_type: &str) -> (u16, String) {
        let (status, body) = http("POST", self.http, "/v1/traces", &[("content-type", content_type)], body);
        (status, String::from_utf8_lossy(&body).to_string())
    }
}

fn span(n: u64) -> Span {
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&(n + 1).to_be_bytes());
    trace_id[15] = 1;
    Span {
        trace_id: trace_id.to_vec(),
        span_id: (n + 1).to_be_bytes().to_vec(),
        name: format!("span-{n}"),
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_000_100_000_000,
        ..Default::default()
    }
}

/// `count` spans of one trace in one ResourceSpans, span ids from `first`: over 2048 forces the
/// batcher to split. One trace, because config.yaml groups by trace: spans of many traces would
/// reach the batcher as small whole traces and never be split.
fn request(first: u64, count: u64) -> ExportTraceServiceRequest {
    let trace_id = span(first).trace_id;
    support::otlp::one_resource(
        (first..first + count)
            .map(|n| Span {
                trace_id: trace_id.clone(),
                ..span(n)
            })
            .collect(),
    )
}

/// A value nesting `levels` arrays (or kvlists) around an int.
fn nested(levels: usize, kvlist: bool) -> AnyValue {
    let mut value = AnyValue {
        value: Some(Value::IntValue(1)),
    };
    for _ in 0..levels {
        value = AnyValue {
            value: Some(if kvlist {
                Value::KvlistValue(KeyValueList {
                    values: vec![KeyValue {
                        key: "k".into(),
                        value: Some(value),
                        ..Default::default()
                    }],
                })
            } else {
                Value::ArrayValue(ArrayValue { values: vec![value] })
            }),
        };
    }
    value
}

fn attr(value: AnyValue) -> Vec<KeyValue> {
    vec![KeyValue {
        key: "deep".into(),
        value: Some(value),
        ..Default::default()
    }]
}

/// The reproductions, as a class: 2,100 spans with one deep value (arrays 50 levels,
/// kvlists 40) in each attribute position, protobuf and JSON, and an overflowing varint. Each
/// is refused with 400 naming the problem, and then the relay still accepts and delivers: a
/// request of 3,000 spans (split in two batches) and more reach the sink, counted there.
#[test]
fn deep_nesting_and_bad_varints_are_refused_and_the_pipeline_keeps_delivering() {
    let sink = Sink::start(&[]);
    let relay = RepoRelay::start(&sink);
    let mut hostile = Vec::new();
    for (levels, kvlist) in [(50, false), (40, true), (33, false)] {
        for place in ["span", "event", "link", "resource", "scope"] {
            let mut req = request(10_000_000, 2100);
            let rs = &mut req.resource_spans[0];
            let value = nested(levels, kvlist);
            let s = &mut rs.scope_spans[0].spans[7];
            match place {
                "span" => s.attributes = attr(value),
                "event" => s.events.push(span::Event {
                    attributes: attr(value),
                    ..Default::default()
                }),
                "link" => s.links.push(span::Link {
                    attributes: attr(value),
                    ..Default::default()
                }),
                "resource" => rs.resource.as_mut().unwrap().attributes = attr(value),
                _ => {
                    rs.scope_spans[0].scope = Some(opentelemetry_proto::tonic::common::v1::InstrumentationScope {
                        attributes: attr(value),
                        ..Default::default()
                    })
                }
            }
            hostile.push((format!("{place} {levels} {kvlist}"), req));
        }
    }
    for (what, req) in &hostile {
        let (status, body) = relay.post(&req.encode_to_vec(), "application/x-protobuf");
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body.contains("nested deeper than 64"), "{what}: {body}");
    }
    // JSON: serde_json's own limit (128) lets about 40 array levels through.
    let (what, req) = &hostile[10];
    let json = serde_json::to_vec(req).unwrap();
    let (status, body) = relay.post(&json, "application/json");
    assert_eq!(status, 400, "{what} as JSON: {body}");
    assert!(body.contains("nested deeper than 64"), "{body}");

    // A 10-byte varint whose last byte overflows, as the `kind` of the last of 2,100 spans in
    // one ScopeSpans (so the batcher must split the record it is in).
    let mut scope = ScopeSpans {
        spans: (20_000_000..20_002_099).map(span).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut last = span(20_002_099).encode_to_vec();
    last.push(0x30); // field 6 (kind), varint
    last.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    scope.extend_from_slice(&wrap(0x12, &last));
    let body = wrap(0x0a, &wrap(0x12, &scope));
    let (status, text) = relay.post(&body, "application/x-protobuf");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("varint"), "{text}");

    // The same spans without the hostile parts are accepted and delivered.
    assert_eq!(
        relay
            .post(&request(0, 3000).encode_to_vec(), "application/x-protobuf")
            .0,
        200
    );
    assert_eq!(
        relay
            .post(&request(5000, 2100).encode_to_vec(), "application/x-protobuf")
            .0,
        200
    );
    // Right at the limit: arrays to message level 64 pass, and reach the sink.
    let mut edge = request(9000, 2100);
    // Span attribute KeyValue is level 5, its AnyValue 6; 29 arrays reach 64.
    edge.resource_spans[0].scope_spans[0].spans[0].attributes = attr(nested(29, false));
    let (status, text) = relay.post(&edge.encode_to_vec(), "application/x-protobuf");
    assert_eq!(status, 200, "{text}");
    sink.wait_unique(3000 + 2100 + 2100, T);
    let (ready, _) = support::get_text(relay_health(&relay), "/readyz");
    assert_eq!(ready, 200);
    assert!(
        !relay.proc.output_text().contains("panicked"),
        "{}",
        relay.proc.output_text()
    );
}

fn relay_health(relay: &RepoRelay) -> SocketAddr {
    let line = relay
        .proc
        .output()
        .into_iter()
        .find(|l| l.contains("component=health "))
        .unwrap();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap()
        .parse()
        .unwrap()
}

fn wrap(tag: u8, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    prost::encoding::encode_varint(inner.len() as u64, &mut out);
    out.extend_from_slice(inner);
    out
}

/// A gRPC message frame: uncompressed flag, big-endian length, message.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// One unary Export call over a raw HTTP/2 connection; returns grpc-status and grpc-message.
async fn grpc_call(addr: SocketAddr, body: Vec<u8>) -> (String, String) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post(format!(
        "http://{addr}/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(bytes::Bytes::from(body)))
    .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        trailers
            .get(name)
            .or_else(|| headers.get(name))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

/// Two length-prefixed messages in one unary call: INVALID_ARGUMENT, and neither is delivered;
/// one message: OK and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_call_with_two_messages_is_invalid_argument() {
    let sink = Sink::start(&[]);
    let relay = RepoRelay::start(&sink);
    let first = request(0, 3).encode_to_vec();
    let second = request(100, 4).encode_to_vec();
    let mut two = grpc_frame(&first);
    two.extend_from_slice(&grpc_frame(&second));
    let (status, message) = grpc_call(relay.grpc, two).await;
    assert_eq!(status, "3", "{message}");
    assert!(message.contains("more"), "{message}");
    // A trailing partial frame is not a second message either.
    let mut partial = grpc_frame(&first);
    partial.extend_from_slice(&[0, 0, 0]);
    let (status, message) = grpc_call(relay.grpc, partial).await;
    assert_ne!(status, "0", "{message}");
    // Framing tonic cannot read is malformed input too, not an internal error.
    let mut flagged = grpc_frame(&first);
    flagged[0] = 1; // compressed, but no grpc-encoding
    let mut longer = grpc_frame(&first);
    longer[4] = longer[4].wrapping_add(9); // a length past the body
    for (what, body) in [
        ("compressed flag", flagged),
        ("length past the body", longer),
        ("empty body", Vec::new()),
    ] {
        let (status, message) = grpc_call(relay.grpc, body).await;
        assert_eq!(status, "3", "{what}: {message}");
    }
    let (status, message) = grpc_call(relay.grpc, grpc_frame(&second)).await;
    assert_eq!(status, "0", "{message}");
    // Only the good call's 4 spans arrive (the refused ones would share their batch).
    let stats = tokio::task::spawn_blocking(move || sink.wait_unique(4, T))
        .await
        .unwrap();
    assert_eq!(stats["unique_spans"], 4, "{stats}");
}
