/**
 * Snapshots and clones (src/mapper/snapshot-create.ts, clone-create.ts) on the
 * memory blocker, with real data through compose Volumes: snapshots keep
 * their data while the origin moves on, clones read their snapshot plus their
 * own writes, chains of clones, the cost (header bytes only, no chunk or data
 * object touched), power cuts at every step, removal while clones share
 * objects, the markShared ordering, and the errors.
 */
import t, { type Test } from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { Volume } from '../../../src/compose/volume.js';
import { MapFormatError, UsageError, VolumeExistsError, VolumeNotFoundError } from '../../../src/mapper/errors.js';
import { MAX_SOURCES, VolumeFlags, decodeHeader, encodeHeader, type VolumeHeader } from '../../../src/mapper/header-format.js';
import {
  VolumeMap, cloneSnapshot, createSnapshot, listVolumes, removeVolume, snapshotVolume,
} from '../../../src/mapper/volume-map.js';
import { OBJ, OBJECTS, Open, SIZE, pattern } from './open-volume.js';

async function dump(b: MemoryBlocker): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  for await (const name of b.list('')) out.set(name, await b.readFull(name));
  return out;
}

/** Every object of `before` still exists with the same bytes. */
async function unchanged(t: Test, b: MemoryBlocker, before: Map<string, Buffer>, what: string): Promise<void> {
  const changed: string[] = [];
  for (const [name, bytes] of before) {
    if (name.startsWith('vol.')) continue;
    const now = await b.readFull(name).catch(() => null);
    if (now === null || !now.equals(bytes)) changed.push(name);
  }
  t.same(changed, [], what);
}

async function header(b: MemoryBlocker, name: string): Promise<VolumeHeader> {
  return decodeHeader(await b.readFull(`vol.${name}`), `vol.${name}`);
}

/** Records every blocker operation and the bytes of every replace. */
function record(b: MemoryBlocker): { ops: string[]; replaceBytes: () => number; stop: () => void } {
  const ops: string[] = [];
  let bytes = 0;
  const replace = b.replace;
  b.replace = async (name: string, data: Buffer) => {
    bytes += data.length;
    return replace.call(b, name, data);
  };
  b.setFaultHook((op, name) => { ops.push(`${op} ${name}`); });
  return {
    ops,
    replaceBytes: () => bytes,
    stop: () => {
      b.setFaultHook(undefined);
      b.replace = replace;
    },
  };
}

