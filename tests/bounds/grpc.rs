//! The same bounds on OTLP/gRPC: stalled streams hold the memory budget and end at
//! read_timeout; idle HTTP/2 connections are closed.
use super::*;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc::Sender;

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

type Client = http2::SendRequest<BoxBody<Bytes, std::convert::Infallible>>;

pub(super) async fn connect(addr: SocketAddr) -> Client {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A request body of the chunks sent through the returned sender (up to `capacity` may wait
/// in it); it ends when the sender is dropped.
fn channel_body(capacity: usize) -> (Sender<Bytes>, BoxBody<Bytes, std::convert::Infallible>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(capacity);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok(http_body::Frame::data(data)), rx))
    });
    (tx, StreamBody::new(frames).boxed())
}

/// A POST of `body` to `path` with its content type, `te: trailers` and `headers`.
fn post_request(
    path: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: BoxBody<Bytes, std::convert::Infallible>,
) -> http::Request<BoxBody<Bytes, std::convert::Infallible>> {
    let mut req = http::Request::post(format!("http://relay{path}"))
        .header("content-type", content_type)
        .header("te", "trailers");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(body).unwrap()
}

/// Starts an Export call whose body is sent through the returned sender; the task answers
/// the call's grpc-status.
async fn start(client: &mut Client) -> (Sender<Bytes>, tokio::task::JoinHandle<String>) {
    let (tx, body) = channel_body(16);
    let req = post_request(EXPORT, "application/grpc", &[], body);
    client.ready().await.unwrap();
    let response = client.send_request(req);
    let task = tokio::spawn(async move {
        let resp = response.await.unwrap();
        if let Some(s) = resp.headers().get("grpc-status") {
            return s.to_str().unwrap().to_string();
        }
        let collected = resp.into_body().collect().await.unwrap();
        collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    });
    (tx, task)
}

/// Starts a request on its own stream whose body is sent through the returned sender,
/// without a content-length; the task answers as `call`'s does.
pub(super) async fn open(client: &mut Client, grpc: bool) -> (Sender<Bytes>, tokio::task::JoinHandle<String>) {
    let (tx, body) = channel_body(4);
    let (path, content_type) = if grpc {
        (EXPORT, "application/grpc")
    } else {
        ("/v1/traces", "application/x-protobuf")
    };
    let req = post_request(path, content_type, &[], body);
    client.ready().await.unwrap();
    let response = client.send_request(req);
    let task = tokio::spawn(async move {
        let Ok(resp) = response.await else {
            return "reset".to_string();
        };
        let status = resp.status().as_u16().to_string();
        if let Some(s) = resp.headers().get("grpc-status") {
            return format!("grpc-status {}", s.to_str().unwrap());
        }
        status
    });
    (tx, task)
}

/// Sends one whole request on its own stream, all at once: an OTLP/gRPC Export call
/// (`grpc`) or an OTLP/HTTP protobuf POST. The task answers "grpc-status N" or the HTTP status.
pub(super) async fn call(client: &mut Client, grpc: bool, message: Vec<u8>) -> tokio::task::JoinHandle<String> {
    let (path, content_type, body) = if grpc {
        let mut body = prefix(message.len()).to_vec();
        body.extend_from_slice(&message);
        (EXPORT, "application/grpc", body)
    } else {
        ("/v1/traces", "application/x-protobuf", message)
    };
    let body = http_body_util::Full::new(Bytes::from(body))
        .map_err(|e| match e {})
        .boxed();
    let req = post_request(path, content_type, &[], body);
    client.ready().await.unwrap();
    let response = client.send_request(req);
    tokio::spawn(async move {
        let resp = response.await.unwrap();
        let status = resp.status().as_u16().to_string();
        let header = resp.headers().get("grpc-status").cloned();
        let collected = resp.into_body().collect().await.unwrap();
        let trailer = collected.trailers().and_then(|t| t.get("grpc-status")).cloned();
        match header.or(trailer) {
            Some(s) => format!("grpc-status {}", s.to_str().unwrap()),
            None => status,
        }
    })
}

