//! Browser sessions end with logout on every replica, with a disabled user, and are not passed
//! while the provider cannot confirm them.

use super::*;

/// Polls an API call with the session cookie among others (following re-sealed cookies) until it
/// answers `want`.
fn poll_session(g: &Gate, cookie: &mut String, want: u16, within: Duration) -> Duration {
    let t0 = Instant::now();
    wait_for(&format!("the session answered {want}"), within, || {
        let (s, hs, _) = exchange(
            g.addr,
            "GET",
            "/api/2.0/mlflow/experiments/search?max_results=1",
            &[("cookie", &format!("theme=dark; gate_session={cookie}; _ga=1"))],
            b"",
        );
        if let Some(v) = cookie_value(&hs, "gate_session").filter(|v| !v.is_empty()) {
            *cookie = v;
        }
        (s == want).then(|| t0.elapsed())
    })
}

/// Keeps the session `cookie` in use (each call answered 200) until the gate has re-checked live
/// sessions with the provider `checks` times.
fn wait_live_rechecks(g: &Gate, cookie: &mut String, checks: f64, within: Duration) {
    wait_for("re-checks of a live session", within, || {
        poll_session(g, cookie, 200, Duration::from_secs(5));
        (g.metric("gate_session_checks_total", "result=\"active\"") >= checks).then_some(())
    });
}

#[test]
fn logout_in_the_browser_ends_the_session_on_every_replica() {
    let provider = OidcProvider::start(OidcOptions {
        auto_login: false,
        ..Default::default()
    });
    let up = upstream();
    let refresh = ("GATE_SESSION_REFRESH", "2s");
    let a = gate(&provider, &up.url(), &[refresh]);
    let b = gate(&provider, &up.url(), &[refresh]);

    // Control: a session on B survives its re-checks with the provider.
    let mut other = gate_login(&b, "alice");
    wait_live_rechecks(&b, &mut other, 2.0, Duration::from_secs(15));

    let shots = support::cache_dir().parent().unwrap().join("gate-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let r = support::browser::login(
        &format!("http://{}/", a.addr),
        "alice",
        "alice",
        &shots.join("logout.png"),
        &[("LOGOUT", "1"), ("COOKIE_VALUES", "1")],
    );
    assert!(r.get("error").is_none(), "{r:#}");
    let logged_out_at = Instant::now();
    assert!(
        r["afterLogoutUrl"].as_str().unwrap().starts_with(&provider.issuer),
        "back at the provider's login form: {r:#}"
    );
    let old = r["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gate_session")
        .and_then(|c| c["value"].as_str())
        .unwrap_or_else(|| panic!("no session cookie: {r:#}"))
        .to_string();
    // The replayed cookie: refused at once where the logout happened...
    let (s, hs, body) = get_with_session(&a, "/api/2.0/mlflow/experiments/search?max_results=1", &old);
    assert_eq!(s, 401, "{body}");
    assert_eq!(
        cookie_value(&hs, "gate_session").as_deref(),
        Some(""),
        "cleared: {hs:?}"
    );
    let (s, hs, _) = exchange(
        a.addr,
        "GET",
        "/",
        &[("cookie", &format!("gate_session={old}")), ("accept", "text/html")],
        b"",
    );
    assert_eq!(s, 302);
    assert!(
        header(&hs, "location").unwrap().starts_with(&provider.auth_url()),
        "{hs:?}"
    );
    // ...and on the other replica within GATE_SESSION_REFRESH (it asks the provider).
    let mut replayed = old.clone();
    let took = poll_session(&b, &mut replayed, 401, Duration::from_secs(10));
    eprintln!(
        "old cookie refused by the other replica {:?} after the logout",
        logged_out_at.elapsed()
    );
    assert!(took <= Duration::from_secs(4), "{took:?}");
    assert!(b.metric("gate_session_checks_total", "result=\"ended\"") >= 1.0);
    // Other sessions of the same user are the provider's business; ours is still fine.
    poll_session(&b, &mut other, 200, Duration::from_secs(5));
}

#[test]
fn a_disabled_user_loses_access_within_the_refresh_interval() {
    disabled_user_loses_access(true);
}

#[test]
fn a_disabled_user_loses_access_without_introspection() {
    // The gate falls back to a refresh grant to ask the provider.
    disabled_user_loses_access(false);
}

fn disabled_user_loses_access(introspection: bool) {
    let provider = OidcProvider::start(OidcOptions {
        introspection,
        ..Default::default()
    });
    let discovery = exchange(
        provider.addr(),
        "GET",
        &split_url(&provider.discovery_url()).1,
        &[],
        b"",
    )
    .2;
    assert_eq!(
        discovery.contains("introspection_endpoint"),
        introspection,
        "{discovery}"
    );
    let up = upstream();
    let g = gate(&provider, &up.url(), &[("GATE_SESSION_REFRESH", "2s")]);
    let mut cookie = gate_login(&g, "alice");
    poll_session(&g, &mut cookie, 200, Duration::from_secs(5));
    wait_live_rechecks(&g, &mut cookie, 1.0, Duration::from_secs(10));
    let (s, _, b) = exchange(
        provider.addr(),
        "PUT",
        &format!("/admin/realms/{}/users/alice", provider.opts.realm),
        &[("content-type", "application/json")],
        br#"{"enabled": false}"#,
    );
    assert_eq!(s, 204, "{b}");
    let took = poll_session(&g, &mut cookie, 401, Duration::from_secs(10));
    eprintln!("disabled user refused {took:?} after being disabled");
    assert!(took <= Duration::from_secs(4), "{took:?}");
    // Replayed again: refused again (the provider keeps saying no).
    assert_eq!(
        get_with_session(&g, "/api/2.0/mlflow/experiments/search", &cookie).0,
        401
    );
}

#[test]
fn sessions_are_not_passed_while_the_provider_cannot_confirm_them() {
    let (mut provider, _up, g) = gate_on_upstream(&[("GATE_SESSION_REFRESH", "1s")]);
    let mut cookie = gate_login(&g, "alice");
    poll_session(&g, &mut cookie, 200, Duration::from_secs(5));
    provider.stop();
    // Due for its check and nobody to ask: 503, never a pass.
    let took = poll_session(&g, &mut cookie, 503, Duration::from_secs(10));
    eprintln!("session refused {took:?} after the provider went away");
    assert!(g.metric("gate_session_checks_total", "result=\"error\"") >= 1.0);
    // The gate's own paths do not depend on it: probes answer and logout clears the cookie.
    assert_eq!(exchange(g.addr, "GET", "/gate/healthz", &[], b"").0, 200);
    let (s, hs, _) = get_with_session(&g, "/logout", &cookie);
    assert_eq!(s, 302);
    assert_eq!(cookie_value(&hs, "gate_session").as_deref(), Some(""), "{hs:?}");
    // The provider back (a restart forgets its grants): a new login works again.
    provider.start_again();
    let mut fresh = gate_login(&g, "alice");
    poll_session(&g, &mut fresh, 200, Duration::from_secs(20));
    // The logged-out one stays refused on this replica.
    assert_eq!(
        get_with_session(&g, "/api/2.0/mlflow/experiments/search", &cookie).0,
        401
    );
}
