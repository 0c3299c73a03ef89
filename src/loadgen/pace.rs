//! Rate pacing and run-length parsing: pure helpers, unit-tested without clocks or sockets.
use std::time::{Duration, Instant};

/// Spaces requests so a worker sends `rate` spans/s on average. When the worker falls behind
/// (a slow receiver), at most `max_lag` of backlog is caught up, so a stall is not followed by an
/// unbounded burst.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    rate: f64,
    next: Option<Instant>,
    max_lag: Duration,
}

impl Pacer {
    /// `rate` spans/s; 0 (or less) means unpaced.
    pub(crate) fn new(rate: f64) -> Pacer {
        Pacer {
            rate,
            next: None,
            max_lag: Duration::from_secs(1),
        }
    }

    /// When the next request of `spans` spans is due (None: send now, unpaced).
    pub(crate) fn due(&mut self, spans: usize, now: Instant) -> Option<Instant> {
        if self.rate <= 0.0 {
            return None;
        }
        let mut due = self.next.unwrap_or(now);
        if now.saturating_duration_since(due) > self.max_lag {
            due = now - self.max_lag;
        }
        self.next = Some(due + Duration::from_secs_f64(spans as f64 / self.rate));
        Some(due)
    }
}

/// Parses a duration for the command line: Go-style like the config (`30s`, `500ms`, `1m30s`),
/// or a bare number of seconds as telemetrygen allows.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Ok(Duration::from_secs_f64(secs.max(0.0)));
    }
    crate::config::parse_duration(s).map_err(|e| e.to_string())
}

/// Splits `total` into `parts` shares that differ by at most one.
pub(crate) fn split(total: u64, parts: usize, index: usize) -> u64 {
    let parts = parts.max(1) as u64;
    total / parts + u64::from((index as u64) < total % parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_spaces_requests_by_their_span_count() {
        let mut p = Pacer::new(1000.0);
        let t0 = Instant::now();
        assert_eq!(p.due(100, t0), Some(t0));
        assert_eq!(p.due(100, t0), Some(t0 + Duration::from_millis(100)));
        assert_eq!(p.due(50, t0), Some(t0 + Duration::from_millis(200)));
        // Over 10 s, sending on time yields the rate.
        let mut p = Pacer::new(500.0);
        let mut now = t0;
        let mut sent = 0;
        while now < t0 + Duration::from_secs(10) {
            now = now.max(p.due(100, now).unwrap());
            sent += 100;
        }
        assert!((5000..=5100).contains(&sent), "{sent}");
    }

    #[test]
    fn pacing_catches_up_at_most_the_max_lag() {
        let mut p = Pacer::new(100.0);
        let t0 = Instant::now();
        p.due(10, t0);
        let late = t0 + Duration::from_secs(60);
        // A minute late: only one second of backlog is sent immediately.
        let mut burst = 0;
        while p.due(10, late).unwrap() <= late {
            burst += 10;
        }
        assert!((100..=110).contains(&burst), "{burst}");
        assert_eq!(Pacer::new(0.0).due(10, t0), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("5x").is_err());
    }

    #[test]
    fn splitting_is_exact() {
        let shares: Vec<u64> = (0..3).map(|i| split(10, 3, i)).collect();
        assert_eq!(shares, vec![4, 3, 3]);
        assert_eq!(shares.iter().sum::<u64>(), 10);
    }
}
