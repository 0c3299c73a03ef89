//! What the OTTL evaluator reads and edits, as one trait ([`Target`]) with two implementations:
//! a decoded (prost) span with its resource and scope ([`SpanTarget`], here), and a span still in
//! its protobuf bytes (`processor::wire`). The evaluator knows only the trait, so both run the
//! same OTTL semantics.
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use prost::Message;

use super::Key;
use super::compile::Place;
use super::eval::{EvalError, Value, from_any, set_in_map, type_error};

/// An attribute's value where it was found, not copied.
pub(crate) enum Attr<'a> {
    Decoded(Option<&'a AnyValue>),
    /// An AnyValue's protobuf encoding (validated by the receiver's walk).
    Encoded(&'a [u8]),
}

/// One field of an encoded AnyValue, when it holds exactly one (what encoders write); `None`
/// for anything else, which then decodes with prost (its rules for repeated oneof fields).
enum Scalar<'a> {
    Empty,
    Str(&'a [u8]),
    Bool(bool),
    Int(i64),
    Double(f64),
    Other,
}

fn scalar(bytes: &[u8]) -> Scalar<'_> {
    let mut pos = 0;
    let mut found = Scalar::Empty;
    while pos < bytes.len() {
        let Ok(key) = crate::otlp::varint::read(bytes, &mut pos) else {
            return Scalar::Other;
        };
        if !matches!(found, Scalar::Empty) {
            return Scalar::Other;
        }
        found = match (key >> 3, key & 7) {
            (1, 2) => match crate::otlp::varint::read(bytes, &mut pos) {
                Ok(len) => match usize::try_from(len)
                    .ok()
                    .and_then(|l| bytes.get(pos..pos.checked_add(l)?))
                {
                    Some(s) => {
                        pos += s.len();
                        Scalar::Str(s)
                    }
                    None => return Scalar::Other,
                },
                Err(_) => return Scalar::Other,
            },
            (2 | 3, 0) => match crate::otlp::varint::read(bytes, &mut pos) {
                Ok(v) if key >> 3 == 2 => Scalar::Bool(v != 0),
                Ok(v) => Scalar::Int(v as i64),
                Err(_) => return Scalar::Other,
            },
            (4, 1) => match bytes.get(pos..pos + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(b) => {
                    pos += 8;
                    Scalar::Double(f64::from_le_bytes(b))
                }
                None => return Scalar::Other,
            },
            _ => return Scalar::Other,
        };
    }
    found
}

impl Attr<'_> {
    /// The value as the evaluator sees it ([`from_any`]).
    pub(crate) fn value(&self) -> Value {
        match self {
            Attr::Decoded(v) => from_any(*v),
            Attr::Encoded(bytes) => match scalar(bytes) {
                Scalar::Empty => Value::Nil,
                Scalar::Str(s) => Value::Str(String::from_utf8_lossy(s).into_owned()),
                Scalar::Bool(b) => Value::Bool(b),
                Scalar::Int(n) => Value::Int(n),
                Scalar::Double(d) => Value::Double(d),
                Scalar::Other => AnyValue::decode(*bytes).map_or(Value::Nil, |v| from_any(Some(&v))),
            },
        }
    }

    /// What `==`/`!=` against a string or nil needs, read in place where that is certain.
    pub(crate) fn compared(&self) -> Compared<'_> {
        match self {
            Attr::Decoded(v) => match v.and_then(|v| v.value.as_ref()) {
                None | Some(any_value::Value::StringValueStrindex(_)) => Compared::Nil,
                Some(any_value::Value::BytesValue(b)) if b.is_empty() => Compared::Nil,
                Some(any_value::Value::StringValue(s)) => Compared::Str(s.as_str()),
                Some(_) => Compared::Other,
            },
            Attr::Encoded(bytes) => match scalar(bytes) {
                Scalar::Empty => Compared::Nil,
                Scalar::Str(s) => std::str::from_utf8(s).map_or(Compared::Undecided, Compared::Str),
                Scalar::Bool(_) | Scalar::Int(_) | Scalar::Double(_) => Compared::Other,
                // Any other encoding (an unknown field, a oneof set twice, a value repeated) is
                // what a decoder makes of it: the evaluator's general path decodes it.
                Scalar::Other => Compared::Undecided,
            },
        }
    }
}

/// An attribute as `==`/`!=` against a string or nil sees it.
#[derive(Debug, PartialEq)]
pub(crate) enum Compared<'a> {
    /// Reads as nil (absent, unset, or empty bytes, which equal nil).
    Nil,
    Str(&'a str),
    /// A value that is neither nil nor a string.
    Other,
    /// Not certain without decoding.
    Undecided,
}

