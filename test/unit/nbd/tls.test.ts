/**
 * NBD_OPT_STARTTLS and the TLS modes (doc/proto.md, "TLS support") seen from
 * a raw client: FORCEDTLS (ERR_TLS_REQD before TLS, EXPORT_NAME closes),
 * SELECTIVETLS with an access check (TLS-only exports), the upgrade itself
 * (ACK, then TLS, then negotiation from a clean slate), STARTTLS twice, and
 * failed TLS handshakes. The server side of TLS is the daemon's real
 * upgrader (src/daemon/tls.ts) with pre-shared keys made here; X.509 is
 * covered by test/unit/daemon/tls.test.ts and test/integration/tls.test.ts.
 */
import t from 'tap';
import type { NbdServerOptions, NbdTls, TlsPeer } from '../../../src/nbd/server.js';
import type { HandshakeFailure } from '../../../src/nbd/connection.js';
import { tlsUpgrader } from '../../../src/daemon/tls.js';
import { startTestServer, type TestServer } from '../../helpers/nbd-server.js';
import { RawClient, errorOf } from '../../helpers/nbd-raw-client.js';
import { pskClient, randomPskKeys, startTls } from '../../helpers/nbd-tls.js';
import { CMD, OPT, REP, TF, infoRequestData, metaContextData, parseInfoReply, parseRepServer } from '../../helpers/nbd-encoder.js';

const MiB = 1024 * 1024;
const keys = randomPskKeys(['alice', 'bob']);
const upgrade = tlsUpgrader({ kind: 'psk', file: '(test)', keys });
const alice = pskClient('alice', keys.get('alice')!);
const bob = pskClient('bob', keys.get('bob')!);

/** alice may open disk*, bob shared, plaintext clients public. */
function allowList(peer: TlsPeer | null, name: string): boolean {
  if (peer === null) return name === 'public';
  if (peer.method === 'psk' && peer.name === 'alice') return name.startsWith('disk');
  if (peer.method === 'psk' && peer.name === 'bob') return name === 'shared';
  return false;
}

interface Server extends TestServer { failures: HandshakeFailure[] }

async function server(t: { teardown(fn: () => unknown): void }, tls: NbdTls | undefined, options: Partial<NbdServerOptions> = {}): Promise<Server> {
  const failures: HandshakeFailure[] = [];
  const s = await startTestServer(t, (p) => {
    p.addMemory('disk', 8 * MiB);
    p.addMemory('disk2', 1 * MiB);
    p.addMemory('shared', 1 * MiB);
    p.addMemory('public', 1 * MiB);
  }, { ...(tls ? { tls } : {}), hooks: { handshakeFailed: (r) => failures.push(r) }, ...options });
  return { ...s, failures };
}

async function negotiating(t: { teardown(fn: () => unknown): void }, port: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  t.teardown(() => c.destroy());
  await c.start();
  return c;
}

/** Over TLS as `who`: a raw client ready for options. */
async function overTls(t: { teardown(fn: () => unknown): void }, port: number, who = alice): Promise<RawClient> {
  const c = await negotiating(t, port);
  const s = await startTls(c, who);
  t.teardown(() => s.destroy());
  return s;
}

const types = (r: Array<{ type: number }>) => r.map((x) => x.type);

/** Waits until `cond` holds (the server's side of a close lands a little later). */
async function until(cond: () => boolean, ms = 3000): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  return cond();
}

