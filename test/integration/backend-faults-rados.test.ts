/**
 * Backend faults on RADOS, for real: a Ceph cluster of our own (its OSD is
 * stopped and paused), the daemon, libnbd clients (nbdsh/driver.py).
 *
 * - OSD stopped (SIGTERM) under a write load and started again: the load
 *   waits and resumes by itself, and every acknowledged write reads back
 *   (after a final FLUSH, and again after a daemon restart).
 * - OSD paused (SIGSTOP) past the store URL's op_timeout (5 s): requests
 *   fail EIO in bounded time (librados cancels them; the daemon's backstop
 *   is op_timeout + 5 s), and succeed again after SIGCONT; a write that
 *   timed out never overwrites a newer one.
 */
import t from 'tap';
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

t.test('OSD paused past op_timeout: EIO in bounded time, success again after SIGCONT', async (t) => {
  const url = ceph.url({ op_timeout: 5 });
  await createVolume(url, 'pause', '1M');
  const d = await startFaultDaemon(t, url);
  t.equal((await d.backend()).timeoutMs, 10_000, 'the store URL\'s op_timeout (5 s) rules; the backstop is 5 s later');
  const drv = await connect(t, d, 'pause');
  t.ok((await write(drv, 0, pattern(1, BLOCK))).ok);
  t.ok((await drv.request({ op: 'flush' })).ok);

  await ceph.stopOsd(0, 'pause');
  let resumed = false;
  t.teardown(async () => { if (!resumed) await ceph.startOsd(0); });
  let started = Date.now();
  const w = await write(drv, 0, pattern(2, BLOCK));
  let ms = Date.now() - started;
  t.notOk(w.ok, 'the write fails');
  t.equal(errnoName(w.errno), 'EIO', 'with EIO', { w });
  t.ok(ms >= 4000 && ms < 9000, `after about op_timeout (${ms} ms), before the backstop`);
  started = Date.now();
  const r = await read(drv, 2 * BLOCK, BLOCK);
  ms = Date.now() - started;
  t.notOk(Buffer.isBuffer(r), 'a read fails too');
  t.ok(ms < 9000, `in bounded time (${ms} ms)`);

  await ceph.startOsd(0); // SIGCONT
  resumed = true;
  const deadline = Date.now() + 30_000;
  let ok: DriverReply = { ok: false };
  let tries = 0;
  while (!ok.ok && Date.now() < deadline) {
    tries++;
    ok = await write(drv, 0, pattern(3, BLOCK));
  }
  t.ok(ok.ok, `writes succeed again after SIGCONT (${tries} tries)`);
  t.same(await read(drv, 0, BLOCK), pattern(3, BLOCK), 'the newest acknowledged write wins over the one that timed out');
  t.ok((await drv.request({ op: 'flush' })).ok);
  const b = await d.backend();
  t.equal(b.fencedObjects, 0, 'nothing fenced: librados settled the timed-out ops itself');
  await drv.quit();
  t.equal(await d.stop(), 0);
});
