//! Every route of the installed MLflow has a table entry, and the latency the gate adds.

use super::*;

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