t.test('TLS required: every option but STARTTLS and ABORT gets ERR_TLS_REQD before TLS', async (t) => {
  const { port, server: srv, failures } = await server(t, { mode: 'required', upgrade });
  const c = await negotiating(t, port);
  for (const [opt, data] of [
    [OPT.LIST, undefined], [OPT.INFO, infoRequestData('disk')], [OPT.GO, infoRequestData('disk')],
    [OPT.STRUCTURED_REPLY, undefined], [OPT.LIST_META_CONTEXT, metaContextData('disk', [])], [99, Buffer.from('x')],
  ] as Array<[number, Buffer | undefined]>) {
    const r = await c.option(opt, data);
    t.same(types(r), [REP.ERR_TLS_REQD], `option ${opt}: ERR_TLS_REQD`);
    t.equal(r[0]!.option, opt);
  }
  t.match((await c.option(OPT.GO, infoRequestData('disk')))[0]!.data.toString(), /STARTTLS/, 'the message says what to do');
  t.same(types(await c.option(OPT.STARTTLS, Buffer.from('x'))), [REP.ERR_INVALID], 'STARTTLS with data: ERR_INVALID');
  const s = await startTls(c, alice);
  t.teardown(() => s.destroy());
  const go = await s.option(OPT.GO, infoRequestData('disk'));
  t.equal(go[go.length - 1]!.type, REP.ACK, 'GO over TLS');
  const data = Buffer.alloc(3 * MiB + 17, 0x5a);
  t.equal(await s.writeData(4096, data), 0, 'a 3 MiB write over TLS');
  t.ok((await s.readData(4096, data.length)).equals(data), 'reads back');
  t.same(await s.readData(0, 4096), Buffer.alloc(4096), 'untouched data is zeros');
  s.request({ type: CMD.DISC });
  await s.expectClosed();
  t.ok(await until(() => srv.connectionCount === 0), 'after DISC over TLS the connection is gone');
  t.same(failures, [], 'no handshake failure');
});

t.test('TLS required: ABORT is answered, EXPORT_NAME before TLS closes the connection', async (t) => {
  const { port, server: srv, failures } = await server(t, { mode: 'required', upgrade });
  const c = await negotiating(t, port);
  t.same(types(await c.option(OPT.ABORT)), [REP.ACK]);
  await c.expectClosed();
  const d = await negotiating(t, port);
  d.sendOption(OPT.EXPORT_NAME, Buffer.from('disk'));
  t.equal((await d.expectClosed()).length, 0, 'closed without a reply');
  t.ok(await until(() => srv.connectionCount === 0), 'connections gone');
  t.same(failures, ['protocol']);
});

t.test('STARTTLS: ACK, then a clean slate; STARTTLS twice gets ERR_INVALID', async (t) => {
  const { port } = await server(t, { mode: 'optional', upgrade });
  const c = await negotiating(t, port);
  // Negotiated before TLS: must not survive it (spec, NBD_OPT_STARTTLS).
  t.same(types(await c.option(OPT.STRUCTURED_REPLY)), [REP.ACK]);
  t.same(types(await c.option(OPT.SET_META_CONTEXT, metaContextData('disk', ['base:allocation']))), [REP.META_CONTEXT, REP.ACK]);
  const s = await startTls(c, alice);
  t.teardown(() => s.destroy());
  t.same(types(await s.option(OPT.STARTTLS)), [REP.ERR_INVALID], 'second STARTTLS');
  t.match((await s.option(OPT.STARTTLS))[0]!.data.toString(), /already/);
  const go = await s.option(OPT.GO, infoRequestData('disk'));
  t.equal(go[go.length - 1]!.type, REP.ACK);
  const info = parseInfoReply(go[0]!.data);
  t.ok('flags' in info && !(info.flags & TF.SEND_DF), 'no DF: structured replies were reset');
  const r = await s.roundTrip({ type: CMD.READ, offset: 0, length: 512 });
  t.equal(r[0]!.kind, 'simple', 'simple replies');
  const bs = await s.roundTrip({ type: CMD.BLOCK_STATUS, offset: 0, length: 4096 });
  t.equal(errorOf(bs), 22, 'BLOCK_STATUS: EINVAL, base:allocation was reset');
});

