/**
 * A structure-aware fuzzer for the NBD server, shared by the unit test
 * (test/unit/nbd/fuzz.test.ts, a few thousand frames) and long runs in bench/.
 *
 * Each session is a real, valid conversation built from descriptors (client
 * flags, options, GO/EXPORT_NAME/ABORT, requests with payloads, DISC), then
 * damaged by one to three mutations: bit flips, a field set to an interesting
 * or random value (option, command, flags, offset, lengths, magic), huge
 * lengths, truncation inside a frame chosen uniformly over the stages,
 * garbage after a frame, frames dropped/duplicated/swapped, and delivery in
 * pieces (tiny ones over the head of every frame, a few cuts inside long
 * bodies, so frames cross the server's read boundaries at bounded cost).
 * Sessions run one at a time or a few in parallel; each ends when the server
 * closes it or the client gives up after a short quiet period.
 *
 * After every batch a long-lived "witness" connection must still write and
 * read back its data; at the end the server must hold no connection but the
 * witness and memory must not have grown without bound. Any failure throws a
 * FuzzFailure naming the seed and the session, so ARCHIPELAGO_FUZZ_SEED
 * reproduces it. Bytes come from the independent encoder (nbd-encoder.ts).
 */
import net from 'node:net';
import v8 from 'node:v8';
import vm from 'node:vm';
import {
  C_FIXED_NEWSTYLE, C_NO_ZEROES, CMD, IHAVEOPT, INFO, OPT, REP, REQUEST_MAGIC, clientFlags, greeting,
  infoRequestData, metaContextData, optionRequest, parseInfoReply, requestHeader,
} from './nbd-encoder.js';
import { RawClient, assembleRead, errorOf } from './nbd-raw-client.js';
import { mulberry32u32 } from '../../src/common/prng.js';

export interface FuzzOptions {
  port: number;
  host?: string;
  /** Writable export the fuzz sessions talk to. Keep it small: its pages count as memory growth. */
  exportName: string;
  /** Export of the witness connection (default: exportName). A separate one keeps fuzz writes off it. */
  witnessExport?: string;
  seed: number;
  /** Frames to send over all sessions (a frame = flags, one option, one request, a payload, garbage). */
  frames: number;
  /** Sessions in a parallel batch (default 4). */
  parallel?: number;
  /** Share of batches run in parallel (default 0.2). */
  parallelShare?: number;
  /** A session gives up after this long without hearing from the server (default 30 ms). */
  idleMs?: number;
  /** Hard limit per session (default 1500 ms). */
  maxSessionMs?: number;
  /** The server's live connection count, for the leak check (skipped when absent). */
  connectionCount?: () => number;
  /** Memory growth allowed at the end, arrayBuffers after a full GC (default 64 MiB + export size). */
  maxMemoryGrowth?: number;
  log?: (line: string) => void;
}

export interface FuzzResult {
  seed: number;
  sessions: number;
  frames: number;
  batches: number;
  parallelBatches: number;
  closedByServer: number;
  gaveUp: number;
  witnessChecks: number;
  /** Socket writes over all sessions (one per session, more for `split`). */
  writes: number;
  /** Mutations applied, by name. */
  mutations: Record<string, number>;
  /** Truncations, by the stage of the frame cut. */
  truncatedAt: Record<string, number>;
  memoryGrowth: number;
  ms: number;
}

export class FuzzFailure extends Error {
  constructor(message: string, readonly seed: number, readonly session: number | null, readonly detail: string) {
    super(`fuzz seed ${seed}${session === null ? '' : ` session ${session}`}: ${message}\n${detail}`);
    this.name = 'FuzzFailure';
  }
}

// ------------------------------------------------------------------ PRNG

/** mulberry32: small, fast, good enough for fuzzing, reproducible from a u32. */
export class Rng {
  readonly u32: () => number;
  constructor(seed: number) { this.u32 = mulberry32u32(seed); }
  /** Integer in [0, n). */
  int(n: number): number { return Math.floor((this.u32() / 0x1_0000_0000) * n); }
  chance(p: number): boolean { return this.u32() / 0x1_0000_0000 < p; }
  pick<T>(xs: readonly T[]): T { return xs[this.int(xs.length)]!; }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i += 4) {
      const v = this.u32();
      for (let k = 0; k < 4 && i + k < n; k++) b[i + k] = (v >>> (8 * k)) & 0xff;
    }
    return b;
  }
  u64(): bigint { return (BigInt(this.u32()) << 32n) | BigInt(this.u32()); }
}

