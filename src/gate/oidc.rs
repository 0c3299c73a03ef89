//! The provider side: discovery, the browser's authorization-code flow (PKCE, state, nonce) through the
//! `openidconnect` crate, the JWKS cache for Bearer tokens, the client-credentials token behind Basic,
//! and the session checks: is a browser login still alive at the provider (introspection of its
//! refresh token, else a refresh grant), and ending it (revocation) on logout.
use std::sync::Arc;
use std::time::{Duration, Instant};

use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreIdToken};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl,
    LogoutRequest, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, PostLogoutRedirectUrl,
    ProviderMetadataWithLogout, RedirectUrl, RefreshToken, RequestTokenError, Scope, TokenResponse,
};
use tokio::sync::{Mutex, RwLock};

use super::config::GateConfig;
use super::jwt::{self, JwtError, JwtRules, KeySet};
use super::session::{Identity, LoginState};
use crate::http_client::{HttpClient, error_chain};

type Client =
    CoreClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointMaybeSet, EndpointMaybeSet>;

/// Least time between two JWKS fetches triggered by unknown kids (an attacker can send any kid).
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum OidcError {
    #[error("identity provider not reachable yet: {0}")]
    NotReady(String),
    #[error("login failed: {0}")]
    Login(String),
    #[error("token request failed: {0}")]
    Token(String),
    #[error("session check failed: {0}")]
    SessionCheck(String),
}

struct Discovered {
    client: Client,
    end_session: Option<String>,
    jwks_uri: String,
    /// RFC 7662 and RFC 7009 endpoints (not in openidconnect's typed metadata).
    introspection: Option<String>,
    revocation: Option<String>,
}

/// What a completed browser login yields.
pub(crate) struct Login {
    pub(crate) identity: Identity,
    pub(crate) id_token: String,
    pub(crate) refresh_token: Option<String>,
}

/// The provider's answer on whether a browser login still stands.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SessionCheck {
    /// Still valid; a refresh grant may have rotated the refresh token.
    Active { refresh_token: Option<String> },
    /// Logged out, revoked, expired or the user disabled.
    Ended,
}

/// An introspection answer (RFC 7662): only `"active": true` keeps a session. A token issued to another
/// client is not ours to keep a session with.
pub(crate) fn introspection_verdict(body: &[u8], client_id: &str) -> Option<SessionCheck> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let active = v.get("active")?.as_bool()?;
    let client_ok = v
        .get("client_id")
        .and_then(|c| c.as_str())
        .is_none_or(|c| c == client_id);
    Some(if active && client_ok {
        SessionCheck::Active { refresh_token: None }
    } else {
        SessionCheck::Ended
    })
}

pub(crate) struct Oidc {
    cfg: Arc<GateConfig>,
    http: HttpClient,
    discovered: RwLock<Option<Arc<Discovered>>>,
    keys: RwLock<Arc<KeySet>>,
    keys_fetched: Mutex<Option<Instant>>,
    cc_token: Mutex<Option<(String, Instant)>>,
    on_demand_discovery: Mutex<Option<Instant>>,
    rules: JwtRules,
}

impl Oidc {
    pub(crate) fn new(cfg: Arc<GateConfig>, http: HttpClient) -> Oidc {
        let rules = JwtRules {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_secs: cfg.leeway_secs,
            groups_attribute: cfg.groups_attribute.clone(),
            allowed_clients: cfg.allowed_clients.clone(),
        };
        Oidc {
            cfg,
            http,
            discovered: RwLock::new(None),
            keys: RwLock::new(Arc::new(KeySet::empty())),
            keys_fetched: Mutex::new(None),
            cc_token: Mutex::new(None),
            on_demand_discovery: Mutex::new(None),
            rules,
        }
    }

    pub(crate) async fn is_ready(&self) -> bool {
        self.discovered.read().await.is_some()
    }

