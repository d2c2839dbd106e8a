/**
 * Damaged metadata and data on a file store are reported, never served as
 * zeros: a flipped byte in a map chunk, a missing chunk, a missing data
 * object, a truncated or flipped header. The daemon keeps serving the
 * volumes that are fine; `archipelago info` says "corrupt" when the header is
 * damaged and still works when only a chunk is.
 *
 * Corruption is done with the daemon stopped, then it starts again: a running
 * daemon may legitimately keep a volume's map in memory while a client has
 * it open.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import { cli, startDaemon, tempFileStore as tempStore, type Daemon } from '../helpers/daemon.js';
import { diag, run, tempDir } from '../helpers/run.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const OBJ = 64 * KiB;

/** Every object file of the store by object name (the fan-out directories hide where). */
async function storeFiles(store: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const e of await fs.readdir(store, { recursive: true, withFileTypes: true })) {
    if (e.isFile() && !e.name.startsWith('~') && e.name !== 'archipelago-store.json') out.set(e.name, path.join(e.parentPath, e.name));
  }
  return out;
}

async function flipByte(file: string, offset: number): Promise<void> {
  const fh = await fs.open(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, offset);
    b[0] = b[0]! ^ 0x40;
    await fh.write(b, 0, 1, offset);
  } finally {
    await fh.close();
  }
}

async function qemuIo(t: Test, uri: string, ...commands: string[]) {
  return run('qemu-io', ['-f', 'raw', uri, ...commands.flatMap((c) => ['-c', c])], { t, timeoutMs: 30_000 });
}

