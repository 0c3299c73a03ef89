//! OTLP/JSON requests: decoded by serde (after charging an upper bound of what that takes) and
//! encoded as protobuf records that then pass the same walk as a protobuf request.
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValueKind;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

use super::{
    DecodeBudget, DecodeError, EXPERIMENT_ATTRIBUTE, ParsedRequest, ResourceChunk, Unbudgeted, encode_record, rejection,
};
use crate::otlp::ExperimentId;

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
    for chunk in &mut parsed.chunks {
        // One record: the resource's routing names are read here, by the same rule as for a
        // protobuf request (the experiment id is read above, from the decoded request).
        for record in super::walk::request(&chunk.bytes)? {
            chunk.names = record.names;
        }
    }
    Ok(parsed)
}

/// The most one JSON object or array can become in memory: the largest OTLP message it can
/// decode to, twice (a Vec grows by doubling, so up to half its capacity is spare), plus an
/// allocation's bookkeeping.
pub(super) fn json_object_cost() -> usize {
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
pub(super) const ALLOCATION_OVERHEAD: usize = 32;

/// An upper bound of the memory decoding `body` as OTLP/JSON takes: every object or array
/// (counted outside strings) at [`json_object_cost`], every string as an allocation of its own,
/// the body's size twice for string contents (the String, and serde's scratch copy of a string
/// with escapes; hex ids and escapes only shrink) and once more for the protobuf encoding (never
/// larger than the JSON it came from, whose every field needs a quoted name). One pass, no
/// allocation. tests/json_estimate.rs measures it against an allocator.
pub fn json_decoded_estimate(body: &[u8]) -> usize {
    let counts = JsonCounts::of(body);
    counts
        .containers
        .saturating_mul(json_object_cost())
        .saturating_add(counts.strings.saturating_mul(ALLOCATION_OVERHEAD))
        .saturating_add(body.len().saturating_mul(3))
}

/// The bytes that open a JSON object or array (`{`, `[`).
const CONTAINER_OPENERS: [u8; 2] = [0x7b, 0x5b];

/// What a JSON text allocates when decoded, counted in one pass without parsing it.
struct JsonCounts {
    /// Objects and arrays: their openers outside strings.
    containers: usize,
    strings: usize,
}

impl JsonCounts {
    fn of(body: &[u8]) -> JsonCounts {
        let mut counts = JsonCounts {
            containers: 0,
            strings: 0,
        };
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
                counts.strings += 1;
            } else if CONTAINER_OPENERS.contains(&b) {
                counts.containers += 1;
            }
        }
        counts
    }
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
            names: None,
        });
    }
}

pub(super) fn span_ids_valid(span: &Span) -> bool {
    span.trace_id.len() == 16
        && span.span_id.len() == 8
        && span.trace_id.iter().any(|&b| b != 0)
        && span.span_id.iter().any(|&b| b != 0)
}

pub(crate) fn experiment_of(rs: &ResourceSpans) -> Option<String> {
    experiment_of_resource(rs.resource.as_ref()?)
}

/// The usable `mlflow.experiment_id` attribute of a resource.
pub(crate) fn experiment_of_resource(resource: &Resource) -> Option<String> {
    let attrs = &resource.attributes;
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
