//! The attribute actions the `attributes` and `resource` processors share (the collector's
//! `attraction`): insert, update, upsert, delete, hash, extract and convert on one attribute list.
//! A value comes from the action (`value`), another attribute (`from_attribute`) or the request
//! (`from_context`: `metadata.<header>` or a bare header name, the receiver's request headers
//! with `include_metadata: true`; the collector's `auth.*` and `client.address` are refused,
//! this relay's receivers have no authenticator and do not keep the peer address).
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde::Deserialize;

use super::RequestContext;
use super::ottl::eval::{Value, from_any, to_any};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ActionKind {
    Insert,
    Update,
    Upsert,
    Delete,
    Hash,
    Extract,
    Convert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ConvertedType {
    Int,
    Double,
    String,
}

/// One entry of `actions` (`attributes`) or `attributes` (`resource`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ActionConfig {
    #[serde(default)]
    pub(crate) key: String,
    pub(crate) action: ActionKind,
    /// A literal value (any YAML scalar).
    pub(crate) value: Option<serde_norway::Value>,
    pub(crate) from_attribute: Option<String>,
    /// `metadata.<key>` (or a bare key): a request header, with include_metadata.
    pub(crate) from_context: Option<String>,
    /// Keys matching this regexp (delete, hash), or named groups to extract (extract).
    pub(crate) pattern: Option<String>,
    pub(crate) converted_type: Option<ConvertedType>,
}

/// Actions checked and their patterns compiled.
#[derive(Debug, Clone)]
pub(crate) struct Actions(Vec<Action>);

#[derive(Debug, Clone)]
struct Action {
    key: String,
    kind: ActionKind,
    source: Source,
    pattern: Option<regex::Regex>,
    converted_type: Option<ConvertedType>,
}

#[derive(Debug, Clone)]
enum Source {
    None,
    Literal(AnyValue),
    Attribute(String),
    /// A request header (lowercase name).
    Metadata(String),
}

/// The request header a `from_context` key names, or why it cannot be read.
fn context_key(key: &str) -> Result<String, String> {
    if key.starts_with("auth.") {
        return Err("auth.* is not supported: this relay's receivers have no authenticator; use metadata.<header> (with include_metadata: true on the receiver)".into());
    }
    if key == "client.address" {
        return Err(
            "client.address is not supported; use metadata.<header> (with include_metadata: true on the receiver)"
                .into(),
        );
    }
    let name = key.strip_prefix("metadata.").unwrap_or(key);
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(format!("{key:?} does not name a request header: use metadata.<header>"));
    }
    Ok(name.to_ascii_lowercase())
}