t.test('corrupt metadata is reported, never served as zeros', async (t) => {
  const store = await tempStore(t);
  const work = await tempDir(t, 'archipelago-format-');
  const url = `file:${store}`;
  const names = ['flip', 'nochunk', 'nodata', 'short', 'badhdr', 'fine'];
  for (const n of names) {
    const r = await cli(['create', n, '--size', String(4 * MiB), '--object-size', '64K', '--store', url]);
    t.equal(r.code, 0, `create ${n}`, diag(r.result));
  }

  // Data in every volume, across object boundaries.
  let d: Daemon = await startDaemon(t, { store });
  for (const n of names) {
    const r = await qemuIo(t, d.uri(n), `write -P 0xa1 100000 200000`, 'flush');
    t.equal(r.code, 0, `write ${n}`, diag(r));
  }
  t.equal(await d.stop(), 0, 'stop cleanly');

  const ids = new Map<string, string>();
  for (const n of names) {
    const r = await cli(['info', n, '--json', '--store', url]);
    const info = JSON.parse(r.stdout) as { id: string; mapChunks: number };
    t.equal(info.mapChunks, 1, `${n}: one map chunk`);
    ids.set(n, info.id);
  }
  const files = await storeFiles(store);
  const chunkOf = (n: string) => {
    const found = [...files.keys()].filter((f) => f.startsWith(`m.${ids.get(n)}.`));
    t.equal(found.length, 1, `${n}: one chunk file m.${ids.get(n)}.*`);
    return files.get(found[0]!)!;
  };
  const flipChunk = chunkOf('flip');
  const chunkBefore = await fs.readFile(flipChunk);

  // The damage.
  await flipByte(flipChunk, 32 + 8 * 2); // entry of object 2: a CRC mismatch
  const flipped = await fs.readFile(flipChunk);
  t.not(flipped.compare(chunkBefore), 0, 'the chunk file changed');
  await fs.rm(chunkOf('nochunk'));
  const dataObjects = [...files.keys()].filter((f) => f.startsWith(`d.${ids.get('nodata')}.`));
  t.equal(dataObjects.length, 4, 'nodata: four data objects (objects 1..4)');
  await fs.rm(files.get(dataObjects.sort()[0]!)!);
  const shortHeader = files.get('vol.short')!;
  await fs.truncate(shortHeader, 40);
  await flipByte(files.get('vol.badhdr')!, 41); // inside the size: only the CRC can tell

  d = await startDaemon(t, { store });

  await t.test('a flipped byte in a map chunk: reads and writes fail with EIO', async (t) => {
    let r = await qemuIo(t, d.uri('flip'), 'read -P 0xa1 100000 200000');
    t.not(r.code, 0, 'qemu-io read exits non-zero', diag(r));
    t.match(r.stdout + r.stderr, /Input\/output error/, 'an I/O error');
    r = await qemuIo(t, d.uri('flip'), 'read -P 0 0 4096');
    t.not(r.code, 0, 'an unwritten range covered by the chunk is not served as zeros either', diag(r));
    t.match(r.stdout + r.stderr, /Input\/output error/);
    r = await qemuIo(t, d.uri('flip'), `write -P 0xee ${5 * OBJ} 100`);
    t.not(r.code, 0, 'a write that needs the chunk fails', diag(r));
    const nbdcopy = await run('nbdcopy', [d.uri('flip'), path.join(work, 'flip.raw')], { t, timeoutMs: 30_000 });
    t.not(nbdcopy.code, 0, 'copying the volume out fails', diag(nbdcopy));
    t.same(await fs.readFile(flipChunk), flipped, 'the damaged chunk was not overwritten');
    const info = await cli(['info', 'flip', '--json', '--store', url]);
    t.equal(info.code, 0, 'archipelago info still works (the header is fine)', diag(info.result));
    t.equal(JSON.parse(info.stdout).name, 'flip');
  });

  await t.test('a missing map chunk: reads fail', async (t) => {
    const r = await qemuIo(t, d.uri('nochunk'), 'read -P 0xa1 100000 200000');
    t.not(r.code, 0, 'qemu-io read exits non-zero', diag(r));
    t.match(r.stdout + r.stderr, /Input\/output error/, 'an I/O error, not zeros');
    t.equal((await cli(['info', 'nochunk', '--store', url])).code, 0, 'info works');
  });

  await t.test('a missing data object: reads of it fail, the rest is served', async (t) => {
    let r = await qemuIo(t, d.uri('nodata'), `read -P 0xa1 ${OBJ} 100`);
    t.not(r.code, 0, 'reading the lost object fails', diag(r));
    t.match(r.stdout + r.stderr, /Input\/output error/, 'an I/O error, not zeros');
    r = await qemuIo(t, d.uri('nodata'), `read -P 0xa1 ${2 * OBJ} ${OBJ}`, `read -P 0 ${OBJ * 10} ${OBJ}`);
    t.equal(r.code, 0, 'the other objects read fine', diag(r));
  });

  await t.test('a truncated header: info says corrupt, the daemon refuses the volume', async (t) => {
    const info = await cli(['info', 'short', '--store', url]);
    t.not(info.code, 0, 'archipelago info exits non-zero', diag(info.result));
    t.match(info.stderr, /corrupt/i, 'the message says corrupt');
    t.match(info.stderr, /vol\.short/, 'and names the object');
    const r = await run('nbdinfo', [d.uri('short')], { t, timeoutMs: 20_000 });
    t.not(r.code, 0, 'nbdinfo fails', diag(r));
  });

  await t.test('a flipped byte in a header: info says corrupt, the daemon refuses the volume', async (t) => {
    const info = await cli(['info', 'badhdr', '--json', '--store', url]);
    t.not(info.code, 0, 'archipelago info exits non-zero', diag(info.result));
    t.match(info.stderr, /corrupt/i, 'the message says corrupt');
    t.equal(info.stdout, '', 'nothing on stdout');
    const r = await run('qemu-io', ['-f', 'raw', d.uri('badhdr'), '-c', 'read 0 512'], { t, timeoutMs: 20_000 });
    t.not(r.code, 0, 'qemu-io cannot open it', diag(r));
  });

  await t.test('the daemon keeps serving the healthy volume', async (t) => {
    t.ok(d.running, 'the daemon is still running');
    const r = await qemuIo(t, d.uri('fine'), 'read -P 0xa1 100000 200000', 'read -P 0 0 100000', `write -P 0xb2 ${OBJ - 1} 2`, `read -P 0xb2 ${OBJ - 1} 2`);
    t.equal(r.code, 0, 'reads and writes work', diag(r));
    t.notMatch(r.stdout, /Pattern verification failed/);
    const list = await cli(['list', '--store', url]);
    t.equal(list.code, 0, 'list works', diag(list.result));
    t.match(list.stdout, /^fine$/m, 'lists the healthy volume');
  });

  t.equal(await d.stop(), 0, 'SIGTERM: exit 0 after serving damaged volumes');
});
