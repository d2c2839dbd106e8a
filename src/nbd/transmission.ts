/**
 * The transmission phase (doc/proto.md, "Transmission"): parse requests from
 * the socket's chunks, validate each once, run it on the Export, reply.
 *
 *   chunk ─▶ HEADER ─(WRITE)─▶ PAYLOAD ─▶ execute ─▶ reply
 *              │  └─(invalid WRITE)─▶ DISCARD ─▶ error reply
 *              └─(DISC)─▶ finish in-flight, close
 *
 * Requests run concurrently and reply in any order, the cookie echoed as
 * received. A WRITE payload that lies inside one socket chunk is passed on as a
 * view (no copy); one that spans chunks is gathered into a buffer from the
 * payload pool (common/buffer-pool.ts), given back once the write succeeded;
 * READ data from the shared read-buffer pool goes back once sent. Memory
 * is bounded twice: a READ or WRITE starts only once the process-wide budget
 * admits its bytes (inflight-budget.ts); until then the connection reads
 * nothing more, a WRITE's payload included (it waits in the kernel). And
 * when this connection's bytes in flight (payloads held + reads pending +
 * unsent reply bytes) or requests in flight pass their caps, the socket is
 * paused at the next request header until replies drain.
 *
 * Validation happens here, once (STYLE habit 4): layers below assert.
 */
import {
  NBD_CMD, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE, NBD_E, NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_REPLY_FLAG_DONE, NBD_REQUEST_MAGIC, REQUEST_HEADER_LENGTH, nameOfCmd, nameOfError,
} from './constants.js';
import { describeError, nbdErrorOf } from './errors.js';
import type { Export, Extent, ReadPiece } from './export.js';
import {
  encodeBlockStatus, encodeOffsetDataHeader, encodeOffsetHole, encodeSimpleReply,
  encodeStructuredError, parseRequestHeader, type RequestHeader,
} from './wire.js';
import type { Negotiated } from './handshake.js';
import { BASE_ALLOCATION_ID } from './handshake.js';
import type { Logger } from '../common/log.js';
import { BufferPool, readBuffers } from '../common/buffer-pool.js';
import { DEFAULT_INFLIGHT_BUDGET_BYTES, processInflightBudget, type InflightBudget } from './inflight-budget.js';

export interface TransmissionLimits {
  /** Largest WRITE payload and READ length accepted (the spec's interoperable default). */
  maxPayload: number;
  /** Pause reading when this many bytes are held for requests and unsent replies. */
  maxInflightBytes: number;
  /** Pause reading when this many requests are in flight. */
  maxInflightRequests: number;
  /** Bytes in flight over all connections (default: the process-wide budget, inflight-budget.ts). */
  budget?: InflightBudget;
  /**
   * A WRITE whose payload has not all arrived this long after its header
   * closes the connection (default 30 s): its bytes are taken from the
   * budget, which every other connection may be waiting for, so a client
   * that stops mid-payload must not hold them for ever.
   */
  payloadTimeoutMs?: number;
}

const PAYLOAD_TIMEOUT_MS = 30_000;

export const DEFAULT_TRANSMISSION_LIMITS: TransmissionLimits = {
  maxPayload: 32 * 1024 * 1024,
  maxInflightBytes: 128 * 1024 * 1024,
  maxInflightRequests: 512,
};

/** What transmission needs of the socket. */
export interface ReplySink {
  /** `done` is called once the data was handed to the kernel (or the write failed). */
  write(data: Buffer, done?: (err?: Error | null) => void): boolean;
  cork(): void;
  uncork(): void;
  readonly destroyed: boolean;
  readonly writableLength: number;
  pause(): unknown;
  resume(): unknown;
}

/**
 * Observes each request once its reply is queued (metrics); called only when
 * set, synchronously, so it must be cheap and must not throw. `cmd` is the
 * NBD_CMD value as received (unknown ones too: they are rejected EINVAL);
 * `bytes` is the length of a READ or WRITE (0 for the other commands); `error`
 * is the NBD error sent (0 = success, else an NBD_E value); `startNs` is
 * process.hrtime.bigint() when the request started running (for a request
 * rejected before running: when it was rejected).
 */
