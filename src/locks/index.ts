/**
 * The lock layer's public face: VolumeLock and the backend for a store.
 *
 *   import { createVolumeLock, defaultIdentity } from '../locks/index.js';
 *   const identity = defaultIdentity();                     // once per daemon process
 *   const lock = createVolumeLock(store, volumeId, { identity, onReleaseRequested, onLost });
 *
 * The store's blockers must be the real ones (FileBlocker, RadosBlocker),
 * not wrappers: the lock works under the Blocker contract (fs calls on the
 * root, cls_lock and watch/notify on the pool). A MemoryBlocker store gets
 * an in-memory lock shared by everyone using that blocker.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Blocker } from '../blockers/blocker.js';
import { FileBlocker } from '../blockers/file.js';
import { MemoryBlocker } from '../blockers/memory.js';
import { RadosBlocker } from '../blockers/rados/blocker.js';
import type { RadosCluster } from '../blockers/rados/binding.js';
import { FileLockBackend, type FileLockOptions } from './file-backend.js';
import { MemoryLockBackend, MemoryLockTable, type MemoryLockOptions } from './memory-backend.js';
import { RadosLockBackend, type RadosLockOptions } from './rados-backend.js';
import { VOLUME_ID, lockObjectName, type LockBackend } from './types.js';
import { LOCKS_DIR } from './file-dir.js';
import { VolumeLock, type VolumeLockOptions } from './volume-lock.js';

export * from './errors.js';
export * from './types.js';
export { VolumeLock, defaultIdentity, newInstanceId, newToken, lockStateChannel, lockAcquiredChannel, lockHandoverChannel } from './volume-lock.js';
export type { AcquireOptions, BreakOptions, LockAcquiredMessage, LockHandoverMessage, LockStateChange, ReleaseHandler, VolumeLockOptions } from './volume-lock.js';
export { FileLockBackend, FILE_LOCK_DEFAULTS, type FileLockOptions } from './file-backend.js';
export { LOCKS_DIR } from './file-dir.js';
export { RadosLockBackend, RADOS_LOCK_DEFAULTS, RADOS_LOCK_NAME, type RadosLockOptions } from './rados-backend.js';
export { MemoryLockBackend, MemoryLockTable, type MemoryLockOptions } from './memory-backend.js';
export { guardBlocker, type LockGuard } from './guarded-blocker.js';

/** What a lock needs of a store (daemon/store.ts Store has it). */
export interface LockStore {
  maps: Blocker;
  rados?: RadosCluster | null;
}

export interface LockBackendOptions {
  file?: FileLockOptions;
  rados?: RadosLockOptions;
  memory?: MemoryLockOptions;
}

const memoryTables = new WeakMap<Blocker, MemoryLockTable>();

/** The lock backend for volume `volumeId` on `store`'s map blocker. */
export function lockBackendFor(store: LockStore, volumeId: string, options: LockBackendOptions = {}): LockBackend {
  if (!VOLUME_ID.test(volumeId)) throw new TypeError(`lock: volume id ${JSON.stringify(volumeId)} is not 16 lowercase hex digits`);
  const maps = store.maps;
  if (maps instanceof FileBlocker) return new FileLockBackend(maps.root, volumeId, options.file);
  if (maps instanceof RadosBlocker) {
    if (!store.rados) throw new TypeError('lock: a RADOS store needs its cluster connection (store.rados) for fencing');
    return new RadosLockBackend(maps.ioctx, store.rados, volumeId, options.rados);
  }
  if (maps instanceof MemoryBlocker) {
    let table = memoryTables.get(maps);
    if (!table) memoryTables.set(maps, (table = new MemoryLockTable()));
    return new MemoryLockBackend(table, volumeId, options.memory);
  }
  throw new TypeError(`lock: no lock backend for a "${maps.kind}" blocker (pass the unwrapped FileBlocker/RadosBlocker)`);
}

/** A VolumeLock for `volumeId` on `store`. */
export function createVolumeLock(store: LockStore, volumeId: string, options: VolumeLockOptions & { backend?: LockBackendOptions }): VolumeLock {
  return new VolumeLock(lockBackendFor(store, volumeId, options.backend), options);
}

/**
 * Deletes the lock object of a removed volume (RADOS `lock.<id>`, files
 * `locks/lock.<id>/`): call it after the volume is gone and its lock
 * released, so that removing a volume leaves nothing behind. Absent: fine.
 */
export async function removeLockObject(store: LockStore, volumeId: string): Promise<void> {
  if (!VOLUME_ID.test(volumeId)) throw new TypeError(`lock: volume id ${JSON.stringify(volumeId)} is not 16 lowercase hex digits`);
  const maps = store.maps;
  if (maps instanceof FileBlocker) {
    await fs.rm(path.join(maps.root, LOCKS_DIR, lockObjectName(volumeId)), { recursive: true, force: true });
  } else if (maps instanceof RadosBlocker) {
    await maps.ioctx.remove(lockObjectName(volumeId)).catch((err: unknown) => {
      if ((err as { errno?: number }).errno !== 2) throw err; // ENOENT: never locked
    });
  }
}
