/**
 * The VolumeLock state machine (src/locks/volume-lock.ts, table in
 * state.ts) on the in-memory backend: one test per path through the
 * diagram — acquire/release, busy, wait and timeout, wake on release,
 * handover (accepted, declined, coalesced), takeover of a dead holder with
 * fencing, unresponsive holders left alone, loss (fenced, lease, failed
 * release) and its acknowledgement, aborts, close/destroy, breakLock, the
 * write-path checks and the diagnostics channels.
 */
import dc from 'node:diagnostics_channel';
import t from 'tap';
import {
  LockAbortedError, LockBusyError, LockLostError, LockNotHeldError, LockStateError,
} from '../../../src/locks/errors.js';
import { MemoryLockBackend, MemoryLockTable, type MemoryLockOptions } from '../../../src/locks/memory-backend.js';
import { TRANSITIONS, checkTransition } from '../../../src/locks/state.js';
import { LockState, type ReleaseRequest } from '../../../src/locks/types.js';
import {
  VolumeLock, lockAcquiredChannel, lockStateChannel, type LockStateChange, type VolumeLockOptions,
} from '../../../src/locks/volume-lock.js';

const VOL = '0123456789abcdef';

function node(table: MemoryLockTable, name: string, opts: MemoryLockOptions = {}, lockOpts: Partial<VolumeLockOptions> = {}) {
  const backend = new MemoryLockBackend(table, VOL, { client: name, pollMs: 10, ...opts });
  const lock = new VolumeLock(backend, { identity: { node: name, instance: `${name}-1` }, ...lockOpts });
  const states: string[] = [];
  lock.on('state', (c: LockStateChange) => states.push(c.to));
  return { backend, lock, states };
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

t.test('the transition table: allowed moves pass, every other throws LockStateError', async (t) => {
  const all = Object.values(LockState);
  let allowed = 0;
  for (const from of all) {
    for (const to of all) {
      if (TRANSITIONS[from].includes(to)) {
        checkTransition(VOL, from, to);
        allowed++;
      } else {
        t.throws(() => checkTransition(VOL, from, to), LockStateError, `${from} → ${to} is illegal`);
      }
    }
  }
  t.equal(allowed, 9, 'nine legal moves');
});

t.test('acquire a free lock, then release: unlocked → acquiring → owner → releasing → unlocked', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  t.equal(a.lock.state, 'unlocked');
  t.notOk(a.lock.checkHeld(), 'not held before acquire');
  await a.lock.acquire();
  t.equal(a.lock.state, 'owner');
  t.ok(a.lock.checkHeld(), 'checkHeld: owner');
  t.equal(a.lock.validUntil, Infinity, 'no lease on this backend: valid until told otherwise');
  a.lock.assertHeld();
  t.match(await a.lock.owner(), { node: 'a', instance: 'a-1', pid: process.pid, backend: 'memory' });
  t.equal(table.holder(VOL)?.token, a.lock.acquisition?.token, 'the table holds our token');
  await a.lock.release();
  t.same(a.states, ['acquiring', 'owner', 'releasing', 'unlocked']);
  t.equal(table.holder(VOL), null);
  t.throws(() => a.lock.assertHeld(), LockNotHeldError);
  t.equal(a.lock.validUntil, -Infinity);
  await a.lock.release();
  t.same(a.states, ['acquiring', 'owner', 'releasing', 'unlocked'], 'release when unlocked does nothing');
});

t.test('concurrent acquires join one action; acquire when owner resolves at once', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const p1 = a.lock.acquire();
  const p2 = a.lock.acquire();
  await Promise.all([p1, p2]);
  t.same(a.backend.calls, ['tryAcquire'], 'one attempt for two calls');
  await a.lock.acquire();
  t.same(a.backend.calls, ['tryAcquire'], 'already owner: no attempt');
  t.same(a.states, ['acquiring', 'owner']);
});

