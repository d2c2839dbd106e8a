/**
 * The crash-loop soak, shared by test/integration/crash-loop.test.ts (a few
 * cycles) and bench/crash-loop.ts (a hundred and more): a mixed workload
 * through real NBD clients (libnbd, one driver.py per writable volume)
 * against the real daemon, which is SIGKILLed at the end of every cycle at a
 * random moment and restarted, and everything is checked against a ledger.
 *
 *   ┌─ cycle ───────────────────────────────────────────────────────────────┐
 *   │ 3–12 random steps on the writable volumes (the origin and its clones):│
 *   │   write (unaligned, across objects, 15 % FUA) · trim · write-zeroes   │
 *   │   (FUA, NO_HOLE, FAST_ZERO) · flush · read (must equal the ledger) ·  │
 *   │   burst (concurrent writes on every volume at once) · snapshot of a   │
 *   │   writable volume (`archipelago snapshot V S --admin-socket`) ·       │
 *   │   clone of a snapshot (`archipelago clone`, then written like the     │
 *   │   others) · gc while bursts run; the oldest snapshot or clone is      │
 *   │   removed (`archipelago remove`) past the caps, so gc has work        │
 *   │ SIGKILL at a random moment: idle · mid-burst · mid-flush ·            │
 *   │   mid-snapshot · while gc and a burst run                             │
 *   │ restart ──▶ `archipelago list` (exactly the names of the ledger) ──▶  │
 *   │   `archipelago info NAME --json` on every name (header and usage:     │
 *   │   every map chunk readable) ──▶ full read of every volume (crash      │
 *   │   model) and every snapshot (byte for byte)                           │
 *   └───────────────────────────────────────────────────────────────────────┘
 *
 * The ledger:
 *   - per writable volume, a SectorModel (test/helpers/crash-model.ts): every
 *     write acknowledged before a completed FLUSH, or with FUA, must be there
 *     after the kill; a sector with unflushed writes may hold any state they
 *     allow. A snapshot flushes its origin first (admin.ts: quiesce, flush,
 *     snapshot), so a snapshot that exists is a durable point of its origin;
 *   - per snapshot, its full contents when taken (the origin's ledger at that
 *     moment: nothing else is in flight while it is taken). Snapshots are
 *     immutable: any later difference is lost data. A snapshot whose request
 *     was cut by the kill may exist or not; if it exists it must be complete;
 *   - a clone starts as its snapshot's contents, all durable, and has its own
 *     model from then on.
 * Anything else (a map that does not load, a name missing or extra in
 * `list`, a byte no allowed state explains, a snapshot that changed) throws
 * CrashLoopFailure with the seed, the cycle and the recent operations; the
 * first failure ends the run (stop and look: DESIGN.md §3–4).
 */
import path from 'node:path';
import { cli, startDaemon, type Daemon } from './daemon.js';
import { NbdDriver, SECTOR, SectorModel, makeRng, randomData, type DriverReply } from './crash-model.js';
import { adminRequest } from '../../src/daemon/admin.js';

interface Teardown { teardown(fn: () => unknown): void }

const KiB = 1024;
const MiB = 1024 * KiB;

export interface CrashLoopOptions {
  /** Store URL (file:DIR or rados:…); must be empty. */
  store: string;
  /** Kill-and-restart cycles to run. */
  cycles: number;
  seed: number;
  /** Children (daemons, drivers, CLI runs) are killed by PID in its teardown. */
  t: Teardown;
  /** A private directory for the admin socket. */
  workDir: string;
  /** Volume size (default 4 MiB) and object size (default 64 KiB). */
  size?: number;
  objectSize?: number;
  /** Snapshots and clones kept alive at once; older ones are removed (defaults 4 and 2). */
  maxSnapshots?: number;
  maxClones?: number;
  /** Steps per cycle before the kill, chosen uniformly (default 3–12). */
  minSteps?: number;
  maxSteps?: number;
  /** One line per cycle and per notable event. */
  log?: (line: string) => void;
}

export interface CrashLoopResult {
  seed: number;
  /** Cycles whose restart was verified. */
  cycles: number;
  /** Operations done (acknowledged), by kind. */
  ops: Record<string, number>;
  /** Kills, by the moment chosen. */
  kills: Record<string, number>;
  /** Outcome counts of interrupted operations (e.g. snapshot cut by the kill: created or not). */
  outcomes: Record<string, number>;
  bytesWritten: number;
  /** Bytes compared with the ledger after restarts (volumes and snapshots). */
  bytesVerified: number;
  /** Bytes no allowed state explains (must be 0). */
  bytesLost: number;
  /** Objects gc swept. */
  gcSwept: number;
  /** Candidate sets that grew past the cap (became "anything"). */
  capHits: number;
  /** Wall time, and per phase. */
  ms: number;
  msBy: Record<string, number>;
}

