/**
 * Fetching the newest osdmap after a request timed out.
 *
 * Why: librados learns of new osdmaps when its requests need one (a target
 * OSD down, a missing pool), not when they merely time out. An OSD that was
 * marked down (paused, or cut off, past `mon osd report timeout`) and then
 * booted again drops requests that carry an epoch from before its boot, so
 * a client that missed the new map sees every request time out, for as long
 * as it runs, while a fresh client works at once (found with
 * test/integration/backend-faults-rados.test.ts). After a timeout we ask the
 * mon for the newest map (rados_wait_for_latest_osdmap); the next requests
 * carry it.
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
