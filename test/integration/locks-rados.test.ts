/**
 * The RADOS lock on a real Ceph cluster (test/helpers/ceph.ts), with
 * clients in this process (each its own RADOS connection: its own node)
 * and in a child process (test/helpers/lock-child.ts):
 *
 * - exclusive between two clients; the owner's identity comes back from the
 *   cls_lock description and matches `rados lock info`;
 * - a release wakes the waiter through a notify; a handover by notify;
 *   handover latency p50/p99 over 50 handovers;
 * - a holder with no watch is fenced (blocklisted) BEFORE its lock is
 *   broken, and its writes then fail with 108 (EFENCED);
 * - a lock broken behind the owner's back (no fence) is noticed by its
 *   periodic assert_locked;
 * - breakLock: refuses a live holder, fences with force;
 * - a child SIGKILLed: taken over once its watch times out, after fencing;
 * - a child SIGSTOPped: while its watch lives it is "unresponsive" and left
 *   alone; once the watch times out it is fenced and taken over; after
 *   SIGCONT its late write is refused by the OSD with 108 and it is lost.
 *
 * The cluster is this test's own: it lowers osd_client_watch_timeout to 5 s
 * (default 30 s, which is how long a dead holder blocks takeovers in
 * production, as with RBD); clients ping their watches every second
 * (objecter_tick_interval 1) so live watches never time out.
 */
import t from 'tap';
import { loadRados, type RadosCluster } from '../../src/blockers/rados/binding.js';
import { RadosBlocker } from '../../src/blockers/rados/blocker.js';
import { LockBusyError } from '../../src/locks/errors.js';
import { RADOS_LOCK_NAME, RadosLockBackend, type RadosLockOptions } from '../../src/locks/rados-backend.js';
import { VolumeLock, type ReleaseHandler } from '../../src/locks/volume-lock.js';
import { startCeph } from '../helpers/ceph.js';
import { percentiles, spawnLockChild } from '../helpers/lock-children.js';

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const WATCH_TIMEOUT_S = 5;
const ceph = await startCeph(t, { exclusive: true });
const set = await ceph.ceph(['config', 'set', 'osd', 'osd_client_watch_timeout', String(WATCH_TIMEOUT_S)]);
if (set.code !== 0) throw new Error(`ceph config set: ${set.stderr}`);

const OPTS: RadosLockOptions = { pollMs: 100, notifyTimeoutMs: 1000, verifyMs: 2000, fenceSeconds: 600 };
let volumes = 0;
const newVolume = () => `0000a11ce0000${(++volumes).toString(16).padStart(3, '0')}`;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface Node {
  cluster: RadosCluster;
  lock: VolumeLock;
  backend: RadosLockBackend;
  data: RadosBlocker;
}

async function connect(tt: Tap): Promise<RadosCluster> {
  const cluster = await loadRados().connect({
    conf: ceph.conf, config: { rados_osd_op_timeout: '30', rados_mon_op_timeout: '30', objecter_tick_interval: '1' },
  });
  tt.teardown(() => cluster.shutdown());
  return cluster;
}

async function node(tt: Tap, name: string, volumeId: string, onReleaseRequested?: ReleaseHandler, opts: RadosLockOptions = OPTS): Promise<Node> {
  const cluster = await connect(tt);
  const maps = await cluster.openPool(ceph.pools.maps);
  const data = new RadosBlocker(await cluster.openPool(ceph.pools.data));
  const backend = new RadosLockBackend(maps, cluster, volumeId, opts);
  const lock = new VolumeLock(backend, { identity: { node: name, instance: `${name}-i` }, onReleaseRequested });
  tt.teardown(() => lock.close().catch(() => undefined));
  return { cluster, lock, backend, data };
}

async function blocklisted(addr: string): Promise<boolean> {
  // Pacific prints the blocklist and the (empty) range blocklist: two JSON arrays back to back.
  const r = await ceph.ceph(['osd', 'blocklist', 'ls', '-f', 'json']);
  const listed = [...r.stdout.matchAll(/"addr":"([^"]+)"/g)].map((m) => m[1]!.replace(/^(v1|v2|any):/, ''));
  return listed.includes(addr.replace(/^(v1|v2|any):/, ''));
}

