//! Reading a configuration: YAML → env substitution → typed components, collecting every error.
use std::collections::BTreeMap;
use std::path::Path;

use serde_norway::Value;

use super::env::{Substituted, substitute};
use super::typed::{join, typed};
use super::{
    Config, ConfigError, ConfigErrors, Exporter, Extension, Processor, Receiver, ServiceConfig, component_type,
};

/// Reads, substitutes (from the process environment), types and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )])
    })?;
    parse_str(&text, &|name| std::env::var(name).ok())
}

/// Parses configuration text; `lookup` resolves `${env:NAME}` references.
pub fn parse_str(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut root: Value = match serde_norway::from_str(text) {
        Ok(Value::Null) => Value::Mapping(Default::default()),
        Ok(v) => v,
        Err(e) => {
            let at = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            return Err(ConfigErrors(vec![ConfigError::new(
                "",
                format!("not valid YAML{at}: {e}"),
            )]));
        }
    };
    substitute_tree(&mut root, "", lookup, &mut errors);
    let config = build(root, &mut errors);
    // A value that failed to load would only be reported again, less clearly, by validation;
    // and a check that compared another value with it (a port clash naming it) compared with
    // the default that stood in for it.
    let failed: Vec<String> = errors.iter().map(|e| e.path.clone()).collect();
    errors.extend(
        super::validate::validate(&config)
            .into_iter()
            .filter(|e| {
                !failed
                    .iter()
                    .any(|f| *f == e.path || (!f.is_empty() && e.message.ends_with(&format!(" {f}"))))
            })
            .map(|e| defined_but_failed(e, &failed)),
    );
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// A reference to a component that is in the file but failed to load (an unsupported type, a
/// value that could not be read) is not "not defined": it points at the component's own error.
fn defined_but_failed(mut e: ConfigError, failed: &[String]) -> ConfigError {
    for section in ["receivers", "processors", "exporters", "extensions"] {
        let Some(quoted) = e.message.strip_suffix(&format!(" is not defined under {section}")) else {
            continue;
        };
        let Some(id) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) else {
            continue;
        };
        let at = format!("{section}.{id}");
        if failed.contains(&at) {
            e.message = format!("{quoted} is defined under {section} but cannot be used: see {at}");
        }
    }
    e
}

fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other).unwrap_or_default().trim().to_string(),
    }
}

fn substitute_tree(
    value: &mut Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    match value {
        Value::String(s) => match substitute(s, lookup) {
            Ok(Substituted::Unchanged) => {}
            Ok(Substituted::Embedded(new)) => *s = new,
            Ok(Substituted::Whole(new)) => {
                // A whole-scalar reference is re-read as a YAML scalar so numbers and booleans keep
                // their type; anything that is not a plain scalar stays a string.
                *value = match serde_norway::from_str::<Value>(&new) {
                    Ok(v @ (Value::Bool(_) | Value::Number(_))) => v,
                    _ => Value::String(new),
                };
            }
            Ok(Substituted::File(text)) => {
                // YAML of any shape, as the collector's file provider reads it; text that is not
                // YAML stays the file's text.
                *value = match serde_norway::from_str::<Value>(&text) {
                    Ok(Value::Null) | Err(_) => Value::String(text.strip_suffix('\n').unwrap_or(&text).to_string()),
                    Ok(v) => v,
                };
            }
            Err(e) => errors.push(ConfigError::new(path, e.to_string())),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_tree(item, &format!("{path}[{i}]"), lookup, errors);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let p = join(path, &key_text(k));
                substitute_tree(v, &p, lookup, errors);
            }
        }
        Value::Tagged(t) => substitute_tree(&mut t.value, path, lookup, errors),
        _ => {}
    }
}

fn section(root: &mut BTreeMap<String, Value>, name: &str, errors: &mut Vec<ConfigError>) -> Vec<(String, Value)> {
    match root.remove(name) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Mapping(m)) => m.into_iter().map(|(k, v)| (key_text(&k), v)).collect(),
        Some(_) => {
            errors.push(ConfigError::new(name, "must be a mapping of component id to settings"));
            Vec::new()
        }
    }
}

fn unsupported(path: &str, kind: &str, ty: &str, supported: &str, errors: &mut Vec<ConfigError>) {
    let message = match super::known::advice(kind, ty) {
        Some(advice) => format!("the {ty:?} {kind} is not supported by this relay; {advice} (supported: {supported})"),
        None => format!("unknown {kind} type {ty:?} (supported: {supported})"),
    };
    errors.push(ConfigError::new(path, message));
}

/// `grpc:` with no settings enables the protocol with defaults, as in the collector.
fn protocols_enabled(mut v: Value) -> Value {
    if let Some(Value::Mapping(protocols)) = v.get_mut("protocols") {
        for (_, p) in protocols.iter_mut() {
            if p.is_null() {
                *p = Value::Mapping(Default::default());
            }
        }
    }
    v
}

