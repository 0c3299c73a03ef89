//! OTLP/JSON bodies: no panic; an accepted request's spans come out of the batcher exactly once.
#![no_main]
mod pipeline;

use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use otlp_relay::pipeline::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = wire::parse_json(data) {
        let reference: ExportTraceServiceRequest = serde_json::from_slice(data).expect("same parser");
        assert_eq!(pipeline::deliver(parsed), pipeline::usable_spans(&reference));
    }
});
