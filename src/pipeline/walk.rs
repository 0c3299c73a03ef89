//! Validates an OTLP trace request by walking its protobuf encoding against the schema, without
//! building it in memory: it checks what prost's decoder checks (field framing, wire types of
//! known fields, UTF-8 of strings, varint overflow, nesting depth) and collects only what the
//! relay needs: each ResourceSpans' byte range, span count, spans with unusable ids, and the
//! MLflow routing attributes of its resource. A full decode allocated for every attribute of
//! every span only to throw it away. The same walk, tallying as it goes, estimates what a record
//! takes once prost decodes it (for the processors, `decoded_estimate`).
//!
//! This is the one rule for what the relay accepts: whatever passes here must decode with prost
//! (split, spool replay) and with MLflow's parser (Python protobuf, upb), so no later stage can
//! fail on it. It may refuse more than they do (groups), never less.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use super::decode::DecodeError;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{AnyValue, EntityRef, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span};

use crate::otlp::routing::{self, ResourceNames, ResourceRouting};
use crate::otlp::{EXPERIMENT_ATTRIBUTE, ExperimentId, varint};

mod estimate;
pub(crate) use estimate::decoded_estimate;
use estimate::{Heap, Tally};

/// The deepest message accepted, in protobuf message levels with the ExportTraceServiceRequest
/// itself at level 1 (ResourceSpans 2, ScopeSpans 3, Span 4, its KeyValue 5, AnyValue 6; every
/// array level adds two, ArrayValue and AnyValue; every kvlist level three, KeyValueList,
/// KeyValue and AnyValue). Both prost and upb (MLflow's Python protobuf) stop at 100 levels
/// below the root message; 64 leaves a margin for a proxy or parser that counts differently
/// or wraps the request once more.
pub(crate) const MAX_DEPTH: u32 = 64;

/// One `resource_spans` record of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// The whole field (tag, length, message): concatenations of these are valid requests.
    pub(crate) field: std::ops::Range<usize>,
    /// The ResourceSpans message inside it.
    pub(crate) message: std::ops::Range<usize>,
    pub(crate) spans: usize,
    /// Spans whose trace_id is not 16 bytes or span_id not 8, or either all zero.
    pub(crate) invalid_spans: usize,
    pub(crate) experiment: Option<String>,
    /// The resource's other MLflow routing attributes, read on the way.
    pub(crate) names: Option<Arc<ResourceNames>>,
    /// What the record takes once decoded ([`decoded_estimate`]), when the walk tallied it.
    pub(crate) decoded: Option<usize>,
}

pub(super) enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Fixed32,
    Len(&'a [u8]),
}

fn err(what: &'static str) -> DecodeError {
    DecodeError::Framing(what)
}

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    // Every key and length is read through here: when the compiler stopped inlining it, the
    // call cost about 4% of the relay's CPU on OTLP/HTTP.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        varint::read(self.buf, &mut self.pos).map_err(|e| err(e.message()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(err("truncated field"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next field's number and value, or None at the end of the message.
    pub(super) fn field(&mut self) -> Result<Option<(u64, Wire<'a>)>, DecodeError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(err("invalid field number"));
        }
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            5 => {
                self.take(4)?;
                Wire::Fixed32
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| err("length overflow"))?;
                Wire::Len(self.take(len)?)
            }
            3 | 4 => return Err(err("groups are not supported")),
            _ => return Err(err("invalid wire type")),
        };
        Ok(Some((number, wire)))
    }
}

pub(super) fn len(w: Wire<'_>) -> Result<&[u8], DecodeError> {
    match w {
        Wire::Len(b) => Ok(b),
        _ => Err(err("wrong wire type for a length-delimited field")),
    }
}

fn string(w: Wire<'_>) -> Result<&str, DecodeError> {
    std::str::from_utf8(len(w)?).map_err(|_| err("string field is not valid UTF-8"))
}

fn varint(w: Wire<'_>) -> Result<(), DecodeError> {
    match w {
        Wire::Varint(_) => Ok(()),
        _ => Err(err("wrong wire type for a varint field")),
    }
}

fn fixed64(w: Wire<'_>) -> Result<(), DecodeError> {
    match w {
        Wire::Fixed64 => Ok(()),
        _ => Err(err("wrong wire type for a fixed64 field")),
    }
}

