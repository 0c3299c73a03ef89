//! The `bearertokenauth` and `basicauth` (client_auth) extensions: a header built from a token
//! or a username and password, given inline or in files re-read when they change. Every value
//! built here is marked sensitive, and no Debug or error shows it.
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use http::{HeaderName, HeaderValue};

use super::file::{FileProblem, Observers, WatchedFile};
use super::{AuthError, AuthFuture, Authenticator};
use crate::config::{BasicAuthConfig, BearerTokenAuthConfig};
use crate::telemetry::{Health, Metrics};

/// A secret given inline (as is: a password may begin or end with a space) or in a watched file
/// (trimmed: files usually end with a newline).
enum Source {
    Inline(Arc<str>),
    File(Box<WatchedFile>),
}

impl Source {
    fn new(
        extension: &str,
        key: &'static str,
        inline: &str,
        path: &str,
        required: bool,
        observers: &Arc<OnceLock<Observers>>,
    ) -> Result<Source, FileProblem> {
        if path.is_empty() {
            return Ok(Source::Inline(Arc::from(inline)));
        }
        WatchedFile::open(extension, key, path, required, observers.clone()).map(|f| Source::File(Box::new(f)))
    }

    fn current(&self) -> Result<Arc<str>, AuthError> {
        match self {
            Source::Inline(v) => Ok(v.clone()),
            Source::File(f) => f.current().map_err(|e| AuthError { message: e.to_string() }),
        }
    }

    fn recheck(&self) {
        if let Source::File(f) = self {
            f.recheck();
        }
    }
}

