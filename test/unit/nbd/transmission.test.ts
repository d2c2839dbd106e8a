/**
 * The transmission phase seen from a raw client (doc/proto.md,
 * "Transmission", "Error values"): round trips with simple and structured
 * replies, the error table, staying in sync after refused requests, what ends
 * a connection, and bounded memory when a client stops reading.
 */
import t from 'tap';
import crypto from 'node:crypto';
import v8 from 'node:v8';
import vm from 'node:vm';
import { startTestServer, type TestServer } from '../../helpers/nbd-server.js';
import { RawClient, assembleRead, connectTo, errorOf, type Reply } from '../../helpers/nbd-raw-client.js';
import { CMD, CMD_FLAG, ERRNO, REPLY_FLAG_DONE, REPLY_TYPE, STATE_HOLE, TF, requestHeader } from '../../helpers/nbd-encoder.js';
import type { NbdServerOptions } from '../../../src/nbd/server.js';
import { Transmission, DEFAULT_TRANSMISSION_LIMITS, type ReplySink } from '../../../src/nbd/transmission.js';
import { MemoryExport, MemoryStore } from '../../helpers/exports.js';
import { silentLogger } from '../../../src/common/log.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;

type Teardown = { teardown(fn: () => unknown): void };

async function server(t: Teardown, options: Partial<NbdServerOptions> = {}): Promise<TestServer> {
  return startTestServer(t, (p) => {
    p.addMemory('disk', SIZE);
    p.addMemory('ro', 1 * MiB, true);
  }, options);
}

async function client(t: Teardown, port: number, name = 'disk', o: { structured?: boolean; metaContext?: boolean } = {}): Promise<RawClient> {
  const { client: c } = await connectTo(port, name, o);
  t.teardown(() => c.destroy());
  return c;
}

v8.setFlagsFromString('--expose-gc');
/** A full collection, so memory baselines do not include garbage. */
const gc = vm.runInNewContext('gc') as () => void;

const rand = (n: number) => crypto.randomBytes(n);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function waitFor(cond: () => boolean, ms = 3000): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await sleep(10);
  return cond();
}

/** Checks the chunk rules for a successful structured READ; returns a description of the first fault. */
function checkReadChunks(replies: Reply[], offset: number, length: number): string | null {
  const ranges: Array<[number, number]> = [];
  for (let i = 0; i < replies.length; i++) {
    const r = replies[i]!;
    if (r.kind !== 'chunk') return 'simple reply on a structured connection';
    if (Boolean(r.flags & REPLY_FLAG_DONE) !== (i === replies.length - 1)) return `DONE flag wrong on chunk ${i}`;
    const b = r.body;
    if (b.kind === 'data') ranges.push([Number(b.offset), b.data.length]);
    else if (b.kind === 'hole') ranges.push([Number(b.offset), b.size]);
    else if (b.kind !== 'none') return `unexpected chunk ${b.kind}`;
  }
  ranges.sort((a, b) => a[0] - b[0]);
  let pos = offset;
  for (const [o, l] of ranges) {
    if (o !== pos) return `gap or overlap at ${pos} (chunk at ${o})`;
    pos += l;
  }
  return pos === offset + length ? null : `chunks end at ${pos}, not ${offset + length}`;
}

t.test('simple READ/WRITE round trip', async (t) => {
  const { port } = await server(t);
  const c = await client(t, port);
  const data = rand(100 * KiB + 7);
  t.equal(await c.writeData(4097, data), 0, 'WRITE');
  t.same(await c.readData(4097, data.length), data, 'READ back');
  const around = await c.readData(4096, data.length + 2);
  t.equal(around[0], 0, 'byte before is zero');
  t.equal(around[around.length - 1], 0, 'byte after is zero');
  t.same(await c.readData(SIZE - 4096, 4096), Buffer.alloc(4096), 'hole reads as zeros');
  t.equal(await c.writeData(SIZE - 1, Buffer.from([0xab]), CMD_FLAG.FUA), 0, 'last byte with FUA');
  t.same(await c.readData(SIZE - 1, 1), Buffer.from([0xab]));
});

