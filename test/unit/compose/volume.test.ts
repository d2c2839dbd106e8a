/**
 * src/compose/volume.ts on the memory blocker (64 KiB objects, a small
 * volume): reads of holes, unaligned round trips, trim/zero/fast-zero,
 * copy-up after a (faked) snapshot, FUA and FLUSH durability across a power
 * cut, flush ordering, missing objects, blocker failures, and trims racing
 * writes on one object.
 */
import t, { type Test } from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { Volume } from '../../../src/compose/volume.js';
import { HOLE_ZERO, type ReadPiece } from '../../../src/compose/types.js';
import { ENTRY_ABSENT } from '../../../src/mapper/entry.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';

const KiB = 1024;
const OBJ = 64 * KiB;
const OBJECTS = 8;
const SIZE = OBJECTS * OBJ;
const NAME = 'vol1';

interface Setup {
  blocker: MemoryBlocker;
  map: VolumeMap;
  vol: Volume;
}

async function setup(blocker = new MemoryBlocker()): Promise<Setup> {
  const map = await VolumeMap.create(blocker, NAME, { size: SIZE, objectSize: OBJ });
  return { blocker, map, vol: new Volume(map, blocker, false) };
}

/** Opens the volume again on the same storage (after a power cut: no close). */
async function reopen(blocker: MemoryBlocker): Promise<Setup> {
  const map = await VolumeMap.open(blocker, NAME, { forWrite: true });
  return { blocker, map, vol: new Volume(map, blocker, false) };
}

/** A recognisable pattern: byte i is a function of (seed, absolute position). */
function pattern(seed: number, at: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((at + i) * 31 + seed * 97 + ((at + i) >>> 9)) & 0xff || 1;
  return b;
}

/** Checks the pieces tile the range in order and returns the bytes (holes as zeros). */
function assemble(t: Test, offset: number, length: number, pieces: ReadPiece[]): Buffer {
  const out = Buffer.alloc(length);
  let pos = offset;
  for (const p of pieces) {
    t.equal(p.offset, pos, 'pieces are contiguous');
    if (p.data) {
      t.equal(p.data.length, p.length, 'data piece length');
      p.data.copy(out, p.offset - offset);
    }
    pos += p.length;
  }
  t.equal(pos, offset + length, 'pieces cover the range');
  return out;
}

async function readBuf(t: Test, vol: Volume, offset: number, length: number): Promise<Buffer> {
  return assemble(t, offset, length, await vol.read(offset, length));
}

function isZero(b: Buffer): boolean {
  for (const x of b) if (x !== 0) return false;
  return true;
}

async function exists(b: MemoryBlocker, name: string): Promise<boolean> {
  try {
    await b.stat(name);
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') return false;
    throw err;
  }
}

function dataName(map: VolumeMap, index: number): string {
  const entry = map.lookup(index);
  if (entry === undefined || entry === ENTRY_ABSENT) throw new Error(`object ${index} is not mapped`);
  return map.objectName(entry, index);
}

async function readObject(b: MemoryBlocker, name: string): Promise<Buffer> {
  const buf = Buffer.alloc(OBJ);
  await b.read(name, 0, OBJ, buf);
  return buf;
}

t.test('a never-written range reads as one hole piece', async (t) => {
  const { vol } = await setup();
  const pieces = await vol.read(1000, 3 * OBJ);
  t.same(pieces, [{ offset: 1000, length: 3 * OBJ }], 'one hole, no data');
  t.same(await vol.read(0, SIZE), [{ offset: 0, length: SIZE }], 'the whole volume');
  t.same(await vol.read(5, 0), [], 'length 0');
  t.same(await vol.blockStatus(0, SIZE), [{ length: SIZE, flags: HOLE_ZERO }]);
});

