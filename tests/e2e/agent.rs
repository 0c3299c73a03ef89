//! An agent's traces through relay (and gate) into MLflow on PostgreSQL, read back by the SDK, the
//! database and the UI.

use super::*;

// ---------------------------------------------------------------------------------------------
// The gate

const SECRET_KEY: &str = "an e2e test secret key that is long enough";

struct Gate {
    _proc: Proc,
    addr: SocketAddr,
}

/// `otlp-relay gate` in front of `upstream`: members of mlflow (and its admin group) and of
/// mlflow-readers are let in; readers may read only experiments named `elsewhere-*`.
fn gate(provider: &OidcProvider, upstream: &str, dir: &Path) -> Gate {
    let perms = support::write_file(
        dir,
        "permissions.yaml",
        "groups:\n  mlflow-readers:\n    \"elsewhere-*\": READ\n",
    );
    let mut cmd = Command::new(support::bin());
    cmd.arg("gate")
        .env("NO_COLOR", "1")
        .env("OIDC_DISCOVERY_URL", provider.discovery_url())
        .env("OIDC_CLIENT_ID", oidc::CLIENT_ID)
        .env("OIDC_CLIENT_SECRET", oidc::CLIENT_SECRET)
        .env("OIDC_GROUP_NAME", "mlflow,mlflow-readers")
        .env("GATE_PERMISSIONS_FILE", &perms)
        .env("SECRET_KEY", SECRET_KEY)
        .env("GATE_LISTEN", "127.0.0.1:0")
        .env("GATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("GATE_ALLOWED_HOSTS", "127.0.0.1")
        .env("GATE_UPSTREAM", upstream);
    let mut proc = Proc::spawn("gate", cmd);
    let addr = proc.wait_listen("gate", support::STARTUP);
    let admin = proc.wait_listen("gate-admin", support::STARTUP);
    wait_for("the gate to have the provider's keys", Duration::from_secs(30), || {
        let (s, _, b) = support::http_exchange("GET", admin, "/gate/healthz", &[], b"");
        (s == 200 && String::from_utf8_lossy(&b).contains("\"oidc_ready\":true")).then_some(())
    });
    Gate { _proc: proc, addr }
}

// ---------------------------------------------------------------------------------------------
// The pipeline

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// relay → gate (OAuth2 client-credentials token) → mlflow
    Token,
    /// relay → mlflow (the mesh secures that hop)
    Direct,
}

/// Everything of one case, dropped in this order: relay, gate, provider, mlflow, postgres.
struct World {
    relay: Relay,
    gate: Option<Gate>,
    provider: Option<OidcProvider>,
    mlflow: Mlflow,
    postgres: Postgres,
    experiment: String,
    /// Where the agent exports without the relay, for comparison.
    baseline: String,
    venv: PathBuf,
    dir: tempfile::TempDir,
}

