//! Damaged spool files: torn tails, damaged records, short finished segments.

use super::*;

/// (d) A torn tail on the last segment (a write cut by a crash): one log line, one counter,
/// every intact record still delivered.
#[test]
fn torn_tail_is_truncated_and_intact_records_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (mut relay, cfg) = spooled_relay(dir.path(), &endpoint, json!({}));
    assert_eq!(load_accepted(&relay, 200, 4, 50), 1000);
    kill(&mut relay);
    let segs = segments(&spool_dir(dir.path()));
    let last = segs.last().expect("a segment");
    let data = std::fs::read(last).unwrap();
    let scan = frame::scan(&data);
    assert_eq!(scan.valid_len, data.len());
    let total: u32 = segs
        .iter()
        .flat_map(|p| frame::scan(&std::fs::read(p).unwrap()).records)
        .map(|r| r.spans)
        .sum();
    assert_eq!(total, 1000);
    let lost = scan.records.last().unwrap().spans;
    // Cut inside the last record.
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(data.len() as u64 - 7)
        .unwrap();
    let sink = sink_on(port);
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    sink.wait_unique(u64::from(1000 - lost), T);
    let torn = lines_with(&relay, "torn or corrupt tail truncated");
    assert_eq!(torn.len(), 1, "{torn:?}");
    assert_eq!(relay.metric("otlp_relay_spool_corrupt_records_total", &[]), 1.0);
}

/// Span keys of a spooled record's payload (concatenated ResourceSpans).
fn record_keys(record: &otlp_relay::spool::proto::Record) -> Vec<String> {
    let req = ExportTraceServiceRequest::decode(record.payload.as_slice()).unwrap();
    req.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| key_text(&s.trace_id, &s.span_id))
        .collect()
}

/// Frames of a segment file: (offset, length, record).
fn frames_of(data: &[u8]) -> Vec<(usize, usize, otlp_relay::spool::proto::Record)> {
    let frame::Kind::Known(format) = frame::detect(data) else {
        panic!("not a segment")
    };
    let start = format.data_start();
    frame::parse(&data[start..], format, true, Some(0))
        .entries
        .into_iter()
        .map(|e| match e {
            frame::Entry::Record { offset, len, record } => (start + offset, len, record),
            other => panic!("damaged already: {other:?}"),
        })
        .collect()
}

/// Fault: one damaged byte in a segment dropped the rest of it (245 records) while the metric
/// said 1 and the accounting said balanced. Three kinds of damage at once, on disk between two
/// runs: a byte in one record's body (that record is lost, its spans counted exactly), a byte
/// in another record's header (recovered whole), and a zeroed 4 KiB page in another segment
/// (the records it touches are lost, counted exactly). Every other acknowledged span arrives,
/// checked span id by span id, and the final accounting names the loss.
#[test]
fn damaged_records_cost_only_themselves_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (mut relay, cfg) = spooled_relay(dir.path(), &endpoint, json!({"max_size_mib": 8, "segment_size_mib": 1}));
    let acked = post_acknowledged(&relay, 3, 400, 100);
    kill(&mut relay);
    let segs = segments(&spool_dir(dir.path()));
    assert!(segs.len() >= 2, "{segs:?}");
    let mut lost_keys: std::collections::HashSet<String> = Default::default();
    // (a) a body byte of a record in the middle of the first segment.
    let mut first = std::fs::read(&segs[0]).unwrap();
    let frames = frames_of(&first);
    assert!(frames.len() > 100, "{} records", frames.len());
    let (off, len, rec) = &frames[frames.len() / 2];
    first[off + frame::HEADER + len / 2] ^= 0x5a;
    lost_keys.extend(record_keys(rec));
    // (b) a header byte (the length) of another record: recovered.
    let (off, _, _) = &frames[frames.len() / 3];
    first[off + 5] ^= 0xff;
    std::fs::write(&segs[0], &first).unwrap();
    // (c) a zeroed page across records of the second segment.
    let mut second = std::fs::read(&segs[1]).unwrap();
    let frames = frames_of(&second);
    let page = frames[frames.len() / 2].0 + 100;
    let page_end = (page + 4096).min(second.len() - 1);
    second[page..page_end].fill(0);
    for (off, len, rec) in &frames {
        if *off < page_end && off + len > page {
            lost_keys.extend(record_keys(rec));
        }
    }
    std::fs::write(&segs[1], &second).unwrap();
    let lost = lost_keys.len();
    assert!(lost >= 200, "{lost}");

    let sink = sink_on(port);
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    let expected = acked.len() - lost;
    sink.wait_unique(expected as u64, T);
    let keys = sink_keys(sink.http);
    let missing: Vec<&String> = acked.iter().filter(|k| !keys.contains(*k)).collect();
    assert_eq!(missing.len(), lost);
    assert!(missing.iter().all(|k| lost_keys.contains(*k)));
    assert_eq!(
        relay.metric("otlp_relay_exporter_dropped_spans_total", &[("reason", "corrupt")]),
        lost as f64
    );
    assert_eq!(relay.metric("otlp_relay_spool_corrupt_records_total", &[]), 2.0);
    // Segments with readable records were kept until delivered, then deleted.
    wait_segments_at_most(dir.path(), 0);
    terminate(&mut relay);
    let accounting = accounting(&relay);
    assert!(accounting.contains(&format!("corrupt={lost}")), "{accounting}");
    assert!(accounting.contains(&format!("dropped={lost}")), "{accounting}");
    assert!(
        accounting.contains(&format!("recovered={}", acked.len())),
        "{accounting}"
    );
    assert!(accounting.contains("balanced=true"), "{accounting}");
}

