//! The relay's own metrics as a collector dashboard reads them: every series of a configured
//! component is served at zero before any traffic (alerts see 0, not "no data"), and every query
//! of our Grafana dashboard (deploy/grafana) returns data from a real Prometheus (Debian's
//! package, unpacked into the test cache) scraping a relay under load.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::oidc::{CLIENT_ID, CLIENT_SECRET, OidcOptions, OidcProvider};
use support::otlp::{Relay, Sink};
use support::{Proc, cache_dir, free_port, get_text, wait_for, write_file};

const T: Duration = Duration::from_secs(60);
const EXPORTER: &str = "otlphttp/sink";
const EXTENSION: &str = "oauth2client/idp";
const EDITOR: &str = "attributes/tag";
const LIMITER: &str = "memory_limiter";
const GROUPER: &str = "groupbytrace";
/// Every processor of the pipeline: each serves the collector's processor item series.
const PROCESSORS: [&str; 4] = [LIMITER, GROUPER, EDITOR, "batch"];

/// A relay with both receiver transports, a memory_limiter, groupbytrace, an attributes
/// processor (the span-editing path), the batch processor, one otlphttp exporter to `endpoint`
/// and an oauth2client extension.
fn config(endpoint: &str, token_url: &str, exporter_auth: bool) -> RelayConfig {
    let mut exporter = json!({
        "endpoint": endpoint,
        "headers": {"x-mlflow-experiment-id": "0"},
        "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms"},
    });
    if exporter_auth {
        exporter["auth"] = json!({"authenticator": EXTENSION});
    }
    RelayConfig::new()
        .batch(json!({"send_batch_size": 50, "timeout": "100ms"}))
        .first_processor(
            EDITOR,
            json!({"actions": [{"key": "relay.tagged", "value": "yes", "action": "insert"}]}),
        )
        .first_processor(GROUPER, json!({"root_grace": "50ms"}))
        .first_processor(LIMITER, json!({"limit_mib": 256, "spike_limit_mib": 64}))
        .exporter(EXPORTER, exporter)
        .extension(
            EXTENSION,
            json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": token_url}),
        )
}

/// One sample of a /metrics page: name, labels (without the relay's resource labels,
/// `service_*`, which every series carries) and value.
type Sample = (String, BTreeMap<String, String>, f64);

fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let mut map = BTreeMap::new();
        // Label values here hold no commas or quotes (ids, reasons, versions).
        for pair in labels.trim_end_matches('}').split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').expect("label=value");
            if !k.starts_with("service_") {
                map.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
        out.push((name.to_string(), map, value.parse().expect("a number")));
    }
    out
}

/// A series the relay must serve: name, labels, and the value it must have (None: any).
struct Want {
    name: String,
    labels: BTreeMap<String, String>,
    value: Option<f64>,
}

fn want(name: &str, labels: Vec<(&str, &str)>, value: Option<f64>) -> Want {
    Want {
        name: name.to_string(),
        labels: labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        value,
    }
}

