//! Connection and request bounds of the gate: slowloris, the connection cap, dripped bodies,
//! unread answers, HTTP/2 multiplexing.

use super::*;

#[test]
fn slowloris_connections_are_closed_and_health_keeps_answering() {
    let (_provider, _up, g) = gate_on_upstream(&[("GATE_HEADER_READ_TIMEOUT", "1s"), ("GATE_IDLE_TIMEOUT", "2s")]);
    let baseline = g.fds();
    let t0 = Instant::now();
    // Five kinds: silent; a request line never finished; header lines dripped forever; one
    // complete request, then nothing (keep-alive idle); an HTTP/2 preface, then nothing.
    let mut clients: Vec<SlowClient> = (0..200)
        .map(|i| {
            let mut stream = TcpStream::connect(g.addr).unwrap();
            let kind = i % 5;
            match kind {
                1 => stream.write_all(b"GET /api/2.0/mlflow/experiments/search HTT").unwrap(),
                2 => stream.write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n").unwrap(),
                3 => stream
                    .write_all(b"GET /gate/healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                    .unwrap(),
                4 => stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap(),
                _ => {}
            }
            stream.set_nonblocking(true).unwrap();
            SlowClient {
                stream,
                kind,
                closed_after: None,
            }
        })
        .collect();
    let mut peak_fds = 0;
    let mut health_worst = Duration::ZERO;
    let deadline = t0 + Duration::from_secs(20);
    let mut round = 0;
    loop {
        round += 1;
        for c in clients.iter_mut().filter(|c| c.kind == 2 && c.closed_after.is_none()) {
            let _ = c.stream.write_all(format!("x-drip-{round}: 1\r\n").as_bytes());
        }
        let open = clients
            .iter_mut()
            .map(|c| c.poll_closed(t0))
            .filter(|closed| !closed)
            .count();
        peak_fds = peak_fds.max(g.fds());
        let h0 = Instant::now();
        let (s, _, b) = exchange(g.addr, "GET", "/gate/healthz", &[], b"");
        health_worst = health_worst.max(h0.elapsed());
        assert_eq!(s, 200, "healthz during the attack: {b}");
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of 200 slow connections still open after {:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200)); // the drip interval of the attack
    }
    let by_kind = |k: usize| {
        clients
            .iter()
            .filter(|c| c.kind == k)
            .filter_map(|c| c.closed_after)
            .max()
            .unwrap()
    };
    eprintln!(
        "closed by kind (silent, partial line, drip, idle after a request, h2 preface): {:?} {:?} {:?} {:?} {:?}; \
         fds baseline {baseline} peak {peak_fds}; worst healthz {health_worst:?}",
        by_kind(0),
        by_kind(1),
        by_kind(2),
        by_kind(3),
        by_kind(4)
    );
    // Header-read deadline 1 s, idle 2 s (plus scheduling slack).
    for k in [0, 1, 2, 4] {
        assert!(by_kind(k) < Duration::from_secs(5), "kind {k}: {:?}", by_kind(k));
    }
    assert!(
        by_kind(3) >= Duration::from_secs(2),
        "idle keep-alive kept for GATE_IDLE_TIMEOUT"
    );
    assert!(health_worst < Duration::from_secs(2), "healthz took {health_worst:?}");
    assert!(peak_fds <= baseline + 220, "peak fds {peak_fds} (baseline {baseline})");
    wait_for("the gate's fds back near the baseline", Duration::from_secs(10), || {
        (g.fds() <= baseline + 10).then_some(())
    });
    assert!(g.metric("gate_connections_timed_out_total", "listener=\"public\"") >= 200.0);
}

#[test]
fn connections_beyond_the_cap_are_closed_at_once() {
    let (_provider, _up, g) = gate_on_upstream(&[("GATE_MAX_CONNECTIONS", "20"), ("GATE_HEADER_READ_TIMEOUT", "60s")]);
    let baseline = g.fds();
    let held: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(g.addr).unwrap()).collect();
    wait_for("20 open connections", Duration::from_secs(10), || {
        (g.metric("gate_connections_open", "listener=\"public\"") == 20.0).then_some(())
    });
    let t0 = Instant::now();
    let mut extra: Vec<SlowClient> = (0..40)
        .map(|_| {
            let stream = TcpStream::connect(g.addr).unwrap();
            stream.set_nonblocking(true).unwrap();
            SlowClient {
                stream,
                kind: 0,
                closed_after: None,
            }
        })
        .collect();
    wait_for("the 40 surplus connections closed", Duration::from_secs(10), || {
        extra.iter_mut().all(|c| c.poll_closed(t0)).then_some(())
    });
    eprintln!("surplus connections closed within {:?}", t0.elapsed());
    assert!(g.fds() <= baseline + 25, "fds {} (baseline {baseline})", g.fds());
    // The admin listener (probes, metrics) is not behind the public cap.
    let (s, _, _) = exchange(g.admin, "GET", "/gate/healthz", &[], b"");
    assert_eq!(s, 200);
    assert!(g.metric("gate_connections_refused_total", "listener=\"public\"") >= 40.0);
    assert!(g.proc.output_text().contains("connection limit reached"));
    // The held ones still work, and freed slots are served again.
    let mut first = held.into_iter().next().unwrap();
    first
        .write_all(b"GET /gate/healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_for("a slot again", Duration::from_secs(10), || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exchange(g.addr, "GET", "/gate/healthz", &[], b"").0
        }))
        .ok()
        .filter(|s| *s == 200)
    });
}

