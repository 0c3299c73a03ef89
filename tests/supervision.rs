//! Supervision with real processes: a stage made to panic on purpose (the test-only
//! `OTLP_RELAY_TEST_PANIC` hook) is restarted, `/readyz` says so while it is down, later data is
//! delivered (counted by an independent sink), and the exit accounting still balances; a
//! restarted certificate reloader still picks up a rotation.
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

use serde_json::json;
use support::config::RelayConfig;
use support::otlp::{Relay, Sink, spans_accepted_over_https};
use support::pki::Ca;
use support::{get_text, http, wait_for};

const T: Duration = Duration::from_secs(30);

/// A request of `n` spans with ids unique to `batch`.
fn request(batch: u8, n: u8) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: (0..n)
                    .map(|i| Span {
                        trace_id: vec![batch + 1; 16],
                        span_id: vec![batch + 1, i + 1, 0, 0, 0, 0, 0, 1],
                        name: format!("b{batch}-s{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn post(addr: SocketAddr, body: &[u8]) -> u16 {
    http(
        "POST",
        addr,
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        body,
    )
    .0
}

/// A relay with an HTTP receiver and one exporter to `sink` (one sender), spooled in `storage`.
fn config(sink: &str, storage: Option<&Path>) -> RelayConfig {
    let config = RelayConfig::new()
        .without_transport("grpc")
        .batch(json!({"send_batch_size": 1000, "timeout": "20ms"}))
        .exporter(
            "otlphttp/sink",
            json!({
                "endpoint": sink,
                "headers": {"x-mlflow-experiment-id": "0"},
                "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms"},
                "sending_queue": {"num_consumers": 1},
            }),
        )
        .service(json!({"shutdown_timeout": "10s"}));
    match storage {
        Some(dir) => config
            .extension("file_storage/spool", json!({"directory": dir}))
            .exporter_settings(
                "otlphttp/sink",
                json!({"sending_queue": {"storage": "file_storage/spool"}}),
            ),
        None => config,
    }
}

/// The numbers of the exit's `final span accounting` line, e.g. `accepted=40`.
fn accounting(relay: &Relay) -> String {
    relay
        .proc
        .output()
        .into_iter()
        .find(|l| l.contains("final span accounting"))
        .unwrap_or_else(|| panic!("no accounting line:\n{}", relay.proc.output_text()))
}

#[test]
fn a_panicking_batcher_restarts_reports_unready_and_accounts_for_what_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let mut relay = Relay::start_with_env(
        dir.path(),
        &config(&sink.url(), None).yaml(),
        "otlp",
        &[("OTLP_RELAY_TEST_PANIC", "batcher:3")],
    );
    let (http_addr, health) = (relay.http.unwrap(), relay.health.unwrap());
    // Three requests, each taken by the batcher and lost in its panic; a restart follows each.
    for batch in 0..3 {
        assert_eq!(post(http_addr, &request(batch, 10)), 200);
    }
    let unready = wait_for("/readyz to report the downed batcher", T, || {
        let (status, body) = get_text(health, "/readyz");
        (status == 503 && body.contains("batcher")).then_some(body)
    });
    assert!(unready.contains("panic"), "{unready}");
    wait_for("three restarts", T, || {
        (relay.metric("otlp_relay_component_restarts_total", &[("component", "batcher")]) == 3.0).then_some(())
    });
    wait_for("/readyz ready again", T, || {
        (get_text(health, "/readyz").0 == 200).then_some(())
    });

    // The pipeline works again: the next request is delivered, and only it.
    assert_eq!(post(http_addr, &request(3, 10)), 200);
    let stats = sink.wait_unique(10, T);
    assert_eq!(stats["unique_spans"], 10);
    assert_eq!(
        relay.metric("otlp_relay_exporter_dropped_spans_total", &[("reason", "panic")]),
        30.0
    );
    assert!(
        relay.proc.output_text().contains("injected fault at batcher"),
        "the panic is logged"
    );

    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(T), Some(0));
    let line = accounting(&relay);
    for part in ["accepted=40", "sent=10", "dropped=30", "balanced=true"] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert_eq!(sink.stats()["unique_spans"], 10, "nothing else arrived");
}

/// A relay with a spool under a temp dir, delivering to a sink, with injected panics.
fn spooled_relay(panics: &str) -> (tempfile::TempDir, Sink, Relay) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(&[]);
    let relay = Relay::start_with_env(
        dir.path(),
        &config(&sink.url(), Some(&dir.path().join("spool"))).yaml(),
        "otlp",
        &[("OTLP_RELAY_TEST_PANIC", panics)],
    );
    (dir, sink, relay)
}

