/**
 * Creating a clone of a snapshot (STYLE.md habit 8: one file per verb, the
 * machine drawn; docs/format.md §8).
 *
 *   load source header ──▶ check ──────────────────────────▶ check new name free ──▶ write vol.<new> ──▶ done
 *     * not found            * not SNAPSHOT/READONLY            * exists
 *     ▼                      * size smaller than the source     ▼
 *   VolumeNotFoundError      * sources table full (u16)       VolumeExistsError
 *                            ▼
 *                          UsageError
 *
 * One header write and nothing else, so a crash leaves no clone or a complete
 * one. The clone's header:
 *   - a new volume id C, flags 0 (writable), generation = writableSince = 1;
 *   - sources = the source's sources + [C], writer source = the new last
 *     index: the source indexes inside the shared chunks and entries keep
 *     their meaning, and everything they name is shared (its source is not
 *     the writer source), so the clone copies on its first write;
 *   - the source's chunk refs as they are (12 bytes each: the only part that
 *     grows with the data);
 *   - size ≥ the source's (larger reads zeros past the source's end: no
 *     chunk or entry covers it);
 *   - parent = (source name, source id), for `info`.
 * Reads never walk a chain: every entry names its object directly, at any
 * depth. Each level of clone adds one source; the table holds 65,535, so a
 * chain that deep is refused here, clearly, rather than at encode.
 *
 * Only read-only sources can be cloned: a snapshot, or a READONLY image. A
 * writable volume would keep overwriting in place objects the clone reaches;
 * snapshot it first (snapshot-create.ts) and clone the snapshot.
 *
 * The caller holds the lock of the new name (no exclusive create in the
 * Blocker contract) and keeps the source from being removed meanwhile.
 */
import type { Blocker } from '../blockers/blocker.js';
import { UsageError } from './errors.js';
import { MAX_SOURCES, MAX_VOLUME_SIZE, VolumeFlags, type VolumeHeader } from './header-format.js';
import { loadLiveHeader, writeHeader } from './header-store.js';
import { validateVolumeName } from './names.js';
import { checkNameFree } from './snapshot-create.js';
import { newVolumeId } from './volume-map.js';
import { assertComplete } from './image-create.js';

export interface CloneOptions {
  /** Bytes; at least the source's size (the default), at most 2^53 − 1. */
  size?: number;
}

export interface CloneResult {
  volumeId: string;
  size: number;
  /** Sources of the clone (clone depth + 1 … the source's count + 1). */
  sourceCount: number;
}

/** Clones snapshot (or read-only image) `sourceName` as the new writable volume `newName`. */
export async function cloneSnapshot(
  blocker: Blocker, sourceName: string, newName: string, options: CloneOptions = {},
): Promise<CloneResult> {
  validateVolumeName(sourceName);
  validateVolumeName(newName);
  if (sourceName === newName) throw new UsageError(`clone of "${sourceName}": the new name is the source's name`);
  const source = await loadLiveHeader(blocker, sourceName, { repair: false });
  const header = cloneHeader(source, sourceName, options);
  await checkNameFree(blocker, newName);
  await writeHeader(blocker, newName, header);
  return { volumeId: header.volumeId, size: header.size, sourceCount: header.sources.length };
}

/** The clone's header, or UsageError when `source` cannot be cloned so. */
function cloneHeader(source: VolumeHeader, sourceName: string, options: CloneOptions): VolumeHeader {
  const what = `clone of "${sourceName}"`;
  assertComplete(sourceName, source.flags, 'clone of');
  if ((source.flags & (VolumeFlags.SNAPSHOT | VolumeFlags.READONLY)) === 0) {
    throw new UsageError(`${what}: "${sourceName}" is a writable volume, not a snapshot; snapshot it and clone the snapshot`);
  }
  const size = options.size ?? source.size;
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_VOLUME_SIZE) {
    throw new UsageError(`${what}: size ${size} must be a whole number of bytes from 0 to ${MAX_VOLUME_SIZE}`);
  }
  if (size < source.size) {
    throw new UsageError(`${what}: size ${size} is smaller than the source's ${source.size} bytes (a clone cannot shrink)`);
  }
  if (source.sources.length >= MAX_SOURCES) {
    throw new UsageError(`${what}: too deep a chain of clones: "${sourceName}" already has `
      + `${source.sources.length} sources, the format allows ${MAX_SOURCES}`);
  }
  const volumeId = newVolumeId(source.sources);
  return {
    flags: 0,
    volumeId,
    size,
    objectSizeLog2: source.objectSizeLog2,
    generation: 1,
    writableSince: 1,
    createdAt: Date.now(),
    sources: [...source.sources, volumeId],
    writerSource: source.sources.length,
    parent: { name: sourceName, volumeId: source.volumeId },
    renameTo: null,
    renamedFrom: null,
    chunkRefs: source.chunkRefs.map((r) => ({ ...r })),
  };
}
