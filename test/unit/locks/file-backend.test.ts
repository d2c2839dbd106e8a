/**
 * The file lock (src/locks/file-backend.ts) in a temp directory, in one
 * process: layout and record format, exclusivity, release and compaction,
 * renewal, handover by request file, takeover only after lease + margin,
 * a paused owner (blocked event loop) that loses the lock before anyone may
 * take it, and the races of docs/locks.md driven step by step through the
 * backend API: two takers of one stale lease, a late renewal, a contender
 * that slept through several changes (resurrection), a release after a
 * takeover; breakLock, newer formats, and the FileBlocker not seeing any of it.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { openFileBlocker } from '../../../src/blockers/file.js';
import { LockBusyError, LockLostError } from '../../../src/locks/errors.js';
import { FileLockBackend, type FileLockOptions } from '../../../src/locks/file-backend.js';
import { RECORD_SIZE, decodeRecord, encodeRecord, type FileLockRecord } from '../../../src/locks/file-record.js';
import type { Acquirer, LockSink, ReleaseRequest } from '../../../src/locks/types.js';
import { VolumeLock, newToken } from '../../../src/locks/volume-lock.js';
import { tempDir } from '../../helpers/run.js';

const VOL = 'fedcba9876543210';
const FAST: FileLockOptions = { leaseMs: 300, renewMs: 50, marginMs: 60, pollMs: 10 };
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function lockOn(root: string, name: string, opts: FileLockOptions = FAST, onReleaseRequested?: () => void | Promise<void>) {
  const backend = new FileLockBackend(root, VOL, opts);
  const lock = new VolumeLock(backend, { identity: { node: name, instance: `${name}-i` }, onReleaseRequested });
  return { backend, lock };
}

/** A backend driven directly, with a sink that records what it hears. */
function bare(root: string, name: string, opts: FileLockOptions = FAST) {
  const backend = new FileLockBackend(root, VOL, opts);
  const heard = { lost: [] as LockLostError[], requests: [] as ReleaseRequest[], changed: 0, validity: [] as number[] };
  const sink: LockSink = {
    releaseRequested: (r) => (heard.requests.push(r), true),
    changed: () => void heard.changed++,
    lost: (e) => void heard.lost.push(e),
    validity: (u) => void heard.validity.push(u),
  };
  backend.attach(sink);
  const me = (): Acquirer => ({ node: name, instance: `${name}-i`, pid: process.pid, token: newToken(), since: Date.now() });
  return { backend, heard, me };
}

async function entries(dir: string): Promise<string[]> {
  return (await fs.readdir(dir)).filter((n) => !n.startsWith('~')).sort();
}

async function record(dir: string, seq: number): Promise<FileLockRecord> {
  const d = decodeRecord(await fs.readFile(path.join(dir, `e.${seq}`)), VOL, seq);
  if (!d.ok) throw new Error(d.why);
  return d.record;
}

