/**
 * The memory bounds of the transmission phase: WRITE payload buffers are
 * pooled and reused only after a write succeeded (common/buffer-pool.ts), and the
 * process-wide in-flight budget (inflight-budget.ts) admits requests in the
 * order they came, before a WRITE's payload is read, without ever deadlocking
 * on a request larger than itself.
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

t.test('InflightBudget: admits in order while requests fit; one larger than the limit runs alone', async (t) => {
  const b = new InflightBudget(100);
  const admitted: string[] = [];
  const w = (name: string) => ({ admitted: (bytes: number) => { admitted.push(`${name}:${bytes}`); } });
  t.ok(b.tryTake(60), 'fits: taken');
  t.notOk(b.tryTake(50), 'would pass the limit: refused, nothing taken');
  t.equal(b.used, 60);
  const big = w('big');
  const small = w('small');
  b.wait(big, 80);
  b.wait(small, 10);
  t.notOk(b.tryTake(10), 'refused while others wait, even though it fits: no overtaking');
  b.release(20);
  t.same(admitted, [], 'the head (80) does not fit yet, and the one behind it (10) waits its turn');
  b.release(40);
  t.same(admitted, ['big:80', 'small:10'], 'with room, both in the order they queued');
  t.equal(b.used, 90);
  b.release(90);
  t.ok(b.tryTake(1000), 'nothing in flight: a request larger than the whole budget is admitted');
  const gone = w('gone');
  const next = w('next');
  b.wait(gone, 500);
  b.wait(next, 5);
  b.forget(gone);
  t.equal(b.waiting, 1, 'a forgotten waiter leaves the queue');
  b.release(1000);
  t.same(admitted.slice(2), ['next:5'], 'and the one behind it is admitted when room comes');
  t.equal(b.used, 5);
  t.throws(() => new InflightBudget(0), RangeError, 'a budget must be positive');
});

/** A Transmission over a fake socket; replies are counted by cookie, the end reason kept. */
function transmission(exp: MemoryExport, budget: InflightBudget, payloadTimeoutMs?: number) {
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
  const ended: string[] = [];
  const tr = new Transmission(sink, neg, { ...DEFAULT_TRANSMISSION_LIMITS, budget, payloadTimeoutMs }, silentLogger, (reason) => { ended.push(reason); });
  return { tr, replies, ended, paused: () => paused };
}

