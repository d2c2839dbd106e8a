/**
 * An in-memory LockBackend: a shared MemoryLockTable stands for the store,
 * each MemoryLockBackend for one node's view of one volume's lock. For unit
 * tests of the state machine and of code built on it (the daemon on the
 * memory blocker), with the hooks such tests need:
 *
 *   const table = new MemoryLockTable();
 *   const a = new MemoryLockBackend(table, VOL, { client: 'a' });
 *   a.liveness = 'dead';           // a crashed holder: probes find it dead
 *   a.failNext('release', err);    // inject one failure
 *   a.delay('tryAcquire', 50);     // and latency
 *
 * Fencing works like RADOS: a takeover or break fences the holder's whole
 * `client` (every backend with that client name); a fenced backend's
 * operations reject with a fenced LockLostError and, like a watch error,
 * the loss is reported to its VolumeLock on the next tick. An optional
 * `leaseMs` gives holders a validity deadline (renew() moves it), to test
 * the write path's checkHeld() without a file system.
 *
 * Imports the lock layer only.
 */
import { LockBusyError, LockLostError, LockStateError } from './errors.js';
import type {
  Acquirer, Attempt, Holder, Liveness, LockBackend, LockIdentity, LockOwner, LockSink, ProbeResult,
} from './types.js';

interface Held {
  owner: LockOwner;
  backend: MemoryLockBackend;
}

interface Slot {
  held: Held | null;
  backends: Set<MemoryLockBackend>;
}

/** The "store": one slot per volume id. */
export class MemoryLockTable {
  readonly #slots = new Map<string, Slot>();
  /** Clients fenced so far (like a blocklist). */
  readonly fencedClients = new Set<string>();

  slot(volumeId: string): Slot {
    let slot = this.#slots.get(volumeId);
    if (!slot) {
      slot = { held: null, backends: new Set() };
      this.#slots.set(volumeId, slot);
    }
    return slot;
  }

  /** Who holds `volumeId` now. */
  holder(volumeId: string): LockOwner | null {
    return this.#slots.get(volumeId)?.held?.owner ?? null;
  }
}

export interface MemoryLockOptions {
  /** The fencing unit (a RADOS client, a node): default a unique name. */
  client?: string;
  /** Acquire retry interval, ms (default 20). */
  pollMs?: number;
  /** Simulated lease: a holder is valid until acquire/renew() + leaseMs. Default: no lease (Infinity). */
  leaseMs?: number;
  /** Monotonic clock for the lease (default performance.now). */
  now?: () => number;
}

export type MemoryLockOp = 'tryAcquire' | 'probe' | 'takeOver' | 'release' | 'verify' | 'owner' | 'breakLock';

let clients = 0;

export class MemoryLockBackend implements LockBackend {
  readonly kind = 'memory' as const;
  readonly volumeId: string;
  readonly pollMs: number;
  readonly client: string;
  /** How this backend answers probes while it holds the lock. */
  liveness: Liveness = 'alive';
  /** Every operation, in order (tests assert sequences). */
  readonly calls: MemoryLockOp[] = [];

  readonly #table: MemoryLockTable;
  readonly #slot: Slot;
  readonly #leaseMs: number;
  readonly #now: () => number;
  #sink: LockSink | null = null;
  #token: string | null = null;
  #validUntil = -Infinity;
  #closed = false;
  readonly #failures = new Map<MemoryLockOp, Error>();
  readonly #delays = new Map<MemoryLockOp, number>();

  constructor(table: MemoryLockTable, volumeId: string, options: MemoryLockOptions = {}) {
    this.#table = table;
    this.volumeId = volumeId;
    this.pollMs = options.pollMs ?? 20;
    this.client = options.client ?? `memory-client-${++clients}`;
    this.#leaseMs = options.leaseMs ?? Infinity;
    this.#now = options.now ?? (() => performance.now());
    this.#slot = table.slot(volumeId);
    this.#slot.backends.add(this);
  }

  get validUntil(): number {
    return this.#token ? this.#validUntil : -Infinity;
  }

  get fenced(): boolean {
    return this.#table.fencedClients.has(this.client);
  }

  /** Whether this backend holds the lock in the table. */
  get holding(): boolean {
    return this.#token !== null && this.#slot.held?.owner.token === this.#token;
  }

  /** The next call of `op` rejects with `err`. */
  failNext(op: MemoryLockOp, err: Error): void {
    this.#failures.set(op, err);
  }

  /** Every call of `op` takes `ms` longer (0 to stop). */
  delay(op: MemoryLockOp, ms: number): void {
    this.#delays.set(op, ms);
  }

