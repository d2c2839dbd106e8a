/**
 * VolumeMap: the in-memory map of one open volume, persisted on a Blocker in
 * format v1 (docs/format.md).
 *
 *   header vol.<name> ──chunk refs──▶ m.<id>.<gen>.<c> ──entries──▶ d.<id>.<gen>.<i>
 *   (always in memory)               (loaded lazily, small cache)   (the data; compose's job)
 *
 * Reads: `lookup(i)` answers synchronously when chunk ⌊i/4096⌋ is loaded or does
 * not exist; otherwise `lookupAsync`/`ensureChunk` load it. Concurrent loads of
 * one chunk share one read. Loaded chunks stay cached (LRU, `cacheChunks`);
 * a chunk with updates queued or in flight is never evicted. A read-only map
 * works from the header it read at open and does not follow a writer elsewhere
 * (chunks it has not loaded yet may be newer than that header, which is
 * allowed); the lock layer reopens maps at a handover (DESIGN.md §4).
 *
 * Writes: `setEntries` groups its updates by chunk. Per chunk, one commit runs
 * at a time; updates arriving meanwhile wait and go out together in the next
 * commit (group commit). Different chunks commit in parallel. One commit:
 *
 *   load chunk ──▶ sync data objects ──▶ write chunk ─┬─ owned ───────────────▶ done
 *   (if needed)    it will name          (replace)     └─ new or shared ──▶ write header ──▶ done
 *                  (one sync per batch)                   (new name)         (group commit)
 *
 * An owned chunk (ref of our own source with generation ≥ writableSince) is
 * replaced in place; a shared one (older than writableSince: a snapshot holds
 * it) or a missing one is written under m.<id>.<currentGen>.<c> and the header
 * is rewritten to point at it, leaving the shared chunk untouched. Each write
 * is atomic, and each is issued only after what it points at is durable, so a
 * crash leaves the old mapping or the new one (docs/format.md §5).
 *
 * A failed commit leaves storage in doubt: a chunk or header write that
 * rejected (an error after the rename, a timeout whose write lands later:
 * blockers/timeout.ts) may hold the old state or the attempted one, while
 * memory keeps the old entries (or, when only the header failed, the new
 * ones). So:
 *   - the indexes of a batch whose chunk or header write was attempted and
 *     failed are "unsettled" until a later commit of their chunk succeeds
 *     (it rewrites the whole chunk from memory, behind the late write:
 *     the timeout layer fences the object). The composer must not write in
 *     place into an unsettled index — a FLUSH would then promise data that
 *     the stored map may not reach — so it calls `settle(index)` first.
 *   - after a failed header write the stored header may not reach every
 *     chunk in memory ("header behind"): every commit then rewrites the
 *     header too, in-place ones included, until one header write succeeds.
 *
 * Validation happens at the edges (nbd, CLI): indexes and entries handed to this
 * class are asserted, not re-checked (STYLE.md habit 4).
 *
 * Imports the blocker contract and the mapper's own modules; nothing above.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';

import type { Blocker } from '../blockers/blocker.js';
import { CHUNK_ENTRIES, decodeChunkTable, encodeChunk } from './chunk-format.js';
import {
  ENTRY_ABSENT, EntryKind, checkEntryWords, entryGeneration, entryHashIndex, entryHigh, entryKind, entryLow,
  entrySource, makeContentEntry, makeEntry, type MapEntry,
} from './entry.js';
import { MapFormatError, UsageError, VolumeExistsError, VolumeNotFoundError } from './errors.js';
import { GroupCommit } from './group-commit.js';
import {
  DEFAULT_OBJECT_SIZE_LOG2, MAX_GENERATION, MAX_OBJECT_SIZE_LOG2, MAX_VOLUME_SIZE,
  MIN_OBJECT_SIZE_LOG2, VolumeFlags, encodeHeader, objectCountOf,
  type ChunkRef, type ParentInfo, type VolumeHeader,
} from './header-format.js';
import { isNotFound, loadLiveHeader } from './header-store.js';
import { CAS_PREFIX, chunkObjectName, dataObjectName, headerObjectName, validateVolumeName } from './names.js';

export { listVolumes } from './volume-list.js';
export { removeVolume, type RemoveResult } from './volume-remove.js';
export { renameVolume } from './volume-rename.js';
export { createSnapshot, snapshotVolume, type SnapshotResult } from './snapshot-create.js';
export { cloneSnapshot, type CloneOptions, type CloneResult } from './clone-create.js';

export const DEFAULT_OBJECT_SIZE = 2 ** DEFAULT_OBJECT_SIZE_LOG2;
/** Loaded chunks kept per open volume: 64 × 32 KiB = 2 MiB of RAM, 256 GiB of volume at 4 MiB objects. */
export const DEFAULT_CACHE_CHUNKS = 64;

