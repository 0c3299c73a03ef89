//! Where processors that edit spans run, per pipeline, one ResourceSpans record of a request at a
//! time, on one of two paths chosen when the chain is built:
//! - the wire path, when every processor of the chain can run on protobuf bytes
//!   ([`SpanProcessor::on_wire`]: `resource`, `attributes`, `filter` without span event
//!   conditions, `transform` without the `spanevent` context): the record is viewed as bytes
//!   (`processor::wire`), every processor applied in order, edits spliced into a new record;
//!   untouched spans are copied as bytes, dropped ones left out. Nothing is decoded but the
//!   resource and scopes; the view (an entry per span and attribute) is charged to the
//!   request's budget like a decode, before it is built, and the new record's bytes after.
//! - the prost path, otherwise (`redaction`, `probabilistic_sampler`, span events): the record
//!   is decoded (prost) once, every processor applied in order, and the result encoded once. The
//!   memory decoding takes is charged to the request's budget before it happens (the receiver's
//!   walk estimates it, [`decoded_estimate`]); records go one at a time, so a request holds at
//!   most one decoded record besides its encoded copies.
//!
//! Both give the same records once decoded (`processor::wire`'s tests compare them).
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;

use super::wire::Record;
use super::{ProcessError, RequestContext, SpanProcessor};
use crate::otlp::routing;
use crate::pipeline::wire::{self, DecodeBudget, DecodeError, ResourceChunk, decoded_estimate};
use crate::telemetry::{Metrics, ProcessorHandles};

/// How much more than a decode the wire path's view may take: its entry for an attribute is at
/// most twice a decoded KeyValue (checked in the tests).
const WIRE_VIEW_FACTOR: usize = 2;

/// The processors of one pipeline that edit spans, in pipeline order.
pub(crate) struct Chain {
    processors: Vec<(String, Box<dyn SpanProcessor>)>,
    /// Each processor's item counters, in the same order (empty without metrics): registered
    /// once, so no label strings are built per request.
    counts: Vec<Arc<ProcessorHandles>>,
    /// Every processor runs on protobuf bytes: records are edited, not decoded.
    wire: bool,
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
        let wire = processors.iter().all(|(_, p)| p.on_wire());
        (!processors.is_empty()).then_some(Chain {
            processors,
            counts,
            wire,
        })
    }

    /// A chain on the path given, whatever its processors say (the tests compare the paths).
    #[cfg(test)]
    pub(super) fn on_path(processors: Vec<(String, Box<dyn SpanProcessor>)>, wire: bool) -> Chain {
        Chain {
            processors,
            counts: Vec::new(),
            wire,
        }
    }

    /// Whether records are edited as bytes.
    #[cfg(test)]
    pub(crate) fn on_wire(&self) -> bool {
        self.wire
    }

    /// The processors' ids, in order: pipelines with the same ones share one processed copy.
    pub(crate) fn ids(&self) -> Vec<&str> {
        self.processors.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Processes every record of a request into new records (those left without spans are
    /// gone). What decoding takes and what the new records hold are charged to `budget` first:
    /// `decoded` is what each chunk takes decoded, as the receiver's walk tallied it; when it
    /// does not say that of every chunk (a request from elsewhere), each is walked here.
    pub(crate) fn apply<B: DecodeBudget>(
        &self,
        chunks: &[ResourceChunk],
        decoded: &[usize],
        request: &RequestContext,
        budget: &mut B,
    ) -> Result<Vec<ResourceChunk>, B::Error>
    where
        B::Error: From<ApplyError>,
    {
        let mut out = Vec::with_capacity(chunks.len());
        let mut held = 0usize;
        let tallied = decoded.len() == chunks.len();
        for (i, chunk) in chunks.iter().enumerate() {
            let estimate = match decoded.get(i) {
                Some(&d) if tallied => d,
                _ => decoded_estimate(&chunk.bytes),
            };
            // The wire path's view of a record (an entry per attribute, per span) takes memory
            // like a decode does, up to twice a decoded KeyValue per attribute (a record of
            // empty KeyValues, 2 bytes each), so it is charged the same way before it is built.
            let need = estimate.saturating_mul(if self.wire { WIRE_VIEW_FACTOR } else { 1 });
            if need > held {
                budget.hold_decoded(need - held)?;
                held = need;
            }
            let processed = if self.wire {
                self.apply_wire(chunk, request)
            } else {
                self.apply_one(chunk, request)
            };
            if let Some(processed) = processed.map_err(B::Error::from)? {
                budget.hold_copy(processed.bytes.len())?;
                out.push(processed);
            }
        }
        Ok(out)
    }

    pub(super) fn apply_one(
        &self,
        chunk: &ResourceChunk,
        request: &RequestContext,
    ) -> Result<Option<ResourceChunk>, ApplyError> {
        // A chunk is one field-1 record, so it decodes as a request of one ResourceSpans.
        let decoded = ExportTraceServiceRequest::decode(chunk.bytes.clone()).map_err(DecodeError::from)?;
        let Some(mut rs) = decoded.resource_spans.into_iter().next() else {
            return Ok(None);
        };
        let mut spans = chunk.spans;
        for (i, (_, processor)) in self.processors.iter().enumerate() {
            processor.process_in(&mut rs, request)?;
            spans = self.count(i, spans, span_count(&rs));
        }
        if spans == 0 {
            return Ok(None);
        }
        let bytes = wire::encode_record(&rs);
        // The processors may have set the routing attributes: read from what goes on.
        let names = routing::resource_routing(&bytes, "").names();
        Ok(Some(ResourceChunk {
            bytes,
            spans,
            experiment: wire::experiment_of(&rs),
            names,
        }))
    }
}

impl Chain {
    /// Counts processor `i`'s items; returns what is left.
    fn count(&self, i: usize, spans: usize, left: usize) -> usize {
        if let Some(counts) = self.counts.get(i) {
            counts.incoming.inc_by(spans as u64);
            counts.outgoing.inc_by(left as u64);
            if left < spans {
                counts.dropped.inc_by((spans - left) as u64);
            }
        }
        left
    }

    /// [`Chain::apply_one`] on the record's bytes (the wire path).
    pub(super) fn apply_wire(
        &self,
        chunk: &ResourceChunk,
        request: &RequestContext,
    ) -> Result<Option<ResourceChunk>, ApplyError> {
        let mut record = Record::parse(record_message(&chunk.bytes)?, chunk.spans)?;
        let mut spans = chunk.spans;
        for (i, (_, processor)) in self.processors.iter().enumerate() {
            processor.process_wire(&mut record, request)?;
            spans = self.count(i, spans, record.span_count());
        }
        if spans == 0 {
            return Ok(None);
        }
        let bytes = record.encode()?;
        // The processors may have set the routing attributes: read from what goes on.
        let names = routing::resource_routing(&bytes, "").names();
        Ok(Some(ResourceChunk {
            bytes,
            spans,
            experiment: wire::experiment_of_resource(&record.resource),
            names,
        }))
    }
}

/// The ResourceSpans message inside a chunk (a field-1 record: key, length, message).
fn record_message(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    let mut pos = 0;
    let key = crate::otlp::varint::read(bytes, &mut pos).map_err(|e| DecodeError::Framing(e.message()))?;
    let len = crate::otlp::varint::read(bytes, &mut pos).map_err(|e| DecodeError::Framing(e.message()))?;
    match usize::try_from(len).ok().and_then(|l| pos.checked_add(l)) {
        Some(end) if key == 0x0a && end == bytes.len() => Ok(&bytes[pos..end]),
        _ => Err(DecodeError::Framing("a record is not one resource_spans field")),
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
