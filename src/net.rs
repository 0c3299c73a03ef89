//! Accept loops that survive their errors: a failed accept (out of descriptors, out of buffers)
//! backs off instead of spinning, and its warning is rate-limited to one line per interval that
//! says how many were suppressed. Shared by every listener: the receivers, the admin (health,
//! metrics) servers, the gate and the sink.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};

/// The first wait after a failed accept; doubled on each further failure up to the maximum, and
/// reset by the next successful accept.
pub(crate) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
pub(crate) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning line per interval for a repeated condition.
pub(crate) const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Decides when a repeated warning may be logged again, counting the ones it holds back.
#[derive(Debug)]
pub(crate) struct RateLimitedWarn {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    pub(crate) fn new(interval: Duration) -> RateLimitedWarn {
        RateLimitedWarn {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed)` when a line is due now (with how many were held back since the last
    /// one), `None` when this occurrence is only counted.
    pub(crate) fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Accepts connections from one listener with backoff on errors.
#[derive(Debug)]
pub(crate) struct Acceptor {
    component: String,
    delay: Duration,
    warn: RateLimitedWarn,
    /// Counts every failed accept, where the listener has a metric for it.
    errors: Option<Counter>,
}

impl Acceptor {
    pub(crate) fn new(component: &str) -> Acceptor {
        Acceptor {
            component: component.to_string(),
            delay: ACCEPT_BACKOFF_MIN,
            warn: RateLimitedWarn::new(WARN_INTERVAL),
            errors: None,
        }
    }

    /// Also counts each failed accept in `errors`.
    pub(crate) fn counting_errors(mut self, errors: Counter) -> Acceptor {
        self.errors = Some(errors);
        self
    }

    /// The next connection. Errors never end the loop: at the descriptor limit the listener is
    /// readable all the time, so retrying at once would burn a core and flood the log while the
    /// connections that hold the descriptors never get the CPU to finish.
    pub(crate) async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(x) => {
                    self.delay = ACCEPT_BACKOFF_MIN;
                    return x;
                }
                Err(e) => {
                    if let Some(errors) = &self.errors {
                        errors.inc();
                    }
                    if let Some(suppressed) = self.warn.due() {
                        tracing::warn!(
                            component = %self.component,
                            error = %e,
                            suppressed,
                            retry_in = ?self.delay,
                            "accept failed; retrying with backoff (suppressed: failures since the previous line)"
                        );
                    }
                    tokio::time::sleep(self.delay).await;
                    self.delay = next_delay(self.delay);
                }
            }
        }
    }
}

/// The accept backoff after `delay`: doubled, up to the maximum.
fn next_delay(delay: Duration) -> Duration {
    (delay * 2).min(ACCEPT_BACKOFF_MAX)
}

/// The process's soft limit on open files, where the platform says (Linux `/proc`).
pub(crate) fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_rate_limited_with_a_count() {
        let mut w = RateLimitedWarn::new(Duration::from_secs(3600));
        assert_eq!(w.due(), Some(0));
        for _ in 0..1000 {
            assert_eq!(w.due(), None);
        }
        w.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(w.due(), Some(1000));
        assert_eq!(w.due(), None);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second() {
        let mut d = ACCEPT_BACKOFF_MIN;
        let mut seen = vec![d.as_millis()];
        for _ in 0..12 {
            d = next_delay(d);
            seen.push(d.as_millis());
        }
        assert_eq!(&seen[..4], &[5, 10, 20, 40]);
        assert_eq!(*seen.last().unwrap(), 1000);
        assert!(seen.iter().all(|&ms| ms <= 1000));
    }

    #[test]
    fn open_files_limit_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(open_files_limit().is_some_and(|n| n > 0));
        }
    }
}
