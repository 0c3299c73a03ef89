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
mod files;
pub mod frame;
mod open;
mod reader;
pub(crate) mod replay;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};

use crate::pipeline::item::{Charge, Destination, Item, Refusal, Routed};
use crate::pipeline::wire::ResourceChunk;
use crate::supervise::LockUnpoisoned;
use crate::telemetry::{Health, Metrics};
pub(crate) use files::list_segments;
use files::segment_path;
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
    pub(crate) exporter: String,
    pub(crate) dir: PathBuf,
    pub(crate) fsync: bool,
    pub(crate) max_bytes: u64,
    pub(crate) segment_bytes: u64,
    pub(crate) drop_oldest: bool,
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
        // The payload is framed from the chunk's bytes, not copied into the Record first.
        let record = proto::Record {
            spans: r.item.chunk.spans as u32,
            experiment: r.destination.experiment.as_deref().unwrap_or("").to_string(),
            run: r.destination.run.as_deref().unwrap_or("").to_string(),
            workspace: r.destination.workspace.as_deref().unwrap_or("").to_string(),
            enqueue_time_unix_nano: now,
            ..Default::default()
        };
        frame::encode_with_payload(&r.item.chunk.bytes, &record, 0, 0, &mut out);
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
    /// `otlp_relay_spool_bytes` and `_records` of this exporter, registered once at open.
    bytes_gauge: Gauge,
    records_gauge: Gauge,
}

impl Shared {
    fn update_gauges(&self, st: &State) {
        let bytes: u64 = st.segments.values().map(|s| s.bytes).sum();
        let records: u64 = st.segments.values().map(|s| s.records).sum();
        self.bytes_gauge.set(bytes as i64);
        self.records_gauge.set(records as i64);
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

/// A spooled record back as a pipeline item (no memory charge: the disk holds it).
pub fn record_to_routed(record: proto::Record, segment: Option<u64>) -> Routed {
    let text = |s: &str| (!s.is_empty()).then(|| Arc::<str>::from(s));
    Routed {
        destination: Destination {
            experiment: text(&record.experiment),
            experiment_name: None,
            run: text(&record.run),
            workspace: text(&record.workspace),
        },
        item: Item {
            chunk: ResourceChunk {
                bytes: Bytes::from(record.payload),
                spans: record.spans as usize,
                experiment: None,
                names: None,
            },
            charge: None,
            origin: segment,
        },
    }
}
