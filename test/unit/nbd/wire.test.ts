/**
 * src/nbd/wire.ts against the independent test encoder: every encoder must
 * produce the same bytes, every parser the same fields; the option-data
 * parsers must turn every malformed or truncated input into an error string
 * and never throw.
 */
import t from 'tap';
import * as wire from '../../../src/nbd/wire.js';
import * as E from '../../helpers/nbd-encoder.js';

const COOKIE = 0xfedcba9876543210n;
const hi = Number(COOKIE >> 32n);
const lo = Number(COOKIE & 0xffffffffn);

t.test('readU64 / writeU64', async (t) => {
  for (const v of [0, 1, 0xffffffff, 0x1_0000_0000, 2 ** 40 + 12345, Number.MAX_SAFE_INTEGER]) {
    const b = Buffer.alloc(10);
    b.writeBigUInt64BE(BigInt(v), 1);
    t.equal(wire.readU64(b, 1), v, `readU64 ${v}`);
    const w = Buffer.alloc(10);
    wire.writeU64(w, v, 1);
    t.same(w, b, `writeU64 ${v}`);
  }
  // Values at or above 2^53 stay at or above 2^53 (range checks reject them).
  const big = Buffer.alloc(8);
  big.writeBigUInt64BE(0xffffffffffffffffn);
  t.ok(wire.readU64(big, 0) >= 2 ** 53);
});

t.test('server → client encoders match the independent encoder byte for byte', async (t) => {
  t.same(wire.encodeGreeting(3), E.greeting(E.HS_FIXED_NEWSTYLE | E.HS_NO_ZEROES), 'greeting');
  t.same(wire.encodeGreeting(0), E.greeting(0), 'greeting without flags');

  t.same(wire.encodeOptionReply(E.OPT.GO, E.REP.ACK), E.optionReply(E.OPT.GO, E.REP.ACK), 'option ACK');
  const data = Buffer.from('some reply data');
  t.same(wire.encodeOptionReply(0xdeadbeef, E.REP.SERVER, data), E.optionReply(0xdeadbeef, E.REP.SERVER, data), 'option reply with data');
  t.same(wire.encodeOptionError(E.OPT.LIST, E.REP.ERR_INVALID, 'LIST: bad'),
    E.optionReply(E.OPT.LIST, E.REP.ERR_INVALID, Buffer.from('LIST: bad')), 'option error');
  const longMsg = wire.encodeOptionError(E.OPT.LIST, E.REP.ERR_INVALID, 'é'.repeat(3000));
  t.ok(longMsg.readUInt32BE(16) <= 4096, 'error message truncated to 4096 bytes');
  t.ok(Buffer.from(longMsg.subarray(20).toString('utf8')).equals(longMsg.subarray(20)), 'truncated at a character boundary');

  for (const nz of [true, false]) {
    t.same(wire.encodeExportNameReply(64 << 20, 0x1ed, nz), E.exportNameReply(64 << 20, 0x1ed, nz), `EXPORT_NAME reply noZeroes=${nz}`);
  }
  t.same(wire.encodeExportNameReply(2 ** 50 + 3, 1, true), E.exportNameReply(2n ** 50n + 3n, 1, true), 'large size');

  t.same(wire.encodeRepServer('disk'), E.repServerData('disk'), 'REP_SERVER');
  t.same(wire.encodeRepServer('disk', 'a description'), E.repServerData('disk', 'a description'), 'REP_SERVER with description');
  t.same(wire.encodeRepServer('ünï'), E.repServerData('ünï'), 'REP_SERVER UTF-8 name');
  t.same(wire.encodeInfoExport(1 << 30, 0x0d6f), E.infoExportData(1 << 30, 0x0d6f), 'INFO_EXPORT');
  t.same(wire.encodeInfoString(E.INFO.NAME, 'disk'), E.infoStringData(E.INFO.NAME, 'disk'), 'INFO_NAME');
  t.same(wire.encodeInfoString(E.INFO.DESCRIPTION, 'désc'), E.infoStringData(E.INFO.DESCRIPTION, 'désc'), 'INFO_DESCRIPTION');
  t.same(wire.encodeInfoBlockSize(1, 4096, 32 << 20), E.infoBlockSizeData(1, 4096, 32 << 20), 'INFO_BLOCK_SIZE');
  t.same(wire.encodeRepMetaContext(1, 'base:allocation'), E.repMetaContextData(1, 'base:allocation'), 'REP_META_CONTEXT');
});

