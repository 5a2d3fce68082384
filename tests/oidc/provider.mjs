#!/usr/bin/env node
// A real OpenID Connect provider for Ward's identity tests: panva's certified `oidc-provider`
// behind HTTPS, one confidential client, users from a JSON file, password + one-time-code login
// pages, and a bearer-protected admin API (separate port) that the tests drive: disable/enable
// a user, set groups, send back-channel logout, push SCIM PATCHes, tamper with the next ID token.
//
//   node provider.mjs --issuer https://127.0.0.1:9443 --tls-cert srv.pem --tls-key srv.key \
//       --jwks jwks.json --users users.json --client-id ward --client-secret S \
//       --admin-listen 127.0.0.1:9444 --admin-token T [--backchannel-logout-uri URL] ...
//   node genjwks.mjs jwks.json     (makes the signing keys; see README.md for rotation)
//
// Every option can also come from the environment: --client-secret <=> OIDC_CLIENT_SECRET.
// See README.md beside this file.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { parseArgs } from 'node:util';

import { Provider, errors as oidcErrors } from 'oidc-provider';

// ---------------------------------------------------------------------------------------------
// Small helpers

function log(event, fields = {}) {
  // One JSON line per event on stdout; secrets are never passed in here.
  process.stdout.write(`${JSON.stringify({ ts: new Date().toISOString(), event, ...fields })}\n`);
}

function die(msg) {
  process.stderr.write(`provider: ${msg}\n`);
  process.exit(2);
}

function b64url(buf) {
  return Buffer.from(buf).toString('base64url');
}

function htmlEscape(s) {
  return String(s ?? '').replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  }[c]));
}

function readBody(req, limit = 64 * 1024) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function readJson(file, what) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    return die(`${what} ${file}: ${err.message}`);
  }
}

function splitHostPort(s, what) {
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(s || '');
  if (!m) die(`${what}: expected HOST:PORT, got ${JSON.stringify(s)}`);
  return { host: m[1], port: Number(m[2]) };
}

// ---------------------------------------------------------------------------------------------
// Configuration

const OPTS = {
  issuer: { type: 'string', env: 'OIDC_ISSUER' },
  listen: { type: 'string', env: 'OIDC_LISTEN' },
  'tls-cert': { type: 'string', env: 'OIDC_TLS_CERT' },
  'tls-key': { type: 'string', env: 'OIDC_TLS_KEY' },
  jwks: { type: 'string', env: 'OIDC_JWKS' },
  users: { type: 'string', env: 'OIDC_USERS' },
  'client-id': { type: 'string', env: 'OIDC_CLIENT_ID', default: 'ward' },
  'client-secret': { type: 'string', env: 'OIDC_CLIENT_SECRET' },
  'client-name': { type: 'string', env: 'OIDC_CLIENT_NAME', default: 'Ward' },
  'redirect-uri': { type: 'string', multiple: true, env: 'OIDC_REDIRECT_URIS', default: ['http://127.0.0.1/callback'] },
  'backchannel-logout-uri': { type: 'string', env: 'OIDC_BACKCHANNEL_LOGOUT_URI' },
  'backchannel-session-required': { type: 'string', env: 'OIDC_BACKCHANNEL_SESSION_REQUIRED', default: 'true' },
  'admin-listen': { type: 'string', env: 'OIDC_ADMIN_LISTEN' },
  'admin-token': { type: 'string', env: 'OIDC_ADMIN_TOKEN' },
  'scim-url': { type: 'string', env: 'OIDC_SCIM_URL' },
  'scim-token': { type: 'string', env: 'OIDC_SCIM_TOKEN' },
  'rp-ca-file': { type: 'string', env: 'OIDC_RP_CA_FILE' },
  'mfa-code': { type: 'string', env: 'OIDC_MFA_CODE', default: '424242' },
  'rt-rotation': { type: 'string', env: 'OIDC_RT_ROTATION', default: 'always' },
  'access-token-ttl': { type: 'string', env: 'OIDC_ACCESS_TOKEN_TTL', default: '600' },
  'id-token-ttl': { type: 'string', env: 'OIDC_ID_TOKEN_TTL', default: '600' },
  'refresh-token-ttl': { type: 'string', env: 'OIDC_REFRESH_TOKEN_TTL', default: '86400' },
  'device-code-ttl': { type: 'string', env: 'OIDC_DEVICE_CODE_TTL', default: '600' },
  'device-poll-interval': { type: 'string', env: 'OIDC_DEVICE_POLL_INTERVAL', default: '1' },
};

