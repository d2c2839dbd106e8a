/**
 * The model-based test of snapshots, clones, removal and GC
 * (docs/format.md §5–8, §12), through compose Volumes, on any object store:
 * test/unit/mapper/model.test.ts runs it on the memory blocker (with power
 * cuts), test/integration/rados-model.test.ts on a real Ceph cluster.
 *
 * A seeded random sequence of steps over a few small volumes (16 × 64 KiB
 * objects): write / trim / write-zeroes (some NO_HOLE, some FUA) on writable
 * volumes; snapshot (inside Volume.quiesce); hash of a random snapshot into a
 * content-addressed image (ImageBuilder, as the `hash` CLI, reading the
 * snapshot through a read-only Volume; the image's model is the snapshot's);
 * clone of a random snapshot or image;
 * remove of a random volume, snapshot or clone (its Volume closed first; a
 * snapshot with clones may go: the clones keep reading their data); GC;
 * restart (close every Volume and the blocker, reopen on the same storage,
 * half the writable volumes read-only as the daemon does, upgraded by the
 * first write); crash after flushing every Volume: the Volumes are abandoned
 * and the storage loses what it may lose (the memory blocker cuts power, so
 * nothing acknowledged is unsynced and the model stays exact: the cut only
 * drops unsynced removals, which leaves orphans for GC; RADOS loses nothing).
 *
 * The reference model is name → full contents. After every step every live
 * name reads back exactly its model (writable volumes through their open
 * Volume, snapshots through a fresh read-only map). After every GC, checked
 * independently of gc.ts from the headers and maps: every object a header
 * reaches (chunk or data object) exists, and every `m.`/`d.` object left is
 * reached by some header or is of its writer's current generation (which GC
 * must keep: a writer may be about to map it); every `sha256-` object an
 * image maps exists, and an unreferenced one is left only when GC said why.
 *
 * Seeds: ARCHIPELAGO_MODEL_SEED runs one seed; otherwise a fixed set plus one
 * fresh seed, printed. ARCHIPELAGO_MODEL_STEPS sets the steps per seed.
 */
import type { Test } from 'tap';
import type { Blocker } from '../../src/blockers/blocker.js';
import { Volume } from '../../src/compose/volume.js';
import type { ReadPiece } from '../../src/compose/types.js';
import { mulberry32 } from '../../src/common/prng.js';
import { collectGarbage } from '../../src/mapper/gc.js';
import { VolumeFlags } from '../../src/mapper/header-format.js';
import { readHeader } from '../../src/mapper/header-store.js';
import { chunkObjectName, parseChunkObjectName, parseDataObjectName } from '../../src/mapper/names.js';
import { ENTRY_ABSENT } from '../../src/mapper/entry.js';
import { ImageBuilder } from '../../src/mapper/image-create.js';
import { listHeaderNames } from '../../src/mapper/volume-list.js';
import {
  VolumeMap, cloneSnapshot, createSnapshot, listVolumes, removeVolume,
} from '../../src/mapper/volume-map.js';

const OBJ = 64 * 1024;
const OBJECTS = 16;
const SIZE = OBJ * OBJECTS;
const MAX_NAMES = 8;

/** What the model runs on: a blocker, and how to restart and crash over the same objects. */
export interface ModelStorage {
  readonly blocker: Blocker;
  /** Closes the current blocker and opens a new one over the same objects. */
  reopen(): Promise<void>;
  /**
   * Loses what the store may lose when the node dies now (every Volume was
   * flushed and is abandoned); the current blocker is then closed and a new
   * one opened, as by `reopen`. Resolves with a description for the log.
   */
  crash(abandon: () => Promise<void>): Promise<string>;
  /** Empties the store (between seeds). */
  destroy(): Promise<void>;
}

/** Seeds: ARCHIPELAGO_MODEL_SEED, else the fixed ones plus a fresh one. */
export function modelSeeds(fixed: number[]): number[] {
  return process.env.ARCHIPELAGO_MODEL_SEED !== undefined
    ? [Number(process.env.ARCHIPELAGO_MODEL_SEED)]
    : [...fixed, (Date.now() ^ (process.pid << 8)) >>> 0];
}

