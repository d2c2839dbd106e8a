/**
 * src/mapper/chunk-format.ts and entry.ts: byte-exact against the independent
 * fixture encoder, random round trips, and every corruption (each byte
 * flipped, truncations, bad fields with a valid CRC, bad entries).
 */
import t, { type Test } from 'tap';
import {
  CHUNK_BYTES, CHUNK_ENTRIES, chunkByteLength, decodeChunk, encodeChunk, type EntryLimits,
} from '../../../src/mapper/chunk-format.js';
import {
  EntryKind, entryFromWords, entryGeneration, entryHigh, entryKind, entryLow, entrySource, makeEntry,
} from '../../../src/mapper/entry.js';
import { MapFormatError } from '../../../src/mapper/errors.js';
import { fixCrc, fixtureChunk, fixtureEntry, prng } from './fixtures.js';

const ID = '0123456789abcdef';
const IDENT = { volumeId: ID, generation: 7, chunkIndex: 3 };
const LIMITS: EntryLimits = { sourceCount: 3, writerSource: 1, generation: 9 };
const NAME = 'm.0123456789abcdef.7.3';

function expectCorrupt(t: Test, buf: Buffer, why: RegExp, msg?: string): void {
  let caught: unknown;
  try {
    decodeChunk(buf, NAME, IDENT, LIMITS);
  } catch (err) {
    caught = err;
  }
  t.ok(caught instanceof MapFormatError, msg ?? `rejected: ${why}`);
  t.equal((caught as MapFormatError)?.objectName, NAME);
  t.match((caught as Error)?.message, why, msg ?? '');
}

t.test('entries: the number form is the documented u64', async (t) => {
  const cases: [number, number, number][] = [[1, 0, 1], [1, 0xffff, 0xffffffff], [1, 2, 3], [2, 7, 1], [1, 1, 0x80000000]];
  for (const [kind, source, gen] of cases) {
    const e = makeEntry(kind as 1 | 2, source, gen);
    t.ok(Number.isSafeInteger(e), 'exact as a JS number');
    t.equal(BigInt(e), fixtureEntry(kind, source, gen));
    t.equal(entryKind(e), kind);
    t.equal(entrySource(e), source);
    t.equal(entryGeneration(e), gen);
    t.equal(entryFromWords(entryLow(e), entryHigh(e)), e);
  }
  t.equal(makeEntry(EntryKind.DATA, 0xffff, 0xffffffff), 2 ** 49 - 1, 'largest v1 entry');
});

t.test('matches the independent encoder byte for byte', async (t) => {
  const entries = new Float64Array(CHUNK_ENTRIES);
  const fixture = new Map<number, bigint>();
  for (const [i, source, gen] of [[0, 0, 1], [1, 1, 9], [4095, 2, 0xffffffff], [100, 1, 2]] as const) {
    entries[i] = makeEntry(EntryKind.DATA, source, gen);
    fixture.set(i, fixtureEntry(1, source, gen));
  }
  const buf = encodeChunk(IDENT, entries);
  t.equal(buf.length, CHUNK_BYTES);
  t.equal(CHUNK_BYTES, 32804);
  t.same(buf, fixtureChunk(ID, 7, 3, fixture));
  t.same(decodeChunk(buf, NAME, IDENT, { ...LIMITS, generation: 0xffffffff }), entries);
});

t.test('only the run from the first to the last present entry is stored', async (t) => {
  const e = makeEntry(EntryKind.DATA, 1, 2);
  const cases: [number[], number][] = [[[], 36], [[0], 44], [[4095], 44], [[5, 9], 32 + 5 * 8 + 4], [[0, 1, 2], 32 + 24 + 4]];
  for (const [present, length] of cases) {
    const entries = new Float64Array(CHUNK_ENTRIES);
    const fixture = new Map<number, bigint>();
    for (const i of present) {
      entries[i] = e;
      fixture.set(i, fixtureEntry(1, 1, 2));
    }
    const buf = encodeChunk(IDENT, entries);
    t.equal(buf.length, length, `entries ${JSON.stringify(present)}: ${length} bytes`);
    t.equal(chunkByteLength(present.length === 0 ? 0 : present[present.length - 1]! - present[0]! + 1), length);
    t.same(buf, fixtureChunk(ID, 7, 3, fixture));
    t.same(decodeChunk(buf, NAME, IDENT, LIMITS), entries);
  }
  // A longer run than needed (absent entries at its ends) is accepted.
  const wide = fixCrc(Buffer.concat([encodeChunk(IDENT, new Float64Array(CHUNK_ENTRIES)).subarray(0, 32), Buffer.alloc(8 * 3 + 4)]));
  wide.writeUInt16LE(10, 12);
  wide.writeUInt16LE(3, 14);
  t.same(decodeChunk(fixCrc(wide), NAME, IDENT, LIMITS), new Float64Array(CHUNK_ENTRIES));
});

t.test('random chunks round-trip', async (t) => {
  const rand = prng(7);
  for (let n = 0; n < 50; n++) {
    const entries = new Float64Array(CHUNK_ENTRIES);
    const density = rand();
    for (let i = 0; i < CHUNK_ENTRIES; i++) {
      if (rand() < density) {
        const source = Math.floor(rand() * LIMITS.sourceCount);
        const gen = 1 + Math.floor(rand() * (source === LIMITS.writerSource ? LIMITS.generation : 0xfffffffe));
        entries[i] = makeEntry(EntryKind.DATA, source, gen);
      }
    }
    const back = decodeChunk(encodeChunk(IDENT, entries), NAME, IDENT, LIMITS);
    if (!Buffer.from(back.buffer).equals(Buffer.from(entries.buffer))) t.fail(`chunk ${n}`);
  }
  t.pass('50 random chunks');
});

