/**
 * The file blocker: one file per object under a root directory.
 *
 * Layout. `<root>/archipelago-store.json` marks a store (format, version);
 * objects live at `<root>/<h0h1>/<h2h3>/<encoded name>` where h0..h3 are the
 * first hex digits of sha1(name): 65536 leaf directories, so millions of
 * objects never crowd one directory. Names are percent-encoded into
 * [A-Za-z0-9._-] (never "." or ".."), so no name can leave its leaf directory.
 * Files whose name starts with "~" are temporary (replace, probes): `list`
 * skips them and `removeTempFiles` deletes crash leftovers.
 *
 * Descriptors. Raw fds with the callback fs API, not fs/promises FileHandles:
 * a FileHandle costs an object, a promise wrapper and GC bookkeeping per
 * handle and measurably more per call, and we already need our own cache and
 * lifetime rules. An LRU of open fds (lru-cache; by default half the
 * open-file limit, at most 16,384: fd-limit.ts) is keyed by object name; a
 * request whose fd is cached skips the name-to-path work (sha1 fan-out,
 * encoding). Each entry is pinned while an operation uses it, and an evicted
 * entry is closed only when its last pin is released — closing a raw fd under
 * an in-flight pread would let the kernel reuse the number for another file.
 *
 * Fast paths (the optional addon, file-addon.ts): reads try the page cache
 * first on the event-loop thread (preadv2 RWF_NOWAIT: no thread-pool round
 * trip for cached data, never a wait for the disk there; the rest is read
 * through the pool); small writes started in one loop turn go to the pool as
 * one job (io-batch.ts). Without the addon: fs, one pool job per call.
 *
 * Durability (blocker.ts, DESIGN.md §4). Writes are not fsynced. Object
 * files are made durable with fdatasync (data, size and allocation: all a
 * later read needs; not timestamps, which would cost a journal commit per
 * object), directories and replaced (metadata) objects with fsync. Completed
 * writes mark their object dirty; creating a file marks its directory dirty
 * and the name "fresh" (its directory entry is not durable yet); mkdir marks
 * the parents of new directories dirty. `sync(names)` fsyncs exactly the dirty
 * named files plus the dirty directories on the paths of fresh names; `sync()`
 * fsyncs everything dirty. Each file/dir is a sync key with at most one fsync
 * in flight and one queued behind it, so concurrent syncs coalesce (group
 * commit) and a sync never returns before an fsync that covers its writes.
 * An fsync failure poisons its key: Linux may drop the dirty pages after
 * reporting the error, so a retry could falsely succeed; every later sync that
 * covers the key rejects with the original error.
 *
 * Imports nothing above the blocker layer.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import dc from 'node:diagnostics_channel';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { LRUCache } from 'lru-cache';
import { silentLogger, type Logger } from '../common/log.js';
import type { Blocker, BlockerCapabilities, ObjectStat } from './blocker.js';
import { BlockerError, checkObjectName, toBlockerError } from './errors.js';
import { decodeName, encodeName, fanOutDir } from './file-names.js';
import { defaultMaxOpenFiles } from './fd-limit.js';
import { loadFileAddon, noteNowaitFailure, readNowaitOf, type FileAddon } from './file-addon.js';
import { BATCH_MAX_WRITE, WriteBatcher } from './io-batch.js';
import { fdClose, fdDataSync, fdOpen, fdSize, fdSync, fdTruncate, fsyncDir, readAll, writeAll, zeroRange } from './file-io.js';

export { decodeName, encodeName, fanOutDir } from './file-names.js';

export const STORE_MARKER = 'archipelago-store.json';
const STORE_FORMAT = 'archipelago-file-store';
const STORE_VERSION = 1;
const STORE_LAYOUT = { fanout: 'sha1-hex-2/2', names: 'percent-utf8' } as const;

/** Prefix of temporary files; "~" never occurs in an encoded object name. */
const TEMP_PREFIX = '~tmp.';
const FANOUT_DIR = /^[0-9a-f]{2}$/;
/**
 * Largest read tried on the event-loop thread first (file-addon.ts): a
 * cached copy of up to this much (about 0.1 ms for 1 MiB) costs less than a
 * thread-pool round trip — measured: 1 MiB sequential reads took 40 % less
 * CPU per MiB inline than through the pool (docs/benchmarks.md). Larger
 * reads go to the pool so that one request never holds the loop for long.
 */
