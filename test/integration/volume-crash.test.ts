/**
 * The model-based crash test (DESIGN.md §6) for composed volumes on the file
 * store: random sequences of writes (unaligned, across objects, some FUA),
 * trims, write-zeroes, flushes, concurrent bursts and restarts (SIGKILL and
 * SIGTERM, some in the middle of a burst), driven through libnbd against the
 * real daemon, checked against an in-memory reference.
 *
 * The model, per 512-byte sector:
 *   - `cur`: what a read must return while the daemon runs (every
 *     acknowledged write applied in order);
 *   - `pending`: for sectors changed since the last durable point, the set of
 *     values a crash may leave: the durable value, plus the result of any
 *     subset of the later unflushed writes. A completed FLUSH empties it; a
 *     FUA write keeps only the candidates that contain its bytes. Sets larger
 *     than CAP become "anything" (counted, reported) to stay sound and small.
 * After SIGKILL every sector must be one of its candidates (or `cur` when
 * not pending); after SIGTERM (drain, flush) everything acknowledged must be
 * there exactly. What a crash left is then the new durable state: we kill
 * processes, we do not cut power, so the kernel keeps what the daemon wrote.
 * Every restart must load the map: `archipelago info` works and the daemon
 * serves the volume again (a full read loads every map chunk).
 *
 * The model, the PRNG and the libnbd driver live in test/helpers/crash-model.ts,
 * shared with the crash-loop soak (test/helpers/crash-loop.ts).
 *
 * Reproduce a run: ARCHIPELAGO_MODEL_SEED=<seed> (printed at the start and
 * in every failure), ARCHIPELAGO_MODEL_STEPS=<n> for a longer run.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import { cli, startDaemon, type Daemon } from '../helpers/daemon.js';
import { tempStore } from '../helpers/stores.js';
import { diag } from '../helpers/run.js';
import {
  NbdDriver as Driver, SectorModel, driverScript, makeRng, randomData as randomBytes, type DriverReply as Reply,
} from '../helpers/crash-model.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const OBJ = 64 * KiB;
const SECTOR = 512;
const SECTORS = SIZE / SECTOR;
const CAP = 32;
/** A full read compared with the model every this many steps. */
const VERIFY_EVERY = 25;

const SEED_ENV = process.env.ARCHIPELAGO_MODEL_SEED;
const STEPS_ENV = process.env.ARCHIPELAGO_MODEL_STEPS;
if ((SEED_ENV !== undefined && !/^\d+$/.test(SEED_ENV)) || (STEPS_ENV !== undefined && !/^[1-9]\d*$/.test(STEPS_ENV))) {
  throw new Error('ARCHIPELAGO_MODEL_SEED and ARCHIPELAGO_MODEL_STEPS must be whole numbers (steps > 0)');
}
const SEED = SEED_ENV !== undefined ? Number(SEED_ENV) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
const STEPS = STEPS_ENV !== undefined ? Number(STEPS_ENV) : 400;

// ---------------------------------------------------------------- PRNG, model, driver (test/helpers/crash-model.ts)

const rng = makeRng(SEED);
/** Integer in [0, n). */
// Every restart after a SIGKILL waits for the dead daemon's volume lock to be
// fenced: on files its lease (lock-lease) plus a margin; a 4 s lease keeps the
// test's many restarts short (RADOS: the watch timeout, test.sh sets 5 s).
const FAST_TAKEOVER = ['--lock-lease', '4'];
const rand = (n: number) => Math.floor((rng() / 2 ** 32) * n);
const chance = (p: number) => rng() / 2 ** 32 < p;
const randomData = (len: number): Buffer => randomBytes(rng, len);

// ---------------------------------------------------------------- random operations

interface Range { off: number; len: number }

/** Offsets: byte-random, 512-aligned, 4K-aligned, or just before an object boundary. */
function randomOffset(): number {
  const k = rand(10);
  if (k < 4) return rand(SIZE);
  if (k < 6) return rand(SECTORS) * SECTOR;
  if (k < 8) return rand(SIZE / 4096) * 4096;
  return Math.max(0, (1 + rand(SIZE / OBJ - 1)) * OBJ - 1 - rand(3000));
}

function randomWriteRange(): Range {
  const k = rand(20);
  let len: number;
  if (k < 8) len = 1 + rand(4096);
  else if (k < 13) len = 1 + rand(OBJ);
  else if (k < 17) len = OBJ + rand(3 * OBJ);
  else len = [512, 4096, OBJ, 2 * OBJ][rand(4)]!;
  const off = randomOffset();
  return { off, len: Math.max(1, Math.min(len, SIZE - off)) };
}

