//! Structure-aware fuzzing of every parser that sees untrusted input, in-process and on stable
//! Rust (proptest), sized for CI: OTLP requests (protobuf and JSON, plain, gzip and deflate;
//! every field and AnyValue kind, nesting to 200, unknown fields, wrong wire types, groups,
//! duplicates, truncations and byte mutations) through decompress → validate → route → batch
//! (max 3 spans, so records are split) → export payload; the config loader; the spool's record
//! reader. And the walker against Python protobuf (upb), MLflow's parser.
//!
//! `FUZZ_CASES` sets the OTLP cases (default 200,000, spread over four tests that run in
//! parallel); `FUZZ_SEED` shifts the fixed seeds to explore other cases. A failure prints its
//! shrunk minimal case.
mod support;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use otlp_relay::batch::{BatchSettings, Batcher};
use otlp_relay::export::OutBatch;
use otlp_relay::pipeline::wire::{self, DecodeError, ParsedRequest};
use otlp_relay::pipeline::{Destination, Intake, Item, Routed};
use otlp_relay::receiver::ReceiveError;
use otlp_relay::receiver::http::decompress;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;

// ---------------------------------------------------------------------------------------------
// Generators

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(vec!["", "k", "service.name", "mlflow.experiment_id", "gen_ai.prompt", "ü€𝄞"])
            .prop_map(String::from),
        1 => vec(any::<char>(), 0..6).prop_map(String::from_iter),
        1 => proptest::sample::select(vec!["0", "42", " 7 ", "-1", "../etc", "18446744073709551616"]).prop_map(String::from),
    ]
}

fn leaf() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        text().prop_map(|s| Some(Value::StringValue(s))),
        any::<bool>().prop_map(|b| Some(Value::BoolValue(b))),
        any::<i64>().prop_map(|i| Some(Value::IntValue(i))),
        (-1e12f64..1e12).prop_map(|d| Some(Value::DoubleValue(d))),
        vec(any::<u8>(), 0..6).prop_map(|b| Some(Value::BytesValue(b))),
        Just(None),
        Just(Some(Value::ArrayValue(ArrayValue { values: vec![] }))),
        Just(Some(Value::KvlistValue(KeyValueList { values: vec![] }))),
    ]
}

fn kv(key: String, value: AnyValue) -> KeyValue {
    KeyValue {
        key,
        value: Some(value),
        ..Default::default()
    }
}

/// Shallow trees of every AnyValue kind, and now and then a chain nesting up to 200 levels of
/// arrays and kvlists (the limit is 64 message levels; prost's and upb's 100).
fn any_value() -> impl Strategy<Value = AnyValue> {
    let tree = leaf()
        .prop_map(|value| AnyValue { value })
        .prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..3).prop_map(|values| AnyValue {
                    value: Some(Value::ArrayValue(ArrayValue { values })),
                }),
                vec((text(), inner), 0..3).prop_map(|kvs| AnyValue {
                    value: Some(Value::KvlistValue(KeyValueList {
                        values: kvs.into_iter().map(|(k, v)| kv(k, v)).collect(),
                    })),
                }),
            ]
        });
    let chain = (vec(any::<bool>(), 0..200), leaf()).prop_map(|(levels, value)| {
        let mut v = AnyValue { value };
        for kvlist in levels {
            v = AnyValue {
                value: Some(if kvlist {
                    Value::KvlistValue(KeyValueList {
                        values: vec![kv("k".into(), v)],
                    })
                } else {
                    Value::ArrayValue(ArrayValue { values: vec![v] })
                }),
            };
        }
        v
    });
    prop_oneof![12 => tree, 1 => chain]
}

fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
    prop_oneof![
        2 => Just(vec![]),
        3 => vec(
            (text(), any_value(), any::<bool>()).prop_map(|(k, v, none)| KeyValue {
                key: k,
                value: (!none).then_some(v),
                ..Default::default()
            }),
            0..3
        ),
    ]
}

