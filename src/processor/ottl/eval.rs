//! OTTL evaluation on one span with its resource and scope: paths, comparisons, arithmetic, and
//! the editors and converters MLflow users reach for, on statements `compile` checked.
use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValue, KeyValueList, any_value};

pub(crate) use super::compile::{CompileError, Compiled, Patterns, compile, compile_condition};
use super::compile::{Place, enum_value, place_of};
use super::target::Compared;
pub(crate) use super::target::{SpanTarget, Target};
use super::{Arg, Call, CompareOp, Condition, Expr, Key, MathOp, Path};

/// A value while evaluating: OTLP's AnyValue, plus nil.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Value {
    #[default]
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

impl Compiled {
    /// Runs the statement when its condition holds; Ok(true) when the editor ran.
    pub(crate) fn execute(&self, target: &mut dyn Target) -> Result<bool, EvalError> {
        if let Some(condition) = &self.statement.condition
            && !eval_condition(condition, target, &self.patterns)?
        {
            return Ok(false);
        }
        self.edit(target)?;
        Ok(true)
    }

    /// Whether the statement edits nothing but its span (its editor's path is a span's):
    /// spans running it cannot see each other's edits.
    pub(crate) fn edits_only_the_span(&self) -> bool {
        match self.statement.editor.args.first().map(|a| &a.value) {
            Some(Expr::Path(path)) => matches!(place_of(path), Ok((Place::Span(_) | Place::Status(_), _))),
            _ => false,
        }
    }