t.test('unaligned write/read round trips spanning 3 objects', async (t) => {
  const { vol, map, blocker } = await setup();
  const at = OBJ - 100;
  const len = OBJ + 300; // tail of object 0, all of 1, head of 2
  const data = pattern(1, at, len);
  await vol.write(at, data, false);
  t.same(await readBuf(t, vol, at, len), data, 'exact range');
  const wide = await readBuf(t, vol, 0, 4 * OBJ);
  t.ok(isZero(wide.subarray(0, at)), 'zeros before');
  t.same(wide.subarray(at, at + len), data);
  t.ok(isZero(wide.subarray(at + len)), 'zeros after');
  t.same(await vol.read(3 * OBJ, OBJ), [{ offset: 3 * OBJ, length: OBJ }], 'object 3 still a hole');
  t.same(await vol.blockStatus(0, 4 * OBJ), [{ length: 3 * OBJ, flags: 0 }, { length: OBJ, flags: HOLE_ZERO }]);
  t.equal(vol.stats.allocations, 3);

  // Overwrite in place, unaligned, across the same boundaries.
  const at2 = 2 * OBJ - 7;
  const data2 = pattern(2, at2, 20);
  await vol.write(at2, data2, false);
  const expect = Buffer.alloc(4 * OBJ);
  data.copy(expect, at);
  data2.copy(expect, at2);
  t.same(await readBuf(t, vol, 0, 4 * OBJ), expect, 'second write overlays the first');
  t.equal(vol.stats.allocations, 3, 'in-place writes allocate nothing');
  for (let i = 0; i < 3; i++) t.ok(await exists(blocker, dataName(map, i)), `object ${i} exists`);
});

t.test('whole-object trim unmaps and removes the object', async (t) => {
  const { vol, map, blocker } = await setup();
  await vol.write(OBJ, pattern(3, OBJ, OBJ), false);
  await vol.write(2 * OBJ + 10, pattern(4, 2 * OBJ + 10, 10), false);
  const name = dataName(map, 1);
  t.ok(await exists(blocker, name));
  await vol.trim(OBJ, OBJ, false);
  t.equal(map.lookup(1), ENTRY_ABSENT, 'unmapped');
  t.same(await vol.blockStatus(OBJ, OBJ), [{ length: OBJ, flags: HOLE_ZERO }]);
  t.same(await vol.read(OBJ, OBJ), [{ offset: OBJ, length: OBJ }], 'reads as a hole');
  t.notOk(await exists(blocker, name), 'data object removed');
  t.equal(vol.stats.unmaps, 1);
  t.same(await vol.blockStatus(2 * OBJ, OBJ), [{ length: OBJ, flags: 0 }], 'neighbour untouched');

  // A trim of a range covering one object wholly and others partly.
  await vol.write(0, pattern(5, 0, 3 * OBJ), false);
  await vol.trim(100, 2 * OBJ, false);
  const buf = await readBuf(t, vol, 0, 3 * OBJ);
  t.same(buf.subarray(0, 100), pattern(5, 0, 100));
  t.ok(isZero(buf.subarray(100, 2 * OBJ + 100)), 'trimmed range reads zeros');
  t.same(buf.subarray(2 * OBJ + 100), pattern(5, 2 * OBJ + 100, OBJ - 100));
  t.same(await vol.blockStatus(0, 3 * OBJ), [
    { length: OBJ, flags: 0 }, { length: OBJ, flags: HOLE_ZERO }, { length: OBJ, flags: 0 },
  ]);
  t.equal(vol.stats.unmaps, 2);
});

t.test('partial trim and zero read back zeros, keep the object', async (t) => {
  const { vol } = await setup();
  const data = pattern(6, 2 * OBJ, OBJ);
  await vol.write(2 * OBJ, data, false);
  await vol.trim(2 * OBJ + 100, 1000, false);
  await vol.zero(2 * OBJ + 5000, 3, { fua: false, noHole: false, fastZero: false });
  await vol.zero(2 * OBJ + 9000, 4000, { fua: true, noHole: true, fastZero: false });
  const expect = Buffer.from(data);
  expect.fill(0, 100, 1100);
  expect.fill(0, 5000, 5003);
  expect.fill(0, 9000, 13000);
  t.same(await readBuf(t, vol, 2 * OBJ, OBJ), expect);
  t.same(await vol.blockStatus(2 * OBJ, OBJ), [{ length: OBJ, flags: 0 }], 'still allocated');
  t.equal(vol.stats.unmaps, 0);
  // A partial trim of an absent object does nothing at all.
  await vol.trim(4 * OBJ + 1, 10, false);
  t.same(await vol.blockStatus(4 * OBJ, OBJ), [{ length: OBJ, flags: HOLE_ZERO }]);
  t.equal(vol.stats.allocations, 1);
});

