//! Unit tests of the spool: durability, damage, a deleted directory, the lock, full spools.
use super::files::segment_path;
use super::*;
use crate::telemetry::{ExporterReasonLabels, exporter_labels};
use std::os::unix::fs::FileExt;

fn settings(dir: &Path, max_bytes: u64) -> SpoolSettings {
    SpoolSettings {
        exporter: "otlphttp/test".into(),
        dir: dir.to_path_buf(),
        fsync: true,
        max_bytes,
        segment_bytes: 64 * 1024,
        drop_oldest: false,
    }
}

fn routed(n: usize, experiment: &str) -> Vec<Routed> {
    (0..n)
        .map(|i| Routed {
            destination: Destination {
                experiment: Some(Arc::from(experiment)),
                ..Default::default()
            },
            item: Item {
                chunk: ResourceChunk {
                    bytes: Bytes::from(vec![i as u8; 1000]),
                    spans: 10,
                    experiment: None,
                    names: None,
                },
                charge: None,
                origin: None,
            },
        })
        .collect()
}

fn write(spool: &Spool, n: usize) -> Result<(), Refusal> {
    let (frames, records) = encode_request(&routed(n, "7"));
    let ack = spool.reserve(frames.len() as u64)?.send(frames, records, n * 10, None);
    ack.blocking_recv().unwrap()
}

#[test]
fn durable_records_flow_in_order_are_released_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let spool = Spool::open(settings(dir.path(), 1 << 20), metrics.clone()).unwrap();
    // 200 records of ~1 KiB: several 64 KiB segments.
    for _ in 0..20 {
        write(&spool, 10).unwrap();
    }
    let before = list_segments(dir.path()).unwrap().len();
    assert!(before >= 3);
    let (tx, mut rx) = mpsc::channel(1000);
    spool.start_reader(tx).unwrap();
    let mut items = Vec::new();
    while items.len() < 200 {
        items.extend(rx.blocking_recv().unwrap().iter().cloned());
    }
    let firsts: Vec<u8> = items.iter().map(|r| r.item.chunk.bytes[0]).collect();
    assert_eq!(firsts, (0..20).flat_map(|_| 0..10u8).collect::<Vec<_>>());
    assert_eq!(items[0].destination.experiment.as_deref(), Some("7"));
    // Release the first half: complete segments go, the rest stays.
    for r in &items[..100] {
        spool.release(r.item.origin.unwrap(), r.item.chunk.spans);
    }
    assert_eq!(spool.pending_spans(), 1000);
    let left = list_segments(dir.path()).unwrap().len();
    assert!(left < before && left >= 2, "{left} of {before}");
    spool.shutdown();
    drop(rx);
    spool.join_reader();
    drop(spool);
    // A restart finds the undelivered records (and those sharing their segments).
    let again = Spool::open(settings(dir.path(), 1 << 20), metrics).unwrap();
    assert!(again.recovered_spans() >= 1000 && again.recovered_spans() < 2000);
    again.shutdown();
}

/// Items from the reader until `n` records arrived (bounded wait).
fn collect(rx: &mut mpsc::Receiver<Arc<Vec<Routed>>>, n: usize) -> Vec<Routed> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut items = Vec::new();
    while items.len() < n {
        match rx.try_recv() {
            Ok(batch) => items.extend(batch.iter().cloned()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => panic!("{} of {n} records arrived", items.len()),
        }
    }
    items
}

/// Damage on disk under a running spool (a record written this run, in a sealed segment):
/// that record alone is skipped, its spans are counted dropped exactly, the records after
/// it in the segment are delivered, and the accounting still closes.
#[test]
fn damage_found_while_running_costs_that_record_only() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let spool = Spool::open(settings(dir.path(), 1 << 20), metrics.clone()).unwrap();
    for _ in 0..20 {
        write(&spool, 10).unwrap();
    }
    let segs = list_segments(dir.path()).unwrap();
    assert!(segs.len() >= 3);
    let data = std::fs::read(&segs[1].1).unwrap();
    let Some(Format::V2 { seed }) = frame::scan(&data).format else {
        panic!("format 2")
    };
    let parsed = frame::parse(&data[frame::FILE_HEADER..], Format::V2 { seed }, true, Some(0));
    let frame::Entry::Record { offset, record, .. } = &parsed.entries[3] else {
        panic!("intact")
    };
    let at = (frame::FILE_HEADER + offset + frame::HEADER + 100) as u64;
    let f = std::fs::OpenOptions::new().write(true).open(&segs[1].1).unwrap();
    f.write_all_at(&[0xee], at).unwrap();
    drop(f);
    let first_segment = frame::scan(&std::fs::read(&segs[0].1).unwrap()).records.len();
    let (tx, mut rx) = mpsc::channel(1000);
    spool.start_reader(tx).unwrap();
    let items = collect(&mut rx, 199);
    // In order, with exactly the damaged record missing.
    let damaged = first_segment + 3;
    let expected: Vec<u8> = (0..200usize)
        .filter(|&i| i != damaged)
        .map(|i| (i % 10) as u8)
        .collect();
    assert_eq!(
        items.iter().map(|r| r.item.chunk.bytes[0]).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(record.payload[0] as usize, damaged % 10);
    let corrupt = |m: &Metrics| {
        m.exporter_dropped_spans
            .get_or_create(&ExporterReasonLabels {
                exporter: "otlphttp/test".into(),
                reason: "corrupt".into(),
            })
            .get()
    };
    assert_eq!(corrupt(&metrics), 10);
    let labels = exporter_labels("otlphttp/test");
    assert_eq!(metrics.spool_corrupt_records.get_or_create(&labels).get(), 1);
    for r in &items {
        spool.release(r.item.origin.unwrap(), r.item.chunk.spans);
    }
    // accepted 2000 = delivered 1990 + corrupt 10; nothing left pending.
    assert_eq!(spool.pending_spans(), 0);
    spool.shutdown();
    drop(rx);
    spool.join_reader();
}

