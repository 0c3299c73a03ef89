//! The batch processor's core: collect items per destination, emit a batch at `send_batch_size`
//! spans or when its oldest item has waited `timeout`, never above `send_batch_max_size`.
//! A trace is not cut across batches unless it alone is above `send_batch_max_size`: an item
//! that fits a batch but not the room left starts a batch of its own, one above the maximum is
//! cut between traces (past `TRACE_CUT_FACTOR` times it, by span count), and a group (one trace,
//! from groupbytrace) goes into one batch. MLflow writes a request all-or-nothing and recomputes a trace's
//! aggregates each time more of its spans arrive, so a trace in two requests costs it twice.
//! Pure: the caller supplies the clock, so it is tested without timers.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    pub send_batch_size: usize,
    /// 0 means no upper bound.
    pub send_batch_max_size: usize,
    pub timeout: Duration,
}

/// Something that holds spans and can be cut in two.
pub trait BatchItem: Sized {
    fn spans(&self) -> usize;
    /// Splits off the first `first` spans (0 < first < spans()); on failure the item comes back
    /// whole, so nothing is lost.
    fn split(self, first: usize) -> Result<(Self, Self), Unsplit<Self>>;

    /// Cuts the item into pieces of `first` spans, then `size` each, the last holding the rest
    /// (0 < first < spans()). Items that can do this in one pass override it; on a failure after
    /// the first cut the rest comes back whole as the last piece.
    fn split_pieces(self, first: usize, size: usize) -> Result<Vec<Self>, Unsplit<Self>> {
        let (head, mut rest) = self.split(first)?;
        let mut pieces = vec![head];
        while size > 0 && rest.spans() > size {
            match rest.split(size) {
                Ok((piece, tail)) => {
                    pieces.push(piece);
                    rest = tail;
                }
                Err(Unsplit { item, .. }) => {
                    rest = item;
                    break;
                }
            }
        }
        pieces.push(rest);
        Ok(pieces)
    }

    /// The item cut into one item per trace, in order; the item back when it cannot tell its
    /// traces (it is then cut by span count alone).
    fn split_traces(self) -> Result<Vec<Self>, Self> {
        Err(self)
    }
}

/// An item that could not be split, and why.
#[derive(Debug)]
pub struct Unsplit<T> {
    pub(crate) item: T,
    pub(crate) reason: String,
}

/// Items up to this many times `send_batch_max_size` are cut between traces; larger ones (a bulk
/// import of many small traces) by span count, so the pieces stay few.
const TRACE_CUT_FACTOR: usize = 16;

/// Unsplittable items are logged at most once per this interval, with a count of the rest.
const UNSPLIT_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
pub struct Batch<K, T> {
    pub(crate) key: K,
    pub(crate) items: Vec<T>,
    pub spans: usize,
}

struct Pending<T> {
    items: Vec<T>,
    spans: usize,
    since: Instant,
}

pub struct Batcher<K, T> {
    settings: BatchSettings,
    pending: HashMap<K, Pending<T>>,
    /// Items sent whole above send_batch_max_size because they could not be split, not yet
    /// collected by `take_unsplit`.
    unsplit: u64,
    unsplit_logged: Option<Instant>,
    unsplit_quiet: u64,
}

impl<K: Clone + Eq + Hash, T: BatchItem> Batcher<K, T> {
    pub fn new(settings: BatchSettings) -> Self {
        Batcher {
            settings,
            pending: HashMap::new(),
            unsplit: 0,
            unsplit_logged: None,
            unsplit_quiet: 0,
        }
    }

    /// How many items went out whole because they could not be split, since the last call
    /// (the caller counts them in its metric).
    pub fn take_unsplit(&mut self) -> u64 {
        std::mem::take(&mut self.unsplit)
    }

    fn note_unsplit(&mut self, spans: usize, reason: &str, now: Instant) {
        self.unsplit += 1;
        if self
            .unsplit_logged
            .is_some_and(|t| now.saturating_duration_since(t) < UNSPLIT_LOG_INTERVAL)
        {
            self.unsplit_quiet += 1;
            return;
        }
        tracing::warn!(
            spans,
            error = %reason,
            suppressed = self.unsplit_quiet,
            "cannot split an item; sending it whole, above send_batch_max_size"
        );
        self.unsplit_logged = Some(now);
        self.unsplit_quiet = 0;
    }

