//! A fast counting OTLP sink (`otlp-relay sink`) that plays MLflow in tests and benchmarks.
//!
//! It accepts OTLP/HTTP `POST /v1/traces` (protobuf or JSON, gzip/deflate bodies) and gRPC
//! `TraceService/Export` (on the HTTP port too, and on `--grpc-listen`), counts requests, spans,
//! unique spans (trace_id + span_id) and wire bytes, and serves them at `GET /stats`. It can play a
//! failing or slow MLflow (`--status`, `--fail-every`, `--delay-ms`, `--max-spans-per-sec`).
//! Protobuf bodies are walked, not decoded, so the sink stays far cheaper than anything it measures.
//!
//! Layout: `server` binds and accepts, `export` answers the two transports, `walk` finds the span
//! ids in a protobuf body, `count` keeps what `/stats` reports, `faults` plays the failing or slow
//! MLflow, `jwt` checks `--require-jwt`.
mod count;
mod export;
mod faults;
mod jwt;
mod server;
mod walk;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use count::UniqueSpans;
use server::start;

/// Largest body the sink reads (compressed or not).
const MAX_BODY: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SinkArgs {
    /// Address for OTLP/HTTP (and gRPC, which is served on the same port too), e.g. 127.0.0.1:4318.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// Extra address serving gRPC (and HTTP) e.g. 127.0.0.1:4317.
    #[arg(long)]
    pub(crate) grpc_listen: Option<SocketAddr>,
    /// Answer every request with this HTTP status (gRPC: the matching code); with --fail-every,
    /// the status of the failing requests.
    #[arg(long)]
    pub(crate) status: Option<u16>,
    /// Fail every Nth request (with --status, default 503).
    #[arg(long)]
    pub(crate) fail_every: Option<u64>,
    /// Fail the first N requests (with --status, default 503), then accept: "503, then 200".
    #[arg(long)]
    pub(crate) fail_first: Option<u64>,
    /// Delay every request by this many milliseconds before answering (a slow MLflow).
    #[arg(long, default_value_t = 0)]
    pub(crate) delay_ms: u64,
    /// Ingest at most this many spans per second overall (requests queue up behind each other).
    #[arg(long)]
    pub(crate) max_spans_per_sec: Option<f64>,
    /// Retry-After seconds on failures (gRPC: RetryInfo).
    #[arg(long)]
    pub(crate) retry_after: Option<u64>,
    /// Extra plain-HTTP address (no TLS) serving everything, /stats included: lets tests and
    /// loadgen --verify-sink read the counts of a TLS-only sink.
    #[arg(long)]
    pub(crate) stats_listen: Option<SocketAddr>,
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM) (mTLS).
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// Require a Bearer JWT on every export, verified against this JWKS URL (signature, exp with
    /// no leeway, aud); 401 otherwise. /stats counts the distinct tokens seen.
    #[arg(long, requires = "audience")]
    pub(crate) require_jwt: Option<String>,
    /// The audience a token must carry (with --require-jwt).
    #[arg(long, requires = "require_jwt")]
    pub(crate) audience: Option<String>,
}

/// google.rpc.Status and RetryInfo, the OTLP error payloads (not part of opentelemetry-proto).
pub use crate::otlp::rpc;

/// Why the sink could not start (mapped to an exit code by `cmd::sink`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// A bad argument: TLS files that cannot be loaded, a JWKS URL without a TLS client.
    #[error("{0:#}")]
    Args(anyhow::Error),
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// Serves until SIGTERM or Ctrl-C.
pub(crate) async fn run(args: SinkArgs) -> Result<(), StartError> {
    let (http_addr, grpc_addr, _state, handle) = start(&args).await?;
    tracing::info!(component = %"sink-http", addr = %http_addr, "listening");
    if let Some(a) = grpc_addr {
        tracing::info!(component = %"sink-grpc", addr = %a, "listening");
    }
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(StartError::Signal)?;
    tokio::select! {
        _ = handle => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prost::Message;

    use super::rpc;

    #[test]
    fn retry_info_round_trip() {
        let st = rpc::status(14, "x", Some(Duration::from_secs(3)));
        assert_eq!(rpc::retry_delay(&st.encode_to_vec()), Some(Duration::from_secs(3)));
        assert_eq!(rpc::retry_delay(&rpc::status(14, "x", None).encode_to_vec()), None);
    }
}
