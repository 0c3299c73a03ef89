//! Bearer JWT validation against the provider's JWKS: asymmetric algorithms only, typ JWT or at+jwt,
//! iss, aud (string or array), exp/nbf with leeway, access tokens only (not ID, refresh or logout
//! tokens), and optionally only from the allowed clients (`azp`). The key set is a plain value (pure
//! checks); the shell refetches it on an unknown kid, rate-limited.
use std::collections::HashMap;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use super::session::Identity;

const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not allowed")]
    Algorithm,
    #[error("token type not allowed")]
    Type,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("invalid claims")]
    Claims,
    /// An ID, refresh or logout token (or anything not declared an access token) sent as a Bearer token.
    #[error("not an access token")]
    NotAccessToken,
    /// `azp` (or `client_id`) missing or not in GATE_ALLOWED_CLIENTS.
    #[error("client not allowed")]
    Client,
}

impl JwtError {
    /// Label for the auth-failure metric.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed",
            JwtError::Algorithm => "algorithm",
            JwtError::Type => "type",
            JwtError::UnknownKey => "unknown_key",
            JwtError::Signature => "signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::Issuer => "issuer",
            JwtError::Audience => "audience",
            JwtError::Claims => "claims",
            JwtError::NotAccessToken => "not_access_token",
            JwtError::Client => "client",
        }
    }
}

pub(crate) struct KeySet {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// Keys without a kid (tried when the token has no kid).
    anonymous: Vec<(DecodingKey, Option<Algorithm>)>,
}

impl KeySet {
    pub(crate) fn empty() -> KeySet {
        KeySet {
            by_kid: HashMap::new(),
            anonymous: Vec::new(),
        }
    }

    /// Builds the set from a JWKS document, skipping keys we cannot use (symmetric, encryption keys).
    pub(crate) fn from_jwks_json(json: &[u8]) -> Result<KeySet, serde_json::Error> {
        let set: JwkSet = serde_json::from_slice(json)?;
        let mut ks = KeySet::empty();
        for jwk in &set.keys {
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            if matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            match &jwk.common.key_id {
                Some(kid) => {
                    ks.by_kid.insert(kid.clone(), (key, alg));
                }
                None => ks.anonymous.push((key, alg)),
            }
        }
        Ok(ks)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn has_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }
}

pub(crate) struct JwtRules {
    pub(crate) issuer: String,
    pub(crate) audience: String,
    pub(crate) leeway_secs: u64,
    pub(crate) groups_attribute: String,
    /// Empty: any client; else `azp` / `client_id` must be one of these.
    pub(crate) allowed_clients: Vec<String>,
}

/// Claims that only ID tokens (nonce, at_hash, c_hash, s_hash) or logout tokens (events) carry.
const NOT_ACCESS_TOKEN_CLAIMS: &[&str] = &["nonce", "at_hash", "c_hash", "s_hash", "events"];

fn is_at_jwt(header_typ: Option<&str>) -> bool {
    header_typ.is_some_and(|t| t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt"))
}

/// Whether verified claims belong to an access token. Keycloak says so in the `typ` claim (`Bearer`;
/// `ID`, `Refresh`, `Logout`, `Offline` are other kinds); RFC 9068 in the header (`at+jwt`). With
/// neither, a token carrying an ID- or logout-token claim is refused: its `aud` is our client id too.
pub(crate) fn check_access_token(
    header_typ: Option<&str>,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), JwtError> {
    match claims.get("typ") {
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("Bearer") => return Ok(()),
        Some(_) => return Err(JwtError::NotAccessToken),
        None => {}
    }
    if is_at_jwt(header_typ) {
        return Ok(());
    }
    if NOT_ACCESS_TOKEN_CLAIMS.iter().any(|c| claims.contains_key(*c)) {
        return Err(JwtError::NotAccessToken);
    }
    Ok(())
}

/// With a non-empty `allowed`, the token's authorized party (`azp`, Keycloak and OIDC; `client_id`,
/// RFC 9068) must be listed; a token naming none is refused.
pub(crate) fn check_client(
    allowed: &[String],
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), JwtError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let client = claims
        .get("azp")
        .or_else(|| claims.get("client_id"))
        .and_then(|v| v.as_str());
    match client {
        Some(c) if allowed.iter().any(|a| a == c) => Ok(()),
        _ => Err(JwtError::Client),
    }
}