export interface CreateOptions {
  /** Bytes, 0 .. 2^53 − 1. */
  size: number;
  /** Bytes, a power of two from 64 KiB to 64 MiB; default 4 MiB. */
  objectSize?: number;
  cacheChunks?: number;
  /** Header flags (VolumeFlags) of the new volume; default 0. image-create.ts builds READONLY images so. */
  flags?: number;
}

export interface OpenOptions {
  /** Bump and persist the generation, allow setEntries/resize. */
  forWrite: boolean;
  cacheChunks?: number;
}

export interface EntryUpdate {
  /** Object index, < objectCount. */
  index: number;
  /** The new entry (ENTRY_ABSENT to unmap). */
  entry: MapEntry;
}

/** A content-addressed object for object `index`: `sha256-<hash>`. */
export interface ContentUpdate {
  index: number;
  /** SHA-256 of the object's bytes, 64 lowercase hex digits. */
  hash: string;
}

const HASH_HEX = /^[0-9a-f]{64}$/;

export interface SetEntriesOptions {
  /**
   * The caller has already made the data objects durable (e.g. after its own
   * sync). Otherwise setEntries syncs the owned objects its entries name, in one
   * call per chunk commit, before the chunk that names them is written.
   */
  dataSynced?: boolean;
}

/** Counters for metrics and tests. */
export interface VolumeMapStats {
  /** Lookups answered from memory: the chunk loaded, or never written (no chunk). */
  cacheHits: number;
  /**
   * Lookups that waited for their chunk to load (lookupAsync). A lookup()
   * that answers undefined counts neither: the lookupAsync that follows counts.
   */
  cacheMisses: number;
  chunkLoads: number;
  chunkWrites: number;
  /** Chunk writes under a new name (first write of a chunk, or copy of a shared one). */
  chunkNewNames: number;
  headerWrites: number;
  dataSyncs: number;
  evictions: number;
}

interface PendingUpdate extends EntryUpdate {
  sync: boolean;
}

interface Waiter {
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** One map chunk's in-memory state. */
class ChunkSlot {
  /** Committed entries (what the last chunk write holds), or null until loaded. */
  entries: Float64Array | null = null;
  loading: Promise<Float64Array> | null = null;
  /** Updates waiting for the next commit, and who waits for them. */
  pending: PendingUpdate[] = [];
  waiters: Waiter[] = [];
  committing = false;
  lastUse = 0;

  constructor(readonly index: number) {}

  get idle(): boolean {
    return this.loading === null && !this.committing && this.pending.length === 0;
  }
}

export class VolumeMap {
  readonly #blocker: Blocker;
  readonly #name: string;
  readonly #header: VolumeHeader;
  /** Chunk refs by chunk index; header.chunkRefs is rebuilt from it at each header write. */
  readonly #refs: Map<number, ChunkRef>;
  #writable: boolean;
  #beginning: Promise<void> | null = null;
  /** Set while markShared persists a new generation: setEntries and resize wait for it. */
  #sharing: Promise<void> | null = null;
  readonly #cacheChunks: number;
  readonly #slots = new Map<number, ChunkSlot>();
  readonly #commits = new Set<Promise<void>>();
  readonly #headerCommit: GroupCommit;
  readonly #stats: VolumeMapStats = {
    cacheHits: 0, cacheMisses: 0, chunkLoads: 0, chunkWrites: 0, chunkNewNames: 0, headerWrites: 0, dataSyncs: 0, evictions: 0,
  };
  #objectCount: number;
  /**
   * Hashes that content entries (kind 2) in memory index: one table for the
   * whole map, append-only while it is open, so an entry value never changes
   * meaning (a lookup and the objectName that follows may straddle a commit).
   * Chunks store their own compacted table (chunk-format.ts); loading maps
   * its indexes here, writing maps them back. Costs ~100 bytes per distinct
   * hash loaded or set during the map's life.
   */
  readonly #hashes: string[] = [];
  readonly #hashIndex = new Map<string, number>();
  #tick = 0;
  /** Object indexes whose stored entry may differ from memory after a failed commit (file comment). */
  readonly #unsettled = new Set<number>();
  /** The last header write failed: the stored header may not reach every chunk ref in memory. */
  #headerBehind = false;
  #closed = false;
  #closing: Promise<void> | null = null;

