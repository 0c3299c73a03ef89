//! A client nobody here wrote: the Python OpenTelemetry SDK's OTLP exporters (gRPC and HTTP)
//! over mTLS into the relay; every span is checked at the sink.
mod support;

use std::process::Command;
use std::time::Duration;

use support::otlp::{Relay, Sink};
use support::pki::Ca;

const SCRIPT: &str = r#"
import sys, grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

mode, endpoint, ca, cert, key, count = sys.argv[1:7]
count = int(count)
if mode == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    read = lambda p: open(p, "rb").read()
    creds = grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))
    exporter = OTLPSpanExporter(endpoint=endpoint, credentials=creds)
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=endpoint, certificate_file=ca, client_certificate_file=cert, client_key_file=key)
provider = TracerProvider(resource=Resource.create({"service.name": "python-sdk-" + mode}))
provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=50))
tracer = provider.get_tracer("otlp-relay-tests")
for i in range(count // 2):
    with tracer.start_as_current_span(f"agent-{i}"):
        with tracer.start_as_current_span(f"llm-{i}"):
            pass
ok = provider.force_flush(30000)
provider.shutdown()
print("flushed" if ok else "flush failed")
"#;

#[test]
fn python_sdk_exports_over_mtls() {
    let venv = support::python_venv(
        "otel-sdk",
        &[
            "opentelemetry-sdk==1.45.2",
            "opentelemetry-exporter-otlp-proto-grpc==1.45.2",
            "opentelemetry-exporter-otlp-proto-http==1.45.2",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("agents-ca");
    let ca_path = ca.write(dir.path(), "ca");
    let server = ca.server().write(dir.path(), "server");
    let client = ca
        .client("spiffe://cluster.local/ns/agents/sa/python")
        .write(dir.path(), "client");
    let sink = Sink::start(&[]);
    let tls = format!(
        r#"tls: {{cert_file: "{}", key_file: "{}", client_ca_file: "{}", allowed_clients: ["spiffe://cluster.local/ns/agents/*"]}}"#,
        server.cert.display(),
        server.key.display(),
        ca_path.display()
    );
    let config = format!(
        r#"
receivers: {{otlp: {{protocols: {{grpc: {{endpoint: "127.0.0.1:0", {tls}}}, http: {{endpoint: "127.0.0.1:0", {tls}}}}}}}}}
processors: {{batch: {{timeout: 100ms}}}}
exporters: {{otlphttp: {{endpoint: "{url}", headers: {{x-mlflow-experiment-id: "0"}}}}}}
service:
  pipelines: {{traces: {{receivers: [otlp], processors: [batch], exporters: [otlphttp]}}}}
  telemetry: {{metrics: {{address: "127.0.0.1:0"}}}}
"#,
        url = sink.url()
    );
    let relay = Relay::start(dir.path(), &config, "otlp");
    let script = support::write_file(dir.path(), "send.py", SCRIPT);
    let mut expected = 0;
    for (mode, endpoint) in [
        ("grpc", format!("https://localhost:{}", relay.grpc.unwrap().port())),
        (
            "http",
            format!("https://localhost:{}/v1/traces", relay.http.unwrap().port()),
        ),
    ] {
        // requests lets these variables override a Session's `verify`, which is where the SDK puts
        // certificate_file; the machine may set them to the system bundle.
        let out = Command::new(venv.join("bin/python"))
            .env_remove("REQUESTS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .arg(&script)
            .args([mode, &endpoint])
            .args([&ca_path, &client.cert, &client.key])
            .arg("100")
            .output()
            .unwrap();
        let text = support::output_text(&out);
        assert!(
            out.status.success() && text.contains("flushed"),
            "{mode}: {text}\nrelay:\n{}",
            relay.proc.output_text()
        );
        expected += 100;
        sink.wait_unique(expected, Duration::from_secs(30));
    }
    assert_eq!(
        relay.metric("otelcol_receiver_accepted_spans_total", &[("transport", "grpc")]),
        100.0
    );
    assert_eq!(
        relay.metric("otelcol_receiver_accepted_spans_total", &[("transport", "http")]),
        100.0
    );
}