/** The seed of session `i`: independent streams, so one session replays alone. */
function sessionSeed(seed: number, i: number): number {
  let z = (seed + Math.imul(i + 1, 0x9e3779b9)) >>> 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
  return (z ^ (z >>> 16)) >>> 0;
}

// ------------------------------------------------------ session structure

type Stage = 'flags' | 'option' | 'enter' | 'request' | 'payload' | 'garbage';

type Frame =
  | { kind: 'flags'; stage: Stage; value: number }
  | { kind: 'option'; stage: Stage; magic: bigint; option: number; data: Buffer; length?: number }
  | { kind: 'request'; stage: Stage; magic: number; flags: number; type: number; cookie: bigint; offset: bigint; length: number }
  | { kind: 'raw'; stage: Stage; bytes: Buffer };

function encodeFrame(f: Frame): Buffer {
  switch (f.kind) {
    case 'flags': return clientFlags(f.value);
    case 'option': return optionRequest(f.option, f.data, { magic: f.magic, length: f.length });
    case 'request': return requestHeader(f);
    case 'raw': return f.bytes;
  }
}

const KiB = 1024;
const MiB = 1024 * KiB;

/** A valid session: handshake, then requests inside the export. */
function buildSession(r: Rng, exportName: string, size: number): Frame[] {
  const frames: Frame[] = [];
  frames.push({ kind: 'flags', stage: 'flags', value: r.chance(0.8) ? C_FIXED_NEWSTYLE | C_NO_ZEROES : C_FIXED_NEWSTYLE });
  const opt = (option: number, data: Buffer = Buffer.alloc(0), stage: Stage = 'option'): Frame =>
    ({ kind: 'option', stage, magic: IHAVEOPT, option, data });
  const structured = r.chance(0.6);
  if (structured) frames.push(opt(OPT.STRUCTURED_REPLY));
  const extra = r.int(4);
  for (let i = 0; i < extra; i++) {
    frames.push(r.pick([
      () => opt(OPT.LIST),
      () => opt(OPT.INFO, infoRequestData(exportName, [INFO.NAME, INFO.BLOCK_SIZE])),
      () => opt(OPT.LIST_META_CONTEXT, metaContextData(exportName, ['base:'])),
      () => opt(OPT.SET_META_CONTEXT, metaContextData(exportName, ['base:allocation'])),
      () => opt(OPT.STARTTLS),
      () => opt(99, r.bytes(r.int(32))),
      () => opt(OPT.INFO, infoRequestData('no-such-export', [])),
    ])());
  }
  if (structured && r.chance(0.7)) frames.push(opt(OPT.SET_META_CONTEXT, metaContextData(exportName, ['base:allocation'])));
  const enter = r.int(100);
  if (enter < 85) frames.push(opt(OPT.GO, infoRequestData(exportName, r.chance(0.5) ? [INFO.BLOCK_SIZE] : []), 'enter'));
  else if (enter < 95) frames.push(opt(OPT.EXPORT_NAME, Buffer.from(exportName), 'enter'));
  else { frames.push(opt(OPT.ABORT, Buffer.alloc(0), 'enter')); return frames; }

  const n = 1 + r.int(8);
  for (let i = 0; i < n; i++) {
    const type = r.pick([CMD.READ, CMD.READ, CMD.WRITE, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS, CMD.CACHE]);
    const length = type === CMD.FLUSH ? 0 : 1 + r.int(r.chance(0.9) ? 64 * KiB : MiB);
    const offset = type === CMD.FLUSH ? 0 : r.int(Math.max(1, size - length));
    const flags = r.chance(0.7) ? 0 : r.pick([1, 2, 4, 8, 16]);
    frames.push({ kind: 'request', stage: 'request', magic: REQUEST_MAGIC, flags, type, cookie: r.u64(), offset: BigInt(offset), length });
    if (type === CMD.WRITE) frames.push({ kind: 'raw', stage: 'payload', bytes: r.bytes(length) });
  }
  if (r.chance(0.5)) frames.push({ kind: 'request', stage: 'request', magic: REQUEST_MAGIC, flags: 0, type: CMD.DISC, cookie: r.u64(), offset: 0n, length: 0 });
  return frames;
}

const INTERESTING_U32 = [0, 1, 2, 7, 8, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000, 0x1_0001, 16 * MiB, 16 * MiB + 1,
  32 * MiB, 32 * MiB + 1, 33 * MiB, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];

