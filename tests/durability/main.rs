//! Durability faults with real processes on loopback: the destination down, SIGKILL mid-load,
//! a slow destination under a burst, a torn segment tail, a tiny spool, and poison batches into
//! the dead letter and back out with `replay`. Phases are a few seconds (not the 20 s):
//! each still fills the spool and proves the property; run time of the whole file ≈ 1 min.
#[path = "../support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use otlp_relay::sink::UniqueSpans;
use otlp_relay::spool::frame;
use prost::Message;

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::otlp::{Relay, Sink, loadgen};
use support::{Proc, get_text, vm_hwm_kib, wait_for};

mod corruption;
mod dead_letter;
mod outages;
mod spool_limits;

const T: Duration = Duration::from_secs(60);

/// The sink on a given port (the destination coming up where the relay has been sending).
fn sink_on(port: u16) -> Sink {
    let listen = format!("127.0.0.1:{port}");
    let mut proc = Proc::relay("sink", &["sink", "--listen", &listen, "--grpc-listen", "127.0.0.1:0"]);
    let http = proc.wait_listen("sink-http", T);
    let grpc = proc.wait_listen("sink-grpc", T);
    Sink {
        proc,
        http,
        grpc,
        stats_addr: http,
    }
}

/// A relay exporting to `endpoint` through a spool in `spool_dir`; `storage` is merged into the
/// spool's settings (e.g. `{"max_size_mib": 1}`).
fn config(endpoint: &str, spool_dir: &Path, storage: Value) -> String {
    let mut spool = json!({"directory": spool_dir});
    if let (Value::Object(spool), Value::Object(extra)) = (&mut spool, storage) {
        spool.extend(extra);
    }
    RelayConfig::new()
        .batch(json!({"send_batch_size": 500, "timeout": "50ms"}))
        .mlflow_exporter(
            endpoint,
            json!({"sending_queue": {"storage": "file_storage/spool", "num_consumers": 4}}),
        )
        .extension("file_storage/spool", spool)
        .service(json!({"shutdown_timeout": "10s"}))
        .yaml()
}

/// An endpoint where nothing listens yet (the destination is down), and its port for `sink_on`.
fn down_destination() -> (u16, String) {
    let port = support::free_port();
    (port, format!("http://127.0.0.1:{port}"))
}

/// A relay spooling to `dir/spool` and exporting to `endpoint`; returns it with its config, to
/// restart it on the same spool.
fn spooled_relay(dir: &Path, endpoint: &str, storage: Value) -> (Relay, String) {
    let cfg = config(endpoint, &dir.join("spool"), storage);
    (Relay::start(dir, &cfg, "otlp"), cfg)
}

/// Loadgen over OTLP/HTTP to `receiver` with `args` (its exit code and report).
fn loadgen_http(receiver: SocketAddr, args: &[&str]) -> (i32, Value) {
    let endpoint = format!("http://{receiver}");
    let mut all = vec!["--otlp-endpoint", &endpoint, "--otlp-http"];
    all.extend_from_slice(args);
    loadgen(&all)
}

/// `traces` traces of `child_spans` + 1 spans in batches of `batch_size` over OTLP/HTTP, every
/// one accepted; returns the spans sent.
fn load_accepted(relay: &Relay, traces: u64, child_spans: u64, batch_size: u64) -> u64 {
    let (traces_arg, child_arg, batch_arg) = (traces.to_string(), child_spans.to_string(), batch_size.to_string());
    let (code, report) = loadgen_http(
        relay.http.unwrap(),
        &[
            "--traces",
            &traces_arg,
            "--child-spans",
            &child_arg,
            "--batch-size",
            &batch_arg,
        ],
    );
    assert_eq!(code, 0, "{report}");
    let spans = traces * (child_spans + 1);
    assert_eq!(report["spans_accepted"], spans, "{report}");
    spans
}

/// `requests` requests of `spans` spans each (ids unique to `tag`), every one acknowledged;
/// returns their span keys.
fn post_acknowledged(relay: &Relay, tag: u32, requests: u64, spans: usize) -> Vec<String> {
    let mut acked = Vec::new();
    for seq in 0..requests {
        let (body, keys) = request(tag, seq, spans);
        assert_eq!(post(relay.http.unwrap(), &body).unwrap().0, 200);
        acked.extend(keys);
    }
    acked
}

