/**
 * src/mapper/volume-map.ts on the memory blocker: create, open, lookup,
 * setEntries, persistence across reopen, resize, read-only rules, corrupt and
 * missing metadata, the chunk cache, and durability ordering across a power cut.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { encodeChunk } from '../../../src/mapper/chunk-format.js';
import { EntryKind, makeEntry } from '../../../src/mapper/entry.js';
import {
  InvalidNameError, MapFormatError, UsageError, VolumeExistsError, VolumeNotFoundError,
} from '../../../src/mapper/errors.js';
import { VolumeFlags, decodeHeader, encodeHeader } from '../../../src/mapper/header-format.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

async function header(b: MemoryBlocker, name: string) {
  return decodeHeader(await b.readFull(`vol.${name}`), `vol.${name}`);
}

t.test('create writes one header and returns a writable map at generation 1', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'disk1', { size: 10 * GiB });
  t.equal(map.name, 'disk1');
  t.match(map.id, /^[0-9a-f]{16}$/);
  t.equal(map.size, 10 * GiB);
  t.equal(map.objectSize, 4 * MiB, 'default object size');
  t.equal(map.objectCount, 2560);
  t.equal(map.generation, 1);
  t.equal(map.writableSince, 1);
  t.equal(map.flags, 0);
  t.ok(map.writable);
  t.equal(map.chunkCount, 0);
  t.same(map.sources, [map.id]);
  t.equal(map.parent, null);
  t.ok(Math.abs(map.createdAt.getTime() - Date.now()) < 10_000);
  const names: string[] = [];
  for await (const n of b.list('')) names.push(n);
  t.same(names, ['vol.disk1'], 'only the header exists');
  const h = await header(b, 'disk1');
  t.equal(h.volumeId, map.id);
  t.equal(h.generation, 1);
  t.equal(map.lookup(0), 0, 'never-written object is absent');
  t.equal(map.lookup(2559), 0);
  await map.close();

  await t.rejects(VolumeMap.create(b, 'disk1', { size: GiB }), VolumeExistsError);
  await t.rejects(VolumeMap.create(b, 'disk1', { size: GiB }), { code: 'ARCH_E_VOLUME_EXISTS' });
  await t.rejects(VolumeMap.create(b, '../etc', { size: GiB }), InvalidNameError);
  await t.rejects(VolumeMap.create(b, 'x', { size: GiB, objectSize: 3 * MiB }), /object size 3145728: must be a power of two/);
  await t.rejects(VolumeMap.create(b, 'x', { size: GiB, objectSize: 2 ** 15 }), UsageError);
  await t.rejects(VolumeMap.create(b, 'x', { size: GiB, objectSize: 2 ** 27 }), UsageError);
  await t.rejects(VolumeMap.create(b, 'x', { size: -1 }), /volume size -1: must be a whole number/);
  await t.rejects(VolumeMap.create(b, 'x', { size: 2 ** 53 }), UsageError);
  await t.rejects(VolumeMap.create(b, 'x', { size: 1.5 }), UsageError);
  const small = await VolumeMap.create(b, 'small', { size: 0, objectSize: 64 * 1024 });
  t.equal(small.objectCount, 0);
  t.equal(small.objectSizeLog2, 16);
});

t.test('open: not found, generation bump on write, read-only rules', async (t) => {
  const b = new MemoryBlocker();
  await t.rejects(VolumeMap.open(b, 'nope', { forWrite: false }), { code: 'ARCH_E_NO_VOLUME', message: 'volume "nope": no such volume' });
  await t.rejects(VolumeMap.open(b, 'a/b', { forWrite: false }), InvalidNameError);
  const created = await VolumeMap.create(b, 'v', { size: GiB });
  await created.close();

  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  t.equal(ro.generation, 1, 'read-only open does not bump');
  t.notOk(ro.writable);
  t.equal((await header(b, 'v')).generation, 1);
  await t.rejects(ro.setEntries([{ index: 0, entry: ro.newEntry() }]), /volume "v": map is open read-only/);
  await t.rejects(ro.resize(2 * GiB), UsageError);
  t.notOk(ro.isOwned(makeEntry(EntryKind.DATA, 0, 1)), 'a read-only map owns nothing');

  const rw = await VolumeMap.open(b, 'v', { forWrite: true });
  t.equal(rw.generation, 2);
  t.equal((await header(b, 'v')).generation, 2, 'bump persisted before open returns');
  const rw2 = await VolumeMap.open(b, 'v', { forWrite: true });
  t.equal(rw2.generation, 3, 'each writable open gets a new generation');

  const h = await header(b, 'v');
  await b.replace('vol.v', encodeHeader({ ...h, flags: VolumeFlags.READONLY }));
  await t.rejects(VolumeMap.open(b, 'v', { forWrite: true }), /volume "v": is read-only, cannot open it for writing/);
  t.ok(await VolumeMap.open(b, 'v', { forWrite: false }));
  await b.replace('vol.v', encodeHeader({ ...h, generation: 0xffffffff }));
  await t.rejects(VolumeMap.open(b, 'v', { forWrite: true }), /generation counter exhausted/);
});

t.test('setEntries persists; reopen reads chunks lazily', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: 100 * GiB });
  t.equal(map.objectCount, 25600);
  const e = map.newEntry();
  t.equal(map.objectName(e, 0x1234), `d.${map.id}.1.1234`);
  t.equal(map.newObjectName(0x1234), `d.${map.id}.1.1234`);
  t.ok(map.isOwned(e));
  t.notOk(map.isOwned(0), 'absent is not owned');
  await map.setEntries([]);
  await map.setEntries([{ index: 0, entry: e }, { index: 4095, entry: e }, { index: 4096, entry: e }, { index: 25599, entry: e }]);
  t.equal(map.lookup(0), e);
  t.equal(map.lookup(1), 0);
  t.equal(map.lookup(4096), e);
  t.equal(map.lookup(25599), e);
  t.equal(map.chunkCount, 3, 'chunks 0, 1 and 6');
  t.equal(map.stats.chunkWrites, 3);
  t.equal(map.stats.chunkNewNames, 3);
  await map.setEntries([{ index: 1, entry: e }, { index: 0, entry: 0 }]);
  t.equal(map.lookup(0), 0, 'unmapped');
  t.equal(map.stats.chunkNewNames, 3, 'owned chunk rewritten in place');
  await map.close();
  await t.rejects(map.setEntries([{ index: 1, entry: e }]), /map is closed/);
  t.throws(() => map.lookup(0), /map is closed/);

  const names = new Set<string>();
  for await (const n of b.list('m.')) names.add(n);
  t.same([...names].sort(), [`m.${map.id}.1.0`, `m.${map.id}.1.1`, `m.${map.id}.1.6`]);
  const h = await header(b, 'v');
  t.same(h.chunkRefs, [
    { chunkIndex: 0, source: 0, generation: 1 },
    { chunkIndex: 1, source: 0, generation: 1 },
    { chunkIndex: 6, source: 0, generation: 1 },
  ]);

  const again = await VolumeMap.open(b, 'v', { forWrite: false });
  t.equal(again.lookup(0), undefined, 'chunk exists but is not loaded');
  t.equal(again.lookup(8192), 0, 'chunk 2 does not exist: absent without I/O');
  t.equal(await again.lookupAsync(1), e);
  t.equal(again.lookup(0), 0);
  t.equal(again.lookup(4095), e);
  await again.ensureChunk(6);
  await again.ensureChunk(5);
  t.equal(again.lookup(25599), e);
  t.equal(again.stats.chunkLoads, 2);
  t.throws(() => again.lookup(25600), /object index 25600 outside volume "v" \(25600 objects\)/);
  t.throws(() => again.lookup(-1), /outside/);
});

t.test('entries written in one session stay owned after a plain reopen', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  const e1 = map.newEntry();
  await map.setEntries([{ index: 3, entry: e1 }]);
  await map.close();
  const map2 = await VolumeMap.open(b, 'v', { forWrite: true });
  const got = await map2.lookupAsync(3);
  t.equal(got, e1);
  t.ok(map2.isOwned(got), 'generation 1 ≥ writableSince 1: write in place, no copy');
  t.not(map2.newEntry(), e1, 'new objects get the new generation');
  await map2.setEntries([{ index: 4, entry: map2.newEntry() }]);
  t.equal(map2.stats.chunkNewNames, 0, 'the chunk is owned, rewritten under its old name');
  const h = await header(b, 'v');
  t.same(h.chunkRefs, [{ chunkIndex: 0, source: 0, generation: 1 }]);
});

t.test('setEntries asserts what the layers above validated', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  await t.rejects(map.setEntries([{ index: 256, entry: map.newEntry() }]), /object index 256 outside/);
  await t.rejects(map.setEntries([{ index: 0, entry: makeEntry(EntryKind.DATA, 1, 1) }]), /names source 1, but the header has 1/);
  await t.rejects(map.setEntries([{ index: 0, entry: makeEntry(EntryKind.DATA, 0, 2) }]), /generation newer than the volume's/);
  await t.rejects(map.setEntries([{ index: 0, entry: makeEntry(EntryKind.CONTENT, 0, 1) }]), /content entry names hash 1, but the chunk's hash table has 0/);
  await t.rejects(map.setEntries([{ index: 0, entry: -1 }]), /bad map entry -1/);
  t.throws(() => map.objectName(0, 1), /not a data entry/);
});

t.test('resize grows only and persists', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  await map.resize(GiB);
  t.equal(map.stats.headerWrites, 0, 'same size: nothing to write');
  await map.resize(3 * GiB);
  t.equal(map.size, 3 * GiB);
  t.equal(map.objectCount, 768);
  await map.setEntries([{ index: 700, entry: map.newEntry() }]);
  await t.rejects(map.resize(GiB), /volume "v": cannot shrink from 3221225472 to 1073741824 bytes/);
  await t.rejects(map.resize(2 ** 53), UsageError);
  t.equal((await header(b, 'v')).size, 3 * GiB);
  await map.close();
  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  t.equal(ro.size, 3 * GiB);
  t.equal(await ro.lookupAsync(700), map.newEntry());
});

t.test('corrupt or missing metadata is an error, never zeros', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  const e = map.newEntry();
  await map.setEntries([{ index: 1, entry: e }]);
  await map.close();
  const chunk = `m.${map.id}.1.0`;
  const good = await b.readFull(chunk);

  const flipped = Buffer.from(good);
  flipped[36]! ^= 4;
  await b.replace(chunk, flipped);
  const ro = await VolumeMap.open(b, 'v', { forWrite: false });
  t.equal(ro.lookup(1), undefined);
  await t.rejects(ro.lookupAsync(1), { code: 'ARCH_E_MAP_CORRUPT', objectName: chunk, message: /bad CRC/ });
  t.equal(ro.lookup(1), undefined, 'still unknown, not zero');

  await b.replace(chunk, encodeChunk({ volumeId: map.id, generation: 1, chunkIndex: 1 }, new Float64Array(4096)));
  const ro2 = await VolumeMap.open(b, 'v', { forWrite: false });
  await t.rejects(ro2.lookupAsync(1), /chunk says volume .* index 1, expected .* index 0/);

  await b.remove(chunk);
  const ro3 = await VolumeMap.open(b, 'v', { forWrite: true });
  const err = await ro3.lookupAsync(1).catch((x: unknown) => x);
  t.ok(err instanceof MapFormatError);
  t.match((err as Error).message, `map object "${chunk}": missing, but the header of "v" references it`);
  t.equal(((err as Error).cause as { code?: string }).code, 'ENOENT', 'cause is the blocker error');
  await t.rejects(ro3.setEntries([{ index: 2, entry: ro3.newEntry() }]), MapFormatError, 'cannot update a chunk it cannot read');

  await b.replace(chunk, good);
  t.equal(await (await VolumeMap.open(b, 'v', { forWrite: false })).lookupAsync(1), e, 'repaired');

  const hdr = await b.readFull('vol.v');
  await b.replace('vol.v', hdr.subarray(0, hdr.length - 1));
  await t.rejects(VolumeMap.open(b, 'v', { forWrite: false }), { code: 'ARCH_E_MAP_CORRUPT', objectName: 'vol.v', message: /truncated/ });
  await b.replace('vol.v', Buffer.alloc(0));
  await t.rejects(VolumeMap.open(b, 'v', { forWrite: false }), /map object "vol.v": truncated: 0 bytes/);
  await t.rejects(VolumeMap.create(b, 'v', { size: GiB }), MapFormatError, 'a corrupt header still holds its name');

  b.failNext('readFull', 'EIO', 'vol.v');
  await t.rejects(VolumeMap.open(b, 'v', { forWrite: false }), { name: 'BlockerError', code: 'EIO' }, 'I/O errors pass through');
  await t.rejects(VolumeMap.open(b, 'zz', { forWrite: false }), VolumeNotFoundError);
});

t.test('chunk cache: LRU eviction, coalesced loads', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: 64 * GiB, objectSize: 64 * 1024, cacheChunks: 2 });
  t.equal(map.objectCount, 2 ** 20);
  const e = map.newEntry();
  await map.setEntries(Array.from({ length: 10 }, (_, c) => ({ index: c * 4096 + c, entry: e })));
  t.ok(map.stats.evictions >= 8, `evicted ${map.stats.evictions}`);
  for (let c = 0; c < 10; c++) t.equal(await map.lookupAsync(c * 4096 + c), e, `chunk ${c}`);
  await map.close();

  const ro = await VolumeMap.open(b, 'v', { forWrite: false, cacheChunks: 4 });
  let release!: () => void;
  const gate = new Promise<void>((r) => { release = r; });
  b.setFaultHook(async (op) => { if (op === 'readFull') await gate; });
  const before = b.calls.readFull;
  const lookups = Array.from({ length: 20 }, () => ro.lookupAsync(3 * 4096 + 3));
  const ensure = ro.ensureChunk(3);
  await new Promise((r) => setImmediate(r));
  release();
  t.same(await Promise.all(lookups), Array(20).fill(e));
  await ensure;
  t.equal(b.calls.readFull - before, 1, '21 concurrent requests, one read');
  b.setFaultHook(undefined);
  for (let c = 0; c < 10; c++) await ro.ensureChunk(c);
  t.equal(ro.stats.evictions, 6, 'cache holds 4');
});

t.test('data objects are synced before the chunk that names them (power cut)', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: GiB });
  const order: string[] = [];
  b.setFaultHook((op, name) => { if (op !== 'readFull') order.push(`${op} ${name}`); });
  const name = map.newObjectName(5);
  await b.write(name, 0, Buffer.from('hello'));
  await map.setEntries([{ index: 5, entry: map.newEntry() }]);
  t.same(order, [`write ${name}`, 'sync ', `replace m.${map.id}.1.0`, 'replace vol.v'], 'object, sync, chunk, header');
  t.equal(map.stats.dataSyncs, 1);
  b.powerCut({ keepUnsynced: 'none' });
  const after = await VolumeMap.open(b.reopen(), 'v', { forWrite: false });
  const entry = await after.lookupAsync(5);
  t.equal(after.objectName(entry, 5), name);
  t.same(await b.readFull(name), Buffer.from('hello'), 'the object the map names survived');

  order.length = 0;
  const name6 = map.newObjectName(6);
  await map.setEntries([{ index: 6, entry: map.newEntry() }], { dataSynced: true });
  t.same(order, [`replace m.${map.id}.1.0`], 'dataSynced: no sync; owned chunk: no header write');
  t.equal(name6, `d.${map.id}.1.6`);

  // Entries that name objects we do not own (a parent's) are not synced by us.
  order.length = 0;
  await map.markShared();
  await map.setEntries([{ index: 7, entry: makeEntry(EntryKind.DATA, 0, 1) }]);
  t.notOk(order.some((o) => o.startsWith('sync')), 'shared object: nothing to sync');
});

t.test('a read-only map tolerates a writer that moved on since it opened', async (t) => {
  const b = new MemoryBlocker();
  const w1 = await VolumeMap.create(b, 'v', { size: GiB });
  await w1.setEntries([{ index: 0, entry: w1.newEntry() }]);
  await w1.close();
  const reader = await VolumeMap.open(b, 'v', { forWrite: false });
  const w2 = await VolumeMap.open(b, 'v', { forWrite: true });
  await w2.setEntries([{ index: 1, entry: w2.newEntry() }]); // same chunk, in place, generation 2
  t.equal(reader.generation, 1);
  t.equal(await reader.lookupAsync(1), w2.newEntry(), 'a newer entry is not mistaken for corruption');
});
