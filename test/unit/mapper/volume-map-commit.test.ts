/**
 * VolumeMap commits under concurrency: group commit on one chunk, parallel
 * commits on different chunks with a coalesced header write, chunk
 * copy-on-write after a (simulated) snapshot, and failures mid-commit.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { decodeHeader } from '../../../src/mapper/header-format.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';

const GiB = 2 ** 30;

/** A gate that holds matching blocker operations until released; counts how many are waiting. */
function gate(b: MemoryBlocker, match: (op: string, name: string) => boolean) {
  let release!: () => void;
  let opened = false;
  const open = new Promise<void>((r) => { release = r; });
  const state = { waiting: 0, passed: 0, maxWaiting: 0 };
  b.setFaultHook(async (op, name) => {
    if (!match(op, name) || opened) return;
    state.waiting++;
    state.maxWaiting = Math.max(state.maxWaiting, state.waiting);
    await open;
    state.waiting--;
    state.passed++;
  });
  return { state, release: () => { opened = true; release(); } };
}

const tick = () => new Promise((r) => setImmediate(r));

t.test('same chunk: updates arriving during a commit go out together in the next one', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: 10 * GiB });
  const e = map.newEntry();
  const g = gate(b, (op, name) => op === 'replace' && name.startsWith('m.'));
  const first = map.setEntries([{ index: 0, entry: e }]);
  await tick();
  t.equal(g.state.waiting, 1, 'first chunk write in flight');
  const later = Array.from({ length: 50 }, (_, i) => map.setEntries([{ index: i + 1, entry: e }]));
  const order: number[] = [];
  void first.then(() => order.push(0));
  for (const [i, p] of later.entries()) void p.then(() => order.push(i + 1));
  await tick();
  t.equal(g.state.waiting, 1, 'the others wait: one commit per chunk at a time');
  g.release();
  await Promise.all([first, ...later]);
  t.equal(map.stats.chunkWrites, 2, '51 updates, 2 chunk writes');
  t.equal(map.stats.headerWrites, 1, 'header written once, for the new chunk');
  t.equal(order[0], 0, 'the first caller resolves first');
  for (let i = 0; i <= 50; i++) t.equal(map.lookup(i), e);
  await map.close();
  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  for (let i = 0; i <= 50; i++) if ((await ro.lookupAsync(i)) !== e) t.fail(`index ${i}`);
  t.equal(await ro.lookupAsync(51), 0);
});

t.test('same index: the later update wins', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  await map.close();
  const m2 = await VolumeMap.open(b, 'v', { forWrite: true });
  const old = (await VolumeMap.open(b, 'v', { forWrite: false })).newEntry();
  const g = gate(b, (op, name) => op === 'replace' && name.startsWith('m.'));
  const p1 = m2.setEntries([{ index: 9, entry: m2.newEntry() }]);
  await tick();
  const p2 = m2.setEntries([{ index: 9, entry: old }, { index: 10, entry: old }]);
  const p3 = m2.setEntries([{ index: 9, entry: 0 }]);
  g.release();
  await Promise.all([p1, p2, p3]);
  t.equal(m2.lookup(9), 0);
  t.equal(m2.lookup(10), old);
});

t.test('different chunks commit in parallel; their header writes coalesce', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: 1024 * GiB });
  const e = map.newEntry();
  const g = gate(b, (op, name) => op === 'replace' && name.startsWith('m.'));
  const all = Array.from({ length: 8 }, (_, c) => map.setEntries([{ index: c * 4096 * 3, entry: e }]));
  await tick();
  t.equal(g.state.waiting, 8, 'eight chunk writes in flight at once');
  g.release();
  await Promise.all(all);
  t.equal(map.stats.chunkWrites, 8);
  t.ok(map.stats.headerWrites <= 2, `header writes coalesced: ${map.stats.headerWrites}`);
  const h = decodeHeader(await b.readFull('vol.v'), 'vol.v');
  t.same(h.chunkRefs.map((r) => r.chunkIndex), [0, 3, 6, 9, 12, 15, 18, 21]);

  // One call spanning many chunks: one commit per chunk; header writes: the
  // first chunk done starts one, all later ones share the next.
  const before = map.stats.headerWrites;
  await map.setEntries(Array.from({ length: 4096 * 5 }, (_, i) => ({ index: 40 * 4096 + i, entry: e })));
  t.ok(map.stats.headerWrites - before <= 2, `5 new chunks, ${map.stats.headerWrites - before} header writes`);
  t.equal(map.chunkCount, 13);
});

