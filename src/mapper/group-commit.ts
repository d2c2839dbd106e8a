/**
 * Group commit of a "write the current state" operation (used for the volume
 * header).
 *
 *   request() ──▶ no run in flight?  start a run now ─────────────▶ resolves with it
 *             └─▶ run in flight?     join the NEXT run (one at most,
 *                                    started when the current ends) ▶ resolves with it
 *
 * The run function must capture the state it writes synchronously, before its
 * first await: then every request is satisfied by a run that started after the
 * request was made, so it saw the requester's change, and however many
 * requests arrive during a run they cost one more write, not one each. A failed
 * run rejects only its own requesters; the next run tries again.
 *
 * No imports.
 */

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class GroupCommit {
  readonly #run: () => Promise<void>;
  #running: Promise<void> | null = null;
  #next: Deferred | null = null;
  #runs = 0;

  constructor(run: () => Promise<void>) {
    this.#run = run;
  }

  /** Number of runs started so far (tests and metrics). */
  get runs(): number {
    return this.#runs;
  }

  get busy(): boolean {
    return this.#running !== null;
  }

  /** Resolves when a run that started after this call has completed. */
  request(): Promise<void> {
    if (this.#running === null) return this.#start();
    if (this.#next === null) {
      let resolve!: () => void;
      let reject!: (err: unknown) => void;
      const promise = new Promise<void>((res, rej) => { resolve = res; reject = rej; });
      this.#next = { promise, resolve, reject };
    }
    return this.#next.promise;
  }

  /** Resolves once nothing is running or queued (errors are the requesters' business). */
  async idle(): Promise<void> {
    while (this.#running !== null) await this.#running.catch(() => undefined);
  }

  #start(): Promise<void> {
    this.#runs++;
    let run: Promise<void>;
    try {
      run = this.#run();
    } catch (err) {
      run = Promise.reject(err);
    }
    this.#running = run;
    const done = (): void => {
      this.#running = null;
      const next = this.#next;
      if (next !== null) {
        this.#next = null;
        this.#start().then(next.resolve, next.reject);
      }
    };
    run.then(done, done);
    return run;
  }
}
