//! Where MLflow should put a batch's spans, per ResourceSpans: the experiment (by id or by name),
//! the run to link traces to and the workspace, from the resource's `mlflow.*` attributes, the
//! request's headers (the batch's key) and the exporter's `experiment_name_attribute`. A batch
//! whose records disagree goes out as one request per destination, in order.
//!
//! The resource is read from the record's bytes without decoding the spans: it is the first few
//! hundred bytes of a record that may hold megabytes of spans.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use std::sync::Arc;

use crate::otlp::{ExperimentId, varint};
use crate::pipeline::Destination;

/// Resource attributes MLflow's routing reads (the relay's names; `mlflow.experiment_id` is the
/// one the pipeline already routes by).
pub(crate) const EXPERIMENT_ID_ATTRIBUTE: &str = "mlflow.experiment_id";
pub(crate) const EXPERIMENT_NAME_ATTRIBUTE: &str = "mlflow.experiment_name";
pub(crate) const RUN_ID_ATTRIBUTE: &str = "mlflow.run_id";
pub(crate) const WORKSPACE_ATTRIBUTE: &str = "mlflow.workspace";

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

/// The routing attributes of one resource (last one wins when a key repeats, as in the pipeline).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ResourceRouting<'a> {
    pub(crate) experiment_id: Option<String>,
    pub(crate) experiment_name: Option<&'a str>,
    pub(crate) run: Option<&'a str>,
    pub(crate) workspace: Option<&'a str>,
    /// The value of the exporter's `experiment_name_attribute`.
    pub(crate) named_by: Option<&'a str>,
}

/// Reads the routing attributes of a record (a request's field 1: tag, length, ResourceSpans).
/// A record that does not parse has none (the receiver checked every accepted record, so this
/// happens only to a bug, and the exporter's default experiment is the safe place).
pub(crate) fn resource_routing<'a>(record: &'a [u8], named_by: &str) -> ResourceRouting<'a> {
    let mut out = ResourceRouting::default();
    let _ = scan_record(record, named_by, &mut out);
    out
}

/// A protobuf field: number and, for length-delimited fields, the payload.
enum Field<'a> {
    Bytes(u32, &'a [u8]),
    Varint(u32, u64),
    Other,
}

fn next_field<'a>(buf: &'a [u8], pos: &mut usize) -> Option<Field<'a>> {
    if *pos >= buf.len() {
        return None;
    }
    let key = varint::read(buf, pos).ok()?;
    let number = u32::try_from(key >> 3).ok()?;
    match key & 7 {
        0 => Some(Field::Varint(number, varint::read(buf, pos).ok()?)),
        1 => {
            *pos = pos.checked_add(8).filter(|&p| p <= buf.len())?;
            Some(Field::Other)
        }
        2 => {
            let len = usize::try_from(varint::read(buf, pos).ok()?).ok()?;
            let end = pos.checked_add(len).filter(|&e| e <= buf.len())?;
            let bytes = &buf[*pos..end];
            *pos = end;
            Some(Field::Bytes(number, bytes))
        }
        5 => {
            *pos = pos.checked_add(4).filter(|&p| p <= buf.len())?;
            Some(Field::Other)
        }
        _ => None,
    }
}

fn scan_record<'a>(record: &'a [u8], named_by: &str, out: &mut ResourceRouting<'a>) -> Option<()> {
    let mut pos = 0;
    let Field::Bytes(1, resource_spans) = next_field(record, &mut pos)? else {
        return None;
    };
    let mut pos = 0;
    // ResourceSpans.resource (1) may repeat; protobuf merges them, so every one is read.
    while let Some(field) = next_field(resource_spans, &mut pos) {
        if let Field::Bytes(1, resource) = field {
            scan_resource(resource, named_by, out)?;
        }
    }
    Some(())
}

fn scan_resource<'a>(resource: &'a [u8], named_by: &str, out: &mut ResourceRouting<'a>) -> Option<()> {
    let mut pos = 0;
    while let Some(field) = next_field(resource, &mut pos) {
        let Field::Bytes(1, kv) = field else { continue };
        let (key, value) = key_value(kv)?;
        let Some(value) = value else { continue };
        match key {
            EXPERIMENT_ID_ATTRIBUTE => {
                out.experiment_id = match value {
                    Value::Str(s) => ExperimentId::parse(s.trim()).map(ExperimentId::into_string),
                    Value::Int(i) => ExperimentId::parse(&i.to_string()).map(ExperimentId::into_string),
                    Value::Other => None,
                }
            }
            EXPERIMENT_NAME_ATTRIBUTE => out.experiment_name = value.text(),
            RUN_ID_ATTRIBUTE => out.run = value.text(),
            WORKSPACE_ATTRIBUTE => out.workspace = value.text(),
            _ => {}
        }
        if !named_by.is_empty() && key == named_by {
            out.named_by = value.text();
        }
    }
    Some(())
}

enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Other,
}

impl<'a> Value<'a> {
    /// A usable name: a string, trimmed, not empty.
    fn text(&self) -> Option<&'a str> {
        match self {
            Value::Str(s) => Some(s.trim()).filter(|s| !s.is_empty()),
            _ => None,
        }
    }
}

fn key_value(kv: &[u8]) -> Option<(&str, Option<Value<'_>>)> {
    let (mut key, mut value) = ("", None);
    let mut pos = 0;
    while let Some(field) = next_field(kv, &mut pos) {
        match field {
            Field::Bytes(1, k) => key = std::str::from_utf8(k).ok()?,
            Field::Bytes(2, any) => value = Some(any_value(any)?),
            _ => {}
        }
    }
    Some((key, value))
}

fn any_value(any: &[u8]) -> Option<Value<'_>> {
    let mut value = Value::Other;
    let mut pos = 0;
    while let Some(field) = next_field(any, &mut pos) {
        value = match field {
            Field::Bytes(1, s) => Value::Str(std::str::from_utf8(s).ok()?),
            Field::Varint(3, i) => Value::Int(i as i64),
            _ => Value::Other,
        };
    }
    Some(value)
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
