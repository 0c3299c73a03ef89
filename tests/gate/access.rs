//! Who gets through: configuration errors, 401/403 and read groups, permissions by experiment
//! name, expired tokens, excluded paths, identity headers sent by clients.

use super::*;

#[test]
fn bad_configuration_exits_64_listing_every_problem() {
    let mut cmd = Command::new(support::bin());
    cmd.arg("gate")
        .env_remove("OIDC_DISCOVERY_URL")
        .env_remove("OIDC_CLIENT_ID")
        .env_remove("OIDC_CLIENT_SECRET")
        .env("GATE_UPSTREAM", "ftp://x")
        .env("OIDC_EXCLUDE_PATHS", "v1/traces");
    let mut p = Proc::spawn("gate-bad", cmd);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(64));
    let out = p.output_text();
    for k in [
        "OIDC_DISCOVERY_URL",
        "OIDC_CLIENT_ID",
        "OIDC_CLIENT_SECRET",
        "GATE_UPSTREAM",
        "OIDC_EXCLUDE_PATHS",
    ] {
        assert!(out.contains(k), "{k} not reported:\n{out}");
    }
}

/// The search API call every step of `refusals_401_403_and_a_read_group` makes.
const SEARCH: &str = "/api/2.0/mlflow/experiments/search";
const SEARCH_BODY: &[u8] = br#"{"max_results": 10}"#;
const JSON: (&str, &str) = ("content-type", "application/json");

#[test]
fn refusals_401_403_and_a_read_group() {
    let w = world();
    let g = w.main_gate();
    let (search, q, json) = (SEARCH, SEARCH_BODY, JSON);

    no_credentials_and_forged_sessions(w, &g);

    let good = w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let (s, _, b) = request("POST", g.addr, search, &[json, ("authorization", &bearer(&good))], q);
    assert_eq!(s, 200, "a good token passes: {b}");
    assert!(b.contains("gate-e2e"), "{b}");

    bad_tokens_are_refused_with_their_reason(w, &g, good);
    no_group_and_the_read_group(w, &g);
}

/// No credentials: API → 401 JSON; a page → 302 to the provider; bad callbacks and forged
/// session cookies.
fn no_credentials_and_forged_sessions(w: &World, g: &Gate) {
    let (search, q, json) = (SEARCH, SEARCH_BODY, JSON);
    // No credentials: API → 401 JSON; a page → 302 to the provider.
    let (s, h, b) = request("POST", g.addr, search, &[json], q);
    assert_eq!(s, 401, "{b}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["detail"],
        "Authentication required"
    );
    assert!(h["www-authenticate"].contains("Bearer"));
    let (s, h, _) = request("GET", g.addr, "/", &[("accept", "text/html")], b"");
    assert_eq!(s, 302);
    let loc = &h["location"];
    assert!(loc.starts_with(&w.provider.auth_url()), "{loc}");
    for p in [
        "code_challenge=",
        "code_challenge_method=S256",
        "state=",
        "nonce=",
        "client_id=mlflow",
    ] {
        assert!(loc.contains(p), "{p} missing in {loc}");
    }
    assert!(h["set-cookie"].contains("gate_login=") && h["set-cookie"].contains("HttpOnly"));
    // A callback without the login cookie, or with a state that is not the one sent: refused.
    let login_cookie = h["set-cookie"].split(';').next().unwrap().to_string();
    let (s, _, b) = request("GET", g.addr, "/callback?code=abc&state=xyz", &[], b"");
    assert_eq!(s, 400, "{b}");
    let (s, _, b) = request(
        "GET",
        g.addr,
        "/callback?code=abc&state=xyz",
        &[("cookie", &login_cookie)],
        b"",
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("state mismatch"), "{b}");
    // A forged session cookie is no session: the page redirects to login, the API says 401.
    let (s, _, _) = request(
        "GET",
        g.addr,
        "/",
        &[("accept", "text/html"), ("cookie", "gate_session=AAAA")],
        b"",
    );
    assert_eq!(s, 302);
    let (s, _, _) = request("POST", g.addr, search, &[json, ("cookie", "gate_session=AAAA")], q);
    assert_eq!(s, 401);
}

