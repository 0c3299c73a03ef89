//! Agent-shaped traffic for `loadgen --trace-duration`: many traces in flight, each span sent
//! when it ends (children before their parents, the root last), in requests flushed the way an
//! SDK's BatchSpanProcessor flushes: on a schedule, or early when a batch is full.
//!
//! Pure: the caller supplies the time since the run started, so the schedule is tested without
//! clocks. The template path (one request = whole traces) cannot show what happens to MLflow
//! when a long agent run reaches it in pieces; this path does.
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::{Span, Status, status};
use prost::Message;

use super::spans::{Encoding, FastRng, Shape};

/// How agents behave: how fast traces start, how long each lasts, how their SDK exports.
#[derive(Debug, Clone)]
pub(crate) struct AgentPlan {
    /// New traces per second (for this worker).
    pub(crate) traces_per_sec: f64,
    /// Wall time from a trace's first span start to its root's end.
    pub(crate) trace_duration: Duration,
    /// The SDK's export schedule (BatchSpanProcessor `schedule_delay`).
    pub(crate) export_interval: Duration,
    /// The SDK's `max_export_batch_size`: a full batch goes out at once.
    pub(crate) max_batch: usize,
    /// Traces to start; None: until `stop_starting`.
    pub(crate) traces: Option<u64>,
}

/// What the worker does next.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Send these ended spans as one request.
    Send(Vec<Span>),
    /// Nothing to send before this time (since the start).
    WaitUntil(Duration),
    /// Every started trace has ended and been sent.
    Done,
}

#[derive(Debug)]
struct Pending {
    end_at: Duration,
    seq: u64,
    span: Span,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.end_at, self.seq) == (other.end_at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.end_at, self.seq).cmp(&(other.end_at, other.seq))
    }
}

/// The spans of every trace in flight, ordered by when they end.
#[derive(Debug)]
pub(crate) struct AgentTraffic {
    shape: Shape,
    plan: AgentPlan,
    /// The shape's offsets are multiplied by this to last `trace_duration`.
    scale: f64,
    rng: FastRng,
    /// Wall-clock nanoseconds at offset zero, for the spans' timestamps.
    epoch_ns: u64,
    started: u64,
    next_start: Duration,
    stopped: bool,
    pending: BinaryHeap<Reverse<Pending>>,
    ended: Vec<Span>,
    next_flush: Duration,
    seq: u64,
}

impl AgentTraffic {
    pub(crate) fn new(shape: Shape, plan: AgentPlan, seed: u64, epoch_ns: u64) -> AgentTraffic {
        let shape_ns = shape
            .spans
            .iter()
            .map(|s| s.start_ns + s.dur_ns)
            .max()
            .unwrap_or(1)
            .max(1);
        let scale = plan.trace_duration.as_nanos() as f64 / shape_ns as f64;
        let next_flush = plan.export_interval;
        AgentTraffic {
            shape,
            plan,
            scale,
            rng: FastRng::new(seed),
            epoch_ns,
            started: 0,
            next_start: Duration::ZERO,
            stopped: false,
            pending: BinaryHeap::new(),
            ended: Vec::new(),
            next_flush,
            seq: 0,
        }
    }

    /// No trace starts after this; those in flight still end and are sent.
    pub(crate) fn stop_starting(&mut self) {
        self.stopped = true;
    }

    /// Spans of traces started but not yet ended, which a cancelled run never sends.
    #[cfg(test)]
    pub(crate) fn unsent(&self) -> usize {
        self.pending.len() + self.ended.len()
    }

    fn may_start(&self) -> bool {
        !self.stopped && self.plan.traces.is_none_or(|n| self.started < n) && self.plan.traces_per_sec > 0.0
    }