    /// Fetches the discovery document and the JWKS. Called at start (retried until it works) and again
    /// when the provider's keys changed under a login.
    pub(crate) async fn discover(&self) -> Result<(), OidcError> {
        let issuer = IssuerUrl::new(self.cfg.issuer.clone()).map_err(|e| OidcError::NotReady(e.to_string()))?;
        let meta = ProviderMetadataWithLogout::discover_async(issuer, &self.http)
            .await
            .map_err(|e| OidcError::NotReady(error_chain(&e)))?;
        let end_session = meta
            .additional_metadata()
            .end_session_endpoint
            .as_ref()
            .map(|u| u.url().to_string());
        let jwks_uri = meta.jwks_uri().url().to_string();
        // The same document again, for the two endpoints openidconnect has no field for.
        let extra = self
            .http
            .get_json(&self.cfg.discovery_url)
            .await
            .map_err(|e| OidcError::NotReady(e.to_string()))?;
        let endpoint = |k: &str| {
            extra
                .get(k)
                .and_then(|v| v.as_str())
                .filter(|u| url::Url::parse(u).is_ok_and(|u| matches!(u.scheme(), "http" | "https")))
                .map(String::from)
        };
        let introspection = endpoint("introspection_endpoint");
        let revocation = endpoint("revocation_endpoint");
        let client = CoreClient::from_provider_metadata(
            meta,
            ClientId::new(self.cfg.client_id.clone()),
            Some(ClientSecret::new(self.cfg.client_secret.0.clone())),
        );
        *self.discovered.write().await = Some(Arc::new(Discovered {
            client,
            end_session,
            jwks_uri,
            introspection,
            revocation,
        }));
        self.refresh_keys(true).await
    }

