//! Dead letters and replay.

use super::*;

/// (f) MLflow refuses a batch for good (422): it goes to the dead letter, counted, and
/// `otlp-relay replay` delivers it once the cause is fixed.
#[test]
fn poison_batch_goes_to_dead_letter_and_replay_delivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Sink::start(&["--status", "422"]);
    let (relay, _) = spooled_relay(dir.path(), &bad.url(), json!({}));
    load_accepted(&relay, 100, 2, 30);
    wait_for("dead-lettered spans", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[]) == 300.0).then_some(())
    });
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 300.0);
    // Not retried: every request the bad destination saw was one batch, refused once.
    assert_eq!(bad.stats()["failed_requests"], bad.stats()["requests"]);
    let dl = dir.path().join("spool").join("dead_letter");
    assert!(!segments(&dl.join("otlphttp_mlflow")).is_empty());
    drop(relay);

    let good = Sink::start(&[]);
    let fixed = fixed_config(dir.path(), &good);
    let (code, replay_proc) = replay(&dl, &fixed);
    assert_eq!(code, Some(0), "{}", replay_proc.output_text());
    // The exit can beat the last captured line: poll the output.
    wait_for("the replay summary", T, || {
        replay_proc
            .output_text()
            .contains("300 span(s) delivered")
            .then_some(())
    });
    good.wait_unique(300, T);
    assert!(
        segments(&dl.join("otlphttp_mlflow")).is_empty(),
        "replayed files are renamed"
    );
    // A second replay finds nothing to send.
    assert_eq!(replay(&dl, &fixed).0, Some(2));
    assert_eq!(good.stats()["spans"], 300);
}

/// Fault: `replay` while the relay runs lost dead-lettered spans (the relay kept appending to
/// the file replay had renamed). Replay runs again and again while the relay dead-letters under
/// load; after a last replay every acknowledged span is at the good destination.
#[test]
fn replay_while_the_relay_dead_letters_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bad = Sink::start(&["--status", "422"]);
    let good = Sink::start(&[]);
    let (mut relay, _) = spooled_relay(dir.path(), &bad.url(), json!({}));
    let fixed = fixed_config(dir.path(), &good);
    let dl = dir.path().join("spool").join("dead_letter");
    let clients = Clients::start(relay.http.unwrap(), 2, 20);
    wait_for("dead-lettered spans", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[]) > 0.0).then_some(())
    });
    // Replays back to back while the relay keeps dead-lettering, for a while.
    let mut runs = 0;
    while runs < 10 || relay.metric("otlp_relay_dead_letter_spans_total", &[]) < 10_000.0 {
        replay(&dl, &fixed);
        runs += 1;
    }
    let acked = clients.stop();
    eprintln!("{runs} replays under load; {} spans acknowledged", acked.len());
    assert!(
        good.stats()["unique_spans"].as_u64().unwrap() > 0,
        "replay ran under load"
    );
    wait_for("every acknowledged span dead-lettered", T, || {
        (relay.metric("otlp_relay_dead_letter_spans_total", &[]) as usize == acked.len()).then_some(())
    });
    terminate(&mut relay);
    // 2: the replays under load already took every file (possible, if rare).
    let (last, _) = replay(&dl, &fixed);
    assert!(matches!(last, Some(0) | Some(2)), "{last:?}");
    wait_all_delivered(
        "every acknowledged span at the good destination",
        good.http,
        acked.iter(),
    );
}
