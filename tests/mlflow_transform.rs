//! A transform sets `mlflow.spanType` from `gen_ai.operation.name` and a real `mlflow server`
//! shows that span type (read back with MLflow's own Python client), while a filter keeps the
//! agent's tool spans out.
mod support;

use std::process::Command;
use std::time::Duration;

use support::mlflow::Mlflow;
use support::otlp::{Relay, loadgen};

#[test]
fn mlflow_shows_the_span_type_a_transform_set() {
    let mlflow = Mlflow::start();
    let experiment = mlflow.create_experiment("relay-transform");
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
receivers: {{otlp: {{protocols: {{grpc: {{endpoint: "127.0.0.1:0"}}}}}}}}
processors:
  batch: {{send_batch_size: 100, timeout: 200ms}}
  transform:
    error_mode: ignore
    trace_statements:
      - delete_key(attributes, "mlflow.spanType")
      - set(attributes["mlflow.spanType"], "LLM") where attributes["gen_ai.operation.name"] == "chat"
  filter:
    traces: {{span: ['attributes["gen_ai.operation.name"] == "execute_tool"']}}
exporters:
  otlphttp/mlflow:
    endpoint: {url}
    headers: {{x-mlflow-experiment-id: "{experiment}"}}
    retry_on_failure: {{initial_interval: 200ms, max_interval: 1s}}
service:
  pipelines: {{traces: {{receivers: [otlp], processors: [transform, filter, batch], exporters: [otlphttp/mlflow]}}}}
  telemetry: {{metrics: {{address: "127.0.0.1:0"}}}}
"#,
        url = mlflow.url()
    );
    let relay = Relay::start(dir.path(), &config, "otlp");
    let grpc = relay.grpc.unwrap().to_string();
    let (code, r) = loadgen(&[
        "--otlp-insecure",
        "--otlp-endpoint",
        &grpc,
        "--traces",
        "3",
        "--genai",
        "--seed",
        "21",
    ]);
    assert_eq!(code, 0, "{r}");
    support::wait_for("3 traces in MLflow", Duration::from_secs(60), || {
        (mlflow.search_traces(&experiment).len() >= 3).then_some(())
    });
    let script = format!(
        r#"
import json, mlflow
mlflow.set_tracking_uri("{url}")
traces = mlflow.search_traces(locations=["{experiment}"], return_type="list")
print(json.dumps([[s.name, s.span_type, s.attributes.get("gen_ai.operation.name")] for t in traces for s in t.data.spans]))
"#,
        url = mlflow.url()
    );
    let out = Command::new(mlflow.python()).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spans: Vec<(String, Option<String>, Option<String>)> =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap()).unwrap();
    let chats: Vec<_> = spans.iter().filter(|s| s.2.as_deref() == Some("chat")).collect();
    assert!(!chats.is_empty(), "{spans:#?}");
    assert!(chats.iter().all(|s| s.1.as_deref() == Some("LLM")), "{spans:#?}");
    assert!(
        spans.iter().all(|s| s.2.as_deref() != Some("execute_tool")),
        "tool spans were filtered: {spans:#?}"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.2.as_deref() != Some("chat"))
            .all(|s| s.1.as_deref() != Some("LLM")),
        "{spans:#?}"
    );
}
