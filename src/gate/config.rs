//! Gate configuration from the environment: mlflow-oidc-auth's variable names and meaning, plus ours
//! (GATE_*, OIDC_EXCLUDE_PATHS). Parsing is pure and collects every problem instead of stopping at the first.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | OIDC_DISCOVERY_URL | required | `<issuer>/.well-known/openid-configuration` |
//! | OIDC_CLIENT_ID, OIDC_CLIENT_SECRET | required | the confidential client (Basic auth accepts exactly these) |
//! | OIDC_REDIRECT_URI | `<proto>://<host>/callback` of each request | fixed callback URL; its path is served |
//! | OIDC_SCOPE | `openid email profile` | scopes asked at login |
//! | OIDC_GROUPS_ATTRIBUTE | `groups` | claim with the groups (ID token, else access token) |
//! | OIDC_GROUP_NAME | `mlflow` | comma list of groups allowed in |
//! | OIDC_ADMIN_GROUP_NAME | `mlflow-admin` | group with every permission |
//! | OIDC_AUDIENCE | the client id | `aud` required in Bearer tokens |
//! | SECRET_KEY | random per process | key material for the session cookie (>= 16 chars) |
//! | OIDC_EXCLUDE_PATHS | none | comma list of path prefixes served without authentication |
//! | GATE_LISTEN | `0.0.0.0:8080` | listen address |
//! | GATE_UPSTREAM | `http://127.0.0.1:5000` | the mlflow server |
//! | GATE_PERMISSIONS_FILE | none (members: EDIT everywhere) | YAML, see [`super::authz::Permissions`] |
//! | GATE_CLOCK_LEEWAY_SECONDS | 30 | exp/nbf leeway |
//! | GATE_SESSION_TTL_SECONDS | 28800 | browser session lifetime |
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::authz::{Permissions, Policy};

const WELL_KNOWN: &str = "/.well-known/openid-configuration";

/// A secret string that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone)]
pub struct GateConfig {
    pub discovery_url: String,
    /// The issuer: the discovery URL without `/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Fixed redirect URI; None derives `<scheme>://<host>/callback` from each request.
    pub redirect_uri: Option<String>,
    /// Path the provider redirects back to (the redirect URI's path, default /callback).
    pub callback_path: String,
    pub scopes: Vec<String>,
    pub groups_attribute: String,
    pub groups: Vec<String>,
    pub admin_group: String,
    pub audience: String,
    /// Key material for the session cookie; None: random per process (sessions die with it).
    pub secret_key: Option<Secret>,
    pub listen: SocketAddr,
    pub upstream: http::Uri,
    pub exclude_paths: Vec<String>,
    pub permissions_file: Option<PathBuf>,
    pub permissions: Option<Permissions>,
    /// Clock leeway for exp/nbf in seconds.
    pub leeway_secs: u64,
    /// Upper bound of a browser session in seconds.
    pub session_ttl_secs: u64,
}

impl GateConfig {
    pub fn policy(&self) -> Policy {
        Policy {
            member_groups: self.groups.clone(),
            admin_group: self.admin_group.clone(),
            permissions: self.permissions.clone(),
        }
    }

    /// True when `path` is served without authentication: OIDC_EXCLUDE_PATHS prefixes on a segment
    /// boundary, so `/v1/traces` covers `/v1/traces` and `/v1/traces/x` but not `/v1/tracesX`.
    pub fn is_excluded(&self, path: &str) -> bool {
        is_excluded(&self.exclude_paths, path)
    }
}