t.test('busy, no wait: LockBusyError naming the holder, back to unlocked', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const b = node(table, 'b');
  await a.lock.acquire();
  const err = await b.lock.acquire({ wait: false }).catch((e: unknown) => e);
  t.type(err, LockBusyError);
  t.match(err, { code: 'ARCH_E_LOCK_BUSY', holder: { node: 'a', instance: 'a-1' }, message: /held by node a \(instance a-1/ });
  t.same(b.states, ['acquiring', 'unlocked']);
  t.equal(a.lock.state, 'owner', 'the holder keeps it');
});

t.test('wait with a timeout gives up after it', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const b = node(table, 'b');
  await a.lock.acquire();
  const start = performance.now();
  await t.rejects(b.lock.acquire({ wait: 120 }), LockBusyError);
  const took = performance.now() - start;
  t.ok(took >= 110 && took < 1000, `gave up after ${Math.round(took)} ms`);
  t.ok(b.backend.calls.filter((c) => c === 'tryAcquire').length >= 3, 'retried meanwhile');
});

t.test('a waiter is woken by the release (no poll interval to sit out)', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const b = node(table, 'b', { pollMs: 10_000 });
  await a.lock.acquire();
  const got = b.lock.acquire();
  await sleep(30);
  t.equal(b.lock.state, 'acquiring');
  const released = performance.now();
  await a.lock.release();
  await got;
  t.ok(performance.now() - released < 500, 'acquired right after the release, not after pollMs');
  t.equal(b.lock.state, 'owner');
});

t.test('handover: the owner drains in its handler, releases, the requester owns it; never two owners', async (t) => {
  const table = new MemoryLockTable();
  const requests: ReleaseRequest[] = [];
  const order: string[] = [];
  const a = node(table, 'a', {}, {
    onReleaseRequested: async (req) => {
      requests.push(req);
      order.push('drain');
      t.equal(a.lock.state, 'owner', 'still the owner while draining');
      await sleep(20);
      order.push('drained');
    },
  });
  const b = node(table, 'b');
  let overlap = false;
  const check = () => { if (a.lock.checkHeld() && b.lock.checkHeld()) overlap = true; };
  a.lock.on('state', check);
  b.lock.on('state', check);
  a.lock.on('released', () => order.push('a released'));
  b.lock.on('acquired', () => order.push('b acquired'));
  await a.lock.acquire();
  await b.lock.acquire({ requestHandover: true, wait: 5000 });
  t.same(order, ['drain', 'drained', 'a released', 'b acquired']);
  t.equal(requests.length, 1, 'one request handled');
  t.match(requests[0], { from: { node: 'b', instance: 'b-1' } });
  t.equal(a.lock.state, 'unlocked');
  t.equal(b.lock.state, 'owner');
  t.notOk(overlap, 'at no state change were both owners');
  t.same(a.states, ['acquiring', 'owner', 'releasing', 'unlocked']);
});

t.test('handover requests while one is handled are coalesced', async (t) => {
  const table = new MemoryLockTable();
  let handled = 0;
  let finish!: () => void;
  const a = node(table, 'a', {}, {
    onReleaseRequested: () => {
      handled++;
      return new Promise<void>((r) => (finish = r));
    },
  });
  const b = node(table, 'b');
  const c = node(table, 'c');
  await a.lock.acquire();
  const pb = b.lock.acquire({ requestHandover: true });
  const pc = c.lock.acquire({ requestHandover: true });
  await sleep(60);
  t.equal(handled, 1, 'the handler ran once for repeated requests from two nodes');
  finish();
  await Promise.race([pb, pc]);
  t.equal([b.lock.state, c.lock.state].filter((s) => s === 'owner').length, 1, 'one of them owns it');
  const last = b.lock.state === 'owner' ? b : c;
  await last.lock.release();
  await Promise.all([pb, pc]);
  await b.lock.release();
  await c.lock.release();
});

