/**
 * The RADOS lock: a per-volume lock on Ceph, as RBD's exclusive lock does it
 * (librbd ManagedLock: cls_lock + watch/notify + blocklist before break).
 *
 * The lock object `lock.<volumeId>` lives in the maps pool (docs/format.md
 * §13.1). On it:
 *
 * - a cls_lock EXCLUSIVE lock named "archipelago" (never renamed: old and new
 *   daemons must exclude each other), no expiry, tag "", with a cookie per
 *   acquisition (the acquisition token) and the owner's identity in the
 *   description (JSON: v, volume, node, instance, pid, since);
 * - a watch by every VolumeLock that is acquiring or owning: the owner
 *   learns of handover requests, waiters of releases, and a holder with no
 *   watch is dead;
 * - body: a constant JSON stamp written once (a watch needs the object).
 *
 * Notifies (JSON, "v":1): `release-request` {holder: cookie asked, token,
 * from} → the owner acks {owner, cookie, accepted} at once, then drains,
 * releases, and notifies `released` {cookie}, which wakes the waiters;
 * `probe` {token} asks only "who is alive". Every watcher acks every notify.
 *
 * Is the holder dead? A notify tells: its client (the "client.N" cls_lock
 * recorded) acked → alive; listed among the timeouts → its watch exists but
 * it did not answer (stalled, paused, or died less than
 * osd_client_watch_timeout ago, 30 s by default) → unresponsive: wait;
 * neither → it has no watch → dead. A dead holder is fenced first
 * (blocklistAdd of the address cls_lock recorded, which also waits for the
 * new osdmap), then its lock broken, then taken. A client that was fenced
 * sees its watch fail (107/108) and every operation fail 108; the owner then
 * goes lost (after a 107 it first re-watches and asks cls_lock: a watch that
 * merely timed out while nobody fenced us keeps the lock). An owner also
 * re-checks with assert_locked every verifyMs.
 *
 * Fencing is per RADOS client: every volume that client serves is cut off,
 * and it must reconnect (a new client) to work again.
 *
 * Imports the blocker layer's librados binding types and the lock layer.
 */
import { silentLogger, type Logger } from '../common/log.js';
import type { RadosCluster, RadosIoCtx, RadosWatch, RadosWatchEvent } from '../blockers/rados/binding.js';
import { refreshOsdmap } from '../blockers/rados/osdmap.js';
import { decodeGetInfoReply, encodeAssertLocked, encodeGetInfo } from './cls-lock.js';
import { LockBusyError, LockFenceError, LockLostError, LockStateError } from './errors.js';
import {
  lockObjectName, type Acquirer, type Attempt, type Holder, type LockBackend, type LockIdentity, type LockOwner,
  type LockSink, type ProbeResult,
} from './types.js';

/** The cls_lock lock name on every lock object. */
export const RADOS_LOCK_NAME = 'archipelago';

export const RADOS_LOCK_DEFAULTS = { notifyTimeoutMs: 2_000, pollMs: 500, verifyMs: 10_000, fenceSeconds: 0 } as const;

const ENOENT = 2;
const EBUSY = 16;
const EEXIST = 17;
const ENOTCONN = 107;
const ETIMEDOUT = 110;
const ESHUTDOWN = 108;

export interface RadosLockOptions {
  /** How long a notify waits for acks (librados rounds up to seconds), ms. Default 2 s. */
  notifyTimeoutMs?: number;
  /** Retry interval while waiting, ms (a `released` notify wakes waiters earlier). Default 500. */
  pollMs?: number;
  /** The owner re-checks its lock with cls_lock assert_locked this often, ms (0: never). Default 10 s. */
  verifyMs?: number;
  /** Blocklist duration when fencing, s (0: the cluster's default, one hour). */
  fenceSeconds?: number;
  log?: Logger;
}

interface RadosHolder extends Holder {
  client: string;
  instanceId: number;
  cookie: string;
  addr: string;
}

interface NotifyMessage {
  v: 1;
  op: 'release-request' | 'probe' | 'released' | 'ack';
  token?: string;
  holder?: string;
  cookie?: string;
  owner?: boolean;
  accepted?: boolean;
  from?: LockIdentity;
}

const errnoOf = (err: unknown) => (err as { errno?: unknown } | null)?.errno;
const noop = () => {};

export class RadosLockBackend implements LockBackend {
  readonly kind = 'rados' as const;
  readonly volumeId: string;
  readonly oid: string;
  readonly pollMs: number;

