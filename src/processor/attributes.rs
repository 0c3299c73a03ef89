//! The `attributes` processor: attribute actions on span attributes, limited to the spans its
//! `include` properties match and its `exclude` properties do not (the collector's keys:
//! `match_type` strict or regexp; `services`, `span_names`, `span_kinds`, `attributes`,
//! `resources`, `libraries`).
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use serde::Deserialize;

use super::actions::{ActionConfig, Actions};
use super::ottl::compile::Place;
use super::ottl::eval::{Value, from_any};
use super::ottl::target::Target;
use super::{ProcessError, ProcessorConfig, RequestContext, SpanProcessor, wire};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AttributesConfig {
    pub(crate) actions: Vec<ActionConfig>,
    pub(crate) include: Option<MatchConfig>,
    pub(crate) exclude: Option<MatchConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum MatchType {
    Strict,
    Regexp,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchConfig {
    pub(crate) match_type: MatchType,
    #[serde(default)]
    pub(crate) services: Vec<String>,
    #[serde(default)]
    pub(crate) span_names: Vec<String>,
    #[serde(default)]
    pub(crate) span_kinds: Vec<String>,
    #[serde(default)]
    pub(crate) attributes: Vec<AttributeMatch>,
    #[serde(default)]
    pub(crate) resources: Vec<AttributeMatch>,
    #[serde(default)]
    pub(crate) libraries: Vec<LibraryMatch>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AttributeMatch {
    pub(crate) key: String,
    pub(crate) value: Option<serde_norway::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LibraryMatch {
    pub(crate) name: String,
    pub(crate) version: Option<String>,
}

/// A string pattern: equality, or a regexp found anywhere in the text (as the collector's).
#[derive(Debug, Clone)]
enum Pattern {
    Strict(String),
    Regexp(regex::Regex),
}

impl Pattern {
    fn new(match_type: MatchType, text: &str) -> Result<Pattern, String> {
        match match_type {
            MatchType::Strict => Ok(Pattern::Strict(text.to_string())),
            MatchType::Regexp => regex::Regex::new(text)
                .map(Pattern::Regexp)
                .map_err(|e| format!("not a valid regular expression: {e}")),
        }
    }

    fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Strict(s) => s == text,
            Pattern::Regexp(re) => re.is_match(text),
        }
    }
}

/// An attribute the span must have: any value, a value equal to a literal, or (regexp) a
/// string value the pattern matches.
#[derive(Debug, Clone)]
struct AttrRule {
    key: String,
    value: Option<ValueRule>,
}

#[derive(Debug, Clone)]
enum ValueRule {
    Equal(Value),
    Pattern(Pattern),
}

impl AttrRule {
    fn holds(&self, attrs: &[KeyValue]) -> bool {
        let Some(kv) = attrs.iter().find(|kv| kv.key == self.key) else {
            return false;
        };
        let value = from_any(kv.value.as_ref());
        match &self.value {
            None => true,
            Some(ValueRule::Equal(v)) => *v == value,
            Some(ValueRule::Pattern(p)) => matches!(&value, Value::Str(s) if p.matches(s)),
        }
    }
}

/// `include` or `exclude`, compiled: every property given must match.
#[derive(Debug, Clone)]
struct Matcher {
    services: Vec<Pattern>,
    span_names: Vec<Pattern>,
    span_kinds: Vec<i32>,
    attributes: Vec<AttrRule>,
    resources: Vec<AttrRule>,
    libraries: Vec<(Pattern, Option<Pattern>)>,
}

const SPAN_KINDS: &[(&str, &str, i32)] = &[
    ("SPAN_KIND_UNSPECIFIED", "Unspecified", 0),
    ("SPAN_KIND_INTERNAL", "Internal", 1),
    ("SPAN_KIND_SERVER", "Server", 2),
    ("SPAN_KIND_CLIENT", "Client", 3),
    ("SPAN_KIND_PRODUCER", "Producer", 4),
    ("SPAN_KIND_CONSUMER", "Consumer", 5),
];

impl Matcher {
    fn compile(c: &MatchConfig, path: &str, err: &mut dyn FnMut(String, String)) -> Option<Matcher> {
        let mut ok = true;
        let mut pattern = |field: String, text: &str| match Pattern::new(c.match_type, text) {
            Ok(p) => Some(p),
            Err(e) => {
                ok = false;
                err(format!("{path}.{field}"), e);
                None
            }
        };
        let list = |name: &str, items: &[String], pattern: &mut dyn FnMut(String, &str) -> Option<Pattern>| {
            items
                .iter()
                .enumerate()
                .filter_map(|(i, t)| pattern(format!("{name}[{i}]"), t))
                .collect::<Vec<_>>()
        };
        let services = list("services", &c.services, &mut pattern);
        let span_names = list("span_names", &c.span_names, &mut pattern);
        let rules = |name: &str, items: &[AttributeMatch], pattern: &mut dyn FnMut(String, &str) -> Option<Pattern>| {
            let mut out = Vec::new();
            for (i, a) in items.iter().enumerate() {
                let value = match (&a.value, c.match_type) {
                    (None, _) => None,
                    (Some(serde_norway::Value::String(s)), MatchType::Regexp) => {
                        pattern(format!("{name}[{i}].value"), s).map(ValueRule::Pattern)
                    }
                    (Some(v), _) => Some(ValueRule::Equal(scalar(v))),
                };
                out.push(AttrRule {
                    key: a.key.clone(),
                    value,
                });
            }
            out
        };
        let attributes = rules("attributes", &c.attributes, &mut pattern);
        let resources = rules("resources", &c.resources, &mut pattern);
        let libraries = c
            .libraries
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let name = pattern(format!("libraries[{i}].name"), &l.name)?;
                let version = match &l.version {
                    Some(v) => Some(pattern(format!("libraries[{i}].version"), v)?),
                    None => None,
                };
                Some((name, version))
            })
            .collect();
        let mut span_kinds = Vec::new();
        for (i, k) in c.span_kinds.iter().enumerate() {
            match SPAN_KINDS.iter().find(|(long, short, _)| k == long || k == short) {
                Some((_, _, n)) => span_kinds.push(*n),
                None => {
                    ok = false;
                    err(
                        format!("{path}.span_kinds[{i}]"),
                        format!("unknown span kind {k:?} (e.g. SPAN_KIND_SERVER)"),
                    );
                }
            }
        }
        ok.then_some(Matcher {
            services,
            span_names,
            span_kinds,
            attributes,
            resources,
            libraries,
        })
    }

    fn matches(&self, resource: &Resource, scope: &InstrumentationScope, span: &Span) -> bool {
        let any = |list: &[Pattern], text: &str| list.is_empty() || list.iter().any(|p| p.matches(text));
        let service = resource
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .map(|kv| from_any(kv.value.as_ref()));
        let service = match &service {
            Some(Value::Str(s)) => s.as_str(),
            _ => "",
        };
        any(&self.services, service)
            && any(&self.span_names, &span.name)
            && (self.span_kinds.is_empty() || self.span_kinds.contains(&span.kind))
            && self.attributes.iter().all(|r| r.holds(&span.attributes))
            && self.resources.iter().all(|r| r.holds(&resource.attributes))
            && (self.libraries.is_empty()
                || self.libraries.iter().any(|(name, version)| {
                    name.matches(&scope.name) && version.as_ref().is_none_or(|v| v.matches(&scope.version))
                }))
    }
}

