//! A spool that is too small, a full disk, a spool directory deleted under load.

use super::*;

/// (e) A tiny spool with the destination down: requests are refused with a retry hint and the
/// relay stays up; with on_full: drop_oldest it keeps accepting and counts what it dropped.
#[test]
fn tiny_spool_refuses_without_crashing_or_drops_oldest_when_asked() {
    for drop_oldest in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (port, endpoint) = down_destination();
        let extra = if drop_oldest {
            json!({"max_size_mib": 1, "on_full": "drop_oldest"})
        } else {
            json!({"max_size_mib": 1})
        };
        let (mut relay, _) = spooled_relay(dir.path(), &endpoint, extra);
        let mut statuses = std::collections::BTreeMap::new();
        let mut refusal = String::new();
        // ~2.3 MiB of spans into a 1 MiB spool.
        for seq in 0..500 {
            let (body, _) = request(5, seq, 100);
            let (status, headers) = post(relay.http.unwrap(), &body).unwrap();
            *statuses.entry(status).or_insert(0) += 1;
            if status != 200 {
                refusal = headers;
            }
        }
        assert!(relay.proc.child.try_wait().unwrap().is_none(), "relay exited");
        assert_eq!(get_text(relay.health.unwrap(), "/healthz").0, 200);
        let bytes = relay.metric("otlp_relay_spool_bytes", &[]);
        assert!(bytes <= 1024.0 * 1024.0 + 20_000.0, "spool bytes {bytes}");
        if drop_oldest {
            assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), vec![200], "{statuses:?}");
            assert!(relay.metric("otlp_relay_exporter_dropped_spans_total", &[("reason", "spool_full")]) > 0.0);
        } else {
            assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "{statuses:?}");
            assert!(refusal.contains("retry-after: 2"), "{refusal}");
            assert!(relay.metric("otelcol_receiver_refused_spans_total", &[("reason", "spool_full")]) > 0.0);
            // What was acknowledged still arrives once the destination is up.
            let acked = statuses[&200] * 100;
            let sink = sink_on(port);
            sink.wait_unique(acked, T);
        }
        terminate(&mut relay);
    }
}

/// Unmounts the small tmpfs of the disk-full test.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full disk is never a crash: writes that fail with ENOSPC are refused with 503 +
/// Retry-After, the relay stays up, and once deliveries free space it accepts again. Needs a
/// small tmpfs (root with CAP_SYS_ADMIN, as here and in CI); skipped where mounting is denied.
#[test]
fn full_disk_refuses_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&disk)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let _mount = Mount(disk.clone());
    let (port, endpoint) = down_destination();
    // The budget (64 MiB) is far above the disk (1 MiB): the disk fills first.
    let cfg = config(&endpoint, &disk, json!({"max_size_mib": 64, "segment_size_mib": 1}));
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let mut acked = 0;
    let mut refusal = None;
    for seq in 0..400 {
        let (body, _) = request(7, seq, 100);
        match post(relay.http.unwrap(), &body).unwrap() {
            (200, _) => acked += 100,
            (503, headers) => {
                refusal = Some(headers);
                break;
            }
            (status, headers) => panic!("{status}: {headers}"),
        }
    }
    let refusal = refusal.expect("a full disk refuses");
    assert!(refusal.contains("retry-after: 5"), "{refusal}");
    assert!(acked > 0);
    assert!(relay.metric("otelcol_receiver_refused_spans_total", &[("reason", "disk_full")]) > 0.0);
    assert_eq!(get_text(relay.health.unwrap(), "/healthz").0, 200);
    // The destination comes up: acknowledged spans arrive, segments go, and space is back.
    let sink = sink_on(port);
    sink.wait_unique(acked, T);
    wait_for("a request accepted again", T, || {
        let (body, _) = request(7, 10_000, 100);
        (post(relay.http.unwrap(), &body).unwrap().0 == 200).then_some(())
    });
    sink.wait_unique(acked + 100, T);
}

/// Fault: the spool directory deleted under a running relay under load: writes went on to the
/// deleted file and clients got 200 (acknowledged spans lost), then 503 forever. Now the relay
/// recreates the directory and copies back what was not delivered before acknowledging more:
/// after a SIGKILL and a restart, every acknowledged span arrives. While the directory cannot
/// be made (a file in its place), requests are refused and /readyz says why; then it recovers.
#[test]
fn spool_directory_deleted_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A slow destination: the backlog is on disk when the directory goes.
    let sink = Sink::start(&["--max-spans-per-sec", "3000"]);
    let (mut relay, cfg) = spooled_relay(
        dir.path(),
        &sink.url(),
        json!({"max_size_mib": 64, "segment_size_mib": 1}),
    );
    let clients = Clients::start(relay.http.unwrap(), 3, 50);
    wait_for("acknowledged spans", T, || (clients.acked() >= 10_000).then_some(()));
    std::fs::remove_dir_all(dir.path().join("spool")).unwrap();
    relay.proc.clone_wait_line("spool directory was deleted or replaced", T);
    let at_delete = clients.acked();
    wait_for("more acknowledged after the deletion", T, || {
        (clients.acked() >= at_delete + 10_000).then_some(())
    });
    assert!(spool_dir(dir.path()).join("lock").exists());
    // Not delivered yet: the rest must be on linked files.
    kill(&mut relay);
    let acked = clients.stop();
    let at_kill = sink.stats()["unique_spans"].as_u64().unwrap() as usize;
    assert!(
        at_kill < acked.len(),
        "backlog expected: sink {at_kill}, acked {}",
        acked.len()
    );

    // The directory cannot be made: refused, and /readyz says why; then it can.
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    relay.proc.wait_line("spool: recovered undelivered spans", T);
    std::fs::remove_dir_all(dir.path().join("spool")).unwrap();
    std::fs::write(dir.path().join("spool"), b"in the way").unwrap();
    let reason = wait_for("/readyz 503", T, || {
        let (status, body) = get_text(relay.health.unwrap(), "/readyz");
        (status == 503).then_some(body)
    });
    assert!(reason.contains("spool otlphttp/mlflow"), "{reason}");
    let (body, _) = request(8, 1, 10);
    assert_eq!(post(relay.http.unwrap(), &body).unwrap().0, 503);
    std::fs::remove_file(dir.path().join("spool")).unwrap();
    wait_for("/readyz 200 again", T, || {
        (get_text(relay.health.unwrap(), "/readyz").0 == 200).then_some(())
    });
    let (body, keys) = request(8, 2, 10);
    wait_for("accepted again", T, || {
        (post(relay.http.unwrap(), &body).unwrap().0 == 200).then_some(())
    });
    wait_all_delivered(
        "every acknowledged span at the sink",
        sink.http,
        acked.iter().chain(&keys),
    );
}
