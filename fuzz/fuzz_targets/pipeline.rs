//! Shared by the OTLP targets: an accepted request goes through the batcher (at most 3 spans a
//! batch, so records are split) and its payloads must decode to exactly the accepted spans.
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use otlp_relay::batch::{BatchSettings, Batcher};
use otlp_relay::pipeline::wire::ParsedRequest;
use otlp_relay::pipeline::{Destination, Intake, Item, Routed};
use prost::Message;

pub fn deliver(parsed: ParsedRequest) -> Vec<(Vec<u8>, Vec<u8>)> {
    let accepted = parsed.spans;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Vec<Routed>>>(1);
    let intake = Intake::new(vec![tx.into()], vec![]);
    intake
        .submit(parsed, None)
        .expect("an in-memory intake with room accepts");
    let mut batcher: Batcher<Destination, Item> = Batcher::new(BatchSettings {
        send_batch_size: 3,
        send_batch_max_size: 3,
        timeout: Duration::from_secs(1),
    });
    let now = Instant::now();
    let mut batches = Vec::new();
    if let Ok(routed) = rx.try_recv() {
        for r in routed.iter() {
            batches.extend(batcher.add(r.destination.clone(), r.item.clone(), now));
        }
    }
    batches.extend(batcher.flush());
    assert_eq!(batcher.take_unsplit(), 0, "an accepted record failed to split");
    let mut keys = Vec::new();
    for batch in &batches {
        let req = ExportTraceServiceRequest::decode(batch.payload()).expect("payload decodes");
        for s in req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            keys.push((s.trace_id.clone(), s.span_id.clone()));
        }
    }
    assert_eq!(keys.len(), accepted);
    keys.sort();
    keys
}

pub fn usable_spans(req: &ExportTraceServiceRequest) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut keys: Vec<_> = req
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .filter(|s| {
            s.trace_id.len() == 16
                && s.span_id.len() == 8
                && s.trace_id.iter().any(|&b| b != 0)
                && s.span_id.iter().any(|&b| b != 0)
        })
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    keys.sort();
    keys
}
