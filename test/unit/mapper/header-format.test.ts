/**
 * src/mapper/header-format.ts: byte-exact against the independent fixture
 * encoder, random round trips, and every corruption: each byte flipped, each
 * truncation, and each out-of-range field (with a valid CRC, so the field
 * check itself is what catches it).
 */
import t, { type Test } from 'tap';
import { MapFormatError } from '../../../src/mapper/errors.js';
import {
  VolumeFlags, decodeHeader, encodeHeader, headerByteLength, type VolumeHeader,
} from '../../../src/mapper/header-format.js';
import { fixCrc, fixtureHeader, prng, randomHeader } from './fixtures.js';

const ID = '0123456789abcdef';
const OTHER = 'fedcba9876543210';
const PIB = 2 ** 50;

function header(over: Partial<VolumeHeader> = {}): VolumeHeader {
  return {
    flags: 0, volumeId: ID, size: 2 ** 46, objectSizeLog2: 22, generation: 3, writableSince: 2,
    createdAt: 1_700_000_000_000, sources: [ID], writerSource: 0, parent: null, renameTo: null,
    renamedFrom: null, chunkRefs: [], ...over,
  };
}

/** A small header with every variable part present. */
const SMALL = header({
  sources: [OTHER, ID], writerSource: 1, parent: { name: 'gold', volumeId: OTHER },
  chunkRefs: [{ chunkIndex: 0, source: 0, generation: 9 }, { chunkIndex: 1, source: 1, generation: 3 }],
});

function expectCorrupt(t: Test, buf: Buffer, why: RegExp, msg?: string): void {
  let caught: unknown;
  try {
    decodeHeader(buf, 'vol.test');
  } catch (err) {
    caught = err;
  }
  t.ok(caught instanceof MapFormatError, msg ?? `rejected: ${why}`);
  const e = caught as MapFormatError;
  t.equal(e?.code, 'ARCH_E_MAP_CORRUPT');
  t.equal(e?.objectName, 'vol.test');
  t.match(e?.message, /^map object "vol\.test": /);
  t.match(e?.message, why, msg ?? '');
}

t.test('matches the independent encoder byte for byte', async (t) => {
  const empty = header({ size: PIB, generation: 1, writableSince: 1 });
  const fixture = fixtureHeader({ id: ID, size: BigInt(PIB), created: 1_700_000_000_000n });
  t.same(encodeHeader(empty), fixture, 'empty 1 PiB volume');
  t.same(decodeHeader(fixture, 'vol.x'), empty);

  const full = header({
    flags: VolumeFlags.READONLY | VolumeFlags.IMAGE, sources: [OTHER, ID], writerSource: 1,
    parent: { name: 'gold-1', volumeId: OTHER }, renameTo: 'new', renamedFrom: 'old',
    chunkRefs: [{ chunkIndex: 0, source: 0, generation: 9 }, { chunkIndex: 5, source: 1, generation: 3 }],
  });
  const fullFixture = fixtureHeader({
    flags: 5, id: ID, size: BigInt(2 ** 46), gen: 3, writableSince: 2, created: 1_700_000_000_000n,
    sources: [OTHER, ID], writer: 1, parent: { name: 'gold-1', id: OTHER }, renameTo: 'new', renamedFrom: 'old',
    refs: [[0, 9, 0], [5, 3, 1]],
  });
  t.same(encodeHeader(full), fullFixture, 'every field');
  t.same(decodeHeader(fullFixture, 'vol.x'), full);
});

t.test('an empty 1 PiB volume is one small header', async (t) => {
  const buf = encodeHeader(header({ size: PIB }));
  t.equal(buf.length, 92);
  t.ok(buf.length < 512);
  t.equal(headerByteLength(header({ size: PIB })), 92);
  const max = encodeHeader(header({ size: Number.MAX_SAFE_INTEGER, objectSizeLog2: 16 }));
  t.equal(decodeHeader(max, 'vol.x').size, Number.MAX_SAFE_INTEGER, 'largest size round-trips');
});

t.test('random headers round-trip', async (t) => {
  const rand = prng(42);
  for (let i = 0; i < 1000; i++) {
    const h = randomHeader(rand);
    const buf = encodeHeader(h);
    t.equal(buf.length, headerByteLength(h));
    const back = decodeHeader(buf, 'vol.r');
    if (JSON.stringify(back) !== JSON.stringify(h)) t.same(back, h, `header ${i}`);
    if (!encodeHeader(back).equals(buf)) t.fail(`re-encode ${i}`);
  }
  t.pass('1000 round trips');
});

t.test('every flipped byte is detected', async (t) => {
  const buf = encodeHeader(SMALL);
  for (let i = 0; i < buf.length; i++) {
    for (const mask of [0x01, 0x80, 0xff]) {
      const bad = Buffer.from(buf);
      bad[i]! ^= mask;
      t.throws(() => decodeHeader(bad, 'vol.flip'), MapFormatError, `byte ${i} ^ 0x${mask.toString(16)}`);
    }
  }
});

t.test('every truncation and trailing garbage is detected', async (t) => {
  const buf = encodeHeader(SMALL);
  for (let n = 0; n < buf.length; n++) {
    expectCorrupt(t, buf.subarray(0, n), n < 8 ? /truncated/ : n < 10 ? /truncated|bad magic/ : /truncated/, `length ${n}`);
  }
  expectCorrupt(t, Buffer.concat([buf, Buffer.from([0])]), /trailing bytes/);
  expectCorrupt(t, Buffer.alloc(0), /truncated: 0 bytes/);
});

