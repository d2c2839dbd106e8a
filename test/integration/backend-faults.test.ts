/**
 * Backend faults on a file store, end to end: the real daemon started with
 * `--fault-injection --backend-timeout 1.5`, rules set over the admin socket,
 * real NBD clients (libnbd through nbdsh/driver.py, and qemu-io).
 *
 *   client ──NBD──▶ daemon: compose ─▶ mapper ─▶ timeout ─▶ faulty ─▶ file store
 *                                                              ▲
 *                                      admin socket: faults set/add/clear
 *
 * - backend errors become NBD errors for those requests only (EIO → EIO,
 *   ENOSPC → ENOSPC); other volumes and requests go on;
 * - FLUSH and FUA fail when the store cannot sync; nothing failed is
 *   claimed, and after a restart the volume holds what was acknowledged;
 * - a hung operation times out in bounded time; its object stays fenced
 *   until the late write lands, which never overwrites newer data; the
 *   daemon recovers by itself when the fault clears;
 * - random failures of chunk, header, data writes, syncs and removes:
 *   every map loads after a restart and reads match the acknowledged writes.
 */
import t, { type Test } from 'tap';
import { cli, tempFileStore } from '../helpers/daemon.js';
import { NbdDriver, type DriverReply } from '../helpers/crash-model.js';
import { connect, createVolume, errnoName, FailureModel, pattern, startFaultDaemon } from '../helpers/faults.js';
import { diag, run } from '../helpers/run.js';
import { mulberry32 } from '../../src/common/prng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const OBJ = 64 * KiB;
const TIMEOUT_S = 1.5;


const write = (drv: NbdDriver, off: number, data: Buffer, fua = false) =>
  drv.request({ op: 'write', off, data: data.toString('base64'), fua });
const read = async (drv: NbdDriver, off: number, len: number): Promise<Buffer | DriverReply> => {
  const r = await drv.request({ op: 'read', off, len });
  return r.ok ? Buffer.from(r.data!, 'base64') : r;
};
const flush = (drv: NbdDriver) => drv.request({ op: 'flush' });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The reply of a request that must fail, with its errno name. */
function failed(t: Test, r: DriverReply, errno: string, what: string): void {
  t.notOk(r.ok, `${what}: fails`, { reply: r });
  t.equal(errnoName(r.errno), errno, `${what}: ${errno}`, { reply: r });
}

async function qemuIo(uri: string, cmd: string) {
  return run('qemu-io', ['-f', 'raw', '-c', cmd, uri], { timeoutMs: 30_000 });
}

async function readAll(t: Test, drv: NbdDriver, size: number): Promise<Buffer> {
  const r = await read(drv, 0, size);
  if (!Buffer.isBuffer(r)) throw new Error(`full read failed: ${r.error}`);
  t.pass('full read');
  return r;
}

