/**
 * Benchmark plumbing: start a server as a child process on 127.0.0.1, run fio
 * (ioengine=nbd) against it, parse fio's JSON, and report medians and ratios.
 * Every child is stopped by its PID, also when a run fails.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import net from 'node:net';
import fs from 'node:fs/promises';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const execFileP = promisify(execFile);

/** The repository root (bench files run from build/bench/). */
export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** The compiled CLI. */
export const cliPath = path.join(root, 'build/src/cli/main.js');

/** The value after `--name` on the command line, or `def`. */
export function argValue(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : def;
}

/** A figure fio reports for a job; latencies are fio's total `lat` (submission + completion). */
export type Metric = 'iops' | 'bw' | 'lat_mean' | 'lat_p99';

export const UNITS: Record<Metric, string> = { iops: 'IOPS', bw: 'MiB/s', lat_mean: 'µs mean lat', lat_p99: 'µs p99 lat' };
const lowerIsBetter = (m: Metric) => m.startsWith('lat');

/** A running target, as fio reaches it. */
export interface Running {
  /** fio arguments that select the target, e.g. ['--ioengine=nbd', '--uri=…']. */
  fio: string[];
  /** The server process, for its CPU time and peak RSS (none for fio on a file). */
  pid?: number;
  /** Extra environment for fio (e.g. CEPH_CONF for the rbd engine). */
  env?: NodeJS.ProcessEnv;
  stop(): Promise<void>;
}

/**
 * What a bench compares: our daemon, the peers (the "best peer" is the best
 * of these), and limits (fio on the storage directly, no server: shown, not
 * counted as a peer).
 */
export interface Target {
  name: string;
  role: 'ours' | 'peer' | 'limit';
  /** Starts the server (prefilled); resolves with how fio reaches it. */
  start(): Promise<Running>;
}

export interface Workload {
  name: string;
  /** fio arguments besides the target's and the run's (size, runtime, output). */
  args: string[];
  /** Figures to report for it (one table row each). */
  metrics: Metric[];
  /** Read the whole disk once, unmeasured, before each run (page cache warm: reads measure the server). */
  warm?: boolean;
}

/**
 * The volume benchmarks' fio jobs (docs/benchmarks.md): 4k random read QD32
 * on one and on two connections (two fio jobs, one connection each, QD32
 * each), 4k random write QD32, 4k random read QD1 (total latency mean and
 * p99), 1M sequential read and write QD8; and 4k random write QD32 with a
 * FLUSH every 32 writes (--fsync=32: fio's nbd engine sends NBD_CMD_FLUSH),
 * where every server must make the data durable. fio's nbd engine never
 * sends FUA, and no FLUSH in the other jobs.
 */
export function volumeWorkloads(): Workload[] {
  return [
    { name: '4k randread QD32', args: ['--rw=randread', '--bs=4k', '--iodepth=32'], metrics: ['iops'], warm: true },
    { name: '4k randread QD32 ×2 conns', args: ['--rw=randread', '--bs=4k', '--iodepth=32', '--numjobs=2'], metrics: ['iops'], warm: true },
    { name: '4k randwrite QD32', args: ['--rw=randwrite', '--bs=4k', '--iodepth=32'], metrics: ['iops'] },
    { name: '4k randread QD1', args: ['--rw=randread', '--bs=4k', '--iodepth=1'], metrics: ['lat_mean', 'lat_p99'], warm: true },
    { name: '1M seqread QD8', args: ['--rw=read', '--bs=1m', '--iodepth=8'], metrics: ['bw'], warm: true },
    { name: '1M seqwrite QD8', args: ['--rw=write', '--bs=1m', '--iodepth=8'], metrics: ['bw'] },
    { name: '4k randwrite QD32 + FLUSH/32', args: ['--rw=randwrite', '--bs=4k', '--iodepth=32', '--fsync=32'], metrics: ['iops'] },
  ];
}

/** fio arguments for an NBD server at `uri`. */
export const nbdFio = (uri: string) => ['--ioengine=nbd', `--uri=${uri}`];

/**
 * The daemon's environment as systemd/archipelago.service gives it: a libuv
 * thread pool of 16 (docs/benchmarks.md: fsync on FLUSH runs one job per
 * dirty object; it must be set before Node starts, an ES module entry point
 * starts the pool while loading).
 */
export const DAEMON_ENV: NodeJS.ProcessEnv = { UV_THREADPOOL_SIZE: process.env.UV_THREADPOOL_SIZE ?? '16' };

