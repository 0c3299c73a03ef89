//! Validates an OTLP trace request by walking its protobuf encoding against the schema, without
//! building it in memory: it checks what prost's decoder checks (field framing, wire types of
//! known fields, UTF-8 of strings, varint overflow, nesting depth) and collects only what the
//! relay needs: each ResourceSpans' byte range, span count, spans with unusable ids, and the
//! experiment attribute. A full decode allocated for every attribute of every span only to throw
//! it away.
//!
//! This is the one rule for what the relay accepts: whatever passes here must decode with prost
//! (split, spool replay) and with MLflow's parser (Python protobuf, upb), so no later stage can
//! fail on it. It may refuse more than they do (groups), never less.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
use super::wire::{DecodeError, EXPERIMENT_ATTRIBUTE};
use crate::otlp::{ExperimentId, varint};

/// The deepest message accepted, in protobuf message levels with the ExportTraceServiceRequest
/// itself at level 1 (ResourceSpans 2, ScopeSpans 3, Span 4, its KeyValue 5, AnyValue 6; every
/// array level adds two, ArrayValue and AnyValue; every kvlist level three, KeyValueList,
/// KeyValue and AnyValue). Both prost and upb (MLflow's Python protobuf) stop at 100 levels
/// below the root message; 64 leaves a margin for a proxy or parser that counts differently
/// or wraps the request once more.
pub const MAX_DEPTH: u32 = 64;

/// One `resource_spans` record of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The whole field (tag, length, message): concatenations of these are valid requests.
    pub field: std::ops::Range<usize>,
    /// The ResourceSpans message inside it.
    pub message: std::ops::Range<usize>,
    pub spans: usize,
    /// Spans whose trace_id is not 16 bytes or span_id not 8, or either all zero.
    pub invalid_spans: usize,
    pub experiment: Option<String>,
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

    #[inline]
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
pub fn request(body: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let mut records = Vec::new();
    request_each::<DecodeError>(body, |record| {
        records.push(record);
        Ok(())
    })?;
    Ok(records)
}

/// Walks an ExportTraceServiceRequest, handing each record to `f` as it is validated: a caller
/// that keeps only records with spans holds memory in proportion to them, not to the count of
/// (possibly empty) records a hostile body frames.
pub(crate) fn request_each<E: From<DecodeError>>(
    body: &[u8],
    mut f: impl FnMut(Record) -> Result<(), E>,
) -> Result<(), E> {
    let mut r = Reader::new(body);
    loop {
        let start = r.pos;
        let Some((number, wire)) = r.field()? else { break };
        if number != 1 {
            continue;
        }
        let message = len(wire)?;
        let message_start = r.pos - message.len();
        let mut record = resource_spans(message)?;
        record.field = start..r.pos;
        record.message = message_start..r.pos;
        f(record)?;
    }
    Ok(())
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
    pub message_len: usize,
    pub spans: usize,
    pub dropped: usize,
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

fn resource_spans(buf: &[u8]) -> Result<Record, DecodeError> {
    let mut out = Record {
        field: 0..0,
        message: 0..0,
        spans: 0,
        invalid_spans: 0,
        experiment: None,
    };
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => {
                if let Some(e) = resource(len(w)?)? {
                    out.experiment = Some(e);
                }
            }
            2 => scope_spans(len(w)?, &mut out)?,
            3 => drop(string(w)?),
            _ => {}
        }
    }
    Ok(out)
}

/// Returns the experiment attribute when the resource carries a usable one.
fn resource(buf: &[u8]) -> Result<Option<String>, DecodeError> {
    let mut experiment = None;
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => {
                // Request 1, ResourceSpans 2, Resource 3, KeyValue 4.
                let (key, value) = key_value(len(w)?, 4, Place::Resource)?;
                if key == EXPERIMENT_ATTRIBUTE {
                    experiment = value.and_then(experiment_id);
                }
            }
            2 => varint(w)?,
            3 => entity_ref(len(w)?)?,
            _ => {}
        }
    }
    Ok(experiment)
}

fn entity_ref(buf: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        if (1..=4).contains(&number) {
            string(w)?;
        }
    }
    Ok(())
}

