//! The gate's sessions, tokens and connections under attack, against the real Keycloak-shaped
//! provider (tests/oidc), a real `mlflow server` where MLflow's answer matters, and headless
//! chromium for the browser logout: slow and surplus connections, ID / refresh / other clients'
//! tokens as Bearer tokens, sessions after logout or after the user is disabled, metrics on the
//! public port, 502 bodies, and forged X-Forwarded-* headers.
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

#[test]
fn slowloris_connections_are_closed_and_health_keeps_answering() {
    let (_provider, _up, g) = gate_on_upstream(&[("GATE_HEADER_READ_TIMEOUT", "1s"), ("GATE_IDLE_TIMEOUT", "2s")]);
    let baseline = g.fds();
    let t0 = Instant::now();
    // Five kinds: silent; a request line never finished; header lines dripped forever; one
    // complete request, then nothing (keep-alive idle); an HTTP/2 preface, then nothing.
    let mut clients: Vec<SlowClient> = (0..200)
        .map(|i| {
            let mut stream = TcpStream::connect(g.addr).unwrap();
            let kind = i % 5;
            match kind {
                1 => stream.write_all(b"GET /api/2.0/mlflow/experiments/search HTT").unwrap(),
                2 => stream.write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n").unwrap(),
                3 => stream
                    .write_all(b"GET /gate/healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                    .unwrap(),
                4 => stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap(),
                _ => {}
            }
            stream.set_nonblocking(true).unwrap();
            SlowClient {
                stream,
                kind,
                closed_after: None,
            }
        })
        .collect();
    let mut peak_fds = 0;
    let mut health_worst = Duration::ZERO;
    let deadline = t0 + Duration::from_secs(20);
    let mut round = 0;
    loop {
        round += 1;
        for c in clients.iter_mut().filter(|c| c.kind == 2 && c.closed_after.is_none()) {
            let _ = c.stream.write_all(format!("x-drip-{round}: 1\r\n").as_bytes());
        }
        let open = clients
            .iter_mut()
            .map(|c| c.poll_closed(t0))
            .filter(|closed| !closed)
            .count();
        peak_fds = peak_fds.max(g.fds());
        let h0 = Instant::now();
        let (s, _, b) = exchange(g.addr, "GET", "/gate/healthz", &[], b"");
        health_worst = health_worst.max(h0.elapsed());
        assert_eq!(s, 200, "healthz during the attack: {b}");
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of 200 slow connections still open after {:?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200)); // the drip interval of the attack
    }
    let by_kind = |k: usize| {
        clients
            .iter()
            .filter(|c| c.kind == k)
            .filter_map(|c| c.closed_after)
            .max()
            .unwrap()
    };
    eprintln!(
        "closed by kind (silent, partial line, drip, idle after a request, h2 preface): {:?} {:?} {:?} {:?} {:?}; \
         fds baseline {baseline} peak {peak_fds}; worst healthz {health_worst:?}",
        by_kind(0),
        by_kind(1),
        by_kind(2),
        by_kind(3),
        by_kind(4)
    );
    // Header-read deadline 1 s, idle 2 s (plus scheduling slack).
    for k in [0, 1, 2, 4] {
        assert!(by_kind(k) < Duration::from_secs(5), "kind {k}: {:?}", by_kind(k));
    }
    assert!(
        by_kind(3) >= Duration::from_secs(2),
        "idle keep-alive kept for GATE_IDLE_TIMEOUT"
    );
    assert!(health_worst < Duration::from_secs(2), "healthz took {health_worst:?}");
    assert!(peak_fds <= baseline + 220, "peak fds {peak_fds} (baseline {baseline})");
    wait_for("the gate's fds back near the baseline", Duration::from_secs(10), || {
        (g.fds() <= baseline + 10).then_some(())
    });
    assert!(g.metric("gate_connections_timed_out_total", "listener=\"public\"") >= 200.0);
}

