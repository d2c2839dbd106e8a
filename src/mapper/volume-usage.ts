/**
 * How much of the store a volume uses (for `info` and `list`).
 *
 *   open map (read-only) ──▶ per chunk c that exists:
 *                              count non-absent entries ─────────────────▶ allocated
 *                              for every related map that has chunk c:     (+= count)
 *                                mark indexes whose entry names the
 *                                same object as ours ─────────────────────▶ exclusive
 *                                                                            (+= unmarked)
 *
 * - **allocated**: the non-absent entries of the volume's map. Bytes are
 *   `allocatedObjects × objectSize`, an UPPER bound: objects are sparse at
 *   their tail (and a store may punch holes), so the bytes really stored
 *   may be fewer. Objects shared with a snapshot or a parent count here too.
 * - **exclusive**: the data objects that this volume's entries name and that
 *   no other header's entries name: roughly what removing this volume (and
 *   then GC) would free. An object name carries its index, so an object can
 *   only be named by an entry at that same index, and only by a header that
 *   shares a source id with this one: the id in the name is one of ours, and
 *   only snapshots, clones and origins share ids (docs/format.md §8).
 *   Unrelated volumes are not read. Entries that are not data objects
 *   (content-addressed) are never counted as exclusive. Same upper bound on
 *   bytes.
 *
 * Cost: allocated reads every chunk of the volume once, O(its allocated
 * objects). Exclusive also reads every header once (to find the related
 * ones) and, for each of our chunks, the same chunk of every related volume:
 * O(allocated objects of related volumes). Memory is bounded per chunk: each
 * open map caches one chunk (32 KiB), plus a 4096-slot bitmap; so it is
 * O(related volumes × 32 KiB), independent of the volumes' sizes.
 *
 * A point-in-time estimate: volumes written meanwhile may move on under it.
 * A related header that cannot be read is MapFormatError (we cannot tell
 * what it shares), as is a chunk a header names but that is missing.
 *
 * Imports the blocker contract and the mapper's own modules; nothing above.
 */
import type { Blocker } from '../blockers/blocker.js';
import { CHUNK_ENTRIES } from './chunk-format.js';
import { ENTRY_ABSENT, EntryKind, entryKind } from './entry.js';
import { VolumeNotFoundError } from './errors.js';
import type { VolumeHeader } from './header-format.js';
import { readHeader } from './header-store.js';
import { validateVolumeName } from './names.js';
import { HEADER_SCAN_CONCURRENCY, listHeaderNames, mapLimit } from './volume-list.js';
import { VolumeMap } from './volume-map.js';

export interface AllocatedUsage {
  /** Non-absent map entries. */
  allocatedObjects: number;
  /** allocatedObjects × object size: an upper bound on the bytes stored (objects may be sparse). */
  allocatedBytes: number;
}

export interface VolumeUsage extends AllocatedUsage {
  /** Data objects that no other header names. */
  exclusiveObjects: number;
  /** exclusiveObjects × object size (same upper bound). */
  exclusiveBytes: number;
}

/** Allocated objects and bytes of volume `name` (reads its chunks only). */
export async function allocatedUsage(blocker: Blocker, name: string): Promise<AllocatedUsage> {
  validateVolumeName(name);
  const map = await VolumeMap.open(blocker, name, { forWrite: false, cacheChunks: 1 });
  try {
    let allocatedObjects = 0;
    await forEachChunk(map, (base, end) => {
      for (let i = base; i < end; i++) if (map.lookup(i) !== ENTRY_ABSENT) allocatedObjects++;
      return Promise.resolve();
    });
    return { allocatedObjects, allocatedBytes: allocatedObjects * map.objectSize };
  } finally {
    await map.close();
  }
}

/** Allocated and exclusive objects and bytes of volume `name`; see the file comment. */
export async function volumeUsage(blocker: Blocker, name: string): Promise<VolumeUsage> {
  validateVolumeName(name);
  const map = await VolumeMap.open(blocker, name, { forWrite: false, cacheChunks: 1 });
  const related: VolumeMap[] = [];
  try {
    for (const other of await relatedNames(blocker, name, map)) {
      try {
        related.push(await VolumeMap.open(blocker, other, { forWrite: false, cacheChunks: 1 }));
      } catch (err) {
        if (!(err instanceof VolumeNotFoundError)) throw err; // removed meanwhile
      }
    }
    let allocatedObjects = 0;
    let exclusiveObjects = 0;
    const shared = new Uint8Array(CHUNK_ENTRIES);
    await forEachChunk(map, async (base, end) => {
      shared.fill(0);
      for (const other of related) {
        if (base >= other.objectCount) continue;
        // Not loaded yet (we visit each chunk once): ABSENT means it has no such chunk.
        if (other.lookup(base) !== undefined) continue;
        await other.ensureChunk(base / CHUNK_ENTRIES);
        const last = Math.min(end, other.objectCount);
        for (let i = base; i < last; i++) {
          const mine = map.lookup(i)!;
          const theirs = other.lookup(i)!;
          if (mine === ENTRY_ABSENT || theirs === ENTRY_ABSENT) continue;
          if (entryKind(mine) !== EntryKind.DATA || entryKind(theirs) !== EntryKind.DATA) continue;
          if (map.objectName(mine, i) === other.objectName(theirs, i)) shared[i - base] = 1;
        }
      }
      for (let i = base; i < end; i++) {
        const e = map.lookup(i)!;
        if (e === ENTRY_ABSENT) continue;
        allocatedObjects++;
        if (entryKind(e) === EntryKind.DATA && shared[i - base] === 0) exclusiveObjects++;
      }
    });
    const objectSize = map.objectSize;
    return {
      allocatedObjects, allocatedBytes: allocatedObjects * objectSize,
      exclusiveObjects, exclusiveBytes: exclusiveObjects * objectSize,
    };
  } finally {
    await Promise.all([map, ...related].map((m) => m.close()));
  }
}

/**
 * Calls `fn(base, end)` for every chunk of `map` that exists, in order, with
 * the chunk loaded (object indexes base … end − 1). With cacheChunks = 1 the
 * previous chunk is evicted as the next loads.
 */
async function forEachChunk(map: VolumeMap, fn: (base: number, end: number) => Promise<void>): Promise<void> {
  const count = map.objectCount;
  for (let base = 0; base < count; base += CHUNK_ENTRIES) {
    // Before its load, lookup() says ABSENT for a chunk without a ref, undefined for one with.
    if (map.lookup(base) !== undefined) continue;
    await map.ensureChunk(base / CHUNK_ENTRIES);
    await fn(base, Math.min(base + CHUNK_ENTRIES, count));
  }
}

/** Names of the other live headers that share a source id with `map` (snapshots, clones, origins). */
async function relatedNames(blocker: Blocker, name: string, map: VolumeMap): Promise<string[]> {
  const ids = new Set([map.id, ...map.sources]);
  const names = (await listHeaderNames(blocker)).filter((n) => n !== name);
  const hits = await mapLimit(names, HEADER_SCAN_CONCURRENCY, async (other): Promise<string | null> => {
    let h: VolumeHeader;
    try {
      h = await readHeader(blocker, other);
    } catch (err) {
      if (err instanceof VolumeNotFoundError) return null;
      throw err; // MapFormatError: it might share our objects
    }
    if (h.volumeId === map.id && h.renameTo === name) return null; // left by a committed rename to us
    return ids.has(h.volumeId) || h.sources.some((id) => ids.has(id)) ? other : null;
  });
  return hits.filter((n): n is string => n !== null);
}
