/**
 * The RADOS lock owner after a watch error (src/locks/rados-backend.ts,
 * #recheck): it re-watches and asks cls_lock; while the cluster times out it
 * asks again and keeps the lock; an answer that the lock is gone, a fence,
 * or any other error makes it lost. The cluster is a scripted fake here
 * (the calls the owner makes and their outcomes); the real cluster case is
 * test/integration/backend-faults-rados.test.ts (an OSD paused past
 * op_timeout) and locks-rados.test.ts (a fenced owner).
 */
import t from 'tap';
import { RadosError, type RadosCluster, type RadosIoCtx, type RadosWatch, type RadosWatchEvent } from '../../../src/blockers/rados/binding.js';
import { LockLostError } from '../../../src/locks/errors.js';
import { RadosLockBackend } from '../../../src/locks/rados-backend.js';
import type { LockSink } from '../../../src/locks/types.js';

const ETIMEDOUT = 110;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Outcomes for the next calls of an operation: an errno to fail with, or 0 to succeed. */
type Script = number[];

function fakeCluster(script: { watch: Script; assert: Script }) {
  const calls: string[] = [];
  let onEvent: ((e: RadosWatchEvent) => void) | null = null;
  const next = (op: 'watch' | 'assert'): void => {
    const errno = script[op].shift() ?? 0;
    calls.push(`${op}:${errno}`);
    if (errno !== 0) throw new RadosError(errno, op, `${op}: scripted errno ${errno}`);
  };
  const watch: RadosWatch = {
    cookie: 1n,
    ack: async () => {},
    check: () => 0,
    close: async () => {},
  } as unknown as RadosWatch;
  const io = {
    watch: async (_oid: string, cb: (e: RadosWatchEvent) => void) => { next('watch'); onEvent = cb; return watch; },
    lockExclusive: async () => {},
    exec: async (_oid: string, cls: string, method: string) => {
      if (cls === 'lock' && method === 'assert_locked') next('assert');
      return Buffer.alloc(0);
    },
    unlock: async () => {},
  } as unknown as RadosIoCtx;
  const maps = { asked: 0 };
  const cluster = { instanceId: () => 4242, waitForLatestOsdmap: async () => { maps.asked++; } } as unknown as RadosCluster;
  return { io, cluster, calls, maps, breakWatch: (errno: number) => onEvent!({ type: 'error', errno }) };
}

function sink() {
  const lost: LockLostError[] = [];
  const s: LockSink = { releaseRequested: () => false, changed: () => {}, lost: (e) => { lost.push(e); }, validity: () => {} };
  return { s, lost };
}

const me = { node: 'n1', instance: 'i1', pid: 1, token: 'cookie-1', since: 0 };

async function owner(script: { watch: Script; assert: Script }) {
  const c = fakeCluster(script);
  const b = new RadosLockBackend(c.io, c.cluster, 'vol1', { pollMs: 10, verifyMs: 0 });
  const k = sink();
  b.attach(k.s);
  t.same(await b.tryAcquire(me), { acquired: true });
  c.calls.length = 0; // the acquisition's own watch
  return { b, c, lost: k.lost };
}

t.test('timeouts while re-checking: asked again, the lock is kept once cls_lock says it is ours', async (t) => {
  const { b, c, lost } = await owner({ watch: [0, ETIMEDOUT, ETIMEDOUT, 0], assert: [ETIMEDOUT, 0] });
  c.breakWatch(107);
  await sleep(200);
  t.same(c.calls, ['watch:110', 'watch:110', 'watch:0', 'assert:110', 'assert:0'], 're-watched and re-asked through the timeouts');
  t.same(lost, [], 'not lost');
  t.ok(c.maps.asked >= 1, 'after a timeout it asked the mon for the newest osdmap');
  await b.verify(); // still held: asks cls_lock with our cookie
  await b.close();
});

t.test('timeouts, then cls_lock says the lock is gone: lost', async (t) => {
  const { b, c, lost } = await owner({ watch: [0, ETIMEDOUT, 0], assert: [16] });
  c.breakWatch(107);
  await sleep(200);
  t.equal(lost.length, 1, 'lost once');
  t.match(lost[0]!.message, /gone \(broken\)/);
  t.same(c.calls, ['watch:110', 'watch:0', 'assert:16']);
  await b.close();
});

t.test('an error other than a timeout while re-checking: lost at once; fenced (108) says so', async (t) => {
  const eio = await owner({ watch: [0, 5], assert: [] });
  eio.c.breakWatch(107);
  await sleep(100);
  t.equal(eio.lost.length, 1);
  t.match(eio.lost[0]!.message, /watch error 107 \(ENOTCONN\), and re-checking failed/);
  t.notOk(eio.lost[0]!.fenced);
  t.same(eio.c.calls, ['watch:5'], 'not asked again');
  await eio.b.close();

  const fenced = await owner({ watch: [0, 0], assert: [108] });
  fenced.c.breakWatch(107);
  await sleep(100);
  t.equal(fenced.lost.length, 1);
  t.ok(fenced.lost[0]!.fenced, 'a 108 from assert_locked: fenced');
  await fenced.b.close();
});

t.test('closing stops the re-checking', async (t) => {
  const { b, c, lost } = await owner({ watch: [0, ...Array(1000).fill(ETIMEDOUT)], assert: [] });
  c.breakWatch(107);
  await sleep(50);
  await b.close();
  const n = c.calls.length;
  await sleep(100);
  t.equal(c.calls.length, n, 'no more attempts after close');
  t.same(lost, []);
});
