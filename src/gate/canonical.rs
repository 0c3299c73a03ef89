//! Canonical requests: the gate decides on, and forwards, one normalised form of the path, the query
//! and a JSON body, so MLflow never reads anything the gate did not (no `%64elete`, `//api`, camelCase
//! or doubly encoded decoys). Everything ambiguous is refused with 400 rather than guessed.
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonError {
    #[error("invalid request path: {0}")]
    Path(&'static str),
    #[error("invalid query string: {0}")]
    Query(String),
    #[error("invalid JSON body: {0}")]
    Body(String),
    #[error("invalid request: {0}")]
    Target(String),
}

/// A request path: its decoded segments (what MLflow routes on) and the form sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonPath {
    pub segments: Vec<String>,
    /// The path ended in `/` (FastAPI has such routes; no route of the gate's table does).
    pub trailing_slash: bool,
}

impl CanonPath {
    /// The decoded path, `/` joined (for matching and logs).
    pub(crate) fn decoded(&self) -> String {
        let slash = if self.trailing_slash { "/" } else { "" };
        format!("/{}{slash}", self.segments.join("/"))
    }

    /// The path sent upstream: every segment percent-encoded except unreserved characters, so
    /// MLflow's single decoding yields exactly `segments`.
    pub(crate) fn encoded(&self) -> String {
        let mut out = String::with_capacity(16 * self.segments.len() + 1);
        for s in &self.segments {
            out.push('/');
            encode_into(s, &mut out, b"-._~!$&'()*+,;=:@");
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }
}

/// One path segment percent-encoded for a URL the gate builds itself.
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_into(s, &mut out, b"-._~");
    out
}

fn encode_into(s: &str, out: &mut String, keep: &[u8]) {
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Percent-decodes `s` (`+` kept as is) into UTF-8; None for a bad escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes and normalises a request path. Refused: encoded `/` or `\`, a `\`, `%` after decoding
/// (double encoding), control characters, and empty, `.` or `..` segments (`//api`, `/a/../b`).
pub fn path(raw: &str) -> Result<CanonPath, CanonError> {
    if !raw.starts_with('/') {
        return Err(CanonError::Path("must start with /"));
    }
    if raw == "/" {
        return Ok(CanonPath {
            segments: Vec::new(),
            trailing_slash: false,
        });
    }
    let (body, trailing_slash) = match raw[1..].strip_suffix('/') {
        Some(b) => (b, true),
        None => (&raw[1..], false),
    };
    let mut segments = Vec::new();
    for seg in body.split('/') {
        let lower = seg.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return Err(CanonError::Path("encoded / or \\"));
        }
        let d = percent_decode(seg).ok_or(CanonError::Path("bad percent-encoding or not UTF-8"))?;
        if d.is_empty() || d == "." || d == ".." {
            return Err(CanonError::Path("empty, . or .. segment"));
        }
        if d.contains('%') || d.contains('\\') || d.chars().any(char::is_control) {
            return Err(CanonError::Path("%, \\ or a control character after decoding"));
        }
        segments.push(d);
    }
    Ok(CanonPath {
        segments,
        trailing_slash,
    })
}

/// Query parameters MLflow reads as lists; any other parameter may appear once only (Flask takes the
/// first of a repeated singular parameter, a decoder could take the last).
const REPEATABLE: &[&str] = &[
    "experiment_ids",
    "run_ids",
    "run_id",
    "trace_ids",
    "request_ids",
    "order_by",
    "metric_keys",
    "model_ids",
];

/// A decoded query string, in order; re-serialised for upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Query(pub(crate) Vec<(String, String)>);

impl Query {
    #[cfg(test)]
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub(crate) fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub(crate) fn encoded(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.0 {
            if !out.is_empty() {
                out.push('&');
            }
            encode_into(k, &mut out, b"-._~");
            out.push('=');
            encode_into(v, &mut out, b"-._~");
        }
        out
    }
}

