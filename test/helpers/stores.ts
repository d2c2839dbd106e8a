/**
 * Which object store the volume tests run on, and what they need to look
 * inside it without knowing which it is.
 *
 *   ARCHIPELAGO_TEST_BACKEND=file (default) | rados
 *
 * `tempStore(t)` gives a fresh, empty store URL of that backend, cleaned up
 * in the test's teardown: a temp directory (file:DIR), or two fresh pools on
 * a real Ceph cluster (test/helpers/ceph.ts: the ARCHIPELAGO_TEST_CEPH cluster
 * when set, else one started for this test). scripts/test.sh runs the volume
 * tests once per backend.
 */
import { openStore } from '../../src/daemon/store.js';
import { startCeph } from './ceph.js';
import { tempFileStore } from './daemon.js';

interface Teardown { teardown(fn: () => unknown): void }

export type TestBackend = 'file' | 'rados';

export const TEST_BACKEND: TestBackend = (() => {
  const b = process.env.ARCHIPELAGO_TEST_BACKEND ?? 'file';
  if (b !== 'file' && b !== 'rados') throw new Error(`ARCHIPELAGO_TEST_BACKEND=${b}: expected file or rados`);
  return b;
})();

/** A fresh, empty store of the backend under test; its URL. */
export async function tempStore(t: Teardown): Promise<string> {
  if (TEST_BACKEND === 'file') return `file:${await tempFileStore(t)}`;
  const ceph = await startCeph(t);
  return ceph.url();
}

/** Names of the objects in the store (maps and data) that start with `prefix`, sorted. */
export async function listObjects(url: string, prefix: string): Promise<string[]> {
  const store = await openStore(url);
  try {
    const names = new Set<string>();
    for (const b of new Set([store.maps, store.data])) for await (const n of b.list(prefix)) names.add(n);
    return [...names].sort();
  } finally {
    await store.close();
  }
}