fn setup(mode: Mode) -> World {
    let t = Instant::now();
    let venv = venv();
    // PostgreSQL then MLflow (its migrations run at start) in one thread, the provider here.
    let server = {
        let venv = venv.clone();
        std::thread::spawn(move || {
            let postgres = Postgres::start();
            create_database(&venv, &postgres);
            // The driver named: MLflow would pick psycopg 3 for a bare postgresql:// URI.
            let uri = postgres
                .uri("mlflow")
                .replace("postgresql://", "postgresql+psycopg2://");
            let mlflow = Mlflow::start_on(venv, Some(&uri), &[]);
            (postgres, mlflow)
        })
    };
    let provider = (mode == Mode::Token).then(|| {
        OidcProvider::start(OidcOptions {
            auto_login: false, // the browser fills in the provider's form
            ..Default::default()
        })
    });
    let (postgres, mlflow) = server.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    eprintln!("mlflow on postgres healthy after {:?}", mlflow.startup);
    let experiment = mlflow.create_experiment(&format!("e2e-{mode:?}").to_lowercase());
    let baseline = mlflow.create_experiment("e2e-baseline-without-relay");
    mlflow.create_experiment("elsewhere-e2e");
    let dir = tempfile::tempdir().unwrap();
    let gate = provider.as_ref().map(|p| gate(p, &mlflow.url(), dir.path()));

    let ca = Ca::new("agents-ca");
    let ca_path = ca.write(dir.path(), "ca");
    let server = ca.server().write(dir.path(), "relay");
    let tls = format!(
        r#"tls: {{cert_file: "{}", key_file: "{}", client_ca_file: "{}", allowed_clients: ["spiffe://cluster.local/ns/agents/*"]}}"#,
        server.cert.display(),
        server.key.display(),
        ca_path.display()
    );
    let (endpoint, auth, extension, extensions) = match (&gate, &provider) {
        (Some(g), Some(p)) => (
            format!("http://{}", g.addr),
            "    auth: {authenticator: oauth2client/keycloak}\n".to_string(),
            format!(
                "  oauth2client/keycloak: {{client_id: {}, client_secret: {}, token_url: \"{}\"}}\n",
                oidc::CLIENT_ID,
                oidc::CLIENT_SECRET,
                p.token_url()
            ),
            ", oauth2client/keycloak",
        ),
        _ => (mlflow.url(), String::new(), String::new(), ""),
    };
    // The exporter's default experiment is 0: the trace reaching ours shows the agent's
    // header was honoured.
    let config = format!(
        "receivers:\n  otlp:\n    protocols:\n\
         \x20     grpc: {{endpoint: \"127.0.0.1:0\", include_metadata: true, {tls}}}\n\
         \x20     http: {{endpoint: \"127.0.0.1:0\", include_metadata: true, {tls}}}\n\
         processors: {{batch: {{timeout: 100ms}}}}\n\
         exporters:\n  otlphttp/mlflow:\n    endpoint: {endpoint}\n    headers: {{x-mlflow-experiment-id: \"0\"}}\n{auth}\
         extensions:\n  health_check: {{endpoint: \"127.0.0.1:0\"}}\n{extension}\
         service:\n  extensions: [health_check{extensions}]\n\
         \x20 pipelines: {{traces: {{receivers: [otlp], processors: [batch], exporters: [otlphttp/mlflow]}}}}\n\
         \x20 telemetry: {{metrics: {{address: \"127.0.0.1:0\"}}}}\n"
    );
    let relay = Relay::start(dir.path(), &config, "otlp");
    let client = ca.client("spiffe://cluster.local/ns/agents/sa/e2e-agent");
    client.write(dir.path(), "agent");
    eprintln!("pipeline ({mode:?}) up after {:?}", t.elapsed());
    World {
        relay,
        gate,
        provider,
        mlflow,
        postgres,
        experiment,
        baseline,
        venv,
        dir,
    }
}

/// CREATE DATABASE mlflow through the venv's driver (the one `mlflow server` will use).
fn create_database(venv: &Path, pg: &Postgres) {
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import psycopg2, sys\n\
             c = psycopg2.connect(sys.argv[1])\n\
             c.autocommit = True\n\
             c.cursor().execute('CREATE DATABASE mlflow')\n",
            &pg.uri("postgres"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "CREATE DATABASE failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The trace's experiment and span names as MLflow stored them in PostgreSQL (its `trace_info`
/// and `spans` tables), read with the server's own driver.
fn stored_in_postgres(venv: &Path, pg: &Postgres, trace_id: &str) -> Value {
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import json, psycopg2, sys\n\
             cur = psycopg2.connect(sys.argv[1]).cursor()\n\
             cur.execute('SELECT experiment_id FROM trace_info WHERE request_id = %s', (sys.argv[2],))\n\
             exp = [str(r[0]) for r in cur.fetchall()]\n\
             cur.execute('SELECT name FROM spans WHERE trace_id = %s ORDER BY name', (sys.argv[2],))\n\
             print('RESULT ' + json.dumps({'experiments': exp, 'spans': [r[0] for r in cur.fetchall()]}))\n",
            &pg.uri("mlflow"),
            trace_id,
        ])
        .output()
        .unwrap();
    result_line("the PostgreSQL query", &out)
}

/// The agent: nested `@mlflow.trace` functions (a root, two children, one grandchild that fails),
/// exported by the SDK's own OTLP exporter. Prints `RESULT {"trace_id", "flushed"}`.
const AGENT: &str = r#"
import json, os
import mlflow
from mlflow.entities import SpanType

NAME = os.environ["E2E_TRACE_NAME"]

@mlflow.trace(name=NAME, span_type=SpanType.AGENT, attributes={"e2e.mode": os.environ["E2E_MODE"]})
def agent(question):
    global TRACE_ID
    TRACE_ID = mlflow.get_active_trace_id()
    docs = retrieve(question, k=2)
    return {"answer": generate(question, docs), "sources": docs}

