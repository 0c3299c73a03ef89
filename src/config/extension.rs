//! Extension configs (`health_check`, `oauth2client`, `file_storage`) and their checks; the
//! client auth extensions `bearertokenauth` and `basicauth` are in `auth_ext`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Extension;
use super::duration::GoDuration;
use super::exporter::ClientTlsConfig;
use super::values::{AuthStyle, ListenAddr, OnFull};

/// Default health_check listen address, as the collector's.
pub(crate) const DEFAULT_HEALTH_ENDPOINT: &str = "0.0.0.0:13133";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HealthCheckConfig {
    pub(crate) endpoint: ListenAddr,
    /// Where the collector's status is served (JSON, 503 while starting or draining); default
    /// `/`. `/healthz`, `/livez` and `/readyz` are served besides.
    pub(crate) path: String,
    /// Bodies that replace the JSON status, as the collector's.
    pub(crate) response_body: Option<HealthResponseBody>,
    /// Accepted for collector compatibility (deprecated there): pipelines are not probed.
    pub(crate) check_collector_pipeline: Option<serde_norway::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HealthResponseBody {
    pub(crate) healthy: String,
    pub(crate) unhealthy: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            endpoint: ListenAddr::constant(DEFAULT_HEALTH_ENDPOINT),
            path: "/".into(),
            response_body: None,
            check_collector_pipeline: None,
        }
    }
}

#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OAuth2ClientConfig {
    pub(crate) client_id: String,
    pub(crate) client_id_file: String,
    pub(crate) client_secret: String,
    pub(crate) client_secret_file: String,
    pub(crate) token_url: String,
    /// Ours: an OIDC discovery document whose token_endpoint is used when token_url is empty.
    pub(crate) discovery_url: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) endpoint_params: BTreeMap<String, String>,
    pub(crate) timeout: GoDuration,
    pub(crate) expiry_buffer: GoDuration,
    pub(crate) auth_style: AuthStyle,
    pub(crate) tls: ClientTlsConfig,
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
pub(crate) struct FileStorageConfig {
    pub(crate) directory: String,
    /// Create `directory` when missing (the collector's create_directory).
    pub(crate) create_directory: bool,
    /// fsync each group commit before acknowledging; off trades crash safety for throughput.
    pub(crate) fsync: bool,
    /// Disk budget per exporter spool; beyond it, requests are refused (or the oldest dropped).
    pub(crate) max_size_mib: u64,
    /// Size at which a segment file is closed and a new one started.
    pub(crate) segment_size_mib: u64,
    pub(crate) on_full: OnFull,
    /// Where batches the destination refuses for good are kept; default `directory/dead_letter`.
    pub(crate) dead_letter_directory: String,
    /// Accepted for collector compatibility: segments are deleted whole, nothing to compact.
    pub(crate) compaction: Option<serde_norway::Value>,
    /// Accepted for collector compatibility.
    pub(crate) timeout: Option<GoDuration>,
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

/// Checks extension `id`; problems go to `err` with their YAML path.
pub(super) fn validate(id: &str, x: &Extension, err: &mut dyn FnMut(String, String)) {
    let path = format!("extensions.{id}");
    match x {
        Extension::BearerTokenAuth(b) => super::auth_ext::validate_bearer(&path, b, err),
        Extension::BasicAuth(b) => super::auth_ext::validate_basic(&path, b, err),
        Extension::HealthCheck(h) => {
            if !h.path.starts_with('/') {
                err(format!("{path}.path"), format!("{:?} must start with /", h.path));
            }
        }
        Extension::FileStorage(f) => {
            if f.directory.is_empty() {
                err(format!("{path}.directory"), "must be set".into());
            }
            if f.max_size_mib == 0 {
                err(format!("{path}.max_size_mib"), "must be at least 1".into());
            }
            if f.segment_size_mib == 0 {
                err(format!("{path}.segment_size_mib"), "must be at least 1".into());
            }
        }
        Extension::OAuth2Client(o) => {
            if o.client_id.is_empty() && o.client_id_file.is_empty() {
                err(format!("{path}.client_id"), "set client_id or client_id_file".into());
            }
            if !o.client_id.is_empty() && !o.client_id_file.is_empty() {
                err(
                    format!("{path}.client_id_file"),
                    "set client_id or client_id_file, not both".into(),
                );
            }
            if o.client_secret.is_empty() && o.client_secret_file.is_empty() {
                err(
                    format!("{path}.client_secret"),
                    "set client_secret or client_secret_file".into(),
                );
            }
            if !o.client_secret.is_empty() && !o.client_secret_file.is_empty() {
                err(
                    format!("{path}.client_secret_file"),
                    "set client_secret or client_secret_file, not both".into(),
                );
            }
            if o.token_url.is_empty() && o.discovery_url.is_empty() {
                err(format!("{path}.token_url"), "set token_url or discovery_url".into());
            }
            for (key, url) in [("token_url", &o.token_url), ("discovery_url", &o.discovery_url)] {
                if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                    err(
                        format!("{path}.{key}"),
                        format!("{url:?} is not an http:// or https:// URL"),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
