/**
 * Volume names and the object namespace (docs/format.md §1).
 *
 * All objects of all volumes live in one flat object-store namespace, and every
 * name is unique forever (DESIGN.md §3), so garbage collection can be a plain
 * mark-and-sweep:
 *
 *   vol.<name>                   volume header        (one per volume name)
 *   m.<volid>.<gen>.<chunk>      map chunk            (4096 entries)
 *   d.<volid>.<gen>.<index>      data object          (objectSize bytes)
 *   sha256-<64 hex>              content-addressed    (images: immutable, shared, never owned)
 *
 * <volid> is 16 lowercase hex digits (8 random bytes, chosen at create, kept by
 * rename). <gen>, <chunk> and <index> are lowercase hex WITHOUT padding and
 * without leading zeros ("0", "1a", never "01a"): names stay short (a data
 * object of a young volume is ~22 characters) and every tuple has exactly one
 * spelling, which the parsers enforce so that GC never mistakes an alias for a
 * distinct object. Nothing relies on names sorting in numeric order.
 *
 * Pure functions; imports only errors.ts.
 */
import { InvalidNameError } from './errors.js';

export const HEADER_PREFIX = 'vol.';
export const CHUNK_PREFIX = 'm.';
export const DATA_PREFIX = 'd.';
export const CAS_PREFIX = 'sha256-';

export const MAX_VOLUME_NAME_LENGTH = 80;

const NAME_CHARS = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const VOLUME_ID = /^[0-9a-f]{16}$/;
const HEX = '(0|[1-9a-f][0-9a-f]*)';
const CHUNK_NAME = new RegExp(`^m\\.([0-9a-f]{16})\\.${HEX}\\.${HEX}$`);
const DATA_NAME = new RegExp(`^d\\.([0-9a-f]{16})\\.${HEX}\\.${HEX}$`);

/**
 * Throws InvalidNameError unless `name` is a valid volume name: 1 to 80 ASCII
 * characters from [A-Za-z0-9._-], starting with a letter or digit, with no
 * ".." and not ending in ".". These rules keep a name safe as part of a file
 * name and a RADOS object name (no "/", no "..", no leading "." or "-", no
 * trailing "." that some filesystems drop) and printable in logs and URIs
 * (`nbd://host/<name>`). Validate here, once, at the edge (STYLE.md habit 4).
 */
export function validateVolumeName(name: unknown): asserts name is string {
  if (typeof name !== 'string') throw new InvalidNameError(name, 'must be a string');
  if (name.length === 0) throw new InvalidNameError(name, 'must not be empty');
  if (name.length > MAX_VOLUME_NAME_LENGTH) {
    throw new InvalidNameError(name, `must be at most ${MAX_VOLUME_NAME_LENGTH} characters (got ${name.length})`);
  }
  if (!NAME_CHARS.test(name)) {
    throw new InvalidNameError(name,
      'must start with a letter or digit and contain only letters, digits, ".", "_" and "-"');
  }
  if (name.includes('..')) throw new InvalidNameError(name, 'must not contain ".."');
  if (name.endsWith('.')) throw new InvalidNameError(name, 'must not end with "."');
}

/** True when `name` passes validateVolumeName. */
export function isValidVolumeName(name: unknown): name is string {
  try {
    validateVolumeName(name);
    return true;
  } catch {
    return false;
  }
}

/** True for a well-formed volume id: 16 lowercase hex digits, not all zero (zero means "none"). */
export function isVolumeId(id: string): boolean {
  return VOLUME_ID.test(id) && id !== '0000000000000000';
}

/** `vol.<name>`; the name must already be valid. */
export function headerObjectName(volume: string): string {
  return HEADER_PREFIX + volume;
}

/** The volume name of a header object name, or null when it is not one. */
export function parseHeaderObjectName(objectName: string): string | null {
  if (!objectName.startsWith(HEADER_PREFIX)) return null;
  const volume = objectName.slice(HEADER_PREFIX.length);
  return isValidVolumeName(volume) ? volume : null;
}

/** The parts of a chunk or data object name. */
export interface ObjectNameParts {
  volumeId: string;
  generation: number;
  /** Chunk index (m.) or object index (d.). */
  index: number;
}

/** `m.<volid>.<gen>.<chunkIndex>`. */
export function chunkObjectName(volumeId: string, generation: number, chunkIndex: number): string {
  return `${CHUNK_PREFIX}${volumeId}.${generation.toString(16)}.${chunkIndex.toString(16)}`;
}

/** `d.<volid>.<gen>.<objectIndex>`. */
export function dataObjectName(volumeId: string, generation: number, objectIndex: number): string {
  return `${DATA_PREFIX}${volumeId}.${generation.toString(16)}.${objectIndex.toString(16)}`;
}

/** Parses a canonical chunk name (generation and index must fit u32), else null. */
export function parseChunkObjectName(objectName: string): ObjectNameParts | null {
  return parseParts(CHUNK_NAME.exec(objectName), 0xffff_ffff);
}

/** Parses a canonical data object name (index must be a safe integer), else null. */
export function parseDataObjectName(objectName: string): ObjectNameParts | null {
  return parseParts(DATA_NAME.exec(objectName), Number.MAX_SAFE_INTEGER);
}

function parseParts(m: RegExpExecArray | null, maxIndex: number): ObjectNameParts | null {
  if (m === null) return null;
  const [, volumeId, genHex, indexHex] = m as unknown as [string, string, string, string];
  if (!isVolumeId(volumeId) || genHex.length > 8 || indexHex.length > 14) return null;
  const generation = parseInt(genHex, 16);
  const index = parseInt(indexHex, 16);
  if (generation === 0 || index > maxIndex) return null;
  return { volumeId, generation, index };
}
