/**
 * Snapshots and clones against the real daemon (file store, 64 KiB objects):
 * a snapshot taken through the admin socket while a client stays connected
 * and keeps writing afterwards; the snapshot served read-only (nbdinfo,
 * qemu-io); a clone written while its snapshot is served; every volume
 * compared byte for byte (qemu-img compare) with the raw image it should
 * hold; an offline snapshot; and the CLI's errors (exit 2).
 */
import t, { type Test } from 'tap';
import fs from 'node:fs/promises';
import path from 'node:path';
import { cli, startDaemon, type Daemon } from '../helpers/daemon.js';
import { tempStore } from '../helpers/stores.js';
import { diag, nbdshEnv, randomFile, run, tempDir, type RunResult } from '../helpers/run.js';
import { adminRequest } from '../../src/daemon/admin.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

async function exists(file: string): Promise<boolean> {
  return fs.access(file).then(() => true, () => false);
}

async function waitFor(file: string, what: string, timeoutMs = 20_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await exists(file))) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** An nbdsh client that connects, writes `ready`, waits for `go`, then runs `after` (Python) and flushes. */
function heldClient(t: Test, uri: string, ready: string, go: string, after: string): Promise<RunResult> {
  const script = [
    'import os, time',
    `open(${JSON.stringify(ready)}, 'w').close()`,
    `while not os.path.exists(${JSON.stringify(go)}): time.sleep(0.05)`,
    after,
  ].join('\n');
  return run('nbdsh', ['-u', uri, '-c', script], { t, timeoutMs: 60_000, env: nbdshEnv() });
}

async function compare(t: Test, uri: string, raw: string, what: string): Promise<void> {
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', raw, uri], { t, timeoutMs: 60_000 });
  t.equal(r.code, 0, `qemu-img compare: ${what}`, diag(r));
}

