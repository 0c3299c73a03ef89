//! The configuration's typed shape: the otel-collector layout, one struct per component type.
//! Every default lives in the `Default` impls below.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use super::values::{AuthStyle, Compression, Encoding, ListenAddr, OnFull, Verbosity, empty_is_none};

/// Default gRPC and HTTP receiver endpoints, as the collector's (but loopback for newcomers).
pub const DEFAULT_GRPC_ENDPOINT: &str = "127.0.0.1:4317";
pub const DEFAULT_HTTP_ENDPOINT: &str = "127.0.0.1:4318";
/// Default health_check and metrics listen addresses, as the collector's.
pub const DEFAULT_HEALTH_ENDPOINT: &str = "0.0.0.0:13133";
pub const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:8888";

// ---------------------------------------------------------------- receivers

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpReceiverConfig {
    pub protocols: OtlpProtocols,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpProtocols {
    pub grpc: Option<ProtocolConfig>,
    pub http: Option<ProtocolConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolConfig {
    /// None (missing or empty) means the protocol's default endpoint.
    #[serde(deserialize_with = "empty_is_none")]
    pub endpoint: Option<ListenAddr>,
    pub max_recv_msg_size_mib: u64,
    pub include_metadata: bool,
    pub tls: Option<ServerTlsConfig>,
    /// Accepted for collector compatibility (HTTP receiver); CORS is not served.
    pub cors: Option<serde_norway::Value>,
    /// Concurrent HTTP/2 streams (requests) per connection; default 100.
    pub max_concurrent_streams: Option<u32>,
    /// Ours: concurrent connections on this listener. Default: 1024, or less when the process's
    /// open-file limit is low (see `default_max_connections`).
    pub max_connections: Option<usize>,
    /// The time a client has to send a request's headers (HTTP/1), counted from the connection's
    /// start or the end of the previous response.
    pub read_header_timeout: GoDuration,
    /// The time a client has to send a request's body; a stalled body is answered 408.
    pub read_timeout: GoDuration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: GoDuration,
    /// The gRPC receiver's HTTP/2 keepalive (collector layout).
    pub keepalive: Option<KeepaliveConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    pub server_parameters: KeepaliveServerConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveServerConfig {
    /// HTTP/2 PING after this long without frames from the client.
    pub time: GoDuration,
    /// The wait for the PING's answer before the connection is closed.
    pub timeout: GoDuration,
    /// Overrides idle_timeout when set (non-zero).
    pub max_connection_idle: GoDuration,
}

impl Default for KeepaliveServerConfig {
    fn default() -> Self {
        KeepaliveServerConfig {
            time: GoDuration::secs(60),
            timeout: GoDuration::secs(20),
            max_connection_idle: GoDuration::default(),
        }
    }
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            endpoint: None,
            max_recv_msg_size_mib: 16,
            include_metadata: false,
            tls: None,
            cors: None,
            max_concurrent_streams: None,
            max_connections: None,
            read_header_timeout: GoDuration::secs(30),
            read_timeout: GoDuration::secs(30),
            idle_timeout: GoDuration::secs(60),
            keepalive: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    pub cert_file: String,
    pub key_file: String,
    /// Makes client certificates required and verified against this CA bundle.
    pub client_ca_file: String,
    /// The collector's name for client_ca_file on some versions.
    pub ca_file: String,
    pub min_version: String,
    /// Re-read cert, key and CA this often; 0 never.
    pub reload_interval: GoDuration,
    /// Ours: glob patterns matched against the client certificate's SAN URIs and DNS names.
    pub allowed_clients: Vec<String>,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        ServerTlsConfig {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            ca_file: String::new(),
            min_version: "1.2".into(),
            reload_interval: GoDuration::default(),
            allowed_clients: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------- processors

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub send_batch_size: usize,
    /// 0 means no upper bound.
    pub send_batch_max_size: usize,
    pub timeout: GoDuration,
    /// Accepted for collector compatibility; batches are always partitioned by destination.
    pub metadata_keys: Vec<String>,
    pub metadata_cardinality_limit: Option<u32>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            send_batch_size: 8192,
            send_batch_max_size: 0,
            timeout: GoDuration::millis(200),
            metadata_keys: Vec::new(),
            metadata_cardinality_limit: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryLimiterConfig {
    pub check_interval: GoDuration,
    pub limit_mib: u64,
    pub spike_limit_mib: u64,
    pub limit_percentage: u64,
    pub spike_limit_percentage: u64,
}

// ---------------------------------------------------------------- exporters

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpHttpExporterConfig {
    /// Base URL: traces go to `endpoint + /v1/traces` unless traces_endpoint is set.
    pub endpoint: String,
    pub traces_endpoint: String,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    pub timeout: GoDuration,
    pub encoding: Encoding,
    pub tls: ClientTlsConfig,
    pub retry_on_failure: RetryConfig,
    pub sending_queue: QueueConfig,
    pub auth: Option<AuthConfig>,
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
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    pub insecure: bool,
    pub insecure_skip_verify: bool,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    pub server_name_override: String,
    pub min_version: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub enabled: bool,
    pub initial_interval: GoDuration,
    pub max_interval: GoDuration,
    /// 0 means retry without a time limit.
    pub max_elapsed_time: GoDuration,
    pub multiplier: f64,
    pub randomization_factor: f64,
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
pub struct QueueConfig {
    pub enabled: bool,
    pub num_consumers: usize,
    /// Batches waiting to be sent.
    pub queue_size: usize,
    /// A file_storage extension id: queue on disk (the spool) instead of in memory.
    pub storage: Option<String>,
    pub blocking: Option<bool>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            num_consumers: 10,
            queue_size: 1000,
            storage: None,
            blocking: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub authenticator: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugExporterConfig {
    pub verbosity: Verbosity,
    pub sampling_initial: Option<u64>,
    pub sampling_thereafter: Option<u64>,
}

impl Default for DebugExporterConfig {
    fn default() -> Self {
        DebugExporterConfig {
            verbosity: Verbosity::default(),
            sampling_initial: None,
            sampling_thereafter: None,
        }
    }
}

// ---------------------------------------------------------------- extensions

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub endpoint: ListenAddr,
    /// Accepted for collector compatibility; `/`, `/healthz` and `/readyz` are always served.
    pub path: Option<String>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            endpoint: ListenAddr::constant(DEFAULT_HEALTH_ENDPOINT),
            path: None,
        }
    }
}

#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuth2ClientConfig {
    pub client_id: String,
    pub client_id_file: String,
    pub client_secret: String,
    pub client_secret_file: String,
    pub token_url: String,
    /// Ours: an OIDC discovery document whose token_endpoint is used when token_url is empty.
    pub discovery_url: String,
    pub scopes: Vec<String>,
    pub endpoint_params: BTreeMap<String, String>,
    pub timeout: GoDuration,
    pub expiry_buffer: GoDuration,
    pub auth_style: AuthStyle,
    pub tls: ClientTlsConfig,
}

/// Written by hand so the client secret can never reach a log through `{:?}`.
impl std::fmt::Debug for OAuth2ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2ClientConfig")
            .field("client_id", &self.client_id)
            .field("client_id_file", &self.client_id_file)
            .field(
                "client_secret",
                &if self.client_secret.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("token_url", &self.token_url)
            .field("discovery_url", &self.discovery_url)
            .field("scopes", &self.scopes)
            .field("endpoint_params", &self.endpoint_params.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("expiry_buffer", &self.expiry_buffer)
            .field("auth_style", &self.auth_style)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for OAuth2ClientConfig {
    fn default() -> Self {
        OAuth2ClientConfig {
            client_id: String::new(),
            client_id_file: String::new(),
            client_secret: String::new(),
            client_secret_file: String::new(),
            token_url: String::new(),
            discovery_url: String::new(),
            scopes: Vec::new(),
            endpoint_params: BTreeMap::new(),
            timeout: GoDuration::secs(10),
            expiry_buffer: GoDuration::secs(300),
            auth_style: AuthStyle::default(),
            tls: ClientTlsConfig::default(),
        }
    }
}

/// The file_storage extension: where and how exporters spool to disk. Each exporter that names it
/// in `sending_queue.storage` gets its own subdirectory.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileStorageConfig {
    pub directory: String,
    /// Create `directory` when missing (the collector's create_directory).
    pub create_directory: bool,
    /// fsync each group commit before acknowledging; off trades crash safety for throughput.
    pub fsync: bool,
    /// Disk budget per exporter spool; beyond it, requests are refused (or the oldest dropped).
    pub max_size_mib: u64,
    /// Size at which a segment file is closed and a new one started.
    pub segment_size_mib: u64,
    pub on_full: OnFull,
    /// Where batches the destination refuses for good are kept; default `directory/dead_letter`.
    pub dead_letter_directory: String,
    /// Accepted for collector compatibility: segments are deleted whole, nothing to compact.
    pub compaction: Option<serde_norway::Value>,
    /// Accepted for collector compatibility.
    pub timeout: Option<GoDuration>,
}

impl Default for FileStorageConfig {
    fn default() -> Self {
        FileStorageConfig {
            directory: String::new(),
            create_directory: true,
            fsync: true,
            max_size_mib: 1024,
            segment_size_mib: 8,
            on_full: OnFull::default(),
            dead_letter_directory: String::new(),
            compaction: None,
            timeout: None,
        }
    }
}

// ---------------------------------------------------------------- service

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_addresses_parse() {
        for text in [
            DEFAULT_GRPC_ENDPOINT,
            DEFAULT_HTTP_ENDPOINT,
            DEFAULT_HEALTH_ENDPOINT,
            DEFAULT_METRICS_ADDRESS,
        ] {
            assert_eq!(ListenAddr::constant(text).as_str(), text);
        }
    }

    #[test]
    fn debug_output_hides_the_client_secret() {
        let c = OAuth2ClientConfig {
            client_secret: "s3cr3t".into(),
            ..Default::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("s3cr3t") && text.contains("<redacted>"), "{text}");
    }
}
