//! Durability faults with real processes on loopback: the destination down, SIGKILL mid-load,
//! a slow destination under a burst, a torn segment tail, a tiny spool, and poison batches into
//! the dead letter and back out with `replay`. Phases are a few seconds (not the 20 s):
//! each still fills the spool and proves the property; run time of the whole file ≈ 1 min.
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use otlp_relay::sink::UniqueSpans;
use otlp_relay::spool::frame;
use prost::Message;

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::otlp::{Relay, Sink, loadgen};
use support::{Proc, get_text, vm_hwm_kib, wait_for};

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
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
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

/// (a) The destination is down for a while under steady load, then comes up: every span the
/// client had acknowledged arrives, and delivered segments are deleted.
#[test]
fn destination_outage_loses_no_acknowledged_span() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (relay, _) = spooled_relay(dir.path(), &endpoint, json!({"max_size_mib": 4, "segment_size_mib": 1}));
    let receiver = relay.http.unwrap();
    let load = std::thread::spawn(move || {
        loadgen_http(
            receiver,
            &["--rate", "5000", "--duration", "6s", "--workers", "4", "--seed", "11"],
        )
    });
    // Down for ~4 s of load: the spool takes it all, over more than one segment.
    wait_for("spans accepted while the destination is down", T, || {
        (relay.metric("otelcol_receiver_accepted_spans_total", &[]) >= 20_000.0).then_some(())
    });
    assert_eq!(relay.metric("otelcol_exporter_sent_spans_total", &[]), 0.0);
    let during = segments(&spool_dir(dir.path())).len();
    assert!(during >= 2, "{during} segment(s) while down");
    let sink = sink_on(port);
    let (code, report) = load.join().unwrap();
    assert_eq!(code, 0, "{report}");
    let acked = report["spans_accepted"].as_u64().unwrap();
    assert_eq!(report["spans_refused"], 0, "{report}");
    let stats = sink.wait_unique(acked, T);
    assert_eq!(
        stats["experiments"]["0"].as_u64().unwrap(),
        stats["spans"].as_u64().unwrap()
    );
    // Delivered segments go; at most the one being written stays.
    wait_segments_at_most(dir.path(), 1);
}

/// (b) SIGKILL mid-load with the spool on: after a restart every span any client saw
/// acknowledged reaches the destination, checked span id by span id.
#[test]
fn sigkill_mid_load_keeps_every_acknowledged_span() {
    let dir = tempfile::tempdir().unwrap();
    // A slow destination, so a backlog sits only on disk when the relay dies.
    let sink = Sink::start(&["--max-spans-per-sec", "2000"]);
    let (mut relay, cfg) = spooled_relay(dir.path(), &sink.url(), json!({}));
    let clients = Clients::start(relay.http.unwrap(), 3, 50);
    wait_for("acknowledged spans", T, || (clients.acked() >= 15_000).then_some(()));
    kill(&mut relay);
    let acked = clients.stop();
    let at_kill = sink.stats()["unique_spans"].as_u64().unwrap() as usize;
    assert!(
        at_kill < acked.len(),
        "the backlog should be on disk only: sink {at_kill}, acked {}",
        acked.len()
    );
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    relay.proc.wait_line("spool: recovered undelivered spans", T);
    wait_all_delivered("every acknowledged span at the sink", sink.http, acked.iter());
}

