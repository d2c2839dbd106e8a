/**
 * Stress: N lockers hammer one volume's lock — acquire (waiting, with or
 * without a handover request), hold for a few operations, release, hold
 * until asked, or crash (destroy: renewals/watch stop, the lock is left
 * behind, the others must fence and take over) — on the file store and on
 * RADOS. On RADOS a crashed holder goes on writing blindly for a while, as
 * a paused process's queued writes would: the fence must refuse them. Each locker is its own node: its own backend, and on RADOS its own
 * client connection (a crashed one is replaced by a new connection).
 *
 * Invariant checkers:
 * - a shared counter in the store (a file / a RADOS data object), written
 *   only by the owner: at every step of a tenure the owner reads the
 *   counter and requires exactly the value it wrote last (nobody else wrote
 *   meanwhile), then writes value + 1 — right after checkHeld(), as the
 *   daemon's write path will. At the end the counter equals the sum of
 *   every locker's successful increments (no update lost to an overlap);
 * - in this process, a 1 ms sampler and every step count the moments when
 *   two lockers' checkHeld() are true at once: must be zero.
 * The seed is printed; ARCHIPELAGO_STRESS_SEED replays its choices (timing
 * still varies).
 */
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadRados } from '../../src/blockers/rados/binding.js';
import { RadosBlocker } from '../../src/blockers/rados/blocker.js';
import { createLogger } from '../../src/common/log.js';
import { mulberry32 } from '../../src/common/prng.js';
import { LockAbortedError, LockBusyError, LockLostError, isFencedError } from '../../src/locks/errors.js';
import { FileLockBackend } from '../../src/locks/file-backend.js';
import { RadosLockBackend } from '../../src/locks/rados-backend.js';
import type { LockBackend } from '../../src/locks/types.js';
import { VolumeLock } from '../../src/locks/volume-lock.js';
import { startCeph } from '../helpers/ceph.js';
import { tempDir } from '../helpers/run.js';

type Tap = Parameters<Parameters<typeof t.test>[0]>[0];

const LOCKERS = 4;
const DURATION_MS = 8_000;
const seed = Number(process.env.ARCHIPELAGO_STRESS_SEED ?? Math.floor(Math.random() * 2 ** 31));
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
/** LOCK_STRESS_DEBUG=1: the lock layer's log on stderr. */
const debugLog = process.env.LOCK_STRESS_DEBUG ? createLogger({ level: 'debug' }) : undefined;

/** The shared counter, as one locker reaches it. */
interface Counter {
  read(): Promise<{ v: number; w: string }>;
  write(v: number, w: string): Promise<void>;
  close(): Promise<void>;
}

const encode = (v: number, w: string) => Buffer.from(JSON.stringify({ v, w }).padEnd(63) + '\n');
const decode = (b: Buffer) => (b.length === 0 || b[0] === 0 ? { v: 0, w: '' } : (JSON.parse(b.toString()) as { v: number; w: string }));

interface Node {
  id: string;
  lock: VolumeLock;
  counter: Counter;
  /** The tenure's current step, awaited by the handover handler (drain). */
  step: Promise<void> | null;
  drain: boolean;
  close(): Promise<void>;
}

interface Stats {
  tenures: number;
  increments: number;
  handovers: number;
  takeovers: number;
  crashes: number;
  busy: number;
  violations: string[];
  overlaps: number;
  fencedWrites: number;
}