fn scope_spans(buf: &[u8], out: &mut Record) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => scope(len(w)?)?,
            2 => {
                out.spans += 1;
                if !span(len(w)?)? {
                    out.invalid_spans += 1;
                }
            }
            3 => drop(string(w)?),
            _ => {}
        }
    }
    Ok(())
}

fn scope(buf: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 | 2 => drop(string(w)?),
            // Request 1, ResourceSpans 2, ScopeSpans 3, InstrumentationScope 4, KeyValue 5.
            3 => drop(key_value(len(w)?, 5, Place::Scope)?),
            4 => varint(w)?,
            _ => {}
        }
    }
    Ok(())
}

fn id_usable(id: &[u8], size: usize) -> bool {
    id.len() == size && id.iter().any(|&b| b != 0)
}

/// Validates a Span; true when its ids are usable.
fn span(buf: &[u8]) -> Result<bool, DecodeError> {
    // Absent ids are empty, and a repeated singular field takes its last value, as in prost.
    let (mut trace_ok, mut span_ok) = (false, false);
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => trace_ok = id_usable(len(w)?, 16),
            2 => span_ok = id_usable(len(w)?, 8),
            3 | 5 => drop(string(w)?),
            4 => drop(len(w)?),
            6 | 10 | 12 | 14 => varint(w)?,
            7 | 8 => fixed64(w)?,
            // Request 1, ResourceSpans 2, ScopeSpans 3, Span 4, KeyValue 5.
            9 => drop(key_value(len(w)?, 5, Place::Span)?),
            11 => event(len(w)?)?,
            13 => link(len(w)?)?,
            15 => status(len(w)?)?,
            16 => fixed32(w)?,
            _ => {}
        }
    }
    Ok(trace_ok && span_ok)
}

fn event(buf: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => fixed64(w)?,
            2 => drop(string(w)?),
            // ... Span 4, Event 5, KeyValue 6.
            3 => drop(key_value(len(w)?, 6, Place::Event)?),
            4 => varint(w)?,
            _ => {}
        }
    }
    Ok(())
}

fn link(buf: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 | 2 => drop(len(w)?),
            3 => drop(string(w)?),
            // ... Span 4, Link 5, KeyValue 6.
            4 => drop(key_value(len(w)?, 6, Place::Link)?),
            5 => varint(w)?,
            6 => fixed32(w)?,
            _ => {}
        }
    }
    Ok(())
}

fn status(buf: &[u8]) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            2 => drop(string(w)?),
            3 => varint(w)?,
            _ => {}
        }
    }
    Ok(())
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

/// A KeyValue at message level `depth`: its key and its AnyValue's encoding.
fn key_value(buf: &[u8], depth: u32, place: Place) -> Result<(&str, Option<&[u8]>), DecodeError> {
    enter(depth, place)?;
    let (mut key, mut value) = ("", None);
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => key = string(w)?,
            2 => {
                let v = len(w)?;
                any_value(v, depth + 1, place)?;
                value = Some(v);
            }
            3 => varint(w)?,
            _ => {}
        }
    }
    Ok((key, value))
}