t.test('structured READ/WRITE round trip', async (t) => {
  const { port } = await server(t);
  const c = await client(t, port, 'disk', { structured: true });
  const data = rand(300 * KiB + 11);
  t.equal(await c.writeData(65536 - 5, data), 0);
  const replies = await c.roundTrip({ type: CMD.READ, offset: 65536 - 5, length: data.length });
  t.equal(checkReadChunks(replies, 65536 - 5, data.length), null, 'chunks cover the request, DONE on the last only');
  t.same(assembleRead(replies, 65536 - 5, data.length), data);
});

t.test('cookies are echoed bit-exactly', async (t) => {
  const { port } = await server(t);
  for (const structured of [false, true]) {
    const c = await client(t, port, 'disk', { structured });
    for (const cookie of [0xfedcba9876543210n, 0xffffffffffffffffn, 0n, 0x8000000000000001n, 0x00000001ffffffffn]) {
      const w = c.request({ type: CMD.WRITE, cookie, offset: 0, length: 4 }, Buffer.from('abcd'));
      const r1 = await c.readReply();
      t.equal(r1.cookie, w, `structured=${structured} WRITE 0x${cookie.toString(16)}`);
      c.request({ type: CMD.READ, cookie, offset: 0, length: 4 });
      const r2 = await c.collect(1);
      t.same([...r2.keys()], [cookie], `READ 0x${cookie.toString(16)}`);
      c.request({ type: CMD.READ, cookie, offset: SIZE, length: 4 });
      const r3 = await c.collect(1);
      t.same([...r3.keys()], [cookie], `error reply 0x${cookie.toString(16)}`);
    }
  }
});

t.test('pipelined requests: replies may come in any order, all arrive', async (t) => {
  const { port } = await server(t);
  for (const structured of [false, true]) {
    const c = await client(t, port, 'disk', { structured });
    const expect = new Map<bigint, { offset: number; data?: Buffer; length: number }>();
    const blocks: Buffer[] = [];
    for (let i = 0; i < 64; i++) blocks.push(rand(((i * 7919) % 200) * 512 + 512));
    let off = 0;
    const offsets: number[] = [];
    for (const b of blocks) { offsets.push(off); off += b.length; }
    // Writes first (all pipelined), then reads of the same ranges, then a FLUSH.
    for (let i = 0; i < blocks.length; i++) expect.set(c.request({ type: CMD.WRITE, offset: offsets[i]!, length: blocks[i]!.length }, blocks[i]), { offset: offsets[i]!, length: 0 });
    const writes = await c.collect(blocks.length);
    t.equal(writes.size, blocks.length, 'every WRITE replied');
    t.ok([...writes.values()].every((r) => errorOf(r) === 0), 'all succeeded');
    const reads = new Map<bigint, number>();
    for (let i = 0; i < blocks.length; i++) reads.set(c.request({ type: CMD.READ, offset: offsets[i]!, length: blocks[i]!.length }), i);
    const flush = c.request({ type: CMD.FLUSH });
    const got = await c.collect(blocks.length + 1);
    t.equal(got.size, blocks.length + 1, 'every READ and the FLUSH replied');
    t.equal(errorOf(got.get(flush)!), 0, 'FLUSH');
    let same = true;
    for (const [cookie, i] of reads) {
      const data = assembleRead(got.get(cookie)!, offsets[i]!, blocks[i]!.length);
      if (!data.equals(blocks[i]!)) same = false;
    }
    t.ok(same, `structured=${structured}: every READ returned its block`);
  }
});