t.test('wrong magic and unknown versions are named as such (not as a CRC error)', async (t) => {
  const buf = encodeHeader(SMALL);
  const magic = Buffer.from(buf);
  magic.write('ARCHVMCK', 0, 'latin1');
  expectCorrupt(t, magic, /bad magic: not a volume header/);
  const v2 = Buffer.from(buf);
  v2.writeUInt16LE(2, 8);
  expectCorrupt(t, v2, /unsupported header format version 2 \(this build reads 1\)/);
  const zeros = Buffer.alloc(512);
  expectCorrupt(t, zeros, /bad magic/, 'all zeros is not an empty header');
});

t.test('bad CRC', async (t) => {
  const buf = encodeHeader(SMALL);
  buf.writeUInt32LE(buf.readUInt32LE(buf.length - 4) ^ 1, buf.length - 4);
  expectCorrupt(t, buf, /bad CRC \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)/);
});

t.test('out-of-range fields with a valid CRC', async (t) => {
  const cases: [string, (b: Buffer) => void, RegExp][] = [
    ['fixed length', (b) => b.writeUInt16LE(81, 10), /fixed part length 81/],
    ['total length', (b) => b.writeUInt32LE(b.length + 1, 12), /truncated: object has \d+ bytes, header says/],
    ['counts vs total', (b) => b.writeUInt32LE(3, 72), /lengths do not add up/],
    ['unknown flag', (b) => b.writeUInt32LE(16, 16), /unknown flags 0x10/],
    ['object size 2^15', (b) => b.writeUInt8(15, 20), /object size log2 15 out of range/],
    ['object size 2^27', (b) => b.writeUInt8(27, 20), /object size log2 27 out of range/],
    ['chunk entries', (b) => b.writeUInt8(13, 21), /entries per chunk 2\^13/],
    ['writer source', (b) => b.writeUInt16LE(2, 24), /writer source 2 out of range/],
    ['writer is not us', (b) => b.writeUInt16LE(0, 24), /writer source 0 is fedcba9876543210, not the volume id/],
    ['zero volume id', (b) => b.fill(0, 32, 40), /bad volume id/],
    ['size ≥ 2^53', (b) => b.writeUInt32LE(0x20_0000, 44), /size out of range/],
    ['generation 0', (b) => { b.writeUInt32LE(0, 48); b.writeUInt32LE(0, 52); }, /generation 0 out of range/],
    ['writable since 0', (b) => b.writeUInt32LE(0, 52), /writable-since 0 out of range/],
    ['writable since > generation', (b) => b.writeUInt32LE(4, 52), /writable-since 4 out of range \(1 \.\. generation 3\)/],
    ['creation time', (b) => b.writeUInt32LE(0xffff_ffff, 60), /creation time out of range/],
    ['parent id without name', (b) => b.fill(0, 64, 72), /parent name and parent id disagree/],
    ['reserved', (b) => b.writeUInt32LE(1, 76), /reserved field is not zero/],
    ['duplicate source', (b) => Buffer.from(ID, 'hex').copy(b, 80), /listed twice/],
    ['zero source', (b) => b.fill(0, 80, 88), /bad source volume id/],
    ['refs out of order', (b) => b.writeUInt32LE(1, 96), /not strictly ascending at index 1/],
    ['ref beyond the volume', (b) => b.writeUInt32LE(3, 108), /chunk ref index 3 beyond the volume's 3 chunks/],
    ['ref source', (b) => b.writeUInt16LE(2, 104), /chunk ref 0 names source 2 of 2/],
    ['ref generation 0', (b) => b.writeUInt32LE(0, 100), /chunk ref 0 has generation 0/],
    ['own ref newer than volume', (b) => b.writeUInt32LE(4, 112), /chunk ref 1 has generation 4, newer than the volume's 3/],
    ['ref reserved', (b) => b.writeUInt16LE(1, 106), /chunk ref 0: reserved field is not zero/],
    ['parent name characters', (b) => b.write('go/d', 120, 'latin1'), /bad parent name "go\/d"/],
  ];
  // Exactly 3 chunks, so a ref to chunk 3 is out of range.
  const base = { ...SMALL, size: 3 * 4096 * 4 * 2 ** 20 };
  const good = encodeHeader(base);
  t.equal(good.length, 80 + 16 + 24 + 4 + 4);
  for (const [name, edit, why] of cases) {
    const b = Buffer.from(good);
    edit(b);
    expectCorrupt(t, fixCrc(b), why, name);
  }
});

t.test('a snapshot may have a writer source that is not its own id', async (t) => {
  const snap = header({ flags: VolumeFlags.SNAPSHOT | VolumeFlags.READONLY, sources: [OTHER], writerSource: 0 });
  t.same(decodeHeader(encodeHeader(snap), 'vol.s'), snap);
});

t.test('encodeHeader refuses an invalid header (a bug, not corruption)', async (t) => {
  t.throws(() => encodeHeader(header({ writableSince: 9 })), /encodeHeader: invalid header: writable-since 9/);
  t.throws(() => encodeHeader(header({ size: -1 })), /size -1 out of range/);
  t.throws(() => encodeHeader(header({ renameTo: '../x' })), /bad rename-to name/);
});
