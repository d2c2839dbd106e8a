/**
 * A map entry: where one object of a volume lives (docs/format.md §4).
 *
 * On storage an entry is a little-endian u64:
 *
 *   bits  0..31  generation   u32, ≥ 1: the <gen> of the object's name
 *                (kind 2: index into the chunk's hash table, chunk format v2)
 *   bits 32..47  source       u16: index into the header's sources table,
 *                             whose volume id is the <volid> of the name (kind 2: 0)
 *   bits 48..51  kind         0 = absent, 1 = data object, 2 = content-addressed
 *                             (`sha256-<hex>`, immutable, never owned)
 *   bits 52..63  reserved     must be 0
 *
 * Absent is the whole u64 being 0: the object was never written (or trimmed),
 * reads return zeros and block status reports a hole.
 *
 * In memory an entry is that same value as a plain JS number. It uses at most
 * 52 bits, so it is exact (below 2^53), costs no allocation, and fits a
 * Float64Array slot. Whether the volume owns the object (may write it in place)
 * is NOT stored: it follows from source and generation against the header (see
 * VolumeMap.isOwned), which is what makes a snapshot O(1).
 *
 * Pure functions, no imports.
 */

/** An entry as a number; 0 = absent. Build with makeEntry, read with entryKind etc. */
export type MapEntry = number;

export const ENTRY_ABSENT: MapEntry = 0;

export const EntryKind = {
  ABSENT: 0,
  DATA: 1,
  CONTENT: 2,
} as const;
export type EntryKind = (typeof EntryKind)[keyof typeof EntryKind];

const TWO_32 = 0x1_0000_0000;
const TWO_48 = 0x1_0000_0000_0000;

/** Builds a data-object entry. Arguments must be in range (asserted by the caller's checks). */
export function makeEntry(kind: EntryKind, source: number, generation: number): MapEntry {
  return kind * TWO_48 + source * TWO_32 + generation;
}

export function entryKind(entry: MapEntry): number {
  return Math.floor(entry / TWO_48);
}

export function entrySource(entry: MapEntry): number {
  return Math.floor(entry / TWO_32) % 0x1_0000;
}

export function entryGeneration(entry: MapEntry): number {
  return entry % TWO_32;
}

/** Low and high u32 words of the stored u64. */
export function entryLow(entry: MapEntry): number {
  return entry % TWO_32;
}

export function entryHigh(entry: MapEntry): number {
  return Math.floor(entry / TWO_32);
}

/** Rebuilds an entry from its stored words. */
export function entryFromWords(low: number, high: number): MapEntry {
  return high * TWO_32 + low;
}

/** Builds a content entry: kind CONTENT, source 0, low word = index into a hash table. */
export function makeContentEntry(hashIndex: number): MapEntry {
  return EntryKind.CONTENT * TWO_48 + hashIndex;
}

/** The hash-table index of a content entry (its low word). */
export function entryHashIndex(entry: MapEntry): number {
  return entry % TWO_32;
}

/**
 * Why the stored words are not a valid entry for a map with `sourceCount`
 * sources and a hash table of `hashCount` hashes, or null when they are.
 * Kind 0 must be all zeros; kind 1 needs generation ≥ 1 and a source inside
 * the table; kind 2 needs source 0 and an index inside the hash table (a v1
 * chunk has none, so it has no kind-2 entry); every other kind, and any
 * reserved bit, is corruption.
 */
export function checkEntryWords(low: number, high: number, sourceCount: number, hashCount = 0): string | null {
  if (high >>> 20 !== 0) return `reserved entry bits set (high word 0x${(high >>> 0).toString(16)})`;
  const kind = high >>> 16;
  if (kind === EntryKind.ABSENT) return low === 0 && high === 0 ? null : 'absent entry with non-zero bits';
  if (kind === EntryKind.CONTENT) {
    if ((high & 0xffff) !== 0) return `content entry with source ${high & 0xffff} (must be 0)`;
    if (low >= hashCount) return `content entry names hash ${low}, but the chunk's hash table has ${hashCount}`;
    return null;
  }
  if (kind !== EntryKind.DATA) return `unknown entry kind ${kind}`;
  if (low === 0) return 'data entry with generation 0';
  const source = high & 0xffff;
  if (source >= sourceCount) return `data entry names source ${source}, but the header has ${sourceCount}`;
  return null;
}
