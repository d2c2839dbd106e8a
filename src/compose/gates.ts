/**
 * Per-object gates: many shared holders (I/O inside an object the volume
 * owns) or one exclusive holder (anything that changes which object an index
 * maps to: allocation, copy-up, unmapping). FIFO, so a waiting exclusive
 * holder is not starved by a stream of shared ones.
 *
 * Why: without it, a write into an owned object could race a trim that
 * unmaps and deletes that object, recreating it behind the map's back; the
 * next allocation of that index would then inherit stale bytes.
 *
 * Cost on the fast path: one Map lookup and, for a busy object, one small
 * record. Gates exist only while held.
 */

interface Gate {
  shared: number;
  exclusive: boolean;
  waiters: Array<{ exclusive: boolean; grant: () => void }>;
}

export class ObjectGates {
  private readonly gates = new Map<number, Gate>();

  /** Number of objects with a gate held or awaited (tests, metrics). */
  get busy(): number {
    return this.gates.size;
  }

  acquireShared(index: number): Promise<void> | undefined {
    const g = this.gates.get(index);
    if (g === undefined) {
      this.gates.set(index, { shared: 1, exclusive: false, waiters: [] });
      return undefined;
    }
    if (!g.exclusive && g.waiters.length === 0) {
      g.shared++;
      return undefined;
    }
    return new Promise((resolve) => g.waiters.push({ exclusive: false, grant: resolve }));
  }

  acquireExclusive(index: number): Promise<void> | undefined {
    const g = this.gates.get(index);
    if (g === undefined) {
      this.gates.set(index, { shared: 0, exclusive: true, waiters: [] });
      return undefined;
    }
    return new Promise((resolve) => g.waiters.push({ exclusive: true, grant: resolve }));
  }

  releaseShared(index: number): void {
    const g = this.gates.get(index)!;
    g.shared--;
    if (g.shared === 0) this.next(index, g);
  }

  releaseExclusive(index: number): void {
    const g = this.gates.get(index)!;
    g.exclusive = false;
    this.next(index, g);
  }

  /** Hands the free gate to the next waiter(s): one exclusive, or every shared at the head. */
  private next(index: number, g: Gate): void {
    if (g.waiters.length === 0) {
      this.gates.delete(index);
      return;
    }
    if (g.waiters[0]!.exclusive) {
      g.exclusive = true;
      g.waiters.shift()!.grant();
      return;
    }
    while (g.waiters.length && !g.waiters[0]!.exclusive) {
      g.shared++;
      g.waiters.shift()!.grant();
    }
  }
}