t.test('record format: fixed size, JSON, round trip, rejects what it must', async (t) => {
  const r: FileLockRecord = {
    format: 'archipelago-lock', version: 1, volume: VOL, seq: 7, state: 'held', token: '0123456789abcdef',
    node: 'node-1', instance: 'abc123', pid: 42, since: 1700000000000, leaseMs: 10000, marginMs: 2000, renewMs: 2000,
    renewal: 3, reason: '',
  };
  const bytes = encodeRecord(r);
  t.equal(bytes.length, RECORD_SIZE);
  t.equal(bytes[RECORD_SIZE - 1], 0x0a, 'ends with a newline');
  t.match(bytes.toString(), /^\{"format":"archipelago-lock","version":1,"volume":"fedcba9876543210","seq":7,"state":"held"/);
  t.same(decodeRecord(bytes, VOL, 7), { ok: true, record: r });
  t.match(decodeRecord(bytes, VOL, 8), { ok: false, why: /seq 7, its name 8/ });
  t.match(decodeRecord(bytes, '0000000000000001', 7), { ok: false, why: /volume/ });
  t.match(decodeRecord(bytes.subarray(0, 100), VOL, 7), { ok: false, newerVersion: 0, why: /not a JSON record/ }, 'torn');
  const newer = Buffer.from(JSON.stringify({ format: 'archipelago-lock', version: 2 }));
  t.match(decodeRecord(newer, VOL, 7), { ok: false, newerVersion: 2, why: /version 2/ });
  t.throws(() => encodeRecord({ ...r, node: 'x'.repeat(600) }), RangeError, 'too long for a record');
});

t.test('layout: e.0 free (initial), e.1 held by the owner; owner(); release appends a free entry', async (t) => {
  const root = await tempDir(t);
  const a = lockOn(root, 'a');
  await a.lock.acquire();
  const dir = a.backend.dir;
  t.equal(dir, path.join(root, 'locks', `lock.${VOL}`));
  t.same(await entries(dir), ['e.0', 'e.1']);
  t.match(await record(dir, 0), { state: 'free', reason: 'initial', node: 'a' });
  const held = await record(dir, 1);
  t.match(held, { state: 'held', node: 'a', instance: 'a-i', pid: process.pid, token: a.lock.acquisition!.token, leaseMs: 300, marginMs: 60, renewMs: 50 });
  t.match(await a.lock.owner(), { node: 'a', instance: 'a-i', seq: 1, backend: 'file', token: held.token, leaseMs: 300 });
  t.ok(a.lock.validUntil > performance.now(), 'valid for a while');
  t.ok(a.lock.validUntil <= performance.now() + 300 - 60, 'at most lease − margin ahead');
  await a.lock.release();
  t.same(await entries(dir), ['e.0', 'e.1', 'e.2']);
  t.match(await record(dir, 2), { state: 'free', reason: 'released', node: 'a' });
  t.equal(await a.lock.owner(), null, 'nobody holds it');
  await a.lock.close();
});

t.test('exclusive; waiting contender gets it on release; compaction keeps head and head − 1', async (t) => {
  const root = await tempDir(t);
  const a = lockOn(root, 'a');
  const b = lockOn(root, 'b');
  await a.lock.acquire();
  await t.rejects(b.lock.acquire({ wait: false }), { code: 'ARCH_E_LOCK_BUSY', holder: { node: 'a' } });
  const got = b.lock.acquire();
  await sleep(30);
  await a.lock.release();
  await got;
  t.equal(b.lock.state, 'owner');
  t.match(await b.lock.owner(), { node: 'b', seq: 3 });
  for (let i = 0; i < 4; i++) {
    const next = i % 2 === 0 ? a : b;
    const cur = i % 2 === 0 ? b : a;
    await cur.lock.release();
    await next.lock.acquire();
  }
  await sleep(30); // compaction runs behind each change
  const names = await entries(a.backend.dir);
  t.same(names, ['e.10', 'e.11'], `only head − 1 and head remain: ${names.join(' ')}`);
  await b.lock.close();
  await a.lock.close();
});

t.test('renewal rewrites the entry in place and moves the deadline', async (t) => {
  const root = await tempDir(t);
  const a = lockOn(root, 'a');
  await a.lock.acquire();
  const first = a.lock.validUntil;
  const ino = (await fs.stat(path.join(a.backend.dir, 'e.1'))).ino;
  await sleep(200);
  const r = await record(a.backend.dir, 1);
  t.ok(r.renewal >= 2, `renewed ${r.renewal} times in 200 ms at a 50 ms interval`);
  t.equal((await fs.stat(path.join(a.backend.dir, 'e.1'))).ino, ino, 'same file (in place)');
  t.ok(a.lock.validUntil > first + 100, 'deadline moved on');
  t.equal(a.lock.state, 'owner');
  await a.lock.close();
});

t.test('handover by request file, with fs.watch off: the owner drains and releases, the requester owns it', async (t) => {
  const root = await tempDir(t);
  const opts = { ...FAST, watch: false, pollMs: 20 };
  let drained = 0;
  const a = lockOn(root, 'a', opts, async () => {
    drained++;
    await sleep(10);
  });
  const b = lockOn(root, 'b', opts);
  await a.lock.acquire();
  const start = performance.now();
  await b.lock.acquire({ requestHandover: true, wait: 2000 });
  const ms = performance.now() - start;
  t.equal(drained, 1);
  t.equal(a.lock.state, 'unlocked');
  t.equal(b.lock.state, 'owner');
  t.ok(ms < 300, `handover by polling took ${Math.round(ms)} ms (poll 20 ms)`);
  t.same((await entries(a.backend.dir)).filter((n) => n.startsWith('r.')), [], 'the request file was withdrawn');
  await b.lock.close();
  await a.lock.close();
});

t.test('a dead holder (stopped renewing) is taken over only after lease + margin unchanged', async (t) => {
  const root = await tempDir(t);
  const a = lockOn(root, 'a');
  const b = lockOn(root, 'b');
  await a.lock.acquire();
  await a.lock.destroy(); // a crash: no more renewals, the entry stays
  const start = performance.now();
  await b.lock.acquire({ wait: 5000 });
  const took = performance.now() - start;
  t.ok(took >= 300 + 60, `not before lease + margin: took ${Math.round(took)} ms`);
  t.ok(took < 2000, 'but soon after');
  t.match(await b.lock.owner(), { node: 'b', seq: 2 });
  await b.lock.close();
});

t.test('a paused owner (blocked event loop past its lease) is lost before anyone may write, then taken over', async (t) => {
  const root = await tempDir(t);
  const events: string[] = [];
  const a = lockOn(root, 'a');
  const b = lockOn(root, 'b');
  a.lock.on('lost', () => events.push('a lost'));
  b.lock.on('acquired', () => events.push('b owner'));
  await a.lock.acquire();
  const waiting = b.lock.acquire({ wait: 5000 });
  await sleep(100);
  t.ok(a.lock.checkHeld(), 'a holds it before the pause');
  // Freeze the whole process for longer than lease + margin (like SIGSTOP).
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 500);
  t.notOk(a.lock.checkHeld(), 'the first check after the pause refuses: the monotonic clock ran on');
  t.equal(a.lock.state, 'lost', 'lost at once, before any timer or I/O callback ran');
  events.push('a checked');
  await waiting;
  t.same(events, ['a lost', 'a checked', 'b owner'], 'a knew it was lost before b became owner');
  const r = await record(b.backend.dir, 1);
  t.equal(r.node, 'a');
  await sleep(100);
  t.equal((await record(b.backend.dir, 1)).renewal, r.renewal, 'the lost owner never renewed again');
  await a.lock.release();
  t.equal(a.lock.state, 'unlocked');
  t.match(await b.lock.owner(), { node: 'b' }, 'acknowledging the loss did not touch the new owner');
  await b.lock.close();
  await a.lock.close();
});