t.test('snapshot keeps its data while the volume moves on; a clone reads snapshot + its own writes', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'vol');
  await v.write(1, 0, SIZE);                   // pattern A everywhere
  await v.vol.flush();
  const genBefore = v.map.generation;
  const snap = await createSnapshot(b, v.map, 'snap');
  const a = Buffer.from(v.model);
  const atSnapshot = await dump(b);

  t.equal(v.map.generation, genBefore + 1, 'origin generation bumped');
  t.equal(v.map.writableSince, genBefore + 1, 'everything existing is now shared');
  t.equal(snap.originGeneration, genBefore + 1);
  const sh = await header(b, 'snap');
  const vh = await header(b, 'vol');
  t.equal(sh.flags, VolumeFlags.SNAPSHOT | VolumeFlags.READONLY);
  t.equal(sh.volumeId, snap.volumeId);
  t.not(sh.volumeId, vh.volumeId, 'a new id');
  t.same(sh.parent, { name: 'vol', volumeId: vh.volumeId });
  t.same(sh.sources, vh.sources, 'same sources');
  t.equal(sh.writerSource, vh.writerSource);
  t.same(sh.chunkRefs, vh.chunkRefs, 'same chunk refs');
  t.equal(vh.generation, genBefore + 1, 'origin bump is on storage');
  t.equal(vh.writableSince, genBefore + 1);

  // B: partial and whole-object writes into part of the volume.
  await v.write(2, 2 * OBJ + 100, 3 * OBJ);
  await v.write(3, 9 * OBJ, OBJ);
  await v.vol.flush();
  await v.check(t, 'volume (A+B)');
  t.ok(v.vol.stats.copyUps >= 4, 'B copied up');
  await unchanged(t, b, atSnapshot, 'no object the snapshot reaches changed');

  const s = await Open.open(b, 'snap', false, a);
  await s.check(t, 'snapshot (A)');
  await t.rejects(VolumeMap.open(b, 'snap', { forWrite: true }), UsageError, 'snapshot refuses open for write');
  await t.rejects(s.map.beginWrites(), UsageError, 'and upgrade to write');

  // Clone the snapshot, write C into it.
  const c = await cloneSnapshot(b, 'snap', 'clone');
  const ch = await header(b, 'clone');
  t.equal(ch.flags, 0);
  t.equal(ch.volumeId, c.volumeId);
  t.same(ch.sources, [...sh.sources, c.volumeId]);
  t.equal(ch.writerSource, sh.sources.length);
  t.same(ch.chunkRefs, sh.chunkRefs);
  t.same(ch.parent, { name: 'snap', volumeId: sh.volumeId });
  t.equal(ch.size, SIZE);
  const beforeC = await dump(b);
  const cl = await Open.open(b, 'clone', true, a);
  await cl.check(t, 'fresh clone (A)');
  await cl.write(4, 1 * OBJ + 7, 2 * OBJ);
  await cl.write(5, 9 * OBJ, OBJ);
  await cl.write(6, 15 * OBJ + 10, 20);
  await cl.vol.flush();
  await cl.check(t, 'clone (A+C)');
  await s.check(t, 'snapshot still (A)');
  await v.check(t, 'volume still (A+B)');
  await unchanged(t, b, beforeC, 'the clone wrote only new objects');
  t.ok((await dump(b)).size > beforeC.size);

  // Overwrite in place in the clone (now owned), reopen all after close.
  await cl.write(7, 1 * OBJ + 100, 50);
  await Promise.all([cl.close(), s.close(), v.close()]);
  await (await Open.open(b, 'clone', false, cl.model)).check(t, 'clone after reopen');
  await (await Open.open(b, 'snap', false, a)).check(t, 'snapshot after reopen');
  await (await Open.open(b, 'vol', false, v.model)).check(t, 'volume after reopen');
  t.same(await listVolumes(b), ['clone', 'snap', 'vol']);
});

t.test('clone of a clone of a clone: sources grow by one, reads name objects directly', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'v0');
  await v.write(1, 0, SIZE);
  await v.close();
  let parent = 'v0';
  let model = Buffer.from(v.model);
  const ids = [(await header(b, 'v0')).volumeId];
  const frozen: { name: string; model: Buffer }[] = [];
  for (let level = 1; level <= 3; level++) {
    await snapshotVolume(b, parent, `s${level}`);
    frozen.push({ name: `s${level}`, model: Buffer.from(model) });
    const res = await cloneSnapshot(b, `s${level}`, `c${level}`);
    ids.push(res.volumeId);
    t.equal(res.sourceCount, level + 1, `level ${level}: ${level + 1} sources`);
    const c = await Open.open(b, `c${level}`, true, model);
    await c.check(t, `c${level} before writing`);
    await c.write(10 + level, level * 3 * OBJ + level, OBJ + 1000);
    await c.close();
    model = Buffer.from(c.model);
    parent = `c${level}`;
  }
  const c3 = await Open.open(b, 'c3', false, model);
  await c3.check(t, 'c3');
  t.same(c3.map.sources, ids, 'sources: v0, c1, c2, c3');
  // Each object is named by the volume that wrote it, with no chain walk.
  const creators = new Set<string>();
  for (let i = 0; i < OBJECTS; i++) {
    const e = await c3.map.lookupAsync(i);
    creators.add(c3.map.objectName(e, i).split('.')[1]!);
  }
  t.same([...creators].sort(), [...ids].sort(), 'c3 reads objects of all four volumes directly');
  for (const f of frozen) await (await Open.open(b, f.name, false, f.model)).check(t, f.name);
});