/** Zero/trim ranges: whole objects (aligned) or anything, often covering whole objects inside. */
function randomZeroRange(): Range {
  if (chance(0.4)) {
    const first = rand(SIZE / OBJ);
    const n = 1 + rand(Math.min(4, SIZE / OBJ - first));
    return { off: first * OBJ, len: n * OBJ };
  }
  const off = randomOffset();
  const len = 1 + rand(chance(0.5) ? 8192 : 3 * OBJ);
  return { off, len: Math.min(len, SIZE - off) };
}

function overlaps(a: Range, list: Range[]): boolean {
  return list.some((b) => a.off < b.off + b.len && b.off < a.off + a.len);
}

/**
 * How often each kind of step runs (percent). Restarts cost most of the
 * time (a process start each); 8 % of 400 steps keeps the file near 40 s.
 */
const STEP_WEIGHTS = [
  ['write', 47], ['trim', 8], ['zero', 10], ['flush', 9], ['read', 8], ['burst', 10],
  ['sigkill', 3], ['sigterm', 2], ['burst-sigkill', 2], ['burst-sigterm', 1],
] as const;
type StepKind = typeof STEP_WEIGHTS[number][0];

function pickStep(): StepKind {
  let k = rand(STEP_WEIGHTS.reduce((a, [, w]) => a + w, 0));
  for (const [kind, w] of STEP_WEIGHTS) {
    if (k < w) return kind;
    k -= w;
  }
  return 'write';
}

// ---------------------------------------------------------------- the test

