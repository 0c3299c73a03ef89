//! Unit tests of wire.rs and its json and split parts.
use super::json::{ALLOCATION_OVERHEAD, json_object_cost, span_ids_valid};
use super::split::record_message;
use super::testdata::*;
use super::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span};

fn request(parts: Vec<ResourceSpans>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest { resource_spans: parts }
}

#[test]
fn records_are_the_original_bytes() {
    let req = request(vec![resource_spans("a", 0, 2, 3), resource_spans("b", 100, 1, 1)]);
    let body = Bytes::from(req.encode_to_vec());
    let parsed = parse_protobuf(body.clone()).unwrap();
    assert_eq!(parsed.spans, 7);
    assert_eq!(parsed.chunks.iter().map(|c| c.spans).collect::<Vec<_>>(), vec![6, 1]);
    let joined: Vec<u8> = parsed.chunks.iter().flat_map(|c| c.bytes.to_vec()).collect();
    assert_eq!(joined, body.to_vec());
}

#[test]
fn unknown_top_level_fields_are_skipped() {
    let mut body = request(vec![resource_spans("a", 0, 1, 2)]).encode_to_vec();
    // field 9, varint 5; field 10, length-delimited "hi"
    body.extend_from_slice(&[0x48, 5, 0x52, 2, b'h', b'i']);
    let parsed = parse_protobuf(Bytes::from(body)).unwrap();
    assert_eq!(parsed.spans, 2);
    let rs = ExportTraceServiceRequest::decode(parsed.chunks[0].bytes.clone()).unwrap();
    assert_eq!(rs, request(vec![resource_spans("a", 0, 1, 2)]));
}

#[test]
fn malformed_protobuf_is_an_error() {
    assert!(parse_protobuf(Bytes::from_static(&[0x0a, 0x05, 0x01])).is_err());
    assert!(parse_protobuf(Bytes::from_static(b"not protobuf at all")).is_err());
}

#[test]
fn empty_request_is_empty() {
    let parsed = parse_protobuf(Bytes::new()).unwrap();
    assert_eq!(parsed, ParsedRequest::default());
    assert_eq!(parse_json(b"{}").unwrap(), ParsedRequest::default());
}

#[test]
fn json_matches_protobuf() {
    let req = request(vec![resource_spans("a", 0, 1, 2)]);
    let json = serde_json::to_vec(&req).unwrap();
    let text = String::from_utf8(json.clone()).unwrap();
    assert!(text.contains("\"traceId\":\"0000000000000002"), "{text}");
    let from_json = parse_json(&json).unwrap();
    let from_proto = parse_protobuf(Bytes::from(req.encode_to_vec())).unwrap();
    assert_eq!(from_json, from_proto);
}

#[test]
fn json_accepts_unknown_fields_and_integer_times() {
    let body = br#"{"resourceSpans":[{"resource":{"attributes":[]},"scopeSpans":[{"spans":[
        {"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"x",
         "startTimeUnixNano":1544712660000000000,"endTimeUnixNano":"1544712661000000000","kind":2,
         "futureField":{"a":1}}]}]}],"extra":true}"#;
    let parsed = parse_json(body).unwrap();
    assert_eq!(parsed.spans, 1);
}

#[test]
fn invalid_ids_are_rejected_individually() {
    let mut rs = resource_spans("a", 0, 1, 3);
    rs.scope_spans[0].spans[1].span_id = vec![0; 8];
    rs.scope_spans[0].spans[2].trace_id = vec![1; 3];
    let parsed = parse_protobuf(Bytes::from(request(vec![rs]).encode_to_vec())).unwrap();
    assert_eq!((parsed.spans, parsed.rejected), (1, 2));
    assert!(parsed.rejection.unwrap().contains("2 span(s)"));
    let back = ExportTraceServiceRequest::decode(parsed.chunks[0].bytes.clone()).unwrap();
    assert_eq!(back.resource_spans[0].scope_spans[0].spans.len(), 1);
}

