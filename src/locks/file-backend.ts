/**
 * The file lock: a per-volume lock on a (possibly shared) file system, for
 * the file store (DESIGN.md §4: "an atomic lock file with owner identity and
 * a lease"). The Blocker contract has no compare-and-swap, so this works
 * with fs calls directly under the FileBlocker's root.
 *
 * Layout (docs/format.md §13.2): the lock object `lock.<volumeId>` is the
 * directory <root>/locks/lock.<volumeId>/ holding
 *
 *   e.<seq>           entries: the lock's history, one record each (file-record.ts)
 *   r.<seq>.<token>   handover requests to the holder of e.<seq>
 *   ~tmp.<random>     entries being written (then linked into place)
 *
 * The entry with the highest seq (the head) is the lock's state: `held` by
 * the owner it names, or `free`. Every change of ownership, and only that,
 * appends e.<head+1>, created exclusively: written to a temp file, fsynced,
 * then link()ed to its name (EEXIST: someone else changed it first). So the
 * entry numbers are a compare-and-swap: for each seq exactly one writer ever
 * wins, and a writer acts only on the head it read.
 *
 *   take a free lock:      head e.n free            → link e.n+1 held by me
 *   release:               head e.n held by me      → link e.n+1 free
 *   take over a dead one:  head e.n held, unchanged  → link e.n+1 held by me
 *                          for lease + margin
 *   break (operator):      same, but e.n+1 free
 *
 * The lease. The owner rewrites its entry in place (pwrite + fsync, same
 * size) every renewMs, bumping a counter. From the start t0 of its last
 * renewal that succeeded it may write until t0 + lease − margin by its own
 * monotonic clock (validUntil; VolumeLock.checkHeld() compares with it before
 * every write); past that it stops all I/O (state lost) and never renews
 * again. A contender declares the holder dead only after it has seen the
 * entry byte-for-byte unchanged for lease + margin by ITS own monotonic
 * clock. Durations, never timestamps: skew between nodes does not matter.
 * Why that is enough: the bytes first seen at r1 were written by a renewal
 * that started at t0 ≤ r1, so the owner stopped by t0 + lease − margin ≤
 * r1 + lease − margin, and the contender acts at ≥ r1 + lease + margin:
 * 2 × margin later (margin covers clock rate differences and scheduling).
 *
 * Races, and why each is safe (docs/locks.md has the long form):
 * - Two contenders take over the same stale entry: both link e.n+1; one
 *   gets EEXIST and reads the winner's fresh entry as the new head.
 * - The owner renews while a contender takes over: the contender's verdict
 *   needs lease + margin without a visible renewal, so the owner's validity
 *   ended 2 × margin before. A renewal still in flight (issued before the
 *   deadline, delayed) that lands after the contender linked e.n+1 changes
 *   e.n, which the contender re-reads right after linking: changed → it
 *   removes its e.n+1 and waits again (liveness only). The late renewal
 *   never revives the owner: its validity counts from the renewal's start.
 * - A paused owner (SIGSTOP, a stalled event loop) that wakes after its
 *   lease: CLOCK_MONOTONIC ran on during the pause, so checkHeld() is false
 *   before any write is issued, and the lease timer turns the state lost.
 *   What cannot be recalled: a write issued before the pause and still
 *   queued (libuv pool, NFS client cache) — the margin covers ordinary
 *   delays, not a pause between check and syscall. Only storage-side
 *   fencing (RADOS) closes that.
 * - System suspend stops CLOCK_MONOTONIC; each renewal compares it with the
 *   boot-time clock (os.uptime) and gives the lock up when they diverge.
 * - Resurrection: old entries are deleted (compaction keeps head and
 *   head − 1, deleting in ascending order), so a contender that slept
 *   through several changes could re-create a deleted e.k. After every link
 *   the writer re-reads e.k−1 and requires exactly the bytes it acted on;
 *   entries carry a random token, so a deleted or re-created predecessor
 *   never matches, and it backs out.
 * - Release racing a takeover: release links e.n+1 free; EEXIST means we
 *   were taken over (our lease had run out) → LockLostError.
 *
 * Handover: a requester creates r.<n>.<token>; the owner looks for requests
 * every pollMs (and at once on an fs.watch event where inotify sees the
 * change: same host), the handler drains and persists, the owner releases
 * (e.n+1 free), and the requester, polling the head every pollMs (or woken
 * by fs.watch), links e.n+2. Latency: about one drain plus two fsync'ed
 * link()s with fs.watch; add up to 2 × pollMs without it (NFS clients on
 * other hosts, which inotify does not see).
 *
 * Requirements on the file system: link() and O_EXCL atomic (NFSv3+: a
 * link() reply lost and retransmitted is checked through the link count),
 * close-to-open consistency (no `nocto`); fsync works. No rename() is
 * needed: a rename would take a stale lock away without knowing whether it
 * is still the one judged stale (the classic stale-lock race).
 *
 * The directory's primitives (read, head, append by link, compact) are in
 * file-dir.ts; the records in file-record.ts.
 *
 * Imports the blocker layer's fs helpers and the lock layer.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fdClose, fdSync, writeAll } from '../blockers/file-io.js';
import { silentLogger, type Logger } from '../common/log.js';
import { LockBusyError, LockLostError, LockStateError } from './errors.js';
import { LockDirectory, REQUEST, type Entry } from './file-dir.js';
import { decodeRequest, encodeRecord, encodeRequest, type FileLockRecord } from './file-record.js';
import {
  checkIdentity, type Acquirer, type Attempt, type Holder, type LockBackend, type LockIdentity, type LockOwner,
  type LockSink, type ProbeResult,
} from './types.js';

export { LOCKS_DIR } from './file-dir.js';

export const FILE_LOCK_DEFAULTS = { leaseMs: 10_000, renewMs: 2_000, marginMs: 2_000, pollMs: 100 } as const;

export interface FileLockOptions {
  /** The lease, ms (default 10 s). */
  leaseMs?: number;
  /** Renewal interval, ms (default 2 s); at least two renewals must fit in lease − margin. */
  renewMs?: number;
  /** Safety margin, ms (default 2 s): the owner stops margin early, contenders wait margin longer. */
  marginMs?: number;
  /** Request polling by the owner and head polling by contenders, ms (default 100). */
  pollMs?: number;
  /** fs.watch the lock directory to react at once (same host); polling stays. Default true. */
  watch?: boolean;
  log?: Logger;
  /** Monotonic clock, ms (default performance.now). Disables the suspend check when given. */
  now?: () => number;
}

