//! The auth front end (`otlp-relay gate`) against a real OpenID provider (npm oidc-provider, Keycloak
//! shaped), a real `mlflow server`, the real MLflow Python client and headless Debian chromium.
//! One provider and one MLflow serve every test of this file (they are slow to start; a OnceLock);
//! gates are cheap, so each test starts the gate configuration it needs. A test that stops or
//! re-keys a provider starts its own.
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;
use support::gate::{Gate, start as gate};
use support::mlflow::Mlflow;
use support::oidc::{self, OidcOptions, OidcProvider, basic_auth, jwt_parts};
use support::{Proc, wait_for};

/// A raw HTTP/1.1 exchange returning status, lower-cased response headers and body.
fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, HashMap<String, String>, String) {
    let (status, hs, body) = support::http_exchange(method, addr, path, headers, body);
    (status, hs, String::from_utf8_lossy(&body).to_string())
}

/// POSTs an OTLP/protobuf body to the gate's /v1/traces for `experiment`, with an
/// Authorization header when given: (status, body).
fn post_traces(addr: SocketAddr, experiment: &str, authorization: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut headers = vec![
        ("content-type", "application/x-protobuf"),
        ("x-mlflow-experiment-id", experiment),
    ];
    headers.extend(authorization.map(|a| ("authorization", a)));
    let (s, _, b) = request("POST", addr, "/v1/traces", &headers, body);
    (s, b)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Sum of a gate metric's series whose labels contain `label` (e.g. `reason="issuer"`).
fn gate_metric(addr: SocketAddr, name: &str, label: &str) -> f64 {
    let (_, _, text) = request("GET", addr, "/gate/metrics", &[], b"");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One OTLP protobuf export request with a single span named `name`.
fn otlp_request(name: &str) -> (Vec<u8>, String) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    let trace_id: [u8; 16] = rand::random();
    let span_id: [u8; 8] = rand::random();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("gate-test".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: trace_id.to_vec(),
                    span_id: span_id.to_vec(),
                    name: name.into(),
                    kind: 1,
                    start_time_unix_nano: now - 1_000_000,
                    end_time_unix_nano: now,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    (req.encode_to_vec(), const_hex::encode(trace_id))
}

/// True when MLflow holds a trace whose id mentions `trace_hex`.
fn mlflow_has_trace(m: &Mlflow, experiment: &str, trace_hex: &str) -> bool {
    m.search_traces(experiment)
        .iter()
        .any(|t| t.to_string().contains(trace_hex))
}

/// Header lines (lower-cased name, value) of one request.
type Headers = Vec<(String, String)>;

/// A plain upstream that records the headers of every request and answers 200.
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Headers>>>,
}

fn echo_server() -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut len = 0usize;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                    if k == "content-length" {
                        len = v.parse().unwrap();
                    }
                    headers.push((k, v));
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            s2.lock().unwrap().push(headers);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    Echo { addr, seen }
}

struct World {
    provider: OidcProvider,
    mlflow: Mlflow,
    experiment: String,
    perms: tempfile::TempDir,
    /// The main gate's permissions file (written once: tests run in parallel).
    perms_file: String,
}

/// The provider and MLflow every test shares, started by the first test that needs them.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        // Both slow starts overlap: the provider (node) in this thread, MLflow (~20 s) in another.
        let mlflow = std::thread::spawn(Mlflow::start);
        let provider = OidcProvider::start(OidcOptions {
            auto_login: false, // the browser test fills in the provider's form
            ..Default::default()
        });
        let mlflow = mlflow.join().unwrap();
        eprintln!("mlflow healthy after {:?}", mlflow.startup);
        // Statics are never dropped: end both processes when this test process is gone.
        support::reap_with_us(&format!("-{}", mlflow.pid()));
        support::reap_with_us(&provider.pid().expect("provider running").to_string());
        let experiment = mlflow.create_experiment("gate-e2e");
        let perms = tempfile::tempdir().unwrap();
        let perms_file = support::write_file(
            perms.path(),
            "permissions.yaml",
            "groups:\n  mlflow-readers:\n    \"*\": READ\n",
        )
        .display()
        .to_string();
        World {
            provider,
            mlflow,
            experiment,
            perms,
            perms_file,
        }
    })
}

impl World {
    /// The gate most tests use: readers (READ everywhere) allowed besides mlflow.
    fn main_gate(&self) -> Gate {
        let perms = &self.perms_file;
        gate(
            &self.provider,
            &self.mlflow.url(),
            &[
                ("OIDC_GROUP_NAME", "mlflow,mlflow-readers"),
                ("GATE_PERMISSIONS_FILE", perms),
            ],
        )
    }
}

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

