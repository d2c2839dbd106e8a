/**
 * src/blockers/timeout.ts, driven by the fault injector (faulty.ts) over the
 * memory blocker: bounded operations, and the fence that keeps a write which
 * timed out but lands later from overtaking anything newer on its object.
 *
 *   timeout ──▶ faulty ──▶ memory
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { FaultController, faultyBlocker } from '../../../src/blockers/faulty.js';
import { withTimeouts } from '../../../src/blockers/timeout.js';
import type { Blocker } from '../../../src/blockers/blocker.js';

const MS = 100;
/** Upper bounds allow for a loaded CI machine; an unbounded wait still fails them (the hung op never settles). */
const SLACK = 1500;

function setup(timeoutMs = MS) {
  const inner = new MemoryBlocker();
  const faults = new FaultController();
  const b = withTimeouts(faultyBlocker(inner, faults), { timeoutMs });
  t.teardown(() => { faults.clear({ release: 'fail' }); });
  return { inner, faults, b };
}

const elapsed = async <T>(p: Promise<T>): Promise<{ ms: number; value?: T; err?: { code?: string; message?: string } }> => {
  const start = Date.now();
  try {
    const value = await p;
    return { ms: Date.now() - start, value };
  } catch (err) {
    return { ms: Date.now() - start, err: err as { code?: string } };
  }
};

const content = async (b: Blocker, name: string) => (await b.readFull(name)).toString();

t.test('in time: results and errors pass through unchanged', async (t) => {
  const { b } = setup();
  await b.write('x', 0, Buffer.from('abc'));
  t.equal(await content(b, 'x'), 'abc');
  await t.rejects(b.stat('nope'), { code: 'ENOENT' });
  const target = Buffer.alloc(3);
  t.equal(await b.read('x', 0, 3, target), 3);
  t.same(b.stats().timedOut.read, 0);
});

t.test('a hung operation fails ETIMEDOUT in bounded time', async (t) => {
  const { b, faults } = setup();
  faults.addRule({ ops: ['readFull'], hang: true });
  await b.write('x', 0, Buffer.from('abc'));
  const r = await elapsed(b.readFull('x'));
  t.equal(r.err?.code, 'ETIMEDOUT');
  t.match(r.err?.message, /no answer from the memory store within 100 ms/);
  t.ok(r.ms >= MS - 5 && r.ms < MS + SLACK, `failed after ${r.ms} ms`);
  t.equal(b.stats().timedOut.readFull, 1);
  t.equal(b.stats().late, 1, 'still running below');
  t.equal(b.stats().fencedObjects, 0, 'a late read fences nothing');
  await b.write('x', 0, Buffer.from('def')); // not fenced
  faults.clear();
  await new Promise((r) => setTimeout(r, 10));
  t.equal(b.stats().late, 0);
  t.equal(b.stats().lateSettled, 1);
});

t.test('a late write fences its object: later calls wait, fail in bounded time, are never issued', async (t) => {
  const { b, inner, faults } = setup();
  await b.write('d.1', 0, Buffer.from('old'));
  faults.addRule({ ops: ['write'], prefix: 'd.1', hang: true, limit: 1 });
  const w1 = await elapsed(b.write('d.1', 0, Buffer.from('AAA')));
  t.equal(w1.err?.code, 'ETIMEDOUT', 'the first write times out');
  t.ok(b.isFenced('d.1'));
  t.equal(b.stats().fencedObjects, 1);

  const writesBefore = inner.calls.write;
  const w2 = await elapsed(b.write('d.1', 0, Buffer.from('BBB')));
  t.equal(w2.err?.code, 'ETIMEDOUT', 'a newer write waits at the fence and times out');
  t.match(w2.err?.message, /fenced/);
  t.ok(w2.ms < MS + SLACK, `in bounded time (${w2.ms} ms)`);
  const r = await elapsed(b.readFull('d.1'));
  t.equal(r.err?.code, 'ETIMEDOUT', 'reads wait too');
  t.equal(inner.calls.write, writesBefore, 'nothing was issued to the store');
  t.equal(b.stats().fenceWaits, 2);

  await b.write('d.2', 0, Buffer.from('ok'));
  t.equal(await content(b, 'd.2'), 'ok', 'other objects are unaffected');
  await b.sync(['d.1', 'd.2']); // sync does not wait at fences

  faults.clear(); // the hung write runs for real: it lands late
  await new Promise((r) => setTimeout(r, 10));
  t.notOk(b.isFenced('d.1'), 'the fence lifts when it settles');
  t.equal(await content(b, 'd.1'), 'AAA', 'the late write landed');
  await b.write('d.1', 0, Buffer.from('CCC'));
  t.equal(await content(b, 'd.1'), 'CCC', 'newer writes land after it, and win');
});