/// Decodes a query string (`&` separated, `+` is a space, UTF-8 only). A parameter outside
/// [`REPEATABLE`] given twice is refused.
pub(crate) fn query(raw: Option<&str>) -> Result<Query, CanonError> {
    let mut out = Vec::new();
    let mut seen = BTreeMap::new();
    for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let dec = |s: &str| {
            percent_decode(&s.replace('+', " "))
                .ok_or_else(|| CanonError::Query(format!("bad encoding in {:?}", truncate(s))))
        };
        let (k, v) = (dec(k)?, dec(v)?);
        if k.chars().any(char::is_control) || v.chars().any(|c| c.is_control() && c != '\t') {
            return Err(CanonError::Query("control character".into()));
        }
        let n = seen.entry(k.clone()).or_insert(0u32);
        *n += 1;
        if *n > 1 && !REPEATABLE.contains(&k.as_str()) {
            return Err(CanonError::Query(format!(
                "parameter {:?} given more than once",
                truncate(&k)
            )));
        }
        out.push((k, v));
    }
    Ok(Query(out))
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Fields the gate reads to authorize: their camelCase aliases (which MLflow's protobuf parser also
/// accepts) are renamed to these names, and a body giving both spellings is refused.
const AUTHZ_FIELDS: &[&str] = &[
    "experiment_id",
    "experiment_ids",
    "run_id",
    "run_uuid",
    "run_ids",
    "trace_id",
    "trace_ids",
    "request_id",
    "request_ids",
    "model_id",
    "model_ids",
    "source_run_id",
    "new_name",
    "trace_info",
    "trace_location",
    "mlflow_experiment",
    "locations",
    "operation_name",
];

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses an MLflow API body: strict UTF-8 JSON (no BOM), an object at the top (a JSON string,
/// which MLflow would decode a second time, is refused), no duplicate keys at any depth, and the
/// camelCase aliases of [`AUTHZ_FIELDS`] renamed. Empty (or all-whitespace) is None: MLflow reads `{}`.
pub(crate) fn json_body(bytes: &[u8]) -> Result<Option<Map<String, Value>>, CanonError> {
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err(CanonError::Body("byte order mark".into()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| CanonError::Body("not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v = strict_parse(text)?;
    let Value::Object(mut m) = v else {
        return Err(CanonError::Body("must be a JSON object".into()));
    };
    rename_aliases_in(&mut m, 0)?;
    Ok(Some(m))
}

fn rename_aliases_in(m: &mut Map<String, Value>, depth: usize) -> Result<(), CanonError> {
    for f in AUTHZ_FIELDS {
        let alias = camel(f);
        if alias == *f {
            continue;
        }
        if let Some(v) = m.remove(&alias) {
            if m.contains_key(*f) {
                return Err(CanonError::Body(format!("both {f} and {alias}")));
            }
            m.insert((*f).to_string(), v);
        }
    }
    if depth > 32 {
        return Ok(()); // strict_parse already limits nesting; this only bounds the walk.
    }
    for v in m.values_mut() {
        rename_aliases(v, depth + 1)?;
    }
    Ok(())
}

fn rename_aliases(v: &mut Value, depth: usize) -> Result<(), CanonError> {
    match v {
        Value::Object(m) => rename_aliases_in(m, depth),
        Value::Array(xs) => xs.iter_mut().try_for_each(|x| rename_aliases(x, depth + 1)),
        _ => Ok(()),
    }
}

/// serde_json keeps the last of duplicate keys silently; MLflow's json module too, but other readers
/// differ, so duplicates are an error here.
fn strict_parse(text: &str) -> Result<Value, CanonError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = Strict
        .deserialize(&mut de)
        .map_err(|e| CanonError::Body(e.to_string()))?;
    de.end().map_err(|e| CanonError::Body(e.to_string()))?;
    Ok(v)
}

struct Strict;

impl<'de> serde::de::DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = a.next_element_seed(Strict)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = a.next_key::<String>()? {
            let v = a.next_value_seed(Strict)?;
            if m.insert(k.clone(), v).is_some() {
                return Err(de::Error::custom(format!("duplicate key {:?}", truncate(&k))));
            }
        }
        Ok(Value::Object(m))
    }
}

/// An artifact path given as a parameter: relative, no empty, `.` or `..` segments, no `\`.
pub(crate) fn artifact_path(s: &str) -> Result<Vec<&str>, CanonError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let segs: Vec<&str> = s.split('/').collect();
    if s.contains('\\') || segs.iter().any(|x| x.is_empty() || *x == "." || *x == "..") {
        return Err(CanonError::Query("artifact path with empty, . or .. segments".into()));
    }
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let p = path("/api/2.0/mlflow/experiments/%64elete").unwrap();
        assert_eq!(p.decoded(), "/api/2.0/mlflow/experiments/delete");
        assert_eq!(p.encoded(), "/api/2.0/mlflow/experiments/delete");
        assert_eq!(path("/%61pi/x").unwrap().decoded(), "/api/x");
        for bad in [
            "//api/2.0/mlflow/experiments/delete",
            "/api//x",
            "/api/x//",
            "/api/./x",
            "/api/../x",
            "/api/%2e%2e/x",
            "/api/a%2fb",
            "/api/a%5Cb",
            "/api/a\\b",
            "/api/%2564",
            "/api/%zz",
            "/api/%ff",
            "/api/%00",
            "api",
        ] {
            assert!(path(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(path("/").unwrap().encoded(), "/");
        let t = path("/ajax-api/3.0/jobs/").unwrap();
        assert!(t.trailing_slash);
        assert_eq!(t.encoded(), "/ajax-api/3.0/jobs/");
        let odd = path("/api/2.0/mlflow-artifacts/artifacts/1/r/a%20b%23c%3F").unwrap();
        assert_eq!(odd.segments.last().unwrap(), "a b#c?");
        assert_eq!(odd.encoded(), "/api/2.0/mlflow-artifacts/artifacts/1/r/a%20b%23c%3F");
    }

    #[test]
    fn queries() {
        let q = query(Some("run_id=a&run_id=b&experiment_id=1&x=%41+b")).unwrap();
        assert_eq!(q.get_all("run_id").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(q.get("x"), Some("A b"));
        assert_eq!(q.encoded(), "run_id=a&run_id=b&experiment_id=1&x=A%20b");
        assert!(query(Some("experiment_id=1&experiment_id=2")).is_err());
        assert!(query(Some("path=a%ff")).is_err());
        assert_eq!(query(None).unwrap(), Query::default());
        assert_eq!(query(Some("&&")).unwrap(), Query::default());
    }

    #[test]
    fn bodies() {
        let m = json_body(br#"{"experimentId": "2", "x": {"runId": "r"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(m["experiment_id"], "2");
        assert_eq!(m["x"]["run_id"], "r");
        assert!(!m.contains_key("experimentId"));
        for bad in [
            &b"\xEF\xBB\xBF{\"experiment_id\": \"1\"}"[..],
            br#""{\"experiment_id\": \"2\"}""#,
            br#"{"experiment_id": "1", "experiment_id": "2"}"#,
            br#"{"a": {"k": 1, "k": 2}}"#,
            br#"{"experiment_id": "1", "experimentId": "2"}"#,
            br#"[1]"#,
            b"{\"a\": \"\xff\"}",
            br#"{"a": 1} x"#,
        ] {
            assert!(
                json_body(bad).is_err(),
                "{:?} must be refused",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(json_body(b"  ").unwrap(), None);
    }

    /// Random inputs: no panic, and canonical forms are fixed points.
    #[test]
    fn fuzz_canonicalisers() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x9a7e);
        let alphabet: Vec<&str> = vec![
            "/",
            "%",
            "2f",
            "2F",
            "5c",
            "64",
            "61",
            ".",
            "..",
            "a",
            "api",
            "&",
            "=",
            "+",
            "%20",
            "%ff",
            "\\",
            "é",
            "{",
            "}",
            "\"",
            ":",
            ",",
            "[",
            "]",
            "experimentId",
            "experiment_id",
            "1",
            "0",
            " ",
            "\u{feff}",
            "%00",
            "?",
        ];
        for _ in 0..20_000 {
            let n = rng.random_range(0..12);
            let s: String = (0..n).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            let with_slash = format!("/{s}");
            if let Ok(p) = path(&with_slash) {
                let again = path(&p.encoded()).expect("canonical path re-parses");
                assert_eq!(again, p, "{with_slash}");
                assert_eq!(again.encoded(), p.encoded());
            }
            if let Ok(q) = query(Some(&s)) {
                let again = query(Some(&q.encoded())).expect("canonical query re-parses");
                assert_eq!(again, q, "{s}");
            }
            if let Ok(Some(m)) = json_body(s.as_bytes()) {
                let bytes = serde_json::to_vec(&m).unwrap();
                assert_eq!(json_body(&bytes).unwrap(), Some(m), "{s}");
            }
            let _ = artifact_path(&s);
        }
    }
}
