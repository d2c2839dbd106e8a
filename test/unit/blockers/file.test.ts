/**
 * FileBlocker: the conformance suite (default and tiny fd caches), then what
 * only the file layout has: fan-out, name encoding, fd cache eviction, exact
 * fsyncs, temp files, the store marker.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import {
  FileBlocker,
  STORE_MARKER,
  decodeName,
  encodeName,
  fanOutDir,
  fsyncChannel,
  openFileBlocker,
  type FileBlockerOptions,
  type FsyncMessage,
} from '../../../src/blockers/file.js';
import { BlockerError } from '../../../src/blockers/errors.js';
import { blockerConformance, collect, pattern, shuffle, type Tap } from '../../helpers/blocker-conformance.js';

async function tempDir(t: Tap): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'arch-file-blocker-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Every file and directory under `dir`, relative to it. */
async function walk(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { recursive: true });
  return entries.map(String).sort();
}

async function makeFixture(options: FileBlockerOptions = {}) {
  const parent = await fs.mkdtemp(path.join(os.tmpdir(), 'arch-file-conf-'));
  const root = path.join(parent, 'store');
  const blocker = await openFileBlocker(root, options);
  return {
    blocker,
    cleanup: () => fs.rm(parent, { recursive: true, force: true }),
    outsideRoot: async () => (await walk(parent)).filter((f) => f !== 'store' && !f.startsWith('store' + path.sep)),
  };
}

/** Records fsyncs of one store. */
function spyFsyncs(t: Tap, root: string) {
  const seen: FsyncMessage[] = [];
  const onMessage = (m: unknown) => {
    if ((m as FsyncMessage).root === root) seen.push(m as FsyncMessage);
  };
  fsyncChannel.subscribe(onMessage);
  t.teardown(() => void fsyncChannel.unsubscribe(onMessage));
  return {
    take() {
      const files = seen.filter((m) => m.target === 'file').map((m) => m.key).sort();
      const dirs = seen.filter((m) => m.target === 'dir').map((m) => m.key).sort();
      seen.length = 0;
      return { files, dirs };
    },
  };
}

async function openFds(): Promise<number> {
  return (await fs.readdir('/proc/self/fd')).length;
}

await blockerConformance(t, 'file', () => makeFixture());
await blockerConformance(t, 'file (4 fds)', () => makeFixture({ maxOpenFiles: 4 }));

