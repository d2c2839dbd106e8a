/**
 * QEMU's NBD client (qemu-io, qemu-img) against the real server on 127.0.0.1.
 * qemu-io verifies patterns itself and exits 1 on a mismatch; a negative
 * control proves that the checks can fail.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Export } from '../../src/nbd/export.js';
import { startTestServer, type TestServer } from '../helpers/nbd-server.js';
import { diag, randomFile, run, tempDir } from '../helpers/run.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Records the FUA flag of every WRITE the server hands to its exports. */
function recordFua(srv: TestServer): boolean[] {
  const log: boolean[] = [];
  const provider = srv.provider;
  const open = provider.open.bind(provider);
  provider.open = async (name: string): Promise<Export | null> => {
    const exp = await open(name);
    if (exp) {
      const write = exp.write.bind(exp);
      exp.write = (offset, data, fua) => { log.push(fua); return write(offset, data, fua); };
    }
    return exp;
  };
  return log;
}

const PATTERNS = [
  'write -P 0xab 0 64k',
  'read -P 0xab 0 64k',
  'write -z 64k 64k',
  'read -P 0 64k 64k',
  'write -P 0x33 1M 1M',
  'discard 1M 1M',
  'read -P 0 1M 1M',
  'writev -P 0xcd 2M 4k 8k 4k',
  'readv -P 0xcd 2M 4k 8k 4k',
  'aio_write -P 0xee 3M 64k',
  'aio_flush',
  'read -P 0xee 3M 64k',
  'write -f -P 0x11 4M 4k',
  'read -P 0x11 4M 4k',
  // Unaligned to anything: min block size is 1.
  'write -P 0x77 5000001 12345',
  'read -P 0x77 5000001 12345',
  'flush',
];

for (const cache of ['default', 'none'] as const) {
  t.test(`qemu-io patterns, cache=${cache}`, async (t) => {
    const srv = await startTestServer(t, (p) => p.addMemory('disk', 64 * MiB));
    const fua = recordFua(srv);
    const store = srv.provider.memory.get('disk')!.store;
    const args = ['-f', 'raw', ...(cache === 'none' ? ['-t', 'none'] : []), srv.uri('disk'),
      ...PATTERNS.flatMap((c) => ['-c', c])];
    const r = await run('qemu-io', args, { t, timeoutMs: 30_000 });
    t.equal(r.code, 0, 'qemu-io exits 0', diag(r));
    t.notMatch(r.stdout + r.stderr, /Pattern verification failed|error/i, 'no verification failure or error');
    t.equal((r.stdout.match(/^wrote \d+\/\d+ bytes/gm) ?? []).length, 7, 'seven writes reported');
    t.equal((r.stdout.match(/^read \d+\/\d+ bytes/gm) ?? []).length, 7, 'seven reads reported');
    t.match(r.stdout, /discard 1048576\/1048576 bytes at offset 1048576/, 'discard reported');

    // What the server stored, seen directly.
    t.ok(store.bytes(0, 64 * KiB).every((b) => b === 0xab), 'store holds 0xab at 0');
    t.ok(store.bytes(64 * KiB, 64 * KiB).every((b) => b === 0), 'store holds zeros after write -z');
    for (let page = 16; page < 32; page++) t.notOk(store.pages.has(page), `discarded page ${page} is a hole`);
    t.ok(store.bytes(2 * MiB, 16 * KiB).every((b) => b === 0xcd), 'writev landed');
    t.ok(store.bytes(3 * MiB, 64 * KiB).every((b) => b === 0xee), 'aio_write landed');
    t.ok(store.bytes(4 * MiB, 4 * KiB).every((b) => b === 0x11), 'write -f landed');
    t.ok(store.bytes(5000001, 12345).every((b) => b === 0x77), 'unaligned write landed');
    t.equal(store.bytes(5000000, 1)[0], 0, 'byte before the unaligned write untouched');
    t.equal(store.bytes(5000001 + 12345, 1)[0], 0, 'byte after the unaligned write untouched');

    // writethrough (the default) makes every write FUA; cache=none only `write -f`.
    t.equal(fua.length, 6, 'six NBD WRITEs reached the export');
    if (cache === 'default') t.ok(fua.every(Boolean), `every write carried FUA: ${fua}`);
    else t.same(fua, [false, false, false, false, true, false], 'only write -f carried FUA');
  });
}

t.test('qemu-io negative control: a wrong pattern fails', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 16 * MiB));
  const r = await run('qemu-io', ['-f', 'raw', '-t', 'none', srv.uri('disk'),
    '-c', 'write -P 0xab 0 64k', '-c', 'read -P 0x12 0 64k'], { t, timeoutMs: 30_000 });
  t.not(r.code, 0, 'qemu-io exits non-zero');
  t.match(r.stdout + r.stderr, /Pattern verification failed/, 'pattern mismatch detected');
  // Reading a hole with a non-zero pattern must fail too (holes read as zeros).
  const r2 = await run('qemu-io', ['-f', 'raw', srv.uri('disk'), '-c', 'read -P 0x01 8M 4k'], { t, timeoutMs: 30_000 });
  t.not(r2.code, 0, 'a hole does not match 0x01');
  t.match(r2.stdout + r2.stderr, /Pattern verification failed/);
});

