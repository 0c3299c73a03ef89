//! The gate's authorization against a real `mlflow server` and the real (Keycloak-shaped) OpenID
//! provider: every attack of issue 11 as its own test (each passed on the gate before canonical
//! requests and the route table), the legitimate paths, the route-coverage guard and the gate's
//! added latency. One provider and one MLflow serve all tests of this file (OnceLock); each test
//! starts the gate configuration it needs. The member is the `reader` service account (group
//! mlflow-readers, not admin); experiments A and B exist, with a run, a trace and a logged model
//! each.
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::mlflow::Mlflow;
use support::oidc::{self, OidcOptions, OidcProvider};
use support::{Proc, wait_for};

struct World {
    provider: OidcProvider,
    mlflow: Mlflow,
    dir: tempfile::TempDir,
    a: Exp,
    b: Exp,
}

/// An experiment with a run, a trace and a logged model in it.
struct Exp {
    id: String,
    name: String,
    run: String,
    trace: String,
    model: String,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join("mlartifacts").display().to_string();
        let mlflow = std::thread::spawn(move || Mlflow::start_with(&["--artifacts-destination", &artifacts]));
        let provider = OidcProvider::start(OidcOptions::default());
        let mlflow = mlflow.join().unwrap();
        // Statics are never dropped: end both processes when this test process is gone.
        support::reap_with_us(&format!("-{}", mlflow.pid()));
        support::reap_with_us(&provider.pid().expect("provider running").to_string());
        let a = make_exp(&mlflow, "authz-a");
        let b = make_exp(&mlflow, "authz-b");
        World {
            provider,
            mlflow,
            dir,
            a,
            b,
        }
    })
}

fn post(m: &Mlflow, path: &str, body: serde_json::Value) -> serde_json::Value {
    let (s, v) = m.post_json(path, &body);
    assert_eq!(s, 200, "{path}: {v}");
    v
}

fn make_exp(m: &Mlflow, name: &str) -> Exp {
    let id = m.create_experiment(name);
    let run = post(
        m,
        "/api/2.0/mlflow/runs/create",
        serde_json::json!({"experiment_id": id}),
    )["run"]["info"]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    post(
        m,
        "/api/2.0/mlflow/runs/log-metric",
        serde_json::json!({"run_id": run, "key": "m", "value": 1.0, "timestamp": 0, "step": 0}),
    );
    let trace = start_trace(m.addr, &id, &[]).1["trace"]["trace_info"]["trace_id"]
        .as_str()
        .unwrap()
        .to_string();
    let model = post(
        m,
        "/api/2.0/mlflow/logged-models",
        serde_json::json!({"experiment_id": id, "name": "model"}),
    )["model"]["info"]["model_id"]
        .as_str()
        .unwrap()
        .to_string();
    Exp {
        id,
        name: name.into(),
        run,
        trace,
        model,
    }
}

fn trace_body(experiment: &str) -> serde_json::Value {
    let id = format!("tr-{}", const_hex::encode(rand::random::<[u8; 16]>()));
    serde_json::json!({"trace": {"trace_info": {"trace_id": id,
        "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment}},
        "request_time": "2024-01-01T00:00:00Z", "state": "OK"}}})
}

fn start_trace(addr: SocketAddr, experiment: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let mut hs = vec![("content-type", "application/json")];
    hs.extend_from_slice(headers);
    let (s, b) = support::http(
        "POST",
        addr,
        "/api/3.0/mlflow/traces",
        &hs,
        trace_body(experiment).to_string().as_bytes(),
    );
    (s, serde_json::from_slice(&b).unwrap_or_default())
}

struct Gate {
    _proc: Proc,
    addr: SocketAddr,
    auth: String,
}

