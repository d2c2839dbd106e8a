/**
 * fio's nbd engine (libnbd) against the real server: random writes at queue
 * depth 32, verified with crc32c on read-back, on a memory export and on a
 * sparse raw file, and with two jobs (two connections) at once.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Export } from '../../src/nbd/export.js';
import { startTestServer, type TestServer } from '../helpers/nbd-server.js';
import { diag, run, tempDir, type RunResult } from '../helpers/run.js';

const MiB = 1024 * 1024;
const VERIFY = ['--verify=crc32c', '--do_verify=1', '--verify_state_save=0'];

async function fio(t: Test, cwd: string, uri: string, args: string[]): Promise<RunResult> {
  return run('fio', ['--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--iodepth=32', ...VERIFY, ...args],
    { t, cwd, timeoutMs: 45_000 });
}

/** Counts exports opened and closed by the server (every connection must release its export). */
function countOpens(srv: TestServer): { opened: number; closed: number } {
  const n = { opened: 0, closed: 0 };
  const open = srv.provider.open.bind(srv.provider);
  srv.provider.open = async (name: string): Promise<Export | null> => {
    const exp = await open(name);
    if (exp) {
      n.opened++;
      const close = exp.close.bind(exp);
      exp.close = () => { n.closed++; return close(); };
    }
    return exp;
  };
  return n;
}

async function drained(srv: TestServer): Promise<void> {
  for (let i = 0; i < 100 && srv.server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 50));
}

/** fio exits 0 and every job reports `err= 0`. */
function assertClean(t: Test, r: RunResult, jobs: number, label: string): void {
  t.equal(r.code, 0, `${label}: fio exits 0`, diag(r));
  const errs = [...r.stdout.matchAll(/: \(groupid=\d+, jobs=\d+\): err=\s*(\d+)/g)].map((m) => Number(m[1]));
  t.same(errs, new Array(jobs).fill(0), `${label}: ${jobs} job(s), each err= 0`, diag(r));
  t.notMatch(r.stdout + r.stderr, /verify: bad|fio: pid=\d+, err=/, `${label}: no verify failure`);
}

t.test('fio randwrite + verify on a memory export', async (t) => {
  const dir = await tempDir(t);
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 64 * MiB));
  const store = srv.provider.memory.get('disk')!.store;

  const r4k = await fio(t, dir, srv.uri('disk'), ['--name=rand4k', '--bs=4k', '--size=32m']);
  assertClean(t, r4k, 1, '4k');
  t.match(r4k.stdout, /issued rwts: total=8192,8192,/, '8192 writes, 8192 verify reads');

  const rmix = await fio(t, dir, srv.uri('disk'), ['--name=mixed', '--bssplit=64k/40:256k/30:1m/30', '--size=64m']);
  assertClean(t, rmix, 1, '64k-1M mixed');

  // Negative control: corrupt one block behind fio's back; verify_only must notice.
  const rw = await fio(t, dir, srv.uri('disk'), ['--name=ctl', '--bs=4k', '--size=8m']);
  assertClean(t, rw, 1, 'control write');
  const again = await fio(t, dir, srv.uri('disk'), ['--name=ctl', '--bs=4k', '--size=8m', '--verify_only']);
  assertClean(t, again, 1, 'control verify_only before corruption');
  store.write(4 * MiB, Buffer.alloc(4096));
  const bad = await fio(t, dir, srv.uri('disk'), ['--name=ctl', '--bs=4k', '--size=8m', '--verify_only']);
  t.not(bad.code, 0, 'fio fails after the corruption', diag(bad));
  t.match(bad.stdout + bad.stderr, /verify: bad magic header 0.*offset 4194304/, 'the corrupted block is reported');

  t.same(await fs.readdir(dir), [], 'fio left no files in its directory');
});

t.test('fio randwrite + verify on a sparse raw file export', async (t) => {
  const dir = await tempDir(t);
  const file = path.join(dir, 'sparse.img');
  const r0 = await run('truncate', ['-s', '64M', file], { t });
  t.equal(r0.code, 0, 'truncate -s 64M', diag(r0));
  const work = path.join(dir, 'fio');
  await fs.mkdir(work);
  const srv = await startTestServer(t, (p) => p.addFile('file', file));
  const opens = countOpens(srv);

  const r4k = await fio(t, work, srv.uri('file'), ['--name=file4k', '--bs=4k', '--size=16m']);
  assertClean(t, r4k, 1, '4k');
  const rmix = await fio(t, work, srv.uri('file'), ['--name=filemixed', '--bssplit=64k/40:256k/30:1m/30', '--size=64m']);
  assertClean(t, rmix, 1, '64k-1M mixed');
  const st = await fs.stat(file);
  t.equal(st.size, 64 * MiB, 'file size unchanged');
  t.ok(st.blocks * 512 >= 32 * MiB, `file is now mostly allocated (${st.blocks * 512} bytes)`);
  await drained(srv);
  t.equal(srv.server.connectionCount, 0, 'all connections ended');
  t.ok(opens.opened >= 2, `exports opened (${opens.opened})`);
  t.equal(opens.closed, opens.opened, 'every export opened was closed');
});

t.test('fio: two jobs at once, two connections', async (t) => {
  const dir = await tempDir(t);
  const srv = await startTestServer(t, (p) => p.addMemory('disk', 64 * MiB));
  const opens = countOpens(srv);
  let maxConns = 0;
  const timer = setInterval(() => { maxConns = Math.max(maxConns, srv.server.connectionCount); }, 5);
  t.teardown(() => clearInterval(timer));
  const r = await fio(t, dir, srv.uri('disk'), ['--name=two', '--bssplit=4k/50:64k/30:1m/20', '--size=24m',
    '--numjobs=2', '--offset_increment=32m']);
  clearInterval(timer);
  assertClean(t, r, 2, 'two jobs');
  t.ok(maxConns >= 2, `two connections open at once (max ${maxConns})`);
  await drained(srv);
  t.equal(opens.closed, opens.opened, `every export opened was closed (${opens.opened})`);
});