/// Sends a POST head announcing `len` body bytes, then `first` bytes, then one byte every `every`
/// until answered; returns the status and when it came.
fn dripped_body(g: &Gate, token: &str, len: usize, first: usize, every: Duration) -> (u16, Duration) {
    let mut s = TcpStream::connect(g.addr).unwrap();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
         content-type: application/x-protobuf\r\nx-mlflow-experiment-id: 0\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![0u8; first]).unwrap();
    s.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let mut sent = first;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_secs(60) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if sent < len {
            let _ = s.write_all(&[0]);
            sent += 1;
        }
        std::thread::sleep(every); // the attacker's drip interval
    }
    let text = String::from_utf8_lossy(&got);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, t0.elapsed())
}

#[test]
fn slow_request_bodies_are_cut_off() {
    let (provider, _up, g) = gate_on_upstream(&[("GATE_BODY_READ_TIMEOUT", "1s")]);
    let token = client_token(&provider);
    // Control: a body with pauses shorter than the limit goes through.
    let (s, took) = dripped_body(&g, &token, 4, 0, Duration::from_millis(300));
    assert_eq!(s, 200, "{took:?}");
    // A byte every 1.5 s, and a body that never starts: cut off after about a second of silence.
    for (first, every) in [(10, Duration::from_millis(1500)), (0, Duration::from_millis(1500))] {
        let (s, took) = dripped_body(&g, &token, 100, first, every);
        eprintln!("dripped body ({first} bytes first, then one per {every:?}): {s} after {took:?}");
        assert_eq!(s, 408, "after {took:?}");
        assert!(took < Duration::from_secs(6), "{took:?}");
    }
}

#[test]
fn answers_nobody_reads_do_not_hold_connections() {
    let (provider, _up, g) = gate_on_upstream(&[("GATE_IDLE_TIMEOUT", "2s")]);
    let token = client_token(&provider);
    let mut s = TcpStream::connect(g.addr).unwrap();
    s.write_all(format!("GET /big HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\r\n").as_bytes())
        .unwrap();
    // The client reads nothing; the gate's writes block once the socket buffers are full.
    wait_for(
        "the stalled answer's connection closed",
        Duration::from_secs(20),
        || (g.metric("gate_connections_timed_out_total", "listener=\"public\"") >= 1.0).then_some(()),
    );
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    eprintln!("the client got {got} of {BIG} bytes before the gate hung up");
    assert!(got < BIG, "the whole answer was kept waiting for the client");
    wait_for("no connection left open", Duration::from_secs(10), || {
        (g.metric("gate_connections_open", "listener=\"public\"") == 0.0).then_some(())
    });
}

#[test]
fn http2_multiplexing_cannot_exceed_the_request_cap() {
    let (provider, up, g) = gate_on_upstream(&[("GATE_MAX_CONNECTIONS", "5")]);
    let token = client_token(&provider);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let statuses: Vec<u16> = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(g.addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        // One connection, 20 concurrent streams, each a slow MLflow call.
        let calls = (0..20).map(|_| {
            let mut send = send.clone();
            let req = http::Request::get(format!("http://{}/slow", g.addr))
                .header("authorization", bearer(&token))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            tokio::spawn(async move { send.send_request(req).await.map(|r| r.status().as_u16()).unwrap_or(0) })
        });
        let calls: Vec<_> = calls.collect();
        // Those over the cap are answered at once, while the others still wait on MLflow.
        let refused = tokio::task::spawn_blocking({
            let admin = g.admin;
            move || {
                wait_for("15 requests refused", Duration::from_secs(20), || {
                    let (_, _, text) = exchange(admin, "GET", "/gate/metrics", &[], b"");
                    text.lines()
                        .find(|l| l.starts_with("gate_requests_refused_total"))
                        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .filter(|n| *n >= 15.0)
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(refused, 15.0);
        let arrived = tokio::task::block_in_place(|| {
            wait_for("the admitted requests at MLflow", Duration::from_secs(10), || {
                (up.slow_arrived() >= 5).then(|| up.slow_arrived())
            })
        });
        assert_eq!(arrived, 5, "only the capped number reached MLflow");
        up.release();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap());
        }
        out
    });
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    eprintln!("20 streams on one connection with a cap of 5: {ok} answered, {busy} refused");
    assert_eq!((ok, busy), (5, 15), "{statuses:?}");
}
