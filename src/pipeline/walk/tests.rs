//! Unit tests of the schema walk, against prost.
use super::*;
use crate::loadgen::spans::{Encoding, FastRng, Template, genai_shape, kv_str, plain_shape};
use crate::pipeline::testdata;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// Realistic requests: nested GenAI agent traces with events, links and attributes, and
/// plain traces with padding attributes.
fn corpus() -> Vec<Vec<u8>> {
    let resource = vec![kv_str("service.name", "agent"), kv_str(EXPERIMENT_ATTRIBUTE, "42")];
    let mut out = Vec::new();
    for (i, shape) in [
        genai_shape(resource.clone(), &[], (2, 40)),
        plain_shape(resource, &[kv_str("k", "v")], 5, (3, 20)),
    ]
    .iter()
    .enumerate()
    {
        let template = Template::build(shape, 3, Encoding::Proto, i as u64).unwrap();
        let mut body = Vec::new();
        template.render(&mut FastRng::new(7), 1_700_000_000_000_000_000, &mut body);
        out.push(body);
    }
    let req = ExportTraceServiceRequest {
        resource_spans: vec![
            testdata::resource_spans("a", 0, 2, 3),
            testdata::resource_spans("b", 50, 1, 2),
        ],
    };
    out.push(req.encode_to_vec());
    out
}

/// What the relay needs from prost's full decode: span counts per ResourceSpans.
fn prost_view(body: &[u8]) -> Result<Vec<usize>, prost::DecodeError> {
    let req = ExportTraceServiceRequest::decode(body)?;
    Ok(req
        .resource_spans
        .iter()
        .map(|rs| rs.scope_spans.iter().map(|s| s.spans.len()).sum())
        .collect())
}

fn walk_view(body: &[u8]) -> Result<Vec<usize>, DecodeError> {
    Ok(request(body)?.iter().map(|r| r.spans).collect())
}

#[test]
fn agrees_with_prost_on_valid_requests() {
    for body in corpus() {
        let records = request(&body).unwrap();
        assert_eq!(walk_view(&body).unwrap(), prost_view(&body).unwrap());
        let joined: Vec<u8> = records.iter().flat_map(|r| body[r.field.clone()].to_vec()).collect();
        assert_eq!(joined, body, "records cover the request");
        assert!(records.iter().all(|r| r.invalid_spans == 0));
    }
    assert_eq!(request(&corpus()[0]).unwrap()[0].experiment.as_deref(), Some("42"));
}

/// Sets a random byte of `body` to a random value.
fn flip_byte(body: &mut [u8], rng: &mut FastRng) {
    let at = (rng.next_u64() as usize) % body.len();
    body[at] = rng.next_u64() as u8;
}

