/**
 * Errors of the lock layer (DESIGN.md §4, STYLE.md habit 5).
 *
 * Every error carries a stable `code` (`ARCH_E_LOCK_*`) that the CLI prints
 * and scripts may match; messages read "what: why" and name the volume id.
 * Grouped by fault:
 *
 *   LockError
 *   ├── LockBusyError      ARCH_E_LOCK_BUSY      another owner holds it (and did not hand over in time)
 *   ├── LockLostError      ARCH_E_LOCK_LOST      we held it and no longer do: stop all I/O on the volume
 *   ├── LockNotHeldError   ARCH_E_LOCK_NOT_HELD  a write path checked while we were not the owner
 *   ├── LockAbortedError   ARCH_E_LOCK_ABORTED   release()/close()/an AbortSignal ended an acquisition
 *   ├── LockFormatError    ARCH_E_LOCK_CORRUPT   a stored lock record we cannot read
 *   ├── LockFenceError     ARCH_E_LOCK_FENCE     a dead holder could not be fenced, so it was not broken
 *   └── LockStateError     ARCH_E_LOCK_STATE     illegal transition or use after close: a bug
 *
 * Backend failures (fs errno, librados errno) that are none of these reach the
 * caller as they are, or as the `cause` of one of these.
 *
 * Imports nothing: any layer may import this file.
 */

export type LockErrorCode =
  | 'ARCH_E_LOCK_BUSY'
  | 'ARCH_E_LOCK_LOST'
  | 'ARCH_E_LOCK_NOT_HELD'
  | 'ARCH_E_LOCK_ABORTED'
  | 'ARCH_E_LOCK_CORRUPT'
  | 'ARCH_E_LOCK_FENCE'
  | 'ARCH_E_LOCK_STATE';

/** Who holds a lock, as far as it can be told (see types.ts LockOwner). */
export interface LockHolderSummary {
  node?: string;
  instance?: string;
  pid?: number;
  token?: string;
  client?: string;
}

export class LockError extends Error {
  constructor(
    readonly code: LockErrorCode,
    readonly volumeId: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
  }

  override get name(): string {
    return this.constructor.name;
  }
}

/** "node N (instance I, pid P)" or what is known of it. */
export function describeHolder(h: LockHolderSummary | null | undefined): string {
  if (!h) return 'an unknown holder';
  const who = h.node ? `node ${h.node}` : (h.client ?? 'an unidentified holder');
  const more: string[] = [];
  if (h.instance) more.push(`instance ${h.instance}`);
  if (h.pid) more.push(`pid ${h.pid}`);
  if (h.node && h.client) more.push(h.client);
  return more.length > 0 ? `${who} (${more.join(', ')})` : who;
}

export class LockBusyError extends LockError {
  constructor(
    volumeId: string,
    readonly holder: LockHolderSummary | null,
    why: string,
    options?: { cause?: unknown },
  ) {
    super('ARCH_E_LOCK_BUSY', volumeId, `lock of volume ${volumeId}: held by ${describeHolder(holder)}: ${why}`, options);
  }
}

/**
 * We were the owner and are not any more, or cannot be sure we are: fenced
 * (RADOS blocklist), lease not renewed in time (files), broken by someone
 * else, or a release that failed halfway. Every write must fail from now on;
 * the map cached under the lock is stale. `fenced` says the store itself
 * refuses us (RADOS: this client is blocklisted and must reconnect).
 */
export class LockLostError extends LockError {
  constructor(
    volumeId: string,
    why: string,
    readonly fenced = false,
    options?: { cause?: unknown },
  ) {
    super('ARCH_E_LOCK_LOST', volumeId, `lock of volume ${volumeId} lost: ${why}`, options);
  }
}

export class LockNotHeldError extends LockError {
  constructor(volumeId: string, state: string) {
    super('ARCH_E_LOCK_NOT_HELD', volumeId, `lock of volume ${volumeId}: not held (state ${state})`);
  }
}

export class LockAbortedError extends LockError {
  constructor(volumeId: string, why: string, options?: { cause?: unknown }) {
    super('ARCH_E_LOCK_ABORTED', volumeId, `lock of volume ${volumeId}: acquisition aborted: ${why}`, options);
  }
}

export class LockFormatError extends LockError {
  constructor(volumeId: string, readonly objectName: string, why: string, options?: { cause?: unknown }) {
    super('ARCH_E_LOCK_CORRUPT', volumeId, `lock object "${objectName}": ${why}`, options);
  }
}

export class LockFenceError extends LockError {
  constructor(volumeId: string, why: string, options?: { cause?: unknown }) {
    super('ARCH_E_LOCK_FENCE', volumeId, `lock of volume ${volumeId}: cannot fence the holder: ${why}`, options);
  }
}

export class LockStateError extends LockError {
  constructor(volumeId: string, why: string) {
    super('ARCH_E_LOCK_STATE', volumeId, `lock of volume ${volumeId}: ${why}`);
  }
}

/** True for an error that says this client was fenced: RADOS errno 108 (ESHUTDOWN) or a blocker's EFENCED. */
export function isFencedError(err: unknown): boolean {
  const e = err as { errno?: unknown; code?: unknown } | null;
  return e?.errno === 108 || e?.code === 'EFENCED' || (err instanceof LockLostError && err.fenced);
}
