/**
 * Two daemons on one store, as two compute nodes sharing only the object
 * store (file store here; ARCHIPELAGO_TEST_BACKEND=rados for RADOS): writes
 * alternate between them through the volume lock's cooperative hand-over,
 * a third daemon that only reads sees every flushed write, the admin API
 * never shows two owners, and snapshots through either daemon go through
 * the same lock. Clients are libnbd (driver.py). Killing or pausing an
 * owner: volume-fencing.test.ts.
 */
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { cli, startDaemon, type Daemon } from '../helpers/daemon.js';
import { tempStore } from '../helpers/stores.js';
import { NbdDriver } from '../helpers/crash-model.js';
import { tempDir } from '../helpers/run.js';
import { adminRequest } from '../../src/daemon/admin.js';

const KiB = 1024;
const SIZE = 4 * 1024 * KiB;
const SLOT = 4 * KiB;

async function connect(t: Test, d: Daemon, name: string): Promise<NbdDriver> {
  const driver = new NbdDriver(t);
  const r = await driver.request({ op: 'connect', uri: d.uri(name) });
  if (!r.ok) throw new Error(`connect ${d.uri(name)}: ${r.error}`);
  return driver;
}

async function read(driver: NbdDriver, off: number, len: number): Promise<Buffer> {
  const r = await driver.request({ op: 'read', off, len });
  if (!r.ok) throw new Error(`read ${off}+${len}: ${r.error}`);
  return Buffer.from(r.data!, 'base64');
}

async function write(driver: NbdDriver, off: number, data: Buffer): Promise<void> {
  const r = await driver.request({ op: 'write', off, data: data.toString('base64') });
  if (!r.ok) throw new Error(`write ${off}+${data.length}: ${r.error}`);
}

async function flush(driver: NbdDriver): Promise<void> {
  const r = await driver.request({ op: 'flush' });
  if (!r.ok) throw new Error(`flush: ${r.error}`);
}

interface VolumeStatus { name: string; mode: string; lock: string | null }

async function status(socket: string, name: string): Promise<VolumeStatus | undefined> {
  const r = await adminRequest(socket, { op: 'status' });
  if (!r.ok) throw new Error(r.message);
  return (r.volumes as VolumeStatus[]).find((v) => v.name === name);
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!;
}

