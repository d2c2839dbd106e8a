/**
 * A raw NBD client over node:net for protocol tests: every byte is built by
 * the independent encoder (nbd-encoder.ts), incoming bytes go to a queue read
 * with `readExact(n, timeoutMs)`, and `expectClosed` waits for the server to
 * end the connection. Nothing here validates on the client's behalf: tests
 * see exactly what the server sent.
 */
import net from 'node:net';
import {
  C_FIXED_NEWSTYLE, C_NO_ZEROES, CMD, OPT, REP, REPLY_FLAG_DONE, REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
  clientFlags, infoRequestData, metaContextData, optionRequest, parseChunkBody, parseChunkHeader, parseGreeting,
  parseInfoReply, parseOptionReplyHeader, parseRepMetaContext, parseSimpleReply, requestHeader,
  type ChunkBody, type Greeting, type OptionOverrides, type RequestFields,
} from './nbd-encoder.js';

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export type Reply =
  | { kind: 'simple'; magic: number; error: number; cookie: bigint; data?: Buffer }
  | { kind: 'chunk'; magic: number; flags: number; type: number; cookie: bigint; length: number; body: ChunkBody };

export interface HandshakeOptions {
  structured?: boolean;
  /** Select base:allocation (needs `structured`). */
  metaContext?: boolean;
  /** Client flags to send (default FIXED_NEWSTYLE | NO_ZEROES). */
  clientFlags?: number;
}

export class ClosedError extends Error {
  constructor(message: string) { super(message); this.name = 'ClosedError'; }
}

export class RawClient {
  readonly socket: net.Socket;
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Set once the server ended or reset the connection. */
  ended = false;
  private notify: (() => void) | null = null;
  /** Total bytes received. */
  received = 0;

