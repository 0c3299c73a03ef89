//! The `transform` processor: OTTL statements that edit resources, scopes, spans and span events,
//! with the collector's keys (`error_mode`, `trace_statements` as a flat list or as groups of
//! `context` / `statements` / `conditions`).
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use serde::Deserialize;

use super::ottl::context::Context;
use super::ottl::eval::{self, CompileError, Compiled, Patterns, SpanTarget, Target};
use super::ottl::{Condition, parse};
use super::{ErrorMode, ProcessError, ProcessorConfig, RequestContext, SpanProcessor, wire};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TransformConfig {
    pub(crate) error_mode: ErrorMode,
    pub(crate) trace_statements: Vec<StatementEntry>,
}

/// One entry of `trace_statements`: a statement (its context inferred from its paths), or a
/// group of statements in a context, run where any of its conditions holds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub(crate) enum StatementEntry {
    Flat(String),
    Group(StatementGroup),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatementGroup {
    pub(crate) context: Option<Context>,
    #[serde(default)]
    pub(crate) statements: Vec<String>,
    #[serde(default)]
    pub(crate) conditions: Vec<String>,
    pub(crate) error_mode: Option<ErrorMode>,
}

/// Statements of one context, compiled, run in order.
struct Group {
    context: Context,
    conditions: Vec<(Condition, Patterns)>,
    statements: Vec<Compiled>,
    error_mode: ErrorMode,
}

/// A statement's text compiled in `context` (inferred when `None`).
fn compile_in(text: &str, context: Option<Context>) -> Result<(Context, Compiled), String> {
    let mut statement = parse::parse_statement(text).map_err(|e| e.to_string())?;
    let context = context.unwrap_or_else(|| Context::infer(&statement));
    context.rebase_statement(&mut statement).map_err(|e| e.0)?;
    let compiled = eval::compile(statement).map_err(|e| e.0)?;
    Ok((context, compiled))
}

/// A condition's text compiled in `context`.
pub(crate) fn condition_in(text: &str, context: Context) -> Result<(Condition, Patterns), String> {
    let mut condition = parse::parse_condition(text).map_err(|e| e.to_string())?;
    context.rebase_condition(&mut condition).map_err(|e| e.0)?;
    eval::compile_condition(condition).map_err(|CompileError(e)| e)
}

impl TransformConfig {
    /// Every statement compiled, or each problem with its path below `trace_statements`.
    fn groups(&self) -> Result<Vec<Group>, Vec<(String, String)>> {
        let mut groups = Vec::new();
        let mut errors = Vec::new();
        for (i, entry) in self.trace_statements.iter().enumerate() {
            match entry {
                StatementEntry::Flat(text) => match compile_in(text, None) {
                    Ok((context, compiled)) => groups.push(Group {
                        context,
                        conditions: Vec::new(),
                        statements: vec![compiled],
                        error_mode: self.error_mode,
                    }),
                    Err(e) => errors.push((format!("trace_statements[{i}]"), e)),
                },
                StatementEntry::Group(g) => {
                    let context = g.context.unwrap_or(Context::Span);
                    let mut group = Group {
                        context,
                        conditions: Vec::new(),
                        statements: Vec::new(),
                        error_mode: g.error_mode.unwrap_or(self.error_mode),
                    };
                    if g.statements.is_empty() {
                        errors.push((
                            format!("trace_statements[{i}].statements"),
                            "list at least one statement".into(),
                        ));
                    }
                    for (j, text) in g.statements.iter().enumerate() {
                        match compile_in(text, Some(context)) {
                            Ok((_, c)) => group.statements.push(c),
                            Err(e) => errors.push((format!("trace_statements[{i}].statements[{j}]"), e)),
                        }
                    }
                    for (j, text) in g.conditions.iter().enumerate() {
                        match condition_in(text, context) {
                            Ok(c) => group.conditions.push(c),
                            Err(e) => errors.push((format!("trace_statements[{i}].conditions[{j}]"), e)),
                        }
                    }
                    groups.push(group);
                }
            }
        }
        if errors.is_empty() { Ok(groups) } else { Err(errors) }
    }
}

impl ProcessorConfig for TransformConfig {
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        if let Err(errors) = self.groups() {
            for (at, message) in errors {
                err(format!("{path}.{at}"), message);
            }
        }
    }

    fn span_processor(&self, id: &str) -> Option<Box<dyn SpanProcessor>> {
        // Validation compiled the same statements already, so this does not fail.
        let groups = self.groups().ok()?;
        Some(Box::new(Transform {
            id: id.to_string(),
            groups,
        }))
    }
}

struct Transform {
    id: String,
    groups: Vec<Group>,
}