/// Wrong audience, wrong issuer, bad signature, alg none, HS256 key confusion: 401, each counted
/// under its reason.
fn bad_tokens_are_refused_with_their_reason(w: &World, g: &Gate, good: String) {
    let (search, q, json) = (SEARCH, SEARCH_BODY, JSON);
    let refused = |token: &str, reason: &str| {
        let before = gate_metric(g.admin, "gate_auth_failures_total", &format!("reason=\"{reason}\""));
        let (s, _, b) = request("POST", g.addr, search, &[json, ("authorization", &bearer(token))], q);
        assert_eq!(s, 401, "{reason}: {b}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&b).unwrap()["detail"],
            "Invalid token"
        );
        let after = gate_metric(g.admin, "gate_auth_failures_total", &format!("reason=\"{reason}\""));
        assert_eq!(after, before + 1.0, "refused for reason {reason}");
    };
    // Wrong audience: a token the provider minted for another client.
    let other = w.provider.access_token(oidc::OTHER.0, oidc::OTHER.1);
    assert_eq!(jwt_parts(&other).1["aud"], "other");
    refused(&other, "audience");
    // Wrong issuer: another realm signing with the very same key, so only the issuer differs.
    let realm2 = OidcProvider::start(OidcOptions {
        realm: "elsewhere".into(),
        key_file: Some(w.provider.key_file().clone()),
        ..Default::default()
    });
    let foreign = realm2.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    assert_eq!(jwt_parts(&foreign).0["kid"], jwt_parts(&good).0["kid"]);
    refused(&foreign, "issuer");
    drop(realm2);
    // Bad signature: the payload changed after signing (claims now say admin of everything).
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims = jwt_parts(&good).1;
    claims["groups"] = serde_json::json!(["mlflow-admin"]);
    claims["preferred_username"] = "mallory".into();
    let forged = format!("{}.{}.{}", parts[0], b64.encode(claims.to_string()), parts[2]);
    refused(&forged, "signature");
    // alg none.
    let none = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    refused(&none, "malformed");
    // HS256 "signed" with the provider's public key (the classic key-confusion attack).
    let (_, jwks) = support::get_text(w.provider.addr(), "/realms/test/protocol/openid-connect/certs");
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let n = jwks["keys"][0]["n"].as_str().unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = jwks["keys"][0]["kid"].as_str().map(String::from);
    let hs = jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(n.as_bytes()).unwrap(),
    )
    .unwrap();
    refused(&hs, "algorithm");
}

/// A service account in no group gets 403; the READ group may search but not write.
fn no_group_and_the_read_group(w: &World, g: &Gate) {
    let (search, q, json) = (SEARCH, SEARCH_BODY, JSON);
    // A service account in no group: 403.
    let noaccess = w.provider.access_token(oidc::NOACCESS.0, oidc::NOACCESS.1);
    let (s, _, b) = request(
        "POST",
        g.addr,
        search,
        &[json, ("authorization", &bearer(&noaccess))],
        q,
    );
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("not a member"), "{b}");

    // READ group: may search, may not send traces (EDIT on the experiment missing).
    let reader = w.provider.access_token(oidc::READER.0, oidc::READER.1);
    let (s, _, b) = request("POST", g.addr, search, &[json, ("authorization", &bearer(&reader))], q);
    assert_eq!(s, 200, "reader searches: {b}");
    let (body, _) = otlp_request("reader-span");
    let (s, b) = post_traces(g.addr, &w.experiment, Some(&bearer(&reader)), &body);
    assert_eq!(s, 403, "{b}");
    assert!(
        b.contains(&format!("EDIT permission on experiment {}", w.experiment)),
        "{b}"
    );
    // ...nor create runs in it (experiment found in the JSON body).
    let run = format!(r#"{{"experiment_id": "{}"}}"#, w.experiment);
    let (s, _, b) = request(
        "POST",
        g.addr,
        "/api/2.0/mlflow/runs/create",
        &[json, ("authorization", &bearer(&reader))],
        run.as_bytes(),
    );
    assert_eq!(s, 403, "{b}");
    // Unsupported scheme and garbage Basic: 401.
    let (s, _, _) = request("POST", g.addr, search, &[json, ("authorization", "Digest x")], q);
    assert_eq!(s, 401);
    let (s, _, _) = request(
        "POST",
        g.addr,
        search,
        &[json, ("authorization", &basic_auth(oidc::CLIENT_ID, "wrong"))],
        q,
    );
    assert_eq!(s, 401);
}

