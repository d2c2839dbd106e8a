/**
 * The daemon: open the store, serve every volume over NBD on TCP and/or a
 * Unix socket, and shut down cleanly on SIGTERM/SIGINT (drain requests, flush
 * volumes, close the store). A second signal aborts at once.
 */
import { NbdServer } from '../nbd/server.js';
import { openStore } from './store.js';
import { VolumeProvider } from './volume-export.js';
import { AdminServer } from './admin.js';
import type { Logger } from '../common/log.js';

export interface ServeOptions {
  store: string;
  /** host:port, or null for no TCP listener. */
  listen: string | null;
  socket: string | null;
  /** Unix socket of the admin API (admin.ts), or null for none. */
  adminSocket?: string | null;
  log: Logger;
  maxConnections?: number;
  /** Called once the listeners are up (systemd READY, tests). */
  onReady?: (addresses: { port?: number; path?: string }[]) => void;
}

export interface RunningDaemon {
  server: NbdServer;
  provider: VolumeProvider;
  /** Graceful stop; resolves when everything is flushed and closed. */
  stop(): Promise<void>;
  /** Immediate stop. */
  abort(): Promise<void>;
}

/** Parses "host:port" (IPv6 as [::1]:port). */
export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new Error(`--listen ${JSON.stringify(s)}: expected HOST:PORT`);
  return { host: (m[1] ?? m[2])!, port };
}

export async function startDaemon(o: ServeOptions): Promise<RunningDaemon> {
  const store = await openStore(o.store, o.log.child({ component: 'blocker' }));
  const provider = new VolumeProvider(store, o.log.child({ component: 'volume' }));
  const server = new NbdServer({ provider, log: o.log.child({ component: 'nbd' }), maxConnections: o.maxConnections });
  const addresses: { port?: number; path?: string }[] = [];
  const admin = o.adminSocket ? new AdminServer(store, provider, o.log.child({ component: 'admin' })) : null;
  try {
    if (o.listen) addresses.push(await server.listen(parseListen(o.listen)));
    if (o.socket) addresses.push(await server.listen({ path: o.socket }));
    if (admin) await admin.listen(o.adminSocket!);
  } catch (err) {
    await admin?.close();
    await server.destroy();
    await store.close();
    throw err;
  }
  o.log.info(`serving store ${o.store}`);
  o.onReady?.(addresses);

  let stopping: Promise<void> | null = null;
  const stop = () => {
    stopping ??= (async () => {
      o.log.info('shutting down: draining connections');
      await admin?.close();
      await server.close();
      await provider.close();
      await store.close();
      o.log.info('shut down cleanly');
    })();
    return stopping;
  };
  const abort = async () => {
    await admin?.close();
    await server.destroy();
    await provider.close();
    await store.close();
  };
  return { server, provider, stop, abort };
}
