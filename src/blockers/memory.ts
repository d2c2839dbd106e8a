/**
 * The memory blocker — FOR UNIT TESTS ONLY: it holds every object in RAM and
 * loses everything with the process.
 *
 * It models a disk with a volatile write cache, so tests can check what
 * survives a power cut (DESIGN.md §3–4):
 *
 *   write/punch/remove ──▶ current (what reads see) ── sync(names) ──▶ durable
 *   replace ─────────────▶ current and durable at once
 *   powerCut({ keepUnsynced }) ──▶ each dirty object keeps its current state
 *                                  or falls back to its durable one
 *
 * The unit of survival is the object: after a power cut an object holds its
 * last synced content or all of its unsynced changes ('random' picks per
 * object with a seeded PRNG). Unsynced removals can be undone by a power cut,
 * as on a file system. With `durableWrites` (models RADOS) every completed
 * operation is durable and power cuts lose nothing.
 *
 * Faults: `failNext(op, code, name?)` makes the next matching call reject with
 * a BlockerError; `setFaultHook(fn)` runs before every operation and may
 * return a code to fail it, or a promise to delay it (a gate for ordering
 * tests). `calls` counts operations.
 */
import assert from 'node:assert/strict';
import type { Blocker, BlockerCapabilities, ObjectStat } from './blocker.js';
import { BlockerError, checkObjectName, type BlockerErrorCode } from './errors.js';
import { mulberry32 } from '../common/prng.js';

export type MemoryOp = 'read' | 'write' | 'replace' | 'readFull' | 'punch' | 'remove' | 'stat' | 'list' | 'sync';

export type FaultHook = (
  op: MemoryOp,
  name: string,
) => BlockerErrorCode | undefined | void | Promise<BlockerErrorCode | undefined | void>;

export interface MemoryBlockerOptions {
  /** Overrides of the advertised capabilities (e.g. to test fallbacks). */
  capabilities?: Partial<BlockerCapabilities>;
  /** Seed of the PRNG behind powerCut({ keepUnsynced: 'random' }). */
  seed?: number;
}

export interface PowerCutOptions {
  /** What happens to objects with unsynced changes. */
  keepUnsynced: 'none' | 'all' | 'random';
  /** Overrides the blocker's seed for this cut. */
  seed?: number;
}

/** An object's bytes: `data` may be longer than `size` (room to grow). */
interface Bytes {
  data: Buffer;
  size: number;
}

/** The storage, shared by the blockers `reopen` makes (a restart without power loss). */
class MemoryDisk {
  readonly current = new Map<string, Bytes>();
  /** Exact-size copies of the last durable state; absent = not durably there. */
  readonly durable = new Map<string, Buffer>();
  /** Objects whose current state differs from the durable one. */
  readonly dirty = new Set<string>();
  prng: () => number;
  constructor(seed: number) {
    this.prng = mulberry32(seed);
  }
}

export class MemoryBlocker implements Blocker {
  readonly kind = 'memory';
  readonly capabilities: BlockerCapabilities;
  readonly calls: Record<MemoryOp, number> = {
    read: 0, write: 0, replace: 0, readFull: 0, punch: 0, remove: 0, stat: 0, list: 0, sync: 0,
  };

  readonly #disk: MemoryDisk;
  readonly #options: MemoryBlockerOptions;
  #faults: { op: MemoryOp | '*'; code: BlockerErrorCode; name?: string }[] = [];
  #hook: FaultHook | undefined;
  #closed = false;
  #closing: Promise<void> | undefined;

  constructor(options: MemoryBlockerOptions = {}, disk?: MemoryDisk) {
    this.#options = options;
    this.capabilities = { durableWrites: false, sparse: true, punch: true, ...options.capabilities };
    this.#disk = disk ?? new MemoryDisk(options.seed ?? 1);
  }

