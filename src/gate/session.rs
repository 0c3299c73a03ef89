//! Browser session state in cookies: sealed with AES-256-GCM (encrypted and authenticated, so a client
//! can neither read nor forge it) under a key derived from SECRET_KEY; when a session is due for its
//! re-check with the provider; plus return-path validation.
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub(crate) const SESSION_COOKIE: &str = "gate_session";
pub(crate) const LOGIN_COOKIE: &str = "gate_login";

/// Who is logged in, carried in the session cookie.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) user: String,
    pub(crate) email: Option<String>,
    pub(crate) groups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Session {
    pub(crate) identity: Identity,
    /// Unix seconds after which the cookie is refused.
    pub(crate) exp: u64,
    /// For the provider's end_session (id_token_hint).
    pub(crate) id_token: Option<String>,
    /// Random id, to end this session on this replica at once on /logout.
    #[serde(default)]
    pub(crate) sid: String,
    /// What the gate asks the provider about (introspection, or a refresh grant) to learn whether the
    /// login still stands; also revoked on /logout.
    #[serde(default)]
    pub(crate) refresh_token: Option<String>,
    /// Unix seconds of the last check with the provider (the login itself is one).
    #[serde(default)]
    pub(crate) checked: u64,
}

/// Where a session stands at `now` (unix seconds), given the re-check interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionState {
    Expired,
    /// Checked with the provider less than `refresh` ago: usable as is.
    Fresh,
    /// Must be checked with the provider before it is used again.
    Due,
}

pub(crate) fn session_state(s: &Session, now: u64, refresh_secs: u64) -> SessionState {
    if s.exp <= now {
        return SessionState::Expired;
    }
    // A check stamped in the future (another replica's clock ahead) is believed up to one interval
    // ahead, so a bad clock cannot stretch a session beyond one more interval.
    let ahead = s.checked > now.saturating_add(refresh_secs);
    if ahead || now >= s.checked.saturating_add(refresh_secs) {
        SessionState::Due
    } else {
        SessionState::Fresh
    }
}

/// A new random session id.
#[expect(clippy::expect_used, reason = "without system randomness no session can be safe")]
pub(crate) fn new_sid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("system randomness");
    URL_SAFE_NO_PAD.encode(b)
}

/// What the gate must remember between sending the browser to the provider and its return.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LoginState {
    pub(crate) state: String,
    pub(crate) nonce: String,
    pub(crate) pkce_verifier: String,
    pub(crate) return_to: String,
    pub(crate) redirect_uri: String,
    pub(crate) exp: u64,
}

/// Seals and opens cookie values. The cookie name is bound in as associated data, so a value cannot be
/// moved from one cookie to another.
pub(crate) struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    #[expect(clippy::expect_used, reason = "32 bytes is a valid HKDF-SHA256 output length")]
    pub(crate) fn new(secret: &[u8]) -> Sealer {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"otlp-relay gate").extract(secret);
        let okm = prk
            .expand(&[b"session cookie v1"], &AES_256_GCM)
            .expect("HKDF output length fits AES-256");
        Sealer {
            key: LessSafeKey::new(UnboundKey::from(okm)),
        }
    }

    /// A sealer with a random key (sessions do not survive a restart).
    #[expect(clippy::expect_used, reason = "without system randomness no session can be safe")]
    pub(crate) fn random() -> Sealer {
        let mut k = [0u8; 32];
        aws_lc_rs::rand::fill(&mut k).expect("system randomness");
        Sealer::new(&k)
    }

    #[expect(
        clippy::expect_used,
        reason = "randomness, serializing our own structs and AES-GCM sealing in place do not fail"
    )]
    pub(crate) fn seal<T: Serialize>(&self, name: &str, value: &T) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("system randomness");
        let mut data = serde_json::to_vec(value).expect("serializable");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .expect("AES-GCM seal");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        URL_SAFE_NO_PAD.encode(out)
    }

    pub(crate) fn open<T: DeserializeOwned>(&self, name: &str, text: &str) -> Option<T> {
        let raw = URL_SAFE_NO_PAD.decode(text).ok()?;
        if raw.len() < NONCE_LEN + 16 {
            return None;
        }
        let (nonce, rest) = raw.split_at(NONCE_LEN);
        let mut data = rest.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

/// The value of cookie `name` in a Cookie header.
pub(crate) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Removes cookie `name` from a request's Cookie headers, keeping the others.
pub(crate) fn remove_cookie(h: &mut http::HeaderMap, name: &str) {
    let kept: Vec<String> = h
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some(name))
        .map(String::from)
        .collect();
    h.remove(http::header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(&kept.join("; "))
    {
        h.insert(http::header::COOKIE, v);
    }
}

/// Sets cookie `name` to `value` in a request's Cookie header (one header, the other cookies kept).
pub(crate) fn replace_cookie(h: &mut http::HeaderMap, name: &str, value: &str) {
    remove_cookie(h, name);
    let merged = match h.get(http::header::COOKIE).and_then(|v| v.to_str().ok()) {
        Some(rest) if !rest.is_empty() => format!("{rest}; {name}={value}"),
        _ => format!("{name}={value}"),
    };
    if let Ok(v) = http::HeaderValue::from_str(&merged) {
        h.insert(http::header::COOKIE, v);
    }
}

/// A Set-Cookie value: HttpOnly, SameSite=Lax, Path=/, Secure on https; no Max-Age so it dies with the
/// browser session (the sealed payload has its own expiry).
pub(crate) fn set_cookie(name: &str, value: &str, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    )
}

