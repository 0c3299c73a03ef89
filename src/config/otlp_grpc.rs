//! The `otlp` exporter's config (OTLP/gRPC; also named `otlp_grpc`, the collector's canonical
//! name since v0.144): the collector's gRPC client keys, the same queue, retry and auth as
//! otlphttp, and its checks and warnings with their YAML paths.
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::duration::GoDuration;
use super::exporter::{AuthConfig, ClientTlsConfig, Delivery, QueueConfig, RetryConfig, validate_delivery};
use super::{Config, ConfigError};
use crate::otlp::EXPERIMENT_HEADER;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OtlpGrpcExporterConfig {
    /// `host:port`, optionally with `http://`, `https://` (TLS whatever `tls.insecure` says) or
    /// `dns:///`.
    pub(crate) endpoint: String,
    pub(crate) compression: GrpcCompression,
    pub(crate) tls: ClientTlsConfig,
    /// gRPC metadata sent with every call.
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) timeout: GoDuration,
    pub(crate) retry_on_failure: RetryConfig,
    pub(crate) sending_queue: QueueConfig,
    pub(crate) auth: Option<AuthConfig>,
    pub(crate) keepalive: Option<KeepaliveConfig>,
    /// The `:authority` sent instead of the endpoint's.
    pub(crate) authority: String,
    /// Accepted for collector compatibility (one endpoint, one connection: nothing to balance).
    pub(crate) balancer_name: String,
    pub(crate) wait_for_ready: Option<bool>,
    pub(crate) read_buffer_size: Option<u64>,
    pub(crate) write_buffer_size: Option<u64>,
}

impl Default for OtlpGrpcExporterConfig {
    fn default() -> Self {
        OtlpGrpcExporterConfig {
            endpoint: String::new(),
            compression: GrpcCompression::default(),
            tls: ClientTlsConfig::default(),
            headers: BTreeMap::new(),
            // The collector's exporterhelper default.
            timeout: GoDuration::secs(5),
            retry_on_failure: RetryConfig::default(),
            sending_queue: QueueConfig::default(),
            auth: None,
            keepalive: None,
            authority: String::new(),
            balancer_name: String::new(),
            wait_for_ready: None,
            read_buffer_size: None,
            write_buffer_size: None,
        }
    }
}

/// HTTP/2 keepalive pings (the collector's `keepalive` block).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct KeepaliveConfig {
    pub(crate) time: GoDuration,
    pub(crate) timeout: GoDuration,
    pub(crate) permit_without_stream: bool,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            time: GoDuration::secs(10),
            timeout: GoDuration::secs(10),
            permit_without_stream: false,
        }
    }
}

/// The message compression of gRPC calls (`compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum GrpcCompression {
    #[default]
    Gzip,
    Zstd,
    None,
}

impl GrpcCompression {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GrpcCompression::Gzip => "gzip",
            GrpcCompression::Zstd => "zstd",
            GrpcCompression::None => "none",
        }
    }
}

impl std::str::FromStr for GrpcCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gzip" => Ok(GrpcCompression::Gzip),
            "zstd" => Ok(GrpcCompression::Zstd),
            "none" | "" => Ok(GrpcCompression::None),
            other => Err(format!("unsupported gRPC compression {other:?} (gzip, zstd, none)")),
        }
    }
}

impl<'de> Deserialize<'de> for GrpcCompression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for GrpcCompression {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where an `otlp` exporter connects: the `host:port` and whether the scheme asked for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrpcTarget {
    pub(crate) authority: http::uri::Authority,
    /// `https://` was written (TLS whatever `tls.insecure` says).
    pub(crate) https: bool,
    /// `http://` was written (which, as in the collector, does not turn TLS off).
    pub(crate) http: bool,
}

impl GrpcTarget {
    pub(crate) fn parse(endpoint: &str) -> Result<GrpcTarget, String> {
        let lower = endpoint.to_ascii_lowercase();
        let (rest, https, http) = if lower.starts_with("https://") {
            (&endpoint[8..], true, false)
        } else if lower.starts_with("http://") {
            (&endpoint[7..], false, true)
        } else if lower.starts_with("dns:///") {
            (&endpoint[7..], false, false)
        } else if lower.contains("://") || lower.starts_with("unix:") {
            return Err(format!(
                "{endpoint:?}: use host:port, http://host:port or https://host:port"
            ));
        } else {
            (endpoint, false, false)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!("{endpoint:?}: a gRPC endpoint has no path (use host:port)"));
        }
        let authority: http::uri::Authority = rest.parse().map_err(|_| format!("{endpoint:?} is not host:port"))?;
        if authority.port_u16().is_none() {
            return Err(format!("{endpoint:?} has no port (OTLP/gRPC usually listens on 4317)"));
        }
        if authority.as_str().contains('@') {
            return Err(format!(
                "{endpoint:?}: credentials in the endpoint are not supported; use auth or headers"
            ));
        }
        Ok(GrpcTarget { authority, https, http })
    }
}

