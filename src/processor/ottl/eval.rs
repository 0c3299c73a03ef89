//! OTTL evaluation on one span with its resource and scope: paths, comparisons, arithmetic, and
//! the editors and converters MLflow users reach for. Statements are checked when compiled (names,
//! argument counts, enums, paths of the context), so a typo is a config error, not a runtime one.
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};

use super::{Arg, Call, CompareOp, Condition, Expr, Key, MathOp, Path, Statement};

/// A value while evaluating: OTLP's AnyValue, plus nil.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Map(Vec<(String, Value)>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EvalError {
    #[error("{0}")]
    Type(String),
    #[error("division by zero")]
    DivisionByZero,
    #[error("{0} cannot be set")]
    ReadOnly(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CompileError(pub String);

/// What a statement runs on: a span with its resource and scope, and in the `spanevent`
/// context one of its events. The `resource` and `scope` contexts run on a placeholder span
/// their statements cannot name (see `context`).
pub(crate) struct SpanTarget<'a> {
    pub resource: &'a mut Resource,
    pub scope: &'a mut InstrumentationScope,
    pub span: &'a mut Span,
    pub event: Option<&'a mut Event>,
}

/// A statement checked against the functions and paths this build knows.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    statement: Statement,
    /// The editor's own pattern argument, when it has one.
    regexes: Vec<regex::Regex>,
    patterns: Patterns,
}

/// Literal patterns of `IsMatch`, compiled once when the statement is.
pub(crate) type Patterns = std::collections::HashMap<String, regex::Regex>;

const EDITORS: &[(&str, usize, usize)] = &[
    ("set", 2, 2),
    ("delete_key", 2, 2),
    ("delete_matching_keys", 2, 2),
    ("keep_keys", 2, 2),
    ("replace_pattern", 3, 3),
    ("replace_all_patterns", 4, 4),
    ("truncate_all", 2, 2),
    ("limit", 3, 3),
    ("merge_maps", 3, 3),
];

const CONVERTERS: &[(&str, usize, usize)] = &[
    ("Concat", 2, 2),
    ("IsMatch", 2, 2),
    ("IsRootSpan", 0, 0),
    ("Int", 1, 1),
    ("Double", 1, 1),
    ("String", 1, 1),
    ("Len", 1, 1),
    ("SHA256", 1, 1),
];

const ENUMS: &[(&str, i64)] = &[
    ("SPAN_KIND_UNSPECIFIED", 0),
    ("SPAN_KIND_INTERNAL", 1),
    ("SPAN_KIND_SERVER", 2),
    ("SPAN_KIND_CLIENT", 3),
    ("SPAN_KIND_PRODUCER", 4),
    ("SPAN_KIND_CONSUMER", 5),
    ("STATUS_CODE_UNSET", 0),
    ("STATUS_CODE_OK", 1),
    ("STATUS_CODE_ERROR", 2),
];

/// Paths of the span context, after an optional `span.` prefix; `attributes` takes keys.
const SPAN_FIELDS: &[&str] = &[
    "name",
    "kind",
    "trace_id",
    "span_id",
    "parent_span_id",
    "trace_state",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "attributes",
    "dropped_attributes_count",
    "status",
];

pub(crate) fn compile(statement: Statement) -> Result<Compiled, CompileError> {
    let call = &statement.editor;
    check_arity(call, EDITORS, "editor")?;
    let mut patterns = Patterns::new();
    for arg in &call.args {
        check_expr(&arg.value, &mut patterns)?;
    }
    if let Some(condition) = &statement.condition {
        check_condition(condition, &mut patterns)?;
    }
    let mut regexes = Vec::new();
    let pattern_arg = match call.name.as_str() {
        "delete_matching_keys" | "replace_pattern" => Some(1),
        "replace_all_patterns" => Some(2),
        _ => None,
    };
    if let Some(index) = pattern_arg {
        regexes.push(literal_regex(call, index)?);
    }
    if call.name == "replace_all_patterns"
        && !matches!(&call.args[1].value, Expr::Str(mode) if mode == "key" || mode == "value")
    {
        return Err(CompileError(
            "replace_all_patterns: mode must be \"key\" or \"value\"".into(),
        ));
    }
    if call.name == "merge_maps"
        && !matches!(&call.args[2].value, Expr::Str(s) if ["insert", "update", "upsert"].contains(&s.as_str()))
    {
        return Err(CompileError(
            "merge_maps: strategy must be \"insert\", \"update\" or \"upsert\"".into(),
        ));
    }
    Ok(Compiled {
        statement,
        regexes,
        patterns,
    })
}