pub(crate) fn clear_cookie(name: &str, secure: bool) -> String {
    format!(
        "{name}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// A safe post-login target: a same-origin absolute path. Anything else (`//evil`, `/\evil`, a scheme,
/// control characters) becomes `/`, so the callback cannot be turned into an open redirect.
pub(crate) fn safe_return_path(target: &str) -> String {
    let ok = target.starts_with('/')
        && !target.starts_with("//")
        && !target.starts_with("/\\")
        && !target.chars().any(|c| c.is_control() || c == '\\')
        && target.len() <= 2048;
    if ok { target.to_string() } else { "/".to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(exp: u64) -> Session {
        Session {
            identity: Identity {
                user: "alice".into(),
                email: Some("alice@example.test".into()),
                groups: vec!["mlflow".into()],
            },
            exp,
            id_token: None,
            sid: "s1".into(),
            refresh_token: Some("rt".into()),
            checked: 1_000,
        }
    }

    #[test]
    fn refresh_due_times() {
        let mut s = session(10_000);
        s.checked = 1_000;
        assert_eq!(session_state(&s, 1_000, 300), SessionState::Fresh);
        assert_eq!(session_state(&s, 1_299, 300), SessionState::Fresh);
        assert_eq!(
            session_state(&s, 1_300, 300),
            SessionState::Due,
            "due exactly one interval later"
        );
        assert_eq!(session_state(&s, 5_000, 300), SessionState::Due);
        assert_eq!(session_state(&s, 10_000, 300), SessionState::Expired, "expiry wins");
        // Never checked (a cookie from before this field existed): due at once.
        s.checked = 0;
        assert_eq!(session_state(&s, 1_000, 300), SessionState::Due);
        // Checked slightly in the future (clock skew between replicas): fresh, but a stamp more than
        // one interval ahead is not believed.
        s.checked = 1_010;
        assert_eq!(session_state(&s, 1_000, 300), SessionState::Fresh);
        s.checked = 1_000 + 301;
        assert_eq!(session_state(&s, 1_000, 300), SessionState::Due);
        s.checked = u64::MAX;
        assert_eq!(session_state(&s, 1_000, 300), SessionState::Due);
    }

    #[test]
    fn old_cookies_are_due() {
        let old = r#"{"identity":{"user":"a","email":null,"groups":[]},"exp":99999999999,"id_token":null}"#;
        let s: Session = serde_json::from_str(old).unwrap();
        assert_eq!(session_state(&s, 1_000, 300), SessionState::Due);
        assert!(s.refresh_token.is_none());
        assert_ne!(new_sid(), new_sid());
    }

    #[test]
    fn seal_round_trip_and_tamper() {
        let s = Sealer::new(b"0123456789abcdef0123");
        let sealed = s.seal(SESSION_COOKIE, &session(5));
        assert!(!sealed.contains("alice"), "encrypted");
        let back: Session = s.open(SESSION_COOKIE, &sealed).unwrap();
        assert_eq!(back.identity.user, "alice");
        // Another key, another cookie name, or a flipped bit: refused.
        assert!(
            Sealer::new(b"another key 0123456")
                .open::<Session>(SESSION_COOKIE, &sealed)
                .is_none()
        );
        assert!(s.open::<Session>(LOGIN_COOKIE, &sealed).is_none());
        let mut raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(
            s.open::<Session>(SESSION_COOKIE, &URL_SAFE_NO_PAD.encode(raw))
                .is_none()
        );
        assert!(s.open::<Session>(SESSION_COOKIE, "garbage").is_none());
        // Two seals of one value differ (random nonce).
        assert_ne!(s.seal(SESSION_COOKIE, &session(5)), sealed);
    }

    #[test]
    fn cookies() {
        assert_eq!(cookie("a=1; gate_session=xyz; b=2", SESSION_COOKIE), Some("xyz"));
        assert_eq!(cookie("gate_session_x=1", SESSION_COOKIE), None);
        let c = set_cookie(SESSION_COOKIE, "v", true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.ends_with("; Secure"));
        assert!(!set_cookie(SESSION_COOKIE, "v", false).contains("Secure"));
        assert!(clear_cookie(SESSION_COOKIE, false).contains("Max-Age=0"));
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; gate_session=old".parse().unwrap());
        h.append(http::header::COOKIE, "gate_session=older; b=2".parse().unwrap());
        remove_cookie(&mut h, SESSION_COOKIE);
        assert_eq!(h.get_all(http::header::COOKIE).iter().count(), 1);
        assert_eq!(h[http::header::COOKIE], "a=1; b=2");
        replace_cookie(&mut h, SESSION_COOKIE, "new");
        assert_eq!(h.get_all(http::header::COOKIE).iter().count(), 1);
        assert_eq!(
            cookie(h[http::header::COOKIE].to_str().unwrap(), SESSION_COOKIE),
            Some("new")
        );
        assert_eq!(cookie(h[http::header::COOKIE].to_str().unwrap(), "a"), Some("1"));
        remove_cookie(&mut h, "a");
        remove_cookie(&mut h, "b");
        remove_cookie(&mut h, SESSION_COOKIE);
        assert!(h.get(http::header::COOKIE).is_none());
        replace_cookie(&mut h, SESSION_COOKIE, "only");
        assert_eq!(h[http::header::COOKIE], "gate_session=only");
    }

    #[test]
    fn return_paths() {
        assert_eq!(safe_return_path("/#/experiments/1?x=2"), "/#/experiments/1?x=2");
        assert_eq!(
            safe_return_path("/ajax-api/2.0/mlflow/experiments/search"),
            "/ajax-api/2.0/mlflow/experiments/search"
        );
        for bad in [
            "//evil.example/x",
            "/\\evil.example",
            "https://evil.example/",
            "evil",
            "",
            "/a\r\nb",
            "/\t/evil",
        ] {
            assert_eq!(safe_return_path(bad), "/", "{bad:?}");
        }
    }
}
