/**
 * One client connection's life: handshake (with a deadline), transmission,
 * then the end (DISC, a protocol error, the peer vanishing, or server
 * shutdown). Owns the socket and the export opened for it.
 *
 * Status is ordered, so code can say `status < Status.Active`:
 *   Dead < ClientDone < ShuttingDown < Handshake < Active
 *
 * Whatever ends the connection, requests already running finish (their
 * replies are dropped if the socket is gone) before the export is closed, so
 * a client vanishing mid-reply neither crashes the server nor leaks a request.
 */
import type { Socket } from 'node:net';
import { NbdProtocolError, describeError } from './errors.js';
import type { ExportProvider } from './export.js';
import { negotiate, type HandshakeIO, type HandshakeLimits, type Negotiated } from './handshake.js';
import { Transmission, type RequestObserver, type TransmissionLimits } from './transmission.js';
import { readIntoBuffer } from './socket-reads.js';
import { NbdTlsError, type NbdTls, type TlsPeer } from './tls.js';
import type { Logger } from '../common/log.js';

export const enum Status { Dead = 0, ClientDone = 1, ShuttingDown = 2, Handshake = 3, Active = 4 }

/**
 * Why a handshake ended without an export (NBD_OPT_ABORT is not a failure):
 * no export within the deadline, the peer closed, it broke the protocol
 * (bad magic, unknown EXPORT_NAME, too many options, ...), the TLS handshake
 * after STARTTLS failed (bad certificate, unknown PSK), or something else
 * failed (the provider threw).
 */
export type HandshakeFailure = 'timeout' | 'peer_closed' | 'protocol' | 'tls' | 'error';

/**
 * Hooks for metrics (src/daemon/metrics.ts implements them): plain
 * synchronous callbacks, so src/nbd needs no metrics library. All optional;
 * each must be cheap and must not throw.
 */
export interface NbdHooks {
  /** A connection was accepted (its handshake starts). */
  connectionAccepted?(): void;
  /** A connection was closed at once: over `maxConnections`, or the server is shutting down. */
  connectionRefused?(reason: 'limit' | 'shutdown'): void;
  handshakeFailed?(reason: HandshakeFailure): void;
  /**
   * Transmission begins on export `name` (once per connection). Returns the
   * observer of this connection's requests, or null. Look up per-export
   * state here, once, so that the per-request call needs no lookup.
   */
  exportOpened?(name: string): RequestObserver | null;
  /** The connection is done with export `name` (its last request finished); pairs with exportOpened. */
  exportClosed?(name: string): void;
}

export interface ConnectionOptions {
  provider: ExportProvider;
  handshake: HandshakeLimits;
  transmission: TransmissionLimits;
  /** The whole handshake must finish within this time (slowloris guard). */
  handshakeTimeoutMs: number;
  log: Logger;
  shuttingDown(): boolean;
  /** Observes every request (with hooks.exportOpened's observer, if any, both are called). */
  observer?: RequestObserver | null;
  hooks?: NbdHooks | null;
  /** Told once when the handshake ends, with the export name or null. */
  onNegotiated?: (exportName: string | null) => void;
  /** STARTTLS support (src/nbd/tls.ts); null or absent: none. */
  tls?: NbdTls | null;
}

/** How long a peer has to close its side after we closed ours. */
const END_GRACE_MS = 5000;

/** Bytes a client may send ahead during the handshake before we stop reading. */
const HANDSHAKE_READAHEAD = 256 * 1024;
/**
 * The buffer every plain socket reads into during transmission
 * (socket-reads.ts): one for the whole process. Safe to share: libuv reads
 * one socket at a time on the loop thread and hands the bytes to the
 * transmission synchronously, which copies what it keeps before returning.
 * A 1 MiB WRITE arrives in four reads; per connection, 64 connections held
 * 16 MiB of these buffers.
 */
const READ_BUFFER_BYTES = 256 * 1024;
let sharedReadBuffer: Buffer | null = null;

export class Connection implements HandshakeIO {
  status = Status.Handshake;
  exportName: string | null = null;
  /** Who the client proved to be in its TLS handshake; null while plaintext. */
  tlsPeer: TlsPeer | null = null;
  /** Why the connection ended, for the "connection closed" log line (the first cause wins). */
  endReason: string | null = null;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private transmission: Transmission | null = null;
  private negotiated: Negotiated | null = null;
  private readonly timer: NodeJS.Timeout;
  private closedResolve!: () => void;
  /** Resolves when the socket is closed and the export released. */
  readonly closed = new Promise<void>((r) => { this.closedResolve = r; });
  private readonly log: Logger;
  private timedOut = false;
  /** hooks.exportOpened was called: exportClosed is owed. */
  private exportHooked = false;

