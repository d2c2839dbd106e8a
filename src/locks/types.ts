/**
 * The vocabulary of the lock layer: who holds a lock (identity, owner), the
 * states of a VolumeLock, and the LockBackend contract each store implements
 * (file-backend.ts, rados-backend.ts, memory-backend.ts) so that the state
 * machine (volume-lock.ts) is shared and the store-specific parts stay small.
 *
 * Imports nothing above the lock layer.
 */
import type { LockLostError } from './errors.js';

/** A lock object per volume, keyed by the volume id (stable across rename); docs/format.md §13. */
export function lockObjectName(volumeId: string): string {
  return `lock.${volumeId}`;
}

/** Volume ids are 16 lowercase hex digits (docs/format.md §1). */
export const VOLUME_ID = /^[0-9a-f]{16}$/;

const INSTANCE = /^[A-Za-z0-9._-]{1,64}$/;
/** Node names: printable, no quotes or backslashes (they would grow under JSON escaping). */
const NODE = /^[^\u0000-\u001f"\\\u007f]{1,64}$/;

/** Throws TypeError (a programming error) for an identity that does not fit the lock formats. */
export function checkIdentity(id: LockIdentity): void {
  if (!NODE.test(id.node)) throw new TypeError(`lock identity: node ${JSON.stringify(id.node)}: 1-64 printable characters, no quotes or backslashes`);
  if (!INSTANCE.test(id.instance)) throw new TypeError(`lock identity: instance ${JSON.stringify(id.instance)}: 1-64 of [A-Za-z0-9._-]`);
  if (!Number.isSafeInteger(id.pid) || id.pid < 0) throw new TypeError(`lock identity: pid ${id.pid}`);
}

/** Who a daemon is: the node it runs on and this run of it. */
export interface LockIdentity {
  /** Node name (host name by default): what an operator recognises. */
  node: string;
  /** This daemon process's instance id: random per start (newInstanceId()). */
  instance: string;
  /** Process id, informational. */
  pid: number;
}

/** Who holds a lock, as read from the store. */
export interface LockOwner extends LockIdentity {
  /** Wall-clock ms when it took the lock, by its own clock: informational only. */
  since: number;
  /** Token of this acquisition: the cls_lock cookie on RADOS, the entry token on files. */
  token: string;
  backend: 'file' | 'rados' | 'memory';
  /** RADOS: "client.<instance id>" of the holder's connection and its address (what fencing blocklists). */
  client?: string;
  addr?: string;
  /** Files: the sequence number of the held entry. */
  seq?: number;
  /** Files: lease and margin the holder promised to honour, ms. */
  leaseMs?: number;
  marginMs?: number;
}

/**
 * States of a VolumeLock. `owner` is the only one in which the volume may be
 * written, and then only while checkHeld() says so (files: the lease).
 */
export const LockState = {
  Unlocked: 'unlocked',
  Acquiring: 'acquiring',
  Owner: 'owner',
  Releasing: 'releasing',
  /** Fenced, lease lost, broken: all I/O must stop; release() acknowledges it. */
  Lost: 'lost',
  Closed: 'closed',
} as const;
export type LockState = (typeof LockState)[keyof typeof LockState];

/** A node asking the owner to hand the lock over. */
export interface ReleaseRequest {
  /** The requester, when it said who it is. */
  from: LockIdentity | null;
  /** The requester's acquisition token. */
  token: string;
  /** Monotonic ms when the owner learnt of it. */
  receivedAt: number;
}

/** How a holder answered a probe. */
export type Liveness =
  /** It answered (or renewed its lease): alive. */
  | 'alive'
  /** It is registered but did not answer in time (RADOS: watch present, notify timed out). Not fenced. */
  | 'unresponsive'
  /** Provably gone: no watch (RADOS) or lease unchanged for lease + margin (files). May be fenced and broken. */
  | 'dead';

/** The current holder as a backend saw it; `key` tells one holding from the next. */
export interface Holder {
  key: string;
  owner: LockOwner | null;
}

/** One attempt's outcome. `brokeHolder`: a takeover that really broke a dead holder's lock (false when another waiter had). */
export type Attempt = { acquired: true; brokeHolder?: boolean } | { acquired: false; holder: Holder | null };

export interface ProbeResult {
  liveness: Liveness;
  /** The holder said it will release (a handover request it accepted). */
  accepted: boolean;
}

/** What a backend tells its VolumeLock. Every method is cheap and never throws. */
export interface LockSink {
  /**
   * The holder (us) was asked to hand over. Returns true when the request is
   * accepted (a handler will drain and release), false when declined.
   */
  releaseRequested(request: ReleaseRequest): boolean;
  /** Something changed (a release was announced, the lock object changed): retry now. */
  changed(): void;
  /** We held the lock and do not any more. */
  lost(err: LockLostError): void;
  /** New monotonic deadline until which our ownership is certain (files: after each renewal). */
  validity(until: number): void;
}

/** Who is acquiring, with a fresh token per acquisition. */
export interface Acquirer extends LockIdentity {
  token: string;
  /** Wall-clock ms of the acquisition's start. */
  since: number;
}

/**
 * One volume's lock on one store. A backend instance serves one VolumeLock:
 * it remembers what it holds (cookie, file descriptor) and what it has
 * observed of other holders (files: when it first saw an entry unchanged).
 *
 * Contract, as used by the state machine:
 * - attach() once, before anything else.
 * - tryAcquire(): one attempt; never waits for the holder.
 * - probe(): is the holder alive? With `handover`, also ask it to release.
 * - takeOver(): fence the dead holder (RADOS: blocklist its address; files:
 *   its lease has provably run out), break its lock, then one attempt.
 *   Called only after probe() said 'dead' for that holder.
 * - while held: keep it (renew, watch) and report through the sink.
 * - release(): give it up; rejects with LockLostError when it turns out it
 *   was already lost (broken, fenced).
 * - abandon(): after a loss, drop local state; best effort, never throws.
 * - stop(): stop keeping it (no renewals, no watch) without releasing: what
 *   a crash looks like to others (VolumeLock.destroy).
 */
export interface LockBackend {
  readonly kind: 'file' | 'rados' | 'memory';
  readonly volumeId: string;
  /** How long the acquire loop waits between attempts unless the sink says changed(). */
  readonly pollMs: number;
  /** Monotonic deadline of certain ownership: Infinity for fenced stores, the lease for files, -Infinity when not held. */
  readonly validUntil: number;
  attach(sink: LockSink): void;
  tryAcquire(me: Acquirer): Promise<Attempt>;
  probe(holder: Holder, me: Acquirer, handover: boolean): Promise<ProbeResult>;
  takeOver(holder: Holder, me: Acquirer): Promise<Attempt>;
  /** The acquisition `me` ended (acquired or not): withdraw handover requests and the like. */
  acquireEnded(me: Acquirer): Promise<void>;
  release(): Promise<void>;
  abandon(): Promise<void>;
  stop(): Promise<void>;
  /** Confirms with the store, now, that we still hold it; rejects LockLostError if not. */
  verify(): Promise<void>;
  owner(): Promise<LockOwner | null>;
  /**
   * Administrative break of another holder: fence, then break (not acquire).
   * Without `force`, refuses (LockBusyError) a holder that is not dead; files
   * wait up to `timeoutMs` for the lease to run out. Resolves with the broken
   * holder, or null when nobody held it.
   */
  breakLock(me: LockIdentity, options: { force: boolean; timeoutMs: number }): Promise<LockOwner | null>;
  close(): Promise<void>;
}
