/**
 * A Blocker wrapper that bounds every operation in time, and fences an
 * object while an operation on it that timed out may still land.
 *
 *   caller ──▶ timeout ──▶ inner blocker (file, rados; faulty.ts in drills)
 *
 *   call ──▶ object fenced? ──yes──▶ wait until the fence lifts ─┐
 *               └─no──────────────────────────────────────────────┴▶ issue ──▶ settled in time? ──yes──▶ its result
 *   (one deadline, taken at the call, covers the wait and the operation)          └─no──▶ ETIMEDOUT
 *                                                                                          (a mutation that is
 *                                                                                          still running fences
 *                                                                                          its object until it
 *                                                                                          settles)
 *
 * Why the fence. A timed-out operation cannot be cancelled: a pwrite sits
 * in the libuv pool, a RADOS op may be on the wire. It may land later, after
 * the caller reported the failure and moved on. If a newer write to the same
 * object went out meanwhile, the stale one could land on top of it, and a
 * write the client saw acknowledged would be lost; a late map chunk could
 * overwrite a newer one. So once a write, replace, punch or remove times out
 * while still running, its object is fenced: every later operation on that
 * object (reads too: they would see bytes change with no write) waits until
 * the late one settles, within its own deadline — so while the backend stays
 * stuck they fail ETIMEDOUT in bounded time without being issued, and once it
 * settles they run in order behind it. Nothing has to be cleared by hand:
 * the object recovers when the backend does. Other objects are unaffected.
 *
 * The pile. A store that stops answering for good leaves every timed-out
 * call running below, each holding its buffer (a write's data, a read's
 * target) and, on a file store, a slot in libuv's queue. So the pile is
 * bounded: while `maxLate` timed-out operations, or `maxLateBytes` of their
 * buffers, are still outstanding, the store counts as stalled and every new
 * call fails at once with ETIMEDOUT ("backend stalled: …"), never issued —
 * failing is always safe, it acknowledges nothing. When the store answers
 * again the late calls settle, the pile drains below the bounds and calls
 * are issued again, by themselves. Calls already waiting or running go on.
 *
 * Not fenced: `sync` (making data durable late is harmless, and a sync does
 * not wait for a fenced write: the write was not acknowledged, so no flush
 * promises it) and `list`. Late reads and syncs are counted but fence nothing.
 *
 * What the caller must not do: reuse the `target` of a read or the `data` of
 * a write that rejected with ETIMEDOUT — the late operation may still fill or
 * read it. Every caller in src/ allocates these per request.
 *
 * What the map layer does about a map update that failed but may have landed
 * (the stored chunk or header may be the old or the new one) is the mapper's
 * and composer's business: mapper/volume-map.ts (unsettled indexes, header
 * behind) and compose/volume.ts (settle before writing in place).
 *
 * RADOS: librados bounds each op itself (store URL op_timeout →
 * rados_osd_op_timeout) and cancels it in the client; the daemon sets this
 * wrapper a little above that as a backstop (src/daemon/backend.ts). An op
 * already sent to an OSD that is paused may still be applied when it resumes;
 * the OSD applies one client's ops to an object in the order it receives
 * them, and nothing newer can be ahead of it on that connection.
 *
 * Timers: one coarse interval (STYLE.md habit 10) scans a FIFO of deadlines
 * (the timeout is fixed, so deadlines arrive in order); it runs only while
 * operations are in flight. Expiry is late by at most one tick
 * (timeout/20, between 5 and 250 ms).
 *
 * Imports only the blocker layer and the logger.
 */
import { performance } from 'node:perf_hooks';
import type { Blocker, BlockerCapabilities, ObjectStat } from './blocker.js';
import { BlockerError } from './errors.js';
import type { FaultOp } from './faulty.js';
import { silentLogger, type Logger } from '../common/log.js';

export interface TimeoutOptions {
  /** Bound on each operation in ms; 0 turns the wrapper into a pass-through. */
  timeoutMs: number;
  /** Told (warn) when a timed-out operation finally settles, and when the store stalls or recovers. */
  log?: Logger;
  /** Timed-out operations still running at which the store counts as stalled (default DEFAULT_MAX_LATE; 0: no bound). */
  maxLate?: number;
  /** Bytes their buffers hold at which it does (default DEFAULT_MAX_LATE_BYTES; 0: no bound). */
  maxLateBytes?: number;
}