@mlflow.trace(span_type=SpanType.RETRIEVER)
def retrieve(query, k):
    return [f"doc-{i}" for i in range(k)]

@mlflow.trace(span_type=SpanType.LLM)
def generate(question, docs):
    mlflow.get_current_active_span().set_attributes(
        {"llm.model": "e2e-model", "llm.temperature": 0.25, "llm.tokens": 42})
    try:
        check_safety(question)
    except ValueError:
        pass
    return "relayed: " + question

@mlflow.trace(span_type=SpanType.TOOL)
def check_safety(text):
    raise ValueError("e2e: unsafe input refused")

agent("what does the relay do?")
from mlflow.tracing.provider import provider
flushed = provider.get().force_flush(30000)
print("RESULT " + json.dumps({"trace_id": TRACE_ID, "flushed": flushed}), flush=True)
"#;

/// Reads the trace named E2E_TRACE_NAME back with MlflowClient, polling until its four spans are
/// there (E2E_DEADLINE seconds); prints `RESULT {trace info, spans}` or `MISSING {what was seen}`.
const READ_BACK: &str = r#"
import json, os, time
from mlflow import MlflowClient

c = MlflowClient()
name, exp = os.environ["E2E_TRACE_NAME"], os.environ["E2E_EXPERIMENT"]
deadline = time.monotonic() + float(os.environ["E2E_DEADLINE"])
seen = None
while True:
    found = [t for t in c.search_traces(locations=[exp], max_results=50)
             if any(s.name == name and s.parent_id is None for s in t.data.spans)]
    if found:
        t = c.get_trace(found[0].info.trace_id)
        seen = len(t.data.spans)
        if seen >= 4:
            break
    if time.monotonic() > deadline:
        print("MISSING " + json.dumps({"spans_seen": seen}), flush=True)
        raise SystemExit(1)
    time.sleep(0.2)
def status(s):
    code = s.status.status_code
    return {"code": getattr(code, "value", str(code)), "description": s.status.description}
print("RESULT " + json.dumps({
    "trace_id": t.info.trace_id,
    "state": str(getattr(t.info.state, "value", t.info.state)),
    "experiment_id": t.info.experiment_id,
    "spans": [{
        "name": s.name, "span_id": s.span_id, "parent_id": s.parent_id, "trace_id": s.trace_id,
        "span_type": s.span_type, "inputs": s.inputs, "outputs": s.outputs,
        "attributes": s.attributes, "status": status(s),
        "events": [e.name for e in s.events],
    } for s in t.data.spans],
}, default=str), flush=True)
"#;

/// Runs a script that prints `RESULT {"trace_id", "flushed"}`; returns the trace id.
fn run_python(what: &str, mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let r = result_line(what, &out);
    assert_eq!(r["flushed"], true, "{r}");
    r["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no trace id: {r}"))
        .to_string()
}

fn result_line(what: &str, out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "{what}: no RESULT ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

impl World {
    /// Runs the agent against the relay over mTLS (gRPC or HTTP/protobuf); returns its trace id.
    fn run_agent(&self, mode: Mode, name: &str, grpc: bool) -> String {
        let d = self.dir.path();
        let (endpoint, protocol) = if grpc {
            (format!("https://{}", self.relay.grpc.unwrap()), "grpc")
        } else {
            (
                format!("https://{}/v1/traces", self.relay.http.unwrap()),
                "http/protobuf",
            )
        };
        let mut cmd = self.agent(mode, name, &endpoint, protocol, &self.experiment);
        cmd.env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", d.join("ca.pem"))
            .env("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", d.join("agent.crt"))
            .env("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", d.join("agent.key"));
        run_python("agent", cmd)
    }

    /// The same agent exporting straight to MLflow's /v1/traces, into the baseline experiment:
    /// what MLflow makes of the SDK's spans without the relay in between.
    fn run_agent_without_relay(&self, mode: Mode, name: &str) -> String {
        let endpoint = format!("{}/v1/traces", self.mlflow.url());
        run_python(
            "agent",
            self.agent(mode, name, &endpoint, "http/protobuf", &self.baseline),
        )
    }

    fn agent(&self, mode: Mode, name: &str, endpoint: &str, protocol: &str, experiment: &str) -> Command {
        let mut cmd = Command::new(self.venv.join("bin/python"));
        cmd.args(["-c", AGENT])
            .current_dir(self.dir.path())
            .env("E2E_TRACE_NAME", name)
            .env("E2E_MODE", format!("{mode:?}"))
            .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
            .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol)
            .env(
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                format!("x-mlflow-experiment-id={experiment}"),
            )
            // These would override the exporter's CA in Python HTTP.
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .env_remove("MLFLOW_TRACKING_URI");
        cmd
    }

    /// The trace as MLflow's Python client reads it, at `tracking_uri` with `env`.
    fn read_back(&self, name: &str, experiment: &str, tracking_uri: &str, env: &[(&str, &str)]) -> Value {
        let out = Command::new(self.venv.join("bin/python"))
            .args(["-c", READ_BACK])
            .current_dir(self.dir.path())
            .env("MLFLOW_TRACKING_URI", tracking_uri)
            .env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            .env("E2E_TRACE_NAME", name)
            .env("E2E_EXPERIMENT", experiment)
            .env("E2E_DEADLINE", "120")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        if !out.status.success() {
            panic!(
                "the trace did not arrive in MLflow:\n{}\n{}\ntraces in experiment 0 (the relay's default): {}\n\
                 ---- relay ----\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.mlflow.search_traces("0").len(),
                self.relay.proc.output_text()
            );
        }
        result_line("read back", &out)
    }
}

