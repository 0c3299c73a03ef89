//! Property fuzzing of the OTTL parser and evaluator (statements come from configs, but a config
//! may be generated, and `check` must answer every input): random text and mutations of real
//! statements never panic; every parse error carries a column inside the text (or just past
//! it); whatever parses and compiles runs on a span without panicking.
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use proptest::prelude::*;

use super::context::Context;
use super::eval::{self, SpanTarget, to_any};
use super::parse::{parse_condition, parse_statement};

const SEEDS: &[&str] = &[
    r#"set(attributes["mlflow.spanType"], "CHAT_MODEL") where attributes["gen_ai.operation.name"] == "chat""#,
    r#"set(attributes["n"], attributes["a"] + attributes["b"] * 2) where attributes["a"] != nil and not IsRootSpan()"#,
    r#"replace_pattern(name, "^GET /v1/(.*)$", "route $1")"#,
    r#"merge_maps(attributes, {"k": [1, 2.5, true, nil, 0x0aff]}, "upsert")"#,
    r#"keep_keys(resource.attributes, ["service.name"]) where IsMatch(resource.attributes["service.name"], "agent-.*")"#,
    r#"limit(attributes, 3, ["a"]) where Len(name) > 3 or (kind == SPAN_KIND_SERVER and status.code != STATUS_CODE_ERROR)"#,
    r#"set(spanevent.attributes["x"], Concat([span.name, String(Int("12"))], "-"))"#,
];

/// Characters OTTL uses, so random text reaches deep into the grammar, plus a few others.
const ALPHABET: &[char] = &[
    's',
    'e',
    't',
    'a',
    'n',
    'I',
    'R',
    '_',
    '.',
    '(',
    ')',
    '[',
    ']',
    '{',
    '}',
    '"',
    '\\',
    ',',
    ':',
    ' ',
    '=',
    '!',
    '<',
    '>',
    '+',
    '-',
    '*',
    '/',
    '0',
    '1',
    'x',
    'w',
    'h',
    'r',
    'é',
    '\u{1F600}',
    '\t',
    '\n',
];

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET), 0..120).prop_map(|c| c.into_iter().collect())
}

/// A real statement with a slice cut out and random text put in its place.
fn mutated() -> impl Strategy<Value = String> {
    (
        prop::sample::select(SEEDS),
        any::<prop::sample::Index>(),
        0usize..12,
        text(),
    )
        .prop_map(|(seed, at, cut, insert)| {
            let chars: Vec<char> = seed.chars().collect();
            let start = at.index(chars.len());
            let end = (start + cut).min(chars.len());
            let mut out: String = chars[..start].iter().collect();
            out.push_str(&insert);
            out.extend(&chars[end..]);
            out
        })
}

fn check_error_column(text: &str, column: usize) {
    let len = text.chars().count();
    assert!(
        column >= 1 && column <= len + 1,
        "column {column} outside {len} chars of {text:?}"
    );
}

/// Runs whatever compiles on a span with an event, in every context it compiles in.
fn run_statement(text: &str) {
    let statement = match parse_statement(text) {
        Ok(s) => s,
        Err(e) => return check_error_column(text, e.column),
    };
    for context in [Context::Resource, Context::Scope, Context::Span, Context::Spanevent] {
        let mut s = statement.clone();
        if context.rebase_statement(&mut s).is_err() {
            continue;
        }
        let Ok(compiled) = eval::compile(s) else { continue };
        let mut resource = Resource::default();
        let mut scope = InstrumentationScope::default();
        let mut span = Span {
            name: "GET /v1/models".into(),
            attributes: vec![KeyValue {
                key: "a".into(),
                value: Some(to_any(eval::Value::Int(1))),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut event = Event::default();
        let mut target = SpanTarget {
            resource: &mut resource,
            scope: &mut scope,
            span: &mut span,
            event: Some(&mut event),
        };
        let _ = compiled.execute(&mut target);
    }
}

fn run_condition(text: &str) {
    match parse_condition(text) {
        Ok(mut c) => {
            if Context::Span.rebase_condition(&mut c).is_ok()
                && let Ok((c, patterns)) = eval::compile_condition(c)
            {
                let (mut r, mut s, mut sp) = (Resource::default(), InstrumentationScope::default(), Span::default());
                let target = SpanTarget {
                    resource: &mut r,
                    scope: &mut s,
                    span: &mut sp,
                    event: None,
                };
                let _ = eval::eval_condition(&c, &target, &patterns);
            }
        }
        Err(e) => check_error_column(text, e.column),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(t in text()) {
        run_statement(&t);
        run_condition(&t);
    }

    #[test]
    fn mutated_statements_never_panic(t in mutated()) {
        run_statement(&t);
        run_condition(&t);
    }
}

#[test]
fn deep_nesting_and_long_input_are_errors_not_crashes() {
    for text in [
        format!("set(attributes[\"a\"], {}1{})", "[".repeat(4_000), "]".repeat(4_000)),
        format!("{}true{}", "(".repeat(4_000), ")".repeat(4_000)),
        format!("set(name, \"{}\")", "x".repeat(100_000)),
        "not ".repeat(3_000) + "true",
        "-".repeat(8_000) + "1 == 1",
        "1".to_string() + &" + 1".repeat(3_000) + " == 1",
    ] {
        run_statement(&text);
        run_condition(&text);
        assert!(parse_condition(&text).is_err() || parse_statement(&text).is_err());
    }
}