fn build(root: Value, errors: &mut Vec<ConfigError>) -> Config {
    let mut top: BTreeMap<String, Value> = match root {
        Value::Mapping(m) => m.into_iter().map(|(k, v)| (key_text(&k), v)).collect(),
        _ => {
            errors.push(ConfigError::new("", "the configuration must be a YAML mapping"));
            return Config::default();
        }
    };
    let mut config = Config::default();

    receivers(section(&mut top, "receivers", errors), &mut config, errors);
    processors(section(&mut top, "processors", errors), &mut config, errors);
    exporters(section(&mut top, "exporters", errors), &mut config, errors);
    extensions(section(&mut top, "extensions", errors), &mut config, errors);
    if let Some(v) = top.remove("service") {
        if let Some(s) = typed::<ServiceConfig>(v, "service", errors) {
            config.service = s;
        }
    } else {
        errors.push(ConfigError::new(
            "service",
            "missing: a configuration needs service.pipelines",
        ));
    }
    for key in top.keys() {
        let msg = match key.as_str() {
            "connectors" => "connectors are not supported: keep an OpenTelemetry Collector for them".to_string(),
            _ => "unknown top-level key (expected receivers, processors, exporters, extensions, service)".to_string(),
        };
        errors.push(ConfigError::new(key.clone(), msg));
    }
    config
}

/// Each receiver by its type.
fn receivers(components: Vec<(String, Value)>, config: &mut Config, errors: &mut Vec<ConfigError>) {
    for (id, v) in components {
        let path = join("receivers", &id);
        match component_type(&id) {
            "otlp" => {
                if let Some(c) = typed(protocols_enabled(v), &path, errors) {
                    config.receivers.insert(id, Receiver::Otlp(c));
                }
            }
            other => unsupported(&path, "receiver", other, "otlp", errors),
        }
    }
}

/// Each processor by its type: ours, then the registered span processors.
fn processors(components: Vec<(String, Value)>, config: &mut Config, errors: &mut Vec<ConfigError>) {
    for (id, v) in components {
        let path = join("processors", &id);
        match component_type(&id) {
            "batch" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.processors.insert(id, Processor::Batch(c));
                }
            }
            "memory_limiter" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.processors.insert(id, Processor::MemoryLimiter(c));
                }
            }
            "groupbytrace" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.processors.insert(id, Processor::GroupByTrace(c));
                }
            }
            other => match crate::processor::registration(other) {
                Some(r) => {
                    if let Some(c) = (r.load)(v, &path, errors) {
                        let registered = crate::processor::Registered {
                            type_name: r.type_name,
                            config: c,
                        };
                        config.processors.insert(id, Processor::Registered(registered));
                    }
                }
                None => {
                    let names: Vec<&str> = crate::processor::REGISTRY.iter().map(|r| r.type_name).collect();
                    let supported = format!("batch, groupbytrace, memory_limiter, {}", names.join(", "));
                    unsupported(&path, "processor", other, &supported, errors)
                }
            },
        }
    }
}

/// Each exporter by its type.
fn exporters(components: Vec<(String, Value)>, config: &mut Config, errors: &mut Vec<ConfigError>) {
    for (id, v) in components {
        let path = join("exporters", &id);
        match component_type(&id) {
            // otlp_http: the collector's canonical name since v0.144.
            "otlphttp" | "otlp_http" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.exporters.insert(id, Exporter::OtlpHttp(Box::new(c)));
                }
            }
            // otlp_grpc: the collector's canonical name since v0.144.
            "otlp" | "otlp_grpc" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.exporters.insert(id, Exporter::OtlpGrpc(Box::new(c)));
                }
            }
            "debug" | "logging" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.exporters.insert(id, Exporter::Debug(c));
                }
            }
            other => unsupported(
                &path,
                "exporter",
                other,
                "otlphttp (otlp_http), otlp (otlp_grpc), debug",
                errors,
            ),
        }
    }
}