function interestingOffset(r: Rng, size: number): bigint {
  return r.pick([0n, 1n, BigInt(size - 1), BigInt(size), BigInt(size + 1), 2n ** 32n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n,
    2n ** 63n, 2n ** 64n - 1n, 2n ** 64n - 512n, r.u64(), BigInt(r.int(size))]);
}

interface Plan {
  frames: Frame[];
  /** Byte position to cut the stream at, or null. */
  cut: number | null;
  /** Flipped bit positions in the encoded stream. */
  flips: number[];
  /** `split`: pieces of at most this many bytes over each frame's head (0 = one write). */
  piece: number;
  /** `split`: seed of the cuts inside frame bodies (drawn at render time, once frames are final). */
  splitSeed: number;
  applied: string[];
}

type Mutation = (r: Rng, p: Plan, size: number, stats: FuzzResult) => string;

const mutations: Record<string, Mutation> = {
  bitflip(r, p) {
    const total = p.frames.reduce((n, f) => n + encodeFrame(f).length, 0);
    const k = 1 + r.int(8);
    for (let i = 0; i < k; i++) p.flips.push(r.int(total * 8));
    return `bitflip ×${k}`;
  },
  field(r, p, size) {
    const i = r.int(p.frames.length);
    const f = p.frames[i]!;
    switch (f.kind) {
      case 'flags':
        f.value = r.chance(0.5) ? 1 << r.int(32) : r.u32();
        return `frame ${i}: client flags 0x${(f.value >>> 0).toString(16)}`;
      case 'option': {
        const which = r.int(4);
        if (which === 0) { f.option = r.chance(0.7) ? r.int(16) : r.u32(); return `frame ${i}: option ${f.option}`; }
        if (which === 1) { f.length = r.chance(0.5) ? r.pick(INTERESTING_U32) : f.data.length + r.pick([-2, -1, 1, 2, 100]); return `frame ${i}: option length ${f.length}`; }
        if (which === 2) { f.magic = r.chance(0.5) ? r.u64() : IHAVEOPT ^ (1n << BigInt(r.int(64))); return `frame ${i}: option magic`; }
        // Corrupt a u32/u16 inside the option data (name length, counts).
        if (f.data.length >= 4) {
          const d = Buffer.from(f.data);
          const at = r.int(d.length - 3);
          d.writeUInt32BE(r.pick(INTERESTING_U32) >>> 0, at);
          f.data = d;
          return `frame ${i}: option data u32 at ${at}`;
        }
        f.data = r.bytes(r.int(64));
        return `frame ${i}: option data random ${f.data.length}`;
      }
      case 'request': {
        const which = r.int(6);
        if (which === 0) { f.type = r.chance(0.8) ? r.int(12) : r.int(0x10000); return `frame ${i}: command ${f.type}`; }
        if (which === 1) { f.flags = r.chance(0.5) ? 1 << r.int(16) : r.int(0x10000); return `frame ${i}: flags 0x${f.flags.toString(16)}`; }
        if (which === 2) { f.offset = interestingOffset(r, size); return `frame ${i}: offset ${f.offset}`; }
        if (which === 3) { f.length = r.pick(INTERESTING_U32); return `frame ${i}: length ${f.length}`; }
        if (which === 4) { f.magic = r.chance(0.5) ? r.u32() : (REQUEST_MAGIC ^ (1 << r.int(32))) >>> 0; return `frame ${i}: magic 0x${f.magic.toString(16)}`; }
        f.cookie = r.u64();
        return `frame ${i}: cookie`;
      }
      case 'raw': {
        // Payload shorter or longer than its header says.
        const delta = r.pick([-1, 1, -100, 100, 4096]);
        const n = Math.max(0, f.bytes.length + delta);
        f.bytes = n <= f.bytes.length ? f.bytes.subarray(0, n) : Buffer.concat([f.bytes, r.bytes(n - f.bytes.length)]);
        return `frame ${i}: payload ${delta > 0 ? '+' : ''}${delta}`;
      }
    }
  },
  huge(r, p) {
    const candidates = p.frames.map((f, i) => [f, i] as const).filter(([f]) => f.kind === 'option' || f.kind === 'request');
    if (!candidates.length) return 'huge: nothing to grow';
    const [f, i] = r.pick(candidates);
    const v = r.pick([0xffffffff, 0x80000000, 16 * MiB + 1, 32 * MiB + 1, 64 * KiB + 1]);
    if (f.kind === 'option') f.length = v;
    else if (f.kind === 'request') f.length = v;
    return `frame ${i}: huge length ${v}`;
  },
  truncate(r, p, _size, stats) {
    // A stage first, so short stages are cut as often as long payloads.
    const stages = [...new Set(p.frames.map((f) => f.stage))];
    const stage = r.pick(stages);
    const idx = p.frames.map((f, i) => [f, i] as const).filter(([f]) => f.stage === stage).map(([, i]) => i);
    const i = r.pick(idx);
    let start = 0;
    for (let k = 0; k < i; k++) start += encodeFrame(p.frames[k]!).length;
    const len = encodeFrame(p.frames[i]!).length;
    p.cut = start + r.int(Math.max(1, len));
    stats.truncatedAt[stage] = (stats.truncatedAt[stage] ?? 0) + 1;
    return `truncate in frame ${i} (${stage}) at byte ${p.cut}`;
  },
  garbage(r, p) {
    const i = r.int(p.frames.length + 1);
    const n = 1 + r.int(r.chance(0.9) ? 64 : 4096);
    p.frames.splice(i, 0, { kind: 'raw', stage: 'garbage', bytes: r.bytes(n) });
    return `garbage ${n} bytes before frame ${i}`;
  },
  shuffle(r, p) {
    if (p.frames.length < 2) return 'shuffle: too short';
    const i = r.int(p.frames.length - 1);
    const what = r.int(3);
    if (what === 0) { p.frames.splice(i, 1); return `drop frame ${i}`; }
    if (what === 1) { p.frames.splice(i, 0, { ...p.frames[i]! }); return `duplicate frame ${i}`; }
    [p.frames[i], p.frames[i + 1]] = [p.frames[i + 1]!, p.frames[i]!];
    return `swap frames ${i} and ${i + 1}`;
  },
  split(r, p) {
    p.piece = 1 + r.int(r.chance(0.5) ? 4 : 64);
    p.splitSeed = r.u32();
    return `deliver frame heads in pieces of ≤ ${p.piece} bytes`;
  },
};
const mutationNames = Object.keys(mutations);

