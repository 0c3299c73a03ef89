//! CORS for the OTLP/HTTP receiver, as the collector's confighttp (rs/cors) answers browsers:
//! preflight OPTIONS requests, and the allow-origin headers on every answer to an allowed origin.
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;

use super::ResponseBody;
use crate::config::CorsConfig;

/// Headers a browser may always send (rs/cors' defaults, plus Content-Encoding for gzip bodies).
const ALWAYS_ALLOWED: [&str; 5] = [
    "accept",
    "content-type",
    "content-encoding",
    "x-requested-with",
    "origin",
];

/// Whether `origin` matches one of the patterns; `*` matches any run of characters.
pub(crate) fn origin_allowed(cors: &CorsConfig, origin: &str) -> bool {
    let origin = origin.to_ascii_lowercase();
    cors.allowed_origins
        .iter()
        .any(|p| glob(&p.to_ascii_lowercase(), &origin))
}

fn glob(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut tail) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('*').collect();
    let Some((last, middle)) = parts.split_last() else {
        return true;
    };
    for part in middle {
        match tail.find(part) {
            Some(i) => tail = &tail[i + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

fn header_allowed(cors: &CorsConfig, name: &str) -> bool {
    let name = name.trim();
    name.is_empty()
        || ALWAYS_ALLOWED.iter().any(|h| h.eq_ignore_ascii_case(name))
        || cors
            .allowed_headers
            .iter()
            .any(|h| h == "*" || h.eq_ignore_ascii_case(name))
}

/// The request's Origin when it is allowed.
fn allowed_origin<'a>(cors: &CorsConfig, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    origin_allowed(cors, origin.to_str().ok()?).then_some(origin)
}

/// A preflight request: OPTIONS with an Origin and the method the browser means to use.
pub(crate) fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight: 204, with the allow headers only when origin, method and every
/// requested header are allowed (the browser then refuses on its side, as with the collector).
pub(crate) fn preflight(cors: &CorsConfig, headers: &HeaderMap) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::new(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(
        header::VARY,
        HeaderValue::from_static("Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    );
    let Some(origin) = allowed_origin(cors, headers) else {
        return r;
    };
    let method_ok = headers
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .is_some_and(|m| m.as_bytes().eq_ignore_ascii_case(b"POST"));
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let headers_ok = requested.is_none_or(|list| list.split(',').all(|name| header_allowed(cors, name)));
    if !(method_ok && headers_ok) {
        return r;
    }
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    if let Some(list) = requested.and_then(|l| HeaderValue::from_str(l).ok()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, list);
    }
    if cors.max_age > 0 {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(cors.max_age));
    }
    r
}

/// Lets the browser read our answer (success or error) when the request's origin is allowed.
pub(crate) fn decorate(cors: &CorsConfig, request: &HeaderMap, response: &mut Response<ResponseBody>) {
    let h = response.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed_origin(cors, request) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], headers: &[&str]) -> CorsConfig {
        CorsConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allowed_headers: headers.iter().map(|s| s.to_string()).collect(),
            max_age: 600,
        }
    }

    #[test]
    fn origins_match_with_wildcards() {
        let c = cors(
            &["https://*.example.com", "http://localhost:*", "https://exact.org"],
            &[],
        );
        for ok in [
            "https://app.example.com",
            "https://a.b.example.com",
            "HTTPS://App.Example.com",
            "http://localhost:3000",
            "https://exact.org",
        ] {
            assert!(origin_allowed(&c, ok), "{ok}");
        }
        for no in [
            "https://example.com",
            "https://app.example.com.evil.net",
            "http://app.example.com",
            "https://exact.org.evil",
            "http://localhost",
            "null",
        ] {
            assert!(!origin_allowed(&c, no), "{no}");
        }
        assert!(origin_allowed(&cors(&["*"], &[]), "https://anything"));
        assert!(glob("a*b*c", "aXbYc") && !glob("a*b*c", "aXc") && !glob("ab*ba", "aba"));
    }

    fn preflight_for(c: &CorsConfig, origin: &str, method: &str, hdrs: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_str(method).unwrap(),
        );
        if let Some(v) = hdrs {
            h.insert(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                HeaderValue::from_str(v).unwrap(),
            );
        }
        preflight(c, &h).headers().clone()
    }

    #[test]
    fn preflight_allows_only_what_is_configured() {
        let c = cors(&["https://*.example.com"], &["X-MLflow-Experiment-Id"]);
        let ok = preflight_for(
            &c,
            "https://ui.example.com",
            "POST",
            Some("content-type, x-mlflow-experiment-id"),
        );
        assert_eq!(ok[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://ui.example.com");
        assert_eq!(ok[header::ACCESS_CONTROL_MAX_AGE], "600");
        assert_eq!(
            ok[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "content-type, x-mlflow-experiment-id"
        );
        for (origin, method, hdrs) in [
            ("https://evil.net", "POST", None),
            ("https://ui.example.com", "DELETE", None),
            ("https://ui.example.com", "POST", Some("content-type, x-secret")),
        ] {
            let h = preflight_for(&c, origin, method, hdrs);
            assert!(
                !h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
                "{origin} {method} {hdrs:?}"
            );
        }
        let any = cors(&["*"], &["*"]);
        let h = preflight_for(&any, "https://x", "POST", Some("x-anything"));
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://x");
    }
}
