/**
 * The object-store contract every backend meets (file, rados, memory).
 *
 * An object store holds named objects of bytes in one flat namespace. Blockers
 * know nothing of volumes or maps (DESIGN.md §2): the mapper names objects and
 * the composer addresses byte ranges inside them.
 *
 * Durability: `write` and `writeFull` may sit in a volatile cache until `sync`
 * (file) or may be durable on completion (RADOS: `capabilities.durableWrites`).
 * `sync(names)` makes durable the data of every write to those objects that
 * completed before the call, and their existence (directory entries). `replace`
 * is atomic and durable on completion: readers see the old or the new content,
 * never a mix, also after a power cut. Metadata (map headers and chunks) is
 * written with `replace`.
 *
 * Errors: methods reject with `BlockerError` (see errors.ts) carrying one of a
 * small set of errno-style codes. Callers may rely on `ENOENT` for absent
 * objects; everything else is a failure to report.
 *
 * Names: 1 to 255 bytes of UTF-8, any characters ('/' and '..' included, they
 * are not paths); others reject EINVAL. A backend may also reject (EINVAL) a
 * name it cannot store — the file blocker percent-encodes bytes outside
 * [A-Za-z0-9._-] and needs the result to fit in 255 bytes. Names made of
 * [A-Za-z0-9._-] only (all DESIGN.md §3 uses) are accepted everywhere.
 */

export interface BlockerCapabilities {
  /** Writes are durable when they complete (RADOS); `sync` is then a barrier only. */
  durableWrites: boolean;
  /** Objects may be sparse: unwritten ranges cost no space and read as zeros. */
  sparse: boolean;
  /** `punch` frees space (else callers write zeros). */
  punch: boolean;
}

export interface ObjectStat {
  /** Bytes from 0 to the end of the last write. */
  size: number;
}

export interface Blocker {
  /** Short identifier for logs and metrics: 'file', 'rados', 'memory'. */
  readonly kind: string;
  readonly capabilities: BlockerCapabilities;

  /**
   * Reads `length` bytes at `offset` into `target` (which has room for them) and
   * resolves with the number of bytes that exist there; bytes past the object's
   * end are left untouched so the caller can zero-fill. Rejects ENOENT when the
   * object does not exist.
   */
  read(name: string, offset: number, length: number, target: Buffer): Promise<number>;

  /**
   * Writes `data` at `offset`, creating the object if needed. Not durable until
   * `sync` unless `capabilities.durableWrites`. `data` may be a view the caller
   * reuses after the promise resolves.
   */
  write(name: string, offset: number, data: Buffer): Promise<void>;

  /** Atomically replaces the whole object with `data`, durably (temp + fsync + rename). */
  replace(name: string, data: Buffer): Promise<void>;

  /** Reads a whole object (metadata). Rejects ENOENT when absent. */
  readFull(name: string): Promise<Buffer>;

  /**
   * Makes the range read as zeros, freeing space where possible. The object's
   * size does not change (the part of the range past the end is ignored).
   * Rejects ENOENT when the object does not exist.
   */
  punch(name: string, offset: number, length: number): Promise<void>;

  /** Deletes the object. Resolves (no error) when it is already absent. */
  remove(name: string): Promise<void>;

  /** Rejects ENOENT when absent. */
  stat(name: string): Promise<ObjectStat>;

  /** Every object name that starts with `prefix`, in no particular order. */
  list(prefix: string): AsyncIterable<string>;

  /**
   * Makes durable every completed write to the named objects (data and, for new
   * objects, their names). With no argument: everything written so far.
   */
  sync(names?: Iterable<string>): Promise<void>;

  /** Flushes what is dirty, releases descriptors and connections. Idempotent. */
  close(): Promise<void>;
}
