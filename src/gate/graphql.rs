//! GraphQL requests (`POST /graphql`): the document is parsed (graphql-parser) and every field of
//! every operation is authorized like the REST API it wraps. Unknown fields are admin-only.
use std::collections::HashMap;

use graphql_parser::query::{self as q, Definition, OperationDefinition, Selection, SelectionSet};
use serde_json::{Map, Value};

use super::canonical::CanonError;
use super::routes::Kind;
use super::targets::{Found, MAX_IDS};

/// What a GraphQL request needs (all of MLflow's GraphQL fields are reads).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    /// READ on these.
    pub(crate) found: Found,
    /// A field reads the model registry: READ everywhere.
    pub(crate) registry: bool,
    /// A field the gate does not know: admin only.
    pub(crate) admin: Vec<String>,
}

/// Deepest fragment nesting followed (MLflow's own safety check limits depth too).
const MAX_DEPTH: usize = 20;

/// Reads `{query, variables, operationName}` and returns what executing any of its operations needs.
pub(crate) fn needs(body: &Map<String, Value>) -> Result<Needs, CanonError> {
    let query = match body.get("query") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(CanonError::Body("GraphQL request without a query string".into())),
    };
    let vars = match body.get("variables") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(CanonError::Body("GraphQL variables must be an object".into())),
    };
    if !matches!(
        body.get("operationName"),
        None | Some(Value::Null) | Some(Value::String(_))
    ) {
        return Err(CanonError::Body("operationName must be a string".into()));
    }
    let doc = q::parse_query::<String>(query).map_err(|e| CanonError::Body(format!("GraphQL: {e}")))?;
    let fragments: HashMap<&str, &SelectionSet<String>> = doc
        .definitions
        .iter()
        .filter_map(|d| match d {
            Definition::Fragment(f) => Some((f.name.as_str(), &f.selection_set)),
            _ => None,
        })
        .collect();
    let mut out = Needs::default();
    for d in &doc.definitions {
        let Definition::Operation(op) = d else { continue };
        let (set, defs) = match op {
            OperationDefinition::SelectionSet(s) => (s, &[][..]),
            OperationDefinition::Query(x) => (&x.selection_set, &x.variable_definitions[..]),
            OperationDefinition::Mutation(x) => (&x.selection_set, &x.variable_definitions[..]),
            OperationDefinition::Subscription(x) => {
                out.admin.push("subscription".into());
                (&x.selection_set, &x.variable_definitions[..])
            }
        };
        // Variables MLflow will see: the request's, else the operation's defaults.
        let mut scope = vars.clone();
        for def in defs {
            if !scope.contains_key(&def.name)
                && let Some(v) = &def.default_value
            {
                scope.insert(def.name.clone(), to_json(v, &Map::new())?);
            }
        }
        top_level(set, &fragments, &scope, &mut out, 0)?;
    }
    if out.found.count() > MAX_IDS {
        return Err(CanonError::Body(format!("more than {MAX_IDS} ids in one request")));
    }
    Ok(out)
}

fn top_level<'a>(
    set: &'a SelectionSet<'a, String>,
    fragments: &HashMap<&str, &'a SelectionSet<'a, String>>,
    vars: &Map<String, Value>,
    out: &mut Needs,
    depth: usize,
) -> Result<(), CanonError> {
    if depth > MAX_DEPTH {
        return Err(CanonError::Body("GraphQL fragments nested too deeply".into()));
    }
    for sel in &set.items {
        match sel {
            Selection::Field(f) => {
                field(f, vars, out)?;
                nested(&f.selection_set, fragments, out, depth + 1)?;
            }
            Selection::InlineFragment(i) => top_level(&i.selection_set, fragments, vars, out, depth + 1)?,
            Selection::FragmentSpread(s) => match fragments.get(s.fragment_name.as_str()) {
                Some(set) => top_level(set, fragments, vars, out, depth + 1)?,
                None => return Err(CanonError::Body("unknown GraphQL fragment".into())),
            },
        }
    }
    Ok(())
}

/// Below the top level, fields read the parent's data, except a run's `modelVersions` (registry).
fn nested<'a>(
    set: &'a SelectionSet<'a, String>,
    fragments: &HashMap<&str, &'a SelectionSet<'a, String>>,
    out: &mut Needs,
    depth: usize,
) -> Result<(), CanonError> {
    if depth > MAX_DEPTH {
        return Err(CanonError::Body("GraphQL selection nested too deeply".into()));
    }
    for sel in &set.items {
        let inner = match sel {
            Selection::Field(f) => {
                if f.name == "modelVersions" {
                    out.registry = true;
                }
                &f.selection_set
            }
            Selection::InlineFragment(i) => &i.selection_set,
            Selection::FragmentSpread(s) => fragments
                .get(s.fragment_name.as_str())
                .copied()
                .ok_or_else(|| CanonError::Body("unknown GraphQL fragment".into()))?,
        };
        nested(inner, fragments, out, depth + 1)?;
    }
    Ok(())
}

