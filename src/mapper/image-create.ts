/**
 * Building a content-addressed image (STYLE.md habit 8: one file per verb, the
 * machine drawn; docs/format.md §4, §8, §12).
 *
 *   create vol.<name> ──▶ put(index, bytes) … ──────────────────────────────▶ finish ──────────────▶ done
 *   IMAGE|READONLY|       all zeros ─▶ nothing (absent)                        last batch of entries,
 *   INCOMPLETE            else sha256 ─▶ stat sha256-<hex>                     then vol.<name> without
 *   * exists                              exists ─▶ dedup                      INCOMPLETE
 *   ▼                                     absent ─▶ replace (atomic, durable)
 *   VolumeExistsError                   entry kind 2 queued; every BATCH objects
 *                                       the entries go out (setContent)
 *
 * The header exists first, flagged INCOMPLETE, so that GC (which reads every
 * header) sweeps no `sha256-` object while the build runs: between our stat
 * that finds an object and the chunk that references it, nothing else does.
 * An interrupted build leaves an INCOMPLETE image, which the daemon refuses to
 * serve and `clone` refuses to clone; `remove` deletes it (its chunks; the
 * content objects it alone used go at the next GC).
 *
 * Content objects are immutable and never owned by any volume: a clone's first
 * write to one copies it up into a data object (compose/volume.ts). They hold
 * the object's bytes exactly (the last object of an image may be shorter).
 *
 * The size may be unknown at the start (a stream): the image then grows
 * (VolumeMap.resize) before each batch and ends at the bytes put.
 */
import { createHash } from 'node:crypto';

import type { Blocker } from '../blockers/blocker.js';
import { isNotFound } from './header-store.js';
import { VolumeFlags } from './header-format.js';
import { UsageError } from './errors.js';
import { CAS_PREFIX } from './names.js';
import { VolumeMap, type ContentUpdate } from './volume-map.js';

/** Entries set per map commit. */
const BATCH = 1024;

export interface ImageOptions {
  /** Bytes, when known up front (0 = grows with what is put). */
  size: number;
  /** Bytes, a power of two from 64 KiB to 64 MiB. */
  objectSize?: number;
}

export interface ImageStats {
  /** Objects put (zero ones included). */
  objects: number;
  /** All-zero objects: left absent, cost nothing. */
  zero: number;
  /** New `sha256-` objects written. */
  stored: number;
  /** Objects whose content was already stored (in the store, or earlier in this build). */
  deduplicated: number;
  /** Bytes put. */
  bytesRead: number;
  /** Bytes of the all-zero objects. */
  bytesZero: number;
  /** Bytes of the new `sha256-` objects. */
  bytesStored: number;
}

/** UsageError when `flags` say the image is still being built (or its build was interrupted). */
export function assertComplete(name: string, flags: number, what: string): void {
  if ((flags & VolumeFlags.INCOMPLETE) !== 0) {
    throw new UsageError(`${what} "${name}": the image is incomplete (an import or hash is running, `
      + 'or was interrupted: remove it and build it again)');
  }
}

/** One image under construction; see the file comment. */
export class ImageBuilder {
  readonly stats: ImageStats = { objects: 0, zero: 0, stored: 0, deduplicated: 0, bytesRead: 0, bytesZero: 0, bytesStored: 0 };
  #pending: ContentUpdate[] = [];
  /** Hashes stored or found during this build (skips the stat for repeats). */
  readonly #known = new Set<string>();
  #done = false;

  private constructor(readonly map: VolumeMap, private readonly data: Blocker) {}

  /** Creates image `name` (header only, INCOMPLETE). InvalidNameError, UsageError, VolumeExistsError. */
  static async begin(maps: Blocker, data: Blocker, name: string, options: ImageOptions): Promise<ImageBuilder> {
    const map = await VolumeMap.create(maps, name, {
      size: options.size, objectSize: options.objectSize,
      flags: VolumeFlags.IMAGE | VolumeFlags.READONLY | VolumeFlags.INCOMPLETE,
    });
    return new ImageBuilder(map, data);
  }

  get objectSize(): number { return this.map.objectSize; }

  /**
   * Puts the bytes of object `index` (objectSize bytes, or fewer for the last
   * object). Objects may come in any order, each once.
   */
  async put(index: number, bytes: Buffer): Promise<void> {
    this.stats.objects++;
    this.stats.bytesRead += bytes.length;
    if (isZero(bytes)) {
      this.stats.zero++;
      this.stats.bytesZero += bytes.length;
      return;
    }
    const hash = createHash('sha256').update(bytes).digest('hex');
    if (this.#known.has(hash) || await this.#exists(CAS_PREFIX + hash)) {
      this.stats.deduplicated++;
    } else {
      // Atomic and durable on completion: a crash leaves the object whole or absent.
      await this.data.replace(CAS_PREFIX + hash, bytes);
      this.stats.stored++;
      this.stats.bytesStored += bytes.length;
    }
    this.#known.add(hash);
    this.#pending.push({ index, hash });
    if (this.#pending.length >= BATCH) await this.#flush();
  }

  /** Counts an object known to read as zeros (absent in a source map) without its bytes. */
  putZero(length: number): void {
    this.stats.objects++;
    this.stats.bytesRead += length;
    this.stats.zero++;
    this.stats.bytesZero += length;
  }

  /** Writes what is queued, then the header without INCOMPLETE, and closes. */
  async finish(): Promise<void> {
    await this.#flush();
    if (this.stats.bytesRead > this.map.size) await this.map.resize(this.stats.bytesRead);
    await this.map.setFlags(VolumeFlags.IMAGE | VolumeFlags.READONLY);
    this.#done = true;
    await this.map.close();
  }

  /** Closes without finishing: the image stays INCOMPLETE (remove it). */
  async abort(): Promise<void> {
    if (this.#done) return;
    await this.map.close().catch(() => undefined);
  }

  async #flush(): Promise<void> {
    const updates = this.#pending;
    this.#pending = [];
    if (updates.length === 0) return;
    const last = Math.max(...updates.map((u) => u.index));
    if (last >= this.map.objectCount) await this.map.resize(Math.max(this.stats.bytesRead, last * this.map.objectSize + 1));
    await this.map.setContent(updates);
  }

  async #exists(name: string): Promise<boolean> {
    try {
      await this.data.stat(name);
      return true;
    } catch (err) {
      if (isNotFound(err)) return false;
      throw err;
    }
  }
}

const ZERO = Buffer.alloc(64 * 1024);

/** True when every byte is 0. */
export function isZero(buf: Buffer): boolean {
  for (let off = 0; off < buf.length; off += ZERO.length) {
    const n = Math.min(ZERO.length, buf.length - off);
    if (!buf.subarray(off, off + n).equals(ZERO.subarray(0, n))) return false;
  }
  return true;
}
