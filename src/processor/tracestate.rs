//! OpenTelemetry's consistent-sampling values in a span's W3C `tracestate`: the `ot` member's
//! threshold `th` and randomness `rv` (56-bit values written as hex), parsed and written back the
//! way the collector's sampling package does, for the `probabilistic_sampler` processor.

/// 2^56: thresholds and randomness values are 56-bit.
pub(crate) const MAX_ADJUSTED_COUNT: u64 = 1 << 56;
/// A threshold that keeps every span.
pub(crate) const ALWAYS: u64 = 0;
/// A threshold that keeps no span (every randomness value is below it).
pub(crate) const NEVER: u64 = MAX_ADJUSTED_COUNT;
const HEX_DIGITS: usize = 14;
/// The collector refuses an `ot` value longer than this.
const MAX_OT_LEN: usize = 256;
/// W3C Trace Context: at most 32 list members.
const MAX_MEMBERS: usize = 32;

/// Why a tracestate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TraceStateError {
    #[error("tracestate is not a W3C list of key=value members")]
    Syntax,
    #[error("the tracestate's ot member is malformed")]
    OtSyntax,
    #[error("the tracestate's ot member is longer than {MAX_OT_LEN} bytes")]
    OtSize,
    #[error("the tracestate's ot.th is not 1 to 14 hex digits")]
    Threshold,
    #[error("the tracestate's ot.rv is not 14 hex digits")]
    Randomness,
}

/// The T-value of a threshold: 14 hex digits without trailing zeros, `0` for always-sample.
pub(crate) fn tvalue(threshold: u64) -> String {
    if threshold == ALWAYS {
        return "0".into();
    }
    let digits = format!("{:014x}", threshold.min(MAX_ADJUSTED_COUNT - 1));
    digits.trim_end_matches('0').to_string()
}

fn parse_tvalue(s: &str) -> Result<u64, TraceStateError> {
    if s.is_empty() || s.len() > HEX_DIGITS || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TraceStateError::Threshold);
    }
    let value = u64::from_str_radix(s, 16).map_err(|_| TraceStateError::Threshold)?;
    Ok(value << (4 * (HEX_DIGITS - s.len())))
}

fn parse_rvalue(s: &str) -> Result<u64, TraceStateError> {
    if s.len() != HEX_DIGITS || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TraceStateError::Randomness);
    }
    u64::from_str_radix(s, 16).map_err(|_| TraceStateError::Randomness)
}

/// The threshold of sampling probability `prob`, rounded to `precision` significant hex digits
/// (0: full); `None` outside [2^-56, 1] or when the digits do not fit.
pub(crate) fn probability_to_threshold(prob: f64, precision: u8) -> Option<u64> {
    let max = MAX_ADJUSTED_COUNT as f64;
    if !(1.0 / max..=1.0).contains(&prob) {
        return None;
    }
    let scaled = (prob * max).round() as u64;
    let exact = MAX_ADJUSTED_COUNT - scaled.min(MAX_ADJUSTED_COUNT);
    if precision == 0 {
        return Some(exact);
    }
    if prob == 1.0 {
        return Some(ALWAYS);
    }
    // Leading zeros of the rejection probability are obligatory digits on top of the precision.
    let mut prec = u32::from(precision);
    let mut reject = 1.0 - prob;
    while reject * 16.0 < 1.0 {
        reject *= 16.0;
        prec += 1;
    }
    if prec > HEX_DIGITS as u32 {
        return None;
    }
    let shift = 4 * (HEX_DIGITS as u32 - prec);
    if shift == 0 {
        return Some(exact);
    }
    let half = 1u64 << (shift - 1);
    Some(((exact + half) >> shift) << shift)
}

/// The sampling probability a threshold stands for.
pub(crate) fn probability(threshold: u64) -> f64 {
    (MAX_ADJUSTED_COUNT - threshold.min(MAX_ADJUSTED_COUNT)) as f64 / MAX_ADJUSTED_COUNT as f64
}

/// The randomness the W3C Trace Context level 2 takes from a trace id: its last 7 bytes.
pub(crate) fn trace_id_randomness(trace_id: &[u8]) -> u64 {
    trace_id
        .iter()
        .skip(trace_id.len().saturating_sub(7))
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// A span's tracestate, its `ot` member taken apart; the other members are kept as they came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TraceState {
    /// `ot.th` as a threshold, if present.
    pub(crate) threshold: Option<u64>,
    /// `ot.rv` as randomness, if present.
    pub(crate) randomness: Option<u64>,
    /// Other `ot` fields, in order.
    ot_extra: Vec<(String, String)>,
    /// Other vendors' members (`key=value`), in order.
    others: Vec<String>,
}

