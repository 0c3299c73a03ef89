//! MLflow-native delivery against a real `mlflow server`: traces linked to the run their
//! resource names, experiments named by spans (looked up once, created once, looked up again once
//! MLflow no longer has them), a trace MLflow refuses isolated from the good traces it came
//! with, and a refusal of every trace failing the request whole after a few requests.
mod support;

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use serde_json::json;
use support::config::RelayConfig;
use support::mlflow::Mlflow;
use support::otlp::Relay;

fn attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// A trace of a root and `children` child spans; `poison` gives one child an attribute MLflow
/// cannot store (token usage that is not a number: MLflow answers 422).
fn trace(seed: u8, n: u32, children: u32, poison: bool) -> Vec<Span> {
    let mut trace_id = vec![seed; 12];
    trace_id.extend_from_slice(&n.to_be_bytes());
    let root_id = {
        let mut id = vec![0xaa; 4];
        id.extend_from_slice(&n.to_be_bytes());
        id
    };
    let start = 1_700_000_000_000_000_000u64 + u64::from(n) * 1_000_000;
    let mut spans = vec![Span {
        trace_id: trace_id.clone(),
        span_id: root_id.clone(),
        name: format!("root-{n}"),
        start_time_unix_nano: start,
        end_time_unix_nano: start + 900_000,
        ..Default::default()
    }];
    for c in 0..children {
        let mut span_id = vec![0xbb, c as u8 + 1, 0, 0];
        span_id.extend_from_slice(&n.to_be_bytes());
        let mut attributes = vec![attr("step", &c.to_string())];
        if poison && c == 0 {
            attributes.push(attr("mlflow.chat.tokenUsage", r#"{"input_tokens": "many"}"#));
        }
        spans.push(Span {
            trace_id: trace_id.clone(),
            span_id,
            parent_span_id: root_id.clone(),
            name: format!("child-{n}-{c}"),
            start_time_unix_nano: start + 100_000,
            end_time_unix_nano: start + 800_000,
            attributes,
            ..Default::default()
        });
    }
    spans
}

/// One OTLP request: a resource with `resource` attributes holding `spans`.
fn request(resource: &[(&str, &str)], spans: Vec<Span>) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| attr(k, v)).collect(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn post(relay: &Relay, body: &[u8]) {
    post_with(relay, body, &[]);
}

/// POSTs an OTLP/protobuf request to the relay's HTTP receiver with extra headers.
fn post_with(relay: &Relay, body: &[u8], headers: &[(&str, &str)]) {
    let mut all = vec![("content-type", "application/x-protobuf")];
    all.extend_from_slice(headers);
    let (status, answer) = support::http("POST", relay.http.unwrap(), "/v1/traces", &all, body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

fn relay_config(mlflow: &Mlflow, mlflow_options: serde_json::Value) -> String {
    RelayConfig::new()
        .receiver("http", json!({"include_metadata": true}))
        .batch(json!({"send_batch_size": 1000, "timeout": "100ms"}))
        .exporter(
            "otlphttp/mlflow",
            json!({
                "endpoint": mlflow.url(),
                "headers": {"x-mlflow-experiment-id": "0"},
                "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s"},
                "mlflow": mlflow_options,
            }),
        )
        .yaml()
}

fn experiment_id(mlflow: &Mlflow, name: &str) -> Option<String> {
    let (status, body) = support::http(
        "GET",
        mlflow.addr,
        &format!("/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"),
        &[],
        b"",
    );
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (status == 200).then(|| body["experiment"]["experiment_id"].as_str().unwrap().to_string())
}

/// Traces of an experiment matching an MLflow search filter.
fn search(mlflow: &Mlflow, experiment: &str, filter: &str) -> Vec<serde_json::Value> {
    let (status, body) = mlflow.post_json(
        "/api/3.0/mlflow/traces/search",
        &json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment}}],
            "filter": filter,
            "max_results": 500,
        }),
    );
    assert_eq!(status, 200, "{body}");
    body["traces"].as_array().cloned().unwrap_or_default()
}