/// The token's kid, if it parses at all (to decide on a JWKS refetch before validating).
pub(crate) fn kid_of(token: &str) -> Option<String> {
    decode_header(token).ok()?.kid
}

/// Validates `token` with `keys` and returns who it speaks for.
pub(crate) fn validate(keys: &KeySet, rules: &JwtRules, token: &str) -> Result<Identity, JwtError> {
    let header = decode_header(token).map_err(|_| JwtError::Malformed)?;
    if !ASYMMETRIC.contains(&header.alg) {
        return Err(JwtError::Algorithm);
    }
    match header.typ.as_deref() {
        None => {}
        Some(t) if t.eq_ignore_ascii_case("JWT") || t.eq_ignore_ascii_case("at+jwt") => {}
        Some(t) if t.eq_ignore_ascii_case("application/at+jwt") => {}
        Some(_) => return Err(JwtError::Type),
    }
    let candidates: Vec<&(DecodingKey, Option<Algorithm>)> = match &header.kid {
        Some(kid) => keys.by_kid.get(kid).into_iter().collect(),
        None => keys.anonymous.iter().chain(keys.by_kid.values()).collect(),
    };
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey);
    }
    let mut v = Validation::new(header.alg);
    v.algorithms = vec![header.alg];
    v.set_issuer(&[&rules.issuer]);
    v.set_audience(&[&rules.audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v.leeway = rules.leeway_secs;
    v.validate_nbf = true;
    let mut last = JwtError::Signature;
    for (key, alg) in candidates {
        if alg.is_some_and(|a| a != header.alg) {
            last = JwtError::Algorithm;
            continue;
        }
        match decode::<serde_json::Map<String, serde_json::Value>>(token, key, &v) {
            Ok(data) => {
                check_access_token(header.typ.as_deref(), &data.claims)?;
                check_client(&rules.allowed_clients, &data.claims)?;
                return identity(&data.claims, &rules.groups_attribute);
            }
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) | K::InvalidKeyFormat => {
                        JwtError::Signature
                    }
                    K::ExpiredSignature => JwtError::Expired,
                    K::ImmatureSignature => JwtError::NotYetValid,
                    K::InvalidIssuer => JwtError::Issuer,
                    K::InvalidAudience => JwtError::Audience,
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => JwtError::Algorithm,
                    K::MissingRequiredClaim(c) if c == "aud" => JwtError::Audience,
                    K::MissingRequiredClaim(c) if c == "iss" => JwtError::Issuer,
                    K::Base64(_) | K::Json(_) | K::Utf8(_) | K::InvalidToken => JwtError::Malformed,
                    _ => JwtError::Claims,
                };
                // Only a signature mismatch is worth trying the next key for.
                if last != JwtError::Signature {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

/// Identity from verified claims: user = preferred_username (Keycloak), else email, else sub; groups
/// from the configured attribute (a list, or a single string).
pub(crate) fn identity(
    claims: &serde_json::Map<String, serde_json::Value>,
    groups_attribute: &str,
) -> Result<Identity, JwtError> {
    let s = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(String::from);
    let user = s("preferred_username")
        .or_else(|| s("email"))
        .or_else(|| s("sub"))
        .ok_or(JwtError::Claims)?;
    let groups = match claims.get(groups_attribute) {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|g| g.as_str()).map(normalise_group).collect(),
        Some(serde_json::Value::String(g)) => vec![normalise_group(g)],
        _ => Vec::new(),
    };
    Ok(Identity {
        user,
        email: s("email"),
        groups,
    })
}

/// Keycloak's group mapper may emit full paths (`/mlflow`); compare by name.
fn normalise_group(g: &str) -> String {
    g.trim_start_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header, encode};

    // A fixed P-256 test key, generated for these tests only (EC keys are cheap to embed; the RSA path is covered by the integration tests).
    const EC_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg+CEXsw8mMrEbn/sh6ZX6tkduMP55OGiz5x19QmC9kiuhRANCAAT2Jwb14QTiddpSonvM+AjpEY6lKDmHm9Q4B8cWRA0wfhEpc7DfImuWN0/A3++VNqPp188z2d3U934JYzSgEGPn";
    const EC_X: &str = "9icG9eEE4nXaUqJ7zPgI6RGOpSg5h5vUOAfHFkQNMH4";
    const EC_Y: &str = "ESlzsN8ia5Y3T8Df75U2o-nXzzPZ3dT3fgljNKAQY-c";

    fn keys(kid: &str) -> KeySet {
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y, "kid": kid, "use": "sig", "alg": "ES256"}]});
        KeySet::from_jwks_json(jwks.to_string().as_bytes()).unwrap()
    }

    fn signing_key() -> EncodingKey {
        let der = base64::engine::general_purpose::STANDARD.decode(EC_PKCS8).unwrap();
        EncodingKey::from_ec_der(&der)
    }

    fn rules() -> JwtRules {
        JwtRules {
            issuer: "http://idp/realms/test".into(),
            audience: "mlflow".into(),
            leeway_secs: 5,
            groups_attribute: "groups".into(),
            allowed_clients: Vec::new(),
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(typ: &str, kid: &str, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.typ = Some(typ.into());
        h.kid = Some(kid.into());
        encode(&h, &claims, &signing_key()).unwrap()
    }

    fn good_claims() -> serde_json::Value {
        serde_json::json!({"iss": "http://idp/realms/test", "aud": ["account", "mlflow"], "exp": now() + 60,
            "sub": "x", "preferred_username": "svc", "groups": ["/mlflow", "other"]})
    }

    #[test]
    fn accepts_good_tokens() {
        let id = validate(&keys("k1"), &rules(), &token("at+jwt", "k1", good_claims())).unwrap();
        assert_eq!(id.user, "svc");
        assert_eq!(id.groups, ["mlflow", "other"]);
        let mut c = good_claims();
        c["aud"] = "mlflow".into();
        assert!(validate(&keys("k1"), &rules(), &token("JWT", "k1", c)).is_ok());
    }

    #[test]
    fn rejects() {
        let ks = keys("k1");
        let r = rules();
        let with = |k: &str, v: serde_json::Value| {
            let mut c = good_claims();
            c[k] = v;
            c
        };
        assert_eq!(
            validate(&ks, &r, &token("JWT", "k2", good_claims())),
            Err(JwtError::UnknownKey)
        );
        assert_eq!(
            validate(&ks, &r, &token("dpop+jwt", "k1", good_claims())),
            Err(JwtError::Type)
        );
        assert_eq!(
            validate(&ks, &r, &token("JWT", "k1", with("exp", (now() - 60).into()))),
            Err(JwtError::Expired)
        );
        assert_eq!(
            validate(&ks, &r, &token("JWT", "k1", with("nbf", (now() + 60).into()))),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(
            validate(&ks, &r, &token("JWT", "k1", with("iss", "http://evil".into()))),
            Err(JwtError::Issuer)
        );
        assert_eq!(
            validate(&ks, &r, &token("JWT", "k1", with("aud", "other".into()))),
            Err(JwtError::Audience)
        );
        let mut no_aud = good_claims();
        no_aud.as_object_mut().unwrap().remove("aud");
        assert_eq!(validate(&ks, &r, &token("JWT", "k1", no_aud)), Err(JwtError::Audience));
        // Leeway: 3 s past exp is still fine with 5 s leeway.
        assert!(validate(&ks, &r, &token("JWT", "k1", with("exp", (now() - 3).into()))).is_ok());

        // Tampered payload: bad signature.
        let t = token("JWT", "k1", good_claims());
        let parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(with("groups", serde_json::json!(["mlflow-admin"])).to_string());
        assert_eq!(
            validate(&ks, &r, &format!("{}.{}.{}", parts[0], forged, parts[2])),
            Err(JwtError::Signature)
        );

        // alg none and HS256: refused before any key is touched.
        let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"k1"}"#);
        // jsonwebtoken has no "none" algorithm, so the header itself does not parse.
        assert_eq!(
            validate(&ks, &r, &format!("{none}.{}.", parts[1])),
            Err(JwtError::Malformed)
        );
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let hs = encode(&h, &good_claims(), &EncodingKey::from_secret(EC_X.as_bytes()).unwrap()).unwrap();
        assert_eq!(validate(&ks, &r, &hs), Err(JwtError::Algorithm));
        assert_eq!(validate(&ks, &r, "not.a.jwt"), Err(JwtError::Malformed));
    }

    fn claims(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn only_access_tokens() {
        use serde_json::json;
        // Keycloak: header typ JWT for every kind, the kind in the typ claim.
        assert_eq!(
            check_access_token(Some("JWT"), &claims(json!({"typ": "Bearer"}))),
            Ok(())
        );
        assert_eq!(
            check_access_token(Some("JWT"), &claims(json!({"typ": "bearer"}))),
            Ok(())
        );
        for kind in [
            json!("ID"),
            json!("Refresh"),
            json!("Offline"),
            json!("Logout"),
            json!(""),
            json!(1),
        ] {
            for h in [None, Some("JWT"), Some("at+jwt")] {
                assert_eq!(
                    check_access_token(h, &claims(json!({ "typ": kind }))),
                    Err(JwtError::NotAccessToken),
                    "{kind} {h:?}"
                );
            }
        }
        // RFC 9068 access tokens, and plain ones with no kind at all.
        assert_eq!(check_access_token(Some("at+jwt"), &claims(json!({"sub": "x"}))), Ok(()));
        assert_eq!(
            check_access_token(Some("application/AT+JWT"), &claims(json!({}))),
            Ok(())
        );
        assert_eq!(check_access_token(None, &claims(json!({"sub": "x"}))), Ok(()));
        // An ID token without a typ claim (most providers): its nonce / hashes give it away.
        for marker in NOT_ACCESS_TOKEN_CLAIMS {
            let c = claims(json!({ "sub": "x", *marker: "v" }));
            assert_eq!(
                check_access_token(Some("JWT"), &c),
                Err(JwtError::NotAccessToken),
                "{marker}"
            );
            assert_eq!(check_access_token(None, &c), Err(JwtError::NotAccessToken), "{marker}");
        }
    }

    #[test]
    fn allowed_clients() {
        use serde_json::json;
        let allowed = vec!["mlflow".to_string(), "relay".to_string()];
        assert_eq!(check_client(&[], &claims(json!({}))), Ok(()));
        assert_eq!(check_client(&allowed, &claims(json!({"azp": "relay"}))), Ok(()));
        assert_eq!(check_client(&allowed, &claims(json!({"client_id": "mlflow"}))), Ok(()));
        assert_eq!(
            check_client(&allowed, &claims(json!({"azp": "reader"}))),
            Err(JwtError::Client)
        );
        // azp wins over client_id: a listed client_id cannot vouch for another party.
        assert_eq!(
            check_client(&allowed, &claims(json!({"azp": "reader", "client_id": "mlflow"}))),
            Err(JwtError::Client)
        );
        assert_eq!(
            check_client(&allowed, &claims(json!({"sub": "x"}))),
            Err(JwtError::Client)
        );
        assert_eq!(
            check_client(&allowed, &claims(json!({"azp": ["mlflow"]}))),
            Err(JwtError::Client)
        );
        assert_eq!(
            check_client(&allowed, &claims(json!({"azp": "MLFLOW"}))),
            Err(JwtError::Client)
        );
    }

    #[test]
    fn validate_refuses_id_tokens_and_other_clients() {
        let ks = keys("k1");
        let mut id_token = good_claims();
        id_token["typ"] = "ID".into();
        assert_eq!(
            validate(&ks, &rules(), &token("JWT", "k1", id_token)),
            Err(JwtError::NotAccessToken)
        );
        let mut nonce = good_claims();
        nonce["nonce"] = "n".into();
        assert_eq!(
            validate(&ks, &rules(), &token("JWT", "k1", nonce)),
            Err(JwtError::NotAccessToken)
        );
        let mut r = rules();
        r.allowed_clients = vec!["mlflow".into()];
        let mut c = good_claims();
        c["azp"] = "reader".into();
        assert_eq!(
            validate(&ks, &r, &token("at+jwt", "k1", c.clone())),
            Err(JwtError::Client)
        );
        c["azp"] = "mlflow".into();
        assert!(validate(&ks, &r, &token("at+jwt", "k1", c)).is_ok());
    }

    #[test]
    fn jwks_skips_symmetric_keys() {
        let jwks = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
            {"kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y, "kid": "e"}]});
        let ks = KeySet::from_jwks_json(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(ks.len(), 1);
        assert!(ks.has_kid("e") && !ks.has_kid("h"));
    }
}