fn scalar(v: &serde_norway::Value) -> Value {
    use serde_norway::Value as Y;
    match v {
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => n
            .as_i64()
            .map_or_else(|| Value::Double(n.as_f64().unwrap_or(f64::NAN)), Value::Int),
        Y::String(s) => Value::Str(s.clone()),
        _ => Value::Nil,
    }
}

impl ProcessorConfig for AttributesConfig {
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        if self.actions.is_empty() {
            err(format!("{path}.actions"), "list at least one action".into());
        }
        Actions::compile(&self.actions, &format!("{path}.actions"), err);
        if let Some(m) = &self.include {
            Matcher::compile(m, &format!("{path}.include"), err);
        }
        if let Some(m) = &self.exclude {
            Matcher::compile(m, &format!("{path}.exclude"), err);
        }
    }

    fn span_processor(&self, _id: &str) -> Option<Box<dyn SpanProcessor>> {
        let mut ignore = |_: String, _: String| {};
        let actions = Actions::compile(&self.actions, "", &mut ignore)?;
        let include = match &self.include {
            Some(m) => Some(Matcher::compile(m, "", &mut ignore)?),
            None => None,
        };
        let exclude = match &self.exclude {
            Some(m) => Some(Matcher::compile(m, "", &mut ignore)?),
            None => None,
        };
        Some(Box::new(AttributesProcessor {
            actions,
            include,
            exclude,
        }))
    }
}

struct AttributesProcessor {
    actions: Actions,
    include: Option<Matcher>,
    exclude: Option<Matcher>,
}

impl SpanProcessor for AttributesProcessor {
    fn on_wire(&self) -> bool {
        true
    }

