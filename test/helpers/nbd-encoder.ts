/**
 * An independent encoder/decoder of the NBD wire, for tests (STYLE habit 13:
 * fixtures come from a separate encoder, never from the code under test).
 *
 * Written from doc/proto.md of NetworkBlockDevice/nbd, NOT from src/nbd/:
 * it must not import src/nbd/wire.ts or src/nbd/constants.ts, so a mistake
 * there cannot hide behind the same mistake here. Every field is big-endian.
 * Builders take arbitrary values (bad magic, unknown types, huge lengths) so
 * tests and the fuzzer can produce invalid messages on purpose.
 */

// ------------------------------------------------------------- constants

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server → client). */
export const HS_FIXED_NEWSTYLE = 1;
export const HS_NO_ZEROES = 2;
/** Client flags. */
export const C_FIXED_NEWSTYLE = 1;
export const C_NO_ZEROES = 2;

/** Transmission flags. */
export const TF = {
  HAS_FLAGS: 1 << 0, READ_ONLY: 1 << 1, SEND_FLUSH: 1 << 2, SEND_FUA: 1 << 3, ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5, SEND_WRITE_ZEROES: 1 << 6, SEND_DF: 1 << 7, CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9, SEND_CACHE: 1 << 10, SEND_FAST_ZERO: 1 << 11,
} as const;

export const OPT = {
  EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK_EXPORT: 4, STARTTLS: 5, INFO: 6, GO: 7,
  STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11,
} as const;

