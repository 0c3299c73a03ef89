//! Semantic checks on a typed configuration, in the order `check` prints them: each
//! component's own checks live next to its config (`receiver`, `processor`, `exporter`,
//! `extension`), then the service's, which tie components together. Pure: no file or network
//! access, so `check` and `run` agree.
use std::net::SocketAddr;

use super::{Config, ConfigError, Receiver};

pub(crate) fn validate(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut err = |path: String, msg: String| errors.push(ConfigError::new(path, msg));
    for (id, r) in &config.receivers {
        let Receiver::Otlp(otlp) = r;
        super::receiver::validate(id, otlp, &mut err);
    }
    for (id, p) in &config.processors {
        super::processor::validate(id, p, &mut err);
    }
    for (id, e) in &config.exporters {
        super::exporter::validate(id, e, config, &mut err);
    }
    for (id, x) in &config.extensions {
        super::extension::validate(id, x, &mut err);
    }
    super::service::validate(config, &mut err);
    errors
}

/// Parses a listen endpoint (`HOST:PORT`, `:PORT`, `localhost:PORT`).
pub(crate) fn parse_listen(endpoint: &str) -> Option<SocketAddr> {
    let e = endpoint.trim();
    let e = if let Some(port) = e.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        e.replacen("localhost:", "127.0.0.1:", 1)
    };
    e.parse().ok()
}

#[cfg(test)]
mod tests {

    use super::super::errors_of;