t.test('zero with noHole allocates', async (t) => {
  const { vol, map, blocker } = await setup();
  await vol.zero(3 * OBJ, OBJ, { fua: false, noHole: true, fastZero: false });
  t.same(await vol.blockStatus(3 * OBJ, OBJ), [{ length: OBJ, flags: 0 }], 'whole object allocated');
  t.equal(vol.stats.allocations, 1);
  t.ok(await exists(blocker, dataName(map, 3)));
  t.ok(isZero(await readBuf(t, vol, 3 * OBJ, OBJ)));

  await vol.zero(4 * OBJ + 10, 10, { fua: false, noHole: true, fastZero: false });
  t.same(await vol.blockStatus(4 * OBJ, OBJ), [{ length: OBJ, flags: 0 }], 'partial noHole allocates too');
  t.equal(vol.stats.allocations, 2);

  await vol.write(5 * OBJ, pattern(7, 5 * OBJ, OBJ), false);
  await vol.zero(5 * OBJ, OBJ, { fua: false, noHole: true, fastZero: false });
  t.same(await vol.blockStatus(5 * OBJ, OBJ), [{ length: OBJ, flags: 0 }], 'noHole keeps a whole object mapped');
  t.ok(isZero(await readBuf(t, vol, 5 * OBJ, OBJ)));
  t.equal(vol.stats.unmaps, 0);
});

t.test('fastZero: ENOTSUP on partial extents of allocated objects, unchanged data; fine on whole objects', async (t) => {
  const { vol } = await setup();
  const data = pattern(8, 4 * OBJ, 2 * OBJ);
  await vol.write(4 * OBJ, data, false);
  const fast = { fua: false, noHole: false, fastZero: true };

  await t.rejects(vol.zero(4 * OBJ + 10, 100, fast), { code: 'ENOTSUP' }, 'partial extent of an allocated object');
  await t.rejects(vol.zero(4 * OBJ, OBJ + 1, fast), { code: 'ENOTSUP' }, 'whole object plus a partial one');
  await t.rejects(vol.zero(4 * OBJ, OBJ, { ...fast, noHole: true }), { code: 'ENOTSUP' }, 'noHole needs writes');
  t.same(await readBuf(t, vol, 4 * OBJ, 2 * OBJ), data, 'nothing changed');
  t.same(await vol.blockStatus(4 * OBJ, 2 * OBJ), [{ length: 2 * OBJ, flags: 0 }]);

  await vol.zero(4 * OBJ, OBJ, fast);
  t.same(await vol.blockStatus(4 * OBJ, 2 * OBJ), [{ length: OBJ, flags: HOLE_ZERO }, { length: OBJ, flags: 0 }]);
  t.ok(isZero(await readBuf(t, vol, 4 * OBJ, OBJ)));
  await vol.zero(6 * OBJ + 5, 50, fast);
  t.pass('partial extent of an absent object is fast');
  await vol.zero(3 * OBJ + 100, OBJ, fast);
  t.pass('partial extents of absent objects across a boundary');
  t.same(await readBuf(t, vol, 5 * OBJ, OBJ), data.subarray(OBJ), 'the other object unchanged');
});

