//! Processors between the receivers and the batcher, one file per component: its typed config
//! (serde, unknown keys refused), its checks with their YAML paths, and its constructor.
//! [`REGISTRY`] is the one list the config loader and the pipeline read, so adding a processor
//! is one new file and one line there:
//!
//! ```text
//! Registration::of::<my_proc::MyProcConfig>("my_proc"),
//! ```
//!
//! where `MyProcConfig: serde::Deserialize + ProcessorConfig`. `batch`, `memory_limiter` and
//! `groupbytrace` are stage processors, not span editors: they shape what flows through each
//! exporter's stage (groupbytrace holds whole traces there, run by `grouping` after the spool)
//! and stay typed variants of `config::Processor`.
//! Processors that edit or drop spans ([`SpanProcessor`]) run in [`apply`]: a request is decoded
//! once per pipeline, every such processor applied in order, and encoded once.
pub(crate) mod actions;
pub(crate) mod apply;
pub(crate) mod attributes;
pub(crate) mod filter;
pub(crate) mod groupbytrace;
pub(crate) mod grouping;
pub(crate) mod ottl;
pub(crate) mod probabilistic_sampler;
pub(crate) mod redaction;
pub(crate) mod resource;
pub(crate) mod tracestate;
pub(crate) mod transform;
pub(crate) mod wire;

use std::fmt;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use serde::de::DeserializeOwned;

use crate::config::error::ConfigError;

/// Every processor type built on this model. One line per processor.
pub(crate) const REGISTRY: &[Registration] = &[
    Registration::of::<transform::TransformConfig>("transform"),
    Registration::of::<filter::FilterConfig>("filter"),
    Registration::of::<resource::ResourceConfig>("resource"),
    Registration::of::<attributes::AttributesConfig>("attributes"),
    Registration::of::<redaction::RedactionConfig>("redaction"),
    Registration::of::<probabilistic_sampler::ProbabilisticSamplerConfig>("probabilistic_sampler"),
];

/// A processor type: its name in configs and how its settings are read.
pub(crate) struct Registration {
    pub(crate) type_name: &'static str,
    /// Reads the settings at `path`; problems (with their YAML paths) go to `errors`.
    pub(crate) load: LoadFn,
}

/// Reads a processor's settings at a YAML path, reporting problems to the list.
pub(crate) type LoadFn = fn(serde_norway::Value, &str, &mut Vec<ConfigError>) -> Option<Arc<dyn ProcessorConfig>>;

impl Registration {
    pub(crate) const fn of<T: ProcessorConfig + DeserializeOwned + 'static>(type_name: &'static str) -> Registration {
        Registration {
            type_name,
            load: load_as::<T>,
        }
    }
}

fn load_as<T: ProcessorConfig + DeserializeOwned + 'static>(
    value: serde_norway::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<dyn ProcessorConfig>> {
    crate::config::typed::typed::<T>(value, path, errors).map(|t| Arc::new(t) as Arc<dyn ProcessorConfig>)
}

/// The registration of processor type `type_name`, if this build has it.
pub(crate) fn registration(type_name: &str) -> Option<&'static Registration> {
    REGISTRY.iter().find(|r| r.type_name == type_name)
}

/// A processor's settings, read and typed.
pub(crate) trait ProcessorConfig: fmt::Debug + Send + Sync {
    /// Problems with the settings, each at its YAML path under `path` (`processors.ID`).
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String));
    /// The running processor of component `id`; `None` for one that does not edit spans.
    fn span_processor(&self, id: &str) -> Option<Box<dyn SpanProcessor>>;
}

/// A processor that edits (or drops) spans, one ResourceSpans at a time.
pub(crate) trait SpanProcessor: Send + Sync {
    /// Edits `rs` in place; spans it removes are counted by the caller as this processor's drops.
    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError>;

    /// As [`SpanProcessor::process`], for a request with this context; processors that read
    /// the request (`from_context`) override it.
    fn process_in(&self, rs: &mut ResourceSpans, _request: &RequestContext) -> Result<(), ProcessError> {
        self.process(rs)
    }

    /// Whether [`SpanProcessor::process_wire`] runs this processor: a chain whose processors
    /// all do edits records as protobuf bytes (`wire`) instead of decoding them.
    fn on_wire(&self) -> bool {
        false
    }

    /// As [`SpanProcessor::process_in`], on a record edited as bytes; only called when
    /// [`SpanProcessor::on_wire`] says so.
    fn process_wire(&self, _record: &mut wire::Record<'_>, _request: &RequestContext) -> Result<(), ProcessError> {
        Err(ProcessError {
            processor: String::new(),
            message: "this processor does not run on protobuf bytes".into(),
        })
    }
}

/// What a request carried besides its spans, for processors that read it (`from_context`):
/// its headers when the receiver has `include_metadata: true`, as the collector's client
/// metadata; empty otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestContext {
    /// Header names in lowercase, in the order they came (a repeated header repeats).
    metadata: Vec<(String, String)>,
}

impl RequestContext {
    /// A context of these headers (names are matched case-insensitively).
    pub(crate) fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> RequestContext {
        RequestContext {
            metadata: headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect(),
        }
    }

