/**
 * A dead or paused lock owner, through real daemons and libnbd clients
 * (docs/locks.md "In the daemon"):
 * - SIGKILL: the other daemon's write waits until the dead owner is fenced
 *   (files: its lease ran out; RADOS: its watch is gone, it is blocklisted),
 *   takes the lock over, and both the dead owner's flushed data and the new
 *   write are there;
 * - SIGSTOP past the lease (RADOS: past osd_client_watch_timeout), another
 *   daemon takes over and writes, SIGCONT: the write the paused owner had
 *   received meanwhile never lands, and it writes nothing more (files: its
 *   writes fail; RADOS: it is blocklisted and exits for systemd to restart);
 * - break-lock by an operator after the holder was killed (files: once its
 *   lease ran out; RADOS: --force fences at once).
 *
 * Files by default; with ARCHIPELAGO_TEST_BACKEND=rados on a cluster of
 * this test's own with osd_client_watch_timeout lowered to 5 s.
 */
import t, { type Test } from 'tap';
import { cli, startDaemon, type Daemon } from '../helpers/daemon.js';
import { TEST_BACKEND, tempStore } from '../helpers/stores.js';
import { startCeph } from '../helpers/ceph.js';
import { NbdDriver } from '../helpers/crash-model.js';

const KiB = 1024;
const LEASE_S = 3;
const WATCH_TIMEOUT_S = 5;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A store for this test: a temp file store, or fresh pools on a cluster with short watch timeouts. */
async function store(t: Test): Promise<string> {
  if (TEST_BACKEND !== 'rados') return tempStore(t);
  const ceph = await startCeph(t, { exclusive: true });
  for (const [who, key, value] of [['osd', 'osd_client_watch_timeout', String(WATCH_TIMEOUT_S)], ['client', 'objecter_tick_interval', '1']]) {
    const r = await ceph.ceph(['config', 'set', who!, key!, value!]);
    if (r.code !== 0) throw new Error(`ceph config set ${who} ${key}: ${r.stderr}`);
  }
  return ceph.url();
}

async function connect(t: Test, d: Daemon, name: string): Promise<NbdDriver> {
  const driver = new NbdDriver(t);
  const r = await driver.request({ op: 'connect', uri: d.uri(name) });
  if (!r.ok) throw new Error(`connect ${d.uri(name)}: ${r.error}`);
  return driver;
}

async function write(driver: NbdDriver, off: number, data: Buffer, timeoutMs?: number): Promise<{ ok: boolean; error?: string }> {
  return driver.request({ op: 'write', off, data: data.toString('base64') }, timeoutMs);
}

async function writeFlushed(driver: NbdDriver, off: number, data: Buffer): Promise<void> {
  const w = await write(driver, off, data);
  if (!w.ok) throw new Error(`write ${off}: ${w.error}`);
  const f = await driver.request({ op: 'flush' });
  if (!f.ok) throw new Error(`flush: ${f.error}`);
}

async function read(driver: NbdDriver, off: number, len: number): Promise<Buffer> {
  const r = await driver.request({ op: 'read', off, len });
  if (!r.ok) throw new Error(`read ${off}+${len}: ${r.error}`);
  return Buffer.from(r.data!, 'base64');
}

const daemonArgs = (node: string) => ['--node-name', node, '--lock-lease', String(LEASE_S), '--lock-wait', '60'];

t.test(`SIGKILL of the owner: the other daemon takes over after fencing (${TEST_BACKEND})`, async (t) => {
  const url = await store(t);
  t.equal((await cli(['create', 'v', '--size', '1M', '--object-size', '64K', '--store', url])).code, 0, 'create');
  const [a, b] = await Promise.all([
    startDaemon(t, { store: url, extraArgs: daemonArgs('node-a') }),
    startDaemon(t, { store: url, extraArgs: daemonArgs('node-b') }),
  ]);
  const da = await connect(t, a, 'v');
  const db = await connect(t, b, 'v');
  const x = Buffer.alloc(4 * KiB, 0xaa);
  const y = Buffer.alloc(4 * KiB, 0xbb);
  await writeFlushed(da, 0, x);
  await a.kill();
  const started = performance.now();
  await writeFlushed(db, 4 * KiB, y);
  const took = performance.now() - started;
  t.comment(`B's write took the lock over ${Math.round(took)} ms after A's SIGKILL`);
  const bound = TEST_BACKEND === 'rados' ? (WATCH_TIMEOUT_S + 10) * 1000 : (LEASE_S * 1.4 + 5) * 1000;
  t.ok(took < bound, `within the lease/watch timeout plus slack (${Math.round(took)} < ${bound} ms)`);
  t.ok((await read(db, 0, 4 * KiB)).equals(x), 'the dead owner\'s flushed write is there');
  t.ok((await read(db, 4 * KiB, 4 * KiB)).equals(y), 'and the new owner\'s');
  const info = JSON.parse((await cli(['info', 'v', '--json', '--store', url])).stdout) as { lock: { node: string } | null };
  t.equal(info.lock?.node, 'node-b', 'info: node-b holds the lock');
  await db.quit();
  t.equal(await b.stop(), 0, 'B stops cleanly');
  const after = JSON.parse((await cli(['info', 'v', '--json', '--store', url])).stdout) as { lock: unknown };
  t.equal(after.lock, null, 'SIGTERM released the lock');
});

