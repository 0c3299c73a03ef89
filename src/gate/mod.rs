//! The auth front end (`otlp-relay gate`): an OIDC reverse proxy in front of a stock mlflow server.
//! Browsers log in with the authorization-code flow and carry a sealed session cookie; programs send a
//! Bearer JWT (checked locally against the provider's keys) or Basic client credentials (exchanged for
//! a client-credentials token). Members of the configured groups reach MLflow, with READ / EDIT / MANAGE
//! per experiment from an optional permissions file; OIDC_EXCLUDE_PATHS pass without authentication.
//! Browser sessions are re-checked with the provider every GATE_SESSION_REFRESH; /gate/metrics is on
//! the admin listener only.
mod authorize;
pub mod authz;
pub mod canonical;
pub mod config;
pub mod graphql;
pub mod jwt;
pub mod metrics;
pub mod oidc;
pub mod proxy;
pub mod routes;
mod server;
pub mod session;
pub mod targets;

#[cfg(test)]
mod fuzz_tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::http_client::{HttpClient, error_chain};
use authz::{Decision, Experiment, Level, Policy, Visible};
use config::GateConfig;
use metrics::{GateMetrics, StatusLabel};
use oidc::Oidc;
use proxy::{Body, BoxError, full};
use session::{Identity, LOGIN_COOKIE, LoginState, SESSION_COOKIE, Sealer, Session, SessionState};

/// Largest JSON request body read to find the experiments it touches (MLflow API calls are small).
const MAX_INSPECTED_BODY: usize = 1 << 20;
/// Largest MLflow answer read to remove experiments the caller may not see (a search page).
const MAX_FILTERED_ANSWER: usize = 32 << 20;
const LOGIN_TTL_SECS: u64 = 600;
const NAME_CACHE_TTL: Duration = Duration::from_secs(60);
/// Bounds each provider call (discovery, JWKS, token) and MLflow look-up.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the admin listener (metrics, probes) keeps open at most.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Sessions logged out here, remembered until their cookie would expire (bounded).
const MAX_ENDED_SESSIONS: usize = 100_000;

/// Binds, logs `listening component=gate addr=...` (and `component=gate-admin` for the admin listener),
/// and serves until `cancel`.
pub async fn run(cfg: GateConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let admin = match cfg.admin_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("GATE_ADMIN_LISTEN {a}: {e}"))?,
        ),
        None => None,
    };
    let gate = Arc::new(Gate::new(cfg)?);
    tracing::info!(component = %"gate", addr = %addr, upstream = %gate.cfg.upstream, "listening");
    if gate.cfg.secret_key.is_none() {
        tracing::warn!("SECRET_KEY is not set: sessions use a random key and end when the gate restarts");
    }
    if gate.cfg.redirect_uri.is_none() && gate.cfg.allowed_hosts.is_empty() && gate.cfg.trusted_proxies.is_empty() {
        tracing::warn!(
            "browser login is off: set OIDC_REDIRECT_URI (or GATE_ALLOWED_HOSTS / GATE_TRUSTED_PROXIES) to enable it"
        );
    }

    // The provider may come up after us: keep trying discovery in the background.
    let g = gate.clone();
    let c = cancel.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        loop {
            match g.oidc.discover().await {
                Ok(()) => {
                    tracing::info!(issuer = %g.cfg.issuer, "identity provider discovered");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?wait, "identity provider discovery failed"),
            }
            tokio::select! {
                _ = c.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    });

    let limits = server::Limits {
        max_connections: gate.cfg.max_connections,
        header_read_timeout: gate.cfg.header_read_timeout,
        idle_timeout: gate.cfg.idle_timeout,
        body_read_timeout: gate.cfg.body_read_timeout,
    };
    let admin_task = admin.map(|l| {
        let g = gate.clone();
        if let Ok(a) = l.local_addr() {
            tracing::info!(component = %"gate-admin", addr = %a, "listening");
        }
        let limits = server::Limits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..limits
        };
        tokio::spawn(server::serve(
            l,
            "admin",
            limits,
            gate.metrics.clone(),
            cancel.clone(),
            move |req, _peer| {
                let g = g.clone();
                async move { g.admin(req).await }
            },
        ))
    });
    let g = gate.clone();
    server::serve(
        listener,
        "public",
        limits,
        gate.metrics.clone(),
        cancel.clone(),
        move |req, peer| {
            let g = g.clone();
            async move { g.handle(req, peer).await }
        },
    )
    .await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    Ok(())
}

