//! A request on its way into the pipelines: parsed once, then, for each distinct chain of
//! span-editing processors among the pipelines it feeds, processed into a copy of its own. The
//! receiver runs this inside its parse (on the blocking pool for large bodies, under the body's
//! memory hold); pipelines without such processors take the parsed records as they are.
use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;

use super::wire::{DecodeBudget, ParsedRequest, ResourceChunk};
use super::{Intake, Target};
use crate::processor::RequestContext;
use crate::processor::apply::{ApplyError, Chain};

/// A parsed request, with each processed route's copy once it was processed.
#[derive(Debug)]
pub struct Admitted {
    pub(super) parsed: ParsedRequest,
    /// One copy per processed route of the intake, in its order; `None` until processed.
    pub(super) processed: Option<Vec<Vec<ResourceChunk>>>,
}

impl From<ParsedRequest> for Admitted {
    fn from(parsed: ParsedRequest) -> Admitted {
        Admitted {
            parsed,
            processed: None,
        }
    }
}

/// What the receiver reports (spans received, rejected) is the request as it arrived.
impl Deref for Admitted {
    type Target = ParsedRequest;
    fn deref(&self) -> &ParsedRequest {
        &self.parsed
    }
}

/// Exporters fed by pipelines with the same span-editing processors: they share one copy.
#[derive(Debug)]
pub(crate) struct ProcessedRoute {
    pub(crate) chain: Arc<Chain>,
    pub(crate) targets: Vec<Target>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Memory(..) => "Target::Memory",
            Target::Spool(..) => "Target::Spool",
        })
    }
}

/// A budget for a request processed outside a receiver (no body hold to charge).
struct Unheld;

impl DecodeBudget for Unheld {
    type Error = ApplyError;
    fn hold_copy(&mut self, _: usize) -> Result<(), ApplyError> {
        Ok(())
    }
    fn hold_decoded(&mut self, _: usize) -> Result<(), ApplyError> {
        Ok(())
    }
}

impl Intake {
    /// Adds the routes of pipelines whose processors edit spans.
    pub(crate) fn with_processed(mut self, routes: Vec<ProcessedRoute>) -> Intake {
        self.processed = routes;
        self
    }

    /// Validates a protobuf request (`wire::parse_protobuf_within`); when pipelines process it,
    /// the walk also tallies what each record takes decoded, which [`Intake::process`] charges.
    pub(crate) fn parse_protobuf<B: DecodeBudget>(
        &self,
        body: Bytes,
        budget: &mut B,
    ) -> Result<ParsedRequest, B::Error> {
        super::wire::parse_protobuf_tallied(body, budget, !self.processed.is_empty())
    }

    /// Processes `parsed` (a request with context `request`) for every processed route,
    /// charging `budget` for what decoding takes and what the copies hold, before it is allocated.
    pub(crate) fn process<B: DecodeBudget>(
        &self,
        parsed: ParsedRequest,
        request: &RequestContext,
        budget: &mut B,
    ) -> Result<Admitted, B::Error>
    where
        B::Error: From<ApplyError>,
    {
        if self.processed.is_empty() || parsed.chunks.is_empty() {
            return Ok(parsed.into());
        }
        let mut copies = Vec::with_capacity(self.processed.len());
        for route in &self.processed {
            copies.push(route.chain.apply(&parsed.chunks, &parsed.decoded, request, budget)?);
        }
        Ok(Admitted {
            parsed,
            processed: Some(copies),
        })
    }

