//! The relay against a real `mlflow server` (pip, SQLite, venv cached under target/): spans sent
//! by the load generator are stored in the experiment named by the header and found by search.
mod support;

use std::time::Duration;

use support::mlflow::Mlflow;
use support::otlp::{Relay, loadgen};

#[test]
fn relay_delivers_traces_to_mlflow() {
    let mlflow = Mlflow::start();
    let experiment = mlflow.create_experiment("relay-e2e");
    let routed = mlflow.create_experiment("relay-e2e-routed");
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
receivers: {{otlp: {{protocols: {{grpc: {{endpoint: "127.0.0.1:0"}}, http: {{endpoint: "127.0.0.1:0"}}}}}}}}
processors: {{batch: {{send_batch_size: 100, timeout: 200ms}}}}
exporters:
  otlphttp/mlflow:
    endpoint: {url}
    headers: {{x-mlflow-experiment-id: "{experiment}"}}
    retry_on_failure: {{initial_interval: 200ms, max_interval: 1s}}
service:
  pipelines: {{traces: {{receivers: [otlp], processors: [batch], exporters: [otlphttp/mlflow]}}}}
  telemetry: {{metrics: {{address: "127.0.0.1:0"}}}}
"#,
        url = mlflow.url()
    );
    let relay = Relay::start(dir.path(), &config, "otlp");
    let grpc = relay.grpc.unwrap().to_string();
    let http_ep = relay.http.unwrap().to_string();
    let (code, r) = loadgen(&[
        "--otlp-insecure",
        "--otlp-endpoint",
        &grpc,
        "--traces",
        "6",
        "--child-spans",
        "2",
        "--genai",
        "--seed",
        "11",
    ]);
    assert_eq!(code, 0, "{r}");
    let attr = format!("mlflow.experiment_id=\"{routed}\"");
    let (code, r) = loadgen(&[
        "--otlp-insecure",
        "--otlp-http",
        "--otlp-endpoint",
        &http_ep,
        "--traces",
        "4",
        "--child-spans",
        "1",
        "--seed",
        "12",
        "--otlp-attributes",
        &attr,
    ]);
    assert_eq!(code, 0, "{r}");
    let traces = support::wait_for("6 traces in MLflow", Duration::from_secs(60), || {
        let t = mlflow.search_traces(&experiment);
        (t.len() >= 6).then_some(t)
    });
    assert_eq!(traces.len(), 6, "{traces:#?}");
    let routed_traces = support::wait_for("4 routed traces in MLflow", Duration::from_secs(60), || {
        let t = mlflow.search_traces(&routed);
        (t.len() >= 4).then_some(t)
    });
    assert_eq!(routed_traces.len(), 4);
    assert_eq!(
        relay.metric("otelcol_exporter_send_failed_spans_total", &[]),
        0.0,
        "{}",
        relay.proc.output_text()
    );
}
