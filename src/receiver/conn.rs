//! Connection bounds for the receivers: the per-listener connection limit (and readiness while
//! at it), HTTP/1 header and HTTP/2 keepalive settings, closing idle connections, and the
//! metrics that count every connection closed on a client.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ProtocolConfig;
use crate::supervise::LockUnpoisoned;
use crate::telemetry::{Health, Metrics, ReceiverLabels};

/// The most connections per listener by default; lowered when the open-file limit is low.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Descriptors kept for everything but receiver connections (admin, exporters, spool, TLS files).
const RESERVED_FILES: u64 = 128;
/// HTTP/2 streams a client may reset before the server saw them, per connection (rapid reset).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 flow control, fixed (no adaptive growth, which would let a fast client grow the
/// windows) so that what a client can make the relay buffer is known: at most a stream window
/// of data the handler has not read yet per stream, and a connection window over all of a
/// connection's streams. Each HTTP/2 request holds a stream window of the memory budget while
/// it is served (`body::transport_buffer_hold`), so those buffers are charged too. 256 KiB keeps a
/// stream near full speed on fast links (64 KiB, the protocol's default, made 16 MiB bodies
/// four times slower on loopback).
pub(crate) const HTTP2_STREAM_WINDOW: u32 = 256 * 1024;
pub(crate) const HTTP2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// The most an HTTP/1 connection reads ahead of its handler (hyper's default is about 400 KiB);
/// held of the memory budget per request too. Request headers must fit in it.
pub(crate) const HTTP1_READ_BUFFER: usize = 64 * 1024;
/// The HTTP/2 default (and least) frame size.
const HTTP2_MAX_FRAME: u32 = 16 * 1024;
/// How long a connection closed for idleness may take to finish (HTTP/2 GOAWAY) before it is dropped.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The default max_connections: 1024, or half of what the open-file limit leaves after
/// RESERVED_FILES (a gRPC and an HTTP listener together then cannot exhaust it, and the health
/// and metrics listeners and the exporters still get descriptors). 1024 descriptors give 448.
pub(crate) fn default_max_connections() -> usize {
    match crate::net::open_files_limit() {
        Some(limit) => (limit.saturating_sub(RESERVED_FILES) / 2).clamp(16, DEFAULT_MAX_CONNECTIONS as u64) as usize,
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// A listener's connection bounds, from its configuration.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSettings {
    pub(crate) max_connections: usize,
    pub(crate) read_header_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) keepalive_time: Duration,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) max_concurrent_streams: u32,
}

impl ConnectionSettings {
    pub(crate) fn from_config(p: &ProtocolConfig) -> ConnectionSettings {
        let keepalive = p.keepalive.clone().unwrap_or_default().server_parameters;
        let idle = if keepalive.max_connection_idle.0.is_zero() {
            p.idle_timeout.0
        } else {
            keepalive.max_connection_idle.0
        };
        ConnectionSettings {
            max_connections: p.max_connections.unwrap_or_else(default_max_connections),
            read_header_timeout: p.read_header_timeout.0,
            read_timeout: p.read_timeout.0,
            idle_timeout: idle,
            keepalive_time: keepalive.time.0,
            keepalive_timeout: keepalive.timeout.0,
            max_concurrent_streams: p.max_concurrent_streams.unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS),
        }
    }

    /// The hyper server for one connection (HTTP/1 or HTTP/2, by what the client speaks).
    pub(crate) fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Starts when the connection waits for a request's first byte: bounds slowloris and,
        // for HTTP/1, the wait for the next request on a keep-alive connection too.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.read_header_timeout)
            .max_buf_size(HTTP1_READ_BUFFER);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(self.keepalive_time)
            .keep_alive_timeout(self.keepalive_timeout)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .adaptive_window(false)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .max_frame_size(HTTP2_MAX_FRAME);
        builder
    }
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings::from_config(&ProtocolConfig::default())
    }
}

