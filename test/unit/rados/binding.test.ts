/**
 * Our librados binding (native/rados, loaded by src/blockers/rados/binding.ts)
 * against a real single-host Ceph cluster (test/helpers/ceph.ts): data
 * operations, listing, concurrency, locks, exec, watch/notify, fencing by
 * blocklist, mon commands, and the lifetime rules (close, shutdown, process
 * exit, references held while operations are in flight).
 *
 * Needs the addon built (scripts/build-rados.sh) and the ceph packages.
 */
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type tap from 'tap';
import t from 'tap';
import {
  loadRados,
  RadosError,
  type RadosCluster,
  type RadosConnectOptions,
  type RadosWatchEvent,
} from '../../../src/blockers/rados/binding.js';
import { startCeph } from '../../helpers/ceph.js';
import { childEnv } from '../../helpers/daemon.js';
import { diag, run, tempDir } from '../../helpers/run.js';

type Tap = Parameters<Parameters<typeof tap.test>[0]>[0];

const ENOENT = 2;
const EBADF = 9;
const EBUSY = 16;
const EEXIST = 17;
const EINVAL = 22;
const ENOTCONN = 107;
const ESHUTDOWN = 108;

const rados = loadRados();
const ceph = await startCeph(t);
const DATA = ceph.pools.data;
const options: RadosConnectOptions = {
  conf: ceph.conf,
  config: { rados_osd_op_timeout: '30', rados_mon_op_timeout: '30' },
};

/** A client shut down in the teardown of `tt` (shutdown is idempotent). */
async function connect(tt: Tap | typeof t = t): Promise<RadosCluster> {
  const cluster = await rados.connect(options);
  tt.teardown(() => cluster.shutdown());
  return cluster;
}

const a = await connect();
const b = await connect();
const ioA = await a.openPool(DATA);
const ioB = await b.openPool(DATA);

/** A name no other case uses. */
const uniq = (what: string) => `${what}.${crypto.randomBytes(4).toString('hex')}`;