const INLINE_READ_MAX = 1024 * 1024;
const MAX_FILE_NAME = 255; // NAME_MAX of every Linux file system we support


/** Published for every fsync (tests count them; metrics may). Guarded by hasSubscribers. */
export const fsyncChannel = dc.channel('archipelago:blocker:fsync');
export interface FsyncMessage {
  root: string;
  target: 'file' | 'dir';
  /** Object name for files, fan-out path ('' = root, 'ab', 'ab/cd') for directories. */
  key: string;
}

export interface FileBlockerOptions {
  /** Open descriptors kept in the LRU cache (pinned ones may exceed it briefly). */
  maxOpenFiles?: number;
  /** The native fast paths (file-addon.ts); default: loaded if built; null: plain fs. */
  addon?: FileAddon | null;
  log?: Logger;
}

export interface OpenFileBlockerOptions extends FileBlockerOptions {
  /** Create the root (and the marker in an empty root). Default true. */
  create?: boolean;
}

interface Location {
  /** Fan-out directory relative to the root. */
  dir: string;
  /** Absolute path of the object's file. */
  path: string;
}

/** Sync keys: 'f:' + object name, 'd:' + directory relative to the root. */
const fileKey = (name: string) => 'f:' + name;
const dirKey = (dir: string) => 'd:' + dir;
/** The directory, its parent and the root: every entry on the way to a file. */
const dirChain = (dir: string) => [dir, dir.slice(0, 2), ''];

const errnoOf = (err: unknown) => (err as { code?: unknown } | null)?.code;
const noop = () => {};

// ------------------------------------------------------------ blocker

interface FdEntry {
  name: string;
  fd: number;
  /** Operations using the fd now; it is closed only at zero. */
  pins: number;
  /** Out of the cache (evicted, invalidated): close at the last release. */
  retired: boolean;
  closed: boolean;
  /** An exclusive step (punch's truncate) runs: new users wait for it. */
  exclusive?: Promise<void>;
}

interface Opening {
  promise: Promise<FdEntry>;
  create: boolean;
  /** The object was replaced or removed meanwhile: do not cache the result. */
  stale: boolean;
}

interface SyncState {
  inflight?: Promise<void>;
  queued?: Promise<void>;
}

export class FileBlocker implements Blocker {
  readonly kind = 'file';
  readonly capabilities: BlockerCapabilities;
  readonly root: string;

  readonly #log: Logger;
  readonly #fds: LRUCache<string, FdEntry>;
  readonly #opening = new Map<string, Opening>();
  /** Evicted while pinned: still open, reused until the last pin goes (no duplicate fds). */
  readonly #lingering = new Map<string, FdEntry>();
  #openFds = 0;

  /** Fan-out directories known to exist (we never remove them). */
  readonly #knownDirs = new Set<string>();
  readonly #mkdirs = new Map<string, Promise<void>>();

  /** Sync keys with changes not yet fsynced. */
  readonly #dirty = new Set<string>();
  /** Names created since their directory was last fsynced → creation number. */
  readonly #fresh = new Map<string, number>();
  #creations = 0;
  readonly #syncs = new Map<string, SyncState>();
  /** Keys whose fsync (or close) failed: their data may be lost. */
  readonly #failed = new Map<string, BlockerError>();
  /** Temp files of replaces in flight (removeTempFiles spares them). */
  readonly #temps = new Set<string>();

  /** Cached reads without the thread pool, when the addon is there (file-addon.ts). */
  #readNowait: FileAddon['readNowait'] | null;
  /** Small writes batched into one pool job per loop turn, when the addon is there (io-batch.ts). */
  readonly #batcher: WriteBatcher | null;

