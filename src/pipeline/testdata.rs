//! Small OTLP requests for unit tests.
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

pub(crate) fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

pub(crate) fn span(seed: u64) -> Span {
    let mut trace_id = [0u8; 16];
    trace_id[..8].copy_from_slice(&(seed + 1).to_be_bytes());
    Span {
        trace_id: trace_id.to_vec(),
        span_id: (seed + 1).to_be_bytes().to_vec(),
        name: format!("span-{seed}"),
        start_time_unix_nano: 1_700_000_000_000_000_000 + seed,
        end_time_unix_nano: 1_700_000_000_100_000_000 + seed,
        ..Default::default()
    }
}

/// A ResourceSpans with `scopes` scopes of `per_scope` spans, ids starting at `first`.
pub(crate) fn resource_spans(service: &str, first: u64, scopes: usize, per_scope: usize) -> ResourceSpans {
    let mut next = first;
    ResourceSpans {
        resource: Some(Resource {
            attributes: vec![kv("service.name", service)],
            ..Default::default()
        }),
        scope_spans: (0..scopes)
            .map(|s| ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: format!("scope-{s}"),
                    ..Default::default()
                }),
                spans: (0..per_scope)
                    .map(|_| {
                        next += 1;
                        span(next)
                    })
                    .collect(),
                schema_url: String::new(),
            })
            .collect(),
        schema_url: String::new(),
    }
}