  private constructor(blocker: Blocker, name: string, header: VolumeHeader, writable: boolean, cacheChunks?: number) {
    this.#blocker = blocker;
    this.#name = name;
    this.#header = header;
    this.#refs = new Map(header.chunkRefs.map((r) => [r.chunkIndex, r]));
    this.#writable = writable;
    this.#cacheChunks = Math.max(1, cacheChunks ?? DEFAULT_CACHE_CHUNKS);
    this.#objectCount = objectCountOf(header.size, header.objectSizeLog2);
    this.#headerCommit = new GroupCommit(() => this.#writeHeader());
  }

  /**
   * Creates volume `name` and returns it open for writing (generation 1).
   * Fails with InvalidNameError, UsageError (size, objectSize) or
   * VolumeExistsError. The header is written atomically; nothing else is.
   *
   * The existence check and the header write are two steps: two processes
   * creating the same name at once must be kept apart by the caller (the volume
   * lock), as the Blocker contract has no exclusive create.
   */
  static async create(blocker: Blocker, name: string, options: CreateOptions): Promise<VolumeMap> {
    validateVolumeName(name);
    const objectSizeLog2 = objectSizeLog2Of(options.objectSize ?? DEFAULT_OBJECT_SIZE);
    checkSize(options.size);
    try {
      await loadLiveHeader(blocker, name);
    } catch (err) {
      if (!(err instanceof VolumeNotFoundError)) throw err;
      const header = newHeader(options.size, objectSizeLog2);
      header.flags = options.flags ?? 0;
      await blocker.replace(headerObjectName(name), encodeHeader(header));
      return new VolumeMap(blocker, name, header, true, options.cacheChunks);
    }
    throw new VolumeExistsError(name);
  }

  /**
   * Opens volume `name`. Read-only opens read the header only. `forWrite`
   * refuses READONLY/SNAPSHOT volumes, then bumps the generation and persists
   * the header before returning, so every object this session creates has a
   * name no earlier session used (and any interrupted rename is settled).
   */
  static async open(blocker: Blocker, name: string, options: OpenOptions): Promise<VolumeMap> {
    validateVolumeName(name);
    // Only a writer settles an interrupted rename; a reader (maybe without the
    // lock, e.g. a migration target) never writes.
    const header = options.forWrite ? await loadForWrite(blocker, name) : await loadLiveHeader(blocker, name, { repair: false });
    return new VolumeMap(blocker, name, header, options.forWrite, options.cacheChunks);
  }

