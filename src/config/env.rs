//! `${env:VAR}` and `${env:VAR:-default}` substitution in string values, as the collector does it.

/// Why a value could not be substituted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("environment variable {0} is not set (use ${{env:{0}:-default}} for a default)")]
    Unset(String),
    #[error("malformed reference {0:?}: expected ${{env:NAME}} or ${{env:NAME:-default}}")]
    Malformed(String),
}

/// The result of substituting one scalar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Substituted {
    /// The scalar had no reference.
    Unchanged,
    /// The whole scalar was one reference: its value should be re-read as a YAML scalar, so
    /// `max_recv_msg_size_mib: ${env:SIZE}` is a number, as in the collector.
    Whole(String),
    /// References inside a longer string: the result is a string.
    Embedded(String),
}

/// Substitutes every reference in `input`, looking variables up with `lookup`.
/// `$$` escapes a literal `$`.
pub fn substitute(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Substituted, EnvError> {
    if !input.contains('$') {
        return Ok(Substituted::Unchanged);
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    let mut references = 0;
    let mut whole = false;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
            continue;
        }
        let Some(body_start) = tail.strip_prefix("${") else {
            out.push('$');
            rest = &tail[1..];
            continue;
        };
        let Some(end) = body_start.find('}') else {
            return Err(EnvError::Malformed(tail.to_string()));
        };
        let body = &body_start[..end];
        let reference = &tail[..end + 3];
        let Some(spec) = body.strip_prefix("env:") else {
            return Err(EnvError::Malformed(reference.to_string()));
        };
        let (name, default) = match spec.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (spec, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(EnvError::Malformed(reference.to_string()));
        }
        let value = match (lookup(name), default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.to_string(),
            (None, None) => return Err(EnvError::Unset(name.to_string())),
        };
        if pos == 0 && end + 3 == rest.len() && references == 0 && out.is_empty() {
            whole = true;
        }
        references += 1;
        out.push_str(&value);
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(if references == 0 && out == input {
        Substituted::Unchanged
    } else if whole {
        Substituted::Whole(out)
    } else {
        Substituted::Embedded(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("4317".into()),
            "EMPTY" => Some(String::new()),
            "SECRET" => Some("s3:cr#t".into()),
            _ => None,
        }
    }

    #[test]
    fn whole_and_embedded_references() {
        assert_eq!(substitute("${env:PORT}", &env), Ok(Substituted::Whole("4317".into())));
        assert_eq!(
            substitute("0.0.0.0:${env:PORT}", &env),
            Ok(Substituted::Embedded("0.0.0.0:4317".into()))
        );
        assert_eq!(
            substitute("${env:SECRET}", &env),
            Ok(Substituted::Whole("s3:cr#t".into()))
        );
        assert_eq!(substitute("plain", &env), Ok(Substituted::Unchanged));
    }

    #[test]
    fn defaults_apply_only_when_unset() {
        assert_eq!(substitute("${env:NOPE:-5s}", &env), Ok(Substituted::Whole("5s".into())));
        assert_eq!(
            substitute("${env:PORT:-1}", &env),
            Ok(Substituted::Whole("4317".into()))
        );
        assert_eq!(
            substitute("${env:EMPTY:-x}", &env),
            Ok(Substituted::Whole(String::new()))
        );
        assert_eq!(
            substitute("a${env:NOPE:-}b", &env),
            Ok(Substituted::Embedded("ab".into()))
        );
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(substitute("${env:NOPE}", &env), Err(EnvError::Unset("NOPE".into())));
        assert!(matches!(substitute("${env:NOPE", &env), Err(EnvError::Malformed(_))));
        assert!(matches!(substitute("${file:/x}", &env), Err(EnvError::Malformed(_))));
        assert!(matches!(substitute("${env:A-B}", &env), Err(EnvError::Malformed(_))));
    }

    #[test]
    fn dollar_escapes() {
        assert_eq!(substitute("a$$b", &env), Ok(Substituted::Embedded("a$b".into())));
        assert_eq!(substitute("cost $5", &env), Ok(Substituted::Unchanged));
    }
}
