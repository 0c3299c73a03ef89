//! The gate's authorization against a real `mlflow server` and the real (Keycloak-shaped) OpenID
//! provider: every attack of issue 11 as its own test (each passed on the gate before canonical
//! requests and the route table), the legitimate paths, the route-coverage guard and the gate's
//! added latency. One provider and one MLflow serve all tests of this file (OnceLock); each test
//! starts the gate configuration it needs. The member is the `reader` service account (group
//! mlflow-readers, not admin); experiments A and B exist, with a run, a trace and a logged model
//! each.
#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::mlflow::Mlflow;
use support::oidc::{self, OidcOptions, OidcProvider};
use support::{Proc, wait_for};

mod coverage;
mod otlp;
mod path_tricks;
mod reads;
mod roles;

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
    let addr = proc.wait_listen("gate", support::STARTUP);
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