fn id(size: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => vec(any::<u8>(), size).prop_map(move |mut v| {
            v[0] |= 1;
            v
        }),
        1 => Just(vec![0; size]),
        1 => vec(any::<u8>(), 0..20),
    ]
}

fn event() -> impl Strategy<Value = span::Event> {
    (any::<u64>(), text(), attributes(), any::<u32>()).prop_map(|(t, name, attributes, dropped)| span::Event {
        time_unix_nano: t,
        name,
        attributes,
        dropped_attributes_count: dropped,
    })
}

fn link() -> impl Strategy<Value = span::Link> {
    (id(16), id(8), text(), attributes(), any::<u32>(), any::<u32>()).prop_map(
        |(trace_id, span_id, trace_state, attributes, dropped, flags)| span::Link {
            trace_id,
            span_id,
            trace_state,
            attributes,
            dropped_attributes_count: dropped,
            flags,
        },
    )
}

fn a_span() -> impl Strategy<Value = Span> {
    (
        (
            id(16),
            id(8),
            text(),
            vec(any::<u8>(), 0..9),
            any::<u32>(),
            text(),
            any::<i32>(),
        ),
        (any::<u64>(), any::<u64>(), attributes(), any::<u32>()),
        (vec(event(), 0..2), any::<u32>(), vec(link(), 0..2), any::<u32>()),
        proptest::option::of((text(), any::<i32>())),
    )
        .prop_map(
            |(
                (trace_id, span_id, trace_state, parent_span_id, flags, name, kind),
                (start, end, attributes, dropped_attributes_count),
                (events, dropped_events_count, links, dropped_links_count),
                status,
            )| Span {
                trace_id,
                span_id,
                trace_state,
                parent_span_id,
                flags,
                name,
                kind,
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes,
                dropped_attributes_count,
                events,
                dropped_events_count,
                links,
                dropped_links_count,
                status: status.map(|(message, code)| Status { message, code }),
            },
        )
}

fn resource_spans() -> impl Strategy<Value = ResourceSpans> {
    let resource = proptest::option::of(
        (
            attributes(),
            any::<u32>(),
            vec((text(), text(), vec(text(), 0..2), vec(text(), 0..2)), 0..2),
        )
            .prop_map(|(attributes, dropped, refs)| Resource {
                attributes,
                dropped_attributes_count: dropped,
                entity_refs: refs
                    .into_iter()
                    .map(|(schema_url, r#type, id_keys, description_keys)| EntityRef {
                        schema_url,
                        r#type,
                        id_keys,
                        description_keys,
                    })
                    .collect(),
            }),
    );
    let scope = proptest::option::of((text(), text(), attributes(), any::<u32>()).prop_map(
        |(name, version, attributes, dropped)| InstrumentationScope {
            name,
            version,
            attributes,
            dropped_attributes_count: dropped,
        },
    ));
    let scope_spans = (scope, vec(a_span(), 0..6), text()).prop_map(|(scope, spans, schema_url)| ScopeSpans {
        scope,
        spans,
        schema_url,
    });
    (resource, vec(scope_spans, 0..3), text()).prop_map(|(resource, scope_spans, schema_url)| ResourceSpans {
        resource,
        scope_spans,
        schema_url,
    })
}

fn request() -> impl Strategy<Value = ExportTraceServiceRequest> {
    vec(resource_spans(), 0..4).prop_map(|resource_spans| ExportTraceServiceRequest { resource_spans })
}

// ---------------------------------------------------------------------------------------------
// Structural mutations: the encoding parsed into a tree by the OTLP schema, changed, re-framed
// (so enclosing lengths stay right and the change reaches every level).

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Request,
    ResourceSpans,
    Resource,
    EntityRef,
    ScopeSpans,
    Scope,
    Span,
    Event,
    Link,
    Status,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
}