#[test]
fn connections_beyond_the_cap_are_closed_at_once() {
    let (_provider, _up, g) = gate_on_upstream(&[("GATE_MAX_CONNECTIONS", "20"), ("GATE_HEADER_READ_TIMEOUT", "60s")]);
    let baseline = g.fds();
    let held: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(g.addr).unwrap()).collect();
    wait_for("20 open connections", Duration::from_secs(10), || {
        (g.metric("gate_connections_open", "listener=\"public\"") == 20.0).then_some(())
    });
    let t0 = Instant::now();
    let mut extra: Vec<SlowClient> = (0..40)
        .map(|_| {
            let stream = TcpStream::connect(g.addr).unwrap();
            stream.set_nonblocking(true).unwrap();
            SlowClient {
                stream,
                kind: 0,
                closed_after: None,
            }
        })
        .collect();
    wait_for("the 40 surplus connections closed", Duration::from_secs(10), || {
        extra.iter_mut().all(|c| c.poll_closed(t0)).then_some(())
    });
    eprintln!("surplus connections closed within {:?}", t0.elapsed());
    assert!(g.fds() <= baseline + 25, "fds {} (baseline {baseline})", g.fds());
    // The admin listener (probes, metrics) is not behind the public cap.
    let (s, _, _) = exchange(g.admin, "GET", "/gate/healthz", &[], b"");
    assert_eq!(s, 200);
    assert!(g.metric("gate_connections_refused_total", "listener=\"public\"") >= 40.0);
    assert!(g.proc.output_text().contains("connection limit reached"));
    // The held ones still work, and freed slots are served again.
    let mut first = held.into_iter().next().unwrap();
    first
        .write_all(b"GET /gate/healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_for("a slot again", Duration::from_secs(10), || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exchange(g.addr, "GET", "/gate/healthz", &[], b"").0
        }))
        .ok()
        .filter(|s| *s == 200)
    });
}

#[test]
fn id_and_refresh_tokens_are_not_bearer_tokens() {
    let mlflow = std::thread::spawn(Mlflow::start);
    let provider = OidcProvider::start(OidcOptions::default());
    let mlflow = mlflow.join().unwrap();
    let g = gate(&provider, &mlflow.url(), &[]);
    let path = "/api/2.0/mlflow/experiments/get?experiment_id=0";
    let call = |token: &str| {
        let (s, _, b) = exchange(g.addr, "GET", path, &[("authorization", &bearer(token))], b"");
        (s, b)
    };

    let tokens = code_flow_tokens(&provider, "alice");
    let (id_header, id_claims) = jwt_parts(tokens["id_token"].as_str().unwrap());
    eprintln!("provider ID token header {id_header} claims {id_claims}");
    assert_eq!(
        id_claims["aud"],
        oidc::CLIENT_ID,
        "an ID token's audience is the gate's client"
    );
    // Control: the access token of the same login reaches MLflow.
    let (s, b) = call(tokens["access_token"].as_str().unwrap());
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("Default"), "{b}");

    let mut refused = vec![
        ("provider ID token", tokens["id_token"].as_str().unwrap().to_string()),
        (
            "provider refresh token",
            tokens["refresh_token"].as_str().unwrap().to_string(),
        ),
    ];
    let jwt = serde_json::json!({"typ": "JWT"});
    for typ in ["ID", "Refresh", "Offline", "Logout"] {
        refused.push((typ, mint(&provider, jwt.clone(), keycloak_claims(&provider, Some(typ)))));
    }
    // An ID token from a provider that does not say its kind: its nonce and at_hash give it away.
    let mut plain_id = keycloak_claims(&provider, None);
    plain_id["nonce"] = "n0nce".into();
    plain_id["at_hash"] = "x".into();
    refused.push(("ID token without typ", mint(&provider, jwt.clone(), plain_id)));
    let mut logout = keycloak_claims(&provider, None);
    logout["events"] = serde_json::json!({"http://schemas.openid.net/event/backchannel-logout": {}});
    refused.push(("logout token", mint(&provider, jwt.clone(), logout)));
    for (what, token) in &refused {
        let (s, b) = call(token);
        assert_eq!(s, 401, "{what} accepted as a Bearer token: {b}");
    }
    assert!(g.metric("gate_auth_failures_total", "reason=\"not_access_token\"") >= 7.0);

    // Control: the same minting with Keycloak's access-token typ passes, so the refusals above are
    // about the kind of token and nothing else.
    let access = mint(&provider, jwt, keycloak_claims(&provider, Some("Bearer")));
    let (s, b) = call(&access);
    assert_eq!(s, 200, "{b}");
}