t.test('writes alternate between two daemons; a third reader sees every flushed write', async (t) => {
  const store = await tempStore(t);
  const dir = await tempDir(t);
  const c = await cli(['create', 'v', '--size', String(SIZE), '--object-size', '64K', '--store', store]);
  t.equal(c.code, 0, 'create');
  const adminA = `${dir}/a.sock`;
  const adminB = `${dir}/b.sock`;
  const [a, b, r] = await Promise.all([
    startDaemon(t, { store, extraArgs: ['--admin-socket', adminA, '--node-name', 'node-a'] }),
    startDaemon(t, { store, extraArgs: ['--admin-socket', adminB, '--node-name', 'node-b'] }),
    startDaemon(t, { store, extraArgs: ['--node-name', 'node-r'] }),
  ]);
  const da = await connect(t, a, 'v');
  const db = await connect(t, b, 'v');
  const dr = await connect(t, r, 'v');

  const model = Buffer.alloc(SIZE);
  const switchMs: number[] = [];
  const ROUNDS = 24;
  for (let i = 0; i < ROUNDS; i++) {
    const [writer, name] = i % 2 === 0 ? [da, 'A'] : [db, 'B'];
    // Some writes cross an object boundary (64 KiB) to take the multi-object path.
    const off = (i % 3 === 2 ? 64 * KiB - SLOT / 2 : 0) + (i * 7 % 60) * 64 * KiB;
    const data = randomBytes(SLOT);
    const started = performance.now();
    await write(writer, off, data);
    await flush(writer);
    switchMs.push(performance.now() - started);
    data.copy(model, off);
    const seen = await read(dr, off, SLOT);
    t.ok(seen.equals(data), `round ${i}: the reader sees ${name}'s flushed write at ${off}`);
    const [sa, sb] = await Promise.all([status(adminA, 'v'), status(adminB, 'v')]);
    t.not(sa?.mode === 'owner' && sb?.mode === 'owner', true, `round ${i}: not both owners (A ${sa?.lock}, B ${sb?.lock})`);
    t.equal((name === 'A' ? sa : sb)?.mode, 'owner', `round ${i}: ${name} owns the volume after writing`);
  }
  // Everyone reads the same whole volume, equal to the model.
  for (const [d, who] of [[da, 'A'], [db, 'B'], [dr, 'reader']] as const) {
    const all = await read(d, 0, SIZE);
    t.ok(all.equals(model), `${who} reads the whole volume as written`);
  }
  // The hand-overs are in each daemon's metrics.
  const scrape = async (d: Daemon) => (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
  for (const [d, who] of [[a, 'A'], [b, 'B']] as const) {
    const text = await scrape(d);
    t.match(text, /\narchipelago_lock_acquisitions_total\{kind="handover"\} [1-9]/, `${who}: acquisitions by hand-over counted`);
    t.match(text, /\narchipelago_lock_handover_duration_seconds_count [1-9]/, `${who}: hand-overs given timed`);
    t.match(text, /\narchipelago_lock_state\{volume="v",state="(owner|unlocked)"\} 1\n/, `${who}: the volume's lock state`);
  }
  switchMs.sort((x, y) => x - y);
  t.comment(`write+flush with a hand-over: p50 ${percentile(switchMs, 0.5).toFixed(1)} ms, `
    + `p99 ${percentile(switchMs, 0.99).toFixed(1)} ms (${switchMs.length} rounds)`);

  // A snapshot through B while A owns: B takes the lock for it, A's data is in it.
  await write(da, 0, Buffer.alloc(SLOT, 0x5a));
  await flush(da);
  Buffer.alloc(SLOT, 0x5a).copy(model, 0);
  const snap = await cli(['snapshot', 'v', 'v-snap', '--admin-socket', adminB, '--store', store]);
  t.equal(snap.code, 0, `snapshot through B: ${snap.stderr}`);
  t.equal((await status(adminB, 'v'))?.mode, 'owner', 'B took the lock for the snapshot');
  const ds = await connect(t, r, 'v-snap');
  t.ok((await read(ds, 0, SIZE)).equals(model), 'the snapshot holds every write, A\'s last one included');
  // And A writes on afterwards (the lock comes back), the snapshot keeps the old bytes.
  await write(da, 0, Buffer.alloc(SLOT, 0x77));
  await flush(da);
  t.ok((await read(dr, 0, SLOT)).equals(Buffer.alloc(SLOT, 0x77)), 'A writes again after the snapshot');
  t.ok((await read(ds, 0, SLOT)).equals(Buffer.alloc(SLOT, 0x5a)), 'the snapshot did not change');

  // An offline resize while A owns the volume: the CLI takes the lock from A (hand-over), A writes on afterwards.
  t.equal((await status(adminA, 'v'))?.mode, 'owner', 'A owns before the resize');
  const rs = await cli(['resize', 'v', '--size', String(2 * SIZE), '--store', store]);
  t.equal(rs.code, 0, `resize while A owns: ${rs.stderr}`);
  t.equal((await status(adminA, 'v'))?.mode, 'reader', 'A handed the lock to the resize');
  await write(da, SLOT, Buffer.alloc(SLOT, 0x78));
  await flush(da);
  t.ok((await read(dr, SLOT, SLOT)).equals(Buffer.alloc(SLOT, 0x78)), 'A writes again after the resize');
  const sized = JSON.parse((await cli(['info', 'v', '--json', '--store', store])).stdout) as { size: number; lock: { node: string } };
  t.equal(sized.size, 2 * SIZE, 'the new size is stored');
  t.equal(sized.lock.node, 'node-a', 'and A holds the lock again');

  for (const d of [da, db, dr, ds]) await d.quit();
  for (const d of [a, b, r]) t.equal(await d.stop(), 0, 'daemon stops cleanly');
  const info = await cli(['info', 'v', '--json', '--store', store]);
  t.equal(info.code, 0, 'info after the daemons stopped');
  t.equal((JSON.parse(info.stdout) as { lock: unknown }).lock, null, 'SIGTERM released the locks: nobody holds it');
});

t.test('lock, unlock, open and close through the admin API', async (t) => {
  const store = await tempStore(t);
  const dir = await tempDir(t);
  t.equal((await cli(['create', 'v', '--size', '1M', '--object-size', '64K', '--store', store])).code, 0, 'create');
  const adminA = `${dir}/a.sock`;
  const adminB = `${dir}/b.sock`;
  const [a, b] = await Promise.all([
    startDaemon(t, { store, extraArgs: ['--admin-socket', adminA, '--node-name', 'node-a', '--lock-wait', '3'] }),
    startDaemon(t, { store, extraArgs: ['--admin-socket', adminB, '--node-name', 'node-b', '--lock-wait', '3'] }),
  ]);
  const lock = await cli(['lock', 'v', '--admin-socket', adminA, '--store', store]);
  t.equal(lock.code, 0, `lock through A: ${lock.stderr}`);
  const info = await cli(['info', 'v', '--json', '--store', store]);
  t.match(JSON.parse(info.stdout), { lock: { node: 'node-a' } }, 'info names the owner');
  // B cannot write while A holds it locked: the write fails after lock-wait.
  const db = await connect(t, b, 'v');
  const w = await db.request({ op: 'write', off: 0, data: Buffer.alloc(512, 1).toString('base64') });
  t.equal(w.ok, false, 'a write through B fails while A holds the lock pinned');
  // After unlock, B writes.
  t.equal((await cli(['unlock', 'v', '--admin-socket', adminA, '--store', store])).code, 0, 'unlock');
  await write(db, 0, Buffer.alloc(512, 2));
  await flush(db);
  t.equal((await status(adminB, 'v'))?.mode, 'owner', 'B owns after its write');
  // open through A: A takes it over (hand-over) ahead of any write; close gives it up.
  t.equal((await cli(['open', 'v', '--admin-socket', adminA, '--store', store])).code, 0, 'open through A');
  t.equal((await status(adminA, 'v'))?.mode, 'owner', 'A owns after open');
  t.equal((await status(adminB, 'v'))?.mode, 'reader', 'B handed over');
  t.equal((await cli(['close', 'v', '--admin-socket', adminA, '--store', store])).code, 0, 'close through A');
  const after = JSON.parse((await cli(['info', 'v', '--json', '--store', store])).stdout) as { lock: unknown };
  t.equal(after.lock, null, 'nobody holds the lock after close');
  t.ok((await read(db, 0, 512)).equals(Buffer.alloc(512, 2)), 'B\'s write survived the round trip');
  await db.quit();
  await Promise.all([a.stop(), b.stop()]);
});