/// (c) A destination taking ~1k spans/s under a 20k spans/s burst: clients are pushed back with
/// 429 + Retry-After (HTTP) and UNAVAILABLE (gRPC), memory stays bounded, nothing acknowledged
/// is lost.
#[test]
fn slow_destination_pushes_back_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&["--max-spans-per-sec", "1000"]);
    let (relay, _) = spooled_relay(dir.path(), &sink.url(), json!({"max_size_mib": 1}));
    let run = |endpoint: String, http: bool, seed: &'static str| {
        std::thread::spawn(move || {
            let mut args = vec![
                "--otlp-endpoint",
                &endpoint,
                "--rate",
                "10000",
                "--duration",
                "6s",
                "--workers",
                "4",
                "--max-retries",
                "0",
                "--seed",
                seed,
            ];
            if http {
                args.push("--otlp-http");
            }
            loadgen(&args)
        })
    };
    let h = run(format!("http://{}", relay.http.unwrap()), true, "21");
    let g = run(format!("http://{}", relay.grpc.unwrap()), false, "22");
    let mut raw_acked = 0;
    let mut seq = 0;
    let (_, body) = wait_for("a refusal of a raw request", T, || {
        seq += 1;
        let (body, _) = request(9, seq, 100);
        let answer = post(relay.http.unwrap(), &body).ok()?;
        if answer.0 == 200 {
            raw_acked += 100;
        }
        (answer.0 == 429).then_some(answer)
    });
    assert!(body.contains("retry-after: 2"), "{body}");
    let (hc, hr) = h.join().unwrap();
    let (gc, gr) = g.join().unwrap();
    assert!(hr["refused_by"]["http_429"].as_u64().unwrap_or(0) > 0, "{hr}");
    assert!(gr["refused_by"]["grpc_UNAVAILABLE"].as_u64().unwrap_or(0) > 0, "{gr}");
    // Loadgen exits 1 when it saw refusals; the point here is what it got acknowledged.
    assert!(hc <= 1 && gc <= 1, "{hr}\n{gr}");
    assert!(relay.metric("otelcol_receiver_refused_spans_total", &[("reason", "spool_full")]) > 0.0);
    let peak_kib = vm_hwm_kib(relay.proc.child.id());
    eprintln!("relay peak RSS (VmHWM) under the burst: {} MiB", peak_kib / 1024);
    assert!(peak_kib < 200 * 1024, "peak RSS {peak_kib} KiB");
    let acked = hr["spans_accepted"].as_u64().unwrap() + gr["spans_accepted"].as_u64().unwrap() + raw_acked;
    assert!(acked > 0);
    sink.wait_unique(acked, T);
}

/// (d) A torn tail on the last segment (a write cut by a crash): one log line, one counter,
/// every intact record still delivered.
#[test]
fn torn_tail_is_truncated_and_intact_records_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (mut relay, cfg) = spooled_relay(dir.path(), &endpoint, json!({}));
    assert_eq!(load_accepted(&relay, 200, 4, 50), 1000);
    kill(&mut relay);
    let segs = segments(&spool_dir(dir.path()));
    let last = segs.last().expect("a segment");
    let data = std::fs::read(last).unwrap();
    let scan = frame::scan(&data);
    assert_eq!(scan.valid_len, data.len());
    let total: u32 = segs
        .iter()
        .flat_map(|p| frame::scan(&std::fs::read(p).unwrap()).records)
        .map(|r| r.spans)
        .sum();
    assert_eq!(total, 1000);
    let lost = scan.records.last().unwrap().spans;
    // Cut inside the last record.
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(data.len() as u64 - 7)
        .unwrap();
    let sink = sink_on(port);
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    sink.wait_unique(u64::from(1000 - lost), T);
    let torn = lines_with(&relay, "torn or corrupt tail truncated");
    assert_eq!(torn.len(), 1, "{torn:?}");
    assert_eq!(relay.metric("otlp_relay_spool_corrupt_records_total", &[]), 1.0);
}

