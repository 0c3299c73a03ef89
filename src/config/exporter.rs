//! Exporter configs (`otlphttp` with its TLS, retry and sending queue; `debug`) and their checks.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use super::values::{Compression, Encoding, TlsVersion, Verbosity};
use super::{Config, Exporter, Extension};
use crate::otlp::{EXPERIMENT_HEADER, ExperimentId};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OtlpHttpExporterConfig {
    /// Base URL: traces go to `endpoint + /v1/traces` unless traces_endpoint is set.
    pub(crate) endpoint: String,
    pub(crate) traces_endpoint: String,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) compression: Compression,
    pub(crate) timeout: GoDuration,
    pub(crate) encoding: Encoding,
    pub(crate) tls: ClientTlsConfig,
    pub(crate) retry_on_failure: RetryConfig,
    pub(crate) sending_queue: QueueConfig,
    pub(crate) auth: Option<AuthConfig>,
    /// A new connection per request (the collector's confighttp key). For MLflow: a kept-alive
    /// connection stays with the server worker process that accepted it, so a relay's few
    /// connections can load one of `mlflow server --workers N` while the others idle.
    pub(crate) disable_keep_alives: bool,
    /// How long an idle connection is kept for the next request (the collector's default, 90s).
    pub(crate) idle_conn_timeout: GoDuration,
    /// Ours: how MLflow routes and isolates (experiment by name, poison traces).
    pub(crate) mlflow: MlflowOptions,
}

impl Default for OtlpHttpExporterConfig {
    fn default() -> Self {
        OtlpHttpExporterConfig {
            endpoint: String::new(),
            traces_endpoint: String::new(),
            headers: BTreeMap::new(),
            compression: Compression::default(),
            timeout: GoDuration::secs(30),
            encoding: Encoding::default(),
            tls: ClientTlsConfig::default(),
            retry_on_failure: RetryConfig::default(),
            sending_queue: QueueConfig::default(),
            auth: None,
            disable_keep_alives: false,
            idle_conn_timeout: GoDuration::secs(90),
            mlflow: MlflowOptions::default(),
        }
    }
}

/// The exporter's MLflow-specific behaviour (ours; the collector has no such block).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MlflowOptions {
    /// A resource attribute whose value names the experiment of spans whose resource has neither
    /// `mlflow.experiment_id` nor `mlflow.experiment_name` and whose request named none (e.g.
    /// `service.name`: one experiment per agent). Empty: none.
    pub(crate) experiment_name_attribute: String,
    /// Create an experiment named by spans when MLflow has none of that name; without it such
    /// spans fail (counted, dead-lettered with a spool).
    pub(crate) create_experiments: bool,
    /// Experiment names whose ids are remembered (per workspace).
    pub(crate) experiment_cache_size: usize,
    /// MLflow's REST API base URL for experiment lookups; default: `endpoint`, or
    /// `traces_endpoint` without its `/v1/traces`.
    pub(crate) api_endpoint: String,
    /// When MLflow refuses a request of several traces for good (4xx), resend it halved by trace
    /// until only the traces it refuses are left, so one bad trace does not fail the others.
    pub(crate) isolate_poison_traces: bool,
}

impl Default for MlflowOptions {
    fn default() -> Self {
        MlflowOptions {
            experiment_name_attribute: String::new(),
            create_experiments: false,
            experiment_cache_size: 1024,
            api_endpoint: String::new(),
            isolate_poison_traces: true,
        }
    }
}

/// The most experiment names remembered: each entry is a name and an id.
pub(crate) const MAX_EXPERIMENT_CACHE_SIZE: usize = 1_000_000;

impl MlflowOptions {
    /// Problems with their path below `path` (the exporter's `mlflow` block).
    pub(crate) fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        if !(1..=MAX_EXPERIMENT_CACHE_SIZE).contains(&self.experiment_cache_size) {
            err(
                format!("{path}.experiment_cache_size"),
                format!("must be between 1 and {MAX_EXPERIMENT_CACHE_SIZE}"),
            );
        }
        let attribute = &self.experiment_name_attribute;
        if attribute.trim() != attribute.as_str() {
            err(
                format!("{path}.experiment_name_attribute"),
                "must not start or end with whitespace".into(),
            );
        }
        if !self.api_endpoint.is_empty() && !is_http_url(&self.api_endpoint) {
            err(
                format!("{path}.api_endpoint"),
                format!("{:?} is not an http:// or https:// URL", self.api_endpoint),
            );
        }
    }
}

