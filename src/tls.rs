//! TLS for both directions with rustls (aws-lc-rs): receiver mTLS with hot reload and client
//! identity checks, and client configs for exports and token requests (CA bundles,
//! SSL_CERT_FILE, client certificates).
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{ClientTlsConfig, ServerTlsConfig, TlsVersion};
use crate::supervise::{LockUnpoisoned, Supervisor};

#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn file_err(path: &str, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_string(),
        message: message.to_string(),
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsVersion::V1_3 => TLS13_ONLY,
        TlsVersion::V1_2 => rustls::DEFAULT_VERSIONS,
    }
}

/// Every certificate in a PEM file (a bundle with a root and intermediates is fine).
pub(crate) fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificates found"));
    }
    Ok(certs)
}

pub(crate) fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, format!("no usable private key: {e}")))
}

fn root_store(path: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| file_err(path, e))?;
    }
    Ok(roots)
}

/// Builds a receiver's rustls config from files: client certificates are required and verified
/// when a client CA is set.
pub(crate) fn server_config(cfg: &ServerTlsConfig) -> Result<ServerConfig, TlsError> {
    let client_ca = if cfg.client_ca_file.is_empty() {
        &cfg.ca_file
    } else {
        &cfg.client_ca_file
    };
    server_config_from_files(
        &cfg.cert_file,
        &cfg.key_file,
        (!client_ca.is_empty()).then_some(client_ca.as_str()),
        cfg.min_version,
    )
}

/// The one TLS server loader (the receivers, the sink): certificate chain and key from PEM files,
/// HTTP/2 and HTTP/1.1 offered by ALPN, and with `client_ca`, client certificates required and
/// verified against it. `min_version` 1.3 allows only TLS 1.3, 1.2 also TLS 1.2.
pub(crate) fn server_config_from_files(
    cert_file: &str,
    key_file: &str,
    client_ca: Option<&str>,
    min_version: TlsVersion,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions(min_version))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(client_ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(client_ca)?), provider)
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The validity period of a certificate, in Unix seconds, with its text for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Validity {
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
    not_before_text: String,
    not_after_text: String,
}

impl Validity {
    /// The leaf (first) certificate's period; None when it does not parse (rustls refuses such
    /// a file anyway).
    pub(crate) fn of_leaf(certs: &[CertificateDer<'_>]) -> Option<Validity> {
        let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
        let v = cert.validity();
        Some(Validity {
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
            not_before_text: v.not_before.to_string(),
            not_after_text: v.not_after.to_string(),
        })
    }

    /// Why a certificate cannot be served at `now` (Unix seconds), if it cannot.
    pub(crate) fn problem(&self, path: &str, now: i64) -> Option<String> {
        if now > self.not_after {
            Some(format!(
                "server certificate {path} expired (notAfter {}); TLS handshakes fail",
                self.not_after_text
            ))
        } else if now < self.not_before {
            Some(format!(
                "server certificate {path} is not valid yet (notBefore {}); TLS handshakes fail",
                self.not_before_text
            ))
        } else {
            None
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How often a receiver re-checks its certificate's validity period between reloads.
const VALIDITY_CHECK: Duration = Duration::from_secs(60);

/// A receiver's TLS state: the current config (swapped on reload) and the allowed client patterns.
pub(crate) struct ServerTls {
    settings: ServerTlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The current certificate's validity period.
    validity: RwLock<Option<Validity>>,
    /// The last validity problem logged (None: valid), so a change is logged once.
    reported: std::sync::Mutex<Option<String>>,
    /// Where validity problems go once the receiver serves: (health, component).
    health: std::sync::OnceLock<(Arc<crate::telemetry::Health>, String)>,
}

impl ServerTls {
    pub(crate) fn load(settings: &ServerTlsConfig) -> Result<Arc<ServerTls>, TlsError> {
        let config = server_config(settings)?;
        let validity = load_certs(&settings.cert_file).ok().and_then(|c| Validity::of_leaf(&c));
        let tls = Arc::new(ServerTls {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(config)),
            validity: RwLock::new(validity),
            reported: std::sync::Mutex::new(None),
            health: std::sync::OnceLock::new(),
        });
        // Logged once the receiver starts (watch_validity): logging is not set up yet here.
        Ok(tls)
    }

    /// Logs a change in the certificate's validity (a WARN when it is out of its period) and
    /// reports it as a readiness reason once the receiver is attached.
    fn check_validity(&self) {
        let problem = self
            .validity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|v| v.problem(&self.settings.cert_file, unix_now()));
        let component = self.health.get().map(|(_, c)| c.as_str()).unwrap_or("receiver");
        {
            let mut reported = self.reported.lock_unpoisoned();
            if *reported != problem {
                match &problem {
                    Some(p) => tracing::warn!(component, "{p}"),
                    None => tracing::info!(component, "server certificate is within its validity period again"),
                }
                *reported = problem.clone();
            }
        }
        if let Some((health, component)) = self.health.get() {
            health.set_unready(&format!("{component} tls"), problem);
        }
    }

    /// Reports the certificate's validity to readiness from now on (at once, after every
    /// reload, and every VALIDITY_CHECK, since a certificate expires without being reloaded).
    /// Supervised like the reloader: a panic is counted (component `tls_validity`) and the
    /// watch restarts, so an expiring certificate is still reported after it.
    pub(crate) fn watch_validity(
        self: &Arc<Self>,
        component: &str,
        health: Arc<crate::telemetry::Health>,
        supervisor: &Supervisor,
        cancel: CancellationToken,
    ) {
        if self.health.set((health, component.to_string())).is_err() {
            return;
        }
        self.check_validity();
        let me = self.clone();
        let mut tasks = JoinSet::new();
        supervisor.spawn(
            &mut tasks,
            "tls_validity",
            format!("{component} tls validity"),
            move || me.clone().check_validity_every(cancel.clone()),
            Box::new(|_| Box::pin(async {})),
        );
        // The set aborts its tasks when dropped: it lives as long as the watch runs.
        tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
    }

    async fn check_validity_every(self: Arc<Self>, cancel: CancellationToken) {
        crate::supervise::fault_point("tls_validity");
        let mut tick = tokio::time::interval(VALIDITY_CHECK);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.check_validity(),
            }
        }
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }

