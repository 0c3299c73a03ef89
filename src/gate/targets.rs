//! The resources a canonical request names, found where the route table says MLflow reads them
//! (header, query, body, path). Pure: ids out, look-ups (run → experiment...) happen in the gate.
use serde_json::{Map, Value};

use super::canonical::{self, CanonError, Query};
use super::routes::{Find, Kind};
use crate::otlp::ExperimentId;

/// Most ids one request may name (each may cost an MLflow look-up): more is refused with 400.
pub(crate) const MAX_IDS: usize = 100;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) experiments: Vec<String>,
    /// Names experiments will get (create, rename).
    pub(crate) new_names: Vec<String>,
    pub(crate) runs: Vec<String>,
    pub(crate) traces: Vec<String>,
    /// Traces a write creates or, when they exist, overwrites.
    pub(crate) traces_if_exist: Vec<String>,
    pub(crate) models: Vec<String>,
    /// Something was named that belongs to no single experiment (an artifact path outside the
    /// `<experiment id>/` tree): the level is needed everywhere.
    pub(crate) everywhere: bool,
}

impl Found {
    pub(crate) fn is_empty(&self) -> bool {
        self.experiments.is_empty()
            && self.new_names.is_empty()
            && self.runs.is_empty()
            && self.traces.is_empty()
            && self.traces_if_exist.is_empty()
            && self.models.is_empty()
    }

    pub(crate) fn count(&self) -> usize {
        self.experiments.len()
            + self.new_names.len()
            + self.runs.len()
            + self.traces.len()
            + self.traces_if_exist.len()
            + self.models.len()
    }

    fn dedup(&mut self) {
        for v in [
            &mut self.experiments,
            &mut self.new_names,
            &mut self.runs,
            &mut self.traces,
            &mut self.traces_if_exist,
            &mut self.models,
        ] {
            v.sort();
            v.dedup();
        }
    }

    pub(crate) fn push(&mut self, kind: Kind, v: String) -> Result<(), CanonError> {
        match kind {
            Kind::Experiment | Kind::ExperimentOrDefault => {
                if !ExperimentId::is_canonical(&v) {
                    return Err(CanonError::Target(format!(
                        "invalid experiment id {:?}",
                        v.chars().take(40).collect::<String>()
                    )));
                }
                self.experiments.push(v)
            }
            Kind::NewExperimentName => self.new_names.push(v),
            Kind::Run => self.runs.push(v),
            Kind::Trace => self.traces.push(v),
            Kind::TraceIfExists => self.traces_if_exist.push(v),
            Kind::LoggedModel => self.models.push(v),
            Kind::ArtifactPath => {
                let segs = canonical::artifact_path(&v)?;
                match segs.first() {
                    Some(first) if ExperimentId::is_canonical(first) => self.experiments.push(first.to_string()),
                    _ => self.everywhere = true,
                }
            }
        }
        if v_is_empty_id(kind, self) {
            return Err(CanonError::Target("empty id".into()));
        }
        Ok(())
    }
}

fn v_is_empty_id(kind: Kind, f: &Found) -> bool {
    let last = match kind {
        Kind::Run => f.runs.last(),
        Kind::Trace => f.traces.last(),
        Kind::TraceIfExists => f.traces_if_exist.last(),
        Kind::LoggedModel => f.models.last(),
        Kind::NewExperimentName => f.new_names.last(),
        _ => None,
    };
    last.is_some_and(|s| s.is_empty())
}

/// Trace tag that MLflow trusts as the trace's artifact directory: whoever sets it reads any
/// directory through `get-trace-artifact`, so only admins may.
const TRACE_ARTIFACT_TAG: &str = "mlflow.artifactLocation";

