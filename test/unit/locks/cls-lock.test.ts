/**
 * The cls_lock payloads (src/locks/cls-lock.ts) against fixtures built here
 * by hand, byte by byte, from Ceph's encoders (cls_lock_ops.h,
 * cls_lock_types.h, msg_types.h entity_addr_t): assert_locked and get_info
 * inputs, and get_info replies with zero, one and two lockers, with the
 * msgr2 and the legacy address encodings, fields a newer Ceph appends, and
 * truncated input. (test/integration/locks-rados.test.ts decodes real ones.)
 */
import t from 'tap';
import { decodeGetInfoReply, encodeAssertLocked, encodeGetInfo } from '../../../src/locks/cls-lock.js';

const le32 = (n: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(n); return b; };
const le64 = (n: bigint) => { const b = Buffer.alloc(8); b.writeBigInt64LE(n); return b; };
const string = (s: string) => Buffer.concat([le32(Buffer.byteLength(s)), Buffer.from(s)]);
/** ENCODE_START(v, compat) + body. */
const versioned = (v: number, compat: number, ...parts: Buffer[]) => {
  const body = Buffer.concat(parts);
  return Buffer.concat([Buffer.from([v, compat]), le32(body.length), body]);
};

/** entity_addr_t, msgr2-era: marker 1, then ENCODE_START(1,1) type, nonce, sockaddr (len, family, data). */
function addrV2(nonce: number): Buffer {
  const sa = Buffer.concat([Buffer.from([2, 0]) /* AF_INET */, Buffer.from([0, 0]) /* port */, Buffer.from([127, 0, 0, 1]), Buffer.alloc(8)]);
  return Buffer.concat([Buffer.from([1]), versioned(1, 1, le32(1) /* legacy type */, le32(nonce), le32(sa.length), sa)]);
}

/** entity_addr_t, legacy: u32 0 (its first byte is the marker 0), nonce, 128 bytes of sockaddr_storage. */
function addrLegacy(nonce: number): Buffer {
  return Buffer.concat([le32(0), le32(nonce), Buffer.alloc(128, 0xab)]);
}

function locker(num: bigint, cookie: string, description: string, addr: Buffer, extraInfo = Buffer.alloc(0)): Buffer {
  const id = versioned(1, 1, Buffer.from([8]) /* CEPH_ENTITY_TYPE_CLIENT */, le64(num), string(cookie));
  const info = versioned(1, 1, le32(0), le32(0) /* utime_t expiration */, addr, string(description), extraInfo);
  return Buffer.concat([id, info]);
}

function reply(lockers: Buffer[], tag = '', lockType = 1): Buffer {
  return versioned(1, 1, le32(lockers.length), ...lockers, Buffer.from([lockType]), string(tag));
}

t.test('assert_locked and get_info inputs', async (t) => {
  t.same(
    encodeAssertLocked('archipelago', 'c0ffee'),
    versioned(1, 1, string('archipelago'), Buffer.from([1]), string('c0ffee'), string('')),
    'name, type EXCLUSIVE, cookie, empty tag',
  );
  t.same(encodeGetInfo('archipelago'), versioned(1, 1, string('archipelago')));
});

t.test('get_info replies', async (t) => {
  t.same(decodeGetInfoReply(reply([], '', 0)), { lockers: [], lockType: 0, tag: '' }, 'nobody holds it');

  const desc = JSON.stringify({ v: 1, node: 'node-a', instance: 'i1', pid: 7, since: 1 });
  const one = decodeGetInfoReply(reply([locker(4123n, 'cookie-1', desc, addrV2(347705715))]));
  t.same(one, {
    lockers: [{ entityType: 8, entityNum: 4123n, cookie: 'cookie-1', expireSec: 0, expireNsec: 0, description: desc }],
    lockType: 1,
    tag: '',
  }, 'one exclusive locker, msgr2 address');

  const legacy = decodeGetInfoReply(reply([locker(9n, 'c', 'legacy addr', addrLegacy(1))], 'tag-x', 2));
  t.match(legacy, { lockers: [{ entityNum: 9n, cookie: 'c', description: 'legacy addr' }], lockType: 2, tag: 'tag-x' }, 'legacy address');

  const two = decodeGetInfoReply(reply([
    locker(1n, 'a', 'first', addrV2(1), Buffer.from('a field from a newer ceph')),
    locker(2n, 'b', 'ünïcode', addrLegacy(2)),
  ]));
  t.same(two.lockers.map((l) => [l.entityNum, l.cookie, l.description]), [[1n, 'a', 'first'], [2n, 'b', 'ünïcode']],
    'two lockers; unknown trailing fields skipped');
});

t.test('damaged replies throw RangeError', async (t) => {
  const good = reply([locker(1n, 'a', 'd', addrV2(1))]);
  for (const cut of [0, 3, 10, 20, good.length - 1]) {
    t.throws(() => decodeGetInfoReply(good.subarray(0, cut)), RangeError, `truncated at ${cut}`);
  }
  const badMarker = Buffer.from(good);
  // the address marker sits after the id struct and the expiration
  const markerAt = 6 + 4 + (6 + 1 + 8 + 4 + 1) + 6 + 8;
  t.equal(badMarker[markerAt], 1, 'fixture: marker found');
  badMarker[markerAt] = 7;
  t.throws(() => decodeGetInfoReply(badMarker), /marker 7/);
});
