/**
 * Volume header object, format v1: pure encode/decode over Buffers, no I/O
 * (docs/format.md §2). Imports nothing from node:fs/net and nothing above.
 *
 * The header `vol.<name>` is the root of a volume's map: the volume's fixed
 * properties, its generation counters, the table of volume ids its entries
 * may name (sources), and a SPARSE sorted list of the map chunks that exist.
 * An empty volume of any size is this header alone (92 bytes). It is always
 * written whole with Blocker.replace (atomic). Every integer is little-endian.
 *
 *   offset  size  field
 *        0     8  magic "ARCHVHDR"
 *        8     2  format version, u16 = 1
 *       10     2  fixed part length, u16 = 80 (offset of the sources table)
 *       12     4  total length, u32, of the whole object including the CRC
 *       16     4  flags, u32: bit 0 READONLY, 1 SNAPSHOT, 2 IMAGE, 3 INCOMPLETE
 *                 (an image being built: not served, not cloned); others 0
 *       20     1  object size log2, u8, 16..26 (64 KiB .. 64 MiB)
 *       21     1  entries per chunk log2, u8 = 12 (4096)
 *       22     2  source count S, u16, ≥ 1
 *       24     2  writer source, u16 < S: the sources index under which this
 *                 volume names the objects and chunks it creates
 *       26     2  parent name length P, u16 ≤ 80 (0 = no parent)
 *       28     2  rename-to length T, u16 ≤ 80 (0 = none; see volume-rename.ts)
 *       30     2  renamed-from length F, u16 ≤ 80 (0 = none)
 *       32     8  volume id (8 bytes; printed as 16 hex digits)
 *       40     8  size in bytes, u64 ≤ 2^53 − 1
 *       48     4  generation, u32 ≥ 1 (bumped by every open for write)
 *       52     4  writable since, u32, 1 ≤ writableSince ≤ generation
 *       56     8  creation time, u64, milliseconds since 1970-01-01 UTC
 *       64     8  parent volume id (zero when there is no parent)
 *       72     4  chunk ref count R, u32
 *       76     4  reserved, must be 0
 *       80   8·S  sources: S volume ids; sources[writer source] = volume id
 *               (unless SNAPSHOT), all distinct and non-zero
 *         12·R  chunk refs, strictly ascending by chunk index:
 *                 u32 chunk index (< number of chunks of the volume)
 *                 u32 generation  (≥ 1; ≤ generation when source = writer)
 *                 u16 source      (< S)
 *                 u16 reserved = 0
 *               the chunk object is m.<sources[source]>.<generation>.<index>
 *            P  parent name (ASCII, a valid volume name)
 *            T  rename-to name
 *            F  renamed-from name
 *            4  CRC32 (zlib) of every byte before it
 *
 * Decoding checks, in this order: length, magic, version (so a newer format
 * says so rather than "bad CRC"), lengths, CRC, then every field's range.
 */
import { crc32 } from 'node:zlib';

import { CHUNK_ENTRIES_LOG2 } from './chunk-format.js';
import { MapFormatError } from './errors.js';
import { isValidVolumeName, isVolumeId } from './names.js';

export const HEADER_MAGIC = Buffer.from('ARCHVHDR', 'latin1');
export const HEADER_VERSION = 1;
export const HEADER_FIXED_LENGTH = 80;
export const SOURCE_BYTES = 8;
export const CHUNK_REF_BYTES = 12;
export const CRC_BYTES = 4;

export const MIN_OBJECT_SIZE_LOG2 = 16;
export const MAX_OBJECT_SIZE_LOG2 = 26;
export const DEFAULT_OBJECT_SIZE_LOG2 = 22;
/** Sizes are JS numbers; the NBD layer also stops at 2^53 (src/nbd/export.ts). */
export const MAX_VOLUME_SIZE = Number.MAX_SAFE_INTEGER;
export const MAX_GENERATION = 0xffff_ffff;
export const MAX_SOURCES = 0xffff;

export const VolumeFlags = {
  /** No writes: open for write is refused. */
  READONLY: 1,
  /** A snapshot: read-only, shares its origin's objects and chunks. */
  SNAPSHOT: 2,
  /** Marked as an image to clone from (informational in v1). */
  IMAGE: 4,
  /**
   * An image still being built (image-create.ts): it is neither served nor
   * cloned, and while any header has it, GC sweeps no `sha256-` object.
   */
  INCOMPLETE: 8,
} as const;
const KNOWN_FLAGS = VolumeFlags.READONLY | VolumeFlags.SNAPSHOT | VolumeFlags.IMAGE | VolumeFlags.INCOMPLETE;

