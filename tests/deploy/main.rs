//! CI checks of deploy/: `helm lint --strict`; `helm template` for every mode with and without
//! Istio, validated offline against the Kubernetes, Istio and Gateway API schemas and their CEL
//! rules (tests/deploy/validate.py, with the CRD schemas in tests/deploy/schemas); the chart's contract (names, probes, security, HPA/PDB, spool, seed
//! values); a table-driven MODEL of Istio's ALLOW semantics evaluated over the rendered
//! AuthorizationPolicies; and the Dockerfile lint.
#[path = "../support/mod.rs"]
mod support;

mod istio_model;
mod monitor;
mod tools;

use istio_model::{Dest, Mesh, Request, Verdict};
use serde_norway::Value;
use tools::{Check, MODES, NAMESPACE, Render, VALUE_SETS, at, find, one, parse_docs, relay_config, run_validator};

mod chart;
mod lint;
mod policies;
mod rendered;
mod workload;

fn env_var<'a>(env: &'a Value, name: &str) -> Option<&'a Value> {
    env.as_sequence()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
}