t.test('name encoding', async (t) => {
  t.equal(encodeName('vol-1.2.3_x'), 'vol-1.2.3_x', 'safe names are kept');
  t.equal(encodeName('a/b'), 'a%2Fb');
  t.equal(encodeName('../x'), '..%2Fx');
  t.equal(encodeName('.'), '%2E');
  t.equal(encodeName('..'), '%2E%2E');
  t.equal(encodeName('%'), '%25');
  t.equal(encodeName('é'), '%C3%A9');
  for (const name of ['a/b', '..', '.', '%', '%25', 'é名🙂', ' ', '\n', '~x', 'x'.repeat(255)]) {
    const file = encodeName(name);
    t.match(file, /^(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+$/, `${JSON.stringify(name)} encodes to a safe file name`);
    t.not(file, '.');
    t.not(file, '..');
    t.equal(decodeName(file), name, 'round trip');
  }
  for (const foreign of ['a%41', '%2f', '%', '%G0', '.', '..', '~tmp.123', 'a b', STORE_MARKER + 'x%']) {
    t.equal(decodeName(foreign), undefined, `${JSON.stringify(foreign)} is not ours`);
  }
});

t.test('fan-out layout', async (t) => {
  const root = path.join(await tempDir(t), 'store');
  const b = await openFileBlocker(root);
  t.teardown(() => b.close());
  const h = createHash('sha1').update('vol.1.2').digest('hex');
  t.equal(fanOutDir('vol.1.2'), `${h.slice(0, 2)}/${h.slice(2, 4)}`);
  await b.write('vol.1.2', 0, Buffer.from('x'));
  await b.replace('../up', Buffer.from('y'));
  const files = (await walk(root)).filter((f) => f.split(path.sep).length === 3);
  t.same(files.sort(), [path.join(fanOutDir('vol.1.2'), 'vol.1.2'), path.join(fanOutDir('../up'), '..%2Fup')].sort());
  t.equal(await fs.readFile(path.join(root, fanOutDir('../up'), '..%2Fup'), 'utf8'), 'y');

  // spread: 2000 names land in many directories
  const dirs = new Set(Array.from({ length: 2000 }, (_, i) => fanOutDir(`v.1.${i}`)));
  t.ok(dirs.size > 1900, `2000 names in ${dirs.size} leaf directories`);

  const tooLong = '/'.repeat(100); // 300 bytes once encoded
  await t.rejects(b.write(tooLong, 0, Buffer.from('x')), { code: 'EINVAL' }, 'encoded name over 255 bytes');
});

t.test('fd cache: more objects than fds, concurrent I/O, no leaks', async (t) => {
  const root = path.join(await tempDir(t), 'store');
  const before = await openFds();
  const b = await openFileBlocker(root, { maxOpenFiles: 8 });
  const fsyncs = spyFsyncs(t, b.root);
  const OBJECTS = 200;
  const WRITES = 8;
  const jobs: (() => Promise<unknown>)[] = [];
  let peak = 0;
  for (let o = 0; o < OBJECTS; o++) {
    for (let w = 0; w < WRITES; w++) {
      jobs.push(async () => {
        await b.write(`e.${o}`, w * 512, pattern(o, w, 512));
        peak = Math.max(peak, b.openFileCount);
      });
    }
  }
  await Promise.all(shuffle(jobs, 11).map((j) => j()));
  t.ok(b.openFileCount <= 8, `at rest at most 8 fds open (${b.openFileCount}); peak ${peak}`);

  // reads racing with writes to other objects, through the same tiny cache
  const reads = await Promise.all(
    shuffle(Array.from({ length: OBJECTS * WRITES }, (_, i) => i), 5).map(async (i) => {
      const o = Math.floor(i / WRITES);
      const w = i % WRITES;
      if (i % 7 === 0) await b.write(`other.${i}`, 0, Buffer.alloc(100, 1));
      const buf = Buffer.alloc(512);
      return (await b.read(`e.${o}`, w * 512, 512, buf)) === 512 && buf.equals(pattern(o, w, 512));
    }),
  );
  t.ok(reads.every(Boolean), 'every piece reads back');

  // 'e.0' was evicted long ago: sync must reopen it to fsync
  await b.write('e.0', 0, pattern(0, 0, 512));
  for (let i = 0; i < 20; i++) await b.stat(`e.${i}`).then(() => b.read(`e.${i + 1}`, 0, 1, Buffer.alloc(1)));
  fsyncs.take();
  await b.sync(['e.0']);
  t.same(fsyncs.take().files, ['e.0'], 'an evicted dirty object is still fsynced');

  await b.close();
  t.equal(b.openFileCount, 0, 'close releases every fd');
  t.equal(await openFds(), before, 'no fd leaked');
});

t.test('sync fsyncs exactly what is dirty', async (t) => {
  const root = path.join(await tempDir(t), 'store');
  const b = await openFileBlocker(root);
  t.teardown(() => b.close());
  const fsyncs = spyFsyncs(t, b.root);

  await Promise.all(['a', 'b', 'c'].map((n) => b.write(n, 0, Buffer.from(n))));
  await b.sync(['a']);
  let got = fsyncs.take();
  t.same(got.files, ['a'], 'only the named object');
  t.same(got.dirs, [fanOutDir('a'), fanOutDir('a').slice(0, 2), ''].sort(), 'its new directories and the root');

  await b.sync();
  got = fsyncs.take();
  t.same(got.files, ['b', 'c'], 'sync() takes the rest');
  const expectDirs = new Set([fanOutDir('b'), fanOutDir('b').slice(0, 2), fanOutDir('c'), fanOutDir('c').slice(0, 2)]);
  t.same(got.dirs, [...expectDirs].sort(), 'and their directories (the root was already synced)');

  await b.sync();
  await b.sync(['a', 'b', 'c', 'never']);
  t.same(fsyncs.take(), { files: [], dirs: [] }, 'nothing dirty, nothing fsynced');

  await b.write('a', 1, Buffer.from('x'));
  await b.write('b', 1, Buffer.from('x'));
  await b.sync(['a', 'c']);
  t.same(fsyncs.take(), { files: ['a'], dirs: [] }, 'an old object: its file only');

  // concurrent syncs of one object coalesce
  await b.write('a', 2, Buffer.from('y'));
  await Promise.all(Array.from({ length: 10 }, () => b.sync(['a'])));
  got = fsyncs.take();
  t.ok(got.files.length >= 1 && got.files.length <= 2 && got.files.every((f) => f === 'a'), `10 syncs, ${got.files.length} fsync(s)`);

  // a sync that starts while an fsync is in flight, with a newer write, gets its own fsync
  await b.write('c', 0, Buffer.from('1'));
  const first = b.sync(['c']);
  await b.write('c', 0, Buffer.from('2'));
  await Promise.all([first, b.sync(['c']), b.sync(['c'])]);
  got = fsyncs.take();
  t.same(got.files, ['c', 'c'], 'a write during an fsync needs (exactly) one more');
  await b.sync(['c']);
  t.same(fsyncs.take().files, [], 'and nothing left dirty');

  await b.replace('meta', Buffer.from('m'));
  fsyncs.take();
  await b.sync(['meta']);
  t.same(fsyncs.take(), { files: [], dirs: [] }, 'replace is durable by itself');
  await b.remove('b');
  await b.sync(['a']);
  t.same(fsyncs.take().dirs, [], 'a removal does not make sync(names) fsync directories');
  await b.sync();
  t.same(fsyncs.take(), { files: [], dirs: [fanOutDir('b')] }, 'but sync() makes the removal durable');
});

t.test('replace leaves no temp files; crash leftovers are ignored and removable', async (t) => {
  const root = path.join(await tempDir(t), 'store');
  const b = await openFileBlocker(root);
  t.teardown(() => b.close());
  await Promise.all(Array.from({ length: 60 }, (_, i) => b.replace(`m.${i % 10}`, Buffer.alloc(1000 + i, i))));
  t.same((await walk(root)).filter((f) => path.basename(f).startsWith('~')), [], 'no temp files after replaces');

  const leftover = path.join(root, fanOutDir('m.0'), '~tmp.deadbeef');
  await fs.writeFile(leftover, 'half a map');
  const old = new Date(Date.now() - 3600_000);
  await fs.utimes(leftover, old, old);
  await fs.writeFile(path.join(root, '~tmp.young'), 'x');
  t.same((await collect(b.list(''))).sort(), Array.from({ length: 10 }, (_, i) => `m.${i}`).sort(), 'list ignores them');
  t.equal(await b.removeTempFiles(), 1, 'removes the old leftover only');
  t.equal(await b.removeTempFiles(0), 1, 'and the young one on request');
  t.same((await walk(root)).filter((f) => path.basename(f).startsWith('~')), []);
});

t.test('replace failure cleans up its temp file', async (t) => {
  const root = path.join(await tempDir(t), 'store');
  const b = await openFileBlocker(root);
  t.teardown(() => b.close());
  // a directory where the object's file should be makes the rename fail
  await fs.mkdir(path.join(root, fanOutDir('blocked'), 'blocked'), { recursive: true });
  await fs.writeFile(path.join(root, fanOutDir('blocked'), 'blocked', 'x'), 'x');
  const err = await b.replace('blocked', Buffer.from('data')).catch((e: unknown) => e);
  t.ok(err instanceof BlockerError && err.code === 'EIO', 'rename onto a directory fails with EIO', { err });
  t.same((await walk(root)).filter((f) => path.basename(f).startsWith('~')), [], 'no temp file left');
});

t.test('store marker', async (t) => {
  const dir = await tempDir(t);

  const fresh = path.join(dir, 'a', 'b', 'store');
  const b1 = await openFileBlocker(fresh);
  const marker = JSON.parse(await fs.readFile(path.join(fresh, STORE_MARKER), 'utf8'));
  t.match(marker, { format: 'archipelago-file-store', version: 1 }, 'marker written in a new root');
  await b1.write('kept', 0, Buffer.from('x'));
  await b1.close();
  const b2 = await openFileBlocker(fresh);
  t.equal((await b2.readFull('kept')).toString(), 'x', 'reopened');
  await b2.close();
  t.ok(b2 instanceof FileBlocker && typeof b2.capabilities.sparse === 'boolean');
  t.equal(b2.capabilities.punch, false, 'punch honestly does not free space in general');

  const empty = path.join(dir, 'empty');
  await fs.mkdir(empty);
  await (await openFileBlocker(empty)).close();
  t.ok(await fs.stat(path.join(empty, STORE_MARKER)), 'an empty directory is initialised');

  const random = path.join(dir, 'random');
  await fs.mkdir(random);
  await fs.writeFile(path.join(random, 'notes.txt'), 'mine');
  await t.rejects(openFileBlocker(random), { code: 'EINVAL', message: /not an Archipelago store/ }, 'foreign directory');
  t.same(await fs.readdir(random), ['notes.txt'], 'left untouched');

  const future = path.join(dir, 'future');
  await fs.mkdir(future);
  await fs.writeFile(path.join(future, STORE_MARKER), JSON.stringify({ ...marker, version: 2 }));
  await t.rejects(openFileBlocker(future), { code: 'EINVAL', message: /version 2/ }, 'newer format');

  const garbage = path.join(dir, 'garbage');
  await fs.mkdir(garbage);
  await fs.writeFile(path.join(garbage, STORE_MARKER), '{not json');
  await t.rejects(openFileBlocker(garbage), { code: 'EINVAL' }, 'unparseable marker');

  await t.rejects(openFileBlocker(path.join(dir, 'missing'), { create: false }), { code: 'ENOENT' }, 'create: false');
  const file = path.join(dir, 'file');
  await fs.writeFile(file, 'x');
  await t.rejects(openFileBlocker(file), BlockerError, 'a file is not a store');
});
