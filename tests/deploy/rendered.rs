//! The rendered relay config and gate environment are accepted by the binaries themselves, and
//! the rendered relay runs and answers its probes.

use super::*;

/// Calls `f(key, path)` on every `*_file` and `directory` setting of a config; `f` returns the
/// value to put in its place.
fn map_config_paths(v: &mut Value, f: &mut dyn FnMut(&str, &str) -> String) {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                let key = k.as_str().unwrap_or_default().to_string();
                match val.as_str() {
                    Some(path) if key.ends_with("_file") || key == "directory" => *val = Value::from(f(&key, path)),
                    _ => map_config_paths(val, f),
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|i| map_config_paths(i, f)),
        _ => {}
    }
}

/// Lays out under `root` what the relay pod sees: each file or directory the rendered config
/// names must lie on a volume the rendered relay container mounts (Secret files get rcgen
/// certificates, the CA bundle a CA); the config's paths are then moved under `root`.
fn pod_filesystem(root: &std::path::Path, docs: &[Value]) -> std::path::PathBuf {
    let workload = docs
        .iter()
        .find(|d| ["Deployment", "StatefulSet"].contains(&tools::kind(d)) && tools::component(d) == "relay")
        .expect("relay workload");
    let mounts: Vec<String> = at(workload, "spec.template.spec.containers.0.volumeMounts")
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|m| m.get("subPath").is_none())
        .map(|m| at(m, "mountPath").as_str().unwrap().to_string())
        .collect();
    let (_, mut config) = relay_config(docs);
    let ca = support::pki::Ca::new("agents-ca");
    let server = ca.server();
    map_config_paths(&mut config, &mut |key, path| {
        assert!(
            mounts.iter().any(|m| path.starts_with(&format!("{m}/")) || path == m),
            "config {key}: {path} is on no volume the relay mounts ({mounts:?})"
        );
        let local = root.join(path.trim_start_matches('/'));
        if key == "directory" {
            std::fs::create_dir_all(&local).unwrap();
        } else {
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            let pem = match key {
                "key_file" => &server.key_pem,
                "cert_file" => &server.cert_pem,
                _ => &ca.cert_pem, // client_ca_file, ca_file
            };
            std::fs::write(&local, pem).unwrap();
        }
        local.display().to_string()
    });
    support::write_file(root, "config.yaml", &serde_norway::to_string(&config).unwrap())
}

/// `otlp-relay check` on a config, with the Secret's variables set as in the pod.
fn relay_check(config: &std::path::Path) -> (bool, Vec<String>, String) {
    let out = std::process::Command::new(support::bin())
        .args(["check", "--config"])
        .arg(config)
        .env("OIDC_CLIENT_ID", "mlflow")
        .env("OIDC_CLIENT_SECRET", "not-a-secret")
        .env(
            "OIDC_TOKEN_URL",
            "http://keycloak-service.keycloak:8080/realms/master/protocol/openid-connect/token",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // One problem per indented line: "  path: message".
    let problems = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .map(str::to_string)
        .collect();
    (out.status.success(), problems, stderr)
}

/// Chart and binary cannot drift: the relay ConfigMap rendered for every mode passes `check`.
#[test]
fn rendered_relay_config_passes_otlp_relay_check() {
    for set in VALUE_SETS {
        for mode in MODES {
            let label = format!("{set}-{mode}");
            let root = tempfile::tempdir().unwrap();
            let docs = Render::new(set, mode, true).docs();
            let config = pod_filesystem(root.path(), &docs);
            let (ok, problems, out) = relay_check(&config);
            assert!(
                ok && problems.is_empty(),
                "otlp-relay check rejects the chart's {label} config:\n{out}\n---\n{}",
                std::fs::read_to_string(&config).unwrap()
            );
        }
    }
    // And without the spool.
    let root = tempfile::tempdir().unwrap();
    let docs = Render::new("full", "direct", true)
        .set("relay.spool.enabled", "false")
        .docs();
    let (ok, _, out) = relay_check(&pod_filesystem(root.path(), &docs));
    assert!(ok, "full direct config without spool:\n{out}");

    // Not vacuous: a misspelt key slipped in through configOverrides is caught, with its path.
    let root = tempfile::tempdir().unwrap();
    let docs = Render::new("migrate", "direct", true)
        .set("relay.configOverrides.exporters.otlphttp/mlflow-direct.timout", "5s")
        .docs();
    let (ok, problems, out) = relay_check(&pod_filesystem(root.path(), &docs));
    assert!(!ok, "check accepted an unknown key:\n{out}");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("exporters.otlphttp/mlflow-direct.timout")),
        "check names the bad key by its path:\n{out}"
    );
}

