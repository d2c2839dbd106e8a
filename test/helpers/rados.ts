/**
 * librados from tests: a connection to a test cluster (test/helpers/ceph.ts)
 * closed in the test's teardown, RADOS blockers over its pools, and emptying
 * a pool between cases.
 *
 *   const ceph = await startCeph(t);
 *   const rados = await connectRados(t, ceph);
 *   const blocker = await rados.blocker(ceph.pools.data);
 */
import { loadRados, type RadosCluster } from '../../src/blockers/rados/binding.js';
import { RadosBlocker } from '../../src/blockers/rados/blocker.js';
import type { CephCluster } from './ceph.js';

interface Teardown { teardown(fn: () => unknown): void }

export interface TestRados {
  cluster: RadosCluster;
  /** A new blocker over `pool` (its own io context); the caller closes it. */
  blocker(pool: string): Promise<RadosBlocker>;
  /** Removes every object of `pool`. */
  empty(pool: string): Promise<void>;
  /** Another connection to the same cluster (a second node), shut down in teardown. */
  connect(): Promise<RadosCluster>;
}

export async function connectRados(t: Teardown, ceph: CephCluster): Promise<TestRados> {
  const connect = async () => {
    const cluster = await loadRados().connect({ conf: ceph.conf, config: { rados_osd_op_timeout: '30', rados_mon_op_timeout: '30' } });
    t.teardown(() => cluster.shutdown());
    return cluster;
  };
  const cluster = await connect();
  return {
    cluster,
    connect,
    blocker: async (pool) => new RadosBlocker(await cluster.openPool(pool)),
    empty: async (pool) => {
      const b = new RadosBlocker(await cluster.openPool(pool));
      try {
        const names: string[] = [];
        for await (const name of b.list('')) names.push(name);
        await Promise.all(names.map((n) => b.remove(n)));
      } finally {
        await b.close();
      }
    },
  };
}
