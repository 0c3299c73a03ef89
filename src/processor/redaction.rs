//! The `redaction` processor: keeps only allowed attribute keys (unless `allow_all_keys`) and
//! masks values matching `blocked_values` (prompts and PII in agent traces), on resource, scope,
//! span and span event attributes as the collector does, with its keys and its summary
//! attributes (written on the list they describe, merged with those an earlier redaction left).
//! Not supported, and refused by name when turned on, so nothing is silently left unredacted:
//! `redact_all_types`, `url_sanitizer`, `db_sanitizer` (off, as by default, they are accepted).
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use serde::Deserialize;

use super::ottl::eval::{Value, to_any};
use super::{ProcessError, ProcessorConfig, SpanProcessor};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RedactionConfig {
    pub(crate) allow_all_keys: bool,
    pub(crate) allowed_keys: Vec<String>,
    pub(crate) ignored_keys: Vec<String>,
    pub(crate) ignored_key_patterns: Vec<String>,
    pub(crate) blocked_values: Vec<String>,
    pub(crate) blocked_key_patterns: Vec<String>,
    pub(crate) allowed_values: Vec<String>,
    pub(crate) hash_function: Option<HashFunction>,
    pub(crate) hmac_key: Option<String>,
    pub(crate) summary: Summary,
    /// The collector's keys this processor does not implement: read only to refuse them by name
    /// when they are on (a generic unknown-key error would not say they are known).
    pub(crate) redact_all_types: bool,
    pub(crate) url_sanitizer: Option<Sanitizer>,
    pub(crate) db_sanitizer: Option<serde_norway::Value>,
}