/// An AnyValue at message level `depth`. Every message below it counts, empty ones too: prost
/// and upb check the depth before they look at a message's length.
fn any_value(buf: &[u8], depth: u32, place: Place) -> Result<(), DecodeError> {
    enter(depth, place)?;
    let mut r = Reader::new(buf);
    while let Some((number, w)) = r.field()? {
        match number {
            1 => drop(string(w)?),
            2 | 3 | 8 => varint(w)?,
            4 => fixed64(w)?,
            5 => {
                // ArrayValue, then its AnyValues.
                let items = len(w)?;
                enter(depth + 1, place)?;
                let mut items = Reader::new(items);
                while let Some((n, item)) = items.field()? {
                    if n == 1 {
                        any_value(len(item)?, depth + 2, place)?;
                    }
                }
            }
            6 => {
                // KeyValueList, then its KeyValues.
                let items = len(w)?;
                enter(depth + 1, place)?;
                let mut items = Reader::new(items);
                while let Some((n, item)) = items.field()? {
                    if n == 1 {
                        key_value(len(item)?, depth + 2, place)?;
                    }
                }
            }
            7 => drop(len(w)?),
            _ => {}
        }
    }
    Ok(())
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
mod tests {
    use super::*;
    use crate::loadgen::spans::{Encoding, FastRng, Template, genai_shape, kv_str, plain_shape};
    use crate::pipeline::wire::testdata;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    /// Realistic requests: nested GenAI agent traces with events, links and attributes, and
    /// plain traces with padding attributes.
    fn corpus() -> Vec<Vec<u8>> {
        let resource = vec![kv_str("service.name", "agent"), kv_str(EXPERIMENT_ATTRIBUTE, "42")];
        let mut out = Vec::new();
        for (i, shape) in [
            genai_shape(resource.clone(), &[], (2, 40)),
            plain_shape(resource, &[kv_str("k", "v")], 5, (3, 20)),
        ]
        .iter()
        .enumerate()
        {
            let template = Template::build(shape, 3, Encoding::Proto, i as u64).unwrap();
            let mut body = Vec::new();
            template.render(&mut FastRng::new(7), 1_700_000_000_000_000_000, &mut body);
            out.push(body);
        }
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                testdata::resource_spans("a", 0, 2, 3),
                testdata::resource_spans("b", 50, 1, 2),
            ],
        };
        out.push(req.encode_to_vec());
        out
    }

    /// What the relay needs from prost's full decode: span counts per ResourceSpans.
    fn prost_view(body: &[u8]) -> Result<Vec<usize>, prost::DecodeError> {
        let req = ExportTraceServiceRequest::decode(body)?;
        Ok(req
            .resource_spans
            .iter()
            .map(|rs| rs.scope_spans.iter().map(|s| s.spans.len()).sum())
            .collect())
    }

    fn walk_view(body: &[u8]) -> Result<Vec<usize>, DecodeError> {
        Ok(request(body)?.iter().map(|r| r.spans).collect())
    }

    #[test]
    fn agrees_with_prost_on_valid_requests() {
        for body in corpus() {
            let records = request(&body).unwrap();
            assert_eq!(walk_view(&body).unwrap(), prost_view(&body).unwrap());
            let joined: Vec<u8> = records.iter().flat_map(|r| body[r.field.clone()].to_vec()).collect();
            assert_eq!(joined, body, "records cover the request");
            assert!(records.iter().all(|r| r.invalid_spans == 0));
        }
        assert_eq!(request(&corpus()[0]).unwrap()[0].experiment.as_deref(), Some("42"));
    }

    /// Thousands of corrupted requests (flipped bytes, truncations): the walker accepts exactly
    /// what prost accepts, and then counts the same spans.
    #[test]
    fn agrees_with_prost_on_corrupted_requests() {
        let mut rng = FastRng::new(2026);
        let mut both_failed = 0;
        for body in corpus() {
            for round in 0..3000 {
                let mut bad = body.clone();
                match round % 3 {
                    0 => bad.truncate((rng.next_u64() as usize) % body.len()),
                    _ => {
                        for _ in 0..=(round % 4) {
                            let at = (rng.next_u64() as usize) % bad.len();
                            bad[at] = rng.next_u64() as u8;
                        }
                    }
                }
                let (walked, decoded) = (walk_view(&bad), prost_view(&bad));
                match (&walked, &decoded) {
                    (Ok(w), Ok(d)) => assert_eq!(w, d),
                    (Err(_), Err(_)) => both_failed += 1,
                    // prost skips unknown groups; the walker refuses them (no OTLP sender uses them).
                    (Err(DecodeError::Framing("groups are not supported")), Ok(_)) => {}
                    _ => panic!("round {round}: walker {walked:?} but prost {decoded:?}"),
                }
            }
        }
        assert!(
            both_failed > 1000,
            "the corruptions must exercise the error paths ({both_failed})"
        );
    }

    #[test]
    fn unusable_ids_and_experiment_forms() {
        let mut rs = testdata::resource_spans("a", 0, 1, 3);
        rs.scope_spans[0].spans[0].trace_id = vec![0; 16];
        rs.scope_spans[0].spans[1].span_id = vec![1; 7];
        rs.resource
            .as_mut()
            .unwrap()
            .attributes
            .push(opentelemetry_proto::tonic::common::v1::KeyValue {
                key: EXPERIMENT_ATTRIBUTE.into(),
                value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(17)),
                }),
                ..Default::default()
            });
        let body = ExportTraceServiceRequest {
            resource_spans: vec![rs],
        }
        .encode_to_vec();
        let r = &request(&body).unwrap()[0];
        assert_eq!((r.spans, r.invalid_spans), (3, 2));
        assert_eq!(r.experiment.as_deref(), Some("17"));
    }

    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, span};

    /// One level of nesting inside an attribute value.
    #[derive(Clone, Copy, Debug)]
    enum Level {
        /// AnyValue -> ArrayValue -> AnyValue: two message levels.
        Array,
        /// AnyValue -> KeyValueList -> KeyValue -> AnyValue: three.
        Kvlist,
    }

    /// Where the nested attribute sits, and the message level of its KeyValue.
    const PLACES: [(&str, u32); 5] = [("resource", 4), ("scope", 5), ("span", 5), ("event", 6), ("link", 6)];

    /// A value nesting `levels` (outermost first) around an int, or around an empty ArrayValue.
    fn nested(levels: &[Level], empty_bottom: bool) -> AnyValue {
        let mut value = if empty_bottom {
            AnyValue {
                value: Some(Value::ArrayValue(ArrayValue { values: vec![] })),
            }
        } else {
            AnyValue {
                value: Some(Value::IntValue(1)),
            }
        };
        for level in levels.iter().rev() {
            value = AnyValue {
                value: Some(match level {
                    Level::Array => Value::ArrayValue(ArrayValue { values: vec![value] }),
                    Level::Kvlist => Value::KvlistValue(KeyValueList {
                        values: vec![KeyValue {
                            key: "k".into(),
                            value: Some(value),
                            ..Default::default()
                        }],
                    }),
                }),
            };
        }
        value
    }

    /// The deepest message level of such a value's attribute placed at `place`.
    fn depth_of(place: &str, levels: &[Level], empty_bottom: bool) -> u32 {
        let kv = PLACES.iter().find(|p| p.0 == place).map(|p| p.1).unwrap_or(0);
        let inner: u32 = levels
            .iter()
            .map(|l| match l {
                Level::Array => 2,
                Level::Kvlist => 3,
            })
            .sum();
        kv + 1 + inner + u32::from(empty_bottom)
    }

    /// A request with one span carrying `value` as an attribute at `place`.
    fn request_with(place: &str, value: AnyValue) -> Vec<u8> {
        let attr = vec![KeyValue {
            key: "deep".into(),
            value: Some(value),
            ..Default::default()
        }];
        let mut span = testdata::span(1);
        let mut rs = ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope::default()),
                ..Default::default()
            }],
            ..Default::default()
        };
        match place {
            "resource" => {
                rs.resource = Some(Resource {
                    attributes: attr,
                    ..Default::default()
                })
            }
            "scope" => {
                rs.scope_spans[0].scope = Some(InstrumentationScope {
                    attributes: attr,
                    ..Default::default()
                })
            }
            "span" => span.attributes = attr,
            "event" => {
                span.events = vec![span::Event {
                    attributes: attr,
                    ..Default::default()
                }]
            }
            _ => {
                span.links = vec![span::Link {
                    attributes: attr,
                    ..Default::default()
                }]
            }
        }
        rs.scope_spans[0].spans.push(span);
        ExportTraceServiceRequest {
            resource_spans: vec![rs],
        }
        .encode_to_vec()
    }

    /// Level sequences of every kind: arrays only, kvlists only, and two mixes.
    fn shapes(n: usize) -> Vec<Vec<Level>> {
        vec![
            vec![Level::Array; n],
            vec![Level::Kvlist; n],
            (0..n)
                .map(|i| if i % 2 == 0 { Level::Array } else { Level::Kvlist })
                .collect(),
            (0..n)
                .map(|i| if i % 3 == 2 { Level::Kvlist } else { Level::Array })
                .collect(),
        ]
    }

    /// Nesting of every kind in every position, at every depth around the limit and past prost's:
    /// the walker accepts exactly up to MAX_DEPTH message levels counted from the request, refuses
    /// deeper with an error naming the position, and prost decodes everything it accepts.
    #[test]
    fn depth_is_counted_in_message_levels_from_the_request() {
        let mut checked = 0;
        for (place, _) in PLACES {
            for n in 0..70 {
                for levels in shapes(n) {
                    for empty_bottom in [false, true] {
                        let depth = depth_of(place, &levels, empty_bottom);
                        let body = request_with(place, nested(&levels, empty_bottom));
                        let walked = request(&body);
                        let decoded = prost_view(&body);
                        if depth <= MAX_DEPTH {
                            assert_eq!(
                                walk_view(&body).ok(),
                                Some(vec![1]),
                                "{place} depth {depth} {levels:?} must pass"
                            );
                            assert_eq!(decoded.ok(), Some(vec![1]), "prost must decode what the walker passes");
                        } else {
                            match walked {
                                Err(DecodeError::TooDeep { place: p, limit }) => {
                                    assert_eq!(limit, MAX_DEPTH);
                                    assert!(
                                        p.starts_with(place) || p == format!("span {place} attribute"),
                                        "{p} for {place}"
                                    );
                                }
                                other => panic!("{place} depth {depth}: {other:?}"),
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 2000);
    }

    /// The limit's neighbourhood exactly, and prost's own limit (root + 100 levels), which the
    /// walker's must stay below.
    #[test]
    fn the_limit_and_prosts() {
        for (place, kv) in PLACES {
            // Arrays add two levels; an empty ArrayValue at the bottom adds one, to hit each depth.
            for depth in (MAX_DEPTH - 3)..=(MAX_DEPTH + 3) {
                let extra = depth - (kv + 1);
                let levels = vec![Level::Array; (extra / 2) as usize];
                let empty_bottom = extra % 2 == 1;
                assert_eq!(depth_of(place, &levels, empty_bottom), depth);
                let body = request_with(place, nested(&levels, empty_bottom));
                assert_eq!(request(&body).is_ok(), depth <= MAX_DEPTH, "{place} at {depth}");
            }
            for depth in [101, 102] {
                let extra = depth - (kv + 1);
                let levels = vec![Level::Array; (extra / 2) as usize];
                let body = request_with(place, nested(&levels, extra % 2 == 1));
                assert_eq!(prost_view(&body).is_ok(), depth <= 101, "prost at {depth}");
                assert!(request(&body).is_err());
            }
        }
    }

    /// A varint's tenth byte carries bit 63 only: 0 or 1; prost refuses more, so does the walker,
    /// wherever the varint is (a key, a length, a value).
    #[test]
    fn overflowing_varints_are_refused_like_prost() {
        let good = ExportTraceServiceRequest {
            resource_spans: vec![testdata::resource_spans("a", 0, 1, 1)],
        }
        .encode_to_vec();
        for last in 0u8..=0x7f {
            let mut varint = vec![0xff; 9];
            varint.push(last);
            // An unknown varint field 9 at the top, and a span's `kind` (field 6).
            let mut top = good.clone();
            top.push(0x48);
            top.extend_from_slice(&varint);
            // A span's `kind` (field 6), the span framed by hand into a request.
            let mut span = testdata::span(3).encode_to_vec();
            span.push(0x30);
            span.extend_from_slice(&varint);
            let rewritten = wrap(0x0a, &wrap(0x12, &wrap(0x12, &span)));
            for b in [top, rewritten] {
                let (w, p) = (request(&b).is_ok(), prost_view(&b).is_ok());
                assert_eq!(w, p, "last byte {last:#x}: walker {w}, prost {p}");
                assert_eq!(w, last <= 1);
            }
        }
    }

    /// A length-delimited field: tag, length, bytes.
    fn wrap(tag: u8, inner: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        prost::encoding::encode_varint(inner.len() as u64, &mut out);
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn deep_nesting_is_refused() {
        // AnyValue{array_value: ArrayValue{values: [AnyValue{...}]}} nested past the limit.
        let mut value: Vec<u8> = vec![0x10, 0x01];
        for _ in 0..150 {
            let mut array = vec![0x0a];
            prost::encoding::encode_varint(value.len() as u64, &mut array);
            array.extend_from_slice(&value);
            value = vec![0x2a];
            prost::encoding::encode_varint(array.len() as u64, &mut value);
            value.extend_from_slice(&array);
        }
        assert!(any_value(&value, 6, Place::Span).is_err());
    }
}