export class CrashLoopFailure extends Error {
  constructor(message: string, readonly seed: number, readonly cycle: number, readonly detail: Record<string, unknown>, readonly result: CrashLoopResult) {
    super(`crash loop seed ${seed}, cycle ${cycle}: ${message}`);
    this.name = 'CrashLoopFailure';
  }
}

interface Writable {
  name: string;
  model: SectorModel;
  driver: NbdDriver;
}

interface Snapshot {
  name: string;
  of: string;
  content: Buffer;
}

interface Range { off: number; len: number }
interface BurstWrite extends Range { data: Buffer; fua: boolean }

type KillMoment = 'idle' | 'burst' | 'flush' | 'snapshot' | 'gc';
const KILL_WEIGHTS: readonly (readonly [KillMoment, number])[] = [
  ['idle', 15], ['burst', 35], ['flush', 15], ['snapshot', 20], ['gc', 15],
];
type StepKind = 'write' | 'trim' | 'zero' | 'flush' | 'read' | 'burst' | 'snapshot' | 'clone' | 'gc';
const STEP_WEIGHTS: readonly (readonly [StepKind, number])[] = [
  ['write', 28], ['trim', 6], ['zero', 7], ['flush', 8], ['read', 6], ['burst', 15], ['snapshot', 12], ['clone', 12], ['gc', 5],
];

/** Runs the soak; resolves with the figures, or throws CrashLoopFailure at the first violation. */
export function runCrashLoop(o: CrashLoopOptions): Promise<CrashLoopResult> {
  return new CrashLoop(o).run();
}

class CrashLoop {
  private readonly rng: () => number;
  private readonly size: number;
  private readonly obj: number;
  private readonly admin: string;
  private readonly writables: Writable[] = [];
  private readonly snapshots: Snapshot[] = [];
  private reader!: NbdDriver;
  private daemon!: Daemon;
  private readonly result: CrashLoopResult;
  private readonly recent: string[] = [];
  private cycle = 0;
  private readonly started = Date.now();
  private names = 0;
  private readonly log: (line: string) => void;

  constructor(private readonly o: CrashLoopOptions) {
    this.rng = makeRng(o.seed);
    this.size = o.size ?? 4 * MiB;
    this.obj = o.objectSize ?? 64 * KiB;
    this.admin = path.join(o.workDir, 'admin.sock');
    this.log = o.log ?? (() => {});
    this.result = {
      seed: o.seed, cycles: 0, ops: {}, kills: {}, outcomes: {}, bytesWritten: 0, bytesVerified: 0, bytesLost: 0,
      gcSwept: 0, capHits: 0, ms: 0, msBy: {},
    };
  }

  // ------------------------------------------------------------ randomness

  /** Integer in [0, n). */
  private rand(n: number): number { return Math.floor((this.rng() / 2 ** 32) * n); }
  private chance(p: number): boolean { return this.rng() / 2 ** 32 < p; }
  private pick<T>(xs: readonly T[]): T { return xs[this.rand(xs.length)]!; }
  private weighted<K>(table: readonly (readonly [K, number])[]): K {
    let k = this.rand(table.reduce((a, [, w]) => a + w, 0));
    for (const [kind, w] of table) {
      if (k < w) return kind;
      k -= w;
    }
    return table[0]![0];
  }

  /** Byte-random, 512-aligned, 4K-aligned, or just before an object boundary. */
  private offset(): number {
    const k = this.rand(10);
    if (k < 4) return this.rand(this.size);
    if (k < 6) return this.rand(this.size / SECTOR) * SECTOR;
    if (k < 8) return this.rand(this.size / 4096) * 4096;
    return Math.max(0, (1 + this.rand(this.size / this.obj - 1)) * this.obj - 1 - this.rand(3000));
  }

  private writeRange(): Range {
    const k = this.rand(20);
    const len = k < 8 ? 1 + this.rand(4096)
      : k < 13 ? 1 + this.rand(this.obj)
        : k < 17 ? this.obj + this.rand(3 * this.obj)
          : this.pick([512, 4096, this.obj, 2 * this.obj]);
    const off = this.offset();
    return { off, len: Math.max(1, Math.min(len, this.size - off)) };
  }

