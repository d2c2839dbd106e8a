/**
 * Batched pwrites for the file blocker: every write started in one turn of
 * the event loop is handed to the thread pool as one job (the addon's
 * writeBatch, file-addon.ts), instead of one job per write.
 *
 * Why: queueing a job wakes a pool thread, and its completion wakes the
 * loop; for a 4 KiB write into the page cache those wake-ups cost far more
 * than the pwrite (docs/benchmarks.md: about 60 % of the main thread).
 * fdatasyncs are NOT batched: one job per file lets the waits of many files
 * overlap; a batch serialized them (a FLUSH of 32 objects took 29 ms instead
 * of 4).
 *
 * Semantics are those of writeAll (file-io.ts): each write's promise
 * resolves once all of its bytes are written, or rejects with an errno
 * error; writes of one batch run in the order they were started. Large writes are not batched (writeAll, one job
 * each): their copy is long enough that running them side by side on
 * several pool threads pays.
 */
import { getSystemErrorName } from 'node:util';
import type { FileAddon } from './file-addon.js';

/** Writes up to this size are batched. */
export const BATCH_MAX_WRITE = 256 * 1024;
/** Writes per pool job: a long batch is split so that two pool threads can share it. */
const OPS_PER_JOB = 16;

interface Pending {
  resolve: () => void;
  reject: (err: Error) => void;
}

export class WriteBatcher {
  #fds: number[] = [];
  #buffers: Buffer[] = [];
  #positions: number[] = [];
  #pending: Pending[] = [];
  #scheduled = false;

  constructor(private readonly addon: FileAddon) {}

  /** Writes all of `data` at `position` of `fd` (at most BATCH_MAX_WRITE bytes). */
  write(fd: number, data: Buffer, position: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.#fds.push(fd);
      this.#buffers.push(data);
      this.#positions.push(position);
      this.#pending.push({ resolve, reject });
      if (!this.#scheduled) {
        this.#scheduled = true;
        // After this turn's I/O callbacks: every write they started goes in.
        setImmediate(flush, this);
      }
    });
  }

  /** @internal */
  flush(): void {
    this.#scheduled = false;
    const fds = this.#fds, buffers = this.#buffers, positions = this.#positions, pending = this.#pending;
    this.#fds = [];
    this.#buffers = [];
    this.#positions = [];
    this.#pending = [];
    for (let start = 0; start < fds.length; start += OPS_PER_JOB) {
      const end = Math.min(fds.length, start + OPS_PER_JOB);
      const whole = start === 0 && end === fds.length;
      const mine = whole ? pending : pending.slice(start, end);
      let job: Promise<number[]>;
      try {
        job = this.addon.writeBatch(whole ? fds : fds.slice(start, end), whole ? buffers : buffers.slice(start, end),
          whole ? positions : positions.slice(start, end));
      } catch (err) {
        for (const p of mine) p.reject(err as Error);
        continue;
      }
      job.then((results) => {
        for (let i = 0; i < mine.length; i++) {
          const r = results[i]!;
          if (r === 0) mine[i]!.resolve();
          else mine[i]!.reject(errnoError(r, 'pwrite'));
        }
      }, (err: Error) => { for (const p of mine) p.reject(err); });
    }
  }
}

function flush(b: WriteBatcher): void {
  b.flush();
}

/** An Error like fs's for a negative errno: `code` is its name ('ENOSPC', 'EIO', …). */
function errnoError(errno: number, syscall: string): Error {
  let code: string;
  try {
    code = getSystemErrorName(errno);
  } catch {
    code = 'EIO';
  }
  return Object.assign(new Error(`${syscall}: ${code}`), { code, errno, syscall });
}
