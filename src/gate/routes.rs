//! Every route `mlflow server` (3.17) exposes, with the permission it needs and where its target
//! experiments are found. Derived from MLflow's own auth plugin (`mlflow/server/auth/__init__.py`,
//! which maps each API to a validator) and its protos. A route missing here is admin-only, and so
//! is every family the gate has no experiment mapping for (gateway, webhooks, workspaces, scorers,
//! datasets, review queues, jobs, assistant, MCP servers...). tests/gate_authz.rs enumerates the
//! real server's routes and fails on one without an entry.
use super::authz::Level;

/// What a target id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Experiment,
    /// An experiment id that MLflow defaults to "0" (the Default experiment) when absent.
    ExperimentOrDefault,
    /// The name an experiment will have (create, rename): checked against name rules.
    NewExperimentName,
    Run,
    Trace,
    /// A trace id a write may create: when the trace exists already, MLflow overwrites it (and
    /// moves it into the request's experiment), so its experiment counts too.
    TraceIfExists,
    LoggedModel,
    /// An artifact path under the artifact root: `<experiment id>/...`.
    ArtifactPath,
}

/// Where a target id is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Find {
    /// A request field: the JSON body for methods with one, else the query. A `/` separated path
    /// walks nested objects (`*` walks every element of an array); only plain names in queries.
    Field(Kind, &'static str),
    /// A decoded path segment (index into the segments of the `/api/...` form).
    Segment(Kind, usize),
    /// The path segments from this index on (an artifact path).
    Tail(Kind, usize),
    /// The `x-mlflow-experiment-id` header (OTLP ingestion only).
    Header,
    /// The trace ids of an OTLP body: spans of a trace that already exists join that trace, in
    /// whatever experiment it is.
    OtlpTraces,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Any member: the UI shell, static files, health, versions.
    Member,
    /// Admin group only.
    Admin,
    /// `level` on every experiment found; nothing found: `level` on every experiment ("*").
    Experiments(Level, &'static [Find]),
    /// A read naming no experiment: allowed with READ somewhere, MLflow's answer is then cut to
    /// the experiments the caller may read.
    ExperimentListing,
    /// The model registry: the permissions file has no rules for registered models, so `level`
    /// on every experiment ("*") is required.
    Registry(Level),
    /// Each field of the document is authorized (see `graphql.rs`).
    Graphql,
}

impl Rule {
    /// OTLP trace ingestion (`POST /v1/traces`): its targets include the traces of the body.
    pub(crate) fn is_otlp_ingest(&self) -> bool {
        matches!(self, Rule::Experiments(_, finds) if finds.contains(&Find::OtlpTraces))
    }
}

/// The body of these routes is not an MLflow JSON message (uploads, OTLP): it is streamed as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    Json,
    Opaque,
}

#[derive(Debug)]
pub struct Route {
    pub(crate) methods: &'static str,
    pub(crate) pattern: &'static str,
    pub(crate) rule: Rule,
    pub(crate) body: BodyKind,
}

use BodyKind::{Json, Opaque};
use Find::{Field, Header, OtlpTraces, Segment, Tail};
use Kind::*;
use Level::{Edit as E, Manage as M, Read as R};
use Rule::{Admin, ExperimentListing, Experiments as X, Graphql, Member, Registry};

const fn r(methods: &'static str, pattern: &'static str, rule: Rule) -> Route {
    Route {
        methods,
        pattern,
        rule,
        body: Json,
    }
}
const fn opaque(methods: &'static str, pattern: &'static str, rule: Rule) -> Route {
    Route {
        methods,
        pattern,
        rule,
        body: Opaque,
    }
}

