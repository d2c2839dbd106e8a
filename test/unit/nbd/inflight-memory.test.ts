/**
 * The memory bounds of the transmission phase: WRITE payload buffers are
 * pooled and reused only after a write succeeded (common/buffer-pool.ts), and the
 * process-wide in-flight budget (inflight-budget.ts) pauses connections in
 * turn without ever deadlocking on a request larger than itself.
 */
import t from 'tap';
import { BufferPool } from '../../../src/common/buffer-pool.js';
import { InflightBudget } from '../../../src/nbd/inflight-budget.js';
import { Transmission, DEFAULT_TRANSMISSION_LIMITS, type ReplySink } from '../../../src/nbd/transmission.js';
import type { Negotiated } from '../../../src/nbd/handshake.js';
import { MemoryExport, MemoryStore } from '../../helpers/exports.js';
import { CMD, TF, requestHeader } from '../../helpers/nbd-encoder.js';
import { silentLogger } from '../../../src/common/log.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

t.test('BufferPool: reuse, exact lengths, foreign and double returns ignored, bounded', async (t) => {
  const pool = new BufferPool({ maxPooled: 1 * MiB, maxFreeBytes: 2 * MiB });
  const a = pool.take(100 * KiB);
  t.equal(a.length, 100 * KiB, 'exact length');
  t.equal(a.buffer.byteLength, 128 * KiB, 'on a buffer of its power-of-two class');
  pool.give(a);
  t.equal(pool.freeBytes, 128 * KiB, 'given back');
  const b = pool.take(70 * KiB);
  t.equal(b.buffer, a.buffer, 'the same class reuses the freed buffer');
  t.equal(pool.freeBytes, 0);
  pool.give(b);
  pool.give(b);
  t.equal(pool.freeBytes, 128 * KiB, 'a second give of the same buffer is ignored');
  pool.give(Buffer.allocUnsafeSlow(128 * KiB));
  t.equal(pool.freeBytes, 128 * KiB, 'a buffer that did not come from take() is ignored');
  const big = pool.take(2 * MiB);
  pool.give(big);
  t.equal(pool.freeBytes, 128 * KiB, 'buffers over maxPooled are never kept');
  const many = [1, 2, 3, 4].map(() => pool.take(1 * MiB));
  for (const m of many) pool.give(m);
  t.ok(pool.freeBytes <= 2 * MiB, `free bytes stay within maxFreeBytes (${pool.freeBytes})`);
  const reads = new BufferPool({ minPooled: 64 * KiB });
  const small = reads.take(4 * KiB);
  reads.give(small);
  t.equal(reads.freeBytes, 0, 'below minPooled: a plain buffer, never pooled');
  const large = reads.take(64 * KiB);
  reads.give(large);
  t.equal(reads.freeBytes, 64 * KiB, 'from minPooled on: pooled');
});

t.test('InflightBudget: wakes paused connections in the order they paused, while there is room', async (t) => {
  const b = new InflightBudget(100);
  const woken: string[] = [];
  const w = (name: string, takes: number) => ({ checkPressure: () => { woken.push(name); b.take(takes); } });
  b.take(150);
  t.ok(b.exhausted);
  const one = w('one', 60);
  const two = w('two', 0);
  const three = w('three', 0);
  b.wait(one);
  b.wait(two);
  b.wait(one); // keeps its place
  b.wait(three);
  b.release(100);
  t.same(woken, ['one'], 'the first waiter resumes and fills the budget again; the others keep waiting');
  b.release(60);
  t.same(woken, ['one', 'two', 'three'], 'then the others, in order');
  t.equal(b.used, 50);
});

/** A Transmission over a fake socket; replies are counted by cookie. */
function transmission(exp: MemoryExport, budget: InflightBudget) {
  const replies = new Map<bigint, number>();
  let paused = false;
  const sink: ReplySink = {
    write: (d) => {
      for (let p = 0; p + 16 <= d.length; p += 16) {
        if (d.readUInt32BE(p) !== 0x67446698) break;
        replies.set(d.readBigUInt64BE(p + 8), d.readUInt32BE(p + 4));
      }
      return true;
    },
    cork: () => {}, uncork: () => {}, destroyed: false, writableLength: 0,
    pause: () => { paused = true; }, resume: () => { paused = false; },
  };
  const neg = { export: exp, transmissionFlags: TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA, structuredReplies: false, baseAllocation: false } as Negotiated;
  const tr = new Transmission(sink, neg, { ...DEFAULT_TRANSMISSION_LIMITS, budget }, silentLogger, () => {});
  return { tr, replies, paused: () => paused };
}

