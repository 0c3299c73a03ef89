//! Exporter faults and connections, with a destination in front of a real sink: answers that
//! stall after the headers (every way a body can stall), a Retry-After of an hour, and whether
//! connections are kept alive. A tiny TCP server misbehaves on its first connections and then
//! forwards bytes to the sink, so every span is counted at the real sink by id.
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::otlp::{Relay, Sink, spans_request};
use support::{http, wait_for};

const T: Duration = Duration::from_secs(30);

/// What the front server does with one connection.
#[derive(Debug, Clone, Copy)]
enum Misbehave {
    /// `200 OK` with a Content-Length, then no body.
    HeadersNoBody,
    /// `200 OK` with a Content-Length, then half the body.
    HalfBody,
    /// `200 OK`, chunked, one chunk, never the last one.
    ChunkedNoEnd,
    /// `503` with an error body that never comes.
    ErrorBodyStalls,
    /// Accepts and never answers (the one case the old header timeout covered).
    Silent,
    /// `200 OK`, chunked, one byte every 100 ms, forever: no single read ever waits long.
    Drip,
    /// `503` with `Retry-After: 3600`, complete.
    RetryAfterHour,
}

/// Plays `plan` on the first connections, one each, then forwards to `sink`.
struct Front {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Streams held open so a stall stays a stall (not a reset) until the test ends.
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Front {
    fn start(sink: SocketAddr, plan: Vec<Misbehave>) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (count, hold) = (connections.clone(), held.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst);
                let hold = hold.clone();
                match plan.get(n).copied() {
                    Some(m) => {
                        std::thread::spawn(move || misbehave(stream, m, &hold));
                    }
                    None => {
                        std::thread::spawn(move || forward(stream, sink));
                    }
                }
            }
        });
        Front {
            addr,
            connections,
            _held: held,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Reads one request (headers and Content-Length body) so the client is waiting for the answer.
fn read_request(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)
}

fn misbehave(mut stream: TcpStream, how: Misbehave, hold: &Mutex<Vec<TcpStream>>) {
    if read_request(&mut stream).is_err() {
        return;
    }
    let answer: &[u8] = match how {
        Misbehave::HeadersNoBody => b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 100\r\n\r\n",
        Misbehave::HalfBody => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789012345678901234567890123456789",
        Misbehave::ChunkedNoEnd => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        Misbehave::ErrorBodyStalls => b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 100\r\n\r\nbusy",
        Misbehave::Silent => b"",
        Misbehave::Drip => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
            while stream.write_all(b"1\r\nx\r\n").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        }
        Misbehave::RetryAfterHour => {
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 3600\r\nconnection: close\r\ncontent-length: 4\r\n\r\nbusy"
        }
    };
    let _ = stream.write_all(answer);
    let _ = stream.flush();
    // A complete answer closes its connection (the next request goes to the sink); a stall
    // keeps it open.
    if !matches!(how, Misbehave::RetryAfterHour) {
        hold.lock().unwrap().push(stream);
    }
}

/// Byte-for-byte proxy to the sink, both ways.
fn forward(client: TcpStream, sink: SocketAddr) {
    let Ok(upstream) = TcpStream::connect(sink) else { return };
    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = std::io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

/// Plain HTTP receiver, a batch processor and the otlphttp exporter to `endpoint` with one
/// consumer; with `storage`, its queue is spooled there. `exporter_extra` is merged into the exporter.
fn config(endpoint: &str, exporter_extra: Value, storage: Option<&std::path::Path>) -> String {
    let mut config = RelayConfig::new()
        .without_transport("grpc")
        .batch(json!({"send_batch_size": 100, "timeout": "20ms"}))
        .mlflow_exporter(endpoint, json!({"sending_queue": {"num_consumers": 1}}))
        .exporter_settings("otlphttp/mlflow", exporter_extra);
    if let Some(dir) = storage {
        config = config
            .extension("file_storage/spool", json!({"directory": dir}))
            .exporter_settings(
                "otlphttp/mlflow",
                json!({"sending_queue": {"storage": "file_storage/spool"}}),
            );
    }
    config.yaml()
}

fn post(relay: &Relay, body: &[u8]) -> u16 {
    http(
        "POST",
        relay.http.unwrap(),
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        body,
    )
    .0
}

/// Fault 1: a destination (or proxy) that sends headers and then stalls the body, in every
/// variant, held one sender forever. `timeout` now bounds the whole exchange: each stall costs
/// one timeout, is logged and retried, and every span arrives.
#[test]
fn stalled_answers_time_out_and_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let plan = vec![
        Misbehave::HeadersNoBody,
        Misbehave::HalfBody,
        Misbehave::ChunkedNoEnd,
        Misbehave::ErrorBodyStalls,
        Misbehave::Silent,
        Misbehave::Drip,
    ];
    let stalls = plan.len();
    let front = Front::start(sink.http, plan);
    // One sender: on the old code the first stall alone stops all delivery.
    let relay = Relay::start(
        dir.path(),
        &config(&front.url(), json!({"timeout": "1s"}), None),
        "otlp",
    );
    let started = Instant::now();
    for tag in 1..=3u8 {
        assert_eq!(post(&relay, &spans_request(tag, 50)), 200);
    }
    sink.wait_unique(150, T);
    let took = started.elapsed();
    // Each stall costs about one timeout; nothing waits for anything longer.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(front.connections.load(Ordering::SeqCst) > stalls);
    let retries: Vec<String> = relay
        .proc
        .output()
        .into_iter()
        .filter(|l| l.contains("will retry") && l.contains("no complete answer within 1s"))
        .collect();
    assert!(retries.len() >= stalls, "{retries:#?}");
    assert_eq!(
        relay.metric("otelcol_exporter_sent_spans_total", &[]),
        150.0,
        "every span sent once it got through"
    );
}

