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
#[path = "../support/mod.rs"]
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

mod config_and_spool;
mod python;
mod requests;

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

/// A different seed per CI run when FUZZ_SEED is set (printed on failure via the case).
fn seed_offset() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
