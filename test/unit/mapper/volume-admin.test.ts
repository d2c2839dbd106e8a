/**
 * listVolumes, removeVolume and renameVolume, including a crash after each
 * step of the rename protocol (volume-rename.ts) and of removal.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { MapFormatError, UsageError, VolumeExistsError, VolumeNotFoundError } from '../../../src/mapper/errors.js';
import { decodeHeader, encodeHeader } from '../../../src/mapper/header-format.js';
import { VolumeMap, listVolumes, removeVolume, renameVolume } from '../../../src/mapper/volume-map.js';

const GiB = 2 ** 30;

async function names(b: MemoryBlocker, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for await (const n of b.list(prefix)) out.push(n);
  return out.sort();
}

/** A volume with two chunks and three data objects. */
async function populated(b: MemoryBlocker, name: string): Promise<string> {
  const map = await VolumeMap.create(b, name, { size: 100 * GiB });
  const e = map.newEntry();
  for (const i of [0, 1, 5000]) await b.write(map.newObjectName(i), 0, Buffer.from(name));
  await map.setEntries([0, 1, 5000].map((index) => ({ index, entry: e })));
  await map.close();
  return map.id;
}

t.test('listVolumes', async (t) => {
  const b = new MemoryBlocker();
  t.same(await listVolumes(b), []);
  for (const n of ['b', 'a', 'c.1', 'A']) await (await VolumeMap.create(b, n, { size: GiB })).close();
  await b.replace('vol.bad..name', Buffer.from('x'));
  await b.replace('volx', Buffer.from('x'));
  await b.replace('vol.corrupt', Buffer.from('garbage'));
  t.same(await listVolumes(b), ['A', 'a', 'b', 'c.1', 'corrupt'], 'sorted; invalid names skipped; corrupt headers listed');
  await t.rejects(VolumeMap.open(b, 'corrupt', { forWrite: false }), MapFormatError);
});

t.test('removeVolume deletes the header, then every chunk and data object of the volume', async (t) => {
  const b = new MemoryBlocker();
  const id = await populated(b, 'gone');
  const keep = await populated(b, 'kept');
  t.equal((await names(b)).length, 2 * (1 + 2 + 3));
  const result = await removeVolume(b, 'gone');
  t.same(result, { volumeId: id, removedObjects: 5 });
  t.same(await names(b), (await names(b)).filter((n) => !n.includes(id)));
  t.notOk((await names(b)).some((n) => n.includes(id) || n === 'vol.gone'));
  t.equal((await names(b)).filter((n) => n.includes(keep)).length, 5, 'other volume untouched');
  t.same(await listVolumes(b), ['kept']);
  await t.rejects(removeVolume(b, 'gone'), VolumeNotFoundError);
  await t.rejects(VolumeMap.open(b, 'gone', { forWrite: false }), VolumeNotFoundError);
  await t.rejects(removeVolume(b, '../kept'), { code: 'ARCH_E_BAD_NAME' });
});

t.test('removeVolume leaves objects to GC when another header may reference them', async (t) => {
  const b = new MemoryBlocker();
  const id = await populated(b, 'origin');
  // A clone (later issue) lists its parent's id among its sources.
  const cloneId = '00000000000000c1';
  await b.replace('vol.clone', encodeHeader({
    flags: 0, volumeId: cloneId, size: 100 * GiB, objectSizeLog2: 22, generation: 1, writableSince: 1,
    createdAt: 0, sources: [id, cloneId], writerSource: 1, parent: { name: 'origin', volumeId: id },
    renameTo: null, renamedFrom: null, chunkRefs: [{ chunkIndex: 0, source: 0, generation: 1 }],
  }));
  const r = await removeVolume(b, 'origin');
  t.same(r, { volumeId: id, removedObjects: 0, objectsKeptBecause: '"clone" shares its objects' });
  t.equal((await names(b)).filter((n) => n.includes(id) && !n.startsWith('vol.')).length, 5);
  t.same(await listVolumes(b), ['clone']);

  const id2 = await populated(b, 'other');
  await b.replace('vol.broken', Buffer.alloc(3));
  const r2 = await removeVolume(b, 'other');
  t.equal(r2.removedObjects, 0);
  t.match(r2.objectsKeptBecause, /header of "broken" is unreadable/);
  t.equal((await names(b)).filter((n) => n.includes(id2)).length, 5);
});

