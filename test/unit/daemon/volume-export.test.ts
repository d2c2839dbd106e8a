/**
 * VolumeProvider.list(): one store listing answers every NBD_OPT_LIST that
 * arrives within its cache time (any client may ask, and listing a file
 * store walks every fan-out directory), and a failed listing is not kept.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';
import { VolumeProvider } from '../../../src/daemon/volume-export.js';
import type { Store } from '../../../src/daemon/store.js';
import { createLogger } from '../../../src/common/log.js';

t.test('concurrent and repeated listings share one walk of the store; a failure is retried', async (t) => {
  let walks = 0;
  let fail = false;
  class CountingBlocker extends MemoryBlocker {
    override list(prefix: string): AsyncIterable<string> {
      walks++;
      if (fail) throw Object.assign(new Error('store down'), { code: 'EIO' });
      return super.list(prefix);
    }
  }
  const blocker = new CountingBlocker();
  await (await VolumeMap.create(blocker, 'v', { size: 65536, objectSize: 65536 })).close();
  const maps = blocker;
  const store: Store = { url: 'memory:', maps, data: blocker, close: async () => {} };
  const provider = new VolumeProvider(store, createLogger({ level: 'error', write: () => {} }));
  const [a, b] = await Promise.all([provider.list(), provider.list()]);
  t.same(a, [{ name: 'v' }]);
  t.same(b, a);
  t.same(await provider.list(), a, 'a third, right after');
  t.equal(walks, 1, 'one walk of the store for all three');

  const fresh = new VolumeProvider(store, createLogger({ level: 'error', write: () => {} }));
  fail = true;
  await t.rejects(fresh.list(), { message: /store down/ });
  fail = false;
  t.same(await fresh.list(), [{ name: 'v' }], 'the next request after a failure walks again');
});
