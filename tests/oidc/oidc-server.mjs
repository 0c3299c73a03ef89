// Keycloak-shaped test OpenID Provider on oidc-provider (panva). Fixture only, binds 127.0.0.1.
// Env: PORT(8180; 0 = pick a free port) REALM(test) TOKEN_TTL(60) CLIENT_SECRET(mlflow-secret) AUDIENCE(mlflow)
//      REDIRECT_URIS(comma list; unset = any loopback URL) INTROSPECTION(0: no introspection endpoint)
//      AUTO_LOGIN(1: /auth logs in login_hint or 'alice' with no form; 0: username/password form)
//      KEY_FILE(path of the RSA signing key as a JWK: loaded if it exists, else generated and written there,
//               so a restart keeps its key, deleting the file rotates it, and two realms can share one key)
// Prints `oidc ready <issuer>` once listening (the port is in the issuer).
// Clients (client_credentials "service accounts", groups in brackets):
//   mlflow/mlflow-secret [mlflow, mlflow-admin]   noaccess/noaccess-secret []   reader/reader-secret [mlflow-readers]
//   other/other-secret   [mlflow] with audience "other" (a token minted for another client)
// Users (password = name): alice [mlflow, mlflow-admin]  bob [other]  carol [mlflow-readers]
// Tokens as Keycloak makes them: a `typ` claim (Bearer in access tokens, ID in ID tokens).
// Admin, Keycloak-shaped: PUT /admin/realms/<realm>/users/<name> {"enabled": false|true} disables or
// enables a user: no new logins, its refresh tokens stop working and introspect as inactive.
import http from 'node:http';
import fs from 'node:fs';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const env = process.env;
const REALM_PREFIX = `/realms/${env.REALM || 'test'}`, TTL = Number(env.TOKEN_TTL || 60);
const AUD = env.AUDIENCE || 'mlflow', AUTO = env.AUTO_LOGIN !== '0';
const REDIRECTS = env.REDIRECT_URIS ? env.REDIRECT_URIS.split(',') : ['http://127.0.0.1/callback'];
const USERS = {
  alice: { password: 'alice', groups: ['mlflow', 'mlflow-admin'] },
  bob: { password: 'bob', groups: ['other'] },
  carol: { password: 'carol', groups: ['mlflow-readers'] },
};
const SERVICE_GROUPS = { mlflow: ['mlflow', 'mlflow-admin'], noaccess: [], reader: ['mlflow-readers'], other: ['mlflow'] };
const AUDIENCES = { other: 'other' }; // everything else gets AUD, like Keycloak's audience mapper on one client
const audienceOf = (clientId) => AUDIENCES[clientId] || AUD;
const client = (id, secret) => ({
  client_id: id, client_secret: secret, redirect_uris: REDIRECTS, post_logout_redirect_uris: REDIRECTS,
  grant_types: ['client_credentials', 'authorization_code', 'refresh_token'], response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic', // client_secret_post is accepted too
});
const oc = '/protocol/openid-connect';
const DISABLED = new Set();

function signingKey() {
  if (env.KEY_FILE && fs.existsSync(env.KEY_FILE)) return JSON.parse(fs.readFileSync(env.KEY_FILE, 'utf8'));
  const jwk = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const key = { ...jwk, kid: crypto.randomUUID(), use: 'sig', alg: 'RS256' };
  if (env.KEY_FILE) fs.writeFileSync(env.KEY_FILE, JSON.stringify(key), { mode: 0o600 });
  return key;
}

