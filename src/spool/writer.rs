//! The writer thread: group commits (one fsync for every request waiting), segment rotation,
//! and putting the directory back when it was deleted under the relay.
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

use super::files::{copy_segment, segment_path};
use super::frame::{self, Format};
use super::{DISK_FULL_BACKOFF, Segment, Shared, WATCH_INTERVAL, WRITE_QUEUE, WriteMsg, WriteRequest, deadletter};
use crate::pipeline::item::Refusal;
use crate::supervise::LockUnpoisoned;

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

/// Starts the writer thread, which appends from `rx` starting with segment `next_id`.
pub(super) fn spawn(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<WriteMsg>,
    next_id: u64,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("spool-writer".into()).spawn(move || {
        let mut writer = Writer {
            shared,
            rx,
            next_id,
            file: None,
            full_check: Instant::now(),
        };
        // A panic costs the group being written (not acknowledged: its clients retry); the
        // writer goes on with the next one.
        let (shared, instance) = (
            writer.shared.clone(),
            format!("spool {} writer", writer.shared.settings.exporter),
        );
        crate::supervise::supervise_thread("spool_writer", &instance, &shared.metrics, &|| shared.health(), || {
            writer.run()
        });
        writer.seal();
    })
}

fn invalid(e: frame::FrameError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
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
