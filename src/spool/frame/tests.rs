//! Unit tests of the record framing: round trips, every kind of damage, both formats.
use super::*;

const SEED: u32 = 0x5eed_1234;

fn record(i: u32) -> Record {
    Record {
        payload: vec![i as u8; 10 + i as usize],
        spans: i + 1,
        experiment: format!("{i}"),
        ..Default::default()
    }
}

fn segment(n: u32) -> Vec<u8> {
    let mut buf = file_header(SEED).to_vec();
    let mut before = 0;
    for i in 0..n {
        encode(&record(i), SEED, before, &mut buf);
        before += u64::from(record(i).spans);
    }
    buf
}

/// Frame boundaries of a segment made by `segment`.
fn ends(buf: &[u8]) -> Vec<usize> {
    let mut v = vec![FILE_HEADER];
    let mut pos = FILE_HEADER;
    while pos < buf.len() {
        pos += HEADER + le32(buf, pos + 4).unwrap() as usize;
        v.push(pos);
    }
    v
}

#[test]
fn round_trip() {
    let buf = segment(5);
    let scan = scan(&buf);
    assert_eq!(scan.format, Some(Format::V2 { seed: SEED }));
    assert_eq!(scan.records, (0..5).map(record).collect::<Vec<_>>());
    assert_eq!(scan.valid_len, buf.len());
    assert_eq!(scan.tail_error, None);
    assert!(scan.lost.is_empty());
}

#[test]
fn every_torn_tail_keeps_the_intact_prefix() {
    let buf = segment(4);
    let ends = ends(&buf);
    for cut in FILE_HEADER..buf.len() {
        let scan = scan(&buf[..cut]);
        let intact = ends.iter().filter(|&&e| e <= cut).count() - 1;
        assert_eq!(scan.records.len(), intact, "cut at {cut}");
        assert_eq!(scan.valid_len, ends[intact], "cut at {cut}");
        assert_eq!(scan.tail_error.is_some(), cut != ends[intact]);
        assert!(scan.lost.is_empty(), "cut at {cut}: {:?}", scan.lost);
    }
    // A header cut short by a crash: nothing to keep, nothing lost.
    for cut in 1..FILE_HEADER {
        let scan = scan(&buf[..cut]);
        assert!(scan.records.is_empty() && !scan.unreadable, "cut at {cut}");
    }
}

/// Every byte of a segment, damaged in turn: the damaged record alone is lost (with its exact
/// span count) or recovered, every other record is read, and what is read plus what is
/// counted lost is exactly what was written.
#[test]
fn one_damaged_byte_costs_at_most_its_record_and_is_counted_exactly() {
    let n = 6;
    let buf = segment(n);
    let total: u64 = (0..n).map(|i| u64::from(record(i).spans)).sum();
    let ends = ends(&buf);
    for at in 0..buf.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = buf.clone();
            bad[at] ^= flip;
            let scan = scan(&bad);
            let read: u64 = scan.records.iter().map(|r| u64::from(r.spans)).sum();
            let lost: u64 = scan.lost.iter().map(|l| l.spans.expect("exact")).sum();
            let tail = scan.tail_error.is_some();
            if at < FILE_HEADER {
                assert_eq!(scan.records.len(), n as usize, "file header byte {at}");
                continue;
            }
            // The damaged frame, by index.
            let hit = ends.iter().filter(|&&e| e <= at).count() - 1;
            let expected: Vec<Record> = (0..n).filter(|&i| i as usize != hit).map(record).collect();
            if scan.records.len() == n as usize {
                assert_eq!(
                    scan.records,
                    (0..n).map(record).collect::<Vec<_>>(),
                    "byte {at} recovered"
                );
            } else {
                assert_eq!(scan.records, expected, "byte {at} ^ {flip:#x}");
                // A damaged last frame with no frame after it is a tail (truncated, like a
                // torn write); anywhere else the loss is counted exactly.
                if tail {
                    assert_eq!(hit as u32, n - 1, "byte {at}: only the last frame can be a tail");
                    assert_eq!(read, total - u64::from(record(n - 1).spans));
                    continue;
                }
            }
            assert_eq!(read + lost, total, "byte {at} ^ {flip:#x}: {:?}", scan.lost);
        }
    }
}

