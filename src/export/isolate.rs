//! Poison-trace isolation: MLflow stores a request all or nothing, so one trace it refuses fails
//! every trace sent with it. The exporter resends a refused request's traces in halves until the
//! refused ones stand alone. This is the bisection's bookkeeping, without sockets: the exporter
//! asks what to send next and reports how it went.
//!
//! A half that was stored proves its sibling holds the refused trace, so that sibling is split
//! without being sent: one refused trace among n costs between log2(n) and 2·log2(n) requests.
//! When the first two traces sent alone are both refused before anything was stored, the rest is
//! sent once more as a whole: refused too, the refusal is taken as not about a trace (a database,
//! experiment or auth error answered as 4xx or 500), the bisection stops after about log2(n)
//! requests and the request fails whole, once; stored, the two were poison.
//! A budget still bounds the requests of a bisection that keeps finding refused traces: what is
//! undecided when it runs out fails as it is.
use std::ops::Range;

/// HTTP statuses for which a request of several traces is worth bisecting: MLflow's answers to
/// spans it cannot convert or store (400 invalid value, 422 unconvertible span, 500 a value its
/// database refuses), and 413 (a smaller request may pass). Others (401, 403, 404 no such
/// experiment, 415, ...) hold for any part of the request.
pub(crate) fn worth_bisecting(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 413 | 422 | 500)
}

/// Refused traces a budget is sized for: a request with more of them fails the rest as a whole.
pub(crate) const TRACES_ISOLATED_PER_REQUEST: usize = 4;

/// ⌈log2 n⌉, at least 1.
fn ceil_log2(n: usize) -> usize {
    (usize::BITS - n.saturating_sub(1).leading_zeros()).max(1) as usize
}

