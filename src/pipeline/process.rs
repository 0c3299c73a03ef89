//! A request on its way into the pipelines: parsed once, then, for each distinct chain of
//! span-editing processors among the pipelines it feeds, processed into a copy of its own. The
//! receiver runs this inside its parse (on the blocking pool for large bodies, under the body's
//! memory hold); pipelines without such processors take the parsed records as they are.
use std::ops::Deref;
use std::sync::Arc;

use super::wire::{DecodeBudget, ParsedRequest, ResourceChunk};
use super::{Intake, Target};
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
            Target::Memory(_) => "Target::Memory",
            Target::Spool(_) => "Target::Spool",
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

    /// Processes `parsed` for every processed route, charging `budget` for what decoding takes
    /// and what the copies hold, before it is allocated.
    pub(crate) fn process<B: DecodeBudget>(&self, parsed: ParsedRequest, budget: &mut B) -> Result<Admitted, B::Error>
    where
        B::Error: From<ApplyError>,
    {
        if self.processed.is_empty() || parsed.chunks.is_empty() {
            return Ok(parsed.into());
        }
        let mut copies = Vec::with_capacity(self.processed.len());
        for route in &self.processed {
            copies.push(route.chain.apply(&parsed.chunks, budget)?);
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
            .map(|route| match route.chain.apply(chunks, &mut Unheld) {
                Ok(copy) => copy,
                Err(e) => {
                    tracing::warn!(processors = ?route.chain.ids(), error = %e, "a request was not delivered to the pipelines of these processors");
                    Vec::new()
                }
            })
            .collect()
    }
}