/// A condition alone (the `filter` processor), checked like a statement's `where`.
pub(crate) fn compile_condition(condition: Condition) -> Result<(Condition, Patterns), CompileError> {
    let mut patterns = Patterns::new();
    check_condition(&condition, &mut patterns)?;
    Ok((condition, patterns))
}

fn literal_regex(call: &Call, index: usize) -> Result<regex::Regex, CompileError> {
    match &call.args[index].value {
        Expr::Str(pattern) => regex::Regex::new(pattern)
            .map_err(|e| CompileError(format!("{}: invalid pattern {pattern:?}: {e}", call.name))),
        _ => Err(CompileError(format!(
            "{}: the pattern must be a string literal",
            call.name
        ))),
    }
}

fn check_arity(call: &Call, table: &[(&str, usize, usize)], what: &str) -> Result<(), CompileError> {
    let Some(&(_, min, max)) = table.iter().find(|(name, _, _)| *name == call.name) else {
        let known: Vec<&str> = table.iter().map(|(n, _, _)| *n).collect();
        return Err(CompileError(format!(
            "unknown {what} {:?} (supported: {})",
            call.name,
            known.join(", ")
        )));
    };
    let n = call.args.len();
    if n < min || n > max {
        return Err(CompileError(format!("{} takes {min} arguments, got {n}", call.name)));
    }
    Ok(())
}

fn check_condition(condition: &Condition, patterns: &mut Patterns) -> Result<(), CompileError> {
    match condition {
        Condition::Or(terms) | Condition::And(terms) => terms.iter().try_for_each(|t| check_condition(t, patterns)),
        Condition::Not(inner) => check_condition(inner, patterns),
        Condition::Const(_) => Ok(()),
        Condition::Converter(call) => check_call(call, patterns),
        Condition::Compare(left, _, right) => {
            check_expr(left, patterns)?;
            check_expr(right, patterns)
        }
    }
}

fn check_expr(expr: &Expr, patterns: &mut Patterns) -> Result<(), CompileError> {
    match expr {
        Expr::Enum(name) => enum_value(name).map(|_| ()),
        Expr::Path(path) => resolve(path).map(|_| ()),
        Expr::List(items) => items.iter().try_for_each(|e| check_expr(e, patterns)),
        Expr::Map(entries) => entries.iter().try_for_each(|(_, v)| check_expr(v, patterns)),
        Expr::Converter(call) => check_call(call, patterns),
        Expr::Math(left, _, right) => {
            check_expr(left, patterns)?;
            check_expr(right, patterns)
        }
        _ => Ok(()),
    }
}

fn check_call(call: &Call, patterns: &mut Patterns) -> Result<(), CompileError> {
    check_arity(call, CONVERTERS, "converter")?;
    if call.name == "IsMatch"
        && let Expr::Str(pattern) = &call.args[1].value
        && !patterns.contains_key(pattern)
    {
        patterns.insert(pattern.clone(), literal_regex(call, 1)?);
    }
    call.args.iter().try_for_each(|a| check_expr(&a.value, patterns))
}

fn enum_value(name: &str) -> Result<i64, CompileError> {
    ENUMS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| CompileError(format!("unknown enum {name}")))
}

