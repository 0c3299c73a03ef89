//! The oauth2client extension: an OAuth2 client-credentials token on every export, one cache per
//! extension shared by every exporter using it. The cache refreshes before expiry with one
//! request in flight, drops a token the destination answered 401 to, backs off while the token
//! endpoint fails and reports refused credentials on /readyz. Tokens never reach logs, errors or
//! metrics: at debug level only their iss, aud, azp and exp are logged.
pub(crate) mod cache;
pub(crate) mod inspect;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::http::HeaderValue;
use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, ClientSecret, RequestTokenError, Scope, TokenResponse, TokenUrl};

use super::auth::{AuthError, AuthFuture, Authenticator};
use crate::config::OAuth2ClientConfig;
use crate::http_client::{self, HttpClient, Recording, error_chain};
use crate::supervise::LockUnpoisoned;
use crate::telemetry::{Health, Metrics, TokenLabels, TokenResultLabels};
use cache::{Check, Failure, FailureKind, TokenState};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error("{key}: cannot read {path}: {error}")]
    File {
        key: &'static str,
        path: String,
        error: String,
    },
    #[error("{key}: {path} is empty")]
    Empty { key: &'static str, path: String },
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A fetched token. Debug is hand-written so the token can never be printed by accident.
pub(crate) struct Fetched {
    pub(crate) access_token: String,
    pub(crate) token_type: String,
    pub(crate) expires_in: Option<Duration>,
    pub(crate) scopes: Option<Vec<String>>,
    pub(crate) token_url: String,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("access_token", &"(redacted)")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// A value given inline or in a file (Kubernetes secret mount). No Debug: it holds secrets.
#[derive(Clone)]
enum Secret {
    Inline(String),
    /// Re-read before every token request so a rotated secret is picked up without a restart;
    /// the last good value is kept if a re-read fails (a file being swapped).
    File {
        key: &'static str,
        path: String,
        last: Arc<Mutex<String>>,
    },
}

impl Secret {
    fn new(key: &'static str, inline: &str, path: &str) -> Result<Secret, SetupError> {
        if path.is_empty() {
            return Ok(Secret::Inline(inline.to_string()));
        }
        let value = read_secret(key, path)?;
        Ok(Secret::File {
            key,
            path: path.to_string(),
            last: Arc::new(Mutex::new(value)),
        })
    }

    fn current(&self, extension: &str) -> String {
        match self {
            Secret::Inline(v) => v.clone(),
            Secret::File { key, path, last } => match read_secret(key, path) {
                Ok(v) => {
                    *last.lock_unpoisoned() = v.clone();
                    v
                }
                Err(e) => {
                    tracing::warn!(extension, error = %e, "keeping the previously read value");
                    last.lock_unpoisoned().clone()
                }
            },
        }
    }
}

fn read_secret(key: &'static str, path: &str) -> Result<String, SetupError> {
    let text = std::fs::read_to_string(path).map_err(|e| SetupError::File {
        key,
        path: path.to_string(),
        error: e.to_string(),
    })?;
    let value = text.trim().to_string();
    if value.is_empty() {
        return Err(SetupError::Empty {
            key,
            path: path.to_string(),
        });
    }
    Ok(value)
}

struct Observers {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// One oauth2client extension: its settings, HTTP client and token cache.
pub(crate) struct OAuth2Client {
    id: String,
    cfg: OAuth2ClientConfig,
    http: HttpClient,
    client_id: Secret,
    client_secret: Secret,
    /// token_url, or the discovery document's token_endpoint once fetched.
    token_url: Mutex<Option<String>>,
    state: Mutex<TokenState>,
    /// Held by the one caller fetching a token; the others wait here or use the old token.
    refreshing: tokio::sync::Mutex<()>,
    observers: OnceLock<Observers>,
}

impl OAuth2Client {
    /// Reads secret files and TLS material: failures here are configuration errors.
    pub(crate) fn new(id: &str, cfg: &OAuth2ClientConfig) -> Result<OAuth2Client, SetupError> {
        Ok(OAuth2Client {
            id: id.to_string(),
            http: HttpClient::new(
                &cfg.tls,
                http_client::any_https([cfg.token_url.as_str(), &cfg.discovery_url]),
                cfg.timeout.0,
            )?,
            client_id: Secret::new("client_id_file", &cfg.client_id, &cfg.client_id_file)?,
            client_secret: Secret::new("client_secret_file", &cfg.client_secret, &cfg.client_secret_file)?,
            token_url: Mutex::new((!cfg.token_url.is_empty()).then(|| cfg.token_url.clone())),
            state: Mutex::new(TokenState::new(cfg.expiry_buffer.0)),
            refreshing: tokio::sync::Mutex::new(()),
            observers: OnceLock::new(),
            cfg: cfg.clone(),
        })
    }

    /// Connects the cache to the relay's metrics and readiness (once, before serving).
    pub(crate) fn attach(&self, metrics: Arc<Metrics>, health: Arc<Health>) {
        let _ = self.observers.set(Observers { metrics, health });
    }

    /// Fetches the first token in the background, so bad credentials show on /readyz at once.
    pub(crate) fn spawn_warmup(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.bearer().await;
        });
    }

    /// The token endpoint: configured, or read from the discovery document (once).
    async fn token_endpoint(&self) -> Result<String, Failure> {
        if let Some(url) = self.token_url.lock_unpoisoned().clone() {
            return Ok(url);
        }
        let url = &self.cfg.discovery_url;
        let doc = self
            .http
            .get_json(url)
            .await
            .map_err(|e| Failure::unavailable(format!("discovery {url}: {e}")))?;
        let endpoint = doc
            .get("token_endpoint")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Failure::unavailable(format!("discovery {url}: no token_endpoint")))?
            .to_string();
        tracing::info!(extension = %self.id, discovery_url = %url, token_endpoint = %endpoint, "token endpoint discovered");
        *self.token_url.lock_unpoisoned() = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// One client-credentials request, no cache, no retries (also used by `otlp-relay token`).
    pub(crate) async fn fetch(&self) -> Result<Fetched, Failure> {
        let token_url = self.token_endpoint().await?;
        let client = BasicClient::new(ClientId::new(self.client_id.current(&self.id)))
            .set_client_secret(ClientSecret::new(self.client_secret.current(&self.id)))
            .set_auth_type(if self.cfg.auth_style == crate::config::AuthStyle::Post {
                AuthType::RequestBody
            } else {
                AuthType::BasicAuth
            })
            .set_token_uri(
                TokenUrl::new(token_url.clone())
                    .map_err(|e| Failure::rejected(format!("token_url {token_url:?}: {e}")))?,
            );
        let mut request = client
            .exchange_client_credentials()
            .add_scopes(self.cfg.scopes.iter().cloned().map(Scope::new));
        for (k, v) in &self.cfg.endpoint_params {
            request = request.add_extra_param(k.clone(), v.clone());
        }
        let recording = Recording::new(&self.http);
        let result = request.request_async(&recording).await;
        let status = recording.status();
        match result {
            Ok(resp) => Ok(Fetched {
                access_token: resp.access_token().secret().clone(),
                token_type: format!("{:?}", resp.token_type()),
                expires_in: resp.expires_in(),
                scopes: resp.scopes().map(|s| s.iter().map(|x| x.to_string()).collect()),
                token_url,
            }),
            Err(e) => Err(classify(&token_url, status, e)),
        }
    }

    /// The Authorization header value: cached, refreshed or fetched (one fetch at a time).
    async fn bearer(&self) -> Result<HeaderValue, AuthError> {
        let check = self.state.lock_unpoisoned().check(Instant::now());
        match check {
            Check::Fresh(v) => return Ok(v),
            Check::BackingOff(f) => return Err(auth_error(&f)),
            Check::Due(v) => {
                // Someone is already refreshing: the current token is still valid, use it.
                let Ok(_guard) = self.refreshing.try_lock() else {
                    return Ok(v);
                };
                if matches!(self.state.lock_unpoisoned().check(Instant::now()), Check::Due(_)) {
                    self.refresh().await;
                }
            }
            Check::Missing => {
                let _guard = self.refreshing.lock().await;
                // Whoever held the lock may have fetched (or failed) meanwhile.
                if matches!(self.state.lock_unpoisoned().check(Instant::now()), Check::Missing) {
                    self.refresh().await;
                }
            }
        }
        match self.state.lock_unpoisoned().check(Instant::now()) {
            Check::Fresh(v) | Check::Due(v) => Ok(v),
            Check::BackingOff(f) => Err(auth_error(&f)),
            Check::Missing => Err(AuthError {
                message: "the token endpoint returned no usable token".into(),
            }),
        }
    }

    /// Fetches and stores a token, or records the failure (metrics, readiness, rate-limited log).
    async fn refresh(&self) {
        let result = self.fetch().await.and_then(|f| usable_token(&f, SystemTime::now()));
        let obs = self.observers.get();
        let now = Instant::now();
        match result {
            Ok(UsableToken {
                value,
                lifetime,
                claims,
                exp,
            }) => {
                let recovered = self.state.lock_unpoisoned().store(value, lifetime, now);
                if let Some(c) = &claims {
                    tracing::debug!(
                        extension = %self.id,
                        iss = %claim_text(c, "iss"),
                        aud = %claim_text(c, "aud"),
                        azp = %claim_text(c, "azp"),
                        exp = exp.unwrap_or(0),
                        "token fetched"
                    );
                } else {
                    tracing::debug!(extension = %self.id, lifetime = ?lifetime, "token fetched (not a JWT)");
                }
                if recovered {
                    tracing::info!(extension = %self.id, "token endpoint answered again; token fetched");
                }
                if let Some(o) = obs {
                    o.metrics
                        .token_requests
                        .get_or_create(&self.result_labels("success"))
                        .inc();
                    let expiry = exp.and_then(|e| i64::try_from(e).ok()).or_else(|| {
                        lifetime.and_then(|l| {
                            let at = SystemTime::now().checked_add(l)?.duration_since(UNIX_EPOCH).ok()?;
                            i64::try_from(at.as_secs()).ok()
                        })
                    });
                    if let Some(e) = expiry {
                        o.metrics
                            .token_expiry
                            .get_or_create(&TokenLabels {
                                extension: self.id.clone(),
                            })
                            .set(e);
                    }
                    o.health.set_unready(&self.id, None);
                }
            }
            Err(failure) => {
                let outcome = self.state.lock_unpoisoned().fail(failure.clone(), now);
                let rejected = failure.kind == FailureKind::Rejected;
                if outcome.log {
                    if rejected {
                        tracing::error!(extension = %self.id, error = %failure.message, retry_in = ?outcome.retry_in,
                            "token endpoint refused our credentials; exports wait (logged at most once a minute)");
                    } else {
                        tracing::warn!(extension = %self.id, error = %failure.message, retry_in = ?outcome.retry_in,
                            "token request failed; exports wait and retry (logged at most once a minute)");
                    }
                }
                if let Some(o) = obs {
                    let result = if rejected { "rejected" } else { "error" };
                    o.metrics
                        .token_requests
                        .get_or_create(&self.result_labels(result))
                        .inc();
                    if rejected {
                        o.health
                            .set_unready(&self.id, Some(format!("token endpoint refused: {}", failure.message)));
                    }
                }
            }
        }
    }

    fn result_labels(&self, result: &str) -> TokenResultLabels {
        TokenResultLabels {
            extension: self.id.clone(),
            result: result.to_string(),
        }
    }
}

impl Authenticator for OAuth2Client {
    fn authorization(&self) -> AuthFuture<'_> {
        Box::pin(self.bearer())
    }

    fn invalidate(&self, rejected: &HeaderValue) {
        if self.state.lock_unpoisoned().invalidate(rejected) {
            tracing::debug!(extension = %self.id, "token rejected by the destination; dropped from the cache");
        }
    }
}