/** A map chunk that exists: `m.<sources[source]>.<generation>.<chunkIndex>`. */
export interface ChunkRef {
  chunkIndex: number;
  source: number;
  generation: number;
}

export interface ParentInfo {
  /** Name of the snapshot this volume was cloned from, when it was cloned (for `info`). */
  name: string;
  volumeId: string;
}

/** The decoded header. Volume ids are 16 lowercase hex digits. */
export interface VolumeHeader {
  flags: number;
  volumeId: string;
  size: number;
  objectSizeLog2: number;
  generation: number;
  writableSince: number;
  createdAt: number;
  sources: string[];
  writerSource: number;
  parent: ParentInfo | null;
  renameTo: string | null;
  renamedFrom: string | null;
  /** Strictly ascending by chunkIndex. */
  chunkRefs: ChunkRef[];
}

const TWO_32 = 0x1_0000_0000;

/** Number of objects of a volume: ceil(size / objectSize). */
export function objectCountOf(size: number, objectSizeLog2: number): number {
  return Math.ceil(size / 2 ** objectSizeLog2);
}

/** Number of map chunks that can exist for a volume. */
export function chunkCountOf(size: number, objectSizeLog2: number): number {
  return Math.ceil(objectCountOf(size, objectSizeLog2) / 2 ** CHUNK_ENTRIES_LOG2);
}

/** Byte length of the encoded header. */
export function headerByteLength(h: VolumeHeader): number {
  return HEADER_FIXED_LENGTH + SOURCE_BYTES * h.sources.length + CHUNK_REF_BYTES * h.chunkRefs.length
    + nameLength(h.parent?.name) + nameLength(h.renameTo) + nameLength(h.renamedFrom) + CRC_BYTES;
}

/**
 * Why `h` is not a valid v1 header, or null. Shared by encode (where a failure
 * is a bug) and decode (where it is corruption).
 */
export function checkHeader(h: VolumeHeader): string | null {
  if (!Number.isInteger(h.flags) || h.flags < 0 || (h.flags & ~KNOWN_FLAGS) !== 0) return `unknown flags 0x${h.flags.toString(16)}`;
  if (!isVolumeId(h.volumeId)) return `bad volume id ${JSON.stringify(h.volumeId)}`;
  if (!Number.isSafeInteger(h.size) || h.size < 0) return `size ${h.size} out of range (0 .. ${MAX_VOLUME_SIZE})`;
  if (!Number.isInteger(h.objectSizeLog2) || h.objectSizeLog2 < MIN_OBJECT_SIZE_LOG2 || h.objectSizeLog2 > MAX_OBJECT_SIZE_LOG2) {
    return `object size log2 ${h.objectSizeLog2} out of range (${MIN_OBJECT_SIZE_LOG2} .. ${MAX_OBJECT_SIZE_LOG2})`;
  }
  if (!isU32(h.generation) || h.generation < 1) return `generation ${h.generation} out of range (1 .. ${MAX_GENERATION})`;
  if (!isU32(h.writableSince) || h.writableSince < 1 || h.writableSince > h.generation) {
    return `writable-since ${h.writableSince} out of range (1 .. generation ${h.generation})`;
  }
  if (!Number.isSafeInteger(h.createdAt) || h.createdAt < 0) return `creation time ${h.createdAt} out of range`;
  const s = h.sources.length;
  if (s < 1 || s > MAX_SOURCES) return `source count ${s} out of range (1 .. ${MAX_SOURCES})`;
  const seen = new Set<string>();
  for (const id of h.sources) {
    if (!isVolumeId(id)) return `bad source volume id ${JSON.stringify(id)}`;
    if (seen.has(id)) return `source volume id ${id} listed twice`;
    seen.add(id);
  }
  if (!Number.isInteger(h.writerSource) || h.writerSource < 0 || h.writerSource >= s) return `writer source ${h.writerSource} out of range (0 .. ${s - 1})`;
  if ((h.flags & VolumeFlags.SNAPSHOT) === 0 && h.sources[h.writerSource] !== h.volumeId) {
    return `writer source ${h.writerSource} is ${h.sources[h.writerSource]}, not the volume id ${h.volumeId}`;
  }
  if (h.parent !== null) {
    if (!isValidVolumeName(h.parent.name)) return `bad parent name ${JSON.stringify(h.parent.name)}`;
    if (!isVolumeId(h.parent.volumeId)) return `bad parent volume id ${JSON.stringify(h.parent.volumeId)}`;
  }
  if (h.renameTo !== null && !isValidVolumeName(h.renameTo)) return `bad rename-to name ${JSON.stringify(h.renameTo)}`;
  if (h.renamedFrom !== null && !isValidVolumeName(h.renamedFrom)) return `bad renamed-from name ${JSON.stringify(h.renamedFrom)}`;
  const chunks = chunkCountOf(h.size, h.objectSizeLog2);
  let previous = -1;
  for (const ref of h.chunkRefs) {
    if (!isU32(ref.chunkIndex) || ref.chunkIndex >= chunks) return `chunk ref index ${ref.chunkIndex} beyond the volume's ${chunks} chunks`;
    if (ref.chunkIndex <= previous) return `chunk refs not strictly ascending at index ${ref.chunkIndex}`;
    previous = ref.chunkIndex;
    if (!Number.isInteger(ref.source) || ref.source < 0 || ref.source >= s) return `chunk ref ${ref.chunkIndex} names source ${ref.source} of ${s}`;
    if (!isU32(ref.generation) || ref.generation < 1) return `chunk ref ${ref.chunkIndex} has generation ${ref.generation}`;
    if (ref.source === h.writerSource && ref.generation > h.generation) {
      return `chunk ref ${ref.chunkIndex} has generation ${ref.generation}, newer than the volume's ${h.generation}`;
    }
  }
  return null;
}

