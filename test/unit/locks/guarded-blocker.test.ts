/**
 * guardBlocker (src/locks/guarded-blocker.ts) over the memory blocker and
 * the memory lock: changes pass only while the lock is held (checked per
 * call, so a lease that ran out between two calls of one request stops the
 * second), reads never need it, and EFENCED from the store makes the lock lost.
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { guardBlocker } from '../../../src/locks/guarded-blocker.js';
import { MemoryLockBackend, MemoryLockTable } from '../../../src/locks/memory-backend.js';
import { VolumeLock } from '../../../src/locks/volume-lock.js';

const VOL = '1111222233334444';

t.test('changes only while held; reads always', async (t) => {
  const inner = new MemoryBlocker();
  let clock = 0;
  const now = () => clock;
  const lock = new VolumeLock(new MemoryLockBackend(new MemoryLockTable(), VOL, { leaseMs: 100, now }), {
    identity: { node: 'n', instance: 'i' }, now,
  });
  const b = guardBlocker(inner, lock);
  t.equal(b.kind, 'memory');
  await t.rejects(b.write('d.x', 0, Buffer.from('a')), { code: 'ARCH_E_LOCK_NOT_HELD' }, 'not acquired yet');
  await lock.acquire();
  await b.write('d.x', 0, Buffer.from('abc'));
  await b.replace('m.x', Buffer.from('map'));
  await b.punch('d.x', 0, 1);
  await b.sync(['d.x']);
  const buf = Buffer.alloc(3);
  t.equal(await b.read('d.x', 0, 3, buf), 3);
  t.same(buf, Buffer.from('\0bc'));
  // A request of two calls, and the lease runs out between them:
  await b.write('d.y', 0, Buffer.from('first'));
  clock = 150;
  await t.rejects(b.write('d.y', 0, Buffer.from('second')), { code: 'ARCH_E_LOCK_LOST' }, 'the second call is refused');
  t.equal(lock.state, 'lost');
  t.equal((await b.readFull('d.y')).toString(), 'first', 'reads still work, and the refused write never reached the store');
  await t.rejects(b.remove('d.y'), { code: 'ARCH_E_LOCK_LOST' });
  t.same([...(await collect(b.list('d.')))].sort(), ['d.x', 'd.y'], 'list passes through');
  await b.close();
  t.equal((await inner.readFull('m.x')).toString(), 'map', 'close() leaves the inner blocker open');
});

t.test('EFENCED from the store makes the lock lost', async (t) => {
  const inner = new MemoryBlocker();
  const lock = new VolumeLock(new MemoryLockBackend(new MemoryLockTable(), VOL), { identity: { node: 'n', instance: 'i' } });
  await lock.acquire();
  const b = guardBlocker(inner, lock);
  inner.failNext('write', 'EFENCED');
  await t.rejects(b.write('d.z', 0, Buffer.from('x')), { code: 'EFENCED' });
  t.equal(lock.state, 'lost');
  t.match(lock.lostError, { fenced: true });
});

async function collect(it: AsyncIterable<string>): Promise<string[]> {
  const out: string[] = [];
  for await (const x of it) out.push(x);
  return out;
}
