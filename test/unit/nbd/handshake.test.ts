/**
 * The fixed-newstyle handshake seen from a raw client (doc/proto.md,
 * "Newstyle negotiation", "Option types"): what ends the connection, what gets
 * an error reply and lets negotiation go on, and the resource limits
 * (option count and size, handshake deadline, connection cap).
 */
import t from 'tap';
import type { NbdServerOptions } from '../../../src/nbd/server.js';
import { startTestServer, type TestServer } from '../../helpers/nbd-server.js';
import { RawClient, ClosedError, errorOf } from '../../helpers/nbd-raw-client.js';
import {
  C_FIXED_NEWSTYLE, C_NO_ZEROES, CMD, IHAVEOPT, INFO, NBDMAGIC, OPT, REP, TF, clientFlags, greeting,
  infoRequestData, metaContextData, optionRequest, parseInfoReply, parseRepMetaContext, parseRepServer,
} from '../../helpers/nbd-encoder.js';

const MiB = 1024 * 1024;

async function server(t: { teardown(fn: () => unknown): void }, options: Partial<NbdServerOptions> = {}): Promise<TestServer> {
  return startTestServer(t, (p) => {
    p.addMemory('disk', 64 * MiB, false, 'the test disk');
    p.addMemory('ro', 1 * MiB, true);
  }, options);
}

/** Connects, reads the greeting and sends FIXED_NEWSTYLE | NO_ZEROES. */
async function negotiating(t: { teardown(fn: () => unknown): void }, port: number, flags = C_FIXED_NEWSTYLE | C_NO_ZEROES): Promise<RawClient> {
  const c = await RawClient.connect(port);
  t.teardown(() => c.destroy());
  await c.start(flags);
  return c;
}

/** GO to `name` and check that transmission works with one READ. */
async function goWorks(c: RawClient, name = 'disk'): Promise<boolean> {
  const replies = await c.option(OPT.GO, infoRequestData(name));
  if (replies[replies.length - 1]!.type !== REP.ACK) return false;
  const info = parseInfoReply(replies[0]!.data);
  // DF is advertised exactly when structured replies were negotiated.
  c.structured = 'flags' in info && (info.flags & TF.SEND_DF) !== 0;
  const r = await c.roundTrip({ type: CMD.READ, offset: 0, length: 512 });
  return errorOf(r) === 0 && r[0]!.kind === (c.structured ? 'chunk' : 'simple');
}

t.test('greeting is NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', async (t) => {
  const { port } = await server(t);
  const c = await RawClient.connect(port);
  t.teardown(() => c.destroy());
  const g = await c.readExact(18);
  t.same(g, greeting(3));
  t.equal(g.readBigUInt64BE(0), NBDMAGIC);
  t.equal(g.readBigUInt64BE(8), IHAVEOPT);
  t.equal(c.available, 0, 'nothing else before the client flags');
});

t.test('unknown client flags close the connection', async (t) => {
  const { port } = await server(t);
  for (const flags of [4, 0x80000000, 0xffffffff, C_FIXED_NEWSTYLE | 8]) {
    const c = await RawClient.connect(port);
    t.teardown(() => c.destroy());
    await c.readGreeting();
    c.write(clientFlags(flags));
    const rest = await c.expectClosed(2000);
    t.equal(rest.length, 0, `flags 0x${flags.toString(16)}: closed without a reply`);
  }
});

t.test('an option from a client without FIXED_NEWSTYLE closes the connection', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port, 0);
  c.sendOption(OPT.LIST);
  t.equal((await c.expectClosed()).length, 0);
});

t.test('bad option magic closes the connection', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  c.sendOption(OPT.LIST, undefined, { magic: IHAVEOPT ^ 0x100n });
  t.equal((await c.expectClosed()).length, 0);
  // Also after a successful option.
  const d = await negotiating(t, port);
  t.equal((await d.option(OPT.STRUCTURED_REPLY))[0]!.type, REP.ACK);
  d.write(Buffer.alloc(16, 0x42));
  await d.expectClosed();
  t.pass('closed after garbage following a good option');
});

