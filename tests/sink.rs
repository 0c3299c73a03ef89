//! The counting sink: OTLP/HTTP (protobuf, JSON, gzip, deflate) and gRPC requests are counted,
//! unique spans are counted once, configured failures are answered, and headers are recorded.
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use support::{Proc, http};

fn request(trace: u8, spans: std::ops::Range<u8>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: spans
                    .map(|s| Span {
                        trace_id: vec![trace; 16],
                        span_id: vec![s; 8],
                        name: "op".into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn stats(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = support::get_text(addr, "/stats");
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

fn sink(args: &[&str]) -> (Proc, SocketAddr, Option<SocketAddr>) {
    let mut all = vec!["sink", "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut p = Proc::relay("sink", &all);
    let h = p.wait_listen("sink-http", support::STARTUP);
    let g = p.wait_listen("sink-grpc", support::STARTUP);
    (p, h, Some(g))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_http_json_gzip_and_grpc() {
    let (_p, addr, grpc) = sink(&[]);
    let proto = request(1, 0..10).encode_to_vec();
    let (s, _) = http(
        "POST",
        addr,
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", "7"),
        ],
        &proto,
    );
    assert_eq!(s, 200);
    // The same spans again: counted as spans, not as unique spans.
    let (s, _) = http(
        "POST",
        addr,
        "/v1/traces",
        &[("content-type", "application/x-protobuf"), ("content-encoding", "gzip")],
        &support::gzip(&proto),
    );
    assert_eq!(s, 200);
    let st = stats(addr);
    assert_eq!(st["spans"], 20);
    assert_eq!(st["unique_spans"], 10);
    assert_eq!(st["experiments"]["7"], 10);
    assert_eq!(st["experiments"]["none"], 10);
    assert_eq!(st["last"]["content_encoding"], "gzip");
    assert_eq!(st["last"]["authorization"], false);

    let json = serde_json::to_vec(&request(2, 0..5)).unwrap();
    assert!(String::from_utf8_lossy(&json).contains("traceId"));
    let (s, body) = http(
        "POST",
        addr,
        "/v1/traces",
        &[
            ("content-type", "application/json; charset=utf-8"),
            ("content-encoding", "gzip"),
            ("authorization", "Bearer x"),
        ],
        &support::gzip(&json),
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&request(3, 0..2).encode_to_vec()).unwrap();
    let (s, _) = http(
        "POST",
        addr,
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("content-encoding", "deflate"),
        ],
        &z.finish().unwrap(),
    );
    assert_eq!(s, 200);

    let mut client = TraceServiceClient::connect(format!("http://{}", grpc.unwrap()))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let mut req = tonic::Request::new(request(4, 0..7));
    req.metadata_mut()
        .insert("x-mlflow-experiment-id", "9".parse().unwrap());
    client.export(req).await.unwrap();

    let st = stats(addr);
    assert_eq!(st["requests"], 5);
    assert_eq!(st["spans"], 20 + 5 + 2 + 7);
    assert_eq!(st["unique_spans"], 10 + 5 + 2 + 7);
    assert_eq!(st["experiments"]["9"], 7);
    assert_eq!(st["last"]["transport"], "grpc");
    assert!(st["bytes"].as_u64().unwrap() > 0);

    // Wrong content type and malformed bodies are refused, not counted.
    let (s, _) = http("POST", addr, "/v1/traces", &[("content-type", "text/plain")], b"x");
    assert_eq!(s, 415);
    let (s, _) = http(
        "POST",
        addr,
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &proto[..proto.len() - 2],
    );
    assert_eq!(s, 400);
    assert_eq!(stats(addr)["spans"], 34);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_failures_are_answered() {
    let (_p, addr, grpc) = sink(&["--status", "503", "--retry-after", "2"]);
    let proto = request(1, 0..3).encode_to_vec();
    let (s, body) = http(
        "POST",
        addr,
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &proto,
    );
    assert_eq!(s, 503);
    let st = otlp_relay::sink::rpc::Status::decode(body.as_slice()).unwrap();
    assert_eq!(st.code, tonic::Code::Unavailable as i32);

    let mut client = TraceServiceClient::connect(format!("http://{}", grpc.unwrap()))
        .await
        .unwrap();
    let err = client.export(request(1, 0..3)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(
        otlp_relay::sink::rpc::retry_delay(err.details()),
        Some(Duration::from_secs(2))
    );
    let st = stats(addr);
    assert_eq!(st["spans"], 0);
    assert_eq!(st["failed_requests"], 2);
    assert_eq!(st["failures"]["503"], 2);

    // Every 2nd request fails.
    let (_p2, addr2, _) = sink(&["--fail-every", "2"]);
    let codes: Vec<u16> = (0..4)
        .map(|_| {
            http(
                "POST",
                addr2,
                "/v1/traces",
                &[("content-type", "application/x-protobuf")],
                &proto,
            )
            .0
        })
        .collect();
    assert_eq!(codes, vec![200, 503, 200, 503]);
    assert_eq!(stats(addr2)["unique_spans"], 3);

    // "503, then 200": the first request fails, the rest are accepted.
    let (_p3, addr3, _) = sink(&["--fail-first", "1"]);
    let codes: Vec<u16> = (0..3)
        .map(|_| {
            http(
                "POST",
                addr3,
                "/v1/traces",
                &[("content-type", "application/x-protobuf")],
                &proto,
            )
            .0
        })
        .collect();
    assert_eq!(codes, vec![503, 200, 200]);
}

/// The README's exit codes: an argument the sink cannot use is 2, a port it cannot bind is 1.
#[test]
fn start_failures_exit_with_the_documented_codes() {
    let run = |args: &[&str]| std::process::Command::new(support::bin()).args(args).output().unwrap();
    let unreadable = run(&[
        "sink",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    let stderr = String::from_utf8_lossy(&unreadable.stderr);
    assert_eq!(unreadable.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let busy = run(&["sink", "--listen", &addr]);
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(busy.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}
