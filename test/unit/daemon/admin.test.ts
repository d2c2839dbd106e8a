/**
 * src/daemon/admin.ts and the read-only side of volume-export.ts on the
 * memory blocker: a snapshot of a volume a client holds open (through its
 * shared Volume, with a write racing it), of a volume nobody has open, the
 * error replies, status, and snapshots exported read-only with EPERM on
 * writes; plus the socket itself (0600, an oversized line closes it).
 */
import t from 'tap';
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { AdminServer, MAX_LINE, adminRequest } from '../../../src/daemon/admin.js';
import { VolumeProvider } from '../../../src/daemon/volume-export.js';
import type { Store } from '../../../src/daemon/store.js';
import { createLogger } from '../../../src/common/log.js';
import { VolumeMap } from '../../../src/mapper/volume-map.js';

const OBJ = 64 * 1024;
const SIZE = 8 * OBJ;
const log = createLogger({ level: 'error', write: () => {} });

async function setup() {
  const blocker = new MemoryBlocker();
  const store: Store = { url: 'memory:', maps: blocker, data: blocker, close: async () => {} };
  const provider = new VolumeProvider(store, log);
  const admin = new AdminServer(store, provider, log);
  for (const name of ['v', 'w']) await (await VolumeMap.create(blocker, name, { size: SIZE, objectSize: OBJ })).close();
  return { blocker, store, provider, admin };
}

async function readAll(exp: { read(o: number, l: number): Promise<{ offset: number; length: number; data?: Buffer }[]> }): Promise<Buffer> {
  const out = Buffer.alloc(SIZE);
  for (const p of await exp.read(0, SIZE)) if (p.data) p.data.copy(out, p.offset);
  return out;
}

t.test('snapshot of an open volume through the admin API, served read-only', async (t) => {
  const { provider, admin } = await setup();
  const exp = (await provider.open('v'))!;
  await exp.write(0, Buffer.alloc(SIZE, 1), false);
  const racing = exp.write(100, Buffer.alloc(OBJ, 2), false);
  const reply = await admin.handle(JSON.stringify({ op: 'snapshot', volume: 'v', name: 's' }));
  await racing;
  t.match(reply, { ok: true, op: 'snapshot', volume: 'v', name: 's', online: true }, 'snapshot ok');
  t.match(await admin.handle('{"op":"status"}'), { ok: true, volumes: [{ name: 'v', connections: 1 }] }, 'status');

  const snap = (await provider.open('s'))!;
  t.equal(snap.readOnly, true, 'the snapshot export is read-only');
  const s = await readAll(snap);
  const expected = Buffer.alloc(SIZE, 1).fill(2, 100, 100 + OBJ);
  t.ok(s.equals(expected), 'the snapshot holds the write that was in flight (drained before it)');
  await t.rejects(snap.write(0, Buffer.alloc(10), false), { code: 'EPERM' }, 'write: EPERM');
  await t.rejects(snap.trim(0, OBJ, false), { code: 'EPERM' }, 'trim: EPERM');
  await t.rejects(snap.zero(0, OBJ, { fua: false, noHole: false, fastZero: false }), { code: 'EPERM' }, 'zero: EPERM');
  t.ok((await readAll(snap)).equals(s), 'unchanged');
  await exp.write(0, Buffer.alloc(10, 3), false);
  t.ok((await readAll(snap)).equals(s), 'later writes to v do not reach the snapshot');
  await snap.close();
  await exp.close();
  t.equal(provider.openCount, 0, 'everything released');
  await provider.close();
});

t.test('snapshot of a volume nobody has open; errors', async (t) => {
  const { provider, admin } = await setup();
  t.match(await admin.handle('{"op":"snapshot","volume":"w","name":"ws"}'), { ok: true, online: false }, 'offline volume');
  t.equal(provider.openCount, 0, 'closed again afterwards');
  t.match(await admin.handle('{"op":"snapshot","volume":"w","name":"ws"}'), { ok: false, code: 'ARCH_E_VOLUME_EXISTS' }, 'name taken');
  t.match(await admin.handle('{"op":"snapshot","volume":"ws","name":"x"}'), { ok: false, code: 'ARCH_E_USAGE', message: /read-only/ }, 'snapshot of a snapshot');
  t.match(await admin.handle('{"op":"snapshot","volume":"nope","name":"x"}'), { ok: false, code: 'ARCH_E_NO_VOLUME' }, 'no such volume');
  t.match(await admin.handle('{"op":"snapshot","volume":"w","name":"a/b"}'), { ok: false, code: 'ARCH_E_BAD_NAME' }, 'bad name');
  t.match(await admin.handle('{"op":"snapshot","volume":"w"}'), { ok: false, code: 'ARCH_E_USAGE' }, 'missing field');
  t.match(await admin.handle('not json'), { ok: false, code: 'ARCH_E_USAGE' }, 'not JSON');
  t.match(await admin.handle('[1]'), { ok: false, code: 'ARCH_E_USAGE' }, 'not an object');
  t.match(await admin.handle('{"op":"rm"}'), { ok: false, code: 'ARCH_E_USAGE', message: /unknown op/ }, 'unknown op');
  t.equal(provider.openCount, 0, 'nothing left open');
  await provider.close();
});

t.test('the socket: owner only, a request over it, an oversized line closes it', async (t) => {
  const { provider, admin } = await setup();
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'archipelago-admin-'));
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 'a.sock');
  await admin.listen(sock);
  t.equal((await fs.stat(sock)).mode & 0o777, 0o600, 'mode 0600');
  t.match(await adminRequest(sock, { op: 'status' }), { ok: true, volumes: [] }, 'status over the socket');
  const closed = await new Promise<string>((resolve) => {
    const c = net.createConnection({ path: sock });
    c.on('connect', () => c.write('x'.repeat(MAX_LINE + 10)));
    c.on('data', () => resolve('replied'));
    c.on('error', () => {});
    c.on('close', () => resolve('closed'));
  });
  t.equal(closed, 'closed', 'oversized line: connection closed');
  await admin.close();
  t.equal(await fs.access(sock).then(() => true, () => false), false, 'socket file removed');
  await provider.close();
});
