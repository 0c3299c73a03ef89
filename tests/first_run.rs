//! A first run as a new user meets it: MLflow not started yet. The log says where spans go,
//! retry warnings name the URL and ask whether MLflow runs there, a line says when delivery
//! works again, and an experiment header the receiver ignores is pointed out once.
mod support;

use std::time::Duration;

use support::otlp::{Relay, one_span_request};
use support::{Proc, http, restartable_port, wait_for};

const T: Duration = Duration::from_secs(30);

#[test]
fn the_log_explains_where_spans_go_and_why_they_wait() {
    let dir = tempfile::tempdir().unwrap();
    let port = restartable_port();
    let config = format!(
        r#"
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:0"}}
processors:
  batch: {{timeout: 20ms}}
exporters:
  otlphttp/mlflow:
    endpoint: http://127.0.0.1:{port}
    headers: {{x-mlflow-experiment-id: "7"}}
    retry_on_failure: {{initial_interval: 50ms, max_interval: 200ms}}
service:
  pipelines: {{traces: {{receivers: [otlp], processors: [batch], exporters: [otlphttp/mlflow]}}}}
  telemetry: {{metrics: {{address: "127.0.0.1:0"}}}}
"#
    );
    let mut relay = Relay::start(dir.path(), &config, "otlp");
    let url = format!("http://127.0.0.1:{port}/v1/traces");
    let start = relay.proc.wait_line("spans go here", T);
    for part in [format!("url={url}"), "experiment=7".into(), "auth=none (direct)".into()] {
        assert!(start.contains(&part), "{part} in {start}");
    }

    let addr = relay.http.unwrap();
    let post = |headers: &[(&str, &str)]| {
        let mut all = vec![("content-type", "application/x-protobuf")];
        all.extend_from_slice(headers);
        http("POST", addr, "/v1/traces", &all, &one_span_request("first")).0
    };
    // The header is ignored (include_metadata is off): one warning however often it comes.
    for _ in 0..3 {
        assert_eq!(post(&[("x-mlflow-experiment-id", "12")]), 200);
    }
    let retry = relay.proc.wait_line("export failed; will retry", T);
    assert!(retry.contains(&format!("url={url}")), "{retry}");
    assert!(retry.contains("is MLflow (or the gate) running there?"), "{retry}");
    let ignored: Vec<String> = relay
        .proc
        .output()
        .into_iter()
        .filter(|l| l.contains("x-mlflow-workspace, which is ignored"))
        .collect();
    assert_eq!(ignored.len(), 1, "{ignored:?}");
    assert!(ignored[0].contains("include_metadata: true"), "{ignored:?}");

    // MLflow comes up (a sink on its port): delivery resumes and the log says so.
    let mut sink = Proc::relay("sink", &["sink", "--listen", &format!("127.0.0.1:{port}")]);
    let sink_addr = sink.wait_listen("sink-http", T);
    let again = relay.proc.wait_line("delivery works again", T);
    assert!(again.contains(&format!("url={url}")), "{again}");
    wait_for("the span at the sink", T, || {
        (support::otlp::stats(sink_addr)["unique_spans"] == 1).then_some(())
    });
}

/// `token` on a config without an oauth2client says so instead of asking to choose among none.
#[test]
fn token_without_an_extension_says_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_file(
        dir.path(),
        "config.yaml",
        r#"
receivers: {otlp: {protocols: {http: {endpoint: "127.0.0.1:0"}}}}
exporters: {otlphttp/mlflow: {endpoint: "http://127.0.0.1:5000"}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [otlphttp/mlflow]}}}
"#,
    );
    let mut p = Proc::relay("token", &["token", "--config", config.to_str().unwrap()]);
    assert_eq!(p.wait_exit(T), Some(64));
    assert!(
        p.output_text().contains("no oauth2client extension is defined"),
        "{}",
        p.output_text()
    );
}

/// A sink that cannot bind names the address and the flag.
#[test]
fn sink_bind_errors_name_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut p = Proc::relay("sink", &["sink", "--listen", &addr]);
    assert_eq!(p.wait_exit(T), Some(1));
    assert!(
        p.output_text().contains(&format!("--listen: cannot listen on {addr}")),
        "{}",
        p.output_text()
    );
}
