//! What `otlp-relay token` prints about a token: its JOSE header and the claims an operator
//! needs to debug "Bearer token rejected" (iss, aud, azp, sub, exp, groups, scope) — never the
//! token itself.
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;

/// The decoded JSON header and claims of a JWT, without verifying it; None for opaque tokens.
pub(crate) fn jwt_parts(token: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let mut it = token.split('.');
    let (h, c, _sig) = (it.next()?, it.next()?, it.next()?);
    let dec = |s: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?).ok()
    };
    Some((dec(h)?, dec(c)?))
}

/// The printed report: header and selected claims, one per line.
pub(crate) fn describe(token: &str, now: SystemTime) -> String {
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
