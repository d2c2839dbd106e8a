/**
 * A Blocker that refuses to change anything unless its volume's lock is
 * held at that very moment: every write, replace, punch and remove first
 * calls `lock.assertHeld()` (synchronous: owner, and on files the lease
 * deadline still ahead by the monotonic clock), and an operation the store
 * refuses with EFENCED (RADOS: we were blocklisted) turns the lock lost.
 * Reads, stat, list and sync pass through: reads never need the lock
 * (DESIGN.md §4), and sync only makes durable what was written under it.
 *
 *   volume's map + data ──▶ guarded ──▶ store.maps / store.data
 *                             └── lock.assertHeld() before each change
 *
 * Why per storage call and not once per request: a request may be several
 * calls (copy-up: read, write, sync, map chunk, header). A process paused
 * between two of them (SIGSTOP, a stalled event loop) must not issue the
 * next one after its lease ran out; test/integration/locks-file.test.ts
 * shows a multi-step write doing exactly that when checked only at its
 * start. What this cannot stop: a call already handed to the kernel or the
 * libuv pool when the pause began (docs/locks.md: the residual window).
 *
 * Each guarded blocker is per volume (its lock); the inner blocker may be
 * shared. close() does not close the inner blocker.
 */
import type { Blocker, BlockerCapabilities, ObjectStat } from '../blockers/blocker.js';
import { isFencedError } from './errors.js';

/** What the guard needs of a VolumeLock. */
export interface LockGuard {
  assertHeld(): void;
  reportFenced(cause?: unknown): void;
}

export function guardBlocker(inner: Blocker, lock: LockGuard): Blocker {
  return new GuardedBlocker(inner, lock);
}

class GuardedBlocker implements Blocker {
  constructor(private readonly inner: Blocker, private readonly lock: LockGuard) {}

  get kind(): string { return this.inner.kind; }
  get capabilities(): BlockerCapabilities { return this.inner.capabilities; }

  /** Checks the lock, then runs the change; a fenced refusal makes the lock lost. */
  private change<T>(run: () => Promise<T>): Promise<T> {
    try {
      this.lock.assertHeld();
    } catch (err) {
      return Promise.reject(err);
    }
    return run().catch((err: unknown) => {
      if (isFencedError(err)) this.lock.reportFenced(err);
      throw err;
    });
  }

  read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    return this.inner.read(name, offset, length, target);
  }

  write(name: string, offset: number, data: Buffer): Promise<void> {
    return this.change(() => this.inner.write(name, offset, data));
  }

  replace(name: string, data: Buffer): Promise<void> {
    return this.change(() => this.inner.replace(name, data));
  }

  readFull(name: string): Promise<Buffer> {
    return this.inner.readFull(name);
  }

  punch(name: string, offset: number, length: number): Promise<void> {
    return this.change(() => this.inner.punch(name, offset, length));
  }

  remove(name: string): Promise<void> {
    return this.change(() => this.inner.remove(name));
  }

  stat(name: string): Promise<ObjectStat> {
    return this.inner.stat(name);
  }

  list(prefix: string): AsyncIterable<string> {
    return this.inner.list(prefix);
  }

  sync(names?: Iterable<string>): Promise<void> {
    return this.inner.sync(names);
  }

  /** The inner blocker belongs to the store: nothing to close here. */
  async close(): Promise<void> {}
}
