//! The token cache's pure core: whether to use the cached token, refresh it, fetch one or report
//! the last failure; the backoff between failed fetches; which failures to log. No sockets, no
//! clock of its own (callers pass `now`), so every rule is unit-tested.
use std::time::{Duration, Instant};

use http::HeaderValue;

/// First wait after a failed fetch; doubles per failure up to BACKOFF_MAX.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The same failure is logged at most this often.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The provider refused our credentials (400/401/403): an operator must act; not ready.
    Rejected,
    /// Down, slow, 5xx or garbled: wait and try again.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    /// Safe to log: the provider's error and error_description, or a transport error.
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn rejected(message: impl Into<String>) -> Failure {
        Failure {
            kind: FailureKind::Rejected,
            message: message.into(),
        }
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Failure {
        Failure {
            kind: FailureKind::Unavailable,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    /// Use this token.
    Fresh(HeaderValue),
    /// Still valid but due for refresh: one caller refreshes, the others keep using it.
    Due(HeaderValue),
    /// Nothing usable: fetch (one caller at a time).
    Missing,
    /// Nothing usable and the last fetch failed recently: do not hammer the endpoint.
    BackingOff(Failure),
}

#[derive(Debug)]
struct Current {
    value: HeaderValue,
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct TokenState {
    expiry_buffer: Duration,
    current: Option<Current>,
    failures: u32,
    retry_at: Option<Instant>,
    last_failure: Option<Failure>,
    last_logged: Option<(Instant, String)>,
}

/// What `fail` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailOutcome {
    pub(crate) log: bool,
    pub(crate) retry_in: Duration,
}

impl TokenState {
    pub(crate) fn new(expiry_buffer: Duration) -> TokenState {
        TokenState {
            expiry_buffer,
            current: None,
            failures: 0,
            retry_at: None,
            last_failure: None,
            last_logged: None,
        }
    }

    /// When a token of `lifetime` should be replaced: `expiry_buffer` before it expires, but
    /// for short-lived tokens (lifetime under twice the buffer) at half its lifetime.
    pub(crate) fn refresh_after(&self, lifetime: Duration) -> Duration {
        lifetime - self.expiry_buffer.min(lifetime / 2)
    }

    pub(crate) fn check(&self, now: Instant) -> Check {
        let backing_off = self.retry_at.is_some_and(|t| now < t);
        match &self.current {
            Some(c) if c.expires_at.is_none_or(|e| now < e) => {
                if !backing_off && c.refresh_at.is_some_and(|r| now >= r) {
                    Check::Due(c.value.clone())
                } else {
                    Check::Fresh(c.value.clone())
                }
            }
            _ if backing_off => Check::BackingOff(
                self.last_failure
                    .clone()
                    .unwrap_or_else(|| Failure::unavailable("token endpoint backing off")),
            ),
            _ => Check::Missing,
        }
    }

    /// A token arrived, valid for `lifetime` from `now` (None: unknown, used until a 401).
    /// Returns whether it ends a run of failures (worth saying so).
    pub(crate) fn store(&mut self, value: HeaderValue, lifetime: Option<Duration>, now: Instant) -> bool {
        let recovered = self.failures > 0;
        self.current = Some(Current {
            value,
            // checked: a lifetime past the clock's range means no expiry (used until a 401)
            expires_at: lifetime.and_then(|l| now.checked_add(l)),
            refresh_at: lifetime.and_then(|l| now.checked_add(self.refresh_after(l))),
        });
        self.failures = 0;
        self.retry_at = None;
        self.last_failure = None;
        self.last_logged = None;
        recovered
    }

    /// A fetch failed: back off exponentially; log a failure when it is new or a minute passed.
    pub(crate) fn fail(&mut self, failure: Failure, now: Instant) -> FailOutcome {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(16);
        let retry_in = BACKOFF_MIN.saturating_mul(1 << exp).min(BACKOFF_MAX);
        self.retry_at = Some(now + retry_in);
        let log = match &self.last_logged {
            None => true,
            Some((at, message)) => *message != failure.message || now.duration_since(*at) >= LOG_EVERY,
        };
        if log {
            self.last_logged = Some((now, failure.message.clone()));
        }
        self.last_failure = Some(failure);
        FailOutcome { log, retry_in }
    }

    /// The destination answered 401 to `rejected`: forget it if it is still the current token
    /// (a 401 for an older token must not throw away a newer one).
    pub(crate) fn invalidate(&mut self, rejected: &HeaderValue) -> bool {
        if self.current.as_ref().is_some_and(|c| c.value == *rejected) {
            self.current = None;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn refreshes_before_the_buffer_or_at_half_life() {
        let st = TokenState::new(S(300));
        assert_eq!(st.refresh_after(S(3600)), S(3300));
        assert_eq!(st.refresh_after(S(600)), S(300));
        // Short tokens: half their lifetime, never "already due" on arrival.
        assert_eq!(st.refresh_after(S(60)), S(30));
        assert_eq!(st.refresh_after(S(3)), Duration::from_millis(1500));
    }

    #[test]
    fn token_lifecycle_fresh_due_expired() {
        let t0 = Instant::now();
        let mut st = TokenState::new(S(300));
        assert_eq!(st.check(t0), Check::Missing);
        st.store(hv("Bearer a"), Some(S(60)), t0);
        assert_eq!(st.check(t0), Check::Fresh(hv("Bearer a")));
        assert_eq!(st.check(t0 + S(29)), Check::Fresh(hv("Bearer a")));
        assert_eq!(st.check(t0 + S(30)), Check::Due(hv("Bearer a")));
        assert_eq!(st.check(t0 + S(59)), Check::Due(hv("Bearer a")));
        assert_eq!(st.check(t0 + S(60)), Check::Missing);
    }

    #[test]
    fn unknown_lifetime_lasts_until_a_401() {
        let t0 = Instant::now();
        let mut st = TokenState::new(S(300));
        st.store(hv("Bearer a"), None, t0);
        assert_eq!(st.check(t0 + S(86_400)), Check::Fresh(hv("Bearer a")));
        assert!(st.invalidate(&hv("Bearer a")));
        assert_eq!(st.check(t0 + S(86_400)), Check::Missing);
    }

    #[test]
    fn invalidate_only_drops_the_rejected_token() {
        let t0 = Instant::now();
        let mut st = TokenState::new(S(5));
        st.store(hv("Bearer new"), Some(S(60)), t0);
        assert!(!st.invalidate(&hv("Bearer old")));
        assert_eq!(st.check(t0), Check::Fresh(hv("Bearer new")));
        assert!(st.invalidate(&hv("Bearer new")));
        assert_eq!(st.check(t0), Check::Missing);
    }

    #[test]
    fn failures_back_off_exponentially_and_reset_on_success() {
        let t0 = Instant::now();
        let mut st = TokenState::new(S(5));
        let waits: Vec<Duration> = (0..8)
            .map(|_| st.fail(Failure::unavailable("connection refused"), t0).retry_in)
            .collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 5000, 5000, 5000].map(Duration::from_millis)
        );
        assert_eq!(
            st.check(t0 + S(4)),
            Check::BackingOff(Failure::unavailable("connection refused"))
        );
        assert_eq!(st.check(t0 + S(5)), Check::Missing);
        assert!(st.store(hv("Bearer a"), Some(S(60)), t0 + S(10)));
        assert_eq!(st.failures, 0);
        assert_eq!(st.fail(Failure::unavailable("x"), t0 + S(11)).retry_in, BACKOFF_MIN);
    }

    #[test]
    fn a_valid_token_is_kept_while_refreshes_fail() {
        let t0 = Instant::now();
        let mut st = TokenState::new(S(300));
        st.store(hv("Bearer a"), Some(S(10)), t0);
        assert_eq!(st.check(t0 + S(6)), Check::Due(hv("Bearer a")));
        st.fail(Failure::unavailable("HTTP 503"), t0 + S(6));
        // Backing off: keep using the valid token without asking again at once.
        assert_eq!(st.check(t0 + S(6)), Check::Fresh(hv("Bearer a")));
        assert_eq!(st.check(t0 + S(7)), Check::Due(hv("Bearer a")));
        assert!(matches!(st.check(t0 + S(10)), Check::Missing));
    }

    #[test]
    fn the_same_failure_is_logged_once_a_minute() {
        let t0 = Instant::now();
        let mut st = TokenState::new(S(5));
        let bad = || Failure::rejected("invalid_client: client authentication failed");
        assert!(st.fail(bad(), t0).log);
        assert!(!st.fail(bad(), t0 + S(10)).log);
        assert!(!st.fail(bad(), t0 + S(59)).log);
        assert!(st.fail(bad(), t0 + S(60)).log);
        assert!(!st.fail(bad(), t0 + S(61)).log);
        // A different failure is news.
        assert!(st.fail(Failure::unavailable("connection refused"), t0 + S(62)).log);
    }
}
