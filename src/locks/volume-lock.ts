/**
 * VolumeLock: the per-volume distributed lock as an explicit state machine
 * (state.ts draws it), shared by every store; a LockBackend (types.ts) does
 * the store-specific work. DESIGN.md §4: exactly one writer per volume, the
 * lock owner; a node that wants to write asks the owner to hand over; a dead
 * owner is fenced before its lock is broken.
 *
 * Using it (the daemon's write path):
 *
 *   const lock = new VolumeLock(backend, { identity, onReleaseRequested, onLost });
 *   await lock.acquire({ wait: 30_000, requestHandover: true });  // first write
 *   ... reload the map (a new owner always does) ...
 *   if (!lock.checkHeld()) fail the request;  // before every write (cheap)
 *   await lock.release();                      // handover done / close
 *
 * Acquisition loop (one action, `acquire`):
 *
 *   tryAcquire ──ok──────────────────────────────────────────────────────▶ owner
 *      │ busy
 *      ▼
 *   probe holder (with a handover request if asked) ── dead ──▶ takeOver ──ok──▶ owner
 *      │ alive / unresponsive                          (fence, break, try)
 *      ▼
 *   deadline passed? ── yes ──▶ LockBusyError (unlocked)
 *      │ no
 *      ▼
 *   wait pollMs, or less when the backend says changed() ──▶ tryAcquire …
 *
 * Owner side: the backend keeps the lock (renews the lease, watches) and
 * tells us, through the LockSink, of handover requests (the handler drains,
 * persists, then we release), of a loss (state lost: I/O must stop) and of
 * the new validity deadline after each renewal.
 *
 * Actions (acquire, release, close) run one at a time from a queue; calling
 * the one already queued last (or running, with nothing queued behind it)
 * joins it instead of queuing a duplicate (librbd ManagedLock's coalescing).
 * release() or close() abort an acquisition in progress.
 *
 * Lost is sticky: acquire() rejects with the loss until release() (or
 * close()) acknowledges it, so a daemon cannot drift from "lost" back to
 * "owner" without dropping what it cached under the old ownership.
 *
 * Observability: every state change is emitted ('state') and published on
 * diagnostics_channel `archipelago:lock:state`; acquisitions on
 * `archipelago:lock:acquired` (waitedMs, handover, takeover); handovers given
 * on `archipelago:lock:handover` (request → released, ms).
 *
 * Imports the lock layer and common/ only.
 */
import dc from 'node:diagnostics_channel';
import { EventEmitter } from 'node:events';
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { silentLogger, type Logger } from '../common/log.js';
import {
  LockAbortedError, LockBusyError, LockError, LockLostError, LockNotHeldError, LockStateError,
  describeHolder, isFencedError,
} from './errors.js';
import { checkTransition } from './state.js';
import {
  LockState, checkIdentity, type Acquirer, type Holder, type LockBackend, type LockIdentity, type LockOwner, type LockSink,
  type ReleaseRequest,
} from './types.js';

export const lockStateChannel = dc.channel('archipelago:lock:state');
export const lockAcquiredChannel = dc.channel('archipelago:lock:acquired');
export const lockHandoverChannel = dc.channel('archipelago:lock:handover');

export interface LockStateChange {
  volumeId: string;
  from: LockState;
  to: LockState;
  reason: string;
}

export interface LockAcquiredMessage {
  volumeId: string;
  /** From acquire() being started to owner, ms. */
  waitedMs: number;
  /** We had asked a live holder to hand over, and it released (no takeover). */
  handover: boolean;
  /** A dead holder was fenced and broken. */
  takeover: boolean;
}

export interface LockHandoverMessage {
  volumeId: string;
  /** From the request reaching us to our release being done, ms (drain included). */
  ms: number;
}

/**
 * Called on the owner when another node asks for the lock: drain in-flight
 * writes, persist the map, drop what is cached; when it resolves the lock is
 * released (if the handler did not release it itself). Rejecting declines
 * this request (the requester keeps waiting and asks again).
 */
export type ReleaseHandler = (request: ReleaseRequest, lock: VolumeLock) => void | Promise<void>;

