//! Mutated config files through the config loader and mutated spool records through the spool
//! record reader: an error or a value, never a panic or a hang.

use super::*;

// ---------------------------------------------------------------------------------------------
// The config loader: YAML with env substitution

const REPO_CONFIG: &str = include_str!("../../config.yaml");

#[derive(Clone, Debug)]
enum TextMut {
    Insert(usize, String),
    Delete(usize, usize),
    DropLine(usize),
}

fn text_mut() -> impl Strategy<Value = TextMut> {
    let snippet = prop_oneof![
        proptest::sample::select(vec![
            "${env:A}",
            "${env:A:-x}",
            "${env:}",
            "${",
            "}",
            "${env:B:-${env:A}}",
            "$${env:A}",
            "\n  ",
            ": ",
            "- ",
            "[",
            "]",
            "{",
            "}",
            "\"",
            "'",
            "&a ",
            "*a",
            "!!binary ",
            "<<: *a",
            "0x",
            "-1",
            "1e400",
            "999999999999",
            "ms",
            "h",
            "\t",
            "#",
            "|",
            ">",
            "~",
            "null",
            "---\n",
            "...",
        ])
        .prop_map(String::from),
        vec(any::<char>(), 1..5).prop_map(String::from_iter),
    ];
    prop_oneof![
        3 => (any::<usize>(), snippet).prop_map(|(i, s)| TextMut::Insert(i, s)),
        1 => (any::<usize>(), 1usize..20).prop_map(|(i, n)| TextMut::Delete(i, n)),
        1 => any::<usize>().prop_map(TextMut::DropLine),
    ]
}

fn mutate_text(text: &str, muts: &[TextMut]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for m in muts {
        match m {
            TextMut::Insert(i, s) => {
                let at = i % (chars.len() + 1);
                chars.splice(at..at, s.chars());
            }
            TextMut::Delete(i, n) => {
                let at = i % (chars.len() + 1);
                let end = (at + n).min(chars.len());
                chars.drain(at..end);
            }
            TextMut::DropLine(i) => {
                let s: String = chars.iter().collect();
                let mut lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    lines.remove(i % n);
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

/// Mutated configs (the repo's, with env references everywhere) and hostile variable values:
/// the loader answers Ok or errors that each name a path or a message, never panics.
#[test]
fn config_loader() {
    let values = vec![
        "",
        "127.0.0.1:0",
        "x",
        "${env:A}",
        "\n",
        "a: b",
        "[",
        "99999999999999999999",
        "-5",
        "1e3",
        "0s",
        "ü",
    ];
    let env = (
        proptest::sample::select(values.clone()),
        proptest::sample::select(values),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 4_000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0xc0f1 + seed_offset()),
        ..Config::default()
    });
    let started = Instant::now();
    runner
        .run(&(vec(text_mut(), 0..6), env), |(muts, (a, b, unset))| {
            let text = mutate_text(REPO_CONFIG, &muts);
            let lookup = move |name: &str| -> Option<String> {
                match name {
                    "A" if !unset => Some(a.to_string()),
                    "B" => Some(b.to_string()),
                    n if n.starts_with("OTLP_RELAY_") || n == "MLFLOW_ENDPOINT" => (!unset).then(|| a.to_string()),
                    _ => None,
                }
            };
            if let Err(errors) = otlp_relay::config::parse_str(&text, &lookup) {
                prop_assert!(!errors.0.is_empty());
                for e in &errors.0 {
                    prop_assert!(!e.message.is_empty(), "an error without a message: {e:?}");
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!("config loader: 4000 cases in {:.1}s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// The spool's record reader: corrupted segments

/// Segments of valid records, then corrupted (bytes set, truncated, inserted): scanning never
/// panics, every record before the first damaged byte is read back, and whatever the reader
/// hands on (even a record whose payload is garbage behind a valid checksum) goes through the
/// batcher without a panic.
#[test]
fn spool_record_reader() {
    use otlp_relay::spool::frame;
    use otlp_relay::spool::proto::Record;
    let record = (vec(any::<u8>(), 0..64), 0u32..5, text()).prop_map(|(payload, spans, experiment)| Record {
        payload,
        spans,
        experiment,
        ..Default::default()
    });
    let mut runner = TestRunner::new(Config {
        cases: 20_000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5b001 + seed_offset()),
        ..Config::default()
    });
    runner
        .run(
            &(vec(record, 0..8), vec(byte_mut(), 0..3), any::<bool>()),
            |(records, muts, real_payloads)| {
                const SEED: u32 = 0x5eed;
                let mut segment = frame::file_header(SEED).to_vec();
                let mut ends = Vec::new();
                let mut before = 0u64;
                for r in &records {
                    let mut r = r.clone();
                    if real_payloads {
                        r.payload = wire::encode_record(&ResourceSpans {
                            scope_spans: vec![ScopeSpans {
                                spans: vec![Span {
                                    trace_id: vec![1; 16],
                                    span_id: vec![2; 8],
                                    ..Default::default()
                                }],
                                ..Default::default()
                            }],
                            ..Default::default()
                        })
                        .to_vec();
                    }
                    frame::encode(&r, SEED, before, &mut segment);
                    before += u64::from(r.spans);
                    ends.push(segment.len());
                }
                let clean = segment.clone();
                for m in &muts {
                    apply_bytes(&mut segment, m);
                }
                // The first byte that differs from the clean segment.
                let first_bad = clean
                    .iter()
                    .zip(&segment)
                    .position(|(a, b)| a != b)
                    .unwrap_or(clean.len().min(segment.len()));
                let intact = ends.iter().filter(|&&e| e <= first_bad).count();
                let scan = frame::scan(&segment);
                prop_assert!(scan.records.len() >= intact, "{} < {intact}", scan.records.len());
                let mut batcher: Batcher<Destination, Item> = Batcher::new(BatchSettings {
                    send_batch_size: 2,
                    send_batch_max_size: 2,
                    timeout: Duration::from_secs(1),
                });
                let now = Instant::now();
                for r in scan.records {
                    let routed = otlp_relay::spool::record_to_routed(r, Some(1));
                    if routed.item.chunk.spans > 0 {
                        drop(batcher.add(routed.destination, routed.item, now));
                    }
                }
                drop(batcher.flush());
                Ok(())
            },
        )
        .unwrap();
}