/// The walk that tallies accepts what the plain walk accepts, finds the same records, and says
/// of each what a walk of the record alone (`decoded_estimate`, the processors' fallback) says:
/// on valid requests and on corrupted ones.
#[test]
fn the_tallied_walk_is_the_walk_with_the_estimate() {
    let mut rng = FastRng::new(13);
    let mut checked = 0;
    for body in corpus() {
        for round in 0..600 {
            let mut bad = body.clone();
            if round > 0 {
                flip_byte(&mut bad, &mut rng);
            }
            match (request(&bad), records(&bad, true)) {
                (Ok(plain), Ok(counted)) => {
                    assert_eq!(plain.len(), counted.len());
                    for (p, c) in plain.iter().zip(&counted) {
                        assert_eq!(p.decoded, None);
                        assert_eq!(c.decoded, Some(decoded_estimate(&bad[c.field.clone()])));
                        let without = Record {
                            decoded: None,
                            ..c.clone()
                        };
                        assert_eq!(p, &without);
                        checked += 1;
                    }
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                (a, b) => panic!("round {round}: plain {a:?} but tallied {b:?}"),
            }
        }
    }
    assert!(checked > 500, "{checked}");
}

/// Thousands of corrupted requests (flipped bytes, truncations): the walker accepts exactly
/// what prost accepts, and then counts the same spans.
#[test]
fn agrees_with_prost_on_corrupted_requests() {
    let mut rng = FastRng::new(2026);
    let mut both_failed = 0;
    for body in corpus() {
        for round in 0..3000 {
            let mut bad = body.clone();
            match round % 3 {
                0 => bad.truncate((rng.next_u64() as usize) % body.len()),
                _ => {
                    for _ in 0..=(round % 4) {
                        flip_byte(&mut bad, &mut rng);
                    }
                }
            }
            let (walked, decoded) = (walk_view(&bad), prost_view(&bad));
            match (&walked, &decoded) {
                (Ok(w), Ok(d)) => assert_eq!(w, d),
                (Err(_), Err(_)) => both_failed += 1,
                // prost skips unknown groups; the walker refuses them (no OTLP sender uses them).
                (Err(DecodeError::Framing("groups are not supported")), Ok(_)) => {}
                _ => panic!("round {round}: walker {walked:?} but prost {decoded:?}"),
            }
        }
    }
    assert!(
        both_failed > 1000,
        "the corruptions must exercise the error paths ({both_failed})"
    );
}

#[test]
fn unusable_ids_and_experiment_forms() {
    let mut rs = testdata::resource_spans("a", 0, 1, 3);
    rs.scope_spans[0].spans[0].trace_id = vec![0; 16];
    rs.scope_spans[0].spans[1].span_id = vec![1; 7];
    rs.resource
        .as_mut()
        .unwrap()
        .attributes
        .push(opentelemetry_proto::tonic::common::v1::KeyValue {
            key: EXPERIMENT_ATTRIBUTE.into(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                value: Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(17)),
            }),
            ..Default::default()
        });
    let body = ExportTraceServiceRequest {
        resource_spans: vec![rs],
    }
    .encode_to_vec();
    let r = &request(&body).unwrap()[0];
    assert_eq!((r.spans, r.invalid_spans), (3, 2));
    assert_eq!(r.experiment.as_deref(), Some("17"));
}

use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, span};

/// One level of nesting inside an attribute value.
#[derive(Clone, Copy, Debug)]
enum Level {
    /// AnyValue -> ArrayValue -> AnyValue: two message levels.
    Array,
    /// AnyValue -> KeyValueList -> KeyValue -> AnyValue: three.
    Kvlist,
}

/// Where the nested attribute sits, and the message level of its KeyValue.
const PLACES: [(&str, u32); 5] = [("resource", 4), ("scope", 5), ("span", 5), ("event", 6), ("link", 6)];

/// A value nesting `levels` (outermost first) around an int, or around an empty ArrayValue.
fn nested(levels: &[Level], empty_bottom: bool) -> AnyValue {
    let mut value = if empty_bottom {
        AnyValue {
            value: Some(Value::ArrayValue(ArrayValue { values: vec![] })),
        }
    } else {
        AnyValue {
            value: Some(Value::IntValue(1)),
        }
    };
    for level in levels.iter().rev() {
        value = AnyValue {
            value: Some(match level {
                Level::Array => Value::ArrayValue(ArrayValue { values: vec![value] }),
                Level::Kvlist => Value::KvlistValue(KeyValueList {
                    values: vec![KeyValue {
                        key: "k".into(),
                        value: Some(value),
                        ..Default::default()
                    }],
                }),
            }),
        };
    }
    value
}

/// The deepest message level of such a value's attribute placed at `place`.
fn depth_of(place: &str, levels: &[Level], empty_bottom: bool) -> u32 {
    let kv = PLACES.iter().find(|p| p.0 == place).map(|p| p.1).unwrap_or(0);
    let inner: u32 = levels
        .iter()
        .map(|l| match l {
            Level::Array => 2,
            Level::Kvlist => 3,
        })
        .sum();
    kv + 1 + inner + u32::from(empty_bottom)
}

