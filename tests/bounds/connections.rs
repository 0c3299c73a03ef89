//! Connection bounds over HTTP/1 and TLS: the connection limit, slowloris headers and handshakes,
//! descriptor exhaustion, certificates out of their validity period.

use super::*;

#[test]
fn connections_over_the_limit_are_refused_while_the_clients_held_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let http = json!({"max_connections": 20, "idle_timeout": "3s", "read_header_timeout": "1m"});
    let relay = Relay::start(dir.path(), &debug_relay(&["http"], http).yaml(), "otlp");
    let addr = relay.http.unwrap();
    let health = relay.health.unwrap();

    let mut first = TcpStream::connect(addr).unwrap();
    first.set_read_timeout(Some(T)).unwrap();
    assert_eq!(post_on(&mut first, &one_span_request("before")).unwrap(), 200);
    let mut idle: Vec<TcpStream> = (0..59).map(|_| TcpStream::connect(addr).unwrap()).collect();

    // At the limit: readiness says why, and both admin listeners answer.
    let (_, body) = wait_for("/readyz to name the connection limit", T, || {
        try_get(health, "/readyz").filter(|(s, _)| *s == 503)
    });
    assert!(body.contains("at max_connections (20)"), "{body}");
    assert_eq!(try_get(relay.metrics, "/metrics").map(|r| r.0), Some(200));
    wait_for("40 connections refused on accept", T, || {
        let n = relay.metric(
            "otlp_relay_receiver_connections_refused_total",
            &[("reason", "max_connections")],
        );
        (n >= 40.0).then_some(())
    });
    assert_eq!(relay.metric("otlp_relay_receiver_open_connections", &[]), 20.0);
    // The client already connected is still served.
    assert_eq!(post_on(&mut first, &one_span_request("during")).unwrap(), 200);
    // The refused ones learn it at once: the server closed them.
    let refused_fast = idle
        .iter_mut()
        .filter(|s| closed_by_server(s, Duration::from_millis(20)))
        .count();
    assert_eq!(refused_fast, 40, "connections closed on accept");
    // Idle connections are closed after idle_timeout (those that never sent a request count as
    // header timeouts), which frees the slots.
    let start = Instant::now();
    for s in idle.iter_mut().chain(std::iter::once(&mut first)) {
        assert!(
            closed_by_server(s, Duration::from_secs(15)),
            "an idle connection stayed open"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    wait_for("/readyz ready again", T, || {
        try_get(health, "/readyz").filter(|(s, _)| *s == 200)
    });
    let closed = |reason| relay.metric("otlp_relay_receiver_connections_closed_total", &[("reason", reason)]);
    assert_eq!((closed("header_timeout"), closed("idle_timeout")), (19.0, 1.0));
    assert_eq!(post(addr), 200);
    // One warning for 40 refusals, not 40.
    relay.proc.clone_wait_line("at max_connections", T);
    let warnings = count_lines(&relay.proc, "at max_connections");
    assert!((1..=2).contains(&warnings), "{warnings} warning lines");
}

#[test]
fn slowloris_headers_are_cut_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let http = json!({"read_header_timeout": "1s", "idle_timeout": "1m"});
    let relay = Relay::start(dir.path(), &debug_relay(&["http"], http).yaml(), "otlp");
    let addr = relay.http.unwrap();
    let mut conns: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /v1/traces HTTP/1.1\r\nhost: x\r\n").unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    let mut open = conns.len();
    // Drip a header byte per connection every 100 ms: a client that never finishes its headers.
    while open > 0 && start.elapsed() < Duration::from_secs(20) {
        open = 0;
        for s in conns.iter_mut() {
            if s.write_all(b"x").is_ok() && !closed_by_server(s, Duration::from_millis(10)) {
                open += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(open, 0, "slowloris connections still open after {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(6), "{:?}", start.elapsed());
    let counted = wait_for("header timeouts counted", T, || {
        let n = relay.metric(
            "otlp_relay_receiver_connections_closed_total",
            &[("reason", "header_timeout")],
        );
        (n >= 10.0).then_some(n)
    });
    assert_eq!(counted, 10.0, "each connection counted once");
    assert_eq!(post(addr), 200);
}

#[test]
fn descriptor_exhaustion_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = debug_relay(&["http"], json!({})).yaml();
    let path = support::write_file(dir.path(), "config.yaml", &config);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" run --config \"$1\"")
        .arg(support::bin())
        .arg(&path)
        .env("NO_COLOR", "1");
    let mut relay = Proc::spawn("relay", cmd);
    let health = relay.wait_listen("health", T);
    relay.wait_line("relay started", T);
    let pid = relay.child.id();
    assert_eq!(try_get(health, "/readyz").map(|r| r.0), Some(200));

    // More connections than the relay has descriptors: the accept loop hits EMFILE.
    let held: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(health).unwrap()).collect();
    relay.wait_line("accept failed", T);
    let ticks = cpu_ticks(pid);
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_ticks(pid) - ticks;
    // A spinning accept loop burns ~300 ticks (a core) in 3 s; backing off costs next to none.
    assert!(used < 30, "{used} ticks of CPU in 3 s at the descriptor limit");
    let lines = count_lines(&relay, "accept failed");
    assert!(lines <= 2, "{lines} accept warnings");
    assert!(
        relay.output_text().len() < 64 * 1024,
        "log grew to {}",
        relay.output_text().len()
    );

    drop(held);
    wait_for("/readyz answers after the connections closed", T, || {
        try_get(health, "/readyz").filter(|(s, _)| *s == 200)
    });
    let lines = count_lines(&relay, "accept failed");
    assert!(lines <= 3, "{lines} accept warnings");

    // The receiver's default max_connections leaves descriptors for the rest under this low
    // limit: a flood of OTLP connections is refused by the limit, not by EMFILE, and the
    // health listener keeps answering.
    let receiver = relay.wait_listen("otlp-http", T);
    let flood: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(receiver).unwrap()).collect();
    let (_, body) = wait_for("/readyz to name the receiver's limit", T, || {
        try_get(health, "/readyz").filter(|(s, _)| *s == 503)
    });
    assert!(body.contains("at max_connections (16)"), "{body}");
    // (Descriptors freed by the closed connections can still run short for a moment: at
    // most one more line per 10 s.)
    let lines = count_lines(&relay, "accept failed");
    assert!(lines <= 4, "{lines} accept warnings");
    drop(flood);
}

