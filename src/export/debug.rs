//! The debug exporter: logs what would be sent (counts, or every span at detailed verbosity).
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use super::{ExportError, OutBatch};
use crate::config::Verbosity;

pub(crate) struct DebugExporter {
    pub(crate) name: String,
    pub(crate) verbosity: Verbosity,
}

impl DebugExporter {
    pub(crate) fn export(&self, batch: &OutBatch) -> Result<(), ExportError> {
        let experiment = batch.key.experiment.as_deref().unwrap_or("(default)");
        tracing::info!(exporter = %self.name, spans = batch.spans, experiment, "traces");
        if self.verbosity == Verbosity::Basic {
            return Ok(());
        }
        let request =
            ExportTraceServiceRequest::decode(batch.payload()).map_err(|e| ExportError::Encode(e.to_string()))?;
        for rs in &request.resource_spans {
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    if self.verbosity == Verbosity::Detailed {
                        tracing::info!(exporter = %self.name, span = ?span, "span");
                    } else {
                        tracing::info!(
                            exporter = %self.name,
                            trace_id = %const_hex::encode(&span.trace_id),
                            span_id = %const_hex::encode(&span.span_id),
                            name = %span.name,
                            "span"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