fn field(f: &q::Field<String>, vars: &Map<String, Value>, out: &mut Needs) -> Result<(), CanonError> {
    let input = match f.arguments.iter().find(|(n, _)| n == "input") {
        Some((_, v)) => to_json(v, vars)?,
        None => Value::Null,
    };
    let ids = |key: &str| -> Result<Vec<String>, CanonError> {
        let mut v = Vec::new();
        match input.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => v.push(s.clone()),
            Some(Value::Array(xs)) => {
                for x in xs {
                    match x {
                        Value::String(s) => v.push(s.clone()),
                        Value::Null => {}
                        _ => return Err(CanonError::Body(format!("GraphQL {key} must be strings"))),
                    }
                }
            }
            Some(_) => return Err(CanonError::Body(format!("GraphQL {key} must be a string"))),
        }
        Ok(v)
    };
    let (kind, ids) = match f.name.as_str() {
        "__typename" | "__schema" | "__type" | "test" | "testMutation" => return Ok(()),
        "mlflowGetExperiment" => (Kind::Experiment, ids("experimentId")?),
        "mlflowSearchRuns" | "mlflowSearchDatasets" => (Kind::Experiment, ids("experimentIds")?),
        "mlflowGetRun" | "mlflowListArtifacts" => {
            let mut r = ids("runId")?;
            r.extend(ids("runUuid")?);
            (Kind::Run, r)
        }
        "mlflowGetMetricHistoryBulkInterval" => (Kind::Run, ids("runIds")?),
        "mlflowSearchModelVersions" => {
            out.registry = true;
            return Ok(());
        }
        other => {
            out.admin.push(other.chars().take(60).collect());
            return Ok(());
        }
    };
    // A field naming nothing reads across experiments: READ everywhere.
    if ids.is_empty() {
        out.found.everywhere = true;
    }
    ids.into_iter().try_for_each(|x| out.found.push(kind, x))
}

fn to_json(v: &q::Value<String>, vars: &Map<String, Value>) -> Result<Value, CanonError> {
    Ok(match v {
        q::Value::Variable(name) => vars.get(name).cloned().unwrap_or(Value::Null),
        q::Value::Int(n) => n.as_i64().map(Value::from).unwrap_or(Value::Null),
        q::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        q::Value::String(s) => Value::String(s.clone()),
        q::Value::Boolean(b) => Value::Bool(*b),
        q::Value::Null => Value::Null,
        q::Value::Enum(e) => Value::String(e.clone()),
        q::Value::List(xs) => Value::Array(xs.iter().map(|x| to_json(x, vars)).collect::<Result<_, _>>()?),
        q::Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), to_json(x, vars)?)))
                .collect::<Result<_, CanonError>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs_of(v: serde_json::Value) -> Result<Needs, CanonError> {
        needs(v.as_object().unwrap())
    }

    #[test]
    fn fields_are_authorized_each() {
        let n = needs_of(serde_json::json!({"query":
            "query Q($r: String) { a: mlflowGetRun(input: {runId: $r}) { run { info { runId } experiment { name } } }
               mlflowGetExperiment(input: {experimentId: \"2\"}) { experiment { name } }
               ...F }
             fragment F on Query { mlflowSearchRuns(input: {experimentIds: [\"3\", \"4\"]}) { runs { info { runId } } } }",
            "variables": {"r": "run-b"}, "operationName": "Q"}))
        .unwrap();
        assert_eq!(n.found.runs, ["run-b"]);
        let mut e = n.found.experiments.clone();
        e.sort();
        assert_eq!(e, ["2", "3", "4"]);
        assert!(!n.registry && n.admin.is_empty() && !n.found.everywhere);
    }

    #[test]
    fn unknown_registry_and_defaults() {
        let n = needs_of(serde_json::json!({"query": "{ mlflowSomethingNew { x } __typename }"})).unwrap();
        assert_eq!(n.admin, ["mlflowSomethingNew"]);
        let n = needs_of(serde_json::json!({"query":
            "{ mlflowGetRun(input: {runId: \"r\"}) { run { modelVersions { name } } } }"}))
        .unwrap();
        assert!(n.registry);
        let n = needs_of(serde_json::json!({"query":
            "query ($e: [String] = [\"9\"]) { mlflowSearchRuns(input: {experimentIds: $e}) { runs { info { runId } } } }"}))
        .unwrap();
        assert_eq!(n.found.experiments, ["9"]);
        let n = needs_of(
            serde_json::json!({"query": "mutation { mlflowSearchRuns(input: {}) { runs { info { runId } } } }"}),
        )
        .unwrap();
        assert!(
            n.found.everywhere,
            "a search naming no experiment needs READ everywhere"
        );
        let n = needs_of(serde_json::json!({"query": "subscription { x }"})).unwrap();
        assert!(!n.admin.is_empty());
    }

    #[test]
    fn refusals() {
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"query": "{"}),
            serde_json::json!({"query": "{ ...Missing }"}),
            serde_json::json!({"query": "{ x }", "variables": "{}"}),
            serde_json::json!({"query": "{ mlflowGetExperiment(input: {experimentId: 5}) { experiment { name } } }"}),
        ] {
            assert!(needs_of(bad.clone()).is_err(), "{bad}");
        }
        // Self-referencing fragments end at the depth bound instead of looping.
        let r = needs_of(serde_json::json!({"query": "{ ...A } fragment A on Query { ...A }"}));
        assert!(r.is_err());
    }
}