/// The request sets a trace tag that redirects where MLflow reads the trace's artifacts.
pub(crate) fn sets_reserved_trace_tag(segments: &[String], body: Option<&Map<String, Value>>) -> bool {
    let Some(b) = body else { return false };
    let is_traces = segments.get(3).is_some_and(|s| s == "traces");
    let tag_route = is_traces && segments.last().is_some_and(|s| s == "tags");
    let keyed = b.get("key").and_then(Value::as_str) == Some(TRACE_ARTIFACT_TAG);
    let v3_tags = b
        .get("trace")
        .and_then(|t| t.get("trace_info"))
        .and_then(|i| i.get("tags"))
        .and_then(Value::as_object)
        .is_some_and(|m| m.contains_key(TRACE_ARTIFACT_TAG));
    let v2_tags = b.get("tags").and_then(Value::as_array).is_some_and(|xs| {
        xs.iter()
            .any(|t| t.get("key").and_then(Value::as_str) == Some(TRACE_ARTIFACT_TAG))
    });
    is_traces && ((tag_route && keyed) || v3_tags || v2_tags)
}

/// Most distinct traces in one OTLP request from a non-admin (each is looked up).
pub(crate) const MAX_OTLP_TRACES: usize = 10_000;

/// Span attributes MLflow turns into trace tags that say where a trace's data is read from
/// (`mlflow.traceTag.<tag>`): setting them would point a trace of A at B's data.
const RESERVED_OTLP_TAG_ATTRIBUTES: [&str; 2] = [
    "mlflow.tracetag.mlflow.artifactlocation",
    "mlflow.tracetag.mlflow.trace.spanslocation",
];

/// What the gate read from an OTLP export: the MLflow trace ids (`tr-<hex>`) it touches, and
/// the body decompressed (None when it came uncompressed), which is what gets forwarded.
pub(crate) struct OtlpBody {
    pub(crate) trace_ids: Vec<String>,
    pub(crate) decompressed: Option<Vec<u8>>,
}

/// Reads an OTLP/HTTP protobuf body as MLflow will: decompressed as its Content-Encoding says
/// (every gzip member, as Python's gzip does) up to `limit` bytes. Refused: OTLP/JSON (MLflow
/// translates its ids in ways the gate would have to mirror exactly), trace ids that are not 16
/// bytes (MLflow reads them as a number, so 17 bytes with a leading zero name another trace),
/// and the span attributes in RESERVED_OTLP_TAG_ATTRIBUTES.
pub(crate) fn otlp_trace_ids(
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    body: &[u8],
    limit: usize,
) -> Result<OtlpBody, CanonError> {
    use prost::Message;
    use std::io::Read;
    let media = content_type.unwrap_or("").split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/x-protobuf") {
        return Err(CanonError::Body("OTLP must be sent as application/x-protobuf".into()));
    }
    let mut plain = Vec::new();
    let mut compressed = false;
    let raw: &[u8] = match content_encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("identity") => body,
        Some(enc @ ("gzip" | "deflate")) => {
            compressed = true;
            let reader: Box<dyn Read> = if enc == "gzip" {
                Box::new(flate2::read::MultiGzDecoder::new(body))
            } else {
                Box::new(flate2::read::ZlibDecoder::new(body))
            };
            reader
                .take(limit as u64 + 1)
                .read_to_end(&mut plain)
                .map_err(|_| CanonError::Body(format!("OTLP body is not valid {enc}")))?;
            if plain.len() > limit {
                return Err(CanonError::Body("OTLP body too large once decompressed".into()));
            }
            &plain
        }
        Some(_) => return Err(CanonError::Body("unsupported Content-Encoding".into())),
    };
    let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(raw)
        .map_err(|_| CanonError::Body("OTLP body is not an ExportTraceServiceRequest".into()))?;
    let spans = || {
        req.resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
    };
    if spans().any(|sp| sp.trace_id.len() != 16) {
        return Err(CanonError::Body("OTLP trace ids must be 16 bytes".into()));
    }
    let reserved = |key: &str| {
        let key = key.trim().to_ascii_lowercase();
        RESERVED_OTLP_TAG_ATTRIBUTES.contains(&key.as_str())
    };
    let resource_attributes = req
        .resource_spans
        .iter()
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes);
    let span_attributes = spans().flat_map(|sp| {
        sp.attributes
            .iter()
            .chain(sp.events.iter().flat_map(|e| &e.attributes))
            .chain(sp.links.iter().flat_map(|l| &l.attributes))
    });
    if let Some(kv) = resource_attributes.chain(span_attributes).find(|kv| reserved(&kv.key)) {
        return Err(CanonError::Body(format!(
            "the span attribute {:?} is reserved (it sets where MLflow reads a trace's data)",
            kv.key
        )));
    }
    let mut ids: Vec<String> = spans()
        .map(|sp| format!("tr-{}", const_hex::encode(&sp.trace_id)))
        .collect();
    ids.sort();
    ids.dedup();
    if ids.len() > MAX_OTLP_TRACES {
        return Err(CanonError::Body(format!(
            "more than {MAX_OTLP_TRACES} traces in one request"
        )));
    }
    let decompressed = compressed.then_some(plain);
    Ok(OtlpBody {
        trace_ids: ids,
        decompressed,
    })
}

