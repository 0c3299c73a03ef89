//! How the sink plays a failing or slow MLflow: which requests fail, and the span-rate cap.
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::supervise::LockUnpoisoned;

/// Which requests fail, and with what status.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FailurePlan {
    pub(crate) status: Option<u16>,
    pub(crate) fail_every: Option<u64>,
    pub(crate) fail_first: Option<u64>,
}

impl FailurePlan {
    /// The failing status for the `n`th request (1-based), or None to accept it.
    pub(crate) fn status_for(&self, n: u64) -> Option<u16> {
        let failing = self.status.unwrap_or(503);
        let status = match (self.fail_first, self.fail_every) {
            (Some(first), _) if n <= first => Some(failing),
            (Some(_), None) => None,
            (_, Some(k)) if k > 0 => n.is_multiple_of(k).then_some(failing),
            _ => self.status,
        }?;
        (!(200..300).contains(&status)).then_some(status)
    }
}

/// Caps ingestion at `rate` spans/s overall: each request reserves its share of a shared timeline
/// and completes when that share is due, like a server whose throughput is the bottleneck.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: f64,
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    pub(crate) fn new(rate: f64) -> Throttle {
        Throttle {
            rate,
            next: Mutex::new(None),
        }
    }

    /// Reserves `spans` and returns when the request may complete.
    pub(crate) fn reserve(&self, spans: u64, now: Instant) -> Instant {
        let mut next = self.next.lock_unpoisoned();
        let start = next.map_or(now, |n| n.max(now));
        let done = start + Duration::from_secs_f64(spans as f64 / self.rate);
        *next = Some(done);
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_plan() {
        let every3 = FailurePlan {
            status: None,
            fail_every: Some(3),
            fail_first: None,
        };
        let got: Vec<_> = (1..=6).map(|n| every3.status_for(n)).collect();
        assert_eq!(got, vec![None, None, Some(503), None, None, Some(503)]);
        let always = FailurePlan {
            status: Some(429),
            fail_every: None,
            fail_first: None,
        };
        assert_eq!(always.status_for(1), Some(429));
        let ok = FailurePlan {
            status: Some(200),
            fail_every: None,
            fail_first: None,
        };
        assert_eq!(ok.status_for(1), None);
        let first2 = FailurePlan {
            status: None,
            fail_every: None,
            fail_first: Some(2),
        };
        let got: Vec<_> = (1..=4).map(|n| first2.status_for(n)).collect();
        assert_eq!(got, vec![Some(503), Some(503), None, None]);
    }

    #[test]
    fn throttle_spaces_requests_by_their_spans() {
        let t = Throttle::new(1000.0);
        let now = Instant::now();
        assert_eq!(t.reserve(100, now), now + Duration::from_millis(100));
        assert_eq!(t.reserve(100, now), now + Duration::from_millis(200));
        // After an idle period the timeline restarts from now.
        let later = now + Duration::from_secs(5);
        assert_eq!(t.reserve(10, later), later + Duration::from_millis(10));
    }
}
