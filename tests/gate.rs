//! The auth front end (`otlp-relay gate`) against a real OpenID provider and a real `mlflow server`.
mod support;

use std::time::Duration;

use support::mlflow::Mlflow;
use support::oidc::{OidcOptions, OidcProvider, jwt_parts};

#[test]
fn fixtures_provider_tokens_and_key_rotation() {
    let mut p = OidcProvider::start(OidcOptions::default());
    let t = p.access_token(support::oidc::CLIENT_ID, support::oidc::CLIENT_SECRET);
    let (h, c) = jwt_parts(&t);
    assert_eq!(h["typ"], "at+jwt");
    assert_eq!(c["iss"], p.issuer.as_str());
    assert_eq!(c["aud"], "mlflow");
    let (_, c) = jwt_parts(&p.access_token(support::oidc::OTHER.0, support::oidc::OTHER.1));
    assert_eq!(c["aud"], "other");
    let port = p.port;
    p.start_again();
    assert_eq!(p.port, port);
    let (h2, _) = jwt_parts(&p.access_token(support::oidc::CLIENT_ID, support::oidc::CLIENT_SECRET));
    assert_eq!(h2["kid"], h["kid"], "a restart keeps the key");
    p.restart_with_new_key();
    let (h3, _) = jwt_parts(&p.access_token(support::oidc::CLIENT_ID, support::oidc::CLIENT_SECRET));
    assert_ne!(h3["kid"], h["kid"], "a new key has a new kid");
    let _ = Duration::from_secs(1);
}

#[test]
fn fixtures_mlflow() {
    let m = Mlflow::start();
    eprintln!("mlflow healthy after {:?}", m.startup);
    let id = m.create_experiment("fixture-check");
    assert!(m.search_traces(&id).is_empty());
}
