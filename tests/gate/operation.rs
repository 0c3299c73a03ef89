//! Running the gate: startup RSS and added latency, readiness following the provider, SIGTERM,
//! provider key rotation.

use super::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn measure_startup_rss_latency() {
    let w = world();
    let g = w.main_gate();
    let pid = g.proc.child.id();
    let token = w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let auth = bearer(&token);
    let path = "/api/2.0/mlflow/experiments/get?experiment_id=0";
    let once = |addr: SocketAddr, hs: &[(&str, &str)]| -> Duration {
        let t = Instant::now();
        let (s, _, _) = request("GET", addr, path, hs, b"");
        assert_eq!(s, 200);
        t.elapsed()
    };
    let auth_h = [("authorization", auth.as_str())];
    // Alternate direct and gated requests so a busy machine slows both alike.
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    for i in 0..550 {
        let d = once(w.mlflow.addr, &[]);
        let v = once(g.addr, &auth_h);
        if i >= 50 {
            direct.push(d);
            via.push(v);
        }
    }
    direct.sort();
    via.sort();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .unwrap();
    eprintln!(
        "MEASURE gate start-to-healthy {:?}; RSS after 550 requests {} KiB; GET {path}: direct p50 {:?} p99 {:?}, \
         via gate p50 {:?} p99 {:?} (added p50 {:?}, p99 {:?}); mlflow start-to-healthy {:?}",
        g.started,
        rss,
        percentile(&direct, 0.5),
        percentile(&direct, 0.99),
        percentile(&via, 0.5),
        percentile(&via, 0.99),
        percentile(&via, 0.5).saturating_sub(percentile(&direct, 0.5)),
        percentile(&via, 0.99).saturating_sub(percentile(&direct, 0.99)),
        w.mlflow.startup,
    );
    // The same against a trivial upstream that closes every connection: the gate's own cost (token
    // check, proxying, one extra connect) without MLflow's time to hide it.
    let echo = echo_server();
    let ge = gate(&w.provider, &format!("http://{}", echo.addr), &[]);
    let (mut d2, mut v2) = (Vec::new(), Vec::new());
    for i in 0..550 {
        let d = once(echo.addr, &[]);
        let v = once(ge.addr, &auth_h);
        if i >= 50 {
            d2.push(d);
            v2.push(v);
        }
    }
    d2.sort();
    v2.sort();
    eprintln!(
        "MEASURE trivial upstream: direct p50 {:?} p99 {:?}, via gate p50 {:?} p99 {:?}",
        percentile(&d2, 0.5),
        percentile(&d2, 0.99),
        percentile(&v2, 0.5),
        percentile(&v2, 0.99),
    );
    assert!(g.started < Duration::from_secs(5), "gate startup {:?}", g.started);
    assert!(rss < 100 * 1024, "gate RSS {rss} KiB");
}

#[test]
fn readiness_follows_the_provider_and_sigterm_exits_0() {
    let w = world();
    // Provider down at start: live, not ready, API calls 503; ready once the provider comes up.
    // A provider of its own: the shared one serves the other tests meanwhile.
    let mut provider = OidcProvider::start(OidcOptions {
        realm: "restarting".into(),
        ..Default::default()
    });
    provider.stop();
    // Started by hand: `gate()` waits for the provider's discovery, which cannot happen yet.
    let cmd = support::gate::command(&provider, &w.mlflow.url(), &[("GATE_ADMIN_LISTEN", "off")]);
    let mut p = Proc::spawn("gate-early", cmd);
    let addr = p.wait_listen("gate", support::STARTUP);
    assert_eq!(request("GET", addr, "/gate/healthz", &[], b"").0, 200);
    assert_eq!(request("GET", addr, "/gate/readyz", &[], b"").0, 503);
    let basic = basic_auth(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let search = || {
        let (s, _, b) = request(
            "GET",
            addr,
            "/api/2.0/mlflow/experiments/search?max_results=5",
            &[("authorization", &basic)],
            b"",
        );
        (s, b)
    };
    let (s, b) = search();
    assert_eq!(s, 503, "{b}");
    let t = Instant::now();
    provider.start_again();
    eprintln!("provider restarted in {:?}", t.elapsed());
    wait_for("the gate to discover the provider", Duration::from_secs(20), || {
        (request("GET", addr, "/gate/readyz", &[], b"").0 == 200).then_some(())
    });
    let (s, b) = search();
    assert_eq!(s, 200, "{b}");
    eprintln!("gate ready {:?} after the provider restart began", t.elapsed());
    // SIGTERM: a clean exit.
    p.signal("TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn provider_key_rotation() {
    let w = world();
    // A provider of its own: tokens of the shared one must stay valid for the other tests.
    let mut provider = OidcProvider::start(OidcOptions {
        realm: "rotating".into(),
        ..Default::default()
    });
    let g = gate(&provider, &w.mlflow.url(), &[]);
    let old = provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let path = "/api/2.0/mlflow/experiments/get?experiment_id=0";
    let (s, _, _) = request("GET", g.addr, path, &[("authorization", &bearer(&old))], b"");
    assert_eq!(s, 200);
    provider.restart_with_new_key();
    let new = provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    assert_ne!(jwt_parts(&new).0["kid"], jwt_parts(&old).0["kid"]);
    // The unknown kid makes the gate refetch the JWKS (at most once per 10 s).
    wait_for("the new key to be accepted", Duration::from_secs(15), || {
        let (s, _, _) = request("GET", g.addr, path, &[("authorization", &bearer(&new))], b"");
        (s == 200).then_some(())
    });
    let (s, _, _) = request("GET", g.addr, path, &[("authorization", &bearer(&old))], b"");
    assert_eq!(s, 401, "a token of the retired key is refused");
}
