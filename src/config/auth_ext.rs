//! Client auth extension configs with the collector's keys (`bearertokenauth`, `basicauth`) and
//! their checks. Secrets never appear in Debug output nor in a validation message.
use serde::{Deserialize, Serialize};

use super::duration::GoDuration;

/// Headers the exporters set themselves: a token sent in one of them would break the request.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "te",
    "x-mlflow-experiment-id",
];

/// `bearertokenauth`: a static token, inline or from a file that is re-read when it changes.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct BearerTokenAuthConfig {
    pub(crate) token: String,
    pub(crate) filename: String,
    /// Put before the token with one space; empty sends the bare token.
    pub(crate) scheme: String,
    pub(crate) header: String,
    /// The collector's list of accepted tokens (server side): refused by `validate`.
    pub(crate) tokens: Vec<String>,
    pub(crate) file_retry: FileRetryConfig,
}

impl Default for BearerTokenAuthConfig {
    fn default() -> Self {
        BearerTokenAuthConfig {
            token: String::new(),
            filename: String::new(),
            scheme: "Bearer".into(),
            header: "Authorization".into(),
            tokens: Vec::new(),
            file_retry: FileRetryConfig::default(),
        }
    }
}

/// Written by hand so the token can never reach a log through `{:?}`.
impl std::fmt::Debug for BearerTokenAuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerTokenAuthConfig")
            .field("token", &redacted(&self.token))
            .field("filename", &self.filename)
            .field("scheme", &self.scheme)
            .field("header", &self.header)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("file_retry", &self.file_retry)
            .finish()
    }
}

/// The collector's `file_retry`: with `enabled`, a token file missing at start is waited for
/// (exports are held, never sent without it) instead of failing the start. The retry count and
/// interval are accepted: the file is looked for again at most once a second while exports wait.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FileRetryConfig {
    pub(crate) enabled: bool,
    pub(crate) max_retries: Option<u64>,
    pub(crate) retry_interval: Option<GoDuration>,
}

/// `basicauth`: only the client side (`client_auth`); `htpasswd` is server side.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct BasicAuthConfig {
    pub(crate) client_auth: Option<ClientAuthConfig>,
    /// Refused by `validate` with a clear message, rather than as an unknown key.
    pub(crate) htpasswd: Option<serde_norway::Value>,
}

#[derive(Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClientAuthConfig {
    pub(crate) username: String,
    pub(crate) password: String,
    /// Take precedence over the inline values, as in the collector; re-read when they change.
    pub(crate) username_file: String,
    pub(crate) password_file: String,
    /// Refused by `validate`: the relay has no AWS client.
    pub(crate) aws_secrets_manager: Option<serde_norway::Value>,
}

impl std::fmt::Debug for ClientAuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuthConfig")
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("username_file", &self.username_file)
            .field("password_file", &self.password_file)
            .field("aws_secrets_manager", &self.aws_secrets_manager.is_some())
            .finish()
    }
}

fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { "<redacted>" }
}