  readonly #io: RadosIoCtx;
  readonly #cluster: RadosCluster;
  readonly #notifyTimeoutMs: number;
  readonly #verifyMs: number;
  readonly #fenceSeconds: number;
  readonly #log: Logger;
  #sink: LockSink | null = null;
  #watch: RadosWatch | null = null;
  #watching: Promise<RadosWatch> | null = null;
  /** Our cookie while we hold the lock (until an unlock succeeded or proved pointless). */
  #held: string | null = null;
  /** Cookies whose unlock failed: unlocked again when someone asks about them. */
  readonly #orphans = new Set<string>();
  #verifyTimer: NodeJS.Timeout | undefined;
  #stopped = false;
  #closed = false;
  readonly #background = new Set<Promise<unknown>>();

  constructor(io: RadosIoCtx, cluster: RadosCluster, volumeId: string, options: RadosLockOptions = {}) {
    this.#io = io;
    this.#cluster = cluster;
    this.volumeId = volumeId;
    this.oid = lockObjectName(volumeId);
    this.pollMs = options.pollMs ?? RADOS_LOCK_DEFAULTS.pollMs;
    this.#notifyTimeoutMs = options.notifyTimeoutMs ?? RADOS_LOCK_DEFAULTS.notifyTimeoutMs;
    this.#verifyMs = options.verifyMs ?? RADOS_LOCK_DEFAULTS.verifyMs;
    this.#fenceSeconds = options.fenceSeconds ?? RADOS_LOCK_DEFAULTS.fenceSeconds;
    this.#log = (options.log ?? silentLogger).child({ component: 'lock', backend: 'rados', volumeId });
  }

  /** Fenced stores need no lease: ours until we learn otherwise. */
  get validUntil(): number {
    return this.#held ? Infinity : -Infinity;
  }

  attach(sink: LockSink): void {
    this.#sink = sink;
  }

  // ------------------------------------------------------------ acquiring

