/**
 * VolumeSession: one writable volume open in this daemon, under the
 * volume's distributed lock (src/locks/, DESIGN.md §4: exactly one writer).
 * Every NBD connection and admin operation on the volume shares it.
 *
 *               first write (or open/lock)            handover asked by another node,
 *   reader ─────────────────────────────────▶ owner ─────────────────────────────────▶ reader
 *     │  acquire (handover from the holder)     │   close the map (drain, flush, persist)
 *     │  then a fresh map through the lock      │   then release
 *     │                                         │ lost (fenced, lease expired)
 *     ◀─────────────────────────────────────────┘   drop the map unsaved, acknowledge
 *
 * - owner: the Volume's map is authoritative (only we write it); its map and
 *   data blockers are guarded (locks/guarded-blocker.ts), so nothing is
 *   changed once the lock is no longer held, even mid-request.
 * - reader: the lock is elsewhere (or nobody's). Reads must see what the
 *   owner has flushed, so each read refreshes the map first: one header read
 *   (shared by the reads that arrive while it runs) and the chunks it
 *   touches, never the whole map. An object the owner removed meanwhile
 *   makes the read retry on a fresh map.
 * - At open the lock is taken if nobody holds it (one attempt, no handover
 *   request): a volume only this daemon serves reads from its cache from the
 *   start. It is given up at once when another node asks.
 *
 * A lost lock (fenced, lease expired, broken by an operator) is final for
 * this session: the node was taken for dead and another may have written
 * since, so writes fail (EIO) until every connection has closed and the
 * volume is opened again — as a blocklisted RBD client stays dead. Reads go
 * on as a reader.
 *
 * Mutations (write, zero, trim) pass a door: while ownership changes they
 * wait, then run on the new owner Volume (asking for the lock again if we
 * are a reader). A FLUSH covers writes made under an earlier ownership too:
 * giving the lock up made them durable first, and a failed hand-over keeps
 * the lock (the requester waits and asks again).
 *
 * Snapshots (and other map changes made for the admin API) run through
 * exclusive(): as owner, quiesced.
 */
import { EventEmitter } from 'node:events';
import { Volume } from '../compose/volume.js';
import { ComposeError } from '../compose/errors.js';
import type { Extent, ReadPiece, ZeroOptions } from '../compose/types.js';
import { VolumeMap } from '../mapper/volume-map.js';
import {
  LockBusyError, LockError, LockLostError, LockState, createVolumeLock, guardBlocker, isFencedError,
  type LockIdentity, type LockOwner, type LockStore, type LockBackendOptions, type VolumeLock,
} from '../locks/index.js';
import type { Blocker } from '../blockers/blocker.js';
import type { Logger } from '../common/log.js';

/** Told when a Volume starts or stops serving (metrics read its stats: metrics.ts). */
export interface SessionHooks {
  opened?(name: string, volume: Volume): void;
  closed?(name: string, volume: Volume): void;
}

export interface SessionOptions {
  name: string;
  /** The blockers every I/O goes through (timeouts, metrics). */
  maps: Blocker;
  data: Blocker;
  /** The unwrapped store the lock lives on (lockBackendFor). */
  lockStore: LockStore;
  identity: LockIdentity;
  /** How long a mutation waits for the lock (handover included), ms. */
  lockWaitMs: number;
  lockBackend?: LockBackendOptions;
  log: Logger;
  hooks?: SessionHooks;
}

type Mode = 'reader' | 'owner';

/** How often a read retries on a fresh map when the owner moved objects under it. */
const READ_RETRIES = 3;

export class VolumeSession extends EventEmitter {
  readonly name: string;
  readonly lock: VolumeLock;
  #volume: Volume;
  #mode: Mode = 'reader';
  /** A change of ownership under way: mutations wait for it. */
  #door: Promise<void> | null = null;
  /** Mutations running on the current owner Volume. */
  #mutating = 0;
  #drained: (() => void) | null = null;
  /** Refuse hand-over requests (`archipelago lock`). */
  #pinned = false;
  #closed = false;
  /** The lock was lost (fenced, lease expired, broken): writes fail for good (file comment). */
  #lost: LockLostError | null = null;
  #closing: Promise<void> | null = null;
  /** The refresh running for readers, and the one queued behind it. */
  #refreshing: Promise<void> | null = null;
  #nextRefresh: Promise<void> | null = null;
  readonly #o: SessionOptions;
  readonly #log: Logger;
  readonly #guardedMaps: Blocker;
  readonly #guardedData: Blocker;

