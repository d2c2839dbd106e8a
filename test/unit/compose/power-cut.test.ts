/**
 * Model-based power-cut test of the composition layer (DESIGN.md §3, §4, §6).
 *
 * A volume of 16 × 64 KiB objects on the memory blocker gets a seeded random
 * sequence of writes (unaligned, some FUA), trims, write-zeroes (with and
 * without NO_HOLE, some FAST_ZERO), flushes, faked snapshots (markShared),
 * batches of concurrent requests on disjoint sectors, and power cuts — between
 * requests or in the middle of one (after a random number of blocker calls),
 * keeping none, all or a random half of the unsynced objects. Some requests
 * meet an injected blocker failure (write, sync, replace, remove, read,
 * readFull): they must fail with that code, or succeed when compose absorbs it
 * (a failed remove), and each sector they touched must read old or new.
 *
 * The reference model keeps, per 512-byte sector, the value it must read now
 * and the set of values it may hold after a power cut: the value at the last
 * durable point (a completed FLUSH, or a FUA request covering the whole
 * sector) plus the value after every later request touching it, acknowledged
 * or cut short. After each cut the volume is reopened on the same storage
 * (VolumeMap.open must succeed: never a torn map; half the time for writing,
 * half read-only as the daemon does, upgraded by the first change), every sector
 * must read one of its allowed values (a mapped object that is missing is a
 * failure too), and the model restarts from what was read.
 *
 * Seeds: ARCHIPELAGO_MODEL_SEED runs one seed; otherwise a fixed set plus one
 * fresh seed, printed. ARCHIPELAGO_MODEL_STEPS sets the steps per seed.
 *
 * A negative control runs the same model against a blocker that drops the
 * sync of data objects (names starting with "d."), and requires the model to
 * notice.
 */
import { createHash } from 'node:crypto';
import t from 'tap';
import type { Blocker, BlockerCapabilities, ObjectStat } from '../../../src/blockers/blocker.js';
import { BlockerError } from '../../../src/blockers/errors.js';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { Volume } from '../../../src/compose/volume.js';
import type { ReadPiece } from '../../../src/compose/types.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';
import { mulberry32 } from '../../../src/common/prng.js';

const OBJ = 64 * 1024;
const OBJECTS = 16;
const SIZE = OBJ * OBJECTS;
const SECTOR = 512;
const SECTORS = SIZE / SECTOR;
const NAME = 'model';

// ------------------------------------------------------------ a power rail

/**
 * Sits between a Volume and the memory blocker like the power supply: after
 * `crashAfter` more calls, or `kill()`, every call rejects EIO and none reaches
 * the storage, so an abandoned Volume cannot touch the disk after the cut.
 * `quiesce()` waits for the calls already inside the storage to finish (they
 * completed before the power went). With `dropDataSync`, sync silently skips
 * data objects: the broken blocker of the negative control.
 */
class PowerRail implements Blocker {
  readonly kind = 'power-rail';
  readonly capabilities: BlockerCapabilities;
  crashAfter = Infinity;
  /** Fails the next call of `op` with `code` (an injected blocker failure). */
  fault: { op: string; code: 'EIO' | 'ENOSPC' | 'ETIMEDOUT' } | null = null;
  #dead = false;
  #inflight = 0;
  #idle: Array<() => void> = [];

  constructor(readonly disk: MemoryBlocker, readonly dropDataSync: boolean) {
    this.capabilities = disk.capabilities;
  }