function plan(r: Rng, exportName: string, size: number, stats: FuzzResult): Plan {
  const p: Plan = { frames: buildSession(r, exportName, size), cut: null, flips: [], piece: 0, splitSeed: 0, applied: [] };
  const k = r.chance(0.05) ? 0 : 1 + r.int(3);
  for (let i = 0; i < k; i++) {
    const name = r.pick(mutationNames);
    stats.mutations[name] = (stats.mutations[name] ?? 0) + 1;
    p.applied.push(mutations[name]!(r, p, size, stats));
  }
  return p;
}

/**
 * How `split` delivers a session. Parsers break on a frame whose header or
 * length field straddles two reads, so the first SPLIT_HEAD bytes of every
 * frame (a request header is 28 bytes, an option header 16, client flags 4)
 * go in pieces of at most `piece` bytes; the rest of a frame (a payload of up
 * to 1 MiB, long option data, garbage) is cut at SPLIT_BODY_CUTS random
 * places, so bodies cross reads too without one system call per few bytes
 * (that cost 60 % of a long run's time). At most SPLIT_MAX_WRITES writes a
 * session: the tail past them goes in one.
 */
const SPLIT_HEAD = 32;
const SPLIT_BODY_CUTS = 2;
const SPLIT_MAX_WRITES = 600;

/** A session's bytes, and where each write ends (ascending, the last = bytes.length). */
interface Rendered { bytes: Buffer; writes: number[] }

function render(p: Plan): Rendered {
  const parts = p.frames.map(encodeFrame);
  let b = Buffer.concat(parts);
  for (const bit of p.flips) {
    const at = bit >> 3;
    if (at < b.length) b[at]! ^= 1 << (bit & 7);
  }
  if (p.cut !== null) b = b.subarray(0, p.cut);
  if (p.piece === 0) return { bytes: b, writes: b.length ? [b.length] : [] };
  const r = new Rng(p.splitSeed);
  const cuts: number[] = [];
  let start = 0;
  for (const part of parts) {
    if (start >= b.length) break;
    const head = Math.min(part.length, SPLIT_HEAD);
    // Half the frames start a write; the others share one with the end of the previous frame.
    if (r.chance(0.5)) cuts.push(start);
    // At least one cut inside every head longer than a byte, however large the piece.
    for (let at = 1 + r.int(Math.max(1, Math.min(p.piece, head - 1))); at < head; at += p.piece) cuts.push(start + at);
    if (part.length > head) for (let k = 0; k < SPLIT_BODY_CUTS; k++) cuts.push(start + head + r.int(part.length - head));
    start += part.length;
  }
  const writes = [...new Set(cuts.filter((x) => x > 0 && x < b.length))].sort((x, y) => x - y).slice(0, SPLIT_MAX_WRITES - 1);
  if (b.length) writes.push(b.length);
  return { bytes: b, writes };
}