t.test('after markShared a partial write copies up and leaves the old object untouched', async (t) => {
  const { vol, map, blocker } = await setup();
  const a = pattern(9, 5 * OBJ, OBJ - 3000); // sparse tail: copy-up must still read zeros there
  await vol.write(5 * OBJ, a, false);
  await vol.flush();
  const oldName = dataName(map, 5);
  const oldBytes = await readObject(blocker, oldName);
  await map.markShared();

  const b = pattern(10, 5 * OBJ + 1000, 500);
  await vol.write(5 * OBJ + 1000, b, false);
  t.equal(vol.stats.copyUps, 1, 'one copy-up');
  const newName = dataName(map, 5);
  t.not(newName, oldName, 'a new object');
  t.same(await readObject(blocker, oldName), oldBytes, 'old object untouched');
  const expect = Buffer.alloc(OBJ);
  a.copy(expect, 0);
  b.copy(expect, 1000);
  t.same(await readBuf(t, vol, 5 * OBJ, OBJ), expect, 'old + new through the volume');
  t.same(await readObject(blocker, newName), expect, 'the copy holds old + new');

  // The copy is now owned: the next partial write goes in place.
  await vol.write(5 * OBJ + 2, Buffer.from([1, 2, 3]), false);
  t.equal(vol.stats.copyUps, 1);
  t.equal(dataName(map, 5), newName);
  t.same(await readObject(blocker, oldName), oldBytes, 'old object still untouched');

  // Partial zero of a shared object copies up too.
  await vol.write(6 * OBJ, pattern(11, 6 * OBJ, OBJ), false);
  await map.markShared();
  const shared6 = dataName(map, 6);
  await vol.zero(6 * OBJ + 100, 100, { fua: false, noHole: false, fastZero: false });
  t.equal(vol.stats.copyUps, 2);
  const e6 = pattern(11, 6 * OBJ, OBJ);
  e6.fill(0, 100, 200);
  t.same(await readBuf(t, vol, 6 * OBJ, OBJ), e6);
  t.same(await readObject(blocker, shared6), pattern(11, 6 * OBJ, OBJ), 'shared object untouched by zero');

  // Whole-object trim of a shared object unmaps without removing it.
  const shared5 = dataName(map, 5);
  await map.markShared();
  await vol.trim(5 * OBJ, OBJ, false);
  t.ok(await exists(blocker, shared5), 'a shared object is never removed');
  t.ok(await exists(blocker, oldName));
});

t.test('after markShared a whole-object write needs no read of the old object', async (t) => {
  const { vol, map, blocker } = await setup();
  await vol.write(OBJ, pattern(12, OBJ, OBJ), false);
  const oldName = dataName(map, 1);
  await map.markShared();
  const reads: string[] = [];
  blocker.setFaultHook((op, name) => { if (op === 'read' || op === 'readFull') reads.push(name); });
  const readsBefore = blocker.calls.read;
  const data = pattern(13, OBJ, OBJ);
  await vol.write(OBJ, data, false);
  blocker.setFaultHook(undefined);
  t.equal(blocker.calls.read, readsBefore, 'no data object read');
  t.notOk(reads.includes(oldName), 'the old object was not read');
  t.equal(vol.stats.copyUps, 1, 'counted as a copy-up (a remap of a shared object)');
  t.not(dataName(map, 1), oldName);
  t.same(await readObject(blocker, oldName), pattern(12, OBJ, OBJ), 'old object untouched');
  t.same(await readBuf(t, vol, OBJ, OBJ), data);

  // ... while a partial one does read it.
  await map.markShared();
  const before = blocker.calls.read;
  await vol.write(OBJ + 5, Buffer.from('x'), false);
  t.equal(blocker.calls.read, before + 1, 'partial write: one read of the shared object');
});

t.test('a FUA write is durable (survives a power cut that drops unsynced data)', async (t) => {
  const blocker = new MemoryBlocker();
  const { vol } = await setup(blocker);
  // Allocate objects 0 and 1 (allocation is durable with the map), then write in place.
  await vol.write(0, pattern(14, 0, 2 * OBJ), false);
  const fuaData = pattern(15, 500, 3000);
  await vol.write(500, fuaData, true);
  const lost = pattern(16, OBJ + 500, 3000);
  await vol.write(OBJ + 500, lost, false);
  t.ok(blocker.dirtyNames().some((n) => n.startsWith('d.')), 'an unsynced in-place write exists');

  blocker.powerCut({ keepUnsynced: 'none' });
  const { vol: vol2 } = await reopen(blocker);
  t.same(await readBuf(t, vol2, 500, 3000), fuaData, 'the FUA write survived');
  t.same(await readBuf(t, vol2, OBJ + 500, 3000), pattern(14, OBJ + 500, 3000),
    'control: the non-FUA in-place write was lost (the power cut is real)');

  // A FUA zero of a partial range of an owned object.
  await vol2.zero(100, 50, { fua: true, noHole: false, fastZero: false });
  blocker.powerCut({ keepUnsynced: 'none' });
  const { vol: vol3 } = await reopen(blocker);
  t.ok(isZero(await readBuf(t, vol3, 100, 50)), 'the FUA zero survived');
});

