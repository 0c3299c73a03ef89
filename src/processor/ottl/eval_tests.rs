//! The evaluator's unit tests: the statements MLflow users write, on real-shaped spans.
use super::super::parse::{parse_condition, parse_statement};
use super::*;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(to_any(value)),
        ..Default::default()
    }
}

fn s(text: &str) -> Value {
    Value::Str(text.into())
}

struct Fixture {
    resource: Resource,
    scope: InstrumentationScope,
    span: Span,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            resource: Resource {
                attributes: vec![kv("service.name", s("unknown_service"))],
                ..Default::default()
            },
            scope: InstrumentationScope {
                name: "openinference".into(),
                ..Default::default()
            },
            span: Span {
                name: "ChatOpenAI".into(),
                kind: 3,
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                parent_span_id: vec![3; 8],
                start_time_unix_nano: 1_000,
                end_time_unix_nano: 5_000,
                attributes: vec![
                    kv("gen_ai.operation.name", s("chat")),
                    kv("gen_ai.usage.input_tokens", Value::Int(12)),
                    kv("gen_ai.usage.output_tokens", Value::Int(30)),
                    kv("user.email", s("a@example.com")),
                ],
                ..Default::default()
            },
        }
    }

    fn target(&mut self) -> SpanTarget<'_> {
        SpanTarget {
            resource: &mut self.resource,
            scope: &mut self.scope,
            span: &mut self.span,
            event: None,
        }
    }

    fn run(&mut self, statement: &str) -> Result<bool, EvalError> {
        let compiled = compile(parse_statement(statement).unwrap()).unwrap();
        compiled.execute(&mut self.target())
    }

    fn holds(&mut self, condition: &str) -> bool {
        let (condition, patterns) = compile_condition(parse_condition(condition).unwrap()).unwrap();
        eval_condition(&condition, &self.target(), &patterns).unwrap()
    }

    fn attr(&self, key: &str) -> Value {
        from_any(
            self.span
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.as_ref()),
        )
    }
}

