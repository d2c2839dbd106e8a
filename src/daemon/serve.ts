/**
 * The daemon: open the store, serve every volume over NBD on TCP and/or a
 * Unix socket, Prometheus metrics over HTTP, and shut down cleanly on
 * SIGTERM/SIGINT (drain requests, flush volumes, close the store). A second
 * signal aborts at once.
 */
import { NbdServer } from '../nbd/server.js';
import { observeBlocker } from '../blockers/observed.js';
import { openStore, type Store } from './store.js';
import { VolumeProvider } from './volume-export.js';
import { AdminServer } from './admin.js';
import { backendTimeoutSec, guardStore, storeUrlWithTimeout } from './backend.js';
import { DaemonMetrics } from './metrics.js';
import { listenMetrics, type MetricsServer } from './metrics-http.js';
import type { Logger } from '../common/log.js';
import { loadTls, type TlsSettings } from './tls.js';
import { defaultIdentity, type LockBackendOptions } from '../locks/index.js';
import { DEFAULT_LOCK_WAIT_MS } from './volume-export.js';

export interface ServeOptions {
  store: string;
  /** host:port, or null for no TCP listener. */
  listen: string | null;
  socket: string | null;
  /** Unix socket of the admin API (admin.ts), or null for none. */
  adminSocket?: string | null;
  /** host:port of the Prometheus endpoint (/metrics), or null for none (then nothing is counted). */
  metrics?: string | null;
  log: Logger;
  maxConnections?: number;
  /**
   * Bound on one backend operation in seconds (default 30; 0: none); on RADOS
   * also the default of the store URL's op_timeout (backend.ts).
   */
  backendTimeout?: number;
  /** Wrap the store with the fault injector; the admin socket then accepts `faults` (tests, drills only). */
  faultInjection?: boolean;
  /** NBD STARTTLS (tls.ts, docs/tls.md); absent: off. Its files are read at start-up. */
  tls?: TlsSettings;
  /** This node's name in volume locks (default: the host name). */
  nodeName?: string;
  /** How long a write waits for its volume's lock, seconds (default 30). */
  lockWait?: number;
  /** File store: the lock lease, seconds (default 10; renewals every fifth of it). */
  lockLease?: number;
  /**
   * Called when the daemon cannot go on: the store fenced it (RADOS
   * blocklist: every operation of this client fails from now on; only a new
   * process gets a new client). The CLI exits so that systemd restarts it.
   */
  onFatal?: (err: Error) => void;
  /** Called once the listeners are up (systemd READY, tests), with the NBD addresses and the metrics port. */
  onReady?: (addresses: { port?: number; path?: string }[], extra: { metricsPort?: number }) => void;
}

export interface RunningDaemon {
  server: NbdServer;
  provider: VolumeProvider;
  /** Null when metrics are off. */
  metrics: DaemonMetrics | null;
  /** Graceful stop; resolves when everything is flushed and closed. */
  stop(): Promise<void>;
  /** Immediate stop. */
  abort(): Promise<void>;
}

/** Parses "host:port" (IPv6 as [::1]:port); `flag` names the option in the error. */
export function parseListen(s: string, flag = '--listen'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new Error(`${flag} ${JSON.stringify(s)}: expected HOST:PORT`);
  return { host: (m[1] ?? m[2])!, port };
}

/**
 * The store with every backend operation timed for metrics: maps and data
 * apart (role label), also when one blocker serves both (a file store).
 */
function observedStore(store: Store, metrics: DaemonMetrics): Store {
  return {
    ...store,
    maps: observeBlocker(store.maps, metrics.blockerObserver(store.maps.kind, 'maps')),
    data: observeBlocker(store.data, metrics.blockerObserver(store.data.kind, 'data')),
  };
}

/** Lock timings from the settings (file store: renew and margin a fifth of the lease each). */
function lockBackendOptions(o: ServeOptions, log: Logger): LockBackendOptions {
  const leaseMs = Math.round((o.lockLease ?? 10) * 1000);
  const fifth = Math.max(1, Math.floor(leaseMs / 5));
  return {
    file: { leaseMs, renewMs: fifth, marginMs: fifth, log },
    rados: { log },
  };
}

