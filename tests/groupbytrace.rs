//! groupbytrace with real processes on loopback: the relay between OTLP/HTTP clients and the
//! counting sink. A trace whose spans arrive in several requests over time reaches the sink as
//! one request once its root arrives; a trace without a root leaves after wait_duration; a
//! SIGKILL while traces are held loses no acknowledged span (file_storage spool); SIGTERM sends
//! what is held. Each phase takes a second or two.
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};
use support::config::RelayConfig;
use support::otlp::{Relay, Sink};
use support::{Proc, wait_for, write_file};

const T: Duration = Duration::from_secs(60);

/// A relay with groupbytrace (`group` merged into its settings) before a batch of 50 ms,
/// exporting to `sink`; `spool` adds a file_storage spool in that directory.
fn config(sink: &Sink, group: Value, spool: Option<&std::path::Path>) -> String {
    config_with(sink, group, spool, &["groupbytrace", "batch"])
}

fn config_with(sink: &Sink, group: Value, spool: Option<&std::path::Path>, processors: &[&str]) -> String {
    let mut exporter = json!({
        "endpoint": sink.url(),
        "compression": "none",
        "retry_on_failure": {"initial_interval": "50ms", "max_interval": "300ms"},
    });
    let mut cfg = RelayConfig::new().batch(json!({"send_batch_size": 1000, "timeout": "50ms"}));
    if let Some(dir) = spool {
        exporter["sending_queue"] = json!({"storage": "file_storage/spool"});
        cfg = cfg.extension("file_storage/spool", json!({"directory": dir}));
    }
    let yaml = cfg
        .exporter("otlphttp/sink", exporter)
        .service(json!({
            "shutdown_timeout": "10s",
            "pipelines": {"traces": {"processors": processors}},
        }))
        .yaml();
    // The builder knows batch only; groupbytrace is added to the data it wrote.
    let mut value: Value = serde_norway::from_str(&yaml).unwrap();
    let mut groupbytrace = json!({"wait_duration": "30s", "root_grace": "100ms"});
    if let (Value::Object(g), Value::Object(extra)) = (&mut groupbytrace, group) {
        g.extend(extra);
    }
    value["processors"]["groupbytrace"] = groupbytrace;
    serde_norway::to_string(&value).unwrap()
}

/// One request holding spans `spans` of trace `trace`; span 1 is the root (no parent).
fn request(trace: u8, spans: std::ops::Range<u64>) -> Vec<u8> {
    let spans = spans
        .map(|i| Span {
            trace_id: vec![trace; 16],
            span_id: i.to_be_bytes().to_vec(),
            parent_span_id: if i == 1 { vec![] } else { 1u64.to_be_bytes().to_vec() },
            name: format!("op-{i}"),
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_100_000_000,
            ..Default::default()
        })
        .collect();
    support::otlp::one_resource(spans).encode_to_vec()
}

