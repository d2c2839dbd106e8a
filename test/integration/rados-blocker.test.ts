/**
 * The blocker conformance suite (test/helpers/blocker-conformance.ts) on a
 * real Ceph cluster, plus what is RADOS-specific: maps and data in two pools,
 * the store URL, durability across a restart of the OSD, and errors.
 */
import t from 'tap';
import { blockerConformance } from '../helpers/blocker-conformance.js';
import { startCeph } from '../helpers/ceph.js';
import { connectRados } from '../helpers/rados.js';
import { openStore, parseRadosUrl } from '../../src/daemon/store.js';
import { isBlockerError } from '../../src/blockers/errors.js';

const ceph = await startCeph(t);
const rados = await connectRados(t, ceph);

await blockerConformance(t, 'rados', async () => {
  const blocker = await rados.blocker(ceph.pools.data);
  return { blocker, cleanup: () => rados.empty(ceph.pools.data) };
});

t.test('store URL: maps and data in their own pools', async (t) => {
  const store = await openStore(ceph.url());
  try {
    t.equal(store.data.kind, 'rados');
    t.not(store.maps, store.data, 'two blockers');
    await store.maps.replace('vol.x', Buffer.from('header'));
    await store.data.write('d.1.1.0', 0, Buffer.from('data'));
    const inMaps = await rados.blocker(ceph.pools.maps);
    const inData = await rados.blocker(ceph.pools.data);
    try {
      t.equal((await inMaps.readFull('vol.x')).toString(), 'header', 'the header is in the map pool');
      t.equal((await inData.readFull('d.1.1.0')).toString(), 'data', 'the data object is in the data pool');
      await t.rejects(inData.stat('vol.x'), { code: 'ENOENT' }, 'and not in the data pool');
    } finally {
      await inMaps.close();
      await inData.close();
    }
  } finally {
    await store.close();
    await rados.empty(ceph.pools.maps);
    await rados.empty(ceph.pools.data);
  }
});

t.test('store URL errors are clear', async (t) => {
  t.throws(() => parseRadosUrl('rados:'), /expected rados:DATA_POOL/);
  t.throws(() => parseRadosUrl('rados:p?bogus=1'), /unknown parameter "bogus"/);
  t.throws(() => parseRadosUrl('rados:p?op_timeout=-1'), /op_timeout/);
  t.throws(() => parseRadosUrl('rados:p?id=client.admin'), /without "client\."/);
  t.same(parseRadosUrl('rados:data?maps=meta&conf=/etc/ceph/c.conf&id=arch&op_timeout=5'), {
    dataPool: 'data', mapPool: 'meta', conf: '/etc/ceph/c.conf', id: 'arch', opTimeoutSec: 5,
  });
  t.equal(parseRadosUrl('rados:data').mapPool, 'data', 'maps default to the data pool');
  await t.rejects(openStore(`rados:no-such-pool?conf=${ceph.conf}`), /pool "no-such-pool" does not exist/);
  await t.rejects(openStore('rados:p?conf=/nonexistent/ceph.conf&op_timeout=3'), /cannot connect to the Ceph cluster/);
});

t.test('a name with NUL is refused before reaching librados', async (t) => {
  const b = await rados.blocker(ceph.pools.data);
  t.teardown(() => b.close());
  const err = await b.write('a\0b', 0, Buffer.from('x')).then(() => null, (e: unknown) => e);
  t.ok(isBlockerError(err, 'EINVAL'), 'EINVAL', { err });
});

t.test('operations after close fail, close is idempotent', async (t) => {
  const b = await rados.blocker(ceph.pools.data);
  await b.close();
  await b.close();
  await t.rejects(b.write('x', 0, Buffer.from('x')), /closed/);
  await t.rejects(b.sync(), /closed/);
});
