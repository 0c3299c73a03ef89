//! Generated OTLP requests through the pipeline in-process, in four shares run in parallel: each
//! is accepted with every span delivered or refused whole.

use super::*;

// ---------------------------------------------------------------------------------------------
// The pipeline in-process and its oracle

const LIMIT: usize = 4 * 1024 * 1024;

type SpanKey = (Vec<u8>, Vec<u8>);

fn usable(span: &Span) -> bool {
    span.trace_id.len() == 16
        && span.span_id.len() == 8
        && span.trace_id.iter().any(|&b| b != 0)
        && span.span_id.iter().any(|&b| b != 0)
}

fn span_keys(req: &ExportTraceServiceRequest, only_usable: bool) -> Vec<SpanKey> {
    let mut keys: Vec<SpanKey> = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .filter(|s| !only_usable || usable(s))
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    keys.sort();
    keys
}

/// What one request became: refused with an error, or the spans of its export payloads.
enum Outcome {
    Refused(ReceiveError),
    Delivered { parsed_spans: usize, keys: Vec<SpanKey> },
}

/// receive (decompress with the receiver's limit) → validate → route (Intake into an
/// in-memory target) → batch (at most 3 spans: records are split) → export payloads.
fn pipeline(wire_body: &[u8], compression: Compression, json: bool) -> Result<Outcome, TestCaseError> {
    let encoding = match compression {
        Compression::None => None,
        Compression::Gzip => Some("gzip"),
        Compression::Deflate => Some("deflate"),
    };
    let body = match decompress(Bytes::copy_from_slice(wire_body), encoding, LIMIT, 4) {
        Ok(b) => b,
        Err(e) => return Ok(Outcome::Refused(e)),
    };
    let parsed: Result<ParsedRequest, DecodeError> = if body.is_empty() {
        Ok(ParsedRequest::default())
    } else if json {
        wire::parse_json(&body)
    } else {
        wire::parse_protobuf(body)
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return Ok(Outcome::Refused(e.into())),
    };
    let parsed_spans = parsed.spans;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Vec<Routed>>>(1);
    let intake = Intake::new(vec![tx.into()], vec![]);
    intake
        .submit(parsed, None)
        .map_err(|e| TestCaseError::fail(format!("intake refused: {e}")))?;
    let mut batcher: Batcher<Destination, Item> = Batcher::new(BatchSettings {
        send_batch_size: 3,
        send_batch_max_size: 3,
        timeout: Duration::from_secs(1),
    });
    let now = Instant::now();
    let mut batches: Vec<OutBatch> = Vec::new();
    if let Ok(routed) = rx.try_recv() {
        for r in routed.iter() {
            batches.extend(batcher.add(r.destination.clone(), r.item.clone(), now));
        }
    }
    batches.extend(batcher.flush());
    prop_assert_eq!(batcher.take_unsplit(), 0, "an accepted record failed to split");
    let mut keys = Vec::new();
    for batch in &batches {
        prop_assert!(batch.spans <= 3 && batch.spans > 0);
        let req = ExportTraceServiceRequest::decode(batch.payload())
            .map_err(|e| TestCaseError::fail(format!("export payload does not decode: {e}")))?;
        let got = span_keys(&req, false);
        prop_assert_eq!(got.len(), batch.spans, "batch span count");
        keys.extend(got);
    }
    keys.sort();
    Ok(Outcome::Delivered { parsed_spans, keys })
}

/// Refusals the walker may make where prost decodes: depth past the relay's limit (below
/// prost's), and groups (no OTLP sender writes them).
fn stricter_than_prost(e: &ReceiveError) -> bool {
    matches!(
        e,
        ReceiveError::Malformed(DecodeError::TooDeep { .. } | DecodeError::Framing("groups are not supported"))
    )
}

#[derive(Default, Debug)]
struct Tally {
    cases: u64,
    accepted: u64,
    refused: u64,
    spans: u64,
}

fn check(case: &Case, tally: &mut Tally) -> Result<(), TestCaseError> {
    let (plain, wire_body) = render(case);
    let outcome = pipeline(&wire_body, case.compression, case.json)?;
    tally.cases += 1;
    // The independent view of the same bytes: decompressed by flate2 directly, then prost or
    // serde_json in full.
    let inflated = match case.compression {
        _ if !case.mutate_compressed || case.compression == Compression::None => Some(plain),
        _ => None,
    };
    let reference: Option<Result<ExportTraceServiceRequest, String>> = inflated.map(|b| {
        if case.json {
            if b.is_empty() {
                Ok(ExportTraceServiceRequest::default())
            } else {
                serde_json::from_slice(&b).map_err(|e| e.to_string())
            }
        } else {
            ExportTraceServiceRequest::decode(b.as_slice()).map_err(|e| e.to_string())
        }
    });
    match outcome {
        Outcome::Refused(e) => {
            tally.refused += 1;
            let status = e.http_status().as_u16();
            prop_assert!((400..500).contains(&status), "refusal {} is {}", e, status);
            prop_assert!(!e.to_string().is_empty());
            if let Some(Ok(_)) = reference
                && !stricter_than_prost(&e)
            {
                return Err(TestCaseError::fail(format!("refused ({e}) what the reference decodes")));
            }
        }
        Outcome::Delivered { parsed_spans, keys } => {
            tally.accepted += 1;
            tally.spans += keys.len() as u64;
            prop_assert_eq!(parsed_spans, keys.len(), "accepted spans = delivered spans");
            match reference {
                Some(Ok(req)) => {
                    let expected = span_keys(&req, true);
                    prop_assert_eq!(keys, expected, "delivered spans differ from the request's");
                }
                Some(Err(e)) => {
                    return Err(TestCaseError::fail(format!("accepted what the reference refuses: {e}")));
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn cases_total() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

/// One share of the OTLP cases; the shares run as parallel tests with distinct seeds.
fn run_share(share: u32, of: u32) {
    let cases = cases_total().div_ceil(of);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        // Rejections are not used; keep proptest's own output quiet.
        verbose: 0,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0000 + u64::from(share) + seed_offset()),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let tally = std::cell::RefCell::new(Tally::default());
    let started = Instant::now();
    let result = runner.run(&case(), |c| check(&c, &mut tally.borrow_mut()));
    let t = tally.into_inner();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz share {share}/{of}: {} cases in {secs:.1}s ({:.0}/s); accepted {}, refused {}, {} spans delivered",
        t.cases,
        t.cases as f64 / secs,
        t.accepted,
        t.refused,
        t.spans
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    // The mix must exercise both sides.
    assert!(t.accepted * 10 > t.cases && t.refused * 20 > t.cases, "{t:?}");
}

#[test]
fn otlp_requests_share_1() {
    run_share(1, 4);
}

#[test]
fn otlp_requests_share_2() {
    run_share(2, 4);
}

#[test]
fn otlp_requests_share_3() {
    run_share(3, 4);
}

#[test]
fn otlp_requests_share_4() {
    run_share(4, 4);
}