    fn start_trace(&mut self, at: Duration) {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&nonzero(&mut self.rng).to_le_bytes());
        trace_id[8..].copy_from_slice(&nonzero(&mut self.rng).to_le_bytes());
        let span_ids: Vec<[u8; 8]> = self
            .shape
            .spans
            .iter()
            .map(|_| nonzero(&mut self.rng).to_le_bytes())
            .collect();
        let scaled = |ns: u64| Duration::from_nanos((ns as f64 * self.scale) as u64);
        for (i, s) in self.shape.spans.iter().enumerate() {
            let start_at = at + scaled(s.start_ns);
            let end_at = at + scaled(s.start_ns + s.dur_ns);
            let span = Span {
                trace_id: trace_id.to_vec(),
                span_id: span_ids[i].to_vec(),
                parent_span_id: s.parent.map(|p| span_ids[p].to_vec()).unwrap_or_default(),
                name: s.name.clone(),
                kind: s.kind as i32,
                start_time_unix_nano: self.epoch_ns + start_at.as_nanos() as u64,
                end_time_unix_nano: self.epoch_ns + end_at.as_nanos() as u64,
                attributes: s.attributes.clone(),
                status: Some(Status {
                    code: status::StatusCode::Ok as i32,
                    ..Default::default()
                }),
                ..Default::default()
            };
            self.seq += 1;
            self.pending.push(Reverse(Pending {
                end_at,
                seq: self.seq,
                span,
            }));
        }
        self.started += 1;
    }

    /// What to do at `now` (time since the run started).
    pub(crate) fn step(&mut self, now: Duration) -> Step {
        while self.may_start() && self.next_start <= now {
            let at = self.next_start;
            self.start_trace(at);
            self.next_start = at + Duration::from_secs_f64(1.0 / self.plan.traces_per_sec);
        }
        while let Some(Reverse(first)) = self.pending.peek() {
            if first.end_at > now {
                break;
            }
            if let Some(Reverse(ended)) = self.pending.pop() {
                self.ended.push(ended.span);
            }
        }
        let max_batch = self.plan.max_batch.max(1);
        if self.ended.len() >= max_batch {
            let rest = self.ended.split_off(max_batch);
            return Step::Send(std::mem::replace(&mut self.ended, rest));
        }
        let finishing = !self.may_start() && self.pending.is_empty();
        if now >= self.next_flush || finishing {
            while self.next_flush <= now {
                self.next_flush += self.plan.export_interval.max(Duration::from_millis(1));
            }
            if !self.ended.is_empty() {
                return Step::Send(std::mem::take(&mut self.ended));
            }
        }
        if finishing && self.ended.is_empty() {
            return Step::Done;
        }
        let mut wake = self.next_flush;
        if self.may_start() {
            wake = wake.min(self.next_start);
        }
        // The next span's end may fill a batch before the schedule.
        if let Some(Reverse(next)) = self.pending.peek() {
            wake = wake.min(next.end_at);
        }
        Step::WaitUntil(wake)
    }
}

fn nonzero(rng: &mut FastRng) -> u64 {
    loop {
        let v = rng.next_u64();
        if v != 0 {
            return v;
        }
    }
}

