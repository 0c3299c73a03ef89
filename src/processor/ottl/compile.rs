//! OTTL statements checked when compiled: editor and converter names and argument counts,
//! enums, literal patterns, and which paths the evaluator knows, so a typo is a config error,
//! not a runtime one.
use super::{Call, Condition, Expr, Key, Path, Statement};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CompileError(pub(crate) String);

/// A statement checked against the functions and paths this build knows.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub(super) statement: Statement,
    /// The editor's own pattern argument, when it has one.
    pub(super) regexes: Vec<regex::Regex>,
    pub(super) patterns: Patterns,
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

pub(crate) fn compile(mut statement: Statement) -> Result<Compiled, CompileError> {
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
    // After the checks, so their errors keep their order; every path resolved there already.
    for arg in &mut statement.editor.args {
        place_expr(&mut arg.value)?;
    }
    if let Some(condition) = &mut statement.condition {
        place_condition(condition)?;
    }
    Ok(Compiled {
        statement,
        regexes,
        patterns,
    })
}

/// A condition alone (the `filter` processor), checked like a statement's `where`.
pub(crate) fn compile_condition(mut condition: Condition) -> Result<(Condition, Patterns), CompileError> {
    let mut patterns = Patterns::new();
    check_condition(&condition, &mut patterns)?;
    place_condition(&mut condition)?;
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

/// Resolves every path once (see [`Path::place`]); an unknown path is an error here.
fn place_condition(condition: &mut Condition) -> Result<(), CompileError> {
    match condition {
        Condition::Or(terms) | Condition::And(terms) => terms.iter_mut().try_for_each(place_condition),
        Condition::Not(inner) => place_condition(inner),
        Condition::Const(_) => Ok(()),
        Condition::Converter(call) => call.args.iter_mut().try_for_each(|a| place_expr(&mut a.value)),
        Condition::Compare(left, _, right) => {
            place_expr(left)?;
            place_expr(right)
        }
    }
}

fn place_expr(expr: &mut Expr) -> Result<(), CompileError> {
    match expr {
        Expr::Path(path) => {
            path.place = Some(resolve(path)?.0);
            Ok(())
        }
        Expr::List(items) => items.iter_mut().try_for_each(place_expr),
        Expr::Map(entries) => entries.iter_mut().try_for_each(|(_, v)| place_expr(v)),
        Expr::Converter(call) => call.args.iter_mut().try_for_each(|a| place_expr(&mut a.value)),
        Expr::Math(left, _, right) => {
            place_expr(left)?;
            place_expr(right)
        }
        _ => Ok(()),
    }
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

pub(super) fn enum_value(name: &str) -> Result<i64, CompileError> {
    ENUMS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| CompileError(format!("unknown enum {name}")))
}

/// Where a path points, independent of any span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Span(&'static str),
    Status(&'static str),
    Resource(&'static str),
    Scope(&'static str),
    Event(&'static str),
}

/// The place of a path as compiled, resolved now when it was not (a path evaluated without
/// [`compile`]), and the keys after it.
pub(super) fn place_of(path: &Path) -> Result<(Place, &[Key]), CompileError> {
    match path.place {
        Some(place) => Ok((place, path.fields.last().map_or(&[][..], |f| f.keys.as_slice()))),
        None => resolve(path),
    }
}

/// The place and the keys after it (only maps take keys).
pub(super) fn resolve(path: &Path) -> Result<(Place, &[Key]), CompileError> {
    // Runs on every access of a statement (evaluation resolves its paths each time), so the
    // names go in an array, not a Vec: no allocation per span. Known paths have at most 3.
    let mut buf = [""; 4];
    let count = path.fields.len().min(buf.len());
    for (slot, field) in buf.iter_mut().zip(&path.fields) {
        *slot = field.name.as_str();
    }
    let names = &buf[..count];
    if path.fields.len() > buf.len() {
        let all: Vec<&str> = path.fields.iter().map(|f| f.name.as_str()).collect();
        return Err(CompileError(format!(
            "unknown path {:?} in the span context",
            all.join(".")
        )));
    }
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
        _ => names,
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