/// A random request framed by hand, with unknown fields at every level (each a unique
/// marker that must survive when its message is kept), spans with every kind of unusable id,
/// repeated id fields (the last counts), nested attribute values and empty scopes; and the
/// reference answer: prost's decode, filtered as the relay's rule says.
struct Case {
    body: Vec<u8>,
    reference: ExportTraceServiceRequest,
    rejected: usize,
    /// Markers inside messages that are kept.
    kept_markers: Vec<Vec<u8>>,
    dropped_markers: Vec<Vec<u8>>,
}

fn field(key: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(key);
    prost::encoding::encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

fn random_case(seed: u64) -> Case {
    let mut case_gen = CaseGen {
        rng: crate::loadgen::spans::FastRng::new(seed),
        seed,
        next_marker: 0,
        id: 0,
        kept_markers: Vec::new(),
        dropped_markers: Vec::new(),
    };
    let (mut body, mut reference, mut rejected) = (Vec::new(), Vec::new(), 0);
    for r in 0..1 + case_gen.pick(4) {
        rejected += case_gen.resource(r, &mut body, &mut reference);
    }
    Case {
        body,
        reference: request(reference),
        rejected,
        kept_markers: case_gen.kept_markers,
        dropped_markers: case_gen.dropped_markers,
    }
}

/// The state of building one [`Case`].
struct CaseGen {
    rng: crate::loadgen::spans::FastRng,
    seed: u64,
    next_marker: u32,
    /// The last span id handed out.
    id: u64,
    kept_markers: Vec<Vec<u8>>,
    dropped_markers: Vec<Vec<u8>>,
}

/// One ScopeSpans as framed by hand, and what the reference keeps of it.
struct ScopeCase {
    bytes: Vec<u8>,
    /// Its usable spans.
    reference: ScopeSpans,
    /// Markers of the scope and of its usable spans.
    markers: Vec<Vec<u8>>,
    total: usize,
    invalid: usize,
}

/// An attribute whose value is an int inside `levels` arrays.
fn nested(levels: usize) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, any_value};
    let mut value = AnyValue {
        value: Some(any_value::Value::IntValue(levels as i64)),
    };
    for _ in 0..levels {
        value = AnyValue {
            value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![value] })),
        };
    }
    vec![KeyValue {
        key: "nested".into(),
        value: Some(value),
        ..Default::default()
    }]
}

impl CaseGen {
    fn pick(&mut self, n: u64) -> usize {
        (self.rng.next_u64() % n) as usize
    }

