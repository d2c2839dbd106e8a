/**
 * src/blockers/faulty.ts over the memory blocker: rules by operation and
 * name prefix, rates from a seeded PRNG (reproducible), limits, the three
 * effects (fail, delay, hang), hung calls released at clear (run for real
 * or fail), counters, rule validation, and close.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { FaultController, faultyBlocker, parseFaultRule } from '../../../src/blockers/faulty.js';
import { isBlockerError } from '../../../src/blockers/errors.js';

function setup(seed?: number) {
  const inner = new MemoryBlocker();
  const faults = new FaultController({ seed });
  return { inner, faults, b: faultyBlocker(inner, faults) };
}

const settledSoon = async (p: Promise<unknown>, ms = 30): Promise<boolean> => {
  let done = false;
  void p.then(() => { done = true; }, () => { done = true; });
  await new Promise((r) => setTimeout(r, ms));
  return done;
};

t.test('no rules: every call passes through', async (t) => {
  const { b, inner, faults } = setup();
  await b.write('d.1', 0, Buffer.from('abc'));
  await b.sync(['d.1']);
  t.equal((await b.readFull('d.1')).toString(), 'abc');
  t.same(await b.stat('d.1'), { size: 3 });
  const names: string[] = [];
  for await (const n of b.list('d.')) names.push(n);
  t.same(names, ['d.1']);
  t.equal(inner.calls.write, 1);
  t.same(faults.stats(), { rules: [], injectedTotal: 0, hanging: 0 });
  t.equal(b.kind, 'memory');
  t.same(b.capabilities, inner.capabilities);
});

t.test('fail: only the named operations on names with the prefix, with the code', async (t) => {
  const { b, inner, faults } = setup();
  const id = faults.addRule({ ops: ['write'], prefix: 'd.a', fail: 'ENOSPC' });
  const err = await b.write('d.a.1', 0, Buffer.from('x')).catch((e: unknown) => e);
  t.ok(isBlockerError(err, 'ENOSPC'), 'ENOSPC', { err });
  t.match(String(err), /injected fault \(rule 1\)/);
  t.equal(inner.calls.write, 0, 'the inner blocker never saw it');
  await b.write('d.b.1', 0, Buffer.from('y'));
  await b.replace('d.a.2', Buffer.from('z'));
  t.equal(inner.calls.write, 1, 'other names pass');
  const s = faults.stats().rules[0]!;
  t.equal(s.id, id);
  t.equal(s.matched, 1);
  t.equal(s.injected, 1);
  t.same(s.effect, { fail: 'ENOSPC' });
});

t.test('sync matches when any named object does; sync() always; list by overlapping prefix', async (t) => {
  const { b, faults } = setup();
  faults.addRule({ ops: ['sync', 'list'], prefix: 'd.a', fail: 'EIO' });
  await b.sync(['d.b.1', 'm.1']);
  await t.rejects(b.sync(['d.b.1', 'd.a.7']), { code: 'EIO' });
  await t.rejects(b.sync(), { code: 'EIO' });
  const drain = async (prefix: string) => { for await (const n of b.list(prefix)) void n; };
  await t.rejects(drain('d.'), { code: 'EIO' }, 'a listing that includes the prefix');
  await t.rejects(drain('d.a.1'), { code: 'EIO' }, 'a listing inside the prefix');
  await drain('m.');
  t.equal(faults.stats().rules[0]!.injected, 4);
});

t.test('rate: seeded, reproducible, close to the rate', async (t) => {
  const run = async (seed: number) => {
    const { b, faults } = setup();
    faults.addRule({ ops: ['stat'], rate: 0.3, seed, fail: 'EIO' });
    await b.write('x', 0, Buffer.from('x'));
    const hits: number[] = [];
    for (let i = 0; i < 1000; i++) if (await b.stat('x').then(() => false, () => true)) hits.push(i);
    return hits;
  };
  const a = await run(7);
  const again = await run(7);
  const other = await run(8);
  t.same(a, again, 'same seed, same calls fail');
  t.not(a.join(), other.join(), 'another seed, other calls');
  t.ok(a.length > 240 && a.length < 360, `about 30 % failed (${a.length})`);
});

t.test('rate 0 never fires; limit stops after n hits', async (t) => {
  const { b, faults } = setup();
  faults.addRule({ ops: ['write'], rate: 0, fail: 'EIO' });
  faults.addRule({ ops: ['write'], limit: 2, fail: 'ETIMEDOUT' });
  const results = [];
  for (let i = 0; i < 4; i++) results.push(await b.write('x', 0, Buffer.from('x')).then(() => 'ok', (e: { code: string }) => e.code));
  t.same(results, ['ETIMEDOUT', 'ETIMEDOUT', 'ok', 'ok']);
  const [r0, r1] = faults.stats().rules;
  t.equal(r0!.matched, 4);
  t.equal(r0!.injected, 0);
  t.equal(r1!.injected, 2);
  t.equal(faults.stats().injectedTotal, 2);
});

t.test('delay: the call runs for real after the latency', async (t) => {
  const { b, inner, faults } = setup();
  faults.addRule({ ops: ['replace'], delayMs: 60 });
  const start = Date.now();
  await b.replace('h', Buffer.from('v'));
  t.ok(Date.now() - start >= 55, `took ${Date.now() - start} ms`);
  t.equal((await inner.readFull('h')).toString(), 'v');
});

t.test('hang: until cleared, then runs for real (default)', async (t) => {
  const { b, inner, faults } = setup();
  faults.addRule({ ops: ['write'], prefix: 'd.', hang: true });
  const p = b.write('d.1', 0, Buffer.from('late'));
  t.notOk(await settledSoon(p), 'the write hangs');
  t.equal(faults.stats().hanging, 1);
  t.equal(faults.stats().rules[0]!.hanging, 1);
  t.equal(inner.calls.write, 0, 'not issued yet');
  await b.write('m.1', 0, Buffer.from('other')); // another prefix is unaffected
  t.equal(faults.clear(), 1, 'one call released');
  await p;
  t.equal((await inner.readFull('d.1')).toString(), 'late', 'it ran for real');
  t.same(faults.stats(), { rules: [], injectedTotal: 1, hanging: 0 });
});

t.test('hang: clear({ release: "fail" }) fails the hung calls with EIO', async (t) => {
  const { b, inner, faults } = setup();
  faults.addRule({ ops: ['sync'], hang: true });
  const p = b.sync();
  t.notOk(await settledSoon(p));
  faults.clear({ release: 'fail' });
  await t.rejects(p, { code: 'EIO', message: /released as a failure/ });
  t.equal(inner.calls.sync, 0);
});

t.test('setRules replaces every rule and releases calls hung on the old ones; clear by id', async (t) => {
  const { b, faults } = setup();
  faults.addRule({ ops: ['stat'], hang: true });
  await b.write('x', 0, Buffer.from('x'));
  const p = b.stat('x');
  const ids = faults.setRules([{ ops: ['read'], fail: 'EIO' }, { ops: ['remove'], fail: 'ENOSPC' }]);
  t.same(ids, [2, 3]);
  t.same(await p, { size: 1 }, 'the hung stat ran');
  t.same(faults.stats().rules.map((r) => r.id), [2, 3]);
  faults.clear({ ids: [2] });
  t.same(faults.stats().rules.map((r) => r.id), [3]);
  await b.read('x', 0, 1, Buffer.alloc(1));
  await t.rejects(b.remove('x'), { code: 'ENOSPC' });
});

t.test('rule validation names the problem', async (t) => {
  t.throws(() => parseFaultRule(null), /expected an object/);
  t.throws(() => parseFaultRule({ fail: 'EIO', bogus: 1 }), /unknown field "bogus"/);
  t.throws(() => parseFaultRule({ ops: ['write', 'frob'], fail: 'EIO' }), /ops must be a list/);
  t.throws(() => parseFaultRule({ rate: 1.5, fail: 'EIO' }), /rate must be/);
  t.throws(() => parseFaultRule({ limit: -1, fail: 'EIO' }), /limit must be/);
  t.throws(() => parseFaultRule({ fail: 'EBOGUS' }), /fail must be one of/);
  t.throws(() => parseFaultRule({}), /exactly one effect/);
  t.throws(() => parseFaultRule({ fail: 'EIO', hang: true }), /exactly one effect/);
  t.throws(() => parseFaultRule({ delayMs: -5 }), /delayMs/);
  t.throws(() => parseFaultRule({ hang: 'yes' }), /hang must be true/);
  t.same(parseFaultRule({ ops: 'sync', hang: true }), { ops: ['sync'], hang: true }, 'one op as a string');
  const err = (() => { try { parseFaultRule({}); } catch (e) { return e; } })() as { code?: string };
  t.equal(err.code, 'ARCH_E_USAGE');
  const { faults } = setup();
  t.throws(() => faults.setRules([{ fail: 'EIO' }, { nope: 1 }]), /rule 2/);
  t.same(faults.stats().rules, [], 'a bad list changes nothing');
});

t.test('close fails hung calls and closes the inner blocker', async (t) => {
  const { b, faults } = setup();
  faults.addRule({ ops: ['write'], hang: true });
  const p = b.write('x', 0, Buffer.from('x'));
  await b.close();
  await t.rejects(p, { code: 'EIO' });
  await t.rejects(b.stat('x'), /closed/);
});
