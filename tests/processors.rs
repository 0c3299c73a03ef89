//! Processors through the relay: one receiver feeding a plain pipeline and one with transform,
//! filter, resource and attributes. The counting sink sees the plain copy whole, the processed
//! copy without the probe spans and in the experiment the transform routed it to; the debug
//! exporter's detailed lines show the edits on each span.
mod support;

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use serde_json::json;
use support::otlp::{Relay, Sink};
use support::{http, wait_for};

const T: Duration = Duration::from_secs(30);

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// An agent's trace: a root, a chat call, a tool call, and two health probes.
fn request() -> Vec<u8> {
    let span = |n: u8, name: &str, parent: bool, attrs: Vec<KeyValue>| Span {
        trace_id: vec![3; 16],
        span_id: vec![n; 8],
        parent_span_id: if parent { vec![1; 8] } else { Vec::new() },
        name: name.into(),
        attributes: attrs,
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "unknown_service")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![
                    span(1, "agent", false, vec![]),
                    span(2, "ChatOpenAI", true, vec![kv("gen_ai.operation.name", "chat")]),
                    span(3, "search", true, vec![kv("gen_ai.operation.name", "execute_tool")]),
                    span(4, "GET /v1/models", true, vec![]),
                    span(5, "GET /v1/models", true, vec![]),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn config(sink: &Sink) -> String {
    let exporter = |experiment: &str| {
        json!({"endpoint": sink.url(), "headers": {"x-mlflow-experiment-id": experiment},
               "retry_on_failure": {"initial_interval": "100ms"}})
    };
    let config = json!({
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:0"}}}},
        "processors": {
            "batch": {"timeout": "50ms"},
            "transform": {
                "error_mode": "ignore",
                "trace_statements": [
                    {"context": "resource", "statements": [
                        r#"set(attributes["service.name"], "support-agent") where attributes["service.name"] == "unknown_service""#,
                        r#"set(attributes["mlflow.experiment_id"], "5")"#,
                    ]},
                    r#"set(attributes["mlflow.spanType"], "CHAT_MODEL") where attributes["gen_ai.operation.name"] == "chat""#,
                    r#"set(span.attributes["mlflow.spanType"], "TOOL") where span.attributes["gen_ai.operation.name"] == "execute_tool""#,
                    {"context": "span", "conditions": ["IsRootSpan()"], "statements": [
                        r#"set(attributes["relay.role"], Concat(["root", resource.attributes["service.name"]], ":"))"#,
                    ]},
                ],
            },
            "filter/probes": {"error_mode": "ignore", "traces": {"span": [r#"name == "GET /v1/models""#]}},
            "resource": {"attributes": [{"key": "deployment.environment", "action": "upsert", "value": "test"}]},
            "attributes/chat": {
                "actions": [{"key": "relay.chat", "action": "insert", "value": true}],
                "include": {"match_type": "regexp", "span_names": ["^Chat"]},
            },
        },
        "exporters": {
            "otlphttp/plain": exporter("1"),
            "otlphttp/processed": exporter("2"),
            "debug": {"verbosity": "detailed"},
        },
        "service": {
            "pipelines": {
                "traces/plain": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["otlphttp/plain"]},
                "traces/processed": {
                    "receivers": ["otlp"],
                    "processors": ["transform", "filter/probes", "resource", "attributes/chat", "batch"],
                    "exporters": ["otlphttp/processed", "debug"],
                },
            },
            "telemetry": {"metrics": {"address": "127.0.0.1:0"}},
        },
    });
    serde_norway::to_string(&config).unwrap()
}

/// The debug exporter's detailed line of the span named `name`.
fn span_line(relay: &Relay, name: &str) -> String {
    let needle = format!("name: \\\"{name}\\\"");
    let plain = format!("name: \"{name}\"");
    wait_for(&format!("the debug line of span {name}"), T, || {
        relay
            .proc
            .output()
            .into_iter()
            .find(|l| l.contains("exporter=debug") && (l.contains(&needle) || l.contains(&plain)))
    })
}

#[test]
fn transform_filter_resource_and_attributes_edit_only_their_pipeline() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &config(&sink), "otlp");
    let addr = relay.http.unwrap();
    let (status, body) = http(
        "POST",
        addr,
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &request(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let stats = wait_for("both copies at the sink", T, || {
        let s = sink.stats();
        (s["experiments"]["1"].as_u64() == Some(5) && s["experiments"]["5"].as_u64() == Some(3)).then_some(s)
    });
    // The plain pipeline's copy is untouched; the processed one lost the two probes and was
    // routed by the experiment attribute the transform set on its resource.
    assert_eq!(stats["experiments"].get("2"), None, "{stats}");
    assert_eq!(
        relay.metric(
            "otelcol_processor_dropped_spans_total",
            &[("processor", "filter/probes")]
        ),
        2.0
    );

    let chat = span_line(&relay, "ChatOpenAI");
    assert!(
        chat.contains("mlflow.spanType") && chat.contains("CHAT_MODEL"),
        "{chat}"
    );
    assert!(chat.contains("relay.chat"), "attributes include matched: {chat}");
    assert!(!chat.contains("relay.role"), "not a root span: {chat}");
    let tool = span_line(&relay, "search");
    assert!(tool.contains("TOOL") && !tool.contains("relay.chat"), "{tool}");
    let root = span_line(&relay, "agent");
    assert!(
        root.contains("root:support-agent"),
        "root split, resource fixed first: {root}"
    );
    assert!(
        !relay
            .proc
            .output()
            .iter()
            .any(|l| l.contains("exporter=debug") && l.contains("GET /v1/models")),
        "probes were filtered"
    );
}

#[test]
fn a_config_with_bad_statements_is_refused_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
receivers: {otlp: {protocols: {http: {endpoint: "127.0.0.1:0"}}}}
processors:
  transform: {trace_statements: ['set(attributes["a"], "x" where']}
  filter: {traces: {span: ['IsRootSpan() and']}}
  resource: {attributes: [{key: a, action: upsert}]}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], processors: [transform, filter, resource], exporters: [debug]}}}