/** Encodes a header; `h` must be valid (a bug otherwise). */
export function encodeHeader(h: VolumeHeader): Buffer {
  const why = checkHeader(h);
  if (why !== null) throw new Error(`encodeHeader: invalid header: ${why}`);
  const total = headerByteLength(h);
  const buf = Buffer.alloc(total);
  HEADER_MAGIC.copy(buf, 0);
  buf.writeUInt16LE(HEADER_VERSION, 8);
  buf.writeUInt16LE(HEADER_FIXED_LENGTH, 10);
  buf.writeUInt32LE(total, 12);
  buf.writeUInt32LE(h.flags, 16);
  buf.writeUInt8(h.objectSizeLog2, 20);
  buf.writeUInt8(CHUNK_ENTRIES_LOG2, 21);
  buf.writeUInt16LE(h.sources.length, 22);
  buf.writeUInt16LE(h.writerSource, 24);
  buf.writeUInt16LE(nameLength(h.parent?.name), 26);
  buf.writeUInt16LE(nameLength(h.renameTo), 28);
  buf.writeUInt16LE(nameLength(h.renamedFrom), 30);
  buf.write(h.volumeId, 32, 8, 'hex');
  writeU64(buf, h.size, 40);
  buf.writeUInt32LE(h.generation, 48);
  buf.writeUInt32LE(h.writableSince, 52);
  writeU64(buf, h.createdAt, 56);
  if (h.parent !== null) buf.write(h.parent.volumeId, 64, 8, 'hex');
  buf.writeUInt32LE(h.chunkRefs.length, 72);
  let off = HEADER_FIXED_LENGTH;
  for (const id of h.sources) {
    buf.write(id, off, SOURCE_BYTES, 'hex');
    off += SOURCE_BYTES;
  }
  for (const ref of h.chunkRefs) {
    buf.writeUInt32LE(ref.chunkIndex, off);
    buf.writeUInt32LE(ref.generation, off + 4);
    buf.writeUInt16LE(ref.source, off + 8);
    off += CHUNK_REF_BYTES;
  }
  for (const name of [h.parent?.name, h.renameTo, h.renamedFrom]) {
    if (name) off += buf.write(name, off, 'latin1');
  }
  buf.writeUInt32LE(crc32(buf.subarray(0, off)), off);
  return buf;
}