t.test('structured READ: holes, data, DONE, DF', async (t) => {
  const { port } = await server(t);
  const c = await client(t, port, 'disk', { structured: true });
  const hole = await c.roundTrip({ type: CMD.READ, offset: 10 * MiB, length: 256 * KiB });
  t.equal(hole.length, 1, 'one chunk for a hole');
  t.match(hole[0], { kind: 'chunk', type: REPLY_TYPE.OFFSET_HOLE, flags: REPLY_FLAG_DONE, body: { kind: 'hole', offset: BigInt(10 * MiB), size: 256 * KiB } });

  const data = rand(64 * KiB);
  await c.writeData(20 * MiB, data);
  const d = await c.roundTrip({ type: CMD.READ, offset: 20 * MiB, length: 64 * KiB });
  t.equal(d.length, 1);
  t.match(d[0], { kind: 'chunk', type: REPLY_TYPE.OFFSET_DATA, flags: REPLY_FLAG_DONE, body: { kind: 'data', offset: BigInt(20 * MiB) } });

  // hole | data | hole
  const mixed = await c.roundTrip({ type: CMD.READ, offset: 20 * MiB - 64 * KiB, length: 192 * KiB });
  t.same(mixed.map((r) => r.kind === 'chunk' && r.type), [REPLY_TYPE.OFFSET_HOLE, REPLY_TYPE.OFFSET_DATA, REPLY_TYPE.OFFSET_HOLE]);
  t.equal(checkReadChunks(mixed, 20 * MiB - 64 * KiB, 192 * KiB), null);
  t.same(assembleRead(mixed, 20 * MiB - 64 * KiB, 192 * KiB).subarray(64 * KiB, 128 * KiB), data);

  for (const [what, off] of [['mixed', 20 * MiB - 64 * KiB], ['hole', 30 * MiB]] as const) {
    const df = await c.roundTrip({ type: CMD.READ, flags: CMD_FLAG.DF, offset: off, length: 192 * KiB });
    t.equal(df.length, 1, `DF ${what}: a single chunk`);
    t.match(df[0], { kind: 'chunk', type: REPLY_TYPE.OFFSET_DATA, flags: REPLY_FLAG_DONE, body: { kind: 'data', offset: BigInt(off) } }, `DF ${what}: OFFSET_DATA`);
    t.equal(df[0]!.kind === 'chunk' && df[0]!.body.kind === 'data' && df[0]!.body.data.length, 192 * KiB);
  }
});

