/**
 * Fetching the newest osdmap after a request timed out.
 *
 * Why: librados learns of new osdmaps when its requests need one (a target
 * OSD down, a missing pool), not when they merely time out, and an OSD that
 * was marked down and booted again drops requests that carry an epoch from
 * before its boot. Once, after an OSD was paused and resumed
 * (test/integration/backend-faults-rados.test.ts), our requests kept timing
 * out for 150 s while a fresh client wrote after 4 s; it did not recur on
 * demand, so this is the standard remedy rather than a proven cause: after
 * a timeout we ask the mon for the newest map (rados_wait_for_latest_osdmap),
 * and the next requests carry it.
 */
import type { RadosCluster } from './binding.js';

/** At most one request per cluster this often, ms. */
const MIN_INTERVAL_MS = 1_000;

const state = new WeakMap<object, { busy: boolean; last: number }>();

/**
 * Asks `cluster` for the newest osdmap, in the background: at most one
 * request at a time and one a second; failures are ignored (the next
 * timeout asks again).
 */
export function refreshOsdmap(cluster: Pick<RadosCluster, 'waitForLatestOsdmap'>): void {
  let s = state.get(cluster);
  if (s === undefined) state.set(cluster, (s = { busy: false, last: -Infinity }));
  const now = performance.now();
  if (s.busy || now - s.last < MIN_INTERVAL_MS) return;
  s.busy = true;
  s.last = now;
  const done = () => { s.busy = false; };
  cluster.waitForLatestOsdmap().then(done, done);
}