export interface VolumeLockOptions {
  identity: { node: string; instance: string; pid?: number };
  /** Accept handover requests with this handler; without one they are declined. */
  onReleaseRequested?: ReleaseHandler;
  /** Told once per loss, after the state became lost. */
  onLost?: (err: LockLostError) => void;
  log?: Logger;
  /** Monotonic clock in ms (default performance.now); tests pass their own. */
  now?: () => number;
}

export interface AcquireOptions {
  /**
   * false: one attempt (and, where the store can tell at once, a takeover of
   * a dead holder); true (default): until acquired; a number: give up after
   * so many ms with LockBusyError.
   */
  wait?: boolean | number;
  /** Ask the holder to hand over (cooperative handover). Default false. */
  requestHandover?: boolean;
  /** Fence and break a holder found dead. Default true. */
  takeOverDead?: boolean;
  signal?: AbortSignal;
}

export interface BreakOptions {
  /** Fence and break even a holder that answers (RADOS). Files never break a live lease. Default false. */
  force?: boolean;
  /** Files: how long to wait for the lease to run out (default lease + margin + a little). */
  timeoutMs?: number;
}

type ActionKind = 'acquire' | 'release' | 'close';

interface Action {
  kind: ActionKind;
  run: () => Promise<void>;
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** A random id for a daemon process (LockIdentity.instance). */
export function newInstanceId(): string {
  return randomBytes(6).toString('hex');
}

/** A random token for one acquisition. */
export function newToken(): string {
  return randomBytes(8).toString('hex');
}

/** The identity of this process: host name, a fresh instance id, the pid. */
export function defaultIdentity(node = hostname(), instance = newInstanceId()): LockIdentity {
  return { node, instance, pid: process.pid };
}

export class VolumeLock extends EventEmitter {
  readonly volumeId: string;
  readonly backend: LockBackend;
  readonly identity: LockIdentity;
  /** See ReleaseHandler; may be set after construction. */
  onReleaseRequested: ReleaseHandler | undefined;
  onLost: ((err: LockLostError) => void) | undefined;

  readonly #log: Logger;
  readonly #now: () => number;
  #state: LockState = LockState.Unlocked;
  #validUntil = -Infinity;
  #leaseTimer: NodeJS.Timeout | undefined;
  #lost: LockLostError | null = null;
  /** Our current acquisition, while acquiring or owner. */
  #me: Acquirer | null = null;
  /** A handover in progress on the owner side. */
  #handover: { request: ReleaseRequest; started: number } | null = null;
  /** A handover request that reached us in the last moments of our acquisition. */
  #deferred: ReleaseRequest | null = null;

  readonly #queue: Action[] = [];
  #running: Action | null = null;
  #acquireAbort: AbortController | null = null;
  #wake: (() => void) | null = null;
  #changed = false;
  #closing: Promise<void> | null = null;