t.test('error table', async (t) => {
  const { port } = await server(t);
  const c = await client(t, port);
  const err = async (r: Parameters<RawClient['roundTrip']>[0], payload?: Buffer) => errorOf(await c.roundTrip(r, payload));
  t.equal(await err({ type: 99, offset: 0, length: 512 }), ERRNO.EINVAL, 'unknown command');
  t.equal(await err({ type: 0xffff }), ERRNO.EINVAL, 'command 0xffff');
  t.equal(await err({ type: CMD.READ, flags: 0x100, offset: 0, length: 512 }), ERRNO.EINVAL, 'unknown flag');
  t.equal(await err({ type: CMD.READ, flags: CMD_FLAG.DF, offset: 0, length: 512 }), ERRNO.EINVAL, 'DF without structured replies');
  t.equal(await err({ type: CMD.READ, flags: CMD_FLAG.REQ_ONE, offset: 0, length: 512 }), ERRNO.EINVAL, 'REQ_ONE on READ');
  t.equal(await err({ type: CMD.FLUSH, flags: CMD_FLAG.NO_HOLE }), ERRNO.EINVAL, 'NO_HOLE on FLUSH');
  t.equal(await err({ type: CMD.WRITE_ZEROES, flags: CMD_FLAG.NO_HOLE | CMD_FLAG.FUA, offset: 0, length: 4096 }), 0, 'NO_HOLE|FUA on WRITE_ZEROES is fine');
  t.equal(await err({ type: CMD.READ, offset: SIZE - 511, length: 512 }), ERRNO.EINVAL, 'read past end');
  t.equal(await err({ type: CMD.READ, offset: 0xffffffffffffff00n, length: 512 }), ERRNO.EINVAL, 'read at offset 2^64-256');
  t.equal(await err({ type: CMD.READ, offset: 2n ** 53n + 1n, length: 1 }), ERRNO.EINVAL, 'read at 2^53+1');
  t.equal(await err({ type: CMD.TRIM, offset: SIZE, length: 1 }), ERRNO.EINVAL, 'trim past end');
  t.equal(await err({ type: CMD.WRITE, offset: SIZE - 100, length: 512 }, rand(512)), ERRNO.ENOSPC, 'write past end');
  t.equal(await c.writeData(0, Buffer.from('in sync')), 0, 'next request works after a refused WRITE');
  t.equal(await err({ type: CMD.WRITE_ZEROES, offset: SIZE - 100, length: 512 }), ERRNO.ENOSPC, 'write zeroes past end');
  t.equal(await err({ type: CMD.READ, offset: 0, length: 0 }), ERRNO.EINVAL, 'zero-length read');
  t.equal(await err({ type: CMD.WRITE, offset: 0, length: 0 }), ERRNO.EINVAL, 'zero-length write');
  t.equal(await err({ type: CMD.FLUSH, offset: 512 }), ERRNO.EINVAL, 'FLUSH with an offset');
  t.equal(await err({ type: CMD.FLUSH, length: 512 }), ERRNO.EINVAL, 'FLUSH with a length');
  t.equal(await err({ type: CMD.FLUSH }), 0, 'FLUSH');
  t.equal(await err({ type: CMD.BLOCK_STATUS, offset: 0, length: 4096 }), ERRNO.EINVAL, 'BLOCK_STATUS without a meta context');
  t.same(await c.readData(0, 7), Buffer.from('in sync'), 'still in sync at the end');

  const ro = await client(t, port, 'ro');
  t.equal(errorOf(await ro.roundTrip({ type: CMD.WRITE, offset: 0, length: 512 }, rand(512))), ERRNO.EPERM, 'write on read-only');
  t.equal(errorOf(await ro.roundTrip({ type: CMD.TRIM, offset: 0, length: 512 })), ERRNO.EPERM, 'trim on read-only');
  t.equal(errorOf(await ro.roundTrip({ type: CMD.WRITE_ZEROES, offset: 0, length: 512 })), ERRNO.EPERM, 'write zeroes on read-only');
  t.equal(errorOf(await ro.roundTrip({ type: CMD.READ, offset: 0, length: 512 })), 0, 'reads work after');
});

t.test('structured error replies', async (t) => {
  const { port } = await server(t);
  const c = await client(t, port, 'disk', { structured: true });
  const r = await c.roundTrip({ type: CMD.READ, offset: SIZE - 1, length: 2 });
  t.equal(r.length, 1);
  t.match(r[0], { kind: 'chunk', type: REPLY_TYPE.ERROR, flags: REPLY_FLAG_DONE, body: { kind: 'error', error: ERRNO.EINVAL } },
    'read past end: ERROR chunk with DONE (no simple reply for READ)');
  const z = await c.roundTrip({ type: CMD.READ, offset: 0, length: 0 });
  t.match(z[0], { kind: 'chunk', body: { kind: 'error', error: ERRNO.EINVAL } }, 'zero-length read: ERROR chunk');
  const bs = await c.roundTrip({ type: CMD.BLOCK_STATUS, offset: 0, length: 512 });
  t.match(bs[0], { kind: 'chunk', body: { kind: 'error', error: ERRNO.EINVAL } }, 'BLOCK_STATUS without a meta context');
  const w = await c.roundTrip({ type: CMD.WRITE, offset: SIZE, length: 3 }, Buffer.from('abc'));
  t.match(w[0], { kind: 'simple', error: ERRNO.ENOSPC }, 'write past end: simple reply is allowed');
  t.equal(await c.writeData(0, Buffer.from('ok')), 0, 'in sync');
});