export type RequestObserver = (cmd: number, bytes: number, error: number, startNs: bigint) => void;

/** Admission: a READ or WRITE header was taken and waits for the budget (`pending`). */
const enum ParseState { Header, Admission, Payload, Discard, Stopped }

/**
 * Buffers for WRITE payloads, shared by every connection. It keeps as many
 * free bytes as the budget lets be in flight: under a steady load of large
 * writes every buffer is then reused, none dropped to the garbage collector
 * (dropped 1 MiB buffers piled up as external memory between collections).
 */
const payloadPool = new BufferPool({ maxFreeBytes: DEFAULT_INFLIGHT_BUDGET_BYTES });

/** READ data from this size on goes back to the pool by its own write callback. */
const LARGE_READ = 64 * 1024;

/** Zeros for holes in simple replies, shared and never written to. */
const ZEROS = Buffer.alloc(1024 * 1024);

/** Max extents per BLOCK_STATUS reply: keeps replies small; the spec allows 2^20. */
const MAX_EXTENTS = 4096;

export class Transmission {
  private state = ParseState.Header;
  private readonly header = Buffer.allocUnsafe(REQUEST_HEADER_LENGTH);
  private headerFill = 0;
  /** The request waiting for admission, or whose payload is being gathered or discarded. */
  private pending: RequestHeader | null = null;
  private pendingError = 0;
  /** The payload being gathered, from payloadPool. */
  private payload: Buffer | null = null;
  private payloadFill = 0;
  private discardLeft = 0;
  /** When the WRITE now in Payload state was admitted (performance.now()), and its number. */
  private payloadSince = 0;
  private payloadSeq = 0;
  /** At most one per connection, re-armed while payloads keep coming (checkPayloadTimeout). */
  private payloadTimer: NodeJS.Timeout | null = null;

  private inflightRequests = 0;
  private inflightBytes = 0;
  private paused = false;
  /** Bytes received while paused (already read from the kernel), parsed on resume. */
  private backlog: Buffer[] = [];
  private corked = false;
  /** Small pooled READ buffers written since the socket was corked (uncorkNow gives them back). */
  private sentSmall: Buffer[] = [];
  private stopping = false;
  private idleWaiters: Array<() => void> = [];

  private readonly exp: Export;
  private readonly budget: InflightBudget;
  private readonly payloadTimeoutMs: number;
  private readonly flags: number;
  private readonly structured: boolean;
  private readonly baseAllocation: boolean;
  observer: RequestObserver | null = null;

  constructor(
    private readonly sink: ReplySink,
    negotiated: Negotiated,
    private readonly limits: TransmissionLimits,
    private readonly log: Logger,
    /** Called once when the client sent DISC or broke framing: the connection ends. */
    private readonly onFinish: (reason: string, protocolError: boolean) => void,
  ) {
    this.exp = negotiated.export;
    this.budget = limits.budget ?? processInflightBudget;
    this.payloadTimeoutMs = limits.payloadTimeoutMs ?? PAYLOAD_TIMEOUT_MS;
    this.flags = negotiated.transmissionFlags;
    this.structured = negotiated.structuredReplies;
    this.baseAllocation = negotiated.baseAllocation;
  }

  get inFlight(): number {
    return this.inflightRequests;
  }

