/**
 * Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against the
 * `archipelago serve` daemon on a file store, with volumes of 64 KiB objects
 * so that requests span objects: unaligned writes across object boundaries,
 * whole images in and out, the allocation map, trim/zero dropping objects,
 * and data surviving a restart. Every byte a client wrote is checked by
 * reading the volume back and comparing it with what we expect.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { cli, startDaemon, type Daemon } from '../helpers/daemon.js';
import { listObjects, tempStore } from '../helpers/stores.js';
import { diag, nbdshEnv, randomFile, run, tempDir } from '../helpers/run.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const OBJ = 64 * KiB;

async function create(t: Test, store: string, name: string, size: number): Promise<void> {
  const r = await cli(['create', name, '--size', String(size), '--object-size', '64K', '--store', store]);
  t.equal(r.code, 0, `create ${name}`, diag(r.result));
}

/** The whole volume, read with nbdcopy into a file. */
async function readVolume(t: Test, uri: string, work: string): Promise<Buffer> {
  const file = path.join(work, `out-${crypto.randomBytes(4).toString('hex')}.raw`);
  const r = await run('nbdcopy', [uri, file], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, `nbdcopy ${uri} out`, diag(r));
  const data = await fs.readFile(file);
  await fs.rm(file, { force: true });
  return data;
}

/** First differing offset of two buffers, or -1. */
function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i += 4096) {
    const end = Math.min(n, i + 4096);
    if (!a.subarray(i, end).equals(b.subarray(i, end))) {
      for (let j = i; j < end; j++) if (a[j] !== b[j]) return j;
    }
  }
  return a.length === b.length ? -1 : n;
}

function sameBytes(t: Test, actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDiff(actual, expected);
  t.ok(at === -1, what, at === -1 ? {} : { firstDifferenceAt: at, actualLength: actual.length, expectedLength: expected.length });
}

interface MapExtent { offset: number; length: number; type: number; description: string }

/** `nbdinfo --map --json`: base:allocation extents. */
async function allocationMap(t: Test, uri: string): Promise<MapExtent[]> {
  const r = await run('nbdinfo', ['--map', '--json', uri], { t, timeoutMs: 20_000 });
  t.equal(r.code, 0, 'nbdinfo --map', diag(r));
  return JSON.parse(r.stdout) as MapExtent[];
}

/** One flag per object: true = data, false = hole (type 3: hole,zero). */
function objectsAllocated(t: Test, map: MapExtent[], size: number): boolean[] {
  const out: boolean[] = [];
  let pos = 0;
  for (const e of map) {
    t.equal(e.offset, pos, 'extents are contiguous');
    t.ok(e.offset % OBJ === 0 && (e.length % OBJ === 0 || e.offset + e.length === size), `extent at ${e.offset} is object aligned`);
    t.ok(e.type === 0 || e.type === 3, `extent type ${e.type} is data (0) or hole,zero (3)`);
    for (let o = e.offset; o < e.offset + e.length; o += OBJ) out.push(e.type === 0);
    pos = e.offset + e.length;
  }
  t.equal(pos, size, 'the map covers the volume');
  return out;
}

/** Object indexes that are data in `alloc`. */
function dataObjects(alloc: boolean[]): number[] {
  return alloc.flatMap((d, i) => (d ? [i] : []));
}

// ---------------------------------------------------------------- the daemon shared by most subtests

let store = '';
let work = '';
let daemon: Daemon;

t.before(async () => {
  store = await tempStore(t);
  work = await tempDir(t, 'archipelago-clients-');
  daemon = await startDaemon(t, { store });
});

// ---------------------------------------------------------------- qemu-io

/**
 * A qemu-io script and the bytes it leaves: each op becomes a command, and is
 * applied to `expected`. Offsets straddle the 64 KiB object boundaries.
 */
type Op =
  | { op: 'write'; pat: number; off: number; len: number; fua?: boolean; aio?: boolean }
  | { op: 'writev'; pat: number; off: number; lens: number[] }
  | { op: 'zero'; off: number; len: number; unmap?: boolean }
  | { op: 'flush'; aio?: boolean };