/// Larger damage (a zeroed run, random bytes) in the middle: the records after it are read
/// again, and the spans lost in between are exact from the next frame's `before`.
#[test]
fn damaged_runs_resynchronise_on_the_next_valid_frame() {
    let n = 12;
    let buf = segment(n);
    let total: u64 = (0..n).map(|i| u64::from(record(i).spans)).sum();
    let ends = ends(&buf);
    for (from, to) in [
        (ends[2] + 3, ends[5] - 2),
        (ends[1], ends[4]),
        (ends[3] + 30, ends[3] + 31),
    ] {
        let mut bad = buf.clone();
        bad[from..to].fill(0);
        let scan = scan(&bad);
        let read: u64 = scan.records.iter().map(|r| u64::from(r.spans)).sum();
        let lost: u64 = scan.lost.iter().map(|l| l.spans.expect("exact")).sum();
        assert_eq!(read + lost, total, "zeroed {from}..{to}");
        assert_eq!(scan.records.last(), Some(&record(n - 1)));
        assert_eq!(scan.tail_error, None);
    }
}

/// Random damage and truncation never panics and never yields a record that was not written.
#[test]
fn random_damage_never_panics_or_invents_records() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let buf = segment(8);
    let written: Vec<Record> = (0..8).map(record).collect();
    for _ in 0..20_000 {
        let mut bad = buf.clone();
        for _ in 0..rng.random_range(1..6) {
            let at = rng.random_range(0..bad.len());
            bad[at] = rng.random();
        }
        if rng.random_bool(0.3) {
            bad.truncate(rng.random_range(0..bad.len()));
        }
        let scan = scan(&bad);
        for r in &scan.records {
            assert!(written.contains(r), "invented {r:?}");
        }
        for start in [0, 1, 7, FILE_HEADER + 3] {
            for at_end in [false, true] {
                let _ = parse(
                    bad.get(start..).unwrap_or_default(),
                    Format::V2 { seed: SEED },
                    at_end,
                    None,
                );
                let _ = parse(bad.get(start..).unwrap_or_default(), Format::V1, at_end, None);
            }
        }
    }
}

#[test]
fn a_planted_frame_without_the_seed_is_not_taken() {
    // A client's payload holding a well-formed frame made with another seed.
    let mut planted = Vec::new();
    encode(
        &Record {
            payload: b"forged".to_vec(),
            spans: 1,
            experiment: "other".into(),
            ..Default::default()
        },
        0,
        0,
        &mut planted,
    );
    let carrier = Record {
        payload: planted.clone(),
        spans: 3,
        ..Default::default()
    };
    let mut buf = file_header(SEED).to_vec();
    encode(&carrier, SEED, 0, &mut buf);
    encode(&record(1), SEED, 3, &mut buf);
    // Damage the carrier's header and body (its last byte, the span count, after the
    // planted frame): resynchronisation must skip the planted frame.
    buf[FILE_HEADER] ^= 0xff;
    let carrier_end = FILE_HEADER + HEADER + carrier.encoded_len();
    buf[carrier_end - 1] ^= 0x40;
    let scan = scan(&buf);
    assert_eq!(scan.records, vec![record(1)]);
    assert_eq!(scan.lost.len(), 1);
    assert_eq!(scan.lost[0].spans, Some(3));
}

#[test]
fn restamp_sets_seed_and_running_span_counts() {
    let mut frames = Vec::new();
    for i in 0..3 {
        encode(&record(i), 0, 0, &mut frames);
    }
    assert_eq!(restamp(&mut frames, SEED, 100), Ok(1 + 2 + 3));
    let mut file = file_header(SEED).to_vec();
    file.extend_from_slice(&frames);
    let parsed = parse(&file[FILE_HEADER..], Format::V2 { seed: SEED }, true, Some(100));
    assert_eq!(parsed.entries.len(), 3);
    assert!(matches!(parsed.entries[2], Entry::Record { .. }));
    assert_eq!(head(&file[FILE_HEADER..], SEED).unwrap().before, 100);
    assert_eq!(restamp(&mut frames[..10], SEED, 0), Err(FrameError::Truncated));
}