  /** Set by handshakeTo: structured replies negotiated. */
  structured = false;
  exportSize = 0n;
  /** Context id of base:allocation, when selected. */
  metaContextId: number | null = null;
  /** Expected data lengths of simple READ replies, by cookie. */
  private readonly simpleReads = new Map<bigint, number>();
  private nextCookie = 1n;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.buffered += c.length;
      this.received += c.length;
      this.wake();
    });
    const end = () => { this.ended = true; this.wake(); };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', () => { /* a reset is an end like any other */ });
  }

  static connect(port: number, host = '127.0.0.1'): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host, noDelay: true });
      s.once('connect', () => { s.off('error', reject); resolve(new RawClient(s)); });
      s.once('error', reject);
    });
  }

  /** A client over a socket already connected: the TLS session after STARTTLS (test/helpers/nbd-tls.ts). */
  static over(socket: net.Socket): RawClient {
    return new RawClient(socket);
  }

  private wake(): void {
    const n = this.notify;
    this.notify = null;
    n?.();
  }

  private waitEvent(deadline: number): Promise<boolean> {
    return new Promise((resolve) => {
      const left = deadline - Date.now();
      if (left <= 0) { resolve(false); return; }
      const t = setTimeout(() => { this.notify = null; resolve(false); }, left);
      this.notify = () => { clearTimeout(t); resolve(true); };
    });
  }

  get available(): number {
    return this.buffered;
  }

  write(data: Buffer): boolean {
    return this.socket.write(data);
  }

  /** Resolves with exactly `n` bytes; rejects on timeout or when the server closes first. */
  async readExact(n: number, timeoutMs = 2000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buffered < n) {
      if (this.ended) throw new ClosedError(`connection closed with ${this.buffered} of ${n} bytes received`);
      if (!(await this.waitEvent(deadline)) && this.buffered < n && !this.ended) {
        throw new Error(`readExact(${n}): timed out after ${timeoutMs} ms with ${this.buffered} bytes`);
      }
    }
    return this.take(n);
  }

  /** Takes everything received so far. */
  drain(): Buffer {
    return this.take(this.buffered);
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first!.length >= n) {
      if (first!.length === n) this.chunks.shift();
      else this.chunks[0] = first!.subarray(n);
      return first!.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - filled);
      c.copy(out, filled, 0, k);
      filled += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }

  /**
   * Resolves when the server has ended the connection (FIN or reset) within
   * `timeoutMs`, with any bytes still unread; rejects otherwise.
   */
  async expectClosed(timeoutMs = 2000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) {
      if (!(await this.waitEvent(deadline)) && !this.ended) throw new Error(`connection still open after ${timeoutMs} ms`);
    }
    return this.drain();
  }

  /** True when the connection is still open after `ms` (and nothing ended it). */
  async staysOpen(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.ended && Date.now() < deadline) await this.waitEvent(deadline);
    return !this.ended;
  }

  destroy(): void {
    this.socket.destroy();
  }

  // ------------------------------------------------------------ handshake

  async readGreeting(timeoutMs = 2000): Promise<Greeting> {
    return parseGreeting(await this.readExact(18, timeoutMs));
  }

  sendOption(option: number, data?: Buffer, o?: OptionOverrides): void {
    this.write(optionRequest(option, data, o));
  }

  /** Reads one option reply (20-byte header + data). */
  async readOptionReply(timeoutMs = 2000): Promise<OptionReply> {
    const h = parseOptionReplyHeader(await this.readExact(20, timeoutMs));
    if (h.magic !== REPLY_MAGIC) throw new Error(`bad option reply magic 0x${h.magic.toString(16)}`);
    const data = h.length ? await this.readExact(h.length, timeoutMs) : Buffer.alloc(0);
    return { option: h.option, type: h.type, data };
  }

  /** Reads option replies up to and including the final one (ACK or an error). */
  async readOptionReplies(timeoutMs = 2000): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply(timeoutMs);
      out.push(r);
      if (r.type === REP.ACK || r.type >= 0x80000000) return out;
    }
  }

  /** Sends an option and reads its replies. */
  async option(option: number, data?: Buffer, o?: OptionOverrides): Promise<OptionReply[]> {
    this.sendOption(option, data, o);
    return this.readOptionReplies();
  }

  /** Reads the greeting and sends client flags. */
  async start(flags = C_FIXED_NEWSTYLE | C_NO_ZEROES): Promise<Greeting> {
    const g = await this.readGreeting();
    this.write(clientFlags(flags));
    return g;
  }

  /**
   * Fixed newstyle handshake: greeting, client flags, optional
   * STRUCTURED_REPLY and SET_META_CONTEXT base:allocation, then GO.
   * Returns the transmission flags (size and context id are kept on `this`).
   */
  async handshakeTo(exportName: string, o: HandshakeOptions = {}): Promise<number> {
    await this.start(o.clientFlags ?? (C_FIXED_NEWSTYLE | C_NO_ZEROES));
    if (o.structured) {
      const r = await this.option(OPT.STRUCTURED_REPLY);
      if (r[0]!.type !== REP.ACK) throw new Error(`STRUCTURED_REPLY refused: 0x${r[0]!.type.toString(16)}`);
      this.structured = true;
    }
    if (o.metaContext) {
      const r = await this.option(OPT.SET_META_CONTEXT, metaContextData(exportName, ['base:allocation']));
      const ctx = r.find((x) => x.type === REP.META_CONTEXT);
      if (!ctx) throw new Error('SET_META_CONTEXT: base:allocation not selected');
      this.metaContextId = parseRepMetaContext(ctx.data).id;
    }
    const replies = await this.option(OPT.GO, infoRequestData(exportName, []));
    const last = replies[replies.length - 1]!;
    if (last.type !== REP.ACK) throw new Error(`GO ${exportName}: 0x${last.type.toString(16)} ${last.data.toString()}`);
    for (const r of replies) {
      if (r.type !== REP.INFO) continue;
      const info = parseInfoReply(r.data);
      if (info.type === 0 && 'size' in info) {
        this.exportSize = info.size;
        return info.flags;
      }
    }
    throw new Error('GO: no NBD_INFO_EXPORT');
  }

  // --------------------------------------------------------- transmission

  /** Sends a request header (+ payload); returns its cookie. */
  request(r: Omit<RequestFields, 'cookie'> & { cookie?: bigint }, payload?: Buffer): bigint {
    const cookie = r.cookie ?? this.nextCookie++;
    if (r.type === CMD.READ && !this.structured) this.simpleReads.set(cookie, r.length ?? 0);
    const h = requestHeader({ ...r, cookie });
    if (payload) this.write(Buffer.concat([h, payload]));
    else this.write(h);
    return cookie;
  }

  /** Tells readReply the data length of a simple READ reply sent without `request` (raw writes). */
  expectRead(cookie: bigint, length: number): void {
    this.simpleReads.set(cookie, length);
  }

  /**
   * Reads one reply: a simple reply (with the data of a successful READ sent
   * through `request`) or one structured chunk with its parsed payload.
   */
  async readReply(timeoutMs = 5000): Promise<Reply> {
    const magic = (await this.readExact(4, timeoutMs)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const rest = await this.readExact(12, timeoutMs);
      const h = parseSimpleReply(Buffer.concat([Buffer.from([0x67, 0x44, 0x66, 0x98]), rest]));
      const reply: Reply = { kind: 'simple', magic, error: h.error, cookie: h.cookie };
      const len = this.simpleReads.get(h.cookie);
      if (len !== undefined) {
        this.simpleReads.delete(h.cookie);
        if (h.error === 0) reply.data = await this.readExact(len, timeoutMs);
      }
      return reply;
    }
    if (magic === STRUCTURED_REPLY_MAGIC) {
      const rest = await this.readExact(16, timeoutMs);
      const hb = Buffer.alloc(20);
      hb.writeUInt32BE(magic, 0);
      rest.copy(hb, 4);
      const h = parseChunkHeader(hb);
      const payload = h.length ? await this.readExact(h.length, timeoutMs) : Buffer.alloc(0);
      return { kind: 'chunk', magic, flags: h.flags, type: h.type, cookie: h.cookie, length: h.length, body: parseChunkBody(h.type, payload) };
    }
    throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  }

  /**
   * Reads replies until `count` requests are complete (a simple reply, or a
   * chunk with DONE); returns them grouped by cookie in arrival order.
   */
  async collect(count: number, timeoutMs = 5000): Promise<Map<bigint, Reply[]>> {
    const out = new Map<bigint, Reply[]>();
    let done = 0;
    while (done < count) {
      const r = await this.readReply(timeoutMs);
      const list = out.get(r.cookie) ?? [];
      list.push(r);
      out.set(r.cookie, list);
      if (r.kind === 'simple' || r.flags & REPLY_FLAG_DONE) done++;
    }
    return out;
  }

  /** Sends one request and reads its complete reply (all chunks). */
  async roundTrip(r: Omit<RequestFields, 'cookie'> & { cookie?: bigint }, payload?: Buffer, timeoutMs = 5000): Promise<Reply[]> {
    const cookie = this.request(r, payload);
    const m = await this.collect(1, timeoutMs);
    const list = m.get(cookie);
    if (!list || m.size !== 1) throw new Error(`reply for an unexpected cookie (wanted ${cookie})`);
    return list;
  }

  /** READ through roundTrip; returns the bytes (holes as zeros) or throws on an error reply. */
  async readData(offset: number, length: number, flags = 0): Promise<Buffer> {
    const replies = await this.roundTrip({ type: CMD.READ, offset, length, flags });
    return assembleRead(replies, offset, length);
  }

  /** WRITE through roundTrip; returns the error value (0 on success). */
  async writeData(offset: number, data: Buffer, flags = 0): Promise<number> {
    const replies = await this.roundTrip({ type: CMD.WRITE, offset, length: data.length, flags }, data);
    return errorOf(replies);
  }
}

