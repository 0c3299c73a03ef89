//! Real clients through the gate into MLflow: bearer and basic, the MLflow Python client, a
//! browser login, the relay's oauth2client; and a down upstream.

use super::*;

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