const SCRIPT: Op[] = [
  { op: 'write', pat: 0x11, off: OBJ - 536, len: 1000 }, // crosses 64K
  { op: 'write', pat: 0x22, off: 3 * OBJ - 1, len: 2 * OBJ + 2 }, // 1 byte of object 2 .. 1 byte of object 5
  { op: 'write', pat: 0x33, off: 200_000, len: 5000 }, // inside the 0x22 run
  { op: 'writev', pat: 0x44, off: 6 * OBJ - 1000, lens: [1000, 70_000, 999] }, // objects 5..7
  { op: 'write', pat: 0x55, off: 600_000, len: 150_000, aio: true },
  { op: 'write', pat: 0x66, off: 12 * OBJ - 1, len: 3, aio: true },
  { op: 'flush', aio: true },
  { op: 'write', pat: 0x77, off: 16 * OBJ - 1, len: 2, fua: true },
  { op: 'zero', off: OBJ - 36, len: 100 }, // partial zero across the 64K boundary, inside the 0x11 run
  { op: 'write', pat: 0x88, off: 2 * MiB - 1, len: 1 }, // the last byte
  { op: 'write', pat: 0x99, off: 20 * OBJ + 5, len: 3 * OBJ }, // three boundaries, unaligned both ends
  { op: 'zero', off: 21 * OBJ, len: OBJ, unmap: true }, // a whole object inside it: dropped
  { op: 'flush' },
];

function scriptCommands(ops: Op[]): { commands: string[]; expected: Buffer } {
  const expected = Buffer.alloc(2 * MiB);
  const commands: string[] = [];
  const hex = (p: number) => `0x${p.toString(16)}`;
  for (const o of ops) {
    switch (o.op) {
      case 'write':
        commands.push(`${o.aio ? 'aio_write' : 'write'}${o.fua ? ' -f' : ''} -P ${hex(o.pat)} ${o.off} ${o.len}`);
        expected.fill(o.pat, o.off, o.off + o.len);
        break;
      case 'writev': {
        const total = o.lens.reduce((a, b) => a + b, 0);
        commands.push(`writev -P ${hex(o.pat)} ${o.off} ${o.lens.join(' ')}`);
        expected.fill(o.pat, o.off, o.off + total);
        break;
      }
      case 'zero':
        commands.push(`write -z${o.unmap ? ' -u' : ''} ${o.off} ${o.len}`);
        expected.fill(0, o.off, o.off + o.len);
        break;
      case 'flush':
        commands.push(o.aio ? 'aio_flush' : 'flush');
        break;
    }
  }
  // Read every run back, and the zeros around each write, in qemu-io itself.
  let runStart = 0;
  for (let i = 1; i <= expected.length; i++) {
    if (i === expected.length || expected[i] !== expected[runStart]) {
      const len = i - runStart;
      commands.push(`read -P ${hex(expected[runStart]!)} ${runStart} ${len}`);
      runStart = i;
    }
  }
  return { commands, expected };
}

for (const cache of ['default', 'none'] as const) {
  t.test(`qemu-io: unaligned writes across object boundaries, cache=${cache}`, async (t) => {
    const name = `qio-${cache}`;
    await create(t, store, name, 2 * MiB);
    const { commands, expected } = scriptCommands(SCRIPT);
    const reads = commands.filter((c) => c.startsWith('read ')).length;
    const args = ['-f', 'raw', ...(cache === 'none' ? ['-t', 'none'] : []), daemon.uri(name), ...commands.flatMap((c) => ['-c', c])];
    const r = await run('qemu-io', args, { t, timeoutMs: 30_000 });
    t.equal(r.code, 0, 'qemu-io exits 0', diag(r));
    t.notMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i, 'no verification failure or error');
    t.equal((r.stdout.match(/^read \d+\/\d+ bytes/gm) ?? []).length, reads, `all ${reads} pattern reads ran`);

    // The same bytes, seen by another client after qemu-io disconnected.
    sameBytes(t, await readVolume(t, daemon.uri(name), work), expected, 'nbdcopy reads back exactly what the script wrote');

    // Negative control: a wrong pattern fails, so the checks above can fail.
    const bad = await run('qemu-io', ['-f', 'raw', daemon.uri(name), '-c', `read -P 0x12 ${OBJ - 536} 100`], { t, timeoutMs: 30_000 });
    t.match(bad.stdout + bad.stderr, /Pattern verification failed/, 'a wrong pattern is detected');
  });
}

// ---------------------------------------------------------------- qemu-img

