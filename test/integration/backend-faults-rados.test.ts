/**
 * Backend faults on RADOS, for real: a Ceph cluster of our own (its OSD is
 * stopped and paused), the daemon, libnbd clients (nbdsh/driver.py).
 *
 * - OSD stopped (SIGTERM) under a write load and started again: the load
 *   waits and resumes by itself, and every acknowledged write reads back
 *   (after a final FLUSH, and again after a daemon restart).
 * - OSD paused (SIGSTOP) past the store URL's op_timeout (3 s): requests
 *   fail EIO in bounded time (librados cancels them; the daemon's backstop
 *   is op_timeout + 5 s), and succeed again after SIGCONT; a write that
 *   timed out never overwrites a newer one. (When even a fresh client cannot
 *   reach the volume's objects after SIGCONT, a placement group of the test
 *   cluster is stuck; the run then says so rather than checking us.)
 * - OSD paused until the mon marks it down, then resumed: it boots again in
 *   a new osdmap epoch; the daemon writes again, on the same connection and
 *   still holding the volume's lock, as soon as a fresh client can.
 */
import t, { type Test as Tap } from 'tap';
import { adminRequest } from '../../src/daemon/admin.js';
import { startCeph } from '../helpers/ceph.js';
import { NbdDriver, type DriverReply } from '../helpers/crash-model.js';
import { connect, createVolume, errnoName, FailureModel, pattern, startFaultDaemon } from '../helpers/faults.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 4 * KiB;

const ceph = await startCeph(t, { exclusive: true });


