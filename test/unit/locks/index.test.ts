/**
 * The lock layer's entry points (src/locks/index.ts): the backend chosen
 * for a store's map blocker, volume id checks, and identities.
 */
import path from 'node:path';
import t from 'tap';
import { openFileBlocker } from '../../../src/blockers/file.js';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { RadosBlocker } from '../../../src/blockers/rados/blocker.js';
import type { RadosIoCtx } from '../../../src/blockers/rados/binding.js';
import {
  FileLockBackend, MemoryLockBackend, createVolumeLock, defaultIdentity, lockBackendFor, lockObjectName,
} from '../../../src/locks/index.js';
import { observeBlocker } from '../../../src/blockers/observed.js';
import { tempDir } from '../../helpers/run.js';

const VOL = 'abcdef0123456789';

t.test('the backend follows the map blocker', async (t) => {
  const root = await tempDir(t);
  const file = await openFileBlocker(path.join(root, 'store'));
  const fb = lockBackendFor({ maps: file }, VOL);
  t.type(fb, FileLockBackend);
  t.equal((fb as FileLockBackend).dir, path.join(file.root, 'locks', 'lock.abcdef0123456789'));
  await file.close();

  const mem = new MemoryBlocker();
  const a = createVolumeLock({ maps: mem }, VOL, { identity: { node: 'a', instance: 'a' } });
  const b = createVolumeLock({ maps: mem }, VOL, { identity: { node: 'b', instance: 'b' } });
  t.type(a.backend, MemoryLockBackend);
  await a.acquire();
  await t.rejects(b.acquire({ wait: false }), { code: 'ARCH_E_LOCK_BUSY' }, 'two locks on one memory store exclude each other');
  const other = createVolumeLock({ maps: new MemoryBlocker() }, VOL, { identity: { node: 'c', instance: 'c' } });
  await other.acquire({ wait: false });
  t.pass('another memory store has its own locks');
  await Promise.all([a.close(), b.close(), other.close()]);

  const rados = new RadosBlocker({ pool: 'p' } as RadosIoCtx);
  t.throws(() => lockBackendFor({ maps: rados }, VOL), /needs its cluster connection/);
  t.throws(() => lockBackendFor({ maps: observeBlocker(mem, () => undefined) }, VOL), /unwrapped/);
  t.throws(() => lockBackendFor({ maps: mem }, 'vol1'), /16 lowercase hex/);
});

t.test('names and identities', async (t) => {
  t.equal(lockObjectName(VOL), `lock.${VOL}`);
  const id = defaultIdentity();
  t.match(id, { node: String, instance: /^[0-9a-f]{12}$/, pid: process.pid });
  t.not(defaultIdentity().instance, id.instance, 'a fresh instance id each time');
  t.equal(defaultIdentity('n1', 'x').node, 'n1');
});