/// Fault 5: one `Retry-After: 3600` parked every sender (and so all new data) for an hour. It is
/// capped by `max_interval` (300 ms here), logged, and delivery goes on within seconds, with a
/// spool as in the report.
#[test]
fn retry_after_of_an_hour_is_capped_by_max_interval() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let front = Front::start(sink.http, vec![Misbehave::RetryAfterHour]);
    let relay = Relay::start(
        dir.path(),
        &config(&front.url(), json!({}), Some(&dir.path().join("spool"))),
        "otlp",
    );
    assert_eq!(post(&relay, &spans_request(1, 40)), 200);
    sink.wait_unique(40, Duration::from_secs(10));
    // New data after the refusal goes straight through too.
    assert_eq!(post(&relay, &spans_request(2, 40)), 200);
    sink.wait_unique(80, Duration::from_secs(10));
    let capped = wait_for("the cap logged", T, || {
        relay
            .proc
            .output()
            .into_iter()
            .find(|l| l.contains("Retry-After above retry_on_failure.max_interval"))
    });
    assert!(capped.contains("retry_after=3600s"), "{capped}");
    assert!(capped.contains("cap=300ms"), "{capped}");
}

/// `disable_keep_alives`: a new connection per request, so the requests of a relay with few
/// consumers spread over the worker processes of `mlflow server --workers N` instead of staying
/// with the one that accepted a kept-alive connection. Without it, one connection carries them all.
#[test]
fn disable_keep_alives_opens_a_connection_per_request() {
    for (disable, expected) in [(true, 3), (false, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start(&[]);
        let front = Front::start(sink.http, Vec::new());
        let relay = Relay::start(
            dir.path(),
            &config(&front.url(), json!({"disable_keep_alives": disable}), None),
            "otlp",
        );
        for tag in 1..=3u8 {
            assert_eq!(post(&relay, &spans_request(tag, 20)), 200);
            // One export at a time: the next request finds the previous one answered.
            sink.wait_unique(20 * u64::from(tag), T);
        }
        assert_eq!(
            front.connections.load(Ordering::SeqCst),
            expected,
            "disable_keep_alives: {disable}"
        );
    }
}

/// A destination that is behind (an `mlflow server` stores far fewer spans per second than
/// agents send): batches waiting in the sending queue for the same destination go out in one
/// request, up to the batch size limit, so MLflow pays its per-request cost less often. With
/// `merge_waiting_batches: false`, one request per batch, as the collector sends them.
#[test]
fn batches_waiting_for_a_slow_destination_go_out_together() {
    for merge in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        // Each request is answered after 2 s: batches made meanwhile wait in the queue.
        let sink = Sink::start(&["--delay-ms", "2000"]);
        let queue = json!({"sending_queue": {"merge_waiting_batches": merge}});
        let relay = Relay::start(
            dir.path(),
            &config(&format!("http://{}", sink.http), queue, None),
            "otlp",
        );
        let batches = || relay.metric("otelcol_processor_batch_batch_send_size_count", &[]);
        for tag in 1..=5u8 {
            assert_eq!(post(&relay, &spans_request(tag, 20)), 200);
            // Each request its own batch: the next is sent once this one left the batcher.
            wait_for("the request's batch", T, || (batches() == f64::from(tag)).then_some(()));
        }
        let stats = sink.wait_unique(100, T);
        let requests = stats["requests"].as_f64().unwrap();
        let merged = relay.metric("otlp_relay_exporter_merged_batches_total", &[]);
        assert_eq!(batches(), 5.0);
        // Nothing lost or sent twice, and each merged batch is a request fewer.
        assert_eq!(stats["spans"].as_u64(), Some(100), "{stats}");
        assert_eq!(requests, 5.0 - merged, "merge: {merge}, {stats}");
        if merge {
            // The first batch went at once; at least the last ones waited behind it together
            // (all four unless posting took the relay longer than the sink's delay). The batch
            // size limit (100 spans) holds them all.
            assert!(merged >= 1.0 && requests < 5.0, "{merged} merged, {stats}");
        } else {
            assert_eq!(merged, 0.0);
        }
    }
}