const write = (drv: NbdDriver, off: number, data: Buffer) => drv.request({ op: 'write', off, data: data.toString('base64'), fua: false });
const read = async (drv: NbdDriver, off: number, len: number): Promise<Buffer | DriverReply> => {
  const r = await drv.request({ op: 'read', off, len });
  return r.ok ? Buffer.from(r.data!, 'base64') : r;
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * How long our daemon may take to write again once a fresh client does. In
 * 1 of 8 runs of the short pause, our writes to the volume's object kept
 * timing out for 21 s after a fresh client's write to another object went
 * through; and once a fresh client's `create` timed out right after that
 * test: some placement groups of this one-OSD cluster take a while to serve
 * again after a pause, whoever asks. A client stuck for good (seen once
 * before the osdmap refresh: 150 s) still fails.
 */
const RECOVERY_MS = 60_000;

/**
 * Waits until a fresh client (the rados CLI) writes to the cluster: after an
 * OSD was paused, this one-OSD cluster itself took from 0 to over 60 s to
 * serve again (re-peering), whatever our daemon does. Tests then require
 * our daemon to work again soon after, which is what they are about.
 */
async function freshClientWrites(objects: string[] = [], ms = 120_000): Promise<{ ok: boolean; ms: number; objectsOk: boolean }> {
  const from = Date.now();
  let ok = false;
  let objectsOk = objects.length === 0;
  const timeout = ['--rados-osd-op-timeout', '5'];
  while (!(ok && objectsOk) && Date.now() < from + ms) {
    if (!ok) ok = (await ceph.rados(['-p', ceph.pools.data, 'put', 'probe', '-', ...timeout], { timeoutMs: 15_000, input: 'probe' })).code === 0;
    if (ok && !objectsOk) {
      objectsOk = true;
      for (const o of objects) objectsOk &&= (await ceph.rados(['-p', ceph.pools.data, 'stat', o, ...timeout], { timeoutMs: 15_000 })).code === 0;
    }
  }
  return { ok, objectsOk, ms: Date.now() - from };
}

/**
 * Whether a fresh client reached the volume's objects: if not, our daemon
 * cannot either, and the run says so instead of checking our recovery. In
 * about 1 run in 10, after the short pause, the object our timed-out write
 * went to stayed unreachable for every client (`rados stat` with a 5 s
 * timeout) for over 120 s, while other objects were served: a placement
 * group of this one-OSD memstore cluster stuck after SIGSTOP/SIGCONT. The
 * cluster's own health is logged for the next person to look.
 */
async function clusterServes(t: Tap, fresh: { objectsOk: boolean; ms: number }): Promise<boolean> {
  if (fresh.objectsOk) return true;
  const health = await ceph.ceph(['health', 'detail'], { timeoutMs: 20_000 });
  t.comment(`the cluster did not serve this volume's objects to a fresh client within ${fresh.ms} ms: `
    + `our daemon's recovery is not checked in this run. ceph health detail: ${health.stdout.trim().slice(0, 2000)}`);
  return false;
}

/** The data objects of volume `id` now (d.<id>.*). */
async function dataObjects(id: string): Promise<string[]> {
  const r = await ceph.rados(['-p', ceph.pools.data, 'ls']);
  return r.stdout.split('\n').filter((n) => n.startsWith(`d.${id}.`));
}

/** Writes `data` at 0 until it succeeds or `ms` pass; the last reply, tries and time taken. */
async function writeUntilOk(drv: NbdDriver, data: Buffer, ms: number): Promise<DriverReply & { tries: number; ms: number }> {
  const from = Date.now();
  let r: DriverReply = { ok: false };
  let tries = 0;
  while (!r.ok && Date.now() < from + ms) {
    tries++;
    r = await write(drv, 0, data);
  }
  return { ...r, tries, ms: Date.now() - from };
}

async function readAll(drv: NbdDriver, size: number): Promise<Buffer> {
  const r = await read(drv, 0, size);
  if (!Buffer.isBuffer(r)) throw new Error(`full read failed: ${r.error}`);
  return r;
}

t.test('OSD stopped under a write load and started again: the load resumes, acknowledged writes read back', async (t) => {
  const SIZE = 4 * MiB;
  const url = ceph.url();
  await createVolume(url, 'load', '4M');
  let d = await startFaultDaemon(t, url);
  t.equal((await d.backend()).timeoutMs, 35_000, 'op_timeout defaults to --backend-timeout (30 s); the backstop is 5 s later');
  const drv = await connect(t, d, 'load');
  const model = new FailureModel(SIZE);

  // The load: 4 KiB writes at random blocks, a FLUSH every 8; times of acknowledged writes.
  let running = true;
  const acked: number[] = [];
  const errors: string[] = [];
  const load = (async () => {
    for (let i = 0; running; i++) {
      const off = Math.floor(Math.random() * (SIZE / BLOCK)) * BLOCK;
      const data = pattern(i, BLOCK);
      const r = await write(drv, off, data);
      model.apply(off, BLOCK, data, r.ok);
      if (r.ok) acked.push(Date.now());
      else errors.push(`${errnoName(r.errno)}: ${r.error}`);
      if (i % 8 === 7) {
        const f = await drv.request({ op: 'flush' });
        if (!f.ok) errors.push(`flush: ${f.error}`);
      }
    }
  })();

  await sleep(1500);
  const before = acked.length;
  t.ok(before > 5, `writes before the stop (${before})`);
  const stopped = Date.now();
  await ceph.stopOsd(0, 'term');
  await sleep(2000);
  const duringStop = acked.filter((at) => at > stopped + 500).length;
  await ceph.startOsd(0);
  const restarted = Date.now();
  t.comment(`osd.0 down for ${restarted - stopped} ms; writes acknowledged while it was down: ${duringStop}`);
  // The load resumes by itself: wait for acknowledgements after the restart.
  const deadline = Date.now() + 40_000;
  while (acked.filter((at) => at > restarted).length < 20 && Date.now() < deadline) await sleep(100);
  running = false;
  await load;
  t.ok(acked.filter((at) => at > restarted).length >= 20, 'writes are acknowledged again after the restart, without a daemon restart');
  t.same(errors, [], 'no request failed: they waited for the OSD (op_timeout 30 s)');
  t.ok((await drv.request({ op: 'flush' })).ok, 'final FLUSH');
  t.same(model.check(await readAll(drv, SIZE)), [], `every acknowledged write reads back (${acked.length} writes)`);
  await drv.quit();
  t.equal(await d.stop(), 0, 'clean stop');

  d = await startFaultDaemon(t, url);
  const again = await connect(t, d, 'load');
  t.same(model.check(await readAll(again, SIZE)), [], 'and after a daemon restart');
  await again.quit();
  t.equal(await d.stop(), 0);
});

t.test('OSD paused until marked down, then resumed: the daemon works again as soon as a new client does', async (t) => {
  // After an earlier pause some placement groups took a while to serve even
  // fresh clients (a `create` with a 5 s op_timeout timed out): create with
  // the default op_timeout (30 s), and retry the first write.
  await createVolume(ceph.url(), 'flap', '1M');
  const url = ceph.url({ op_timeout: 5 });
  const d = await startFaultDaemon(t, url);
  const drv = await connect(t, d, 'flap');
  const first = await writeUntilOk(drv, pattern(1, BLOCK), RECOVERY_MS);
  t.ok(first.ok, `a first write (${first.tries} tries)`);

  await ceph.stopOsd(0, 'pause');
  let resumed = false;
  t.teardown(async () => { if (!resumed) await ceph.startOsd(0); });
  const w = await write(drv, 0, pattern(2, BLOCK));
  t.notOk(w.ok, 'a write while it is paused fails (op_timeout)');
  // A lone OSD without beacons is marked down after `mon osd report timeout`
  // (10 s). On SIGCONT it boots again, in a new osdmap epoch, and drops
  // requests of older epochs: our client must fetch the new map
  // (blockers/rados/osdmap.ts), while the lock's watch broke meanwhile
  // (locks/rados-backend.ts re-checks it until the cluster answers).
  await ceph.waitOsd(0, false, 60_000);
  await ceph.startOsd(0); // SIGCONT
  resumed = true;
  await ceph.waitOsd(0, true, 60_000);
  const fresh = await freshClientWrites();
  t.ok(fresh.ok, `a fresh client writes again (${fresh.ms} ms after the OSD was up)`);
  const ok = await writeUntilOk(drv, pattern(3, BLOCK), RECOVERY_MS);
  t.ok(ok.ok, `then ours too, on the same connection (${ok.tries} tries, ${ok.ms} ms)`, { last: ok, log: d.stderr().slice(-8000) });
  t.same(await read(drv, 0, BLOCK), pattern(3, BLOCK), 'the newest acknowledged write reads back');
  t.ok((await drv.request({ op: 'flush' })).ok);
  const status = await adminRequest(d.admin, { op: 'status' });
  t.match(status.ok && status.volumes, [{ name: 'flap', lock: 'owner' }], 'the lock is still ours', { status });
  await drv.quit();
  t.equal(await d.stop(), 0);
});

t.test('OSD paused past op_timeout: EIO in bounded time, success again after SIGCONT', async (t) => {
  // op_timeout 3 s: the OSD stays paused about 7 s, mostly under the 9–10 s
  // after which the mon marks a lone OSD down (`mon osd report timeout`;
  // that case is the previous test). Last in this file: a placement group
  // left stuck by this pause (clusterServes) then harms no other test.
  const url = ceph.url({ op_timeout: 3 });
  const id = await createVolume(url, 'pause', '1M');
  const d = await startFaultDaemon(t, url);
  t.equal((await d.backend()).timeoutMs, 8_000, 'the store URL\'s op_timeout (3 s) rules; the backstop is 5 s later');
  const drv = await connect(t, d, 'pause');
  t.ok((await write(drv, 0, pattern(1, BLOCK))).ok);
  t.ok((await drv.request({ op: 'flush' })).ok);
  const objects = await dataObjects(id);
  t.ok(objects.length > 0, `the volume's data objects: ${objects.join(', ')}`);

  await ceph.stopOsd(0, 'pause');
  let resumed = false;
  t.teardown(async () => { if (!resumed) await ceph.startOsd(0); });
  let started = Date.now();
  const w = await write(drv, 0, pattern(2, BLOCK));
  let ms = Date.now() - started;
  t.notOk(w.ok, 'the write fails');
  t.equal(errnoName(w.errno), 'EIO', 'with EIO', { w });
  t.ok(ms >= 2500 && ms < 7000, `after about op_timeout (${ms} ms), before the backstop`);
  started = Date.now();
  const r = await read(drv, 2 * BLOCK, BLOCK);
  ms = Date.now() - started;
  t.notOk(Buffer.isBuffer(r), 'a read fails too');
  t.ok(ms < 7000, `in bounded time (${ms} ms)`);

  await ceph.startOsd(0); // SIGCONT
  resumed = true;
  const fresh = await freshClientWrites(objects);
  t.ok(fresh.ok, `a fresh client writes again (${fresh.ms} ms after SIGCONT)`);
  if (!(await clusterServes(t, fresh))) {
    await drv.quit().catch(() => undefined);
    await d.stop();
    return;
  }
  const ok = await writeUntilOk(drv, pattern(3, BLOCK), RECOVERY_MS);
  t.ok(ok.ok, `then ours too, on the same connection (${ok.tries} tries, ${ok.ms} ms)`, { last: ok, log: d.stderr().slice(-8000) });
  t.same(await read(drv, 0, BLOCK), pattern(3, BLOCK), 'the newest acknowledged write wins over the one that timed out');
  t.ok((await drv.request({ op: 'flush' })).ok);
  const b = await d.backend();
  t.equal(b.fencedObjects, 0, 'nothing fenced: librados settled the timed-out ops itself');
  await drv.quit();
  t.equal(await d.stop(), 0);
});
