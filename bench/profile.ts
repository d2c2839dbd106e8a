/**
 * Profiles our daemon under one fio job: serves a prefilled 1 GiB volume on
 * the file store (or a RADOS store URL) with `node --cpu-prof`, runs the job,
 * stops the daemon (SIGTERM: the profile is written on exit) and prints the
 * functions with the most self time, plus the share of idle, GC and
 * syscalls. This is the evidence docs/benchmarks.md cites.
 *
 *   npm run build && node build/bench/profile.js --job '4k randread QD32' [--runtime 5] [--top 30]
 *       [--store URL] [--dir /var/tmp] [--keep]   (--keep: leave the .cpuprofile and print its path)
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { argValue, archipelagoTarget, runFio, volumeWorkloads, warm } from './lib.js';

const jobName = argValue('job', '4k randread QD32');
const runtime = Number(argValue('runtime', '5'));
const top = Number(argValue('top', '30'));
const SIZE = '1G';
const job = volumeWorkloads().find((w) => w.name === jobName);
if (!job) throw new Error(`--job ${JSON.stringify(jobName)}: one of ${volumeWorkloads().map((w) => JSON.stringify(w.name)).join(', ')}`);

const work = await fs.mkdtemp(path.join(argValue('dir', os.tmpdir()), 'archipelago-profile-'));
const profDir = path.join(work, 'prof');
const store = argValue('store', `file:${path.join(work, 'store')}`);

interface ProfileNode { id: number; callFrame: { functionName: string; url: string; lineNumber: number }; children?: number[] }
interface Profile { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[] }

/** Self time per function (name, file:line), as shares of the whole profile. */
function selfTimes(p: Profile): [string, number][] {
  const time = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) time.set(p.samples[i]!, (time.get(p.samples[i]!) ?? 0) + (p.timeDeltas[i] ?? 0));
  const byFn = new Map<string, number>();
  let total = 0;
  for (const n of p.nodes) {
    const t = time.get(n.id) ?? 0;
    total += t;
    const f = n.callFrame;
    const where = f.url ? ` ${f.url.replace(/^.*\/build\//, '').replace(/^node:/, '')}:${f.lineNumber + 1}` : '';
    const k = `${f.functionName || '(anonymous)'}${where}`;
    byFn.set(k, (byFn.get(k) ?? 0) + t);
  }
  return [...byFn].map(([k, t]): [string, number] => [k, t / total]).sort((a, b) => b[1] - a[1]);
}

try {
  // Create and prefill unprofiled, then serve the same store under the profiler.
  await (await archipelagoTarget(store, SIZE).start()).stop();
  const s = await archipelagoTarget(store, SIZE, { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${profDir}`], existing: true }).start();
  let result;
  try {
    if (job.warm) await warm(s.fio, SIZE);
    result = await runFio(s.fio, job, SIZE, runtime);
  } finally {
    await s.stop();
  }
  const [file] = await fs.readdir(profDir);
  const profile = JSON.parse(await fs.readFile(path.join(profDir, file!), 'utf8')) as Profile;
  const rows = selfTimes(profile);
  const busy = 1 - (rows.find(([k]) => k === '(idle)')?.[1] ?? 0);
  console.log(`${jobName}: ${job.metrics.map((m) => `${result[m].toFixed(1)} ${m}`).join(', ')}; main thread busy ${(100 * busy).toFixed(0)} % of the profile `
    + `(start-up included); self time as % of busy:`);
  for (const [k, share] of rows.filter(([k]) => k !== '(idle)').slice(0, top)) console.log(`${(100 * share / busy).toFixed(1).padStart(5)} %  ${k}`);
  if (process.argv.includes('--keep')) {
    const kept = path.join(os.tmpdir(), `archipelago-${jobName.replace(/\W+/g, '-')}-${Date.now()}.cpuprofile`);
    await fs.copyFile(path.join(profDir, file!), kept);
    console.log(`profile: ${kept}`);
  }
} finally {
  await fs.rm(work, { recursive: true, force: true });
}