t.test('BLOCK_STATUS', async (t) => {
  const { port } = await server(t);
  const c = await client(t, port, 'disk', { structured: true, metaContext: true });
  await c.writeData(128 * KiB, rand(64 * KiB));
  const all = await c.roundTrip({ type: CMD.BLOCK_STATUS, offset: 0, length: 1 * MiB });
  t.equal(all.length, 1, 'one chunk per selected context');
  const b = all[0]!;
  t.ok(b.kind === 'chunk' && b.flags & REPLY_FLAG_DONE && b.body.kind === 'block-status');
  if (b.kind === 'chunk' && b.body.kind === 'block-status') {
    t.equal(b.body.contextId, c.metaContextId);
    t.same(b.body.extents.slice(0, 2), [{ length: 128 * KiB, flags: STATE_HOLE | 2 }, { length: 64 * KiB, flags: 0 }]);
    t.ok(b.body.extents.every((e) => e.length > 0), 'no zero-length descriptor');
  }
  const one = await c.roundTrip({ type: CMD.BLOCK_STATUS, flags: CMD_FLAG.REQ_ONE, offset: 64 * KiB, length: 1 * MiB });
  const ob = one[0]!;
  t.ok(ob.kind === 'chunk' && ob.body.kind === 'block-status' && ob.body.extents.length === 1, 'REQ_ONE: exactly one descriptor');
  if (ob.kind === 'chunk' && ob.body.kind === 'block-status') t.same(ob.body.extents[0], { length: 64 * KiB, flags: STATE_HOLE | 2 });
  const small = await c.roundTrip({ type: CMD.BLOCK_STATUS, flags: CMD_FLAG.REQ_ONE, offset: 0, length: 1000 });
  t.ok(small[0]!.kind === 'chunk' && small[0]!.body.kind === 'block-status' && small[0]!.body.extents[0]!.length <= 1000, 'REQ_ONE: not longer than asked');
  const past = await c.roundTrip({ type: CMD.BLOCK_STATUS, offset: SIZE - 512, length: 1024 });
  t.match(past[0], { kind: 'chunk', body: { kind: 'error', error: ERRNO.EINVAL } }, 'past end: EINVAL');
  const flags = await c.roundTrip({ type: CMD.BLOCK_STATUS, flags: CMD_FLAG.DF, offset: 0, length: 512 });
  t.match(flags[0], { kind: 'chunk', body: { kind: 'error', error: ERRNO.EINVAL } }, 'DF on BLOCK_STATUS: EINVAL');
});

t.test('oversize WRITE: payload consumed, EINVAL, next request works', async (t) => {
  const { port } = await server(t);
  const c = await client(t, port);
  const len = 33 * MiB;
  const cookie = c.request({ type: CMD.WRITE, offset: 0, length: len }, Buffer.alloc(len, 0x5a));
  const r = await c.readReply(10_000);
  t.match(r, { kind: 'simple', error: ERRNO.EINVAL, cookie });
  t.equal(await c.writeData(0, Buffer.from('next')), 0);
  t.same(await c.readData(0, 5), Buffer.from('next\0'), 'the refused payload was not written');
  // The same on a structured connection, split across many socket writes.
  const s = await client(t, port, 'disk', { structured: true });
  s.write(requestHeader({ type: CMD.WRITE, cookie: 77n, offset: 0, length: len }));
  for (let i = 0; i < len; i += MiB) s.write(Buffer.alloc(MiB, 1));
  const r2 = await s.readReply(10_000);
  t.match(r2, { kind: 'simple', error: ERRNO.EINVAL, cookie: 77n });
  t.same(await s.readData(0, 4), Buffer.from('next'));
});

t.test('bad request magic closes that connection only', async (t) => {
  const { port, server: srv } = await server(t);
  const a = await client(t, port);
  const b = await client(t, port);
  t.equal(await a.writeData(0, Buffer.from('a')), 0);
  a.write(requestHeader({ magic: 0x25609514, type: CMD.READ, offset: 0, length: 512 }));
  t.equal((await a.expectClosed()).length, 0, 'closed without a reply');
  t.same(await b.readData(0, 1), Buffer.from('a'), 'the other connection still works');
  t.ok(await waitFor(() => srv.connectionCount === 1), 'the bad connection was released');
});

