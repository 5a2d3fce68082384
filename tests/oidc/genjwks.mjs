#!/usr/bin/env node
// Writes a private JWKS file for provider.mjs --jwks (Node's crypto only).
//   node genjwks.mjs OUT.json [--prepend-to OLD.json] [--alg RS256|ES256]
// Key rotation: --prepend-to puts a new key FIRST (it signs) and keeps OLD's keys published.
// Prints the new key's kid. The file is written 0600 (it holds private keys).
import crypto from 'node:crypto';
import fs from 'node:fs';
import { parseArgs } from 'node:util';

function die(msg) {
  process.stderr.write(`genjwks: ${msg}\n`);
  process.exitCode = 2;
}

function generateJwk(alg) {
  const pair = alg === 'ES256'
    ? crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = pair.privateKey.export({ format: 'jwk' });
  const stamp = new Date().toISOString().replace(/[-:.TZ]/g, '').slice(0, 14);
  jwk.kid = `k-${stamp}-${crypto.randomBytes(4).toString('hex')}`;
  jwk.alg = alg;
  jwk.use = 'sig';
  return jwk;
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { 'prepend-to': { type: 'string' }, alg: { type: 'string', default: 'RS256' } },
});
if (positionals.length !== 1) {
  die('usage: genjwks.mjs OUT.json [--prepend-to OLD.json] [--alg RS256|ES256]');
} else if (!['RS256', 'ES256'].includes(values.alg)) {
  die(`unsupported --alg ${values.alg} (RS256 or ES256)`);
} else {
  const keys = [generateJwk(values.alg)];
  if (values['prepend-to']) {
    keys.push(...JSON.parse(fs.readFileSync(values['prepend-to'], 'utf8')).keys);
  }
  fs.writeFileSync(positionals[0], `${JSON.stringify({ keys }, null, 2)}\n`, { mode: 0o600 });
  process.stdout.write(`${keys[0].kid}\n`);
}