  #active = 0;
  #onIdle: (() => void) | undefined;
  #closed = false;
  #closing: Promise<void> | undefined;

  /** Prefer `openFileBlocker`, which checks the store marker and probes sparseness. */
  constructor(root: string, options: FileBlockerOptions & { sparse?: boolean } = {}) {
    this.root = path.resolve(root);
    this.#log = options.log ?? silentLogger;
    // punch frees space only when the range reaches the end of the file
    // (ftruncate); elsewhere it writes zeros, since Node has no fallocate.
    this.capabilities = { durableWrites: false, sparse: options.sparse ?? true, punch: false };
    const addon = options.addon === undefined ? loadFileAddon() : options.addon;
    this.#readNowait = readNowaitOf(addon);
    this.#batcher = addon ? new WriteBatcher(addon) : null;
    this.#fds = new LRUCache<string, FdEntry>({
      max: options.maxOpenFiles ?? defaultMaxOpenFiles(),
      dispose: (entry, name, reason) => {
        entry.retired = true;
        if (entry.pins === 0) this.#closeFd(entry);
        else if (reason === 'evict') this.#lingering.set(name, entry);
      },
    });
  }

  /** Descriptors open now (cached plus retired-but-pinned). */
  get openFileCount(): number {
    return this.#openFds;
  }

  async read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    assert(Number.isSafeInteger(offset) && offset >= 0 && Number.isSafeInteger(length) && length >= 0);
    assert(target.length >= length);
    this.#enter('read', name);
    let entry: FdEntry | undefined;
    try {
      entry = this.#pinCached(name) ?? await this.#acquire(name, this.#locate('read', name), false);
      if (entry.exclusive) await this.#waitExclusive(entry);
      let done = 0;
      if (this.#readNowait !== null && length <= INLINE_READ_MAX) {
        // What the page cache holds, copied on this thread (file-addon.ts).
        const n = this.#readNowait(entry.fd, target, 0, length, offset);
        if (n === length || n === 0) return n; // all of it, or the object ends there
        if (n > 0) done = n;
        else if (n < 0 && noteNowaitFailure(n)) this.#readNowait = null;
      }
      return done + await readAll(entry.fd, done === 0 ? target : target.subarray(done), length - done, offset + done);
    } catch (err) {
      throw toBlockerError(err, 'read', name);
    } finally {
      if (entry) this.#release(entry);
      this.#leave();
    }
  }

  async write(name: string, offset: number, data: Buffer): Promise<void> {
    assert(Number.isSafeInteger(offset) && offset >= 0);
    this.#enter('write', name);
    let entry: FdEntry | undefined;
    try {
      entry = this.#pinCached(name) ?? await this.#acquire(name, this.#locate('write', name), true);
      if (entry.exclusive) await this.#waitExclusive(entry);
      if (this.#batcher !== null && data.length <= BATCH_MAX_WRITE && data.length > 0) await this.#batcher.write(entry.fd, data, offset);
      else await writeAll(entry.fd, data, offset);
      // Dirty only once complete: a sync that starts earlier need not cover it,
      // one that starts later must find it.
      this.#dirty.add(fileKey(name));
    } catch (err) {
      throw toBlockerError(err, 'write', name);
    } finally {
      if (entry) this.#release(entry);
      this.#leave();
    }
  }

  /** Temp file in the same directory → write → fsync → rename → fsync the directory chain. */
  async replace(name: string, data: Buffer): Promise<void> {
    const loc = this.#locate('replace', name);
    this.#enter('replace', name);
    const tmp = path.join(this.root, loc.dir, TEMP_PREFIX + randomBytes(8).toString('hex'));
    let renamed = false;
    try {
      await this.#ensureDir(loc.dir);
      this.#temps.add(tmp);
      const fd = await fdOpen(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL);
      try {
        await writeAll(fd, data, 0);
        await fdSync(fd);
      } finally {
        await fdClose(fd);
      }
      await fsp.rename(tmp, loc.path);
      renamed = true;
      this.#invalidate(name);
      const created = this.#fresh.get(name);
      this.#dirty.add(dirKey(loc.dir));
      await this.#syncKeys(dirChain(loc.dir).map(dirKey));
      if (created !== undefined && this.#fresh.get(name) === created) this.#fresh.delete(name);
    } catch (err) {
      if (!renamed) await fsp.unlink(tmp).catch(noop);
      throw toBlockerError(err, 'replace', name);
    } finally {
      this.#temps.delete(tmp);
      this.#leave();
    }
  }

  async readFull(name: string): Promise<Buffer> {
    const loc = this.#locate('readFull', name);
    this.#enter('readFull', name);
    try {
      return await fsp.readFile(loc.path);
    } catch (err) {
      throw toBlockerError(err, 'readFull', name);
    } finally {
      this.#leave();
    }
  }

  /**
   * A range reaching the end of the file is freed: truncate to `offset`, then
   * back to the old size (a hole). That is done only while nobody else uses
   * the object, and new users wait for it: a write past the old end landing
   * between the two truncates would be cut off. Otherwise, and for ranges
   * inside the file, the range is overwritten with zeros (Node has no
   * fallocate). The size never changes; the part past the end is ignored.
   */
  async punch(name: string, offset: number, length: number): Promise<void> {
    assert(Number.isSafeInteger(offset) && offset >= 0 && Number.isSafeInteger(length) && length >= 0);
    const loc = this.#locate('punch', name);
    this.#enter('punch', name);
    let entry: FdEntry | undefined;
    try {
      entry = await this.#acquire(name, loc, false);
      if (length === 0) return;
      const fd = entry.fd;
      if (entry.pins === 1) {
        const alone = entry;
        alone.exclusive = (async () => {
          const size = await fdSize(fd);
          if (offset >= size || offset + length < size) return zeroRange(fd, offset, Math.min(offset + length, size));
          await fdTruncate(fd, offset);
          await fdTruncate(fd, size);
        })().finally(() => (alone.exclusive = undefined));
        await alone.exclusive;
      } else {
        await zeroRange(fd, offset, Math.min(offset + length, await fdSize(fd)));
      }
      this.#dirty.add(fileKey(name));
    } catch (err) {
      throw toBlockerError(err, 'punch', name);
    } finally {
      if (entry) this.#release(entry);
      this.#leave();
    }
  }

  async remove(name: string): Promise<void> {
    const loc = this.#locate('remove', name);
    this.#enter('remove', name);
    try {
      await fsp.unlink(loc.path);
      this.#dirty.add(dirKey(loc.dir)); // so that sync() also makes removals durable
    } catch (err) {
      if (errnoOf(err) !== 'ENOENT') throw toBlockerError(err, 'remove', name);
    } finally {
      this.#invalidate(name);
      this.#fresh.delete(name);
      this.#leave();
    }
  }

  async stat(name: string): Promise<ObjectStat> {
    const loc = this.#locate('stat', name);
    this.#enter('stat', name);
    try {
      const st = await fsp.stat(loc.path);
      return { size: st.size };
    } catch (err) {
      throw toBlockerError(err, 'stat', name);
    } finally {
      this.#leave();
    }
  }

  /** Walks the 2-level fan-out; skips temp files and anything not a canonical encoding. */
  async *list(prefix: string): AsyncIterable<string> {
    if (this.#closed) throw new BlockerError('EIO', 'list', prefix, 'blocker is closed');
    try {
      for (const top of await readdirOrEmpty(this.root)) {
        if (!FANOUT_DIR.test(top)) continue;
        for (const sub of await readdirOrEmpty(path.join(this.root, top))) {
          if (!FANOUT_DIR.test(sub)) continue;
          for (const file of await readdirOrEmpty(path.join(this.root, top, sub))) {
            if (file.startsWith('~')) continue;
            const name = decodeName(file);
            if (name !== undefined && name.startsWith(prefix)) yield name;
          }
        }
      }
    } catch (err) {
      throw toBlockerError(err, 'list', prefix);
    }
  }

  async sync(names?: Iterable<string>): Promise<void> {
    this.#enter('sync', '');
    try {
      if (names === undefined) return await this.#syncAll();
      const keys = new Set<string>();
      const fresh: [string, number][] = [];
      for (const name of names) {
        const loc = this.#locate('sync', name);
        keys.add(fileKey(name));
        const created = this.#fresh.get(name);
        if (created !== undefined) {
          fresh.push([name, created]);
          for (const dir of dirChain(loc.dir)) keys.add(dirKey(dir));
        }
      }
      await this.#syncKeys(keys);
      for (const [name, created] of fresh) if (this.#fresh.get(name) === created) this.#fresh.delete(name);
    } finally {
      this.#leave();
    }
  }

  /** Waits for operations in flight, syncs everything dirty, closes every fd. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  /**
   * Deletes temp files left by crashed replaces that are older than
   * `olderThanMs` (default 10 minutes, to spare other processes' replaces in
   * flight; this process's own are always spared). Resolves with the count.
   */
  async removeTempFiles(olderThanMs = 10 * 60_000): Promise<number> {
    const before = Date.now() - olderThanMs;
    let removed = 0;
    const sweep = async (dir: string) => {
      for (const file of await readdirOrEmpty(dir)) {
        const full = path.join(dir, file);
        if (!file.startsWith(TEMP_PREFIX) || this.#temps.has(full)) continue;
        const st = await fsp.stat(full).catch(() => undefined);
        if (st && st.mtimeMs <= before && (await fsp.unlink(full).then(() => true, () => false))) removed++;
      }
    };
    try {
      await sweep(this.root);
      for (const top of await readdirOrEmpty(this.root)) {
        if (!FANOUT_DIR.test(top)) continue;
        for (const sub of await readdirOrEmpty(path.join(this.root, top))) {
          if (FANOUT_DIR.test(sub)) await sweep(path.join(this.root, top, sub));
        }
      }
    } catch (err) {
      throw toBlockerError(err, 'removeTempFiles', this.root);
    }
    return removed;
  }

  // ------------------------------------------------------------ internals

  #locate(op: string, name: string): Location {
    checkObjectName(op, name);
    const file = encodeName(name);
    if (file.length > MAX_FILE_NAME) {
      throw new BlockerError('EINVAL', op, name, `object name encodes to ${file.length} bytes, over ${MAX_FILE_NAME}`);
    }
    const dir = fanOutDir(name);
    return { dir, path: path.join(this.root, dir, file) };
  }

  #enter(op: string, name: string): void {
    if (this.#closed) throw new BlockerError('EIO', op, name, 'blocker is closed');
    this.#active++;
  }

  #leave(): void {
    if (--this.#active === 0 && this.#onIdle) {
      this.#onIdle();
      this.#onIdle = undefined;
    }
  }

  async #shutdown(): Promise<void> {
    this.#closed = true;
    if (this.#active > 0) await new Promise<void>((resolve) => (this.#onIdle = resolve));
    try {
      await this.#syncAll();
    } finally {
      this.#fds.clear(); // disposes: closes every unpinned fd
    }
  }

  /**
   * The hot path: the object's fd when it is cached, pinned, with no lookup
   * of its file name (sha1 fan-out, encoding, path join): a cached name was
   * validated when it was opened. The caller waits out `exclusive` if set.
   */
  #pinCached(name: string): FdEntry | undefined {
    const cached = this.#fds.get(name) ?? this.#lingering.get(name);
    if (cached !== undefined) cached.pins++;
    return cached;
  }

  /** A pinned fd of the object; with `create`, makes the file (and its directories). */
  async #acquire(name: string, loc: Location, create: boolean): Promise<FdEntry> {
    for (;;) {
      const cached = this.#fds.get(name) ?? this.#lingering.get(name);
      if (cached) {
        cached.pins++;
        return cached.exclusive ? this.#waitExclusive(cached) : cached;
      }
      const opening = this.#opening.get(name) ?? this.#startOpen(name, loc, create);
      let entry: FdEntry;
      try {
        entry = await opening.promise;
      } catch (err) {
        // we joined an open that would not create the file: try our own
        if (create && !opening.create && errnoOf(err) === 'ENOENT') continue;
        throw err;
      }
      if (!entry.closed) {
        entry.pins++;
        return entry.exclusive ? this.#waitExclusive(entry) : entry;
      }
      // evicted and closed before we could pin it: open again
    }
  }

  /** Pinned already; waits out an exclusive step (its failure is its caller's). */
  async #waitExclusive(entry: FdEntry): Promise<FdEntry> {
    while (entry.exclusive) await entry.exclusive.catch(noop);
    return entry;
  }

  #release(entry: FdEntry): void {
    if (--entry.pins === 0 && entry.retired) this.#closeFd(entry);
  }

  /** One open per name at a time; waiters share it. */
  #startOpen(name: string, loc: Location, create: boolean): Opening {
    const opening: Opening = { create, stale: false, promise: undefined as unknown as Promise<FdEntry> };
    opening.promise = (async () => {
      try {
        const fd = await this.#openFile(name, loc, create);
        this.#openFds++;
        const entry: FdEntry = { name, fd, pins: 0, retired: false, closed: false };
        if (opening.stale || this.#closed) entry.retired = true;
        else this.#fds.set(name, entry);
        return entry;
      } finally {
        if (this.#opening.get(name) === opening) this.#opening.delete(name);
      }
    })();
    this.#opening.set(name, opening);
    return opening;
  }

  async #openFile(name: string, loc: Location, create: boolean): Promise<number> {
    const { O_RDWR, O_CREAT, O_EXCL } = fs.constants;
    try {
      return await fdOpen(loc.path, O_RDWR);
    } catch (err) {
      if (!create || errnoOf(err) !== 'ENOENT') throw err;
    }
    await this.#ensureDir(loc.dir);
    try {
      const fd = await fdOpen(loc.path, O_RDWR | O_CREAT | O_EXCL);
      this.#fresh.set(name, ++this.#creations);
      this.#dirty.add(dirKey(loc.dir));
      this.#dirty.add(fileKey(name));
      return fd;
    } catch (err) {
      if (errnoOf(err) !== 'EEXIST') throw err;
      return await fdOpen(loc.path, O_RDWR);
    }
  }

  #closeFd(entry: FdEntry): void {
    if (entry.closed) return;
    entry.closed = true;
    this.#openFds--;
    if (this.#lingering.get(entry.name) === entry) this.#lingering.delete(entry.name);
    fs.close(entry.fd, (err) => {
      if (!err) return;
      // close can report a writeback error (NFS): the data may be lost
      const failure = toBlockerError(err, 'close', entry.name);
      this.#failed.set(fileKey(entry.name), failure);
      this.#log.warn(failure.message, { object: entry.name });
    });
  }

  /** After replace/remove: the cached fd (if any) points at the old inode. */
  #invalidate(name: string): void {
    const opening = this.#opening.get(name);
    if (opening) {
      opening.stale = true;
      this.#opening.delete(name);
    }
    this.#fds.delete(name);
    this.#lingering.delete(name);
    this.#dirty.delete(fileKey(name));
    this.#failed.delete(fileKey(name));
  }

  /** mkdir -p of a fan-out directory, once; marks the parents of new directories dirty. */
  #ensureDir(dir: string): Promise<void> | undefined {
    if (this.#knownDirs.has(dir)) return undefined;
    let pending = this.#mkdirs.get(dir);
    if (!pending) {
      pending = (async () => {
        try {
          const first = await fsp.mkdir(path.join(this.root, dir), { recursive: true });
          if (first !== undefined) {
            const created = path.relative(this.root, first);
            if (created.length <= 2) this.#dirty.add(dirKey('')); // the top level one is new
            this.#dirty.add(dirKey(dir.slice(0, 2)));
          }
          this.#knownDirs.add(dir);
        } finally {
          this.#mkdirs.delete(dir);
        }
      })();
      this.#mkdirs.set(dir, pending);
    }
    return pending;
  }

  async #syncAll(): Promise<void> {
    const fresh = [...this.#fresh];
    await this.#syncKeys(new Set([...this.#dirty, ...this.#syncs.keys(), ...this.#failed.keys()]));
    for (const [name, created] of fresh) if (this.#fresh.get(name) === created) this.#fresh.delete(name);
  }

  /** Syncs every key; all run to the end, the first failure is reported. */
  async #syncKeys(keys: Iterable<string>): Promise<void> {
    const pending: Promise<void>[] = [];
    for (const key of keys) {
      const p = this.#syncKey(key);
      if (p) pending.push(p);
    }
    if (pending.length === 0) return;
    const results = await Promise.allSettled(pending);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /**
   * Makes `key` durable as of now. Clean and idle: nothing to do. Clean but an
   * fsync in flight: that fsync started after the last change, so wait for it.
   * Dirty: start an fsync, or queue one behind the running one (joining the
   * queued one if there is already one).
   */
  #syncKey(key: string): Promise<void> | undefined {
    const failure = this.#failed.get(key);
    if (failure) return Promise.reject(failure);
    const state = this.#syncs.get(key);
    if (!this.#dirty.has(key)) return state?.queued ?? state?.inflight;
    if (state?.queued) return state.queued;
    if (state?.inflight) {
      state.queued = state.inflight.then(noop, noop).then(() => {
        state.queued = undefined;
        return this.#startSync(key, state);
      });
      return state.queued;
    }
    const fresh: SyncState = {};
    this.#syncs.set(key, fresh);
    return this.#startSync(key, fresh);
  }

  #startSync(key: string, state: SyncState): Promise<void> {
    this.#dirty.delete(key);
    const target = key.slice(2);
    state.inflight = this.#fsyncKey(key)
      .catch((err: unknown) => {
        const failure = toBlockerError(err, 'sync', target);
        this.#failed.set(key, failure);
        throw failure;
      })
      .finally(() => {
        state.inflight = undefined;
        if (!state.queued && this.#syncs.get(key) === state) this.#syncs.delete(key);
      });
    return state.inflight;
  }

  async #fsyncKey(key: string): Promise<void> {
    const target = key.slice(2);
    if (key.startsWith('d:')) {
      if (fsyncChannel.hasSubscribers) fsyncChannel.publish({ root: this.root, target: 'dir', key: target });
      await fsyncDir(path.join(this.root, target));
      return;
    }
    let entry: FdEntry;
    try {
      entry = await this.#acquire(target, this.#locate('sync', target), false);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return; // removed: nothing left to make durable
      throw err;
    }
    try {
      if (fsyncChannel.hasSubscribers) fsyncChannel.publish({ root: this.root, target: 'file', key: target });
      // fdatasync: data and size; timestamps are not worth a journal commit per object.
      // One pool job per file, on purpose: the waits of many files overlap
      // (batching them into one job serialized them: FLUSH 29 ms instead of 4).
      await fdDataSync(entry.fd);
    } finally {
      this.#release(entry);
    }
  }
}