/// A trace name no other run shares, so finding it proves it is this run's.
fn unique_name(mode: Mode) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!("e2e-agent-{mode:?}-{}-{nanos:x}", std::process::id()).to_lowercase()
}

/// The read-back trace equals what the agent sent.
fn assert_trace(t: &Value, name: &str, trace_id: &str, experiment: &str, mode: Mode) {
    assert_eq!(t["trace_id"], trace_id, "{t:#}");
    assert_eq!(t["experiment_id"], experiment, "routed by the agent's header: {t:#}");
    assert_eq!(t["state"], "OK", "the failure was caught inside: {t:#}");
    let spans = t["spans"].as_array().unwrap();
    let mut names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    let mut want = vec![name, "retrieve", "generate", "check_safety"];
    want.sort();
    assert_eq!(names, want, "{t:#}");
    let span = |n: &str| spans.iter().find(|s| s["name"] == n).unwrap();
    let (root, retrieve, generate, check) = (span(name), span("retrieve"), span("generate"), span("check_safety"));
    // Structure.
    assert_eq!(root["parent_id"], Value::Null, "{t:#}");
    assert_eq!(retrieve["parent_id"], root["span_id"], "{t:#}");
    assert_eq!(generate["parent_id"], root["span_id"], "{t:#}");
    assert_eq!(check["parent_id"], generate["span_id"], "{t:#}");
    for s in spans {
        assert_eq!(s["trace_id"], trace_id, "{s:#}");
    }
    // Types, inputs and outputs.
    assert_eq!(root["span_type"], "AGENT");
    assert_eq!(retrieve["span_type"], "RETRIEVER");
    assert_eq!(generate["span_type"], "LLM");
    assert_eq!(check["span_type"], "TOOL");
    let question = "what does the relay do?";
    assert_eq!(root["inputs"], serde_json::json!({"question": question}), "{root:#}");
    assert_eq!(
        root["outputs"],
        serde_json::json!({"answer": format!("relayed: {question}"), "sources": ["doc-0", "doc-1"]}),
        "{root:#}"
    );
    assert_eq!(retrieve["inputs"], serde_json::json!({"query": question, "k": 2}));
    assert_eq!(retrieve["outputs"], serde_json::json!(["doc-0", "doc-1"]));
    assert_eq!(
        generate["inputs"],
        serde_json::json!({"question": question, "docs": ["doc-0", "doc-1"]})
    );
    assert_eq!(generate["outputs"], format!("relayed: {question}"));
    assert_eq!(check["inputs"], serde_json::json!({"text": question}));
    // Attributes, typed as sent.
    assert_eq!(root["attributes"]["e2e.mode"], format!("{mode:?}"), "{root:#}");
    assert_eq!(generate["attributes"]["llm.model"], "e2e-model", "{generate:#}");
    // Numbers come back as MLflow keeps them (as text; the comparison with the baseline shows
    // that is MLflow's doing, not the relay's).
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    assert_eq!(text(&generate["attributes"]["llm.temperature"]), "0.25", "{generate:#}");
    assert_eq!(text(&generate["attributes"]["llm.tokens"]), "42", "{generate:#}");
    // Status: the grandchild failed (with its exception event), the rest did not.
    assert_eq!(check["status"]["code"], "ERROR", "{check:#}");
    assert!(
        check["status"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("e2e: unsafe input refused")),
        "{check:#}"
    );
    assert!(
        check["events"].as_array().unwrap().iter().any(|e| e == "exception"),
        "{check:#}"
    );
    for s in [root, retrieve, generate] {
        assert_eq!(s["status"]["code"], "OK", "{s:#}");
    }
}