t.test('removeVolume: the header removal is durable before any object goes', async (t) => {
  const b = new MemoryBlocker();
  const id = await populated(b, 'v');
  await b.sync();
  const order: string[] = [];
  b.setFaultHook((op, name) => {
    if (op === 'remove' || op === 'sync') order.push(`${op} ${name}`);
    if (op === 'remove' && name.startsWith('m.')) return 'EIO'; // "crash" at the first chunk
    return undefined;
  });
  await t.rejects(removeVolume(b, 'v'), { code: 'EIO' });
  t.equal(order[0], 'remove vol.v', 'header first');
  t.equal(order[1], 'sync ', 'made durable');
  t.match(order[2], new RegExp(`^remove m\\.${id}\\.1\\.[01]$`), 'then the chunks');
  b.setFaultHook(undefined);
  b.powerCut({ keepUnsynced: 'none' });
  const after = b.reopen();
  await t.rejects(VolumeMap.open(after, 'v', { forWrite: false }), VolumeNotFoundError, 'no header pointing at missing chunks');
  t.same(await listVolumes(after), []);
});

t.test('renameVolume keeps the id and the data', async (t) => {
  const b = new MemoryBlocker();
  const id = await populated(b, 'old');
  await renameVolume(b, 'old', 'new');
  t.same(await listVolumes(b), ['new']);
  t.same((await names(b, 'vol.')), ['vol.new']);
  const h = decodeHeader(await b.readFull('vol.new'), 'vol.new');
  t.equal(h.volumeId, id);
  t.equal(h.renameTo, null);
  t.equal(h.renamedFrom, null);
  const map = await VolumeMap.open(b, 'new', { forWrite: true });
  t.equal(map.objectName(await map.lookupAsync(5000), 5000), `d.${id}.1.1388`);
  t.equal(map.generation, 2);
  await map.close();
  await t.rejects(renameVolume(b, 'old', 'x'), VolumeNotFoundError);
  await populated(b, 'x');
  await t.rejects(renameVolume(b, 'new', 'x'), VolumeExistsError);
  await t.rejects(renameVolume(b, 'new', 'new'), UsageError);
  await t.rejects(renameVolume(b, 'new', 'a/b'), { code: 'ARCH_E_BAD_NAME' });
  t.same(await listVolumes(b), ['new', 'x']);
});

/** Runs a rename that "crashes" (fails) at the n-th blocker mutation it makes. */
async function crashRename(b: MemoryBlocker, step: number): Promise<void> {
  let count = 0;
  b.setFaultHook((op) => {
    if (op !== 'replace' && op !== 'remove') return undefined;
    return ++count === step ? 'EIO' : undefined;
  });
  await renameVolume(b, 'old', 'new').then(() => { throw new Error('rename should have failed'); }, () => undefined);
  b.setFaultHook(undefined);
}

t.test('rename interrupted before step 2: the rename did not happen', async (t) => {
  const b = new MemoryBlocker();
  const id = await populated(b, 'old');
  await crashRename(b, 2); // step 1 done, step 2 (write vol.new) fails
  t.equal(decodeHeader(await b.readFull('vol.old'), 'vol.old').renameTo, 'new', 'intent marker on storage');
  t.same(await listVolumes(b), ['old']);
  await t.rejects(VolumeMap.open(b, 'new', { forWrite: false }), VolumeNotFoundError);
  const map = await VolumeMap.open(b, 'old', { forWrite: true });
  t.equal(map.id, id);
  t.equal(decodeHeader(await b.readFull('vol.old'), 'vol.old').renameTo, null, 'marker cleared by the next header write');
  await map.close();
  await renameVolume(b, 'old', 'new');
  t.same(await listVolumes(b), ['new']);
});