  private constructor(o: SessionOptions, volume: Volume, lock: VolumeLock) {
    super();
    this.#o = o;
    this.name = o.name;
    this.#log = o.log.child({ volume: o.name });
    this.#volume = volume;
    this.lock = lock;
    this.#guardedMaps = guardBlocker(o.maps, lock);
    this.#guardedData = guardBlocker(o.data, lock);
    lock.onReleaseRequested = () => this.#handOver();
    lock.onLost = (err) => { void this.#onLost(err); };
  }

  /**
   * Opens writable volume `name` whose header `map` was just read (read-only),
   * taking its lock if nobody holds it.
   */
  static async open(o: SessionOptions, map: VolumeMap): Promise<VolumeSession> {
    const lock = createVolumeLock(o.lockStore, map.id, { identity: o.identity, log: o.log, backend: o.lockBackend });
    const volume = new Volume(map, o.data, false);
    const session = new VolumeSession(o, volume, lock);
    o.hooks?.opened?.(o.name, volume);
    try {
      await lock.acquire({ wait: false, requestHandover: false, takeOverDead: false });
      await session.#becomeOwner('open');
    } catch (err) {
      if (!(err instanceof LockBusyError)) {
        await session.close().catch(() => undefined);
        throw err;
      }
      session.#log.info(`volume ${o.name}: lock held elsewhere; reading without it`, { holder: err.holder });
    }
    return session;
  }

  get mode(): Mode { return this.#mode; }
  get size(): number { return this.#volume.size; }
  get readOnly(): false { return false; }
  /** The Volume serving now (it changes with ownership). */
  get volume(): Volume { return this.#volume; }
  get pinned(): boolean { return this.#pinned; }

  // ----------------------------------------------------------------- reads

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    return this.#reading((v) => v.read(offset, length));
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#reading((v) => v.blockStatus(offset, length));
  }

  async cache(offset: number, length: number): Promise<void> {
    if (this.#mode === 'owner') return this.#volume.cache(offset, length);
  }

  /**
   * Runs a read on the owner Volume, or on a freshly refreshed map (reader).
   * A read that fails while ownership changes, or as a reader (the owner
   * elsewhere may have removed an object our map still named), is retried
   * on the Volume serving after it.
   */
  async #reading<T>(fn: (v: Volume) => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      if (this.#mode !== 'owner') await this.#refresh();
      const v = this.#volume;
      const asOwner = this.#mode === 'owner';
      try {
        return await fn(v);
      } catch (err) {
        const moved = this.#volume !== v || this.#door !== null;
        if (attempt >= READ_RETRIES || (asOwner && !moved)) throw err;
        this.#log.debug('read retried on a fresh map', { err: (err as Error).message });
        while (this.#door !== null) await this.#door;
      }
    }
  }

  /**
   * Re-reads the header and forgets cached chunks, for a read that arrived
   * now: a refresh already running may have read the header before our
   * caller's data was flushed elsewhere, so it joins the next one.
   */
  #refresh(): Promise<void> {
    if (this.#refreshing === null) return this.#startRefresh();
    // One is running: queue one behind it, shared by every read arriving meanwhile.
    this.#nextRefresh ??= this.#refreshing.catch(() => undefined).then(() => {
      this.#nextRefresh = null;
      return this.#startRefresh();
    });
    return this.#nextRefresh;
  }

  #startRefresh(): Promise<void> {
    const run: Promise<void> = this.#runRefresh().finally(() => {
      if (this.#refreshing === run) this.#refreshing = null;
    });
    this.#refreshing = run;
    return run;
  }

  async #runRefresh(): Promise<void> {
    const v = this.#volume;
    if (this.#mode !== 'reader' || v.map.writable) return;
    await v.map.refresh();
  }

