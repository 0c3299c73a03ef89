//! Segment files on disk: their names, the listing, the head of one, and the copy that puts
//! a segment back from its open descriptor.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{SEGMENT_SUFFIX, frame};

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_SUFFIX}"))
}

/// Where a segment is copied before it is renamed into place (never listed as a segment).
fn temporary_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{SEGMENT_SUFFIX}.tmp"))
}

/// Copies a crash left half made.
pub(super) fn remove_temporaries(dir: &Path) {
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

/// The first bytes of a file, up to a file header; None when it cannot be read.
pub(super) fn read_head(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(frame::FILE_HEADER);
    File::open(path)
        .ok()?
        .take(frame::FILE_HEADER as u64)
        .read_to_end(&mut head)
        .ok()?;
    Some(head)
}

/// Copies `bytes` of a segment from a descriptor into `dir` (via a temporary name, so a crash
/// never leaves a half copy under a segment's name); returns the copy, open for appending.
pub(super) fn copy_segment(src: &File, bytes: u64, dir: &Path, id: u64, fsync: bool) -> std::io::Result<File> {
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
