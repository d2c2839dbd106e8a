/**
 * The daemon's Prometheus metrics (docs/metrics.md lists every one): one
 * prom-client Registry per daemon (never the global one, so several daemons
 * can live in one process), fed by the plain hooks of the layers below:
 *
 *   src/nbd       NbdHooks: connections, handshake failures, and per export a
 *                 RequestObserver called after every request
 *   src/compose   Volume.stats (copy-ups)          ┐ read at scrape time from the
 *   src/mapper    VolumeMap.stats (map cache)      ┘ open volumes (VolumeHooks)
 *   src/blockers  observeBlocker(): every backend operation's time and error;
 *                 the timeout guard's counters (BackendStatus, backend.ts), read
 *                 at scrape time
 *
 * With its siblings metrics-histogram.ts and metrics-http.ts, the only code
 * that imports prom-client (STYLE.md habit 11).
 *
 * Cost on the request path: the observer of a connection is made when its
 * export opens, bound to that volume's counters, so a request only adds to
 * typed arrays (count, seconds, bytes) and to the latency histogram's
 * buckets: no label strings, no map lookups, no allocation but the hrtime
 * bigint. prom-client's own counters hash their labels on every inc(), so
 * they are filled from those arrays at scrape time, in collect() callbacks;
 * gauges (connections, in flight, volumes open) are read at scrape time too.
 *
 * Per-volume series of a volume nobody uses (no connection, not open) are
 * dropped after `retainIdleMs`, so a daemon that served thousands of volumes
 * over its life does not keep their series forever; if the volume comes back
 * its counters restart from 0, which rate() and increase() take as a reset.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { lockAcquiredChannel, lockHandoverChannel, type LockAcquiredMessage, type LockHandoverMessage } from '../locks/index.js';
import { NBD_CMD, nameOfCmd, nameOfError } from '../nbd/constants.js';
import type { HandshakeFailure, NbdHooks, RequestObserver } from '../nbd/server.js';
import { BLOCKER_OPS, type BlockerOpObserver } from '../blockers/observed.js';
import type { BlockerErrorCode } from '../blockers/errors.js';
import type { Volume } from '../compose/volume.js';
import type { VolumeHooks } from './volume-export.js';
import type { BackendStatus } from './backend.js';
import { BucketHistogram } from './metrics-histogram.js';

/**
 * Latency buckets, seconds: from 50 µs (a 4 KiB request served from the page
 * cache) to 30 s (the default bound on one RADOS operation), about ×2–2.5 apart.
 */
export const LATENCY_BUCKETS: readonly number[] = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
];

/** Default time a volume's series outlive its last use. */
export const DEFAULT_RETAIN_IDLE_MS = 10 * 60_000;

/** Op label values by NBD command value (NBD_CMD_WRITE_ZEROES → write_zeroes); unknown commands are 'other'. */
const OP_OTHER = 8;
const OPS = OP_OTHER + 1;
const OP_NAMES: readonly string[] = [
  ...Array.from({ length: OP_OTHER }, (_, cmd) => nameOfCmd(cmd).slice('NBD_CMD_'.length).toLowerCase()),
  'other',
];
/** Commands whose `bytes` are a payload (request_bytes_total). */
const DATA_OPS: ReadonlySet<number> = new Set([NBD_CMD.READ, NBD_CMD.WRITE]);

const HANDSHAKE_FAILURES: readonly HandshakeFailure[] = ['timeout', 'peer_closed', 'protocol', 'tls', 'error'];

/** What the metrics read at scrape time from the running daemon (serve.ts attaches it). */
export interface MetricsSources {
  /** Open NBD connections, in the handshake or transmitting. */
  connections(): number;
  /** NBD requests in flight now, by export (volume) name. */
  inFlight(): ReadonlyMap<string, number>;
  /** Volumes open now. */
  volumesOpen(): number;
  /** The backend guard's counters (fences, timeouts, the pile of late calls); absent: all 0. */
  backend?(): BackendStatus;
  /** The lock state of each open writable volume (volume-session.ts). */
  lockStates?(): Iterable<readonly [string, string]>;
}

/** Lock waits and hand-overs: from a few ms (RADOS notify) to the lease or watch timeout of a dead holder. */
const LOCK_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

/** The guard's op names (FaultOp) → the blocker op label (BLOCKER_OPS). */
const GUARD_OPS: ReadonlyArray<readonly [keyof BackendStatus['timedOut'], string]> = [
  ['read', 'read'], ['write', 'write'], ['replace', 'replace'], ['readFull', 'read_full'], ['punch', 'punch'],
  ['remove', 'remove'], ['stat', 'stat'], ['list', 'list'], ['sync', 'sync'],
];