#[test]
fn tokens_of_clients_not_allowed_are_refused() {
    let provider = OidcProvider::start(OidcOptions::default());
    let up = upstream();
    let groups = ("OIDC_GROUP_NAME", "mlflow,mlflow-readers");
    let open = gate(&provider, &up.url(), &[groups]);
    let strict = gate(&provider, &up.url(), &[groups, ("GATE_ALLOWED_CLIENTS", "relay")]);
    let path = "/api/2.0/mlflow/experiments/search?max_results=1";
    let call = |g: &Gate, auth: &str| exchange(g.addr, "GET", path, &[("authorization", auth)], b"").0;

    let reader = provider.access_token(oidc::READER.0, oidc::READER.1);
    let (_, claims) = jwt_parts(&reader);
    assert_eq!(
        claims["aud"],
        oidc::CLIENT_ID,
        "the reader client's tokens name our audience"
    );
    assert_eq!(claims["azp"], oidc::READER.0);
    assert_eq!(
        call(&open, &bearer(&reader)),
        200,
        "any client, without GATE_ALLOWED_CLIENTS"
    );
    assert_eq!(call(&strict, &bearer(&reader)), 401);

    let ours = client_token(&provider);
    assert_eq!(
        call(&strict, &bearer(&ours)),
        200,
        "the gate's own client is always allowed"
    );
    assert_eq!(call(&strict, &basic_auth(oidc::CLIENT_ID, oidc::CLIENT_SECRET)), 200);
    // A listed client by RFC 9068's client_id; no client at all; an unlisted one posing as listed.
    let jwt = serde_json::json!({"typ": "at+jwt"});
    let with = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = keycloak_claims(&provider, Some("Bearer"));
        f(c.as_object_mut().unwrap());
        mint(&provider, jwt.clone(), c)
    };
    let relay = with(&|c| {
        c.remove("azp");
        c.insert("client_id".into(), "relay".into());
    });
    assert_eq!(call(&strict, &bearer(&relay)), 200);
    let nobody = with(&|c| {
        c.remove("azp");
    });
    assert_eq!(call(&strict, &bearer(&nobody)), 401);
    let posing = with(&|c| {
        c.insert("azp".into(), "reader".into());
        c.insert("client_id".into(), "relay".into());
    });
    assert_eq!(call(&strict, &bearer(&posing)), 401);
    assert!(strict.metric("gate_auth_failures_total", "reason=\"client\"") >= 3.0);
}

/// Polls an API call with the session cookie among others (following re-sealed cookies) until it
/// answers `want`.
fn poll_session(g: &Gate, cookie: &mut String, want: u16, within: Duration) -> Duration {
    let t0 = Instant::now();
    wait_for(&format!("the session answered {want}"), within, || {
        let (s, hs, _) = exchange(
            g.addr,
            "GET",
            "/api/2.0/mlflow/experiments/search?max_results=1",
            &[("cookie", &format!("theme=dark; gate_session={cookie}; _ga=1"))],
            b"",
        );
        if let Some(v) = cookie_value(&hs, "gate_session").filter(|v| !v.is_empty()) {
            *cookie = v;
        }
        (s == want).then(|| t0.elapsed())
    })
}

/// Keeps the session `cookie` in use (each call answered 200) until the gate has re-checked live
/// sessions with the provider `checks` times.
fn wait_live_rechecks(g: &Gate, cookie: &mut String, checks: f64, within: Duration) {
    wait_for("re-checks of a live session", within, || {
        poll_session(g, cookie, 200, Duration::from_secs(5));
        (g.metric("gate_session_checks_total", "result=\"active\"") >= checks).then_some(())
    });
}

