//! The OTTL grammar on winnow (a maintained parser-combinator crate): statements and conditions
//! into the syntax tree of `super`. Errors name the column and what was expected there; no input
//! panics or recurses without bound (nesting is checked before parsing).
use winnow::ModalResult;
use winnow::combinator::{alt, cut_err, delimited, eof, not, opt, preceded, repeat, separated, terminated};
use winnow::error::{ContextError, ErrMode, StrContext, StrContextValue};
use winnow::prelude::*;
use winnow::token::{literal, one_of, take_while};

use super::{Arg, Call, CompareOp, Condition, Expr, Field, Key, MathOp, Path, Statement};

/// Brackets nest at most this deep, so neither the parser nor the evaluator can exhaust the stack.
const MAX_NESTING: usize = 32;
/// A statement longer than this is refused before parsing (real ones are a line or two).
const MAX_LEN: usize = 16 * 1024;

const KEYWORDS: &[&str] = &["where", "and", "or", "not", "true", "false", "nil"];

/// A statement or condition that is not OTTL; `column` is 1-based, in characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub(crate) struct ParseError {
    pub(crate) column: usize,
    pub(crate) message: String,
}

pub(crate) fn parse_statement(text: &str) -> Result<Statement, ParseError> {
    parse_all(text, statement)
}

pub(crate) fn parse_condition(text: &str) -> Result<Condition, ParseError> {
    parse_all(text, condition)
}

fn parse_all<T>(text: &str, mut rule: impl FnMut(&mut &str) -> ModalResult<T>) -> Result<T, ParseError> {
    check_size(text)?;
    let mut whole = terminated(&mut rule, (ws, eof.context(expected("the end, or an operator"))));
    whole.parse(text).map_err(|e| ParseError {
        column: column_of(text, e.offset()),
        message: describe(e.inner()),
    })
}

/// The innermost expectation (the outer ones only repeat what contains it) and the cause.
fn describe(error: &ContextError) -> String {
    let mut message = match error.context().next() {
        Some(StrContext::Expected(what)) => format!("expected {what}"),
        Some(other) => other.to_string(),
        None => "not valid OTTL here".into(),
    };
    if let Some(cause) = error.cause() {
        message.push_str(&format!(" ({cause})"));
    }
    message
}

/// `item, item, ...` up to `close`: once the list is not empty, every item is required, so an
/// error points at the item, not at the list's start.
fn items<'a, O>(
    mut item: impl Parser<&'a str, O, ErrMode<ContextError>>,
    close: &'static str,
) -> impl Parser<&'a str, Vec<O>, ErrMode<ContextError>> {
    move |i: &mut &'a str| {
        if opt(sym(close)).parse_next(i)?.is_some() {
            return Ok(Vec::new());
        }
        let found: Vec<O> = separated(1.., cut_err(|i: &mut &'a str| item.parse_next(i)), sym(",")).parse_next(i)?;
        cut_err(sym(close)).parse_next(i)?;
        Ok(found)
    }
}

fn column_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(offset, |before| before.chars().count()) + 1
}

/// Length and bracket depth, checked by a scan that skips string literals.
fn check_size(text: &str) -> Result<(), ParseError> {
    if text.len() > MAX_LEN {
        return Err(ParseError {
            column: 1,
            message: format!("longer than {MAX_LEN} bytes"),
        });
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(ParseError {
                        column: column_of(text, offset),
                        message: format!("brackets nest deeper than {MAX_NESTING} levels"),
                    });
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn expected(what: &'static str) -> StrContext {
    StrContext::Expected(StrContextValue::Description(what))
}

fn ws(i: &mut &str) -> ModalResult<()> {
    take_while(0.., char::is_whitespace).void().parse_next(i)
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A punctuation token after optional whitespace.
fn sym<'a>(token: &'static str) -> impl Parser<&'a str, &'a str, ErrMode<ContextError>> {
    preceded(ws, literal(token)).context(StrContext::Expected(StrContextValue::StringLiteral(token)))
}

/// A keyword: the word, not the start of a longer identifier (`order` is not `or`).
fn keyword<'a>(word: &'static str) -> impl Parser<&'a str, &'a str, ErrMode<ContextError>> {
    preceded(ws, terminated(literal(word), not(one_of(is_ident_char))))
}

fn lower_ident<'a>(i: &mut &'a str) -> ModalResult<&'a str> {
    preceded(
        ws,
        (one_of(|c: char| c.is_ascii_lowercase()), take_while(0.., is_ident_char)).take(),
    )
    .verify(|name: &str| !KEYWORDS.contains(&name))
    .parse_next(i)
}

