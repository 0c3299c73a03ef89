//! One span of a record on the wire path as the OTTL evaluator's `Target`: attributes are read
//! from the bytes (keys compared as bytes, values borrowed), edits are recorded on the span's
//! view and written by [`write`]. The resource, the scope and every place that is not the span's
//! go to the decoded resource and scope (`SpanTarget`), so only the span's own places are here.
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use super::{Edits, Slot, SpanView, fields, put_len};
use crate::processor::ottl::Key;
use crate::processor::ottl::compile::Place;
use crate::processor::ottl::eval::{EvalError, Value, from_any, set_in_map, to_any};
use crate::processor::ottl::target::{Attr, SpanTarget, Target, set_span_field, span_field};
use crate::processor::upsert_attribute;

const ATTRIBUTES: Place = Place::Span("attributes");

/// A span of a record being edited, with its resource and scope.
pub(crate) struct WireSpan<'r> {
    /// The resource and scope, with a placeholder span that no place here reaches.
    outer: SpanTarget<'r>,
    bytes: &'r [u8],
    view: &'r mut SpanView,
    slots: &'r mut [Slot],
}

impl<'r> WireSpan<'r> {
    pub(super) fn new(
        bytes: &'r [u8],
        resource: &'r mut Resource,
        scope: &'r mut InstrumentationScope,
        placeholder: &'r mut Span,
        view: &'r mut SpanView,
        slots: &'r mut [Slot],
    ) -> WireSpan<'r> {
        let range = view.slots.clone();
        WireSpan {
            outer: SpanTarget {
                resource,
                scope,
                span: placeholder,
                event: None,
            },
            bytes,
            view,
            slots: &mut slots[range],
        }
    }

    pub(crate) fn resource(&self) -> &Resource {
        self.outer.resource
    }

    pub(crate) fn scope(&self) -> &InstrumentationScope {
        self.outer.scope
    }

    /// Leaves the span out of the record.
    pub(crate) fn drop_span(&mut self) {
        self.view.dropped = true;
    }

    fn edits(&mut self) -> &mut Edits {
        self.view.touched = true;
        self.view.edits.get_or_insert_with(Box::default)
    }

    fn materialized(&self) -> Option<&Vec<KeyValue>> {
        self.view.edits.as_ref().and_then(|e| e.materialized.as_ref())
    }

    /// A slot's KeyValue as it now is.
    fn decoded_slot(&self, slot: &Slot) -> KeyValue {
        // The receiver's walk accepted these bytes, and what it accepts decodes with prost.
        let mut kv = KeyValue::decode(&self.bytes[slot.message.clone()]).unwrap_or_default();
        if let Some(v) = &slot.replaced {
            kv.value = Some(v.clone());
        }
        kv
    }

    /// The span's attributes as they now are, decoded.
    fn current_attributes(&self) -> Vec<KeyValue> {
        if let Some(list) = self.materialized() {
            return list.clone();
        }
        let mut list: Vec<KeyValue> = self
            .slots
            .iter()
            .filter(|s| !s.removed)
            .map(|s| self.decoded_slot(s))
            .collect();
        list.extend(self.view.appended.iter().cloned());
        list
    }

    /// The attribute list, decoded, edited as a list from now on.
    fn materialize(&mut self) -> &mut Vec<KeyValue> {
        if self.materialized().is_none() {
            let list = self.current_attributes();
            for slot in self.slots.iter_mut() {
                slot.removed = true;
            }
            self.view.appended.clear();
            self.edits().materialized = Some(list);
        }
        self.edits().materialized.get_or_insert_with(Vec::new)
    }

    /// The span decoded, with its edits: for the fields read rarely, and the attributes
    /// processor's `include`/`exclude`.
    pub(crate) fn decoded(&self) -> Span {
        let mut span = Span::decode(&self.bytes[self.view.message.clone()]).unwrap_or_default();
        if let Some(fields) = self.view.edits.as_ref().and_then(|e| e.fields.as_ref()) {
            span.name.clone_from(&fields.name);
            span.kind = fields.kind;
            span.trace_state.clone_from(&fields.trace_state);
            span.status.clone_from(&fields.status);
        }
        span.attributes = self.current_attributes();
        span
    }

    /// The name, kind, trace_state and status, editable: written instead of the original ones.
    fn fields_mut(&mut self) -> &mut Span {
        if self.view.edits.as_ref().is_none_or(|e| e.fields.is_none()) {
            let span = Span::decode(&self.bytes[self.view.message.clone()]).unwrap_or_default();
            self.edits().fields = Some(Span {
                name: span.name,
                kind: span.kind,
                trace_state: span.trace_state,
                status: span.status,
                ..Span::default()
            });
        }
        self.edits().fields.get_or_insert_with(Span::default)
    }

    fn name(&self) -> &str {
        if let Some(fields) = self.view.edits.as_ref().and_then(|e| e.fields.as_ref()) {
            return &fields.name;
        }
        self.view
            .name
            .as_ref()
            .and_then(|r| std::str::from_utf8(&self.bytes[r.clone()]).ok())
            .unwrap_or("")
    }

    fn find(&self, key: &str) -> Option<Attr<'_>> {
        if let Some(list) = self.materialized() {
            return list
                .iter()
                .find(|kv| kv.key == key)
                .map(|kv| Attr::Decoded(kv.value.as_ref()));
        }
        let bytes = self.bytes;
        if let Some(slot) = self
            .slots
            .iter()
            .find(|s| !s.removed && &bytes[s.key.clone()] == key.as_bytes())
        {
            return Some(match (&slot.replaced, &slot.value) {
                (Some(v), _) => Attr::Decoded(Some(v)),
                (None, Some(r)) => Attr::Encoded(&bytes[r.clone()]),
                (None, None) => Attr::Decoded(None),
            });
        }
        self.view
            .appended
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| Attr::Decoded(kv.value.as_ref()))
    }

    /// Sets attribute `key` (the commonest edit): in place when the span has it, else appended.
    pub(crate) fn set_one(&mut self, key: &str, value: AnyValue) {
        if self.materialized().is_some() {
            upsert_attribute(self.materialize(), key, value);
            return;
        }
        let bytes = self.bytes;
        if let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| !s.removed && &bytes[s.key.clone()] == key.as_bytes())
        {
            slot.replaced = Some(value);
            self.view.touched = true;
            return;
        }
        self.view.touched = true;
        upsert_attribute(&mut self.view.appended, key, value);
    }
}