    fn process_wire(&self, record: &mut wire::Record<'_>, request: &RequestContext) -> Result<(), ProcessError> {
        record.each_span(|target| {
            if self.include.is_some() || self.exclude.is_some() {
                // Matching reads the whole span: decoded, only for processors that match.
                let span = target.decoded();
                let (resource, scope) = (target.resource(), target.scope());
                let included = self.include.as_ref().is_none_or(|m| m.matches(resource, scope, &span));
                let excluded = self.exclude.as_ref().is_some_and(|m| m.matches(resource, scope, &span));
                if !included || excluded {
                    return Ok(());
                }
            }
            target.edit_map(Place::Span("attributes"), &mut |attrs| {
                self.actions.apply(attrs, request)
            });
            Ok(())
        })
    }

    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError> {
        self.process_in(rs, &RequestContext::default())
    }

    fn process_in(&self, rs: &mut ResourceSpans, request: &RequestContext) -> Result<(), ProcessError> {
        let empty = Resource::default();
        let resource = rs.resource.as_ref().unwrap_or(&empty);
        for ss in &mut rs.scope_spans {
            let no_scope = InstrumentationScope::default();
            let scope = ss.scope.as_ref().unwrap_or(&no_scope);
            for span in &mut ss.spans {
                let included = self.include.as_ref().is_none_or(|m| m.matches(resource, scope, span));
                let excluded = self.exclude.as_ref().is_some_and(|m| m.matches(resource, scope, span));
                if included && !excluded {
                    self.actions.apply(&mut span.attributes, request);
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

    fn processor(yaml: &str) -> Box<dyn SpanProcessor> {
        let c: AttributesConfig = serde_norway::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        c.validate("processors.attributes", &mut |p, m| errs.push(format!("{p}: {m}")));
        assert!(errs.is_empty(), "{errs:?}");
        c.span_processor("attributes").unwrap()
    }

    fn tagged(rs: &ResourceSpans) -> Vec<bool> {
        rs.scope_spans
            .iter()
            .flat_map(|ss| &ss.spans)
            .map(|s| s.attributes.iter().any(|kv| kv.key == "tagged"))
            .collect()
    }

    #[test]
    fn include_and_exclude_pick_the_spans() {
        let mut rs = testdata::resource_spans("agent", 1, 1, 4);
        let spans = &mut rs.scope_spans[0].spans;
        spans[0].name = "ChatOpenAI".into();
        spans[1].name = "ChatAnthropic".into();
        spans[1].kind = 3;
        spans[2].name = "retriever".into();
        spans[3].name = "ChatOpenAI".into();
        spans[3].attributes.push(testdata::kv("internal", "yes"));
        let p = processor(
            r#"
actions: [{key: tagged, action: insert, value: true}]
include: {match_type: regexp, services: ['^agent$'], span_names: ['^Chat']}
exclude: {match_type: strict, attributes: [{key: internal}]}
"#,
        );
        p.process(&mut rs).unwrap();
        assert_eq!(tagged(&rs), vec![true, true, false, false]);

        let mut rs = testdata::resource_spans("agent", 1, 1, 2);
        rs.scope_spans[0].spans[1].kind = 3;
        processor("actions: [{key: tagged, action: insert, value: 1}]\ninclude: {match_type: strict, span_kinds: [SPAN_KIND_CLIENT]}")
            .process(&mut rs)
            .unwrap();
        assert_eq!(tagged(&rs), vec![false, true]);

        let mut rs = testdata::resource_spans("other", 1, 1, 1);
        processor(
            "actions: [{key: tagged, action: insert, value: 1}]\ninclude: {match_type: strict, services: [agent]}",
        )
        .process(&mut rs)
        .unwrap();
        assert_eq!(tagged(&rs), vec![false], "another service is not included");
    }

    #[test]
    fn bad_match_properties_are_reported() {
        let c: AttributesConfig = serde_norway::from_str(
            "actions: [{key: a, action: delete}]\ninclude: {match_type: regexp, span_names: ['(']}\nexclude: {match_type: strict, span_kinds: [sideways]}",
        )
        .unwrap();
        let mut errs = Vec::new();
        c.validate("processors.attributes", &mut |p, m| errs.push(format!("{p}: {m}")));
        assert!(
            errs.iter()
                .any(|e| e.starts_with("processors.attributes.include.span_names[0]:")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("processors.attributes.exclude.span_kinds[0]:")),
            "{errs:?}"
        );
        assert!(serde_norway::from_str::<AttributesConfig>("include: {match_type: fuzzy}").is_err());
    }
}