fn fixed32(w: Wire<'_>) -> Result<(), DecodeError> {
    match w {
        Wire::Fixed32 => Ok(()),
        _ => Err(err("wrong wire type for a fixed32 field")),
    }
}

/// Walks an ExportTraceServiceRequest. Unknown fields are skipped, as prost does.
pub(crate) fn request(body: &[u8]) -> Result<Vec<Record>, DecodeError> {
    records(body, false)
}

/// Every record of a request; with `tally`, each says what it takes decoded (see
/// [`request_each`]).
fn records(body: &[u8], tally: bool) -> Result<Vec<Record>, DecodeError> {
    let mut records = Vec::new();
    request_each::<DecodeError>(body, tally, |record| {
        records.push(record);
        Ok(())
    })?;
    Ok(records)
}

/// Walks an ExportTraceServiceRequest, handing each record to `f` as it is validated: a caller
/// that keeps only records with spans holds memory in proportion to them, not to the count of
/// (possibly empty) records a hostile body frames. With `tally`, each record comes with what it
/// takes once decoded (`Record::decoded`), counted on the way: the processors charge it, and a
/// second walk per record cost them a fifth of their CPU.
pub(crate) fn request_each<E: From<DecodeError>>(
    body: &[u8],
    tally: bool,
    mut f: impl FnMut(Record) -> Result<(), E>,
) -> Result<(), E> {
    let mut r = Reader::new(body);
    loop {
        let next = if tally {
            next_record_tallied(&mut r)?
        } else {
            next_record(&mut r)?
        };
        let Some(record) = next else {
            return Ok(());
        };
        f(record)?;
    }
}

/// The next `resource_spans` record of a request, validated; None at its end. It is not
/// generic, so the walk below it is compiled once, here, with its helpers inlined, whoever
/// takes the records: walked from inside a loop generic over the caller's error, it became
/// functions calling each other and took a fifth more of the relay's CPU on OTLP/HTTP.
fn next_record(r: &mut Reader<'_>) -> Result<Option<Record>, DecodeError> {
    next_record_with::<()>(r, |()| None)
}

/// [`next_record`], with what the record takes once decoded.
fn next_record_tallied(r: &mut Reader<'_>) -> Result<Option<Record>, DecodeError> {
    next_record_with::<Heap>(r, |heap| Some(estimate::decoded_of_heap(heap)))
}

#[inline(always)]
fn next_record_with<T: Tally>(
    r: &mut Reader<'_>,
    decoded: impl FnOnce(T::Cost) -> Option<usize>,
) -> Result<Option<Record>, DecodeError> {
    loop {
        let start = r.pos;
        let Some((number, wire)) = r.field()? else {
            return Ok(None);
        };
        if number != 1 {
            continue;
        }
        let message = len(wire)?;
        let message_start = r.pos - message.len();
        let (mut record, cost) = resource_spans::<T>(message)?;
        record.field = start..r.pos;
        record.message = message_start..r.pos;
        record.decoded = decoded(cost);
        return Ok(Some(record));
    }
}

// Dropping spans with unusable ids without decoding: a record is rebuilt from its own bytes,
// leaving out those spans' fields and every ScopeSpans left without spans, and re-framing the
// ScopeSpans it keeps. Every other field (unknown ones too) is copied as it came, in its order.
// A ScopeSpans' new length prefix is never longer than its old one (the content only shrinks and
// the prefix is written minimal), so the result is never larger than the input. These run on
// records the walk above has validated; they still return errors rather than assume it.

/// ScopeSpans (field 2 of ResourceSpans), as a length-delimited key.
pub(super) const SCOPE_SPANS_KEY: u8 = 0x12;
/// ResourceSpans (field 1 of ExportTraceServiceRequest), as a length-delimited key.
pub(super) const RESOURCE_SPANS_KEY: u8 = 0x0a;

/// How a record's spans fare when it is rebuilt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Kept {
    /// The rebuilt ResourceSpans message's length (without key and length prefix).
    pub(crate) message_len: usize,
    pub(crate) spans: usize,
    pub(crate) dropped: usize,
}

impl Kept {
    /// The rebuilt record's length as a field of the request (key, length prefix, message).
    pub(crate) fn field_len(&self) -> usize {
        1 + prost::encoding::encoded_len_varint(self.message_len as u64) + self.message_len
    }
}