t.test('flush makes every earlier write durable', async (t) => {
  const blocker = new MemoryBlocker();
  const { vol } = await setup(blocker);
  await vol.write(0, pattern(17, 0, 4 * OBJ), false); // allocations
  const expect = pattern(17, 0, SIZE);
  expect.fill(0, 4 * OBJ);
  for (const [i, at, len] of [[0, 10, 100], [1, OBJ - 1, 2], [2, 3 * OBJ + 7, 5000], [3, 2 * OBJ, 1]] as const) {
    const d = pattern(20 + i, at, len);
    await vol.write(at, d, false);
    d.copy(expect, at);
  }
  await vol.zero(3 * OBJ + 100, 200, { fua: false, noHole: false, fastZero: false });
  expect.fill(0, 3 * OBJ + 100, 3 * OBJ + 300);
  t.ok(blocker.dirtyNames().length > 0, 'something to flush');
  await vol.flush();
  t.same(blocker.dirtyNames().filter((n) => n.startsWith('d.')), [], 'no data object left dirty');
  blocker.powerCut({ keepUnsynced: 'none' });
  const { vol: vol2 } = await reopen(blocker);
  t.same(await readBuf(t, vol2, 0, SIZE), expect, 'everything written before the flush survived');
});

t.test('a flush that finds nothing dirty still waits for a running flush', async (t) => {
  const blocker = new MemoryBlocker();
  const { vol } = await setup(blocker);
  await vol.write(0, pattern(30, 0, OBJ), false);
  await vol.write(10, Buffer.from('in place'), false);

  let release!: () => void;
  const gate = new Promise<void>((resolve) => { release = resolve; });
  let syncStarted!: () => void;
  const started = new Promise<void>((resolve) => { syncStarted = resolve; });
  let synced = false;
  blocker.setFaultHook(async (op) => {
    if (op !== 'sync') return;
    syncStarted();
    await gate;
    synced = true;
  });

  let firstDone = false;
  let secondDone = false;
  const first = vol.flush().then(() => { firstDone = true; });
  await started;
  const second = vol.flush().then(() => { secondDone = true; });
  await new Promise((resolve) => setTimeout(resolve, 20));
  t.notOk(firstDone, 'the first flush is in its sync');
  t.notOk(secondDone, 'the second flush (nothing dirty) waits for it');
  release();
  await Promise.all([first, second]);
  blocker.setFaultHook(undefined);
  t.ok(synced && firstDone && secondDone);
  t.equal(blocker.calls.sync >= 1, true);

  // A failed flush keeps its objects dirty: a later flush syncs them.
  await vol.write(20, Buffer.from('again'), false);
  blocker.failNext('sync', 'EIO');
  await t.rejects(vol.flush(), { code: 'EIO' }, 'the flush reports the sync failure');
  await vol.flush();
  blocker.powerCut({ keepUnsynced: 'none' });
  const { vol: vol2 } = await reopen(blocker);
  t.same(await readBuf(t, vol2, 20, 5), Buffer.from('again'), 'the retried flush made it durable');
});

t.test('a mapped object deleted behind the volume\'s back reads as EIO, never zeros', async (t) => {
  const { vol, map, blocker } = await setup();
  await vol.write(2 * OBJ + 5, pattern(31, 2 * OBJ + 5, 100), false);
  await blocker.remove(dataName(map, 2));
  await t.rejects(vol.read(2 * OBJ, OBJ), { code: 'EIO' }, 'read of the object');
  await t.rejects(vol.read(2 * OBJ - 10, 20), { code: 'EIO' }, 'read across its boundary');
  t.same(await vol.read(3 * OBJ, 10), [{ offset: 3 * OBJ, length: 10 }], 'other objects still read');

  // A copy-up whose shared source is missing fails the same way.
  await vol.write(4 * OBJ, pattern(32, 4 * OBJ, 100), false);
  const shared = dataName(map, 4);
  await map.markShared();
  await blocker.remove(shared);
  await t.rejects(vol.write(4 * OBJ + 50, Buffer.from('x'), false), { code: 'EIO' }, 'copy-up of a missing object');
  t.equal(dataName(map, 4), shared, 'map unchanged');
});

