/**
 * Removing a volume (STYLE.md habit 8: one file per verb, the machine drawn).
 *
 *   load live header ──▶ scan other headers ──▶ remove vol.<name> ──▶ delete m.<id>.*, d.<id>.* ──▶ done
 *     *                    .                                            (objects no one else names)
 *     * not found          . another header names our id
 *     * (or renamed)       . in its sources, or cannot be read
 *     ▼                    ▼
 *   VolumeNotFoundError  remove vol.<name> ──▶ done, objects left to GC
 *
 * The header goes first, durably: from that instant the volume does not exist,
 * and a crash while deleting objects leaves only orphans that no header references,
 * which GC sweeps. Objects are deleted only when no other header can reach
 * them: a clone or snapshot lists this id in its sources, and an
 * unreadable header might, so in those cases the objects stay for GC, which
 * frees them once nothing references them.
 *
 * The scan reads every header (O(volumes)); removal is rare and this keeps it
 * safe without reference counts. The caller holds the volume lock and nobody
 * has the volume open (src/locks/).
 */
import type { Blocker } from '../blockers/blocker.js';
import { MapFormatError, VolumeNotFoundError } from './errors.js';
import type { VolumeHeader } from './header-format.js';
import { loadLiveHeader, readHeader } from './header-store.js';
import { CHUNK_PREFIX, DATA_PREFIX, headerObjectName, validateVolumeName } from './names.js';
import { HEADER_SCAN_CONCURRENCY, listHeaderNames, mapLimit } from './volume-list.js';

/** Object removals in flight at once. */
const REMOVE_CONCURRENCY = 32;

export interface RemoveResult {
  volumeId: string;
  /** Map chunks and data objects deleted. */
  removedObjects: number;
  /** Why the volume's objects were left for GC, when they were. */
  objectsKeptBecause?: string;
}

/** Removes volume `name`; see the file comment for what happens to its objects. */
export async function removeVolume(blocker: Blocker, name: string): Promise<RemoveResult> {
  validateVolumeName(name);
  const header = await loadLiveHeader(blocker, name);
  const id = header.volumeId;
  const keptBecause = await findOtherReference(blocker, name, header);
  await blocker.remove(headerObjectName(name));
  // A removal may sit in a volatile cache (Blocker contract). The header's
  // removal must be durable before any chunk goes, or a power cut could bring
  // back a header whose chunks are gone. sync() with no names covers removals.
  await blocker.sync();
  if (keptBecause !== null) return { volumeId: id, removedObjects: 0, objectsKeptBecause: keptBecause };
  let removedObjects = 0;
  for (const prefix of [`${CHUNK_PREFIX}${id}.`, `${DATA_PREFIX}${id}.`]) {
    const objects: string[] = [];
    for await (const objectName of blocker.list(prefix)) objects.push(objectName);
    await mapLimit(objects, REMOVE_CONCURRENCY, (objectName) => blocker.remove(objectName));
    removedObjects += objects.length;
  }
  return { volumeId: id, removedObjects };
}

/**
 * Why another header may reference volume `header.volumeId`'s objects, or null
 * when none can. A stale header left by a committed rename to `name` (same id,
 * renameTo = name) is removed on the way.
 */
async function findOtherReference(blocker: Blocker, name: string, header: VolumeHeader): Promise<string | null> {
  const others = (await listHeaderNames(blocker)).filter((n) => n !== name);
  const reasons = await mapLimit(others, HEADER_SCAN_CONCURRENCY, async (other): Promise<string | null> => {
    let h: VolumeHeader;
    try {
      h = await readHeader(blocker, other);
    } catch (err) {
      if (err instanceof VolumeNotFoundError) return null;
      if (err instanceof MapFormatError) return `header of "${other}" is unreadable (${err.message})`;
      throw err;
    }
    if (h.volumeId === header.volumeId) {
      if (h.renameTo === name) {
        await blocker.remove(headerObjectName(other));
        return null;
      }
      return `"${other}" has the same volume id ${header.volumeId}`;
    }
    if (h.sources.includes(header.volumeId)) return `"${other}" shares its objects`;
    return null;
  });
  return reasons.find((r) => r !== null) ?? null;
}
