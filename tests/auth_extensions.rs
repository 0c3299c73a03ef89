//! The client auth extensions bearertokenauth and basicauth, as collector configs use them
//! (`auth: {authenticator: ...}` on an exporter), against an MLflow-shaped OTLP/HTTP endpoint
//! that records the headers of every request: the token goes in the configured header with the
//! configured scheme, a rotated token file is picked up, a missing one holds exports back (never
//! sent without the credential), Basic credentials are RFC 7617, and no secret reaches the
//! relay's log, `check`'s output or /metrics.
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::otlp::{Relay, one_span_request};
use support::{Proc, get_text, http, wait_for, write_file};

const T: Duration = Duration::from_secs(30);
const EXPORTER: &str = "otlphttp/mlflow";

type Headers = Vec<(String, String)>;

/// An OTLP/HTTP endpoint on 127.0.0.1:0 answering every POST 200 (an empty
/// ExportTraceServiceResponse, as MLflow does) and recording each request's headers.
struct Recorder {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Headers>>>,
}

impl Recorder {
    fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let recorded = recorded.clone();
                std::thread::spawn(move || serve(stream, &recorded));
            }
        });
        Recorder { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Headers> {
        self.requests.lock().unwrap().clone()
    }

    /// The value of header `name` in each request so far (None where it was absent).
    fn values(&self, name: &str) -> Vec<Option<String>> {
        self.requests()
            .iter()
            .map(|h| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .collect()
    }
}

/// One keep-alive connection: requests until the peer closes.
fn serve(stream: TcpStream, recorded: &Mutex<Vec<Headers>>) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        recorded.lock().unwrap().push(headers);
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A relay exporting to `recorder` through extension `ext` (settings `settings`), with short
/// batch timeouts and retry intervals, logging at debug level (secrets must not show there either).
fn config(recorder: &Recorder, ext: &str, settings: Value) -> String {
    RelayConfig::new()
        .batch(json!({"timeout": "20ms"}))
        .exporter(
            EXPORTER,
            json!({
                "endpoint": recorder.url(),
                "headers": {"x-mlflow-experiment-id": "0"},
                "auth": {"authenticator": ext},
                "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "0s"},
            }),
        )
        .extension(ext, settings)
        .service(json!({"telemetry": {"logs": {"level": "debug"}}}))
        .yaml()
}

fn send_span(relay: &Relay, name: &str) {
    let (status, body) = http(
        "POST",
        relay.http.unwrap(),
        "/v1/traces",
        &[("content-type", "application/x-protobuf")],
        &one_span_request(name),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// Sends one span and waits until the recorder holds `n` requests; returns the last one's headers.
fn deliver(relay: &Relay, recorder: &Recorder, n: usize) -> Headers {
    send_span(relay, "work");
    wait_for(&format!("{n} requests at the recorder"), T, || {
        let r = recorder.requests();
        (r.len() >= n).then(|| r[n - 1].clone())
    })
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `check` on `config` (in `dir`): (success, its output).
fn check(dir: &Path, config: &str) -> (bool, String) {
    let path = write_file(dir, "check.yaml", config);
    let mut p = Proc::relay("check", &["check", "--config", path.to_str().unwrap()]);
    let code = p.wait_exit(T);
    (code == Some(0), p.output_text())
}

/// None of `secrets` occurs in the relay's log, in /metrics or in `check`'s output.
fn assert_no_secrets(relay: &Relay, check_output: &str, secrets: &[&str]) {
    let log = relay.proc.output_text();
    let (_, metrics) = get_text(relay.metrics, "/metrics");
    for s in secrets {
        assert!(!log.contains(s), "secret {s:?} in the relay's log:\n{log}");
        assert!(!metrics.contains(s), "secret {s:?} in /metrics:\n{metrics}");
        assert!(
            !check_output.contains(s),
            "secret {s:?} in check's output:\n{check_output}"
        );
    }
}

fn retries_for_token(relay: &Relay) -> f64 {
    relay.metric(
        "otlp_relay_exporter_retries_total",
        &[("exporter", EXPORTER), ("reason", "token")],
    )
}

#[test]
fn bearer_token_in_authorization_with_the_default_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let token = "inline-t0ken-7f3a9c";
    let cfg = config(&recorder, "bearertokenauth/mlflow", json!({"token": token}));
    let (ok, check_output) = check(dir.path(), &cfg);
    assert!(ok, "{check_output}");
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let h = deliver(&relay, &recorder, 1);
    assert_eq!(
        header(&h, "authorization"),
        Some(format!("Bearer {token}").as_str()),
        "{h:?}"
    );
    assert_no_secrets(&relay, &check_output, &[token]);
}

#[test]
fn bearer_token_with_a_custom_scheme_header_and_no_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let token = "custom-t0ken-51be02";
    let cfg = config(
        &recorder,
        "bearertokenauth",
        json!({"token": token, "scheme": "Token", "header": "X-Api-Key"}),
    );
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let h = deliver(&relay, &recorder, 1);
    assert_eq!(
        header(&h, "x-api-key"),
        Some(format!("Token {token}").as_str()),
        "{h:?}"
    );
    assert_eq!(header(&h, "authorization"), None, "{h:?}");
    drop(relay);

    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let cfg = config(&recorder, "bearertokenauth", json!({"token": token, "scheme": ""}));
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let h = deliver(&relay, &recorder, 1);
    assert_eq!(header(&h, "authorization"), Some(token), "{h:?}");
    assert_no_secrets(&relay, "", &[token]);
}

/// A Kubernetes projected token: the file is replaced (by a rename, as the kubelet swaps its
/// symlink) while the relay runs, and later requests carry the new token. Removing the file holds
/// exports back until it is back: nothing is sent without a token meanwhile, nothing is lost.
#[test]
fn bearer_token_file_rotation_is_picked_up_and_a_removed_file_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let token_path = dir.path().join("token");
    let (first, second, third) = ("sa-token-one-0b5e", "sa-token-two-c41d", "sa-token-three-9a27");
    std::fs::write(&token_path, format!("{first}\n")).unwrap();
    let cfg = config(
        &recorder,
        "bearertokenauth/k8s",
        json!({"filename": token_path.to_str().unwrap()}),
    );
    let (ok, check_output) = check(dir.path(), &cfg);
    assert!(ok, "{check_output}");
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let h = deliver(&relay, &recorder, 1);
    assert_eq!(header(&h, "authorization"), Some(format!("Bearer {first}").as_str()));

    let rotate = |value: &str| {
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, value).unwrap();
        std::fs::rename(&tmp, &token_path).unwrap();
    };
    rotate(second);
    let want = format!("Bearer {second}");
    wait_for("a request with the rotated token", T, || {
        send_span(&relay, "after rotation");
        recorder
            .values("authorization")
            .iter()
            .any(|v| v.as_deref() == Some(want.as_str()))
            .then_some(())
    });
    let refused_before = retries_for_token(&relay);

    std::fs::remove_file(&token_path).unwrap();
    // Once the removal is noticed, exports are refused before they are sent: wait for a few.
    wait_for("exports held back for lack of a token", T, || {
        send_span(&relay, "no token");
        (retries_for_token(&relay) >= refused_before + 3.0).then_some(())
    });
    // From here on the removal is known: further exports are refused, none reaches the recorder.
    let held = recorder.requests().len();
    let refused = retries_for_token(&relay);
    wait_for("more exports held back", T, || {
        send_span(&relay, "still no token");
        (retries_for_token(&relay) >= refused + 3.0).then_some(())
    });
    assert_eq!(
        recorder.requests().len(),
        held,
        "a request went out without the token file"
    );
    assert!(
        relay.metric(
            "otlp_relay_token_requests_total",
            &[("extension", "bearertokenauth/k8s"), ("result", "error")]
        ) >= 1.0
    );
    assert!(relay.proc.output_text().contains("no credential: exports wait"));
    rotate(third);
    let want = format!("Bearer {third}");
    wait_for("held exports delivered with the new token", T, || {
        recorder
            .values("authorization")
            .iter()
            .any(|v| v.as_deref() == Some(want.as_str()))
            .then_some(())
    });
    // Every request ever sent carried a token.
    let values = recorder.values("authorization");
    assert!(values.iter().all(Option::is_some), "{values:?}");
    assert_no_secrets(&relay, &check_output, &[first, second, third]);
}

