/**
 * An NBD client connection that outlives its server: the relay's side
 * towards `archipelago serve` (nbd-relay.ts). It negotiates one export with
 * NBD_OPT_GO (fixed newstyle, simple replies only: the kernel it serves
 * never asks for more), sends requests, and when the connection drops —
 * the daemon restarting — reconnects and sends again every request that
 * had no reply, so callers see a slow request instead of an error.
 *
 *   open ──▶ CONNECTED ──(socket ends)──▶ RECONNECTING ──(GO ok, same size)──▶ CONNECTED
 *               │  ▲                          │ . . . retry every 0.1 … 2 s
 *               │  └──────────────────────────┘
 *               │                             * * * a request waited longer than
 *               │                                   reconnectTimeoutMs: it fails (EIO);
 *               ▼                                   the client keeps trying
 *            CLOSED (close(): NBD_CMD_DISC, or destroy())
 *
 * Replaying is safe in NBD's model: reads, writes, trims and zeroes of a
 * range may run again, and a flush covers whatever completed before it.
 * A reply of ESHUTDOWN (the server is draining) is not an answer either:
 * the request waits for the next connection. A request is only ever sent
 * to one server at a time, and a restarted daemon serves only after the old
 * one has flushed and exited, so a replayed write cannot be overtaken by
 * the old copy.
 *
 * Imports the NBD constants only; no server code.
 */
import net from 'node:net';
import {
  IHAVEOPT, NBDMAGIC, NBD_CMD, NBD_E, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES, NBD_INFO, NBD_OPT, NBD_REP, NBD_REP_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
  REQUEST_HEADER_LENGTH, SIMPLE_REPLY_LENGTH, nameOfCmd, nameOfError, nameOfRep,
} from '../nbd/constants.js';
import { silentLogger, type Logger } from '../common/log.js';
import type { Endpoint } from './nbd-map.js';

export interface UpstreamOptions {
  endpoint: Endpoint;
  exportName: string;
  /** How long a request may wait for a connection before it fails with EIO. */
  reconnectTimeoutMs: number;
  /** Bound on one connect + handshake (default 10 s). */
  connectTimeoutMs?: number;
  log?: Logger;
}

/** What NBD_OPT_GO reported. */
export interface UpstreamExport {
  size: number;
  /** Transmission flags (NBD_FLAG_*). */
  flags: number;
}

/** A failed request, with the errno name the server (or the relay) gave. */
export class UpstreamError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
    this.name = 'UpstreamError';
  }
}

const WIRE_ERRNO = new Map<number, string>(Object.entries(NBD_E).map(([k, v]) => [v, k]));

interface Pending {
  cookie: bigint;
  type: number;
  flags: number;
  offset: number;
  length: number;
  data?: Buffer;
  /** Sent on the current connection (false: waits for the next one). */
  sent: boolean;
  /** Since when it has waited for a connection (ms), or 0 while sent. */
  waitingSince: number;
  resolve(data: Buffer | undefined): void;
  reject(err: Error): void;
}

/** Reads exact byte counts from a socket during the handshake. */
class HandshakeReader {
  private buf: Buffer = Buffer.alloc(0);
  private want: { n: number; resolve(b: Buffer): void; reject(e: Error): void } | null = null;
  private failed: Error | null = null;
  private readonly onData = (chunk: Buffer) => {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    this.serve();
  };
  private readonly onEnd = (err?: Error) => {
    this.failed = err ?? new Error('server closed the connection during the handshake');
    this.want?.reject(this.failed);
    this.want = null;
  };

  constructor(private readonly socket: net.Socket) {
    socket.on('data', this.onData);
    socket.on('error', this.onEnd);
    socket.on('close', () => this.onEnd());
  }

  read(n: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      if (this.failed) return reject(this.failed);
      this.want = { n, resolve, reject };
      this.serve();
    });
  }

  private serve(): void {
    if (!this.want || this.buf.length < this.want.n) return;
    const { n, resolve } = this.want;
    this.want = null;
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    resolve(out);
  }

  /** Stops reading; returns bytes that arrived past the handshake. */
  detach(): Buffer {
    this.socket.off('data', this.onData);
    this.socket.removeAllListeners('error');
    this.socket.removeAllListeners('close');
    return this.buf;
  }
}