interface FileHolder extends Holder {
  entry: Entry;
}

interface HeldEntry {
  seq: number;
  token: string;
  fd: number;
  ino: bigint;
  /** What our entry holds now (last written). */
  bytes: Buffer;
  record: FileLockRecord;
}

interface Observation {
  ino: bigint;
  bytes: Buffer;
  /** Monotonic ms when we first saw exactly these bytes. */
  since: number;
}

const noop = () => {};
const errnoOf = (err: unknown) => (err as { code?: unknown } | null)?.code;

export class FileLockBackend implements LockBackend {
  readonly kind = 'file' as const;
  readonly volumeId: string;
  readonly root: string;
  /** <root>/locks/lock.<volumeId> */
  readonly dir: string;
  readonly leaseMs: number;
  readonly renewMs: number;
  readonly marginMs: number;
  readonly pollMs: number;

  readonly #log: Logger;
  readonly #d: LockDirectory;
  readonly #now: () => number;
  readonly #watchDir: boolean;
  readonly #checkSuspend: boolean;
  #sink: LockSink | null = null;
  #held: HeldEntry | null = null;
  #validUntil = -Infinity;
  /** Entries of other holders we are watching, by seq. */
  readonly #observations = new Map<number, Observation>();
  /** Our handover request files → the acquisition token they belong to. */
  readonly #requests = new Map<string, string>();
  readonly #seenRequests = new Set<string>();
  #watcher: fs.FSWatcher | null = null;
  #renewTimer: NodeJS.Timeout | undefined;
  #pollTimer: NodeJS.Timeout | undefined;
  /** Serializes renewals, request polls and release on the owner side. */
  #chain: Promise<void> = Promise.resolve();
  #maintaining = false;
  /** A request poll triggered by fs.watch is queued already. */
  #pollQueued = false;
  #clocks: { mono: number; boot: number } | null = null;
  #closed = false;

