//! `otlp-relay replay --from DIR --config FILE`: sends the records of a dead-letter (or spool)
//! directory again through the config's exporter, once an operator has fixed what made the
//! destination refuse them. Delivered files are renamed `*.replayed`; records refused again are
//! written back to DIR as a new file, so nothing is lost and nothing is sent twice by a rerun.
//!
//! Safe while the relay runs: a file is taken under its flock and renamed `*.replaying` before
//! it is read, and the relay never appends to a file it cannot lock or whose name changed (see
//! `deadletter`). A `*.replaying` file left by a replay that stopped midway is taken again.
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::deadletter::{DeadLetter, same_file};
use super::{frame, proto, record_to_routed};
use crate::batch::Batch;
use crate::pipeline::item::{Destination, Item};

#[derive(Debug, Default, PartialEq)]
pub(crate) struct Totals {
    pub(crate) records: u64,
    pub(crate) spans: u64,
    pub(crate) failed_records: u64,
    pub(crate) failed_spans: u64,
    /// Files another process held (a relay appending for longer than LOCK_WAIT, or another
    /// replay): left for the next run.
    pub(crate) skipped_files: u64,
}

/// How long to wait for a file's lock: the relay holds it only while it appends one record.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Record files (`*.seg`, and `*.replaying` a stopped replay left) in `dir` and in its
/// immediate subdirectories.
fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.insert(0, dir.to_path_buf());
    let mut out = Vec::new();
    for d in dirs {
        let mut here: Vec<(u64, PathBuf)> = std::fs::read_dir(&d)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == super::SEGMENT_SUFFIX || e == "replaying")
            })
            .filter_map(|p| {
                let id = p.file_stem()?.to_str()?.parse().ok()?;
                Some((id, p))
            })
            .collect();
        here.sort();
        out.extend(here.into_iter().map(|(_, p)| p));
    }
    Ok(out)
}

/// Takes a file for replay: its lock (held until the returned file is dropped), then renames it
/// `*.replaying`. None when another process has it (or took it since it was listed).
fn take(path: &Path) -> anyhow::Result<Option<(File, PathBuf)>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let meta = file.metadata().with_context(|| format!("reading {}", path.display()))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!(
                    "otlp-relay replay: {} is in use; skipped (run replay again)",
                    path.display()
                );
                return Ok(None);
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
    }
    if !same_file(path, (meta.dev(), meta.ino())) {
        return Ok(None);
    }
    let replaying = path.with_extension("replaying");
    if path != replaying {
        std::fs::rename(path, &replaying).with_context(|| format!("renaming {}", path.display()))?;
    }
    Ok(Some((file, replaying)))
}

/// Where replayed records go: `otlp-relay replay` sends them through a config's exporter.
pub(crate) trait Resend {
    /// Err: `exporter` cannot be used at all, which stops the replay; Ok(Err(why)): the
    /// destination refused the batch again.
    async fn resend(&self, exporter: &str, batch: Batch<Destination, Item>) -> anyhow::Result<Result<(), String>>;
}

/// Replays every record file under `from`, each record through `exporter` (or the one it names).
pub(crate) async fn run(from: &Path, exporter: Option<&str>, resend: &impl Resend) -> anyhow::Result<Totals> {
    let paths = files(from).with_context(|| format!("reading {}", from.display()))?;
    if paths.is_empty() {
        bail!("no record files (*.seg) in {}", from.display());
    }
    let mut totals = Totals::default();
    for listed in paths {
        let Some((mut file, path)) = take(&listed)? else {
            if listed.exists() {
                totals.skipped_files += 1;
            }
            continue;
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .with_context(|| format!("reading {}", path.display()))?;
        let scan = frame::scan(&data);
        if let Some(e) = &scan.tail_error {
            tracing::warn!(file = %path.display(), error = %e, kept = scan.records.len(), "torn tail ignored");
        }
        for lost in &scan.lost {
            tracing::error!(file = %path.display(), offset = lost.offset, bytes = lost.len, spans = ?lost.spans, error = %lost.error, "damaged record skipped; the records after it are replayed");
        }
        let mut refused = Vec::new();
        for mut record in scan.records {
            let id = exporter.map_or_else(|| record.exporter.clone(), str::to_string);
            if id.is_empty() {
                bail!("{}: a record names no exporter; pass --exporter", path.display());
            }
            let spans = record.spans as u64;
            match resend.resend(&id, to_batch(&record)).await? {
                Ok(()) => {
                    totals.records += 1;
                    totals.spans += spans;
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), exporter = %id, spans, error = %e, "refused again");
                    totals.failed_records += 1;
                    totals.failed_spans += spans;
                    record.attempts += 1;
                    record.error = e;
                    record.exporter = id;
                    refused.push(record);
                }
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        if !refused.is_empty() {
            let dl = DeadLetter::new(dir.to_path_buf(), true);
            for r in &refused {
                dl.write(r)
                    .with_context(|| format!("writing back to {}", dir.display()))?;
            }
        }
        let done = path.with_extension("replayed");
        std::fs::rename(&path, &done).with_context(|| format!("renaming {}", path.display()))?;
        drop(file);
    }
    Ok(totals)
}

/// One record as the batch it was when it was spooled.
fn to_batch(record: &proto::Record) -> Batch<Destination, Item> {
    let routed = record_to_routed(record.clone(), None);
    Batch {
        key: routed.destination,
        items: vec![routed.item],
        spans: record.spans as usize,
    }
}
