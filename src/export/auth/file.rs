//! A secret kept in a file that is replaced while the relay runs (a Kubernetes projected
//! service-account token, a mounted Secret): re-read only when its identity (inode, size, mtime)
//! changes, and that is looked at at most once per [`CHECK_INTERVAL`] (or right after the
//! destination answered 401), never a read per request. A missing, empty or unreadable file has
//! no value: callers then fail closed.
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::net::RateLimitedWarn;
use crate::supervise::LockUnpoisoned;
use crate::telemetry::{Health, Metrics, TokenResultLabels};

/// How stale a rotated file may be before it is noticed. Kubernetes renews projected tokens
/// well before they expire (at 80% of their lifetime), so a second is plenty.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A token or password is small; a bigger file is a wrong path, not a secret.
const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Why the file gives no value. Never holds the contents.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum FileProblem {
    #[error("cannot read {path}: {error}")]
    Unreadable { path: String, error: String },
    #[error("{path} is empty")]
    Empty { path: String },
    #[error("{path} is larger than {MAX_SECRET_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path} holds characters an HTTP header cannot carry (contents not shown)")]
    NotHeaderSafe { path: String },
}

/// What identifies one version of the file: a rename over it (Kubernetes swaps a symlink)
/// changes the inode, an in-place write the size or mtime.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &PathBuf) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

struct State {
    checked: Option<Instant>,
    stamp: Option<Stamp>,
    value: Result<Arc<str>, FileProblem>,
    /// Whether the value's state reached metrics and readiness (they are attached after `open`,
    /// and a state is reported once, not at every look).
    reported: bool,
    refused_log: RateLimitedWarn,
}

pub(crate) struct Observers {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
}

/// One watched secret file of extension `extension` (its config key is `key`).
pub(crate) struct WatchedFile {
    extension: String,
    key: &'static str,
    path: PathBuf,
    state: Mutex<State>,
    observers: Arc<OnceLock<Observers>>,
}

/// No Debug derive: the state holds the secret.
impl std::fmt::Debug for WatchedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedFile")
            .field("extension", &self.extension)
            .field("key", &self.key)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl WatchedFile {
    /// Reads the file once. With `required`, a file without a value is an error (a config
    /// error at start: `check` and `run` report it); otherwise exports wait for it.
    pub(crate) fn open(
        extension: &str,
        key: &'static str,
        path: &str,
        required: bool,
        observers: Arc<OnceLock<Observers>>,
    ) -> Result<WatchedFile, FileProblem> {
        let path = PathBuf::from(path);
        let stamp = stamp(&path).ok();
        let value = read(&path);
        if required && let Err(e) = &value {
            return Err(e.clone());
        }
        Ok(WatchedFile {
            extension: extension.to_string(),
            key,
            path,
            state: Mutex::new(State {
                checked: Some(Instant::now()),
                stamp,
                value,
                reported: false,
                refused_log: RateLimitedWarn::new(Duration::from_secs(60)),
            }),
            observers,
        })
    }

    /// The current contents (trimmed), re-read if the file changed since it was last looked at.
    /// The caller fails closed on Err: the export waits and is retried, it is never sent
    /// without the credential.
    pub(crate) fn current(&self) -> Result<Arc<str>, FileProblem> {
        let now = Instant::now();
        let mut st = self.state.lock_unpoisoned();
        if st.checked.is_none_or(|t| now.duration_since(t) >= CHECK_INTERVAL) {
            st.checked = Some(now);
            // A stat and, rarely, a read of a small local file: cheap enough to do inline.
            let new = stamp(&self.path).ok();
            if new.is_none() || new != st.stamp {
                st.stamp = new;
                self.reload(&mut st);
            }
        }
        if !st.reported {
            self.report(&mut st);
        }
        let State { value, refused_log, .. } = &mut *st;
        if let Err(problem) = value
            && let Some(suppressed) = refused_log.due()
        {
            tracing::error!(extension = %self.extension, key = self.key, error = %problem, suppressed,
                "no credential: exports wait and are retried, never sent without it (logged at most once a minute)");
        }
        st.value.clone()
    }

    /// Looks at the file again on the next use (the destination refused what we sent).
    pub(crate) fn recheck(&self) {
        self.state.lock_unpoisoned().checked = None;
    }

    fn reload(&self, st: &mut State) {
        let value = read(&self.path);
        let changed = match (&st.value, &value) {
            (Ok(old), Ok(new)) => old != new,
            (Err(old), Err(new)) => old != new,
            _ => true,
        };
        if changed {
            if value.is_ok() {
                tracing::info!(extension = %self.extension, key = self.key, file = %self.path.display(), "credential file changed: re-read");
            }
            st.value = value;
            st.reported = false;
        }
    }

    /// Each new state once to metrics and readiness (a failure is logged by `current`, which
    /// refuses the export, rate-limited).
    fn report(&self, st: &mut State) {
        let Some(o) = self.observers.get() else {
            return;
        };
        let reason = st.value.as_ref().err().map(FileProblem::to_string);
        let result = if reason.is_some() { "error" } else { "success" };
        o.health.set_unready(&self.extension, reason);
        o.metrics
            .token_requests
            .get_or_create(&TokenResultLabels {
                extension: self.extension.clone(),
                result: result.into(),
            })
            .inc();
        st.reported = true;
    }
}

