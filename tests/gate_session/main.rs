//! The gate's sessions, tokens and connections under attack, against the real Keycloak-shaped
//! provider (tests/oidc), a real `mlflow server` where MLflow's answer matters, and headless
//! chromium for the browser logout: slow and surplus connections, ID / refresh / other clients'
//! tokens as Bearer tokens, sessions after logout or after the user is disabled, metrics on the
//! public port, 502 bodies, and forged X-Forwarded-* headers.
#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::gate::{Gate, start as gate};
use support::mlflow::Mlflow;
use support::oidc::{self, OidcOptions, OidcProvider, basic_auth, jwt_parts};
use support::wait_for;

mod connections;
mod exposure;
mod sessions;
mod tokens;

/// What these tests read of a running gate.
trait GateExt {
    fn pid(&self) -> u32;
    /// Open file descriptors of the gate process.
    fn fds(&self) -> usize;
    /// Sum of the admin listener's samples of `name` whose labels contain `label`.
    fn metric(&self, name: &str, label: &str) -> f64;
}

impl GateExt for Gate {
    fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn metric(&self, name: &str, label: &str) -> f64 {
        let (s, _, text) = exchange(self.admin, "GET", "/gate/metrics", &[], b"");
        assert_eq!(s, 200, "{text}");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(series, _)| {
                let (n, labels) = series.split_once('{').unwrap_or((series, ""));
                n == name && labels.contains(label)
            })
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum()
    }
}

/// The default provider, a stand-in upstream and a gate in front of it with `env`.
fn gate_on_upstream(env: &[(&str, &str)]) -> (OidcProvider, Upstream, Gate) {
    let provider = OidcProvider::start(OidcOptions::default());
    let up = upstream();
    let g = gate(&provider, &up.url(), env);
    (provider, up, g)
}

/// A client-credentials access token of the gate's own client.
fn client_token(provider: &OidcProvider) -> String {
    provider.access_token(oidc::CLIENT_ID, oidc::CLIENT_SECRET)
}

/// A GET of `path` carrying the session cookie `session` and nothing else.
fn get_with_session(g: &Gate, path: &str, session: &str) -> (u16, Vec<(String, String)>, String) {
    exchange(
        g.addr,
        "GET",
        path,
        &[("cookie", &format!("gate_session={session}"))],
        b"",
    )
}

