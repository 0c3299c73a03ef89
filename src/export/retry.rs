//! Retry policy by the OTLP rules: which answers are retryable, how long to wait (exponential
//! backoff with jitter, never less than the server's Retry-After up to `max_interval`), and when
//! to give up.
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use http::{HeaderValue, StatusCode};

use crate::config::RetryConfig;

/// What to do after an HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpVerdict {
    Delivered,
    /// 429/502/503/504: try again, not before `retry_after` when the server said so.
    Retry {
        retry_after: Option<Duration>,
    },
    /// 401: the token may have expired; refresh it, then retry.
    Unauthorized,
    /// Anything else: the destination will never take this request.
    Permanent,
}

pub(crate) fn classify_http(status: StatusCode, retry_after: Option<&HeaderValue>, now: SystemTime) -> HttpVerdict {
    match status.as_u16() {
        200..=299 => HttpVerdict::Delivered,
        401 => HttpVerdict::Unauthorized,
        429 | 502 | 503 | 504 => HttpVerdict::Retry {
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        },
        _ => HttpVerdict::Permanent,
    }
}

/// Retry-After as delay-seconds or an HTTP-date.
pub(crate) fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    pub(crate) enabled: bool,
    builder: ExponentialBuilder,
    randomization_factor: f64,
    /// Zero: no limit.
    max_elapsed: Duration,
    /// The longest Retry-After honoured: `max_interval`. A server (or a proxy in front of it)
    /// asking for an hour would otherwise park every sender for an hour, new data included.
    retry_after_cap: Duration,
}

impl RetryPolicy {
    pub(crate) fn new(cfg: &RetryConfig) -> RetryPolicy {
        let builder = ExponentialBuilder::default()
            .with_min_delay(cfg.initial_interval.0)
            .with_max_delay(cfg.max_interval.0)
            .with_factor(cfg.multiplier as f32)
            .without_max_times();
        RetryPolicy {
            enabled: cfg.enabled,
            builder,
            randomization_factor: cfg.randomization_factor,
            max_elapsed: cfg.max_elapsed_time.0,
            retry_after_cap: cfg.max_interval.0,
        }
    }

    /// The longest wait a Retry-After can impose (`max_interval`).
    pub(crate) fn retry_after_cap(&self) -> Duration {
        self.retry_after_cap
    }

    pub(crate) fn schedule(&self) -> RetrySchedule {
        RetrySchedule {
            backoff: self.builder.build(),
            policy: self.clone(),
        }
    }
}

/// The waits of one request's retries.
pub(crate) struct RetrySchedule {
    backoff: ExponentialBackoff,
    policy: RetryPolicy,
}