/// Starts a gate in front of the shared MLflow; `permissions` is the YAML file's content (None: no
/// file). Members: groups mlflow and mlflow-readers; the caller is `reader` (mlflow-readers).
fn gate(permissions: Option<&str>) -> Gate {
    let w = world();
    let mut cmd = Command::new(support::bin());
    cmd.arg("gate")
        .env("NO_COLOR", "1")
        .env("OIDC_DISCOVERY_URL", w.provider.discovery_url())
        .env("OIDC_CLIENT_ID", oidc::CLIENT_ID)
        .env("OIDC_CLIENT_SECRET", oidc::CLIENT_SECRET)
        .env("SECRET_KEY", "a test secret key that is long enough")
        .env("GATE_LISTEN", "127.0.0.1:0")
        // Gates of parallel tests must not share the default admin port.
        .env("GATE_ADMIN_LISTEN", "off")
        .env("GATE_ALLOWED_HOSTS", "127.0.0.1")
        .env("GATE_UPSTREAM", w.mlflow.url())
        .env("OIDC_GROUP_NAME", "mlflow,mlflow-readers")
        .env("OTLP_RELAY_LOG", "info");
    if let Some(p) = permissions {
        let path = w.dir.path().join(format!("perms-{}.yaml", rand::random::<u64>()));
        std::fs::write(&path, p).unwrap();
        cmd.env("GATE_PERMISSIONS_FILE", &path);
    }
    let mut proc = Proc::spawn("gate", cmd);
    let addr = proc.wait_listen("gate", Duration::from_secs(20));
    wait_for("gate discovery", Duration::from_secs(20), || {
        let (s, b) = support::http("GET", addr, "/gate/healthz", &[], b"");
        (s == 200 && String::from_utf8_lossy(&b).contains("\"oidc_ready\":true")).then_some(())
    });
    let token = w.provider.access_token(oidc::READER.0, oidc::READER.1);
    Gate {
        _proc: proc,
        addr,
        auth: format!("Bearer {token}"),
    }
}

fn edit_on_a() -> Gate {
    gate(Some(&format!(
        "groups:\n  mlflow-readers:\n    \"{}\": EDIT\n",
        world().a.id
    )))
}
fn read_on_a() -> Gate {
    gate(Some(&format!(
        "groups:\n  mlflow-readers:\n    \"{}\": READ\n",
        world().a.id
    )))
}

impl Gate {
    /// (status, body) of a request as the member.
    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut hs = vec![("authorization", self.auth.as_str())];
        hs.extend_from_slice(headers);
        let (s, b) = support::http(method, self.addr, path, &hs, body);
        (s, String::from_utf8_lossy(&b).to_string())
    }
    fn json(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
        let mut hs = vec![("content-type", "application/json")];
        hs.extend_from_slice(headers);
        self.call(method, path, &hs, body.as_bytes())
    }
}

/// Refused: 400 (ambiguous) or 403 (not allowed), never passed to MLflow.
fn assert_refused(what: &str, (s, b): (u16, String)) {
    assert!(s == 400 || s == 403, "{what}: expected 400/403, got {s}: {b}");
}

fn experiment_stage(id: &str) -> String {
    let (_, b) = support::http(
        "GET",
        world().mlflow.addr,
        &format!("/api/2.0/mlflow/experiments/get?experiment_id={id}"),
        &[],
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    v["experiment"]["lifecycle_stage"].as_str().unwrap().to_string()
}

fn run_stage(run: &str) -> String {
    let (_, b) = support::http(
        "GET",
        world().mlflow.addr,
        &format!("/api/2.0/mlflow/runs/get?run_id={run}"),
        &[],
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    v["run"]["info"]["lifecycle_stage"].as_str().unwrap().to_string()
}

fn runs_in(experiment: &str) -> usize {
    let (_, v) = world().mlflow.post_json(
        "/api/2.0/mlflow/runs/search",
        &serde_json::json!({"experiment_ids": [experiment], "max_results": 1000}),
    );
    v["runs"].as_array().map_or(0, Vec::len)
}

// ---- Deletes as any member, even without a permissions file -------------------------------------

fn delete_experiment_via(path: &str) {
    let w = world();
    let victim = w.mlflow.create_experiment(&format!("victim-{}", rand::random::<u32>()));
    let g = gate(None);
    let body = format!(r#"{{"experiment_id": "{victim}"}}"#);
    assert_refused(path, g.json("POST", path, &[], &body));
    assert_eq!(experiment_stage(&victim), "active", "{path} deleted the experiment");
}

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

#[test]
fn otlp_with_a_second_experiment_header() {
    let w = world();
    let g = edit_on_a();
    let otlp = support::otlp::one_span_request("two-headers");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.a.id),
            ("x-mlflow-experiment-id", &w.b.id),
        ],
        &otlp,
    );
    assert_eq!(s, 400, "{b}");
    for bad in [
        format!("{},{}", w.a.id, w.b.id),
        format!(" {}", w.b.id),
        format!("0{}", w.a.id),
    ] {
        let (s, b) = g.call(
            "POST",
            "/v1/traces",
            &[
                ("content-type", "application/x-protobuf"),
                ("x-mlflow-experiment-id", &bad),
            ],
            &otlp,
        );
        assert!(s == 400 || s == 403, "{bad:?}: {s} {b}");
    }
}