  /** Extends the simulated lease (a renewal). */
  renew(): void {
    if (!this.#token) return;
    this.#validUntil = this.#now() + this.#leaseMs;
    this.#sink?.validity(this.#validUntil);
  }

  /** Reports a loss to the VolumeLock, as a watch error would. */
  deliverLoss(why = 'lost', fenced = false): void {
    this.#token = null;
    this.#sink?.lost(new LockLostError(this.volumeId, why, fenced));
  }

  attach(sink: LockSink): void {
    this.#sink = sink;
  }

  async tryAcquire(me: Acquirer): Promise<Attempt> {
    await this.#step('tryAcquire');
    const held = this.#slot.held;
    if (held) return { acquired: false, holder: { key: held.owner.token, owner: held.owner } };
    this.#slot.held = { owner: { ...me, backend: 'memory', client: this.client }, backend: this };
    this.#token = me.token;
    this.#validUntil = this.#now() + this.#leaseMs;
    return { acquired: true };
  }

  async probe(holder: Holder, me: Acquirer, handover: boolean): Promise<ProbeResult> {
    await this.#step('probe');
    const held = this.#slot.held;
    if (!held || held.owner.token !== holder.key) return { liveness: 'alive', accepted: false }; // gone meanwhile: retry
    const other = held.backend;
    if (other.fenced || other.liveness === 'dead') return { liveness: 'dead', accepted: false };
    if (other.liveness === 'unresponsive') return { liveness: 'unresponsive', accepted: false };
    const accepted = handover
      ? (other.#sink?.releaseRequested({ from: identityOf(me), token: me.token, receivedAt: other.#now() }) ?? false)
      : false;
    return { liveness: 'alive', accepted };
  }

  async takeOver(holder: Holder, me: Acquirer): Promise<Attempt> {
    await this.#step('takeOver');
    const held = this.#slot.held;
    let broke = false;
    if (held && held.owner.token === holder.key) {
      if (held.backend.client === this.client) throw new LockStateError(this.volumeId, 'will not fence our own client');
      this.#fence(held.backend.client);
      this.#slot.held = null;
      broke = true;
    }
    const attempt = await this.tryAcquire(me);
    return attempt.acquired ? { acquired: true, brokeHolder: broke } : attempt;
  }

  async acquireEnded(): Promise<void> {}

  async release(): Promise<void> {
    const token = this.#token;
    await this.#step('release');
    if (!token) throw new LockStateError(this.volumeId, 'release without holding');
    this.#token = null;
    if (this.#slot.held?.owner.token !== token) throw new LockLostError(this.volumeId, 'the lock was broken', this.fenced);
    this.#slot.held = null;
    this.#changed();
  }

  async abandon(): Promise<void> {
    const token = this.#token;
    this.#token = null;
    if (token && !this.fenced && this.#slot.held?.owner.token === token) {
      this.#slot.held = null;
      this.#changed();
    }
  }

  /** Stops answering, like a crashed node: probes find it dead; the lock stays in the table. */
  async stop(): Promise<void> {
    if (this.holding) this.liveness = 'dead';
  }

  async verify(): Promise<void> {
    await this.#step('verify');
    if (!this.#token || this.#slot.held?.owner.token !== this.#token) {
      throw new LockLostError(this.volumeId, 'the lock was broken', this.fenced);
    }
  }

  async owner(): Promise<LockOwner | null> {
    await this.#step('owner');
    return this.#slot.held?.owner ?? null;
  }

  async breakLock(_me: LockIdentity, options: { force: boolean }): Promise<LockOwner | null> {
    await this.#step('breakLock');
    const held = this.#slot.held;
    if (!held) return null;
    const other = held.backend;
    if (!options.force && !other.fenced && other.liveness !== 'dead') {
      throw new LockBusyError(this.volumeId, held.owner, `the holder is ${other.liveness}; force to fence it anyway`);
    }
    this.#fence(other.client);
    this.#slot.held = null;
    this.#changed();
    return held.owner;
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#slot.backends.delete(this);
  }

  async #step(op: MemoryLockOp): Promise<void> {
    this.calls.push(op);
    if (this.#closed) throw new LockStateError(this.volumeId, 'backend closed');
    const ms = this.#delays.get(op) ?? 0;
    await new Promise((resolve) => (ms > 0 ? setTimeout(resolve, ms) : setImmediate(resolve)));
    const failure = this.#failures.get(op);
    if (failure) {
      this.#failures.delete(op);
      throw failure;
    }
    if (this.fenced && op !== 'owner') throw new LockLostError(this.volumeId, 'this client is fenced', true);
  }

  /** Fences every backend of `client`; holders among them learn it on the next tick. */
  #fence(client: string): void {
    this.#table.fencedClients.add(client);
    for (const b of this.#slot.backends) {
      if (b.client === client && b.#token) setImmediate(() => b.deliverLoss('fenced by another node', true));
    }
  }

  #changed(): void {
    for (const b of this.#slot.backends) if (b !== this) b.#sink?.changed();
  }
}

function identityOf(a: Acquirer): LockIdentity {
  return { node: a.node, instance: a.instance, pid: a.pid };
}