/// (e) A tiny spool with the destination down: requests are refused with a retry hint and the
/// relay stays up; with on_full: drop_oldest it keeps accepting and counts what it dropped.
#[test]
fn tiny_spool_refuses_without_crashing_or_drops_oldest_when_asked() {
    for drop_oldest in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (port, endpoint) = down_destination();
        let extra = if drop_oldest {
            json!({"max_size_mib": 1, "on_full": "drop_oldest"})
        } else {
            json!({"max_size_mib": 1})
        };
        let (mut relay, _) = spooled_relay(dir.path(), &endpoint, extra);
        let mut statuses = std::collections::BTreeMap::new();
        let mut refusal = String::new();
        // ~2.3 MiB of spans into a 1 MiB spool.
        for seq in 0..500 {
            let (body, _) = request(5, seq, 100);
            let (status, headers) = post(relay.http.unwrap(), &body).unwrap();
            *statuses.entry(status).or_insert(0) += 1;
            if status != 200 {
                refusal = headers;
            }
        }
        assert!(relay.proc.child.try_wait().unwrap().is_none(), "relay exited");
        assert_eq!(get_text(relay.health.unwrap(), "/healthz").0, 200);
        let bytes = relay.metric("otlp_relay_spool_bytes", &[]);
        assert!(bytes <= 1024.0 * 1024.0 + 20_000.0, "spool bytes {bytes}");
        if drop_oldest {
            assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), vec![200], "{statuses:?}");
            assert!(relay.metric("otlp_relay_exporter_dropped_spans_total", &[("reason", "spool_full")]) > 0.0);
        } else {
            assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "{statuses:?}");
            assert!(refusal.contains("retry-after: 2"), "{refusal}");
            assert!(relay.metric("otelcol_receiver_refused_spans_total", &[("reason", "spool_full")]) > 0.0);
            // What was acknowledged still arrives once the destination is up.
            let acked = statuses[&200] * 100;
            let sink = sink_on(port);
            sink.wait_unique(acked, T);
        }
        terminate(&mut relay);
    }
}

/// (f) MLflow refuses a batch for good (422): it goes to the dead letter, counted, and
/// `otlp-relay replay` delivers it once the cause is fixed.
#[test]
fn poison_batch_goes_to_dead_letter_and_replay_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Sink::start(&["--status", "422"]);
    let (relay, _) = spooled_relay(dir.path(), &bad.url(), json!({}));
    load_accepted(&relay, 100, 2, 30);
    wait_for("dead-lettered spans", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[]) == 300.0).then_some(())
    });
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 300.0);
    // Not retried: every request the bad destination saw was one batch, refused once.
    assert_eq!(bad.stats()["failed_requests"], bad.stats()["requests"]);
    let dl = dir.path().join("spool").join("dead_letter");
    assert!(!segments(&dl.join("otlphttp_mlflow")).is_empty());
    drop(relay);

    let good = Sink::start(&[]);
    let fixed = fixed_config(dir.path(), &good);
    let (code, replay_proc) = replay(&dl, &fixed);
    assert_eq!(code, Some(0), "{}", replay_proc.output_text());
    // The exit can beat the last captured line: poll the output.
    wait_for("the replay summary", T, || {
        replay_proc
            .output_text()
            .contains("300 span(s) delivered")
            .then_some(())
    });
    good.wait_unique(300, T);
    assert!(
        segments(&dl.join("otlphttp_mlflow")).is_empty(),
        "replayed files are renamed"
    );
    // A second replay finds nothing to send.
    assert_eq!(replay(&dl, &fixed).0, Some(2));
    assert_eq!(good.stats()["spans"], 300);
}

/// SIGTERM with a spool: the relay exits at once (no drain wait while the destination is down),
/// the accounting balances with the spans left on disk, and the next start delivers them.
#[test]
fn sigterm_with_a_spool_exits_quickly_and_resumes_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (mut relay, cfg) = spooled_relay(dir.path(), &endpoint, json!({}));
    // loadgen's default: one child span per trace.
    assert_eq!(load_accepted(&relay, 300, 1, 40), 600);
    let asked = std::time::Instant::now();
    terminate(&mut relay);
    // shutdown_timeout is 10 s: a spooled exporter does not wait for it.
    assert!(asked.elapsed() < Duration::from_secs(5), "took {:?}", asked.elapsed());
    let accounting = accounting(&relay);
    assert!(accounting.contains("accepted=600"), "{accounting}");
    assert!(accounting.contains("in_spool=600"), "{accounting}");
    assert!(accounting.contains("balanced=true"), "{accounting}");
    let sink = sink_on(port);
    let _relay = Relay::start(dir.path(), &cfg, "otlp");
    sink.wait_unique(600, T);
}