for (const reader of ['open old', 'open new', 'remove new', 'rename new', 'create old'] as const) {
  t.test(`rename interrupted after the commit point (step 2), then: ${reader}`, async (t) => {
    const b = new MemoryBlocker();
    const id = await populated(b, 'old');
    await crashRename(b, 3); // steps 1, 2 done; step 3 (remove vol.old) fails
    t.same(await names(b, 'vol.'), ['vol.new', 'vol.old'], 'two headers with one id on storage');
    t.same(await listVolumes(b), ['new'], 'list shows the volume once, under its new name');
    t.same(await names(b, 'vol.'), ['vol.new', 'vol.old'], 'listing changed nothing');
    switch (reader) {
      case 'open old':
        await t.rejects(VolumeMap.open(b, 'old', { forWrite: false }), { code: 'ARCH_E_NO_VOLUME', message: 'volume "old": renamed to "new"' });
        t.same(await names(b, 'vol.'), ['vol.new', 'vol.old'], 'a read-only open writes nothing');
        await t.rejects(VolumeMap.open(b, 'old', { forWrite: true }), { code: 'ARCH_E_NO_VOLUME', message: 'volume "old": renamed to "new"' });
        break;
      case 'open new': {
        const map = await VolumeMap.open(b, 'new', { forWrite: false });
        t.equal(map.id, id);
        await (await VolumeMap.open(b, 'new', { forWrite: true })).close();
        break;
      }
      case 'remove new':
        t.same(await removeVolume(b, 'new'), { volumeId: id, removedObjects: 5 });
        t.same(await names(b), [], 'nothing left: the stale header did not keep or resurrect anything');
        await t.rejects(VolumeMap.open(b, 'old', { forWrite: false }), VolumeNotFoundError);
        return;
      case 'rename new':
        await renameVolume(b, 'new', 'newer');
        t.same(await names(b, 'vol.'), ['vol.newer']);
        return;
      case 'create old': {
        const fresh = await VolumeMap.create(b, 'old', { size: GiB });
        t.not(fresh.id, id, 'the old name is free again');
        t.same(await listVolumes(b), ['new', 'old']);
        return;
      }
    }
    t.same(await names(b, 'vol.'), ['vol.new'], 'the stale header is gone');
    await t.rejects(VolumeMap.open(b, 'old', { forWrite: false }), VolumeNotFoundError);
    const map = await VolumeMap.open(b, 'new', { forWrite: true });
    t.equal(map.id, id);
    t.equal(decodeHeader(await b.readFull('vol.new'), 'vol.new').renamedFrom, null);
  });
}

t.test('rename interrupted after step 3: only the new header, with a harmless marker', async (t) => {
  const b = new MemoryBlocker();
  const id = await populated(b, 'old');
  await crashRename(b, 4); // step 4 (rewrite vol.new) fails
  t.same(await names(b, 'vol.'), ['vol.new']);
  t.equal(decodeHeader(await b.readFull('vol.new'), 'vol.new').renamedFrom, 'old');
  t.same(await listVolumes(b), ['new']);
  const reuse = await VolumeMap.create(b, 'old', { size: GiB });
  await reuse.close();
  const map = await VolumeMap.open(b, 'new', { forWrite: true });
  t.equal(map.id, id);
  t.ok(await VolumeMap.open(b, 'old', { forWrite: false }), 'a new volume under the old name is not mistaken for a leftover');
});

t.test('a corrupt rename partner stops the operation instead of guessing', async (t) => {
  const b = new MemoryBlocker();
  await populated(b, 'old');
  await crashRename(b, 3);
  await b.replace('vol.new', Buffer.from('junk'));
  await t.rejects(VolumeMap.open(b, 'old', { forWrite: true }), {
    code: 'ARCH_E_MAP_CORRUPT', objectName: 'vol.new', message: /needed to settle the interrupted rename of "old"/,
  });
});
