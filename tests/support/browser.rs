//! Headless Debian chromium driven by npm puppeteer-core (tests/browser/), installed on first use.
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{cache_dir, npm::npm_project};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Path of Debian's chromium, installing it with apt-get when missing (once, under a file lock).
pub fn chromium() -> PathBuf {
    let lock = std::fs::File::create(cache_dir().join("chromium-apt.lock")).unwrap();
    lock.lock().unwrap();
    if !Path::new(CHROMIUM).exists() {
        let ok = Command::new("apt-get")
            .arg("update")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "apt-get update failed (chromium is needed for the browser test)");
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-q", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "apt-get install chromium failed");
    }
    PathBuf::from(CHROMIUM)
}

/// Runs tests/browser/login.mjs: opens `url`, logs in at the provider's form, returns its RESULT JSON.
pub fn login(url: &str, user: &str, password: &str, screenshot: &Path, env: &[(&str, &str)]) -> serde_json::Value {
    let chromium = chromium();
    let dir = npm_project("browser");
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("node")
        .arg(dir.join("login.mjs"))
        .args([url, user, password])
        .arg(screenshot)
        .current_dir(&dir)
        .env("CHROMIUM", chromium)
        .env("USER_DATA_DIR", profile.path())
        .envs(env.iter().copied())
        .output()
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "no RESULT from login.mjs:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}
