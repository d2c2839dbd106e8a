/**
 * src/blockers/timeout.ts: the bound on the pile of timed-out calls still
 * running. With the store hung (faulty.ts `hang`), timed-out calls pile up
 * until `maxLate` operations or `maxLateBytes` of their buffers; then every
 * new call fails at once (ETIMEDOUT, "backend stalled"), never issued; once
 * the store answers (the hung calls are released) the pile drains and calls
 * are issued again, by themselves. Failing acknowledges nothing, and the late
 * writes still land in order behind their fences.
 *
 *   timeout ──▶ faulty ──▶ memory
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { FaultController, faultyBlocker } from '../../../src/blockers/faulty.js';
import { DEFAULT_MAX_LATE, DEFAULT_MAX_LATE_BYTES, withTimeouts, type TimeoutOptions } from '../../../src/blockers/timeout.js';
import { createLogger } from '../../../src/common/log.js';
import { Volume } from '../../../src/compose/volume.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';

const MS = 100;

function setup(o: Partial<TimeoutOptions> = {}) {
  const inner = new MemoryBlocker();
  const faults = new FaultController();
  const lines: string[] = [];
  const log = createLogger({ level: 'info', write: (l) => { lines.push(l); } });
  const b = withTimeouts(faultyBlocker(inner, faults), { timeoutMs: MS, log, ...o });
  t.teardown(() => { faults.clear({ release: 'fail' }); });
  return { inner, faults, b, lines };
}

const outcome = async (p: Promise<unknown>): Promise<{ ms: number; code?: string; message?: string }> => {
  const start = Date.now();
  try {
    await p;
    return { ms: Date.now() - start };
  } catch (err) {
    const e = err as { code?: string; message?: string };
    return { ms: Date.now() - start, code: e.code, message: e.message };
  }
};

/** Resolves once `check` holds (the late calls settle on the next turns), or after 2 s. */
async function until(check: () => boolean): Promise<boolean> {
  for (const end = Date.now() + 2000; !check() && Date.now() < end;) await new Promise((r) => setTimeout(r, 5));
  return check();
}

t.test('defaults: 1024 operations, 256 MiB', async (t) => {
  const { b } = setup();
  t.equal(DEFAULT_MAX_LATE, 1024);
  t.equal(DEFAULT_MAX_LATE_BYTES, 256 * 1024 * 1024);
  t.match(b.stats(), { maxLate: 1024, maxLateBytes: 256 * 1024 * 1024, stalled: false, late: 0, lateBytes: 0, stalledRejections: 0 });
});

t.test('past maxLate operations every new call fails at once, never issued; released, the store recovers', async (t) => {
  // A long timeout, so that "at once" (well under it) holds on a loaded machine.
  const timeoutMs = 2000;
  const { b, inner, faults, lines } = setup({ timeoutMs, maxLate: 3 });
  await b.write('d.0', 0, Buffer.from('old'));
  faults.addRule({ ops: ['write'], hang: true, limit: 3 });
  const hung = await Promise.all([1, 2, 3].map((i) => outcome(b.write(`d.${i}`, 0, Buffer.alloc(100, i)))));
  t.same(hung.map((r) => r.code), ['ETIMEDOUT', 'ETIMEDOUT', 'ETIMEDOUT'], 'three writes time out');
  t.match(b.stats(), { late: 3, lateBytes: 300, fencedObjects: 3, stalled: true });
  t.ok(lines.some((l) => /"level":"error"/.test(l) && /backend stalled: 3 timed-out operations \(0\.0 MiB\) still outstanding/.test(l)),
    'one error line when it stalls');

  const issued = { ...inner.calls };
  const matched = faults.stats().rules[0]!.matched;
  for (const [what, call] of [
    ['a write to an unfenced object', () => b.write('d.9', 0, Buffer.from('new'))],
    ['a write to a fenced one', () => b.write('d.1', 0, Buffer.from('new'))],
    ['a read', () => b.read('d.0', 0, 3, Buffer.alloc(3))],
    ['a sync (a FLUSH fails: nothing is acknowledged)', () => b.sync()],
    ['a remove', () => b.remove('d.0')],
  ] as const) {
    const r = await outcome(call());
    t.equal(r.code, 'ETIMEDOUT', `${what}: ETIMEDOUT`);
    t.match(r.message, /backend stalled: 3 timed-out operations .* still outstanding in the memory store \(bounds: 3 operations, 256\.0 MiB\); not issued/);
    t.ok(r.ms < timeoutMs / 4, `${what}: at once (${r.ms} ms)`);
  }
  t.same(inner.calls, issued, 'nothing reached the store');
  t.equal(faults.stats().rules[0]!.matched, matched, 'nothing reached the fault injector either');
  t.equal(b.stats().stalledRejections, 5);
  t.equal(b.stats().late, 3, 'the pile did not grow');

  // The store answers again: the late writes land, the fences lift, calls are issued again.
  faults.clear();
  t.ok(await until(() => !b.stats().stalled), 'no longer stalled once the late calls settle');
  t.match(b.stats(), { late: 0, lateBytes: 0, fencedObjects: 0, lateSettled: 3 });
  t.ok(lines.some((l) => /"level":"warn"/.test(l) && /backend answering again/.test(l)), 'one warn line when it recovers');
  for (let i = 1; i <= 3; i++) t.same(await b.readFull(`d.${i}`), Buffer.alloc(100, i), `late write ${i} landed`);
  await b.write('d.1', 0, Buffer.from('new'));
  t.equal((await b.readFull('d.1')).subarray(0, 3).toString(), 'new', 'a newer write to a formerly fenced object wins');
  await b.sync();
  t.equal(b.stats().stalledRejections, 5);
});

