/**
 * The server on a Unix socket, used by qemu-io and nbdinfo through
 * nbd+unix:// URIs, side by side with its TCP listener.
 */
import t from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import { startTestServer } from '../helpers/nbd-server.js';
import { diag, run, tempDir } from '../helpers/run.js';

const MiB = 1024 * 1024;

t.test('Unix socket: qemu-io and nbdinfo', async (t) => {
  const dir = await tempDir(t);
  const sock = path.join(dir, 'nbd.sock');
  const srv = await startTestServer(t, (p) => {
    p.addMemory('disk', 32 * MiB);
    p.addMemory('ro', 1 * MiB, true, 'read-only disk');
  });
  const bound = await srv.server.listen({ path: sock });
  t.equal(bound.path, sock, 'listening on the socket path');
  const st = await fs.stat(sock);
  t.ok(st.isSocket(), 'a socket file exists');
  t.equal(st.mode & 0o777, 0o660, 'socket mode 0660');
  const uri = (name: string) => `nbd+unix:///${name}?socket=${sock}`;

  const w = await run('qemu-io', ['-f', 'raw', '-t', 'none', uri('disk'),
    '-c', 'write -P 0xa1 0 1M', '-c', 'read -P 0xa1 0 1M',
    '-c', 'write -z -u 1M 1M', '-c', 'read -P 0 1M 1M',
    '-c', 'aio_write -P 0xb2 4M 64k', '-c', 'aio_flush', '-c', 'read -P 0xb2 4M 64k',
    '-c', 'write -f -P 0xc3 8M 4k', '-c', 'flush'], { t, timeoutMs: 30_000 });
  t.equal(w.code, 0, 'qemu-io over the Unix socket exits 0', diag(w));
  t.notMatch(w.stdout + w.stderr, /Pattern verification failed|error/i);

  // What was written over the socket is visible over TCP: one server, one store.
  const r = await run('qemu-io', ['-f', 'raw', srv.uri('disk'), '-c', 'read -P 0xa1 0 1M', '-c', 'read -P 0xc3 8M 4k'],
    { t, timeoutMs: 30_000 });
  t.equal(r.code, 0, 'the same data read back over TCP', diag(r));

  const neg = await run('qemu-io', ['-f', 'raw', uri('disk'), '-c', 'read -P 0xa1 1M 4k'], { t, timeoutMs: 30_000 });
  t.not(neg.code, 0, 'negative control: a wrong pattern fails over the socket');

  const info = await run('nbdinfo', ['--json', uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(info.code, 0, 'nbdinfo --json over the socket exits 0', diag(info));
  const j = JSON.parse(info.stdout) as { exports: Array<Record<string, unknown>> };
  t.match(j.exports[0], { 'export-name': 'disk', 'export-size': 32 * MiB, is_read_only: false, can_zero: true });

  const list = await run('nbdinfo', ['--list', `nbd+unix://?socket=${sock}`], { t, timeoutMs: 30_000 });
  t.equal(list.code, 0, 'nbdinfo --list over the socket exits 0', diag(list));
  t.match(list.stdout, /export="disk":/);
  t.match(list.stdout, /export="ro":\s*\n\s*description: read-only disk/);

  const map = await run('nbdinfo', ['--map', uri('disk')], { t, timeoutMs: 30_000 });
  t.equal(map.code, 0, 'nbdinfo --map over the socket exits 0', diag(map));
  const rows = map.stdout.trim().split('\n').map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
  t.same(rows, [
    [0, 1 * MiB, 0], // written
    [1 * MiB, 3 * MiB, 3], // zeroed with unmap, then never written
    [4 * MiB, 64 * 1024, 0], // aio_write
    [4 * MiB + 64 * 1024, 4 * MiB - 64 * 1024, 3],
    [8 * MiB, 64 * 1024, 0], // a 4k write allocates its 64k page
    [8 * MiB + 64 * 1024, 24 * MiB - 64 * 1024, 3],
  ], 'map: data where written, holes elsewhere');

  await srv.server.close(2000);
  await t.rejects(fs.stat(sock), { code: 'ENOENT' }, 'graceful close removes the socket file');
});