const parsed = parseArgs({
  args: process.argv.slice(2),
  options: Object.fromEntries(Object.entries(OPTS).map(([k, v]) => [k, { type: v.type, multiple: Boolean(v.multiple) }])),
  strict: true,
});
const cfg = {};
for (const [k, v] of Object.entries(OPTS)) {
  let val = parsed.values[k];
  if (val === undefined && v.env && process.env[v.env] !== undefined) {
    val = v.multiple ? process.env[v.env].split(/[\s,]+/).filter(Boolean) : process.env[v.env];
  }
  if (val === undefined) val = v.default;
  cfg[k] = val;
}
for (const k of ['issuer', 'tls-cert', 'tls-key', 'jwks', 'users', 'client-secret', 'admin-listen', 'admin-token']) {
  if (!cfg[k]) die(`missing --${k} (or $${OPTS[k].env})`);
}
const issuerUrl = new URL(cfg.issuer);
if (issuerUrl.protocol !== 'https:') die('--issuer must be an https:// URL');
const listen = cfg.listen ? splitHostPort(cfg.listen, '--listen')
  : { host: issuerUrl.hostname.replace(/^\[|\]$/g, ''), port: Number(issuerUrl.port || 443) };
const adminListen = splitHostPort(cfg['admin-listen'], '--admin-listen');
// A test provider: bind only loopback or private (lab namespace) addresses, never a wildcard or
// a public address.
function privateAddress(host) {
  if (net.isIPv4(host)) {
    const [a, b] = host.split('.').map(Number);
    return a === 127 || a === 10 || (a === 172 && b >= 16 && b < 32) || (a === 192 && b === 168);
  }
  if (net.isIPv6(host)) {
    const h = host.toLowerCase();
    return h === '::1' || /^f[cd][0-9a-f]{0,2}:/.test(h);
  }
  return host === 'localhost';
}
for (const [what, l] of [['--listen', listen], ['--admin-listen', adminListen]]) {
  if (!privateAddress(l.host)) die(`${what} ${l.host}: bind loopback or a private lab address only`);
}
if (!['always', 'never'].includes(cfg['rt-rotation'])) die('--rt-rotation must be always or never');
const ttl = (k) => {
  const n = Number(cfg[k]);
  if (!Number.isInteger(n) || n <= 0) die(`--${k} must be a positive number of seconds`);
  return n;
};

const jwks = readJson(cfg.jwks, '--jwks');
if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) die(`${cfg.jwks}: no keys`);
const signingJwk = jwks.keys[0];
const signingAlg = signingJwk.alg || (signingJwk.kty === 'EC' ? 'ES256' : 'RS256');
const rpCa = cfg['rp-ca-file'] ? fs.readFileSync(cfg['rp-ca-file']) : undefined;

// ---------------------------------------------------------------------------------------------
// Users

const usersList = readJson(cfg.users, '--users');
const users = new Map();
const usersArray = Array.isArray(usersList) ? usersList : usersList?.users;
if (!Array.isArray(usersArray)) die(`${cfg.users}: expected a JSON list of users or {"users": [...]}`);
for (const u of usersArray) {
  const sub = u.sub || u.id;
  if (!sub || !u.username || typeof u.password !== 'string') die(`${cfg.users}: every user needs sub (or id), username, password`);
  users.set(sub, {
    sub,
    username: u.username,
    password: u.password,
    email: u.email,
    email_verified: u.email_verified ?? Boolean(u.email),
    preferred_username: u.preferred_username || u.username,
    name: u.name,
    groups: Array.isArray(u.groups) ? [...u.groups] : [],
    active: u.active !== false,
    mfa: Boolean(u.mfa ?? u.mfa_capable ?? u['mfa-capable']),
  });
}

function userByLogin(login) {
  const l = String(login || '').toLowerCase();
  for (const u of users.values()) {
    if (u.username.toLowerCase() === l || (u.email && u.email.toLowerCase() === l)) return u;
  }
  return undefined;
}

