/**
 * The object-store conformance suite: what every Blocker (file, memory, and
 * later rados) must do to meet src/blockers/blocker.ts. Each case gets a fresh
 * blocker from `makeBlocker` and closes and cleans it up afterwards.
 *
 *   await blockerConformance(t, 'file', async () => ({ blocker, cleanup }));
 *
 * `outsideRoot`, when given, lists files that exist outside the store's root
 * (for stores with one); the odd-names case asserts it stays empty.
 */
import { createHash } from 'node:crypto';
import type { Blocker } from '../../src/blockers/blocker.js';
import { BlockerError } from '../../src/blockers/errors.js';
import type tap from 'tap';

/** The type tap gives a test callback. */
export type Tap = Parameters<Parameters<typeof tap.test>[0]>[0];

export interface BlockerFixture {
  blocker: Blocker;
  cleanup: () => Promise<void>;
  outsideRoot?: () => Promise<string[]>;
}

/** Names that would escape or confuse a naive file layout; all valid object names. */
export const ODD_NAMES = [
  'a/b',
  '../escape',
  '../../../../../../tmp/escape',
  '..',
  '.',
  '...',
  '.hidden',
  '%',
  '%%',
  '%2F',
  'a%2Fb',
  'A', // distinct from 'a' below (case-sensitive)
  'a',
  'with space',
  'back\\slash',
  '~tilde',
  'tab\tand\nnewline',
  'ünïcödé/名前/🙂',
  '-dash',
  'x'.repeat(255),
];

export async function blockerConformance(
  t: Tap,
  name: string,
  makeBlocker: () => Promise<BlockerFixture>,
): Promise<void> {
  await t.test(`${name} blocker conformance`, async (t) => {
    for (const [caseName, body] of Object.entries(CASES)) {
      await t.test(caseName, async (t) => {
        const fixture = await makeBlocker();
        t.teardown(async () => {
          await fixture.blocker.close().catch(() => {});
          await fixture.cleanup();
        });
        await body(t, fixture.blocker, fixture);
      });
    }
  });
}

type Case = (t: Tap, b: Blocker, fixture: BlockerFixture) => Promise<void>;