impl OtlpGrpcExporterConfig {
    /// Whether calls use TLS: always with `https://`, else unless `tls.insecure` (the collector's rule).
    pub(crate) fn uses_tls(&self, target: &GrpcTarget) -> bool {
        target.https || !self.tls.insecure
    }

    /// Problems with their YAML path below `path` (the exporter).
    pub(crate) fn validate(&self, path: &str, config: &Config, err: &mut dyn FnMut(String, String)) {
        if self.endpoint.is_empty() {
            err(format!("{path}.endpoint"), "required (host:port)".into());
        } else if let Err(e) = GrpcTarget::parse(&self.endpoint) {
            err(format!("{path}.endpoint"), e);
        }
        for (k, v) in &self.headers {
            if let Some(problem) = metadata_problem(k, v) {
                err(format!("{path}.headers.{k}"), problem.into());
            }
        }
        if self.timeout.is_zero() {
            err(format!("{path}.timeout"), "must be above 0".into());
        }
        if !self.authority.is_empty() && self.authority.parse::<http::uri::Authority>().is_err() {
            err(
                format!("{path}.authority"),
                format!("{:?} is not host[:port]", self.authority),
            );
        }
        if let Some(k) = &self.keepalive
            && (k.time.is_zero() || k.timeout.is_zero())
        {
            err(format!("{path}.keepalive"), "time and timeout must be above 0".into());
        }
        let t = &self.tls;
        if t.cert_file.is_empty() != t.key_file.is_empty() {
            err(format!("{path}.tls"), "cert_file and key_file go together".into());
        }
        if !t.server_name_override.is_empty()
            && rustls_pki_types::ServerName::try_from(t.server_name_override.as_str()).is_err()
        {
            err(
                format!("{path}.tls.server_name_override"),
                format!("{:?} is not a DNS name or IP address", t.server_name_override),
            );
        }
        let delivery = Delivery {
            retry_on_failure: &self.retry_on_failure,
            sending_queue: &self.sending_queue,
            auth: &self.auth,
        };
        validate_delivery(path, delivery, config, err);
    }

    /// What this config says that is accepted but not acted on, or probably not meant.
    pub(crate) fn warnings(&self, path: &str, warn: &mut dyn FnMut(String, &str)) {
        const IGNORED: &str = "accepted for collector compatibility but not acted on";
        if self.headers.keys().any(|k| k.eq_ignore_ascii_case(EXPERIMENT_HEADER)) {
            warn(
                format!("{path}.headers.{EXPERIMENT_HEADER}"),
                "MLflow accepts only OTLP/HTTP: send to MLflow with the otlphttp exporter (this one speaks gRPC)",
            );
        }
        if let Ok(target) = GrpcTarget::parse(&self.endpoint) {
            if target.http && !self.tls.insecure {
                warn(
                    format!("{path}.endpoint"),
                    "http:// does not turn TLS off for a gRPC exporter (as in the collector): set tls.insecure: true for plaintext",
                );
            }
            let tls_files = !self.tls.ca_file.is_empty() || !self.tls.cert_file.is_empty();
            if !self.uses_tls(&target) && tls_files {
                warn(
                    format!("{path}.tls.insecure"),
                    "plaintext: ca_file, cert_file and key_file are not used",
                );
            }
        }
        if !self.balancer_name.is_empty() {
            warn(
                format!("{path}.balancer_name"),
                &format!("{IGNORED}: one endpoint, one connection"),
            );
        }
        for (key, set) in [
            ("wait_for_ready", self.wait_for_ready.is_some()),
            ("read_buffer_size", self.read_buffer_size.is_some()),
            ("write_buffer_size", self.write_buffer_size.is_some()),
            ("sending_queue.blocking", self.sending_queue.blocking.is_some()),
        ] {
            if set {
                warn(format!("{path}.{key}"), IGNORED);
            }
        }
    }
}

/// Why `name: value` cannot be sent as gRPC metadata, if it cannot.
fn metadata_problem(name: &str, value: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Some("not a valid gRPC metadata key");
    }
    if lower.ends_with("-bin") {
        return Some("binary metadata (-bin) is not supported");
    }
    if lower.starts_with("grpc-") || matches!(lower.as_str(), "content-type" | "te" | "user-agent") {
        return Some("reserved by gRPC (set compression or timeout instead)");
    }
    if http::HeaderValue::from_str(value).is_err() {
        return Some("not a valid gRPC metadata value");
    }
    None
}

