//! The memory charged before an OTLP/JSON body is decoded is an upper bound of what decoding
//! and converting it takes: measured by an allocator that counts every byte, on hostile shapes
//! (empty objects wherever the schema has a list, tiny strings, nested values, huge strings).
use peakmem_alloc::{INSTRUMENTED_SYSTEM, PeakMemAlloc, PeakMemAllocTrait};
use std::alloc::System;

use otlp_relay::pipeline::wire::{json_decoded_estimate, parse_json};

/// Counts the bytes allocated and the most since the last reset (a maintained crate, so this
/// test needs no unsafe allocator code of its own).
#[global_allocator]
static ALLOCATOR: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

const ID: &str = r#""traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174""#;

fn request(spans: &str) -> String {
    format!(r#"{{"resourceSpans":[{{"resource":{{}},"scopeSpans":[{{"scope":{{}},"spans":[{spans}]}}]}}]}}"#)
}

fn repeat(item: &str, n: usize) -> String {
    vec![item; n].join(",")
}

/// The most allocated while parsing `body` (beyond what was allocated before), in bytes.
fn measured(body: &[u8]) -> usize {
    ALLOCATOR.reset_peak_memory();
    let parsed = parse_json(body);
    let peak = ALLOCATOR.get_peak_memory();
    drop(parsed);
    peak
}

/// One test in this binary, so no other allocates while it measures.
#[test]
fn the_charge_before_decoding_bounds_what_decoding_takes() {
    let n = 20_000;
    let tiny_kv = r#"{"key":"a","value":{"stringValue":"b"}}"#;
    let shapes: Vec<(&str, String)> = vec![
        ("empty spans", request(&repeat("{}", n))),
        (
            "empty resources",
            format!(r#"{{"resourceSpans":[{}]}}"#, repeat("{}", n)),
        ),
        (
            "empty scopes",
            format!(r#"{{"resourceSpans":[{{"scopeSpans":[{}]}}]}}"#, repeat("{}", n)),
        ),
        (
            "tiny attributes",
            request(&format!(r#"{{{ID},"attributes":[{}]}}"#, repeat(tiny_kv, n))),
        ),
        (
            "empty values in an array",
            request(&format!(
                r#"{{{ID},"attributes":[{{"key":"k","value":{{"arrayValue":{{"values":[{}]}}}}}}]}}"#,
                repeat("{}", n)
            )),
        ),
        (
            "empty pairs in a kvlist",
            request(&format!(
                r#"{{{ID},"attributes":[{{"key":"k","value":{{"kvlistValue":{{"values":[{}]}}}}}}]}}"#,
                repeat(r#"{"key":"k"}"#, n)
            )),
        ),
        (
            "empty events and links",
            request(&format!(
                r#"{{{ID},"events":[{}],"links":[{}]}}"#,
                repeat("{}", n),
                repeat("{}", n)
            )),
        ),
        (
            "nested values",
            request(&repeat(
                &format!(
                    r#"{{{ID},"attributes":[{{"key":"k","value":{}}}]}}"#,
                    (0..20).fold("{}".to_string(), |v, _| format!(
                        r#"{{"arrayValue":{{"values":[{v},{{}}]}}}}"#
                    ))
                ),
                n / 50,
            )),
        ),
        (
            "valid spans with names",
            request(&repeat(&format!(r#"{{{ID},"name":"n","kind":2,"status":{{}}}}"#), n)),
        ),
        (
            "a huge string",
            request(&format!(r#"{{{ID},"name":"{}"}}"#, "x".repeat(4 << 20))),
        ),
        (
            "a huge escaped string",
            request(&format!(r#"{{{ID},"name":"\n{}"}}"#, "x".repeat(4 << 20))),
        ),
        (
            "escaped strings",
            request(&repeat(&format!(r#"{{{ID},"name":"\u0041\n\"{{"}}"#), n)),
        ),
    ];
    for (name, body) in shapes {
        let estimate = json_decoded_estimate(body.as_bytes());
        let used = measured(body.as_bytes());
        eprintln!(
            "{name}: body {} KiB, decoding took {} KiB, estimate {} KiB",
            body.len() >> 10,
            used >> 10,
            estimate >> 10
        );
        assert!(
            used <= estimate,
            "{name}: decoding took {used} bytes, estimated {estimate}"
        );
    }
}