  constructor(root: string, volumeId: string, options: FileLockOptions = {}) {
    this.volumeId = volumeId;
    this.leaseMs = options.leaseMs ?? FILE_LOCK_DEFAULTS.leaseMs;
    this.renewMs = options.renewMs ?? FILE_LOCK_DEFAULTS.renewMs;
    this.marginMs = options.marginMs ?? FILE_LOCK_DEFAULTS.marginMs;
    this.pollMs = options.pollMs ?? FILE_LOCK_DEFAULTS.pollMs;
    for (const [k, v] of Object.entries({ leaseMs: this.leaseMs, renewMs: this.renewMs, marginMs: this.marginMs, pollMs: this.pollMs })) {
      if (!Number.isSafeInteger(v) || v <= 0) throw new RangeError(`file lock: ${k} must be a positive integer of ms, not ${v}`);
    }
    if (2 * this.renewMs > this.leaseMs - this.marginMs) {
      throw new RangeError(`file lock: two renewals (renewMs ${this.renewMs}) must fit in lease − margin (${this.leaseMs} − ${this.marginMs})`);
    }
    this.#log = (options.log ?? silentLogger).child({ component: 'lock', backend: 'file', volumeId });
    this.#d = new LockDirectory(root, volumeId, this.#log);
    this.root = this.#d.root;
    this.dir = this.#d.dir;
    this.#now = options.now ?? (() => performance.now());
    this.#checkSuspend = options.now === undefined;
    this.#watchDir = options.watch ?? true;
  }

  get validUntil(): number {
    return this.#held ? this.#validUntil : -Infinity;
  }

  attach(sink: LockSink): void {
    this.#sink = sink;
  }

  // ------------------------------------------------------------ acquiring

