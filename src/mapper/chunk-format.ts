/**
 * Map chunk object, formats v1 and v2: pure encode/decode over Buffers, no I/O
 * (docs/format.md §3). Imports nothing from node:fs/net and nothing above.
 *
 * A chunk covers CHUNK_ENTRIES consecutive objects: chunk c holds the entries
 * of object indexes [c·4096, c·4096 + 4095]. It is written whole, with
 * Blocker.replace (atomic), under `m.<volid>.<gen>.<c>`. Only the run of
 * entries from the first to the last non-absent one is stored (entries outside
 * it are absent), so a chunk filled from its start, or holding a few
 * neighbours, costs 8 bytes per entry plus 36, never a full 32 KiB. Every
 * integer is little-endian.
 *
 *   offset  size  field
 *        0     8  magic "ARCHVMCK"
 *        8     2  format version, u16 = 1
 *       10     2  header length, u16 = 32 (offset of the first stored entry)
 *       12     2  first: u16, index in the chunk of the first stored entry
 *       14     2  count: u16, number of stored entries (first + count ≤ 4096)
 *       16     8  volume id of the creator (the <volid> of the chunk's name)
 *       24     4  generation, u32 (the <gen> of the chunk's name)
 *       28     4  chunk index, u32 (the <c> of the chunk's name)
 *       32   8·n  count entries × u64 (entry.ts), for chunk slots first .. first+count−1
 *   32+8·n     4  CRC32 (zlib) of every byte before it
 *
 * Version 2 (only when an entry is content-addressed, kind 2) inserts a hash
 * table between the entries and the CRC:
 *
 *   32+8·n     4  hash count h, u32
 *   36+8·n  32·h  h SHA-256 digests; a kind-2 entry's low word indexes them
 *   36+8·n+32·h 4 CRC32 of every byte before it
 *
 * The encoder writes v1 when no entry is kind 2 (so volumes without content
 * entries stay byte-identical to v1), else v2 with a table rebuilt from the
 * entries: each hash once, in order of first use, nothing unused.
 *
 *   full chunk: 32 + 32768 + 4 = 32804 bytes = 8.009 bytes per entry
 *   one entry:  32 + 8 + 4 = 44 bytes;  no entries: 36 bytes
 *
 * The encoder always writes the shortest run (first and last stored entries
 * are present); the decoder accepts any run that fits.
 *
 * The id, generation and index repeat the object's name so that a chunk found
 * under the wrong name (a bug, a botched copy, a stale object) is detected
 * instead of silently serving another volume's data.
 */
import { crc32 } from 'node:zlib';

import {
  EntryKind, checkEntryWords, entryFromWords, entryHashIndex, entryHigh, entryKind, entryLow, makeContentEntry,
} from './entry.js';
import { MapFormatError } from './errors.js';

export const CHUNK_MAGIC = Buffer.from('ARCHVMCK', 'latin1');
export const CHUNK_VERSION = 1;
/** The version with a hash table (content-addressed entries). */
export const CHUNK_VERSION_CONTENT = 2;
export const HASH_BYTES = 32;
const HASH_HEX = /^[0-9a-f]{64}$/;
export const CHUNK_HEADER_LENGTH = 32;
export const CHUNK_ENTRIES_LOG2 = 12;
export const CHUNK_ENTRIES = 1 << CHUNK_ENTRIES_LOG2;
export const ENTRY_BYTES = 8;
const CRC_BYTES = 4;
/** Size of a chunk object holding `count` entries. */
export function chunkByteLength(count: number): number {
  return CHUNK_HEADER_LENGTH + count * ENTRY_BYTES + CRC_BYTES;
}
/** Size of a chunk object with all 4096 entries stored (32804). */
export const CHUNK_BYTES = chunkByteLength(CHUNK_ENTRIES);

/** What a chunk says about itself. */
export interface ChunkIdentity {
  /** 16 hex digits. */
  volumeId: string;
  generation: number;
  chunkIndex: number;
}

/** Size of a v2 chunk object holding `count` entries and `hashCount` hashes. */
export function chunkByteLengthV2(count: number, hashCount: number): number {
  return chunkByteLength(count) + 4 + HASH_BYTES * hashCount;
}