t.test('DISC after pending writes: every reply arrives before the close', async (t) => {
  const { port, server: srv } = await server(t);
  for (const structured of [false, true]) {
    const c = await client(t, port, 'disk', { structured });
    const parts: Buffer[] = [];
    const cookies: bigint[] = [];
    for (let i = 0; i < 32; i++) {
      const cookie = BigInt(1000 + i);
      cookies.push(cookie);
      parts.push(requestHeader({ type: CMD.WRITE, cookie, offset: i * 256 * KiB, length: 256 * KiB }), rand(256 * KiB));
    }
    parts.push(requestHeader({ type: CMD.FLUSH, cookie: 2000n }));
    parts.push(requestHeader({ type: CMD.DISC, cookie: 3000n }));
    // Anything after DISC is ignored.
    parts.push(requestHeader({ type: CMD.READ, cookie: 4000n, offset: 0, length: 512 }));
    c.write(Buffer.concat(parts));
    const got = await c.collect(33);
    t.same([...got.keys()].sort(), [...cookies, 2000n].sort(), `structured=${structured}: replies to every pending request`);
    t.ok([...got.values()].every((r) => errorOf(r) === 0));
    t.equal((await c.expectClosed()).length, 0, 'then closed, nothing after');
  }
  t.ok(await waitFor(() => srv.connectionCount === 0), 'connections released');
});

t.test('a client vanishing during a 32 MiB READ does not hurt the server', async (t) => {
  const { port, server: srv } = await server(t);
  const w = await client(t, port);
  // Make it data, not a hole, so the reply really carries 32 MiB.
  for (let i = 0; i < 32; i++) await w.writeData(i * MiB, Buffer.alloc(MiB, i + 1));
  for (const structured of [false, true]) {
    const c = await client(t, port, 'disk', { structured });
    c.request({ type: CMD.READ, offset: 0, length: 32 * MiB });
    await c.readExact(1, 5000);
    c.destroy();
  }
  t.ok(await waitFor(() => srv.connectionCount === 1), `released (connectionCount ${srv.connectionCount})`);
  const n = await client(t, port);
  t.same(await n.readData(31 * MiB, 4), Buffer.alloc(4, 32), 'a new connection is served');
  t.same(await w.readData(0, 4), Buffer.alloc(4, 1), 'the old one too');
  t.equal(srv.connectionCount, 2);
});

t.test('a client vanishing in the middle of a WRITE payload is released', async (t) => {
  const { port, server: srv } = await server(t);
  for (const structured of [false, true]) {
    const c = await client(t, port, 'disk', { structured });
    c.write(requestHeader({ type: CMD.WRITE, cookie: 1n, offset: 0, length: 64 * KiB }));
    c.write(rand(1000));
    await sleep(50);
    c.destroy();
  }
  t.ok(await waitFor(() => srv.connectionCount === 0), `released (connectionCount ${srv.connectionCount})`);
  const n = await client(t, port);
  t.same(await n.readData(0, 4), Buffer.alloc(4), 'nothing was written; the server still serves');
});

/**
 * Pipelines `count` 1 MiB READs of written data in one socket write, stops
 * reading for `stallMs`, and reports how many the server completed and how
 * much memory grew meanwhile; then reads every reply.
 */