  /** Whole objects (aligned), or anything, often covering whole objects inside. */
  private zeroRange(): Range {
    const objects = this.size / this.obj;
    if (this.chance(0.4)) {
      const first = this.rand(objects);
      return { off: first * this.obj, len: (1 + this.rand(Math.min(4, objects - first))) * this.obj };
    }
    const off = this.offset();
    return { off, len: Math.min(1 + this.rand(this.chance(0.5) ? 8192 : 3 * this.obj), this.size - off) };
  }

  // ------------------------------------------------------------ bookkeeping

  private count(kind: string, n = 1): void { this.result.ops[kind] = (this.result.ops[kind] ?? 0) + n; }
  private outcome(kind: string): void { this.result.outcomes[kind] = (this.result.outcomes[kind] ?? 0) + 1; }
  private note(line: string): void {
    this.recent.push(`c${this.cycle} ${line}`);
    if (this.recent.length > 60) this.recent.shift();
  }
  private async timed<R>(phase: string, fn: () => Promise<R>): Promise<R> {
    const t0 = Date.now();
    try {
      return await fn();
    } finally {
      this.result.msBy[phase] = (this.result.msBy[phase] ?? 0) + Date.now() - t0;
    }
  }

  private fail(what: string, extra: Record<string, unknown> = {}): never {
    this.result.capHits = this.writables.reduce((n, w) => n + w.model.capHits, this.result.capHits);
    this.result.ms = Date.now() - this.started;
    throw new CrashLoopFailure(what, this.o.seed, this.cycle, {
      ...extra,
      volumes: this.writables.map((w) => w.name),
      snapshots: this.snapshots.map((s) => `${s.name} (of ${s.of})`),
      recentOps: this.recent.slice(-40),
      daemonStderr: this.daemon?.stderr().slice(-4000),
    }, this.result);
  }

  private async must(w: Writable | null, req: Record<string, unknown>, driver = w!.driver): Promise<DriverReply> {
    const r = await driver.request(req);
    if (!r.ok) this.fail(`${String(req.op)}${w ? ` on ${w.name}` : ''} failed: ${r.error}`, { errno: r.errno });
    return r;
  }

  private async cliMust(args: string[], what: string, timeoutMs = 60_000): Promise<string> {
    const r = await cli([...args, '--store', this.o.store], { t: this.o.t, timeoutMs });
    if (r.code !== 0) this.fail(`${what}: archipelago ${args.join(' ')}: exit ${r.code}`, { stderr: r.stderr.slice(-4000), stdout: r.stdout.slice(-2000) });
    return r.stdout;
  }

  private newName(prefix: string): string { return `${prefix}${++this.names}`; }

  // ------------------------------------------------------------ the run

  async run(): Promise<CrashLoopResult> {
    const origin = 'vol';
    await this.cliMust(['create', origin, '--size', String(this.size), '--object-size', String(this.obj)], 'create the origin');
    this.daemon = await this.startDaemon();
    this.reader = new NbdDriver(this.o.t);
    try {
      await this.addWritable(origin, new SectorModel(this.size));
      for (this.cycle = 1; this.cycle <= this.o.cycles; this.cycle++) {
        const c0 = Date.now();
        const steps = (this.o.minSteps ?? 3) + this.rand((this.o.maxSteps ?? 12) - (this.o.minSteps ?? 3) + 1);
        for (let i = 0; i < steps; i++) await this.step();
        const moment = this.weighted(KILL_WEIGHTS);
        this.result.kills[moment] = (this.result.kills[moment] ?? 0) + 1;
        const pendingSnapshot = await this.timed('kill', () => this.killAt(moment));
        const verified = await this.timed('restart+verify', () => this.restartAndVerify(pendingSnapshot));
        this.result.cycles++;
        this.log(`cycle ${this.cycle}/${this.o.cycles}: ${steps} steps, SIGKILL ${moment}; ${this.writables.length} volumes, `
          + `${this.snapshots.length} snapshots; verified ${(verified / MiB).toFixed(1)} MiB; ${Date.now() - c0} ms`);
      }
      // The end: a graceful stop keeps everything acknowledged, exactly.
      this.note('SIGTERM');
      await this.disconnectAll();
      const code = await this.daemon.stop();
      if (code !== 0) this.fail(`final SIGTERM: daemon exited with ${this.daemon.exitStatus()}`);
      for (const w of this.writables) w.model.flushed();
      await this.restartAndVerify(null, true);
      await this.disconnectAll();
      const last = await this.daemon.stop();
      if (last !== 0) this.fail(`last SIGTERM: daemon exited with ${this.daemon.exitStatus()}`);
    } finally {
      await Promise.all([this.reader, ...this.writables.map((w) => w.driver)].map((d) => d.quit().then(() => d.kill())));
      if (this.daemon.running) await this.daemon.kill();
    }
    this.result.capHits = this.writables.reduce((n, w) => n + w.model.capHits, this.result.capHits);
    this.result.ms = Date.now() - this.started;
    return this.result;
  }