/// Set on a request (never by a client: extensions are not on the wire) whose session cookie the
/// provider has just confirmed.
#[derive(Clone, Copy)]
struct SessionConfirmed;

enum Auth {
    Ok(Identity),
    Missing,
    Invalid { reason: &'static str, detail: &'static str },
    Unavailable(String),
}

pub struct Gate {
    cfg: Arc<GateConfig>,
    policy: Policy,
    sealer: Sealer,
    oidc: Oidc,
    /// Provider calls and MLflow look-ups (buffered, bounded).
    http: HttpClient,
    /// The proxied requests (streamed).
    upstream: proxy::UpstreamClient,
    metrics: Arc<GateMetrics>,
    /// Session id → unix expiry, of sessions logged out through this replica (others learn it from
    /// the provider at their next check).
    ended_sessions: std::sync::Mutex<HashMap<String, u64>>,
    /// Session id → unix time the provider last confirmed it here: a cookie the browser has not
    /// replaced yet (parallel requests, replays) is not checked again within the interval.
    confirmed_sessions: std::sync::Mutex<HashMap<String, u64>>,
    names: Mutex<HashMap<String, (String, Instant)>>,
    /// Run / logged-model id → experiment id.
    owners: Mutex<authorize::Owners>,
    upstream_scheme: String,
    upstream_authority: String,
}

fn query_value(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

/// Reads a whole body of at most `limit` bytes (None: larger, or the client broke off).
async fn read_limited(mut body: Body, limit: usize) -> Option<Bytes> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() + data.len() > limit {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(buf.freeze())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn detail(status: StatusCode, text: &str) -> Response<Body> {
    json(status, serde_json::json!({ "detail": text }))
}

fn redirect(location: &str, cookies: &[String]) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    let headers = r.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, v);
    }
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            headers.append(header::SET_COOKIE, v);
        }
    }
    r
}