/** Default bound on timed-out operations still running (per wrapper: per pool; a file store has one). */
export const DEFAULT_MAX_LATE = 1024;
/** Default bound on the bytes they hold: writes' data and reads' targets. */
export const DEFAULT_MAX_LATE_BYTES = 256 * 1024 * 1024;

export interface TimeoutStats {
  timeoutMs: number;
  /** Operations that timed out, by operation. */
  timedOut: Record<FaultOp, number>;
  /** Timed-out operations still running in the backend now. */
  late: number;
  /** Bytes of their buffers (write and replace data, read targets). */
  lateBytes: number;
  /** The bounds on `late` and `lateBytes` (0: none). */
  maxLate: number;
  maxLateBytes: number;
  /** True while a bound is reached: new calls fail at once. */
  stalled: boolean;
  /** Calls failed at once because the store was stalled. */
  stalledRejections: number;
  /** Objects fenced now (a timed-out mutation of theirs still runs). */
  fencedObjects: number;
  /** Calls that had to wait at a fence. */
  fenceWaits: number;
  /** Timed-out operations that settled later (landed or failed). */
  lateSettled: number;
}

/** A deadline in the queue; `expire` is null once the call settled or expired. */
interface Deadline {
  at: number;
  expire: (() => void) | null;
}

/**
 * Deadlines in arrival order (so in deadline order: one timeout for all),
 * expired by one coarse interval. A call that settles leaves at once: held
 * until its deadline, every call's record outlived the young generation and
 * was promoted, and full GCs took a tenth of the daemon under 4 KiB reads.
 */
class DeadlineQueue {
  /** A Set keeps insertion order and deletes in O(1). */
  readonly #items = new Set<Deadline>();
  #timer: NodeJS.Timeout | null = null;

  constructor(private readonly tickMs: number) {}

  add(d: Deadline): void {
    this.#items.add(d);
    this.#timer ??= setInterval(() => this.#tick(), this.tickMs);
  }

  /** The call settled: its deadline is dropped. */
  delete(d: Deadline): void {
    this.#items.delete(d);
  }

  #tick(): void {
    const now = performance.now();
    for (const d of this.#items) {
      if (d.at > now) break;
      this.#items.delete(d);
      const expire = d.expire;
      d.expire = null;
      expire?.();
    }
    if (this.#items.size === 0) {
      clearInterval(this.#timer!);
      this.#timer = null;
    }
  }
}

/** Wraps `inner` so that no operation takes longer than `timeoutMs`. */
export function withTimeouts(inner: Blocker, options: TimeoutOptions): TimeoutBlocker {
  return new TimeoutBlocker(inner, options);
}

const MUTATES = true;
const FENCED = true;

export class TimeoutBlocker implements Blocker {
  readonly #ms: number;
  readonly #log: Logger;
  readonly #queue: DeadlineQueue;
  /** Per object: its timed-out mutations still running. */
  readonly #fences = new Map<string, Set<Promise<unknown>>>();
  /** Every timed-out operation still running → the bytes it holds (close waits for them, bounded). */
  readonly #late = new Map<Promise<unknown>, number>();
  #lateBytes = 0;
  readonly #maxLate: number;
  readonly #maxLateBytes: number;
  /** Whether a bound on the pile is reached: kept to log each change once. */
  #stalled = false;
  readonly #stats: TimeoutStats;
  #closing: Promise<void> | undefined;