t.test('snapshot and clone cost: header bytes only, no chunk or data object touched', async (t) => {
  for (const chunks of [0, 1, 300]) {
    const b = new MemoryBlocker();
    // 1 TiB of 64 KiB objects: room for 4096 chunks; one entry in each of `chunks` chunks.
    const map = await VolumeMap.create(b, 'big', { size: 2 ** 40, objectSize: OBJ });
    const e = map.newEntry();
    const updates = Array.from({ length: chunks }, (_, c) => ({ index: c * 4096 + (c % 7), entry: e }));
    for (const u of updates) await b.write(map.newObjectName(u.index), 0, Buffer.from('x'));
    await map.setEntries(updates);
    t.equal(map.chunkCount, chunks);

    const rec = record(b);
    const started = process.hrtime.bigint();
    await createSnapshot(b, map, 'snap');
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    rec.stop();
    const headerBytes = (await b.readFull('vol.big')).length + (await b.readFull('vol.snap')).length;
    t.same(rec.ops.filter((o) => !/^(readFull|replace) vol\./.test(o)), [], `${chunks} chunks: only headers touched`);
    t.equal(rec.ops.filter((o) => o.startsWith('replace')).length, 2, 'two header writes');
    t.equal(rec.replaceBytes(), headerBytes, `${chunks} chunks: ${rec.replaceBytes()} bytes written = the two headers`);
    t.equal(headerBytes, 2 * (92 + 12 * chunks) + 'big'.length, '92 + 12 per chunk each (+ parent name)');
    t.comment(`snapshot of ${chunks} chunks: ${ms.toFixed(2)} ms, ${rec.replaceBytes()} bytes`);

    const rec2 = record(b);
    await cloneSnapshot(b, 'snap', 'clone', { size: 2 ** 41 });
    rec2.stop();
    t.same(rec2.ops.filter((o) => !/^(readFull|replace) vol\./.test(o)), [], 'clone: only headers touched');
    t.equal(rec2.replaceBytes(), (await b.readFull('vol.clone')).length, 'clone: one header written');
    t.equal(rec2.replaceBytes(), 92 + 8 + 12 * chunks + 'snap'.length);
    await map.close();
  }
});

t.test('snapshotVolume on a closed volume; power cut at every step leaves no snapshot or a whole one', async (t) => {
  for (const closed of [false, true]) {
    for (let failAt = 0; ; failAt++) {
      const b = new MemoryBlocker({ seed: failAt + 1 });
      const v = await Open.create(b, 'vol');
      await v.write(1, 0, SIZE);
      await v.write(2, 3 * OBJ, 100);
      await v.vol.flush();
      await v.write(3, 5 * OBJ + 5, 100); // unflushed in-place write: may or may not survive
      let open: Open | null = v;
      if (closed) {
        await v.close();
        open = null;
      }
      let replaces = 0;
      b.setFaultHook((op) => (op === 'replace' && replaces++ === failAt ? 'EIO' : undefined));
      let ok = true;
      try {
        if (open !== null) await createSnapshot(b, open.map, 'snap');
        else await snapshotVolume(b, 'vol', 'snap');
      } catch (err) {
        ok = false;
        t.match(err, { code: 'EIO' }, `${closed ? 'closed' : 'open'}, fail at replace ${failAt}`);
      }
      b.setFaultHook(undefined);
      b.powerCut({ keepUnsynced: 'random' });
      const after = b.reopen();

      // The origin always opens for writing, and reads A (+ maybe the unflushed write).
      const origin = await VolumeMap.open(after, 'vol', { forWrite: true });
      const ov = new Volume(origin, after, false);
      const got = Buffer.alloc(SIZE);
      for (const p of await ov.read(0, SIZE)) if (p.data) p.data.copy(got, p.offset);
      const flushed = Buffer.from(v.model);
      pattern(1, 5 * OBJ + 5, 100).copy(flushed, 5 * OBJ + 5);
      t.ok(got.equals(v.model) || got.equals(flushed), 'origin reads its flushed data (+ maybe the unflushed write)');
      let snapState: string;
      try {
        const sm = await VolumeMap.open(after, 'snap', { forWrite: false });
        const sv = new Volume(sm, after, true);
        const s = Buffer.alloc(SIZE);
        for (const p of await sv.read(0, SIZE)) if (p.data) p.data.copy(s, p.offset);
        t.ok(s.equals(got), 'a snapshot that exists is whole: reads what the origin held');
        snapState = 'complete';
        await sv.close();
      } catch (err) {
        t.type(err, VolumeNotFoundError, 'otherwise no snapshot at all');
        snapState = 'absent';
      }
      t.equal(snapState, ok ? 'complete' : 'absent', `succeeded = ${ok}, snapshot ${snapState}`);
      // The origin can still write, without touching what a snapshot reaches.
      const before = await dump(after);
      await ov.write(5 * OBJ, pattern(9, 5 * OBJ, 200), false);
      await ov.close();
      if (snapState === 'complete') await unchanged(t, after, before, 'origin write after the cut copies on write');
      if (ok) break;
    }
  }
});

