//! Configuration: the otel-collector layout read from YAML, env-substituted, typed and validated
//! before anything binds a port. Every problem is reported with its YAML path.
mod auth_ext;
mod duration;
mod env;
pub(crate) mod error;
mod exporter;
mod extension;
mod known;
mod load;
mod memory;
mod otlp_grpc;
mod processor;
mod receiver;
mod service;
pub(crate) mod typed;
mod validate;
mod values;
mod warnings;

pub(crate) use auth_ext::{BasicAuthConfig, BearerTokenAuthConfig, header_safe};
pub(crate) use duration::{GoDuration, parse_duration};
pub use error::{ConfigError, ConfigErrors};
pub(crate) use exporter::*;
pub(crate) use extension::*;
pub use load::{load_file, parse_str};
pub(crate) use otlp_grpc::{GrpcCompression, GrpcTarget, OtlpGrpcExporterConfig};
pub(crate) use processor::*;
pub(crate) use receiver::*;
pub(crate) use service::*;
pub(crate) use validate::parse_listen as parse_listen_addr;
pub(crate) use values::{AuthStyle, Compression, Encoding, ListenAddr, OnFull, TlsVersion, Verbosity};
pub(crate) use warnings::warnings;

use std::collections::BTreeMap;

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
    /// `otlp` / `otlp_grpc`: OTLP/gRPC.
    OtlpGrpc(Box<OtlpGrpcExporterConfig>),
    Debug(DebugExporterConfig),
}

impl Exporter {
    /// Its sending queue (the debug exporter has none).
    pub(crate) fn sending_queue(&self) -> Option<&QueueConfig> {
        match self {
            Exporter::OtlpHttp(c) => Some(&c.sending_queue),
            Exporter::OtlpGrpc(c) => Some(&c.sending_queue),
            Exporter::Debug(_) => None,
        }
    }

    /// How it retries (the debug exporter never fails transiently).
    pub(crate) fn retry_on_failure(&self) -> Option<&RetryConfig> {
        match self {
            Exporter::OtlpHttp(c) => Some(&c.retry_on_failure),
            Exporter::OtlpGrpc(c) => Some(&c.retry_on_failure),
            Exporter::Debug(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Extension {
    HealthCheck(HealthCheckConfig),
    OAuth2Client(Box<OAuth2ClientConfig>),
    FileStorage(FileStorageConfig),
    BearerTokenAuth(BearerTokenAuthConfig),
    BasicAuth(BasicAuthConfig),
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

/// Every problem `text` has, as `path: message` lines (none when it loads); for tests.
#[cfg(test)]
pub(crate) fn errors_of(text: &str) -> Vec<String> {
    match parse_str(text, &|_| None) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
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
        let id = self.exporters.get(exporter)?.sending_queue()?.storage.as_deref()?;
        match self.extensions.get(id) {
            Some(Extension::FileStorage(f)) => Some((id, f)),
            _ => None,
        }
    }
}
