//! `--require-jwt`: the sink checks a Bearer JWT on every export and counts the distinct tokens.
use std::collections::{BTreeMap, HashSet};
use std::hash::Hasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::supervise::LockUnpoisoned;

/// Bearer JWT checks for `--require-jwt`: the JWKS is fetched at start and again (at most once
/// a second) when a token names an unknown key, as after a provider's key rotation.
pub(crate) struct JwtCheck {
    jwks_url: String,
    audience: String,
    http: crate::http_client::HttpClient,
    keys: tokio::sync::RwLock<jsonwebtoken::jwk::JwkSet>,
    pub(super) last_fetch: Mutex<Option<Instant>>,
    /// Hashes of the distinct valid tokens seen (not the tokens), and per key id how many.
    tokens: Mutex<(HashSet<u64>, BTreeMap<String, u64>)>,
    rejected: AtomicU64,
}

impl JwtCheck {
    pub(super) fn new(jwks_url: String, audience: String) -> anyhow::Result<JwtCheck> {
        let http = crate::http_client::HttpClient::new(
            &crate::config::ClientTlsConfig::default(),
            crate::http_client::any_https([jwks_url.as_str()]),
            Duration::from_secs(5),
        )?;
        Ok(JwtCheck {
            jwks_url,
            audience,
            http,
            keys: tokio::sync::RwLock::new(jsonwebtoken::jwk::JwkSet { keys: Vec::new() }),
            last_fetch: Mutex::new(None),
            tokens: Mutex::new((HashSet::new(), BTreeMap::new())),
            rejected: AtomicU64::new(0),
        })
    }

    pub(super) async fn refetch(&self) -> Result<(), String> {
        {
            let mut last = self.last_fetch.lock_unpoisoned();
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err("unknown signing key (JWKS fetched less than a second ago)".into());
            }
            *last = Some(Instant::now());
        }
        let doc = self
            .http
            .get_json(&self.jwks_url)
            .await
            .map_err(|e| format!("JWKS: {e}"))?;
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(doc).map_err(|e| format!("JWKS: {e}"))?;
        *self.keys.write().await = set;
        Ok(())
    }

    async fn key_for(&self, kid: &str) -> Option<jsonwebtoken::DecodingKey> {
        let find =
            |set: &jsonwebtoken::jwk::JwkSet| set.find(kid).and_then(|k| jsonwebtoken::DecodingKey::from_jwk(k).ok());
        if let Some(k) = find(&*self.keys.read().await) {
            return Some(k);
        }
        if let Err(e) = self.refetch().await {
            tracing::debug!(error = %e, "no key");
        }
        find(&*self.keys.read().await)
    }

    /// Ok when `authorization` holds a valid Bearer JWT for our audience.
    pub(super) async fn verify(&self, authorization: Option<&str>) -> Result<(), String> {
        let result = self.verify_inner(authorization).await;
        if result.is_err() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn verify_inner(&self, authorization: Option<&str>) -> Result<(), String> {
        use jsonwebtoken::{Algorithm, Validation};
        let value = authorization.ok_or("no Authorization header")?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or("not a Bearer token")?
            .trim();
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("malformed token: {e}"))?;
        if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err("symmetric algorithms are not accepted".into());
        }
        let kid = header.kid.clone().unwrap_or_default();
        let key = self
            .key_for(&kid)
            .await
            .ok_or_else(|| format!("unknown signing key {kid:?}"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        validation.set_audience(&[&self.audience]);
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| e.to_string())?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(token, &mut hasher);
        let mut seen = self.tokens.lock_unpoisoned();
        if seen.0.insert(hasher.finish()) {
            *seen.1.entry(kid).or_default() += 1;
        }
        Ok(())
    }

    pub(super) fn stats(&self) -> serde_json::Value {
        let seen = self.tokens.lock_unpoisoned();
        serde_json::json!({
            "distinct_tokens": seen.0.len(),
            "tokens_by_kid": seen.1,
            "rejected": self.rejected.load(Ordering::Relaxed),
        })
    }
}
