//! The load generator against the counting sink: gRPC and HTTP (protobuf, JSON, gzip), over
//! mTLS, with retries of refused requests, and `--verify-sink` proving zero loss (or catching it).
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::otlp::{Sink, loadgen, loadgen_with_output};

fn sink(extra: &[&str]) -> Sink {
    Sink::start(extra)
}

fn stats(addr: SocketAddr) -> serde_json::Value {
    support::otlp::stats(addr)
}

#[test]
fn grpc_and_http_encodings_arrive_without_loss() {
    let s = sink(&[]);
    let verify = format!("http://{}", s.http);
    let grpc = s.grpc.to_string();
    let http = s.http.to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--otlp-endpoint", &grpc, "--compression", "gzip", "--workers", "2"],
        vec!["--otlp-endpoint", &grpc, "--genai"],
        vec!["--otlp-endpoint", &http, "--otlp-http"],
        vec![
            "--otlp-endpoint",
            &http,
            "--otlp-http",
            "--encoding",
            "json",
            "--compression",
            "gzip",
        ],
    ];
    let mut total = 0;
    for case in cases {
        let mut args = vec![
            "--otlp-insecure",
            "--traces",
            "301",
            "--child-spans",
            "3",
            "--batch-size",
            "40",
            "--otlp-header",
            "x-mlflow-experiment-id=\"5\"",
            "--verify-sink",
            &verify,
        ];
        args.extend(case.iter().copied());
        let (code, r) = loadgen(&args);
        assert_eq!(code, 0, "{case:?}: {r}");
        let per_trace = if case.contains(&"--genai") { 7 } else { 4 };
        let spans = 301 * per_trace;
        assert_eq!(r["spans_sent"], spans, "{case:?}: {r}");
        assert_eq!(r["spans_accepted"], spans, "{case:?}: {r}");
        assert_eq!(r["spans_refused"], 0);
        assert_eq!(r["verify"]["received_unique_spans"], spans);
        assert_eq!(r["verify"]["lost_spans"], 0);
        assert!(r["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
        assert!(r["bytes"].as_u64().unwrap() > 0);
        total += spans;
    }
    let st = stats(s.http);
    assert_eq!(st["unique_spans"], total);
    assert_eq!(
        st["experiments"]["5"], total,
        "the header reaches the sink on both transports"
    );
    assert_eq!(st["last"]["content_type"], "application/json");
    assert_eq!(st["last"]["content_encoding"], "gzip");
    drop(s.proc);
}

#[test]
fn retries_honour_the_sink_and_count_refusals() {
    // Every 3rd request fails with 503 + Retry-After: 1; everything still arrives once.
    let s = sink(&["--fail-every", "3", "--retry-after", "1"]);
    let verify = format!("http://{}", s.http);
    let http = s.http.to_string();
    let started = std::time::Instant::now();
    let (code, r) = loadgen(&[
        "--otlp-endpoint",
        &http,
        "--otlp-http",
        "--otlp-insecure",
        "--traces",
        "50",
        "--batch-size",
        "10",
        "--verify-sink",
        &verify,
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["spans_accepted"], 100);
    assert!(r["retries"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(r["failures_by"]["http_503"], r["retries"]);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "Retry-After: 1 was honoured on each retry"
    );
    assert_eq!(r["verify"]["lost_spans"], 0);

    // Permanent failures (gRPC INVALID_ARGUMENT for 400) are refused, not retried.
    let bad = sink(&["--status", "400"]);
    let grpc = bad.grpc.to_string();
    let (code, r) = loadgen(&["--otlp-endpoint", &grpc, "--otlp-insecure", "--traces", "10"]);
    assert_eq!(code, 1, "nothing was accepted");
    assert_eq!(r["spans_refused"], 20);
    assert_eq!(r["retries"], 0);
    assert_eq!(r["refused_by"]["grpc_INVALID_ARGUMENT"], 20);
}

#[test]
fn verify_sink_catches_loss() {
    // The generator talks to one sink but verifies against another: everything looks lost.
    let a = sink(&[]);
    let b = sink(&[]);
    let http = a.http.to_string();
    let verify = format!("http://{}", b.http);
    let (code, r) = loadgen(&[
        "--otlp-endpoint",
        &http,
        "--otlp-http",
        "--otlp-insecure",
        "--traces",
        "5",
        "--verify-sink",
        &verify,
        "--verify-timeout",
        "1s",
    ]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["verify"]["lost_spans"], 10);
}

#[test]
fn mtls_to_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::Ca::new("test-ca");
    let ca_file = ca.write(dir.path(), "ca");
    let server = ca.server().write(dir.path(), "server");
    let client = ca
        .client("spiffe://cluster.local/ns/agents/sa/loadgen")
        .write(dir.path(), "client");
    let s = sink(&[
        "--tls-cert",
        server.cert.to_str().unwrap(),
        "--tls-key",
        server.key.to_str().unwrap(),
        "--tls-client-ca",
        ca_file.to_str().unwrap(),
    ]);
    let verify = format!("https://localhost:{}", s.http.port());
    for http in [false, true] {
        let endpoint = format!("localhost:{}", if http { s.http.port() } else { s.grpc.port() });
        let mut args = vec![
            "--otlp-endpoint",
            &endpoint,
            "--ca-cert",
            ca_file.to_str().unwrap(),
            "--mtls",
            "--client-cert",
            client.cert.to_str().unwrap(),
            "--client-key",
            client.key.to_str().unwrap(),
            "--traces",
            "20",
            "--verify-sink",
            &verify,
        ];
        if http {
            args.push("--otlp-http");
        }
        let (code, r) = loadgen(&args);
        assert_eq!(code, 0, "{r}");
        assert_eq!(r["verify"]["received_unique_spans"], 40, "{r}");
    }
    // Without a client certificate the handshake fails: every span is refused after retries,
    // and the run fails naming the missing certificate.
    let endpoint = format!("localhost:{}", s.grpc.port());
    let (code, r, text) = loadgen_with_output(&[
        "--otlp-endpoint",
        &endpoint,
        "--ca-cert",
        ca_file.to_str().unwrap(),
        "--traces",
        "1",
        "--max-retries",
        "1",
    ]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(r["spans_accepted"], 0, "{r}");
    assert_eq!(r["spans_refused"], 2, "{r}");
    assert!(text.contains("requires a client certificate"), "{text}");
}

/// A run that gets nothing (or too little) accepted fails and says why, with the fix.
#[test]
fn runs_with_nothing_accepted_fail_and_name_the_cause() {
    let s = sink(&[]);
    let base = ["--traces", "2", "--max-retries", "0"];
    // TLS (the default) against a plaintext receiver.
    let grpc = s.grpc.to_string();
    let (code, r, text) = loadgen_with_output(&[&["--otlp-endpoint", grpc.as_str()][..], &base].concat());
    assert_eq!((code, &r["spans_accepted"]), (1, &serde_json::json!(0)), "{text}");
    assert!(text.contains("does not speak TLS: use --otlp-insecure"), "{text}");
    let http = s.http.to_string();
    let (code, _, text) =
        loadgen_with_output(&[&["--otlp-endpoint", http.as_str(), "--otlp-http"][..], &base].concat());
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("does not speak TLS: use --otlp-insecure"), "{text}");
    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (code, _, text) =
        loadgen_with_output(&[&["--otlp-endpoint", closed.as_str(), "--otlp-insecure"][..], &base].concat());
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("nothing listens at {closed}")), "{text}");
    // Everything accepted passes; a share above what was accepted fails.
    let (code, _, text) =
        loadgen_with_output(&[&["--otlp-endpoint", grpc.as_str(), "--otlp-insecure"][..], &base].concat());
    assert_eq!(code, 0, "{text}");
    let refused = sink(&["--fail-every", "2", "--status", "400"]);
    let grpc = refused.grpc.to_string();
    let (code, r, text) = loadgen_with_output(
        &[
            &[
                "--otlp-endpoint",
                grpc.as_str(),
                "--otlp-insecure",
                "--batch-size",
                "2",
                "--min-accepted",
                "0.9",
            ][..],
            &base,
        ]
        .concat(),
    );
    assert!(r["spans_accepted"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(code, 1, "{text}");
}

/// `--trace-duration`: spans leave as they end, many traces per request and several requests per
/// trace, and every span still arrives once.
#[test]
fn agent_shaped_load_sends_traces_in_pieces_without_loss() {
    let s = sink(&[]);
    let verify = format!("http://{}", s.http);
    let http = s.http.to_string();
    let (code, r) = loadgen(&[
        "--otlp-insecure",
        "--otlp-http",
        "--otlp-endpoint",
        &http,
        "--traces",
        "40",
        "--child-spans",
        "4",
        "--rate",
        "400",
        "--trace-duration",
        "1s",
        "--export-interval",
        "200ms",
        "--verify-sink",
        &verify,
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["spans_sent"], 200, "{r}");
    assert_eq!(r["verify"]["received_unique_spans"], 200, "{r}");
    assert_eq!(r["verify"]["lost_spans"], 0);
    // 80 traces/s lasting 1 s, flushed every 200 ms: whole traces would be 40 / 20 = 2 requests
    // at most per flush; pieces make it several per trace.
    let requests = stats(s.http)["requests"].as_u64().unwrap();
    assert!(requests >= 5, "{requests} requests: the traces were not sent in pieces");

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_otlp-relay"))
        .args([
            "loadgen",
            "--otlp-insecure",
            "--otlp-endpoint",
            &http,
            "--trace-duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--trace-duration needs --rate"));
    drop(s.proc);
}