/** A memory export whose writes wait until released, recording each payload buffer. */
class HeldExport extends MemoryExport {
  held: Array<{ offset: number; data: Buffer; done: (err?: Error) => void }> = [];
  override write(offset: number, data: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      this.held.push({ offset, data, done: (err) => { if (err) reject(err); else { this.store.write(offset, data); resolve(); } } });
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

t.test('budget: a WRITE waits for admission before its payload is read; connections are served in order', async (t) => {
  const budget = new InflightBudget(1 * MiB);
  const exp = new HeldExport('disk', new MemoryStore(SIZE));
  let maxUsed = 0;
  const write = exp.write.bind(exp);
  exp.write = (offset, data) => { maxUsed = Math.max(maxUsed, budget.used); return write(offset, data); };
  const a = transmission(exp, budget);
  const b = transmission(exp, budget);
  const payload = Buffer.alloc(512 * KiB, 0xa5);
  // A sends four 512 KiB writes in one stream: two fit in the budget.
  a.tr.onData(Buffer.concat([1n, 2n, 3n, 4n].flatMap((c) => writeChunks(c, Number(c) * MiB, payload, 1 * MiB))));
  await sleep(10);
  t.equal(exp.held.length, 2, 'two writes started; the third waits for the budget');
  t.ok(a.paused(), 'A stopped reading');
  t.equal(budget.waiting, 1, 'A queued with its third write');
  // B holds nothing, but A asked first: B queues behind A.
  b.tr.onData(Buffer.concat([10n, 11n].flatMap((c) => writeChunks(c, Number(c) * MiB, payload, 1 * MiB))));
  await sleep(10);
  t.equal(exp.held.length, 2, 'B did not overtake A');
  t.equal(budget.waiting, 2);
  exp.held.shift()!.done();
  await sleep(10);
  t.same(exp.held.map((h) => h.data.length), [512 * KiB, 512 * KiB], 'one released: A\'s third was admitted (its payload was read then)');
  t.equal(budget.waiting, 2, 'B waits, and A\'s fourth behind it');
  exp.held.shift()!.done();
  await sleep(10);
  t.same(exp.held.map((h) => h.offset), [3 * MiB, 10 * MiB], 'the next one released admits B\'s first, not A\'s fourth');
  while (exp.held.length > 0) {
    for (const h of exp.held.splice(0)) h.done();
    await sleep(10);
  }
  await Promise.all([a.tr.idle(), b.tr.idle()]);
  t.same([...a.replies.keys()].sort(), [1n, 2n, 3n, 4n], 'A got every reply');
  t.same([...a.replies.values()], [0, 0, 0, 0], 'all successful');
  t.same([...b.replies.keys()].sort(), [10n, 11n], 'B got every reply');
  t.ok(maxUsed <= 1 * MiB, `the budget was never passed (peak ${maxUsed / KiB} KiB)`);
  t.equal(budget.used, 0, 'the budget is empty again');
  t.notOk(a.paused() || b.paused(), 'both read again');
});

t.test('budget: a connection that ends while it waits leaves the queue; the next one goes on', async (t) => {
  const budget = new InflightBudget(512 * KiB);
  const exp = new HeldExport('disk', new MemoryStore(SIZE));
  const a = transmission(exp, budget);
  const b = transmission(exp, budget);
  const c = transmission(exp, budget);
  const payload = Buffer.alloc(512 * KiB, 0x5a);
  a.tr.onData(Buffer.concat(writeChunks(1n, 0, payload, 1 * MiB)));
  b.tr.onData(Buffer.concat(writeChunks(2n, 0, payload, 1 * MiB)).subarray(0, 100)); // header and a bit of payload
  c.tr.onData(Buffer.concat(writeChunks(3n, 0, payload, 1 * MiB)));
  t.equal(budget.waiting, 2, 'B and C wait behind A');
  b.tr.abandon();
  t.equal(budget.waiting, 1, 'B is gone from the queue');
  exp.held.shift()!.done();
  await sleep(10);
  t.equal(exp.held.length, 1, 'C was admitted when A finished');
  exp.held.shift()!.done();
  await Promise.all([a.tr.idle(), b.tr.idle(), c.tr.idle()]);
  t.equal(c.replies.get(3n), 0, 'C\'s write succeeded');
  t.equal(b.replies.size, 0, 'B never ran');
  t.equal(budget.used, 0);
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

t.test('budget: a client that stops in the middle of a WRITE payload is cut off, and its bytes go to the next', async (t) => {
  const budget = new InflightBudget(512 * KiB);
  const exp = new HeldExport('disk', new MemoryStore(SIZE));
  const a = transmission(exp, budget, 100);
  const b = transmission(exp, budget, 100);
  const payload = Buffer.alloc(512 * KiB, 0x77);
  a.tr.onData(Buffer.concat(writeChunks(1n, 0, payload, 1 * MiB)).subarray(0, 4096)); // header and part of the payload, then silence
  b.tr.onData(Buffer.concat(writeChunks(2n, 0, payload, 1 * MiB)));
  t.equal(budget.waiting, 1, 'B waits for the bytes A took');
  await sleep(60);
  t.same(a.ended, [], 'not before the timeout');
  await sleep(100);
  t.equal(a.ended.length, 1, 'A is cut off after the payload timeout');
  t.match(a.ended[0], /WRITE at offset 0: 4068 of its 524288 payload bytes arrived in [0-9.]+ s/);
  a.tr.abandon(); // what the connection does when the socket closes
  await sleep(5);
  t.equal(exp.held.length, 1, 'B was admitted');
  exp.held.shift()!.done();
  await b.tr.idle();
  t.equal(b.replies.get(2n), 0, 'and its write succeeded');
  t.same(b.ended, [], 'B, which sent its payload at once, was never cut off');
  t.equal(budget.used, 0);
});

t.test('payload timeout: WRITEs whose payloads each come in time are never cut off, however long the stream', async (t) => {
  const budget = new InflightBudget(64 * MiB);
  const exp = new MemoryExport('disk', new MemoryStore(SIZE));
  const a = transmission(exp, budget, 80);
  const payload = Buffer.alloc(64 * KiB, 0x42);
  for (let i = 1; i <= 8; i++) {
    const [head, ...rest] = writeChunks(BigInt(i), 0, payload, 32 * KiB);
    a.tr.onData(head!);
    await sleep(30); // each payload takes 30 ms, the whole stream 240 ms: three timeouts long
    for (const c of rest) a.tr.onData(c);
  }
  await a.tr.idle();
  t.same(a.ended, [], 'not cut off');
  t.equal(a.replies.size, 8, 'every write answered');
});

t.test('budget: READs wait for it too, FLUSH does not hold any of it', async (t) => {
  const budget = new InflightBudget(64 * KiB);
  const exp = new HeldExport('disk', new MemoryStore(SIZE));
  const reads: Array<() => void> = [];
  const read = exp.read.bind(exp);
  exp.read = (offset, length) => new Promise((resolve) => { reads.push(() => resolve(read(offset, length))); });
  const a = transmission(exp, budget);
  a.tr.onData(Buffer.concat([
    requestHeader({ type: CMD.READ, cookie: 1n, offset: 0, length: 64 * KiB }),
    requestHeader({ type: CMD.READ, cookie: 2n, offset: 0, length: 4 * KiB }),
    requestHeader({ type: CMD.FLUSH, cookie: 3n, offset: 0, length: 0 }),
  ]));
  t.equal(reads.length, 1, 'the first READ fills the budget; the second waits');
  t.equal(budget.waiting, 1);
  t.equal(budget.used, 64 * KiB);
  reads.shift()!();
  await sleep(5);
  t.equal(reads.length, 1, 'the second READ started once the first was answered');
  reads.shift()!();
  await a.tr.idle();
  t.same([...a.replies.keys()].sort(), [1n, 2n, 3n], 'every request answered, the FLUSH after the READ that waited');
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