pub fn is_excluded(prefixes: &[String], path: &str) -> bool {
    // A path with dot segments or encoded slashes could be normalised differently upstream: never exclude it.
    if path.contains("/../")
        || path.ends_with("/..")
        || path.contains("/./")
        || path.to_ascii_lowercase().contains("%2f")
    {
        return false;
    }
    prefixes.iter().any(|p| {
        let p = p.trim_end_matches('/');
        path == p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/') || rest.starts_with('?'))
    })
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Reads the configuration through `get` (the process environment in production). Returns every
/// problem found, each naming its variable.
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<GateConfig, Vec<String>> {
    let mut problems = Vec::new();
    let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    let required = |k: &str, problems: &mut Vec<String>| {
        get(k).unwrap_or_else(|| {
            problems.push(format!("{k}: required"));
            String::new()
        })
    };
    let discovery_url = required("OIDC_DISCOVERY_URL", &mut problems);
    let client_id = required("OIDC_CLIENT_ID", &mut problems);
    let client_secret = Secret(required("OIDC_CLIENT_SECRET", &mut problems));

    let mut issuer = String::new();
    if !discovery_url.is_empty() {
        match url::Url::parse(&discovery_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                issuer = discovery_url
                    .strip_suffix(WELL_KNOWN)
                    .unwrap_or(&discovery_url)
                    .trim_end_matches('/')
                    .to_string();
            }
            _ => problems.push(format!("OIDC_DISCOVERY_URL: {discovery_url:?} is not an http(s) URL")),
        }
    }

    let redirect_uri = get("OIDC_REDIRECT_URI");
    let mut callback_path = "/callback".to_string();
    if let Some(r) = &redirect_uri {
        match url::Url::parse(r) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => callback_path = u.path().to_string(),
            _ => problems.push(format!("OIDC_REDIRECT_URI: {r:?} is not an absolute http(s) URL")),
        }
    }

    let scopes = list(
        &get("OIDC_SCOPE")
            .unwrap_or_else(|| "openid email profile".into())
            .replace(' ', ","),
    );
    if !scopes.iter().any(|s| s == "openid") {
        problems.push("OIDC_SCOPE: must contain openid".into());
    }
    let groups_attribute = get("OIDC_GROUPS_ATTRIBUTE").unwrap_or_else(|| "groups".into());
    let groups = list(&get("OIDC_GROUP_NAME").unwrap_or_else(|| "mlflow".into()));
    if groups.is_empty() {
        problems.push("OIDC_GROUP_NAME: empty group list".into());
    }
    let admin_group = get("OIDC_ADMIN_GROUP_NAME").unwrap_or_else(|| "mlflow-admin".into());
    let audience = get("OIDC_AUDIENCE").unwrap_or_else(|| client_id.clone());

    let secret_key = get("SECRET_KEY").map(Secret);
    if let Some(k) = &secret_key
        && k.0.len() < 16
    {
        problems.push("SECRET_KEY: too short (at least 16 characters)".into());
    }

    let listen_text = get("GATE_LISTEN").unwrap_or_else(|| "0.0.0.0:8080".into());
    let listen = listen_text.parse().unwrap_or_else(|_| {
        problems.push(format!("GATE_LISTEN: {listen_text:?} is not IP:PORT"));
        SocketAddr::from(([0, 0, 0, 0], 8080))
    });

    let upstream_text = get("GATE_UPSTREAM").unwrap_or_else(|| "http://127.0.0.1:5000".into());
    let upstream: http::Uri = match upstream_text.parse::<http::Uri>() {
        Ok(u)
            if matches!(u.scheme_str(), Some("http" | "https"))
                && u.authority().is_some()
                && matches!(u.path(), "" | "/")
                && u.query().is_none() =>
        {
            u
        }
        _ => {
            problems.push(format!(
                "GATE_UPSTREAM: {upstream_text:?} must be http(s)://HOST:PORT without a path"
            ));
            http::Uri::from_static("http://127.0.0.1:5000")
        }
    };

    let exclude_paths = list(&get("OIDC_EXCLUDE_PATHS").unwrap_or_default());
    for p in &exclude_paths {
        if !p.starts_with('/') || p == "/" {
            problems.push(format!(
                "OIDC_EXCLUDE_PATHS: {p:?} must be a path prefix starting with / (and not / itself)"
            ));
        }
    }

    let permissions_file = get("GATE_PERMISSIONS_FILE").map(PathBuf::from);
    let mut permissions = None;
    if let Some(f) = &permissions_file {
        match std::fs::read_to_string(f) {
            Ok(text) => match Permissions::parse(&text) {
                Ok(p) => permissions = Some(p),
                Err(errs) => problems.extend(
                    errs.into_iter()
                        .map(|e| format!("GATE_PERMISSIONS_FILE {}: {e}", f.display())),
                ),
            },
            Err(e) => problems.push(format!("GATE_PERMISSIONS_FILE: cannot read {}: {e}", f.display())),
        }
    }

    let mut number = |k: &str, default: u64, max: u64| -> u64 {
        match get(k) {
            None => default,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= max => n,
                _ => {
                    problems.push(format!("{k}: {v:?} is not a number of seconds <= {max}"));
                    default
                }
            },
        }
    };
    let leeway_secs = number("GATE_CLOCK_LEEWAY_SECONDS", 30, 300);
    let session_ttl_secs = number("GATE_SESSION_TTL_SECONDS", 8 * 3600, 7 * 24 * 3600);

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(GateConfig {
        discovery_url,
        issuer,
        client_id,
        client_secret,
        redirect_uri,
        callback_path,
        scopes,
        groups_attribute,
        groups,
        admin_group,
        audience,
        secret_key,
        listen,
        upstream,
        exclude_paths,
        permissions_file,
        permissions,
        leeway_secs,
        session_ttl_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    const MIN: &[(&str, &str)] = &[
        (
            "OIDC_DISCOVERY_URL",
            "http://kc:8080/realms/master/.well-known/openid-configuration",
        ),
        ("OIDC_CLIENT_ID", "mlflow"),
        ("OIDC_CLIENT_SECRET", "s3cret"),
    ];

    #[test]
    fn defaults_follow_mlflow_oidc_auth() {
        let c = from_env(env(MIN)).unwrap();
        assert_eq!(c.issuer, "http://kc:8080/realms/master");
        assert_eq!(c.scopes, ["openid", "email", "profile"]);
        assert_eq!(c.groups, ["mlflow"]);
        assert_eq!(c.admin_group, "mlflow-admin");
        assert_eq!(c.audience, "mlflow");
        assert_eq!(c.groups_attribute, "groups");
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.upstream, "http://127.0.0.1:5000");
        assert_eq!(c.callback_path, "/callback");
        assert!(c.exclude_paths.is_empty() && c.permissions.is_none() && c.secret_key.is_none());
        assert!(!format!("{c:?}").contains("s3cret"), "secrets never print");
    }

    #[test]
    fn every_problem_is_listed() {
        let e = from_env(env(&[
            ("OIDC_DISCOVERY_URL", "not a url"),
            ("OIDC_SCOPE", "email"),
            ("SECRET_KEY", "short"),
            ("GATE_LISTEN", "nope"),
            ("GATE_UPSTREAM", "http://mlflow:5000/sub"),
            ("OIDC_EXCLUDE_PATHS", "/v1/traces,v2"),
            ("OIDC_REDIRECT_URI", "/relative"),
            ("GATE_PERMISSIONS_FILE", "/nonexistent/perm.yaml"),
            ("GATE_CLOCK_LEEWAY_SECONDS", "-1"),
        ]))
        .unwrap_err();
        let text = e.join("\n");
        for k in [
            "OIDC_CLIENT_ID: required",
            "OIDC_CLIENT_SECRET: required",
            "OIDC_DISCOVERY_URL:",
            "OIDC_SCOPE:",
            "SECRET_KEY:",
            "GATE_LISTEN:",
            "GATE_UPSTREAM:",
            "OIDC_EXCLUDE_PATHS: \"v2\"",
            "OIDC_REDIRECT_URI:",
            "GATE_PERMISSIONS_FILE:",
            "GATE_CLOCK_LEEWAY_SECONDS:",
        ] {
            assert!(text.contains(k), "missing {k:?} in:\n{text}");
        }
        assert_eq!(e.len(), 11, "{text}");
    }

    #[test]
    fn ours_parse() {
        let mut pairs = MIN.to_vec();
        pairs.extend([
            ("OIDC_GROUP_NAME", "mlflow, readers"),
            ("OIDC_EXCLUDE_PATHS", "/v1/traces, /health/"),
            ("OIDC_REDIRECT_URI", "https://mlflow.example/oauth/cb"),
            ("OIDC_AUDIENCE", "account"),
            ("GATE_UPSTREAM", "http://mlflow:5000"),
        ]);
        let c = from_env(env(&pairs)).unwrap();
        assert_eq!(c.groups, ["mlflow", "readers"]);
        assert_eq!(c.callback_path, "/oauth/cb");
        assert_eq!(c.audience, "account");
        assert!(c.is_excluded("/v1/traces"));
        assert!(c.is_excluded("/v1/traces/x"));
        assert!(c.is_excluded("/health"));
        assert!(!c.is_excluded("/v1/tracesX"));
        assert!(!c.is_excluded("/v1/trace"));
        assert!(!c.is_excluded("/v1/traces/../../api/2.0/mlflow/experiments/delete"));
        assert!(!c.is_excluded("/v1/traces%2F..%2Fapi"));
        assert!(!c.is_excluded("/api/2.0/mlflow/experiments/search"));
    }
}