  /**
   * Turns a read-only open into a writable one, as open({forWrite: true})
   * would have, at the moment the first write needs it: the daemon opens
   * volumes read-only so that clients that only look (NBD_OPT_INFO, reads,
   * a migration target) never write metadata. Re-reads the header first (a
   * writer elsewhere may have moved it on), drops what was cached if it
   * changed, then bumps and persists the generation. Idempotent; concurrent
   * calls share one upgrade; a failed upgrade can be retried.
   */
  beginWrites(): Promise<void> {
    if (this.#writable) return Promise.resolve();
    this.#assertOpen();
    this.#beginning ??= (async () => {
      const header = await loadForWrite(this.#blocker, this.#name);
      // Nothing is queued (we were read-only): adopt the stored header whole.
      Object.assign(this.#header, header);
      this.#refs.clear();
      for (const r of header.chunkRefs) this.#refs.set(r.chunkIndex, r);
      this.#slots.clear();
      this.#objectCount = objectCountOf(header.size, header.objectSizeLog2);
      this.#writable = true;
    })().finally(() => { this.#beginning = null; });
    return this.#beginning;
  }

  /**
   * For a read-only map whose volume another process writes (a daemon
   * without the volume's lock): re-reads the header and forgets every cached
   * chunk, so the lookups that follow read the chunks as stored now. Costs
   * one header read; chunks are read again only as lookups need them — the
   * whole map is never reloaded. Writable maps are authoritative (their
   * holder has the lock) and refuse. Resolves with whether the header
   * changed.
   */
  async refresh(): Promise<boolean> {
    this.#assertOpen();
    if (this.#writable || this.#beginning !== null) throw new UsageError(`volume "${this.#name}": refresh of a writable map`);
    const header = await loadLiveHeader(this.#blocker, this.#name, { repair: false });
    if (header.volumeId !== this.#header.volumeId) {
      throw new VolumeNotFoundError(this.#name, 'removed (a new volume now has its name)');
    }
    const changed = header.generation !== this.#header.generation || header.size !== this.#header.size
      || header.chunkRefs.length !== this.#refs.size || header.flags !== this.#header.flags;
    Object.assign(this.#header, header);
    this.#refs.clear();
    for (const r of header.chunkRefs) this.#refs.set(r.chunkIndex, r);
    this.#slots.clear();
    this.#objectCount = objectCountOf(header.size, header.objectSizeLog2);
    return changed;
  }

  // ------------------------------------------------------------ properties

  get name(): string { return this.#name; }
  /** Volume id, 16 hex digits. */
  get id(): string { return this.#header.volumeId; }
  get size(): number { return this.#header.size; }
  get objectSize(): number { return 2 ** this.#header.objectSizeLog2; }
  get objectSizeLog2(): number { return this.#header.objectSizeLog2; }
  get objectCount(): number { return this.#objectCount; }
  get generation(): number { return this.#header.generation; }
  get writableSince(): number { return this.#header.writableSince; }
  /** VolumeFlags bits. */
  get flags(): number { return this.#header.flags; }
  /** False when opened read-only (or the volume is read-only). */
  get writable(): boolean { return this.#writable; }
  get createdAt(): Date { return new Date(this.#header.createdAt); }
  get parent(): ParentInfo | null { return this.#header.parent; }
  get sources(): readonly string[] { return this.#header.sources; }
  /** Number of map chunks that exist (never-written ranges have none). */
  get chunkCount(): number { return this.#refs.size; }
  get stats(): Readonly<VolumeMapStats> { return this.#stats; }

  // ------------------------------------------------------------ lookups

  /**
   * The entry of object `index`, or undefined when its chunk exists but is not
   * loaded (then use lookupAsync or ensureChunk). Synchronous and allocation-free.
   */
  lookup(index: number): MapEntry | undefined {
    const entry = this.#peek(index);
    if (entry !== undefined) this.#stats.cacheHits++;
    return entry;
  }

  /** The entry of object `index`, loading its chunk if needed. */
  async lookupAsync(index: number): Promise<MapEntry> {
    const entry = this.#peek(index);
    if (entry !== undefined) {
      this.#stats.cacheHits++;
      return entry;
    }
    this.#stats.cacheMisses++;
    const chunkIndex = Math.floor(index / CHUNK_ENTRIES);
    const entries = await this.#load(this.#slot(chunkIndex));
    return entries[index - chunkIndex * CHUNK_ENTRIES]!;
  }

  /** lookup() without counting a cache hit. */
  #peek(index: number): MapEntry | undefined {
    this.#assertOpen();
    this.#assertIndex(index);
    const chunkIndex = Math.floor(index / CHUNK_ENTRIES);
    const slot = this.#slots.get(chunkIndex);
    if (slot !== undefined && slot.entries !== null) {
      slot.lastUse = ++this.#tick;
      return slot.entries[index - chunkIndex * CHUNK_ENTRIES];
    }
    return this.#refs.has(chunkIndex) ? undefined : ENTRY_ABSENT;
  }

  /** Loads chunk `chunkIndex` into the cache (no-op when loaded or absent). */
  async ensureChunk(chunkIndex: number): Promise<void> {
    this.#assertOpen();
    if (!this.#refs.has(chunkIndex) || this.#slots.get(chunkIndex)?.entries) return;
    await this.#load(this.#slot(chunkIndex));
  }

  /**
   * Name of the object an entry names for object `index`: `d.<id>.<gen>.<index>`
   * for kind DATA, `sha256-<hash>` for kind CONTENT.
   */
  objectName(entry: MapEntry, index: number): string {
    if (entryKind(entry) === EntryKind.CONTENT) {
      const hash = this.#hashes[entryHashIndex(entry)];
      assert.ok(hash !== undefined, 'objectName: content entry outside the hash table');
      return CAS_PREFIX + hash;
    }
    assert.equal(entryKind(entry), EntryKind.DATA, 'objectName: entry is not a data entry');
    const volumeId = this.#header.sources[entrySource(entry)];
    assert.ok(volumeId !== undefined, 'objectName: entry source outside the sources table');
    return dataObjectName(volumeId, entryGeneration(entry), index);
  }

  /**
   * True when this open volume may write the entry's object in place: a data
   * object it created itself at or after writableSince. Anything else (absent,
   * a parent's object, one shared with a snapshot) must be copied on write to
   * `newObjectName(index)`.
   */
  isOwned(entry: MapEntry): boolean {
    return this.#writable && entryKind(entry) === EntryKind.DATA
      && entrySource(entry) === this.#header.writerSource
      && entryGeneration(entry) >= this.#header.writableSince;
  }

  /**
   * The entry naming the content-addressed object `sha256-<hash>` (64
   * lowercase hex digits). Such objects are immutable and never owned: the
   * first write to the index copies up into a data object.
   */
  contentEntry(hash: string): MapEntry {
    assert.ok(HASH_HEX.test(hash), `bad content hash ${JSON.stringify(hash)}`);
    return makeContentEntry(this.#intern(hash));
  }

  /**
   * setEntries for content-addressed objects (contentEntry each). The objects
   * must already exist durably: nothing here syncs them.
   */
  setContent(updates: readonly ContentUpdate[]): Promise<void> {
    return this.setEntries(updates.map((u) => ({ index: u.index, entry: this.contentEntry(u.hash) })));
  }

  /**
   * Sets the header flags (VolumeFlags) and persists the header once every
   * queued and in-flight chunk commit is durable: image-create.ts clears
   * INCOMPLETE so only after the whole map is on storage.
   */
  async setFlags(flags: number): Promise<void> {
    this.#assertWritable();
    while (this.#sharing !== null) await this.#sharing;
    await this.#drain();
    this.#header.flags = flags;
    await this.#headerCommit.request();
  }

  /** The entry for an object this session creates: our source, current generation. */
  newEntry(): MapEntry {
    return makeEntry(EntryKind.DATA, this.#header.writerSource, this.#header.generation);
  }

  /** Name for a new data object of index `index` (= objectName(newEntry(), index)). */
  newObjectName(index: number): string {
    return dataObjectName(this.#header.volumeId, this.#header.generation, index);
  }

  // ------------------------------------------------------------ updates

  /**
   * False while a failed commit left the stored entry of object `index` in
   * doubt (see the file comment); `settle` fixes that. Cheap: the set is
   * empty unless the store failed.
   */
  isSettled(index: number): boolean {
    return this.#unsettled.size === 0 || !this.#unsettled.has(index);
  }

  /**
   * Makes storage agree with memory again for object `index` after a failed
   * commit: commits its current entry, which rewrites its chunk (and the
   * header when it is behind). A no-op when settled. The caller holds the
   * index exclusively (compose gates), so the entry cannot change meanwhile.
   */
  async settle(index: number): Promise<void> {
    this.#assertWritable();
    if (this.isSettled(index)) return;
    const entry = await this.lookupAsync(index);
    await this.setEntries([{ index, entry }]);
  }

  /**
   * Sets entries and makes them durable: resolves when every update is in a
   * chunk on storage that the stored header reaches. Updates to one chunk are
   * committed in call order (a later update of the same index wins); updates
   * arriving during a commit are merged into the next one. The data objects the
   * entries name must already be written (see SetEntriesOptions.dataSynced).
   */
  async setEntries(updates: readonly EntryUpdate[], options: SetEntriesOptions = {}): Promise<void> {
    this.#assertWritable();
    if (updates.length === 0) return;
    const byChunk = new Map<number, PendingUpdate[]>();
    for (const u of updates) {
      this.#assertIndex(u.index);
      this.#assertEntry(u.entry);
      const chunkIndex = Math.floor(u.index / CHUNK_ENTRIES);
      let list = byChunk.get(chunkIndex);
      if (list === undefined) byChunk.set(chunkIndex, list = []);
      list.push({ index: u.index, entry: u.entry, sync: options.dataSynced !== true && this.isOwned(u.entry) });
    }
    // The sync flags above were decided before a concurrent markShared could
    // make our fresh objects count as shared; they still need their sync.
    while (this.#sharing !== null) await this.#sharing;
    const commits: Promise<void>[] = [];
    for (const [chunkIndex, list] of byChunk) commits.push(this.#enqueue(chunkIndex, list));
    await Promise.all(commits);
  }

  /** Grows the volume to `newSize` bytes (shrinking is refused) and persists the header. */
  async resize(newSize: number): Promise<void> {
    this.#assertWritable();
    checkSize(newSize);
    while (this.#sharing !== null) await this.#sharing; // see markShared
    if (newSize < this.#header.size) {
      throw new UsageError(`volume "${this.#name}": cannot shrink from ${this.#header.size} to ${newSize} bytes`);
    }
    if (newSize === this.#header.size) return;
    this.#header.size = newSize;
    this.#objectCount = objectCountOf(newSize, this.#header.objectSizeLog2);
    await this.#headerCommit.request();
  }

  /**
   * What a snapshot does to its origin (snapshot-create.ts; tests also use it
   * to fake one): bump the generation and set writableSince to it, so that
   * every existing object and chunk counts as shared and its next change is
   * copied to a new name. O(1): one header write. Resolves with a copy of the
   * header it persisted: exactly what a snapshot taken now must reference.
   *
   *   hold setEntries/resize ──▶ drain commits ──▶ write header (gen+1) ──▶ publish gen+1 ──▶ release
   *                                                  * failed: nothing published, release, reject
   *
   * The new generation is durable before anyone can use it: until the header
   * write completes, newEntry/newObjectName keep naming the old (durable)
   * generation, and setEntries/resize calls wait (in call order) instead of
   * committing, so no chunk or header write races the bump. Otherwise a
   * crash could leave objects of a generation the stored header never
   * reached, which the next open would reuse. A held update of an object
   * named with the old generation commits afterwards; that object then counts
   * as shared (it is copied on its next write), which is safe.
   *
   * What the map cannot see is the caller's business: a request that decided
   * "owned, write in place" (compose Volume) before the bump and writes after
   * it would change an object a snapshot reaches. So the caller quiesces its
   * I/O first (no request in flight) and resumes once this resolves.
   */
  async markShared(): Promise<VolumeHeader> {
    this.#assertWritable();
    while (this.#sharing !== null) await this.#sharing; // one bump at a time
    let release!: () => void;
    this.#sharing = new Promise<void>((resolve) => { release = resolve; });
    try {
      await this.#drain();
      if (this.#header.generation >= MAX_GENERATION) {
        throw new UsageError(`volume "${this.#name}": generation counter exhausted`);
      }
      const generation = this.#header.generation + 1;
      const next: VolumeHeader = {
        ...this.#header,
        generation,
        writableSince: generation,
        chunkRefs: [...this.#refs.values()].sort((a, b) => a.chunkIndex - b.chunkIndex),
      };
      const buf = encodeHeader(next);
      this.#stats.headerWrites++;
      try {
        await this.#blocker.replace(headerObjectName(this.#name), buf);
      } catch (err) {
        // The new generation may still land: the next commit rewrites the
        // header as memory has it (gen unchanged; objects of this generation
        // written meanwhile would count as shared after a crash: safe).
        this.#headerBehind = true;
        throw err;
      }
      this.#headerBehind = false;
      // Durable: publish.
      this.#header.generation = generation;
      this.#header.writableSince = generation;
      this.#header.chunkRefs = next.chunkRefs;
      return structuredClone(next);
    } finally {
      this.#sharing = null;
      release();
    }
  }

  /** Waits for queued and in-flight commits, then drops the cache. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#closed = true;
      while (this.#sharing !== null) await this.#sharing;
      await this.#drain();
      this.#slots.clear();
    })();
    return this.#closing;
  }

  // ------------------------------------------------------------ internals

  #slot(chunkIndex: number): ChunkSlot {
    let slot = this.#slots.get(chunkIndex);
    if (slot === undefined) {
      slot = new ChunkSlot(chunkIndex);
      this.#slots.set(chunkIndex, slot);
    }
    slot.lastUse = ++this.#tick;
    return slot;
  }

  /** The slot's entries, reading the chunk once however many callers ask at the same time. */
  #load(slot: ChunkSlot): Promise<Float64Array> {
    if (slot.entries !== null) return Promise.resolve(slot.entries);
    if (slot.loading !== null) return slot.loading;
    const ref = this.#refs.get(slot.index);
    if (ref === undefined) {
      slot.entries = new Float64Array(CHUNK_ENTRIES);
      this.#trim();
      return Promise.resolve(slot.entries);
    }
    slot.loading = this.#readChunk(ref).then(
      (entries) => {
        slot.entries = entries;
        slot.loading = null;
        this.#trim();
        return entries;
      },
      (err: unknown) => {
        slot.loading = null;
        if (slot.idle) this.#slots.delete(slot.index);
        throw err;
      });
    return slot.loading;
  }

  async #readChunk(ref: ChunkRef): Promise<Float64Array> {
    const volumeId = this.#header.sources[ref.source]!;
    const objectName = chunkObjectName(volumeId, ref.generation, ref.chunkIndex);
    let buf: Buffer;
    try {
      buf = await this.#blocker.readFull(objectName);
    } catch (err) {
      if (isNotFound(err)) {
        throw new MapFormatError(objectName, `missing, but the header of "${this.#name}" references it`, { cause: err });
      }
      throw err;
    }
    this.#stats.chunkLoads++;
    const decoded = decodeChunkTable(buf, objectName, { volumeId, generation: ref.generation, chunkIndex: ref.chunkIndex }, {
      sourceCount: this.#header.sources.length,
      writerSource: this.#header.writerSource,
      // A writer holds the lock, so no entry can be newer than its generation.
      // A reader's header may be older than a chunk the writer rewrote since.
      generation: this.#writable ? this.#header.generation : MAX_GENERATION,
    });
    const { entries, hashes } = decoded;
    if (hashes.length > 0) {
      // Chunk-local hash indexes → the map's table.
      const global = hashes.map((h) => this.#intern(h));
      for (let i = 0; i < CHUNK_ENTRIES; i++) {
        const e = entries[i]!;
        if (e !== 0 && entryKind(e) === EntryKind.CONTENT) entries[i] = makeContentEntry(global[entryHashIndex(e)]!);
      }
    }
    return entries;
  }

  #intern(hash: string): number {
    let k = this.#hashIndex.get(hash);
    if (k === undefined) {
      k = this.#hashes.length;
      this.#hashes.push(hash);
      this.#hashIndex.set(hash, k);
    }
    return k;
  }

  /** Evicts least recently used idle chunks beyond the cache size. */
  #trim(): void {
    if (this.#slots.size <= this.#cacheChunks) return;
    const idle = [...this.#slots.values()].filter((s) => s.idle).sort((a, b) => a.lastUse - b.lastUse);
    for (const slot of idle) {
      if (this.#slots.size <= this.#cacheChunks) break;
      this.#slots.delete(slot.index);
      this.#stats.evictions++;
    }
  }

  #enqueue(chunkIndex: number, updates: PendingUpdate[]): Promise<void> {
    const slot = this.#slot(chunkIndex);
    for (const u of updates) slot.pending.push(u);
    const done = new Promise<void>((resolve, reject) => slot.waiters.push({ resolve, reject }));
    if (!slot.committing) {
      const run = this.#commitLoop(slot);
      this.#commits.add(run);
      void run.finally(() => this.#commits.delete(run));
    }
    return done;
  }

  /** Commits the slot's pending updates, batch after batch, until none are left. Never rejects. */
  async #commitLoop(slot: ChunkSlot): Promise<void> {
    slot.committing = true;
    try {
      while (slot.pending.length > 0) {
        const batch = slot.pending;
        const waiters = slot.waiters;
        slot.pending = [];
        slot.waiters = [];
        try {
          await this.#commitChunk(slot, batch);
          for (const w of waiters) w.resolve();
        } catch (err) {
          for (const w of waiters) w.reject(err);
        }
      }
    } finally {
      slot.committing = false;
      this.#trim();
    }
  }

  /** One commit of one chunk (the diagram in the file comment). */
  async #commitChunk(slot: ChunkSlot, batch: PendingUpdate[]): Promise<void> {
    const entries = await this.#load(slot);

    const toSync: string[] = [];
    for (const u of batch) if (u.sync) toSync.push(this.objectName(u.entry, u.index));
    if (toSync.length > 0) {
      this.#stats.dataSyncs++;
      await this.#blocker.sync(toSync);
    }

    const next = entries.slice();
    const base = slot.index * CHUNK_ENTRIES;
    for (const u of batch) next[u.index - base] = u.entry;

    const current = this.#refs.get(slot.index);
    const h = this.#header;
    const inPlace = current !== undefined && current.source === h.writerSource && current.generation >= h.writableSince;
    const target: ChunkRef = inPlace ? current : { chunkIndex: slot.index, source: h.writerSource, generation: h.generation };
    const volumeId = h.sources[target.source]!;
    try {
      await this.#blocker.replace(chunkObjectName(volumeId, target.generation, target.chunkIndex),
        encodeChunk({ volumeId, generation: target.generation, chunkIndex: target.chunkIndex }, next, this.#hashes));
      this.#stats.chunkWrites++;
      // From here memory follows the newest chunk object: a later header write
      // will reach it even if the one below fails.
      slot.entries = next;
      if (!inPlace) {
        this.#stats.chunkNewNames++;
        this.#refs.set(slot.index, target);
      }
      if (!inPlace || this.#headerBehind) await this.#headerCommit.request();
    } catch (err) {
      // The write may have landed (or land later): storage is in doubt for this batch.
      for (const u of batch) this.#unsettled.add(u.index);
      throw err;
    }
    // The whole chunk as memory has it is stored and reached: nothing in it is in doubt.
    if (this.#unsettled.size > 0) {
      for (const i of this.#unsettled) if (i >= base && i < base + CHUNK_ENTRIES) this.#unsettled.delete(i);
    }
  }

  /** One header write of the current state; the state is captured before the first await. */
  #writeHeader(): Promise<void> {
    this.#header.chunkRefs = [...this.#refs.values()].sort((a, b) => a.chunkIndex - b.chunkIndex);
    const buf = encodeHeader(this.#header);
    this.#stats.headerWrites++;
    // Runs are serial (GroupCommit): the last one to finish says whether the
    // stored header reaches every ref in memory (each run writes them all).
    return this.#blocker.replace(headerObjectName(this.#name), buf).then(
      () => { this.#headerBehind = false; },
      (err: unknown) => { this.#headerBehind = true; throw err; });
  }

  async #drain(): Promise<void> {
    while (this.#commits.size > 0) await Promise.all([...this.#commits]);
    await this.#headerCommit.idle();
  }

  #assertOpen(): void {
    if (this.#closed) throw new UsageError(`volume "${this.#name}": map is closed`);
  }

  #assertWritable(): void {
    this.#assertOpen();
    if (!this.#writable) throw new UsageError(`volume "${this.#name}": map is open read-only`);
  }

  #assertIndex(index: number): void {
    // Hot path (every lookup): test first, build the message only on failure.
    if (!(Number.isInteger(index) && index >= 0 && index < this.#objectCount)) {
      assert.fail(`object index ${index} outside volume "${this.#name}" (${this.#objectCount} objects)`);
    }
  }

  #assertEntry(entry: MapEntry): void {
    if (entry === ENTRY_ABSENT) return;
    assert.ok(Number.isSafeInteger(entry) && entry > 0, `bad map entry ${entry}`);
    const why = checkEntryWords(entryLow(entry), entryHigh(entry), this.#header.sources.length, this.#hashes.length);
    assert.ok(why === null, `bad map entry ${entry}: ${why}`);
    assert.ok(entryKind(entry) !== EntryKind.DATA || entrySource(entry) !== this.#header.writerSource
      || entryGeneration(entry) <= this.#header.generation,
      `bad map entry ${entry}: generation newer than the volume's`);
  }
}

// ------------------------------------------------------------ helpers

/**
 * What opening for write does to the stored header: load it (settling an
 * interrupted rename), refuse snapshots and read-only volumes, bump the
 * generation and persist it, so every object this session creates has a name
 * no earlier session used. Returns the header as stored.
 */
async function loadForWrite(blocker: Blocker, name: string): Promise<VolumeHeader> {
  const header = await loadLiveHeader(blocker, name, { repair: true });
  if ((header.flags & (VolumeFlags.READONLY | VolumeFlags.SNAPSHOT)) !== 0) {
    throw new UsageError(`volume "${name}": is read-only, cannot open it for writing`);
  }
  if (header.generation >= MAX_GENERATION) {
    throw new UsageError(`volume "${name}": generation counter exhausted (${MAX_GENERATION} writable opens)`);
  }
  header.generation += 1;
  await blocker.replace(headerObjectName(name), encodeHeader(header));
  return header;
}

/** A random volume id (8 bytes, 16 hex digits), never zero and never one of `avoid`. */
export function newVolumeId(avoid: readonly string[] = []): string {
  let volumeId: string;
  do volumeId = randomBytes(8).toString('hex'); while (volumeId === '0000000000000000' || avoid.includes(volumeId));
  return volumeId;
}

function newHeader(size: number, objectSizeLog2: number): VolumeHeader {
  const volumeId = newVolumeId();
  return {
    flags: 0,
    volumeId,
    size,
    objectSizeLog2,
    generation: 1,
    writableSince: 1,
    createdAt: Date.now(),
    sources: [volumeId],
    writerSource: 0,
    parent: null,
    renameTo: null,
    renamedFrom: null,
    chunkRefs: [],
  };
}

function objectSizeLog2Of(objectSize: number): number {
  const log2 = Math.log2(objectSize);
  if (!Number.isInteger(log2) || log2 < MIN_OBJECT_SIZE_LOG2 || log2 > MAX_OBJECT_SIZE_LOG2) {
    throw new UsageError(`object size ${objectSize}: must be a power of two from `
      + `${2 ** MIN_OBJECT_SIZE_LOG2} (64 KiB) to ${2 ** MAX_OBJECT_SIZE_LOG2} (64 MiB)`);
  }
  return log2;
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_VOLUME_SIZE) {
    throw new UsageError(`volume size ${size}: must be a whole number of bytes from 0 to ${MAX_VOLUME_SIZE}`);
  }
}