/// The request's inputs as MLflow reads them: the JSON body for methods that have one, else the query.
pub(crate) struct Inputs<'a> {
    pub(crate) segments: &'a [String],
    pub(crate) query: &'a Query,
    pub(crate) body: Option<&'a Map<String, Value>>,
    pub(crate) body_method: bool,
    pub(crate) experiment_header: Option<&'a str>,
}

/// Collects every id `finds` point at. Ids of a wrong JSON type are refused (400), as are more than
/// [`MAX_IDS`] of them.
pub(crate) fn find(finds: &[Find], inp: &Inputs) -> Result<Found, CanonError> {
    let mut out = Found::default();
    for f in finds {
        match *f {
            Find::Field(kind, field) => {
                let mut vals = Vec::new();
                if inp.body_method {
                    if let Some(b) = inp.body {
                        let parts: Vec<&str> = field.split('/').collect();
                        if let Some(x) = b.get(parts[0]) {
                            walk(x, &parts[1..], &mut vals)?;
                        }
                    }
                } else {
                    vals.extend(inp.query.get_all(field).map(str::to_owned));
                }
                if vals.is_empty() && kind == Kind::ExperimentOrDefault {
                    vals.push("0".into());
                }
                for v in vals {
                    out.push(kind, v)?;
                }
            }
            Find::Segment(kind, i) => {
                let v = inp
                    .segments
                    .get(i)
                    .ok_or(CanonError::Path("route without its id segment"))?;
                out.push(kind, v.clone())?;
            }
            Find::Tail(kind, i) => {
                if inp.segments.len() <= i {
                    return Err(CanonError::Path("route without its path"));
                }
                out.push(kind, inp.segments[i..].join("/"))?;
            }
            // Read from the body by the gate itself (see `otlp_trace_ids`).
            Find::OtlpTraces => {}
            Find::Header => match inp.experiment_header {
                Some(h) => out.push(Kind::Experiment, h.trim().to_string())?,
                None => out.everywhere = true,
            },
        }
    }
    out.dedup();
    if out.count() > MAX_IDS {
        return Err(CanonError::Target(format!("more than {MAX_IDS} ids in one request")));
    }
    Ok(out)
}

fn walk(v: &Value, parts: &[&str], out: &mut Vec<String>) -> Result<(), CanonError> {
    let Some((first, rest)) = parts.split_first() else {
        return scalar_ids(v, out);
    };
    match (v, *first) {
        (Value::Null, _) => Ok(()),
        (Value::Array(xs), "*") => xs.iter().try_for_each(|x| walk(x, rest, out)),
        (Value::Object(m), name) if name != "*" => match m.get(name) {
            Some(x) => walk(x, rest, out),
            None => Ok(()),
        },
        _ => Err(CanonError::Body(format!("unexpected JSON type at {first:?}"))),
    }
}