t.test('race: two takers of one stale lease, at the same moment: exactly one wins', async (t) => {
  const root = await tempDir(t);
  const a = bare(root, 'a');
  await a.backend.tryAcquire(a.me());
  await a.backend.stop();
  for (let round = 0; round < 5; round++) {
    const b = bare(root, 'b');
    const c = bare(root, 'c');
    const [mb, mc] = [b.me(), c.me()];
    const rb = await b.backend.tryAcquire(mb);
    const rc = await c.backend.tryAcquire(mc);
    if (rb.acquired || rc.acquired || !rb.holder || !rc.holder) throw new Error('expected busy');
    await sleep(300 + 60 + 5);
    t.same([(await b.backend.probe(rb.holder, mb, false)).liveness, (await c.backend.probe(rc.holder, mc, false)).liveness], ['dead', 'dead']);
    const [tb, tc] = await Promise.all([b.backend.takeOver(rb.holder, mb), c.backend.takeOver(rc.holder, mc)]);
    t.equal([tb.acquired, tc.acquired].filter(Boolean).length, 1, `round ${round}: one taker wins`);
    const winner = tb.acquired ? b : c;
    const loser = tb.acquired ? tc : tb;
    t.ok(!loser.acquired && loser.holder, 'the other sees the winner as the holder');
    await winner.backend.stop(); // the winner "dies" too: next round takes over from it
    await b.backend.close();
    await c.backend.close();
  }
});

