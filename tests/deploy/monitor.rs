//! The chart's ServiceMonitor (`metrics.serviceMonitor`) and PodMonitor (`metrics.podMonitor`):
//! off by default; when on each validates against the Prometheus Operator's CRD schema and
//! scrapes the relay's metrics port (through its Service, or on its pods), and not both at once.
use serde_norway::Value;

use super::tools::{Check, MODES, Render, VALUE_SETS, at, component, kind, parse_docs, run_validator};

fn monitors(docs: &[Value]) -> Vec<&Value> {
    of_kind(docs, "ServiceMonitor")
}

fn of_kind<'a>(docs: &'a [Value], wanted: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == wanted).collect()
}

/// Whether every label of `selector` is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (Some(selector), Some(labels)) = (selector.as_mapping(), labels.as_mapping()) else {
        return false;
    };
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The chart with `metrics.<monitor>` on, labelled for a kube-prometheus-stack release.
fn monitor_enabled(monitor: &str, set: &str, mode: &str, istio: bool) -> Render {
    Render::new(set, mode, istio)
        .set(&format!("metrics.{monitor}.enabled"), "true")
        .set(&format!("metrics.{monitor}.labels.release"), "kube-prometheus-stack")
        .set(&format!("metrics.{monitor}.scrapeTimeout"), "10s")
}

fn enabled(set: &str, mode: &str, istio: bool) -> Render {
    monitor_enabled("serviceMonitor", set, mode, istio)
}

/// Every combination of value set, mode and Istio, with its label for messages.
fn each_render(mut check: impl FnMut(&str, &str, &str, bool)) {
    for set in VALUE_SETS {
        for mode in MODES {
            for istio in [true, false] {
                check(&format!("{set}-{mode}-istio_{istio}"), set, mode, istio);
            }
        }
    }
}

/// The port named `name` of a workload's first container.
fn container_port(workload: &Value, name: &str) -> Option<Option<u64>> {
    at(workload, "spec.template.spec.containers.0.ports")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| at(p, "name").as_str() == Some(name))
        .map(|p| at(p, "containerPort").as_u64())
}

#[test]
fn service_monitor_is_off_by_default_and_scrapes_the_relay_metrics_port() {
    let dir = tempfile::tempdir().unwrap();
    each_render(|label, set, mode, istio| {
        let off = Render::new(set, mode, istio).docs();
        assert!(monitors(&off).is_empty(), "{label}: a ServiceMonitor by default");

        let text = enabled(set, mode, istio).text();
        let docs = parse_docs(&text);
        let found = monitors(&docs);
        assert_eq!(found.len(), 1, "{label}");
        let sm = found[0];
        assert_eq!(
            at(sm, "metadata.labels.release").as_str(),
            Some("kube-prometheus-stack")
        );
        let selector = at(sm, "spec.selector.matchLabels");
        // The relay's Services (the spool's headless one too), nothing else.
        let services: Vec<&Value> = docs
            .iter()
            .filter(|d| kind(d) == "Service" && selects(selector, at(d, "metadata.labels")))
            .collect();
        assert!(!services.is_empty(), "{label}: the selector matches no Service");
        let endpoint = at(sm, "spec.endpoints.0");
        let port = at(endpoint, "port").as_str().unwrap();
        assert_eq!(at(endpoint, "path").as_str(), Some("/metrics"));
        // Exactly one matched Service has the port: no target is scraped twice.
        let with_port: Vec<&Value> = services
            .iter()
            .copied()
            .filter(|s| {
                at(s, "spec.ports")
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|p| at(p, "name").as_str() == Some(port))
            })
            .collect();
        assert_eq!(
            with_port.len(),
            1,
            "{label}: port {port} on {} Services",
            with_port.len()
        );
        let target = at(with_port[0], "spec.ports")
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| at(p, "name").as_str() == Some(port))
            .map(|p| at(p, "targetPort").as_str().unwrap().to_string())
            .unwrap();
        assert_eq!(target, "metrics", "{label}");
        // The pods behind the Service serve that container port: 8888, the relay's metrics.
        let pods = docs
            .iter()
            .find(|d| ["Deployment", "StatefulSet"].contains(&kind(d)) && component(d) == "relay")
            .expect("relay workload");
        let container_port = container_port(pods, "metrics").expect("a metrics container port");
        assert_eq!(container_port, Some(8888));
        assert!(
            selects(selector, at(pods, "spec.template.metadata.labels")),
            "{label}: the Service's pods"
        );

        passes_schema_and_lint(dir.path(), label, &text, enabled(set, mode, istio));
    });
}