/// An id field: a string or non-negative integer, or a list of them; null is absent.
fn scalar_ids(v: &Value, out: &mut Vec<String>) -> Result<(), CanonError> {
    match v {
        Value::Null => Ok(()),
        Value::String(s) => {
            out.push(s.clone());
            Ok(())
        }
        Value::Number(n) if n.is_u64() => {
            out.push(n.to_string());
            Ok(())
        }
        Value::Array(xs) => xs.iter().try_for_each(|x| match x {
            Value::Array(_) => Err(CanonError::Body("nested list of ids".into())),
            _ => scalar_ids(x, out),
        }),
        _ => Err(CanonError::Body("an id must be a string".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::routes::{Find::*, Kind::*};

    fn inputs<'a>(
        segments: &'a [String],
        query: &'a Query,
        body: Option<&'a Map<String, Value>>,
        header: Option<&'a str>,
    ) -> Inputs<'a> {
        Inputs {
            segments,
            query,
            body,
            body_method: body.is_some(),
            experiment_header: header,
        }
    }

    #[test]
    fn fields_nested_and_defaults() {
        let body = serde_json::json!({"trace": {"trace_info": {"trace_location": {"mlflow_experiment": {"experiment_id": "2"}}}},
            "locations": [{"mlflow_experiment": {"experiment_id": "3"}}, {"mlflow_experiment": {"experiment_id": 4}}],
            "models": [{"model_id": "m-1"}]});
        let body = body.as_object().unwrap();
        let q = Query::default();
        let f = find(
            &[
                Field(
                    Experiment,
                    "trace/trace_info/trace_location/mlflow_experiment/experiment_id",
                ),
                Field(Experiment, "locations/*/mlflow_experiment/experiment_id"),
                Field(LoggedModel, "models/*/model_id"),
                Field(ExperimentOrDefault, "experiment_id"),
            ],
            &inputs(&[], &q, Some(body), None),
        )
        .unwrap();
        assert_eq!(f.experiments, ["0", "2", "3", "4"]);
        assert_eq!(f.models, ["m-1"]);
    }

    #[test]
    fn query_path_and_header() {
        let q = canonical::query(Some("run_ids=a&run_ids=b&experiment_id=1")).unwrap();
        let segs: Vec<String> = "api/2.0/mlflow-artifacts/artifacts/7/r/artifacts/x"
            .split('/')
            .map(String::from)
            .collect();
        let f = find(
            &[Field(Run, "run_ids"), Tail(ArtifactPath, 4), Header],
            &inputs(&segs, &q, None, Some("5")),
        )
        .unwrap();
        assert_eq!(f.runs, ["a", "b"]);
        assert_eq!(f.experiments, ["5", "7"]);
        assert!(!f.everywhere);
        // The header is read only where the table says (OTLP ingestion).
        let f = find(&[Field(Run, "run_ids")], &inputs(&segs, &q, None, Some("5"))).unwrap();
        assert!(f.experiments.is_empty());
        // An artifact path outside any experiment, or the root: everywhere.
        let q = canonical::query(Some("path=")).unwrap();
        let f = find(&[Field(ArtifactPath, "path")], &inputs(&[], &q, None, None)).unwrap();
        assert!(f.everywhere || f.is_empty());
        let q = canonical::query(Some("path=x/y")).unwrap();
        assert!(
            find(&[Field(ArtifactPath, "path")], &inputs(&[], &q, None, None))
                .unwrap()
                .everywhere
        );
        let q = canonical::query(Some("path=1/../2")).unwrap();
        assert!(find(&[Field(ArtifactPath, "path")], &inputs(&[], &q, None, None)).is_err());
    }

    #[test]
    fn otlp_ids() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        use prost::Message;
        let span = |t: u8| Span {
            trace_id: vec![t; 16],
            span_id: vec![1; 8],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![span(0xab), span(0xab), span(1)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let bytes = req.encode_to_vec();
        let read = otlp_trace_ids(Some("application/x-protobuf"), None, &bytes, 1 << 20).unwrap();
        let ids = read.trace_ids;
        assert_eq!(
            ids,
            [format!("tr-{}", "01".repeat(16)), format!("tr-{}", "ab".repeat(16))]
        );
        assert!(read.decompressed.is_none());
        let gzip = |data: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, data).unwrap();
            gz.finish().unwrap()
        };
        let gz = gzip(&bytes);
        let read = otlp_trace_ids(Some("application/x-protobuf"), Some("gzip"), &gz, 1 << 20).unwrap();
        assert_eq!(read.trace_ids, ids);
        assert_eq!(
            read.decompressed.as_deref(),
            Some(bytes.as_slice()),
            "forwarded decompressed"
        );
        // Two gzip members: MLflow (Python's gzip) reads both, so the gate must see the second.
        let other = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![span(0xcd)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec();
        let two = [gzip(&bytes), gzip(&other)].concat();
        let read = otlp_trace_ids(Some("application/x-protobuf"), Some("gzip"), &two, 1 << 20).unwrap();
        assert!(
            read.trace_ids.contains(&format!("tr-{}", "cd".repeat(16))),
            "{:?}",
            read.trace_ids
        );
        assert!(otlp_trace_ids(Some("application/x-protobuf"), Some("gzip"), &gz, 10).is_err());
        assert!(otlp_trace_ids(Some("application/json"), None, b"{}", 1 << 20).is_err());
        assert!(otlp_trace_ids(Some("application/x-protobuf"), Some("br"), &bytes, 1 << 20).is_err());
        assert!(otlp_trace_ids(Some("application/x-protobuf"), None, b"\xff\xff", 1 << 20).is_err());
        // Ids MLflow would read as another trace's number (17 bytes with a leading zero, 8 bytes).
        for len in [0, 8, 15, 17, 32] {
            let mut odd = req.clone();
            odd.resource_spans[0].scope_spans[0].spans[0].trace_id = vec![0; len];
            let err = otlp_trace_ids(Some("application/x-protobuf"), None, &odd.encode_to_vec(), 1 << 20);
            assert!(err.is_err(), "a {len}-byte trace id");
        }
        // Attributes MLflow turns into the tags that say where a trace's data is read from.
        for key in [
            "mlflow.traceTag.mlflow.artifactLocation",
            " MLFLOW.TRACETAG.MLFLOW.ARTIFACTLOCATION ",
            "mlflow.traceTag.mlflow.trace.spansLocation",
        ] {
            let mut tagged = req.clone();
            tagged.resource_spans[0].scope_spans[0].spans[1].attributes.push(
                opentelemetry_proto::tonic::common::v1::KeyValue {
                    key: key.into(),
                    ..Default::default()
                },
            );
            let err = otlp_trace_ids(Some("application/x-protobuf"), None, &tagged.encode_to_vec(), 1 << 20);
            assert!(err.is_err(), "{key:?}");
        }
    }

    #[test]
    fn reserved_trace_tags() {
        let segs = |p: &str| {
            p.split('/')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let tag = serde_json::json!({"key": "mlflow.artifactLocation", "value": "/"});
        let tag = tag.as_object().unwrap();
        assert!(sets_reserved_trace_tag(
            &segs("/api/3.0/mlflow/traces/tr-1/tags"),
            Some(tag)
        ));
        assert!(sets_reserved_trace_tag(
            &segs("/api/2.0/mlflow/traces/tr-1/tags"),
            Some(tag)
        ));
        assert!(!sets_reserved_trace_tag(
            &segs("/api/2.0/mlflow/runs/set-tag"),
            Some(tag)
        ));
        let start = serde_json::json!({"trace": {"trace_info": {"tags": {"mlflow.artifactLocation": "/"}}}});
        assert!(sets_reserved_trace_tag(
            &segs("/api/3.0/mlflow/traces"),
            start.as_object()
        ));
        let ok = serde_json::json!({"key": "note", "value": "/"});
        assert!(!sets_reserved_trace_tag(
            &segs("/api/3.0/mlflow/traces/tr-1/tags"),
            ok.as_object()
        ));
    }

    #[test]
    fn refusals() {
        let q = Query::default();
        for body in [
            serde_json::json!({"experiment_id": {"x": 1}}),
            serde_json::json!({"experiment_id": true}),
            serde_json::json!({"experiment_id": "01"}),
            serde_json::json!({"experiment_ids": [["1"]]}),
            serde_json::json!({"run_id": ""}),
        ] {
            let b = body.as_object().unwrap();
            let r = find(
                &[
                    Field(Experiment, "experiment_id"),
                    Field(Experiment, "experiment_ids"),
                    Field(Run, "run_id"),
                ],
                &inputs(&[], &q, Some(b), None),
            );
            assert!(r.is_err(), "{body}");
        }
        let many: Vec<String> = (0..=MAX_IDS).map(|i| format!("r{i}")).collect();
        let body = serde_json::json!({ "run_ids": many });
        assert!(
            find(
                &[Field(Run, "run_ids")],
                &inputs(&[], &q, Some(body.as_object().unwrap()), None)
            )
            .is_err()
        );
    }

    /// Random requests through the whole pure path (canonical forms, route lookup, targets,
    /// GraphQL): no panics; and its cost per request, which is most of what the gate adds.
    #[test]
    fn fuzz_and_cost_of_the_pure_path() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7a6e);
        let paths = [
            "/api/2.0/mlflow/runs/log-metric",
            "/ajax-api/3.0/mlflow/traces/search",
            "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/%41",
            "/api/3.0/mlflow/traces/tr-1/tags",
            "/graphql",
            "/api/2.0/mlflow/logged-models/m-1/tags/k",
        ];
        let bits = [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"experiment_id\"",
            "\"experimentIds\"",
            "\"runId\"",
            "\"locations\"",
            "\"mlflow_experiment\"",
            "\"query\"",
            "\"{ mlflowGetRun(input: {runId: \\\"r\\\"}) { run { info { runId } } } }\"",
            "\"1\"",
            "7",
            "null",
            "true",
            "\"*\"",
            "\"trace\"",
            "\"trace_info\"",
            "\"models\"",
        ];
        let started = std::time::Instant::now();
        let n = 5_000;
        for _ in 0..n {
            let path = paths[rng.random_range(0..paths.len())];
            let body: String = (0..rng.random_range(0..24))
                .map(|_| bits[rng.random_range(0..bits.len())])
                .collect();
            let canon = canonical::path(path).unwrap();
            let q = canonical::query(Some("run_id=a&experiment_ids=1&path=1/x")).unwrap();
            for method in ["GET", "POST", "PATCH", "PUT", "DELETE"] {
                let Some(route) = crate::gate::routes::lookup(method, &canon.segments, false) else {
                    continue;
                };
                let json = canonical::json_body(body.as_bytes()).ok().flatten();
                if let crate::gate::routes::Rule::Experiments(_, finds) = route.rule {
                    let _ = find(
                        finds,
                        &Inputs {
                            segments: &canon.segments,
                            query: &q,
                            body: json.as_ref(),
                            body_method: method != "GET",
                            experiment_header: Some("1"),
                        },
                    );
                }
                if let Some(m) = &json {
                    let _ = crate::gate::graphql::needs(m);
                    let _ = sets_reserved_trace_tag(&canon.segments, Some(m));
                }
            }
        }
        let per = started.elapsed() / n;
        eprintln!("pure authorization path: {per:?} per request (5 methods each, unoptimised build)");
        assert!(per < std::time::Duration::from_millis(5), "{per:?}");
    }
}
