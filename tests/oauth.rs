//! The oauth2client extension against a real OpenID provider (npm oidc-provider, Keycloak-shaped):
//! every export carries a client-credentials JWT that the sink verifies against the provider's
//! JWKS; short-lived tokens rotate under load, a provider restart with a new signing key and a
//! 10 s provider outage lose nothing, refused credentials make the relay not ready without
//! dropping data, discovery_url and auth_style post work, the gRPC exporter carries the token
//! and drops it on UNAUTHENTICATED as the HTTP one does on 401, and no token ever reaches a log.
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::config::RelayConfig;
use support::oidc::{CLIENT_ID, CLIENT_SECRET, OTHER, OidcOptions, OidcProvider};
use support::otlp::{Relay, Sink, loadgen};
use support::{Proc, get_text, http, wait_for, write_file};

const T: Duration = Duration::from_secs(60);
const EXT: &str = "oauth2client/mlflow";
const EXPORTER: &str = "otlphttp/mlflow";

/// A provider with short-lived tokens on a restartable port.
fn restartable_idp(ttl: u64, audience: Option<&str>) -> OidcProvider {
    OidcProvider::start(OidcOptions {
        token_ttl_secs: ttl,
        audience: audience.map(str::to_string),
        port: support::restartable_port(),
        ..Default::default()
    })
}

/// A sink that accepts only tokens the provider signed for audience "mlflow".
fn jwt_sink(idp: &OidcProvider) -> Sink {
    Sink::start(&["--require-jwt", &idp.jwks_url(), "--audience", "mlflow"])
}

/// A relay config: plaintext receivers, a batch processor, one otlphttp exporter using the
/// oauth2client extension whose settings are `ext`.
fn relay_config(sink: &Sink, ext: Value) -> RelayConfig {
    token_relay(
        EXPORTER,
        json!({"endpoint": sink.url(), "headers": {"x-mlflow-experiment-id": "0"}}),
        ext,
    )
    .service(json!({"telemetry": {"logs": {"level": "debug"}}, "shutdown_timeout": "10s"}))
}

/// Plaintext receivers, a batch processor and exporter `exporter` (its `destination` keys, with
/// the oauth2client extension `ext` as its authenticator and quick retries).
fn token_relay(exporter: &str, destination: Value, ext: Value) -> RelayConfig {
    let mut settings = destination;
    support::config::merge(
        &mut settings,
        json!({
            "auth": {"authenticator": EXT},
            "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1s", "max_elapsed_time": "120s"},
        }),
    );
    RelayConfig::new()
        .batch(json!({"send_batch_size": 200, "timeout": "100ms"}))
        .exporter(exporter, settings)
        .extension(EXT, ext)
}

fn basic_ext(idp: &OidcProvider) -> Value {
    json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": idp.token_url()})
}

/// Continuous load into the relay's gRPC receiver for `secs`, verified against the sink
/// (loadgen waits until the sink holds every accepted span, or reports what is missing).
fn load(relay: &Relay, sink: &Sink, secs: u64, seed: u64) -> serde_json::Value {
    let endpoint = relay.grpc.unwrap().to_string();
    let duration = format!("{secs}s");
    let (seed, verify) = (seed.to_string(), sink.url());
    let (code, report) = loadgen(&[
        "--otlp-endpoint",
        &endpoint,
        "--otlp-insecure",
        "--duration",
        &duration,
        "--rate",
        "400",
        "--child-spans",
        "3",
        "--batch-size",
        "40",
        "--seed",
        &seed,
        "--verify-sink",
        &verify,
        "--verify-timeout",
        "90s",
    ]);
    assert_eq!(code, 0, "{report}");
    report
}