t.test('exclusive between two clients; the owner as the description says, and as `rados lock info` says', async (t) => {
  const vol = newVolume();
  const a = await node(t, 'node-a', vol);
  const b = await node(t, 'node-b', vol);
  await a.lock.acquire();
  t.ok(a.lock.checkHeld());
  t.equal(a.lock.validUntil, Infinity, 'no lease on RADOS: fencing is the store\'s');
  const err = await b.lock.acquire({ wait: false }).catch((e: unknown) => e);
  t.type(err, LockBusyError);
  t.match(err, { holder: { node: 'node-a', instance: 'node-a-i', client: `client.${a.cluster.instanceId()}` } });
  const owner = await b.lock.owner();
  t.match(owner, {
    node: 'node-a', instance: 'node-a-i', pid: process.pid, backend: 'rados', token: a.lock.acquisition!.token,
    client: `client.${a.cluster.instanceId()}`,
  });
  t.ok(owner!.addr!.endsWith(a.cluster.addrs()), 'the address fencing would blocklist');
  const info = await ceph.rados(['-p', ceph.pools.maps, 'lock', 'info', `lock.${vol}`, RADOS_LOCK_NAME]);
  const parsed = JSON.parse(info.stdout) as { type: string; lockers: { name: string; cookie: string; description: string }[] };
  t.equal(parsed.type, 'exclusive');
  t.equal(parsed.lockers[0]!.cookie, owner!.token, 'rados lock info: same cookie');
  t.match(JSON.parse(parsed.lockers[0]!.description), { v: 1, volume: vol, node: 'node-a', instance: 'node-a-i' }, 'and the description');
  await a.lock.release();
  t.equal(await b.lock.owner(), null);
});

t.test('a release wakes the waiter through a notify; a handover through notify', async (t) => {
  const vol = newVolume();
  let requested = 0;
  const a = await node(t, 'node-a', vol);
  const b = await node(t, 'node-b', vol, async () => {
    requested++;
    await sleep(20); // drain
  }, { ...OPTS, pollMs: 10_000 });
  await a.lock.acquire();
  const waiting = b.lock.acquire();
  await sleep(200);
  const released = performance.now();
  await a.lock.release();
  await waiting;
  const woke = performance.now() - released;
  t.ok(woke < 2000, `b woken ${Math.round(woke)} ms after the release, not after its pollMs of 10 s`);
  const start = performance.now();
  await a.lock.acquire({ requestHandover: true, wait: 10_000 });
  t.comment(`handover with a 20 ms drain: ${Math.round(performance.now() - start)} ms`);
  t.equal(requested, 1, "b's handler drained once, then b released");
  t.notOk(b.lock.checkHeld());
  t.equal(a.lock.state, 'owner');
});

t.test('handover latency over 50 handovers', async (t) => {
  const vol = newVolume();
  const a = await node(t, 'node-a', vol, () => undefined);
  const b = await node(t, 'node-b', vol, () => undefined);
  await a.lock.acquire();
  const times: number[] = [];
  let [from, to] = [a, b];
  for (let i = 0; i < 50; i++) {
    const start = performance.now();
    await to.lock.acquire({ requestHandover: true, wait: 10_000 });
    times.push(performance.now() - start);
    if (from.lock.checkHeld()) t.fail('two owners');
    [from, to] = [to, from];
  }
  const p = percentiles(times);
  t.comment(`RADOS handover: p50 ${p.p50.toFixed(1)} ms, p99 ${p.p99.toFixed(1)} ms, max ${p.max.toFixed(1)} ms over ${p.n}`);
  t.ok(p.p50 < 100, 'p50 under 100 ms');
});

t.test('a holder without a watch is fenced before its lock is broken; its writes then fail 108', async (t) => {
  const vol = newVolume();
  const a = await node(t, 'node-a', vol);
  const b = await node(t, 'node-b', vol);
  await a.lock.acquire();
  await a.data.write(`d.${vol}`, 0, Buffer.from('from a'));
  const addr = a.cluster.addrs();
  t.notOk(await blocklisted(addr), 'not blocklisted yet');
  await a.lock.destroy(); // stops its watch: to others it is dead; its client still runs
  await b.lock.acquire({ wait: false });
  t.equal(b.lock.state, 'owner', 'taken over at once: the store tells a dead holder from a slow one');
  t.ok(await blocklisted(addr), "a's address is on the blocklist");
  await t.rejects(a.data.write(`d.${vol}`, 0, Buffer.from('late a')), { code: 'EFENCED', cause: { errno: 108 } }, "a's late write: refused by the OSD");
  await b.data.write(`d.${vol}`, 0, Buffer.from('from b'));
  t.equal((await b.data.readFull(`d.${vol}`)).toString(), 'from b');
});

t.test('a lock broken behind the owner (no fence) is noticed by assert_locked', async (t) => {
  const vol = newVolume();
  const a = await node(t, 'node-a', vol, undefined, { ...OPTS, verifyMs: 200 });
  await a.lock.acquire();
  const lost = new Promise((r) => a.lock.once('lost', r));
  const other = await connect(t);
  const io = await other.openPool(ceph.pools.maps);
  await io.breakLock(`lock.${vol}`, RADOS_LOCK_NAME, `client.${a.cluster.instanceId()}`, a.lock.acquisition!.token);
  t.match(await lost, { code: 'ARCH_E_LOCK_LOST', message: /broken/ });
  t.notOk(a.lock.checkHeld());
  await a.lock.release();
  t.equal(a.lock.state, 'unlocked');
});

