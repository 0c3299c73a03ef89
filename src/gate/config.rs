//! Gate configuration from the environment: mlflow-oidc-auth's variable names and meaning, plus ours
//! (GATE_*, OIDC_EXCLUDE_PATHS). Parsing is pure and collects every problem instead of stopping at the first.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | OIDC_DISCOVERY_URL | required | `<issuer>/.well-known/openid-configuration` |
//! | OIDC_CLIENT_ID, OIDC_CLIENT_SECRET | required | the confidential client (Basic auth accepts exactly these) |
//! | OIDC_REDIRECT_URI | `<proto>://<host>/callback` of a request whose host GATE_TRUSTED_PROXIES or GATE_ALLOWED_HOSTS vouch for (else no browser login) | fixed callback URL; its path is served |
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
//! | GATE_SESSION_REFRESH | `5m` | how often a browser session is re-checked with the provider |
//! | GATE_ALLOWED_CLIENTS | any | comma list of clients (`azp`) whose tokens are accepted (plus OIDC_CLIENT_ID) |
//! | GATE_ADMIN_LISTEN | `127.0.0.1:9091` | admin listener (/gate/metrics, health); `off` disables it |
//! | GATE_MAX_CONNECTIONS | 512 | open client connections on the public listener (more are closed at once), and requests in flight across them (more get 503) |
//! | GATE_HEADER_READ_TIMEOUT | `10s` | a new connection must complete its first request head within this |
//! | GATE_IDLE_TIMEOUT | `60s` | a connection with no request in flight is closed after this; also the longest an answer waits for a client that does not read |
//! | GATE_BODY_READ_TIMEOUT | `30s` | longest pause while reading a request body |
//! | GATE_TRUSTED_PROXIES | none | comma list of IPs / CIDRs whose X-Forwarded-Proto/-Host/-For are believed |
//! | GATE_ALLOWED_HOSTS | none | Host names (optionally `:port`) a login redirect may be built from |
//! | GATE_TRACE_WRITE_CONNECTIONS | `per-request` | `per-request`: each OTLP trace write (`POST /v1/traces`) goes to MLflow on a new connection; `pooled`: on the kept-alive connections the UI and API use |
//!
//! Durations are a number with `ms`, `s`, `m` or `h` (a bare number is seconds).
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

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
    pub(crate) discovery_url: String,
    /// The issuer: the discovery URL without `/.well-known/openid-configuration`.
    pub(crate) issuer: String,
    pub(crate) client_id: String,
    pub(crate) client_secret: Secret,
    /// Fixed redirect URI; None derives `<scheme>://<host>/callback` from a request whose host is
    /// vouched for (trusted proxy, allowed host), and refuses browser login otherwise.
    pub(crate) redirect_uri: Option<String>,
    /// Path the provider redirects back to (the redirect URI's path, default /callback).
    pub(crate) callback_path: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) groups_attribute: String,
    pub(crate) groups: Vec<String>,
    pub(crate) admin_group: String,
    pub(crate) audience: String,
    /// Key material for the session cookie; None: random per process (sessions die with it).
    pub secret_key: Option<Secret>,
    pub listen: SocketAddr,
    pub upstream: http::Uri,
    pub(crate) exclude_paths: Vec<String>,
    pub permissions: Option<Permissions>,
    /// Clock leeway for exp/nbf in seconds.
    pub(crate) leeway_secs: u64,
    /// Upper bound of a browser session in seconds.
    pub(crate) session_ttl_secs: u64,
    /// A browser session is re-validated with the provider when its last check is this old.
    pub(crate) session_refresh: Duration,
    /// Clients (`azp`) whose tokens are accepted; empty: any client with our audience.
    pub(crate) allowed_clients: Vec<String>,
    /// None: no admin listener.
    pub(crate) admin_listen: Option<SocketAddr>,
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    pub(crate) trusted_proxies: TrustedProxies,
    /// Host header values (lower case, `host` or `host:port`) a redirect URI may be built from.
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) trace_write_connections: TraceWriteConnections,
}

