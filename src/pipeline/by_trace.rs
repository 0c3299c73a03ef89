//! Cuts one ResourceSpans record into one record per trace id, over its bytes: groupbytrace holds
//! spans by trace, the batcher keeps a trace in one request, and the exporter bisects a refused
//! request by trace, all without decoding a span (a decode takes about 13 times a record's size).
//!
//! Each piece is the record with the other traces' spans left out: the resource's fields and
//! every ScopeSpans' own fields (unknown ones too) are copied in their original order, a
//! ScopeSpans without a span of the trace is left out, and lengths are written minimal. A record
//! holding a single trace comes back as it is, without a copy.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// Its callers (groupbytrace, the batcher, the exporter's bisection) are wired after it.
#![cfg_attr(not(test), allow(dead_code))]
use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;

use super::walk::{RESOURCE_SPANS_KEY, Reader, SCOPE_SPANS_KEY, len};
use super::wire::{DecodeError, ResourceChunk};

pub(crate) type TraceId = [u8; 16];

/// One trace's part of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceRecord {
    pub(crate) trace_id: TraceId,
    /// A request field (key, length, ResourceSpans message), like the record it came from.
    pub(crate) bytes: Bytes,
    pub(crate) spans: usize,
    /// It holds a root span (one without a parent span id).
    pub(crate) has_root: bool,
}

/// The bytes the pieces may copy (resource, scopes, framing) beyond twice the record's size in
/// all, per piece: real resources are a few hundred bytes.
const COPY_ALLOWANCE: usize = 1024;

/// Where a trace's spans are in the record.
struct Trace {
    id: TraceId,
    has_root: bool,
    /// (scope index, the span's field range in the message), in record order.
    spans: Vec<(usize, Range<usize>)>,
}

/// A ScopeSpans of the record: where it starts, and its own fields other than spans.
struct Scope {
    start: usize,
    fields: Vec<Range<usize>>,
    fields_len: usize,
}

fn split(what: &'static str) -> DecodeError {
    DecodeError::Split(what)
}

/// The ResourceSpans message of a record (one request field, field 1).
fn message_of(record: &[u8]) -> Result<&[u8], DecodeError> {
    let mut r = Reader::new(record);
    match r.field()? {
        Some((1, w)) => {
            let message = len(w)?;
            if r.pos != record.len() {
                return Err(split("more than one record"));
            }
            Ok(message)
        }
        _ => Err(split("not a ResourceSpans record")),
    }
}

/// A span's trace id and whether it is a root, by prost's rule: the last occurrence of a field
/// counts, an absent one is empty.
fn span_ids(span: &[u8]) -> Result<(TraceId, bool), DecodeError> {
    let (mut trace, mut parent): (&[u8], &[u8]) = (&[], &[]);
    let mut r = Reader::new(span);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => trace = len(w)?,
            4 => parent = len(w)?,
            _ => {}
        }
    }
    let id = TraceId::try_from(trace).map_err(|_| split("a span without a 16-byte trace id"))?;
    Ok((id, parent.is_empty()))
}

