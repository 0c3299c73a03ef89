//! Receivers: the listener, TLS handshake and client identity check shared by the OTLP/gRPC
//! and OTLP/HTTP endpoints, and graceful connection shutdown.
mod errors;
pub mod grpc;
pub mod http;

pub use errors::ReceiveError;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Intake;
use crate::telemetry::{Metrics, ReceiverLabels, RefusedLabels};
use crate::tls::{PeerIdentity, ServerTls};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request handler needs, shared by a receiver's connections.
pub struct ReceiverContext {
    /// The receiver's component id, e.g. `otlp`.
    pub receiver: String,
    pub transport: &'static str,
    pub intake: Arc<Intake>,
    pub metrics: Arc<Metrics>,
    pub max_recv_msg_size_mib: u64,
    pub include_metadata: bool,
    /// Set once a request's experiment header was ignored (include_metadata off): said once.
    pub ignored_metadata_warned: std::sync::atomic::AtomicBool,
}

impl ReceiverContext {
    pub fn max_bytes(&self) -> usize {
        (self.max_recv_msg_size_mib * 1024 * 1024) as usize
    }

    fn accepted(&self, spans: usize) {
        let labels = ReceiverLabels {
            receiver: self.receiver.clone(),
            transport: self.transport.to_string(),
        };
        self.metrics
            .receiver_accepted_spans
            .get_or_create(&labels)
            .inc_by(spans as u64);
    }

    fn refused(&self, spans: usize, reason: &str) {
        if spans == 0 {
            return;
        }
        let labels = RefusedLabels {
            receiver: self.receiver.clone(),
            transport: self.transport.to_string(),
            reason: reason.to_string(),
        };
        self.metrics
            .receiver_refused_spans
            .get_or_create(&labels)
            .inc_by(spans as u64);
    }
}

/// What the TLS handshake established about the client, per connection.
#[derive(Debug, Default)]
pub struct ConnInfo {
    pub peer: Option<PeerIdentity>,
    /// False when allowed_clients is set and the certificate matches none of it.
    pub allowed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

type ResponseBody = tonic::body::Body;

async fn handle(
    protocol: Protocol,
    ctx: Arc<ReceiverContext>,
    conn: Arc<ConnInfo>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<ResponseBody>, Infallible> {
    Ok(match protocol {
        Protocol::Grpc => grpc::handle(ctx, conn, req).await,
        Protocol::Http => http::handle(ctx, conn, req).await,
    })
}

/// Accepts connections until `stop` fires, then lets open connections finish their requests
/// for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    protocol: Protocol,
    tls: Option<Arc<ServerTls>>,
    ctx: Arc<ReceiverContext>,
    stop: CancellationToken,
    grace: Duration,
) {
    let component = format!("{}-{}", ctx.receiver, ctx.transport);
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(component = %component, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let component = component.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let conn = Arc::new(ConnInfo {
                        peer: None,
                        allowed: true,
                    });
                    let svc = hyper::service::service_fn(move |req| handle(protocol, ctx.clone(), conn.clone(), req));
                    let _ = watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned())
                        .await;
                }
                Some(tls) => {
                    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await;
                    let stream = match accepted {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(component = %component, %remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(component = %component, %remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let peer = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|c| PeerIdentity::from_certificate(c.as_ref()));
                    let allowed = tls.client_allowed(peer.as_ref());
                    if !allowed {
                        let name = peer.as_ref().map(|p| p.display_name().to_string()).unwrap_or_default();
                        tracing::warn!(component = %component, %remote, client = %name, "client certificate not in allowed_clients");
                    }
                    let conn = Arc::new(ConnInfo { peer, allowed });
                    let svc = hyper::service::service_fn(move |req| handle(protocol, ctx.clone(), conn.clone(), req));
                    let _ = watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned())
                        .await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(component = %component, "connections still open after {grace:?}; closing them");
    }
}

/// The client's name for refusals: the certificate's first SAN.
fn client_name(conn: &ConnInfo) -> String {
    conn.peer
        .as_ref()
        .map(|p| p.display_name().to_string())
        .unwrap_or_else(|| "(no certificate)".into())
}

/// A numeric experiment id from a request header, when include_metadata allows it.
fn request_experiment(ctx: &ReceiverContext, headers: &::http::HeaderMap) -> Option<String> {
    let header = headers.get(crate::export::otlphttp::EXPERIMENT_HEADER)?;
    if !ctx.include_metadata {
        // A silent fallback to the exporter's experiment sends traces where nobody looks for them.
        if !ctx
            .ignored_metadata_warned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                receiver = %ctx.receiver,
                transport = ctx.transport,
                "a request carries x-mlflow-experiment-id, which is ignored: set include_metadata: true \
                 on this receiver's protocol to route by it (said once)"
            );
        }
        return None;
    }
    let v = header.to_str().ok()?.trim();
    (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).then(|| v.to_string())
}
