/**
 * The real `archipelago` daemon and CLI as child processes, for integration
 * tests against a file store:
 *
 *   const store = await tempStore(t);
 *   await cli(['create', 'v', '--size', '64M', '--store', `file:${store}`]);
 *   const d = await startDaemon(t, { store });
 *   ... nbdinfo d.uri('v') ...
 *   t.equal(await d.stop(), 0);   // SIGTERM: drain, flush, exit 0
 *
 * Every daemon is SIGKILLed by PID in the test's teardown if it still runs,
 * pass or fail; stop()/kill() wait for the exit, so a restart on the same
 * store never overlaps the previous process.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run, tempDir, type RunResult } from './run.js';

interface Teardown { teardown(fn: () => unknown): void }

/** build/src/cli/main.js, found from this compiled file (build/test/helpers/daemon.js). */
export const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'cli', 'main.js');

/**
 * The environment for our children: tap's NODE_OPTIONS (--import hooks for
 * process tracking) would double the start-up time of every CLI run.
 */
export function childEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  // No config file: /etc/archipelago/archipelago.conf on this machine must not leak into tests.
  const env: NodeJS.ProcessEnv = { ...process.env, ARCHIPELAGO_CONFIG: '', ...extra };
  delete env.NODE_OPTIONS;
  return env;
}

export interface DaemonOptions {
  /** Store directory (used as file:DIR), or a store URL (file:… or rados:…). */
  store: string;
  /** More `serve` arguments (e.g. ['--socket', PATH]). */
  extraArgs?: string[];
  /** How long to wait for READY; default 20 s. */
  readyTimeoutMs?: number;
}

export interface Daemon {
  port: number;
  /** Port of the metrics endpoint (`metrics=` on the READY line), or null when off (`--metrics ''`). */
  metricsPort: number | null;
  pid: number;
  /** nbd://127.0.0.1:PORT/NAME */
  uri(name: string): string;
  /** SIGTERM, then wait for the exit; resolves with the exit code (null if killed by a signal). */
  stop(timeoutMs?: number): Promise<number | null>;
  /** SIGKILL, then wait for the exit. */
  kill(): Promise<void>;
  /** True until the process has exited. */
  readonly running: boolean;
  /** What the daemon wrote to stderr so far (logs at --log-level warn). */
  stderr(): string;
  /** How it ended ("code 0", "signal SIGKILL"), or null while running. */
  exitStatus(): string | null;
}

interface Exit { code: number | null; signal: NodeJS.Signals | null }

function exitOf(child: ChildProcess): Promise<Exit> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

/** Starts `archipelago serve --store URL --listen 127.0.0.1:0 --log-level warn` and waits for READY. */
export async function startDaemon(t: Teardown, o: DaemonOptions): Promise<Daemon> {
  const extra = o.extraArgs ?? [];
  // Metrics on a free port unless the test chose: the default 9810 would collide between daemons.
  const metrics = extra.includes('--metrics') ? [] : ['--metrics', '127.0.0.1:0'];
  const args = [CLI, 'serve', '--store', storeUrl(o.store), '--listen', '127.0.0.1:0', '--log-level', 'warn', ...metrics, ...extra];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  const pid = child.pid;
  if (pid === undefined) throw new Error('archipelago serve: spawn failed');
  const exited = exitOf(child);
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      await exited;
    }
  });
  let err = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (s: string) => { err += s; if (err.length > 256 * 1024) err = err.slice(-128 * 1024); });

  let metricsPort: number | null = null;
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => {
      try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      reject(new Error(`archipelago serve: no READY line within ${o.readyTimeoutMs ?? 20_000} ms; stderr: ${err}`));
    }, o.readyTimeoutMs ?? 20_000);
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (s: string) => {
      out += s;
      const m = /^READY port=(\d+).*$/m.exec(out);
      if (m) {
        clearTimeout(timer);
        const mp = / metrics=(\d+)/.exec(m[0]);
        metricsPort = mp ? Number(mp[1]) : null;
        resolve(Number(m[1]));
      }
    });
    void exited.then((e) => {
      clearTimeout(timer);
      reject(new Error(`archipelago serve exited (code ${e.code}, signal ${e.signal}) before READY; stdout: ${out}; stderr: ${err}`));
    });
  });

  const running = () => child.exitCode === null && child.signalCode === null;
  return {
    port,
    metricsPort,
    pid,
    uri: (name) => `nbd://127.0.0.1:${port}/${name}`,
    get running() { return running(); },
    stderr: () => err,
    exitStatus: () => running() ? null : child.signalCode ? `signal ${child.signalCode}` : `code ${child.exitCode}`,
    async stop(timeoutMs = 30_000) {
      if (running()) process.kill(pid, 'SIGTERM');
      const timer = setTimeout(() => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }, timeoutMs);
      const e = await exited;
      clearTimeout(timer);
      return e.code;
    },
    async kill() {
      if (running()) process.kill(pid, 'SIGKILL');
      await exited;
    },
  };
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `archipelago ARGS` to completion (never rejects for a non-zero exit). */
export async function cli(args: readonly string[], opts: { t?: Teardown; timeoutMs?: number } = {}): Promise<CliResult & { result: RunResult }> {
  const r = await run(process.execPath, [CLI, ...args], { t: opts.t, timeoutMs: opts.timeoutMs ?? 30_000, env: childEnv() });
  return { code: r.code, stdout: r.stdout, stderr: r.stderr, result: r };
}

/** A store URL for a directory or URL: file stores may be given as a bare directory. */
export function storeUrl(store: string): string {
  return /^(file|rados):/.test(store) ? store : `file:${store}`;
}

/** A fresh, empty file store directory, removed in the test's teardown. */
export function tempFileStore(t: Teardown): Promise<string> {
  return tempDir(t, 'archipelago-store-');
}
