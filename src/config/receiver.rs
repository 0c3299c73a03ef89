//! The `otlp` receiver's config (gRPC and HTTP protocols, their TLS and connection bounds) and
//! its checks. Every default is in the `Default` impls here.
use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use super::values::{ListenAddr, TlsVersion, empty_is_none};

/// Default gRPC and HTTP receiver endpoints, as the collector's (but loopback for newcomers).
pub(crate) const DEFAULT_GRPC_ENDPOINT: &str = "127.0.0.1:4317";
pub(crate) const DEFAULT_HTTP_ENDPOINT: &str = "127.0.0.1:4318";

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OtlpReceiverConfig {
    pub(crate) protocols: OtlpProtocols,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OtlpProtocols {
    pub(crate) grpc: Option<ProtocolConfig>,
    pub(crate) http: Option<ProtocolConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ProtocolConfig {
    /// None (missing or empty) means the protocol's default endpoint.
    #[serde(deserialize_with = "empty_is_none")]
    pub(crate) endpoint: Option<ListenAddr>,
    pub(crate) max_recv_msg_size_mib: u64,
    pub(crate) include_metadata: bool,
    pub(crate) tls: Option<ServerTlsConfig>,
    /// Cross-origin requests from browsers (HTTP receiver), as the collector's confighttp.
    pub(crate) cors: Option<CorsConfig>,
    /// Concurrent HTTP/2 streams (requests) per connection; default 100.
    pub(crate) max_concurrent_streams: Option<u32>,
    /// Ours: concurrent connections on this listener. Default: 1024, or less when the process's
    /// open-file limit is low (see `default_max_connections`).
    pub(crate) max_connections: Option<usize>,
    /// The time a client has to send a request's headers (HTTP/1), counted from the connection's
    /// start or the end of the previous response.
    pub(crate) read_header_timeout: GoDuration,
    /// The time a client has to send a request's body; a stalled body is answered 408.
    pub(crate) read_timeout: GoDuration,
    /// A connection with no request in flight for this long is closed.
    pub(crate) idle_timeout: GoDuration,
    /// The gRPC receiver's HTTP/2 keepalive (collector layout).
    pub(crate) keepalive: Option<KeepaliveConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct CorsConfig {
    /// Origins allowed to send spans from a browser; `*` matches any run of characters
    /// (`https://*.example.com`), `*` alone any origin. Empty: CORS is off.
    pub(crate) allowed_origins: Vec<String>,
    /// Request headers allowed besides Accept, Content-Type, Content-Encoding, X-Requested-With
    /// and Origin; `*` allows any.
    pub(crate) allowed_headers: Vec<String>,
    /// Seconds a browser may cache a preflight answer; 0 leaves it to the browser.
    pub(crate) max_age: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct KeepaliveConfig {
    pub(crate) server_parameters: KeepaliveServerConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct KeepaliveServerConfig {
    /// HTTP/2 PING after this long without frames from the client.
    pub(crate) time: GoDuration,
    /// The wait for the PING's answer before the connection is closed.
    pub(crate) timeout: GoDuration,
    /// Overrides idle_timeout when set (non-zero).
    pub(crate) max_connection_idle: GoDuration,
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
pub(crate) struct ServerTlsConfig {
    pub(crate) cert_file: String,
    pub(crate) key_file: String,
    /// Makes client certificates required and verified against this CA bundle.
    pub(crate) client_ca_file: String,
    /// The collector's name for client_ca_file on some versions.
    pub(crate) ca_file: String,
    pub(crate) min_version: TlsVersion,
    /// Re-read cert, key and CA this often; 0 never.
    pub(crate) reload_interval: GoDuration,
    /// Ours: glob patterns matched against the client certificate's SAN URIs and DNS names.
    pub(crate) allowed_clients: Vec<String>,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        ServerTlsConfig {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            ca_file: String::new(),
            min_version: TlsVersion::V1_2,
            reload_interval: GoDuration::default(),
            allowed_clients: Vec::new(),
        }
    }
}

/// Checks receiver `id`; problems go to `err` with their YAML path.
pub(super) fn validate(id: &str, otlp: &OtlpReceiverConfig, err: &mut dyn FnMut(String, String)) {
    let base = format!("receivers.{id}.protocols");
    if otlp.protocols.grpc.is_none() && otlp.protocols.http.is_none() {
        err(base.clone(), "enable at least one of grpc, http".into());
    }
    for (name, proto) in [("grpc", &otlp.protocols.grpc), ("http", &otlp.protocols.http)] {
        let Some(p) = proto else { continue };
        let path = format!("{base}.{name}");
        if p.max_recv_msg_size_mib == 0 || p.max_recv_msg_size_mib > 1024 {
            err(
                format!("{path}.max_recv_msg_size_mib"),
                "must be between 1 and 1024".into(),
            );
        }
        if let Some(tls) = &p.tls {
            validate_server_tls(tls, &format!("{path}.tls"), err);
        }
        // Zero would mean "no bound": these close what a slow or hostile peer holds open.
        let keepalive = p.keepalive.as_ref().map(|k| &k.server_parameters);
        for (key, d) in [
            ("read_header_timeout", Some(&p.read_header_timeout)),
            ("read_timeout", Some(&p.read_timeout)),
            ("idle_timeout", Some(&p.idle_timeout)),
            ("keepalive.server_parameters.time", keepalive.map(|k| &k.time)),
            ("keepalive.server_parameters.timeout", keepalive.map(|k| &k.timeout)),
        ] {
            if d.is_some_and(|d| d.0.is_zero()) {
                err(format!("{path}.{key}"), "must be more than 0".into());
            }
        }
        if name == "grpc" && p.cors.is_some() {
            err(
                format!("{path}.cors"),
                "cors applies to the http protocol (browsers do not speak gRPC)".into(),
            );
        }
        if let Some(cors) = &p.cors {
            for (i, o) in cors.allowed_origins.iter().enumerate() {
                if o.is_empty() {
                    err(format!("{path}.cors.allowed_origins[{i}]"), "empty origin".into());
                }
            }
        }
        if p.max_connections == Some(0) {
            err(format!("{path}.max_connections"), "must be at least 1".into());
        }
        if p.max_concurrent_streams == Some(0) {
            err(format!("{path}.max_concurrent_streams"), "must be at least 1".into());
        }
    }
}

fn validate_server_tls(tls: &ServerTlsConfig, path: &str, err: &mut dyn FnMut(String, String)) {
    if tls.cert_file.is_empty() || tls.key_file.is_empty() {
        err(path.to_string(), "cert_file and key_file are both required".into());
    }
    if !tls.client_ca_file.is_empty() && !tls.ca_file.is_empty() && tls.client_ca_file != tls.ca_file {
        err(
            format!("{path}.ca_file"),
            "set client_ca_file or ca_file, not both".into(),
        );
    }
    if !tls.allowed_clients.is_empty() && tls.client_ca_file.is_empty() && tls.ca_file.is_empty() {
        err(
            format!("{path}.allowed_clients"),
            "needs client_ca_file: without client certificates there is nothing to match".into(),
        );
    }
    for (i, p) in tls.allowed_clients.iter().enumerate() {
        if p.is_empty() {
            err(format!("{path}.allowed_clients[{i}]"), "empty pattern".into());
        }
    }
}