t.test('every flipped byte is detected', async (t) => {
  const entries = new Float64Array(CHUNK_ENTRIES);
  entries[5] = makeEntry(EntryKind.DATA, 1, 3);
  entries[60] = makeEntry(EntryKind.DATA, 2, 3);
  const buf = encodeChunk(IDENT, entries);
  const missed: number[] = [];
  for (let i = 0; i < buf.length; i++) {
    for (const mask of [0x01, 0xff]) {
      buf[i]! ^= mask;
      try {
        decodeChunk(buf, NAME, IDENT, LIMITS);
        missed.push(i);
      } catch (err) {
        if (!(err instanceof MapFormatError)) missed.push(i);
      }
      buf[i]! ^= mask;
    }
  }
  t.same(missed, [], `all ${buf.length * 2} single-byte corruptions detected`);
  t.doesNotThrow(() => decodeChunk(buf, NAME, IDENT, LIMITS), 'restored buffer decodes');
});

t.test('truncations, trailing bytes, magic, version, CRC', async (t) => {
  const full = new Float64Array(CHUNK_ENTRIES).fill(makeEntry(EntryKind.DATA, 0, 1));
  const buf = encodeChunk(IDENT, full);
  t.equal(buf.length, CHUNK_BYTES);
  for (const n of [0, 1, 7, 8, 9, 10, 31, 32, 33, 35, 36, 44, 4096, CHUNK_BYTES - 4, CHUNK_BYTES - 1]) {
    expectCorrupt(t, buf.subarray(0, n), /truncated/, `length ${n}`);
  }
  expectCorrupt(t, Buffer.concat([buf, Buffer.alloc(1)]), /trailing bytes: 32805 bytes, a chunk of 4096 entries has 32804/);
  const magic = Buffer.from(buf);
  magic.write('ARCHVHDR', 0, 'latin1');
  expectCorrupt(t, magic, /bad magic: not a map chunk/);
  expectCorrupt(t, Buffer.alloc(CHUNK_BYTES), /bad magic/, 'all zeros is not an empty chunk');
  const v9 = Buffer.from(buf);
  v9.writeUInt16LE(9, 8);
  expectCorrupt(t, v9, /unsupported chunk format version 9/);
  const crc = Buffer.from(buf);
  crc[CHUNK_BYTES - 1]! ^= 0x10;
  expectCorrupt(t, crc, /bad CRC/);
});

t.test('bad fields and entries with a valid CRC', async (t) => {
  const entry = (b: Buffer, i: number, low: number, high: number) => {
    b.writeUInt32LE(low, 32 + 8 * i);
    b.writeUInt32LE(high, 36 + 8 * i);
  };
  const cases: [string, (b: Buffer) => void, RegExp][] = [
    ['header length', (b) => b.writeUInt16LE(40, 10), /header length 40, expected 32/],
    ['count', (b) => b.writeUInt16LE(4095, 14), /trailing bytes: 32804 bytes, a chunk of 4095 entries has 32796/],
    ['run past the end', (b) => b.writeUInt16LE(1, 12), /entries 1 \+ 4096 run past the chunk's 4096/],
    ['other volume', (b) => b.writeUInt8(0xff, 16), /chunk says volume ff23456789abcdef generation 7 index 3, expected 0123456789abcdef/],
    ['other generation', (b) => b.writeUInt32LE(6, 24), /generation 6 index 3, expected .* generation 7 index 3/],
    ['other index', (b) => b.writeUInt32LE(4, 28), /index 4, expected .* index 3/],
    ['absent with bits', (b) => entry(b, 9, 5, 0), /entry 9 \(object 12297\): absent entry with non-zero bits/],
    ['reserved bits', (b) => entry(b, 9, 1, 0x0011_0000 | 0x0010_0000), /reserved entry bits set/],
    ['top bit', (b) => entry(b, 9, 1, 0x8001_0000), /reserved entry bits set/],
    ['kind 2 in a v1 chunk (no hash table)', (b) => entry(b, 0, 1, 0x0002_0000), /entry 0 .*content entry names hash 1, but the chunk's hash table has 0/],
    ['kind 3', (b) => entry(b, 0, 1, 0x0003_0000), /unknown entry kind 3/],
    ['kind 15', (b) => entry(b, 0, 1, 0x000f_0000), /unknown entry kind 15/],
    ['generation 0', (b) => entry(b, 4095, 0, 0x0001_0000), /entry 4095 .*data entry with generation 0/],
    ['source out of range', (b) => entry(b, 1, 1, 0x0001_0003), /names source 3, but the header has 3/],
    ['own entry from the future', (b) => entry(b, 1, 10, 0x0001_0001), /names generation 10, newer than the volume's 9/],
  ];
  const base = new Float64Array(CHUNK_ENTRIES);
  base[0] = base[4095] = makeEntry(EntryKind.DATA, 0, 1);
  const good = encodeChunk(IDENT, base);
  t.equal(good.length, CHUNK_BYTES);
  for (const [name, edit, why] of cases) {
    const b = Buffer.from(good);
    edit(b);
    expectCorrupt(t, fixCrc(b), why, name);
  }
  const ok = Buffer.from(good);
  entry(ok, 1, 10, 0x0001_0002);
  t.doesNotThrow(() => decodeChunk(fixCrc(ok), NAME, IDENT, LIMITS), 'another source may have any generation');
});