    #[cfg(test)]
    pub(crate) fn pending_spans(&self) -> usize {
        self.pending.values().map(|p| p.spans).sum()
    }

    /// Adds an item; returns the batches it completed.
    pub fn add(&mut self, key: K, item: T, now: Instant) -> Vec<Batch<K, T>> {
        let mut out = Vec::new();
        let max = self.settings.send_batch_max_size;
        let mut item = Some(item);
        // The item in hand is one trace, or cannot tell its traces: cut it by span count.
        let mut one_trace = false;
        while let Some(current) = item.take() {
            let spans = current.spans();
            let pending_spans = self.pending.get(&key).map_or(0, |p| p.spans);
            if max > 0 && pending_spans + spans > max && !one_trace {
                one_trace = true;
                if spans <= max || spans > max.saturating_mul(TRACE_CUT_FACTOR) {
                    // It fits a batch alone: it starts one, whole, and no trace in it is cut.
                    // Far above the maximum (a bulk import), it is cut by span count: one piece
                    // per trace would take memory in proportion to its traces.
                    if spans <= max && pending_spans > 0 {
                        out.extend(self.take(&key));
                    }
                    item = Some(current);
                    continue;
                }
                match current.split_traces() {
                    Ok(traces) if traces.len() > 1 => {
                        for trace in traces {
                            out.extend(self.add_group(key.clone(), vec![trace], now));
                        }
                    }
                    Ok(mut traces) => {
                        // A trace that does not fit the room left starts a batch of its own.
                        if pending_spans > 0 {
                            out.extend(self.take(&key));
                        }
                        item = traces.pop();
                    }
                    Err(whole) => item = Some(whole),
                }
                continue;
            }
            let pending = self.pending_for(&key, now);
            if max > 0 && pending.spans + spans > max {
                let room = max - pending.spans;
                if room == 0 {
                    item = Some(current);
                } else {
                    match current.split_pieces(room, max) {
                        Ok(pieces) => {
                            // The first piece fills this batch; full pieces after it are
                            // batches of their own; the last goes on like a new item.
                            let mut pieces = pieces.into_iter();
                            if let Some(head) = pieces.next() {
                                pending.spans += head.spans();
                                pending.items.push(head);
                            }
                            out.extend(self.take(&key));
                            let mut rest: Vec<T> = pieces.collect();
                            item = rest.pop();
                            for piece in rest {
                                out.push(Batch {
                                    key: key.clone(),
                                    spans: piece.spans(),
                                    items: vec![piece],
                                });
                            }
                            continue;
                        }
                        Err(Unsplit { item: whole, reason }) => {
                            // What is pending goes first, then the item alone: order kept,
                            // nothing lost, only this one batch is over the maximum.
                            if !pending.items.is_empty() {
                                out.extend(self.take(&key));
                            }
                            self.note_unsplit(spans, &reason, now);
                            out.push(Batch {
                                key: key.clone(),
                                items: vec![whole],
                                spans,
                            });
                            continue;
                        }
                    }
                }
                out.extend(self.take(&key));
                continue;
            }
            pending.items.push(current);
            pending.spans += spans;
            if pending.spans >= self.settings.send_batch_size {
                out.extend(self.take(&key));
            }
        }
        out
    }

    /// Adds items that must travel in one batch (one trace's pieces): what is pending goes first
    /// when they do not fit its room; they are cut only when together above
    /// `send_batch_max_size`.
    pub(crate) fn add_group(&mut self, key: K, items: Vec<T>, now: Instant) -> Vec<Batch<K, T>> {
        let total: usize = items.iter().map(BatchItem::spans).sum();
        let max = self.settings.send_batch_max_size;
        let mut out = Vec::new();
        if max > 0 && total > max {
            if self.pending.get(&key).is_some_and(|p| !p.items.is_empty()) {
                out.extend(self.take(&key));
            }
            for item in items {
                out.extend(self.add(key.clone(), item, now));
            }
            return out;
        }
        if max > 0 && self.pending_for(&key, now).spans + total > max {
            out.extend(self.take(&key));
        }
        let pending = self.pending_for(&key, now);
        pending.spans += total;
        pending.items.extend(items);
        if pending.spans >= self.settings.send_batch_size {
            out.extend(self.take(&key));
        }
        out
    }

