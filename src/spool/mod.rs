//! The disk spool behind an exporter's `sending_queue.storage`: accepted spans are appended to
//! segment files as CRC32C-framed records and acknowledged once a group commit (one fsync for
//! every request waiting) made them durable. A reader thread feeds the exporter's batcher from
//! disk, so memory holds only what is being sent; delivered spans release their segment, and a
//! segment is deleted once nothing in it is left to deliver. On start, surviving segments are
//! checked, a torn tail truncated, and their records delivered again (at least once). Only the
//! last segment can have a torn tail (a crash mid-write): each segment's header records how
//! many spans the one before it holds, so a finished segment found short is corruption, logged
//! as an error and its lost spans counted exactly (or, for segments from before that record, at
//! least the cut record, with the accounting marked as unable to balance).
//!
//! A damaged record costs that record only (see `frame`): readers resynchronise on the next
//! valid frame, the spans lost are counted exactly (`otlp_relay_exporter_dropped_spans_total
//! {reason="corrupt"}`), and a segment is deleted only once every readable record in it was
//! delivered. Every segment stays open while it is tracked, so a spool directory deleted under
//! the relay loses nothing: the writer notices (the open segment's link count, the directory's
//! identity) at the next group commit or within a second when idle, recreates the directory,
//! copies the unlinked segments back from their open descriptors, and only then acknowledges;
//! while it cannot, requests are refused and `/readyz` says why.
pub(crate) mod deadletter;
pub mod frame;
pub(crate) mod replay;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::pipeline::item::{Charge, Destination, Item, Refusal, Routed};
use crate::pipeline::wire::ResourceChunk;
use crate::supervise::LockUnpoisoned;
use crate::telemetry::{Health, Metrics, exporter_labels};
use frame::Format;

/// The record envelope, generated from proto/spool.proto.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/otlp_relay.spool.v1.rs"));
}

pub(crate) const SEGMENT_SUFFIX: &str = "seg";
/// Requests waiting for the writer; beyond this the disk is the bottleneck and clients wait.
const WRITE_QUEUE: usize = 1024;
/// Payload bytes the reader hands to the batcher at once; bounds memory between disk and sender.
const READ_CHUNK: usize = 256 * 1024;
/// How long a failed write (e.g. a full disk) makes new requests refused before trying again.
const DISK_FULL_BACKOFF: Duration = Duration::from_secs(1);
/// How often an idle writer checks that the spool directory is still there.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long the reader waits before reading again after an I/O error (not damage: the bytes
/// may be readable later, so they are never skipped for it).
const READ_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub(crate) struct SpoolSettings {
    pub exporter: String,
    pub dir: PathBuf,
    pub fsync: bool,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub drop_oldest: bool,
}

impl SpoolSettings {
    /// Settings for `exporter` under a file_storage extension: each exporter gets its own
    /// subdirectory. Segments are at most a quarter of the budget, so drop_oldest and deletion
    /// work in steps smaller than the whole spool, and at least 1/256 of it, because every
    /// tracked segment holds a descriptor (what lets a deleted directory be repaired).
    pub(crate) fn from_config(exporter: &str, cfg: &crate::config::FileStorageConfig) -> SpoolSettings {
        let max_bytes = cfg.max_size_mib * 1024 * 1024;
        SpoolSettings {
            exporter: exporter.to_string(),
            dir: Path::new(&cfg.directory).join(dir_name(exporter)),
            fsync: cfg.fsync,
            max_bytes,
            segment_bytes: (cfg.segment_size_mib * 1024 * 1024)
                .min(max_bytes / 4)
                .max(max_bytes / 256)
                .max(64 * 1024),
            drop_oldest: cfg.on_full == crate::config::OnFull::DropOldest,
        }
    }
}

/// A component id as a directory name (`otlphttp/mlflow` → `otlphttp_mlflow`).
pub(crate) fn dir_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("spool directory {dir}: {error}")]
    Io { dir: PathBuf, error: std::io::Error },
    #[error("spool directory {0} is in use by another process (two relays must not share a spool)")]
    InUse(PathBuf),
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_SUFFIX}"))
}

/// Where a segment is copied before it is renamed into place (never listed as a segment).
fn temporary_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_SUFFIX}.tmp"))
}

