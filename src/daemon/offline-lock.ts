/**
 * Offline map changes under the volume's lock: `archipelago resize`,
 * `rename`, `remove` and `snapshot --offline` work on the store directly,
 * so they take the same lock a daemon writes under (asking a daemon that
 * holds it to hand over: it persists its map and reads on without it), keep
 * it for the change, and release it (DESIGN.md §4: the map never has two
 * writers).
 */
import { VolumeMap } from '../mapper/volume-map.js';
import { createVolumeLock, defaultIdentity, removeLockObject, type LockOwner } from '../locks/index.js';
import type { Store } from './store.js';
import { DEFAULT_LOCK_WAIT_MS } from './volume-export.js';

/** The id of volume `name` (its lock's key). */
export async function volumeIdOf(store: Store, name: string): Promise<string> {
  const map = await VolumeMap.open(store.maps, name, { forWrite: false });
  const id = map.id;
  await map.close();
  return id;
}

/**
 * Runs `fn` holding volume `name`'s lock (waiting up to `waitMs` for a
 * hand-over or a dead holder's fencing). `store` must be the unwrapped one
 * openStore returns.
 */
export async function withVolumeLock<T>(
  store: Store, name: string, fn: () => Promise<T>, o: { waitMs?: number; removesVolume?: boolean } = {},
): Promise<T> {
  const id = await volumeIdOf(store, name);
  const lock = createVolumeLock({ maps: store.maps, rados: store.rados }, id, { identity: defaultIdentity() });
  let result: T;
  try {
    await lock.acquire({ wait: o.waitMs ?? DEFAULT_LOCK_WAIT_MS, requestHandover: true });
    result = await fn();
    lock.assertHeld(); // the change was made under the lock (files: still within the lease)
  } finally {
    await lock.close();
  }
  // The volume is gone: so is its lock object (a daemon still serving it reads nothing now).
  if (o.removesVolume) await removeLockObject({ maps: store.maps, rados: store.rados }, id);
  return result;
}

/** Who holds volume `name`'s lock, as the store says (null: nobody). */
export async function lockOwnerOf(store: Store, volumeId: string): Promise<LockOwner | null> {
  const lock = createVolumeLock({ maps: store.maps, rados: store.rados }, volumeId, { identity: defaultIdentity() });
  try {
    return await lock.owner();
  } finally {
    await lock.close();
  }
}
