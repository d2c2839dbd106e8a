/**
 * Content-addressed entries (kind 2, docs/format.md §3–4): chunk format v1/v2
 * round trips and corruption, VolumeMap.objectName and persistence of
 * content entries, copy-up into a data object on the first write through
 * compose, images built by ImageBuilder (dedup within and across images,
 * INCOMPLETE while building), and GC of `sha256-` objects.
 */
import t from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import {
  CHUNK_ENTRIES, CHUNK_VERSION, CHUNK_VERSION_CONTENT, chunkByteLength, chunkByteLengthV2,
  decodeChunkTable, encodeChunk,
} from '../../../src/mapper/chunk-format.js';
import { EntryKind, entryHashIndex, entryKind, makeContentEntry, makeEntry } from '../../../src/mapper/entry.js';
import { MapFormatError, UsageError } from '../../../src/mapper/errors.js';
import { VolumeFlags, decodeHeader } from '../../../src/mapper/header-format.js';
import { ImageBuilder } from '../../../src/mapper/image-create.js';
import { collectGarbage } from '../../../src/mapper/gc.js';
import { VolumeMap, cloneSnapshot } from '../../../src/mapper/volume-map.js';
import { Volume } from '../../../src/compose/volume.js';
import { VolumeProvider } from '../../../src/daemon/volume-export.js';
import type { Store } from '../../../src/daemon/store.js';
import { createLogger } from '../../../src/common/log.js';

const ID = { volumeId: '0123456789abcdef', generation: 3, chunkIndex: 1 };
const LIMITS = { sourceCount: 2, writerSource: 0, generation: 9 };
const KiB = 1024;

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}
const H = [sha(Buffer.from('a')), sha(Buffer.from('b')), sha(Buffer.from('c'))];

function decode(buf: Buffer) {
  return decodeChunkTable(buf, 'm.x', ID, LIMITS);
}

function refix(b: Buffer): Buffer {
  b.writeUInt32LE(crc32(b.subarray(0, b.length - 4)), b.length - 4);
  return b;
}

t.test('chunk without content entries is v1, byte for byte as before', async (t) => {
  const entries = new Float64Array(CHUNK_ENTRIES);
  entries[5] = makeEntry(EntryKind.DATA, 1, 2);
  const buf = encodeChunk(ID, entries, H);
  t.equal(buf.readUInt16LE(8), CHUNK_VERSION);
  t.equal(buf.length, chunkByteLength(1));
  t.same(encodeChunk(ID, entries), buf, 'the table is ignored when unused');
  const d = decode(buf);
  t.same(d.hashes, []);
  t.equal(d.entries[5], entries[5]);
});

t.test('v2 round trip: the table is deduplicated and compacted, entries renumbered', async (t) => {
  const entries = new Float64Array(CHUNK_ENTRIES);
  entries[0] = makeContentEntry(2);           // H[2]
  entries[1] = makeEntry(EntryKind.DATA, 0, 9);
  entries[7] = makeContentEntry(2);           // H[2] again
  entries[4095] = makeContentEntry(0);        // H[0]; H[1] unused
  const buf = encodeChunk(ID, entries, H);
  t.equal(buf.readUInt16LE(8), CHUNK_VERSION_CONTENT);
  t.equal(buf.length, chunkByteLengthV2(4096, 2), 'two hashes stored');
  const d = decode(buf);
  t.same(d.hashes, [H[2], H[0]], 'first use order, each once');
  t.equal(entryKind(d.entries[0]!), EntryKind.CONTENT);
  t.equal(d.hashes[entryHashIndex(d.entries[0]!)], H[2]);
  t.equal(d.hashes[entryHashIndex(d.entries[7]!)], H[2]);
  t.equal(d.hashes[entryHashIndex(d.entries[4095]!)], H[0]);
  t.equal(d.entries[1], entries[1]);
  t.equal(d.entries[2], 0);
  t.throws(() => encodeChunk(ID, entries, []), /names hash 2, not in the table/, 'encoder asserts its table');
});

