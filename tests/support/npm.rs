//! npm projects kept in tests/<name>/ (package.json + package-lock.json + scripts), installed once with
//! `npm ci` into the test cache (node_modules never lives in the repository).
use std::path::PathBuf;
use std::process::Command;

use super::{cache_dir, repo_root};

/// Copies the files of `tests/<name>/` into `target/test-cache/npm-<name>/` and runs `npm ci` there when the
/// lock file changed since the last install. Returns that directory (run the scripts from there so their
/// imports resolve to its node_modules). Safe to call from parallel tests and test binaries (file lock).
pub fn npm_project(name: &str) -> PathBuf {
    let src = repo_root().join("tests").join(name);
    let dir = cache_dir().join(format!("npm-{name}"));
    let lock = std::fs::File::create(cache_dir().join(format!("npm-{name}.lock"))).unwrap();
    lock.lock().unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let entry = entry.unwrap();
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        let target = dir.join(entry.file_name());
        let new = std::fs::read(entry.path()).unwrap();
        if std::fs::read(&target).ok().as_deref() != Some(new.as_slice()) {
            std::fs::write(&target, &new).unwrap();
        }
    }
    let wanted = std::fs::read_to_string(src.join("package-lock.json")).expect("package-lock.json");
    let stamp = dir.join("node_modules/.installed-lock");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm (node.js) is required")
            .success();
        assert!(ok, "npm ci in {} failed", dir.display());
        std::fs::write(&stamp, &wanted).unwrap();
    }
    dir
}