fn auth_error(f: &Failure) -> AuthError {
    AuthError {
        message: f.message.clone(),
    }
}

/// The longest lifetime believed: a provider's `expires_in` of centuries (or u64::MAX) would
/// overflow clock arithmetic, and a token is worth refreshing at least daily anyway.
pub(crate) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long a token may be used: expires_in, corrected by the JWT's own exp when that is a bit
/// earlier (exp is whole seconds, so a 3 s token may have 2.1 s left); a far-off exp means the
/// clocks disagree and expires_in wins. Never above MAX_TOKEN_LIFETIME.
pub(crate) fn lifetime(expires_in: Option<Duration>, exp: Option<u64>, now: SystemTime) -> Option<Duration> {
    let by_exp = exp.map(|e| {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(e))
            .and_then(|at| at.duration_since(now).ok())
            .unwrap_or_default()
    });
    let lifetime = match (expires_in, by_exp) {
        (Some(l), Some(r)) if r < l && r.saturating_add(Duration::from_secs(2)) >= l => Some(r),
        (Some(l), _) => Some(l),
        (None, Some(r)) if !r.is_zero() => Some(r),
        _ => None,
    };
    lifetime.map(|l| l.min(MAX_TOKEN_LIFETIME))
}

/// A token response the relay can use: the Authorization value and how long it lasts.
pub(crate) struct UsableToken {
    value: HeaderValue,
    lifetime: Option<Duration>,
    claims: Option<serde_json::Value>,
    exp: Option<u64>,
}

