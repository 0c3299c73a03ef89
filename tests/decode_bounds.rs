//! Hostile bodies against the memory budget while they are parsed: millions of spans with
//! unusable ids around valid ones (protobuf over HTTP, gzip and gRPC; JSON), many at once. The
//! relay's peak memory stays within a bound derived from memory_limiter (read from the kernel,
//! not from the relay), the valid spans in those requests reach the sink, what cannot fit is
//! refused with 413 or 429, and /readyz answers promptly throughout.
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use support::http_exchange;
use support::otlp::{Relay, Sink};

const T: Duration = Duration::from_secs(180);
const LIMIT_MIB: u64 = 64;

fn config(sink: &Sink) -> String {
    format!(
        r#"
receivers: {{otlp: {{protocols: {{http: {{endpoint: "127.0.0.1:0"}}, grpc: {{endpoint: "127.0.0.1:0"}}}}}}}}
processors:
  memory_limiter: {{check_interval: 1s, limit_mib: {LIMIT_MIB}, spike_limit_mib: 16}}
  batch: {{timeout: 20ms, send_batch_size: 512, send_batch_max_size: 2048}}
exporters: {{otlphttp: {{endpoint: "{}"}}}}
extensions:
  health_check: {{endpoint: "127.0.0.1:0"}}
service:
  extensions: [health_check]
  pipelines: {{traces: {{receivers: [otlp], processors: [memory_limiter, batch], exporters: [otlphttp]}}}}
  telemetry: {{metrics: {{address: "127.0.0.1:0"}}}}
"#,
        sink.url()
    )
}

/// A relay under the memory budget exporting to a fresh sink, and the relay's peak memory
/// before any test request.
struct Budgeted {
    _dir: tempfile::TempDir,
    sink: Sink,
    relay: Relay,
    baseline: u64,
}

impl Budgeted {
    fn start() -> Budgeted {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start(&[]);
        let relay = Relay::start(dir.path(), &config(&sink), "otlp");
        let baseline = peak_rss(relay.proc.child.id());
        Budgeted {
            _dir: dir,
            sink,
            relay,
            baseline,
        }
    }

    /// Asserts that the relay's peak memory grew by at most the budget plus a fixed allowance:
    /// the budget bounds what bodies and parsing hold (limit_mib); the rest is the relay's own
    /// working memory (connections, buffers, allocator slack), independent of the bodies' content.
    fn assert_peak_within_budget(&self, note: &str) {
        let peak = peak_rss(self.relay.proc.child.id());
        let grown = peak.saturating_sub(self.baseline);
        eprintln!(
            "peak RSS {} MiB (baseline {} MiB){note}",
            peak >> 20,
            self.baseline >> 20
        );
        let bound = (LIMIT_MIB + 48) << 20;
        assert!(
            grown <= bound,
            "peak grew {} MiB, over {} MiB",
            grown >> 20,
            bound >> 20
        );
    }
}

/// The most memory the process has held (VmHWM), in bytes, as the kernel counts it.
fn peak_rss(pid: u32) -> u64 {
    support::vm_hwm_kib(pid) * 1024
}

