//! groupbytrace's pure core: holds span pieces by trace id and decides when a trace leaves as one
//! unit. The caller supplies the clock, so every rule is tested without timers or sockets.
//!
//! MLflow writes a request all-or-nothing and recomputes a trace's aggregates each time more of
//! its spans arrive, so it stores whole traces about 2.5x faster than the same spans in pieces.
//! Agent SDKs export spans as they end (children first, root last), which is why the root's
//! arrival is the main release signal here; the collector's idle timeout stays as the fallback
//! for traces whose root never comes.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

pub(crate) type TraceId = [u8; 16];

/// When held traces leave. Defaults follow the collector where it has the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HoldRules {
    /// A trace leaves once this long has passed since its last span arrived (collector key
    /// `wait_duration`; the collector counts from the first span, which cuts long agent runs).
    pub(crate) wait_duration: Duration,
    /// Release a trace shortly after its root span arrived instead of waiting out `wait_duration`.
    pub(crate) release_on_root: bool,
    /// How long after the root the trace still waits for stragglers (spans that ended before the
    /// root but were exported in a later request, e.g. from another process).
    pub(crate) root_grace: Duration,
    /// No trace is held longer than this in total, so one that never goes quiet still leaves.
    pub(crate) max_hold: Duration,
    /// At most this many traces are held (collector key `num_traces`); the oldest leaves first.
    pub(crate) num_traces: usize,
    /// At most this many bytes are held; the oldest traces leave first.
    pub(crate) max_bytes: usize,
}

impl Default for HoldRules {
    fn default() -> Self {
        HoldRules {
            wait_duration: Duration::from_secs(1),
            release_on_root: true,
            root_grace: Duration::from_millis(100),
            max_hold: Duration::from_secs(60),
            num_traces: 1_000_000,
            max_bytes: 64 << 20,
        }
    }
}

/// Why a trace left. Every reason sends the trace on: nothing held is ever dropped here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ReleaseReason {
    /// Its root arrived and the grace passed.
    Root,
    /// No span of it arrived for `wait_duration`.
    Idle,
    /// It was held for `max_hold`.
    MaxHold,
    /// Room was needed for newer traces (`num_traces` or `max_bytes`).
    Evicted,
    /// The processor is shutting down.
    Shutdown,
}

impl ReleaseReason {
    pub(crate) const ALL: [ReleaseReason; 5] = [
        ReleaseReason::Root,
        ReleaseReason::Idle,
        ReleaseReason::MaxHold,
        ReleaseReason::Evicted,
        ReleaseReason::Shutdown,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            ReleaseReason::Root => "root",
            ReleaseReason::Idle => "idle",
            ReleaseReason::MaxHold => "max_hold",
            ReleaseReason::Evicted => "evicted",
            ReleaseReason::Shutdown => "shutdown",
        }
    }
}

/// One trace leaving, with every piece that was held for it, in arrival order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released<P> {
    pub(crate) trace_id: TraceId,
    pub(crate) pieces: Vec<P>,
    pub(crate) spans: usize,
    pub(crate) bytes: usize,
    pub(crate) reason: ReleaseReason,
}

/// What the caller knows of one piece (a group of spans of a single trace) when adding it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PieceInfo {
    pub(crate) spans: usize,
    pub(crate) bytes: usize,
    /// The piece holds the trace's root span (no parent span id).
    pub(crate) has_root: bool,
}

#[derive(Debug)]
struct Held<P> {
    pieces: Vec<P>,
    spans: usize,
    bytes: usize,
    /// Arrival order of the trace's first piece: eviction takes the smallest.
    seq: u64,
    first: Instant,
    last: Instant,
    root_at: Option<Instant>,
    due: Instant,
}

/// The traces being held. Every operation returns what has to leave now.
#[derive(Debug)]
pub(crate) struct TraceGroups<P> {
    rules: HoldRules,
    traces: HashMap<TraceId, Held<P>>,
    /// (due, seq): the next trace to leave by time.
    by_due: BTreeSet<(Instant, u64, TraceId)>,
    /// seq: the oldest trace, for eviction.
    by_age: BTreeSet<(u64, TraceId)>,
    next_seq: u64,
    spans: usize,
    bytes: usize,
}

impl<P> TraceGroups<P> {
    pub(crate) fn new(rules: HoldRules) -> Self {
        TraceGroups {
            rules,
            traces: HashMap::new(),
            by_due: BTreeSet::new(),
            by_age: BTreeSet::new(),
            next_seq: 0,
            spans: 0,
            bytes: 0,
        }
    }