async function readdirOrEmpty(dir: string): Promise<string[]> {
  try {
    return await fsp.readdir(dir);
  } catch (err) {
    if (errnoOf(err) === 'ENOENT') return [];
    throw err;
  }
}

// ------------------------------------------------------------- opening

/**
 * Opens (and with `create`, default true, initialises) a store at `root`.
 * An existing root must hold a marker of a format this build reads, or be
 * empty; anything else is EINVAL, so a typo in a path cannot scatter objects
 * over an unrelated directory.
 */
export async function openFileBlocker(root: string, options: OpenFileBlockerOptions = {}): Promise<FileBlocker> {
  const abs = path.resolve(root);
  try {
    let firstCreated: string | undefined;
    if (options.create ?? true) firstCreated = await fsp.mkdir(abs, { recursive: true });
    const markerPath = path.join(abs, STORE_MARKER);
    let text: string | undefined;
    try {
      text = await fsp.readFile(markerPath, 'utf8');
    } catch (err) {
      if (errnoOf(err) !== 'ENOENT') throw err;
    }
    if (text === undefined) {
      const others = (await fsp.readdir(abs)).filter((f) => !f.startsWith(TEMP_PREFIX));
      if (others.length > 0) {
        throw new BlockerError('EINVAL', 'open', abs, `not an Archipelago store (no ${STORE_MARKER}) and not empty`);
      }
      if (!(options.create ?? true)) throw new BlockerError('ENOENT', 'open', abs, `no ${STORE_MARKER}`);
      await writeMarker(abs, firstCreated);
    } else {
      checkMarker(abs, text);
    }
    const sparse = await probeSparse(abs);
    return new FileBlocker(abs, { ...options, sparse });
  } catch (err) {
    throw toBlockerError(err, 'open', abs);
  }
}