t.test('v2 corruption is detected', async (t) => {
  const entries = new Float64Array(CHUNK_ENTRIES);
  entries[0] = makeContentEntry(0);
  entries[1] = makeContentEntry(1);
  const good = encodeChunk(ID, entries, H); // 32 + 16 + 4 + 64 + 4 = 120
  t.equal(good.length, 120);
  const cases: [string, (b: Buffer) => Buffer, RegExp][] = [
    ['index out of range', (b) => refix((b.writeUInt32LE(2, 40), b)), /entry 1 .*content entry names hash 2, but the chunk's hash table has 2/],
    ['source bits', (b) => refix((b.writeUInt32LE(0x0002_0001, 36), b)), /content entry with source 1/],
    ['hash count too big', (b) => refix((b.writeUInt32LE(3, 48), b)), /truncated: 120 bytes, a chunk of 2 entries and 3 hashes has 152/],
    ['hash count too small', (b) => refix((b.writeUInt32LE(1, 48), b)), /trailing bytes/],
    ['truncated table', (b) => b.subarray(0, 100), /bad CRC|truncated/],
    ['hash bit flip', (b) => (b[60]! ^= 1, b), /bad CRC/],
    ['v1 with a content entry', (b) => {
      const v1 = Buffer.concat([b.subarray(0, 48), Buffer.alloc(4)]);
      v1.writeUInt16LE(1, 8);
      return refix(v1);
    }, /entry 0 .*hash table has 0/],
    ['v2 without content entries', (b) => {
      const c = Buffer.from(b);
      c.writeUInt32LE(0x0001_0000, 36); c.writeUInt32LE(1, 32);
      c.writeUInt32LE(0x0001_0000, 44); c.writeUInt32LE(1, 40);
      return refix(c);
    }, /v2 chunk without content entries/],
    ['version 3', (b) => (b.writeUInt16LE(3, 8), b), /unsupported chunk format version 3/],
  ];
  for (const [what, mutate, re] of cases) {
    let err: unknown = null;
    try { decode(mutate(Buffer.from(good))); } catch (e) { err = e; }
    t.ok(err instanceof MapFormatError, `${what}: MapFormatError`);
    t.match((err as Error | null)?.message, re, what);
  }
});

t.test('VolumeMap: content entries name sha256- objects, persist, are never owned', async (t) => {
  const b = new MemoryBlocker();
  const map = await VolumeMap.create(b, 'v', { size: 8 * 4096 * 64 * KiB, objectSize: 64 * KiB });
  await map.setContent([{ index: 3, hash: H[0]! }, { index: 4, hash: H[1]! }, { index: 4097, hash: H[0]! }]);
  await map.setEntries([{ index: 5, entry: map.newEntry() }]);
  t.equal(map.objectName(map.lookup(3)!, 3), `sha256-${H[0]}`);
  t.equal(map.objectName(map.lookup(4097)!, 4097), `sha256-${H[0]}`);
  t.notOk(map.isOwned(map.lookup(3)!), 'content is never owned');
  t.ok(map.isOwned(map.lookup(5)!));
  t.throws(() => map.contentEntry('xyz'), /bad content hash/);
  await map.close();

  const again = await VolumeMap.open(b, 'v', { forWrite: false });
  t.equal(again.objectName(await again.lookupAsync(4), 4), `sha256-${H[1]}`);
  t.equal(again.objectName(await again.lookupAsync(4097), 4097), `sha256-${H[0]}`);
  t.equal(again.objectName(await again.lookupAsync(5), 5), again.newObjectName(5).replace(/\.[0-9a-f]+\.5$/, '.1.5'));
  await again.close();
  const chunk0 = (await b.readFull(`m.${again.id}.1.0`));
  t.equal(chunk0.readUInt16LE(8), 2, 'chunk 0 is v2');
});

t.test('images: dedup within and across images, zeros absent, INCOMPLETE while building', async (t) => {
  const b = new MemoryBlocker();
  const OS = 64 * KiB;
  const blocks = [randomBytes(OS), randomBytes(OS), randomBytes(OS)];
  const zero = Buffer.alloc(OS);
  const layout = [0, 1, zero, 0, 2, zero, 1, 0]; // 3 unique, 2 zero, 3 repeats
  const raw = Buffer.concat(layout.map((x) => (typeof x === 'number' ? blocks[x]! : x)));

  const img = await ImageBuilder.begin(b, b, 'img1', { size: raw.length, objectSize: OS });
  const during = decodeHeader(await b.readFull('vol.img1'), 'vol.img1');
  t.equal(during.flags, VolumeFlags.IMAGE | VolumeFlags.READONLY | VolumeFlags.INCOMPLETE, 'INCOMPLETE while building');
  await t.rejects(cloneSnapshot(b, 'img1', 'early'), /incomplete/);
  for (let i = 0; i < layout.length; i++) await img.put(i, raw.subarray(i * OS, (i + 1) * OS));
  await img.finish();
  t.match(img.stats, { objects: 8, zero: 2, stored: 3, deduplicated: 3, bytesRead: 8 * OS, bytesStored: 3 * OS });
  const after = decodeHeader(await b.readFull('vol.img1'), 'vol.img1');
  t.equal(after.flags, VolumeFlags.IMAGE | VolumeFlags.READONLY, 'complete');
  const cas = async () => { const n = []; for await (const x of b.list('sha256-')) n.push(x); return n.sort(); };
  t.same(await cas(), blocks.map((x) => `sha256-${sha(x)}`).sort(), 'each unique block once');

  // The same data again, as a stream of unknown size: nothing new stored.
  const img2 = await ImageBuilder.begin(b, b, 'img2', { size: 0, objectSize: OS });
  for (let i = 0; i < layout.length; i++) await img2.put(i, raw.subarray(i * OS, (i + 1) * OS));
  await img2.finish();
  t.match(img2.stats, { stored: 0, deduplicated: 6, zero: 2 });
  t.equal((await cas()).length, 3, 'no new sha256 objects');

  // Both read back as the raw image, through compose.
  for (const name of ['img1', 'img2']) {
    const m = await VolumeMap.open(b, name, { forWrite: false });
    t.equal(m.size, raw.length);
    const v = new Volume(m, b, true);
    const pieces = await v.read(0, raw.length);
    const out = Buffer.alloc(raw.length);
    for (const p of pieces) if (p.data) p.data.copy(out, p.offset);
    t.ok(out.equals(raw), `${name} reads back the raw image`);
    t.equal(m.lookup(2), 0, 'zero object absent');
    await v.close();
  }

  // GC keeps what an image references; after both go, it sweeps the content.
  let r = await collectGarbage(b, { dryRun: false });
  t.equal(r.sweptObjects, 0);
  t.equal(r.contentKeptBecause, null);
  const { removeVolume } = await import('../../../src/mapper/volume-map.js');
  await removeVolume(b, 'img1');
  r = await collectGarbage(b, { dryRun: false });
  t.equal((await cas()).length, 3, 'img2 still uses all three');
  // An incomplete image stops every sha256- sweep.
  const pending = await ImageBuilder.begin(b, b, 'pending', { size: OS, objectSize: OS });
  await removeVolume(b, 'img2');
  r = await collectGarbage(b, { dryRun: false });
  t.match(r.contentKeptBecause, /image being built: pending/);
  t.equal((await cas()).length, 3, 'kept while an image is being built');
  await pending.abort();
  await removeVolume(b, 'pending');
  r = await collectGarbage(b, { dryRun: false });
  t.same(await cas(), [], 'swept once nothing is being built');
});

t.test('copy-up from a content object on the first write to a clone', async (t) => {
  const b = new MemoryBlocker();
  const OS = 64 * KiB;
  const block = randomBytes(OS);
  const img = await ImageBuilder.begin(b, b, 'base', { size: 2 * OS, objectSize: OS });
  await img.put(0, block);
  await img.put(1, block);
  await img.finish();
  await cloneSnapshot(b, 'base', 'c');
  const map = await VolumeMap.open(b, 'c', { forWrite: false });
  const v = new Volume(map, b, false);
  await v.write(100, Buffer.from('hello'), false);
  t.equal(v.stats.copyUps, 1);
  const e = map.lookup(0)!;
  t.equal(entryKind(e), EntryKind.DATA, 'index 0 now a data object');
  t.match(map.objectName(e, 0), /^d\./);
  const [p] = await v.read(0, OS);
  const expected = Buffer.from(block);
  Buffer.from('hello').copy(expected, 100);
  t.ok(p!.data!.equals(expected), 'old bytes around the write');
  t.equal(entryKind(map.lookup(1)!), EntryKind.CONTENT, 'index 1 still shared');
  await v.close();
  t.ok((await b.readFull(`sha256-${sha(block)}`)).equals(block), 'the content object is unchanged');
  await t.rejects(VolumeMap.open(b, 'base', { forWrite: true }), UsageError, 'images are read-only');
});

t.test('the daemon serves a complete image read-only and refuses an incomplete one', async (t) => {
  const b = new MemoryBlocker();
  const OS = 64 * KiB;
  const store: Store = { url: 'memory:', maps: b, data: b, close: async () => {} };
  const provider = new VolumeProvider(store, createLogger({ level: 'error', write: () => {} }));
  const done = await ImageBuilder.begin(b, b, 'done', { size: OS, objectSize: OS });
  await done.put(0, randomBytes(OS));
  await done.finish();
  const pending = await ImageBuilder.begin(b, b, 'pending', { size: OS, objectSize: OS });
  const exp = await provider.open('done');
  t.ok(exp?.readOnly, 'complete image: served read-only');
  await t.rejects(provider.open('pending'), /"pending": the image is incomplete/);
  await exp?.close();
  await pending.abort();
  await provider.close();
});
