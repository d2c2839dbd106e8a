/**
 * The few cls_lock payloads the RADOS lock sends through `exec` (Ceph
 * src/cls/lock/cls_lock_ops.h, cls_lock_types.h), as pure functions over
 * Buffers: `assert_locked` (is this cookie the holder?) and `get_info` (the
 * holders with their descriptions, which rados_list_lockers does not return).
 *
 * Ceph encoding: little-endian integers; a string is u32 length + bytes; a
 * versioned struct is ENCODE_START(v, compat): u8 version, u8 compat, u32
 * length of the body, the body. Decoders skip to a struct's end, so fields
 * a newer Ceph appends are ignored.
 */

export const CLS_LOCK_EXCLUSIVE = 1;

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
}

function str(s: string): Buffer {
  const bytes = Buffer.from(s, 'utf8');
  return Buffer.concat([u32(bytes.length), bytes]);
}

/** ENCODE_START(1, 1) around `body`. */
function struct(body: Buffer[]): Buffer {
  const inner = Buffer.concat(body);
  return Buffer.concat([Buffer.from([1, 1]), u32(inner.length), inner]);
}

/** cls_lock_assert_op: name, type, cookie, tag. */
export function encodeAssertLocked(name: string, cookie: string, tag = ''): Buffer {
  return struct([str(name), Buffer.from([CLS_LOCK_EXCLUSIVE]), str(cookie), str(tag)]);
}

/** cls_lock_get_info_op: name. */
export function encodeGetInfo(name: string): Buffer {
  return struct([str(name)]);
}

export interface ClsLocker {
  /** entity_name_t: type (8 = client) and number ("client.<num>"). */
  entityType: number;
  entityNum: bigint;
  cookie: string;
  /** Expiration (0 = none), seconds and nanoseconds. */
  expireSec: number;
  expireNsec: number;
  description: string;
}

export interface ClsLockInfo {
  lockers: ClsLocker[];
  lockType: number;
  tag: string;
}

class Reader {
  pos = 0;
  constructor(readonly buf: Buffer) {}

  need(n: number): void {
    if (this.pos + n > this.buf.length) throw new RangeError(`cls_lock reply: truncated at byte ${this.pos} (need ${n} of ${this.buf.length})`);
  }
  u8(): number {
    this.need(1);
    return this.buf[this.pos++]!;
  }
  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32LE(this.pos);
    this.pos += 4;
    return v;
  }
  i64(): bigint {
    this.need(8);
    const v = this.buf.readBigInt64LE(this.pos);
    this.pos += 8;
    return v;
  }
  str(): string {
    const n = this.u32();
    this.need(n);
    const s = this.buf.toString('utf8', this.pos, this.pos + n);
    this.pos += n;
    return s;
  }
  skip(n: number): void {
    this.need(n);
    this.pos += n;
  }
  /** Reads a struct header; returns the position of its end. */
  struct(): number {
    this.u8(); // version
    this.u8(); // compat
    const len = this.u32();
    this.need(len);
    return this.pos + len;
  }
}

/** entity_addr_t: marker 1 + a versioned struct, or marker 0 + the 135 more bytes of the legacy form. */
function skipAddr(r: Reader): void {
  const marker = r.u8();
  if (marker === 1) {
    r.pos = r.struct();
  } else if (marker === 0) {
    r.skip(3 + 4 + 128); // pad, nonce, sockaddr_storage
  } else {
    throw new RangeError(`cls_lock reply: entity_addr_t marker ${marker}`);
  }
}

/** cls_lock_get_info_reply: map<locker_id_t, locker_info_t> lockers, u8 lock type, string tag. */
export function decodeGetInfoReply(buf: Buffer): ClsLockInfo {
  const r = new Reader(buf);
  const end = r.struct();
  const count = r.u32();
  const lockers: ClsLocker[] = [];
  for (let i = 0; i < count; i++) {
    const idEnd = r.struct();
    const entityType = r.u8();
    const entityNum = r.i64();
    const cookie = r.str();
    r.pos = idEnd;
    const infoEnd = r.struct();
    const expireSec = r.u32();
    const expireNsec = r.u32();
    skipAddr(r);
    const description = r.str();
    r.pos = infoEnd;
    lockers.push({ entityType, entityNum, cookie, expireSec, expireNsec, description });
  }
  const lockType = r.u8();
  const tag = r.str();
  if (r.pos > end) throw new RangeError('cls_lock reply: fields past the end of the struct');
  return { lockers, lockType, tag };
}
