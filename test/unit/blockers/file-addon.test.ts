/**
 * The file store's native fast paths (file-addon.ts: cached reads with
 * RWF_NOWAIT, batched writes): the blocker conformance suite with and
 * without them, then what they add — reads and writes through the addon
 * give the bytes fs gives, batch errors carry their errno, and the addon is
 * really used when built (so these tests test it rather than fs).
 */
import fs from 'node:fs/promises';
import fsSync from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import t from 'tap';
import { openFileBlocker, type FileBlockerOptions } from '../../../src/blockers/file.js';
import { loadFileAddon, type FileAddon } from '../../../src/blockers/file-addon.js';
import { WriteBatcher } from '../../../src/blockers/io-batch.js';
import { blockerConformance } from '../../helpers/blocker-conformance.js';

const addon = loadFileAddon();
t.ok(addon !== null || process.env.ARCHIPELAGO_FILE_ADDON === '0',
  'the addon is built (scripts/build-fileio.sh), so the fast paths are tested');

async function makeFixture(options: FileBlockerOptions = {}) {
  const parent = await fs.mkdtemp(path.join(os.tmpdir(), 'arch-file-addon-'));
  const blocker = await openFileBlocker(path.join(parent, 'store'), options);
  return {
    blocker,
    cleanup: () => fs.rm(parent, { recursive: true, force: true }),
    outsideRoot: async () => (await fs.readdir(parent)).filter((f) => f !== 'store'),
  };
}

await blockerConformance(t, 'file, plain fs (no addon)', () => makeFixture({ addon: null }));
if (addon) await blockerConformance(t, 'file, with the addon', () => makeFixture({ addon }));

t.test('addon: readNowait and writeBatch against fs', async (t) => {
  if (addon === null) { t.fail('the addon is not built: run scripts/build-fileio.sh'); return; }
  const a = addon!;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'arch-file-addon-io-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'f');
  const fd = fsSync.openSync(file, 'w+');
  t.teardown(() => fsSync.closeSync(fd));
  const data = crypto.randomBytes(256 * 1024);
  // One batch, overlapping writes: they land in order.
  const r = await a.writeBatch([fd, fd, fd], [data, Buffer.alloc(4096, 1), Buffer.alloc(10, 2)], [0, 8192, 8200]);
  t.same(r, [0, 0, 0], 'every write of the batch succeeded');
  const expect = Buffer.from(data);
  expect.fill(1, 8192, 8192 + 4096);
  expect.fill(2, 8200, 8210);
  t.same(fsSync.readFileSync(file), expect, 'the file holds the writes, applied in order');
  const got = Buffer.alloc(300 * 1024, 0xee);
  const n = a.readNowait(fd, got, 100, 8192, 4096);
  t.ok(n === 8192 || n === -11, `a cached read copies everything (or EAGAIN if evicted): ${n}`);
  if (n === 8192) t.same(got.subarray(100, 100 + 8192), expect.subarray(4096, 4096 + 8192), 'the right bytes at the right place');
  t.equal(got[99], 0xee, 'nothing before the target offset is touched');
  t.equal(a.readNowait(fd, got, 0, 4096, 10 * 1024 * 1024), 0, 'past the end: 0 bytes');
  t.throws(() => a.readNowait(fd, got, got.length - 10, 4096, 0), RangeError, 'a target range outside the buffer throws');
  t.throws(() => a.writeBatch([fd], [data], []), RangeError, 'arrays of different lengths throw');
  const ro = fsSync.openSync(file, 'r');
  t.teardown(() => fsSync.closeSync(ro));
  t.same(await a.writeBatch([fd, ro], [data.subarray(0, 10), data.subarray(0, 10)], [0, 0]), [0, -9], 'a failed write reports its errno (EBADF), the others succeed');
});

t.test('WriteBatcher: one pool job per loop turn, per-write results', async (t) => {
  if (addon === null) { t.fail('the addon is not built: run scripts/build-fileio.sh'); return; }
  let jobs = 0;
  const counting: FileAddon = {
    readNowait: addon!.readNowait,
    writeBatch: (fds, buffers, positions) => { jobs++; return addon!.writeBatch(fds, buffers, positions); },
  };
  const b = new WriteBatcher(counting);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'arch-file-batcher-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const fd = fsSync.openSync(path.join(dir, 'f'), 'w+');
  t.teardown(() => fsSync.closeSync(fd));
  const writes = Array.from({ length: 40 }, (_, i) => b.write(fd, Buffer.alloc(4096, i), i * 4096));
  await Promise.all(writes);
  t.equal(jobs, 3, '40 writes started in one turn: 3 jobs of at most 16');
  const content = fsSync.readFileSync(path.join(dir, 'f'));
  t.ok(Array.from({ length: 40 }, (_, i) => content[i * 4096] === i && content[i * 4096 + 4095] === i).every(Boolean), 'each write landed');
  const ro = fsSync.openSync(path.join(dir, 'f'), 'r');
  t.teardown(() => fsSync.closeSync(ro));
  const bad = b.write(ro, Buffer.alloc(10), 0);
  const good = b.write(fd, Buffer.alloc(10, 7), 0);
  await t.rejects(bad, { code: 'EBADF' }, 'a failed write rejects with its errno name');
  await t.resolves(good, 'a write in the same batch still succeeds');
});