t.test('snapshot through the admin socket, clone, read-only exports, offline snapshot, errors', async (t) => {
  const store = await tempStore(t);
  const work = await tempDir(t);
  const S = ['--store', store];
  const admin = path.join(work, 'admin.sock');

  let r = await cli(['create', 'v', '--size', '8M', '--object-size', '64K', ...S]);
  t.equal(r.code, 0, 'create v', diag(r.result));
  const d: Daemon = await startDaemon(t, { store, extraArgs: ['--admin-socket', admin] });
  t.equal((await fs.stat(admin)).mode & 0o777, 0o600, 'admin socket: owner only');

  // The original image.
  const orig = path.join(work, 'orig.raw');
  const origData = await randomFile(orig, SIZE);
  let q = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', orig, d.uri('v')], { t, timeoutMs: 60_000 });
  t.equal(q.code, 0, 'qemu-img convert the random image into v', diag(q));

  // What v holds after the connected client writes once the snapshot exists.
  const patch = path.join(work, 'patch.raw');
  const patchData = await randomFile(patch, 300 * KiB);
  const PATCH_AT = 1 * MiB + 12345; // unaligned, spans objects
  const modData = Buffer.from(origData);
  patchData.copy(modData, PATCH_AT);
  const mod = path.join(work, 'mod.raw');
  await fs.writeFile(mod, modData);

  const ready = path.join(work, 'ready');
  const go = path.join(work, 'go');
  const client = heldClient(t, d.uri('v'), ready, go,
    `h.pwrite(open(${JSON.stringify(patch)}, 'rb').read(), ${PATCH_AT})\nh.flush()`);
  await waitFor(ready, 'the client to connect');

  const st = await adminRequest(admin, { op: 'status' });
  t.match(st, { ok: true, volumes: [{ name: 'v', connections: 1 }] }, 'status: v open by one connection');

  r = await cli(['snapshot', 'v', 's1', '--admin-socket', admin, ...S]);
  t.equal(r.code, 0, 'snapshot v s1 through the daemon', diag(r.result));
  t.match(r.stdout, /through the daemon/);
  await fs.writeFile(go, '');
  const c = await client;
  t.equal(c.code, 0, 'the connected client wrote after the snapshot', diag(c));

  await compare(t, d.uri('s1'), orig, 'snapshot s1 = the original image');
  await compare(t, d.uri('v'), mod, 'v = the modified image');

  // The snapshot is exported read-only.
  const ni = await run('nbdinfo', ['--json', d.uri('s1')], { t, timeoutMs: 20_000 });
  t.equal(ni.code, 0, 'nbdinfo s1', diag(ni));
  t.equal((JSON.parse(ni.stdout) as { exports: { is_read_only: boolean }[] }).exports[0]!.is_read_only, true, 'nbdinfo: s1 is read-only');
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 4k', d.uri('s1')], { t, timeoutMs: 30_000 });
  t.ok(w.code !== 0 || /read.only|Permission denied|not permitted/i.test(w.stdout + w.stderr), 'qemu-io: a write to s1 fails', diag(w));
  await compare(t, d.uri('s1'), orig, 'the refused write changed nothing');

  // info/list know what is what.
  r = await cli(['info', 's1', '--json', ...S]);
  t.match(JSON.parse(r.stdout), { kind: 'snapshot', parent: 'v' }, 'info s1: a snapshot of v');

  // A clone, written while its snapshot is held open read-only.
  r = await cli(['clone', 's1', 'c1', ...S]);
  t.equal(r.code, 0, 'clone s1 c1', diag(r.result));
  const ready2 = path.join(work, 'ready2');
  const go2 = path.join(work, 'go2');
  const reader = heldClient(t, d.uri('s1'), ready2, go2, 'assert h.is_read_only()');
  await waitFor(ready2, 'the snapshot reader to connect');
  q = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 3000000 300k', d.uri('c1')], { t, timeoutMs: 30_000 });
  t.equal(q.code, 0, 'qemu-io writes into c1', diag(q));
  const st2 = await adminRequest(admin, { op: 'status' });
  const open = new Map((st2.ok ? st2.volumes as { name: string; connections: number }[] : []).map((v) => [v.name, v.connections]));
  t.equal(open.get('s1'), 1, 'status: s1 held open by the reader while c1 was written');
  await fs.writeFile(go2, '');
  const rd = await reader;
  t.equal(rd.code, 0, 'the reader saw a read-only export', diag(rd));

  const cloneData = Buffer.from(origData);
  cloneData.fill(0x5c, 3000000, 3000000 + 300 * KiB);
  const cloneRaw = path.join(work, 'clone.raw');
  await fs.writeFile(cloneRaw, cloneData);
  await compare(t, d.uri('c1'), cloneRaw, 'c1 = the original + its own write');
  await compare(t, d.uri('s1'), orig, 's1 unchanged by the clone\'s write');
  await compare(t, d.uri('v'), mod, 'v unchanged by the clone\'s write');
  r = await cli(['info', 'c1', '--json', ...S]);
  t.match(JSON.parse(r.stdout), { kind: 'volume', parent: 's1' }, 'info c1: a volume cloned from s1');

  // create --from: same as clone.
  r = await cli(['create', 'c2', '--from', 's1', ...S]);
  t.equal(r.code, 0, 'create c2 --from s1', diag(r.result));
  await compare(t, d.uri('c2'), orig, 'c2 = the snapshot');

  // Errors.
  r = await cli(['snapshot', 'v', 's1', '--admin-socket', admin, ...S]);
  t.equal(r.code, 2, 'snapshot name taken: exit 2', diag(r.result));
  t.match(r.stderr, /"s1": already exists/);
  r = await cli(['snapshot', 's1', 's9', '--admin-socket', admin, ...S]);
  t.equal(r.code, 2, 'snapshot of a snapshot: exit 2', diag(r.result));
  t.match(r.stderr, /read-only/);
  r = await cli(['clone', 'v', 'c3', ...S]);
  t.equal(r.code, 2, 'clone of a writable volume: exit 2', diag(r.result));
  t.match(r.stderr, /"v" is a writable volume, not a snapshot; snapshot it and clone the snapshot/);
  const bad = await adminRequest(admin, { op: 'explode' });
  t.match(bad, { ok: false, code: 'ARCH_E_USAGE', message: /unknown op/ }, 'unknown op: an error reply');
  const badName = await adminRequest(admin, { op: 'snapshot', volume: 'v', name: '../x' });
  t.match(badName, { ok: false, code: 'ARCH_E_BAD_NAME' }, 'bad name: an error reply');

  // Offline: no daemon.
  t.equal(await d.stop(), 0, 'daemon stops cleanly');
  t.equal(await exists(admin), false, 'the admin socket is removed at stop');
  r = await cli(['snapshot', 'v', 's2', ...S]);
  t.equal(r.code, 2, 'neither a socket nor --offline: a usage error', diag(r.result));
  t.match(r.stderr, /--admin-socket PATH .* or --offline/);
  r = await cli(['snapshot', 'v', 's2', '--admin-socket', admin, ...S]);
  t.equal(r.code, 1, 'a socket with no daemon: an error, never an unsafe offline snapshot', diag(r.result));
  t.match(r.stderr, /admin socket .*is the daemon running/);
  r = await cli(['snapshot', 'v', 's2', '--offline', ...S]);
  t.equal(r.code, 0, 'offline snapshot v s2', diag(r.result));
  t.notMatch(r.stdout, /through the daemon/);
  r = await cli(['snapshot', 'c1', 's3', '--offline', ...S]);
  t.equal(r.code, 0, 'offline snapshot c1 s3', diag(r.result));
  const d2 = await startDaemon(t, { store });
  await compare(t, d2.uri('s2'), mod, 'offline snapshot s2 = v');
  await compare(t, d2.uri('s3'), cloneRaw, 'offline snapshot s3 = c1');
  t.equal(await d2.stop(), 0, 'second daemon stops cleanly');
});