"#;
    let (code, text) = support::check_config(dir.path(), config);
    assert_eq!(code, Some(1), "{text}");
    for expected in [
        "processors.transform.trace_statements[0]: column",
        "processors.filter.traces.span[0]: column",
        "processors.resource.attributes[0].value:",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in {text}");
    }
}

/// redaction (resource attributes included), probabilistic_sampler (proportional, writing the
/// threshold into the tracestate) and attributes' from_context (a request header, with
/// include_metadata) through the relay.
#[test]
fn redaction_sampling_and_from_context_through_the_relay() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = json!({
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:0", "include_metadata": true}}}},
        "processors": {
            "batch": {"timeout": "50ms"},
            "redaction": {"allowed_keys": ["service.name", "gen_ai.operation.name"], "summary": "debug"},
            "probabilistic_sampler": {"sampling_percentage": 50, "mode": "proportional"},
            "attributes/tenant": {"actions": [{"key": "tenant", "action": "upsert", "from_context": "metadata.X-Tenant"}]},
        },
        "exporters": {
            "otlphttp/redacted": {"endpoint": sink.url(), "headers": {"x-mlflow-experiment-id": "2"},
                                  "retry_on_failure": {"initial_interval": "100ms"}},
            "debug": {"verbosity": "detailed"},
        },
        "service": {
            "pipelines": {
                "traces/redacted": {"receivers": ["otlp"], "processors": ["redaction", "batch"], "exporters": ["otlphttp/redacted"]},
                "traces/sampled": {"receivers": ["otlp"], "processors": ["probabilistic_sampler", "attributes/tenant", "batch"], "exporters": ["debug"]},
            },
            "telemetry": {"metrics": {"address": "127.0.0.1:0"}},
        },
    });
    let relay = Relay::start(dir.path(), &serde_norway::to_string(&config).unwrap(), "otlp");
    // Randomness is the trace id's last 7 bytes: 0xff.. passes 50%, 0x11.. does not.
    let span = |id: u8, randomness: u8, name: &str| Span {
        trace_id: [vec![id; 9], vec![randomness; 7]].concat(),
        span_id: vec![id; 8],
        name: name.into(),
        trace_state: "vendor=x".into(),
        attributes: vec![kv("gen_ai.operation.name", "chat"), kv("gen_ai.prompt", "secret plans")],
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", "agent"),
                    kv("mlflow.experiment_id", "7"),
                    kv("host.name", "laptop-of-alice"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![span(1, 0xff, "kept-by-sampler"), span(2, 0x11, "dropped-by-sampler")],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec();
    let (status, body) = http(
        "POST",
        relay.http.unwrap(),
        "/v1/traces",
        &[("content-type", "application/x-protobuf"), ("x-tenant", "acme")],
        &request,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The resource's mlflow.experiment_id is not an allowed key: redaction removed it, so the
    // spans go to the exporter's experiment, not to 7.
    let stats = wait_for("the redacted copy at the sink", T, || {
        let s = sink.stats();
        (s["experiments"]["2"].as_u64() == Some(2)).then_some(s)
    });
    assert_eq!(stats["experiments"].get("7"), None, "{stats}");

    let kept = span_line(&relay, "kept-by-sampler");
    assert!(
        kept.contains(r#"ot=th:8,vendor=x"#),
        "the threshold is recorded: {kept}"
    );
    assert!(kept.contains("tenant") && kept.contains("acme"), "from_context: {kept}");
    assert!(
        kept.contains("gen_ai.prompt"),
        "redaction is not in this pipeline: {kept}"
    );
    assert_eq!(
        relay.metric(
            "otelcol_processor_dropped_spans_total",
            &[("processor", "probabilistic_sampler")]
        ),
        1.0
    );
    assert!(
        !relay
            .proc
            .output()
            .iter()
            .any(|l| l.contains("exporter=debug") && l.contains("dropped-by-sampler")),
        "the sampler dropped the low-randomness span"
    );
}

/// `check` on a collector config using processors this relay lacks names each as unsupported,
/// with what to use instead, and points the pipeline's references at it.
#[test]
fn check_names_unsupported_processors_with_what_to_use_instead() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"
receivers: {otlp: {protocols: {http: {endpoint: "127.0.0.1:4318"}}}}
processors:
  batch: {}
  tail_sampling: {policies: [{name: errors, type: status_code, status_code: {status_codes: [ERROR]}}]}
  k8sattributes: {}
  spanmetrics: {}
exporters: {otlphttp: {endpoint: "http://mlflow:5000"}}
service: {pipelines: {traces: {receivers: [otlp], processors: [k8sattributes, tail_sampling, spanmetrics, batch], exporters: [otlphttp]}}}
"#;
    let (code, text) = support::check_config(dir.path(), config);
    assert_eq!(code, Some(1), "{text}");
    for expected in [
        "processors.tail_sampling: the \"tail_sampling\" processor is not supported by this relay; for a decision per whole trace by trace id use probabilistic_sampler",
        "processors.k8sattributes: the \"k8sattributes\" processor is not supported by this relay; set the resource attributes with the resource processor (values from ${env:VAR}",
        "processors.spanmetrics: the \"spanmetrics\" processor is not supported by this relay; this relay produces no metrics from spans",
        "service.pipelines.traces.processors[1]: \"tail_sampling\" is defined under processors but cannot be used: see processors.tail_sampling",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in {text}");
    }
    assert!(!text.contains("not defined"), "{text}");
}