const RUN: &[Find] = &[Field(Run, "run_id"), Field(Run, "run_uuid")];
const EXP: &[Find] = &[Field(Experiment, "experiment_id")];
const EXPS: &[Find] = &[Field(Experiment, "experiment_ids")];
/// `/api/2.0/mlflow/traces/<id>...` and `/api/3.0/mlflow/traces/<id>...`
const TRACE_SEG: &[Find] = &[Segment(Trace, 4)];
const MODEL_SEG: &[Find] = &[Segment(LoggedModel, 4)];
const ARTIFACT_TAIL: &[Find] = &[Tail(ArtifactPath, 4)];
const MPU_TAIL: &[Find] = &[Tail(ArtifactPath, 5)];

/// Patterns use the `/api/` form (`/ajax-api/` is looked up as `/api/`); `<x>` is one segment,
/// `<*x>` one or more. Methods are `|` separated.
pub(crate) static ROUTES: &[Route] = &[
    // UI, static files, health, versions.
    r("GET", "/", Member),
    r("GET", "/static-files/<*p>", Member),
    r("GET", "/build/<*p>", Member),
    r("GET", "/health", Member),
    r("GET", "/version", Member),
    r("GET", "/api/3.0/mlflow/server-info", Member),
    r("GET|POST", "/api/3.0/mlflow/ui-telemetry", Member),
    r("POST", "/graphql", Graphql),
    r("GET", "/graphql", Admin),
    // Experiments.
    r(
        "POST",
        "/api/2.0/mlflow/experiments/create",
        X(E, &[Field(NewExperimentName, "name")]),
    ),
    r("GET", "/api/2.0/mlflow/experiments/get", X(R, EXP)),
    r("GET", "/api/2.0/mlflow/experiments/get-by-name", ExperimentListing),
    r("GET|POST", "/api/2.0/mlflow/experiments/search", ExperimentListing),
    r("POST", "/api/2.0/mlflow/experiments/delete", X(M, EXP)),
    r("POST", "/api/2.0/mlflow/experiments/restore", X(M, EXP)),
    r(
        "POST",
        "/api/2.0/mlflow/experiments/update",
        X(
            E,
            &[Field(Experiment, "experiment_id"), Field(NewExperimentName, "new_name")],
        ),
    ),
    r("POST", "/api/2.0/mlflow/experiments/set-experiment-tag", X(E, EXP)),
    r("POST", "/api/2.0/mlflow/experiments/delete-experiment-tag", X(M, EXP)),
    r("POST", "/api/2.0mlflow/experiments/search-datasets", X(R, EXPS)),
    r("POST", "/api/2.0/mlflow/experiments/search-datasets", X(R, EXPS)),
    // Runs.
    r(
        "POST",
        "/api/2.0/mlflow/runs/create",
        X(E, &[Field(ExperimentOrDefault, "experiment_id")]),
    ),
    r(
        "POST",
        "/api/2.0/mlflow/runs/create-promptlab-run",
        X(E, &[Field(ExperimentOrDefault, "experiment_id")]),
    ),
    r("GET", "/api/2.0/mlflow/runs/get", X(R, RUN)),
    r("POST", "/api/2.0/mlflow/runs/delete", X(M, RUN)),
    r("POST", "/api/2.0/mlflow/runs/restore", X(M, RUN)),
    r("POST", "/api/2.0/mlflow/runs/delete-tag", X(M, RUN)),
    r("POST", "/api/2.0/mlflow/runs/update", X(E, RUN)),
    r("POST", "/api/2.0/mlflow/runs/log-metric", X(E, RUN)),
    r("POST", "/api/2.0/mlflow/runs/log-batch", X(E, RUN)),
    r("POST", "/api/2.0/mlflow/runs/log-model", X(E, RUN)),
    r("POST", "/api/2.0/mlflow/runs/log-parameter", X(E, RUN)),
    r("POST", "/api/2.0/mlflow/runs/set-tag", X(E, RUN)),
    r(
        "POST",
        "/api/2.0/mlflow/runs/log-inputs",
        X(E, &[Field(Run, "run_id"), Field(LoggedModel, "models/*/model_id")]),
    ),
    r(
        "POST",
        "/api/2.0/mlflow/runs/outputs",
        X(E, &[Field(Run, "run_id"), Field(LoggedModel, "models/*/model_id")]),
    ),
    r("POST", "/api/2.0/mlflow/runs/search", X(R, EXPS)),
    r("GET", "/api/2.0/mlflow/metrics/get-history", X(R, RUN)),
    r(
        "GET",
        "/api/2.0/mlflow/metrics/get-history-bulk",
        X(R, &[Field(Run, "run_id")]),
    ),
    r(
        "GET",
        "/api/2.0/mlflow/metrics/get-history-bulk-interval",
        X(R, &[Field(Run, "run_ids")]),
    ),
    // Run artifacts.
    r("GET", "/api/2.0/mlflow/artifacts/list", X(R, RUN)),
    r("GET", "/get-artifact", X(R, RUN)),
    opaque("POST", "/api/2.0/mlflow/upload-artifact", X(E, RUN)),
    r("POST", "/api/2.0/mlflow/artifacts/presigned-download-url", Admin),
    r("POST", "/api/2.0/mlflow/artifacts/presigned-upload-url", Admin),
    // Proxied artifacts: `<experiment id>/<run id>/artifacts/...` under the artifact root.
    r(
        "GET",
        "/api/2.0/mlflow-artifacts/artifacts",
        X(R, &[Field(ArtifactPath, "path")]),
    ),
    r("GET", "/api/2.0/mlflow-artifacts/artifacts/<*p>", X(R, ARTIFACT_TAIL)),
    opaque("PUT", "/api/2.0/mlflow-artifacts/artifacts/<*p>", X(E, ARTIFACT_TAIL)),
    r(
        "DELETE",
        "/api/2.0/mlflow-artifacts/artifacts/<*p>",
        X(M, ARTIFACT_TAIL),
    ),
    r("POST", "/api/2.0/mlflow-artifacts/mpu/create/<*p>", X(E, MPU_TAIL)),
    r("POST", "/api/2.0/mlflow-artifacts/mpu/complete/<*p>", X(E, MPU_TAIL)),
    r("POST", "/api/2.0/mlflow-artifacts/mpu/abort/<*p>", X(E, MPU_TAIL)),
    r("GET", "/api/2.0/mlflow-artifacts/presigned/<*p>", Admin),
    // Traces, v2.
    r("POST", "/api/2.0/mlflow/traces", X(E, EXP)),
    r("GET", "/api/2.0/mlflow/traces", X(R, EXPS)),
    r("PATCH", "/api/2.0/mlflow/traces/<id>", X(E, TRACE_SEG)),
    r("GET", "/api/2.0/mlflow/traces/<id>/info", X(R, TRACE_SEG)),
    r("PATCH", "/api/2.0/mlflow/traces/<id>/tags", X(E, TRACE_SEG)),
    r("DELETE", "/api/2.0/mlflow/traces/<id>/tags", X(M, TRACE_SEG)),
    r(
        "POST",
        "/api/2.0/mlflow/traces/delete-traces",
        X(M, &[Field(Experiment, "experiment_id"), Field(Trace, "request_ids")]),
    ),
    r(
        "POST",
        "/api/2.0/mlflow/traces/link-prompts",
        X(E, &[Field(Trace, "trace_id")]),
    ),
    r(
        "POST",
        "/api/2.0/mlflow/traces/link-to-run",
        X(E, &[Field(Trace, "trace_ids"), Field(Run, "run_id")]),
    ),
    r(
        "GET",
        "/api/2.0/mlflow/get-trace-artifact",
        X(R, &[Field(Trace, "request_id")]),
    ),
    r(
        "GET",
        "/api/3.0/mlflow/get-trace-artifact",
        X(R, &[Field(Trace, "request_id")]),
    ),
    r("GET", "/api/2.0/mlflow/unified-traces", Admin),
    r("GET", "/api/2.0/mlflow/get-online-trace-details", Admin),
    // Traces, v3.
    r(
        "POST",
        "/api/3.0/mlflow/traces",
        X(
            E,
            &[
                Field(
                    Experiment,
                    "trace/trace_info/trace_location/mlflow_experiment/experiment_id",
                ),
                Field(TraceIfExists, "trace/trace_info/trace_id"),
            ],
        ),
    ),
    r("GET", "/api/3.0/mlflow/traces/<id>", X(R, TRACE_SEG)),
    r("POST", "/api/3.0/mlflow/traces/<id>/assessments", X(E, TRACE_SEG)),
    r("GET", "/api/3.0/mlflow/traces/<id>/assessments/<a>", X(R, TRACE_SEG)),
    r("PATCH", "/api/3.0/mlflow/traces/<id>/assessments/<a>", X(E, TRACE_SEG)),
    r("DELETE", "/api/3.0/mlflow/traces/<id>/assessments/<a>", X(M, TRACE_SEG)),
    r("PATCH", "/api/3.0/mlflow/traces/<id>/tags", X(E, TRACE_SEG)),
    r("DELETE", "/api/3.0/mlflow/traces/<id>/tags", X(M, TRACE_SEG)),
    r(
        "GET",
        "/api/3.0/mlflow/traces/batchGet",
        X(R, &[Field(Trace, "trace_ids")]),
    ),
    r(
        "POST",
        "/api/3.0/mlflow/traces/batchGetInfos",
        X(R, &[Field(Trace, "trace_ids")]),
    ),
    r("GET", "/api/3.0/mlflow/traces/get", X(R, &[Field(Trace, "trace_id")])),
    r(
        "POST",
        "/api/3.0/mlflow/traces/calculate-filter-correlation",
        X(R, EXPS),
    ),
    r("POST", "/api/3.0/mlflow/traces/metrics", X(R, EXPS)),
    r(
        "POST",
        "/api/3.0/mlflow/traces/search",
        X(
            R,
            &[
                Field(Experiment, "locations/*/mlflow_experiment/experiment_id"),
                Field(Experiment, "experiment_ids"),
            ],
        ),
    ),
    r(
        "POST",
        "/api/3.0/mlflow/traces/delete-traces",
        X(M, &[Field(Experiment, "experiment_id"), Field(Trace, "request_ids")]),
    ),
    opaque("POST", "/v1/traces", X(E, &[Header, OtlpTraces])),
    // Logged models.
    r(
        "POST",
        "/api/2.0/mlflow/logged-models",
        X(
            E,
            &[Field(ExperimentOrDefault, "experiment_id"), Field(Run, "source_run_id")],
        ),
    ),
    r("POST", "/api/2.0/mlflow/logged-models/search", X(R, EXPS)),
    r("GET", "/api/2.0/mlflow/logged-models/<id>", X(R, MODEL_SEG)),
    r("PATCH", "/api/2.0/mlflow/logged-models/<id>", X(E, MODEL_SEG)),
    r("DELETE", "/api/2.0/mlflow/logged-models/<id>", X(M, MODEL_SEG)),
    r(
        "GET",
        "/api/2.0/mlflow/logged-models/<id>/artifacts/directories",
        X(R, MODEL_SEG),
    ),
    r(
        "GET",
        "/api/2.0/mlflow/logged-models/<id>/artifacts/files",
        X(R, MODEL_SEG),
    ),
    r("POST", "/api/2.0/mlflow/logged-models/<id>/params", X(E, MODEL_SEG)),
    r("PATCH", "/api/2.0/mlflow/logged-models/<id>/tags", X(E, MODEL_SEG)),
    r(
        "DELETE",
        "/api/2.0/mlflow/logged-models/<id>/tags/<key>",
        X(M, MODEL_SEG),
    ),
    // Model registry (and prompts, which are registered models).
    r("POST", "/api/2.0/mlflow/registered-models/create", Registry(E)),
    r("GET", "/api/2.0/mlflow/registered-models/get", Registry(R)),
    r("GET", "/api/2.0/mlflow/registered-models/search", Registry(R)),
    r(
        "GET|POST",
        "/api/2.0/mlflow/registered-models/get-latest-versions",
        Registry(R),
    ),
    r("POST", "/api/2.0/mlflow/registered-models/rename", Registry(E)),
    r("PATCH", "/api/2.0/mlflow/registered-models/update", Registry(E)),
    r("POST", "/api/2.0/mlflow/registered-models/set-tag", Registry(E)),
    r("DELETE", "/api/2.0/mlflow/registered-models/delete", Registry(M)),
    r("DELETE", "/api/2.0/mlflow/registered-models/delete-tag", Registry(M)),
    r("GET", "/api/2.0/mlflow/registered-models/alias", Registry(R)),
    r("POST", "/api/2.0/mlflow/registered-models/alias", Registry(E)),
    r("DELETE", "/api/2.0/mlflow/registered-models/alias", Registry(M)),
    r("POST", "/api/2.0/mlflow/model-versions/create", Registry(E)),
    r("GET", "/api/2.0/mlflow/model-versions/get", Registry(R)),
    r("GET", "/api/2.0/mlflow/model-versions/get-download-uri", Registry(R)),
    r("GET", "/api/2.0/mlflow/model-versions/search", Registry(R)),
    r("POST", "/api/2.0/mlflow/model-versions/set-tag", Registry(E)),
    r("POST", "/api/2.0/mlflow/model-versions/transition-stage", Registry(E)),
    r("PATCH", "/api/2.0/mlflow/model-versions/update", Registry(E)),
    r("DELETE", "/api/2.0/mlflow/model-versions/delete", Registry(M)),
    r("DELETE", "/api/2.0/mlflow/model-versions/delete-tag", Registry(M)),
    r("GET", "/model-versions/get-artifact", Registry(R)),
    // Families without an experiment mapping in the gate: admin only.
    r("GET|POST|PATCH|PUT|DELETE", "/api/2.0/mlflow/webhooks", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/2.0/mlflow/webhooks/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/2.0/mlflow/gateway-proxy", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/gateway/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/gateway/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/datasets/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/scorers/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/scorer/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/issues", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/issues/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/label-schemas/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/review-queues/<*p>", Admin),
    r(
        "GET|POST|PATCH|PUT|DELETE",
        "/api/3.0/mlflow/prompt-optimization/<*p>",
        Admin,
    ),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/workspaces", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/workspaces/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/jobs/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/jobs/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/demo/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/genai/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/assistant/<*p>", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/mcp-servers", Admin),
    r("GET|POST|PATCH|PUT|DELETE", "/api/3.0/mlflow/mcp-servers/<*p>", Admin),
];

/// A request's route: `None` is no entry (admin only).
pub fn lookup(method: &str, segments: &[String], trailing_slash: bool) -> Option<&'static Route> {
    if trailing_slash {
        return None;
    }
    let seg = |i: usize| -> Option<&str> {
        let s = segments.get(i)?.as_str();
        Some(if i == 0 && s == "ajax-api" { "api" } else { s })
    };
    // The most specific route wins (`traces/batchGet` over `traces/<id>`), the first of equals.
    let literal = |route: &&Route| {
        route
            .pattern
            .split('/')
            .filter(|p| !p.is_empty() && !p.starts_with('<'))
            .count()
    };
    ROUTES
        .iter()
        .rev()
        .filter(|route| {
            if !route
                .methods
                .split('|')
                .any(|m| m == method || (m == "GET" && method == "HEAD"))
            {
                return false;
            }
            let pat: Vec<&str> = route.pattern.split('/').skip(1).filter(|p| !p.is_empty()).collect();
            for (i, p) in pat.iter().enumerate() {
                if p.starts_with("<*") {
                    return segments.len() > i;
                }
                let Some(s) = seg(i) else { return false };
                if !(p.starts_with('<') || *p == s) {
                    return false;
                }
            }
            segments.len() == pat.len()
        })
        .max_by_key(literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Vec<String> {
        p.split('/').filter(|s| !s.is_empty()).map(String::from).collect()
    }
    fn rule(m: &str, p: &str) -> Option<Rule> {
        lookup(m, &segs(p), false).map(|r| r.rule)
    }

    #[test]
    fn table_lookups() {
        assert_eq!(rule("GET", "/"), Some(Member));
        assert_eq!(rule("POST", "/api/2.0/mlflow/experiments/delete"), Some(X(M, EXP)));
        assert_eq!(rule("POST", "/ajax-api/2.0/mlflow/experiments/delete"), Some(X(M, EXP)));
        assert_eq!(rule("GET", "/api/2.0/mlflow/experiments/delete"), None, "wrong method");
        assert_eq!(rule("POST", "/api/2.0/mlflow/experiments/delete/x"), None);
        assert_eq!(rule("PATCH", "/api/2.0/mlflow/traces/tr-1/tags"), Some(X(E, TRACE_SEG)));
        assert_eq!(rule("GET", "/api/3.0/mlflow/traces/tr-1"), Some(X(R, TRACE_SEG)));
        assert_eq!(
            rule("GET", "/api/3.0/mlflow/traces/get"),
            Some(X(R, &[Field(Trace, "trace_id")])),
            "a literal route is not taken for a trace id"
        );
        assert_ne!(rule("GET", "/api/3.0/mlflow/traces/batchGet"), Some(X(R, TRACE_SEG)));
        assert_eq!(
            rule("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/x"),
            Some(X(E, ARTIFACT_TAIL))
        );
        assert_eq!(
            rule("GET", "/api/2.0/mlflow-artifacts/artifacts"),
            Some(X(R, &[Field(ArtifactPath, "path")]))
        );
        assert_eq!(rule("HEAD", "/health"), Some(Member));
        assert_eq!(rule("GET", "/api/2.0/mlflow/webhooks/1"), Some(Admin));
        assert_eq!(rule("GET", "/api/2.0/mlflow/something-new"), None);
        assert_eq!(rule("GET", "/ajax-api"), None);
        assert_eq!(lookup("GET", &segs("/health"), true).map(|r| r.rule), None);
        // Segment indices point where the table says.
        let trace = segs("/api/3.0/mlflow/traces/tr-9/tags");
        assert_eq!(trace[4], "tr-9");
        let model = segs("/api/2.0/mlflow/logged-models/m-1/tags/k");
        assert_eq!(model[4], "m-1");
        let art = segs("/api/2.0/mlflow-artifacts/artifacts/7/r/artifacts/f");
        assert_eq!(art[4], "7");
        let mpu = segs("/api/2.0/mlflow-artifacts/mpu/create/7/r");
        assert_eq!(mpu[5], "7");
    }

    #[test]
    fn otlp_ingest_is_the_trace_write_route_only() {
        let ingest = |m: &str, p: &str| lookup(m, &segs(p), false).is_some_and(|r| r.rule.is_otlp_ingest());
        assert!(ingest("POST", "/v1/traces"));
        for (m, p) in [
            ("GET", "/v1/traces"),
            ("POST", "/v1/traces/x"),
            ("POST", "/api/2.0/mlflow/traces"),
            ("POST", "/api/3.0/mlflow/traces"),
            ("POST", "/ajax-api/2.0/mlflow/experiments/search"),
        ] {
            assert!(!ingest(m, p), "{m} {p}");
        }
        assert!(!lookup("POST", &segs("/v1/traces"), true).is_some_and(|r| r.rule.is_otlp_ingest()));
    }

    #[test]
    fn every_experiment_rule_finds_something() {
        for r in ROUTES {
            if let X(_, finds) = r.rule {
                assert!(!finds.is_empty(), "{}", r.pattern);
            }
        }
    }
}
