/**
 * The file lock's directory, <root>/locks/lock.<volumeId>/ (docs/format.md
 * §13.2): the primitive operations on its entries, with no lease or
 * handover logic (file-backend.ts has those). Reading an entry, finding the
 * head, appending an entry exclusively (temp file, fsync, link, fsync the
 * directory, then the predecessor check), and compaction.
 *
 * Imports the blocker layer's fs helpers and the lock layer's records.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { fdClose, fdOpen, fdRead, fdSync, fsyncDir, writeAll } from '../blockers/file-io.js';
import type { Logger } from '../common/log.js';
import { RECORD_SIZE, decodeRecord, type FileLockRecord } from './file-record.js';
import { lockObjectName } from './types.js';

/** Directory under the store root holding one directory per volume lock. */
export const LOCKS_DIR = 'locks';

/** Crash leftovers of entry writes older than this are swept at compaction. */
const TEMP_MAX_AGE_MS = 10 * 60_000;
/** e.<seq>, r.<seq>.<token>, ~tmp.<random> (docs/format.md §13.2). */
export const ENTRY = /^e\.(0|[1-9][0-9]{0,15})$/;
export const REQUEST = /^r\.(0|[1-9][0-9]{0,15})\.([0-9a-f]{16})$/;
export const TEMP_PREFIX = '~tmp.';

/** One entry as read: its bytes, its inode, and the record if readable. */
export interface Entry {
  seq: number;
  ino: bigint;
  bytes: Buffer;
  /** null: unreadable (torn, damaged, or newer). */
  record: FileLockRecord | null;
  /** > 0: written by a newer format version (never judged stale). */
  newerVersion: number;
}

const noop = () => {};
const errnoOf = (err: unknown) => (err as { code?: unknown } | null)?.code;

export class LockDirectory {
  readonly root: string;
  /** <root>/locks/lock.<volumeId> */
  readonly dir: string;
  readonly volumeId: string;
  readonly #log: Logger;
  #ready: Promise<void> | null = null;

  constructor(root: string, volumeId: string, log: Logger) {
    this.root = path.resolve(root);
    this.volumeId = volumeId;
    this.dir = path.join(this.root, LOCKS_DIR, lockObjectName(volumeId));
    this.#log = log;
  }

  /** Every name in the directory ([] when it does not exist). */
  async names(): Promise<string[]> {
    try {
      return await fsp.readdir(this.dir);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return [];
      throw err;
    }
  }

  requestPath(seq: number, token: string): string {
    return path.join(this.dir, `r.${seq}.${token}`);
  }

  entryPath(seq: number): string {
    return path.join(this.dir, `e.${seq}`);
  }

