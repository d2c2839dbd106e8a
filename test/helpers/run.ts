/**
 * Runs an external program for integration tests: no shell, a deadline, output
 * captured. Asynchronous on purpose: the NBD server under test lives in the
 * same process, so a synchronous spawn would deadlock against it.
 *
 * The child gets its own process group (detached) so that a timeout or a
 * teardown can stop it and whatever it forked (fio's job processes) by its
 * PID's group, without touching anything else.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export interface RunResult {
  /** Exit code, or null when the child died of a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  /** Wall time in ms. */
  ms: number;
}

interface Teardown { teardown(fn: () => unknown): void }

export interface RunOptions {
  /** Default 60 s. The child (and its group) is killed when it passes. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  /** When given, the child is killed in this test's teardown if still running. */
  t?: Teardown;
}

/** Children still running, so that nothing outlives the test process by accident. */
const live = new Set<ChildProcess>();

/** Kills a child and its process group by PID; ignores ones already gone. */
export function killChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGKILL'): void {
  const pid = child.pid;
  if (pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(-pid, signal);
  } catch {
    try { process.kill(pid, signal); } catch { /* already gone */ }
  }
}

/** Runs `cmd args` and resolves when it exits (never rejects for a non-zero exit). */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
      detached: true,
    });
    live.add(child);
    opts.t?.teardown(() => killChild(child));
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    if (opts.input !== undefined) {
      child.stdin!.on('error', () => { /* child may exit without reading */ });
      child.stdin!.end(opts.input);
    }
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      killChild(child, 'SIGTERM');
      setTimeout(() => killChild(child, 'SIGKILL'), 2000).unref();
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      live.delete(child);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      live.delete(child);
      resolve({
        code, signal, timedOut,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        ms: Date.now() - started,
      });
    });
  });
}

process.on('exit', () => { for (const c of live) killChild(c); });

/**
 * The environment nbdsh needs: /usr/bin first, so Debian's python3 (with the
 * nbd module) wins over pyenv's; no __pycache__ left in the source tree.
 */
export function nbdshEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}`, PYTHONDONTWRITEBYTECODE: '1', ...extra };
}

/** Diagnostics for a failed assertion: exit status and the tail of the output. */
export function diag(r: RunResult): { exitCode: number | null; signal: string | null; timedOut: boolean; ms: number; stdout: string; stderr: string } {
  const tail = (s: string) => s.length > 4000 ? '…' + s.slice(-4000) : s;
  return { exitCode: r.code, signal: r.signal, timedOut: r.timedOut, ms: r.ms, stdout: tail(r.stdout), stderr: tail(r.stderr) };
}

/** A fresh directory under os.tmpdir(), removed in the test's teardown. */
export async function tempDir(t: Teardown, prefix = 'archipelago-it-'): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Writes `size` random bytes to a new file and returns them. */
export async function randomFile(file: string, size: number): Promise<Buffer> {
  const data = crypto.randomBytes(size);
  await fs.writeFile(file, data);
  return data;
}

/** Finds a free TCP port on 127.0.0.1. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}