/// An OTLP protobuf export with one span in the trace `trace_hex` (MLflow's `tr-<hex>`).
fn otlp_span_in(trace_hex: &str, name: &str) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: const_hex::decode(trace_hex).unwrap(),
                    span_id: rand::random::<[u8; 8]>().to_vec(),
                    name: name.into(),
                    start_time_unix_nano: 1_000,
                    end_time_unix_nano: 2_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn trace_has_span(trace: &str, name: &str) -> bool {
    let (_, b) = support::http(
        "GET",
        world().mlflow.addr,
        &format!("/ajax-api/3.0/mlflow/get-trace-artifact?request_id={trace}"),
        &[],
        b"",
    );
    String::from_utf8_lossy(&b).contains(name)
}

#[test]
fn otlp_spans_joining_a_trace_of_b() {
    // MLflow appends spans of an existing trace to it, whatever experiment the header names.
    let w = world();
    let g = edit_on_a();
    let hex = w.b.trace.trim_start_matches("tr-");
    let body = otlp_span_in(hex, "injected-into-b");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        &body,
    );
    assert_eq!(s, 403, "{b}");
    assert!(b.contains(&format!("experiment {}", w.b.id)), "{b}");
    assert!(!trace_has_span(&w.b.trace, "injected-into-b"));
    // The same, gzip-compressed.
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("content-encoding", "gzip"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        &support::gzip(&body),
    );
    assert_eq!(s, 403, "{b}");
    // OTLP/JSON cannot be checked the same way: refused for writers with per-experiment rules.
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/json"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        br#"{"resourceSpans": []}"#,
    );
    assert_eq!(s, 400, "{b}");
    // Spans of A's own traces, and of new traces, go in.
    let hex_a = w.a.trace.trim_start_matches("tr-");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        &otlp_span_in(hex_a, "more-for-a"),
    );
    assert_eq!(s, 200, "{b}");
    assert!(trace_has_span(&w.a.trace, "more-for-a"));
}

/// Variants found in review: ids MLflow reads as B's trace, a second gzip member, the span
/// attributes that set where a trace's data is read from, and the run the traces are linked to.
#[test]
fn otlp_variants_reaching_b() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use prost::Message;
    let w = world();
    let g = edit_on_a();
    let post = |headers: &[(&str, &str)], body: &[u8]| {
        let mut all = vec![
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", w.a.id.as_str()),
        ];
        all.extend_from_slice(headers);
        g.call("POST", "/v1/traces", &all, body)
    };
    let hex_b = w.b.trace.trim_start_matches("tr-");
    // 17 bytes with a leading zero: MLflow reads the id as a number, which is B's trace.
    let (s, b) = post(&[], &otlp_span_in(&format!("00{hex_b}"), "b-by-17-bytes"));
    assert_eq!(s, 400, "{b}");
    assert!(!trace_has_span(&w.b.trace, "b-by-17-bytes"));
    // Two gzip members: a new trace first, B's trace in the second.
    let fresh = const_hex::encode(rand::random::<[u8; 16]>());
    let body = [
        support::gzip(&otlp_span_in(&fresh, "decoy")),
        support::gzip(&otlp_span_in(hex_b, "b-by-second-member")),
    ]
    .concat();
    let (s, b) = post(&[("content-encoding", "gzip")], &body);
    assert_eq!(s, 403, "{b}");
    assert!(!trace_has_span(&w.b.trace, "b-by-second-member"));
    // A new trace in A whose data would be read from B's.
    let mut tagged = ExportTraceServiceRequest::decode(otlp_span_in(&fresh, "pointer").as_slice()).unwrap();
    tagged.resource_spans[0].scope_spans[0].spans[0]
        .attributes
        .push(KeyValue {
            key: "mlflow.traceTag.mlflow.artifactLocation".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(format!(
                    "mlflow-artifacts:/{}/traces/{}/artifacts",
                    w.b.id, w.b.trace
                ))),
            }),
            ..Default::default()
        });
    let (s, b) = post(&[], &tagged.encode_to_vec());
    assert_eq!(s, 400, "{b}");
    // Traces linked to B's run: a write to B.
    let (s, b) = post(&[("x-mlflow-run-id", &w.b.run)], &otlp_span_in(&fresh, "linked-to-b"));
    assert_eq!(s, 403, "{b}");
    let own = const_hex::encode(rand::random::<[u8; 16]>());
    let (s, b) = post(&[("x-mlflow-run-id", &w.a.run)], &otlp_span_in(&own, "linked-to-a"));
    assert_eq!(s, 200, "{b}");
}

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

