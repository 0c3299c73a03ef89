//! Where processors that edit spans run: per pipeline, each ResourceSpans record of a request is
//! decoded (prost) once, every such processor of the pipeline applied in order, and the result
//! encoded once into a new record. The memory decoding takes is charged to the request's budget
//! before it happens (the receiver's walk estimates it, [`decoded_estimate`]); records go one at a time, so a request holds at most
//! one decoded record besides its encoded copies.
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use prost::Message;

use super::{ProcessError, RequestContext, SpanProcessor};
use crate::otlp::routing;
use crate::pipeline::wire::{self, DecodeBudget, DecodeError, ResourceChunk, decoded_estimate};
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