t.test('unknown options get ERR_UNSUP and the next option still works', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  for (const [opt, data] of [[99, Buffer.alloc(0)], [OPT.EXTENDED_HEADERS, Buffer.alloc(0)], [OPT.PEEK_EXPORT, Buffer.alloc(0)],
    [0xffffffff, Buffer.from('data is drained')], [0, Buffer.alloc(100, 1)]] as Array<[number, Buffer]>) {
    const r = await c.option(opt, data);
    t.equal(r.length, 1, `option ${opt}: one reply`);
    t.equal(r[0]!.option, opt, `option ${opt}: echoed`);
    t.equal(r[0]!.type, REP.ERR_UNSUP, `option ${opt}: ERR_UNSUP`);
  }
  t.equal((await c.option(OPT.STRUCTURED_REPLY))[0]!.type, REP.ACK, 'a known option works afterwards');
  t.ok(await goWorks(c), 'GO works afterwards');
});

t.test('malformed INFO/GO data gets ERR_INVALID, then GO works', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  const bad = [
    Buffer.alloc(0),
    Buffer.alloc(5),
    infoRequestData('disk', [], { nameLength: 100 }),
    infoRequestData('disk', [1], { count: 3 }),
    Buffer.concat([infoRequestData('disk', []), Buffer.from([0])]),
    infoRequestData('di\0sk', []),
    infoRequestData(Buffer.from([0xc3, 0x28]), []),
  ];
  for (const opt of [OPT.INFO, OPT.GO]) {
    for (const data of bad) {
      const r = await c.option(opt, data);
      t.same(r.map((x) => [x.option, x.type]), [[opt, REP.ERR_INVALID]], `${opt === OPT.GO ? 'GO' : 'INFO'} ${data.toString('hex').slice(0, 24)}`);
    }
  }
  t.ok(await goWorks(c));
});

t.test('unknown export in INFO/GO gets ERR_UNKNOWN', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  for (const opt of [OPT.INFO, OPT.GO]) {
    const r = await c.option(opt, infoRequestData('nope', [INFO.NAME]));
    t.same(r.map((x) => x.type), [REP.ERR_UNKNOWN]);
    t.match(r[0]!.data.toString(), /nope/, 'message names the export');
  }
  t.ok(await goWorks(c), 'GO to a known export still works');
});

t.test('EXPORT_NAME with an unknown export closes the connection', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  c.sendOption(OPT.EXPORT_NAME, Buffer.from('nope'));
  t.equal((await c.expectClosed()).length, 0, 'no reply bytes');
  const d = await negotiating(t, port);
  d.sendOption(OPT.EXPORT_NAME, Buffer.from([0x64, 0, 0x65]));
  await d.expectClosed();
  t.pass('invalid name (NUL) closes too');
});

t.test('EXPORT_NAME reply is 10 bytes with NO_ZEROES, 134 without', async (t) => {
  const { port } = await server(t);
  for (const noZeroes of [true, false]) {
    const c = await negotiating(t, port, C_FIXED_NEWSTYLE | (noZeroes ? C_NO_ZEROES : 0));
    c.sendOption(OPT.EXPORT_NAME, Buffer.from('disk'));
    const r = await c.readExact(noZeroes ? 10 : 134);
    t.equal(r.readBigUInt64BE(0), BigInt(64 * MiB), 'size');
    const flags = r.readUInt16BE(8);
    t.ok(flags & TF.HAS_FLAGS, 'HAS_FLAGS');
    t.notOk(flags & TF.SEND_DF, 'no DF without structured replies');
    if (!noZeroes) t.ok(r.subarray(10).equals(Buffer.alloc(124)), '124 zero bytes');
    t.equal(await c.staysOpen(100), true);
    t.equal(c.available, 0, 'nothing more than the reply');
    const rr = await c.roundTrip({ type: CMD.READ, offset: 0, length: 4096 });
    t.equal(rr[0]!.kind === 'simple' && rr[0]!.error, 0, 'transmission works');
  }
  // Empty name selects the default export.
  const d = await negotiating(t, port);
  d.sendOption(OPT.EXPORT_NAME, Buffer.alloc(0));
  t.equal((await d.readExact(10)).readBigUInt64BE(0), BigInt(64 * MiB), 'empty name = default export');
});