const CASES: Record<string, Case> = {
  async 'absent objects are ENOENT, remove is idempotent'(t, b) {
    await rejectsWith(t, b.read('nope', 0, 10, Buffer.alloc(10)), 'ENOENT');
    await rejectsWith(t, b.readFull('nope'), 'ENOENT');
    await rejectsWith(t, b.stat('nope'), 'ENOENT');
    await rejectsWith(t, b.punch('nope', 0, 10), 'ENOENT');
    await b.remove('nope');
    t.same(await collect(b.list('')), [], 'empty store lists nothing');
  },

  async 'invalid names are EINVAL'(t, b) {
    for (const bad of ['', 'x'.repeat(256), 'é'.repeat(128), 'lone\uD800surrogate']) {
      await rejectsWith(t, b.write(bad, 0, Buffer.from('x')), 'EINVAL');
      await rejectsWith(t, b.readFull(bad), 'EINVAL');
      await rejectsWith(t, b.replace(bad, Buffer.from('x')), 'EINVAL');
    }
    const longest = 'x'.repeat(255);
    await b.write(longest, 0, Buffer.from('ok'));
    t.equal((await b.readFull(longest)).toString(), 'ok', '255-byte name works');
  },

  async 'write then read: ranges, offsets past the end, short reads'(t, b) {
    await b.write('obj', 0, Buffer.from('hello world'));
    t.equal((await b.readFull('obj')).toString(), 'hello world');
    t.equal((await b.stat('obj')).size, 11);

    const part = Buffer.alloc(5);
    t.equal(await b.read('obj', 6, 5, part), 5, 'partial range');
    t.equal(part.toString(), 'world');

    const past = Buffer.alloc(8, 0xaa);
    t.equal(await b.read('obj', 100, 8, past), 0, 'offset past the end reads nothing');
    t.ok(past.every((x) => x === 0xaa), 'target untouched');

    const short = Buffer.alloc(100, 0xaa);
    t.equal(await b.read('obj', 6, 100, short), 5, 'short read returns the bytes that exist');
    t.equal(short.subarray(0, 5).toString(), 'world');
    t.ok(short.subarray(5).every((x) => x === 0xaa), 'bytes past the end untouched');

    // a write far into a new object: the gap reads as zeros and counts
    await b.write('gap', 4096, Buffer.from('tail'));
    t.equal((await b.stat('gap')).size, 4100);
    const gap = Buffer.alloc(4100, 0xaa);
    t.equal(await b.read('gap', 0, 4100, gap), 4100);
    t.ok(gap.subarray(0, 4096).every((x) => x === 0), 'unwritten range reads as zeros');
    t.equal(gap.subarray(4096).toString(), 'tail');

    // zero-length read and write
    t.equal(await b.read('obj', 0, 0, Buffer.alloc(0)), 0);
    await b.write('empty', 0, Buffer.alloc(0));
    t.equal((await b.stat('empty')).size, 0, 'zero-length write creates an empty object');
  },

  async 'overwrites and the caller reusing its buffer'(t, b) {
    const model = Buffer.alloc(9000);
    const put = async (offset: number, data: Buffer) => {
      await b.write('o', offset, data);
      data.copy(model, offset);
    };
    await put(0, Buffer.alloc(8192, 'a'));
    await put(1000, Buffer.alloc(2000, 'b'));
    await put(7000, Buffer.alloc(2000, 'c')); // extends to 9000
    t.ok((await b.readFull('o')).equals(model), 'content matches the model');
    t.equal((await b.stat('o')).size, 9000);

    const reused = Buffer.from('first');
    await b.write('reuse', 0, reused);
    reused.write('XXXXX');
    t.equal((await b.readFull('reuse')).toString(), 'first', 'data was taken before the write resolved');
  },

  async 'replace is whole-object and atomic'(t, b) {
    await b.replace('meta', Buffer.from('version one, long'));
    t.equal((await b.readFull('meta')).toString(), 'version one, long', 'replace creates');
    await b.replace('meta', Buffer.from('v2'));
    t.equal((await b.readFull('meta')).toString(), 'v2', 'no tail of the old content');
    t.equal((await b.stat('meta')).size, 2);

    await b.write('meta', 2, Buffer.from('+w'));
    t.equal((await b.readFull('meta')).toString(), 'v2+w', 'writes after replace go to the new content');
    await b.write('meta', 0, Buffer.from('dirty unsynced bytes'));
    await b.replace('meta', Buffer.from('v3'));
    t.equal((await b.readFull('meta')).toString(), 'v3', 'replace over unsynced writes');

    await b.replace('meta', Buffer.alloc(0));
    t.equal((await b.stat('meta')).size, 0, 'empty replace');

    // concurrent replaces and readers: every read sees one whole version
    const versions = Array.from({ length: 8 }, (_, i) => Buffer.alloc(64 * 1024 + i, 65 + i));
    await b.replace('race', versions[0]!);
    const seen: Buffer[] = [];
    await Promise.all([
      ...versions.map((v) => b.replace('race', v)),
      ...Array.from({ length: 16 }, async () => seen.push(await b.readFull('race'))),
    ]);
    const whole = (x: Buffer) => versions.some((v) => v.equals(x));
    t.ok(seen.every(whole), 'readers saw whole versions only');
    t.ok(whole(await b.readFull('race')), 'final content is one whole version');
  },

  async 'remove'(t, b) {
    await b.write('r', 0, Buffer.from('data'));
    await b.sync(['r']);
    await b.remove('r');
    await b.remove('r');
    await rejectsWith(t, b.readFull('r'), 'ENOENT');
    await rejectsWith(t, b.stat('r'), 'ENOENT');
    t.same(await collect(b.list('r')), []);
    await b.write('r', 2, Buffer.from('x'));
    t.same([...(await b.readFull('r'))], [0, 0, 120], 'written again, it starts empty');
    await b.replace('rr', Buffer.from('meta'));
    await b.remove('rr');
    await rejectsWith(t, b.read('rr', 0, 1, Buffer.alloc(1)), 'ENOENT');
  },

  async 'list by prefix'(t, b) {
    const names = ['vol1.1.0', 'vol1.1.1', 'vol1.2.0', 'vol10.1.0', 'vol2.1.0', 'sha256-00ff', 'v'];
    await Promise.all(names.map((n) => b.write(n, 0, Buffer.from(n))));
    t.same(sorted(await collect(b.list(''))), sorted(names), 'empty prefix lists all');
    t.same(sorted(await collect(b.list('vol1.'))), ['vol1.1.0', 'vol1.1.1', 'vol1.2.0']);
    t.same(sorted(await collect(b.list('vol1'))), ['vol1.1.0', 'vol1.1.1', 'vol1.2.0', 'vol10.1.0']);
    t.same(await collect(b.list('vol1.1.1')), ['vol1.1.1'], 'a whole name is a prefix of itself');
    t.same(await collect(b.list('nope')), []);
    t.same(await collect(b.list('vol1.1.1.')), []);
  },

  async 'odd names are stored and listed verbatim, inside the root'(t, b, fixture) {
    await Promise.all(ODD_NAMES.map((n, i) => (i % 2 ? b.write(n, 0, Buffer.from(n)) : b.replace(n, Buffer.from(n)))));
    for (const n of ODD_NAMES) t.equal((await b.readFull(n)).toString(), n, `readFull ${JSON.stringify(n)}`);
    t.same(sorted(await collect(b.list(''))), sorted(ODD_NAMES), 'list returns every odd name');
    t.same(sorted(await collect(b.list('..'))), sorted(['..', '...', '../escape', '../../../../../../tmp/escape']));
    t.same(sorted(await collect(b.list('%'))), sorted(['%', '%%', '%2F']));
    t.same(await collect(b.list('ünïcödé/')), ['ünïcödé/名前/🙂']);
    t.same(await collect(b.list('A')), ['A']);
    if (fixture.outsideRoot) t.same(await fixture.outsideRoot(), [], 'nothing was created outside the root');
    await b.sync();
    await Promise.all(ODD_NAMES.map((n) => b.remove(n)));
    t.same(await collect(b.list('')), [], 'all removed');
    if (fixture.outsideRoot) t.same(await fixture.outsideRoot(), [], 'still nothing outside the root');
  },

  async 'many concurrent writers to different objects'(t, b) {
    const OBJECTS = 64;
    const WRITES = 16;
    const SIZE = 4096;
    const jobs: (() => Promise<void>)[] = [];
    for (let o = 0; o < OBJECTS; o++) {
      for (let w = 0; w < WRITES; w++) jobs.push(() => b.write(`obj.${o}`, w * SIZE, pattern(o, w, SIZE)));
    }
    shuffle(jobs, 7);
    await Promise.all(jobs.map((j) => j()));
    await b.sync();
    let good = 0;
    await Promise.all(
      Array.from({ length: OBJECTS }, async (_, o) => {
        const data = await b.readFull(`obj.${o}`);
        const want = Buffer.concat(Array.from({ length: WRITES }, (_, w) => pattern(o, w, SIZE)));
        if (data.equals(want)) good++;
      }),
    );
    t.equal(good, OBJECTS, 'every object reads back right');
  },

  async 'concurrent writes to disjoint ranges of one object'(t, b) {
    const PIECES = 256;
    const SIZE = 1000; // unaligned on purpose
    const order = shuffle(Array.from({ length: PIECES }, (_, i) => i), 3);
    await Promise.all(order.map((i) => b.write('one', i * SIZE, pattern(1, i, SIZE))));
    const want = Buffer.concat(Array.from({ length: PIECES }, (_, i) => pattern(1, i, SIZE)));
    t.ok((await b.readFull('one')).equals(want), 'all pieces in place');
    const reads = await Promise.all(
      order.map(async (i) => {
        const buf = Buffer.alloc(SIZE);
        const n = await b.read('one', i * SIZE, SIZE, buf);
        return n === SIZE && buf.equals(pattern(1, i, SIZE));
      }),
    );
    t.ok(reads.every(Boolean), 'concurrent reads of the pieces');
  },

  async 'punch reads back zeros and keeps the size'(t, b) {
    const MiB = 1024 * 1024;
    const size = 3 * MiB + 123;
    await b.write('p', 0, Buffer.alloc(size, 0xff));
    const expect = Buffer.alloc(size, 0xff);

    await b.punch('p', 4096, 1.5 * MiB); // middle, more than one 1 MiB piece
    expect.fill(0, 4096, 4096 + 1.5 * MiB);
    t.ok((await readZeroFilled(b, 'p', size)).equals(expect), 'middle range zeroed, rest intact');

    await b.punch('p', 2 * MiB + 7, 8 * MiB); // reaches past the end
    expect.fill(0, 2 * MiB + 7);
    t.ok((await readZeroFilled(b, 'p', size)).equals(expect), 'tail zeroed');
    t.equal((await b.stat('p')).size, size, 'punch does not change the size');

    await b.punch('p', size + 10, 100);
    await b.punch('p', 0, 0);
    t.equal((await b.stat('p')).size, size, 'punch past the end is a no-op');
    t.ok((await readZeroFilled(b, 'p', size)).equals(expect));

    await b.write('p', 2 * MiB + 7, Buffer.from('again'));
    expect.write('again', 2 * MiB + 7);
    t.ok((await readZeroFilled(b, 'p', size)).equals(expect), 'writable after a punch');
  },

  async 'punch racing writes past the old end keeps those writes'(t, b) {
    let good = 0;
    const ROUNDS = 64;
    for (let round = 0; round < ROUNDS; round++) {
      const name = `pw${round}`;
      await b.write(name, 0, Buffer.alloc(8192, 0xff));
      // staggered so that some writes land in the middle of the punch
      const writes = Array.from({ length: 8 }, async (_, i) => {
        for (let d = 0; d < i * 2 + (round % 3); d++) await new Promise((r) => setImmediate(r));
        await b.write(name, 8192 + i * 4096, pattern(round, i, 4096));
      });
      await Promise.all([b.punch(name, 4096, 4096), ...writes]); // reaches the old end
      const want = Buffer.concat([
        Buffer.alloc(4096, 0xff),
        Buffer.alloc(4096),
        ...Array.from({ length: 8 }, (_, i) => pattern(round, i, 4096)),
      ]);
      if ((await readZeroFilled(b, name, want.length)).equals(want)) good++;
    }
    t.equal(good, ROUNDS, 'no concurrent write was cut off by the punch');
  },

  async 'sync with and without names'(t, b) {
    await b.write('s1', 0, Buffer.from('one'));
    await b.write('s2', 0, Buffer.from('two'));
    await b.sync(['s1']);
    await b.sync([]);
    await b.sync(['never-written', 'odd/name']);
    await b.sync();
    await b.sync();
    await b.replace('s3', Buffer.from('three'));
    await b.sync(['s3']);
    // syncs interleaved with writes, same and different objects
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 32; i++) {
      ops.push(b.write(`s${i % 4}`, i * 10, Buffer.from(`w${i}`)));
      ops.push(i % 3 ? b.sync([`s${i % 4}`, 's1']) : b.sync());
    }
    await Promise.all(ops);
    await b.sync();
    t.equal((await b.readFull('s1')).subarray(0, 3).toString(), 'one');
    await rejectsWith(t, b.sync(['']), 'EINVAL');
  },

  async 'close is idempotent and flushes writes in flight'(t, b) {
    const writes = Array.from({ length: 16 }, (_, i) => b.write(`c${i}`, 0, Buffer.from(`c${i}`)));
    const closes = [b.close(), b.close()];
    const settled = await Promise.allSettled(writes);
    t.ok(settled.every((s) => s.status === 'fulfilled'), 'writes started before close complete');
    await Promise.all(closes);
    await b.close();
    t.pass('closed three times');
    await t.rejects(b.write('late', 0, Buffer.from('x')), 'operations after close reject');
  },
};