t.test('a blocker write failure rejects with its code and leaves the map unchanged', async (t) => {
  const { vol, map, blocker } = await setup();
  const chunkWrites = map.stats.chunkWrites;

  blocker.failNext('write', 'ENOSPC');
  await t.rejects(vol.write(OBJ + 10, Buffer.from('abc'), false), { code: 'ENOSPC' }, 'allocation');
  t.equal(map.lookup(1), ENTRY_ABSENT, 'still absent');
  t.equal(map.stats.chunkWrites, chunkWrites, 'no chunk written');
  t.same(await vol.read(OBJ, OBJ), [{ offset: OBJ, length: OBJ }], 'still a hole');

  blocker.failNext('sync', 'EIO');
  await t.rejects(vol.write(OBJ + 10, Buffer.from('abc'), false), { code: 'EIO' }, 'sync of the new object before the map');
  t.equal(map.lookup(1), ENTRY_ABSENT, 'still absent after a failed sync');
  t.equal(map.stats.chunkWrites, chunkWrites);

  blocker.failNext('replace', 'EIO');
  await t.rejects(vol.write(OBJ + 10, Buffer.from('abc'), false), { code: 'EIO' }, 'chunk write');
  t.equal(map.lookup(1), ENTRY_ABSENT, 'still absent after a failed chunk write');

  // The gates were released: the same object works now.
  await vol.write(OBJ + 10, Buffer.from('abc'), false);
  const entry = map.lookup(1);
  t.not(entry, ENTRY_ABSENT);
  t.same(await readBuf(t, vol, OBJ + 8, 7), Buffer.from('\0\0abc\0\0'), 'no stale bytes from the failed attempts');

  blocker.failNext('write', 'EIO');
  await t.rejects(vol.write(OBJ + 10, Buffer.from('xyz'), true), { code: 'EIO' }, 'in-place write');
  t.equal(map.lookup(1), entry, 'map unchanged');

  blocker.failNext('write', 'ETIMEDOUT');
  await t.rejects(vol.zero(OBJ, 10, { fua: false, noHole: false, fastZero: false }), { code: 'ETIMEDOUT' }, 'in-place zero');

  await map.markShared();
  const before = map.stats.chunkWrites;
  blocker.failNext('write', 'ENOSPC');
  await t.rejects(vol.write(OBJ + 10, Buffer.from('xyz'), false), { code: 'ENOSPC' }, 'copy-up write');
  t.equal(map.lookup(1), entry, 'still the shared object');
  t.equal(map.stats.chunkWrites, before);
  t.equal(vol.stats.copyUps, 0, 'a failed copy-up is not counted');

  blocker.failNext('replace', 'EIO');
  await t.rejects(vol.trim(OBJ, OBJ, false), { code: 'EIO' }, 'unmap');
  t.equal(map.lookup(1), entry, 'still mapped after a failed unmap');
  t.ok(await exists(blocker, map.objectName(entry!, 1)));
});