#[test]
fn bearer_token_file_missing_at_start_is_a_check_and_run_error() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let absent = dir.path().join("absent-token");
    let cfg = config(
        &recorder,
        "bearertokenauth",
        json!({"filename": absent.to_str().unwrap()}),
    );
    let (ok, output) = check(dir.path(), &cfg);
    assert!(!ok, "{output}");
    assert!(
        output.contains("extensions.bearertokenauth: filename: cannot read") && output.contains("absent-token"),
        "{output}"
    );
    std::fs::write(&absent, "\n").unwrap();
    let (ok, output) = check(dir.path(), &cfg);
    assert!(!ok && output.contains("is empty"), "{output}");

    let path = write_file(dir.path(), "config.yaml", &cfg);
    let mut run = Proc::relay("relay", &["run", "--config", path.to_str().unwrap()]);
    assert_ne!(run.wait_exit(T), Some(0), "{}", run.output_text());
    assert!(run.output_text().contains("is empty"), "{}", run.output_text());
    assert!(recorder.requests().is_empty());
}

/// With the collector's `file_retry.enabled`, a token file that is not there yet does not stop the
/// start: exports wait (refused before sending, retried) and go out once the file appears.
#[test]
fn bearer_token_file_retry_waits_for_the_file_and_sends_nothing_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let token_path = dir.path().join("late-token");
    let cfg = config(
        &recorder,
        "bearertokenauth",
        json!({"filename": token_path.to_str().unwrap(), "file_retry": {"enabled": true}}),
    );
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    send_span(&relay, "early");
    wait_for("exports refused for lack of a token", T, || {
        (retries_for_token(&relay) >= 3.0).then_some(())
    });
    assert!(recorder.requests().is_empty(), "{:?}", recorder.requests());
    let (status, body) = get_text(relay.health.unwrap(), "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("late-token"), "{body}");
    let token = "late-t0ken-e8d1";
    std::fs::write(&token_path, token).unwrap();
    let h = wait_for("the held span delivered", T, || recorder.requests().first().cloned());
    assert_eq!(header(&h, "authorization"), Some(format!("Bearer {token}").as_str()));
    wait_for("ready again", T, || {
        (get_text(relay.health.unwrap(), "/readyz").0 == 200).then_some(())
    });
    assert_no_secrets(&relay, "", &[token]);
}