t.test('STARTTLS then structured replies and meta context over TLS', async (t) => {
  const { port } = await server(t, { mode: 'required', upgrade });
  const s = await overTls(t, port);
  const flags = await (async () => {
    t.same(types(await s.option(OPT.STRUCTURED_REPLY)), [REP.ACK]);
    t.same(types(await s.option(OPT.SET_META_CONTEXT, metaContextData('disk', ['base:allocation']))), [REP.META_CONTEXT, REP.ACK]);
    const go = await s.option(OPT.GO, infoRequestData('disk'));
    const info = parseInfoReply(go[0]!.data);
    return 'flags' in info ? info.flags : 0;
  })();
  t.ok(flags & TF.SEND_DF, 'DF: structured replies negotiated over TLS');
  s.structured = true;
  const bs = await s.roundTrip({ type: CMD.BLOCK_STATUS, offset: 0, length: 4096 });
  t.equal(errorOf(bs), 0, 'BLOCK_STATUS works');
});

t.test('NOTLS: STARTTLS gets ERR_POLICY (ERR_INVALID with data) and plaintext goes on', async (t) => {
  const { port } = await server(t, undefined);
  const c = await negotiating(t, port);
  t.same(types(await c.option(OPT.STARTTLS, Buffer.from('x'))), [REP.ERR_INVALID]);
  t.same(types(await c.option(OPT.STARTTLS)), [REP.ERR_POLICY]);
  const go = await c.option(OPT.GO, infoRequestData('disk'));
  t.equal(go[go.length - 1]!.type, REP.ACK);
});

t.test('optional TLS without an access check: plaintext and TLS clients both work', async (t) => {
  const { port } = await server(t, { mode: 'optional', upgrade });
  const c = await negotiating(t, port);
  t.equal((await c.option(OPT.LIST)).filter((r) => r.type === REP.SERVER).length, 4, 'plaintext LIST shows all');
  const go = await c.option(OPT.GO, infoRequestData('shared'));
  t.equal(go[go.length - 1]!.type, REP.ACK, 'plaintext GO');
  const s = await overTls(t, port, bob);
  const go2 = await s.option(OPT.GO, infoRequestData('disk'));
  t.equal(go2[go2.length - 1]!.type, REP.ACK, 'TLS GO');
});

t.test('access by identity: LIST filtered, INFO/GO refused (TLS_REQD before TLS, POLICY after)', async (t) => {
  const { port } = await server(t, { mode: 'optional', upgrade, authorize: allowList });
  const listed = async (c: RawClient) => (await c.option(OPT.LIST)).filter((r) => r.type === REP.SERVER).map((r) => parseRepServer(r.data).name);

  const p = await negotiating(t, port);
  t.same(await listed(p), ['public'], 'plaintext: LIST shows only what it may open');
  const pi = await p.option(OPT.INFO, infoRequestData('disk'));
  t.same(types(pi), [REP.ERR_TLS_REQD], 'plaintext INFO on a TLS-only export: ERR_TLS_REQD');
  t.same(types(await p.option(OPT.GO, infoRequestData('nope'))), [REP.ERR_TLS_REQD], 'unknown export: same answer (no oracle)');
  t.same(types(await p.option(OPT.LIST_META_CONTEXT, metaContextData('disk', []))), [REP.ERR_POLICY], 'meta context: ERR_POLICY (TLS_REQD is for INFO/GO only)');
  const pgo = await p.option(OPT.GO, infoRequestData('public'));
  t.equal(pgo[pgo.length - 1]!.type, REP.ACK, 'plaintext GO on the export it may open');

  const a = await overTls(t, port, alice);
  t.same(await listed(a), ['disk', 'disk2'], 'alice: LIST shows disk*');
  t.same(types(await a.option(OPT.INFO, infoRequestData('shared'))), [REP.ERR_POLICY], 'alice INFO shared: ERR_POLICY');
  const refused = await a.option(OPT.GO, infoRequestData('shared'));
  t.same(types(refused), [REP.ERR_POLICY], 'alice GO shared: ERR_POLICY');
  t.match(refused[0]!.data.toString(), /psk:alice/, 'the message names the identity');
  t.same(types(await a.option(OPT.GO, infoRequestData('public'))), [REP.ERR_POLICY], 'alice is not "plaintext": public refused');
  t.same(types(await a.option(OPT.GO, infoRequestData('disk-missing'))), [REP.ERR_UNKNOWN], 'an allowed but missing export: ERR_UNKNOWN');
  t.same(types(await a.option(OPT.GO, infoRequestData('missing'))), [REP.ERR_POLICY], 'a refused missing export: ERR_POLICY');
  const ago = await a.option(OPT.GO, infoRequestData('disk2'));
  t.equal(ago[ago.length - 1]!.type, REP.ACK, 'alice GO disk2');

  const b = await overTls(t, port, bob);
  t.same(await listed(b), ['shared'], 'bob: LIST shows shared');
  const bgo = await b.option(OPT.GO, infoRequestData('shared'));
  t.equal(bgo[bgo.length - 1]!.type, REP.ACK, 'bob GO shared');
});