/// Unmounts the small tmpfs of the disk-full test.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk is never a crash: writes that fail with ENOSPC are refused with 503 +
/// Retry-After, the relay stays up, and once deliveries free space it accepts again. Needs a
/// small tmpfs (root with CAP_SYS_ADMIN, as here and in CI); skipped where mounting is denied.
#[test]
fn full_disk_refuses_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&disk)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let _mount = Mount(disk.clone());
    let (port, endpoint) = down_destination();
    // The budget (64 MiB) is far above the disk (1 MiB): the disk fills first.
    let cfg = config(&endpoint, &disk, json!({"max_size_mib": 64, "segment_size_mib": 1}));
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let mut acked = 0;
    let mut refusal = None;
    for seq in 0..400 {
        let (body, _) = request(7, seq, 100);
        match post(relay.http.unwrap(), &body).unwrap() {
            (200, _) => acked += 100,
            (503, headers) => {
                refusal = Some(headers);
                break;
            }
            (status, headers) => panic!("{status}: {headers}"),
        }
    }
    let refusal = refusal.expect("a full disk refuses");
    assert!(refusal.contains("retry-after: 5"), "{refusal}");
    assert!(acked > 0);
    assert!(relay.metric("otelcol_receiver_refused_spans_total", &[("reason", "disk_full")]) > 0.0);
    assert_eq!(get_text(relay.health.unwrap(), "/healthz").0, 200);
    // The destination comes up: acknowledged spans arrive, segments go, and space is back.
    let sink = sink_on(port);
    sink.wait_unique(acked, T);
    wait_for("a request accepted again", T, || {
        let (body, _) = request(7, 10_000, 100);
        (post(relay.http.unwrap(), &body).unwrap().0 == 200).then_some(())
    });
    sink.wait_unique(acked + 100, T);
}

/// Span keys of a spooled record's payload (concatenated ResourceSpans).
fn record_keys(record: &otlp_relay::spool::proto::Record) -> Vec<String> {
    let req = ExportTraceServiceRequest::decode(record.payload.as_slice()).unwrap();
    req.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| key_text(&s.trace_id, &s.span_id))
        .collect()
}

/// Frames of a segment file: (offset, length, record).
fn frames_of(data: &[u8]) -> Vec<(usize, usize, otlp_relay::spool::proto::Record)> {
    let frame::Kind::Known(format) = frame::detect(data) else {
        panic!("not a segment")
    };
    let start = format.data_start();
    frame::parse(&data[start..], format, true, Some(0))
        .entries
        .into_iter()
        .map(|e| match e {
            frame::Entry::Record { offset, len, record } => (start + offset, len, record),
            other => panic!("damaged already: {other:?}"),
        })
        .collect()
}