function makeProvider(issuer) {
  const provider = new Provider(issuer, {
    clients: [client('mlflow', env.CLIENT_SECRET || 'mlflow-secret'), client('noaccess', 'noaccess-secret'),
      client('reader', 'reader-secret'), client('other', 'other-secret')],
    jwks: { keys: [signingKey()] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    routes: { authorization: `${oc}/auth`, token: `${oc}/token`, jwks: `${oc}/certs`, userinfo: `${oc}/userinfo`,
      end_session: `${oc}/logout`, introspection: `${oc}/token/introspect`, revocation: `${oc}/revoke` },
    claims: { openid: ['sub', 'typ'], profile: ['preferred_username', 'name'], email: ['email'], groups: ['groups'] },
    conformIdTokenClaims: false, // put requested claims (groups...) in the ID token too, like Keycloak mappers
    ttl: { AccessToken: TTL, ClientCredentials: TTL, IdToken: TTL, AuthorizationCode: 60, Session: 3600,
      Interaction: 600, Grant: 3600, RefreshToken: 3600 },
    features: {
      devInteractions: { enabled: false }, clientCredentials: { enabled: true },
      introspection: { enabled: env.INTROSPECTION !== '0', allowedPolicy: async (ctx, c, token) => !DISABLED.has(token.accountId)
        && (c.clientAuthMethod !== 'none' || token.clientId === c.clientId) },
      revocation: { enabled: true },
      rpInitiatedLogout: { enabled: true, logoutSource: logoutPage },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, c) => `urn:${audienceOf(c?.clientId)}`, // no `resource` param needed, like Keycloak
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, c) => ({ audience: audienceOf(c?.clientId),
          scope: 'openid profile email groups', accessTokenTTL: TTL, accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } } }),
      },
    },
    async extraTokenClaims(ctx, token) { // Keycloak-like claims in JWT access tokens
      const user = token.accountId;
      const groups = user ? USERS[user]?.groups : SERVICE_GROUPS[token.clientId];
      return { groups: groups || [], azp: token.clientId, typ: 'Bearer',
        preferred_username: user || `service-account-${token.clientId}` };
    },
    async findAccount(ctx, sub) {
      if (!USERS[sub] || DISABLED.has(sub)) return undefined;
      return { accountId: sub, claims: (use) => ({ sub, preferred_username: sub, name: sub,
        email: `${sub}@example.test`, groups: USERS[sub].groups, typ: use === 'id_token' ? 'ID' : undefined }) };
    },
    issueRefreshToken: async (ctx, c) => c.grantTypeAllowed('refresh_token'), // like Keycloak, no offline_access needed
    async loadExistingGrant(ctx) { // first-party client: auto-consent to whatever was requested
      const { client: c, session, params } = ctx.oidc;
      const grant = new ctx.oidc.provider.Grant({ clientId: c.clientId, accountId: session.accountId });
      grant.addOIDCScope(String(params.scope || 'openid'));
      grant.addResourceScope(`urn:${audienceOf(c.clientId)}`, String(params.scope || 'openid'));
      await grant.save();
      return grant;
    },
    interactions: { url: (ctx, i) => `${REALM_PREFIX}/login-actions/${i.uid}` },
  });
  if (!env.REDIRECT_URIS) { // tests with random ports: accept any loopback redirect URI
    provider.Client.prototype.redirectUriAllowed = (u) => /^http:\/\/(127\.0\.0\.1|localhost)(:\d+)?\//.test(u);
    provider.Client.prototype.postLogoutRedirectUriAllowed = provider.Client.prototype.redirectUriAllowed;
  }
  return provider;
}

// Logout confirmation without a click, like Keycloak with an id_token_hint: submit the form at once
// (with the logout=yes its button would add; without it the provider keeps the session).
async function logoutPage(ctx, form) {
  const yes = form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>');
  ctx.body = `<!doctype html><title>Logging out</title>${yes}<script>document.forms[0].submit()</script>`;
}

const page = (uid, msg = '') => `<!doctype html><title>Sign in</title><p id="msg">${msg}</p>
<form id="kc-form-login" method="post" action="${REALM_PREFIX}/login-actions/${uid}">
<input id="username" name="username"><input id="password" name="password" type="password">
<button id="kc-login" type="submit">Sign In</button></form>`;
async function login(provider, req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  let user = details.params.login_hint || 'alice';
  if (!AUTO || req.method === 'POST') {
    if (req.method !== 'POST') { res.setHeader('content-type', 'text/html'); return res.end(page(uid)); }
    let body = ''; for await (const chunk of req) body += chunk;
    const f = new URLSearchParams(body); user = f.get('username');
    if (USERS[user]?.password !== f.get('password')) {
      res.statusCode = 200; res.setHeader('content-type', 'text/html');
      return res.end(page(uid, 'Invalid username or password.'));
    }
  }
  if (!USERS[user] || DISABLED.has(user)) return provider.interactionFinished(req, res, { error: 'access_denied' });
  return provider.interactionFinished(req, res, { login: { accountId: user } }, { mergeWithLastSubmission: false });
}

// The issuer contains the port, so the provider is made once the socket is bound (PORT=0 works).
let provider, cb;
const server = http.createServer(async (req, res) => {
  try {
    const admin = req.url.match(/^\/admin\/realms\/[^/]+\/users\/([^/?]+)$/);
    if (admin && req.method === 'PUT' && USERS[admin[1]]) {
      let body = ''; for await (const chunk of req) body += chunk;
      const enabled = JSON.parse(body || '{}').enabled;
      if (enabled === false) DISABLED.add(admin[1]); else if (enabled === true) DISABLED.delete(admin[1]);
      res.statusCode = 204; return res.end();
    }
    const m = req.url.startsWith(`${REALM_PREFIX}/login-actions/`) && req.url.split('?')[0].split('/').pop();
    if (m) return await login(provider, req, res, m);
    if (req.url.startsWith(REALM_PREFIX)) {
      req.originalUrl = req.url; req.url = req.url.slice(REALM_PREFIX.length) || '/'; return cb(req, res);
    }
    res.statusCode = 404; res.end('not found');
  } catch (e) { res.statusCode = 400; res.end(String(e)); }
});
server.listen(Number(env.PORT ?? 8180), '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}${REALM_PREFIX}`;
  provider = makeProvider(issuer);
  cb = provider.callback();
  console.log(`oidc ready ${issuer}`);
});
process.on('SIGTERM', () => process.exit(0));