t.test('handover declined: no handler, or a handler that rejects', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const b = node(table, 'b');
  await a.lock.acquire();
  const seen: ReleaseRequest[] = [];
  a.lock.on('releaseRequested', (r: ReleaseRequest) => seen.push(r));
  const err = await b.lock.acquire({ requestHandover: true, wait: 80 }).catch((e: unknown) => e);
  t.match(err, { code: 'ARCH_E_LOCK_BUSY', message: /declined/ });
  t.ok(seen.length >= 1, 'the owner heard the requests (event) but had no handler');
  t.equal(a.lock.state, 'owner');

  let calls = 0;
  a.lock.onReleaseRequested = async () => {
    if (++calls === 1) throw new Error('busy snapshotting');
  };
  await b.lock.acquire({ requestHandover: true, wait: 2000 });
  t.equal(calls, 2, 'the first request was declined by the handler, the next accepted');
  t.equal(b.lock.state, 'owner');
});

t.test('a dead holder is fenced, then broken, then taken over; it learns it lost the lock', async (t) => {
  const table = new MemoryLockTable();
  const lostErrors: LockLostError[] = [];
  const a = node(table, 'a', {}, { onLost: (e) => lostErrors.push(e) });
  const b = node(table, 'b');
  const acquired: unknown[] = [];
  b.lock.on('acquired', (x: unknown) => acquired.push(x));
  await a.lock.acquire();
  a.backend.liveness = 'dead';
  await b.lock.acquire({ wait: false });
  t.equal(b.lock.state, 'owner', 'taken over without waiting: the store can tell it is dead');
  t.same(b.backend.calls, ['tryAcquire', 'probe', 'takeOver', 'tryAcquire'], 'probe → fence and break → attempt');
  t.match(acquired, [{ takeover: true, handover: false }]);
  t.ok(table.fencedClients.has('a'), "a's client is fenced");
  await sleep(10);
  t.equal(a.lock.state, 'lost', 'a learns of it (a watch error)');
  t.notOk(a.lock.checkHeld());
  t.throws(() => a.lock.assertHeld(), { code: 'ARCH_E_LOCK_LOST', fenced: true });
  t.equal(lostErrors.length, 1, 'onLost told once');
  t.same(a.states, ['acquiring', 'owner', 'lost']);

  // Lost is sticky until acknowledged.
  await t.rejects(a.lock.acquire(), LockLostError, 'acquire while lost rejects with the loss');
  await a.lock.release();
  t.equal(a.lock.state, 'unlocked', 'release() acknowledges the loss');
  t.equal(table.holder(VOL)?.node, 'b', 'and does not touch the new owner');
  // A fenced client stays fenced: it must reconnect.
  await t.rejects(a.lock.acquire({ wait: false }), { code: 'ARCH_E_LOCK_LOST', fenced: true });
  t.equal(a.lock.state, 'unlocked');
});

t.test('no takeover when not asked, nor of an unresponsive holder', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const b = node(table, 'b');
  await a.lock.acquire();
  a.backend.liveness = 'dead';
  await t.rejects(b.lock.acquire({ wait: 50, takeOverDead: false }), LockBusyError, 'takeOverDead: false');
  t.notOk(b.backend.calls.includes('takeOver'));
  a.backend.liveness = 'unresponsive';
  const err = await b.lock.acquire({ wait: 60 }).catch((e: unknown) => e);
  t.match(err, { code: 'ARCH_E_LOCK_BUSY', message: /unresponsive/ });
  t.notOk(b.backend.calls.includes('takeOver'), 'an unresponsive holder is waited for, never fenced');
  t.equal(a.lock.state, 'owner');
});

t.test('lease: checkHeld() turns false when the deadline passes, before any timer', async (t) => {
  const table = new MemoryLockTable();
  let clock = 1000;
  const now = () => clock;
  const a = node(table, 'a', { leaseMs: 500, now }, { now });
  await a.lock.acquire();
  t.equal(a.lock.validUntil, 1500);
  clock = 1499;
  t.ok(a.lock.checkHeld(), 'valid 1 ms before the deadline');
  a.backend.renew();
  t.equal(a.lock.validUntil, 1999, 'a renewal moves the deadline');
  clock = 1999;
  t.notOk(a.lock.checkHeld(), 'not at the deadline');
  t.equal(a.lock.state, 'lost', 'and the state is lost at once');
  t.match(a.lock.lostError, { message: /lease expired/ });
  t.equal(a.lock.validUntil, -Infinity);
  await a.lock.release();
  t.equal(a.lock.state, 'unlocked');
});