// ---- Route coverage --------------------------------------------------------------------------------

/// Prints every route of the app `mlflow server` runs (Flask url_map and the FastAPI routes in
/// front of it) as JSON.
const ROUTES_PY: &str = r#"
import json, os
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
from mlflow.server.fastapi_app import create_fastapi_app
from mlflow.server import app as flask_app
out = []
for r in flask_app.url_map.iter_rules():
    out.append({"rule": r.rule, "methods": sorted(m for m in r.methods if m not in ("HEAD", "OPTIONS"))})
def walk(routes):
    for r in routes:
        if callable(getattr(r, "effective_candidates", None)):
            walk(r.effective_candidates())
            walk(r.effective_low_priority_routes())
        elif type(r).__name__ == "Mount":
            continue
        elif getattr(r, "path", None) is not None:
            out.append({"rule": r.path, "methods": sorted(getattr(r, "methods", None) or [])})
        else:
            raise SystemExit("unknown route type " + type(r).__name__)
walk(create_fastapi_app(flask_app).routes)
print(json.dumps(out))
"#;

/// A concrete path for a route rule: `<x>`, `<path:x>`, `{x}`, `{x:path}` become sample segments.
fn sample_path(rule: &str) -> String {
    let mut out = String::new();
    for seg in rule.split('/').skip(1) {
        out.push('/');
        let seg = if (seg.starts_with('<') && seg.ends_with('>')) || (seg.starts_with('{') && seg.contains('}')) {
            let path_like = seg.contains("path");
            let tail = seg.split_once('}').map(|(_, t)| t).unwrap_or("");
            format!("{}{tail}", if path_like { "1/x/y" } else { "1" })
        } else {
            seg.to_string()
        };
        out.push_str(&seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[test]
fn every_mlflow_route_has_a_table_entry() {
    let venv = support::mlflow::mlflow_venv();
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", ROUTES_PY])
        .env("MLFLOW_TRACKING_URI", "")
        .current_dir(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let routes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(routes.len() > 300, "only {} routes found", routes.len());
    let mut missing = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &routes {
        let rule = r["rule"].as_str().unwrap();
        let path = sample_path(rule);
        let canon = otlp_relay::gate::canonical::path(&path).unwrap();
        for m in r["methods"].as_array().unwrap() {
            let m = m.as_str().unwrap();
            *seen.entry(m.to_string()).or_default() += 1;
            if otlp_relay::gate::routes::lookup(m, &canon.segments, canon.trailing_slash).is_none() {
                missing.push(format!("{m} {rule}"));
            }
        }
    }
    // FastAPI's one trailing-slash route (POST /ajax-api/3.0/jobs/) stays admin-only by having no
    // entry: the canonical path keeps the slash and nothing in the table matches it.
    missing.retain(|m| m != "POST /ajax-api/3.0/jobs/");
    assert!(
        missing.is_empty(),
        "MLflow routes without an entry in src/gate/routes.rs (decide each one's rule):\n{}",
        missing.join("\n")
    );
}

// ---- Latency ---------------------------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn measure_added_latency() {
    let w = world();
    let g = read_on_a();
    let paths = [
        format!("/api/2.0/mlflow/experiments/get?experiment_id={}", w.a.id),
        format!("/api/2.0/mlflow/runs/get?run_id={}", w.a.run),
    ];
    for path in &paths {
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        for i in 0..330 {
            let t = Instant::now();
            let (s, _) = support::http("GET", w.mlflow.addr, path, &[], b"");
            let d = t.elapsed();
            assert_eq!(s, 200);
            let t = Instant::now();
            let (s, b) = g.call("GET", path, &[], b"");
            let v = t.elapsed();
            assert_eq!(s, 200, "{b}");
            if i >= 30 {
                direct.push(d);
                via.push(v);
            }
        }
        direct.sort();
        via.sort();
        eprintln!(
            "MEASURE GET {path}: direct p50 {:?} p99 {:?}, via gate p50 {:?} p99 {:?} (added p50 {:?}, p99 {:?})",
            percentile(&direct, 0.5),
            percentile(&direct, 0.99),
            percentile(&via, 0.5),
            percentile(&via, 0.99),
            percentile(&via, 0.5).saturating_sub(percentile(&direct, 0.5)),
            percentile(&via, 0.99).saturating_sub(percentile(&direct, 0.99)),
        );
    }
}