/// One OTLP/HTTP POST; the status (200 means the spans are acknowledged).
fn post(addr: SocketAddr, body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn stat(sink: &Sink, key: &str) -> u64 {
    sink.stats()[key].as_u64().unwrap()
}

/// The agent pattern: children end (and are exported) first, in several requests over time, the
/// root last. The batcher alone sends each request on after 50 ms; with groupbytrace nothing
/// leaves until the root, then the whole trace goes as one request.
#[test]
fn a_trace_sent_over_time_reaches_the_sink_as_one_request_when_its_root_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let relay = Relay::start(dir.path(), &config(&sink, json!({}), None), "otlp");
    let http = relay.http.unwrap();
    for part in [6..9, 4..6, 2..4] {
        assert_eq!(post(http, &request(1, part)), 200);
        // The spacing is the scenario (spans exported as they end), not a synchronisation.
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(stat(&sink, "spans"), 0, "children are held until their root");
    let held = |what: &str| {
        relay.metric(
            &format!("otlp_relay_groupbytrace_held_{what}"),
            &[("exporter", "otlphttp/sink")],
        )
    };
    wait_for("the held spans shown", T, || {
        ((held("spans"), held("traces")) == (7.0, 1.0)).then_some(())
    });
    assert_eq!(post(http, &request(1, 1..2)), 200);
    sink.wait_unique(8, Duration::from_secs(10));
    assert_eq!(stat(&sink, "requests"), 1, "{}", sink.stats());
    assert_eq!(
        relay.metric("otlp_relay_groupbytrace_released_traces_total", &[("reason", "root")]),
        1.0
    );
    wait_for("nothing held", T, || {
        ((held("spans"), held("traces")) == (0.0, 0.0)).then_some(())
    });
    // Served once each, at zero when nothing is held.
    let (_, text) = support::get_text(relay.metrics, "/metrics");
    for what in ["spans", "traces"] {
        let name = format!("otlp_relay_groupbytrace_held_{what}{{");
        let series: Vec<&str> = text.lines().filter(|l| l.starts_with(&name)).collect();
        assert_eq!(series.len(), 1, "{text}");
        assert!(
            series[0].contains("exporter=\"otlphttp/sink\"") && series[0].ends_with(" 0"),
            "{text}"
        );
    }
}

/// A trace whose root never comes leaves whole once no span of it arrived for wait_duration.
#[test]
fn a_trace_without_a_root_leaves_after_wait_duration() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let relay = Relay::start(dir.path(), &config(&sink, json!({"wait_duration": "1s"}), None), "otlp");
    let http = relay.http.unwrap();
    assert_eq!(post(http, &request(2, 2..5)), 200);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(post(http, &request(2, 5..7)), 200);
    let last = Instant::now();
    sink.wait_unique(5, Duration::from_secs(10));
    let waited = last.elapsed();
    assert!(waited >= Duration::from_millis(900), "left after {waited:?}");
    assert_eq!(stat(&sink, "requests"), 1, "{}", sink.stats());
    assert_eq!(
        relay.metric("otlp_relay_groupbytrace_released_traces_total", &[("reason", "idle")]),
        1.0
    );
}

/// Traces held after the spool: SIGKILL while they are held, start again on the same spool,
/// and every acknowledged span reaches the sink.
#[test]
fn sigkill_while_traces_are_held_loses_no_acknowledged_span() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let spool = dir.path().join("spool");
    let cfg = config(&sink, json!({"wait_duration": "3s"}), Some(&spool));
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    let http = relay.http.unwrap();
    let mut acknowledged = 0;
    for trace in 1..=20u8 {
        for part in [2..5u64, 5..7] {
            assert_eq!(post(http, &request(trace, part.clone())), 200);
            acknowledged += part.end - part.start;
        }
    }
    // A whole trace last: the spool is read in order, so once it reaches the sink every record
    // before it was read back and is held.
    assert_eq!(post(http, &request(99, 1..4)), 200);
    acknowledged += 3;
    sink.wait_unique(3, T);
    assert_eq!(
        stat(&sink, "spans"),
        3,
        "the other traces are held when the relay is killed"
    );
    relay.proc.signal("KILL");
    relay.proc.wait_exit(T);
    let _again = Relay::start(dir.path(), &cfg, "otlp");
    sink.wait_unique(acknowledged, T);
}

/// SIGTERM: held traces are sent before the relay exits, within shutdown_timeout, and the
/// accounting balances.
#[test]
fn sigterm_sends_held_traces() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let mut relay = Relay::start(
        dir.path(),
        &config(&sink, json!({"wait_duration": "60s"}), None),
        "otlp",
    );
    let http = relay.http.unwrap();
    for trace in 1..=10u8 {
        assert_eq!(post(http, &request(trace, 2..6)), 200);
    }
    // A whole trace last: once it is at the sink, the ones before it were taken in, and held.
    assert_eq!(post(http, &request(99, 1..4)), 200);
    sink.wait_unique(3, T);
    assert_eq!(stat(&sink, "spans"), 3, "the other traces are held");
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(T), Some(0));
    assert_eq!(stat(&sink, "unique_spans"), 43, "{}", sink.stats());
    let accounting = wait_for("the accounting line", T, || {
        relay
            .proc
            .output()
            .into_iter()
            .find(|l| l.contains("final span accounting"))
    });
    assert!(accounting.contains("sent=43"), "{accounting}");
    assert!(accounting.contains("balanced=true"), "{accounting}");
}

