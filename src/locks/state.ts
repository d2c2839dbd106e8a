/**
 * The VolumeLock state table: which state may follow which. A move the table
 * does not list is a bug and throws LockStateError (STYLE.md habit 9).
 *
 *                acquire()                    attempt ok, handed over, or
 *   unlocked ──────────────▶ acquiring ──────────────────────────────▶ owner
 *     ▲  ▲                      │        dead holder fenced + broken      │  │
 *     │  └ * * * * * * * * * * *┘                                        │  │
 *     │    busy (no wait), timeout, abort, store error                   │  │
 *     │                                               release() or a     │  │
 *     │                 unlocked, waiters told        handover request   │  │
 *     ├──────────────────────────────────── releasing ◀─────────────────┘  │
 *     │                                          *                          * fenced (RADOS blocklist),
 *     │                                          * fenced/broken meanwhile  * lease not renewed (files),
 *     │     release(): the loss is               ▼                          * broken by someone else
 *     └──────────────────────────────────────  lost  ◀ * * * * * * * * * * *
 *              acknowledged                    (all I/O must stop)
 *
 *   unlocked ── close() ──▶ closed;  destroy(): any state ──▶ closed (not in the table)
 *
 * Solid arrows are the happy path, `*` the error paths.
 */
import { LockStateError } from './errors.js';
import { LockState } from './types.js';

export const TRANSITIONS: Readonly<Record<LockState, readonly LockState[]>> = {
  [LockState.Unlocked]: [LockState.Acquiring, LockState.Closed],
  [LockState.Acquiring]: [LockState.Owner, LockState.Unlocked],
  [LockState.Owner]: [LockState.Releasing, LockState.Lost],
  [LockState.Releasing]: [LockState.Unlocked, LockState.Lost],
  [LockState.Lost]: [LockState.Unlocked],
  [LockState.Closed]: [],
};

/** Throws LockStateError unless `to` may follow `from`. */
export function checkTransition(volumeId: string, from: LockState, to: LockState): void {
  if (!TRANSITIONS[from].includes(to)) {
    throw new LockStateError(volumeId, `illegal state transition from [${from}] => [${to}], allowed: [${TRANSITIONS[from].join(', ')}]`);
  }
}
