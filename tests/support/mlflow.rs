//! A real `mlflow server` for tests: pip-installed into a cached venv, sqlite backend in a temp dir,
//! bound to 127.0.0.1 on a free port, polled until GET /health answers.
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Proc, http, python_venv, wait_for};

/// The MLflow release the wire facts in DESIGN.md were measured against.
pub const MLFLOW_PIN: &str = "mlflow==3.17.2";

/// The cached venv with mlflow installed (its python is `venv/bin/python`).
pub fn mlflow_venv() -> PathBuf {
    python_venv("mlflow", &[MLFLOW_PIN])
}

pub struct Mlflow {
    pub addr: SocketAddr,
    pub venv: PathBuf,
    /// How long `mlflow server` took from spawn to a healthy /health.
    pub startup: Duration,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Mlflow {
    pub fn start() -> Mlflow {
        Self::start_with(&[])
    }

    /// Starts `mlflow server` with extra command-line arguments.
    pub fn start_with(extra_args: &[&str]) -> Mlflow {
        Self::start_on(mlflow_venv(), None, extra_args)
    }

    /// Starts `mlflow server` from `venv` on `backend_store_uri` (None: sqlite in a temp dir).
    pub fn start_on(venv: PathBuf, backend_store_uri: Option<&str>, extra_args: &[&str]) -> Mlflow {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let backend = backend_store_uri
            .map(str::to_string)
            .unwrap_or_else(|| format!("sqlite:///{}", dir.path().join("mlflow.db").display()));
        let mut cmd = Command::new(venv.join("bin/mlflow"));
        cmd.arg("server")
            .arg("--backend-store-uri")
            .arg(backend)
            .arg("--default-artifact-root")
            .arg(dir.path().join("artifacts"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
            // MLflow rejects unknown Host headers (DNS-rebinding guard); we reach it by IP and name.
            .args(["--allowed-hosts", &format!("127.0.0.1:{port},localhost:{port}")])
            .args(extra_args)
            .env("MLFLOW_TRACKING_URI", "")
            .env("PYTHONUNBUFFERED", "1")
            // No background job runner (online scoring, archival: 8 extra processes tests do not need).
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            // `mlflow server` forks uvicorn and a job runner with its own workers: give them one process
            // group so Drop can end them all (killing only the parent leaves them running).
            .process_group(0);
        let started = Instant::now();
        // Built before the wait, so a failed start still kills the process group (Drop).
        let mut m = Mlflow {
            addr: ([127, 0, 0, 1], port).into(),
            venv,
            startup: Duration::ZERO,
            proc: Proc::spawn("mlflow", cmd),
            _dir: dir,
        };
        let addr = m.addr;
        let proc = &mut m.proc;
        // ~20 s on an idle machine; much longer when the machine is busy building.
        wait_for("mlflow /health", Duration::from_secs(240), || {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("mlflow exited with {status}:\n{}", proc.output_text());
            }
            let ok = std::net::TcpStream::connect(addr).is_ok() && http("GET", addr, "/health", &[], b"").0 == 200;
            ok.then_some(())
        });
        m.startup = started.elapsed();
        m
    }

    /// Kills the server's whole process group (the server, uvicorn, the job runner and its workers).
    pub fn kill(&self) {
        let pgid = self.proc.child.id();
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pgid}")])
            .status();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's pid, also its process group's id.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    pub fn python(&self) -> PathBuf {
        self.venv.join("bin/python")
    }

    pub fn output_text(&self) -> String {
        self.proc.output_text()
    }

    /// POSTs JSON to the server directly and returns (status, JSON body or Null).
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, raw) = http(
            "POST",
            self.addr,
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        (status, serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null))
    }

    /// Creates an experiment and returns its id.
    pub fn create_experiment(&self, name: &str) -> String {
        let (status, body) = self.post_json("/api/2.0/mlflow/experiments/create", &serde_json::json!({"name": name}));
        assert_eq!(status, 200, "create experiment {name}: {body}");
        body["experiment_id"].as_str().unwrap().to_string()
    }

    /// Searches traces of one experiment (POST /api/3.0/mlflow/traces/search); returns the `traces` array.
    pub fn search_traces(&self, experiment_id: &str) -> Vec<serde_json::Value> {
        let (status, body) = self.post_json(
            "/api/3.0/mlflow/traces/search",
            &serde_json::json!({
                "locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}],
                "max_results": 500,
            }),
        );
        assert_eq!(status, 200, "search traces: {body}");
        body["traces"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        self.kill();
    }
}
