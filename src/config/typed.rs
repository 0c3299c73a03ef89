//! Typed component settings from YAML: every bad key reported with its full YAML path, in one
//! pass. Components outside `config` (processors) read their settings with [`typed`].
use serde::de::DeserializeOwned;
use serde_norway::Value;

use super::error::ConfigError;

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Deserializes `value` into `T`. On an error, records it with its full path, removes the
/// offending node and tries again, so one pass reports every bad key of a component.
pub(crate) fn typed<T: DeserializeOwned>(mut value: Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<T> {
    if value.is_null() {
        value = Value::Mapping(Default::default());
    }
    for _ in 0..64 {
        // Through YAML text rather than the Value: a plain scalar such as `0` then reads as a
        // string where the field wants one (the collector's behaviour, e.g. header values).
        let text = serde_norway::to_string(&value).unwrap_or_default();
        match serde_path_to_error::deserialize::<_, T>(serde_norway::Deserializer::from_str(&text)) {
            Ok(t) => return Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                let at = if inner == "." {
                    path.to_string()
                } else {
                    join(path, &inner)
                };
                // A value whose env reference failed is already reported there, more clearly.
                if !errors.iter().any(|x| x.path == at) {
                    errors.push(ConfigError::new(at, bare_message(&e.inner().to_string(), &inner)));
                }
                let segments = path_segments(e.path());
                if segments.is_empty() || !remove_at(&mut value, &segments) {
                    return None;
                }
            }
        }
    }
    None
}

/// serde_norway decorates messages with its own path and a position in the re-serialized
/// text; the path is already ours and the position would mislead.
fn bare_message(message: &str, inner_path: &str) -> String {
    let mut m = match message.split_once(": ") {
        Some((head, rest)) if inner_path.starts_with(head) => rest,
        _ => message,
    };
    if let Some(i) = m.rfind(" at line ")
        && m[i + 9..]
            .split(" column ")
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        m = &m[..i];
    }
    m.to_string()
}

enum Segment {
    Key(String),
    Index(usize),
}

fn path_segments(path: &serde_path_to_error::Path) -> Vec<Segment> {
    use serde_path_to_error::Segment as S;
    path.iter()
        .filter_map(|s| match s {
            S::Map { key } => Some(Segment::Key(key.clone())),
            S::Seq { index } => Some(Segment::Index(*index)),
            S::Enum { variant } => Some(Segment::Key(variant.clone())),
            S::Unknown => None,
        })
        .collect()
}

fn remove_at(value: &mut Value, segments: &[Segment]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        node = match (seg, node) {
            (Segment::Key(k), Value::Mapping(m)) => match m.get_mut(k.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Index(i), Value::Sequence(s)) => match s.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        (Segment::Index(i), Value::Sequence(s)) if *i < s.len() => {
            s.remove(*i);
            true
        }
        _ => false,
    }
}
