/**
 * The NBD server: listeners (TCP and Unix sockets), the set of connections,
 * the connection cap, and graceful shutdown. Serves whatever the
 * ExportProvider hands it; knows nothing of volumes. TLS (STARTTLS) is
 * handed in ready-made (tls.ts; the daemon's src/daemon/tls.ts).
 */
import net from 'node:net';
import fs from 'node:fs/promises';
import { Connection, type NbdHooks } from './connection.js';
import type { ExportProvider } from './export.js';
import { DEFAULT_HANDSHAKE_LIMITS, type HandshakeLimits } from './handshake.js';
import { DEFAULT_TRANSMISSION_LIMITS, type RequestObserver, type TransmissionLimits } from './transmission.js';
import { describePeer, type NbdTls } from './tls.js';
import { silentLogger, type Logger } from '../common/log.js';

export interface NbdServerOptions {
  provider: ExportProvider;
  log?: Logger;
  /** Connections beyond this are closed at once (default 1024). */
  maxConnections?: number;
  /** Default 10 s. */
  handshakeTimeoutMs?: number;
  handshake?: Partial<HandshakeLimits>;
  transmission?: Partial<TransmissionLimits>;
  /** Called after every request of every export. */
  observer?: RequestObserver;
  /** Connection events and per-export request observers (metrics: src/daemon/metrics.ts). */
  hooks?: NbdHooks;
  /** STARTTLS: mode, the socket upgrade and the access check (tls.ts). Absent: no TLS (NOTLS). */
  tls?: NbdTls;
}

export type { HandshakeFailure, NbdHooks } from './connection.js';
export type { RequestObserver } from './transmission.js';
export type { NbdTls, TlsMode, TlsPeer, TlsUpgrade } from './tls.js';

export type ListenAddress = { host: string; port: number } | { path: string };

export class NbdServer {
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<Connection>();
  private stopping = false;
  private readonly log: Logger;
  private readonly maxConnections: number;
  private readonly handshakeTimeoutMs: number;
  private readonly handshake: HandshakeLimits;
  private readonly transmission: TransmissionLimits;
  private readonly unixPaths: string[] = [];

  constructor(private readonly options: NbdServerOptions) {
    this.log = options.log ?? silentLogger;
    this.maxConnections = options.maxConnections ?? 1024;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.handshake = { ...DEFAULT_HANDSHAKE_LIMITS, ...options.handshake };
    this.transmission = { ...DEFAULT_TRANSMISSION_LIMITS, ...options.transmission };
  }

  /** Number of open connections. */
  get connectionCount(): number {
    return this.connections.size;
  }

  /**
   * Requests in flight now, summed per export over its connections (for a
   * gauge read at scrape time: nothing is counted on the request path).
   */
  inFlightByExport(): Map<string, number> {
    const out = new Map<string, number>();
    for (const c of this.connections) {
      if (c.exportName !== null) out.set(c.exportName, (out.get(c.exportName) ?? 0) + c.inFlight);
    }
    return out;
  }

  /**
   * Starts listening; resolves with the bound TCP port (useful with port 0) or
   * the socket path. A stale Unix socket file is replaced.
   */
  async listen(addr: ListenAddress): Promise<{ port?: number; path?: string }> {
    const server = net.createServer({ noDelay: true, keepAlive: true, keepAliveInitialDelay: 30_000 },
      (socket) => this.accept(socket));
    server.on('error', (err) => this.log.error(`listener: ${err.message}`, { err }));
    if ('path' in addr) {
      await fs.rm(addr.path, { force: true });
      await listenOn(server, { path: addr.path });
      await fs.chmod(addr.path, 0o660);
      this.unixPaths.push(addr.path);
      this.servers.push(server);
      this.log.info(`listening on unix:${addr.path}`);
      return { path: addr.path };
    }
    await listenOn(server, { host: addr.host, port: addr.port });
    this.servers.push(server);
    const port = (server.address() as net.AddressInfo).port;
    this.log.info(`listening on ${addr.host}:${port}`);
    return { port };
  }

  private accept(socket: net.Socket): void {
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    if (this.stopping || this.connections.size >= this.maxConnections) {
      this.log.warn(`connection refused: ${this.stopping ? 'server shutting down' : `limit of ${this.maxConnections} connections reached`}`, { peer });
      this.options.hooks?.connectionRefused?.(this.stopping ? 'shutdown' : 'limit');
      socket.destroy();
      return;
    }
    this.options.hooks?.connectionAccepted?.();
    const log = this.log.child({ peer });
    const accepted = Date.now();
    log.debug('connection accepted');
    const conn = new Connection(socket, {
      provider: this.options.provider,
      handshake: this.handshake,
      transmission: this.transmission,
      handshakeTimeoutMs: this.handshakeTimeoutMs,
      log,
      shuttingDown: () => this.stopping,
      observer: this.options.observer ?? null,
      hooks: this.options.hooks ?? null,
      tls: this.options.tls ?? null,
      onNegotiated: (name) => {
        if (name === null) return;
        // With TLS configured, every line says who the client is (plaintext too: tls = on).
        const tls = this.options.tls ? { identity: describePeer(conn.tlsPeer) } : {};
        log.info(`connection opened: export ${JSON.stringify(name)}`, { export: name, handshakeMs: Date.now() - accepted, ...tls });
      },
    });
    this.connections.add(conn);
    void conn.closed.then(() => {
      this.connections.delete(conn);
      // Connections that never reached an export were logged by their
      // handshake (failed: warn; health checks and NBD_OPT_ABORT: debug).
      const fields = { reason: conn.endReason, ms: Date.now() - accepted };
      if (conn.exportName !== null) log.info(`connection closed: export ${JSON.stringify(conn.exportName)}: ${conn.endReason}`, { export: conn.exportName, ...fields });
      else log.debug(`connection closed: ${conn.endReason}`, fields);
    });
  }

  /**
   * Graceful shutdown: stop listening, let running requests finish (new ones
   * get ESHUTDOWN), close every connection. Connections still open after
   * `graceMs` are dropped. Idempotent.
   */
  async close(graceMs = 10_000): Promise<void> {
    this.stopping = true;
    // net.Server#close calls back only once every accepted socket has closed:
    // stop listening now, but wait for that after closing the connections
    // (awaiting it first hung for as long as any client stayed connected).
    const listeners = this.servers.map((s) => new Promise<void>((r) => s.close(() => r())));
    this.servers.length = 0;
    const all = [...this.connections].map((c) => c.close());
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((r) => { timer = setTimeout(() => r('timeout'), graceMs); });
    const result = await Promise.race([Promise.all(all), timeout]);
    clearTimeout(timer);
    if (result === 'timeout') await this.destroy();
    await Promise.all(listeners);
    await Promise.all(this.unixPaths.splice(0).map((p) => fs.rm(p, { force: true })));
  }

  /** Drops every connection now. */
  async destroy(): Promise<void> {
    this.stopping = true;
    for (const s of this.servers) s.close();
    this.servers.length = 0;
    await Promise.all([...this.connections].map((c) => c.destroy()));
  }
}

function listenOn(server: net.Server, opts: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts, () => { server.off('error', reject); resolve(); });
  });
}
