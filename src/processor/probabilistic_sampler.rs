//! The `probabilistic_sampler` processor, as the collector's: keeps `sampling_percentage` of
//! spans, deciding by trace id (or the `rv` randomness in the span's tracestate) so every span of
//! a trace gets the same decision, and records the sampling threshold it applied as `ot=th:...`
//! in the span's tracestate. Modes: `hash_seed` (FNV-1a over seed and trace id, 14-bit buckets;
//! the default when `hash_seed` is set), `proportional` (the default otherwise: multiplies the
//! probability an arriving `th` records by the configured one) and `equalizing` (lowers every
//! span to the configured probability, passing already-sampled ones through). A span whose
//! randomness cannot be read (a zero trace id, a malformed tracestate, an arriving `th` its
//! randomness contradicts) is dropped with `fail_closed: true` (the default) and kept otherwise;
//! the `sampling.priority` span attribute (0: drop, above 0: keep) overrides the decision.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use serde::Deserialize;

use super::tracestate::{self, ALWAYS, NEVER, TraceState, TraceStateError};
use super::{ProcessError, ProcessorConfig, SpanProcessor};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ProbabilisticSamplerConfig {
    pub(crate) sampling_percentage: f32,
    pub(crate) hash_seed: u32,
    pub(crate) mode: Option<Mode>,
    pub(crate) fail_closed: bool,
    /// Hex digits of the threshold written in the tracestate (1 to 14).
    pub(crate) sampling_precision: u8,
}