/// One request holding `spans`, under the shape's resource, encoded for the wire.
pub(crate) fn encode_request(
    shape: &Shape,
    spans: Vec<Span>,
    encoding: Encoding,
) -> Result<Vec<u8>, serde_json::Error> {
    let req = shape.request(spans);
    match encoding {
        Encoding::Proto => Ok(req.encode_to_vec()),
        Encoding::Json => serde_json::to_vec(&req),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::spans::plain_shape;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use std::collections::HashMap;

    const MS: Duration = Duration::from_millis(1);

    fn plan(traces: u64) -> AgentPlan {
        AgentPlan {
            traces_per_sec: 10.0,
            trace_duration: 3000 * MS,
            export_interval: 500 * MS,
            max_batch: 512,
            traces: Some(traces),
        }
    }

    /// Runs the schedule to the end, jumping to each wake-up, and returns (sent at, spans).
    fn run(traffic: &mut AgentTraffic) -> Vec<(Duration, Vec<Span>)> {
        let mut now = Duration::ZERO;
        let mut out = Vec::new();
        for _ in 0..100_000 {
            match traffic.step(now) {
                Step::Send(spans) => out.push((now, spans)),
                Step::WaitUntil(at) => {
                    assert!(at > now, "a wake-up in the past would spin: {at:?} <= {now:?}");
                    now = at;
                }
                Step::Done => return out,
            }
        }
        panic!("the schedule never finished");
    }

    #[test]
    fn each_span_is_sent_once_after_it_ended_and_the_root_last() {
        let shape = plain_shape(Vec::new(), &[], 9, (0, 0));
        let mut traffic = AgentTraffic::new(shape, plan(20), 7, 1_000_000_000);
        let sent = run(&mut traffic);
        let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut root_sent_at: HashMap<Vec<u8>, Duration> = HashMap::new();
        let mut last_child_at: HashMap<Vec<u8>, Duration> = HashMap::new();
        for (at, spans) in &sent {
            for s in spans {
                *seen.entry(s.span_id.clone()).or_default() += 1;
                let end_offset = Duration::from_nanos(s.end_time_unix_nano - 1_000_000_000);
                assert!(end_offset <= *at, "a span was sent before it ended");
                if s.parent_span_id.is_empty() {
                    root_sent_at.insert(s.trace_id.clone(), *at);
                } else {
                    let t = last_child_at.entry(s.trace_id.clone()).or_default();
                    *t = (*t).max(*at);
                }
            }
        }
        assert_eq!(seen.len(), 200);
        assert!(seen.values().all(|&n| n == 1));
        assert_eq!(root_sent_at.len(), 20);
        for (trace, root_at) in &root_sent_at {
            assert!(last_child_at[trace] <= *root_at, "a child came after its root");
        }
    }

    #[test]
    fn a_request_holds_pieces_of_many_traces_when_traces_are_long() {
        let shape = plain_shape(Vec::new(), &[], 9, (0, 0));
        let mut traffic = AgentTraffic::new(shape, plan(50), 1, 0);
        let sent = run(&mut traffic);
        let busiest = sent
            .iter()
            .map(|(_, spans)| {
                let mut traces: Vec<&Vec<u8>> = spans.iter().map(|s| &s.trace_id).collect();
                traces.sort();
                traces.dedup();
                traces.len()
            })
            .max()
            .unwrap_or(0);
        // 10 traces/s lasting 3 s: about 30 in flight, so one flush carries many traces' pieces.
        assert!(
            busiest >= 10,
            "the busiest request held pieces of only {busiest} traces"
        );
        // And traces do span several requests: what groupbytrace exists to undo.
        let mut requests_per_trace: HashMap<&Vec<u8>, usize> = HashMap::new();
        for (_, spans) in &sent {
            let mut traces: Vec<&Vec<u8>> = spans.iter().map(|s| &s.trace_id).collect();
            traces.sort();
            traces.dedup();
            for t in traces {
                *requests_per_trace.entry(t).or_default() += 1;
            }
        }
        assert!(requests_per_trace.values().all(|&n| n >= 2));
    }

    #[test]
    fn a_full_batch_goes_out_before_the_schedule() {
        let shape = plain_shape(Vec::new(), &[], 9, (0, 0));
        let mut traffic = AgentTraffic::new(
            shape,
            AgentPlan {
                traces_per_sec: 1000.0,
                max_batch: 64,
                ..plan(300)
            },
            3,
            0,
        );
        let sent = run(&mut traffic);
        assert!(sent.iter().all(|(_, spans)| spans.len() <= 64));
        assert!(sent.iter().filter(|(_, spans)| spans.len() == 64).count() >= 10);
        assert_eq!(sent.iter().map(|(_, s)| s.len()).sum::<usize>(), 3000);
    }

    #[test]
    fn stopping_lets_traces_in_flight_finish() {
        let shape = plain_shape(Vec::new(), &[], 4, (0, 0));
        let mut traffic = AgentTraffic::new(
            shape,
            AgentPlan {
                traces: None,
                ..plan(0)
            },
            5,
            0,
        );
        let mut sent = 0;
        let mut now = Duration::ZERO;
        while now < 1000 * MS {
            match traffic.step(now) {
                Step::Send(spans) => sent += spans.len(),
                Step::WaitUntil(at) => now = at,
                Step::Done => panic!("an unbounded run finished by itself"),
            }
        }
        traffic.stop_starting();
        let in_flight = traffic.unsent();
        assert!(in_flight > 0);
        sent += run(&mut traffic).iter().map(|(_, s)| s.len()).sum::<usize>();
        assert_eq!(sent % 5, 0, "only whole traces: {sent}");
        assert_eq!(traffic.unsent(), 0);
    }

    #[test]
    fn requests_decode_with_every_span() {
        let shape = plain_shape(Vec::new(), &[], 2, (0, 0));
        let mut traffic = AgentTraffic::new(shape.clone(), plan(3), 9, 0);
        let spans: Vec<Span> = run(&mut traffic).into_iter().flat_map(|(_, s)| s).collect();
        let body = encode_request(&shape, spans.clone(), Encoding::Proto).unwrap();
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(req.resource_spans[0].scope_spans[0].spans, spans);
        let json = encode_request(&shape, spans, Encoding::Json).unwrap();
        assert!(crate::pipeline::wire::parse_json(&json).unwrap().spans == 9);
    }
}
