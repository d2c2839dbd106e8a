/**
 * Benchmark plumbing: start a server as a child process on 127.0.0.1, run fio
 * (ioengine=nbd) against it, parse fio's JSON, and report medians and ratios.
 * Every child is stopped by its PID, also when a run fails.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import net from 'node:net';
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

export interface Target {
  name: string;
  /** Starts the server; resolves with the NBD URI to benchmark. */
  start(): Promise<{ uri: string; stop(): Promise<void> }>;
}

export interface Workload {
  name: string;
  /** fio arguments besides --ioengine/--uri/--output-format. */
  args: string[];
  /** Which figure to report. */
  metric: 'iops' | 'bw' | 'lat_mean' | 'lat_p99';
}

/** The volume benchmarks' fio jobs over a disk of `size` (fio size syntax): 4k random QD32, 1M sequential QD8. */
export function volumeWorkloads(size: string): Workload[] {
  const common = [`--size=${size}`];
  return [
    { name: '4k randread QD32', args: [...common, '--rw=randread', '--bs=4k', '--iodepth=32'], metric: 'iops' },
    { name: '4k randwrite QD32', args: [...common, '--rw=randwrite', '--bs=4k', '--iodepth=32'], metric: 'iops' },
    { name: '1M seqread QD8', args: [...common, '--rw=read', '--bs=1m', '--iodepth=8'], metric: 'bw' },
    { name: '1M seqwrite QD8', args: [...common, '--rw=write', '--bs=1m', '--iodepth=8'], metric: 'bw' },
  ];
}

/**
 * Our daemon as a benchmark target: a volume `disk` of `size` created in
 * `store`, served on a free port (metrics off) and prefilled.
 */
export function archipelagoTarget(store: string, size: string): Target {
  return {
    name: 'archipelago',
    async start() {
      await execFileP(process.execPath, [cliPath, 'create', 'disk', '--size', size, '--store', store]);
      const port = await freePort();
      const s = spawnServer(process.execPath, [cliPath, 'serve', '--store', store, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn', '--metrics', '']);
      await waitForPort(port);
      await prefill(`nbd://127.0.0.1:${port}/disk`, size);
      return { uri: `nbd://127.0.0.1:${port}/disk`, stop: s.stop };
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

/** Runs one fio job against `uri`; returns the workload's metric. */
export async function runFio(uri: string, w: Workload, runtimeSec: number): Promise<number> {
  const { stdout } = await execFileP('fio', [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, '--output-format=json',
    '--time_based', `--runtime=${runtimeSec}`, '--ramp_time=1', ...w.args,
  ], { maxBuffer: 64 * 1024 * 1024, cwd: '/tmp' });
  // fio's nbd engine prints a line before the JSON document.
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  const rw = job.read.io_bytes > 0 ? job.read : job.write;
  switch (w.metric) {
    case 'iops': return rw.iops;
    case 'bw': return rw.bw_bytes / (1024 * 1024);
    case 'lat_mean': return rw.clat_ns.mean / 1000;
    case 'lat_p99': return rw.clat_ns.percentile['99.000000'] / 1000;
  }
}

/** Writes the first `size` bytes sequentially so reads measure data, not holes. */
export async function prefill(uri: string, size: string): Promise<void> {
  await execFileP('fio', ['--name=prefill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1m',
    '--iodepth=8', `--size=${size}`, '--output-format=json'], { maxBuffer: 16 * 1024 * 1024, cwd: '/tmp' });
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

const UNITS: Record<Workload['metric'], string> = { iops: 'IOPS', bw: 'MiB/s', lat_mean: 'µs mean', lat_p99: 'µs p99' };

/**
 * Runs every workload against every target, interleaved (target order
 * rotates each round) and repeated, then prints a Markdown table of medians
 * with the ratio ours / best peer (for latencies: ours / best, lower is better).
 */
export async function compare(ours: string, targets: Target[], workloads: Workload[], rounds: number, runtimeSec: number): Promise<string> {
  const results = new Map<string, number[]>();
  const started = await Promise.all(targets.map(async (t) => ({ t, s: await t.start() })));
  try {
    for (let r = 0; r < rounds; r++) {
      for (const w of workloads) {
        const order = started.map((_, i) => started[(i + r) % started.length]!);
        for (const { t, s } of order) {
          const v = await runFio(s.uri, w, runtimeSec);
          const key = `${w.name}\u0000${t.name}`;
          results.set(key, [...(results.get(key) ?? []), v]);
          process.stderr.write(`round ${r + 1} ${w.name} ${t.name}: ${v.toFixed(1)} ${UNITS[w.metric]}\n`);
        }
      }
    }
  } finally {
    await Promise.all(started.map(({ s }) => s.stop()));
  }
  const names = targets.map((t) => t.name);
  const peers = names.filter((n) => n !== ours);
  let out = `| workload | unit | ${names.join(' | ')} | ours/best peer |\n|---|---|${names.map(() => '---|').join('')}---|\n`;
  for (const w of workloads) {
    const med = new Map(names.map((n) => [n, median(results.get(`${w.name}\u0000${n}`)!)]));
    const lowerBetter = w.metric.startsWith('lat');
    const best = lowerBetter ? Math.min(...peers.map((p) => med.get(p)!)) : Math.max(...peers.map((p) => med.get(p)!));
    const ratio = med.get(ours)! / best;
    out += `| ${w.name} | ${UNITS[w.metric]} | ${names.map((n) => med.get(n)!.toFixed(1)).join(' | ')} | ${ratio.toFixed(2)}${lowerBetter ? ' (lower is better)' : ''} |\n`;
  }
  return out;
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