    pub(crate) fn held_traces(&self) -> usize {
        self.traces.len()
    }

    pub(crate) fn held_spans(&self) -> usize {
        self.spans
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `piece` with its trace; returns the traces that must leave to make room for it
    /// (possibly this one, when it alone is over the byte limit).
    pub(crate) fn add(&mut self, trace_id: TraceId, piece: P, info: PieceInfo, now: Instant) -> Vec<Released<P>> {
        let rules = &self.rules;
        let held = match self.traces.get_mut(&trace_id) {
            Some(held) => {
                self.by_due.remove(&(held.due, held.seq, trace_id));
                held
            }
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.by_age.insert((seq, trace_id));
                self.traces.entry(trace_id).or_insert(Held {
                    pieces: Vec::new(),
                    spans: 0,
                    bytes: 0,
                    seq,
                    first: now,
                    last: now,
                    root_at: None,
                    due: now,
                })
            }
        };
        held.pieces.push(piece);
        held.spans += info.spans;
        held.bytes += info.bytes;
        held.last = now;
        if info.has_root && held.root_at.is_none() {
            held.root_at = Some(now);
        }
        held.due = due_time(rules, held);
        self.by_due.insert((held.due, held.seq, trace_id));
        self.spans += info.spans;
        self.bytes += info.bytes;
        self.make_room(trace_id)
    }

    /// Evicts the oldest traces until both limits hold. The trace just added goes last, so a
    /// burst of new traces pushes out old ones rather than itself.
    fn make_room(&mut self, newest: TraceId) -> Vec<Released<P>> {
        let mut out = Vec::new();
        while self.traces.len() > self.rules.num_traces.max(1) || self.bytes > self.rules.max_bytes {
            let oldest = self
                .by_age
                .iter()
                .map(|&(_, id)| id)
                .find(|id| *id != newest)
                .unwrap_or(newest);
            let Some(released) = self.take(oldest, ReleaseReason::Evicted) else {
                break;
            };
            out.push(released);
            if oldest == newest {
                break;
            }
        }
        out
    }

    /// The earliest time a held trace is due, for the caller's timer.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.by_due.first().map(|&(due, _, _)| due)
    }

    /// Every trace due at `now`, earliest first.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Released<P>> {
        let mut out = Vec::new();
        while let Some(&(due, _, id)) = self.by_due.first() {
            if due > now {
                break;
            }
            let reason = match self.traces.get(&id) {
                Some(held) => due_reason(&self.rules, held),
                None => ReleaseReason::Idle,
            };
            match self.take(id, reason) {
                Some(released) => out.push(released),
                None => {
                    // An index entry without its trace would stall the timer forever.
                    self.by_due.pop_first();
                }
            }
        }
        out
    }

    /// The oldest trace, for room the caller needs (e.g. the memory budget under pressure).
    pub(crate) fn evict_oldest(&mut self) -> Option<Released<P>> {
        let &(_, oldest) = self.by_age.first()?;
        self.take(oldest, ReleaseReason::Evicted)
    }

    /// Everything held, oldest first: for shutdown, when nothing may stay behind.
    pub(crate) fn drain(&mut self) -> Vec<Released<P>> {
        let ids: Vec<TraceId> = self.by_age.iter().map(|&(_, id)| id).collect();
        ids.into_iter()
            .filter_map(|id| self.take(id, ReleaseReason::Shutdown))
            .collect()
    }

    fn take(&mut self, trace_id: TraceId, reason: ReleaseReason) -> Option<Released<P>> {
        let held = self.traces.remove(&trace_id)?;
        self.by_due.remove(&(held.due, held.seq, trace_id));
        self.by_age.remove(&(held.seq, trace_id));
        self.spans -= held.spans;
        self.bytes -= held.bytes;
        Some(Released {
            trace_id,
            pieces: held.pieces,
            spans: held.spans,
            bytes: held.bytes,
            reason,
        })
    }
}

fn due_time<P>(rules: &HoldRules, held: &Held<P>) -> Instant {
    let mut due = (held.last + rules.wait_duration).min(held.first + rules.max_hold);
    if rules.release_on_root
        && let Some(root_at) = held.root_at
    {
        due = due.min(root_at + rules.root_grace);
    }
    due
}