t.test('lease: the timer turns an owner that stops renewing lost', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a', { leaseMs: 60 });
  const lost = new Promise((r) => a.lock.once('lost', r));
  await a.lock.acquire();
  const renewals = setInterval(() => a.backend.renew(), 20);
  await sleep(150);
  t.equal(a.lock.state, 'owner', 'renewed every 20 ms: still owner');
  clearInterval(renewals);
  await lost;
  t.equal(a.lock.state, 'lost', 'no renewal for the lease: lost');
  await a.lock.close();
});

t.test('release() aborts a waiting acquisition; so does an AbortSignal', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const b = node(table, 'b');
  await a.lock.acquire();
  const p = b.lock.acquire();
  await sleep(30);
  await b.lock.release();
  await t.rejects(p, LockAbortedError);
  t.equal(b.lock.state, 'unlocked');

  const ac = new AbortController();
  const q = b.lock.acquire({ signal: ac.signal });
  await sleep(30);
  ac.abort();
  await t.rejects(q, { code: 'ARCH_E_LOCK_ABORTED' });
  t.same(b.states, ['acquiring', 'unlocked', 'acquiring', 'unlocked']);
  await t.rejects(b.lock.acquire({ signal: AbortSignal.abort() }), LockAbortedError, 'an aborted signal: no attempt');
});

t.test('aborted while the attempt that succeeds is in flight: the lock is given back', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  a.backend.delay('tryAcquire', 50);
  const p = a.lock.acquire();
  await sleep(10);
  const r = a.lock.release();
  await t.rejects(p, LockAbortedError);
  await r;
  t.equal(table.holder(VOL), null, 'not left held');
  t.equal(a.lock.state, 'unlocked');
});

t.test('a backend error during acquire: unlocked, the error as it is', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const boom = Object.assign(new Error('EIO'), { code: 'EIO' });
  a.backend.failNext('tryAcquire', boom);
  await t.rejects(a.lock.acquire(), boom);
  t.equal(a.lock.state, 'unlocked');
  await a.lock.acquire();
  t.equal(a.lock.state, 'owner', 'and a retry works');
});

t.test('a release that fails: lost, then unlocked, rejecting with LockLostError', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  await a.lock.acquire();
  a.backend.failNext('release', Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' }));
  await t.rejects(a.lock.release(), { code: 'ARCH_E_LOCK_LOST', message: /release failed: timed out/ });
  t.same(a.states, ['acquiring', 'owner', 'releasing', 'lost', 'unlocked']);
  t.equal(table.holder(VOL), null, 'abandon() cleaned up what it could');
});

t.test('reportFenced and verify() turn the owner lost', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  await a.lock.acquire();
  a.lock.reportFenced(Object.assign(new Error('write: ESHUTDOWN'), { errno: 108 }));
  t.equal(a.lock.state, 'lost');
  t.match(a.lock.lostError, { fenced: true });
  await a.lock.release();

  const b = node(table, 'b');
  await b.lock.acquire();
  await b.lock.verify();
  t.pass('verify passes while held');
  table.slot(VOL).held = null; // broken behind its back
  await t.rejects(b.lock.verify(), LockLostError);
  t.equal(b.lock.state, 'lost');
});

t.test('close releases and closes; destroy leaves the lock behind like a crash', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  await a.lock.acquire();
  await Promise.all([a.lock.close(), a.lock.close()]);
  t.equal(a.lock.state, 'closed');
  t.equal(table.holder(VOL), null, 'released at close');
  await t.rejects(a.lock.acquire(), LockStateError, 'closed for good');
  t.same(a.states, ['acquiring', 'owner', 'releasing', 'unlocked', 'closed']);

  const b = node(table, 'b');
  const c = node(table, 'c');
  await b.lock.acquire();
  await b.lock.destroy();
  t.equal(b.lock.state, 'closed');
  t.equal(table.holder(VOL)?.node, 'b', 'destroy does not release');
  await c.lock.acquire({ wait: false });
  t.equal(c.lock.state, 'owner', 'the next one takes over from the "crashed" holder');
  t.ok(table.fencedClients.has('b'));
});

