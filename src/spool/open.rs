//! Opening a spool: the directory and its lock, recovery of what a previous run left (checked,
//! torn tails truncated, damage counted), and the writer thread.
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::mpsc;

use super::files::{read_head, remove_temporaries};
use super::frame::{self, Scan};
use super::writer;
use super::{Segment, Shared, Spool, SpoolError, SpoolSettings, State, WRITE_QUEUE, list_segments};
use crate::supervise::LockUnpoisoned;
use crate::telemetry::{Metrics, exporter_labels};

impl Spool {
    /// Opens (creating) the spool directory, recovers what a previous run left, and starts the
    /// writer thread. The reader starts with `start_reader`.
    pub(crate) fn open(settings: SpoolSettings, metrics: Arc<Metrics>) -> Result<Arc<Spool>, SpoolError> {
        let io = io_error(&settings.dir);
        std::fs::create_dir_all(&settings.dir).map_err(io)?;
        let (lock, dir_identity) = lock_dir(&settings.dir)?;
        remove_temporaries(&settings.dir);
        let Recovery {
            state,
            used,
            recovered,
            lost_at_start,
            next_id,
            uncounted_loss,
            ..
        } = Recovery::run(&settings, &metrics)?;
        let gauge_labels = crate::telemetry::exporter_labels(&settings.exporter);
        let bytes_gauge = metrics.spool_bytes.get_or_create(&gauge_labels).clone();
        let records_gauge = metrics.spool_records.get_or_create(&gauge_labels).clone();
        let shared = Arc::new(Shared {
            bytes_gauge,
            records_gauge,
            lock: Mutex::new(lock),
            settings,
            metrics,
            state: Mutex::new(state),
            changed: Condvar::new(),
            used: AtomicU64::new(used),
            closed: AtomicBool::new(false),
            disk_full_until: Mutex::new(None),
            recovered_spans: AtomicU64::new(recovered),
            dir_identity: Mutex::new(dir_identity),
            health: Mutex::new(None),
            unready: AtomicBool::new(false),
            uncounted_loss: AtomicU64::new(uncounted_loss),
        });
        shared.count_corrupt(lost_at_start);
        shared.update_gauges(&shared.state.lock_unpoisoned());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = writer::spawn(shared.clone(), rx, next_id).map_err(io_error(&shared.settings.dir))?;
        Ok(Arc::new(Spool {
            shared,
            tx,
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(None),
        }))
    }
}

/// An I/O error in the spool directory `dir`, as the error `open` returns.
fn io_error(dir: &Path) -> impl Fn(std::io::Error) -> SpoolError + '_ {
    move |error| SpoolError::Io {
        dir: dir.to_path_buf(),
        error,
    }
}

/// Takes the directory's lock; returns it and the directory's (device, inode).
fn lock_dir(dir: &Path) -> Result<(File, (u64, u64)), SpoolError> {
    let io = io_error(dir);
    // Held for the process's life: a second relay on the same directory would interleave
    // segments and deliver (and delete) the other's records.
    let lock = File::create(dir.join("lock")).map_err(&io)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::InUse(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    let meta = std::fs::metadata(dir).map_err(io)?;
    Ok((lock, (meta.dev(), meta.ino())))
}

/// What a previous run left in the directory, checked and counted.
struct Recovery<'a> {
    settings: &'a SpoolSettings,
    metrics: &'a Metrics,
    state: State,
    /// Bytes of the segments kept.
    used: u64,
    /// Spans found: readable, and counted lost.
    recovered: u64,
    lost_at_start: u64,
    next_id: u64,
    uncounted_loss: u64,
}

