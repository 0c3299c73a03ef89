//! The disk spool behind an exporter's `sending_queue.storage`: accepted spans are appended to
//! segment files as CRC32C-framed records and acknowledged once a group commit (one fsync for
//! every request waiting) made them durable. A reader thread feeds the exporter's batcher from
//! disk, so memory holds only what is being sent; delivered spans release their segment, and a
//! segment is deleted once nothing in it is left to deliver. On start, surviving segments are
//! checked, a torn tail truncated, and their records delivered again (at least once).
pub mod deadletter;
pub mod frame;
pub mod replay;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::pipeline::wire::ResourceChunk;
use crate::pipeline::{Charge, Destination, Item, Refusal, Routed};
use crate::telemetry::{Metrics, exporter_labels};

/// The record envelope, generated from proto/spool.proto.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/otlp_relay.spool.v1.rs"));
}

const SEGMENT_SUFFIX: &str = "seg";
/// Requests waiting for the writer; beyond this the disk is the bottleneck and clients wait.
const WRITE_QUEUE: usize = 1024;
/// Payload bytes the reader hands to the batcher at once; bounds memory between disk and sender.
const READ_CHUNK: usize = 256 * 1024;
/// How long a failed write (e.g. a full disk) makes new requests refused before trying again.
const DISK_FULL_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct SpoolSettings {
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
    /// work in steps smaller than the whole spool.
    pub fn from_config(exporter: &str, cfg: &crate::config::FileStorageConfig) -> SpoolSettings {
        let max_bytes = cfg.max_size_mib * 1024 * 1024;
        SpoolSettings {
            exporter: exporter.to_string(),
            dir: Path::new(&cfg.directory).join(dir_name(exporter)),
            fsync: cfg.fsync,
            max_bytes,
            segment_bytes: (cfg.segment_size_mib * 1024 * 1024).min(max_bytes / 4).max(64 * 1024),
            drop_oldest: cfg.on_full == "drop_oldest",
        }
    }
}

/// A component id as a directory name (`otlphttp/mlflow` → `otlphttp_mlflow`).
pub fn dir_name(id: &str) -> String {
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
pub enum SpoolError {
    #[error("spool directory {dir}: {error}")]
    Io { dir: PathBuf, error: std::io::Error },
    #[error("spool directory {0} is in use by another process (two relays must not share a spool)")]
    InUse(PathBuf),
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_SUFFIX}"))
}

/// Segment files in `dir`, by id.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
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

pub fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Frames a request's routed chunks, one record per ResourceSpans.
pub fn encode_request(routed: &[Routed]) -> (Bytes, usize) {
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
        frame::encode(&record, &mut out);
    }
    (Bytes::from(out), routed.len())
}

#[derive(Debug, Default)]
struct Segment {
    /// Committed (durable, readable) bytes.
    bytes: u64,
    records: u64,
    spans: u64,
    /// Spans the reader has handed on.
    read_spans: u64,
    /// Spans handed on and not yet released.
    outstanding: u64,
    released: u64,
    /// The writer has moved on; nothing more is appended.
    sealed: bool,
}

#[derive(Debug, Default)]
struct State {
    segments: BTreeMap<u64, Segment>,
    read_seg: u64,
    read_off: u64,
    stop_reader: bool,
}

struct Shared {
    _lock: File,
    settings: SpoolSettings,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    changed: Condvar,
    /// Bytes on disk plus bytes admitted and waiting for the writer.
    used: AtomicU64,
    closed: AtomicBool,
    disk_full_until: Mutex<Option<Instant>>,
    recovered_spans: AtomicU64,
}