/**
 * Connects and negotiates `exportName` with NBD_OPT_GO; resolves with the
 * socket in transmission phase. Throws UpstreamError('ENOENT'|'EPROTO'|…)
 * with the server's message when it refuses.
 */
export async function connectExport(endpoint: Endpoint, exportName: string, timeoutMs: number): Promise<{ socket: net.Socket; info: UpstreamExport; leftover: Buffer }> {
  const socket = endpoint.kind === 'unix' ? net.connect({ path: endpoint.path }) : net.connect({ host: endpoint.host, port: endpoint.port });
  socket.setNoDelay(true);
  const reader = new HandshakeReader(socket);
  const timer = setTimeout(() => socket.destroy(new Error(`no handshake within ${timeoutMs} ms`)), timeoutMs);
  try {
    const hello = await reader.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new UpstreamError('EPROTO', 'not a newstyle NBD server');
    const hflags = hello.readUInt16BE(16);
    if (!(hflags & NBD_FLAG_FIXED_NEWSTYLE)) throw new UpstreamError('EPROTO', 'server is not fixed newstyle');
    const noZeroes = (hflags & NBD_FLAG_NO_ZEROES) !== 0;
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0));
    const name = Buffer.from(exportName, 'utf8');
    const opt = Buffer.alloc(16 + 4 + name.length + 2);
    opt.writeBigUInt64BE(IHAVEOPT, 0);
    opt.writeUInt32BE(NBD_OPT.GO, 8);
    opt.writeUInt32BE(4 + name.length + 2, 12);
    opt.writeUInt32BE(name.length, 16);
    name.copy(opt, 20);
    opt.writeUInt16BE(0, 20 + name.length); // no information requests: EXPORT comes anyway
    socket.write(Buffer.concat([cflags, opt]));
    let info: UpstreamExport | null = null;
    for (;;) {
      const h = await reader.read(20);
      if (h.readBigUInt64BE(0) !== NBD_REP_MAGIC) throw new UpstreamError('EPROTO', 'bad option reply magic');
      const rep = h.readUInt32BE(12);
      const len = h.readUInt32BE(16);
      if (len > 65_536) throw new UpstreamError('EPROTO', `option reply of ${len} bytes`);
      const body = len ? await reader.read(len) : Buffer.alloc(0);
      if (rep === NBD_REP.ACK) break;
      if (rep === NBD_REP.INFO) {
        if (body.length >= 12 && body.readUInt16BE(0) === NBD_INFO.EXPORT) {
          info = { size: Number(body.readBigUInt64BE(2)), flags: body.readUInt16BE(10) };
        }
        continue;
      }
      const why = body.toString('utf8') || nameOfRep(rep);
      const code = rep === NBD_REP.ERR_UNKNOWN ? 'ENOENT' : rep === NBD_REP.ERR_SHUTDOWN ? 'ESHUTDOWN' : 'EPROTO';
      throw new UpstreamError(code, `export ${JSON.stringify(exportName)}: ${why}`);
    }
    if (!info) throw new UpstreamError('EPROTO', 'NBD_OPT_GO ended without NBD_INFO_EXPORT');
    clearTimeout(timer);
    return { socket, info, leftover: reader.detach() };
  } catch (err) {
    clearTimeout(timer);
    reader.detach();
    socket.on('error', () => { /* already failed */ });
    socket.destroy();
    throw err;
  }
}

export class NbdUpstream {
  private socket: net.Socket | null = null;
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  /** Received bytes not parsed yet, as they came (joined only where a reply spans chunks: no copy per chunk). */
  private rx: Buffer[] = [];
  private rxLength = 0;
  private closed = false;
  private reconnecting = false;
  private sweeper: NodeJS.Timeout | null = null;
  private readonly log: Logger;
  /** Connections made, the first included (for tests and logs). */
  connects = 0;

  private constructor(private readonly o: UpstreamOptions, readonly info: UpstreamExport) {
    this.log = o.log ?? silentLogger;
  }

