//! A sender's work on one batch: one request per MLflow target (experiment, run, workspace),
//! each retried by the OTLP rules until stored, refused for good, out of retries or abandoned;
//! a request of several traces that MLflow refuses for good is bisected by trace, so only the
//! traces MLflow refuses fail.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::isolate::{self, Bisection};
use super::route::Target;
use super::{ExportError, Exporter, OutBatch, StageControl, StageSettings, dead_letter, release, shutdown_dropped};
use crate::pipeline::Item;
use crate::pipeline::by_trace::{self, TraceId};
use crate::supervise::LockUnpoisoned;
use crate::telemetry::Metrics;

/// Bytes of MLflow's reason kept in the isolation log line.
const REASON_CHARS: usize = 300;
/// At most one isolation log line per exporter this often; the others are counted in the next.
const ISOLATION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How a request ended.
enum Verdict {
    /// Stored but for `rejected` spans the destination refused (OTLP partial success).
    Stored { rejected: usize },
    /// Refused for good (`exhausted`: a retryable error outlived the retry policy).
    Failed {
        error: ExportError,
        attempts: u32,
        exhausted: bool,
    },
    /// The stage is aborting: the request's spans are counted dropped (without a spool) already.
    Abandoned,
}

/// Sends one batch: each of its targets until it is stored, refused for good, out of retries,
/// or abandoned.
pub(super) async fn deliver(
    settings: &StageSettings,
    exporter: &Exporter,
    batch: OutBatch,
    metrics: &Metrics,
    control: &StageControl,
) {
    let groups = exporter.targets(&batch);
    let mut left = batch.spans;
    for (target, members) in groups {
        let part = batch.subset(&members);
        let parts = if target.run.is_some() {
            for_run(part)
        } else {
            vec![part]
        };
        for part in parts {
            left -= part.spans;
            if !deliver_part(settings, exporter, part, &target, metrics, control).await {
                shutdown_dropped(settings, metrics, left);
                return;
            }
        }
    }
}

/// MLflow links at most this many traces to a run per request; with more it stores the spans,
/// answers 200 and links none (it only logs "Failed to link").
const MAX_LINKED_TRACES: usize = 100;

/// A part for a run, cut so no request completes more than MAX_LINKED_TRACES traces (MLflow
/// links the traces whose root span is in the request).
fn for_run(part: OutBatch) -> Vec<OutBatch> {
    // Fewer spans than the limit cannot hold more roots.
    if part.spans <= MAX_LINKED_TRACES {
        return vec![part];
    }
    let Some(traces) = split_traces(&part) else {
        return vec![part];
    };
    if traces.iter().filter(|t| t.has_root).count() <= MAX_LINKED_TRACES {
        return vec![part];
    }
    let mut parts = Vec::new();
    let (mut items, mut roots) = (Vec::new(), 0);
    for trace in traces {
        if trace.has_root && roots == MAX_LINKED_TRACES {
            parts.push(batch_of(&part, std::mem::take(&mut items)));
            roots = 0;
        }
        roots += usize::from(trace.has_root);
        items.extend(trace.items);
    }
    if !items.is_empty() {
        parts.push(batch_of(&part, items));
    }
    parts
}

fn batch_of(like: &OutBatch, items: Vec<Item>) -> OutBatch {
    OutBatch {
        key: like.key.clone(),
        spans: items.iter().map(|i| i.chunk.spans).sum(),
        items,
    }
}

/// One trace's pieces of a part.
struct TraceItems {
    items: Vec<Item>,
    /// Its root span is among them.
    has_root: bool,
}

/// False when the stage aborted meanwhile.
async fn deliver_part(
    settings: &StageSettings,
    exporter: &Exporter,
    part: OutBatch,
    target: &Target,
    metrics: &Metrics,
    control: &StageControl,
) -> bool {
    match send(settings, exporter, &part, target, metrics, control).await {
        Verdict::Stored { rejected } => stored(settings, &part, rejected, metrics),
        Verdict::Abandoned => return false,
        Verdict::Failed {
            error,
            attempts,
            exhausted,
        } => {
            let bisect = !exhausted
                && exporter.isolates_poison_traces()
                && matches!(&error, ExportError::Permanent { status, .. } if isolate::worth_bisecting(*status));
            if bisect && let Some(traces) = split_traces(&part) {
                return isolate(settings, exporter, &part, traces, target, error, metrics, control).await;
            }
            failed(settings, &part, &error, attempts, metrics, exhausted).await;
        }
    }
    true
}