t.test(`model-based crash test: seed ${SEED}, ${STEPS} steps`, async (t) => {
  t.comment(`ARCHIPELAGO_MODEL_SEED=${SEED} ARCHIPELAGO_MODEL_STEPS=${STEPS}`);
  const store = await tempStore(t);
  const NAME = 'model';
  const created = await cli(['create', NAME, '--size', String(SIZE), '--object-size', '64K', '--store', store]);
  t.equal(created.code, 0, 'create the volume', diag(created.result));

  const script = driverScript();
  await fs.access(script);
  const driver = new Driver(t, script);
  const model = new SectorModel(SIZE, CAP);
  const log: string[] = [];
  const counts: Record<string, number> = {};
  const count = (k: string) => { counts[k] = (counts[k] ?? 0) + 1; };
  /** Wall time per kind of step, ms (to keep the run inside its budget). */
  const times: Record<string, number> = {};
  let step = 0;
  let failed = false;
  let lastGeneration = 0;
  /**
   * The daemon opens volumes read-only and bumps the generation at the first
   * change; so the generation must grow across a session that changed the
   * volume (object names are never reused), and must not go back otherwise.
   */
  let changed = false;

  let daemon: Daemon = await startDaemon(t, { store, extraArgs: FAST_TAKEOVER });

  const fail = (what: string, extra: Record<string, unknown> = {}) => {
    failed = true;
    t.fail(`seed ${SEED}, step ${step}: ${what}`, { seed: SEED, step, ...extra, recentOps: log.slice(-40), daemonStderr: daemon.stderr().slice(-4000) });
  };
  const must = async (req: Record<string, unknown>): Promise<Reply> => {
    const r = await driver.request(req);
    if (!r.ok) fail(`${String(req.op)} failed: ${r.error}`, { errno: r.errno });
    return r;
  };
  const connect = async () => {
    const r = await must({ op: 'connect', uri: daemon.uri(NAME) });
    if (r.ok && r.size !== SIZE) fail(`size ${r.size}, expected ${SIZE}`);
  };
  const readAll = async (): Promise<Buffer | null> => {
    const r = await must({ op: 'read', off: 0, len: SIZE });
    return r.ok ? Buffer.from(r.data!, 'base64') : null;
  };
  const describeSectors = (bad: number[], actual: Buffer) => bad.slice(0, 5).map((s) => {
    const off = s * SECTOR;
    const set = model.pending.get(s);
    return {
      sector: s, offset: off, object: Math.floor(off / OBJ),
      actual: actual.toString('hex', off, off + 16), expected: model.cur.toString('hex', off, off + 16),
      candidates: set === undefined ? 1 : set === null ? 'any' : set.size,
      opsTouching: log.filter((l) => {
        const m = /@(\d+)\+(\d+)/.exec(l);
        return m !== null && Number(m[1]) < off + SECTOR && off < Number(m[1]) + Number(m[2]);
      }).slice(-10),
    };
  });
  const verifyExact = async (when: string) => {
    const actual = await readAll();
    if (!actual) return;
    if (actual.equals(model.cur)) return;
    const bad: number[] = [];
    for (let s = 0; s < SECTORS && bad.length < 5; s++) {
      if (!actual.subarray(s * SECTOR, (s + 1) * SECTOR).equals(model.cur.subarray(s * SECTOR, (s + 1) * SECTOR))) bad.push(s);
    }
    fail(`${when}: volume differs from the model`, { sectors: describeSectors(bad, actual) });
  };

  /**
   * Stops the daemon (kill or term), checks the map loads, starts it again
   * and checks the data. `stopped`: the daemon is already down (a burst
   * stopped it) and the model already says what may be lost.
   */
  const restart = async (how: 'kill' | 'term', stopped = false) => {
    await driver.request({ op: 'disconnect' }).catch(() => undefined);
    if (stopped) {
      // nothing to stop
    } else if (how === 'kill') {
      await daemon.kill();
    } else {
      const code = await daemon.stop();
      if (code !== 0) fail(`SIGTERM: daemon exited with ${daemon.exitStatus()}`);
      model.flushed(); // a graceful stop flushes everything acknowledged
    }
    // `info` reads the header the dead daemon left; the new daemon opens the
    // volume read-only and writes nothing before the first change, so the
    // two may start together (it saves a process start per restart).
    const [info, next] = await Promise.all([
      cli(['info', NAME, '--json', '--store', store]),
      startDaemon(t, { store, extraArgs: FAST_TAKEOVER }),
    ]);
    daemon = next;
    if (info.code !== 0) {
      fail(`archipelago info after ${how}: exit ${info.code}`, diag(info.result));
      return;
    }
    const generation = (JSON.parse(info.stdout) as { generation: number }).generation;
    log.push(`${step} restarted after ${how}${stopped ? ' (in a burst)' : ''}: generation ${generation}`);
    if (changed ? !(generation > lastGeneration) : generation < lastGeneration) {
      fail(`generation ${generation} after ${how}, expected ${changed ? 'above' : 'at least'} ${lastGeneration}`);
    }
    lastGeneration = generation;
    changed = false;
    await connect();
    const actual = await readAll();
    if (!actual) return;
    const bad = model.checkAfterCrash(actual);
    if (bad.length > 0) {
      fail(`after ${how === 'kill' ? 'SIGKILL' : 'SIGTERM'} and restart: ${bad.length} sectors hold a value no allowed state explains`,
        { sectors: describeSectors(bad, actual), pendingSectors: model.pending.size });
      return;
    }
    if (how === 'term' && !stopped && !actual.equals(model.cur)) fail('after SIGTERM: acknowledged data missing');
    model.settle(actual);
  };

  /** Several non-overlapping writes in flight at once; optionally a kill or term while they run. */
  const burst = async (stop: 'none' | 'kill' | 'term') => {
    const writes: (Range & { data: Buffer; fua: boolean })[] = [];
    const n = 2 + rand(10);
    for (let i = 0; i < n * 3 && writes.length < n; i++) {
      const r = randomWriteRange();
      if (overlaps(r, writes)) continue;
      writes.push({ ...r, data: randomData(r.len), fua: chance(0.2) });
    }
    log.push(`${step} burst/${stop} ${writes.map((w) => `@${w.off}+${w.len}${w.fua ? 'F' : ''}`).join(' ')}`);
    const pending = driver.request({ op: 'burst', writes: writes.map((w) => ({ off: w.off, data: w.data.toString('base64'), fua: w.fua })) });
    let stopped: Promise<unknown> | null = null;
    if (stop !== 'none') {
      await new Promise((r) => setTimeout(r, rand(4)));
      stopped = stop === 'kill' ? daemon.kill() : daemon.stop();
    }
    const reply = await pending;
    if (reply.done?.some(Boolean)) changed = true;
    // A client that sees the server end the connection closes its side (an
    // idle one would keep the graceful stop waiting for its grace period).
    if (stop === 'term') await driver.request({ op: 'disconnect' });
    const code = await stopped;
    if (stop === 'none' && !reply.ok) {
      fail(`burst failed: ${reply.error}`);
      return;
    }
    if (stop === 'term') {
      if (code !== 0) fail(`SIGTERM during a burst: daemon exited with ${daemon.exitStatus()}`, { burstReply: { ...reply, data: undefined } });
      model.flushed(); // all acknowledged before the burst is durable after a graceful stop
    }
    // Every write of the burst may or may not have landed ...
    for (const w of writes) model.write(w.off, w.len, w.data, false);
    // ... except those acknowledged that must: FUA ones, or all of them on a graceful stop.
    const done = reply.done ?? writes.map(() => false);
    writes.forEach((w, i) => {
      if (done[i] && (w.fua || stop === 'term')) model.write(w.off, w.len, w.data, true);
    });
    if (stop === 'none') return;
    count(`burst-${stop}-acked-${done.filter(Boolean).length === writes.length ? 'all' : done.some(Boolean) ? 'some' : 'none'}`);
    await restart(stop, true);
  };

  try {
    await connect();
    await verifyExact('at start');
    for (step = 1; step <= STEPS && !failed; step++) {
      const kind = pickStep();
      const started = Date.now();
      switch (kind) {
      case 'write': {
        const r = randomWriteRange();
        const fua = chance(0.15);
        const data = randomData(r.len);
        log.push(`${step} write${fua ? '/fua' : ''} @${r.off}+${r.len}`);
        count(fua ? 'write-fua' : 'write');
        const rep = await must({ op: 'write', off: r.off, data: data.toString('base64'), fua });
        if (rep.ok) model.write(r.off, r.len, data, fua);
        changed ||= rep.ok;
        break;
      }
      case 'trim': {
        const r = randomZeroRange();
        const fua = chance(0.2);
        log.push(`${step} trim${fua ? '/fua' : ''} @${r.off}+${r.len}`);
        count('trim');
        const rep = await must({ op: 'trim', off: r.off, len: r.len, fua });
        if (rep.ok) model.write(r.off, r.len, null, fua);
        changed ||= rep.ok;
        break;
      }
      case 'zero': {
        const r = randomZeroRange();
        const fua = chance(0.2);
        const noHole = chance(0.25);
        const fast = !noHole && chance(0.2);
        log.push(`${step} zero${fua ? '/fua' : ''}${noHole ? '/nohole' : ''}${fast ? '/fast' : ''} @${r.off}+${r.len}`);
        count(fast ? 'zero-fast' : 'zero');
        const rep = await driver.request({ op: 'zero', off: r.off, len: r.len, fua, no_hole: noHole, fast_zero: fast });
        if (rep.ok) {
          model.write(r.off, r.len, null, fua);
          changed = true;
        } else if (fast && (rep.errno === 'ENOTSUP' || rep.errno === 'EOPNOTSUPP')) count('zero-fast-refused'); // nothing changed
        else fail(`zero failed: ${rep.error}`, { errno: rep.errno });
        break;
      }
      case 'flush': {
        log.push(`${step} flush`);
        count('flush');
        const rep = await must({ op: 'flush' });
        if (rep.ok) model.flushed();
        break;
      }
      case 'read': {
        const off = rand(SIZE);
        const len = Math.min(SIZE - off, 1 + rand(3 * OBJ));
        count('read');
        const rep = await must({ op: 'read', off, len });
        if (rep.ok) {
          const got = Buffer.from(rep.data!, 'base64');
          if (!got.equals(model.cur.subarray(off, off + len))) {
            const at = got.findIndex((b, i) => b !== model.cur[off + i]);
            fail(`read @${off}+${len} differs from the model at ${off + at}`, { sectors: describeSectors([Math.floor((off + at) / SECTOR)], Buffer.concat([model.cur.subarray(0, off), got, model.cur.subarray(off + len)])) });
          }
        }
        break;
      }
      case 'burst': {
        count('burst');
        await burst('none');
        break;
      }
      case 'sigkill': {
        log.push(`${step} SIGKILL`);
        count('sigkill');
        await restart('kill');
        break;
      }
      case 'sigterm': {
        log.push(`${step} SIGTERM`);
        count('sigterm');
        await restart('term');
        break;
      }
      case 'burst-sigkill': {
        count('burst-sigkill');
        await burst('kill');
        break;
      }
      case 'burst-sigterm': {
        count('burst-sigterm');
        await burst('term');
        break;
      }
      }
      times[kind] = (times[kind] ?? 0) + Date.now() - started;
      if (!failed && step % VERIFY_EVERY === 0) {
        const v = Date.now();
        await verifyExact(`full read at step ${step}`);
        times.verify = (times.verify ?? 0) + Date.now() - v;
      }
    }
    if (!failed) {
      // The end: a graceful stop keeps everything.
      await restart('term');
      if (!failed) await verifyExact('after the final SIGTERM and restart');
    }
  } catch (err) {
    fail(`error: ${(err as Error).stack ?? String(err)}`);
  } finally {
    await driver.request({ op: 'disconnect' }).catch(() => undefined);
    await driver.quit();
    if (daemon.running) {
      const code = await daemon.stop();
      if (!failed) t.equal(code, 0, 'final SIGTERM: exit 0');
    }
  }
  t.comment(`seed ${SEED}: ${step - 1} steps; ${JSON.stringify(counts)}; candidate sets capped ${model.capHits} times; ms per kind ${JSON.stringify(times)}`);
  t.notOk(failed, `seed ${SEED}: every state the model allows, and only those`);
});