t.test('backend errors become NBD errors for those requests only; other volumes go on', async (t) => {
  const store = await tempFileStore(t);
  const idA = await createVolume(store, 'a', '4M');
  await createVolume(store, 'b', '4M');
  const d = await startFaultDaemon(t, store, { backendTimeoutSec: TIMEOUT_S });
  const da = await connect(t, d, 'a');
  const db = await connect(t, d, 'b');
  const x = pattern(1, OBJ);
  t.ok((await write(da, 0, x)).ok, 'a: allocation before the faults');
  t.ok((await flush(da)).ok);

  const added = await cli(['faults', 'add', '--admin-socket', d.admin, '--op', 'write', '--prefix', `d.${idA}.`, '--fail', 'EIO']);
  t.equal(added.code, 0, 'archipelago faults add', diag(added.result));
  t.match(added.stdout, /rule 1: fail EIO on write of d\.[0-9a-f]{16}\.\*, rate 1: matched 0, injected 0/);
  failed(t, await write(da, 4096, pattern(2, 4096)), 'EIO', 'a: write in place');
  failed(t, await write(da, OBJ, pattern(2, 4096)), 'EIO', 'a: write to a new object');
  t.same(await read(da, 0, OBJ), x, 'a: reads still work');
  t.ok((await flush(da)).ok, 'a: flush works (nothing failed is dirty)');
  t.ok((await write(db, 0, pattern(3, 8192))).ok, 'b: writes work');
  t.same(await read(db, 0, 8192), pattern(3, 8192), 'b: reads back');
  const qa = await qemuIo(d.uri('a'), 'write -P 7 0 4k');
  t.match(qa.stdout + qa.stderr, /write failed: Input\/output error/, 'qemu-io sees EIO', diag(qa));
  const qb = await qemuIo(d.uri('b'), 'write -P 7 0 4k');
  t.match(qb.stdout, /wrote 4096\/4096 bytes/, 'qemu-io on b works', diag(qb));

  const shown = await d.faults({ action: 'set', rules: [{ ops: ['write', 'replace'], prefix: `d.${idA}.`, fail: 'ENOSPC' }] });
  t.same(shown.ids, [2]);
  failed(t, await write(da, 8192, pattern(4, 4096)), 'ENOSPC', 'a: ENOSPC');
  const qs = await qemuIo(d.uri('a'), 'write -P 7 0 4k');
  t.match(qs.stdout + qs.stderr, /write failed: No space left on device/, 'qemu-io sees ENOSPC', diag(qs));

  const show = await cli(['faults', 'show', '--admin-socket', d.admin, '--json']);
  t.match(JSON.parse(show.stdout), { ok: true, rules: [{ id: 2, effect: { fail: 'ENOSPC' }, injected: 2 }] }, 'faults show --json');
  const cleared = await d.faults({ action: 'clear' });
  t.same(cleared.rules, []);
  t.ok((cleared.injectedTotal as number) >= 5, `every failed request was an injected fault (${String(cleared.injectedTotal)} hits)`);
  const y = pattern(5, 4096);
  t.ok((await write(da, 4096, y)).ok, 'a: writes again once cleared, no restart');
  const expected = Buffer.from(x);
  y.copy(expected, 4096);
  t.same(await read(da, 0, OBJ), expected);
  t.ok((await d.backend()).faultInjection, 'status says fault injection is on');
  await da.quit();
  await db.quit();
  t.equal(await d.stop(), 0, 'clean stop');
});

t.test('without --fault-injection the admin socket refuses faults', async (t) => {
  const store = await tempFileStore(t);
  const d = await startFaultDaemon(t, store, { faultInjection: false });
  await t.rejects(d.faults({ action: 'show' }), { code: 'ARCH_E_USAGE', message: /fault injection is off/ });
  const backend = await d.backend();
  t.equal(backend.timeoutMs, 30_000, 'the default backend timeout is 30 s');
  t.equal(backend.faultInjection, false);
  const r = await cli(['faults', 'show', '--admin-socket', d.admin]);
  t.equal(r.code, 2, 'the CLI exits 2');
  t.match(r.stderr, /fault injection is off/);
  t.equal(await d.stop(), 0);
});

t.test('FLUSH and FUA fail when the store cannot sync; after a restart the volume holds what was acknowledged', async (t) => {
  const store = await tempFileStore(t);
  const id = await createVolume(store, 'c', '2M');
  const SIZE = 2 * MiB;
  const model = new FailureModel(SIZE);
  let d = await startFaultDaemon(t, store, { backendTimeoutSec: TIMEOUT_S });
  let drv = await connect(t, d, 'c');
  const step = async (off: number, data: Buffer, fua = false) => {
    const r = await write(drv, off, data, fua);
    model.apply(off, data.length, data, r.ok);
    return r;
  };
  t.ok((await step(0, pattern(1, OBJ))).ok, 'allocation');
  t.ok((await step(4096, pattern(2, 4096))).ok, 'write in place (not durable yet)');

  await d.faults({ action: 'add', rule: { ops: ['sync'], prefix: `d.${id}.`, fail: 'EIO' } });
  failed(t, await flush(drv), 'EIO', 'FLUSH');
  failed(t, await step(8192, pattern(3, 4096), true), 'EIO', 'FUA write');
  failed(t, await step(OBJ, pattern(4, 4096)), 'EIO', 'allocation (its data sync fails before the map names it)');
  t.ok((await step(12288, pattern(5, 4096))).ok, 'a plain write in place is acknowledged (not yet durable)');

  // A rule that matches syncs of this volume but injects nothing, to count them.
  await d.faults({ action: 'set', rules: [{ ops: ['sync'], prefix: `d.${id}.`, rate: 0, fail: 'EIO' }] });
  t.ok((await flush(drv)).ok, 'FLUSH works again, no restart');
  const shown = await d.faults({ action: 'show' });
  t.ok((shown.rules as { matched: number }[])[0]!.matched >= 1, 'and it synced the objects the failed FLUSH left dirty', { shown });

  await d.faults({ action: 'set', rules: [{ ops: ['replace'], prefix: 'm.', fail: 'EIO' }] });
  failed(t, await step(2 * OBJ, pattern(6, 4096)), 'EIO', 'allocation whose map chunk write fails');
  t.ok((await step(0, pattern(7, 512))).ok, 'writes in place need no map write');
  await d.faults({ action: 'clear' });
  t.ok((await flush(drv)).ok);
  t.same(model.check(await readAll(t, drv, SIZE)), [], 'reads match the model while running');
  await drv.quit();

  await d.kill(); // SIGKILL after the last FLUSH: what was acknowledged is durable
  const info = await cli(['info', 'c', '--store', `file:${store}`, '--json']);
  t.equal(info.code, 0, 'the map loads', diag(info.result));
  d = await startFaultDaemon(t, store, { backendTimeoutSec: TIMEOUT_S });
  drv = await connect(t, d, 'c');
  t.same(model.check(await readAll(t, drv, SIZE)), [], 'after the restart every sector is what was acknowledged (or a failed write\'s)');
  await drv.quit();
  t.equal(await d.stop(), 0);
});