/// How OTLP trace writes reach MLflow. `mlflow server --workers N` runs N processes behind one
/// socket and a kept-alive connection stays with the process that accepted it, so pooled writes
/// can keep one worker busy while the others idle; a new connection each goes to a free worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TraceWriteConnections {
    PerRequest,
    Pooled,
}

/// Peers whose X-Forwarded-* headers are believed: IPs and CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Parses `10.0.0.0/8, 192.168.1.7, fd00::/8`. IPv4-mapped IPv6 peers match their IPv4 entries.
    pub(crate) fn parse(text: &str) -> Result<TrustedProxies, String> {
        let mut out = Vec::new();
        for item in list(text) {
            let (ip, bits) = match item.split_once('/') {
                Some((ip, bits)) => (ip, Some(bits)),
                None => (item.as_str(), None),
            };
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{item:?} is not an IP address or CIDR block"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                None => max,
                Some(b) => match b.parse::<u8>() {
                    Ok(n) if n <= max => n,
                    _ => return Err(format!("{item:?} has a bad prefix length")),
                },
            };
            out.push((ip, bits));
        }
        Ok(TrustedProxies(out))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn contains(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        self.0.iter().any(|&(net, bits)| match (net, peer) {
            (IpAddr::V4(n), IpAddr::V4(p)) => prefix_eq(u32::from(n).into(), u32::from(p).into(), bits, 32),
            (IpAddr::V6(n), IpAddr::V6(p)) => prefix_eq(u128::from(n), u128::from(p), bits, 128),
            _ => false,
        })
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, width: u8) -> bool {
    if bits == 0 {
        return true;
    }
    let shift = u32::from(width - bits);
    (a >> shift) == (b >> shift)
}

/// `250ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Whether a Host header value is one of `allowed` (`host` entries match any port, `host:port` only that).
pub(crate) fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let Ok(auth) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    if host.contains('@') {
        return false;
    }
    allowed
        .iter()
        .any(|a| *a == host || (!a.contains(':') || a.starts_with('[') && a.ends_with(']')) && *a == auth.host())
}

impl GateConfig {
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            member_groups: self.groups.clone(),
            admin_group: self.admin_group.clone(),
            permissions: self.permissions.clone(),
        }
    }

    /// True when `path` is served without authentication: OIDC_EXCLUDE_PATHS prefixes on a segment
    /// boundary, so `/v1/traces` covers `/v1/traces` and `/v1/traces/x` but not `/v1/tracesX`.
    pub(crate) fn is_excluded(&self, path: &str) -> bool {
        is_excluded(&self.exclude_paths, path)
    }
}

pub(crate) fn is_excluded(prefixes: &[String], path: &str) -> bool {
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
    let mut env = Env {
        get: &get,
        problems: Vec::new(),
    };
    let discovery_url = env.required("OIDC_DISCOVERY_URL");
    let client_id = env.required("OIDC_CLIENT_ID");
    let client_secret = Secret(env.required("OIDC_CLIENT_SECRET"));
    let issuer = env.issuer(&discovery_url);
    let (redirect_uri, callback_path) = env.redirect_uri();
    let (scopes, groups) = env.scopes_and_groups();
    let groups_attribute = env.or("OIDC_GROUPS_ATTRIBUTE", "groups");
    let admin_group = env.or("OIDC_ADMIN_GROUP_NAME", "mlflow-admin");
    let audience = env.or("OIDC_AUDIENCE", &client_id);
    let secret_key = env.secret_key();
    let listen = env.listen();
    let upstream = env.upstream();
    let exclude_paths = env.exclude_paths();
    let permissions = env.permissions();
    let leeway_secs = env.seconds("GATE_CLOCK_LEEWAY_SECONDS", 30, 300);
    let session_ttl_secs = env.seconds("GATE_SESSION_TTL_SECONDS", 8 * 3600, 7 * 24 * 3600);
    let [session_refresh, header_read_timeout, idle_timeout, body_read_timeout] = DURATIONS.map(|d| env.duration(d));
    let allowed_clients = env.allowed_clients(&client_id);
    let admin_listen = env.admin_listen();
    let max_connections = env.max_connections();
    let trusted_proxies = env.trusted_proxies();
    let allowed_hosts = env.allowed_hosts();
    let trace_write_connections = env.trace_write_connections();
    if !env.problems.is_empty() {
        return Err(env.problems);
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
        permissions,
        leeway_secs,
        session_ttl_secs,
        session_refresh,
        allowed_clients,
        admin_listen,
        max_connections,
        header_read_timeout,
        idle_timeout,
        body_read_timeout,
        trusted_proxies,
        allowed_hosts,
        trace_write_connections,
    })
}

