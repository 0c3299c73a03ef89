//! A real, Keycloak-shaped OpenID provider for tests: npm `oidc-provider` running tests/oidc/oidc-server.mjs.
//! Issuer `http://127.0.0.1:PORT/realms/REALM`, endpoints under `/protocol/openid-connect/`.
//! Clients, users and groups are the fixture's (see the constants below and the script's header).
use std::path::PathBuf;
use std::process::Command;

use super::{Proc, npm::npm_project};

/// The client the gate and the relay are configured with (a confidential client, service account in
/// groups mlflow + mlflow-admin).
pub const CLIENT_ID: &str = "mlflow";
pub const CLIENT_SECRET: &str = "mlflow-secret";
/// A service account in no group.
pub const NOACCESS: (&str, &str) = ("noaccess", "noaccess-secret");
/// A service account in group mlflow-readers only.
pub const READER: (&str, &str) = ("reader", "reader-secret");
/// A client whose tokens carry audience "other" (a token minted for another client).
pub const OTHER: (&str, &str) = ("other", "other-secret");
/// Users: (name, password, groups).
pub const USERS: &[(&str, &str, &[&str])] = &[
    ("alice", "alice", &["mlflow", "mlflow-admin"]),
    ("bob", "bob", &["other"]),
    ("carol", "carol", &["mlflow-readers"]),
];

#[derive(Debug, Clone)]
pub struct OidcOptions {
    /// Realm name: the issuer ends in `/realms/<realm>`.
    pub realm: String,
    /// Lifetime of access, client-credentials and ID tokens in seconds (fixture default 60).
    pub token_ttl_secs: u64,
    /// true: `/auth` logs in `login_hint` (or alice) without a form; false: a username/password form.
    pub auto_login: bool,
    /// Audience of the `mlflow` client's tokens (default "mlflow").
    pub audience: Option<String>,
    /// RSA signing key file (JWK). None: a fresh key in the provider's own temp dir, kept across
    /// `restart()`. Give two providers the same file to have two issuers sign with one key.
    pub key_file: Option<PathBuf>,
    /// Fixed port; 0 picks a free one below the ephemeral range (safe to restart on).
    pub port: u16,
    /// false: no token introspection endpoint (a provider that has none).
    pub introspection: bool,
}

impl Default for OidcOptions {
    fn default() -> Self {
        OidcOptions {
            realm: "test".into(),
            token_ttl_secs: 60,
            auto_login: true,
            audience: None,
            key_file: None,
            port: 0,
            introspection: true,
        }
    }
}

pub struct OidcProvider {
    pub opts: OidcOptions,
    pub issuer: String,
    pub port: u16,
    key_file: PathBuf,
    proc: Option<Proc>,
    _dir: tempfile::TempDir,
}

impl OidcProvider {
    pub fn start(opts: OidcOptions) -> OidcProvider {
        let dir = tempfile::tempdir().unwrap();
        let key_file = opts
            .key_file
            .clone()
            .unwrap_or_else(|| dir.path().join("signing-key.json"));
        // Port 0 would let the kernel pick an ephemeral port, which another connection may take
        // while the provider is down for a restart; pick one below that range instead.
        let port = if opts.port == 0 {
            super::restartable_port()
        } else {
            opts.port
        };
        let mut p = OidcProvider {
            port,
            opts,
            issuer: String::new(),
            key_file,
            proc: None,
            _dir: dir,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let dir = npm_project("oidc");
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("oidc-server.mjs"))
            .current_dir(&dir)
            .env("PORT", self.port.to_string())
            .env("REALM", &self.opts.realm)
            .env("TOKEN_TTL", self.opts.token_ttl_secs.to_string())
            .env("AUTO_LOGIN", if self.opts.auto_login { "1" } else { "0" })
            .env("KEY_FILE", &self.key_file)
            .env("CLIENT_SECRET", CLIENT_SECRET)
            .env("INTROSPECTION", if self.opts.introspection { "1" } else { "0" })
            .env_remove("REDIRECT_URIS");
        if let Some(aud) = &self.opts.audience {
            cmd.env("AUDIENCE", aud);
        }
        let mut proc = Proc::spawn(&format!("oidc-{}", self.opts.realm), cmd);
        let line = proc.wait_line("oidc ready ", super::STARTUP);
        self.issuer = line.split_once("oidc ready ").unwrap().1.trim().to_string();
        let port = self
            .issuer
            .trim_start_matches("http://127.0.0.1:")
            .split('/')
            .next()
            .unwrap();
        self.port = port.parse().unwrap();
        self.proc = Some(proc);
    }

    /// Stops the provider (its port and key are kept for `start_again`).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same port with the same signing key (a provider restart).
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Restarts on the same port with a new signing key (new kid): tokens signed before are now
    /// signed by an unknown key.
    pub fn restart_with_new_key(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.key_file);
        self.spawn();
    }

    /// The provider process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    pub fn key_file(&self) -> &PathBuf {
        &self.key_file
    }

    pub fn output_text(&self) -> String {
        self.proc.as_ref().map(|p| p.output_text()).unwrap_or_default()
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }
    pub fn auth_url(&self) -> String {
        format!("{}/protocol/openid-connect/auth", self.issuer)
    }
    pub fn token_url(&self) -> String {
        format!("{}/protocol/openid-connect/token", self.issuer)
    }
    pub fn jwks_url(&self) -> String {
        format!("{}/protocol/openid-connect/certs", self.issuer)
    }
    pub fn end_session_url(&self) -> String {
        format!("{}/protocol/openid-connect/logout", self.issuer)
    }
    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// A client-credentials token response (JSON) for `client_id`/`secret`; panics unless 200.
    pub fn client_credentials(&self, client_id: &str, secret: &str) -> serde_json::Value {
        let basic = basic_auth(client_id, secret);
        let path = format!("/realms/{}/protocol/openid-connect/token", self.opts.realm);
        let (status, body) = super::http(
            "POST",
            self.addr(),
            &path,
            &[
                ("authorization", &basic),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            b"grant_type=client_credentials",
        );
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "token request for {client_id}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Just the access token of `client_credentials`.
    pub fn access_token(&self, client_id: &str, secret: &str) -> String {
        self.client_credentials(client_id, secret)["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// `Basic base64(user:password)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// The decoded JSON header and claims of a JWT (no verification; for assertions).
pub fn jwt_parts(token: &str) -> (serde_json::Value, serde_json::Value) {
    use base64::Engine;
    let dec = |s: &str| -> serde_json::Value {
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap()
    };
    let mut it = token.split('.');
    (dec(it.next().unwrap()), dec(it.next().unwrap()))
}