  constructor(private readonly inner: Blocker, options: TimeoutOptions) {
    this.#ms = Math.max(0, options.timeoutMs);
    this.#log = options.log ?? silentLogger;
    this.#queue = new DeadlineQueue(Math.min(250, Math.max(5, Math.round(this.#ms / 20))));
    this.#maxLate = Math.max(0, options.maxLate ?? DEFAULT_MAX_LATE);
    this.#maxLateBytes = Math.max(0, options.maxLateBytes ?? DEFAULT_MAX_LATE_BYTES);
    this.#stats = {
      timeoutMs: this.#ms,
      timedOut: { read: 0, write: 0, replace: 0, readFull: 0, punch: 0, remove: 0, stat: 0, list: 0, sync: 0 },
      late: 0, lateBytes: 0, maxLate: this.#maxLate, maxLateBytes: this.#maxLateBytes, stalled: false, stalledRejections: 0,
      fencedObjects: 0, fenceWaits: 0, lateSettled: 0,
    };
  }

  get kind(): string { return this.inner.kind; }
  get capabilities(): BlockerCapabilities { return this.inner.capabilities; }

  /** A snapshot of the counters. */
  stats(): TimeoutStats {
    return {
      ...this.#stats, timedOut: { ...this.#stats.timedOut }, late: this.#late.size, lateBytes: this.#lateBytes,
      stalled: this.#stalled, fencedObjects: this.#fences.size,
    };
  }

  /** True while a timed-out mutation of `name` may still land. */
  isFenced(name: string): boolean {
    return this.#fences.has(name);
  }

  /**
   * Runs `call` within the deadline: fails at once while the store is
   * stalled, waits at `name`'s fence first when `fenced`, and fences `name`
   * if `mutates` and the call outlives it. `bytes`: the buffer it holds.
   */
  #run<T>(op: FaultOp, name: string, mutates: boolean, fenced: boolean, bytes: number, call: () => Promise<T>): Promise<T> {
    if (this.#ms === 0) return call();
    if (this.#stalled) {
      this.#stats.stalledRejections++;
      return Promise.reject(new BlockerError('ETIMEDOUT', op, name, `backend stalled: ${this.#pile()}; `
        + 'not issued, new operations fail until the store answers again'));
    }
    return new Promise<T>((resolve, reject) => {
      let issued: Promise<T> | null = null;
      const d: Deadline = { at: performance.now() + this.#ms, expire: null };
      d.expire = () => {
        this.#stats.timedOut[op]++;
        if (issued === null) {
          reject(new BlockerError('ETIMEDOUT', op, name,
            `not issued within ${this.#ms} ms: an earlier timed-out write to this object has not settled yet (fenced)`));
          return;
        }
        this.#lateOp(op, name, mutates, bytes, issued);
        reject(new BlockerError('ETIMEDOUT', op, name, `no answer from the ${this.inner.kind} store within ${this.#ms} ms`));
      };
      const queue = this.#queue;
      queue.add(d);
      const start = () => {
        if (d.expire === null) return; // expired at the fence: never issued
        let p: Promise<T>;
        try {
          p = call();
        } catch (err) {
          p = Promise.reject(err);
        }
        issued = p;
        p.then(
          (v) => { if (d.expire !== null) { d.expire = null; queue.delete(d); resolve(v); } },
          (e: unknown) => { if (d.expire !== null) { d.expire = null; queue.delete(d); reject(e); } });
      };
      if (fenced && this.#fences.has(name)) {
        this.#stats.fenceWaits++;
        void this.#fenceLifted(name).then(start);
      } else {
        start();
      }
    });
  }

  /** Tracks a timed-out operation until it settles; a mutation fences its object meanwhile. */
  #lateOp(op: FaultOp, name: string, mutates: boolean, bytes: number, p: Promise<unknown>): void {
    const timedOutAt = performance.now();
    this.#late.set(p, bytes);
    this.#lateBytes += bytes;
    this.#checkStall();
    let fence: Set<Promise<unknown>> | undefined;
    if (mutates) {
      fence = this.#fences.get(name);
      if (fence === undefined) this.#fences.set(name, fence = new Set());
      fence.add(p);
    }
    const settled = (outcome: string) => () => {
      this.#late.delete(p);
      this.#lateBytes -= bytes;
      this.#stats.lateSettled++;
      if (fence !== undefined) {
        fence.delete(p);
        if (fence.size === 0 && this.#fences.get(name) === fence) this.#fences.delete(name);
      }
      this.#log.warn(`${op} ${JSON.stringify(name)}: settled (${outcome}) ${Math.round(performance.now() - timedOutAt)} ms after it timed out`
        + (mutates ? '; the object is no longer fenced' : ''), { op, object: name, outcome });
      this.#checkStall();
    };
    p.then(settled('done'), settled('failed'));
  }

  /** What is outstanding, against the bounds, for messages. */
  #pile(): string {
    const mib = (n: number) => `${(n / (1024 * 1024)).toFixed(1)} MiB`;
    return `${this.#late.size} timed-out operations (${mib(this.#lateBytes)}) still outstanding in the ${this.inner.kind} store`
      + ` (bounds: ${this.#maxLate || 'none'} operations, ${this.#maxLateBytes ? mib(this.#maxLateBytes) : 'no bytes bound'})`;
  }

  /** Enters or leaves the stalled state as the pile crosses a bound; logs each change. */
  #checkStall(): void {
    const stalled = (this.#maxLate > 0 && this.#late.size >= this.#maxLate)
      || (this.#maxLateBytes > 0 && this.#lateBytes >= this.#maxLateBytes);
    if (stalled === this.#stalled) return;
    this.#stalled = stalled;
    if (stalled) this.#log.error(`backend stalled: ${this.#pile()}; new operations fail at once until it answers again`);
    else this.#log.warn(`backend answering again: ${this.#pile()}; operations are issued again`);
  }

  /** Resolves once no timed-out mutation of `name` is running. */
  async #fenceLifted(name: string): Promise<void> {
    for (let f = this.#fences.get(name); f !== undefined; f = this.#fences.get(name)) await Promise.allSettled([...f]);
  }

  read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    return this.#run('read', name, !MUTATES, FENCED, length, () => this.inner.read(name, offset, length, target));
  }

  write(name: string, offset: number, data: Buffer): Promise<void> {
    return this.#run('write', name, MUTATES, FENCED, data.length, () => this.inner.write(name, offset, data));
  }

  replace(name: string, data: Buffer): Promise<void> {
    return this.#run('replace', name, MUTATES, FENCED, data.length, () => this.inner.replace(name, data));
  }

  readFull(name: string): Promise<Buffer> {
    return this.#run('readFull', name, !MUTATES, FENCED, 0, () => this.inner.readFull(name));
  }

  punch(name: string, offset: number, length: number): Promise<void> {
    return this.#run('punch', name, MUTATES, FENCED, 0, () => this.inner.punch(name, offset, length));
  }

  remove(name: string): Promise<void> {
    return this.#run('remove', name, MUTATES, FENCED, 0, () => this.inner.remove(name));
  }

  stat(name: string): Promise<ObjectStat> {
    return this.#run('stat', name, !MUTATES, FENCED, 0, () => this.inner.stat(name));
  }

  sync(names?: Iterable<string>): Promise<void> {
    return this.#run('sync', '*', !MUTATES, !FENCED, 0, () => this.inner.sync(names));
  }

  /** Each step of the listing is bounded; a listing left on a timeout is closed once its step settles. */
  async *list(prefix: string): AsyncIterable<string> {
    const it = this.inner.list(prefix)[Symbol.asyncIterator]();
    let finished = false;
    try {
      for (;;) {
        const r = await this.#run('list', prefix, !MUTATES, !FENCED, 0, () => it.next());
        if (r.done) { finished = true; return; }
        yield r.value;
      }
    } finally {
      if (!finished) void Promise.resolve().then(() => it.return?.()).catch(() => {});
    }
  }

  /**
   * Waits (at most one timeout) for late operations, then closes the inner
   * blocker within one timeout: a stuck backend must not hang the shutdown.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#ms === 0) return this.inner.close();
      const bound = <T>(p: Promise<T>, what: string): Promise<T | void> => {
        let timer: NodeJS.Timeout | undefined;
        const expired = new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new BlockerError('ETIMEDOUT', 'close', what, `no answer within ${this.#ms} ms`)), this.#ms);
        });
        return Promise.race([p, expired]).finally(() => clearTimeout(timer));
      };
      if (this.#late.size > 0) {
        this.#log.warn(`closing with ${this.#late.size} timed-out operations still running; waiting up to ${this.#ms} ms`);
        await bound(Promise.allSettled([...this.#late.keys()]), this.inner.kind).catch(() => undefined);
      }
      await bound(this.inner.close(), this.inner.kind);
    })();
    return this.#closing;
  }
}