#[test]
fn run_linkage_and_experiments_by_name() {
    let mlflow = Mlflow::start();
    let (status, run) = mlflow.post_json("/api/2.0/mlflow/runs/create", &json!({"experiment_id": "0"}));
    assert_eq!(status, 200, "{run}");
    let run_id = run["run"]["info"]["run_id"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        dir.path(),
        &relay_config(
            &mlflow,
            json!({"create_experiments": true, "experiment_name_attribute": "service.name"}),
        ),
        "otlp",
    );

    let named = routing_by_name_and_by_service_name(&mlflow, &relay, &run_id);
    header_links_traces_to_another_run(&mlflow, &relay, &named, &run_id);
    a_second_relay_finds_names_or_says_why_not(&mlflow, &named);
    many_traces_for_one_run_are_all_linked(&mlflow, &relay);
}

/// Traces for a run in an experiment created by name, more by name, and one experiment per
/// agent by service.name; each name created once. Returns the id of the experiment named.
fn routing_by_name_and_by_service_name(mlflow: &Mlflow, relay: &Relay, run_id: &str) -> String {
    // Three traces for a run in an experiment that does not exist yet; then two more by name.
    let linked: Vec<Span> = (0..3).flat_map(|n| trace(1, n, 2, false)).collect();
    post(
        relay,
        &request(
            &[("mlflow.experiment_name", "routing by name"), ("mlflow.run_id", run_id)],
            linked,
        ),
    );
    let named = support::wait_for("the experiment created by name", Duration::from_secs(60), || {
        experiment_id(mlflow, "routing%20by%20name")
    });
    support::wait_for("3 traces in it", Duration::from_secs(60), || {
        (mlflow.search_traces(&named).len() == 3).then_some(())
    });
    let more: Vec<Span> = (3..5).flat_map(|n| trace(1, n, 1, false)).collect();
    post(relay, &request(&[("mlflow.experiment_name", "routing by name")], more));
    // One experiment per agent: service.name names it when nothing else does.
    let agent: Vec<Span> = (0..2).flat_map(|n| trace(2, n, 1, false)).collect();
    post(relay, &request(&[("service.name", "agent-7")], agent));

    support::wait_for("5 traces by name", Duration::from_secs(60), || {
        (mlflow.search_traces(&named).len() == 5).then_some(())
    });
    let per_agent = support::wait_for("the agent's experiment", Duration::from_secs(60), || {
        experiment_id(mlflow, "agent-7")
    });
    support::wait_for("2 traces of the agent", Duration::from_secs(60), || {
        (mlflow.search_traces(&per_agent).len() == 2).then_some(())
    });
    // The run lists exactly the traces whose resource named it.
    let by_run = search(mlflow, &named, &format!("metadata.`mlflow.sourceRun` = '{run_id}'"));
    assert_eq!(by_run.len(), 3, "{by_run:#?}");
    assert!(
        mlflow.search_traces("0").is_empty(),
        "nothing fell back to the default experiment"
    );
    // Each name was created once, then remembered: no further lookups.
    assert_eq!(
        relay.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "created")]),
        2.0
    );
    assert_eq!(
        relay.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "found")]),
        0.0
    );
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 0.0);
    named
}

/// The request's x-mlflow-run-id header links its traces to another run.
fn header_links_traces_to_another_run(mlflow: &Mlflow, relay: &Relay, named: &str, run_id: &str) {
    // The request's x-mlflow-run-id header (include_metadata) links its traces to another run.
    let (status, run2) = mlflow.post_json("/api/2.0/mlflow/runs/create", &json!({"experiment_id": named}));
    assert_eq!(status, 200, "{run2}");
    let run2 = run2["run"]["info"]["run_id"].as_str().unwrap().to_string();
    post_with(
        relay,
        &request(&[("mlflow.experiment_name", "routing by name")], trace(1, 9, 1, false)),
        &[("x-mlflow-run-id", &run2)],
    );
    support::wait_for("the traces linked to the header's run", Duration::from_secs(60), || {
        (search(mlflow, named, &format!("metadata.`mlflow.sourceRun` = '{run2}'")).len() == 1).then_some(())
    });
    assert_eq!(
        search(mlflow, named, &format!("metadata.`mlflow.sourceRun` = '{run_id}'")).len(),
        3
    );
}

