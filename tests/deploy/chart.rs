//! The chart renders and validates for every mode and value set, refuses unsafe values and keeps
//! the seed values working.

use super::*;

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
