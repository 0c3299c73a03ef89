//! The `probabilistic_sampler` processor: keeps `sampling_percentage` of traces, deciding by trace
//! id alone so every span of a trace (in any request, on any relay with the same settings) gets
//! the same decision. `hash_seed` mode hashes the seed and trace id as the collector does (FNV-1a,
//! 14-bit buckets); `proportional` (the collector's default without a seed) compares the trace
//! id's last 56 bits with the threshold of the W3C sampling specification.
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use serde::Deserialize;

use super::{ProcessError, ProcessorConfig, SpanProcessor};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ProbabilisticSamplerConfig {
    pub(crate) sampling_percentage: f64,
    pub(crate) hash_seed: u32,
    pub(crate) mode: Option<Mode>,
    /// Accepted for compatibility: every trace id reaching a processor is valid (receipt checks).
    pub(crate) fail_closed: bool,
    /// Accepted for compatibility (the precision of the threshold the collector writes in
    /// tracestate, which this relay does not write).
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

/// The collector's hash: FNV-1a 32 over the seed (4 bytes, little endian) and the trace id.
fn fnv1a(seed: u32, trace_id: &[u8]) -> u32 {
    fnv1a_of(seed.to_le_bytes().iter().chain(trace_id))
}

fn fnv1a_of<'a>(bytes: impl Iterator<Item = &'a u8>) -> u32 {
    bytes.fold(0x811c_9dc5u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl ProbabilisticSamplerConfig {
    fn mode(&self) -> Mode {
        self.mode.unwrap_or(if self.hash_seed != 0 {
            Mode::HashSeed
        } else {
            Mode::Proportional
        })
    }
}

impl ProcessorConfig for ProbabilisticSamplerConfig {
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        if !(0.0..=100.0).contains(&self.sampling_percentage) {
            err(
                format!("{path}.sampling_percentage"),
                "must be between 0 and 100".into(),
            );
        }
        if self.mode() == Mode::Equalizing {
            err(
                format!("{path}.mode"),
                "equalizing is not supported (it needs the incoming tracestate threshold); use proportional or hash_seed".into(),
            );
        }
    }

    fn span_processor(&self, _id: &str) -> Option<Box<dyn SpanProcessor>> {
        let pct = self.sampling_percentage.clamp(0.0, 100.0);
        let rule = match self.mode() {
            Mode::HashSeed => Rule::Buckets {
                seed: self.hash_seed,
                below: (pct * f64::from(HASH_BUCKETS) / 100.0) as u32,
            },
            // Keep when the 56 random bits are at least the threshold (1 - p) * 2^56.
            Mode::Proportional | Mode::Equalizing => {
                Rule::Threshold(((1.0 - pct / 100.0) * (1u64 << 56) as f64) as u64)
            }
        };
        Some(Box::new(Sampler(rule)))
    }
}

enum Rule {
    Buckets { seed: u32, below: u32 },
    Threshold(u64),
}

struct Sampler(Rule);

impl Sampler {
    fn keeps(&self, trace_id: &[u8]) -> bool {
        match self.0 {
            Rule::Buckets { seed, below } => fnv1a(seed, trace_id) & (HASH_BUCKETS - 1) < below,
            Rule::Threshold(threshold) => {
                let random = trace_id
                    .iter()
                    .skip(trace_id.len().saturating_sub(7))
                    .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
                random >= threshold
            }
        }
    }
}

impl SpanProcessor for Sampler {
    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError> {
        for ss in &mut rs.scope_spans {
            ss.spans.retain(|span| self.keeps(&span.trace_id));
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

    #[test]
    fn bad_settings_are_reported() {
        for (yaml, path) in [
            ("sampling_percentage: 101", "p.sampling_percentage"),
            ("sampling_percentage: 5\nmode: equalizing", "p.mode"),
        ] {
            let c: ProbabilisticSamplerConfig = serde_norway::from_str(yaml).unwrap();
            let mut errs = Vec::new();
            c.validate("p", &mut |p, m| errs.push(format!("{p}: {m}")));
            assert!(errs.iter().any(|e| e.starts_with(&format!("{path}:"))), "{errs:?}");
        }
    }
}