/// Splits a record (a request field holding one ResourceSpans) into one record per trace id, in
/// the order the traces first appear. Past twice the record's size in copies (a large resource
/// and many traces), this refuses rather than multiply the resource; the caller keeps the
/// record whole.
pub(crate) fn split_record(record: &Bytes) -> Result<Vec<TraceRecord>, DecodeError> {
    let message = message_of(record)?;
    let mut resource_fields: Vec<Range<usize>> = Vec::new();
    let mut scopes: Vec<Scope> = Vec::new();
    let mut traces: Vec<Trace> = Vec::new();
    let mut index: HashMap<TraceId, usize> = HashMap::new();
    let mut r = Reader::new(message);
    loop {
        let start = r.pos;
        let Some((number, w)) = r.field()? else { break };
        if number != 2 {
            resource_fields.push(start..r.pos);
            continue;
        }
        let scope = len(w)?;
        let base = r.pos - scope.len();
        let mut fields = Vec::new();
        let mut s = Reader::new(scope);
        loop {
            let at = s.pos;
            let Some((n, w)) = s.field()? else { break };
            let range = base + at..base + s.pos;
            if n != 2 {
                fields.push(range);
                continue;
            }
            let (id, root) = span_ids(len(w)?)?;
            let i = *index.entry(id).or_insert_with(|| {
                traces.push(Trace {
                    id,
                    has_root: false,
                    spans: Vec::new(),
                });
                traces.len() - 1
            });
            let trace = &mut traces[i];
            trace.has_root |= root;
            trace.spans.push((scopes.len(), range));
        }
        let fields_len = fields.iter().map(|f| f.len()).sum();
        scopes.push(Scope {
            start,
            fields,
            fields_len,
        });
    }
    if traces.len() <= 1 {
        return Ok(traces
            .into_iter()
            .map(|t| TraceRecord {
                trace_id: t.id,
                bytes: record.clone(),
                spans: t.spans.len(),
                has_root: t.has_root,
            })
            .collect());
    }
    let resource_len: usize = resource_fields.iter().map(|f| f.len()).sum();
    let max_out = record
        .len()
        .saturating_mul(2)
        .saturating_add(traces.len().saturating_mul(COPY_ALLOWANCE));
    let mut out = 0usize;
    let mut pieces = Vec::with_capacity(traces.len());
    for trace in &traces {
        let groups = scope_groups(&trace.spans);
        let message_len = resource_len
            + groups
                .iter()
                .map(|g| field_len(scope_content_len(&scopes[g.scope], &trace.spans[g.spans.clone()])))
                .sum::<usize>();
        out = out.saturating_add(field_len(message_len));
        if out > max_out {
            return Err(split(
                "its pieces would copy its resource and scopes past twice its size",
            ));
        }
        let mut bytes = Vec::with_capacity(field_len(message_len));
        write_piece(
            message,
            &resource_fields,
            &scopes,
            trace,
            &groups,
            message_len,
            &mut bytes,
        );
        if bytes.len() != field_len(message_len) {
            return Err(split("record changed while it was split"));
        }
        pieces.push(TraceRecord {
            trace_id: trace.id,
            bytes: Bytes::from(bytes),
            spans: trace.spans.len(),
            has_root: trace.has_root,
        });
    }
    Ok(pieces)
}

/// [`split_record`] for a pipeline chunk: every piece keeps the chunk's experiment. The span
/// counts must add up to what was counted on receipt (a damaged spool record does not).
pub(crate) fn split_chunk(chunk: &ResourceChunk) -> Result<Vec<(TraceRecord, ResourceChunk)>, DecodeError> {
    let pieces = split_record(&chunk.bytes)?;
    if pieces.iter().map(|p| p.spans).sum::<usize>() != chunk.spans {
        return Err(split("record holds a different span count than counted on receipt"));
    }
    Ok(pieces
        .into_iter()
        .map(|p| {
            let chunk = ResourceChunk {
                bytes: p.bytes.clone(),
                spans: p.spans,
                experiment: chunk.experiment.clone(),
                names: chunk.names.clone(),
            };
            (p, chunk)
        })
        .collect())
}

/// A run of a trace's spans in one ScopeSpans.
struct Group {
    scope: usize,
    spans: Range<usize>,
}

/// A trace's spans by ScopeSpans; they were collected in record order, so each scope's are
/// contiguous.
fn scope_groups(spans: &[(usize, Range<usize>)]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, (scope, _)) in spans.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.scope == *scope => g.spans.end = i + 1,
            _ => groups.push(Group {
                scope: *scope,
                spans: i..i + 1,
            }),
        }
    }
    groups
}

fn scope_content_len(scope: &Scope, spans: &[(usize, Range<usize>)]) -> usize {
    scope.fields_len + spans.iter().map(|(_, r)| r.len()).sum::<usize>()
}

/// A length-delimited field's size with a one-byte key.
fn field_len(content: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(content as u64) + content
}

