//! The relay workload's contract: names, probes, security context, HPA/PDB, spool.

use super::*;

fn seconds(v: &Value) -> u64 {
    let s = v.as_str().expect("duration string");
    s.strip_suffix('s').expect("duration in seconds").parse().unwrap()
}

#[test]
fn relay_workload_contract() {
    for mode in MODES {
        relay_workload_in_mode(mode);
    }
    autoscaling_and_pdb_can_be_turned_off();
    spool_makes_a_statefulset_with_a_pvc_and_receiver_mtls();
}

/// Service, probes, security context, drain time, HPA/PDB, credentials and exporters of one mode.
fn relay_workload_in_mode(mode: &str) {
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

/// Toggles: HPA and PDB off.
fn autoscaling_and_pdb_can_be_turned_off() {
    let docs = Render::new("migrate", "token", true)
        .set("relay.autoscaling.enabled", "false")
        .set("relay.pdb.enabled", "false")
        .docs();
    assert!(find(&docs, "HorizontalPodAutoscaler", "relay").is_none());
    assert!(find(&docs, "PodDisruptionBudget", "relay").is_none());
    assert_eq!(at(one(&docs, "Deployment", "relay"), "spec.replicas").as_u64(), Some(2));
}

/// Spool on -> StatefulSet + PVC + headless Service; receiver mTLS.
fn spool_makes_a_statefulset_with_a_pvc_and_receiver_mtls() {
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
