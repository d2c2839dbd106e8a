/**
 * Volume: one open volume's block I/O, composed from per-object I/O through
 * its map (DESIGN.md §2–3).
 *
 * Each request is split into per-object extents (extents.ts) that run in
 * parallel. Per extent:
 *
 *   read   ─▶ entry absent? ─yes─▶ hole piece
 *                 └─no─▶ read the object (short read → zero fill; missing → EIO)
 *
 *   write  ─▶ owned object? ─yes─▶ write in place (durable at FLUSH/FUA)
 *                 └─no─▶ [exclusive] new object d.<id>.<gen>.<i>:
 *                         absent or whole-object write → write the data
 *                         shared (snapshot/parent)     → read old, overlay, write all
 *                         then setEntries (syncs the new object, then the chunk)
 *
 *   zero/trim ─▶ whole object, no NO_HOLE ─▶ [exclusive] unmap, then delete if owned
 *                 └─ partial (or NO_HOLE) ─▶ write zeros as above (absent: nothing)
 *
 * Ordering rules (DESIGN.md §3): a data object is durable before the map
 * chunk that first points at it (setEntries syncs it), the chunk is durable
 * before the reply; an object is deleted only after the map stopped pointing
 * at it. FLUSH syncs every object written in place since the last FLUSH.
 * A mutation over several objects settles (succeeds or fails) only once
 * each of its extents has ended, so nothing of a failed request lands after
 * the client's next one.
 *
 * After a failed map update the stored entry of that index is in doubt (the
 * chunk write may land late: mapper/volume-map.ts, blockers/timeout.ts).
 * Writing in place there could be acknowledged by a FLUSH while the stored
 * map does not point at the object, so mutations of an unsettled index first
 * settle it (re-commit its entry, under the exclusive gate); until that
 * succeeds they fail, and once the store answers again they go through.
 *
 * Requests arrive validated by the NBD layer: ranges are asserted here.
 */
import assert from 'node:assert/strict';
import type { Blocker } from '../blockers/blocker.js';
import type { VolumeMap } from '../mapper/volume-map.js';
import { ENTRY_ABSENT, type MapEntry } from '../mapper/entry.js';
import { splitRange, type ObjectExtent } from './extents.js';
import { ObjectGates } from './gates.js';
import { ComposeError, composeError } from './errors.js';
import { HOLE_ZERO, type Extent, type ReadPiece, type ZeroOptions } from './types.js';
import { readBuffers } from '../common/buffer-pool.js';

/** Counters for metrics and tests. */
export interface VolumeStats {
  /** Objects created by copying a shared object (copy-on-write). */
  copyUps: number;
  /** Objects newly allocated (absent before). */
  allocations: number;
  /** Objects unmapped by trim/zero. */
  unmaps: number;
}

const ZEROS = Buffer.alloc(1024 * 1024);

export class Volume {
  readonly stats: VolumeStats = { copyUps: 0, allocations: 0, unmaps: 0 };
  private readonly gates = new ObjectGates();
  /** Objects written in place since the last flush began. */
  private dirty = new Set<string>();
  /** Syncs under way, each covering the writes dirty when its flush began. */
  private readonly flushes = new Set<Promise<void>>();
  private closing: Promise<void> | null = null;
  /**
   * Names of this generation's objects that may exist although the map does
   * not point at them (a failed allocation, a failed remove). A name repeats
   * when its index is allocated again in the same generation, so such an
   * object is removed first: writing into it would resurrect stale bytes.
   */
  private readonly strays = new Set<string>();
  /**
   * Quiescing (see quiesce()): while `door` is set, new writes, zeroes and
   * trims wait for it; `mutating` counts those in flight, and `drained`
   * wakes the quiescer when it reaches 0.
   */
  private door: Promise<void> | null = null;
  private mutating = 0;
  private drained: (() => void) | null = null;
  readonly objectSize: number;

  constructor(readonly map: VolumeMap, private readonly data: Blocker, readonly readOnly: boolean) {
    this.objectSize = map.objectSize;
  }

  get name(): string { return this.map.name; }
  get size(): number { return this.map.size; }

