//! The offline manifest toolchain for the deploy tests: tests/deploy/setup_tools.sh installed
//! once into target/test-cache (file lock, stamp keyed on the script's content), and thin
//! wrappers around helm and tests/deploy/validate.py (schemas and CEL rules of the CRDs carried
//! in tests/deploy/schemas/).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_norway::Value;

use crate::support;

/// tests/deploy: the toolchain's install script, validator, CRD schemas and fixtures.
pub fn deploy_test_dir() -> PathBuf {
    support::repo_root().join("tests/deploy")
}

pub fn chart_dir() -> PathBuf {
    support::repo_root().join("deploy/chart/otlp-relay")
}

pub struct Tools {
    pub dir: PathBuf,
}

impl Tools {
    pub fn helm(&self) -> PathBuf {
        self.dir.join("bin/helm/helm")
    }
    pub fn python(&self) -> PathBuf {
        self.dir.join("venv/bin/python")
    }
}

/// Installs (once per machine, shared by test threads and processes) and returns the toolchain.
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = deploy_test_dir().join("setup_tools.sh");
        let body = std::fs::read(&script).unwrap();
        // The stamp names the script's content, so a changed script reinstalls.
        let stamp_value = format!("{:016x}", fnv1a(&body));
        let dir = support::cache_dir().join("deploy-tools");
        let lock = std::fs::File::create(support::cache_dir().join("deploy-tools.lock")).unwrap();
        // std's File::lock (Rust 1.89), as tests/support uses too.
        #[allow(clippy::incompatible_msrv)]
        lock.lock().unwrap();
        let stamp = dir.join(".installed");
        let helm = dir.join("bin/helm/helm");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(stamp_value.as_str()) || !helm.exists() {
            let _ = std::fs::remove_dir_all(&dir);
            let out = Command::new("bash").arg(&script).arg(&dir).output().unwrap();
            assert!(
                out.status.success(),
                "setup_tools.sh failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&stamp, &stamp_value).unwrap();
        }
        Tools { dir }
    })
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

pub const MODES: [&str; 3] = ["token", "direct", "both"];
/// The values files under the chart's ci/ folder every check runs with.
pub const VALUE_SETS: [&str; 2] = ["migrate", "full"];
/// The namespace of the seed's deployment.
pub const NAMESPACE: &str = "kagenti-system";

/// A `helm template` invocation.
#[derive(Debug, Clone, Default)]
pub struct Render {
    pub values: Vec<String>,
    pub set: Vec<(String, String)>,
}

impl Render {
    /// Values file `ci/NAME-values.yaml` plus `mode` and `istio.enabled`.
    pub fn new(value_set: &str, mode: &str, istio: bool) -> Render {
        Render::default()
            .values(value_set)
            .set("mode", mode)
            .set("istio.enabled", if istio { "true" } else { "false" })
    }
    pub fn values(mut self, value_set: &str) -> Render {
        self.values.push(value_set.to_string());
        self
    }
    pub fn set(mut self, key: &str, value: &str) -> Render {
        self.set.push((key.to_string(), value.to_string()));
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![];
        for v in &self.values {
            args.push("-f".into());
            args.push(chart_dir().join(format!("ci/{v}-values.yaml")).display().to_string());
        }
        for (k, v) in &self.set {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        args
    }

    /// `helm template` output, or helm's error text.
    pub fn try_text(&self) -> Result<String, String> {
        let out = Command::new(tools().helm())
            .args(["template", "otlp-relay"])
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE])
            .args(["--api-versions", "security.istio.io/v1"])
            .args(["--api-versions", "gateway.networking.k8s.io/v1"])
            .args(self.args())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8(out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn text(&self) -> String {
        self.try_text()
            .unwrap_or_else(|e| panic!("helm template {:?} failed:\n{e}", self.args()))
    }

    pub fn docs(&self) -> Vec<Value> {
        parse_docs(&self.text())
    }

    /// `helm lint --strict` with these values.
    pub fn lint(&self) -> Output {
        Command::new(tools().helm())
            .args(["lint", "--strict"])
            .arg(chart_dir())
            .args(self.args())
            .output()
            .unwrap()
    }
}

/// Every non-empty document of a multi-document YAML stream.
pub fn parse_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// What tests/deploy/validate.py checks.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// Every document against its schema (Kubernetes or CRD, unknown fields refused).
    Schema,
    /// The CRDs' CEL validation rules.
    Cel,
}

/// Runs the validator on a file; returns (success, stdout+stderr).
pub fn run_validator(check: Check, file: &Path) -> (bool, String) {
    run_validator_for(check, &[file], None)
}

/// Runs the validator on files (one process: its imports are paid once), against the
/// Kubernetes schemas of `k8s_version` (the validator's default otherwise).
pub fn run_validator_for(check: Check, files: &[&Path], k8s_version: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(tools().python());
    let mode = match check {
        Check::Schema => "schema",
        Check::Cel => "cel",
    };
    cmd.arg(deploy_test_dir().join("validate.py")).arg(mode).args(files);
    if let Some(v) = k8s_version {
        cmd.env("K8S_VERSION", v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub fn kind(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

pub fn name(doc: &Value) -> &str {
    doc.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn component(doc: &Value) -> &str {
    doc.get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get("app.kubernetes.io/component"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The single document of this kind and component (panics if not exactly one).
pub fn one<'a>(docs: &'a [Value], kind_: &str, component_: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == kind_ && component(d) == component_)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind_} of component {component_}, found {}",
        found.len()
    );
    found[0]
}

pub fn find<'a>(docs: &'a [Value], kind_: &str, component_: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind(d) == kind_ && component(d) == component_)
}

/// Walks a path of mapping keys and sequence indices ("0", "1", ...).
pub fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) if cur.is_sequence() => cur.get(i),
            _ => cur.get(key),
        }
        .unwrap_or_else(|| {
            panic!(
                "no {path} (stopped at {key}) in {}",
                serde_norway::to_string(v).unwrap()
            )
        });
    }
    cur
}

/// The relay's rendered config.yaml (the ConfigMap's data), parsed.
pub fn relay_config(docs: &[Value]) -> (String, Value) {
    let cm = one(docs, "ConfigMap", "relay");
    let text = at(cm, "data")
        .get("config.yaml")
        .and_then(Value::as_str)
        .expect("relay ConfigMap has config.yaml")
        .to_string();
    let parsed: Value = serde_norway::from_str(&text).unwrap();
    (text, parsed)
}