/** Steps per seed: ARCHIPELAGO_MODEL_STEPS, else `fallback`. */
export function modelSteps(fallback: number): number {
  return Number(process.env.ARCHIPELAGO_MODEL_STEPS ?? fallback);
}

/** The bytes of a read of `length` bytes at `base` (piece offsets are absolute). */
function assemble(length: number, pieces: ReadPiece[], base = 0): Buffer {
  const out = Buffer.alloc(length);
  for (const p of pieces) if (p.data) p.data.copy(out, p.offset - base, 0, p.length);
  return out;
}

class Model {
  readonly rand: () => number;
  /** Name → the bytes it must read. */
  readonly contents = new Map<string, Buffer>();
  readonly snapshots = new Set<string>();
  /** Content-addressed images built from snapshots (read-only, never opened for writing). */
  readonly images = new Set<string>();
  /** Open Volumes of the writable names. */
  readonly open = new Map<string, Volume>();
  readonly counts: Record<string, number> = {};
  #serial = 0;

  constructor(readonly seed: number, readonly storage: ModelStorage) {
    this.rand = mulberry32(seed);
  }

  get blocker(): Blocker {
    return this.storage.blocker;
  }

  int(n: number): number { return Math.floor(this.rand() * n); }
  pick<T>(items: readonly T[]): T | undefined { return items.length === 0 ? undefined : items[this.int(items.length)]; }
  newName(prefix: string): string { return `${prefix}${this.#serial++}`; }

  async openVolume(name: string): Promise<void> {
    const forWrite = this.rand() < 0.5;
    const map = await VolumeMap.open(this.blocker, name, { forWrite });
    this.open.set(name, new Volume(map, this.blocker, false));
  }

  async create(): Promise<void> {
    const name = this.newName('v');
    const map = await VolumeMap.create(this.blocker, name, { size: SIZE, objectSize: OBJ });
    this.open.set(name, new Volume(map, this.blocker, false));
    this.contents.set(name, Buffer.alloc(SIZE));
  }

  range(): [number, number] {
    if (this.rand() < 0.25) {
      const first = this.int(OBJECTS);
      const n = 1 + this.int(Math.min(3, OBJECTS - first));
      return [first * OBJ, n * OBJ];
    }
    const offset = this.int(SIZE - 1);
    const length = 1 + this.int(Math.min(SIZE - offset, 2 * OBJ + 100));
    return [offset, length];
  }

  async mutate(name: string): Promise<string> {
    const vol = this.open.get(name)!;
    const model = this.contents.get(name)!;
    const [offset, length] = this.range();
    const r = this.rand();
    const fua = this.rand() < 0.2;
    if (r < 0.6) {
      const data = Buffer.alloc(length);
      const base = this.int(251) + 1;
      for (let i = 0; i < length; i++) data[i] = (base + i * 7 + (i >>> 9)) & 0xff;
      await vol.write(offset, data, fua);
      data.copy(model, offset);
      return `write ${name} ${offset}+${length}`;
    }
    if (r < 0.8) await vol.trim(offset, length, fua);
    else await vol.zero(offset, length, { fua, noHole: this.rand() < 0.5, fastZero: false });
    model.fill(0, offset, offset + length);
    return `${r < 0.8 ? 'trim' : 'zero'} ${name} ${offset}+${length}`;
  }

  async snapshot(name: string): Promise<string> {
    const vol = this.open.get(name)!;
    const snap = this.newName('s');
    await vol.quiesce(async () => {
      if (!vol.map.writable) await vol.map.beginWrites();
      await createSnapshot(this.blocker, vol.map, snap);
    });
    this.contents.set(snap, Buffer.from(this.contents.get(name)!));
    this.snapshots.add(snap);
    return `snapshot ${name} as ${snap}`;
  }

  async clone(snap: string): Promise<string> {
    const name = this.newName('c');
    await cloneSnapshot(this.blocker, snap, name);
    this.contents.set(name, Buffer.from(this.contents.get(snap)!));
    await this.openVolume(name);
    return `clone ${snap} as ${name}`;
  }