/// A request with one span carrying `value` as an attribute at `place`.
fn request_with(place: &str, value: AnyValue) -> Vec<u8> {
    let attr = vec![KeyValue {
        key: "deep".into(),
        value: Some(value),
        ..Default::default()
    }];
    let mut span = testdata::span(1);
    let mut rs = ResourceSpans {
        resource: Some(Resource::default()),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope::default()),
            ..Default::default()
        }],
        ..Default::default()
    };
    match place {
        "resource" => {
            rs.resource = Some(Resource {
                attributes: attr,
                ..Default::default()
            })
        }
        "scope" => {
            rs.scope_spans[0].scope = Some(InstrumentationScope {
                attributes: attr,
                ..Default::default()
            })
        }
        "span" => span.attributes = attr,
        "event" => {
            span.events = vec![span::Event {
                attributes: attr,
                ..Default::default()
            }]
        }
        _ => {
            span.links = vec![span::Link {
                attributes: attr,
                ..Default::default()
            }]
        }
    }
    rs.scope_spans[0].spans.push(span);
    ExportTraceServiceRequest {
        resource_spans: vec![rs],
    }
    .encode_to_vec()
}

/// Level sequences of every kind: arrays only, kvlists only, and two mixes.
fn shapes(n: usize) -> Vec<Vec<Level>> {
    vec![
        vec![Level::Array; n],
        vec![Level::Kvlist; n],
        (0..n)
            .map(|i| if i % 2 == 0 { Level::Array } else { Level::Kvlist })
            .collect(),
        (0..n)
            .map(|i| if i % 3 == 2 { Level::Kvlist } else { Level::Array })
            .collect(),
    ]
}