/// `url_sanitizer` / `db_sanitizer`: off unless `enabled` (the collector's shape; other keys are
/// not read, as nothing here acts on them).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct Sanitizer {
    pub(crate) enabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum HashFunction {
    Sha1,
    Sha3,
    HmacSha256,
    HmacSha512,
    /// The collector's MD5, refused here with a hint (not in the crypto library we ship).
    Md5,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Summary {
    Debug,
    Info,
    #[default]
    Silent,
}

const MASK: &str = "****";

struct Rules {
    allow_all_keys: bool,
    allowed_keys: Vec<String>,
    ignored_keys: Vec<String>,
    ignored_key_patterns: Vec<regex::Regex>,
    blocked_values: Vec<regex::Regex>,
    blocked_keys: Vec<regex::Regex>,
    allowed_values: Vec<regex::Regex>,
    hash: Option<HashFunction>,
    hmac_key: Vec<u8>,
    summary: Summary,
}

fn patterns(list: &[String], field: &str, path: &str, err: &mut dyn FnMut(String, String)) -> Vec<regex::Regex> {
    list.iter()
        .enumerate()
        .filter_map(|(i, p)| match regex::Regex::new(p) {
            Ok(re) => Some(re),
            Err(e) => {
                err(
                    format!("{path}.{field}[{i}]"),
                    format!("not a valid regular expression: {e}"),
                );
                None
            }
        })
        .collect()
}

impl RedactionConfig {
    fn rules(&self, path: &str, err: &mut dyn FnMut(String, String)) -> Rules {
        match (self.hash_function, &self.hmac_key) {
            (Some(HashFunction::Md5), _) => err(
                format!("{path}.hash_function"),
                "md5 is not supported; use sha1, sha3, hmac-sha256 or hmac-sha512".into(),
            ),
            (Some(HashFunction::HmacSha256 | HashFunction::HmacSha512), None) => err(
                format!("{path}.hmac_key"),
                "must be set for an hmac hash_function".into(),
            ),
            _ => {}
        }
        self.refuse_unsupported(path, err);
        Rules {
            allow_all_keys: self.allow_all_keys,
            allowed_keys: self.allowed_keys.clone(),
            ignored_keys: self.ignored_keys.clone(),
            ignored_key_patterns: patterns(&self.ignored_key_patterns, "ignored_key_patterns", path, err),
            blocked_values: patterns(&self.blocked_values, "blocked_values", path, err),
            blocked_keys: patterns(&self.blocked_key_patterns, "blocked_key_patterns", path, err),
            allowed_values: patterns(&self.allowed_values, "allowed_values", path, err),
            hash: self.hash_function,
            hmac_key: self.hmac_key.clone().unwrap_or_default().into_bytes(),
            summary: self.summary,
        }
    }
}

fn any_true(v: &serde_norway::Value) -> bool {
    match v {
        serde_norway::Value::Bool(b) => *b,
        serde_norway::Value::Mapping(m) => m.values().any(any_true),
        serde_norway::Value::Sequence(items) => items.iter().any(any_true),
        serde_norway::Value::Tagged(t) => any_true(&t.value),
        _ => false,
    }
}

impl RedactionConfig {
    /// The collector's keys this processor lacks, when they are on: an error naming each, so a
    /// config that relies on them to hide data does not run without them.
    fn refuse_unsupported(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        const KEEP: &str =
            "keep a collector with the redaction processor for it, or mask those values with blocked_values";
        if self.redact_all_types {
            err(
                format!("{path}.redact_all_types"),
                format!("is not supported (non-string values are never matched against blocked_values here); {KEEP}"),
            );
        }
        if self.url_sanitizer.as_ref().is_some_and(|s| s.enabled) {
            err(
                format!("{path}.url_sanitizer"),
                format!("is not supported (URLs in attributes are not sanitized here); {KEEP}"),
            );
        }
        // Its shape differs by database; any `true` in it (an `enabled: true`) counts as on.
        if self.db_sanitizer.as_ref().is_some_and(any_true) {
            err(
                format!("{path}.db_sanitizer"),
                format!("is not supported (database statements in attributes are not sanitized here); {KEEP}"),
            );
        }
    }
}

impl ProcessorConfig for RedactionConfig {
    fn validate(&self, path: &str, err: &mut dyn FnMut(String, String)) {
        self.rules(path, err);
    }

    fn span_processor(&self, _id: &str) -> Option<Box<dyn SpanProcessor>> {
        let mut failed = false;
        let rules = self.rules("", &mut |_, _| failed = true);
        (!failed).then(|| Box::new(Redaction(rules)) as Box<dyn SpanProcessor>)
    }
}

struct Redaction(Rules);

/// What redaction did to one attribute list, for the summary attributes.
#[derive(Default)]
struct Outcome {
    redacted: Vec<String>,
    masked: Vec<String>,
    allowed: Vec<String>,
    ignored: Vec<String>,
}

/// The summary attributes the collector writes. They are always allowed, so a second redaction
/// processor keeps (and adds to) what the first one wrote.
const SUMMARY_KEYS: [&str; 7] = [
    "redaction.redacted.keys",
    "redaction.redacted.count",
    "redaction.masked.keys",
    "redaction.masked.count",
    "redaction.allowed.keys",
    "redaction.allowed.count",
    "redaction.ignored.count",
];

impl Rules {
    fn mask(&self, text: &str) -> String {
        let digest = |alg: &'static aws_lc_rs::digest::Algorithm| {
            const_hex::encode(aws_lc_rs::digest::digest(alg, text.as_bytes()).as_ref())
        };
        let hmac = |alg: aws_lc_rs::hmac::Algorithm| {
            let key = aws_lc_rs::hmac::Key::new(alg, &self.hmac_key);
            const_hex::encode(aws_lc_rs::hmac::sign(&key, text.as_bytes()).as_ref())
        };
        match self.hash {
            None | Some(HashFunction::Md5) => MASK.to_string(),
            Some(HashFunction::Sha1) => digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY),
            Some(HashFunction::Sha3) => digest(&aws_lc_rs::digest::SHA3_256),
            Some(HashFunction::HmacSha256) => hmac(aws_lc_rs::hmac::HMAC_SHA256),
            Some(HashFunction::HmacSha512) => hmac(aws_lc_rs::hmac::HMAC_SHA512),
        }
    }

    fn ignores(&self, key: &str) -> bool {
        self.ignored_keys.iter().any(|k| k == key) || self.ignored_key_patterns.iter().any(|re| re.is_match(key))
    }

    fn removes(&self, key: &str) -> bool {
        !self.allow_all_keys && !self.allowed_keys.iter().any(|k| k == key) && !SUMMARY_KEYS.contains(&key)
    }

    /// The masked form of a value, `None` to leave it. A key matching `blocked_key_patterns` is
    /// masked whatever its type (a non-string value as the empty string, as the collector does),
    /// so a number under a blocked key does not pass either.
    fn masked(&self, key: &str, value: Option<&any_value::Value>) -> Option<String> {
        let text = match value {
            Some(any_value::Value::StringValue(text)) => text.as_str(),
            _ => "",
        };
        if self.blocked_keys.iter().any(|re| re.is_match(key)) {
            return Some(self.mask(text));
        }
        if !self.blocked_values.iter().any(|re| re.is_match(text)) {
            return None;
        }
        let mut t = text.to_string();
        for re in &self.blocked_values {
            t = re
                .replace_all(&t, |c: &regex::Captures<'_>| self.mask(&c[0]))
                .into_owned();
        }
        Some(t)
    }

    fn apply(&self, attrs: &mut Vec<KeyValue>) {
        let mut out = Outcome::default();
        attrs.retain_mut(|kv| {
            if self.ignores(&kv.key) {
                out.ignored.push(kv.key.clone());
                return true;
            }
            if self.removes(&kv.key) {
                out.redacted.push(kv.key.clone());
                return false;
            }
            if SUMMARY_KEYS.contains(&kv.key.as_str()) {
                return true;
            }
            let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
            if let Some(any_value::Value::StringValue(text)) = value
                && self.allowed_values.iter().any(|re| re.is_match(text))
            {
                out.allowed.push(kv.key.clone());
                return true;
            }
            if let Some(m) = self.masked(&kv.key, value) {
                kv.value = Some(to_any(Value::Str(m)));
                out.masked.push(kv.key.clone());
            }
            true
        });
        self.summarize(attrs, out);
    }

    fn summarize(&self, attrs: &mut Vec<KeyValue>, out: Outcome) {
        if self.summary == Summary::Silent {
            return;
        }
        let debug = self.summary == Summary::Debug;
        summary(
            attrs,
            out.redacted,
            debug.then_some("redaction.redacted.keys"),
            "redaction.redacted.count",
        );
        summary(
            attrs,
            out.masked,
            debug.then_some("redaction.masked.keys"),
            "redaction.masked.count",
        );
        summary(
            attrs,
            out.allowed,
            debug.then_some("redaction.allowed.keys"),
            "redaction.allowed.count",
        );
        summary(attrs, out.ignored, None, "redaction.ignored.count");
    }
}