  /** Builds a content-addressed image of `snap` as the `hash` CLI does, reading through a read-only Volume. */
  async hash(snap: string): Promise<string> {
    const name = this.newName('i');
    const map = await VolumeMap.open(this.blocker, snap, { forWrite: false });
    const source = new Volume(map, this.blocker, true);
    let stats;
    try {
      const builder = await ImageBuilder.begin(this.blocker, this.blocker, name, { size: SIZE, objectSize: OBJ });
      try {
        for (let index = 0; index < OBJECTS; index++) {
          await builder.put(index, assemble(OBJ, await source.read(index * OBJ, OBJ), index * OBJ));
        }
        await builder.finish();
      } catch (err) {
        await builder.abort();
        throw err;
      }
      stats = builder.stats;
    } finally {
      await source.close();
    }
    this.contents.set(name, Buffer.from(this.contents.get(snap)!));
    this.images.add(name);
    return `hash ${snap} as ${name} (${stats.stored} stored, ${stats.deduplicated} dedup, ${stats.zero} zero)`;
  }

  async remove(name: string): Promise<string> {
    const vol = this.open.get(name);
    if (vol) {
      await vol.close();
      this.open.delete(name);
    }
    const r = await removeVolume(this.blocker, name);
    this.contents.delete(name);
    this.snapshots.delete(name);
    this.images.delete(name);
    return `remove ${name} (${r.removedObjects} objects deleted${r.objectsKeptBecause ? `; kept: ${r.objectsKeptBecause}` : ''})`;
  }

  async closeAll(): Promise<void> {
    for (const vol of this.open.values()) await vol.close();
    this.open.clear();
  }

  async reopenAll(): Promise<void> {
    for (const name of [...this.contents.keys()].sort()) if (!this.snapshots.has(name) && !this.images.has(name)) await this.openVolume(name);
  }

  async restart(): Promise<string> {
    await this.closeAll();
    await this.storage.reopen();
    await this.reopenAll();
    return 'restart';
  }

  async crash(): Promise<string> {
    for (const vol of this.open.values()) await vol.flush();
    const what = await this.storage.crash(() => this.closeAll());
    await this.reopenAll();
    return what;
  }

  /** Every live name reads exactly its model; the store lists exactly the live names. */
  async check(t: Test, step: string): Promise<boolean> {
    const listed = await listVolumes(this.blocker);
    const expected = [...this.contents.keys()].sort();
    if (JSON.stringify(listed) !== JSON.stringify(expected)) {
      t.same(listed, expected, `${step}: volumes listed`);
      return false;
    }
    for (const [name, model] of this.contents) {
      let vol = this.open.get(name);
      let temporary = false;
      if (vol === undefined) {
        const map = await VolumeMap.open(this.blocker, name, { forWrite: false });
        vol = new Volume(map, this.blocker, true);
        temporary = true;
      }
      try {
        const got = assemble(SIZE, await vol.read(0, SIZE));
        if (!got.equals(model)) {
          let at = 0;
          while (got[at] === model[at]) at++;
          t.fail(`${step}: ${name} differs from its model at byte ${at} (object ${Math.floor(at / OBJ)})`);
          return false;
        }
      } finally {
        if (temporary) await vol.close();
      }
    }
    return true;
  }

  /**
   * After GC, from the headers and maps (not from gc.ts): every reachable
   * object exists, and every object left is reachable or of its writer's
   * current generation.
   */
  async checkGc(t: Test, step: string, contentKeptBecause: string | null): Promise<boolean> {
    const b = this.blocker;
    const reached = new Set<string>();
    const writerGeneration = new Map<string, number>();
    for (const name of await listHeaderNames(b)) {
      const h = await readHeader(b, name);
      if ((h.flags & VolumeFlags.SNAPSHOT) === 0) writerGeneration.set(h.volumeId, h.generation);
      for (const ref of h.chunkRefs) reached.add(chunkObjectName(h.sources[ref.source]!, ref.generation, ref.chunkIndex));
      const map = await VolumeMap.open(b, name, { forWrite: false });
      try {
        for (let i = 0; i < map.objectCount; i++) {
          const e = await map.lookupAsync(i);
          if (e !== ENTRY_ABSENT) reached.add(map.objectName(e, i));
        }
      } finally {
        await map.close();
      }
    }
    const missing: string[] = [];
    for (const name of reached) if (await b.stat(name).then(() => false, () => true)) missing.push(name);
    const garbage: string[] = [];
    for (const prefix of ['m.', 'd.', 'sha256-']) {
      for await (const name of b.list(prefix)) {
        if (reached.has(name)) continue;
        if (prefix === 'sha256-') {
          // Unreferenced content objects go only in a quiet run (no image being built).
          if (contentKeptBecause === null) garbage.push(name);
          continue;
        }
        const parts = prefix === 'm.' ? parseChunkObjectName(name) : parseDataObjectName(name);
        if (parts !== null && writerGeneration.get(parts.volumeId) === parts.generation) continue;
        garbage.push(name);
      }
    }
    if (missing.length > 0) t.fail(`${step}: referenced objects missing after GC: ${missing.join(', ')}`);
    if (garbage.length > 0) t.fail(`${step}: unreferenced objects left by GC: ${garbage.join(', ')}`);
    return missing.length === 0 && garbage.length === 0;
  }