  private startDaemon(): Promise<Daemon> {
    // A 4 s lock lease: each restart waits for the killed daemon's lease to run out (test.sh: RADOS watch timeout 5 s).
    return startDaemon(this.o.t, { store: this.o.store, extraArgs: ['--admin-socket', this.admin, '--metrics', '', '--lock-lease', '4'] });
  }

  private async addWritable(name: string, model: SectorModel): Promise<Writable> {
    const w: Writable = { name, model, driver: new NbdDriver(this.o.t) };
    this.writables.push(w);
    const r = await this.must(w, { op: 'connect', uri: this.daemon.uri(name) });
    if (r.size !== this.size) this.fail(`${name}: size ${r.size}, expected ${this.size}`);
    return w;
  }

  private async disconnectAll(): Promise<void> {
    await Promise.all(this.writables.map((w) => w.driver.request({ op: 'disconnect' }).catch(() => undefined)));
  }

  // ------------------------------------------------------------ steps

  private async step(): Promise<void> {
    const kind = this.weighted(STEP_WEIGHTS);
    await this.timed(kind, async () => {
      switch (kind) {
        case 'write': return this.write(this.pick(this.writables));
        case 'trim': return this.zero(this.pick(this.writables), 'trim');
        case 'zero': return this.zero(this.pick(this.writables), 'zero');
        case 'flush': return this.flush(this.pick(this.writables));
        case 'read': return this.read(this.pick(this.writables));
        case 'burst': return this.burst(this.burstTargets(), null);
        case 'snapshot': return this.snapshot(this.pick(this.writables));
        case 'clone': return this.snapshots.length ? this.clone(this.pick(this.snapshots)) : this.write(this.pick(this.writables));
        case 'gc':
          await Promise.all([this.gc(), this.burst(this.burstTargets(), null)]);
          return;
      }
    });
  }

  private async write(w: Writable): Promise<void> {
    const r = this.writeRange();
    const fua = this.chance(0.15);
    const data = randomData(this.rng, r.len);
    this.note(`${w.name} write${fua ? '/fua' : ''} @${r.off}+${r.len}`);
    await this.must(w, { op: 'write', off: r.off, data: data.toString('base64'), fua });
    w.model.write(r.off, r.len, data, fua);
    this.count(fua ? 'write-fua' : 'write');
    this.result.bytesWritten += r.len;
  }

  private async zero(w: Writable, op: 'trim' | 'zero'): Promise<void> {
    const r = this.zeroRange();
    const fua = this.chance(0.2);
    const noHole = op === 'zero' && this.chance(0.25);
    const fast = op === 'zero' && !noHole && this.chance(0.2);
    this.note(`${w.name} ${op}${fua ? '/fua' : ''}${noHole ? '/nohole' : ''}${fast ? '/fast' : ''} @${r.off}+${r.len}`);
    const rep = await w.driver.request({ op, off: r.off, len: r.len, fua, no_hole: noHole, fast_zero: fast });
    if (!rep.ok) {
      if (fast && (rep.errno === 'ENOTSUP' || rep.errno === 'EOPNOTSUPP')) { this.count('zero-fast-refused'); return; }
      this.fail(`${op} on ${w.name} failed: ${rep.error}`, { errno: rep.errno });
    }
    w.model.write(r.off, r.len, null, fua);
    this.count(op);
  }

  private async flush(w: Writable): Promise<void> {
    this.note(`${w.name} flush`);
    await this.must(w, { op: 'flush' });
    w.model.flushed();
    this.count('flush');
  }

