/**
 * Volume.quiesce on the memory blocker: writes, zeroes and trims issued
 * during a quiesce wait until `fn` settled; those in flight drain (and are
 * flushed) before `fn` runs; reads go on; a throwing `fn` still lets the
 * waiters in; concurrent quiesces take turns; and a snapshot taken under
 * quiesce keeps the bytes of before while the racing write lands after it.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { Volume } from '../../../src/compose/volume.js';
import type { ReadPiece } from '../../../src/compose/types.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';
import { createSnapshot } from '../../../src/mapper/snapshot-create.js';

const KiB = 1024;
const OBJ = 64 * KiB;
const SIZE = 8 * OBJ;

async function setup(): Promise<{ blocker: MemoryBlocker; vol: Volume }> {
  const blocker = new MemoryBlocker();
  const map = await VolumeMap.create(blocker, 'vol1', { size: SIZE, objectSize: OBJ });
  return { blocker, vol: new Volume(map, blocker, false) };
}

/** Lets pending promise callbacks and timers run. */
const settle = () => new Promise<void>((r) => setTimeout(r, 20));

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => { resolve = r; });
  return { promise, resolve };
}

function bytes(pieces: ReadPiece[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (const p of pieces) if (p.data) p.data.copy(out, p.offset - offset);
  return out;
}

t.test('writes, zeroes and trims issued during quiesce run after fn; reads do not wait', async (t) => {
  const { vol } = await setup();
  await vol.write(0, Buffer.alloc(OBJ, 1), false);
  const order: string[] = [];
  const gate = deferred();
  let inFlightInFn = -1;
  let pending: Promise<unknown>[] = [];
  const q = vol.quiesce(async () => {
    inFlightInFn = vol.mutationsInFlight;
    pending = [
      vol.write(0, Buffer.alloc(100, 2), false).then(() => order.push('write')),
      vol.zero(OBJ, 100, { fua: false, noHole: true, fastZero: false }).then(() => order.push('zero')),
      vol.trim(2 * OBJ, OBJ, false).then(() => order.push('trim')),
    ];
    const r = bytes(await vol.read(0, 100), 0, 100);
    t.ok(r.equals(Buffer.alloc(100, 1)), 'a read during quiesce completes and sees the old bytes');
    order.push('read');
    await settle();
    t.equal(vol.quiescing, true, 'quiescing while fn runs');
    await gate.promise;
    order.push('fn');
    return 42;
  });
  await settle();
  t.same(order, ['read'], 'nothing mutating completed while fn waits');
  gate.resolve();
  t.equal(await q, 42, 'quiesce resolves with fn\'s value');
  await Promise.all(pending);
  t.same(order.slice(0, 2), ['read', 'fn'], 'the mutations completed only after fn');
  t.same(new Set(order.slice(2)), new Set(['write', 'zero', 'trim']), 'every mutation completed');
  t.equal(inFlightInFn, 0, 'fn saw no mutation in flight');
  t.equal(vol.quiescing, false, 'door open again');
  t.ok(bytes(await vol.read(0, 100), 0, 100).equals(Buffer.alloc(100, 2)), 'the waiting write landed');
});

t.test('mutations in flight drain and are flushed before fn runs', async (t) => {
  const { blocker, vol } = await setup();
  await vol.write(0, Buffer.alloc(OBJ, 1), false); // owned: later writes go in place
  const hold = deferred();
  let held = 0;
  blocker.setFaultHook(async (op, name) => {
    if (op === 'write' && name.startsWith('d.')) { held++; await hold.promise; }
  });
  const order: string[] = [];
  const w = vol.write(10, Buffer.alloc(10, 3), false).then(() => order.push('write'));
  await settle();
  t.equal(held, 1, 'the write is in flight');
  const realFlush = vol.flush.bind(vol);
  let flushes = 0;
  vol.flush = async () => { flushes++; order.push(`flush(in flight ${vol.mutationsInFlight})`); return realFlush(); };
  const q = vol.quiesce(async () => {
    order.push('fn');
    t.equal(vol.mutationsInFlight, 0, 'nothing in flight inside fn');
  });
  await settle();
  t.same(order, [], 'fn waits for the write in flight');
  blocker.setFaultHook(undefined);
  hold.resolve();
  await Promise.all([w, q]);
  t.same(order.filter((x) => x !== 'write'), ['flush(in flight 0)', 'fn'], 'drain, flush, then fn');
  t.ok(order.includes('write'), 'the write completed');
  t.equal(flushes, 1, 'one flush');
});

t.test('fn throwing still lets the waiters in', async (t) => {
  const { vol } = await setup();
  let w: Promise<void> | null = null;
  await t.rejects(vol.quiesce(async () => {
    w = vol.write(0, Buffer.alloc(10, 7), false);
    await settle();
    throw new Error('boom');
  }), { message: 'boom' }, 'quiesce rejects with fn\'s error');
  t.equal(vol.quiescing, false, 'door open');
  await w;
  t.ok(bytes(await vol.read(0, 10), 0, 10).equals(Buffer.alloc(10, 7)), 'the waiting write completed');
  await vol.write(20, Buffer.alloc(10, 8), false);
  t.pass('later writes go straight through');
});

t.test('concurrent quiesces take turns', async (t) => {
  const { vol } = await setup();
  const order: string[] = [];
  const a = vol.quiesce(async () => { order.push('a<'); await settle(); order.push('a>'); });
  const b = vol.quiesce(async () => { order.push('b<'); await settle(); order.push('b>'); });
  await Promise.all([a, b]);
  t.same(order, ['a<', 'a>', 'b<', 'b>'], 'one after the other');
});

t.test('a snapshot under quiesce keeps the bytes of before; the racing write lands after', async (t) => {
  const { blocker, vol } = await setup();
  const before = Buffer.alloc(SIZE, 0x11);
  await vol.write(0, before, false);
  let racing: Promise<void> | null = null;
  await vol.quiesce(async () => {
    racing = vol.write(OBJ / 2, Buffer.alloc(OBJ, 0x22), false);
    await settle();
    await createSnapshot(blocker, vol.map, 'snap1');
  });
  await racing;
  const snapMap = await VolumeMap.open(blocker, 'snap1', { forWrite: false });
  const snap = new Volume(snapMap, blocker, true);
  t.ok(bytes(await snap.read(0, SIZE), 0, SIZE).equals(before), 'the snapshot has the bytes of before');
  const after = Buffer.from(before);
  after.fill(0x22, OBJ / 2, OBJ / 2 + OBJ);
  t.ok(bytes(await vol.read(0, SIZE), 0, SIZE).equals(after), 'the volume has the racing write');
  t.ok(vol.stats.copyUps >= 1, 'the racing write copied up');
  await snap.close();
  await vol.close();
});