    /// The copies of a request submitted without [`Intake::process`] (in-process callers):
    /// processed here, unbudgeted. A route whose processors refuse it gets nothing, logged.
    pub(super) fn process_late(&self, chunks: &[ResourceChunk]) -> Vec<Vec<ResourceChunk>> {
        self.processed
            .iter()
            .map(|route| match route.chain.apply(chunks, &[], &RequestContext::default(), &mut Unheld) {
                Ok(copy) => copy,
                Err(e) => {
                    tracing::warn!(processors = ?route.chain.ids(), error = %e, "a request was not delivered to the pipelines of these processors");
                    Vec::new()
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::wire::{self, testdata};
    use crate::pipeline::{MemoryBudget, Refusal};
    use crate::processor::ProcessorConfig;
    use crate::receiver::ReceiveError;
    use bytes::Bytes;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    use tokio::sync::mpsc;

    fn transform(statement: &str) -> Arc<Chain> {
        let c: crate::processor::transform::TransformConfig =
            serde_norway::from_str(&format!("trace_statements: ['{statement}']")).unwrap();
        let p = c.span_processor("transform").unwrap();
        Arc::new(Chain::new(vec![("transform".into(), p)], None).unwrap())
    }

    fn body(spans: usize) -> Bytes {
        let rs = testdata::resource_spans("svc", 1, 1, spans);
        Bytes::from(
            ExportTraceServiceRequest {
                resource_spans: vec![rs],
            }
            .encode_to_vec(),
        )
    }

    /// Decoding for processors is charged before it happens: a body of many small spans that
    /// fits the budget as bytes, but not decoded, is refused for a pipeline whose processors
    /// decode (span event statements); one whose processors edit the bytes takes only the copy.
    #[test]
    fn processing_is_charged_before_decoding() {
        let budget = MemoryBudget::new(8, 1);
        let (tx, _rx) = mpsc::channel(4);
        let plain = Intake::new(vec![tx.clone().into()], vec![budget.clone()]);
        let processed = Intake::new(vec![], vec![budget.clone()]).with_processed(vec![ProcessedRoute {
            chain: transform(r#"set(spanevent.attributes["k"], "v")"#),
            targets: vec![tx.clone().into()],
        }]);
        let on_wire = Intake::new(vec![], vec![budget.clone()]).with_processed(vec![ProcessedRoute {
            chain: transform(r#"set(attributes["k"], "v")"#),
            targets: vec![tx.into()],
        }]);
        let request = body(60_000);
        assert!(request.len() < 4 << 20, "{} bytes", request.len());
        // The receiver's walk tallies what a record takes decoded; a request parsed without
        // that tally (from elsewhere) is walked again for it: charged the same either way.
        for tallied in [true, false] {
            let parse = |intake: &Intake| {
                let mut hold = intake.hold(request.len())?;
                let parsed = if tallied {
                    intake.parse_protobuf(request.clone(), &mut hold)?
                } else {
                    wire::parse_protobuf_within(request.clone(), &mut hold)?
                };
                let counted = tallied && !intake.processed.is_empty();
                assert_eq!(parsed.decoded.len(), if counted { parsed.chunks.len() } else { 0 });
                intake
                    .process(parsed, &RequestContext::default(), &mut hold)
                    .map(|a| a.parsed.spans)
            };
            assert_eq!(parse(&plain).unwrap(), 60_000);
            // Both paths: the wire path's view of the record takes memory like a decode.
            assert!(matches!(parse(&processed), Err(ReceiveError::DecodeTooLarge { .. })));
            assert!(matches!(parse(&on_wire), Err(ReceiveError::DecodeTooLarge { .. })));
            assert_eq!(budget.used(), 0, "every hold was released");
        }
    }

    /// Plain and processed pipelines of one receiver each get their own copy, and a request
    /// submitted without `process` is processed on the way in.
    #[test]
    fn each_route_gets_its_copy() {
        let (plain_tx, mut plain_rx) = mpsc::channel(4);
        let (edited_tx, mut edited_rx) = mpsc::channel(4);
        let intake = Intake::new(vec![plain_tx.into()], vec![]).with_processed(vec![ProcessedRoute {
            chain: transform(r#"set(resource.attributes["mlflow.experiment_id"], "42")"#),
            targets: vec![edited_tx.into()],
        }]);
        for processed_first in [true, false] {
            let parsed = wire::parse_protobuf(body(3)).unwrap();
            let admitted = if processed_first {
                intake.process(parsed, &RequestContext::default(), &mut Unheld).unwrap()
            } else {
                parsed.into()
            };
            intake.submit(admitted, None).unwrap();
            let plain = plain_rx.try_recv().unwrap();
            let edited = edited_rx.try_recv().unwrap();
            assert_eq!(plain[0].destination.experiment, None);
            assert_eq!(edited[0].destination.experiment.as_deref(), Some("42"));
            assert_eq!((plain[0].item.chunk.spans, edited[0].item.chunk.spans), (3, 3));
        }
        // A full processed route refuses the request for every route.
        let (full_tx, _full_rx) = mpsc::channel(1);
        let (tx, mut rx) = mpsc::channel(4);
        let intake = Intake::new(vec![tx.into()], vec![]).with_processed(vec![ProcessedRoute {
            chain: transform(r#"set(name, "x")"#),
            targets: vec![full_tx.into()],
        }]);
        intake.submit(wire::parse_protobuf(body(1)).unwrap(), None).unwrap();
        let refused = intake.submit(wire::parse_protobuf(body(1)).unwrap(), None);
        assert_eq!(refused.err(), Some(Refusal::QueueFull));
        assert!(rx.try_recv().is_ok());
        assert!(
            rx.try_recv().is_err(),
            "the plain route did not get the refused request"
        );
    }
}