t.test('maxLateBytes: the buffers of late writes and reads count', async (t) => {
  const { b, faults } = setup({ maxLate: 0, maxLateBytes: 1000 });
  await b.write('x', 0, Buffer.alloc(800));
  faults.addRule({ ops: ['write', 'read'], hang: true });
  t.equal((await outcome(b.write('a', 0, Buffer.alloc(600)))).code, 'ETIMEDOUT');
  t.match(b.stats(), { late: 1, lateBytes: 600, stalled: false }, 'below the bound: calls go on');
  t.equal((await outcome(b.read('x', 0, 500, Buffer.alloc(500)))).code, 'ETIMEDOUT', 'a hung read times out');
  t.match(b.stats(), { late: 2, lateBytes: 1100, stalled: true }, 'its target counts: 1,100 bytes ≥ 1,000');
  const r = await outcome(b.stat('x'));
  t.equal(r.code, 'ETIMEDOUT');
  t.match(r.message, /backend stalled: 2 timed-out operations/);

  // The store fails the hung calls instead: failing settles them just the same.
  faults.clear({ release: 'fail' });
  t.ok(await until(() => !b.stats().stalled), 'recovered');
  t.match(b.stats(), { late: 0, lateBytes: 0 });
  t.same(await b.stat('x'), { size: 800 });
});

t.test('the pile drains one call at a time: below the bound again, calls are issued (and may stall it again)', async (t) => {
  const { b, faults } = setup({ maxLate: 2 });
  const one = faults.addRule({ ops: ['write'], prefix: 'a', hang: true });
  faults.addRule({ ops: ['write'], prefix: 'b', hang: true });
  t.equal((await outcome(b.write('a', 0, Buffer.from('1')))).code, 'ETIMEDOUT');
  t.equal((await outcome(b.write('b', 0, Buffer.from('2')))).code, 'ETIMEDOUT');
  t.ok(b.stats().stalled);
  t.match((await outcome(b.write('c', 0, Buffer.from('3')))).message, /backend stalled/);

  faults.clear({ ids: [one] }); // the store answers for 'a' only
  t.ok(await until(() => !b.stats().stalled), 'one settled: below the bound');
  await b.write('c', 0, Buffer.from('3'));
  t.equal((await b.readFull('c')).toString(), '3', 'issued and done');
  t.equal((await outcome(b.write('b2', 0, Buffer.from('4')))).code, 'ETIMEDOUT', 'still hung where it is hung: times out normally');
  t.ok(b.stats().stalled, 'and the pile is at the bound again');
  t.equal(b.stats().late, 2);
});