t.test('transmission encoders match the independent encoder', async (t) => {
  for (const err of [0, 1, 22, 28, 0xffffffff]) {
    t.same(wire.encodeSimpleReply(err, hi, lo), E.simpleReply(err, COOKIE), `simple reply error ${err}`);
  }
  t.same(wire.encodeStructuredNone(1, hi, lo), E.chunkNone(1, COOKIE), 'NONE chunk');
  t.same(wire.encodeOffsetDataHeader(0, hi, lo, 2 ** 40, 65536), E.chunkOffsetDataHeader(0, COOKIE, 2n ** 40n, 65536), 'OFFSET_DATA header');
  t.same(wire.encodeOffsetHole(1, hi, lo, 4096, 1 << 20), E.chunkOffsetHole(1, COOKIE, 4096, 1 << 20), 'OFFSET_HOLE');
  const ext = [{ length: 65536, flags: 0 }, { length: 1 << 20, flags: 3 }, { length: 512, flags: 1 }];
  t.same(wire.encodeBlockStatus(1, hi, lo, 7, ext), E.chunkBlockStatus(1, COOKIE, 7, ext), 'BLOCK_STATUS');
  t.same(wire.encodeBlockStatus(1, hi, lo, 7, [ext[0]!]), E.chunkBlockStatus(1, COOKIE, 7, [ext[0]!]), 'BLOCK_STATUS one extent');
  t.same(wire.encodeStructuredError(1, hi, lo, 22, 'bad request'), E.chunkError(1, COOKIE, 22, 'bad request'), 'ERROR');
  t.same(wire.encodeStructuredError(1, hi, lo, 5, 'io', 123456), E.chunkError(1, COOKIE, 5, 'io', 123456), 'ERROR_OFFSET');
  t.same(wire.encodeStructuredError(1, hi, lo, 5, ''), E.chunkError(1, COOKIE, 5, ''), 'ERROR with empty message');
  const long = wire.encodeStructuredError(1, hi, lo, 5, 'x'.repeat(5000));
  t.equal(long.readUInt16BE(24), 4096, 'error message capped at 4096 bytes');
  t.equal(long.readUInt32BE(16), 6 + 4096, 'chunk length matches');

  // Independent parse of what wire.ts produced.
  const parsed = E.parseChunkBody(E.REPLY_TYPE.ERROR_OFFSET, wire.encodeStructuredError(0, hi, lo, 5, 'io', 99).subarray(20));
  t.same(parsed, { kind: 'error', error: 5, message: 'io', offset: 99n });
});

t.test('parseOptionHeader', async (t) => {
  const b = E.optionRequest(E.OPT.GO, Buffer.alloc(0), { length: 0xfffffffe });
  t.same(wire.parseOptionHeader(b), { magicOk: true, option: E.OPT.GO, length: 0xfffffffe });
  const withPrefix = Buffer.concat([Buffer.alloc(3), E.optionRequest(0xffffffff, Buffer.from('abc'))]);
  t.same(wire.parseOptionHeader(withPrefix, 3), { magicOk: true, option: 0xffffffff, length: 3 });
  t.equal(wire.parseOptionHeader(E.optionRequest(1, undefined, { magic: E.IHAVEOPT ^ 1n })).magicOk, false, 'one bit off');
  t.equal(wire.parseOptionHeader(E.optionRequest(1, undefined, { magic: E.NBDMAGIC })).magicOk, false, 'NBDMAGIC is not IHAVEOPT');
});