t.test('qemu-img convert: a random 64 MiB image in and out', async (t) => {
  await create(t, store, 'img', 64 * MiB);
  const img = path.join(work, 'img.raw');
  const out = path.join(work, 'img-out.raw');
  const data = await randomFile(img, 64 * MiB);
  let r = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', img, daemon.uri('img')], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'convert into the volume', diag(r));
  r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', daemon.uri('img'), out], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'convert out of the volume', diag(r));
  r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, out], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'qemu-img compare: identical', diag(r));
  t.match(r.stdout, /Images are identical/);
  r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, daemon.uri('img')], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'qemu-img compare against the live volume: identical', diag(r));
  sameBytes(t, await fs.readFile(out), data, 'bytes out = bytes in');
  const alloc = objectsAllocated(t, await allocationMap(t, daemon.uri('img')), 64 * MiB);
  t.equal(dataObjects(alloc).length, 1024, 'every object of a random image is allocated');
  const info = await cli(['info', 'img', '--json', '--store', store]);
  t.equal(JSON.parse(info.stdout).mapChunks, 1, 'one map chunk covers 1024 objects');
});

// ---------------------------------------------------------------- nbdinfo --map

t.test('nbdinfo --map: holes where nothing was written, data where written', async (t) => {
  const size = 4 * MiB;
  await create(t, store, 'map', size);
  let alloc = objectsAllocated(t, await allocationMap(t, daemon.uri('map')), size);
  t.same(dataObjects(alloc), [], 'a new volume is one hole');
  const r = await run('qemu-io', ['-f', 'raw', daemon.uri('map'),
    '-c', 'write -P 0x5a 70000 100', // object 1
    '-c', `write -P 0x5b ${10 * OBJ} ${2 * OBJ}`, // objects 10, 11
    '-c', `write -P 0x5c ${20 * OBJ - 1} 2`, // objects 19, 20
    '-c', `write -P 0x5d ${size - 1} 1`, // the last object
    '-c', `write -z -u ${30 * OBJ} ${OBJ}`, // zeroing a hole (holes allowed) allocates nothing
    '-c', `write -z -u ${40 * OBJ + 9} 100`, // nor does a partial zero of one
  ], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'qemu-io writes', diag(r));
  alloc = objectsAllocated(t, await allocationMap(t, daemon.uri('map')), size);
  t.same(dataObjects(alloc), [1, 10, 11, 19, 20, 63], 'data exactly in the objects written');
  const text = await run('nbdinfo', ['--map', daemon.uri('map')], { t, timeoutMs: 20_000 });
  t.match(text.stdout, /^\s+0\s+65536\s+3\s+hole,zero$/m, 'text map: hole at 0');
  t.match(text.stdout, /^\s+65536\s+65536\s+0\s+data$/m, 'text map: data at 64K');
});

// ---------------------------------------------------------------- nbdcopy

t.test('nbdcopy --connections=4 in and out', async (t) => {
  const size = 32 * MiB;
  await create(t, store, 'copy', size);
  // A sparse source: random data with holes of whole and partial objects.
  const src = path.join(work, 'copy-src.raw');
  const expected = Buffer.alloc(size);
  const fh = await fs.open(src, 'w');
  try {
    await fh.truncate(size);
    for (let off = 0; off < size;) {
      const len = Math.min(size - off, 100_000 + crypto.randomInt(900_000));
      if (crypto.randomInt(3) > 0) {
        const chunk = crypto.randomBytes(len);
        chunk.copy(expected, off);
        await fh.write(chunk, 0, len, off);
      }
      off += len + crypto.randomInt(300_000);
    }
  } finally {
    await fh.close();
  }
  let r = await run('nbdcopy', ['--connections=4', '--requests=16', src, daemon.uri('copy')], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'nbdcopy in', diag(r));
  const out = path.join(work, 'copy-out.raw');
  r = await run('nbdcopy', ['--connections=4', daemon.uri('copy'), out], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'nbdcopy out', diag(r));
  sameBytes(t, await fs.readFile(out), expected, 'bytes out = bytes in');
  // Copy over existing data: the second copy must overwrite (and zero) what the first left.
  const src2 = path.join(work, 'copy-src2.raw');
  const data2 = await randomFile(src2, size);
  data2.fill(0, 5 * OBJ + 100, 9 * OBJ - 100);
  await fs.writeFile(src2, data2);
  r = await run('nbdcopy', ['--connections=4', src2, daemon.uri('copy')], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'nbdcopy over existing data', diag(r));
  r = await run('nbdcopy', ['--connections=4', daemon.uri('copy'), out], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'nbdcopy out again', diag(r));
  sameBytes(t, await fs.readFile(out), data2, 'bytes out = second bytes in');
});