/// The series every configured component of `config` must serve from start.
fn expected_series() -> Vec<Want> {
    let mut all = Vec::new();
    let mut zero = |name: &str, labels: Vec<(&str, &str)>| all.push(want(name, labels, Some(0.0)));
    for transport in ["grpc", "http"] {
        let base = vec![("receiver", "otlp"), ("transport", transport)];
        for name in [
            "otelcol_receiver_accepted_spans_total",
            "otelcol_receiver_failed_spans_total",
            "otlp_relay_receiver_open_connections",
        ] {
            zero(name, base.clone());
        }
        for reason in ["memory_limit", "queue_full", "shutting_down", "spool_full", "disk_full"] {
            zero(
                "otelcol_receiver_refused_spans_total",
                [&base[..], &[("reason", reason)]].concat(),
            );
        }
        for reason in [
            "idle_timeout",
            "header_timeout",
            "handshake_timeout",
            "handshake_failed",
            "body_timeout",
        ] {
            zero(
                "otlp_relay_receiver_connections_closed_total",
                [&base[..], &[("reason", reason)]].concat(),
            );
        }
        zero(
            "otlp_relay_receiver_connections_refused_total",
            [&base[..], &[("reason", "max_connections")]].concat(),
        );
    }
    let e = vec![("exporter", EXPORTER)];
    for name in [
        "otelcol_exporter_sent_spans_total",
        "otelcol_exporter_send_failed_spans_total",
        "otelcol_exporter_enqueue_failed_spans_total",
        "otlp_relay_exporter_unauthorized_total",
        "otlp_relay_spool_bytes",
        "otlp_relay_spool_records",
        "otlp_relay_spool_corrupt_records_total",
        "otlp_relay_dead_letter_spans_total",
        "otlp_relay_batch_unsplittable_items_total",
        "otlp_relay_export_duration_seconds_count",
        "otlp_relay_mlflow_poison_traces_total",
        "otlp_relay_mlflow_isolation_requests_total",
    ] {
        zero(name, e.clone());
    }
    zero(
        "otelcol_exporter_queue_size",
        vec![("exporter", EXPORTER), ("data_type", "traces")],
    );
    for reason in ["connection", "timeout", "server_busy", "unauthorized", "token"] {
        zero(
            "otlp_relay_exporter_retries_total",
            vec![("exporter", EXPORTER), ("reason", reason)],
        );
    }
    for reason in ["panic", "shutdown", "corrupt", "spool_full"] {
        zero(
            "otlp_relay_exporter_dropped_spans_total",
            vec![("exporter", EXPORTER), ("reason", reason)],
        );
    }
    for reason in ["found", "created"] {
        zero(
            "otlp_relay_mlflow_experiment_lookups_total",
            vec![("exporter", EXPORTER), ("reason", reason)],
        );
    }
    for processor in PROCESSORS {
        for name in [
            "otelcol_processor_incoming_items_total",
            "otelcol_processor_outgoing_items_total",
        ] {
            zero(name, vec![("processor", processor), ("otel_signal", "traces")]);
        }
        zero("otelcol_processor_dropped_spans_total", vec![("processor", processor)]);
    }
    for name in [
        "otelcol_processor_batch_batch_size_trigger_send_total",
        "otelcol_processor_batch_timeout_trigger_send_total",
        "otelcol_processor_batch_batch_send_size_count",
    ] {
        zero(name, vec![("processor", "batch")]);
    }
    for result in ["success", "rejected"] {
        zero(
            "otlp_relay_token_requests_total",
            vec![("extension", EXTENSION), ("result", result)],
        );
    }
    // The token endpoint is down: the warm-up fetch may have failed already.
    all.push(want(
        "otlp_relay_token_requests_total",
        vec![("extension", EXTENSION), ("result", "error")],
        None,
    ));
    all
}

#[test]
fn every_series_of_a_configured_component_is_served_at_zero_before_any_traffic() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on either port: no traffic, no token; only the configuration.
    let down = format!("http://127.0.0.1:{}", free_port());
    let cfg = config(&down, &format!("{down}/token"), false);
    let relay = Relay::start(dir.path(), &cfg.yaml(), "otlp");
    let (status, text) = get_text(relay.metrics, "/metrics");
    assert_eq!(status, 200);
    let have = samples(&text);
    let mut missing = Vec::new();
    for Want { name, labels, value } in expected_series() {
        match have.iter().find(|(n, l, _)| *n == name && *l == labels) {
            None => missing.push(format!("{name}{labels:?} (absent)")),
            Some((_, _, v)) if value.is_some_and(|want| *v != want) => {
                missing.push(format!("{name}{labels:?} = {v}, want {value:?}"))
            }
            Some(_) => {}
        }
    }
    assert!(
        missing.is_empty(),
        "series not served at zero from start:\n{}\n--- /metrics:\n{text}",
        missing.join("\n")
    );
    // The collector's resource labels ride on every series, its dashboards' variables among them.
    let uptime = text
        .lines()
        .find(|l| l.starts_with("otelcol_process_uptime{"))
        .expect("otelcol_process_uptime");
    for label in [
        "service_name=\"otlp-relay\"",
        "service_instance_id=",
        "service_version=",
    ] {
        assert!(uptime.contains(label), "{uptime} lacks {label}");
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboard against a real Prometheus

/// Why Prometheus could not be had here: the only reason the dashboard test may skip.
struct NoPackage(String);

/// Debian's `prometheus` package unpacked into the test cache (once, under a file lock):
/// `apt-get download` needs no root, `dpkg-deb -x` installs nothing on the machine.
fn prometheus_bin() -> Result<PathBuf, NoPackage> {
    let root = cache_dir().join("prometheus-deb");
    let lock = std::fs::File::create(cache_dir().join("prometheus-deb.lock")).unwrap();
    lock.lock().unwrap();
    let bin = root.join("usr/bin/prometheus");
    if bin.is_file() {
        return Ok(bin);
    }
    let debs = cache_dir().join("prometheus-deb-download");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs).unwrap();
    let mut error = download(&debs);
    if error.is_some() && running_as_root() {
        // No package lists yet (a fresh image): fetch them once, as the PostgreSQL fetch does.
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        error = download(&debs);
    }
    if let Some(e) = error {
        return Err(NoPackage(e));
    }
    let deb = std::fs::read_dir(&debs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("apt-get download succeeded but left no .deb");
    let staging = cache_dir().join("prometheus-deb.partial");
    let _ = std::fs::remove_dir_all(&staging);
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&staging)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg-deb -x {}: {}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // Renamed into place whole: a run killed while unpacking leaves no half-made cache.
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&staging, &root).unwrap();
    let _ = std::fs::remove_dir_all(&debs);
    assert!(bin.is_file(), "the prometheus package holds no usr/bin/prometheus");
    Ok(bin)
}