async function stalledReads(t: Teardown, options: Partial<NbdServerOptions>, count: number, stallMs: number) {
  let completed = 0;
  const { port } = await server(t, { ...options, observer: () => { completed++; } });
  const w = await client(t, port);
  const pattern = (i: number) => Buffer.alloc(MiB, (i * 37) & 0xff);
  for (let i = 0; i < 16; i++) await w.writeData(i * MiB, pattern(i));
  const c = await client(t, port);
  gc();
  const before = process.memoryUsage().arrayBuffers;
  c.socket.pause();
  const cookies: bigint[] = [];
  const reqs: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const cookie = BigInt(i + 1);
    cookies.push(cookie);
    reqs.push(requestHeader({ type: CMD.READ, cookie, offset: (i % 16) * MiB, length: MiB }));
  }
  const base = completed;
  c.write(Buffer.concat(reqs));
  // READ data is tracked by cookie for simple replies.
  for (const cookie of cookies) c.expectRead(cookie, MiB);
  let peak = 0;
  const end = Date.now() + stallMs;
  while (Date.now() < end) {
    peak = Math.max(peak, process.memoryUsage().arrayBuffers - before);
    await sleep(20);
  }
  const stalled = completed - base;
  c.socket.resume();
  const resumed = Date.now();
  const got = await c.collect(count, 20_000);
  const drainMs = Date.now() - resumed;
  let ok = got.size === count;
  for (const [cookie, r] of got) {
    const i = Number(cookie) - 1;
    if (!assembleRead(r, (i % 16) * MiB, MiB).equals(pattern(i % 16))) ok = false;
  }
  return { stalled, peak, ok, size: got.size, drainMs };
}

t.test('backpressure: a client that stops reading does not make the server buffer without bound', async (t) => {
  const r = await stalledReads(t, {}, 200, 1000);
  t.comment(`default limits: ${r.stalled} of 200 READs completed while stalled, arrayBuffers +${(r.peak / MiB).toFixed(0)} MiB, drained in ${r.drainMs} ms`);
  t.ok(r.peak < 300 * MiB, 'memory growth under 300 MiB');
  t.ok(r.stalled < 200, 'the server stopped executing READs while replies could not be sent');
  t.ok(r.ok, `all ${r.size} replies arrived with the right data`);

  const tight = await stalledReads(t, { transmission: { ...DEFAULT_TRANSMISSION_LIMITS, maxInflightBytes: 8 * MiB } }, 200, 1000);
  t.comment(`8 MiB cap: ${tight.stalled} of 200 READs completed while stalled, arrayBuffers +${(tight.peak / MiB).toFixed(0)} MiB, drained in ${tight.drainMs} ms`);
  t.ok(tight.stalled <= 48, 'with an 8 MiB cap, at most a few dozen READs run ahead of the client');
  t.ok(tight.peak < 80 * MiB, 'memory growth stays near the cap');
  t.ok(tight.ok, 'all replies arrived');
});

/**
 * Transmission's parser alone: the same request stream fed split at every
 * byte offset (STYLE habit 13) must produce the same replies.
 */