/// Nesting of every kind in every position, at every depth around the limit and past prost's:
/// the walker accepts exactly up to MAX_DEPTH message levels counted from the request, refuses
/// deeper with an error naming the position, and prost decodes everything it accepts.
#[test]
fn depth_is_counted_in_message_levels_from_the_request() {
    let mut checked = 0;
    for (place, _) in PLACES {
        for n in 0..70 {
            for levels in shapes(n) {
                for empty_bottom in [false, true] {
                    let depth = depth_of(place, &levels, empty_bottom);
                    let body = request_with(place, nested(&levels, empty_bottom));
                    let walked = request(&body);
                    let decoded = prost_view(&body);
                    if depth <= MAX_DEPTH {
                        assert_eq!(
                            walk_view(&body).ok(),
                            Some(vec![1]),
                            "{place} depth {depth} {levels:?} must pass"
                        );
                        assert_eq!(decoded.ok(), Some(vec![1]), "prost must decode what the walker passes");
                    } else {
                        match walked {
                            Err(DecodeError::TooDeep { place: p, limit }) => {
                                assert_eq!(limit, MAX_DEPTH);
                                assert!(
                                    p.starts_with(place) || p == format!("span {place} attribute"),
                                    "{p} for {place}"
                                );
                            }
                            other => panic!("{place} depth {depth}: {other:?}"),
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 2000);
}

/// The limit's neighbourhood exactly, and prost's own limit (root + 100 levels), which the
/// walker's must stay below.
#[test]
fn the_limit_and_prosts() {
    for (place, kv) in PLACES {
        // Arrays add two levels; an empty ArrayValue at the bottom adds one, to hit each depth.
        for depth in (MAX_DEPTH - 3)..=(MAX_DEPTH + 3) {
            let extra = depth - (kv + 1);
            let levels = vec![Level::Array; (extra / 2) as usize];
            let empty_bottom = extra % 2 == 1;
            assert_eq!(depth_of(place, &levels, empty_bottom), depth);
            let body = request_with(place, nested(&levels, empty_bottom));
            assert_eq!(request(&body).is_ok(), depth <= MAX_DEPTH, "{place} at {depth}");
        }
        for depth in [101, 102] {
            let extra = depth - (kv + 1);
            let levels = vec![Level::Array; (extra / 2) as usize];
            let body = request_with(place, nested(&levels, extra % 2 == 1));
            assert_eq!(prost_view(&body).is_ok(), depth <= 101, "prost at {depth}");
            assert!(request(&body).is_err());
        }
    }
}

/// A varint's tenth byte carries bit 63 only: 0 or 1; prost refuses more, so does the walker,
/// wherever the varint is (a key, a length, a value).
#[test]
fn overflowing_varints_are_refused_like_prost() {
    let good = ExportTraceServiceRequest {
        resource_spans: vec![testdata::resource_spans("a", 0, 1, 1)],
    }
    .encode_to_vec();
    for last in 0u8..=0x7f {
        let mut varint = vec![0xff; 9];
        varint.push(last);
        // An unknown varint field 9 at the top, and a span's `kind` (field 6).
        let mut top = good.clone();
        top.push(0x48);
        top.extend_from_slice(&varint);
        // A span's `kind` (field 6), the span framed by hand into a request.
        let mut span = testdata::span(3).encode_to_vec();
        span.push(0x30);
        span.extend_from_slice(&varint);
        let rewritten = wrap(0x0a, &wrap(0x12, &wrap(0x12, &span)));
        for b in [top, rewritten] {
            let (w, p) = (request(&b).is_ok(), prost_view(&b).is_ok());
            assert_eq!(w, p, "last byte {last:#x}: walker {w}, prost {p}");
            assert_eq!(w, last <= 1);
        }
    }
}

/// A length-delimited field: tag, length, bytes.
fn wrap(tag: u8, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    prost::encoding::encode_varint(inner.len() as u64, &mut out);
    out.extend_from_slice(inner);
    out
}

#[test]
fn deep_nesting_is_refused() {
    // AnyValue{array_value: ArrayValue{values: [AnyValue{...}]}} nested past the limit.
    let mut value: Vec<u8> = vec![0x10, 0x01];
    for _ in 0..150 {
        let mut array = vec![0x0a];
        prost::encoding::encode_varint(value.len() as u64, &mut array);
        array.extend_from_slice(&value);
        value = vec![0x2a];
        prost::encoding::encode_varint(array.len() as u64, &mut value);
        value.extend_from_slice(&array);
    }
    assert!(any_value::<()>(&value, 6, Place::Span).is_err());
}

/// The MLflow names the walk reads on its way are what `otlp::routing` reads from the record
/// (which the exporter routes by), whatever the values' types and repetitions, and with the
/// resource split over repeated `resource` fields (protobuf merges them).
#[test]
fn routing_names_are_read_as_routing_reads_them() {
    use crate::otlp::routing::{EXPERIMENT_NAME_ATTRIBUTE, RUN_ID_ATTRIBUTE, WORKSPACE_ATTRIBUTE, resource_routing};
    let value = |v: Option<Value>| Some(AnyValue { value: v });
    let values = [
        value(Some(Value::StringValue("r1".into()))),
        value(Some(Value::StringValue("  padded ".into()))),
        value(Some(Value::StringValue(String::new()))),
        value(Some(Value::IntValue(5))),
        value(Some(Value::BoolValue(true))),
        value(None),
        None,
    ];
    let keys = [
        EXPERIMENT_NAME_ATTRIBUTE,
        RUN_ID_ATTRIBUTE,
        WORKSPACE_ATTRIBUTE,
        "mlflow.other",
    ];
    let mut checked = 0;
    let mut named = 0;
    for (i, key) in keys.iter().enumerate() {
        for (a, first) in values.iter().enumerate() {
            for second in values.iter().chain([&None]).skip(a % 3) {
                let attr = |v: &Option<AnyValue>| KeyValue {
                    key: (*key).into(),
                    value: v.clone(),
                    ..Default::default()
                };
                let other = testdata::kv(keys[(i + 1) % keys.len()], "x");
                let mut rs = testdata::resource_spans("svc", 0, 1, 1);
                let resource = rs.resource.as_mut().unwrap();
                resource.attributes.extend([attr(first), other]);
                // The second value in a resource field of its own, after the spans.
                let mut message = rs.encode_to_vec();
                let more = Resource {
                    attributes: vec![attr(second)],
                    ..Default::default()
                };
                prost::encoding::message::encode(1, &more, &mut message);
                let mut body = Vec::new();
                prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut body);
                prost::encoding::encode_varint(message.len() as u64, &mut body);
                body.extend_from_slice(&message);
                let walked = request(&body).unwrap().remove(0).names;
                assert_eq!(
                    walked,
                    resource_routing(&body, "").names(),
                    "{key} {first:?} {second:?}"
                );
                checked += 1;
                named += usize::from(walked.is_some());
            }
        }
    }
    assert!(checked > 100 && named > 20, "{checked} {named}");
}
