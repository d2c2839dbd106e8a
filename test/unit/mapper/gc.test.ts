/**
 * Garbage collection (src/mapper/gc.ts) on the memory blocker, with real data
 * written through compose Volumes: orphans of removed volumes go, objects a
 * snapshot or clone still reaches stay, objects a writer may be about to map
 * (its current generation) stay, a corrupt header stops everything, a dry run
 * deletes nothing, every volume reads back the same afterwards, and gc racing
 * a busy writer (with snapshots) never deletes what the maps end up using.
 */
import t, { type Test } from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { MapFormatError } from '../../../src/mapper/errors.js';
import { collectGarbage, type GcResult } from '../../../src/mapper/gc.js';
import { decodeHeader } from '../../../src/mapper/header-format.js';
import { dataObjectName, chunkObjectName, parseDataObjectName } from '../../../src/mapper/names.js';
import {
  cloneSnapshot, createSnapshot, removeVolume, renameVolume, snapshotVolume,
} from '../../../src/mapper/volume-map.js';
import { prng } from './fixtures.js';
import { OBJ, OBJECTS, Open, SIZE } from './open-volume.js';

/** What volume `name` reads, opened read-only. */
async function contents(b: MemoryBlocker, name: string): Promise<Buffer> {
  const o = await Open.open(b, name, false, Buffer.alloc(0));
  try {
    return await o.readAll();
  } finally {
    await o.close();
  }
}

/** Full contents of every volume named. */
async function allContents(b: MemoryBlocker, names: string[]): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for (const n of names) out.set(n, await contents(b, n));
  return out;
}

async function sameContents(t: Test, b: MemoryBlocker, before: Map<string, Buffer>, what: string): Promise<void> {
  for (const [name, bytes] of before) t.ok((await contents(b, name)).equals(bytes), `${what}: ${name} reads as before`);
}

async function objectNames(b: MemoryBlocker): Promise<Set<string>> {
  const out = new Set<string>();
  for await (const name of b.list('')) out.add(name);
  return out;
}

async function dump(b: MemoryBlocker): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for await (const name of b.list('')) out.set(name, await b.readFull(name));
  return out;
}

function sameDump(t: Test, a: Map<string, Buffer>, b: Map<string, Buffer>, what: string): void {
  const diff: string[] = [];
  for (const [n, v] of a) if (!b.get(n)?.equals(v)) diff.push(n);
  for (const n of b.keys()) if (!a.has(n)) diff.push(n);
  t.same(diff, [], what);
}

function ofVolume(names: Iterable<string>, id: string): string[] {
  return [...names].filter((n) => n.startsWith(`d.${id}.`) || n.startsWith(`m.${id}.`)).sort();
}

async function gc(b: MemoryBlocker, dryRun = false): Promise<GcResult> {
  return collectGarbage(b, { dryRun });
}

t.test('orphans of a removed volume are swept; a dry run only reports them', async (t) => {
  const b = new MemoryBlocker();
  const a = await Open.create(b, 'a');
  await a.write(1, 0, SIZE);
  const aId = a.id;
  await a.close();
  const keep = await Open.create(b, 'keep');
  await keep.write(2, OBJ, 5 * OBJ);
  await keep.close();
  // A crash in the middle of removing "a": the header is gone, its objects are not.
  await b.remove('vol.a');
  const before = await allContents(b, ['keep']);
  const orphans = ofVolume(await objectNames(b), aId);
  t.equal(orphans.length, OBJECTS + 1, 'every object and the chunk of "a" are left');
  // And one of an id that no header ever had.
  const stranger = dataObjectName('00000000000000aa', 1, 3);
  await b.write(stranger, 0, Buffer.alloc(100, 7));

  const stored = await dump(b);
  const dry = await gc(b, true);
  sameDump(t, stored, await dump(b), 'dry run deleted nothing');
  t.equal(dry.sweptObjects, orphans.length + 1, 'dry run counts the orphans');
  t.equal(dry.sweptBytes, OBJECTS * OBJ + (stored.get(orphans.find((n) => n.startsWith('m.'))!)!.length) + 100);

  const r = await gc(b);
  t.same(r, dry, 'the real run does what the dry run said');
  t.equal(r.scannedHeaders, 1);
  t.equal(r.referencedObjects, 5 + 1, '"keep" reaches 5 objects and 1 chunk');
  t.same(r.errors, []);
  const after = await objectNames(b);
  t.same(ofVolume(after, aId), [], 'orphans gone');
  t.notOk(after.has(stranger), 'so is the stranger');
  await sameContents(t, b, before, 'after gc');
  t.equal((await gc(b)).sweptObjects, 0, 'a second run finds nothing');
});