fn field(key: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(key);
    prost::encoding::encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// The trace and span ids of span number `id`.
fn span_ids(id: u32) -> ([u8; 16], [u8; 8]) {
    let mut trace_id = [7u8; 16];
    trace_id[..4].copy_from_slice(&id.to_be_bytes());
    let mut span_id = [9u8; 8];
    span_id[..4].copy_from_slice(&id.to_be_bytes());
    (trace_id, span_id)
}

/// A valid span's encoding, its ids from `id` (distinct per id).
fn good_span(id: u32) -> Vec<u8> {
    let (trace_id, span_id) = span_ids(id);
    let mut out = Vec::new();
    field(0x0a, &trace_id, &mut out);
    field(0x12, &span_id, &mut out);
    out
}

/// `resources` ResourceSpans of `scopes` ScopeSpans, each holding `empties` empty spans (ids
/// absent, so unusable) and then one valid span, ids from `first`.
fn hostile_protobuf(resources: u32, scopes: u32, empties: usize, first: u32) -> (Vec<u8>, Vec<u32>) {
    let mut body = Vec::new();
    let mut ids = Vec::new();
    for r in 0..resources {
        let mut rs = Vec::new();
        for s in 0..scopes {
            let mut scope = [0x12u8, 0x00].repeat(empties);
            let id = first + r * scopes + s;
            field(0x12, &good_span(id), &mut scope);
            ids.push(id);
            field(0x12, &scope, &mut rs);
        }
        field(0x0a, &rs, &mut body);
    }
    (body, ids)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// POSTs until the relay stops refusing for memory (429, as a real client retries); returns
/// the final status and body.
fn post_retrying(addr: SocketAddr, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    let deadline = Instant::now() + T;
    loop {
        let (status, _, response) = http_exchange("POST", addr, "/v1/traces", headers, body);
        if status != 429 || Instant::now() > deadline {
            return (status, response);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rejected span count an OTLP/HTTP protobuf answer reports.
fn rejected(response: &[u8]) -> i64 {
    ExportTraceServiceResponse::decode(response)
        .unwrap()
        .partial_success
        .map_or(0, |p| p.rejected_spans)
}

/// One unary Export call over HTTP/2, retried while the relay is short of memory (UNAVAILABLE);
/// returns grpc-status.
async fn grpc_export(addr: SocketAddr, message: Vec<u8>) -> String {
    use http_body_util::{BodyExt, Full};
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let frame = bytes::Bytes::from(frame);
    let deadline = Instant::now() + T;
    loop {
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
        .body(Full::new(frame.clone()))
        .unwrap();
        let response = sender.send_request(req).await.unwrap();
        let headers = response.headers().clone();
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = trailers
            .get("grpc-status")
            .or_else(|| headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        if status != "14" || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls /readyz until `done`, returning the slowest answer's time (a failed or timed-out
/// probe counts as the time it took, at least 2 s).
fn watch_readyz(health: SocketAddr, done: Arc<AtomicBool>) -> std::thread::JoinHandle<(Duration, usize)> {
    std::thread::spawn(move || {
        let (mut slowest, mut probes) = (Duration::ZERO, 0);
        while !done.load(Ordering::Relaxed) {
            let start = Instant::now();
            let ok = std::panic::catch_unwind(|| {
                let mut s = std::net::TcpStream::connect_timeout(&health, Duration::from_secs(5)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                use std::io::Read;
                write!(s, "GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").ok()?;
                let mut raw = Vec::new();
                s.read_to_end(&mut raw).ok()?;
                raw.starts_with(b"HTTP/1.1 200").then_some(())
            })
            .ok()
            .flatten();
            let took = start.elapsed().max(if ok.is_some() {
                Duration::ZERO
            } else {
                Duration::from_secs(2)
            });
            slowest = slowest.max(took);
            probes += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        (slowest, probes)
    })
}

/// The review's reproduction as a class, all at once against a 64 MiB memory_limiter: two 16 MB
/// protobuf bodies of 8M empty spans and one valid one (2.1 GB each before), one with invalid
/// spans spread over many resources and scopes, the same gzip-compressed and over gRPC, and
/// sixteen small ones. Peak memory stays within the limit plus a fixed allowance (the budget
/// bounds what bodies and their parsing hold); every valid span arrives; /readyz stays prompt.
#[test]
fn hostile_protobuf_bodies_are_parsed_within_the_memory_budget() {
    let budgeted = Budgeted::start();
    let (relay, sink) = (&budgeted.relay, &budgeted.sink);
    let (http, grpc, health) = (relay.http.unwrap(), relay.grpc.unwrap(), relay.health.unwrap());

    let done = Arc::new(AtomicBool::new(false));
    let readyz = watch_readyz(health, done.clone());
    let proto = [("content-type", "application/x-protobuf")];
    let mut expected = Vec::new();
    let mut senders = Vec::new();
    let mut send = |body: Vec<u8>, ids: Vec<u32>, gzipped: bool| {
        let empties = (body.len() / 2) as i64;
        expected.extend(ids.iter().copied());
        senders.push(std::thread::spawn(move || {
            let (status, response) = if gzipped {
                let zipped = gzip(&body);
                let headers = [proto[0], ("content-encoding", "gzip")];
                post_retrying(http, &headers, &zipped)
            } else {
                post_retrying(http, &proto, &body)
            };
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&response));
            let refused = rejected(&response);
            assert!(
                refused > empties - 100_000 && refused <= empties,
                "{refused} rejected of about {empties}"
            );
        }));
    };
    for first in [1, 100] {
        let (body, ids) = hostile_protobuf(1, 1, 8_000_000, first);
        send(body, ids, false);
    }
    let (body, ids) = hostile_protobuf(200, 20, 1_900, 1_000);
    send(body, ids, false);
    let (body, ids) = hostile_protobuf(1, 1, 8_000_000, 200);
    send(body, ids, true);
    for i in 0..16 {
        let (body, ids) = hostile_protobuf(2, 3, 80_000, 10_000 + i * 10);
        send(body, ids, false);
    }
    let (message, ids) = hostile_protobuf(1, 1, 8_000_000, 300);
    expected.extend(ids);
    let grpc_sender = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(grpc_export(grpc, message))
    });
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(grpc_sender.join().unwrap(), "0", "gRPC status");
    done.store(true, Ordering::Relaxed);
    let (slowest, probes) = readyz.join().unwrap();
    budgeted.assert_peak_within_budget(&format!("; slowest /readyz {slowest:?} of {probes}"));
    assert!(slowest < Duration::from_secs(1), "/readyz took {slowest:?}");
    assert!(probes > 3, "{probes} probes");

    expected.sort_unstable();
    expected.dedup();
    sink.wait_unique(expected.len() as u64, T);
    let (_, listed) = support::get_text(sink.stats_addr, "/spans");
    for id in &expected {
        // The sink lists each span as its ids read as little-endian integers, in hex.
        let (trace_id, span_id) = span_ids(*id);
        let needle = format!(
            "{:032x}-{:016x}",
            u128::from_le_bytes(trace_id),
            u64::from_le_bytes(span_id)
        );
        assert!(listed.lines().any(|l| l == needle), "span {id} did not arrive");
    }
}

/// JSON: serde decodes a request whole, `{}` into a Span of hundreds of bytes. A body whose
/// decoded size could never fit memory_limiter is refused with 413 before it is decoded (memory
/// stays flat); one that fits is decoded within the budget, its valid spans delivered and the
/// rest counted as rejected; nested values and huge strings fit by the same estimate.
#[test]
fn hostile_json_bodies_are_refused_or_decoded_within_the_memory_budget() {
    let budgeted = Budgeted::start();
    let (http, health) = (budgeted.relay.http.unwrap(), budgeted.relay.health.unwrap());
    let json = [("content-type", "application/json")];
    let good = |id: u32| {
        format!(r#"{{"traceId":"{id:08x}070707070707070707070707","spanId":"{id:08x}09090909","name":"ok"}}"#)
    };
    let request = |spans: &[String]| {
        format!(
            r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{}]}}]}}]}}"#,
            spans.join(",")
        )
    };

    let done = Arc::new(AtomicBool::new(false));
    let readyz = watch_readyz(health, done.clone());
    // 5.5M empty spans (16.5 MB): about 1.5 GB decoded before. Refused, even twice at once.
    let mut spans = vec!["{}".to_string(); 5_500_000];
    spans.push(good(1));
    let huge = Arc::new(request(&spans));
    let refusals: Vec<_> = (0..2)
        .map(|_| {
            let huge = huge.clone();
            std::thread::spawn(move || http_exchange("POST", http, "/v1/traces", &json, huge.as_bytes()))
        })
        .collect();
    for r in refusals {
        let (status, _, body) = r.join().unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("memory_limiter"), "{text}");
    }
    // Nested arrays and objects in attributes: each object counts.
    let nested = (0..20).fold(r#"{"intValue":"1"}"#.to_string(), |v, _| {
        format!(
            r#"{{"arrayValue":{{"values":[{v},{{}},{{"kvlistValue":{{"values":[{{"key":"k","value":{{}}}}]}}}}]}}}}"#
        )
    });
    let attributed = |id: u32| {
        support::replace_once(
            &good(id),
            r#""name":"ok""#,
            &format!(r#""attributes":[{{"key":"deep","value":{nested}}}]"#),
        )
    };
    let fits: Vec<(String, i64)> = vec![
        // Empty spans that fit the budget, around valid ones.
        (
            request(&[vec!["{}".to_string(); 20_000], vec![good(2), good(3)]].concat()),
            20_000,
        ),
        (request(&(0..300).map(|i| attributed(100 + i)).collect::<Vec<_>>()), 0),
        // One 8 MB string.
        (
            request(&[support::replace_once(
                &good(5),
                r#""ok""#,
                &format!("\"{}\"", "x".repeat(8 << 20)),
            )]),
            0,
        ),
    ];
    let expected = 2 + 300 + 1;
    for (body, rejected_spans) in &fits {
        let (status, _, response) = http_exchange("POST", http, "/v1/traces", &json, body.as_bytes());
        let text = String::from_utf8_lossy(&response);
        assert_eq!(status, 200, "{text}");
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        let refused = answer["partialSuccess"]["rejectedSpans"].as_i64().unwrap_or(0);
        assert_eq!(refused, *rejected_spans, "{text}");
    }
    done.store(true, Ordering::Relaxed);
    let (slowest, _) = readyz.join().unwrap();
    budgeted.sink.wait_unique(expected, T);
    budgeted.assert_peak_within_budget(&format!("; slowest /readyz {slowest:?}"));
    assert!(slowest < Duration::from_secs(1), "/readyz took {slowest:?}");
}

/// A 16 MB record of 520,000 small valid spans: the batcher cuts it into batches of 2,048 from
/// its bytes (a decode to cut it took about 13 times its size: 200 MB), within the same bound,
/// and every span arrives.
#[test]
fn a_large_valid_record_is_split_within_the_memory_budget() {
    let budgeted = Budgeted::start();
    let spans = 520_000u32;
    let mut scope = Vec::new();
    for id in 0..spans {
        field(0x12, &good_span(id), &mut scope);
    }
    let mut rs = Vec::new();
    field(0x12, &scope, &mut rs);
    let mut body = Vec::new();
    field(0x0a, &rs, &mut body);
    let (status, _, response) = http_exchange(
        "POST",
        budgeted.relay.http.unwrap(),
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &body,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&response));
    budgeted.sink.wait_unique(u64::from(spans), T);
    budgeted.assert_peak_within_budget("");
}