/** The NBD error of a complete reply: a simple reply's error or the first ERROR chunk's. */
export function errorOf(replies: Reply[]): number {
  for (const r of replies) {
    if (r.kind === 'simple') return r.error;
    if (r.body.kind === 'error') return r.body.error;
  }
  return 0;
}

/** Rebuilds READ data from a simple reply or from OFFSET_DATA/OFFSET_HOLE chunks. */
export function assembleRead(replies: Reply[], offset: number, length: number): Buffer {
  const err = errorOf(replies);
  if (err) throw new Error(`READ failed with error ${err}`);
  const first = replies[0]!;
  if (first.kind === 'simple') return first.data!;
  const out = Buffer.alloc(length);
  let covered = 0;
  for (const r of replies) {
    if (r.kind !== 'chunk') continue;
    const b = r.body;
    if (b.kind === 'data') {
      b.data.copy(out, Number(b.offset) - offset);
      covered += b.data.length;
    } else if (b.kind === 'hole') {
      covered += b.size;
    }
  }
  if (covered !== length) throw new Error(`READ chunks cover ${covered} of ${length} bytes`);
  return out;
}

/** A helper for tests that need a connected, negotiated client. */
export async function connectTo(port: number, exportName: string, o: HandshakeOptions = {}): Promise<{ client: RawClient; flags: number }> {
  const client = await RawClient.connect(port);
  const flags = await client.handshakeTo(exportName, o);
  return { client, flags };
}