  get dead(): boolean { return this.#dead; }

  kill(): void { this.#dead = true; }

  async quiesce(): Promise<void> {
    while (this.#inflight > 0) await new Promise<void>((resolve) => this.#idle.push(resolve));
  }

  async #run<T>(op: string, name: string, fn: () => Promise<T>): Promise<T> {
    if (!this.#dead && this.crashAfter-- <= 0) this.#dead = true;
    if (this.#dead) throw new BlockerError('EIO', op, name, 'the power is off');
    if (this.fault?.op === op) {
      const { code } = this.fault;
      this.fault = null;
      throw new BlockerError(code, op, name, 'injected fault');
    }
    this.#inflight++;
    try {
      return await fn();
    } finally {
      if (--this.#inflight === 0) for (const wake of this.#idle.splice(0)) wake();
    }
  }

  read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    return this.#run('read', name, () => this.disk.read(name, offset, length, target));
  }
  write(name: string, offset: number, data: Buffer): Promise<void> {
    return this.#run('write', name, () => this.disk.write(name, offset, data));
  }
  replace(name: string, data: Buffer): Promise<void> {
    return this.#run('replace', name, () => this.disk.replace(name, data));
  }
  readFull(name: string): Promise<Buffer> {
    return this.#run('readFull', name, () => this.disk.readFull(name));
  }
  punch(name: string, offset: number, length: number): Promise<void> {
    return this.#run('punch', name, () => this.disk.punch(name, offset, length));
  }
  remove(name: string): Promise<void> {
    return this.#run('remove', name, () => this.disk.remove(name));
  }
  stat(name: string): Promise<ObjectStat> {
    return this.#run('stat', name, () => this.disk.stat(name));
  }
  async *list(prefix: string): AsyncIterable<string> {
    if (this.#dead) throw new BlockerError('EIO', 'list', prefix, 'the power is off');
    yield* this.disk.list(prefix);
  }
  sync(names?: Iterable<string>): Promise<void> {
    let list = names === undefined ? undefined : [...names];
    if (this.dropDataSync && list !== undefined) list = list.filter((n) => !n.startsWith('d.'));
    return this.#run('sync', '', () => this.disk.sync(list));
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

// ------------------------------------------------------------ helpers


const ZERO_SECTOR_HASH = hash(Buffer.alloc(SECTOR));

function hash(b: Buffer): string {
  return createHash('sha1').update(b).digest('base64');
}

function assemble(offset: number, length: number, pieces: ReadPiece[]): Buffer {
  const out = Buffer.alloc(length);
  let pos = offset;
  for (const p of pieces) {
    if (p.offset !== pos) throw new Error(`read pieces not contiguous: ${p.offset} after ${pos}`);
    if (p.data) p.data.copy(out, p.offset - offset, 0, p.length);
    pos += p.length;
  }
  if (pos !== offset + length) throw new Error(`read pieces end at ${pos}, not ${offset + length}`);
  return out;
}

function codeOf(err: unknown): string {
  return String((err as { code?: unknown } | null)?.code ?? 'no code');
}

// ------------------------------------------------------------ the model

/** One request the model can apply: zeros when `data` is null. */
interface Change {
  offset: number;
  length: number;
  data: Buffer | null;
  fua: boolean;
}

class Model {
  /** What the volume must read now. */
  readonly cur = Buffer.alloc(SIZE);
  readonly curHash: string[] = new Array<string>(SECTORS).fill(ZERO_SECTOR_HASH);
  /** Per sector: the values it may hold after a power cut, each with where it came from. */
  allowed: Map<string, string>[] = Array.from({ length: SECTORS }, () => new Map([[ZERO_SECTOR_HASH, 'never written']]));

  /** Applies a request; acknowledged FUA requests make their whole sectors durable. */
  apply(c: Change, label: string, acked: boolean): void {
    if (c.length === 0) return;
    if (c.data) c.data.copy(this.cur, c.offset);
    else this.cur.fill(0, c.offset, c.offset + c.length);
    const first = Math.floor(c.offset / SECTOR);
    const last = Math.floor((c.offset + c.length - 1) / SECTOR);
    for (let s = first; s <= last; s++) {
      const h = hash(this.cur.subarray(s * SECTOR, (s + 1) * SECTOR));
      this.curHash[s] = h;
      const whole = c.offset <= s * SECTOR && (s + 1) * SECTOR <= c.offset + c.length;
      if (acked && c.fua && whole) this.allowed[s] = new Map([[h, `${label} (FUA)`]]);
      else if (!this.allowed[s]!.has(h)) this.allowed[s]!.set(h, label);
    }
  }

  /** A completed FLUSH: what the volume holds now is durable. */
  flushed(label: string): void {
    for (let s = 0; s < SECTORS; s++) this.allowed[s] = new Map([[this.curHash[s]!, label]]);
  }

  /** After a cut: the model restarts from what the volume reads. */
  reset(read: Buffer, label: string): void {
    read.copy(this.cur);
    for (let s = 0; s < SECTORS; s++) this.curHash[s] = hash(read.subarray(s * SECTOR, (s + 1) * SECTOR));
    this.flushed(label);
  }
}

// ------------------------------------------------------------ the run

interface RunOptions {
  seed: number;
  steps: number;
  dropDataSync?: boolean;
}

interface RunResult {
  failures: string[];
  /** Failures by kind: 'mismatch' (a sector holds a value it may not), 'EIO', 'open', 'live', 'error'. */
  kinds: Record<string, number>;
  counts: Record<string, number>;
}

type Op =
  | { kind: 'write'; change: Change }
  | { kind: 'zero'; change: Change; noHole: boolean; fastZero: boolean }
  | { kind: 'trim'; change: Change }
  | { kind: 'flush' }
  | { kind: 'markShared' }
  | { kind: 'batch'; ops: Op[] };

async function runModel(o: RunOptions): Promise<RunResult> {
  const rnd = mulberry32(o.seed);
  const int = (n: number): number => Math.floor(rnd() * n);
  const disk = new MemoryBlocker({ seed: o.seed });
  const failures: string[] = [];
  const kinds: Record<string, number> = {};
  const counts: Record<string, number> = {};
  const count = (k: string): void => { counts[k] = (counts[k] ?? 0) + 1; };
  const fail = (kind: string, msg: string): void => {
    kinds[kind] = (kinds[kind] ?? 0) + 1;
    if (failures.length < 20) failures.push(`seed ${o.seed} ${msg}`);
  };

  let rail = new PowerRail(disk, o.dropDataSync === true);
  let map = await VolumeMap.create(rail, NAME, { size: SIZE, objectSize: OBJ });
  let vol = new Volume(map, rail, false);
  const model = new Model();
  let fill = 0;

  const randomRange = (): { offset: number; length: number } => {
    const r = rnd();
    let offset: number;
    let length: number;
    if (r < 0.2) { // whole objects
      const first = int(OBJECTS);
      offset = first * OBJ;
      length = (1 + int(Math.min(3, OBJECTS - first))) * OBJ;
    } else if (r < 0.45) { // sector-aligned
      offset = int(SECTORS) * SECTOR;
      length = (1 + int(32)) * SECTOR;
    } else if (r < 0.85) { // small, unaligned
      offset = int(SIZE);
      length = 1 + int(r < 0.65 ? 700 : 9000);
    } else { // large, unaligned, crossing objects
      offset = int(SIZE);
      length = 1 + int(2.5 * OBJ);
    }
    length = Math.min(length, SIZE - offset);
    if (length === 0) { offset = SIZE - 1; length = 1; }
    return { offset, length };
  };
  const payload = (length: number): Buffer => {
    // Distinct per request: a counter stamped into a PRNG-ish fill.
    fill++;
    const b = Buffer.allocUnsafe(length);
    let x = (fill * 2654435761 + o.seed) >>> 0;
    for (let i = 0; i < length; i++) {
      x = (x * 1664525 + 1013904223) >>> 0;
      b[i] = (x >>> 24) || 1;
    }
    return b;
  };
  const randomOp = (inBatch: boolean): Op => {
    const r = rnd();
    const { offset, length } = randomRange();
    if (r < 0.5) return { kind: 'write', change: { offset, length, data: payload(length), fua: rnd() < 0.2 } };
    if (r < 0.75) {
      return { kind: 'zero', change: { offset, length, data: null, fua: rnd() < 0.15 }, noHole: rnd() < 0.4, fastZero: !inBatch && rnd() < 0.2 };
    }
    return { kind: 'trim', change: { offset, length, data: null, fua: rnd() < 0.1 } };
  };
  const randomBatch = (): Op => {
    const ops: Op[] = [];
    const used = new Set<number>();
    const n = 2 + int(3);
    for (let tries = 0; ops.length < n && tries < 20; tries++) {
      const op = randomOp(true) as Extract<Op, { change: Change }>;
      const c = op.change;
      // Sector-disjoint: otherwise the order of two requests in one sector is open.
      const first = Math.floor(c.offset / SECTOR);
      const last = Math.floor((c.offset + c.length - 1) / SECTOR);
      let clash = false;
      for (let s = first; s <= last && !clash; s++) clash = used.has(s);
      if (clash) continue;
      for (let s = first; s <= last; s++) used.add(s);
      ops.push(op);
    }
    return { kind: 'batch', ops };
  };

  const describe = (op: Op): string => {
    switch (op.kind) {
      case 'write': return `write ${op.change.offset}+${op.change.length}${op.change.fua ? ' FUA' : ''}`;
      case 'zero': return `zero ${op.change.offset}+${op.change.length}${op.noHole ? ' NO_HOLE' : ''}${op.fastZero ? ' FAST_ZERO' : ''}${op.change.fua ? ' FUA' : ''}`;
      case 'trim': return `trim ${op.change.offset}+${op.change.length}${op.change.fua ? ' FUA' : ''}`;
      case 'flush': return 'flush';
      case 'markShared': return 'markShared';
      case 'batch': return `batch [${op.ops.map(describe).join(', ')}]`;
    }
  };

  /** Runs an op; `rejected` lists the requests (with their errors) that failed. */
  const execute = async (op: Op): Promise<Array<{ op: Op; err: unknown }>> => {
    const failed: Array<{ op: Op; err: unknown }> = [];
    const one = async (op: Op): Promise<void> => {
      try {
        switch (op.kind) {
          case 'write': await vol.write(op.change.offset, op.change.data!, op.change.fua); break;
          case 'zero': await vol.zero(op.change.offset, op.change.length, { fua: op.change.fua, noHole: op.noHole, fastZero: op.fastZero }); break;
          case 'trim': await vol.trim(op.change.offset, op.change.length, op.change.fua); break;
          case 'flush': await vol.flush(); break;
          case 'markShared':
            if (!map.writable) await map.beginWrites(); // opened read-only after a cut
            await map.markShared();
            break;
          case 'batch': await Promise.all(op.ops.map(one)); break;
        }
      } catch (err) {
        if (op.kind !== 'batch') failed.push({ op, err });
      }
    };
    await one(op);
    return failed;
  };

  /**
   * Updates the model for an op after it ran. A request cut short by the
   * power cut may or may not have happened; one failed by an injected fault
   * (`injected`) leaves each of its sectors old or new, which is checked at
   * once by reading them back.
   */
  const account = async (op: Op, label: string, failed: Array<{ op: Op; err: unknown }>, injected?: string): Promise<void> => {
    const ops = op.kind === 'batch' ? op.ops : [op];
    const indeterminate: Array<{ change: Change; before: Buffer; what: string }> = [];
    for (const one of ops) {
      const f = failed.find((x) => x.op === one);
      if (f && one.kind === 'zero' && one.fastZero && codeOf(f.err) === 'ENOTSUP') {
        count('fastZero ENOTSUP');
        continue; // refused before changing anything
      }
      if (f && !rail.dead) {
        if (injected === undefined || codeOf(f.err) !== injected) {
          fail('error', `step ${label}: ${describe(one)} failed: ${codeOf(f.err)} ${(f.err as Error).message}`
            + (injected ? ` (the injected fault was ${injected})` : ' (no fault injected)'));
          continue;
        }
        count('failed by a fault');
      }
      if (one.kind === 'flush') {
        if (!f) model.flushed(`${label} flush`);
        continue;
      }
      if (one.kind === 'markShared' || one.kind === 'batch') continue;
      const what = `${label} ${describe(one)}${f ? (rail.dead ? ' (cut short)' : ' (failed)') : ''}`;
      if (f && !rail.dead) {
        const c = one.change;
        indeterminate.push({ change: c, before: Buffer.from(model.cur.subarray(c.offset, c.offset + c.length)), what });
      }
      model.apply(one.change, what, !f);
    }
    for (const { change: c, before, what } of indeterminate) {
      const first = Math.floor(c.offset / SECTOR) * SECTOR;
      const end = Math.min(SIZE, Math.ceil((c.offset + c.length) / SECTOR) * SECTOR);
      let got: Buffer;
      try {
        got = assemble(first, end - first, await vol.read(first, end - first));
      } catch (err) {
        fail('live', `${what}: read-back failed: ${codeOf(err)} ${(err as Error).message}`);
        continue;
      }
      // Per sector: the value before the failed request or the one after it.
      const old = Buffer.from(model.cur.subarray(first, end));
      before.copy(old, c.offset - first);
      for (let at = first; at < end; at += SECTOR) {
        const g = got.subarray(at - first, at - first + SECTOR);
        const isNew = g.equals(model.cur.subarray(at, at + SECTOR));
        if (!isNew && !g.equals(old.subarray(at - first, at - first + SECTOR))) {
          fail('live', `${what}: sector ${at / SECTOR} (byte ${at}) reads neither the old nor the new value`);
        }
      }
      model.apply({ offset: first, length: end - first, data: got, fua: false }, `${what}, as read back`, true);
    }
  };

  const checkLive = async (label: string, offset = 0, length = SIZE): Promise<void> => {
    let got: Buffer;
    try {
      got = assemble(offset, length, await vol.read(offset, length));
    } catch (err) {
      fail('live', `${label}: live read ${offset}+${length} failed: ${codeOf(err)} ${(err as Error).message}`);
      return;
    }
    const want = model.cur.subarray(offset, offset + length);
    if (!got.equals(want)) {
      let i = 0;
      while (got[i] === want[i]) i++;
      fail('live', `${label}: live read differs at byte ${offset + i} (got ${got[i]}, want ${want[i]})`);
    }
  };

  const powerCut = async (label: string, keepUnsynced: 'none' | 'all' | 'random', exact: boolean): Promise<boolean> => {
    rail.kill();
    await rail.quiesce();
    disk.powerCut({ keepUnsynced, seed: int(2 ** 31) });
    count(`cut ${keepUnsynced}`);
    rail = new PowerRail(disk, o.dropDataSync === true);
    const forWrite = rnd() < 0.5; // else read-only, as the daemon opens: the first change upgrades it
    try {
      map = await VolumeMap.open(rail, NAME, { forWrite });
    } catch (err) {
      fail('open', `${label}: VolumeMap.open after the cut failed: ${codeOf(err)} ${(err as Error).message}`);
      return false;
    }
    vol = new Volume(map, rail, false);
    const read = Buffer.alloc(SIZE);
    const unreadable = new Set<number>();
    for (let i = 0; i < OBJECTS; i++) {
      try {
        assemble(i * OBJ, OBJ, await vol.read(i * OBJ, OBJ)).copy(read, i * OBJ);
      } catch (err) {
        fail('EIO', `${label}: object ${i} unreadable after the cut (${keepUnsynced}): ${codeOf(err)} ${(err as Error).message}`);
        // Continue from zeros there: trim it so the volume matches.
        unreadable.add(i);
        await vol.trim(i * OBJ, OBJ, false);
      }
    }
    for (let s = 0; s < SECTORS; s++) {
      if (unreadable.has(Math.floor(s * SECTOR / OBJ))) continue;
      const h = hash(read.subarray(s * SECTOR, (s + 1) * SECTOR));
      const allowed = model.allowed[s]!;
      if (!allowed.has(h)) {
        const wasCur = h === model.curHash[s];
        fail('mismatch', `${label}: cut (${keepUnsynced}) sector ${s} (byte ${s * SECTOR}, object ${Math.floor(s * SECTOR / OBJ)}) `
          + `holds a value it may not${wasCur ? ' (the current one)' : ''}; allowed: ${[...allowed.values()].join(' | ')}`);
      } else if (exact && h !== model.curHash[s]) {
        fail('mismatch', `${label}: cut keeping everything, yet sector ${s} (byte ${s * SECTOR}) is not the current value; `
          + `it holds: ${allowed.get(h)}`);
      }
    }
    model.reset(read, `${label} after the cut`);
    return true;
  };

  for (let step = 0; step < o.steps; step++) {
    const label = `#${step}`;
    const r = rnd();
    if (r < 0.1) {
      // A power cut, between requests or in the middle of one.
      const keepUnsynced = (['none', 'all', 'random'] as const)[int(3)]!;
      if (rnd() < 0.5) {
        const op = rnd() < 0.15 ? { kind: 'flush' as const } : rnd() < 0.1 ? { kind: 'markShared' as const } : rnd() < 0.3 ? randomBatch() : randomOp(false);
        rail.crashAfter = int(10);
        const failed = await execute(op);
        count(rail.dead ? 'cut mid-request' : 'cut after a short request');
        await account(op, `${label} ${rail.dead ? 'cut during' : 'before the cut'}`, failed);
      } else {
        count('cut between requests');
      }
      const exact = keepUnsynced === 'all' && !rail.dead;
      if (!(await powerCut(label, keepUnsynced, exact))) break;
      continue;
    }
    let op: Op;
    if (r < 0.17) op = { kind: 'flush' };
    else if (r < 0.2) op = { kind: 'markShared' };
    else if (r < 0.28) op = randomBatch();
    else op = randomOp(false);
    count(op.kind);
    let injected: string | undefined;
    if (rnd() < 0.08) {
      const code = (['EIO', 'ENOSPC', 'ETIMEDOUT'] as const)[int(3)]!;
      rail.fault = { op: (['write', 'sync', 'replace', 'remove', 'read', 'readFull'] as const)[int(6)]!, code };
      injected = code;
      count(`fault ${rail.fault.op}`);
    }
    const failed = await execute(op);
    rail.fault = null;
    await account(op, label, failed, injected);
    if (rnd() < 0.15) {
      const { offset, length } = randomRange();
      await checkLive(`${label} after ${describe(op)}`, offset, length);
    }
    if (step % 50 === 49) await checkLive(`${label} periodic`);
  }
  await checkLive('end');
  return { failures, kinds, counts };
}

// ------------------------------------------------------------ the tests

const envSeed = process.env.ARCHIPELAGO_MODEL_SEED;
const steps = Number(process.env.ARCHIPELAGO_MODEL_STEPS ?? 300);
const seeds = envSeed !== undefined ? [Number(envSeed)] : [1, 2, 3, 4, 5, 6, (Date.now() % 1_000_000) + 7];

t.test('model: every sector reads an allowed value after every power cut', async (t) => {
  for (const seed of seeds) {
    t.comment(`seed ${seed}, ${steps} steps (rerun: ARCHIPELAGO_MODEL_SEED=${seed} ARCHIPELAGO_MODEL_STEPS=${steps})`);
    const started = Date.now();
    const res = await runModel({ seed, steps });
    t.comment(`seed ${seed}: ${Date.now() - started} ms, ${JSON.stringify(res.counts)}`);
    t.same(res.failures, [], `seed ${seed}: no failures (ARCHIPELAGO_MODEL_SEED=${seed} reruns it)`);
  }
});

t.test('negative control: a blocker that drops data-object syncs is caught', async (t) => {
  const kinds: Record<string, number> = {};
  let caughtBy = 0;
  const controlSeeds = envSeed !== undefined ? [Number(envSeed), 1, 2, 3] : [1, 2, 3, 4];
  for (const seed of controlSeeds) {
    const res = await runModel({ seed, steps: Math.min(steps, 200), dropDataSync: true });
    for (const [k, n] of Object.entries(res.kinds)) kinds[k] = (kinds[k] ?? 0) + n;
    if (res.failures.length > 0) {
      caughtBy++;
      t.comment(`seed ${seed} caught it: ${res.failures[0]}`);
    }
  }
  t.comment(`failures by kind: ${JSON.stringify(kinds)}`);
  t.ok(caughtBy > 0, 'at least one seed detects the lost syncs');
  t.ok((kinds.mismatch ?? 0) > 0, 'a flushed (or FUA) write was found lost: a sector held a value it may not');
});