/// Each extension by its type.
fn extensions(components: Vec<(String, Value)>, config: &mut Config, errors: &mut Vec<ConfigError>) {
    for (id, v) in components {
        let path = join("extensions", &id);
        match component_type(&id) {
            "health_check" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.extensions.insert(id, Extension::HealthCheck(c));
                }
            }
            "oauth2client" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.extensions.insert(id, Extension::OAuth2Client(Box::new(c)));
                }
            }
            "file_storage" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.extensions.insert(id, Extension::FileStorage(c));
                }
            }
            "bearertokenauth" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.extensions.insert(id, Extension::BearerTokenAuth(c));
                }
            }
            "basicauth" => {
                if let Some(c) = typed(v, &path, errors) {
                    config.extensions.insert(id, Extension::BasicAuth(c));
                }
            }
            other => unsupported(
                &path,
                "extension",
                other,
                "health_check, oauth2client, bearertokenauth, basicauth, file_storage",
                errors,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    use super::super::errors_of;

    const MINIMAL: &str = "
receivers: {otlp: {protocols: {grpc: {}}}}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}
";

    #[test]
    fn minimal_config_loads() {
        assert_eq!(errors_of(MINIMAL), Vec::<String>::new());
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_path() {
        let text = "
receivers:
  otlp:
    protocols:
      grpc: {endpoint: 127.0.0.1:4317, bogus: 1, tls: {cert_fil: x}}
      http: {max_recv_msg_size_mib: lots}
exporters:
  debug: {verbosity: basic, colour: red}
service:
  pipelines: {traces: {receivers: [otlp], exporters: [debug]}}
  flavour: vanilla
";
        let errs = errors_of(text);
        let has = |prefix: &str| errs.iter().any(|e| e.starts_with(prefix));
        assert!(
            has("receivers.otlp.protocols.grpc.bogus: unknown field `bogus`"),
            "{errs:#?}"
        );
        assert!(
            has("receivers.otlp.protocols.grpc.tls.cert_fil: unknown field"),
            "{errs:#?}"
        );
        assert!(
            has("receivers.otlp.protocols.http.max_recv_msg_size_mib: invalid type"),
            "{errs:#?}"
        );
        assert!(has("exporters.debug.colour: unknown field"), "{errs:#?}");
        assert!(has("service.flavour: unknown field"), "{errs:#?}");
        assert!(has(
            "receivers.otlp.protocols.grpc.tls: cert_file and key_file are both required"
        ));
        assert_eq!(errs.len(), 6, "{errs:#?}");
    }

    #[test]
    fn unknown_component_types_are_named() {
        let text = "
receivers: {otlp: {protocols: {grpc: {}}}, kafka: {}, madeup: {}}
processors: {tail_sampling: {}}
exporters: {debug: {}, zipkin/old: {endpoint: x}, otlp_grpc/tempo: {endpoint: 'tempo:4317'}}
extensions: {zpages: {}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [debug, zipkin/old, otlp_grpc/tempo]}}}
";
        let errs = errors_of(text);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("receivers.kafka: the \"kafka\" receiver is not supported by this relay")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("processors.tail_sampling: the \"tail_sampling\" processor is not supported"))
        );
        assert!(
            errs.iter().any(
                |e| e.starts_with("exporters.zipkin/old: the \"zipkin\" exporter is not supported")
                    && e.contains("otlp (OTLP/gRPC)")
            ),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("extensions.zpages: the \"zpages\" extension is not supported"))
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("receivers.madeup: unknown receiver type \"madeup\"")),
            "{errs:#?}"
        );
        // The gRPC exporter is supported now: nothing is said about it.
        assert!(!errs.iter().any(|e| e.contains("otlp_grpc/tempo")), "{errs:#?}");
        // The pipeline's references point at those errors instead of saying "not defined".
        assert!(!errs.iter().any(|e| e.contains("not defined")), "{errs:#?}");
        assert!(
            errs.iter().any(|e| e
                == "service.pipelines.traces.exporters[1]: \"zipkin/old\" is defined under exporters but cannot be used: see exporters.zipkin/old"),
            "{errs:#?}"
        );
    }

    #[test]
    fn otlp_and_otlp_grpc_are_the_grpc_exporter() {
        let text = "
receivers: {otlp: {protocols: {http: {}}}}
exporters: {otlp/tempo: {endpoint: 'tempo:4317'}, otlp_grpc/phoenix: {endpoint: 'https://phoenix:4317'}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [otlp/tempo, otlp_grpc/phoenix]}}}
";
        let config = parse_str(text, &no_env).unwrap();
        assert!(matches!(config.exporters["otlp/tempo"], Exporter::OtlpGrpc(_)));
        assert!(matches!(config.exporters["otlp_grpc/phoenix"], Exporter::OtlpGrpc(_)));
    }

    #[test]
    fn otlp_http_is_the_otlphttp_exporter() {
        let text = "
receivers: {otlp: {protocols: {http: {}}}}
exporters: {otlp_http/m: {endpoint: 'http://127.0.0.1:5000'}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [otlp_http/m]}}}
";
        let config = parse_str(text, &no_env).unwrap();
        assert!(matches!(config.exporters["otlp_http/m"], Exporter::OtlpHttp(_)));
    }

    #[test]
    fn bare_and_file_references_keep_yaml_types() {
        let dir = tempfile::tempdir().unwrap();
        let headers = dir.path().join("headers.yaml");
        std::fs::write(&headers, "x-mlflow-experiment-id: '7'\nx-other: b\n").unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "abc\n").unwrap();
        let env = |name: &str| match name {
            "INSECURE" => Some("true".to_string()),
            "PORT" => Some("4318".to_string()),
            _ => None,
        };
        let text = format!(
            "
receivers: {{otlp: {{protocols: {{http: {{endpoint: '127.0.0.1:${{PORT}}'}}}}}}}}
exporters:
  otlphttp/m:
    endpoint: 'http://127.0.0.1:5000'
    tls: {{insecure: '${{INSECURE}}'}}
    headers: '${{file:{}}}'
  otlphttp/n:
    endpoint: 'http://127.0.0.1:5000'
    headers: {{authorization: 'Bearer ${{file:{}}}'}}
service: {{pipelines: {{traces: {{receivers: [otlp], exporters: [otlphttp/m, otlphttp/n]}}}}}}
",
            headers.display(),
            token.display()
        );
        let config = parse_str(&text, &env).unwrap();
        let Exporter::OtlpHttp(m) = &config.exporters["otlphttp/m"] else {
            panic!()
        };
        assert!(m.tls.insecure, "a boolean from ${{INSECURE}}");
        assert_eq!(m.headers["x-mlflow-experiment-id"], "7");
        assert_eq!(m.headers["x-other"], "b");
        let Exporter::OtlpHttp(n) = &config.exporters["otlphttp/n"] else {
            panic!()
        };
        assert_eq!(n.headers["authorization"], "Bearer abc");
        let errs = errors_of(&text.replace("token", "missing-token"));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("exporters.otlphttp/n.headers.authorization: cannot read")),
            "{errs:#?}"
        );
    }

    #[test]
    fn env_references_are_typed_like_the_collector() {
        let env = |name: &str| match name {
            "SIZE" => Some("8".to_string()),
            "SECRET" => Some("a: b # c".to_string()),
            _ => None,
        };
        let text = "
receivers: {otlp: {protocols: {grpc: {max_recv_msg_size_mib: '${env:SIZE}', endpoint: '127.0.0.1:${env:PORT:-4317}'}}}}
exporters: {otlphttp/m: {endpoint: 'http://127.0.0.1:5000', headers: {x-secret: '${env:SECRET}'}}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [otlphttp/m]}}}
";
        let config = parse_str(text, &env).unwrap();
        let Receiver::Otlp(otlp) = &config.receivers["otlp"];
        let grpc = otlp.protocols.grpc.as_ref().unwrap();
        assert_eq!(grpc.max_recv_msg_size_mib, 8);
        assert_eq!(grpc.endpoint.map(|e| e.as_str()).as_deref(), Some("127.0.0.1:4317"));
        let Exporter::OtlpHttp(e) = &config.exporters["otlphttp/m"] else {
            panic!()
        };
        assert_eq!(e.headers["x-secret"], "a: b # c");
    }

    #[test]
    fn unset_env_is_an_error_at_its_path() {
        let text = MINIMAL.replace("grpc: {}", "grpc: {endpoint: '${env:NOPE}'}");
        let errs = errors_of(&text);
        assert_eq!(
            errs,
            vec![
                "receivers.otlp.protocols.grpc.endpoint: environment variable NOPE is not set (use ${env:NOPE:-default} for a default)"
            ]
        );
    }

    #[test]
    fn plain_scalars_read_as_strings_where_strings_are_wanted() {
        let env = |name: &str| (name == "EXP").then(|| "12".to_string());
        let text = "
receivers: {otlp: {protocols: {http: {}}}}
exporters: {otlphttp: {endpoint: 'http://h', headers: {x-mlflow-experiment-id: 0, x-b: '${env:EXP}', x-c: true}}}
service: {pipelines: {traces: {receivers: [otlp], exporters: [otlphttp]}}}
";
        let config = parse_str(text, &env).unwrap();
        let Exporter::OtlpHttp(e) = &config.exporters["otlphttp"] else {
            panic!()
        };
        assert_eq!(e.headers["x-mlflow-experiment-id"], "0");
        assert_eq!(e.headers["x-b"], "12");
        assert_eq!(e.headers["x-c"], "true");
    }

    #[test]
    fn yaml_syntax_errors_have_a_location() {
        let errs = errors_of("receivers: [unclosed");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("line"), "{errs:?}");
    }

    #[test]
    fn null_components_take_defaults() {
        let text = "
receivers: {otlp: {protocols: {grpc: , http: }}}
processors: {batch: }
exporters: {debug: }
service: {pipelines: {traces: {receivers: [otlp], processors: [batch], exporters: [debug]}}}
";
        let config = parse_str(text, &no_env).unwrap();
        let Some(Processor::Batch(b)) = config.processors.get("batch") else {
            panic!()
        };
        assert_eq!(b.send_batch_size, 8192);
    }
}