/// The message kind a known length-delimited field holds.
fn child(kind: Kind, field: u64) -> Option<Kind> {
    use Kind::*;
    Some(match (kind, field) {
        (Request, 1) => ResourceSpans,
        (ResourceSpans, 1) => Resource,
        (ResourceSpans, 2) => ScopeSpans,
        (Resource, 1) | (Scope, 3) | (Span, 9) | (Event, 3) | (Link, 4) | (KeyValueList, 1) => KeyValue,
        (Resource, 3) => EntityRef,
        (ScopeSpans, 1) => Scope,
        (ScopeSpans, 2) => Span,
        (Span, 11) => Event,
        (Span, 13) => Link,
        (Span, 15) => Status,
        (KeyValue, 2) | (ArrayValue, 1) => AnyValue,
        (AnyValue, 5) => ArrayValue,
        (AnyValue, 6) => KeyValueList,
        _ => return None,
    })
}

#[derive(Clone, Debug)]
enum Body {
    /// The bytes after the key: a varint or fixed value, or (wire type 2) the content.
    Raw(Vec<u8>),
    Msg(Vec<Field>),
}

#[derive(Clone, Debug)]
struct Field {
    key: u64,
    body: Body,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for i in 0..10 {
        let b = buf[*pos];
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

/// Parses a valid encoding (prost's own) of a message of `kind`.
fn parse(buf: &[u8], kind: Kind) -> Vec<Field> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos);
        let start = pos;
        let body = match key & 7 {
            0 => {
                read_varint(buf, &mut pos);
                Body::Raw(buf[start..pos].to_vec())
            }
            1 => {
                pos += 8;
                Body::Raw(buf[start..pos].to_vec())
            }
            5 => {
                pos += 4;
                Body::Raw(buf[start..pos].to_vec())
            }
            _ => {
                let len = read_varint(buf, &mut pos) as usize;
                let content = &buf[pos..pos + len];
                pos += len;
                match child(kind, key >> 3) {
                    Some(k) => Body::Msg(parse(content, k)),
                    None => Body::Raw(content.to_vec()),
                }
            }
        };
        out.push(Field { key, body });
    }
    out
}

fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        prost::encoding::encode_varint(f.key, out);
        match &f.body {
            Body::Raw(b) if f.key & 7 == 2 => {
                prost::encoding::encode_varint(b.len() as u64, out);
                out.extend_from_slice(b);
            }
            Body::Raw(b) => out.extend_from_slice(b),
            Body::Msg(children) => {
                let mut inner = Vec::new();
                encode(children, &mut inner);
                prost::encoding::encode_varint(inner.len() as u64, out);
                out.extend_from_slice(&inner);
            }
        }
    }
}

#[derive(Clone, Debug)]
enum TreeMut {
    /// An unknown field (number 100+) of any wire type, in the n-th message.
    Unknown {
        node: usize,
        at: usize,
        number: u64,
        wire: u8,
        seed: u64,
    },
    /// A known field sent with another wire type.
    WrongWire {
        node: usize,
        field: usize,
        wire: u8,
        seed: u64,
    },
    /// A field repeated (a second singular message merges; a repeated one adds).
    Duplicate { node: usize, field: usize },
    /// A group (wire types 3/4), which prost skips and the walker refuses.
    Group { node: usize, at: usize },
    /// Fields in reverse order.
    Reverse { node: usize },
}

fn tree_mut() -> impl Strategy<Value = TreeMut> {
    prop_oneof![
        4 => (any::<usize>(), any::<usize>(), 100u64..5000, proptest::sample::select(vec![0u8, 1, 2, 5]), any::<u64>())
            .prop_map(|(node, at, number, wire, seed)| TreeMut::Unknown { node, at, number, wire, seed }),
        2 => (any::<usize>(), any::<usize>(), proptest::sample::select(vec![0u8, 1, 2, 5, 6, 7]), any::<u64>())
            .prop_map(|(node, field, wire, seed)| TreeMut::WrongWire { node, field, wire, seed }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(node, field)| TreeMut::Duplicate { node, field }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(node, at)| TreeMut::Group { node, at }),
        1 => any::<usize>().prop_map(|node| TreeMut::Reverse { node }),
    ]
}

