//! Cheap span generation: a request is encoded once as a template with placeholder ids and
//! timestamps, and every request after that is a copy of the template with those bytes patched.
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status};
use prost::Message;

/// wyrand: a tiny, fast, seedable generator; ids only need to be unique, not secret.
#[derive(Debug, Clone)]
pub(crate) struct FastRng(u64);

impl FastRng {
    pub(crate) fn new(seed: u64) -> FastRng {
        FastRng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }
    /// A non-zero id (all-zero ids are invalid in OTLP).
    fn nonzero(&mut self) -> u64 {
        loop {
            let v = self.next_u64();
            if v != 0 {
                return v;
            }
        }
    }
}

/// The wire encoding of a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Encoding {
    Proto,
    Json,
}

/// One span of a trace shape.
#[derive(Debug, Clone)]
pub(crate) struct SpanShape {
    pub(crate) name: String,
    pub(crate) kind: SpanKind,
    pub(crate) parent: Option<usize>,
    /// Start offset from the trace start, and duration, in nanoseconds.
    pub(crate) start_ns: u64,
    pub(crate) dur_ns: u64,
    pub(crate) attributes: Vec<KeyValue>,
}

/// What every trace looks like, and what is around it in a request.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub(crate) resource: Vec<KeyValue>,
    pub(crate) spans: Vec<SpanShape>,
}