/// Fault: one damaged byte in a segment dropped the rest of it (245 records) while the metric
/// said 1 and the accounting said balanced. Three kinds of damage at once, on disk between two
/// runs: a byte in one record's body (that record is lost, its spans counted exactly), a byte
/// in another record's header (recovered whole), and a zeroed 4 KiB page in another segment
/// (the records it touches are lost, counted exactly). Every other acknowledged span arrives,
/// checked span id by span id, and the final accounting names the loss.
#[test]
fn damaged_records_cost_only_themselves_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (mut relay, cfg) = spooled_relay(dir.path(), &endpoint, json!({"max_size_mib": 8, "segment_size_mib": 1}));
    let acked = post_acknowledged(&relay, 3, 400, 100);
    kill(&mut relay);
    let segs = segments(&spool_dir(dir.path()));
    assert!(segs.len() >= 2, "{segs:?}");
    let mut lost_keys: std::collections::HashSet<String> = Default::default();
    // (a) a body byte of a record in the middle of the first segment.
    let mut first = std::fs::read(&segs[0]).unwrap();
    let frames = frames_of(&first);
    assert!(frames.len() > 100, "{} records", frames.len());
    let (off, len, rec) = &frames[frames.len() / 2];
    first[off + frame::HEADER + len / 2] ^= 0x5a;
    lost_keys.extend(record_keys(rec));
    // (b) a header byte (the length) of another record: recovered.
    let (off, _, _) = &frames[frames.len() / 3];
    first[off + 5] ^= 0xff;
    std::fs::write(&segs[0], &first).unwrap();
    // (c) a zeroed page across records of the second segment.
    let mut second = std::fs::read(&segs[1]).unwrap();
    let frames = frames_of(&second);
    let page = frames[frames.len() / 2].0 + 100;
    let page_end = (page + 4096).min(second.len() - 1);
    second[page..page_end].fill(0);
    for (off, len, rec) in &frames {
        if *off < page_end && off + len > page {
            lost_keys.extend(record_keys(rec));
        }
    }
    std::fs::write(&segs[1], &second).unwrap();
    let lost = lost_keys.len();
    assert!(lost >= 200, "{lost}");

    let sink = sink_on(port);
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    let expected = acked.len() - lost;
    sink.wait_unique(expected as u64, T);
    let keys = sink_keys(sink.http);
    let missing: Vec<&String> = acked.iter().filter(|k| !keys.contains(*k)).collect();
    assert_eq!(missing.len(), lost);
    assert!(missing.iter().all(|k| lost_keys.contains(*k)));
    assert_eq!(
        relay.metric("otlp_relay_exporter_dropped_spans_total", &[("reason", "corrupt")]),
        lost as f64
    );
    assert_eq!(relay.metric("otlp_relay_spool_corrupt_records_total", &[]), 2.0);
    // Segments with readable records were kept until delivered, then deleted.
    wait_segments_at_most(dir.path(), 0);
    terminate(&mut relay);
    let accounting = accounting(&relay);
    assert!(accounting.contains(&format!("corrupt={lost}")), "{accounting}");
    assert!(accounting.contains(&format!("dropped={lost}")), "{accounting}");
    assert!(
        accounting.contains(&format!("recovered={}", acked.len())),
        "{accounting}"
    );
    assert!(accounting.contains("balanced=true"), "{accounting}");
}