t.test('LIST', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  const bad = await c.option(OPT.LIST, Buffer.from('x'));
  t.same(bad.map((x) => x.type), [REP.ERR_INVALID], 'LIST with data gets ERR_INVALID');
  const r = await c.option(OPT.LIST);
  t.same(r.map((x) => x.type), [REP.SERVER, REP.SERVER, REP.ACK]);
  t.same(r.slice(0, 2).map((x) => parseRepServer(x.data)), [
    { name: 'disk', description: 'the test disk' },
    { name: 'ro', description: '' },
  ]);
  t.ok(r.every((x) => x.option === OPT.LIST));
  t.ok(await goWorks(c));
});

t.test('STARTTLS gets ERR_POLICY on a NOTLS server', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  t.same((await c.option(OPT.STARTTLS)).map((x) => x.type), [REP.ERR_POLICY]);
  t.ok(await goWorks(c));
});

t.test('STRUCTURED_REPLY with data gets ERR_INVALID (and is not negotiated)', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  t.same((await c.option(OPT.STRUCTURED_REPLY, Buffer.from([0]))).map((x) => x.type), [REP.ERR_INVALID]);
  const r = await c.option(OPT.GO, infoRequestData('disk'));
  const info = parseInfoReply(r[0]!.data);
  t.ok('flags' in info && !(info.flags & TF.SEND_DF), 'no DF: structured replies are off');
  const rr = await c.roundTrip({ type: CMD.READ, offset: 0, length: 512 });
  t.equal(rr[0]!.kind, 'simple', 'simple replies');
});

t.test('meta contexts', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  const early = await c.option(OPT.SET_META_CONTEXT, metaContextData('disk', ['base:allocation']));
  t.same(early.map((x) => x.type), [REP.ERR_INVALID], 'SET before STRUCTURED_REPLY gets ERR_INVALID');

  const list = await c.option(OPT.LIST_META_CONTEXT, metaContextData('disk', ['base:']));
  t.same(list.map((x) => x.type), [REP.META_CONTEXT, REP.ACK], 'LIST base: works without structured replies');
  t.equal(parseRepMetaContext(list[0]!.data).name, 'base:allocation');

  const all = await c.option(OPT.LIST_META_CONTEXT, metaContextData('disk', []));
  t.same(all.map((x) => x.type), [REP.META_CONTEXT, REP.ACK], 'LIST with no query lists all');
  const unknownList = await c.option(OPT.LIST_META_CONTEXT, metaContextData('disk', ['qemu:dirty-bitmap:x', 'base:nothing']));
  t.same(unknownList.map((x) => x.type), [REP.ACK], 'LIST of unknown contexts: only ACK');
  const malformed = await c.option(OPT.LIST_META_CONTEXT, metaContextData('disk', ['base:'], { count: 2 }));
  t.same(malformed.map((x) => x.type), [REP.ERR_INVALID], 'malformed LIST gets ERR_INVALID');
  const unknownExport = await c.option(OPT.LIST_META_CONTEXT, metaContextData('nope', []));
  t.same(unknownExport.map((x) => x.type), [REP.ERR_UNKNOWN], 'unknown export');

  t.equal((await c.option(OPT.STRUCTURED_REPLY))[0]!.type, REP.ACK);
  const unknownNs = await c.option(OPT.SET_META_CONTEXT, metaContextData('disk', ['qemu:dirty-bitmap:x']));
  t.same(unknownNs.map((x) => x.type), [REP.ACK], 'SET with an unknown namespace: only ACK');
  const wildcard = await c.option(OPT.SET_META_CONTEXT, metaContextData('disk', ['base:']));
  t.same(wildcard.map((x) => x.type), [REP.ACK], 'base: is a wildcard for LIST only');
  const set = await c.option(OPT.SET_META_CONTEXT, metaContextData('disk', ['x:y', 'base:allocation']));
  t.same(set.map((x) => x.type), [REP.META_CONTEXT, REP.ACK], 'SET base:allocation');
  const id = parseRepMetaContext(set[0]!.data).id;

  const go = await c.option(OPT.GO, infoRequestData('disk'));
  t.equal(go[go.length - 1]!.type, REP.ACK);
  c.structured = true;
  const bs = await c.roundTrip({ type: CMD.BLOCK_STATUS, offset: 0, length: 65536 });
  t.equal(bs.length, 1);
  const b = bs[0]!;
  t.ok(b.kind === 'chunk' && b.body.kind === 'block-status' && b.body.contextId === id, 'BLOCK_STATUS with the negotiated id');
});

