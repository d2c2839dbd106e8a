/**
 * libnbd's tools (nbdinfo, nbdcopy) against the real server on 127.0.0.1.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import { startTestServer } from '../helpers/nbd-server.js';
import { diag, randomFile, run, tempDir } from '../helpers/run.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface InfoExport {
  'export-name': string;
  description?: string;
  'export-size': number;
  contexts: string[];
  is_read_only: boolean;
  is_rotational: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
}
interface Info { protocol: string; TLS: boolean; structured: boolean; exports: InfoExport[] }

t.test('nbdinfo plain and --json', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 64 * MiB));
  const r = await run('nbdinfo', [srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'nbdinfo exits 0', diag(r));
  t.match(r.stdout, /protocol: newstyle-fixed without TLS, using structured packets/);
  t.match(r.stdout, /export-size: 67108864 \(64M\)/);
  t.match(r.stdout, /contexts:\s*\n\s*base:allocation/, 'base:allocation listed');

  const j = await run('nbdinfo', ['--json', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(j.code, 0, 'nbdinfo --json exits 0', diag(j));
  const info = JSON.parse(j.stdout) as Info;
  t.equal(info.protocol, 'newstyle-fixed');
  t.equal(info.TLS, false);
  t.equal(info.structured, true, 'structured replies negotiated');
  t.equal(info.exports.length, 1);
  const e = info.exports[0]!;
  t.equal(e['export-name'], 'disk');
  t.equal(e['export-size'], 64 * MiB, 'export-size');
  t.ok(e.contexts.includes('base:allocation'), 'contexts include base:allocation');
  t.match(e, {
    is_read_only: false, is_rotational: false,
    can_cache: true, can_df: true, can_fast_zero: true, can_flush: true, can_fua: true,
    can_multi_conn: true, can_trim: true, can_zero: true,
  }, 'can_* flags');
  t.match(e, { block_size_minimum: 1, block_size_preferred: 4096, block_size_maximum: 32 * MiB }, 'block sizes');

  // nbdinfo --can answers with its exit code.
  for (const what of ['zero', 'trim', 'flush', 'fua', 'multi-conn', 'structured-reply', 'df', 'cache', 'fast-zero']) {
    const c = await run('nbdinfo', ['--can', what, srv.uri('disk')], { t, timeoutMs: 30_000 });
    t.equal(c.code, 0, `nbdinfo --can ${what}`, diag(c));
  }
  const ro = await run('nbdinfo', ['--is', 'read-only', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(ro.code, 2, 'nbdinfo --is read-only: no', diag(ro));
});

t.test('nbdinfo --list: three exports, one read-only, one described', async (t) => {
  const srv = await startTestServer(t, (p) => {
    p.addMemory('disk', 64 * MiB);
    p.addMemory('ro', 16 * MiB, true);
    p.addMemory('small', 1 * MiB, false, 'a small scratch disk');
  });
  const r = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${srv.port}`], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'nbdinfo --list exits 0', diag(r));
  t.match(r.stdout, /export="disk":/);
  t.match(r.stdout, /export="ro":/);
  t.match(r.stdout, /export="small":\s*\n\s*description: a small scratch disk/);

  const j = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`], { t, timeoutMs: 30_000 });
  t.equal(j.code, 0, 'nbdinfo --list --json exits 0', diag(j));
  const info = JSON.parse(j.stdout) as Info;
  t.same(info.exports.map((e) => e['export-name']), ['disk', 'ro', 'small'], 'all three exports, in order');
  const by = new Map(info.exports.map((e) => [e['export-name'], e]));
  t.match(by.get('disk'), { 'export-size': 64 * MiB, is_read_only: false, can_zero: true });
  t.match(by.get('ro'), { 'export-size': 16 * MiB, is_read_only: true, can_zero: false, can_trim: false, can_fast_zero: false });
  t.match(by.get('small'), { 'export-size': 1 * MiB, description: 'a small scratch disk' });
  t.notOk(by.get('disk')!.description, 'no description where none was set');
});

t.test('nbdinfo --map: holes where nothing was written', async (t) => {
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 16 * MiB));
  const store = srv.provider.memory.get('disk')!.store;
  store.write(1 * MiB, Buffer.alloc(256 * KiB, 0x5a));
  store.write(8 * MiB, Buffer.alloc(64 * KiB, 0x5a));
  const r = await run('nbdinfo', ['--map', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'nbdinfo --map exits 0', diag(r));
  const rows = r.stdout.trim().split('\n').map((l) => {
    const [offset, length, type, ...desc] = l.trim().split(/\s+/);
    return { offset: Number(offset), length: Number(length), type: Number(type), desc: desc.join(' ') };
  });
  t.same(rows, [
    { offset: 0, length: 1 * MiB, type: 3, desc: 'hole,zero' },
    { offset: 1 * MiB, length: 256 * KiB, type: 0, desc: 'data' },
    { offset: 1 * MiB + 256 * KiB, length: 8 * MiB - (1 * MiB + 256 * KiB), type: 3, desc: 'hole,zero' },
    { offset: 8 * MiB, length: 64 * KiB, type: 0, desc: 'data' },
    { offset: 8 * MiB + 64 * KiB, length: 8 * MiB - 64 * KiB, type: 3, desc: 'hole,zero' },
  ], 'map rows');
  const tot = await run('nbdinfo', ['--map', '--totals', srv.uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(tot.code, 0, 'nbdinfo --map --totals exits 0', diag(tot));
  t.match(tot.stdout, new RegExp(`^\\s*${320 * KiB}\\s+[\\d.]+%\\s+0\\s+data`, 'm'), '320 KiB of data in total');
});

t.test('nbdcopy in and out with 4 connections, and to null:', async (t) => {
  const dir = await tempDir(t);
  const src = path.join(dir, 'src.img');
  const out = path.join(dir, 'out.img');
  const data = await randomFile(src, 32 * MiB);
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 32 * MiB));
  const store = srv.provider.memory.get('disk')!.store;
  let maxConns = 0;
  const timer = setInterval(() => { maxConns = Math.max(maxConns, srv.server.connectionCount); }, 2);
  t.teardown(() => clearInterval(timer));

  const opts = ['--connections=4', '--requests=16', '--flush'];
  const cin = await run('nbdcopy', [...opts, src, srv.uri('disk')], { t, timeoutMs: 45_000 });
  t.equal(cin.code, 0, 'nbdcopy file → export exits 0', diag(cin));
  t.ok(store.bytes(0, 32 * MiB).equals(data), 'export holds the file');

  const cout = await run('nbdcopy', [...opts, srv.uri('disk'), out], { t, timeoutMs: 45_000 });
  t.equal(cout.code, 0, 'nbdcopy export → file exits 0', diag(cout));
  t.ok((await fs.readFile(out)).equals(data), 'file copied out is byte-exact');
  clearInterval(timer);
  t.ok(maxConns > 1, `multi-conn used: ${maxConns} connections seen at once`);

  const nul = await run('nbdcopy', [srv.uri('disk'), 'null:'], { t, timeoutMs: 45_000 });
  t.equal(nul.code, 0, 'nbdcopy export → null: exits 0', diag(nul));

  // Sparse source: nbdcopy skips holes via block status and the copy still matches.
  const sparse = await startTestServer(t, (p) => p.addMemory('sparse', 16 * MiB));
  const sstore = sparse.provider.memory.get('sparse')!.store;
  sstore.write(3 * MiB, data.subarray(0, 512 * KiB));
  const out2 = path.join(dir, 'sparse.img');
  const cs = await run('nbdcopy', [...opts, sparse.uri('sparse'), out2], { t, timeoutMs: 45_000 });
  t.equal(cs.code, 0, 'nbdcopy sparse export → file exits 0', diag(cs));
  const copied = await fs.readFile(out2);
  t.equal(copied.length, 16 * MiB);
  t.ok(copied.equals(sstore.bytes(0, 16 * MiB)), 'sparse copy is byte-exact');
});