t.test('a failed allocation leaves no stale bytes for a later allocation', async (t) => {
  const { vol, map, blocker } = await setup();
  // The data reaches the new object, then its sync fails: the write fails.
  blocker.failNext('sync', 'EIO');
  await t.rejects(vol.write(2 * OBJ, pattern(33, 2 * OBJ, 1000), false), { code: 'EIO' });
  // Acknowledged: the failed write's range now reads zeros.
  await vol.trim(2 * OBJ, 1000, false);
  t.ok(isZero(await readBuf(t, vol, 2 * OBJ, 1000)));
  await vol.write(2 * OBJ + 5000, Buffer.from('later'), false);
  t.not(map.lookup(2), ENTRY_ABSENT);
  t.ok(isZero(await readBuf(t, vol, 2 * OBJ, 1000)), 'the trimmed range still reads zeros after the allocation');

  // Same after a copy-up whose map update failed.
  await vol.write(3 * OBJ, pattern(34, 3 * OBJ, OBJ), false);
  await map.markShared();
  blocker.failNext('replace', 'EIO');
  await t.rejects(vol.write(3 * OBJ + 100, Buffer.from('first'), false), { code: 'EIO' });
  await vol.trim(3 * OBJ, OBJ, false); // acknowledged: the whole object is zeros now
  await vol.write(3 * OBJ + OBJ - 10, Buffer.from('tail'), false);
  const buf = await readBuf(t, vol, 3 * OBJ, OBJ);
  t.ok(isZero(buf.subarray(0, OBJ - 10)), 'no bytes of the failed copy-up resurface');
});

t.test('write, whole-object trim, small write: the rest of the object reads zeros', async (t) => {
  const { vol, blocker } = await setup();
  await vol.write(OBJ, pattern(40, OBJ, OBJ), false);
  await vol.trim(OBJ, OBJ, false);
  await vol.write(OBJ + 300, Buffer.from('B'.repeat(50)), false);
  const buf = await readBuf(t, vol, OBJ, OBJ);
  t.same(buf.subarray(300, 350), Buffer.from('B'.repeat(50)));
  buf.fill(0, 300, 350);
  t.ok(isZero(buf), 'sequential: the rest reads zeros');

  // The trim's remove fails: the orphan must not resurface in a re-allocation.
  await vol.write(2 * OBJ, pattern(41, 2 * OBJ, OBJ), false);
  blocker.failNext('remove', 'EIO');
  await vol.trim(2 * OBJ, OBJ, false);
  await vol.write(2 * OBJ + 10, Buffer.from('B'), false);
  const buf2 = await readBuf(t, vol, 2 * OBJ, OBJ);
  t.equal(buf2[10], 'B'.charCodeAt(0));
  buf2[10] = 0;
  t.ok(isZero(buf2), 'a failed remove leaves no stale bytes behind');
});

t.test('concurrent writes and whole-object trims on one object never leave a stale object', async (t) => {
  for (let round = 0; round < 40; round++) {
    const blocker = new MemoryBlocker();
    const { vol } = await setup(blocker);
    const A = Buffer.alloc(OBJ, 0xaa);
    await vol.write(0, A, false);
    // Random small delays on data writes and removes, so the operations interleave.
    let n = round;
    blocker.setFaultHook((op) => {
      if (op !== 'write' && op !== 'remove' && op !== 'replace') return;
      n = (n * 1103515245 + 12345) >>> 0;
      const d = n % 3;
      return d === 0 ? undefined : new Promise<void>((resolve) => setTimeout(resolve, d - 1));
    });
    const at = (round * 977) % (OBJ - 64);
    const atC = (at + 2000) % (OBJ - 64);
    const start: Array<() => Promise<void>> = [
      () => vol.trim(0, OBJ, false),
      () => vol.write(at, Buffer.alloc(64, 0xbb), false),
      () => vol.trim(0, OBJ, false),
      () => vol.write(atC, Buffer.alloc(64, 0xcc), round % 2 === 0),
    ];
    // A different issue order each round (writes first finds the object owned).
    const order = [0, 1, 2, 3].sort((x, y) => ((x * 7 + round) % 5) - ((y * 7 + round) % 5));
    await Promise.all(order.map((i) => start[i]!()));
    blocker.setFaultHook(undefined);
    const buf = await readBuf(t, vol, 0, OBJ);
    t.equal(buf.indexOf(0xaa), -1, `round ${round}: no byte of pattern A after the trims`);
    // In any order: B's range holds B or zeros, C's range C or zeros, the rest zeros.
    const range = (b: Buffer, v: number): boolean => b.every((x) => x === v) || isZero(b);
    t.ok(range(buf.subarray(at, at + 64), 0xbb) && range(buf.subarray(atC, atC + 64), 0xcc),
      `round ${round}: B and C each whole or trimmed`);
    const rest = Buffer.from(buf);
    rest.fill(0, at, at + 64);
    rest.fill(0, atC, atC + 64);
    t.ok(isZero(rest), `round ${round}: zeros outside B and C (no object recreated behind an unmap)`);
    // Then trim and write a small D elsewhere: the rest must be zeros (no A,
    // and no B or C from a write that recreated the object behind an unmap).
    await vol.trim(0, OBJ, false);
    const at2 = (at + 30000) % (OBJ - 64);
    await vol.write(at2, Buffer.alloc(64, 0xdd), false);
    const after = await readBuf(t, vol, 0, OBJ);
    after.fill(0, at2, at2 + 64);
    t.ok(isZero(after), `round ${round}: only D after trim + write`);
  }
});