// ------------------------------------------------------------- sessions

interface SessionOutcome { closed: boolean; received: number; greetingOk: boolean }

/** Sends one session's bytes, a write per piece, and waits until the server closes or goes quiet. */
function runSession(host: string, port: number, { bytes, writes }: Rendered, idleMs: number, maxMs: number): Promise<SessionOutcome> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port, noDelay: true });
    let head = Buffer.alloc(0);
    let received = 0;
    let last = Date.now();
    const start = last;
    let closed = false;
    let sent = false;
    let timer: NodeJS.Timeout | null = null;
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      if (timer) clearInterval(timer);
      s.destroy();
      resolve({ closed, received, greetingOk: received < 18 || head.subarray(0, 18).equals(GREETING) });
    };
    s.on('data', (c: Buffer) => {
      if (head.length < 18) head = Buffer.concat([head, c.subarray(0, 18 - head.length)]);
      received += c.length;
      last = Date.now();
    });
    s.on('error', () => { /* resets are expected */ });
    s.on('close', () => { closed = true; finish(); });
    s.on('end', () => { closed = true; });
    s.once('connect', async () => {
      let from = 0;
      for (let i = 0; i < writes.length && !closed; i++) {
        s.write(bytes.subarray(from, writes[i]));
        from = writes[i]!;
        // Give the server a chance to read between pieces (it reads whatever has arrived).
        if (i % 4 === 3) await new Promise((r) => setImmediate(r));
        if (done) return;
      }
      if (done) return;
      sent = true;
      last = Date.now();
      timer = setInterval(() => {
        const now = Date.now();
        if (closed || (sent && now - last >= idleMs) || now - start >= maxMs) finish();
      }, Math.max(5, Math.floor(idleMs / 3)));
    });
  });
}

const GREETING = greeting(3);

// -------------------------------------------------------------- witness

class Witness {
  private constructor(readonly client: RawClient, readonly size: number) {}
  static async open(host: string, port: number, name: string): Promise<Witness> {
    const c = await RawClient.connect(port, host);
    await c.handshakeTo(name, { structured: true, metaContext: true });
    return new Witness(c, Number(c.exportSize));
  }
  /** Writes fresh data somewhere and reads it back; returns a fault or null. */
  async check(r: Rng): Promise<string | null> {
    const len = 512 + r.int(8 * KiB);
    const off = r.int(Math.max(1, this.size - len));
    const data = r.bytes(len);
    try {
      const werr = await this.client.writeData(off, data);
      if (werr) return `witness WRITE failed with ${werr}`;
      const replies = await this.client.roundTrip({ type: CMD.READ, offset: off, length: len }, undefined, 5000);
      if (errorOf(replies)) return `witness READ failed with ${errorOf(replies)}`;
      if (!assembleRead(replies, off, len).equals(data)) return 'witness read back different data';
      const f = await this.client.roundTrip({ type: CMD.FLUSH });
      if (errorOf(f)) return `witness FLUSH failed with ${errorOf(f)}`;
    } catch (err) {
      return `witness: ${(err as Error).message}`;
    }
    return null;
  }
  close(): void { this.client.destroy(); }
}

/** Size of an export, by INFO then ABORT on a throwaway connection. */
async function exportSize(host: string, port: number, name: string): Promise<number> {
  const c = await RawClient.connect(port, host);
  try {
    await c.start();
    const replies = await c.option(OPT.INFO, infoRequestData(name));
    const last = replies[replies.length - 1]!;
    if (last.type !== REP.ACK) throw new Error(`INFO ${name}: reply 0x${last.type.toString(16)}`);
    const info = parseInfoReply(replies[0]!.data);
    if (!('size' in info)) throw new Error(`INFO ${name}: no NBD_INFO_EXPORT first`);
    await c.option(OPT.ABORT);
    return Number(info.size);
  } finally {
    c.destroy();
  }
}

function gcFunction(): () => void {
  v8.setFlagsFromString('--expose-gc');
  return vm.runInNewContext('gc') as () => void;
}