t.test('chunk copy-on-write after a snapshot leaves the shared chunk untouched', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: 100 * GiB });
  const e1 = map.newEntry();
  await map.setEntries([{ index: 1, entry: e1 }, { index: 2, entry: e1 }, { index: 4097, entry: e1 }]);
  const oldChunk = `m.${map.id}.1.0`;
  const oldBytes = await b.readFull(oldChunk);
  const oldHeader = decodeHeader(await b.readFull('vol.v'), 'vol.v');

  await map.markShared(); // what snapshot will do to the origin
  t.equal(map.generation, 2);
  t.equal(map.writableSince, 2);
  t.notOk(map.isOwned(e1), 'objects from before the snapshot are shared now');
  t.equal(map.objectName(e1, 1), `d.${map.id}.1.1`, 'and keep their names');
  const e2 = map.newEntry();
  t.ok(map.isOwned(e2));
  t.equal(map.newObjectName(1), `d.${map.id}.2.1`, 'a copy gets a new name');

  const newBefore = map.stats.chunkNewNames;
  await map.setEntries([{ index: 1, entry: e2 }]);
  t.equal(map.stats.chunkNewNames - newBefore, 1, 'shared chunk copied to a new name');
  t.same(await b.readFull(oldChunk), oldBytes, 'shared chunk object untouched');
  const newChunk = `m.${map.id}.2.0`;
  t.ok(await b.stat(newChunk));
  const h = decodeHeader(await b.readFull('vol.v'), 'vol.v');
  t.same(h.chunkRefs, [{ chunkIndex: 0, source: 0, generation: 2 }, { chunkIndex: 1, source: 0, generation: 1 }],
    'header points at the copy; the untouched chunk 1 is still shared');
  t.same(oldHeader.chunkRefs[0], { chunkIndex: 0, source: 0, generation: 1 }, 'a snapshot header would still reach the old one');

  await map.setEntries([{ index: 3, entry: e2 }]);
  t.equal(map.stats.chunkNewNames - newBefore, 1, 'the copy is owned: later updates go in place');
  t.equal(map.lookup(2), e1, 'copied entries still name the shared objects');
  await map.close();
  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  t.same([await ro.lookupAsync(1), await ro.lookupAsync(2), await ro.lookupAsync(3), await ro.lookupAsync(4097)], [e2, e1, e2, e1]);
});

t.test('a failed chunk write rejects its callers and leaves the map usable', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  const e = map.newEntry();
  await map.setEntries([{ index: 0, entry: e }]);
  b.failNext('replace', 'EIO', `m.${map.id}.1.0`);
  await t.rejects(map.setEntries([{ index: 1, entry: e }]), { name: 'BlockerError', code: 'EIO' });
  t.equal(map.lookup(1), 0, 'memory still matches storage');
  await map.setEntries([{ index: 2, entry: e }]);
  await map.close();
  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  t.same([await ro.lookupAsync(0), await ro.lookupAsync(1), await ro.lookupAsync(2)], [e, 0, e]);

  const m2 = await VolumeMap.open(b, 'v', { forWrite: true });
  b.failNext('sync', 'EIO');
  await t.rejects(m2.setEntries([{ index: 5, entry: m2.newEntry() }]), /injected fault/, 'sync failure: no chunk write');
  t.equal(m2.stats.chunkWrites, 0);
});

t.test('a failed header write: the new chunk is reached by the next header write', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: 100 * GiB });
  const e = map.newEntry();
  b.failNext('replace', 'EIO', 'vol.v');
  await t.rejects(map.setEntries([{ index: 0, entry: e }]), { code: 'EIO' });
  t.same(decodeHeader(await b.readFull('vol.v'), 'vol.v').chunkRefs, [], 'on storage: old mapping');
  await map.setEntries([{ index: 4096, entry: e }]);
  const h = decodeHeader(await b.readFull('vol.v'), 'vol.v');
  t.same(h.chunkRefs.map((r) => r.chunkIndex), [0, 1], 'both chunks reachable now');
  await map.close();
  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  t.equal(await ro.lookupAsync(4096), e);
});

t.test('close waits for commits in flight and is idempotent', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  const g = gate(b, (op, name) => op === 'replace' && name.startsWith('m.'));
  const p = map.setEntries([{ index: 0, entry: map.newEntry() }]);
  await tick();
  let closed = false;
  const c1 = map.close().then(() => { closed = true; });
  const c2 = map.close();
  await tick();
  t.notOk(closed, 'close waits');
  g.release();
  await Promise.all([p, c1, c2]);
  t.ok(closed);
  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  t.equal(await ro.lookupAsync(0), map.newEntry());
});
