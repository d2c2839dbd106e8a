/**
 * VolumeSession on one memory store shared by two "daemons" (two sessions
 * with different identities, one in-memory lock table): the owner caches,
 * the reader reads fresh, writes move the lock by hand-over, a trim under a
 * reader's feet, snapshots through the non-owner, and a lost lock is final.
 * The same with real daemons and stores: test/integration/volume-handover
 * and volume-fencing.
 */
import t, { type Test } from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';
import { VolumeSession } from '../../../src/daemon/volume-session.js';
import { createSnapshot } from '../../../src/mapper/snapshot-create.js';
import { defaultIdentity, MemoryLockBackend } from '../../../src/locks/index.js';
import { createLogger } from '../../../src/common/log.js';
import type { ReadPiece } from '../../../src/compose/types.js';

const OBJ = 64 * 1024;
const SIZE = 8 * OBJ;
const log = createLogger({ level: 'error', write: () => {} });

async function open(blocker: MemoryBlocker, node: string, lockWaitMs = 5000): Promise<VolumeSession> {
  const map = await VolumeMap.open(blocker, 'v', { forWrite: false });
  return VolumeSession.open({
    name: 'v', maps: blocker, data: blocker, lockStore: { maps: blocker }, identity: defaultIdentity(node),
    lockWaitMs, log,
  }, map);
}

function flat(pieces: ReadPiece[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (const p of pieces) if (p.data) p.data.copy(out, p.offset - offset);
  return out;
}

async function read(s: VolumeSession, offset: number, length: number): Promise<Buffer> {
  return flat(await s.read(offset, length), offset, length);
}

async function setup(t: Test) {
  const blocker = new MemoryBlocker();
  await (await VolumeMap.create(blocker, 'v', { size: SIZE, objectSize: OBJ })).close();
  const a = await open(blocker, 'node-a');
  const b = await open(blocker, 'node-b');
  t.teardown(async () => { await a.close(); await b.close(); });
  return { blocker, a, b };
}

t.test('the first opener owns; the other reads fresh; a write moves the lock', async (t) => {
  const { a, b } = await setup(t);
  t.equal(a.mode, 'owner', 'A took the free lock at open');
  t.equal(b.mode, 'reader', 'B reads without it');
  await a.write(0, Buffer.alloc(4096, 1), false);
  await a.flush();
  t.ok((await read(b, 0, 4096)).equals(Buffer.alloc(4096, 1)), 'B reads A\'s flushed write');
  await a.write(OBJ + 100, Buffer.alloc(100, 2), false);
  await a.flush();
  t.ok((await read(b, OBJ + 100, 100)).equals(Buffer.alloc(100, 2)), 'and the next one, in another object (no stale cache)');

  await b.write(4096, Buffer.alloc(4096, 3), false);
  t.equal(b.mode, 'owner', 'B owns after its write');
  t.equal(a.mode, 'reader', 'A handed over');
  t.ok((await read(a, 0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 3)])), 'A reads both');
  await b.flush();

  // Back and forth, concurrently: every write lands, in one owner at a time.
  const writes: Promise<void>[] = [];
  for (let i = 0; i < 20; i++) writes.push((i % 2 ? a : b).write(2 * OBJ + i * 512, Buffer.alloc(512, 10 + i), false));
  await Promise.all(writes);
  t.not(a.mode === 'owner' && b.mode === 'owner', true, 'never both owners');
  await (a.mode === 'owner' ? a : b).flush();
  const all = await read(a.mode === 'owner' ? b : a, 2 * OBJ, 20 * 512);
  for (let i = 0; i < 20; i++) t.equal(all[i * 512], 10 + i, `write ${i} is there`);
});

t.test('a reader whose cached entry the owner trimmed away reads zeros, not an error', async (t) => {
  const { a, b } = await setup(t);
  await a.write(3 * OBJ, Buffer.alloc(OBJ, 7), false);
  await a.flush();
  t.ok((await read(b, 3 * OBJ, OBJ)).equals(Buffer.alloc(OBJ, 7)), 'B reads the object');
  await a.trim(3 * OBJ, OBJ, false); // whole object: unmapped, then deleted
  await a.flush();
  t.ok((await read(b, 3 * OBJ, OBJ)).equals(Buffer.alloc(OBJ)), 'B reads zeros after the trim');
});

t.test('a snapshot through the non-owner takes the lock and holds the owner\'s flushed data', async (t) => {
  const { blocker, a, b } = await setup(t);
  await a.write(0, Buffer.alloc(4096, 9), false);
  await a.flush();
  const r = await b.exclusive((v) => createSnapshot(blocker, v.map, 'snap'));
  t.ok(r.volumeId, 'snapshot made');
  t.equal(b.mode, 'owner', 'through B, which took the lock');
  const snap = await VolumeMap.open(blocker, 'snap', { forWrite: false });
  t.ok(snap.lookup(0) !== undefined || await snap.lookupAsync(0), 'the snapshot maps object 0');
  await snap.close();
});

t.test('lock pinned: hand-over requests are refused until it is dropped', async (t) => {
  const blocker = new MemoryBlocker();
  await (await VolumeMap.create(blocker, 'v', { size: SIZE, objectSize: OBJ })).close();
  const a = await open(blocker, 'node-a');
  const b = await open(blocker, 'node-b', 300);
  t.teardown(async () => { await a.close(); await b.close(); });
  await a.takeLock(true);
  await t.rejects(b.write(0, Buffer.alloc(512, 1), false), { code: 'EIO' }, 'B\'s write fails after its lock wait');
  t.equal(a.mode, 'owner', 'A kept it');
  await a.dropLock();
  t.equal(a.mode, 'reader', 'dropLock: A reads without it');
  await b.write(0, Buffer.alloc(512, 1), false);
  t.equal(b.mode, 'owner', 'B writes once A let go');
});

t.test('a lost lock is final: writes fail, reads go on, nothing is persisted after the loss', async (t) => {
  const { a, b } = await setup(t);
  await a.write(0, Buffer.alloc(4096, 1), false);
  await a.flush();
  // An operator breaks A's lock (as break-lock does): A is fenced and finds out.
  await b.lock.breakLock({ force: true });
  (a.lock.backend as MemoryLockBackend).deliverLoss('broken by an operator', true);
  await new Promise((r) => setTimeout(r, 20));
  await t.rejects(a.write(0, Buffer.alloc(4096, 2), false), { code: 'EIO', message: /lost/ }, 'A\'s write fails');
  await t.rejects(a.write(0, Buffer.alloc(4096, 2), false), { code: 'EIO' }, 'and the next one too (final)');
  t.ok((await read(a, 0, 4096)).equals(Buffer.alloc(4096, 1)), 'A still reads (fresh, as a reader)');
  await b.write(4096, Buffer.alloc(4096, 3), false);
  await b.flush();
  t.ok((await read(a, 4096, 4096)).equals(Buffer.alloc(4096, 3)), 'A reads B\'s write');
  t.equal(a.mode, 'reader');
});