/// What MLflow kept of a trace, without its ids and times: per span name its parent's name, type,
/// inputs, outputs, attributes, status and events.
fn shape(t: &Value) -> Value {
    let spans = t["spans"].as_array().unwrap();
    let name_of = |id: &Value| {
        spans
            .iter()
            .find(|s| s["span_id"] == *id)
            .map(|s| s["name"].clone())
            .unwrap_or(Value::Null)
    };
    let mut out = serde_json::Map::new();
    for s in spans {
        let mut attributes = s["attributes"].clone();
        if let Some(a) = attributes.as_object_mut() {
            a.remove("mlflow.traceRequestId");
        }
        out.insert(
            s["name"].as_str().unwrap().to_string(),
            serde_json::json!({
                "parent": name_of(&s["parent_id"]),
                "span_type": s["span_type"],
                "inputs": s["inputs"],
                "outputs": s["outputs"],
                "attributes": attributes,
                "status": s["status"],
                "events": s["events"],
            }),
        );
    }
    serde_json::json!({"state": t["state"], "spans": out})
}

impl World {
    /// The trace is in the PostgreSQL cluster, not some other store MLflow fell back to.
    fn assert_in_postgres(&self, name: &str, trace_id: &str) {
        let rows = stored_in_postgres(&self.venv, &self.postgres, trace_id);
        let mut want = vec![name, "check_safety", "generate", "retrieve"];
        want.sort();
        assert_eq!(
            rows,
            serde_json::json!({"experiments": [self.experiment], "spans": want}),
            "rows of trace {trace_id}"
        );
    }

    /// The agent once more without the relay; what MLflow keeps of both runs must be the same.
    fn assert_same_as_without_relay(&self, mode: Mode, name: &str, via_relay: &Value) {
        self.run_agent_without_relay(mode, name);
        let direct = self.read_back(name, &self.baseline, &self.mlflow.url(), &[]);
        assert_eq!(
            shape(via_relay),
            shape(&direct),
            "what MLflow keeps differs with the relay in between (left) and without (right)"
        );
    }
}