/// The most requests bisecting `traces` traces may take: 2·⌈log2 n⌉ + 1 per refused trace, for
/// [`TRACES_ISOLATED_PER_REQUEST`] of them, and never more than 2n (every range of the halving
/// tree once, and each trace once alone).
pub(crate) fn request_budget(traces: usize) -> usize {
    ((2 * ceil_log2(traces) + 1) * TRACES_ISOLATED_PER_REQUEST).min(2 * traces)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Job {
    /// Holds at least one refused trace: MLflow refused it (`sent`), or its left sibling was
    /// stored. A single trace is refused only when MLflow refused it alone.
    Bad { range: Range<usize>, sent: bool },
    /// Unknown: send it. `left` when its right sibling waits below it on the stack.
    Test { range: Range<usize>, left: bool },
    /// The right half of a split, decided by how its left sibling fares.
    Right(Range<usize>),
}

/// The state of one request's bisection over traces `0..n` (the request itself was refused).
#[derive(Debug)]
pub(crate) struct Bisection {
    stack: Vec<Job>,
    in_flight: Option<(Range<usize>, bool)>,
    budget: usize,
    /// Requests handed out so far.
    pub(crate) sent: usize,
    /// Ranges MLflow stored.
    pub(crate) stored: Vec<Range<usize>>,
    /// Single traces MLflow refused.
    pub(crate) refused: Vec<usize>,
    /// Ranges still undecided when the budget ran out: they fail as a whole.
    pub(crate) undecided: Vec<Range<usize>>,
    /// The refusal was not about a trace (see the module doc): every trace fails, as one.
    pub(crate) not_trace_specific: bool,
    traces: usize,
    /// The range in flight is the rest after the first refusals (see `REFUSED_ALONE`).
    probe: bool,
}

/// Traces refused alone, with nothing stored, after which the rest is sent once as a probe: if
/// MLflow refuses that too, the refusal is not about a trace and the request fails whole.
const REFUSED_ALONE: usize = 2;

impl Bisection {
    pub(crate) fn new(traces: usize) -> Bisection {
        Bisection {
            stack: vec![Job::Bad {
                range: 0..traces,
                sent: true,
            }],
            in_flight: None,
            budget: request_budget(traces),
            sent: 0,
            stored: Vec::new(),
            refused: Vec::new(),
            undecided: Vec::new(),
            not_trace_specific: false,
            traces,
            probe: false,
        }
    }

    /// The next range of traces to send, or None when every trace is decided. Call `report`
    /// with its outcome before asking again.
    pub(crate) fn next(&mut self) -> Option<Range<usize>> {
        debug_assert!(self.in_flight.is_none(), "report the range in flight first");
        while let Some(job) = self.stack.pop() {
            match job {
                Job::Bad { range, sent: true } if range.len() == 1 => {
                    self.refused.push(range.start);
                    if self.stored.is_empty() && self.refused.len() == REFUSED_ALONE && self.traces > REFUSED_ALONE {
                        // The descent goes left first, so the refused are traces 0 and 1 and the
                        // rest is one range: sent once, it tells poison from a general refusal.
                        self.stack.clear();
                        self.probe = true;
                        self.stack.push(Job::Test {
                            range: REFUSED_ALONE..self.traces,
                            left: false,
                        });
                    }
                }
                Job::Bad { range: r, .. } | Job::Test { range: r, .. } | Job::Right(r) if self.sent >= self.budget => {
                    self.undecided.push(r)
                }
                Job::Bad { range, sent: false } if range.len() == 1 => {
                    self.stack.push(Job::Test { range, left: false })
                }
                Job::Bad { range: r, .. } => {
                    let mid = r.start + r.len() / 2;
                    self.stack.push(Job::Right(mid..r.end));
                    self.stack.push(Job::Test {
                        range: r.start..mid,
                        left: true,
                    });
                }
                Job::Test { range, left } => {
                    self.sent += 1;
                    self.in_flight = Some((range.clone(), left));
                    return Some(range);
                }
                // Reached only through `report`, which rewrites it first.
                Job::Right(r) => self.stack.push(Job::Test { range: r, left: false }),
            }
        }
        None
    }

    /// How the range `next` gave out fared: stored, or refused for good.
    pub(crate) fn report(&mut self, stored: bool) {
        let Some((range, left)) = self.in_flight.take() else {
            return;
        };
        if std::mem::take(&mut self.probe) && !stored {
            // Refused alone and refused without them: nothing is about a trace.
            self.not_trace_specific = true;
            self.stack.clear();
            self.refused.clear();
            self.undecided = std::iter::once(0..self.traces).collect();
            return;
        }
        if left {
            // The right sibling: known bad when the left half was stored, else unknown.
            if let Some(Job::Right(right)) = self.stack.pop() {
                self.stack.push(if stored {
                    Job::Bad {
                        range: right,
                        sent: false,
                    }
                } else {
                    Job::Test {
                        range: right,
                        left: false,
                    }
                });
            }
        }
        if stored {
            self.stored.push(range);
        } else {
            self.stack.push(Job::Bad { range, sent: true });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Runs a bisection against a destination that refuses any range holding a trace of `poison`.
    fn run(n: usize, poison: &BTreeSet<usize>) -> Bisection {
        let mut b = Bisection::new(n);
        while let Some(r) = b.next() {
            assert!(!r.is_empty() && r.end <= n, "{r:?}");
            b.report(!r.clone().any(|i| poison.contains(&i)));
        }
        b
    }

    fn check_partition(n: usize, b: &Bisection) {
        let mut seen = vec![0u8; n];
        for r in b.stored.iter().chain(&b.undecided) {
            r.clone().for_each(|i| seen[i] += 1);
        }
        b.refused.iter().for_each(|&i| seen[i] += 1);
        assert!(seen.iter().all(|&c| c == 1), "every trace decided once: {seen:?}");
    }

    #[test]
    fn one_poisoned_trace_costs_about_log2_requests() {
        for n in [2, 3, 7, 64, 100, 1000] {
            for p in [0, n / 3, n / 2, n - 1] {
                let b = run(n, &BTreeSet::from([p]));
                check_partition(n, &b);
                assert_eq!(b.refused, vec![p], "n={n}");
                assert!(b.undecided.is_empty());
                assert!(b.sent <= 2 * ceil_log2(n) + 1, "n={n} p={p}: {} requests", b.sent);
                assert!(b.sent >= ceil_log2(n) - 1, "n={n}");
            }
        }
    }

    #[test]
    fn several_poisoned_traces_each_isolated() {
        let poison = BTreeSet::from([3, 4, 50, 99]);
        let b = run(100, &poison);
        check_partition(100, &b);
        assert_eq!(b.refused.iter().copied().collect::<BTreeSet<_>>(), poison);
        assert!(b.undecided.is_empty());
        assert!(b.sent <= request_budget(100), "{}", b.sent);
    }

    #[test]
    fn a_refusal_of_everything_stops_after_about_log2_requests_and_fails_whole() {
        for n in [3, 5, 16, 100, 10_000] {
            let all: BTreeSet<usize> = (0..n).collect();
            let b = run(n, &all);
            check_partition(n, &b);
            // Down the left edge to trace 0, trace 1 alone, then the rest once.
            assert!(b.sent <= ceil_log2(n) + 2, "n={n}: {} requests", b.sent);
            assert!(b.not_trace_specific, "n={n}");
            assert_eq!(b.undecided, std::iter::once(0..n).collect::<Vec<_>>(), "n={n}");
            assert!(b.refused.is_empty(), "n={n}");
            assert!(b.stored.is_empty());
        }
        // Two traces refused alone are simply both refused.
        let b = run(2, &BTreeSet::from([0, 1]));
        assert_eq!((b.refused, b.not_trace_specific), (vec![0, 1], false));
        assert_eq!(request_budget(100), 60);
        assert_eq!(request_budget(2), 4);
    }

    #[test]
    fn the_first_two_traces_poisoned_are_not_taken_for_a_general_refusal() {
        let b = run(100, &BTreeSet::from([0, 1]));
        check_partition(100, &b);
        assert_eq!((b.refused, b.not_trace_specific), (vec![0, 1], false));
        assert_eq!(b.stored, std::iter::once(2..100).collect::<Vec<_>>());
        assert!(b.sent <= ceil_log2(100) + 2, "{}", b.sent);
    }

    /// Every poison set of up to 9 traces: each trace is decided once; the bisection gives up only
    /// when traces 0 and 1 and another are refused, and otherwise finds exactly the poison.
    #[test]
    fn every_poison_set_is_decided() {
        for n in 2..=9usize {
            for mask in 1u32..(1 << n) {
                let poison: BTreeSet<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                let b = run(n, &poison);
                check_partition(n, &b);
                assert!(b.sent <= request_budget(n), "n={n} {poison:?}: {}", b.sent);
                let general = n > 2 && poison.contains(&0) && poison.contains(&1) && poison.len() > 2;
                assert_eq!(b.not_trace_specific, general, "n={n} {poison:?}");
                if !general && b.undecided.is_empty() {
                    assert_eq!(b.refused.iter().copied().collect::<BTreeSet<_>>(), poison, "n={n}");
                }
            }
        }
    }

    #[test]
    fn nothing_poisoned_stores_in_two_requests() {
        // The whole request was refused but both halves pass (a size limit, say).
        let b = run(10, &BTreeSet::new());
        check_partition(10, &b);
        assert!(b.sent <= 2 * ceil_log2(10) + 1, "{}", b.sent);
        assert!(b.refused.is_empty());
    }

    #[test]
    fn statuses() {
        assert!(worth_bisecting(http::StatusCode::UNPROCESSABLE_ENTITY));
        assert!(worth_bisecting(http::StatusCode::BAD_REQUEST));
        assert!(!worth_bisecting(http::StatusCode::NOT_FOUND));
        assert!(!worth_bisecting(http::StatusCode::FORBIDDEN));
    }
}