/// A second relay finds the experiment instead of creating it; one that may not create fails
/// an unknown name and says why.
fn a_second_relay_finds_names_or_says_why_not(mlflow: &Mlflow, named: &str) {
    // A second relay (a restart, or another replica) finds the experiment instead of creating it;
    // one that may not create fails a name MLflow does not know, and says why.
    let dir2 = tempfile::tempdir().unwrap();
    let relay2 = Relay::start(dir2.path(), &relay_config(mlflow, json!({})), "otlp");
    post(
        &relay2,
        &request(&[("mlflow.experiment_name", "routing by name")], trace(3, 0, 1, false)),
    );
    post(
        &relay2,
        &request(
            &[("mlflow.experiment_name", "no such experiment")],
            trace(3, 1, 1, false),
        ),
    );
    support::wait_for("7 traces by name", Duration::from_secs(60), || {
        (mlflow.search_traces(named).len() == 7).then_some(())
    });
    support::wait_for("the unknown name's spans failed", Duration::from_secs(60), || {
        (relay2.metric("otelcol_exporter_send_failed_spans_total", &[]) == 2.0).then_some(())
    });
    assert_eq!(
        relay2.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "found")]),
        1.0
    );
    assert_eq!(
        relay2.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "created")]),
        0.0
    );
    let log = relay2.proc.output_text();
    assert!(
        log.contains("no such experiment")
            && log.contains("Could not find experiment")
            && log.contains("mlflow.create_experiments is off"),
        "{log}"
    );
    assert_eq!(experiment_id(mlflow, "no%20such%20experiment"), None);
}

/// 150 traces for a run in one request are all linked (MLflow links at most 100 per request).
fn many_traces_for_one_run_are_all_linked(mlflow: &Mlflow, relay: &Relay) {
    // MLflow links at most 100 traces to a run per request (with more it links none and still
    // answers 200): 150 traces for a run in one request are all linked.
    let many = mlflow.create_experiment("many traces for a run");
    let (status, run3) = mlflow.post_json("/api/2.0/mlflow/runs/create", &json!({"experiment_id": many}));
    assert_eq!(status, 200, "{run3}");
    let run3 = run3["run"]["info"]["run_id"].as_str().unwrap().to_string();
    let spans: Vec<Span> = (0..150).flat_map(|n| trace(6, n, 0, false)).collect();
    post(
        relay,
        &request(&[("mlflow.experiment_id", &many), ("mlflow.run_id", &run3)], spans),
    );
    support::wait_for("150 traces stored", Duration::from_secs(60), || {
        (mlflow.search_traces(&many).len() == 150).then_some(())
    });
    // MLflow links a request's traces after it stored their spans: a trace can be found before
    // its link is, so the links are polled too (with the same deadline, so a missing one fails).
    let filter = format!("metadata.`mlflow.sourceRun` = '{run3}'");
    support::wait_for("150 traces linked to the run", Duration::from_secs(60), || {
        (search(mlflow, &many, &filter).len() == 150).then_some(())
    });
}