    /// Re-reads certificate, key and CA every `reload_interval`; a failed reload keeps the old
    /// config (and says so), so a half-written file never takes the receiver down. Supervised like
    /// the stages: a panic is counted (component `tls_reloader`) and the reloader restarts, so
    /// a later rotation is still picked up. It holds nothing a panic could lose: the config in
    /// use stays until a reload replaces it whole.
    pub(crate) fn spawn_reloader(
        self: &Arc<Self>,
        component: String,
        supervisor: &Supervisor,
        cancel: CancellationToken,
    ) {
        let interval: Duration = self.settings.reload_interval.0;
        if interval.is_zero() {
            return;
        }
        let me = self.clone();
        let mut tasks = JoinSet::new();
        let instance = format!("{component} tls reloader");
        supervisor.spawn(
            &mut tasks,
            "tls_reloader",
            instance,
            move || me.clone().reload_every(interval, component.clone(), cancel.clone()),
            Box::new(|_| Box::pin(async {})),
        );
        // The set aborts its tasks when dropped: it lives as long as the reloader runs.
        tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
    }

    async fn reload_every(self: Arc<Self>, interval: Duration, component: String, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            crate::supervise::fault_point("tls_reloader");
            let settings = self.settings.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                let validity = load_certs(&settings.cert_file).ok().and_then(|c| Validity::of_leaf(&c));
                server_config(&settings).map(|config| (config, validity))
            })
            .await;
            match loaded {
                Ok(Ok((config, validity))) => {
                    *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
                    *self.validity.write().unwrap_or_else(|e| e.into_inner()) = validity;
                    self.check_validity();
                    tracing::debug!(component, "TLS material reloaded");
                }
                Ok(Err(e)) => {
                    tracing::warn!(component, error = %e, "TLS reload failed; keeping the previous certificates")
                }
                Err(e) => tracing::warn!(component, error = %e, "TLS reload task failed"),
            }
        }
    }

    /// Whether a verified client may send: always when no patterns are configured.
    pub(crate) fn client_allowed(&self, identity: Option<&PeerIdentity>) -> bool {
        let patterns = &self.settings.allowed_clients;
        if patterns.is_empty() {
            return true;
        }
        let Some(id) = identity else { return false };
        id.names().any(|name| patterns.iter().any(|p| glob_match(p, name)))
    }
}

