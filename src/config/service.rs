//! The `service` section (enabled extensions, pipelines, the relay's own telemetry) and the
//! checks that tie components together: references, one batch setting per exporter, ports.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use super::values::ListenAddr;
use super::{Config, Processor, Receiver, component_type};

/// Default metrics listen address, as the collector's.
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:8888";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    pub extensions: Vec<String>,
    pub pipelines: BTreeMap<String, PipelineConfig>,
    pub telemetry: TelemetryConfig,
    /// Ours: how long SIGTERM may take to drain queued batches before the rest is counted dropped.
    pub shutdown_timeout: GoDuration,
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
pub struct PipelineConfig {
    pub receivers: Vec<String>,
    pub processors: Vec<String>,
    pub exporters: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub metrics: MetricsConfig,
    pub logs: LogsConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub address: ListenAddr,
    /// Accepted for collector compatibility (none | basic | normal | detailed).
    pub level: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            address: ListenAddr::constant(DEFAULT_METRICS_ADDRESS),
            level: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// debug | info | warn | error; OTLP_RELAY_LOG overrides it.
    pub level: Option<String>,
    /// Accepted for collector compatibility; use --log-format.
    pub encoding: Option<String>,
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
    if s.pipelines.is_empty() {
        err("service.pipelines".into(), "define a traces pipeline".into());
    }
    let mut exporter_batch: BTreeMap<&str, (&str, Option<&str>)> = BTreeMap::new();
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
        for (i, id) in p.processors.iter().enumerate() {
            match config.processors.get(id) {
                None => err(
                    format!("{path}.processors[{i}]"),
                    format!("{id:?} is not defined under processors"),
                ),
                Some(Processor::Batch(_)) => {
                    if batch.is_some() {
                        err(
                            format!("{path}.processors[{i}]"),
                            "only one batch processor per pipeline".into(),
                        );
                    }
                    batch = Some(id.as_str());
                }
                Some(Processor::MemoryLimiter(_)) => {
                    if i != 0 {
                        err(
                            format!("{path}.processors[{i}]"),
                            "memory_limiter must be the first processor".into(),
                        );
                    }
                }
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
