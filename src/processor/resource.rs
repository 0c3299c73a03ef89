//! The `resource` processor: attribute actions (insert, update, upsert, delete, hash, extract,
//! convert) on each request's resource, with the collector's keys (`from_context` included).
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use serde::Deserialize;

use super::actions::{ActionConfig, Actions};
use super::{ProcessError, ProcessorConfig, RequestContext, SpanProcessor, wire};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ResourceConfig {
    pub(crate) attributes: Vec<ActionConfig>,
}

impl ProcessorConfig for ResourceConfig {
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        if self.attributes.is_empty() {
            err(format!("{path}.attributes"), "list at least one action".into());
        }
        Actions::compile(&self.attributes, &format!("{path}.attributes"), err);
    }

    fn span_processor(&self, _id: &str) -> Option<Box<dyn SpanProcessor>> {
        let actions = Actions::compile(&self.attributes, "", &mut |_, _| {})?;
        Some(Box::new(ResourceProcessor(actions)))
    }
}

struct ResourceProcessor(Actions);

impl SpanProcessor for ResourceProcessor {
    fn on_wire(&self) -> bool {
        true
    }

    fn process_wire(&self, record: &mut wire::Record<'_>, request: &RequestContext) -> Result<(), ProcessError> {
        record.insert_defaults(false);
        self.0.apply(&mut record.resource.attributes, request);
        Ok(())
    }

    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError> {
        self.process_in(rs, &RequestContext::default())
    }

    fn process_in(&self, rs: &mut ResourceSpans, request: &RequestContext) -> Result<(), ProcessError> {
        self.0.apply(
            &mut rs.resource.get_or_insert_with(Default::default).attributes,
            request,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::wire::testdata;
    use opentelemetry_proto::tonic::common::v1::any_value;

    #[test]
    fn sets_service_name_on_the_resource() {
        let c: ResourceConfig = serde_norway::from_str(
            "attributes: [{key: service.name, action: upsert, value: support-agent}, {key: deployment.environment, action: insert, value: prod}]",
        )
        .unwrap();
        let mut errs = Vec::new();
        c.validate("processors.resource", &mut |p, m| errs.push(format!("{p}: {m}")));
        assert!(errs.is_empty(), "{errs:?}");
        let mut rs = testdata::resource_spans("unknown_service", 1, 1, 1);
        c.span_processor("resource").unwrap().process(&mut rs).unwrap();
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        let get = |k: &str| {
            attrs
                .iter()
                .find(|kv| kv.key == k)
                .and_then(|kv| kv.value.as_ref()?.value.clone())
        };
        assert_eq!(
            get("service.name"),
            Some(any_value::Value::StringValue("support-agent".into()))
        );
        assert_eq!(
            get("deployment.environment"),
            Some(any_value::Value::StringValue("prod".into()))
        );
        assert_eq!(rs.scope_spans[0].spans.len(), 1);
    }

    #[test]
    fn empty_or_bad_actions_are_errors() {
        for (yaml, path) in [
            ("{}", "processors.resource.attributes"),
            (
                "attributes: [{key: a, action: upsert}]",
                "processors.resource.attributes[0].value",
            ),
        ] {
            let c: ResourceConfig = serde_norway::from_str(yaml).unwrap();
            let mut errs = Vec::new();
            c.validate("processors.resource", &mut |p, m| errs.push(format!("{p}: {m}")));
            assert!(errs.iter().any(|e| e.starts_with(&format!("{path}:"))), "{errs:?}");
        }
    }
}
