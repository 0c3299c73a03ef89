//! Reads of experiment B by every MLflow read path (searches, GraphQL, traces, metrics,
//! artifacts, registry, logged models): refused or filtered, without telling what is hidden.

use super::*;

// ---- Reads of B with READ on A ------------------------------------------------------------------

#[test]
fn read_camelcase_experiment_ids_in_searches() {
    let w = world();
    let g = read_on_a();
    let decoy = [("x-mlflow-experiment-id", w.a.id.as_str())];
    let body = format!(r#"{{"experimentIds": ["{}"]}}"#, w.b.id);
    assert_refused(
        "runs/search",
        g.json("POST", "/api/2.0/mlflow/runs/search", &decoy, &body),
    );
    let traces =
        serde_json::json!({"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflowExperiment": {"experimentId": w.b.id}}]});
    assert_refused(
        "traces/search",
        g.json("POST", "/api/3.0/mlflow/traces/search", &decoy, &traces.to_string()),
    );
    assert_refused(
        "v2 traces",
        g.call(
            "GET",
            &format!("/api/2.0/mlflow/traces?experiment_ids={}", w.b.id),
            &decoy,
            b"",
        ),
    );
}

#[test]
fn read_through_graphql() {
    let w = world();
    let g = read_on_a();
    for q in [
        format!(
            r#"{{ mlflowGetRun(input: {{runId: "{}"}}) {{ run {{ info {{ runName }} }} }} }}"#,
            w.b.run
        ),
        format!(
            r#"{{ mlflowSearchRuns(input: {{experimentIds: ["{}"]}}) {{ runs {{ info {{ runId }} }} }} }}"#,
            w.b.id
        ),
        format!(
            r#"{{ mlflowGetExperiment(input: {{experimentId: "{}"}}) {{ experiment {{ name }} }} }}"#,
            w.b.id
        ),
        format!(
            r#"mutation {{ mlflowSearchRuns(input: {{experimentIds: ["{}"]}}) {{ runs {{ info {{ runId }} }} }} }}"#,
            w.b.id
        ),
    ] {
        let body = serde_json::json!({"query": q}).to_string();
        let (s, b) = g.json("POST", "/graphql", &[("x-mlflow-experiment-id", &w.a.id)], &body);
        assert_eq!(s, 403, "{q}: {b}");
    }
    // Through a variable.
    let body = serde_json::json!({"query": "query ($r: String) { mlflowGetRun(input: {runId: $r}) { run { info { runName } } } }",
        "variables": {"r": w.b.run}});
    let (s, b) = g.json("POST", "/graphql", &[], &body.to_string());
    assert_eq!(s, 403, "{b}");
    // A field naming no experiment next to one naming A still needs READ everywhere.
    let q = format!(
        r#"{{ a: mlflowGetExperiment(input: {{experimentId: "{}"}}) {{ experiment {{ name }} }} b: mlflowSearchRuns(input: {{}}) {{ runs {{ info {{ runId }} }} }} }}"#,
        w.a.id
    );
    let (s, b) = g.json("POST", "/graphql", &[], &serde_json::json!({ "query": q }).to_string());
    assert_eq!(s, 403, "{b}");
    // Unknown fields are for admins.
    let body = serde_json::json!({"query": "{ mlflowSomethingNew { x } }"});
    let (s, b) = g.json("POST", "/graphql", &[], &body.to_string());
    assert_eq!(s, 403, "{b}");
}

#[test]
fn read_traces_by_id() {
    let w = world();
    let g = read_on_a();
    let decoy = [("x-mlflow-experiment-id", w.a.id.as_str())];
    for p in [
        format!("/api/3.0/mlflow/traces/{}", w.b.trace),
        format!("/api/2.0/mlflow/traces/{}/info", w.b.trace),
        format!("/ajax-api/3.0/mlflow/get-trace-artifact?request_id={}", w.b.trace),
        format!("/ajax-api/2.0/mlflow/get-trace-artifact?request_id={}", w.b.trace),
        format!("/api/3.0/mlflow/traces/get?trace_id={}", w.b.trace),
        format!(
            "/ajax-api/3.0/mlflow/traces/batchGet?trace_ids={}&trace_ids={}",
            w.a.trace, w.b.trace
        ),
    ] {
        let (s, b) = g.call("GET", &p, &decoy, b"");
        assert_eq!(s, 403, "{p}: {b}");
    }
    // An id that does not resolve is no pass either.
    let (s, b) = g.call("GET", "/api/3.0/mlflow/traces/tr-doesnotexist", &[], b"");
    assert_eq!(s, 403, "{b}");
}

#[test]
fn read_metric_history_bulk_interval() {
    let w = world();
    let g = read_on_a();
    let p = format!(
        "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?run_ids={}&run_ids={}&metric_key=m&experiment_id={}",
        w.a.run, w.b.run, w.a.id
    );
    let (s, b) = g.call("GET", &p, &[], b"");
    assert_eq!(s, 403, "{b}");
}