/// Bad groupbytrace settings are refused with their YAML paths, and so is groupbytrace after
/// the batch processor (it groups what the batcher takes in).
#[test]
fn bad_settings_are_refused_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let check = |cfg: &str| -> String {
        let path = write_file(dir.path(), "config.yaml", cfg);
        let mut check = Proc::relay("check", &["check", "--config", path.to_str().unwrap()]);
        assert_eq!(check.wait_exit(T), Some(1), "{cfg}");
        check.output_text()
    };
    let out = check(&config(&sink, json!({"bogus": 1}), None));
    assert!(out.contains("processors.groupbytrace.bogus"), "{out}");
    let out = check(&config(
        &sink,
        json!({"wait_duration": "0s", "num_traces": 0, "max_hold": "0s"}),
        None,
    ));
    for key in ["wait_duration", "num_traces", "max_hold"] {
        assert!(out.contains(&format!("processors.groupbytrace.{key}")), "{out}");
    }
    let out = check(&config(&sink, json!({"wait_duration": "5s", "max_hold": "1s"}), None));
    assert!(
        out.contains("processors.groupbytrace.max_hold: must be at least wait_duration"),
        "{out}"
    );
    let out = check(&config_with(&sink, json!({}), None, &["batch", "groupbytrace"]));
    assert!(
        out.contains("service.pipelines.traces.processors[1]: groupbytrace must come before"),
        "{out}"
    );
}

/// Past `num_traces` the oldest trace leaves whole (never dropped), the newer ones stay held.
#[test]
fn the_oldest_trace_leaves_whole_past_num_traces() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let cfg = config(&sink, json!({"wait_duration": "60s", "num_traces": 3}), None);
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let http = relay.http.unwrap();
    for part in [2..4u64, 4..6] {
        for trace in 1..=3u8 {
            assert_eq!(post(http, &request(trace, part.clone())), 200);
        }
    }
    assert_eq!(post(http, &request(4, 2..4)), 200);
    assert_eq!(post(http, &request(5, 2..4)), 200);
    sink.wait_unique(8, T);
    let (_, spans) = support::get_text(sink.stats_addr, "/spans");
    let mut traces: Vec<&str> = spans.lines().map(|l| &l[..2]).collect();
    traces.sort();
    traces.dedup();
    assert_eq!(traces, vec!["01", "02"], "{spans}");
    assert_eq!(
        relay.metric(
            "otlp_relay_groupbytrace_released_traces_total",
            &[("reason", "evicted")]
        ),
        2.0
    );
}

/// Held spans count in the memory_limiter's budget: traces far above it in all, none with a
/// root, are all accepted within seconds (not after wait_duration) because the oldest leave
/// whole as the budget fills.
#[test]
fn held_traces_leave_when_the_memory_budget_fills() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let cfg = config_with(
        &sink,
        json!({"wait_duration": "60s"}),
        None,
        &["memory_limiter", "groupbytrace", "batch"],
    );
    let mut value: Value = serde_norway::from_str(&cfg).unwrap();
    value["processors"]["memory_limiter"] = json!({"limit_mib": 5, "spike_limit_mib": 1});
    let relay = Relay::start(dir.path(), &serde_norway::to_string(&value).unwrap(), "otlp");
    let http = relay.http.unwrap();
    let padding = "x".repeat(200_000);
    for trace in 1..=40u8 {
        let mut req = ExportTraceServiceRequest::decode(request(trace, 2..3).as_slice()).unwrap();
        req.resource_spans[0].scope_spans[0].spans[0].attributes =
            vec![opentelemetry_proto::tonic::common::v1::KeyValue {
                key: "padding".into(),
                value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                        padding.clone(),
                    )),
                }),
                ..Default::default()
            }];
        // The budget may be full of traces on their way to the sink for a moment (429, retry as
        // a client does); it must not stay full of held ones until wait_duration.
        let body = req.encode_to_vec();
        wait_for(&format!("trace {trace} accepted"), Duration::from_secs(10), || {
            (post(http, &body) == 200).then_some(())
        });
    }
    // 8 MB sent against a 4 MiB budget: the oldest left, the newest are still held.
    let evicted = relay.metric(
        "otlp_relay_groupbytrace_released_traces_total",
        &[("reason", "evicted")],
    );
    assert!(evicted >= 20.0, "{evicted}");
    let at_sink = stat(&sink, "unique_spans");
    assert!(at_sink < 40, "{at_sink}");
}