fn port_of(addr: &Value) -> u64 {
    addr.as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap()
}

/// The rendered relay config runs: its listen ports are the container ports the Deployment
/// declares, the probe paths it declares answer 200, a span sent to it reaches the exporter's
/// upstream with the rendered headers, the metrics the README names are served, and SIGTERM
/// drains and exits 0 well within the grace period. Only the bind addresses (to 127.0.0.1:0) and
/// the exporter's upstream (MLflow's Service, here a counting sink) change.
#[test]
fn rendered_relay_runs_and_answers_its_probes() {
    use std::time::{Duration, Instant};
    let root = tempfile::tempdir().unwrap();
    let docs = Render::new("migrate", "direct", true).docs();
    let pod = at(one(&docs, "Deployment", "relay"), "spec.template.spec");
    let c = at(pod, "containers.0");
    let container_port = |name: &str| -> u64 {
        at(c, "ports")
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .map(|p| at(p, "containerPort").as_u64().unwrap())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    let config_file = pod_filesystem(root.path(), &docs);
    let mut config: Value = serde_norway::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    let binds = [
        ("otlp-grpc", &["receivers", "otlp", "protocols", "grpc", "endpoint"][..]),
        ("otlp-http", &["receivers", "otlp", "protocols", "http", "endpoint"][..]),
        ("health", &["extensions", "health_check", "endpoint"][..]),
        ("metrics", &["service", "telemetry", "metrics", "address"][..]),
    ];
    for (port_name, path) in binds {
        let mut v = &mut config;
        for key in path {
            v = v
                .get_mut(*key)
                .unwrap_or_else(|| panic!("config has no {}", path.join(".")));
        }
        assert_eq!(
            port_of(v),
            container_port(port_name),
            "{} vs containerPort {port_name}",
            path.join(".")
        );
        *v = Value::from("127.0.0.1:0");
    }
    let mut sink = support::Proc::relay("sink", &["sink", "--listen", "127.0.0.1:0"]);
    let sink_addr = sink.wait_listen("sink-http", support::STARTUP);
    let exporter = config
        .get_mut("exporters")
        .and_then(|e| e.get_mut("otlphttp/mlflow-direct"))
        .expect("direct exporter");
    assert_eq!(
        at(exporter, "traces_endpoint").as_str(),
        Some("http://mlflow-server.kagenti-system.svc:5000/v1/traces")
    );
    exporter["endpoint"] = Value::from(format!("http://{sink_addr}"));
    exporter["traces_endpoint"] = Value::from(format!("http://{sink_addr}/v1/traces"));
    let config_file = support::write_file(root.path(), "config.yaml", &serde_norway::to_string(&config).unwrap());

    let mut relay = support::Proc::relay("relay", &["run", "--config", config_file.to_str().unwrap()]);
    let health = relay.wait_listen("health", support::STARTUP);
    let metrics = relay.wait_listen("metrics", support::STARTUP);
    relay.wait_listen("otlp-grpc", support::STARTUP);
    relay.wait_listen("otlp-http", support::STARTUP);
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = at(c, &format!("{probe}.httpGet.path")).as_str().unwrap().to_string();
        assert_eq!(at(c, &format!("{probe}.httpGet.port")).as_str(), Some("health"));
        support::wait_for(&format!("{probe} {path} = 200"), Duration::from_secs(20), || {
            (support::get_text(health, &path).0 == 200).then_some(())
        });
    }
    let otlp_http = relay.wait_listen("otlp-http", Duration::from_secs(1));
    let (status, _) = support::http(
        "POST",
        otlp_http,
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &support::otlp::one_span_request("deploy-check"),
    );
    assert_eq!(status, 200);
    support::wait_for("the span at the sink", Duration::from_secs(20), || {
        let (_, stats) = support::get_text(sink_addr, "/stats");
        let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
        (v["spans"].as_u64() == Some(1)).then_some(())
    });
    support::wait_for("sent_spans = 1", Duration::from_secs(20), || {
        (support::metric(
            metrics,
            "otelcol_exporter_sent_spans_total",
            &[("exporter", "otlphttp/mlflow-direct")],
        ) == 1.0)
            .then_some(())
    });
    let (status, body) = support::get_text(metrics, "/metrics");
    assert_eq!(status, 200);
    // Names deploy/README.md's troubleshooting relies on (the others appear once they count).
    for name in [
        "otelcol_receiver_accepted_spans",
        "otelcol_exporter_sent_spans",
        "otelcol_exporter_queue_size",
        "otelcol_exporter_queue_capacity",
    ] {
        assert!(body.contains(name), "{name} on /metrics:\n{body}");
    }

    let grace = at(pod, "terminationGracePeriodSeconds").as_u64().unwrap();
    let pre_stop = at(c, "lifecycle.preStop.sleep.seconds").as_u64().unwrap();
    let started = Instant::now();
    relay.signal("TERM");
    let code = relay.wait_exit(Duration::from_secs(grace - pre_stop));
    assert_eq!(code, Some(0), "{}", relay.output_text());
    eprintln!(
        "relay drained and exited in {:?} (budget {}s)",
        started.elapsed(),
        grace - pre_stop
    );
}