  async tryAcquire(me: Acquirer): Promise<Attempt> {
    checkIdentity(me);
    this.#checkOpen();
    await this.#d.ensure();
    this.#startWatch();
    let head: Entry | null = null;
    for (let round = 0; round < 8; round++) {
      head = await this.#d.head();
      if (!head) {
        // A new lock: the free entry e.0 everyone starts from (EEXIST: someone else made it).
        await this.#d.create(0, encodeRecord(this.#record(me, 0, 'free', 'initial')), false);
        continue;
      }
      if (!head.record || head.record.state === 'held') return this.#busy(head);
      if (await this.#claim(head, me)) return { acquired: true };
      // lost a race for e.<head+1>: read the new head
    }
    return head ? this.#busy(head) : { acquired: false, holder: null };
  }

  async probe(holder: Holder, me: Acquirer, handover: boolean): Promise<ProbeResult> {
    const seen = (holder as FileHolder).entry;
    const now = await this.#d.readEntry(seen.seq);
    // Gone or free meanwhile: the next attempt will see the new head.
    if (!now || now.record?.state === 'free') return { liveness: 'alive', accepted: false };
    const obs = this.#observe(now);
    if (handover && now.record) await this.#request(now.seq, me);
    return { liveness: this.#isDead(now, obs) ? 'dead' : 'alive', accepted: false };
  }

  /**
   * The lease of `holder` ran out (probe said dead): the fence on files is
   * that its owner has stopped by now. Append our entry after it.
   */
  async takeOver(holder: Holder, me: Acquirer): Promise<Attempt> {
    const seen = (holder as FileHolder).entry;
    const obs = this.#observations.get(seen.seq);
    if (!obs || !this.#isDead(seen, obs)) return { acquired: false, holder };
    const stale: Entry = { ...seen, ino: obs.ino, bytes: obs.bytes };
    this.#log.warn(`lock: the lease of entry ${seen.seq} ran out (unchanged for ${Math.round(this.#now() - obs.since)} ms): taking over`, {
      holder: seen.record ? ownerOf(seen) : null,
    });
    if (await this.#claim(stale, me)) return { acquired: true, brokeHolder: true };
    const head = await this.#d.head();
    return head ? this.#busy(head) : { acquired: false, holder: null };
  }

  async acquireEnded(me: Acquirer): Promise<void> {
    const mine = [...this.#requests].filter(([, token]) => token === me.token).map(([file]) => file);
    for (const file of mine) {
      this.#requests.delete(file);
      await fsp.unlink(file).catch(noop);
    }
  }

  // ------------------------------------------------------------ owner side

  async release(): Promise<void> {
    await this.#serialize(async () => {
      this.#stopMaintenance();
      const held = this.#held;
      if (!held) throw new LockStateError(this.volumeId, 'release without holding the lock');
      try {
        const why = await this.#appendFree(held, 'released');
        if (why) throw new LockLostError(this.volumeId, why);
      } finally {
        await this.#dropHeld();
      }
    });
  }

  /** After a loss: give it up if it is still ours (free entry after ours), ignore every failure. */
  async abandon(): Promise<void> {
    await this.#serialize(async () => {
      this.#stopMaintenance();
      const held = this.#held;
      if (!held) return;
      try {
        await this.#appendFree(held, 'released');
      } catch (err) {
        this.#log.debug(`lock: abandon: ${(err as Error).message}`);
      } finally {
        await this.#dropHeld();
      }
    });
  }

  async stop(): Promise<void> {
    this.#stopMaintenance();
    this.#stopWatch();
  }

  /** A renewal now: confirms our entry is the head, ours, and the lease still runs. */
  async verify(): Promise<void> {
    await this.#serialize(() => this.#renew());
    if (!this.#held) throw new LockLostError(this.volumeId, 'not held');
  }

  async owner(): Promise<LockOwner | null> {
    const head = await this.#d.head();
    if (!head || head.record?.state === 'free') return null;
    return head.record ? ownerOf(head) : null;
  }

  async breakLock(me: LockIdentity, options: { force: boolean; timeoutMs: number }): Promise<LockOwner | null> {
    checkIdentity(me);
    await this.#d.ensure();
    const start = this.#now();
    for (;;) {
      const head = await this.#d.head();
      if (!head || head.record?.state === 'free') return null;
      if (this.#held && head.seq === this.#held.seq) throw new LockStateError(this.volumeId, 'this lock is ours');
      if (head.newerVersion > 0) {
        throw new LockBusyError(this.volumeId, null, `entry ${head.seq} has lock format version ${head.newerVersion}; upgrade this node`);
      }
      const obs = this.#observe(head);
      const limit = options.timeoutMs >= 0 ? options.timeoutMs : this.#deadAfter(head) + 2 * this.pollMs;
      if (this.#isDead(head, obs)) {
        const stale: Entry = { ...head, ino: obs.ino, bytes: obs.bytes };
        const record = this.#record({ ...me, token: token(), since: Date.now() }, head.seq + 1, 'free', 'broken');
        if (await this.#d.append(stale, encodeRecord(record), false)) {
          this.#log.warn(`lock: broke the lease of entry ${head.seq} (unchanged for ${Math.round(this.#now() - obs.since)} ms)`);
          return head.record ? ownerOf(head) : null;
        }
        continue;
      }
      if (this.#now() - start >= limit) {
        throw new LockBusyError(this.volumeId, head.record ? ownerOf(head) : null,
          'its lease is being renewed: the holder is alive, and a live lease is never broken on files');
      }
      await new Promise((resolve) => setTimeout(resolve, this.pollMs));
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#stopMaintenance();
    this.#stopWatch();
    await this.#chain.catch(noop);
    if (this.#held) await this.#dropHeld();
    for (const file of this.#requests.keys()) await fsp.unlink(file).catch(noop);
    this.#requests.clear();
  }

  // ------------------------------------------------------------ entries

  #checkOpen(): void {
    if (this.#closed) throw new LockStateError(this.volumeId, 'file lock backend is closed');
  }

  /** Takes the lock after `pred` (free, or a dead holder's): true when e.<pred.seq+1> is ours. */
  async #claim(pred: Entry, me: Acquirer): Promise<boolean> {
    const seq = pred.seq + 1;
    const record = this.#record(me, seq, 'held', '');
    const bytes = encodeRecord(record);
    const t0 = this.#now();
    const created = await this.#d.append(pred, bytes, true);
    if (!created) return false;
    this.#held = { seq, token: me.token, fd: created.fd, ino: created.ino, bytes, record };
    this.#observations.clear();
    this.#seenRequests.clear();
    this.#clocks = null;
    this.#setValidity(t0 + this.leaseMs - this.marginMs);
    this.#startMaintenance();
    return true;
  }

  /** Release: e.<held.seq+1> free. Returns why it failed (we had been superseded), or null. */
  async #appendFree(held: HeldEntry, reason: 'released'): Promise<string | null> {
    const rec = this.#record({ ...held.record, token: token(), since: Date.now() }, held.seq + 1, 'free', reason);
    const mine: Entry = { seq: held.seq, ino: held.ino, bytes: held.bytes, record: held.record, newerVersion: 0 };
    const done = await this.#d.append(mine, encodeRecord(rec), false);
    return done ? null : `entry ${held.seq + 1} appeared after ours: the lock was taken over (our lease had run out)`;
  }

  async #dropHeld(): Promise<void> {
    const held = this.#held;
    this.#held = null;
    this.#validUntil = -Infinity;
    if (held) await fdClose(held.fd).catch(noop);
  }

  #record(who: LockIdentity & { token: string; since: number }, seq: number, state: 'held' | 'free', reason: FileLockRecord['reason']): FileLockRecord {
    return {
      format: 'archipelago-lock', version: 1, volume: this.volumeId, seq, state, token: who.token,
      node: who.node, instance: who.instance, pid: who.pid, since: who.since,
      leaseMs: this.leaseMs, marginMs: this.marginMs, renewMs: this.renewMs, renewal: 0, reason,
    };
  }

  #busy(head: Entry): Attempt {
    this.#observe(head);
    const holder: FileHolder = { key: `${head.seq}`, owner: head.record ? ownerOf(head) : null, entry: head };
    return { acquired: false, holder };
  }

  /** Remembers when we first saw `e` with exactly these bytes. */
  #observe(e: Entry): Observation {
    let obs = this.#observations.get(e.seq);
    if (!obs || obs.ino !== e.ino || !obs.bytes.equals(e.bytes)) {
      obs = { ino: e.ino, bytes: e.bytes, since: this.#now() };
      this.#observations.set(e.seq, obs);
      for (const seq of this.#observations.keys()) if (seq < e.seq) this.#observations.delete(seq);
    }
    return obs;
  }

  /** How long an entry must stay unchanged before its holder is dead: the larger lease + margin of its and ours. */
  #deadAfter(e: Entry): number {
    const own = this.leaseMs + this.marginMs;
    return e.record ? Math.max(own, e.record.leaseMs + e.record.marginMs) : own;
  }

  #isDead(e: Entry, obs: Observation): boolean {
    if (e.newerVersion > 0) return false; // a newer format's rules are not ours to judge
    return this.#now() - obs.since >= this.#deadAfter(e);
  }

  /** Asks the holder of e.<seq> to hand over (once per entry and acquisition). */
  async #request(seq: number, me: Acquirer): Promise<void> {
    const file = this.#d.requestPath(seq, me.token);
    if (this.#requests.has(file)) return;
    this.#requests.set(file, me.token);
    const body = encodeRequest({ volume: this.volumeId, seq, token: me.token, node: me.node, instance: me.instance, pid: me.pid });
    try {
      await fsp.writeFile(file, body, { flag: 'wx' });
    } catch (err) {
      if (errnoOf(err) !== 'EEXIST') {
        this.#requests.delete(file);
        throw err;
      }
    }
  }

  // ------------------------------------------------------------ maintenance

  #serialize(fn: () => Promise<void>): Promise<void> {
    const run = this.#chain.then(fn);
    this.#chain = run.catch(noop);
    return run;
  }

  #startMaintenance(): void {
    this.#maintaining = true;
    const renew = () => {
      this.#renewTimer = undefined;
      if (!this.#maintaining) return;
      void this.#serialize(() => this.#renew()).finally(() => {
        if (this.#maintaining) this.#renewTimer = setTimeout(renew, this.renewMs);
      });
    };
    const poll = () => {
      this.#pollTimer = undefined;
      if (!this.#maintaining) return;
      void this.#serialize(() => this.#pollRequests()).finally(() => {
        if (this.#maintaining) this.#pollTimer = setTimeout(poll, this.pollMs);
      });
    };
    this.#renewTimer = setTimeout(renew, this.renewMs);
    this.#pollTimer = setTimeout(poll, this.pollMs);
  }

  #stopMaintenance(): void {
    this.#maintaining = false;
    if (this.#renewTimer) clearTimeout(this.#renewTimer);
    if (this.#pollTimer) clearTimeout(this.#pollTimer);
    this.#renewTimer = this.#pollTimer = undefined;
  }

  #setValidity(until: number): void {
    this.#validUntil = until;
    this.#sink?.validity(until);
  }

  /** We are not the owner any more: stop, keep the fd for abandon(), tell the VolumeLock. */
  #fail(why: string): void {
    this.#stopMaintenance();
    this.#validUntil = -Infinity;
    this.#sink?.lost(new LockLostError(this.volumeId, why));
  }

  /**
   * One renewal: refuse once the lease has run out (never revive), rewrite
   * our entry in place, check it is still the head and still ours, then
   * move the deadline to t0 + lease − margin, t0 taken before the write.
   */
  async #renew(): Promise<void> {
    const held = this.#held;
    if (!held || !this.#maintaining) return;
    const t0 = this.#now();
    if (t0 >= this.#validUntil) return this.#fail('lease ran out before it could be renewed (paused, or the file system stalled)');
    if (this.#suspended(t0)) return this.#fail('the system was suspended: the monotonic clock missed that time');
    const record: FileLockRecord = { ...held.record, renewal: held.record.renewal + 1 };
    const bytes = encodeRecord(record);
    try {
      await writeAll(held.fd, bytes, 0);
      await fdSync(held.fd);
    } catch (err) {
      // Not renewed; the deadline stays, the next tick tries again.
      this.#log.warn(`lock: renewal of entry ${held.seq} failed: ${(err as Error).message}`, { err });
      return;
    }
    held.bytes = bytes;
    held.record = record;
    if ((await this.#d.readEntry(held.seq + 1)) !== null) return this.#fail(`entry ${held.seq + 1} exists: the lock was taken over`);
    const st = await fsp.stat(this.#d.entryPath(held.seq), { bigint: true }).catch(() => null);
    if (!st || st.ino !== held.ino) return this.#fail(`our entry ${held.seq} was removed or replaced`);
    if (!this.#maintaining) return;
    if (this.#now() >= this.#validUntil) return this.#fail('renewal finished after the lease had run out');
    this.#setValidity(t0 + this.leaseMs - this.marginMs);
  }

  /** CLOCK_MONOTONIC stops during system suspend, the boot-time clock does not. */
  #suspended(mono: number): boolean {
    if (!this.#checkSuspend) return false;
    const boot = os.uptime() * 1000;
    const last = this.#clocks;
    this.#clocks = { mono, boot };
    if (!last) return false;
    return boot - last.boot - (mono - last.mono) > this.marginMs / 2 + 50;
  }

  /** Owner: new handover requests for our entry go to the VolumeLock (each once). */
  async #pollRequests(): Promise<void> {
    const held = this.#held;
    if (!held || !this.#maintaining) return;
    let names: string[];
    try {
      names = await this.#d.names();
    } catch (err) {
      this.#log.warn(`lock: polling requests: ${(err as Error).message}`);
      return;
    }
    for (const name of names) {
      const m = REQUEST.exec(name);
      if (!m || Number(m[1]) !== held.seq || this.#seenRequests.has(name)) continue;
      const bytes = await fsp.readFile(path.join(this.#d.dir, name)).catch(() => null);
      const req = bytes && decodeRequest(bytes, this.volumeId, held.seq);
      if (!req) continue; // half written, or withdrawn meanwhile
      this.#seenRequests.add(name);
      if (this.#held !== held || !this.#maintaining) return;
      this.#sink?.releaseRequested({
        from: { node: req.node, instance: req.instance, pid: req.pid }, token: req.token, receivedAt: this.#now(),
      });
    }
  }

  // ------------------------------------------------------------ fs.watch

  #startWatch(): void {
    if (!this.#watchDir || this.#watcher || this.#closed) return;
    try {
      const watcher = fs.watch(this.#d.dir, { persistent: false }, (_event, name) => this.#onDirEvent(name));
      watcher.on('error', (err) => {
        this.#log.debug(`lock: fs.watch: ${err.message}; polling only`);
        this.#stopWatch();
      });
      this.#watcher = watcher;
    } catch (err) {
      this.#log.debug(`lock: fs.watch unavailable: ${(err as Error).message}; polling only`);
    }
  }

  #stopWatch(): void {
    this.#watcher?.close();
    this.#watcher = null;
  }

  #onDirEvent(name: string | Buffer | null): void {
    const file = name === null ? '' : name.toString();
    if (file.startsWith('r.')) {
      if (this.#held && this.#maintaining && !this.#pollQueued) {
        this.#pollQueued = true;
        void this.#serialize(() => {
          this.#pollQueued = false;
          return this.#pollRequests();
        });
      }
    } else if (file.startsWith('e.') || file === '') {
      this.#sink?.changed();
    }
  }
}

function token(): string {
  return randomBytes(8).toString('hex');
}

function ownerOf(e: Entry): LockOwner {
  const r = e.record!;
  return {
    node: r.node, instance: r.instance, pid: r.pid, since: r.since, token: r.token, backend: 'file',
    seq: e.seq, leaseMs: r.leaseMs, marginMs: r.marginMs,
  };
}