  async step(t: Test, n: number): Promise<string> {
    const writable = [...this.open.keys()];
    const snaps = [...this.snapshots];
    const images = [...this.images];
    const names = [...this.contents.keys()];
    const r = this.rand();
    const count = (what: string): void => { this.counts[what] = (this.counts[what] ?? 0) + 1; };
    if (writable.length === 0 || (r < 0.03 && names.length < MAX_NAMES)) {
      count('create');
      await this.create();
      return `create v${this.#serial - 1}`;
    }
    if (r < 0.6) { count('mutate'); return this.mutate(this.pick(writable)!); }
    if (r < 0.68 && names.length < MAX_NAMES) { count('snapshot'); return this.snapshot(this.pick(writable)!); }
    if (r < 0.74 && names.length < MAX_NAMES && snaps.length + images.length > 0) {
      const source = this.pick([...snaps, ...images])!;
      count(this.images.has(source) ? 'cloneImage' : 'clone');
      return this.clone(source);
    }
    if (r < 0.78 && names.length < MAX_NAMES && snaps.length > 0) { count('hash'); return this.hash(this.pick(snaps)!); }
    if (r < 0.84 || names.length >= MAX_NAMES) { count('remove'); return this.remove(this.pick(names)!); }
    if (r < 0.91) {
      count('gc');
      const res = await collectGarbage(this.blocker, { dryRun: false });
      if (res.errors.length > 0) t.fail(`step ${n}: gc errors ${res.errors.join('; ')}`);
      if (!(await this.checkGc(t, `step ${n} gc`, res.contentKeptBecause))) throw new Error('gc check failed');
      return `gc (${res.sweptObjects} swept, ${res.keptYoung} young)`;
    }
    if (r < 0.955) { count('restart'); return this.restart(); }
    count('crash');
    return this.crash();
  }
}

/**
 * Runs the model for each seed on storage from `makeStorage` (fresh and
 * empty per seed), as subtests of `t`.
 */
export async function runMapModel(
  t: Test,
  seeds: number[],
  steps: number,
  makeStorage: (seed: number) => Promise<ModelStorage>,
): Promise<void> {
  for (const seed of seeds) {
    await t.test(`seed ${seed}, ${steps} steps`, async (t) => {
      t.comment(`model seed ${seed} (rerun: ARCHIPELAGO_MODEL_SEED=${seed} ARCHIPELAGO_MODEL_STEPS=${steps})`);
      const storage = await makeStorage(seed);
      t.teardown(() => storage.destroy());
      const m = new Model(seed, storage);
      await m.create();
      await m.create();
      const log: string[] = [];
      let ok = true;
      for (let n = 0; n < steps && ok; n++) {
        let what: string;
        try {
          what = await m.step(t, n);
        } catch (err) {
          t.fail(`step ${n} threw: ${(err as Error).stack ?? String(err)}`);
          ok = false;
          break;
        }
        log.push(`${n}: ${what}`);
        ok = await m.check(t, `step ${n} (${what})`);
      }
      if (!ok) t.comment(`last steps:\n${log.slice(-15).join('\n')}`);
      // Finally: a GC after closing everything leaves only what the live names reach.
      if (ok) {
        await m.closeAll();
        const res = await collectGarbage(m.blocker, { dryRun: false });
        ok = await m.checkGc(t, 'final gc', res.contentKeptBecause) && await m.check(t, 'final');
      }
      t.ok(ok, `model held for ${steps} steps: ${JSON.stringify(m.counts)}`);
    });
  }
}