#[test]
fn logout_in_the_browser_ends_the_session_on_every_replica() {
    let provider = OidcProvider::start(OidcOptions {
        auto_login: false,
        ..Default::default()
    });
    let up = upstream();
    let refresh = ("GATE_SESSION_REFRESH", "2s");
    let a = gate(&provider, &up.url(), &[refresh]);
    let b = gate(&provider, &up.url(), &[refresh]);

    // Control: a session on B survives its re-checks with the provider.
    let mut other = gate_login(&b, "alice");
    wait_live_rechecks(&b, &mut other, 2.0, Duration::from_secs(15));

    let shots = support::cache_dir().parent().unwrap().join("gate-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let r = support::browser::login(
        &format!("http://{}/", a.addr),
        "alice",
        "alice",
        &shots.join("logout.png"),
        &[("LOGOUT", "1"), ("COOKIE_VALUES", "1")],
    );
    assert!(r.get("error").is_none(), "{r:#}");
    let logged_out_at = Instant::now();
    assert!(
        r["afterLogoutUrl"].as_str().unwrap().starts_with(&provider.issuer),
        "back at the provider's login form: {r:#}"
    );
    let old = r["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gate_session")
        .and_then(|c| c["value"].as_str())
        .unwrap_or_else(|| panic!("no session cookie: {r:#}"))
        .to_string();
    // The replayed cookie: refused at once where the logout happened...
    let (s, hs, body) = get_with_session(&a, "/api/2.0/mlflow/experiments/search?max_results=1", &old);
    assert_eq!(s, 401, "{body}");
    assert_eq!(
        cookie_value(&hs, "gate_session").as_deref(),
        Some(""),
        "cleared: {hs:?}"
    );
    let (s, hs, _) = exchange(
        a.addr,
        "GET",
        "/",
        &[("cookie", &format!("gate_session={old}")), ("accept", "text/html")],
        b"",
    );
    assert_eq!(s, 302);
    assert!(
        header(&hs, "location").unwrap().starts_with(&provider.auth_url()),
        "{hs:?}"
    );
    // ...and on the other replica within GATE_SESSION_REFRESH (it asks the provider).
    let mut replayed = old.clone();
    let took = poll_session(&b, &mut replayed, 401, Duration::from_secs(10));
    eprintln!(
        "old cookie refused by the other replica {:?} after the logout",
        logged_out_at.elapsed()
    );
    assert!(took <= Duration::from_secs(4), "{took:?}");
    assert!(b.metric("gate_session_checks_total", "result=\"ended\"") >= 1.0);
    // Other sessions of the same user are the provider's business; ours is still fine.
    poll_session(&b, &mut other, 200, Duration::from_secs(5));
}

#[test]
fn a_disabled_user_loses_access_within_the_refresh_interval() {
    disabled_user_loses_access(true);
}

#[test]
fn a_disabled_user_loses_access_without_introspection() {
    // The gate falls back to a refresh grant to ask the provider.
    disabled_user_loses_access(false);
}

fn disabled_user_loses_access(introspection: bool) {
    let provider = OidcProvider::start(OidcOptions {
        introspection,
        ..Default::default()
    });
    let discovery = exchange(
        provider.addr(),
        "GET",
        &split_url(&provider.discovery_url()).1,
        &[],
        b"",
    )
    .2;
    assert_eq!(
        discovery.contains("introspection_endpoint"),
        introspection,
        "{discovery}"
    );
    let up = upstream();
    let g = gate(&provider, &up.url(), &[("GATE_SESSION_REFRESH", "2s")]);
    let mut cookie = gate_login(&g, "alice");
    poll_session(&g, &mut cookie, 200, Duration::from_secs(5));
    wait_live_rechecks(&g, &mut cookie, 1.0, Duration::from_secs(10));
    let (s, _, b) = exchange(
        provider.addr(),
        "PUT",
        &format!("/admin/realms/{}/users/alice", provider.opts.realm),
        &[("content-type", "application/json")],
        br#"{"enabled": false}"#,
    );
    assert_eq!(s, 204, "{b}");
    let took = poll_session(&g, &mut cookie, 401, Duration::from_secs(10));
    eprintln!("disabled user refused {took:?} after being disabled");
    assert!(took <= Duration::from_secs(4), "{took:?}");
    // Replayed again: refused again (the provider keeps saying no).
    assert_eq!(
        get_with_session(&g, "/api/2.0/mlflow/experiments/search", &cookie).0,
        401
    );
}