#[test]
fn a_sender_panic_dead_letters_the_batch_in_hand_with_a_spool() {
    let (dir, sink, mut relay) = spooled_relay("sender:1");
    let spool = dir.path().join("spool");
    let http_addr = relay.http.unwrap();
    assert_eq!(post(http_addr, &request(0, 7)), 200);
    wait_for("the batch in the dead-letter directory", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[]) == 7.0).then_some(())
    });
    assert_eq!(
        relay.metric("otlp_relay_component_restarts_total", &[("component", "sender")]),
        1.0
    );
    // The restarted sender delivers what comes next.
    assert_eq!(post(http_addr, &request(1, 5)), 200);
    sink.wait_unique(5, T);

    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(T), Some(0));
    let line = accounting(&relay);
    for part in ["accepted=12", "sent=5", "failed=7", "in_spool=0", "balanced=true"] {
        assert!(line.contains(part), "{part} in {line}");
    }
    let dead: Vec<_> = std::fs::read_dir(spool.join("dead_letter"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .collect();
    assert!(!dead.is_empty(), "a dead-letter file exists");
}

#[test]
fn accept_loops_and_spool_threads_restart_after_a_panic() {
    let (_dir, sink, mut relay) = spooled_relay("receiver:1,spool_writer:1,spool_reader:1");
    let http_addr = relay.http.unwrap();
    for component in ["receiver", "spool_reader"] {
        wait_for(&format!("{component} restarted"), T, || {
            (relay.metric("otlp_relay_component_restarts_total", &[("component", component)]) == 1.0).then_some(())
        });
    }
    // The writer dies with the first request's group in hand: that request is not acknowledged
    // (its client retries), the next ones are, once the writer is back.
    assert_eq!(post(http_addr, &request(0, 4)), 503);
    // The 503 goes out when the writer drops the group; its supervisor counts the panic a moment
    // later, on another thread.
    wait_for("the writer's restart counted", T, || {
        let n = relay.metric("otlp_relay_component_restarts_total", &[("component", "spool_writer")]);
        (n == 1.0).then_some(())
    });
    let status = wait_for("the writer back", T, || {
        let s = post(http_addr, &request(1, 6));
        (s == 200).then_some(s)
    });
    assert_eq!(status, 200);
    sink.wait_unique(6, T);
    relay.proc.signal("TERM");
    assert_eq!(relay.proc.wait_exit(T), Some(0));
    let line = accounting(&relay);
    for part in ["accepted=6", "sent=6", "in_spool=0", "balanced=true"] {
        assert!(line.contains(part), "{part} in {line}");
    }
}

#[test]
fn a_panicking_certificate_reloader_restarts_and_still_picks_up_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old-ca"), Ca::new("new-ca"));
    let old_ca_path = old_ca.write(dir.path(), "old-ca");
    let new_ca_path = new_ca.write(dir.path(), "new-ca");
    let server = old_ca.server().write(dir.path(), "server");
    let sink = Sink::start(&[]);
    let config = config(&sink.url(), None)
        .receiver(
            "http",
            json!({"tls": {"cert_file": server.cert, "key_file": server.key, "reload_interval": "100ms"}}),
        )
        .yaml();
    // The reloader panics at its first two reloads, before it read anything.
    let relay = Relay::start_with_env(
        dir.path(),
        &config,
        "otlp",
        &[("OTLP_RELAY_TEST_PANIC", "tls_reloader:2")],
    );
    let health = relay.health.unwrap();
    let endpoint = format!("https://{}", relay.http.unwrap());
    let send = |ca: &Path| spans_accepted_over_https(&endpoint, ca);
    let unready = wait_for("/readyz to name the downed reloader", T, || {
        let (status, body) = get_text(health, "/readyz");
        (status == 503 && body.contains("tls reloader")).then_some(body)
    });
    assert!(unready.contains("injected fault at tls_reloader"), "{unready}");
    wait_for("two reloader restarts", T, || {
        let n = relay.metric("otlp_relay_component_restarts_total", &[("component", "tls_reloader")]);
        (n == 2.0).then_some(())
    });
    // The receiver served throughout, with the certificate it started with.
    assert_eq!(send(&old_ca_path), 2);
    assert_eq!(send(&new_ca_path), 0, "not rotated yet");
    // Rotated after the restarts: the restarted reloader picks it up.
    let rotated = new_ca.server();
    std::fs::write(&server.key, &rotated.key_pem).unwrap();
    std::fs::write(&server.cert, &rotated.cert_pem).unwrap();
    wait_for("the relay to serve the rotated certificate", T, || {
        (send(&new_ca_path) == 2).then_some(())
    });
    assert_eq!(send(&old_ca_path), 0);
    wait_for("/readyz ready again", T, || {
        (get_text(health, "/readyz").0 == 200).then_some(())
    });
    assert_eq!(
        relay.metric("otlp_relay_component_restarts_total", &[("component", "tls_reloader")]),
        2.0,
        "no further panics"
    );
}

/// The certificate validity watch is supervised too: before, a panic in it ended the watch for
/// good, silently, and an expiring certificate was never reported on /readyz again.
#[test]
fn a_panicking_certificate_validity_watch_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("validity-ca");
    let ca_path = ca.write(dir.path(), "ca");
    let server = ca.server().write(dir.path(), "server");
    let sink = Sink::start(&[]);
    let config = config(&sink.url(), None)
        .receiver(
            "http",
            json!({"tls": {"cert_file": server.cert, "key_file": server.key}}),
        )
        .yaml();
    let relay = Relay::start_with_env(
        dir.path(),
        &config,
        "otlp",
        &[("OTLP_RELAY_TEST_PANIC", "tls_validity:2")],
    );
    wait_for("two validity-watch restarts", T, || {
        let n = relay.metric("otlp_relay_component_restarts_total", &[("component", "tls_validity")]);
        (n == 2.0).then_some(())
    });
    let health = relay.health.unwrap();
    wait_for("/readyz ready again", T, || {
        (get_text(health, "/readyz").0 == 200).then_some(())
    });
    let endpoint = format!("https://{}", relay.http.unwrap());
    assert_eq!(spans_accepted_over_https(&endpoint, &ca_path), 2);
    assert_eq!(
        relay.metric("otlp_relay_component_restarts_total", &[("component", "tls_validity")]),
        2.0,
        "no further panics"
    );
}
