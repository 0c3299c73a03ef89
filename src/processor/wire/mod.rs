//! The processors' wire path: a ResourceSpans record edited as protobuf bytes instead of being
//! decoded into prost's structs. [`Record::parse`] notes where each span and each of its
//! attributes lies (no allocation per span unless a span is edited); the resource and the scopes,
//! small, are decoded. Processors edit spans through [`WireSpan`], the evaluator's `Target` over
//! those bytes (span.rs), which records edits: a value replaced in place, an entry removed, an
//! entry appended at the end of the span (decoders concatenate repeated fields, so the decoded
//! result is the same as editing the decoded list), a field set. [`Record::encode`] copies
//! untouched spans as bytes, splices edited ones, leaves dropped ones out and recomputes the
//! enclosing lengths. What decoding the output gives is what the prost path gives (tests.rs).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint};

use crate::pipeline::wire::DecodeError;

mod span;
#[cfg(test)]
mod tests;

pub(crate) use span::WireSpan;

/// A field of a message: number, wire type, its whole range (key included) and its payload's.
struct Field {
    number: u64,
    whole: Range<usize>,
    /// The payload of a length-delimited field; empty for the others.
    payload: Range<usize>,
}

/// The fields of `buf[range]` in order, ranges relative to `buf`.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

fn fields(buf: &[u8], range: Range<usize>) -> Fields<'_> {
    Fields {
        buf,
        pos: range.start,
        end: range.end,
    }
}

fn framing(what: &'static str) -> DecodeError {
    DecodeError::Framing(what)
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        Some(self.read())
    }
}

impl Fields<'_> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let buf = &self.buf[..self.end];
        crate::otlp::varint::read(buf, &mut self.pos).map_err(|e| framing(e.message()))
    }

    fn skip(&mut self, n: usize) -> Result<Range<usize>, DecodeError> {
        let start = self.pos;
        let end = start
            .checked_add(n)
            .filter(|&e| e <= self.end)
            .ok_or(framing("truncated field"))?;
        self.pos = end;
        Ok(start..end)
    }

    fn read(&mut self) -> Result<Field, DecodeError> {
        let start = self.pos;
        let key = self.varint()?;
        let payload = match key & 7 {
            0 => {
                self.varint()?;
                self.pos..self.pos
            }
            1 => self.skip(8)?,
            5 => self.skip(4)?,
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| framing("length overflow"))?;
                self.skip(len)?
            }
            _ => return Err(framing("unsupported wire type")),
        };
        Ok(Field {
            number: key >> 3,
            whole: start..self.pos,
            payload,
        })
    }
}

/// Attributes per span the view makes room for at once: within what a span's decode is
/// charged (the view is charged as twice a decode, see `apply`), and what most spans have.
const SLOTS_PER_SPAN: usize = 2;

/// A field-2 entry of a span: one attribute as the bytes have it, and what edits did to it.
#[derive(Debug)]
pub(super) struct Slot {
    /// Where the span's field 9 holding it starts (its key): the field ends where `message` does.
    start: usize,
    /// The KeyValue message.
    message: Range<usize>,
    key: Range<usize>,
    /// The AnyValue message, when the KeyValue has one.
    value: Option<Range<usize>>,
    removed: bool,
    /// The value set by an edit, written instead of the original.
    replaced: Option<AnyValue>,
}

/// What edits did to a span beyond replacing or removing its attributes.
#[derive(Debug, Default)]
pub(super) struct Edits {
    /// The span's name, kind, trace_state and status once one of them is set (the other
    /// fields of this Span stay empty); written instead of the original ones.
    fields: Option<Span>,
    /// The whole attribute list, decoded, once an editor needed it as a list (or the span's
    /// attributes are encoded in a way only a decoder merges right): written instead of every
    /// original attribute.
    materialized: Option<Vec<KeyValue>>,
}

#[derive(Debug)]
pub(super) struct SpanView {
    /// The Span message.
    message: Range<usize>,
    /// This span's attributes in [`Record::slots`].
    slots: Range<usize>,
    /// The last `name` field's payload.
    name: Option<Range<usize>>,
    parent_empty: bool,
    dropped: bool,
    /// Whether the span is written anew rather than copied.
    touched: bool,
    /// Attributes added, written after the original ones: the commonest edit, kept out of
    /// `edits` so that it takes no allocation of its own.
    appended: Vec<KeyValue>,
    edits: Option<Box<Edits>>,
}

/// One ScopeSpans: its scope decoded, its spans in [`Record::spans`].
struct ScopeView {
    message: Range<usize>,
    scope: InstrumentationScope,
    /// Whether the ScopeSpans has a scope (or a processor gave it one, as prost's do).
    present: bool,
    spans: Range<usize>,
}