fn upper_ident<'a>(i: &mut &'a str) -> ModalResult<&'a str> {
    preceded(
        ws,
        (one_of(|c: char| c.is_ascii_uppercase()), take_while(0.., is_ident_char)).take(),
    )
    .parse_next(i)
}

fn statement(i: &mut &str) -> ModalResult<Statement> {
    let name = lower_ident
        .context(expected("an editor, e.g. set(...)"))
        .parse_next(i)?;
    let args = cut_err(arguments).parse_next(i)?;
    let condition = opt(preceded(keyword("where"), cut_err(condition))).parse_next(i)?;
    Ok(Statement {
        editor: Call {
            name: name.to_string(),
            args,
            keys: Vec::new(),
        },
        condition,
    })
}

/// `( arg, name = arg, ... )`
fn arguments(i: &mut &str) -> ModalResult<Vec<Arg>> {
    sym("(").parse_next(i)?;
    items(argument, ")").parse_next(i)
}

fn argument(i: &mut &str) -> ModalResult<Arg> {
    let name = opt(terminated(lower_ident, (sym("="), not(literal("="))))).parse_next(i)?;
    let value = match name {
        Some(_) => cut_err(value.context(expected("a value after `=`"))).parse_next(i)?,
        None => value.parse_next(i)?,
    };
    Ok(Arg {
        name: name.map(str::to_string),
        value,
    })
}

/// A value with arithmetic: `*` and `/` bind tighter than `+` and `-`, left to right.
fn value(i: &mut &str) -> ModalResult<Expr> {
    let first = product.parse_next(i)?;
    repeat(0.., (preceded(ws, one_of(['+', '-'])), cut_err(product)))
        .fold(
            move || first.clone(),
            |left, (op, right)| {
                let op = if op == '+' { MathOp::Add } else { MathOp::Sub };
                Expr::Math(Box::new(left), op, Box::new(right))
            },
        )
        .parse_next(i)
}

fn product(i: &mut &str) -> ModalResult<Expr> {
    let first = factor.parse_next(i)?;
    repeat(0.., (preceded(ws, one_of(['*', '/'])), cut_err(factor)))
        .fold(
            move || first.clone(),
            |left, (op, right)| {
                let op = if op == '*' { MathOp::Mul } else { MathOp::Div };
                Expr::Math(Box::new(left), op, Box::new(right))
            },
        )
        .parse_next(i)
}

/// Parentheses here are arithmetic grouping; they do not commit (`(a == b)` is a condition's).
fn factor(i: &mut &str) -> ModalResult<Expr> {
    alt((delimited(sym("("), value, sym(")")), atom)).parse_next(i)
}

fn atom(i: &mut &str) -> ModalResult<Expr> {
    alt((
        string.map(Expr::Str),
        bytes.map(Expr::Bytes),
        number,
        literal_word,
        list,
        map,
        upper_value,
        path.map(Expr::Path),
    ))
    .context(expected("a value (string, number, path, converter, list or map)"))
    .parse_next(i)
}

fn literal_word(i: &mut &str) -> ModalResult<Expr> {
    alt((
        keyword("true").value(Expr::Bool(true)),
        keyword("false").value(Expr::Bool(false)),
        keyword("nil").value(Expr::Nil),
    ))
    .parse_next(i)
}

fn string(i: &mut &str) -> ModalResult<String> {
    preceded(ws, '"').parse_next(i)?;
    cut_err(terminated(
        repeat(0.., string_piece).fold(String::new, |mut s, piece: StringPiece<'_>| {
            match piece {
                StringPiece::Text(t) => s.push_str(t),
                StringPiece::Char(c) => s.push(c),
            }
            s
        }),
        '"'.context(expected("a closing `\"`")),
    ))
    .parse_next(i)
}