fn is_span_place(place: Place) -> bool {
    matches!(place, Place::Span(_) | Place::Status(_))
}

impl Target for WireSpan<'_> {
    fn attr(&self, place: Place, key: &str) -> Option<Option<Attr<'_>>> {
        match place {
            ATTRIBUTES => Some(self.find(key)),
            p if is_span_place(p) => None,
            _ => self.outer.attr(place, key),
        }
    }

    fn map_value(&self, place: Place) -> Option<Value> {
        match place {
            ATTRIBUTES => Some(Value::Map(
                self.current_attributes()
                    .into_iter()
                    .map(|kv| {
                        let value = from_any(kv.value.as_ref());
                        (kv.key, value)
                    })
                    .collect(),
            )),
            p if is_span_place(p) => None,
            _ => self.outer.map_value(place),
        }
    }

    fn field(&self, place: Place) -> Value {
        match place {
            Place::Span("name") => Value::Str(self.name().to_string()),
            p if is_span_place(p) => span_field(place, &self.decoded()).unwrap_or(Value::Nil),
            _ => self.outer.field(place),
        }
    }

    fn str_field(&self, place: Place) -> Option<&str> {
        match place {
            Place::Span("name") => Some(self.name()),
            // Read through `field` (a decode), as rare as they are.
            p if is_span_place(p) => None,
            _ => self.outer.str_field(place),
        }
    }

    fn is_root_span(&self) -> bool {
        self.view.parent_empty
    }

    fn set_field(&mut self, place: Place, value: Value) -> Result<(), EvalError> {
        if !is_span_place(place) {
            return self.outer.set_field(place, value);
        }
        match set_span_field(place, self.fields_mut(), value) {
            Ok(result) => result,
            Err(_) => Err(EvalError::Type(format!("{place:?} cannot be set"))),
        }
    }

    fn set_attr(&mut self, place: Place, keys: &[Key], value: Value) -> Option<Result<(), EvalError>> {
        match (place, keys) {
            (ATTRIBUTES, [Key::Str(key)]) if self.materialized().is_none() => {
                self.set_one(key, to_any(value));
                Some(Ok(()))
            }
            (ATTRIBUTES, _) => Some(set_in_map(self.materialize(), keys, value)),
            (p, _) if is_span_place(p) => None,
            _ => self.outer.set_attr(place, keys, value),
        }
    }

    fn edit_map(&mut self, place: Place, edit: &mut dyn FnMut(&mut Vec<KeyValue>)) -> Option<()> {
        match place {
            ATTRIBUTES => {
                edit(self.materialize());
                Some(())
            }
            p if is_span_place(p) => None,
            _ => self.outer.edit_map(place, edit),
        }
    }

    fn delete_key(&mut self, place: Place, key: &str) -> Option<()> {
        if place != ATTRIBUTES {
            return if is_span_place(place) {
                None
            } else {
                self.outer.delete_key(place, key)
            };
        }
        if self.materialized().is_some() {
            self.materialize().retain(|kv| kv.key != key);
            return Some(());
        }
        let bytes = self.bytes;
        for slot in self.slots.iter_mut() {
            if !slot.removed && &bytes[slot.key.clone()] == key.as_bytes() {
                slot.removed = true;
                self.view.touched = true;
            }
        }
        self.view.appended.retain(|kv| kv.key != key);
        Some(())
    }
}