/// Whether a (validated) span's ids are usable, by the walk's rule: the last trace_id and
/// span_id fields count, an absent one is empty.
fn span_ids_usable(buf: &[u8]) -> Result<bool, DecodeError> {
    let (mut trace_ok, mut span_ok) = (false, false);
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => trace_ok = id_usable(len(w)?, 16),
            2 => span_ok = id_usable(len(w)?, 8),
            _ => {}
        }
    }
    Ok(trace_ok && span_ok)
}

/// A ScopeSpans' rebuilt length and span counts; a length of None when it keeps no span.
fn scope_kept(buf: &[u8]) -> Result<(Option<usize>, usize, usize), DecodeError> {
    let (mut size, mut spans, mut dropped) = (0, 0, 0);
    let mut r = Reader::new(buf);
    loop {
        let start = r.pos;
        let Some((number, w)) = r.field()? else { break };
        if number == 2 {
            if !span_ids_usable(len(w)?)? {
                dropped += 1;
                continue;
            }
            spans += 1;
        }
        size += r.pos - start;
    }
    Ok(((spans > 0).then_some(size), spans, dropped))
}

/// What rebuilding a ResourceSpans message (the record's `message` bytes) keeps.
pub(crate) fn kept(message: &[u8]) -> Result<Kept, DecodeError> {
    let mut out = Kept::default();
    let mut r = Reader::new(message);
    loop {
        let start = r.pos;
        let Some((number, w)) = r.field()? else { break };
        if number == 2 {
            let (size, spans, dropped) = scope_kept(len(w)?)?;
            out.spans += spans;
            out.dropped += dropped;
            if let Some(size) = size {
                out.message_len += 1 + prost::encoding::encoded_len_varint(size as u64) + size;
            }
        } else {
            out.message_len += r.pos - start;
        }
    }
    Ok(out)
}

/// Appends the rebuilt record (as a request field) to `out`; `kept` is what `kept` said of it.
/// Errors, having appended part of it, when the bytes do not agree with `kept`.
pub(crate) fn write_kept(message: &[u8], kept: &Kept, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let begin = out.len();
    out.push(RESOURCE_SPANS_KEY);
    prost::encoding::encode_varint(kept.message_len as u64, out);
    let body_start = out.len();
    let mut r = Reader::new(message);
    loop {
        let start = r.pos;
        let Some((number, w)) = r.field()? else { break };
        if number != 2 {
            out.extend_from_slice(&message[start..r.pos]);
            continue;
        }
        let scope = len(w)?;
        let (Some(size), _, _) = scope_kept(scope)? else {
            continue;
        };
        out.push(SCOPE_SPANS_KEY);
        prost::encoding::encode_varint(size as u64, out);
        let mut s = Reader::new(scope);
        loop {
            let start = s.pos;
            let Some((number, w)) = s.field()? else { break };
            if number == 2 && !span_ids_usable(len(w)?)? {
                continue;
            }
            out.extend_from_slice(&scope[start..s.pos]);
        }
    }
    if out.len() - body_start != kept.message_len || out.len() - begin != kept.field_len() {
        return Err(err("record changed while it was rebuilt"));
    }
    Ok(())
}

/// Every field of a message, in order.
#[inline(always)]
fn each_field<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(u64, Wire<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        f(number, w)?;
    }
    Ok(())
}

/// A string field, tallied.
#[inline(always)]
fn text<'a, T: Tally>(w: Wire<'a>, t: &mut T) -> Result<&'a str, DecodeError> {
    let s = string(w)?;
    t.bytes(s.len());
    Ok(s)
}

/// A bytes field, tallied.
#[inline(always)]
fn bytes<'a, T: Tally>(w: Wire<'a>, t: &mut T) -> Result<&'a [u8], DecodeError> {
    let b = len(w)?;
    t.bytes(b.len());
    Ok(b)
}

/// A field the schema does not know: skipped, as prost does, and tallied as bytes.
#[inline(always)]
fn unknown<T: Tally>(w: Wire<'_>, t: &mut T) {
    if let Wire::Len(b) = w {
        t.bytes(b.len());
    }
}