t.test('breakLock: refuses a live holder unless forced, refuses our own lock', async (t) => {
  const table = new MemoryLockTable();
  const a = node(table, 'a');
  const admin = node(table, 'admin');
  t.equal(await admin.lock.breakLock(), null, 'nothing to break');
  await a.lock.acquire();
  await t.rejects(admin.lock.breakLock(), { code: 'ARCH_E_LOCK_BUSY', message: /alive; force/ });
  await t.rejects(a.lock.breakLock(), LockStateError, 'the owner cannot break its own lock');
  const broken = await admin.lock.breakLock({ force: true });
  t.match(broken, { node: 'a' }, 'returns whom it broke');
  t.equal(table.holder(VOL), null);
  await sleep(10);
  t.equal(a.lock.state, 'lost', 'the broken holder was fenced and knows');
});

t.test('diagnostics channels: state changes and acquisitions', async (t) => {
  const table = new MemoryLockTable();
  const changes: LockStateChange[] = [];
  const acquired: unknown[] = [];
  const onState = (m: unknown) => changes.push(m as LockStateChange);
  const onAcq = (m: unknown) => acquired.push(m);
  dc.subscribe('archipelago:lock:state', onState);
  dc.subscribe('archipelago:lock:acquired', onAcq);
  t.teardown(() => {
    dc.unsubscribe('archipelago:lock:state', onState);
    dc.unsubscribe('archipelago:lock:acquired', onAcq);
  });
  t.equal(lockStateChannel.name, 'archipelago:lock:state');
  t.equal(lockAcquiredChannel.name, 'archipelago:lock:acquired');
  const a = node(table, 'a', {}, { onReleaseRequested: () => undefined });
  const b = node(table, 'b');
  await a.lock.acquire();
  await b.lock.acquire({ requestHandover: true });
  t.match(changes.map((c) => `${c.from}>${c.to}`), ['unlocked>acquiring', 'acquiring>owner', 'unlocked>acquiring', 'owner>releasing', 'releasing>unlocked', 'acquiring>owner']);
  t.match(acquired, [{ volumeId: VOL, handover: false }, { volumeId: VOL, handover: true, takeover: false }]);
  t.ok(changes.every((c) => c.volumeId === VOL && typeof c.reason === 'string'));
});

t.test('a lock that flips between two owners many times never has two at once', async (t) => {
  const table = new MemoryLockTable();
  const locks = ['a', 'b', 'c'].map((n) => node(table, n, {}, { onReleaseRequested: () => sleep(1) }));
  let overlaps = 0;
  for (const l of locks) {
    l.lock.on('state', () => {
      if (locks.filter((x) => x.lock.state === 'owner').length > 1) overlaps++;
    });
  }
  const rounds = 30;
  await Promise.all(locks.map(async (l, i) => {
    for (let r = 0; r < rounds; r++) {
      await l.lock.acquire({ requestHandover: (r + i) % 2 === 0 });
      await sleep(1);
      if (r % 3 === 0) await l.lock.release();
    }
    await l.lock.release();
  }));
  t.equal(overlaps, 0, 'no state change ever showed two owners');
});

t.test('a handover request reaching us in the last moment of our acquisition is handled once we own it', async (t) => {
  const table = new MemoryLockTable();
  class SlowEnd extends MemoryLockBackend {
    override async acquireEnded(): Promise<void> {
      await sleep(60);
    }
  }
  let handled = 0;
  const a = new VolumeLock(new SlowEnd(table, VOL, { client: 'a', pollMs: 10 }), {
    identity: { node: 'a', instance: 'a' },
    onReleaseRequested: () => void handled++,
  });
  const b = node(table, 'b');
  const pa = a.acquire();
  await sleep(20);
  t.equal(a.state, 'acquiring', 'a holds it in the table but is not owner yet');
  await b.lock.acquire({ requestHandover: true, wait: 2000 });
  await pa;
  t.equal(handled, 1, "a's handler ran once it was owner");
  t.equal(b.lock.state, 'owner');
  t.equal(a.state, 'unlocked');
});