/// The rendered gate Deployment's environment, resolved as the kubelet would: plain values, the
/// chart's own Secrets decoded, external Secrets (`mlflow-oauth-secret`) with stand-in values, and
/// the permissions ConfigMap laid out under `root` at its mount path.
fn gate_env(root: &std::path::Path, docs: &[Value]) -> std::collections::BTreeMap<String, String> {
    use base64::Engine;
    let gate = one(docs, "Deployment", "gate");
    let c = at(gate, "spec.template.spec.containers.0");
    let mut env = std::collections::BTreeMap::new();
    for e in at(c, "env").as_sequence().unwrap() {
        let name = at(e, "name").as_str().unwrap().to_string();
        let value = if let Some(v) = e.get("value") {
            v.as_str().unwrap().to_string()
        } else {
            let secret = at(e, "valueFrom.secretKeyRef.name").as_str().unwrap();
            let key = at(e, "valueFrom.secretKeyRef.key").as_str().unwrap();
            match docs
                .iter()
                .find(|d| tools::kind(d) == "Secret" && tools::name(d) == secret)
            {
                Some(s) => {
                    let b64 = at(s, "data")
                        .get(key)
                        .and_then(Value::as_str)
                        .expect("key in the chart's Secret");
                    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
                }
                None => format!("stand-in-{key}"),
            }
        };
        env.insert(name, value);
    }
    if let Some(path) = env.get_mut("GATE_PERMISSIONS_FILE") {
        let cm = one(docs, "ConfigMap", "gate");
        let file = std::path::Path::new(path.as_str())
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let text = at(cm, "data")
            .get(file.as_str())
            .and_then(Value::as_str)
            .expect("permissions in the ConfigMap");
        let local = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(&local, text).unwrap();
        *path = local.display().to_string();
    }
    env
}

/// The gate accepts the environment the chart gives it, and proxies to the MLflow Service.
#[test]
fn rendered_gate_env_is_a_valid_gate_config() {
    for set in VALUE_SETS {
        for mode in MODES {
            let root = tempfile::tempdir().unwrap();
            let docs = Render::new(set, mode, true).docs();
            let env = gate_env(root.path(), &docs);
            let cfg = otlp_relay::gate::config::from_env(|k| env.get(k).cloned()).unwrap_or_else(|p| {
                panic!(
                    "[{set} {mode}] the gate rejects the chart's env {:?}: {p:?}",
                    env.keys()
                )
            });
            let mlflow = one(&docs, "Service", "mlflow");
            assert_eq!(
                cfg.upstream.to_string().trim_end_matches('/'),
                format!("http://{}.{NAMESPACE}.svc:5000", tools::name(mlflow))
            );
            assert_eq!(cfg.listen.port(), 8080);
            assert!(cfg.secret_key.is_some(), "sessions survive restarts: SECRET_KEY is set");
            assert_eq!(cfg.permissions.is_some(), set == "full");
        }
    }
}
