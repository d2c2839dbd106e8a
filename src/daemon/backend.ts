/**
 * The daemon's guards around the store's blockers:
 *
 *   observed (metrics, serve.ts) ──▶ timeout ──▶ [faulty] ──▶ file | rados
 *
 * - timeout (blockers/timeout.ts): every backend operation is bounded, and
 *   an object whose timed-out write may still land is fenced until it does.
 * - faulty (blockers/faulty.ts): only under `serve --fault-injection`, for
 *   tests and drills; rules come from the admin socket (`faults`).
 *
 * One knob bounds both backends, `serve --backend-timeout SECONDS` (default
 * 30; 0: no bound from the daemon):
 *
 *   file store   the daemon's timer, at SECONDS.
 *   rados store  librados bounds each op itself (rados_osd_op_timeout, from
 *                the store URL's op_timeout, which defaults to SECONDS here
 *                when the URL names none) and cancels it in the client; the
 *                daemon's timer is a backstop at op_timeout + 5 s (for what
 *                librados does not bound, and ops of several round trips,
 *                e.g. punch = stat + zero). With op_timeout=0 (librados waits
 *                forever) the daemon's timer is SECONDS.
 *
 * When one blocker serves maps and data (a file store) it is wrapped once,
 * so rules, counters, fences and the bound on the pile of timed-out calls
 * still running (timeout.ts: past it the store is stalled, calls fail at
 * once) are shared; a RADOS store has one of each per pool.
 */
import { faultyBlocker, FaultController } from '../blockers/faulty.js';
import { withTimeouts, type TimeoutBlocker, type TimeoutStats } from '../blockers/timeout.js';
import type { Blocker } from '../blockers/blocker.js';
import { parseRadosUrl, type Store } from './store.js';
import type { Logger } from '../common/log.js';

export const DEFAULT_BACKEND_TIMEOUT_SEC = 30;
/** How far above librados' own op_timeout the daemon's backstop fires on RADOS. */
export const RADOS_BACKSTOP_SEC = 5;

export class BackendOptionError extends Error {
  readonly code = 'ARCH_E_USAGE';
}

export interface BackendGuardOptions {
  /** --backend-timeout in seconds; undefined: the default. */
  timeoutSec?: number;
  /** --fault-injection. */
  faultInjection?: boolean;
  /** Bounds on the timed-out calls still running, per blocker (timeout.ts; default DEFAULT_MAX_LATE, DEFAULT_MAX_LATE_BYTES). */
  maxLate?: number;
  maxLateBytes?: number;
  log: Logger;
}

export interface BackendStatus extends TimeoutStats {
  faultInjection: boolean;
}

export interface GuardedStore {
  store: Store;
  /** The fault rules, or null when fault injection is off. */
  faults: FaultController | null;
  /** The daemon's bound on one backend operation in ms (0: none). */
  timeoutMs: number;
  /** Timeout counters summed over the store's blockers (the bounds maxLate, maxLateBytes are per blocker; stalled: any is). */
  status(): BackendStatus;
}

/** Checks --backend-timeout: seconds, finite, ≥ 0 (fractions allowed, for tests). */
export function backendTimeoutSec(value: number | undefined): number {
  if (value === undefined) return DEFAULT_BACKEND_TIMEOUT_SEC;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || value > 86_400) {
    throw new BackendOptionError(`--backend-timeout ${String(value)}: expected seconds from 0 (no bound) to 86400`);
  }
  return value;
}

/**
 * The store URL to open: a rados: URL without op_timeout gets the backend
 * timeout (whole seconds, at least 1) so that librados and the daemon agree.
 * Other URLs, and a timeout of 0, leave it as it is.
 */
export function storeUrlWithTimeout(url: string, timeoutSec: number): string {
  if (!url.startsWith('rados:') || timeoutSec === 0) return url;
  const q = url.indexOf('?');
  if (q >= 0 && new URLSearchParams(url.slice(q + 1)).has('op_timeout')) return url;
  return `${url}${q >= 0 ? '&' : '?'}op_timeout=${Math.max(1, Math.ceil(timeoutSec))}`;
}

/** The daemon's timer for `url` (opened from storeUrlWithTimeout), in ms. */
export function guardTimeoutMs(url: string, timeoutSec: number): number {
  if (url.startsWith('rados:')) {
    const op = parseRadosUrl(url).opTimeoutSec;
    if (op > 0) return (op + RADOS_BACKSTOP_SEC) * 1000;
  }
  return Math.round(timeoutSec * 1000);
}

/** Wraps the store's blockers as the file comment draws. `store.url` is the URL it was opened from. */
export function guardStore(store: Store, o: BackendGuardOptions): GuardedStore {
  const timeoutSec = backendTimeoutSec(o.timeoutSec);
  const timeoutMs = guardTimeoutMs(store.url, timeoutSec);
  const faults = o.faultInjection ? new FaultController() : null;
  if (faults) {
    o.log.warn('FAULT INJECTION IS ON (serve --fault-injection): the admin socket can make backend operations fail, '
      + 'stall or hang. For tests and drills only — never on a production daemon.');
  }
  if (store.url.startsWith('rados:')) {
    const op = parseRadosUrl(store.url).opTimeoutSec;
    if (op > 0 && o.timeoutSec !== undefined && op !== timeoutSec) {
      o.log.info(`RADOS operations are bounded by the store URL's op_timeout=${op}; `
        + `the daemon's backstop fires ${RADOS_BACKSTOP_SEC} s later (--backend-timeout ${timeoutSec} applies only with op_timeout=0)`);
    }
  }
  const wrapped = new Map<Blocker, TimeoutBlocker>();
  const wrap = (b: Blocker): Blocker => {
    let w = wrapped.get(b);
    if (w === undefined) {
      w = withTimeouts(faults ? faultyBlocker(b, faults) : b, {
        timeoutMs, log: o.log.child({ component: 'backend' }), maxLate: o.maxLate, maxLateBytes: o.maxLateBytes,
      });
      wrapped.set(b, w);
    }
    return w;
  };
  let closing: Promise<void> | undefined;
  const guarded: Store = {
    ...store,
    maps: wrap(store.maps),
    data: wrap(store.data),
    // Hung injected calls fail first (a closing store starts no writes), then
    // each wrapper closes within one timeout; a store that does not answer is
    // left to the process exit rather than hanging the shutdown.
    close: () => (closing ??= (async () => {
      faults?.clear({ release: 'fail' });
      const results = await Promise.allSettled([...wrapped.values()].map((w) => w.close()));
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
      await store.close();
    })()),
  };
  return {
    store: guarded,
    faults,
    timeoutMs,
    status: () => {
      const all = [...wrapped.values()].map((w) => w.stats());
      const sum = all[0]!;
      for (const s of all.slice(1)) {
        for (const k of Object.keys(sum.timedOut) as (keyof TimeoutStats['timedOut'])[]) sum.timedOut[k] += s.timedOut[k];
        sum.late += s.late;
        sum.lateBytes += s.lateBytes;
        sum.stalled ||= s.stalled;
        sum.stalledRejections += s.stalledRejections;
        sum.fencedObjects += s.fencedObjects;
        sum.fenceWaits += s.fenceWaits;
        sum.lateSettled += s.lateSettled;
      }
      return { ...sum, faultInjection: faults !== null };
    },
  };
}
