/**
 * A Blocker that reports the duration and outcome of every operation of the
 * blocker it wraps, to a plain callback (the daemon turns it into metrics:
 * src/daemon/metrics.ts). The wrapper changes nothing else: same kind,
 * capabilities, results and errors.
 *
 *   caller ──▶ observed ──▶ inner blocker
 *                 └── onOp(op, durationNs, errorCode | null) once per call
 *
 * `list` is reported once its iteration ends (completed, failed, or left
 * early by the caller), with the time the whole iteration took. `close` is
 * not reported.
 *
 * Must not import anything above the blocker layer (no metrics library).
 */
import type { Blocker, BlockerCapabilities, ObjectStat } from './blocker.js';
import { BlockerError, type BlockerErrorCode } from './errors.js';

/** The operations reported, as label values. */
export const BLOCKER_OPS = ['read', 'write', 'replace', 'read_full', 'punch', 'remove', 'stat', 'list', 'sync'] as const;
export type BlockerOp = (typeof BLOCKER_OPS)[number];

/**
 * Told after each operation: its name, how long it took in nanoseconds, and
 * null on success or the error's code. Errors that are not BlockerErrors
 * (a backend breaking the contract) report 'EIO', as everything unknown is.
 * Called synchronously: keep it cheap, never throw.
 */
export type BlockerOpObserver = (op: BlockerOp, durationNs: number, errorCode: BlockerErrorCode | null) => void;

/** Wraps `inner` so that `onOp` hears of every operation. */
export function observeBlocker(inner: Blocker, onOp: BlockerOpObserver): Blocker {
  return new ObservedBlocker(inner, onOp);
}

function codeOf(err: unknown): BlockerErrorCode {
  return err instanceof BlockerError ? err.code : 'EIO';
}

class ObservedBlocker implements Blocker {
  constructor(private readonly inner: Blocker, private readonly onOp: BlockerOpObserver) {}

  get kind(): string { return this.inner.kind; }
  /** The inner blocker's, read each time (a blocker may turn a capability off). */
  get capabilities(): BlockerCapabilities { return this.inner.capabilities; }

  /** Runs one promise-returning operation and reports it. */
  private async timed<T>(op: BlockerOp, run: Promise<T>, start: bigint): Promise<T> {
    try {
      const result = await run;
      this.onOp(op, Number(process.hrtime.bigint() - start), null);
      return result;
    } catch (err) {
      this.onOp(op, Number(process.hrtime.bigint() - start), codeOf(err));
      throw err;
    }
  }

  // Each method takes the time before calling the inner blocker, so that the
  // synchronous part of its work is counted too.

  read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    const start = process.hrtime.bigint();
    return this.timed('read', this.inner.read(name, offset, length, target), start);
  }

  write(name: string, offset: number, data: Buffer): Promise<void> {
    const start = process.hrtime.bigint();
    return this.timed('write', this.inner.write(name, offset, data), start);
  }

  replace(name: string, data: Buffer): Promise<void> {
    const start = process.hrtime.bigint();
    return this.timed('replace', this.inner.replace(name, data), start);
  }

  readFull(name: string): Promise<Buffer> {
    const start = process.hrtime.bigint();
    return this.timed('read_full', this.inner.readFull(name), start);
  }

  punch(name: string, offset: number, length: number): Promise<void> {
    const start = process.hrtime.bigint();
    return this.timed('punch', this.inner.punch(name, offset, length), start);
  }

  remove(name: string): Promise<void> {
    const start = process.hrtime.bigint();
    return this.timed('remove', this.inner.remove(name), start);
  }

  stat(name: string): Promise<ObjectStat> {
    const start = process.hrtime.bigint();
    return this.timed('stat', this.inner.stat(name), start);
  }

  sync(names?: Iterable<string>): Promise<void> {
    const start = process.hrtime.bigint();
    return this.timed('sync', this.inner.sync(names), start);
  }

  async *list(prefix: string): AsyncIterable<string> {
    const start = process.hrtime.bigint();
    let code: BlockerErrorCode | null = null;
    try {
      yield* this.inner.list(prefix);
    } catch (err) {
      code = codeOf(err);
      throw err;
    } finally {
      this.onOp('list', Number(process.hrtime.bigint() - start), code);
    }
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
