//! The sending queue between an exporter's batcher and its senders. A sender that finds more
//! batches waiting for the same destination sends them as one request, up to the batch size
//! limit. When the destination is behind (an `mlflow server` stores far fewer spans per second
//! than agents send), requests then grow to that limit instead of staying as small as the batch
//! timeout cut them, and MLflow pays its cost per request (a transaction, lookups and locks per
//! call) less often: on SQLite that cost is paid under its one writer lock. Nothing waits for
//! it: only batches already queued are merged, so an idle destination sees the batcher's
//! batches as they are.
use tokio::sync::mpsc;

use super::OutBatch;
use crate::batch::{Batch, BatchSettings};

pub(crate) struct SendingQueue {
    rx: mpsc::Receiver<OutBatch>,
    /// A batch taken to look at that could not join the one being merged: it goes next.
    front: Option<OutBatch>,
    /// Merge waiting batches up to this many spans; 0: never merge.
    merge_up_to: usize,
}

impl SendingQueue {
    pub(crate) fn new(rx: mpsc::Receiver<OutBatch>, merge_up_to: usize) -> SendingQueue {
        SendingQueue {
            rx,
            front: None,
            merge_up_to,
        }
    }

    /// The next request's batch and how many queued batches were merged into it; None once
    /// the batcher has gone and nothing is left.
    pub(crate) async fn next(&mut self) -> Option<(OutBatch, usize)> {
        let first = match self.front.take() {
            Some(batch) => batch,
            None => self.rx.recv().await?,
        };
        let rx = &mut self.rx;
        let (batch, merged, left) = merge_waiting(first, || rx.try_recv().ok(), self.merge_up_to);
        self.front = left;
        Some((batch, merged))
    }

    /// Batches waiting.
    pub(crate) fn len(&self) -> usize {
        self.rx.len() + usize::from(self.front.is_some())
    }
}

/// How many spans a merged request may hold: the batch's maximum, else its size (the
/// collector's `send_batch_max_size: 0` means no maximum, which is no reason to build requests
/// larger than a batch); 0 when merging is off.
pub(crate) fn merge_limit(batch: &BatchSettings, enabled: bool) -> usize {
    match (enabled, batch.send_batch_max_size) {
        (false, _) => 0,
        (true, 0) => batch.send_batch_size,
        (true, max) => max,
    }
}

/// Adds to `first` the batches `next` yields while they are for the same destination and the
/// sum stays within `max` spans. Returns the merged batch, how many batches joined it, and the
/// batch taken that did not fit (it must go next, ahead of the rest).
pub(crate) fn merge_waiting<K: PartialEq, T>(
    mut first: Batch<K, T>,
    mut next: impl FnMut() -> Option<Batch<K, T>>,
    max: usize,
) -> (Batch<K, T>, usize, Option<Batch<K, T>>) {
    let mut merged = 0;
    while first.spans < max {
        let Some(batch) = next() else { break };
        if batch.key != first.key || first.spans + batch.spans > max {
            return (first, merged, Some(batch));
        }
        first.spans += batch.spans;
        first.items.extend(batch.items);
        merged += 1;
    }
    (first, merged, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::time::Duration;

    fn batch(key: &'static str, spans: &[usize]) -> Batch<&'static str, usize> {
        Batch {
            key,
            items: spans.to_vec(),
            spans: spans.iter().sum(),
        }
    }

    /// Merges from a queue of batches; returns the merged one, the count, the leftover and
    /// what stayed queued.
    #[allow(clippy::type_complexity)]
    fn run(
        first: Batch<&'static str, usize>,
        queued: Vec<Batch<&'static str, usize>>,
        max: usize,
    ) -> (
        Batch<&'static str, usize>,
        usize,
        Option<Batch<&'static str, usize>>,
        usize,
    ) {
        let mut queue: VecDeque<_> = queued.into();
        let (merged, count, left) = merge_waiting(first, || queue.pop_front(), max);
        (merged, count, left, queue.len())
    }

    #[test]
    fn waiting_batches_of_one_destination_become_one_up_to_the_limit() {
        let (merged, count, left, rest) = run(
            batch("a", &[100]),
            vec![batch("a", &[200]), batch("a", &[300, 50]), batch("a", &[400])],
            700,
        );
        assert_eq!((merged.spans, merged.items, count), (650, vec![100, 200, 300, 50], 2));
        // The one that would pass the limit is handed back, not split and not lost.
        assert_eq!(left.map(|b| b.items), Some(vec![400]));
        assert_eq!(rest, 0);
    }

    #[test]
    fn another_destination_stops_the_merge_and_goes_next() {
        let (merged, count, left, rest) = run(
            batch("a", &[10]),
            vec![batch("a", &[10]), batch("b", &[10]), batch("a", &[10])],
            1000,
        );
        assert_eq!((merged.spans, count), (20, 1));
        assert_eq!(left.map(|b| b.key), Some("b"));
        // Order is kept: the later "a" batch is still queued behind "b".
        assert_eq!(rest, 1);
    }

    #[test]
    fn a_full_batch_takes_nothing_and_off_means_off() {
        let (merged, count, left, rest) = run(batch("a", &[500]), vec![batch("a", &[1])], 500);
        assert_eq!((merged.spans, count, left.is_none(), rest), (500, 0, true, 1));
        let (merged, count, left, rest) = run(batch("a", &[5]), vec![batch("a", &[1])], 0);
        assert_eq!((merged.spans, count, left.is_none(), rest), (5, 0, true, 1));
        // An empty queue ends the merge.
        let (merged, count, left, _) = run(batch("a", &[5]), vec![], 100);
        assert_eq!((merged.spans, count, left.is_none()), (5, 0, true));
    }

    #[test]
    fn the_limit_is_the_batch_maximum_else_its_size() {
        let settings = |size, max| BatchSettings {
            send_batch_size: size,
            send_batch_max_size: max,
            timeout: Duration::from_millis(200),
        };
        assert_eq!(merge_limit(&settings(8192, 16384), true), 16384);
        assert_eq!(merge_limit(&settings(8192, 0), true), 8192);
        assert_eq!(merge_limit(&settings(8192, 16384), false), 0);
    }

    #[tokio::test]
    async fn the_queue_hands_back_the_batch_that_did_not_fit_first() {
        let (tx, rx) = mpsc::channel(8);
        let mut queue = SendingQueue::new(rx, 10);
        for (key, spans) in [("a", 4), ("a", 4), ("b", 4), ("b", 4), ("b", 4)] {
            let b: OutBatch = Batch {
                key: crate::pipeline::Destination {
                    experiment: Some(key.into()),
                    ..Default::default()
                },
                items: Vec::new(),
                spans,
            };
            tx.send(b).await.unwrap();
        }
        drop(tx);
        let mut seen = Vec::new();
        while let Some((batch, merged)) = queue.next().await {
            seen.push((batch.key.experiment.as_deref().map(str::to_string), batch.spans, merged));
        }
        let a = Some("a".to_string());
        let b = Some("b".to_string());
        assert_eq!(seen, vec![(a, 8, 1), (b.clone(), 8, 1), (b, 4, 0)]);
    }
}