  async tryAcquire(me: Acquirer): Promise<Attempt> {
    this.#checkOpen();
    await this.#ensureWatch();
    const description = JSON.stringify({ v: 1, volume: this.volumeId, node: me.node, instance: me.instance, pid: me.pid, since: me.since });
    try {
      await this.#io.lockExclusive(this.oid, RADOS_LOCK_NAME, me.token, description, 0);
    } catch (err) {
      const errno = errnoOf(err);
      if (errno === EBUSY) return { acquired: false, holder: await this.#holder() };
      // EEXIST: this client already holds it with this cookie (a retried call went through).
      if (errno !== EEXIST) throw this.#fencedOr(err, 'lock');
    }
    this.#held = me.token;
    this.#stopped = false;
    this.#startVerify();
    return { acquired: true };
  }

  async probe(holder: Holder, me: Acquirer, handover: boolean): Promise<ProbeResult> {
    const h = holder as RadosHolder;
    if (h.instanceId === this.#cluster.instanceId()) return { liveness: 'alive', accepted: false };
    const msg: NotifyMessage = handover
      ? { v: 1, op: 'release-request', holder: h.cookie, token: me.token, from: { node: me.node, instance: me.instance, pid: me.pid } }
      : { v: 1, op: 'probe', token: me.token };
    let result;
    try {
      result = await this.#io.notify(this.oid, Buffer.from(JSON.stringify(msg)), this.#notifyTimeoutMs);
    } catch (err) {
      throw this.#fencedOr(err, 'notify');
    }
    const fromHolder = result.acks.filter((a) => a.notifierId === h.instanceId);
    if (fromHolder.length > 0) {
      const claim = fromHolder.map((a) => parseMessage(a.payload)).find((m) => m?.op === 'ack' && m.owner && m.cookie === h.cookie);
      return { liveness: 'alive', accepted: claim?.accepted === true };
    }
    if (result.timeouts.some((x) => x.notifierId === h.instanceId)) return { liveness: 'unresponsive', accepted: false };
    return { liveness: 'dead', accepted: false };
  }

  /** Fence (blocklist the holder's address), break its lock, then one attempt of ours. */
  async takeOver(holder: Holder, me: Acquirer): Promise<Attempt> {
    const broke = await this.#fenceAndBreak(holder as RadosHolder);
    const attempt = await this.tryAcquire(me);
    return attempt.acquired ? { acquired: true, brokeHolder: broke } : attempt;
  }

  async acquireEnded(): Promise<void> {}

  // ------------------------------------------------------------ owner side

  async release(): Promise<void> {
    const cookie = this.#held;
    if (!cookie) throw new LockStateError(this.volumeId, 'release without holding the lock');
    this.#stopVerify();
    try {
      await this.#io.unlock(this.oid, RADOS_LOCK_NAME, cookie);
    } catch (err) {
      const errno = errnoOf(err);
      if (errno === ENOENT) {
        this.#held = null;
        throw new LockLostError(this.volumeId, 'the lock had been broken before our release', false, { cause: err });
      }
      if (errno === ESHUTDOWN) {
        this.#held = null;
        throw new LockLostError(this.volumeId, 'this client was fenced (blocklisted)', true, { cause: err });
      }
      throw err; // #held stays: abandon() tries again
    }
    this.#held = null;
    this.#announceReleased(cookie);
  }

  async abandon(): Promise<void> {
    this.#stopVerify();
    const cookie = this.#held;
    this.#held = null;
    if (!cookie) return;
    try {
      await this.#io.unlock(this.oid, RADOS_LOCK_NAME, cookie);
      this.#announceReleased(cookie);
    } catch (err) {
      const errno = errnoOf(err);
      if (errno !== ENOENT && errno !== ESHUTDOWN) this.#orphans.add(cookie);
    }
  }

  /** No verify, no watch: to others we look dead (they will fence this client). */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#stopVerify();
    await this.#closeWatch();
  }

  /** cls_lock assert_locked with our cookie. */
  async verify(): Promise<void> {
    const cookie = this.#held;
    if (!cookie) throw new LockLostError(this.volumeId, 'not held');
    try {
      await this.#io.exec(this.oid, 'lock', 'assert_locked', encodeAssertLocked(RADOS_LOCK_NAME, cookie));
    } catch (err) {
      const errno = errnoOf(err);
      if (errno === EBUSY || errno === ENOENT) throw new LockLostError(this.volumeId, 'cls_lock says our lock is gone (broken)', false, { cause: err });
      throw this.#fencedOr(err, 'assert_locked');
    }
  }

  async owner(): Promise<LockOwner | null> {
    return (await this.#holder())?.owner ?? null;
  }

  async breakLock(me: LockIdentity, options: { force: boolean }): Promise<LockOwner | null> {
    const h = await this.#holder();
    if (!h) return null;
    if (!options.force) {
      const probe = await this.probe(h, { ...me, token: '0000000000000000', since: Date.now() }, false);
      if (probe.liveness !== 'dead') {
        throw new LockBusyError(this.volumeId, h.owner, `the holder is ${probe.liveness}; force to fence it anyway`);
      }
    }
    await this.#fenceAndBreak(h);
    this.#announceReleased(h.cookie);
    return h.owner;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#stopVerify();
    await this.#closeWatch();
    await Promise.allSettled([...this.#background]);
  }

  // ------------------------------------------------------------ helpers

  #checkOpen(): void {
    if (this.#closed) throw new LockStateError(this.volumeId, 'RADOS lock backend is closed');
  }

  /** 108 means this client is blocklisted: a fenced LockLostError; anything else as it is. */
  #fencedOr(err: unknown, op: string): unknown {
    if (errnoOf(err) === ESHUTDOWN) {
      return new LockLostError(this.volumeId, `${op}: this RADOS client is fenced (blocklisted); reconnect with a new client`, true, { cause: err });
    }
    return err;
  }

  /** The current holder from cls_lock (client, cookie, address) with its identity from the description. */
  async #holder(): Promise<RadosHolder | null> {
    let info;
    try {
      info = await this.#io.listLockers(this.oid, RADOS_LOCK_NAME);
    } catch (err) {
      if (errnoOf(err) === ENOENT) return null;
      throw this.#fencedOr(err, 'list lockers');
    }
    const locker = info.lockers[0];
    if (!locker) return null;
    const instanceId = Number(/^client\.(\d+)$/.exec(locker.client)?.[1] ?? -1);
    const description = await this.#descriptions().then((d) => d.get(locker.cookie), () => undefined);
    const desc = parseDescription(description);
    const owner: LockOwner = {
      node: desc?.node ?? '', instance: desc?.instance ?? '', pid: desc?.pid ?? 0, since: desc?.since ?? 0,
      token: locker.cookie, backend: 'rados', client: locker.client, addr: locker.addr,
    };
    return { key: `${locker.client}/${locker.cookie}`, owner, client: locker.client, instanceId, cookie: locker.cookie, addr: locker.addr };
  }

  /** cookie → description, through cls_lock get_info (rados_list_lockers does not return descriptions). */
  async #descriptions(): Promise<Map<string, string>> {
    const out = await this.#io.exec(this.oid, 'lock', 'get_info', encodeGetInfo(RADOS_LOCK_NAME));
    return new Map(decodeGetInfoReply(out).lockers.map((l) => [l.cookie, l.description]));
  }

  /** Blocklists the holder, then breaks its lock; false when someone else had broken it already. */
  async #fenceAndBreak(h: RadosHolder): Promise<boolean> {
    if (h.instanceId === this.#cluster.instanceId()) {
      throw new LockStateError(this.volumeId, `the lock is held by this RADOS client (${h.client}): not fencing ourselves`);
    }
    try {
      // librados waits for the osdmap with the blocklist entry before returning,
      // so our next operations carry it: an OSD applies it before serving them.
      await this.#cluster.blocklistAdd(h.addr, this.#fenceSeconds);
    } catch (err) {
      throw new LockFenceError(this.volumeId, `blocklisting ${h.client} at ${h.addr}: ${(err as Error).message}`, { cause: err });
    }
    this.#log.warn(`lock: fenced ${h.client} at ${h.addr} (${h.owner?.node || 'unknown node'}), breaking its lock`, { holder: h.owner });
    try {
      await this.#io.breakLock(this.oid, RADOS_LOCK_NAME, h.client, h.cookie);
      return true;
    } catch (err) {
      if (errnoOf(err) !== ENOENT) throw this.#fencedOr(err, 'break lock');
      return false; // another waiter broke it first
    }
  }