/// A ResourceSpans message being edited.
pub(crate) struct Record<'a> {
    bytes: &'a [u8],
    pub(crate) resource: Resource,
    /// Whether the record has a resource (or a processor gave it one, as prost's do).
    resource_present: bool,
    scopes: Vec<ScopeView>,
    spans: Vec<SpanView>,
    slots: Vec<Slot>,
    /// A filter ran: ScopeSpans left without spans go, as the prost path's filter removes them.
    pub(crate) drop_empty_scopes: bool,
    /// What the `resource` and `scope` contexts' statements run on as their span (they cannot
    /// name it).
    placeholder: Span,
}

/// The payloads of every occurrence of a message field, merged as a decoder merges them.
fn decode_merged<M: Message + Default>(bytes: &[u8], parts: &[Range<usize>]) -> Result<M, DecodeError> {
    match parts {
        [] => Ok(M::default()),
        [one] => Ok(M::decode(&bytes[one.clone()])?),
        many => {
            let joined: Vec<u8> = many.iter().flat_map(|r| bytes[r.clone()].iter().copied()).collect();
            Ok(M::decode(joined.as_slice())?)
        }
    }
}

impl<'a> Record<'a> {
    /// Views a ResourceSpans message (validated by the receiver's walk) of about `spans` spans
    /// (room for them and a few attributes each is made at once, not by doubling).
    pub(crate) fn parse(bytes: &'a [u8], spans: usize) -> Result<Record<'a>, DecodeError> {
        // A span takes two bytes at least, and the view of one is charged as a decode of it.
        let spans = spans.min(bytes.len() / 2);
        let mut record = Record {
            bytes,
            resource: Resource::default(),
            resource_present: false,
            scopes: Vec::new(),
            spans: Vec::with_capacity(spans),
            slots: Vec::with_capacity(spans.saturating_mul(SLOTS_PER_SPAN)),
            drop_empty_scopes: false,
            placeholder: Span::default(),
        };
        let mut resource = Vec::new();
        for field in fields(bytes, 0..bytes.len()) {
            let field = field?;
            match field.number {
                1 => resource.push(field.payload),
                2 => record.scope(field.payload)?,
                _ => {}
            }
        }
        record.resource_present = !resource.is_empty();
        record.resource = decode_merged(bytes, &resource)?;
        Ok(record)
    }

    fn scope(&mut self, message: Range<usize>) -> Result<(), DecodeError> {
        let first = self.spans.len();
        let mut scope = Vec::new();
        for field in fields(self.bytes, message.clone()) {
            let field = field?;
            match field.number {
                1 => scope.push(field.payload),
                2 => self.span(field.payload)?,
                _ => {}
            }
        }
        let present = !scope.is_empty();
        let scope = decode_merged(self.bytes, &scope)?;
        self.scopes.push(ScopeView {
            message,
            scope,
            present,
            spans: first..self.spans.len(),
        });
        Ok(())
    }

    fn span(&mut self, message: Range<usize>) -> Result<(), DecodeError> {
        let first = self.slots.len();
        let (mut name, mut parent_empty, mut merged) = (None, true, false);
        for field in fields(self.bytes, message.clone()) {
            let field = field?;
            match field.number {
                4 => parent_empty = field.payload.is_empty(),
                5 => name = Some(field.payload),
                9 => {
                    let (mut key, mut value) = (0..0, None);
                    for f in fields(self.bytes, field.payload.clone()) {
                        let f = f?;
                        match f.number {
                            1 => key = f.payload,
                            // A second value merges into the first when decoded.
                            2 if value.is_some() => merged = true,
                            2 => value = Some(f.payload),
                            _ => {}
                        }
                    }
                    self.slots.push(Slot {
                        start: field.whole.start,
                        message: field.payload,
                        key,
                        value,
                        removed: false,
                        replaced: None,
                    });
                }
                _ => {}
            }
        }
        let mut view = SpanView {
            message: message.clone(),
            slots: first..self.slots.len(),
            name,
            parent_empty,
            dropped: false,
            touched: false,
            appended: Vec::new(),
            edits: None,
        };
        if merged {
            // Only a decoder merges such values right: the list is decoded once, for good.
            let span = Span::decode(&self.bytes[message])?;
            view.touched = true;
            view.edits = Some(Box::new(Edits {
                materialized: Some(span.attributes),
                ..Edits::default()
            }));
        }
        self.spans.push(view);
        Ok(())
    }

    /// Gives the record a resource and, with `scopes`, every ScopeSpans a scope, where they
    /// have none: what the prost path's processors do as they edit (`get_or_insert`).
    pub(crate) fn insert_defaults(&mut self, scopes: bool) {
        self.resource_present = true;
        if scopes {
            for scope in &mut self.scopes {
                scope.present = true;
            }
        }
    }

    /// Spans not dropped.
    pub(crate) fn span_count(&self) -> usize {
        self.spans.iter().filter(|s| !s.dropped).count()
    }

    /// Runs `f` on every span not dropped, in order; stops at its first error.
    pub(crate) fn each_span<E>(&mut self, mut f: impl FnMut(&mut WireSpan<'_>) -> Result<(), E>) -> Result<(), E> {
        let Record {
            bytes,
            resource,
            scopes,
            spans,
            slots,
            placeholder,
            ..
        } = self;
        for scope in scopes.iter_mut() {
            for view in &mut spans[scope.spans.clone()] {
                if view.dropped {
                    continue;
                }
                let mut target = WireSpan::new(bytes, resource, &mut scope.scope, placeholder, view, slots);
                f(&mut target)?;
            }
        }
        Ok(())
    }

    /// The record's resource with a placeholder scope and span: the `resource` context.
    pub(crate) fn placeholder(&mut self) -> (&mut Resource, &mut Span) {
        (&mut self.resource, &mut self.placeholder)
    }

    /// Each scope with the resource and a placeholder span: the `scope` context.
    pub(crate) fn scopes_mut<E>(
        &mut self,
        mut f: impl FnMut(&mut Resource, &mut InstrumentationScope, &mut Span) -> Result<(), E>,
    ) -> Result<(), E> {
        for scope in &mut self.scopes {
            // A filter's emptied scopes are gone for what comes after it, as on the prost path.
            if self.drop_empty_scopes && self.spans[scope.spans.clone()].iter().all(|s| s.dropped) {
                continue;
            }
            scope.present = true;
            f(&mut self.resource, &mut scope.scope, &mut self.placeholder)?;
        }
        Ok(())
    }

    /// The record, edited, as a field-1 record of a request (tag, length, message).
    pub(crate) fn encode(&self) -> Result<Bytes, DecodeError> {
        // Edited spans are written first, so every length is known before the record is.
        let mut edited = Vec::new();
        let mut written: Vec<Option<Range<usize>>> = Vec::with_capacity(self.spans.len());
        for view in &self.spans {
            if view.touched && !view.dropped {
                let start = edited.len();
                span::write(self.bytes, view, &self.slots[view.slots.clone()], &mut edited);
                written.push(Some(start..edited.len()));
            } else {
                written.push(None);
            }
        }
        let resource = self.resource_present.then(|| self.resource.encode_to_vec());
        let mut scopes = Vec::with_capacity(self.scopes.len());
        for scope in &self.scopes {
            let live = self.spans[scope.spans.clone()].iter().any(|s| !s.dropped);
            if !live && self.drop_empty_scopes {
                scopes.push(None);
                continue;
            }
            let header = scope.present.then(|| scope.scope.encode_to_vec());
            let mut len = header.as_ref().map_or(0, |h| field_len(h.len()));
            let mut next = scope.spans.start;
            for field in fields(self.bytes, scope.message.clone()).flatten() {
                match field.number {
                    1 => {}
                    2 => {
                        let i = next;
                        next += 1;
                        match (&written[i], self.spans[i].dropped) {
                            (_, true) => {}
                            (Some(r), false) => len += field_len(r.len()),
                            (None, false) => len += field.whole.len(),
                        }
                    }
                    _ => len += field.whole.len(),
                }
            }
            scopes.push(Some((header, len)));
        }
        let mut len = resource.as_ref().map_or(0, |r| field_len(r.len()));
        let mut next_scope = 0;
        for field in fields(self.bytes, 0..self.bytes.len()).flatten() {
            match field.number {
                1 => {}
                2 => {
                    if let Some(Some((_, l))) = scopes.get(next_scope) {
                        len += field_len(*l);
                    }
                    next_scope += 1;
                }
                _ => len += field.whole.len(),
            }
        }
        let mut out = BytesMut::with_capacity(field_len(len));
        put_len(1, len, &mut out);
        if let Some(resource) = &resource {
            put_len(1, resource.len(), &mut out);
            out.put_slice(resource);
        }
        let mut next_scope = 0;
        for field in fields(self.bytes, 0..self.bytes.len()).flatten() {
            match field.number {
                1 => {}
                2 => {
                    let k = next_scope;
                    next_scope += 1;
                    let Some(Some((header, l))) = scopes.get(k) else {
                        continue;
                    };
                    put_len(2, *l, &mut out);
                    if let Some(header) = header {
                        put_len(1, header.len(), &mut out);
                        out.put_slice(header);
                    }
                    let mut next = self.scopes[k].spans.start;
                    for f in fields(self.bytes, self.scopes[k].message.clone()).flatten() {
                        match f.number {
                            1 => {}
                            2 => {
                                let i = next;
                                next += 1;
                                if self.spans[i].dropped {
                                    continue;
                                }
                                match &written[i] {
                                    Some(r) => {
                                        put_len(2, r.len(), &mut out);
                                        out.put_slice(&edited[r.clone()]);
                                    }
                                    None => out.put_slice(&self.bytes[f.whole]),
                                }
                            }
                            _ => out.put_slice(&self.bytes[f.whole]),
                        }
                    }
                }
                _ => out.put_slice(&self.bytes[field.whole]),
            }
        }
        if out.len() != field_len(len) {
            return Err(framing("record changed while it was written"));
        }
        Ok(out.freeze())
    }
}

/// A length-delimited field's size with its key (field numbers here are below 16).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// A length-delimited field's key and length.
fn put_len(number: u32, len: usize, out: &mut impl BufMut) {
    encode_key(number, prost::encoding::WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}