// ---------------------------------------------------------------- fio

t.test('fio randwrite with crc32c verify, 4k/64k/200k, iodepth 32, 2 jobs', async (t) => {
  await create(t, store, 'fio', 64 * MiB);
  const r = await run('fio', ['--name=verify', '--ioengine=nbd', `--uri=${daemon.uri('fio')}`, '--rw=randwrite',
    '--bssplit=4k/40:64k/30:200k/30', '--iodepth=32', '--numjobs=2', '--size=32M', '--offset_increment=32M',
    '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--group_reporting', '--output-format=json'], { t, timeoutMs: 80_000 });
  t.equal(r.code, 0, 'fio exits 0', diag(r));
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] };
  const job = json.jobs[0]!;
  t.equal(job.error, 0, 'no fio job error');
  t.equal(job.write.io_bytes, 64 * MiB, 'wrote all 64 MiB');
  t.equal(job.read.io_bytes, 64 * MiB, 'verified all 64 MiB');
});

// ---------------------------------------------------------------- trim and zero

t.test('trim and write-zeroes of whole objects drop them; partial zero reads zeros', async (t) => {
  const size = 1 * MiB;
  await create(t, store, 'tz', size);
  const id = JSON.parse((await cli(['info', 'tz', '--json', '--store', store])).stdout).id as string;
  const dataFiles = async () => (await listObjects(store, `d.${id}.`)).length;
  let r = await run('qemu-io', ['-f', 'raw', daemon.uri('tz'), '-c', `write -P 0xaa 0 ${size}`], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'fill the volume', diag(r));
  t.equal(await dataFiles(), 16, 'sixteen data objects');

  r = await run('qemu-io', ['-f', 'raw', daemon.uri('tz'),
    '-c', `discard ${1 * OBJ} ${OBJ}`, // object 1: trim
    '-c', `write -z -u ${2 * OBJ} ${2 * OBJ}`, // objects 2, 3: zero, may unmap
    '-c', `write -z ${5 * OBJ} ${OBJ}`, // object 5: zero with NO_HOLE: stays allocated
    '-c', `write -z -u ${7 * OBJ} ${OBJ + 5000}`, // object 7 whole (dropped) and 5000 bytes of 8
    '-c', `write -z ${10 * OBJ - 10} 30`, // partial zero across the 9/10 boundary
    '-c', `write -z -u ${12 * OBJ + 1} ${OBJ - 2}`, // all but the first and last byte of 12: partial
  ], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'trim and zero', diag(r));

  const expected = Buffer.alloc(size, 0xaa);
  expected.fill(0, 1 * OBJ, 4 * OBJ);
  expected.fill(0, 5 * OBJ, 6 * OBJ);
  expected.fill(0, 7 * OBJ, 8 * OBJ + 5000);
  expected.fill(0, 10 * OBJ - 10, 10 * OBJ + 20);
  expected.fill(0, 12 * OBJ + 1, 13 * OBJ - 1);
  sameBytes(t, await readVolume(t, daemon.uri('tz'), work), expected, 'reads back: zeros exactly where zeroed');

  const alloc = objectsAllocated(t, await allocationMap(t, daemon.uri('tz')), size);
  t.same(alloc.flatMap((d, i) => (d ? [] : [i])), [1, 2, 3, 7], 'holes exactly at the whole objects trimmed or zeroed with unmap');
  t.equal(await dataFiles(), 12, 'their data objects are deleted from the store');

  // Writing into a dropped object allocates it again, with zeros around the write.
  r = await run('qemu-io', ['-f', 'raw', daemon.uri('tz'), '-c', `write -P 0xbb ${2 * OBJ + 100} 10`,
    '-c', `read -P 0 ${2 * OBJ} 100`, '-c', `read -P 0xbb ${2 * OBJ + 100} 10`, '-c', `read -P 0 ${2 * OBJ + 110} ${OBJ - 110}`], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'rewrite a dropped object', diag(r));
  t.notMatch(r.stdout + r.stderr, /Pattern verification failed/);
  t.equal(await dataFiles(), 13, 'allocated again');
});

// ---------------------------------------------------------------- restart