/// Fault: the spool directory deleted under a running relay under load: writes went on to the
/// deleted file and clients got 200 (acknowledged spans lost), then 503 forever. Now the relay
/// recreates the directory and copies back what was not delivered before acknowledging more:
/// after a SIGKILL and a restart, every acknowledged span arrives. While the directory cannot
/// be made (a file in its place), requests are refused and /readyz says why; then it recovers.
#[test]
fn spool_directory_deleted_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A slow destination: the backlog is on disk when the directory goes.
    let sink = Sink::start(&["--max-spans-per-sec", "3000"]);
    let (mut relay, cfg) = spooled_relay(
        dir.path(),
        &sink.url(),
        json!({"max_size_mib": 64, "segment_size_mib": 1}),
    );
    let clients = Clients::start(relay.http.unwrap(), 3, 50);
    wait_for("acknowledged spans", T, || (clients.acked() >= 10_000).then_some(()));
    std::fs::remove_dir_all(dir.path().join("spool")).unwrap();
    relay.proc.clone_wait_line("spool directory was deleted or replaced", T);
    let at_delete = clients.acked();
    wait_for("more acknowledged after the deletion", T, || {
        (clients.acked() >= at_delete + 10_000).then_some(())
    });
    assert!(spool_dir(dir.path()).join("lock").exists());
    // Not delivered yet: the rest must be on linked files.
    kill(&mut relay);
    let acked = clients.stop();
    let at_kill = sink.stats()["unique_spans"].as_u64().unwrap() as usize;
    assert!(
        at_kill < acked.len(),
        "backlog expected: sink {at_kill}, acked {}",
        acked.len()
    );

    // The directory cannot be made: refused, and /readyz says why; then it can.
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    relay.proc.wait_line("spool: recovered undelivered spans", T);
    std::fs::remove_dir_all(dir.path().join("spool")).unwrap();
    std::fs::write(dir.path().join("spool"), b"in the way").unwrap();
    let reason = wait_for("/readyz 503", T, || {
        let (status, body) = get_text(relay.health.unwrap(), "/readyz");
        (status == 503).then_some(body)
    });
    assert!(reason.contains("spool otlphttp/mlflow"), "{reason}");
    let (body, _) = request(8, 1, 10);
    assert_eq!(post(relay.http.unwrap(), &body).unwrap().0, 503);
    std::fs::remove_file(dir.path().join("spool")).unwrap();
    wait_for("/readyz 200 again", T, || {
        (get_text(relay.health.unwrap(), "/readyz").0 == 200).then_some(())
    });
    let (body, keys) = request(8, 2, 10);
    wait_for("accepted again", T, || {
        (post(relay.http.unwrap(), &body).unwrap().0 == 200).then_some(())
    });
    wait_all_delivered(
        "every acknowledged span at the sink",
        sink.http,
        acked.iter().chain(&keys),
    );
}

/// Fault: `replay` while the relay runs lost dead-lettered spans (the relay kept appending to
/// the file replay had renamed). Replay runs again and again while the relay dead-letters under
/// load; after a last replay every acknowledged span is at the good destination.
#[test]
fn replay_while_the_relay_dead_letters_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Sink::start(&["--status", "422"]);
    let good = Sink::start(&[]);
    let (mut relay, _) = spooled_relay(dir.path(), &bad.url(), json!({}));
    let fixed = fixed_config(dir.path(), &good);
    let dl = dir.path().join("spool").join("dead_letter");
    let clients = Clients::start(relay.http.unwrap(), 2, 20);
    wait_for("dead-lettered spans", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[]) > 0.0).then_some(())
    });
    // Replays back to back while the relay keeps dead-lettering, for a while.
    let mut runs = 0;
    while runs < 10 || relay.metric("otlp_relay_dead_letter_spans_total", &[]) < 10_000.0 {
        replay(&dl, &fixed);
        runs += 1;
    }
    let acked = clients.stop();
    eprintln!("{runs} replays under load; {} spans acknowledged", acked.len());
    assert!(
        good.stats()["unique_spans"].as_u64().unwrap() > 0,
        "replay ran under load"
    );
    wait_for("every acknowledged span dead-lettered", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[]) as usize == acked.len()).then_some(())
    });
    terminate(&mut relay);
    // 2: the replays under load already took every file (possible, if rare).
    let (last, _) = replay(&dl, &fixed);
    assert!(matches!(last, Some(0) | Some(2)), "{last:?}");
    wait_all_delivered(
        "every acknowledged span at the good destination",
        good.http,
        acked.iter(),
    );
}