  /**
   * Feeds bytes from the socket. `transient`: the chunk is a view of a
   * buffer the socket reuses once we return (socket-reads.ts), so nothing
   * may keep a view of it: payloads and backlog are copied.
   */
  onData(chunk: Buffer, transient = false): void {
    let pos = 0;
    const len = chunk.length;
    while (pos < len) {
      if ((this.paused && this.state === ParseState.Header) || this.state === ParseState.Admission) {
        // Over the caps: start no more requests until replies drain, even
        // from bytes already received (one chunk can hold thousands of headers).
        // Only at a header: a payload being read or discarded is finished first.
        // Waiting for the budget: not even this request's payload is taken.
        const rest = pos === 0 ? chunk : chunk.subarray(pos);
        this.backlog.push(transient ? Buffer.from(rest) : rest);
        this.sink.pause();
        return;
      }
      switch (this.state) {
        case ParseState.Header: {
          if (this.headerFill === 0 && len - pos >= REQUEST_HEADER_LENGTH) {
            const h = parseRequestHeader(chunk, pos);
            pos += REQUEST_HEADER_LENGTH;
            this.onHeader(h);
          } else {
            const n = Math.min(REQUEST_HEADER_LENGTH - this.headerFill, len - pos);
            chunk.copy(this.header, this.headerFill, pos, pos + n);
            this.headerFill += n;
            pos += n;
            if (this.headerFill === REQUEST_HEADER_LENGTH) {
              this.headerFill = 0;
              this.onHeader(parseRequestHeader(this.header, 0));
            }
          }
          break;
        }
        case ParseState.Payload: {
          const req = this.pending!;
          if (this.payload === null && len - pos >= req.length && !transient) {
            // Whole payload inside this chunk: hand out a view, no copy.
            const data = chunk.subarray(pos, pos + req.length);
            pos += req.length;
            this.state = ParseState.Header;
            this.pending = null;
            this.startWrite(req, data, false);
          } else {
            if (this.payload === null) {
              this.payload = payloadPool.take(req.length);
              this.payloadFill = 0;
            }
            const n = Math.min(req.length - this.payloadFill, len - pos);
            chunk.copy(this.payload, this.payloadFill, pos, pos + n);
            this.payloadFill += n;
            pos += n;
            if (this.payloadFill === req.length) {
              const data = this.payload;
              this.payload = null;
              this.state = ParseState.Header;
              this.pending = null;
              this.startWrite(req, data, true);
            }
          }
          break;
        }
        case ParseState.Discard: {
          const n = Math.min(this.discardLeft, len - pos);
          this.discardLeft -= n;
          pos += n;
          if (this.discardLeft === 0) {
            const req = this.pending!;
            this.pending = null;
            this.state = ParseState.Header;
            this.reject(req, this.pendingError);
          }
          break;
        }
        case ParseState.Stopped: // (Admission: handled above)
          return;
      }
    }
  }

  /** Stops taking new requests (server shutdown): later ones get ESHUTDOWN. */
  shutdown(): void {
    this.stopping = true;
  }

  /**
   * The peer is gone: parse nothing more, and drop a WRITE whose payload will
   * never arrive (it was counted in flight when its header came), so idle()
   * can resolve.
   */
  abandon(): void {
    if (this.payloadTimer !== null) clearTimeout(this.payloadTimer);
    this.payloadTimer = null;
    const req = this.state === ParseState.Payload ? this.pending : null;
    if (this.state === ParseState.Admission) this.budget.forget(this); // admitted nothing yet
    this.state = ParseState.Stopped;
    this.pending = null;
    if (this.payload !== null) payloadPool.give(this.payload); // never handed to the export
    this.payload = null;
    this.backlog = [];
    if (req) this.done(req.length);
  }

