//! What each role may do on its own experiment: edit, read, admin.

use super::*;

// ---- What keeps working ----------------------------------------------------------------------------

#[test]
fn edit_on_a_creates_runs_logs_metrics_and_traces() {
    let w = world();
    let g = edit_on_a();
    let body = format!(r#"{{"experimentId": "{}"}}"#, w.a.id);
    let (s, b) = g.json("POST", "/api/2.0/mlflow/runs/create", &[], &body);
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        v["run"]["info"]["experiment_id"],
        w.a.id.as_str(),
        "the canonical body reached MLflow"
    );
    let run = v["run"]["info"]["run_id"].as_str().unwrap();
    let metric = format!(r#"{{"run_id": "{run}", "key": "loss", "value": 0.5, "timestamp": 0, "step": 1}}"#);
    let (s, b) = g.json("POST", "/ajax-api/2.0/mlflow/runs/log-metric", &[], &metric);
    assert_eq!(s, 200, "{b}");
    let (s, b) = g.call(
        "GET",
        &format!("/api/2.0/mlflow/metrics/get-history?run_id={run}&metric_key=loss"),
        &[],
        b"",
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("0.5"), "{b}");
    let (s, b) = start_trace(g.addr, &w.a.id, &[("authorization", &g.auth)]);
    assert_eq!(s, 200, "{b}");
    let trace = b["trace"]["trace_info"]["trace_id"].as_str().unwrap().to_string();
    let (s, b) = g.json(
        "PATCH",
        &format!("/api/3.0/mlflow/traces/{trace}/tags"),
        &[],
        r#"{"key": "note", "value": "ok"}"#,
    );
    assert_eq!(s, 200, "{b}");
    let path = format!(
        "/api/2.0/mlflow-artifacts/artifacts/{}/{run}/artifacts/hello.txt",
        w.a.id
    );
    let (s, b) = g.call("PUT", &path, &[], b"hello");
    assert_eq!(s, 200, "{b}");
    let (s, b) = g.call("GET", &path, &[], b"");
    assert_eq!((s, b.as_str()), (200, "hello"));
    // The upload API names its run in the query.
    let (s, b) = g.call(
        "POST",
        &format!("/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run}&path=up.txt"),
        &[("content-type", "application/octet-stream")],
        b"up",
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = g.call(
        "POST",
        &format!("/ajax-api/2.0/mlflow/upload-artifact?run_uuid={}&path=up.txt", w.b.run),
        &[("content-type", "application/octet-stream")],
        b"up",
    );
    assert_eq!(s, 403, "{b}");
    // OTLP into A (the one place x-mlflow-experiment-id counts).
    let otlp = support::otlp::one_span_request("authz");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        &otlp,
    );
    assert_eq!(s, 200, "{b}");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.b.id),
        ],
        &otlp,
    );
    assert_eq!(s, 403, "{b}");
}

#[test]
fn read_on_a_lists_and_reads_a() {
    let w = world();
    let g = read_on_a();
    let body = format!(r#"{{"experiment_ids": ["{}"]}}"#, w.a.id);
    let (s, b) = g.json("POST", "/api/2.0/mlflow/runs/search", &[], &body);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(&w.a.run), "{b}");
    let (s, b) = g.call("GET", &format!("/api/3.0/mlflow/traces/{}", w.a.trace), &[], b"");
    assert_eq!(s, 200, "{b}");
    let (s, b) = g.call("GET", &format!("/api/2.0/mlflow/logged-models/{}", w.a.model), &[], b"");
    assert_eq!(s, 200, "{b}");
    let q = serde_json::json!({"query": format!(r#"{{ mlflowGetRun(input: {{runId: "{}"}}) {{ run {{ info {{ runId }} experiment {{ name }} }} }} }}"#, w.a.run)});
    let (s, b) = g.json("POST", "/graphql", &[], &q.to_string());
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(&w.a.name), "{b}");
    let (s, b) = g.json(
        "POST",
        "/api/2.0/mlflow/experiments/search",
        &[],
        r#"{"max_results": 1000}"#,
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(&w.a.name) && !b.contains(&w.b.name), "{b}");
    // The UI shell and server info are open to members.
    for p in ["/", "/health", "/version", "/api/3.0/mlflow/server-info"] {
        let (s, b) = g.call("GET", p, &[], b"");
        assert_eq!(s, 200, "{p}: {b}");
    }
    // Writes are not.
    let metric = format!(r#"{{"run_id": "{}", "key": "x", "value": 1, "timestamp": 0}}"#, w.a.run);
    let (s, b) = g.json("POST", "/api/2.0/mlflow/runs/log-metric", &[], &metric);
    assert_eq!(s, 403, "{b}");
}

#[test]
fn admin_is_unrestricted_and_canonical() {
    let w = world();
    let victim = w
        .mlflow
        .create_experiment(&format!("admin-victim-{}", rand::random::<u32>()));
    let mut g = gate(Some("groups: {}\n"));
    g.auth = format!(
        "Bearer {}",
        w.provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET)
    );
    let body = format!(r#"{{"experiment_id": "{victim}"}}"#);
    let (s, b) = g.json("POST", "/api/2.0/mlflow/experiments/%64elete", &[], &body);
    assert_eq!(s, 200, "{b}");
    assert_eq!(experiment_stage(&victim), "deleted");
    let (s, b) = g.call("GET", "/api/2.0/mlflow/webhooks", &[], b"");
    assert_eq!(s, 200, "{b}");
}
