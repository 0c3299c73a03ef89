//! Cross-check with Python's protobuf: what the relay accepts, the reference parser parses.

use super::*;

// ---------------------------------------------------------------------------------------------
// The walker against Python protobuf (upb), the parser MLflow runs

/// Every request the relay accepts from a corpus of generated, mutated and deep-nesting cases,
/// Python protobuf (upb) parses as well. The corpus also holds a request nested past upb's limit
/// (which the relay refuses) to show the harness sees a refusal.
#[test]
fn everything_the_relay_accepts_python_protobuf_parses() {
    let venv = support::python_venv("otlp-proto", &["protobuf", "opentelemetry-proto"]);
    let dir = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::new(Config {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x0b + seed_offset()),
        ..Config::default()
    });
    let strategy = case();
    let mut written = 0;
    let mut write = |body: &[u8]| {
        std::fs::write(dir.path().join(format!("{written:05}.bin")), body).unwrap();
        written += 1;
    };
    // Deep chains at every depth to past the limit, in each position.
    for body in deep_chains() {
        if wire::parse_protobuf(Bytes::from(body.clone())).is_ok() {
            write(&body);
        }
    }
    let mut generated = 0;
    while generated < 4000 {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        if case.json {
            continue;
        }
        let (plain, _) = render(&Case {
            compression: Compression::None,
            ..case
        });
        generated += 1;
        if wire::parse_protobuf(Bytes::from(plain.clone())).is_ok() {
            write(&plain);
        }
    }
    assert!(written > 1000, "{written} accepted cases");
    // Past upb's limit (see too_deep_control).
    let too_deep = too_deep_control();
    assert!(wire::parse_protobuf(Bytes::from(too_deep.clone())).is_err());
    std::fs::write(dir.path().join("control-too-deep.bin"), &too_deep).unwrap();
    let script = r#"
import os, sys
from google.protobuf.internal import api_implementation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
print("implementation", api_implementation.Type())
failed = []
for name in sorted(os.listdir(sys.argv[1])):
    data = open(os.path.join(sys.argv[1], name), "rb").read()
    try:
        ExportTraceServiceRequest.FromString(data)
    except Exception as e:
        failed.append(name + ": " + str(e)[:200])
for f in failed:
    print("FAILED", f)
"#;
    let out = std::process::Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("implementation upb"), "{text}");
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert!(
        failed.len() == 1 && failed[0].starts_with("FAILED control-too-deep.bin"),
        "Python must refuse the control case only, not what the relay accepts ({written} cases): {failed:#?}"
    );
}

/// Deep chains at every depth to past the limit, in each position.
fn deep_chains() -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    for levels in 0..60usize {
        for kvlist in [false, true] {
            let mut value = AnyValue {
                value: Some(Value::IntValue(1)),
            };
            for _ in 0..levels {
                value = AnyValue {
                    value: Some(if kvlist {
                        Value::KvlistValue(KeyValueList {
                            values: vec![kv("k".into(), value)],
                        })
                    } else {
                        Value::ArrayValue(ArrayValue { values: vec![value] })
                    }),
                };
            }
            let span = Span {
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                attributes: vec![kv("a".into(), value.clone())],
                links: vec![span::Link {
                    attributes: vec![kv("a".into(), value.clone())],
                    ..Default::default()
                }],
                events: vec![span::Event {
                    attributes: vec![kv("a".into(), value)],
                    ..Default::default()
                }],
                ..Default::default()
            };
            let body = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
            .encode_to_vec();
            bodies.push(body);
        }
    }
    bodies
}

/// Past upb's limit: 60 array levels in a span attribute are 126 message levels.
fn too_deep_control() -> Vec<u8> {
    let mut deep = AnyValue {
        value: Some(Value::IntValue(1)),
    };
    for _ in 0..60 {
        deep = AnyValue {
            value: Some(Value::ArrayValue(ArrayValue { values: vec![deep] })),
        };
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    attributes: vec![kv("a".into(), deep)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}