  /** Resolves when no request is in flight. */
  idle(): Promise<void> {
    if (this.inflightRequests === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  // ------------------------------------------------------------ validation

  private onHeader(h: RequestHeader): void {
    if (h.magic !== NBD_REQUEST_MAGIC) {
      this.state = ParseState.Stopped;
      this.onFinish(`bad request magic 0x${h.magic.toString(16)}`, true);
      return;
    }
    if (h.type === NBD_CMD.DISC) {
      this.state = ParseState.Stopped;
      this.onFinish('client sent NBD_CMD_DISC', false);
      return;
    }
    const error = this.stopping && h.type !== NBD_CMD.FLUSH ? NBD_E.ESHUTDOWN : this.validate(h);
    if (h.type === NBD_CMD.WRITE) {
      if (error !== 0) {
        if (h.length === 0) {
          this.reject(h, error);
          return;
        }
        // Consume the payload so the stream stays in sync, then reply.
        this.pending = h;
        this.pendingError = error;
        this.discardLeft = h.length;
        this.state = ParseState.Discard;
        return;
      }
      this.admit(h);
      return;
    }
    if (error !== 0) {
      this.reject(h, error);
      return;
    }
    if (h.type === NBD_CMD.READ) this.admit(h);
    else this.execute(h);
  }

  /** Starts a valid READ or WRITE once the budget has room for its bytes. */
  private admit(h: RequestHeader): void {
    if (this.budget.tryTake(h.length)) {
      this.start(h);
      return;
    }
    this.pending = h;
    this.state = ParseState.Admission;
    this.sink.pause();
    this.budget.wait(this, h.length);
  }

  /** @internal The budget took the bytes of the request we waited with (BudgetWaiter). */
  admitted(bytes: number): void {
    if (this.state !== ParseState.Admission) {
      // Not waiting any more (abandon() forgets us first, so this should not
      // happen): give the bytes back rather than leak them.
      this.budget.release(bytes);
      return;
    }
    const h = this.pending!;
    this.pending = null;
    this.state = ParseState.Header;
    this.start(h);
    this.replayBacklog();
  }

  /** A READ or WRITE whose bytes the budget took: a WRITE reads its payload next. */
  private start(h: RequestHeader): void {
    if (h.type === NBD_CMD.WRITE) {
      this.pending = h;
      this.state = ParseState.Payload;
      this.payloadSeq++;
      this.payloadSince = performance.now();
      this.payloadTimer ??= setTimeout(checkPayloadTimeout, this.payloadTimeoutMs, this, this.payloadSeq).unref();
      this.inflight(h.length);
    } else {
      this.execute(h);
    }
  }

  /** Replies `error` to a request that does not run (invalid, or the server is stopping). */
  private reject(h: RequestHeader, error: number): void {
    this.replyError(h, error, 'invalid request');
    if (this.observer) this.observer(h.type, 0, error, process.hrtime.bigint());
  }

  /** Returns 0 or the NBD error for a request that must not run. */
  private validate(h: RequestHeader): number {
    const f = this.flags;
    const size = this.exp.size;
    const { type, flags, offset, length } = h;
    let allowed = f & NBD_FLAG_SEND_FUA ? NBD_CMD_FLAG_FUA : 0;
    let writes = false;
    switch (type) {
      case NBD_CMD.READ:
        if (this.structured) allowed |= NBD_CMD_FLAG_DF;
        if (length > this.limits.maxPayload) return NBD_E.EINVAL;
        break;
      case NBD_CMD.WRITE:
        writes = true;
        if (length > this.limits.maxPayload) return NBD_E.EINVAL;
        break;
      case NBD_CMD.FLUSH:
        if (!(f & NBD_FLAG_SEND_FLUSH)) return NBD_E.EINVAL;
        if (offset !== 0 || length !== 0) return NBD_E.EINVAL;
        break;
      case NBD_CMD.TRIM:
        if (!(f & NBD_FLAG_SEND_TRIM) && !(f & NBD_FLAG_READ_ONLY)) return NBD_E.EINVAL;
        writes = true;
        break;
      case NBD_CMD.WRITE_ZEROES:
        if (!(f & NBD_FLAG_SEND_WRITE_ZEROES) && !(f & NBD_FLAG_READ_ONLY)) return NBD_E.EINVAL;
        allowed |= NBD_CMD_FLAG_NO_HOLE;
        if (f & NBD_FLAG_SEND_FAST_ZERO) allowed |= NBD_CMD_FLAG_FAST_ZERO;
        writes = true;
        break;
      case NBD_CMD.CACHE:
        if (!(f & NBD_FLAG_SEND_CACHE)) return NBD_E.EINVAL;
        break;
      case NBD_CMD.BLOCK_STATUS:
        if (!this.baseAllocation) return NBD_E.EINVAL;
        allowed |= NBD_CMD_FLAG_REQ_ONE;
        break;
      default:
        return NBD_E.EINVAL;
    }
    if (flags & ~allowed) return NBD_E.EINVAL;
    if (writes && f & NBD_FLAG_READ_ONLY) return NBD_E.EPERM;
    if (type === NBD_CMD.FLUSH) return 0;
    if (length === 0) return NBD_E.EINVAL;
    if (offset + length > size) {
      return type === NBD_CMD.WRITE || type === NBD_CMD.WRITE_ZEROES ? NBD_E.ENOSPC : NBD_E.EINVAL;
    }
    const min = this.exp.blockSize.minimum;
    if (min > 1 && (offset % min !== 0 || length % min !== 0)) return NBD_E.EINVAL;
    return 0;
  }

  // ------------------------------------------------------------- execution

  /** Counts a request in this connection's caps (its budget bytes were taken already). */
  private inflight(bytes: number): void {
    this.inflightRequests++;
    this.inflightBytes += bytes;
    this.checkPressure();
  }

  private done(bytes: number): void {
    this.inflightRequests--;
    this.inflightBytes -= bytes;
    this.checkPressure();
    // After our own check: the budget admits requests queued before ours.
    if (bytes > 0) this.budget.release(bytes);
    if (this.inflightRequests === 0 && this.idleWaiters.length) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const fn of w) fn();
    }
  }