    /// A unique unknown field 99 (length-delimited): key 0x9a 0x06.
    fn marker(&mut self) -> Vec<u8> {
        self.next_marker += 1;
        let text = format!("marker-{}-{}", self.seed, self.next_marker);
        let mut out = vec![0x9a, 0x06];
        prost::encoding::encode_varint(text.len() as u64, &mut out);
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// Frames ResourceSpans number `r` into `body`, pushes what the reference keeps of it, and
    /// returns its count of unusable spans.
    fn resource(&mut self, r: usize, body: &mut Vec<u8>, reference: &mut Vec<ResourceSpans>) -> usize {
        let mut rs = resource_spans(&format!("svc-{r}"), 0, 0, 0);
        let levels = self.pick(20);
        rs.resource.as_mut().unwrap().attributes.extend(nested(levels));
        let mut rs_bytes = rs.encode_to_vec();
        let mut rs_markers = vec![];
        if self.pick(2) == 0 {
            let m = self.marker();
            rs_bytes.extend_from_slice(&m);
            rs_markers.push(m);
        }
        let (mut total, mut invalid) = (0, 0);
        let mut scopes = Vec::new();
        for s in 0..self.pick(5) {
            let scope = self.scope(s);
            field(0x12, &scope.bytes, &mut rs_bytes);
            (total, invalid) = (total + scope.total, invalid + scope.invalid);
            scopes.push(scope);
        }
        field(0x0a, &rs_bytes, body);
        if self.pick(3) == 0 {
            // An unknown top-level field between records.
            let m = self.marker();
            body.extend_from_slice(&m);
            self.dropped_markers.push(m);
        }
        let any_kept = total > invalid;
        let mut scopes_ref = Vec::new();
        for scope in scopes {
            // A record with no unusable span is kept whole, empty scopes included.
            if any_kept && (invalid == 0 || !scope.reference.spans.is_empty()) {
                self.kept_markers.extend(scope.markers);
            } else {
                self.dropped_markers.extend(scope.markers);
            }
            scopes_ref.push(scope.reference);
        }
        if any_kept {
            self.kept_markers.extend(rs_markers);
            if invalid > 0 {
                scopes_ref.retain(|s| !s.spans.is_empty());
            }
            rs.scope_spans = scopes_ref;
            reference.push(rs);
        } else {
            self.dropped_markers.extend(rs_markers);
        }
        invalid
    }

    fn scope(&mut self, s: usize) -> ScopeCase {
        let mut reference = resource_spans("x", 0, 1, 0).scope_spans.remove(0);
        reference.schema_url = format!("https://schema/{s}");
        let mut scope = ScopeCase {
            bytes: reference.encode_to_vec(),
            reference,
            markers: vec![],
            total: 0,
            invalid: 0,
        };
        if self.pick(2) == 0 {
            let m = self.marker();
            scope.bytes.extend_from_slice(&m);
            scope.markers.push(m);
        }
        for _ in 0..self.pick(7) {
            self.span(&mut scope);
        }
        if self.pick(4) == 0 {
            // An unknown varint field between the spans.
            scope.bytes.extend_from_slice(&[0xa0, 0x06, 0x2a]);
        }
        scope
    }

    /// Frames one span into `scope`, with any kind of unusable id or none.
    fn span(&mut self, scope: &mut ScopeCase) {
        self.id += 1;
        let mut span = testdata::span(self.id + self.seed * 1000);
        if self.pick(3) == 0 {
            span.attributes = nested(self.pick(25));
        }
        match self.pick(9) {
            0 => span.trace_id = vec![0; 16],
            1 => span.span_id = vec![0; 8],
            2 => span.trace_id.truncate(15),
            3 => span.span_id = vec![],
            4 => span.trace_id = vec![],
            5 => span.span_id.push(1),
            _ => {}
        }
        let mut bytes = span.encode_to_vec();
        // A repeated id field: the last one counts (prost merges a singular bytes field by
        // replacing it).
        match self.pick(8) {
            0 => {
                field(0x0a, &[0; 16], &mut bytes);
                span.trace_id = vec![0; 16];
            }
            1 => {
                field(0x12, &[5; 8], &mut bytes);
                span.span_id = vec![5; 8];
            }
            _ => {}
        }
        let m = if self.pick(3) == 0 { Some(self.marker()) } else { None };
        if let Some(m) = &m {
            bytes.extend_from_slice(m);
        }
        field(0x12, &bytes, &mut scope.bytes);
        scope.total += 1;
        if span_ids_valid(&span) {
            scope.reference.spans.push(span);
            scope.markers.extend(m);
        } else {
            scope.invalid += 1;
            self.dropped_markers.extend(m);
        }
    }
}

/// Records what parsing asks of its budget.
#[derive(Default)]
struct Recorder {
    copies: Vec<usize>,
    decoded: Vec<usize>,
}

impl DecodeBudget for Recorder {
    type Error = DecodeError;
    fn hold_copy(&mut self, bytes: usize) -> Result<(), DecodeError> {
        self.copies.push(bytes);
        Ok(())
    }
    fn hold_decoded(&mut self, bytes: usize) -> Result<(), DecodeError> {
        self.decoded.push(bytes);
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Spans with unusable ids are dropped from the bytes, without a decode: on thousands of
/// random requests the result decodes to exactly what prost's decode, filtered, gives; the
/// counts are the same; unknown fields in what is kept survive; nothing grows; and the one
/// copy is charged to the budget before it is made.
#[test]
fn rebuilt_records_equal_prost_decoded_then_filtered() {
    let (mut rebuilt, mut with_unknown) = (0, 0);
    for seed in 0..3000 {
        let case = random_case(seed);
        let mut recorder = Recorder::default();
        let parsed = parse_protobuf_within(Bytes::from(case.body.clone()), &mut recorder).unwrap();
        let joined: Vec<u8> = parsed.chunks.iter().flat_map(|c| c.bytes.to_vec()).collect();
        let back = ExportTraceServiceRequest::decode(joined.as_slice()).unwrap();
        assert_eq!(back, case.reference, "seed {seed}");
        let expected_spans: usize = case
            .reference
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        assert_eq!(
            (parsed.spans, parsed.rejected),
            (expected_spans, case.rejected),
            "seed {seed}"
        );
        assert_eq!(parsed.rejection.is_some(), case.rejected > 0);
        for (chunk, rs) in parsed.chunks.iter().zip(&case.reference.resource_spans) {
            let counted: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
            assert_eq!(chunk.spans, counted, "seed {seed}");
        }
        assert!(joined.len() <= case.body.len(), "seed {seed}");
        for m in &case.kept_markers {
            assert!(contains(&joined, m), "seed {seed}: kept marker lost");
            with_unknown += 1;
        }
        for m in &case.dropped_markers {
            assert!(!contains(&joined, m), "seed {seed}: dropped marker kept");
        }
        assert!(recorder.decoded.is_empty(), "protobuf is never decoded");
        if case.rejected > 0 && parsed.spans > 0 {
            rebuilt += 1;
            assert_eq!(recorder.copies.last(), Some(&joined.len()), "seed {seed}");
        }
        // What the walk accepts, the rebuilt bytes pass again unchanged.
        let again = parse_protobuf(Bytes::from(joined.clone())).unwrap();
        assert_eq!((again.spans, again.rejected), (parsed.spans, 0));
    }
    assert!(
        rebuilt > 1000 && with_unknown > 1000,
        "{rebuilt} rebuilt, {with_unknown} markers"
    );
}

/// The reproduction: millions of empty spans (unusable ids) around one good one. Parsing
/// copies only the good span's record, and the body is released (nothing slices it).
#[test]
fn millions_of_empty_spans_cost_their_bytes_only() {
    let good = testdata::span(1).encode_to_vec();
    let mut scope = Vec::with_capacity(4_000_000);
    for _ in 0..1_000_000 {
        scope.extend_from_slice(&[0x12, 0x00]);
    }
    field(0x12, &good, &mut scope);
    let mut rs = Vec::new();
    field(0x12, &scope, &mut rs);
    let mut body = Vec::new();
    field(0x0a, &rs, &mut body);
    let mut recorder = Recorder::default();
    let parsed = parse_protobuf_within(Bytes::from(body), &mut recorder).unwrap();
    assert_eq!((parsed.spans, parsed.rejected), (1, 1_000_000));
    let len = parsed.chunks[0].bytes.len();
    assert!(len < 100, "{len}");
    assert_eq!(recorder.copies, vec![RECORD_CHARGE_STEP * RECORD_COST, len]);
    // Many empty records (no spans) are not kept either, nor listed while walking.
    let body = Bytes::from([0x0a, 0x00].repeat(1_000_000));
    assert_eq!(parse_protobuf(body).unwrap(), ParsedRequest::default());
}

/// A body that is mostly bytes no record keeps (unknown fields) is not held behind slices
/// of the records: they are copied out, charged first.
#[test]
fn records_are_copied_out_of_a_mostly_unused_body() {
    let mut body = request(vec![resource_spans("a", 0, 1, 1)]).encode_to_vec();
    let record_len = body.len();
    let mut junk = Vec::new();
    field(0x52, &vec![b'x'; 100_000], &mut junk);
    body.extend_from_slice(&junk);
    let mut recorder = Recorder::default();
    let parsed = parse_protobuf_within(Bytes::from(body), &mut recorder).unwrap();
    assert_eq!(parsed.spans, 1);
    assert_eq!(recorder.copies, vec![RECORD_CHARGE_STEP * RECORD_COST, record_len]);
    assert_eq!(parsed.chunks[0].bytes.len(), record_len);
}

/// Records are charged for the memory they take beyond their bytes as they are listed: a
/// body of many one-span records costs far more than its size.
#[test]
fn many_records_are_charged_as_they_are_listed() {
    let body = request((0..1000).map(|i| resource_spans("a", i * 10, 1, 1)).collect()).encode_to_vec();
    let mut recorder = Recorder::default();
    let parsed = parse_protobuf_within(Bytes::from(body), &mut recorder).unwrap();
    assert_eq!(parsed.chunks.len(), 1000);
    let charged: usize = recorder.copies.iter().sum();
    assert!(charged >= 1000 * RECORD_COST, "{charged}");
    assert!(
        charged <= 2 * 1000 * RECORD_COST + RECORD_CHARGE_STEP * RECORD_COST,
        "{charged}"
    );
}

/// The JSON estimate is charged before serde runs, and refusing it refuses the request
/// (nothing is decoded).
#[test]
fn json_estimate_is_charged_first() {
    struct Refuse;
    impl DecodeBudget for Refuse {
        type Error = DecodeError;
        fn hold_copy(&mut self, _: usize) -> Result<(), DecodeError> {
            Ok(())
        }
        fn hold_decoded(&mut self, _: usize) -> Result<(), DecodeError> {
            Err(DecodeError::Framing("refused"))
        }
    }
    // Not even valid JSON: refused before it is looked at.
    assert!(matches!(
        parse_json_within(b"{not json", &mut Refuse),
        Err(DecodeError::Framing("refused"))
    ));
    let empties = format!(
        r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{}]}}]}}]}}"#,
        ["{}"; 1000].join(",")
    );
    let mut recorder = Recorder::default();
    let parsed = parse_json_within(empties.as_bytes(), &mut recorder).unwrap();
    assert_eq!((parsed.spans, parsed.rejected), (0, 1000));
    assert_eq!(recorder.decoded.len(), 1);
    assert!(
        recorder.decoded[0] >= 1000 * std::mem::size_of::<Span>(),
        "{:?}",
        recorder.decoded
    );
    // Braces inside strings are text, not objects.
    let text = format!(r#"{{"resourceSpans":[],"x":"{}"}}"#, "{[".repeat(1000));
    assert!(json_decoded_estimate(text.as_bytes()) < 5 * text.len() + 10 * json_object_cost());
    let escaped = br#"{"a":"\"{{{{"}"#;
    assert_eq!(
        json_decoded_estimate(escaped),
        json_object_cost() + 2 * ALLOCATION_OVERHEAD + 3 * escaped.len()
    );
}

