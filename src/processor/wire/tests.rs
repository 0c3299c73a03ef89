//! The wire path against the prost path: for generated records and real loadgen requests, under
//! chains that use every path, editor, converter and condition the evaluator has (nil, missing
//! keys, values of every type, keys present or not, deletes, filters dropping some or all spans,
//! errors under each error_mode), the records the wire path writes decode to what the prost
//! path gives.
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use proptest::prelude::*;
use prost::Message;

use crate::pipeline::wire::{ResourceChunk, encode_record, parse_protobuf};
use crate::processor::apply::Chain;
use crate::processor::{RequestContext, SpanProcessor, registration};

/// Chains as lists of (processor type, settings).
const CHAINS: &[&[(&str, &str)]] = &[
    // bench/run's `processors` path.
    &[
        (
            "resource",
            "attributes: [{key: deployment.environment, value: bench, action: upsert}]",
        ),
        (
            "transform",
            r#"
error_mode: ignore
trace_statements:
  - set(attributes["mlflow.spanType"], "CHAT_MODEL") where attributes["gen_ai.operation.name"] == "chat"
  - set(attributes["llm.model_name"], attributes["gen_ai.request.model"]) where attributes["gen_ai.request.model"] != nil
  - set(attributes["relay.label"], Concat([resource.attributes["service.name"], name], "/"))
  - set(resource.attributes["relay.processed"], true)
  - set(attributes["llm.token_count.total"], attributes["gen_ai.usage.input_tokens"] + attributes["gen_ai.usage.output_tokens"]) where attributes["gen_ai.usage.input_tokens"] != nil
"#,
        ),
        (
            "filter",
            r#"{error_mode: ignore, traces: {span: ['name == "GET /v1/models"']}}"#,
        ),
    ],
    // Every span field, read and set.
    &[(
        "transform",
        r#"
error_mode: ignore
trace_statements:
  - set(name, Concat([name, "x"], "-")) where IsRootSpan()
  - set(kind, SPAN_KIND_SERVER) where kind == SPAN_KIND_CLIENT
  - set(status.code, STATUS_CODE_ERROR) where attributes["k"] != nil
  - set(status.message, "m") where status.code == STATUS_CODE_ERROR
  - set(trace_state, "ts=1") where trace_state == ""
  - set(attributes["sid"], String(span_id))
  - set(attributes["tid"], trace_id)
  - set(attributes["pid"], parent_span_id)
  - set(attributes["start"], start_time_unix_nano) where end_time_unix_nano > start_time_unix_nano
  - set(attributes["dropped"], dropped_attributes_count)
  - set(attributes["scope"], instrumentation_scope.name)
  - set(attributes["ver"], instrumentation_scope.version) where instrumentation_scope.name != "s0"
  - set(attributes["rdropped"], resource.dropped_attributes_count)
  - set(attributes["msg"], status.message) where status.message != ""
  - set(attributes["nm"], name) where name == "chat"
  - set(trace_id, 0x00)
"#,
    )],
    // Map editors on span attributes.
    &[(
        "transform",
        r#"
error_mode: silent
trace_statements:
  - delete_key(attributes, "k")
  - set(attributes["x"], "new") where attributes["x"] == nil
  - replace_pattern(attributes["gen_ai.request.model"], "gpt", "GPT")
  - replace_pattern(name, "^span", "S")
  - set(attributes["len"], Len(attributes))
  - set(attributes["copy"], attributes) where IsRootSpan()
"#,
    )],
    &[(
        "transform",
        r#"
trace_statements:
  - delete_matching_keys(attributes, "^gen_ai\\.usage")
  - keep_keys(attributes, ["k", "x", "gen_ai.operation.name", "m"]) where IsRootSpan()
  - set(attributes["after"], 1)
"#,
    )],
    &[(
        "transform",
        r#"
trace_statements:
  - replace_all_patterns(attributes, "value", "a", "A")
  - replace_all_patterns(attributes, "key", "^gen_ai", "g")
  - set(attributes["x"], "y")
"#,
    )],
    &[(
        "transform",
        r#"
trace_statements:
  - set(attributes["x"], "abcdef") where attributes["k"] == nil
  - truncate_all(attributes, 2)
  - limit(attributes, 2, ["x"])
"#,
    )],
    &[(
        "transform",
        r#"
error_mode: ignore
trace_statements:
  - merge_maps(attributes, resource.attributes, "upsert")
  - 'merge_maps(attributes, {"k": "merged", "z": 1}, "insert") where attributes["x"] != nil'
  - 'merge_maps(attributes, {"k": "updated"}, "update")'
  - set(attributes["nested"]["a"], 1) where attributes["k"] != nil
  - set(attributes["m"]["n"], "v") where attributes["m"] != nil
  - delete_key(attributes["m"], "o")
  - 'set(attributes, {"only": "this"}) where name == "GET /v1/models"'
"#,
    )],
    // Converters, arithmetic and conditions; type errors skipped (ignore).
    &[(
        "transform",
        r#"
error_mode: ignore
trace_statements:
  - set(attributes["total"], attributes["gen_ai.usage.input_tokens"] * 2 - 1) where attributes["gen_ai.usage.input_tokens"] >= 3 and not (attributes["gen_ai.usage.input_tokens"] > 30)
  - set(attributes["d"], Double(attributes["k"])) where attributes["k"] != nil or attributes["x"] == "chat"
  - set(attributes["i"], Int(attributes["x"]))
  - set(attributes["h"], SHA256(name))
  - set(attributes["m1"], IsMatch(attributes["k"], "^a")) where attributes["k"] != nil
  - set(attributes["div"], 10 / attributes["gen_ai.usage.output_tokens"])
  - set(attributes["lt"], true) where attributes["k"] < 5
  - set(attributes["s"], String(attributes["k"]))
  - set(attributes["nilset"], attributes["missing"])
  - set(attributes["dbl"], attributes["k"] + 0.5)
  - set(attributes["idx"], attributes["m"]["n"])
  - set(attributes["cat"], Concat([attributes["k"], attributes["x"], 3], ""))
"#,
    )],
    // A failing statement refuses the request (propagate) or is skipped (silent).
    &[(
        "transform",
        r#"trace_statements: ['set(attributes["n"], attributes["k"] + 1)', 'set(attributes["after"], 1)']"#,
    )],
    &[(
        "transform",
        r#"{error_mode: silent, trace_statements: ['set(attributes["n"], attributes["k"] + 1)', 'set(attributes["after"], 1)']}"#,
    )],
    // Resource and scope contexts, span statements that write the resource.
    &[(
        "transform",
        r#"
trace_statements:
  - context: resource
    statements: ['set(attributes["service.name"], "svc")', 'delete_key(attributes, "x")']
  - context: scope
    conditions: ['name != "s1"']
    statements: ['set(name, "renamed")', 'set(attributes["sa"], version)']
  - context: span
    conditions: ['attributes["k"] != nil', 'IsRootSpan()']
    statements: ['set(attributes["has_k"], true)', 'set(resource.attributes["last"], name)']
  - context: resource
    statements: ['set(attributes["mlflow.experiment_id"], "42") where attributes["last"] != nil']
"#,
    )],
    // Span statements in a row run span by span unless one writes what other spans read.
    &[(
        "transform",
        r#"
trace_statements:
  - set(attributes["before"], resource.attributes["last"])
  - set(attributes["k"], Concat([name, "k"], "-")) where attributes["k"] == nil
  - set(resource.attributes["last"], name)
  - set(attributes["after"], resource.attributes["last"])
  - set(attributes["k2"], attributes["k"])
"#,
    )],
    // A filter that empties scopes, then scope statements: emptied scopes are gone for them.
    &[
        (
            "filter",
            r#"{error_mode: ignore, traces: {span: ['attributes["k"] == "chat"', 'name == "span1"']}}"#,
        ),
        (
            "transform",
            r#"{trace_statements: [{context: scope, statements: ['set(resource.attributes["last"], name)']}]}"#,
        ),
    ],
    // Filters: some spans, with errors under each mode, and every span.
    &[(
        "filter",
        r#"{error_mode: ignore, traces: {span: ['attributes["k"] == nil and not IsRootSpan()', 'attributes["k"] + 1 > 2']}}"#,
    )],
    &[("filter", r#"{traces: {span: ['attributes["k"] + 1 > 2']}}"#)],
    &[
        ("filter", r#"{traces: {span: ['name != "zzz"']}}"#),
        ("resource", "attributes: [{key: a, value: 1, action: insert}]"),
    ],
    &[
        ("transform", r#"trace_statements: ['set(attributes["pre"], name)']"#),
        (
            "filter",
            r#"{traces: {span: ['IsRootSpan()', 'kind == SPAN_KIND_SERVER']}}"#,
        ),
        (
            "transform",
            r#"trace_statements: ['set(attributes["post"], attributes["pre"])']"#,
        ),
    ],
    // The attributes and resource processors' actions.
    &[(
        "attributes",
        r#"
actions:
  - {key: x, value: inserted, action: insert}
  - {key: k, from_attribute: x, action: update}
  - {key: up, value: 5, action: upsert}
  - {key: gen_ai.system, action: delete}
  - {action: delete, pattern: '^gen_ai\.usage'}
  - {key: m, action: hash}
  - {key: tenant, from_context: metadata.x-tenant, action: upsert}
  - {key: x, action: extract, pattern: '^(?P<first>[a-z])'}
  - {key: k, action: convert, converted_type: int}
"#,
    )],
    &[(
        "attributes",
        r#"
actions: [{key: only, value: matched, action: upsert}]
include: {match_type: regexp, span_names: ['^span'], attributes: [{key: k}]}
exclude: {match_type: strict, span_names: [chat]}
"#,
    )],
    &[(
        "resource",
        r#"
attributes:
  - {key: service.name, value: svc, action: update}
  - {key: copy, from_attribute: service.name, action: insert}
  - {key: x, action: delete}
  - {key: mlflow.experiment_id, value: 7, action: upsert}
"#,
    )],
];

fn processor(kind: &str, yaml: &str) -> Box<dyn SpanProcessor> {
    let value: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
    let mut errors = Vec::new();
    let config = (registration(kind).unwrap().load)(value, "p", &mut errors).unwrap();
    let mut problems = Vec::new();
    config.validate("p", &mut |p, m| problems.push(format!("{p}: {m}")));
    assert!(
        errors.is_empty() && problems.is_empty(),
        "{kind}: {errors:?} {problems:?}"
    );
    config.span_processor(kind).unwrap()
}

fn chain(spec: &[(&str, &str)], wire: bool) -> Chain {
    let list = spec
        .iter()
        .map(|(kind, yaml)| (kind.to_string(), processor(kind, yaml)))
        .collect();
    Chain::on_path(list, wire)
}

/// A record decoded (an absent resource or scope stays absent: the paths must agree on it too).
fn decoded(chunk: &ResourceChunk) -> ResourceSpans {
    let request = ExportTraceServiceRequest::decode(chunk.bytes.clone()).unwrap();
    assert_eq!(request.resource_spans.len(), 1);
    request.resource_spans.into_iter().next().unwrap()
}

/// Runs both paths of chain `i` on `chunk` and compares what they give.
fn same(i: usize, chunk: &ResourceChunk) -> Result<(), TestCaseError> {
    let request = RequestContext::from_headers([("x-tenant", "t1")]);
    let prost = chain(CHAINS[i], false).apply_one(chunk, &request);
    let wire_chain = chain(CHAINS[i], true);
    prop_assert!(wire_chain.on_wire(), "chain {} runs on the wire path", i);
    let wire = wire_chain.apply_wire(chunk, &request);
    match (prost, wire) {
        (Err(_), Err(_)) => {}
        (Ok(None), Ok(None)) => {}
        (Ok(Some(p)), Ok(Some(w))) => {
            prop_assert_eq!(decoded(&w), decoded(&p), "chain {}", i);
            prop_assert_eq!(w.spans, p.spans);
            prop_assert_eq!(&w.experiment, &p.experiment);
            prop_assert_eq!(&w.names, &p.names);
        }
        (p, w) => {
            return Err(TestCaseError::fail(format!(
                "chain {i}: prost {:?}, wire {:?}",
                p.map(|c| c.map(|c| c.spans)),
                w.map(|c| c.map(|c| c.spans))
            )));
        }
    }
    Ok(())
}

fn string(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.into())),
    }
}

fn value() -> impl Strategy<Value = Option<AnyValue>> {
    let v = |v: any_value::Value| Some(AnyValue { value: Some(v) });
    prop_oneof![
        Just(None),
        Just(Some(AnyValue { value: None })),
        prop::sample::select(vec!["chat", "gpt-4o", "", "abc", "GET /v1/models", "42"]).prop_map(|s| Some(string(s))),
        (-3i64..40).prop_map(move |n| v(any_value::Value::IntValue(n))),
        prop::sample::select(vec![0.5f64, 2.0, -1.25]).prop_map(move |d| v(any_value::Value::DoubleValue(d))),
        any::<bool>().prop_map(move |b| v(any_value::Value::BoolValue(b))),
        prop::sample::select(vec![Vec::new(), vec![1u8, 2]]).prop_map(move |b| v(any_value::Value::BytesValue(b))),
        Just(v(any_value::Value::ArrayValue(ArrayValue {
            values: vec![string("a"), string("b")],
        }))),
        Just(v(any_value::Value::KvlistValue(KeyValueList {
            values: vec![kv("n", Some(string("v"))), kv("o", Some(string("w")))],
        }))),
    ]
}

fn kv(key: &str, value: Option<AnyValue>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value,
        ..Default::default()
    }
}