/// Raw bytes for a value of wire type `wire` (a varint may be an overflowing ten-byte one).
fn raw_for(wire: u8, seed: u64) -> Vec<u8> {
    match wire {
        0 => {
            let mut v = Vec::new();
            if seed.is_multiple_of(7) {
                v.extend_from_slice(&[0xff; 9]);
                v.push((seed >> 8) as u8 & 0x7f);
            } else {
                prost::encoding::encode_varint(seed, &mut v);
            }
            v
        }
        1 => seed.to_le_bytes().to_vec(),
        5 => (seed as u32).to_le_bytes().to_vec(),
        _ => seed.to_le_bytes()[..(seed % 9) as usize].to_vec(),
    }
}

/// Visits the messages in pre-order; `f` gets the n-th (modulo the count).
fn with_node(fields: &mut Vec<Field>, n: usize, f: impl FnOnce(&mut Vec<Field>)) {
    fn count(fields: &[Field]) -> usize {
        1 + fields
            .iter()
            .map(|f| match &f.body {
                Body::Msg(c) => count(c),
                Body::Raw(_) => 0,
            })
            .sum::<usize>()
    }
    fn visit<'a>(fields: &'a mut Vec<Field>, n: &mut usize) -> Option<&'a mut Vec<Field>> {
        if *n == 0 {
            return Some(fields);
        }
        *n -= 1;
        for f in fields.iter_mut() {
            if let Body::Msg(c) = &mut f.body
                && let Some(found) = visit(c, n)
            {
                return Some(found);
            }
        }
        None
    }
    let mut n = n % count(fields);
    if let Some(node) = visit(fields, &mut n) {
        f(node);
    }
}

fn apply(tree: &mut Vec<Field>, m: &TreeMut) {
    match *m {
        TreeMut::Unknown {
            node,
            at,
            number,
            wire,
            seed,
        } => with_node(tree, node, |fields| {
            let at = at % (fields.len() + 1);
            let key = number << 3 | u64::from(wire);
            fields.insert(
                at,
                Field {
                    key,
                    body: Body::Raw(raw_for(wire, seed)),
                },
            );
        }),
        TreeMut::WrongWire {
            node,
            field,
            wire,
            seed,
        } => with_node(tree, node, |fields| {
            if fields.is_empty() {
                return;
            }
            let i = field % fields.len();
            fields[i].key = (fields[i].key & !7) | u64::from(wire);
            fields[i].body = Body::Raw(raw_for(wire, seed));
        }),
        TreeMut::Duplicate { node, field } => with_node(tree, node, |fields| {
            if fields.is_empty() {
                return;
            }
            let i = field % fields.len();
            let copy = fields[i].clone();
            fields.insert(i, copy);
        }),
        TreeMut::Group { node, at } => with_node(tree, node, |fields| {
            let at = at % (fields.len() + 1);
            // field 200: start group, a varint field 1 = 5, end group.
            let mut raw = vec![0x08, 0x05];
            prost::encoding::encode_varint(200 << 3 | 4, &mut raw);
            fields.insert(
                at,
                Field {
                    key: 200 << 3 | 3,
                    body: Body::Raw(raw),
                },
            );
        }),
        TreeMut::Reverse { node } => with_node(tree, node, |fields| fields.reverse()),
    }
}

#[derive(Clone, Debug)]
enum ByteMut {
    Truncate(usize),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
}

fn byte_mut() -> impl Strategy<Value = ByteMut> {
    prop_oneof![
        (any::<usize>()).prop_map(ByteMut::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteMut::Set(i, b)),
        (any::<usize>(), vec(any::<u8>(), 1..4)).prop_map(|(i, b)| ByteMut::Insert(i, b)),
    ]
}