impl Group {
    /// Runs the group's statements on one target, when any of its conditions holds.
    fn run(&self, id: &str, target: &mut dyn Target) -> Result<(), ProcessError> {
        if !self.conditions.is_empty() {
            let mut any = false;
            for (condition, patterns) in &self.conditions {
                match eval::eval_condition(condition, target, patterns) {
                    Ok(true) => {
                        any = true;
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => self.error_mode.handle(id, e)?,
                }
            }
            if !any {
                return Ok(());
            }
        }
        for statement in &self.statements {
            if let Err(e) = statement.execute(target) {
                self.error_mode.handle(id, e)?;
            }
        }
        Ok(())
    }
}

impl Transform {
    /// The span groups from `first` on that run in one pass over the spans, each span taking
    /// them in order. The collector runs each group over every span before the next group;
    /// that gives the same spans when none of the groups writes what other spans read (the
    /// resource, the scope): a span's own edits are seen by its later statements either way.
    fn span_run(&self, first: usize) -> &[Group] {
        let spans_only =
            |g: &Group| g.context == Context::Span && g.statements.iter().all(Compiled::edits_only_the_span);
        let mut end = first + 1;
        if self.groups.get(first).is_some_and(spans_only) {
            while self.groups.get(end).is_some_and(spans_only) {
                end += 1;
            }
        }
        &self.groups[first..end]
    }
}

impl SpanProcessor for Transform {
    fn on_wire(&self) -> bool {
        self.groups.iter().all(|g| g.context != Context::Spanevent)
    }