/// Every accepted span was sent: none failed, none dropped, none lost at the sink.
fn assert_nothing_lost(relay: &Relay, sink: &Sink, report: &serde_json::Value) -> u64 {
    let accepted = report["spans_accepted"].as_u64().unwrap();
    assert!(accepted > 0, "{report}");
    assert_eq!(report["verify"]["lost_spans"], 0, "{report}");
    assert_eq!(sink.stats()["unique_spans"].as_u64(), Some(accepted));
    wait_for("sent == accepted", T, || {
        (relay.metric("otelcol_exporter_sent_spans_total", &[("exporter", EXPORTER)]) == accepted as f64).then_some(())
    });
    assert_eq!(
        relay.metric("otelcol_exporter_send_failed_spans_total", &[("exporter", EXPORTER)]),
        0.0
    );
    assert_eq!(relay.metric("otlp_relay_exporter_dropped_spans_total", &[]), 0.0);
    accepted
}

/// No JWT (any JWT starts with `eyJ`, base64 of `{"`) and no client secret in the output.
fn assert_no_token_in(output: &str) {
    assert!(!output.contains("eyJ"), "a JWT appears in the log:\n{output}");
    assert!(
        !output.contains(CLIENT_SECRET),
        "the client secret appears in the log:\n{output}"
    );
}

fn token_metric(relay: &Relay, result: &str) -> f64 {
    relay.metric(
        "otlp_relay_token_requests_total",
        &[("extension", EXT), ("result", result)],
    )
}

#[test]
fn short_lived_tokens_rotate_under_load_and_never_reach_the_log() {
    let idp = OidcProvider::start(OidcOptions {
        token_ttl_secs: 3,
        ..Default::default()
    });
    let sink = jwt_sink(&idp);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &relay_config(&sink, basic_ext(&idp)).yaml(), "otlp");
    let report = load(&relay, &sink, 15, 1);
    let accepted = assert_nothing_lost(&relay, &sink, &report);
    let jwt = &sink.stats()["jwt"];
    let tokens = jwt["distinct_tokens"].as_u64().unwrap();
    let fetched = token_metric(&relay, "success");
    eprintln!(
        "TTL 3 s, 15 s of load: {accepted} spans delivered, {tokens} distinct tokens at the sink, \
         {fetched} token requests, {} rejected by the sink, {} 401s at the relay",
        jwt["rejected"],
        relay.metric("otlp_relay_exporter_unauthorized_total", &[])
    );
    // Refreshed at half life (1.5 s): about ten tokens in 15 s; one per lifetime at the least.
    assert!(tokens >= 5, "{jwt}");
    // One refresh in flight: ten senders share the cache, yet every fetched token was used
    // (the last one may be fetched just as the load ends).
    assert!(
        fetched >= tokens as f64 && fetched <= tokens as f64 + 1.0,
        "{fetched} fetched, {tokens} used"
    );
    assert_eq!(token_metric(&relay, "rejected"), 0.0);
    // Refreshed before expiry, not after a 401: the sink (no leeway) refused at most a straggler.
    assert!(relay.metric("otlp_relay_exporter_unauthorized_total", &[]) <= 1.0);
    let expiry = relay.metric("otlp_relay_token_expiry_seconds", &[("extension", EXT)]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now - 5.0 && expiry < now + 5.0, "expiry {expiry} vs now {now}");
    // Debug logging was on: the cache logged claims (iss/aud/azp/exp), never a token.
    let out = relay.proc.output_text();
    assert!(out.contains("token fetched") && out.contains("azp=mlflow"), "{out}");
    assert_no_token_in(&out);
}

