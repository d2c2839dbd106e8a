/**
 * MemoryBlocker: the conformance suite, then the power-cut model (what
 * survives: synced and replaced data; what does not: unsynced changes) and
 * fault injection.
 */
import t from 'tap';
import { isBlockerError } from '../../../src/blockers/errors.js';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { blockerConformance, collect } from '../../helpers/blocker-conformance.js';

await blockerConformance(t, 'memory', async () => ({ blocker: new MemoryBlocker(), cleanup: async () => {} }));
await blockerConformance(t, 'memory (durable writes)', async () => ({
  blocker: new MemoryBlocker({ capabilities: { durableWrites: true } }),
  cleanup: async () => {},
}));

const text = async (b: MemoryBlocker, name: string) => (await b.readFull(name)).toString();
const exists = async (b: MemoryBlocker, name: string) =>
  b.stat(name).then(() => true, (err: unknown) => (isBlockerError(err, 'ENOENT') ? false : Promise.reject(err)));

/** A store with every kind of state: synced, unsynced new, unsynced overwrite, unsynced removal, replaced. */
async function scenario(b: MemoryBlocker) {
  await b.write('synced', 0, Buffer.from('durable'));
  await b.write('overwritten', 0, Buffer.from('old'));
  await b.write('removed', 0, Buffer.from('still here'));
  await b.sync();
  await b.replace('meta', Buffer.from('map v1'));
  await b.write('overwritten', 0, Buffer.from('NEW!'));
  await b.write('fresh', 0, Buffer.from('never synced'));
  await b.remove('removed');
  await b.write('replaced', 0, Buffer.from('unsynced bytes'));
  await b.replace('replaced', Buffer.from('replaced'));
}

t.test("powerCut 'none' keeps exactly what was made durable", async (t) => {
  const b = new MemoryBlocker();
  await scenario(b);
  t.same(b.dirtyNames(), ['fresh', 'overwritten', 'removed']);
  b.powerCut({ keepUnsynced: 'none' });
  t.equal(await text(b, 'synced'), 'durable', 'synced data survives');
  t.equal(await text(b, 'overwritten'), 'old', 'unsynced overwrite dropped');
  t.equal(await exists(b, 'fresh'), false, 'unsynced new object gone');
  t.equal(await text(b, 'removed'), 'still here', 'unsynced removal undone');
  t.equal(await text(b, 'meta'), 'map v1', 'replace survives');
  t.equal(await text(b, 'replaced'), 'replaced', 'replace over unsynced writes survives');
  t.same(b.dirtyNames(), [], 'nothing dirty after the cut');
  t.same((await collect(b.list(''))).sort(), ['meta', 'overwritten', 'removed', 'replaced', 'synced']);
});

t.test("powerCut 'all' keeps everything", async (t) => {
  const b = new MemoryBlocker();
  await scenario(b);
  b.powerCut({ keepUnsynced: 'all' });
  t.equal(await text(b, 'overwritten'), 'NEW!', 'overwrite kept');
  t.equal(await text(b, 'fresh'), 'never synced');
  t.equal(await exists(b, 'removed'), false);
  b.powerCut({ keepUnsynced: 'none' });
  t.equal(await text(b, 'fresh'), 'never synced', 'and it is durable now');
});

t.test("powerCut 'random' is per object, whole, and seeded", async (t) => {
  const outcome = async (seed: number) => {
    const b = new MemoryBlocker({ seed });
    for (let i = 0; i < 100; i++) await b.write(`o${i}`, 0, Buffer.from(`v1-${i}`));
    await b.sync();
    for (let i = 0; i < 100; i++) {
      await b.write(`o${i}`, 0, Buffer.from(`v2-${i}`));
      await b.write(`o${i}`, 10, Buffer.from('tail'));
    }
    b.powerCut({ keepUnsynced: 'random' });
    const states: string[] = [];
    for (let i = 0; i < 100; i++) {
      const s = await text(b, `o${i}`);
      if (s === `v1-${i}`) states.push('old');
      else if (s === `v2-${i}`.padEnd(10, '\0') + 'tail') states.push('new');
      else states.push(`torn: ${JSON.stringify(s)}`);
    }
    return states;
  };
  const a = await outcome(42);
  t.ok(a.every((s) => s === 'old' || s === 'new'), 'each object is wholly old or wholly new');
  const kept = a.filter((s) => s === 'new').length;
  t.ok(kept > 20 && kept < 80, `some kept, some lost (${kept}/100)`);
  t.same(await outcome(42), a, 'same seed, same outcome');
  t.notSame(await outcome(7), a, 'another seed, another outcome');
});

t.test('sync(names) makes only those durable', async (t) => {
  const b = new MemoryBlocker();
  await b.write('a', 0, Buffer.from('a'));
  await b.write('b', 0, Buffer.from('b'));
  await b.sync(['a']);
  b.powerCut({ keepUnsynced: 'none' });
  t.equal(await exists(b, 'a'), true);
  t.equal(await exists(b, 'b'), false);
});

t.test('close flushes; reopen sees the same disk', async (t) => {
  const b = new MemoryBlocker();
  await b.write('x', 0, Buffer.from('x'));
  await b.close();
  b.powerCut({ keepUnsynced: 'none' });
  const again = b.reopen();
  t.equal(await text(again, 'x'), 'x', 'close synced it');
  await t.rejects(b.readFull('x'), { code: 'EIO' }, 'the closed one refuses');
});

t.test('durableWrites: power cuts lose nothing', async (t) => {
  const b = new MemoryBlocker({ capabilities: { durableWrites: true } });
  await b.write('w', 0, Buffer.from('w'));
  await b.punch('w', 0, 1);
  b.powerCut({ keepUnsynced: 'none' });
  t.same([...(await b.readFull('w'))], [0]);
  t.same(b.dirtyNames(), []);
});

t.test('fault injection', async (t) => {
  const b = new MemoryBlocker();
  b.failNext('write', 'ENOSPC');
  await t.rejects(b.write('f', 0, Buffer.from('x')), { code: 'ENOSPC', name: 'BlockerError' }, 'failNext fails the next write');
  await b.write('f', 0, Buffer.from('x'));
  t.pass('only once');

  b.failNext('*', 'EIO', 'g');
  await b.write('f', 0, Buffer.from('y'));
  await t.rejects(b.readFull('g'), { code: 'EIO' }, 'any op, on the named object only');

  // a gate: hold writes to 'slow' until released, to test ordering
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  b.setFaultHook((op, name) => (op === 'write' && name === 'slow' ? gate : op === 'sync' ? 'EIO' : undefined));
  const order: string[] = [];
  const slow = b.write('slow', 0, Buffer.from('s')).then(() => order.push('slow'));
  await b.write('fast', 0, Buffer.from('f')).then(() => order.push('fast'));
  await t.rejects(b.sync(), { code: 'EIO' }, 'a hook can fail an op');
  release();
  await slow;
  t.same(order, ['fast', 'slow'], 'the hook delayed the write');
  b.setFaultHook(undefined);
  t.equal(b.calls.write, 5);
  t.equal(b.calls.sync, 1);
});