  #announceReleased(cookie: string): void {
    const msg: NotifyMessage = { v: 1, op: 'released', cookie };
    const p = this.#io.notify(this.oid, Buffer.from(JSON.stringify(msg)), this.#notifyTimeoutMs).catch(noop);
    this.#background.add(p);
    void p.finally(() => this.#background.delete(p));
  }

  // ------------------------------------------------------------ watch

  #ensureWatch(): Promise<RadosWatch> {
    if (this.#watch) return Promise.resolve(this.#watch);
    this.#watching ??= this.#openWatch().finally(() => (this.#watching = null));
    return this.#watching;
  }

  async #openWatch(): Promise<RadosWatch> {
    const ref: { watch: RadosWatch | null; early: RadosWatchEvent[] } = { watch: null, early: [] };
    const onEvent = (e: RadosWatchEvent) => {
      if (ref.watch) this.#onWatchEvent(ref.watch, e);
      else ref.early.push(e);
    };
    let watch: RadosWatch;
    try {
      watch = await this.#io.watch(this.oid, onEvent);
    } catch (err) {
      if (errnoOf(err) !== ENOENT) throw this.#fencedOr(err, 'watch');
      // A watch needs the object: stamp it (constant bytes, so racing writers agree).
      try {
        await this.#io.writeFull(this.oid, Buffer.from(JSON.stringify({ format: 'archipelago-lock', version: 1, volume: this.volumeId }) + '\n'));
        watch = await this.#io.watch(this.oid, onEvent);
      } catch (err2) {
        throw this.#fencedOr(err2, 'watch');
      }
    }
    if (this.#closed) {
      await watch.close();
      throw new LockStateError(this.volumeId, 'RADOS lock backend is closed');
    }
    ref.watch = watch;
    this.#watch = watch;
    for (const e of ref.early.splice(0)) this.#onWatchEvent(watch, e);
    return watch;
  }

  async #closeWatch(): Promise<void> {
    const watch = this.#watch ?? (await this.#watching?.catch(() => null)) ?? null;
    this.#watch = null;
    await watch?.close().catch(noop);
  }

  #onWatchEvent(watch: RadosWatch, e: RadosWatchEvent): void {
    if (e.type === 'error') {
      if (this.#watch === watch) this.#watch = null;
      void watch.close().catch(noop);
      this.#onWatchError(e.errno);
      return;
    }
    const msg = parseMessage(e.payload);
    const held = this.#held;
    let accepted = false;
    if (msg?.op === 'release-request' && msg.holder !== undefined) {
      if (held && msg.holder === held) {
        accepted = this.#sink?.releaseRequested({ from: msg.from ?? null, token: msg.token ?? '', receivedAt: performance.now() }) ?? false;
      } else if (this.#orphans.has(msg.holder)) {
        this.#retryOrphan(msg.holder);
      }
    } else if (msg?.op === 'released') {
      this.#sink?.changed();
    }
    const reply: NotifyMessage = { v: 1, op: 'ack', owner: held !== null, cookie: held ?? '', accepted };
    void watch.ack(e.notifyId, Buffer.from(JSON.stringify(reply))).catch(noop);
  }

  /**
   * The watch broke. 108: we are fenced. 107 and others: a blocklist, or a
   * watch that timed out (paused client, network): while we hold the lock,
   * re-watch and ask cls_lock (#recheck).
   */
  #onWatchError(errno: number): void {
    this.#log.warn(`lock: watch error ${errno}`);
    if (!this.#held || this.#stopped || this.#closed) return;
    if (errno === ESHUTDOWN) return this.#fail(new LockLostError(this.volumeId, 'watch: this client was fenced (blocklisted)', true));
    const p = this.#recheck(errno);
    this.#background.add(p);
    void p.finally(() => this.#background.delete(p));
  }

  /**
   * Re-watches and asks cls_lock until the cluster answers. Still ours: keep
   * it. Broken, fenced, or any error but a timeout: lost. A timeout (the
   * cluster, or the OSD of the lock object, unreachable) is asked again
   * every pollMs, holding the lock meanwhile. Safe: nobody can take the lock
   * without fencing us first (blocklist, then break), and the OSDs refuse a
   * fenced client's writes, so nothing we write meanwhile can land after a
   * new owner's; the answer, when it comes, is then "fenced" or "broken".
   */
  async #recheck(errno: number): Promise<void> {
    const what = `watch error ${errno === ENOTCONN ? '107 (ENOTCONN)' : errno}`;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.#ensureWatch();
        await this.verify();
        if (attempt > 1) this.#log.warn(`lock: ${what}: re-checked after ${attempt} attempts, still ours`);
        return;
      } catch (err) {
        if (!this.#held || this.#stopped || this.#closed) return;
        if (err instanceof LockLostError) return this.#fail(err);
        const lost = new LockLostError(this.volumeId, `${what}, and re-checking failed: ${(err as Error).message}`, errnoOf(err) === ESHUTDOWN, { cause: err });
        if (errnoOf(err) !== ETIMEDOUT) return this.#fail(lost);
        this.#log.warn(`lock: ${what}: re-checking timed out (${(err as Error).message}); asking again`);
        refreshOsdmap(this.#cluster);
        await new Promise((resolve) => setTimeout(resolve, this.pollMs));
        if (!this.#held || this.#stopped || this.#closed) return;
      }
    }
  }

  #retryOrphan(cookie: string): void {
    this.#orphans.delete(cookie);
    const p = this.#io.unlock(this.oid, RADOS_LOCK_NAME, cookie).then(() => this.#announceReleased(cookie), (err: unknown) => {
      const errno = errnoOf(err);
      if (errno !== ENOENT && errno !== ESHUTDOWN) this.#orphans.add(cookie);
    });
    this.#background.add(p);
    void p.finally(() => this.#background.delete(p));
  }

  #fail(err: LockLostError): void {
    this.#stopVerify();
    this.#sink?.lost(err);
  }

  #startVerify(): void {
    this.#stopVerify();
    if (this.#verifyMs <= 0) return;
    const tick = () => {
      this.#verifyTimer = undefined;
      if (!this.#held || this.#stopped) return;
      this.verify().then(
        () => {
          if (this.#held && !this.#stopped) this.#verifyTimer = setTimeout(tick, this.#verifyMs);
        },
        (err: unknown) => {
          if (!this.#held) return;
          if (err instanceof LockLostError) return this.#fail(err);
          this.#log.warn(`lock: verify: ${(err as Error).message}`);
          this.#verifyTimer = setTimeout(tick, this.#verifyMs);
        },
      );
    };
    this.#verifyTimer = setTimeout(tick, this.#verifyMs);
  }

  #stopVerify(): void {
    if (this.#verifyTimer) clearTimeout(this.#verifyTimer);
    this.#verifyTimer = undefined;
  }
}

function parseMessage(payload: Buffer): NotifyMessage | null {
  try {
    const m = JSON.parse(payload.toString('utf8')) as NotifyMessage;
    return m && m.v === 1 && typeof m.op === 'string' ? m : null;
  } catch {
    return null;
  }
}

function parseDescription(text: string | undefined): { node: string; instance: string; pid: number; since: number } | null {
  if (!text) return null;
  try {
    const d = JSON.parse(text) as Record<string, unknown>;
    if (d.v !== 1 || typeof d.node !== 'string' || typeof d.instance !== 'string') return null;
    return { node: d.node, instance: d.instance, pid: typeof d.pid === 'number' ? d.pid : 0, since: typeof d.since === 'number' ? d.since : 0 };
  } catch {
    return null;
  }
}
