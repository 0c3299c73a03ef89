//! The dead-letter directory: batches the destination refused for good (e.g. 400/422 from
//! MLflow) are kept in the spool's record format instead of being retried forever or dropped,
//! so `otlp-relay replay` can send them again once an operator has fixed the cause.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{frame, list_segments, proto, segment_path};

/// Dead-letter files are closed at this size and a new one started.
const FILE_BYTES: u64 = 16 * 1024 * 1024;

pub struct DeadLetter {
    dir: PathBuf,
    fsync: bool,
    /// The file being appended to: id, file, length.
    file: Mutex<Option<(u64, File, u64)>>,
}

impl DeadLetter {
    pub fn new(dir: PathBuf, fsync: bool) -> DeadLetter {
        DeadLetter {
            dir,
            fsync,
            file: Mutex::new(None),
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Appends one record durably. Blocking I/O: call from a blocking context.
    pub fn write(&self, record: &proto::Record) -> std::io::Result<()> {
        let mut buf = Vec::new();
        frame::encode(record, &mut buf);
        let mut guard = self.file.lock().unwrap();
        if guard
            .as_ref()
            .is_some_and(|(_, _, len)| *len > 0 && *len + buf.len() as u64 > FILE_BYTES)
        {
            *guard = None;
        }
        if guard.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            // Never append to a file from an earlier run: replay may be reading or renaming it.
            let id = list_segments(&self.dir)?.last().map_or(1, |(id, _)| id + 1);
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(segment_path(&self.dir, id))?;
            if self.fsync {
                File::open(&self.dir)?.sync_all()?;
            }
            *guard = Some((id, file, 0));
        }
        let (_, file, len) = guard.as_mut().expect("opened above");
        match file
            .write_all_at(&buf, *len)
            .and_then(|()| if self.fsync { file.sync_data() } else { Ok(()) })
        {
            Ok(()) => {
                *len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = file.set_len(*len);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_append_and_scan_back() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path().join("dl"), true);
        for i in 0..3 {
            dl.write(&proto::Record {
                payload: vec![i; 5],
                spans: 1,
                error: "HTTP 422".into(),
                ..Default::default()
            })
            .unwrap();
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
}
