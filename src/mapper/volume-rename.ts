/**
 * Renaming a volume (STYLE.md habit 8). The volume keeps its id, so its chunk
 * and data objects keep their names; only the header moves, and an object
 * store cannot rename atomically across names. The protocol marks both ends so
 * that a crash at any point leaves exactly one live header for the id:
 *
 *   load live header(from) ──▶ check "to" free ──▶ 1. rewrite vol.<from> with renameTo = to
 *     * not found                * exists           (intent: from is leaving)
 *     ▼                          ▼                        │
 *   VolumeNotFoundError    VolumeExistsError              ▼
 *                                               2. write vol.<to> with renamedFrom = from
 *                                                  (COMMIT POINT: the id now lives under "to")
 *                                                         │
 *                                                         ▼
 *                                               3. remove vol.<from>
 *                                                         │
 *                                                         ▼
 *                                               4. rewrite vol.<to> without renamedFrom ──▶ done
 *
 * Crash after 1: vol.<from> has renameTo but vol.<to> is absent (or another
 *   volume): the rename did not happen; whoever loads "from" drops the marker
 *   (header-store.ts loadLiveHeader), the next header write clears it.
 * Crash after 2 or 3: vol.<to> has the id, so "from" is dead: loading "from"
 *   removes its header and answers "renamed to"; loading "to" removes
 *   vol.<from> (same id, renameTo = to) and drops renamedFrom. `list` hides the
 *   stale header without touching it.
 * Crash after 3: only vol.<to> remains, with a harmless renamedFrom that the
 *   next header write clears.
 * So the two names never both act as the volume, which matters because both
 * would name new objects d.<id>.<gen>.<i> with colliding generations.
 *
 * The caller holds the volume lock and nobody has the volume open (an open
 * VolumeMap would rewrite vol.<from> on its next header write).
 */
import type { Blocker } from '../blockers/blocker.js';
import { UsageError, VolumeExistsError, VolumeNotFoundError } from './errors.js';
import { loadLiveHeader, writeHeader } from './header-store.js';
import { headerObjectName, validateVolumeName } from './names.js';

/** Renames volume `from` to `to` (see the file comment). */
export async function renameVolume(blocker: Blocker, from: string, to: string): Promise<void> {
  validateVolumeName(from);
  validateVolumeName(to);
  if (from === to) throw new UsageError(`rename "${from}": the new name is the same as the old`);
  const header = await loadLiveHeader(blocker, from);
  if (await nameTaken(blocker, to)) throw new VolumeExistsError(to);

  await writeHeader(blocker, from, { ...header, renameTo: to, renamedFrom: null });   // 1
  await writeHeader(blocker, to, { ...header, renameTo: null, renamedFrom: from });   // 2
  await blocker.remove(headerObjectName(from));                                       // 3
  await writeHeader(blocker, to, { ...header, renameTo: null, renamedFrom: null });   // 4
}

async function nameTaken(blocker: Blocker, name: string): Promise<boolean> {
  try {
    await loadLiveHeader(blocker, name);
    return true;
  } catch (err) {
    if (err instanceof VolumeNotFoundError) return false;
    throw err;
  }
}