t.test('a call already waiting at a fence when the store stalls is not cut short: it keeps its own deadline', async (t) => {
  // A longer timeout: the steps below must fall inside one another's deadlines on a loaded machine.
  const { b, faults } = setup({ timeoutMs: 400, maxLate: 2 });
  faults.addRule({ ops: ['write'], hang: true, limit: 2 });
  const first = outcome(b.write('f', 0, Buffer.from('1')));
  await new Promise((r) => setTimeout(r, 200));
  const other = outcome(b.write('g', 0, Buffer.from('3')));
  t.equal((await first).code, 'ETIMEDOUT', 'the first write to f times out: f fenced');
  const waiting = outcome(b.write('f', 0, Buffer.from('2')));
  t.equal(b.stats().fenceWaits, 1, 'a newer write to f waits at its fence');
  t.equal((await other).code, 'ETIMEDOUT', 'the write to g times out ~200 ms later');
  t.ok(b.stats().stalled, 'and the pile reaches its bound');
  faults.clear();
  const w = await waiting;
  t.equal(w.code, undefined, `the waiting write ran behind the late one once it landed (${w.ms} ms)`);
  t.ok(await until(() => !b.stats().stalled));
  t.equal((await b.readFull('f')).toString(), '2', 'and it is the newest');
});

t.test('a volume on a stalled store: requests fail at once, nothing is acknowledged that is not durable, it recovers', async (t) => {
  const OBJ = 64 * 1024;
  const pattern = (seed: number, n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + seed * 97) & 0xff || 1));
  const { b, inner, faults } = setup({ timeoutMs: 150, maxLate: 2 });
  const map = await VolumeMap.create(b, 'v', { size: 16 * OBJ, objectSize: OBJ });
  const vol = new Volume(map, b, false);
  await vol.write(0, pattern(1, OBJ), false);
  await vol.flush();
  await vol.write(100, pattern(2, 4096), false); // in place: acknowledged, not yet durable (dirty until a FLUSH)

  faults.addRule({ ops: ['write', 'replace', 'sync'], hang: true }); // the store stops taking writes
  let timedOut = 0;
  for (let i = 4; i < 16 && !b.stats().stalled; i++) {
    await t.rejects(vol.write(i * OBJ, pattern(i, 4096), false), { code: 'ETIMEDOUT' });
    timedOut++;
  }
  t.ok(b.stats().stalled, `stalled after ${timedOut} timed-out writes`);
  let started = Date.now();
  await t.rejects(vol.write(OBJ, pattern(3, 4096), false), { message: /backend stalled/ }, 'a write fails at once');
  await t.rejects(vol.flush(), { message: /backend stalled/ }, 'a FLUSH fails: the unflushed write is not claimed durable');
  await t.rejects(vol.read(0, 4096), { message: /backend stalled/ }, 'a read fails at once');
  // The messages prove they were refused, not timed out; the time, that nobody waited for three timeouts.
  t.ok(Date.now() - started < 3 * 150, `all three at once (${Date.now() - started} ms)`);

  faults.clear(); // the store answers again: the hung calls run
  t.ok(await until(() => !b.stats().stalled && b.stats().late === 0), 'the pile drained');
  started = Date.now();
  await vol.write(2 * OBJ, pattern(4, 4096), false);
  await vol.flush();
  t.ok(true, `writes and FLUSH work again without a restart (${Date.now() - started} ms)`);

  // A power cut now: everything the FLUSH acknowledged is there.
  inner.powerCut({ keepUnsynced: 'none' });
  const again = inner.reopen();
  const reopened = new Volume(await VolumeMap.open(again, 'v', { forWrite: true }), again, false);
  const readBack = async (offset: number, length: number) => {
    const out = Buffer.alloc(length);
    for (const p of await reopened.read(offset, length)) if (p.data) p.data.copy(out, p.offset - offset);
    return out;
  };
  const first = pattern(1, OBJ);
  pattern(2, 4096).copy(first, 100);
  t.same(await readBack(0, OBJ), first, 'flushed before the stall, and the write acknowledged before it, flushed after it');
  t.same(await readBack(2 * OBJ, 4096), pattern(4, 4096), 'written and flushed after recovery');
  await reopened.close();
});

t.test('no bounds (0, 0): the pile only grows, never stalled', async (t) => {
  const { b, faults } = setup({ maxLate: 0, maxLateBytes: 0 });
  faults.addRule({ ops: ['write'], hang: true });
  await Promise.all(Array.from({ length: 5 }, (_, i) => outcome(b.write(`n.${i}`, 0, Buffer.alloc(10)))));
  t.match(b.stats(), { late: 5, lateBytes: 50, stalled: false, stalledRejections: 0 });
});

t.test('timeoutMs 0: no timer, so no pile and no bound', async (t) => {
  const { b } = setup({ timeoutMs: 0, maxLate: 1 });
  await b.write('x', 0, Buffer.from('x'));
  t.match(b.stats(), { late: 0, stalled: false });
});
