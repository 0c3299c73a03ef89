//! Collector component types this relay knows of but does not implement, each with what to use
//! instead: a real collector config that names one gets that advice, not "unknown type".

/// What to say about a collector component type we do not implement, if we know it.
pub(super) fn advice(kind: &str, ty: &str) -> Option<&'static str> {
    let table: &[(&str, &[&str], &str)] = &[
        (
            "exporter",
            &[
                "zipkin",
                "jaeger",
                "kafka",
                "file",
                "prometheus",
                "prometheusremotewrite",
                "loki",
                "elasticsearch",
                "awsxray",
                "googlecloud",
                "azuremonitor",
                "datadog",
                "splunk_hec",
                "clickhouse",
            ],
            "this relay delivers traces over OTLP only: use otlphttp (OTLP/HTTP) or otlp (OTLP/gRPC) if the destination speaks OTLP, or keep an OpenTelemetry Collector for it",
        ),
        (
            "receiver",
            &[
                "jaeger",
                "zipkin",
                "kafka",
                "opencensus",
                "prometheus",
                "hostmetrics",
                "filelog",
                "k8s_cluster",
                "kubeletstats",
                "statsd",
                "journald",
                "syslog",
                "fluentforward",
                "docker_stats",
            ],
            "this relay receives OTLP traces only: use the otlp receiver (gRPC and HTTP), or keep an OpenTelemetry Collector in front for this source",
        ),
        (
            "processor",
            &["tail_sampling"],
            "for a decision per whole trace by trace id use probabilistic_sampler (every span of a trace gets the same decision, in any request); groupbytrace holds a trace's spans together; for policies on latency, status or attributes keep an OpenTelemetry Collector with tail_sampling in front of the relay",
        ),
        (
            "processor",
            &["k8sattributes", "resourcedetection"],
            "set the resource attributes with the resource processor (values from ${env:VAR}, e.g. the pod's name and namespace from the Kubernetes Downward API), or keep an OpenTelemetry Collector agent with it in front of the relay",
        ),
        (
            "processor",
            &["span"],
            "rename spans with the transform processor (set(name, ...), replace_pattern(name, ...))",
        ),
        (
            "processor",
            &["routing"],
            "route with one pipeline per receiver, or to MLflow experiments by the mlflow.experiment_id resource attribute (set it with transform or resource) or the x-mlflow-experiment-id header (include_metadata: true)",
        ),
        (
            "processor",
            &["spanmetrics", "servicegraph"],
            "this relay produces no metrics from spans: keep an OpenTelemetry Collector with the spanmetrics or servicegraph connector for them",
        ),
        (
            "processor",
            &[
                "cumulativetodelta",
                "deltatocumulative",
                "metricstransform",
                "logstransform",
                "logdedup",
            ],
            "this relay handles traces only: keep an OpenTelemetry Collector for metrics and logs pipelines",
        ),
        (
            "processor",
            &["groupbyattrs", "schema", "geoip", "sumologic", "interval"],
            "not implemented by this relay: run it in an OpenTelemetry Collector in front of the relay, or remove it from the pipeline",
        ),
        (
            "extension",
            &[
                "zpages",
                "pprof",
                "oidc",
                "headers_setter",
                "sigv4auth",
                "k8s_observer",
                "memory_ballast",
                "healthcheckv2",
            ],
            "not implemented by this relay: remove it from extensions and service.extensions (oauth2client, bearertokenauth, basicauth, health_check and file_storage are)",
        ),
        (
            "connector",
            &["spanmetrics", "servicegraph", "forward", "routing", "count"],
            "connectors are not supported: keep an OpenTelemetry Collector for them",
        ),
    ];
    table
        .iter()
        .find(|(k, types, _)| *k == kind && types.contains(&ty))
        .map(|(_, _, advice)| *advice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_types_have_advice() {
        assert!(advice("exporter", "zipkin").is_some_and(|a| a.contains("otlp (OTLP/gRPC)")));
        // Implemented now: no advice, they load.
        assert_eq!(advice("exporter", "otlp_grpc"), None);
        assert_eq!(advice("exporter", "otlp"), None);
        assert!(advice("processor", "tail_sampling").is_some_and(|a| a.contains("probabilistic_sampler")));
        assert!(advice("processor", "k8sattributes").is_some_and(|a| a.contains("resource processor")));
        assert!(advice("processor", "spanmetrics").is_some_and(|a| a.contains("connector")));
        assert!(advice("extension", "zpages").is_some());
        assert_eq!(advice("exporter", "made_up"), None);
        assert_eq!(advice("receiver", "otlp_grpc"), None);
    }
}
