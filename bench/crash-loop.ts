/**
 * The crash-loop soak, long (test/helpers/crash-loop.ts; the short version is
 * test/integration/crash-loop.test.ts): a mixed workload through libnbd
 * clients against the real daemon (writes, FUA, flushes, trims, zeroes,
 * snapshots through the admin socket, clones written like volumes, gc,
 * removals), SIGKILLed at a random moment every cycle and restarted; every
 * map must load and every volume and snapshot must match the ledger.
 *
 *   npm run build && node build/bench/crash-loop.js [--cycles 100] [--backend file|rados] [--seed N]
 *       [--size 4M] [--max-snapshots 4] [--max-clones 2] [--dir /var/tmp] [--ceph-port 40800]
 *
 * --backend defaults to $ARCHIPELAGO_TEST_BACKEND (as for the tests), else file.
 * file: a store in a fresh temp directory. rados: a fresh single-host Ceph
 * cluster (scripts/ceph-dev.sh, memstore, one OSD) in a temp directory, its
 * mon on --ceph-port (the next range of 100 if taken), purged at the end.
 * Prints the seed first (the run replays from it), a line per cycle, then the
 * totals: cycles survived, operations, bytes verified, bytes lost (must be 0)
 * and time. Exit 1 on the first violation, with what was found.
 * Every child (daemon, libnbd drivers, CLI runs, Ceph daemons) is stopped by
 * PID at the end, pass or fail, and on SIGINT/SIGTERM.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { argValue, root, scriptCleanup } from './lib.js';
import { run } from '../test/helpers/run.js';
import { childEnv } from '../test/helpers/daemon.js';
import { CrashLoopFailure, runCrashLoop, type CrashLoopResult } from '../test/helpers/crash-loop.js';
import { parseSize } from '../src/cli/sizes.js';

const cycles = Number(argValue('cycles', '100'));
const backend = argValue('backend', process.env.ARCHIPELAGO_TEST_BACKEND ?? 'file');
const seedArg = argValue('seed', '');
const seed = seedArg !== '' ? Number(seedArg) >>> 0 : (Math.random() * 2 ** 32) >>> 0;
const size = parseSize(argValue('size', '4M'));
const maxSnapshots = Number(argValue('max-snapshots', '4'));
const maxClones = Number(argValue('max-clones', '2'));
const cephPort = Number(argValue('ceph-port', '40800'));
if (!Number.isInteger(cycles) || cycles < 1) throw new Error('--cycles: a whole number > 0');
if (backend !== 'file' && backend !== 'rados') throw new Error(`--backend ${backend}: file or rados`);
if (seedArg !== '' && !/^\d+$/.test(seedArg)) throw new Error('--seed: a whole number');

const { cleanup, cleanOnce } = scriptCleanup();

const work = await fs.mkdtemp(path.join(argValue('dir', os.tmpdir()), 'archipelago-crash-loop-'));
cleanup.teardown(() => fs.rm(work, { recursive: true, force: true }));

/** A Ceph cluster in WORK/ceph, purged (stopped by its PIDs, then removed) at the end; its store URL. */
async function startRados(): Promise<string> {
  const dir = path.join(work, 'ceph');
  const script = path.join(root, 'scripts/ceph-dev.sh');
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = cephPort + 100 * attempt;
    cleanup.teardown(() => run('bash', [script, 'purge', dir], { timeoutMs: 120_000, env: childEnv() }));
    const r = await run('bash', [script, 'start', dir], {
      timeoutMs: 180_000, env: childEnv({ CEPH_DEV_PORT: String(port), CEPH_DEV_OSD_BYTES: '2G' }),
    });
    if (r.code === 0) {
      console.log(`ceph: ${dir}, mon on port ${port}, memstore`);
      return `rados:archipelago?maps=archipelago-maps&conf=${path.join(dir, 'ceph.conf')}`;
    }
    await run('bash', [script, 'purge', dir], { timeoutMs: 120_000, env: childEnv() });
    if (r.code !== 4) throw new Error(`ceph-dev.sh start: exit ${r.code}\n${r.stderr.slice(-4000)}`);
  }
  throw new Error(`ceph-dev.sh start: no free port range from ${cephPort}`);
}

function summary(r: CrashLoopResult): string {
  const n = (k: string) => r.ops[k] ?? 0;
  const MiB = 1024 * 1024;
  return [
    `cycles survived: ${r.cycles}/${cycles} (SIGKILL at ${JSON.stringify(r.kills)})`,
    `writes: ${n('write') + n('write-fua') + n('burst-write')} (${n('write-fua')} single FUA, ${n('burst-write')} in ${n('burst')} concurrent bursts), `
      + `${(r.bytesWritten / MiB).toFixed(1)} MiB; flushes: ${n('flush')}; trims: ${n('trim')}; write-zeroes: ${n('zero')}`,
    `snapshots: ${n('snapshot')}; clones: ${n('clone')}; removed: ${n('remove')}; gc runs: ${n('gc')} (swept ${r.gcSwept} objects)`,
    `interrupted: ${JSON.stringify(r.outcomes)}`,
    `bytes verified: ${r.bytesVerified} (${(r.bytesVerified / MiB).toFixed(0)} MiB)`,
    `bytes lost: ${r.bytesLost}`,
    `candidate sets capped: ${r.capHits}`,
    `time: ${(r.ms / 1000).toFixed(1)} s (${(r.ms / Math.max(1, r.cycles) / 1000).toFixed(2)} s per cycle); ms by phase ${JSON.stringify(r.msBy)}`,
  ].join('\n');
}

let code = 0;
try {
  console.log(`crash loop: seed ${seed} (replay: --seed ${seed}), ${cycles} cycles, backend ${backend}, volumes of ${size} bytes, `
    + `at most ${maxSnapshots} snapshots and ${maxClones} clones; node ${process.version}, ${os.cpus().length} CPUs`);
  const store = backend === 'file' ? `file:${path.join(work, 'store')}` : await startRados();
  if (backend === 'file') await fs.mkdir(path.join(work, 'store'));
  const r = await runCrashLoop({
    store, cycles, seed, t: cleanup, workDir: work, size, maxSnapshots, maxClones,
    log: (line) => console.log(line),
  });
  console.log(`\nseed ${seed}, backend ${backend}\n${summary(r)}`);
  if (r.bytesLost !== 0) code = 1;
} catch (err) {
  code = 1;
  if (err instanceof CrashLoopFailure) {
    console.log(`\nFAILED: ${err.message}\n${JSON.stringify(err.detail, null, 2)}\n\nseed ${seed}, backend ${backend}\n${summary(err.result)}`);
  } else {
    console.error(err);
  }
} finally {
  await cleanOnce();
}
process.exitCode = code;
