// Test OpenID Connect provider for the Countersign test suite.
//
// Usage: node server.mjs <config.json>
//
// Config shape:
//   {
//     "port": 12345,
//     "issuer": "http://127.0.0.1:12345",
//     "audience": "countersign",
//     "clients": [
//       {"client_id": "agent-7", "client_secret": "s3cret",
//        "claims": {"groups": ["agents"], "act": {"sub": "alice@example.com"}}}
//     ],
//     // optional: authorization code + PKCE for human users
//     "people": {
//       "client_id": "people",
//       "redirect_uris": ["http://127.0.0.1:9/callback"],
//       // optional; default: ".../_countersign/ui/logged-out" for each ".../_countersign/ui/callback"
//       "post_logout_redirect_uris": [...],
//       "users": [{"sub": "alice@example.com", "claims": {"email": "...", "groups": [...]}}]
//     }
//   }
//
// Machine clients get the client_credentials grant and RS256 JWT access tokens
// whose audience is "audience" (or the "resource" request parameter, when given),
// carrying sub = client_id, client_id, and every key of the client's "claims".
//
// Test-only endpoints (not part of oidc-provider):
//   POST /__test/rotate        replace the RSA signing key (new kid); body may be
//                              {"keep_old": true} to keep publishing the old key.
//   GET  /interaction/:uid     headless login/consent: logs in the user named by
//                              the authorization request's login_hint.
//
// Prints exactly one line "READY <issuer>" on stdout once listening.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const configPath = process.argv[2];
if (!configPath) {
  process.stderr.write('usage: node server.mjs <config.json>\n');
  process.exit(2);
}

const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
const { port, issuer } = config;
const audience = config.audience ?? 'countersign';
const host = config.host ?? '127.0.0.1';
const RESOURCE_SCOPE = 'api';

// Resource indicators must be absolute URIs, but the configured audience is
// usually a bare string ("countersign"). The default resource is therefore an
// URN that maps back to the configured audience; any other requested resource
// becomes the audience verbatim.
const isAbsoluteUri = (value) => URL.parse(value) !== null;
const DEFAULT_RESOURCE = isAbsoluteUri(audience)
  ? audience
  : `urn:countersign-test-idp:audience:${encodeURIComponent(audience)}`;

const machineClients = new Map();
for (const c of config.clients ?? []) {
  if (machineClients.has(c.client_id)) {
    throw new Error(`duplicate client_id in config: ${c.client_id}`);
  }
  machineClients.set(c.client_id, c);
}
const people = config.people ?? null;
const users = new Map((people?.users ?? []).map((u) => [u.sub, u]));

// ---------------------------------------------------------------- keys

function newKid(prefix) {
  return `${prefix}-${crypto.randomBytes(8).toString('hex')}`;
}

function generateRsaJwk() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid: newKid('rsa'),
    use: 'sig',
    alg: 'RS256',
  };
}

function generateEcJwk() {
  const { privateKey } = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid: newKid('ec'),
    use: 'sig',
    alg: 'ES256',
  };
}

const ecKey = generateEcJwk();
let rsaKeys = [generateRsaJwk()]; // first one signs; the rest are only published

// ---------------------------------------------------------------- provider

function clientMetadata() {
  const list = [...machineClients.values()].map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
    scope: RESOURCE_SCOPE,
  }));
  if (people) {
    list.push({
      client_id: people.client_id ?? 'people',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      redirect_uris: people.redirect_uris,
      // RP-Initiated Logout: the inbox's "logged-out" page beside each inbox callback (any
      // loopback port, as for redirect_uris), unless the config lists them.
      post_logout_redirect_uris: people.post_logout_redirect_uris ??
        people.redirect_uris
          .filter((uri) => uri.endsWith('/_countersign/ui/callback'))
          .map((uri) => uri.replace(/callback$/, 'logged-out')),
      // native: a loopback redirect URI matches on any port (RFC 8252 section 7.3), so the
      // inbox of a proxy on a free port can log people in.
      application_type: 'native',
      token_endpoint_auth_method: 'none', // public client => PKCE required
      scope: `openid email profile ${RESOURCE_SCOPE}`,
    });
  }
  return list;
}

function claimsFor(token) {
  if (token.accountId) {
    return users.get(token.accountId)?.claims;
  }
  return machineClients.get(token.clientId)?.claims;
}