#[test]
fn metrics_are_served_on_the_admin_listener_only() {
    let (provider, up, g) = gate_on_upstream(&[]);
    let token = client_token(&provider);
    for auth in [None, Some(bearer(&token))] {
        let hs: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        for path in ["/gate/metrics", "/gate/metrics?x=1"] {
            let (s, _, b) = exchange(g.addr, "GET", path, &hs, b"");
            assert_eq!(s, 404, "{path} {b}");
            assert!(!b.contains("gate_requests"), "{b}");
        }
    }
    assert!(up.seen.lock().unwrap().is_empty(), "never forwarded upstream");
    // Look-alike paths are ordinary (authenticated) MLflow paths, never the gate's metrics.
    for path in [
        "/gate/metrics/",
        "/gate//metrics",
        "/gate/%6detrics",
        "//gate/metrics",
        "/GATE/metrics",
    ] {
        let (_, _, b) = exchange(g.addr, "GET", path, &[("authorization", &bearer(&token))], b"");
        assert!(!b.contains("gate_requests"), "{path}: {b}");
    }
    let (s, hs, b) = exchange(g.admin, "GET", "/gate/metrics", &[], b"");
    assert_eq!(s, 200);
    assert!(header(&hs, "content-type").unwrap().contains("openmetrics"));
    assert!(
        b.contains("gate_requests_total") && b.contains("gate_connections_open"),
        "{b}"
    );
    assert_eq!(exchange(g.admin, "GET", "/gate/readyz", &[], b"").0, 200);
    assert_eq!(
        exchange(g.addr, "GET", "/gate/healthz", &[], b"").0,
        200,
        "probes stay public too"
    );
    let (s, _, _) = exchange(
        g.admin,
        "GET",
        "/api/2.0/mlflow/experiments/search",
        &[("authorization", &bearer(&token))],
        b"",
    );
    assert_eq!(s, 404, "the admin listener is no way into MLflow");
}

#[test]
fn bad_gateway_answers_carry_no_internal_detail() {
    let provider = OidcProvider::start(OidcOptions::default());
    let token = client_token(&provider);
    // An upstream that accepts and hangs up at once.
    let rude = TcpListener::bind("127.0.0.1:0").unwrap();
    let rude_addr = rude.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in rude.incoming() {
            drop(s);
        }
    });
    let closed = support::free_port();
    for upstream in [
        format!("http://127.0.0.1:{closed}"),
        format!("http://{rude_addr}"),
        "http://upstream.invalid:5000".to_string(),
    ] {
        let g = gate(&provider, &upstream, &[]);
        let (s, _, b) = exchange(
            g.addr,
            "GET",
            "/api/2.0/mlflow/experiments/search",
            &[("authorization", &bearer(&token))],
            b"",
        );
        assert_eq!(s, 502, "{upstream}: {b}");
        assert_eq!(b, r#"{"detail":"MLflow upstream unavailable"}"#, "{upstream}");
        // The cause is in the log (read by another thread: waited for, not read once).
        wait_for("the cause in the gate's log", Duration::from_secs(10), || {
            g.proc
                .output_text()
                .lines()
                .any(|l| l.contains("MLflow upstream unavailable") && l.contains("error="))
                .then_some(())
        });
    }
}

