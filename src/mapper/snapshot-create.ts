/**
 * Creating a snapshot (STYLE.md habit 8: one file per verb, the machine drawn;
 * docs/format.md §8).
 *
 *   check name free ──▶ 1. origin: markShared ──────────▶ 2. write vol.<snapshot> ──▶ done
 *     * exists            (gen+1, writableSince = gen+1,     (copy of the header of step 1:
 *     ▼                    header persisted)                  new id, SNAPSHOT|READONLY,
 *   VolumeExistsError      * failed                           parent = origin)
 *                          ▼                                  * failed
 *                        reject, no snapshot                  ▼
 *                                                           reject, no snapshot (the origin
 *                                                           merely copies on write from now on)
 *
 * The order is the whole point. After step 1 is durable, the origin owns none
 * of the objects and chunks that exist, so it can never again write in place
 * into anything the snapshot will reach. Only then does the snapshot header
 * appear. A crash between the steps leaves no snapshot and an origin that
 * copies on write without needing to (harmless); the opposite order could
 * leave a snapshot whose objects the origin still overwrites. Each step is
 * one atomic replace, so a crash leaves no snapshot or a complete one.
 *
 * The snapshot header is the origin's header as persisted in step 1, with:
 *   - a new volume id (it is a volume of its own: removing it deletes objects
 *     named with ITS id, and it never creates any, so nothing of the origin's);
 *   - flags SNAPSHOT | READONLY (open for write refuses it);
 *   - the origin's sources, writer source and chunk refs unchanged: entries
 *     keep naming the origin's objects directly (the SNAPSHOT flag exempts it
 *     from "sources[writer] = volume id");
 *   - parent = (origin name, origin id), for `info`.
 * Cost: two header writes (the second 12 bytes per existing chunk); no chunk
 * or data object is read or written. O(1) in the volume's size and data.
 *
 * The caller holds the origin's volume lock and has quiesced its I/O: no
 * request in flight on the origin's compose Volume, so nothing is between
 * "owned, write in place" and the write itself (see VolumeMap.markShared),
 * and Volume.flush() done, so that writes acknowledged before the snapshot
 * are durable in the objects it shares (an unsynced in-place write could
 * otherwise be lost to the snapshot after a power cut while the origin's
 * later copy-up keeps it). It may resume I/O as soon as createSnapshot
 * resolves or rejects. Creating
 * the same snapshot name concurrently must be kept apart by the lock layer
 * (the Blocker has no exclusive create).
 */
import type { Blocker } from '../blockers/blocker.js';
import { UsageError, VolumeExistsError, VolumeNotFoundError } from './errors.js';
import { VolumeFlags, type VolumeHeader } from './header-format.js';
import { loadLiveHeader, writeHeader } from './header-store.js';
import { validateVolumeName } from './names.js';
import { VolumeMap, newVolumeId } from './volume-map.js';

export interface SnapshotResult {
  /** The snapshot's volume id. */
  volumeId: string;
  /** The origin's generation (and writableSince) after the bump. */
  originGeneration: number;
}

/**
 * Snapshots the open, writable, quiesced `map` as `snapshotName` (see the file
 * comment). Fails with InvalidNameError, VolumeExistsError (checked before
 * anything changes) or UsageError (map read-only or closed).
 */
export async function createSnapshot(blocker: Blocker, map: VolumeMap, snapshotName: string): Promise<SnapshotResult> {
  validateVolumeName(snapshotName);
  if (!map.writable) throw new UsageError(`snapshot of "${map.name}": the volume is not open for writing`);
  await checkNameFree(blocker, snapshotName);
  const origin = await map.markShared();                                  // 1
  const snapshot = snapshotHeader(origin, map.name);
  await writeHeader(blocker, snapshotName, snapshot);                     // 2
  return { volumeId: snapshot.volumeId, originGeneration: origin.generation };
}

/**
 * Snapshots volume `volumeName`, which nobody has open: opens it for writing,
 * snapshots, closes (also on failure). Same errors as createSnapshot, plus
 * VolumeNotFoundError, and UsageError when the volume is read-only.
 */
export async function snapshotVolume(blocker: Blocker, volumeName: string, snapshotName: string): Promise<SnapshotResult> {
  validateVolumeName(volumeName);
  validateVolumeName(snapshotName);
  // Before the open, which already writes (bumps the generation).
  await checkNameFree(blocker, snapshotName);
  const map = await VolumeMap.open(blocker, volumeName, { forWrite: true });
  try {
    return await createSnapshot(blocker, map, snapshotName);
  } finally {
    await map.close();
  }
}

/** The header of a snapshot of `origin` (as persisted by markShared). */
function snapshotHeader(origin: VolumeHeader, originName: string): VolumeHeader {
  return {
    ...origin,
    flags: origin.flags | VolumeFlags.SNAPSHOT | VolumeFlags.READONLY,
    volumeId: newVolumeId(origin.sources),
    createdAt: Date.now(),
    parent: { name: originName, volumeId: origin.volumeId },
    renameTo: null,
    renamedFrom: null,
  };
}

/**
 * VolumeExistsError when `name` is a live volume; a corrupt header there is
 * MapFormatError (never overwritten). Settles an interrupted rename, like create.
 */
export async function checkNameFree(blocker: Blocker, name: string): Promise<void> {
  try {
    await loadLiveHeader(blocker, name);
  } catch (err) {
    if (err instanceof VolumeNotFoundError) return;
    throw err;
  }
  throw new VolumeExistsError(name);
}
