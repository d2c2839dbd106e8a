/**
 * Errors of the composition layer. `code` is an errno name, which the NBD
 * layer maps to the wire; the message says what and why with the volume,
 * object and offset.
 */

export class ComposeError extends Error {
  constructor(readonly code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ComposeError';
  }
}

/**
 * Wraps a lower-layer failure with where it happened, keeping its errno code,
 * except ENOENT: compose only touches objects the map names, so a missing one
 * is corruption (EIO), never "no such file" (nor zeros).
 */
export function composeError(err: unknown, what: string): ComposeError {
  const code = (err as { code?: unknown } | null)?.code;
  const errno = typeof code === 'string' && /^E[A-Z]+$/.test(code) && code !== 'ENOENT' ? code : 'EIO';
  const why = err instanceof Error ? err.message : String(err);
  return new ComposeError(errno, `${what}: ${why}`, { cause: err });
}