/// Real clients' JSON (the load generator's agent and plain traces) is not refused for its
/// estimate: it stays a small multiple of the body, so a request at max_recv_msg_size
/// (16 MiB by default) fits the default memory_limiter (384 MiB below its spike limit).
#[test]
fn json_estimate_of_real_requests_is_a_small_multiple() {
    use crate::loadgen::spans::{Encoding, FastRng, Template, genai_shape, kv_str, plain_shape};
    let resource = vec![kv_str("service.name", "agent")];
    for (i, shape) in [
        genai_shape(resource.clone(), &[], (2, 40)),
        plain_shape(resource.clone(), &[kv_str("k", "v")], 5, (3, 20)),
        plain_shape(resource, &[], 1, (0, 0)),
    ]
    .iter()
    .enumerate()
    {
        let template = Template::build(shape, 20, Encoding::Json, i as u64).unwrap();
        let mut body = Vec::new();
        template.render(&mut FastRng::new(7), 1_700_000_000_000_000_000, &mut body);
        let ratio = json_decoded_estimate(&body) as f64 / body.len() as f64;
        assert!(ratio < 20.0, "shape {i}: estimate is {ratio:.1} times the body");
        assert!(parse_json(&body).unwrap().spans > 0);
    }
}

/// The decoding split this file had, as the reference for the one over bytes.
fn prost_split(chunk: &ResourceChunk, first: usize, size: usize) -> Vec<(ResourceSpans, usize)> {
    let rs = ResourceSpans::decode(record_message(&chunk.bytes).unwrap()).unwrap();
    let empty_piece = || ResourceSpans {
        resource: rs.resource.clone(),
        scope_spans: Vec::new(),
        schema_url: rs.schema_url.clone(),
    };
    let mut pieces = Vec::new();
    let mut piece = empty_piece();
    let (mut in_piece, mut want) = (0, first);
    for scope in rs.scope_spans.clone() {
        let mut spans = scope.spans.into_iter().peekable();
        while spans.peek().is_some() {
            let take: Vec<Span> = spans.by_ref().take(want - in_piece).collect();
            in_piece += take.len();
            piece.scope_spans.push(ScopeSpans {
                scope: scope.scope.clone(),
                spans: take,
                schema_url: scope.schema_url.clone(),
            });
            if in_piece == want {
                pieces.push((std::mem::replace(&mut piece, empty_piece()), in_piece));
                (in_piece, want) = (0, size);
            }
        }
    }
    if in_piece > 0 {
        pieces.push((piece, in_piece));
    }
    pieces
}

