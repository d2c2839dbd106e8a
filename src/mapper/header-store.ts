/**
 * Reading and writing volume headers on a Blocker, and finishing or undoing a
 * rename that a crash interrupted (see volume-rename.ts for the protocol).
 *
 * Every path that looks a volume up by name — open, create, list, remove,
 * rename — goes through `loadLiveHeader`, so a rename left half-done is
 * resolved the first time anyone looks, and two names never both act as the
 * live header of one volume id.
 *
 * Imports the blocker contract and the mapper's pure modules; nothing above.
 */
import type { Blocker } from '../blockers/blocker.js';
import { MapFormatError, VolumeNotFoundError } from './errors.js';
import { decodeHeader, encodeHeader, type VolumeHeader } from './header-format.js';
import { headerObjectName } from './names.js';

/** True when `err` is the blocker's "no such object" (BlockerError code ENOENT). */
export function isNotFound(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === 'ENOENT';
}

/** Reads and decodes `vol.<name>`; VolumeNotFoundError when absent, MapFormatError when corrupt. */
export async function readHeader(blocker: Blocker, name: string): Promise<VolumeHeader> {
  const objectName = headerObjectName(name);
  let buf: Buffer;
  try {
    buf = await blocker.readFull(objectName);
  } catch (err) {
    if (isNotFound(err)) throw new VolumeNotFoundError(name, 'no such volume', { cause: err });
    throw err;
  }
  return decodeHeader(buf, objectName);
}

/** Like readHeader, but null when the header does not exist. */
export async function tryReadHeader(blocker: Blocker, name: string): Promise<VolumeHeader | null> {
  try {
    return await readHeader(blocker, name);
  } catch (err) {
    if (err instanceof VolumeNotFoundError) return null;
    throw err;
  }
}

/** Atomically (re)writes `vol.<name>`. */
export async function writeHeader(blocker: Blocker, name: string, header: VolumeHeader): Promise<void> {
  await blocker.replace(headerObjectName(name), encodeHeader(header));
}

/**
 * Reads the header of volume `name` and settles any interrupted rename:
 *
 * - `renameTo` set (this is the OLD name of a rename): if the target header
 *   exists with the same volume id, the rename had committed (step 2 of
 *   volume-rename.ts): this stale header is removed and the volume is reported
 *   as not found ("renamed to ..."). Otherwise the rename never committed: the
 *   marker is dropped from the returned header (a later header write clears it
 *   on storage).
 * - `renamedFrom` set (this is the NEW name): the old header, if it still
 *   exists with the same id and points here, is removed; the marker is dropped
 *   from the returned header.
 *
 * With `repair: false` (listing) nothing is removed; the answer is the same.
 *
 * Like every multi-object mapper operation this assumes no other process is
 * renaming, removing or writing this volume at the same time (the caller
 * holds the volume lock; see src/locks/).
 */
export async function loadLiveHeader(
  blocker: Blocker, name: string, options: { repair: boolean } = { repair: true },
): Promise<VolumeHeader> {
  const header = await readHeader(blocker, name);
  if (header.renameTo !== null) {
    const target = await readRelated(blocker, header.renameTo, name);
    if (target !== null && target.volumeId === header.volumeId) {
      if (options.repair) await blocker.remove(headerObjectName(name));
      throw new VolumeNotFoundError(name, `renamed to "${header.renameTo}"`);
    }
    header.renameTo = null;
  }
  if (header.renamedFrom !== null) {
    const old = await readRelated(blocker, header.renamedFrom, name);
    if (options.repair && old !== null && old.volumeId === header.volumeId && old.renameTo === name) {
      await blocker.remove(headerObjectName(header.renamedFrom));
    }
    header.renamedFrom = null;
  }
  return header;
}

/** Reads the other header of a rename; a corrupt one stops the caller (we cannot tell which is live). */
async function readRelated(blocker: Blocker, other: string, name: string): Promise<VolumeHeader | null> {
  try {
    return await tryReadHeader(blocker, other);
  } catch (err) {
    if (err instanceof MapFormatError) {
      throw new MapFormatError(err.objectName,
        `${err.message.replace(/^map object "[^"]*": /, '')} (needed to settle the interrupted rename of "${name}")`,
        { cause: err });
    }
    throw err;
  }
}