#[test]
fn provider_restart_with_a_new_signing_key_loses_nothing() {
    // Tokens live 60 s, so the relay still holds a token signed with the old key when the
    // provider comes back with a new one.
    let mut idp = restartable_idp(60, None);
    let sink = jwt_sink(&idp);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &relay_config(&sink, basic_ext(&idp)).yaml(), "otlp");
    let (report, new_kid) = std::thread::scope(|s| {
        let running = s.spawn(|| load(&relay, &sink, 12, 2));
        wait_for("spans flowing with the first key", T, || {
            (sink.stats()["unique_spans"].as_u64().unwrap() > 500).then_some(())
        });
        idp.restart_with_new_key();
        let key: serde_json::Value = serde_json::from_slice(&std::fs::read(idp.key_file()).unwrap()).unwrap();
        // A new-key token reaches the destination first (another client, say): it fetches the
        // JWKS again, which no longer holds the old key, so the relay's cached token is now refused.
        let fresh = format!("Bearer {}", idp.access_token(CLIENT_ID, CLIENT_SECRET));
        let headers = [
            ("content-type", "application/x-protobuf"),
            ("authorization", fresh.as_str()),
        ];
        assert_eq!(http("POST", sink.http, "/v1/traces", &headers, b"").0, 200);
        let report = running.join().unwrap();
        (report, key["kid"].as_str().unwrap().to_string())
    });
    let accepted = assert_nothing_lost(&relay, &sink, &report);
    let jwt = sink.stats()["jwt"].clone();
    let unauthorized = relay.metric("otlp_relay_exporter_unauthorized_total", &[("exporter", EXPORTER)]);
    eprintln!(
        "key rotation mid-run: {accepted} spans delivered, tokens by kid {}, {} token requests ok, \
         {} failed while it restarted, {} requests refused by the sink, {unauthorized} 401s at the relay",
        jwt["tokens_by_kid"],
        token_metric(&relay, "success"),
        token_metric(&relay, "error"),
        jwt["rejected"],
    );
    let kids = jwt["tokens_by_kid"].as_object().unwrap();
    assert_eq!(kids.len(), 2, "{jwt}");
    // Ours plus at least one the relay fetched after its old-key token was refused.
    assert!(kids[&new_kid].as_u64().unwrap() >= 2, "{jwt}");
    assert!(unauthorized >= 1.0, "the old-key token was refused at least once");
    assert!(token_metric(&relay, "success") >= 2.0);
    assert_no_token_in(&relay.proc.output_text());
}

#[test]
fn provider_down_for_10s_then_everything_arrives() {
    let mut idp = restartable_idp(3, None);
    let sink = jwt_sink(&idp);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &relay_config(&sink, basic_ext(&idp)).yaml(), "otlp");
    let (report, down_for) = std::thread::scope(|s| {
        let running = s.spawn(|| load(&relay, &sink, 18, 3));
        wait_for("spans flowing", T, || {
            (sink.stats()["unique_spans"].as_u64().unwrap() > 300).then_some(())
        });
        idp.stop();
        let stopped = Instant::now();
        // The outage is the scenario: the relay notices (failed token requests), its last token
        // expires (3 s) and exports wait; the provider stays down for 10 s in all.
        wait_for("failed token requests", T, || {
            (token_metric(&relay, "error") >= 1.0).then_some(())
        });
        wait_for("10 s of outage", Duration::from_secs(15), || {
            (stopped.elapsed() >= Duration::from_secs(10)).then_some(())
        });
        let ok_before = token_metric(&relay, "success");
        idp.start_again();
        let down_for = stopped.elapsed();
        let back = Instant::now();
        wait_for("a token after the outage", T, || {
            (token_metric(&relay, "success") > ok_before).then_some(())
        });
        eprintln!("first token {:?} after the provider was back", back.elapsed());
        (running.join().unwrap(), down_for)
    });
    let accepted = assert_nothing_lost(&relay, &sink, &report);
    let errors = token_metric(&relay, "error");
    eprintln!(
        "provider down {down_for:?}: {accepted} spans delivered, {errors} failed token requests, {} token requests ok",
        token_metric(&relay, "success")
    );
    assert!(errors >= 3.0, "the relay kept trying with backoff: {errors}");
    // Backoff caps at 5 s between attempts: a 10 s outage costs a handful of requests, not thousands.
    assert!(errors < 40.0, "{errors} token requests during a 10 s outage");
    assert_eq!(token_metric(&relay, "rejected"), 0.0);
    let out = relay.proc.output_text();
    assert!(out.contains("token endpoint answered again"), "{out}");
    assert_no_token_in(&out);
}

