/**
 * The RADOS blocker: the Blocker contract (../blocker.ts) over one pool of a
 * Ceph cluster, through our librados binding (./binding.ts).
 *
 * What RADOS gives and what we rely on:
 * - A write is acknowledged once it is durable on every replica the pool
 *   requires, so `capabilities.durableWrites` is true and `sync` is a barrier
 *   with nothing to wait for: no extra round trip on FLUSH (DESIGN.md §4).
 * - `write_full` replaces an object atomically, which is what `replace`
 *   (map headers and chunks) needs; readers see the old or the new bytes.
 * - Objects are sparse; zeroing a range frees its space on BlueStore.
 *
 * Every operation is one librados call, so concurrency is what the caller
 * asks for; the composer's per-object gates order conflicting I/O.
 */
import type { Blocker, BlockerCapabilities, ObjectStat } from '../blocker.js';
import { BlockerError, checkObjectName, type BlockerErrorCode } from '../errors.js';
import { RadosError, type RadosCluster, type RadosIoCtx } from './binding.js';
import { refreshOsdmap } from './osdmap.js';

const ETIMEDOUT = 110;

/** How many names one listing round trip fetches. */
const LIST_BATCH = 1024;

export class RadosBlocker implements Blocker {
  readonly kind = 'rados';
  readonly capabilities: BlockerCapabilities = { durableWrites: true, sparse: true, punch: true };
  #closing: Promise<void> | undefined;

  /**
   * `ioctx` is the open pool; the blocker closes it on `close()`. `cluster`:
   * after a request timed out, the newest osdmap is fetched from it (osdmap.ts).
   */
  constructor(readonly ioctx: RadosIoCtx, private readonly cluster?: Pick<RadosCluster, 'waitForLatestOsdmap'>) {}

  /** The blocker error for a failed librados call; a timeout also fetches the newest osdmap. */
  #error(err: unknown, op: string, name: string): BlockerError {
    if (this.cluster && err instanceof RadosError && err.errno === ETIMEDOUT) refreshOsdmap(this.cluster);
    return toBlockerError(err, op, name);
  }

  /** The pool this blocker stores its objects in. */
  get pool(): string {
    return this.ioctx.pool;
  }

  async read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    this.#check('read', name);
    try {
      return await this.ioctx.read(name, offset, length, target);
    } catch (err) {
      throw this.#error(err, 'read', name);
    }
  }

  async write(name: string, offset: number, data: Buffer): Promise<void> {
    this.#check('write', name);
    try {
      await this.ioctx.write(name, offset, data);
    } catch (err) {
      throw this.#error(err, 'write', name);
    }
  }

  async replace(name: string, data: Buffer): Promise<void> {
    this.#check('replace', name);
    try {
      await this.ioctx.writeFull(name, data);
    } catch (err) {
      throw this.#error(err, 'replace', name);
    }
  }

  async readFull(name: string): Promise<Buffer> {
    this.#check('readFull', name);
    try {
      return await this.ioctx.readFull(name);
    } catch (err) {
      throw this.#error(err, 'readFull', name);
    }
  }

  async punch(name: string, offset: number, length: number): Promise<void> {
    this.#check('punch', name);
    try {
      // The contract keeps the size: zero only what lies inside the object
      // (the binding's zero extends an object to cover a range past its end;
      // a bare RADOS zero reaching the end would truncate it instead). The
      // caller holds the object exclusively (composer gates), so the size
      // cannot change between the stat and the zero.
      const { size } = await this.ioctx.stat(name);
      const end = Math.min(offset + length, size);
      if (end > offset) await this.ioctx.zero(name, offset, end - offset);
    } catch (err) {
      throw this.#error(err, 'punch', name);
    }
  }

  async remove(name: string): Promise<void> {
    this.#check('remove', name);
    try {
      await this.ioctx.remove(name);
    } catch (err) {
      if (err instanceof RadosError && err.errno === ENOENT) return;
      throw this.#error(err, 'remove', name);
    }
  }

  async stat(name: string): Promise<ObjectStat> {
    this.#check('stat', name);
    try {
      const { size } = await this.ioctx.stat(name);
      return { size };
    } catch (err) {
      throw this.#error(err, 'stat', name);
    }
  }

  async *list(prefix: string): AsyncIterable<string> {
    if (this.#closing) throw closedError('list', prefix);
    const listing = this.ioctx.list();
    try {
      for (;;) {
        let batch: string[];
        try {
          batch = await listing.next(LIST_BATCH);
        } catch (err) {
          throw this.#error(err, 'list', prefix);
        }
        if (batch.length === 0) return;
        for (const name of batch) if (name.startsWith(prefix)) yield name;
      }
    } finally {
      listing.close();
    }
  }

  /** Completed writes are already durable in RADOS: a barrier with nothing to wait for. */
  async sync(names?: Iterable<string>): Promise<void> {
    if (this.#closing) throw closedError('sync', this.pool);
    if (names) for (const name of names) this.#check('sync', name);
  }

  /** Waits for operations in flight, then releases the pool. */
  close(): Promise<void> {
    this.#closing ??= this.ioctx.close();
    return this.#closing;
  }

  #check(op: string, name: string): void {
    if (this.#closing) throw closedError(op, name);
    checkObjectName(op, name);
    // librados takes C strings: a NUL would silently name another object.
    if (name.includes('\0')) throw new BlockerError('EINVAL', op, name, 'object name contains NUL');
  }
}

const ENOENT = 2;

function closedError(op: string, name: string): BlockerError {
  return new BlockerError('EIO', op, name, 'the RADOS blocker is closed');
}

/** librados errno (positive) → our blocker error class. */
export function codeOfRadosErrno(errno: number): BlockerErrorCode {
  switch (errno) {
    case 2: // ENOENT
      return 'ENOENT';
    case 27: // EFBIG: over osd_max_object_size
    case 28: // ENOSPC: pool or cluster full
    case 122: // EDQUOT: pool quota
      return 'ENOSPC';
    case 95: // EOPNOTSUPP
      return 'ENOTSUP';
    case 108: // ESHUTDOWN: this client is blocklisted
      return 'EFENCED';
    case 110: // ETIMEDOUT: rados_osd_op_timeout expired
      return 'ETIMEDOUT';
    case 22: // EINVAL
    case 36: // ENAMETOOLONG
      return 'EINVAL';
    default:
      return 'EIO';
  }
}

function toBlockerError(err: unknown, op: string, name: string): BlockerError {
  if (err instanceof BlockerError) return err;
  const why = err instanceof Error ? err.message : String(err);
  const code = err instanceof RadosError ? codeOfRadosErrno(err.errno) : 'EIO';
  return new BlockerError(code, op, name, why, { cause: err });
}
