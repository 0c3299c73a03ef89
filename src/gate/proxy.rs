//! The reverse proxy to MLflow: header hygiene (hop-by-hop removed, client-sent identity headers
//! stripped, X-Forwarded-* set, MLflow's accepted Host), bodies streamed both ways.
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

use super::session::{Identity, LOGIN_COOKIE, SESSION_COOKIE};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies on both sides of the gate.
pub(crate) type Body = BoxBody<Bytes, BoxError>;
pub(crate) type UpstreamClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Body,
>;

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub(crate) const X_FORWARDED_USER: &str = "x-forwarded-user";
pub(crate) const X_FORWARDED_EMAIL: &str = "x-forwarded-email";
pub(crate) const X_FORWARDED_GROUPS: &str = "x-forwarded-groups";

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the Connection header names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

/// Rewrites request headers for MLflow. `identity` None (an excluded path) still strips the identity
/// headers, so a client can never speak for someone through the gate.
pub(crate) fn upstream_request_headers(
    h: &mut HeaderMap,
    identity: Option<&Identity>,
    peer: SocketAddr,
    upstream_authority: &str,
    proto: &str,
) {
    strip_hop_by_hop(h);
    for n in [X_FORWARDED_USER, X_FORWARDED_EMAIL, X_FORWARDED_GROUPS] {
        h.remove(n);
    }
    // The gate consumed the credentials; MLflow does not need them (and must not log them).
    h.remove(header::AUTHORIZATION);
    strip_gate_cookies(h);

    let original_host = h.remove(header::HOST);
    if let Some(host) = original_host {
        h.insert("x-forwarded-host", host);
    }
    let ip = peer.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert(
        "x-forwarded-proto",
        HeaderValue::from_str(proto).unwrap_or(HeaderValue::from_static("http")),
    );
    if let Ok(v) = HeaderValue::from_str(upstream_authority) {
        h.insert(header::HOST, v);
    }
    if let Some(id) = identity {
        let mut set = |name: &'static str, value: &str| {
            // Values that are not valid header text are dropped rather than mangled.
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        set(X_FORWARDED_USER, &id.user);
        if let Some(e) = &id.email {
            set(X_FORWARDED_EMAIL, e);
        }
        set(X_FORWARDED_GROUPS, &id.groups.join(","));
    }
}

/// Drops the gate's own cookies from the Cookie header (MLflow has no use for them).
fn strip_gate_cookies(h: &mut HeaderMap) {
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| {
            let name = kv.split('=').next().unwrap_or("");
            !kv.is_empty() && name != SESSION_COOKIE && name != LOGIN_COOKIE
        })
        .map(String::from)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        h.insert(header::COOKIE, v);
    }
}

/// The scheme the client used: X-Forwarded-Proto from a front proxy, else the gate's own (plain http).
pub(crate) fn client_proto(h: &HeaderMap) -> String {
    h.get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| v == "https" || v == "http")
        .unwrap_or_else(|| "http".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hygiene() {
        let mut h = HeaderMap::new();
        h.insert("X-Forwarded-User", "admin".parse().unwrap());
        h.insert("x-forwarded-groups", "mlflow-admin".parse().unwrap());
        h.insert("x-forwarded-email", "a@b".parse().unwrap());
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("authorization", "Bearer abc".parse().unwrap());
        h.insert("cookie", "gate_session=zzz; theme=dark".parse().unwrap());
        h.insert("host", "mlflow.example".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("x-mlflow-experiment-id", "4".parse().unwrap());
        let peer: SocketAddr = "127.0.0.9:5555".parse().unwrap();
        upstream_request_headers(&mut h, None, peer, "127.0.0.1:5000", "https");
        for gone in [
            "x-forwarded-user",
            "x-forwarded-groups",
            "x-forwarded-email",
            "connection",
            "x-secret",
            "te",
            "authorization",
        ] {
            assert!(h.get(gone).is_none(), "{gone} must not reach MLflow");
        }
        assert_eq!(h["cookie"], "theme=dark");
        assert_eq!(h["host"], "127.0.0.1:5000");
        assert_eq!(h["x-forwarded-host"], "mlflow.example");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-mlflow-experiment-id"], "4");

        let id = Identity {
            user: "alice".into(),
            email: Some("alice@example.test".into()),
            groups: vec!["mlflow".into(), "mlflow-admin".into()],
        };
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-user", "mallory".parse().unwrap());
        h.insert("cookie", "gate_session=zzz".parse().unwrap());
        upstream_request_headers(&mut h, Some(&id), peer, "mlflow:5000", "http");
        assert_eq!(h.get_all("x-forwarded-user").iter().count(), 1);
        assert_eq!(h["x-forwarded-user"], "alice");
        assert_eq!(h["x-forwarded-groups"], "mlflow,mlflow-admin");
        assert!(h.get("cookie").is_none());
    }

    #[test]
    fn proto() {
        let mut h = HeaderMap::new();
        assert_eq!(client_proto(&h), "http");
        h.insert("x-forwarded-proto", "HTTPS, http".parse().unwrap());
        assert_eq!(client_proto(&h), "https");
        h.insert("x-forwarded-proto", "gopher".parse().unwrap());
        assert_eq!(client_proto(&h), "http");
    }
}