#[test]
fn refused_credentials_make_the_relay_unready_and_data_waits() {
    let idp = OidcProvider::start(OidcOptions::default());
    let sink = jwt_sink(&idp);
    let dir = tempfile::tempdir().unwrap();
    // The secret comes from a file, re-read before every token request: fixing the file fixes
    // the relay without a restart.
    let secret = write_file(dir.path(), "client-secret", "wrong-secret\n");
    let ext = json!({"client_id": CLIENT_ID, "client_secret_file": secret, "token_url": idp.token_url()});
    // At info level, to count what an operator sees.
    let config = relay_config(&sink, ext)
        .service(json!({"telemetry": {"logs": {"level": "info"}}}))
        .yaml();
    let relay = Relay::start(dir.path(), &config, "otlp");
    let health = relay.health.unwrap();
    let body = wait_for("/readyz 503 with the reason", T, || {
        let (status, body) = get_text(health, "/readyz");
        (status == 503 && body.contains("invalid_client")).then_some(body)
    });
    assert!(body.contains(EXT), "{body}");
    let endpoint = relay.http.unwrap().to_string();
    let (code, report) = loadgen(&[
        "--otlp-endpoint",
        &endpoint,
        "--otlp-http",
        "--otlp-insecure",
        "--traces",
        "50",
        "--seed",
        "4",
    ]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["spans_accepted"], 100, "{report}");
    // Keep refusing for a while: requests back off, the error is logged once.
    wait_for("several refused token requests", T, || {
        (token_metric(&relay, "rejected") >= 5.0).then_some(())
    });
    assert_eq!(relay.metric("otelcol_exporter_sent_spans_total", &[]), 0.0);
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 0.0);
    assert_eq!(sink.stats()["requests"], 0, "nothing reached the destination");
    let out = relay.proc.output_text();
    assert_eq!(
        out.matches("token endpoint refused our credentials").count(),
        1,
        "logged once a minute at most:\n{out}"
    );
    assert_eq!(
        out.matches("client authentication failed").count(),
        1,
        "the provider's error_description, logged once:\n{out}"
    );
    assert!(!out.contains("wrong-secret"), "{out}");
    // Fix the secret: the relay recovers, turns ready and delivers what waited.
    write_file(dir.path(), "client-secret", &format!("{CLIENT_SECRET}\n"));
    sink.wait_unique(100, T);
    wait_for("ready again", T, || {
        (get_text(health, "/readyz").0 == 200).then_some(())
    });
    wait_for("sent == 100", T, || {
        (relay.metric("otelcol_exporter_sent_spans_total", &[]) == 100.0).then_some(())
    });
    eprintln!(
        "wrong secret: {} refused token requests before the fix, 1 log line; 100 spans delivered after",
        token_metric(&relay, "rejected")
    );
    assert_no_token_in(&relay.proc.output_text());
}

#[test]
fn a_401_drops_the_token_and_data_waits_for_a_good_one() {
    refused_tokens_are_dropped_until_a_good_one(false);
}

/// The provider first mints tokens for the wrong audience, so the sink refuses each (401, or
/// gRPC's UNAUTHENTICATED): each refusal drops the token and the relay fetches a new one, with
/// nothing sent or failed meanwhile; once the provider is fixed (same key, right audience) the
/// next fresh token is accepted and every span that waited arrives.
fn refused_tokens_are_dropped_until_a_good_one(grpc: bool) {
    let mut idp = restartable_idp(60, Some("not-mlflow"));
    let sink = jwt_sink(&idp);
    let dir = tempfile::tempdir().unwrap();
    let (config, exporter, refusals) = if grpc {
        let config = grpc_relay_config(&sink, basic_ext(&idp));
        (config, GRPC_EXPORTER, "UNAUTHENTICATED answers")
    } else {
        (relay_config(&sink, basic_ext(&idp)).yaml(), EXPORTER, "401s")
    };
    let relay = Relay::start(dir.path(), &config, "otlp");
    let endpoint = relay.grpc.unwrap().to_string();
    let (code, report) = loadgen(&["--otlp-endpoint", &endpoint, "--otlp-insecure", "--traces", "50"]);
    assert_eq!(code, 0, "{report}");
    let unauthorized = || relay.metric("otlp_relay_exporter_unauthorized_total", &[("exporter", exporter)]);
    wait_for(&format!("several {refusals}"), T, || {
        (unauthorized() >= 3.0).then_some(())
    });
    // Each refusal dropped the token: the relay asked for a new one each time.
    assert!(token_metric(&relay, "success") >= 3.0);
    if grpc {
        assert!(sink.stats()["jwt"]["rejected"].as_u64().unwrap() >= 3);
    }
    assert_eq!(relay.metric("otelcol_exporter_sent_spans_total", &[]), 0.0);
    assert_eq!(relay.metric("otelcol_exporter_send_failed_spans_total", &[]), 0.0);
    idp.opts.audience = None;
    idp.start_again();
    sink.wait_unique(100, T);
    wait_for("sent == 100", T, || {
        (relay.metric("otelcol_exporter_sent_spans_total", &[]) == 100.0).then_some(())
    });
    eprintln!(
        "{}wrong audience: {} {refusals} counted, then all 100 spans delivered",
        if grpc { "gRPC, " } else { "" },
        unauthorized()
    );
    assert_no_token_in(&relay.proc.output_text());
}