/// A duration variable: its name, default and accepted range.
struct DurationVar {
    name: &'static str,
    default: Duration,
    min: Duration,
    max: Duration,
}

/// GATE_SESSION_REFRESH, GATE_HEADER_READ_TIMEOUT, GATE_IDLE_TIMEOUT, GATE_BODY_READ_TIMEOUT.
const DURATIONS: [DurationVar; 4] = [
    DurationVar {
        name: "GATE_SESSION_REFRESH",
        default: Duration::from_secs(300),
        min: Duration::from_secs(1),
        max: Duration::from_secs(24 * 3600),
    },
    DurationVar {
        name: "GATE_HEADER_READ_TIMEOUT",
        default: Duration::from_secs(10),
        min: Duration::from_millis(100),
        max: Duration::from_secs(300),
    },
    DurationVar {
        name: "GATE_IDLE_TIMEOUT",
        default: Duration::from_secs(60),
        min: Duration::from_millis(100),
        max: Duration::from_secs(3600),
    },
    DurationVar {
        name: "GATE_BODY_READ_TIMEOUT",
        default: Duration::from_secs(30),
        min: Duration::from_millis(100),
        max: Duration::from_secs(3600),
    },
];

/// The environment as `from_env` reads it: a blank value counts as unset, and every problem is
/// collected (each step falls back to its default so the later steps still run).
struct Env<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<String>,
}

