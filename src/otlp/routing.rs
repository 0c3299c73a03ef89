//! The MLflow routing attributes of a record's resource (`mlflow.experiment_id`,
//! `mlflow.experiment_name`, `mlflow.run_id`, `mlflow.workspace`), read from the record's bytes
//! without decoding the spans: the resource is the first few hundred bytes of a record that may
//! hold megabytes of spans. The pipeline keeps batches apart by them; the exporter routes by them.
use std::sync::Arc;

use super::{ExperimentId, varint};

/// Resource attributes MLflow's routing reads (the relay's names; `mlflow.experiment_id` is the
/// one the pipeline already routes by).
pub(crate) const EXPERIMENT_ID_ATTRIBUTE: &str = "mlflow.experiment_id";
pub(crate) const EXPERIMENT_NAME_ATTRIBUTE: &str = "mlflow.experiment_name";
pub(crate) const RUN_ID_ATTRIBUTE: &str = "mlflow.run_id";
pub(crate) const WORKSPACE_ATTRIBUTE: &str = "mlflow.workspace";
/// What every one of them starts with.
pub(crate) const PREFIX: &str = "mlflow.";

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

impl ResourceRouting<'_> {
    /// The names besides the experiment id, owned; None when there are none (the usual case:
    /// nothing is allocated).
    pub(crate) fn names(&self) -> Option<Arc<ResourceNames>> {
        let own = |s: Option<&str>| s.map(Arc::from);
        (self.experiment_name.is_some() || self.run.is_some() || self.workspace.is_some()).then(|| {
            Arc::new(ResourceNames {
                experiment_name: own(self.experiment_name),
                run: own(self.run),
                workspace: own(self.workspace),
            })
        })
    }
}

/// A record's `mlflow.experiment_name`, `mlflow.run_id` and `mlflow.workspace`, read when the
/// receiver walks the record and kept with it, so the pipeline does not read them again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResourceNames {
    pub(crate) experiment_name: Option<Arc<str>>,
    pub(crate) run: Option<Arc<str>>,
    pub(crate) workspace: Option<Arc<str>>,
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
        if key == EXPERIMENT_ID_ATTRIBUTE {
            out.experiment_id = match value {
                Value::Str(s) => ExperimentId::parse(s.trim()).map(ExperimentId::into_string),
                Value::Int(i) => ExperimentId::parse(&i.to_string()).map(ExperimentId::into_string),
                Value::Other => None,
            }
        }
        note(key, &value, out);
        if !named_by.is_empty() && key == named_by {
            out.named_by = value.text();
        }
    }
    Some(())
}

/// Notes a resource attribute that names the record's experiment, run or workspace.
fn note<'a>(key: &str, value: &Value<'a>, out: &mut ResourceRouting<'a>) {
    match key {
        EXPERIMENT_NAME_ATTRIBUTE => out.experiment_name = value.text(),
        RUN_ID_ATTRIBUTE => out.run = value.text(),
        WORKSPACE_ATTRIBUTE => out.workspace = value.text(),
        _ => {}
    }
}

/// [`note`] for an attribute whose value (an AnyValue's encoding) another walk has read and
/// validated; the same rule, so a record routes the same whoever reads it.
pub(crate) fn note_name<'a>(key: &str, value: &'a [u8], out: &mut ResourceRouting<'a>) {
    if let Some(value) = any_value(value) {
        note(key, &value, out);
    }
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