/// Where a path points, independent of any span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Span(&'static str),
    Status(&'static str),
    Resource(&'static str),
    Scope(&'static str),
    Event(&'static str),
}

/// The place and the keys after it (only maps take keys).
fn resolve(path: &Path) -> Result<(Place, &[Key]), CompileError> {
    let names: Vec<&str> = path.fields.iter().map(|f| f.name.as_str()).collect();
    let last = path.fields.last().map_or(&[][..], |f| f.keys.as_slice());
    let keyed_early = path.fields[..path.fields.len().saturating_sub(1)]
        .iter()
        .any(|f| !f.keys.is_empty());
    let unknown = || CompileError(format!("unknown path {:?} in the span context", names.join(".")));
    if keyed_early {
        return Err(unknown());
    }
    let fields = match names.first() {
        Some(&"span") => &names[1..],
        _ => &names[..],
    };
    let place = match fields {
        ["status", "code"] => Place::Status("code"),
        ["status", "message"] => Place::Status("message"),
        [field] => Place::Span(SPAN_FIELDS.iter().find(|f| *f == field).copied().ok_or_else(unknown)?),
        ["resource", "attributes"] => Place::Resource("attributes"),
        ["resource", "dropped_attributes_count"] => Place::Resource("dropped_attributes_count"),
        ["spanevent", field] => Place::Event(
            ["name", "time_unix_nano", "attributes", "dropped_attributes_count"]
                .into_iter()
                .find(|f| f == field)
                .ok_or_else(unknown)?,
        ),
        ["instrumentation_scope" | "scope", field] => Place::Scope(
            ["name", "version", "attributes"]
                .into_iter()
                .find(|f| f == field)
                .ok_or_else(unknown)?,
        ),
        _ => return Err(unknown()),
    };
    let takes_keys = matches!(
        place,
        Place::Span("attributes")
            | Place::Resource("attributes")
            | Place::Scope("attributes")
            | Place::Event("attributes")
    );
    if !last.is_empty() && !takes_keys {
        return Err(CompileError(format!("{:?} cannot be indexed", names.join("."))));
    }
    if place == Place::Span("status") {
        return Err(CompileError("use status.code or status.message".into()));
    }
    Ok((place, last))
}

impl Compiled {
    /// Runs the statement when its condition holds; Ok(true) when the editor ran.
    pub(crate) fn execute(&self, target: &mut SpanTarget<'_>) -> Result<bool, EvalError> {
        if let Some(condition) = &self.statement.condition
            && !eval_condition(condition, target, &self.patterns)?
        {
            return Ok(false);
        }
        self.edit(target)?;
        Ok(true)
    }

    fn edit(&self, target: &mut SpanTarget<'_>) -> Result<(), EvalError> {
        let call = &self.statement.editor;
        let arg = |i: usize| &call.args[i].value;
        match call.name.as_str() {
            "set" => {
                let value = eval(arg(1), target, &self.patterns)?;
                if value != Value::Nil {
                    set(path_of(arg(0))?, target, value)?;
                }
            }
            "delete_key" => {
                let key = string_of(eval(arg(1), target, &self.patterns)?)?;
                edit_map(arg(0), target, |map| map.retain(|kv| kv.key != key))?;
            }
            "delete_matching_keys" => {
                let re = &self.regexes[0];
                edit_map(arg(0), target, |map| map.retain(|kv| !re.is_match(&kv.key)))?;
            }
            "keep_keys" => {
                let keys: Vec<String> = match eval(arg(1), target, &self.patterns)? {
                    Value::List(items) => items.into_iter().map(string_of).collect::<Result<_, _>>()?,
                    other => return Err(type_error("keep_keys: a list of keys", &other)),
                };
                edit_map(arg(0), target, |map| map.retain(|kv| keys.contains(&kv.key)))?;
            }
            "replace_pattern" => {
                let replacement = string_of(eval(arg(2), target, &self.patterns)?)?;
                let path = path_of(arg(0))?;
                if let Value::Str(text) = get(path, target)? {
                    let replaced = self.regexes[0].replace_all(&text, replacement.as_str()).into_owned();
                    if replaced != text {
                        set(path, target, Value::Str(replaced))?;
                    }
                }
            }
            "replace_all_patterns" => {
                let by_key = matches!(arg(1), Expr::Str(mode) if mode == "key");
                let replacement = string_of(eval(arg(3), target, &self.patterns)?)?;
                let re = &self.regexes[0];
                edit_map(arg(0), target, |map| {
                    for kv in map.iter_mut() {
                        if by_key {
                            kv.key = re.replace_all(&kv.key, replacement.as_str()).into_owned();
                        } else if let Some(any_value::Value::StringValue(s)) =
                            kv.value.as_mut().and_then(|v| v.value.as_mut())
                        {
                            *s = re.replace_all(s, replacement.as_str()).into_owned();
                        }
                    }
                })?;
            }
            "truncate_all" => {
                let limit = int_of(eval(arg(1), target, &self.patterns)?)?;
                let limit =
                    usize::try_from(limit).map_err(|_| EvalError::Type("truncate_all: a negative limit".into()))?;
                edit_map(arg(0), target, |map| {
                    for kv in map.iter_mut() {
                        if let Some(any_value::Value::StringValue(s)) = kv.value.as_mut().and_then(|v| v.value.as_mut())
                        {
                            truncate_utf8(s, limit);
                        }
                    }
                })?;
            }
            "limit" => {
                let limit = usize::try_from(int_of(eval(arg(1), target, &self.patterns)?)?)
                    .map_err(|_| EvalError::Type("limit: a negative limit".into()))?;
                let priority: Vec<String> = match eval(arg(2), target, &self.patterns)? {
                    Value::List(items) => items.into_iter().map(string_of).collect::<Result<_, _>>()?,
                    other => return Err(type_error("limit: a list of priority keys", &other)),
                };
                edit_map(arg(0), target, |map| limit_keys(map, limit, &priority))?;
            }
            "merge_maps" => {
                let Value::Map(source) = eval(arg(1), target, &self.patterns)? else {
                    return Ok(());
                };
                let strategy = string_of(eval(arg(2), target, &self.patterns)?)?;
                edit_map(arg(0), target, |map| merge(map, source, &strategy))?;
            }
            other => return Err(EvalError::Type(format!("unknown editor {other}"))),
        }
        Ok(())
    }
}

fn truncate_utf8(s: &mut String, limit: usize) {
    if s.len() > limit {
        let mut cut = limit;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// Keeps at most `limit` keys: priority keys first (in their order), then the others in order.
fn limit_keys(map: &mut Vec<KeyValue>, limit: usize, priority: &[String]) {
    if map.len() <= limit {
        return;
    }
    let mut keep: Vec<bool> = vec![false; map.len()];
    let mut kept = 0;
    for key in priority {
        if let Some(i) = map.iter().position(|kv| &kv.key == key)
            && kept < limit
            && !keep[i]
        {
            keep[i] = true;
            kept += 1;
        }
    }
    for flag in keep.iter_mut() {
        if kept >= limit {
            break;
        }
        if !*flag {
            *flag = true;
            kept += 1;
        }
    }
    let mut flags = keep.into_iter();
    map.retain(|_| flags.next().unwrap_or(false));
}

fn merge(map: &mut Vec<KeyValue>, source: Vec<(String, Value)>, strategy: &str) {
    for (key, value) in source {
        let existing = map.iter_mut().find(|kv| kv.key == key);
        match (existing, strategy) {
            (Some(kv), "update" | "upsert") => kv.value = Some(to_any(value)),
            (None, "insert" | "upsert") => map.push(KeyValue {
                key,
                value: Some(to_any(value)),
                ..Default::default()
            }),
            _ => {}
        }
    }
}

fn type_error(wanted: &str, got: &Value) -> EvalError {
    EvalError::Type(format!("expected {wanted}, got {}", type_name(got)))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Double(_) => "double",
        Value::Str(_) => "string",
        Value::Bytes(_) => "bytes",
        Value::List(_) => "list",
        Value::Map(_) => "map",
    }
}

fn string_of(v: Value) -> Result<String, EvalError> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(type_error("a string", &other)),
    }
}

fn int_of(v: Value) -> Result<i64, EvalError> {
    match v {
        Value::Int(n) => Ok(n),
        other => Err(type_error("an int", &other)),
    }
}

fn path_of(expr: &Expr) -> Result<&Path, EvalError> {
    match expr {
        Expr::Path(p) => Ok(p),
        _ => Err(EvalError::Type("the first argument must be a path".into())),
    }
}

/// The attribute list a map path names, edited in place (nested keys reach into kvlists).
fn edit_map(expr: &Expr, target: &mut SpanTarget<'_>, edit: impl FnOnce(&mut Vec<KeyValue>)) -> Result<(), EvalError> {
    let path = path_of(expr)?;
    let (place, keys) = resolve(path).map_err(|e| EvalError::Type(e.0))?;
    let Some(mut map) = attributes_mut(place, target) else {
        return Err(EvalError::Type(format!("{place:?} is not a map")));
    };
    for key in keys {
        let Key::Str(key) = key else {
            return Err(EvalError::Type("maps take string keys".into()));
        };
        let nested = map
            .iter_mut()
            .find(|kv| &kv.key == key)
            .and_then(|kv| kv.value.as_mut())
            .and_then(|v| match v.value.as_mut() {
                Some(any_value::Value::KvlistValue(list)) => Some(&mut list.values),
                _ => None,
            });
        match nested {
            Some(inner) => map = inner,
            // Editing a map that is not there leaves everything as it is, as in the collector.
            None => return Ok(()),
        }
    }
    edit(map);
    Ok(())
}

fn attributes_mut<'t>(place: Place, target: &'t mut SpanTarget<'_>) -> Option<&'t mut Vec<KeyValue>> {
    match place {
        Place::Span("attributes") => Some(&mut target.span.attributes),
        Place::Resource("attributes") => Some(&mut target.resource.attributes),
        Place::Scope("attributes") => Some(&mut target.scope.attributes),
        Place::Event("attributes") => target.event.as_deref_mut().map(|e| &mut e.attributes),
        _ => None,
    }
}

fn attributes<'t>(place: Place, target: &'t SpanTarget<'_>) -> Option<&'t Vec<KeyValue>> {
    match place {
        Place::Span("attributes") => Some(&target.span.attributes),
        Place::Resource("attributes") => Some(&target.resource.attributes),
        Place::Scope("attributes") => Some(&target.scope.attributes),
        Place::Event("attributes") => target.event.as_deref().map(|e| &e.attributes),
        _ => None,
    }
}

fn get(path: &Path, target: &SpanTarget<'_>) -> Result<Value, EvalError> {
    let (place, keys) = resolve(path).map_err(|e| EvalError::Type(e.0))?;
    if let Some(map) = attributes(place, target) {
        // `attributes["k"]` looks the key up rather than copying the whole map first.
        if let Some((Key::Str(first), rest)) = keys.split_first() {
            let mut value = map
                .iter()
                .find(|kv| &kv.key == first)
                .map_or(Value::Nil, |kv| from_any(kv.value.as_ref()));
            for key in rest {
                value = index(value, key);
            }
            return Ok(value);
        }
        let mut value = Value::Map(
            map.iter()
                .map(|kv| (kv.key.clone(), from_any(kv.value.as_ref())))
                .collect(),
        );
        for key in keys {
            value = index(value, key);
        }
        return Ok(value);
    }
    let span = &*target.span;
    let status = span.status.clone().unwrap_or_default();
    Ok(match place {
        Place::Span("name") => Value::Str(span.name.clone()),
        Place::Span("kind") => Value::Int(i64::from(span.kind)),
        Place::Span("trace_id") => Value::Bytes(span.trace_id.clone()),
        Place::Span("span_id") => Value::Bytes(span.span_id.clone()),
        Place::Span("parent_span_id") => Value::Bytes(span.parent_span_id.clone()),
        Place::Span("trace_state") => Value::Str(span.trace_state.clone()),
        Place::Span("start_time_unix_nano") => Value::Int(span.start_time_unix_nano as i64),
        Place::Span("end_time_unix_nano") => Value::Int(span.end_time_unix_nano as i64),
        Place::Span("dropped_attributes_count") => Value::Int(i64::from(span.dropped_attributes_count)),
        Place::Status("code") => Value::Int(i64::from(status.code)),
        Place::Status("message") => Value::Str(status.message),
        Place::Resource("dropped_attributes_count") => Value::Int(i64::from(target.resource.dropped_attributes_count)),
        Place::Scope("name") => Value::Str(target.scope.name.clone()),
        Place::Scope("version") => Value::Str(target.scope.version.clone()),
        Place::Event("name") => target
            .event
            .as_deref()
            .map_or(Value::Nil, |e| Value::Str(e.name.clone())),
        Place::Event("time_unix_nano") => target
            .event
            .as_deref()
            .map_or(Value::Nil, |e| Value::Int(e.time_unix_nano as i64)),
        Place::Event("dropped_attributes_count") => target
            .event
            .as_deref()
            .map_or(Value::Nil, |e| Value::Int(i64::from(e.dropped_attributes_count))),
        _ => Value::Nil,
    })
}

fn index(value: Value, key: &Key) -> Value {
    match (value, key) {
        (Value::Map(entries), Key::Str(k)) => entries
            .into_iter()
            .find(|(name, _)| name == k)
            .map_or(Value::Nil, |(_, v)| v),
        (Value::List(items), Key::Int(i)) => usize::try_from(*i)
            .ok()
            .and_then(|i| items.into_iter().nth(i))
            .unwrap_or(Value::Nil),
        _ => Value::Nil,
    }
}

fn set(path: &Path, target: &mut SpanTarget<'_>, value: Value) -> Result<(), EvalError> {
    let (place, keys) = resolve(path).map_err(|e| EvalError::Type(e.0))?;
    if let Some(map) = attributes_mut(place, target) {
        return set_in_map(map, keys, value);
    }
    let name = || format!("{place:?}");
    let span = &mut *target.span;
    match (place, value) {
        (Place::Span("name"), Value::Str(s)) => span.name = s,
        (Place::Span("kind"), Value::Int(n)) => {
            span.kind = i32::try_from(n).map_err(|_| EvalError::Type("kind out of range".into()))?
        }
        (Place::Span("trace_state"), Value::Str(s)) => span.trace_state = s,
        (Place::Status("code"), Value::Int(n)) => {
            span.status.get_or_insert_with(Status::default).code =
                i32::try_from(n).map_err(|_| EvalError::Type("status.code out of range".into()))?;
        }
        (Place::Status("message"), Value::Str(s)) => span.status.get_or_insert_with(Status::default).message = s,
        (Place::Scope("name"), Value::Str(s)) => target.scope.name = s,
        (Place::Scope("version"), Value::Str(s)) => target.scope.version = s,
        (Place::Event("name"), Value::Str(s)) => {
            if let Some(e) = target.event.as_deref_mut() {
                e.name = s;
            }
        }
        (Place::Span("trace_id" | "span_id" | "parent_span_id" | "start_time_unix_nano" | "end_time_unix_nano"), _) => {
            // Ids and times identify the span in MLflow; rewriting them would orphan or merge traces.
            return Err(EvalError::ReadOnly(name()));
        }
        (_, other) => return Err(type_error(&format!("a value of the right type for {}", name()), &other)),
    }
    Ok(())
}

fn set_in_map(map: &mut Vec<KeyValue>, keys: &[Key], value: Value) -> Result<(), EvalError> {
    let Some((first, rest)) = keys.split_first() else {
        return match value {
            Value::Map(entries) => {
                *map = entries
                    .into_iter()
                    .map(|(key, v)| KeyValue {
                        key,
                        value: Some(to_any(v)),
                        ..Default::default()
                    })
                    .collect();
                Ok(())
            }
            other => Err(type_error("a map", &other)),
        };
    };
    let Key::Str(key) = first else {
        return Err(EvalError::Type("maps take string keys".into()));
    };
    let position = match map.iter().position(|kv| &kv.key == key) {
        Some(i) => i,
        None => {
            map.push(KeyValue {
                key: key.clone(),
                ..Default::default()
            });
            map.len() - 1
        }
    };
    let slot = &mut map[position];
    if rest.is_empty() {
        slot.value = Some(to_any(value));
        return Ok(());
    }
    let any = slot.value.get_or_insert_with(AnyValue::default);
    if !matches!(any.value, Some(any_value::Value::KvlistValue(_))) {
        any.value = Some(any_value::Value::KvlistValue(KeyValueList::default()));
    }
    match any.value.as_mut() {
        Some(any_value::Value::KvlistValue(list)) => set_in_map(&mut list.values, rest, value),
        _ => Err(EvalError::Type("not a map".into())),
    }
}

pub(crate) fn from_any(value: Option<&AnyValue>) -> Value {
    match value.and_then(|v| v.value.as_ref()) {
        // Dictionary-indexed strings belong to the profiles signal; traces never carry them.
        None | Some(any_value::Value::StringValueStrindex(_)) => Value::Nil,
        Some(any_value::Value::StringValue(s)) => Value::Str(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(n)) => Value::Int(*n),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(*d),
        Some(any_value::Value::BytesValue(b)) => Value::Bytes(b.clone()),
        Some(any_value::Value::ArrayValue(a)) => Value::List(a.values.iter().map(|v| from_any(Some(v))).collect()),
        Some(any_value::Value::KvlistValue(l)) => Value::Map(
            l.values
                .iter()
                .map(|kv| (kv.key.clone(), from_any(kv.value.as_ref())))
                .collect(),
        ),
    }
}

pub(crate) fn to_any(value: Value) -> AnyValue {
    let value = match value {
        Value::Nil => None,
        Value::Bool(b) => Some(any_value::Value::BoolValue(b)),
        Value::Int(n) => Some(any_value::Value::IntValue(n)),
        Value::Double(d) => Some(any_value::Value::DoubleValue(d)),
        Value::Str(s) => Some(any_value::Value::StringValue(s)),
        Value::Bytes(b) => Some(any_value::Value::BytesValue(b)),
        Value::List(items) => Some(any_value::Value::ArrayValue(ArrayValue {
            values: items.into_iter().map(to_any).collect(),
        })),
        Value::Map(entries) => Some(any_value::Value::KvlistValue(KeyValueList {
            values: entries
                .into_iter()
                .map(|(key, v)| KeyValue {
                    key,
                    value: Some(to_any(v)),
                    ..Default::default()
                })
                .collect(),
        })),
    };
    AnyValue { value }
}

pub(crate) fn eval_condition(
    condition: &Condition,
    target: &SpanTarget<'_>,
    pats: &Patterns,
) -> Result<bool, EvalError> {
    Ok(match condition {
        Condition::Or(terms) => {
            for term in terms {
                if eval_condition(term, target, pats)? {
                    return Ok(true);
                }
            }
            false
        }
        Condition::And(terms) => {
            for term in terms {
                if !eval_condition(term, target, pats)? {
                    return Ok(false);
                }
            }
            true
        }
        Condition::Not(inner) => !eval_condition(inner, target, pats)?,
        Condition::Const(b) => *b,
        Condition::Converter(call) => match convert(call, target, pats)? {
            Value::Bool(b) => b,
            other => return Err(type_error(&format!("{} to return a bool", call.name), &other)),
        },
        Condition::Compare(left, op, right) => compare(&eval(left, target, pats)?, *op, &eval(right, target, pats)?),
    })
}

/// The collector's comparison table: numbers compare across int and double, like types compare
/// normally, anything else is only ever "not equal".
fn compare(left: &Value, op: CompareOp, right: &Value) -> bool {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (left, right) {
        (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
        (Value::Int(a), Value::Double(b)) => (*a as f64).partial_cmp(b),
        (Value::Double(a), Value::Int(b)) => a.partial_cmp(&(*b as f64)),
        (Value::Double(a), Value::Double(b)) => a.partial_cmp(b),
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Bytes(a), Value::Bytes(b)) => Some(a.cmp(b)),
        (Value::Nil, Value::Nil) => Some(Ordering::Equal),
        (Value::Bytes(b), Value::Nil) | (Value::Nil, Value::Bytes(b)) if b.is_empty() => Some(Ordering::Equal),
        (a, b) if std::mem::discriminant(a) == std::mem::discriminant(b) => {
            return match op {
                CompareOp::Eq => a == b,
                CompareOp::Ne => a != b,
                _ => false,
            };
        }
        _ => None,
    };
    match (ordering, op) {
        (Some(o), CompareOp::Eq) => o == Ordering::Equal,
        (Some(o), CompareOp::Ne) => o != Ordering::Equal,
        (Some(o), CompareOp::Lt) => o == Ordering::Less,
        (Some(o), CompareOp::Le) => o != Ordering::Greater,
        (Some(o), CompareOp::Gt) => o == Ordering::Greater,
        (Some(o), CompareOp::Ge) => o != Ordering::Less,
        (None, CompareOp::Ne) => true,
        (None, _) => false,
    }
}

pub(crate) fn eval(expr: &Expr, target: &SpanTarget<'_>, pats: &Patterns) -> Result<Value, EvalError> {
    Ok(match expr {
        Expr::Nil => Value::Nil,
        Expr::Bool(b) => Value::Bool(*b),
        Expr::Int(n) => Value::Int(*n),
        Expr::Float(f) => Value::Double(*f),
        Expr::Str(s) => Value::Str(s.clone()),
        Expr::Bytes(b) => Value::Bytes(b.clone()),
        Expr::Enum(name) => Value::Int(enum_value(name).map_err(|e| EvalError::Type(e.0))?),
        Expr::Path(path) => get(path, target)?,
        Expr::List(items) => Value::List(items.iter().map(|e| eval(e, target, pats)).collect::<Result<_, _>>()?),
        Expr::Map(entries) => Value::Map(
            entries
                .iter()
                .map(|(k, e)| Ok((k.clone(), eval(e, target, pats)?)))
                .collect::<Result<_, EvalError>>()?,
        ),
        Expr::Converter(call) => {
            let mut value = convert(call, target, pats)?;
            for key in &call.keys {
                value = index(value, key);
            }
            value
        }
        Expr::Math(left, op, right) => math(eval(left, target, pats)?, *op, eval(right, target, pats)?)?,
    })
}

fn math(left: Value, op: MathOp, right: Value) -> Result<Value, EvalError> {
    match (left, right) {
        (Value::Int(a), Value::Int(b)) => {
            let result = match op {
                MathOp::Add => a.checked_add(b),
                MathOp::Sub => a.checked_sub(b),
                MathOp::Mul => a.checked_mul(b),
                MathOp::Div if b == 0 => return Err(EvalError::DivisionByZero),
                MathOp::Div => a.checked_div(b),
            };
            result
                .map(Value::Int)
                .ok_or_else(|| EvalError::Type("integer overflow".into()))
        }
        (Value::Double(a), Value::Double(b)) => Ok(Value::Double(match op {
            MathOp::Add => a + b,
            MathOp::Sub => a - b,
            MathOp::Mul => a * b,
            MathOp::Div if b == 0.0 => return Err(EvalError::DivisionByZero),
            MathOp::Div => a / b,
        })),
        (a, b) => Err(EvalError::Type(format!(
            "arithmetic needs two ints or two doubles, got {} and {}",
            type_name(&a),
            type_name(&b)
        ))),
    }
}

fn stringify(value: &Value) -> String {
    match value {
        Value::Nil => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Str(s) => s.clone(),
        Value::Bytes(b) => const_hex::encode(b),
        Value::List(_) | Value::Map(_) => serde_json::to_string(&to_json(value)).unwrap_or_default(),
    }
}

fn to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Nil => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(n) => (*n).into(),
        Value::Double(d) => (*d).into(),
        Value::Str(s) => s.clone().into(),
        Value::Bytes(b) => const_hex::encode(b).into(),
        Value::List(items) => items.iter().map(to_json).collect(),
        Value::Map(entries) => entries.iter().map(|(k, v)| (k.clone(), to_json(v))).collect(),
    }
}