fn is_http_url(url: &str) -> bool {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.scheme_str().map(str::to_owned))
        .is_some_and(|s| s == "http" || s == "https")
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClientTlsConfig {
    pub(crate) insecure: bool,
    pub(crate) insecure_skip_verify: bool,
    pub(crate) ca_file: String,
    pub(crate) cert_file: String,
    pub(crate) key_file: String,
    pub(crate) server_name_override: String,
    pub(crate) min_version: TlsVersion,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RetryConfig {
    pub(crate) enabled: bool,
    pub(crate) initial_interval: GoDuration,
    pub(crate) max_interval: GoDuration,
    /// 0 means retry without a time limit.
    pub(crate) max_elapsed_time: GoDuration,
    pub(crate) multiplier: f64,
    pub(crate) randomization_factor: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            enabled: true,
            initial_interval: GoDuration::secs(5),
            max_interval: GoDuration::secs(30),
            max_elapsed_time: GoDuration::secs(300),
            multiplier: 1.5,
            randomization_factor: 0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct QueueConfig {
    pub(crate) enabled: bool,
    pub(crate) num_consumers: usize,
    /// Batches waiting to be sent.
    pub(crate) queue_size: usize,
    /// A file_storage extension id: queue on disk (the spool) instead of in memory.
    pub(crate) storage: Option<String>,
    pub(crate) blocking: Option<bool>,
    /// Ours: a sender sends the batches waiting for the same destination as one request, up
    /// to the batch's maximum size (only batches already queued: nothing waits longer).
    pub(crate) merge_waiting_batches: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            num_consumers: 10,
            queue_size: 1000,
            storage: None,
            blocking: None,
            merge_waiting_batches: true,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AuthConfig {
    pub(crate) authenticator: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct DebugExporterConfig {
    /// Default basic (see `Verbosity`).
    pub(crate) verbosity: Verbosity,
    pub(crate) sampling_initial: Option<u64>,
    pub(crate) sampling_thereafter: Option<u64>,
}

/// Checks exporter `id` and what it refers to in `config`; problems go to `err` with their
/// YAML path.
pub(super) fn validate(id: &str, e: &Exporter, config: &Config, err: &mut dyn FnMut(String, String)) {
    let path = format!("exporters.{id}");
    match e {
        Exporter::OtlpHttp(x) => {
            validate_destination(&path, x, err);
            let delivery = Delivery {
                retry_on_failure: &x.retry_on_failure,
                sending_queue: &x.sending_queue,
                auth: &x.auth,
            };
            validate_delivery(&path, delivery, config, err);
            x.mlflow.validate(&format!("{path}.mlflow"), err);
            let t = &x.tls;
            if t.cert_file.is_empty() != t.key_file.is_empty() {
                err(format!("{path}.tls"), "cert_file and key_file go together".into());
            }
        }
        Exporter::OtlpGrpc(x) => x.validate(&path, config, err),
        // Its words (verbosity) are typed; nothing else to check.
        Exporter::Debug(_) => {}
    }
}

/// Where and how an otlphttp exporter sends: URLs, headers, timeout.
fn validate_destination(path: &str, x: &OtlpHttpExporterConfig, err: &mut dyn FnMut(String, String)) {
    if x.endpoint.is_empty() && x.traces_endpoint.is_empty() {
        err(format!("{path}.endpoint"), "set endpoint or traces_endpoint".into());
    }
    for (key, url) in [("endpoint", &x.endpoint), ("traces_endpoint", &x.traces_endpoint)] {
        if !url.is_empty() && !is_http_url(url) {
            err(
                format!("{path}.{key}"),
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
    }
    for (k, v) in &x.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            err(format!("{path}.headers.{k}"), "not a valid HTTP header name".into());
        }
        if http::HeaderValue::from_str(v).is_err() {
            err(format!("{path}.headers.{k}"), "not a valid HTTP header value".into());
        }
        if k.eq_ignore_ascii_case("content-encoding") {
            err(
                format!("{path}.headers.{k}"),
                "set compression instead of a Content-Encoding header".into(),
            );
        }
    }
    if let Some(exp) = x
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(EXPERIMENT_HEADER))
        .map(|(_, v)| v)
        && !ExperimentId::is_valid(exp)
    {
        err(
            format!("{path}.headers.{EXPERIMENT_HEADER}"),
            format!("{exp:?} is not a numeric MLflow experiment id"),
        );
    }
    if x.timeout.is_zero() {
        err(format!("{path}.timeout"), "must be above 0".into());
    }
}

/// What [`validate_delivery`] checks of an exporter (otlphttp, otlp).
pub(super) struct Delivery<'a> {
    pub(super) retry_on_failure: &'a RetryConfig,
    pub(super) sending_queue: &'a QueueConfig,
    pub(super) auth: &'a Option<AuthConfig>,
}

/// How an exporter retries and queues, and the extensions it names for its spool and its token.
pub(super) fn validate_delivery(path: &str, x: Delivery<'_>, config: &Config, err: &mut dyn FnMut(String, String)) {
    let r = &x.retry_on_failure;
    if r.enabled {
        if r.initial_interval.is_zero() {
            err(
                format!("{path}.retry_on_failure.initial_interval"),
                "must be above 0".into(),
            );
        }
        if r.max_interval < r.initial_interval {
            err(
                format!("{path}.retry_on_failure.max_interval"),
                "must be at least initial_interval".into(),
            );
        }
        if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
            err(
                format!("{path}.retry_on_failure.multiplier"),
                "must be at least 1".into(),
            );
        }
        if !(0.0..=1.0).contains(&r.randomization_factor) {
            err(
                format!("{path}.retry_on_failure.randomization_factor"),
                "must be between 0 and 1".into(),
            );
        }
    }
    let q = &x.sending_queue;
    if q.num_consumers == 0 {
        err(
            format!("{path}.sending_queue.num_consumers"),
            "must be at least 1".into(),
        );
    }
    if q.queue_size == 0 {
        err(format!("{path}.sending_queue.queue_size"), "must be at least 1".into());
    }
    if let Some(storage) = &q.storage {
        match config.extensions.get(storage) {
            Some(Extension::FileStorage(_)) => {
                if !config.service.extensions.contains(storage) {
                    err(
                        format!("{path}.sending_queue.storage"),
                        format!("{storage:?} must also be listed in service.extensions"),
                    );
                }
                if !q.enabled {
                    err(
                        format!("{path}.sending_queue.enabled"),
                        "a storage needs the sending queue enabled".into(),
                    );
                }
            }
            Some(_) => err(
                format!("{path}.sending_queue.storage"),
                format!("{storage:?} is not a file_storage extension"),
            ),
            None => err(
                format!("{path}.sending_queue.storage"),
                format!("{storage:?} is not defined under extensions"),
            ),
        }
    }
    if let Some(auth) = &x.auth {
        let a = &auth.authenticator;
        match config.extensions.get(a) {
            Some(Extension::BasicAuth(b)) if b.client_auth.is_none() => err(
                format!("{path}.auth.authenticator"),
                format!("{a:?} has no client_auth for exporters to send"),
            ),
            Some(Extension::OAuth2Client(_) | Extension::BearerTokenAuth(_) | Extension::BasicAuth(_)) => {
                if !config.service.extensions.contains(a) {
                    err(
                        format!("{path}.auth.authenticator"),
                        format!("{a:?} must also be listed in service.extensions"),
                    );
                }
            }
            Some(_) => err(
                format!("{path}.auth.authenticator"),
                format!("{a:?} is not an authenticator (oauth2client, bearertokenauth or basicauth)"),
            ),
            None => err(
                format!("{path}.auth.authenticator"),
                format!("{a:?} is not defined under extensions"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Exporter, parse_str};

    use super::super::errors_of;

    const PIPELINE: &str = "service: {pipelines: {traces: {receivers: [otlp], exporters: [otlphttp]}}}\n\
                            receivers: {otlp: {protocols: {http: {}}}}\n";

    #[test]
    fn mlflow_options_load_and_are_checked() {
        let good = format!(
            "exporters: {{otlphttp: {{endpoint: 'http://m', mlflow: {{experiment_name_attribute: service.name, \
             create_experiments: true, experiment_cache_size: 10, isolate_poison_traces: false}}}}}}\n{PIPELINE}"
        );
        let config = parse_str(&good, &|_| None).unwrap();
        let Some(Exporter::OtlpHttp(e)) = config.exporters.get("otlphttp") else {
            panic!("no otlphttp exporter")
        };
        assert_eq!(e.mlflow.experiment_name_attribute, "service.name");
        assert!(e.mlflow.create_experiments && !e.mlflow.isolate_poison_traces);
        assert_eq!(e.mlflow.experiment_cache_size, 10);

        let bad = format!(
            "exporters: {{otlphttp: {{endpoint: 'http://m', mlflow: {{experiment_name_attribute: ' x', \
             experiment_cache_size: 0, api_endpoint: 'ftp://x'}}}}}}\n{PIPELINE}"
        );
        let errs = errors_of(&bad);
        for expected in [
            "exporters.otlphttp.mlflow.experiment_cache_size:",
            "exporters.otlphttp.mlflow.experiment_name_attribute:",
            "exporters.otlphttp.mlflow.api_endpoint:",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "missing {expected:?} in {errs:#?}"
            );
        }
        let unknown = format!("exporters: {{otlphttp: {{endpoint: 'http://m', mlflow: {{bogus: 1}}}}}}\n{PIPELINE}");
        assert!(
            errors_of(&unknown)
                .iter()
                .any(|e| e.contains("exporters.otlphttp.mlflow.bogus")),
            "{:#?}",
            errors_of(&unknown)
        );
    }

    #[test]
    fn the_api_base_follows_the_endpoint() {
        use crate::config::OtlpHttpExporterConfig;
        use crate::export::otlphttp::api_url;
        let mut c = OtlpHttpExporterConfig {
            endpoint: "http://m:5000".into(),
            ..Default::default()
        };
        assert_eq!(api_url(&c), "http://m:5000");
        c.endpoint.clear();
        c.traces_endpoint = "https://gate/mlflow/v1/traces".into();
        assert_eq!(api_url(&c), "https://gate/mlflow");
        c.mlflow.api_endpoint = "https://api".into();
        assert_eq!(api_url(&c), "https://api");
    }
}