/// The names a client certificate presents: SAN URIs (e.g. SPIFFE ids) and DNS names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PeerIdentity {
    pub(crate) uris: Vec<String>,
    pub(crate) dns: Vec<String>,
}

impl PeerIdentity {
    pub(crate) fn from_certificate(der: &[u8]) -> Option<PeerIdentity> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut id = PeerIdentity::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => id.uris.push(u.to_string()),
                    GeneralName::DNSName(d) => id.dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        Some(id)
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.uris.iter().chain(&self.dns).map(String::as_str)
    }

    /// For logs: the first URI, else the first DNS name.
    pub(crate) fn display_name(&self) -> &str {
        self.names().next().unwrap_or("(no SAN)")
    }
}

/// Glob match where `*` stands for any run of characters (including `/`) and `?` for one.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A client config for exports and token requests: ca_file when set (every certificate in it is
/// trusted, so a root + intermediate bundle works), else the system roots, which honour
/// SSL_CERT_FILE and SSL_CERT_DIR. `https` is false for a client whose URLs are all plain http
/// (a mesh-secured MLflow): it never handshakes, so no trust roots are loaded for it.
pub(crate) fn client_config(cfg: &ClientTlsConfig, https: bool) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions(cfg.min_version))?;
    let builder = if !https {
        builder.with_root_certificates(RootCertStore::empty())
    } else if cfg.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else if !cfg.ca_file.is_empty() {
        builder.with_root_certificates(root_store(&cfg.ca_file)?)
    } else {
        builder.with_root_certificates(system_roots())
    };
    let config = if cfg.cert_file.is_empty() {
        builder.with_no_client_auth()
    } else {
        builder.with_client_auth_cert(load_certs(&cfg.cert_file)?, load_key(&cfg.key_file)?)?
    };
    Ok(config)
}

/// The system's trust roots, parsed once per process and shared by every client that needs them:
/// a distribution bundle plus SSL_CERT_DIR is a few hundred certificates, a few MiB of parsing
/// and memory that were paid again for each exporter and token client.
pub(crate) fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                tracing::debug!(error = %e, "system certificate store");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(added, ignored, "system trust roots loaded");
            Arc::new(roots)
        })
        .clone()
}

/// `insecure_skip_verify: true`: accepts any server certificate (signatures still checked).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob_match(
            "spiffe://cluster.local/ns/agents/sa/*",
            "spiffe://cluster.local/ns/agents/sa/weather"
        ));
        assert!(!glob_match(
            "spiffe://cluster.local/ns/agents/sa/*",
            "spiffe://cluster.local/ns/other/sa/x"
        ));
        assert!(glob_match("*.agents.svc", "a.agents.svc"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("agent-?", "agent-1"));
    }

    #[test]
    fn validity_problems_name_the_file_and_the_date() {
        let v = Validity {
            not_before: 1_000,
            not_after: 2_000,
            not_before_text: "Jan  1 00:16:40 1970 +00:00".into(),
            not_after_text: "Jan  1 00:33:20 1970 +00:00".into(),
        };
        assert_eq!(v.problem("s.crt", 1_500), None);
        let expired = v.problem("s.crt", 2_001).unwrap();
        assert!(
            expired.contains("s.crt expired (notAfter Jan  1 00:33:20 1970"),
            "{expired}"
        );
        let early = v.problem("s.crt", 999).unwrap();
        assert!(
            early.contains("s.crt is not valid yet (notBefore Jan  1 00:16:40 1970"),
            "{early}"
        );
    }

    #[test]
    fn identity_patterns() {
        let id = PeerIdentity {
            uris: vec!["spiffe://cluster.local/ns/agents/sa/a".into()],
            dns: vec!["a.example".into()],
        };
        let tls = ServerTls {
            settings: ServerTlsConfig {
                allowed_clients: vec!["*.example".into()],
                ..Default::default()
            },
            current: RwLock::new(Arc::new(
                ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new())),
            )),
            validity: RwLock::new(None),
            reported: std::sync::Mutex::new(None),
            health: std::sync::OnceLock::new(),
        };
        assert!(tls.client_allowed(Some(&id)));
        assert!(!tls.client_allowed(Some(&PeerIdentity::default())));
        assert!(!tls.client_allowed(None));
    }
}
