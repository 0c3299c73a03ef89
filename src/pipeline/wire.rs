//! OTLP trace payloads on the wire: validate and count a request, cut it into encoded
//! ResourceSpans without re-encoding, and split one when a batch needs fewer spans.
//!
//! `ExportTraceServiceRequest` is `repeated ResourceSpans resource_spans = 1`, so the encoding of
//! a merged request is the concatenation of its parts' field-1 records.
//!
//! The parts: the protobuf parser (here), the JSON parser (json.rs), the split (split.rs).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;

use super::walk;
use crate::otlp::routing::ResourceNames;

mod json;
mod split;
#[cfg(test)]
mod tests;

pub use super::decode::{DecodeBudget, DecodeError, Unbudgeted};
#[cfg(test)]
pub(crate) use super::testdata;
pub(crate) use super::walk::decoded_estimate;
pub(crate) use crate::otlp::EXPERIMENT_ATTRIBUTE;
pub(crate) use json::{experiment_of, experiment_of_resource};
pub use json::{json_decoded_estimate, parse_json, parse_json_within};
pub(crate) use split::{split_chunk, split_chunk_pieces};

/// One ResourceSpans, encoded as a complete field-1 record of ExportTraceServiceRequest.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceChunk {
    pub(crate) bytes: Bytes,
    pub spans: usize,
    /// The `mlflow.experiment_id` resource attribute, if any.
    pub(crate) experiment: Option<String>,
    /// The resource's other MLflow routing attributes, if any.
    pub(crate) names: Option<Arc<ResourceNames>>,
}

/// A validated request, ready for the pipeline.
#[derive(Debug, Default, PartialEq)]
pub struct ParsedRequest {
    pub(crate) chunks: Vec<ResourceChunk>,
    /// Spans accepted (in `chunks`).
    pub spans: usize,
    /// Spans refused as invalid (reported as partial_success).
    pub(crate) rejected: usize,
    pub(crate) rejection: Option<String>,
    /// What each chunk takes once decoded, in the same order, when the walk tallied it
    /// ([`parse_protobuf_tallied`]); empty otherwise.
    pub(crate) decoded: Vec<usize>,
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
pub(crate) fn parse_protobuf_within<B: DecodeBudget>(body: Bytes, budget: &mut B) -> Result<ParsedRequest, B::Error> {
    parse_protobuf_tallied(body, budget, false)
}

/// [`parse_protobuf_within`]; with `tally`, the request also says what each chunk takes once
/// decoded (`ParsedRequest::decoded`), for processors to charge without walking it again.
pub(crate) fn parse_protobuf_tallied<B: DecodeBudget>(
    body: Bytes,
    budget: &mut B,
    tally: bool,
) -> Result<ParsedRequest, B::Error> {
    let mut parsed = ParsedRequest::default();
    let mut kept = Vec::new();
    let (mut kept_bytes, mut rebuilt) = (0usize, false);
    walk::request_each::<B::Error>(&body, tally, |record| {
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
                parsed.push(body.slice(record.field.clone()), record.spans, record);
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
                spans.push((start..out.len(), record.spans, record));
            }
            Keep::Rebuilt(record, k) => {
                walk::write_kept(&body[record.message.clone()], &k, &mut out)?;
                spans.push((start..out.len(), k.spans, record));
            }
        }
    }
    if out.len() != kept_bytes {
        return Err(DecodeError::Framing("records changed while they were copied").into());
    }
    drop(body);
    let out = Bytes::from(out);
    for (range, count, record) in spans {
        parsed.push(out.slice(range), count, record);
    }
    Ok(parsed)
}

fn rejection(rejected: usize) -> String {
    format!("{rejected} span(s) rejected: trace_id must be 16 bytes and span_id 8 bytes, not all zero")
}

impl ParsedRequest {
    fn push(&mut self, bytes: Bytes, spans: usize, record: walk::Record) {
        self.spans += spans;
        // A rebuilt record only lost spans: its whole record's estimate still bounds it.
        if let Some(decoded) = record.decoded {
            self.decoded.push(decoded);
        }
        self.chunks.push(ResourceChunk {
            bytes,
            spans,
            experiment: record.experiment,
            names: record.names,
        });
    }
}

/// Encodes one ResourceSpans as a field-1 record (tag, length, message). Cannot fail: the
/// buffer is sized first and grows anyway.
pub fn encode_record(rs: &ResourceSpans) -> Bytes {
    // The length once: `message::encode` would compute it again, and encoded_len walks
    // every span (the costliest part of encoding a processed record).
    let len = rs.encoded_len();
    let mut buf = BytesMut::with_capacity(len + 11);
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut buf);
    prost::encoding::encode_varint(len as u64, &mut buf);
    rs.encode_raw(&mut buf);
    buf.freeze()
}