  private async read(w: Writable): Promise<void> {
    const off = this.rand(this.size);
    const len = Math.min(this.size - off, 1 + this.rand(3 * this.obj));
    const rep = await this.must(w, { op: 'read', off, len });
    const got = Buffer.from(rep.data!, 'base64');
    const want = w.model.cur.subarray(off, off + len);
    if (!got.equals(want)) {
      const at = got.findIndex((b, i) => b !== want[i]);
      this.result.bytesLost += got.reduce((n, b, i) => n + (b !== want[i] ? 1 : 0), 0);
      this.fail(`${w.name}: read @${off}+${len} differs from the ledger at byte ${off + at} (the daemon was running)`);
    }
    this.count('read');
  }

  /** One to all writable volumes, for a burst. */
  private burstTargets(): Writable[] {
    return this.writables.filter((_, i) => i === 0 || this.chance(0.7));
  }

  /**
   * Non-overlapping writes in flight at once on each target, all targets at
   * once; `during` (a kill) runs while they are in flight. Acknowledged FUA
   * writes are durable; every other write of the burst may or may not be.
   */
  private async burst(targets: Writable[], during: (() => Promise<void>) | null): Promise<void> {
    const plans = targets.map((w) => {
      const writes: BurstWrite[] = [];
      const n = 2 + this.rand(10);
      for (let i = 0; i < n * 3 && writes.length < n; i++) {
        const r = this.writeRange();
        if (writes.some((b) => r.off < b.off + b.len && b.off < r.off + r.len)) continue;
        writes.push({ ...r, data: randomData(this.rng, r.len), fua: this.chance(0.2) });
      }
      this.note(`${w.name} burst${during ? '+kill' : ''} ${writes.map((b) => `@${b.off}+${b.len}${b.fua ? 'F' : ''}`).join(' ')}`);
      return { w, writes };
    });
    const replies = plans.map(({ w, writes }) => w.driver.request({
      op: 'burst', writes: writes.map((b) => ({ off: b.off, data: b.data.toString('base64'), fua: b.fua })),
    }));
    const cut = during ? during() : null;
    const done = await Promise.all(replies);
    await cut;
    plans.forEach(({ w, writes }, k) => {
      const reply = done[k]!;
      if (!during && !reply.ok) this.fail(`burst on ${w.name} failed: ${reply.error}`);
      const acked = reply.done ?? writes.map(() => false);
      for (const b of writes) w.model.write(b.off, b.len, b.data, false);
      writes.forEach((b, i) => { if (acked[i] && b.fua) w.model.write(b.off, b.len, b.data, true); });
      const n = acked.filter(Boolean).length;
      this.count('burst-write', n);
      this.result.bytesWritten += writes.reduce((s, b, i) => s + (acked[i] ? b.len : 0), 0);
      if (during) this.outcome(`burst-kill-acked-${n === writes.length ? 'all' : n > 0 ? 'some' : 'none'}`);
    });
    this.count('burst');
  }

  /** Snapshot through the daemon (CLI, admin socket); a snapshot is a durable point of its origin. */
  private async snapshot(w: Writable): Promise<void> {
    const name = this.newName('snap');
    this.note(`snapshot ${w.name} -> ${name}`);
    await this.cliMust(['snapshot', w.name, name, '--admin-socket', this.admin], `snapshot ${w.name} ${name}`);
    this.snapshots.push({ name, of: w.name, content: Buffer.from(w.model.cur) });
    w.model.flushed();
    this.count('snapshot');
    while (this.snapshots.length > (this.o.maxSnapshots ?? 4)) await this.remove(this.snapshots.shift()!.name);
  }

  /** Clones a snapshot (CLI, offline: it writes one header) and starts writing the clone. */
  private async clone(s: Snapshot): Promise<void> {
    const clones = this.writables.slice(1);
    if (clones.length >= (this.o.maxClones ?? 2)) {
      const oldest = clones[0]!;
      this.writables.splice(this.writables.indexOf(oldest), 1);
      this.result.capHits += oldest.model.capHits;
      await oldest.driver.quit();
      await oldest.driver.kill();
      await this.remove(oldest.name);
    }
    const name = this.newName('clone');
    this.note(`clone ${s.name} -> ${name}`);
    await this.cliMust(['clone', s.name, name], `clone ${s.name} ${name}`);
    const w = await this.addWritable(name, new SectorModel(this.size, 32, s.content));
    this.count('clone');
    // Its first write copies up from the snapshot's objects.
    await this.write(w);
  }