/// For `check` and the start log: warnings of every `otlp` exporter.
pub(super) fn warnings(config: &Config, out: &mut Vec<ConfigError>) {
    for (id, e) in &config.exporters {
        if let super::Exporter::OtlpGrpc(c) = e {
            c.warnings(&format!("exporters.{id}"), &mut |path, message| {
                out.push(ConfigError::new(path, message))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{errors_of, parse_str, warnings};
    use super::*;

    const PIPELINE: &str = "receivers: {otlp: {protocols: {grpc: {}}}}\n\
                            service: {pipelines: {traces: {receivers: [otlp], exporters: [otlp_grpc/t]}}}\n";

    #[test]
    fn endpoints() {
        let t = GrpcTarget::parse("tempo:4317").unwrap();
        assert_eq!(t.authority.as_str(), "tempo:4317");
        assert!(!t.https && !t.http);
        assert!(GrpcTarget::parse("https://tempo:4317").unwrap().https);
        assert!(GrpcTarget::parse("http://tempo:4317/").unwrap().http);
        assert_eq!(
            GrpcTarget::parse("dns:///tempo:4317").unwrap().authority.as_str(),
            "tempo:4317"
        );
        assert!(GrpcTarget::parse("[::1]:4317").is_ok());
        for bad in [
            "tempo",
            "http://tempo",
            "tempo:4317/v1/traces",
            "unix:///s",
            "ftp://x:1",
            "u:p@x:1",
            "",
        ] {
            assert!(GrpcTarget::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn loads_with_the_collector_keys_and_reports_every_problem() {
        let good = format!(
            "exporters: {{otlp_grpc/t: {{endpoint: 'tempo:4317', compression: zstd, timeout: 2s, \
             tls: {{insecure: true}}, headers: {{x-scope-orgid: acme}}, keepalive: {{time: 30s}}, \
             sending_queue: {{num_consumers: 3}}, retry_on_failure: {{max_elapsed_time: 0s}}}}}}\n{PIPELINE}"
        );
        let config = parse_str(&good, &|_| None).unwrap();
        let Some(super::super::Exporter::OtlpGrpc(c)) = config.exporters.get("otlp_grpc/t") else {
            panic!("not an otlp exporter")
        };
        assert_eq!(c.compression, GrpcCompression::Zstd);
        assert_eq!(c.sending_queue.num_consumers, 3);
        assert!(!c.uses_tls(&GrpcTarget::parse(&c.endpoint).unwrap()));

        let bad = format!(
            "exporters: {{otlp_grpc/t: {{endpoint: 'tempo', compression: snappy, timeout: 0s, \
             headers: {{grpc-timeout: 1, x-b-bin: x}}, tls: {{cert_file: c}}, bogus: 1, \
             sending_queue: {{num_consumers: 0}}, auth: {{authenticator: oauth2client/none}}}}}}\n{PIPELINE}"
        );
        let errs = errors_of(&bad);
        for expected in [
            "exporters.otlp_grpc/t.compression: unsupported gRPC compression \"snappy\"",
            "exporters.otlp_grpc/t.bogus: unknown field",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "{expected:?} in {errs:#?}"
            );
        }
        // Without the fields serde refused, the rest is checked in the same pass.
        let bad = bad.replace("compression: snappy, ", "").replace("bogus: 1, ", "");
        let errs = errors_of(&bad);
        for expected in [
            "exporters.otlp_grpc/t.endpoint: \"tempo\" has no port",
            "exporters.otlp_grpc/t.timeout: must be above 0",
            "exporters.otlp_grpc/t.headers.grpc-timeout: reserved",
            "exporters.otlp_grpc/t.headers.x-b-bin: binary metadata",
            "exporters.otlp_grpc/t.tls: cert_file and key_file go together",
            "exporters.otlp_grpc/t.sending_queue.num_consumers: must be at least 1",
            "exporters.otlp_grpc/t.auth.authenticator: \"oauth2client/none\" is not defined",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "{expected:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), 7, "{errs:#?}");
    }

    #[test]
    fn mlflow_headers_and_plaintext_surprises_are_warned() {
        let text = format!(
            "exporters: {{otlp_grpc/t: {{endpoint: 'http://mlflow:4317', headers: {{x-mlflow-experiment-id: '1'}}, \
             balancer_name: round_robin}}}}\n{PIPELINE}"
        );
        let config = parse_str(&text, &|_| None).unwrap();
        let found: Vec<String> = warnings(&config).iter().map(|w| w.to_string()).collect();
        for expected in [
            "exporters.otlp_grpc/t.headers.x-mlflow-experiment-id: MLflow accepts only OTLP/HTTP",
            "exporters.otlp_grpc/t.endpoint: http:// does not turn TLS off",
            "exporters.otlp_grpc/t.balancer_name: accepted",
        ] {
            assert!(
                found.iter().any(|w| w.starts_with(expected)),
                "{expected:?} in {found:#?}"
            );
        }
        let plain =
            format!("exporters: {{otlp_grpc/t: {{endpoint: 'tempo:4317', tls: {{insecure: true}}}}}}\n{PIPELINE}");
        assert!(warnings(&parse_str(&plain, &|_| None).unwrap()).is_empty());
    }
}