/// Writes (or adds to, after an earlier redaction) the summary of `keys`: their names sorted
/// and comma-joined under `keys_attr`, their count under `count_attr`.
fn summary(attrs: &mut Vec<KeyValue>, mut keys: Vec<String>, keys_attr: Option<&str>, count_attr: &str) {
    if keys.is_empty() {
        return;
    }
    let mut count = i64::try_from(keys.len()).unwrap_or(i64::MAX);
    if let Some(name) = keys_attr {
        if let Some(any_value::Value::StringValue(earlier)) = existing(attrs, name)
            && !earlier.is_empty()
        {
            keys.extend(earlier.split(',').map(str::to_string));
        }
        keys.sort();
        put(attrs, name, Value::Str(keys.join(",")));
    }
    if let Some(any_value::Value::IntValue(earlier)) = existing(attrs, count_attr) {
        count = count.saturating_add(*earlier);
    }
    put(attrs, count_attr, Value::Int(count));
}

fn existing<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn put(attrs: &mut Vec<KeyValue>, key: &str, value: Value) {
    super::upsert_attribute(attrs, key, to_any(value));
}

impl SpanProcessor for Redaction {
    fn process(&self, rs: &mut ResourceSpans) -> Result<(), ProcessError> {
        if let Some(resource) = &mut rs.resource {
            self.0.apply(&mut resource.attributes);
        }
        for ss in &mut rs.scope_spans {
            if let Some(scope) = &mut ss.scope {
                self.0.apply(&mut scope.attributes);
            }
            for span in &mut ss.spans {
                self.0.apply(&mut span.attributes);
                for event in &mut span.events {
                    self.0.apply(&mut event.attributes);
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
    use crate::processor::ottl::eval::from_any;

    fn run(yaml: &str, attrs: Vec<KeyValue>) -> Vec<(String, Value)> {
        let c: RedactionConfig = serde_norway::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        c.validate("processors.redaction", &mut |p, m| errs.push(format!("{p}: {m}")));
        assert!(errs.is_empty(), "{errs:?}");
        let mut rs = testdata::resource_spans("svc", 1, 1, 1);
        rs.scope_spans[0].spans[0].attributes = attrs;
        c.span_processor("redaction").unwrap().process(&mut rs).unwrap();
        rs.scope_spans[0].spans[0]
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), from_any(kv.value.as_ref())))
            .collect()
    }

    fn attrs() -> Vec<KeyValue> {
        vec![
            testdata::kv("gen_ai.prompt", "mail me at alice@example.com or bob@example.org"),
            testdata::kv("gen_ai.operation.name", "chat"),
            testdata::kv("user.id", "u-42"),
            testdata::kv("api.token", "secret"),
        ]
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn only_allowed_keys_stay_and_blocked_values_are_masked() {
        let out = run(
            r#"
allowed_keys: [gen_ai.prompt, gen_ai.operation.name, api.token]
ignored_keys: [user.id]
blocked_values: ['[a-z]+@[a-z]+\.[a-z]+']
blocked_key_patterns: ['token']
summary: debug
"#,
            attrs(),
        );
        let get = |k: &str| out.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("gen_ai.prompt"), Some(s("mail me at **** or ****")));
        assert_eq!(get("gen_ai.operation.name"), Some(s("chat")));
        assert_eq!(
            get("user.id"),
            Some(s("u-42")),
            "ignored keys are neither removed nor masked"
        );
        assert_eq!(get("api.token"), Some(s("****")));
        assert_eq!(get("redaction.masked.keys"), Some(s("api.token,gen_ai.prompt")));
        assert_eq!(get("redaction.masked.count"), Some(Value::Int(2)));
        assert_eq!(get("redaction.ignored.count"), Some(Value::Int(1)));
        assert_eq!(get("redaction.redacted.count"), None, "nothing was removed");
    }

    #[test]
    fn allow_all_keys_with_hashing_and_summaries() {
        let out = run(
            "allow_all_keys: true\nblocked_values: ['alice@example\\.com']\nhash_function: sha3\nsummary: silent",
            attrs(),
        );
        let digest =
            const_hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA3_256, b"alice@example.com").as_ref());
        assert_eq!(out[0].1, s(&format!("mail me at {digest} or bob@example.org")));
        assert_eq!(out.len(), 4, "silent adds no summary");
        let out = run("allowed_keys: [user.id]\nsummary: info", attrs());
        assert_eq!(
            out,
            vec![
                ("user.id".into(), s("u-42")),
                ("redaction.redacted.count".into(), Value::Int(3))
            ]
        );
    }

    fn strings(attrs: &[KeyValue]) -> Vec<(String, Value)> {
        attrs
            .iter()
            .map(|kv| (kv.key.clone(), from_any(kv.value.as_ref())))
            .collect()
    }

    /// Resource and scope attributes get the same rules as span attributes, each list its own
    /// summary (the collector's order: resource, scope, span, event).
    #[test]
    fn resource_and_scope_attributes_are_redacted_too() {
        let c: RedactionConfig = serde_norway::from_str(
            "allowed_keys: [service.name, gen_ai.prompt]\nblocked_values: ['[a-z]+@example\\.com']\nsummary: debug",
        )
        .unwrap();
        let mut rs = testdata::resource_spans("svc", 1, 1, 1);
        let resource = rs.resource.get_or_insert_with(Default::default);
        resource.attributes.push(testdata::kv("host.name", "laptop-of-alice"));
        resource
            .attributes
            .push(testdata::kv("gen_ai.prompt", "alice@example.com"));
        rs.scope_spans[0].scope = Some(opentelemetry_proto::tonic::common::v1::InstrumentationScope {
            name: "agent".into(),
            attributes: vec![testdata::kv("owner", "bob@example.com")],
            ..Default::default()
        });
        c.span_processor("redaction").unwrap().process(&mut rs).unwrap();
        let resource = strings(&rs.resource.as_ref().unwrap().attributes);
        assert_eq!(
            resource,
            vec![
                ("service.name".into(), s("svc")),
                ("gen_ai.prompt".into(), s("****")),
                ("redaction.redacted.keys".into(), s("host.name")),
                ("redaction.redacted.count".into(), Value::Int(1)),
                ("redaction.masked.keys".into(), s("gen_ai.prompt")),
                ("redaction.masked.count".into(), Value::Int(1)),
            ]
        );
        let scope = strings(&rs.scope_spans[0].scope.as_ref().unwrap().attributes);
        assert_eq!(
            scope,
            vec![
                ("redaction.redacted.keys".into(), s("owner")),
                ("redaction.redacted.count".into(), Value::Int(1)),
            ]
        );
    }

    /// A second redaction keeps the first one's summary and adds to it; keys stay sorted.
    #[test]
    fn a_second_redaction_adds_to_the_summary() {
        let first = "allowed_keys: [b, c, x]\nsummary: debug";
        let second = "allowed_keys: [c]\nignored_key_patterns: ['^x$']\nsummary: debug";
        let mut rs = testdata::resource_spans("svc", 1, 1, 1);
        rs.scope_spans[0].spans[0].attributes =
            ["d", "a", "b", "c", "x"].iter().map(|k| testdata::kv(k, "v")).collect();
        for yaml in [first, second] {
            let c: RedactionConfig = serde_norway::from_str(yaml).unwrap();
            c.span_processor("r").unwrap().process(&mut rs).unwrap();
        }
        let out = strings(&rs.scope_spans[0].spans[0].attributes);
        let get = |k: &str| out.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("redaction.redacted.keys"), Some(s("a,b,d")));
        assert_eq!(get("redaction.redacted.count"), Some(Value::Int(3)));
        assert_eq!(get("redaction.ignored.count"), Some(Value::Int(1)));
        assert_eq!(get("c"), Some(s("v")));
        assert_eq!(get("x"), Some(s("v")));
    }

    /// A blocked key is masked whatever its value's type; allowed_values win over blocked ones
    /// and are summarised as allowed.
    #[test]
    fn blocked_keys_mask_every_type_and_allowed_values_win() {
        let token = KeyValue {
            key: "api.token".into(),
            value: Some(to_any(Value::Int(123_456))),
            ..Default::default()
        };
        let out = run(
            "allow_all_keys: true\nblocked_key_patterns: [token]\nblocked_values: ['@']\nallowed_values: ['@example\\.org$']\nsummary: debug",
            vec![
                token,
                testdata::kv("mail", "bob@example.org"),
                testdata::kv("other", "eve@evil.test"),
            ],
        );
        let get = |k: &str| out.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("api.token"), Some(s("****")));
        assert_eq!(get("mail"), Some(s("bob@example.org")));
        assert_eq!(get("other"), Some(s("eve****evil.test")));
        assert_eq!(get("redaction.allowed.keys"), Some(s("mail")));
        assert_eq!(get("redaction.masked.keys"), Some(s("api.token,other")));
    }

    #[test]
    fn bad_settings_are_reported() {
        for (yaml, path) in [
            ("blocked_values: ['(']", "processors.redaction.blocked_values[0]"),
            (
                "ignored_key_patterns: ['[']",
                "processors.redaction.ignored_key_patterns[0]",
            ),
            ("hash_function: md5", "processors.redaction.hash_function"),
            ("hash_function: hmac-sha256", "processors.redaction.hmac_key"),
        ] {
            let c: RedactionConfig = serde_norway::from_str(yaml).unwrap();
            let mut errs = Vec::new();
            c.validate("processors.redaction", &mut |p, m| errs.push(format!("{p}: {m}")));
            assert!(
                errs.iter().any(|e| e.starts_with(&format!("{path}:"))),
                "{yaml}: {errs:?}"
            );
        }
        assert!(serde_norway::from_str::<RedactionConfig>("summary: loud").is_err());
    }

    /// The collector's keys not implemented here are refused by name when on (a config relying
    /// on them to hide data must not run without them), and accepted when off.
    #[test]
    fn unsupported_collector_keys_are_refused_by_name_when_on() {
        let errors = |yaml: &str| {
            let c: RedactionConfig = serde_norway::from_str(yaml).unwrap();
            let mut errs = Vec::new();
            c.validate("processors.redaction", &mut |p, m| errs.push(format!("{p}: {m}")));
            errs
        };
        for (yaml, key) in [
            ("redact_all_types: true", "redact_all_types"),
            ("url_sanitizer: {enabled: true}", "url_sanitizer"),
            (
                "url_sanitizer: {enabled: true, attributes: [http.url]}",
                "url_sanitizer",
            ),
            ("db_sanitizer: {sql: {enabled: true}}", "db_sanitizer"),
            (
                "db_sanitizer: {redis: {enabled: true}, sql: {enabled: false}}",
                "db_sanitizer",
            ),
        ] {
            let errs = errors(yaml);
            assert_eq!(errs.len(), 1, "{yaml}: {errs:?}");
            assert!(
                errs[0].starts_with(&format!("processors.redaction.{key}: is not supported")),
                "{yaml}: {errs:?}"
            );
            assert!(errs[0].contains("keep a collector"), "{errs:?}");
        }
        for yaml in [
            "redact_all_types: false",
            "url_sanitizer: {enabled: false}",
            "db_sanitizer: {sql: {enabled: false}}",
            "db_sanitizer: {}",
        ] {
            assert_eq!(errors(yaml), Vec::<String>::new(), "{yaml}");
        }
        // Still strict elsewhere: a misspelt key is an error.
        assert!(serde_norway::from_str::<RedactionConfig>("redact_all_typez: true").is_err());
    }
}