  /** A new blocker over the same storage (the old one should be closed first). */
  reopen(): MemoryBlocker {
    return new MemoryBlocker(this.#options, this.#disk);
  }

  /** Makes the next call of `op` ('*': any), on `name` if given, reject with `code`. */
  failNext(op: MemoryOp | '*', code: BlockerErrorCode, name?: string): void {
    this.#faults.push({ op, code, name });
  }

  /** Runs before every operation; returns a code to fail it, or a promise to delay it. */
  setFaultHook(hook: FaultHook | undefined): void {
    this.#hook = hook;
  }

  /** Names with unsynced changes, sorted. */
  dirtyNames(): string[] {
    return [...this.#disk.dirty].sort();
  }

  /**
   * Simulates losing power and rebooting: every object with unsynced changes
   * keeps them or falls back to its last durable state, as `keepUnsynced`
   * says; afterwards nothing is dirty and the store holds exactly what
   * survived. Works on a closed blocker too (the disk outlives it).
   */
  powerCut(options: PowerCutOptions): void {
    const disk = this.#disk;
    const prng = options.seed === undefined ? disk.prng : mulberry32(options.seed);
    for (const name of [...disk.dirty].sort()) {
      const keep =
        this.capabilities.durableWrites ||
        options.keepUnsynced === 'all' ||
        (options.keepUnsynced === 'random' && prng() < 0.5);
      if (keep) persist(disk, name);
      else {
        const durable = disk.durable.get(name);
        if (durable) disk.current.set(name, { data: Buffer.from(durable), size: durable.length });
        else disk.current.delete(name);
      }
    }
    disk.dirty.clear();
  }

  async read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    assert(Number.isSafeInteger(offset) && offset >= 0 && Number.isSafeInteger(length) && length >= 0);
    assert(target.length >= length);
    await this.#begin('read', name);
    const obj = this.#get('read', name);
    const n = Math.max(0, Math.min(length, obj.size - offset));
    if (n > 0) obj.data.copy(target, 0, offset, offset + n);
    return n;
  }

  async write(name: string, offset: number, data: Buffer): Promise<void> {
    assert(Number.isSafeInteger(offset) && offset >= 0);
    await this.#begin('write', name);
    let obj = this.#disk.current.get(name);
    if (!obj) {
      obj = { data: Buffer.alloc(0), size: 0 };
      this.#disk.current.set(name, obj);
    }
    const end = offset + data.length;
    if (end > obj.data.length) {
      const grown = Buffer.alloc(Math.max(end, Math.min(obj.data.length * 2, 64 * 1024 * 1024)));
      obj.data.copy(grown, 0, 0, obj.size);
      obj.data = grown;
    }
    data.copy(obj.data, offset);
    obj.size = Math.max(obj.size, end);
    this.#changed(name);
  }

  async replace(name: string, data: Buffer): Promise<void> {
    await this.#begin('replace', name);
    this.#disk.current.set(name, { data: Buffer.from(data), size: data.length });
    this.#disk.durable.set(name, Buffer.from(data));
    this.#disk.dirty.delete(name);
  }

  async readFull(name: string): Promise<Buffer> {
    await this.#begin('readFull', name);
    const obj = this.#get('readFull', name);
    return Buffer.from(obj.data.subarray(0, obj.size));
  }

  /** Zeros the part of the range inside the object; the size never changes. */
  async punch(name: string, offset: number, length: number): Promise<void> {
    assert(Number.isSafeInteger(offset) && offset >= 0 && Number.isSafeInteger(length) && length >= 0);
    await this.#begin('punch', name);
    const obj = this.#get('punch', name);
    const end = Math.min(offset + length, obj.size);
    if (offset >= end) return;
    obj.data.fill(0, offset, end);
    this.#changed(name);
  }

  async remove(name: string): Promise<void> {
    await this.#begin('remove', name);
    if (!this.#disk.current.delete(name)) return;
    this.#changed(name);
  }

  async stat(name: string): Promise<ObjectStat> {
    await this.#begin('stat', name);
    return { size: this.#get('stat', name).size };
  }

  async *list(prefix: string): AsyncIterable<string> {
    await this.#begin('list', prefix, false);
    // a snapshot: the caller may change the store while iterating
    for (const name of [...this.#disk.current.keys()]) if (name.startsWith(prefix)) yield name;
  }

  async sync(names?: Iterable<string>): Promise<void> {
    const list = names === undefined ? undefined : [...names];
    await this.#begin('sync', '', false);
    if (list === undefined) {
      for (const name of this.#disk.dirty) persist(this.#disk, name);
      this.#disk.dirty.clear();
      return;
    }
    for (const name of list) checkObjectName('sync', name);
    for (const name of list) {
      if (this.#disk.dirty.delete(name)) persist(this.#disk, name);
    }
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      await this.sync();
      this.#closed = true;
    })();
    return this.#closing;
  }

  // ------------------------------------------------------------ internals

  /** Validation, closed check, call counting, then injected faults (which may delay). */
  async #begin(op: MemoryOp, name: string, checkName = true): Promise<void> {
    if (checkName) checkObjectName(op, name);
    if (this.#closed) throw new BlockerError('EIO', op, name, 'blocker is closed');
    this.calls[op]++;
    const i = this.#faults.findIndex((f) => (f.op === '*' || f.op === op) && (f.name === undefined || f.name === name));
    if (i >= 0) {
      const [fault] = this.#faults.splice(i, 1);
      throw new BlockerError(fault!.code, op, name, 'injected fault');
    }
    if (this.#hook) {
      const code = await this.#hook(op, name);
      if (code) throw new BlockerError(code, op, name, 'injected fault');
    }
  }

  #get(op: string, name: string): Bytes {
    const obj = this.#disk.current.get(name);
    if (!obj) throw new BlockerError('ENOENT', op, name, 'no such object');
    return obj;
  }

  #changed(name: string): void {
    if (this.capabilities.durableWrites) persist(this.#disk, name);
    else this.#disk.dirty.add(name);
  }
}

/** Copies the current state of `name` (or its absence) to the durable layer. */
function persist(disk: MemoryDisk, name: string): void {
  const obj = disk.current.get(name);
  if (obj) disk.durable.set(name, Buffer.from(obj.data.subarray(0, obj.size)));
  else disk.durable.delete(name);
}