/// Copies a crash left half made.
fn remove_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.extension().is_some_and(|e| e == "tmp") {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Segment files in `dir`, by id.
pub(crate) fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_SUFFIX) {
            continue;
        }
        if let Some(id) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()) {
            out.push((id, path));
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Frames a request's routed chunks, one record per ResourceSpans. The writer stamps each frame
/// with its segment's seed and span position (`frame::restamp`).
pub(crate) fn encode_request(routed: &[Routed]) -> (Bytes, usize) {
    let now = now_unix_nanos();
    let mut out = Vec::with_capacity(routed.iter().map(|r| r.item.chunk.bytes.len() + 32).sum());
    for r in routed {
        let record = proto::Record {
            payload: r.item.chunk.bytes.to_vec(),
            spans: r.item.chunk.spans as u32,
            experiment: r.destination.experiment.as_deref().unwrap_or("").to_string(),
            enqueue_time_unix_nano: now,
            ..Default::default()
        };
        frame::encode(&record, 0, 0, &mut out);
    }
    (Bytes::from(out), routed.len())
}

#[derive(Debug)]
struct Segment {
    /// Committed (durable, readable) bytes, file header included.
    bytes: u64,
    records: u64,
    /// Spans written to it (or, recovered, found in it: readable and counted lost).
    spans: u64,
    /// Spans the reader has handed on.
    read_spans: u64,
    /// Spans counted dropped as damaged.
    lost_spans: u64,
    /// Spans handed on and not yet released.
    outstanding: u64,
    released: u64,
    /// The writer has moved on; nothing more is appended.
    sealed: bool,
    /// Held while the segment is tracked: the reader reads through it, and a segment whose
    /// directory was deleted can still be read and copied back.
    file: Arc<File>,
    format: Format,
    /// Bytes checked at start (damage found there is already logged and counted).
    checked_until: u64,
    /// Spans counted lost at start that are no longer in the file (a finished segment found
    /// short): the next segment's header records the spans without them, so a later start
    /// does not count them again.
    absent: u64,
}

impl Segment {
    fn new(file: Arc<File>, format: Format) -> Segment {
        Segment {
            bytes: format.data_start() as u64,
            records: 0,
            spans: 0,
            read_spans: 0,
            lost_spans: 0,
            outstanding: 0,
            released: 0,
            sealed: false,
            file,
            format,
            checked_until: 0,
            absent: 0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    segments: BTreeMap<u64, Segment>,
    read_seg: u64,
    read_off: u64,
    stop_reader: bool,
}

struct Shared {
    /// The directory's flock (replaced when the directory is recreated).
    lock: Mutex<File>,
    settings: SpoolSettings,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    changed: Condvar,
    /// Bytes on disk plus bytes admitted and waiting for the writer.
    used: AtomicU64,
    closed: AtomicBool,
    disk_full_until: Mutex<Option<Instant>>,
    recovered_spans: AtomicU64,
    /// (device, inode) of the directory: another one at the path means ours was deleted.
    dir_identity: Mutex<(u64, u64)>,
    health: Mutex<Option<Arc<Health>>>,
    unready: AtomicBool,
    /// Segments found damaged at start whose lost spans could not all be counted (no record of
    /// how many they held): the accounting cannot balance, and says so.
    uncounted_loss: AtomicU64,
}

impl Shared {
    fn update_gauges(&self, st: &State) {
        let labels = exporter_labels(&self.settings.exporter);
        let bytes: u64 = st.segments.values().map(|s| s.bytes).sum();
        let records: u64 = st.segments.values().map(|s| s.records).sum();
        self.metrics.spool_bytes.get_or_create(&labels).set(bytes as i64);
        self.metrics.spool_records.get_or_create(&labels).set(records as i64);
    }

    fn component(&self) -> String {
        format!("spool {}", self.settings.exporter)
    }

    /// Readiness, once the relay attached it (supervised threads report on it).
    fn health(&self) -> Option<Arc<Health>> {
        self.health.lock_unpoisoned().clone()
    }

    /// Reports (Some) or clears (None) why the spool cannot take requests, on /readyz.
    fn set_unready(&self, reason: Option<String>) {
        if reason.is_none() && !self.unready.load(Ordering::Acquire) {
            return;
        }
        self.unready.store(reason.is_some(), Ordering::Release);
        if let Some(h) = self.health.lock_unpoisoned().as_ref() {
            h.set_unready(&self.component(), reason);
        }
    }

    fn count_corrupt(&self, spans: u64) {
        if spans == 0 {
            return;
        }
        self.metrics.count_dropped(
            &self.settings.exporter,
            crate::telemetry::drop_reason::CORRUPT,
            spans as usize,
        );
    }

    /// The reader has passed a sealed segment's end: spans neither read nor counted lost yet
    /// were in damaged records found at run time; count them now, exactly.
    fn finish_reading(&self, st: &mut State, id: u64) {
        let Some(seg) = st.segments.get_mut(&id) else { return };
        let missing = seg.spans.saturating_sub(seg.read_spans + seg.lost_spans);
        if missing > 0 {
            seg.lost_spans += missing;
            self.count_corrupt(missing);
            tracing::error!(exporter = %self.settings.exporter, segment = id, spans = missing, "spool: spans lost to damaged records (counted dropped, reason corrupt); the segment's other records were delivered");
        }
    }

    /// Deletes a segment once it is sealed, read past, and nothing read from it is in flight.
    fn try_delete(&self, st: &mut State, id: u64) {
        let Some(seg) = st.segments.get(&id) else { return };
        let read_past = st.read_seg > id || (st.read_seg == id && st.read_off >= seg.bytes);
        if !(seg.sealed && read_past && seg.outstanding == 0) {
            return;
        }
        let bytes = seg.bytes;
        st.segments.remove(&id);
        match std::fs::remove_file(segment_path(&self.settings.dir, id)) {
            Ok(()) => {}
            // The directory was deleted under us: nothing to delete (the writer recreates it).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(exporter = %self.settings.exporter, segment = id, error = %e, "cannot delete a delivered spool segment");
            }
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.update_gauges(st);
    }

    /// on_full: drop_oldest: deletes the oldest sealed segments until `need` more bytes fit.
    /// Spans not yet read from them are lost, and counted.
    fn drop_oldest(&self, need: u64) -> bool {
        let mut st = self.state.lock_unpoisoned();
        loop {
            if self.used.load(Ordering::Acquire) + need <= self.settings.max_bytes {
                return true;
            }
            let Some(id) = st.segments.iter().find(|(_, s)| s.sealed).map(|(&id, _)| id) else {
                return false;
            };
            let Some(seg) = st.segments.remove(&id) else {
                return false;
            };
            let lost = seg.spans.saturating_sub(seg.read_spans + seg.lost_spans);
            if st.read_seg <= id {
                st.read_seg = id + 1;
                st.read_off = 0;
            }
            let _ = std::fs::remove_file(segment_path(&self.settings.dir, id));
            self.used.fetch_sub(seg.bytes, Ordering::AcqRel);
            self.metrics.count_dropped(
                &self.settings.exporter,
                crate::telemetry::drop_reason::SPOOL_FULL,
                lost as usize,
            );
            tracing::warn!(exporter = %self.settings.exporter, segment = id, spans = lost, "spool full: dropped the oldest segment (on_full: drop_oldest)");
            self.update_gauges(&st);
        }
    }
}

struct WriteRequest {
    frames: Bytes,
    records: usize,
    spans: usize,
    done: oneshot::Sender<Result<(), Refusal>>,
    /// Holds the request's memory_limiter share until it is on disk.
    _charge: Option<Arc<Charge>>,
}

enum WriteMsg {
    Write(WriteRequest),
    Stop,
}

/// One exporter's spool.
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<WriteMsg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// Room reserved in the spool for one request, from `Spool::reserve`.
pub(crate) struct SpoolPermit<'a> {
    spool: &'a Spool,
    permit: Option<mpsc::Permit<'a, WriteMsg>>,
    bytes: u64,
}

impl Drop for SpoolPermit<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.spool.shared.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

impl SpoolPermit<'_> {
    /// Hands the frames to the writer; the receiver resolves once they are durable.
    pub(crate) fn send(
        mut self,
        frames: Bytes,
        records: usize,
        spans: usize,
        charge: Option<Arc<Charge>>,
    ) -> oneshot::Receiver<Result<(), Refusal>> {
        let (done, rx) = oneshot::channel();
        // From here the writer owns the reserved bytes.
        self.bytes = 0;
        // `send` consumes the permit holder, so the permit is always there.
        if let Some(permit) = self.permit.take() {
            permit.send(WriteMsg::Write(WriteRequest {
                frames,
                records,
                spans,
                done,
                _charge: charge,
            }));
        }
        rx
    }
}

impl Spool {
    /// Opens (creating) the spool directory, recovers what a previous run left, and starts the
    /// writer thread. The reader starts with `start_reader`.
    pub(crate) fn open(settings: SpoolSettings, metrics: Arc<Metrics>) -> Result<Arc<Spool>, SpoolError> {
        let dir = settings.dir.clone();
        let io = |error| SpoolError::Io {
            dir: dir.clone(),
            error,
        };
        std::fs::create_dir_all(&settings.dir).map_err(io)?;
        // Held for the process's life: a second relay on the same directory would interleave
        // segments and deliver (and delete) the other's records.
        let lock = File::create(settings.dir.join("lock")).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::InUse(settings.dir.clone())),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let dir_meta = std::fs::metadata(&settings.dir).map_err(io)?;
        remove_temporaries(&settings.dir);
        let labels = exporter_labels(&settings.exporter);
        let mut state = State::default();
        let mut used = 0;
        let mut recovered = 0;
        let mut lost_at_start = 0;
        let mut next_id = 1;
        let mut uncounted_loss = 0;
        let listed = list_segments(&settings.dir).map_err(io)?;
        let last_id = listed.last().map(|(id, _)| *id);
        // What each segment holds, as the header of the segment after it recorded it.
        let said: BTreeMap<u64, u64> = listed
            .iter()
            .filter_map(|(id, path)| Some((id.checked_sub(1)?, frame::previous_spans(&read_head(path)?)?)))
            .collect();
        for (id, path) in listed {
            next_id = id + 1;
            let data = std::fs::read(&path).map_err(io)?;
            let scan = frame::scan(&data);
            if scan.unreadable {
                // Both header copies damaged: nothing in it can be checked. Kept aside for an
                // operator rather than deleted; its span count is unknowable.
                let aside = path.with_extension("corrupt");
                tracing::error!(exporter = %settings.exporter, segment = %path.display(), moved_to = %aside.display(), bytes = data.len(), "spool: segment header damaged beyond repair; its records cannot be read (span count unknown)");
                metrics.spool_corrupt_records.get_or_create(&labels).inc();
                std::fs::rename(&path, &aside).map_err(io)?;
                continue;
            }
            let readable: u64 = scan.records.iter().map(|r| r.spans as u64).sum();
            let mut lost: u64 = scan.lost.iter().filter_map(|l| l.spans).sum();
            // A segment with one after it was finished by the writer (it moves on only after
            // the last commit): one that comes up short lost acknowledged spans to damage, it
            // was not cut by a crash mid-write.
            let expected = said.get(&id).copied();
            let short = last_id.is_some_and(|last| id < last)
                && (scan.tail_error.is_some() || expected.is_some_and(|e| e > readable + lost));
            let mut absent = 0;
            if short {
                let exact = expected.is_some();
                absent = match expected {
                    Some(e) => e.saturating_sub(readable + lost),
                    // At least the record cut off, when its header says.
                    None => scan.tail_spans.unwrap_or(0),
                };
                if !exact {
                    uncounted_loss += 1;
                }
                tracing::error!(
                    exporter = %settings.exporter,
                    segment = %path.display(),
                    held_spans = ?expected,
                    readable_spans = readable,
                    lost_spans = absent,
                    exact,
                    missing_bytes = data.len().saturating_sub(scan.valid_len),
                    error = ?scan.tail_error,
                    "spool: a finished segment holds fewer spans than were written to it (truncated or damaged, not a torn write): the lost spans are counted dropped, reason corrupt{}",
                    if exact { "" } else { "; how many it held is not recorded, so the count is a lower bound and the accounting cannot balance" }
                );
                metrics.spool_corrupt_records.get_or_create(&labels).inc();
                lost += absent;
                if let Some(valid) = scan.tail_error.as_ref().map(|_| scan.valid_len) {
                    let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io)?;
                    f.set_len(valid as u64).map_err(io)?;
                    f.sync_all().map_err(io)?;
                }
            } else if let Some(err) = &scan.tail_error {
                tracing::warn!(
                    exporter = %settings.exporter,
                    segment = %path.display(),
                    kept_records = scan.records.len(),
                    truncated_bytes = data.len().saturating_sub(scan.valid_len),
                    error = %err,
                    "spool: torn or corrupt tail truncated; intact records kept"
                );
                metrics.spool_corrupt_records.get_or_create(&labels).inc();
                let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io)?;
                f.set_len(scan.valid_len as u64).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            if scan.lost.iter().any(|l| l.spans.is_none()) && expected.is_none() {
                uncounted_loss += 1;
            }
            for l in &scan.lost {
                tracing::error!(
                    exporter = %settings.exporter,
                    segment = %path.display(),
                    offset = l.offset,
                    bytes = l.len,
                    spans = ?l.spans,
                    error = %l.error,
                    "spool: damaged record skipped (spans counted dropped, reason corrupt); the records after it are kept"
                );
                metrics.spool_corrupt_records.get_or_create(&labels).inc();
            }
            let (Some(format), false) = (scan.format, scan.records.is_empty()) else {
                // Nothing readable: the spans it held (if any) are counted, the file goes.
                recovered += lost;
                lost_at_start += lost;
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let file = File::open(&path).map_err(io)?;
            let spans: u64 = readable + lost;
            recovered += spans;
            lost_at_start += lost;
            used += scan.valid_len as u64;
            let mut seg = Segment::new(Arc::new(file), format);
            seg.bytes = scan.valid_len as u64;
            seg.records = scan.records.len() as u64;
            seg.spans = spans;
            seg.lost_spans = lost;
            seg.absent = absent;
            seg.sealed = true;
            seg.checked_until = scan.valid_len as u64;
            state.segments.insert(id, seg);
        }
        state.read_seg = state.segments.keys().next().copied().unwrap_or(next_id);
        if recovered > 0 {
            tracing::info!(
                exporter = %settings.exporter,
                segments = state.segments.len(),
                spans = recovered,
                lost_spans = lost_at_start,
                segments_with_uncounted_loss = uncounted_loss,
                bytes = used,
                "spool: recovered undelivered spans; delivering them first"
            );
        }
        let shared = Arc::new(Shared {
            lock: Mutex::new(lock),
            settings,
            metrics,
            state: Mutex::new(state),
            changed: Condvar::new(),
            used: AtomicU64::new(used),
            closed: AtomicBool::new(false),
            disk_full_until: Mutex::new(None),
            recovered_spans: AtomicU64::new(recovered),
            dir_identity: Mutex::new((dir_meta.dev(), dir_meta.ino())),
            health: Mutex::new(None),
            unready: AtomicBool::new(false),
            uncounted_loss: AtomicU64::new(uncounted_loss),
        });
        shared.count_corrupt(lost_at_start);
        shared.update_gauges(&shared.state.lock_unpoisoned());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("spool-writer".into())
                .spawn(move || {
                    let mut writer = Writer {
                        shared,
                        rx,
                        next_id,
                        file: None,
                        full_check: Instant::now(),
                    };
                    // A panic costs the group being written (not acknowledged: its clients
                    // retry); the writer goes on with the next one.
                    let (shared, instance) = (
                        writer.shared.clone(),
                        format!("spool {} writer", writer.shared.settings.exporter),
                    );
                    crate::supervise::supervise_thread(
                        "spool_writer",
                        &instance,
                        &shared.metrics,
                        &|| shared.health(),
                        || writer.run(),
                    );
                    writer.seal();
                })
                .map_err(io)?
        };
        Ok(Arc::new(Spool {
            shared,
            tx,
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(None),
        }))
    }

    /// Reports on `health` (/readyz) while the spool cannot write.
    pub(crate) fn attach_health(&self, health: Arc<Health>) {
        if self.shared.unready.load(Ordering::Acquire) {
            health.set_unready(&self.shared.component(), Some("spool cannot write".into()));
        }
        *self.shared.health.lock_unpoisoned() = Some(health);
    }

    /// Segments found damaged at start whose lost spans could not all be counted.
    pub(crate) fn segments_with_uncounted_loss(&self) -> u64 {
        self.shared.uncounted_loss.load(Ordering::Relaxed)
    }

    /// Spans found on disk at start.
    pub(crate) fn recovered_spans(&self) -> u64 {
        self.shared.recovered_spans.load(Ordering::Relaxed)
    }

    /// Spans on disk not yet delivered nor counted lost (what the next start will send).
    pub(crate) fn pending_spans(&self) -> u64 {
        let st = self.shared.state.lock_unpoisoned();
        st.segments
            .values()
            .map(|s| s.spans.saturating_sub(s.released + s.lost_spans))
            .sum()
    }

    /// Reserves room for `bytes` of frames, or says why not.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<SpoolPermit<'_>, Refusal> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(Refusal::ShuttingDown);
        }
        if let Some(until) = *shared.disk_full_until.lock_unpoisoned()
            && Instant::now() < until
        {
            return Err(Refusal::DiskFull);
        }
        let max = shared.settings.max_bytes;
        let mut current = shared.used.load(Ordering::Acquire);
        loop {
            // An empty spool takes any one request, so an oversized one is not refused forever.
            if current > 0 && current + bytes > max {
                if shared.settings.drop_oldest && shared.drop_oldest(bytes) {
                    current = shared.used.load(Ordering::Acquire);
                    continue;
                }
                return Err(Refusal::SpoolFull);
            }
            match shared
                .used
                .compare_exchange_weak(current, current + bytes, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        let permit = match self.tx.try_reserve() {
            Ok(p) => p,
            Err(e) => {
                shared.used.fetch_sub(bytes, Ordering::AcqRel);
                return Err(match e {
                    mpsc::error::TrySendError::Full(()) => Refusal::QueueFull,
                    mpsc::error::TrySendError::Closed(()) => Refusal::ShuttingDown,
                });
            }
        };
        Ok(SpoolPermit {
            spool: self,
            permit: Some(permit),
            bytes,
        })
    }

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

    /// Spans read from `segment` were delivered (or dead-lettered): they need not be kept.
    pub(crate) fn release(&self, segment: u64, spans: usize) {
        let mut st = self.shared.state.lock_unpoisoned();
        if let Some(seg) = st.segments.get_mut(&segment) {
            seg.outstanding = seg.outstanding.saturating_sub(spans as u64);
            seg.released += spans as u64;
            self.shared.try_delete(&mut st, segment);
        }
    }

    /// Stops taking requests, lets the writer commit everything already admitted, then stops
    /// the reader. Blocking: call from a blocking context.
    pub(crate) fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.tx.blocking_send(WriteMsg::Stop);
        if let Some(w) = self.writer.lock_unpoisoned().take() {
            let _ = w.join();
        }
        self.shared.state.lock_unpoisoned().stop_reader = true;
        self.shared.changed.notify_all();
        // The reader may be blocked handing a batch to the stage; the stage's close ends that.
    }

    /// Waits for the reader thread (after the stage stopped taking its batches).
    pub(crate) fn join_reader(&self) {
        if let Some(r) = self.reader.lock_unpoisoned().take() {
            let _ = r.join();
        }
    }
}

