//! Receivers: the listener, TLS handshake and client identity check shared by the OTLP/gRPC
//! and OTLP/HTTP endpoints, connection bounds, and graceful connection shutdown.
mod body;
pub(crate) mod build;
mod conn;
mod cors;
mod errors;
pub(crate) mod grpc;
pub mod http;

pub(crate) use conn::ConnectionSettings;
pub use errors::ReceiveError;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::{Acceptor, RateLimitedWarn, WARN_INTERVAL};
use crate::pipeline::Intake;
use crate::supervise::LockUnpoisoned;
use crate::telemetry::{Health, Metrics, ReceiverLabels};
use crate::tls::{PeerIdentity, ServerTls};
use conn::{Activity, Slot, Slots, is_header_timeout};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request handler needs, shared by a receiver's connections.
pub(crate) struct ReceiverContext {
    /// The receiver's component id, e.g. `otlp`.
    pub(crate) receiver: String,
    pub(crate) transport: &'static str,
    pub(crate) intake: Arc<Intake>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_recv_msg_size_mib: u64,
    pub(crate) include_metadata: bool,
    /// Set once a request's experiment header was ignored (include_metadata off): said once.
    pub(crate) ignored_metadata_warned: std::sync::atomic::AtomicBool,
    /// Connection limits and timeouts of this listener.
    pub(crate) connections: ConnectionSettings,
    /// Where the listener reports why it is not ready (at its connection limit, certificate
    /// out of its validity period).
    pub(crate) health: Arc<Health>,
    /// This listener's counters, registered once: no label strings are built per request.
    pub(crate) handles: Arc<crate::telemetry::ReceiverHandles>,
    /// Cross-origin settings of the HTTP listener (None: no CORS headers, as the collector).
    pub(crate) cors: Option<crate::config::CorsConfig>,
}

impl ReceiverContext {
    pub(crate) fn max_bytes(&self) -> usize {
        (self.max_recv_msg_size_mib * 1024 * 1024) as usize
    }

    fn labels(&self) -> ReceiverLabels {
        ReceiverLabels {
            receiver: self.receiver.clone(),
            transport: self.transport.to_string(),
        }
    }

    fn accepted(&self, spans: usize) {
        self.handles.accepted.inc_by(spans as u64);
    }

    fn refused(&self, spans: usize, reason: &str) {
        if spans == 0 {
            return;
        }
        self.handles.refused.inc_by(reason, spans as u64);
    }

    /// Spans the receiver could not take itself (invalid ids): the collector's failed spans.
    fn failed(&self, spans: usize) {
        self.handles.failed.inc_by(spans as u64);
    }
}

