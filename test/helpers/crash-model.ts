/**
 * The pieces of the model-based crash tests that more than one test uses
 * (test/integration/volume-crash.test.ts, test/helpers/crash-loop.ts and the
 * soak bench/crash-loop.ts): a seeded PRNG, a per-sector model of what a
 * crash may leave, and a long-lived libnbd client (nbdsh/driver.py) driven
 * over a pipe. Nothing here starts a daemon or knows about snapshots.
 *
 * The model, per 512-byte sector (DESIGN.md §4: a FLUSH reply makes every
 * write replied to before it durable; FUA makes that write durable):
 *   - `cur`: what a read must return while the daemon runs (every
 *     acknowledged write applied in order);
 *   - `pending`: for sectors changed since the last durable point, the set of
 *     values a crash may leave: the durable value, plus the result of any
 *     subset of the later unflushed writes. A completed FLUSH empties it; a
 *     FUA write keeps only the candidates that contain its bytes. Sets larger
 *     than the cap become "anything" (counted, reported) to stay sound and
 *     small.
 * After SIGKILL every sector must be one of its candidates (or `cur` when not
 * pending). What a crash left is then the new durable state: these tests kill
 * processes, they do not cut power, so the kernel keeps what the daemon wrote.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { nbdshEnv } from './run.js';

interface Teardown { teardown(fn: () => unknown): void }

export const SECTOR = 512;

// ---------------------------------------------------------------- PRNG (sfc32, seeded by splitmix32)

/** Uniform u32 values from a u32 seed (sfc32 whose state comes from splitmix32). */
export function makeRng(seed: number): () => number {
  let s = seed >>> 0;
  const split = () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  let a = split(), b = split(), c = split(), d = split();
  return () => {
    const r = (((a + b) >>> 0) + d) >>> 0;
    d = (d + 1) >>> 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) >>> 0;
    c = ((c << 21) | (c >>> 11)) >>> 0;
    c = (c + r) >>> 0;
    return r;
  };
}

/** Random bytes from the seeded generator (xorshift32 from one draw). */
export function randomData(rng: () => number, len: number): Buffer {
  const buf = Buffer.allocUnsafe(len);
  let x = rng() | 1;
  let i = 0;
  for (; i + 4 <= len; i += 4) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    buf.writeInt32LE(x | 0, i);
  }
  for (; i < len; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    buf[i] = x & 0xff;
  }
  return buf;
}

// ---------------------------------------------------------------- the model

/**
 * The part of a write of `len` bytes at `off` (data null: zeros) that falls
 * in sector `s`: bytes [a, b) of the sector, and `overlay`, which lays them
 * over a sector's value (a 512-byte latin1 string).
 */
export function sectorPart(s: number, off: number, len: number, data: Buffer | null): { a: number; b: number; overlay: (v: string) => string } {
  const base = s * SECTOR;
  const a = Math.max(off, base) - base;
  const b = Math.min(off + len, base + SECTOR) - base;
  const overlay = (v: string): string => {
    const sec = Buffer.from(v, 'latin1');
    if (data) data.copy(sec, a, base + a - off, base + b - off);
    else sec.fill(0, a, b);
    return sec.toString('latin1');
  };
  return { a, b, overlay };
}

export class SectorModel {
  readonly cur: Buffer;
  /** Sector -> allowed values after a crash (latin1 strings), or null = any. */
  readonly pending = new Map<number, Set<string> | null>();
  capHits = 0;
  readonly sectors: number;

  /** A volume of `size` bytes (a multiple of 512) holding `initial` (default zeros), all of it durable. */
  constructor(readonly size: number, readonly cap = 32, initial?: Buffer) {
    if (size % SECTOR !== 0) throw new Error(`model size ${size} is not a multiple of ${SECTOR}`);
    this.cur = Buffer.alloc(size);
    if (initial) initial.copy(this.cur, 0, 0, Math.min(size, initial.length));
    this.sectors = size / SECTOR;
  }

  /** Applies an acknowledged write (data null = zeros). durable: FUA. */
  write(off: number, len: number, data: Buffer | null, durable: boolean): void {
    const first = Math.floor(off / SECTOR);
    const last = Math.floor((off + len - 1) / SECTOR);
    for (let s = first; s <= last; s++) {
      const base = s * SECTOR;
      const { a, b, overlay } = sectorPart(s, off, len, data);
      let set = this.pending.get(s);
      if (durable) {
        if (set === undefined) continue;
        if (set === null) {
          if (a === 0 && b === SECTOR) this.pending.delete(s);
          continue;
        }
        const next = new Set([...set].map(overlay));
        if (next.size === 1) this.pending.delete(s);
        else this.pending.set(s, next);
      } else {
        if (set === null) continue;
        if (set === undefined) set = new Set([this.cur.toString('latin1', base, base + SECTOR)]);
        const next = new Set(set);
        for (const v of set) next.add(overlay(v));
        if (next.size > this.cap) {
          this.pending.set(s, null);
          this.capHits++;
        } else {
          this.pending.set(s, next);
        }
      }
    }
    if (data) data.copy(this.cur, off, 0, len);
    else this.cur.fill(0, off, off + len);
  }

