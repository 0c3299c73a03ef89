//! The gate's listeners: a cap on open connections, a deadline for a new connection's first request
//! head, an idle timeout between requests, a pause limit while a request body is read, a limit on
//! how long an answer may wait for a client that does not read it, and accept errors backed off
//! (`net::Acceptor`, as every listener of the crate) with a rate-limited warning. Slow or silent clients cost at most one
//! connection slot for a bounded time. Requests in flight (each may hold a connection to MLflow)
//! are capped at the connection cap across all connections, so HTTP/2 multiplexing cannot
//! multiply sockets either.
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::metrics::{GateMetrics, ListenerLabel};
use super::proxy::{Body, BoxError};
use crate::net::{Acceptor, RateLimitedWarn, WARN_INTERVAL};
use crate::supervise::LockUnpoisoned;

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send>>;

/// HTTP/2 streams one connection may have open (hyper's default is 200).
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
}

/// Request activity on one connection, for its idle deadline.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `start` when the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Requests begun so far (0: still waiting for the first request head).
    requests: AtomicU64,
    /// Milliseconds after `start` + 1 since a write to the client has been blocked (0: not blocked).
    write_blocked_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            write_blocked_since_ms: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(self.clone())
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis().min(u128::from(u64::MAX - 1)) as u64
    }

    fn write_blocked(&self, blocked: bool) {
        if blocked {
            let _ =
                self.write_blocked_since_ms
                    .compare_exchange(0, self.now_ms() + 1, Ordering::SeqCst, Ordering::SeqCst);
        } else {
            self.write_blocked_since_ms.store(0, Ordering::SeqCst);
        }
    }

    /// When the connection must be closed: idle (no request in flight) past its limit, or an
    /// answer blocked on a client that has not read for GATE_IDLE_TIMEOUT. None: no deadline now.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            let blocked = self.write_blocked_since_ms.load(Ordering::SeqCst);
            return (blocked > 0).then(|| self.start + Duration::from_millis(blocked - 1) + limits.idle_timeout);
        }
        let since = self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        let limit = if self.requests.load(Ordering::SeqCst) == 0 {
            limits.header_read_timeout
        } else {
            limits.idle_timeout
        };
        Some(since + limit)
    }
}

