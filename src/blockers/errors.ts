/**
 * Errors of the blocker layer (DESIGN.md §2, STYLE.md habit 5).
 *
 * Every blocker method rejects with a `BlockerError` whose `code` is one of a
 * small set of errno-style names, whatever the backend (fs errno, librados
 * return codes). Callers branch on `ENOENT` only; everything else is reported.
 * `nbd/errors.ts` is the one place that turns these codes into NBD values.
 *
 * Must not import anything above the blocker layer.
 */

export type BlockerErrorCode =
  | 'ENOENT' // the object does not exist
  | 'ENOSPC' // out of space or quota, or the object would grow too large
  | 'EIO' // anything else the backend failed to do; the cause says what
  | 'ENOTSUP' // the backend cannot do this operation
  | 'EFENCED' // this client was fenced (RADOS blocklist): stop all I/O
  | 'ETIMEDOUT' // the backend did not answer in time
  | 'EINVAL'; // the caller asked for something invalid (bad object name)

export class BlockerError extends Error {
  override readonly name = 'BlockerError';

  /**
   * @param code   the errno-style class of the failure
   * @param op     the blocker operation that failed ('write', 'sync', …)
   * @param object the object name (or store root / prefix) it concerned
   * @param why    the reason, appended after ": "
   */
  constructor(
    readonly code: BlockerErrorCode,
    readonly op: string,
    readonly object: string,
    why: string,
    options?: { cause?: unknown },
  ) {
    super(`${op} ${JSON.stringify(object)}: ${why}`, options);
  }
}

/** True when `err` is a BlockerError, with `code` if given. */
export function isBlockerError(err: unknown, code?: BlockerErrorCode): err is BlockerError {
  return err instanceof BlockerError && (code === undefined || err.code === code);
}

/**
 * Maps a Node fs error (or anything thrown) from operation `op` on object
 * `name` to a BlockerError, keeping the original as `cause`. BlockerErrors
 * pass through unchanged.
 */
export function toBlockerError(err: unknown, op: string, name: string): BlockerError {
  if (err instanceof BlockerError) return err;
  const errno = (err as { code?: unknown } | null)?.code;
  const why = err instanceof Error ? err.message : String(err);
  return new BlockerError(codeOfErrno(errno), op, name, why, { cause: err });
}

function codeOfErrno(errno: unknown): BlockerErrorCode {
  switch (errno) {
    case 'ENOENT':
      return 'ENOENT';
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return 'ENOSPC';
    case 'EOPNOTSUPP':
    case 'ENOTSUP':
      return 'ENOTSUP';
    default:
      return 'EIO';
  }
}

/** Longest object name, in UTF-8 bytes (a common file-name limit; RADOS allows 2048). */
export const MAX_OBJECT_NAME_BYTES = 255;

/**
 * Rejects names no blocker accepts: empty, over MAX_OBJECT_NAME_BYTES of
 * UTF-8, or not well-formed UTF-16 (a lone surrogate would not survive the
 * round trip through UTF-8). Object names come from maps on storage, so this
 * is input validation, not an assert (STYLE.md habit 4).
 */
export function checkObjectName(op: string, name: string): void {
  if (typeof name !== 'string' || name.length === 0) {
    throw new BlockerError('EINVAL', op, String(name), 'object name is empty');
  }
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes > MAX_OBJECT_NAME_BYTES) {
    throw new BlockerError('EINVAL', op, name, `object name is ${bytes} bytes, over ${MAX_OBJECT_NAME_BYTES}`);
  }
  if (LONE_SURROGATE.test(name)) {
    throw new BlockerError('EINVAL', op, name, 'object name is not well-formed Unicode');
  }
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
