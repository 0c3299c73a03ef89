//! The whole pipeline as a user deploys it, on this one machine: a throwaway PostgreSQL cluster,
//! `mlflow server` on it, the Keycloak-shaped provider, the gate, the relay receiving OTLP over
//! mTLS, and an agent that is the MLflow tracing SDK. The trace is read back through MLflow's
//! Python client and, in token mode, found in MLflow's own UI by a logged-in browser.
#[path = "../support/mod.rs"]
mod support;

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::free_port;
use support::mlflow::{MLFLOW_PIN, Mlflow};
use support::oidc::{self, OidcOptions, OidcProvider};
use support::otlp::Relay;
use support::pki::Ca;
use support::{Proc, cache_dir, python_venv, wait_for};

mod agent;

/// mlflow with what the pipeline needs around it: the PostgreSQL driver for the server, and the
/// OTLP exporters the SDK uses once `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
fn venv() -> PathBuf {
    python_venv(
        "mlflow-e2e",
        &[
            MLFLOW_PIN,
            "psycopg2-binary==2.9.13",
            "opentelemetry-exporter-otlp-proto-grpc==1.45.2",
            "opentelemetry-exporter-otlp-proto-http==1.45.2",
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// The account the cluster runs as when the test runs as root (initdb refuses root): nobody.
const NOBODY: u32 = 65534;

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A throwaway cluster from initdb, listening on 127.0.0.1 only (no unix socket), stopped with
/// `pg_ctl stop` on drop.
struct Postgres {
    bindir: PathBuf,
    lib_path: Option<OsString>,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    as_nobody: bool,
    _dir: tempfile::TempDir,
}

impl Postgres {
    fn start() -> Postgres {
        let t = Instant::now();
        let (bindir, lib_path) = postgres_binaries();
        let as_nobody = running_as_root();
        let dir = cluster_parent(as_nobody);
        let mut pg = Postgres {
            bindir,
            lib_path,
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            port: free_port(),
            as_nobody,
            _dir: dir,
        };
        let out = pg
            .cmd("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "mlflow", "--auth=trust", "--no-sync", "-E", "UTF8", "--no-locale"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Durability is not under test here: no fsync makes the cluster and MLflow's migrations fast.
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories='' -c fsync=off \
             -c full_page_writes=off -c synchronous_commit=off",
            pg.port
        );
        let started = |pg: &Postgres| {
            pg.cmd("pg_ctl")
                .arg("-D")
                .arg(&pg.data)
                .arg("-l")
                .arg(&pg.log)
                .args(["-w", "-t", "120", "-o", &opts, "start"])
                .output()
                .unwrap()
        };
        let mut out = started(&pg);
        if !out.status.success() && std::fs::read_to_string(&pg.log).unwrap_or_default().contains("in use") {
            // The free port was taken between our probe and the bind: once more on another.
            pg.port = free_port();
            out = started(&pg);
        }
        assert!(
            out.status.success(),
            "pg_ctl start failed:\n{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&pg.log).unwrap_or_default()
        );
        eprintln!("postgres on 127.0.0.1:{} after {:?}", pg.port, t.elapsed());
        pg
    }

    /// A command of the cluster's binaries, as nobody when we are root.
    fn cmd(&self, program: &str) -> Command {
        let program = self.bindir.join(program);
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(program);
            c
        } else {
            Command::new(program)
        };
        // nobody's home does not exist; the cluster's files are all named absolutely.
        cmd.current_dir("/").env("HOME", "/").env_remove("PGDATA");
        if let Some(l) = &self.lib_path {
            cmd.env("LD_LIBRARY_PATH", l);
        }
        cmd
    }

    fn uri(&self, database: &str) -> String {
        format!("postgresql://mlflow@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .output();
        if std::thread::panicking() {
            eprintln!(
                "---- postgres log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// A fresh directory for a cluster, writable by the account it runs as: under the test cache's
/// tmp/, or the system temp dir when that one cannot be reached by nobody (a home directory).
fn cluster_parent(as_nobody: bool) -> tempfile::TempDir {
    let base = cache_dir().join("tmp");
    std::fs::create_dir_all(&base).unwrap();
    let make = |base: &Path| {
        let dir = tempfile::Builder::new().prefix("e2e-pg-").tempdir_in(base).unwrap();
        if as_nobody {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        }
        dir
    };
    sweep_orphans(&base);
    sweep_orphans(&std::env::temp_dir());
    let dir = make(&base);
    std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string()).unwrap();
    if !as_nobody {
        return dir;
    }
    let reachable = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
        ])
        .args(["test", "-w"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if reachable {
        return dir;
    }
    let dir = make(&std::env::temp_dir());
    std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string()).unwrap();
    dir
}

/// Clusters left by a test process that was killed before its Drop ran: stopped and removed
/// (a live process's clusters are left alone).
fn sweep_orphans(base: &Path) {
    for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let dir = e.path();
        if !e.file_name().to_string_lossy().starts_with("e2e-pg-") {
            continue;
        }
        let owner = std::fs::read_to_string(dir.join("owner.pid")).unwrap_or_default();
        if owner.is_empty() || Path::new(&format!("/proc/{}", owner.trim())).exists() {
            continue;
        }
        // The postmaster's pid is the first line of postmaster.pid; it ends with its cluster.
        if let Some(pid) = std::fs::read_to_string(dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
        {
            let _ = Command::new("kill").args(["-QUIT", pid.trim()]).status();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The newest `usr/lib/postgresql/N/bin` under `root` that has initdb.
fn newest_bindir(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root.join("usr/lib/postgresql"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .max_by_key(|(v, _)| *v)
        .map(|(_, bin)| bin)
}

/// PostgreSQL's bin directory and the library path its binaries need: Debian's installed
/// packages when present, else the packages fetched with `apt-get download` and unpacked with
/// `dpkg-deb -x` into the test cache (no root needed, nothing installed on the machine).
/// E2E_POSTGRES_FROM_DEB=1 takes the second way even when PostgreSQL is installed.
fn postgres_binaries() -> (PathBuf, Option<OsString>) {
    if std::env::var_os("E2E_POSTGRES_FROM_DEB").is_none()
        && let Some(bin) = newest_bindir(Path::new("/"))
    {
        return (bin, None);
    }
    let root = cache_dir().join("postgresql-deb");
    let lock = std::fs::File::create(cache_dir().join("postgresql-deb.lock")).unwrap();
    lock.lock().unwrap();
    let stamp = root.join(".unpacked");
    if !stamp.exists() {
        unpack_postgres(&root);
        std::fs::write(&stamp, "").unwrap();
    }
    let bin = newest_bindir(&root).unwrap_or_else(|| panic!("no PostgreSQL in {}", root.display()));
    // Shared libraries of packages that were not installed: their multiarch directories.
    let mut libs = Vec::new();
    for top in ["usr/lib", "lib"] {
        for e in std::fs::read_dir(root.join(top)).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with("-linux-gnu") {
                libs.push(e.path());
            }
        }
    }
    (bin, Some(std::env::join_paths(libs).unwrap()))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .is_ok_and(|o| o.stdout == b"installed")
}

/// `apt-cache depends` of a package: its direct dependencies' names (virtual ones left out).
fn depends(package: &str) -> Vec<String> {
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            package,
        ])
        .output()
        .expect("apt-cache (a Debian system is needed to fetch PostgreSQL)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends: "))
        .filter(|d| !d.starts_with('<'))
        .map(str::to_string)
        .collect()
}

fn unpack_postgres(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    let debs = root.join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    if depends("postgresql").is_empty() && running_as_root() {
        // No package lists yet (a fresh image): fetch them, as the chromium install does.
        let _ = Command::new("apt-get").arg("update").status();
    }
    let server = depends("postgresql")
        .into_iter()
        .find(|d| d.strip_prefix("postgresql-").is_some_and(|v| v.parse::<u32>().is_ok()))
        .expect("apt-cache knows no postgresql-N package (apt-get update as root once?)");
    // The server package, then the libraries (and tzdata) it needs that this machine lacks.
    let mut todo = vec![server.clone()];
    let mut seen = std::collections::HashSet::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) || seen.len() > 80 {
            continue;
        }
        if p != server && installed(&p) {
            continue;
        }
        let ok = Command::new("apt-get")
            .args(["download", "-q", &p])
            .current_dir(&debs)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "apt-get download {p} failed");
        todo.extend(
            depends(&p)
                .into_iter()
                .filter(|d| d.starts_with("lib") || d == "tzdata"),
        );
    }
    for deb in std::fs::read_dir(&debs).unwrap().flatten() {
        let ok = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb.path())
            .arg(root)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "dpkg-deb -x {} failed", deb.path().display());
    }
    let _ = std::fs::remove_dir_all(&debs);
}