/// Writes one trace's record: the resource's fields and the trace's ScopeSpans, each merged in
/// the order they had in the message.
fn write_piece(
    message: &[u8],
    resource_fields: &[Range<usize>],
    scopes: &[Scope],
    trace: &Trace,
    groups: &[Group],
    message_len: usize,
    out: &mut Vec<u8>,
) {
    out.push(RESOURCE_SPANS_KEY);
    prost::encoding::encode_varint(message_len as u64, out);
    let mut fields = resource_fields.iter().peekable();
    for g in groups {
        let scope = &scopes[g.scope];
        while let Some(f) = fields.next_if(|f| f.start < scope.start) {
            out.extend_from_slice(&message[f.clone()]);
        }
        let spans = &trace.spans[g.spans.clone()];
        out.push(SCOPE_SPANS_KEY);
        prost::encoding::encode_varint(scope_content_len(scope, spans) as u64, out);
        let mut own = scope.fields.iter().peekable();
        for (_, span) in spans {
            while let Some(f) = own.next_if(|f| f.start < span.start) {
                out.extend_from_slice(&message[f.clone()]);
            }
            out.extend_from_slice(&message[span.clone()]);
        }
        for f in own {
            out.extend_from_slice(&message[f.clone()]);
        }
    }
    for f in fields {
        out.extend_from_slice(&message[f.clone()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::spans::FastRng;
    use crate::pipeline::wire::{parse_protobuf, testdata};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    fn field(key: u8, payload: &[u8], out: &mut Vec<u8>) {
        out.push(key);
        prost::encoding::encode_varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    /// An unknown length-delimited field 99, which prost skips and the split must keep.
    fn marker(text: &str) -> Vec<u8> {
        // Key 99 << 3 | 2 is two bytes.
        let mut out = vec![0x9a, 0x06];
        prost::encoding::encode_varint(text.len() as u64, &mut out);
        out.extend_from_slice(text.as_bytes());
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn trace_id(n: u64) -> Vec<u8> {
        let mut id = vec![0u8; 16];
        id[8..].copy_from_slice(&(n + 1).to_be_bytes());
        id
    }

    type Bytes16 = Vec<u8>;
    /// A span's trace id and field bytes.
    type SpanPart = (Bytes16, usize);

    /// A random record and what it was built from: its spans' traces, the unknown fields by the
    /// traces whose pieces must carry them (None: every piece), and the bytes each part takes.
    struct Case {
        record: Vec<u8>,
        markers: Vec<(Option<Vec<Bytes16>>, Vec<u8>)>,
        /// The resource's own fields' bytes.
        resource_len: usize,
        /// Per scope: its own fields' bytes, and each span's (trace id, field bytes).
        scopes: Vec<(usize, Vec<SpanPart>)>,
    }

    fn random_case(seed: u64) -> Case {
        let mut rng = FastRng::new(seed);
        let mut pick = |n: u64| (rng.next_u64() % n) as usize;
        let mut n_marker = 0;
        let mut next_marker = |place: &str| {
            n_marker += 1;
            marker(&format!("{place}-{seed}-{n_marker}"))
        };
        let traces = 1 + pick(5) as u64;
        let mut markers = Vec::new();
        let mut rs = testdata::resource_spans(&format!("svc-{seed}"), 0, 0, 0);
        if pick(2) == 0 {
            rs.schema_url = "https://schema/r".into();
        }
        let mut head = rs.encode_to_vec();
        let mut tail = Vec::new();
        if pick(2) == 0 {
            let m = next_marker("resource");
            markers.push((None, m.clone()));
            if pick(2) == 0 { head.extend(m) } else { tail.extend(m) }
        }
        let resource_len = head.len() + tail.len();
        let mut message = head;
        let mut scopes = Vec::new();
        let mut id = seed * 1000;
        for s in 0..pick(5) {
            let mut scope = testdata::resource_spans("x", 0, 1, 0).scope_spans.remove(0);
            if pick(2) == 0 {
                scope.schema_url = format!("https://schema/{s}");
            }
            let header = scope.encode_to_vec();
            let own_marker = (pick(2) == 0).then(|| next_marker("scope"));
            let marker_at = pick(8);
            let mut bytes = Vec::new();
            let mut spans = Vec::new();
            let count = pick(6);
            // The scope's own fields before, between or after its spans.
            let header_first = pick(3) != 0;
            if header_first {
                bytes.extend_from_slice(&header);
            }
            for i in 0..count {
                if i == marker_at
                    && let Some(m) = &own_marker
                {
                    bytes.extend_from_slice(m);
                }
                id += 1;
                let trace = trace_id(pick(traces) as u64 + seed);
                let mut span = testdata::span(id);
                span.trace_id = trace.clone();
                if pick(3) != 0 {
                    span.parent_span_id = 7u64.to_be_bytes().to_vec();
                }
                let mut span_bytes = span.encode_to_vec();
                if pick(6) == 0 {
                    // A repeated parent id: the last one counts.
                    field(0x22, &[], &mut span_bytes);
                }
                if pick(3) == 0 {
                    let m = next_marker("span");
                    markers.push((Some(vec![trace.clone()]), m.clone()));
                    span_bytes.extend(m);
                }
                let before = bytes.len();
                field(0x12, &span_bytes, &mut bytes);
                spans.push((trace, bytes.len() - before));
            }
            if !header_first {
                bytes.extend_from_slice(&header);
            }
            if let Some(m) = own_marker {
                if marker_at >= count {
                    bytes.extend_from_slice(&m);
                }
                // Every trace with a span in this scope carries the scope's fields.
                markers.push((Some(spans.iter().map(|s| s.0.clone()).collect()), m));
            }
            let own = bytes.len() - spans.iter().map(|s| s.1).sum::<usize>();
            field(0x12, &bytes, &mut message);
            scopes.push((own, spans));
        }
        message.extend(tail);
        let mut record = Vec::new();
        field(0x0a, &message, &mut record);
        Case {
            record,
            markers,
            resource_len,
            scopes,
        }
    }

    /// The reference: prost decodes the record, groups its spans by trace id (first appearance
    /// first), and each group is the resource with the scopes it has spans in. One trace: the
    /// record as decoded.
    fn prost_by_trace(record: &[u8]) -> Vec<(Vec<u8>, ResourceSpans)> {
        let rs = ExportTraceServiceRequest::decode(record)
            .unwrap()
            .resource_spans
            .remove(0);
        let mut order: Vec<Vec<u8>> = Vec::new();
        for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
            if !order.contains(&span.trace_id) {
                order.push(span.trace_id.clone());
            }
        }
        if order.len() == 1 {
            return vec![(order.remove(0), rs)];
        }
        order
            .into_iter()
            .map(|trace| {
                let scope_spans = rs
                    .scope_spans
                    .iter()
                    .filter_map(|s| {
                        let spans: Vec<Span> = s.spans.iter().filter(|sp| sp.trace_id == trace).cloned().collect();
                        (!spans.is_empty()).then(|| ScopeSpans { spans, ..s.clone() })
                    })
                    .collect();
                let piece = ResourceSpans {
                    scope_spans,
                    ..rs.clone()
                };
                (trace, piece)
            })
            .collect()
    }

    /// The smallest record holding a trace's part: minimal lengths around exactly its bytes.
    fn needed_len(case: &Case, trace: &[u8]) -> usize {
        let mut message = case.resource_len;
        for (own, spans) in &case.scopes {
            let mine: usize = spans.iter().filter(|s| s.0 == trace).map(|s| s.1).sum();
            if mine > 0 {
                message += field_len(own + mine);
            }
        }
        field_len(message)
    }

    /// On thousands of random records (several scopes, traces interleaved, unknown fields in the
    /// resource, scopes and spans, fields out of prost's order, repeated fields): the pieces
    /// decode to what prost's decode, grouped by trace, gives; each is a record the walk accepts;
    /// unknown fields go with what carries them; no piece is larger than its content needs; a
    /// single-trace record comes back as the same bytes.
    #[test]
    fn pieces_equal_prost_decoded_then_grouped_by_trace() {
        let (mut multi, mut single, mut with_markers) = (0, 0, 0);
        for seed in 0..3000 {
            let case = random_case(seed);
            let record = Bytes::from(case.record.clone());
            let pieces = split_record(&record).unwrap();
            let reference = prost_by_trace(&case.record);
            let total: usize = case.scopes.iter().map(|s| s.1.len()).sum();
            if total == 0 {
                assert!(pieces.is_empty(), "seed {seed}");
                continue;
            }
            assert_eq!(pieces.len(), reference.len(), "seed {seed}");
            assert_eq!(pieces.iter().map(|p| p.spans).sum::<usize>(), total);
            for (piece, (trace, rs)) in pieces.iter().zip(&reference) {
                assert_eq!(piece.trace_id.as_slice(), trace.as_slice(), "seed {seed}");
                let decoded = ExportTraceServiceRequest::decode(piece.bytes.clone()).unwrap();
                assert_eq!(decoded.resource_spans, vec![rs.clone()], "seed {seed}");
                let spans: Vec<&Span> = rs.scope_spans.iter().flat_map(|s| &s.spans).collect();
                assert_eq!(piece.spans, spans.len());
                assert_eq!(piece.has_root, spans.iter().any(|s| s.parent_span_id.is_empty()));
                let again = parse_protobuf(piece.bytes.clone()).unwrap();
                assert_eq!((again.spans, again.rejected, again.chunks.len()), (piece.spans, 0, 1));
                for (owner, m) in &case.markers {
                    let mine = owner.as_ref().is_none_or(|o| o.contains(trace));
                    assert_eq!(contains(&piece.bytes, m), mine || pieces.len() == 1, "seed {seed}");
                    with_markers += usize::from(mine);
                }
                if pieces.len() == 1 {
                    assert_eq!(piece.bytes, record, "seed {seed}");
                    assert_eq!(piece.bytes.as_ptr(), record.as_ptr(), "not copied");
                } else {
                    assert_eq!(piece.bytes.len(), needed_len(&case, trace), "seed {seed}");
                }
            }
            if pieces.len() > 1 {
                multi += 1;
            } else {
                single += 1;
            }
        }
        assert!(
            multi > 1000 && single > 300 && with_markers > 1000,
            "{multi} {single} {with_markers}"
        );
    }

    #[test]
    fn a_chunk_keeps_its_experiment_and_its_count_is_checked() {
        let case = (0..)
            .map(random_case)
            .find(|c| c.scopes.iter().any(|s| s.1.len() > 3))
            .unwrap();
        let spans = case.scopes.iter().map(|s| s.1.len()).sum();
        let chunk = ResourceChunk {
            bytes: Bytes::from(case.record),
            spans,
            experiment: Some("7".into()),
            names: None,
        };
        let pieces = split_chunk(&chunk).unwrap();
        assert!(
            pieces
                .iter()
                .all(|(p, c)| c.experiment.as_deref() == Some("7") && c.spans == p.spans)
        );
        let wrong = ResourceChunk {
            spans: spans + 1,
            ..chunk
        };
        assert!(matches!(split_chunk(&wrong), Err(DecodeError::Split(_))));
    }

    /// Many traces under a large resource: the copies are refused past twice the record's size.
    #[test]
    fn a_large_resource_is_not_multiplied() {
        let mut rs = testdata::resource_spans("a", 0, 1, 300);
        rs.resource
            .as_mut()
            .unwrap()
            .attributes
            .push(testdata::kv("big", &"x".repeat(100_000)));
        let record = crate::pipeline::wire::encode_record(&rs);
        assert!(matches!(split_record(&record), Err(DecodeError::Split(_))));
        rs.scope_spans[0].spans.truncate(2);
        assert_eq!(
            split_record(&crate::pipeline::wire::encode_record(&rs)).unwrap().len(),
            2
        );
    }

    #[test]
    fn what_is_not_one_record_is_refused() {
        let rs = testdata::resource_spans("a", 0, 1, 2);
        let mut two = crate::pipeline::wire::encode_record(&rs).to_vec();
        two.extend_from_slice(&two.clone());
        let mut bad_id = testdata::resource_spans("a", 0, 1, 2);
        bad_id.scope_spans[0].spans[1].trace_id.truncate(15);
        for bytes in [
            two,
            vec![0x12, 0x00],
            vec![0x0a, 0x05, 0x00],
            crate::pipeline::wire::encode_record(&bad_id).to_vec(),
        ] {
            assert!(split_record(&Bytes::from(bytes)).is_err());
        }
    }
}