/// What a statement runs on: paths read (`attr`, `map_value`, `field`, `str_field`), set
/// (`set_attr`, `set_field`) and maps edited (`edit_map`, `delete_key`).
pub(crate) trait Target {
    /// Attribute `key` of the map at `place`: `None` when `place` is not a map the target has,
    /// `Some(None)` when the key is absent.
    fn attr(&self, place: Place, key: &str) -> Option<Option<Attr<'_>>>;
    /// The whole map at `place`, or `None` when it is not one.
    fn map_value(&self, place: Place) -> Option<Value>;
    /// A field that is not a map.
    fn field(&self, place: Place) -> Value;
    /// The string fields, borrowed; `None` for any other place.
    fn str_field(&self, place: Place) -> Option<&str>;
    fn is_root_span(&self) -> bool;
    fn set_field(&mut self, place: Place, value: Value) -> Result<(), EvalError>;
    /// Sets `keys` in the map at `place` (all of it when `keys` is empty); `None` when `place`
    /// is not a map.
    fn set_attr(&mut self, place: Place, keys: &[Key], value: Value) -> Option<Result<(), EvalError>>;
    /// Runs `edit` on the map at `place`; `None` when it is not one.
    fn edit_map(&mut self, place: Place, edit: &mut dyn FnMut(&mut Vec<KeyValue>)) -> Option<()>;
    /// Removes every entry `key` of the map at `place`.
    fn delete_key(&mut self, place: Place, key: &str) -> Option<()> {
        self.edit_map(place, &mut |map| map.retain(|kv| kv.key != key))
    }
}

/// A decoded span with its resource and scope, and in the `spanevent` context one of its
/// events. The `resource` and `scope` contexts run on a placeholder span their statements
/// cannot name (see `context`).
pub(crate) struct SpanTarget<'a> {
    pub(crate) resource: &'a mut Resource,
    pub(crate) scope: &'a mut InstrumentationScope,
    pub(crate) span: &'a mut Span,
    pub(crate) event: Option<&'a mut Event>,
}

impl SpanTarget<'_> {
    fn attributes(&self, place: Place) -> Option<&Vec<KeyValue>> {
        match place {
            Place::Span("attributes") => Some(&self.span.attributes),
            Place::Resource("attributes") => Some(&self.resource.attributes),
            Place::Scope("attributes") => Some(&self.scope.attributes),
            Place::Event("attributes") => self.event.as_deref().map(|e| &e.attributes),
            _ => None,
        }
    }

    fn attributes_mut(&mut self, place: Place) -> Option<&mut Vec<KeyValue>> {
        match place {
            Place::Span("attributes") => Some(&mut self.span.attributes),
            Place::Resource("attributes") => Some(&mut self.resource.attributes),
            Place::Scope("attributes") => Some(&mut self.scope.attributes),
            Place::Event("attributes") => self.event.as_deref_mut().map(|e| &mut e.attributes),
            _ => None,
        }
    }
}

/// A span field's value (`None` for places that are not span fields).
pub(crate) fn span_field(place: Place, span: &Span) -> Option<Value> {
    Some(match place {
        Place::Span("name") => Value::Str(span.name.clone()),
        Place::Span("kind") => Value::Int(i64::from(span.kind)),
        Place::Span("trace_id") => Value::Bytes(span.trace_id.clone()),
        Place::Span("span_id") => Value::Bytes(span.span_id.clone()),
        Place::Span("parent_span_id") => Value::Bytes(span.parent_span_id.clone()),
        Place::Span("trace_state") => Value::Str(span.trace_state.clone()),
        Place::Span("start_time_unix_nano") => Value::Int(span.start_time_unix_nano as i64),
        Place::Span("end_time_unix_nano") => Value::Int(span.end_time_unix_nano as i64),
        Place::Span("dropped_attributes_count") => Value::Int(i64::from(span.dropped_attributes_count)),
        Place::Status("code") => Value::Int(i64::from(span.status.as_ref().map_or(0, |s| s.code))),
        Place::Status("message") => Value::Str(span.status.as_ref().map(|s| s.message.clone()).unwrap_or_default()),
        _ => return None,
    })
}