/// A relay serving OTLP/HTTP over TLS with `cert`; `tls` is merged into the TLS settings.
fn tls_relay(dir: &Path, cert: &support::pki::LeafFiles, tls: Value) -> Relay {
    let mut settings = json!({"cert_file": cert.cert, "key_file": cert.key});
    if let (Value::Object(settings), Value::Object(tls)) = (&mut settings, tls) {
        settings.extend(tls);
    }
    Relay::start(dir, &debug_relay(&["http"], json!({"tls": settings})).yaml(), "otlp")
}

#[test]
fn a_certificate_out_of_its_validity_period_is_a_warning_and_not_ready() {
    let ca = support::pki::Ca::new("ca");
    for (name, leaf, problem) in [
        (
            "expired",
            ca.server_valid_between((2020, 1, 1), (2021, 1, 1)),
            "expired (notAfter",
        ),
        (
            "future",
            ca.server_valid_between((2090, 1, 1), (2091, 1, 1)),
            "is not valid yet (notBefore",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let files = leaf.write(dir.path(), name);
        let relay = tls_relay(dir.path(), &files, json!({}));
        let file = files.cert.display().to_string();
        let warning = relay.proc.clone_wait_line(problem, T);
        assert!(warning.contains("WARN"), "{warning}");
        assert!(warning.contains(&file), "{warning}");
        let (_, body) = wait_for("/readyz 503", T, || {
            try_get(relay.health.unwrap(), "/readyz").filter(|(s, _)| *s == 503)
        });
        assert!(body.contains(problem) && body.contains(&file), "{body}");
    }
    // A valid certificate: ready, no warning.
    let dir = tempfile::tempdir().unwrap();
    let files = ca.server().write(dir.path(), "valid");
    let relay = tls_relay(dir.path(), &files, json!({}));
    assert_eq!(try_get(relay.health.unwrap(), "/readyz").map(|r| r.0), Some(200));
    assert_eq!(count_lines(&relay.proc, "server certificate"), 0);

    // A renewed certificate picked up by reload clears the reason.
    let dir = tempfile::tempdir().unwrap();
    let files = ca
        .server_valid_between((2020, 1, 1), (2021, 1, 1))
        .write(dir.path(), "renewed");
    let relay = tls_relay(dir.path(), &files, json!({"reload_interval": "100ms"}));
    wait_for("/readyz 503", T, || {
        try_get(relay.health.unwrap(), "/readyz").filter(|(s, _)| *s == 503)
    });
    ca.server().write(dir.path(), "renewed");
    wait_for("/readyz 200 after the renewal", T, || {
        try_get(relay.health.unwrap(), "/readyz").filter(|(s, _)| *s == 200)
    });
    relay.proc.clone_wait_line("within its validity period again", T);
}

#[test]
fn slow_tls_handshakes_are_cut_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::Ca::new("ca");
    let files = ca.server().write(dir.path(), "server");
    let http = json!({
        "read_header_timeout": "1s",
        "idle_timeout": "1m",
        "tls": {"cert_file": files.cert, "key_file": files.key},
    });
    let relay = Relay::start(dir.path(), &debug_relay(&["http"], http).yaml(), "otlp");
    let addr = relay.http.unwrap();
    // The first bytes of a ClientHello, then nothing: the handshake never completes.
    let conns: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&[0x16, 0x03, 0x01]).unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    for s in &conns {
        assert!(
            closed_by_server(s, Duration::from_secs(10)),
            "a stalled handshake stayed open"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    wait_for("handshake timeouts counted", T, || {
        let n = relay.metric(
            "otlp_relay_receiver_connections_closed_total",
            &[("reason", "handshake_timeout")],
        );
        (n >= 10.0).then_some(())
    });
    // One log line for the ten, not ten.
    relay.proc.clone_wait_line("TLS handshake timed out", T);
    assert_eq!(count_lines(&relay.proc, "TLS handshake timed out"), 1);
}
