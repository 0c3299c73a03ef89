//! The `service` section (enabled extensions, pipelines, the relay's own telemetry) and the
//! checks that tie components together: references, one batch setting per exporter, ports.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use super::values::ListenAddr;
use super::{Config, GroupByTraceConfig, Processor, Receiver, component_type};

/// Default metrics listen address, as the collector's.
pub(crate) const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:8888";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ServiceConfig {
    pub(crate) extensions: Vec<String>,
    pub(crate) pipelines: BTreeMap<String, PipelineConfig>,
    pub(crate) telemetry: TelemetryConfig,
    /// Ours: how long SIGTERM may take to drain queued batches before the rest is counted dropped.
    pub(crate) shutdown_timeout: GoDuration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            extensions: Vec::new(),
            pipelines: BTreeMap::new(),
            telemetry: TelemetryConfig::default(),
            shutdown_timeout: GoDuration::secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PipelineConfig {
    pub(crate) receivers: Vec<String>,
    pub(crate) processors: Vec<String>,
    pub(crate) exporters: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TelemetryConfig {
    pub(crate) metrics: MetricsConfig,
    pub(crate) logs: LogsConfig,
    /// Resource attributes of the relay itself: constant labels on every metric (dots become
    /// underscores: `service.name` → `service_name`). A null value removes a default label.
    pub(crate) resource: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MetricsConfig {
    /// The listen address before readers existed (the collector's `address`); a pull reader
    /// overrides it.
    pub(crate) address: ListenAddr,
    /// none: no metrics listener. basic, normal, detailed: every metric is served.
    pub(crate) level: Option<String>,
    /// The collector's metric readers: a pull Prometheus reader sets where metrics are served.
    pub(crate) readers: Vec<MetricReader>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: ListenAddr::constant(DEFAULT_METRICS_ADDRESS),
            level: None,
            readers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MetricReader {
    pub(crate) pull: Option<PullReader>,
    /// Accepted for collector compatibility: the relay's metrics are only served for scraping.
    pub(crate) periodic: Option<serde_norway::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PullReader {
    pub(crate) exporter: PullExporter,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PullExporter {
    pub(crate) prometheus: Option<PrometheusReader>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PrometheusReader {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Accepted for collector compatibility; names always carry their type suffix.
    pub(crate) without_type_suffix: Option<bool>,
    /// Accepted for collector compatibility.
    pub(crate) without_units: Option<bool>,
    /// Accepted for collector compatibility.
    pub(crate) without_scope_info: Option<bool>,
    /// Accepted for collector compatibility; `telemetry.resource` always becomes labels.
    pub(crate) with_resource_constant_labels: Option<serde_norway::Value>,
}

impl Default for PrometheusReader {
    fn default() -> Self {
        PrometheusReader {
            host: "0.0.0.0".into(),
            port: 8888,
            without_type_suffix: None,
            without_units: None,
            without_scope_info: None,
            with_resource_constant_labels: None,
        }
    }
}

impl PrometheusReader {
    fn listen(&self) -> Result<ListenAddr, String> {
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{host}:{}", self.port).parse()
    }
}

impl MetricsConfig {
    /// Where the metrics listener binds; None with `level: none`.
    pub(crate) fn listen(&self) -> Option<ListenAddr> {
        if self.level.as_deref().is_some_and(|l| l.eq_ignore_ascii_case("none")) {
            return None;
        }
        let pull = self
            .readers
            .iter()
            .find_map(|r| r.pull.as_ref()?.exporter.prometheus.as_ref());
        // A reader that does not parse is a config error (validate), so never reached by run.
        Some(pull.and_then(|p| p.listen().ok()).unwrap_or(self.address))
    }
}

impl TelemetryConfig {
    /// Constant labels for every metric: the collector's defaults (service.name, version,
    /// instance id) overridden or removed by `resource`, names made Prometheus-safe.
    pub(crate) fn resource_labels(&self, instance_id: &str) -> Vec<(String, String)> {
        let mut attrs: BTreeMap<String, String> = BTreeMap::from([
            ("service.name".to_string(), "otlp-relay".to_string()),
            ("service.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("service.instance.id".to_string(), instance_id.to_string()),
        ]);
        for (k, v) in &self.resource {
            match v {
                Some(v) => attrs.insert(k.clone(), v.clone()),
                None => attrs.remove(k),
            };
        }
        attrs.into_iter().map(|(k, v)| (label_name(&k), v)).collect()
    }
}

/// A Prometheus label name for an attribute key: every character outside [A-Za-z0-9_] becomes
/// `_`, and a leading digit gets a `_` prefix (the collector's Prometheus translation).
fn label_name(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LogsConfig {
    /// debug | info | warn | error; OTLP_RELAY_LOG overrides it.
    pub(crate) level: Option<String>,
    /// Accepted for collector compatibility; use --log-format.
    pub(crate) encoding: Option<String>,
}

/// Checks the service section and the references between components; problems go to `err`
/// with their YAML path.
pub(super) fn validate(config: &Config, err: &mut dyn FnMut(String, String)) {
    let s = &config.service;
    for (i, id) in s.extensions.iter().enumerate() {
        if !config.extensions.contains_key(id) {
            err(
                format!("service.extensions[{i}]"),
                format!("{id:?} is not defined under extensions"),
            );
        }
    }
    if let Some(level) = &s.telemetry.logs.level
        && !matches!(level.to_ascii_lowercase().as_str(), "debug" | "info" | "warn" | "error")
    {
        err(
            "service.telemetry.logs.level".into(),
            format!("unknown level {level:?} (debug, info, warn, error)"),
        );
    }
    validate_telemetry(&s.telemetry, err);
    if s.pipelines.is_empty() {
        err("service.pipelines".into(), "define a traces pipeline".into());
    }
    let mut exporter_batch: BTreeMap<&str, (&str, Option<&str>)> = BTreeMap::new();
    let mut exporter_group: BTreeMap<&str, (&str, Option<&GroupByTraceConfig>)> = BTreeMap::new();
    for (name, p) in &s.pipelines {
        let path = format!("service.pipelines.{name}");
        if component_type(name) != "traces" {
            err(
                path.clone(),
                format!(
                    "{:?} pipelines are not supported: this relay carries traces",
                    component_type(name)
                ),
            );
            continue;
        }
        if p.receivers.is_empty() {
            err(format!("{path}.receivers"), "list at least one receiver".into());
        }
        if p.exporters.is_empty() {
            err(format!("{path}.exporters"), "list at least one exporter".into());
        }
        for (i, r) in p.receivers.iter().enumerate() {
            if !config.receivers.contains_key(r) {
                err(
                    format!("{path}.receivers[{i}]"),
                    format!("{r:?} is not defined under receivers"),
                );
            }
        }
        let mut batch = None;
        let mut group = None;
        for (i, id) in p.processors.iter().enumerate() {
            match config.processors.get(id) {
                None => err(
                    format!("{path}.processors[{i}]"),
                    format!("{id:?} is not defined under processors"),
                ),
                Some(Processor::GroupByTrace(g)) => {
                    group.get_or_insert(g);
                    if batch.is_some() {
                        err(
                            format!("{path}.processors[{i}]"),
                            "groupbytrace must come before the batch processor".into(),
                        );
                    }
                }
                Some(Processor::Batch(_)) => {
                    if batch.is_some() {
                        err(
                            format!("{path}.processors[{i}]"),
                            "only one batch processor per pipeline".into(),
                        );
                    }
                    batch = Some(id.as_str());
                }
                // Anywhere in the list: the collector only advises first (a warning, see warnings.rs).
                Some(Processor::MemoryLimiter(_)) => {}
                Some(Processor::Registered(_)) => {}
            }
        }
        for (i, e) in p.exporters.iter().enumerate() {
            if !config.exporters.contains_key(e) {
                err(
                    format!("{path}.exporters[{i}]"),
                    format!("{e:?} is not defined under exporters"),
                );
                continue;
            }
            // Batching happens in front of each exporter, so an exporter shared by pipelines
            // needs one batch setting.
            if let Some((other, other_batch)) = exporter_batch.insert(e, (name, batch))
                && other_batch != batch
            {
                err(
                    format!("{path}.exporters[{i}]"),
                    format!("{e:?} is also used by pipeline {other:?} with a different batch processor"),
                );
            }
            // groupbytrace holds traces in front of each exporter too: one setting per exporter.
            if let Some((other, other_group)) = exporter_group.insert(e, (name, group))
                && other_group != group
            {
                err(
                    format!("{path}.exporters[{i}]"),
                    format!(
                        "{e:?} is also used by pipeline {other:?} with different groupbytrace settings (or none); \
                         use one exporter per pipeline"
                    ),
                );
            }
        }
    }
    validate_ports(config, err);
    validate_processed_copies(config, err);
}

/// A receiver hands each of its exporters one copy of a request, so an exporter that two
/// pipelines of one receiver share must see the same span-editing processors in both.
fn validate_processed_copies(config: &Config, err: &mut dyn FnMut(String, String)) {
    let editing = |p: &PipelineConfig| -> Vec<String> {
        p.processors
            .iter()
            .filter(|id| matches!(config.processors.get(*id), Some(Processor::Registered(_))))
            .cloned()
            .collect()
    };
    let pipelines: Vec<(&String, &PipelineConfig)> = config.service.pipelines.iter().collect();
    for (n, (name, p)) in pipelines.iter().enumerate() {
        for (other, q) in &pipelines[..n] {
            if !p.receivers.iter().any(|r| q.receivers.contains(r)) || editing(p) == editing(q) {
                continue;
            }
            for (i, e) in p.exporters.iter().enumerate() {
                if q.exporters.contains(e) {
                    err(
                        format!("service.pipelines.{name}.exporters[{i}]"),
                        format!(
                            "{e:?} is also used by pipeline {other:?}, which shares a receiver with this one but \
                             has other span-editing processors; use one exporter per pipeline"
                        ),
                    );
                }
            }
        }
    }
}

fn validate_telemetry(t: &TelemetryConfig, err: &mut dyn FnMut(String, String)) {
    let path = "service.telemetry.metrics";
    if let Some(level) = &t.metrics.level
        && !matches!(
            level.to_ascii_lowercase().as_str(),
            "none" | "basic" | "normal" | "detailed"
        )
    {
        err(
            format!("{path}.level"),
            format!("unknown level {level:?} (none, basic, normal, detailed)"),
        );
    }
    let mut pulls = 0;
    for (i, r) in t.metrics.readers.iter().enumerate() {
        let at = format!("{path}.readers[{i}]");
        match (&r.pull, &r.periodic) {
            (Some(_), Some(_)) => err(at.clone(), "set pull or periodic, not both".into()),
            (None, None) => err(at.clone(), "set pull (a prometheus exporter)".into()),
            _ => {}
        }
        let Some(pull) = &r.pull else { continue };
        let Some(p) = &pull.exporter.prometheus else {
            err(
                format!("{at}.pull.exporter"),
                "only a prometheus pull exporter is supported".into(),
            );
            continue;
        };
        pulls += 1;
        if pulls > 1 {
            err(
                at.clone(),
                "only one pull reader: the relay serves one metrics listener".into(),
            );
        }
        if let Err(e) = p.listen() {
            err(format!("{at}.pull.exporter.prometheus.host"), e);
        }
    }
    if t.resource.keys().any(String::is_empty) {
        err("service.telemetry.resource".into(), "empty attribute name".into());
    }
}

/// Two used receivers' protocols must not listen on the same fixed port.
fn validate_ports(config: &Config, err: &mut dyn FnMut(String, String)) {
    let s = &config.service;
    let used: Vec<&String> = s.pipelines.values().flat_map(|p| p.receivers.iter()).collect();
    let mut seen_addrs: BTreeMap<String, String> = BTreeMap::new();
    for (id, r) in &config.receivers {
        let Receiver::Otlp(otlp) = r;
        if !used.contains(&id) {
            continue;
        }
        for (name, proto, default) in [
            ("grpc", &otlp.protocols.grpc, super::DEFAULT_GRPC_ENDPOINT),
            ("http", &otlp.protocols.http, super::DEFAULT_HTTP_ENDPOINT),
        ] {
            let Some(p) = proto else { continue };
            let addr = p.endpoint.unwrap_or_else(|| super::ListenAddr::constant(default)).0;
            let path = format!("receivers.{id}.protocols.{name}.endpoint");
            if addr.port() != 0
                && let Some(other) = seen_addrs.insert(addr.to_string(), path.clone())
            {
                err(path, format!("{addr} is already used by {other}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::errors_of;

    /// Two pipelines sharing exporter `otlphttp`, with the given processor lists.
    fn shared(first: &str, second: &str) -> Vec<String> {
        errors_of(&format!(
            "
receivers: {{otlp: {{protocols: {{http: {{}}}}}}, otlp/2: {{protocols: {{grpc: {{}}}}}}}}
processors:
  groupbytrace: {{}}
  groupbytrace/same: {{}}
  groupbytrace/slow: {{wait_duration: 30s, max_hold: 60s}}
exporters: {{otlphttp: {{endpoint: 'http://x'}}}}
service:
  pipelines:
    traces: {{receivers: [otlp], processors: [{first}], exporters: [otlphttp]}}
    traces/2: {{receivers: [otlp/2], processors: [{second}], exporters: [otlphttp]}}
"
        ))
    }

    const DIFFERENT: &str = "service.pipelines.traces/2.exporters[0]: \"otlphttp\" is also used by pipeline \
                             \"traces\" with different groupbytrace settings (or none); use one exporter per pipeline";

    #[test]
    fn an_exporter_shared_by_pipelines_needs_one_groupbytrace_setting() {
        assert_eq!(shared("groupbytrace", "groupbytrace/slow"), vec![DIFFERENT]);
        assert_eq!(shared("groupbytrace", ""), vec![DIFFERENT]);
        assert_eq!(shared("", "groupbytrace"), vec![DIFFERENT]);
        // The same settings under another id hold traces the same way.
        assert!(shared("groupbytrace", "groupbytrace/same").is_empty());
        assert!(shared("groupbytrace/slow", "groupbytrace/slow").is_empty());
        assert!(shared("", "").is_empty());
    }
}
