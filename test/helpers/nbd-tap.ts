/**
 * A recording TCP relay between an NBD client and server, for tests that need
 * to know what a real client (QEMU) sent and when: it forwards both directions
 * untouched and decodes only the client's stream (handshake options, then
 * request headers), timestamping every connect, request and close.
 *
 *   const tap = await NbdTap.listen(daemon.port);       // client connects to tap.port
 *   ... run the client against nbd://127.0.0.1:${tap.port}/v ...
 *   tap.events  // [{ at, conn, what: 'connect' }, { at, conn, what: 'READ', offset, length }, …]
 *   await tap.close();
 *
 * The client stream (doc/proto.md of NetworkBlockDevice/nbd): 4 bytes of
 * client flags, then options ("IHAVEOPT", option, length, data) until
 * NBD_OPT_GO or NBD_OPT_EXPORT_NAME, then 28-byte requests (magic, flags,
 * type, cookie, offset, length), NBD_CMD_WRITE followed by its payload.
 * Assumes the server accepts the GO (a refused GO ends our decoding of that
 * connection: it is logged as 'unparsed'). No extended headers, no TLS.
 */
import net from 'node:net';
import { CMD, IHAVEOPT, OPT, REQUEST_MAGIC } from './nbd-encoder.js';

export type NbdTapWhat = 'connect' | 'close' | 'unparsed' | keyof typeof CMD | `CMD_${number}`;

export interface NbdTapEvent {
  /** Date.now() when the client's bytes (or the event) reached the relay. */
  at: number;
  /** Connection number on this tap, from 1. */
  conn: number;
  what: NbdTapWhat;
  offset?: number;
  length?: number;
}

const cmdName = new Map<number, keyof typeof CMD>(Object.entries(CMD).map(([k, v]) => [v, k as keyof typeof CMD]));

/** Decodes one connection's client→server bytes into events. */
class ClientStream {
  private buf: Buffer = Buffer.alloc(0);
  private phase: 'flags' | 'options' | 'requests' | 'lost' = 'flags';
  /** Payload bytes of a WRITE still to pass. */
  private skip = 0;

  constructor(private readonly emit: (e: Omit<NbdTapEvent, 'at' | 'conn'>) => void) {}

  feed(chunk: Buffer): void {
    if (this.phase === 'lost') return;
    if (this.skip > 0) {
      const n = Math.min(this.skip, chunk.length);
      this.skip -= n;
      chunk = chunk.subarray(n);
    }
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      if (this.phase === 'flags') {
        if (this.buf.length < 4) return;
        this.buf = this.buf.subarray(4);
        this.phase = 'options';
      } else if (this.phase === 'options') {
        if (this.buf.length < 16) return;
        if (this.buf.readBigUInt64BE(0) !== IHAVEOPT) return this.lose();
        const opt = this.buf.readUInt32BE(8);
        const len = this.buf.readUInt32BE(12);
        if (this.buf.length < 16 + len) return;
        this.buf = this.buf.subarray(16 + len);
        if (opt === OPT.GO || opt === OPT.EXPORT_NAME) this.phase = 'requests';
      } else if (this.phase === 'requests') {
        if (this.buf.length < 28) return;
        if (this.buf.readUInt32BE(0) !== REQUEST_MAGIC) return this.lose();
        const type = this.buf.readUInt16BE(6);
        const offset = Number(this.buf.readBigUInt64BE(16));
        const length = this.buf.readUInt32BE(24);
        this.emit({ what: cmdName.get(type) ?? `CMD_${type}`, offset, length });
        this.buf = this.buf.subarray(28);
        if (type === CMD.WRITE) {
          const n = Math.min(length, this.buf.length);
          this.buf = this.buf.subarray(n);
          this.skip = length - n;
          if (this.skip > 0) return;
        }
      } else {
        return;
      }
    }
  }

  private lose(): void {
    this.phase = 'lost';
    this.buf = Buffer.alloc(0);
    this.emit({ what: 'unparsed' });
  }
}

export class NbdTap {
  readonly events: NbdTapEvent[] = [];
  private readonly sockets = new Set<net.Socket>();
  private conns = 0;

  private constructor(private readonly server: net.Server, readonly port: number) {}

  /** Listens on 127.0.0.1 (a free port) and relays every connection to 127.0.0.1:targetPort. */
  static async listen(targetPort: number): Promise<NbdTap> {
    let tap!: NbdTap;
    const server = net.createServer((client) => tap.relay(client, targetPort));
    const port = await new Promise<number>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port));
    });
    tap = new NbdTap(server, port);
    return tap;
  }

  /** Stops listening and cuts every relayed connection. */
  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private relay(client: net.Socket, targetPort: number): void {
    const conn = ++this.conns;
    const record = (e: Omit<NbdTapEvent, 'at' | 'conn'>) => this.events.push({ at: Date.now(), conn, ...e });
    record({ what: 'connect' });
    const server = net.connect(targetPort, '127.0.0.1');
    this.sockets.add(client).add(server);
    client.setNoDelay(true);
    server.setNoDelay(true);
    const stream = new ClientStream(record);
    client.on('data', (b: Buffer) => stream.feed(b));
    client.pipe(server);
    server.pipe(client);
    let closed = false;
    const end = () => {
      if (closed) return;
      closed = true;
      record({ what: 'close' });
      client.destroy();
      server.destroy();
      this.sockets.delete(client);
      this.sockets.delete(server);
    };
    client.on('close', end).on('error', end);
    server.on('close', end).on('error', end);
  }
}

/**
 * The events as short lines, for a test's log: one line per connect and
 * close, and one per run of requests on a connection with no pause longer
 * than `gapMs`, with counts per request type:
 *   "+12.345s conn 1 WRITE 40, FLUSH 40 until +13.200s"
 *   "+20.001s conn 2 READ offset 0 length 512"
 * `t0` is the zero of the relative times (Date.now() ms).
 */
export function tapTimeline(events: readonly NbdTapEvent[], t0: number, gapMs = 250): string[] {
  const out: string[] = [];
  const rel = (ms: number) => `+${((ms - t0) / 1000).toFixed(3)}s`;
  const isRequest = (e: NbdTapEvent) => e.what !== 'connect' && e.what !== 'close' && e.what !== 'unparsed';
  for (let i = 0; i < events.length;) {
    const e = events[i]!;
    if (!isRequest(e)) {
      out.push(`${rel(e.at)} conn ${e.conn} ${e.what}`);
      i++;
      continue;
    }
    let j = i + 1;
    while (j < events.length && isRequest(events[j]!) && events[j]!.conn === e.conn
      && events[j]!.at - events[j - 1]!.at <= gapMs) j++;
    if (j === i + 1) {
      out.push(`${rel(e.at)} conn ${e.conn} ${e.what} offset ${e.offset} length ${e.length}`);
    } else {
      const counts = new Map<string, number>();
      for (let k = i; k < j; k++) counts.set(events[k]!.what, (counts.get(events[k]!.what) ?? 0) + 1);
      const list = [...counts].map(([w, n]) => `${w} ${n}`).join(', ');
      out.push(`${rel(e.at)} conn ${e.conn} ${list} until ${rel(events[j - 1]!.at)}`);
    }
    i = j;
  }
  return out;
}
