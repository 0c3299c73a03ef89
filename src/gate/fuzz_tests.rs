//! Property fuzzing of the gate's parsers of untrusted input (bearer JWTs, the JWKS document,
//! sealed cookies, the Cookie header, post-login return paths): no input panics, and nothing
//! forged or tampered with is accepted.
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;

use super::jwt::{self, JwtRules, KeySet};
use super::session::{Sealer, cookie, safe_return_path};

const ISSUER: &str = "http://idp.test/realms/fuzz";

fn rules() -> JwtRules {
    JwtRules {
        issuer: ISSUER.into(),
        audience: "mlflow".into(),
        leeway_secs: 5,
        groups_attribute: "groups".into(),
        allowed_clients: Vec::new(),
    }
}

/// A fresh P-256 key: its JWKS and a signer of compact JWTs (ES256).
struct Signer {
    key: EcdsaKeyPair,
    jwks: KeySet,
}

impl Signer {
    fn new() -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        // Uncompressed point: 0x04 || x || y.
        let point = key.public_key().as_ref().to_vec();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        let jwks = KeySet::from_jwks_json(jwks.to_string().as_bytes()).unwrap();
        Signer { key, jwks }
    }

    fn sign(&self, header: &[u8], claims: &[u8]) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let sig = self.key.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn signer() -> &'static Signer {
    static SIGNER: std::sync::OnceLock<Signer> = std::sync::OnceLock::new();
    SIGNER.get_or_init(Signer::new)
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// JSON values of every type, including numbers at the edges of i64/u64/f64.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Claims: a valid set with some fields replaced by arbitrary values or dropped.
fn claims() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
    let field = |name: &'static str| proptest::option::of(json_value()).prop_map(move |v| (name, v));
    (
        field("exp"),
        field("nbf"),
        field("iss"),
        field("aud"),
        field("preferred_username"),
        field("groups"),
        any::<u8>(),
    )
        .prop_map(|(a, b, c, d, e, f, drop_mask)| {
            let mut m = serde_json::Map::new();
            m.insert("exp".into(), (now() + 300).into());
            m.insert("iss".into(), ISSUER.into());
            m.insert("aud".into(), "mlflow".into());
            m.insert("sub".into(), "u-1".into());
            for (i, (name, value)) in [a, b, c, d, e, f].into_iter().enumerate() {
                if drop_mask & (1 << i) != 0 {
                    m.remove(name);
                } else if let Some(v) = value {
                    m.insert(name.into(), v);
                }
            }
            m
        })
}

fn segments(token: &str) -> Vec<Vec<u8>> {
    token
        .split('.')
        .map(|s| URL_SAFE_NO_PAD.decode(s).unwrap_or_default())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Signed tokens with arbitrary claims: never a panic; accepted only with a valid iss, aud
    /// and exp (whatever the claims' types).
    #[test]
    fn signed_tokens_with_any_claims(claims in claims(), typ in prop_oneof![Just("JWT"), Just("at+jwt"), Just("ID"), Just("x")]) {
        let header = serde_json::json!({"alg": "ES256", "typ": typ, "kid": "k1"});
        let token = signer().sign(header.to_string().as_bytes(), serde_json::to_vec(&claims).unwrap().as_slice());
        if jwt::validate(&signer().jwks, &rules(), &token).is_ok() {
            prop_assert!(typ == "JWT" || typ == "at+jwt", "a {} token was accepted", typ);
            prop_assert_eq!(claims.get("iss").and_then(|v| v.as_str()), Some(ISSUER));
            let exp = claims.get("exp").and_then(|v| v.as_f64()).unwrap_or(0.0);
            prop_assert!(exp + 5.0 >= now() as f64, "expired token accepted: {:?}", claims);
        }
    }

    /// A valid token, then bytes flipped, cut or inserted anywhere: accepted only when every
    /// signed segment still decodes to the original bytes.
    #[test]
    fn tampered_tokens_are_refused(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4)) {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": "k1"});
        let claims = serde_json::json!({"exp": now() + 300, "iss": ISSUER, "aud": "mlflow", "sub": "u-1"});
        let original = signer().sign(header.to_string().as_bytes(), claims.to_string().as_bytes());
        let mut bytes = original.clone().into_bytes();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len().max(1));
            match kind {
                0 if !bytes.is_empty() => bytes[i] = byte,
                1 => bytes.truncate(i),
                _ => bytes.insert(i.min(bytes.len()), byte),
            }
        }
        let Ok(tampered) = String::from_utf8(bytes) else { return Ok(()) };
        let _ = jwt::kid_of(&tampered);
        if jwt::validate(&signer().jwks, &rules(), &tampered).is_ok() {
            prop_assert_eq!(segments(&tampered), segments(&original));
        }
    }

    /// Any text as a bearer token and any JSON as a JWKS document: errors, never panics.
    #[test]
    fn arbitrary_tokens_and_key_sets(token in ".{0,200}", jwks in json_value()) {
        prop_assert!(jwt::validate(&signer().jwks, &rules(), &token).is_err());
        let _ = jwt::kid_of(&token);
        if let Ok(keys) = KeySet::from_jwks_json(jwks.to_string().as_bytes()) {
            prop_assert!(jwt::validate(&keys, &rules(), &token).is_err());
        }
    }

    /// Sealed cookies: any text opens to nothing; a sealed value opens only under its own name
    /// and only untouched.
    #[test]
    fn sealed_cookies_resist_tampering(text in "[A-Za-z0-9_-]{0,120}", flip in any::<prop::sample::Index>(), name in "[a-z]{1,8}") {
        let sealer = Sealer::new(b"fuzz secret");
        prop_assert!(sealer.open::<serde_json::Value>("session", &text).is_none());
        let sealed = sealer.seal(&name, &serde_json::json!({"user": "alice"}));
        prop_assert!(sealer.open::<serde_json::Value>(&name, &sealed).is_some());
        let other = format!("{name}x");
        prop_assert!(sealer.open::<serde_json::Value>(&other, &sealed).is_none());
        let mut raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        let i = flip.index(raw.len());
        raw[i] ^= 0x01;
        prop_assert!(sealer.open::<serde_json::Value>(&name, &URL_SAFE_NO_PAD.encode(raw)).is_none());
    }

    /// The Cookie header and return paths: whatever the client sends, a cookie value comes from
    /// the header itself, and the return path is a same-origin path.
    #[test]
    fn cookie_headers_and_return_paths(header in ".{0,200}", name in "[a-z_]{1,10}", target in ".{0,80}") {
        if let Some(v) = cookie(&header, &name) {
            prop_assert!(header.contains(v));
        }
        let path = safe_return_path(&target);
        prop_assert!(path.starts_with('/'));
        prop_assert!(!path.starts_with("//") && !path.contains('\\'));
        prop_assert!(!path.chars().any(char::is_control));
    }
}