/// Fault F4: a finished (non-last) segment cut short lost its acknowledged spans silently: the
/// loss was logged as a torn tail with lost_spans=0 and balanced=true, or not at all when the
/// cut fell between records. A segment's header now records how many spans the one before it
/// holds, so three cuts between two runs are told apart from a torn write and counted:
/// (a) inside a record (counted exactly), (b) exactly between records (counted exactly),
/// (c) inside a record of a segment whose successor's header predates the record (as written by
/// an older relay): at least the cut record is counted, and the accounting says it cannot
/// balance. Every span of the intact records arrives, checked span id by span id.
#[test]
fn a_short_finished_segment_is_corruption_counted_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (mut relay, cfg) = spooled_relay(
        dir.path(),
        &endpoint,
        json!({"max_size_mib": 32, "segment_size_mib": 1}),
    );
    let acked = post_acknowledged(&relay, 4, 360, 300);
    kill(&mut relay);
    let segs = segments(&spool_dir(dir.path()));
    assert!(segs.len() >= 5, "{segs:?}");
    let mut lost_keys: std::collections::HashSet<String> = Default::default();
    let cut = |lost_keys: &mut std::collections::HashSet<String>, path: &Path, at: usize, from_frame: usize| {
        let data = std::fs::read(path).unwrap();
        for (_, _, rec) in &frames_of(&data)[from_frame..] {
            lost_keys.extend(record_keys(rec));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(at as u64)
            .unwrap();
    };
    // (a) inside a record's body, two thirds into segment 2.
    let frames = frames_of(&std::fs::read(&segs[1]).unwrap());
    let k = frames.len() * 2 / 3;
    cut(&mut lost_keys, &segs[1], frames[k].0 + frame::HEADER + 10, k);
    // (b) exactly at a record boundary, half-way into segment 3.
    let frames = frames_of(&std::fs::read(&segs[2]).unwrap());
    let k = frames.len() / 2;
    cut(&mut lost_keys, &segs[2], frames[k].0, k);
    let exact = lost_keys.len();
    // (c) inside a record of segment 4, whose successor's header says nothing about it.
    let frames = frames_of(&std::fs::read(&segs[3]).unwrap());
    let k = frames.len() / 2;
    let cut_record_spans = frames[k].2.spans as usize;
    cut(&mut lost_keys, &segs[3], frames[k].0 + frame::HEADER + 10, k);
    let mut next = std::fs::read(&segs[4]).unwrap();
    let frame::Kind::Known(frame::Format::V2 { seed }) = frame::detect(&next) else {
        panic!("not a format 2 segment")
    };
    assert!(
        frame::previous_spans(&next).is_some(),
        "the writer records the previous segment's spans"
    );
    next[..frame::FILE_HEADER].copy_from_slice(&frame::file_header(seed));
    std::fs::write(&segs[4], &next).unwrap();
    let lost = lost_keys.len();
    assert!(lost > exact + cut_record_spans, "{lost}");

    let sink = sink_on(port);
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    sink.wait_unique((acked.len() - lost) as u64, T);
    let keys = sink_keys(sink.http);
    let missing: std::collections::HashSet<&String> = acked.iter().filter(|k| !keys.contains(*k)).collect();
    assert_eq!(missing.len(), lost);
    assert!(missing.iter().all(|k| lost_keys.contains(*k)));
    let counted = exact + cut_record_spans;
    assert_eq!(
        relay.metric("otlp_relay_exporter_dropped_spans_total", &[("reason", "corrupt")]),
        counted as f64
    );
    assert_eq!(relay.metric("otlp_relay_spool_corrupt_records_total", &[]), 3.0);
    let errors = lines_with(&relay, "finished segment holds fewer spans");
    assert_eq!(errors.len(), 3, "{errors:?}");
    for (line, seg, is_exact) in [
        (&errors[0], &segs[1], true),
        (&errors[1], &segs[2], true),
        (&errors[2], &segs[3], false),
    ] {
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains(&seg.display().to_string()), "{line}");
        assert!(line.contains(&format!("exact={is_exact}")), "{line}");
    }
    assert!(
        !relay.proc.output_text().contains("torn or corrupt tail truncated"),
        "a finished segment was taken for a torn tail"
    );
    wait_segments_at_most(dir.path(), 0);
    terminate(&mut relay);
    let accounting = accounting(&relay);
    assert!(accounting.contains(&format!("corrupt={counted}")), "{accounting}");
    assert!(accounting.contains("segments_with_uncounted_loss=1"), "{accounting}");
    assert!(accounting.contains("balanced=false"), "{accounting}");
}