t.test(`SIGSTOP of the owner past its lease: nothing it received lands after SIGCONT (${TEST_BACKEND})`, async (t) => {
  const url = await store(t);
  t.equal((await cli(['create', 'v', '--size', '1M', '--object-size', '64K', '--store', url])).code, 0, 'create');
  const [a, b, r] = await Promise.all([
    startDaemon(t, { store: url, extraArgs: daemonArgs('node-a') }),
    startDaemon(t, { store: url, extraArgs: daemonArgs('node-b') }),
    startDaemon(t, { store: url, extraArgs: daemonArgs('node-r') }),
  ]);
  t.teardown(() => { try { process.kill(a.pid, 'SIGCONT'); } catch { /* gone */ } });
  const da = await connect(t, a, 'v');
  const da2 = await connect(t, a, 'v');
  const db = await connect(t, b, 'v');
  const dr = await connect(t, r, 'v');
  const x = Buffer.alloc(8 * KiB, 0x11);
  await writeFlushed(da, 0, x);

  process.kill(a.pid, 'SIGSTOP');
  // A write the paused owner receives (in its socket buffer) while paused.
  const late = write(da2, 0, Buffer.alloc(8 * KiB, 0xee), 120_000);
  await sleep(300);
  const y = Buffer.alloc(8 * KiB, 0x22);
  const started = performance.now();
  await writeFlushed(db, 0, y);
  t.comment(`B took the lock ${Math.round(performance.now() - started)} ms after A paused`);
  process.kill(a.pid, 'SIGCONT');

  const lateReply = await late;
  t.equal(lateReply.ok, false, `the write A received while paused failed (${lateReply.error ?? 'ok'})`);
  const again = await write(da, 8 * KiB, Buffer.alloc(4 * KiB, 0xef), 30_000).catch((e: Error) => ({ ok: false, error: e.message }));
  t.equal(again.ok, false, `A writes nothing after it lost the lock (${again.error ?? 'ok'})`);
  await sleep(1000);
  t.ok((await read(dr, 0, 8 * KiB)).equals(y), 'the reader sees B\'s data, none of A\'s late writes');
  t.ok((await read(dr, 8 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB)), 'nothing landed where A tried to write afterwards');
  if (TEST_BACKEND === 'rados') {
    // Blocklisted: every operation of its client fails; it exits for systemd to restart it.
    for (let i = 0; i < 100 && a.running; i++) await sleep(100);
    t.equal(a.exitStatus(), 'code 75', 'the fenced daemon exited with EX_TEMPFAIL');
  } else {
    t.ok(a.running, 'A runs on (a lease is per volume)');
    t.match(a.stderr(), /lock of volume [0-9a-f]+ lost/, 'A logged the loss');
  }
  for (const d of [da, da2, db, dr]) await d.kill();
});

t.test(`break-lock: an operator breaks a killed daemon's lock (${TEST_BACKEND})`, async (t) => {
  const url = await store(t);
  t.equal((await cli(['create', 'v', '--size', '1M', '--object-size', '64K', '--store', url])).code, 0, 'create');
  const a = await startDaemon(t, { store: url, extraArgs: daemonArgs('node-a') });
  const da = await connect(t, a, 'v');
  await writeFlushed(da, 0, Buffer.alloc(4 * KiB, 0x33));
  await a.kill();
  await da.kill();
  const held = JSON.parse((await cli(['info', 'v', '--json', '--store', url])).stdout) as { lock: { node: string } | null };
  t.equal(held.lock?.node, 'node-a', 'the killed daemon still holds the lock');
  // Files wait for the lease to run out (a live lease is never broken); RADOS fences at once with --force.
  const r = await cli(['break-lock', 'v', '--store', url, ...(TEST_BACKEND === 'rados' ? ['--force'] : [])], { timeoutMs: 60_000 });
  t.equal(r.code, 0, `break-lock: ${r.stderr}`);
  t.match(r.stdout, /broke the lock of volume v, held by node node-a/, 'it says whose lock it broke');
  const after = JSON.parse((await cli(['info', 'v', '--json', '--store', url])).stdout) as { lock: unknown };
  t.equal(after.lock, null, 'nobody holds it now');
});