function buildProvider() {
  const provider = new Provider(issuer, {
    clients: clientMetadata(),
    jwks: { keys: [...rsaKeys, ecKey] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'groups'],
    },
    scopes: ['openid', 'offline_access', RESOURCE_SCOPE],
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => DEFAULT_RESOURCE,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resourceIndicator) => ({
          scope: RESOURCE_SCOPE,
          audience: resourceIndicator === DEFAULT_RESOURCE ? audience : resourceIndicator,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 600,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    // Merged into the JWT access token payload (before jti/sub/iat/exp/
    // client_id/iss/aud, so those registered claims always win).
    // A machine client marked "may_act_for" may name the person it acts for in the token
    // request (`act_for=alice@example.com`), as a token exchange would: the token then says
    // act: {sub: ...}. Tests use it for one agent acting for different owners.
    extraParams: ['act_for'],
    extraTokenClaims: async (ctx, token) => {
      const claims = claimsFor(token);
      const actFor = ctx?.oidc?.params?.act_for ?? ctx?.oidc?.body?.act_for;
      const client = machineClients.get(token.clientId);
      if (actFor && client?.may_act_for && !token.accountId) {
        return { ...(claims || {}), act: { sub: actFor } };
      }
      return claims ? { ...claims } : undefined;
    },
    findAccount: async (_ctx, sub) => {
      const user = users.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        claims: async () => ({ sub, ...user.claims }),
      };
    },
    ttl: {
      AccessToken: 600,
      ClientCredentials: 600,
      AuthorizationCode: 60,
      IdToken: 600,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    renderError: async (ctx, out) => {
      ctx.type = 'json';
      ctx.body = out;
    },
  });
  // oidc-provider logs "server_error" details via this event; surface them.
  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`server_error: ${err?.stack ?? err}\n`);
  });
  return provider;
}

let provider = buildProvider();
let providerCallback = provider.callback();

// ---------------------------------------------------------------- test hooks

function sendJson(res, status, body) {
  const payload = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(payload),
  });
  res.end(payload);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function rotate(req, res) {
  let keepOld = false;
  const raw = await readBody(req);
  if (raw.trim()) {
    try {
      keepOld = Boolean(JSON.parse(raw).keep_old);
    } catch {
      sendJson(res, 400, { error: 'invalid JSON body' });
      return;
    }
  }
  const fresh = generateRsaJwk();
  rsaKeys = keepOld ? [fresh, ...rsaKeys] : [fresh];
  // oidc-provider's keystore is fixed at construction, so swap in a whole new
  // Provider instance behind the same HTTP server (the in-memory adapter's
  // storage is module-level, so sessions/grants survive the swap).
  provider = buildProvider();
  providerCallback = provider.callback();
  sendJson(res, 200, {
    kid: fresh.kid,
    kids: [...rsaKeys, ecKey].map((k) => k.kid),
  });
}

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;

  if (prompt.name === 'login') {
    const hint = params.login_hint;
    if (!hint && req.method === 'GET') {
      loginForm(res, details.uid);
      return;
    }
    if (!hint || !users.has(hint)) {
      await provider.interactionFinished(req, res, {
        error: 'access_denied',
        error_description: `unknown or missing login_hint: ${hint ?? '(none)'}`,
      }, { mergeWithLastSubmission: false });
      return;
    }
    await provider.interactionFinished(req, res, {
      login: { accountId: hint },
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    if (missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, {
      consent: details.grantId ? {} : { grantId },
    }, { mergeWithLastSubmission: true });
    return;
  }

  sendJson(res, 400, { error: `unsupported prompt ${prompt.name}` });
}

// A browser without login_hint gets a form: type a user's sub, press "Log in".
function loginForm(res, uid) {
  const page = `<!doctype html><title>Test IdP login</title><h1>Test IdP</h1>
<form method="post" action="/interaction/${uid}/login">
<label>User <input name="login" id="login" autofocus></label>
<button type="submit" id="submit">Log in</button></form>`;
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
  res.end(page);
}

async function loginSubmit(req, res) {
  const details = await provider.interactionDetails(req, res);
  const login = new URLSearchParams(await readBody(req)).get('login') ?? '';
  if (details.prompt.name !== 'login' || !users.has(login)) {
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: `unknown user: ${login || '(none)'}`,
    }, { mergeWithLastSubmission: false });
    return;
  }
  await provider.interactionFinished(req, res, {
    login: { accountId: login },
  }, { mergeWithLastSubmission: false });
}

// ---------------------------------------------------------------- server

const server = http.createServer((req, res) => {
  const { pathname } = new URL(req.url, issuer);
  let handler = null;
  if (req.method === 'POST' && pathname === '/__test/rotate') {
    handler = rotate;
  } else if (req.method === 'POST' && /^\/interaction\/[^/]+\/login$/.test(pathname)) {
    handler = loginSubmit;
  } else if (req.method === 'GET' && pathname.startsWith('/interaction/')) {
    handler = interaction;
  }
  if (!handler) {
    providerCallback(req, res);
    return;
  }
  handler(req, res).catch((err) => {
    process.stderr.write(`test hook error: ${err?.stack ?? err}\n`);
    if (!res.headersSent) sendJson(res, 500, { error: String(err?.message ?? err) });
    else res.end();
  });
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.on('error', (err) => {
  process.stderr.write(`listen error: ${err?.stack ?? err}\n`);
  process.exit(1);
});

// Static clients are only validated on first use; load them all now so a bad
// client config fails startup instead of the first token request.
for (const { client_id: clientId } of clientMetadata()) {
  await provider.Client.find(clientId);
}

server.listen(port, host, () => {
  process.stdout.write(`READY ${issuer}\n`);
});