/** A memory export whose writes wait until released, recording each payload buffer. */
class HeldExport extends MemoryExport {
  held: Array<{ data: Buffer; done: (err?: Error) => void }> = [];
  override write(offset: number, data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      this.held.push({ data, done: (err) => { if (err) reject(err); else { this.store.write(offset, data); resolve(); } } });
    });
  }
}

/** WRITE request bytes, header and payload, cut into `chunk`-byte socket chunks. */
function writeChunks(cookie: bigint, offset: number, payload: Buffer, chunk: number): Buffer[] {
  const all = Buffer.concat([requestHeader({ type: CMD.WRITE, cookie, offset, length: payload.length }), payload]);
  const out: Buffer[] = [];
  for (let p = 0; p < all.length; p += chunk) out.push(all.subarray(p, p + chunk));
  return out;
}

t.test('budget: connections pause when it is exhausted and resume as it drains; no request is lost', async (t) => {
  const budget = new InflightBudget(1 * MiB);
  const exp = new HeldExport('disk', new MemoryStore(SIZE));
  const a = transmission(exp, budget);
  const b = transmission(exp, budget);
  const payload = Buffer.alloc(512 * KiB, 0xa5);
  // A sends three 512 KiB writes in one stream: the third passes the budget.
  a.tr.onData(Buffer.concat([1n, 2n, 3n, 4n].flatMap((c) => writeChunks(c, Number(c) * MiB, payload, 1 * MiB))));
  await sleep(10);
  t.equal(exp.held.length, 3, 'three writes started; the fourth waits behind the exhausted budget');
  t.ok(a.paused(), 'A is paused');
  // B holds nothing: it may always start one request, however full the budget.
  b.tr.onData(Buffer.concat([10n, 11n].flatMap((c) => writeChunks(c, Number(c) * MiB, payload, 1 * MiB))));
  await sleep(10);
  t.equal(exp.held.length, 4, 'B started one write (progress for a connection holding nothing)');
  t.ok(b.paused(), 'B is paused for its second');
  for (const h of exp.held.splice(0)) h.done();
  await sleep(10);
  t.equal(exp.held.length, 2, 'as the budget drained, A then B resumed: each started its next write');
  for (const h of exp.held.splice(0)) h.done();
  await Promise.all([a.tr.idle(), b.tr.idle()]);
  t.same([...a.replies.keys()].sort(), [1n, 2n, 3n, 4n], 'A got every reply');
  t.same([...b.replies.keys()].sort(), [10n, 11n], 'B got every reply');
  t.equal(budget.used, 0, 'the budget is empty again');
});

t.test('budget: a write larger than the whole budget, in many chunks, completes (no deadlock)', async (t) => {
  const budget = new InflightBudget(64 * KiB);
  const store = new MemoryStore(SIZE);
  const a = transmission(new MemoryExport('disk', store), budget);
  const payload = Buffer.alloc(4 * MiB, 0x3c);
  for (const c of writeChunks(7n, 0, payload, 64 * KiB)) a.tr.onData(c);
  await a.tr.idle();
  t.equal(a.replies.get(7n), 0, 'the write succeeded');
  t.same(Buffer.concat(store.read(0, 4 * MiB).map((p) => p.data ?? Buffer.alloc(p.length))), payload, 'data landed');
  t.equal(budget.used, 0);
});

t.test('payload buffers: reused after a successful write, never after a failed one', async (t) => {
  const budget = new InflightBudget(64 * MiB);
  const exp = new HeldExport('disk', new MemoryStore(SIZE));
  const a = transmission(exp, budget);
  const payload = Buffer.alloc(256 * KiB, 0x11);
  const send = (cookie: bigint) => { for (const c of writeChunks(cookie, 0, payload, 64 * KiB)) a.tr.onData(c); };
  send(1n);
  const first = exp.held.shift()!;
  t.equal(first.data.length, payload.length, 'a payload over several chunks is gathered');
  first.done(Object.assign(new Error('injected'), { code: 'ETIMEDOUT' }));
  await sleep(5);
  t.not(a.replies.get(1n), 0, 'the failed write got an error');
  send(2n);
  const second = exp.held.shift()!;
  t.not(second.data.buffer, first.data.buffer, 'the buffer of a failed write is not reused (a late operation may still read it)');
  second.done();
  await sleep(5);
  t.equal(a.replies.get(2n), 0);
  send(3n);
  const third = exp.held.shift()!;
  t.equal(third.data.buffer, second.data.buffer, 'the buffer of a successful write is reused');
  t.same(third.data, payload, 'and holds the new payload');
  third.done();
  await a.tr.idle();
});