  /** Removes a snapshot or clone once the daemon has it closed (nobody may have it open: volume-remove.ts). */
  private async remove(name: string): Promise<void> {
    const until = Date.now() + 10_000;
    for (;;) {
      const st = await adminRequest(this.admin, { op: 'status' });
      if (!st.ok) this.fail(`admin status: ${st.message}`);
      const open = (st.volumes as { name: string }[]).some((v) => v.name === name);
      if (!open) break;
      if (Date.now() > until) this.fail(`${name} still open in the daemon 10 s after its last client left`);
      await new Promise((r) => setTimeout(r, 20));
    }
    this.note(`remove ${name}`);
    await this.cliMust(['remove', name], `remove ${name}`);
    this.count('remove');
  }

  private async gc(): Promise<void> {
    this.note('gc');
    const out = await this.cliMust(['gc', '--json'], 'gc', 120_000);
    const r = JSON.parse(out) as { sweptObjects: number; errors: string[] };
    if (r.errors.length) this.fail(`gc could not delete: ${r.errors.join('; ')}`);
    this.result.gcSwept += r.sweptObjects;
    this.count('gc');
  }

  // ------------------------------------------------------------ the kill

  /**
   * SIGKILLs the daemon at `moment`. Returns the snapshot whose request the
   * kill may have cut (it may exist after the restart, or not).
   */
  private async killAt(moment: KillMoment): Promise<Snapshot | null> {
    const kill = async (delayMs: number) => {
      if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
      this.note(`SIGKILL (${moment}, after ${delayMs} ms)`);
      await this.daemon.kill();
    };
    switch (moment) {
      case 'idle':
        await kill(0);
        return null;
      case 'burst':
        await this.burst(this.burstTargets(), () => kill(this.chance(0.5) ? this.rand(6) : 6 + this.rand(40)));
        return null;
      case 'flush': {
        // Writes acknowledged, then FLUSH on every volume; the kill lands around the flushes.
        await this.burst(this.burstTargets(), null);
        const flushes = this.writables.map((w) => w.driver.request({ op: 'flush' }).then((r) => ({ w, r })));
        await kill(this.rand(4));
        for (const { w, r } of await Promise.all(flushes)) {
          this.outcome(`flush-kill-${r.ok ? 'replied' : 'cut'}`);
          if (r.ok) w.model.flushed();
        }
        return null;
      }
      case 'snapshot': {
        const w = this.pick(this.writables);
        const name = this.newName('snap');
        const pending: Snapshot = { name, of: w.name, content: Buffer.from(w.model.cur) };
        this.note(`snapshot ${w.name} -> ${name} (cut by the kill)`);
        // Half through the CLI (the kill falls before, during or after its
        // request), half straight to the socket (the kill falls within a few ms).
        const viaCli = this.chance(0.5);
        const req = viaCli
          ? cli(['snapshot', w.name, name, '--admin-socket', this.admin, '--store', this.o.store], { t: this.o.t }).then((r) => r.code === 0)
          : adminRequest(this.admin, { op: 'snapshot', volume: w.name, name }, 30_000).then((r) => r.ok, () => false);
        await kill(viaCli ? 200 + this.rand(500) : this.rand(60));
        const replied = await req;
        this.outcome(`snapshot-kill-${replied ? 'replied' : 'cut'}`);
        if (replied) {
          // Acknowledged: it must exist after the restart.
          this.snapshots.push(pending);
          w.model.flushed();
          this.count('snapshot');
          return null;
        }
        return pending;
      }
      case 'gc': {
        // gc (its own process) keeps going while bursts run and the daemon dies and restarts.
        const gc = this.gc();
        await this.burst(this.burstTargets(), () => kill(this.rand(200)));
        await gc;
        return null;
      }
    }
  }

  // ------------------------------------------------------------ restart and verify