/// The segment being appended to.
struct OpenSegment {
    id: u64,
    file: Arc<File>,
    /// Committed length.
    len: u64,
    seed: u32,
    /// Spans committed to it (the next frame's `before`).
    spans: u64,
}

struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<WriteMsg>,
    next_id: u64,
    file: Option<OpenSegment>,
    /// When every tracked segment's link count was last checked (not only the open one's).
    full_check: Instant,
}

/// The first bytes of a file, up to a file header; None when it cannot be read.
fn read_head(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(frame::FILE_HEADER);
    File::open(path)
        .ok()?
        .take(frame::FILE_HEADER as u64)
        .read_to_end(&mut head)
        .ok()?;
    Some(head)
}

fn invalid(e: frame::FrameError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Copies `bytes` of a segment from a descriptor into `dir` (via a temporary name, so a crash
/// never leaves a half copy under a segment's name); returns the copy, open for appending.
fn copy_segment(src: &File, bytes: u64, dir: &Path, id: u64, fsync: bool) -> std::io::Result<File> {
    let tmp = temporary_path(dir, id);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)?;
    let mut buf = vec![0u8; (1 << 20).min(bytes as usize)];
    let mut off = 0;
    while off < bytes {
        let n = ((bytes - off) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off)?;
        out.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    if fsync {
        out.sync_all()?;
    }
    std::fs::rename(&tmp, segment_path(dir, id))?;
    Ok(out)
}

impl Writer {
    fn run(&mut self) {
        // A timer-only runtime: when idle for WATCH_INTERVAL the writer checks that the
        // directory is still there, so a deletion is repaired even without traffic.
        let timer = tokio::runtime::Builder::new_current_thread().enable_time().build();
        if let Err(e) = &timer {
            tracing::error!(exporter = %self.shared.settings.exporter, error = %e, "spool writer: no timer; the directory is checked at writes only");
        }
        let mut stop = false;
        while !stop {
            let first = match &timer {
                // The timer is made inside the runtime (block_on), where its driver is.
                Ok(rt) => match rt.block_on(async { tokio::time::timeout(WATCH_INTERVAL, self.rx.recv()).await }) {
                    Ok(msg) => msg,
                    Err(_) => {
                        self.watch();
                        continue;
                    }
                },
                Err(_) => self.rx.blocking_recv(),
            };
            let Some(first) = first else { break };
            let mut group = Vec::new();
            match first {
                WriteMsg::Write(w) => group.push(w),
                WriteMsg::Stop => break,
            }
            // Group commit: everything that queued up while the last fsync ran shares this one.
            while group.len() < WRITE_QUEUE {
                match self.rx.try_recv() {
                    Ok(WriteMsg::Write(w)) => group.push(w),
                    Ok(WriteMsg::Stop) => {
                        stop = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            crate::supervise::fault_point("spool_writer");
            self.commit(group);
        }
    }

    /// Whether the directory was deleted or replaced, or the open segment unlinked; with
    /// `all`, or once every WATCH_INTERVAL, whether any tracked segment was (a single segment
    /// file deleted by hand).
    fn vanished(&mut self, all: bool) -> bool {
        let dir_gone = match std::fs::metadata(&self.shared.settings.dir) {
            Ok(m) => (m.dev(), m.ino()) != *self.shared.dir_identity.lock_unpoisoned(),
            Err(_) => true,
        };
        let unlinked = |f: &File| f.metadata().map_or(true, |m| m.nlink() == 0);
        if dir_gone || self.file.as_ref().is_some_and(|o| unlinked(&o.file)) {
            return true;
        }
        if !all && self.full_check.elapsed() < WATCH_INTERVAL {
            return false;
        }
        self.full_check = Instant::now();
        let files: Vec<Arc<File>> = {
            let st = self.shared.state.lock_unpoisoned();
            st.segments.values().map(|s| s.file.clone()).collect()
        };
        files.iter().any(|f| unlinked(f))
    }

    /// The idle check.
    fn watch(&mut self) {
        if !self.vanished(true) {
            return;
        }
        match self.relocate() {
            Ok(()) => {
                *self.shared.disk_full_until.lock_unpoisoned() = None;
                self.shared.set_unready(None);
            }
            Err(e) => self.refuse_for_a_while(&e),
        }
    }

    /// Requests are refused (503 disk_full) for DISK_FULL_BACKOFF, then writes are tried again.
    fn refuse_for_a_while(&self, e: &std::io::Error) {
        let shared = &self.shared;
        let mut until = shared.disk_full_until.lock_unpoisoned();
        if until.is_none() {
            tracing::error!(exporter = %shared.settings.exporter, dir = %shared.settings.dir.display(), error = %e, "spool write failed; refusing requests until writes succeed again");
        }
        *until = Some(Instant::now() + DISK_FULL_BACKOFF);
        drop(until);
        shared.set_unready(Some(format!(
            "cannot write the spool directory {}: {e}",
            shared.settings.dir.display()
        )));
    }

    /// The directory was deleted or replaced under us: recreate it, take its lock, and copy
    /// back every tracked segment its path no longer names, from the descriptor still held.
    /// Nothing acknowledged is lost, and what is acknowledged next is on a linked file.
    fn relocate(&mut self) -> std::io::Result<()> {
        let shared = self.shared.clone();
        let dir = &shared.settings.dir;
        std::fs::create_dir_all(dir)?;
        // The lock is taken again only when its file went with the directory (a segment file
        // deleted alone leaves our lock in place, and flock would refuse us a second one).
        let held = {
            let lock = shared.lock.lock_unpoisoned();
            let meta = lock.metadata()?;
            deadletter::same_file(&dir.join("lock"), (meta.dev(), meta.ino()))
        };
        let new_lock = if held {
            None
        } else {
            let lock = File::create(dir.join("lock"))?;
            match lock.try_lock() {
                Ok(()) => Some(lock),
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::other(
                        "the recreated directory is in use by another process",
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        };
        let open = self.file.as_ref().map(|o| (o.id, o.len));
        let tracked: Vec<(u64, Arc<File>, u64)> = {
            let st = shared.state.lock_unpoisoned();
            st.segments
                .iter()
                .map(|(&id, s)| {
                    let bytes = match open {
                        Some((open_id, len)) if open_id == id => len,
                        _ => s.bytes,
                    };
                    (id, s.file.clone(), bytes)
                })
                .collect()
        };
        let mut copied = 0;
        for (id, file, bytes) in tracked {
            let meta = file.metadata()?;
            if deadletter::same_file(&segment_path(dir, id), (meta.dev(), meta.ino())) {
                continue;
            }
            let copy = Arc::new(copy_segment(&file, bytes, dir, id, shared.settings.fsync)?);
            {
                let mut st = shared.state.lock_unpoisoned();
                match st.segments.get_mut(&id) {
                    Some(seg) => seg.file = copy.clone(),
                    None => {
                        // Delivered and forgotten while it was copied.
                        let _ = std::fs::remove_file(segment_path(dir, id));
                        continue;
                    }
                }
            }
            if let Some(o) = self.file.as_mut()
                && o.id == id
            {
                o.file = copy;
            }
            copied += 1;
        }
        // The copies' names, and the recreated directory's own name in its parent, durable.
        File::open(dir)?.sync_all()?;
        if let Some(parent) = dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        let meta = std::fs::metadata(dir)?;
        *shared.dir_identity.lock_unpoisoned() = (meta.dev(), meta.ino());
        let recreated = new_lock.is_some();
        if let Some(lock) = new_lock {
            *shared.lock.lock_unpoisoned() = lock;
        }
        // Nothing to say when the only "unlinked" segment was one just delivered and deleted.
        if !recreated && copied == 0 {
            return Ok(());
        }
        tracing::warn!(exporter = %shared.settings.exporter, dir = %dir.display(), segments = copied, "spool directory was deleted or replaced: recreated, undelivered segments copied back from open descriptors");
        Ok(())
    }

    fn seal(&mut self) {
        if let Some(open) = self.file.take() {
            // Only committed bytes stay: a write that failed or panicked part-way may have left
            // some after them, which a later start would take for damage in a finished segment.
            if open.file.metadata().is_ok_and(|m| m.len() > open.len) {
                let _ = open.file.set_len(open.len);
            }
            let mut st = self.shared.state.lock_unpoisoned();
            if let Some(seg) = st.segments.get_mut(&open.id) {
                seg.sealed = true;
            }
            self.shared.try_delete(&mut st, open.id);
            drop(st);
            self.shared.changed.notify_all();
        }
    }

    fn open_segment(&mut self) -> std::io::Result<()> {
        match self.create_segment() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || self.vanished(true) => {
                self.relocate()?;
                self.create_segment()
            }
            other => other,
        }
    }

    fn create_segment(&mut self) -> std::io::Result<()> {
        let id = self.next_id;
        let dir = &self.shared.settings.dir;
        let path = segment_path(dir, id);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let seed: u32 = rand::random();
        // The segment before this one is finished: what it holds goes in this one's header.
        let previous = id.checked_sub(1).and_then(|p| {
            let st = self.shared.state.lock_unpoisoned();
            st.segments.get(&p).map(|seg| seg.spans.saturating_sub(seg.absent))
        });
        let header = frame::segment_header(seed, previous);
        let written = file.write_all_at(&header, 0).and_then(|()| {
            if self.shared.settings.fsync {
                file.sync_data()?;
                File::open(dir)?.sync_all()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.next_id += 1;
        let file = Arc::new(file);
        let len = frame::FILE_HEADER as u64;
        self.shared.used.fetch_add(len, Ordering::AcqRel);
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .segments
            .insert(id, Segment::new(file.clone(), Format::V2 { seed }));
        self.file = Some(OpenSegment {
            id,
            file,
            len,
            seed,
            spans: 0,
        });
        Ok(())
    }

    fn commit(&mut self, group: Vec<WriteRequest>) {
        let total: u64 = group.iter().map(|w| w.frames.len() as u64).sum();
        let result = self.write(&group, total);
        let shared = self.shared.clone();
        match result {
            Ok((id, spans)) => {
                {
                    let mut st = shared.state.lock_unpoisoned();
                    if let Some(seg) = st.segments.get_mut(&id) {
                        seg.bytes += total;
                        seg.records += group.iter().map(|w| w.records as u64).sum::<u64>();
                        seg.spans += spans;
                    }
                    shared.update_gauges(&st);
                }
                shared.changed.notify_all();
                *shared.disk_full_until.lock_unpoisoned() = None;
                shared.set_unready(None);
                for w in group {
                    let _ = w.done.send(Ok(()));
                }
            }
            Err(e) => {
                // Start the next write in a fresh segment, so this one (its committed part)
                // can be deleted once delivered: that is how a full disk gets space back.
                if self.file.as_ref().is_some_and(|o| o.len > frame::FILE_HEADER as u64) {
                    self.seal();
                }
                shared.used.fetch_sub(total, Ordering::AcqRel);
                self.refuse_for_a_while(&e);
                for w in group {
                    let _ = w.done.send(Err(Refusal::DiskFull));
                }
            }
        }
    }

    /// Appends the group to the current segment (rotating first when it would overflow), makes
    /// it durable, and checks it is on a linked file (else relocates first): only then may it
    /// be acknowledged. On failure the segment is cut back to its last commit. Returns the
    /// segment and the spans written.
    fn write(&mut self, group: &[WriteRequest], total: u64) -> std::io::Result<(u64, u64)> {
        if self
            .file
            .as_ref()
            .is_some_and(|o| o.len > frame::FILE_HEADER as u64 && o.len + total > self.shared.settings.segment_bytes)
        {
            self.seal();
        }
        if self.file.is_none() {
            // A segment roll: the moment to look at every segment, not only the open one.
            if self.vanished(true) {
                self.relocate()?;
            }
            self.open_segment()?;
        }
        let fsync = self.shared.settings.fsync;
        let Some(open) = self.file.as_mut() else {
            return Err(std::io::Error::other("no open segment"));
        };
        let mut buf = Vec::with_capacity(total as usize);
        for w in group {
            buf.extend_from_slice(&w.frames);
        }
        let spans = frame::restamp(&mut buf, open.seed, open.spans).map_err(invalid)?;
        debug_assert_eq!(spans, group.iter().map(|w| w.spans as u64).sum::<u64>());
        let written = open
            .file
            .write_all_at(&buf, open.len)
            .and_then(|()| if fsync { open.file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            let _ = open.file.set_len(open.len);
            return Err(e);
        }
        let (id, before) = (open.id, open.len);
        open.len += total;
        open.spans += spans;
        if self.vanished(false)
            && let Err(e) = self.relocate()
        {
            if let Some(open) = self.file.as_mut() {
                open.len = before;
                open.spans -= spans;
                let _ = open.file.set_len(before);
            }
            return Err(e);
        }
        Ok((id, spans))
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

/// A spooled record back as a pipeline item (no memory charge: the disk holds it).
pub fn record_to_routed(record: proto::Record, segment: Option<u64>) -> Routed {
    let experiment = (!record.experiment.is_empty()).then(|| Arc::<str>::from(record.experiment.as_str()));
    Routed {
        destination: Destination { experiment },
        item: Item {
            chunk: ResourceChunk {
                bytes: Bytes::from(record.payload),
                spans: record.spans as usize,
                experiment: None,
            },
            charge: None,
            origin: segment,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ExporterReasonLabels;

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
                },
                item: Item {
                    chunk: ResourceChunk {
                        bytes: Bytes::from(vec![i as u8; 1000]),
                        spans: 10,
                        experiment: None,
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
}