/// The part's items cut by trace id, in order of first appearance; None when it holds fewer
/// than two traces or a record does not cut (then it fails whole, as before isolation).
fn split_traces(part: &OutBatch) -> Option<Vec<TraceItems>> {
    let mut traces: Vec<TraceItems> = Vec::new();
    let mut index: HashMap<TraceId, usize> = HashMap::new();
    for item in &part.items {
        let pieces = match by_trace::split_chunk(&item.chunk) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "a refused request's record does not split by trace; it fails whole");
                return None;
            }
        };
        for (piece, chunk) in pieces {
            let piece_item = Item {
                chunk,
                charge: item.charge.clone(),
                origin: item.origin,
            };
            match index.get(&piece.trace_id) {
                Some(&i) => {
                    traces[i].items.push(piece_item);
                    traces[i].has_root |= piece.has_root;
                }
                None => {
                    index.insert(piece.trace_id, traces.len());
                    traces.push(TraceItems {
                        items: vec![piece_item],
                        has_root: piece.has_root,
                    });
                }
            }
        }
    }
    (traces.len() >= 2).then_some(traces)
}

/// Bisects a refused part by trace: what MLflow stores is counted sent, each trace it refuses
/// alone fails (and is dead-lettered), and what the request budget leaves undecided fails whole.
#[allow(clippy::too_many_arguments)]
async fn isolate(
    settings: &StageSettings,
    exporter: &Exporter,
    part: &OutBatch,
    traces: Vec<TraceItems>,
    target: &Target,
    first: ExportError,
    metrics: &Metrics,
    control: &StageControl,
) -> bool {
    let handles = metrics.exporter(&settings.name);
    let of = |range: std::ops::Range<usize>| {
        let items: Vec<Item> = traces[range].iter().flat_map(|t| t.items.iter().cloned()).collect();
        batch_of(part, items)
    };
    let mut bisection = Bisection::new(traces.len());
    let mut refusals: Vec<(usize, ExportError, u32)> = Vec::new();
    let mut settled = 0usize;
    while let Some(range) = bisection.next() {
        let single = (range.len() == 1).then_some(range.start);
        let sub = of(range);
        handles.isolation_requests.inc();
        match send(settings, exporter, &sub, target, metrics, control).await {
            Verdict::Stored { rejected } => {
                settled += sub.spans;
                stored(settings, &sub, rejected, metrics);
                bisection.report(true);
            }
            Verdict::Failed {
                error,
                attempts,
                exhausted: true,
            } => {
                // MLflow stopped answering in time: this range fails as a whole, like a batch would.
                settled += sub.spans;
                failed(settings, &sub, &error, attempts, metrics, true).await;
                bisection.report(true);
            }
            Verdict::Failed { error, attempts, .. } => {
                if let Some(i) = single {
                    refusals.push((i, error, attempts));
                }
                bisection.report(false);
            }
            Verdict::Abandoned => {
                shutdown_dropped(settings, metrics, part.spans - settled - sub.spans);
                return false;
            }
        }
    }
    if bisection.not_trace_specific {
        // Nothing was stored, so the request fails as it would have without isolation: once.
        tracing::warn!(exporter = %settings.name, traces = traces.len(), requests = bisection.sent, "MLflow refused traces alone as well as together: its refusal is not about a trace, so the request fails whole");
        failed(settings, part, &first, 1, metrics, false).await;
        return true;
    }
    let poisoned = bisection.refused.len();
    handles.poison_traces.inc_by(poisoned as u64);
    let refused_spans: usize = bisection.refused.iter().map(|&i| of(i..i + 1).spans).sum();
    log_isolation(settings, traces.len(), poisoned, refused_spans, &refusals, &first);
    for &i in &bisection.refused {
        let (error, attempts) = refusals
            .iter()
            .find(|(j, ..)| *j == i)
            .map(|(_, e, a)| (clone_error(e), *a))
            .unwrap_or_else(|| (clone_error(&first), 1));
        let sub = of(i..i + 1);
        count_failed(settings, &sub, metrics);
        dead_letter(settings, &sub, &error, attempts, metrics).await;
        release(settings, &sub);
    }
    for range in std::mem::take(&mut bisection.undecided) {
        let sub = of(range);
        tracing::error!(exporter = %settings.name, spans = sub.spans, error = %first, "poison-trace isolation ran out of its request budget; these traces fail together");
        failed(settings, &sub, &first, 1, metrics, false).await;
    }
    true
}