/// Characters an HTTP header value may hold (visible ASCII, space and tab).
pub(crate) fn header_safe(text: &str) -> bool {
    text.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

pub(super) fn validate_bearer(path: &str, b: &BearerTokenAuthConfig, err: &mut dyn FnMut(String, String)) {
    match (b.token.is_empty(), b.filename.is_empty()) {
        (true, true) => err(format!("{path}.token"), "set token or filename".into()),
        (false, false) => err(
            format!("{path}.filename"),
            "set token or filename, not both (the collector silently ignores token then)".into(),
        ),
        _ => {}
    }
    if !b.token.is_empty() && !header_safe(b.token.trim()) {
        err(
            format!("{path}.token"),
            "holds characters an HTTP header cannot carry (value not shown)".into(),
        );
    }
    if !b.tokens.is_empty() {
        err(
            format!("{path}.tokens"),
            "a list of accepted tokens is server-side authentication, which this relay does not do; \
             exporters send one token: use token or filename"
                .into(),
        );
    }
    if b.scheme.bytes().any(|c| !c.is_ascii_graphic()) {
        err(
            format!("{path}.scheme"),
            format!(
                "{:?} must be one word of visible ASCII (e.g. Bearer), or empty",
                b.scheme
            ),
        );
    }
    if http::HeaderName::from_bytes(b.header.as_bytes()).is_err() {
        err(
            format!("{path}.header"),
            format!("{:?} is not a valid HTTP header name", b.header),
        );
    } else if RESERVED_HEADERS.contains(&b.header.to_ascii_lowercase().as_str()) {
        err(
            format!("{path}.header"),
            format!("{:?} is set by the exporter itself; choose another header", b.header),
        );
    }
    if b.file_retry.enabled && b.filename.is_empty() {
        err(format!("{path}.file_retry.enabled"), "needs filename".into());
    }
}

pub(super) fn validate_basic(path: &str, b: &BasicAuthConfig, err: &mut dyn FnMut(String, String)) {
    if b.htpasswd.is_some() {
        err(
            format!("{path}.htpasswd"),
            "not supported: htpasswd authenticates incoming requests (server side), which this relay \
             does not do; only client_auth (for exporters) is"
                .into(),
        );
    }
    let Some(c) = &b.client_auth else {
        if b.htpasswd.is_none() {
            err(
                format!("{path}.client_auth"),
                "must be set (username and password the exporters send)".into(),
            );
        }
        return;
    };
    let path = format!("{path}.client_auth");
    if c.aws_secrets_manager.is_some() {
        err(
            format!("{path}.aws_secrets_manager"),
            "not supported by this relay: use password_file (e.g. a mounted secret) or ${env:...}".into(),
        );
    }
    if c.username.is_empty() && c.username_file.is_empty() {
        err(format!("{path}.username"), "set username or username_file".into());
    }
    if c.username_file.is_empty() && c.username.contains(':') {
        err(
            format!("{path}.username"),
            "must not contain ':' (Basic authentication joins user and password with it)".into(),
        );
    }
    if c.username_file.is_empty() && !header_safe(&c.username) {
        err(
            format!("{path}.username"),
            "holds control characters (value not shown)".into(),
        );
    }
    if c.password_file.is_empty() && !header_safe(&c.password) {
        err(
            format!("{path}.password"),
            "holds control characters (value not shown)".into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::errors_of;

    fn with_ext(ty: &str, settings: &str) -> Vec<String> {
        errors_of(&config_text(ty, settings))
    }

    fn config_text(ty: &str, settings: &str) -> String {
        "receivers: {otlp: {protocols: {grpc: {endpoint: '127.0.0.1:0'}}}}
exporters: {otlphttp: {endpoint: 'http://127.0.0.1:1', auth: {authenticator: TYPE/x}}}
extensions: {TYPE/x: SETTINGS}
service:
  extensions: [TYPE/x]
  pipelines: {traces: {receivers: [otlp], exporters: [otlphttp]}}
"
        .replace("TYPE", ty)
        .replace("SETTINGS", settings)
    }

    fn one_error(ty: &str, settings: &str, path: &str, needle: &str) -> String {
        let errors = with_ext(ty, settings);
        assert!(
            errors.iter().any(|e| e.starts_with(path) && e.contains(needle)),
            "want {path}: ..{needle}.. in {errors:#?}"
        );
        errors.join("\n")
    }

    #[test]
    fn valid_bearer_and_basic_configs_load() {
        assert_eq!(with_ext("bearertokenauth", "{token: abc}"), Vec::<String>::new());
        assert_eq!(
            with_ext("bearertokenauth", "{filename: /x, scheme: '', header: X-Api-Key}"),
            Vec::<String>::new()
        );
        assert_eq!(
            with_ext(
                "bearertokenauth",
                "{filename: /x, file_retry: {enabled: true, max_retries: 3, retry_interval: 1s}}"
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            with_ext("basicauth", "{client_auth: {username: u, password: p}}"),
            Vec::<String>::new()
        );
        assert_eq!(
            with_ext("basicauth", "{client_auth: {username_file: /u, password_file: /p}}"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn bearer_needs_exactly_one_source() {
        one_error(
            "bearertokenauth",
            "{}",
            "extensions.bearertokenauth/x.token",
            "set token or filename",
        );
        let text = one_error(
            "bearertokenauth",
            "{token: s3cr3t-t0k3n, filename: /x}",
            "extensions.bearertokenauth/x.filename",
            "not both",
        );
        assert!(!text.contains("s3cr3t-t0k3n"), "{text}");
    }

    #[test]
    fn bearer_rejects_bad_token_scheme_header_and_server_keys() {
        let text = one_error(
            "bearertokenauth",
            "{token: \"s3cr3t\\u0001t0k3n\"}",
            "extensions.bearertokenauth/x.token",
            "value not shown",
        );
        assert!(!text.contains("s3cr3t"), "{text}");
        let text = one_error(
            "bearertokenauth",
            "{token: abc, tokens: [s3cr3t-a, s3cr3t-b]}",
            "extensions.bearertokenauth/x.tokens",
            "server-side",
        );
        assert!(!text.contains("s3cr3t"), "{text}");
        one_error(
            "bearertokenauth",
            "{token: a, scheme: 'Two words'}",
            "extensions.bearertokenauth/x.scheme",
            "one word",
        );
        one_error(
            "bearertokenauth",
            "{token: a, header: 'bad header'}",
            "extensions.bearertokenauth/x.header",
            "not a valid",
        );
        one_error(
            "bearertokenauth",
            "{token: a, header: ''}",
            "extensions.bearertokenauth/x.header",
            "not a valid",
        );
        for reserved in ["Content-Type", "host", "X-MLflow-Experiment-Id"] {
            one_error(
                "bearertokenauth",
                &format!("{{token: a, header: {reserved}}}"),
                "extensions.bearertokenauth/x.header",
                "set by the exporter",
            );
        }
        one_error(
            "bearertokenauth",
            "{token: a, file_retry: {enabled: true}}",
            "extensions.bearertokenauth/x.file_retry.enabled",
            "needs filename",
        );
        one_error(
            "bearertokenauth",
            "{token: a, tokn: b}",
            "extensions.bearertokenauth/x",
            "unknown field",
        );
    }

    #[test]
    fn basicauth_client_side_only() {
        one_error(
            "basicauth",
            "{htpasswd: {file: /etc/htpasswd}}",
            "extensions.basicauth/x.htpasswd",
            "not supported",
        );
        one_error(
            "basicauth",
            "{htpasswd: {inline: 'u:p'}, client_auth: {username: u, password: p}}",
            "extensions.basicauth/x.htpasswd",
            "server side",
        );
        one_error("basicauth", "{}", "extensions.basicauth/x.client_auth", "must be set");
        one_error(
            "basicauth",
            "{client_auth: {password: p}}",
            "extensions.basicauth/x.client_auth.username",
            "set username",
        );
        one_error(
            "basicauth",
            "{client_auth: {username: 'a:b', password: p}}",
            "extensions.basicauth/x.client_auth.username",
            "':'",
        );
        let text = one_error(
            "basicauth",
            "{client_auth: {username: u, password: \"pa55\\nw0rd\"}}",
            "extensions.basicauth/x.client_auth.password",
            "value not shown",
        );
        assert!(!text.contains("pa55"), "{text}");
        one_error(
            "basicauth",
            "{client_auth: {username: u, password: p, aws_secrets_manager: {secret_arn: a}}}",
            "extensions.basicauth/x.client_auth.aws_secrets_manager",
            "not supported",
        );
        one_error(
            "basicauth",
            "{client_auth: {username: u, passwd: p}}",
            "extensions.basicauth/x.client_auth",
            "unknown field",
        );
    }

    #[test]
    fn exporters_must_name_a_client_authenticator() {
        // htpasswd only: no client side for the exporter to use.
        let errors = with_ext("basicauth", "{htpasswd: {file: /x}}");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("exporters.otlphttp.auth.authenticator") && e.contains("client_auth")),
            "{errors:#?}"
        );
    }

    #[test]
    fn exporters_need_the_extension_enabled_and_an_authenticator() {
        let not_enabled =
            config_text("bearertokenauth", "{token: a}").replace("extensions: [bearertokenauth/x]", "extensions: []");
        let errors = errors_of(&not_enabled);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("exporters.otlphttp.auth.authenticator") && e.contains("service.extensions")),
            "{errors:#?}"
        );
        let not_auth = config_text("file_storage", "{directory: /tmp}");
        let errors = errors_of(&not_auth);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("is not an authenticator (oauth2client, bearertokenauth or basicauth)")),
            "{errors:#?}"
        );
    }

    #[test]
    fn file_retry_counts_are_warned_as_not_acted_on() {
        let text = config_text(
            "bearertokenauth",
            "{filename: /x, file_retry: {enabled: true, max_retries: 3}}",
        );
        let config = crate::config::parse_str(&text, &|_| None).unwrap();
        let warnings: Vec<String> = crate::config::warnings(&config).iter().map(|w| w.to_string()).collect();
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("extensions.bearertokenauth/x.file_retry") && w.contains("not acted on")),
            "{warnings:#?}"
        );
    }

    #[test]
    fn debug_output_hides_tokens_and_passwords() {
        let b = BearerTokenAuthConfig {
            token: "s3cr3t".into(),
            tokens: vec!["s3cr3t2".into()],
            ..Default::default()
        };
        let c = ClientAuthConfig {
            password: "s3cr3t3".into(),
            ..Default::default()
        };
        let text = format!("{b:?} {c:?}");
        assert!(!text.contains("s3cr3t") && text.contains("<redacted>"), "{text}");
    }
}