/// Which rule made `held` due; ties name the root, the signal the caller hoped for.
fn due_reason<P>(rules: &HoldRules, held: &Held<P>) -> ReleaseReason {
    let by_root = held.root_at.map(|root_at| root_at + rules.root_grace);
    if rules.release_on_root && by_root == Some(held.due) {
        ReleaseReason::Root
    } else if held.last + rules.wait_duration == held.due {
        ReleaseReason::Idle
    } else {
        ReleaseReason::MaxHold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn id(n: u8) -> TraceId {
        let mut id = [0u8; 16];
        id[15] = n;
        id
    }

    fn child() -> PieceInfo {
        PieceInfo {
            spans: 1,
            bytes: 100,
            has_root: false,
        }
    }

    fn root() -> PieceInfo {
        PieceInfo {
            has_root: true,
            ..child()
        }
    }

    fn rules() -> HoldRules {
        HoldRules {
            wait_duration: 1000 * MS,
            release_on_root: true,
            root_grace: 100 * MS,
            max_hold: 10_000 * MS,
            num_traces: 100,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn a_trace_leaves_whole_a_grace_after_its_root() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(rules());
        assert!(groups.add(id(1), "child-a", child(), t0).is_empty());
        assert!(groups.add(id(1), "child-b", child(), t0 + 50 * MS).is_empty());
        assert!(groups.add(id(1), "root", root(), t0 + 300 * MS).is_empty());
        assert_eq!(groups.next_due(), Some(t0 + 400 * MS));
        assert!(groups.due(t0 + 399 * MS).is_empty());
        // A straggler inside the grace joins the trace; it does not extend the grace.
        assert!(groups.add(id(1), "straggler", child(), t0 + 350 * MS).is_empty());
        let out = groups.due(t0 + 400 * MS);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].pieces, vec!["child-a", "child-b", "root", "straggler"]);
        assert_eq!(
            (out[0].spans, out[0].bytes, out[0].reason),
            (4, 400, ReleaseReason::Root)
        );
        assert_eq!(
            (groups.held_traces(), groups.held_spans(), groups.held_bytes()),
            (0, 0, 0)
        );
        assert_eq!(groups.next_due(), None);
    }

    #[test]
    fn without_a_root_a_trace_leaves_when_it_goes_quiet() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(rules());
        groups.add(id(1), 1, child(), t0);
        groups.add(id(1), 2, child(), t0 + 900 * MS);
        assert!(
            groups.due(t0 + 1000 * MS).is_empty(),
            "the timeout counts from the last span"
        );
        let out = groups.due(t0 + 1900 * MS);
        assert_eq!(out[0].pieces, vec![1, 2]);
        assert_eq!(out[0].reason, ReleaseReason::Idle);
    }

    #[test]
    fn release_on_root_off_waits_for_quiet() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(HoldRules {
            release_on_root: false,
            ..rules()
        });
        groups.add(id(1), 1, root(), t0);
        assert!(groups.due(t0 + 500 * MS).is_empty());
        assert_eq!(groups.due(t0 + 1000 * MS)[0].reason, ReleaseReason::Idle);
    }

    #[test]
    fn a_trace_that_never_goes_quiet_leaves_at_max_hold() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(rules());
        let mut released = Vec::new();
        for i in 0..30u32 {
            let now = t0 + 500 * MS * i;
            released.extend(groups.due(now));
            released.extend(groups.add(id(1), i, child(), now));
        }
        assert_eq!(released.len(), 1, "{released:?}");
        assert_eq!(released[0].reason, ReleaseReason::MaxHold);
        assert_eq!(released[0].pieces, (0..20).collect::<Vec<_>>());
        // The spans after the cut start a new group of the same trace.
        assert_eq!(groups.held_spans(), 10);
    }

    #[test]
    fn the_oldest_trace_is_evicted_whole_when_num_traces_is_reached() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(HoldRules {
            num_traces: 2,
            ..rules()
        });
        groups.add(id(1), "1a", child(), t0);
        groups.add(id(2), "2a", child(), t0);
        groups.add(id(1), "1b", child(), t0 + MS);
        let out = groups.add(id(3), "3a", child(), t0 + 2 * MS);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].trace_id, out[0].reason), (id(1), ReleaseReason::Evicted));
        assert_eq!(out[0].pieces, vec!["1a", "1b"]);
        assert_eq!(groups.held_traces(), 2);
    }

    #[test]
    fn the_byte_budget_evicts_old_traces_and_a_trace_too_large_alone_leaves_at_once() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(HoldRules {
            max_bytes: 250,
            ..rules()
        });
        groups.add(id(1), 1, child(), t0);
        groups.add(id(2), 2, child(), t0);
        let out = groups.add(id(3), 3, child(), t0);
        assert_eq!(out.iter().map(|r| r.trace_id).collect::<Vec<_>>(), vec![id(1)]);
        let big = PieceInfo {
            spans: 10,
            bytes: 1000,
            has_root: false,
        };
        let out = groups.add(id(4), 4, big, t0);
        let ids: Vec<TraceId> = out.iter().map(|r| r.trace_id).collect();
        assert_eq!(ids, vec![id(2), id(3), id(4)]);
        assert_eq!((groups.held_traces(), groups.held_bytes()), (0, 0));
    }

    #[test]
    fn drain_returns_everything_oldest_first() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(rules());
        groups.add(id(9), 1, child(), t0);
        groups.add(id(3), 2, child(), t0 + MS);
        groups.add(id(9), 3, root(), t0 + 2 * MS);
        let out = groups.drain();
        let got: Vec<(TraceId, Vec<i32>, ReleaseReason)> =
            out.into_iter().map(|r| (r.trace_id, r.pieces, r.reason)).collect();
        assert_eq!(
            got,
            vec![
                (id(9), vec![1, 3], ReleaseReason::Shutdown),
                (id(3), vec![2], ReleaseReason::Shutdown)
            ]
        );
        assert_eq!(groups.next_due(), None);
    }

    #[test]
    fn evict_oldest_takes_the_oldest_whole() {
        let t0 = Instant::now();
        let mut groups = TraceGroups::new(rules());
        groups.add(id(5), 1, child(), t0);
        groups.add(id(2), 2, child(), t0 + MS);
        groups.add(id(5), 3, child(), t0 + 2 * MS);
        let out = groups.evict_oldest().unwrap();
        assert_eq!(
            (out.trace_id, out.pieces, out.reason),
            (id(5), vec![1, 3], ReleaseReason::Evicted)
        );
        assert_eq!(groups.evict_oldest().unwrap().trace_id, id(2));
        assert!(groups.evict_oldest().is_none());
        assert_eq!(
            (groups.held_traces(), groups.held_spans(), groups.next_due()),
            (0, 0, None)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add { trace: u8, root: bool, bytes: usize },
        Tick(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, proptest::bool::weighted(0.2), 1usize..300).prop_map(|(trace, root, bytes)| Op::Add {
                trace,
                root,
                bytes
            }),
            (0u32..1500).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Whatever the arrival pattern: every piece leaves exactly once and with its own trace,
        /// the limits hold after every step, no trace stays past its due time, and the held
        /// counters agree with what is held.
        #[test]
        fn every_piece_leaves_once_and_the_limits_hold(ops in proptest::collection::vec(op(), 1..300)) {
            let rules = HoldRules { num_traces: 5, max_bytes: 1000, ..rules() };
            let mut groups = TraceGroups::new(rules.clone());
            let t0 = Instant::now();
            let mut now = t0;
            let mut sent: Vec<(u8, usize)> = Vec::new();
            let mut out: Vec<Released<(u8, usize)>> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Add { trace, root, bytes } => {
                        sent.push((trace, n));
                        let info = PieceInfo { spans: 1, bytes, has_root: root };
                        out.extend(groups.add(id(trace), (trace, n), info, now));
                    }
                    Op::Tick(ms) => {
                        now += ms * MS;
                        out.extend(groups.due(now));
                        prop_assert!(groups.next_due().is_none_or(|due| due > now), "a due trace stayed");
                    }
                }
                prop_assert!(groups.held_traces() <= rules.num_traces);
                prop_assert!(groups.held_bytes() <= rules.max_bytes);
            }
            out.extend(groups.drain());
            prop_assert_eq!(groups.held_spans(), 0);
            let mut got: Vec<(u8, usize)> = Vec::new();
            for released in &out {
                prop_assert_eq!(released.spans, released.pieces.len());
                for piece in &released.pieces {
                    prop_assert_eq!(id(piece.0), released.trace_id);
                    got.push(*piece);
                }
            }
            got.sort();
            sent.sort();
            prop_assert_eq!(got, sent);
        }
    }
}
