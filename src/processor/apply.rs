//! Where processors that edit spans run: per pipeline, each ResourceSpans record of a request is
//! decoded (prost) once, every such processor of the pipeline applied in order, and the result
//! encoded once into a new record. The memory decoding takes is charged to the request's budget
//! before it happens ([`decoded_estimate`]); records go one at a time, so a request holds at most
//! one decoded record besides its encoded copies.
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, EntityRef, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

use super::{ProcessError, RequestContext, SpanProcessor};
use crate::otlp::varint;
use crate::pipeline::wire::{self, DecodeBudget, DecodeError, ResourceChunk};
use crate::telemetry::{Metrics, ProcessorHandles};

/// The processors of one pipeline that edit spans, in pipeline order.
pub(crate) struct Chain {
    processors: Vec<(String, Box<dyn SpanProcessor>)>,
    /// Each processor's item counters, in the same order (empty without metrics): registered
    /// once, so no label strings are built per request.
    counts: Vec<Arc<ProcessorHandles>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.processors.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_tuple("Chain").field(&ids).finish()
    }
}

/// Why a request could not be processed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("{0}")]
    Process(#[from] ProcessError),
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

impl Chain {
    /// `None` when none of the processors edits spans: the pipeline keeps the zero-copy path.
    pub(crate) fn new(
        processors: Vec<(String, Box<dyn SpanProcessor>)>,
        metrics: Option<Arc<Metrics>>,
    ) -> Option<Chain> {
        let counts = match &metrics {
            Some(m) => processors.iter().map(|(id, _)| m.processor(id)).collect(),
            None => Vec::new(),
        };
        (!processors.is_empty()).then_some(Chain { processors, counts })
    }

    /// The processors' ids, in order: pipelines with the same ones share one processed copy.
    pub(crate) fn ids(&self) -> Vec<&str> {
        self.processors.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Processes every record of a request into new records (those left without spans are
    /// gone). What decoding takes and what the new records hold are charged to `budget` first.
    pub(crate) fn apply<B: DecodeBudget>(
        &self,
        chunks: &[ResourceChunk],
        request: &RequestContext,
        budget: &mut B,
    ) -> Result<Vec<ResourceChunk>, B::Error>
    where
        B::Error: From<ApplyError>,
    {
        let mut out = Vec::with_capacity(chunks.len());
        let mut held = 0usize;
        for chunk in chunks {
            let need = decoded_estimate(&chunk.bytes);
            if need > held {
                budget.hold_decoded(need - held)?;
                held = need;
            }
            if let Some(processed) = self.apply_one(chunk, request).map_err(B::Error::from)? {
                budget.hold_copy(processed.bytes.len())?;
                out.push(processed);
            }
        }
        Ok(out)
    }

    fn apply_one(&self, chunk: &ResourceChunk, request: &RequestContext) -> Result<Option<ResourceChunk>, ApplyError> {
        // A chunk is one field-1 record, so it decodes as a request of one ResourceSpans.
        let decoded = ExportTraceServiceRequest::decode(chunk.bytes.clone()).map_err(DecodeError::from)?;
        let Some(mut rs) = decoded.resource_spans.into_iter().next() else {
            return Ok(None);
        };
        let mut spans = chunk.spans;
        for (i, (_, processor)) in self.processors.iter().enumerate() {
            processor.process_in(&mut rs, request)?;
            let left = span_count(&rs);
            if let Some(counts) = self.counts.get(i) {
                counts.incoming.inc_by(spans as u64);
                counts.outgoing.inc_by(left as u64);
                if left < spans {
                    counts.dropped.inc_by((spans - left) as u64);
                }
            }
            spans = left;
        }
        if spans == 0 {
            return Ok(None);
        }
        Ok(Some(ResourceChunk {
            bytes: wire::encode_record(&rs),
            spans,
            experiment: wire::experiment_of(&rs),
        }))
    }
}

/// The span-editing processors of a pipeline's `processors` list, in order; `None` when it has
/// none (the pipeline keeps the zero-copy path).
pub(crate) fn chain(
    config: &crate::config::Config,
    processors: &[String],
    metrics: &Arc<Metrics>,
) -> Option<Arc<Chain>> {
    let list = processors
        .iter()
        .filter_map(|id| match config.processors.get(id) {
            Some(crate::config::Processor::Registered(r)) => r.config.span_processor(id).map(|p| (id.clone(), p)),
            _ => None,
        })
        .collect();
    Chain::new(list, Some(metrics.clone())).map(Arc::new)
}

fn span_count(rs: &ResourceSpans) -> usize {
    rs.scope_spans.iter().map(|s| s.spans.len()).sum()
}

/// What the allocator takes per allocation beyond its bytes, at least.
const ALLOCATION_OVERHEAD: usize = 32;

/// The message types of a ResourceSpans, for [`decoded_estimate`].
#[derive(Clone, Copy)]
enum Msg {
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
    /// ArrayValue and KeyValueList: one repeated field 1.
    List(&'static Msg),
}

/// What a length-delimited field of a message is: a message (repeated or not) or bytes.
enum Child {
    Message(Msg, bool),
    Bytes(bool),
}

fn child(msg: Msg, field: u64) -> Child {
    use Child::{Bytes, Message};
    match (msg, field) {
        (Msg::ResourceSpans, 1) => Message(Msg::Resource, false),
        (Msg::ResourceSpans, 2) => Message(Msg::ScopeSpans, true),
        (Msg::Resource, 1) | (Msg::Scope, 3) | (Msg::Span, 9) | (Msg::Event, 3) | (Msg::Link, 4) => {
            Message(Msg::KeyValue, true)
        }
        (Msg::Resource, 3) => Message(Msg::EntityRef, true),
        (Msg::EntityRef, 3 | 4) => Bytes(true),
        (Msg::ScopeSpans, 1) => Message(Msg::Scope, false),
        (Msg::ScopeSpans, 2) => Message(Msg::Span, true),
        (Msg::Span, 11) => Message(Msg::Event, true),
        (Msg::Span, 13) => Message(Msg::Link, true),
        (Msg::Span, 15) => Message(Msg::Status, false),
        (Msg::KeyValue, 2) => Message(Msg::AnyValue, false),
        (Msg::AnyValue, 5) => Message(Msg::List(&Msg::AnyValue), false),
        (Msg::AnyValue, 6) => Message(Msg::List(&Msg::KeyValue), false),
        (Msg::List(element), 1) => Message(*element, true),
        _ => Bytes(false),
    }
}

fn size_of(msg: Msg) -> usize {
    use std::mem::size_of;
    match msg {
        Msg::ResourceSpans => size_of::<ResourceSpans>(),
        Msg::Resource => size_of::<Resource>(),
        Msg::EntityRef => size_of::<EntityRef>(),
        Msg::ScopeSpans => size_of::<ScopeSpans>(),
        Msg::Scope => size_of::<InstrumentationScope>(),
        Msg::Span => size_of::<Span>(),
        Msg::Event => size_of::<Event>(),
        Msg::Link => size_of::<Link>(),
        Msg::Status => size_of::<Status>(),
        Msg::KeyValue => size_of::<KeyValue>(),
        Msg::AnyValue | Msg::List(_) => size_of::<AnyValue>(),
    }
}

/// An upper bound of the memory prost takes to decode one ResourceSpans record (a field-1
/// record, as the pipeline holds it), and the processors' working copy of it: every repeated
/// element in a Vec that grew by doubling (so up to twice its elements, at least four), every
/// string and bytes field an allocation of its own. Known message fields are followed by the
/// schema; anything else is counted as bytes, which is all prost keeps of it. The record passed
/// the receiver's walk, so it is well formed; a malformed one is bounded by its length.
pub(crate) fn decoded_estimate(record: &[u8]) -> usize {
    let mut pos = 0;
    let message = match (varint::read(record, &mut pos), varint::read(record, &mut pos)) {
        (Ok(_), Ok(len)) => record.get(pos..pos.saturating_add(len as usize)).unwrap_or(&[]),
        _ => &[],
    };
    // Twice: the decoded record and the growth while statements edit it (attribute values set
    // from others, kvlists built), which a statement list cannot make larger than the record.
    size_of(Msg::ResourceSpans)
        .saturating_add(message_cost(Msg::ResourceSpans, message))
        .saturating_mul(2)
}

/// The heap a message of type `msg` encoded in `buf` takes (not its own inline size).
fn message_cost(msg: Msg, buf: &[u8]) -> usize {
    let mut cost = 0usize;
    // Elements per repeated field of this message, by field number (OTLP's are all below 16);
    // `seen` marks the fields counted, so a leaf message (most are) skips the tally below.
    let mut repeated = [0usize; 16];
    let mut seen = 0u16;
    let mut pos = 0;
    while pos < buf.len() {
        let Ok(key) = varint::read(buf, &mut pos) else {
            return cost.saturating_add(buf.len());
        };
        let (field, wire_type) = (key >> 3, key & 7);
        match wire_type {
            0 => {
                if varint::read(buf, &mut pos).is_err() {
                    break;
                }
            }
            1 => pos = pos.saturating_add(8),
            5 => pos = pos.saturating_add(4),
            2 => {
                let Ok(len) = varint::read(buf, &mut pos) else { break };
                let end = pos.saturating_add(len as usize).min(buf.len());
                let payload = &buf[pos..end];
                pos = end;
                let slot = usize::try_from(field).ok().filter(|f| *f < 16);
                match child(msg, field) {
                    Child::Message(m, is_repeated) => {
                        cost = cost.saturating_add(message_cost(m, payload));
                        if is_repeated && let Some(f) = slot {
                            repeated[f] += 1;
                            seen |= 1 << f;
                        }
                    }
                    Child::Bytes(is_repeated) => {
                        cost = cost.saturating_add(payload.len() + ALLOCATION_OVERHEAD);
                        if is_repeated && let Some(f) = slot {
                            repeated[f] += 1;
                            seen |= 1 << f;
                        }
                    }
                }
            }
            _ => return cost.saturating_add(buf.len()),
        }
    }
    while seen != 0 {
        let f = seen.trailing_zeros() as usize;
        seen &= seen - 1;
        let element = match child(msg, f as u64) {
            Child::Message(m, _) => size_of(m),
            Child::Bytes(_) => std::mem::size_of::<String>(),
        };
        let capacity = repeated[f].next_power_of_two().max(4);
        cost = cost.saturating_add(capacity.saturating_mul(element) + ALLOCATION_OVERHEAD);
    }
    cost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::wire::testdata;

    /// The estimate bounds what prost's decoded form holds, counted field by field, on
    /// realistic and on hostile shapes (many empty elements where the schema repeats).
    #[test]
    fn estimate_bounds_the_decoded_size() {
        let mut shapes = vec![testdata::resource_spans("svc", 1, 3, 50)];
        let mut hostile = testdata::resource_spans("svc", 1, 1, 0);
        hostile.scope_spans[0].spans = vec![Span::default(); 10_000];
        shapes.push(hostile);
        let mut attrs = testdata::resource_spans("svc", 1, 1, 1);
        attrs.scope_spans[0].spans[0].attributes = vec![KeyValue::default(); 10_000];
        shapes.push(attrs);
        for rs in shapes {
            let record = wire::encode_record(&rs);
            let estimate = decoded_estimate(&record);
            let held = heap_of(&rs);
            assert!(estimate >= held, "{estimate} < {held}");
            assert!(estimate <= 8 * held.max(record.len()) + 4096, "{estimate} for {held}");
        }
    }

    /// The heap a decoded ResourceSpans holds, with Vecs at their exact length (a lower bound of
    /// what prost allocated).
    fn heap_of(rs: &ResourceSpans) -> usize {
        use std::mem::size_of;
        let kvs = |a: &[KeyValue]| std::mem::size_of_val(a) + a.iter().map(|kv| kv.key.len()).sum::<usize>();
        let mut total = rs.scope_spans.len() * size_of::<ScopeSpans>();
        total += rs.resource.as_ref().map_or(0, |r| kvs(&r.attributes));
        for ss in &rs.scope_spans {
            total += ss.spans.len() * size_of::<Span>();
            for s in &ss.spans {
                total += kvs(&s.attributes) + s.name.len() + s.trace_id.len() + s.span_id.len();
            }
        }
        total
    }

    #[test]
    fn a_malformed_record_is_bounded_by_its_length() {
        for bytes in [&b""[..], &[0x0a], &[0x0a, 0x05, 0xff], &[0x0a, 0x02, 0x12, 0x7f]] {
            assert!(decoded_estimate(bytes) < 4096);
        }
    }
}