  /** Connects once; fails at once (no retry) if the server or the export is not there. */
  static async open(o: UpstreamOptions): Promise<NbdUpstream> {
    const c = await connectExport(o.endpoint, o.exportName, o.connectTimeoutMs ?? 10_000);
    const up = new NbdUpstream(o, c.info);
    up.attach(c.socket, c.leftover);
    return up;
  }

  /** Requests sent or waiting, not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  get connected(): boolean {
    return this.socket !== null;
  }

  /**
   * Sends one request; resolves with the data of a READ, undefined otherwise.
   * Rejects with UpstreamError(code) when the server answers an error, or
   * 'EIO' when no server took it within reconnectTimeoutMs.
   */
  request(type: number, flags: number, offset: number, length: number, data?: Buffer): Promise<Buffer | undefined> {
    if (this.closed) return Promise.reject(new UpstreamError('ESHUTDOWN', 'upstream closed'));
    return new Promise((resolve, reject) => {
      const p: Pending = { cookie: this.nextCookie++, type, flags, offset, length, data, sent: false, waitingSince: Date.now(), resolve, reject };
      this.pending.set(p.cookie, p);
      if (this.socket) this.send(p);
      else this.ensureSweeper();
    });
  }

  /** NBD_CMD_DISC after every reply came, then closes; requests still waiting fail. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopSweeper();
    const s = this.socket;
    if (s) {
      const disc = Buffer.alloc(REQUEST_HEADER_LENGTH);
      disc.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
      disc.writeUInt16BE(NBD_CMD.DISC, 6);
      s.end(disc);
      await new Promise<void>((r) => { if (s.destroyed) r(); else s.once('close', () => r()); setTimeout(r, 2000).unref(); });
    }
    this.failAll(new UpstreamError('ESHUTDOWN', 'upstream closed'));
  }

  destroy(): void {
    this.closed = true;
    this.stopSweeper();
    this.socket?.destroy();
    this.socket = null;
    this.failAll(new UpstreamError('ESHUTDOWN', 'upstream destroyed'));
  }

  // ------------------------------------------------------------ connection

  private attach(socket: net.Socket, leftover: Buffer): void {
    this.socket = socket;
    this.connects++;
    this.rx = leftover.length ? [leftover] : [];
    this.rxLength = leftover.length;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => this.log.debug(`upstream socket: ${err.message}`));
    socket.on('close', () => this.onClose(socket));
    // Whatever waited for this connection goes now, oldest first.
    for (const p of [...this.pending.values()].sort((a, b) => (a.cookie < b.cookie ? -1 : 1))) {
      if (!p.sent) this.send(p);
    }
    if (this.rxLength) this.onData(Buffer.alloc(0));
  }

  private send(p: Pending): void {
    const s = this.socket!;
    const h = Buffer.alloc(REQUEST_HEADER_LENGTH);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(p.flags, 4);
    h.writeUInt16BE(p.type, 6);
    h.writeBigUInt64BE(p.cookie, 8);
    h.writeBigUInt64BE(BigInt(p.offset), 16);
    h.writeUInt32BE(p.length, 24);
    p.sent = true;
    p.waitingSince = 0;
    if (p.data) {
      s.cork();
      s.write(h);
      s.write(p.data);
      process.nextTick(() => s.uncork());
    } else {
      s.write(h);
    }
  }

  private onClose(socket: net.Socket): void {
    if (this.socket !== socket) return;
    this.socket = null;
    this.rx = [];
    this.rxLength = 0;
    if (this.closed) return;
    const now = Date.now();
    for (const p of this.pending.values()) {
      if (p.sent) { p.sent = false; p.waitingSince = now; }
    }
    this.log.warn(`upstream ${this.o.exportName}: connection lost; reconnecting (${this.pending.size} requests wait)`);
    this.ensureSweeper();
    void this.reconnect();
  }

  /** Tries again and again (0.1 s doubling to 2 s) until connected or closed. */
  private async reconnect(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    const since = Date.now();
    let delay = 100;
    let lastWhy = '';
    try {
      while (!this.closed) {
        try {
          const c = await connectExport(this.o.endpoint, this.o.exportName, this.o.connectTimeoutMs ?? 10_000);
          if (this.closed) { c.socket.destroy(); return; }
          if (c.info.size !== this.info.size) {
            c.socket.destroy();
            throw new UpstreamError('EIO', `size changed from ${this.info.size} to ${c.info.size} bytes`);
          }
          this.log.info(`upstream ${this.o.exportName}: reconnected after ${Date.now() - since} ms; resending ${this.pending.size} requests`);
          this.stopSweeperIfIdle();
          this.attach(c.socket, c.leftover);
          return;
        } catch (err) {
          const why = (err as Error).message;
          if (why !== lastWhy) this.log.info(`upstream ${this.o.exportName}: reconnect: ${why}`);
          lastWhy = why;
        }
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(2000, delay * 2);
      }
    } finally {
      this.reconnecting = false;
    }
  }

