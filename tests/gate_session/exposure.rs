//! What the gate does not expose: metrics off the admin listener, internal detail in 502s,
//! forwarded headers from untrusted peers.

use super::*;

#[test]
fn metrics_are_served_on_the_admin_listener_only() {
    let (provider, up, g) = gate_on_upstream(&[]);
    let token = client_token(&provider);
    for auth in [None, Some(bearer(&token))] {
        let hs: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        for path in ["/gate/metrics", "/gate/metrics?x=1"] {
            let (s, _, b) = exchange(g.addr, "GET", path, &hs, b"");
            assert_eq!(s, 404, "{path} {b}");
            assert!(!b.contains("gate_requests"), "{b}");
        }
    }
    assert!(up.seen.lock().unwrap().is_empty(), "never forwarded upstream");
    // Look-alike paths are ordinary (authenticated) MLflow paths, never the gate's metrics.
    for path in [
        "/gate/metrics/",
        "/gate//metrics",
        "/gate/%6detrics",
        "//gate/metrics",
        "/GATE/metrics",
    ] {
        let (_, _, b) = exchange(g.addr, "GET", path, &[("authorization", &bearer(&token))], b"");
        assert!(!b.contains("gate_requests"), "{path}: {b}");
    }
    let (s, hs, b) = exchange(g.admin, "GET", "/gate/metrics", &[], b"");
    assert_eq!(s, 200);
    assert!(header(&hs, "content-type").unwrap().contains("openmetrics"));
    assert!(
        b.contains("gate_requests_total") && b.contains("gate_connections_open"),
        "{b}"
    );
    assert_eq!(exchange(g.admin, "GET", "/gate/readyz", &[], b"").0, 200);
    assert_eq!(
        exchange(g.addr, "GET", "/gate/healthz", &[], b"").0,
        200,
        "probes stay public too"
    );
    let (s, _, _) = exchange(
        g.admin,
        "GET",
        "/api/2.0/mlflow/experiments/search",
        &[("authorization", &bearer(&token))],
        b"",
    );
    assert_eq!(s, 404, "the admin listener is no way into MLflow");
}

#[test]
fn bad_gateway_answers_carry_no_internal_detail() {
    let provider = OidcProvider::start(OidcOptions::default());
    let token = client_token(&provider);
    // An upstream that accepts and hangs up at once.
    let rude = TcpListener::bind("127.0.0.1:0").unwrap();
    let rude_addr = rude.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in rude.incoming() {
            drop(s);
        }
    });
    let closed = support::free_port();
    for upstream in [
        format!("http://127.0.0.1:{closed}"),
        format!("http://{rude_addr}"),
        "http://upstream.invalid:5000".to_string(),
    ] {
        let g = gate(&provider, &upstream, &[]);
        let (s, _, b) = exchange(
            g.addr,
            "GET",
            "/api/2.0/mlflow/experiments/search",
            &[("authorization", &bearer(&token))],
            b"",
        );
        assert_eq!(s, 502, "{upstream}: {b}");
        assert_eq!(b, r#"{"detail":"MLflow upstream unavailable"}"#, "{upstream}");
        // The cause is in the log (read by another thread: waited for, not read once).
        wait_for("the cause in the gate's log", Duration::from_secs(10), || {
            g.proc
                .output_text()
                .lines()
                .any(|l| l.contains("MLflow upstream unavailable") && l.contains("error="))
                .then_some(())
        });
    }
}

#[test]
fn forwarded_headers_from_untrusted_peers_are_ignored() {
    let (provider, up, g) = gate_on_upstream(&[]);
    let own_callback = format!("http%3A%2F%2F{}%2Fcallback", g.addr).replace(':', "%3A");
    let login = |g: &Gate, hs: &[(&str, &str)]| {
        let mut all = vec![("accept", "text/html")];
        all.extend_from_slice(hs);
        exchange(g.addr, "GET", "/", &all, b"")
    };
    let host = g.addr.to_string();
    for forged in [
        vec![("x-forwarded-host", "evil.example"), ("x-forwarded-proto", "https")],
        vec![("x-forwarded-host", "evil.example:443, 127.0.0.1")],
        vec![("x-forwarded-proto", "https")],
        vec![("forwarded", "host=evil.example;proto=https")],
    ] {
        let mut hs = vec![("host", host.as_str())];
        hs.extend(forged.iter().copied());
        let (s, rhs, b) = login(&g, &hs);
        assert_eq!(s, 302, "{forged:?}: {b}");
        let loc = header(&rhs, "location").unwrap();
        assert!(
            loc.contains(&format!("redirect_uri={own_callback}")),
            "{forged:?}: {loc}"
        );
        assert!(!loc.contains("evil"), "{loc}");
        let c = set_cookies(&rhs).join("\n");
        assert!(c.contains("gate_login=") && !c.contains("Secure"), "{forged:?}: {c}");
    }
    // A Host not in GATE_ALLOWED_HOSTS builds no redirect at all.
    for bad in ["evil.example", "127.0.0.2", "127.0.0.1.evil.example"] {
        let (s, rhs, b) = login(&g, &[("host", bad)]);
        assert_eq!(s, 400, "{bad}: {b}");
        assert!(header(&rhs, "location").is_none());
        assert!(b.contains("OIDC_REDIRECT_URI"), "{b}");
    }
    // What MLflow hears: the gate's view, not the client's story.
    let token = client_token(&provider);
    let auth = bearer(&token);
    let forged = [
        ("authorization", auth.as_str()),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6"),
    ];
    assert_eq!(
        exchange(g.addr, "GET", "/api/2.0/mlflow/experiments/search", &forged, b"").0,
        200
    );
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(header(&seen, "x-forwarded-for"), Some("127.0.0.1"), "{seen:?}");
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(&seen, "forwarded"), None);

    // Control: from a trusted proxy the same headers count.
    let t = gate(&provider, &up.url(), &[("GATE_TRUSTED_PROXIES", "127.0.0.1/32")]);
    let (s, rhs, b) = login(
        &t,
        &[("x-forwarded-host", "mlflow.example"), ("x-forwarded-proto", "https")],
    );
    assert_eq!(s, 302, "{b}");
    let loc = header(&rhs, "location").unwrap();
    assert!(
        loc.contains("redirect_uri=https%3A%2F%2Fmlflow.example%2Fcallback"),
        "{loc}"
    );
    assert!(set_cookies(&rhs).join("\n").contains("Secure"));
    assert_eq!(
        exchange(t.addr, "GET", "/api/2.0/mlflow/experiments/search", &forged, b"").0,
        200
    );
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(header(&seen, "x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"), "{seen:?}");
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("https"));
}