#[test]
fn refusals_401_403_and_a_read_group() {
    let w = world();
    let g = w.main_gate();
    let search = "/api/2.0/mlflow/experiments/search";
    let q = br#"{"max_results": 10}"#;
    let json = ("content-type", "application/json");

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

    let good = w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let (s, _, b) = request("POST", g.addr, search, &[json, ("authorization", &bearer(&good))], q);
    assert_eq!(s, 200, "a good token passes: {b}");
    assert!(b.contains("gate-e2e"), "{b}");

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
fn bearer_and_basic_through_to_mlflow_with_metrics() {
    let w = world();
    let g = w.main_gate();
    let token = w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let (body, trace) = otlp_request("through-the-gate");
    let (s, b) = post_traces(g.addr, &w.experiment, Some(&bearer(&token)), &body);
    assert_eq!(s, 200, "{b}");
    assert!(
        mlflow_has_trace(&w.mlflow, &w.experiment, &trace),
        "trace stored in MLflow"
    );
    // Basic with the client credentials, straight from curl-like clients.
    let (s, _, b) = request(
        "GET",
        g.addr,
        &format!("/api/2.0/mlflow/experiments/get?experiment_id={}", w.experiment),
        &[("authorization", &basic_auth(oidc::CLIENT_ID, oidc::CLIENT_SECRET))],
        b"",
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("gate-e2e"));
    assert!(gate_metric(g.admin, "gate_requests_total", "status=\"200\"") >= 2.0);
    assert!(gate_metric(g.admin, "gate_upstream_duration_seconds_count", "") >= 2.0);
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

#[test]
fn upstream_down_is_502() {
    let w = world();
    let closed = support::free_port();
    let g = gate(&w.provider, &format!("http://127.0.0.1:{closed}"), &[]);
    let token = w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let (s, h, b) = request(
        "GET",
        g.addr,
        "/api/2.0/mlflow/experiments/search",
        &[("authorization", &bearer(&token))],
        b"",
    );
    assert_eq!(s, 502, "{b}");
    assert!(h["content-type"].starts_with("application/json"));
    assert!(b.contains("MLflow upstream unavailable"), "{b}");
}

#[test]
fn mlflow_python_client_with_basic_client_credentials() {
    let w = world();
    let g = w.main_gate();
    let script = r#"
import json, mlflow
c = mlflow.MlflowClient()
exp_id = c.create_experiment("made-by-python-client")
print("RESULT " + json.dumps({"names": sorted(e.name for e in c.search_experiments()), "created": exp_id}))
"#;
    let run = |password: &str| {
        Command::new(w.mlflow.python())
            .args(["-c", script])
            .env("MLFLOW_TRACKING_URI", format!("http://{}", g.addr))
            .env("MLFLOW_TRACKING_USERNAME", oidc::CLIENT_ID)
            .env("MLFLOW_TRACKING_PASSWORD", password)
            .env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            .output()
            .unwrap()
    };
    let out = run(oidc::CLIENT_SECRET);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let names: Vec<&str> = v["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        names.contains(&"gate-e2e") && names.contains(&"made-by-python-client"),
        "{names:?}"
    );
    // Wrong secret: refused.
    let out = run("not-the-secret");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Invalid credentials"), "{err}");
}

#[test]
fn browser_login_with_chromium() {
    let w = world();
    let g = w.main_gate();
    let shots = support::cache_dir().parent().unwrap().join("gate-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let url = format!("http://{}/", g.addr);
    let r = support::browser::login(
        &url,
        "alice",
        "alice",
        &shots.join("alice-mlflow-ui.png"),
        &[("EXPECT_TEXT", "gate-e2e"), ("LOGOUT", "1")],
    );
    assert!(r.get("error").is_none(), "{r:#}");
    assert!(
        r["loginPageUrl"].as_str().unwrap().starts_with(&w.provider.issuer),
        "{r:#}"
    );
    assert!(
        r["afterLoginUrl"].as_str().unwrap().starts_with(&url),
        "back at the gate: {r:#}"
    );
    assert!(r["title"].as_str().unwrap().contains("MLflow"), "{r:#}");
    assert!(
        r["text"].as_str().unwrap().contains("gate-e2e"),
        "the UI lists experiments via the session"
    );
    let session = r["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gate_session");
    let session = session.unwrap_or_else(|| panic!("no session cookie: {r:#}"));
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Lax");
    assert!(
        !r["cookiesAfterLogout"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "gate_session"),
        "{r:#}"
    );
    assert!(shots.join("alice-mlflow-ui.png").metadata().unwrap().len() > 10_000);

    // bob logs in fine at the provider but is in no allowed group: 403 from the gate.
    let r = support::browser::login(&url, "bob", "bob", &shots.join("bob-403.png"), &[]);
    assert!(r.get("error").is_none(), "{r:#}");
    assert_eq!(r["afterLoginStatus"], 403, "{r:#}");
    assert!(r["text"].as_str().unwrap().contains("not a member"), "{r:#}");
}

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
    let addr = p.wait_listen("gate", Duration::from_secs(20));
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

/// The whole pipeline: `otlp-relay run` with a client-credentials token → gate → MLflow; the
/// traces are found by search. Then a relay without a token: refused (401, counted failed) by
/// a gate that protects /v1/traces, delivered through one that excludes it (mesh-secured hop).
#[test]
fn relay_with_oauth2client_through_the_gate_into_mlflow() {
    use serde_json::json;
    use support::config::RelayConfig;
    use support::otlp::{Relay, loadgen};
    let w = world();
    let config = |gate: SocketAddr, experiment: &str, auth: bool| {
        let mut exporter = json!({
            "endpoint": format!("http://{gate}"),
            "headers": {"x-mlflow-experiment-id": experiment},
        });
        let mut config = RelayConfig::new()
            .without_transport("http")
            .batch(json!({"timeout": "100ms"}));
        if auth {
            exporter["auth"] = json!({"authenticator": "oauth2client/mlflow"});
            config = config.extension(
                "oauth2client/mlflow",
                json!({
                    "client_id": oidc::CLIENT_ID,
                    "client_secret": oidc::CLIENT_SECRET,
                    "token_url": w.provider.token_url(),
                }),
            );
        }
        config.exporter("otlphttp/mlflow", exporter).yaml()
    };
    let send = |relay: &Relay, seed: &str| {
        let grpc = relay.grpc.unwrap().to_string();
        let (code, r) = loadgen(&[
            "--otlp-insecure",
            "--otlp-endpoint",
            &grpc,
            "--traces",
            "5",
            "--child-spans",
            "2",
            "--genai",
            "--seed",
            seed,
        ]);
        assert_eq!(code, 0, "{r}");
    };
    let dir = tempfile::tempdir().unwrap();

    let g = w.main_gate();
    let with_token = w.mlflow.create_experiment("relay-via-gate-with-token");
    let relay = Relay::start(dir.path(), &config(g.addr, &with_token, true), "otlp");
    send(&relay, "21");
    let traces = wait_for("5 traces via the gate", Duration::from_secs(60), || {
        let t = w.mlflow.search_traces(&with_token);
        (t.len() >= 5).then_some(t)
    });
    assert_eq!(traces.len(), 5);
    assert!(relay.metric("otlp_relay_token_requests_total", &[("result", "success")]) >= 1.0);
    drop(relay);

    // No token, /v1/traces protected: the gate refuses and the relay counts the spans failed.
    let refused = w.mlflow.create_experiment("relay-via-gate-refused");
    let relay = Relay::start(dir.path(), &config(g.addr, &refused, false), "otlp");
    send(&relay, "22");
    let accepted = relay.metric("otelcol_receiver_accepted_spans_total", &[]);
    assert!(accepted > 0.0);
    wait_for("the 401 to be counted", Duration::from_secs(30), || {
        (relay.metric("otelcol_exporter_send_failed_spans_total", &[]) == accepted).then_some(())
    });
    assert!(relay.proc.output_text().contains("401"), "the gate's refusal is logged");
    assert!(w.mlflow.search_traces(&refused).is_empty());
    drop(relay);

    // No token, /v1/traces excluded (the mesh secures that hop): delivered.
    let open = gate(&w.provider, &w.mlflow.url(), &[("OIDC_EXCLUDE_PATHS", "/v1/traces")]);
    let excluded = w.mlflow.create_experiment("relay-via-gate-excluded");
    let relay = Relay::start(dir.path(), &config(open.addr, &excluded, false), "otlp");
    send(&relay, "23");
    let traces = wait_for("5 traces via the excluded path", Duration::from_secs(60), || {
        let t = w.mlflow.search_traces(&excluded);
        (t.len() >= 5).then_some(t)
    });
    assert_eq!(traces.len(), 5);
}