  // ------------------------------------------------------------------ read

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    this.assertRange(offset, length);
    const extents = splitRange(offset, length, this.objectSize);
    const pieces = extents.length === 1
      ? [await this.readExtent(offset, extents[0]!)]
      : await Promise.all(extents.map((e) => this.readExtent(offset, e)));
    return mergeHoles(pieces);
  }

  private async readExtent(base: number, e: ObjectExtent): Promise<ReadPiece> {
    const at = base + e.requestOffset;
    await this.gates.acquireShared(e.index);
    try {
      const entry = this.map.lookup(e.index) ?? await this.map.lookupAsync(e.index);
      if (entry === ENTRY_ABSENT) return { offset: at, length: e.length };
      const name = this.map.objectName(entry, e.index);
      // Pooled (common/buffer-pool.ts): the NBD layer gives it back once sent; on failure it is never reused.
      const buf = readBuffers.take(e.length);
      let n: number;
      try {
        n = await this.data.read(name, e.offset, e.length, buf);
      } catch (err) {
        // A mapped object that does not exist is corruption: never serve it as zeros.
        throw composeError(err, `volume ${this.name}: read object ${name} at ${e.offset}`);
      }
      if (n < e.length) buf.fill(0, n);
      return { offset: at, length: e.length, data: buf };
    } finally {
      this.gates.releaseShared(e.index);
    }
  }

  // ----------------------------------------------------------------- write

  async write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    this.assertWritable(offset, data.length);
    if (this.door !== null) await this.waitAtDoor();
    this.mutating++;
    try {
      if (!this.map.writable) await this.beginWrites();
      const extents = splitRange(offset, data.length, this.objectSize);
      const names = await allExtents(extents.map((e) => this.writeExtent(e, data.subarray(e.requestOffset, e.requestOffset + e.length))));
      if (fua) await this.syncNames(names.filter((n): n is string => n !== null));
    } finally {
      this.mutationDone();
    }
  }

  /**
   * Writes one extent; resolves with the name of the object written in place
   * (to sync for FUA), or null when a new object was made durable with its map.
   */
  private async writeExtent(e: ObjectExtent, data: Buffer): Promise<string | null> {
    await this.acquireSettled(e.index);
    let entry: MapEntry;
    try {
      entry = this.map.lookup(e.index) ?? await this.map.lookupAsync(e.index);
      if (this.map.isOwned(entry)) {
        const name = this.map.objectName(entry, e.index);
        await this.writeInPlace(name, e.offset, data);
        return name;
      }
    } finally {
      this.gates.releaseShared(e.index);
    }
    return this.remap(e, data);
  }

  /**
   * Takes the shared gate of `index` for a mutation, with its stored map
   * entry not in doubt: settles it first (exclusively) if a failed commit
   * left it unsettled. Re-checks under the gate, as another failure may
   * have come in between.
   */
  private async acquireSettled(index: number): Promise<void> {
    for (;;) {
      if (!this.map.isSettled(index)) {
        await this.gates.acquireExclusive(index);
        try {
          await this.settle(index);
        } finally {
          this.gates.releaseExclusive(index);
        }
      }
      await this.gates.acquireShared(index);
      if (this.map.isSettled(index)) return;
      this.gates.releaseShared(index);
    }
  }

  /** map.settle under the caller's exclusive gate, with the volume and index in the error. */
  private async settle(index: number): Promise<void> {
    try {
      await this.map.settle(index);
    } catch (err) {
      throw composeError(err, `volume ${this.name}: re-persist the map entry of object ${index} after a failed update`);
    }
  }

  /** The first change opens the map for writing (bumps its generation). */
  private async beginWrites(): Promise<void> {
    try {
      await this.map.beginWrites();
    } catch (err) {
      throw composeError(err, `volume ${this.name}: open for writing`);
    }
  }

  private async writeInPlace(name: string, offset: number, data: Buffer): Promise<void> {
    try {
      await this.data.write(name, offset, data);
    } catch (err) {
      throw composeError(err, `volume ${this.name}: write object ${name} at ${offset}`);
    }
    this.dirty.add(name);
  }

  /**
   * Gives object `e.index` a new object of this volume holding `data` at
   * `e.offset` (data null = zeros), under the exclusive gate. Re-checks the
   * entry: another request may have remapped it while we waited.
   */
  private async remap(e: ObjectExtent, data: Buffer | null): Promise<string | null> {
    await this.gates.acquireExclusive(e.index);
    try {
      // Before writing in place or removing a stray the stored map may still name.
      await this.settle(e.index);
      const entry = this.map.lookup(e.index) ?? await this.map.lookupAsync(e.index);
      if (this.map.isOwned(entry)) {
        const name = this.map.objectName(entry, e.index);
        await this.writeInPlace(name, e.offset, data ?? zeros(e.length));
        return name;
      }
      const target = this.map.newObjectName(e.index);
      try {
        if (this.strays.has(target)) {
          await this.data.remove(target);
          this.strays.delete(target);
        }
        if (entry === ENTRY_ABSENT || e.whole) {
          // Sparse objects: bytes around the extent read as zeros.
          await this.data.write(target, e.offset, data ?? zeros(e.length));
          if (entry === ENTRY_ABSENT) this.stats.allocations++;
          else this.stats.copyUps++;
        } else {
          await this.copyUp(entry, e, target, data);
          this.stats.copyUps++;
        }
        // setEntries syncs `target` before the chunk that names it is written.
        await this.map.setEntries([{ index: e.index, entry: this.map.newEntry() }]);
      } catch (err) {
        this.strays.add(target);
        throw composeError(err, `volume ${this.name}: allocate object ${target}`);
      }
      return null;
    } finally {
      this.gates.releaseExclusive(e.index);
    }
  }

  /** Copies a shared object into `target` with the extent's bytes overlaid. */
  private async copyUp(entry: MapEntry, e: ObjectExtent, target: string, data: Buffer | null): Promise<void> {
    const source = this.map.objectName(entry, e.index);
    const object = Buffer.alloc(this.objectSize);
    const n = await this.data.read(source, 0, this.objectSize, object);
    if (data) data.copy(object, e.offset);
    else object.fill(0, e.offset, e.offset + e.length);
    // Write only what exists (or the overlay's end): keeps objects sparse at their tail.
    const end = Math.max(n, e.offset + e.length);
    await this.data.write(target, 0, object.subarray(0, end));
  }

  // ------------------------------------------------------------ zero, trim

  async zero(offset: number, length: number, o: ZeroOptions): Promise<void> {
    this.assertWritable(offset, length);
    if (this.door !== null) await this.waitAtDoor();
    this.mutating++;
    try {
      if (!this.map.writable) await this.beginWrites();
      const extents = splitRange(offset, length, this.objectSize);
      if (o.fastZero && !(await this.canZeroFast(extents, o.noHole))) {
        throw new ComposeError('ENOTSUP', `volume ${this.name}: zeroing ${length} bytes at ${offset} needs writes`);
      }
      const names = await allExtents(extents.map((e) => this.zeroExtent(e, o.noHole)));
      if (o.fua) await this.syncNames(names.filter((n): n is string => n !== null));
    } finally {
      this.mutationDone();
    }
  }

  /** TRIM reads back as zeros here: same as WRITE_ZEROES without NO_HOLE. */
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.zero(offset, length, { fua, noHole: false, fastZero: false });
  }

  /** Zeroing is fast when it only unmaps objects or touches absent ones. */
  private async canZeroFast(extents: ObjectExtent[], noHole: boolean): Promise<boolean> {
    if (noHole) return false;
    for (const e of extents) {
      if (e.whole) continue;
      const entry = this.map.lookup(e.index) ?? await this.map.lookupAsync(e.index);
      if (entry !== ENTRY_ABSENT) return false;
    }
    return true;
  }

  private async zeroExtent(e: ObjectExtent, noHole: boolean): Promise<string | null> {
    if (e.whole && !noHole) {
      await this.unmap(e.index);
      return null;
    }
    await this.acquireSettled(e.index);
    let entry: MapEntry;
    try {
      entry = this.map.lookup(e.index) ?? await this.map.lookupAsync(e.index);
      if (entry === ENTRY_ABSENT && !noHole) return null;
      if (this.map.isOwned(entry)) {
        const name = this.map.objectName(entry, e.index);
        await this.writeZeros(name, e.offset, e.length);
        return name;
      }
    } finally {
      this.gates.releaseShared(e.index);
    }
    return this.remap(e, null);
  }

  private async writeZeros(name: string, offset: number, length: number): Promise<void> {
    for (let done = 0; done < length;) {
      const n = Math.min(ZEROS.length, length - done);
      await this.writeInPlace(name, offset + done, ZEROS.subarray(0, n));
      done += n;
    }
  }

  /** Drops object `index` from the map, then deletes it if this volume owned it. */
  private async unmap(index: number): Promise<void> {
    await this.gates.acquireExclusive(index);
    try {
      // Absent in memory is not enough: after a failed allocation the stored
      // map may name the new object (its chunk write landing late), and a
      // FLUSH would then acknowledge this zeroing while a power cut brings
      // back the failed write's data. Settling re-commits "absent" first.
      await this.settle(index);
      const entry = this.map.lookup(index) ?? await this.map.lookupAsync(index);
      if (entry === ENTRY_ABSENT) return;
      const owned = this.map.isOwned(entry);
      const name = this.map.objectName(entry, index);
      try {
        await this.map.setEntries([{ index, entry: ENTRY_ABSENT }]);
      } catch (err) {
        throw composeError(err, `volume ${this.name}: unmap object ${index}`);
      }
      this.stats.unmaps++;
      if (owned) {
        this.dirty.delete(name);
        // The map no longer points here; a failure leaves an orphan for GC
        // (removed again before its name is reused: see `strays`).
        await this.data.remove(name).catch(() => { this.strays.add(name); });
      }
    } finally {
      this.gates.releaseExclusive(index);
    }
  }

  // --------------------------------------------------------------- quiesce

  /**
   * Runs `fn` with the volume quiesced: new writes, zeroes and trims wait at
   * the door (reads, block status and flushes go on), the ones in flight
   * drain, a flush makes them durable, then `fn` runs with nothing changing
   * the volume. The waiters are let in when `fn` settles, whether it resolved
   * or threw (and also when the drain's flush fails: `fn` is not run then).
   * Concurrent quiesce calls run one after the other. Used for snapshots
   * (mapper/snapshot-create.ts: no request in flight, flushed).
   */
  async quiesce<T>(fn: () => Promise<T>): Promise<T> {
    while (this.door !== null) await this.door;
    let open!: () => void;
    this.door = new Promise<void>((resolve) => { open = resolve; });
    try {
      if (this.mutating > 0) await new Promise<void>((resolve) => { this.drained = resolve; });
      await this.flush();
      return await fn();
    } finally {
      this.drained = null;
      this.door = null;
      open();
    }
  }

  /** True while a quiesce() holds the door (for status and tests). */
  get quiescing(): boolean { return this.door !== null; }

  /** Mutations (write, zero, trim) in flight now. */
  get mutationsInFlight(): number { return this.mutating; }

  /** Waits until no quiesce() holds the door (another may follow the first). */
  private async waitAtDoor(): Promise<void> {
    while (this.door !== null) await this.door;
  }

  private mutationDone(): void {
    if (--this.mutating === 0 && this.drained !== null) {
      const wake = this.drained;
      this.drained = null;
      wake();
    }
  }

  // ---------------------------------------------------- status, flush, close

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.assertRange(offset, length);
    const out: Extent[] = [];
    for (const e of splitRange(offset, length, this.objectSize)) {
      const entry = this.map.lookup(e.index) ?? await this.map.lookupAsync(e.index);
      const flags = entry === ENTRY_ABSENT ? HOLE_ZERO : 0;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += e.length;
      else out.push({ length: e.length, flags });
    }
    return out;
  }

  /** A hint: load the map chunks the range needs. */
  async cache(offset: number, length: number): Promise<void> {
    this.assertRange(offset, length);
    const first = Math.floor(offset / this.objectSize);
    const last = Math.floor((offset + length - 1) / this.objectSize);
    for (let i = first; i <= last; i += 4096) await this.map.lookupAsync(i);
  }

  /**
   * Makes durable every write completed before this call. A flush that finds
   * nothing dirty still waits for flushes already running: the writes it
   * covers may be in their sync (multi-conn: another connection's FLUSH).
   */
  async flush(): Promise<void> {
    const names = this.dirty;
    this.dirty = new Set();
    const mine = names.size ? this.syncDirty(names) : null;
    if (mine) this.flushes.add(mine);
    try {
      await Promise.all([...this.flushes]);
    } finally {
      if (mine) this.flushes.delete(mine);
    }
  }

  private async syncDirty(names: Set<string>): Promise<void> {
    try {
      await this.data.sync(names);
    } catch (err) {
      // Not durable: keep them dirty so a later flush retries.
      for (const n of names) this.dirty.add(n);
      throw composeError(err, `volume ${this.name}: flush`);
    }
  }

  private async syncNames(names: string[]): Promise<void> {
    if (names.length === 0) return;
    try {
      await this.data.sync(names);
    } catch (err) {
      throw composeError(err, `volume ${this.name}: sync for FUA`);
    }
  }

  /** Flushes and closes the map. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      try {
        await this.flush();
      } finally {
        await this.map.close();
      }
    })();
    return this.closing;
  }

  private assertRange(offset: number, length: number): void {
    assert.ok(offset >= 0 && length >= 0 && offset + length <= this.size, `volume ${this.name}: range ${offset}+${length} outside ${this.size}`);
  }

  private assertWritable(offset: number, length: number): void {
    assert.ok(!this.readOnly, `volume ${this.name}: write to a read-only volume`);
    this.assertRange(offset, length);
  }
}

/**
 * Waits for every extent of a mutation, then rethrows the first failure.
 * Not Promise.all: it rejects at the first failure while the request's other
 * extents still run, so the client, told the request failed, could send the
 * next one to the same range and be overtaken by such a leftover: a failed
 * write's data landing after a later acknowledged trim (found by the model
 * test, test/unit/blockers/faulty-compose.test.ts, seed 882000108).
 */
async function allExtents<T>(work: Promise<T>[]): Promise<T[]> {
  if (work.length === 1) return [await work[0]!];
  const results = await Promise.allSettled(work);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}

function zeros(length: number): Buffer {
  return length <= ZEROS.length ? ZEROS.subarray(0, length) : Buffer.alloc(length);
}

function mergeHoles(pieces: ReadPiece[]): ReadPiece[] {
  if (pieces.length < 2) return pieces;
  const out: ReadPiece[] = [];
  for (const p of pieces) {
    const last = out[out.length - 1];
    if (last && !last.data && !p.data) last.length += p.length;
    else out.push(p.data ? p : { offset: p.offset, length: p.length });
  }
  return out;
}
