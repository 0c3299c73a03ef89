//! Destination outages, SIGKILL and SIGTERM under load, slow destinations: no acknowledged span
//! is lost and memory stays bounded.

use super::*;

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