#[test]
fn discovery_url_post_auth_style_scopes_params_and_file_client_id() {
    let idp = OidcProvider::start(OidcOptions::default());
    let sink = jwt_sink(&idp);
    let dir = tempfile::tempdir().unwrap();
    let id_file = write_file(dir.path(), "client-id", CLIENT_ID);
    let ext = json!({
        "client_id_file": id_file,
        "client_secret": CLIENT_SECRET,
        "discovery_url": idp.discovery_url(),
        "auth_style": "post",
        "scopes": ["openid", "groups"],
        "endpoint_params": {"audience": "mlflow"},
    });
    let relay = Relay::start(dir.path(), &relay_config(&sink, ext).yaml(), "otlp");
    let endpoint = relay.http.unwrap().to_string();
    let (code, report) = loadgen(&[
        "--otlp-endpoint",
        &endpoint,
        "--otlp-http",
        "--otlp-insecure",
        "--traces",
        "50",
        "--verify-sink",
        &sink.url(),
    ]);
    assert_eq!(code, 0, "{report}");
    assert_nothing_lost(&relay, &sink, &report);
    let out = relay.proc.output_text();
    let discovered = format!("token_endpoint={}", idp.token_url());
    assert!(out.contains(&discovered), "{out}");
    assert_eq!(sink.stats()["jwt"]["distinct_tokens"], 1);
    assert_no_token_in(&out);
}

#[test]
fn sink_verifies_signature_audience_and_presence() {
    let idp = OidcProvider::start(OidcOptions::default());
    let sink = jwt_sink(&idp);
    let body = b"";
    let post = |auth: Option<&str>| {
        let mut headers = vec![("content-type", "application/x-protobuf")];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        http("POST", sink.http, "/v1/traces", &headers, body).0
    };
    let good = format!("Bearer {}", idp.access_token(CLIENT_ID, CLIENT_SECRET));
    let foreign = format!("Bearer {}", idp.access_token(OTHER.0, OTHER.1));
    // Change one signature character well inside (the last one may only hold padding bits).
    let mut forged: Vec<char> = good.chars().collect();
    let i = forged.len() - 20;
    forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    assert_eq!(post(None), 401);
    assert_eq!(post(Some(&foreign)), 401, "aud other");
    assert_eq!(post(Some(&forged)), 401, "bad signature");
    assert_eq!(post(Some(&good)), 200);
    assert_eq!(post(Some(&good)), 200);
    let stats = sink.stats();
    assert_eq!(stats["jwt"]["distinct_tokens"], 1, "{stats}");
    assert_eq!(stats["jwt"]["rejected"], 3, "{stats}");
    assert_eq!(stats["failures"]["401"], 3, "{stats}");
}