function checkMarker(root: string, text: string): void {
  let marker: Record<string, unknown>;
  try {
    marker = JSON.parse(text) as Record<string, unknown>;
  } catch (err) {
    throw new BlockerError('EINVAL', 'open', root, `${STORE_MARKER} is not JSON`, { cause: err });
  }
  if (marker?.format !== STORE_FORMAT) {
    throw new BlockerError('EINVAL', 'open', root, `${STORE_MARKER} is not an ${STORE_FORMAT} marker`);
  }
  if (marker.version !== STORE_VERSION) {
    throw new BlockerError('EINVAL', 'open', root, `store format version ${String(marker.version)}, this build reads ${STORE_VERSION}`);
  }
  if (marker.fanout !== STORE_LAYOUT.fanout || marker.names !== STORE_LAYOUT.names) {
    throw new BlockerError('EINVAL', 'open', root, `unknown layout ${String(marker.fanout)}/${String(marker.names)}`);
  }
}

/** Durably: temp + fsync + rename + fsync root, and the parents of directories we created. */
async function writeMarker(root: string, firstCreated: string | undefined): Promise<void> {
  const marker = { format: STORE_FORMAT, version: STORE_VERSION, ...STORE_LAYOUT, created: new Date().toISOString() };
  const tmp = path.join(root, TEMP_PREFIX + 'marker-' + randomBytes(4).toString('hex'));
  const fd = await fdOpen(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL);
  try {
    await writeAll(fd, Buffer.from(JSON.stringify(marker, null, 2) + '\n'), 0);
    await fdSync(fd);
  } finally {
    await fdClose(fd);
  }
  await fsp.rename(tmp, path.join(root, STORE_MARKER));
  await fsyncDir(root);
  if (firstCreated !== undefined) {
    for (let dir = path.dirname(root); ; dir = path.dirname(dir)) {
      await fsyncDir(dir);
      if (dir === path.dirname(firstCreated) || dir === path.dirname(dir)) break;
    }
  }
}

/** Whether a file with a 1 MiB hole takes less than 1 MiB (false on FAT and the like). */
async function probeSparse(root: string): Promise<boolean> {
  const probe = path.join(root, TEMP_PREFIX + 'probe-' + randomBytes(4).toString('hex'));
  const fd = await fdOpen(probe, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL);
  try {
    await writeAll(fd, Buffer.from([1]), 1024 * 1024);
    const st = await new Promise<fs.Stats>((resolve, reject) => fs.fstat(fd, (err, s) => (err ? reject(err) : resolve(s))));
    return st.blocks * 512 < 1024 * 1024;
  } finally {
    await fdClose(fd);
    await fsp.unlink(probe).catch(noop);
  }
}
