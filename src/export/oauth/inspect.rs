//! `otlp-relay token`: fetches a token exactly as the relay would and prints its JOSE header and
//! the claims an operator needs to debug "Bearer token rejected" (iss, aud, azp, sub, exp,
//! groups, scope) — never the token itself.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;

use super::OAuth2Client;
use crate::config::{self, Extension};

#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The relay configuration holding the oauth2client extension.
    #[arg(long, default_value = "config.yaml")]
    pub config: PathBuf,
    /// Which extension (e.g. oauth2client/mlflow); needed only when there are several.
    #[arg(long)]
    pub extension: Option<String>,
}

/// The decoded JSON header and claims of a JWT, without verifying it; None for opaque tokens.
pub fn jwt_parts(token: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let mut it = token.split('.');
    let (h, c, _sig) = (it.next()?, it.next()?, it.next()?);
    let dec = |s: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?).ok()
    };
    Some((dec(h)?, dec(c)?))
}

/// The printed report: header and selected claims, one per line.
pub fn describe(token: &str, now: SystemTime) -> String {
    let Some((header, claims)) = jwt_parts(token) else {
        return "the access token is not a JWT (opaque token); no claims to show\n".into();
    };
    let mut out = format!("header: {header}\nclaims:\n");
    for name in ["iss", "aud", "azp", "sub", "exp", "groups", "scope"] {
        let value = match claims.get(name) {
            None => "(absent)".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
        out.push_str(&format!("  {name}: {value}"));
        if name == "exp"
            && let Some(exp) = claims.get("exp").and_then(|v| v.as_u64())
        {
            let now_s = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let rfc = httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(exp));
            if exp >= now_s {
                out.push_str(&format!(" ({rfc}, in {} s)", exp - now_s));
            } else {
                out.push_str(&format!(" ({rfc}, expired {} s ago)", now_s - exp));
            }
        }
        out.push('\n');
    }
    let others: Vec<&String> = claims
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !["iss", "aud", "azp", "sub", "exp", "groups", "scope"].contains(&k.as_str()))
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&format!("  other claims: {others:?}\n"));
    out
}

pub fn main(args: TokenArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    let cfg = match config::load_file(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}: {} problem(s):", args.config.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(crate::cli::EXIT_BAD_CONFIG);
        }
    };
    let candidates: Vec<(&String, &crate::config::OAuth2ClientConfig)> = cfg
        .extensions
        .iter()
        .filter_map(|(id, e)| match e {
            Extension::OAuth2Client(o) => Some((id, o.as_ref())),
            _ => None,
        })
        .collect();
    let chosen = match &args.extension {
        Some(want) => candidates.iter().find(|(id, _)| *id == want),
        None if candidates.len() == 1 => candidates.first(),
        None => None,
    };
    let Some((id, ext)) = chosen else {
        let ids: Vec<&String> = candidates.iter().map(|(id, _)| *id).collect();
        if ids.is_empty() {
            eprintln!(
                "{}: no oauth2client extension is defined (the exporters send without a token)",
                args.config.display()
            );
            return ExitCode::from(crate::cli::EXIT_BAD_CONFIG);
        }
        eprintln!(
            "{}: choose an oauth2client extension with --extension (defined: {ids:?})",
            args.config.display()
        );
        return ExitCode::from(crate::cli::EXIT_BAD_CONFIG);
    };
    rt.block_on(async move {
        let client = match OAuth2Client::new(id, ext) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("extensions.{id}: {e}");
                return ExitCode::from(crate::cli::EXIT_BAD_CONFIG);
            }
        };
        match client.fetch().await {
            Ok(f) => {
                println!("extension: {id}");
                println!("token endpoint: {}", f.token_url);
                println!(
                    "token_type: {}, expires_in: {}",
                    f.token_type,
                    f.expires_in
                        .map_or("(not given)".into(), |d| format!("{} s", d.as_secs()))
                );
                if let Some(s) = &f.scopes {
                    println!("granted scopes: {}", s.join(" "));
                }
                print!("{}", describe(&f.access_token, SystemTime::now()));
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{id}: token request failed: {}", failure.message);
                ExitCode::from(1)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(header: &str, claims: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2lnbmF0dXJl", e(header), e(claims))
    }

    #[test]
    fn describe_shows_claims_not_the_token() {
        let token = jwt(
            r#"{"alg":"RS256","typ":"at+jwt","kid":"k1"}"#,
            r#"{"iss":"http://idp/realms/test","aud":"mlflow","azp":"mlflow","sub":"sa","exp":2000000000,"groups":["mlflow"],"scope":"openid","jti":"x"}"#,
        );
        let text = describe(&token, UNIX_EPOCH + std::time::Duration::from_secs(1_999_999_940));
        assert!(text.contains("  aud: mlflow\n"), "{text}");
        assert!(text.contains("  groups: [\"mlflow\"]\n"), "{text}");
        assert!(text.contains("in 60 s"), "{text}");
        assert!(text.contains("\"kid\":\"k1\""), "{text}");
        assert!(text.contains("other claims: [\"jti\"]"), "{text}");
        assert!(!text.contains("c2lnbmF0dXJl"), "{text}");
        assert!(!text.contains(token.split('.').nth(1).unwrap()), "{text}");
    }

    #[test]
    fn opaque_tokens_are_said_to_be_opaque() {
        assert!(jwt_parts("not-a-jwt").is_none());
        assert!(describe("opaque", SystemTime::now()).contains("not a JWT"));
    }
}