/// One sealed segment file deleted by hand (the directory intact) is copied back too.
#[test]
fn a_deleted_segment_file_is_copied_back() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path(), 1 << 20), Arc::new(Metrics::new())).unwrap();
    for _ in 0..10 {
        write(&spool, 10).unwrap();
    }
    let segs = list_segments(dir.path()).unwrap();
    assert!(segs.len() >= 2);
    std::fs::remove_file(&segs[0].1).unwrap();
    // The writer notices within WATCH_INTERVAL, idle or not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !segs[0].1.exists() {
        assert!(Instant::now() < deadline, "not copied back");
        std::thread::sleep(Duration::from_millis(20));
    }
    spool.shutdown();
    drop(spool);
    let again = Spool::open(settings(dir.path(), 1 << 20), Arc::new(Metrics::new())).unwrap();
    assert_eq!(again.recovered_spans(), 1000);
    again.shutdown();
}

/// A format 1 spool (written before format 2) is recovered and delivered.
#[test]
fn format_1_segments_are_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = Vec::new();
    for i in 0..5u8 {
        let body = prost::Message::encode_to_vec(&proto::Record {
            payload: vec![i; 50],
            spans: 2,
            ..Default::default()
        });
        old.extend_from_slice(&(body.len() as u32).to_le_bytes());
        old.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        old.extend_from_slice(&body);
    }
    std::fs::write(segment_path(dir.path(), 7), &old).unwrap();
    let spool = Spool::open(settings(dir.path(), 1 << 20), Arc::new(Metrics::new())).unwrap();
    assert_eq!(spool.recovered_spans(), 10);
    write(&spool, 3).unwrap();
    let (tx, mut rx) = mpsc::channel(1000);
    spool.start_reader(tx).unwrap();
    let items = collect(&mut rx, 8);
    let firsts: Vec<u8> = items.iter().map(|r| r.item.chunk.bytes[0]).collect();
    assert_eq!(firsts, vec![0, 1, 2, 3, 4, 0, 1, 2]);
    spool.shutdown();
    drop(rx);
    spool.join_reader();
}

/// The directory deleted (or moved away) under a running spool: the next write notices,
/// recreates it and copies the undelivered segments back before acknowledging; they
/// survive a restart.
#[test]
fn a_deleted_directory_is_recreated_before_the_next_ack() {
    for moved in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        let spool = Spool::open(settings(&root, 1 << 20), Arc::new(Metrics::new())).unwrap();
        for _ in 0..10 {
            write(&spool, 10).unwrap();
        }
        if moved {
            std::fs::rename(&root, dir.path().join("elsewhere")).unwrap();
        } else {
            std::fs::remove_dir_all(&root).unwrap();
        }
        write(&spool, 10).unwrap();
        assert!(root.join("lock").exists());
        let on_disk: u32 = list_segments(&root)
            .unwrap()
            .iter()
            .flat_map(|(_, p)| frame::scan(&std::fs::read(p).unwrap()).records)
            .map(|r| r.spans)
            .sum();
        assert_eq!(on_disk, 1100, "moved: {moved}");
        spool.shutdown();
        drop(spool);
        let again = Spool::open(settings(&root, 1 << 20), Arc::new(Metrics::new())).unwrap();
        assert_eq!(again.recovered_spans(), 1100);
        again.shutdown();
    }
}

#[test]
fn one_process_per_spool_directory() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path(), 1 << 20), Arc::new(Metrics::new())).unwrap();
    // flock locks belong to the open file description: a second open conflicts even in-process.
    assert!(matches!(
        Spool::open(settings(dir.path(), 1 << 20), Arc::new(Metrics::new())),
        Err(SpoolError::InUse(_))
    ));
    spool.shutdown();
}

#[test]
fn a_full_spool_refuses_and_an_empty_one_takes_anything() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(settings(dir.path(), 30_000), Arc::new(Metrics::new())).unwrap();
    // One request above the budget passes an empty spool, then nothing more fits.
    write(&spool, 40).unwrap();
    assert_eq!(write(&spool, 1), Err(Refusal::SpoolFull));
    spool.shutdown();
    assert_eq!(write(&spool, 1), Err(Refusal::ShuttingDown));
}