fn sensitive(text: &str) -> Result<HeaderValue, AuthError> {
    let mut v = HeaderValue::from_str(text).map_err(|_| AuthError {
        message: "the credential holds characters an HTTP header cannot carry (not shown)".into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// One `bearertokenauth` extension.
pub(crate) struct BearerTokenAuth {
    header: HeaderName,
    scheme: String,
    token: Source,
    observers: Arc<OnceLock<Observers>>,
}

impl std::fmt::Debug for BearerTokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerTokenAuth")
            .field("header", &self.header)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl BearerTokenAuth {
    /// Reads the token file: missing or empty at start is a configuration error unless
    /// `file_retry.enabled` (then exports wait for it).
    pub(crate) fn new(id: &str, cfg: &BearerTokenAuthConfig) -> Result<BearerTokenAuth, String> {
        let observers = Arc::new(OnceLock::new());
        let header = HeaderName::from_bytes(cfg.header.as_bytes())
            .map_err(|_| format!("header {:?} is not a valid HTTP header name", cfg.header))?;
        let token = Source::new(
            id,
            "filename",
            cfg.token.trim(),
            &cfg.filename,
            !cfg.file_retry.enabled,
            &observers,
        )
        .map_err(|e| format!("filename: {e}"))?;
        Ok(BearerTokenAuth {
            header,
            scheme: cfg.scheme.clone(),
            token,
            observers,
        })
    }
}

impl Authenticator for BearerTokenAuth {
    fn authorization(&self) -> AuthFuture<'_> {
        Box::pin(async move {
            let token = self.token.current()?;
            if self.scheme.is_empty() {
                sensitive(&token)
            } else {
                sensitive(&format!("{} {token}", self.scheme))
            }
        })
    }

    /// The file may have been rotated since we last looked: look again before the retry.
    fn invalidate(&self, _rejected: &HeaderValue) {
        self.token.recheck();
    }

    fn header_name(&self) -> HeaderName {
        self.header.clone()
    }

    fn attach(&self, metrics: &Arc<Metrics>, health: &Arc<Health>) {
        let _ = self.observers.set(Observers {
            metrics: metrics.clone(),
            health: health.clone(),
        });
    }
}

/// One `basicauth` extension's client side.
pub(crate) struct BasicAuth {
    username: Source,
    password: Source,
    observers: Arc<OnceLock<Observers>>,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth").finish_non_exhaustive()
    }
}

impl BasicAuth {
    /// Ok(None) without client_auth (validation refuses an exporter naming it then).
    pub(crate) fn new(id: &str, cfg: &BasicAuthConfig) -> Result<Option<BasicAuth>, String> {
        let Some(c) = &cfg.client_auth else {
            return Ok(None);
        };
        let observers = Arc::new(OnceLock::new());
        let username = Source::new(id, "username_file", &c.username, &c.username_file, true, &observers)
            .map_err(|e| format!("client_auth.username_file: {e}"))?;
        // An empty password is allowed inline (as in the collector); read from a file it must
        // have a value, since an empty file is more likely a mount that is not there yet.
        let password = Source::new(id, "password_file", &c.password, &c.password_file, true, &observers)
            .map_err(|e| format!("client_auth.password_file: {e}"))?;
        Ok(Some(BasicAuth {
            username,
            password,
            observers,
        }))
    }
}

/// `Basic base64(user:password)` (RFC 7617).
fn basic_value(username: &str, password: &str) -> Result<HeaderValue, AuthError> {
    if username.contains(':') {
        return Err(AuthError {
            message: "the username contains ':', which Basic authentication cannot carry".into(),
        });
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    sensitive(&format!("Basic {encoded}"))
}

impl Authenticator for BasicAuth {
    fn authorization(&self) -> AuthFuture<'_> {
        Box::pin(async move { basic_value(&self.username.current()?, &self.password.current()?) })
    }

    fn invalidate(&self, _rejected: &HeaderValue) {
        self.username.recheck();
        self.password.recheck();
    }

    fn attach(&self, metrics: &Arc<Metrics>, health: &Arc<Health>) {
        let _ = self.observers.set(Observers {
            metrics: metrics.clone(),
            health: health.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(a: &dyn Authenticator) -> String {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let v = rt.block_on(a.authorization()).unwrap();
        assert!(v.is_sensitive());
        v.to_str().unwrap().to_string()
    }

    #[test]
    fn bearer_header_with_default_custom_and_no_scheme() {
        let cfg = BearerTokenAuthConfig {
            token: "t0k".into(),
            ..Default::default()
        };
        let a = BearerTokenAuth::new("bearertokenauth", &cfg).unwrap();
        assert_eq!(header_of(&a), "Bearer t0k");
        assert_eq!(a.header_name(), http::header::AUTHORIZATION);
        let a = BearerTokenAuth::new(
            "bearertokenauth",
            &BearerTokenAuthConfig {
                scheme: String::new(),
                header: "X-Api-Key".into(),
                ..cfg
            },
        )
        .unwrap();
        assert_eq!(header_of(&a), "t0k");
        assert_eq!(a.header_name().as_str(), "x-api-key");
        assert!(!format!("{a:?}").contains("t0k"));
    }

    #[test]
    fn basic_header_is_rfc7617() {
        let mut cfg = BasicAuthConfig::default();
        let client = cfg.client_auth.insert(Default::default());
        client.username = "Aladdin".into();
        client.password = "open sesame".into();
        let a = BasicAuth::new("basicauth", &cfg).unwrap().unwrap();
        assert_eq!(header_of(&a), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        let mut spaced = cfg.clone();
        if let Some(c) = spaced.client_auth.as_mut() {
            c.password = " open sesame ".into();
        }
        let a2 = BasicAuth::new("basicauth", &spaced).unwrap().unwrap();
        // base64("Aladdin: open sesame ")
        assert_eq!(header_of(&a2), "Basic QWxhZGRpbjogb3BlbiBzZXNhbWUg");
        assert!(!format!("{a:?}").contains("sesame"));
        assert!(basic_value("a:b", "c").is_err());
    }

    #[test]
    fn missing_token_file_is_a_start_error_unless_file_retry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").display().to_string();
        let cfg = BearerTokenAuthConfig {
            filename: path.clone(),
            ..Default::default()
        };
        let e = BearerTokenAuth::new("b", &cfg).unwrap_err();
        assert!(e.starts_with("filename: cannot read"), "{e}");
        let mut retry = cfg.clone();
        retry.file_retry.enabled = true;
        let a = BearerTokenAuth::new("b", &retry).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(a.authorization()).is_err());
    }
}