t.test('breakLock: refuses a live holder, fences it with force', async (t) => {
  const vol = newVolume();
  const a = await node(t, 'node-a', vol);
  const admin = await node(t, 'admin', vol);
  await a.lock.acquire();
  await t.rejects(admin.lock.breakLock(), { code: 'ARCH_E_LOCK_BUSY', message: /alive; force/ });
  const lost = new Promise((r) => a.lock.once('lost', r));
  t.match(await admin.lock.breakLock({ force: true }), { node: 'node-a' });
  t.ok(await blocklisted(a.cluster.addrs()));
  t.match(await lost, { code: 'ARCH_E_LOCK_LOST' }, 'the fenced owner learns it (watch error / 108)');
  t.equal(await admin.lock.owner(), null);
});

t.test('handover between processes, both ways', async (t) => {
  const vol = newVolume();
  const c = spawnLockChild(t, {
    backend: 'rados', volumeId: vol, node: 'child', instance: 'h1',
    rados: { conf: ceph.conf, mapsPool: ceph.pools.maps, dataPool: ceph.pools.data, ...OPTS },
  });
  await c.waitFor((e) => e.event === 'owner', 20_000, 'child owner');
  const b = await node(t, 'node-b', vol, () => undefined);
  for (let round = 0; round < 3; round++) {
    const from = c.events.length;
    const start = performance.now();
    await b.lock.acquire({ requestHandover: true, wait: 10_000 });
    t.comment(`round ${round}: child → parent in ${Math.round(performance.now() - start)} ms`);
    await c.waitFor((e) => e.event === 'release-requested', 2000, 'child heard the request', from);
    const back = c.events.length;
    c.send('acquire');
    await c.waitFor((e) => e.event === 'owner', 10_000, 'child owner again', back);
    t.notOk(b.lock.checkHeld(), 'parent → child: the parent may not write any more');
  }
  c.send('exit');
  await c.exited;
});

t.test('SIGKILL: the child holder dies; taken over after its watch times out, fenced first', async (t) => {
  const vol = newVolume();
  const c = spawnLockChild(t, {
    backend: 'rados', volumeId: vol, node: 'child', instance: 'k1',
    rados: { conf: ceph.conf, mapsPool: ceph.pools.maps, dataPool: ceph.pools.data, ...OPTS },
  });
  const ready = await c.waitFor((e) => e.event === 'ready', 20_000, 'child ready');
  await c.waitFor((e) => e.event === 'owner', 20_000, 'child owner');
  const b = await node(t, 'node-b', vol);
  const waiting = b.lock.acquire({ wait: 30_000 });
  await sleep(300);
  const killed = performance.now();
  c.signal('SIGKILL');
  await waiting;
  const took = performance.now() - killed;
  t.comment(`takeover ${Math.round(took)} ms after SIGKILL (osd_client_watch_timeout ${WATCH_TIMEOUT_S} s)`);
  t.ok(took >= (WATCH_TIMEOUT_S - 1.5) * 1000, 'not before the watch timed out (pings every 1 s)');
  t.ok(await blocklisted(ready.addr as string), "the dead child's address was blocklisted");
  t.match(await b.lock.owner(), { node: 'node-b' });
});

t.test('SIGSTOP: unresponsive while its watch lives, fenced after; after SIGCONT its late write fails 108', async (t) => {
  const vol = newVolume();
  const c = spawnLockChild(t, {
    backend: 'rados', volumeId: vol, node: 'child', instance: 's1',
    rados: { conf: ceph.conf, mapsPool: ceph.pools.maps, dataPool: ceph.pools.data, ...OPTS },
  });
  const ready = await c.waitFor((e) => e.event === 'ready', 20_000, 'child ready');
  await c.waitFor((e) => e.event === 'owner', 20_000, 'child owner');
  await c.waitFor((e) => e.event === 'beat', 5_000, 'child heartbeat');
  const b = await node(t, 'node-b', vol);
  const stopped = performance.now();
  c.signal('SIGSTOP');
  await sleep(500);
  await t.rejects(b.lock.acquire({ wait: 1500 }), { code: 'ARCH_E_LOCK_BUSY', message: /unresponsive/ },
    'while its watch lives, a paused holder is not fenced');
  await b.lock.acquire({ wait: 30_000 });
  const took = performance.now() - stopped;
  t.comment(`paused holder fenced and taken over ${Math.round(took)} ms after SIGSTOP`);
  t.ok(await blocklisted(ready.addr as string), 'the paused child was blocklisted');
  const obj = `hb.${vol}`;
  await b.data.replace(obj, Buffer.from('node-b owns it'));
  const from = c.events.length;
  c.signal('SIGCONT');
  const late = await c.waitFor((e) => e.event === 'late-write', 30_000, 'late write', from);
  t.match(late, { ok: false, code: 'EFENCED', errno: 108 }, 'its late write: refused by the OSD with 108');
  await c.waitFor((e) => e.event === 'state' && e.to === 'lost', 30_000, 'child lost', from);
  t.pass('and it knows it lost the lock');
  t.equal((await b.data.readFull(obj)).toString(), 'node-b owns it', 'nothing of it landed');
  t.ok(b.lock.checkHeld());
});