#[test]
fn token_command_prints_claims_never_the_token() {
    let idp = OidcProvider::start(OidcOptions::default());
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // The seed's shape: credentials and URL from the environment.
    let ext = json!({
        "client_id": "${env:OIDC_CLIENT_ID}",
        "client_secret": "${env:OIDC_CLIENT_SECRET}",
        "token_url": "${env:OIDC_TOKEN_URL}",
    });
    let config = write_file(dir.path(), "config.yaml", &relay_config(&sink, ext).yaml());
    let run = |client: (&str, &str)| {
        let mut cmd = std::process::Command::new(support::bin());
        cmd.args(["token", "--config", config.to_str().unwrap()])
            .env("OIDC_CLIENT_ID", client.0)
            .env("OIDC_CLIENT_SECRET", client.1)
            .env("OIDC_TOKEN_URL", idp.token_url());
        let mut p = Proc::spawn("token", cmd);
        let code = p.wait_exit(T).unwrap();
        (code, p.output_text())
    };
    let (code, out) = run((CLIENT_ID, CLIENT_SECRET));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("  aud: mlflow\n"), "{out}");
    assert!(out.contains("  azp: mlflow\n"), "{out}");
    assert!(out.contains(r#"  groups: ["mlflow","mlflow-admin"]"#), "{out}");
    assert!(out.contains(&format!("  iss: {}\n", idp.issuer)), "{out}");
    assert!(out.contains("\"alg\":\"RS256\""), "{out}");
    assert_no_token_in(&out);
    // A token from another client shows the wrong audience at a glance.
    let (code, out) = run(OTHER);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("  aud: other\n") && out.contains("  azp: other\n"),
        "{out}"
    );
    assert_no_token_in(&out);
    // Refused credentials: the provider's error, exit 1.
    let (code, out) = run((CLIENT_ID, "wrong"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid_client"), "{out}");
}

/// Terminates TLS with `leaf` (its chain stops at an intermediate) in front of `upstream`.
fn tls_front(leaf: &support::pki::LeafFiles, upstream: std::net::SocketAddr) -> (std::net::SocketAddr, impl Drop) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut up)) = (
                    acceptor.accept(stream).await,
                    tokio::net::TcpStream::connect(upstream).await,
                ) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    struct Stop(Option<tokio::runtime::Runtime>);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(rt) = self.0.take() {
                rt.shutdown_background();
            }
        }
    }
    (addr, Stop(Some(rt)))
}

