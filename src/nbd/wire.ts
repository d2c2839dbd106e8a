/**
 * NBD wire format: pure parse and serialize functions over Buffers.
 *
 * No I/O here and no imports from node:net/tls/fs: the handshake and the
 * transmission modules decide when to call these. Every multi-byte field is
 * big-endian (network order) as the spec says. 64-bit offsets are returned as
 * JS numbers: values at or above 2^53 lose precision but stay above any export
 * size, so range checks reject them correctly.
 */
import {
  IHAVEOPT, NBDMAGIC, NBD_REP_MAGIC, NBD_INFO, NBD_REP, NBD_REPLY_TYPE,
  NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, OPTION_REPLY_HEADER_LENGTH,
  SIMPLE_REPLY_LENGTH, STRUCTURED_REPLY_HEADER_LENGTH,
} from './constants.js';

const TWO_32 = 0x1_0000_0000;

/** Reads an unsigned 64-bit big-endian value as a number (see the file comment). */
export function readU64(buf: Buffer, offset: number): number {
  return buf.readUInt32BE(offset) * TWO_32 + buf.readUInt32BE(offset + 4);
}

/** Writes a non-negative safe integer as u64 big-endian. */
export function writeU64(buf: Buffer, value: number, offset: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), offset);
  buf.writeUInt32BE(value % TWO_32, offset + 4);
}

// ---------------------------------------------------------------- handshake

/** S→C greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags (18 bytes). */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export interface OptionHeader {
  /** False when the 8-byte magic is not IHAVEOPT. */
  magicOk: boolean;
  option: number;
  length: number;
}

/** C→S option header: IHAVEOPT, u32 option, u32 length (16 bytes at `offset`). */
export function parseOptionHeader(buf: Buffer, offset = 0): OptionHeader {
  return {
    magicOk: buf.readBigUInt64BE(offset) === IHAVEOPT,
    option: buf.readUInt32BE(offset + 8),
    length: buf.readUInt32BE(offset + 12),
  };
}

/** S→C option reply: magic, u32 option, u32 type, u32 length, data. */
export function encodeOptionReply(option: number, type: number, data?: Buffer): Buffer {
  const len = data ? data.length : 0;
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_LENGTH + len);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(len, 16);
  if (data) data.copy(b, OPTION_REPLY_HEADER_LENGTH);
  return b;
}

/** An option error reply with a UTF-8 message (the spec allows one). */
export function encodeOptionError(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, Buffer.from(truncateUtf8(message, 4096)));
}

/** Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, 124 zeros unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  writeU64(b, size, 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

/** NBD_REP_SERVER payload: u32 name length, name, optional description. */
export function encodeRepServer(name: string, description?: string): Buffer {
  const n = Buffer.from(name);
  const d = Buffer.from(description ? truncateUtf8(description, 4096) : '');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** NBD_INFO_EXPORT payload: u16 type, u64 size, u16 transmission flags (12 bytes). */
export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO.EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

/** NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload: u16 type, string. */
export function encodeInfoString(type: number, value: string): Buffer {
  const s = Buffer.from(truncateUtf8(value, 4096));
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE payload: u16 type, u32 minimum, preferred, maximum (14 bytes). */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_META_CONTEXT payload: u32 context id, name. */
export function encodeRepMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO: export name and the info types requested. */
export interface InfoRequest {
  name: string;
  infos: number[];
}

/**
 * Parses NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count × u16.
 * Returns a string describing the fault when the data is malformed.
 */
export function parseInfoRequest(data: Buffer): InfoRequest | string {
  if (data.length < 6) return 'option data too short';
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6) return 'export name length exceeds option length';
  const nameBuf = data.subarray(4, 4 + nameLen);
  const name = decodeString(nameBuf);
  if (name === null) return 'export name is not a valid string';
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 6 + nameLen + 2 * count) return 'information request count does not match option length';
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLen + 2 * i));
  return { name, infos };
}

/** Data of NBD_OPT_LIST_/SET_META_CONTEXT: export name and query strings. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** Parses meta context option data; returns a fault description when malformed. */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest | string {
  if (data.length < 8) return 'option data too short';
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 8) return 'export name length exceeds option length';
  const name = decodeString(data.subarray(4, 4 + nameLen));
  if (name === null) return 'export name is not a valid string';
  let pos = 4 + nameLen;
  const count = data.readUInt32BE(pos);
  pos += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return 'query list truncated';
    const qLen = data.readUInt32BE(pos);
    pos += 4;
    if (qLen > data.length - pos) return 'query length exceeds option length';
    const q = decodeString(data.subarray(pos, pos + qLen));
    if (q === null) return 'query is not a valid string';
    queries.push(q);
    pos += qLen;
  }
  if (pos !== data.length) return 'trailing bytes after queries';
  return { name, queries };
}