/// The CRD schema check is not vacuous for the ServiceMonitor, and values are checked.
#[test]
fn service_monitor_mistakes_are_refused() {
    refuses_unknown_fields_and_bad_intervals("ServiceMonitor", enabled("migrate", "token", false), "serviceMonitor");
}

fn pod_monitor_enabled(set: &str, mode: &str, istio: bool) -> Render {
    monitor_enabled("podMonitor", set, mode, istio).set("metrics.podMonitor.interval", "15s")
}

#[test]
fn pod_monitor_is_off_by_default_and_scrapes_the_relay_pods_metrics_port() {
    let dir = tempfile::tempdir().unwrap();
    each_render(|label, set, mode, istio| {
        let off = Render::new(set, mode, istio).docs();
        assert!(
            of_kind(&off, "PodMonitor").is_empty(),
            "{label}: a PodMonitor by default"
        );

        let text = pod_monitor_enabled(set, mode, istio).text();
        let docs = parse_docs(&text);
        assert!(
            monitors(&docs).is_empty(),
            "{label}: a ServiceMonitor beside the PodMonitor"
        );
        let found = of_kind(&docs, "PodMonitor");
        assert_eq!(found.len(), 1, "{label}");
        let pm = found[0];
        assert_eq!(
            at(pm, "metadata.labels.release").as_str(),
            Some("kube-prometheus-stack")
        );
        let endpoint = at(pm, "spec.podMetricsEndpoints.0");
        assert_eq!(at(endpoint, "path").as_str(), Some("/metrics"));
        assert_eq!(at(endpoint, "interval").as_str(), Some("15s"));
        assert_eq!(at(endpoint, "scrapeTimeout").as_str(), Some("10s"));
        // The relay's pods, and no other workload's (gate, MLflow, PostgreSQL).
        let selector = at(pm, "spec.selector.matchLabels");
        let selected: Vec<&Value> = docs
            .iter()
            .filter(|d| {
                ["Deployment", "StatefulSet", "DaemonSet"].contains(&kind(d))
                    && selects(selector, at(d, "spec.template.metadata.labels"))
            })
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "{label}: the selector matches {} workloads",
            selected.len()
        );
        assert_eq!(component(selected[0]), "relay", "{label}");
        // The port it names is the relay container's metrics port, 8888.
        let port = at(endpoint, "port").as_str().unwrap();
        assert_eq!(
            container_port(selected[0], port),
            Some(Some(8888)),
            "{label}: port {port}"
        );

        passes_schema_and_lint(dir.path(), label, &text, pod_monitor_enabled(set, mode, istio));
    });
}

/// The CRD schema check is not vacuous for the PodMonitor, values are checked, and the two
/// monitors are not rendered together (every pod would be scraped twice).
#[test]
fn pod_monitor_mistakes_are_refused() {
    refuses_unknown_fields_and_bad_intervals(
        "PodMonitor",
        pod_monitor_enabled("migrate", "token", false),
        "podMonitor",
    );

    let err = pod_monitor_enabled("migrate", "token", false)
        .set("metrics.serviceMonitor.enabled", "true")
        .try_text()
        .expect_err("both monitors at once");
    assert!(err.contains("scraped twice"), "{err}");
}

/// The rendered monitor passes its CRD schema, and the chart with these values passes helm lint.
fn passes_schema_and_lint(dir: &std::path::Path, label: &str, text: &str, render: Render) {
    let file = crate::support::write_file(dir, &format!("{label}.yaml"), text);
    let (ok, out) = run_validator(Check::Schema, &file);
    assert!(ok, "{label}: schema check:\n{out}");
    let lint = render.lint();
    assert!(
        lint.status.success(),
        "{label}: helm lint:\n{}",
        String::from_utf8_lossy(&lint.stdout)
    );
}

/// The CRD schema check of `kind` is not vacuous (an unknown endpoint field fails it), and the
/// chart refuses an interval that is no duration.
fn refuses_unknown_fields_and_bad_intervals(kind: &str, render: Render, values_key: &str) {
    let dir = tempfile::tempdir().unwrap();
    let text = render.text();
    let broken = text.replacen("      scheme: http", "      scheme: http\n      scrapez: 1", 1);
    assert_ne!(broken, text, "the mutation did not apply");
    let file = crate::support::write_file(dir.path(), "broken.yaml", &broken);
    let (ok, out) = run_validator(Check::Schema, &file);
    assert!(!ok, "an unknown {kind} endpoint field passed the schema check:\n{out}");

    let err = Render::new("migrate", "token", false)
        .set(&format!("metrics.{values_key}.interval"), "soon")
        .try_text()
        .expect_err("an interval that is no duration");
    assert!(err.contains("interval"), "{err}");
}