    #[test]
    fn connection_bounds_are_positive() {
        let errs = errors_of(
            "
receivers:
  otlp:
    protocols:
      grpc: {max_connections: 0, max_concurrent_streams: 0, keepalive: {server_parameters: {time: 0s}}}
      http: {read_header_timeout: 0s, read_timeout: 0, idle_timeout: 0s}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}
",
        );
        for expected in [
            "receivers.otlp.protocols.grpc.max_connections: must be at least 1",
            "receivers.otlp.protocols.grpc.max_concurrent_streams: must be at least 1",
            "receivers.otlp.protocols.grpc.keepalive.server_parameters.time: must be more than 0",
            "receivers.otlp.protocols.http.read_header_timeout: must be more than 0",
            "receivers.otlp.protocols.http.read_timeout: must be more than 0",
            "receivers.otlp.protocols.http.idle_timeout: must be more than 0",
        ] {
            assert!(errs.iter().any(|e| e == expected), "missing {expected:?} in {errs:#?}");
        }
        let ok = errors_of(
            "
receivers:
  otlp:
    protocols:
      grpc: {max_connections: 5, keepalive: {server_parameters: {time: 10s, timeout: 1s, max_connection_idle: 1m}}}
      http: {read_header_timeout: 1s, read_timeout: 2s, idle_timeout: 3s}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}
",
        );
        assert!(ok.is_empty(), "{ok:#?}");
    }

    #[test]
    fn references_must_exist() {
        let errs = errors_of(
            "
receivers: {otlp: {protocols: {grpc: {}}}}
exporters: {otlphttp/a: {endpoint: 'http://x', auth: {authenticator: oauth2client/missing}}}
service:
  extensions: [health_check]
  pipelines: {traces: {receivers: [otlp, otlp/2], processors: [batch], exporters: [otlphttp/a, debug]}}
",
        );
        for expected in [
            "exporters.otlphttp/a.auth.authenticator: \"oauth2client/missing\" is not defined under extensions",
            "service.extensions[0]: \"health_check\" is not defined under extensions",
            "service.pipelines.traces.receivers[1]: \"otlp/2\" is not defined under receivers",
            "service.pipelines.traces.processors[0]: \"batch\" is not defined under processors",
            "service.pipelines.traces.exporters[1]: \"debug\" is not defined under exporters",
        ] {
            assert!(errs.iter().any(|e| e == expected), "missing {expected:?} in {errs:#?}");
        }
    }

    #[test]
    fn file_storage_is_checked_and_referenced() {
        let base = "
receivers: {otlp: {protocols: {grpc: {}}}}
exporters: {otlphttp/a: {endpoint: 'http://x', sending_queue: {storage: STORAGE}}}
extensions:
  file_storage/s: {directory: /var/lib/spool}
  file_storage/bad: {max_size_mib: 0, on_full: block, fsync: false}
service:
  extensions: [EXTENSIONS]
  pipelines: {traces: {receivers: [otlp], exporters: [otlphttp/a]}}
";
        let ok = base
            .replace("STORAGE", "file_storage/s")
            .replace("EXTENSIONS", "file_storage/s, file_storage/bad");
        let errs = errors_of(&ok);
        assert_eq!(
            errs,
            // on_full is a typed word: read (and refused) with the file, before the checks.
            vec![
                "extensions.file_storage/bad.on_full: unknown on_full \"block\" (refuse, drop_oldest)",
                "extensions.file_storage/bad.directory: must be set",
                "extensions.file_storage/bad.max_size_mib: must be at least 1",
            ]
        );
        let errs = errors_of(&base.replace("STORAGE", "file_storage/s").replace("EXTENSIONS", ""));
        assert!(
            errs.iter().any(|e| e
                == "exporters.otlphttp/a.sending_queue.storage: \"file_storage/s\" must also be listed in service.extensions"),
            "{errs:#?}"
        );
        let errs = errors_of(&base.replace("STORAGE", "file_storage/none").replace("EXTENSIONS", ""));
        assert!(
            errs.iter()
                .any(|e| e.ends_with("\"file_storage/none\" is not defined under extensions")),
            "{errs:#?}"
        );
    }

    #[test]
    fn values_are_range_checked() {
        let errs = errors_of(
            "
receivers: {otlp: {protocols: {grpc: {endpoint: 'nowhere', tls: {cert_file: a, min_version: '1.0'}}}}}
processors:
  batch: {send_batch_size: 100, send_batch_max_size: 10}
  memory_limiter: {limit_mib: 100, spike_limit_mib: 200}
exporters:
  otlphttp: {endpoint: 'ftp://x', compression: zstd, headers: {x-mlflow-experiment-id: abc}}
service: {pipelines: {traces: {receivers: [otlp], processors: [batch, memory_limiter], exporters: [otlphttp]}}}
",
        );
        for expected in [
            "receivers.otlp.protocols.grpc.endpoint:",
            "receivers.otlp.protocols.grpc.tls: cert_file and key_file",
            "receivers.otlp.protocols.grpc.tls.min_version:",
            "processors.batch.send_batch_max_size:",
            "processors.memory_limiter.spike_limit_mib:",
            "exporters.otlphttp.endpoint: \"ftp://x\"",
            "exporters.otlphttp.compression: \"zstd\" is rejected by MLflow",
            "exporters.otlphttp.headers.x-mlflow-experiment-id:",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "missing {expected:?} in {errs:#?}"
            );
        }
        // Not first is the collector's advice, a warning (config::warnings), not an error.
        assert!(!errs.iter().any(|e| e.contains("first processor")), "{errs:#?}");
    }

    #[test]
    fn memory_limiter_percentages() {
        let base = "
receivers: {otlp: {protocols: {grpc: {}}}}
processors: {memory_limiter: LIMITS}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], processors: [memory_limiter], exporters: [debug]}}}
";
        let of = |limits: &str| errors_of(&base.replace("LIMITS", limits));
        assert_eq!(
            of("{limit_percentage: 80, spike_limit_percentage: 20}"),
            Vec::<String>::new()
        );
        assert_eq!(
            of("{}"),
            vec![
                "processors.memory_limiter.limit_mib: set limit_mib (MiB of span data held in the relay) or limit_percentage"
            ]
        );
        assert_eq!(
            of("{limit_percentage: 101}"),
            vec!["processors.memory_limiter.limit_percentage: must be between 0 and 100"]
        );
        assert_eq!(
            of("{limit_percentage: 50, spike_limit_percentage: 50}"),
            vec!["processors.memory_limiter.spike_limit_percentage: must be below limit_percentage"]
        );
        let config = super::super::parse_str(
            &base.replace("LIMITS", "{limit_percentage: 50, spike_limit_percentage: 10}"),
            &|_| None,
        )
        .unwrap();
        let Some(super::super::Processor::MemoryLimiter(m)) = config.processors.get("memory_limiter") else {
            panic!()
        };
        let (limit, spike) = m.effective_mib();
        assert!(limit > 0 && spike > 0 && spike < limit, "{limit} {spike}");
        let fixed = super::super::MemoryLimiterConfig {
            limit_mib: 100,
            spike_limit_mib: 20,
            limit_percentage: 50,
            ..Default::default()
        };
        assert_eq!(fixed.effective_mib(), (100, 20), "limit_mib wins");
    }

    #[test]
    fn telemetry_readers_level_and_resource() {
        let base = "
receivers: {otlp: {protocols: {grpc: {}}}}
exporters: {debug: {}}
service:
  telemetry: TELEMETRY
  pipelines: {traces: {receivers: [otlp], exporters: [debug]}}
";
        let load = |t: &str| super::super::parse_str(&base.replace("TELEMETRY", t), &|_| None);
        let c = load("{metrics: {readers: [{pull: {exporter: {prometheus: {host: '127.0.0.1', port: 9999}}}}]}, resource: {service.name: relay-a, deployment.environment: prod, service.version: null}}").unwrap();
        let m = &c.service.telemetry.metrics;
        assert_eq!(m.listen().map(|a| a.as_str()).as_deref(), Some("127.0.0.1:9999"));
        let labels = c.service.telemetry.resource_labels("id-1");
        assert_eq!(
            labels,
            vec![
                ("deployment_environment".to_string(), "prod".to_string()),
                ("service_instance_id".to_string(), "id-1".to_string()),
                ("service_name".to_string(), "relay-a".to_string()),
            ]
        );
        let ipv6 = load("{metrics: {readers: [{pull: {exporter: {prometheus: {host: '::1', port: 9}}}}]}}").unwrap();
        assert_eq!(
            ipv6.service.telemetry.metrics.listen().map(|a| a.as_str()).as_deref(),
            Some("[::1]:9")
        );
        let none = load("{metrics: {level: none}}").unwrap();
        assert_eq!(none.service.telemetry.metrics.listen(), None);
        let default = load("{}").unwrap();
        assert_eq!(
            default
                .service
                .telemetry
                .metrics
                .listen()
                .map(|a| a.as_str())
                .as_deref(),
            Some("0.0.0.0:8888")
        );
        let errs = |t: &str| load(t).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(errs("{metrics: {level: verbose}}").contains("unknown level \"verbose\""));
        assert!(
            errs("{metrics: {readers: [{pull: {exporter: {prometheus: {host: 'no host', port: 1}}}}]}}")
                .contains("readers[0].pull.exporter.prometheus.host")
        );
        assert!(
            errs("{metrics: {readers: [{pull: {exporter: {prometheus: {}}}}, {pull: {exporter: {prometheus: {port: 2}}}}]}}")
                .contains("only one pull reader")
        );
        assert!(errs("{metrics: {readers: [{}]}}").contains("set pull"));
    }

    #[test]
    fn non_trace_pipelines_and_port_clashes_are_errors() {
        let errs = errors_of(
            "
receivers: {otlp: {protocols: {grpc: {endpoint: '127.0.0.1:4317'}, http: {endpoint: '127.0.0.1:4317'}}}}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}, metrics: {receivers: [otlp], exporters: [debug]}}}
",
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("service.pipelines.metrics: \"metrics\" pipelines are not supported"))
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("is already used by receivers.otlp.protocols.grpc.endpoint")),
            "{errs:#?}"
        );
    }

    #[test]
    fn default_addresses_parse() {
        use super::super::{
            DEFAULT_GRPC_ENDPOINT, DEFAULT_HEALTH_ENDPOINT, DEFAULT_HTTP_ENDPOINT, DEFAULT_METRICS_ADDRESS, ListenAddr,
        };
        for text in [
            DEFAULT_GRPC_ENDPOINT,
            DEFAULT_HTTP_ENDPOINT,
            DEFAULT_HEALTH_ENDPOINT,
            DEFAULT_METRICS_ADDRESS,
        ] {
            assert_eq!(ListenAddr::constant(text).as_str(), text);
        }
    }

    /// An endpoint that failed to load takes the default for the rest of the checks; a clash
    /// with that default is not the user's problem and is not reported (either order).
    #[test]
    fn no_port_clash_with_an_endpoint_that_failed_to_load() {
        for (first, second) in [("nowhere", "localhost:4317"), ("localhost:4317", "nowhere")] {
            let errs = errors_of(&format!(
                "
receivers: {{otlp/a: {{protocols: {{grpc: {{endpoint: '{first}'}}}}}}, otlp/b: {{protocols: {{grpc: {{endpoint: '{second}'}}}}}}}}
exporters: {{debug: {{}}}}
service: {{pipelines: {{traces: {{receivers: [otlp/a, otlp/b], exporters: [debug]}}}}}}
"
            ));
            assert_eq!(errs.len(), 1, "{errs:#?}");
            assert!(errs[0].ends_with("\"nowhere\" is not HOST:PORT"), "{errs:#?}");
        }
        let clash = errors_of(
            "
receivers: {otlp/a: {protocols: {grpc: {}}}, otlp/b: {protocols: {grpc: {endpoint: 'localhost:4317'}}}}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp/a, otlp/b], exporters: [debug]}}}
",
        );
        assert_eq!(
            clash,
            vec![
                "receivers.otlp/b.protocols.grpc.endpoint: 127.0.0.1:4317 is already used by receivers.otlp/a.protocols.grpc.endpoint"
            ]
        );
    }

    #[test]
    fn listen_forms() {
        assert_eq!(super::parse_listen(":4317").unwrap().to_string(), "0.0.0.0:4317");
        assert_eq!(super::parse_listen("localhost:1").unwrap().to_string(), "127.0.0.1:1");
        assert!(super::parse_listen("[::1]:4317").is_some());
        assert!(super::parse_listen("host").is_none());
    }
}