/// Checks what the token endpoint sent: anything it cannot use is a failure (retried like an
/// unavailable endpoint), never a panic, whatever the JSON held.
pub(crate) fn usable_token(fetched: &Fetched, now: SystemTime) -> Result<UsableToken, Failure> {
    if fetched.access_token.is_empty() {
        return Err(Failure::unavailable("the token response has an empty access_token"));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {}", fetched.access_token))
        .map_err(|_| Failure::unavailable("the access token is not a valid header value"))?;
    value.set_sensitive(true);
    let claims = inspect::jwt_parts(&fetched.access_token).map(|(_, c)| c);
    let exp = claims.as_ref().and_then(|c| c.get("exp")).and_then(|v| v.as_u64());
    Ok(UsableToken {
        value,
        lifetime: lifetime(fetched.expires_in, exp, now),
        claims,
        exp,
    })
}

/// Turns oauth2's error into a loggable failure. Bodies of successful answers are never
/// included (they would hold the token); error answers carry only the provider's error.
fn classify(
    token_url: &str,
    status: Option<::http::StatusCode>,
    e: RequestTokenError<http_client::HttpError, oauth2::basic::BasicErrorResponse>,
) -> Failure {
    let refused = status.is_some_and(|s| matches!(s.as_u16(), 400 | 401 | 403));
    let status_text = status.map(|s| s.as_u16().to_string()).unwrap_or_default();
    match e {
        RequestTokenError::ServerResponse(r) => {
            let mut message = format!("HTTP {status_text}: {}", r.error());
            if let Some(d) = r.error_description() {
                message.push_str(": ");
                message.push_str(d);
            }
            if refused {
                Failure::rejected(message)
            } else {
                Failure::unavailable(message)
            }
        }
        RequestTokenError::Request(e) => Failure::unavailable(format!("{token_url}: {}", error_chain(&e))),
        RequestTokenError::Parse(e, body) => {
            if status == Some(::http::StatusCode::OK) {
                Failure::unavailable(format!("token response unreadable at {}", e.path()))
            } else {
                let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                let message = format!("HTTP {status_text}: {}", snippet.trim());
                if refused {
                    Failure::rejected(message)
                } else {
                    Failure::unavailable(message)
                }
            }
        }
        RequestTokenError::Other(m) => Failure::unavailable(format!("HTTP {status_text}: {m}")),
    }
}

fn claim_text(claims: &serde_json::Value, name: &str) -> String {
    match claims.get(name) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_prefers_a_slightly_earlier_exp() {
        let now = UNIX_EPOCH + Duration::from_millis(1_000_000_900);
        // exp = iat + 3 with iat rounded down: 2.1 s left, not 3.
        assert_eq!(
            lifetime(Some(Duration::from_secs(3)), Some(1_000_003), now),
            Some(Duration::from_millis(2100))
        );
        // A provider clock far behind ours: trust expires_in.
        assert_eq!(
            lifetime(Some(Duration::from_secs(60)), Some(999_000), now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(lifetime(None, None, now), None);
        assert_eq!(lifetime(None, Some(1_000_010), now), Some(Duration::from_millis(9100)));
    }

    #[test]
    fn fetched_debug_hides_the_token() {
        let f = Fetched {
            access_token: "eyJsecret".into(),
            token_type: "Bearer".into(),
            expires_in: None,
            scopes: None,
            token_url: String::new(),
        };
        assert!(!format!("{f:?}").contains("eyJsecret"));
    }

    #[test]
    fn provider_errors_are_classified_by_status() {
        use oauth2::basic::{BasicErrorResponse, BasicErrorResponseType};
        let err = || {
            RequestTokenError::ServerResponse(BasicErrorResponse::new(
                BasicErrorResponseType::InvalidClient,
                Some("client authentication failed".into()),
                None,
            ))
        };
        let f = classify("u", Some(::http::StatusCode::UNAUTHORIZED), err());
        assert_eq!(f.kind, FailureKind::Rejected);
        assert_eq!(f.message, "HTTP 401: invalid_client: client authentication failed");
        let f = classify("u", Some(::http::StatusCode::SERVICE_UNAVAILABLE), err());
        assert_eq!(f.kind, FailureKind::Unavailable);
    }
}

/// The token endpoint's answer is untrusted input: whatever JSON, status and token it holds, the
/// relay gets a usable token or a failure to retry, never a panic, and no token in a message.
#[cfg(test)]
mod fuzz {
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;

    const TOKEN_URL: &str = "http://127.0.0.1:9/token";

    fn json_number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            Just("18446744073709551616".to_string()),
            Just("1e400".to_string()),
            "[0-9a-z\"]{0,8}".prop_map(|s| format!("{s:?}")),
            Just("null".to_string()),
        ]
    }

    /// Access tokens: opaque text (controls and non-ASCII included) or JWT-shaped with any exp.
    fn access_token() -> impl Strategy<Value = String> {
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        prop_oneof![
            any::<String>(),
            "[ -~]{0,40}",
            (json_number(), json_number()).prop_map(move |(exp, iat)| {
                format!(
                    "{}.{}.sig",
                    b64(r#"{"alg":"RS256","typ":"JWT"}"#),
                    b64(&format!(r#"{{"exp":{exp},"iat":{iat},"azp":"relay"}}"#))
                )
            }),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        let field = |name: &'static str, value: BoxedStrategy<String>| {
            proptest::option::of(value).prop_map(move |v| v.map(|v| format!("\"{name}\":{v}")))
        };
        let token = (
            field("access_token", access_token().prop_map(|t| format!("{t:?}")).boxed()),
            field(
                "token_type",
                prop_oneof![
                    Just("\"Bearer\"".to_string()),
                    Just("\"bearer\"".to_string()),
                    "\"[a-z]{0,6}\""
                ]
                .boxed(),
            ),
            field("expires_in", json_number().boxed()),
            field("scope", "\"[ a-z]{0,12}\"".boxed()),
            field("error", "\"[a-z_]{0,12}\"".boxed()),
            field(
                "error_description",
                any::<String>().prop_map(|s| format!("{s:?}")).boxed(),
            ),
        )
            .prop_map(|(a, b, c, d, e, f)| {
                let fields: Vec<String> = [a, b, c, d, e, f].into_iter().flatten().collect();
                format!("{{{}}}", fields.join(",")).into_bytes()
            });
        prop_oneof![
            4 => token,
            1 => proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    fn answer(status: u16, body: Vec<u8>) -> Result<Fetched, Failure> {
        let client = BasicClient::new(ClientId::new("relay".into()))
            .set_client_secret(ClientSecret::new("secret".into()))
            .set_token_uri(TokenUrl::new(TOKEN_URL.into()).unwrap());
        let respond = move |_req: oauth2::HttpRequest| {
            let mut resp = ::http::Response::new(body.clone());
            *resp.status_mut() = ::http::StatusCode::from_u16(status).unwrap();
            resp.headers_mut().insert(
                ::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            async move { Ok::<_, http_client::HttpError>(resp) }
        };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        match rt.block_on(client.exchange_client_credentials().request_async(&respond)) {
            Ok(resp) => Ok(Fetched {
                access_token: resp.access_token().secret().clone(),
                token_type: format!("{:?}", resp.token_type()),
                expires_in: resp.expires_in(),
                scopes: None,
                token_url: TOKEN_URL.into(),
            }),
            Err(e) => Err(classify(TOKEN_URL, ::http::StatusCode::from_u16(status).ok(), e)),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_answer_is_a_token_or_a_failure(
            status in prop_oneof![4 => Just(200u16), 1 => Just(400u16), 1 => Just(401u16), 1 => 200u16..600],
            body in body(),
            now_secs in prop_oneof![Just(1_750_000_000u64), any::<u32>().prop_map(u64::from)],
        ) {
            let now = UNIX_EPOCH + Duration::from_secs(now_secs);
            match answer(status, body) {
                Ok(fetched) => match usable_token(&fetched, now) {
                    Ok(token) => {
                        prop_assert!(token.lifetime.is_none_or(|l| l <= MAX_TOKEN_LIFETIME));
                        let mut state = TokenState::new(Duration::from_secs(300));
                        let at = Instant::now();
                        state.store(token.value.clone(), token.lifetime, at);
                        prop_assert!(matches!(state.check(at), Check::Fresh(_) | Check::Due(_)) || token.lifetime == Some(Duration::ZERO));
                    }
                    Err(f) => prop_assert!(!fetched.access_token.is_empty() && f.message.contains("access token") || fetched.access_token.is_empty()),
                },
                Err(f) => prop_assert!(!f.message.is_empty()),
            }
        }
    }
}