  constructor(backend: LockBackend, options: VolumeLockOptions) {
    super();
    this.backend = backend;
    this.volumeId = backend.volumeId;
    this.identity = { node: options.identity.node, instance: options.identity.instance, pid: options.identity.pid ?? process.pid };
    checkIdentity(this.identity);
    this.onReleaseRequested = options.onReleaseRequested;
    this.onLost = options.onLost;
    this.#log = (options.log ?? silentLogger).child({ component: 'lock', volumeId: this.volumeId, backend: backend.kind });
    this.#now = options.now ?? (() => performance.now());
    backend.attach(this.#sink());
  }

  get state(): LockState {
    return this.#state;
  }

  /** Monotonic ms (the `now` clock) until which our ownership is certain; -Infinity unless owner. */
  get validUntil(): number {
    return this.#state === LockState.Owner ? this.#validUntil : -Infinity;
  }

  /** The loss that put us in `lost`, until release() acknowledges it. */
  get lostError(): LockLostError | null {
    return this.#lost;
  }

  /** Our acquisition (token, since) while acquiring or owner. */
  get acquisition(): Readonly<Acquirer> | null {
    return this.#me;
  }

  // ------------------------------------------------------------ write path

  /**
   * True when the volume may be written now: owner, and the validity deadline
   * (the lease on files) is still ahead by the monotonic clock. Synchronous
   * and allocation-free; call it before every write. A deadline found passed
   * turns the state to lost here and now: after a pause (SIGSTOP, a stalled
   * event loop) the first write sees it before any timer has run.
   */
  checkHeld(): boolean {
    if (this.#state !== LockState.Owner) return false;
    if (this.#now() < this.#validUntil) return true;
    this.#lose(new LockLostError(this.volumeId, 'lease expired: not renewed in time (paused, or the store stalled)'));
    return false;
  }

  /** checkHeld() or throw LockLostError / LockNotHeldError. */
  assertHeld(): void {
    if (this.checkHeld()) return;
    if (this.#state === LockState.Lost && this.#lost) throw this.#lost;
    throw new LockNotHeldError(this.volumeId, this.#state);
  }

  /**
   * The daemon saw the store refuse us (an I/O failed with EFENCED / errno
   * 108): we are fenced. Turns an owner into lost at once.
   */
  reportFenced(cause?: unknown): void {
    this.#lose(new LockLostError(this.volumeId, 'the store fenced this client (blocklisted)', true, { cause }));
  }

  /** Asks the store now whether we still hold it (RADOS assert_locked, files: the entry). */
  async verify(): Promise<void> {
    if (this.#state !== LockState.Owner) throw this.#lost ?? new LockNotHeldError(this.volumeId, this.#state);
    try {
      await this.backend.verify();
    } catch (err) {
      if (err instanceof LockLostError) this.#lose(err);
      throw err;
    }
  }

  // ------------------------------------------------------------ actions

  /**
   * Becomes the owner (see AcquireOptions). Resolves at once when already
   * owner. Concurrent calls join one acquisition (the first one's options
   * apply). Rejects LockBusyError (not acquired in time), LockAbortedError
   * (release/close/signal), the loss (state lost: release() first), or a
   * backend error; the state is then unlocked (or still lost).
   */
  acquire(options: AcquireOptions = {}): Promise<void> {
    if (this.#closing || this.#state === LockState.Closed) return Promise.reject(new LockStateError(this.volumeId, 'closed'));
    if (this.#state === LockState.Lost && this.#lost) return Promise.reject(this.#lost);
    if (this.#state === LockState.Owner && !this.#running && this.#queue.length === 0) return Promise.resolve();
    return this.#enqueue('acquire', () => this.#doAcquire(options));
  }

  /**
   * Gives the lock up and tells waiters. From lost: acknowledges the loss
   * (cleans up what can be) and returns to unlocked. Aborts an acquisition
   * in progress. Rejects with LockLostError when the lock turned out to be
   * lost already (the state is unlocked afterwards all the same).
   */
  release(): Promise<void> {
    if (this.#state === LockState.Closed) return Promise.resolve();
    this.#abortAcquire('release() was called');
    return this.#enqueue('release', () => this.#doRelease());
  }

  /** Releases if held (or acknowledges a loss), then closes the backend. Idempotent. */
  close(): Promise<void> {
    if (this.#closing) return this.#closing;
    this.#abortAcquire('close() was called');
    this.#closing = this.#enqueue('close', () => this.#doClose());
    return this.#closing;
  }

  /**
   * Stops at once without releasing: no renewals, no watch, queued actions
   * rejected. To other nodes this looks like a crash (they fence us and break
   * the lock). For tests and fatal errors; close() is the orderly way.
   */
  async destroy(err?: Error): Promise<void> {
    const reason = err ?? new LockAbortedError(this.volumeId, 'destroyed');
    this.#abortAcquire('destroyed');
    for (const action of this.#queue.splice(0)) action.reject(reason);
    this.#clearLease();
    const from = this.#state;
    if (from !== LockState.Closed) {
      this.#state = LockState.Closed;
      this.#publish(from, LockState.Closed, 'destroyed');
    }
    this.#closing ??= Promise.resolve();
    await this.backend.stop().catch(() => undefined);
    await this.backend.close().catch(() => undefined);
  }

  // ------------------------------------------------------------ queries

  /** Who holds the lock now, as the store says (anyone may ask). */
  owner(): Promise<LockOwner | null> {
    return this.backend.owner();
  }

  /**
   * Fences and breaks another holder's lock (operator action: the holder is
   * known dead). Refuses when we hold it. See LockBackend.breakLock.
   */
  async breakLock(options: BreakOptions = {}): Promise<LockOwner | null> {
    if (this.#state === LockState.Owner || this.#state === LockState.Releasing) {
      throw new LockStateError(this.volumeId, 'this lock is ours: release it instead of breaking it');
    }
    return this.backend.breakLock(this.identity, { force: options.force ?? false, timeoutMs: options.timeoutMs ?? -1 });
  }

  // ------------------------------------------------------------ the queue

  #enqueue(kind: ActionKind, run: () => Promise<void>): Promise<void> {
    const last = this.#queue.length > 0 ? this.#queue[this.#queue.length - 1]! : this.#running;
    if (last && last.kind === kind) return last.promise;
    let resolve!: () => void;
    let reject!: (err: unknown) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => undefined); // the caller gets it; no unhandled rejection for joined callers
    this.#queue.push({ kind, run, promise, resolve, reject });
    if (!this.#running) void this.#pump();
    return promise;
  }

  async #pump(): Promise<void> {
    while (!this.#running && this.#queue.length > 0) {
      const action = this.#queue.shift()!;
      this.#running = action;
      try {
        await action.run();
        action.resolve();
      } catch (err) {
        action.reject(err);
      } finally {
        this.#running = null;
      }
    }
  }

  #abortAcquire(why: string): void {
    if (this.#running?.kind === 'acquire' && this.#acquireAbort && !this.#acquireAbort.signal.aborted) {
      this.#acquireAbort.abort(new LockAbortedError(this.volumeId, why));
      this.#wake?.();
    }
    // queued acquisitions behind the running action are dropped too
    for (let i = this.#queue.length - 1; i >= 0; i--) {
      if (this.#queue[i]!.kind === 'acquire') this.#queue.splice(i, 1)[0]!.reject(new LockAbortedError(this.volumeId, why));
    }
  }

  // ------------------------------------------------------------ acquire

  async #doAcquire(options: AcquireOptions): Promise<void> {
    if (this.#state === LockState.Owner) return;
    if (this.#state === LockState.Lost && this.#lost) throw this.#lost;
    const abort = new AbortController();
    this.#acquireAbort = abort;
    const onOuterAbort = () => abort.abort(new LockAbortedError(this.volumeId, 'aborted by the caller', { cause: options.signal?.reason }));
    if (options.signal?.aborted) onOuterAbort();
    options.signal?.addEventListener('abort', onOuterAbort, { once: true });
    const signal = abort.signal;

    const started = this.#now();
    const wait = options.wait ?? true;
    const deadline = wait === false ? started : wait === true ? Infinity : started + Math.max(0, wait);
    const requestHandover = options.requestHandover ?? false;
    const takeOverDead = options.takeOverDead ?? true;
    const me: Acquirer = { ...this.identity, token: newToken(), since: Date.now() };
    this.#me = me;
    this.#transition(LockState.Acquiring, requestHandover ? 'acquire (handover requested)' : 'acquire');

    /** We asked a live holder to hand over (this acquisition). */
    let asked = false;
    let takeover = false;
    let holder: Holder | null = null;
    let why = 'not released in time';
    try {
      for (;;) {
        this.#throwIfAborted(signal);
        this.#changed = false;
        let attempt = await this.backend.tryAcquire(me);
        if (!attempt.acquired && attempt.holder && (requestHandover || takeOverDead)) {
          holder = attempt.holder;
          const probe = await this.backend.probe(holder, me, requestHandover);
          if (requestHandover && probe.liveness === 'alive') asked = true;
          why = requestHandover
            ? probe.accepted ? 'handover accepted, not released yet' : probe.liveness === 'alive' ? 'the holder declined to hand over' : `the holder is ${probe.liveness}`
            : `the holder is ${probe.liveness}`;
          if (probe.liveness === 'dead' && takeOverDead) {
            this.#throwIfAborted(signal);
            this.#log.warn(`lock: taking over from dead holder ${describeHolder(holder.owner)}`, { holder: holder.owner });
            attempt = await this.backend.takeOver(holder, me);
            if (attempt.acquired) takeover = attempt.brokeHolder ?? true;
          }
        }
        if (attempt.acquired) {
          if (signal.aborted) {
            await this.backend.release().catch(() => undefined);
            this.#throwIfAborted(signal);
          }
          break;
        }
        if (attempt.holder) holder = attempt.holder;
        const left = deadline - this.#now();
        if (left <= 0) throw new LockBusyError(this.volumeId, holder?.owner ?? null, why);
        // Nobody holds it now (released between our steps): try again soon.
        await this.#pause(Math.min(attempt.holder === null ? 5 : this.backend.pollMs, left), signal);
      }
    } catch (err) {
      this.#me = null;
      this.#deferred = null;
      this.#transition(LockState.Unlocked, err instanceof LockError ? err.code : 'error');
      throw err;
    } finally {
      options.signal?.removeEventListener('abort', onOuterAbort);
      if (this.#acquireAbort === abort) this.#acquireAbort = null;
      await this.backend.acquireEnded(me).catch((err: unknown) => this.#log.debug('lock: cleanup after acquire failed', { err }));
    }
    const handover = asked && !takeover;
    this.#lost = null;
    this.#handover = null;
    // The deadline first: listeners of the state change may already check it.
    this.#validUntil = this.backend.validUntil;
    this.#transition(LockState.Owner, takeover ? 'took over from a dead holder' : handover ? 'handed over' : 'acquired');
    this.#armLease(this.#validUntil);
    const waitedMs = this.#now() - started;
    this.emit('acquired', { waitedMs, handover, takeover });
    if (lockAcquiredChannel.hasSubscribers) {
      lockAcquiredChannel.publish({ volumeId: this.volumeId, waitedMs, handover, takeover } satisfies LockAcquiredMessage);
    }
    const deferred = this.#deferred;
    this.#deferred = null;
    if (deferred && (this.#state as LockState) === LockState.Owner) this.#onReleaseRequested(deferred);
  }

  #throwIfAborted(signal: AbortSignal): void {
    if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : new LockAbortedError(this.volumeId, 'aborted');
  }

  /** Waits `ms`, or until the backend says changed(), or the signal aborts. */
  #pause(ms: number, signal: AbortSignal): Promise<void> {
    if (this.#changed) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        this.#wake = null;
      };
      const onAbort = () => {
        done();
        reject(signal.reason instanceof Error ? signal.reason : new LockAbortedError(this.volumeId, 'aborted'));
      };
      const timer = setTimeout(() => {
        done();
        resolve();
      }, Math.max(0, ms));
      this.#wake = () => {
        done();
        resolve();
      };
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  // ------------------------------------------------------------ release

  async #doRelease(): Promise<void> {
    switch (this.#state) {
      case LockState.Unlocked:
      case LockState.Closed:
        return;
      case LockState.Lost:
        await this.backend.abandon();
        this.#acknowledgeLoss();
        return;
      case LockState.Owner:
        break;
      default:
        throw new LockStateError(this.volumeId, `release in state ${this.#state}`);
    }
    const handover = this.#handover;
    this.#transition(LockState.Releasing, handover ? 'handover' : 'release');
    this.#clearLease();
    try {
      await this.backend.release();
    } catch (err) {
      if ((this.#state as LockState) === LockState.Closed) throw err; // destroyed meanwhile
      const lost = err instanceof LockLostError ? err : new LockLostError(this.volumeId, `release failed: ${(err as Error).message}`, isFencedError(err), { cause: err });
      this.#lose(lost);
      await this.backend.abandon();
      this.#acknowledgeLoss();
      throw lost;
    }
    const now = this.#state as LockState;
    if (now === LockState.Closed) return; // destroyed meanwhile
    if (now === LockState.Lost) {
      // lost while releasing (a watch error, a verify): the release itself went through
      const lost = this.#lost!;
      await this.backend.abandon();
      this.#acknowledgeLoss();
      throw lost;
    }
    this.#me = null;
    this.#handover = null;
    this.#transition(LockState.Unlocked, handover ? 'handed over' : 'released');
    this.emit('released');
    if (handover) {
      const ms = this.#now() - handover.started;
      if (lockHandoverChannel.hasSubscribers) lockHandoverChannel.publish({ volumeId: this.volumeId, ms } satisfies LockHandoverMessage);
    }
  }

  #acknowledgeLoss(): void {
    if (this.#state === LockState.Closed) return; // destroyed meanwhile
    this.#me = null;
    this.#handover = null;
    this.#transition(LockState.Unlocked, 'loss acknowledged');
  }

  async #doClose(): Promise<void> {
    if (this.#state === LockState.Owner || this.#state === LockState.Lost) {
      await this.#doRelease().catch((err: unknown) => this.#log.warn(`lock: release at close: ${(err as Error).message}`, { err }));
    }
    await this.backend.close();
    if (this.#state !== LockState.Closed) this.#transition(LockState.Closed, 'closed');
  }

  // ------------------------------------------------------------ owner side

  #sink(): LockSink {
    return {
      releaseRequested: (request) => this.#onReleaseRequested(request),
      changed: () => {
        this.#changed = true;
        this.#wake?.();
      },
      lost: (err) => this.#lose(err),
      validity: (until) => this.#armLease(until),
    };
  }

  #onReleaseRequested(request: ReleaseRequest): boolean {
    if (this.#state === LockState.Releasing) return true;
    if (this.#state === LockState.Acquiring && this.onReleaseRequested) {
      // The backend holds it already, we are about to be owner: handle it then.
      this.#deferred = request;
      return true;
    }
    if (this.#state !== LockState.Owner) return false;
    this.emit('releaseRequested', request);
    if (this.#handover) return true;
    const handler = this.onReleaseRequested;
    if (!handler) return false;
    this.#log.info(`lock: handover requested by ${describeHolder(request.from)}`, { from: request.from });
    const handover = { request, started: this.#now() };
    this.#handover = handover;
    void (async () => {
      try {
        await handler(request, this);
      } catch (err) {
        this.#log.warn(`lock: handover declined: ${(err as Error).message}`, { err });
        if (this.#handover === handover) this.#handover = null;
        return;
      }
      if (this.#state === LockState.Owner && this.#handover === handover) {
        await this.release().catch((err: unknown) => this.#log.warn(`lock: release after handover: ${(err as Error).message}`, { err }));
      }
    })();
    return true;
  }

  /** We are not the owner any more. Idempotent; ignored unless owner/releasing. */
  #lose(err: LockLostError): void {
    if (this.#state !== LockState.Owner && this.#state !== LockState.Releasing) return;
    this.#lost = err;
    this.#clearLease();
    this.#handover = null;
    this.#transition(LockState.Lost, err.message);
    this.#log.error(err.message, { fenced: err.fenced });
    void this.backend.stop().catch(() => undefined);
    this.emit('lost', err);
    try {
      this.onLost?.(err);
    } catch (e) {
      this.#log.error(`lock: onLost handler threw: ${(e as Error).message}`);
    }
  }

  /** A new validity deadline; a timer turns us lost when it passes unrenewed. */
  #armLease(until: number): void {
    this.#validUntil = until;
    if (this.#state !== LockState.Owner) return;
    this.#clearLease();
    if (!Number.isFinite(until)) return;
    const fire = () => {
      this.#leaseTimer = undefined;
      if (this.#state !== LockState.Owner) return;
      const left = this.#validUntil - this.#now();
      if (left > 0) this.#leaseTimer = setTimeout(fire, left + 1);
      else this.checkHeld();
    };
    this.#leaseTimer = setTimeout(fire, Math.max(0, until - this.#now()) + 1);
  }

  #clearLease(): void {
    if (this.#leaseTimer) clearTimeout(this.#leaseTimer);
    this.#leaseTimer = undefined;
  }

  // ------------------------------------------------------------ transitions

  #transition(to: LockState, reason: string): void {
    const from = this.#state;
    checkTransition(this.volumeId, from, to);
    this.#state = to;
    this.#publish(from, to, reason);
  }

  #publish(from: LockState, to: LockState, reason: string): void {
    const change: LockStateChange = { volumeId: this.volumeId, from, to, reason };
    this.#log.debug(`lock: ${from} → ${to}: ${reason}`);
    if (lockStateChannel.hasSubscribers) lockStateChannel.publish(change);
    this.emit('state', change);
  }
}