/// Writes an edited span's message (without its key and length) to `out`.
pub(super) fn write(bytes: &[u8], view: &SpanView, slots: &[Slot], out: &mut Vec<u8>) {
    let edits = view.edits.as_deref();
    let set_fields = edits.and_then(|e| e.fields.as_ref());
    let materialized = edits.and_then(|e| e.materialized.as_ref());
    if set_fields.is_none() && materialized.is_none() {
        // The commonest edits (attributes set, removed, added): the bytes between the edited
        // attributes are copied in runs, not field by field.
        let mut copied = view.message.start;
        for slot in slots.iter().filter(|s| s.removed || s.replaced.is_some()) {
            out.extend_from_slice(&bytes[copied..slot.start]);
            copied = slot.message.end;
            if let (false, Some(value)) = (slot.removed, &slot.replaced) {
                write_replaced(bytes, slot.message.clone(), value, out);
            }
        }
        out.extend_from_slice(&bytes[copied..view.message.end]);
    } else {
        write_fields(bytes, view, slots, set_fields.is_some(), materialized.is_some(), out);
    }
    if let Some(fields) = set_fields {
        fields.encode_raw(out);
    }
    for kv in view.appended.iter().chain(materialized.into_iter().flatten()) {
        prost::encoding::message::encode(9, kv, out);
    }
}

/// [`write`]'s span fields, field by field: attributes as edited (none when the list was
/// materialized), and name, kind, trace_state and status left out when they were set.
fn write_fields(bytes: &[u8], view: &SpanView, slots: &[Slot], set: bool, materialized: bool, out: &mut Vec<u8>) {
    let mut next = 0;
    for field in fields(bytes, view.message.clone()).flatten() {
        match field.number {
            9 => {
                let slot = slots.get(next);
                next += 1;
                match slot {
                    _ if materialized => {}
                    Some(s) if s.removed => {}
                    Some(Slot {
                        replaced: Some(value),
                        message,
                        ..
                    }) => write_replaced(bytes, message.clone(), value, out),
                    _ => out.extend_from_slice(&bytes[field.whole]),
                }
            }
            // trace_state, name, kind, status: written below when set.
            3 | 5 | 6 | 15 if set => {}
            _ => out.extend_from_slice(&bytes[field.whole]),
        }
    }
}

/// A KeyValue with its value replaced: its other fields (key, key_strindex, unknown ones) as
/// they came, then the new value.
fn write_replaced(bytes: &[u8], message: std::ops::Range<usize>, value: &AnyValue, out: &mut Vec<u8>) {
    let value_len = value.encoded_len();
    let kept: usize = fields(bytes, message.clone())
        .flatten()
        .filter(|f| f.number != 2)
        .map(|f| f.whole.len())
        .sum();
    put_len(9, kept + super::field_len(value_len), out);
    for f in fields(bytes, message).flatten() {
        if f.number != 2 {
            out.extend_from_slice(&bytes[f.whole]);
        }
    }
    put_len(2, value_len, out);
    value.encode_raw(out);
}