  /**
   * Pauses the socket above this connection's caps; resumes below half of
   * them. Called on every request's start and end, and on 'drain'.
   */
  checkPressure(): void {
    const bytes = this.inflightBytes + this.sink.writableLength;
    if (!this.paused) {
      if (bytes > this.limits.maxInflightBytes || this.inflightRequests >= this.limits.maxInflightRequests) {
        this.paused = true;
        // A payload being read is read to its end first: onData pauses the
        // socket at the next header (a WRITE's own header gets us here).
        if (this.state === ParseState.Header) this.sink.pause();
      }
    } else if (bytes <= this.limits.maxInflightBytes / 2 && this.inflightRequests < this.limits.maxInflightRequests / 2) {
      this.paused = false;
      this.replayBacklog();
    }
  }

  /** Reads again, first the bytes received while paused, unless still paused or waiting for the budget. */
  private replayBacklog(): void {
    if (this.state === ParseState.Admission || this.state === ParseState.Stopped) return;
    // Paused at a header: stay paused. Paused while a payload is due (a WRITE
    // just admitted): read it to its end, onData pauses at the next header.
    if (this.paused && this.state === ParseState.Header) return;
    this.sink.resume();
    const backlog = this.backlog;
    this.backlog = [];
    for (const c of backlog) this.onData(c);
  }

  /** `pooled`: `data` came from payloadPool and goes back once the write succeeded. */
  private startWrite(h: RequestHeader, data: Buffer, pooled: boolean): void {
    const start = this.observer ? process.hrtime.bigint() : 0n;
    // inflight() was counted when the header arrived.
    this.exp.write(h.offset, data, (h.flags & NBD_CMD_FLAG_FUA) !== 0).then(
      () => {
        // Resolved: the export holds no reference (Export.write's contract).
        if (pooled) payloadPool.give(data);
        this.replyOk(h);
        this.finish(h, data.length, 0, start);
      },
      // Failed: never reused, part of it may still be in use (common/buffer-pool.ts).
      (err) => { this.finish(h, data.length, this.replyFailure(h, err), start); },
    );
  }

  /** A request ran and its reply is queued: release what it held, tell the observer. */
  private finish(h: RequestHeader, held: number, error: number, start: bigint): void {
    this.done(held);
    if (this.observer) this.observer(h.type, h.type === NBD_CMD.READ || h.type === NBD_CMD.WRITE ? h.length : 0, error, start);
  }

