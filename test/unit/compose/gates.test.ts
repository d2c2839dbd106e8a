/**
 * src/compose/gates.ts: shared holders run together, an exclusive holder is
 * alone, grants are FIFO (a waiting exclusive is not starved by later shared
 * acquirers), gates vanish when free, and a seeded random stress run with a
 * checker that no exclusive holder ever overlaps another holder.
 */
import t from 'tap';
import { ObjectGates } from '../../../src/compose/gates.js';
import { mulberry32 } from '../../../src/common/prng.js';

/** Lets every queued promise continuation run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Tracks when an acquire (sync or async) is granted. */
function track(p: Promise<void> | undefined): { granted: boolean } {
  const s = { granted: p === undefined };
  if (p) void p.then(() => { s.granted = true; });
  return s;
}


t.test('shared holders run together; a free gate is deleted', async (t) => {
  const g = new ObjectGates();
  t.equal(g.busy, 0);
  t.equal(g.acquireShared(1), undefined, 'first shared: granted synchronously');
  t.equal(g.acquireShared(1), undefined, 'second shared: granted synchronously');
  t.equal(g.acquireShared(2), undefined, 'another object is independent');
  t.equal(g.busy, 2);
  g.releaseShared(1);
  t.equal(g.busy, 2, 'still one holder of object 1');
  g.releaseShared(1);
  t.equal(g.busy, 1, 'object 1 free: its gate is gone');
  g.releaseShared(2);
  t.equal(g.busy, 0);
});

t.test('exclusive waits for shared holders to leave, then excludes everyone', async (t) => {
  const g = new ObjectGates();
  g.acquireShared(7);
  g.acquireShared(7);
  const ex = track(g.acquireExclusive(7));
  await settle();
  t.notOk(ex.granted, 'exclusive waits while shared holders remain');
  g.releaseShared(7);
  await settle();
  t.notOk(ex.granted, 'still one shared holder');
  g.releaseShared(7);
  await settle();
  t.ok(ex.granted, 'granted when the last shared holder left');

  const sh = track(g.acquireShared(7));
  const ex2 = track(g.acquireExclusive(7));
  await settle();
  t.notOk(sh.granted, 'shared waits for the exclusive holder');
  t.notOk(ex2.granted, 'exclusive waits for the exclusive holder');
  t.equal(g.busy, 1);
  g.releaseExclusive(7);
  await settle();
  t.ok(sh.granted, 'the shared waiter (first in line) goes next');
  t.notOk(ex2.granted, 'the second exclusive waits for it');
  g.releaseShared(7);
  await settle();
  t.ok(ex2.granted);
  g.releaseExclusive(7);
  t.equal(g.busy, 0, 'deleted when free');

  t.equal(g.acquireExclusive(3), undefined, 'exclusive on a free object: granted synchronously');
  g.releaseExclusive(3);
  t.equal(g.busy, 0);
});

t.test('FIFO: a waiting exclusive is not starved by later shared acquirers', async (t) => {
  const g = new ObjectGates();
  const order: string[] = [];
  g.acquireShared(0);
  const ex = g.acquireExclusive(0);
  t.ok(ex, 'exclusive must wait');
  void ex!.then(() => order.push('X'));
  const later: Promise<void>[] = [];
  for (let i = 0; i < 5; i++) {
    const p = g.acquireShared(0);
    t.ok(p, `shared acquirer ${i} after a waiting exclusive must queue`);
    later.push(p!.then(() => { order.push(`s${i}`); }));
  }
  await settle();
  t.same(order, [], 'nobody passes the first holder');
  g.releaseShared(0);
  await settle();
  t.same(order, ['X'], 'exclusive goes first, before the later shared ones');
  g.releaseExclusive(0);
  await Promise.all(later);
  t.same(order, ['X', 's0', 's1', 's2', 's3', 's4'], 'then every queued shared holder at once');
  for (let i = 0; i < 5; i++) g.releaseShared(0);
  t.equal(g.busy, 0);
});

t.test('FIFO across mixed waiters: grants follow arrival order in batches', async (t) => {
  const g = new ObjectGates();
  const order: string[] = [];
  const held = new Set<string>();
  g.acquireExclusive(0);
  const queue: [string, boolean][] = [['a', false], ['b', false], ['X', true], ['c', false], ['Y', true], ['Z', true], ['d', false]];
  for (const [name, exclusive] of queue) {
    const p = exclusive ? g.acquireExclusive(0) : g.acquireShared(0);
    t.ok(p, `${name} queues`);
    void p!.then(() => { order.push(name); held.add(name); });
  }
  const release = (name: string, exclusive: boolean): void => {
    held.delete(name);
    if (exclusive) g.releaseExclusive(0);
    else g.releaseShared(0);
  };
  g.releaseExclusive(0);
  await settle();
  t.same([...held].sort(), ['a', 'b'], 'the two shared at the head together');
  release('a', false);
  await settle();
  t.same([...held], ['b'], 'X waits for b');
  release('b', false);
  await settle();
  t.same([...held], ['X']);
  release('X', true);
  await settle();
  t.same([...held], ['c'], 'c alone: Y is next in line');
  release('c', false);
  await settle();
  t.same([...held], ['Y']);
  release('Y', true);
  await settle();
  t.same([...held], ['Z']);
  release('Z', true);
  await settle();
  t.same([...held], ['d']);
  release('d', false);
  t.same(order, ['a', 'b', 'X', 'c', 'Y', 'Z', 'd']);
  t.equal(g.busy, 0);
});

t.test('random stress: no exclusive holder overlaps any other holder', async (t) => {
  for (const seed of [1, 2, 3, 42]) {
    const rnd = mulberry32(seed);
    const g = new ObjectGates();
    const objects = 4;
    const state = Array.from({ length: objects }, () => ({ shared: 0, exclusive: 0 }));
    const violations: string[] = [];
    let maxShared = 0;
    let grants = 0;

    const check = (i: number, what: string): void => {
      const s = state[i]!;
      if (s.exclusive > 1 || (s.exclusive === 1 && s.shared > 0)) {
        violations.push(`seed ${seed} object ${i} ${what}: ${s.exclusive} exclusive, ${s.shared} shared`);
      }
    };
    const hold = (): Promise<void> => new Promise((resolve) => {
      const n = Math.floor(rnd() * 3);
      if (n === 0) queueMicrotask(resolve);
      else setTimeout(resolve, n - 1);
    });

    const worker = async (w: number): Promise<void> => {
      for (let k = 0; k < 60; k++) {
        const i = Math.floor(rnd() * objects);
        const exclusive = rnd() < 0.3;
        const s = state[i]!;
        if (exclusive) {
          await g.acquireExclusive(i);
          s.exclusive++;
          check(i, `worker ${w} took it exclusively`);
          await hold();
          check(i, `worker ${w} while holding it exclusively`);
          s.exclusive--;
          g.releaseExclusive(i);
        } else {
          await g.acquireShared(i);
          s.shared++;
          maxShared = Math.max(maxShared, s.shared);
          check(i, `worker ${w} took it shared`);
          await hold();
          s.shared--;
          g.releaseShared(i);
        }
        grants++;
      }
    };
    await Promise.all(Array.from({ length: 12 }, (_, w) => worker(w)));
    t.same(violations.slice(0, 5), [], `seed ${seed}: ${grants} grants, no overlap`);
    t.equal(grants, 12 * 60, `seed ${seed}: nobody starved or deadlocked`);
    t.ok(maxShared > 1, `seed ${seed}: shared holders did overlap (max ${maxShared})`);
    t.equal(g.busy, 0, `seed ${seed}: every gate deleted at the end`);
  }
});
