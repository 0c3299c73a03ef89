//! Configuration: the otel-collector layout read from YAML, env-substituted, typed and validated
//! before anything binds a port. Every problem is reported with its YAML path.
mod duration;
mod env;
mod exporter;
mod extension;
mod known;
mod load;
mod memory;
mod processor;
mod receiver;
mod service;
mod validate;
mod values;
mod warnings;

pub(crate) use duration::{GoDuration, parse_duration};
pub(crate) use exporter::*;
pub(crate) use extension::*;
pub(crate) use load::typed;
pub use load::{load_file, parse_str};
pub(crate) use processor::*;
pub(crate) use receiver::*;
pub(crate) use service::*;
pub(crate) use validate::parse_listen as parse_listen_addr;
pub(crate) use values::{AuthStyle, Compression, Encoding, ListenAddr, OnFull, TlsVersion, Verbosity};
pub(crate) use warnings::warnings;

use std::collections::BTreeMap;
use std::fmt;

/// One problem in a configuration, located by its YAML path (e.g. `exporters.otlphttp/mlflow.timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(crate) path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Receiver {
    Otlp(OtlpReceiverConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Processor {
    Batch(BatchConfig),
    MemoryLimiter(MemoryLimiterConfig),
    GroupByTrace(GroupByTraceConfig),
    /// A processor of `crate::processor::REGISTRY` (transform, filter, ...).
    Registered(crate::processor::Registered),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Exporter {
    OtlpHttp(Box<OtlpHttpExporterConfig>),
    Debug(DebugExporterConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Extension {
    HealthCheck(HealthCheckConfig),
    OAuth2Client(Box<OAuth2ClientConfig>),
    FileStorage(FileStorageConfig),
}

/// A loaded configuration. Component maps are keyed by component id (`type` or `type/name`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub(crate) receivers: BTreeMap<String, Receiver>,
    pub(crate) processors: BTreeMap<String, Processor>,
    pub(crate) exporters: BTreeMap<String, Exporter>,
    pub(crate) extensions: BTreeMap<String, Extension>,
    pub(crate) service: ServiceConfig,
}

/// The type part of a component id: `otlphttp/mlflow` → `otlphttp`.
pub(crate) fn component_type(id: &str) -> &str {
    id.split_once('/').map_or(id, |(t, _)| t)
}

impl Config {
    /// The health_check extension, when it is enabled in `service.extensions`.
    pub(crate) fn health_check(&self) -> Option<&HealthCheckConfig> {
        self.service
            .extensions
            .iter()
            .find_map(|id| match self.extensions.get(id) {
                Some(Extension::HealthCheck(h)) => Some(h),
                _ => None,
            })
    }

    /// The file_storage extension an exporter spools to, if any.
    pub(crate) fn exporter_storage(&self, exporter: &str) -> Option<(&str, &FileStorageConfig)> {
        let Some(Exporter::OtlpHttp(e)) = self.exporters.get(exporter) else {
            return None;
        };
        let id = e.sending_queue.storage.as_deref()?;
        match self.extensions.get(id) {
            Some(Extension::FileStorage(f)) => Some((id, f)),
            _ => None,
        }
    }
}