#[test]
fn token_endpoint_over_tls_with_a_root_and_intermediate_bundle() {
    let idp = OidcProvider::start(OidcOptions::default());
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let root = support::pki::Ca::new("corp-root");
    let intermediate = root.intermediate("corp-issuing");
    let leaf = intermediate.server().write(dir.path(), "idp");
    // The server sends its leaf only; the client's bundle holds root + intermediate.
    let bundle = write_file(
        dir.path(),
        "bundle.pem",
        &format!("{}{}", root.cert_pem, intermediate.cert_pem),
    );
    let unrelated = support::pki::Ca::new("unrelated").write(dir.path(), "unrelated");
    let (front, _stop) = tls_front(&leaf, idp.addr());
    let token_url = format!(
        "https://localhost:{}/realms/test/protocol/openid-connect/token",
        front.port()
    );
    let run = |ca_file: Option<&std::path::Path>, ssl_cert_file: &std::path::Path| {
        let mut ext = json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": token_url});
        if let Some(p) = ca_file {
            ext["tls"] = json!({"ca_file": p});
        }
        let config = write_file(dir.path(), "config.yaml", &relay_config(&sink, ext).yaml());
        let mut cmd = std::process::Command::new(support::bin());
        cmd.args(["token", "--config", config.to_str().unwrap()])
            .env("SSL_CERT_FILE", ssl_cert_file)
            .env_remove("SSL_CERT_DIR");
        let mut p = Proc::spawn("token", cmd);
        let code = p.wait_exit(T).unwrap();
        (code, p.output_text())
    };
    let (code, out) = run(Some(&bundle), &unrelated);
    assert_eq!(code, 0, "ca_file bundle: {out}");
    assert!(out.contains("  aud: mlflow\n"), "{out}");
    let (code, out) = run(None, &bundle);
    assert_eq!(code, 0, "SSL_CERT_FILE bundle: {out}");
    let (code, out) = run(None, &unrelated);
    assert_eq!(code, 1, "an unknown issuer must fail: {out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
}

#[test]
fn sink_checks_grpc_tokens_too() {
    let idp = OidcProvider::start(OidcOptions::default());
    let sink = jwt_sink(&idp);
    let grpc = sink.grpc.to_string();
    let header = format!(
        "authorization=\"Bearer {}\"",
        idp.access_token(CLIENT_ID, CLIENT_SECRET)
    );
    let (code, r) = loadgen(&["--otlp-endpoint", &grpc, "--otlp-insecure", "--traces", "5"]);
    assert_eq!(code, 1, "nothing accepted: {r}");
    assert_eq!(r["spans_refused"], 10, "{r}");
    assert_eq!(r["refused_by"]["grpc_UNAUTHENTICATED"], 10, "{r}");
    let (code, r) = loadgen(&[
        "--otlp-endpoint",
        &grpc,
        "--otlp-insecure",
        "--traces",
        "5",
        "--otlp-header",
        &header,
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["spans_accepted"], 10, "{r}");
    assert_eq!(sink.stats()["jwt"]["distinct_tokens"], 1);
}

#[test]
fn unreadable_secret_file_is_a_config_error() {
    let sink = Sink::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let ext = json!({
        "client_id": CLIENT_ID,
        "client_secret_file": dir.path().join("missing"),
        "token_url": "http://127.0.0.1:1/token",
    });
    let config = write_file(dir.path(), "config.yaml", &relay_config(&sink, ext).yaml());
    let mut p = Proc::relay("check", &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(p.wait_exit(T), Some(1));
    let out = p.output_text();
    assert!(
        out.contains("extensions.oauth2client/mlflow: client_secret_file: cannot read"),
        "{out}"
    );
    let mut p = Proc::relay("run", &["run", "--config", config.to_str().unwrap()]);
    assert_eq!(p.wait_exit(T), Some(64), "{}", p.output_text());
}

const GRPC_EXPORTER: &str = "otlp_grpc/store";

/// `relay_config`'s exporter over gRPC instead: the `otlp` exporter to the sink's gRPC port,
/// with the same oauth2client extension.
fn grpc_relay_config(sink: &Sink, ext: Value) -> String {
    token_relay(
        GRPC_EXPORTER,
        json!({"endpoint": sink.grpc.to_string(), "tls": {"insecure": true}}),
        ext,
    )
    .service(json!({"shutdown_timeout": "10s"}))
    .yaml()
}

/// The gRPC exporter carries the extension's token as `authorization: Bearer <JWT>` metadata:
/// the sink verifies each against the provider's JWKS and audience, and everything arrives.
#[test]
fn grpc_exporter_sends_the_oauth2_token_as_bearer_metadata() {
    let idp = OidcProvider::start(OidcOptions::default());
    let sink = jwt_sink(&idp);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), &grpc_relay_config(&sink, basic_ext(&idp)), "otlp");
    let endpoint = relay.grpc.unwrap().to_string();
    let (code, report) = loadgen(&["--otlp-endpoint", &endpoint, "--otlp-insecure", "--traces", "50"]);
    assert_eq!(code, 0, "{report}");
    sink.wait_unique(100, T);
    let stats = sink.stats();
    assert_eq!(stats["jwt"]["rejected"], 0, "{stats}");
    assert_eq!(stats["jwt"]["distinct_tokens"], 1, "{stats}");
    wait_for("sent == 100", T, || {
        (relay.metric("otelcol_exporter_sent_spans_total", &[("exporter", GRPC_EXPORTER)]) == 100.0).then_some(())
    });
    assert!(token_metric(&relay, "success") >= 1.0);
    assert_no_token_in(&relay.proc.output_text());
}

/// `a_401_drops_the_token_and_data_waits_for_a_good_one` over gRPC: each UNAUTHENTICATED answer
/// drops the token and the relay fetches a new one; once the provider mints good tokens the
/// data that waited arrives.
#[test]
fn grpc_unauthenticated_drops_the_token_and_data_waits_for_a_good_one() {
    refused_tokens_are_dropped_until_a_good_one(true);
}
