//! Relay configs for tests, built as data: a test states what differs from a plain relay and the
//! YAML is written from that. An edit of a text template silently does nothing once the template
//! changes; an edit here always lands (or names the field it could not set).
use serde_json::{Value, json};

/// A relay config under construction.
#[derive(Debug, Clone)]
pub struct RelayConfig(Value);

impl Default for RelayConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayConfig {
    /// Receiver `otlp` with gRPC and HTTP on 127.0.0.1:0, processor `batch` with its defaults, no
    /// exporter yet, the health_check extension and the metrics endpoint on 127.0.0.1:0.
    pub fn new() -> RelayConfig {
        RelayConfig(json!({
            "receivers": {"otlp": {"protocols": {
                "grpc": {"endpoint": "127.0.0.1:0"},
                "http": {"endpoint": "127.0.0.1:0"},
            }}},
            "processors": {"batch": {}},
            "exporters": {},
            "extensions": {"health_check": {"endpoint": "127.0.0.1:0"}},
            "service": {
                "extensions": ["health_check"],
                "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"], "exporters": []}},
                "telemetry": {"metrics": {"address": "127.0.0.1:0"}},
            },
        }))
    }

    /// Settings merged into one transport (`grpc` or `http`) of the `otlp` receiver.
    pub fn receiver(mut self, transport: &str, settings: Value) -> RelayConfig {
        let protocols = &mut self.0["receivers"]["otlp"]["protocols"];
        assert!(
            protocols.get(transport).is_some(),
            "no {transport} transport to configure"
        );
        merge(&mut protocols[transport], settings);
        self
    }

    /// The same settings merged into every transport of the `otlp` receiver.
    pub fn receivers(mut self, settings: Value) -> RelayConfig {
        let protocols = self.0["receivers"]["otlp"]["protocols"]
            .as_object_mut()
            .expect("protocols");
        for transport in protocols.values_mut() {
            merge(transport, settings.clone());
        }
        self
    }

    /// Drops one transport of the `otlp` receiver (`grpc` or `http`).
    pub fn without_transport(mut self, transport: &str) -> RelayConfig {
        let protocols = self.0["receivers"]["otlp"]["protocols"]
            .as_object_mut()
            .expect("protocols");
        assert!(
            protocols.remove(transport).is_some(),
            "no {transport} transport to drop"
        );
        self
    }

    /// Settings merged into the batch processor.
    pub fn batch(mut self, settings: Value) -> RelayConfig {
        merge(&mut self.0["processors"]["batch"], settings);
        self
    }

    /// A processor named `name` (e.g. `memory_limiter`, which must be first), put first in the pipeline.
    pub fn first_processor(mut self, name: &str, settings: Value) -> RelayConfig {
        assert!(self.0["processors"].get(name).is_none(), "processor {name} added twice");
        self.0["processors"][name] = settings;
        self.0["service"]["pipelines"]["traces"]["processors"]
            .as_array_mut()
            .expect("a list")
            .insert(0, Value::String(name.to_string()));
        self
    }

    /// An exporter named `name` (e.g. `otlphttp/mlflow`), added to the pipeline.
    pub fn exporter(mut self, name: &str, settings: Value) -> RelayConfig {
        assert!(self.0["exporters"].get(name).is_none(), "exporter {name} added twice");
        self.0["exporters"][name] = settings;
        push(&mut self.0["service"]["pipelines"]["traces"]["exporters"], name);
        self
    }

    /// The exporter `otlphttp/mlflow` to `endpoint` as the tests use it: experiment "0", retries
    /// quick enough for a test, and `settings` merged in.
    pub fn mlflow_exporter(self, endpoint: &str, settings: Value) -> RelayConfig {
        let exporter = json!({
            "endpoint": endpoint,
            "headers": {"x-mlflow-experiment-id": "0"},
            "retry_on_failure": {"initial_interval": "50ms", "max_interval": "300ms"},
        });
        self.exporter("otlphttp/mlflow", exporter)
            .exporter_settings("otlphttp/mlflow", settings)
    }

    /// Settings merged into an exporter added before.
    pub fn exporter_settings(mut self, name: &str, settings: Value) -> RelayConfig {
        assert!(self.0["exporters"].get(name).is_some(), "no exporter {name}");
        merge(&mut self.0["exporters"][name], settings);
        self
    }

    /// An extension named `name` (e.g. `file_storage/spool`), enabled in the service.
    pub fn extension(mut self, name: &str, settings: Value) -> RelayConfig {
        self.0["extensions"][name] = settings;
        push(&mut self.0["service"]["extensions"], name);
        self
    }

    /// Drops an extension and its place in the service (e.g. `health_check`).
    pub fn without_extension(mut self, name: &str) -> RelayConfig {
        let extensions = self.0["extensions"].as_object_mut().expect("extensions");
        assert!(extensions.remove(name).is_some(), "no extension {name} to drop");
        self.0["service"]["extensions"]
            .as_array_mut()
            .expect("a list")
            .retain(|e| e != name);
        self
    }

    /// Settings merged into `service` (e.g. `shutdown_timeout`).
    pub fn service(mut self, settings: Value) -> RelayConfig {
        merge(&mut self.0["service"], settings);
        self
    }

    /// The config as the relay reads it.
    pub fn yaml(&self) -> String {
        serde_norway::to_string(&self.0).expect("a JSON value is valid YAML")
    }
}

/// `from` merged into `into`: objects key by key (recursively), anything else replaced.
pub fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (k, v) in from {
                merge(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, from) => *into = from,
    }
}

fn push(list: &mut Value, name: &str) {
    list.as_array_mut()
        .expect("a list")
        .push(Value::String(name.to_string()));
}