t.test('a snapshot keeps the objects its origin overwrote, until the snapshot is removed', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'v');
  await v.write(1, 0, SIZE);
  await v.vol.flush();
  await createSnapshot(b, v.map, 's');
  const atSnapshot = ofVolume(await objectNames(b), v.id);
  // Overwrite objects 2..5 and 9: each is copied up to a new name, and chunk 0 too.
  await v.write(2, 2 * OBJ + 100, 3 * OBJ);
  await v.write(3, 9 * OBJ, OBJ);
  await v.vol.flush();
  const before = await allContents(b, ['s']);
  before.set('v', Buffer.from(v.model));

  const stored = await dump(b);
  const r1 = await gc(b);
  t.equal(r1.sweptObjects, 0, 'nothing is garbage while the snapshot exists');
  t.equal(r1.keptYoung, 0);
  sameDump(t, stored, await dump(b), 'nothing deleted');
  t.ok((await v.readAll()).equals(v.model), 'the open volume reads what was written');
  await sameContents(t, b, before, 'after gc');

  await removeVolume(b, 's');
  const r2 = await gc(b);
  const overwritten = new Set([2, 3, 4, 5, 9]);
  const expected = atSnapshot.filter((n) => n.startsWith('m.') || overwritten.has(parseDataObjectName(n)?.index ?? -1));
  t.equal(expected.length, 6, '5 objects and the old chunk');
  t.equal(r2.sweptObjects, expected.length, 'the overwritten originals and the old chunk go');
  const after = await objectNames(b);
  t.same(expected.filter((n) => after.has(n)), [], 'exactly those');
  t.same(atSnapshot.filter((n) => !expected.includes(n) && !after.has(n)), [], 'the rest of them stay');
  t.ok((await v.readAll()).equals(v.model), 'the open volume still reads what was written');
  await v.close();
  t.ok((await contents(b, 'v')).equals(before.get('v')!), 'and so does a fresh open');
});

t.test('a clone keeps its parent\'s objects alive after the parent and snapshot are removed', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'v');
  await v.write(1, 0, SIZE);
  const vId = v.id;
  await v.close();
  await snapshotVolume(b, 'v', 's');
  await cloneSnapshot(b, 's', 'c');
  const c = await Open.open(b, 'c', true, await contents(b, 's'));
  await c.write(4, 3 * OBJ, 2 * OBJ);          // objects 3 and 4 become the clone's own
  await c.close();
  const before = await allContents(b, ['c', 's']);

  const rm = await removeVolume(b, 'v');
  t.ok(rm.objectsKeptBecause, 'removal left the objects to gc');
  t.equal((await gc(b)).sweptObjects, 0, 'the snapshot still reaches all of v\'s objects');
  await sameContents(t, b, before, 'after gc with the snapshot');

  await removeVolume(b, 's');
  before.delete('s');
  const r = await gc(b);
  // v's objects 3 and 4 and v's chunk 0 (the clone copied it) are garbage now.
  t.equal(r.sweptObjects, 3, 'only what the clone replaced goes');
  const left = ofVolume(await objectNames(b), vId);
  t.equal(left.length, OBJECTS - 2, 'v\'s other objects stay for the clone');
  t.ok(left.every((n) => n.startsWith('d.')));
  await sameContents(t, b, before, 'after gc without the snapshot');
});