t.test('a call waiting at the fence runs behind the late write once it lands (ordering kept)', async (t) => {
  const { b, faults } = setup(200);
  faults.addRule({ ops: ['write'], prefix: 'd.1', hang: true, limit: 1 });
  t.equal((await elapsed(b.write('d.1', 0, Buffer.from('AAA')))).err?.code, 'ETIMEDOUT');
  const w2 = b.write('d.1', 0, Buffer.from('BBB'));
  await new Promise((r) => setTimeout(r, 50));
  faults.clear(); // W1 lands now, before W2's deadline
  await w2;
  t.equal(await content(b, 'd.1'), 'BBB', 'the newer write is not overwritten by the late one');
});

t.test('without the fence the late write would win (the hazard the fence prevents)', async (t) => {
  // Same sequence on the fault injector alone: the caller gave up on W1
  // itself (no timeout layer to fence the object).
  const inner = new MemoryBlocker();
  const faults = new FaultController();
  const b = faultyBlocker(inner, faults);
  faults.addRule({ ops: ['write'], hang: true, limit: 1 });
  const w1 = b.write('d.1', 0, Buffer.from('AAA'));
  await b.write('d.1', 0, Buffer.from('BBB'));
  faults.clear();
  await w1;
  t.equal(await content(inner, 'd.1'), 'AAA', 'stale data on top of the acknowledged write');
});

t.test('replace, punch and remove fence too; a late failure lifts the fence as well', async (t) => {
  const { b, faults } = setup();
  await b.write('o', 0, Buffer.from('0123456789'));
  for (const op of ['replace', 'punch', 'remove'] as const) {
    faults.addRule({ ops: [op], hang: true, limit: 1 });
    const call = op === 'replace' ? b.replace('o', Buffer.from('new')) : op === 'punch' ? b.punch('o', 0, 2) : b.remove('o');
    t.equal((await elapsed(call)).err?.code, 'ETIMEDOUT', `${op} timed out`);
    t.ok(b.isFenced('o'), `${op} fenced the object`);
    faults.clear({ release: 'fail' });
    await new Promise((r) => setTimeout(r, 10));
    t.notOk(b.isFenced('o'), 'lifted when it failed');
  }
  t.equal(await content(b, 'o'), '0123456789', 'none of them ran');
});

t.test('sync and list steps are bounded; a listing left behind is closed', async (t) => {
  const { b, faults } = setup();
  await b.write('a.1', 0, Buffer.from('x'));
  faults.addRule({ ops: ['sync', 'list'], hang: true });
  t.equal((await elapsed(b.sync())).err?.code, 'ETIMEDOUT');
  const listing = (async () => { for await (const n of b.list('a.')) void n; })();
  t.equal((await elapsed(listing)).err?.code, 'ETIMEDOUT');
  t.equal(b.stats().fencedObjects, 0);
  faults.clear();
  const names: string[] = [];
  for await (const n of b.list('a.')) names.push(n);
  t.same(names, ['a.1'], 'listing works again');
});

t.test('timeoutMs 0: a pass-through (no bound)', async (t) => {
  const { b, faults } = setup(0);
  faults.addRule({ ops: ['stat'], delayMs: 150 });
  await b.write('x', 0, Buffer.from('x'));
  const r = await elapsed(b.stat('x'));
  t.same(r.value, { size: 1 });
  t.ok(r.ms >= 140);
});

t.test('close is bounded when the store does not answer', async (t) => {
  const { b, inner } = setup();
  inner.setFaultHook((op) => (op === 'sync' ? new Promise<undefined>(() => {}) : undefined)); // MemoryBlocker.close syncs
  const r = await elapsed(b.close());
  t.equal(r.err?.code, 'ETIMEDOUT');
  t.ok(r.ms < MS + SLACK, `gave up after ${r.ms} ms`);
});

t.test('many operations in flight: each expires once, the rest complete', async (t) => {
  const { b, faults } = setup();
  faults.addRule({ ops: ['write'], prefix: 'slow.', hang: true });
  const calls = [];
  for (let i = 0; i < 200; i++) calls.push(elapsed(b.write(i % 2 ? `slow.${i}` : `fast.${i}`, 0, Buffer.from('x'))));
  const results = await Promise.all(calls);
  t.equal(results.filter((r) => r.err?.code === 'ETIMEDOUT').length, 100);
  t.equal(results.filter((r) => !r.err).length, 100);
  t.equal(b.stats().timedOut.write, 100);
  t.equal(b.stats().fencedObjects, 100);
  faults.clear();
  await new Promise((r) => setTimeout(r, 20));
  t.equal(b.stats().fencedObjects, 0);
  t.equal(b.stats().late, 0);
});