const ERR = 2 ** 31;
export const REP = {
  ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1, ERR_POLICY: ERR + 2, ERR_INVALID: ERR + 3, ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5, ERR_UNKNOWN: ERR + 6, ERR_SHUTDOWN: ERR + 7, ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const CMD = {
  READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7,
} as const;

export const CMD_FLAG = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;

export const REPLY_FLAG_DONE = 1;
export const REPLY_TYPE = {
  NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 2 ** 15 + 1, ERROR_OFFSET: 2 ** 15 + 2,
} as const;

export const ERRNO = {
  EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108,
} as const;

export const STATE_HOLE = 1;
export const STATE_ZERO = 2;

// ------------------------------------------------------ small primitives

/** Concatenates big-endian fields described as [width in bytes, value]. */
function pack(fields: Array<[1 | 2 | 4 | 8, number | bigint] | Buffer>): Buffer {
  const parts: Buffer[] = [];
  for (const f of fields) {
    if (Buffer.isBuffer(f)) { parts.push(f); continue; }
    const [w, v] = f;
    const b = Buffer.alloc(w);
    if (w === 8) b.writeBigUInt64BE(BigInt.asUintN(64, BigInt(v)));
    else if (w === 4) b.writeUInt32BE(Number(BigInt.asUintN(32, BigInt(v))));
    else if (w === 2) b.writeUInt16BE(Number(BigInt.asUintN(16, BigInt(v))));
    else b.writeUInt8(Number(BigInt.asUintN(8, BigInt(v))));
    parts.push(b);
  }
  return Buffer.concat(parts);
}

const str = (s: string | Buffer): Buffer => (Buffer.isBuffer(s) ? s : Buffer.from(s, 'utf8'));

// ---------------------------------------------------- client → server

/** The u32 client flags sent after the greeting. */
export function clientFlags(flags: number): Buffer {
  return pack([[4, flags]]);
}

export interface OptionOverrides {
  magic?: bigint;
  /** Length field to send instead of the data's real length. */
  length?: number;
}

/** An option request: IHAVEOPT, u32 option, u32 length, data. */
export function optionRequest(option: number, data: Buffer = Buffer.alloc(0), o: OptionOverrides = {}): Buffer {
  return pack([[8, o.magic ?? IHAVEOPT], [4, option], [4, o.length ?? data.length], data]);
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 n, n × u16 info type. */
export function infoRequestData(name: string | Buffer, infos: number[] = [], o: { nameLength?: number; count?: number } = {}): Buffer {
  const n = str(name);
  return pack([[4, o.nameLength ?? n.length], n, [2, o.count ?? infos.length], ...infos.map((i): [2, number] => [2, i])]);
}

/** Data of NBD_OPT_LIST_/SET_META_CONTEXT: u32 name length, name, u32 n, n × (u32 len, query). */
export function metaContextData(name: string | Buffer, queries: Array<string | Buffer>, o: { count?: number } = {}): Buffer {
  const n = str(name);
  const q = queries.map(str);
  return pack([[4, n.length], n, [4, o.count ?? q.length], ...q.flatMap((x): Array<[4, number] | Buffer> => [[4, x.length], x])]);
}

export interface RequestFields {
  magic?: number;
  flags?: number;
  type: number;
  cookie?: bigint;
  offset?: bigint | number;
  length?: number;
}

/** A 28-byte compact request header (payload, if any, is sent separately). */
export function requestHeader(r: RequestFields): Buffer {
  return pack([[4, r.magic ?? REQUEST_MAGIC], [2, r.flags ?? 0], [2, r.type], [8, r.cookie ?? 0n],
    [8, BigInt(r.offset ?? 0)], [4, r.length ?? 0]]);
}

// ---------------------------------------------------- server → client
// Builders for what a server sends, used as fixtures for the wire.ts encoders.

export function greeting(handshakeFlags: number): Buffer {
  return pack([[8, NBDMAGIC], [8, IHAVEOPT], [2, handshakeFlags]]);
}

export function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return pack([[8, REPLY_MAGIC], [4, option], [4, type], [4, data.length], data]);
}

export function exportNameReply(size: bigint | number, flags: number, noZeroes: boolean): Buffer {
  return pack([[8, BigInt(size)], [2, flags], Buffer.alloc(noZeroes ? 0 : 124)]);
}

export function repServerData(name: string, description = ''): Buffer {
  const n = str(name);
  return pack([[4, n.length], n, str(description)]);
}

export function infoExportData(size: bigint | number, flags: number): Buffer {
  return pack([[2, INFO.EXPORT], [8, BigInt(size)], [2, flags]]);
}

export function infoStringData(type: number, value: string): Buffer {
  return pack([[2, type], str(value)]);
}

export function infoBlockSizeData(min: number, preferred: number, max: number): Buffer {
  return pack([[2, INFO.BLOCK_SIZE], [4, min], [4, preferred], [4, max]]);
}

export function repMetaContextData(id: number, name: string): Buffer {
  return pack([[4, id], str(name)]);
}

export function simpleReply(error: number, cookie: bigint): Buffer {
  return pack([[4, SIMPLE_REPLY_MAGIC], [4, error], [8, cookie]]);
}

export function chunkHeader(flags: number, type: number, cookie: bigint, length: number): Buffer {
  return pack([[4, STRUCTURED_REPLY_MAGIC], [2, flags], [2, type], [8, cookie], [4, length]]);
}

export function chunkNone(flags: number, cookie: bigint): Buffer {
  return chunkHeader(flags, REPLY_TYPE.NONE, cookie, 0);
}

/** OFFSET_DATA chunk header plus its u64 offset (data follows separately). */
export function chunkOffsetDataHeader(flags: number, cookie: bigint, offset: bigint | number, dataLength: number): Buffer {
  return pack([chunkHeader(flags, REPLY_TYPE.OFFSET_DATA, cookie, 8 + dataLength), [8, BigInt(offset)]]);
}

export function chunkOffsetHole(flags: number, cookie: bigint, offset: bigint | number, size: number): Buffer {
  return pack([chunkHeader(flags, REPLY_TYPE.OFFSET_HOLE, cookie, 12), [8, BigInt(offset)], [4, size]]);
}

export function chunkBlockStatus(flags: number, cookie: bigint, contextId: number, extents: Array<{ length: number; flags: number }>): Buffer {
  const body = pack([[4, contextId], ...extents.flatMap((e): Array<[4, number]> => [[4, e.length], [4, e.flags]])]);
  return pack([chunkHeader(flags, REPLY_TYPE.BLOCK_STATUS, cookie, body.length), body]);
}

export function chunkError(flags: number, cookie: bigint, error: number, message: string, offset?: bigint | number): Buffer {
  const m = str(message);
  const body = pack([[4, error], [2, m.length], m, ...(offset === undefined ? [] : [[8, BigInt(offset)] as [8, bigint]])]);
  const type = offset === undefined ? REPLY_TYPE.ERROR : REPLY_TYPE.ERROR_OFFSET;
  return pack([chunkHeader(flags, type, cookie, body.length), body]);
}

// ----------------------------------------------------------- parsers

export interface Greeting { nbdMagic: bigint; optMagic: bigint; flags: number }

export function parseGreeting(b: Buffer): Greeting {
  return { nbdMagic: b.readBigUInt64BE(0), optMagic: b.readBigUInt64BE(8), flags: b.readUInt16BE(16) };
}

export interface OptionHeaderFields { magic: bigint; option: number; length: number }

/** Parses a client option header (16 bytes). */
export function parseOptionRequestHeader(b: Buffer): OptionHeaderFields {
  return { magic: b.readBigUInt64BE(0), option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export interface OptionReplyHeader { magic: bigint; option: number; type: number; length: number }

/** Parses the 20-byte header of an option reply. */
export function parseOptionReplyHeader(b: Buffer): OptionReplyHeader {
  return { magic: b.readBigUInt64BE(0), option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

export type InfoReply =
  | { type: 0; size: bigint; flags: number }
  | { type: 1 | 2; value: string }
  | { type: 3; minimum: number; preferred: number; maximum: number }
  | { type: number; raw: Buffer };

/** Parses the data of an NBD_REP_INFO reply. */
export function parseInfoReply(d: Buffer): InfoReply {
  const type = d.readUInt16BE(0);
  if (type === INFO.EXPORT && d.length === 12) return { type: 0, size: d.readBigUInt64BE(2), flags: d.readUInt16BE(10) };
  if ((type === INFO.NAME || type === INFO.DESCRIPTION)) return { type, value: d.subarray(2).toString('utf8') };
  if (type === INFO.BLOCK_SIZE && d.length === 14) {
    return { type: 3, minimum: d.readUInt32BE(2), preferred: d.readUInt32BE(6), maximum: d.readUInt32BE(10) };
  }
  return { type, raw: d.subarray(2) };
}

/** Parses NBD_REP_SERVER data. */
export function parseRepServer(d: Buffer): { name: string; description: string } {
  const n = d.readUInt32BE(0);
  return { name: d.subarray(4, 4 + n).toString('utf8'), description: d.subarray(4 + n).toString('utf8') };
}

/** Parses NBD_REP_META_CONTEXT data. */
export function parseRepMetaContext(d: Buffer): { id: number; name: string } {
  return { id: d.readUInt32BE(0), name: d.subarray(4).toString('utf8') };
}

export interface RequestHeaderFields { magic: number; flags: number; type: number; cookie: bigint; offset: bigint; length: number }

export function parseRequestHeaderFields(b: Buffer): RequestHeaderFields {
  return {
    magic: b.readUInt32BE(0), flags: b.readUInt16BE(4), type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8), offset: b.readBigUInt64BE(16), length: b.readUInt32BE(24),
  };
}

export interface SimpleReplyHeader { magic: number; error: number; cookie: bigint }

export function parseSimpleReply(b: Buffer): SimpleReplyHeader {
  return { magic: b.readUInt32BE(0), error: b.readUInt32BE(4), cookie: b.readBigUInt64BE(8) };
}

export interface ChunkHeader { magic: number; flags: number; type: number; cookie: bigint; length: number }

export function parseChunkHeader(b: Buffer): ChunkHeader {
  return {
    magic: b.readUInt32BE(0), flags: b.readUInt16BE(4), type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8), length: b.readUInt32BE(16),
  };
}

export type ChunkBody =
  | { kind: 'none' }
  | { kind: 'data'; offset: bigint; data: Buffer }
  | { kind: 'hole'; offset: bigint; size: number }
  | { kind: 'block-status'; contextId: number; extents: Array<{ length: number; flags: number }> }
  | { kind: 'error'; error: number; message: string; offset?: bigint }
  | { kind: 'unknown'; raw: Buffer }
  | { kind: 'malformed'; why: string; raw: Buffer };

/** Parses a chunk's payload by type; never throws (malformed payloads are reported). */
export function parseChunkBody(type: number, p: Buffer): ChunkBody {
  const bad = (why: string): ChunkBody => ({ kind: 'malformed', why, raw: p });
  switch (type) {
    case REPLY_TYPE.NONE:
      return p.length === 0 ? { kind: 'none' } : bad('NONE with payload');
    case REPLY_TYPE.OFFSET_DATA:
      if (p.length < 9) return bad('OFFSET_DATA shorter than 9 bytes');
      return { kind: 'data', offset: p.readBigUInt64BE(0), data: p.subarray(8) };
    case REPLY_TYPE.OFFSET_HOLE:
      if (p.length !== 12) return bad('OFFSET_HOLE length is not 12');
      return { kind: 'hole', offset: p.readBigUInt64BE(0), size: p.readUInt32BE(8) };
    case REPLY_TYPE.BLOCK_STATUS: {
      if (p.length < 12 || (p.length - 4) % 8 !== 0) return bad('BLOCK_STATUS length');
      const extents: Array<{ length: number; flags: number }> = [];
      for (let i = 4; i < p.length; i += 8) extents.push({ length: p.readUInt32BE(i), flags: p.readUInt32BE(i + 4) });
      return { kind: 'block-status', contextId: p.readUInt32BE(0), extents };
    }
    case REPLY_TYPE.ERROR:
    case REPLY_TYPE.ERROR_OFFSET: {
      if (p.length < 6) return bad('ERROR shorter than 6 bytes');
      const mlen = p.readUInt16BE(4);
      const want = 6 + mlen + (type === REPLY_TYPE.ERROR_OFFSET ? 8 : 0);
      if (p.length !== want) return bad('ERROR message length mismatch');
      const body: ChunkBody = { kind: 'error', error: p.readUInt32BE(0), message: p.subarray(6, 6 + mlen).toString('utf8') };
      if (type === REPLY_TYPE.ERROR_OFFSET) body.offset = p.readBigUInt64BE(6 + mlen);
      return body;
    }
    default:
      return { kind: 'unknown', raw: p };
  }
}