enum StringPiece<'a> {
    Text(&'a str),
    Char(char),
}

fn string_piece<'a>(i: &mut &'a str) -> ModalResult<StringPiece<'a>> {
    alt((
        take_while(1.., |c: char| c != '"' && c != '\\').map(StringPiece::Text),
        preceded(
            '\\',
            cut_err(
                alt((
                    '"'.value('"'),
                    '\\'.value('\\'),
                    '/'.value('/'),
                    'n'.value('\n'),
                    't'.value('\t'),
                    'r'.value('\r'),
                ))
                .context(expected("an escape: \\\" \\\\ \\/ \\n \\t \\r")),
            ),
        )
        .map(StringPiece::Char),
    ))
    .parse_next(i)
}

fn bytes(i: &mut &str) -> ModalResult<Vec<u8>> {
    preceded(ws, "0x").parse_next(i)?;
    cut_err(
        take_while(1.., |c: char| c.is_ascii_hexdigit())
            .try_map(const_hex::decode)
            .context(expected("an even number of hex digits")),
    )
    .parse_next(i)
}

/// `1`, `-1`, `+2`, `1.5`, `-.5`, `2e3`: an int unless it has a point or an exponent.
fn number(i: &mut &str) -> ModalResult<Expr> {
    let text = preceded(
        ws,
        (
            opt(one_of(['+', '-'])),
            alt((
                (
                    take_while(1.., |c: char| c.is_ascii_digit()),
                    opt(('.', take_while(0.., |c: char| c.is_ascii_digit()))),
                )
                    .void(),
                ('.', take_while(1.., |c: char| c.is_ascii_digit())).void(),
            )),
            opt((
                one_of(['e', 'E']),
                opt(one_of(['+', '-'])),
                take_while(1.., |c: char| c.is_ascii_digit()),
            )),
        )
            .take(),
    )
    .parse_next(i)?;
    // `1abc` is neither a number nor a path.
    not(one_of(is_ident_char)).parse_next(i)?;
    if text.contains(['.', 'e', 'E']) {
        let v: f64 = cut_err(winnow::combinator::empty.try_map(|()| text.parse::<f64>()))
            .context(expected("a number"))
            .parse_next(i)?;
        Ok(Expr::Float(v))
    } else {
        let v: i64 = cut_err(winnow::combinator::empty.try_map(|()| text.trim_start_matches('+').parse::<i64>()))
            .context(expected("an integer within 64 bits"))
            .parse_next(i)?;
        Ok(Expr::Int(v))
    }
}

fn list(i: &mut &str) -> ModalResult<Expr> {
    sym("[").parse_next(i)?;
    items(value, "]").map(Expr::List).parse_next(i)
}

fn map(i: &mut &str) -> ModalResult<Expr> {
    sym("{").parse_next(i)?;
    let entry = (
        string.context(expected("a string key")),
        preceded(cut_err(sym(":")), cut_err(value)),
    );
    items(entry, "}").map(Expr::Map).parse_next(i)
}

/// An uppercase name: a converter when followed by `(`, else an enum.
fn upper_value(i: &mut &str) -> ModalResult<Expr> {
    let name = upper_ident.parse_next(i)?;
    if opt((ws, literal("("))).parse_next(i)?.is_none() {
        return Ok(Expr::Enum(name.to_string()));
    }
    let args = items(argument, ")").parse_next(i)?;
    let keys = keys.parse_next(i)?;
    Ok(Expr::Converter(Call {
        name: name.to_string(),
        args,
        keys,
    }))
}

fn keys(i: &mut &str) -> ModalResult<Vec<Key>> {
    repeat(0.., key).parse_next(i)
}

fn key(i: &mut &str) -> ModalResult<Key> {
    sym("[").parse_next(i)?;
    cut_err(terminated(
        alt((
            string.map(Key::Str),
            number.verify_map(|n| match n {
                Expr::Int(n) => Some(Key::Int(n)),
                _ => None,
            }),
        ))
        .context(expected("a string or integer key")),
        sym("]"),
    ))
    .parse_next(i)
}