function safeEqual(a, b) {
  const x = crypto.createHash('sha256').update(String(a)).digest();
  const y = crypto.createHash('sha256').update(String(b)).digest();
  return crypto.timingSafeEqual(x, y);
}

// ---------------------------------------------------------------------------------------------
// Storage: an in-memory adapter whose sessions can be listed per account (for back-channel
// logout from the admin API). State is lost on restart, like a provider whose DB was wiped.

const store = new Map(); // `${model}:${id}` -> { payload, exp }
const grantIndex = new Map(); // grantId -> Set of keys
const uidIndex = new Map(); // `${model}:uid:${uid}` -> id
const userCodeIndex = new Map(); // userCode -> id

class MapAdapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    store.set(key, { payload, exp: expiresIn ? Date.now() + expiresIn * 1000 : Infinity });
    if (payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(key);
    }
    if (payload.uid) uidIndex.set(`${this.model}:uid:${payload.uid}`, id);
    if (payload.userCode) userCodeIndex.set(payload.userCode, id);
  }

  async find(id) {
    const e = store.get(this.key(id));
    if (!e) return undefined;
    if (e.exp <= Date.now()) {
      store.delete(this.key(id));
      return undefined;
    }
    return e.payload;
  }

  async findByUid(uid) {
    const id = uidIndex.get(`${this.model}:uid:${uid}`);
    return id ? this.find(id) : undefined;
  }

  async findByUserCode(userCode) {
    const id = userCodeIndex.get(userCode);
    return id ? this.find(id) : undefined;
  }

  async consume(id) {
    const e = store.get(this.key(id));
    if (e) e.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantIndex.get(grantId) || []) store.delete(key);
    grantIndex.delete(grantId);
  }
}

