#!/usr/bin/env bash
# curl checks against oidc-server.mjs (AUTO_LOGIN=1). usage: check.sh [base]  (needs curl, python3)
set -euo pipefail
B=${1:?usage: check.sh ISSUER (printed by the server as "oidc ready ISSUER")}; OC=$B/protocol/openid-connect; RU=http://127.0.0.1:9999/oauth2/callback
claims() { python3 -c 'import sys,json,base64;p=sys.stdin.read().split(".")[1];print(json.dumps(json.loads(base64.urlsafe_b64decode(p+"="*(-len(p)%4)))))'; }
field() { python3 -c "import sys,json;print(json.load(sys.stdin)['$1'])"; }
expect() { echo "  $3" >&2; grep -q "$2" <<<"$3" && echo "ok $1" || { echo "FAIL $1"; exit 1; }; }
curl -sf $B/.well-known/openid-configuration | field issuer | grep -qx "$B" && echo "ok discovery"
curl -sf $OC/certs | grep -q '"kty":"RSA"' && echo "ok jwks"
CC=$(curl -sf -u mlflow:mlflow-secret -d grant_type=client_credentials $OC/token)
expect client_credentials '"groups": \["mlflow", "mlflow-admin"\].*"aud": "mlflow"' "$(echo "$CC" | field access_token | claims)"
[ "$(curl -s -o /dev/null -w '%{http_code}' -u mlflow:bad -d grant_type=client_credentials $OC/token)" = 401 ] && echo "ok bad secret 401"
# authorization code + PKCE, non-interactive login of login_hint user (cookie jar required)
J=$(mktemp); V=$(python3 -c 'import secrets;print(secrets.token_urlsafe(43))')
C=$(python3 -c 'import sys,hashlib,base64;print(base64.urlsafe_b64encode(hashlib.sha256(sys.argv[1].encode()).digest()).rstrip(b"=").decode())' $V)
U="$OC/auth?client_id=mlflow&response_type=code&scope=openid%20profile%20groups&redirect_uri=$RU&state=xyz&nonce=n&code_challenge=$C&code_challenge_method=S256&login_hint=${USER_ID:-alice}"
for _ in 1 2 3 4; do U=$(curl -s -o /dev/null -b $J -c $J -w '%{redirect_url}' "$U"); [[ $U == $RU* ]] && break; done; rm -f $J
CODE=$(python3 -c "import sys,urllib.parse as u;print(u.parse_qs(u.urlparse(sys.argv[1]).query)['code'][0])" "$U")
T=$(curl -sf -u mlflow:mlflow-secret -d grant_type=authorization_code -d code=$CODE -d code_verifier=$V -d redirect_uri=$RU $OC/token)
expect authorization_code_access_token '"aud": "mlflow"' "$(echo "$T" | field access_token | claims)"
expect id_token '"groups"' "$(echo "$T" | field id_token | claims)"
R=$(curl -sf -u mlflow:mlflow-secret -d grant_type=refresh_token -d refresh_token=$(echo "$T" | field refresh_token) $OC/token)
expect refresh_token "\"sub\": \"${USER_ID:-alice}\"" "$(echo "$R" | field access_token | claims)"