async function hammer(t: Tap, kind: string, crashRate: number, zombies: boolean, makeNode: (id: string) => Promise<Node>, final: () => Promise<number>): Promise<Stats> {
  const rng = mulberry32(seed + kind.length);
  const stats: Stats = { tenures: 0, increments: 0, handovers: 0, takeovers: 0, crashes: 0, busy: 0, violations: [], overlaps: 0, fencedWrites: 0 };
  const nodes: Node[] = [];
  let made = 0;
  const holders = () => nodes.filter((n) => n.lock.checkHeld()).length;
  const wire = (n: Node) => {
    n.lock.onReleaseRequested = async () => {
      n.drain = true;
      await n.step;
    };
    n.lock.on('acquired', (m: { handover: boolean; takeover: boolean }) => {
      if (m.handover) stats.handovers++;
      if (m.takeover) stats.takeovers++;
    });
    return n;
  };
  for (let i = 0; i < LOCKERS; i++) nodes.push(wire(await makeNode(`${kind}${made++}`)));
  const sampler = setInterval(() => {
    if (holders() > 1) stats.overlaps++;
  }, 1);
  const end = performance.now() + DURATION_MS;

  const tenure = async (n: Node) => {
    let expected = -1;
    const ops = 1 + Math.floor(rng() * 6);
    for (let i = 0; i < ops && !n.drain; i++) {
      if (!n.lock.checkHeld()) return;
      if (holders() > 1) stats.overlaps++;
      const cur = await n.counter.read();
      if (expected >= 0 && (cur.v !== expected || cur.w !== n.id)) {
        stats.violations.push(`${n.id} wrote ${expected} and read ${cur.v} by ${cur.w}`);
      }
      if (!n.lock.checkHeld()) return;
      try {
        await n.counter.write(cur.v + 1, n.id);
      } catch (err) {
        if (!isFencedError(err)) throw err;
        stats.fencedWrites++;
        n.lock.reportFenced(err);
        return;
      }
      stats.increments++;
      expected = cur.v + 1;
      await sleep(rng() * 3);
    }
  };

  /**
   * RADOS: the crashed node goes on writing the counter blindly (a paused
   * process's writes in flight) for 300 ms. Each write lands before the
   * takeover's fence (and counts) or is refused with EFENCED afterwards.
   */
  const zombie = async (n: Node) => {
    const until = performance.now() + 300;
    while (performance.now() < until) {
      try {
        const cur = await n.counter.read();
        await n.counter.write(cur.v + 1, `${n.id}-zombie`);
        stats.increments++;
      } catch (err) {
        if (!isFencedError(err)) throw err;
        stats.fencedWrites++;
        return;
      }
      await sleep(5);
    }
  };

  const running = new Set<Promise<void>>();

  const run = async (slot: number) => {
    while (performance.now() < end) {
      const n = nodes[slot]!;
      n.drain = false;
      try {
        await n.lock.acquire({ wait: 3000, requestHandover: rng() < 0.6 });
      } catch (err) {
        if (err instanceof LockBusyError || err instanceof LockAbortedError) {
          stats.busy++;
          continue;
        }
        if (err instanceof LockLostError && err.fenced) {
          // this node's client was fenced (it had crashed): a new node in its place
          await n.close();
          nodes[slot] = wire(await makeNode(`${kind}${made++}`));
          continue;
        }
        throw err;
      }
      stats.tenures++;
      n.step = tenure(n);
      await n.step;
      n.step = null;
      const what = rng();
      if (what < crashRate) {
        // crash while owning: nothing released, renewals and watch stop
        stats.crashes++;
        const wasOwner = n.lock.state === 'owner';
        await n.lock.destroy();
        nodes[slot] = wire(await makeNode(`${kind}${made++}`));
        if (zombies && wasOwner) {
          const z = zombie(n).finally(() => n.close());
          running.add(z);
          void z.finally(() => running.delete(z));
        }
        else await n.close();
      } else if (what < 0.3 && n.lock.state === 'owner') {
        // keep it until someone asks (at most 100 ms)
        await Promise.race([new Promise((r) => n.lock.once('released', r)), sleep(100)]);
        await n.lock.release().catch(() => undefined);
      } else {
        await n.lock.release().catch(() => undefined);
      }
      if (n.lock.state === 'lost') await n.lock.release().catch(() => undefined);
    }
  };

  try {
    await Promise.all(Array.from({ length: LOCKERS }, (_, i) => run(i)));
  } finally {
    await Promise.allSettled([...running]);
    clearInterval(sampler);
    for (const n of nodes) {
      await n.lock.close().catch(() => undefined);
      await n.close();
    }
  }
  const value = await final();
  t.comment(`${kind} stress (seed ${seed}): ${stats.tenures} tenures, ${stats.increments} increments, ${stats.handovers} handovers, ` +
    `${stats.takeovers} takeovers after ${stats.crashes} crashes, ${stats.busy} timed-out waits, ${stats.fencedWrites} writes refused by fencing`);
  t.same(stats.violations, [], 'no owner ever saw the counter changed by someone else during its tenure');
  t.equal(stats.overlaps, 0, 'checkHeld() was never true for two lockers at once');
  t.equal(value, stats.increments, 'the counter equals the increments made: no update lost to an overlap');
  t.ok(stats.tenures > 20, `many tenures (${stats.tenures})`);
  t.ok(stats.handovers > 0, 'handovers happened');
  if (zombies && stats.takeovers > 0) t.ok(stats.fencedWrites > 0, 'crashed holders\' blind writes were refused once fenced');
  return stats;
}