/**
 * Encodes `entries` (length CHUNK_ENTRIES, each a valid MapEntry) as a chunk
 * object. A kind-2 entry's low word indexes `hashes` (64 lowercase hex digits
 * each); the stored table is rebuilt from the entries that use it
 * (deduplicated, compacted) and the entries renumbered. No kind-2 entry: v1.
 */
export function encodeChunk(identity: ChunkIdentity, entries: Float64Array, hashes: readonly string[] = []): Buffer {
  let first = 0;
  while (first < CHUNK_ENTRIES && entries[first] === 0) first++;
  let end = CHUNK_ENTRIES;
  while (end > first && entries[end - 1] === 0) end--;
  if (first === end) first = end = 0;
  const count = end - first;
  // The stored table: hash → stored index, in order of first use.
  const table = new Map<string, number>();
  const stored = new Float64Array(count);
  for (let i = first; i < end; i++) {
    let e = entries[i]!;
    if (e !== 0 && entryKind(e) === EntryKind.CONTENT) {
      const hash = hashes[entryHashIndex(e)];
      if (hash === undefined || !HASH_HEX.test(hash)) throw new Error(`encodeChunk: entry ${i} names hash ${entryHashIndex(e)}, not in the table`);
      let k = table.get(hash);
      if (k === undefined) table.set(hash, k = table.size);
      e = makeContentEntry(k);
    }
    stored[i - first] = e;
  }
  const v2 = table.size > 0;
  const buf = Buffer.alloc(v2 ? chunkByteLengthV2(count, table.size) : chunkByteLength(count));
  CHUNK_MAGIC.copy(buf, 0);
  buf.writeUInt16LE(v2 ? CHUNK_VERSION_CONTENT : CHUNK_VERSION, 8);
  buf.writeUInt16LE(CHUNK_HEADER_LENGTH, 10);
  buf.writeUInt16LE(first, 12);
  buf.writeUInt16LE(count, 14);
  buf.write(identity.volumeId, 16, 8, 'hex');
  buf.writeUInt32LE(identity.generation, 24);
  buf.writeUInt32LE(identity.chunkIndex, 28);
  let off = CHUNK_HEADER_LENGTH;
  for (let k = 0; k < count; k++, off += ENTRY_BYTES) {
    const e = stored[k]!;
    if (e === 0) continue; // Buffer.alloc already zeroed it
    buf.writeUInt32LE(entryLow(e), off);
    buf.writeUInt32LE(entryHigh(e), off + 4);
  }
  if (v2) {
    buf.writeUInt32LE(table.size, off);
    off += 4;
    for (const hash of table.keys()) off += buf.write(hash, off, HASH_BYTES, 'hex');
  }
  const crcOffset = buf.length - CRC_BYTES;
  buf.writeUInt32LE(crc32(buf.subarray(0, crcOffset)), crcOffset);
  return buf;
}

/** What the volume header says entries may name. */
export interface EntryLimits {
  /** Entries' source indexes must be below this. */
  sourceCount: number;
  /** Entries of this source (the volume's own) ... */
  writerSource: number;
  /** ... must not name a generation newer than the volume's. */
  generation: number;
}

/** A decoded chunk: kind-2 entries index `hashes` (64 hex digits each). */
export interface DecodedChunk {
  entries: Float64Array;
  hashes: string[];
}

/**
 * Decodes and validates a chunk object read from `objectName` (v1 or v2).
 * `expected` is what the header's chunk ref promised; `limits` bound the
 * entries. Throws MapFormatError on any deviation.
 */
export function decodeChunk(
  buf: Buffer, objectName: string, expected: ChunkIdentity, limits: EntryLimits,
): Float64Array {
  return decodeChunkTable(buf, objectName, expected, limits).entries;
}