/// Splitting over bytes gives what decoding, regrouping and encoding gave, on the random
/// requests above (unknown fields, nesting, empty scopes, markers), at every kind of cut;
/// and the unknown fields of what each piece carries survive.
#[test]
fn split_over_bytes_equals_the_decoding_split() {
    use crate::loadgen::spans::FastRng;
    let mut rng = FastRng::new(99);
    let mut checked = 0;
    for seed in 0..1500 {
        let case = random_case(seed);
        // Records as received (all spans usable): the unfiltered body, when it has none bad.
        let parsed = parse_protobuf(Bytes::from(case.body.clone())).unwrap();
        for chunk in parsed.chunks.iter().filter(|c| c.spans >= 2) {
            let first = 1 + (rng.next_u64() as usize) % (chunk.spans - 1);
            let size = 1 + (rng.next_u64() as usize) % chunk.spans;
            let pieces = split_chunk_pieces(chunk, first, size).unwrap();
            let reference = prost_split(chunk, first, size);
            assert_eq!(pieces.len(), reference.len(), "seed {seed}");
            for (piece, (rs, spans)) in pieces.iter().zip(&reference) {
                assert_eq!(piece.spans, *spans);
                assert_eq!(piece.experiment, chunk.experiment);
                let decoded = ExportTraceServiceRequest::decode(piece.bytes.clone()).unwrap();
                assert_eq!(decoded.resource_spans, vec![rs.clone()], "seed {seed}");
                // Each piece is a record the walk accepts as it is.
                let again = parse_protobuf(piece.bytes.clone()).unwrap();
                assert_eq!((again.spans, again.rejected, again.chunks.len()), (*spans, 0, 1));
            }
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked}");
}

/// Unknown fields survive a split: the ResourceSpans' and ScopeSpans' in every piece that
/// carries them, each span's in its piece.
#[test]
fn split_keeps_unknown_fields() {
    let marker = |text: &str| {
        let mut out = Vec::new();
        out.extend_from_slice(&[0x9a, 0x06]);
        prost::encoding::encode_varint(text.len() as u64, &mut out);
        out.extend_from_slice(text.as_bytes());
        out
    };
    let mut scope = Vec::new();
    for i in 0..4u64 {
        let mut span = testdata::span(i).encode_to_vec();
        span.extend_from_slice(&marker(&format!("span-{i}")));
        field(0x12, &span, &mut scope);
    }
    scope.extend_from_slice(&marker("scope"));
    let mut rs = marker("resource");
    field(0x12, &scope, &mut rs);
    let mut record = Vec::new();
    field(0x0a, &rs, &mut record);
    let chunk = ResourceChunk {
        bytes: Bytes::from(record),
        spans: 4,
        experiment: None,
        names: None,
    };
    let pieces = split_chunk_pieces(&chunk, 1, 2).unwrap();
    assert_eq!(pieces.iter().map(|p| p.spans).collect::<Vec<_>>(), vec![1, 2, 1]);
    for (i, piece) in pieces.iter().enumerate() {
        assert!(contains(&piece.bytes, &marker("resource")), "piece {i}");
        assert!(contains(&piece.bytes, &marker("scope")), "piece {i}");
    }
    for (span, piece) in [(0, 0), (1, 1), (2, 1), (3, 2)] {
        assert!(contains(&pieces[piece].bytes, &marker(&format!("span-{span}"))));
    }
}

/// A large resource is not copied into every piece: past twice the record's size the
/// split refuses (the batcher then sends the record whole, counted and logged).
#[test]
fn split_refuses_to_multiply_a_large_resource() {
    let mut rs = resource_spans("a", 0, 1, 300);
    rs.resource
        .as_mut()
        .unwrap()
        .attributes
        .push(kv("big", &"x".repeat(100_000)));
    let chunk = ResourceChunk {
        bytes: encode_record(&rs),
        spans: 300,
        experiment: None,
        names: None,
    };
    assert!(matches!(
        split_chunk_pieces(&chunk, 10, 10),
        Err(DecodeError::Split(m)) if m.contains("resource")
    ));
    // Few pieces copy it within the allowance.
    assert_eq!(split_chunk_pieces(&chunk, 150, 150).unwrap().len(), 2);
}

#[test]
fn experiment_attribute_routes() {
    let mut rs = resource_spans("a", 0, 1, 1);
    rs.resource
        .as_mut()
        .unwrap()
        .attributes
        .push(kv(EXPERIMENT_ATTRIBUTE, "42"));
    let mut bad = resource_spans("b", 10, 1, 1);
    bad.resource
        .as_mut()
        .unwrap()
        .attributes
        .push(kv(EXPERIMENT_ATTRIBUTE, "../etc"));
    let parsed = parse_protobuf(Bytes::from(request(vec![rs, bad]).encode_to_vec())).unwrap();
    assert_eq!(parsed.chunks[0].experiment.as_deref(), Some("42"));
    assert_eq!(parsed.chunks[1].experiment, None);
}

/// A record that does not decode (say, a spooled one damaged behind a valid checksum) or
/// whose span count is off is an error from split, never a panic.
#[test]
fn split_refuses_what_it_cannot_split() {
    let good = encode_record(&resource_spans("a", 0, 1, 4));
    let chunk = |bytes: Bytes, spans| ResourceChunk {
        bytes,
        spans,
        experiment: None,
        names: None,
    };
    for (bytes, spans) in [
        (Bytes::from_static(b"\x0a\x05\x01"), 4),
        (Bytes::from_static(b""), 4),
        (
            Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            4,
        ),
        (good.slice(..good.len() - 3), 4),
        (good.clone(), 9),
        (good.clone(), 0),
        ([good.as_ref(), good.as_ref()].concat().into(), 8),
    ] {
        assert!(
            split_chunk(&chunk(bytes.clone(), spans), 2).is_err(),
            "{bytes:?} {spans}"
        );
    }
    assert!(split_chunk(&chunk(good.clone(), 4), 4).is_err());
    assert!(split_chunk(&chunk(good, 4), 2).is_ok());
}

/// JSON is held to the protobuf depth rule after conversion.
#[test]
fn json_depth_is_limited_like_protobuf() {
    let json = |levels: usize| {
        let mut value = r#"{"intValue":"1"}"#.to_string();
        for _ in 0..levels {
            value = format!(r#"{{"arrayValue":{{"values":[{value}]}}}}"#);
        }
        format!(
            r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{{"traceId":"5b8efff798038103d269b633813fc60c",
            "spanId":"eee19b7ec3c1b174","attributes":[{{"key":"k","value":{value}}}]}}]}}]}}]}}"#
        )
    };
    // A span attribute's AnyValue is level 6; 29 arrays make 64.
    assert_eq!(parse_json(json(29).as_bytes()).unwrap().spans, 1);
    let err = parse_json(json(30).as_bytes()).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TooDeep {
                place: "span attribute",
                limit: 64
            }
        ),
        "{err}"
    );
}