t.test('data survives a daemon restart (SIGTERM, and SIGKILL after FLUSH)', async (t) => {
  const own = await tempStore(t);
  const size = 16 * MiB;
  await create(t, own, 'keep', size);
  let d = await startDaemon(t, { store: own });
  const src = path.join(work, 'keep.raw');
  const data = await randomFile(src, size - 1000); // the tail stays a partial hole
  const expected = Buffer.alloc(size);
  data.copy(expected);
  let r = await run('nbdcopy', ['--connections=4', src, d.uri('keep')], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, 'nbdcopy in', diag(r));
  t.equal(await d.stop(), 0, 'SIGTERM: exit 0');
  t.equal(d.stderr(), '', 'nothing logged at warn', { stderr: d.stderr() });

  const info = await cli(['info', 'keep', '--json', '--store', own]);
  t.equal(info.code, 0, 'info after a clean stop', diag(info.result));
  const gen1 = JSON.parse(info.stdout).generation as number;

  d = await startDaemon(t, { store: own });
  sameBytes(t, await readVolume(t, d.uri('keep'), work), expected, 'after SIGTERM and restart: every byte');

  // qemu-io flushes when it closes the image; after that a SIGKILL loses nothing.
  r = await run('qemu-io', ['-f', 'raw', d.uri('keep'), '-c', `write -P 0xc3 ${3 * OBJ - 7} ${OBJ + 14}`, '-c', 'flush'], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'write and flush', diag(r));
  expected.fill(0xc3, 3 * OBJ - 7, 4 * OBJ + 7);
  r = await run('qemu-io', ['-f', 'raw', d.uri('keep'), '-c', `write -f -P 0xc4 ${9 * OBJ - 3} 6`], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'FUA write', diag(r));
  expected.fill(0xc4, 9 * OBJ - 3, 9 * OBJ + 3);
  await d.kill();

  const info2 = await cli(['info', 'keep', '--json', '--store', own]);
  t.equal(info2.code, 0, 'info after SIGKILL: the map loads', diag(info2.result));
  t.ok(JSON.parse(info2.stdout).generation > gen1, 'each writable open bumped the generation');
  d = await startDaemon(t, { store: own });
  sameBytes(t, await readVolume(t, d.uri('keep'), work), expected, 'after SIGKILL and restart: every flushed byte');
  t.equal(await d.stop(), 0, 'SIGTERM: exit 0');
});

t.test('SIGTERM with an idle client still connected: drains, flushes, exits 0', async (t) => {
  const own = await tempStore(t);
  await create(t, own, 'idle', 1 * MiB);
  const d = await startDaemon(t, { store: own });
  // A client that wrote (no flush) and then just sits there, not reading its socket.
  const py = [
    'import nbd, sys, time',
    'h = nbd.NBD()',
    `h.connect_uri(${JSON.stringify(d.uri('idle'))})`,
    `h.pwrite(b"\\x5e" * 70000, ${OBJ - 35000})`,
    'print("ready", flush=True)',
    'time.sleep(60)',
  ].join('\n');
  const child = spawn('/usr/bin/python3', ['-c', py], { stdio: ['ignore', 'pipe', 'pipe'], env: nbdshEnv() });
  t.teardown(() => { if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL'); });
  let err = '';
  child.stderr.on('data', (b: Buffer) => { err += b.toString(); });
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (b: Buffer) => { if (b.toString().includes('ready')) resolve(); });
    child.on('exit', (code) => reject(new Error(`python client exited ${code}: ${err}`)));
  });
  const started = Date.now();
  const code = await d.stop(25_000);
  const ms = Date.now() - started;
  t.equal(code, 0, 'exit 0');
  t.ok(ms < 15_000, `stopped within the grace periods, not when the client left (${ms} ms)`);
  child.kill('SIGKILL');
  const again = await startDaemon(t, { store: own });
  const r = await run('qemu-io', ['-f', 'raw', again.uri('idle'), '-c', `read -P 0x5e ${OBJ - 35000} 70000`], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'the unflushed write survived the graceful stop', diag(r));
  t.notMatch(r.stdout, /Pattern verification failed/);
  t.equal(await again.stop(), 0);
});

t.test('the shared daemon stops cleanly', async (t) => {
  t.equal(await daemon.stop(), 0, 'SIGTERM: exit 0');
  t.equal(daemon.stderr(), '', 'nothing logged at warn level over the whole run', { stderr: daemon.stderr() });
});