t.test('Transmission parses a stream split at every byte offset', async (t) => {
  const payload = Buffer.from('0123456789abcdef0123456789ABCDEF');
  const stream = Buffer.concat([
    requestHeader({ type: CMD.WRITE, cookie: 1n, offset: 100, length: payload.length }), payload,
    requestHeader({ type: CMD.WRITE, cookie: 2n, offset: SIZE, length: 5 }), Buffer.from('xxxxx'),
    requestHeader({ type: CMD.READ, cookie: 3n, offset: 100, length: payload.length }),
    requestHeader({ type: CMD.FLUSH, cookie: 4n }),
  ]);
  const run = async (pieces: Buffer[]) => {
    const out: Buffer[] = [];
    const sink: ReplySink = {
      write: (d) => { out.push(Buffer.from(d)); return true; },
      cork: () => {}, uncork: () => {}, destroyed: false, writableLength: 0, pause: () => {}, resume: () => {},
    };
    const store = new MemoryStore(SIZE);
    const exp = new MemoryExport('disk', store);
    const tr = new Transmission(sink, { export: exp, transmissionFlags: TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA, structuredReplies: false, baseAllocation: false },
      DEFAULT_TRANSMISSION_LIMITS, silentLogger, () => {});
    for (const p of pieces) {
      tr.onData(p);
      await sleep(0);
    }
    await tr.idle();
    return { out: byCookie(Buffer.concat(out)), data: store.read(100, payload.length) };
  };
  // Replies may come in any order (a refused request is answered at once): compare by cookie.
  const byCookie = (b: Buffer) => {
    const m: Array<[string, string]> = [];
    for (let p = 0; p < b.length;) {
      const cookie = b.readBigUInt64BE(p + 8);
      const n = cookie === 3n && b.readUInt32BE(p + 4) === 0 ? payload.length : 0;
      m.push([cookie.toString(), b.subarray(p, p + 16 + n).toString('hex')]);
      p += 16 + n;
    }
    return m.sort();
  };
  const whole = await run([stream]);
  t.equal(whole.out.length, 4, 'four replies');
  t.same(whole.data, [{ offset: 100, length: payload.length, data: payload }], 'the good WRITE landed');
  let mismatches = 0;
  for (let i = 1; i < stream.length; i++) {
    const r = await run([stream.subarray(0, i), stream.subarray(i)]);
    if (JSON.stringify(r.out) !== JSON.stringify(whole.out)) { mismatches++; t.fail(`split at ${i}: different replies`); }
  }
  t.equal(mismatches, 0, `all ${stream.length - 1} two-way splits give the same replies`);
  const bytes = [...stream].map((_, i) => stream.subarray(i, i + 1));
  t.same((await run(bytes)).out, whole.out, 'one byte at a time');
});

t.test('transient chunks (a socket buffer reused after each read): payloads and backlog are copied', async (t) => {
  // The export looks at WRITE data only after a delay, as a real store does.
  class LateExport extends MemoryExport {
    override async write(offset: number, data: Buffer): Promise<void> {
      await sleep(5);
      this.store.write(offset, data);
    }
  }
  const writes = Array.from({ length: 40 }, (_, i) => ({ offset: i * 128 * KiB, data: rand(i % 3 === 0 ? 70 * KiB : 4 * KiB) }));
  const stream = Buffer.concat(writes.flatMap((w, i) => [requestHeader({ type: CMD.WRITE, cookie: BigInt(i + 1), offset: w.offset, length: w.data.length }), w.data]));
  for (const limits of [DEFAULT_TRANSMISSION_LIMITS, { ...DEFAULT_TRANSMISSION_LIMITS, maxInflightRequests: 2 }]) {
    const replies: Buffer[] = [];
    let paused = false;
    const sink: ReplySink = {
      write: (d) => { replies.push(Buffer.from(d)); return true; },
      cork: () => {}, uncork: () => {}, destroyed: false, writableLength: 0, pause: () => { paused = true; }, resume: () => { paused = false; },
    };
    const store = new MemoryStore(SIZE);
    const tr = new Transmission(sink, { export: new LateExport('disk', store), transmissionFlags: TF.HAS_FLAGS | TF.SEND_FLUSH, structuredReplies: false, baseAllocation: false },
      limits, silentLogger, () => {});
    // One reused 64 KiB buffer, scribbled over after every call, as the socket reuses it.
    const reused = Buffer.alloc(64 * KiB);
    let sawPause = false;
    for (let pos = 0; pos < stream.length;) {
      while (paused) await sleep(1);
      const n = stream.copy(reused, 0, pos, Math.min(stream.length, pos + reused.length));
      tr.onData(reused.subarray(0, n), true);
      sawPause ||= paused;
      reused.fill(0xee);
      pos += n;
    }
    await tr.idle();
    const bad = writes.filter((w) => !store.bytes(w.offset, w.data.length).equals(w.data));
    t.equal(bad.length, 0, `every write landed intact (max ${limits.maxInflightRequests} in flight${sawPause ? ', paused with a backlog' : ''})`);
    t.equal(replies.length, writes.length, 'a reply per write');
    if (limits.maxInflightRequests === 2) t.ok(sawPause, 'the small cap paused the parser: the backlog path ran');
  }
});