  /** Starts the daemon, checks every map loads and every byte against the ledger; returns the bytes verified. */
  private async restartAndVerify(pending: Snapshot | null, exact = false): Promise<number> {
    // list: exactly the ledger's names (the cut snapshot may or may not be
    // there). It reads what the dead daemon left; the new one opens volumes
    // read-only and writes nothing before the first change, so both may start
    // together.
    const [daemon, out] = await Promise.all([this.startDaemon(), this.cliMust(['list'], 'list after the restart')]);
    this.daemon = daemon;
    const listed = out.split('\n').filter(Boolean).sort();
    let pendingExists = false;
    if (pending && listed.includes(pending.name)) {
      pendingExists = true;
      this.snapshots.push(pending);
      this.writables.find((w) => w.name === pending.of)!.model.flushed();
      this.count('snapshot');
    }
    if (pending) this.outcome(`snapshot-kill-cut-${pendingExists ? 'created' : 'absent'}`);
    const expected = [...this.writables.map((w) => w.name), ...this.snapshots.map((s) => s.name)].sort();
    if (listed.join(',') !== expected.join(',')) this.fail('archipelago list after the restart differs from the ledger', { listed, expected });

    // info on every name (the header, and every chunk of every related map:
    // usage), while the daemon serves the full reads (which load every chunk).
    const kinds = new Map<string, string>([
      ...this.writables.map((w) => [w.name, 'volume'] as const),
      ...this.snapshots.map((s) => [s.name, 'snapshot'] as const),
    ]);
    const [, verified] = await Promise.all([
      this.timed('info', () => mapLimit(expected, 2, async (name) => {
        const info = JSON.parse(await this.cliMust(['info', name, '--json'], `info ${name} after the restart`)) as
          { kind: string; size: number; usageUnknownBecause: string | null };
        if (info.kind !== kinds.get(name)) this.fail(`info ${name}: kind ${info.kind}, expected ${kinds.get(name)}`);
        if (info.size !== this.size) this.fail(`info ${name}: size ${info.size}, expected ${this.size}`);
        if (info.usageUnknownBecause !== null) this.fail(`info ${name}: a map does not load: ${info.usageUnknownBecause}`);
      })),
      this.timed('read-all', () => this.verifyData(exact)),
    ]);
    this.result.bytesVerified += verified;
    return verified;
  }

  /** Full reads of every volume (against its model) and every snapshot (byte for byte); the bytes verified. */
  private async verifyData(exact: boolean): Promise<number> {
    let verified = 0;
    const reads = await Promise.all(this.writables.map(async (w) => {
      const c = await this.must(w, { op: 'connect', uri: this.daemon.uri(w.name) });
      if (c.size !== this.size) this.fail(`${w.name}: size ${c.size} after the restart`);
      const r = await this.must(w, { op: 'read', off: 0, len: this.size });
      return { w, actual: Buffer.from(r.data!, 'base64') };
    }));
    for (const { w, actual } of reads) {
      const bad = exact ? w.model.diff(actual) : w.model.checkAfterCrash(actual);
      verified += this.size;
      if (bad.length > 0) {
        this.result.bytesLost += bad.length * SECTOR;
        this.fail(`${w.name}: ${bad.length} sectors after the ${exact ? 'SIGTERM' : 'SIGKILL'} hold what no allowed state explains`, {
          sectors: bad.slice(0, 5).map((s) => ({
            sector: s, offset: s * SECTOR, object: Math.floor((s * SECTOR) / this.obj),
            actual: actual.toString('hex', s * SECTOR, s * SECTOR + 16),
            expected: w.model.cur.toString('hex', s * SECTOR, s * SECTOR + 16),
            candidates: w.model.pending.has(s) ? (w.model.pending.get(s)?.size ?? 'any') : 1,
          })),
        });
      }
      w.model.settle(actual);
    }

    // Every snapshot: exactly what it held when taken.
    for (const s of this.snapshots) {
      await this.must(null, { op: 'connect', uri: this.daemon.uri(s.name) }, this.reader);
      const r = await this.must(null, { op: 'read', off: 0, len: this.size }, this.reader);
      await this.reader.request({ op: 'disconnect' });
      const actual = Buffer.from(r.data!, 'base64');
      verified += this.size;
      if (!actual.equals(s.content)) {
        let bad = 0;
        let first = -1;
        for (let i = 0; i < this.size; i += SECTOR) {
          if (!actual.subarray(i, i + SECTOR).equals(s.content.subarray(i, i + SECTOR))) { bad++; if (first < 0) first = i; }
        }
        this.result.bytesLost += bad * SECTOR;
        this.fail(`snapshot ${s.name} (of ${s.of}) changed: ${bad} sectors differ from when it was taken, the first at ${first}`);
      }
    }
    return verified;
  }
}

/** Runs fn over xs, at most `limit` at a time. */
async function mapLimit<T>(xs: readonly T[], limit: number, fn: (x: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, xs.length) }, async () => {
    while (next < xs.length) await fn(xs[next++]!);
  }));
}