export interface MetricsOptions {
  /** prom-client's default process and Node.js metrics (default true). */
  processMetrics?: boolean;
  /** Per-volume series of a volume unused this long are dropped (default 10 min). */
  retainIdleMs?: number;
  /** Milliseconds clock for that retention (tests). */
  now?: () => number;
}

/** Everything counted for one volume name. */
class VolumeSeries {
  /** By op index (NBD command value, or OP_OTHER). */
  readonly requests = new Float64Array(OPS);
  readonly seconds = new Float64Array(OPS);
  readonly bytes = new Float64Array(OPS);
  /** Failed requests by `error * 16 + op`: rare, so a Map. */
  readonly errors = new Map<number, number>();
  /** NBD connections transmitting on this volume now. */
  connections = 0;
  /** compose Volumes open under this name now (a reopen may overlap the close). */
  readonly open = new Set<Volume>();
  /** Whether a Volume was ever seen: only then are its volume stats exported. */
  hasVolume = false;
  /** Stats of the Volumes that closed since the series began. */
  closedCopyUps = 0;
  closedCacheHits = 0;
  closedCacheMisses = 0;
  /** When it last became unused (no connection, not open); 0 while in use. */
  idleSince: number;

  constructor(readonly name: string, now: number) {
    this.idleSince = now;
  }

  /** Records one request (the per-connection observer's body). */
  record(cmd: number, bytes: number, error: number, startNs: bigint): number {
    const seconds = Number(process.hrtime.bigint() - startNs) / 1e9;
    const op = cmd < OP_OTHER ? cmd : OP_OTHER;
    this.requests[op] += 1;
    this.seconds[op] += seconds;
    if (error === 0) this.bytes[op] += bytes;
    else {
      const key = error * 16 + op;
      this.errors.set(key, (this.errors.get(key) ?? 0) + 1);
    }
    return seconds;
  }

  copyUps(): number {
    let n = this.closedCopyUps;
    for (const v of this.open) n += v.stats.copyUps;
    return n;
  }

  cacheHits(): number {
    let n = this.closedCacheHits;
    for (const v of this.open) n += v.map.stats.cacheHits;
    return n;
  }

  cacheMisses(): number {
    let n = this.closedCacheMisses;
    for (const v of this.open) n += v.map.stats.cacheMisses;
    return n;
  }
}

export class DaemonMetrics {
  readonly registry = new Registry();
  /** For NbdServer (options.hooks). */
  readonly nbdHooks: NbdHooks;
  /** For VolumeProvider. */
  readonly volumeHooks: VolumeHooks;

  private readonly volumes = new Map<string, VolumeSeries>();
  private sources: MetricsSources | null = null;
  private readonly now: () => number;
  private readonly retainIdleMs: number;
  /** NBD request latency, one series per op (index = op index). */
  private readonly latency: BucketHistogram;
  private readonly blockerTime: BucketHistogram;
  private readonly blockerErrors: Counter<'blocker' | 'role' | 'op' | 'code'>;
  private readonly connectionsTotal: Counter;
  private readonly connectionsRefused: Counter<'reason'>;
  private readonly handshakeFailures: Counter<'reason'>;
  private readonly lockLosses: Counter<'fenced'>;
  private readonly onLockAcquired: (m: unknown) => void;
  private readonly onLockHandover: (m: unknown) => void;

