/**
 * src/daemon/tls.ts and tls-allow.ts: the psktool keys file, the allow-list
 * format and its matching, the start-up checks of the tls-* settings (one
 * clear error per mistake, exit-2 code), and X.509 sessions through the
 * real NbdServer: who the client is (CN and RFC 4514 DN), and which clients
 * are refused (unknown CA, no certificate, revoked by ca-crl.pem).
 * Certificates come from certtool (gnutls-bin), made in a temp directory.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import type tls from 'node:tls';
import { loadTls, parsePskFile, rfc4514, type TlsSettings } from '../../../src/daemon/tls.js';
import { globToRegExp, parseAllowList } from '../../../src/daemon/tls-allow.js';
import type { TlsPeer } from '../../../src/nbd/server.js';
import type { HandshakeFailure } from '../../../src/nbd/connection.js';
import { createLogger, silentLogger } from '../../../src/common/log.js';
import { startTestServer } from '../../helpers/nbd-server.js';
import { RawClient } from '../../helpers/nbd-raw-client.js';
import { makePki, makePskFile, startTls, type Pki } from '../../helpers/nbd-tls.js';
import { OPT, REP, infoRequestData } from '../../helpers/nbd-encoder.js';
import { tempDir } from '../../helpers/run.js';

const off: TlsSettings = { mode: 'off', certificatesDir: null, verifyPeer: true, pskFile: null, allowFile: null };

t.test('psktool keys file', async (t) => {
  const keys = parsePskFile('alice:00ff10\r\n\nbob:ABCDEF0123\n', 'k.psk');
  t.same([...keys.keys()], ['alice', 'bob']);
  t.same(keys.get('alice'), Buffer.from([0, 255, 16]));
  t.same(keys.get('bob'), Buffer.from('abcdef0123', 'hex'));
  t.throws(() => parsePskFile('a:b:cc\n', 'k'), { message: /key of "a" is not/ }, 'the identity ends at the first colon');
  for (const [text, why] of [
    ['alice\n', /k.psk:1: expected IDENTITY:HEXKEY/],
    [':00\n', /k.psk:1: expected IDENTITY:HEXKEY/],
    ['alice:0g\n', /k.psk:1: key of "alice" is not an even number of hex digits/],
    ['alice:abc\n', /not an even number/],
    ['alice:00\nalice:11\n', /k.psk:2: identity "alice" appears twice/],
    ['\n\n', /no keys \(create them with: psktool -u IDENTITY -p k.psk\)/],
    [`${'x'.repeat(129)}:00\n`, /longer than 128 bytes/],
  ] as Array<[string, RegExp]>) {
    t.throws(() => parsePskFile(text, 'k.psk'), { message: why, code: 'ARCH_E_CONFIG' }, JSON.stringify(text));
  }
});

t.test('allow-list: format, versions and errors', async (t) => {
  const list = parseAllowList([
    '# who may open what',
    '',
    'version 1',
    'psk:alice   vm-alice-*  scratch',
    'cn:host1\tvm-host1-?',
    '"dn:CN=host2,O=Example Corp,C=GB"   vm-host2-*',
    '*  public-*',
    'anonymous  iso.img',
    'psk:alice  more-*',
  ].join('\n'), 'allow');
  t.equal(list.rules.length, 6);
  t.same(list.rules[2]!.identity, 'dn:CN=host2,O=Example Corp,C=GB', 'a quoted identity is a JSON string');
  t.same(list.rules.map((r) => r.line), [4, 5, 6, 7, 8, 9]);
  const alice: TlsPeer = { method: 'psk', name: 'alice' };
  const host1: TlsPeer = { method: 'x509', name: 'host1', dn: 'CN=host1,O=Example Corp,C=GB' };
  const host2: TlsPeer = { method: 'x509', name: 'host2', dn: 'CN=host2,O=Example Corp,C=GB' };
  const noCert: TlsPeer = { method: 'none', name: '' };
  const cases: Array<[TlsPeer | null, string, boolean]> = [
    [alice, 'vm-alice-1', true], [alice, 'scratch', true], [alice, 'more-x', true], [alice, 'scratch2', false],
    [alice, 'vm-host1-a', false], [alice, 'public-1', true], [alice, 'iso.img', false],
    [{ method: 'psk', name: 'host1' }, 'vm-host1-a', false],
    [host1, 'vm-host1-a', true], [host1, 'vm-host1-ab', false], [host1, 'vm-host2-a', false], [host1, 'public-', true],
    [host2, 'vm-host2-x', true], [{ ...host2, dn: 'CN=host2,O=Other,C=GB' }, 'vm-host2-x', false],
    [null, 'iso.img', true], [null, 'isoximg', false], [null, 'public-1', false], [noCert, 'iso.img', true], [noCert, 'public-1', false],
  ];
  for (const [peer, name, want] of cases) t.equal(list.allows(peer, name), want, `${JSON.stringify(peer)} ${name}: ${want}`);

  for (const [text, why] of [
    ['psk:a x\n', /allow:1: expected "version 1" before the first rule/],
    ['version 2\n', /allow:1: allow-list version 2 is not supported \(this archipelago reads version 1\)/],
    ['# only comments\n', /allow: empty allow-list: the first line must be "version 1"/],
    ['version 1\nuser:a x\n', /allow:2: identity "user:a": expected psk:NAME, cn:NAME, dn:DN, \* or anonymous/],
    ['version 1\npsk:a\n', /allow:2: identity "psk:a" names no export/],
    ['version 1\n"dn:CN=a x\n', /allow:2: unterminated quoted identity/],
    ['version 1\npsk:a "vm-*"\n', /allow:2: export glob "\\"vm-\*\\"": quotes are not allowed/],
  ] as Array<[string, RegExp]>) {
    t.throws(() => parseAllowList(text, 'allow'), { message: why, code: 'ARCH_E_CONFIG' }, JSON.stringify(text));
  }
});

t.test('globs match whole names; only * and ? are special', async (t) => {
  t.ok(globToRegExp('vm-*').test('vm-'));
  t.ok(globToRegExp('*').test('anything.at-all'));
  t.notOk(globToRegExp('vm-*').test('xvm-1'), 'anchored at the start');
  t.notOk(globToRegExp('vm').test('vm1'), 'anchored at the end');
  t.ok(globToRegExp('a.b').test('a.b'));
  t.notOk(globToRegExp('a.b').test('axb'), '. is a dot');
  t.ok(globToRegExp('a+(b)[c]{d}|^$\\').test('a+(b)[c]{d}|^$\\'), 'regexp metacharacters are literal');
  t.ok(globToRegExp('v?').test('v1'));
  t.notOk(globToRegExp('v?').test('v12'));
});

t.test('RFC 4514 order of a subject', async (t) => {
  t.equal(rfc4514('C=GB\nO=Archipelago Test\nCN=client-a'), 'CN=client-a,O=Archipelago Test,C=GB');
  t.equal(rfc4514('CN=x'), 'CN=x');
});

t.test('start-up checks of the tls settings', async (t) => {
  const dir = await tempDir(t, 'archipelago-tls-');
  const pki = await makePki(path.join(dir, 'pki'), ['client-a']);
  const psk = await makePskFile(path.join(dir, 'psk'), ['alice']);
  const allow = path.join(dir, 'allow');
  await fs.writeFile(allow, 'version 1\npsk:alice v1\n');
  const log = silentLogger;
  const load = (s: Partial<TlsSettings>) => loadTls({ ...off, ...s }, log);

  t.equal(await load({}), null, 'off: nothing loaded');
  t.equal(await load({ pskFile: '/nonexistent' }), null, 'off: credentials ignored');
  await t.rejects(load({ allowFile: allow }), { message: /tls-allow .* is set but tls = off/, code: 'ARCH_E_CONFIG' });
  await t.rejects(load({ mode: 'on' }), { message: 'tls = on needs credentials: set tls-certificates or tls-psk-file' });
  await t.rejects(load({ mode: 'require', certificatesDir: pki.server, pskFile: psk.file }), { message: /both set: choose one/ });
  await t.rejects(load({ mode: 'require', certificatesDir: path.join(dir, 'nope') }), { message: `tls-certificates ${path.join(dir, 'nope')}: no such file` });
  await t.rejects(load({ mode: 'require', certificatesDir: psk.file }), { message: /: not a directory$/ });
  await t.rejects(load({ mode: 'require', pskFile: path.join(dir, 'nope.psk') }), { message: `tls-psk-file: ${path.join(dir, 'nope.psk')}: no such file` });
  await t.rejects(load({ mode: 'require', pskFile: dir }), { message: /tls-psk-file: .*: is a directory/ });
  await t.rejects(load({ mode: 'require', pskFile: psk.file, allowFile: path.join(dir, 'nope') }), { message: /tls-allow .*nope: no such file/ });

  // An X.509 directory missing a file, or with a key of another certificate.
  const broken = path.join(dir, 'broken');
  await fs.mkdir(broken);
  await fs.copyFile(path.join(pki.server, 'server-cert.pem'), path.join(broken, 'server-cert.pem'));
  await t.rejects(load({ mode: 'on', certificatesDir: broken }), { message: `tls-certificates ${broken}: ${broken}/server-key.pem: no such file`, code: 'ARCH_E_CONFIG' });
  await fs.copyFile(path.join(pki.clients['client-a']!, 'client-key.pem'), path.join(broken, 'server-key.pem'));
  await t.rejects(load({ mode: 'on', certificatesDir: broken, verifyPeer: false }), { message: /tls-certificates .*: key values mismatch/ });
  await fs.copyFile(path.join(pki.server, 'server-key.pem'), path.join(broken, 'server-key.pem'));
  await t.rejects(load({ mode: 'on', certificatesDir: broken }), { message: /ca-cert.pem: no such file/, }, 'verify-peer needs ca-cert.pem');
  t.ok(await load({ mode: 'on', certificatesDir: broken, verifyPeer: false }), 'without verify-peer ca-cert.pem may be absent');

  const lines: string[] = [];
  const caught = createLogger({ level: 'warn', write: (l) => lines.push(l) });
  await fs.chmod(psk.file, 0o644);
  const loaded = await loadTls({ ...off, mode: 'require', pskFile: psk.file, allowFile: allow }, caught);
  t.equal(loaded!.nbd.mode, 'required');
  t.equal(loaded!.summary, `require, PSK from ${psk.file} (1 identity), allow-list ${allow} (1 rules)`);
  t.match(lines.join(''), /keys.psk is readable by every user/, 'a world-readable key file is warned about');
  t.equal(loaded!.nbd.authorize!({ method: 'psk', name: 'alice' }, 'v1'), true);
  t.equal(loaded!.nbd.authorize!(null, 'v1'), false);
});

/** An NbdServer with X.509 TLS from `certificatesDir`; records who asked for what. */
async function x509Server(t: { teardown(fn: () => unknown): void }, pki: Pki, verifyPeer: boolean) {
  const loaded = (await loadTls({ ...off, mode: 'require', certificatesDir: pki.server, verifyPeer }, silentLogger))!;
  const seen: Array<TlsPeer | null> = [];
  const failures: HandshakeFailure[] = [];
  const s = await startTestServer(t, (p) => p.addMemory('disk', 1024 * 1024), {
    tls: { ...loaded.nbd, authorize: (peer) => { seen.push(peer); return true; } },
    hooks: { handshakeFailed: (r) => failures.push(r) },
  });
  return { ...s, seen, failures };
}

