//! The reader thread: reads committed records in order, past damage, and feeds them to the
//! exporter's batcher, a bounded amount at a time.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::frame::{self, Format};
use super::{READ_CHUNK, READ_RETRY, Shared, Spool, SpoolError, record_to_routed};
use crate::pipeline::item::Routed;
use crate::supervise::LockUnpoisoned;
use crate::telemetry::exporter_labels;

impl Spool {
    /// Starts the thread that reads records in order and feeds them to the exporter's batcher.
    pub(crate) fn start_reader(&self, intake: mpsc::Sender<Arc<Vec<Routed>>>) -> Result<(), SpoolError> {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("spool-reader".into())
            .spawn(move || {
                let reader = Reader { shared };
                let instance = format!("spool {} reader", reader.shared.settings.exporter);
                let shared = reader.shared.clone();
                crate::supervise::supervise_thread(
                    "spool_reader",
                    &instance,
                    &shared.metrics,
                    &|| shared.health(),
                    || reader.run(intake.clone()),
                );
            })
            .map_err(|error| SpoolError::Io {
                dir: self.shared.settings.dir.clone(),
                error,
            })?;
        *self.reader.lock_unpoisoned() = Some(handle);
        Ok(())
    }
}

/// A stretch of committed bytes to read.
struct Range {
    id: u64,
    off: u64,
    end: u64,
    file: Arc<File>,
    format: Format,
    checked_until: u64,
}

/// What one read found.
#[derive(Default)]
struct Read {
    routed: Vec<Routed>,
    consumed: u64,
    spans: u64,
    /// Damaged stretches not seen at start: (offset, bytes, spans if known, error).
    damaged: Vec<(u64, usize, Option<u64>, frame::FrameError)>,
}

struct Reader {
    shared: Arc<Shared>,
}

impl Reader {
    fn run(&self, intake: mpsc::Sender<Arc<Vec<Routed>>>) {
        let labels = exporter_labels(&self.shared.settings.exporter);
        let mut last_error_log: Option<Instant> = None;
        loop {
            crate::supervise::fault_point("spool_reader");
            let Some(range) = self.next_range() else {
                return;
            };
            let read = match read_range(&range) {
                Ok(r) => r,
                Err(e) => {
                    // An I/O error, not damage: the bytes may read later, so they are kept and
                    // tried again (a segment is never skipped for it).
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        last_error_log = Some(Instant::now());
                        tracing::error!(exporter = %self.shared.settings.exporter, segment = range.id, offset = range.off, error = %e, "spool: cannot read a segment; retrying (logged once a minute)");
                    }
                    if !self.pause(READ_RETRY) {
                        return;
                    }
                    continue;
                }
            };
            {
                let mut st = self.shared.state.lock_unpoisoned();
                // drop_oldest may have removed the segment while we read it: then these spans
                // were counted dropped and must not travel.
                if st.read_seg != range.id || st.read_off != range.off {
                    continue;
                }
                st.read_off = range.off + read.consumed;
                let Some(seg) = st.segments.get_mut(&range.id) else {
                    continue;
                };
                seg.read_spans += read.spans;
                seg.outstanding += read.spans;
            }
            for (offset, bytes, spans, error) in &read.damaged {
                // Counted dropped (exactly) once the reader passes the segment's end.
                self.shared.metrics.spool_corrupt_records.get_or_create(&labels).inc();
                tracing::error!(exporter = %self.shared.settings.exporter, segment = range.id, offset, bytes, spans = ?spans, error = %error, "spool: damaged record skipped; the records after it are delivered");
            }
            if read.routed.is_empty() {
                continue;
            }
            if intake.blocking_send(Arc::new(read.routed)).is_err() {
                return;
            }
        }
    }

    /// Waits `d` (or until stopped); false when the reader is to stop.
    fn pause(&self, d: Duration) -> bool {
        let st = self.shared.state.lock_unpoisoned();
        if st.stop_reader {
            return false;
        }
        let (st, _) = self
            .shared
            .changed
            .wait_timeout(st, d)
            .unwrap_or_else(|e| e.into_inner());
        !st.stop_reader
    }

    /// Waits for committed bytes past the read cursor.
    fn next_range(&self) -> Option<Range> {
        let mut st = self.shared.state.lock_unpoisoned();
        loop {
            if st.stop_reader {
                return None;
            }
            let id = st.read_seg;
            let info = st
                .segments
                .get(&id)
                .map(|s| (s.bytes, s.sealed, s.format, s.file.clone(), s.checked_until));
            match info {
                Some((bytes, sealed, format, file, checked_until)) => {
                    let start = format.data_start() as u64;
                    if st.read_off < start {
                        st.read_off = start;
                    }
                    if st.read_off < bytes {
                        return Some(Range {
                            id,
                            off: st.read_off,
                            end: bytes,
                            file,
                            format,
                            checked_until,
                        });
                    }
                    if sealed {
                        self.shared.finish_reading(&mut st, id);
                        // Past the last sealed segment: the writer's next one comes after.
                        let next = st.segments.range(id + 1..).next().map_or(id + 1, |(&k, _)| k);
                        st.read_seg = next;
                        st.read_off = 0;
                        self.shared.try_delete(&mut st, id);
                        continue;
                    }
                }
                None => {
                    if let Some((&n, _)) = st.segments.range(id..).next() {
                        st.read_seg = n;
                        st.read_off = 0;
                        continue;
                    }
                }
            }
            st = self.shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Reads whole records from a range, about READ_CHUNK bytes at a time (more when one record or
/// one damaged stretch is larger). Damage is skipped, never a reason to stop.
fn read_range(r: &Range) -> std::io::Result<Read> {
    let left = r.end - r.off;
    let mut want = left.min(READ_CHUNK as u64);
    let parsed = loop {
        let mut buf = vec![0u8; want as usize];
        r.file.read_exact_at(&mut buf, r.off)?;
        let at_end = want == left;
        let parsed = frame::parse(&buf, r.format, at_end, None);
        if parsed.consumed > 0 || at_end {
            break parsed;
        }
        want = want.saturating_mul(2).min(left);
    };
    let mut read = Read {
        consumed: parsed.consumed as u64,
        ..Default::default()
    };
    for entry in parsed.entries {
        match entry {
            frame::Entry::Record { record, .. } => {
                read.spans += record.spans as u64;
                read.routed.push(record_to_routed(record, Some(r.id)));
            }
            frame::Entry::Lost {
                offset,
                len,
                spans,
                error,
                ..
            } => {
                let at = r.off + offset as u64;
                if at >= r.checked_until {
                    read.damaged.push((at, len, spans, error));
                }
            }
        }
    }
    Ok(read)
}