impl TraceState {
    /// Reads a W3C tracestate (the empty string is an empty one).
    pub(crate) fn parse(raw: &str) -> Result<TraceState, TraceStateError> {
        let mut state = TraceState::default();
        let members: Vec<&str> = raw
            .split(',')
            .map(|m| m.trim_matches([' ', '\t']))
            .filter(|m| !m.is_empty())
            .collect();
        if members.len() > MAX_MEMBERS {
            return Err(TraceStateError::Syntax);
        }
        let mut seen_ot = false;
        for member in members {
            let Some((key, value)) = member.split_once('=') else {
                return Err(TraceStateError::Syntax);
            };
            if key.is_empty() || value.is_empty() {
                return Err(TraceStateError::Syntax);
            }
            if key != "ot" {
                state.others.push(member.to_string());
                continue;
            }
            if seen_ot {
                return Err(TraceStateError::Syntax);
            }
            seen_ot = true;
            state.parse_ot(value)?;
        }
        Ok(state)
    }

    fn parse_ot(&mut self, value: &str) -> Result<(), TraceStateError> {
        if value.len() > MAX_OT_LEN {
            return Err(TraceStateError::OtSize);
        }
        for field in value.split(';') {
            let (key, v) = field.split_once(':').ok_or(TraceStateError::OtSyntax)?;
            let key_ok = key.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
                && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            let value_ok = v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !key_ok || !value_ok {
                return Err(TraceStateError::OtSyntax);
            }
            match key {
                "th" => self.threshold = Some(parse_tvalue(v)?),
                "rv" => self.randomness = Some(parse_rvalue(v)?),
                _ => self.ot_extra.push((key.to_string(), v.to_string())),
            }
        }
        Ok(())
    }

    /// Sets `ot.th` to `threshold`, unless that would raise the probability an arriving
    /// threshold already records (the collector keeps the arriving one then).
    pub(crate) fn update_threshold(&mut self, threshold: u64) -> bool {
        if self.threshold.is_some_and(|arriving| arriving > threshold) {
            return false;
        }
        self.threshold = Some(threshold);
        true
    }

    /// Writes the tracestate back: the `ot` member first (rv, th, other fields), then the other
    /// members as they came.
    pub(crate) fn serialize(&self) -> String {
        let mut ot = Vec::new();
        if let Some(rv) = self.randomness {
            ot.push(format!("rv:{rv:014x}"));
        }
        if let Some(th) = self.threshold {
            ot.push(format!("th:{}", tvalue(th)));
        }
        ot.extend(self.ot_extra.iter().map(|(k, v)| format!("{k}:{v}")));
        let mut members = Vec::with_capacity(self.others.len() + 1);
        if !ot.is_empty() {
            members.push(format!("ot={}", ot.join(";")));
        }
        members.extend(self.others.iter().cloned());
        members.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's examples: 25% is th:c, 50% th:8, 100% th:0; trailing zeros dropped.
    #[test]
    fn thresholds_round_trip_as_the_spec_writes_them() {
        for (prob, th) in [(0.25, "c"), (0.5, "8"), (1.0, "0"), (0.75, "4"), (0.1, "e666")] {
            let t = probability_to_threshold(prob, 4).unwrap();
            assert_eq!(tvalue(t), th, "{prob}");
            assert_eq!(parse_tvalue(th).unwrap(), t);
        }
        // Rounded to 4 significant digits; a leading zero of the rejection probability (99%
        // keeps: 0.01 rejected) is an obligatory digit on top of them.
        assert_eq!(tvalue(probability_to_threshold(0.01, 4).unwrap()), "fd71");
        assert_eq!(tvalue(probability_to_threshold(0.99, 4).unwrap()), "028f6");
        assert_eq!(probability_to_threshold(0.0, 4), None);
        assert_eq!(probability_to_threshold(1.5, 4), None);
        assert!((probability(parse_tvalue("c").unwrap()) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn tracestate_keeps_other_members_and_writes_ot_first() {
        let mut ts = TraceState::parse("vendor=abc, ot=th:8;rv:9b8233f7e3a151;xx:1 ,other=z").unwrap();
        assert_eq!(ts.threshold, Some(0x80_0000_0000_0000));
        assert_eq!(ts.randomness, Some(0x9b_8233_f7e3_a151));
        assert!(!ts.update_threshold(0), "raising the probability is refused");
        assert!(ts.update_threshold(0xc0_0000_0000_0000));
        assert_eq!(ts.serialize(), "ot=rv:9b8233f7e3a151;th:c;xx:1,vendor=abc,other=z");
        assert_eq!(TraceState::parse("").unwrap().serialize(), "");
    }

    /// Every malformed shape is an error, never a panic or a silently different value.
    #[test]
    fn malformed_tracestates_are_errors() {
        for raw in [
            "ot",
            "=x",
            "ot=",
            "ot=th",
            "ot=th:",
            "ot=th:123456789abcdef",
            "ot=th:xyz",
            "ot=rv:abc",
            "ot=rv:9b8233f7e3a1511",
            "ot=TH:8",
            "ot=th:8;;rv:9b8233f7e3a151",
            "ot=th:8,ot=th:c",
            "ot=th:8 ;rv:9b8233f7e3a151",
        ] {
            assert!(TraceState::parse(raw).is_err(), "{raw:?}");
        }
        let long = format!("ot=zz:{}", "a".repeat(300));
        assert_eq!(TraceState::parse(&long), Err(TraceStateError::OtSize));
        let many = vec!["a=b"; 33].join(",");
        assert_eq!(TraceState::parse(&many), Err(TraceStateError::Syntax));
    }
}