t.test('file store', async (t) => {
  const root = await tempDir(t);
  const vol = '5e55e55e55e55e55';
  const file = path.join(root, 'counter');
  fs.writeFileSync(file, '');
  const opts = { leaseMs: 400, renewMs: 80, marginMs: 80, pollMs: 10 };
  await hammer(t, 'file', 0.015, false, async (id) => {
    const backend: LockBackend = new FileLockBackend(root, vol, { ...opts, log: debugLog });
    const fd = fs.openSync(file, 'r+');
    const buf = Buffer.alloc(64);
    return {
      id, step: null, drain: false,
      lock: new VolumeLock(backend, { identity: { node: id, instance: id }, log: debugLog }),
      counter: {
        read: async () => {
          const n = await new Promise<number>((res, rej) => fs.read(fd, buf, 0, 64, 0, (e, got) => (e ? rej(e) : res(got))));
          return decode(buf.subarray(0, n));
        },
        write: (v, w) => new Promise<void>((res, rej) => fs.write(fd, encode(v, w), 0, 64, 0, (e) => (e ? rej(e) : res()))),
        close: async () => fs.closeSync(fd),
      },
      close: async () => fs.closeSync(fd),
    };
  }, async () => decode(fs.readFileSync(file)).v);
});

t.test('RADOS', async (t) => {
  const ceph = await startCeph(t);
  const vol = '5e55e55e55e5ad05';
  const obj = `counter.${vol}`;
  const rados = loadRados();
  const connect = () => rados.connect({ conf: ceph.conf, config: { rados_osd_op_timeout: '30', rados_mon_op_timeout: '30', objecter_tick_interval: '1' } });
  await hammer(t, 'rados', 0.04, true, async (id) => {
    const cluster = await connect();
    const maps = await cluster.openPool(ceph.pools.maps);
    const data = new RadosBlocker(await cluster.openPool(ceph.pools.data));
    const backend = new RadosLockBackend(maps, cluster, vol, { pollMs: 50, notifyTimeoutMs: 1000, verifyMs: 1000, fenceSeconds: 600, log: debugLog });
    const buf = Buffer.alloc(64);
    let closed = false;
    return {
      id, step: null, drain: false,
      lock: new VolumeLock(backend, { identity: { node: id, instance: id }, log: debugLog }),
      counter: {
        read: async () => {
          const n = await data.read(obj, 0, 64, buf).catch((e: { code?: string }) => (e.code === 'ENOENT' ? 0 : Promise.reject(e)));
          return decode(buf.subarray(0, n));
        },
        write: (v, w) => data.write(obj, 0, encode(v, w)),
        close: async () => undefined,
      },
      close: async () => {
        if (closed) return;
        closed = true;
        await data.close().catch(() => undefined);
        await cluster.shutdown();
      },
    };
  }, async () => {
    const cluster = await connect();
    try {
      const data = new RadosBlocker(await cluster.openPool(ceph.pools.data));
      return decode(await data.readFull(obj)).v;
    } finally {
      await cluster.shutdown();
    }
  });
});