  private execute(h: RequestHeader): void {
    const exp = this.exp;
    const fua = (h.flags & NBD_CMD_FLAG_FUA) !== 0;
    const start = this.observer ? process.hrtime.bigint() : 0n;
    let op: Promise<unknown>;
    let held = 0;
    switch (h.type) {
      case NBD_CMD.READ:
        held = h.length;
        this.inflight(held);
        exp.read(h.offset, h.length).then(
          (pieces) => { this.replyRead(h, pieces); this.finish(h, held, 0, start); },
          (err) => { this.finish(h, held, this.replyFailure(h, err), start); },
        );
        return;
      case NBD_CMD.BLOCK_STATUS:
        this.inflight(0);
        exp.blockStatus(h.offset, h.length).then(
          (extents) => { this.finish(h, 0, this.replyBlockStatus(h, extents), start); },
          (err) => { this.finish(h, 0, this.replyFailure(h, err), start); },
        );
        return;
      case NBD_CMD.FLUSH:
        op = exp.flush();
        break;
      case NBD_CMD.TRIM:
        op = exp.trim(h.offset, h.length, fua);
        break;
      case NBD_CMD.WRITE_ZEROES:
        op = exp.zero(h.offset, h.length, {
          fua,
          noHole: (h.flags & NBD_CMD_FLAG_NO_HOLE) !== 0,
          fastZero: (h.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
        });
        break;
      case NBD_CMD.CACHE:
        op = exp.cache(h.offset, h.length);
        break;
      default:
        throw new Error(`unreachable: validated command ${h.type}`);
    }
    this.inflight(0);
    op.then(
      () => { this.replyOk(h); this.finish(h, 0, 0, start); },
      (err) => { this.finish(h, 0, this.replyFailure(h, err), start); },
    );
  }

  // --------------------------------------------------------------- replies

  /** Corks the socket for the rest of this tick so replies leave in one writev. */
  private out(): ReplySink | null {
    const s = this.sink;
    if (s.destroyed) return null;
    if (!this.corked) {
      this.corked = true;
      s.cork();
      process.nextTick(uncork, this);
    }
    return s;
  }

  /**
   * @internal The payload timer fired: `seq` was the WRITE in Payload state
   * when it was armed. Still that one, and late: the connection is closed
   * (abandon() then releases its bytes). Another one: re-armed for its own
   * deadline. None: the timer stops until the next WRITE.
   */
  checkPayloadTimeout(seq: number): void {
    this.payloadTimer = null;
    if (this.state !== ParseState.Payload) return;
    const late = performance.now() - this.payloadSince;
    if (this.payloadSeq === seq || late >= this.payloadTimeoutMs) {
      const h = this.pending!;
      this.onFinish(`WRITE at offset ${h.offset}: ${this.payloadFill} of its ${h.length} payload bytes arrived in ${(late / 1000).toFixed(1)} s`, true);
      return;
    }
    this.payloadTimer = setTimeout(checkPayloadTimeout, this.payloadTimeoutMs - late, this, this.payloadSeq).unref();
  }

  /** @internal */
  uncorkNow(): void {
    this.corked = false;
    if (!this.sink.destroyed) this.sink.uncork();
    if (this.sentSmall.length === 0) return;
    // Nothing left unsent: the writev reached the kernel within uncork(), so
    // the small READ buffers of this batch are free again. Otherwise part of
    // the batch waits in the socket: those buffers are left to the GC.
    if (!this.sink.destroyed && this.sink.writableLength === 0) for (const b of this.sentSmall) readBuffers.give(b);
    this.sentSmall = [];
  }

  /**
   * Sends READ data. A buffer from the shared read pool goes back to it once
   * the socket has written it: a large one by its write callback, small ones
   * together after the batch's writev (uncorkNow) — a callback per 4 KiB
   * reply cost more than the buffer it saved.
   */
  private writeData(s: ReplySink, data: Buffer): void {
    if (data.length < readBuffers.minPooled) s.write(data);
    else if (data.length >= LARGE_READ) s.write(data, () => readBuffers.give(data));
    else {
      s.write(data);
      this.sentSmall.push(data);
    }
  }

  private replyOk(h: RequestHeader): void {
    this.out()?.write(encodeSimpleReply(0, h.cookieHi, h.cookieLo));
  }

  /** Logs a failed request's real cause and replies its NBD error, which it returns. */
  private replyFailure(h: RequestHeader, err: unknown): number {
    const code = nbdErrorOf(err, h.flags);
    this.log.warn(`${nameOfCmd(h.type)}: offset ${h.offset} length ${h.length}: ${describeError(err)}`, {
      export: this.exp.name, reply: nameOfError(code), err,
    });
    this.replyError(h, code, describeError(err));
    return code;
  }

  /** Sends an error; READ errors must be structured when structured replies are on. */
  private replyError(h: RequestHeader, error: number, message: string): void {
    if (error !== NBD_E.ESHUTDOWN && this.log.enabled('debug')) {
      this.log.debug(`${nameOfCmd(h.type)}: ${nameOfError(error)}: ${message}`, { offset: h.offset, length: h.length });
    }
    const s = this.out();
    if (!s) return;
    if (this.structured && (h.type === NBD_CMD.READ || h.type === NBD_CMD.BLOCK_STATUS)) {
      s.write(encodeStructuredError(NBD_REPLY_FLAG_DONE, h.cookieHi, h.cookieLo, error, message));
    } else {
      s.write(encodeSimpleReply(error, h.cookieHi, h.cookieLo));
    }
  }

  private replyRead(h: RequestHeader, pieces: ReadPiece[]): void {
    const s = this.out();
    if (!s) return;
    if (!this.structured) {
      s.write(encodeSimpleReply(0, h.cookieHi, h.cookieLo));
      for (const p of pieces) {
        if (p.data) this.writeData(s, p.data);
        else writeZeros(s, p.length);
      }
      return;
    }
    if (h.flags & NBD_CMD_FLAG_DF && pieces.length !== 1) {
      // DF: exactly one data chunk; gather the pieces.
      const all = Buffer.alloc(h.length);
      for (const p of pieces) if (p.data) p.data.copy(all, p.offset - h.offset);
      pieces = [{ offset: h.offset, length: h.length, data: all }];
    }
    const last = pieces.length - 1;
    for (let i = 0; i <= last; i++) {
      const p = pieces[i]!;
      const flags = i === last ? NBD_REPLY_FLAG_DONE : 0;
      if (p.data) {
        s.write(encodeOffsetDataHeader(flags, h.cookieHi, h.cookieLo, p.offset, p.length));
        this.writeData(s, p.data);
      } else if (h.flags & NBD_CMD_FLAG_DF) {
        s.write(encodeOffsetDataHeader(flags, h.cookieHi, h.cookieLo, p.offset, p.length));
        writeZeros(s, p.length);
      } else {
        s.write(encodeOffsetHole(flags, h.cookieHi, h.cookieLo, p.offset, p.length));
      }
    }
  }

  /** Replies the extents; returns 0, or the error sent when the export returned none. */
  private replyBlockStatus(h: RequestHeader, extents: Extent[]): number {
    if (extents.length === 0 || extents[0]!.length === 0) {
      return this.replyFailure(h, Object.assign(new Error(`export ${this.exp.name}: block status returned no extent`), { code: 'EIO' }));
    }
    const s = this.out();
    if (!s) return 0;
    let list: Extent[] = extents;
    if (h.flags & NBD_CMD_FLAG_REQ_ONE) {
      const e = extents[0]!;
      list = [{ length: Math.min(e.length, h.length), flags: e.flags }];
    } else if (list.length > MAX_EXTENTS) {
      list = list.slice(0, MAX_EXTENTS);
    }
    s.write(encodeBlockStatus(NBD_REPLY_FLAG_DONE, h.cookieHi, h.cookieLo, BASE_ALLOCATION_ID, list));
    return 0;
  }
}

function uncork(t: Transmission): void {
  t.uncorkNow();
}

function checkPayloadTimeout(t: Transmission, seq: number): void {
  t.checkPayloadTimeout(seq);
}

function writeZeros(s: ReplySink, length: number): void {
  while (length > 0) {
    const n = Math.min(length, ZEROS.length);
    s.write(ZEROS.subarray(0, n));
    length -= n;
  }
}