/// basicauth's client_auth, the password from the environment as collector configs give it.
#[test]
fn basicauth_sends_rfc7617_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let password = "b4sic-pa55-3c9e";
    let cfg = config(
        &recorder,
        "basicauth/mlflow",
        json!({"client_auth": {"username": "relay-user", "password": "${env:MLFLOW_PASSWORD}"}}),
    );
    let path = write_file(dir.path(), "check.yaml", &cfg);
    let mut cmd = std::process::Command::new(support::bin());
    cmd.args(["check", "--config", path.to_str().unwrap()])
        .env("MLFLOW_PASSWORD", password)
        .env("NO_COLOR", "1");
    let mut check = Proc::spawn("check", cmd);
    assert_eq!(check.wait_exit(T), Some(0), "{}", check.output_text());
    let relay = Relay::start_with_env(dir.path(), &cfg, "otlp", &[("MLFLOW_PASSWORD", password)]);
    let h = deliver(&relay, &recorder, 1);
    // base64("relay-user:b4sic-pa55-3c9e")
    assert_eq!(
        header(&h, "authorization"),
        Some("Basic cmVsYXktdXNlcjpiNHNpYy1wYTU1LTNjOWU="),
        "{h:?}"
    );
    assert_no_secrets(
        &relay,
        &check.output_text(),
        &[password, "cmVsYXktdXNlcjpiNHNpYy1wYTU1LTNjOWU="],
    );
}

/// basicauth's password_file (a mounted Secret) is re-read when it is replaced.
#[test]
fn basicauth_password_file_rotation_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::start();
    let password_path = dir.path().join("password");
    std::fs::write(&password_path, "first-pa55\n").unwrap();
    let cfg = config(
        &recorder,
        "basicauth",
        json!({"client_auth": {"username": "u", "password_file": password_path.to_str().unwrap()}}),
    );
    let relay = Relay::start(dir.path(), &cfg, "otlp");
    let h = deliver(&relay, &recorder, 1);
    // base64("u:first-pa55")
    assert_eq!(header(&h, "authorization"), Some("Basic dTpmaXJzdC1wYTU1"), "{h:?}");
    let tmp = dir.path().join("password.tmp");
    std::fs::write(&tmp, "second-pa55").unwrap();
    std::fs::rename(&tmp, &password_path).unwrap();
    // base64("u:second-pa55")
    wait_for("a request with the new password", T, || {
        send_span(&relay, "after rotation");
        recorder
            .values("authorization")
            .iter()
            .any(|v| v.as_deref() == Some("Basic dTpzZWNvbmQtcGE1NQ=="))
            .then_some(())
    });
    assert_no_secrets(&relay, "", &["first-pa55", "second-pa55", "dTpmaXJzdC1wYTU1"]);
}