fn convert(call: &Call, target: &SpanTarget<'_>, pats: &Patterns) -> Result<Value, EvalError> {
    let args: Vec<Value> = call
        .args
        .iter()
        .map(|Arg { value, .. }| eval(value, target, pats))
        .collect::<Result<_, _>>()?;
    let first = args.first().cloned().unwrap_or(Value::Nil);
    Ok(match call.name.as_str() {
        "IsRootSpan" => Value::Bool(target.span.parent_span_id.is_empty()),
        "Concat" => {
            let Value::List(items) = first else {
                return Err(type_error("Concat: a list", &first));
            };
            let delimiter = string_of(args[1].clone())?;
            Value::Str(items.iter().map(stringify).collect::<Vec<_>>().join(&delimiter))
        }
        "IsMatch" => {
            let pattern = string_of(args[1].clone())?;
            let compiled;
            let re = match pats.get(&pattern) {
                Some(re) => re,
                None => {
                    compiled = regex::Regex::new(&pattern).map_err(|e| EvalError::Type(format!("IsMatch: {e}")))?;
                    &compiled
                }
            };
            match first {
                Value::Nil => Value::Bool(false),
                Value::Str(s) => Value::Bool(re.is_match(&s)),
                Value::Int(_) | Value::Double(_) | Value::Bool(_) => Value::Bool(re.is_match(&stringify(&first))),
                other => return Err(type_error("IsMatch: a string", &other)),
            }
        }
        "Int" => match first {
            Value::Int(n) => Value::Int(n),
            Value::Double(d) if d.is_finite() => Value::Int(d.trunc() as i64),
            Value::Bool(b) => Value::Int(i64::from(b)),
            Value::Str(s) => s.trim().parse::<i64>().map_or(Value::Nil, Value::Int),
            _ => Value::Nil,
        },
        "Double" => match first {
            Value::Int(n) => Value::Double(n as f64),
            Value::Double(d) => Value::Double(d),
            Value::Bool(b) => Value::Double(if b { 1.0 } else { 0.0 }),
            Value::Str(s) => s.trim().parse::<f64>().map_or(Value::Nil, Value::Double),
            _ => Value::Nil,
        },
        "String" => match first {
            Value::Nil => Value::Nil,
            other => Value::Str(stringify(&other)),
        },
        "Len" => match first {
            Value::Str(s) => Value::Int(s.len() as i64),
            Value::Bytes(b) => Value::Int(b.len() as i64),
            Value::List(items) => Value::Int(items.len() as i64),
            Value::Map(entries) => Value::Int(entries.len() as i64),
            other => return Err(type_error("Len: a string, bytes, list or map", &other)),
        },
        "SHA256" => match first {
            Value::Str(s) => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes());
                Value::Str(const_hex::encode(digest.as_ref()))
            }
            Value::Nil => Value::Nil,
            other => return Err(type_error("SHA256: a string", &other)),
        },
        other => return Err(EvalError::Type(format!("unknown converter {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse::{parse_condition, parse_statement};
    use super::*;

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
        assert!(f.run(r#"set(attributes["mlflow.spanType"], "CHAT_MODEL") where attributes["gen_ai.operation.name"] == "chat""#).unwrap());
        assert_eq!(f.attr("mlflow.spanType"), s("CHAT_MODEL"));
        assert!(!f.run(r#"set(attributes["mlflow.spanType"], "TOOL") where attributes["gen_ai.operation.name"] == "execute_tool""#).unwrap());
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
}