t.test('race: a late renewal landing after the verdict makes the taker back out', async (t) => {
  const root = await tempDir(t);
  const a = bare(root, 'a');
  const b = bare(root, 'b');
  await a.backend.tryAcquire(a.me());
  await a.backend.stop();
  const mb = b.me();
  const r = await b.backend.tryAcquire(mb);
  if (r.acquired || !r.holder) throw new Error('expected busy');
  await sleep(300 + 60 + 5);
  t.equal((await b.backend.probe(r.holder, mb, false)).liveness, 'dead');
  // The old owner's renewal, issued long ago, lands now: e.1 changes.
  const file = path.join(a.backend.dir, 'e.1');
  const late = await record(a.backend.dir, 1);
  await fs.writeFile(file, encodeRecord({ ...late, renewal: late.renewal + 1 }));
  const took = await b.backend.takeOver(r.holder, mb);
  t.notOk(took.acquired, 'backed out');
  t.same(await entries(a.backend.dir), ['e.0', 'e.1'], 'its e.2 was removed again');
  await a.backend.close();
  await b.backend.close();
});

t.test('race: a contender that slept through several changes cannot resurrect a compacted entry', async (t) => {
  const root = await tempDir(t);
  const a = bare(root, 'a');
  const b = bare(root, 'b');
  await a.backend.tryAcquire(a.me()); // e.1 held by a
  await a.backend.stop();
  const mb = b.me();
  const r = await b.backend.tryAcquire(mb);
  if (r.acquired || !r.holder) throw new Error('expected busy');
  await sleep(300 + 60 + 5);
  t.equal((await b.backend.probe(r.holder, mb, false)).liveness, 'dead', 'b judges e.1 dead … and sleeps');
  // Meanwhile c takes over (e.2), releases (e.3), d takes (e.4), releases (e.5).
  const c = lockOn(root, 'c');
  await c.lock.acquire();
  await c.lock.release();
  const d = lockOn(root, 'd');
  await d.lock.acquire();
  await d.lock.release();
  await sleep(30);
  t.same(await entries(a.backend.dir), ['e.4', 'e.5'], 'e.1 … e.3 compacted away');
  // b wakes up and acts on its old verdict: links e.2, which no longer exists.
  const took = await b.backend.takeOver(r.holder, mb);
  t.notOk(took.acquired, 'the predecessor check catches it');
  t.same(await entries(a.backend.dir), ['e.4', 'e.5'], 'and the resurrected e.2 is gone again');
  t.equal(await c.lock.owner(), null, 'the lock is free, as e.5 says');
  await Promise.all([a.backend.close(), b.backend.close(), c.lock.close(), d.lock.close()]);
});

t.test('race: a release after a takeover reports the loss and touches nothing', async (t) => {
  const root = await tempDir(t);
  const a = bare(root, 'a');
  const b = bare(root, 'b');
  await a.backend.tryAcquire(a.me());
  await a.backend.stop(); // paused: no renewals
  const mb = b.me();
  const r = await b.backend.tryAcquire(mb);
  if (r.acquired || !r.holder) throw new Error('expected busy');
  await sleep(300 + 60 + 5);
  await b.backend.probe(r.holder, mb, false);
  t.ok((await b.backend.takeOver(r.holder, mb)).acquired, 'b took over');
  await t.rejects(a.backend.release(), { code: 'ARCH_E_LOCK_LOST', message: /taken over/ });
  t.match(await b.backend.owner(), { node: 'b', seq: 2 }, 'b still holds it');
  await sleep(30);
  t.same(await entries(a.backend.dir), ['e.1', 'e.2'], 'no entry of a (e.0 compacted)');
  await a.backend.close();
  await b.backend.close();
});