impl Shared {
    fn update_gauges(&self, st: &State) {
        let labels = exporter_labels(&self.settings.exporter);
        let bytes: u64 = st.segments.values().map(|s| s.bytes).sum();
        let records: u64 = st.segments.values().map(|s| s.records).sum();
        self.metrics.spool_bytes.get_or_create(&labels).set(bytes as i64);
        self.metrics.spool_records.get_or_create(&labels).set(records as i64);
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
        if let Err(e) = std::fs::remove_file(segment_path(&self.settings.dir, id)) {
            tracing::warn!(exporter = %self.settings.exporter, segment = id, error = %e, "cannot delete a delivered spool segment");
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.update_gauges(st);
    }

    /// on_full: drop_oldest: deletes the oldest sealed segments until `need` more bytes fit.
    /// Spans not yet read from them are lost, and counted.
    fn drop_oldest(&self, need: u64) -> bool {
        let mut st = self.state.lock().unwrap();
        loop {
            if self.used.load(Ordering::Acquire) + need <= self.settings.max_bytes {
                return true;
            }
            let Some((&id, _)) = st.segments.iter().find(|(_, s)| s.sealed) else {
                return false;
            };
            let seg = st.segments.remove(&id).expect("just found");
            let lost = seg.spans - seg.read_spans;
            if st.read_seg <= id {
                st.read_seg = id + 1;
                st.read_off = 0;
            }
            let _ = std::fs::remove_file(segment_path(&self.settings.dir, id));
            self.used.fetch_sub(seg.bytes, Ordering::AcqRel);
            self.metrics
                .count_dropped(&self.settings.exporter, "spool_full", lost as usize);
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
pub struct SpoolPermit<'a> {
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
    pub fn send(
        mut self,
        frames: Bytes,
        records: usize,
        spans: usize,
        charge: Option<Arc<Charge>>,
    ) -> oneshot::Receiver<Result<(), Refusal>> {
        let (done, rx) = oneshot::channel();
        // From here the writer owns the reserved bytes.
        self.bytes = 0;
        let permit = self.permit.take().expect("a permit is sent once");
        permit.send(WriteMsg::Write(WriteRequest {
            frames,
            records,
            spans,
            done,
            _charge: charge,
        }));
        rx
    }
}

impl Spool {
    /// Opens (creating) the spool directory, recovers what a previous run left, and starts the
    /// writer thread. The reader starts with `start_reader`.
    pub fn open(settings: SpoolSettings, metrics: Arc<Metrics>) -> Result<Arc<Spool>, SpoolError> {
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
        let labels = exporter_labels(&settings.exporter);
        let mut state = State::default();
        let mut used = 0;
        let mut recovered = 0;
        let mut next_id = 1;
        for (id, path) in list_segments(&settings.dir).map_err(io)? {
            next_id = id + 1;
            let data = std::fs::read(&path).map_err(io)?;
            let scan = frame::scan(&data);
            if let Some(err) = &scan.tail_error {
                tracing::warn!(
                    exporter = %settings.exporter,
                    segment = %path.display(),
                    kept_records = scan.records.len(),
                    truncated_bytes = data.len() - scan.valid_len,
                    error = %err,
                    "spool: torn or corrupt tail truncated; intact records kept"
                );
                metrics.spool_corrupt_records.get_or_create(&labels).inc();
                let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io)?;
                f.set_len(scan.valid_len as u64).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            if scan.records.is_empty() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let spans: u64 = scan.records.iter().map(|r| r.spans as u64).sum();
            recovered += spans;
            used += scan.valid_len as u64;
            state.segments.insert(
                id,
                Segment {
                    bytes: scan.valid_len as u64,
                    records: scan.records.len() as u64,
                    spans,
                    sealed: true,
                    ..Default::default()
                },
            );
        }
        state.read_seg = state.segments.keys().next().copied().unwrap_or(next_id);
        if recovered > 0 {
            tracing::info!(
                exporter = %settings.exporter,
                segments = state.segments.len(),
                spans = recovered,
                bytes = used,
                "spool: recovered undelivered spans; delivering them first"
            );
        }
        let shared = Arc::new(Shared {
            _lock: lock,
            settings,
            metrics,
            state: Mutex::new(state),
            changed: Condvar::new(),
            used: AtomicU64::new(used),
            closed: AtomicBool::new(false),
            disk_full_until: Mutex::new(None),
            recovered_spans: AtomicU64::new(recovered),
        });
        shared.update_gauges(&shared.state.lock().unwrap());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("spool-writer".into())
                .spawn(move || {
                    Writer {
                        shared,
                        rx,
                        next_id,
                        file: None,
                    }
                    .run()
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

    pub fn exporter(&self) -> &str {
        &self.shared.settings.exporter
    }

    /// Spans found on disk at start.
    pub fn recovered_spans(&self) -> u64 {
        self.shared.recovered_spans.load(Ordering::Relaxed)
    }

    /// Spans on disk not yet delivered (what the next start will send).
    pub fn pending_spans(&self) -> u64 {
        let st = self.shared.state.lock().unwrap();
        st.segments.values().map(|s| s.spans - s.released.min(s.spans)).sum()
    }

    /// Reserves room for `bytes` of frames, or says why not.
    pub fn reserve(&self, bytes: u64) -> Result<SpoolPermit<'_>, Refusal> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(Refusal::ShuttingDown);
        }
        if let Some(until) = *shared.disk_full_until.lock().unwrap()
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
    pub fn start_reader(&self, intake: mpsc::Sender<Arc<Vec<Routed>>>) {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("spool-reader".into())
            .spawn(move || Reader { shared, file: None }.run(intake))
            .expect("spawn spool reader");
        *self.reader.lock().unwrap() = Some(handle);
    }

    /// Spans read from `segment` were delivered (or dead-lettered): they need not be kept.
    pub fn release(&self, segment: u64, spans: usize) {
        let mut st = self.shared.state.lock().unwrap();
        if let Some(seg) = st.segments.get_mut(&segment) {
            seg.outstanding = seg.outstanding.saturating_sub(spans as u64);
            seg.released += spans as u64;
            self.shared.try_delete(&mut st, segment);
        }
    }

    /// Stops taking requests, lets the writer commit everything already admitted, then stops
    /// the reader. Blocking: call from a blocking context.
    pub fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.tx.blocking_send(WriteMsg::Stop);
        if let Some(w) = self.writer.lock().unwrap().take() {
            let _ = w.join();
        }
        self.shared.state.lock().unwrap().stop_reader = true;
        self.shared.changed.notify_all();
        // The reader may be blocked handing a batch to the stage; the stage's close ends that.
    }

    /// Waits for the reader thread (after the stage stopped taking its batches).
    pub fn join_reader(&self) {
        if let Some(r) = self.reader.lock().unwrap().take() {
            let _ = r.join();
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<WriteMsg>,
    next_id: u64,
    /// The segment being appended to: id, file, committed length.
    file: Option<(u64, File, u64)>,
}

impl Writer {
    fn run(mut self) {
        let mut stop = false;
        while !stop {
            let Some(first) = self.rx.blocking_recv() else { break };
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
            self.commit(group);
        }
        self.seal();
    }

    fn seal(&mut self) {
        if let Some((id, _, _)) = self.file.take() {
            let mut st = self.shared.state.lock().unwrap();
            if let Some(seg) = st.segments.get_mut(&id) {
                seg.sealed = true;
            }
            self.shared.try_delete(&mut st, id);
            drop(st);
            self.shared.changed.notify_all();
        }
    }

    fn open_segment(&mut self) -> std::io::Result<()> {
        let id = self.next_id;
        let dir = &self.shared.settings.dir;
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(segment_path(dir, id))?;
        if self.shared.settings.fsync {
            File::open(dir)?.sync_all()?;
        }
        self.next_id += 1;
        self.shared
            .state
            .lock()
            .unwrap()
            .segments
            .insert(id, Segment::default());
        self.file = Some((id, file, 0));
        Ok(())
    }

    fn commit(&mut self, group: Vec<WriteRequest>) {
        let total: u64 = group.iter().map(|w| w.frames.len() as u64).sum();
        let result = self.write(&group, total);
        let shared = &self.shared;
        match result {
            Ok(id) => {
                {
                    let mut st = shared.state.lock().unwrap();
                    let seg = st.segments.get_mut(&id).expect("open segment is tracked");
                    seg.bytes += total;
                    seg.records += group.iter().map(|w| w.records as u64).sum::<u64>();
                    seg.spans += group.iter().map(|w| w.spans as u64).sum::<u64>();
                    shared.update_gauges(&st);
                }
                shared.changed.notify_all();
                *shared.disk_full_until.lock().unwrap() = None;
                for w in group {
                    let _ = w.done.send(Ok(()));
                }
            }
            Err(e) => {
                // Start the next write in a fresh segment, so this one (its committed part)
                // can be deleted once delivered: that is how a full disk gets space back.
                if self.file.as_ref().is_some_and(|(_, _, len)| *len > 0) {
                    self.seal();
                }
                let shared = &self.shared;
                shared.used.fetch_sub(total, Ordering::AcqRel);
                let mut until = shared.disk_full_until.lock().unwrap();
                if until.is_none() {
                    tracing::error!(exporter = %shared.settings.exporter, dir = %shared.settings.dir.display(), error = %e, "spool write failed; refusing requests until writes succeed again");
                }
                *until = Some(Instant::now() + DISK_FULL_BACKOFF);
                drop(until);
                for w in group {
                    let _ = w.done.send(Err(Refusal::DiskFull));
                }
            }
        }
    }

    /// Appends the group to the current segment (rotating first when it would overflow) and
    /// makes it durable. On failure the segment is cut back to its last commit.
    fn write(&mut self, group: &[WriteRequest], total: u64) -> std::io::Result<u64> {
        if let Some((_, _, len)) = &self.file
            && *len > 0
            && *len + total > self.shared.settings.segment_bytes
        {
            self.seal();
        }
        if self.file.is_none() {
            self.open_segment()?;
        }
        let (id, file, len) = self.file.as_mut().expect("opened above");
        let mut buf = Vec::with_capacity(total as usize);
        for w in group {
            buf.extend_from_slice(&w.frames);
        }
        let written = file.write_all_at(&buf, *len).and_then(|()| {
            if self.shared.settings.fsync {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                *len += total;
                Ok(*id)
            }
            Err(e) => {
                let _ = file.set_len(*len);
                Err(e)
            }
        }
    }
}

struct Reader {
    shared: Arc<Shared>,
    file: Option<(u64, File)>,
}

impl Reader {
    fn run(mut self, intake: mpsc::Sender<Arc<Vec<Routed>>>) {
        loop {
            let Some((id, off, end)) = self.next_range() else {
                return;
            };
            let (routed, consumed, spans) = match self.read(id, off, end) {
                Ok(x) => x,
                Err(e) => {
                    // Only a disk failure or corruption under us gets here: skip the segment
                    // rather than loop on it; the next start's recovery will look again.
                    tracing::error!(exporter = %self.shared.settings.exporter, segment = id, offset = off, error = %e, "spool: cannot read a segment; skipping its rest");
                    let labels = exporter_labels(&self.shared.settings.exporter);
                    self.shared.metrics.spool_corrupt_records.get_or_create(&labels).inc();
                    let mut st = self.shared.state.lock().unwrap();
                    if st.read_seg == id {
                        st.read_off = end;
                    }
                    continue;
                }
            };
            {
                let mut st = self.shared.state.lock().unwrap();
                // drop_oldest may have removed the segment while we read it: then these spans
                // were counted dropped and must not travel.
                if st.read_seg != id || st.read_off != off {
                    continue;
                }
                st.read_off = off + consumed;
                let Some(seg) = st.segments.get_mut(&id) else { continue };
                seg.read_spans += spans;
                seg.outstanding += spans;
            }
            if intake.blocking_send(Arc::new(routed)).is_err() {
                return;
            }
        }
    }

    /// Waits for committed bytes past the read cursor; returns (segment, from, to).
    fn next_range(&mut self) -> Option<(u64, u64, u64)> {
        let mut st = self.shared.state.lock().unwrap();
        loop {
            if st.stop_reader {
                return None;
            }
            let id = st.read_seg;
            match st.segments.get(&id) {
                Some(seg) if st.read_off < seg.bytes => return Some((id, st.read_off, seg.bytes)),
                Some(seg) if seg.sealed => {
                    let next = st.segments.range(id + 1..).next().map(|(&k, _)| k);
                    match next {
                        Some(n) => {
                            st.read_seg = n;
                            st.read_off = 0;
                            self.shared.try_delete(&mut st, id);
                            continue;
                        }
                        None => {
                            // Past the last sealed segment: the writer's next one comes after.
                            st.read_seg = id + 1;
                            st.read_off = 0;
                            self.shared.try_delete(&mut st, id);
                            continue;
                        }
                    }
                }
                Some(_) => {}
                None => {
                    if let Some((&n, _)) = st.segments.range(id..).next() {
                        st.read_seg = n;
                        st.read_off = 0;
                        continue;
                    }
                }
            }
            // Let go of the file while idle: an open handle would keep a deleted segment's
            // space allocated, and freeing space is how a full disk recovers.
            self.file = None;
            st = self.shared.changed.wait(st).unwrap();
        }
    }

    /// Reads whole records from [off, end) of a segment, up to about READ_CHUNK payload bytes.
    fn read(&mut self, id: u64, off: u64, end: u64) -> std::io::Result<(Vec<Routed>, u64, u64)> {
        if self.file.as_ref().map(|(i, _)| *i) != Some(id) {
            let f = File::open(segment_path(&self.shared.settings.dir, id))?;
            self.file = Some((id, f));
        }
        let (_, file) = self.file.as_ref().expect("opened above");
        let want = (end - off).min(READ_CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        file.read_exact_at(&mut buf, off)?;
        let corrupt = |e: frame::FrameError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        let mut pos = 0usize;
        let mut routed = Vec::new();
        let mut spans = 0u64;
        while pos + frame::HEADER <= buf.len() {
            let len = frame::frame_len(buf[pos..pos + frame::HEADER].try_into().expect("8 bytes")).map_err(corrupt)?;
            let record = if pos + len <= buf.len() {
                frame::decode(&buf[pos..pos + len]).map_err(corrupt)?
            } else if pos == 0 {
                // One record larger than the read chunk: read it whole.
                let mut big = vec![0u8; len];
                file.read_exact_at(&mut big, off)?;
                frame::decode(&big).map_err(corrupt)?
            } else {
                break;
            };
            pos += len;
            spans += record.spans as u64;
            routed.push(record_to_routed(record, Some(id)));
        }
        if pos == 0 {
            // A header cut by the chunk boundary: read it on its own next time round.
            let mut head = [0u8; frame::HEADER];
            file.read_exact_at(&mut head, off)?;
            let len = frame::frame_len(&head).map_err(corrupt)?;
            let mut big = vec![0u8; len];
            file.read_exact_at(&mut big, off)?;
            let record = frame::decode(&big).map_err(corrupt)?;
            pos = len;
            spans += record.spans as u64;
            routed.push(record_to_routed(record, Some(id)));
        }
        Ok((routed, pos as u64, spans))
    }
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
        spool.start_reader(tx);
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