#[test]
fn forwarded_headers_from_untrusted_peers_are_ignored() {
    let (provider, up, g) = gate_on_upstream(&[]);
    let own_callback = format!("http%3A%2F%2F{}%2Fcallback", g.addr).replace(':', "%3A");
    let login = |g: &Gate, hs: &[(&str, &str)]| {
        let mut all = vec![("accept", "text/html")];
        all.extend_from_slice(hs);
        exchange(g.addr, "GET", "/", &all, b"")
    };
    let host = g.addr.to_string();
    for forged in [
        vec![("x-forwarded-host", "evil.example"), ("x-forwarded-proto", "https")],
        vec![("x-forwarded-host", "evil.example:443, 127.0.0.1")],
        vec![("x-forwarded-proto", "https")],
        vec![("forwarded", "host=evil.example;proto=https")],
    ] {
        let mut hs = vec![("host", host.as_str())];
        hs.extend(forged.iter().copied());
        let (s, rhs, b) = login(&g, &hs);
        assert_eq!(s, 302, "{forged:?}: {b}");
        let loc = header(&rhs, "location").unwrap();
        assert!(
            loc.contains(&format!("redirect_uri={own_callback}")),
            "{forged:?}: {loc}"
        );
        assert!(!loc.contains("evil"), "{loc}");
        let c = set_cookies(&rhs).join("\n");
        assert!(c.contains("gate_login=") && !c.contains("Secure"), "{forged:?}: {c}");
    }
    // A Host not in GATE_ALLOWED_HOSTS builds no redirect at all.
    for bad in ["evil.example", "127.0.0.2", "127.0.0.1.evil.example"] {
        let (s, rhs, b) = login(&g, &[("host", bad)]);
        assert_eq!(s, 400, "{bad}: {b}");
        assert!(header(&rhs, "location").is_none());
        assert!(b.contains("OIDC_REDIRECT_URI"), "{b}");
    }
    // What MLflow hears: the gate's view, not the client's story.
    let token = client_token(&provider);
    let auth = bearer(&token);
    let forged = [
        ("authorization", auth.as_str()),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6"),
    ];
    assert_eq!(
        exchange(g.addr, "GET", "/api/2.0/mlflow/experiments/search", &forged, b"").0,
        200
    );
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(header(&seen, "x-forwarded-for"), Some("127.0.0.1"), "{seen:?}");
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(&seen, "forwarded"), None);

    // Control: from a trusted proxy the same headers count.
    let t = gate(&provider, &up.url(), &[("GATE_TRUSTED_PROXIES", "127.0.0.1/32")]);
    let (s, rhs, b) = login(
        &t,
        &[("x-forwarded-host", "mlflow.example"), ("x-forwarded-proto", "https")],
    );
    assert_eq!(s, 302, "{b}");
    let loc = header(&rhs, "location").unwrap();
    assert!(
        loc.contains("redirect_uri=https%3A%2F%2Fmlflow.example%2Fcallback"),
        "{loc}"
    );
    assert!(set_cookies(&rhs).join("\n").contains("Secure"));
    assert_eq!(
        exchange(t.addr, "GET", "/api/2.0/mlflow/experiments/search", &forged, b"").0,
        200
    );
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(header(&seen, "x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"), "{seen:?}");
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("https"));
}

/// Sends a POST head announcing `len` body bytes, then `first` bytes, then one byte every `every`
/// until answered; returns the status and when it came.
fn dripped_body(g: &Gate, token: &str, len: usize, first: usize, every: Duration) -> (u16, Duration) {
    let mut s = TcpStream::connect(g.addr).unwrap();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
         content-type: application/x-protobuf\r\nx-mlflow-experiment-id: 0\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&vec![0u8; first]).unwrap();
    s.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let mut sent = first;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_secs(60) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if sent < len {
            let _ = s.write_all(&[0]);
            sent += 1;
        }
        std::thread::sleep(every); // the attacker's drip interval
    }
    let text = String::from_utf8_lossy(&got);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, t0.elapsed())
}

#[test]
fn slow_request_bodies_are_cut_off() {
    let (provider, _up, g) = gate_on_upstream(&[("GATE_BODY_READ_TIMEOUT", "1s")]);
    let token = client_token(&provider);
    // Control: a body with pauses shorter than the limit goes through.
    let (s, took) = dripped_body(&g, &token, 4, 0, Duration::from_millis(300));
    assert_eq!(s, 200, "{took:?}");
    // A byte every 1.5 s, and a body that never starts: cut off after about a second of silence.
    for (first, every) in [(10, Duration::from_millis(1500)), (0, Duration::from_millis(1500))] {
        let (s, took) = dripped_body(&g, &token, 100, first, every);
        eprintln!("dripped body ({first} bytes first, then one per {every:?}): {s} after {took:?}");
        assert_eq!(s, 408, "after {took:?}");
        assert!(took < Duration::from_secs(6), "{took:?}");
    }
}