t.test('a clone larger than its snapshot reads zeros past the snapshot end', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'vol', 4 * OBJ + 1000);
  await v.write(1, 0, v.model.length);
  await v.close();
  await snapshotVolume(b, 'vol', 'snap');
  const res = await cloneSnapshot(b, 'snap', 'big', { size: 20 * OBJ });
  t.equal(res.size, 20 * OBJ);
  const model = Buffer.alloc(20 * OBJ);
  v.model.copy(model);
  const c = await Open.open(b, 'big', true, model);
  t.equal(c.vol.size, 20 * OBJ);
  await c.check(t, 'snapshot data, then zeros');
  const pieces = await c.vol.read(5 * OBJ, 15 * OBJ);
  t.same(pieces, [{ offset: 5 * OBJ, length: 15 * OBJ }], 'one hole past the end');
  await c.write(2, 4 * OBJ + 500, 2 * OBJ); // across the old end
  await c.write(3, 19 * OBJ, OBJ);
  await c.check(t, 'writes across and past the old end');
  await c.close();
  await (await Open.open(b, 'snap', false, v.model)).check(t, 'snapshot unchanged');
  // Same size is the default.
  t.equal((await cloneSnapshot(b, 'snap', 'same')).size, 4 * OBJ + 1000);
});

t.test('removing a snapshot or origin keeps the objects a clone reaches', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'vol');
  await v.write(1, 0, SIZE);
  await v.close();
  await snapshotVolume(b, 'vol', 'snap');
  await snapshotVolume(b, 'vol', 'lonely');
  await cloneSnapshot(b, 'snap', 'clone');
  const c = await Open.open(b, 'clone', true, v.model);
  await c.write(2, 3 * OBJ, 10);
  await c.close();

  const before = await dump(b);
  const lonelyId = (await header(b, 'lonely')).volumeId;
  t.same(await removeVolume(b, 'lonely'), { volumeId: lonelyId, removedObjects: 0 },
    'a snapshot owns no objects: removing it deletes none');
  await removeVolume(b, 'snap');
  const r = await removeVolume(b, 'vol');
  t.equal(r.removedObjects, 0);
  t.match(r.objectsKeptBecause, /"clone" shares its objects/);
  await unchanged(t, b, before, 'every object kept');
  await (await Open.open(b, 'clone', false, c.model)).check(t, 'clone still reads A + its writes');
  t.same(await listVolumes(b), ['clone']);
  // With nothing sharing them, the clone's own objects go with it.
  const rc = await removeVolume(b, 'clone');
  t.ok(rc.removedObjects >= 2, 'clone objects deleted (its chunk and data object)');
  t.equal(rc.objectsKeptBecause, undefined);
});