export interface ArchipelagoOptions {
  /** Node flags for the daemon, e.g. ['--cpu-prof', '--cpu-prof-dir=DIR']. */
  nodeArgs?: string[];
  /** Extra `serve` flags. */
  serveArgs?: string[];
  env?: NodeJS.ProcessEnv;
  /** The store already holds a prefilled volume `disk` (a second start on it): neither create nor prefill. */
  existing?: boolean;
}

/**
 * Our daemon as a benchmark target: a volume `disk` of `size` created in
 * `store`, served on a free port (metrics off) and prefilled.
 */
export function archipelagoTarget(store: string, size: string, o: ArchipelagoOptions = {}): Target {
  return {
    name: 'archipelago',
    role: 'ours',
    async start() {
      if (!o.existing) await execFileP(process.execPath, [cliPath, 'create', 'disk', '--size', size, '--store', store]);
      const port = await freePort();
      const s = spawnServer(process.execPath, [...(o.nodeArgs ?? []), cliPath, 'serve', '--store', store, '--listen', `127.0.0.1:${port}`,
        '--log-level', 'warn', '--metrics', '', ...(o.serveArgs ?? [])], { ...DAEMON_ENV, ...o.env });
      await waitForPort(port);
      const uri = `nbd://127.0.0.1:${port}/disk`;
      if (!o.existing) await prefill(nbdFio(uri), size);
      return { fio: nbdFio(uri), pid: s.child.pid, stop: s.stop };
    },
  };
}

/**
 * A peer NBD server as a target: `args(port)` starts it on 127.0.0.1:port,
 * `export` names the export ('' for the default), `before` prepares its
 * backing store. Prefilled like ours.
 */
export function nbdPeer(name: string, size: string, cmd: string, args: (port: number) => string[], exportName: string,
  before?: () => Promise<void>): Target {
  return {
    name,
    role: 'peer',
    async start() {
      await before?.();
      const port = await freePort();
      const s = spawnServer(cmd, args(port));
      await waitForPort(port);
      const uri = `nbd://127.0.0.1:${port}/${exportName}`;
      await prefill(nbdFio(uri), size);
      return { fio: nbdFio(uri), pid: s.child.pid, stop: s.stop };
    },
  };
}

/**
 * fio on a raw file with psync (pread/pwrite, so --iodepth does not apply)
 * through the page cache, no server: the limit of the machine and file
 * system for each job.
 */
export function rawFileLimit(file: string, size: string): Target {
  return {
    name: 'raw file (limit)',
    role: 'limit',
    async start() {
      await execFileP('truncate', ['-s', size, file]);
      const fio = ['--ioengine=psync', `--filename=${file}`];
      await prefill(fio, size);
      return { fio, stop: async () => { await fs.rm(file, { force: true }); } };
    },
  };
}

/** Finds a free TCP port on 127.0.0.1 (shared with the tests). */
import { freePort } from '../test/helpers/run.js';
export { freePort };

/** Waits until something accepts TCP connections on the port. */
export async function waitForPort(port: number, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on 127.0.0.1:${port} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Spawns a long-running server and returns a stop() that kills it by PID. */
export function spawnServer(cmd: string, args: string[], env?: NodeJS.ProcessEnv): { child: ChildProcess; stop(): Promise<void> } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, ...env } });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return {
    child,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

/** One fio run's figures (the sums over its jobs: group_reporting). */
export type FioResult = Record<Metric, number>;

/** Runs one fio job (group-reported) against a target; `fioArgs` from Running.fio. */
export async function runFio(fioArgs: string[], w: Workload, size: string, runtimeSec: number, env?: NodeJS.ProcessEnv): Promise<FioResult> {
  const { stdout } = await execFileP('fio', [
    '--name=bench', ...fioArgs, '--output-format=json', `--size=${size}`, '--norandommap', '--group_reporting',
    '--lat_percentiles=1', '--time_based', `--runtime=${runtimeSec}`, '--ramp_time=1', ...w.args,
  ], { maxBuffer: 64 * 1024 * 1024, cwd: '/tmp', env: { ...process.env, ...env } });
  // fio's nbd engine prints a line before the JSON document.
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  const rw = job.read.io_bytes > 0 ? job.read : job.write;
  return {
    iops: rw.iops,
    bw: rw.bw_bytes / (1024 * 1024),
    lat_mean: rw.lat_ns.mean / 1000,
    lat_p99: rw.lat_ns.percentile['99.000000'] / 1000,
  };
}

/** Writes the first `size` bytes sequentially so reads measure data, not holes. */
export async function prefill(fioArgs: string[], size: string, env?: NodeJS.ProcessEnv): Promise<void> {
  await execFileP('fio', ['--name=prefill', ...fioArgs, '--rw=write', '--bs=1m', '--iodepth=8', `--size=${size}`,
    '--output-format=json'], { maxBuffer: 16 * 1024 * 1024, cwd: '/tmp', env: { ...process.env, ...env } });
}

/** Reads the first `size` bytes once (unmeasured): the page cache is warm for a read job. */
export async function warm(fioArgs: string[], size: string, env?: NodeJS.ProcessEnv): Promise<void> {
  await execFileP('fio', ['--name=warm', ...fioArgs, '--rw=read', '--bs=1m', '--iodepth=8', `--size=${size}`,
    '--output-format=json'], { maxBuffer: 16 * 1024 * 1024, cwd: '/tmp', env: { ...process.env, ...env } });
}

/** CPU seconds (user + system, all threads) a process has used, from /proc. */
export async function cpuSeconds(pid: number): Promise<number> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / CLOCK_TICKS;
}
const CLOCK_TICKS = 100; // sysconf(_SC_CLK_TCK) on Linux

