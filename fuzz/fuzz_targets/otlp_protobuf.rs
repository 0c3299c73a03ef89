//! OTLP/protobuf bodies: the walker accepts only what prost decodes, and an accepted request's
//! spans come out of the batcher exactly once.
#![no_main]
mod pipeline;

use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use otlp_relay::pipeline::wire;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let reference = ExportTraceServiceRequest::decode(data);
    match wire::parse_protobuf(bytes::Bytes::copy_from_slice(data)) {
        Ok(parsed) => {
            let reference = reference.expect("the walker accepted what prost refuses");
            assert_eq!(pipeline::deliver(parsed), pipeline::usable_spans(&reference));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