t.test('access by identity: EXPORT_NAME of a refused export closes the connection', async (t) => {
  const { port } = await server(t, { mode: 'optional', upgrade, authorize: allowList });
  const b = await overTls(t, port, bob);
  b.sendOption(OPT.EXPORT_NAME, Buffer.from('disk'));
  t.equal((await b.expectClosed()).length, 0, 'closed without a reply');
  const a = await overTls(t, port, alice);
  a.sendOption(OPT.EXPORT_NAME, Buffer.from('disk'));
  t.equal((await a.readExact(10)).readBigUInt64BE(0), BigInt(8 * MiB), 'an allowed EXPORT_NAME works over TLS');
});

t.test('a wrong key or an unknown identity fails the TLS handshake: connection closed, reason tls', async (t) => {
  const { port, server: srv, failures } = await server(t, { mode: 'required', upgrade });
  for (const who of [pskClient('alice', Buffer.alloc(32, 1)), pskClient('mallory', keys.get('alice')!)]) {
    const c = await negotiating(t, port);
    await t.rejects(startTls(c, who), 'TLS handshake fails');
    await c.expectClosed();
  }
  t.ok(await until(() => srv.connectionCount === 0), 'connections gone');
  t.same(failures, ['tls', 'tls']);
});

t.test('TLS 1.2 with a PSK cipher suite works too', async (t) => {
  const { port } = await server(t, { mode: 'required', upgrade });
  const c = await negotiating(t, port);
  const s = await startTls(c, pskClient('alice', keys.get('alice')!, { maxVersion: 'TLSv1.2' }));
  t.teardown(() => s.destroy());
  t.equal((s.socket as import('node:tls').TLSSocket).getProtocol(), 'TLSv1.2');
  t.match((s.socket as import('node:tls').TLSSocket).getCipher().name, /PSK/);
  const go = await s.option(OPT.GO, infoRequestData('disk'));
  t.equal(go[go.length - 1]!.type, REP.ACK);
});

t.test('bytes sent after STARTTLS before its ACK end the connection', async (t) => {
  const { port, failures } = await server(t, { mode: 'required', upgrade });
  const c = await negotiating(t, port);
  // A client must wait for the ACK before its TLS handshake.
  const { optionRequest } = await import('../../helpers/nbd-encoder.js');
  c.write(Buffer.concat([optionRequest(OPT.STARTTLS), Buffer.from('too early')]));
  await c.expectClosed();
  t.pass('closed');
  t.ok(await until(() => failures.length === 1));
  t.same(failures, ['tls']);
});

t.test('a client silent after the STARTTLS ACK meets the handshake deadline', async (t) => {
  const { port, server: srv, failures } = await server(t, { mode: 'required', upgrade }, { handshakeTimeoutMs: 400 });
  const c = await negotiating(t, port);
  t.same(types(await c.option(OPT.STARTTLS)), [REP.ACK]);
  await c.expectClosed(3000);
  t.ok(await until(() => srv.connectionCount === 0), 'the connection is gone');
  t.same(failures, ['timeout']);
});

t.test('the server closes TLS connections on shutdown', async (t) => {
  const { port, server: srv } = await server(t, { mode: 'required', upgrade });
  const s = await overTls(t, port);
  await s.option(OPT.GO, infoRequestData('disk'));
  t.equal(srv.connectionCount, 1);
  await srv.close(2000);
  await s.expectClosed(3000);
  t.equal(srv.connectionCount, 0);
});