/// Good traces and one MLflow refuses, in one request: MLflow stores every good trace, the bad
/// one alone fails (dead-lettered), in a bounded number of requests.
#[test]
fn a_poisoned_trace_costs_only_itself() {
    const GOOD: u32 = 40;
    let mlflow = Mlflow::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let config = RelayConfig::new()
        .batch(json!({"send_batch_size": 10000, "timeout": "200ms"}))
        .exporter(
            "otlphttp/mlflow",
            json!({
                "endpoint": mlflow.url(),
                "headers": {"x-mlflow-experiment-id": "0"},
                "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s"},
                "sending_queue": {"storage": "file_storage/spool", "num_consumers": 1},
            }),
        )
        .extension("file_storage/spool", json!({"directory": spool}))
        .yaml();
    let relay = Relay::start(dir.path(), &config, "otlp");
    // The poisoned trace sits among the good ones, so both halves of the request hold good traces.
    let mut spans = Vec::new();
    for n in 0..=GOOD {
        spans.extend(trace(9, n, 2, n == GOOD / 3));
    }
    post(&relay, &request(&[("service.name", "poison-test")], spans));

    support::wait_for("the poisoned trace isolated", Duration::from_secs(90), || {
        (relay.metric("otlp_relay_mlflow_poison_traces_total", &[]) == 1.0).then_some(())
    });
    let stored = support::wait_for("every good trace in MLflow", Duration::from_secs(60), || {
        let t = mlflow.search_traces("0");
        (t.len() >= GOOD as usize).then_some(t)
    });
    assert_eq!(stored.len(), GOOD as usize, "only the good traces are stored");
    let poisoned_id = format!("{}{:08x}", "09".repeat(12), GOOD / 3);
    assert!(
        stored
            .iter()
            .all(|t| !t["trace_id"].as_str().unwrap_or("").contains(&poisoned_id)),
        "{stored:#?}"
    );
    // Its three spans alone fail and are kept for replay; the rest were sent.
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 3.0);
    assert_eq!(relay.metric("otlp_relay_dead_letter_spans_total", &[]), 3.0);
    assert_eq!(
        relay.metric("otelcol_exporter_sent_spans_total", &[]),
        f64::from(GOOD * 3)
    );
    // 41 traces: at most 2·⌈log2 41⌉ + 1 = 13 requests beyond the refused one.
    let requests = relay.metric("otlp_relay_mlflow_isolation_requests_total", &[]);
    assert!((6.0..=13.0).contains(&requests), "{requests} isolation requests");
    let log = relay.proc.output_text();
    assert!(
        log.contains("MLflow refused part of a request") && log.contains("422"),
        "{log}"
    );

    // MLflow refusing every trace is a refusal not about a trace: down the left edge to two
    // traces refused alone, the rest refused once, and the request fails whole, as one.
    let isolation_requests = relay.metric("otlp_relay_mlflow_isolation_requests_total", &[]);
    let spans: Vec<Span> = (0..32).flat_map(|n| trace(10, n, 1, true)).collect();
    post(&relay, &request(&[("service.name", "poison-test")], spans));
    support::wait_for("the request failed whole", Duration::from_secs(90), || {
        (relay.metric("otelcol_exporter_send_failed_spans_total", &[]) == 3.0 + 64.0).then_some(())
    });
    // ⌈log2 32⌉ requests down to trace 0, trace 1 alone, then the rest: 7 (the budget is 44).
    let requests = relay.metric("otlp_relay_mlflow_isolation_requests_total", &[]) - isolation_requests;
    assert!((5.0..=7.0).contains(&requests), "{requests} isolation requests");
    assert_eq!(relay.metric("otlp_relay_mlflow_poison_traces_total", &[]), 1.0);
    assert_eq!(relay.metric("otlp_relay_dead_letter_spans_total", &[]), 3.0 + 64.0);
    assert_eq!(mlflow.search_traces("0").len(), GOOD as usize);
    let log = relay.proc.output_text();
    assert!(log.contains("its refusal is not about a trace"), "{log}");
}