t.test('a hung store: bounded errors, the object fenced until the late write lands, newer data never overwritten, recovery by itself', async (t) => {
  const store = await tempFileStore(t);
  const id = await createVolume(store, 'h', '2M');
  let d = await startFaultDaemon(t, store, { backendTimeoutSec: TIMEOUT_S });
  const drv = await connect(t, d, 'h');
  t.ok((await write(drv, 0, pattern(1, OBJ))).ok);
  t.ok((await flush(drv)).ok);
  const hang = { action: 'add', rule: { ops: ['write'], prefix: `d.${id}.`, hang: true, limit: 1 } };

  // Round 1: the late write lands while a newer one waits at the fence.
  await d.faults(hang);
  let started = Date.now();
  failed(t, await write(drv, 0, pattern(2, 4096)), 'EIO', 'the hung write');
  let ms = Date.now() - started;
  t.ok(ms >= TIMEOUT_S * 1000 - 100 && ms < TIMEOUT_S * 1000 + 1500, `fails after the timeout (${ms} ms)`);
  const newer = write(drv, 0, pattern(3, 4096));
  await sleep(300);
  const cleared = await d.faults({ action: 'clear' });
  t.equal(cleared.released, 1, 'clear releases the hung write: it lands now');
  t.ok((await newer).ok, 'the newer write, which waited at the fence, is acknowledged');
  t.same(await read(drv, 0, 4096), pattern(3, 4096), 'and is not overwritten by the late one');

  // Round 2: the store stays stuck past the timeouts.
  await d.faults(hang);
  failed(t, await write(drv, 0, pattern(4, 4096)), 'EIO', 'the hung write');
  started = Date.now();
  failed(t, await write(drv, 0, pattern(5, 4096)), 'EIO', 'a newer write to the fenced object');
  failed(t, await read(drv, 0, 4096) as DriverReply, 'EIO', 'a read of the fenced object');
  ms = Date.now() - started;
  t.ok(ms < 2 * (TIMEOUT_S * 1000 + 1000), `both in bounded time (${ms} ms)`);
  t.ok((await write(drv, 4 * OBJ, pattern(6, 4096))).ok, 'other objects are unaffected');
  let b = await d.backend();
  t.equal(b.fencedObjects, 1, 'one object fenced');
  t.ok(b.timedOut.write >= 3, 'timeouts counted', { b });
  const metrics = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
  t.match(metrics, /^archipelago_backend_fenced_objects 1$/m, '/metrics: the fenced object');
  t.match(metrics, /^archipelago_backend_late_operations 1$/m, '/metrics: the late write');
  t.match(metrics, /^archipelago_backend_stalled 0$/m, '/metrics: far below the bound on late operations');
  await d.faults({ action: 'clear' });
  await sleep(100);
  t.same(await read(drv, 0, 4096), pattern(4, 4096), 'the late write landed; the one that never ran did not');
  t.ok((await write(drv, 0, pattern(7, 4096))).ok, 'writes work again without a restart');
  t.same(await read(drv, 0, 4096), pattern(7, 4096));
  t.ok((await flush(drv)).ok);
  b = await d.backend();
  t.equal(b.fencedObjects, 0, 'no fence left');
  t.equal(b.late, 0, 'nothing late left');
  await drv.quit();
  t.equal(await d.stop(), 0, 'clean stop');

  d = await startFaultDaemon(t, store, { backendTimeoutSec: TIMEOUT_S });
  const again = await connect(t, d, 'h');
  t.same(await read(again, 0, 4096), pattern(7, 4096), 'the last acknowledged write survives a restart');
  await again.quit();
  t.equal(await d.stop(), 0);
});

