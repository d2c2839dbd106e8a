/**
 * The crash-loop soak (test/helpers/crash-loop.ts), short: a mixed workload
 * through libnbd clients against the real daemon (writes, FUA, flushes,
 * trims, write-zeroes, snapshots through the admin socket, clones written
 * like volumes, gc, removals), SIGKILLed at a random moment every cycle and
 * restarted; after each restart every map loads (`list`, `info` on every
 * name) and every volume and snapshot matches the ledger. On the backend
 * tempStore gives (ARCHIPELAGO_TEST_BACKEND).
 *
 *   ARCHIPELAGO_CRASH_LOOP_SEED=<u32>     replay a run (the seed is printed)
 *   ARCHIPELAGO_CRASH_LOOP_CYCLES=<n>     cycles (default 8, < 60 s on 2 busy cores)
 *
 * The long run is bench/crash-loop.ts (docs/reliability.md).
 */
import t from 'tap';
import { tempStore } from '../helpers/stores.js';
import { tempDir } from '../helpers/run.js';
import { CrashLoopFailure, runCrashLoop } from '../helpers/crash-loop.js';

const SEED_ENV = process.env.ARCHIPELAGO_CRASH_LOOP_SEED;
const CYCLES_ENV = process.env.ARCHIPELAGO_CRASH_LOOP_CYCLES;
if ((SEED_ENV !== undefined && !/^\d+$/.test(SEED_ENV)) || (CYCLES_ENV !== undefined && !/^[1-9]\d*$/.test(CYCLES_ENV))) {
  throw new Error('ARCHIPELAGO_CRASH_LOOP_SEED and ARCHIPELAGO_CRASH_LOOP_CYCLES must be whole numbers (cycles > 0)');
}
const seed = SEED_ENV !== undefined ? Number(SEED_ENV) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
const cycles = CYCLES_ENV !== undefined ? Number(CYCLES_ENV) : 8;

t.test(`crash loop: seed ${seed}, ${cycles} cycles`, async (t) => {
  t.comment(`ARCHIPELAGO_CRASH_LOOP_SEED=${seed} ARCHIPELAGO_CRASH_LOOP_CYCLES=${cycles}`);
  const store = await tempStore(t);
  const workDir = await tempDir(t, 'archipelago-crash-loop-');
  try {
    const r = await runCrashLoop({
      store, cycles, seed, t, workDir,
      maxSnapshots: 1, maxClones: 1, minSteps: 2, maxSteps: 5,
      log: (line) => t.comment(line),
    });
    t.comment(`ops ${JSON.stringify(r.ops)}`);
    t.comment(`kills ${JSON.stringify(r.kills)}; outcomes ${JSON.stringify(r.outcomes)}; ms ${JSON.stringify(r.msBy)}`);
    t.comment(`${r.cycles} cycles in ${r.ms} ms; ${r.bytesWritten} bytes written, ${r.bytesVerified} verified, `
      + `${r.bytesLost} lost; gc swept ${r.gcSwept} objects; candidate sets capped ${r.capHits} times`);
    t.equal(r.cycles, cycles, 'every cycle survived its SIGKILL');
    t.equal(r.bytesLost, 0, 'no byte lost');
    t.ok(r.bytesVerified > 0, 'bytes verified after the restarts');
    t.ok((r.ops.snapshot ?? 0) > 0 || cycles < 4, 'snapshots taken');
  } catch (err) {
    if (!(err instanceof CrashLoopFailure)) throw err;
    t.fail(err.message, { seed: err.seed, cycle: err.cycle, bytesLost: err.result.bytesLost, ...err.detail });
  }
});
