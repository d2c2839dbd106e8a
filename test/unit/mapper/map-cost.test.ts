/**
 * What the map costs on storage (DESIGN.md §3: 8 bytes per allocated object,
 * nothing for never-written ranges, an empty volume is one header). Prints the
 * measured numbers.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';

const PiB = 2 ** 50;

async function mapBytes(b: MemoryBlocker): Promise<{ header: number; chunks: number }> {
  let header = 0;
  let chunks = 0;
  for await (const n of b.list('vol.')) header += (await b.stat(n)).size;
  for await (const n of b.list('m.')) chunks += (await b.stat(n)).size;
  return { header, chunks };
}

async function allocate(objects: number, indexOf: (i: number) => number, size = PiB) {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size });
  const e = map.newEntry();
  const batch = 4096;
  for (let i = 0; i < objects; i += batch) {
    await map.setEntries(Array.from({ length: Math.min(batch, objects - i) }, (_, k) => ({ index: indexOf(i + k), entry: e })),
      { dataSynced: true });
  }
  await map.close();
  return mapBytes(b);
}

t.test('an empty 1 PiB volume is one small header', async (t) => {
  const b = new MemoryBlocker();
  await (await VolumeMap.create(b, 'v', { size: PiB })).close();
  const { header, chunks } = await mapBytes(b);
  t.equal(chunks, 0);
  t.ok(header < 512, `header ${header} bytes`);
  t.equal(header, 92);
  t.comment(`empty 1 PiB volume: ${header} bytes of map`);
});

t.test('allocated objects cost ≤ 8.1 bytes each (+ the header)', async (t) => {
  const tenK = await allocate(10_000, (i) => i);
  const perObject = tenK.chunks / 10_000;
  t.ok(perObject <= 8.1, `${perObject.toFixed(4)} bytes/object`);
  t.ok(tenK.header <= 92 + 3 * 12, 'header grows 12 bytes per chunk');
  t.comment(`10,000 contiguous objects: chunks ${tenK.chunks} B = ${perObject.toFixed(4)} B/object, `
    + `header ${tenK.header} B, total ${((tenK.chunks + tenK.header) / 10_000).toFixed(4)} B/object`);

  const full = await allocate(3 * 4096, (i) => i);
  t.equal(full.chunks, 3 * 32804);
  t.comment(`12,288 objects (3 full chunks): ${(full.chunks / 12288).toFixed(4)} B/object`);

  const strided = await allocate(10_000, (i) => i * 2);
  t.comment(`10,000 objects, every other index: ${(strided.chunks / 10_000).toFixed(3)} B/object`);
  t.ok(strided.chunks / 10_000 <= 2 * 8.1);
});

t.test('sparse allocation: a chunk stores only its run of entries', async (t) => {
  const sparse = await allocate(100, (i) => i * 4096 * 10 + (i % 4096));
  t.equal(sparse.chunks, 100 * 44, 'one isolated object: a 44-byte chunk');
  t.equal(sparse.header, 92 + 100 * 12);
  t.comment(`100 objects 40 GiB apart: ${sparse.chunks / 100} B/object + 12 B of header each`);
  const worst = await allocate(2, (i) => i * 4095);
  t.equal(worst.chunks, 32804, 'worst case: entries at both ends of one chunk');
  const whole = 2 ** 28; // 1 PiB / 4 MiB
  t.comment(`upper bound, 1 PiB fully allocated: ${(whole / 4096 * 32804 / 2 ** 30).toFixed(4)} GiB chunks + `
    + `${((92 + whole / 4096 * 12) / 2 ** 10).toFixed(0)} KiB header`);
});
