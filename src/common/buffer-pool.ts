/**
 * Reusable I/O buffers: the payloads of NBD WRITEs gathered from several
 * socket chunks (nbd/transmission.ts) and the data of READs
 * (compose/volume.ts reads into them, nbd/transmission.ts gives them back
 * once the socket has taken the reply).
 *
 * Why: a fresh 1 MiB Buffer per request costs a malloc (an mmap at that
 * size), page faults on first touch and, as external memory, frequent full
 * garbage collections; profiles of 1 MiB writes showed a fifth of the main
 * thread in GC. Buffers come in power-of-two classes from 4 KiB up; a
 * request gets a view of the exact length on a buffer of its class.
 *
 * Safety: a buffer goes back to the pool only when nothing can still use it
 * — a WRITE payload when the export's write resolved (the Export contract:
 * the data is not kept past the promise), a READ buffer when the socket
 * write of the reply completed. A buffer whose operation failed is never
 * given back: a timed-out pwrite or librados read may still be using it
 * (blockers/timeout.ts), and Promise.all in the composer rejects while other
 * extents of the same request may still be running. Such buffers are left to
 * the garbage collector; give() ignores anything it did not hand out.
 *
 * Memory: free buffers are bounded in total (`maxFreeBytes`); a buffer given
 * back beyond that is dropped. Buffers larger than `maxPooled` bytes are
 * allocated fresh and never pooled.
 */

const MIN_CLASS_LOG2 = 12; // 4 KiB

export interface BufferPoolOptions {
  /** Smaller requests get a plain Buffer.allocUnsafe, never pooled (default 4 KiB: all are pooled). */
  minPooled?: number;
  /** Largest buffer kept for reuse (default 4 MiB). */
  maxPooled?: number;
  /** Bytes of free buffers kept at most, over all classes (default 8 MiB). */
  maxFreeBytes?: number;
}

export class BufferPool {
  /** Free ArrayBuffers per class (index: log2 of the size). */
  readonly #free: ArrayBuffer[][] = [];
  /** Buffers handed out by take() and not given back: give() accepts only these, once. */
  readonly #out = new WeakSet<ArrayBuffer>();
  #freeBytes = 0;
  /** take() of fewer bytes returns a plain buffer; give() is then a no-op (callers may skip it). */
  readonly minPooled: number;
  readonly #maxPooled: number;
  readonly #maxFreeBytes: number;

  constructor(o: BufferPoolOptions = {}) {
    this.minPooled = o.minPooled ?? 2 ** MIN_CLASS_LOG2;
    this.#maxPooled = o.maxPooled ?? 4 * 1024 * 1024;
    this.#maxFreeBytes = o.maxFreeBytes ?? 8 * 1024 * 1024;
  }

  /** Bytes held in free buffers now (tests, memory accounting). */
  get freeBytes(): number {
    return this.#freeBytes;
  }

  /** A buffer of exactly `length` bytes, uninitialised; pass it to give() when it is safe to reuse. */
  take(length: number): Buffer {
    if (length < this.minPooled) return Buffer.allocUnsafe(length);
    if (length > this.#maxPooled) return Buffer.allocUnsafeSlow(length);
    const c = classOf(length);
    let ab = this.#free[c]?.pop();
    if (ab === undefined) ab = new ArrayBuffer(2 ** c);
    else this.#freeBytes -= ab.byteLength;
    this.#out.add(ab);
    return Buffer.from(ab, 0, length);
  }

  /**
   * Returns a buffer from take() for reuse. Only once nothing can read or
   * write it any more (see the file comment). A buffer that did not come
   * from take(), or was given back already, is ignored.
   */
  give(buf: Buffer): void {
    const ab = buf.buffer as ArrayBuffer;
    if (!this.#out.delete(ab)) return;
    const size = ab.byteLength;
    if (this.#freeBytes + size > this.#maxFreeBytes) return;
    const c = Math.log2(size);
    (this.#free[c] ??= []).push(ab);
    this.#freeBytes += size;
  }
}

/** The class (log2 of the buffer size) for `length` bytes. */
function classOf(length: number): number {
  return Math.max(MIN_CLASS_LOG2, Math.ceil(Math.log2(Math.max(1, length))));
}

/** Free READ buffers kept: as many bytes as the NBD layer's in-flight budget (nbd/inflight-budget.ts) lets be read at once. */
const READ_POOL_FREE_BYTES = 16 * 1024 * 1024;

/**
 * READ buffers, shared by the composer (which fills them) and the NBD layer
 * (which gives them back after sending): one pool per process. A fresh 4 KiB
 * buffer per read is a new ArrayBuffer (too large for Node's slab), and their
 * churn drove frequent full GCs under random reads.
 */
export const readBuffers = new BufferPool({ maxFreeBytes: READ_POOL_FREE_BYTES });
