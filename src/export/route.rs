//! Where MLflow should put a batch's spans, per ResourceSpans: the experiment (by id or by name),
//! the run to link traces to and the workspace, from the resource's `mlflow.*` attributes, the
//! request's headers (the batch's key) and the exporter's `experiment_name_attribute`. A batch
//! whose records disagree goes out as one request per destination, in order.
//!
//! The resource's attributes are read by `otlp::routing`, which the pipeline shares.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use std::sync::Arc;

use crate::otlp::routing::resource_routing;
use crate::pipeline::Destination;

/// Which experiment: an id MLflow knows, or a name to look up (and maybe create).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ExperimentRef {
    Id(Arc<str>),
    Name(Arc<str>),
}

/// One request's MLflow headers, before names are looked up. `None` everywhere: the exporter's
/// configured headers alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Target {
    pub(crate) experiment: Option<ExperimentRef>,
    pub(crate) run: Option<Arc<str>>,
    pub(crate) workspace: Option<Arc<str>>,
}

/// A record's target: its resource's attributes first, then what the request said (the batch's
/// key), then the exporter's `experiment_name_attribute`; the exporter's header is the default.
pub(crate) fn target(record: &[u8], key: &Destination, named_by: &str) -> Target {
    let found = resource_routing(record, named_by);
    let experiment = if let Some(id) = found.experiment_id {
        Some(ExperimentRef::Id(Arc::from(id)))
    } else if let Some(name) = found.experiment_name {
        Some(ExperimentRef::Name(Arc::from(name)))
    } else if let Some(id) = &key.experiment {
        Some(ExperimentRef::Id(id.clone()))
    } else {
        found.named_by.map(|name| ExperimentRef::Name(Arc::from(name)))
    };
    Target {
        experiment,
        run: found.run.map(Arc::from).or_else(|| key.run.clone()),
        workspace: found.workspace.map(Arc::from).or_else(|| key.workspace.clone()),
    }
}

/// Groups a batch's records by target, each group in the order its records came; a batch with
/// one target (the usual case) is one group holding every index.
pub(crate) fn group<'a>(
    records: impl Iterator<Item = &'a [u8]>,
    key: &Destination,
    named_by: &str,
) -> Vec<(Target, Vec<usize>)> {
    let mut groups: Vec<(Target, Vec<usize>)> = Vec::new();
    for (i, record) in records.enumerate() {
        let t = target(record, key, named_by);
        match groups.iter_mut().find(|(g, _)| *g == t) {
            Some((_, members)) => members.push(i),
            None => groups.push((t, vec![i])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::ResourceSpans;

    use super::*;
    use crate::otlp::routing::{
        EXPERIMENT_ID_ATTRIBUTE, EXPERIMENT_NAME_ATTRIBUTE, RUN_ID_ATTRIBUTE, ResourceRouting, WORKSPACE_ATTRIBUTE,
    };

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn s(key: &str, value: &str) -> KeyValue {
        kv(key, any_value::Value::StringValue(value.into()))
    }

    fn record(attrs: Vec<KeyValue>) -> Vec<u8> {
        let rs = ResourceSpans {
            resource: Some(Resource {
                attributes: attrs,
                ..Default::default()
            }),
            ..Default::default()
        };
        crate::pipeline::wire::encode_record(&rs).to_vec()
    }

    #[test]
    fn reads_every_routing_attribute() {
        let r = record(vec![
            s("service.name", "agent-a"),
            s(EXPERIMENT_NAME_ATTRIBUTE, " exp "),
            s(RUN_ID_ATTRIBUTE, "abc"),
            s(WORKSPACE_ATTRIBUTE, "team"),
            kv(EXPERIMENT_ID_ATTRIBUTE, any_value::Value::IntValue(42)),
        ]);
        let got = resource_routing(&r, "service.name");
        assert_eq!(
            got,
            ResourceRouting {
                experiment_id: Some("42".into()),
                experiment_name: Some("exp"),
                run: Some("abc"),
                workspace: Some("team"),
                named_by: Some("agent-a"),
            }
        );
    }

    #[test]
    fn unusable_values_are_absent() {
        let r = record(vec![
            s(EXPERIMENT_ID_ATTRIBUTE, "abc"),
            s(EXPERIMENT_NAME_ATTRIBUTE, "  "),
            kv(RUN_ID_ATTRIBUTE, any_value::Value::IntValue(3)),
            kv(WORKSPACE_ATTRIBUTE, any_value::Value::BoolValue(true)),
        ]);
        assert_eq!(resource_routing(&r, ""), ResourceRouting::default());
        // Garbage and truncated records have no routing rather than a panic.
        for cut in 0..r.len() {
            let _ = resource_routing(&r[..cut], "x");
        }
        assert_eq!(resource_routing(b"\xff\xff\xff", "x"), ResourceRouting::default());
    }

    #[test]
    fn precedence() {
        let header = Destination {
            experiment: Some(Arc::from("7")),
            ..Default::default()
        };
        let none = Destination::default();
        let id = |s: &str| Some(ExperimentRef::Id(Arc::from(s)));
        let name = |s: &str| Some(ExperimentRef::Name(Arc::from(s)));
        // The resource's id, then its name, then the request's header, then the exporter's attribute.
        let both = record(vec![s(EXPERIMENT_NAME_ATTRIBUTE, "n"), s(EXPERIMENT_ID_ATTRIBUTE, "3")]);
        assert_eq!(target(&both, &header, "").experiment, id("3"));
        let named = record(vec![s(EXPERIMENT_NAME_ATTRIBUTE, "n"), s("service.name", "svc")]);
        assert_eq!(target(&named, &header, "service.name").experiment, name("n"));
        let service = record(vec![s("service.name", "svc")]);
        assert_eq!(target(&service, &header, "service.name").experiment, id("7"));
        assert_eq!(target(&service, &none, "service.name").experiment, name("svc"));
        assert_eq!(target(&service, &none, "").experiment, None);
        // The run and workspace: the resource's, then the request's headers.
        let from_headers = Destination {
            run: Some(Arc::from("header-run")),
            workspace: Some(Arc::from("header-ws")),
            ..Default::default()
        };
        let t = target(&service, &from_headers, "");
        assert_eq!(
            (t.run.as_deref(), t.workspace.as_deref()),
            (Some("header-run"), Some("header-ws"))
        );
        let own = record(vec![s(RUN_ID_ATTRIBUTE, "r"), s(WORKSPACE_ATTRIBUTE, "w")]);
        let t = target(&own, &from_headers, "");
        assert_eq!((t.run.as_deref(), t.workspace.as_deref()), (Some("r"), Some("w")));
    }

    #[test]
    fn groups_keep_order() {
        let a = record(vec![s(RUN_ID_ATTRIBUTE, "a")]);
        let b = record(vec![s(RUN_ID_ATTRIBUTE, "b")]);
        let records = [&a[..], &b[..], &a[..], &b[..], &a[..]];
        let groups = group(records.into_iter(), &Destination::default(), "");
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0.run.as_deref(), Some("a"));
        assert_eq!(groups[0].1, vec![0, 2, 4]);
        assert_eq!(groups[1].1, vec![1, 3]);
    }
}