#[test]
fn pieces_have_the_asked_sizes_and_every_span_once() {
    let rs = resource_spans("a", 0, 3, 7);
    let chunk = ResourceChunk {
        bytes: encode_record(&rs),
        spans: 21,
        experiment: Some("5".into()),
        names: None,
    };
    let pieces = split_chunk_pieces(&chunk, 2, 4).unwrap();
    assert_eq!(
        pieces.iter().map(|p| p.spans).collect::<Vec<_>>(),
        vec![2, 4, 4, 4, 4, 3]
    );
    let merged: Vec<u8> = pieces.iter().flat_map(|p| p.bytes.to_vec()).collect();
    let req = ExportTraceServiceRequest::decode(merged.as_slice()).unwrap();
    let names = |rs: &[ResourceSpans]| -> Vec<String> {
        rs.iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.name.clone())
            .collect()
    };
    assert_eq!(names(&req.resource_spans), names(std::slice::from_ref(&rs)));
    for (piece, r) in pieces.iter().zip(&req.resource_spans) {
        assert_eq!(r.resource, rs.resource);
        assert_eq!(piece.experiment.as_deref(), Some("5"));
        let counted: usize = r.scope_spans.iter().map(|s| s.spans.len()).sum();
        assert_eq!(counted, piece.spans, "each piece's count is its content");
        assert!(r.scope_spans.iter().all(|s| !s.spans.is_empty()), "no empty scopes");
    }
    assert!(split_chunk_pieces(&chunk, 0, 4).is_err());
    assert!(split_chunk_pieces(&chunk, 21, 4).is_err());
    assert!(split_chunk_pieces(&chunk, 3, 0).is_err());
}

#[test]
fn split_keeps_every_span_once() {
    let rs = resource_spans("a", 0, 3, 4);
    let chunk = ResourceChunk {
        bytes: encode_record(&rs),
        spans: 12,
        experiment: None,
        names: None,
    };
    for first in 1..12 {
        let (head, tail) = split_chunk(&chunk, first).unwrap();
        let merged: Vec<u8> = [head.bytes.as_ref(), tail.bytes.as_ref()].concat();
        let req = ExportTraceServiceRequest::decode(merged.as_slice()).unwrap();
        let names: Vec<String> = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.name.clone())
            .collect();
        let expected: Vec<String> = rs
            .scope_spans
            .iter()
            .flat_map(|s| &s.spans)
            .map(|s| s.name.clone())
            .collect();
        assert_eq!(names, expected, "split at {first}");
        assert_eq!((head.spans, tail.spans), (first, 12 - first));
        assert_eq!(req.resource_spans[0].resource, rs.resource);
    }
}
