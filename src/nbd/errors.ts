/**
 * The one place where failures become NBD error values.
 *
 * Exports and the layers below reject with errors carrying an errno name in
 * `code`. `nbdErrorOf` maps them to the spec's small table (doc/proto.md,
 * "Error values"), with the flag-aware cases nbdkit uses: ENOTSUP only for
 * FAST_ZERO, EOVERFLOW only for DF; everything unknown is EIO. The caller logs
 * the real cause before sending the lossy wire code.
 */
import { NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_E } from './constants.js';

/** A peer broke the protocol so badly that the connection must be dropped. */
export class NbdProtocolError extends Error {
  readonly code = 'ARCH_E_NBD_PROTOCOL';
  constructor(message: string) {
    super(message);
    this.name = 'NbdProtocolError';
  }
}

/** An error with an errno name, for exports to reject with. */
export class ExportError extends Error {
  constructor(readonly code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ExportError';
  }
}

/** Maps a rejection from an Export to an NBD error value for a command with `flags`. */
export function nbdErrorOf(err: unknown, flags: number): number {
  const code = (err as { code?: unknown } | null)?.code;
  switch (code) {
    case 'EPERM':
    case 'EROFS':
    case 'EACCES':
      return NBD_E.EPERM;
    case 'EINVAL':
      return NBD_E.EINVAL;
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return NBD_E.ENOSPC;
    case 'ENOMEM':
      return NBD_E.ENOMEM;
    case 'EOVERFLOW':
      return flags & NBD_CMD_FLAG_DF ? NBD_E.EOVERFLOW : NBD_E.EINVAL;
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return flags & NBD_CMD_FLAG_FAST_ZERO ? NBD_E.ENOTSUP : NBD_E.EINVAL;
    case 'ESHUTDOWN':
      return NBD_E.ESHUTDOWN;
    default:
      return NBD_E.EIO;
  }
}

/** "what: why" text of any thrown value, for logs and error chunks. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
