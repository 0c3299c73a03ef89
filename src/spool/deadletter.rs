//! The dead-letter directory: batches the destination refused for good (e.g. 400/422 from
//! MLflow) are kept in the spool's record format instead of being retried forever or dropped,
//! so `otlp-relay replay` can send them again once an operator has fixed the cause.
//!
//! Replay may run while the relay does. They share a file through flock: the relay holds the
//! lock only while it appends, and before each append checks (under the lock) that its path
//! still names its file; replay takes the lock, renames the file away and reads it. An append
//! therefore never lands in a file replay has taken: the relay starts a new file instead.
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{SEGMENT_SUFFIX, frame, proto};
use crate::supervise::LockUnpoisoned;

/// Dead-letter files are closed at this size and a new one started.
const FILE_BYTES: u64 = 16 * 1024 * 1024;

pub(crate) struct DeadLetter {
    dir: PathBuf,
    fsync: bool,
    file: Mutex<Option<OpenFile>>,
}

/// The file being appended to.
struct OpenFile {
    path: PathBuf,
    file: File,
    len: u64,
    seed: u32,
    /// Spans in the file so far (each frame's `before`).
    spans: u64,
    /// (device, inode): the path still names this file only while these match.
    identity: (u64, u64),
}

/// Whether `path` still names the file `identity` was taken from.
pub(crate) fn same_file(path: &Path, identity: (u64, u64)) -> bool {
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == identity)
}

/// The next free numeric file id in `dir`, over every extension (`.seg`, `.replaying`,
/// `.replayed`), so a new file never takes the name of one replay renamed or will rename.
fn next_id(dir: &Path) -> std::io::Result<u64> {
    let mut max = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(id) = id {
            max = max.max(id);
        }
    }
    Ok(max + 1)
}

impl DeadLetter {
    pub(crate) fn new(dir: PathBuf, fsync: bool) -> DeadLetter {
        DeadLetter {
            dir,
            fsync,
            file: Mutex::new(None),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a new file (never one from an earlier run or one replay has taken).
    fn create(&self) -> std::io::Result<OpenFile> {
        std::fs::create_dir_all(&self.dir)?;
        let mut id = next_id(&self.dir)?;
        let (path, file) = loop {
            let path = self.dir.join(format!("{id:020}.{SEGMENT_SUFFIX}"));
            match std::fs::OpenOptions::new().create_new(true).write(true).open(&path) {
                Ok(f) => break (path, f),
                // A replay writing back its refusals took this id just now.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => id += 1,
                Err(e) => return Err(e),
            }
        };
        let seed: u32 = rand::random();
        let written = file
            .write_all_at(&frame::file_header(seed), 0)
            .and_then(|()| if self.fsync { file.sync_all() } else { Ok(()) })
            .and_then(|()| {
                if self.fsync {
                    File::open(&self.dir)?.sync_all()
                } else {
                    Ok(())
                }
            })
            .and_then(|()| file.metadata());
        match written {
            Ok(meta) => Ok(OpenFile {
                path,
                file,
                len: frame::FILE_HEADER as u64,
                seed,
                spans: 0,
                identity: (meta.dev(), meta.ino()),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Appends one record durably. Blocking I/O: call from a blocking context.
    pub(crate) fn write(&self, record: &proto::Record) -> std::io::Result<()> {
        let mut guard = self.file.lock_unpoisoned();
        // A few rounds at most: the current file (unless replay has it, or it is full), then a
        // fresh one (which a replay could take before the first append, however unlikely).
        for _ in 0..4 {
            let open = match guard.take() {
                Some(open) => open,
                None => self.create()?,
            };
            let mut buf = Vec::new();
            frame::encode(record, open.seed, open.spans, &mut buf);
            if open.len > frame::FILE_HEADER as u64 && open.len + buf.len() as u64 > FILE_BYTES {
                continue;
            }
            match open.file.try_lock() {
                Ok(()) => {}
                // Replay holds it: leave the file to it.
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
            if !same_file(&open.path, open.identity) {
                // Replay renamed it (and is done with it, or we would not hold the lock).
                let _ = open.file.unlock();
                continue;
            }
            let written = open
                .file
                .write_all_at(&buf, open.len)
                .and_then(|()| if self.fsync { open.file.sync_data() } else { Ok(()) });
            let mut open = open;
            let result = match written {
                Ok(()) => {
                    open.len += buf.len() as u64;
                    open.spans += u64::from(record.spans);
                    Ok(())
                }
                Err(e) => {
                    let _ = open.file.set_len(open.len);
                    Err(e)
                }
            };
            let _ = open.file.unlock();
            *guard = Some(open);
            return result;
        }
        Err(std::io::Error::other(
            "no dead-letter file could be appended to (replay keeps taking them)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::list_segments;

    fn rec(i: u8) -> proto::Record {
        proto::Record {
            payload: vec![i; 5],
            spans: 1,
            error: "HTTP 422".into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_append_and_scan_back() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path().join("dl"), true);
        for i in 0..3 {
            dl.write(&rec(i)).unwrap();
        }
        let files = list_segments(&dir.path().join("dl")).unwrap();
        assert_eq!(files.len(), 1);
        let scan = frame::scan(&std::fs::read(&files[0].1).unwrap());
        assert_eq!(scan.records.len(), 3);
        assert_eq!(scan.records[2].payload, vec![2; 5]);
        // A second writer (a restart) starts its own file.
        DeadLetter::new(dir.path().join("dl"), false)
            .write(&proto::Record::default())
            .unwrap();
        assert_eq!(list_segments(&dir.path().join("dl")).unwrap().len(), 2);
    }

    /// What replay does to a file (lock, rename) makes the relay move to a new file: no record
    /// lands in a file replay has taken, whether replay still holds it or is done.
    #[test]
    fn a_file_replay_took_is_never_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path().to_path_buf(), false);
        dl.write(&rec(1)).unwrap();
        let (_, first) = list_segments(dir.path()).unwrap().remove(0);
        // Replay: lock, rename, keep holding.
        let taken = File::open(&first).unwrap();
        taken.lock().unwrap();
        let replaying = first.with_extension("replaying");
        std::fs::rename(&first, &replaying).unwrap();
        dl.write(&rec(2)).unwrap();
        // Replay done: unlocked, renamed again.
        taken.unlock().unwrap();
        std::fs::rename(&replaying, first.with_extension("replayed")).unwrap();
        dl.write(&rec(3)).unwrap();
        let replayed = frame::scan(&std::fs::read(first.with_extension("replayed")).unwrap());
        assert_eq!(replayed.records, vec![rec(1)]);
        let rest: Vec<proto::Record> = list_segments(dir.path())
            .unwrap()
            .iter()
            .flat_map(|(_, p)| frame::scan(&std::fs::read(p).unwrap()).records)
            .collect();
        assert_eq!(rest, vec![rec(2), rec(3)]);
        // Ids are never reused while a renamed file holds one.
        assert!(list_segments(dir.path()).unwrap().iter().all(|(id, _)| *id > 1));
    }
}
