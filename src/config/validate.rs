//! Semantic checks on a typed configuration: references between components, value ranges,
//! endpoints. Pure: no file or network access, so `check` and `run` agree.
use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::otlp::{EXPERIMENT_HEADER, ExperimentId};

use super::{Config, ConfigError, Exporter, Extension, Processor, Receiver, ServerTlsConfig, component_type};

pub fn validate(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut err = |path: String, msg: String| errors.push(ConfigError::new(path, msg));

    for (id, r) in &config.receivers {
        let Receiver::Otlp(otlp) = r;
        let base = format!("receivers.{id}.protocols");
        if otlp.protocols.grpc.is_none() && otlp.protocols.http.is_none() {
            err(base.clone(), "enable at least one of grpc, http".into());
        }
        for (name, proto) in [("grpc", &otlp.protocols.grpc), ("http", &otlp.protocols.http)] {
            let Some(p) = proto else { continue };
            let path = format!("{base}.{name}");
            if p.max_recv_msg_size_mib == 0 || p.max_recv_msg_size_mib > 1024 {
                err(
                    format!("{path}.max_recv_msg_size_mib"),
                    "must be between 1 and 1024".into(),
                );
            }
            if let Some(tls) = &p.tls {
                validate_server_tls(tls, &format!("{path}.tls"), &mut err);
            }
            // Zero would mean "no bound": these close what a slow or hostile peer holds open.
            let keepalive = p.keepalive.as_ref().map(|k| &k.server_parameters);
            for (key, d) in [
                ("read_header_timeout", Some(&p.read_header_timeout)),
                ("read_timeout", Some(&p.read_timeout)),
                ("idle_timeout", Some(&p.idle_timeout)),
                ("keepalive.server_parameters.time", keepalive.map(|k| &k.time)),
                ("keepalive.server_parameters.timeout", keepalive.map(|k| &k.timeout)),
            ] {
                if d.is_some_and(|d| d.0.is_zero()) {
                    err(format!("{path}.{key}"), "must be more than 0".into());
                }
            }
            if p.max_connections == Some(0) {
                err(format!("{path}.max_connections"), "must be at least 1".into());
            }
            if p.max_concurrent_streams == Some(0) {
                err(format!("{path}.max_concurrent_streams"), "must be at least 1".into());
            }
        }
    }

    for (id, p) in &config.processors {
        let path = format!("processors.{id}");
        match p {
            Processor::Batch(b) => {
                if b.send_batch_size == 0 {
                    err(format!("{path}.send_batch_size"), "must be at least 1".into());
                }
                if b.send_batch_max_size != 0 && b.send_batch_max_size < b.send_batch_size {
                    err(
                        format!("{path}.send_batch_max_size"),
                        format!(
                            "must be 0 (no limit) or at least send_batch_size ({})",
                            b.send_batch_size
                        ),
                    );
                }
            }
            Processor::MemoryLimiter(m) => {
                if m.limit_percentage != 0 || m.spike_limit_percentage != 0 {
                    err(
                        format!("{path}.limit_percentage"),
                        "percentages of total memory are not supported; set limit_mib".into(),
                    );
                } else if m.limit_mib == 0 {
                    err(
                        format!("{path}.limit_mib"),
                        "must be set (MiB of span data held in the relay)".into(),
                    );
                }
                if m.spike_limit_mib >= m.limit_mib && m.limit_mib != 0 {
                    err(format!("{path}.spike_limit_mib"), "must be below limit_mib".into());
                }
            }
        }
    }

    for (id, e) in &config.exporters {
        let path = format!("exporters.{id}");
        match e {
            Exporter::OtlpHttp(x) => {
                if x.endpoint.is_empty() && x.traces_endpoint.is_empty() {
                    err(format!("{path}.endpoint"), "set endpoint or traces_endpoint".into());
                }
                for (key, url) in [("endpoint", &x.endpoint), ("traces_endpoint", &x.traces_endpoint)] {
                    if !url.is_empty()
                        && url
                            .parse::<http::Uri>()
                            .ok()
                            .and_then(|u| u.scheme_str().map(str::to_owned))
                            .is_none_or(|s| s != "http" && s != "https")
                    {
                        err(
                            format!("{path}.{key}"),
                            format!("{url:?} is not an http:// or https:// URL"),
                        );
                    }
                }
                for (k, v) in &x.headers {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        err(format!("{path}.headers.{k}"), "not a valid HTTP header name".into());
                    }
                    if http::HeaderValue::from_str(v).is_err() {
                        err(format!("{path}.headers.{k}"), "not a valid HTTP header value".into());
                    }
                    if k.eq_ignore_ascii_case("content-encoding") {
                        err(
                            format!("{path}.headers.{k}"),
                            "set compression instead of a Content-Encoding header".into(),
                        );
                    }
                }
                if let Some(exp) = x
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(EXPERIMENT_HEADER))
                    .map(|(_, v)| v)
                    && !ExperimentId::is_valid(exp)
                {
                    err(
                        format!("{path}.headers.{EXPERIMENT_HEADER}"),
                        format!("{exp:?} is not a numeric MLflow experiment id"),
                    );
                }
                if x.timeout.is_zero() {
                    err(format!("{path}.timeout"), "must be above 0".into());
                }
                let r = &x.retry_on_failure;
                if r.enabled {
                    if r.initial_interval.is_zero() {
                        err(
                            format!("{path}.retry_on_failure.initial_interval"),
                            "must be above 0".into(),
                        );
                    }
                    if r.max_interval < r.initial_interval {
                        err(
                            format!("{path}.retry_on_failure.max_interval"),
                            "must be at least initial_interval".into(),
                        );
                    }
                    if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
                        err(
                            format!("{path}.retry_on_failure.multiplier"),
                            "must be at least 1".into(),
                        );
                    }
                    if !(0.0..=1.0).contains(&r.randomization_factor) {
                        err(
                            format!("{path}.retry_on_failure.randomization_factor"),
                            "must be between 0 and 1".into(),
                        );
                    }
                }
                let q = &x.sending_queue;
                if q.num_consumers == 0 {
                    err(
                        format!("{path}.sending_queue.num_consumers"),
                        "must be at least 1".into(),
                    );
                }
                if q.queue_size == 0 {
                    err(format!("{path}.sending_queue.queue_size"), "must be at least 1".into());
                }
                if let Some(storage) = &q.storage {
                    match config.extensions.get(storage) {
                        Some(Extension::FileStorage(_)) => {
                            if !config.service.extensions.contains(storage) {
                                err(
                                    format!("{path}.sending_queue.storage"),
                                    format!("{storage:?} must also be listed in service.extensions"),
                                );
                            }
                            if !q.enabled {
                                err(
                                    format!("{path}.sending_queue.enabled"),
                                    "a storage needs the sending queue enabled".into(),
                                );
                            }
                        }
                        Some(_) => err(
                            format!("{path}.sending_queue.storage"),
                            format!("{storage:?} is not a file_storage extension"),
                        ),
                        None => err(
                            format!("{path}.sending_queue.storage"),
                            format!("{storage:?} is not defined under extensions"),
                        ),
                    }
                }
                if let Some(auth) = &x.auth {
                    let a = &auth.authenticator;
                    match config.extensions.get(a) {
                        Some(Extension::OAuth2Client(_)) => {
                            if !config.service.extensions.contains(a) {
                                err(
                                    format!("{path}.auth.authenticator"),
                                    format!("{a:?} must also be listed in service.extensions"),
                                );
                            }
                        }
                        Some(_) => err(
                            format!("{path}.auth.authenticator"),
                            format!("{a:?} is not an oauth2client extension"),
                        ),
                        None => err(
                            format!("{path}.auth.authenticator"),
                            format!("{a:?} is not defined under extensions"),
                        ),
                    }
                }
                let t = &x.tls;
                if t.cert_file.is_empty() != t.key_file.is_empty() {
                    err(format!("{path}.tls"), "cert_file and key_file go together".into());
                }
            }
            Exporter::Debug(_) => {}
        }
    }

    for (id, x) in &config.extensions {
        let path = format!("extensions.{id}");
        match x {
            Extension::HealthCheck(_) => {}
            Extension::FileStorage(f) => {
                if f.directory.is_empty() {
                    err(format!("{path}.directory"), "must be set".into());
                }
                if f.max_size_mib == 0 {
                    err(format!("{path}.max_size_mib"), "must be at least 1".into());
                }
                if f.segment_size_mib == 0 {
                    err(format!("{path}.segment_size_mib"), "must be at least 1".into());
                }
            }
            Extension::OAuth2Client(o) => {
                if o.client_id.is_empty() && o.client_id_file.is_empty() {
                    err(format!("{path}.client_id"), "set client_id or client_id_file".into());
                }
                if !o.client_id.is_empty() && !o.client_id_file.is_empty() {
                    err(
                        format!("{path}.client_id_file"),
                        "set client_id or client_id_file, not both".into(),
                    );
                }
                if o.client_secret.is_empty() && o.client_secret_file.is_empty() {
                    err(
                        format!("{path}.client_secret"),
                        "set client_secret or client_secret_file".into(),
                    );
                }
                if !o.client_secret.is_empty() && !o.client_secret_file.is_empty() {
                    err(
                        format!("{path}.client_secret_file"),
                        "set client_secret or client_secret_file, not both".into(),
                    );
                }
                if o.token_url.is_empty() && o.discovery_url.is_empty() {
                    err(format!("{path}.token_url"), "set token_url or discovery_url".into());
                }
                for (key, url) in [("token_url", &o.token_url), ("discovery_url", &o.discovery_url)] {
                    if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                        err(
                            format!("{path}.{key}"),
                            format!("{url:?} is not an http:// or https:// URL"),
                        );
                    }
                }
            }
        }
    }

    let s = &config.service;
    for (i, id) in s.extensions.iter().enumerate() {
        if !config.extensions.contains_key(id) {
            err(
                format!("service.extensions[{i}]"),
                format!("{id:?} is not defined under extensions"),
            );
        }
    }
    if let Some(level) = &s.telemetry.logs.level
        && !matches!(level.to_ascii_lowercase().as_str(), "debug" | "info" | "warn" | "error")
    {
        err(
            "service.telemetry.logs.level".into(),
            format!("unknown level {level:?} (debug, info, warn, error)"),
        );
    }
    if s.pipelines.is_empty() {
        err("service.pipelines".into(), "define a traces pipeline".into());
    }
    let mut exporter_batch: BTreeMap<&str, (&str, Option<&str>)> = BTreeMap::new();
    for (name, p) in &s.pipelines {
        let path = format!("service.pipelines.{name}");
        if component_type(name) != "traces" {
            err(
                path.clone(),
                format!(
                    "{:?} pipelines are not supported: this relay carries traces",
                    component_type(name)
                ),
            );
            continue;
        }
        if p.receivers.is_empty() {
            err(format!("{path}.receivers"), "list at least one receiver".into());
        }
        if p.exporters.is_empty() {
            err(format!("{path}.exporters"), "list at least one exporter".into());
        }
        for (i, r) in p.receivers.iter().enumerate() {
            if !config.receivers.contains_key(r) {
                err(
                    format!("{path}.receivers[{i}]"),
                    format!("{r:?} is not defined under receivers"),
                );
            }
        }
        let mut batch = None;
        for (i, id) in p.processors.iter().enumerate() {
            match config.processors.get(id) {
                None => err(
                    format!("{path}.processors[{i}]"),
                    format!("{id:?} is not defined under processors"),
                ),
                Some(Processor::Batch(_)) => {
                    if batch.is_some() {
                        err(
                            format!("{path}.processors[{i}]"),
                            "only one batch processor per pipeline".into(),
                        );
                    }
                    batch = Some(id.as_str());
                }
                Some(Processor::MemoryLimiter(_)) => {
                    if i != 0 {
                        err(
                            format!("{path}.processors[{i}]"),
                            "memory_limiter must be the first processor".into(),
                        );
                    }
                }
            }
        }
        for (i, e) in p.exporters.iter().enumerate() {
            if !config.exporters.contains_key(e) {
                err(
                    format!("{path}.exporters[{i}]"),
                    format!("{e:?} is not defined under exporters"),
                );
                continue;
            }
            // Batching happens in front of each exporter, so an exporter shared by pipelines
            // needs one batch setting.
            if let Some((other, other_batch)) = exporter_batch.insert(e, (name, batch))
                && other_batch != batch
            {
                err(
                    format!("{path}.exporters[{i}]"),
                    format!("{e:?} is also used by pipeline {other:?} with a different batch processor"),
                );
            }
        }
    }
    let used: Vec<&String> = s.pipelines.values().flat_map(|p| p.receivers.iter()).collect();
    let mut seen_addrs: BTreeMap<String, String> = BTreeMap::new();
    for (id, r) in &config.receivers {
        let Receiver::Otlp(otlp) = r;
        if !used.contains(&id) {
            continue;
        }
        for (name, proto, default) in [
            ("grpc", &otlp.protocols.grpc, super::DEFAULT_GRPC_ENDPOINT),
            ("http", &otlp.protocols.http, super::DEFAULT_HTTP_ENDPOINT),
        ] {
            let Some(p) = proto else { continue };
            let addr = p.endpoint.unwrap_or_else(|| super::ListenAddr::constant(default)).0;
            let path = format!("receivers.{id}.protocols.{name}.endpoint");
            if addr.port() != 0
                && let Some(other) = seen_addrs.insert(addr.to_string(), path.clone())
            {
                err(path, format!("{addr} is already used by {other}"));
            }
        }
    }
    errors
}