/// The client's socket, telling [`Activity`] while writes to it are blocked.
struct WatchedStream {
    inner: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WatchedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_blocked(r.is_pending());
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_blocked(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity.write_blocked(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Held from a request's head until its response body is done (or dropped).
struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(self.0.now_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body read timed out")]
pub(crate) struct BodyTimeout;

/// Whether `e` (or any error behind it) is a request body that timed out in [`TimeoutBody`].
pub(crate) fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A request body that fails when the client pauses longer than `limit` while the gate waits for it.
/// Time the gate spends not reading (waiting on MLflow, say) does not count.
struct TimeoutBody {
    inner: Incoming,
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for TimeoutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(|e| Box::new(e) as BoxError)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `listener` with `handler` until `cancel`, then gives open requests up to 10 s.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    metrics: Arc<GateMetrics>,
    cancel: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Body>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let label = ListenerLabel { listener: name };
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let requests = RequestSlots {
        name,
        // HTTP/1.1 has one request in flight per connection; HTTP/2 could have many.
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        busy_warning: Arc::new(Mutex::new(RateLimitedWarn::new(WARN_INTERVAL))),
        metrics: metrics.clone(),
        label: label.clone(),
        body_limit: limits.body_read_timeout,
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let mut acceptor = Acceptor::new(name).counting_errors(metrics.accept_errors.get_or_create(&label).clone());
    let mut full_warning = RateLimitedWarn::new(WARN_INTERVAL);
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            x = acceptor.accept(&listener) => x,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Closing at once (rather than leaving it in the backlog) tells the client now and keeps
            // the kernel's queue free for when a slot opens.
            drop(stream);
            metrics.connections_refused.get_or_create(&label).inc();
            if let Some(suppressed) = full_warning.due() {
                tracing::warn!(
                    listener = name,
                    refused = suppressed + 1,
                    max = limits.max_connections,
                    "connection limit reached; closing new connections"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let (act, h, requests) = (activity.clone(), handler.clone(), requests.clone());
        let svc = hyper::service::service_fn(move |req| requests.call(&h, &act, req, peer));
        let stream = WatchedStream {
            inner: stream,
            activity: activity.clone(),
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let open = metrics.connections_open.get_or_create(&label).clone();
        let (conn_metrics, conn_label) = (metrics.clone(), label.clone());
        tokio::spawn(async move {
            let _permit = permit;
            open.inc();
            drive(conn, &activity, &limits, (&conn_metrics, &conn_label), peer).await;
            open.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(listener = name, "connections still open after 10 s; closing them");
    }
}

/// Runs one connection until it ends, or until it is idle (or its client stops reading an
/// answer) past its deadline.
async fn drive<C, E>(
    conn: C,
    activity: &Activity,
    limits: &Limits,
    (metrics, label): (&GateMetrics, &ListenerLabel),
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    loop {
        // Without a deadline now (a request in flight), look again soon: a write may block.
        let wake = activity
            .deadline(limits)
            .unwrap_or_else(|| Instant::now() + limits.idle_timeout / 4);
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                if activity.deadline(limits).is_some_and(|d| d <= Instant::now()) {
                    // Idle, or the client stopped reading its answer: dropping the
                    // connection loses nothing the client was going to take.
                    metrics.connections_timed_out.get_or_create(label).inc();
                    tracing::debug!(%peer, "closing a connection idle past its deadline");
                    return;
                }
            }
        }
    }
}

/// What the requests of one listener share: the cap on requests in flight across its connections.
#[derive(Clone)]
struct RequestSlots {
    name: &'static str,
    slots: Arc<Semaphore>,
    busy_warning: Arc<Mutex<RateLimitedWarn>>,
    metrics: Arc<GateMetrics>,
    label: ListenerLabel,
    body_limit: Duration,
}

impl RequestSlots {
    /// One request through `handler`, or 503 when too many are in flight. Its body is read with
    /// the pause limit; the connection counts as busy until the answer is sent.
    fn call<H, F>(
        &self,
        handler: &H,
        activity: &Arc<Activity>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> ServiceFuture
    where
        H: Fn(Request<Body>, SocketAddr) -> F,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let guard = activity.begin();
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.metrics.requests_refused.get_or_create(&self.label).inc();
            if let Some(suppressed) = self.busy_warning.lock_unpoisoned().due() {
                tracing::warn!(
                    listener = self.name,
                    refused = suppressed + 1,
                    "too many requests in flight; answering 503"
                );
            }
            let mut resp = super::detail(http::StatusCode::SERVICE_UNAVAILABLE, "Too many requests in flight");
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            drop(guard);
            return Box::pin(std::future::ready(Ok(resp)));
        };
        let req = req.map(|inner| {
            TimeoutBody {
                inner,
                limit: self.body_limit,
                sleep: None,
            }
            .boxed()
        });
        let fut = handler(req, peer);
        Box::pin(async move {
            let resp = fut.await;
            // The connection counts as busy, and the request slot taken, until the response
            // body is sent (or dropped).
            Ok::<_, std::convert::Infallible>(resp.map(|b| {
                b.map_frame(move |f| {
                    let _ = (&guard, &permit);
                    f
                })
                .boxed()
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_timeouts_are_found_behind_other_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BoxError);
        let e = Outer(Box::new(BodyTimeout));
        assert!(is_body_timeout(&e));
        assert!(!is_body_timeout(&Outer(Box::new(std::io::Error::other("x")))));
    }

    #[test]
    fn idle_deadlines() {
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
        };
        let a = Activity::new();
        // Before the first request head: the header-read deadline.
        assert_eq!(a.deadline(&limits), Some(a.start + Duration::from_secs(1)));
        let g = a.begin();
        assert_eq!(a.deadline(&limits), None, "busy while a request is in flight");
        let g2 = a.begin();
        drop(g);
        assert_eq!(a.deadline(&limits), None, "still one in flight (HTTP/2)");
        drop(g2);
        let d = a.deadline(&limits).unwrap();
        assert!(d >= a.start + Duration::from_secs(60), "then the idle deadline");
        // An answer blocked on a client that does not read: the idle limit from the first block.
        let g3 = a.begin();
        a.write_blocked(true);
        let blocked = a.deadline(&limits).unwrap();
        a.write_blocked(true);
        assert_eq!(a.deadline(&limits), Some(blocked), "counted from when the block began");
        assert!(blocked <= Instant::now() + Duration::from_secs(60));
        a.write_blocked(false);
        assert_eq!(a.deadline(&limits), None, "progress clears it");
        drop(g3);
    }
}