fn path(i: &mut &str) -> ModalResult<Path> {
    let fields: Vec<Field> = separated(
        1..,
        (lower_ident, keys).map(|(name, keys)| Field {
            name: name.to_string(),
            keys,
        }),
        literal("."),
    )
    .parse_next(i)?;
    // `set(...)` inside a value: only converters (uppercase) return values.
    cut_err(not((ws, literal("("))))
        .context(expected(
            "a converter (functions used as values start with an uppercase letter)",
        ))
        .parse_next(i)?;
    Ok(Path { fields, place: None })
}

fn condition(i: &mut &str) -> ModalResult<Condition> {
    let terms: Vec<Condition> = separated(1.., conjunction, keyword("or")).parse_next(i)?;
    Ok(flatten(terms, Condition::Or))
}

fn conjunction(i: &mut &str) -> ModalResult<Condition> {
    let terms: Vec<Condition> = separated(1.., negation, keyword("and")).parse_next(i)?;
    Ok(flatten(terms, Condition::And))
}

fn flatten(mut terms: Vec<Condition>, join: fn(Vec<Condition>) -> Condition) -> Condition {
    if terms.len() == 1 { terms.remove(0) } else { join(terms) }
}

/// `not` chains are counted, not recursed, so `not not ... x` cannot exhaust the stack.
fn negation(i: &mut &str) -> ModalResult<Condition> {
    let nots: usize = repeat(0.., keyword("not")).parse_next(i)?;
    let inner = if nots > 0 {
        cut_err(primary).parse_next(i)?
    } else {
        primary.parse_next(i)?
    };
    Ok(if nots % 2 == 1 {
        Condition::Not(Box::new(inner))
    } else {
        inner
    })
}

fn primary(i: &mut &str) -> ModalResult<Condition> {
    alt((
        comparison,
        delimited(sym("("), condition, cut_err(sym(")"))),
        keyword("true").value(Condition::Const(true)),
        keyword("false").value(Condition::Const(false)),
        upper_value.verify_map(|v| match v {
            Expr::Converter(call) => Some(Condition::Converter(call)),
            _ => None,
        }),
    ))
    .context(expected("a condition (a comparison, true, false or a converter)"))
    .parse_next(i)
}

fn comparison(i: &mut &str) -> ModalResult<Condition> {
    let left = value.parse_next(i)?;
    let op = compare_op.parse_next(i)?;
    let right = cut_err(value).parse_next(i)?;
    Ok(Condition::Compare(left, op, right))
}