fn validate_server_tls(tls: &ServerTlsConfig, path: &str, err: &mut impl FnMut(String, String)) {
    if tls.cert_file.is_empty() || tls.key_file.is_empty() {
        err(path.to_string(), "cert_file and key_file are both required".into());
    }
    if !tls.client_ca_file.is_empty() && !tls.ca_file.is_empty() && tls.client_ca_file != tls.ca_file {
        err(
            format!("{path}.ca_file"),
            "set client_ca_file or ca_file, not both".into(),
        );
    }
    if !matches!(tls.min_version.as_str(), "1.2" | "1.3") {
        err(
            format!("{path}.min_version"),
            format!("{:?} is not supported (1.2, 1.3)", tls.min_version),
        );
    }
    if !tls.allowed_clients.is_empty() && tls.client_ca_file.is_empty() && tls.ca_file.is_empty() {
        err(
            format!("{path}.allowed_clients"),
            "needs client_ca_file: without client certificates there is nothing to match".into(),
        );
    }
    for (i, p) in tls.allowed_clients.iter().enumerate() {
        if p.is_empty() {
            err(format!("{path}.allowed_clients[{i}]"), "empty pattern".into());
        }
    }
}

/// Parses a listen endpoint (`HOST:PORT`, `:PORT`, `localhost:PORT`).
pub fn parse_listen(endpoint: &str) -> Option<SocketAddr> {
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
    use super::super::parse_str;

    fn errors_of(text: &str) -> Vec<String> {
        match parse_str(text, &|_| None) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

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
            "service.pipelines.traces.processors[1]: memory_limiter must be the first processor",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "missing {expected:?} in {errs:#?}"
            );
        }
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
    fn listen_forms() {
        assert_eq!(super::parse_listen(":4317").unwrap().to_string(), "0.0.0.0:4317");
        assert_eq!(super::parse_listen("localhost:1").unwrap().to_string(), "127.0.0.1:1");
        assert!(super::parse_listen("[::1]:4317").is_some());
        assert!(super::parse_listen("host").is_none());
    }
}
