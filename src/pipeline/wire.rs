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

/// Validates an `ExportTraceServiceRequest` in protobuf and slices its ResourceSpans records.
/// Records are passed on as slices of `body`; only a record with unusable span ids is decoded,
/// to re-encode it without them.
pub fn parse_protobuf(body: Bytes) -> Result<ParsedRequest, DecodeError> {
    let mut parsed = ParsedRequest::default();
    for record in super::walk::request(&body)? {
        if record.invalid_spans > 0 {
            let rs = ResourceSpans::decode(&body[record.message.clone()])?;
            parsed.add(rs);
        } else if record.spans > 0 {
            parsed.spans += record.spans;
            parsed.chunks.push(ResourceChunk {
                bytes: body.slice(record.field),
                spans: record.spans,
                experiment: record.experiment,
            });
        }
    }
    Ok(parsed)
}

/// Parses OTLP/JSON (hex ids, lowerCamelCase keys; unknown fields ignored) and encodes each
/// ResourceSpans as protobuf. The encoding then passes the same walk as a protobuf request, so
/// one rule (nesting depth above all) holds whatever the client sent.
pub fn parse_json(body: &[u8]) -> Result<ParsedRequest, DecodeError> {
    let request: ExportTraceServiceRequest = serde_json::from_slice(body)?;
    let mut parsed = ParsedRequest::default();
    for rs in request.resource_spans {
        parsed.add(rs);
    }
    for chunk in &parsed.chunks {
        super::walk::request(&chunk.bytes)?;
    }
    Ok(parsed)
}

impl ParsedRequest {
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
            self.rejection = Some(format!(
                "{} span(s) rejected: trace_id must be 16 bytes and span_id 8 bytes, not all zero",
                self.rejected
            ));
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

fn experiment_of(rs: &ResourceSpans) -> Option<String> {
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
/// is left, decoding it once: cutting a large record one batch at a time decoded the rest
/// again for every cut, which made a 400,000-span request take minutes.
pub fn split_chunk_pieces(chunk: &ResourceChunk, first: usize, size: usize) -> Result<Vec<ResourceChunk>, DecodeError> {
    if first == 0 || first >= chunk.spans || size == 0 {
        return Err(DecodeError::Split("split point outside the record"));
    }
    let mut pos = 0;
    read_varint(&chunk.bytes, &mut pos)?;
    let len = usize::try_from(read_varint(&chunk.bytes, &mut pos)?)
        .map_err(|_| DecodeError::Split("record length overflows"))?;
    let message = pos
        .checked_add(len)
        .and_then(|end| chunk.bytes.get(pos..end))
        .ok_or(DecodeError::Split("record shorter than its length"))?;
    let rs = ResourceSpans::decode(message)?;
    let total: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
    if total != chunk.spans {
        return Err(DecodeError::Split(
            "record holds a different span count than counted on receipt",
        ));
    }
    let empty_piece = || ResourceSpans {
        resource: rs.resource.clone(),
        scope_spans: Vec::new(),
        schema_url: rs.schema_url.clone(),
    };
    let mut pieces = Vec::new();
    let mut piece = empty_piece();
    let (mut in_piece, mut want) = (0, first);
    let finish = |piece: ResourceSpans, spans: usize, pieces: &mut Vec<ResourceChunk>| {
        pieces.push(ResourceChunk {
            bytes: encode_record(&piece),
            spans,
            experiment: chunk.experiment.clone(),
        });
    };
    for scope in rs.scope_spans {
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
                finish(std::mem::replace(&mut piece, empty_piece()), in_piece, &mut pieces);
                (in_piece, want) = (0, size);
            }
        }
    }
    if in_piece > 0 {
        finish(piece, in_piece, &mut pieces);
    }
    Ok(pieces)
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