impl Env<'_> {
    fn get(&self, k: &str) -> Option<String> {
        (self.get)(k).filter(|v| !v.trim().is_empty())
    }

    fn or(&self, k: &str, default: &str) -> String {
        self.get(k).unwrap_or_else(|| default.into())
    }

    fn required(&mut self, k: &str) -> String {
        self.get(k).unwrap_or_else(|| {
            self.problems.push(format!("{k}: required"));
            String::new()
        })
    }

    /// The issuer: OIDC_DISCOVERY_URL without `/.well-known/openid-configuration`.
    fn issuer(&mut self, discovery_url: &str) -> String {
        if discovery_url.is_empty() {
            return String::new();
        }
        match url::Url::parse(discovery_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => discovery_url
                .strip_suffix(WELL_KNOWN)
                .unwrap_or(discovery_url)
                .trim_end_matches('/')
                .to_string(),
            _ => {
                self.problems
                    .push(format!("OIDC_DISCOVERY_URL: {discovery_url:?} is not an http(s) URL"));
                String::new()
            }
        }
    }

    /// OIDC_REDIRECT_URI and the callback path it implies.
    fn redirect_uri(&mut self) -> (Option<String>, String) {
        let redirect_uri = self.get("OIDC_REDIRECT_URI");
        let mut callback_path = "/callback".to_string();
        if let Some(r) = &redirect_uri {
            match url::Url::parse(r) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => callback_path = u.path().to_string(),
                _ => self
                    .problems
                    .push(format!("OIDC_REDIRECT_URI: {r:?} is not an absolute http(s) URL")),
            }
        }
        (redirect_uri, callback_path)
    }

    /// OIDC_SCOPE and OIDC_GROUP_NAME.
    fn scopes_and_groups(&mut self) -> (Vec<String>, Vec<String>) {
        let scopes = list(&self.or("OIDC_SCOPE", "openid email profile").replace(' ', ","));
        if !scopes.iter().any(|s| s == "openid") {
            self.problems.push("OIDC_SCOPE: must contain openid".into());
        }
        let groups = list(&self.or("OIDC_GROUP_NAME", "mlflow"));
        if groups.is_empty() {
            self.problems.push("OIDC_GROUP_NAME: empty group list".into());
        }
        (scopes, groups)
    }

    fn secret_key(&mut self) -> Option<Secret> {
        let secret_key = self.get("SECRET_KEY").map(Secret);
        if let Some(k) = &secret_key
            && k.0.len() < 16
        {
            self.problems
                .push("SECRET_KEY: too short (at least 16 characters)".into());
        }
        secret_key
    }

    fn listen(&mut self) -> SocketAddr {
        let listen_text = self.or("GATE_LISTEN", "0.0.0.0:8080");
        listen_text.parse().unwrap_or_else(|_| {
            self.problems
                .push(format!("GATE_LISTEN: {listen_text:?} is not IP:PORT"));
            SocketAddr::from(([0, 0, 0, 0], 8080))
        })
    }

    fn upstream(&mut self) -> http::Uri {
        let upstream_text = self.or("GATE_UPSTREAM", "http://127.0.0.1:5000");
        match upstream_text.parse::<http::Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none() =>
            {
                u
            }
            _ => {
                self.problems.push(format!(
                    "GATE_UPSTREAM: {upstream_text:?} must be http(s)://HOST:PORT without a path"
                ));
                http::Uri::from_static("http://127.0.0.1:5000")
            }
        }
    }

    fn exclude_paths(&mut self) -> Vec<String> {
        let exclude_paths = list(&self.get("OIDC_EXCLUDE_PATHS").unwrap_or_default());
        for p in &exclude_paths {
            if !p.starts_with('/') || p == "/" {
                self.problems.push(format!(
                    "OIDC_EXCLUDE_PATHS: {p:?} must be a path prefix starting with / (and not / itself)"
                ));
            }
        }
        exclude_paths
    }

    /// GATE_PERMISSIONS_FILE and what it holds.
    fn permissions(&mut self) -> Option<Permissions> {
        let permissions_file = self.get("GATE_PERMISSIONS_FILE").map(PathBuf::from);
        let mut permissions = None;
        if let Some(f) = &permissions_file {
            match std::fs::read_to_string(f) {
                Ok(text) => match Permissions::parse(&text) {
                    Ok(p) => permissions = Some(p),
                    Err(errs) => self.problems.extend(
                        errs.into_iter()
                            .map(|e| format!("GATE_PERMISSIONS_FILE {}: {e}", f.display())),
                    ),
                },
                Err(e) => self
                    .problems
                    .push(format!("GATE_PERMISSIONS_FILE: cannot read {}: {e}", f.display())),
            }
        }
        permissions
    }

    /// A whole number of seconds up to `max`.
    fn seconds(&mut self, k: &str, default: u64, max: u64) -> u64 {
        match self.get(k) {
            None => default,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= max => n,
                _ => {
                    self.problems
                        .push(format!("{k}: {v:?} is not a number of seconds <= {max}"));
                    default
                }
            },
        }
    }

    fn duration(&mut self, d: DurationVar) -> Duration {
        let DurationVar {
            name,
            default,
            min,
            max,
        } = d;
        match self.get(name) {
            None => default,
            Some(v) => match parse_duration(&v) {
                Some(d) if d >= min && d <= max => d,
                _ => {
                    self.problems.push(format!(
                        "{name}: {v:?} is not a duration between {min:?} and {max:?} (like 10s, 5m)"
                    ));
                    default
                }
            },
        }
    }

    fn allowed_clients(&self, client_id: &str) -> Vec<String> {
        let mut allowed_clients = list(&self.get("GATE_ALLOWED_CLIENTS").unwrap_or_default());
        // The gate's own client (Basic is exchanged for its token) is always one of them.
        if !allowed_clients.is_empty() && !allowed_clients.iter().any(|c| c == client_id) {
            allowed_clients.push(client_id.to_string());
        }
        allowed_clients
    }

    fn admin_listen(&mut self) -> Option<SocketAddr> {
        match self.get("GATE_ADMIN_LISTEN") {
            Some(v) if v.trim().eq_ignore_ascii_case("off") => None,
            v => {
                let text = v.unwrap_or_else(|| "127.0.0.1:9091".into());
                match text.trim().parse::<SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.problems
                            .push(format!("GATE_ADMIN_LISTEN: {text:?} is not IP:PORT or off"));
                        None
                    }
                }
            }
        }
    }

    fn max_connections(&mut self) -> usize {
        match self.get("GATE_MAX_CONNECTIONS") {
            None => 512,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => n,
                _ => {
                    self.problems
                        .push(format!("GATE_MAX_CONNECTIONS: {v:?} is not a number from 1 to 1000000"));
                    512
                }
            },
        }
    }

    fn trusted_proxies(&mut self) -> TrustedProxies {
        match TrustedProxies::parse(&self.get("GATE_TRUSTED_PROXIES").unwrap_or_default()) {
            Ok(t) => t,
            Err(e) => {
                self.problems.push(format!("GATE_TRUSTED_PROXIES: {e}"));
                TrustedProxies::default()
            }
        }
    }

    fn allowed_hosts(&mut self) -> Vec<String> {
        let allowed_hosts: Vec<String> = list(&self.get("GATE_ALLOWED_HOSTS").unwrap_or_default())
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for h in &allowed_hosts {
            if h.parse::<http::uri::Authority>().is_err() || h.contains('@') || h.contains('*') {
                self.problems
                    .push(format!("GATE_ALLOWED_HOSTS: {h:?} is not a host or host:port"));
            }
        }
        allowed_hosts
    }

    fn trace_write_connections(&mut self) -> TraceWriteConnections {
        let v = self.get("GATE_TRACE_WRITE_CONNECTIONS");
        match v.as_deref().map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("per-request") => TraceWriteConnections::PerRequest,
            Some("pooled") => TraceWriteConnections::Pooled,
            Some(_) => {
                self.problems.push(format!(
                    "GATE_TRACE_WRITE_CONNECTIONS: {:?} is not per-request or pooled",
                    v.unwrap_or_default()
                ));
                TraceWriteConnections::PerRequest
            }
        }
    }
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
        assert_eq!(c.session_refresh, Duration::from_secs(300));
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.admin_listen, Some("127.0.0.1:9091".parse().unwrap()));
        assert!(c.allowed_clients.is_empty() && c.trusted_proxies.is_empty() && c.allowed_hosts.is_empty());
        assert_eq!(c.trace_write_connections, TraceWriteConnections::PerRequest);
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
            ("GATE_SESSION_REFRESH", "5 parsecs"),
            ("GATE_ADMIN_LISTEN", "9091"),
            ("GATE_MAX_CONNECTIONS", "0"),
            ("GATE_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("GATE_ALLOWED_HOSTS", "user@host"),
            ("GATE_HEADER_READ_TIMEOUT", "0s"),
            ("GATE_TRACE_WRITE_CONNECTIONS", "keep-alive"),
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
            "GATE_SESSION_REFRESH:",
            "GATE_ADMIN_LISTEN:",
            "GATE_MAX_CONNECTIONS:",
            "GATE_TRUSTED_PROXIES:",
            "GATE_ALLOWED_HOSTS:",
            "GATE_HEADER_READ_TIMEOUT:",
            "GATE_TRACE_WRITE_CONNECTIONS: \"keep-alive\"",
        ] {
            assert!(text.contains(k), "missing {k:?} in:\n{text}");
        }
        assert_eq!(e.len(), 18, "{text}");
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

    #[test]
    fn connection_and_session_settings() {
        let mut pairs = MIN.to_vec();
        pairs.extend([
            ("GATE_SESSION_REFRESH", "2s"),
            ("GATE_ALLOWED_CLIENTS", "relay, loadgen"),
            ("GATE_ADMIN_LISTEN", "off"),
            ("GATE_MAX_CONNECTIONS", "20"),
            ("GATE_HEADER_READ_TIMEOUT", "1500ms"),
            ("GATE_IDLE_TIMEOUT", "2m"),
            ("GATE_BODY_READ_TIMEOUT", "45"),
            ("GATE_TRUSTED_PROXIES", "10.1.0.0/16, 192.168.0.7, fd00::/8"),
            ("GATE_ALLOWED_HOSTS", "MLflow.example.com, 127.0.0.1:8080"),
            ("GATE_TRACE_WRITE_CONNECTIONS", " Pooled "),
        ]);
        let c = from_env(env(&pairs)).unwrap();
        assert_eq!(c.session_refresh, Duration::from_secs(2));
        assert_eq!(
            c.allowed_clients,
            ["relay", "loadgen", "mlflow"],
            "our own client is always allowed"
        );
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.max_connections, 20);
        assert_eq!(c.header_read_timeout, Duration::from_millis(1500));
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.body_read_timeout, Duration::from_secs(45));
        assert_eq!(c.allowed_hosts, ["mlflow.example.com", "127.0.0.1:8080"]);
        assert_eq!(c.trace_write_connections, TraceWriteConnections::Pooled);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 5m "), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "s", "-1s", "1.5s", "5 parsecs", "1d", "99999999999999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn trusted_proxy_matching() {
        let t = TrustedProxies::parse("10.1.0.0/16, 192.168.0.7, fd00::/8, 0.0.0.0/0").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(t.contains(ip("8.8.8.8")), "0.0.0.0/0 is every IPv4 peer");
        let t = TrustedProxies::parse("10.1.0.0/16, 192.168.0.7, fd00::/8").unwrap();
        assert!(t.contains(ip("10.1.255.3")));
        assert!(!t.contains(ip("10.2.0.1")));
        assert!(t.contains(ip("192.168.0.7")));
        assert!(!t.contains(ip("192.168.0.8")));
        assert!(t.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped peer");
        assert!(t.contains(ip("fd12::1")));
        assert!(!t.contains(ip("fe80::1")));
        assert!(!t.contains(ip("127.0.0.1")));
        assert!(
            !TrustedProxies::default().contains(ip("127.0.0.1")),
            "nobody by default"
        );
        for bad in ["10.0.0.0/33", "fd00::/129", "host.example", "10.0.0.1/x", "10.0.0/8"] {
            assert!(TrustedProxies::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowed_hosts() {
        let a: Vec<String> = vec!["mlflow.example.com".into(), "127.0.0.1:8080".into(), "[::1]".into()];
        assert!(host_allowed(&a, "mlflow.example.com"));
        assert!(
            host_allowed(&a, "MLFLOW.example.com:443"),
            "a bare host matches any port"
        );
        assert!(host_allowed(&a, "127.0.0.1:8080"));
        assert!(!host_allowed(&a, "127.0.0.1:8081"));
        assert!(!host_allowed(&a, "127.0.0.1"));
        assert!(host_allowed(&a, "[::1]:8080"));
        for bad in [
            "evil.example",
            "mlflow.example.com.evil",
            "user@mlflow.example.com",
            "",
            "mlflow.example.com/x",
        ] {
            assert!(!host_allowed(&a, bad), "{bad:?}");
        }
    }
}
