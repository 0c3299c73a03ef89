//! OTLP test parts: the counting sink, the load generator and the relay as real processes.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::Proc;

pub struct Sink {
    pub proc: Proc,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Where /stats is read: the plain --stats-listen port when the sink serves TLS.
    pub stats_addr: SocketAddr,
}

impl Sink {
    pub fn start(extra: &[&str]) -> Sink {
        let mut args = vec!["sink", "--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut proc = Proc::relay("sink", &args);
        let http = proc.wait_listen("sink-http", Duration::from_secs(20));
        let grpc = proc.wait_listen("sink-grpc", Duration::from_secs(20));
        let stats_addr = if extra.contains(&"--stats-listen") {
            proc.wait_listen("sink-stats", Duration::from_secs(20))
        } else {
            http
        };
        Sink {
            proc,
            http,
            grpc,
            stats_addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn stats(&self) -> serde_json::Value {
        stats(self.stats_addr)
    }

    /// Waits until the sink has seen `n` unique spans.
    pub fn wait_unique(&self, n: u64, timeout: Duration) -> serde_json::Value {
        super::wait_for(&format!("{n} unique spans at the sink"), timeout, || {
            let s = self.stats();
            (s["unique_spans"].as_u64() == Some(n)).then_some(s)
        })
    }
}

pub fn stats(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = super::get_text(addr, "/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs loadgen with `--json` and returns (exit code, report).
pub fn loadgen(args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["loadgen", "--json"];
    all.extend_from_slice(args);
    let mut p = Proc::relay("loadgen", &all);
    let code = p.wait_exit(Duration::from_secs(120)).expect("exit code");
    // The exit can beat the capture of the last line: give the reader threads a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let out = p.output();
        if let Some(line) = out.iter().find(|l| l.starts_with('{')) {
            break line.clone();
        }
        if std::time::Instant::now() > deadline {
            panic!("no JSON report in:\n{}", out.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, serde_json::from_str(&line).unwrap())
}

/// A running relay and the addresses it bound (configs use port 0 everywhere).
pub struct Relay {
    pub proc: Proc,
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub health: Option<SocketAddr>,
}

impl Relay {
    /// Writes `config` to `dir/config.yaml` and runs the relay on it. `receiver` is the
    /// receiver id whose listeners to wait for (e.g. `otlp`).
    pub fn start(dir: &Path, config: &str, receiver: &str) -> Relay {
        let path = super::write_file(dir, "config.yaml", config);
        let mut proc = Proc::relay("relay", &["run", "--config", path.to_str().unwrap()]);
        let metrics = proc.wait_listen("metrics", Duration::from_secs(20));
        let health = config
            .contains("health_check")
            .then(|| proc.wait_listen("health", Duration::from_secs(20)));
        let grpc = config
            .contains("grpc:")
            .then(|| proc.wait_listen(&format!("{receiver}-grpc"), Duration::from_secs(20)));
        let http = config
            .contains("http:")
            .then(|| proc.wait_listen(&format!("{receiver}-http"), Duration::from_secs(20)));
        proc.wait_line("relay started", Duration::from_secs(20));
        Relay {
            proc,
            grpc,
            http,
            metrics,
            health,
        }
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::metric(self.metrics, name, labels)
    }
}