#[test]
fn sessions_are_not_passed_while_the_provider_cannot_confirm_them() {
    let (mut provider, _up, g) = gate_on_upstream(&[("GATE_SESSION_REFRESH", "1s")]);
    let mut cookie = gate_login(&g, "alice");
    poll_session(&g, &mut cookie, 200, Duration::from_secs(5));
    provider.stop();
    // Due for its check and nobody to ask: 503, never a pass.
    let took = poll_session(&g, &mut cookie, 503, Duration::from_secs(10));
    eprintln!("session refused {took:?} after the provider went away");
    assert!(g.metric("gate_session_checks_total", "result=\"error\"") >= 1.0);
    // The gate's own paths do not depend on it: probes answer and logout clears the cookie.
    assert_eq!(exchange(g.addr, "GET", "/gate/healthz", &[], b"").0, 200);
    let (s, hs, _) = get_with_session(&g, "/logout", &cookie);
    assert_eq!(s, 302);
    assert_eq!(cookie_value(&hs, "gate_session").as_deref(), Some(""), "{hs:?}");
    // The provider back (a restart forgets its grants): a new login works again.
    provider.start_again();
    let mut fresh = gate_login(&g, "alice");
    poll_session(&g, &mut fresh, 200, Duration::from_secs(20));
    // The logged-out one stays refused on this replica.
    assert_eq!(
        get_with_session(&g, "/api/2.0/mlflow/experiments/search", &cookie).0,
        401
    );
}

#[test]
fn answers_nobody_reads_do_not_hold_connections() {
    let (provider, _up, g) = gate_on_upstream(&[("GATE_IDLE_TIMEOUT", "2s")]);
    let token = client_token(&provider);
    let mut s = TcpStream::connect(g.addr).unwrap();
    s.write_all(format!("GET /big HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\r\n").as_bytes())
        .unwrap();
    // The client reads nothing; the gate's writes block once the socket buffers are full.
    wait_for(
        "the stalled answer's connection closed",
        Duration::from_secs(20),
        || (g.metric("gate_connections_timed_out_total", "listener=\"public\"") >= 1.0).then_some(()),
    );
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    eprintln!("the client got {got} of {BIG} bytes before the gate hung up");
    assert!(got < BIG, "the whole answer was kept waiting for the client");
    wait_for("no connection left open", Duration::from_secs(10), || {
        (g.metric("gate_connections_open", "listener=\"public\"") == 0.0).then_some(())
    });
}

#[test]
fn http2_multiplexing_cannot_exceed_the_request_cap() {
    let (provider, up, g) = gate_on_upstream(&[("GATE_MAX_CONNECTIONS", "5")]);
    let token = client_token(&provider);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let statuses: Vec<u16> = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(g.addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        // One connection, 20 concurrent streams, each a slow MLflow call.
        let calls = (0..20).map(|_| {
            let mut send = send.clone();
            let req = http::Request::get(format!("http://{}/slow", g.addr))
                .header("authorization", bearer(&token))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            tokio::spawn(async move { send.send_request(req).await.map(|r| r.status().as_u16()).unwrap_or(0) })
        });
        let calls: Vec<_> = calls.collect();
        // Those over the cap are answered at once, while the others still wait on MLflow.
        let refused = tokio::task::spawn_blocking({
            let admin = g.admin;
            move || {
                wait_for("15 requests refused", Duration::from_secs(20), || {
                    let (_, _, text) = exchange(admin, "GET", "/gate/metrics", &[], b"");
                    text.lines()
                        .find(|l| l.starts_with("gate_requests_refused_total"))
                        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .filter(|n| *n >= 15.0)
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(refused, 15.0);
        let arrived = tokio::task::block_in_place(|| {
            wait_for("the admitted requests at MLflow", Duration::from_secs(10), || {
                (up.slow_arrived() >= 5).then(|| up.slow_arrived())
            })
        });
        assert_eq!(arrived, 5, "only the capped number reached MLflow");
        up.release();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap());
        }
        out
    });
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    eprintln!("20 streams on one connection with a cap of 5: {ok} answered, {busy} refused");
    assert_eq!((ok, busy), (5, 15), "{statuses:?}");
}