/// A repeated message field's element: its cost and its place in the Vec.
#[inline(always)]
fn element<T: Tally, M>(t: &mut T, field: u64, cost: T::Cost) {
    t.child(cost);
    t.element(field, std::mem::size_of::<M>());
}

/// Walks a ResourceSpans message: the record (ranges left for the caller), and its tally.
fn resource_spans<T: Tally>(buf: &[u8]) -> Result<(Record, T::Cost), DecodeError> {
    let mut out = Record {
        field: 0..0,
        message: 0..0,
        spans: 0,
        invalid_spans: 0,
        experiment: None,
        names: None,
        decoded: None,
    };
    let mut t = T::default();
    let mut found = ResourceRouting::default();
    each_field(buf, |number, w| {
        match number {
            1 => {
                let (experiment, cost) = resource::<T>(len(w)?, &mut found)?;
                t.child(cost);
                if let Some(e) = experiment {
                    out.experiment = Some(e);
                }
            }
            2 => element::<T, ScopeSpans>(&mut t, 2, scope_spans::<T>(len(w)?, &mut out)?),
            3 => drop(text(w, &mut t)?),
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    out.names = found.names();
    Ok((out, t.cost()))
}

/// Returns the experiment attribute when the resource carries a usable one; notes the other
/// MLflow routing attributes in `found`.
fn resource<'a, T: Tally>(
    buf: &'a [u8],
    found: &mut ResourceRouting<'a>,
) -> Result<(Option<String>, T::Cost), DecodeError> {
    let mut experiment = None;
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 => {
                // Request 1, ResourceSpans 2, Resource 3, KeyValue 4.
                let (key, value, cost) = key_value::<T>(len(w)?, 4, Place::Resource)?;
                element::<T, KeyValue>(&mut t, 1, cost);
                if key == EXPERIMENT_ATTRIBUTE {
                    experiment = value.and_then(experiment_id);
                } else if let Some(value) = value
                    && key.starts_with(routing::PREFIX)
                {
                    routing::note_name(key, value, found);
                }
            }
            2 => varint(w)?,
            3 => element::<T, EntityRef>(&mut t, 3, entity_ref::<T>(len(w)?)?),
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok((experiment, t.cost()))
}

fn entity_ref<T: Tally>(buf: &[u8]) -> Result<T::Cost, DecodeError> {
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 | 2 => drop(text(w, &mut t)?),
            // id_keys and description_keys: repeated strings.
            3 | 4 => {
                text(w, &mut t)?;
                t.element(number, std::mem::size_of::<String>());
            }
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok(t.cost())
}

fn scope_spans<T: Tally>(buf: &[u8], out: &mut Record) -> Result<T::Cost, DecodeError> {
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 => t.child(scope::<T>(len(w)?)?),
            2 => {
                out.spans += 1;
                let (usable, cost) = span::<T>(len(w)?)?;
                element::<T, Span>(&mut t, 2, cost);
                if !usable {
                    out.invalid_spans += 1;
                }
            }
            3 => drop(text(w, &mut t)?),
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok(t.cost())
}

fn scope<T: Tally>(buf: &[u8]) -> Result<T::Cost, DecodeError> {
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 | 2 => drop(text(w, &mut t)?),
            // Request 1, ResourceSpans 2, ScopeSpans 3, InstrumentationScope 4, KeyValue 5.
            3 => attribute(&mut t, 3, len(w)?, 5, Place::Scope)?,
            4 => varint(w)?,
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok(t.cost())
}

fn id_usable(id: &[u8], size: usize) -> bool {
    id.len() == size && id.iter().any(|&b| b != 0)
}

/// Validates a Span; true when its ids are usable.
fn span<T: Tally>(buf: &[u8]) -> Result<(bool, T::Cost), DecodeError> {
    // Absent ids are empty, and a repeated singular field takes its last value, as in prost.
    let (mut trace_ok, mut span_ok) = (false, false);
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 => trace_ok = id_usable(bytes(w, &mut t)?, 16),
            2 => span_ok = id_usable(bytes(w, &mut t)?, 8),
            3 | 5 => drop(text(w, &mut t)?),
            4 => drop(bytes(w, &mut t)?),
            6 | 10 | 12 | 14 => varint(w)?,
            7 | 8 => fixed64(w)?,
            // Request 1, ResourceSpans 2, ScopeSpans 3, Span 4, KeyValue 5.
            9 => attribute(&mut t, 9, len(w)?, 5, Place::Span)?,
            11 => element::<T, Event>(&mut t, 11, event::<T>(len(w)?)?),
            13 => element::<T, Link>(&mut t, 13, link::<T>(len(w)?)?),
            15 => t.child(status::<T>(len(w)?)?),
            16 => fixed32(w)?,
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok((trace_ok && span_ok, t.cost()))
}

fn event<T: Tally>(buf: &[u8]) -> Result<T::Cost, DecodeError> {
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 => fixed64(w)?,
            2 => drop(text(w, &mut t)?),
            // ... Span 4, Event 5, KeyValue 6.
            3 => attribute(&mut t, 3, len(w)?, 6, Place::Event)?,
            4 => varint(w)?,
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok(t.cost())
}

fn link<T: Tally>(buf: &[u8]) -> Result<T::Cost, DecodeError> {
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 | 2 => drop(bytes(w, &mut t)?),
            3 => drop(text(w, &mut t)?),
            // ... Span 4, Link 5, KeyValue 6.
            4 => attribute(&mut t, 4, len(w)?, 6, Place::Link)?,
            5 => varint(w)?,
            6 => fixed32(w)?,
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok(t.cost())
}

fn status<T: Tally>(buf: &[u8]) -> Result<T::Cost, DecodeError> {
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            2 => drop(text(w, &mut t)?),
            3 => varint(w)?,
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok(t.cost())
}

/// Whose attribute a value is, for the error that refuses it.
#[derive(Clone, Copy)]
enum Place {
    Resource,
    Scope,
    Span,
    Event,
    Link,
}

impl Place {
    #[cold]
    #[inline(never)]
    fn too_deep(self) -> DecodeError {
        DecodeError::TooDeep {
            place: match self {
                Place::Resource => "resource attribute",
                Place::Scope => "scope attribute",
                Place::Span => "span attribute",
                Place::Event => "span event attribute",
                Place::Link => "span link attribute",
            },
            limit: MAX_DEPTH,
        }
    }
}

/// Refuses a message at `depth` (its level from the request, which is 1) past the limit.
#[inline(always)]
fn enter(depth: u32, place: Place) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(place.too_deep());
    }
    Ok(())
}