function sessionsOf(sub) {
  const out = [];
  const now = Date.now();
  for (const [key, e] of store) {
    if (key.startsWith('Session:') && e.exp > now && e.payload.accountId === sub) {
      out.push({ id: key.slice('Session:'.length), payload: e.payload });
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Outgoing requests (back-channel logout, SCIM): the RP lives on loopback or a lab address, which
// oidc-provider's default fetch refuses (SSRF guard), and it may use its own CA.

function rpRequest(url, { method = 'POST', headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const mod = u.protocol === 'https:' ? https : http;
    const data = body === undefined ? undefined : Buffer.from(body);
    const req = mod.request(u, {
      method,
      headers: { ...headers, ...(data ? { 'content-length': data.length } : {}) },
      ca: rpCa,
      timeout: 5000,
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('timeout', () => req.destroy(new Error(`timeout talking to ${u.origin}`)));
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

async function providerFetch(url, options) {
  const headers = Object.fromEntries(new Headers(options.headers).entries());
  let body = options.body;
  if (body instanceof URLSearchParams) body = body.toString();
  const r = await rpRequest(url, { method: options.method || 'GET', headers, body });
  return new Response(r.status === 204 ? null : r.body, { status: r.status });
}

// ---------------------------------------------------------------------------------------------
// Pages (plain HTML, stable form ids for tests/oidc/login.py)

function page(title, body, id) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${htmlEscape(title)}</title></head>
<body id="${htmlEscape(id)}"><h1>${htmlEscape(title)}</h1>
${body}
</body></html>`;
}

function errorBlock(msg) {
  return msg ? `<p id="error" class="error">${htmlEscape(msg)}</p>` : '';
}

// ---------------------------------------------------------------------------------------------
// The provider

const clientMeta = {
  client_id: cfg['client-id'],
  client_secret: cfg['client-secret'],
  client_name: cfg['client-name'],
  grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token', 'authorization_code'],
  response_types: ['code'],
  redirect_uris: cfg['redirect-uri'],
  application_type: 'native', // loopback redirect URIs with any port (RFC 8252 section 7.3)
  token_endpoint_auth_method: 'client_secret_basic',
  id_token_signed_response_alg: signingAlg,
};
if (cfg['backchannel-logout-uri']) {
  clientMeta.backchannel_logout_uri = cfg['backchannel-logout-uri'];
  clientMeta.backchannel_logout_session_required = cfg['backchannel-session-required'] !== 'false';
}

const configuration = {
  adapter: MapAdapter,
  clients: [clientMeta],
  clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
  jwks,
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  responseTypes: ['code'],
  acrValues: ['urn:ward:acr:pwd', 'urn:ward:acr:mfa'],
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    // amr, acr and auth_time of the sign-in ride in every ID token.
    openid: ['sub', 'amr', 'acr', 'auth_time'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username', 'name'],
    groups: ['groups'],
  },
  // `groups`, `email` and `preferred_username` go into the ID token too (not only userinfo),
  // as Okta/Entra do for requested claim scopes.
  conformIdTokenClaims: false,
  enabledJWA: {
    idTokenSigningAlgValues: ['RS256', 'ES256'],
  },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      charset: 'base-20',
      mask: '****-****',
      async userCodeInputSource(ctx, form, out, err) {
        let msg = '';
        if (err && err.name === 'AlreadyUsedError') msg = 'The code you entered was already used.';
        else if (err && err.name === 'ExpiredError') msg = 'The code you entered has expired.';
        else if (err && (err.userCode || err.name === 'NoCodeError' || err.name === 'NotFoundError')) msg = 'The code you entered is incorrect.';
        else if (err && err.name === 'AbortedError') msg = 'The sign-in request was interrupted.';
        else if (err) msg = `There was an error processing your request: ${err.error_description || err.message}`;
        ctx.body = page('Enter device code', `${errorBlock(msg)}${form}<button type="submit" form="op.deviceInputForm">Continue</button>`, 'device-input');
      },
      async userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
        ctx.body = page('Confirm device', `<p>Sign in to <strong>${htmlEscape(client.clientName || client.clientId)}</strong>.
The code shown on your device should be <code id="user-code">${htmlEscape(userCode)}</code>.</p>
${form}<button type="submit" form="op.deviceConfirmForm">Continue</button>
<button type="submit" form="op.deviceConfirmForm" value="yes" name="abort">Abort</button>`, 'device-confirm');
      },
      async successSource(ctx) {
        ctx.body = page('Sign-in success', '<p id="device-success">Your device is signed in; you can close this page.</p>', 'device-success');
      },
    },
    backchannelLogout: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  pkce: { required: () => true },
  ttl: {
    AccessToken: ttl('access-token-ttl'),
    IdToken: ttl('id-token-ttl'),
    RefreshToken: ttl('refresh-token-ttl'),
    DeviceCode: ttl('device-code-ttl'),
    AuthorizationCode: 60,
    Interaction: 600,
    Session: 86400,
    Grant: 86400 * 14,
  },
  // Refresh tokens: issued to device-flow logins and to any login that asked for offline_access.
  async issueRefreshToken(ctx, client, code) {
    return client.grantTypeAllowed('refresh_token')
      && (code.kind === 'DeviceCode' || code.scopes.has('offline_access'));
  },
  rotateRefreshToken: () => cfg['rt-rotation'] === 'always',
  // Tokens outlive the browser session that produced them (a device signs in once).
  expiresWithSession: async () => false,
  async extraTokenClaims() { return undefined; },
  async findAccount(ctx, sub) {
    const u = users.get(sub);
    // A disabled or deleted user has no account: refresh grants get invalid_grant and userinfo
    // gets 401 invalid_token from oidc-provider itself.
    if (!u || !u.active) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          email: u.email,
          email_verified: u.email_verified,
          preferred_username: u.preferred_username,
          name: u.name,
          groups: [...u.groups],
        };
      },
    };
  },
  interactions: {
    url(ctx, interaction) { return `/interaction/${interaction.uid}`; },
  },
  fetch: providerFetch,
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', `<p id="error" class="error">${htmlEscape(out.error)}: ${htmlEscape(out.error_description || '')}</p>`, 'op-error');
  },
};

const provider = new Provider(issuerUrl.href.replace(/\/$/, ''), configuration);
provider.proxy = false;

provider.on('server_error', (ctx, err) => log('server_error', { path: ctx?.path, error: err.message }));
provider.on('grant.error', (ctx, err) => log('grant.error', { error: err.error || err.message, detail: err.error_description }));
provider.on('grant.success', (ctx) => log('grant.success', { grant_type: ctx.oidc.params?.grant_type, client: ctx.oidc.client?.clientId, sub: ctx.oidc.account?.accountId }));
provider.on('userinfo.error', (ctx, err) => log('userinfo.error', { error: err.error || err.message, detail: err.error_description }));
provider.on('backchannel.error', (ctx, err, client, sub, sid) => log('backchannel.error', { client: client.clientId, sub, sid, error: err.message }));

// ---------------------------------------------------------------------------------------------
// ID token tampering (admin API arms it; the next token response carrying an id_token is changed)

const TAMPER_MODES = ['wrong_aud', 'wrong_iss', 'expired', 'alg_none', 'forged', 'replay'];
let tamper = null; // { mode, grantType }
const earlierIdTokens = []; // ID tokens of earlier logins (code/device grants), newest last
const signingKey = crypto.createPrivateKey({ key: signingJwk, format: 'jwk' });

function signJwt(header, payload, key, alg) {
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
  let sig;
  if (alg === 'RS256') sig = crypto.sign('sha256', Buffer.from(input), key);
  else if (alg === 'ES256') sig = crypto.sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' });
  else throw new Error(`cannot sign ${alg}`);
  return `${input}.${b64url(sig)}`;
}

function decodeJwt(jwt) {
  const [h, p] = jwt.split('.');
  return { header: JSON.parse(Buffer.from(h, 'base64url')), payload: JSON.parse(Buffer.from(p, 'base64url')) };
}

function tamperIdToken(mode, idToken) {
  const { header, payload } = decodeJwt(idToken);
  const now = Math.floor(Date.now() / 1000);
  switch (mode) {
    case 'wrong_aud':
      return signJwt(header, { ...payload, aud: 'not-ward-client' }, signingKey, header.alg);
    case 'wrong_iss':
      return signJwt(header, { ...payload, iss: `${provider.issuer}/evil` }, signingKey, header.alg);
    case 'expired':
      return signJwt(header, { ...payload, iat: now - 7200, exp: now - 3600 }, signingKey, header.alg);
    case 'alg_none':
      return `${b64url(JSON.stringify({ ...header, alg: 'none' }))}.${b64url(JSON.stringify(payload))}.`;
    case 'forged': {
      const other = header.alg === 'ES256'
        ? crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey
        : crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
      return signJwt(header, payload, other, header.alg);
    }
    case 'replay': {
      // The ID token of the newest EARLIER login (another sign-in session: another sid, nonce
      // and auth_time) of the same user to the same client, validly signed.
      const old = [...earlierIdTokens].reverse()
        .find((t) => t.token !== idToken && t.sub === payload.sub && t.aud === payload.aud
          && t.sid !== payload.sid);
      return old?.token;
    }
    default:
      return undefined;
  }
}

// RFC 8628 section 3.2: tell the device how often to poll (oidc-provider omits `interval`, which
// means 5 s; tests want a shorter one). Polling faster is not answered with slow_down.
const pollInterval = ttl('device-poll-interval');
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/device/auth' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    ctx.body.interval = pollInterval;
  }
});

provider.use(async (ctx, next) => {
  await next();
  if (ctx.path !== '/token' || ctx.method !== 'POST' || ctx.status !== 200) return;
  const body = ctx.body;
  if (!body || typeof body !== 'object' || typeof body.id_token !== 'string') return;
  const grantType = ctx.oidc?.params?.grant_type;
  const original = body.id_token;
  if (tamper && (!tamper.grantType || tamper.grantType === grantType)) {
    const changed = tamperIdToken(tamper.mode, original);
    if (changed) {
      log('tamper.applied', { mode: tamper.mode, grant_type: grantType });
      body.id_token = changed;
      tamper = null;
    } else {
      log('tamper.skipped', { mode: tamper.mode, grant_type: grantType, reason: 'no earlier login of this user to replay' });
    }
  }
  if (grantType !== 'refresh_token') {
    const { payload } = decodeJwt(original);
    earlierIdTokens.push({ token: original, sub: payload.sub, aud: payload.aud, sid: payload.sid });
    if (earlierIdTokens.length > 20) earlierIdTokens.shift();
  }
});

// ---------------------------------------------------------------------------------------------
// Interaction pages: login (password + optional one-time code) and consent

function loginPage(uid, params, error, username) {
  return page('Sign in', `${errorBlock(error)}
<p>Client: <strong>${htmlEscape(params.client_id)}</strong></p>
<form id="login" method="post" action="/interaction/${htmlEscape(uid)}/login" autocomplete="off">
<label>Username <input type="text" name="username" value="${htmlEscape(username || '')}"></label>
<label>Password <input type="password" name="password"></label>
<label>One-time code (if enrolled) <input type="text" name="otp" inputmode="numeric"></label>
<button type="submit">Sign in</button>
</form>
<form id="abort" method="post" action="/interaction/${htmlEscape(uid)}/abort"><button type="submit">Cancel</button></form>`, 'login-page');
}

function consentPage(uid, params, details) {
  const scopes = [...(details.missingOIDCScope || [])].join(' ');
  return page('Authorize', `<p><strong>${htmlEscape(params.client_id)}</strong> asks for: <code id="scopes">${htmlEscape(scopes)}</code></p>
<form id="consent" method="post" action="/interaction/${htmlEscape(uid)}/confirm"><button type="submit">Allow</button></form>
<form id="abort" method="post" action="/interaction/${htmlEscape(uid)}/abort"><button type="submit">Deny</button></form>`, 'consent-page');
}

function sendHtml(res, status, html) {
  res.statusCode = status;
  res.setHeader('content-type', 'text/html; charset=utf-8');
  res.setHeader('cache-control', 'no-store');
  res.end(html);
}

async function handleInteraction(req, res, parts) {
  const [uid, action] = parts;
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    sendHtml(res, 400, page('Error', errorBlock('interaction mismatch'), 'op-error'));
    return;
  }
  const { prompt, params } = details;
  if (req.method === 'GET' && !action) {
    if (prompt.name === 'login') sendHtml(res, 200, loginPage(uid, params));
    else sendHtml(res, 200, consentPage(uid, params, prompt.details));
    return;
  }
  if (req.method !== 'POST') {
    sendHtml(res, 405, page('Error', errorBlock('method not allowed'), 'op-error'));
    return;
  }
  const form = new URLSearchParams(await readBody(req));
  if (action === 'login') {
    if (prompt.name !== 'login') {
      sendHtml(res, 400, page('Error', errorBlock('not a login step'), 'op-error'));
      return;
    }
    const login = form.get('username') || '';
    const u = userByLogin(login);
    const otp = (form.get('otp') || '').trim();
    if (!u || !safeEqual(u.password, form.get('password') || '')) {
      log('login.failed', { username: login, reason: 'bad credentials' });
      sendHtml(res, 401, loginPage(uid, params, 'Invalid username or password.', login));
      return;
    }
    if (!u.active) {
      log('login.failed', { username: login, sub: u.sub, reason: 'disabled' });
      sendHtml(res, 403, loginPage(uid, params, 'This account is disabled.', login));
      return;
    }
    const amr = ['pwd'];
    if (otp) {
      if (!u.mfa) {
        log('login.failed', { username: login, sub: u.sub, reason: 'no second factor enrolled' });
        sendHtml(res, 401, loginPage(uid, params, 'No one-time code is enrolled for this account.', login));
        return;
      }
      if (!safeEqual(otp, cfg['mfa-code'])) {
        log('login.failed', { username: login, sub: u.sub, reason: 'bad one-time code' });
        sendHtml(res, 401, loginPage(uid, params, 'Invalid one-time code.', login));
        return;
      }
      amr.push('otp', 'mfa');
    }
    log('login.success', { sub: u.sub, amr });
    await provider.interactionFinished(req, res, {
      login: { accountId: u.sub, amr, acr: amr.includes('mfa') ? 'urn:ward:acr:mfa' : 'urn:ward:acr:pwd', remember: true },
    }, { mergeWithLastSubmission: false });
    return;
  }
  if (action === 'confirm') {
    if (prompt.name !== 'consent') {
      sendHtml(res, 400, page('Error', errorBlock('not a consent step'), 'op-error'));
      return;
    }
    const accountId = details.session.accountId;
    let { grantId } = details;
    const grant = grantId ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    if (d.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    grantId = await grant.save();
    const consent = {};
    if (!details.grantId) consent.grantId = grantId;
    log('consent.granted', { sub: accountId, client: params.client_id, scope: d.missingOIDCScope });
    await provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
    return;
  }
  if (action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
    return;
  }
  sendHtml(res, 404, page('Error', errorBlock('no such step'), 'op-error'));
}

const providerCallback = provider.callback();

async function onRequest(req, res) {
  const path = req.url.split('?')[0];
  const m = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?$/.exec(path);
  if (!m) {
    providerCallback(req, res);
    return;
  }
  try {
    await handleInteraction(req, res, [m[1], m[2]]);
  } catch (err) {
    const status = err instanceof oidcErrors.SessionNotFound ? 400 : 500;
    log('interaction.error', { path, error: err.message });
    if (!res.headersSent) sendHtml(res, status, page('Error', errorBlock(err.message), 'op-error'));
  }
}

// ---------------------------------------------------------------------------------------------
// Admin API (tests only): bearer token, JSON in and out, every action logged.

function sendJson(res, status, obj) {
  res.statusCode = status;
  res.setHeader('content-type', 'application/json');
  res.end(`${JSON.stringify(obj)}\n`);
}

function publicUser(u) {
  const { password, ...rest } = u;
  return rest;
}

async function backchannelLogout(u, { revokeGrants }) {
  const client = await provider.Client.find(cfg['client-id']);
  if (!client.backchannelLogoutUri) throw Object.assign(new Error('the client has no backchannel_logout_uri'), { status: 409 });
  const sessions = sessionsOf(u.sub).filter((s) => s.payload.authorizations?.[client.clientId]);
  const sent = [];
  for (const s of sessions) {
    const auth = s.payload.authorizations[client.clientId];
    try {
      // oidc-provider's own logout token: iss, aud, iat, exp, jti, sub, sid, events.
      await client.backchannelLogout(u.sub, auth.sid);
      sent.push({ sid: auth.sid, delivered: true });
    } catch (err) {
      sent.push({ sid: auth.sid, delivered: false, error: err.message });
    }
    if (revokeGrants && auth.grantId) {
      await new MapAdapter('Grant').destroy(auth.grantId);
      await new MapAdapter('x').revokeByGrantId(auth.grantId);
    }
    await new MapAdapter('Session').destroy(s.id);
  }
  return { sessions: sent };
}

async function scimPush(u, active) {
  if (!cfg['scim-url']) throw Object.assign(new Error('no --scim-url configured'), { status: 409 });
  const url = `${cfg['scim-url'].replace(/\/$/, '')}/Users/${encodeURIComponent(u.sub)}`;
  const body = JSON.stringify({
    schemas: ['urn:ietf:params:scim:api:messages:2.0:PatchOp'],
    Operations: [{ op: 'replace', value: { active } }],
  });
  const headers = { 'content-type': 'application/scim+json', accept: 'application/scim+json' };
  if (cfg['scim-token']) headers.authorization = `Bearer ${cfg['scim-token']}`;
  const r = await rpRequest(url, { method: 'PATCH', headers, body });
  return { url, status: r.status, response: r.body.slice(0, 2000) };
}

async function adminHandle(req, res) {
  const auth = req.headers.authorization || '';
  if (!auth.startsWith('Bearer ') || !safeEqual(auth.slice(7), cfg['admin-token'])) {
    log('admin.denied', { method: req.method, path: req.url });
    sendJson(res, 401, { error: 'unauthorized' });
    return;
  }
  const path = req.url.split('?')[0];
  const raw = req.method === 'GET' ? '' : await readBody(req);
  let body = {};
  if (raw.trim()) {
    try { body = JSON.parse(raw); } catch { sendJson(res, 400, { error: 'body is not JSON' }); return; }
  }
  const seg = path.split('/').filter(Boolean).map(decodeURIComponent);
  if (seg[0] !== 'admin') { sendJson(res, 404, { error: 'not found' }); return; }
  const rest = seg.slice(1);
  const userArg = () => {
    const u = users.get(rest[1]);
    if (!u) throw Object.assign(new Error(`no user with sub ${rest[1]}`), { status: 404 });
    return u;
  };
  const R = (m, ...p) => req.method === m && rest.length === p.length && p.every((x, i) => x === '*' || x === rest[i]);

  if (R('GET', 'health')) { sendJson(res, 200, { ok: true, issuer: provider.issuer }); return; }
  if (R('GET', 'users')) { sendJson(res, 200, { users: [...users.values()].map(publicUser) }); return; }
  if (R('GET', 'users', '*')) { sendJson(res, 200, publicUser(userArg())); return; }
  if (R('POST', 'users', '*', 'disable') || R('POST', 'users', '*', 'enable')) {
    const u = userArg();
    u.active = rest[2] === 'enable';
    log(`admin.user.${rest[2]}`, { sub: u.sub });
    sendJson(res, 200, publicUser(u));
    return;
  }
  if (R('PUT', 'users', '*', 'groups')) {
    const u = userArg();
    if (!Array.isArray(body.groups) || !body.groups.every((g) => typeof g === 'string')) {
      sendJson(res, 400, { error: 'body must be {"groups": ["..."]}' });
      return;
    }
    u.groups = [...body.groups];
    log('admin.user.groups', { sub: u.sub, groups: u.groups });
    sendJson(res, 200, publicUser(u));
    return;
  }
  if (R('GET', 'users', '*', 'sessions')) {
    const u = userArg();
    sendJson(res, 200, { sessions: sessionsOf(u.sub).map((s) => ({ authorizations: s.payload.authorizations, amr: s.payload.amr, login_ts: s.payload.loginTs })) });
    return;
  }
  if (R('POST', 'users', '*', 'backchannel-logout')) {
    const u = userArg();
    const out = await backchannelLogout(u, { revokeGrants: body.revoke_grants === true });
    log('admin.backchannel_logout', { sub: u.sub, revoke_grants: body.revoke_grants === true, sessions: out.sessions });
    sendJson(res, out.sessions.length && out.sessions.every((s) => s.delivered) ? 200 : 502, out);
    return;
  }
  if (R('POST', 'users', '*', 'scim')) {
    const u = userArg();
    if (typeof body.active !== 'boolean') { sendJson(res, 400, { error: 'body must be {"active": true|false}' }); return; }
    const out = await scimPush(u, body.active);
    log('admin.scim_patch', { sub: u.sub, active: body.active, url: out.url, status: out.status });
    sendJson(res, out.status >= 200 && out.status < 300 ? 200 : 502, out);
    return;
  }
  if (R('POST', 'tamper')) {
    if (body.mode === null || body.mode === 'off') {
      tamper = null;
      log('admin.tamper', { mode: 'off' });
      sendJson(res, 200, { tamper: null });
      return;
    }
    if (!TAMPER_MODES.includes(body.mode)) { sendJson(res, 400, { error: `mode must be one of ${TAMPER_MODES.join(', ')} or off` }); return; }
    tamper = { mode: body.mode, grantType: body.grant_type };
    log('admin.tamper', { mode: body.mode, grant_type: body.grant_type });
    sendJson(res, 200, { tamper });
    return;
  }
  if (R('GET', 'tamper')) { sendJson(res, 200, { tamper }); return; }
  sendJson(res, 404, { error: 'not found' });
}

// ---------------------------------------------------------------------------------------------
// Start

const tls = { key: fs.readFileSync(cfg['tls-key']), cert: fs.readFileSync(cfg['tls-cert']) };
const server = https.createServer(tls, (req, res) => {
  onRequest(req, res).catch((err) => {
    log('request.error', { error: err.message });
    if (!res.headersSent) { res.statusCode = 500; res.end(); }
  });
});
const admin = http.createServer((req, res) => {
  adminHandle(req, res).catch((err) => {
    log('admin.error', { path: req.url, error: err.message });
    if (!res.headersSent) sendJson(res, err.status || 500, { error: err.message });
  });
});

server.listen(listen.port, listen.host, () => {
  admin.listen(adminListen.port, adminListen.host, () => {
    log('ready', {
      issuer: provider.issuer,
      listen: `${listen.host}:${listen.port}`,
      admin: `${adminListen.host}:${adminListen.port}`,
      client_id: cfg['client-id'],
      signing_kid: signingJwk.kid,
      keys: jwks.keys.map((k) => k.kid),
      users: users.size,
    });
  });
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => { server.close(); admin.close(); process.exit(0); });
}