async function clientOptions(dir: string): Promise<tls.ConnectionOptions> {
  const read = async (f: string) => fs.readFile(path.join(dir, f)).catch(() => undefined);
  const [ca, cert, key] = await Promise.all([read('ca-cert.pem'), read('client-cert.pem'), read('client-key.pem')]);
  return { ca, cert, key, servername: 'localhost' };
}

async function tlsGo(t: { teardown(fn: () => unknown): void }, port: number, options: tls.ConnectionOptions): Promise<number> {
  const c = await RawClient.connect(port);
  t.teardown(() => c.destroy());
  await c.start();
  const s = await startTls(c, options);
  t.teardown(() => s.destroy());
  const r = await s.option(OPT.GO, infoRequestData('disk'));
  return r[r.length - 1]!.type;
}

t.test('X.509: client certificates verified, identity = subject; unknown CA, no certificate and revoked refused', async (t) => {
  const dir = await tempDir(t, 'archipelago-tls-');
  const pki = await makePki(path.join(dir, 'pki'), ['client-a', 'client-b']);
  const srv = await x509Server(t, pki, true);
  t.equal(await tlsGo(t, srv.port, await clientOptions(pki.clients['client-a']!)), REP.ACK, 'client-a: GO over TLS');
  t.same(srv.seen, [{ method: 'x509', name: 'client-a', dn: 'CN=client-a,O=Archipelago Test,C=GB', session: srv.seen[0]?.session }]);
  t.match(srv.seen[0]!.session, /^TLSv1\.[23] /, 'protocol and cipher kept for the log');

  for (const [what, dir2] of [['unknown CA', pki.rogue], ['no certificate', pki.anonymous]] as const) {
    // The client may see its handshake succeed (TLS 1.3) and the connection close at its first read.
    await t.rejects(tlsGo(t, srv.port, await clientOptions(dir2)), `${what}: refused`);
  }
  t.same(srv.failures, ['tls', 'tls'], 'both counted as TLS failures');

  // Revocation: ca-crl.pem is read at start-up.
  await pki.revoke('client-b');
  const again = await x509Server(t, pki, true);
  await t.rejects(tlsGo(t, again.port, await clientOptions(pki.clients['client-b']!)), 'revoked client-b: refused');
  t.equal(await tlsGo(t, again.port, await clientOptions(pki.clients['client-a']!)), REP.ACK, 'client-a still works with a CRL');
  t.same(again.failures, ['tls']);
});

t.test('X.509 without verify-peer: no client certificate asked, the client has no identity', async (t) => {
  const dir = await tempDir(t, 'archipelago-tls-');
  const pki = await makePki(path.join(dir, 'pki'), ['client-a']);
  const srv = await x509Server(t, pki, false);
  t.equal(await tlsGo(t, srv.port, await clientOptions(pki.anonymous)), REP.ACK);
  t.equal(srv.seen[0]!.method, 'none');
  t.equal(srv.seen[0]!.name, '');
});