t.test('markShared: the new generation is durable before any writer uses it', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'vol', { size: SIZE, objectSize: OBJ });
  await map.setEntries([{ index: 0, entry: map.newEntry() }]);
  const gen = map.generation;

  // Hold the header write of markShared at a gate.
  let open!: () => void;
  const gate = new Promise<void>((resolve) => { open = resolve; });
  const seen: string[] = [];
  b.setFaultHook((op, name) => {
    seen.push(`${op} ${name}`);
    if (op === 'replace' && name === 'vol.vol' && seen.length === 1) return gate.then(() => undefined);
  });
  const sharing = map.markShared();
  await new Promise((r) => setImmediate(r));
  t.equal(map.generation, gen, 'not published while the header write is in flight');
  t.equal(map.newObjectName(1), `d.${map.id}.${gen.toString(16)}.1`, 'new objects still use the durable generation');
  const entry = map.newEntry();
  await b.write(map.newObjectName(1), 0, Buffer.from('during'));
  const update = map.setEntries([{ index: 1, entry }, { index: 8, entry }]);
  const grow = map.resize(2 * SIZE);
  await new Promise((r) => setImmediate(r));
  t.same(seen, ['replace vol.vol', 'write ' + map.newObjectName(1)], 'setEntries and resize wait: no chunk or header write yet');

  open();
  const persisted = await sharing;
  await Promise.all([update, grow]);
  t.equal(persisted.generation, gen + 1);
  t.equal(map.generation, gen + 1, 'published after the write');
  t.equal(map.size, 2 * SIZE);
  b.setFaultHook(undefined);
  t.equal(seen[1], `write d.${map.id}.${gen.toString(16)}.1`);
  t.notOk(b.dirtyNames().includes(`d.${map.id}.${gen.toString(16)}.1`), 'the held update still synced its object');
  t.notOk(map.isOwned(entry), 'an object of the old generation now counts as shared');
  await map.close();
  const again = await VolumeMap.open(b, 'vol', { forWrite: false });
  t.equal(await again.lookupAsync(1), entry, 'the held update committed');
  t.equal(again.size, 2 * SIZE);
  t.equal(again.writableSince, gen + 1);

  // A failed header write publishes nothing.
  const m2 = await VolumeMap.open(b, 'vol', { forWrite: true });
  const g2 = m2.generation;
  b.failNext('replace', 'EIO', 'vol.vol');
  await t.rejects(m2.markShared(), { code: 'EIO' });
  t.equal(m2.generation, g2);
  t.equal(m2.writableSince, gen + 1);
  await m2.setEntries([{ index: 2, entry: m2.newEntry() }]);
  t.equal((await header(b, 'vol')).generation, g2, 'the stored header never moved past the published generation');
  await m2.close();
});