impl<'a> Recovery<'a> {
    fn run(settings: &'a SpoolSettings, metrics: &'a Metrics) -> Result<Recovery<'a>, SpoolError> {
        let mut found = Recovery {
            settings,
            metrics,
            state: State::default(),
            used: 0,
            recovered: 0,
            lost_at_start: 0,
            next_id: 1,
            uncounted_loss: 0,
        };
        let listed = list_segments(&settings.dir).map_err(io_error(&settings.dir))?;
        let last_id = listed.last().map(|(id, _)| *id);
        // What each segment holds, as the header of the segment after it recorded it.
        let said: BTreeMap<u64, u64> = listed
            .iter()
            .filter_map(|(id, path)| Some((id.checked_sub(1)?, frame::previous_spans(&read_head(path)?)?)))
            .collect();
        for (id, path) in listed {
            found.next_id = id + 1;
            // A segment with one after it was finished by the writer (it moves on only after
            // the last commit).
            let finished = last_id.is_some_and(|last| id < last);
            found.segment(id, &path, finished, said.get(&id).copied())?;
        }
        found.state.read_seg = found.state.segments.keys().next().copied().unwrap_or(found.next_id);
        if found.recovered > 0 {
            tracing::info!(
                exporter = %settings.exporter,
                segments = found.state.segments.len(),
                spans = found.recovered,
                lost_spans = found.lost_at_start,
                segments_with_uncounted_loss = found.uncounted_loss,
                bytes = found.used,
                "spool: recovered undelivered spans; delivering them first"
            );
        }
        Ok(found)
    }

    fn io(&self) -> impl Fn(std::io::Error) -> SpoolError + 'a {
        io_error(&self.settings.dir)
    }

    fn count_corrupt_record(&self) {
        let labels = exporter_labels(&self.settings.exporter);
        self.metrics.spool_corrupt_records.get_or_create(&labels).inc();
    }

    /// Checks segment `id`, counts what it lost, and keeps it (to deliver) when anything in it
    /// is readable. `expected`: the spans the next segment's header says it holds.
    fn segment(&mut self, id: u64, path: &Path, finished: bool, expected: Option<u64>) -> Result<(), SpoolError> {
        let data = std::fs::read(path).map_err(self.io())?;
        let scan = frame::scan(&data);
        if scan.unreadable {
            return self.set_aside(path, data.len());
        }
        let readable: u64 = scan.records.iter().map(|r| r.spans as u64).sum();
        let mut lost: u64 = scan.lost.iter().filter_map(|l| l.spans).sum();
        // A finished segment that comes up short lost acknowledged spans to damage, it was not
        // cut by a crash mid-write.
        let short = finished && (scan.tail_error.is_some() || expected.is_some_and(|e| e > readable + lost));
        let mut absent = 0;
        if short {
            absent = self.cut_short(path, &scan, data.len(), (readable, lost), expected)?;
            lost += absent;
        } else if let Some(err) = &scan.tail_error {
            tracing::warn!(
                exporter = %self.settings.exporter,
                segment = %path.display(),
                kept_records = scan.records.len(),
                truncated_bytes = data.len().saturating_sub(scan.valid_len),
                error = %err,
                "spool: torn or corrupt tail truncated; intact records kept"
            );
            self.count_corrupt_record();
            truncate(path, scan.valid_len).map_err(self.io())?;
        }
        if scan.lost.iter().any(|l| l.spans.is_none()) && expected.is_none() {
            self.uncounted_loss += 1;
        }
        self.log_damaged_records(path, &scan);
        let (Some(format), false) = (scan.format, scan.records.is_empty()) else {
            // Nothing readable: the spans it held (if any) are counted, the file goes.
            self.recovered += lost;
            self.lost_at_start += lost;
            let _ = std::fs::remove_file(path);
            return Ok(());
        };
        let file = File::open(path).map_err(self.io())?;
        let spans: u64 = readable + lost;
        self.recovered += spans;
        self.lost_at_start += lost;
        self.used += scan.valid_len as u64;
        let mut seg = Segment::new(Arc::new(file), format);
        seg.bytes = scan.valid_len as u64;
        seg.records = scan.records.len() as u64;
        seg.spans = spans;
        seg.lost_spans = lost;
        seg.absent = absent;
        seg.sealed = true;
        seg.checked_until = scan.valid_len as u64;
        self.state.segments.insert(id, seg);
        Ok(())
    }

    /// Both header copies damaged: nothing in it can be checked. Kept aside for an operator
    /// rather than deleted; its span count is unknowable.
    fn set_aside(&self, path: &Path, bytes: usize) -> Result<(), SpoolError> {
        let aside: PathBuf = path.with_extension("corrupt");
        tracing::error!(exporter = %self.settings.exporter, segment = %path.display(), moved_to = %aside.display(), bytes, "spool: segment header damaged beyond repair; its records cannot be read (span count unknown)");
        self.count_corrupt_record();
        std::fs::rename(path, &aside).map_err(self.io())
    }

    /// A finished segment holds fewer spans than were written to it: logs it, cuts a damaged
    /// tail, and returns the spans no longer in it (exact when the next segment's header says
    /// how many it held, else at least the record cut off).
    fn cut_short(
        &mut self,
        path: &Path,
        scan: &Scan,
        len: usize,
        (readable, lost): (u64, u64),
        expected: Option<u64>,
    ) -> Result<u64, SpoolError> {
        let exact = expected.is_some();
        let absent = match expected {
            Some(e) => e.saturating_sub(readable + lost),
            // At least the record cut off, when its header says.
            None => scan.tail_spans.unwrap_or(0),
        };
        if !exact {
            self.uncounted_loss += 1;
        }
        tracing::error!(
            exporter = %self.settings.exporter,
            segment = %path.display(),
            held_spans = ?expected,
            readable_spans = readable,
            lost_spans = absent,
            exact,
            missing_bytes = len.saturating_sub(scan.valid_len),
            error = ?scan.tail_error,
            "spool: a finished segment holds fewer spans than were written to it (truncated or damaged, not a torn write): the lost spans are counted dropped, reason corrupt{}",
            if exact { "" } else { "; how many it held is not recorded, so the count is a lower bound and the accounting cannot balance" }
        );
        self.count_corrupt_record();
        if scan.tail_error.is_some() {
            truncate(path, scan.valid_len).map_err(self.io())?;
        }
        Ok(absent)
    }

    fn log_damaged_records(&self, path: &Path, scan: &Scan) {
        for l in &scan.lost {
            tracing::error!(
                exporter = %self.settings.exporter,
                segment = %path.display(),
                offset = l.offset,
                bytes = l.len,
                spans = ?l.spans,
                error = %l.error,
                "spool: damaged record skipped (spans counted dropped, reason corrupt); the records after it are kept"
            );
            self.count_corrupt_record();
        }
    }
}

/// Cuts a file to `len` bytes, durably.
fn truncate(path: &Path, len: usize) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(len as u64)?;
    f.sync_all()
}