fn apply_bytes(body: &mut Vec<u8>, m: &ByteMut) {
    match m {
        ByteMut::Truncate(i) => body.truncate(i % (body.len() + 1)),
        ByteMut::Set(i, b) if !body.is_empty() => {
            let n = body.len();
            body[i % n] = *b;
        }
        ByteMut::Set(..) => {}
        ByteMut::Insert(i, b) => {
            let at = i % (body.len() + 1);
            body.splice(at..at, b.iter().copied());
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Compression {
    None,
    Gzip,
    Deflate,
}

#[derive(Clone, Debug)]
struct Case {
    request: ExportTraceServiceRequest,
    json: bool,
    compression: Compression,
    tree: Vec<TreeMut>,
    bytes: Vec<ByteMut>,
    /// Byte mutations hit the compressed body instead of the plain one.
    mutate_compressed: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        request(),
        prop_oneof![4 => Just(false), 1 => Just(true)],
        prop_oneof![10 => Just(Compression::None), 1 => Just(Compression::Gzip), 1 => Just(Compression::Deflate)],
        prop_oneof![2 => Just(vec![]), 1 => vec(tree_mut(), 1..4)],
        prop_oneof![3 => Just(vec![]), 1 => vec(byte_mut(), 1..3)],
        any::<bool>(),
    )
        .prop_map(|(request, json, compression, tree, bytes, mutate_compressed)| Case {
            request,
            json,
            compression,
            tree,
            bytes,
            mutate_compressed,
        })
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::None => data.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }
}

/// The plain body a case sends (before compression), and what goes on the wire.
fn render(case: &Case) -> (Vec<u8>, Vec<u8>) {
    let mut plain = if case.json {
        serde_json::to_vec(&case.request).unwrap()
    } else {
        let encoded = case.request.encode_to_vec();
        if case.tree.is_empty() {
            encoded
        } else {
            let mut tree = parse(&encoded, Kind::Request);
            for m in &case.tree {
                apply(&mut tree, m);
            }
            let mut out = Vec::new();
            encode(&tree, &mut out);
            out
        }
    };
    if !case.mutate_compressed || case.compression == Compression::None {
        for m in &case.bytes {
            apply_bytes(&mut plain, m);
        }
        let wire = compress(case.compression, &plain);
        (plain, wire)
    } else {
        let mut wire = compress(case.compression, &plain);
        for m in &case.bytes {
            apply_bytes(&mut wire, m);
        }
        (plain, wire)
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline in-process and its oracle

const LIMIT: usize = 4 * 1024 * 1024;

type SpanKey = (Vec<u8>, Vec<u8>);

fn usable(span: &Span) -> bool {
    span.trace_id.len() == 16
        && span.span_id.len() == 8
        && span.trace_id.iter().any(|&b| b != 0)
        && span.span_id.iter().any(|&b| b != 0)
}

fn span_keys(req: &ExportTraceServiceRequest, only_usable: bool) -> Vec<SpanKey> {
    let mut keys: Vec<SpanKey> = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .filter(|s| !only_usable || usable(s))
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    keys.sort();
    keys
}

/// What one request became: refused with an error, or the spans of its export payloads.
enum Outcome {
    Refused(ReceiveError),
    Delivered { parsed_spans: usize, keys: Vec<SpanKey> },
}

/// receive (decompress with the receiver's limit) → validate → route (Intake into an
/// in-memory target) → batch (at most 3 spans: records are split) → export payloads.
fn pipeline(wire_body: &[u8], compression: Compression, json: bool) -> Result<Outcome, TestCaseError> {
    let encoding = match compression {
        Compression::None => None,
        Compression::Gzip => Some("gzip"),
        Compression::Deflate => Some("deflate"),
    };
    let body = match decompress(Bytes::copy_from_slice(wire_body), encoding, LIMIT, 4) {
        Ok(b) => b,
        Err(e) => return Ok(Outcome::Refused(e)),
    };
    let parsed: Result<ParsedRequest, DecodeError> = if body.is_empty() {
        Ok(ParsedRequest::default())
    } else if json {
        wire::parse_json(&body)
    } else {
        wire::parse_protobuf(body)
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return Ok(Outcome::Refused(e.into())),
    };
    let parsed_spans = parsed.spans;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Vec<Routed>>>(1);
    let intake = Intake::new(vec![tx.into()], vec![]);
    intake
        .submit(parsed, None)
        .map_err(|e| TestCaseError::fail(format!("intake refused: {e}")))?;
    let mut batcher: Batcher<Destination, Item> = Batcher::new(BatchSettings {
        send_batch_size: 3,
        send_batch_max_size: 3,
        timeout: Duration::from_secs(1),
    });
    let now = Instant::now();
    let mut batches: Vec<OutBatch> = Vec::new();
    if let Ok(routed) = rx.try_recv() {
        for r in routed.iter() {
            batches.extend(batcher.add(r.destination.clone(), r.item.clone(), now));
        }
    }
    batches.extend(batcher.flush());
    prop_assert_eq!(batcher.take_unsplit(), 0, "an accepted record failed to split");
    let mut keys = Vec::new();
    for batch in &batches {
        prop_assert!(batch.spans <= 3 && batch.spans > 0);
        let req = ExportTraceServiceRequest::decode(batch.payload())
            .map_err(|e| TestCaseError::fail(format!("export payload does not decode: {e}")))?;
        let got = span_keys(&req, false);
        prop_assert_eq!(got.len(), batch.spans, "batch span count");
        keys.extend(got);
    }
    keys.sort();
    Ok(Outcome::Delivered { parsed_spans, keys })
}

/// Refusals the walker may make where prost decodes: depth past the relay's limit (below
/// prost's), and groups (no OTLP sender writes them).
fn stricter_than_prost(e: &ReceiveError) -> bool {
    matches!(
        e,
        ReceiveError::Malformed(DecodeError::TooDeep { .. } | DecodeError::Framing("groups are not supported"))
    )
}

#[derive(Default, Debug)]
struct Tally {
    cases: u64,
    accepted: u64,
    refused: u64,
    spans: u64,
}

fn check(case: &Case, tally: &mut Tally) -> Result<(), TestCaseError> {
    let (plain, wire_body) = render(case);
    let outcome = pipeline(&wire_body, case.compression, case.json)?;
    tally.cases += 1;
    // The independent view of the same bytes: decompressed by flate2 directly, then prost or
    // serde_json in full.
    let inflated = match case.compression {
        _ if !case.mutate_compressed || case.compression == Compression::None => Some(plain),
        _ => None,
    };
    let reference: Option<Result<ExportTraceServiceRequest, String>> = inflated.map(|b| {
        if case.json {
            if b.is_empty() {
                Ok(ExportTraceServiceRequest::default())
            } else {
                serde_json::from_slice(&b).map_err(|e| e.to_string())
            }
        } else {
            ExportTraceServiceRequest::decode(b.as_slice()).map_err(|e| e.to_string())
        }
    });
    match outcome {
        Outcome::Refused(e) => {
            tally.refused += 1;
            let status = e.http_status().as_u16();
            prop_assert!((400..500).contains(&status), "refusal {} is {}", e, status);
            prop_assert!(!e.to_string().is_empty());
            if let Some(Ok(_)) = reference
                && !stricter_than_prost(&e)
            {
                return Err(TestCaseError::fail(format!("refused ({e}) what the reference decodes")));
            }
        }
        Outcome::Delivered { parsed_spans, keys } => {
            tally.accepted += 1;
            tally.spans += keys.len() as u64;
            prop_assert_eq!(parsed_spans, keys.len(), "accepted spans = delivered spans");
            match reference {
                Some(Ok(req)) => {
                    let expected = span_keys(&req, true);
                    prop_assert_eq!(keys, expected, "delivered spans differ from the request's");
                }
                Some(Err(e)) => {
                    return Err(TestCaseError::fail(format!("accepted what the reference refuses: {e}")));
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn cases_total() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// One share of the OTLP cases; the shares run as parallel tests with distinct seeds.
fn run_share(share: u32, of: u32) {
    let cases = cases_total().div_ceil(of);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        // Rejections are not used; keep proptest's own output quiet.
        verbose: 0,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0000 + u64::from(share) + seed_offset()),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let tally = std::cell::RefCell::new(Tally::default());
    let started = Instant::now();
    let result = runner.run(&case(), |c| check(&c, &mut tally.borrow_mut()));
    let t = tally.into_inner();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz share {share}/{of}: {} cases in {secs:.1}s ({:.0}/s); accepted {}, refused {}, {} spans delivered",
        t.cases,
        t.cases as f64 / secs,
        t.accepted,
        t.refused,
        t.spans
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // The mix must exercise both sides.
    assert!(t.accepted * 10 > t.cases && t.refused * 20 > t.cases, "{t:?}");
}

/// A different seed per CI run when FUZZ_SEED is set (printed on failure via the case).
fn seed_offset() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn otlp_requests_share_1() {
    run_share(1, 4);
}

#[test]
fn otlp_requests_share_2() {
    run_share(2, 4);
}

#[test]
fn otlp_requests_share_3() {
    run_share(3, 4);
}

#[test]
fn otlp_requests_share_4() {
    run_share(4, 4);
}

// ---------------------------------------------------------------------------------------------
// The config loader: YAML with env substitution

const REPO_CONFIG: &str = include_str!("../config.yaml");

#[derive(Clone, Debug)]
enum TextMut {
    Insert(usize, String),
    Delete(usize, usize),
    DropLine(usize),
}

fn text_mut() -> impl Strategy<Value = TextMut> {
    let snippet = prop_oneof![
        proptest::sample::select(vec![
            "${env:A}",
            "${env:A:-x}",
            "${env:}",
            "${",
            "}",
            "${env:B:-${env:A}}",
            "$${env:A}",
            "\n  ",
            ": ",
            "- ",
            "[",
            "]",
            "{",
            "}",
            "\"",
            "'",
            "&a ",
            "*a",
            "!!binary ",
            "<<: *a",
            "0x",
            "-1",
            "1e400",
            "999999999999",
            "ms",
            "h",
            "\t",
            "#",
            "|",
            ">",
            "~",
            "null",
            "---\n",
            "...",
        ])
        .prop_map(String::from),
        vec(any::<char>(), 1..5).prop_map(String::from_iter),
    ];
    prop_oneof![
        3 => (any::<usize>(), snippet).prop_map(|(i, s)| TextMut::Insert(i, s)),
        1 => (any::<usize>(), 1usize..20).prop_map(|(i, n)| TextMut::Delete(i, n)),
        1 => any::<usize>().prop_map(TextMut::DropLine),
    ]
}

fn mutate_text(text: &str, muts: &[TextMut]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for m in muts {
        match m {
            TextMut::Insert(i, s) => {
                let at = i % (chars.len() + 1);
                chars.splice(at..at, s.chars());
            }
            TextMut::Delete(i, n) => {
                let at = i % (chars.len() + 1);
                let end = (at + n).min(chars.len());
                chars.drain(at..end);
            }
            TextMut::DropLine(i) => {
                let s: String = chars.iter().collect();
                let mut lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    lines.remove(i % n);
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

/// Mutated configs (the repo's, with env references everywhere) and hostile variable values:
/// the loader answers Ok or errors that each name a path or a message, never panics.
#[test]
fn config_loader() {
    let values = vec![
        "",
        "127.0.0.1:0",
        "x",
        "${env:A}",
        "\n",
        "a: b",
        "[",
        "99999999999999999999",
        "-5",
        "1e3",
        "0s",
        "ü",
    ];
    let env = (
        proptest::sample::select(values.clone()),
        proptest::sample::select(values),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 4_000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0xc0f1 + seed_offset()),
        ..Config::default()
    });
    let started = Instant::now();
    runner
        .run(&(vec(text_mut(), 0..6), env), |(muts, (a, b, unset))| {
            let text = mutate_text(REPO_CONFIG, &muts);
            let lookup = move |name: &str| -> Option<String> {
                match name {
                    "A" if !unset => Some(a.to_string()),
                    "B" => Some(b.to_string()),
                    n if n.starts_with("OTLP_RELAY_") || n == "MLFLOW_ENDPOINT" => (!unset).then(|| a.to_string()),
                    _ => None,
                }
            };
            if let Err(errors) = otlp_relay::config::parse_str(&text, &lookup) {
                prop_assert!(!errors.0.is_empty());
                for e in &errors.0 {
                    prop_assert!(!e.message.is_empty(), "an error without a message: {e:?}");
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("config loader: 4000 cases in {:.1}s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// The spool's record reader: corrupted segments

/// Segments of valid records, then corrupted (bytes set, truncated, inserted): scanning never
/// panics, every record before the first damaged byte is read back, and whatever the reader
/// hands on (even a record whose payload is garbage behind a valid checksum) goes through the
/// batcher without a panic.
#[test]
fn spool_record_reader() {
    use otlp_relay::spool::frame;
    use otlp_relay::spool::proto::Record;
    let record = (vec(any::<u8>(), 0..64), 0u32..5, text()).prop_map(|(payload, spans, experiment)| Record {
        payload,
        spans,
        experiment,
        ..Default::default()
    });
    let mut runner = TestRunner::new(Config {
        cases: 20_000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5b001 + seed_offset()),
        ..Config::default()
    });
    runner
        .run(
            &(vec(record, 0..8), vec(byte_mut(), 0..3), any::<bool>()),
            |(records, muts, real_payloads)| {
                const SEED: u32 = 0x5eed;
                let mut segment = frame::file_header(SEED).to_vec();
                let mut ends = Vec::new();
                let mut before = 0u64;
                for r in &records {
                    let mut r = r.clone();
                    if real_payloads {
                        r.payload = wire::encode_record(&ResourceSpans {
                            scope_spans: vec![ScopeSpans {
                                spans: vec![Span {
                                    trace_id: vec![1; 16],
                                    span_id: vec![2; 8],
                                    ..Default::default()
                                }],
                                ..Default::default()
                            }],
                            ..Default::default()
                        })
                        .to_vec();
                    }
                    frame::encode(&r, SEED, before, &mut segment);
                    before += u64::from(r.spans);
                    ends.push(segment.len());
                }
                let clean = segment.clone();
                for m in &muts {
                    apply_bytes(&mut segment, m);
                }
                // The first byte that differs from the clean segment.
                let first_bad = clean
                    .iter()
                    .zip(&segment)
                    .position(|(a, b)| a != b)
                    .unwrap_or(clean.len().min(segment.len()));
                let intact = ends.iter().filter(|&&e| e <= first_bad).count();
                let scan = frame::scan(&segment);
                prop_assert!(scan.records.len() >= intact, "{} < {intact}", scan.records.len());
                let mut batcher: Batcher<Destination, Item> = Batcher::new(BatchSettings {
                    send_batch_size: 2,
                    send_batch_max_size: 2,
                    timeout: Duration::from_secs(1),
                });
                let now = Instant::now();
                for r in scan.records {
                    let routed = otlp_relay::spool::record_to_routed(r, Some(1));
                    if routed.item.chunk.spans > 0 {
                        drop(batcher.add(routed.destination, routed.item, now));
                    }
                }
                drop(batcher.flush());
                Ok(())
            },
        )
        .unwrap();
}

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
            if wire::parse_protobuf(Bytes::from(body.clone())).is_ok() {
                write(&body);
            }
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
    // Past upb's limit: 60 array levels in a span attribute are 126 message levels.
    let mut deep = AnyValue {
        value: Some(Value::IntValue(1)),
    };
    for _ in 0..60 {
        deep = AnyValue {
            value: Some(Value::ArrayValue(ArrayValue { values: vec![deep] })),
        };
    }
    let too_deep = ExportTraceServiceRequest {
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
    .encode_to_vec();
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