/// Fault F4: a finished (non-last) segment cut short lost its acknowledged spans silently: the
/// loss was logged as a torn tail with lost_spans=0 and balanced=true, or not at all when the
/// cut fell between records. A segment's header now records how many spans the one before it
/// holds, so three cuts between two runs are told apart from a torn write and counted:
/// (a) inside a record (counted exactly), (b) exactly between records (counted exactly),
/// (c) inside a record of a segment whose successor's header predates the record (as written by
/// an older relay): at least the cut record is counted, and the accounting says it cannot
/// balance. Every span of the intact records arrives, checked span id by span id.
#[test]
fn a_short_finished_segment_is_corruption_counted_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (port, endpoint) = down_destination();
    let (mut relay, cfg) = spooled_relay(
        dir.path(),
        &endpoint,
        json!({"max_size_mib": 32, "segment_size_mib": 1}),
    );
    let acked = post_acknowledged(&relay, 4, 360, 300);
    kill(&mut relay);
    let segs = segments(&spool_dir(dir.path()));
    assert!(segs.len() >= 5, "{segs:?}");
    let mut lost_keys: std::collections::HashSet<String> = Default::default();
    let cut = |lost_keys: &mut std::collections::HashSet<String>, path: &Path, at: usize, from_frame: usize| {
        let data = std::fs::read(path).unwrap();
        for (_, _, rec) in &frames_of(&data)[from_frame..] {
            lost_keys.extend(record_keys(rec));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(at as u64)
            .unwrap();
    };
    // (a) inside a record's body, two thirds into segment 2.
    let frames = frames_of(&std::fs::read(&segs[1]).unwrap());
    let k = frames.len() * 2 / 3;
    cut(&mut lost_keys, &segs[1], frames[k].0 + frame::HEADER + 10, k);
    // (b) exactly at a record boundary, half-way into segment 3.
    let frames = frames_of(&std::fs::read(&segs[2]).unwrap());
    let k = frames.len() / 2;
    cut(&mut lost_keys, &segs[2], frames[k].0, k);
    let exact = lost_keys.len();
    // (c) inside a record of segment 4, whose successor's header says nothing about it.
    let frames = frames_of(&std::fs::read(&segs[3]).unwrap());
    let k = frames.len() / 2;
    let cut_record_spans = frames[k].2.spans as usize;
    cut(&mut lost_keys, &segs[3], frames[k].0 + frame::HEADER + 10, k);
    let mut next = std::fs::read(&segs[4]).unwrap();
    let frame::Kind::Known(frame::Format::V2 { seed }) = frame::detect(&next) else {
        panic!("not a format 2 segment")
    };
    assert!(
        frame::previous_spans(&next).is_some(),
        "the writer records the previous segment's spans"
    );
    next[..frame::FILE_HEADER].copy_from_slice(&frame::file_header(seed));
    std::fs::write(&segs[4], &next).unwrap();
    let lost = lost_keys.len();
    assert!(lost > exact + cut_record_spans, "{lost}");

    let sink = sink_on(port);
    let mut relay = Relay::start(dir.path(), &cfg, "otlp");
    sink.wait_unique((acked.len() - lost) as u64, T);
    let keys = sink_keys(sink.http);
    let missing: std::collections::HashSet<&String> = acked.iter().filter(|k| !keys.contains(*k)).collect();
    assert_eq!(missing.len(), lost);
    assert!(missing.iter().all(|k| lost_keys.contains(*k)));
    let counted = exact + cut_record_spans;
    assert_eq!(
        relay.metric("otlp_relay_exporter_dropped_spans_total", &[("reason", "corrupt")]),
        counted as f64
    );
    assert_eq!(relay.metric("otlp_relay_spool_corrupt_records_total", &[]), 3.0);
    let errors = lines_with(&relay, "finished segment holds fewer spans");
    assert_eq!(errors.len(), 3, "{errors:?}");
    for (line, seg, is_exact) in [
        (&errors[0], &segs[1], true),
        (&errors[1], &segs[2], true),
        (&errors[2], &segs[3], false),
    ] {
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains(&seg.display().to_string()), "{line}");
        assert!(line.contains(&format!("exact={is_exact}")), "{line}");
    }
    assert!(
        !relay.proc.output_text().contains("torn or corrupt tail truncated"),
        "a finished segment was taken for a torn tail"
    );
    wait_segments_at_most(dir.path(), 0);
    terminate(&mut relay);
    let accounting = accounting(&relay);
    assert!(accounting.contains(&format!("corrupt={counted}")), "{accounting}");
    assert!(accounting.contains("segments_with_uncounted_loss=1"), "{accounting}");
    assert!(accounting.contains("balanced=false"), "{accounting}");
}