    fn edit(&self, target: &mut dyn Target) -> Result<(), EvalError> {
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
                let path = path_of(arg(0))?;
                match place_of(path).map_err(|e| EvalError::Type(e.0))? {
                    (place, []) => {
                        if target.delete_key(place, &key).is_none() {
                            return Err(EvalError::Type(format!("{place:?} is not a map")));
                        }
                    }
                    _ => edit_map(arg(0), target, |map| map.retain(|kv| kv.key != key))?,
                }
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

pub(crate) fn type_error(wanted: &str, got: &Value) -> EvalError {
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
fn edit_map(expr: &Expr, target: &mut dyn Target, edit: impl FnOnce(&mut Vec<KeyValue>)) -> Result<(), EvalError> {
    let path = path_of(expr)?;
    let (place, keys) = place_of(path).map_err(|e| EvalError::Type(e.0))?;
    let mut edit = Some(edit);
    let mut result = Ok(());
    let found = target.edit_map(place, &mut |map| {
        let mut map = map;
        for key in keys {
            let Key::Str(key) = key else {
                result = Err(EvalError::Type("maps take string keys".into()));
                return;
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
                None => return,
            }
        }
        if let Some(edit) = edit.take() {
            edit(map);
        }
    });
    if found.is_none() {
        return Err(EvalError::Type(format!("{place:?} is not a map")));
    }
    result
}

fn get(path: &Path, target: &dyn Target) -> Result<Value, EvalError> {
    let (place, keys) = place_of(path).map_err(|e| EvalError::Type(e.0))?;
    // `attributes["k"]` looks the key up rather than copying the whole map first.
    if let Some((Key::Str(first), rest)) = keys.split_first()
        && let Some(found) = target.attr(place, first)
    {
        let mut value = found.map_or(Value::Nil, |a| a.value());
        for key in rest {
            value = index(value, key);
        }
        return Ok(value);
    }
    if let Some(mut value) = target.map_value(place) {
        for key in keys {
            value = index(value, key);
        }
        return Ok(value);
    }
    Ok(target.field(place))
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

/// Whether a place is an attribute map (the only places that take keys).
fn is_map(place: Place) -> bool {
    matches!(
        place,
        Place::Span("attributes")
            | Place::Resource("attributes")
            | Place::Scope("attributes")
            | Place::Event("attributes")
    )
}

fn set(path: &Path, target: &mut dyn Target, value: Value) -> Result<(), EvalError> {
    let (place, keys) = place_of(path).map_err(|e| EvalError::Type(e.0))?;
    if is_map(place) {
        return target
            .set_attr(place, keys, value)
            .unwrap_or_else(|| Err(EvalError::Type(format!("{place:?} is not available here"))));
    }
    target.set_field(place, value)
}

pub(crate) fn set_in_map(map: &mut Vec<KeyValue>, keys: &[Key], value: Value) -> Result<(), EvalError> {
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

pub(crate) fn eval_condition(condition: &Condition, target: &dyn Target, pats: &Patterns) -> Result<bool, EvalError> {
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
        Condition::Compare(left, op, right) => match compare_in_place(left, *op, right, target) {
            Some(result) => result,
            None => compare(&eval(left, target, pats)?, *op, &eval(right, target, pats)?),
        },
    })
}

/// `attributes["k"] == "v"`, `name == "v"` and `attributes["k"] != nil`, the commonest `where`
/// clauses and filter conditions, decided on the value in place: no copy of the value or the
/// literal per span. `None` for every other comparison (evaluated as usual), with the same
/// results as [`compare`].
fn compare_in_place(left: &Expr, op: CompareOp, right: &Expr, target: &dyn Target) -> Option<bool> {
    if !matches!(op, CompareOp::Eq | CompareOp::Ne) {
        return None;
    }
    let (path, literal) = match (left, right) {
        (Expr::Path(path), literal @ (Expr::Str(_) | Expr::Nil))
        | (literal @ (Expr::Str(_) | Expr::Nil), Expr::Path(path)) => (path, literal),
        _ => return None,
    };
    let (place, keys) = place_of(path).ok()?;
    let found;
    let value = match is_map(place) {
        true => {
            let [Key::Str(key)] = keys else {
                return None;
            };
            found = target.attr(place, key)?;
            // A missing key reads as nil.
            match found.as_ref().map_or(Compared::Nil, |a| a.compared()) {
                Compared::Undecided => return None,
                compared => compared,
            }
        }
        // String fields are never nil (an empty string is still a string).
        false => Compared::Str(target.str_field(place)?),
    };
    let equal = match (value, literal) {
        (Compared::Nil, Expr::Nil) => true,
        (Compared::Nil, _) | (_, Expr::Nil) => false,
        (Compared::Str(s), Expr::Str(l)) => s == l,
        _ => false,
    };
    Some(if matches!(op, CompareOp::Eq) { equal } else { !equal })
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

pub(crate) fn eval(expr: &Expr, target: &dyn Target, pats: &Patterns) -> Result<Value, EvalError> {
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

fn convert(call: &Call, target: &dyn Target, pats: &Patterns) -> Result<Value, EvalError> {
    if call.name == "IsRootSpan" {
        return Ok(Value::Bool(target.is_root_span()));
    }
    if call.name == "Concat"
        && let [
            Arg {
                value: Expr::List(items),
                ..
            },
            Arg {
                value: Expr::Str(delimiter),
                ..
            },
        ] = call.args.as_slice()
    {
        return concat(items, delimiter, target, pats);
    }
    let mut args: Vec<Value> = call
        .args
        .iter()
        .map(|Arg { value, .. }| eval(value, target, pats))
        .collect::<Result<_, _>>()?;
    // Each argument is used once, so taken out rather than copied.
    let mut take = |i: usize| args.get_mut(i).map_or(Value::Nil, std::mem::take);
    let first = take(0);
    Ok(match call.name.as_str() {
        "Concat" => {
            let Value::List(items) = first else {
                return Err(type_error("Concat: a list", &first));
            };
            let delimiter = string_of(take(1))?;
            let mut joined = String::new();
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    joined.push_str(&delimiter);
                }
                match item {
                    Value::Str(s) if joined.is_empty() => joined = s,
                    Value::Str(s) => joined.push_str(&s),
                    other => joined.push_str(&stringify(&other)),
                }
            }
            Value::Str(joined)
        }
        "IsMatch" => {
            let pattern = string_of(take(1))?;
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

/// `Concat([...], "delimiter")`, the common form: strings read where they are (literals, string
/// fields, string attributes) are appended as they are, without a copy of each and a list of
/// them; anything else is evaluated and stringified as the general path does.
fn concat(items: &[Expr], delimiter: &str, target: &dyn Target, pats: &Patterns) -> Result<Value, EvalError> {
    // Room for what the commonest joins take (a service name and a span name), grown once at
    // most beyond that.
    let mut joined = String::with_capacity(64);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            joined.push_str(delimiter);
        }
        if str_in_place(item, target, &mut |s| joined.push_str(s)) == Some(true) {
            continue;
        }
        match eval(item, target, pats)? {
            Value::Str(s) => joined.push_str(&s),
            other => joined.push_str(&stringify(&other)),
        }
    }
    Ok(Value::Str(joined))
}

/// Hands `f` what `item` evaluates to when that is a string readable in place (a literal, a
/// string field, a string attribute), or nothing when it is nil; `Some(false)` when it is
/// anything else and `None` when the item is not a literal or path, so the caller evaluates it.
fn str_in_place(item: &Expr, target: &dyn Target, f: &mut dyn FnMut(&str)) -> Option<bool> {
    let path = match item {
        Expr::Str(s) => {
            f(s);
            return Some(true);
        }
        Expr::Path(path) => path,
        _ => return None,
    };
    let (place, keys) = place_of(path).ok()?;
    if !is_map(place) {
        // String fields, borrowed; the others (numbers, bytes) are stringified by the caller.
        return Some(target.str_field(place).map(f).is_some());
    }
    let [Key::Str(key)] = keys else {
        return None;
    };
    match target.attr(place, key)? {
        // A missing key reads as nil, which stringifies to nothing.
        None => Some(true),
        Some(attr) => match attr.compared() {
            Compared::Str(s) => {
                f(s);
                Some(true)
            }
            Compared::Nil => Some(true),
            Compared::Other | Compared::Undecided => Some(false),
        },
    }
}

#[cfg(test)]
#[path = "eval_tests.rs"]
mod tests;