/// Sets a span field; the value back for places that are not span fields.
pub(crate) fn set_span_field(place: Place, span: &mut Span, value: Value) -> Result<Result<(), EvalError>, Value> {
    if !matches!(place, Place::Span(_) | Place::Status(_)) {
        return Err(value);
    }
    Ok(match (place, value) {
        (Place::Span("name"), Value::Str(s)) => {
            span.name = s;
            Ok(())
        }
        (Place::Span("kind"), Value::Int(n)) => i32::try_from(n)
            .map(|k| span.kind = k)
            .map_err(|_| EvalError::Type("kind out of range".into())),
        (Place::Span("trace_state"), Value::Str(s)) => {
            span.trace_state = s;
            Ok(())
        }
        (Place::Status("code"), Value::Int(n)) => i32::try_from(n)
            .map(|c| span.status.get_or_insert_with(Status::default).code = c)
            .map_err(|_| EvalError::Type("status.code out of range".into())),
        (Place::Status("message"), Value::Str(s)) => {
            span.status.get_or_insert_with(Status::default).message = s;
            Ok(())
        }
        (Place::Span("trace_id" | "span_id" | "parent_span_id" | "start_time_unix_nano" | "end_time_unix_nano"), _) => {
            // Ids and times identify the span in MLflow; rewriting them would orphan or merge traces.
            Err(EvalError::ReadOnly(format!("{place:?}")))
        }
        (_, other) => Err(wrong_type(place, &other)),
    })
}

fn wrong_type(place: Place, value: &Value) -> EvalError {
    type_error(&format!("a value of the right type for {place:?}"), value)
}

impl Target for SpanTarget<'_> {
    fn attr(&self, place: Place, key: &str) -> Option<Option<Attr<'_>>> {
        let map = self.attributes(place)?;
        Some(
            map.iter()
                .find(|kv| kv.key == key)
                .map(|kv| Attr::Decoded(kv.value.as_ref())),
        )
    }

    fn map_value(&self, place: Place) -> Option<Value> {
        let map = self.attributes(place)?;
        Some(Value::Map(
            map.iter()
                .map(|kv| (kv.key.clone(), from_any(kv.value.as_ref())))
                .collect(),
        ))
    }

    fn field(&self, place: Place) -> Value {
        if let Some(value) = span_field(place, self.span) {
            return value;
        }
        match place {
            Place::Resource("dropped_attributes_count") => {
                Value::Int(i64::from(self.resource.dropped_attributes_count))
            }
            Place::Scope("name") => Value::Str(self.scope.name.clone()),
            Place::Scope("version") => Value::Str(self.scope.version.clone()),
            Place::Event("name") => self.event.as_deref().map_or(Value::Nil, |e| Value::Str(e.name.clone())),
            Place::Event("time_unix_nano") => self
                .event
                .as_deref()
                .map_or(Value::Nil, |e| Value::Int(e.time_unix_nano as i64)),
            Place::Event("dropped_attributes_count") => self
                .event
                .as_deref()
                .map_or(Value::Nil, |e| Value::Int(i64::from(e.dropped_attributes_count))),
            _ => Value::Nil,
        }
    }

    fn str_field(&self, place: Place) -> Option<&str> {
        match place {
            Place::Span("name") => Some(&self.span.name),
            Place::Span("trace_state") => Some(&self.span.trace_state),
            Place::Scope("name") => Some(&self.scope.name),
            Place::Scope("version") => Some(&self.scope.version),
            Place::Status("message") => Some(self.span.status.as_ref().map_or("", |s| s.message.as_str())),
            _ => None,
        }
    }

    fn is_root_span(&self) -> bool {
        self.span.parent_span_id.is_empty()
    }

    fn set_field(&mut self, place: Place, value: Value) -> Result<(), EvalError> {
        let value = match set_span_field(place, self.span, value) {
            Ok(result) => return result,
            Err(value) => value,
        };
        match (place, value) {
            (Place::Scope("name"), Value::Str(s)) => self.scope.name = s,
            (Place::Scope("version"), Value::Str(s)) => self.scope.version = s,
            (Place::Event("name"), Value::Str(s)) => {
                if let Some(e) = self.event.as_deref_mut() {
                    e.name = s;
                }
            }
            (_, other) => return Err(wrong_type(place, &other)),
        }
        Ok(())
    }

    fn set_attr(&mut self, place: Place, keys: &[Key], value: Value) -> Option<Result<(), EvalError>> {
        self.attributes_mut(place).map(|map| set_in_map(map, keys, value))
    }

    fn edit_map(&mut self, place: Place, edit: &mut dyn FnMut(&mut Vec<KeyValue>)) -> Option<()> {
        self.attributes_mut(place).map(edit)
    }
}
