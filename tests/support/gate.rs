//! `otlp-relay gate` as a test process: its command line for a provider and an upstream, and the
//! running gate with its public and admin listeners.
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use super::oidc::{self, OidcProvider};
use super::{Proc, wait_for};

/// The gate's session sealing key in tests.
pub const SECRET_KEY: &str = "a test secret key that is long enough";

/// A running gate.
pub struct Gate {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// The admin listener (/gate/metrics, probes).
    pub admin: SocketAddr,
    /// From spawn to healthy with the provider discovered.
    pub started: Duration,
}

/// The command line of `otlp-relay gate` for `provider` in front of `upstream`: both listeners
/// on free ports, Host 127.0.0.1 allowed for login redirects, debug logs; `env` comes last and
/// overrides any of these.
pub fn command(provider: &OidcProvider, upstream: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(super::bin());
    cmd.arg("gate")
        .env("NO_COLOR", "1")
        .env("OIDC_DISCOVERY_URL", provider.discovery_url())
        .env("OIDC_CLIENT_ID", oidc::CLIENT_ID)
        .env("OIDC_CLIENT_SECRET", oidc::CLIENT_SECRET)
        .env("SECRET_KEY", SECRET_KEY)
        .env("GATE_LISTEN", "127.0.0.1:0")
        .env("GATE_UPSTREAM", upstream)
        .env("GATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("GATE_ALLOWED_HOSTS", "127.0.0.1")
        .env("OTLP_RELAY_LOG", "info,otlp_relay=debug")
        .envs(env.iter().copied());
    cmd
}

/// Starts the gate of `command` and waits until it is healthy with the provider discovered
/// (tokens can be checked).
pub fn start(provider: &OidcProvider, upstream: &str, env: &[(&str, &str)]) -> Gate {
    let t0 = Instant::now();
    let mut proc = Proc::spawn("gate", command(provider, upstream, env));
    let addr = proc.wait_listen("gate", super::STARTUP);
    let admin = proc.wait_listen("gate-admin", super::STARTUP);
    wait_for("gate discovery", super::STARTUP, || {
        let (s, _, b) = super::http_exchange("GET", admin, "/gate/healthz", &[], b"");
        (s == 200 && String::from_utf8_lossy(&b).contains("\"oidc_ready\":true")).then_some(())
    });
    Gate {
        proc,
        addr,
        admin,
        started: t0.elapsed(),
    }
}