/// One HTTP/1.1 exchange with exactly the given headers (a `host` is added unless given):
/// status, lower-cased headers (repeated ones in order), body.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let (status, headers, body) = support::http_exchange_pairs(method, addr, path, headers, body);
    (status, headers, String::from_utf8_lossy(&body).to_string())
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn set_cookies(hs: &[(String, String)]) -> Vec<&str> {
    hs.iter()
        .filter(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The value a Set-Cookie list gives cookie `name` (None if absent; "" when it is cleared).
fn cookie_value(hs: &[(String, String)], name: &str) -> Option<String> {
    set_cookies(hs).into_iter().find_map(|c| {
        let (kv, _) = c.split_once(';').unwrap_or((c, ""));
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A stand-in upstream for cases where the gate, not MLflow, is under test: reads each request
/// (head and content-length body), records its headers and answers 200 `{}`.
/// Size of the stand-in upstream's `GET /big` answer.
const BIG: usize = 256 << 20;

/// Request headers as received, lower-cased names.
type Headers = Vec<(String, String)>;

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Headers>>>,
    /// `GET /slow` requests waiting until `release` (a slow MLflow call).
    held: Arc<(Mutex<(usize, bool)>, std::sync::Condvar)>,
}

fn upstream() -> Upstream {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let held = Arc::new((Mutex::new((0, false)), std::sync::Condvar::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut stream) = stream else { continue };
            let seen = s2.clone();
            let held = h2.clone();
            std::thread::spawn(move || {
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&raw).to_string();
                let headers: Vec<(String, String)> = head
                    .split("\r\n\r\n")
                    .next()
                    .unwrap_or("")
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let head_len = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let mut have = raw.len() - head_len;
                while have < len {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                }
                seen.lock().unwrap().push(headers);
                if head.starts_with("GET /slow ") {
                    let (lock, cv) = &*held;
                    let mut state = lock.lock().unwrap();
                    state.0 += 1;
                    cv.notify_all();
                    while !state.1 {
                        state = cv.wait(state).unwrap();
                    }
                }
                if head.starts_with("GET /big ") {
                    // A large answer (an artifact download, say).
                    let _ = stream.write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\nconnection: close\r\n\r\n").as_bytes(),
                    );
                    let chunk = vec![0u8; 1 << 20];
                    for _ in 0..BIG >> 20 {
                        if stream.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                    return;
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            });
        }
    });
    Upstream { addr, seen, held }
}

impl Upstream {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many `GET /slow` requests have arrived.
    fn slow_arrived(&self) -> usize {
        self.held.0.lock().unwrap().0
    }

    /// Lets every held `GET /slow` request (and later ones) answer.
    fn release(&self) {
        self.held.0.lock().unwrap().1 = true;
        self.held.1.notify_all();
    }
}

/// A cookie jar for one origin.
#[derive(Default)]
struct Jar(HashMap<String, String>);

impl Jar {
    fn take(&mut self, hs: &[(String, String)]) {
        for c in set_cookies(hs) {
            let (kv, attrs) = c.split_once(';').unwrap_or((c, ""));
            if let Some((k, v)) = kv.split_once('=') {
                if v.is_empty() || attrs.to_ascii_lowercase().contains("max-age=0") {
                    self.0.remove(k.trim());
                } else {
                    self.0.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn split_url(url: &str) -> (SocketAddr, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    (
        host.parse().unwrap(),
        if path.is_empty() { "/".into() } else { path.into() },
    )
}

/// Follows redirects from `url` like a browser would (one jar per origin, the provider's login form
/// filled in with `user` when it shows), stopping at the first URL starting with `stop_at` (returned
/// with the gate's jar) or at a non-redirect answer (panics).
fn follow(url: &str, stop_at: &str, user: &str, jars: &mut HashMap<SocketAddr, Jar>) -> String {
    let mut url = url.to_string();
    for _ in 0..10 {
        if url.starts_with(stop_at) {
            return url;
        }
        let (addr, path) = split_url(&url);
        let jar = jars.entry(addr).or_default();
        let cookie = jar.header();
        let (mut s, mut hs, mut b) = exchange(addr, "GET", &path, &[("cookie", &cookie), ("accept", "text/html")], b"");
        jar.take(&hs);
        if s == 200 && b.contains("kc-form-login") {
            let form = format!("username={user}&password={user}");
            let cookie = jar.header();
            (s, hs, b) = exchange(
                addr,
                "POST",
                &path,
                &[
                    ("cookie", &cookie),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                form.as_bytes(),
            );
            jar.take(&hs);
        }
        assert!((300..400).contains(&s), "{url}: {s} {b}");
        let loc = header(&hs, "location").unwrap().to_string();
        url = if loc.starts_with("http") {
            loc
        } else {
            format!("http://{addr}{loc}")
        };
    }
    panic!("too many redirects from {url}");
}

/// Logs `user` in through the gate the way a browser does (navigation, provider, callback) and
/// returns the session cookie's value.
fn gate_login(g: &Gate, user: &str) -> String {
    let mut jars = HashMap::new();
    let (s, hs, b) = exchange(g.addr, "GET", "/", &[("accept", "text/html")], b"");
    assert_eq!(s, 302, "{b}");
    jars.entry(g.addr).or_insert_with(Jar::default).take(&hs);
    let callback = format!("http://{}/callback", g.addr);
    let back = follow(header(&hs, "location").unwrap(), &callback, user, &mut jars);
    let (_, path) = split_url(&back);
    let cookie = jars[&g.addr].header();
    let (s, hs, b) = exchange(g.addr, "GET", &path, &[("cookie", &cookie)], b"");
    assert_eq!(s, 302, "callback: {b}");
    cookie_value(&hs, "gate_session").unwrap_or_else(|| panic!("no session cookie: {hs:?}"))
}

/// The provider's token response for `user` after an authorization-code login (PKCE) of the gate's
/// client, done outside the gate: the real ID, access and refresh tokens.
fn code_flow_tokens(p: &OidcProvider, user: &str) -> serde_json::Value {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let verifier = b64.encode(rand_bytes());
    let challenge = b64.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ));
    let redirect = "http://127.0.0.1:9/callback";
    let url = format!(
        "{}?client_id={}&response_type=code&scope=openid%20profile%20email%20groups&redirect_uri={redirect}\
         &state=st&nonce=n0nce&code_challenge={challenge}&code_challenge_method=S256&login_hint={user}",
        p.auth_url(),
        oidc::CLIENT_ID
    );
    let back = follow(&url, redirect, user, &mut HashMap::new());
    let code = back
        .split("code=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_string();
    let form = format!("grant_type=authorization_code&code={code}&code_verifier={verifier}&redirect_uri={redirect}");
    let (_, path) = split_url(&p.token_url());
    let basic = basic_auth(oidc::CLIENT_ID, oidc::CLIENT_SECRET);
    let (s, _, b) = exchange(
        p.addr(),
        "POST",
        &path,
        &[
            ("authorization", &basic),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        form.as_bytes(),
    );
    assert_eq!(s, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b
}

/// A JWT signed RS256 with the provider's own signing key (its kid), the way Keycloak shapes its
/// tokens: the fixture's refresh tokens are opaque, Keycloak's are JWTs with `typ: Refresh`.
fn mint(p: &OidcProvider, header: serde_json::Value, claims: serde_json::Value) -> String {
    let script = r#"
const crypto = require('crypto'), fs = require('fs');
const jwk = JSON.parse(fs.readFileSync(process.env.KEY_FILE, 'utf8'));
const key = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
const b = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
const h = { ...JSON.parse(process.env.HEADER), alg: 'RS256', kid: jwk.kid };
const input = b(h) + '.' + b(JSON.parse(process.env.CLAIMS));
process.stdout.write(input + '.' + crypto.sign('sha256', Buffer.from(input), key).toString('base64url'));
"#;
    let out = Command::new("node")
        .args(["-e", script])
        .env("KEY_FILE", p.key_file())
        .env("HEADER", header.to_string())
        .env("CLAIMS", claims.to_string())
        .output()
        .expect("node");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Keycloak-like claims of a token for alice minted for the gate's client.
fn keycloak_claims(p: &OidcProvider, typ: Option<&str>) -> serde_json::Value {
    let mut c = serde_json::json!({
        "iss": p.issuer, "aud": oidc::CLIENT_ID, "sub": "alice", "azp": oidc::CLIENT_ID,
        "preferred_username": "alice", "groups": ["mlflow", "mlflow-admin"],
        "iat": now(), "exp": now() + 300,
    });
    if let Some(t) = typ {
        c["typ"] = t.into();
    }
    c
}

/// A connection from a slow client, seen from its side.
struct SlowClient {
    stream: TcpStream,
    kind: usize,
    closed_after: Option<Duration>,
}

impl SlowClient {
    /// Whether the server has closed the connection (reads end of file or an error).
    fn poll_closed(&mut self, t0: Instant) -> bool {
        if self.closed_after.is_some() {
            return true;
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(_) => break,
            }
        }
        self.closed_after = Some(t0.elapsed());
        true
    }
}
