/**
 * The map model (test/helpers/map-model.ts: snapshots, clones, images,
 * removal, GC, restarts) on a real Ceph cluster. A crash abandons every
 * Volume (flushed) and the librados connection without closing them, then a
 * new connection — a new node — carries on: RADOS acknowledged every write
 * durably, so the model must hold exactly.
 */
import t from 'tap';
import type { RadosCluster } from '../../src/blockers/rados/binding.js';
import { RadosBlocker } from '../../src/blockers/rados/blocker.js';
import { startCeph } from '../helpers/ceph.js';
import { modelSeeds, modelSteps, runMapModel, type ModelStorage } from '../helpers/map-model.js';
import { connectRados, type TestRados } from '../helpers/rados.js';

const ceph = await startCeph(t);
const rados = await connectRados(t, ceph);

class RadosStorage implements ModelStorage {
  constructor(
    public blocker: RadosBlocker,
    private cluster: RadosCluster,
    private readonly test: TestRados,
  ) {}

  async reopen(): Promise<void> {
    await this.blocker.close();
    this.blocker = new RadosBlocker(await this.cluster.openPool(ceph.pools.data));
  }

  async crash(abandon: () => Promise<void>): Promise<string> {
    // The dead node's connection stays open, unused (as a dead client lingers
    // until the OSDs time it out); its Volumes are dropped without closing.
    void abandon;
    this.cluster = await this.test.connect();
    this.blocker = new RadosBlocker(await this.cluster.openPool(ceph.pools.data));
    return `crash (new client ${this.cluster.instanceId()})`;
  }

  async destroy(): Promise<void> {
    await this.blocker.close();
    await this.test.empty(ceph.pools.data);
  }
}

await runMapModel(t, modelSeeds([11, 12]), modelSteps(150), async () => {
  return new RadosStorage(await rados.blocker(ceph.pools.data), rados.cluster, rados);
});