  // ------------------------------------------------------------- mutations

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.#mutation((v) => v.write(offset, data, fua));
  }

  zero(offset: number, length: number, o: ZeroOptions): Promise<void> {
    return this.#mutation((v) => v.zero(offset, length, o));
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.#mutation((v) => v.trim(offset, length, fua));
  }

  /** Makes durable every write completed before it (under this or an earlier ownership). */
  async flush(): Promise<void> {
    while (this.#door !== null) await this.#door;
    if (this.#mode === 'owner') await this.#volume.flush();
  }

  async #mutation(fn: (v: Volume) => Promise<void>): Promise<void> {
    const v = await this.#enterAsOwner();
    try {
      await fn(v);
    } catch (err) {
      throw lockToCompose(err, this.name);
    } finally {
      this.#mutationDone();
    }
  }

  /** Waits at the door, becomes owner if needed, and counts one mutation in. */
  async #enterAsOwner(): Promise<Volume> {
    for (;;) {
      await this.#ensureOwner();
      // Re-checked synchronously: the door may have shut since ensureOwner resolved.
      if (this.#door === null && this.#mode === 'owner') {
        this.#mutating++;
        return this.#volume;
      }
    }
  }

  /** Resolves once we are owner with the door open (asking for the lock if needed). */
  async #ensureOwner(): Promise<void> {
    for (;;) {
      if (this.#closed) throw new ComposeError('ESHUTDOWN', `volume ${this.name}: closing`);
      if (this.#lost) {
        throw new ComposeError('EIO', `volume ${this.name}: ${this.#lost.message}; `
          + 'writes fail until every connection to it has closed', { cause: this.#lost });
      }
      if (this.#door !== null) { await this.#door; continue; }
      if (this.#mode === 'owner') return;
      await this.#takeOwnership();
    }
  }

  #mutationDone(): void {
    if (--this.#mutating === 0 && this.#drained !== null) this.#drained();
  }

  /** reader → owner: acquire (asking the holder to hand over), then a fresh map. */
  #takeOwnership(): Promise<void> {
    return this.#through(async () => {
      if (this.#mode === 'owner' || this.#closed) return;
      const started = performance.now();
      // A loss reported after our last hand-over (harmless: #onLost) may not be acknowledged yet.
      if (this.lock.state === LockState.Lost) await this.lock.release().catch(() => undefined);
      try {
        await this.lock.acquire({ wait: this.#o.lockWaitMs, requestHandover: true });
      } catch (err) {
        throw lockToCompose(err, this.name);
      }
      await this.#becomeOwner('write', performance.now() - started);
    });
  }

  /** With the lock just acquired: serve from a fresh map opened through the lock. */
  async #becomeOwner(why: string, waitedMs = 0): Promise<void> {
    let map: VolumeMap;
    try {
      map = await VolumeMap.open(this.#guardedMaps, this.name, { forWrite: false });
    } catch (err) {
      await this.lock.release().catch(() => undefined);
      throw err;
    }
    this.#swap(new Volume(map, this.#guardedData, false), 'owner');
    this.#log.info(`volume ${this.name}: lock acquired (${why})`, { waitedMs: Math.round(waitedMs), generation: map.generation });
  }

  /** Runs a change of ownership with the door shut: new mutations wait for it. */
  async #through(fn: () => Promise<void>): Promise<void> {
    while (this.#door !== null) await this.#door;
    let open!: () => void;
    this.#door = new Promise<void>((resolve) => { open = resolve; });
    try {
      await fn();
    } finally {
      this.#door = null;
      open();
    }
  }

  /** Waits until no mutation runs on the owner Volume. */
  async #drain(): Promise<void> {
    while (this.#mutating > 0) await new Promise<void>((resolve) => { this.#drained = resolve; });
    this.#drained = null;
  }

  /**
   * owner → reader, for a hand-over request: drain, flush and persist the
   * map; VolumeLock releases the lock once this resolves. A failure keeps us
   * owner and declines the request (the requester asks again).
   */
  #handOver(): Promise<void> {
    if (this.#pinned) {
      return Promise.reject(new Error(`volume ${this.name} is locked here (archipelago lock); unlock it first`));
    }
    const started = performance.now();
    return this.#through(async () => {
      if (this.#mode !== 'owner') return;
      await this.#persistAndRead();
      this.#log.info(`volume ${this.name}: lock handed over`, { ms: Math.round(performance.now() - started) });
    });
  }

  /** With the door shut, as owner: drain, flush, persist the map, then serve as a reader. */
  async #persistAndRead(): Promise<void> {
    await this.#drain();
    const old = this.#volume;
    await old.flush();
    await old.close();
    const map = await VolumeMap.open(this.#o.maps, this.name, { forWrite: false });
    this.#swap(new Volume(map, this.#o.data, false), 'reader');
  }

  /** The lock was lost: what the old map cached is void; drop it unsaved and serve as a reader. */
  async #onLost(err: LockLostError): Promise<void> {
    if (this.#mode !== 'owner' && !err.fenced) {
      // Already handed over (the map persisted, nothing written since): a
      // release that found itself superseded loses nothing.
      this.#log.warn(`volume ${this.name}: ${err.message} (after the hand-over: nothing to drop)`);
      if (this.lock.state === LockState.Lost) await this.lock.release().catch(() => undefined);
      return;
    }
    this.#log.error(`volume ${this.name}: ${err.message}; writes fail until every connection to it has closed`, { fenced: err.fenced });
    this.#lost = err;
    this.emit('lost', err);
    await this.#through(async () => {
      if (this.#mode === 'owner') {
        // Mutations in flight fail at their next storage call (the guard).
        await this.#drain();
        await this.#volume.close().catch(() => undefined);
        this.#mode = 'reader';
        if (!this.#closed) {
          const map = await VolumeMap.open(this.#o.maps, this.name, { forWrite: false });
          this.#swap(new Volume(map, this.#o.data, false), 'reader');
        }
      }
      // Acknowledge the loss (the lock's own bookkeeping).
      if (this.lock.state === LockState.Lost) await this.lock.release().catch(() => undefined);
    }).catch((e: unknown) => {
      this.#log.error(`volume ${this.name}: reopening after the loss failed: ${(e as Error).message}`);
    });
  }

  /** Serves from `volume` from now on; metrics count the old one's stats as final. */
  #swap(volume: Volume, mode: Mode): void {
    const old = this.#volume;
    this.#volume = volume;
    this.#mode = mode;
    this.#o.hooks?.opened?.(this.name, volume);
    this.#o.hooks?.closed?.(this.name, old);
  }

  // ------------------------------------------------------- admin operations

  /**
   * Runs `fn` as owner with the volume quiesced (no mutation in flight, all
   * flushed) and the map writable: snapshots. Waits for the lock as a write
   * would; no hand-over can start while it runs.
   */
  async exclusive<T>(fn: (volume: Volume) => Promise<T>): Promise<T> {
    for (;;) {
      await this.#ensureOwner();
      let ran = false;
      let result!: T;
      await this.#through(async () => {
        if (this.#mode !== 'owner') return; // lost meanwhile: take it again
        ran = true;
        const v = this.#volume;
        await this.#drain();
        result = await v.quiesce(async () => {
          if (!v.map.writable) await v.map.beginWrites();
          return fn(v);
        });
      });
      if (ran) return result;
    }
  }

  /**
   * Takes the lock now (asking the holder to hand over) and keeps it until
   * dropLock(): `pinned` refuses hand-over requests (`archipelago lock`),
   * otherwise they are honoured as usual (`archipelago open`).
   */
  async takeLock(pinned: boolean): Promise<void> {
    await this.#ensureOwner();
    this.#pinned = pinned;
  }

  /** Gives the lock up now (persisting the map) and ends a pin. */
  async dropLock(): Promise<void> {
    this.#pinned = false;
    await this.#through(async () => {
      if (this.#mode === 'owner') await this.#persistAndRead();
      await this.lock.release();
    });
  }

  /** Who holds the lock, as the store says. */
  owner(): Promise<LockOwner | null> {
    return this.lock.owner();
  }

  get lockState(): LockState {
    return this.lock.state;
  }

  // ------------------------------------------------------------------ close

  /** Persists (if owner), releases the lock and stops. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#pinned = false;
      // A write still waiting for the lock gives up (it fails) rather than hold the close up.
      if (this.#mode !== 'owner' && this.lock.state === LockState.Acquiring) void this.lock.release().catch(() => undefined);
      try {
        await this.#through(async () => {
          this.#closed = true;
          await this.#drain();
          await this.#volume.close();
        });
      } finally {
        this.#o.hooks?.closed?.(this.name, this.#volume);
        await this.lock.close().catch((err: unknown) => {
          this.#log.warn(`volume ${this.name}: releasing its lock failed: ${(err as Error).message}`);
        });
      }
    })();
    return this.#closing;
  }
}

/** A lock failure on the I/O path, as the errno NBD sends (EIO), keeping the why. */
function lockToCompose(err: unknown, name: string): unknown {
  if (!(err instanceof LockError) && !isFencedError(err)) return err;
  return new ComposeError('EIO', `volume ${name}: ${(err as Error).message}`, { cause: err });
}