    async fn discovered(&self) -> Result<Arc<Discovered>, OidcError> {
        if let Some(d) = self.discovered.read().await.clone() {
            return Ok(d);
        }
        // Requests arriving while the provider is down must not each hit it: at most one try per second
        // from the request path (the background task keeps retrying anyway).
        {
            let mut last = self.on_demand_discovery.lock().await;
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err(OidcError::NotReady("provider discovery pending".into()));
            }
            *last = Some(Instant::now());
        }
        self.discover().await?;
        self.discovered
            .read()
            .await
            .clone()
            .ok_or_else(|| OidcError::NotReady("no discovery document".into()))
    }

    /// Refetches the JWKS unless that happened less than JWKS_REFETCH_INTERVAL ago (unless `force`).
    async fn refresh_keys(&self, force: bool) -> Result<(), OidcError> {
        let mut last = self.keys_fetched.lock().await;
        if !force && last.is_some_and(|t| t.elapsed() < JWKS_REFETCH_INTERVAL) {
            return Ok(());
        }
        let uri = match self.discovered.read().await.as_ref() {
            Some(d) => d.jwks_uri.clone(),
            None => return Err(OidcError::NotReady("no discovery document".into())),
        };
        *last = Some(Instant::now());
        let body = self
            .http
            .get(&uri)
            .await
            .map_err(|e| OidcError::NotReady(e.to_string()))?;
        let keys = KeySet::from_jwks_json(&body).map_err(|e| OidcError::NotReady(format!("JWKS: {e}")))?;
        tracing::info!(keys = keys.len(), "fetched provider signing keys");
        *self.keys.write().await = Arc::new(keys);
        Ok(())
    }

    /// Validates a Bearer JWT; an unknown kid triggers one (rate-limited) JWKS refetch.
    pub(crate) async fn validate_bearer(&self, token: &str) -> Result<Identity, JwtError> {
        let keys = self.keys.read().await.clone();
        match jwt::validate(&keys, &self.rules, token) {
            Err(JwtError::UnknownKey) => {
                if jwt::kid_of(token).is_some_and(|kid| !keys.has_kid(&kid)) || keys.is_empty() {
                    if self.discovered.read().await.is_none() {
                        let _ = self.discovered().await;
                    } else {
                        let _ = self.refresh_keys(false).await;
                    }
                    let keys = self.keys.read().await.clone();
                    return jwt::validate(&keys, &self.rules, token);
                }
                Err(JwtError::UnknownKey)
            }
            other => other,
        }
    }

    /// The provider URL to send a browser to, and the state to keep in the login cookie.
    pub(crate) async fn login_url(
        &self,
        redirect_uri: &str,
        return_to: String,
        exp: u64,
    ) -> Result<(String, LoginState), OidcError> {
        let d = self.discovered().await?;
        let redirect = RedirectUrl::new(redirect_uri.to_string()).map_err(|e| OidcError::Login(e.to_string()))?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = d.client.clone().set_redirect_uri(redirect);
        let mut req = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for s in self.cfg.scopes.iter().filter(|s| *s != "openid") {
            req = req.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = req.url();
        Ok((
            url.to_string(),
            LoginState {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                pkce_verifier: verifier.secret().clone(),
                return_to,
                redirect_uri: redirect_uri.to_string(),
                exp,
            },
        ))
    }

    /// Completes a login: exchanges the code (with the PKCE verifier), verifies the ID token (signature,
    /// issuer, audience, expiry, nonce) and returns who logged in, the raw ID token and the refresh token.
    pub(crate) async fn complete_login(&self, code: &str, login: &LoginState) -> Result<Login, OidcError> {
        let d = self.discovered().await?;
        let client = d.client.clone().set_redirect_uri(
            RedirectUrl::new(login.redirect_uri.clone()).map_err(|e| OidcError::Login(e.to_string()))?,
        );
        let resp = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| OidcError::Login(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(login.pkce_verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Login(error_chain(&e)))?;
        let id_token = resp
            .id_token()
            .ok_or_else(|| OidcError::Login("no id_token in the token response".into()))?
            .clone();
        let nonce = Nonce::new(login.nonce.clone());
        if let Err(first) = id_token.claims(&client.id_token_verifier(), &nonce) {
            // The provider may have rotated its keys since discovery: rediscover once and retry.
            tracing::info!(error = %first, "ID token did not verify; refreshing provider metadata");
            self.discover().await?;
            let d = self.discovered().await?;
            id_token
                .claims(&d.client.id_token_verifier(), &nonce)
                .map_err(|e| OidcError::Login(format!("ID token: {e}")))?;
        }
        let (mut identity, has_groups) = identity_from_verified(&id_token, &self.cfg.groups_attribute)?;
        if !has_groups {
            // Providers often put groups only in the access token (or only for a `groups` scope): when it
            // is a JWT that passes the same checks as a Bearer token, take the groups from there.
            match self.validate_bearer(resp.access_token().secret()).await {
                Ok(from_access) => identity.groups = from_access.groups,
                Err(e) => tracing::debug!(reason = e.reason(), "no groups in the ID token, access token unusable"),
            }
        }
        Ok(Login {
            identity,
            id_token: id_token.to_string(),
            refresh_token: resp.refresh_token().map(|t| t.secret().clone()),
        })
    }

    /// A form POST to a provider endpoint with the gate's client credentials (client_secret_basic:
    /// id and secret form-encoded first, RFC 6749 2.3.1).
    async fn client_post(&self, url: &str, form: &[(&str, &str)]) -> Result<http::Response<Vec<u8>>, OidcError> {
        use base64::Engine;
        let enc = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(&self.cfg.client_id),
            enc(&self.cfg.client_secret.0)
        ));
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let req = http::Request::post(url)
            .header(http::header::AUTHORIZATION, format!("Basic {basic}"))
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::ACCEPT, "application/json")
            .body(body.into_bytes())
            .map_err(|e| OidcError::SessionCheck(e.to_string()))?;
        self.http
            .exchange(req)
            .await
            .map_err(|e| OidcError::SessionCheck(e.to_string()))
    }

    /// Asks the provider whether the login behind `refresh_token` still stands: introspection when the
    /// provider offers it (no side effects), else a refresh grant (which may rotate the token).
    pub(crate) async fn check_session(&self, refresh_token: &str) -> Result<SessionCheck, OidcError> {
        let d = self.discovered().await?;
        if let Some(url) = &d.introspection {
            let resp = self
                .client_post(url, &[("token", refresh_token), ("token_type_hint", "refresh_token")])
                .await?;
            if !resp.status().is_success() {
                return Err(OidcError::SessionCheck(format!(
                    "introspection answered {}",
                    resp.status()
                )));
            }
            return introspection_verdict(resp.body(), &self.cfg.client_id)
                .ok_or_else(|| OidcError::SessionCheck("unreadable introspection answer".into()));
        }
        let rt = RefreshToken::new(refresh_token.to_string());
        let req = d
            .client
            .exchange_refresh_token(&rt)
            .map_err(|e| OidcError::SessionCheck(e.to_string()))?;
        match req.request_async(&self.http).await {
            Ok(resp) => Ok(SessionCheck::Active {
                refresh_token: resp.refresh_token().map(|t| t.secret().clone()),
            }),
            Err(RequestTokenError::ServerResponse(e))
                if matches!(
                    e.error(),
                    openidconnect::core::CoreErrorResponseType::InvalidGrant
                        | openidconnect::core::CoreErrorResponseType::UnauthorizedClient
                ) =>
            {
                Ok(SessionCheck::Ended)
            }
            Err(e) => Err(OidcError::SessionCheck(error_chain(&e))),
        }
    }

    /// Revokes a session's refresh token (RFC 7009), which ends the login's grant at the provider.
    /// Returns whether the provider confirmed it.
    pub(crate) async fn revoke(&self, refresh_token: &str) -> bool {
        let Ok(d) = self.discovered().await else { return false };
        let Some(url) = &d.revocation else { return false };
        match self
            .client_post(url, &[("token", refresh_token), ("token_type_hint", "refresh_token")])
            .await
        {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                tracing::warn!(status = %r.status(), "the provider refused to revoke a session's refresh token");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot revoke a session's refresh token");
                false
            }
        }
    }

    /// Where to send a browser on logout (the provider's end_session endpoint), if it has one.
    pub(crate) async fn logout_url(&self, id_token: Option<&str>, post_logout: &str) -> Option<String> {
        let d = self.discovered().await.ok()?;
        let end = d.end_session.clone()?;
        let mut req = LogoutRequest::from(openidconnect::EndSessionUrl::new(end).ok()?)
            .set_client_id(ClientId::new(self.cfg.client_id.clone()));
        if let Ok(u) = PostLogoutRedirectUrl::new(post_logout.to_string()) {
            req = req.set_post_logout_redirect_uri(u);
        }
        if let Some(t) = id_token.and_then(|t| t.parse::<CoreIdToken>().ok()) {
            req = req.set_id_token_hint(&t);
        }
        Some(req.http_get_url().to_string())
    }

    /// A client-credentials access token for the gate's own client (what Basic auth is exchanged for),
    /// cached until shortly before it expires.
    pub(crate) async fn client_credentials_token(&self) -> Result<String, OidcError> {
        let mut cached = self.cc_token.lock().await;
        if let Some((t, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let d = self.discovered().await?;
        let resp = d
            .client
            .exchange_client_credentials()
            .map_err(|e| OidcError::Token(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Token(error_chain(&e)))?;
        let token = resp.access_token().secret().clone();
        let lifetime = resp.expires_in().unwrap_or(Duration::from_secs(60));
        // Renew at 80% of the lifetime, so a cached token never expires in flight.
        *cached = Some((token.clone(), Instant::now() + lifetime.mul_f32(0.8)));
        Ok(token)
    }

    /// Forget the cached client-credentials token (it was refused).
    pub(crate) async fn drop_client_credentials_token(&self) {
        *self.cc_token.lock().await = None;
    }
}

/// Reads identity claims from an ID token that `openidconnect` has already verified (the groups claim
/// is not one of its typed claims).
fn identity_from_verified(token: &CoreIdToken, groups_attribute: &str) -> Result<(Identity, bool), OidcError> {
    use base64::Engine;
    let text = token.to_string();
    let payload = text
        .split('.')
        .nth(1)
        .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&b).ok())
        .ok_or_else(|| OidcError::Login("unreadable ID token claims".into()))?;
    let has_groups = payload.contains_key(groups_attribute);
    let identity = jwt::identity(&payload, groups_attribute).map_err(|e| OidcError::Login(e.to_string()))?;
    Ok((identity, has_groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn introspection_answers() {
        let v = |b: &str| introspection_verdict(b.as_bytes(), "mlflow");
        assert_eq!(
            v(r#"{"active":true,"client_id":"mlflow"}"#),
            Some(SessionCheck::Active { refresh_token: None })
        );
        assert_eq!(
            v(r#"{"active":true}"#),
            Some(SessionCheck::Active { refresh_token: None })
        );
        assert_eq!(v(r#"{"active":false}"#), Some(SessionCheck::Ended));
        assert_eq!(v(r#"{"active":true,"client_id":"other"}"#), Some(SessionCheck::Ended));
        // Anything unclear is an error (the caller fails closed), never a pass.
        for bad in [r#"{"active":"true"}"#, "{}", "not json", r#"{"active":1}"#] {
            assert_eq!(v(bad), None, "{bad}");
        }
    }
}