t.test('an object of the writer\'s current generation is kept; an older unreferenced one is swept', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'v');
  await v.write(1, 0, 4 * OBJ);
  await v.close();
  const w = await Open.open(b, 'v', true, v.model);
  await w.write(2, OBJ, OBJ);                   // owned: written in place
  await w.vol.flush();
  const g = w.map.generation;
  t.ok(g >= 2);
  // A write the daemon has made but not yet mapped, at an unallocated index...
  const inFlight = dataObjectName(w.id, g, 12);
  const inFlightChunk = chunkObjectName(w.id, g, 1);
  // ... and a crashed session's leftover, never mapped.
  const old = dataObjectName(w.id, g - 1, 13);
  for (const n of [inFlight, inFlightChunk, old]) await b.write(n, 0, Buffer.alloc(10, 1));
  const before = await allContents(b, ['v']);

  const r = await gc(b);
  t.equal(r.keptYoung, 2, 'the current generation\'s object and chunk are kept');
  t.equal(r.sweptObjects, 1);
  const after = await objectNames(b);
  t.ok(after.has(inFlight) && after.has(inFlightChunk), 'in flight: kept');
  t.notOk(after.has(old), 'older: swept');
  t.ok((await w.readAll()).equals(w.model), 'the writer reads what it wrote');
  await w.close();
  await sameContents(t, b, before, 'after gc');

  // Once the writer moves on (a new session), that generation is old: swept.
  const w2 = await Open.open(b, 'v', true, w.model);
  const r2 = await gc(b);
  t.equal(r2.sweptObjects, 2, 'the old session\'s unmapped object and chunk go');
  t.ok((await w2.readAll()).equals(w.model));
  await w2.close();
});

t.test('a volume renamed while gc marks is not taken for a removed one', async (t) => {
  const b = new MemoryBlocker();
  const a = await Open.create(b, 'a');
  await a.write(1, 0, SIZE);
  await a.close();
  const snap = await Open.create(b, 'other');
  await snap.write(2, 0, OBJ);
  await snap.close();
  // The rename runs right after gc listed "vol.a" and before it reads it: the
  // mark never sees the volume, the second listing does (as "b").
  let renamed = false;
  b.setFaultHook((op, name) => {
    if (op !== 'readFull' || name !== 'vol.a' || renamed) return undefined;
    renamed = true;
    return renameVolume(b, 'a', 'b').then(() => undefined);
  });
  const r = await gc(b);
  b.setFaultHook(undefined);
  t.ok(renamed, 'the rename ran during gc');
  t.equal(r.scannedHeaders, 1, 'the mark saw only "other"');
  t.equal(r.sweptObjects, 0, 'nothing swept');
  t.equal(r.keptNew, OBJECTS + 1, 'the renamed volume\'s objects are kept as new');
  t.ok((await contents(b, 'b')).equals(a.model), 'the renamed volume reads what was written');
  t.equal((await gc(b)).sweptObjects, 0, 'the next run marks it normally');
});

t.test('a corrupt header or chunk aborts gc with nothing deleted', async (t) => {
  const b = new MemoryBlocker();
  const a = await Open.create(b, 'a');
  await a.write(1, 0, SIZE);
  await a.close();
  const x = await Open.create(b, 'x');
  await x.write(2, 0, 2 * OBJ);
  await x.close();
  await b.remove('vol.a');                      // a's objects are orphans now
  const hdr = await b.readFull('vol.x');
  const bad = Buffer.from(hdr);
  bad[bad.length - 1]! ^= 0xff;
  await b.replace('vol.x', bad);

  const stored = await dump(b);
  await t.rejects(gc(b), MapFormatError, 'corrupt header');
  await t.rejects(gc(b), /garbage collection aborted, nothing deleted/);
  sameDump(t, stored, await dump(b), 'nothing deleted');

  await b.replace('vol.x', hdr);
  const h = decodeHeader(hdr, 'vol.x');
  const chunk = chunkObjectName(h.sources[h.chunkRefs[0]!.source]!, h.chunkRefs[0]!.generation, 0);
  const goodChunk = await b.readFull(chunk);
  const badChunk = Buffer.from(goodChunk);
  badChunk[40]! ^= 1;
  await b.replace(chunk, badChunk);
  const stored2 = await dump(b);
  await t.rejects(gc(b), MapFormatError, 'corrupt chunk');
  sameDump(t, stored2, await dump(b), 'nothing deleted');

  await b.replace(chunk, goodChunk);
  t.equal((await gc(b)).sweptObjects, OBJECTS + 1, 'repaired: the orphans go');
});

