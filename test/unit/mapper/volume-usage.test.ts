/**
 * volumeUsage / allocatedUsage (src/mapper/volume-usage.ts): allocated counts
 * non-absent entries; exclusive drops when a snapshot shares the objects,
 * rises again after copy-up, covers clones, and ignores unrelated volumes.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { Volume } from '../../../src/compose/volume.js';
import { VolumeMap, cloneSnapshot, createSnapshot, removeVolume } from '../../../src/mapper/volume-map.js';
import { allocatedUsage, volumeUsage } from '../../../src/mapper/volume-usage.js';

const OBJ = 64 * 1024;
const SIZE = 16 * OBJ;

async function openVolume(b: MemoryBlocker, name: string, create: boolean): Promise<Volume> {
  const map = create
    ? await VolumeMap.create(b, name, { size: SIZE, objectSize: OBJ })
    : await VolumeMap.open(b, name, { forWrite: true });
  return new Volume(map, b, false);
}

async function write(v: Volume, index: number, byte: number, length = 4096): Promise<void> {
  await v.write(index * OBJ, Buffer.alloc(length, byte), false);
}

t.test('allocated and exclusive through snapshot, copy-up, clone, trim', async (t) => {
  const b = new MemoryBlocker();
  const v = await openVolume(b, 'v', true);
  t.same(await volumeUsage(b, 'v'), { allocatedObjects: 0, allocatedBytes: 0, exclusiveObjects: 0, exclusiveBytes: 0 }, 'empty');
  for (const i of [0, 1, 2, 3]) await write(v, i, i + 1);
  t.same(await volumeUsage(b, 'v'), { allocatedObjects: 4, allocatedBytes: 4 * OBJ, exclusiveObjects: 4, exclusiveBytes: 4 * OBJ }, 'all exclusive');
  t.same(await allocatedUsage(b, 'v'), { allocatedObjects: 4, allocatedBytes: 4 * OBJ }, 'allocatedUsage agrees');

  await v.quiesce(() => createSnapshot(b, v.map, 's'));
  t.same(await volumeUsage(b, 'v'), { allocatedObjects: 4, allocatedBytes: 4 * OBJ, exclusiveObjects: 0, exclusiveBytes: 0 }, 'snapshot shares everything');
  t.same(await volumeUsage(b, 's'), { allocatedObjects: 4, allocatedBytes: 4 * OBJ, exclusiveObjects: 0, exclusiveBytes: 0 }, 'and so does the snapshot');

  await write(v, 1, 9); // copy-up
  await write(v, 5, 9); // new object
  t.same(await volumeUsage(b, 'v'), { allocatedObjects: 5, allocatedBytes: 5 * OBJ, exclusiveObjects: 2, exclusiveBytes: 2 * OBJ }, 'copy-up and a new object are exclusive');
  t.match(await volumeUsage(b, 's'), { allocatedObjects: 4, exclusiveObjects: 1 }, 'the snapshot now alone has the old object 1');

  await v.trim(0, OBJ, false);
  t.match(await volumeUsage(b, 's'), { allocatedObjects: 4, exclusiveObjects: 2 }, 'trim in the origin leaves object 0 to the snapshot');
  t.match(await volumeUsage(b, 'v'), { allocatedObjects: 4, exclusiveObjects: 2 }, 'origin after trim');

  await cloneSnapshot(b, 's', 'c');
  t.match(await volumeUsage(b, 'c'), { allocatedObjects: 4, exclusiveObjects: 0 }, 'a fresh clone owns nothing');
  t.match(await volumeUsage(b, 's'), { allocatedObjects: 4, exclusiveObjects: 0 }, 'the clone shares the snapshot objects');
  const c = await openVolume(b, 'c', false);
  await write(c, 2, 7);
  await write(c, 15, 7, OBJ);
  t.match(await volumeUsage(b, 'c'), { allocatedObjects: 5, exclusiveObjects: 2 }, 'clone copy-up and new object');
  t.match(await volumeUsage(b, 's'), { allocatedObjects: 4, exclusiveObjects: 0 }, 'snapshot: 0, 1 shared with the clone, 2 with the origin');

  // An unrelated volume is never read.
  const u = await openVolume(b, 'u', true);
  await write(u, 0, 3);
  await u.close();
  const before = b.calls.readFull;
  t.match(await volumeUsage(b, 'u'), { allocatedObjects: 1, exclusiveObjects: 1 }, 'unrelated volume');
  t.ok(b.calls.readFull - before <= 5 + 1 + 1, 'headers plus its own chunk only');

  await c.close();
  await v.close();
  await removeVolume(b, 's');
  t.match(await volumeUsage(b, 'c'), { allocatedObjects: 5, exclusiveObjects: 4 }, 'snapshot removed: the clone alone has 0, 1 (the origin moved on), 2, 15; 3 stays shared');
});

t.test('errors', async (t) => {
  const b = new MemoryBlocker();
  await t.rejects(volumeUsage(b, 'nope'), { code: 'ARCH_E_NO_VOLUME' }, 'missing volume');
  await t.rejects(volumeUsage(b, '../x'), { code: 'ARCH_E_BAD_NAME' }, 'bad name');
});

t.test('several chunks, some missing in the related volume', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'big', { size: 3 * 4096 * OBJ, objectSize: OBJ });
  const v = new Volume(map, b, false);
  await write(v, 1, 1);
  await v.quiesce(() => createSnapshot(b, v.map, 'snap'));
  await write(v, 4096 * 2 + 5, 2);
  await write(v, 4096 * 2 + 6, 2);
  await write(v, 1, 3);
  await v.close();
  t.same(await volumeUsage(b, 'big'), { allocatedObjects: 3, allocatedBytes: 3 * OBJ, exclusiveObjects: 3, exclusiveBytes: 3 * OBJ });
  t.same(await volumeUsage(b, 'snap'), { allocatedObjects: 1, allocatedBytes: OBJ, exclusiveObjects: 1, exclusiveBytes: OBJ });
  t.same(await allocatedUsage(b, 'big'), { allocatedObjects: 3, allocatedBytes: 3 * OBJ });
});
