//! OTLP trace payloads on the wire: validate and count a request, cut it into encoded
//! ResourceSpans without re-encoding, and split one when a batch needs fewer spans.
//!
//! `ExportTraceServiceRequest` is `repeated ResourceSpans resource_spans = 1`, so the encoding of
//! a merged request is the concatenation of its parts' field-1 records.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use bytes::{Bytes, BytesMut};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValueKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

use super::walk;
use crate::otlp::{ExperimentId, varint};

/// The resource attribute that routes a ResourceSpans to another MLflow experiment.
pub const EXPERIMENT_ATTRIBUTE: &str = "mlflow.experiment_id";

/// One ResourceSpans, encoded as a complete field-1 record of ExportTraceServiceRequest.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceChunk {
    pub bytes: Bytes,
    pub spans: usize,
    /// The `mlflow.experiment_id` resource attribute, if any.
    pub experiment: Option<String>,
}

/// A validated request, ready for the pipeline.
#[derive(Debug, Default, PartialEq)]
pub struct ParsedRequest {
    pub chunks: Vec<ResourceChunk>,
    /// Spans accepted (in `chunks`).
    pub spans: usize,
    /// Spans refused as invalid (reported as partial_success).
    pub rejected: usize,
    pub rejection: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid OTLP/JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid protobuf framing: {0}")]
    Framing(&'static str),
    #[error(
        "{place} value nested deeper than {limit} protobuf message levels (counted from the request); \
         MLflow could not parse it"
    )]
    TooDeep { place: &'static str, limit: u32 },
    #[error("cannot split a record: {0}")]
    Split(&'static str),
}

/// Where parsing asks for the memory it takes beyond the request body, before allocating it.
/// The receivers charge their memory budget; tests and tools use [`Unbudgeted`].
pub trait DecodeBudget {
    /// What a refusal is; malformed input is one too.
    type Error: From<DecodeError>;
    /// A copy of (parts of) the body: never more bytes than the body has.
    fn hold_copy(&mut self, bytes: usize) -> Result<(), Self::Error>;
    /// An estimate of a decoded, in-memory form, which may be many times the body's size: a
    /// request that could never fit is refused, not let through as a lone request.
    fn hold_decoded(&mut self, bytes: usize) -> Result<(), Self::Error>;
}

/// No budget: parsing takes what it needs.
pub struct Unbudgeted;

impl DecodeBudget for Unbudgeted {
    type Error = DecodeError;
    fn hold_copy(&mut self, _: usize) -> Result<(), DecodeError> {
        Ok(())
    }
    fn hold_decoded(&mut self, _: usize) -> Result<(), DecodeError> {
        Ok(())
    }
}

/// Validates an `ExportTraceServiceRequest` in protobuf and slices its ResourceSpans records.
pub fn parse_protobuf(body: Bytes) -> Result<ParsedRequest, DecodeError> {
    parse_protobuf_within(body, &mut Unbudgeted)
}

/// What a kept record costs in memory while it is parsed, beyond its bytes: its entry in the
/// list of kept records and the chunk it becomes.
const RECORD_COST: usize = std::mem::size_of::<Keep>() + std::mem::size_of::<ResourceChunk>();
/// Records are charged for this many at a time at least.
const RECORD_CHARGE_STEP: usize = 64;

/// A record as it will be kept: the body's own bytes, or rebuilt without its unusable spans.
enum Keep {
    Slice(walk::Record),
    Rebuilt(walk::Record, walk::Kept),
}

/// Validates an `ExportTraceServiceRequest` in protobuf and slices its ResourceSpans records.
/// Nothing is decoded: spans with unusable ids are left out by rebuilding their record from its
/// bytes (no larger than the record), so the memory parsing takes is bounded by the body's size
/// whatever the body frames (millions of empty spans cost nothing but their bytes). When records
/// are rebuilt, or the records kept are less than half the body, everything kept is copied into
/// one buffer of its exact size, charged to `budget` first: the chunks then hold what the
/// memory budget charges for them (their bytes), not the whole body behind a slice.
pub fn parse_protobuf_within<B: DecodeBudget>(body: Bytes, budget: &mut B) -> Result<ParsedRequest, B::Error> {
    let mut parsed = ParsedRequest::default();
    let mut kept = Vec::new();
    let (mut kept_bytes, mut rebuilt) = (0usize, false);
    walk::request_each::<B::Error>(&body, |record| {
        if kept.len() == kept.capacity() {
            // The list of records kept, and the items they become, are memory beyond the
            // bytes: a body of 470,000 one-span records is 16 MB but took 124 MB.
            let more = kept.capacity().max(RECORD_CHARGE_STEP);
            budget.hold_copy(more.saturating_mul(RECORD_COST))?;
            kept.reserve_exact(more);
        }
        if record.invalid_spans > 0 {
            let k = walk::kept(&body[record.message.clone()])?;
            if (k.spans, k.dropped) != (record.spans - record.invalid_spans, record.invalid_spans) {
                return Err(DecodeError::Framing("span count changed while the record was rebuilt").into());
            }
            parsed.rejected += k.dropped;
            if k.spans > 0 {
                kept_bytes += k.field_len();
                rebuilt = true;
                kept.push(Keep::Rebuilt(record, k));
            }
        } else if record.spans > 0 {
            kept_bytes += record.field.len();
            kept.push(Keep::Slice(record));
        }
        Ok(())
    })?;
    if parsed.rejected > 0 {
        parsed.rejection = Some(rejection(parsed.rejected));
    }
    if !rebuilt && kept_bytes.saturating_mul(2) >= body.len() {
        for k in kept {
            if let Keep::Slice(record) = k {
                parsed.push(body.slice(record.field), record.spans, record.experiment);
            }
        }
        return Ok(parsed);
    }
    budget.hold_copy(kept_bytes)?;
    let mut out = Vec::with_capacity(kept_bytes);
    let mut spans = Vec::with_capacity(kept.len());
    for k in kept {
        let start = out.len();
        match k {
            Keep::Slice(record) => {
                out.extend_from_slice(&body[record.field.clone()]);
                spans.push((start..out.len(), record.spans, record.experiment));
            }
            Keep::Rebuilt(record, k) => {
                walk::write_kept(&body[record.message.clone()], &k, &mut out)?;
                spans.push((start..out.len(), k.spans, record.experiment));
            }
        }
    }
    if out.len() != kept_bytes {
        return Err(DecodeError::Framing("records changed while they were copied").into());
    }
    drop(body);
    let out = Bytes::from(out);
    for (range, count, experiment) in spans {
        parsed.push(out.slice(range), count, experiment);
    }
    Ok(parsed)
}

fn rejection(rejected: usize) -> String {
    format!("{rejected} span(s) rejected: trace_id must be 16 bytes and span_id 8 bytes, not all zero")
}

/// Parses OTLP/JSON (hex ids, lowerCamelCase keys; unknown fields ignored) and encodes each
/// ResourceSpans as protobuf. The encoding then passes the same walk as a protobuf request, so
/// one rule (nesting depth above all) holds whatever the client sent.
pub fn parse_json(body: &[u8]) -> Result<ParsedRequest, DecodeError> {
    parse_json_within(body, &mut Unbudgeted)
}

/// Like [`parse_json`], charging `budget` first with an upper bound of what the decoded request
/// and its encoding take ([`json_decoded_estimate`]): serde builds the whole request in memory,
/// and `{}` (two bytes) becomes a Span of hundreds. The decoded request is dropped as it is
/// encoded, one ResourceSpans at a time.
pub fn parse_json_within<B: DecodeBudget>(body: &[u8], budget: &mut B) -> Result<ParsedRequest, B::Error> {
    budget.hold_decoded(json_decoded_estimate(body))?;
    let request: ExportTraceServiceRequest = serde_json::from_slice(body).map_err(DecodeError::from)?;
    let mut parsed = ParsedRequest::default();
    for rs in request.resource_spans {
        parsed.add(rs);
    }
    for chunk in &parsed.chunks {
        super::walk::request(&chunk.bytes)?;
    }
    Ok(parsed)
}

/// The most one JSON object or array can become in memory: the largest OTLP message it can
/// decode to, twice (a Vec grows by doubling, so up to half its capacity is spare), plus an
/// allocation's bookkeeping.
fn json_object_cost() -> usize {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{Status, span};
    use std::mem::size_of;
    let largest = [
        size_of::<ResourceSpans>(),
        size_of::<Resource>(),
        size_of::<ScopeSpans>(),
        size_of::<InstrumentationScope>(),
        size_of::<Span>(),
        size_of::<span::Event>(),
        size_of::<span::Link>(),
        size_of::<Status>(),
        size_of::<KeyValue>(),
        size_of::<AnyValue>(),
        size_of::<ArrayValue>(),
        size_of::<KeyValueList>(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    2 * largest + ALLOCATION_OVERHEAD
}

/// What the allocator takes per allocation beyond its bytes, at least (its smallest chunk).
const ALLOCATION_OVERHEAD: usize = 32;

/// An upper bound of the memory decoding `body` as OTLP/JSON takes: every object or array
/// (counted outside strings) at [`json_object_cost`], every string as an allocation of its own,
/// the body's size twice for string contents (the String, and serde's scratch copy of a string
/// with escapes; hex ids and escapes only shrink) and once more for the protobuf encoding (never
/// larger than the JSON it came from, whose every field needs a quoted name). One pass, no
/// allocation. tests/json_estimate.rs measures it against an allocator.
pub fn json_decoded_estimate(body: &[u8]) -> usize {
    let (mut containers, mut strings) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            strings += 1;
        } else if b == b'{' || b == b'[' {
            containers += 1;
        }
    }
    containers
        .saturating_mul(json_object_cost())
        .saturating_add(strings.saturating_mul(ALLOCATION_OVERHEAD))
        .saturating_add(body.len().saturating_mul(3))
}

impl ParsedRequest {
    fn push(&mut self, bytes: Bytes, spans: usize, experiment: Option<String>) {
        self.spans += spans;
        self.chunks.push(ResourceChunk {
            bytes,
            spans,
            experiment,
        });
    }

    fn add(&mut self, mut rs: ResourceSpans) {
        let total: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
        let invalid = rs
            .scope_spans
            .iter()
            .flat_map(|s| &s.spans)
            .filter(|s| !span_ids_valid(s))
            .count();
        if invalid > 0 {
            for scope in &mut rs.scope_spans {
                scope.spans.retain(span_ids_valid);
            }
            rs.scope_spans.retain(|s| !s.spans.is_empty());
            self.rejected += invalid;
            self.rejection = Some(rejection(self.rejected));
        }
        let spans = total - invalid;
        if spans == 0 {
            return;
        }
        let experiment = experiment_of(&rs);
        let bytes = encode_record(&rs);
        self.spans += spans;
        self.chunks.push(ResourceChunk {
            bytes,
            spans,
            experiment,
        });
    }
}

fn span_ids_valid(span: &Span) -> bool {
    span.trace_id.len() == 16
        && span.span_id.len() == 8
        && span.trace_id.iter().any(|&b| b != 0)
        && span.span_id.iter().any(|&b| b != 0)
}

pub(crate) fn experiment_of(rs: &ResourceSpans) -> Option<String> {
    let attrs = &rs.resource.as_ref()?.attributes;
    let value = attrs
        .iter()
        .find(|kv| kv.key == EXPERIMENT_ATTRIBUTE)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    let id = match value {
        AnyValueKind::StringValue(s) => s.trim().to_string(),
        AnyValueKind::IntValue(i) => i.to_string(),
        _ => return None,
    };
    ExperimentId::parse(&id).map(ExperimentId::into_string)
}

/// Encodes one ResourceSpans as a field-1 record (tag, length, message). Cannot fail: the
/// buffer is sized first and grows anyway.
pub fn encode_record(rs: &ResourceSpans) -> Bytes {
    let mut buf = BytesMut::with_capacity(rs.encoded_len() + 11);
    prost::encoding::message::encode(1, rs, &mut buf);
    buf.freeze()
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    varint::read(buf, pos).map_err(|e| DecodeError::Framing(e.message()))
}

/// Splits a record so the first part holds `first` spans (0 < first < chunk.spans). Records
/// passed the walk on receipt, so this does not fail for them; a record that does not decode
/// (or whose span count differs) is an error for the caller to handle, never a panic.
pub fn split_chunk(chunk: &ResourceChunk, first: usize) -> Result<(ResourceChunk, ResourceChunk), DecodeError> {
    if first == 0 || first >= chunk.spans {
        return Err(DecodeError::Split("split point outside the record"));
    }
    let mut pieces = split_chunk_pieces(chunk, first, chunk.spans - first)?.into_iter();
    match (pieces.next(), pieces.next()) {
        (Some(head), Some(tail)) => Ok((head, tail)),
        _ => Err(DecodeError::Split("split point outside the record")),
    }
}

/// Cuts a record into pieces of `first` spans, then `size` spans each, the last holding what
/// is left, in one pass over its bytes: nothing is decoded (cutting a large record one batch at a
/// time decoded the rest again for every cut, which made a 400,000-span request take minutes;
/// decoding it once still took about 13 times its size in memory, outside the budget).
pub fn split_chunk_pieces(chunk: &ResourceChunk, first: usize, size: usize) -> Result<Vec<ResourceChunk>, DecodeError> {
    if first == 0 || first >= chunk.spans || size == 0 {
        return Err(DecodeError::Split("split point outside the record"));
    }
    let message = record_message(&chunk.bytes)?;
    // Records are validated on receipt; one that is not (a damaged spool record) is refused
    // here rather than cut into pieces MLflow could not parse.
    let counted = walk::request(&chunk.bytes)?;
    if counted.len() != 1 || counted[0].spans != chunk.spans {
        return Err(DecodeError::Split(
            "record holds a different span count than counted on receipt",
        ));
    }
    let count = 1 + (chunk.spans - first).div_ceil(size);
    let max_out = chunk
        .bytes
        .len()
        .saturating_mul(2)
        .saturating_add(count.saturating_mul(SPLIT_ALLOWANCE));
    let pieces = walk::split_message(message, first, size, max_out)?;
    let total: usize = pieces.iter().map(|p| p.1).sum();
    if total != chunk.spans {
        return Err(DecodeError::Split(
            "record holds a different span count than counted on receipt",
        ));
    }
    Ok(pieces
        .into_iter()
        .map(|(bytes, spans)| ResourceChunk {
            bytes: Bytes::from(bytes),
            spans,
            experiment: chunk.experiment.clone(),
        })
        .collect())
}

/// The bytes each piece of a split may copy (resource, scopes, framing) beyond twice the
/// record's size in all: real resources are a few hundred bytes.
const SPLIT_ALLOWANCE: usize = 1024;

/// The ResourceSpans message of a record (a request field: key, length, message), which must
/// be the whole of `bytes`.
fn record_message(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    let mut pos = 0;
    read_varint(bytes, &mut pos)?;
    let len =
        usize::try_from(read_varint(bytes, &mut pos)?).map_err(|_| DecodeError::Split("record length overflows"))?;
    match pos.checked_add(len) {
        Some(end) if end == bytes.len() => Ok(&bytes[pos..end]),
        _ => Err(DecodeError::Split("record shorter than its length")),
    }
}

#[cfg(test)]
pub mod testdata {
    //! Small OTLP requests for unit tests.
    use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    pub fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    pub fn span(seed: u64) -> Span {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&(seed + 1).to_be_bytes());
        Span {
            trace_id: trace_id.to_vec(),
            span_id: (seed + 1).to_be_bytes().to_vec(),
            name: format!("span-{seed}"),
            start_time_unix_nano: 1_700_000_000_000_000_000 + seed,
            end_time_unix_nano: 1_700_000_000_100_000_000 + seed,
            ..Default::default()
        }
    }

    /// A ResourceSpans with `scopes` scopes of `per_scope` spans, ids starting at `first`.
    pub fn resource_spans(service: &str, first: u64, scopes: usize, per_scope: usize) -> ResourceSpans {
        let mut next = first;
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: (0..scopes)
                .map(|s| ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: format!("scope-{s}"),
                        ..Default::default()
                    }),
                    spans: (0..per_scope)
                        .map(|_| {
                            next += 1;
                            span(next)
                        })
                        .collect(),
                    schema_url: String::new(),
                })
                .collect(),
            schema_url: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::*;
    use super::*;

    fn request(parts: Vec<ResourceSpans>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest { resource_spans: parts }
    }

    #[test]
    fn records_are_the_original_bytes() {
        let req = request(vec![resource_spans("a", 0, 2, 3), resource_spans("b", 100, 1, 1)]);
        let body = Bytes::from(req.encode_to_vec());
        let parsed = parse_protobuf(body.clone()).unwrap();
        assert_eq!(parsed.spans, 7);
        assert_eq!(parsed.chunks.iter().map(|c| c.spans).collect::<Vec<_>>(), vec![6, 1]);
        let joined: Vec<u8> = parsed.chunks.iter().flat_map(|c| c.bytes.to_vec()).collect();
        assert_eq!(joined, body.to_vec());
    }

    #[test]
    fn unknown_top_level_fields_are_skipped() {
        let mut body = request(vec![resource_spans("a", 0, 1, 2)]).encode_to_vec();
        // field 9, varint 5; field 10, length-delimited "hi"
        body.extend_from_slice(&[0x48, 5, 0x52, 2, b'h', b'i']);
        let parsed = parse_protobuf(Bytes::from(body)).unwrap();
        assert_eq!(parsed.spans, 2);
        let rs = ExportTraceServiceRequest::decode(parsed.chunks[0].bytes.clone()).unwrap();
        assert_eq!(rs, request(vec![resource_spans("a", 0, 1, 2)]));
    }

    #[test]
    fn malformed_protobuf_is_an_error() {
        assert!(parse_protobuf(Bytes::from_static(&[0x0a, 0x05, 0x01])).is_err());
        assert!(parse_protobuf(Bytes::from_static(b"not protobuf at all")).is_err());
    }

    #[test]
    fn empty_request_is_empty() {
        let parsed = parse_protobuf(Bytes::new()).unwrap();
        assert_eq!(parsed, ParsedRequest::default());
        assert_eq!(parse_json(b"{}").unwrap(), ParsedRequest::default());
    }

    #[test]
    fn json_matches_protobuf() {
        let req = request(vec![resource_spans("a", 0, 1, 2)]);
        let json = serde_json::to_vec(&req).unwrap();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"traceId\":\"0000000000000002"), "{text}");
        let from_json = parse_json(&json).unwrap();
        let from_proto = parse_protobuf(Bytes::from(req.encode_to_vec())).unwrap();
        assert_eq!(from_json, from_proto);
    }

    #[test]
    fn json_accepts_unknown_fields_and_integer_times() {
        let body = br#"{"resourceSpans":[{"resource":{"attributes":[]},"scopeSpans":[{"spans":[
            {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"x",
             "startTimeUnixNano":1544712660000000000,"endTimeUnixNano":"1544712661000000000","kind":2,
             "futureField":{"a":1}}]}]}],"extra":true}"#;
        let parsed = parse_json(body).unwrap();
        assert_eq!(parsed.spans, 1);
    }

    #[test]
    fn invalid_ids_are_rejected_individually() {
        let mut rs = resource_spans("a", 0, 1, 3);
        rs.scope_spans[0].spans[1].span_id = vec![0; 8];
        rs.scope_spans[0].spans[2].trace_id = vec![1; 3];
        let parsed = parse_protobuf(Bytes::from(request(vec![rs]).encode_to_vec())).unwrap();
        assert_eq!((parsed.spans, parsed.rejected), (1, 2));
        assert!(parsed.rejection.unwrap().contains("2 span(s)"));
        let back = ExportTraceServiceRequest::decode(parsed.chunks[0].bytes.clone()).unwrap();
        assert_eq!(back.resource_spans[0].scope_spans[0].spans.len(), 1);
    }

    /// A random request framed by hand, with unknown fields at every level (each a unique
    /// marker that must survive when its message is kept), spans with every kind of unusable id,
    /// repeated id fields (the last counts), nested attribute values and empty scopes; and the
    /// reference answer: prost's decode, filtered as the relay's rule says.
    struct Case {
        body: Vec<u8>,
        reference: ExportTraceServiceRequest,
        rejected: usize,
        /// Markers inside messages that are kept.
        kept_markers: Vec<Vec<u8>>,
        dropped_markers: Vec<Vec<u8>>,
    }

    fn field(key: u8, payload: &[u8], out: &mut Vec<u8>) {
        out.push(key);
        prost::encoding::encode_varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    fn random_case(seed: u64) -> Case {
        use crate::loadgen::spans::FastRng;
        use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
        let mut rng = FastRng::new(seed);
        let mut pick = |n: u64| (rng.next_u64() % n) as usize;
        let mut next_marker = 0u32;
        let mut marker = || {
            next_marker += 1;
            // Unknown field 99 (length-delimited): key 0x9a 0x06.
            let text = format!("marker-{seed}-{next_marker}");
            let mut out = vec![0x9a, 0x06];
            prost::encoding::encode_varint(text.len() as u64, &mut out);
            out.extend_from_slice(text.as_bytes());
            out
        };
        let nested = |levels: usize| {
            let mut value = AnyValue {
                value: Some(any_value::Value::IntValue(levels as i64)),
            };
            for _ in 0..levels {
                value = AnyValue {
                    value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![value] })),
                };
            }
            vec![KeyValue {
                key: "nested".into(),
                value: Some(value),
                ..Default::default()
            }]
        };
        let (mut body, mut reference, mut rejected) = (Vec::new(), Vec::new(), 0);
        let (mut kept_markers, mut dropped_markers) = (Vec::new(), Vec::new());
        let mut id = 0u64;
        for r in 0..1 + pick(4) {
            let mut rs = resource_spans(&format!("svc-{r}"), 0, 0, 0);
            rs.resource.as_mut().unwrap().attributes.extend(nested(pick(20)));
            let mut rs_bytes = rs.encode_to_vec();
            let mut rs_markers = vec![];
            if pick(2) == 0 {
                let m = marker();
                rs_bytes.extend_from_slice(&m);
                rs_markers.push(m);
            }
            let (mut total, mut invalid) = (0, 0);
            let mut scopes_ref = Vec::new();
            let mut scope_markers = Vec::new();
            for s in 0..pick(5) {
                let mut scope = resource_spans("x", 0, 1, 0).scope_spans.remove(0);
                scope.schema_url = format!("https://schema/{s}");
                let mut scope_bytes = scope.encode_to_vec();
                let mut markers = vec![];
                if pick(2) == 0 {
                    let m = marker();
                    scope_bytes.extend_from_slice(&m);
                    markers.push(m);
                }
                let mut span_refs = Vec::new();
                for _ in 0..pick(7) {
                    id += 1;
                    let mut span = super::testdata::span(id + seed * 1000);
                    if pick(3) == 0 {
                        span.attributes = nested(pick(25));
                    }
                    let mut bytes = Vec::new();
                    match pick(9) {
                        0 => span.trace_id = vec![0; 16],
                        1 => span.span_id = vec![0; 8],
                        2 => span.trace_id.truncate(15),
                        3 => span.span_id = vec![],
                        4 => span.trace_id = vec![],
                        5 => span.span_id.push(1),
                        _ => {}
                    }
                    span.encode_to_vec().into_iter().for_each(|b| bytes.push(b));
                    // A repeated id field: the last one counts (prost merges a singular bytes
                    // field by replacing it).
                    match pick(8) {
                        0 => {
                            field(0x0a, &[0; 16], &mut bytes);
                            span.trace_id = vec![0; 16];
                        }
                        1 => {
                            field(0x12, &[5; 8], &mut bytes);
                            span.span_id = vec![5; 8];
                        }
                        _ => {}
                    }
                    let m = (pick(3) == 0).then(&mut marker);
                    if let Some(m) = &m {
                        bytes.extend_from_slice(m);
                    }
                    field(0x12, &bytes, &mut scope_bytes);
                    total += 1;
                    if span_ids_valid(&span) {
                        span_refs.push(span);
                        markers.extend(m);
                    } else {
                        invalid += 1;
                        dropped_markers.extend(m);
                    }
                }
                if pick(4) == 0 {
                    // An unknown varint field between the spans.
                    scope_bytes.extend_from_slice(&[0xa0, 0x06, 0x2a]);
                }
                field(0x12, &scope_bytes, &mut rs_bytes);
                scope.spans = span_refs;
                scope_markers.push((scope.spans.is_empty(), markers));
                scopes_ref.push(scope);
            }
            field(0x0a, &rs_bytes, &mut body);
            if pick(3) == 0 {
                // An unknown top-level field between records.
                let m = marker();
                body.extend_from_slice(&m);
                dropped_markers.push(m);
            }
            rejected += invalid;
            let any_kept = total > invalid;
            for (empty, markers) in scope_markers {
                // A record with no unusable span is kept whole, empty scopes included.
                if any_kept && (invalid == 0 || !empty) {
                    kept_markers.extend(markers);
                } else {
                    dropped_markers.extend(markers);
                }
            }
            if any_kept {
                kept_markers.extend(rs_markers);
                if invalid > 0 {
                    scopes_ref.retain(|s| !s.spans.is_empty());
                }
                rs.scope_spans = scopes_ref;
                reference.push(rs);
            } else {
                dropped_markers.extend(rs_markers);
            }
        }
        Case {
            body,
            reference: request(reference),
            rejected,
            kept_markers,
            dropped_markers,
        }
    }

    /// Records what parsing asks of its budget.
    #[derive(Default)]
    struct Recorder {
        copies: Vec<usize>,
        decoded: Vec<usize>,
    }

    impl DecodeBudget for Recorder {
        type Error = DecodeError;
        fn hold_copy(&mut self, bytes: usize) -> Result<(), DecodeError> {
            self.copies.push(bytes);
            Ok(())
        }
        fn hold_decoded(&mut self, bytes: usize) -> Result<(), DecodeError> {
            self.decoded.push(bytes);
            Ok(())
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Spans with unusable ids are dropped from the bytes, without a decode: on thousands of
    /// random requests the result decodes to exactly what prost's decode, filtered, gives; the
    /// counts are the same; unknown fields in what is kept survive; nothing grows; and the one
    /// copy is charged to the budget before it is made.
    #[test]
    fn rebuilt_records_equal_prost_decoded_then_filtered() {
        let (mut rebuilt, mut with_unknown) = (0, 0);
        for seed in 0..3000 {
            let case = random_case(seed);
            let mut recorder = Recorder::default();
            let parsed = parse_protobuf_within(Bytes::from(case.body.clone()), &mut recorder).unwrap();
            let joined: Vec<u8> = parsed.chunks.iter().flat_map(|c| c.bytes.to_vec()).collect();
            let back = ExportTraceServiceRequest::decode(joined.as_slice()).unwrap();
            assert_eq!(back, case.reference, "seed {seed}");
            let expected_spans: usize = case
                .reference
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            assert_eq!(
                (parsed.spans, parsed.rejected),
                (expected_spans, case.rejected),
                "seed {seed}"
            );
            assert_eq!(parsed.rejection.is_some(), case.rejected > 0);
            for (chunk, rs) in parsed.chunks.iter().zip(&case.reference.resource_spans) {
                let counted: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
                assert_eq!(chunk.spans, counted, "seed {seed}");
            }
            assert!(joined.len() <= case.body.len(), "seed {seed}");
            for m in &case.kept_markers {
                assert!(contains(&joined, m), "seed {seed}: kept marker lost");
                with_unknown += 1;
            }
            for m in &case.dropped_markers {
                assert!(!contains(&joined, m), "seed {seed}: dropped marker kept");
            }
            assert!(recorder.decoded.is_empty(), "protobuf is never decoded");
            if case.rejected > 0 && parsed.spans > 0 {
                rebuilt += 1;
                assert_eq!(recorder.copies.last(), Some(&joined.len()), "seed {seed}");
            }
            // What the walk accepts, the rebuilt bytes pass again unchanged.
            let again = parse_protobuf(Bytes::from(joined.clone())).unwrap();
            assert_eq!((again.spans, again.rejected), (parsed.spans, 0));
        }
        assert!(
            rebuilt > 1000 && with_unknown > 1000,
            "{rebuilt} rebuilt, {with_unknown} markers"
        );
    }

    /// The reproduction: millions of empty spans (unusable ids) around one good one. Parsing
    /// copies only the good span's record, and the body is released (nothing slices it).
    #[test]
    fn millions_of_empty_spans_cost_their_bytes_only() {
        let good = super::testdata::span(1).encode_to_vec();
        let mut scope = Vec::with_capacity(4_000_000);
        for _ in 0..1_000_000 {
            scope.extend_from_slice(&[0x12, 0x00]);
        }
        field(0x12, &good, &mut scope);
        let mut rs = Vec::new();
        field(0x12, &scope, &mut rs);
        let mut body = Vec::new();
        field(0x0a, &rs, &mut body);
        let mut recorder = Recorder::default();
        let parsed = parse_protobuf_within(Bytes::from(body), &mut recorder).unwrap();
        assert_eq!((parsed.spans, parsed.rejected), (1, 1_000_000));
        let len = parsed.chunks[0].bytes.len();
        assert!(len < 100, "{len}");
        assert_eq!(recorder.copies, vec![RECORD_CHARGE_STEP * RECORD_COST, len]);
        // Many empty records (no spans) are not kept either, nor listed while walking.
        let body = Bytes::from([0x0a, 0x00].repeat(1_000_000));
        assert_eq!(parse_protobuf(body).unwrap(), ParsedRequest::default());
    }

    /// A body that is mostly bytes no record keeps (unknown fields) is not held behind slices
    /// of the records: they are copied out, charged first.
    #[test]
    fn records_are_copied_out_of_a_mostly_unused_body() {
        let mut body = request(vec![resource_spans("a", 0, 1, 1)]).encode_to_vec();
        let record_len = body.len();
        let mut junk = Vec::new();
        field(0x52, &vec![b'x'; 100_000], &mut junk);
        body.extend_from_slice(&junk);
        let mut recorder = Recorder::default();
        let parsed = parse_protobuf_within(Bytes::from(body), &mut recorder).unwrap();
        assert_eq!(parsed.spans, 1);
        assert_eq!(recorder.copies, vec![RECORD_CHARGE_STEP * RECORD_COST, record_len]);
        assert_eq!(parsed.chunks[0].bytes.len(), record_len);
    }

    /// Records are charged for the memory they take beyond their bytes as they are listed: a
    /// body of many one-span records costs far more than its size.
    #[test]
    fn many_records_are_charged_as_they_are_listed() {
        let body = request((0..1000).map(|i| resource_spans("a", i * 10, 1, 1)).collect()).encode_to_vec();
        let mut recorder = Recorder::default();
        let parsed = parse_protobuf_within(Bytes::from(body), &mut recorder).unwrap();
        assert_eq!(parsed.chunks.len(), 1000);
        let charged: usize = recorder.copies.iter().sum();
        assert!(charged >= 1000 * RECORD_COST, "{charged}");
        assert!(
            charged <= 2 * 1000 * RECORD_COST + RECORD_CHARGE_STEP * RECORD_COST,
            "{charged}"
        );
    }

    /// The JSON estimate is charged before serde runs, and refusing it refuses the request
    /// (nothing is decoded).
    #[test]
    fn json_estimate_is_charged_first() {
        struct Refuse;
        impl DecodeBudget for Refuse {
            type Error = DecodeError;
            fn hold_copy(&mut self, _: usize) -> Result<(), DecodeError> {
                Ok(())
            }
            fn hold_decoded(&mut self, _: usize) -> Result<(), DecodeError> {
                Err(DecodeError::Framing("refused"))
            }
        }
        // Not even valid JSON: refused before it is looked at.
        assert!(matches!(
            parse_json_within(b"{not json", &mut Refuse),
            Err(DecodeError::Framing("refused"))
        ));
        let empties = format!(
            r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{}]}}]}}]}}"#,
            ["{}"; 1000].join(",")
        );
        let mut recorder = Recorder::default();
        let parsed = parse_json_within(empties.as_bytes(), &mut recorder).unwrap();
        assert_eq!((parsed.spans, parsed.rejected), (0, 1000));
        assert_eq!(recorder.decoded.len(), 1);
        assert!(
            recorder.decoded[0] >= 1000 * std::mem::size_of::<Span>(),
            "{:?}",
            recorder.decoded
        );
        // Braces inside strings are text, not objects.
        let text = format!(r#"{{"resourceSpans":[],"x":"{}"}}"#, "{[".repeat(1000));
        assert!(json_decoded_estimate(text.as_bytes()) < 5 * text.len() + 10 * json_object_cost());
        let escaped = br#"{"a":"\"{{{{"}"#;
        assert_eq!(
            json_decoded_estimate(escaped),
            json_object_cost() + 2 * ALLOCATION_OVERHEAD + 3 * escaped.len()
        );
    }

    /// Real clients' JSON (the load generator's agent and plain traces) is not refused for its
    /// estimate: it stays a small multiple of the body, so a request at max_recv_msg_size
    /// (16 MiB by default) fits the default memory_limiter (384 MiB below its spike limit).
    #[test]
    fn json_estimate_of_real_requests_is_a_small_multiple() {
        use crate::loadgen::spans::{Encoding, FastRng, Template, genai_shape, kv_str, plain_shape};
        let resource = vec![kv_str("service.name", "agent")];
        for (i, shape) in [
            genai_shape(resource.clone(), &[], (2, 40)),
            plain_shape(resource.clone(), &[kv_str("k", "v")], 5, (3, 20)),
            plain_shape(resource, &[], 1, (0, 0)),
        ]
        .iter()
        .enumerate()
        {
            let template = Template::build(shape, 20, Encoding::Json, i as u64).unwrap();
            let mut body = Vec::new();
            template.render(&mut FastRng::new(7), 1_700_000_000_000_000_000, &mut body);
            let ratio = json_decoded_estimate(&body) as f64 / body.len() as f64;
            assert!(ratio < 20.0, "shape {i}: estimate is {ratio:.1} times the body");
            assert!(parse_json(&body).unwrap().spans > 0);
        }
    }

    /// The decoding split this file had, as the reference for the one over bytes.
    fn prost_split(chunk: &ResourceChunk, first: usize, size: usize) -> Vec<(ResourceSpans, usize)> {
        let rs = ResourceSpans::decode(record_message(&chunk.bytes).unwrap()).unwrap();
        let empty_piece = || ResourceSpans {
            resource: rs.resource.clone(),
            scope_spans: Vec::new(),
            schema_url: rs.schema_url.clone(),
        };
        let mut pieces = Vec::new();
        let mut piece = empty_piece();
        let (mut in_piece, mut want) = (0, first);
        for scope in rs.scope_spans.clone() {
            let mut spans = scope.spans.into_iter().peekable();
            while spans.peek().is_some() {
                let take: Vec<Span> = spans.by_ref().take(want - in_piece).collect();
                in_piece += take.len();
                piece.scope_spans.push(ScopeSpans {
                    scope: scope.scope.clone(),
                    spans: take,
                    schema_url: scope.schema_url.clone(),
                });
                if in_piece == want {
                    pieces.push((std::mem::replace(&mut piece, empty_piece()), in_piece));
                    (in_piece, want) = (0, size);
                }
            }
        }
        if in_piece > 0 {
            pieces.push((piece, in_piece));
        }
        pieces
    }

    /// Splitting over bytes gives what decoding, regrouping and encoding gave, on the random
    /// requests above (unknown fields, nesting, empty scopes, markers), at every kind of cut;
    /// and the unknown fields of what each piece carries survive.
    #[test]
    fn split_over_bytes_equals_the_decoding_split() {
        use crate::loadgen::spans::FastRng;
        let mut rng = FastRng::new(99);
        let mut checked = 0;
        for seed in 0..1500 {
            let case = random_case(seed);
            // Records as received (all spans usable): the unfiltered body, when it has none bad.
            let parsed = parse_protobuf(Bytes::from(case.body.clone())).unwrap();
            for chunk in parsed.chunks.iter().filter(|c| c.spans >= 2) {
                let first = 1 + (rng.next_u64() as usize) % (chunk.spans - 1);
                let size = 1 + (rng.next_u64() as usize) % chunk.spans;
                let pieces = split_chunk_pieces(chunk, first, size).unwrap();
                let reference = prost_split(chunk, first, size);
                assert_eq!(pieces.len(), reference.len(), "seed {seed}");
                for (piece, (rs, spans)) in pieces.iter().zip(&reference) {
                    assert_eq!(piece.spans, *spans);
                    assert_eq!(piece.experiment, chunk.experiment);
                    let decoded = ExportTraceServiceRequest::decode(piece.bytes.clone()).unwrap();
                    assert_eq!(decoded.resource_spans, vec![rs.clone()], "seed {seed}");
                    // Each piece is a record the walk accepts as it is.
                    let again = parse_protobuf(piece.bytes.clone()).unwrap();
                    assert_eq!((again.spans, again.rejected, again.chunks.len()), (*spans, 0, 1));
                }
                checked += 1;
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    /// Unknown fields survive a split: the ResourceSpans' and ScopeSpans' in every piece that
    /// carries them, each span's in its piece.
    #[test]
    fn split_keeps_unknown_fields() {
        let marker = |text: &str| {
            let mut out = Vec::new();
            out.extend_from_slice(&[0x9a, 0x06]);
            prost::encoding::encode_varint(text.len() as u64, &mut out);
            out.extend_from_slice(text.as_bytes());
            out
        };
        let mut scope = Vec::new();
        for i in 0..4u64 {
            let mut span = super::testdata::span(i).encode_to_vec();
            span.extend_from_slice(&marker(&format!("span-{i}")));
            field(0x12, &span, &mut scope);
        }
        scope.extend_from_slice(&marker("scope"));
        let mut rs = marker("resource");
        field(0x12, &scope, &mut rs);
        let mut record = Vec::new();
        field(0x0a, &rs, &mut record);
        let chunk = ResourceChunk {
            bytes: Bytes::from(record),
            spans: 4,
            experiment: None,
        };
        let pieces = split_chunk_pieces(&chunk, 1, 2).unwrap();
        assert_eq!(pieces.iter().map(|p| p.spans).collect::<Vec<_>>(), vec![1, 2, 1]);
        for (i, piece) in pieces.iter().enumerate() {
            assert!(contains(&piece.bytes, &marker("resource")), "piece {i}");
            assert!(contains(&piece.bytes, &marker("scope")), "piece {i}");
        }
        for (span, piece) in [(0, 0), (1, 1), (2, 1), (3, 2)] {
            assert!(contains(&pieces[piece].bytes, &marker(&format!("span-{span}"))));
        }
    }

    /// A large resource is not copied into every piece: past twice the record's size the
    /// split refuses (the batcher then sends the record whole, counted and logged).
    #[test]
    fn split_refuses_to_multiply_a_large_resource() {
        let mut rs = resource_spans("a", 0, 1, 300);
        rs.resource
            .as_mut()
            .unwrap()
            .attributes
            .push(kv("big", &"x".repeat(100_000)));
        let chunk = ResourceChunk {
            bytes: encode_record(&rs),
            spans: 300,
            experiment: None,
        };
        assert!(matches!(
            split_chunk_pieces(&chunk, 10, 10),
            Err(DecodeError::Split(m)) if m.contains("resource")
        ));
        // Few pieces copy it within the allowance.
        assert_eq!(split_chunk_pieces(&chunk, 150, 150).unwrap().len(), 2);
    }

    #[test]
    fn experiment_attribute_routes() {
        let mut rs = resource_spans("a", 0, 1, 1);
        rs.resource
            .as_mut()
            .unwrap()
            .attributes
            .push(kv(EXPERIMENT_ATTRIBUTE, "42"));
        let mut bad = resource_spans("b", 10, 1, 1);
        bad.resource
            .as_mut()
            .unwrap()
            .attributes
            .push(kv(EXPERIMENT_ATTRIBUTE, "../etc"));
        let parsed = parse_protobuf(Bytes::from(request(vec![rs, bad]).encode_to_vec())).unwrap();
        assert_eq!(parsed.chunks[0].experiment.as_deref(), Some("42"));
        assert_eq!(parsed.chunks[1].experiment, None);
    }

    /// A record that does not decode (say, a spooled one damaged behind a valid checksum) or
    /// whose span count is off is an error from split, never a panic.
    #[test]
    fn split_refuses_what_it_cannot_split() {
        let good = encode_record(&resource_spans("a", 0, 1, 4));
        let chunk = |bytes: Bytes, spans| ResourceChunk {
            bytes,
            spans,
            experiment: None,
        };
        for (bytes, spans) in [
            (Bytes::from_static(b"\x0a\x05\x01"), 4),
            (Bytes::from_static(b""), 4),
            (
                Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
                4,
            ),
            (good.slice(..good.len() - 3), 4),
            (good.clone(), 9),
            (good.clone(), 0),
            ([good.as_ref(), good.as_ref()].concat().into(), 8),
        ] {
            assert!(
                split_chunk(&chunk(bytes.clone(), spans), 2).is_err(),
                "{bytes:?} {spans}"
            );
        }
        assert!(split_chunk(&chunk(good.clone(), 4), 4).is_err());
        assert!(split_chunk(&chunk(good, 4), 2).is_ok());
    }

    /// JSON is held to the protobuf depth rule after conversion.
    #[test]
    fn json_depth_is_limited_like_protobuf() {
        let json = |levels: usize| {
            let mut value = r#"{"intValue":"1"}"#.to_string();
            for _ in 0..levels {
                value = format!(r#"{{"arrayValue":{{"values":[{value}]}}}}"#);
            }
            format!(
                r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{{"traceId":"5b8efff798038103d269b633813fc60c",
                "spanId":"eee19b7ec3c1b174","attributes":[{{"key":"k","value":{value}}}]}}]}}]}}]}}"#
            )
        };
        // A span attribute's AnyValue is level 6; 29 arrays make 64.
        assert_eq!(parse_json(json(29).as_bytes()).unwrap().spans, 1);
        let err = parse_json(json(30).as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooDeep {
                    place: "span attribute",
                    limit: 64
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn pieces_have_the_asked_sizes_and_every_span_once() {
        let rs = resource_spans("a", 0, 3, 7);
        let chunk = ResourceChunk {
            bytes: encode_record(&rs),
            spans: 21,
            experiment: Some("5".into()),
        };
        let pieces = split_chunk_pieces(&chunk, 2, 4).unwrap();
        assert_eq!(
            pieces.iter().map(|p| p.spans).collect::<Vec<_>>(),
            vec![2, 4, 4, 4, 4, 3]
        );
        let merged: Vec<u8> = pieces.iter().flat_map(|p| p.bytes.to_vec()).collect();
        let req = ExportTraceServiceRequest::decode(merged.as_slice()).unwrap();
        let names = |rs: &[ResourceSpans]| -> Vec<String> {
            rs.iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .map(|s| s.name.clone())
                .collect()
        };
        assert_eq!(names(&req.resource_spans), names(std::slice::from_ref(&rs)));
        for (piece, r) in pieces.iter().zip(&req.resource_spans) {
            assert_eq!(r.resource, rs.resource);
            assert_eq!(piece.experiment.as_deref(), Some("5"));
            let counted: usize = r.scope_spans.iter().map(|s| s.spans.len()).sum();
            assert_eq!(counted, piece.spans, "each piece's count is its content");
            assert!(r.scope_spans.iter().all(|s| !s.spans.is_empty()), "no empty scopes");
        }
        assert!(split_chunk_pieces(&chunk, 0, 4).is_err());
        assert!(split_chunk_pieces(&chunk, 21, 4).is_err());
        assert!(split_chunk_pieces(&chunk, 3, 0).is_err());
    }

    #[test]
    fn split_keeps_every_span_once() {
        let rs = resource_spans("a", 0, 3, 4);
        let chunk = ResourceChunk {
            bytes: encode_record(&rs),
            spans: 12,
            experiment: None,
        };
        for first in 1..12 {
            let (head, tail) = split_chunk(&chunk, first).unwrap();
            let merged: Vec<u8> = [head.bytes.as_ref(), tail.bytes.as_ref()].concat();
            let req = ExportTraceServiceRequest::decode(merged.as_slice()).unwrap();
            let names: Vec<String> = req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
                .map(|s| s.name.clone())
                .collect();
            let expected: Vec<String> = rs
                .scope_spans
                .iter()
                .flat_map(|s| &s.spans)
                .map(|s| s.name.clone())
                .collect();
            assert_eq!(names, expected, "split at {first}");
            assert_eq!((head.spans, tail.spans), (first, 12 - first));
            assert_eq!(req.resource_spans[0].resource, rs.resource);
        }
    }
}