t.test('SET_META_CONTEXT for another export does not apply after GO', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  await c.option(OPT.STRUCTURED_REPLY);
  t.equal((await c.option(OPT.SET_META_CONTEXT, metaContextData('ro', ['base:allocation'])))[0]!.type, REP.META_CONTEXT);
  await c.option(OPT.GO, infoRequestData('disk'));
  c.structured = true;
  const r = await c.roundTrip({ type: CMD.BLOCK_STATUS, offset: 0, length: 4096 });
  t.ok(r[0]!.kind === 'chunk' && r[0]!.body.kind === 'error' && r[0]!.body.error === 22, 'EINVAL: no context selected');
});

t.test('option data over 64 KiB gets ERR_TOO_BIG and negotiation continues', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  const r = await c.option(OPT.LIST, Buffer.alloc(64 * 1024 + 1, 7));
  t.same(r.map((x) => x.type), [REP.ERR_TOO_BIG]);
  const r2 = await c.option(OPT.GO, Buffer.alloc(1024 * 1024, 0xff));
  t.same(r2.map((x) => x.type), [REP.ERR_TOO_BIG], '1 MiB GO is drained too');
  t.ok(await goWorks(c));
});

t.test('option length over 16 MiB closes the connection', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  c.sendOption(OPT.LIST, Buffer.alloc(0), { length: 16 * MiB + 1 });
  t.equal((await c.expectClosed()).length, 0);
  const d = await negotiating(t, port);
  d.sendOption(OPT.INFO, Buffer.alloc(0), { length: 0xffffffff });
  await d.expectClosed();
  t.pass('u32 max length closes too');
  const e = await negotiating(t, port);
  e.sendOption(OPT.EXPORT_NAME, Buffer.alloc(0), { length: 64 * 1024 + 1 });
  await e.expectClosed();
  t.pass('an oversize EXPORT_NAME closes (it has no error reply)');
});

t.test('more options than the limit close the connection', async (t) => {
  const { port } = await server(t);
  const c = await negotiating(t, port);
  // The default limit is 128: send them pipelined.
  const many = Buffer.concat(Array.from({ length: 128 }, () => optionRequest(OPT.STRUCTURED_REPLY)));
  c.write(many);
  for (let i = 0; i < 128; i++) {
    const r = await c.readOptionReply();
    if (r.type !== REP.ACK) { t.fail(`option ${i}: 0x${r.type.toString(16)}`); break; }
  }
  c.sendOption(OPT.STRUCTURED_REPLY);
  const rest = await c.expectClosed();
  t.equal(rest.length, 0, 'the 129th option is not answered');

  const s2 = await server(t, { handshake: { maxOptions: 3 } });
  const d = await negotiating(t, s2.port);
  await d.option(99);
  await d.option(99);
  t.ok(await goWorks(d), 'the third option (GO) within a limit of 3 works');
});

t.test('ABORT gets ACK and the server closes', async (t) => {
  const { port, server: srv } = await server(t);
  const c = await negotiating(t, port);
  await c.option(OPT.STRUCTURED_REPLY);
  const r = await c.option(OPT.ABORT);
  t.same(r.map((x) => [x.option, x.type, x.data.length]), [[OPT.ABORT, REP.ACK, 0]]);
  t.equal((await c.expectClosed()).length, 0);
  c.destroy();
  await waitFor(() => srv.connectionCount === 0);
  t.equal(srv.connectionCount, 0, 'connection released');
  // A client that closes right after sending ABORT is fine too.
  const d = await negotiating(t, port);
  d.sendOption(OPT.ABORT);
  d.destroy();
  await waitFor(() => srv.connectionCount === 0);
  t.equal(srv.connectionCount, 0);
});

