//! TLS beyond the basics: receivers pick up rotated certificates without a restart, and exports
//! verify MLflow's certificate through a CA bundle (root + intermediate), SSL_CERT_FILE, and
//! present a client certificate.
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::otlp::{Relay, Sink, loadgen, spans_accepted_over_https};
use support::pki::Ca;

const T: Duration = Duration::from_secs(30);

/// A relay with an HTTP receiver (`receiver` merged into its settings) and exporter `otlphttp`.
fn base_config(receiver: Value, exporter: Value) -> String {
    RelayConfig::new()
        .without_transport("grpc")
        .receiver("http", receiver)
        .batch(json!({"timeout": "50ms"}))
        .exporter("otlphttp", exporter)
        .yaml()
}

#[test]
fn receiver_certificates_reload_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old-ca");
    let new_ca = Ca::new("new-ca");
    let old_ca_path = old_ca.write(dir.path(), "old-ca");
    let new_ca_path = new_ca.write(dir.path(), "new-ca");
    let server = old_ca.server().write(dir.path(), "server");
    let sink = Sink::start(&[]);
    let tls = json!({"tls": {"cert_file": server.cert, "key_file": server.key, "reload_interval": "100ms"}});
    let exporter = json!({"endpoint": sink.url()});
    let relay = Relay::start(dir.path(), &base_config(tls, exporter), "otlp");
    let endpoint = format!("https://{}", relay.http.unwrap());
    let send = |ca: &std::path::Path| spans_accepted_over_https(&endpoint, ca);
    assert_eq!(send(&old_ca_path), 2);
    assert_eq!(send(&new_ca_path), 0, "the new CA is not in use yet");
    // Rotate: a certificate from another CA replaces the files in place.
    let rotated = new_ca.server();
    std::fs::write(&server.key, &rotated.key_pem).unwrap();
    std::fs::write(&server.cert, &rotated.cert_pem).unwrap();
    support::wait_for("the relay to serve the rotated certificate", T, || {
        (send(&new_ca_path) == 2).then_some(())
    });
    assert_eq!(send(&old_ca_path), 0);
    // A broken file is not loaded: the relay keeps serving the last good certificate.
    std::fs::write(&server.cert, "not a certificate").unwrap();
    relay.proc.clone_wait_line("TLS reload failed", T);
    assert_eq!(send(&new_ca_path), 2);
}

#[test]
fn exports_verify_through_bundle_env_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let root = Ca::new("mlflow-root");
    let intermediate = root.intermediate("mlflow-intermediate");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", root.cert_pem, intermediate.cert_pem)).unwrap();
    let server = intermediate.server().write(dir.path(), "mlflow");
    let clients = Ca::new("relay-clients");
    let clients_path = clients.write(dir.path(), "clients");
    let relay_cert = clients
        .client("spiffe://cluster.local/ns/kagenti-system/sa/otel-collector")
        .write(dir.path(), "relay");
    let sink = Sink::start_mtls(&server, &clients_path);
    let url = format!("https://localhost:{}", sink.http.port());
    let client_tls = json!({"cert_file": relay_cert.cert, "key_file": relay_cert.key});
    let mut delivered = 0;
    // ca_file with the bundle; then no ca_file but SSL_CERT_FILE pointing at it.
    let mut with_bundle = client_tls.clone();
    with_bundle["ca_file"] = json!(bundle);
    for (tls, env) in [(with_bundle, None), (client_tls.clone(), Some(bundle.clone()))] {
        let exporter = json!({"endpoint": url, "tls": tls});
        let sub = tempfile::tempdir().unwrap();
        let config = support::write_file(sub.path(), "config.yaml", &base_config(json!({}), exporter));
        let mut cmd = std::process::Command::new(support::bin());
        cmd.args(["run", "--config", config.to_str().unwrap()]);
        if let Some(path) = &env {
            cmd.env("SSL_CERT_FILE", path).env_remove("SSL_CERT_DIR");
        }
        let mut proc = support::Proc::spawn("relay", cmd);
        let http = proc.wait_listen("otlp-http", T).to_string();
        let (code, r) = loadgen(&[
            "--otlp-insecure",
            "--otlp-http",
            "--otlp-endpoint",
            &http,
            "--traces",
            "5",
            "--seed",
            &delivered.to_string(),
        ]);
        assert_eq!(code, 0, "{r}");
        delivered += 10;
        sink.wait_unique(delivered, T);
    }
    // A CA that did not sign MLflow's certificate: nothing is delivered, the batch waits.
    let stranger = Ca::new("stranger").write(dir.path(), "stranger");
    let mut tls = client_tls;
    tls["ca_file"] = json!(stranger);
    let exporter = json!({"endpoint": url, "tls": tls, "retry_on_failure": {"initial_interval": "100ms"}});
    let sub = tempfile::tempdir().unwrap();
    let relay = Relay::start(sub.path(), &base_config(json!({}), exporter), "otlp");
    let http = relay.http.unwrap().to_string();
    let (code, _) = loadgen(&[
        "--otlp-insecure",
        "--otlp-http",
        "--otlp-endpoint",
        &http,
        "--traces",
        "1",
        "--seed",
        "99",
    ]);
    assert_eq!(code, 0);
    support::wait_for("connection retries", T, || {
        (relay.metric("otlp_relay_exporter_retries_total", &[("reason", "connection")]) >= 2.0).then_some(())
    });
    assert_eq!(sink.stats()["unique_spans"], delivered);
}
