//! What a valid configuration says that the relay does not do: keys accepted so a collector
//! config loads unchanged but not acted on, and advice the collector gives. `run` logs each at
//! start and `check` prints them; none stops the relay.
use std::time::Duration;

use super::{Config, ConfigError, Exporter, Extension, Processor};

/// OTEL_BSP_SCHEDULE_DELAY's default: how often an SDK's BatchSpanProcessor exports.
const SDK_EXPORT_INTERVAL: Duration = Duration::from_secs(5);

/// Every warning for `config`, with its YAML path, in a stable order.
pub(crate) fn warnings(config: &Config) -> Vec<ConfigError> {
    let mut out = Vec::new();
    let mut warn = |path: String, message: &str| out.push(ConfigError::new(path, message));
    const IGNORED: &str = "accepted for collector compatibility but not acted on";
    for (id, p) in &config.processors {
        if let Processor::Batch(b) = p {
            if !b.metadata_keys.is_empty() {
                warn(
                    format!("processors.{id}.metadata_keys"),
                    &format!("{IGNORED}: batches are partitioned by destination (exporter and experiment)"),
                );
            }
            if b.metadata_cardinality_limit.is_some() {
                warn(format!("processors.{id}.metadata_cardinality_limit"), IGNORED);
            }
        }
        if let Processor::GroupByTrace(g) = p
            && g.wait_duration.0 < SDK_EXPORT_INTERVAL
        {
            warn(
                format!("processors.{id}.wait_duration"),
                &format!(
                    "{} is shorter than an SDK's export interval (5s by default): a trace whose next spans come in a later export leaves in pieces before its root arrives; 30s suits agent traces (a trace still leaves root_grace after its root)",
                    g.wait_duration
                ),
            );
        }
    }
    for (id, e) in &config.exporters {
        if let Exporter::OtlpHttp(c) = e
            && c.sending_queue.blocking.is_some()
        {
            warn(
                format!("exporters.{id}.sending_queue.blocking"),
                &format!("{IGNORED}: a full queue refuses new data (receivers answer retryable errors)"),
            );
        }
    }
    for (id, x) in &config.extensions {
        let path = format!("extensions.{id}");
        match x {
            Extension::HealthCheck(h) if h.check_collector_pipeline.is_some() => {
                warn(format!("{path}.check_collector_pipeline"), IGNORED);
            }
            Extension::BearerTokenAuth(b)
                if b.file_retry.max_retries.is_some() || b.file_retry.retry_interval.is_some() =>
            {
                warn(
                    format!("{path}.file_retry"),
                    &format!(
                        "max_retries and retry_interval are {IGNORED}: with enabled, exports wait for the file as long as it takes, looking again at most once a second"
                    ),
                );
            }
            Extension::FileStorage(f) => {
                if f.compaction.is_some() {
                    warn(
                        format!("{path}.compaction"),
                        &format!("{IGNORED}: spool segments are deleted whole, there is nothing to compact"),
                    );
                }
                if f.timeout.is_some() {
                    warn(format!("{path}.timeout"), IGNORED);
                }
            }
            _ => {}
        }
    }
    telemetry_warnings(config, &mut warn);
    for (name, p) in &config.service.pipelines {
        for (i, id) in p.processors.iter().enumerate() {
            if i != 0 && matches!(config.processors.get(id), Some(Processor::MemoryLimiter(_))) {
                warn(
                    format!("service.pipelines.{name}.processors[{i}]"),
                    "memory_limiter is not the first processor: the collector advises it first; this relay applies its limit where data is received wherever it is listed",
                );
            }
        }
    }
    super::otlp_grpc::warnings(config, &mut out);
    out
}

fn telemetry_warnings(config: &Config, warn: &mut dyn FnMut(String, &str)) {
    const IGNORED: &str = "accepted for collector compatibility but not acted on";
    let t = &config.service.telemetry;
    if t.logs.encoding.is_some() {
        warn(
            "service.telemetry.logs.encoding".into(),
            &format!("{IGNORED}: use --log-format (text or json)"),
        );
    }
    for (i, r) in t.metrics.readers.iter().enumerate() {
        let path = format!("service.telemetry.metrics.readers[{i}]");
        if r.periodic.is_some() {
            warn(
                format!("{path}.periodic"),
                &format!("{IGNORED}: the relay's metrics are served for scraping (a pull prometheus reader) only"),
            );
        }
        let Some(p) = r.pull.as_ref().and_then(|p| p.exporter.prometheus.as_ref()) else {
            continue;
        };
        for (key, set) in [
            ("without_type_suffix", p.without_type_suffix.is_some()),
            ("without_units", p.without_units.is_some()),
            ("without_scope_info", p.without_scope_info.is_some()),
            (
                "with_resource_constant_labels",
                p.with_resource_constant_labels.is_some(),
            ),
        ] {
            if set {
                warn(format!("{path}.pull.exporter.prometheus.{key}"), IGNORED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse_str;
    use super::*;

    fn warnings_of(text: &str) -> Vec<String> {
        let config = parse_str(text, &|_| None).unwrap();
        warnings(&config).iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn a_plain_config_has_no_warnings() {
        let w = warnings_of(
            "
receivers: {otlp: {protocols: {http: {}}}}
processors: {memory_limiter: {limit_mib: 100}, groupbytrace: {wait_duration: 30s}, batch: {}}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], processors: [memory_limiter, groupbytrace, batch], exporters: [debug]}}}
",
        );
        assert!(w.is_empty(), "{w:#?}");
    }

    #[test]
    fn ignored_keys_and_advice_are_warned() {
        let w = warnings_of(
            "
receivers: {otlp: {protocols: {http: {}}}}
processors: {memory_limiter: {limit_mib: 100}, batch: {metadata_keys: [x-tenant]}, groupbytrace: {}}
exporters: {otlp_http: {endpoint: 'http://x', sending_queue: {blocking: true}}}
extensions:
  file_storage: {directory: /tmp/x, compaction: {on_start: true}}
  health_check: {check_collector_pipeline: {enabled: false}}
service:
  extensions: [file_storage, health_check]
  telemetry:
    logs: {encoding: json}
    metrics:
      readers:
        - pull: {exporter: {prometheus: {host: 0.0.0.0, port: 8888, without_units: true}}}
        - periodic: {exporter: {otlp: {endpoint: 'http://x'}}}
  pipelines: {traces: {receivers: [otlp], processors: [groupbytrace, batch, memory_limiter], exporters: [otlp_http]}}
",
        );
        for expected in [
            "processors.batch.metadata_keys: accepted",
            "exporters.otlp_http.sending_queue.blocking: accepted",
            "extensions.file_storage.compaction: accepted",
            "extensions.health_check.check_collector_pipeline: accepted",
            "service.telemetry.logs.encoding: accepted",
            "service.telemetry.metrics.readers[0].pull.exporter.prometheus.without_units: accepted",
            "service.telemetry.metrics.readers[1].periodic: accepted",
            "service.pipelines.traces.processors[2]: memory_limiter is not the first processor",
            "processors.groupbytrace.wait_duration: 1s is shorter than an SDK's export interval",
        ] {
            assert!(
                w.iter().any(|x| x.starts_with(expected)),
                "missing {expected:?} in {w:#?}"
            );
        }
        assert_eq!(w.len(), 9, "{w:#?}");
    }
}