/// An element of a repeated KeyValue field (`field`) of a message, at message level `depth`.
#[inline(always)]
fn attribute<T: Tally>(t: &mut T, field: u64, buf: &[u8], depth: u32, place: Place) -> Result<(), DecodeError> {
    let (_, _, cost) = key_value::<T>(buf, depth, place)?;
    element::<T, KeyValue>(t, field, cost);
    Ok(())
}

/// A KeyValue's key, its AnyValue's encoding, and its tally.
type KeyValueRead<'a, T> = (&'a str, Option<&'a [u8]>, <T as Tally>::Cost);

/// A KeyValue at message level `depth`: its key and its AnyValue's encoding.
fn key_value<T: Tally>(buf: &[u8], depth: u32, place: Place) -> Result<KeyValueRead<'_, T>, DecodeError> {
    enter(depth, place)?;
    let (mut key, mut value) = ("", None);
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 => key = text(w, &mut t)?,
            2 => {
                let v = len(w)?;
                t.child(any_value::<T>(v, depth + 1, place)?);
                value = Some(v);
            }
            3 => varint(w)?,
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok((key, value, t.cost()))
}

/// An AnyValue at message level `depth`. Every message below it counts, empty ones too: prost
/// and upb check the depth before they look at a message's length.
fn any_value<T: Tally>(buf: &[u8], depth: u32, place: Place) -> Result<T::Cost, DecodeError> {
    enter(depth, place)?;
    let mut t = T::default();
    each_field(buf, |number, w| {
        match number {
            1 => drop(text(w, &mut t)?),
            2 | 3 | 8 => varint(w)?,
            4 => fixed64(w)?,
            // ArrayValue, then its AnyValues; KeyValueList, then its KeyValues.
            5 | 6 => {
                let items = len(w)?;
                enter(depth + 1, place)?;
                let mut list = T::default();
                each_field(items, |n, item| {
                    match (n, number) {
                        (1, 5) => {
                            let cost = any_value::<T>(len(item)?, depth + 2, place)?;
                            element::<T, AnyValue>(&mut list, 1, cost);
                        }
                        (1, _) => attribute(&mut list, 1, len(item)?, depth + 2, place)?,
                        _ => unknown(item, &mut list),
                    }
                    Ok(())
                })?;
                t.child(list.cost());
            }
            7 => drop(bytes(w, &mut t)?),
            _ => unknown(w, &mut t),
        }
        Ok(())
    })?;
    Ok(t.cost())
}

