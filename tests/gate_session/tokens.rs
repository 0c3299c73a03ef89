//! Which tokens are bearer tokens: not ID or refresh tokens, not those of clients not allowed.

use super::*;

#[test]
fn id_and_refresh_tokens_are_not_bearer_tokens() {
    let mlflow = std::thread::spawn(Mlflow::start);
    let provider = OidcProvider::start(OidcOptions::default());
    let mlflow = mlflow.join().unwrap();
    let g = gate(&provider, &mlflow.url(), &[]);
    let path = "/api/2.0/mlflow/experiments/get?experiment_id=0";
    let call = |token: &str| {
        let (s, _, b) = exchange(g.addr, "GET", path, &[("authorization", &bearer(token))], b"");
        (s, b)
    };

    let tokens = code_flow_tokens(&provider, "alice");
    let (id_header, id_claims) = jwt_parts(tokens["id_token"].as_str().unwrap());
    eprintln!("provider ID token header {id_header} claims {id_claims}");
    assert_eq!(
        id_claims["aud"],
        oidc::CLIENT_ID,
        "an ID token's audience is the gate's client"
    );
    // Control: the access token of the same login reaches MLflow.
    let (s, b) = call(tokens["access_token"].as_str().unwrap());
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("Default"), "{b}");

    let mut refused = vec![
        ("provider ID token", tokens["id_token"].as_str().unwrap().to_string()),
        (
            "provider refresh token",
            tokens["refresh_token"].as_str().unwrap().to_string(),
        ),
    ];
    let jwt = serde_json::json!({"typ": "JWT"});
    for typ in ["ID", "Refresh", "Offline", "Logout"] {
        refused.push((typ, mint(&provider, jwt.clone(), keycloak_claims(&provider, Some(typ)))));
    }
    // An ID token from a provider that does not say its kind: its nonce and at_hash give it away.
    let mut plain_id = keycloak_claims(&provider, None);
    plain_id["nonce"] = "n0nce".into();
    plain_id["at_hash"] = "x".into();
    refused.push(("ID token without typ", mint(&provider, jwt.clone(), plain_id)));
    let mut logout = keycloak_claims(&provider, None);
    logout["events"] = serde_json::json!({"http://schemas.openid.net/event/backchannel-logout": {}});
    refused.push(("logout token", mint(&provider, jwt.clone(), logout)));
    for (what, token) in &refused {
        let (s, b) = call(token);
        assert_eq!(s, 401, "{what} accepted as a Bearer token: {b}");
    }
    assert!(g.metric("gate_auth_failures_total", "reason=\"not_access_token\"") >= 7.0);

    // Control: the same minting with Keycloak's access-token typ passes, so the refusals above are
    // about the kind of token and nothing else.
    let access = mint(&provider, jwt, keycloak_claims(&provider, Some("Bearer")));
    let (s, b) = call(&access);
    assert_eq!(s, 200, "{b}");
}

#[test]
fn tokens_of_clients_not_allowed_are_refused() {
    let provider = OidcProvider::start(OidcOptions::default());
    let up = upstream();
    let groups = ("OIDC_GROUP_NAME", "mlflow,mlflow-readers");
    let open = gate(&provider, &up.url(), &[groups]);
    let strict = gate(&provider, &up.url(), &[groups, ("GATE_ALLOWED_CLIENTS", "relay")]);
    let path = "/api/2.0/mlflow/experiments/search?max_results=1";
    let call = |g: &Gate, auth: &str| exchange(g.addr, "GET", path, &[("authorization", auth)], b"").0;

    let reader = provider.access_token(oidc::READER.0, oidc::READER.1);
    let (_, claims) = jwt_parts(&reader);
    assert_eq!(
        claims["aud"],
        oidc::CLIENT_ID,
        "the reader client's tokens name our audience"
    );
    assert_eq!(claims["azp"], oidc::READER.0);
    assert_eq!(
        call(&open, &bearer(&reader)),
        200,
        "any client, without GATE_ALLOWED_CLIENTS"
    );
    assert_eq!(call(&strict, &bearer(&reader)), 401);

    let ours = client_token(&provider);
    assert_eq!(
        call(&strict, &bearer(&ours)),
        200,
        "the gate's own client is always allowed"
    );
    assert_eq!(call(&strict, &basic_auth(oidc::CLIENT_ID, oidc::CLIENT_SECRET)), 200);
    // A listed client by RFC 9068's client_id; no client at all; an unlisted one posing as listed.
    let jwt = serde_json::json!({"typ": "at+jwt"});
    let with = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = keycloak_claims(&provider, Some("Bearer"));
        f(c.as_object_mut().unwrap());
        mint(&provider, jwt.clone(), c)
    };
    let relay = with(&|c| {
        c.remove("azp");
        c.insert("client_id".into(), "relay".into());
    });
    assert_eq!(call(&strict, &bearer(&relay)), 200);
    let nobody = with(&|c| {
        c.remove("azp");
    });
    assert_eq!(call(&strict, &bearer(&nobody)), 401);
    let posing = with(&|c| {
        c.insert("azp".into(), "reader".into());
        c.insert("client_id".into(), "relay".into());
    });
    assert_eq!(call(&strict, &bearer(&posing)), 401);
    assert!(strict.metric("gate_auth_failures_total", "reason=\"client\"") >= 3.0);
}
