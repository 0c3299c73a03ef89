//! What the sink counts and reports at `/stats`: requests, spans, unique spans, bytes, failures.
use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::SinkArgs;
use super::faults::{FailurePlan, Throttle};
use super::jwt::JwtCheck;
use crate::supervise::LockUnpoisoned;

/// A hasher for random ids: they are already uniformly distributed, so folding is enough.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

const SHARDS: usize = 64;
type IdSet = HashSet<(u128, u64), BuildHasherDefault<IdHasher>>;

/// The set of (trace_id, span_id) seen, sharded so concurrent requests rarely contend.
pub struct UniqueSpans {
    shards: Vec<Mutex<IdSet>>,
    count: AtomicU64,
}

impl Default for UniqueSpans {
    fn default() -> Self {
        UniqueSpans {
            shards: (0..SHARDS).map(|_| Mutex::new(IdSet::default())).collect(),
            count: AtomicU64::new(0),
        }
    }
}

impl UniqueSpans {
    pub fn key(trace_id: &[u8], span_id: &[u8]) -> (u128, u64) {
        let mut t = [0u8; 16];
        let mut s = [0u8; 8];
        let tl = trace_id.len().min(16);
        let sl = span_id.len().min(8);
        t[..tl].copy_from_slice(&trace_id[..tl]);
        s[..sl].copy_from_slice(&span_id[..sl]);
        (u128::from_le_bytes(t), u64::from_le_bytes(s))
    }

    /// Inserts keys; returns how many were new.
    pub(crate) fn insert_all(&self, keys: &[(u128, u64)]) -> u64 {
        let mut new = 0;
        for &k in keys {
            let shard = ((k.1 ^ (k.0 as u64)) as usize) % SHARDS;
            if self.shards[shard].lock_unpoisoned().insert(k) {
                new += 1;
            }
        }
        self.count.fetch_add(new, Ordering::Relaxed);
        new
    }

    pub(crate) fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Every key seen, as `UniqueSpans::key` makes them (for delivery proofs in tests).
    pub(crate) fn keys(&self) -> Vec<(u128, u64)> {
        self.shards
            .iter()
            .flat_map(|s| s.lock_unpoisoned().iter().copied().collect::<Vec<_>>())
            .collect()
    }
}

/// The headers of the last request that matter to the relay's tests.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct LastRequest {
    pub(crate) transport: String,
    pub(crate) path: String,
    pub(crate) content_type: Option<String>,
    pub(crate) content_encoding: Option<String>,
    pub(crate) experiment_id: Option<String>,
    pub(crate) authorization: bool,
    pub(crate) host: Option<String>,
}

#[derive(Default)]
struct Meta {
    last: Option<LastRequest>,
    /// Spans accepted per x-mlflow-experiment-id ("none" when absent).
    experiments: BTreeMap<String, u64>,
    /// Failed requests per status.
    failures: BTreeMap<u16, u64>,
}

pub(crate) struct State {
    plan: FailurePlan,
    delay: Duration,
    throttle: Option<Throttle>,
    retry_after: Option<u64>,
    requests: AtomicU64,
    failed_requests: AtomicU64,
    spans: AtomicU64,
    bytes: AtomicU64,
    pub(super) unique: UniqueSpans,
    meta: Mutex<Meta>,
    pub(super) jwt: Option<JwtCheck>,
}

impl State {
    pub(crate) fn new(args: &SinkArgs) -> State {
        State {
            plan: FailurePlan {
                status: args.status,
                fail_every: args.fail_every,
                fail_first: args.fail_first,
            },
            delay: Duration::from_millis(args.delay_ms),
            throttle: args.max_spans_per_sec.filter(|r| *r > 0.0).map(Throttle::new),
            retry_after: args.retry_after,
            requests: AtomicU64::new(0),
            failed_requests: AtomicU64::new(0),
            spans: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            unique: UniqueSpans::default(),
            meta: Mutex::new(Meta::default()),
            jwt: None,
        }
    }

    /// Answers a request whose token was refused: counted as a request failed with 401.
    pub(super) fn unauthorized(&self, wire_bytes: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.failed_requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(wire_bytes as u64, Ordering::Relaxed);
        *self.meta.lock_unpoisoned().failures.entry(401).or_default() += 1;
    }

    /// With --require-jwt: Err(reason) unless the request carries a valid token.
    pub(super) async fn check_jwt(&self, authorization: Option<&str>) -> Result<(), String> {
        match &self.jwt {
            Some(j) => j.verify(authorization).await,
            None => Ok(()),
        }
    }

    /// The /stats document.
    pub(crate) fn stats_json(&self) -> serde_json::Value {
        let meta = self.meta.lock_unpoisoned();
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "failed_requests": self.failed_requests.load(Ordering::Relaxed),
            "spans": self.spans.load(Ordering::Relaxed),
            "unique_spans": self.unique.len(),
            "bytes": self.bytes.load(Ordering::Relaxed),
            "experiments": meta.experiments,
            "failures": meta.failures.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "last": meta.last,
            "jwt": self.jwt.as_ref().map(JwtCheck::stats),
        })
    }

    /// Counts a request's arrival and decides whether it fails.
    pub(super) fn arrive(&self, wire_bytes: usize, last: LastRequest) -> Option<u16> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.bytes.fetch_add(wire_bytes as u64, Ordering::Relaxed);
        let failing = self.plan.status_for(n);
        let mut meta = self.meta.lock_unpoisoned();
        meta.last = Some(last);
        if let Some(status) = failing {
            *meta.failures.entry(status).or_default() += 1;
            self.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
        failing
    }

    /// Waits as a slow MLflow would, then counts the accepted spans.
    pub(super) async fn accept(&self, keys: Vec<(u128, u64)>, experiment: Option<&str>) {
        let mut until = Instant::now() + self.delay;
        if let Some(t) = &self.throttle {
            until = until.max(t.reserve(keys.len() as u64, Instant::now()));
        }
        let now = Instant::now();
        if until > now {
            tokio::time::sleep(until - now).await;
        }
        self.spans.fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.unique.insert_all(&keys);
        let mut meta = self.meta.lock_unpoisoned();
        *meta
            .experiments
            .entry(experiment.unwrap_or("none").to_string())
            .or_default() += keys.len() as u64;
    }

    pub(super) fn retry_after(&self) -> Option<Duration> {
        self.retry_after.map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_spans_count_once() {
        let u = UniqueSpans::default();
        let a = UniqueSpans::key(&[1; 16], &[2; 8]);
        let b = UniqueSpans::key(&[1; 16], &[3; 8]);
        assert_eq!(u.insert_all(&[a, b, a]), 2);
        assert_eq!(u.insert_all(&[b]), 0);
        assert_eq!(u.len(), 2);
    }
}