/// A numeric experiment id from an AnyValue (string or int), as routing accepts it.
fn experiment_id(value: &[u8]) -> Option<String> {
    let mut r = Reader::new(value);
    let mut id = None;
    while let Ok(Some((number, w))) = r.field() {
        match (number, w) {
            (1, Wire::Len(b)) => id = std::str::from_utf8(b).ok().map(|s| s.trim().to_string()),
            (3, Wire::Varint(v)) => id = Some((v as i64).to_string()),
            _ => {}
        }
    }
    id.and_then(|s| ExperimentId::parse(&s)).map(ExperimentId::into_string)
}

/// The fields of a message other than `number`, concatenated in their order.
fn fields_except(buf: &[u8], number: u64) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let mut r = Reader::new(buf);
    loop {
        let start = r.pos;
        let Some((n, _)) = r.field()? else { break };
        if n != number {
            out.extend_from_slice(&buf[start..r.pos]);
        }
    }
    Ok(out)
}

/// Appends a length-delimited field.
fn put_field(key: u8, parts: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.push(key);
    prost::encoding::encode_varint(len as u64, out);
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Cuts a ResourceSpans message into records (request fields) of `first` spans, then `size`
/// spans each, the last holding what is left; returns each with its span count. Each piece
/// carries the ResourceSpans' other fields (resource, schema_url, unknown ones) and, for every
/// ScopeSpans it has spans of, that ScopeSpans' other fields: what the pieces decode to is what
/// decoding the record and regrouping its spans gives, without building a single span in
/// memory (a decode took about 13 times the record's size).
///
/// Every piece copies the resource and the scopes it has spans of: a large resource cut into
/// many pieces would take many times the record's memory (an 8 MB resource attribute, 140
/// pieces: over a gigabyte). Past `max_out` bytes in all this refuses, and the record goes on
/// whole.
pub(crate) fn split_message(
    message: &[u8],
    first: usize,
    size: usize,
    max_out: usize,
) -> Result<Vec<(Vec<u8>, usize)>, DecodeError> {
    let resource = fields_except(message, 2)?;
    let mut pieces = Vec::new();
    let mut out = 0usize;
    // The current piece's ScopeSpans fields, and its span count.
    let (mut scopes, mut in_piece, mut want) = (Vec::new(), 0usize, first);
    let mut r = Reader::new(message);
    while let Some((number, w)) = r.field()? {
        if number != 2 {
            continue;
        }
        let scope = len(w)?;
        let header = fields_except(scope, 2)?;
        // The current ScopeSpans' spans in the current piece.
        let mut spans = Vec::new();
        let mut s = Reader::new(scope);
        loop {
            let start = s.pos;
            let Some((n, _)) = s.field()? else { break };
            if n != 2 {
                continue;
            }
            spans.extend_from_slice(&scope[start..s.pos]);
            in_piece += 1;
            if in_piece == want {
                put_field(SCOPE_SPANS_KEY, &[&header, &spans], &mut scopes);
                spans.clear();
                let mut record = Vec::with_capacity(resource.len() + scopes.len() + 11);
                put_field(RESOURCE_SPANS_KEY, &[&resource, &scopes], &mut record);
                out += record.len();
                if out > max_out {
                    return Err(DecodeError::Split(
                        "its pieces would copy its resource and scopes past twice its size",
                    ));
                }
                pieces.push((record, in_piece));
                scopes.clear();
                (in_piece, want) = (0, size);
            }
        }
        if !spans.is_empty() {
            put_field(SCOPE_SPANS_KEY, &[&header, &spans], &mut scopes);
        }
    }
    if in_piece > 0 {
        let mut record = Vec::with_capacity(resource.len() + scopes.len() + 11);
        put_field(RESOURCE_SPANS_KEY, &[&resource, &scopes], &mut record);
        pieces.push((record, in_piece));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests;