t.test('INFO and GO return the same information', async (t) => {
  const { port } = await server(t);
  for (const structured of [false, true]) {
    const c = await negotiating(t, port);
    if (structured) await c.option(OPT.STRUCTURED_REPLY);
    const req = infoRequestData('disk', [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE, 1234]);
    const info = await c.option(OPT.INFO, req);
    const go = await c.option(OPT.GO, req);
    t.same(info.map((x) => [x.type, x.data]), go.map((x) => [x.type, x.data]), `structured=${structured}`);
    t.ok(info.every((x) => x.option === OPT.INFO) && go.every((x) => x.option === OPT.GO), 'option echoed');
    const parsed = info.slice(0, -1).map((x) => parseInfoReply(x.data));
    t.match(parsed, [
      { type: INFO.EXPORT, size: BigInt(64 * MiB) },
      { type: INFO.NAME, value: 'disk' },
      { type: INFO.DESCRIPTION, value: 'the test disk' },
      { type: INFO.BLOCK_SIZE, minimum: 1, preferred: 4096 },
    ]);
    const flags = (parsed[0] as { flags: number }).flags;
    t.equal(Boolean(flags & TF.SEND_DF), structured, 'DF only with structured replies');
  }
  // Read-only export.
  const c = await negotiating(t, port);
  const r = await c.option(OPT.INFO, infoRequestData('ro'));
  const e = parseInfoReply(r[0]!.data) as { flags: number };
  t.ok(e.flags & TF.READ_ONLY, 'READ_ONLY');
  t.notOk(e.flags & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO), 'no write-type features on a read-only export');
});

t.test('handshake timeout closes a silent client', async (t) => {
  const { port, server: srv } = await server(t, { handshakeTimeoutMs: 300 });
  const start = Date.now();
  const c = await RawClient.connect(port);
  t.teardown(() => c.destroy());
  await c.expectClosed(1500);
  const took = Date.now() - start;
  t.ok(took >= 250 && took < 1000, `closed after ${took} ms`);
  // A client that negotiates slowly (one option) is closed too.
  const d = await negotiating(t, port);
  await d.option(99);
  await d.expectClosed(1500);
  t.pass('slow negotiation closed');
  // The deadline ends with the handshake.
  const e = await negotiating(t, port);
  t.ok(await goWorks(e));
  t.equal(await e.staysOpen(600), true, 'a negotiated connection is not timed out');
  await waitFor(() => srv.connectionCount === 1);
  t.equal(srv.connectionCount, 1);
});

t.test('connection cap', async (t) => {
  const { port, server: srv } = await server(t, { maxConnections: 2 });
  const a = await RawClient.connect(port);
  const b = await RawClient.connect(port);
  t.teardown(() => { a.destroy(); b.destroy(); });
  await a.readGreeting();
  await b.readGreeting();
  const c = await RawClient.connect(port);
  t.teardown(() => c.destroy());
  const rest = await c.expectClosed(1000);
  t.equal(rest.length, 0, 'the third connection is closed without a greeting');
  a.write(clientFlags(C_FIXED_NEWSTYLE | C_NO_ZEROES));
  b.write(clientFlags(C_FIXED_NEWSTYLE | C_NO_ZEROES));
  t.ok(await goWorks(a), 'first still works');
  t.ok(await goWorks(b), 'second still works');
  t.equal(srv.connectionCount, 2);
  a.destroy();
  await waitFor(() => srv.connectionCount === 1);
  const d = await RawClient.connect(port);
  t.teardown(() => d.destroy());
  await d.readGreeting();
  t.pass('a slot freed by a closed connection is reused');
});

t.test('a client vanishing mid-handshake is released', async (t) => {
  const { port, server: srv } = await server(t);
  const c = await negotiating(t, port);
  c.write(optionRequest(OPT.GO, infoRequestData('disk')).subarray(0, 20));
  await new Promise((r) => setTimeout(r, 50));
  c.destroy();
  await waitFor(() => srv.connectionCount === 0);
  t.equal(srv.connectionCount, 0);
  // Reading from a closed client surfaces as ClosedError in the raw client.
  const d = await RawClient.connect(port);
  t.teardown(() => d.destroy());
  await d.readGreeting();
  d.write(clientFlags(0xff));
  await t.rejects(d.readExact(1, 1000), ClosedError);
});

async function waitFor(cond: () => boolean, ms = 2000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
}