#[test]
fn windows_stop_where_more_bytes_are_needed() {
    let buf = segment(3);
    let data = &buf[FILE_HEADER..];
    let ends = ends(&buf);
    let first = ends[1] - FILE_HEADER;
    let p = parse(&data[..first + 5], Format::V2 { seed: SEED }, false, Some(0));
    assert_eq!(p.entries.len(), 1);
    assert_eq!(p.consumed, first);
    // A damaged header whose resync point is beyond the window waits for more.
    let mut bad = data.to_vec();
    bad[first] ^= 0xff;
    let second = ends[2] - FILE_HEADER;
    let p = parse(&bad[first..second + 3], Format::V2 { seed: SEED }, false, None);
    assert_eq!(p.consumed, 0);
    let p = parse(&bad[first..], Format::V2 { seed: SEED }, false, None);
    assert_eq!(p.entries.len(), 2, "{:?}", p.entries);
}

/// Files written before format 2 are still read; their first bad frame ends the file.
#[test]
fn format_1_files_are_read() {
    let mut buf = Vec::new();
    for i in 0..3 {
        let body = record(i).encode_to_vec();
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        buf.extend_from_slice(&body);
    }
    let scan = scan(&buf);
    assert_eq!(scan.format, Some(Format::V1));
    assert_eq!(scan.records, (0..3).map(record).collect::<Vec<_>>());
    let last = buf.len() - 3;
    buf[last] ^= 0x10;
    let scan = super::scan(&buf);
    assert_eq!(scan.records.len(), 2);
    assert_eq!(scan.tail_error, Some(FrameError::Checksum));
}

#[test]
fn a_file_header_cut_short_holds_nothing() {
    let buf = segment(2);
    for cut in [COPY, COPY + 5, FILE_HEADER] {
        let scan = scan(&buf[..cut]);
        assert!(scan.records.is_empty() && scan.lost.is_empty(), "cut at {cut}");
        assert!(scan.valid_len <= cut, "cut at {cut}");
    }
}

#[test]
fn both_file_header_copies_damaged_is_unreadable_not_empty() {
    let mut buf = segment(2);
    buf[0] ^= 1;
    buf[COPY + 3] ^= 1;
    let scan = scan(&buf);
    assert!(scan.unreadable);
    assert!(scan.records.is_empty());
    // One copy is enough.
    let mut buf = segment(2);
    buf[COPY + 3] ^= 1;
    assert_eq!(super::scan(&buf).records.len(), 2);
}

#[test]
fn a_segment_header_tells_what_the_segment_before_it_holds() {
    for previous in [Some(0), Some(1), Some(8_500), Some(u64::from(u32::MAX) - 1)] {
        let header = segment_header(SEED, previous);
        assert_eq!(previous_spans(&header), previous);
        assert_eq!(detect(&header), Kind::Known(Format::V2 { seed: SEED }));
        // Either copy is enough.
        let mut damaged = header;
        damaged[3] ^= 1;
        assert_eq!(previous_spans(&damaged), previous);
    }
    // Unknown: not said, too large to say, or a file written before it was recorded.
    assert_eq!(previous_spans(&segment_header(SEED, None)), None);
    assert_eq!(previous_spans(&segment_header(SEED, Some(u64::from(u32::MAX)))), None);
    assert_eq!(previous_spans(&file_header(SEED)), None);
    assert_eq!(previous_spans(&[0u8; FILE_HEADER]), None);
}

/// A frame written from a borrowed payload is byte for byte the one written from a Record
/// holding it, at every length prefix size and with the other fields set or not.
#[test]
fn a_borrowed_payload_frames_like_an_owned_one() {
    for len in [0usize, 1, 127, 128, 16_383, 16_384, 300_000] {
        for full in [false, true] {
            let mut rest = Record {
                spans: len as u32 % 7,
                ..Default::default()
            };
            if full {
                rest.experiment = "42".into();
                rest.enqueue_time_unix_nano = 1_700_000_000_000_000_000;
                rest.attempts = 3;
                rest.exporter = "otlphttp/mlflow".into();
                rest.error = "refused".into();
            }
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let owned = Record {
                payload: payload.clone(),
                ..rest.clone()
            };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            encode(&owned, SEED, 5, &mut a);
            encode_with_payload(&payload, &rest, SEED, 5, &mut b);
            assert_eq!(a, b, "payload of {len} bytes, all fields {full}");
        }
    }
}
