/**
 * Content-addressed images against the real CLI and daemon (file store,
 * 64 KiB objects): import of a 16 MiB raw image with zero regions and
 * repeated blocks (summary numbers), the image served read-only and equal to
 * the raw file (qemu-img compare), a second import of the same data (from
 * stdin) storing nothing, two images sharing half their blocks, a clone
 * written without changing its image, export to files (sparse) and stdout,
 * `hash` of a snapshot, and gc after removing an image.
 */
import t from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { CLI, childEnv, cli, startDaemon } from '../helpers/daemon.js';
import { listObjects, tempStore } from '../helpers/stores.js';
import { diag, run, tempDir } from '../helpers/run.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const OS = 64 * KiB;
const OBJECTS = 256; // 16 MiB
const POOL = 80;

async function countCas(store: string): Promise<number> {
  return (await listObjects(store, 'sha256-')).filter((n) => /^sha256-[0-9a-f]{64}$/.test(n)).length;
}

t.test('import, serve, dedup, clone, export, hash, gc', async (t) => {
  const store = await tempStore(t);
  const work = await tempDir(t);
  const S = ['--store', store];

  // A: objects 64..95 zero, the others pool[i % 80]: 80 unique, 144 repeats, 32 zero.
  const pool = Array.from({ length: POOL }, () => crypto.randomBytes(OS));
  const a = Buffer.alloc(OBJECTS * OS);
  for (let i = 0; i < OBJECTS; i++) if (i < 64 || i >= 96) pool[i % POOL]!.copy(a, i * OS);
  const fileA = path.join(work, 'a.raw');
  await fs.writeFile(fileA, a);
  // B: A's first half, then 128 new blocks.
  const b = Buffer.from(a);
  crypto.randomFillSync(b, 128 * OS);
  const fileB = path.join(work, 'b.raw');
  await fs.writeFile(fileB, b);

  let r = await cli(['import', fileA, 'img1', '--object-size', '64K', '--json', ...S]);
  t.equal(r.code, 0, 'import a.raw img1', diag(r.result));
  t.match(JSON.parse(r.stdout), {
    name: 'img1', objectSize: OS, size: 16 * MiB, objects: 256, zeroObjects: 32, storedObjects: 80,
    deduplicatedObjects: 144, bytesRead: 16 * MiB, bytesZero: 2 * MiB, bytesStored: 80 * OS, dedupRatio: 2.8,
  }, 'import summary');
  t.equal(await countCas(store), 80, '80 sha256 objects');
  r = await cli(['info', 'img1', '--json', ...S]);
  t.match(JSON.parse(r.stdout), { kind: 'image', size: 16 * MiB }, 'info: an image');

  // The same data from stdin: nothing new.
  const sh = await run('/bin/sh', ['-c', `"${process.execPath}" "${CLI}" import - img2 --object-size 64K --json --store "${store}" < "${fileA}"`],
    { t, env: childEnv(), timeoutMs: 60_000 });
  t.equal(sh.code, 0, 'import - img2 (stdin)', diag(sh));
  t.match(JSON.parse(sh.stdout), { size: 16 * MiB, storedObjects: 0, deduplicatedObjects: 224, zeroObjects: 32, bytesStored: 0 }, 'second import stores nothing');
  t.equal(await countCas(store), 80, 'still 80 sha256 objects');

  // B shares its first half with A: only the 128 new blocks are stored.
  r = await cli(['import', fileB, 'img3', '--object-size', '64K', '--json', ...S]);
  t.equal(r.code, 0, 'import b.raw img3', diag(r.result));
  t.match(JSON.parse(r.stdout), { storedObjects: 128, deduplicatedObjects: 96, zeroObjects: 32 }, 'shared half stored once');
  t.equal(await countCas(store), 208, '80 + 128 sha256 objects');

  // Served read-only, equal to the raw files.
  r = await cli(['clone', 'img1', 'c1', ...S]);
  t.equal(r.code, 0, 'clone img1 c1', diag(r.result));
  const d = await startDaemon(t, { store });
  for (const [name, file] of [['img1', fileA], ['img2', fileA], ['img3', fileB]] as const) {
    const q = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, d.uri(name)], { t, timeoutMs: 60_000 });
    t.equal(q.code, 0, `qemu-img compare ${name}`, diag(q));
  }
  const ni = await run('nbdinfo', ['--json', d.uri('img1')], { t, timeoutMs: 20_000 });
  t.equal(ni.code, 0, 'nbdinfo img1', diag(ni));
  t.equal((JSON.parse(ni.stdout) as { exports: { is_read_only: boolean }[] }).exports[0]!.is_read_only, true, 'img1 is read-only');

  // A clone's write copies up; the image does not change.
  const WRITE_AT = 3_000_000; // objects 45..47
  const q = await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x5c ${WRITE_AT} 100k`, d.uri('c1')], { t, timeoutMs: 30_000 });
  t.equal(q.code, 0, 'qemu-io writes into c1', diag(q));
  const c = Buffer.from(a);
  c.fill(0x5c, WRITE_AT, WRITE_AT + 100 * KiB);
  const fileC = path.join(work, 'c.raw');
  await fs.writeFile(fileC, c);
  for (const [name, file] of [['c1', fileC], ['img1', fileA]] as const) {
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, d.uri(name)], { t, timeoutMs: 60_000 });
    t.equal(cmp.code, 0, `after the clone's write: qemu-img compare ${name}`, diag(cmp));
  }
  t.equal(await d.stop(), 0, 'daemon stops cleanly');

  // Export to files (sparse) and to stdout.
  const outA = path.join(work, 'img1.out');
  r = await cli(['export', 'img1', outA, '--json', ...S]);
  t.equal(r.code, 0, 'export img1', diag(r.result));
  t.match(JSON.parse(r.stdout), { size: 16 * MiB, bytesWritten: 14 * MiB, holeObjects: 32 });
  t.ok((await fs.readFile(outA)).equals(a), 'export img1 = a.raw');
  const st = await fs.stat(outA);
  t.ok(st.blocks * 512 <= 14 * MiB + 64 * KiB, `the zero region is a hole (${st.blocks * 512} bytes allocated)`);
  const outC = path.join(work, 'c1.out');
  r = await cli(['export', 'c1', outC, ...S]);
  t.equal(r.code, 0, 'export c1', diag(r.result));
  t.ok((await fs.readFile(outC)).equals(c), 'export c1 = the image + the write');
  const pipe = await run('/bin/sh', ['-c', `"${process.execPath}" "${CLI}" export img3 - --store "${store}" | cmp - "${fileB}"`],
    { t, env: childEnv(), timeoutMs: 60_000 });
  t.equal(pipe.code, 0, 'export img3 to stdout = b.raw', diag(pipe));

  // hash of a snapshot of the clone: equals its source; only the 3 written objects are new.
  r = await cli(['snapshot', 'c1', 's1', '--offline', ...S]);
  t.equal(r.code, 0, 'snapshot c1 s1', diag(r.result));
  r = await cli(['hash', 's1', '--json', ...S]);
  t.equal(r.code, 0, 'hash s1', diag(r.result));
  t.match(JSON.parse(r.stdout), { name: 's1.img', source: 's1', objects: 256, zeroObjects: 32, storedObjects: 3 }, 'hash summary');
  t.equal(await countCas(store), 211, '3 new sha256 objects');
  const outS = path.join(work, 's1.out');
  r = await cli(['export', 's1.img', outS, ...S]);
  t.equal(r.code, 0, 'export s1.img', diag(r.result));
  t.ok((await fs.readFile(outS)).equals(c), 'hash of s1 = s1');
  r = await cli(['hash', 'c1', ...S]);
  t.equal(r.code, 2, 'hash of a writable volume: exit 2', diag(r.result));

  // gc after removing img3: A's blocks stay (img1, img2, s1.img use them), B's own go.
  r = await cli(['remove', 'img3', ...S]);
  t.equal(r.code, 0, 'remove img3', diag(r.result));
  r = await cli(['gc', '--json', ...S]);
  t.equal(r.code, 0, 'gc', diag(r.result));
  t.match(JSON.parse(r.stdout), { contentKeptBecause: null, errors: [] });
  t.equal(await countCas(store), 83, 'the 128 blocks only img3 used are swept');
  r = await cli(['export', 'img2', outA, ...S]);
  t.equal(r.code, 0, 'export img2 after gc', diag(r.result));
  t.ok((await fs.readFile(outA)).equals(a), 'img2 intact after gc');
});