/// `apt-get download prometheus` into `dir`: None, or what it said when it failed.
fn download(dir: &Path) -> Option<String> {
    match Command::new("apt-get")
        .args(["download", "-q", "prometheus"])
        .current_dir(dir)
        .output()
    {
        Err(e) => Some(format!("cannot run apt-get: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "apt-get download prometheus exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A Prometheus scraping `target` every second, its data in `dir`.
fn start_prometheus(bin: &Path, dir: &Path, target: SocketAddr) -> (Proc, SocketAddr) {
    let config = write_file(
        dir,
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: otlp-relay\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={addr}"));
    let mut proc = Proc::spawn("prometheus", cmd);
    proc.wait_line("Server is ready to receive web requests", T);
    (proc, addr)
}

/// A Prometheus HTTP API answer's `data` (a GET: the label values API takes no POST), or what
/// went wrong.
fn api(prometheus: SocketAddr, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    let (status, body) = support::http("GET", prometheus, &format!("{path}?{query}"), &[], b"");
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("{status}: {e}"))?;
    if v["status"] != "success" {
        return Err(format!("{status}: {v}"));
    }
    Ok(v["data"].clone())
}

/// The dashboard's template variables resolved the way Grafana does (`label_values(metric{..},
/// label)` through the label values API, earlier variables substituted), each to its first value.
fn resolve_variables(prometheus: SocketAddr, dashboard: &Value) -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = Vec::new();
    for var in dashboard["templating"]["list"].as_array().expect("templating.list") {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap();
        let query = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: only label_values(..) is resolved here: {query}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector = substitute(selector.trim(), &values);
        let found = wait_for(&format!("a value of variable {name}"), T, || {
            let data = api(
                prometheus,
                &format!("/api/v1/label/{}/values", label.trim()),
                &[("match[]", &selector)],
            )
            .ok()?;
            data.as_array()?.first()?.as_str().map(str::to_string)
        });
        values.push((name.to_string(), found));
    }
    values
}

/// `expr` with the variables and Grafana's interval macros replaced (longest names first, so
/// `$service_name` is not taken for a prefix of another).
fn substitute(expr: &str, values: &[(String, String)]) -> String {
    let mut all: Vec<(String, String)> = values.to_vec();
    // Four scrape intervals, as Grafana's $__rate_interval is at least.
    for (macro_name, v) in [("__rate_interval", "30s"), ("__interval", "5s"), ("__range", "5m")] {
        all.push((macro_name.to_string(), v.to_string()));
    }
    all.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let mut out = expr.to_string();
    for (name, value) in &all {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

/// Every `expr` of the dashboard's panels (rows' nested panels included).
fn exprs(panels: &Value, out: &mut BTreeSet<String>) {
    for panel in panels.as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                out.insert(e.to_string());
            }
        }
        exprs(&panel["panels"], out);
    }
}

#[test]
fn every_query_of_the_dashboard_returns_data_from_a_real_prometheus() {
    let bin = match prometheus_bin() {
        Ok(bin) => bin,
        Err(NoPackage(why)) => {
            eprintln!(
                "\n!!!!!!!!!! SKIPPED: every_query_of_the_dashboard_returns_data_from_a_real_prometheus\n\
                 !!!!!!!!!! Debian's prometheus package cannot be fetched here: {why}\n\
                 !!!!!!!!!! The dashboard's queries were NOT checked.\n"
            );
            return;
        }
    };
    let text = std::fs::read_to_string(support::repo_root().join("deploy/grafana/otlp-relay-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = BTreeSet::new();
    exprs(&dashboard["panels"], &mut queries);
    assert!(queries.len() >= 20, "too few queries found: {queries:?}");

    let idp = OidcProvider::start(OidcOptions::default());
    let sink = Sink::start(&["--require-jwt", &idp.jwks_url(), "--audience", "mlflow"]);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &config(&sink.url(), &idp.token_url(), true).yaml(), "otlp");
    let (_prometheus, prom) = start_prometheus(&bin, dir.path(), relay.metrics);
    // A little load for as long as the queries take; both transports, so every panel has a line.
    let grpc = relay.grpc.unwrap().to_string();
    let http = relay.http.unwrap().to_string();
    let load = |endpoint: &str, http: bool| {
        let mut args = vec![
            "loadgen",
            "--otlp-insecure",
            "--otlp-endpoint",
            endpoint,
            "--rate",
            "200",
            "--duration",
            "90s",
            "--batch-size",
            "20",
        ];
        if http {
            args.push("--otlp-http");
        }
        Proc::relay("loadgen", &args)
    };
    let _loads = [load(&grpc, false), load(&http, true)];

    let variables = resolve_variables(prom, &dashboard);
    let mut pending: BTreeMap<String, String> =
        queries.iter().map(|q| (q.clone(), substitute(q, &variables))).collect();
    let mut last_error: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(80);
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(
            |original, query| match api(prom, "/api/v1/query", &[("query", query)]) {
                Ok(data) if data["result"].as_array().is_some_and(|r| !r.is_empty()) => false,
                Ok(data) => {
                    last_error.insert(original.clone(), format!("empty result: {data}"));
                    true
                }
                Err(e) => {
                    last_error.insert(original.clone(), e);
                    true
                }
            },
        );
        if !pending.is_empty() {
            // Ask again once Prometheus has scraped the relay again (once a second).
            let before = last_scrape(prom);
            wait_for("the next scrape", Duration::from_secs(10), || {
                (last_scrape(prom) > before).then_some(())
            });
        }
    }
    let failed: Vec<String> = pending
        .iter()
        .map(|(q, sent)| {
            format!(
                "{q}\n  sent: {sent}\n  last: {}",
                last_error.get(q).map_or("", String::as_str)
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "dashboard queries without data (variables {variables:?}):\n{}\n--- relay /metrics:\n{}",
        failed.join("\n"),
        get_text(relay.metrics, "/metrics").1
    );
}

/// When Prometheus last scraped the relay (Unix seconds; 0 before the first scrape).
fn last_scrape(prometheus: SocketAddr) -> f64 {
    api(prometheus, "/api/v1/query", &[("query", "timestamp(up)")])
        .ok()
        .and_then(|v| v["result"][0]["value"][1].as_str()?.parse().ok())
        .unwrap_or(0.0)
}

/// An OTLP/protobuf request of one span whose trace id is 3 bytes long (invalid).
fn invalid_span_request() -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![1, 2, 3],
                    span_id: vec![9; 8],
                    name: "bad".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

#[test]
fn the_collector_counters_count_what_flows() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", free_port());
    // 13 traces of 5 spans in one request: a batch of 50 goes out on size, the other 15 on timeout.
    let cfg = config(&sink.url(), &format!("{down}/token"), false)
        .batch(json!({"send_batch_size": 50, "send_batch_max_size": 50, "timeout": "200ms"}));
    let relay = Relay::start(dir.path(), &cfg.yaml(), "otlp");
    let grpc = relay.grpc.unwrap().to_string();
    let (code, report) = support::otlp::loadgen(&[
        "--otlp-insecure",
        "--otlp-endpoint",
        &grpc,
        "--traces",
        "13",
        "--child-spans",
        "4",
        "--batch-size",
        "65",
    ]);
    assert_eq!(code, 0, "{report}");
    sink.wait_unique(65, T);
    let m = |name: &str, labels: &[(&str, &str)]| relay.metric(name, labels);
    wait_for("the batches counted", T, || {
        (m("otelcol_exporter_sent_spans_total", &[]) == 65.0).then_some(())
    });
    assert_eq!(
        m("otelcol_receiver_accepted_spans_total", &[("transport", "grpc")]),
        65.0
    );
    for processor in PROCESSORS {
        let items = [("processor", processor), ("otel_signal", "traces")];
        assert_eq!(
            m("otelcol_processor_incoming_items_total", &items),
            65.0,
            "{processor} in"
        );
        assert_eq!(
            m("otelcol_processor_outgoing_items_total", &items),
            65.0,
            "{processor} out"
        );
    }
    let by = [("processor", "batch")];
    let size = m("otelcol_processor_batch_batch_size_trigger_send_total", &by);
    let timeout = m("otelcol_processor_batch_timeout_trigger_send_total", &by);
    assert_eq!((size, timeout), (1.0, 1.0), "batches by trigger");
    assert_eq!(m("otelcol_processor_batch_batch_send_size_count", &by), 2.0);
    assert_eq!(m("otelcol_processor_batch_batch_send_size_sum", &by), 65.0);

    // An invalid span is the receiver's own failure, not a refusal from downstream.
    let (status, body) = support::http(
        "POST",
        relay.http.unwrap(),
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &invalid_span_request(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(m("otelcol_receiver_failed_spans_total", &[("transport", "http")]), 1.0);
    assert_eq!(m("otelcol_receiver_refused_spans_total", &[]), 0.0);
    assert_eq!(m("otelcol_exporter_enqueue_failed_spans_total", &[]), 0.0);
}
