//! The rendered AuthorizationPolicies evaluated under a model of Istio's ALLOW semantics.

use super::*;

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
