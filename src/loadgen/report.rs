//! Run statistics: per-worker counters and an HDR latency histogram, merged into one report
//! (human text or one JSON object).
use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// What a run counts, per worker and in the report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub(crate) struct Counts {
    pub(crate) requests: u64,
    pub(crate) requests_failed: u64,
    pub(crate) spans_sent: u64,
    pub(crate) spans_accepted: u64,
    pub(crate) spans_refused: u64,
    pub(crate) spans_retried: u64,
    pub(crate) retries: u64,
    /// Refused spans per final reason (e.g. `http_400`, `grpc_UNAVAILABLE`).
    pub(crate) refused_by: BTreeMap<String, u64>,
    /// Failed attempts per reason, retried or not.
    pub(crate) failures_by: BTreeMap<String, u64>,
    /// The first error seen per reason, with its cause (what `--min-accepted` reports).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) first_errors: BTreeMap<String, String>,
}

impl Counts {
    fn merge(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.requests_failed += o.requests_failed;
        self.spans_sent += o.spans_sent;
        self.spans_accepted += o.spans_accepted;
        self.spans_refused += o.spans_refused;
        self.spans_retried += o.spans_retried;
        self.retries += o.retries;
        for (k, v) in &o.refused_by {
            *self.refused_by.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.failures_by {
            *self.failures_by.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.first_errors {
            self.first_errors.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

/// What one worker saw. Merged at the end, so workers never share a lock while sending.
#[derive(Debug, Clone)]
pub(crate) struct WorkerStats {
    pub(crate) counts: Counts,
    pub(crate) bytes: u64,
    /// Request latency in microseconds.
    pub(crate) latency_us: Histogram<u64>,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            counts: Counts::default(),
            bytes: 0,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds"),
        }
    }
}

impl WorkerStats {
    pub(crate) fn record_latency(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        self.latency_us.saturating_record(us);
    }

    pub(crate) fn merge(&mut self, o: &WorkerStats) {
        self.counts.merge(&o.counts);
        self.bytes += o.bytes;
        self.latency_us.add(&o.latency_us).expect("same histogram bounds");
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Latency {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

/// The sink's view after the run (`--verify-sink`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Verification {
    pub(crate) sink: String,
    pub(crate) received_unique_spans: u64,
    pub(crate) lost_spans: u64,
    pub(crate) ok: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Report {
    pub(crate) transport: String,
    pub(crate) encoding: String,
    pub(crate) compression: String,
    pub(crate) workers: usize,
    pub(crate) duration_s: f64,
    #[serde(flatten)]
    pub(crate) counts: Counts,
    pub(crate) spans_per_sec: f64,
    pub(crate) requests_per_sec: f64,
    pub(crate) bytes: u64,
    pub(crate) bytes_per_sec: f64,
    pub(crate) latency_ms: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) verify: Option<Verification>,
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl Report {
    pub(crate) fn new(stats: &WorkerStats, elapsed: Duration, labels: (&str, &str, &str), workers: usize) -> Report {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let h = &stats.latency_us;
        let ms = |us: u64| round3(us as f64 / 1000.0);
        let latency = if h.is_empty() {
            Latency {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                max: 0.0,
                mean: 0.0,
            }
        } else {
            Latency {
                p50: ms(h.value_at_quantile(0.50)),
                p90: ms(h.value_at_quantile(0.90)),
                p99: ms(h.value_at_quantile(0.99)),
                max: ms(h.max()),
                mean: round3(h.mean() / 1000.0),
            }
        };
        Report {
            transport: labels.0.into(),
            encoding: labels.1.into(),
            compression: labels.2.into(),
            workers,
            duration_s: round3(secs),
            counts: stats.counts.clone(),
            spans_per_sec: round3(stats.counts.spans_accepted as f64 / secs),
            requests_per_sec: round3(stats.counts.requests as f64 / secs),
            bytes: stats.bytes,
            bytes_per_sec: round3(stats.bytes as f64 / secs),
            latency_ms: latency,
            verify: None,
        }
    }

    /// The human report (stdout without --json).
    pub(crate) fn human(&self) -> String {
        let mut s = format!(
            "otlp-relay loadgen: {} {} {} with {} worker(s) for {:.2} s\n\
             spans   sent {}  accepted {}  refused {}  retried {}\n\
             requests {}  failed attempts {}  retries {}\n\
             rate    {:.0} spans/s  {:.0} requests/s  {:.2} MB/s ({} bytes)\n\
             latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}\n",
            self.transport,
            self.encoding,
            self.compression,
            self.workers,
            self.duration_s,
            self.counts.spans_sent,
            self.counts.spans_accepted,
            self.counts.spans_refused,
            self.counts.spans_retried,
            self.counts.requests,
            self.counts.requests_failed,
            self.counts.retries,
            self.spans_per_sec,
            self.requests_per_sec,
            self.bytes_per_sec / 1e6,
            self.bytes,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.max,
        );
        for (k, v) in &self.counts.failures_by {
            match self.counts.first_errors.get(k) {
                Some(e) => s.push_str(&format!("failed attempts {k}: {v} (first: {e})\n")),
                None => s.push_str(&format!("failed attempts {k}: {v}\n")),
            }
        }
        for (k, v) in &self.counts.refused_by {
            s.push_str(&format!("refused spans {k}: {v}\n"));
        }
        if let Some(v) = &self.verify {
            s.push_str(&format!(
                "sink {}: accepted {} received {} unique -> loss {} {}\n",
                v.sink,
                self.counts.spans_accepted,
                v.received_unique_spans,
                v.lost_spans,
                if v.ok { "OK" } else { "LOSS" }
            ));
        }
        s
    }
}

/// Why a run got (almost) nothing accepted, from its first errors: the likely cause and what to
/// change, for the message `--min-accepted` prints. `tls` says whether the run spoke TLS,
/// `client_cert` whether it presented a client certificate.
pub(crate) fn diagnose(
    first_errors: &BTreeMap<String, String>,
    endpoint: &str,
    tls: bool,
    client_cert: bool,
) -> String {
    let all: Vec<String> = first_errors.values().map(|e| e.to_ascii_lowercase()).collect();
    let any = |needles: &[&str]| all.iter().any(|e| needles.iter().any(|n| e.contains(n)));
    let hint = if any(&[
        "invalidcontenttype",
        "corrupt message",
        "wrong version number",
        "http/1.x",
    ]) && tls
    {
        format!("{endpoint} does not speak TLS: use --otlp-insecure (or an http:// endpoint)")
    } else if any(&["certificaterequired", "certificate required", "handshakefailure", "bad certificate"])
        // TLS 1.3 clients finish their handshake before the server checks the client
        // certificate, so a missing one shows up as the connection closing.
        || (tls && !client_cert && any(&["connection closed", "connection reset", "unexpected eof", "broken pipe"]))
    {
        format!("{endpoint} requires a client certificate: pass --client-cert and --client-key")
    } else if any(&[
        "unknownissuer",
        "unknown issuer",
        "invalid peer certificate",
        "notvalidforname",
    ]) {
        format!("{endpoint}'s certificate is not trusted for this name: pass --ca-cert with its CA")
    } else if any(&["connection refused"]) {
        format!("nothing listens at {endpoint}: is the relay running there?")
    } else if !tls
        && any(&[
            "connection reset",
            "connection closed",
            "incomplete message",
            "frame with invalid size",
        ])
    {
        format!("{endpoint} closed the connection: if it serves TLS, drop --otlp-insecure")
    } else if first_errors
        .keys()
        .any(|k| k == "http_404" || k == "grpc_UNIMPLEMENTED")
    {
        format!("{endpoint} has no OTLP traces endpoint there: check the port (gRPC 4317, HTTP 4318) and --otlp-http")
    } else if first_errors.keys().any(|k| k == "http_415") {
        "the server refused the content type or encoding (HTTP 415)".to_string()
    } else if first_errors.is_empty() {
        "no request was answered".to_string()
    } else {
        "see the first errors above".to_string()
    };
    let mut out = hint;
    for (label, error) in first_errors {
        out.push_str(&format!("\n  {label}: {error}"));
    }
    out
}

/// Compares what the generator had accepted with what the sink received.
pub(crate) fn verify(sink: &str, accepted: u64, before: u64, after: u64) -> Verification {
    let received = after.saturating_sub(before);
    let lost = accepted.saturating_sub(received);
    Verification {
        sink: sink.to_string(),
        received_unique_spans: received,
        lost_spans: lost,
        ok: lost == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnoses_name_the_fix() {
        let one = |label: &str, e: &str| BTreeMap::from([(label.to_string(), e.to_string())]);
        let d = diagnose(
            &one(
                "grpc_UNAVAILABLE",
                "connect: transport error: received corrupt message of type InvalidContentType",
            ),
            "127.0.0.1:4317",
            true,
            false,
        );
        assert!(
            d.starts_with("127.0.0.1:4317 does not speak TLS: use --otlp-insecure"),
            "{d}"
        );
        assert!(d.contains("InvalidContentType"), "the error itself is shown: {d}");
        let d = diagnose(
            &one(
                "transport",
                "client error (Connect): tcp connect error: Connection refused (os error 111)",
            ),
            "h:1",
            false,
            false,
        );
        assert!(d.contains("nothing listens at h:1"), "{d}");
        let d = diagnose(
            &one("transport", "peer sent alert: CertificateRequired"),
            "h:1",
            true,
            true,
        );
        assert!(d.contains("--client-cert and --client-key"), "{d}");
        let closed = one("grpc_CANCELLED", "hyper::Error(Canceled, \"connection closed\")");
        assert!(diagnose(&closed, "h:1", true, false).contains("requires a client certificate"));
        assert!(!diagnose(&closed, "h:1", true, true).contains("requires a client certificate"));
        // The server's alert can also meet the client mid-write.
        let piped = one(
            "grpc_UNKNOWN",
            "hyper::Error(Io, Custom { kind: BrokenPipe, error: \"stream closed because of a broken pipe\" })",
        );
        assert!(diagnose(&piped, "h:1", true, false).contains("requires a client certificate"));
        let d = diagnose(&one("http_404", "HTTP 404 Not Found"), "h:1", false, false);
        assert!(d.contains("no OTLP traces endpoint"), "{d}");
        assert_eq!(
            diagnose(&BTreeMap::new(), "h:1", false, false),
            "no request was answered"
        );
    }

    #[test]
    fn report_math() {
        let mut a = WorkerStats {
            counts: Counts {
                requests: 10,
                spans_sent: 1000,
                spans_accepted: 900,
                spans_refused: 100,
                ..Default::default()
            },
            ..Default::default()
        };
        a.counts.refused_by.insert("http_400".into(), 100);
        for ms in 1..=100 {
            a.record_latency(Duration::from_millis(ms));
        }
        let mut b = WorkerStats {
            counts: Counts {
                requests: 10,
                spans_sent: 1000,
                spans_accepted: 1000,
                ..Default::default()
            },
            ..Default::default()
        };
        b.counts.refused_by.insert("http_400".into(), 1);
        b.record_latency(Duration::from_secs(2));
        a.merge(&b);
        let r = Report::new(&a, Duration::from_secs(4), ("grpc", "proto", "none"), 2);
        assert_eq!(r.counts.spans_accepted, 1900);
        assert_eq!(r.spans_per_sec, 475.0);
        assert_eq!(r.requests_per_sec, 5.0);
        assert_eq!(r.counts.refused_by["http_400"], 101);
        assert!((r.latency_ms.p50 - 51.0).abs() < 0.1, "{:?}", r.latency_ms);
        assert!((r.latency_ms.p99 - 100.0).abs() < 0.2, "{:?}", r.latency_ms);
        assert!((r.latency_ms.max - 2000.0).abs() < 2.0, "{:?}", r.latency_ms);
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "spans_sent",
            "spans_accepted",
            "spans_refused",
            "requests",
            "retries",
            "spans_per_sec",
            "duration_s",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert!(json["latency_ms"]["p99"].is_number());
        assert!(r.human().contains("refused spans http_400: 101"));
    }

    #[test]
    fn verification() {
        assert!(verify("s", 100, 50, 150).ok);
        let v = verify("s", 100, 50, 120);
        assert_eq!((v.lost_spans, v.ok), (30, false));
    }
}