t.test('errors', async (t) => {
  const b = new MemoryBlocker();
  const v = await Open.create(b, 'vol');
  await v.write(1, 0, OBJ);
  await v.vol.flush();
  await (await VolumeMap.create(b, 'other', { size: SIZE })).close();

  const stored = await b.readFull('vol.vol');
  const gen = v.map.generation;
  await t.rejects(createSnapshot(b, v.map, 'other'), VolumeExistsError, 'snapshot name taken');
  await t.rejects(createSnapshot(b, v.map, 'vol'), VolumeExistsError, 'snapshot name = origin');
  t.ok((await b.readFull('vol.vol')).equals(stored), 'nothing changed on storage');
  t.equal(v.map.generation, gen, 'nor in memory');
  await t.rejects(createSnapshot(b, v.map, '../x'), { code: 'ARCH_E_BAD_NAME' });
  await t.rejects(createSnapshot(b, v.map, ''), { code: 'ARCH_E_BAD_NAME' });
  await t.rejects(snapshotVolume(b, 'vol', 'other'), VolumeExistsError);
  await t.rejects(snapshotVolume(b, 'nope', 'snap'), VolumeNotFoundError);
  await t.rejects(snapshotVolume(b, 'bad/name', 'snap'), { code: 'ARCH_E_BAD_NAME' });
  const ro = await VolumeMap.open(b, 'vol', { forWrite: false });
  await t.rejects(createSnapshot(b, ro, 'snap'), UsageError, 'read-only map');
  t.equal((await listVolumes(b)).includes('snap'), false);

  await createSnapshot(b, v.map, 'snap');
  await t.rejects(snapshotVolume(b, 'snap', 'snap2'), UsageError, 'snapshot of a snapshot is refused (read-only)');
  await t.rejects(cloneSnapshot(b, 'vol', 'c'), UsageError, 'clone of a writable volume');
  await t.rejects(cloneSnapshot(b, 'vol', 'c'), /not a snapshot/);
  await t.rejects(cloneSnapshot(b, 'nope', 'c'), VolumeNotFoundError);
  await t.rejects(cloneSnapshot(b, 'snap', 'other'), VolumeExistsError, 'clone name taken');
  await t.rejects(cloneSnapshot(b, 'snap', 'snap'), UsageError);
  await t.rejects(cloneSnapshot(b, 'snap', 'a..b'), { code: 'ARCH_E_BAD_NAME' });
  await t.rejects(cloneSnapshot(b, 'snap/', 'c'), { code: 'ARCH_E_BAD_NAME' });
  await t.rejects(cloneSnapshot(b, 'snap', 'c', { size: SIZE - 1 }), /cannot shrink/);
  await t.rejects(cloneSnapshot(b, 'snap', 'c', { size: -1 }), UsageError);
  await t.rejects(cloneSnapshot(b, 'snap', 'c', { size: 2 ** 53 }), UsageError);
  await t.rejects(cloneSnapshot(b, 'snap', 'c', { size: 1.5 }), UsageError);
  t.same(await listVolumes(b), ['other', 'snap', 'vol'], 'no clone appeared');
  await b.replace('vol.corrupt', Buffer.from('garbage'));
  await t.rejects(cloneSnapshot(b, 'snap', 'corrupt'), MapFormatError, 'a corrupt header is never overwritten');
  await t.rejects(cloneSnapshot(b, 'corrupt', 'c'), MapFormatError);

  // A read-only image (not a snapshot) can be cloned too.
  const img = await header(b, 'other');
  img.flags = VolumeFlags.READONLY | VolumeFlags.IMAGE;
  await b.replace('vol.image', encodeHeader(img));
  t.equal((await cloneSnapshot(b, 'image', 'from-image')).sourceCount, 2);
  await v.close();
});

t.test('the sources table limit (u16) is refused clearly', async (t) => {
  const b = new MemoryBlocker();
  const deep = (count: number): VolumeHeader => ({
    flags: VolumeFlags.SNAPSHOT | VolumeFlags.READONLY,
    volumeId: 'ffffffffffffffff',
    size: SIZE,
    objectSizeLog2: 16,
    generation: 2,
    writableSince: 2,
    createdAt: 0,
    sources: Array.from({ length: count }, (_, i) => (i + 1).toString(16).padStart(16, '0')),
    writerSource: count - 1,
    parent: null,
    renameTo: null,
    renamedFrom: null,
    chunkRefs: [{ chunkIndex: 0, source: 0, generation: 1 }],
  });
  await b.replace('vol.deep', encodeHeader(deep(MAX_SOURCES)));
  await t.rejects(cloneSnapshot(b, 'deep', 'c'), /too deep a chain of clones.*65535 sources/);
  await b.replace('vol.almost', encodeHeader(deep(MAX_SOURCES - 1)));
  const res = await cloneSnapshot(b, 'almost', 'c');
  t.equal(res.sourceCount, MAX_SOURCES, 'the last level that fits');
  const h = await header(b, 'c');
  t.equal(h.writerSource, MAX_SOURCES - 1);
  t.equal(h.sources[MAX_SOURCES - 1], res.volumeId);
});