/** decodeChunk, with the hash table that content entries index. */
export function decodeChunkTable(
  buf: Buffer, objectName: string, expected: ChunkIdentity, limits: EntryLimits,
): DecodedChunk {
  const fail = (why: string): never => { throw new MapFormatError(objectName, why); };
  const minimum = chunkByteLength(0);
  if (buf.length < 10) fail(`truncated: ${buf.length} bytes, a chunk has at least ${minimum}`);
  if (!buf.subarray(0, 8).equals(CHUNK_MAGIC)) fail('bad magic: not a map chunk');
  const version = buf.readUInt16LE(8);
  if (version !== CHUNK_VERSION && version !== CHUNK_VERSION_CONTENT) {
    fail(`unsupported chunk format version ${version} (this build reads ${CHUNK_VERSION} and ${CHUNK_VERSION_CONTENT})`);
  }
  if (buf.length < minimum) fail(`truncated: ${buf.length} bytes, a chunk has at least ${minimum}`);
  const headerLength = buf.readUInt16LE(10);
  if (headerLength !== CHUNK_HEADER_LENGTH) fail(`header length ${headerLength}, expected ${CHUNK_HEADER_LENGTH}`);
  const first = buf.readUInt16LE(12);
  const count = buf.readUInt16LE(14);
  let hashCount = 0;
  let expectedLength = chunkByteLength(count);
  if (version === CHUNK_VERSION_CONTENT) {
    const at = CHUNK_HEADER_LENGTH + count * ENTRY_BYTES;
    if (buf.length < at + 4 + CRC_BYTES) {
      fail(`truncated: ${buf.length} bytes, a v2 chunk of ${count} entries has at least ${at + 4 + CRC_BYTES}`);
    }
    hashCount = buf.readUInt32LE(at);
    expectedLength = chunkByteLengthV2(count, hashCount);
  }
  if (buf.length !== expectedLength) {
    fail(`${buf.length < expectedLength ? 'truncated' : 'trailing bytes'}: ${buf.length} bytes, `
      + `a chunk of ${count} entries${version === CHUNK_VERSION_CONTENT ? ` and ${hashCount} hashes` : ''} has ${expectedLength}`);
  }
  const crcOffset = buf.length - CRC_BYTES;
  const stored = buf.readUInt32LE(crcOffset);
  const computed = crc32(buf.subarray(0, crcOffset));
  if (stored !== computed) fail(`bad CRC (stored 0x${hex32(stored)}, computed 0x${hex32(computed)})`);

  if (first + count > CHUNK_ENTRIES) fail(`entries ${first} + ${count} run past the chunk's ${CHUNK_ENTRIES}`);
  const volumeId = buf.toString('hex', 16, 24);
  const generation = buf.readUInt32LE(24);
  const chunkIndex = buf.readUInt32LE(28);
  if (volumeId !== expected.volumeId || generation !== expected.generation || chunkIndex !== expected.chunkIndex) {
    fail(`chunk says volume ${volumeId} generation ${generation} index ${chunkIndex}, `
      + `expected ${expected.volumeId} generation ${expected.generation} index ${expected.chunkIndex}`);
  }

  const entries = new Float64Array(CHUNK_ENTRIES);
  let off = CHUNK_HEADER_LENGTH;
  let contentEntries = 0;
  for (let i = first; i < first + count; i++, off += ENTRY_BYTES) {
    const low = buf.readUInt32LE(off);
    const high = buf.readUInt32LE(off + 4);
    if (low === 0 && high === 0) continue;
    let why = checkEntryWords(low, high, limits.sourceCount, hashCount);
    const kind = high >>> 16;
    if (why === null && kind === EntryKind.DATA && (high & 0xffff) === limits.writerSource && low > limits.generation) {
      why = `names generation ${low}, newer than the volume's ${limits.generation}`;
    }
    if (why === null && kind === EntryKind.CONTENT) contentEntries++;
    if (why !== null) fail(`entry ${i} (object ${chunkIndex * CHUNK_ENTRIES + i}): ${why}`);
    entries[i] = entryFromWords(low, high);
  }
  const hashes: string[] = new Array(hashCount);
  if (version === CHUNK_VERSION_CONTENT) {
    if (hashCount === 0 || contentEntries === 0) fail('v2 chunk without content entries or hashes');
    off += 4;
    for (let k = 0; k < hashCount; k++, off += HASH_BYTES) hashes[k] = buf.toString('hex', off, off + HASH_BYTES);
  }
  return { entries, hashes };
}

function hex32(n: number): string {
  return n.toString(16).padStart(8, '0');
}
