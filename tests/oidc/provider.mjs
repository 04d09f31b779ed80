// Loopback OpenID Connect provider for the portal SSO tests (panva/oidc-provider).
//
// Usage:
//   node provider.mjs [--config FILE] [--port N] [--host 127.0.0.1] [--id-token-ttl SECONDS]
//
// Configuration (later sources win): built-in demo defaults < $OIDC_PROVIDER_CONFIG (inline JSON)
// < --config FILE (JSON) < individual flags.  JSON shape:
//   {
//     "host": "127.0.0.1", "port": 0,                 // port 0 = pick a free port
//     "id_token_ttl_s": 300,
//     "clients": [{"client_id": "...", "client_secret": "...", "redirect_uris": ["http://127.0.0.1:8080/cb"],
//                  "post_logout_redirect_uris": ["http://127.0.0.1:8080/"],
//                  "token_endpoint_auth_method": "client_secret_basic"}],   // any oidc-provider client metadata
//     "users": [{"sub": "u1", "email": "a@example.test", "name": "A", "password": "pw", "email_verified": true}],
//     "cookie_keys": ["..."],                          // also $OIDC_COOKIE_KEYS (comma separated)
//     "jwks": {"keys": [...]}                          // optional private signing JWKS; generated RSA key otherwise
//   }
//
// Issuer: http://HOST:PORT (no path).  On success prints exactly one line "ready <issuer>" on stdout; all
// other logging goes to stderr.  Storage is oidc-provider's in-memory adapter (state dies with the process).
//
// Interactions (replacing oidc-provider's devInteractions): plain HTML forms, no JavaScript needed.
//   GET  /interaction/:uid          login form (fields "login" = e-mail or sub, "password") or consent form
//   POST /interaction/:uid/login    checks the password; on success also grants the requested scopes
//                                   (so a normal first login needs a single form submission)
//   POST /interaction/:uid/confirm  consent (only shown when oidc-provider asks for it again, e.g. prompt=consent)
//   POST /interaction/:uid/abort    ends the flow with error=access_denied at the client's redirect_uri
// A wrong password re-renders the login form with HTTP 401 and a "login-error" element.

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { Provider, errors } from 'oidc-provider';

const DEFAULT_COOKIE_KEYS = ['lwapi-test-oidc-cookie-key-1', 'lwapi-test-oidc-cookie-key-2'];

const DEFAULTS = {
  host: '127.0.0.1',
  port: 0,
  id_token_ttl_s: 300,
  clients: [{
    client_id: 'lwapi-portal',
    client_secret: 'lwapi-portal-secret',
    redirect_uris: ['http://127.0.0.1:8080/auth/oidc/callback'],
    post_logout_redirect_uris: ['http://127.0.0.1:8080/'],
  }],
  users: [{
    sub: 'user-alice', email: 'alice@example.test', name: 'Alice Example', password: 'alice-password',
  }],
};

function log(...args) {
  process.stderr.write(`[oidc ${new Date().toISOString()}] ${args.join(' ')}\n`);
}

function loadConfig() {
  const { values } = parseArgs({
    options: {
      config: { type: 'string' },
      port: { type: 'string' },
      host: { type: 'string' },
      'id-token-ttl': { type: 'string' },
    },
  });
  let cfg = { ...DEFAULTS };
  if (process.env.OIDC_PROVIDER_CONFIG) {
    cfg = { ...cfg, ...JSON.parse(process.env.OIDC_PROVIDER_CONFIG) };
  }
  if (values.config) {
    cfg = { ...cfg, ...JSON.parse(readFileSync(values.config, 'utf8')) };
  }
  if (values.port !== undefined) cfg.port = Number(values.port);
  if (values.host !== undefined) cfg.host = values.host;
  if (values['id-token-ttl'] !== undefined) cfg.id_token_ttl_s = Number(values['id-token-ttl']);
  if (!cfg.cookie_keys) {
    cfg.cookie_keys = process.env.OIDC_COOKIE_KEYS ? process.env.OIDC_COOKIE_KEYS.split(',') : DEFAULT_COOKIE_KEYS;
  }
  if (!Number.isInteger(cfg.id_token_ttl_s) || cfg.id_token_ttl_s < 1) {
    throw new Error(`id_token_ttl_s must be a positive integer, got ${cfg.id_token_ttl_s}`);
  }
  for (const user of cfg.users) {
    for (const key of ['sub', 'email', 'password']) {
      if (typeof user[key] !== 'string' || !user[key]) throw new Error(`user ${JSON.stringify(user)} lacks "${key}"`);
    }
  }
  return cfg;
}