  /** The client's socket; replaced by its TLS session after STARTTLS (startTls). */
  constructor(private socket: Socket, private readonly opts: ConnectionOptions) {
    this.log = opts.log;
    this.timer = setTimeout(() => this.handshakeTimeout(), opts.handshakeTimeoutMs);
    this.timer.unref();
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.log.debug(`connection: socket: ${err.message}`, { code: (err as NodeJS.ErrnoException).code }));
    socket.on('close', () => void this.onSocketClose());
    socket.on('drain', () => this.transmission?.checkPressure());
    void this.run();
  }

  /** Requests in flight on this connection now (0 before transmission). */
  get inFlight(): number {
    return this.transmission?.inFlight ?? 0;
  }

  // ---------------------------------------------------------- HandshakeIO

  read(n: number): Promise<Buffer> {
    if (this.status === Status.Dead) return Promise.reject(new NbdProtocolError('peer closed the connection'));
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    return new Promise((resolve, reject) => { this.waiter = { n, resolve, reject }; this.socket.resume(); });
  }

  async skip(n: number): Promise<void> {
    while (n > 0) {
      const step = Math.min(n, 64 * 1024);
      await this.read(step);
      n -= step;
    }
  }

  write(data: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(data);
  }

  /**
   * After the STARTTLS ACK: opts.tls.upgrade takes the plaintext socket and
   * everything from here on is read and written through TLS. The plaintext
   * socket keeps its 'close' and 'error' listeners: it closes with the TLS
   * session, so the end of the connection is seen the same way.
   */
  async startTls(): Promise<TlsPeer> {
    const tls = this.opts.tls;
    if (!tls) throw new NbdTlsError('handshake: TLS is not configured');
    // The client waits for the ACK before starting TLS; bytes already here came too early.
    if (this.buffered) throw new NbdTlsError('handshake: data after NBD_OPT_STARTTLS, before the TLS handshake');
    const raw = this.socket;
    raw.removeAllListeners('data');
    raw.removeAllListeners('drain');
    let up;
    try {
      up = await tls.upgrade(raw);
    } catch (err) {
      throw err instanceof NbdTlsError ? err : new NbdTlsError(`TLS handshake failed: ${describeError(err)}`);
    }
    const socket = up.socket;
    this.tlsPeer = up.peer;
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.log.debug(`connection: TLS: ${err.message}`, { code: (err as NodeJS.ErrnoException).code }));
    socket.on('drain', () => this.transmission?.checkPressure());
    return up.peer;
  }

  private take(n: number): Buffer {
    let out: Buffer;
    const first = this.chunks[0]!;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - filled);
        c.copy(out, filled, 0, k);
        filled += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    return out;
  }

  // ------------------------------------------------------------ lifecycle

  private onData(chunk: Buffer): void {
    if (this.transmission) {
      this.transmission.onData(chunk);
      return;
    }
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const w = this.waiter;
    if (w && this.buffered >= w.n) {
      this.waiter = null;
      w.resolve(this.take(w.n));
    } else if (this.buffered > HANDSHAKE_READAHEAD) {
      this.socket.pause();
    }
  }

  private async run(): Promise<void> {
    let neg: Negotiated | null;
    try {
      neg = await negotiate({
        io: this,
        provider: this.opts.provider,
        limits: this.opts.handshake,
        log: this.log,
        shuttingDown: this.opts.shuttingDown,
        tls: this.opts.tls ?? null,
      });
    } catch (err) {
      clearTimeout(this.timer);
      // A failed TLS handshake often ends with the peer gone already: still a TLS failure.
      const reason: HandshakeFailure = this.timedOut ? 'timeout' : err instanceof NbdTlsError ? 'tls'
        : this.status === Status.Dead ? 'peer_closed' : err instanceof NbdProtocolError ? 'protocol' : 'error';
      this.opts.hooks?.handshakeFailed?.(reason);
      this.endReason ??= `handshake failed: ${describeError(err)}`;
      if (this.status !== Status.Dead || reason === 'tls') {
        this.log.warn(`handshake failed: ${describeError(err)}`, { reason });
        this.socket.destroy();
      } else if (!this.timedOut) {
        // Mostly TCP health checks and probes: not worth a line at info.
        this.log.debug(`handshake ended: peer closed the connection`, { reason });
      }
      this.opts.onNegotiated?.(null);
      return;
    }
    clearTimeout(this.timer);
    if (!neg) {
      // NBD_OPT_ABORT: the client closes; close our side too.
      this.endReason ??= 'client aborted the handshake (NBD_OPT_ABORT)';
      this.status = Status.ClientDone;
      this.opts.onNegotiated?.(null);
      this.endSocket();
      return;
    }
    this.negotiated = neg;
    this.exportName = neg.export.name;
    this.opts.onNegotiated?.(neg.export.name);
    if (this.status === Status.Dead) {
      // Peer vanished just as the handshake ended.
      await this.releaseExport();
      return;
    }
    this.status = Status.Active;
    const t = new Transmission(this.socket, neg, this.opts.transmission, this.log.child({ export: neg.export.name }),
      (reason, protocolError) => void this.finish(reason, protocolError));
    t.observer = this.observerFor(neg.export.name);
    this.transmission = t;
    if (this.opts.shuttingDown()) t.shutdown();
    const rest = this.chunks;
    this.chunks = [];
    this.buffered = 0;
    for (const c of rest) t.onData(c);
    // Plain sockets read into one reused buffer from now on (socket-reads.ts);
    // bytes the socket buffered before still come as 'data', first.
    sharedReadBuffer ??= Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
    readIntoBuffer(this.socket, sharedReadBuffer, (chunk) => {
      t.onData(chunk, true);
      return true;
    });
    this.socket.resume();
  }

  /** The request observer of this connection: the server's, this export's (hooks), both, or none. */
  private observerFor(name: string): RequestObserver | null {
    const all = this.opts.observer ?? null;
    const hooks = this.opts.hooks;
    if (!hooks?.exportOpened) return all;
    this.exportHooked = true;
    const mine = hooks.exportOpened(name);
    if (mine === null || all === null) return mine ?? all;
    return (cmd, bytes, error, startNs) => { all(cmd, bytes, error, startNs); mine(cmd, bytes, error, startNs); };
  }

  private handshakeTimeout(): void {
    if (this.status === Status.Handshake) {
      this.timedOut = true;
      this.endReason ??= 'handshake timed out';
      this.log.warn(`handshake failed: no export negotiated within ${this.opts.handshakeTimeoutMs} ms`, { reason: 'timeout' });
      this.socket.destroy();
    }
  }

  /** DISC or a framing error: finish what is running, then close. */
  private async finish(reason: string, protocolError: boolean): Promise<void> {
    this.endReason ??= protocolError ? `protocol error: ${reason}` : reason;
    if (protocolError) {
      this.log.warn(`connection dropped: ${reason}`);
      this.status = Status.Dead;
      this.socket.destroy();
      return;
    }
    this.log.debug(`connection ending: ${reason}`);
    this.status = Status.ClientDone;
    await this.transmission!.idle();
    this.endSocket();
  }

  /**
   * Half-closes after the last reply, keeps reading (and ignoring) until the
   * peer closes too, and drops the socket if it never does.
   */
  private endSocket(): void {
    this.socket.end();
    this.socket.resume();
    setTimeout(() => this.socket.destroy(), END_GRACE_MS).unref();
  }

  private async onSocketClose(): Promise<void> {
    this.endReason ??= 'peer closed the connection';
    this.status = Status.Dead;
    clearTimeout(this.timer);
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      w.reject(new NbdProtocolError('peer closed the connection during the handshake'));
    }
    if (this.transmission) {
      this.transmission.abandon();
      await this.transmission.idle();
    }
    await this.releaseExport();
  }

  private released = false;
  private async releaseExport(): Promise<void> {
    if (this.released) return;
    if (this.negotiated) {
      this.released = true;
      if (this.exportHooked) this.opts.hooks?.exportClosed?.(this.negotiated.export.name);
      try {
        await this.negotiated.export.close();
      } catch (err) {
        this.log.warn(`closing export ${this.negotiated.export.name}: ${describeError(err)}`, { err });
      }
    }
    if (this.status === Status.Dead) this.closedResolve();
  }

  /**
   * Graceful close: in the handshake the connection just ends; in
   * transmission new requests get ESHUTDOWN, running ones finish, then the
   * socket closes.
   */
  async close(): Promise<void> {
    if (this.status === Status.Dead) return this.closed;
    if (this.status !== Status.Active) {
      this.socket.destroy();
      return this.closed;
    }
    this.endReason ??= 'server shutting down';
    this.status = Status.ShuttingDown;
    this.transmission!.shutdown();
    await this.transmission!.idle();
    this.endSocket();
    return this.closed;
  }

  /** Abort: drop the socket now; running requests finish with nowhere to reply. */
  destroy(): Promise<void> {
    this.endReason ??= 'server aborted the connection';
    this.socket.destroy();
    return this.closed;
  }
}