/** A valid NBD string: UTF-8, no NUL, at most 4096 bytes; else null. */
export function decodeString(buf: Buffer): string | null {
  if (buf.length > 4096 || buf.includes(0)) return null;
  const s = buf.toString('utf8');
  // Round-trip to reject invalid UTF-8 (toString would substitute U+FFFD).
  if (Buffer.byteLength(s) !== buf.length || !Buffer.from(s).equals(buf)) return null;
  return s;
}

function truncateUtf8(s: string, maxBytes: number): string {
  if (Buffer.byteLength(s) <= maxBytes) return s;
  let b = Buffer.from(s).subarray(0, maxBytes).toString('utf8');
  while (Buffer.byteLength(b) > maxBytes || b.endsWith('\ufffd')) b = b.slice(0, -1);
  return b;
}

// ------------------------------------------------------------- transmission

/**
 * A parsed request header. The cookie (the spec's "handle") is kept as two
 * u32 halves so it is echoed bit-exactly without BigInt on the hot path.
 */
export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}

/** Parses a 28-byte request header at `offset`. */
export function parseRequestHeader(buf: Buffer, offset = 0): RequestHeader {
  return {
    magic: buf.readUInt32BE(offset),
    flags: buf.readUInt16BE(offset + 4),
    type: buf.readUInt16BE(offset + 6),
    cookieHi: buf.readUInt32BE(offset + 8),
    cookieLo: buf.readUInt32BE(offset + 12),
    offset: readU64(buf, offset + 16),
    length: buf.readUInt32BE(offset + 24),
  };
}

/** Simple reply: magic, u32 error, u64 cookie (16 bytes). */
export function encodeSimpleReply(error: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_LENGTH);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  return b;
}

function structuredHeader(b: Buffer, flags: number, type: number, cookieHi: number, cookieLo: number, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  b.writeUInt32BE(length, 16);
}

/** A structured chunk with no payload beyond the header (NONE). */
export function encodeStructuredNone(flags: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH);
  structuredHeader(b, flags, NBD_REPLY_TYPE.NONE, cookieHi, cookieLo, 0);
  return b;
}

/**
 * Header of an OFFSET_DATA chunk: chunk header + u64 offset (28 bytes). The
 * `dataLength` bytes of data follow it on the wire, sent separately (no copy).
 */
export function encodeOffsetDataHeader(flags: number, cookieHi: number, cookieLo: number, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + 8);
  structuredHeader(b, flags, NBD_REPLY_TYPE.OFFSET_DATA, cookieHi, cookieLo, 8 + dataLength);
  writeU64(b, offset, 20);
  return b;
}

/** An OFFSET_HOLE chunk: chunk header + u64 offset + u32 size (32 bytes). */
export function encodeOffsetHole(flags: number, cookieHi: number, cookieLo: number, offset: number, size: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + 12);
  structuredHeader(b, flags, NBD_REPLY_TYPE.OFFSET_HOLE, cookieHi, cookieLo, 12);
  writeU64(b, offset, 20);
  b.writeUInt32BE(size, 28);
  return b;
}

/** A BLOCK_STATUS chunk: u32 context id, then (u32 length, u32 flags) per extent. */
export function encodeBlockStatus(flags: number, cookieHi: number, cookieLo: number, contextId: number,
  extents: ReadonlyArray<{ length: number; flags: number }>): Buffer {
  const len = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + len);
  structuredHeader(b, flags, NBD_REPLY_TYPE.BLOCK_STATUS, cookieHi, cookieLo, len);
  b.writeUInt32BE(contextId, 20);
  let p = 24;
  for (const e of extents) {
    b.writeUInt32BE(e.length, p);
    b.writeUInt32BE(e.flags, p + 4);
    p += 8;
  }
  return b;
}

/**
 * An ERROR (or, with `offset`, ERROR_OFFSET) chunk: u32 error, u16 message
 * length, message[, u64 offset].
 */
export function encodeStructuredError(flags: number, cookieHi: number, cookieLo: number, error: number,
  message: string, offset?: number): Buffer {
  const m = Buffer.from(truncateUtf8(message, 4096));
  const len = 6 + m.length + (offset === undefined ? 0 : 8);
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + len);
  const type = offset === undefined ? NBD_REPLY_TYPE.ERROR : NBD_REPLY_TYPE.ERROR_OFFSET;
  structuredHeader(b, flags, type, cookieHi, cookieLo, len);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(m.length, 24);
  m.copy(b, 26);
  if (offset !== undefined) writeU64(b, offset, 26 + m.length);
  return b;
}

/** Option reply types that end an option's replies. */
export function isFinalOptionReply(type: number): boolean {
  return type === NBD_REP.ACK || (type & 0x80000000) !== 0;
}