fn screenshots() -> PathBuf {
    let dir = cache_dir().parent().unwrap().join("e2e-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn token_mode_agent_to_mlflow_ui_through_relay_and_gate() {
    let t = Instant::now();
    let w = setup(Mode::Token);
    let g = w.gate.as_ref().unwrap();
    let name = unique_name(Mode::Token);
    let trace_id = w.run_agent(Mode::Token, &name, true);
    let t0 = Instant::now();
    // MLflow's client through the gate, with client credentials as Basic auth.
    let trace = w.read_back(
        &name,
        &w.experiment,
        &format!("http://{}", g.addr),
        &[
            ("MLFLOW_TRACKING_USERNAME", oidc::CLIENT_ID),
            ("MLFLOW_TRACKING_PASSWORD", oidc::CLIENT_SECRET),
        ],
    );
    eprintln!("trace readable {:?} after the agent flushed", t0.elapsed());
    assert_trace(&trace, &name, &trace_id, &w.experiment, Mode::Token);
    w.assert_in_postgres(&name, &trace_id);
    w.assert_same_as_without_relay(Mode::Token, &name, &trace);
    assert!(
        w.relay
            .metric("otlp_relay_token_requests_total", &[("result", "success")])
            >= 1.0,
        "the relay delivered with a token"
    );
    assert_eq!(w.relay.metric("otelcol_exporter_sent_spans_total", &[]), 4.0);

    // alice (group mlflow) finds the trace by name in MLflow's traces view.
    let question = r#"{"question": "what does the relay do?"}"#;
    let traces_view = format!("http://{}/#/experiments/{}/traces", g.addr, w.experiment);
    let shot = screenshots().join("token-mode-alice-traces.png");
    let r = support::browser::login(
        &format!("http://{}/", g.addr),
        "alice",
        "alice",
        &shot,
        &[
            ("GOTO", &traces_view),
            // MLflow's first-visit popover is modal: "Got it" first. The list shows each trace's
            // request; opening it shows its spans by name.
            ("CLICK_TEXT", &format!("Got it\n{question}")),
            ("EXPECT_TEXT", &name),
        ],
    );
    assert!(r.get("error").is_none(), "{r:#}");
    let text = r["text"].as_str().unwrap();
    for span in [name.as_str(), "retrieve", "generate", "check_safety"] {
        assert!(text.contains(span), "{span} on the page: {r:#}");
    }
    assert!(shot.metadata().unwrap().len() > 10_000);
    // Straight to stderr: libtest captures println!/eprintln! of passing tests, and CI's log
    // should name the file.
    let _ = writeln!(
        std::io::stderr(),
        "screenshot of the agent's trace in MLflow's UI: {}",
        shot.display()
    );

    // carol (mlflow-readers: READ on elsewhere-* only) is let in but does not see it.
    let shot = screenshots().join("token-mode-carol-traces.png");
    let r = support::browser::login(
        &format!("http://{}/", g.addr),
        "carol",
        "carol",
        &shot,
        &[
            ("GOTO", &traces_view),
            // Either MLflow's error for the gate's 403, or the trace (which would be a failure).
            ("EXPECT_ANY", &format!("Received status code 403\n{name}\n{question}")),
        ],
    );
    assert!(r.get("error").is_none(), "{r:#}");
    assert_eq!(r["found"], "Received status code 403", "{r:#}");
    let text = r["text"].as_str().unwrap();
    assert!(!text.contains(&name) && !text.contains(question), "{r:#}");
    // The same refusal as an API answer, for the reader service account of that group.
    let reader = w
        .provider
        .as_ref()
        .unwrap()
        .access_token(oidc::READER.0, oidc::READER.1);
    let (s, b) = support::http(
        "POST",
        g.addr,
        "/api/3.0/mlflow/traces/search",
        &[
            ("authorization", &format!("Bearer {reader}")),
            ("content-type", "application/json"),
        ],
        serde_json::json!({"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": w.experiment}}]})
            .to_string()
            .as_bytes(),
    );
    let b = String::from_utf8_lossy(&b);
    assert_eq!(s, 403, "{b}");
    assert!(!b.contains(&name), "{b}");
    eprintln!("token mode case took {:?}", t.elapsed());
}

#[test]
fn direct_mode_agent_to_mlflow_through_relay() {
    let t = Instant::now();
    let w = setup(Mode::Direct);
    let name = unique_name(Mode::Direct);
    let trace_id = w.run_agent(Mode::Direct, &name, false);
    let trace = w.read_back(&name, &w.experiment, &w.mlflow.url(), &[]);
    assert_trace(&trace, &name, &trace_id, &w.experiment, Mode::Direct);
    w.assert_in_postgres(&name, &trace_id);
    w.assert_same_as_without_relay(Mode::Direct, &name, &trace);

    // mTLS is required: the same agent without its client certificate gets nothing in.
    let handshakes_refused = || {
        w.relay.metric(
            "otlp_relay_receiver_connections_closed_total",
            &[("reason", "handshake_failed")],
        )
    };
    assert_eq!(handshakes_refused(), 0.0, "the agent with its certificate got in");
    let endpoint = format!("https://{}/v1/traces", w.relay.http.unwrap());
    let mut agent = w.agent(
        Mode::Direct,
        &unique_name(Mode::Direct),
        &endpoint,
        "http/protobuf",
        &w.experiment,
    );
    agent
        .env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", w.dir.path().join("ca.pem"))
        .env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3");
    let out = agent.output().unwrap();
    wait_for("the refused handshake to be counted", Duration::from_secs(30), || {
        (handshakes_refused() >= 1.0).then_some(())
    });
    assert_eq!(
        w.relay.metric("otelcol_receiver_accepted_spans_total", &[]),
        4.0,
        "only the first agent's spans: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.relay.metric("otelcol_exporter_sent_spans_total", &[]), 4.0);
    // Nothing went to the exporter's default experiment.
    assert!(w.mlflow.search_traces("0").is_empty());
    eprintln!("direct mode case took {:?}", t.elapsed());
}