impl RetrySchedule {
    /// The wait before the next attempt, or None to give up. `elapsed` is the time since the
    /// first attempt; `jitter` is a uniform sample in [0, 1).
    pub(crate) fn next_delay(
        &mut self,
        elapsed: Duration,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if !self.policy.enabled {
            return None;
        }
        let base = self.backoff.next()?;
        // The collector's randomization: base * (1 ± factor), uniformly.
        let spread = self.policy.randomization_factor * (2.0 * jitter - 1.0);
        let backoff = base.mul_f64((1.0 + spread).max(0.0));
        let asked = retry_after.unwrap_or(Duration::ZERO).min(self.policy.retry_after_cap);
        let delay = backoff.max(asked);
        if !self.policy.max_elapsed.is_zero() && elapsed + delay > self.policy.max_elapsed {
            return None;
        }
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GoDuration;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn otlp_http_classification() {
        let now = at(1_000_000);
        assert_eq!(classify_http(StatusCode::OK, None, now), HttpVerdict::Delivered);
        for code in [429, 502, 503, 504] {
            assert!(matches!(
                classify_http(StatusCode::from_u16(code).unwrap(), None, now),
                HttpVerdict::Retry { .. }
            ));
        }
        for code in [400, 403, 404, 413, 422, 500, 501] {
            assert_eq!(
                classify_http(StatusCode::from_u16(code).unwrap(), None, now),
                HttpVerdict::Permanent,
                "{code}"
            );
        }
        assert_eq!(
            classify_http(StatusCode::UNAUTHORIZED, None, now),
            HttpVerdict::Unauthorized
        );
    }

    #[test]
    fn retry_after_both_forms() {
        let now = at(1_700_000_000);
        let secs = HeaderValue::from_static("7");
        assert_eq!(
            classify_http(StatusCode::SERVICE_UNAVAILABLE, Some(&secs), now),
            HttpVerdict::Retry {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let date = HeaderValue::from_str(&httpdate::fmt_http_date(now + Duration::from_secs(42))).unwrap();
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(42)));
        let past = HeaderValue::from_str(&httpdate::fmt_http_date(now - Duration::from_secs(42))).unwrap();
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
    }

    fn policy(rf: f64, max_elapsed: u64) -> RetryPolicy {
        RetryPolicy::new(&RetryConfig {
            enabled: true,
            initial_interval: GoDuration::secs(1),
            max_interval: GoDuration::secs(8),
            max_elapsed_time: GoDuration::secs(max_elapsed),
            multiplier: 2.0,
            randomization_factor: rf,
        })
    }

    #[test]
    fn backoff_grows_to_the_cap_and_honours_retry_after() {
        let mut s = policy(0.0, 0).schedule();
        let delays: Vec<u64> = (0..6)
            .map(|_| s.next_delay(Duration::ZERO, None, 0.5).unwrap().as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 8, 8]);
        let mut s = policy(0.0, 0).schedule();
        assert_eq!(
            s.next_delay(Duration::ZERO, Some(Duration::from_secs(5)), 0.5),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn retry_after_is_capped_by_max_interval() {
        // An hour (as seconds or as a date) waits max_interval, not an hour; the backoff's own
        // jitter never exceeds the cap either way.
        let mut s = policy(0.0, 0).schedule();
        assert_eq!(
            s.next_delay(Duration::ZERO, Some(Duration::from_secs(3600)), 0.5),
            Some(Duration::from_secs(8))
        );
        let now = at(1_700_000_000);
        let date = HeaderValue::from_str(&httpdate::fmt_http_date(now + Duration::from_secs(3600))).unwrap();
        let HttpVerdict::Retry { retry_after } = classify_http(StatusCode::TOO_MANY_REQUESTS, Some(&date), now) else {
            panic!("429 is retryable");
        };
        let mut s = policy(0.5, 0).schedule();
        for _ in 0..10 {
            let d = s.next_delay(Duration::ZERO, retry_after, 0.999).unwrap();
            assert!(d <= Duration::from_secs(12), "{d:?}");
        }
        assert_eq!(policy(0.0, 0).retry_after_cap(), Duration::from_secs(8));
        // Below the cap, Retry-After still wins over a shorter backoff.
        let mut s = policy(0.0, 0).schedule();
        assert_eq!(
            s.next_delay(Duration::ZERO, Some(Duration::from_secs(3)), 0.5),
            Some(Duration::from_secs(3))
        );
        // u64::MAX seconds does not overflow anything.
        let huge = HeaderValue::from_static("18446744073709551615");
        let mut s = policy(0.0, 0).schedule();
        assert_eq!(
            s.next_delay(Duration::ZERO, parse_retry_after(&huge, now), 0.5),
            Some(Duration::from_secs(8))
        );
    }

    #[test]
    fn jitter_stays_within_the_factor() {
        let mut low = policy(0.5, 0).schedule();
        let mut high = policy(0.5, 0).schedule();
        assert_eq!(
            low.next_delay(Duration::ZERO, None, 0.0),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            high.next_delay(Duration::ZERO, None, 0.999_999).unwrap().as_millis(),
            1499
        );
    }

    #[test]
    fn gives_up_at_max_elapsed() {
        let mut s = policy(0.0, 10).schedule();
        assert!(s.next_delay(Duration::from_secs(8), None, 0.5).is_some());
        assert_eq!(s.next_delay(Duration::from_secs(9), None, 0.5), None);
        let mut disabled = RetryPolicy {
            enabled: false,
            ..policy(0.0, 0)
        }
        .schedule();
        assert_eq!(disabled.next_delay(Duration::ZERO, None, 0.5), None);
    }
}