/// A copy of a refusal for a dead-letter record (ExportError holds no clonable sources).
fn clone_error(e: &ExportError) -> ExportError {
    match e {
        ExportError::Permanent { status, body } => ExportError::Permanent {
            status: *status,
            body: body.clone(),
        },
        other => ExportError::Internal(other.to_string()),
    }
}

/// One line per isolation, at most every ISOLATION_LOG_INTERVAL per exporter, with MLflow's reason.
fn log_isolation(
    settings: &StageSettings,
    traces: usize,
    poisoned: usize,
    refused_spans: usize,
    refusals: &[(usize, ExportError, u32)],
    first: &ExportError,
) {
    let mut last = settings.isolation_log.lock_unpoisoned();
    let now = Instant::now();
    last.1 += 1;
    if last.0.is_some_and(|at| now.duration_since(at) < ISOLATION_LOG_INTERVAL) {
        return;
    }
    let isolations = std::mem::take(&mut last.1);
    last.0 = Some(now);
    let reason = refusals.first().map(|(_, e, _)| e).unwrap_or(first).to_string();
    let reason: String = reason.chars().take(REASON_CHARS).collect();
    tracing::warn!(
        exporter = %settings.name,
        traces,
        refused_traces = poisoned,
        refused_spans,
        isolations_since_last_line = isolations,
        reason = %reason,
        "MLflow refused part of a request: its traces were resent in halves, the refused ones fail alone, the rest are stored"
    );
}

/// Sends `part` until it has a verdict.
async fn send(
    settings: &StageSettings,
    exporter: &Exporter,
    part: &OutBatch,
    target: &Target,
    metrics: &Metrics,
    control: &StageControl,
) -> Verdict {
    let handles = metrics.exporter(&settings.name);
    let started = Instant::now();
    let mut schedule = settings.retry.schedule();
    let mut refreshed_after_401 = false;
    let mut attempts = 0u32;
    loop {
        let attempt_started = Instant::now();
        let result = tokio::select! {
            r = exporter.export_to(part, target) => r,
            _ = control.abort.cancelled() => {
                shutdown_dropped(settings, metrics, part.spans);
                return Verdict::Abandoned;
            }
        };
        count_lookups(settings, exporter, metrics);
        handles.export_duration.observe(attempt_started.elapsed().as_secs_f64());
        attempts += 1;
        let error = match result {
            Ok(rejected) => return Verdict::Stored { rejected },
            Err(e) => e,
        };
        if matches!(error, ExportError::Unauthorized { .. }) {
            handles.unauthorized.inc();
        }
        if !error.is_retryable() {
            return Verdict::Failed {
                error,
                attempts,
                exhausted: false,
            };
        }
        handles.retries.inc_by(error.reason(), 1);
        settings.failures_since_delivery.fetch_add(1, Ordering::AcqRel);
        // The first 401 means the token expired under us: the authenticator dropped it, so
        // retry at once with a fresh one. Later 401s wait like any other retryable answer.
        if matches!(error, ExportError::Unauthorized { .. }) && !refreshed_after_401 {
            refreshed_after_401 = true;
            tracing::warn!(exporter = %settings.name, "export answered 401; retrying with a fresh token");
            continue;
        }
        let jitter: f64 = rand::random();
        let Some(delay) = schedule.next_delay(started.elapsed(), error.retry_after(), jitter) else {
            tracing::error!(exporter = %settings.name, spans = part.spans, error = %error, elapsed = ?started.elapsed(), "export retries exhausted");
            return Verdict::Failed {
                error,
                attempts,
                exhausted: true,
            };
        };
        if let Some(asked) = error.retry_after().filter(|a| *a > settings.retry.retry_after_cap()) {
            tracing::warn!(exporter = %settings.name, retry_after = ?asked, cap = ?settings.retry.retry_after_cap(), "Retry-After above retry_on_failure.max_interval: capped, so the senders and new data are not parked");
        }
        if matches!(error, ExportError::Auth(_)) {
            // The oauth2client extension logs token failures itself, at most once a minute.
            tracing::debug!(exporter = %settings.name, spans = part.spans, error = %error, retry_in = ?delay, "no token yet; will retry");
        } else if let Some(hint) = error.hint(exporter.names_mlflow()) {
            tracing::warn!(exporter = %settings.name, url = %settings.destination, spans = part.spans, error = %error, retry_in = ?delay, hint, "export failed; will retry");
        } else {
            tracing::warn!(exporter = %settings.name, url = %settings.destination, spans = part.spans, error = %error, retry_in = ?delay, "export failed; will retry");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = control.abort.cancelled() => {
                shutdown_dropped(settings, metrics, part.spans);
                return Verdict::Abandoned;
            }
        }
    }
}