/// Starts an Export call with `grpc-encoding: gzip` whose body is sent through the
/// returned sender; the task answers "grpc-status N" (or "reset").
async fn open_gzip(client: &mut Client) -> (Sender<Bytes>, tokio::task::JoinHandle<String>) {
    let (tx, body) = channel_body(4);
    let req = post_request(EXPORT, "application/grpc", &[("grpc-encoding", "gzip")], body);
    client.ready().await.unwrap();
    let response = client.send_request(req);
    let task = tokio::spawn(async move {
        let Ok(resp) = response.await else {
            return "reset".to_string();
        };
        if let Some(s) = resp.headers().get("grpc-status") {
            return format!("grpc-status {}", s.to_str().unwrap());
        }
        match resp.into_body().collect().await {
            Ok(c) => c
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .map_or("none".into(), |v| format!("grpc-status {}", v.to_str().unwrap())),
            Err(_) => "reset".into(),
        }
    });
    (tx, task)
}

/// A small gzip message that decompresses to 15 MiB, sent on 40 streams that never end:
/// tonic keeps each decompressed copy while it waits for the end of the stream. The budget
/// counted only the compressed bytes, so 40 streams held about 600 MiB against an 80 MiB
/// budget; now a compressed message is charged what it may decompress to, and the streams
/// past the budget are refused.
#[test]
fn compressed_grpc_messages_are_charged_what_they_decompress_to() {
    let _serial = memory_test_lock();
    let dir = tempfile::tempdir().unwrap();
    let config = debug_relay(&["grpc"], json!({"max_recv_msg_size_mib": 16, "read_timeout": "60s"}))
        .first_processor("memory_limiter", memory_limiter(96, 16))
        .without_extension("health_check");
    let relay = Relay::start(dir.path(), &config.yaml(), "otlp");
    let pid = relay.proc.child.id();
    let baseline = vm_hwm_kib(pid);
    let addr = relay.grpc.unwrap();
    let compressed = support::gzip(&vec![0u8; 15 * 1024 * 1024]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (peak, answers) = rt.block_on(async {
        let mut open = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut client = connect(addr).await;
            for _ in 0..10 {
                let (tx, task) = open_gzip(&mut client).await;
                let mut message = vec![1u8];
                message.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
                message.extend_from_slice(&compressed);
                // A refused stream may be gone before its message is in.
                let _ = tx.send(Bytes::from(message)).await;
                open.push((tx, task));
            }
            clients.push(client);
        }
        // The relay has read and decompressed everything it will once it stops using CPU.
        let mut last = (cpu_ticks(pid), Instant::now());
        wait_for("the relay to go idle", Duration::from_secs(60), || {
            let now = cpu_ticks(pid);
            if now != last.0 {
                last = (now, Instant::now());
                return None;
            }
            (last.1.elapsed() > Duration::from_millis(1500)).then_some(())
        });
        let peak = vm_hwm_kib(pid);
        let mut answers = std::collections::BTreeMap::<String, usize>::new();
        for (tx, task) in open {
            drop(tx);
            let answer = tokio::time::timeout(Duration::from_secs(90), task)
                .await
                .map_or("none".into(), |r| r.unwrap_or_default());
            *answers.entry(answer).or_default() += 1;
        }
        drop(clients);
        (peak, answers)
    });
    eprintln!(
        "compressed gRPC: peak RSS {} MiB (baseline {} MiB); answers {answers:?}",
        peak / 1024,
        baseline / 1024
    );
    let budget_kib = 80 * 1024;
    let margin_kib = baseline + 32 * 1024;
    assert!(
        peak < budget_kib + margin_kib,
        "peak RSS {} MiB over the 80 MiB budget + margin {} MiB",
        peak / 1024,
        margin_kib / 1024
    );
    assert!(
        answers.keys().any(|a| a == "grpc-status 8" || a == "grpc-status 14"),
        "streams past the budget are refused: {answers:?}"
    );
}

pub(super) fn prefix(declared: usize) -> Bytes {
    let mut p = vec![0u8];
    p.extend_from_slice(&(declared as u32).to_be_bytes());
    Bytes::from(p)
}

/// What a probe's prefix declares: more than the room the stalled calls below leave, less than
/// the budget. The probe holds only its stream window until its prefix arrives, so a probe sent
/// while a stalled call is still growing to its share cannot make that call fail (with a small
/// declared length, the probe's window was what overflowed the budget, and the stalled call
/// was the one refused).
const PROBE_DECLARED: usize = 512 * 1024;