impl Default for ProbabilisticSamplerConfig {
    fn default() -> Self {
        ProbabilisticSamplerConfig {
            sampling_percentage: 0.0,
            hash_seed: 0,
            mode: None,
            fail_closed: true,
            sampling_precision: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Mode {
    HashSeed,
    Proportional,
    Equalizing,
}

const HASH_BUCKETS: u32 = 0x4000;
const HASH_BITS: u32 = 14;

/// The collector's hash: FNV-1a 32 over the seed (4 bytes, little endian) and the trace id.
fn fnv1a(seed: u32, trace_id: &[u8]) -> u32 {
    fnv1a_of(seed.to_le_bytes().iter().chain(trace_id))
}

fn fnv1a_of<'a>(bytes: impl Iterator<Item = &'a u8>) -> u32 {
    bytes.fold(0x811c_9dc5u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The 56-bit randomness hash_seed mode derives from the hash, as the collector does: its top 14
/// bits are `buckets - 1 - hash`, so the spec's comparison (randomness >= threshold) gives the
/// bucket rule (hash < the scaled percentage), with the unused hash bits mixed below.
fn hashed_randomness(seed: u32, trace_id: &[u8]) -> u64 {
    let hashed32 = fnv1a(seed, trace_id);
    let hashed = u64::from(hashed32 & (HASH_BUCKETS - 1));
    let rprime14 = u64::from(HASH_BUCKETS) - 1 - hashed;
    let unused18 = u64::from(hashed32 >> (32 - HASH_BITS));
    let mixed28 = unused18 ^ (unused18 << 10);
    (rprime14 << 42) | (mixed28 << 14) | hashed
}

impl ProbabilisticSamplerConfig {
    fn mode(&self) -> Mode {
        self.mode.unwrap_or(if self.hash_seed != 0 {
            Mode::HashSeed
        } else {
            Mode::Proportional
        })
    }

    fn rule(&self) -> Rule {
        // The collector reads the percentage as a 32-bit float; above 100 means 100.
        let pct = self.sampling_percentage.min(100.0);
        if pct <= 0.0 || pct.is_nan() {
            return Rule::Never;
        }
        let ratio = (f64::from(pct) / 100.0).max(1.0 / tracestate::MAX_ADJUSTED_COUNT as f64);
        match self.mode() {
            Mode::HashSeed => {
                // As the collector: the multiplication in 32-bit floats, rounded toward zero.
                let scaled = (pct * (HASH_BUCKETS as f32 / 100.0)) as u32;
                if scaled == 0 {
                    return Rule::Never;
                }
                Rule::HashSeed {
                    seed: self.hash_seed,
                    threshold: u64::from(HASH_BUCKETS - scaled.min(HASH_BUCKETS)) << 42,
                }
            }
            Mode::Equalizing => {
                Rule::Equalizing(tracestate::probability_to_threshold(ratio, self.sampling_precision).unwrap_or(ALWAYS))
            }
            Mode::Proportional => Rule::Proportional {
                ratio,
                precision: self.sampling_precision,
            },
        }
    }
}

impl ProcessorConfig for ProbabilisticSamplerConfig {
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        let pct = f64::from(self.sampling_percentage);
        let at = format!("{path}.sampling_percentage");
        if !pct.is_finite() {
            err(at, "must be a number".into());
        } else if pct < 0.0 {
            err(
                at,
                "must not be negative (0 drops every span, 100 or more keeps every one)".into(),
            );
        } else if pct > 0.0 && pct / 100.0 < 1.0 / tracestate::MAX_ADJUSTED_COUNT as f64 {
            err(at, "is too small: the smallest sampling probability is 2^-56".into());
        }
        if !(1..=14).contains(&self.sampling_precision) {
            err(
                format!("{path}.sampling_precision"),
                "must be between 1 and 14 (hex digits of the threshold)".into(),
            );
        }
    }

    fn span_processor(&self, id: &str) -> Option<Box<dyn SpanProcessor>> {
        Some(Box::new(Sampler {
            id: id.to_string(),
            rule: self.rule(),
            fail_closed: self.fail_closed,
            last_warning: AtomicU64::new(0),
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Never,
    HashSeed { seed: u32, threshold: u64 },
    Equalizing(u64),
    Proportional { ratio: f64, precision: u8 },
}

/// Why a span's sampling information could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SampleError {
    #[error("{0}")]
    TraceState(#[from] TraceStateError),
    #[error("the trace id is all zeros and the tracestate has no rv: no randomness to sample by")]
    MissingRandomness,
    #[error("the tracestate's th says this span should not have been sampled (its randomness is below it)")]
    InconsistentThreshold,
    #[error(
        "the tracestate has rv or th: hash_seed mode does not combine with OpenTelemetry's consistent sampling (use proportional or equalizing)"
    )]
    HashSeedWithConsistentSampling,
}

struct Sampler {
    id: String,
    rule: Rule,
    fail_closed: bool,
    /// Seconds since the epoch of the last warning: at most one per 10 s.
    last_warning: AtomicU64,
}

/// What `sampling.priority` says: `Some(true)` keep, `Some(false)` drop, `None` defer.
fn priority(span: &Span) -> Option<bool> {
    let kv: &KeyValue = span.attributes.iter().find(|kv| kv.key == "sampling.priority")?;
    let value = match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::IntValue(i) => *i as f64,
        any_value::Value::DoubleValue(d) => *d,
        any_value::Value::StringValue(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    if value == 0.0 {
        Some(false)
    } else if value > 0.0 {
        Some(true)
    } else {
        None
    }
}

impl Sampler {
    /// The span's randomness and tracestate, or why they cannot be used (with the tracestate
    /// when it was readable, to record a decision taken despite the error).
    fn randomness(&self, span: &Span) -> (u64, Option<TraceState>, Result<(), SampleError>) {
        let mut state = match TraceState::parse(&span.trace_state) {
            Ok(state) => state,
            Err(e) => return (NEVER - 1, None, Err(e.into())),
        };
        if let Rule::HashSeed { seed, .. } = self.rule {
            let rnd = hashed_randomness(seed, &span.trace_id);
            if state.randomness.is_some() || state.threshold.is_some() {
                return (rnd, Some(state), Err(SampleError::HashSeedWithConsistentSampling));
            }
            state.randomness = Some(rnd);
            return (rnd, Some(state), Ok(()));
        }
        let rnd = match state.randomness {
            Some(rv) => rv,
            None if span.trace_id.iter().all(|&b| b == 0) => {
                return (NEVER - 1, Some(state), Err(SampleError::MissingRandomness));
            }
            None => tracestate::trace_id_randomness(&span.trace_id),
        };
        if state.threshold.is_some_and(|th| rnd < th) {
            // Cleared as the specification recommends, in case the span is kept anyway.
            state.threshold = None;
            return (rnd, Some(state), Err(SampleError::InconsistentThreshold));
        }
        (rnd, Some(state), Ok(()))
    }

    fn threshold(&self, state: &TraceState) -> u64 {
        match self.rule {
            Rule::Never => NEVER,
            Rule::HashSeed { threshold, .. } | Rule::Equalizing(threshold) => threshold,
            Rule::Proportional { ratio, precision } => {
                let incoming = state.threshold.map_or(1.0, tracestate::probability);
                tracestate::probability_to_threshold(incoming * ratio, precision).unwrap_or(NEVER)
            }
        }
    }

    /// Decides on one span, writing the applied threshold into its tracestate when kept.
    fn keeps(&self, span: &mut Span) -> bool {
        let (rnd, state, checked) = self.randomness(span);
        let mut threshold = match (&checked, &state) {
            (Ok(()), Some(state)) => self.threshold(state),
            _ if self.fail_closed => NEVER,
            _ => ALWAYS,
        };
        if let Err(e) = &checked {
            self.warn(e);
        }
        match priority(span) {
            Some(true) => threshold = ALWAYS,
            Some(false) => threshold = NEVER,
            None => {}
        }
        let sampled = threshold != NEVER && rnd >= threshold;
        if sampled && let Some(mut state) = state {
            // An arriving th with a lower probability stays: this sampler cannot raise it.
            state.update_threshold(threshold);
            span.trace_state = state.serialize();
        }
        sampled
    }

    fn warn(&self, error: &SampleError) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 10
            || self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let outcome = if self.fail_closed {
            "dropped (fail_closed)"
        } else {
            "kept (fail_closed: false)"
        };
        tracing::warn!(processor = %self.id, error = %error, "a span's sampling information is unusable: {outcome}; said at most every 10 s");
    }
}

impl SpanProcessor for Sampler {
    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError> {
        for ss in &mut rs.scope_spans {
            ss.spans.retain_mut(|span| self.keeps(span));
        }
        rs.scope_spans.retain(|ss| !ss.spans.is_empty());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(yaml: &str) -> Box<dyn SpanProcessor> {
        let c: ProbabilisticSamplerConfig = serde_norway::from_str(yaml).unwrap();
        c.span_processor("probabilistic_sampler").unwrap()
    }

    /// FNV-1a 32 against its published test vectors; the seed goes first, little endian.
    #[test]
    fn fnv_matches_the_reference() {
        assert_eq!(fnv1a_of(b"".iter()), 0x811c_9dc5);
        assert_eq!(fnv1a_of(b"a".iter()), 0xe40c_292c);
        assert_eq!(fnv1a_of(b"foobar".iter()), 0xbf9c_f968);
        assert_eq!(fnv1a(0x6162_6364, b"x"), fnv1a_of(b"dcbax".iter()));
    }

    #[test]
    fn keeps_about_the_percentage_and_whole_traces() {
        for (yaml, pct) in [
            ("sampling_percentage: 25\nhash_seed: 22", 25.0),
            ("sampling_percentage: 25", 25.0),
            ("sampling_percentage: 60\nmode: hash_seed", 60.0),
        ] {
            let s = sampler(yaml);
            let mut rs = crate::pipeline::wire::testdata::resource_spans("svc", 1, 1, 0);
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..20_000 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let mut id = state.to_be_bytes().to_vec();
                id.extend_from_slice(&state.wrapping_mul(31).to_be_bytes());
                for _ in 0..2 {
                    rs.scope_spans[0]
                        .spans
                        .push(opentelemetry_proto::tonic::trace::v1::Span {
                            trace_id: id.clone(),
                            span_id: vec![1; 8],
                            ..Default::default()
                        });
                }
            }
            s.process(&mut rs).unwrap();
            let kept = &rs.scope_spans[0].spans;
            let share = kept.len() as f64 / 40_000.0 * 100.0;
            assert!((share - pct).abs() < 2.0, "{yaml}: kept {share}%");
            // Spans of a trace stay together.
            assert!(
                kept.chunks(2).all(|pair| pair[0].trace_id == pair[1].trace_id),
                "{yaml}"
            );
        }
        let mut rs = crate::pipeline::wire::testdata::resource_spans("svc", 1, 2, 5);
        sampler("sampling_percentage: 0").process(&mut rs).unwrap();
        assert!(rs.scope_spans.is_empty());
        let mut rs = crate::pipeline::wire::testdata::resource_spans("svc", 1, 2, 5);
        sampler("sampling_percentage: 100").process(&mut rs).unwrap();
        assert_eq!(rs.scope_spans.iter().map(|s| s.spans.len()).sum::<usize>(), 10);
    }

    fn span(trace_id: Vec<u8>, trace_state: &str) -> Span {
        Span {
            trace_id,
            span_id: vec![1; 8],
            trace_state: trace_state.into(),
            ..Default::default()
        }
    }

    /// A trace id whose W3C randomness (last 7 bytes) is `rnd`.
    fn id_with(rnd: u64) -> Vec<u8> {
        let mut id = vec![0xab; 9];
        id.extend_from_slice(&rnd.to_be_bytes()[1..]);
        id
    }

    /// The span after sampling, `None` if dropped.
    fn sample(yaml: &str, span: Span) -> Option<Span> {
        let mut rs = crate::pipeline::wire::testdata::resource_spans("svc", 1, 1, 0);
        rs.scope_spans[0].spans = vec![span];
        sampler(yaml).process(&mut rs).unwrap();
        rs.scope_spans.first().map(|ss| ss.spans[0].clone())
    }

    const HIGH: u64 = 0xf0_0000_0000_0000;
    const MID: u64 = 0xa0_0000_0000_0000;
    const LOW: u64 = 0x10_0000_0000_0000;

    /// Proportional multiplies: 50% of spans already sampled at 50% (th:8) leaves th:c (25%).
    #[test]
    fn proportional_multiplies_the_arriving_probability_and_writes_th() {
        let yaml = "sampling_percentage: 50\nmode: proportional";
        let kept = sample(yaml, span(id_with(HIGH), "ot=th:8,vendor=x")).unwrap();
        assert_eq!(kept.trace_state, "ot=th:c,vendor=x");
        assert!(sample(yaml, span(id_with(MID), "ot=th:8")).is_none(), "below th:c");
        let kept = sample(yaml, span(id_with(MID), "")).unwrap();
        assert_eq!(kept.trace_state, "ot=th:8");
        assert!(sample(yaml, span(id_with(LOW), "")).is_none());
    }

    /// Equalizing lowers every span to the configured probability; a span sampled lower
    /// already passes with its own threshold.
    #[test]
    fn equalizing_passes_already_sampled_spans_through() {
        let yaml = "sampling_percentage: 50\nmode: equalizing";
        let kept = sample(yaml, span(id_with(HIGH), "ot=th:c")).unwrap();
        assert_eq!(kept.trace_state, "ot=th:c", "an arriving 25% stays 25%");
        let kept = sample(yaml, span(id_with(MID), "ot=th:4")).unwrap();
        assert_eq!(kept.trace_state, "ot=th:8", "75% lowered to 50%");
        assert!(sample(yaml, span(id_with(LOW), "ot=th:0")).is_none());
        assert!(sample(yaml, span(id_with(LOW), "")).is_none());
    }

    /// rv in the tracestate is the randomness, not the trace id; it is written back.
    #[test]
    fn explicit_randomness_wins_over_the_trace_id() {
        let yaml = "sampling_percentage: 50";
        assert!(sample(yaml, span(id_with(HIGH), "ot=rv:10000000000000")).is_none());
        let kept = sample(yaml, span(id_with(LOW), "ot=rv:9b8233f7e3a151")).unwrap();
        assert_eq!(kept.trace_state, "ot=rv:9b8233f7e3a151;th:8");
    }

    /// Unusable sampling information: dropped when failing closed (the default), kept (with
    /// the tracestate as readable) when not; priority overrides both ways.
    #[test]
    fn fail_closed_and_priority_decide_unusable_spans() {
        let closed = "sampling_percentage: 50";
        let open = "sampling_percentage: 50\nfail_closed: false";
        for (id, ts) in [
            (vec![0; 16], ""),
            (id_with(HIGH), "ot=th:zz"),
            (id_with(MID), "ot=th:c"),
            (id_with(HIGH), "no-equals-sign"),
        ] {
            assert!(sample(closed, span(id.clone(), ts)).is_none(), "{ts:?}");
            assert!(sample(open, span(id, ts)).is_some(), "{ts:?}");
        }
        let kept = sample(open, span(id_with(MID), "ot=th:c")).unwrap();
        assert_eq!(kept.trace_state, "ot=th:0", "the contradicted th is cleared");
        assert_eq!(
            sample(open, span(id_with(HIGH), "ot=th:zz")).unwrap().trace_state,
            "ot=th:zz",
            "an unreadable tracestate is left as it came"
        );
        let with_priority = |p: KeyValue| {
            let mut s = span(id_with(HIGH), "");
            s.attributes.push(p);
            s
        };
        let prio = |v: any_value::Value| KeyValue {
            key: "sampling.priority".into(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue { value: Some(v) }),
            ..Default::default()
        };
        assert!(
            sample(
                "sampling_percentage: 100",
                with_priority(prio(any_value::Value::IntValue(0)))
            )
            .is_none()
        );
        assert!(
            sample(
                "sampling_percentage: 0",
                with_priority(prio(any_value::Value::StringValue("1".into())))
            )
            .is_some()
        );
        assert!(
            sample(closed, {
                let mut s = with_priority(prio(any_value::Value::DoubleValue(2.0)));
                s.trace_id = vec![0; 16];
                s
            })
            .is_some()
        );
    }

    /// hash_seed writes the randomness it derived and its threshold, as the collector does, and
    /// refuses spans that already carry OpenTelemetry consistent-sampling values.
    #[test]
    fn hash_seed_records_rv_and_th() {
        let yaml = "sampling_percentage: 100\nhash_seed: 7";
        let kept = sample(yaml, span(id_with(HIGH), "")).unwrap();
        let rnd = hashed_randomness(7, &id_with(HIGH));
        assert_eq!(kept.trace_state, format!("ot=rv:{rnd:014x};th:0"));
        assert!(sample(yaml, span(id_with(HIGH), "ot=th:0")).is_none());
        // The 56-bit form decides exactly as the collector's 14-bit buckets.
        for i in 0..2000u32 {
            let id = fnv1a(i, b"x").to_be_bytes().repeat(4);
            let by_bucket = fnv1a(3, &id) & (HASH_BUCKETS - 1) < (25.0f32 * (HASH_BUCKETS as f32 / 100.0)) as u32;
            assert_eq!(
                sample("sampling_percentage: 25\nhash_seed: 3", span(id, "")).is_some(),
                by_bucket
            );
        }
    }

    #[test]
    fn bad_settings_are_reported() {
        for (yaml, path) in [
            ("sampling_percentage: -1", "p.sampling_percentage"),
            ("sampling_percentage: .nan", "p.sampling_percentage"),
            ("sampling_percentage: 1e-20", "p.sampling_percentage"),
            ("sampling_percentage: 5\nsampling_precision: 15", "p.sampling_precision"),
            ("sampling_percentage: 5\nsampling_precision: 0", "p.sampling_precision"),
        ] {
            let c: ProbabilisticSamplerConfig = serde_norway::from_str(yaml).unwrap();
            let mut errs = Vec::new();
            c.validate("p", &mut |p, m| errs.push(format!("{p}: {m}")));
            assert!(
                errs.iter().any(|e| e.starts_with(&format!("{path}:"))),
                "{yaml}: {errs:?}"
            );
        }
        for yaml in ["sampling_percentage: 150", "sampling_percentage: 5\nmode: equalizing"] {
            let c: ProbabilisticSamplerConfig = serde_norway::from_str(yaml).unwrap();
            let mut errs = Vec::new();
            c.validate("p", &mut |p, m| errs.push(format!("{p}: {m}")));
            assert!(errs.is_empty(), "{yaml}: {errs:?}");
        }
    }
}