#[test]
fn permissions_by_experiment_name_glob() {
    let w = world();
    // readers may EDIT experiments named gate-* (looked up in MLflow by id), nothing else.
    let perms = w.perms.path().join("globs.yaml");
    std::fs::write(&perms, "groups:\n  mlflow-readers:\n    \"gate-*\": EDIT\n").unwrap();
    let perms = perms.display().to_string();
    let g = gate(
        &w.provider,
        &w.mlflow.url(),
        &[
            ("OIDC_GROUP_NAME", "mlflow,mlflow-readers"),
            ("GATE_PERMISSIONS_FILE", &perms),
        ],
    );
    let reader = bearer(&w.provider.access_token(oidc::READER.0, oidc::READER.1));
    let send = |experiment: &str| {
        let (body, trace) = otlp_request("glob");
        let (s, b) = post_traces(g.addr, experiment, Some(&reader), &body);
        (s, b, trace)
    };
    let (s, b, trace) = send(&w.experiment);
    assert_eq!(s, 200, "gate-e2e matches gate-*: {b}");
    assert!(mlflow_has_trace(&w.mlflow, &w.experiment, &trace));
    let (s, b, _) = send("0");
    assert_eq!(s, 403, "Default does not match gate-*: {b}");
    assert!(b.contains("EDIT permission on experiment 0"), "{b}");

    // Run APIs name only the run: the gate looks up its experiment. A run in gate-e2e takes
    // the reader's metrics; a run in Default is neither readable nor writable by them.
    let json = |path: &str, body: serde_json::Value| {
        let (s, _, b) = request(
            "POST",
            g.addr,
            path,
            &[("content-type", "application/json"), ("authorization", &reader)],
            body.to_string().as_bytes(),
        );
        (s, b)
    };
    let (s, b) = json(
        "/api/2.0/mlflow/runs/create",
        serde_json::json!({"experiment_id": w.experiment, "start_time": 0}),
    );
    assert_eq!(s, 200, "{b}");
    let mine: serde_json::Value = serde_json::from_str(&b).unwrap();
    let mine = mine.pointer("/run/info/run_id").unwrap().as_str().unwrap().to_string();
    let metric = |run: &str| serde_json::json!({"run_id": run, "key": "loss", "value": 0.5, "timestamp": 0, "step": 0});
    let (s, b) = json("/api/2.0/mlflow/runs/log-metric", metric(&mine));
    assert_eq!(s, 200, "EDIT on gate-* covers its runs: {b}");
    let (s, other) = w.mlflow.post_json(
        "/api/2.0/mlflow/runs/create",
        &serde_json::json!({"experiment_id": "0", "start_time": 0}),
    );
    assert_eq!(s, 200, "{other}");
    let other = other.pointer("/run/info/run_id").unwrap().as_str().unwrap().to_string();
    let (s, b) = json("/api/2.0/mlflow/runs/log-metric", metric(&other));
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("EDIT permission on experiment 0"), "{b}");
    let (s, _, b) = request(
        "GET",
        g.addr,
        &format!("/api/2.0/mlflow/runs/get?run_id={other}"),
        &[("authorization", &reader)],
        b"",
    );
    assert_eq!(s, 403, "a run in an experiment the reader has no rule for: {b}");
    let (s, _, b) = request(
        "GET",
        g.addr,
        &format!("/api/2.0/mlflow/runs/get?run_id={mine}"),
        &[("authorization", &reader)],
        b"",
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("loss"), "the metric went through: {b}");

    // Reads that name no experiment: MLflow's answer keeps only what the reader may read.
    let (s, b) = json(
        "/api/2.0/mlflow/experiments/search",
        serde_json::json!({"max_results": 100}),
    );
    assert_eq!(s, 200, "{b}");
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&b).unwrap()["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["gate-e2e"], "Default (experiment 0) is filtered out: {b}");
    let by_name = |name: &str| {
        let (s, _, b) = request(
            "GET",
            g.addr,
            &format!("/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"),
            &[("authorization", &reader)],
            b"",
        );
        (s, b)
    };
    let (s, b) = by_name("gate-e2e");
    assert_eq!(s, 200, "{b}");
    let (s, b) = by_name("Default");
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("READ permission on experiment 0"), "{b}");
}

