/**
 * src/mapper/group-commit.ts: one run at a time, requests during a run share
 * the next run, failures reject only their own requesters.
 */
import t from 'tap';
import { GroupCommit } from '../../../src/mapper/group-commit.js';

t.test('requests during a run share one next run that sees their state', async (t) => {
  let state = 0;
  const seen: number[] = [];
  const releases: (() => void)[] = [];
  const gc = new GroupCommit(() => {
    seen.push(state); // captured synchronously, as the contract asks
    return new Promise<void>((r) => releases.push(r));
  });
  state = 1;
  const a = gc.request();
  t.ok(gc.busy);
  state = 2;
  const b = gc.request();
  state = 3;
  const c = gc.request();
  t.equal(b, c, 'joined the same next run');
  t.same(seen, [1], 'one run in flight');
  releases[0]!();
  await a;
  t.same(seen, [1, 3], 'the next run started with the latest state');
  releases[1]!();
  await Promise.all([b, c]);
  t.equal(gc.runs, 2);
  t.notOk(gc.busy);
  await gc.idle();
});

t.test('a failed run rejects its requesters; the next run tries again', async (t) => {
  let n = 0;
  const gc = new GroupCommit(async () => {
    n++;
    await new Promise((r) => setImmediate(r));
    if (n === 1) throw new Error('boom');
  });
  const a = gc.request();
  const b = gc.request();
  await t.rejects(a, /boom/);
  await b;
  t.equal(n, 2);
  const sync = new GroupCommit(() => { throw new Error('sync throw'); });
  await t.rejects(sync.request(), /sync throw/);
  t.notOk(sync.busy);
});