/// An experiment the relay remembers by name that MLflow then no longer has (deleted and purged
/// with `mlflow gc`): MLflow answers 404 for its id, the relay forgets it, creates the name anew
/// and stores the spans there, and nothing fails.
#[test]
fn a_purged_experiment_is_looked_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:///{}", dir.path().join("mlflow.db").display());
    let mlflow = Mlflow::start_on(support::mlflow::mlflow_venv(), Some(&db), &[]);
    let relay = Relay::start(
        dir.path(),
        &relay_config(&mlflow, json!({"create_experiments": true})),
        "otlp",
    );
    let named = |n: u32| request(&[("mlflow.experiment_name", "purged")], trace(11, n, 1, false));
    post(&relay, &named(0));
    let first = support::wait_for("the experiment created", Duration::from_secs(60), || {
        experiment_id(&mlflow, "purged")
    });
    support::wait_for("its trace stored", Duration::from_secs(60), || {
        (mlflow.search_traces(&first).len() == 1).then_some(())
    });
    let (status, body) = mlflow.post_json("/api/2.0/mlflow/experiments/delete", &json!({"experiment_id": first}));
    assert_eq!(status, 200, "{body}");
    let gc = std::process::Command::new(mlflow.venv.join("bin/mlflow"))
        .args(["gc", "--backend-store-uri", &db, "--tracking-uri", &mlflow.url()])
        .args(["--experiment-ids", &first])
        .env("MLFLOW_TRACKING_URI", "")
        .output()
        .unwrap();
    assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
    assert_eq!(experiment_id(&mlflow, "purged"), None);

    post(&relay, &named(1));
    let second = support::wait_for("the experiment created again", Duration::from_secs(60), || {
        experiment_id(&mlflow, "purged")
    });
    let new_trace = format!("{}{:08x}", "0b".repeat(12), 1);
    support::wait_for("the new trace stored there", Duration::from_secs(60), || {
        let traces = mlflow.search_traces(&second);
        traces
            .iter()
            .any(|t| t["trace_id"].as_str().unwrap_or("").contains(&new_trace))
            .then_some(())
    });
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 0.0);
    assert_eq!(
        relay.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "created")]),
        2.0
    );
    let log = relay.proc.output_text();
    assert!(log.contains("no longer has the experiment"), "{log}");
}

/// Without isolation the same request fails whole: what the test above shows is the isolation.
#[test]
fn without_isolation_the_request_fails_whole() {
    let mlflow = Mlflow::start();
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        dir.path(),
        &relay_config(&mlflow, json!({"isolate_poison_traces": false})),
        "otlp",
    );
    let mut spans = Vec::new();
    for n in 0..10 {
        spans.extend(trace(5, n, 1, n == 4));
    }
    post(&relay, &request(&[], spans));
    support::wait_for("the request failed", Duration::from_secs(60), || {
        (relay.metric("otelcol_exporter_send_failed_spans_total", &[]) == 20.0).then_some(())
    });
    assert!(mlflow.search_traces("0").is_empty());
    assert_eq!(relay.metric("otlp_relay_mlflow_isolation_requests_total", &[]), 0.0);
}

/// Experiment lookups go through the gate with the exporter's client-credentials token, as the
/// spans do: a name is created once, then remembered.
#[test]
fn experiment_by_name_through_the_gate_with_a_token() {
    use support::oidc::{self, OidcOptions, OidcProvider};
    let mlflow = Mlflow::start();
    let provider = OidcProvider::start(OidcOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(support::bin());
    cmd.arg("gate")
        .env("NO_COLOR", "1")
        .env("OIDC_DISCOVERY_URL", provider.discovery_url())
        .env("OIDC_CLIENT_ID", oidc::CLIENT_ID)
        .env("OIDC_CLIENT_SECRET", oidc::CLIENT_SECRET)
        .env("OIDC_GROUP_NAME", "mlflow")
        .env("SECRET_KEY", "a routing test secret key that is long enough")
        .env("GATE_LISTEN", "127.0.0.1:0")
        .env("GATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("GATE_ALLOWED_HOSTS", "127.0.0.1")
        .env("GATE_UPSTREAM", mlflow.url());
    let mut gate = support::Proc::spawn("gate", cmd);
    let gate_addr = gate.wait_listen("gate", support::STARTUP);
    let admin = gate.wait_listen("gate-admin", support::STARTUP);
    support::wait_for("the gate to have the provider's keys", Duration::from_secs(30), || {
        let (s, _, b) = support::http_exchange("GET", admin, "/gate/healthz", &[], b"");
        (s == 200 && String::from_utf8_lossy(&b).contains("\"oidc_ready\":true")).then_some(())
    });
    // Without a token the gate refuses the lookup: the relay's must be what lets it through.
    let (status, _) = support::http(
        "GET",
        gate_addr,
        "/api/2.0/mlflow/experiments/get-by-name?experiment_name=gated",
        &[],
        b"",
    );
    assert!(status == 401 || status == 302, "{status}");
    let config = RelayConfig::new()
        .batch(json!({"send_batch_size": 1000, "timeout": "100ms"}))
        .exporter(
            "otlphttp/mlflow",
            json!({
                "endpoint": format!("http://{gate_addr}"),
                "headers": {"x-mlflow-experiment-id": "0"},
                "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s"},
                "auth": {"authenticator": "oauth2client/keycloak"},
                "mlflow": {"create_experiments": true},
            }),
        )
        .extension(
            "oauth2client/keycloak",
            json!({"client_id": oidc::CLIENT_ID, "client_secret": oidc::CLIENT_SECRET, "token_url": provider.token_url()}),
        )
        .yaml();
    let relay = Relay::start(dir.path(), &config, "otlp");
    post(
        &relay,
        &request(&[("mlflow.experiment_name", "gated")], trace(4, 0, 1, false)),
    );
    let id = support::wait_for(
        "the experiment created through the gate",
        Duration::from_secs(60),
        || experiment_id(&mlflow, "gated"),
    );
    support::wait_for("the first trace", Duration::from_secs(60), || {
        (mlflow.search_traces(&id).len() == 1).then_some(())
    });
    post(
        &relay,
        &request(&[("mlflow.experiment_name", "gated")], trace(4, 1, 1, false)),
    );
    support::wait_for("the second trace", Duration::from_secs(60), || {
        (mlflow.search_traces(&id).len() == 2).then_some(())
    });
    assert_eq!(
        relay.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "created")]),
        1.0,
        "{}",
        relay.proc.output_text()
    );
    assert_eq!(
        relay.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "found")]),
        0.0
    );
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 0.0);
    let log = relay.proc.output_text();
    assert!(!log.contains("eyJ"), "a token reached the log: {log}");
}