const KEYS: &[&str] = &[
    "k",
    "x",
    "m",
    "gen_ai.operation.name",
    "gen_ai.request.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.system",
    "service.name",
    "mlflow.experiment_id",
];

fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
    prop::collection::vec((prop::sample::select(KEYS), value()), 0..6)
        .prop_map(|list| list.into_iter().map(|(k, v)| kv(k, v)).collect())
}

fn span() -> impl Strategy<Value = Span> {
    (
        prop::sample::select(vec!["chat", "span-a", "GET /v1/models", ""]),
        0i32..6,
        any::<bool>(),
        prop::option::of((0i32..3, prop::sample::select(vec!["", "boom"]))),
        attributes(),
        prop::sample::select(vec!["", "a=b"]),
        0u32..3,
        prop::collection::vec(attributes(), 0..2),
    )
        .prop_map(
            |(name, kind, root, status, attributes, trace_state, dropped, events)| Span {
                name: name.into(),
                kind,
                parent_span_id: if root { Vec::new() } else { vec![9; 8] },
                status: status.map(|(code, message)| Status {
                    code,
                    message: message.into(),
                }),
                attributes,
                trace_state: trace_state.into(),
                dropped_attributes_count: dropped,
                start_time_unix_nano: 10,
                end_time_unix_nano: 20,
                events: events
                    .into_iter()
                    .map(|attributes| Event {
                        name: "e".into(),
                        attributes,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        )
}

fn record() -> impl Strategy<Value = ResourceSpans> {
    let scope = (
        prop::option::of((prop::sample::select(vec!["s0", "s1"]), attributes())),
        prop::collection::vec(span(), 0..5),
    );
    (
        prop::option::of((attributes(), 0u32..2)),
        prop::collection::vec(scope, 0..3),
    )
        .prop_map(|(resource, scopes)| {
            let mut id = 0u8;
            ResourceSpans {
                resource: resource.map(|(attributes, dropped)| Resource {
                    attributes,
                    dropped_attributes_count: dropped,
                    ..Default::default()
                }),
                scope_spans: scopes
                    .into_iter()
                    .map(|(scope, mut spans)| {
                        for span in &mut spans {
                            id += 1;
                            span.trace_id = vec![id; 16];
                            span.span_id = vec![id; 8];
                        }
                        ScopeSpans {
                            scope: scope.map(|(name, attributes)| InstrumentationScope {
                                name: name.into(),
                                version: "1.0".into(),
                                attributes,
                                ..Default::default()
                            }),
                            spans,
                            schema_url: "https://schema".into(),
                        }
                    })
                    .collect(),
                schema_url: String::new(),
            }
        })
}

fn chunk_of(rs: &ResourceSpans) -> ResourceChunk {
    let bytes: Bytes = encode_record(rs);
    let parsed = parse_protobuf(bytes.clone()).unwrap();
    ResourceChunk {
        bytes,
        spans: parsed.spans,
        experiment: None,
        names: None,
    }
}

/// `rs` encoded with what protobuf allows and encoders rarely write, inside each span as `odd`
/// says: an attribute `k` whose KeyValue has its key twice and whose value sets the oneof twice
/// (an int, then the string "chat") and carries an unknown field; a second `name` (the last
/// wins); an unknown span field. Both paths get the same bytes, so they must agree on them.
fn odd_chunk(rs: &ResourceSpans, odd: u8) -> ResourceChunk {
    use prost::encoding::{WireType, encode_key, encode_varint};
    fn field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
        encode_key(number, WireType::LengthDelimited, out);
        encode_varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }
    let mut value = Vec::new();
    encode_key(3, WireType::Varint, &mut value);
    encode_varint(5, &mut value);
    field(&mut value, 1, b"chat");
    encode_key(10, WireType::Varint, &mut value);
    encode_varint(1, &mut value);
    let mut kv = Vec::new();
    field(&mut kv, 1, b"zz");
    field(&mut kv, 1, b"k");
    field(&mut kv, 2, &value);

    let mut message = Vec::new();
    if let Some(resource) = &rs.resource {
        field(&mut message, 1, &resource.encode_to_vec());
    }
    for ss in &rs.scope_spans {
        let mut scope_spans = Vec::new();
        if let Some(scope) = &ss.scope {
            field(&mut scope_spans, 1, &scope.encode_to_vec());
        }
        for (n, span) in ss.spans.iter().enumerate() {
            let mut bytes = span.encode_to_vec();
            if odd & 1 != 0 && n % 2 == 0 {
                field(&mut bytes, 9, &kv);
            }
            if odd & 2 != 0 {
                field(&mut bytes, 5, b"span1");
            }
            if odd & 4 != 0 {
                encode_key(100, WireType::Varint, &mut bytes);
                encode_varint(7, &mut bytes);
            }
            field(&mut scope_spans, 2, &bytes);
        }
        if !ss.schema_url.is_empty() {
            field(&mut scope_spans, 3, ss.schema_url.as_bytes());
        }
        field(&mut message, 2, &scope_spans);
    }
    if !rs.schema_url.is_empty() {
        field(&mut message, 3, rs.schema_url.as_bytes());
    }
    let mut record = Vec::new();
    field(&mut record, 1, &message);
    let bytes = Bytes::from(record);
    let parsed = parse_protobuf(bytes.clone()).expect("the receiver's walk accepts it");
    ResourceChunk {
        bytes,
        spans: parsed.spans,
        experiment: None,
        names: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn the_wire_path_writes_what_the_prost_path_does(i in 0..CHAINS.len(), rs in record()) {
        same(i, &chunk_of(&rs))?;
    }

    #[test]
    fn both_paths_agree_on_unusual_encodings(i in 0..CHAINS.len(), rs in record(), odd in 1u8..8) {
        same(i, &odd_chunk(&rs, odd))?;
    }
}

/// loadgen's requests (telemetrygen's shape and gen_ai agent traces, as bench/run sends them),
/// through every chain.
#[test]
fn loadgen_requests_give_the_same_records_on_both_paths() {
    use crate::loadgen::spans::{Encoding, Template, genai_shape, kv_str, plain_shape};
    let resource = vec![kv_str("service.name", "agent"), kv_str("mlflow.experiment_id", "3")];
    let attrs = [kv_str("k", "abc")];
    for shape in [
        plain_shape(resource.clone(), &attrs, 9, (2, 16)),
        genai_shape(resource.clone(), &attrs, (0, 0)),
    ] {
        let template = Template::build(&shape, 10, Encoding::Proto, 7).unwrap();
        let mut body = Vec::new();
        template.render(
            &mut crate::loadgen::spans::FastRng::new(1),
            1_700_000_000_000_000_000,
            &mut body,
        );
        let parsed = parse_protobuf(Bytes::from(body)).unwrap();
        assert!(parsed.spans >= 10);
        for chunk in &parsed.chunks {
            for i in 0..CHAINS.len() {
                same(i, chunk).unwrap();
            }
        }
    }
}

/// Which chains edit bytes: those whose processors all can.
#[test]
fn chains_with_span_event_work_or_redaction_stay_on_the_prost_path() {
    let on_wire = |spec: &[(&str, &str)]| {
        let list = spec
            .iter()
            .map(|(kind, yaml)| (kind.to_string(), processor(kind, yaml)))
            .collect();
        Chain::new(list, None).unwrap().on_wire()
    };
    assert!(on_wire(CHAINS[0]));
    assert!(!on_wire(&[(
        "transform",
        r#"trace_statements: [{context: spanevent, statements: ['set(attributes["e"], 1)']}]"#
    )]));
    assert!(!on_wire(&[("filter", r#"{traces: {spanevent: ['name == "e"']}}"#)]));
    assert!(!on_wire(&[
        ("resource", "attributes: [{key: a, value: 1, action: insert}]"),
        ("redaction", "{allow_all_keys: true}"),
    ]));
    assert!(!on_wire(&[("probabilistic_sampler", "{sampling_percentage: 50}")]));
}

/// The view is charged as twice a decode (`apply::WIRE_VIEW_FACTOR`): its entry for an attribute
/// and for a span must stay within twice what prost decodes them into, or a record of empty
/// KeyValues (2 bytes each) could take more memory than it was charged.
#[test]
fn the_view_takes_at_most_twice_a_decode() {
    use std::mem::size_of;
    assert!(
        size_of::<super::Slot>() <= 2 * size_of::<KeyValue>(),
        "{} > 2 x {}",
        size_of::<super::Slot>(),
        size_of::<KeyValue>()
    );
    assert!(size_of::<super::SpanView>() <= 2 * size_of::<Span>());
    // The room made at once per span (its view and a few attributes) is within that too.
    let per_span = size_of::<super::SpanView>() + super::SLOTS_PER_SPAN * size_of::<super::Slot>();
    assert!(
        per_span <= 2 * size_of::<Span>(),
        "{per_span} > 2 x {}",
        size_of::<Span>()
    );
}
