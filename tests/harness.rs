//! Checks the shared test harness itself: certificates chain as expected, config edits that
//! no longer match a template fail loudly.
mod support;

#[test]
fn pki_makes_a_chain() {
    let ca = support::pki::Ca::new("root");
    let inter = ca.intermediate("inter");
    let leaf = inter.server();
    assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(leaf.key_pem.contains("PRIVATE KEY"));
    assert_ne!(ca.cert_pem, inter.cert_pem);
}

#[test]
#[should_panic(expected = "occurs 0 times")]
fn replace_once_refuses_a_template_that_no_longer_matches() {
    support::replace_once("send_batch_size: 200", "send_batch_size: 100", "x");
}

#[test]
#[should_panic(expected = "occurs 2 times")]
fn replace_once_refuses_an_ambiguous_edit() {
    support::replace_once("a: 1\nb: 1\n", ": 1", ": 2");
}

#[test]
fn replace_once_edits_the_one_match() {
    assert_eq!(support::replace_once("a: 1\nb: 2\n", "b: 2", "b: 3"), "a: 1\nb: 3\n");
}

#[test]
fn config_builder_writes_what_the_relay_accepts_with_every_edit_applied() {
    use serde_json::json;
    use support::config::RelayConfig;
    let yaml = RelayConfig::new()
        .receivers(json!({"max_recv_msg_size_mib": 2}))
        .batch(json!({"timeout": "10ms"}))
        .exporter("otlphttp/a", json!({"endpoint": "http://127.0.0.1:9"}))
        .exporter("otlphttp/b", json!({"endpoint": "http://127.0.0.1:9"}))
        .exporter_settings("otlphttp/b", json!({"sending_queue": {"num_consumers": 1}}))
        .service(json!({"shutdown_timeout": "1s"}))
        .yaml();
    let doc: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    for transport in ["grpc", "http"] {
        let t = &doc["receivers"]["otlp"]["protocols"][transport];
        assert_eq!(t["max_recv_msg_size_mib"], 2, "{yaml}");
        assert_eq!(t["endpoint"], "127.0.0.1:0", "{yaml}");
    }
    assert_eq!(doc["exporters"]["otlphttp/b"]["sending_queue"]["num_consumers"], 1);
    assert_eq!(
        doc["exporters"]["otlphttp/b"]["endpoint"], "http://127.0.0.1:9",
        "merged, not replaced"
    );
    assert_eq!(
        doc["service"]["pipelines"]["traces"]["exporters"],
        json!(["otlphttp/a", "otlphttp/b"])
    );
    let dir = tempfile::tempdir().unwrap();
    let path = support::write_file(dir.path(), "config.yaml", &yaml);
    let mut check = support::Proc::relay("check", &["check", "--config", path.to_str().unwrap()]);
    assert_eq!(
        check.wait_exit(std::time::Duration::from_secs(20)),
        Some(0),
        "{yaml}\n{}",
        check.output_text()
    );
}

#[test]
#[should_panic(expected = "no exporter otlphttp/missing")]
fn config_builder_refuses_settings_for_an_exporter_it_does_not_have() {
    support::config::RelayConfig::new().exporter_settings("otlphttp/missing", serde_json::json!({"timeout": "1s"}));
}
