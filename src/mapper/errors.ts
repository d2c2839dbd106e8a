/**
 * Errors of the mapper layer (DESIGN.md §2, STYLE.md habit 5).
 *
 * Every error carries a stable `code` (`ARCH_E_*`) that the CLI prints and
 * scripts may match; messages read "what: why" and name the volume or the
 * object. Grouped by fault:
 *
 *   MapperError
 *   ├── MapFormatError       ARCH_E_MAP_CORRUPT   stored metadata is damaged or unknown
 *   ├── VolumeNotFoundError  ARCH_E_NO_VOLUME     no such volume (caller's input)
 *   ├── VolumeExistsError    ARCH_E_VOLUME_EXISTS the name is taken (caller's input)
 *   └── UsageError           ARCH_E_USAGE         the caller asked for something invalid
 *       └── InvalidNameError ARCH_E_BAD_NAME      a volume name breaks the naming rules
 *
 * Failures of the object store itself are not wrapped: they reach the caller as
 * the blocker's own errors (errno-style `code`), unless the mapper turns them
 * into one of the above (a missing header is VolumeNotFoundError, a missing map
 * chunk is MapFormatError), and then the blocker error is the `cause`.
 *
 * Imports nothing: any layer above may import this file.
 */

export type MapperErrorCode =
  | 'ARCH_E_MAP_CORRUPT'
  | 'ARCH_E_NO_VOLUME'
  | 'ARCH_E_VOLUME_EXISTS'
  | 'ARCH_E_BAD_NAME'
  | 'ARCH_E_USAGE';

export interface MapperErrorOptions {
  cause?: unknown;
}

/** Root of the mapper's errors; never thrown itself. */
export class MapperError extends Error {
  readonly code: MapperErrorCode;

  constructor(code: MapperErrorCode, message: string, options?: MapperErrorOptions) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
  }

  override get name(): string {
    return this.constructor.name;
  }
}

/**
 * A map object (header or chunk) is truncated, has a bad magic, an unknown
 * version, a bad CRC, an out-of-range field, or is missing while referenced.
 * Corrupt metadata is never read as zeros: the volume stops instead.
 */
export class MapFormatError extends MapperError {
  /** The object the problem was found in ('vol.<name>', 'm.<id>.<gen>.<chunk>'). */
  readonly objectName: string;

  constructor(objectName: string, why: string, options?: MapperErrorOptions) {
    super('ARCH_E_MAP_CORRUPT', `map object "${objectName}": ${why}`, options);
    this.objectName = objectName;
  }
}

export class VolumeNotFoundError extends MapperError {
  readonly volume: string;

  constructor(volume: string, why = 'no such volume', options?: MapperErrorOptions) {
    super('ARCH_E_NO_VOLUME', `volume "${volume}": ${why}`, options);
    this.volume = volume;
  }
}

export class VolumeExistsError extends MapperError {
  readonly volume: string;

  constructor(volume: string, options?: MapperErrorOptions) {
    super('ARCH_E_VOLUME_EXISTS', `volume "${volume}": already exists`, options);
    this.volume = volume;
  }
}

/** The caller asked for something the mapper refuses (bad size, write to a read-only volume, ...). */
export class UsageError extends MapperError {
  constructor(message: string, options?: MapperErrorOptions, code: MapperErrorCode = 'ARCH_E_USAGE') {
    super(code, message, options);
  }
}

/** A volume name that breaks the rules of names.ts (a usage error with its own code). */
export class InvalidNameError extends UsageError {
  /** The rejected input, as given (it may not even be a string). */
  readonly input: unknown;

  constructor(input: unknown, why: string) {
    super(`invalid volume name ${describeInput(input)}: ${why}`, undefined, 'ARCH_E_BAD_NAME');
    this.input = input;
  }
}

/** Quotes a user-supplied name for a message, escaping control and non-ASCII characters. */
function describeInput(input: unknown): string {
  if (typeof input !== 'string') return `(${input === null ? 'null' : typeof input})`;
  const shown = input.length > 100 ? `${input.slice(0, 100)}…` : input;
  // JSON.stringify escapes quotes and control characters; also escape non-ASCII.
  return JSON.stringify(shown).replace(/[^\x20-\x7e]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