#[test]
fn expired_token_is_refused() {
    let w = world();
    // A provider whose tokens live 2 s, and a gate with no clock leeway.
    let short = OidcProvider::start(OidcOptions {
        realm: "short".into(),
        token_ttl_secs: 2,
        ..Default::default()
    });
    let g = gate(&short, &w.mlflow.url(), &[("GATE_CLOCK_LEEWAY_SECONDS", "0")]);
    let token = short.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let auth = bearer(&token);
    let (s, _, b) = request(
        "GET",
        g.addr,
        "/api/2.0/mlflow/experiments/get?experiment_id=0",
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(s, 200, "fresh token: {b}");
    wait_for("the token to expire", Duration::from_secs(10), || {
        let (s, _, _) = request(
            "GET",
            g.addr,
            "/api/2.0/mlflow/experiments/get?experiment_id=0",
            &[("authorization", &auth)],
            b"",
        );
        (s == 401).then_some(())
    });
    assert!(gate_metric(g.admin, "gate_auth_failures_total", "reason=\"expired\"") >= 1.0);
}

#[test]
fn excluded_path_lets_otlp_through_without_a_token() {
    let w = world();
    let g = gate(&w.provider, &w.mlflow.url(), &[("OIDC_EXCLUDE_PATHS", "/v1/traces")]);
    let (body, trace) = otlp_request("mesh-secured");
    let (s, b) = post_traces(g.addr, &w.experiment, None, &body);
    assert_eq!(s, 200, "no token needed on an excluded path: {b}");
    assert!(
        mlflow_has_trace(&w.mlflow, &w.experiment, &trace),
        "trace stored in MLflow"
    );
    // Everything else still needs credentials, including look-alike paths.
    let (s, _, _) = request("POST", g.addr, "/v1/tracesX", &[], b"");
    assert_eq!(s, 401);
    let (s, _, _) = request(
        "GET",
        g.addr,
        "/v1/traces/../api/2.0/mlflow/experiments/search",
        &[],
        b"",
    );
    // Dot segments are refused (400) before authentication, as a non-canonical path.
    assert!(s == 400 || s == 401, "{s}");
    let (s, _, _) = request("GET", g.addr, "/api/2.0/mlflow/experiments/search", &[], b"");
    assert_eq!(s, 401);
}

#[test]
fn client_sent_identity_headers_never_reach_upstream() {
    // A real upstream that records what it receives.
    let echo = echo_server();
    let provider = OidcProvider::start(OidcOptions {
        realm: "echo".into(),
        ..Default::default()
    });
    let g = gate(
        &provider,
        &format!("http://{}", echo.addr),
        &[("OIDC_EXCLUDE_PATHS", "/v1/traces")],
    );
    let token = provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let spoof = [
        ("x-forwarded-user", "admin"),
        ("X-Forwarded-Email", "admin@example.test"),
        ("x-forwarded-groups", "mlflow-admin"),
    ];
    let mut hs: Vec<(&str, &str)> = spoof.to_vec();
    let auth = bearer(&token);
    hs.push(("authorization", &auth));
    hs.push(("connection", "close, x-hop"));
    hs.push(("x-hop", "1"));
    let (s, _, _) = request("GET", g.addr, "/api/2.0/mlflow/experiments/search", &hs, b"");
    assert_eq!(s, 200);
    let (s, _, _) = request("POST", g.addr, "/v1/traces", &spoof, b"x");
    assert_eq!(s, 200);
    let seen = echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let get = |req: &Headers, k: &str| -> Vec<String> {
        req.iter().filter(|(n, _)| n == k).map(|(_, v)| v.clone()).collect()
    };
    // Authenticated: exactly the gate's view of the caller.
    assert_eq!(get(&seen[0], "x-forwarded-user"), ["service-account-mlflow"]);
    assert_eq!(get(&seen[0], "x-forwarded-groups"), ["mlflow,mlflow-admin"]);
    assert!(get(&seen[0], "x-forwarded-email").is_empty());
    assert!(
        get(&seen[0], "authorization").is_empty(),
        "credentials stay at the gate"
    );
    assert!(
        get(&seen[0], "x-hop").is_empty(),
        "hop-by-hop header named in Connection"
    );
    assert_eq!(get(&seen[0], "host"), [echo.addr.to_string()]);
    assert_eq!(get(&seen[0], "x-forwarded-host"), [g.addr.to_string()]);
    assert_eq!(get(&seen[0], "x-forwarded-for"), ["127.0.0.1"]);
    // Excluded path: nobody.
    for k in ["x-forwarded-user", "x-forwarded-email", "x-forwarded-groups"] {
        assert!(get(&seen[1], k).is_empty(), "{k} reached upstream: {:?}", seen[1]);
    }
}