fn compare_op(i: &mut &str) -> ModalResult<CompareOp> {
    preceded(
        ws,
        alt((
            "==".value(CompareOp::Eq),
            "!=".value(CompareOp::Ne),
            "<=".value(CompareOp::Le),
            ">=".value(CompareOp::Ge),
            "<".value(CompareOp::Lt),
            ">".value(CompareOp::Gt),
        )),
    )
    .parse_next(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path(fields: &[&str]) -> Expr {
        Expr::Path(Path {
            fields: fields
                .iter()
                .map(|f| Field {
                    name: (*f).into(),
                    keys: Vec::new(),
                })
                .collect(),
            place: None,
        })
    }

    fn attr(scope: Option<&str>, key: &str) -> Expr {
        let mut fields: Vec<Field> = scope
            .map(|s| Field {
                name: s.into(),
                keys: Vec::new(),
            })
            .into_iter()
            .collect();
        fields.push(Field {
            name: "attributes".into(),
            keys: vec![Key::Str(key.into())],
        });
        Expr::Path(Path { fields, place: None })
    }

    fn arg(value: Expr) -> Arg {
        Arg { name: None, value }
    }

    /// The statements MLflow users write, from the configs the issue surveyed.
    #[test]
    fn real_world_statements_parse() {
        let s = parse_statement(
            r#"set(attributes["mlflow.spanType"], "LLM") where attributes["gen_ai.operation.name"] == "chat""#,
        )
        .unwrap();
        assert_eq!(s.editor.name, "set");
        assert_eq!(
            s.editor.args,
            vec![arg(attr(None, "mlflow.spanType")), arg(Expr::Str("LLM".into()))]
        );
        assert_eq!(
            s.condition,
            Some(Condition::Compare(
                attr(None, "gen_ai.operation.name"),
                CompareOp::Eq,
                Expr::Str("chat".into())
            ))
        );

        let s = parse_statement(r#"set(resource.attributes["service.name"], "agent")"#).unwrap();
        assert_eq!(s.editor.args[0], arg(attr(Some("resource"), "service.name")));
        assert_eq!(s.condition, None);

        let s = parse_statement(
            r#"set(attributes["llm.token_count.total"], attributes["gen_ai.usage.input_tokens"] + attributes["gen_ai.usage.output_tokens"]) where attributes["gen_ai.usage.input_tokens"] != nil and attributes["gen_ai.usage.output_tokens"] != nil"#,
        )
        .unwrap();
        assert!(matches!(s.editor.args[1].value, Expr::Math(_, MathOp::Add, _)));
        assert!(matches!(s.condition, Some(Condition::And(ref v)) if v.len() == 2));

        let s = parse_statement(r#"replace_pattern(name, "^GET /users/[0-9]+", "GET /users/{id}")"#).unwrap();
        assert_eq!(s.editor.args[0], arg(path(&["name"])));

        let s = parse_statement(r#"truncate_all(attributes, 4096)"#).unwrap();
        assert_eq!(s.editor.args[1], arg(Expr::Int(4096)));

        let s = parse_statement(r#"keep_keys(attributes, ["a", "b"]) where IsRootSpan()"#).unwrap();
        assert_eq!(
            s.editor.args[1],
            arg(Expr::List(vec![Expr::Str("a".into()), Expr::Str("b".into())]))
        );
        assert_eq!(
            s.condition,
            Some(Condition::Converter(Call {
                name: "IsRootSpan".into(),
                args: Vec::new(),
                keys: Vec::new()
            }))
        );

        let s = parse_statement(r#"merge_maps(attributes, {"a": 1, "b": {"c": -0.5}}, "upsert")"#).unwrap();
        assert_eq!(
            s.editor.args[1],
            arg(Expr::Map(vec![
                ("a".into(), Expr::Int(1)),
                ("b".into(), Expr::Map(vec![("c".into(), Expr::Float(-0.5))]))
            ]))
        );

        let s = parse_statement(
            r#"set(attributes["h"], SHA256(attributes["user.email"])) where attributes["user.email"] != nil"#,
        )
        .unwrap();
        assert!(matches!(&s.editor.args[1].value, Expr::Converter(c) if c.name == "SHA256"));

        let s = parse_statement(r#"set(attributes["first"], Split(name, "/")[0])"#).unwrap();
        assert!(matches!(&s.editor.args[1].value, Expr::Converter(c) if c.keys == vec![Key::Int(0)]));

        let s = parse_statement(r#"delete_matching_keys(attributes, pattern = "^internal\\.")"#).unwrap();
        assert_eq!(s.editor.args[1].name.as_deref(), Some("pattern"));
        assert_eq!(s.editor.args[1].value, Expr::Str("^internal\\.".into()));

        let s = parse_statement(r#"set(status.code, STATUS_CODE_ERROR) where kind == SPAN_KIND_SERVER and end_time_unix_nano - start_time_unix_nano > 1000000000"#).unwrap();
        assert_eq!(s.editor.args[1], arg(Expr::Enum("STATUS_CODE_ERROR".into())));
    }

    #[test]
    fn conditions_follow_the_precedence_rules() {
        // not binds tighter than and, and tighter than or.
        let c = parse_condition(r#"not name == "a" and kind == 2 or IsRootSpan()"#).unwrap();
        let Condition::Or(terms) = c else { panic!("{c:?}") };
        assert!(matches!(&terms[0], Condition::And(v) if matches!(v[0], Condition::Not(_))));
        assert!(matches!(&terms[1], Condition::Converter(_)));
        // Parentheses group conditions and arithmetic alike.
        let c = parse_condition(r#"(name == "a" or name == "b") and (1 + 2) * 3 == 9"#).unwrap();
        let Condition::And(terms) = c else { panic!("{c:?}") };
        assert!(matches!(terms[0], Condition::Or(_)));
        let Condition::Compare(Expr::Math(left, MathOp::Mul, _), CompareOp::Eq, _) = &terms[1] else {
            panic!("{:?}", terms[1])
        };
        assert!(matches!(**left, Expr::Math(_, MathOp::Add, _)));
        // Keywords are whole words: `order` and `nothing` are paths.
        let c = parse_condition(r#"order == nothing"#).unwrap();
        assert_eq!(
            c,
            Condition::Compare(path(&["order"]), CompareOp::Eq, path(&["nothing"]))
        );
        assert_eq!(parse_condition("not not true").unwrap(), Condition::Const(true));
        assert_eq!(
            parse_condition("1 - -2 >= 0x00ff").unwrap(),
            Condition::Compare(
                Expr::Math(Box::new(Expr::Int(1)), MathOp::Sub, Box::new(Expr::Int(-2))),
                CompareOp::Ge,
                Expr::Bytes(vec![0, 255])
            )
        );
    }

    #[test]
    fn errors_name_the_column_and_what_was_expected() {
        let cases: &[(&str, usize, &str)] = &[
            (r#"set(name, "x") wher name == "a""#, 16, "end"),
            (r#"set(name, "x"#, 13, "closing"),
            (r#"set(attributes["k"], )"#, 22, "value"),
            (r#"set(name, [1, ])"#, 15, "value"),
            (r#"set(name, 1) where"#, 19, "condition"),
            (r#"set(name, 1) where name =="#, 27, "value"),
            (r#"set(name, concat("a"))"#, 17, "converter"),
            (r#"Set(name, 1)"#, 1, "editor"),
            (r#"set(name, "\q")"#, 13, "escape"),
            (r#"set(name, 0xabc)"#, 13, "hex"),
            (r#"set(name, 99999999999999999999)"#, 31, "64 bits"),
            (r#"set(attributes[true], 1)"#, 16, "key"),
            (r#"set(name, {1: 2})"#, 12, "string key"),
        ];
        for (text, column, words) in cases {
            let e = parse_statement(text).unwrap_err();
            assert_eq!(e.column, *column, "{text}: {e}");
            assert!(e.message.contains(words), "{text}: {e}");
        }
    }

    #[test]
    fn nesting_and_length_are_bounded() {
        let deep = format!("set(name, {}1{})", "[".repeat(40), "]".repeat(40));
        let e = parse_statement(&deep).unwrap_err();
        assert!(e.message.contains("nest"), "{e}");
        let brackets_in_strings = format!(r#"set(name, "{}")"#, "(".repeat(100));
        assert!(parse_statement(&brackets_in_strings).is_ok());
        let nots = format!("{}true", "not ".repeat(3000));
        assert_eq!(parse_condition(&nots).unwrap(), Condition::Const(true));
        assert!(parse_statement(&"x".repeat(MAX_LEN + 1)).is_err());
    }

    proptest! {
        /// Arbitrary text, and mutations of real statements: an error or a tree, never a panic.
        #[test]
        fn no_input_panics(text in ".{0,200}") {
            let _ = parse_statement(&text);
            let _ = parse_condition(&text);
        }

        #[test]
        fn mutated_statements_never_panic(cut in 0usize..120, insert in "[()\\[\\]{}\",.=<>!+*/ a-zA-Z0-9_-]{0,6}") {
            let base = r#"set(attributes["x"], Concat([name, "-", String(kind)], "")) where not (attributes["y"] != nil or 1.5 * 2 >= 3)"#;
            let at = base.char_indices().map(|(i, _)| i).nth(cut % base.chars().count()).unwrap_or(0);
            let text = format!("{}{}{}", &base[..at], insert, &base[at..]);
            if let Err(e) = parse_statement(&text) {
                prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1);
            }
        }
    }
}