  /** While disconnected: fails requests that waited longer than the reconnect window. */
  private ensureSweeper(): void {
    if (this.sweeper) return;
    this.sweeper = setInterval(() => {
      const limit = Date.now() - this.o.reconnectTimeoutMs;
      for (const p of [...this.pending.values()]) {
        if (!p.sent && p.waitingSince <= limit) {
          this.pending.delete(p.cookie);
          p.reject(new UpstreamError('EIO', `${nameOfCmd(p.type)}: no connection to the server for ${this.o.reconnectTimeoutMs / 1000} s`));
        }
      }
      this.stopSweeperIfIdle();
    }, 250);
  }

  private stopSweeperIfIdle(): void {
    if (this.socket || [...this.pending.values()].every((p) => p.sent)) this.stopSweeper();
  }

  private stopSweeper(): void {
    if (this.sweeper) clearInterval(this.sweeper);
    this.sweeper = null;
  }

  private failAll(err: Error): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  // ----------------------------------------------------------------- replies

  /** The first `n` received bytes, contiguous (joins leading chunks only when they must). */
  private peek(n: number): Buffer {
    if (this.rx[0]!.length < n) {
      let k = 0;
      let len = 0;
      while (len < n) len += this.rx[k++]!.length;
      this.rx.splice(0, k, Buffer.concat(this.rx.slice(0, k), len));
    }
    return this.rx[0]!.subarray(0, n);
  }

  /** Removes the first `n` received bytes; returns them as one buffer of their own. */
  private consume(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    while (at < n) {
      const head = this.rx[0]!;
      const take = Math.min(head.length, n - at);
      head.copy(out, at, 0, take);
      at += take;
      if (take === head.length) this.rx.shift();
      else this.rx[0] = head.subarray(take);
    }
    this.rxLength -= n;
    return out;
  }

  private onData(chunk: Buffer): void {
    if (chunk.length) {
      this.rx.push(chunk);
      this.rxLength += chunk.length;
    }
    while (this.rxLength >= SIMPLE_REPLY_LENGTH) {
      const h = this.peek(SIMPLE_REPLY_LENGTH);
      const magic = h.readUInt32BE(0);
      if (magic !== NBD_SIMPLE_REPLY_MAGIC) {
        this.log.error(`upstream ${this.o.exportName}: bad reply magic 0x${magic.toString(16)}; dropping the connection`);
        this.socket?.destroy();
        return;
      }
      const error = h.readUInt32BE(4);
      const cookie = h.readBigUInt64BE(8);
      const p = this.pending.get(cookie);
      if (!p || !p.sent) {
        this.log.error(`upstream ${this.o.exportName}: reply for unknown cookie ${cookie}; dropping the connection`);
        this.socket?.destroy();
        return;
      }
      const dataLength = error === 0 && p.type === NBD_CMD.READ ? p.length : 0;
      if (this.rxLength < SIMPLE_REPLY_LENGTH + dataLength) return;
      this.consume(SIMPLE_REPLY_LENGTH);
      const data = dataLength ? this.consume(dataLength) : undefined;
      if (error === NBD_E.ESHUTDOWN) {
        // The server is draining before it exits: ask the next one.
        p.sent = false;
        p.waitingSince = Date.now();
        continue;
      }
      this.pending.delete(cookie);
      if (error === 0) p.resolve(data);
      else p.reject(new UpstreamError(WIRE_ERRNO.get(error) ?? 'EIO', `${nameOfCmd(p.type)}: server replied ${nameOfError(error)}`));
    }
  }
}