/// A whole call declaring PROBE_DECLARED bytes and sending 64 that do not parse: 3
/// (INVALID_ARGUMENT, the message is short and malformed) when the budget let it be read, 14
/// (UNAVAILABLE) when it refused it.
async fn probe(client: &mut Client) -> String {
    let (tx, task) = start(client).await;
    let mut msg = prefix(PROBE_DECLARED).to_vec();
    msg.extend_from_slice(&[0xff; 64]);
    // A call the budget refuses is answered at once, without its body being read: the
    // answer can arrive before the message is sent, and then the body is gone. The task
    // has the answer either way.
    let _ = tx.send(Bytes::from(msg)).await;
    drop(tx);
    task.await.unwrap()
}

#[test]
fn stalled_grpc_streams_hold_the_budget_until_read_timeout_and_idle_connections_close() {
    let _serial = memory_test_lock();
    let dir = tempfile::tempdir().unwrap();
    // read_timeout leaves the loop below time to see the refusal on a loaded machine: at 3s, and
    // at 8s when the binary's first run started ten relays at once on two cores, the stalled
    // streams could time out, freeing the budget, before a probe got through.
    let grpc = json!({"max_recv_msg_size_mib": 8, "read_timeout": "15s", "idle_timeout": "2s"});
    let config = debug_relay(&["grpc"], grpc)
        .first_processor("memory_limiter", memory_limiter(4, 1))
        .without_extension("health_check");
    let relay = Relay::start(dir.path(), &config.yaml(), "otlp");
    let addr = relay.grpc.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = connect(addr).await;
        assert_eq!(probe(&mut client).await, "3");
        // Two streams, each on its own connection, declare 1 MiB messages in their prefix
        // and stall after 100 KiB. With the 256 KiB HTTP/2 stream window each holds, they
        // take 2.5 of the 3 MiB budget: a probe's window still fits beside them (so a probe
        // sent while they grow cannot make them fail), its declared message does not.
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let mut c = connect(addr).await;
            let (tx, task) = start(&mut c).await;
            tx.send(prefix(1024 * 1024 - 5)).await.unwrap();
            tx.send(Bytes::from(vec![0u8; 100 * 1024])).await.unwrap();
            stalled.push((c, tx, task));
        }
        let started = Instant::now();
        let deadline = started + T;
        // What the probes saw, for the failure message: (ms since start, answer), one entry
        // per change of answer.
        let mut seen: Vec<(u128, String)> = Vec::new();
        loop {
            // A probe tells something only while both stalled calls still hold their share;
            // if one has ended, say how (its status) instead of probing on.
            if stalled.iter().any(|(_, _, task)| task.is_finished()) {
                let mut calls = Vec::new();
                for (_c, _tx, task) in stalled.drain(..) {
                    calls.push(match task.is_finished() {
                        true => task.await.unwrap(),
                        false => "running".to_string(),
                    });
                }
                panic!(
                    "a stalled call ended before the budget refused a probe, after {:?}: the \
                     stalled calls answered {calls:?}; the probes {seen:?}; the relay's log:\n{}",
                    started.elapsed(),
                    relay.proc.output_text()
                );
            }
            // Each probe on a connection of its own: one kept between probes can be closed at
            // idle_timeout while the stalled calls are set up on a loaded machine.
            let mut client = connect(addr).await;
            let answer = probe(&mut client).await;
            if answer == "14" {
                break;
            }
            if seen.last().is_none_or(|(_, last)| *last != answer) {
                seen.push((started.elapsed().as_millis(), answer));
            }
            assert!(
                Instant::now() < deadline,
                "the budget never refused a probe; the probes {seen:?}; the relay's log:\n{}",
                relay.proc.output_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // After read_timeout: DEADLINE_EXCEEDED, and the memory is free again.
        for (_c, _tx, task) in stalled {
            assert_eq!(task.await.unwrap(), "4");
        }
        // Ended by read_timeout (15s), not by a later timeout.
        assert!(started.elapsed() < Duration::from_secs(28), "{:?}", started.elapsed());
        // (The probing connection was idle meanwhile, and closed: see below.)
        let mut client = connect(addr).await;
        assert_eq!(probe(&mut client).await, "3");
        // An idle HTTP/2 connection is closed (GOAWAY) after idle_timeout.
        let idle = Instant::now();
        while !client.is_closed() {
            assert!(idle.elapsed() < Duration::from_secs(10), "idle connection still open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(
        relay.metric(
            "otlp_relay_receiver_connections_closed_total",
            &[("reason", "idle_timeout")]
        ) >= 1.0
    );
}