function memory(gc: () => void): number {
  gc();
  gc();
  return process.memoryUsage().arrayBuffers;
}

// ------------------------------------------------------------------ run

export async function runFuzz(o: FuzzOptions): Promise<FuzzResult> {
  const host = o.host ?? '127.0.0.1';
  const log = o.log ?? (() => {});
  const parallel = o.parallel ?? 4;
  const parallelShare = o.parallelShare ?? 0.2;
  const idleMs = o.idleMs ?? 30;
  const maxSessionMs = o.maxSessionMs ?? 1500;
  const started = Date.now();
  const stats: FuzzResult = {
    seed: o.seed, sessions: 0, frames: 0, batches: 0, parallelBatches: 0, closedByServer: 0, gaveUp: 0,
    witnessChecks: 0, writes: 0, mutations: {}, truncatedAt: {}, memoryGrowth: 0, ms: 0,
  };
  const gc = gcFunction();
  const size = await exportSize(host, o.port, o.exportName);
  const witness = await Witness.open(host, o.port, o.witnessExport ?? o.exportName);
  const wr = new Rng(sessionSeed(o.seed, -1));
  const baseline = memory(gc);
  const maxGrowth = o.maxMemoryGrowth ?? 64 * MiB + size;
  const fail = (msg: string, session: number | null, detail = '') => new FuzzFailure(msg, o.seed, session, detail);
  try {
    const first = await witness.check(wr);
    if (first) throw fail(first, null, 'before any fuzzing');
    const batchRng = new Rng(o.seed);
    while (stats.frames < o.frames) {
      const n = batchRng.chance(parallelShare) ? parallel : 1;
      stats.batches++;
      if (n > 1) stats.parallelBatches++;
      const runs: Array<Promise<SessionOutcome>> = [];
      const plans: Array<{ index: number; plan: Plan; out: Rendered }> = [];
      for (let k = 0; k < n; k++) {
        const index = stats.sessions++;
        const r = new Rng(sessionSeed(o.seed, index));
        const p = plan(r, o.exportName, size, stats);
        const out = render(p);
        stats.frames += p.frames.length;
        stats.writes += out.writes.length;
        plans.push({ index, plan: p, out });
        runs.push(runSession(host, o.port, out, idleMs, maxSessionMs));
      }
      const outcomes = await Promise.all(runs);
      for (let k = 0; k < n; k++) {
        const out = outcomes[k]!;
        const { index, plan: p, out: rendered } = plans[k]!;
        if (out.closed) stats.closedByServer++;
        else stats.gaveUp++;
        if (!out.greetingOk) throw fail('the server did not start with the greeting', index, describe(p, rendered));
      }
      const fault = await witness.check(wr);
      stats.witnessChecks++;
      if (fault) {
        throw fail(fault, plans[0]!.index, plans.map(({ index, plan: p, out }) => `session ${index}: ${describe(p, out)}`).join('\n'));
      }
      if (stats.batches % 100 === 0) log(`fuzz: ${stats.sessions} sessions, ${stats.frames} frames, ${Date.now() - started} ms`);
    }

    // Every fuzz connection must be released; only the witness remains.
    if (o.connectionCount) {
      const end = Date.now() + 3000;
      while (o.connectionCount() > 1 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      const left = o.connectionCount();
      if (left !== 1) throw fail(`${left} connections open at the end, expected only the witness`, null);
    }
    const last = await witness.check(wr);
    if (last) throw fail(last, null, 'after all sessions');
    stats.memoryGrowth = memory(gc) - baseline;
    if (stats.memoryGrowth > maxGrowth) {
      throw fail(`arrayBuffers grew by ${(stats.memoryGrowth / MiB).toFixed(1)} MiB (limit ${(maxGrowth / MiB).toFixed(1)} MiB)`, null);
    }
  } finally {
    witness.close();
  }
  stats.ms = Date.now() - started;
  return stats;
}

function describe(p: Plan, { bytes, writes }: Rendered): string {
  const hex = bytes.subarray(0, 256).toString('hex');
  const how = p.piece ? ` in ${writes.length} writes (heads in pieces of ≤ ${p.piece}), ending at ${writes.slice(0, 32).join(',')}${writes.length > 32 ? '…' : ''}` : '';
  return `[${p.applied.join('; ')}] ${bytes.length} bytes${how}: ${hex}${bytes.length > 256 ? '…' : ''}`;
}