/** Decodes and validates the header read from `objectName`; MapFormatError on any problem. */
export function decodeHeader(buf: Buffer, objectName: string): VolumeHeader {
  const fail = (why: string): never => { throw new MapFormatError(objectName, why); };
  const minimum = HEADER_FIXED_LENGTH + SOURCE_BYTES + CRC_BYTES;
  if (buf.length < 10) fail(`truncated: ${buf.length} bytes, a header has at least ${minimum}`);
  if (!buf.subarray(0, 8).equals(HEADER_MAGIC)) fail('bad magic: not a volume header');
  const version = buf.readUInt16LE(8);
  if (version !== HEADER_VERSION) fail(`unsupported header format version ${version} (this build reads ${HEADER_VERSION})`);
  if (buf.length < minimum) fail(`truncated: ${buf.length} bytes, a header has at least ${minimum}`);
  const fixedLength = buf.readUInt16LE(10);
  if (fixedLength !== HEADER_FIXED_LENGTH) fail(`fixed part length ${fixedLength}, expected ${HEADER_FIXED_LENGTH}`);
  const total = buf.readUInt32LE(12);
  if (total !== buf.length) fail(`${buf.length < total ? 'truncated' : 'trailing bytes'}: object has ${buf.length} bytes, header says ${total}`);
  const sourceCount = buf.readUInt16LE(22);
  const parentLength = buf.readUInt16LE(26);
  const renameToLength = buf.readUInt16LE(28);
  const renamedFromLength = buf.readUInt16LE(30);
  const refCount = buf.readUInt32LE(72);
  const expected = HEADER_FIXED_LENGTH + SOURCE_BYTES * sourceCount + CHUNK_REF_BYTES * refCount
    + parentLength + renameToLength + renamedFromLength + CRC_BYTES;
  if (expected !== total) fail(`lengths do not add up: ${expected} bytes from the counts, header says ${total}`);
  const stored = buf.readUInt32LE(total - CRC_BYTES);
  const computed = crc32(buf.subarray(0, total - CRC_BYTES));
  if (stored !== computed) fail(`bad CRC (stored 0x${hex32(stored)}, computed 0x${hex32(computed)})`);

  const chunkEntriesLog2 = buf.readUInt8(21);
  if (chunkEntriesLog2 !== CHUNK_ENTRIES_LOG2) fail(`entries per chunk 2^${chunkEntriesLog2}, format v1 has 2^${CHUNK_ENTRIES_LOG2}`);
  if (buf.readUInt32LE(76) !== 0) fail('reserved field is not zero');
  const sizeHigh = buf.readUInt32LE(44);
  const createdHigh = buf.readUInt32LE(60);
  if (sizeHigh > 0x1f_ffff) fail('size out of range (above 2^53 - 1)');
  if (createdHigh > 0x1f_ffff) fail('creation time out of range');
  const parentId = buf.toString('hex', 64, 72);
  if ((parentLength === 0) !== (parentId === '0000000000000000')) fail('parent name and parent id disagree');

  let off = HEADER_FIXED_LENGTH;
  const sources: string[] = [];
  for (let i = 0; i < sourceCount; i++, off += SOURCE_BYTES) sources.push(buf.toString('hex', off, off + SOURCE_BYTES));
  const chunkRefs: ChunkRef[] = new Array(refCount);
  for (let i = 0; i < refCount; i++, off += CHUNK_REF_BYTES) {
    if (buf.readUInt16LE(off + 10) !== 0) fail(`chunk ref ${i}: reserved field is not zero`);
    chunkRefs[i] = {
      chunkIndex: buf.readUInt32LE(off),
      generation: buf.readUInt32LE(off + 4),
      source: buf.readUInt16LE(off + 8),
    };
  }
  const readName = (length: number): string | null => {
    if (length === 0) return null;
    const name = buf.toString('latin1', off, off + length);
    off += length;
    return name;
  };
  const parentName = readName(parentLength);
  const renameTo = readName(renameToLength);
  const renamedFrom = readName(renamedFromLength);

  const h: VolumeHeader = {
    flags: buf.readUInt32LE(16),
    volumeId: buf.toString('hex', 32, 40),
    size: sizeHigh * TWO_32 + buf.readUInt32LE(40),
    objectSizeLog2: buf.readUInt8(20),
    generation: buf.readUInt32LE(48),
    writableSince: buf.readUInt32LE(52),
    createdAt: createdHigh * TWO_32 + buf.readUInt32LE(56),
    sources,
    writerSource: buf.readUInt16LE(24),
    parent: parentName === null ? null : { name: parentName, volumeId: parentId },
    renameTo,
    renamedFrom,
    chunkRefs,
  };
  const why = checkHeader(h);
  if (why !== null) fail(why);
  return h;
}

function nameLength(name: string | null | undefined): number {
  return name ? name.length : 0;
}

function isU32(n: number): boolean {
  return Number.isInteger(n) && n >= 0 && n <= 0xffff_ffff;
}

function writeU64(buf: Buffer, value: number, offset: number): void {
  buf.writeUInt32LE(value % TWO_32, offset);
  buf.writeUInt32LE(Math.floor(value / TWO_32), offset + 4);
}

function hex32(n: number): string {
  return n.toString(16).padStart(8, '0');
}
