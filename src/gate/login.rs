//! Browser sessions: the login redirect and callback, logout, the periodic re-check of a session
//! with the provider, and the origin (scheme and host) the browser used, as far as it is believed.
use std::collections::HashMap;
use std::net::SocketAddr;

use http::{Request, Response, StatusCode, header};

use super::session::{self, LOGIN_COOKIE, LoginState, SESSION_COOKIE, Session, SessionState};
use super::{
    Body, Gate, LOGIN_TTL_SECS, MAX_ENDED_SESSIONS, SessionConfirmed, config, detail, header_str, metrics, now_secs,
    oidc, proxy, redirect,
};

impl Gate {
    pub(super) fn session_ended_here(&self, sid: &str) -> bool {
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
    pub(super) async fn recheck_session(
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
    /// Whether `peer` is a front proxy whose X-Forwarded-* headers are believed.
    pub(super) fn trusted_proxy(&self, peer: SocketAddr) -> bool {
        self.cfg.trusted_proxies.contains(peer.ip())
    }

    /// The scheme the client used: X-Forwarded-Proto from a trusted proxy, else the gate's own (http).
    pub(super) fn client_proto(&self, headers: &http::HeaderMap, peer: SocketAddr) -> String {
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

    pub(super) async fn start_login(&self, req: &Request<Body>, peer: SocketAddr) -> Response<Body> {
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

    pub(super) async fn callback(&self, req: &Request<Body>, peer: SocketAddr) -> Response<Body> {
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
    pub(super) async fn logout(&self, req: &Request<Body>, peer: SocketAddr) -> Response<Body> {
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
}