fn header_str(req: &Request<Body>, name: impl http::header::AsHeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A page navigation (gets a login redirect) rather than an API call (gets 401 JSON).
fn is_browser_navigation(req: &Request<Body>) -> bool {
    let path = req.uri().path();
    let api = ["/api/", "/ajax-api/", "/v1/", "/graphql"]
        .iter()
        .any(|p| path.starts_with(p));
    let html = header_str(req, header::ACCEPT).is_some_and(|a| a.contains("text/html"));
    matches!(*req.method(), Method::GET | Method::HEAD) && html && !api
}

impl Gate {
    pub fn new(cfg: GateConfig) -> Result<Gate, crate::tls::TlsError> {
        let cfg = Arc::new(cfg);
        // Trust roots only when something is reached over https (none found is an error).
        let https = crate::http_client::any_https([cfg.discovery_url.as_str(), &cfg.upstream.to_string()]);
        let tls = crate::tls::client_config(&Default::default(), https)?;
        let http = HttpClient::new(&Default::default(), https, PROVIDER_TIMEOUT)?;
        let upstream = crate::http_client::pooled(tls, UPSTREAM_CONNECT_TIMEOUT, Duration::from_secs(60));
        let sealer = match &cfg.secret_key {
            Some(k) => Sealer::new(k.0.as_bytes()),
            None => Sealer::random(),
        };
        let upstream_scheme = cfg.upstream.scheme_str().unwrap_or("http").to_string();
        let upstream_authority = cfg.upstream.authority().map(|a| a.to_string()).unwrap_or_default();
        Ok(Gate {
            policy: cfg.policy(),
            oidc: Oidc::new(cfg.clone(), http.clone()),
            sealer,
            http,
            upstream,
            metrics: Arc::new(GateMetrics::new()),
            ended_sessions: std::sync::Mutex::new(HashMap::new()),
            confirmed_sessions: std::sync::Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            upstream_scheme,
            upstream_authority,
            cfg,
        })
    }

    async fn handle(self: Arc<Self>, req: Request<Body>, peer: SocketAddr) -> Response<Body> {
        let (req, set_cookie) = match self.recheck_session(req, peer).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        let route: std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send + '_>> =
            Box::pin(self.route(req, peer));
        let mut resp = route.await;
        if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        self.metrics
            .requests
            .get_or_create(&StatusLabel {
                status: resp.status().as_u16(),
            })
            .inc();
        resp
    }

    /// The admin listener: metrics and the probes, nothing else.
    async fn admin(&self, req: Request<Body>) -> Response<Body> {
        match req.uri().path() {
            "/gate/metrics" => {
                let mut r = Response::new(full(self.metrics.encode()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                r
            }
            "/gate/healthz" | "/gate/readyz" => self.probe(req.uri().path()).await,
            _ => detail(StatusCode::NOT_FOUND, "Not found"),
        }
    }

    async fn probe(&self, path: &str) -> Response<Body> {
        let ready = self.oidc.is_ready().await;
        if path == "/gate/healthz" {
            return json(StatusCode::OK, serde_json::json!({"status": "ok", "oidc_ready": ready}));
        }
        // Ready once the provider is discovered: before that no login or token check can succeed.
        if ready {
            json(StatusCode::OK, serde_json::json!({"status": "ready"}))
        } else {
            detail(StatusCode::SERVICE_UNAVAILABLE, "Identity provider not discovered yet")
        }
    }

    fn session_ended_here(&self, sid: &str) -> bool {
        self.ended_sessions.lock().map(|m| m.contains_key(sid)).unwrap_or(true)
    }

    /// When the provider last confirmed session `sid` on this replica, if within the interval.
    fn confirmed_here(&self, sid: &str, now: u64) -> Option<u64> {
        if sid.is_empty() {
            return None;
        }
        let refresh = self.cfg.session_refresh.as_secs();
        let m = self.confirmed_sessions.lock().ok()?;
        m.get(sid)
            .copied()
            .filter(|t| now < t.saturating_add(refresh) && *t <= now)
    }

    fn confirm_here(&self, sid: &str, now: u64) {
        if sid.is_empty() {
            return;
        }
        let Ok(mut m) = self.confirmed_sessions.lock() else {
            return;
        };
        if m.len() >= MAX_ENDED_SESSIONS {
            let refresh = self.cfg.session_refresh.as_secs();
            m.retain(|_, t| now < t.saturating_add(refresh));
        }
        if m.len() < MAX_ENDED_SESSIONS {
            m.insert(sid.to_string(), now);
        }
    }

    fn end_session_here(&self, s: &Session) {
        let Ok(mut m) = self.ended_sessions.lock() else { return };
        let now = now_secs();
        if m.len() >= MAX_ENDED_SESSIONS {
            m.retain(|_, exp| *exp > now);
        }
        if m.len() < MAX_ENDED_SESSIONS {
            m.insert(s.sid.clone(), s.exp);
        } else {
            // The provider-side revocation still ends it within GATE_SESSION_REFRESH.
            tracing::warn!("too many ended sessions remembered; relying on the provider alone");
        }
    }

    /// Before routing: a session cookie due for its check is checked with the provider. Still valid:
    /// the request goes on with a re-sealed cookie (also set on the answer). Ended (logout, revoked,
    /// user disabled): the cookie is removed from the request and cleared in the browser, so the
    /// request is treated as not logged in. Provider unreachable: 503, never a pass.
    async fn recheck_session(
        &self,
        mut req: Request<Body>,
        peer: SocketAddr,
    ) -> Result<(Request<Body>, Option<String>), Response<Body>> {
        // Only where the session is what authenticates: not the gate's own paths (probes, login,
        // logout must work with the provider down), excluded paths, or requests with credentials.
        let path = req.uri().path();
        if path.starts_with("/gate/")
            || path == self.cfg.callback_path
            || path == "/logout"
            || self.cfg.is_excluded(path)
            || req.headers().contains_key(header::AUTHORIZATION)
        {
            return Ok((req, None));
        }
        let Some(session) = header_str(&req, header::COOKIE)
            .and_then(|c| session::cookie(c, SESSION_COOKIE))
            .and_then(|c| self.sealer.open::<Session>(SESSION_COOKIE, c))
        else {
            return Ok((req, None));
        };
        let now = now_secs();
        let secure = self.secure_cookies(&req, peer);
        let ended = |mut req: Request<Body>| {
            session::remove_cookie(req.headers_mut(), SESSION_COOKIE);
            (req, Some(session::clear_cookie(SESSION_COOKIE, secure)))
        };
        if self.session_ended_here(&session.sid) {
            return Ok(ended(req));
        }
        match session::session_state(&session, now, self.cfg.session_refresh.as_secs()) {
            SessionState::Fresh => return Ok((req, None)),
            SessionState::Expired => return Ok(ended(req)),
            SessionState::Due => {}
        }
        if let Some(at) = self.confirmed_here(&session.sid, now) {
            // Confirmed here moments ago (the browser still sends the previous cookie): pass it on
            // as confirmed then, without asking again.
            let renewed = Session { checked: at, ..session };
            let sealed = self.sealer.seal(SESSION_COOKIE, &renewed);
            session::replace_cookie(req.headers_mut(), SESSION_COOKIE, &sealed);
            req.extensions_mut().insert(SessionConfirmed);
            return Ok((req, Some(session::set_cookie(SESSION_COOKIE, &sealed, secure))));
        }
        let Some(rt) = session.refresh_token.clone() else {
            // Nothing to ask the provider with: the session cannot be confirmed, so it ends.
            self.metrics
                .session_checks
                .get_or_create(&metrics::ResultLabel { result: "ended" })
                .inc();
            return Ok(ended(req));
        };
        match self.oidc.check_session(&rt).await {
            Ok(oidc::SessionCheck::Active { refresh_token }) => {
                self.metrics
                    .session_checks
                    .get_or_create(&metrics::ResultLabel { result: "active" })
                    .inc();
                self.confirm_here(&session.sid, now);
                let renewed = Session {
                    checked: now,
                    refresh_token: refresh_token.or(Some(rt)),
                    ..session
                };
                let sealed = self.sealer.seal(SESSION_COOKIE, &renewed);
                session::replace_cookie(req.headers_mut(), SESSION_COOKIE, &sealed);
                req.extensions_mut().insert(SessionConfirmed);
                Ok((req, Some(session::set_cookie(SESSION_COOKIE, &sealed, secure))))
            }
            Ok(oidc::SessionCheck::Ended) => {
                self.metrics
                    .session_checks
                    .get_or_create(&metrics::ResultLabel { result: "ended" })
                    .inc();
                self.metrics.auth_failure("session_ended");
                tracing::info!(user = %session.identity.user, "browser session ended at the identity provider");
                // Replays of this cookie are refused here without asking the provider again.
                self.end_session_here(&session);
                Ok(ended(req))
            }
            Err(e) => {
                self.metrics
                    .session_checks
                    .get_or_create(&metrics::ResultLabel { result: "error" })
                    .inc();
                self.metrics.auth_failure("provider_unavailable");
                tracing::warn!(error = %e, "cannot check a browser session with the identity provider");
                Err(detail(StatusCode::SERVICE_UNAVAILABLE, "Identity provider unavailable"))
            }
        }
    }

    async fn route(&self, mut req: Request<Body>, peer: SocketAddr) -> Response<Body> {
        // Everything from here on (excluded paths too) sees, and MLflow gets, the canonical path.
        let canon = match canonical::path(req.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.auth_failure("bad_request");
                return detail(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
        let path = canon.decoded();
        let pq = match req.uri().query() {
            Some(q) => format!("{}?{q}", canon.encoded()),
            None => canon.encoded(),
        };
        match pq.parse() {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => return detail(StatusCode::BAD_REQUEST, "Invalid request target"),
        }
        if path == "/gate/healthz" || path == "/gate/readyz" {
            return self.probe(&path).await;
        }
        if path == "/gate/metrics" {
            // Served on the admin listener (GATE_ADMIN_LISTEN) only.
            return detail(StatusCode::NOT_FOUND, "Not found");
        }
        if path == self.cfg.callback_path {
            return self.callback(&req, peer).await;
        }
        if path == "/logout" {
            return self.logout(&req, peer).await;
        }
        if self.cfg.is_excluded(&path) {
            return self.forward(req, None, peer).await;
        }
        let identity = match self.authenticate(&req).await {
            Auth::Ok(id) => id,
            Auth::Missing if is_browser_navigation(&req) => return self.start_login(&req, peer).await,
            Auth::Missing => {
                self.metrics.auth_failure("missing");
                let mut r = detail(StatusCode::UNAUTHORIZED, "Authentication required");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer, Basic realm=\"mlflow\""),
                );
                return r;
            }
            Auth::Invalid { reason, detail: d } => {
                self.metrics.auth_failure(reason);
                let mut r = detail(StatusCode::UNAUTHORIZED, d);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                return r;
            }
            Auth::Unavailable(e) => {
                self.metrics.auth_failure("provider_unavailable");
                tracing::warn!(error = %e, "cannot authenticate: identity provider unavailable");
                return detail(StatusCode::SERVICE_UNAVAILABLE, "Identity provider unavailable");
            }
        };

        self.authorize(req, &canon, identity, peer).await
    }

    /// MLflow's JSON answer without the experiments `groups` may not read (see `authz::visible`).
    async fn readable_part(&self, resp: Response<Body>, groups: &[String]) -> Response<Body> {
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/json"));
        if !resp.status().is_success() || !is_json {
            return resp;
        }
        if resp.headers().contains_key(header::CONTENT_ENCODING) {
            return detail(
                StatusCode::BAD_GATEWAY,
                "MLflow answered encoded; cannot apply permissions",
            );
        }
        let (mut parts, body) = resp.into_parts();
        let Some(bytes) = read_limited(body, MAX_FILTERED_ANSWER).await else {
            return detail(
                StatusCode::BAD_GATEWAY,
                "MLflow's answer is too large to apply permissions",
            );
        };
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Response::from_parts(parts, full(bytes));
        };
        let readable =
            |e: &Experiment| self.policy.decide(groups, Level::Read, std::slice::from_ref(e)) == Decision::Allow;
        match authz::visible(answer, readable) {
            Visible::All => Response::from_parts(parts, full(bytes)),
            Visible::Filtered(answer) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, full(serde_json::to_vec(&answer).unwrap_or_default()))
            }
            Visible::Denied(id) => {
                self.metrics.auth_failure("permission");
                let decision = Decision::Missing {
                    need: Level::Read,
                    experiment: Some(id),
                };
                detail(StatusCode::FORBIDDEN, &decision.detail())
            }
        }
    }

    async fn authenticate(&self, req: &Request<Body>) -> Auth {
        if let Some(value) = header_str(req, header::AUTHORIZATION) {
            let (scheme, cred) = value.split_once(' ').unwrap_or((value, ""));
            let cred = cred.trim();
            if scheme.eq_ignore_ascii_case("bearer") {
                return match self.oidc.validate_bearer(cred).await {
                    Ok(id) => Auth::Ok(id),
                    Err(e) => {
                        tracing::debug!(reason = e.reason(), "bearer token refused");
                        Auth::Invalid {
                            reason: e.reason(),
                            detail: "Invalid token",
                        }
                    }
                };
            }
            if scheme.eq_ignore_ascii_case("basic") {
                return self.authenticate_basic(cred).await;
            }
            return Auth::Invalid {
                reason: "scheme",
                detail: "Unsupported authorization scheme",
            };
        }
        let cookie = header_str(req, header::COOKIE).and_then(|c| session::cookie(c, SESSION_COOKIE));
        // recheck_session has confirmed (and re-sealed) a due session before this point.
        if let Some(s) = cookie.and_then(|c| self.sealer.open::<Session>(SESSION_COOKIE, c))
            && match session::session_state(&s, now_secs(), self.cfg.session_refresh.as_secs()) {
                SessionState::Fresh => true,
                // Just confirmed by recheck_session (the provider call may have crossed the due time).
                SessionState::Due => req.extensions().get::<SessionConfirmed>().is_some(),
                SessionState::Expired => false,
            }
            && !self.session_ended_here(&s.sid)
        {
            return Auth::Ok(s.identity);
        }
        Auth::Missing
    }

    /// Basic with the gate's client id and secret (what MLFLOW_TRACKING_USERNAME/PASSWORD carry) is
    /// exchanged for the client's own client-credentials token, then treated like that Bearer token.
    async fn authenticate_basic(&self, cred: &str) -> Auth {
        use base64::Engine;
        let invalid = Auth::Invalid {
            reason: "basic_credentials",
            detail: "Invalid credentials",
        };
        let Some(decoded) = base64::engine::general_purpose::STANDARD
            .decode(cred)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        else {
            return invalid;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return invalid;
        };
        let user_ok = user == self.cfg.client_id;
        let pass_ok =
            aws_lc_rs::constant_time::verify_slices_are_equal(password.as_bytes(), self.cfg.client_secret.0.as_bytes())
                .is_ok();
        if !(user_ok && pass_ok) {
            tracing::debug!(user_ok, "basic credentials refused");
            return invalid;
        }
        let token = match self.oidc.client_credentials_token().await {
            Ok(t) => t,
            Err(e) => return Auth::Unavailable(e.to_string()),
        };
        match self.oidc.validate_bearer(&token).await {
            Ok(id) => Auth::Ok(id),
            Err(e) => {
                self.oidc.drop_client_credentials_token().await;
                tracing::warn!(reason = e.reason(), "the client-credentials token was refused");
                Auth::Invalid {
                    reason: e.reason(),
                    detail: "Invalid token",
                }
            }
        }
    }

    /// Whether `peer` is a front proxy whose X-Forwarded-* headers are believed.
    fn trusted_proxy(&self, peer: SocketAddr) -> bool {
        self.cfg.trusted_proxies.contains(peer.ip())
    }

    /// The scheme the client used: X-Forwarded-Proto from a trusted proxy, else the gate's own (http).
    fn client_proto(&self, headers: &http::HeaderMap, peer: SocketAddr) -> String {
        if self.trusted_proxy(peer) {
            proxy::client_proto(headers)
        } else {
            "http".into()
        }
    }

    /// `<proto>://<host>` the browser used, when it can be believed: X-Forwarded-Proto/-Host (else
    /// Host) from a trusted proxy, or a Host listed in GATE_ALLOWED_HOSTS. Anything else: None, so
    /// a client cannot steer redirect URIs with its headers.
    fn public_origin(&self, req: &Request<Body>, peer: SocketAddr) -> Option<String> {
        let proto = self.client_proto(req.headers(), peer);
        let host = if self.trusted_proxy(peer) {
            header_str(req, "x-forwarded-host")
                .and_then(|h| h.split(',').next())
                .map(str::trim)
                .or_else(|| header_str(req, header::HOST))?
        } else {
            header_str(req, header::HOST).filter(|h| config::host_allowed(&self.cfg.allowed_hosts, h))?
        };
        // A Host is an authority, nothing more: refuse anything that could change the URL's meaning.
        let ok = !host.is_empty() && host.parse::<http::uri::Authority>().is_ok() && !host.contains('@');
        ok.then(|| format!("{proto}://{host}"))
    }

    fn redirect_uri(&self, req: &Request<Body>, peer: SocketAddr) -> Option<String> {
        match &self.cfg.redirect_uri {
            Some(r) => Some(r.clone()),
            None => self
                .public_origin(req, peer)
                .map(|o| format!("{o}{}", self.cfg.callback_path)),
        }
    }

    fn secure_cookies(&self, req: &Request<Body>, peer: SocketAddr) -> bool {
        self.client_proto(req.headers(), peer) == "https"
            || self
                .cfg
                .redirect_uri
                .as_deref()
                .is_some_and(|r| r.starts_with("https:"))
    }

    async fn start_login(&self, req: &Request<Body>, peer: SocketAddr) -> Response<Body> {
        let Some(redirect_uri) = self.redirect_uri(req, peer) else {
            self.metrics.auth_failure("untrusted_host");
            return detail(
                StatusCode::BAD_REQUEST,
                "Browser login needs OIDC_REDIRECT_URI, this Host in GATE_ALLOWED_HOSTS, or a proxy in GATE_TRUSTED_PROXIES",
            );
        };
        let return_to = session::safe_return_path(req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
        match self
            .oidc
            .login_url(&redirect_uri, return_to, now_secs() + LOGIN_TTL_SECS)
            .await
        {
            Ok((url, state)) => {
                let sealed = self.sealer.seal(LOGIN_COOKIE, &state);
                redirect(
                    &url,
                    &[session::set_cookie(
                        LOGIN_COOKIE,
                        &sealed,
                        self.secure_cookies(req, peer),
                    )],
                )
            }
            Err(e) => {
                self.metrics.auth_failure("provider_unavailable");
                tracing::warn!(error = %e, "cannot start a login");
                detail(StatusCode::SERVICE_UNAVAILABLE, "Identity provider unavailable")
            }
        }
    }

    async fn callback(&self, req: &Request<Body>, peer: SocketAddr) -> Response<Body> {
        let params: HashMap<String, String> = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
        if let Some(err) = params.get("error") {
            self.metrics.auth_failure("login_error");
            let text = format!(
                "Login failed at the identity provider: {}",
                err.chars().take(100).collect::<String>()
            );
            return detail(StatusCode::UNAUTHORIZED, &text);
        }
        let login = header_str(req, header::COOKIE)
            .and_then(|c| session::cookie(c, LOGIN_COOKIE))
            .and_then(|c| self.sealer.open::<LoginState>(LOGIN_COOKIE, c))
            .filter(|l| l.exp > now_secs());
        let (Some(login), Some(code), Some(state)) = (login, params.get("code"), params.get("state")) else {
            self.metrics.auth_failure("login_state");
            return detail(
                StatusCode::BAD_REQUEST,
                "Login expired or not started here; open the page again",
            );
        };
        if aws_lc_rs::constant_time::verify_slices_are_equal(state.as_bytes(), login.state.as_bytes()).is_err() {
            self.metrics.auth_failure("login_state");
            return detail(StatusCode::BAD_REQUEST, "Login state mismatch; open the page again");
        }
        match self.oidc.complete_login(code, &login).await {
            Ok(done) => {
                tracing::info!(user = %done.identity.user, "browser login");
                let now = now_secs();
                let s = Session {
                    identity: done.identity,
                    exp: now + self.cfg.session_ttl_secs,
                    id_token: Some(done.id_token),
                    sid: session::new_sid(),
                    refresh_token: done.refresh_token,
                    checked: now,
                };
                let secure = self.secure_cookies(req, peer);
                let sealed = self.sealer.seal(SESSION_COOKIE, &s);
                redirect(
                    &session::safe_return_path(&login.return_to),
                    &[
                        session::set_cookie(SESSION_COOKIE, &sealed, secure),
                        session::clear_cookie(LOGIN_COOKIE, secure),
                    ],
                )
            }
            Err(e) => {
                self.metrics.auth_failure("login");
                tracing::warn!(error = %e, "login failed");
                detail(StatusCode::UNAUTHORIZED, "Login failed")
            }
        }
    }

    /// Ends the session here at once, at the provider (its refresh token revoked, so every replica
    /// refuses the cookie at its next check), and sends the browser to the provider's end_session.
    async fn logout(&self, req: &Request<Body>, peer: SocketAddr) -> Response<Body> {
        let secure = self.secure_cookies(req, peer);
        let session = header_str(req, header::COOKIE)
            .and_then(|c| session::cookie(c, SESSION_COOKIE))
            .and_then(|c| self.sealer.open::<Session>(SESSION_COOKIE, c));
        let mut id_token = None;
        if let Some(s) = session {
            self.end_session_here(&s);
            if let Some(rt) = &s.refresh_token
                && !self.oidc.revoke(rt).await
            {
                tracing::warn!(user = %s.identity.user, "logout: the provider did not confirm the revocation");
            }
            tracing::info!(user = %s.identity.user, "browser logout");
            id_token = s.id_token;
        }
        let after = self
            .public_origin(req, peer)
            .map(|o| format!("{o}/"))
            .or_else(|| {
                let r = url::Url::parse(self.cfg.redirect_uri.as_deref()?).ok()?;
                Some(format!("{}/", r.origin().ascii_serialization()))
            })
            .unwrap_or_else(|| "/".into());
        let target = self
            .oidc
            .logout_url(id_token.as_deref(), &after)
            .await
            .unwrap_or_else(|| "/".into());
        redirect(&target, &[session::clear_cookie(SESSION_COOKIE, secure)])
    }

    /// GET an MLflow API path as the gate itself (for look-ups that authorization needs).
    async fn upstream_json(&self, path_and_query: &str) -> Option<serde_json::Value> {
        let uri = format!("{}://{}{path_and_query}", self.upstream_scheme, self.upstream_authority);
        let req = http::Request::get(uri)
            .header(header::HOST, &self.upstream_authority)
            .body(Vec::new())
            .ok()?;
        let resp = self.http.exchange(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        serde_json::from_slice(resp.body()).ok()
    }

    async fn experiment_name(&self, id: &str) -> Option<String> {
        if let Some((n, at)) = self.names.lock().await.get(id)
            && at.elapsed() < NAME_CACHE_TTL
        {
            return Some(n.clone());
        }
        let v = self
            .upstream_json(&format!(
                "/api/2.0/mlflow/experiments/get?experiment_id={}",
                query_value(id)
            ))
            .await?;
        let name = v.pointer("/experiment/name")?.as_str()?.to_string();
        let mut names = self.names.lock().await;
        if names.len() > 10_000 {
            names.clear();
        }
        names.insert(id.to_string(), (name.clone(), Instant::now()));
        Some(name)
    }

    async fn forward(&self, req: Request<Body>, identity: Option<&Identity>, peer: SocketAddr) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = format!("{}://{}{}", self.upstream_scheme, self.upstream_authority, pq);
        parts.uri = match uri.parse() {
            Ok(u) => u,
            Err(_) => return detail(StatusCode::BAD_REQUEST, "Invalid request target"),
        };
        parts.version = http::Version::HTTP_11;
        let proto = self.client_proto(&parts.headers, peer);
        if !self.trusted_proxy(peer) {
            // Only a trusted proxy's chain is passed on; anyone else's would be believed by MLflow.
            for h in [
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "x-forwarded-port",
                "x-forwarded-prefix",
                "x-real-ip",
                "forwarded",
            ] {
                parts.headers.remove(h);
            }
        }
        proxy::upstream_request_headers(&mut parts.headers, identity, peer, &self.upstream_authority, &proto);
        let started = Instant::now();
        match self.upstream.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                self.metrics.upstream_seconds.observe(started.elapsed().as_secs_f64());
                let (mut parts, body) = resp.into_parts();
                proxy::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
            }
            Err(e) if server::is_body_timeout(&e) => {
                tracing::info!(%peer, "request body too slow; answered 408");
                detail(StatusCode::REQUEST_TIMEOUT, "Request body too slow")
            }
            Err(e) => {
                let why = error_chain(&e);
                tracing::warn!(error = %why, upstream = %self.upstream_authority, "MLflow upstream unavailable");
                // The cause (addresses, resolver and TLS errors) is for the log, not for the client.
                detail(StatusCode::BAD_GATEWAY, "MLflow upstream unavailable")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str, accept: Option<&str>) -> Request<Body> {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(a) = accept {
            b = b.header(header::ACCEPT, a);
        }
        b.body(full(Bytes::new())).unwrap()
    }

    #[test]
    fn navigations_get_a_login_redirect_api_calls_a_401() {
        let html = Some("text/html,application/xhtml+xml,*/*;q=0.8");
        assert!(is_browser_navigation(&req(Method::GET, "/", html)));
        assert!(is_browser_navigation(&req(Method::GET, "/#/experiments/1", html)));
        assert!(!is_browser_navigation(&req(Method::GET, "/", Some("application/json"))));
        assert!(!is_browser_navigation(&req(Method::GET, "/", None)));
        assert!(!is_browser_navigation(&req(Method::POST, "/", html)));
        assert!(!is_browser_navigation(&req(
            Method::GET,
            "/ajax-api/2.0/mlflow/experiments/search",
            html
        )));
        assert!(!is_browser_navigation(&req(Method::GET, "/v1/traces", html)));
    }
}