    /// The values of header `name` (lowercase), in order.
    pub(crate) fn metadata(&self, name: &str) -> Vec<&str> {
        self.metadata
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A statement that failed on the data with `error_mode: propagate`: the request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("processor {processor}: {message}")]
pub(crate) struct ProcessError {
    pub(crate) processor: String,
    pub(crate) message: String,
}

/// The collector's `error_mode`: what a statement or condition that fails on the data does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ErrorMode {
    /// Log the error and go on with the next statement.
    Ignore,
    /// Go on without logging.
    Silent,
    /// Refuse the request (the collector's default).
    #[default]
    Propagate,
}

impl ErrorMode {
    /// Handles an error of processor `id`: `Err` to refuse the request, `Ok` to go on.
    pub(crate) fn handle(self, id: &str, error: impl fmt::Display) -> Result<(), ProcessError> {
        match self {
            ErrorMode::Propagate => Err(ProcessError {
                processor: id.to_string(),
                message: error.to_string(),
            }),
            ErrorMode::Ignore => {
                log_statement_error(id, &error);
                Ok(())
            }
            ErrorMode::Silent => Ok(()),
        }
    }
}

/// At most one warning per processor and 10 s: a statement failing on every span must not
/// flood the log.
fn log_statement_error(id: &str, error: &dyn fmt::Display) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    static LAST: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);
    let now = Instant::now();
    let mut last = match LAST.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let map = last.get_or_insert_with(HashMap::new);
    if map
        .get(id)
        .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(10))
    {
        return;
    }
    map.insert(id.to_string(), now);
    tracing::warn!(processor = id, error = %error, "a statement failed on a span and was skipped (error_mode: ignore)");
}

/// A processor's settings in the config tree: the registered type's name and its typed settings.
#[derive(Clone)]
pub(crate) struct Registered {
    pub(crate) type_name: &'static str,
    pub(crate) config: Arc<dyn ProcessorConfig>,
}

impl fmt::Debug for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl PartialEq for Registered {
    fn eq(&self, other: &Self) -> bool {
        // Settings are plain data, so their Debug forms are equal exactly when they are.
        self.type_name == other.type_name && format!("{:?}", self.config) == format!("{:?}", other.config)
    }
}

/// Sets attribute `key` of `attrs` to `value`: in place where the key is, else appended.
pub(crate) fn upsert_attribute(attrs: &mut Vec<KeyValue>, key: &str, value: AnyValue) {
    match attrs.iter_mut().find(|kv| kv.key == key) {
        Some(kv) => kv.value = Some(value),
        None => attrs.push(KeyValue {
            key: key.to_string(),
            value: Some(value),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Processor, parse_str};

    use crate::config::errors_of;

    #[test]
    fn registered_processors_load_and_unknown_ones_are_named() {
        let text = r#"
receivers: {otlp: {protocols: {http: {}}}}
processors:
  transform/a: {trace_statements: ['set(attributes["k"], "v")']}
  filter: {traces: {span: ['name == "x"']}}
  resource: {attributes: [{key: a, action: delete}]}
  attributes: {actions: [{key: a, action: delete}]}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], processors: [transform/a, filter, resource, attributes], exporters: [debug]}}}
"#;
        let config = parse_str(text, &|_| None).unwrap();
        for id in ["transform/a", "filter", "resource", "attributes"] {
            assert!(matches!(config.processors[id], Processor::Registered(_)), "{id}");
        }
        let errs = errors_of(&text.replace("filter:", "filter: {bogus: 1}\n  x_filter:"));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("processors.filter.bogus: unknown field")),
            "{errs:#?}"
        );
        let errs = errors_of(&text.replace("filter:", "frobnicate: {}\n  filter:"));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("processors.frobnicate: unknown processor type")
                    && e.contains("transform, filter, resource, attributes")),
            "{errs:#?}"
        );
        // A collector processor we know of but do not build is named as such, with advice.
        let errs = errors_of(&text.replace("filter:", "tail_sampling: {}\n  filter:"));
        assert!(
            errs.iter().any(|e| e.starts_with("processors.tail_sampling:")
                && e.contains("not supported by this relay")
                && e.contains("groupbytrace, memory_limiter, transform")),
            "{errs:#?}"
        );
    }

    /// One receiver, two pipelines sharing an exporter: the exporter gets one copy of each
    /// request, so the pipelines must agree on what edits it.
    #[test]
    fn a_shared_exporter_needs_the_same_editing_processors() {
        let text = |second: &str, receivers: &str| {
            format!(
                r#"
receivers: {{otlp: {{protocols: {{http: {{}}}}}}, otlp/b: {{protocols: {{grpc: {{}}}}}}}}
processors: {{filter: {{traces: {{span: ['name == "x"']}}}}}}
exporters: {{debug: {{}}, debug/2: {{}}}}
service:
  pipelines:
    traces/a: {{receivers: [otlp], processors: [filter], exporters: [debug]}}
    traces/b: {{receivers: [{receivers}], processors: [{second}], exporters: [debug/2, debug]}}
"#
            )
        };
        let errs = errors_of(&text("", "otlp"));
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(
                "service.pipelines.traces/b.exporters[1]: \"debug\" is also used by pipeline \"traces/a\""
            ),
            "{errs:#?}"
        );
        assert_eq!(errors_of(&text("filter", "otlp")), Vec::<String>::new());
        assert_eq!(
            errors_of(&text("", "otlp/b")),
            Vec::<String>::new(),
            "no shared receiver"
        );
    }
}