t.test('random failures of map, header, data, sync and remove calls: maps load, reads match acknowledged writes', async (t) => {
  const SEED = Number(process.env.ARCHIPELAGO_MODEL_SEED ?? Math.floor(Math.random() * 2 ** 31));
  t.comment(`seed ${SEED} (ARCHIPELAGO_MODEL_SEED=${SEED} to repeat)`);
  const rng = mulberry32(SEED);
  const rand = (n: number) => Math.floor(rng() * n);
  const SIZE = 4 * MiB;
  const store = await tempFileStore(t);
  await createVolume(store, 'r', '4M');
  let d = await startFaultDaemon(t, store, { backendTimeoutSec: TIMEOUT_S });
  let drv = await connect(t, d, 'r');
  await d.faults({
    action: 'set',
    rules: [
      { ops: ['replace'], prefix: 'm.', rate: 0.15, seed: SEED, fail: 'EIO' },
      { ops: ['replace'], prefix: 'vol.', rate: 0.2, seed: SEED + 1, fail: 'EIO' },
      { ops: ['write'], prefix: 'd.', rate: 0.05, seed: SEED + 2, fail: 'EIO' },
      { ops: ['write'], prefix: 'd.', rate: 0.03, seed: SEED + 3, fail: 'ENOSPC' },
      { ops: ['sync'], rate: 0.1, seed: SEED + 4, fail: 'EIO' },
      { ops: ['remove'], rate: 0.3, seed: SEED + 5, fail: 'EIO' },
      { ops: ['read'], prefix: 'd.', rate: 0.03, seed: SEED + 6, fail: 'EIO' },
    ],
  });
  const model = new FailureModel(SIZE);
  let ok = 0;
  let bad = 0;
  for (let i = 0; i < 250; i++) {
    const k = rand(20);
    const whole = rand(4) === 0;
    const off = whole ? rand(SIZE / OBJ) * OBJ : rand(SIZE / 512) * 512 + (rand(3) === 0 ? rand(512) : 0);
    const len = Math.min(SIZE - off, whole ? OBJ * (1 + rand(2)) : 1 + rand(96 * KiB));
    let r: DriverReply;
    if (k < 12) {
      const data = pattern(1000 + i, len);
      r = await write(drv, off, data, rand(8) === 0);
      model.apply(off, len, data, r.ok);
    } else if (k < 15) {
      r = await drv.request({ op: 'trim', off, len, fua: false });
      model.apply(off, len, null, r.ok);
    } else if (k < 16) {
      r = await drv.request({ op: 'zero', off, len, fua: false, no_hole: rand(2) === 0 });
      model.apply(off, len, null, r.ok);
    } else if (k < 18) {
      r = await flush(drv);
    } else {
      const at = off - (off % 512);
      const n = Math.min(SIZE - at, Math.ceil(len / 512) * 512);
      const got = await read(drv, at, n);
      if (Buffer.isBuffer(got)) {
        t.same(model.check(got, at), [], `read ${at}+${n} matches the model`);
        r = { ok: true };
      } else {
        r = got;
      }
    }
    if (r.ok) ok++;
    else {
      bad++;
      const e = errnoName(r.errno);
      if (e !== 'EIO' && e !== 'ENOSPC') t.fail(`unexpected error ${e}: ${r.error}`);
    }
  }
  t.ok(bad > 10 && ok > 100, `${ok} requests succeeded, ${bad} failed`);
  const shown = await d.faults({ action: 'clear' });
  t.ok((shown.injectedTotal as number) > 10, `${String(shown.injectedTotal)} faults injected`);
  t.ok((await flush(drv)).ok, 'FLUSH works once the faults are cleared');
  t.same(model.check(await readAll(t, drv, SIZE)), [], 'reads match the model while running');
  t.comment(`model sets over the cap: ${model.capHits}`);
  await drv.quit();
  await d.kill();

  const info = await cli(['info', 'r', '--store', `file:${store}`, '--json']);
  t.equal(info.code, 0, 'the map loads after SIGKILL', diag(info.result));
  d = await startFaultDaemon(t, store, { backendTimeoutSec: TIMEOUT_S });
  drv = await connect(t, d, 'r');
  t.same(model.check(await readAll(t, drv, SIZE)), [], 'after the restart every sector is explained by the acknowledged and failed writes');
  t.ok((await write(drv, 0, pattern(9, 4096))).ok, 'and the volume takes writes');
  await drv.quit();
  t.equal(await d.stop(), 0);
});