export async function startDaemon(o: ServeOptions): Promise<RunningDaemon> {
  const metricsAddress = o.metrics ? parseListen(o.metrics, '--metrics') : null;
  // Before the store opens: a bad certificate or key file fails the start at once.
  const tls = o.tls ? await loadTls(o.tls, o.log.child({ component: 'tls' })) : null;
  const metrics = metricsAddress ? new DaemonMetrics() : null;
  const opened = await openStore(storeUrlWithTimeout(o.store, backendTimeoutSec(o.backendTimeout)), o.log.child({ component: 'blocker' }));
  const guarded = guardStore(opened, { timeoutSec: o.backendTimeout, faultInjection: o.faultInjection, log: o.log.child({ component: 'blocker' }) });
  const store = metrics ? observedStore(guarded.store, metrics) : guarded.store;
  const volumeLog = o.log.child({ component: 'volume' });
  const hooks = {
    ...metrics?.volumeHooks,
    lost: (name: string, err: Error & { fenced?: boolean }) => {
      metrics?.volumeHooks.lost?.(name, err as never);
      if (err.fenced && opened.rados) {
        o.log.error('fenced: the cluster blocklisted this daemon\'s RADOS client; every volume is cut off until a restart', { volume: name });
        o.onFatal?.(err);
      }
    },
  };
  const provider = new VolumeProvider(store, volumeLog, hooks, {
    // Locks work on the store's own blockers, not the timed/observed wrappers.
    store: { maps: opened.maps, rados: opened.rados ?? null },
    identity: defaultIdentity(o.nodeName),
    waitMs: o.lockWait !== undefined ? o.lockWait * 1000 : DEFAULT_LOCK_WAIT_MS,
    backend: lockBackendOptions(o, o.log.child({ component: 'lock' })),
  });
  const server = new NbdServer({
    provider, log: o.log.child({ component: 'nbd' }), maxConnections: o.maxConnections, hooks: metrics?.nbdHooks,
    ...(tls ? { tls: tls.nbd } : {}),
  });
  metrics?.attach({
    connections: () => server.connectionCount,
    inFlight: () => server.inFlightByExport(),
    volumesOpen: () => provider.openCount,
    lockStates: () => provider.lockStates(),
    backend: () => guarded.status(),
  });
  const addresses: { port?: number; path?: string }[] = [];
  const admin = o.adminSocket ? new AdminServer(store, provider, o.log.child({ component: 'admin' }), guarded) : null;
  let metricsServer: MetricsServer | null = null;
  try {
    if (o.listen) addresses.push(await server.listen(parseListen(o.listen)));
    if (o.socket) addresses.push(await server.listen({ path: o.socket }));
    if (admin) await admin.listen(o.adminSocket!);
    if (metrics) metricsServer = await listenMetrics(metrics, metricsAddress!, o.log.child({ component: 'metrics' }));
  } catch (err) {
    await admin?.close();
    await server.destroy();
    await store.close();
    throw err;
  }
  o.log.info(`serving store ${o.store}`);
  if (tls) o.log.info(`NBD TLS: ${tls.summary}`);
  o.onReady?.(addresses, { metricsPort: metricsServer?.port });

  let stopping: Promise<void> | null = null;
  const stop = () => {
    stopping ??= (async () => {
      // One line per step, so a shutdown that hangs shows where (journal).
      const started = Date.now();
      const step = (msg: string, fields: Record<string, unknown> = {}) =>
        o.log.info(`shutdown: ${msg}`, { ms: Date.now() - started, ...fields });
      step('stopping listeners, draining connections', { connections: server.connectionCount, volumes: provider.openCount });
      await metricsServer?.close();
      metrics?.close();
      await admin?.close();
      await server.close();
      const volumes = provider.openCount;
      step('connections closed; flushing and closing volumes', { volumes });
      await provider.close();
      step('volumes closed; closing the store');
      await store.close();
      o.log.info('shut down cleanly', { ms: Date.now() - started });
    })();
    return stopping;
  };
  const abort = async () => {
    o.log.warn('aborting: dropping every connection now', { connections: server.connectionCount, volumes: provider.openCount });
    await metricsServer?.close();
    metrics?.close();
    await admin?.close();
    await server.destroy();
    await provider.close();
    await store.close();
  };
  return { server, provider, metrics, stop, abort };
}
