//! Who is asking: a Bearer JWT, Basic client credentials (exchanged for a token), or a session cookie.
use http::{Request, header};

use super::session::{self, Identity, SESSION_COOKIE, Session, SessionState};
use super::{Body, Gate, SessionConfirmed, header_str, now_secs};

pub(super) enum Auth {
    Ok(Identity),
    Missing,
    Invalid { reason: &'static str, detail: &'static str },
    Unavailable(String),
}
impl Gate {
    pub(super) async fn authenticate(&self, req: &Request<Body>) -> Auth {
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
}