t.test('parseRequestHeader', async (t) => {
  const cases: E.RequestFields[] = [
    { type: E.CMD.READ, cookie: COOKIE, offset: 4096, length: 512 },
    { type: E.CMD.WRITE, flags: E.CMD_FLAG.FUA, cookie: 0n, offset: 2 ** 52, length: 0xffffffff },
    { magic: 0x12345678, type: 0xffff, flags: 0xffff, cookie: 0xffffffffffffffffn, offset: 0, length: 0 },
  ];
  for (const c of cases) {
    const b = E.requestHeader(c);
    const f = E.parseRequestHeaderFields(b);
    const h = wire.parseRequestHeader(b);
    t.equal(h.magic, f.magic);
    t.equal(h.flags, f.flags);
    t.equal(h.type, f.type);
    t.equal((BigInt(h.cookieHi) << 32n) | BigInt(h.cookieLo), f.cookie, 'cookie bit-exact');
    t.equal(h.offset, Number(f.offset));
    t.equal(h.length, f.length);
    // The cookie goes back out unchanged.
    t.same(wire.encodeSimpleReply(0, h.cookieHi, h.cookieLo).subarray(8), b.subarray(8, 16));
  }
  const shifted = Buffer.concat([Buffer.alloc(5, 0xaa), E.requestHeader(cases[0]!)]);
  t.equal(wire.parseRequestHeader(shifted, 5).length, 512, 'at an offset');
  const huge = wire.parseRequestHeader(E.requestHeader({ type: 0, offset: 0xffffffffffffffffn, length: 1 }));
  t.ok(huge.offset >= 2 ** 53, 'u64 max offset stays out of range');
});

type Asserts = Pick<typeof t, 'fail' | 'ok'>;

/** Every prefix of a valid message shorter than it must be rejected with a string. */
function checkTruncations(t: Asserts, parse: (b: Buffer) => unknown, valid: Buffer, what: string): void {
  let fine = true;
  for (let n = 0; n < valid.length; n++) {
    let r: unknown;
    try {
      r = parse(valid.subarray(0, n));
    } catch (err) {
      t.fail(`${what}: truncated to ${n} bytes: threw ${String(err)}`);
      fine = false;
      continue;
    }
    if (typeof r !== 'string') {
      t.fail(`${what}: truncated to ${n} bytes: accepted`, { result: r });
      fine = false;
    }
  }
  t.ok(fine, `${what}: all ${valid.length} truncations rejected without throwing`);
}


t.test('parseInfoRequest', async (t) => {
  t.same(wire.parseInfoRequest(E.infoRequestData('disk', [])), { name: 'disk', infos: [] });
  t.same(wire.parseInfoRequest(E.infoRequestData('disk', [0, 1, 2, 3, 999])), { name: 'disk', infos: [0, 1, 2, 3, 999] });
  t.same(wire.parseInfoRequest(E.infoRequestData('', [])), { name: '', infos: [] }, 'empty name');
  t.same(wire.parseInfoRequest(E.infoRequestData('dïsk', [3])), { name: 'dïsk', infos: [3] }, 'UTF-8 name');

  const valid = E.infoRequestData('disk', [1, 3]);
  checkTruncations(t, wire.parseInfoRequest, valid, 'INFO');
  const bad: Array<[string, Buffer]> = [
    ['name length past the end', E.infoRequestData('disk', [], { nameLength: 5 })],
    ['name length huge', E.infoRequestData('disk', [], { nameLength: 0xffffffff })],
    ['name length eats the count', E.infoRequestData('disk', [], { nameLength: 6 })],
    ['count too high', E.infoRequestData('disk', [1], { count: 2 })],
    ['count too low', E.infoRequestData('disk', [1, 2], { count: 1 })],
    ['count 0xffff', E.infoRequestData('disk', [], { count: 0xffff })],
    ['trailing byte', Buffer.concat([valid, Buffer.from([0])])],
    ['NUL in name', E.infoRequestData('di\0sk', [])],
    ['invalid UTF-8 name', E.infoRequestData(Buffer.from([0x64, 0xc3, 0x28]), [])],
    ['name over 4096 bytes', E.infoRequestData('n'.repeat(4097), [])],
  ];
  for (const [what, b] of bad) {
    let r: unknown;
    t.doesNotThrow(() => { r = wire.parseInfoRequest(b); }, what);
    t.type(r, 'string', what);
  }
  t.same(wire.parseInfoRequest(E.infoRequestData('n'.repeat(4096), [])), { name: 'n'.repeat(4096), infos: [] }, '4096-byte name is fine');
});

