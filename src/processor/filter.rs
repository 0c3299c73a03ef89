//! The `filter` processor: drops spans and span events for which any OTTL condition holds, with
//! the collector's keys (`error_mode`, `traces.span`, `traces.spanevent`). Scopes and resources
//! left without spans go too, as in the collector.
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use serde::Deserialize;

use super::ottl::Condition;
use super::ottl::context::Context;
use super::ottl::eval::{self, Patterns, SpanTarget, Target};
use super::transform::condition_in;
use super::{ErrorMode, ProcessError, ProcessorConfig, RequestContext, SpanProcessor, wire};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FilterConfig {
    pub(crate) error_mode: ErrorMode,
    pub(crate) traces: TracesConditions,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TracesConditions {
    pub(crate) span: Vec<String>,
    pub(crate) spanevent: Vec<String>,
}

type Compiled = Vec<(Condition, Patterns)>;

impl FilterConfig {
    fn compiled(&self) -> Result<(Compiled, Compiled), Vec<(String, String)>> {
        let mut errors = Vec::new();
        let mut compile = |list: &[String], context: Context| -> Compiled {
            let mut out = Vec::new();
            for (i, text) in list.iter().enumerate() {
                match condition_in(text, context) {
                    Ok(c) => out.push(c),
                    Err(e) => errors.push((format!("traces.{}[{i}]", context.name()), e)),
                }
            }
            out
        };
        let span = compile(&self.traces.span, Context::Span);
        let event = compile(&self.traces.spanevent, Context::Spanevent);
        if errors.is_empty() {
            Ok((span, event))
        } else {
            Err(errors)
        }
    }
}

impl ProcessorConfig for FilterConfig {
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        if let Err(errors) = self.compiled() {
            for (at, message) in errors {
                err(format!("{path}.{at}"), message);
            }
        }
    }

    fn span_processor(&self, id: &str) -> Option<Box<dyn SpanProcessor>> {
        let (span, event) = self.compiled().ok()?;
        Some(Box::new(Filter {
            id: id.to_string(),
            error_mode: self.error_mode,
            span,
            event,
        }))
    }
}

struct Filter {
    id: String,
    error_mode: ErrorMode,
    span: Compiled,
    event: Compiled,
}

impl Filter {
    /// Whether any condition holds; a condition that fails on the data does not (unless
    /// `propagate`, which refuses the request).
    fn any(&self, conditions: &Compiled, target: &dyn Target) -> Result<bool, ProcessError> {
        for (condition, patterns) in conditions {
            match eval::eval_condition(condition, target, patterns) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) => self.error_mode.handle(&self.id, e)?,
            }
        }
        Ok(false)
    }
}

impl SpanProcessor for Filter {
    fn on_wire(&self) -> bool {
        self.event.is_empty()
    }

    fn process_wire(&self, record: &mut wire::Record<'_>, _request: &RequestContext) -> Result<(), ProcessError> {
        // As the prost path: ScopeSpans left without spans go, whatever the conditions.
        record.drop_empty_scopes = true;
        record.insert_defaults(true);
        if self.span.is_empty() {
            return Ok(());
        }
        record.each_span(|target| {
            if self.any(&self.span, target)? {
                target.drop_span();
            }
            Ok(())
        })
    }

    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError> {
        let resource = rs.resource.get_or_insert_with(Default::default);
        for ss in &mut rs.scope_spans {
            let scope = ss.scope.get_or_insert_with(Default::default);
            let mut spans = std::mem::take(&mut ss.spans);
            let mut result = Ok(());
            spans.retain_mut(|span| {
                if result.is_err() {
                    return true;
                }
                if !self.event.is_empty() {
                    let mut events = std::mem::take(&mut span.events);
                    events.retain_mut(|event| {
                        if result.is_err() {
                            return true;
                        }
                        let target = SpanTarget {
                            resource: &mut *resource,
                            scope: &mut *scope,
                            span: &mut *span,
                            event: Some(event),
                        };
                        match self.any(&self.event, &target) {
                            Ok(drop) => !drop,
                            Err(e) => {
                                result = Err(e);
                                true
                            }
                        }
                    });
                    span.events = events;
                }
                if self.span.is_empty() || result.is_err() {
                    return true;
                }
                let target = SpanTarget {
                    resource: &mut *resource,
                    scope: &mut *scope,
                    span,
                    event: None,
                };
                match self.any(&self.span, &target) {
                    Ok(drop) => !drop,
                    Err(e) => {
                        result = Err(e);
                        true
                    }
                }
            });
            ss.spans = spans;
            result?;
        }
        rs.scope_spans.retain(|ss| !ss.spans.is_empty());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::wire::testdata;
    use opentelemetry_proto::tonic::trace::v1::span::Event;

    fn filter(yaml: &str) -> Box<dyn SpanProcessor> {
        let c: FilterConfig = serde_norway::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        c.validate("processors.filter", &mut |p, m| errs.push(format!("{p}: {m}")));
        assert!(errs.is_empty(), "{errs:?}");
        c.span_processor("filter").unwrap()
    }

    #[test]
    fn drops_spans_and_events_where_any_condition_holds() {
        let f = filter(
            r#"
error_mode: ignore
traces:
  span: ['name == "GET /v1/models"', 'attributes["health"] == true']
  spanevent: ['name == "noise"']
"#,
        );
        let mut rs = testdata::resource_spans("svc", 1, 2, 2);
        rs.scope_spans[0].spans[0].name = "GET /v1/models".into();
        rs.scope_spans[1].spans[0].name = "GET /v1/models".into();
        rs.scope_spans[1].spans[1].name = "GET /v1/models".into();
        rs.scope_spans[0].spans[1].events = vec![
            Event {
                name: "noise".into(),
                ..Default::default()
            },
            Event {
                name: "kept".into(),
                ..Default::default()
            },
        ];
        f.process(&mut rs).unwrap();
        assert_eq!(rs.scope_spans.len(), 1, "the emptied scope is gone");
        let spans = &rs.scope_spans[0].spans;
        assert_eq!(spans.len(), 1);
        assert_ne!(spans[0].name, "GET /v1/models");
        let events: Vec<&str> = spans[0].events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(events, vec!["kept"]);
    }

    #[test]
    fn a_failing_condition_keeps_the_span_unless_propagate() {
        // Arithmetic on a missing attribute fails on every span.
        let cond = r#"traces: {span: ['attributes["missing"] + 1 > 0']}"#;
        let mut rs = testdata::resource_spans("svc", 1, 1, 3);
        filter(&format!("error_mode: ignore\n{cond}")).process(&mut rs).unwrap();
        assert_eq!(rs.scope_spans[0].spans.len(), 3);
        let err = filter(&format!("error_mode: propagate\n{cond}")).process(&mut rs);
        assert!(err.is_err());
        assert_eq!(
            rs.scope_spans[0].spans.len(),
            3,
            "nothing dropped on a propagated error"
        );
    }

    #[test]
    fn bad_conditions_are_config_errors() {
        let c: FilterConfig =
            serde_norway::from_str(r#"traces: {span: ['name == '], spanevent: ['resource.name == "x"']}"#).unwrap();
        let mut errs = Vec::new();
        c.validate("processors.filter", &mut |p, m| errs.push(format!("{p}: {m}")));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("processors.filter.traces.span[0]: column"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("processors.filter.traces.spanevent[0]:"),
            "{errs:?}"
        );
        assert!(serde_norway::from_str::<FilterConfig>("spans: {include: {}}").is_err());
    }
}