/// A listener's open connections against its limit. At the limit new connections are accepted
/// and closed at once (the client learns it now rather than after a connect timeout, and the
/// backlog does not fill up), and readiness names the limit until a connection closes.
pub(crate) struct Slots {
    semaphore: Arc<Semaphore>,
    max: usize,
    /// Whether readiness currently reports the limit; locked while changing it.
    at_limit: Mutex<bool>,
    health: Arc<Health>,
    /// The readiness key: `<receiver>-<transport> connections`.
    component: String,
    open: Gauge,
}

impl Slots {
    pub(crate) fn new(
        component: &str,
        max: usize,
        health: Arc<Health>,
        metrics: &Metrics,
        labels: ReceiverLabels,
    ) -> Arc<Slots> {
        Arc::new(Slots {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
            at_limit: Mutex::new(false),
            health,
            component: format!("{component} connections"),
            open: metrics.receiver_open_connections.get_or_create(&labels).clone(),
        })
    }

    /// A slot for a new connection, or None at the limit (readiness then says so).
    pub(crate) fn try_take(self: &Arc<Self>) -> Option<Slot> {
        match self.semaphore.clone().try_acquire_owned() {
            Ok(permit) => {
                self.open.inc();
                Some(Slot {
                    permit: Some(permit),
                    slots: self.clone(),
                })
            }
            Err(_) => {
                let mut at_limit = self.at_limit.lock_unpoisoned();
                if !*at_limit && self.semaphore.available_permits() == 0 {
                    *at_limit = true;
                    self.health.set_unready(
                        &self.component,
                        Some(format!(
                            "at max_connections ({}): new connections are refused until one closes",
                            self.max
                        )),
                    );
                }
                None
            }
        }
    }

    fn released(&self) {
        let mut at_limit = self.at_limit.lock_unpoisoned();
        if *at_limit && self.semaphore.available_permits() > 0 {
            *at_limit = false;
            self.health.set_unready(&self.component, None);
        }
    }
}

/// One open connection's place under the limit, given back on drop.
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.slots.open.dec();
        self.slots.released();
    }
}

/// Whether a connection has a request in flight, and since when it has had none.
pub(crate) struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
    /// Whether any request has started on the connection.
    any: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last_done: Mutex::new(Instant::now()),
            any: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.any.store(true, Ordering::Release);
        InFlight(self.clone())
    }

    /// Whether a request has started on the connection yet.
    pub(crate) fn had_request(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// None while a request is in flight, else when the last one ended (or the connection began).
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.last_done.lock_unpoisoned())
    }
}

/// A request being served; ends on drop.
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_done.lock_unpoisoned() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a connection ended on hyper's header read timeout.
pub(crate) fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_bound_connections_and_readiness_follows() {
        let health = Arc::new(Health::default());
        health.set_started();
        let metrics = Metrics::new();
        let labels = ReceiverLabels {
            receiver: "otlp".into(),
            transport: "http".into(),
        };
        let slots = Slots::new("otlp-http", 2, health.clone(), &metrics, labels);
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        assert!(health.not_ready().unwrap().contains("at max_connections (2)"));
        assert!(
            metrics
                .encode()
                .contains("otlp_relay_receiver_open_connections{receiver=\"otlp\",transport=\"http\"} 2")
        );
        drop(a);
        assert_eq!(health.not_ready(), None);
        assert!(slots.try_take().is_some());
    }

    #[test]
    fn default_limit_leaves_descriptors_for_the_rest() {
        let n = default_max_connections();
        assert!((16..=DEFAULT_MAX_CONNECTIONS).contains(&n));
        if let Some(limit) = crate::net::open_files_limit() {
            assert!(2 * n as u64 + RESERVED_FILES <= limit.max(2 * 16 + RESERVED_FILES));
        }
    }

    #[test]
    fn activity_tracks_requests_in_flight() {
        let activity = Activity::new();
        assert!(activity.idle_since().is_some());
        assert!(!activity.had_request());
        let req = activity.start();
        assert!(activity.idle_since().is_none());
        assert!(activity.had_request());
        let before = Instant::now();
        drop(req);
        assert!(activity.idle_since().unwrap() >= before);
    }
}