t.test('an owner superseded behind its back learns it at its next renewal', async (t) => {
  const root = await tempDir(t);
  const a = lockOn(root, 'a');
  const lost = new Promise<LockLostError>((r) => a.lock.once('lost', r));
  await a.lock.acquire();
  const r1 = await record(a.backend.dir, 1);
  await fs.writeFile(path.join(a.backend.dir, 'e.2'), encodeRecord({ ...r1, seq: 2, node: 'intruder', token: newToken() }));
  t.match(await lost, { message: /entry 2 exists/ });
  t.notOk(a.lock.checkHeld());
  await a.lock.close();
});

t.test('breakLock: never breaks a live lease; breaks a dead one after lease + margin', async (t) => {
  const root = await tempDir(t);
  const a = lockOn(root, 'a');
  const admin = lockOn(root, 'admin');
  t.equal(await admin.lock.breakLock(), null, 'nothing to break');
  await a.lock.acquire();
  const err = await admin.lock.breakLock({ timeoutMs: 500, force: true }).catch((e: unknown) => e);
  t.type(err, LockBusyError);
  t.match(err, { message: /alive, and a live lease is never broken on files/ });
  t.equal(a.lock.state, 'owner');
  await a.lock.destroy();
  const broken = await admin.lock.breakLock();
  t.match(broken, { node: 'a', seq: 1 });
  t.match(await record(a.backend.dir, 2), { state: 'free', reason: 'broken', node: 'admin' });
  t.equal(await admin.lock.owner(), null);
  await admin.lock.close();
});

t.test('an entry of a newer format is never judged stale', async (t) => {
  const root = await tempDir(t);
  const a = lockOn(root, 'a');
  await a.lock.acquire();
  await a.lock.release();
  await fs.writeFile(path.join(a.backend.dir, 'e.3'), JSON.stringify({ format: 'archipelago-lock', version: 2, volume: VOL, seq: 3 }).padEnd(511) + '\n');
  const b = lockOn(root, 'b');
  await t.rejects(b.lock.acquire({ wait: 600 }), LockBusyError, 'busy, and not taken over after lease + margin');
  await t.rejects(b.lock.breakLock(), { message: /format version 2; upgrade/ });
  await Promise.all([a.lock.close(), b.lock.close()]);
});

t.test('the file store does not see the lock: list() and removeTempFiles() skip it', async (t) => {
  const root = await tempDir(t);
  const blocker = await openFileBlocker(path.join(root, 'store'));
  const a = lockOn(blocker.root, 'a');
  await a.lock.acquire();
  await fs.writeFile(path.join(a.backend.dir, '~tmp.leftover'), 'x');
  const names: string[] = [];
  for await (const n of blocker.list('')) names.push(n);
  t.same(names, [], 'no object listed');
  await blocker.removeTempFiles(0);
  t.ok((await fs.readdir(a.backend.dir)).includes('~tmp.leftover'), 'the blocker does not sweep the lock directory');
  await a.lock.close();
  await blocker.close();
});

t.test('options are checked', async (t) => {
  t.throws(() => new FileLockBackend('/tmp', VOL, { leaseMs: 1000, marginMs: 200, renewMs: 500 }), RangeError, 'two renewals must fit');
  t.throws(() => new FileLockBackend('/tmp', VOL, { pollMs: 0 }), RangeError);
  const b = new FileLockBackend('/tmp', VOL);
  t.same([b.leaseMs, b.renewMs, b.marginMs, b.pollMs], [10_000, 2_000, 2_000, 100], 'defaults');
});
