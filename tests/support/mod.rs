//! Shared test harness: spawn our binary and real third-party processes, learn their bound
//! addresses from their logs, poll with deadlines, and install cached tool environments.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod browser;
pub mod config;
pub mod gate;
pub mod mlflow;
pub mod npm;
pub mod oidc;
pub mod otlp;
pub mod pki;

/// Path of the `otlp-relay` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_otlp-relay"))
}

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cache directory for installed tools (venvs, npm packages), kept between runs under target/.
pub fn cache_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("test-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How long a process may take to come up. Test binaries start many real servers at once
/// (mlflow, node's oidc-provider, chromium, relays) on two cores, and node took over 30 s to
/// print its ready line in CI that way. A deadline polled against, not a wait.
pub const STARTUP: Duration = Duration::from_secs(120);

/// Polls `probe` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A child process whose stderr and stdout lines are collected, killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (stream, tag) in [
            (Box::new(out) as Box<dyn std::io::Read + Send>, "out"),
            (Box::new(err), "err"),
        ] {
            let lines = lines.clone();
            let name = name.to_string();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("TEST_ECHO").is_some() {
                        eprintln!("[{name} {tag}] {line}");
                    }
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }));
        }
        Proc {
            name: name.to_string(),
            child,
            lines,
            readers,
        }
    }

    /// Our binary with the given arguments.
    pub fn relay(name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args).env("NO_COLOR", "1");
        Proc::spawn(name, cmd)
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn output_text(&self) -> String {
        self.output().join("\n")
    }

    /// Waits for a line containing `needle` and returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let what = format!("{}: a line containing {needle:?}", self.name);
        let lines = self.lines.clone();
        let child = &mut self.child;
        let name = self.name.clone();
        wait_for(&what, timeout, || {
            if let Ok(Some(status)) = child.try_wait() {
                let text = lines.lock().unwrap().join("\n");
                panic!("{name} exited with {status} before printing {needle:?}:\n{text}");
            }
            lines.lock().unwrap().iter().find(|l| l.contains(needle)).cloned()
        })
    }

    /// Like wait_line, for a shared reference (the process must stay alive).
    pub fn clone_wait_line(&self, needle: &str, timeout: Duration) -> String {
        let lines = self.lines.clone();
        wait_for(&format!("{}: a line containing {needle:?}", self.name), timeout, || {
            lines.lock().unwrap().iter().find(|l| l.contains(needle)).cloned()
        })
    }

    /// Our components log `listening component=NAME addr=IP:PORT` once bound; this returns the address.
    pub fn wait_listen(&mut self, component: &str, timeout: Duration) -> SocketAddr {
        let line = self.wait_line(&format!("component={component} "), timeout);
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr= in {line:?}"));
        addr.trim_matches('"').parse().unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = &mut self.child;
        let name = self.name.clone();
        let status = wait_for(&format!("{name} to exit"), timeout, || child.try_wait().unwrap());
        // Its last lines may still be in the pipes: let the readers reach end of file (bounded,
        // since a grandchild could keep a pipe open).
        let readers = &self.readers;
        let deadline = Instant::now() + Duration::from_secs(5);
        while readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        status.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- output of {} ----\n{}", self.name, self.output_text());
        }
    }
}

/// A free port below Linux's ephemeral range (32768+) for a provider that will be restarted: while
/// it is down, its port must not become the source port of some outgoing connection, which
/// would make the restart fail with EADDRINUSE (seen here once with a port from bind(0)).
pub fn restartable_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Distinct candidates for the tests of this process; the pid spreads concurrent processes.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((std::process::id() * 97 + n * 7_919) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A Python venv under the test cache with `packages` installed; created once, shared by tests
/// through a file lock. Returns the venv directory (python is `venv/bin/python`).
pub fn python_venv(name: &str, packages: &[&str]) -> PathBuf {
    let dir = cache_dir().join(format!("venv-{name}"));
    let stamp = dir.join(".installed");
    let wanted = packages.join(" ");
    let lock = std::fs::File::create(cache_dir().join(format!("venv-{name}.lock"))).unwrap();
    lock.lock().unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let ok = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "python3 -m venv failed");
        let ok = Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages)
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install {wanted} failed");
        std::fs::write(&stamp, &wanted).unwrap();
    }
    dir
}

/// A blocking HTTP/1.1 exchange over plain TCP (tests only): status, lower-cased response
/// headers (repeated ones joined by newlines) and the de-chunked body.
pub fn http_exchange(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    let (status, pairs, body) = http_exchange_pairs(method, addr, path, headers, body);
    let mut response_headers = std::collections::HashMap::new();
    for (k, v) in pairs {
        response_headers
            .entry(k)
            .and_modify(|e: &mut String| {
                e.push('\n');
                e.push_str(&v)
            })
            .or_insert(v);
    }
    (status, response_headers, body)
}

/// Like `http_exchange`, with the response headers in order (repeated ones repeated); a `host`
/// header is added unless `headers` has one.
pub fn http_exchange_pairs(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "no response head from {addr}{path}: {:?}",
            String::from_utf8_lossy(&raw)
        )
    });
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let pairs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if pairs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    (status, pairs, body)
}

/// A blocking HTTP/1.1 request; returns (status, body).
pub fn http(method: &str, addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    let (status, _, body) = http_exchange(method, addr, path, headers, body);
    (status, body)
}

/// The data of a chunked body; a cut-off body yields what arrived whole.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let Ok(size) = usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap_or("0").trim(), 16) else {
            break;
        };
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}

/// GET returning the body as a string, panicking on a transport error.
pub fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let (s, b) = http("GET", addr, path, &[], b"");
    (s, String::from_utf8_lossy(&b).to_string())
}

/// Reads one Prometheus sample: the sum of every series of `name` whose labels contain all `labels`.
pub fn metric(metrics_addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = get_text(metrics_addr, "/metrics");
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric_name, label_text) = series.split_once('{').unwrap_or((series, ""));
        if metric_name != name {
            continue;
        }
        if labels.iter().all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\""))) {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// A free loopback port (bound then released; the small race is acceptable in tests). Nothing
/// listens on it until someone binds it, so it also stands for a destination that is down.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `data` gzip-compressed (one member).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `text` with its one occurrence of `from` replaced by `to`. Panics when `from` is absent or
/// occurs more than once: an edit of a config template that no longer matches would otherwise
/// silently test the unedited config.
#[track_caller]
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    let n = text.matches(from).count();
    assert!(n == 1, "{from:?} occurs {n} times (expected once) in:\n{text}");
    text.replacen(from, to, 1)
}

/// A detached watcher that kills `target` (a pid, or -pgid) once this test process has exited:
/// a process shared by the tests of a file lives in a static, and statics are never dropped.
pub fn reap_with_us(target: &str) {
    let me = std::process::id();
    let script = format!("while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -KILL {target} 2>/dev/null");
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `otlp-relay check` on `config`, written to `dir`: its exit code and its stdout and stderr.
pub fn check_config(dir: &Path, config: &str) -> (Option<i32>, String) {
    let path = write_file(dir, "config.yaml", config);
    let out = Command::new(bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.code(), output_text(&out))
}

/// A finished command's stdout followed by its stderr, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