t.test('parseMetaContextRequest', async (t) => {
  t.same(wire.parseMetaContextRequest(E.metaContextData('disk', [])), { name: 'disk', queries: [] });
  t.same(wire.parseMetaContextRequest(E.metaContextData('disk', ['base:allocation', 'qemu:dirty-bitmap:x', ''])),
    { name: 'disk', queries: ['base:allocation', 'qemu:dirty-bitmap:x', ''] });
  t.same(wire.parseMetaContextRequest(E.metaContextData('', ['base:'])), { name: '', queries: ['base:'] });

  const valid = E.metaContextData('disk', ['base:allocation', 'x:y']);
  checkTruncations(t, wire.parseMetaContextRequest, valid, 'META_CONTEXT');
  const withLen = (b: Buffer, at: number, v: number) => { const c = Buffer.from(b); c.writeUInt32BE(v, at); return c; };
  const bad: Array<[string, Buffer]> = [
    ['name length past the end', withLen(valid, 0, valid.length)],
    ['name length huge', withLen(valid, 0, 0xffffffff)],
    ['count too high', E.metaContextData('disk', ['base:allocation'], { count: 2 })],
    ['count too low (trailing query)', E.metaContextData('disk', ['a', 'b'], { count: 1 })],
    ['count huge', E.metaContextData('disk', [], { count: 0xffffffff })],
    ['query length past the end', withLen(valid, 4 + 4 + 4, 1000)],
    ['query length huge', withLen(valid, 4 + 4 + 4, 0xffffffff)],
    ['trailing byte', Buffer.concat([valid, Buffer.from([0])])],
    ['NUL in query', E.metaContextData('disk', ['base:\0allocation'])],
    ['NUL in name', E.metaContextData('d\0', [])],
    ['invalid UTF-8 query', E.metaContextData('disk', [Buffer.from([0xff, 0xfe])])],
    ['query over 4096 bytes', E.metaContextData('disk', ['q'.repeat(4097)])],
  ];
  for (const [what, b] of bad) {
    let r: unknown;
    t.doesNotThrow(() => { r = wire.parseMetaContextRequest(b); }, what);
    t.type(r, 'string', what);
  }
});

t.test('decodeString', async (t) => {
  t.equal(wire.decodeString(Buffer.from('')), '');
  t.equal(wire.decodeString(Buffer.from('base:allocation')), 'base:allocation');
  t.equal(wire.decodeString(Buffer.from('日本語 ✓ 🙂')), '日本語 ✓ 🙂', 'multi-byte UTF-8 including 4-byte');
  t.equal(wire.decodeString(Buffer.alloc(4096, 0x61)), 'a'.repeat(4096), 'exactly 4096 bytes');
  t.equal(wire.decodeString(Buffer.alloc(4097, 0x61)), null, '4097 bytes');
  t.equal(wire.decodeString(Buffer.from('a\0b')), null, 'NUL inside');
  t.equal(wire.decodeString(Buffer.from([0])), null, 'only NUL');
  const invalid: Array<[string, number[]]> = [
    ['lone continuation byte', [0x80]],
    ['truncated 2-byte sequence', [0x61, 0xc3]],
    ['truncated 3-byte sequence', [0xe6, 0x97]],
    ['overlong encoding of /', [0xc0, 0xaf]],
    ['overlong NUL', [0xc0, 0x80]],
    ['UTF-16 surrogate (CESU-8)', [0xed, 0xa0, 0x80]],
    ['beyond U+10FFFF', [0xf4, 0x90, 0x80, 0x80]],
    ['0xff byte', [0xff]],
    ['0xfe byte', [0x61, 0xfe, 0x62]],
  ];
  for (const [what, bytes] of invalid) t.equal(wire.decodeString(Buffer.from(bytes)), null, what);
  // U+FFFD itself, correctly encoded, is a valid string.
  t.equal(wire.decodeString(Buffer.from([0xef, 0xbf, 0xbd])), '\ufffd', 'a real U+FFFD is valid');
});

t.test('isFinalOptionReply', async (t) => {
  t.equal(wire.isFinalOptionReply(E.REP.ACK), true);
  t.equal(wire.isFinalOptionReply(E.REP.SERVER), false);
  t.equal(wire.isFinalOptionReply(E.REP.INFO), false);
  t.equal(wire.isFinalOptionReply(E.REP.META_CONTEXT), false);
  for (const v of Object.values(E.REP).filter((v) => v >= 2 ** 31)) t.equal(wire.isFinalOptionReply(v), true, `0x${v.toString(16)}`);
});
