//! OTLP through the gate: spans for a second experiment or joining a trace of B are refused.

use super::*;

#[test]
fn otlp_with_a_second_experiment_header() {
    let w = world();
    let g = edit_on_a();
    let otlp = support::otlp::one_span_request("two-headers");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.a.id),
            ("x-mlflow-experiment-id", &w.b.id),
        ],
        &otlp,
    );
    assert_eq!(s, 400, "{b}");
    for bad in [
        format!("{},{}", w.a.id, w.b.id),
        format!(" {}", w.b.id),
        format!("0{}", w.a.id),
    ] {
        let (s, b) = g.call(
            "POST",
            "/v1/traces",
            &[
                ("content-type", "application/x-protobuf"),
                ("x-mlflow-experiment-id", &bad),
            ],
            &otlp,
        );
        assert!(s == 400 || s == 403, "{bad:?}: {s} {b}");
    }
}

/// An OTLP protobuf export with one span in the trace `trace_hex` (MLflow's `tr-<hex>`).
fn otlp_span_in(trace_hex: &str, name: &str) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: const_hex::decode(trace_hex).unwrap(),
                    span_id: rand::random::<[u8; 8]>().to_vec(),
                    name: name.into(),
                    start_time_unix_nano: 1_000,
                    end_time_unix_nano: 2_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn trace_has_span(trace: &str, name: &str) -> bool {
    let (_, b) = support::http(
        "GET",
        world().mlflow.addr,
        &format!("/ajax-api/3.0/mlflow/get-trace-artifact?request_id={trace}"),
        &[],
        b"",
    );
    String::from_utf8_lossy(&b).contains(name)
}

#[test]
fn otlp_spans_joining_a_trace_of_b() {
    // MLflow appends spans of an existing trace to it, whatever experiment the header names.
    let w = world();
    let g = edit_on_a();
    let hex = w.b.trace.trim_start_matches("tr-");
    let body = otlp_span_in(hex, "injected-into-b");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        &body,
    );
    assert_eq!(s, 403, "{b}");
    assert!(b.contains(&format!("experiment {}", w.b.id)), "{b}");
    assert!(!trace_has_span(&w.b.trace, "injected-into-b"));
    // The same, gzip-compressed.
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("content-encoding", "gzip"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        &support::gzip(&body),
    );
    assert_eq!(s, 403, "{b}");
    // OTLP/JSON cannot be checked the same way: refused for writers with per-experiment rules.
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/json"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        br#"{"resourceSpans": []}"#,
    );
    assert_eq!(s, 400, "{b}");
    // Spans of A's own traces, and of new traces, go in.
    let hex_a = w.a.trace.trim_start_matches("tr-");
    let (s, b) = g.call(
        "POST",
        "/v1/traces",
        &[
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", &w.a.id),
        ],
        &otlp_span_in(hex_a, "more-for-a"),
    );
    assert_eq!(s, 200, "{b}");
    assert!(trace_has_span(&w.a.trace, "more-for-a"));
}

/// Variants found in review: ids MLflow reads as B's trace, a second gzip member, the span
/// attributes that set where a trace's data is read from, and the run the traces are linked to.
#[test]
fn otlp_variants_reaching_b() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use prost::Message;
    let w = world();
    let g = edit_on_a();
    let post = |headers: &[(&str, &str)], body: &[u8]| {
        let mut all = vec![
            ("content-type", "application/x-protobuf"),
            ("x-mlflow-experiment-id", w.a.id.as_str()),
        ];
        all.extend_from_slice(headers);
        g.call("POST", "/v1/traces", &all, body)
    };
    let hex_b = w.b.trace.trim_start_matches("tr-");
    // 17 bytes with a leading zero: MLflow reads the id as a number, which is B's trace.
    let (s, b) = post(&[], &otlp_span_in(&format!("00{hex_b}"), "b-by-17-bytes"));
    assert_eq!(s, 400, "{b}");
    assert!(!trace_has_span(&w.b.trace, "b-by-17-bytes"));
    // Two gzip members: a new trace first, B's trace in the second.
    let fresh = const_hex::encode(rand::random::<[u8; 16]>());
    let body = [
        support::gzip(&otlp_span_in(&fresh, "decoy")),
        support::gzip(&otlp_span_in(hex_b, "b-by-second-member")),
    ]
    .concat();
    let (s, b) = post(&[("content-encoding", "gzip")], &body);
    assert_eq!(s, 403, "{b}");
    assert!(!trace_has_span(&w.b.trace, "b-by-second-member"));
    // A new trace in A whose data would be read from B's.
    let mut tagged = ExportTraceServiceRequest::decode(otlp_span_in(&fresh, "pointer").as_slice()).unwrap();
    tagged.resource_spans[0].scope_spans[0].spans[0]
        .attributes
        .push(KeyValue {
            key: "mlflow.traceTag.mlflow.artifactLocation".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(format!(
                    "mlflow-artifacts:/{}/traces/{}/artifacts",
                    w.b.id, w.b.trace
                ))),
            }),
            ..Default::default()
        });
    let (s, b) = post(&[], &tagged.encode_to_vec());
    assert_eq!(s, 400, "{b}");
    // Traces linked to B's run: a write to B.
    let (s, b) = post(&[("x-mlflow-run-id", &w.b.run)], &otlp_span_in(&fresh, "linked-to-b"));
    assert_eq!(s, 403, "{b}");
    let own = const_hex::encode(rand::random::<[u8; 16]>());
    let (s, b) = post(&[("x-mlflow-run-id", &w.a.run)], &otlp_span_in(&own, "linked-to-a"));
    assert_eq!(s, 200, "{b}");
}