fn read(path: &PathBuf) -> Result<Arc<str>, FileProblem> {
    let shown = path.display().to_string();
    let unreadable = |e: std::io::Error| FileProblem::Unreadable {
        path: shown.clone(),
        error: e.to_string(),
    };
    // Opening a FIFO would block until a writer comes (with the lock held): regular files only.
    if !std::fs::metadata(path).map_err(unreadable)?.is_file() {
        return Err(FileProblem::Unreadable {
            path: shown,
            error: "not a regular file".into(),
        });
    }
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(FileProblem::TooLarge { path: shown });
    }
    let text = String::from_utf8(bytes).map_err(|_| FileProblem::NotHeaderSafe { path: shown.clone() })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(FileProblem::Empty { path: shown });
    }
    if !crate::config::header_safe(value) {
        return Err(FileProblem::NotHeaderSafe { path: shown });
    }
    Ok(Arc::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(dir: &std::path::Path, required: bool) -> Result<WatchedFile, FileProblem> {
        let path = dir.join("token");
        WatchedFile::open(
            "bearertokenauth/t",
            "filename",
            path.to_str().unwrap_or_default(),
            required,
            Default::default(),
        )
    }

    #[test]
    fn missing_or_empty_fails_at_open_when_required() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(watched(dir.path(), true), Err(FileProblem::Unreadable { .. })));
        std::fs::create_dir(dir.path().join("token")).unwrap();
        let e = watched(dir.path(), true).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir(dir.path().join("token")).unwrap();
        std::fs::write(dir.path().join("token"), " \n").unwrap();
        assert!(matches!(watched(dir.path(), true), Err(FileProblem::Empty { .. })));
        std::fs::write(dir.path().join("token"), "a\u{1}b").unwrap();
        let e = watched(dir.path(), true).unwrap_err();
        assert!(matches!(e, FileProblem::NotHeaderSafe { .. }) && !e.to_string().contains("a\u{1}b"));
        std::fs::write(dir.path().join("token"), vec![b'a'; MAX_SECRET_BYTES as usize + 1]).unwrap();
        assert!(matches!(watched(dir.path(), true), Err(FileProblem::TooLarge { .. })));
    }

    #[test]
    fn rotation_is_seen_after_a_recheck_and_removal_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "one\n").unwrap();
        let w = watched(dir.path(), true).unwrap();
        assert_eq!(&*w.current().unwrap(), "one");
        // Replaced by a rename, as Kubernetes does: a new inode.
        let tmp = dir.path().join("token.new");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        // Within CHECK_INTERVAL the old value stands (no stat per request)...
        assert_eq!(&*w.current().unwrap(), "one");
        // ...a 401 makes the next use look again.
        w.recheck();
        assert_eq!(&*w.current().unwrap(), "two");
        std::fs::remove_file(&path).unwrap();
        w.recheck();
        assert!(matches!(w.current(), Err(FileProblem::Unreadable { .. })));
        std::fs::write(&path, "three").unwrap();
        w.recheck();
        assert_eq!(&*w.current().unwrap(), "three");
    }

    #[test]
    fn optional_file_may_be_missing_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let w = watched(dir.path(), false).unwrap();
        assert!(w.current().is_err());
        std::fs::write(dir.path().join("token"), "late").unwrap();
        w.recheck();
        assert_eq!(&*w.current().unwrap(), "late");
    }
}