t.test('a map opened read-only: reads write nothing, the first change upgrades it once', async (t) => {
  const blocker = new MemoryBlocker();
  const first = await setup(blocker);
  await first.vol.write(OBJ + 3, Buffer.from('before'), false);
  await first.vol.close();

  const map = await VolumeMap.open(blocker, NAME, { forWrite: false });
  const vol = new Volume(map, blocker, false);
  const replaces = blocker.calls.replace;
  t.same(await readBuf(t, vol, OBJ, 10), Buffer.from('\0\0\0before\0'), 'reads the stored data');
  await vol.blockStatus(0, SIZE);
  await vol.flush();
  t.equal(blocker.calls.replace, replaces, 'looking writes no metadata');
  t.notOk(map.writable);

  const generation = map.generation;
  await Promise.all([
    vol.write(OBJ + 3, Buffer.from('after!'), false),
    vol.write(3 * OBJ, Buffer.from('new'), false),
    vol.trim(5 * OBJ, OBJ, false),
  ]);
  t.ok(map.writable, 'upgraded by the first change');
  t.equal(map.generation, generation + 1, 'one generation bump for concurrent first changes');
  t.same(await readBuf(t, vol, OBJ, 10), Buffer.from('\0\0\0after!\0'), 'written in place (the object is owned)');
  t.same(await readBuf(t, vol, 3 * OBJ, 3), Buffer.from('new'));
  await vol.flush();
  blocker.powerCut({ keepUnsynced: 'none' });
  const again = await reopen(blocker);
  t.same(await readBuf(t, again.vol, OBJ, 10), Buffer.from('\0\0\0after!\0'), 'durable after flush');
  t.same(await readBuf(t, again.vol, 3 * OBJ, 3), Buffer.from('new'));

  const ro = new Volume(await VolumeMap.open(blocker, NAME, { forWrite: false }), blocker, true);
  await t.rejects(ro.write(0, Buffer.from('x'), false), /read-only/, 'a read-only volume refuses writes');
});

t.test('a faked snapshot whose header write fails leaves no name for the next session to reuse', async (t) => {
  const blocker = new MemoryBlocker();
  const { vol, map } = await setup(blocker);
  await vol.write(0, Buffer.alloc(10, 1), false); // chunk 0 exists
  const generation = map.generation;
  blocker.failNext('replace', 'EIO', `vol.${NAME}`);
  await t.rejects(map.markShared(), { code: 'EIO' });
  t.equal(map.generation, generation, 'the generation steps back: it never reached the storage');
  // A new object whose chunk lands but whose header write fails; then the power goes.
  blocker.setFaultHook((op, name) => (op === 'replace' && name === `vol.${NAME}` ? 'EIO' : undefined));
  await vol.write(OBJ, Buffer.alloc(1000, 0xaa), false).catch(() => undefined);
  blocker.setFaultHook(undefined);
  blocker.powerCut({ keepUnsynced: 'none' });

  const again = await reopen(blocker);
  await again.vol.trim(OBJ, 1000, false); // acknowledged: zeros
  await again.vol.write(OBJ + 5000, Buffer.from('x'), false);
  t.ok(isZero(await readBuf(t, again.vol, OBJ, 1000)), 'no bytes of the crashed session resurface');
});
