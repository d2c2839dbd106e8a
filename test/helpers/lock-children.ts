/**
 * The parent side of test/helpers/lock-child.ts: spawn a lock-holding child
 * process, read its JSON events, wait for one, send it commands, signal it
 * by its PID. The child is SIGCONTed and SIGKILLed in the test's teardown if
 * it still runs (by its own PID only).
 *
 *   const child = spawnLockChild(t, { backend: 'file', volumeId, node: 'n2', instance: 'c1', file: { root, ... } });
 *   await child.waitFor((e) => e.event === 'owner', 10_000, 'child owner');
 *   child.signal('SIGSTOP');
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { childEnv } from './daemon.js';
import type { ChildConfig } from './lock-child.js';

interface Teardown { teardown(fn: () => unknown): void }

export const LOCK_CHILD = path.join(path.dirname(fileURLToPath(import.meta.url)), 'lock-child.js');

export interface ChildEvent {
  event: string;
  /** Monotonic ms in the parent when the line arrived. */
  at: number;
  [k: string]: unknown;
}

export interface LockChild {
  pid: number;
  events: ChildEvent[];
  /** The first event (already seen or to come) at index ≥ `from` matching `pred`. */
  waitFor(pred: (e: ChildEvent) => boolean, timeoutMs: number, what: string, from?: number): Promise<ChildEvent>;
  send(cmd: 'release' | 'acquire' | 'exit'): void;
  signal(sig: NodeJS.Signals): void;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr(): string;
}

export function spawnLockChild(t: Teardown, config: ChildConfig): LockChild {
  const child = spawn(process.execPath, [LOCK_CHILD, JSON.stringify(config)], { env: childEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
  const pid = child.pid!;
  const events: ChildEvent[] = [];
  const waiters = new Set<() => void>();
  let err = '';
  let done = false;
  child.stderr.on('data', (b: Buffer) => (err += b.toString()));
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    try {
      events.push({ ...(JSON.parse(line) as { event: string }), at: performance.now() });
    } catch {
      events.push({ event: 'garbage', line, at: performance.now() });
    }
    for (const w of waiters) w();
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => {
      done = true;
      for (const w of waiters) w();
      resolve({ code, signal });
    }));
  child.stdin.on('error', () => undefined);
  const signal = (sig: NodeJS.Signals) => {
    if (done) return;
    try { process.kill(pid, sig); } catch { /* gone */ }
  };
  t.teardown(async () => {
    if (done) return;
    signal('SIGCONT');
    signal('SIGKILL');
    await exited;
  });
  return {
    pid,
    events,
    exited,
    signal,
    stderr: () => err,
    send: (cmd) => { if (!done) child.stdin.write(cmd + '\n'); },
    waitFor(pred, timeoutMs, what, from = 0) {
      return new Promise<ChildEvent>((resolve, reject) => {
        const check = () => {
          const hit = events.slice(from).find(pred);
          if (hit) {
            finish();
            resolve(hit);
          } else if (done) {
            finish();
            reject(new Error(`${what}: the child exited; events ${JSON.stringify(events)}; stderr ${err.slice(-2000)}`));
          }
        };
        const timer = setTimeout(() => {
          finish();
          reject(new Error(`${what}: not within ${timeoutMs} ms; events ${JSON.stringify(events)}; stderr ${err.slice(-2000)}`));
        }, timeoutMs);
        const finish = () => {
          clearTimeout(timer);
          waiters.delete(check);
        };
        waiters.add(check);
        check();
      });
    },
  };
}

/** p50 and p99 (nearest rank) of `values`, and the max. */
export function percentiles(values: number[]): { p50: number; p99: number; max: number; n: number } {
  const s = [...values].sort((a, b) => a - b);
  const at = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
  return { p50: at(50), p99: at(99), max: s[s.length - 1]!, n: s.length };
}