/// With MLflow's workspaces, a name is looked up and created in the workspace the resource (or
/// the request's header) names: the same name is two experiments in two workspaces.
#[test]
fn workspaces_scope_experiment_names() {
    let mlflow = Mlflow::start_with(&["--enable-workspaces"]);
    for ws in ["team-a", "team-b"] {
        let (status, body) = mlflow.post_json("/api/3.0/mlflow/workspaces", &json!({"name": ws}));
        assert_eq!(status, 201, "{body}");
    }
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(
        dir.path(),
        &relay_config(&mlflow, json!({"create_experiments": true})),
        "otlp",
    );
    for (n, ws) in [(0, "team-a"), (1, "team-b")] {
        post(
            &relay,
            &request(
                &[("mlflow.experiment_name", "shared"), ("mlflow.workspace", ws)],
                trace(7, n, 1, false),
            ),
        );
    }
    // The request's header names the workspace when the resource does not.
    post_with(
        &relay,
        &request(&[("mlflow.experiment_name", "shared")], trace(7, 2, 1, false)),
        &[("x-mlflow-workspace", "team-b")],
    );
    let in_workspace = |ws: &str| -> Option<(String, usize)> {
        let (status, body) = support::http(
            "GET",
            mlflow.addr,
            "/api/2.0/mlflow/experiments/get-by-name?experiment_name=shared",
            &[("x-mlflow-workspace", ws)],
            b"",
        );
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let id = (status == 200).then(|| body["experiment"]["experiment_id"].as_str().unwrap().to_string())?;
        let search = json!({
            "locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": id}}],
            "max_results": 100,
        })
        .to_string();
        let (status, body) = support::http(
            "POST",
            mlflow.addr,
            "/api/3.0/mlflow/traces/search",
            &[("content-type", "application/json"), ("x-mlflow-workspace", ws)],
            search.as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        Some((id, body["traces"].as_array().map_or(0, Vec::len)))
    };
    let (id_a, _) = support::wait_for("team-a's experiment with its trace", Duration::from_secs(60), || {
        in_workspace("team-a").filter(|(_, n)| *n == 1)
    });
    let (id_b, _) = support::wait_for("team-b's experiment with its 2 traces", Duration::from_secs(60), || {
        in_workspace("team-b").filter(|(_, n)| *n == 2)
    });
    assert_ne!(id_a, id_b);
    assert_eq!(
        relay.metric("otlp_relay_mlflow_experiment_lookups_total", &[("reason", "created")]),
        2.0
    );
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 0.0);
}