function signingJwks() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { keys: [{ ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), use: 'sig', alg: 'RS256' }] };
}

function esc(value) {
  return String(value ?? '')
    .replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;')
    .replaceAll('"', '&quot;').replaceAll("'", '&#39;');
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>${esc(title)}</title>
  <style>body{font-family:sans-serif;max-width:24rem;margin:3rem auto}label,input,button{display:block;margin:.4rem 0}
  input{width:100%;padding:.3rem}.error{color:#b00020}</style>
</head>
<body>
  <h1>${esc(title)}</h1>
  ${body}
</body>
</html>`;
}

function loginPage(uid, clientId, { login = '', error = '' } = {}) {
  const errorHtml = error ? `<p class="error" id="login-error" role="alert">${esc(error)}</p>` : '';
  return page('Sign in', `
  <p>Test identity provider, signing in to <code id="client-id">${esc(clientId)}</code>.</p>
  ${errorHtml}
  <form id="login-form" method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
    <label for="login">E-mail</label>
    <input id="login" name="login" type="text" value="${esc(login)}" required autofocus>
    <label for="password">Password</label>
    <input id="password" name="password" type="password" required>
    <button id="login-submit" type="submit">Sign in</button>
  </form>
  <form id="abort-form" method="post" action="/interaction/${esc(uid)}/abort">
    <button id="abort-submit" type="submit">Cancel</button>
  </form>`);
}

function consentPage(uid, clientId, scopes) {
  return page('Authorize', `
  <p><code id="client-id">${esc(clientId)}</code> asks for: <code id="scopes">${esc(scopes.join(' '))}</code></p>
  <form id="consent-form" method="post" action="/interaction/${esc(uid)}/confirm">
    <button id="consent-submit" type="submit">Allow</button>
  </form>
  <form id="abort-form" method="post" action="/interaction/${esc(uid)}/abort">
    <button id="abort-submit" type="submit">Deny</button>
  </form>`);
}

async function readForm(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function main() {
  const cfg = loadConfig();
  const users = cfg.users.map((u) => ({ email_verified: true, name: u.email, ...u }));
  const bySub = new Map(users.map((u) => [u.sub, u]));
  const byLogin = new Map();
  for (const u of users) {
    byLogin.set(u.email.toLowerCase(), u);
    byLogin.set(u.sub, u);
  }

  const configuration = {
    clients: cfg.clients,
    jwks: cfg.jwks ?? signingJwks(),
    cookies: {
      keys: cfg.cookie_keys,
      // Cookies are per host, not per port: keep names distinct from the portal's cookies on 127.0.0.1.
      names: { session: 'test_op_session', interaction: 'test_op_interaction', resume: 'test_op_resume' },
    },
    scopes: ['openid', 'email', 'profile'],
    responseTypes: ['code'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
    // Put the scope claims (email, name) into the ID token of the code flow too, not only into /userinfo.
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    ttl: {
      AccessToken: 600,
      AuthorizationCode: 60,
      IdToken: cfg.id_token_ttl_s,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    features: {
      devInteractions: { enabled: false },
      rpInitiatedLogout: {
        enabled: true,
        logoutSource(ctx, form) {
          // oidc-provider hands over <form id="op.logoutForm" ...><input name="xsrf"></form>; put the
          // confirmation inside it so that both a browser and a plain form parser can submit it.
          const inner = '<input type="hidden" name="logout" value="yes"/>'
            + '<button id="logout-submit" type="submit">Sign out</button></form>';
          ctx.body = page('Sign out', `<p>Sign out from the test identity provider?</p>${form.replace('</form>', inner)}`);
        },
        postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out', '<p id="logout-done">You are signed out of the test identity provider.</p>');
        },
      },
    },
    clientBasedCORS: () => false,
    renderError(ctx, out) {
      ctx.type = 'html';
      const rows = Object.entries(out).map(([k, v]) => `<p><strong>${esc(k)}</strong>: <span class="${esc(k)}">${esc(v)}</span></p>`);
      ctx.body = page('OIDC error', rows.join(''));
    },
    async findAccount(_ctx, sub) {
      const user = bySub.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        async claims() {
          return { sub, email: user.email, email_verified: Boolean(user.email_verified), name: user.name };
        },
      };
    },
  };

  return { cfg, configuration, byLogin };
}

async function grantRequested(provider, details, accountId) {
  const { prompt: { name, details: promptDetails }, params, grantId } = details;
  const grant = grantId ? await provider.Grant.find(grantId) : new provider.Grant({ accountId, clientId: params.client_id });
  if (name === 'consent') {
    if (promptDetails.missingOIDCScope) grant.addOIDCScope(promptDetails.missingOIDCScope.join(' '));
    if (promptDetails.missingOIDCClaims) grant.addOIDCClaims(promptDetails.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(promptDetails.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  } else if (params.scope) {
    grant.addOIDCScope(params.scope);
  }
  return grant.save();
}

function interactionMiddleware(provider, byLogin) {
  const route = /^\/interaction\/([\w-]+)(?:\/(login|confirm|abort))?\/?$/;
  return async function interactions(ctx, next) {
    const match = route.exec(ctx.path);
    if (!match) return next();
    const [, uid, action] = match;
    ctx.set('cache-control', 'no-store');
    try {
      const details = await provider.interactionDetails(ctx.req, ctx.res);
      if (details.uid !== uid) throw new errors.SessionNotFound('interaction uid does not match the cookie');
      const clientId = details.params.client_id;
      const finish = async (result) => {
        const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
        ctx.status = 303;
        ctx.redirect(returnTo);
      };

      if (!action && ctx.method === 'GET') {
        ctx.type = 'html';
        if (details.prompt.name === 'login') {
          ctx.body = loginPage(uid, clientId, { login: details.params.login_hint ?? '' });
        } else {
          ctx.body = consentPage(uid, clientId, String(details.params.scope ?? '').split(' ').filter(Boolean));
        }
        return undefined;
      }
      if (ctx.method !== 'POST' || !action) {
        ctx.status = 405;
        return undefined;
      }
      const form = await readForm(ctx.req);
      if (action === 'abort') {
        await finish({ error: 'access_denied', error_description: 'End-User aborted interaction' });
      } else if (action === 'login') {
        const login = (form.get('login') ?? '').trim();
        const user = byLogin.get(login.toLowerCase()) ?? byLogin.get(login);
        if (!user || user.password !== form.get('password')) {
          log(`login failed for ${JSON.stringify(login)}`);
          ctx.status = 401;
          ctx.type = 'html';
          ctx.body = loginPage(uid, clientId, { login, error: 'Invalid e-mail or password.' });
          return undefined;
        }
        const grantId = await grantRequested(provider, details, user.sub);
        await finish({ login: { accountId: user.sub }, consent: { grantId } });
      } else {
        if (details.prompt.name !== 'consent' || !details.session?.accountId) {
          throw new errors.InvalidRequest('no consent pending for this interaction');
        }
        const grantId = await grantRequested(provider, details, details.session.accountId);
        await finish({ consent: { grantId } });
      }
    } catch (err) {
      log(`interaction error: ${err.stack ?? err}`);
      ctx.status = err.statusCode ?? err.status ?? 500;
      ctx.type = 'html';
      ctx.body = page('OIDC error', `<p class="error" id="interaction-error">${esc(err.error ?? err.name)}: ${esc(err.error_description ?? err.message)}</p>`);
    }
    return undefined;
  };
}

async function start() {
  const { cfg, configuration, byLogin } = main();
  const { createServer } = await import('node:http');
  let handler = (_req, res) => { res.statusCode = 503; res.end(); };
  const server = createServer((req, res) => handler(req, res));
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(cfg.port, cfg.host, resolve);
  });
  const { port } = server.address();
  const host = cfg.host.includes(':') ? `[${cfg.host}]` : cfg.host;
  const issuer = `http://${host}:${port}`;

  const provider = new Provider(issuer, configuration);
  for (const event of ['server_error', 'authorization.error', 'grant.error', 'end_session.error', 'userinfo.error',
    'discovery.error', 'jwks.error', 'check_session.error', 'backchannel.error']) {
    provider.on(event, (_ctx, err) => log(`${event}: ${err?.error ?? ''} ${err?.error_description ?? err?.message ?? err}`));
  }
  provider.use(async (ctx, next) => {
    const started = Date.now();
    await next();
    log(`${ctx.method} ${ctx.path} -> ${ctx.status} (${Date.now() - started} ms)`);
  });
  provider.use(interactionMiddleware(provider, byLogin));
  handler = provider.callback();

  const shutdown = (signal) => {
    log(`${signal} received, shutting down`);
    // All state is in memory: nothing to flush, so do not wait for keep-alive connections to drain.
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  log(`issuer ${issuer}; clients: ${cfg.clients.map((c) => c.client_id).join(', ')}; users: ${cfg.users.length}; `
    + `id_token ttl ${cfg.id_token_ttl_s}s; node ${process.version}`);
  process.stdout.write(`ready ${issuer}\n`);
}

start().catch((err) => {
  log(`failed to start: ${err.stack ?? err}`);
  process.exit(1);
});