  /** mkdir -p <root>/locks/lock.<id>, fsyncing the parents of what it created. */
  ensure(): Promise<void> {
    this.#ready ??= (async () => {
      const locks = path.join(this.root, LOCKS_DIR);
      const first = await fsp.mkdir(this.dir, { recursive: true });
      if (first !== undefined) {
        if (path.resolve(first) === locks) await fsyncDir(this.root);
        await fsyncDir(locks);
      }
    })().catch((err: unknown) => {
      this.#ready = null;
      throw err;
    });
    return this.#ready;
  }

  /** One entry, read fresh (open → fstat → read → close: close-to-open on NFS); null when absent. */
  async readEntry(seq: number): Promise<Entry | null> {
    let fd: number;
    try {
      fd = await fdOpen(this.entryPath(seq), fs.constants.O_RDONLY);
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') return null;
      throw err;
    }
    try {
      const st = await new Promise<fs.BigIntStats>((resolve, reject) =>
        fs.fstat(fd, { bigint: true }, (err, s) => (err ? reject(err) : resolve(s))));
      const buf = Buffer.alloc(RECORD_SIZE + 1);
      let n = 0;
      for (;;) {
        const got = await fdRead(fd, buf, n, buf.length - n, n);
        if (got === 0 || (n += got) === buf.length) break;
      }
      const bytes = buf.subarray(0, n);
      const decoded = decodeRecord(bytes, this.volumeId, seq);
      return {
        seq, ino: st.ino, bytes,
        record: decoded.ok ? decoded.record : null,
        newerVersion: decoded.ok ? 0 : decoded.newerVersion,
      };
    } finally {
      await fdClose(fd).catch(noop);
    }
  }

  /**
   * The head: the highest entry. The listing gives a start; entries created
   * since are found by reading upward until one is absent.
   */
  async head(): Promise<Entry | null> {
    for (let round = 0; round < 8; round++) {
      let names: string[];
      try {
        names = await fsp.readdir(this.dir);
      } catch (err) {
        if (errnoOf(err) === 'ENOENT') return null;
        throw err;
      }
      let max = -1;
      for (const name of names) {
        const m = ENTRY.exec(name);
        if (m) max = Math.max(max, Number(m[1]));
      }
      if (max < 0) return null;
      let head = await this.readEntry(max);
      for (;;) {
        const next = await this.readEntry((head?.seq ?? max) + 1);
        if (!next) break;
        head = next;
      }
      if (head) return head;
      // the listed head vanished (a writer backed out of a resurrected entry): list again
    }
    throw new Error(`lock directory ${this.dir}: no stable head after 8 listings`);
  }

  /**
   * Creates e.<seq> holding `bytes`, exclusively: temp file, fsync, link,
   * fsync the directory. Null when e.<seq> exists already. With `keepFd`
   * the descriptor stays open (for renewals in place).
   */
  async create(seq: number, bytes: Buffer, keepFd: boolean): Promise<{ fd: number; ino: bigint } | null> {
    const temp = path.join(this.dir, TEMP_PREFIX + randomBytes(8).toString('hex'));
    const fd = await fdOpen(temp, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
    let linked = false;
    let ino = 0n;
    try {
      await writeAll(fd, bytes, 0);
      await fdSync(fd);
      linked = await linkExclusive(temp, this.entryPath(seq), fd);
      ino = (await fstatBig(fd)).ino;
    } catch (err) {
      await fdClose(fd).catch(noop);
      await fsp.unlink(temp).catch(noop);
      throw err;
    }
    await fsp.unlink(temp).catch(noop);
    if (!linked) {
      await fdClose(fd).catch(noop);
      return null;
    }
    await fsyncDir(this.dir);
    if (!keepFd) {
      await fdClose(fd).catch(noop);
      return { fd: -1, ino };
    }
    return { fd, ino };
  }

  /**
   * Appends e.<pred.seq+1> holding `bytes` after `pred`, then re-reads e.<pred.seq>:
   * it must still be exactly the bytes we acted on, else we back out (our
   * entry is removed) and return null. See "Resurrection" and "renews while
   * a contender takes over" in file-backend.ts.
   */
  async append(pred: Entry, bytes: Buffer, keepFd: boolean): Promise<{ fd: number; ino: bigint } | null> {
    const seq = pred.seq + 1;
    const created = await this.create(seq, bytes, keepFd);
    if (!created) return null;
    const check = await this.readEntry(pred.seq);
    // A free entry (release, break) may be built upon at once: the next
    // owner links e.<seq+1> and its compaction deletes our predecessor, all
    // before we get to read it here. Someone acting on our entry proves it
    // was the head when linked; backing out now would delete their
    // predecessor. (A held entry is never built upon before its claim
    // returns: nobody appends after a live holder.)
    if (!check && !keepFd && (await this.readEntry(seq + 1)) !== null) {
      void this.compact(seq).catch(noop);
      return created;
    }
    if (!check || !check.bytes.equals(pred.bytes)) {
      this.#log.debug(`lock: entry ${pred.seq} changed under us (${check ? 'rewritten' : 'gone'}): backing out of entry ${seq}`);
      await fsp.unlink(this.entryPath(seq)).catch(noop);
      if (created.fd >= 0) await fdClose(created.fd).catch(noop);
      return null;
    }
    void this.compact(seq).catch((err: unknown) => this.#log.debug(`lock: compaction: ${(err as Error).message}`));
    return created;
  }

  /**
   * Deletes entries below head − 1 in ascending order (so a deleted e.k
   * implies a deleted e.k−1: the resurrection check relies on it), requests
   * for older entries, and old temp files. Stops at the first gap.
   */
  async compact(head: number): Promise<void> {
    const names = await fsp.readdir(this.dir);
    const old: number[] = [];
    for (const name of names) {
      const e = ENTRY.exec(name);
      if (e && Number(e[1]) < head - 1) old.push(Number(e[1]));
      const r = REQUEST.exec(name);
      if (r && Number(r[1]) < head - 1) await fsp.unlink(path.join(this.dir, name)).catch(noop);
      if (name.startsWith(TEMP_PREFIX)) {
        const st = await fsp.stat(path.join(this.dir, name)).catch(() => null);
        if (st && Date.now() - st.mtimeMs > TEMP_MAX_AGE_MS) await fsp.unlink(path.join(this.dir, name)).catch(noop);
      }
    }
    old.sort((a, b) => a - b);
    if (old.length === 0 || (await this.readEntry(old[0]! - 1)) !== null) return;
    for (let i = 0; i < old.length; i++) {
      if (i > 0 && old[i] !== old[i - 1]! + 1) break;
      await fsp.unlink(this.entryPath(old[i]!)).catch(noop);
    }
  }
}

/**
 * link(temp, target), exclusive. On NFS a retransmitted LINK whose first
 * reply was lost reports EEXIST (or an error) although it succeeded: the
 * link count of our file (2 = temp + target) says what really happened.
 */
async function linkExclusive(temp: string, target: string, fd: number): Promise<boolean> {
  try {
    await fsp.link(temp, target);
    return true;
  } catch (err) {
    const nlink = await fstatBig(fd).then((st) => st.nlink, () => 0n);
    if (nlink === 2n) return true;
    if (errnoOf(err) === 'EEXIST') return false;
    throw err;
  }
}

function fstatBig(fd: number): Promise<fs.BigIntStats> {
  return new Promise((resolve, reject) => fs.fstat(fd, { bigint: true }, (err, st) => (err ? reject(err) : resolve(st))));
}