  constructor(o: MetricsOptions = {}) {
    this.now = o.now ?? Date.now;
    this.retainIdleMs = o.retainIdleMs ?? DEFAULT_RETAIN_IDLE_MS;
    const registers = [this.registry];
    // prom-client calls collect() with the metric as `this`.
    const self = this;

    // ---------------------------------------------------------------- nbd
    new Gauge({
      name: 'archipelago_nbd_connections', help: 'NBD connections open now (in the handshake or transmitting).',
      registers, collect() { this.set(self.sources?.connections() ?? 0); },
    });
    this.connectionsTotal = new Counter({
      name: 'archipelago_nbd_connections_total', help: 'NBD connections accepted.', registers,
    });
    this.connectionsRefused = new Counter({
      name: 'archipelago_nbd_connections_refused_total',
      help: 'NBD connections closed at once: over --max-connections (limit) or during shutdown.',
      labelNames: ['reason'], registers,
    });
    this.handshakeFailures = new Counter({
      name: 'archipelago_nbd_handshake_failures_total',
      help: 'NBD handshakes that ended without an export: timeout, peer_closed, protocol (a client error), tls (the TLS handshake failed), error (a server error).',
      labelNames: ['reason'], registers,
    });
    for (const reason of ['limit', 'shutdown']) this.connectionsRefused.inc({ reason }, 0);
    for (const reason of HANDSHAKE_FAILURES) this.handshakeFailures.inc({ reason }, 0);

    new Counter({
      name: 'archipelago_nbd_requests_total', help: 'NBD requests replied to (errors included), by volume and command.',
      labelNames: ['volume', 'op'], registers,
      collect() { self.fillByOp(this, (v) => v.requests, false); },
    });
    new Counter({
      name: 'archipelago_nbd_request_bytes_total', help: 'Payload bytes of successful NBD READ and WRITE requests.',
      labelNames: ['volume', 'op'], registers,
      collect() { self.fillByOp(this, (v) => v.bytes, true); },
    });
    new Counter({
      name: 'archipelago_nbd_request_seconds_total',
      help: 'Time spent serving NBD requests (sum of their latencies); divided by requests_total: mean latency per volume.',
      labelNames: ['volume', 'op'], registers,
      collect() { self.fillByOp(this, (v) => v.seconds, false); },
    });
    new Counter({
      name: 'archipelago_nbd_request_errors_total', help: 'NBD requests that failed, by the NBD error replied.',
      labelNames: ['volume', 'op', 'error'], registers,
      collect() { self.fillErrors(this); },
    });
    this.latency = new BucketHistogram('archipelago_nbd_request_duration_seconds',
      'NBD request latency, from parsing (a WRITE: its payload received) to the reply queued, by command (all volumes).',
      LATENCY_BUCKETS).register(this.registry);
    for (let op = 0; op < OPS; op++) this.latency.addSeries({ op: OP_NAMES[op]! });
    new Gauge({
      name: 'archipelago_nbd_requests_in_flight', help: 'NBD requests received and not yet replied to, by volume.',
      labelNames: ['volume'], registers,
      collect() {
        this.reset();
        for (const [volume, n] of self.sources?.inFlight() ?? []) this.set({ volume }, n);
      },
    });

    // ------------------------------------------------------------ volumes
    new Gauge({
      name: 'archipelago_volumes_open', help: 'Volumes open now (by NBD connections or the admin API).',
      registers, collect() { this.set(self.sources?.volumesOpen() ?? 0); },
    });
    new Counter({
      name: 'archipelago_volume_copyups_total',
      help: 'Copy-on-write remaps: objects a volume shared (snapshot, parent) that a write gave it a copy of.',
      labelNames: ['volume'], registers,
      collect() { self.fillVolumeStat(this, (v) => v.copyUps()); },
    });
    new Counter({
      name: 'archipelago_map_cache_hits_total', help: 'Map lookups answered from memory (chunk cached, or never written).',
      labelNames: ['volume'], registers,
      collect() { self.fillVolumeStat(this, (v) => v.cacheHits()); },
    });
    new Counter({
      name: 'archipelago_map_cache_misses_total', help: 'Map lookups that had to read a map chunk from the store.',
      labelNames: ['volume'], registers,
      collect() { self.fillVolumeStat(this, (v) => v.cacheMisses()); },
    });

    // ----------------------------------------------------------- blockers
    this.blockerTime = new BucketHistogram('archipelago_blocker_operation_duration_seconds',
      'Object store (blocker) operation latency, by backend, role (maps or data) and operation.',
      LATENCY_BUCKETS).register(this.registry);
    this.blockerErrors = new Counter({
      name: 'archipelago_blocker_errors_total',
      help: 'Object store operations that failed, by error code (ENOENT is often expected: a probe for an absent object).',
      labelNames: ['blocker', 'role', 'op', 'code'], registers,
    });

    // ------------------------------------------------ backend guard (timeouts)
    const backend = () => self.sources?.backend?.();
    new Counter({
      name: 'archipelago_backend_timeouts_total',
      help: "Backend operations the daemon's --backend-timeout gave up on (ETIMEDOUT), by operation; fenced calls that were never issued included.",
      labelNames: ['op'], registers,
      collect() {
        const b = backend();
        this.reset();
        for (const [key, op] of GUARD_OPS) this.inc({ op }, b?.timedOut[key] ?? 0);
      },
    });
    new Gauge({
      name: 'archipelago_backend_late_operations', help: 'Timed-out backend operations still running in the store now.',
      registers, collect() { this.set(backend()?.late ?? 0); },
    });
    new Gauge({
      name: 'archipelago_backend_late_bytes', help: 'Bytes held by those operations (write data, read buffers).',
      registers, collect() { this.set(backend()?.lateBytes ?? 0); },
    });
    new Gauge({
      name: 'archipelago_backend_fenced_objects',
      help: 'Objects fenced now: a timed-out write, replace, punch or remove of theirs still runs, so later calls on them wait behind it.',
      registers, collect() { this.set(backend()?.fencedObjects ?? 0); },
    });
    new Gauge({
      name: 'archipelago_backend_stalled',
      help: '1 while the timed-out operations still running reach their bound (count or bytes): new backend calls fail at once.',
      registers, collect() { this.set(backend()?.stalled ? 1 : 0); },
    });
    new Counter({
      name: 'archipelago_backend_stalled_rejections_total', help: 'Backend calls failed at once (never issued) because the store was stalled.',
      registers, collect() { this.reset(); this.inc(backend()?.stalledRejections ?? 0); },
    });

    // -------------------------------------------------------------- locks
    // Fed by the lock layer's diagnostics channels (volume-lock.ts): rare
    // events, so prom-client's own Histogram is cheap enough. No volume label
    // on the histograms (series per volume would multiply by the buckets).
    new Gauge({
      name: 'archipelago_lock_state',
      help: 'Lock state of each open writable volume: 1 for its current state (unlocked, acquiring, owner, releasing, lost, closed).',
      labelNames: ['volume', 'state'], registers,
      collect() {
        this.reset();
        for (const [volume, state] of self.sources?.lockStates?.() ?? []) this.set({ volume, state }, 1);
      },
    });
    const acquisitions = new Counter({
      name: 'archipelago_lock_acquisitions_total',
      help: 'Volume locks this daemon acquired, by how: free (nobody held it), handover (the holder released it on request), takeover (a dead holder was fenced and broken).',
      labelNames: ['kind'], registers,
    });
    const acquireTime = new Histogram({
      name: 'archipelago_lock_acquire_duration_seconds',
      help: 'From asking for a volume lock to holding it, by how it was acquired (a write waits this long on a hand-over).',
      labelNames: ['kind'], buckets: LOCK_BUCKETS, registers,
    });
    const handovers = new Histogram({
      name: 'archipelago_lock_handover_duration_seconds',
      help: 'Hand-overs this daemon gave: from another node\'s request to the lock released (drain, flush, map persisted).',
      buckets: LOCK_BUCKETS, registers,
    });
    this.lockLosses = new Counter({
      name: 'archipelago_lock_losses_total',
      help: 'Volume locks lost while owned: fenced (blocklisted: the daemon restarts) or not (lease expired, broken by an operator).',
      labelNames: ['fenced'], registers,
    });
    for (const kind of ['free', 'handover', 'takeover']) acquisitions.inc({ kind }, 0);
    for (const fenced of ['true', 'false']) this.lockLosses.inc({ fenced }, 0);
    this.onLockAcquired = (m: unknown) => {
      const { waitedMs, handover, takeover } = m as LockAcquiredMessage;
      const kind = takeover ? 'takeover' : handover ? 'handover' : 'free';
      acquisitions.inc({ kind });
      acquireTime.observe({ kind }, waitedMs / 1000);
    };
    this.onLockHandover = (m: unknown) => handovers.observe((m as LockHandoverMessage).ms / 1000);
    lockAcquiredChannel.subscribe(this.onLockAcquired);
    lockHandoverChannel.subscribe(this.onLockHandover);

    // ------------------------------------------------------------ process
    if (o.processMetrics !== false) {
      collectDefaultMetrics({ register: this.registry });
      // Gauges named *_total (promtool rejects them); each is the sum of the
      // per-type gauge of the same name without _total.
      for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) {
        this.registry.removeSingleMetric(name);
      }
    }