/// A YAML scalar as an attribute value (lists and maps become OTLP arrays and kvlists).
fn literal(value: &serde_norway::Value) -> Result<Value, String> {
    use serde_norway::Value as Y;
    Ok(match value {
        Y::Null => Value::Nil,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(f)) => Value::Double(f),
            _ => return Err(format!("{n} is out of range")),
        },
        Y::String(s) => Value::Str(s.clone()),
        Y::Sequence(items) => Value::List(items.iter().map(literal).collect::<Result<_, _>>()?),
        Y::Mapping(m) => Value::Map(
            m.iter()
                .map(|(k, v)| Ok((k.as_str().unwrap_or_default().to_string(), literal(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        Y::Tagged(t) => literal(&t.value)?,
    })
}

impl Actions {
    /// Checks every action; problems go to `err` at `path[i].field`.
    pub(crate) fn compile(list: &[ActionConfig], path: &str, err: &mut dyn FnMut(String, String)) -> Option<Actions> {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, a) in list.iter().enumerate() {
            let at = |field: &str| format!("{path}[{i}].{field}");
            let mut fail = |field: &str, message: String| {
                ok = false;
                err(at(field), message);
            };
            let pattern = match a.pattern.as_deref().map(regex::Regex::new) {
                None => None,
                Some(Ok(re)) => Some(re),
                Some(Err(e)) => {
                    fail("pattern", format!("not a valid regular expression: {e}"));
                    None
                }
            };
            let needs_key = !matches!(a.action, ActionKind::Delete | ActionKind::Hash) || a.pattern.is_none();
            if needs_key && a.key.is_empty() {
                fail("key", "must be set".into());
            }
            let sources = [a.value.is_some(), a.from_attribute.is_some(), a.from_context.is_some()];
            let source = match (&a.value, &a.from_attribute) {
                _ if sources.iter().filter(|set| **set).count() > 1 => {
                    fail(
                        "from_attribute",
                        "set one of value, from_attribute and from_context".into(),
                    );
                    Source::None
                }
                (None, None) => match a.from_context.as_deref().map(context_key) {
                    None => Source::None,
                    Some(Ok(name)) => Source::Metadata(name),
                    Some(Err(e)) => {
                        fail("from_context", e);
                        Source::None
                    }
                },
                (Some(v), _) => match literal(v) {
                    Ok(v) => Source::Literal(to_any(v)),
                    Err(e) => {
                        fail("value", e);
                        Source::None
                    }
                },
                (None, Some(from)) => Source::Attribute(from.clone()),
            };
            match a.action {
                ActionKind::Insert | ActionKind::Update | ActionKind::Upsert if matches!(source, Source::None) => {
                    fail("value", "set value, from_attribute or from_context".into())
                }
                ActionKind::Extract => match &pattern {
                    Some(re) if re.capture_names().flatten().next().is_some() => {}
                    _ => fail(
                        "pattern",
                        "extract needs a pattern with named groups, e.g. ^(?P<user>.*)$".into(),
                    ),
                },
                ActionKind::Convert if a.converted_type.is_none() => {
                    fail("converted_type", "must be int, double or string".into())
                }
                _ => {}
            }
            out.push(Action {
                key: a.key.clone(),
                kind: a.action,
                source,
                pattern,
                converted_type: a.converted_type,
            });
        }
        ok.then_some(Actions(out))
    }

    /// Applies every action, in order, to `attrs` of a request with `request`'s context.
    pub(crate) fn apply(&self, attrs: &mut Vec<KeyValue>, request: &RequestContext) {
        for a in &self.0 {
            a.apply(attrs, request);
        }
    }
}

fn position(attrs: &[KeyValue], key: &str) -> Option<usize> {
    attrs.iter().position(|kv| kv.key == key)
}

impl Action {
    fn value(&self, attrs: &[KeyValue], request: &RequestContext) -> Option<AnyValue> {
        match &self.source {
            Source::None => None,
            Source::Literal(v) => Some(v.clone()),
            Source::Attribute(from) => position(attrs, from).and_then(|i| attrs[i].value.clone()),
            // As the collector: one value is a string, several (a repeated header) a list.
            Source::Metadata(name) => match request.metadata(name).as_slice() {
                [] => None,
                [one] => Some(to_any(Value::Str((*one).to_string()))),
                many => Some(to_any(Value::List(
                    many.iter().map(|v| Value::Str((*v).to_string())).collect(),
                ))),
            },
        }
    }

    fn apply(&self, attrs: &mut Vec<KeyValue>, request: &RequestContext) {
        let at = position(attrs, &self.key);
        match self.kind {
            ActionKind::Insert => {
                if at.is_none()
                    && let Some(value) = self.value(attrs, request)
                {
                    attrs.push(KeyValue {
                        key: self.key.clone(),
                        value: Some(value),
                        ..Default::default()
                    });
                }
            }
            ActionKind::Update => {
                if let (Some(i), Some(value)) = (at, self.value(attrs, request)) {
                    attrs[i].value = Some(value);
                }
            }
            ActionKind::Upsert => {
                if let Some(value) = self.value(attrs, request) {
                    match at {
                        Some(i) => attrs[i].value = Some(value),
                        None => attrs.push(KeyValue {
                            key: self.key.clone(),
                            value: Some(value),
                            ..Default::default()
                        }),
                    }
                }
            }
            ActionKind::Delete => match &self.pattern {
                Some(re) => attrs.retain(|kv| !re.is_match(&kv.key)),
                None => attrs.retain(|kv| kv.key != self.key),
            },
            ActionKind::Hash => {
                for kv in attrs.iter_mut() {
                    let hit = match &self.pattern {
                        Some(re) => re.is_match(&kv.key),
                        None => kv.key == self.key,
                    };
                    if hit {
                        kv.value = kv.value.as_ref().map(hash);
                    }
                }
            }
            ActionKind::Extract => self.extract(at, attrs),
            ActionKind::Convert => {
                if let (Some(i), Some(to)) = (at, self.converted_type) {
                    convert(&mut attrs[i], to);
                }
            }
        }
    }

    /// Named groups of the pattern, matched against the key's string value, become attributes.
    fn extract(&self, at: Option<usize>, attrs: &mut Vec<KeyValue>) {
        let (Some(i), Some(re)) = (at, &self.pattern) else {
            return;
        };
        let Some(any_value::Value::StringValue(text)) = attrs[i].value.as_ref().and_then(|v| v.value.clone()) else {
            return;
        };
        let Some(captures) = re.captures(&text) else {
            return;
        };
        for name in re.capture_names().flatten() {
            if let Some(m) = captures.name(name) {
                let value = to_any(Value::Str(m.as_str().to_string()));
                match position(attrs, name) {
                    Some(j) => attrs[j].value = Some(value),
                    None => attrs.push(KeyValue {
                        key: name.to_string(),
                        value: Some(value),
                        ..Default::default()
                    }),
                }
            }
        }
    }
}

/// The collector's hash action: the SHA-256 of the value's bytes (strings as UTF-8, other
/// scalars in their text form), as lowercase hex. Lists and maps are left as they are.
fn hash(value: &AnyValue) -> AnyValue {
    let bytes = match from_any(Some(value)) {
        Value::Str(s) => s.into_bytes(),
        Value::Bytes(b) => b,
        Value::Int(n) => n.to_string().into_bytes(),
        Value::Double(d) => d.to_string().into_bytes(),
        Value::Bool(b) => b.to_string().into_bytes(),
        // Nil, lists and maps are left as they are.
        _ => return value.clone(),
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    to_any(Value::Str(const_hex::encode(digest.as_ref())))
}

/// `convert`: a value that does not convert is left as it is, as in the collector.
fn convert(kv: &mut KeyValue, to: ConvertedType) {
    let value = from_any(kv.value.as_ref());
    let converted = match (to, value) {
        (ConvertedType::Int, Value::Int(n)) => Value::Int(n),
        (ConvertedType::Int, Value::Double(d)) if d.is_finite() => Value::Int(d.trunc() as i64),
        (ConvertedType::Int, Value::Bool(b)) => Value::Int(i64::from(b)),
        (ConvertedType::Int, Value::Str(s)) => match s.trim().parse() {
            Ok(n) => Value::Int(n),
            Err(_) => return,
        },
        (ConvertedType::Double, Value::Int(n)) => Value::Double(n as f64),
        (ConvertedType::Double, Value::Double(d)) => Value::Double(d),
        (ConvertedType::Double, Value::Str(s)) => match s.trim().parse() {
            Ok(d) => Value::Double(d),
            Err(_) => return,
        },
        (ConvertedType::String, Value::Str(s)) => Value::Str(s),
        (ConvertedType::String, Value::Int(n)) => Value::Str(n.to_string()),
        (ConvertedType::String, Value::Double(d)) => Value::Str(d.to_string()),
        (ConvertedType::String, Value::Bool(b)) => Value::Str(b.to_string()),
        _ => return,
    };
    kv.value = Some(to_any(converted));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions(yaml: &str) -> Actions {
        let list: Vec<ActionConfig> = serde_norway::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        let a = Actions::compile(&list, "actions", &mut |p, m| errs.push(format!("{p}: {m}")));
        assert!(errs.is_empty(), "{errs:?}");
        a.unwrap()
    }

    fn attrs(pairs: &[(&str, Value)]) -> Vec<KeyValue> {
        pairs
            .iter()
            .map(|(k, v)| KeyValue {
                key: (*k).into(),
                value: Some(to_any(v.clone())),
                ..Default::default()
            })
            .collect()
    }

    fn get(attrs: &[KeyValue], key: &str) -> Value {
        from_any(position(attrs, key).and_then(|i| attrs[i].value.as_ref()))
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn insert_update_upsert_delete() {
        let a = actions(
            r#"
- {key: env, action: insert, value: prod}
- {key: region, action: insert, value: eu}
- {key: team, action: update, value: ml}
- {key: missing, action: update, value: x}
- {key: tokens, action: upsert, value: 42}
- {key: copy, action: upsert, from_attribute: region}
- {key: secret, action: delete}
- {action: delete, pattern: ^tmp\.}
"#,
        );
        let mut list = attrs(&[
            ("region", s("us")),
            ("team", s("web")),
            ("secret", s("x")),
            ("tmp.a", s("1")),
            ("tmp.b", s("2")),
        ]);
        a.apply(&mut list, &RequestContext::default());
        assert_eq!(get(&list, "env"), s("prod"));
        assert_eq!(get(&list, "region"), s("us"), "insert does not overwrite");
        assert_eq!(get(&list, "team"), s("ml"));
        assert_eq!(get(&list, "missing"), Value::Nil, "update does not create");
        assert_eq!(get(&list, "tokens"), Value::Int(42));
        assert_eq!(get(&list, "copy"), s("us"));
        assert_eq!(get(&list, "secret"), Value::Nil);
        assert!(list.iter().all(|kv| !kv.key.starts_with("tmp.")));
    }

    /// from_context reads the request's headers (case-insensitively); a repeated header is a
    /// list; a missing one leaves the attribute alone; auth.* and client.address are refused.
    #[test]
    fn from_context_reads_request_metadata() {
        let a = actions(
            r#"
- {key: tenant, action: upsert, from_context: metadata.X-Tenant}
- {key: region, action: insert, from_context: x-region}
- {key: team, action: upsert, from_context: metadata.x-team}
- {key: kept, action: update, from_context: metadata.absent}
"#,
        );
        let request = RequestContext::from_headers([
            ("x-tenant", "acme"),
            ("x-team", "a"),
            ("x-team", "b"),
            ("x-region", "eu"),
        ]);
        let mut list = attrs(&[("kept", s("v"))]);
        a.apply(&mut list, &request);
        assert_eq!(get(&list, "tenant"), s("acme"));
        assert_eq!(get(&list, "region"), s("eu"));
        assert_eq!(get(&list, "team"), Value::List(vec![s("a"), s("b")]));
        assert_eq!(get(&list, "kept"), s("v"));
        let mut list = attrs(&[]);
        a.apply(&mut list, &RequestContext::default());
        assert!(list.is_empty(), "no metadata (include_metadata off): nothing set");
        for (yaml, path) in [
            (
                "[{key: k, action: upsert, from_context: auth.subject}]",
                "a[0].from_context",
            ),
            (
                "[{key: k, action: upsert, from_context: client.address}]",
                "a[0].from_context",
            ),
            (
                "[{key: k, action: upsert, from_context: 'metadata.'}]",
                "a[0].from_context",
            ),
            (
                "[{key: k, action: upsert, value: 1, from_context: metadata.x}]",
                "a[0].from_attribute",
            ),
        ] {
            let list: Vec<ActionConfig> = serde_norway::from_str(yaml).unwrap();
            let mut errs = Vec::new();
            assert!(Actions::compile(&list, "a", &mut |p, m| errs.push(format!("{p}: {m}"))).is_none());
            assert!(
                errs.iter().any(|e| e.starts_with(&format!("{path}:"))),
                "{yaml}: {errs:?}"
            );
        }
    }

    #[test]
    fn hash_extract_convert() {
        let a = actions(
            r#"
- {key: user.email, action: hash}
- {key: http.url, action: extract, pattern: '^https://(?P<host>[^/]+)/(?P<route>.*)$'}
- {key: count, action: convert, converted_type: int}
- {key: ratio, action: convert, converted_type: double}
- {key: bad, action: convert, converted_type: int}
"#,
        );
        let mut list = attrs(&[
            ("user.email", s("a@example.com")),
            ("http.url", s("https://api.example.com/v1/chat")),
            ("count", s("12")),
            ("ratio", Value::Int(3)),
            ("bad", s("twelve")),
        ]);
        a.apply(&mut list, &RequestContext::default());
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"a@example.com");
        assert_eq!(get(&list, "user.email"), s(&const_hex::encode(digest.as_ref())));
        assert_eq!(get(&list, "host"), s("api.example.com"));
        assert_eq!(get(&list, "route"), s("v1/chat"));
        assert_eq!(get(&list, "count"), Value::Int(12));
        assert_eq!(get(&list, "ratio"), Value::Double(3.0));
        assert_eq!(get(&list, "bad"), s("twelve"));
    }

    #[test]
    fn bad_actions_are_reported_at_their_field() {
        let list: Vec<ActionConfig> = serde_norway::from_str(
            r#"
- {key: a, action: insert}
- {action: upsert, value: 1}
- {key: b, action: extract, pattern: '^(.*)$'}
- {key: c, action: delete, pattern: '('}
- {key: d, action: convert}
- {key: e, action: upsert, value: 1, from_attribute: f}
"#,
        )
        .unwrap();
        let mut errs = Vec::new();
        assert!(Actions::compile(&list, "p.actions", &mut |p, m| errs.push(format!("{p}: {m}"))).is_none());
        for expected in [
            "p.actions[0].value:",
            "p.actions[1].key:",
            "p.actions[2].pattern:",
            "p.actions[3].pattern:",
            "p.actions[4].converted_type:",
            "p.actions[5].from_attribute:",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "missing {expected} in {errs:#?}"
            );
        }
        assert!(serde_norway::from_str::<Vec<ActionConfig>>("[{key: a, action: rename}]").is_err());
    }
}