#[test]
fn read_artifacts_of_b() {
    let w = world();
    let g = read_on_a();
    let decoy = [("x-mlflow-experiment-id", w.a.id.as_str())];
    for p in [
        format!("/get-artifact?run_id={}&path=x", w.b.run),
        format!("/api/2.0/mlflow/artifacts/list?run_id={}", w.b.run),
        format!("/api/2.0/mlflow-artifacts/artifacts/{}/{}/artifacts/x", w.b.id, w.b.run),
        format!("/api/2.0/mlflow-artifacts/artifacts?path={}", w.b.id),
        "/api/2.0/mlflow-artifacts/artifacts".to_string(),
        format!("/api/2.0/mlflow-artifacts/artifacts?path={}/../{}", w.a.id, w.b.id),
    ] {
        let (s, b) = g.call("GET", &p, &decoy, b"");
        assert!(s == 403 || s == 400, "{p}: {s} {b}");
    }
}

#[test]
fn read_model_version_artifacts_and_registry() {
    let w = world();
    let model = format!("rm-{}", rand::random::<u32>());
    post(
        &w.mlflow,
        "/api/2.0/mlflow/registered-models/create",
        serde_json::json!({ "name": model }),
    );
    let g = read_on_a();
    let decoy = [("x-mlflow-experiment-id", w.a.id.as_str())];
    for p in [
        "/api/2.0/mlflow/registered-models/search".to_string(),
        "/api/2.0/mlflow/model-versions/search".to_string(),
        format!("/api/2.0/mlflow/registered-models/get?name={model}"),
        format!("/model-versions/get-artifact?name={model}&version=1&path=MLmodel"),
    ] {
        let (s, b) = g.call("GET", &p, &decoy, b"");
        assert_eq!(s, 403, "{p}: {b}");
    }
}

#[test]
fn read_logged_models_of_b() {
    let w = world();
    let g = read_on_a();
    let decoy = [("x-mlflow-experiment-id", w.a.id.as_str())];
    let (s, b) = g.call(
        "GET",
        &format!("/api/2.0/mlflow/logged-models/{}", w.b.model),
        &decoy,
        b"",
    );
    assert_eq!(s, 403, "{b}");
    let body = format!(r#"{{"experimentIds": ["{}"]}}"#, w.b.id);
    assert_refused(
        "logged-models/search",
        g.json("POST", "/api/2.0/mlflow/logged-models/search", &decoy, &body),
    );
}

#[test]
fn decoy_header_keeps_listings_filtered() {
    let w = world();
    let g = read_on_a();
    let decoy = [("x-mlflow-experiment-id", w.a.id.as_str())];
    let (s, b) = g.json(
        "POST",
        "/api/2.0/mlflow/experiments/search",
        &decoy,
        r#"{"max_results": 1000}"#,
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(&w.a.name) && !b.contains(&w.b.name), "{b}");
    let (s, b) = g.call(
        "GET",
        &format!("/api/2.0/mlflow/experiments/get-by-name?experiment_name={}", w.b.name),
        &decoy,
        b"",
    );
    assert_eq!(s, 403, "{b}");
}

/// A cut search must not answer whether a hidden experiment matched a filter (review finding):
/// searching B's secret tag looks the same whether it matches or not, paging included.
#[test]
fn searches_do_not_tell_whether_hidden_experiments_matched() {
    let w = world();
    // A tag only B has, set directly on MLflow (the gate is not in the way).
    let key = format!("secret-{}", rand::random::<u32>());
    let (s, b) = w.mlflow.post_json(
        "/api/2.0/mlflow/experiments/set-experiment-tag",
        &serde_json::json!({"experiment_id": w.b.id, "key": key, "value": "hunter2"}),
    );
    assert_eq!(s, 200, "{b}");
    let g = read_on_a();
    let search = |filter: &str, extra: &str| {
        let body = format!(r#"{{"filter": "tags.`{key}` LIKE '{filter}'"{extra}}}"#);
        g.json("POST", "/api/2.0/mlflow/experiments/search", &[], &body)
    };
    let hit = search("h%", "");
    let miss = search("z%", "");
    assert_eq!(hit.0, 200, "{}", hit.1);
    assert_eq!(hit, miss, "a match in B must look like no match");
    let paged_hit = search("h%", r#", "max_results": 1"#);
    let paged_miss = search("z%", r#", "max_results": 1"#);
    assert_eq!(paged_hit, paged_miss);
    assert!(!paged_hit.1.contains("next_page_token"), "{}", paged_hit.1);
    // A's own experiments are still found by the same kind of search.
    let (s, b) = g.json(
        "POST",
        "/api/2.0/mlflow/experiments/search",
        &[],
        &format!(r#"{{"filter": "name = '{}'"}}"#, w.a.name),
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(&w.a.name), "{b}");
}

// ---- Amplification -------------------------------------------------------------------------------

#[test]
fn many_ids_in_one_request_are_refused_fast() {
    let g = read_on_a();
    let mut p = "/api/2.0/mlflow/metrics/get-history-bulk-interval?metric_key=m".to_string();
    // Short ids keep the request line under 64 KiB (longer ones get a 414 from the HTTP layer).
    for i in 0..4000 {
        p.push_str(&format!("&run_ids={i}"));
    }
    let t = Instant::now();
    let (s, b) = g.call("GET", &p, &[], b"");
    assert_eq!(s, 400, "{b}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Below the cap, look-ups run concurrently and unknown runs are 403.
    let mut p = "/api/2.0/mlflow/metrics/get-history-bulk-interval?metric_key=m".to_string();
    for i in 0..100 {
        p.push_str(&format!("&run_ids={i:032x}"));
    }
    let (s, b) = g.call("GET", &p, &[], b"");
    assert_eq!(s, 403, "{b}");
}