impl Shape {
    /// A request holding `spans` under this shape's resource and loadgen's scope.
    pub(crate) fn request(&self, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: self.resource.clone(),
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "otlp-relay-loadgen".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

pub(crate) fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

pub(crate) fn kv_str(key: &str, v: &str) -> KeyValue {
    kv(key, Value::StringValue(v.to_string()))
}

/// Parses telemetrygen's `key="value"` (a string), `key=true|false`, `key=123`, or `key=text`.
pub(crate) fn parse_attribute(s: &str) -> Option<KeyValue> {
    let (k, v) = s.split_once('=')?;
    let k = k.trim();
    if k.is_empty() {
        return None;
    }
    let v = v.trim();
    let value = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        Value::StringValue(v[1..v.len() - 1].to_string())
    } else if let Ok(b) = v.parse::<bool>() {
        Value::BoolValue(b)
    } else if let Ok(i) = v.parse::<i64>() {
        Value::IntValue(i)
    } else {
        Value::StringValue(v.to_string())
    };
    Some(kv(k, value))
}

/// Padding attributes: `count` attributes of `bytes` bytes each.
fn padding(count: usize, bytes: usize) -> Vec<KeyValue> {
    if bytes == 0 {
        return Vec::new();
    }
    (0..count.max(1))
        .map(|i| kv_str(&format!("pad.{i}"), &"x".repeat(bytes)))
        .collect()
}

/// telemetrygen's shape: a root span and `children` child spans.
pub(crate) fn plain_shape(
    resource: Vec<KeyValue>,
    span_attrs: &[KeyValue],
    children: usize,
    pad: (usize, usize),
) -> Shape {
    let mut attrs = span_attrs.to_vec();
    attrs.extend(padding(pad.0, pad.1));
    let mut spans = vec![SpanShape {
        name: "lets-go".into(),
        kind: SpanKind::Client,
        parent: None,
        start_ns: 0,
        dur_ns: 1_000_000 * (children as u64 + 1),
        attributes: attrs.clone(),
    }];
    for i in 0..children {
        spans.push(SpanShape {
            name: format!("okey-dokey-{i}"),
            kind: SpanKind::Server,
            parent: Some(0),
            start_ns: 1_000_000 * i as u64 + 100_000,
            dur_ns: 800_000,
            attributes: attrs.clone(),
        });
    }
    Shape { resource, spans }
}

/// A realistic LLM-agent trace: an agent invocation with chat-model calls, tool calls and a
/// retrieval, carrying the gen_ai.* semantic-convention attributes and MLflow's span types.
pub(crate) fn genai_shape(resource: Vec<KeyValue>, span_attrs: &[KeyValue], pad: (usize, usize)) -> Shape {
    let extra = |mut v: Vec<KeyValue>| {
        v.extend(span_attrs.iter().cloned());
        v.extend(padding(pad.0, pad.1));
        v
    };
    let chat = |n: usize, input: i64, output: i64| {
        extra(vec![
            kv_str("gen_ai.operation.name", "chat"),
            kv_str("gen_ai.system", "openai"),
            kv_str("gen_ai.request.model", "gpt-4o"),
            kv_str("gen_ai.response.model", "gpt-4o-2024-08-06"),
            kv("gen_ai.request.temperature", Value::DoubleValue(0.2)),
            kv("gen_ai.usage.input_tokens", Value::IntValue(input)),
            kv("gen_ai.usage.output_tokens", Value::IntValue(output)),
            kv_str(
                "gen_ai.response.finish_reasons",
                if n == 2 { "stop" } else { "tool_calls" },
            ),
            kv_str("mlflow.spanType", "CHAT_MODEL"),
            kv_str(
                "mlflow.spanInputs",
                r#"{"messages":[{"role":"user","content":"What is the weather in Paris and should I bring an umbrella?"}]}"#,
            ),
            kv_str(
                "mlflow.chat.tokenUsage",
                &format!(
                    r#"{{"input_tokens":{input},"output_tokens":{output},"total_tokens":{}}}"#,
                    input + output
                ),
            ),
        ])
    };
    let tool = |name: &str| {
        extra(vec![
            kv_str("gen_ai.operation.name", "execute_tool"),
            kv_str("gen_ai.tool.name", name),
            kv_str("gen_ai.tool.call.id", "call_7f3a9c"),
            kv_str("mlflow.spanType", "TOOL"),
            kv_str("mlflow.spanInputs", r#"{"city":"Paris"}"#),
            kv_str("mlflow.spanOutputs", r#"{"forecast":"light rain","temp_c":14}"#),
        ])
    };
    let ms = 1_000_000u64;
    let spans = vec![
        SpanShape {
            name: "invoke_agent weather-assistant".into(),
            kind: SpanKind::Server,
            parent: None,
            start_ns: 0,
            dur_ns: 4200 * ms,
            attributes: extra(vec![
                kv_str("gen_ai.operation.name", "invoke_agent"),
                kv_str("gen_ai.agent.name", "weather-assistant"),
                kv_str("gen_ai.agent.id", "agent-42"),
                kv_str("gen_ai.conversation.id", "conv-1b2c"),
                kv_str("mlflow.spanType", "AGENT"),
                kv_str("mlflow.traceRequestId", "tr-placeholder"),
                kv_str("mlflow.spanInputs", r#"{"input":"Weather in Paris, umbrella?"}"#),
                kv_str("mlflow.spanOutputs", r#"{"output":"Light rain: take an umbrella."}"#),
            ]),
        },
        SpanShape {
            name: "chat gpt-4o".into(),
            kind: SpanKind::Client,
            parent: Some(0),
            start_ns: 10 * ms,
            dur_ns: 900 * ms,
            attributes: chat(0, 412, 38),
        },
        SpanShape {
            name: "execute_tool get_weather".into(),
            kind: SpanKind::Internal,
            parent: Some(0),
            start_ns: 920 * ms,
            dur_ns: 600 * ms,
            attributes: tool("get_weather"),
        },
        SpanShape {
            name: "retrieve weather-docs".into(),
            kind: SpanKind::Client,
            parent: Some(2),
            start_ns: 950 * ms,
            dur_ns: 300 * ms,
            attributes: extra(vec![
                kv_str("gen_ai.operation.name", "retrieve"),
                kv_str("gen_ai.data_source.id", "weather-docs"),
                kv_str("mlflow.spanType", "RETRIEVER"),
            ]),
        },
        SpanShape {
            name: "chat gpt-4o".into(),
            kind: SpanKind::Client,
            parent: Some(0),
            start_ns: 1530 * ms,
            dur_ns: 800 * ms,
            attributes: chat(1, 690, 25),
        },
        SpanShape {
            name: "execute_tool get_umbrella_advice".into(),
            kind: SpanKind::Internal,
            parent: Some(0),
            start_ns: 2340 * ms,
            dur_ns: 200 * ms,
            attributes: tool("get_umbrella_advice"),
        },
        SpanShape {
            name: "chat gpt-4o".into(),
            kind: SpanKind::Client,
            parent: Some(0),
            start_ns: 2550 * ms,
            dur_ns: 1600 * ms,
            attributes: chat(2, 820, 96),
        },
    ];
    Shape { resource, spans }
}

/// What a patch slot is filled with on every request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    /// Trace id of the n-th trace in the request.
    Trace(usize),
    /// Span id of the n-th span in the request (its own id and its children's parent ids).
    Span(usize),
    /// Start or end time: the request's base time plus this offset (ns).
    Time(u64),
}

/// An encoded request with the byte ranges to overwrite per request.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub(crate) encoding: Encoding,
    bytes: Vec<u8>,
    patches: Vec<(usize, Slot)>,
    pub(crate) traces: usize,
    pub(crate) spans: usize,
    /// Longest trace duration, so timestamps end at "now".
    trace_dur_ns: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("placeholder {0} found {1} times, expected {2}")]
    Placeholder(String, usize, usize),
    #[error("encoding: {0}")]
    Json(#[from] serde_json::Error),
}

fn occurrences(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    memchr::memmem::find_iter(hay, needle).collect()
}

impl Template {
    /// Builds the template for `traces` traces of `shape`. Placeholders are random, so they are
    /// found exactly where they were put (checked).
    pub(crate) fn build(
        shape: &Shape,
        traces: usize,
        encoding: Encoding,
        seed: u64,
    ) -> Result<Template, TemplateError> {
        let mut rng = FastRng::new(seed ^ 0x7e4a);
        let n = shape.spans.len();
        let trace_ids: Vec<[u8; 16]> = (0..traces)
            .map(|_| {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&rng.nonzero().to_le_bytes());
                b[8..].copy_from_slice(&rng.nonzero().to_le_bytes());
                b
            })
            .collect();
        let span_ids: Vec<[u8; 8]> = (0..traces * n).map(|_| rng.nonzero().to_le_bytes()).collect();
        // 19-digit placeholders keep the JSON decimal width equal to real nanosecond timestamps.
        let mut time_placeholders = Vec::new();
        let mut spans = Vec::with_capacity(traces * n);
        for t in 0..traces {
            for (i, s) in shape.spans.iter().enumerate() {
                let mut ts = [0u64; 2];
                for (k, v) in ts.iter_mut().enumerate() {
                    *v = 1_000_000_000_000_000_000 + rng.next_u64() % 8_000_000_000_000_000_000;
                    let offset = if k == 0 { s.start_ns } else { s.start_ns + s.dur_ns };
                    time_placeholders.push((*v, offset));
                }
                spans.push(Span {
                    trace_id: trace_ids[t].to_vec(),
                    span_id: span_ids[t * n + i].to_vec(),
                    parent_span_id: s.parent.map(|p| span_ids[t * n + p].to_vec()).unwrap_or_default(),
                    name: s.name.clone(),
                    kind: s.kind as i32,
                    start_time_unix_nano: ts[0],
                    end_time_unix_nano: ts[1],
                    attributes: s.attributes.clone(),
                    status: Some(Status {
                        code: status::StatusCode::Ok as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        let req = shape.request(spans);
        let bytes = match encoding {
            Encoding::Proto => req.encode_to_vec(),
            Encoding::Json => serde_json::to_vec(&req)?,
        };
        let needle = |raw: &[u8]| -> Vec<u8> {
            match encoding {
                Encoding::Proto => raw.to_vec(),
                Encoding::Json => const_hex::encode(raw).into_bytes(),
            }
        };
        let mut patches = Vec::new();
        let mut find = |needle: Vec<u8>, expected: usize, slot: Slot| -> Result<(), TemplateError> {
            let found = occurrences(&bytes, &needle);
            if found.len() != expected {
                return Err(TemplateError::Placeholder(
                    String::from_utf8_lossy(&needle).into_owned(),
                    found.len(),
                    expected,
                ));
            }
            patches.extend(found.into_iter().map(|o| (o, slot)));
            Ok(())
        };
        for (t, id) in trace_ids.iter().enumerate() {
            find(needle(id), n, Slot::Trace(t))?;
        }
        for t in 0..traces {
            for i in 0..n {
                let children = shape.spans.iter().filter(|c| c.parent == Some(i)).count();
                find(needle(&span_ids[t * n + i]), 1 + children, Slot::Span(t * n + i))?;
            }
        }
        for (v, offset) in time_placeholders {
            let pattern = match encoding {
                Encoding::Proto => v.to_le_bytes().to_vec(),
                Encoding::Json => format!("\"{v}\"").into_bytes(),
            };
            find(pattern, 1, Slot::Time(offset))?;
        }
        // JSON time patterns include the opening quote: the digits start one byte later.
        if encoding == Encoding::Json {
            for (o, slot) in patches.iter_mut() {
                if matches!(slot, Slot::Time(_)) {
                    *o += 1;
                }
            }
        }
        patches.sort_by_key(|p| p.0);
        Ok(Template {
            encoding,
            bytes,
            patches,
            traces,
            spans: traces * n,
            trace_dur_ns: shape.spans.iter().map(|s| s.start_ns + s.dur_ns).max().unwrap_or(0),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// A fresh request: new trace and span ids, timestamps ending at `now_ns`.
    pub(crate) fn render(&self, rng: &mut FastRng, now_ns: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        let traces: Vec<(u64, u64)> = (0..self.traces).map(|_| (rng.nonzero(), rng.nonzero())).collect();
        let spans: Vec<u64> = (0..self.spans).map(|_| rng.nonzero()).collect();
        let base = now_ns.saturating_sub(self.trace_dur_ns);
        for &(at, slot) in &self.patches {
            match (slot, self.encoding) {
                (Slot::Trace(t), Encoding::Proto) => {
                    out[at..at + 8].copy_from_slice(&traces[t].0.to_le_bytes());
                    out[at + 8..at + 16].copy_from_slice(&traces[t].1.to_le_bytes());
                }
                (Slot::Trace(t), Encoding::Json) => {
                    let mut raw = [0u8; 16];
                    raw[..8].copy_from_slice(&traces[t].0.to_le_bytes());
                    raw[8..].copy_from_slice(&traces[t].1.to_le_bytes());
                    const_hex::encode_to_slice(raw, &mut out[at..at + 32]).expect("32 hex digits");
                }
                (Slot::Span(s), Encoding::Proto) => out[at..at + 8].copy_from_slice(&spans[s].to_le_bytes()),
                (Slot::Span(s), Encoding::Json) => {
                    const_hex::encode_to_slice(spans[s].to_le_bytes(), &mut out[at..at + 16]).expect("16 hex digits")
                }
                (Slot::Time(off), Encoding::Proto) => out[at..at + 8].copy_from_slice(&(base + off).to_le_bytes()),
                (Slot::Time(off), Encoding::Json) => write_digits19(base + off, &mut out[at..at + 19]),
            }
        }
    }
}

/// Writes `v` as exactly 19 decimal digits (real nanosecond timestamps have 19 digits until 2286).
fn write_digits19(mut v: u64, out: &mut [u8]) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(t: &Template, bytes: &[u8]) -> ExportTraceServiceRequest {
        match t.encoding {
            Encoding::Proto => ExportTraceServiceRequest::decode(bytes).unwrap(),
            Encoding::Json => serde_json::from_slice(bytes).unwrap(),
        }
    }

    fn spans(req: &ExportTraceServiceRequest) -> Vec<Span> {
        req.resource_spans[0].scope_spans[0].spans.clone()
    }

    #[test]
    fn rendered_requests_have_fresh_consistent_ids_and_times() {
        let shape = plain_shape(vec![kv_str("service.name", "svc")], &[], 3, (2, 10));
        for enc in [Encoding::Proto, Encoding::Json] {
            let t = Template::build(&shape, 5, enc, 1).unwrap();
            assert_eq!(t.spans, 20);
            let mut rng = FastRng::new(9);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let now = 1_764_000_000_000_000_000u64;
            t.render(&mut rng, now, &mut a);
            t.render(&mut rng, now, &mut b);
            let (ra, rb) = (spans(&decode(&t, &a)), spans(&decode(&t, &b)));
            assert_eq!(ra.len(), 20);
            for trace in ra.chunks(4) {
                let root = &trace[0];
                assert!(root.parent_span_id.is_empty());
                for child in &trace[1..] {
                    assert_eq!(child.trace_id, root.trace_id);
                    assert_eq!(child.parent_span_id, root.span_id);
                    assert!(child.start_time_unix_nano >= root.start_time_unix_nano);
                    assert!(child.end_time_unix_nano <= root.end_time_unix_nano);
                }
                assert_eq!(root.end_time_unix_nano, now);
                assert_eq!(root.attributes.len(), 2);
            }
            let ids: std::collections::HashSet<_> = ra
                .iter()
                .chain(rb.iter())
                .map(|s| (s.trace_id.clone(), s.span_id.clone()))
                .collect();
            assert_eq!(ids.len(), 40, "every span of both requests is unique ({enc:?})");
            assert_ne!(ra[0].trace_id, ra[4].trace_id);
        }
    }

    #[test]
    fn genai_trace_shape() {
        let shape = genai_shape(vec![kv_str("service.name", "agent")], &[], (0, 0));
        let t = Template::build(&shape, 2, Encoding::Proto, 3).unwrap();
        let mut out = Vec::new();
        t.render(&mut FastRng::new(1), 2_000_000_000_000_000_000, &mut out);
        let got = spans(&decode(&t, &out));
        assert_eq!(got.len(), 14);
        let trace = &got[..7];
        let attr = |s: &Span, k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        let ty = |s: &Span| match attr(s, "mlflow.spanType") {
            Some(Value::StringValue(v)) => v,
            other => panic!("no span type: {other:?}"),
        };
        assert_eq!(ty(&trace[0]), "AGENT");
        assert!(trace[0].parent_span_id.is_empty());
        let chats: Vec<_> = trace.iter().filter(|s| ty(s) == "CHAT_MODEL").collect();
        assert_eq!(chats.len(), 3);
        for c in &chats {
            assert_eq!(c.parent_span_id, trace[0].span_id);
            assert!(matches!(attr(c, "gen_ai.usage.input_tokens"), Some(Value::IntValue(n)) if n > 0));
            assert!(matches!(attr(c, "gen_ai.usage.output_tokens"), Some(Value::IntValue(n)) if n > 0));
        }
        let tools: Vec<_> = trace.iter().filter(|s| ty(s) == "TOOL").collect();
        assert_eq!(tools.len(), 2);
        let retriever = trace.iter().find(|s| ty(s) == "RETRIEVER").unwrap();
        assert_eq!(
            retriever.parent_span_id, tools[0].span_id,
            "retrieval nests under the tool call"
        );
        assert!(trace.iter().all(|s| s.trace_id == trace[0].trace_id));
    }

    #[test]
    fn attributes_parse_like_telemetrygen() {
        let a = parse_attribute(r#"k="v""#).unwrap();
        assert_eq!(a.value.unwrap().value, Some(Value::StringValue("v".into())));
        let b = parse_attribute("n=5").unwrap();
        assert_eq!(b.value.unwrap().value, Some(Value::IntValue(5)));
        assert!(parse_attribute("novalue").is_none());
    }

    #[test]
    fn nineteen_digits() {
        let mut b = [0u8; 19];
        write_digits19(1_764_000_000_123_456_789, &mut b);
        assert_eq!(&b, b"1764000000123456789");
    }
}
