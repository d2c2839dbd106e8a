/**
 * The bytes in flight over every connection of the process: the payloads
 * of WRITEs and the data of READs, from the moment a request is admitted
 * until its reply is queued (transmission.ts).
 *
 * Why: each connection has its own caps, but 64 connections each within a
 * generous cap can still hold gigabytes; the resident set must stay bounded
 * whatever the number of clients.
 *
 * Admission, at the request header, before a WRITE's payload is read (it
 * stays in the kernel's socket buffer meanwhile): a request is admitted when
 * its bytes fit under `limit`, or when nothing at all is in flight (so a
 * request larger than the whole budget still runs, alone). Otherwise its
 * connection stops reading and queues; as bytes are released, queued
 * requests are admitted strictly in the order they queued (first in, first
 * out), so a large request is never overtaken forever by small ones and a
 * busy connection cannot starve a quiet one. The total therefore never
 * passes max(limit, the largest request).
 *
 * No deadlock: a queued connection holds nothing of the budget for the
 * request it waits with, and every admitted request ends (its reply is
 * queued, or it fails, or the backend's timeout fails it), releasing bytes.
 */

/** A connection waiting for the budget with one request. */
export interface BudgetWaiter {
  /** Called once `bytes` were taken for it: it goes on with that request. */
  admitted(bytes: number): void;
}

export class InflightBudget {
  #used = 0;
  /** Queued requests, oldest first. */
  #queue: Array<{ waiter: BudgetWaiter; bytes: number }> = [];
  #head = 0;

  /** `limit`: bytes in flight over which requests wait (Infinity: no limit). */
  constructor(readonly limit: number) {
    if (!(limit > 0)) throw new RangeError(`in-flight budget must be positive, got ${limit}`);
  }

  /** Bytes in flight now. */
  get used(): number {
    return this.#used;
  }

  /** Requests waiting now. */
  get waiting(): number {
    return this.#queue.length - this.#head;
  }

  /**
   * Takes `bytes` for a request when it may start now: nobody queued before
   * it, and it fits (or nothing is in flight). Otherwise takes nothing and
   * returns false; the caller then queues with wait().
   */
  tryTake(bytes: number): boolean {
    if (this.waiting > 0 || !this.#fits(bytes)) return false;
    this.#used += bytes;
    return true;
  }

  /** Queues a request that tryTake() refused; `w.admitted()` is called once its bytes are taken. */
  wait(w: BudgetWaiter, bytes: number): void {
    this.#queue.push({ waiter: w, bytes });
  }

  /** Releases the bytes of a request that ended; admits queued requests, in order, while they fit. */
  release(bytes: number): void {
    this.#used -= bytes;
    this.#admit();
  }

  /** A connection that ended no longer waits (its queued request is dropped). */
  forget(w: BudgetWaiter): void {
    const before = this.waiting;
    this.#queue = this.#queue.slice(this.#head).filter((q) => q.waiter !== w);
    this.#head = 0;
    // The head of the queue may have been the one blocking the others.
    if (this.waiting !== before) this.#admit();
  }

  #fits(bytes: number): boolean {
    return this.#used === 0 || this.#used + bytes <= this.limit;
  }

  #admit(): void {
    while (this.#head < this.#queue.length) {
      const q = this.#queue[this.#head]!;
      if (!this.#fits(q.bytes)) break;
      this.#used += q.bytes;
      this.#queue[this.#head++] = undefined as never; // let it go before the callback runs
      if (this.#head === this.#queue.length) {
        this.#queue = [];
        this.#head = 0;
      }
      q.waiter.admitted(q.bytes);
    }
  }
}

/**
 * The default: 16 MiB over all connections, twice what one connection of
 * 1 MiB requests at queue depth 8 holds (docs/benchmarks.md, memory).
 */
export const DEFAULT_INFLIGHT_BUDGET_BYTES = 16 * 1024 * 1024;

/** The budget shared by every connection of the process unless a server is given its own. */
export const processInflightBudget = new InflightBudget(DEFAULT_INFLIGHT_BUDGET_BYTES);