// ------------------------------------------------------------- helpers

async function rejectsWith(t: Tap, p: Promise<unknown>, code: string): Promise<void> {
  try {
    await p;
    t.fail(`expected ${code}, resolved`);
  } catch (err) {
    t.ok(err instanceof BlockerError && err.code === code, `rejects ${code}`, { found: err });
  }
}

export async function collect(it: AsyncIterable<string>): Promise<string[]> {
  const out: string[] = [];
  for await (const x of it) out.push(x);
  return out;
}

function sorted(xs: string[]): string[] {
  return [...xs].sort();
}

/** Reads `size` bytes, zero-filling past the object's end as callers do. */
async function readZeroFilled(b: Blocker, name: string, size: number): Promise<Buffer> {
  const buf = Buffer.alloc(size, 0xee);
  const n = await b.read(name, 0, size, buf);
  buf.fill(0, n);
  return buf;
}

/** Deterministic bytes for (object, piece). */
export function pattern(o: number, w: number, size: number): Buffer {
  const seed = createHash('sha256').update(`${o}/${w}`).digest();
  const out = Buffer.alloc(size);
  for (let i = 0; i < size; i += seed.length) seed.copy(out, i);
  return out;
}

/** Fisher–Yates with a tiny LCG, so failures reproduce. */
export function shuffle<T>(xs: T[], seed: number): T[] {
  let s = seed >>> 0;
  for (let i = xs.length - 1; i > 0; i--) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const j = s % (i + 1);
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}