  /** A FLUSH (or anything that implies one) completed: every acknowledged write is durable. */
  flushed(): void {
    this.pending.clear();
  }

  /** Sectors of `actual` (the whole volume) that no allowed state explains. */
  checkAfterCrash(actual: Buffer): number[] {
    const bad: number[] = [];
    for (let s = 0; s < this.sectors; s++) {
      const base = s * SECTOR;
      const got = actual.subarray(base, base + SECTOR);
      if (got.equals(this.cur.subarray(base, base + SECTOR))) continue;
      const set = this.pending.get(s);
      if (set === null) continue;
      if (set !== undefined && set.has(got.toString('latin1'))) continue;
      bad.push(s);
    }
    return bad;
  }

  /** Sectors where `actual` differs from `cur` (at most `limit`). */
  diff(actual: Buffer, limit = Infinity): number[] {
    const bad: number[] = [];
    for (let s = 0; s < this.sectors && bad.length < limit; s++) {
      if (!actual.subarray(s * SECTOR, (s + 1) * SECTOR).equals(this.cur.subarray(s * SECTOR, (s + 1) * SECTOR))) bad.push(s);
    }
    return bad;
  }

  /** After a crash the state read back is the new durable state. */
  settle(actual: Buffer): void {
    actual.copy(this.cur);
    this.pending.clear();
  }
}

// ---------------------------------------------------------------- the libnbd driver (driver.py)

export interface DriverReply { ok: boolean; error?: string; errno?: string | number | null; data?: string; done?: boolean[]; size?: number }

/** The script is a source, not compiled: build/test/helpers/ -> repository root -> test/integration/nbdsh/. */
export function driverScript(): string {
  return path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'test', 'integration', 'nbdsh', 'driver.py');
}

/**
 * One driver.py process: one libnbd handle, one request at a time, one JSON
 * reply line per request. SIGKILLed by PID in the teardown if still running.
 */
export class NbdDriver {
  private readonly child: ChildProcess;
  private readonly waiting: Array<{ resolve: (r: DriverReply) => void; reject: (e: Error) => void }> = [];
  private exited = false;
  private stderr = '';
  readonly pid: number;

  constructor(t: Teardown, script: string = driverScript()) {
    this.child = spawn('/usr/bin/python3', [script], { stdio: ['pipe', 'pipe', 'pipe'], env: nbdshEnv() });
    const pid = this.child.pid;
    if (pid === undefined) throw new Error('driver.py: spawn failed');
    this.pid = pid;
    t.teardown(() => this.kill());
    this.child.stderr!.setEncoding('utf8');
    this.child.stderr!.on('data', (s: string) => { this.stderr = (this.stderr + s).slice(-8000); });
    this.child.stdin!.on('error', () => { /* reported through exit */ });
    readline.createInterface({ input: this.child.stdout! }).on('line', (line) => {
      const w = this.waiting.shift();
      if (!w) return;
      try { w.resolve(JSON.parse(line) as DriverReply); } catch (e) { w.reject(e as Error); }
    });
    this.child.on('exit', (code, signal) => {
      this.exited = true;
      for (const w of this.waiting.splice(0)) w.reject(new Error(`driver.py exited (${code ?? signal}): ${this.stderr}`));
    });
  }

  request(req: Record<string, unknown>, timeoutMs = 60_000): Promise<DriverReply> {
    if (this.exited) return Promise.reject(new Error(`driver.py is gone: ${this.stderr}`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`driver.py: no reply to ${String(req.op)} in ${timeoutMs} ms`)), timeoutMs);
      this.waiting.push({
        resolve: (r) => { clearTimeout(timer); resolve(r); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      this.child.stdin!.write(JSON.stringify(req) + '\n');
    });
  }

  async quit(): Promise<void> {
    if (this.exited) return;
    await this.request({ op: 'quit' }, 10_000).catch(() => undefined);
  }

  /** SIGKILL by PID (if still running) and wait for the exit. */
  async kill(): Promise<void> {
    if (this.exited) return;
    const gone = new Promise<void>((r) => this.child.once('exit', () => r()));
    try { process.kill(this.pid, 'SIGKILL'); } catch { /* gone */ }
    await gone;
  }
}