    fn process_wire(&self, record: &mut wire::Record<'_>, _request: &RequestContext) -> Result<(), ProcessError> {
        record.insert_defaults(false);
        let mut skip = 0;
        for (i, group) in self.groups.iter().enumerate() {
            if skip > 0 {
                skip -= 1;
                continue;
            }
            match group.context {
                Context::Resource => {
                    let (resource, span) = record.placeholder();
                    let mut scope = InstrumentationScope::default();
                    let mut target = SpanTarget {
                        resource,
                        scope: &mut scope,
                        span,
                        event: None,
                    };
                    group.run(&self.id, &mut target)?;
                }
                Context::Scope => record.scopes_mut(|resource, scope, span| {
                    // (scopes_mut gives every ScopeSpans a scope, as `process` does.)
                    let mut target = SpanTarget {
                        resource,
                        scope,
                        span,
                        event: None,
                    };
                    group.run(&self.id, &mut target)
                })?,
                Context::Span => {
                    record.insert_defaults(true);
                    let run = self.span_run(i);
                    record.each_span(|target| run.iter().try_for_each(|g| g.run(&self.id, &mut *target)))?;
                    skip = run.len() - 1;
                }
                Context::Spanevent => {
                    return Err(ProcessError {
                        processor: self.id.clone(),
                        message: "spanevent statements do not run on protobuf bytes".into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError> {
        let resource = rs.resource.get_or_insert_with(Default::default);
        for group in &self.groups {
            match group.context {
                Context::Resource => {
                    let (mut scope, mut span) = (InstrumentationScope::default(), Span::default());
                    let mut target = SpanTarget {
                        resource: &mut *resource,
                        scope: &mut scope,
                        span: &mut span,
                        event: None,
                    };
                    group.run(&self.id, &mut target)?;
                }
                Context::Scope => {
                    for ss in &mut rs.scope_spans {
                        let mut span = Span::default();
                        let mut target = SpanTarget {
                            resource: &mut *resource,
                            scope: ss.scope.get_or_insert_with(Default::default),
                            span: &mut span,
                            event: None,
                        };
                        group.run(&self.id, &mut target)?;
                    }
                }
                Context::Span => {
                    for ss in &mut rs.scope_spans {
                        let scope = ss.scope.get_or_insert_with(Default::default);
                        for span in &mut ss.spans {
                            let mut target = SpanTarget {
                                resource: &mut *resource,
                                scope: &mut *scope,
                                span,
                                event: None,
                            };
                            group.run(&self.id, &mut target)?;
                        }
                    }
                }
                Context::Spanevent => {
                    for ss in &mut rs.scope_spans {
                        let scope = ss.scope.get_or_insert_with(Default::default);
                        for span in &mut ss.spans {
                            // The event is edited apart from its span, then put back.
                            let mut events = std::mem::take(&mut span.events);
                            let mut result = Ok(());
                            for event in &mut events {
                                let mut target = SpanTarget {
                                    resource: &mut *resource,
                                    scope: &mut *scope,
                                    span: &mut *span,
                                    event: Some(event),
                                };
                                result = group.run(&self.id, &mut target);
                                if result.is_err() {
                                    break;
                                }
                            }
                            span.events = events;
                            result?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::wire::testdata;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::span::Event;

    fn config(yaml: &str) -> TransformConfig {
        serde_norway::from_str(yaml).unwrap()
    }

    fn errors(c: &TransformConfig) -> Vec<String> {
        let mut out = Vec::new();
        c.validate("processors.transform", &mut |p, m| out.push(format!("{p}: {m}")));
        out
    }

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    fn str_value(s: &str) -> Option<AnyValue> {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(s.into())),
        })
    }

    #[test]
    fn flat_and_grouped_statements_in_every_context() {
        let c = config(
            r#"
error_mode: ignore
trace_statements:
  - set(span.attributes["mlflow.spanType"], "CHAT_MODEL") where span.attributes["gen_ai.operation.name"] == "chat"
  - context: resource
    statements: ['set(attributes["service.name"], "support-agent")']
  - context: scope
    statements: ['set(name, "renamed")']
  - context: span
    conditions: ['IsRootSpan()']
    statements: ['set(attributes["root"], true)']
  - context: spanevent
    statements: ['set(attributes["seen"], span.name)']
"#,
        );
        assert_eq!(errors(&c), Vec::<String>::new());
        let mut rs = testdata::resource_spans("svc", 1, 1, 2);
        let spans = &mut rs.scope_spans[0].spans;
        spans[0].attributes.push(KeyValue {
            key: "gen_ai.operation.name".into(),
            value: str_value("chat"),
            ..Default::default()
        });
        spans[0].parent_span_id = Vec::new();
        spans[1].parent_span_id = vec![1; 8];
        spans[1].events.push(Event {
            name: "e".into(),
            ..Default::default()
        });
        let p = c.span_processor("transform").unwrap();
        p.process(&mut rs).unwrap();
        let resource = rs.resource.as_ref().unwrap();
        assert_eq!(
            attr(&resource.attributes, "service.name"),
            Some(&any_value::Value::StringValue("support-agent".into()))
        );
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "renamed");
        assert_eq!(
            attr(&ss.spans[0].attributes, "mlflow.spanType"),
            Some(&any_value::Value::StringValue("CHAT_MODEL".into()))
        );
        assert_eq!(attr(&ss.spans[1].attributes, "mlflow.spanType"), None);
        assert_eq!(
            attr(&ss.spans[0].attributes, "root"),
            Some(&any_value::Value::BoolValue(true))
        );
        assert_eq!(attr(&ss.spans[1].attributes, "root"), None);
        assert_eq!(
            attr(&ss.spans[1].events[0].attributes, "seen"),
            Some(&any_value::Value::StringValue(ss.spans[1].name.clone()))
        );
    }

    #[test]
    fn bad_statements_are_reported_at_their_path_with_a_column() {
        let c = config(
            r#"
trace_statements:
  - 'set(attributes["a"], "x" where'
  - context: resource
    statements: ['set(name, "x")', 'set(attributes["a"], "b") where IsRootSpan()']
    conditions: ['attributes["x"] == ']
  - context: span
    statements: ['set(spanevent.name, "x")', 'frobnicate(name)']
"#,
        );
        let errs = errors(&c);
        let has = |p: &str, m: &str| errs.iter().any(|e| e.starts_with(p) && e.contains(m));
        assert!(
            has("processors.transform.trace_statements[0]: column", "column"),
            "{errs:#?}"
        );
        assert!(
            has(
                "processors.transform.trace_statements[1].statements[0]:",
                "unknown path"
            ),
            "{errs:#?}"
        );
        assert!(
            has("processors.transform.trace_statements[1].statements[1]:", "IsRootSpan"),
            "{errs:#?}"
        );
        assert!(
            has("processors.transform.trace_statements[1].conditions[0]: column", ""),
            "{errs:#?}"
        );
        assert!(
            has("processors.transform.trace_statements[2].statements[0]:", "spanevent"),
            "{errs:#?}"
        );
        assert!(
            has(
                "processors.transform.trace_statements[2].statements[1]:",
                "unknown editor"
            ),
            "{errs:#?}"
        );
        assert_eq!(errs.len(), 6, "{errs:#?}");
    }

    #[test]
    fn error_modes() {
        // `Int` of a map fails at runtime: arithmetic of a nil and an int.
        let statement = r#"set(attributes["n"], attributes["missing"] + 1)"#;
        let mut rs = testdata::resource_spans("svc", 1, 1, 1);
        for (mode, fails) in [("propagate", true), ("ignore", false), ("silent", false)] {
            let c = config(&format!(
                "error_mode: {mode}\ntrace_statements: ['{statement}', 'set(attributes[\"after\"], 1)']"
            ));
            let p = c.span_processor("t").unwrap();
            let result = p.process(&mut rs);
            assert_eq!(result.is_err(), fails, "{mode}");
            if !fails {
                assert!(
                    attr(&rs.scope_spans[0].spans[0].attributes, "after").is_some(),
                    "{mode}: the next statement ran"
                );
            }
        }
        let unknown: Result<TransformConfig, _> = serde_norway::from_str("error_mode: loud");
        assert!(unknown.is_err());
    }
}