    /// When the oldest pending item's timeout runs out, if anything is pending.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter(|p| !p.items.is_empty())
            .map(|p| p.since + self.settings.timeout)
            .min()
    }

    /// Batches whose timeout has run out at `now`.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<Batch<K, T>> {
        let due: Vec<K> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.items.is_empty() && p.since + self.settings.timeout <= now)
            .map(|(k, _)| k.clone())
            .collect();
        due.iter().filter_map(|k| self.take(k)).collect()
    }

    /// Everything pending, e.g. at shutdown.
    pub fn flush(&mut self) -> Vec<Batch<K, T>> {
        let keys: Vec<K> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.items.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| self.take(k)).collect()
    }

    /// The batch pending for `key`, created if there is none; an empty one starts its age now.
    fn pending_for(&mut self, key: &K, now: Instant) -> &mut Pending<T> {
        let pending = self.pending.entry(key.clone()).or_insert_with(|| Pending {
            items: Vec::new(),
            spans: 0,
            since: now,
        });
        if pending.items.is_empty() {
            pending.since = now;
        }
        pending
    }

    fn take(&mut self, key: &K) -> Option<Batch<K, T>> {
        let p = self.pending.remove(key)?;
        Some(Batch {
            key: key.clone(),
            items: p.items,
            spans: p.spans,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::wire::{ResourceChunk, encode_record, parse_protobuf, testdata};
    use bytes::Bytes;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    /// A test item: a run of span numbers.
    #[derive(Debug, Clone, PartialEq)]
    struct Run(Vec<u32>);

    impl BatchItem for Run {
        fn spans(&self) -> usize {
            self.0.len()
        }
        fn split(mut self, first: usize) -> Result<(Self, Self), Unsplit<Self>> {
            // Runs starting at 1000 refuse to split, like a record that does not decode.
            if self.0.first().is_some_and(|&n| n >= 1000) {
                return Err(Unsplit {
                    item: self,
                    reason: "test".into(),
                });
            }
            let tail = self.0.split_off(first);
            Ok((self, Run(tail)))
        }
    }

    #[test]
    fn a_large_item_becomes_full_batches_in_order() {
        let mut b: Batcher<&str, Run> = Batcher::new(settings(5, 5));
        let now = Instant::now();
        assert!(b.add("k", Run((0..3).collect()), now).is_empty());
        let out = b.add("k", Run((3..26).collect()), now);
        let sizes: Vec<usize> = out.iter().map(|batch| batch.spans).collect();
        assert_eq!(sizes, vec![5, 5, 5, 5, 5], "full batches; the last 1 span waits");
        let order: Vec<u32> = out
            .iter()
            .flat_map(|batch| &batch.items)
            .flat_map(|r| r.0.clone())
            .collect();
        assert_eq!(order, (0..25).collect::<Vec<u32>>());
        assert_eq!(b.pending_spans(), 1);
    }

    fn settings(size: usize, max: usize) -> BatchSettings {
        BatchSettings {
            send_batch_size: size,
            send_batch_max_size: max,
            timeout: Duration::from_millis(200),
        }
    }

    fn run(from: u32, n: u32) -> Run {
        Run((from..from + n).collect())
    }

    #[test]
    fn flushes_at_size() {
        let t = Instant::now();
        let mut b = Batcher::new(settings(10, 0));
        assert!(b.add("a", run(0, 6), t).is_empty());
        let out = b.add("a", run(6, 6), t);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].spans, 12);
        assert_eq!(b.pending_spans(), 0);
    }

    #[test]
    fn never_exceeds_max_and_loses_nothing() {
        let t = Instant::now();
        let mut b = Batcher::new(settings(10, 15));
        let mut out = b.add("a", run(0, 7), t);
        out.extend(b.add("a", run(7, 40), t));
        out.extend(b.flush());
        assert!(out.iter().all(|batch| batch.spans <= 15), "{out:?}");
        let all: Vec<u32> = out
            .iter()
            .flat_map(|batch| batch.items.iter().flat_map(|r| r.0.clone()))
            .collect();
        assert_eq!(all, (0..47).collect::<Vec<_>>());
        assert_eq!(out.iter().map(|b| b.spans).sum::<usize>(), 47);
    }

    /// An item that cannot be split goes out whole, after what was pending, and is counted; the
    /// batcher goes on batching.
    #[test]
    fn unsplittable_items_go_out_whole_and_are_counted() {
        let t = Instant::now();
        let mut b = Batcher::new(settings(10, 15));
        let mut out = b.add("a", run(0, 7), t);
        out.extend(b.add("a", run(1000, 20), t));
        assert_eq!(b.take_unsplit(), 1);
        assert_eq!(b.take_unsplit(), 0);
        out.extend(b.add("a", run(7, 20), t));
        out.extend(b.flush());
        let spans: Vec<usize> = out.iter().map(|b| b.spans).collect();
        assert_eq!(spans, vec![7, 20, 15, 5]);
        let all: Vec<u32> = out
            .iter()
            .flat_map(|batch| batch.items.iter().flat_map(|r| r.0.clone()))
            .collect();
        let expected: Vec<u32> = (0..7).chain(1000..1020).chain(7..27).collect();
        assert_eq!(all, expected);
        // An unsplittable item into an empty batch: no empty batch before it.
        let mut b = Batcher::new(settings(10, 15));
        let out = b.add("a", run(1000, 16), t);
        assert_eq!(out.iter().map(|b| b.spans).collect::<Vec<_>>(), vec![16]);
    }

    #[test]
    fn partitions_by_key() {
        let t = Instant::now();
        let mut b = Batcher::new(settings(5, 0));
        assert!(b.add("a", run(0, 3), t).is_empty());
        assert!(b.add("b", run(10, 3), t).is_empty());
        let out = b.add("a", run(3, 3), t);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, "a");
        assert_eq!(b.pending_spans(), 3);
    }

    #[test]
    fn times_out_per_key() {
        let t = Instant::now();
        let mut b = Batcher::new(settings(100, 0));
        b.add("a", run(0, 1), t);
        b.add("b", run(1, 1), t + Duration::from_millis(100));
        assert_eq!(b.next_deadline(), Some(t + Duration::from_millis(200)));
        assert!(b.expired(t + Duration::from_millis(199)).is_empty());
        let out = b.expired(t + Duration::from_millis(200));
        assert_eq!(out.iter().map(|b| b.key).collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(b.next_deadline(), Some(t + Duration::from_millis(300)));
        // A new item for "a" starts a new timeout.
        b.add("a", run(2, 1), t + Duration::from_millis(250));
        assert_eq!(b.expired(t + Duration::from_millis(300)).len(), 1);
        assert_eq!(b.next_deadline(), Some(t + Duration::from_millis(450)));
    }

    /// A test item holding spans of several traces: (trace, span number).
    #[derive(Debug, Clone, PartialEq)]
    struct Traced(Vec<(u32, u32)>);

    impl BatchItem for Traced {
        fn spans(&self) -> usize {
            self.0.len()
        }
        fn split(mut self, first: usize) -> Result<(Self, Self), Unsplit<Self>> {
            let tail = self.0.split_off(first);
            Ok((self, Traced(tail)))
        }
        fn split_traces(self) -> Result<Vec<Self>, Self> {
            let mut out: Vec<Traced> = Vec::new();
            for span in self.0 {
                match out.iter_mut().find(|t| t.0[0].0 == span.0) {
                    Some(t) => t.0.push(span),
                    None => out.push(Traced(vec![span])),
                }
            }
            Ok(out)
        }
    }

    /// Random items of several traces each (spread over the item, as SDK batches interleave
    /// them), through batchers of every size: each trace of at most send_batch_max_size spans is
    /// in one batch, no batch is above the maximum, every span leaves once and each trace's in
    /// order.
    #[test]
    fn a_trace_is_cut_only_when_it_alone_is_above_the_maximum() {
        let mut rng = crate::loadgen::spans::FastRng::new(15);
        let mut pick = |n: u64| (rng.next_u64() % n) as u32;
        let (mut cut_needed, mut whole_checked) = (0, 0);
        for round in 0..2000u32 {
            let size = 1 + pick(12) as usize;
            let max = size + pick(10) as usize;
            let mut b = Batcher::new(settings(size, max));
            let t = Instant::now();
            let (mut out, mut sizes) = (Vec::new(), std::collections::HashMap::new());
            let mut next = 0;
            for item in 0..1 + pick(6) {
                let traces = 1 + pick(4);
                let mut spans = Vec::new();
                for _ in 0..pick(20) {
                    let trace = round * 100 + item * 10 + pick(traces.into());
                    spans.push((trace, next));
                    *sizes.entry(trace).or_insert(0usize) += 1;
                    next += 1;
                }
                if spans.is_empty() {
                    continue;
                }
                if pick(3) == 0 {
                    out.extend(b.add_group("k", vec![Traced(spans)], t));
                } else {
                    out.extend(b.add("k", Traced(spans), t));
                }
            }
            out.extend(b.flush());
            let mut seen: Vec<(u32, u32)> = Vec::new();
            for batch in &out {
                assert!(batch.spans <= max, "round {round}");
                assert_eq!(batch.spans, batch.items.iter().map(|i| i.0.len()).sum::<usize>());
                seen.extend(batch.items.iter().flat_map(|i| i.0.clone()));
            }
            assert_eq!(seen.len(), next as usize, "round {round}");
            for (&trace, &n) in &sizes {
                let batches = out
                    .iter()
                    .filter(|batch| batch.items.iter().any(|i| i.0.iter().any(|s| s.0 == trace)))
                    .count();
                let order: Vec<u32> = seen.iter().filter(|s| s.0 == trace).map(|s| s.1).collect();
                assert!(order.windows(2).all(|w| w[0] < w[1]), "round {round}");
                if n <= max {
                    assert_eq!(batches, 1, "round {round}: trace of {n} spans, max {max}");
                    whole_checked += 1;
                } else {
                    assert_eq!(batches, n.div_ceil(max), "round {round}: full batches of it");
                    cut_needed += 1;
                }
            }
        }
        assert!(whole_checked > 5000 && cut_needed > 100, "{whole_checked} {cut_needed}");
    }

    /// A group (one trace from groupbytrace) goes into one batch: what is pending leaves first
    /// when the group does not fit its room.
    #[test]
    fn a_group_goes_into_one_batch() {
        let t = Instant::now();
        let mut b = Batcher::new(settings(10, 10));
        assert!(b.add("k", run(0, 6), t).is_empty());
        let out = b.add_group("k", vec![run(6, 2), run(8, 3)], t);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].items, vec![run(0, 6)]);
        assert_eq!(b.pending_spans(), 5);
        // Filling send_batch_size with a group sends it.
        let out = b.add_group("k", vec![run(11, 5)], t);
        assert_eq!(out.iter().map(|b| b.spans).collect::<Vec<_>>(), vec![10]);
        // A group above the maximum alone is cut, after what was pending, between its items
        // where they fit a batch, else into full batches.
        b.add("k", run(16, 1), t);
        let mut out = b.add_group("k", vec![run(17, 7), run(24, 7)], t);
        out.extend(b.flush());
        assert_eq!(out.iter().map(|b| b.spans).collect::<Vec<_>>(), vec![1, 7, 7]);
        let mut out = b.add_group("k", vec![run(31, 25)], t);
        out.extend(b.flush());
        assert_eq!(out.iter().map(|b| b.spans).collect::<Vec<_>>(), vec![10, 10, 5]);
    }

    /// Real records: items of several interleaved traces through a batcher whose maximum cuts
    /// them: every trace decodes from exactly one request.
    #[test]
    fn real_records_are_cut_between_traces() {
        use crate::pipeline::Item;
        let t = Instant::now();
        let mut b: Batcher<(), Item> = Batcher::new(settings(8, 8));
        let mut out = Vec::new();
        for i in 0..6u64 {
            let mut rs = testdata::resource_spans(&format!("svc{i}"), i * 100, 1, 5);
            for (n, span) in rs.scope_spans.iter_mut().flat_map(|s| &mut s.spans).enumerate() {
                span.trace_id = vec![(i * 3 + n as u64 % 3) as u8 + 1; 16];
            }
            let chunk = ResourceChunk {
                bytes: encode_record(&rs),
                spans: 5,
                experiment: None,
                names: None,
            };
            let item = Item {
                chunk,
                charge: None,
                origin: None,
            };
            out.extend(b.add((), item, t));
        }
        out.extend(b.flush());
        let mut where_: std::collections::HashMap<Vec<u8>, std::collections::HashSet<usize>> = Default::default();
        let mut total = 0;
        for (n, batch) in out.iter().enumerate() {
            assert!(batch.spans <= 8);
            let payload: Vec<u8> = batch.items.iter().flat_map(|c| c.chunk.bytes.to_vec()).collect();
            let req = ExportTraceServiceRequest::decode(payload.as_slice()).unwrap();
            for span in req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .flat_map(|s| &s.spans)
            {
                where_.entry(span.trace_id.clone()).or_default().insert(n);
                total += 1;
            }
        }
        assert_eq!(total, 30);
        assert_eq!(where_.len(), 18);
        assert!(where_.values().all(|batches| batches.len() == 1), "{where_:?}");
    }

    impl BatchItem for ResourceChunk {
        fn spans(&self) -> usize {
            self.spans
        }
        fn split(self, first: usize) -> Result<(Self, Self), Unsplit<Self>> {
            crate::pipeline::wire::split_chunk(&self, first).map_err(|e| Unsplit {
                reason: e.to_string(),
                item: self,
            })
        }
    }

    /// The property the exporter relies on: concatenated records of a batch decode to exactly the
    /// ResourceSpans that went in, in order, including when records were split.
    #[test]
    fn merged_payload_decodes_to_its_inputs() {
        let inputs: Vec<_> = (0..5)
            .map(|i| testdata::resource_spans(&format!("svc{i}"), i * 100, 2, 3))
            .collect();
        let t = Instant::now();
        let mut b = Batcher::new(settings(8, 10));
        let mut out = Vec::new();
        for rs in &inputs {
            let body = Bytes::from(
                ExportTraceServiceRequest {
                    resource_spans: vec![rs.clone()],
                }
                .encode_to_vec(),
            );
            for chunk in parse_protobuf(body).unwrap().chunks {
                out.extend(b.add((), chunk, t));
            }
        }
        out.extend(b.flush());
        let mut spans_out = Vec::new();
        for batch in &out {
            assert!(batch.spans <= 10);
            let payload: Vec<u8> = batch.items.iter().flat_map(|c| c.bytes.to_vec()).collect();
            let req = ExportTraceServiceRequest::decode(payload.as_slice()).unwrap();
            let n: usize = req
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            assert_eq!(n, batch.spans);
            for rs in req.resource_spans {
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        spans_out.push((rs.resource.clone(), ss.scope.clone(), s));
                    }
                }
            }
        }
        let spans_in: Vec<_> = inputs
            .iter()
            .flat_map(|rs| {
                rs.scope_spans.iter().flat_map(move |ss| {
                    ss.spans
                        .iter()
                        .map(move |s| (rs.resource.clone(), ss.scope.clone(), s.clone()))
                })
            })
            .collect();
        assert_eq!(spans_out, spans_in);
        // Unsplit records travel byte-for-byte.
        let first = encode_record(&inputs[0]);
        assert_eq!(out[0].items[0].bytes, first);
    }
}