/** A field of /proc/PID/status in MiB (VmRSS: resident now, VmHWM: peak resident). */
export async function statusMiB(pid: number, field: 'VmRSS' | 'VmHWM'): Promise<number> {
  const text = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text);
  if (!m) throw new Error(`/proc/${pid}/status has no ${field}`);
  return Number(m[1]) / 1024;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** One run of one workload on one target. */
interface Sample {
  fio: FioResult;
  /** Server CPU per I/O in µs (per MiB for 1M jobs), if the target has a server process. */
  cpuPerIo?: number;
}

export interface CompareOptions {
  rounds: number;
  runtimeSec: number;
  /** Disk size every target serves (fio --size). */
  size: string;
}

export interface Comparison {
  /** Markdown: medians, ours / best peer, paired per-round ratios. */
  table: string;
  /** Markdown: server CPU per I/O. */
  cpuTable: string;
  /** Our daemon's peak resident set over the whole run, MiB. */
  oursPeakRssMiB: number | null;
  /** Load average (1 min) seen before each run: min..max. */
  load: [number, number];
  /** workload → metric → ours / best peer (median of medians). */
  ratios: Map<string, Map<Metric, number>>;
}

/**
 * Runs every workload against every target, interleaved (workloads outer,
 * then rounds, the target order rotating each round), `sync` before each run
 * so one target's writeback does not land in the next one's window; read
 * jobs get a warm page cache first. Reports medians, the ratio ours / best
 * peer (latencies: ours / best, lower is better), the paired ratio (per
 * round: ours / best peer of that round; median and min..max) and each
 * server's CPU per I/O (user + system of its process over the fio run,
 * divided by the I/Os it did).
 */
export async function compare(targets: Target[], workloads: Workload[], o: CompareOptions): Promise<Comparison> {
  const samples = new Map<string, Sample[]>();
  const key = (w: Workload, t: Target) => `${w.name}\u0000${t.name}`;
  const started: { t: Target; s: Running }[] = [];
  let oursPeakRssMiB: number | null = null;
  const loads: number[] = [];
  try {
    for (const t of targets) started.push({ t, s: await t.start() });
    for (const w of workloads) {
      for (let r = 0; r < o.rounds; r++) {
        const order = started.map((_, i) => started[(i + r) % started.length]!);
        for (const { t, s } of order) {
          if (w.warm) await warm(s.fio, o.size, s.env);
          await execFileP('sync');
          loads.push(os.loadavg()[0]!);
          const cpu0 = s.pid ? await cpuSeconds(s.pid) : 0;
          const t0 = performance.now();
          const fio = await runFio(s.fio, w, o.size, o.runtimeSec, s.env);
          const wall = (performance.now() - t0) / 1000;
          const sample: Sample = { fio };
          if (s.pid) {
            // CPU over the whole fio run (ramp included) over I/Os at the measured rate for as long.
            const cpu = (await cpuSeconds(s.pid)) - cpu0;
            const units = w.metrics.includes('bw') ? fio.bw : fio.iops;
            sample.cpuPerIo = (cpu / wall / units) * 1e6;
          }
          samples.set(key(w, t), [...(samples.get(key(w, t)) ?? []), sample]);
          process.stderr.write(`${w.name} round ${r + 1} ${t.name}: ${w.metrics.map((m) => `${fio[m].toFixed(1)} ${UNITS[m]}`).join(', ')}`
            + `${sample.cpuPerIo !== undefined ? `, server CPU ${sample.cpuPerIo.toFixed(1)} µs/${w.metrics.includes('bw') ? 'MiB' : 'IO'}` : ''}\n`);
        }
      }
    }
    const ours = started.find(({ t }) => t.role === 'ours');
    if (ours?.s.pid) oursPeakRssMiB = await statusMiB(ours.s.pid, 'VmHWM');
  } finally {
    await Promise.allSettled(started.map(({ s }) => s.stop()));
  }
  return { ...report(targets, workloads, samples, key), oursPeakRssMiB, load: [Math.min(...loads), Math.max(...loads)] };
}

