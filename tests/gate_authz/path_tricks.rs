//! Writes into experiment B by path and body tricks (encoded segments, decoy headers and queries,
//! JSON strings, BOMs, nested locations, reused ids): each refused.

use super::*;

#[test]
fn delete_with_percent_encoded_segment() {
    delete_experiment_via("/api/2.0/mlflow/experiments/%64elete");
}

#[test]
fn delete_with_double_slash() {
    delete_experiment_via("//api/2.0/mlflow/experiments/delete");
}

#[test]
fn delete_with_encoded_api_prefix() {
    delete_experiment_via("/%61pi/2.0/mlflow/experiments/delete");
}

#[test]
fn delete_variants_of_the_same_trick() {
    for p in [
        "/ajax-api/2.0/mlflow/experiments/%44elete",
        "/api/2.0/mlflow/experiments/./delete",
        "/api/2.0/mlflow/x/../experiments/delete",
        "/api/2.0/mlflow/experiments%2Fdelete",
        "/api/2.0/mlflow/experiments/delete/",
    ] {
        delete_experiment_via(p);
    }
}

#[test]
fn run_delete_with_percent_encoded_segment() {
    let w = world();
    let run = post(
        &w.mlflow,
        "/api/2.0/mlflow/runs/create",
        serde_json::json!({"experiment_id": w.a.id}),
    )["run"]["info"]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let g = gate(None);
    let body = format!(r#"{{"run_id": "{run}"}}"#);
    assert_refused(
        "runs/%64elete",
        g.json("POST", "/api/2.0/mlflow/runs/%64elete", &[], &body),
    );
    assert_eq!(run_stage(&run), "active");
}

// ---- Writes into B with EDIT on A, A named as a decoy ------------------------------------------

#[test]
fn write_camelcase_experiment_id_behind_decoy_header() {
    let w = world();
    let g = edit_on_a();
    let before = runs_in(&w.b.id);
    let body = format!(r#"{{"experimentId": "{}"}}"#, w.b.id);
    let (s, b) = g.json(
        "POST",
        "/api/2.0/mlflow/runs/create",
        &[("x-mlflow-experiment-id", &w.a.id)],
        &body,
    );
    assert_eq!(s, 403, "{b}");
    assert!(b.contains(&format!("experiment {}", w.b.id)), "{b}");
    assert_eq!(runs_in(&w.b.id), before);
}

#[test]
fn write_camelcase_run_id_behind_decoy_query() {
    let w = world();
    let g = edit_on_a();
    // MLflow takes run_id (here parsed from its camelCase alias) before run_uuid; the schema check is
    // satisfied by run_uuid, the decoy the old gate looked up.
    let body = format!(
        r#"{{"runId": "{}", "run_uuid": "{}", "key": "hijack", "value": "1"}}"#,
        w.b.run, w.a.run
    );
    let path = format!("/api/2.0/mlflow/runs/set-tag?experiment_id={}", w.a.id);
    let (s, b) = g.json("POST", &path, &[("x-mlflow-experiment-id", &w.a.id)], &body);
    assert_eq!(s, 403, "{b}");
    // Both spellings of one field at once: refused as ambiguous.
    let both = format!(
        r#"{{"run_id": "{}", "runId": "{}", "key": "hijack", "value": "1"}}"#,
        w.a.run, w.b.run
    );
    let (s, b) = g.json("POST", "/api/2.0/mlflow/runs/set-tag", &[], &both);
    assert_eq!(s, 400, "{b}");
    let (_, run) = support::http(
        "GET",
        w.mlflow.addr,
        &format!("/api/2.0/mlflow/runs/get?run_id={}", w.b.run),
        &[],
        b"",
    );
    assert!(!String::from_utf8_lossy(&run).contains("hijack"));
}

#[test]
fn write_with_body_sent_as_json_string() {
    let w = world();
    let g = edit_on_a();
    let inner = format!(r#"{{"experiment_id": "{}"}}"#, w.b.id);
    let body = serde_json::Value::String(inner).to_string();
    let before = runs_in(&w.b.id);
    let (s, b) = g.json(
        "POST",
        "/api/2.0/mlflow/runs/create",
        &[("x-mlflow-experiment-id", &w.a.id)],
        &body,
    );
    assert_eq!(s, 400, "{b}");
    assert_eq!(runs_in(&w.b.id), before);
}

#[test]
fn write_with_bom_before_json() {
    let w = world();
    let g = edit_on_a();
    let mut body = vec![0xEF, 0xBB, 0xBF];
    body.extend(format!(r#"{{"experiment_id": "{}"}}"#, w.b.id).bytes());
    let before = runs_in(&w.b.id);
    let path = format!("/api/2.0/mlflow/runs/create?experiment_id={}", w.a.id);
    let (s, b) = g.call("POST", &path, &[("content-type", "application/json")], &body);
    assert_eq!(s, 400, "{b}");
    // Without a content type, MLflow still parses the body (force=True): the gate does too.
    let plain = format!(r#"{{"experiment_id": "{}"}}"#, w.b.id);
    assert_refused(
        "no content type",
        g.call("POST", "/api/2.0/mlflow/runs/create", &[], plain.as_bytes()),
    );
    assert_eq!(runs_in(&w.b.id), before);
}

#[test]
fn write_artifact_into_b_by_path() {
    let w = world();
    let g = edit_on_a();
    let path = format!(
        "/api/2.0/mlflow-artifacts/artifacts/{}/{}/artifacts/pwned.txt",
        w.b.id, w.b.run
    );
    assert_refused(
        "PUT artifact",
        g.call("PUT", &path, &[("x-mlflow-experiment-id", &w.a.id)], b"pwned"),
    );
    let (s, _) = support::http("GET", w.mlflow.addr, &path, &[], b"");
    assert_ne!(s, 200, "the artifact was written");
}

#[test]
fn write_trace_tag_of_b_by_path() {
    let w = world();
    let g = edit_on_a();
    for p in [
        format!("/api/2.0/mlflow/traces/{}/tags", w.b.trace),
        format!("/api/3.0/mlflow/traces/{}/tags", w.b.trace),
    ] {
        let (s, b) = g.json(
            "PATCH",
            &p,
            &[("x-mlflow-experiment-id", &w.a.id)],
            r#"{"key": "hijack", "value": "1"}"#,
        );
        assert_eq!(s, 403, "{p}: {b}");
    }
    // Nor may a tag point a trace of A at B's artifacts.
    let p = format!("/api/3.0/mlflow/traces/{}/tags", w.a.trace);
    let (s, b) = g.json("PATCH", &p, &[], r#"{"key": "mlflow.artifactLocation", "value": "/"}"#);
    assert_eq!(s, 403, "{b}");
}

#[test]
fn write_v3_trace_with_nested_location_in_b() {
    let w = world();
    let g = edit_on_a();
    let path = format!("/api/3.0/mlflow/traces?experiment_id={}", w.a.id);
    let (s, b) = g.json(
        "POST",
        &path,
        &[("x-mlflow-experiment-id", &w.a.id)],
        &trace_body(&w.b.id).to_string(),
    );
    assert_eq!(s, 403, "{b}");
    // camelCase at every level.
    let camel = serde_json::json!({"trace": {"traceInfo": {"traceId": "tr-0123", "traceLocation": {"type": "MLFLOW_EXPERIMENT",
        "mlflowExperiment": {"experimentId": w.b.id}}, "requestTime": "2024-01-01T00:00:00Z", "state": "OK"}}});
    let (s, b) = g.json("POST", &path, &[], &camel.to_string());
    assert_eq!(s, 403, "{b}");
}

#[test]
fn write_v3_trace_reusing_the_id_of_a_trace_of_b() {
    // MLflow's start-trace overwrites an existing trace and moves it into the named experiment.
    let w = world();
    let (_, t) = start_trace(w.mlflow.addr, &w.b.id, &[]);
    let victim = t["trace"]["trace_info"]["trace_id"].as_str().unwrap().to_string();
    let g = edit_on_a();
    let mut body = trace_body(&w.a.id);
    body["trace"]["trace_info"]["trace_id"] = victim.clone().into();
    let (s, b) = g.json(
        "POST",
        "/api/3.0/mlflow/traces",
        &[("x-mlflow-experiment-id", &w.a.id)],
        &body.to_string(),
    );
    assert_eq!(s, 403, "{b}");
    let (_, b) = support::http(
        "GET",
        w.mlflow.addr,
        &format!("/api/3.0/mlflow/traces/{victim}"),
        &[],
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v.pointer("/trace/trace_info/trace_location/mlflow_experiment/experiment_id"),
        Some(&serde_json::Value::from(w.b.id.as_str())),
        "the trace stayed in B"
    );
}

#[test]
fn rename_and_create_without_star_rule() {
    let w = world();
    let g = edit_on_a();
    let decoy = [("x-mlflow-experiment-id", w.a.id.as_str())];
    // A registered model renamed by a member with EDIT on A only.
    let model = format!("rm-{}", rand::random::<u32>());
    post(
        &w.mlflow,
        "/api/2.0/mlflow/registered-models/create",
        serde_json::json!({ "name": model }),
    );
    let body = serde_json::json!({"name": model, "new_name": format!("{model}-stolen")}).to_string();
    let (s, b) = g.json("POST", "/api/2.0/mlflow/registered-models/rename", &decoy, &body);
    assert_eq!(s, 403, "{b}");
    let (s, b) = g.json(
        "POST",
        "/api/2.0/mlflow/registered-models/create",
        &decoy,
        r#"{"name": "model-by-member"}"#,
    );
    assert_eq!(s, 403, "{b}");
    // Experiments created or renamed outside the member's rules.
    let (s, b) = g.json(
        "POST",
        "/api/2.0/mlflow/experiments/create",
        &decoy,
        r#"{"name": "created-by-member"}"#,
    );
    assert_eq!(s, 403, "{b}");
    let body = format!(r#"{{"experiment_id": "{}", "new_name": "renamed-b"}}"#, w.b.id);
    let (s, b) = g.json("POST", "/api/2.0/mlflow/experiments/update", &decoy, &body);
    assert_eq!(s, 403, "{b}");
    let (_, v) = w.mlflow.post_json(
        "/api/2.0/mlflow/registered-models/get-latest-versions",
        &serde_json::json!({ "name": model }),
    );
    assert!(
        !v.to_string().contains("RESOURCE_DOES_NOT_EXIST"),
        "the model was renamed: {v}"
    );
    // EDIT on A renames A (the rules name ids only, so a name gains nothing).
    let body = format!(r#"{{"experiment_id": "{}", "new_name": "{}"}}"#, w.a.id, w.a.name);
    let (s, b) = g.json("POST", "/api/2.0/mlflow/experiments/update", &[], &body);
    assert_eq!(s, 200, "{b}");
}