/// The edits the issue's MLflow users make, each on a real-shaped span.
#[test]
fn mlflow_users_statements_do_what_they_say() {
    let mut f = Fixture::new();
    assert!(
        f.run(
            r#"set(attributes["mlflow.spanType"], "CHAT_MODEL") where attributes["gen_ai.operation.name"] == "chat""#
        )
        .unwrap()
    );
    assert_eq!(f.attr("mlflow.spanType"), s("CHAT_MODEL"));
    assert!(
        !f.run(
            r#"set(attributes["mlflow.spanType"], "TOOL") where attributes["gen_ai.operation.name"] == "execute_tool""#
        )
        .unwrap()
    );
    assert_eq!(f.attr("mlflow.spanType"), s("CHAT_MODEL"));

    f.run(r#"set(attributes["llm.token_count.total"], attributes["gen_ai.usage.input_tokens"] + attributes["gen_ai.usage.output_tokens"]) where attributes["gen_ai.usage.input_tokens"] != nil"#).unwrap();
    assert_eq!(f.attr("llm.token_count.total"), Value::Int(42));

    f.run(r#"set(attributes["llm.model"], attributes["gen_ai.request.model"]) where attributes["gen_ai.request.model"] != nil"#).unwrap();
    assert_eq!(f.attr("llm.model"), Value::Nil, "a missing source is not copied");

    f.run(r#"set(resource.attributes["service.name"], "support-agent") where resource.attributes["service.name"] == "unknown_service""#).unwrap();
    assert_eq!(from_any(f.resource.attributes[0].value.as_ref()), s("support-agent"));

    f.run(r#"set(attributes["user.email"], SHA256(attributes["user.email"]))"#)
        .unwrap();
    assert_eq!(
        f.attr("user.email"),
        s("08168cd80dfd534ab0f10af10f1303fe00af2d43ab5c1432360d137f8197e17a")
    );

    assert!(f.holds(
        r#"not IsRootSpan() and kind == SPAN_KIND_CLIENT and end_time_unix_nano - start_time_unix_nano >= 4000"#
    ));
    f.span.parent_span_id.clear();
    assert!(f.holds("IsRootSpan()"));
    f.span.name = "GET /v1/models".into();
    assert!(f.holds(r#"name == "GET /v1/models" or IsMatch(name, "^GET /health")"#));
}

#[test]
fn map_editors() {
    let mut f = Fixture::new();
    f.run(r#"delete_key(attributes, "user.email")"#).unwrap();
    assert_eq!(f.attr("user.email"), Value::Nil);
    f.run(r#"delete_matching_keys(attributes, "^gen_ai\\.usage\\.")"#)
        .unwrap();
    let keys: Vec<&str> = f.span.attributes.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["gen_ai.operation.name"]);

    let mut f = Fixture::new();
    f.run(r#"keep_keys(attributes, ["user.email", "absent"])"#).unwrap();
    assert_eq!(f.span.attributes.len(), 1);

    let mut f = Fixture::new();
    f.run(r#"limit(attributes, 2, ["user.email"])"#).unwrap();
    let keys: Vec<&str> = f.span.attributes.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["gen_ai.operation.name", "user.email"]);

    let mut f = Fixture::new();
    f.run(r#"truncate_all(attributes, 2)"#).unwrap();
    assert_eq!(f.attr("user.email"), s("a@"));
    assert_eq!(
        f.attr("gen_ai.usage.input_tokens"),
        Value::Int(12),
        "only strings are cut"
    );
    f.span.attributes.push(kv("multi", s("héllo")));
    f.run(r#"truncate_all(attributes, 2)"#).unwrap();
    assert_eq!(f.attr("multi"), s("h"), "never inside a character");

    let mut f = Fixture::new();
    f.run(r#"replace_all_patterns(attributes, "value", "@.*$", "@redacted")"#)
        .unwrap();
    assert_eq!(f.attr("user.email"), s("a@redacted"));
    f.run(r#"replace_all_patterns(attributes, "key", "^gen_ai\\.", "genai.")"#)
        .unwrap();
    assert_eq!(f.attr("genai.operation.name"), s("chat"));
    f.run(r#"replace_pattern(name, "^Chat(.*)$", "llm.$1")"#).unwrap();
    assert_eq!(f.span.name, "llm.OpenAI");

    let mut f = Fixture::new();
    f.run(r#"merge_maps(attributes, {"user.email": "x", "new": 1}, "insert")"#)
        .unwrap();
    assert_eq!(
        (f.attr("user.email"), f.attr("new")),
        (s("a@example.com"), Value::Int(1))
    );
    f.run(r#"merge_maps(attributes, {"user.email": "x", "other": 1}, "update")"#)
        .unwrap();
    assert_eq!((f.attr("user.email"), f.attr("other")), (s("x"), Value::Nil));

    // Nested keys reach into kvlists, creating them when setting.
    f.run(r#"set(attributes["a"]["b"], 7)"#).unwrap();
    assert!(f.holds(r#"attributes["a"]["b"] == 7"#));
    f.run(r#"delete_key(attributes["a"], "b")"#).unwrap();
    assert!(f.holds(r#"attributes["a"]["b"] == nil"#));
}

#[test]
fn fields_and_converters() {
    let mut f = Fixture::new();
    f.run(r#"set(status.code, STATUS_CODE_ERROR) where kind == 3"#).unwrap();
    f.run(r#"set(status.message, Concat(["failed", name, 3, true], ": "))"#)
        .unwrap();
    let status = f.span.status.clone().unwrap();
    assert_eq!(
        (status.code, status.message.as_str()),
        (2, "failed: ChatOpenAI: 3: true")
    );
    f.run(r#"set(name, String(Len(name)))"#).unwrap();
    assert_eq!(f.span.name, "10");
    f.run(r#"set(attributes["i"], Int("42"))"#).unwrap();
    f.run(r#"set(attributes["d"], Double(attributes["i"]) / 8.0)"#).unwrap();
    assert_eq!((f.attr("i"), f.attr("d")), (Value::Int(42), Value::Double(5.25)));
    f.run(r#"set(attributes["bad"], Int("x"))"#).unwrap();
    assert_eq!(
        f.attr("bad"),
        Value::Nil,
        "a failed conversion is nil, and set ignores nil"
    );
    f.run(r#"set(scope.name, "mlflow")"#).unwrap();
    assert_eq!(f.scope.name, "mlflow");
    assert!(f.holds(r#"span_id == 0x0202020202020202 and trace_id != nil"#));
}

#[test]
fn comparisons_follow_the_collector_table() {
    let mut f = Fixture::new();
    for (condition, expected) in [
        ("1 == 1.0", true),
        ("2 > 1.5", true),
        (r#""a" < "b""#, true),
        (r#"1 == "1""#, false),
        (r#"1 != "1""#, true),
        (r#"1 < "2""#, false),
        ("nil == nil", true),
        ("true > false", true),
        (r#"attributes["absent"] == nil"#, true),
        (r#"attributes["absent"] != "x""#, true),
        ("[1, 2] == [1, 2]", true),
        ("[1, 2] < [1, 3]", false),
    ] {
        assert_eq!(f.holds(condition), expected, "{condition}");
    }
}

/// Comparisons decided in place (a path against a string or nil) give what the general table
/// gives on copied values, for every kind of value an attribute or string field holds.
#[test]
fn comparisons_in_place_agree_with_the_table() {
    let mut f = Fixture::new();
    let empty_bytes = KeyValue {
        key: "empty_bytes".into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::BytesValue(Vec::new())),
        }),
        ..Default::default()
    };
    let no_value = KeyValue {
        key: "no_value".into(),
        value: Some(AnyValue { value: None }),
        ..Default::default()
    };
    f.span.attributes.extend([
        kv("str", s("chat")),
        kv("empty", s("")),
        kv("int", Value::Int(1)),
        kv("bool", Value::Bool(true)),
        kv("list", Value::List(vec![s("chat")])),
        kv("bytes", Value::Bytes(vec![1])),
        empty_bytes,
        no_value,
    ]);
    f.span.status = Some(Status {
        message: "chat".into(),
        ..Default::default()
    });
    let paths = [
        "attributes[\"str\"]",
        "attributes[\"empty\"]",
        "attributes[\"int\"]",
        "attributes[\"bool\"]",
        "attributes[\"list\"]",
        "attributes[\"bytes\"]",
        "attributes[\"empty_bytes\"]",
        "attributes[\"no_value\"]",
        "attributes[\"absent\"]",
        "resource.attributes[\"service.name\"]",
        "name",
        "trace_state",
        "status.message",
        "instrumentation_scope.name",
        "instrumentation_scope.version",
    ];
    for path in paths {
        for literal in ["\"chat\"", "\"\"", "\"ChatOpenAI\"", "nil"] {
            for op in ["==", "!="] {
                for text in [format!("{path} {op} {literal}"), format!("{literal} {op} {path}")] {
                    let (condition, _) = compile_condition(parse_condition(&text).unwrap()).unwrap();
                    let Condition::Compare(left, op, right) = &condition else {
                        panic!("{text}: not a comparison");
                    };
                    let target = f.target();
                    let table = compare(
                        &eval(left, &target, &Patterns::new()).unwrap(),
                        *op,
                        &eval(right, &target, &Patterns::new()).unwrap(),
                    );
                    let in_place = compare_in_place(left, *op, right, &target);
                    assert!(in_place.is_some(), "{text}: decided in place");
                    assert_eq!(in_place, Some(table), "{text}");
                }
            }
        }
    }
}

#[test]
fn runtime_errors_are_errors_not_panics() {
    let mut f = Fixture::new();
    assert_eq!(f.run("set(attributes[\"x\"], 1 / 0)"), Err(EvalError::DivisionByZero));
    assert!(matches!(
        f.run(r#"set(attributes["x"], 1 + 1.5)"#),
        Err(EvalError::Type(_))
    ));
    assert!(matches!(
        f.run("set(attributes[\"x\"], 9223372036854775807 + 1)"),
        Err(EvalError::Type(_))
    ));
    assert!(matches!(f.run(r#"set(trace_id, 0x01)"#), Err(EvalError::ReadOnly(_))));
    assert!(matches!(f.run(r#"set(name, 1)"#), Err(EvalError::Type(_))));
    assert!(matches!(
        f.run(r#"truncate_all(attributes, -1)"#),
        Err(EvalError::Type(_))
    ));
    assert_eq!(f.span.name, "ChatOpenAI");
}

#[test]
fn compile_errors_name_the_problem() {
    for (statement, words) in [
        (r#"sett(name, "x")"#, "unknown editor \"sett\""),
        (r#"set(name)"#, "takes 2 arguments"),
        (r#"set(attributes["x"], Concat2(["a"], ""))"#, "unknown converter"),
        (r#"set(nmae, "x")"#, "unknown path \"nmae\""),
        (r#"set(name["k"], "x")"#, "cannot be indexed"),
        (r#"set(kind, SPAN_KIND_SERVRE)"#, "unknown enum"),
        (r#"delete_matching_keys(attributes, "(")"#, "invalid pattern"),
        (r#"set(name, "x") where IsMatch(name, "[")"#, "invalid pattern"),
        (r#"merge_maps(attributes, {}, "replace")"#, "strategy"),
    ] {
        let e = compile(parse_statement(statement).unwrap()).unwrap_err();
        assert!(e.0.contains(words), "{statement}: {e}");
    }
}

proptest::proptest! {
    /// Statements assembled from the grammar's pieces, valid or not: parsing, compiling and
    /// running them either works or returns an error; nothing panics or overflows.
    #[test]
    fn generated_statements_never_panic(
        editor in proptest::sample::select(vec!["set", "delete_key", "keep_keys", "truncate_all", "limit", "merge_maps", "replace_pattern", "delete_matching_keys", "replace_all_patterns"]),
        args in proptest::collection::vec(proptest::sample::select(vec![
            "name", "attributes", r#"attributes["user.email"]"#, r#"attributes["a"]["b"]"#, "resource.attributes",
            r#""x""#, r#""^.*$""#, r#""key""#, r#""upsert""#, "0", "-1", "9223372036854775807", "1.5", "nil", "true",
            r#"["a", 1]"#, r#"{"k": [1]}"#, "kind", "status.code", "trace_id", "0xff", "SPAN_KIND_SERVER",
            r#"Concat([name, 1], "-")"#, "Int(name)", "Len(attributes)", "1 / 0", "name + 1", r#"Split(name, "/")"#,
        ]), 0..5),
        condition in proptest::option::of(proptest::sample::select(vec![
            "IsRootSpan()", r#"name == "ChatOpenAI""#, "kind > 1.5", r#"attributes["x"] != nil and not true"#,
            "end_time_unix_nano - start_time_unix_nano > 0", r#"IsMatch(attributes["user.email"], "@")"#, "String(1) < 2",
        ])),
    ) {
        let text = match condition {
            Some(c) => format!("{editor}({}) where {c}", args.join(", ")),
            None => format!("{editor}({})", args.join(", ")),
        };
        if let Ok(statement) = parse_statement(&text)
            && let Ok(compiled) = compile(statement)
        {
            let mut f = Fixture::new();
            let _ = compiled.execute(&mut f.target());
        }
    }
}

/// `Concat` with a literal delimiter reads strings in place; with any other delimiter it takes
/// the general path. Both give the same for items of every kind: string, number, bool, bytes,
/// empty bytes, absent and unset attributes, string and number fields, literals, nested keys.
#[test]
fn concat_in_place_is_concat() {
    let mut f = Fixture::new();
    f.span.attributes.extend([
        kv("b", Value::Bytes(vec![0xab, 1])),
        kv("e", Value::Bytes(Vec::new())),
        kv("t", Value::Bool(true)),
        kv("d", Value::Double(1.5)),
        kv("m", Value::Map(vec![("n".into(), s("v"))])),
        KeyValue {
            key: "unset".into(),
            ..Default::default()
        },
    ]);
    f.span.status = Some(Status {
        message: "oops".into(),
        code: 2,
    });
    let items = [
        r#"attributes["gen_ai.operation.name"]"#,
        r#"attributes["gen_ai.usage.input_tokens"]"#,
        r#"attributes["b"]"#,
        r#"attributes["e"]"#,
        r#"attributes["t"]"#,
        r#"attributes["d"]"#,
        r#"attributes["m"]"#,
        r#"attributes["m"]["n"]"#,
        r#"attributes["unset"]"#,
        r#"attributes["missing"]"#,
        r#"resource.attributes["service.name"]"#,
        "name",
        "kind",
        "span_id",
        "status.message",
        "status.code",
        "instrumentation_scope.name",
        r#""lit""#,
        "7",
        "Len(name)",
    ];
    for (i, first) in items.iter().enumerate() {
        for second in items.iter().skip(i) {
            let list = format!("[{first}, {second}, name]");
            f.run(&format!(r#"set(attributes["fast"], Concat({list}, "/"))"#))
                .unwrap();
            f.run(&format!(r#"set(attributes["slow"], Concat({list}, String("/")))"#))
                .unwrap();
            assert_eq!(f.attr("fast"), f.attr("slow"), "{list}");
        }
    }
    assert_eq!(f.attr("fast"), s("10/10/ChatOpenAI"));
    f.run(r#"set(attributes["fast"], Concat([attributes["b"], attributes["missing"]], ""))"#)
        .unwrap();
    assert_eq!(f.attr("fast"), s("ab01"));
}