const fmt = (x: number) => (x >= 100 ? Math.round(x).toLocaleString('en-US') : x.toFixed(1));

function report(targets: Target[], workloads: Workload[], samples: Map<string, Sample[]>,
  key: (w: Workload, t: Target) => string): { table: string; cpuTable: string; ratios: Map<string, Map<Metric, number>> } {
  const ours = targets.find((t) => t.role === 'ours')!;
  const peers = targets.filter((t) => t.role === 'peer');
  const servers = targets.filter((t) => t.role !== 'limit');
  const ratios = new Map<string, Map<Metric, number>>();
  let table = `| workload | unit | ${targets.map((t) => t.name).join(' | ')} | ours/best peer | paired, per round |\n`
    + `|---|---|${targets.map(() => '---|').join('')}---|---|\n`;
  for (const w of workloads) {
    const byMetric = new Map<Metric, number>();
    ratios.set(w.name, byMetric);
    for (const m of w.metrics) {
      const low = lowerIsBetter(m);
      const best = (xs: number[]) => (low ? Math.min(...xs) : Math.max(...xs));
      const values = (t: Target) => samples.get(key(w, t))!.map((s) => s.fio[m]);
      const med = new Map(targets.map((t) => [t, median(values(t))]));
      const ratio = med.get(ours)! / best(peers.map((p) => med.get(p)!));
      byMetric.set(m, ratio);
      const paired = values(ours).map((v, r) => v / best(peers.map((p) => values(p)[r]!)));
      table += `| ${w.name} | ${UNITS[m]}${low ? ' ↓' : ''} | ${targets.map((t) => fmt(med.get(t)!)).join(' | ')} | **${ratio.toFixed(2)}** | `
        + `${median(paired).toFixed(2)} (${Math.min(...paired).toFixed(2)}–${Math.max(...paired).toFixed(2)}) |\n`;
    }
  }
  let cpuTable = `| workload | unit | ${servers.map((t) => t.name).join(' | ')} |\n|---|---|${servers.map(() => '---|').join('')}\n`;
  for (const w of workloads) {
    const unit = w.metrics.includes('bw') ? 'CPU µs/MiB' : 'CPU µs/IO';
    cpuTable += `| ${w.name} | ${unit} | ${servers.map((t) => fmt(median(samples.get(key(w, t))!.map((s) => s.cpuPerIo!)))).join(' | ')} |\n`;
  }
  return { table, cpuTable, ratios };
}

export async function versionOf(cmd: string, args: string[]): Promise<string> {
  try {
    const { stdout, stderr } = await execFileP(cmd, args);
    return (stdout || stderr).split('\n')[0]!.trim();
  } catch {
    return 'unknown';
  }
}

/** Cleanup steps, run last-in first-out: the tap teardown contract for a plain script. */
export class Cleanup {
  private readonly fns: (() => unknown)[] = [];
  teardown(fn: () => unknown): void { this.fns.push(fn); }
  async run(): Promise<void> {
    while (this.fns.length) {
      try { await this.fns.pop()!(); } catch (err) { console.error(`cleanup: ${String(err)}`); }
    }
  }
}

/**
 * A script's cleanup: `cleanOnce()` runs it once (at the end, or on SIGINT /
 * SIGTERM, which then exit 130).
 */
export function scriptCleanup(): { cleanup: Cleanup; cleanOnce: () => Promise<void> } {
  const cleanup = new Cleanup();
  let cleaning: Promise<void> | null = null;
  const cleanOnce = () => (cleaning ??= cleanup.run());
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => { console.error(`${sig}: stopping`); void cleanOnce().then(() => process.exit(130)); });
  }
  return { cleanup, cleanOnce };
}