/// What the TLS handshake established about the client, per connection.
#[derive(Debug, Default)]
pub(crate) struct ConnInfo {
    pub(crate) peer: Option<PeerIdentity>,
    /// False when allowed_clients is set and the certificate matches none of it.
    pub(crate) allowed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
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
/// for up to `grace`. At most `max_connections` are open at once; the rest are closed on
/// accept, counted, and warned about once per interval.
pub(crate) async fn serve(
    mut listener: crate::supervise::ListenerLease,
    protocol: Protocol,
    tls: Option<Arc<ServerTls>>,
    ctx: Arc<ReceiverContext>,
    stop: CancellationToken,
    grace: Duration,
) {
    let component = format!("{}-{}", ctx.receiver, ctx.transport);
    let settings = ctx.connections.clone();
    if let Some(limit) = crate::net::open_files_limit()
        && settings.max_connections as u64 >= limit
    {
        tracing::warn!(
            component = %component,
            max_connections = settings.max_connections,
            open_files_limit = limit,
            "max_connections is not below the open-file limit: at that many connections the health and metrics listeners cannot accept"
        );
    }
    let slots = Slots::new(
        &component,
        settings.max_connections,
        ctx.health.clone(),
        &ctx.metrics,
        ctx.labels(),
    );
    let tracker = TaskTracker::new();
    let builder = settings.builder();
    let mut acceptor = Acceptor::new(&component);
    crate::supervise::fault_point("receiver");
    let mut at_limit_warn = RateLimitedWarn::new(WARN_INTERVAL);
    // A client with the wrong CA (or an expired server certificate) fails every handshake:
    // one line per interval, with a count, instead of one per connection.
    let handshake_log = Arc::new(std::sync::Mutex::new(RateLimitedWarn::new(WARN_INTERVAL)));
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = acceptor.accept(&listener) => accepted,
        };
        let Some(slot) = slots.try_take() else {
            drop(stream);
            ctx.handles.connections_refused.inc_by("max_connections", 1);
            if let Some(suppressed) = at_limit_warn.due() {
                tracing::warn!(
                    component = %component,
                    max_connections = settings.max_connections,
                    suppressed,
                    "at max_connections: closing new connections (`suppressed`: closed since the last line)"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        let component = component.clone();
        let handshake_log = handshake_log.clone();
        tracker.spawn(async move {
            match tls {
                None => {
                    let info = Arc::new(ConnInfo {
                        peer: None,
                        allowed: true,
                    });
                    serve_connection(stream, protocol, ctx, info, builder, stop, grace, slot).await;
                }
                Some(tls) => {
                    let limit = HANDSHAKE_TIMEOUT.min(settings.read_header_timeout);
                    let accepted = tokio::time::timeout(limit, tls.acceptor().accept(stream)).await;
                    let stream = match accepted {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            ctx.handles.connections_closed.inc_by("handshake_failed", 1);
                            let due = handshake_log.lock_unpoisoned().due();
                            if let Some(suppressed) = due {
                                tracing::warn!(component = %component, %remote, error = %e, suppressed, "TLS handshake failed (logged once per interval; `suppressed` since the last line)");
                            }
                            return;
                        }
                        Err(_) => {
                            ctx.handles.connections_closed.inc_by("handshake_timeout", 1);
                            let due = handshake_log.lock_unpoisoned().due();
                            if let Some(suppressed) = due {
                                tracing::warn!(component = %component, %remote, suppressed, "TLS handshake timed out (logged once per interval)");
                            }
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
                    let info = Arc::new(ConnInfo { peer, allowed });
                    serve_connection(stream, protocol, ctx, info, builder, stop, grace, slot).await;
                }
            }
        });
    }
    listener.finish();
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(component = %component, "connections still open after {grace:?}; closing them");
    }
}

/// Serves one connection until the client closes it, it has had no request in flight for
/// idle_timeout, or the receiver stops; then closes it gracefully, and drops it when that
/// takes too long (a client that does not read).
#[allow(clippy::too_many_arguments)]
async fn serve_connection<S>(
    stream: S,
    protocol: Protocol,
    ctx: Arc<ReceiverContext>,
    info: Arc<ConnInfo>,
    builder: auto::Builder<TokioExecutor>,
    stop: CancellationToken,
    grace: Duration,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let svc = {
        let (ctx, activity) = (ctx.clone(), activity.clone());
        hyper::service::service_fn(move |req| {
            let in_flight = activity.start();
            let response = handle(protocol, ctx.clone(), info.clone(), req);
            async move {
                let r = response.await;
                drop(in_flight);
                r
            }
        })
    };
    let idle = ctx.connections.idle_timeout;
    // A connection that has not started a request yet gets read_header_timeout for its first
    // one (HTTP/2, and HTTP/1 before the protocol is known, have no header timer of their own).
    let first = idle.min(ctx.connections.read_header_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
    tokio::pin!(conn);
    let idle_check = tokio::time::sleep(first);
    tokio::pin!(idle_check);
    let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    // Whether the close was counted already (hyper's header timer may fire along with ours).
    let mut counted = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result
                    && !counted
                    && is_header_timeout(e.as_ref())
                {
                    ctx.handles.connections_closed.inc_by("header_timeout", 1);
                }
                break;
            }
            _ = stop.cancelled(), if deadline.is_none() => {
                conn.as_mut().graceful_shutdown();
                deadline = Some(Box::pin(tokio::time::sleep(grace)));
            }
            _ = &mut idle_check, if deadline.is_none() => {
                let now = tokio::time::Instant::now();
                let idle = if activity.had_request() { idle } else { first };
                match activity.idle_since() {
                    Some(since) if since.elapsed() >= idle => {
                        let reason = if activity.had_request() { "idle_timeout" } else { "header_timeout" };
                        ctx.handles.connections_closed.inc_by(reason, 1);
                        counted = true;
                        conn.as_mut().graceful_shutdown();
                        deadline = Some(Box::pin(tokio::time::sleep(conn::CLOSE_GRACE)));
                    }
                    Some(since) => idle_check.as_mut().reset(now + idle.saturating_sub(since.elapsed())),
                    None => idle_check.as_mut().reset(now + idle),
                }
            }
            _ = async { if let Some(d) = deadline.as_mut() { d.await } }, if deadline.is_some() => break,
        }
    }
    drop(slot);
}

/// The client's name for refusals: the certificate's first SAN.
fn client_name(conn: &ConnInfo) -> String {
    conn.peer
        .as_ref()
        .map(|p| p.display_name().to_string())
        .unwrap_or_else(|| "(no certificate)".into())
}

/// The request's headers for processors' `from_context`, when include_metadata allows it (as
/// the collector's client metadata); headers that are not text are left out.
fn request_context(ctx: &ReceiverContext, headers: &::http::HeaderMap) -> crate::processor::RequestContext {
    if !ctx.include_metadata {
        return Default::default();
    }
    crate::processor::RequestContext::from_headers(
        headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
    )
}

/// What a request's MLflow headers say (`x-mlflow-experiment-id`, a numeric id;
/// `x-mlflow-run-id`; `x-mlflow-workspace`), when include_metadata allows it.
fn request_routing(ctx: &ReceiverContext, headers: &::http::HeaderMap) -> crate::pipeline::RequestRouting {
    const NAMES: [&str; 3] = [
        crate::otlp::EXPERIMENT_HEADER,
        crate::export::otlphttp::RUN_HEADER,
        crate::export::experiments::WORKSPACE_HEADER,
    ];
    let [experiment, run, workspace] = NAMES.map(|name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    });
    if experiment.is_none() && run.is_none() && workspace.is_none() {
        return Default::default();
    }
    if !ctx.include_metadata {
        // A silent fallback to the exporter's experiment sends traces where nobody looks for them.
        if !ctx
            .ignored_metadata_warned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                receiver = %ctx.receiver,
                transport = ctx.transport,
                "a request carries x-mlflow-experiment-id, x-mlflow-run-id or x-mlflow-workspace, which is \
                 ignored: set include_metadata: true on this receiver's protocol to route by it (said once)"
            );
        }
        return Default::default();
    }
    crate::pipeline::RequestRouting {
        experiment: experiment
            .and_then(crate::otlp::ExperimentId::parse)
            .map(|id| std::sync::Arc::from(id.into_string())),
        run: run.map(std::sync::Arc::from),
        workspace: workspace.map(std::sync::Arc::from),
    }
}