t.test('qemu-img info', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 64 * MiB));
  const r = await run('qemu-img', ['info', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'qemu-img info exits 0', diag(r));
  t.match(r.stdout, /virtual size: 64 MiB \(67108864 bytes\)/);
  const j = await run('qemu-img', ['info', '--output=json', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(j.code, 0, 'qemu-img info --output=json exits 0', diag(j));
  const info = JSON.parse(j.stdout) as { 'virtual-size': number; format: string };
  t.equal(info['virtual-size'], 64 * MiB, 'virtual-size');
  t.equal(info.format, 'raw');
});

t.test('qemu-img convert in and out, compare', async (t) => {
  const dir = await tempDir(t);
  const src = path.join(dir, 'src.img');
  const out = path.join(dir, 'out.img');
  const data = await randomFile(src, 8 * MiB);
  const srv = await startTestServer(t, (p) => p.addMemory('img', 8 * MiB));
  const store = srv.provider.memory.get('img')!.store;

  const cin = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, srv.uri('img')], { t, timeoutMs: 30_000 });
  t.equal(cin.code, 0, 'convert into the export', diag(cin));
  t.ok(store.bytes(0, 8 * MiB).equals(data), 'export holds the source bytes');

  const cout = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', srv.uri('img'), out], { t, timeoutMs: 30_000 });
  t.equal(cout.code, 0, 'convert out of the export', diag(cout));
  t.ok((await fs.readFile(out)).equals(data), 'round trip is byte-exact');

  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, srv.uri('img')], { t, timeoutMs: 30_000 });
  t.equal(cmp.code, 0, 'qemu-img compare exits 0', diag(cmp));
  t.match(cmp.stdout, /Images are identical/);

  // Negative control: one changed byte is found.
  const bad = Buffer.from(data);
  bad[5 * MiB + 3] ^= 0xff;
  await fs.writeFile(out, bad);
  const cmp2 = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out, srv.uri('img')], { t, timeoutMs: 30_000 });
  t.equal(cmp2.code, 1, 'compare reports a difference');
  t.match(cmp2.stdout, /Content mismatch at offset 5242880/);
});

t.test('qemu-img map shows zero and data as written', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 64 * MiB));
  const w = await run('qemu-io', ['-f', 'raw', '-t', 'none', srv.uri('disk'),
    '-c', 'write -P 1 1M 1M',
    '-c', 'write -z -u 1M 128k', // may unmap: whole pages become holes
    '-c', 'write -z 1792k 64k', // NO_HOLE: stays allocated (data, reads zero)
    '-c', 'discard 1280k 64k',
  ], { t, timeoutMs: 30_000 });
  t.equal(w.code, 0, 'qemu-io writes exit 0', diag(w));
  const r = await run('qemu-img', ['map', '--output=json', '-f', 'raw', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'qemu-img map exits 0', diag(r));
  const map = (JSON.parse(r.stdout) as Array<{ start: number; length: number; zero: boolean; data: boolean }>)
    .map(({ start, length, zero, data }) => ({ start, length, zero, data }));
  t.same(map, [
    { start: 0, length: 1152 * KiB, zero: true, data: false },
    { start: 1152 * KiB, length: 128 * KiB, zero: false, data: true },
    { start: 1280 * KiB, length: 64 * KiB, zero: true, data: false },
    { start: 1344 * KiB, length: 704 * KiB, zero: false, data: true },
    { start: 2 * MiB, length: 62 * MiB, zero: true, data: false },
  ], 'map matches what was written');
});

t.test('qemu-img bench read and write', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 64 * MiB));
  const store = srv.provider.memory.get('disk')!.store;
  const common = ['bench', '-f', 'raw', '-t', 'none', '-c', '2000', '-d', '16', '-s', '4k'];
  const w = await run('qemu-img', [...common, '-w', '--pattern=0x5a', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(w.code, 0, 'bench -w exits 0', diag(w));
  t.match(w.stdout, /Sending 2000 write requests.*\n.*Run completed/);
  t.ok(store.bytes(0, 2000 * 4 * KiB).every((b) => b === 0x5a), 'bench wrote its pattern over 2000 x 4k');
  t.equal(store.bytes(2000 * 4 * KiB, 1)[0], 0, 'and nothing past it');
  const rd = await run('qemu-img', [...common, srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(rd.code, 0, 'bench (read) exits 0', diag(rd));
  t.match(rd.stdout, /Sending 2000 read requests.*\n.*Run completed/);
});

t.test('qemu-io on a read-only export', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('ro', 16 * MiB, true));
  srv.provider.memory.get('ro')!.store.write(0, Buffer.alloc(64 * KiB, 0x9c));
  const r = await run('qemu-io', ['-r', '-f', 'raw', srv.uri('ro'), '-c', 'read -P 0x9c 0 64k', '-c', 'read -P 0 64k 1M'],
    { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'read-only open and reads work', diag(r));
  const rw = await run('qemu-io', ['-f', 'raw', srv.uri('ro'), '-c', 'write -P 1 0 4k'], { t, timeoutMs: 30_000 });
  t.not(rw.code, 0, 'read-write open of a read-only export is refused');
  t.match(rw.stderr, /Permission denied|read-only/i, 'qemu says why');
  t.ok(srv.provider.memory.get('ro')!.store.bytes(0, 4 * KiB).every((b) => b === 0x9c), 'data unchanged');
});