function rejectsErrno(tt: Tap, p: Promise<unknown>, errno: number, message: string): Promise<void> {
  return tt.rejects(p, { name: 'RadosError', errno }, message) as unknown as Promise<void>;
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result after ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/** Watch events as a queue one can await. */
function eventQueue() {
  const events: RadosWatchEvent[] = [];
  let taken = 0;
  let waiter: (() => void) | undefined;
  return {
    events,
    push(e: RadosWatchEvent) {
      events.push(e);
      waiter?.();
    },
    /** The first event not taken yet (waits for it). */
    async next(ms = 10_000): Promise<RadosWatchEvent> {
      if (taken >= events.length) {
        await within(new Promise<void>((resolve) => (waiter = resolve)), ms, 'watch event');
        waiter = undefined;
      }
      return events[taken++]!;
    },
  };
}

/** A cls_lock `assert_locked` input: ENCODE_START(1, 1) name, type, cookie, tag. */
function assertLockedInput(lock: string, cookie: string, tag = ''): Buffer {
  const str = (s: string) => {
    const bytes = Buffer.from(s);
    const len = Buffer.alloc(4);
    len.writeUInt32LE(bytes.length);
    return Buffer.concat([len, bytes]);
  };
  const body = Buffer.concat([str(lock), Buffer.from([1 /* LOCK_EXCLUSIVE */]), str(cookie), str(tag)]);
  const head = Buffer.alloc(6);
  head[0] = 1; // struct version
  head[1] = 1; // compat version
  head.writeUInt32LE(body.length, 2);
  return Buffer.concat([head, body]);
}

t.test('loader, version, construction', async (t) => {
  t.match(rados.version(), /^\d+\.\d+\.\d+$/, 'librados version');
  t.equal(loadRados(), rados, 'loaded once');
  t.type(a.instanceId(), 'number');
  t.not(a.instanceId(), b.instanceId(), 'two clients, two instance ids');
  t.match(a.addrs(), /\d+\.\d+\.\d+\.\d+:\d+\/\d+/, 'address with nonce');
  t.equal(ioA.pool, DATA);
  const ctor = (o: object) => (o as { constructor: new () => unknown }).constructor;
  t.throws(() => new (ctor(a))(), TypeError, 'RadosCluster cannot be constructed from JS');
  t.throws(() => new (ctor(ioA))(), TypeError, 'RadosIoCtx cannot be constructed from JS');
  t.throws(() => new (ctor(ioA.list()))(), TypeError, 'RadosListing cannot be constructed from JS');
});

t.test('connect and openPool errors', async (t) => {
  const err = await rados.connect({ conf: '/nonexistent/ceph.conf' }).then(
    () => null,
    (e: unknown) => e,
  );
  t.ok(err instanceof RadosError, 'a RadosError instance');
  t.equal((err as RadosError).errno, ENOENT);
  t.equal((err as RadosError).op, 'connect');
  t.match((err as RadosError).message, /^connect: No such file or directory \(errno 2\): reading "\/nonexistent\/ceph.conf"$/);
  await rejectsErrno(t, rados.connect({ conf: ceph.conf, config: { no_such_option_xyz: '1' } }), ENOENT, 'unknown setting');
  await rejectsErrno(t, a.openPool('no-such-pool'), ENOENT, 'unknown pool');
  await rejectsErrno(t, a.openPool(''), EINVAL, 'empty pool name');
  t.throws(() => a.openPool(1 as unknown as string), TypeError, 'pool name type');
});

t.test('write and read', async (t) => {
  const oid = uniq('rw');
  await ioA.write(oid, 0, Buffer.from('hello world'));

  const big = Buffer.alloc(100, 0xee);
  t.equal(await ioA.read(oid, 0, 100, big), 11, 'read into a larger target: the bytes that exist');
  t.equal(big.subarray(0, 11).toString(), 'hello world');
  t.ok(big.subarray(11).every((x) => x === 0xee), 'the rest of the target is untouched');

  const backing = Buffer.alloc(64, 0);
  const view = backing.subarray(10, 20);
  t.equal(await ioA.read(oid, 6, 5, view), 5, 'offset read');
  t.equal(backing.subarray(10, 15).toString(), 'world', 'lands in the caller buffer itself (no copy)');

  t.equal(await ioA.read(oid, 8, 10, Buffer.alloc(10)), 3, 'short read at the end');
  t.equal(await ioA.read(oid, 100, 10, Buffer.alloc(10)), 0, 'read past the end');
  t.equal(await ioA.read(oid, 0, 0, Buffer.alloc(0)), 0, 'zero-length read');

  await ioA.write(oid, 20, Buffer.from('xyz'));
  t.equal((await ioA.stat(oid)).size, 23, 'a write past the end extends');
  const whole = await ioA.readFull(oid);
  t.same(whole, Buffer.concat([Buffer.from('hello world'), Buffer.alloc(9), Buffer.from('xyz')]), 'gap reads as zeros');

  const seen = await ioB.readFull(oid);
  t.same(seen, whole, 'another client sees the same bytes');

  const absent = uniq('absent');
  const err = await ioA.read(absent, 0, 10, Buffer.alloc(10)).then(
    () => null,
    (e: unknown) => e,
  );
  t.ok(err instanceof RadosError, 'rejects with a RadosError');
  t.match(err, { errno: ENOENT, op: 'read', message: `read "${absent}": No such file or directory (errno 2)` });

  t.throws(() => ioA.read(oid, 0, 11, Buffer.alloc(10)), RangeError, 'length larger than the target');
  t.throws(() => ioA.read(oid, -1, 1, Buffer.alloc(1)), RangeError, 'negative offset');
  t.throws(() => ioA.read(oid, 0.5, 1, Buffer.alloc(1)), RangeError, 'fractional offset');
  t.throws(() => ioA.write(oid, 0, 'text' as unknown as Buffer), TypeError, 'data must be a Buffer');
  t.throws(() => ioA.read(7 as unknown as string, 0, 1, Buffer.alloc(1)), TypeError, 'name must be a string');
});

t.test('writeFull replaces atomically', async (t) => {
  const oid = uniq('wf');
  await ioA.writeFull(oid, Buffer.alloc(1000, 1));
  await ioA.writeFull(oid, Buffer.from('short'));
  t.equal((await ioA.readFull(oid)).toString(), 'short', 'the old tail is gone');
  t.equal((await ioA.stat(oid)).size, 5);

  // Readers racing a writer that swaps between two contents of different
  // sizes (one fits readFull's first guess, one does not) see one or the other.
  const small = Buffer.alloc(60 * 1024, 0x61);
  const large = Buffer.alloc(200 * 1024, 0x62);
  await ioA.writeFull(oid, small);
  let writing = true;
  const writer = (async () => {
    for (let i = 0; writing; i++) await ioA.writeFull(oid, i % 2 ? small : large);
  })();
  let torn = 0;
  let reads = 0;
  const readers = Array.from({ length: 8 }, async () => {
    for (let i = 0; i < 40; i++) {
      const got = await ioB.readFull(oid);
      reads++;
      if (!got.equals(small) && !got.equals(large)) torn++;
    }
  });
  await Promise.all(readers);
  writing = false;
  await writer;
  t.equal(torn, 0, `no torn readFull in ${reads} reads racing writeFull`);
});

t.test('readFull', async (t) => {
  const empty = uniq('rf-empty');
  await ioA.writeFull(empty, Buffer.alloc(0));
  t.equal((await ioA.readFull(empty)).length, 0, 'empty object');

  for (const size of [10, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 5 * 1024 * 1024]) {
    const oid = uniq(`rf-${size}`);
    const data = crypto.randomBytes(size);
    await ioA.writeFull(oid, data);
    const got = await ioA.readFull(oid);
    t.equal(got.length, size, `${size} bytes: length`);
    t.ok(got.equals(data), `${size} bytes: content`);
  }
  await rejectsErrno(t, ioA.readFull(uniq('rf-absent')), ENOENT, 'absent object');
});

t.test('zero', async (t) => {
  const oid = uniq('zero');
  const ones = () => ioA.writeFull(oid, Buffer.alloc(100, 1));
  const expect = (zeroFrom: number, zeroTo: number, size: number) => {
    const e = Buffer.alloc(size, 0);
    e.fill(1, 0, Math.min(zeroFrom, 100));
    if (zeroTo < 100) e.fill(1, zeroTo, 100);
    return e;
  };

  await ones();
  await ioA.zero(oid, 10, 20);
  t.same(await ioA.readFull(oid), expect(10, 30, 100), 'middle: zeros there, size kept');

  await ones();
  await ioA.zero(oid, 50, 50);
  t.same(await ioA.readFull(oid), expect(50, 100, 100), 'range reaching the end: size kept (the OSD would truncate)');

  await ones();
  await ioA.zero(oid, 0, 100);
  t.same(await ioA.readFull(oid), expect(0, 100, 100), 'whole object: size kept');

  await ones();
  await ioA.zero(oid, 80, 40);
  t.same(await ioA.readFull(oid), expect(80, 120, 120), 'range past the end: extended with zeros to offset+length');

  await ones();
  await ioA.zero(oid, 5, 0);
  t.same(await ioA.readFull(oid), Buffer.alloc(100, 1), 'zero length: nothing changes');

  const absent = uniq('zero-absent');
  await rejectsErrno(t, ioA.zero(absent, 0, 10), ENOENT, 'absent object');
  await rejectsErrno(t, ioA.stat(absent), ENOENT, 'and zero did not create it');
});

t.test('stat and remove', async (t) => {
  const oid = uniq('stat');
  const before = Date.now();
  await ioA.writeFull(oid, Buffer.alloc(4321));
  const st = await ioA.stat(oid);
  t.equal(st.size, 4321);
  t.ok(Math.abs(st.mtimeMs - before) < 60_000, 'mtime is about now');
  t.equal(st.mtimeMs % 1000, 0, 'mtime in whole seconds (librados C API)');

  await ioA.remove(oid);
  await rejectsErrno(t, ioA.stat(oid), ENOENT, 'stat after remove');
  await rejectsErrno(t, ioA.read(oid, 0, 1, Buffer.alloc(1)), ENOENT, 'read after remove');
  await rejectsErrno(t, ioA.remove(oid), ENOENT, 'remove again');
});

t.test('listing more objects than one batch', async (t) => {
  const io = await a.openPool(ceph.pools.maps);
  t.teardown(() => io.close());
  const names = Array.from({ length: 150 }, (_, i) => `ls.${i}`);
  await Promise.all(names.map((n) => io.write(n, 0, Buffer.from(n))));

  const listing = io.list();
  const seen: string[] = [];
  let batches = 0;
  for (;;) {
    const batch = await listing.next(40);
    t.ok(batch.length <= 40, 'at most max names per call');
    if (batch.length === 0) break;
    seen.push(...batch);
    batches++;
  }
  t.ok(batches >= 4, `several batches (${batches})`);
  t.same(seen.slice().sort(), names.slice().sort(), 'every object exactly once');
  t.same(await listing.next(10), [], 'stays at the end');
  listing.close();
  await rejectsErrno(t, listing.next(10), EBADF, 'next after close');
  listing.close();

  const concurrent = io.list();
  const parts = await Promise.all([concurrent.next(60), concurrent.next(60), concurrent.next(60), concurrent.next(60)]);
  const all = parts.flat();
  t.same(all.slice().sort(), names.slice().sort(), 'concurrent next() calls queue without loss or duplicates');
  t.same(await concurrent.next(0), [], 'next(0)');
  concurrent.close();
});

t.test('hundreds of concurrent aio operations', async (t) => {
  const prefix = uniq('many');
  const n = 256;
  const payload = (i: number) => Buffer.alloc(4096 + i, i & 0xff);
  await Promise.all(Array.from({ length: n }, (_, i) => ioA.write(`${prefix}.${i}`, 0, payload(i))));
  const targets = Array.from({ length: n }, () => Buffer.alloc(8192));
  const [reads, fulls, stats] = await Promise.all([
    Promise.all(targets.map((buf, i) => ioA.read(`${prefix}.${i}`, 0, 8192, buf))),
    Promise.all(Array.from({ length: n }, (_, i) => ioB.readFull(`${prefix}.${i}`))),
    Promise.all(Array.from({ length: n }, (_, i) => ioA.stat(`${prefix}.${i}`))),
  ]);
  let bad = 0;
  for (let i = 0; i < n; i++) {
    const want = payload(i);
    if (reads[i] !== want.length || !targets[i]!.subarray(0, want.length).equals(want)) bad++;
    if (!fulls[i]!.equals(want) || stats[i]!.size !== want.length) bad++;
  }
  t.equal(bad, 0, `${4 * n} operations in flight together, all correct`);
  await Promise.all(Array.from({ length: n }, (_, i) => ioA.remove(`${prefix}.${i}`)));
});

t.test('names with NUL (or empty) reject EINVAL without reaching librados', async (t) => {
  const bad = 'nul\0name';
  const buf = Buffer.alloc(4);
  const err = await ioA.write(bad, 0, buf).then(
    () => null,
    (e: unknown) => e,
  );
  t.match(err, { name: 'RadosError', errno: EINVAL, op: 'write', message: /^write "nul\\x00name": Invalid argument \(errno 22\)/ });
  await rejectsErrno(t, ioA.read(bad, 0, 4, buf), EINVAL, 'read');
  await rejectsErrno(t, ioA.writeFull(bad, buf), EINVAL, 'writeFull');
  await rejectsErrno(t, ioA.readFull(bad), EINVAL, 'readFull');
  await rejectsErrno(t, ioA.zero(bad, 0, 1), EINVAL, 'zero');
  await rejectsErrno(t, ioA.remove(bad), EINVAL, 'remove');
  await rejectsErrno(t, ioA.stat(bad), EINVAL, 'stat');
  await rejectsErrno(t, ioA.exec(bad, 'hello', 'say_hello', buf), EINVAL, 'exec');
  await rejectsErrno(t, ioA.lockExclusive(bad, 'l', 'c', '', 0), EINVAL, 'lockExclusive');
  await rejectsErrno(t, ioA.lockExclusive('ok-name', 'l\0', 'c', '', 0), EINVAL, 'lock name with NUL');
  await rejectsErrno(t, ioA.watch(bad, () => undefined), EINVAL, 'watch');
  await rejectsErrno(t, ioA.notify(bad, buf, 1000), EINVAL, 'notify');
  await rejectsErrno(t, ioA.write('', 0, buf), EINVAL, 'empty name');
  await rejectsErrno(t, ioA.stat('nul'), ENOENT, 'the name was not cut at the NUL and written');
});

t.test('exclusive locks between two clients', async (t) => {
  const oid = uniq('lock');
  await ioA.lockExclusive(oid, 'L', 'cookie-a', 'held by A', 0);
  await rejectsErrno(t, ioB.lockExclusive(oid, 'L', 'cookie-b', 'B wants it', 0), EBUSY, 'another client: EBUSY');
  await rejectsErrno(t, ioA.lockExclusive(oid, 'L', 'cookie-a', 'again', 0), EEXIST, 'same client and cookie: EEXIST');

  const info = await ioB.listLockers(oid, 'L');
  t.equal(info.exclusive, true);
  t.equal(info.tag, '');
  t.equal(info.lockers.length, 1);
  t.equal(info.lockers[0]!.client, `client.${a.instanceId()}`, 'holder is A');
  t.equal(info.lockers[0]!.cookie, 'cookie-a');
  t.ok(info.lockers[0]!.addr.endsWith(a.addrs()), `addr ${info.lockers[0]!.addr} is A's ${a.addrs()}`);
  t.same(await ioB.listLockers(oid, 'other-lock'), { exclusive: false, tag: '', lockers: [] }, 'an unused lock name');
  await rejectsErrno(t, ioB.listLockers(uniq('lock-absent'), 'L'), ENOENT, 'absent object');

  await rejectsErrno(t, ioA.unlock(oid, 'L', 'wrong-cookie'), ENOENT, 'unlock with a cookie not holding it');
  await ioA.unlock(oid, 'L', 'cookie-a');
  await ioB.lockExclusive(oid, 'L', 'cookie-b', 'B now', 0);
  t.pass('after unlock the other client takes it');

  const holder = (await ioA.listLockers(oid, 'L')).lockers[0]!;
  await ioA.breakLock(oid, 'L', holder.client, holder.cookie);
  await ioA.lockExclusive(oid, 'L', 'cookie-a', 'A again', 0);
  t.pass('breakLock lets the other client take it');
  await rejectsErrno(t, ioB.breakLock(oid, 'L', `client.${b.instanceId()}`, 'cookie-b'), ENOENT, 'breaking a lock not held');

  const timed = uniq('lock-timed');
  await ioA.lockExclusive(timed, 'L', 'ca', 'one second', 1);
  await rejectsErrno(t, ioB.lockExclusive(timed, 'L', 'cb', '', 0), EBUSY, 'held while the duration runs');
  await new Promise((r) => setTimeout(r, 1300));
  await ioB.lockExclusive(timed, 'L', 'cb', '', 0);
  t.pass('a lock with a duration expires');
});

t.test('exec', async (t) => {
  const oid = uniq('exec');
  await ioA.writeFull(oid, Buffer.from('x'));
  t.equal((await ioA.exec(oid, 'hello', 'say_hello', Buffer.from('node'))).toString(), 'Hello, node!', 'cls output');

  await ioA.lockExclusive(oid, 'L', 'ca', '', 0);
  const out = await ioA.exec(oid, 'lock', 'assert_locked', assertLockedInput('L', 'ca'));
  t.equal(out.length, 0, 'assert_locked passes for the holder');
  await rejectsErrno(t, ioB.exec(oid, 'lock', 'assert_locked', assertLockedInput('L', 'ca')), EBUSY, 'not for another client with the same cookie');
  await rejectsErrno(t, ioA.exec(oid, 'lock', 'assert_locked', assertLockedInput('L', 'other')), EBUSY, 'nor for another cookie');
  await ioA.unlock(oid, 'L', 'ca');
  await rejectsErrno(t, ioA.exec(oid, 'lock', 'assert_locked', assertLockedInput('L', 'ca')), EBUSY, 'nor after unlock');
  await t.rejects(ioA.exec(oid, 'no_such_class', 'm', Buffer.alloc(0)), { name: 'RadosError', op: 'exec' }, 'unknown class');
});

t.test('watch and notify', async (t) => {
  const oid = uniq('watch');
  await ioA.writeFull(oid, Buffer.from('w'));
  const q = eventQueue();
  const watch = await ioA.watch(oid, (e) => {
    q.push(e);
    if (e.type === 'notify') void watch.ack(e.notifyId, Buffer.from(`pong:${e.payload.toString()}`));
  });
  t.type(watch.cookie, 'bigint');
  t.ok(watch.check() >= 0, 'check: ms since confirmed');

  const result = await ioB.notify(oid, Buffer.from('ping'), 5000);
  t.equal(result.acks.length, 1, 'one ack');
  t.equal(result.acks[0]!.notifierId, a.instanceId(), 'from A');
  t.equal(result.acks[0]!.cookie, watch.cookie, "with A's watch cookie");
  t.equal(result.acks[0]!.payload.toString(), 'pong:ping', 'carrying the ack payload');
  t.same(result.timeouts, []);
  const event = q.events[0];
  t.ok(event && event.type === 'notify', 'the watcher got the notify');
  if (event?.type === 'notify') {
    t.type(event.notifyId, 'bigint');
    t.equal(event.notifierId, b.instanceId(), 'from B');
    t.equal(event.payload.toString(), 'ping');
  }

  // A second watcher (B) that never acks: the notify times out and says so.
  const silent = await ioB.watch(oid, () => undefined);
  const started = Date.now();
  const slow = await ioB.notify(oid, Buffer.from('again'), 300);
  const waited = Date.now() - started;
  t.ok(waited < 5000, `a 300 ms timeout waits about a second (librados' resolution), not the 30 s default: ${waited} ms`);
  t.same(slow.acks.map((x) => x.cookie), [watch.cookie], 'the acking watcher acked');
  t.same(slow.timeouts, [{ notifierId: b.instanceId(), cookie: silent.cookie }], 'the silent one timed out');
  await silent.close();

  await watch.close();
  await watch.close();
  t.pass('close twice');
  t.throws(() => watch.check(), { name: 'RadosError', errno: EBADF }, 'check after close');
  await rejectsErrno(t, watch.ack(1n), EBADF, 'ack after close');
  const after = await ioB.notify(oid, Buffer.from('nobody'), 1000);
  t.same(after, { acks: [], timeouts: [] }, 'no watcher left');
  t.equal(q.events.length, 2, 'no events after close');

  t.throws(() => ioA.watch(oid, 'nope' as unknown as () => void), TypeError, 'callback must be a function');
});

t.test('fencing: a blocklisted client is cut off', async (t) => {
  const victim = await connect(t);
  const fencer = await connect(t);
  const ioV = await victim.openPool(DATA);
  const ioF = await fencer.openPool(DATA);
  const oid = uniq('fence');
  await ioV.writeFull(oid, Buffer.from('before'));
  await ioV.lockExclusive(oid, 'L', 'victim', '', 0);
  const q = eventQueue();
  await ioV.watch(oid, (e) => q.push(e));

  const addr = victim.addrs();
  await fencer.blocklistAdd(addr, 600);
  t.teardown(() => fencer.monCommand({ prefix: 'osd blocklist', blocklistop: 'rm', addr }).catch(() => undefined));

  await rejectsErrno(t, within(ioV.write(oid, 0, Buffer.from('after')), 20_000, 'write after blocklist'), ESHUTDOWN, "the victim's next write: ESHUTDOWN");
  const event = await q.next(20_000);
  t.same(event, { type: 'error', errno: ENOTCONN }, "the victim's watch reports the error");

  const [holder] = (await ioF.listLockers(oid, 'L')).lockers;
  t.equal(holder?.client, `client.${victim.instanceId()}`);
  await ioF.breakLock(oid, 'L', holder!.client, holder!.cookie);
  await ioF.lockExclusive(oid, 'L', 'fencer', '', 0);
  t.pass('the fencer breaks the lock and takes it');
  t.equal((await ioF.readFull(oid)).toString(), 'before', 'the fenced write never landed');

  await within(victim.shutdown(), 20_000, 'shutdown of a blocklisted client');
  t.pass('a blocklisted client still shuts down');
});

t.test('monCommand', async (t) => {
  const { output, status } = await a.monCommand({ prefix: 'osd pool ls', format: 'json' });
  t.type(status, 'string');
  const pools = JSON.parse(output.toString()) as string[];
  t.ok(pools.includes(DATA), `osd pool ls lists ${DATA}`);
  const err = await a.monCommand({ prefix: 'no such command' }).then(
    () => null,
    (e: unknown) => e,
  );
  t.match(err, { name: 'RadosError', op: 'monCommand', errno: EINVAL }, 'an unknown command: EINVAL');
  t.throws(() => a.monCommand(42 as unknown as object), TypeError);
});

t.test('waitForLatestOsdmap: this client gets the epoch the mon has now', async (t) => {
  const epoch = async () => (JSON.parse((await a.monCommand({ prefix: 'osd dump', format: 'json' })).output.toString()) as { epoch: number }).epoch;
  const before = await epoch();
  await a.waitForLatestOsdmap();
  t.ok((await epoch()) >= before, 'resolves once the map is at least as new as the mon\'s');
  await Promise.all([a.waitForLatestOsdmap(), a.waitForLatestOsdmap()]);
  t.pass('concurrent calls resolve');
});

t.test('close and shutdown', async (t) => {
  const c = await connect(t);
  const io = await c.openPool(DATA);
  const prefix = uniq('close');

  // close() waits for what is in flight, then refuses.
  const writes = Array.from({ length: 64 }, (_, i) => io.write(`${prefix}.${i}`, 0, Buffer.alloc(4096, i)));
  const closing = io.close();
  await rejectsErrno(t, io.write(`${prefix}.late`, 0, Buffer.alloc(1)), EBADF, 'no new operations once closing');
  const settled = await Promise.allSettled(writes);
  await closing;
  t.equal(settled.filter((s) => s.status === 'fulfilled').length, 64, 'writes in flight at close() completed');
  await io.close();
  t.pass('close is idempotent');
  await rejectsErrno(t, io.stat(`${prefix}.0`), EBADF, 'operations on a closed pool');
  t.throws(() => io.list(), { name: 'RadosError', errno: EBADF }, 'list() on a closed pool');

  // shutdown() waits for what is in flight on every pool, then refuses.
  const io2 = await c.openPool(DATA);
  const io3 = await c.openPool(DATA);
  const watch = await io3.watch(`${prefix}.0`, () => undefined);
  const listing = io3.list();
  const more = Array.from({ length: 64 }, (_, i) => io2.write(`${prefix}.s${i}`, 0, Buffer.alloc(512, i)));
  const downs = [c.shutdown(), c.shutdown()];
  await rejectsErrno(t, io2.write(`${prefix}.late`, 0, Buffer.alloc(1)), ESHUTDOWN, 'no new operations once shutting down');
  const done = await Promise.allSettled(more);
  await Promise.all(downs);
  await c.shutdown();
  t.equal(done.filter((s) => s.status === 'fulfilled').length, 64, 'writes in flight at shutdown() completed');
  t.pass('shutdown is idempotent');
  await rejectsErrno(t, io2.read(`${prefix}.s1`, 0, 1, Buffer.alloc(1)), ESHUTDOWN, 'read after shutdown');
  await rejectsErrno(t, io3.watch(`${prefix}.0`, () => undefined), ESHUTDOWN, 'watch after shutdown');
  await rejectsErrno(t, listing.next(10), EBADF, 'the listing was closed with its pool');
  await rejectsErrno(t, watch.ack(1n), EBADF, 'the watch was closed with its pool');
  await watch.close();
  await io2.close();
  await rejectsErrno(t, c.openPool(DATA), ESHUTDOWN, 'openPool after shutdown');
  await rejectsErrno(t, c.monCommand({ prefix: 'osd pool ls' }), ESHUTDOWN, 'monCommand after shutdown');
  await rejectsErrno(t, c.blocklistAdd('127.0.0.1:0/1', 1), ESHUTDOWN, 'blocklistAdd after shutdown');
  await rejectsErrno(t, c.waitForLatestOsdmap(), ESHUTDOWN, 'waitForLatestOsdmap after shutdown');
  t.throws(() => c.instanceId(), { name: 'RadosError', errno: ESHUTDOWN }, 'instanceId after shutdown');
  t.throws(() => c.addrs(), { name: 'RadosError', errno: ESHUTDOWN }, 'addrs after shutdown');
  t.equal((await ioA.stat(`${prefix}.s63`)).size, 512, 'the data is there for other clients');
});

// ---- lifetime rules checked in child processes ----

const BINDING_URL = new URL('../../../src/blockers/rados/binding.js', import.meta.url).href;

async function child(t: Tap, body: string, args: string[] = [], nodeArgs: string[] = []) {
  const dir = await tempDir(t, 'archipelago-rados-child-');
  const file = path.join(dir, 'child.mjs');
  await fs.writeFile(
    file,
    `const { loadRados } = await import(${JSON.stringify(BINDING_URL)});\n` +
      `const [conf, pool, prefix] = process.argv.slice(2);\n` +
      `const rados = loadRados();\n${body}\n`,
  );
  return run(process.execPath, [...nodeArgs, file, ceph.conf, DATA, ...args], { env: childEnv(), timeoutMs: 30_000, t });
}

t.test('the process exits by itself after shutdown', async (t) => {
  const r = await child(
    t,
    `const c = await rados.connect({ conf });
     const io = await c.openPool(pool);
     await io.writeFull(prefix, Buffer.from('x'));
     await io.readFull(prefix);
     await io.watch(prefix, () => {});
     io.list();
     await c.shutdown();
     console.log('shut down');`,
    [uniq('exit')],
  );
  t.equal(r.code, 0, 'exit code 0', diag(r));
  t.equal(r.stdout.trim(), 'shut down');
  t.ok(r.ms < 10_000, `exited in ${r.ms} ms`);
});

t.test('without shutdown: in-flight operations finish, then the process exits cleanly', async (t) => {
  const prefix = uniq('noshut');
  const r = await child(
    t,
    `const c = await rados.connect({ conf });
     const io = await c.openPool(pool);
     await io.watch(prefix + '.w', () => {}).catch(() => {});
     for (let i = 0; i < 200; i++) io.write(prefix + '.' + i, 0, Buffer.alloc(4096, 1));
     console.log('left');`,
    [prefix],
  );
  t.equal(r.code, 0, 'exit code 0, no crash at teardown', diag(r));
  t.equal(r.signal, null);
  t.ok(r.ms < 10_000, `exited in ${r.ms} ms`);
  const stats = await Promise.all(Array.from({ length: 200 }, (_, i) => ioA.stat(`${prefix}.${i}`)));
  t.ok(stats.every((s) => s.size === 4096), 'all 200 unawaited writes completed before exit');
});

t.test('JS dropping every reference while operations are in flight', async (t) => {
  const prefix = uniq('gc');
  const r = await child(
    t,
    `const c = await rados.connect({ conf });
     let io = await c.openPool(pool);
     const pending = [];
     for (let i = 0; i < 300; i++) pending.push(io.write(prefix + '.' + i, 0, Buffer.alloc(65536, i & 255)));
     for (let i = 0; i < 100; i++) pending.push(io.read(prefix + '.' + i, 0, 65536, Buffer.alloc(65536)).catch(() => 0));
     for (let i = 0; i < 50; i++) pending.push(io.readFull(prefix + '.big').catch(() => 0));
     io = null;
     for (let i = 0; i < 10; i++) { globalThis.gc(); await new Promise((r) => setImmediate(r)); }
     await Promise.all(pending);
     globalThis.gc();
     const io2 = await c.openPool(pool);
     for (let i = 0; i < 300; i++) {
       const b = await io2.readFull(prefix + '.' + i);
       if (b.length !== 65536 || b[65535] !== (i & 255)) throw new Error('object ' + i + ' is wrong');
     }
     await c.shutdown();
     console.log('intact');`,
    [prefix],
    ['--expose-gc'],
  );
  t.equal(r.code, 0, 'exit code 0', diag(r));
  t.equal(r.stdout.trim(), 'intact', 'every write landed with its data although JS dropped the buffers and the pool');
});
