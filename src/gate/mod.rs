//! The auth front end (`otlp-relay gate`): an OIDC reverse proxy in front of a stock mlflow server.
//! Browsers log in with the authorization-code flow and carry a sealed session cookie; programs send a
//! Bearer JWT (checked locally against the provider's keys) or Basic client credentials (exchanged for
//! a client-credentials token). Members of the configured groups reach MLflow, with READ / EDIT / MANAGE
//! per experiment from an optional permissions file; OIDC_EXCLUDE_PATHS pass without authentication.
//! Browser sessions are re-checked with the provider every GATE_SESSION_REFRESH; /gate/metrics is on
//! the admin listener only.
mod authenticate;
mod authorize;
pub(crate) mod authz;
pub mod canonical;
pub mod config;
pub(crate) mod graphql;
pub(crate) mod jwt;
mod login;
pub(crate) mod metrics;
pub(crate) mod oidc;
pub(crate) mod proxy;
pub mod routes;
mod server;
pub(crate) mod session;
pub(crate) mod targets;
mod upstream;

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

use crate::http_client::HttpClient;
use authenticate::Auth;
use authz::Policy;
use config::{GateConfig, TraceWriteConnections};
use metrics::{GateMetrics, StatusLabel};
use oidc::Oidc;
use proxy::{Body, full};
use session::Sealer;

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
pub(crate) async fn run(cfg: GateConfig, cancel: CancellationToken) -> anyhow::Result<()> {
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
pub(crate) struct Gate {
    cfg: Arc<GateConfig>,
    policy: Policy,
    sealer: Sealer,
    oidc: Oidc,
    /// Provider calls and MLflow look-ups (buffered, bounded).
    http: HttpClient,
    /// The proxied requests (streamed).
    upstream: proxy::UpstreamClient,
    /// OTLP trace writes: a client without idle connections (a new connection per write) unless
    /// GATE_TRACE_WRITE_CONNECTIONS=pooled, then `upstream` itself (see [`TraceWriteConnections`]).
    trace_writes: proxy::UpstreamClient,
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
    pub(crate) fn new(cfg: GateConfig) -> Result<Gate, crate::tls::TlsError> {
        let cfg = Arc::new(cfg);
        // Trust roots only when something is reached over https (none found is an error).
        let https = crate::http_client::any_https([cfg.discovery_url.as_str(), &cfg.upstream.to_string()]);
        let tls = crate::tls::client_config(&Default::default(), https)?;
        let http = HttpClient::new(&Default::default(), https, PROVIDER_TIMEOUT)?;
        let upstream = crate::http_client::pooled(
            tls.clone(),
            UPSTREAM_CONNECT_TIMEOUT,
            crate::http_client::KeepAlive(Some(Duration::from_secs(60))),
        );
        let trace_writes = match cfg.trace_write_connections {
            TraceWriteConnections::PerRequest => {
                crate::http_client::pooled(tls, UPSTREAM_CONNECT_TIMEOUT, crate::http_client::KeepAlive(None))
            }
            TraceWriteConnections::Pooled => upstream.clone(),
        };
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
            trace_writes,
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
