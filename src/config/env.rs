//! `${env:VAR}`, `${VAR}` (the collector's shorthand for env), `${env:VAR:-default}` and
//! `${file:PATH}` substitution in string values, as the collector does it.

/// Why a value could not be substituted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EnvError {
    #[error("environment variable {0} is not set (use ${{env:{0}:-default}} for a default)")]
    Unset(String),
    #[error("malformed reference {0:?}: expected ${{env:NAME}}, ${{NAME}}, ${{env:NAME:-default}} or ${{file:PATH}}")]
    Malformed(String),
    /// Only the path and the I/O error: never the file's content.
    #[error("cannot read {path} for ${{file:{path}}}: {error}")]
    File { path: String, error: String },
    #[error("unsupported reference scheme {0:?} (supported: env, file)")]
    Scheme(String),
}

/// The result of substituting one scalar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Substituted {
    /// The scalar had no reference.
    Unchanged,
    /// The whole scalar was one reference: its value should be re-read as a YAML scalar, so
    /// `max_recv_msg_size_mib: ${env:SIZE}` is a number, as in the collector.
    Whole(String),
    /// References inside a longer string: the result is a string.
    Embedded(String),
    /// The whole scalar was one `${file:...}`: the file is YAML, re-read as any value (a
    /// mapping included), as the collector's file provider does.
    File(String),
}

/// The file a `${file:PATH}` names, read whole (bounded: a reference to a device or a huge
/// file must not exhaust memory at start).
fn read_file(path: &str) -> Result<String, EnvError> {
    use std::io::Read;
    const MAX: u64 = 4 << 20;
    let fail = |error: String| EnvError::File {
        path: path.to_string(),
        error,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    if text.len() as u64 > MAX {
        return Err(fail(format!("larger than {} MiB", MAX >> 20)));
    }
    Ok(text)
}

/// Substitutes every reference in `input`, looking variables up with `lookup`.
/// `$$` escapes a literal `$`.
pub(crate) fn substitute(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Substituted, EnvError> {
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
        let is_whole = pos == 0 && end + 3 == rest.len() && references == 0 && out.is_empty();
        if let Some(path) = body.strip_prefix("file:") {
            if path.is_empty() {
                return Err(EnvError::Malformed(reference.to_string()));
            }
            let text = read_file(path)?;
            if is_whole {
                return Ok(Substituted::File(text));
            }
            // Inside a longer string the content is text; a file's final newline is not part
            // of the value (a token file written by `echo`).
            out.push_str(text.strip_suffix('\n').unwrap_or(&text));
            references += 1;
            rest = &body_start[end + 1..];
            continue;
        }
        let spec = match body.split_once(':') {
            Some(("env", spec)) => spec,
            // `${NAME}` and `${NAME:-default}` are env references; `${scheme:...}` is not.
            Some((scheme, _)) if !scheme.is_empty() && !body[scheme.len()..].starts_with(":-") => {
                return Err(EnvError::Scheme(scheme.to_string()));
            }
            _ => body,
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
        if is_whole {
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
        assert!(matches!(
            substitute("${file:/nonexistent/x}", &env),
            Err(EnvError::File { .. })
        ));
        assert!(matches!(substitute("${env:A-B}", &env), Err(EnvError::Malformed(_))));
        assert!(matches!(substitute("${A-B}", &env), Err(EnvError::Malformed(_))));
        assert!(matches!(substitute("${file:}", &env), Err(EnvError::Malformed(_))));
        assert_eq!(substitute("${http://x}", &env), Err(EnvError::Scheme("http".into())));
        assert_eq!(substitute("${NOPE}", &env), Err(EnvError::Unset("NOPE".into())));
    }

    #[test]
    fn bare_names_are_env_references() {
        assert_eq!(substitute("${PORT}", &env), Ok(Substituted::Whole("4317".into())));
        assert_eq!(
            substitute("h:${PORT}/${NOPE:-x}", &env),
            Ok(Substituted::Embedded("h:4317/x".into()))
        );
        assert_eq!(substitute("${NOPE:-}", &env), Ok(Substituted::Whole(String::new())));
    }

    #[test]
    fn file_references_read_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let p = path.display();
        assert_eq!(
            substitute(&format!("${{file:{p}}}"), &env),
            Ok(Substituted::File("s3cret\n".into()))
        );
        assert_eq!(
            substitute(&format!("Bearer ${{file:{p}}}"), &env),
            Ok(Substituted::Embedded("Bearer s3cret".into()))
        );
        let err = substitute(&format!("${{file:{p}.missing}}"), &env).unwrap_err();
        assert!(err.to_string().contains(".missing"), "{err}");
    }

    #[test]
    fn dollar_escapes() {
        assert_eq!(substitute("a$$b", &env), Ok(Substituted::Embedded("a$b".into())));
        assert_eq!(substitute("cost $5", &env), Ok(Substituted::Unchanged));
    }
}