    this.nbdHooks = {
      connectionAccepted: () => this.connectionsTotal.inc(),
      connectionRefused: (reason) => this.connectionsRefused.inc({ reason }),
      handshakeFailed: (reason) => this.handshakeFailures.inc({ reason }),
      exportOpened: (name) => this.exportOpened(name),
      exportClosed: (name) => this.exportClosed(name),
    };
    this.volumeHooks = {
      opened: (name, volume) => this.volumeOpened(name, volume),
      closed: (name, volume) => this.volumeClosed(name, volume),
      lost: (_name, err) => this.lockLosses.inc({ fenced: String(err.fenced) }),
    };
  }

  /** Stops listening to the lock layer's channels (they are process-wide). */
  close(): void {
    lockAcquiredChannel.unsubscribe(this.onLockAcquired);
    lockHandoverChannel.unsubscribe(this.onLockHandover);
  }

  /** Connects the scrape-time gauges to the running daemon. */
  attach(sources: MetricsSources): void {
    this.sources = sources;
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The text exposition: drops the series of long-idle volumes, then renders every metric. */
  scrape(): Promise<string> {
    this.sweep();
    return this.registry.metrics();
  }

  /**
   * The observer for one kind × role of blocker, for observeBlocker(). Call
   * once per wrapped blocker, at start-up (it adds histogram series).
   */
  blockerObserver(kind: string, role: 'maps' | 'data'): BlockerOpObserver {
    const first = this.blockerTime.addSeries({ blocker: kind, role, op: BLOCKER_OPS[0] });
    for (let i = 1; i < BLOCKER_OPS.length; i++) this.blockerTime.addSeries({ blocker: kind, role, op: BLOCKER_OPS[i]! });
    const index = Object.fromEntries(BLOCKER_OPS.map((op, i) => [op, first + i])) as Record<(typeof BLOCKER_OPS)[number], number>;
    const time = this.blockerTime;
    const errors = this.blockerErrors;
    return (op, durationNs, code: BlockerErrorCode | null) => {
      time.observe(index[op], durationNs / 1e9);
      if (code !== null) errors.inc({ blocker: kind, role, op, code });
    };
  }

  // ------------------------------------------------------------ hooks

  private series(name: string): VolumeSeries {
    let v = this.volumes.get(name);
    if (v === undefined) {
      v = new VolumeSeries(name, this.now());
      this.volumes.set(name, v);
    }
    return v;
  }

  private exportOpened(name: string): RequestObserver {
    const v = this.series(name);
    v.connections++;
    v.idleSince = 0;
    const latency = this.latency;
    return (cmd, bytes, error, startNs) => {
      const seconds = v.record(cmd, bytes, error, startNs);
      latency.observe(cmd < OP_OTHER ? cmd : OP_OTHER, seconds);
    };
  }

  private exportClosed(name: string): void {
    const v = this.volumes.get(name);
    if (v === undefined) return;
    v.connections--;
    this.maybeIdle(v);
  }

  private volumeOpened(name: string, volume: Volume): void {
    const v = this.series(name);
    v.open.add(volume);
    v.hasVolume = true;
    v.idleSince = 0;
  }

  /** Called once the Volume has closed: its stats are final, keep them. */
  private volumeClosed(name: string, volume: Volume): void {
    const v = this.volumes.get(name);
    if (v === undefined || !v.open.delete(volume)) return;
    v.closedCopyUps += volume.stats.copyUps;
    v.closedCacheHits += volume.map.stats.cacheHits;
    v.closedCacheMisses += volume.map.stats.cacheMisses;
    this.maybeIdle(v);
  }

  private maybeIdle(v: VolumeSeries): void {
    if (v.connections === 0 && v.open.size === 0) v.idleSince = this.now();
  }

  private sweep(): void {
    const limit = this.now() - this.retainIdleMs;
    for (const [name, v] of this.volumes) {
      if (v.idleSince !== 0 && v.idleSince <= limit) this.volumes.delete(name);
    }
  }

  // ----------------------------------------------------------- collect

  private fillByOp(c: Counter<'volume' | 'op'>, pick: (v: VolumeSeries) => Float64Array, dataOnly: boolean): void {
    c.reset();
    for (const v of this.volumes.values()) {
      const values = pick(v);
      for (let op = 0; op < OPS; op++) {
        if (v.requests[op] === 0 || (dataOnly && !DATA_OPS.has(op))) continue;
        c.inc({ volume: v.name, op: OP_NAMES[op]! }, values[op]!);
      }
    }
  }

  private fillErrors(c: Counter<'volume' | 'op' | 'error'>): void {
    c.reset();
    for (const v of this.volumes.values()) {
      for (const [key, n] of v.errors) {
        c.inc({ volume: v.name, op: OP_NAMES[key % 16]!, error: nameOfError(Math.floor(key / 16)) }, n);
      }
    }
  }

  private fillVolumeStat(c: Counter<'volume'>, pick: (v: VolumeSeries) => number): void {
    c.reset();
    for (const v of this.volumes.values()) if (v.hasVolume) c.inc({ volume: v.name }, pick(v));
  }
}