fn kill(relay: &mut Relay) {
    relay.proc.signal("KILL");
    relay.proc.wait_exit(T);
}

/// SIGTERM: the relay exits 0.
fn terminate(relay: &mut Relay) {
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(T), Some(0));
}

/// The `final span accounting` line of a relay that has exited (the exit can beat the line's
/// capture: polled).
fn accounting(relay: &Relay) -> String {
    wait_for("the accounting line", T, || {
        relay
            .proc
            .output()
            .into_iter()
            .find(|l| l.contains("final span accounting"))
    })
}

fn lines_with(relay: &Relay, needle: &str) -> Vec<String> {
    relay.proc.output().into_iter().filter(|l| l.contains(needle)).collect()
}

/// `otlp-relay replay` of the dead letter `dead_letter` through the config at `config`, run to
/// its exit.
fn replay(dead_letter: &Path, config: &Path) -> (Option<i32>, Proc) {
    let args = [
        "replay",
        "--from",
        dead_letter.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let mut p = Proc::relay("replay", &args);
    (p.wait_exit(T), p)
}

/// A config for `replay` of the spool in `dir`, to the (fixed) destination `good`.
fn fixed_config(dir: &Path, good: &Sink) -> PathBuf {
    support::write_file(dir, "fixed.yaml", &config(&good.url(), &dir.join("spool"), json!({})))
}

/// Waits until every key of `acked` is at the sink serving `sink`.
fn wait_all_delivered<'a>(what: &str, sink: SocketAddr, acked: impl Iterator<Item = &'a String> + Clone) {
    wait_for(what, T, || {
        let have = sink_keys(sink);
        acked.clone().all(|k| have.contains(k)).then_some(())
    });
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "seg"));
    v.sort();
    v
}

fn spool_dir(root: &Path) -> PathBuf {
    root.join("spool").join("otlphttp_mlflow")
}

/// Waits until delivered segments are deleted: at most `n` left in the spool under `root`.
fn wait_segments_at_most(root: &Path, n: usize) {
    wait_for("delivered segments deleted", T, || {
        (segments(&spool_dir(root)).len() <= n).then_some(())
    });
}

/// Sink keys of spans the relay delivered, as `/spans` lists them.
fn sink_keys(sink: SocketAddr) -> std::collections::HashSet<String> {
    let (status, body) = get_text(sink, "/spans");
    assert_eq!(status, 200);
    body.lines().map(str::to_string).collect()
}

fn key_text(trace: &[u8], span: &[u8]) -> String {
    let (t, s) = UniqueSpans::key(trace, span);
    format!("{t:032x}-{s:016x}")
}

/// One OTLP/HTTP POST over a fresh connection; Err when the relay is not there.
fn post(addr: SocketAddr, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))?;
    let headers = text.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase();
    Ok((status, headers))
}

/// A request of `n` spans with ids unique to (`tag`, `seq`); returns it with its span keys.
fn request(tag: u32, seq: u64, n: usize) -> (Vec<u8>, Vec<String>) {
    let mut trace_id = [0u8; 16];
    trace_id[..4].copy_from_slice(&tag.to_be_bytes());
    trace_id[8..].copy_from_slice(&seq.to_be_bytes());
    let spans: Vec<Span> = (0..n)
        .map(|i| Span {
            trace_id: trace_id.to_vec(),
            span_id: (i as u64 + 1).to_be_bytes().to_vec(),
            name: format!("op-{i}"),
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_100_000_000,
            ..Default::default()
        })
        .collect();
    let keys = spans.iter().map(|s| key_text(&s.trace_id, &s.span_id)).collect();
    let req = support::otlp::one_resource(spans);
    (req.encode_to_vec(), keys)
}

/// Clients that send until stopped and remember every span the relay acknowledged.
struct Clients {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(addr: SocketAddr, workers: u32, spans_per_request: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..workers)
            .map(|w| {
                let (stop, acked) = (stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let mut seq = 0;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let (body, keys) = request(w + 1, seq, spans_per_request);
                        match post(addr, &body) {
                            Ok((200, _)) => acked.lock().unwrap().extend(keys),
                            Ok(_) => {}
                            // The relay is gone (killed): nothing more to acknowledge.
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                })
            })
            .collect();
        Clients { stop, acked, threads }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}