/// REST lookups the exporter made, into the stage's metric.
fn count_lookups(settings: &StageSettings, exporter: &Exporter, metrics: &Metrics) {
    if let Exporter::OtlpHttp(e) = exporter {
        for (how, n) in e.take_lookups() {
            if n > 0 {
                metrics
                    .exporter(&settings.name)
                    .experiment_lookups
                    .inc_by(how.label(), n);
            }
        }
    }
}

/// `rejected` spans the destination refused while storing the rest are counted failed: they
/// cannot be told apart from the others, so they are neither retried nor dead-lettered.
fn stored(settings: &StageSettings, part: &OutBatch, rejected: usize, metrics: &Metrics) {
    let rejected = rejected.min(part.spans);
    let handles = metrics.exporter(&settings.name);
    handles.sent.inc_by((part.spans - rejected) as u64);
    if rejected > 0 {
        handles.send_failed.inc_by(rejected as u64);
    }
    let failed = settings.failures_since_delivery.swap(0, Ordering::AcqRel);
    if failed > 0 {
        tracing::info!(exporter = %settings.name, url = %settings.destination, failed_attempts = failed, "delivery works again");
    }
    release(settings, part);
}

fn count_failed(settings: &StageSettings, part: &OutBatch, metrics: &Metrics) {
    metrics.exporter(&settings.name).send_failed.inc_by(part.spans as u64);
}

/// A part refused for good or out of retries: counted, logged, dead-lettered when configured.
async fn failed(
    settings: &StageSettings,
    part: &OutBatch,
    error: &ExportError,
    attempts: u32,
    metrics: &Metrics,
    exhausted: bool,
) {
    count_failed(settings, part, metrics);
    if !exhausted {
        tracing::error!(exporter = %settings.name, spans = part.spans, error = %error, "export failed permanently");
    }
    dead_letter(settings, part, error, attempts, metrics).await;
    release(settings, part);
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    use super::*;
    use crate::pipeline::wire::{ResourceChunk, encode_record};

    /// A record of `traces` traces (ids first..first+traces), each a root and one child.
    fn item(first: u8, traces: u8) -> Item {
        let spans: Vec<Span> = (first..first + traces)
            .flat_map(|t| {
                [
                    Span {
                        trace_id: vec![t + 1; 16],
                        span_id: vec![1; 8],
                        ..Default::default()
                    },
                    Span {
                        trace_id: vec![t + 1; 16],
                        span_id: vec![2; 8],
                        parent_span_id: vec![1; 8],
                        ..Default::default()
                    },
                ]
            })
            .collect();
        let rs = ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        };
        Item {
            chunk: ResourceChunk {
                bytes: encode_record(&rs),
                spans: 2 * usize::from(traces),
                experiment: None,
                names: None,
            },
            charge: None,
            origin: None,
        }
    }

    fn batch(items: Vec<Item>) -> OutBatch {
        OutBatch {
            key: Default::default(),
            spans: items.iter().map(|i| i.chunk.spans).sum(),
            items,
        }
    }

    #[test]
    fn traces_split_across_records_stay_one_unit() {
        // Trace 3 is in both records.
        let b = batch(vec![item(0, 4), item(3, 2)]);
        let traces = split_traces(&b).unwrap();
        assert_eq!(traces.len(), 5);
        assert_eq!(traces[3].items.len(), 2);
        assert!(traces.iter().all(|t| t.has_root));
        let spans: usize = traces.iter().flat_map(|t| &t.items).map(|i| i.chunk.spans).sum();
        assert_eq!(spans, b.spans);
        assert!(
            split_traces(&batch(vec![item(0, 1)])).is_none(),
            "one trace: nothing to bisect"
        );
    }

    #[test]
    fn a_run_gets_at_most_100_completed_traces_per_request() {
        let b = batch(vec![item(0, 120), item(120, 130)]);
        let parts = for_run(b.clone());
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(|p| p.spans).sum::<usize>(), b.spans);
        for p in &parts {
            let roots = split_traces(p).map_or(1, |t| t.iter().filter(|t| t.has_root).count());
            assert!(roots <= MAX_LINKED_TRACES, "{roots}");
        }
        let small = batch(vec![item(0, 50)]);
        assert_eq!(for_run(small).len(), 1);
    }
}