t.test('gc racing a busy writer with snapshots deletes nothing the maps use', async (t) => {
  const b = new MemoryBlocker();
  const rand = prng(7);
  // Interleave every blocker call with whatever else is runnable.
  b.setFaultHook(() => (rand() < 0.5 ? new Promise<void>((r) => setImmediate(r)) : undefined));
  const N = 64;
  const v = await Open.create(b, 'v', N * OBJ);
  await v.write(1, 0, 8 * OBJ);
  // Orphans of a removed volume, to give gc real work while the writer runs.
  const gone = await Open.create(b, 'gone', 8 * OBJ);
  await gone.write(9, 0, 8 * OBJ);
  await gone.close();
  await b.remove('vol.gone');

  const snaps = new Map<string, Buffer>();
  let writing = true;
  let rounds = 0;
  const writer = (async () => {
    let i = 0;
    while (writing) {
      i++;
      // Two writes in flight at once, in disjoint halves (the model applies them in completion order).
      const half = (N / 2) * OBJ;
      const at = Math.floor(rand() * (N / 2 - 1)) * OBJ + Math.floor(rand() * OBJ / 2);
      const length = 1 + Math.floor(rand() * OBJ);
      await Promise.all([
        v.write(100 + i, at, length),
        v.write(200 + i, half + Math.floor(rand() * (half - OBJ)), OBJ),
      ]);
      if (i % 15 === 0) {
        const name = `s${i}`;
        await v.vol.quiesce(async () => {
          await createSnapshot(b, v.map, name);
          snaps.set(name, Buffer.from(v.model));
        });
      }
      if (i % 40 === 0 && snaps.size > 1) {
        const victim = [...snaps.keys()][0]!;
        snaps.delete(victim);
        await removeVolume(b, victim);
      }
      rounds = i;
    }
    return i;
  })().finally(() => { writing = false; });

  const runs: GcResult[] = [];
  for (let k = 0; k < 100 && writing && (k < 6 || rounds < 100); k++) runs.push(await gc(b));
  writing = false;
  const writes = await writer;
  t.ok(writes >= 100, `the writer kept going (${writes} rounds, ${runs.length} gc runs)`);
  t.ok(runs.reduce((n, r) => n + r.sweptObjects, 0) >= 9, 'gc swept the removed volume\'s objects at least');
  t.ok(runs.every((r) => r.errors.length === 0));
  t.ok(v.vol.stats.allocations > 0 && v.vol.stats.copyUps > 0, 'allocations and copy-ups happened during gc');

  await v.vol.flush();
  t.ok((await v.readAll()).equals(v.model), 'the writer reads everything it wrote');
  await v.close();
  b.setFaultHook(undefined);
  t.ok((await contents(b, 'v')).equals(v.model), 'so does a fresh open');
  for (const [name, model] of snaps) t.ok((await contents(b, name)).equals(model), `snapshot ${name} intact`);
  // And a final quiet gc leaves everything readable too.
  await gc(b);
  t.ok((await contents(b, 'v')).equals(v.model), 'after a quiet gc');
  for (const [name, model] of snaps) t.ok((await contents(b, name)).equals(model), `snapshot ${name} after a quiet gc`);
});
